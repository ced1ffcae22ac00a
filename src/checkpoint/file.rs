//! One safetensors file, memory-mapped and validated before anything reads a tensor.
//!
//! Validation is stricter than the format's own loader in one way that matters to us: the data
//! section must be covered exactly, tensor after tensor, with no gap, overlap or trailing byte.
//! That is what lets the writer keep the header verbatim and stream tensors to the same offsets.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::dtype::Dtype;
use crate::error::{err, Class, Error, Result};

/// The same ceiling the reference safetensors loader uses; a larger header is an attack, not a model.
pub const MAX_HEADER: u64 = 100_000_000;

/// One tensor of a safetensors file, as its header describes it.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Its name in the header.
    pub name: String,
    /// Its element type.
    pub dtype: Dtype,
    /// Its dimensions.
    pub shape: Vec<usize>,
    /// Byte range inside the data section (after the header).
    pub start: usize,
    /// End of the byte range (exclusive).
    pub end: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The bytes of a file: memory-mapped from disk, or owned (parsed from memory, e.g. by fuzzers).
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A validated safetensors file, memory-mapped (or owned bytes for fuzzers).
pub struct SafeFile {
    /// Where the bytes came from (for `from_bytes`, only a label used in messages).
    pub path: PathBuf,
    /// The file the bytes were mapped from, kept open so that later reads (the merge's
    /// copy_file_range) go to the same file, never to whatever the path names by then.
    file: Option<File>,
    /// Declared before `mmap` so that the range is unregistered before it is unmapped.
    fault: Option<crate::fault::MapGuard>,
    mmap: Bytes,
    /// 8 + header length: where the data section begins in the file.
    pub data_offset: usize,
    /// Tensors sorted by their start offset.
    pub tensors: Vec<TensorInfo>,
    /// The header's `__metadata__`, when present.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Positions in `tensors` sorted by name, so that looking up every tensor of a file is not
    /// quadratic; four bytes a tensor where a map would hold a second copy of every name.
    by_name: Vec<u32>,
}

/// The header's entries, each checked as it is read, so that a header of a million small
/// entries never exists as a million JSON trees at once: the tensors, `__metadata__`, and the
/// first problem in file order (past it the rest of the header is only read as JSON, whose
/// syntax errors still come first).
struct Entries {
    tensors: Vec<TensorInfo>,
    metadata: Option<BTreeMap<String, String>>,
    first_error: Option<Error>,
}

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut e = Entries {
                    tensors: Vec::new(),
                    metadata: None,
                    first_error: None,
                };
                // Names given twice are found afterwards by sorting positions (`by_name`): a set
                // of the names seen would hold a second copy of every one while reading.
                while let Some(name) = m.next_key::<String>()? {
                    if e.first_error.is_some() {
                        m.next_value::<serde::de::IgnoredAny>()?;
                        continue;
                    }
                    let v = m.next_value_seed(Shallow {
                        all_fields: name == "__metadata__",
                    })?;
                    let parsed = if name == "__metadata__" {
                        parse_metadata(&v).map(|md| e.metadata = Some(md))
                    } else {
                        parse_tensor(&name, &v).map(|t| e.tensors.push(t))
                    };
                    e.first_error = parsed.err();
                }
                Ok(e)
            }
        }
        d.deserialize_map(V)
    }
}

/// The longest array kept of a header field (a shape's dimensions, `data_offsets`, a metadata
/// value); longer ones keep this many and a `null`, which the checks reject like any bad value.
const MAX_FIELD_ITEMS: usize = 1024;

/// One header entry read only as deep as `parse_tensor` and `parse_metadata` look: its fields (for
/// a tensor only `dtype`, `shape` and `data_offsets`; for `__metadata__` every key), each a scalar
/// or an array of at most `MAX_FIELD_ITEMS` scalars. Whatever else the entry holds is skipped as
/// it is read, so padding inside one entry costs no memory.
struct Shallow {
    all_fields: bool,
}

impl<'de> serde::de::DeserializeSeed<'de> for Shallow {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        d.deserialize_any(ShallowV {
            all_fields: self.all_fields,
            depth: 0,
        })
    }
}

/// depth 0: the entry; 1: a field's value; 2: an item of a field's array.
struct ShallowV {
    all_fields: bool,
    depth: u8,
}

impl<'de> serde::de::DeserializeSeed<'de> for ShallowV {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ShallowV {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_unit<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut a: A,
    ) -> std::result::Result<Value, A::Error> {
        if self.depth != 1 {
            while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            return Ok(Value::Null);
        }
        let mut items = Vec::new();
        let item = || ShallowV {
            all_fields: false,
            depth: 2,
        };
        while let Some(v) = a.next_element_seed(item())? {
            if items.len() == MAX_FIELD_ITEMS {
                items.push(Value::Null);
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                break;
            }
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<Value, A::Error> {
        if self.depth != 0 {
            while m
                .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                .is_some()
            {}
            return Ok(Value::Null);
        }
        let mut obj = serde_json::Map::new();
        while let Some(k) = m.next_key::<String>()? {
            if self.all_fields || matches!(k.as_str(), "dtype" | "shape" | "data_offsets") {
                let v = m.next_value_seed(ShallowV {
                    all_fields: false,
                    depth: 1,
                })?;
                obj.insert(k, v);
            } else {
                m.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(Value::Object(obj))
    }
}

fn parse_metadata(v: &Value) -> Result<BTreeMap<String, String>> {
    let bare = |m: String| Error::bare(Class::BadTensorInfo, m);
    let obj = v
        .as_object()
        .ok_or_else(|| bare("__metadata__ is not an object".into()))?;
    let mut m = BTreeMap::new();
    for (k, val) in obj {
        let s = val
            .as_str()
            .ok_or_else(|| bare(format!("__metadata__ value for {k:?} is not a string")))?;
        m.insert(k.clone(), s.to_string());
    }
    Ok(m)
}

/// Maps at least this long are released in pieces across the cores when dropped.
const RELEASE_PARALLEL: usize = 32 << 20;

impl Drop for SafeFile {
    fn drop(&mut self) {
        // Unmapping a large file is page-table work proportional to what was touched (~10 ms
        // per 100 MB), done by munmap on one core under the address-space lock while the other
        // cores wait: at the end of a merge or a verify in RAM it was the last 5% of the wall
        // time, serial. MADV_DONTNEED does the same work under the shared lock, so pieces of it
        // run on every core at once; the munmap that follows finds nothing left to zap.
        let Bytes::Mapped(m) = &self.mmap else {
            return;
        };
        if m.len() < RELEASE_PARALLEL || rayon::current_num_threads() < 2 {
            return;
        }
        use rayon::prelude::*;
        const PIECE: usize = 8 << 20;
        (0..m.len().div_ceil(PIECE)).into_par_iter().for_each(|k| {
            let at = k * PIECE;
            // SAFETY: the map is read-only and about to be unmapped; nothing reads it any more
            // (`self` is being dropped). DONTNEED on a file mapping only drops this process's
            // page-table entries: the page cache and the file are untouched. Advisory: an error
            // leaves the work to munmap.
            let _ = unsafe {
                m.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    at,
                    PIECE.min(m.len() - at),
                )
            };
        });
    }
}

impl SafeFile {
    /// Map and validate the file at `path`: header, offsets, dtypes and sizes.
    pub fn open(path: &Path) -> Result<SafeFile> {
        SafeFile::from_file(path, open_regular(path, SAFETENSORS)?)
    }

    /// Map a file already opened (by `open_regular`, or `Confinement::open`, which also checks
    /// where it lies); `path` names it in messages.
    pub fn from_file(path: &Path, file: File) -> Result<SafeFile> {
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if meta.len() == 0 {
            return Err(err(
                Class::EmptyFile,
                path,
                "file is empty, not a safetensors file",
            ));
        }
        // SAFETY: the map is read-only; a file truncated by another process while we run faults
        // on the next read past its new end, which the binaries' SIGBUS handler turns into one
        // `[io]` line with the staged output removed (`fault`).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        // Merges read each file front to back once: ask for aggressive readahead. Advice is a
        // hint; failing to give it changes nothing.
        let _ = mmap.advise(memmap2::Advice::Sequential);
        // Registered before the first read: parsing the header can fault too.
        let fault = crate::fault::register_map(mmap.as_ptr(), mmap.len(), path);
        let mut f = Self::from_mmap(path, Bytes::Mapped(mmap))?;
        f.file = Some(file);
        f.fault = Some(fault);
        Ok(f)
    }

    /// The open file behind a mapped `SafeFile` (none for `from_bytes`).
    pub fn handle(&self) -> Option<&File> {
        self.file.as_ref()
    }

    /// Parse a safetensors file held in memory; `label` names it in error messages.
    pub fn from_bytes(label: impl AsRef<Path>, bytes: Vec<u8>) -> Result<SafeFile> {
        Self::from_mmap(label.as_ref(), Bytes::Owned(bytes))
    }

    fn from_mmap(path: &Path, mmap: Bytes) -> Result<SafeFile> {
        let ((data_offset, tensors, metadata), by_name) =
            parse_header_indexed(&mmap).map_err(|e| e.at(path))?;
        Ok(SafeFile {
            path: path.to_path_buf(),
            file: None,
            fault: None,
            mmap,
            data_offset,
            tensors,
            metadata,
            by_name,
        })
    }

    /// Length of the whole file in bytes.
    pub fn len(&self) -> usize {
        self.mmap.len()
    }

    /// Whether the file holds no bytes (never true for a valid file).
    pub fn is_empty(&self) -> bool {
        self.mmap.is_empty()
    }

    /// The raw header bytes including the 8-byte length prefix.
    pub fn header_bytes(&self) -> &[u8] {
        &self.mmap[..self.data_offset]
    }

    /// The bytes of tensor `t` of this file.
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        &self.mmap[self.data_offset + t.start..self.data_offset + t.end]
    }

    /// The whole file's bytes, header included.
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    /// The tensor called `name`, if the file holds it.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        let name_at = |i: u32| self.tensors.get(i as usize).map_or("", |t| t.name.as_str());
        match self.by_name.binary_search_by(|&i| name_at(i).cmp(name)) {
            Ok(at) => Some(&self.tensors[self.by_name[at] as usize]),
            // `tensors` is public: should a caller have renamed or reordered it, search it.
            Err(_) => self.tensors.iter().find(|t| t.name == name),
        }
    }
}

/// Positions of `tensors` sorted by name; a name given twice is an error.
fn by_name(tensors: &[TensorInfo]) -> Result<Vec<u32>> {
    // A header is at most 100 MB and an entry takes tens of bytes: positions fit in 32 bits.
    let mut order: Vec<u32> = (0..tensors.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| tensors[a as usize].name.cmp(&tensors[b as usize].name));
    if let Some(w) = order
        .windows(2)
        .find(|w| tensors[w[0] as usize].name == tensors[w[1] as usize].name)
    {
        return Err(Error::bare(
            Class::DuplicateTensor,
            format!(
                "tensor {:?} appears twice in the header",
                tensors[w[0] as usize].name
            ),
        ));
    }
    Ok(order)
}

/// Where the data section starts, the tensors sorted by offset, and `__metadata__`.
pub type Header = (usize, Vec<TensorInfo>, Option<BTreeMap<String, String>>);

/// Read an opened file whole, but never more than `max` bytes: `Ok(Err(len))` names the length
/// (the file's, or what was read past the limit if it grew) of one that is larger. Reading stops
/// at the limit, so a sparse gigabyte costs nothing.
pub fn read_at_most(f: File, path: &Path, max: u64) -> Result<std::result::Result<Vec<u8>, u64>> {
    use std::io::Read;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > max {
        return Ok(Err(len));
    }
    let mut bytes = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max {
        return Ok(Err(bytes.len() as u64));
    }
    Ok(Ok(bytes))
}

/// What a weights file is, in messages.
pub const SAFETENSORS: &str = "a .safetensors file";

/// Open `path` for reading only if it is a regular file. The open does not block (a FIFO would
/// wait for a writer) and the check is made on the opened file, so what was checked is what is
/// read even if the path is replaced meanwhile.
pub fn open_regular(path: &Path, what: &str) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // Looked at before opening too, so that a socket or a device is named as such rather than
    // by whatever opening it does.
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    regular(path, &meta, what)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    regular(path, &meta, what)?;
    Ok(file)
}

fn regular(path: &Path, meta: &std::fs::Metadata, what: &str) -> Result<()> {
    if meta.is_dir() {
        return Err(err(
            Class::Io,
            path,
            format!("is a directory, expected {what}"),
        ));
    }
    if !meta.is_file() {
        return Err(err(
            Class::Io,
            path,
            format!("is not a regular file (a FIFO, socket or device), expected {what}"),
        ));
    }
    Ok(())
}

/// Parse and validate a safetensors header against the whole file's bytes.
pub fn parse_header(buf: &[u8]) -> Result<Header> {
    parse_header_indexed(buf).map(|(header, _)| header)
}

/// `parse_header`, with the tensors' positions sorted by name (`SafeFile`'s lookup table), which
/// the check for names given twice computes anyway.
fn parse_header_indexed(buf: &[u8]) -> Result<(Header, Vec<u32>)> {
    let bare = |c: Class, m: String| Error::bare(c, m);
    if buf.is_empty() {
        return Err(bare(
            Class::EmptyFile,
            "file is empty, not a safetensors file".into(),
        ));
    }
    if buf.len() < 8 {
        return Err(bare(
            Class::HeaderTooSmall,
            format!(
                "{} bytes: too short to hold a safetensors header length",
                buf.len()
            ),
        ));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().unwrap());
    if n > MAX_HEADER {
        return Err(bare(
            Class::HeaderTooLarge,
            format!(
                "header length {n} exceeds the {MAX_HEADER}-byte limit (not a safetensors file?)"
            ),
        ));
    }
    if n < 2 {
        return Err(bare(
            Class::HeaderTooSmall,
            format!("header length {n} is too small"),
        ));
    }
    let data_offset = 8 + n as usize;
    if data_offset > buf.len() {
        return Err(bare(
            Class::HeaderPastEnd,
            format!(
                "header length {n} runs past the end of the {}-byte file (truncated?)",
                buf.len()
            ),
        ));
    }
    let header = &buf[8..data_offset];
    let text = std::str::from_utf8(header)
        .map_err(|_| bare(Class::HeaderNotJson, "header is not UTF-8 text".into()))?;
    let text = text.trim_end_matches(' ');
    let entries: Entries = serde_json::from_str(text).map_err(|e| {
        if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
            bare(
                Class::HeaderNotObject,
                "header JSON is not an object".into(),
            )
        } else {
            bare(
                Class::HeaderNotJson,
                format!("header is not valid JSON ({e})"),
            )
        }
    })?;
    if let Some(e) = entries.first_error {
        return Err(e);
    }
    let data_len = buf.len() - data_offset;
    let metadata = entries.metadata;
    let mut tensors = entries.tensors;
    // Sorted by offset first, so that the positions sorted by name stay valid.
    tensors.sort_by_key(|t| (t.start, t.end));
    let order = by_name(&tensors)?;
    let mut expected = 0usize;
    for t in &tensors {
        if t.start < expected {
            return Err(bare(
                Class::BadOffsets,
                format!("tensor {:?} overlaps the tensor before it", t.name),
            ));
        }
        if t.start > expected {
            return Err(bare(
                Class::BadOffsets,
                format!(
                    "gap before tensor {:?} (data offsets {}..{} leave bytes {}..{} unused)",
                    t.name, t.start, t.end, expected, t.start
                ),
            ));
        }
        if t.end > data_len {
            return Err(bare(
                Class::BadOffsets,
                format!(
                    "tensor {:?} ends at byte {} but the data section holds only {} bytes (truncated?)",
                    t.name, t.end, data_len
                ),
            ));
        }
        expected = t.end;
    }
    if expected != data_len {
        return Err(bare(
            Class::BadOffsets,
            format!(
                "the data section holds {data_len} bytes but its tensors cover only {expected}"
            ),
        ));
    }
    Ok(((data_offset, tensors, metadata), order))
}

fn parse_tensor(name: &str, v: &Value) -> Result<TensorInfo> {
    let bad = |m: &str| Error::bare(Class::BadTensorInfo, format!("tensor {name:?}: {m}"));
    let obj = v.as_object().ok_or_else(|| bad("entry is not an object"))?;
    let dtype_s = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing or non-string \"dtype\""))?;
    let dtype = Dtype::parse(dtype_s)
        .map_err(|e| Error::bare(e.class, format!("tensor {name:?}: {}", e.message)))?;
    let shape_v = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing or non-array \"shape\""))?;
    let mut shape = Vec::with_capacity(shape_v.len());
    for d in shape_v {
        let d = d.as_u64().ok_or_else(|| bad("shape holds a non-integer"))?;
        shape.push(usize::try_from(d).map_err(|_| bad("dimension too large"))?);
    }
    let offs = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing or non-array \"data_offsets\""))?;
    if offs.len() != 2 {
        return Err(bad("\"data_offsets\" must hold two integers"));
    }
    let start = offs[0]
        .as_u64()
        .ok_or_else(|| bad("data offset is not an integer"))?;
    let end = offs[1]
        .as_u64()
        .ok_or_else(|| bad("data offset is not an integer"))?;
    if end < start {
        return Err(Error::bare(
            Class::BadOffsets,
            format!("tensor {name:?}: data offsets {start}..{end} run backwards"),
        ));
    }
    let numel = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| bad("shape overflows"))?;
    // A zero dimension makes the tensor empty whatever the others are, but code that multiplies
    // some of the dimensions (a matrix's columns, a conv kernel's fan-in) would still overflow:
    // the non-zero dimensions must have a product that fits too.
    shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .filter(|&p| usize::try_from(p).is_ok())
        .ok_or_else(|| bad("shape overflows (its non-zero dimensions multiply past 64 bits)"))?;
    let nbytes = dtype
        .byte_len(numel)
        .ok_or_else(|| bad("shape × dtype is not a whole number of bytes"))?;
    if end - start != nbytes {
        return Err(Error::bare(
            Class::BadOffsets,
            format!(
                "tensor {name:?}: data offsets {start}..{end} hold {} bytes but shape {:?} of {} needs {}",
                end - start,
                shape,
                dtype.name(),
                nbytes
            ),
        ));
    }
    let to_usize = |x: u64| usize::try_from(x).map_err(|_| bad("offset too large"));
    Ok(TensorInfo {
        name: name.to_string(),
        dtype,
        shape,
        start: to_usize(start)?,
        end: to_usize(end)?,
    })
}

/// A tensor to write: safetensors dtype, shape and little-endian bytes.
pub struct OwnedTensor {
    /// The safetensors dtype to write it as (`Dtype::to_safetensors`).
    pub dtype: safetensors::Dtype,
    /// Its dimensions.
    pub shape: Vec<usize>,
    /// Its little-endian element bytes.
    pub data: Vec<u8>,
}

/// Serialise tensors and file metadata to safetensors bytes (adapter files: canonical and
/// exported ones; checkpoints are never rewritten this way).
pub fn serialize<'a>(
    tensors: impl IntoIterator<Item = (&'a String, &'a OwnedTensor)>,
    meta: std::collections::HashMap<String, String>,
) -> crate::error::Result<Vec<u8>> {
    let bad = |e: safetensors::SafeTensorError| {
        crate::error::Error::bare(
            crate::error::Class::BadAdapter,
            format!("cannot serialise adapter: {e}"),
        )
    };
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .into_iter()
        .map(|(k, o)| {
            safetensors::tensor::TensorView::new(o.dtype, o.shape.clone(), &o.data)
                .map(|v| (k.clone(), v))
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(bad)?;
    safetensors::tensor::serialize(views, Some(meta)).map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn accepts_valid() {
        let b = file(
            r#"{"__metadata__":{"a":"b"},"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"BF16","shape":[1],"data_offsets":[8,10]}}"#,
            &[0; 10],
        );
        let (off, t, m) = parse_header(&b).unwrap();
        assert_eq!(off, b.len() - 10);
        assert_eq!(t.len(), 2);
        assert_eq!(m.unwrap()["a"], "b");
    }

    #[test]
    fn rejects_classes() {
        let cases: Vec<(Vec<u8>, Class)> = vec![
            (vec![], Class::EmptyFile),
            (vec![1, 2, 3], Class::HeaderTooSmall),
            (u64::MAX.to_le_bytes().to_vec(), Class::HeaderTooLarge),
            (file("{\"a\"", &[]), Class::HeaderNotJson),
            (file("[1]", &[]), Class::HeaderNotObject),
            (
                file(
                    r#"{"x":{"dtype":"Q9","shape":[1],"data_offsets":[0,1]}}"#,
                    &[0],
                ),
                Class::UnknownDtype,
            ),
            (
                file(
                    r#"{"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"y":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#,
                    &[0; 3],
                ),
                Class::BadOffsets,
            ),
            (
                file(
                    r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                    &[0; 4],
                ),
                Class::BadOffsets,
            ),
            (
                file(
                    r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                    &[0; 4],
                ),
                Class::BadOffsets,
            ),
            (
                file(
                    r#"{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"x":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                    &[0; 2],
                ),
                Class::DuplicateTensor,
            ),
        ];
        for (bytes, class) in cases {
            let e = parse_header(&bytes).unwrap_err();
            assert_eq!(e.class, class, "{e}");
        }
        let mut past = file("{}", &[]);
        past[0] = 200;
        assert_eq!(parse_header(&past).unwrap_err().class, Class::HeaderPastEnd);
    }
}
