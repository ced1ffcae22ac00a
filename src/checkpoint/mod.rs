//! Reading checkpoints: one `.safetensors` file, a folder with `model.safetensors`, or a folder
//! with `model.safetensors.index.json` and its shards. Everything is memory-mapped; nothing is
//! read whole.

pub mod dtype;
pub mod file;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};

pub use dtype::Dtype;
pub use file::{serialize, OwnedTensor, SafeFile, TensorInfo};

use crate::error::{err, Class, Error, Result};
use crate::paths::safe_relative;

/// The index of a sharded transformers checkpoint folder.
pub const INDEX_NAME: &str = "model.safetensors.index.json";
/// The single weights file of a transformers checkpoint folder.
pub const SINGLE_NAME: &str = "model.safetensors";
/// (index, single file) names a checkpoint folder may use: Hugging Face transformers, then the
/// component folders of a diffusers pipeline (`unet/`, `transformer/`, `text_encoder/`).
const FOLDER_NAMES: &[(&str, &str)] = &[
    (INDEX_NAME, SINGLE_NAME),
    (
        "diffusion_pytorch_model.safetensors.index.json",
        "diffusion_pytorch_model.safetensors",
    ),
];

/// How a checkpoint is laid out on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// A bare `.safetensors` file.
    File,
    /// A folder holding `model.safetensors`.
    Folder,
    /// A folder holding an index and its shards.
    Sharded,
    /// A diffusers pipeline folder (`model_index.json`): each named component folder holds a
    /// single file or an index and shards; tensors are known as `<component>.<name>`.
    Pipeline,
}

/// A base (or merged) checkpoint: its files mapped and validated, its tensors found by name.
pub struct Checkpoint {
    /// The path the user gave (file or folder).
    pub root: PathBuf,
    /// Which of the layouts it is.
    pub layout: Layout,
    /// Safetensors files, each with its path relative to the folder (its file name for `File`).
    pub files: Vec<(PathBuf, SafeFile)>,
    /// Other files of the folder to copy verbatim, relative to the folder (index.json included).
    pub others: Vec<PathBuf>,
    /// Files of the folder that hold another copy of model weights outside this checkpoint
    /// (`diffusion_pytorch_model.fp16.safetensors`, `pytorch_model.bin`, `original/*.pth`):
    /// left out of a merged output, where they would be stale (`is_weight_file`).
    pub left_out: Vec<PathBuf>,
    /// Every (file, tensor) position sorted by tensor name (`locate`).
    by_name: Vec<(u32, u32)>,
    /// Where a folder's files may lie, kept for opening its other files when they are copied.
    confined: Option<Confinement>,
}

impl Checkpoint {
    /// Open a checkpoint at `root`: a file, a folder, an index and its shards, or a pipeline.
    pub fn open(root: &Path) -> Result<Checkpoint> {
        let meta = std::fs::metadata(root).map_err(|e| Error::io(root, e))?;
        if !meta.is_dir() {
            let f = SafeFile::open(root)?;
            let name = PathBuf::from(root.file_name().unwrap_or_default());
            return Checkpoint::assemble(root, Layout::File, vec![(name, f)], vec![]);
        }
        let canon_root = root.canonicalize().map_err(|e| Error::io(root, e))?;
        let confined = Confinement::new(canon_root.clone());
        let at_root = weights_names(root);
        let pipeline = at_root.is_none() && root.join(PIPELINE_INDEX).is_file();
        let components: Vec<String> = if pipeline {
            pipeline_components(root)?
        } else {
            vec![String::new()]
        };
        if pipeline && components.is_empty() {
            return Err(err(
                Class::NotFound,
                root,
                format!(
                    "a diffusers pipeline folder ({PIPELINE_INDEX}) with no component holding \
                     safetensors weights"
                ),
            ));
        }
        // Every shard, the component it belongs to ("" outside a pipeline), and the index
        // (relative to the root) that names it, if any; each index read, with its component.
        let mut shard_names: Vec<(PathBuf, &str, usize)> = Vec::new();
        let mut indices: Vec<PathBuf> = Vec::new();
        let mut read_indices: Vec<(Index, &str)> = Vec::new();
        let mut layout = Layout::Folder;
        for comp in &components {
            let dir = root.join(comp);
            let Some((index_name, single_name)) = weights_names(&dir) else {
                return Err(no_weights(root));
            };
            let index_path = dir.join(index_name);
            if index_path.exists() {
                confined.check(&index_path)?;
                layout = Layout::Sharded;
                let index = read_index(&index_path, &confined)?;
                for rel in &index.shards {
                    shard_names.push((Path::new(comp).join(rel), comp, indices.len()));
                }
                indices.push(Path::new(comp).join(index_name));
                read_indices.push((index, comp));
            } else {
                let rel = Path::new(comp).join(single_name);
                shard_names.push((rel, comp, usize::MAX));
            }
        }
        if pipeline {
            layout = Layout::Pipeline;
        }
        let mut files = Vec::new();
        for (rel, comp, ix) in &shard_names {
            let p = root.join(rel);
            if !p.exists() {
                let from = indices.get(*ix).map_or(Path::new(""), |p| p.as_path());
                return Err(err(
                    Class::MissingShard,
                    &p,
                    format!(
                        "shard named in {} does not exist",
                        from.file_name().unwrap_or_default().to_string_lossy()
                    ),
                ));
            }
            confined.check(&p)?;
            let mut f = SafeFile::from_file(&p, confined.open(&p, file::SAFETENSORS)?)?;
            // A pipeline's components hold tensors of the same names (each text encoder has
            // `text_model.…`): inside one checkpoint they are known by `<component>.<name>`, the
            // way diffusers and kohya's containers name them. Headers stay as stored.
            if !comp.is_empty() {
                for t in &mut f.tensors {
                    t.name = qualify(comp, &t.name);
                }
            }
            files.push((rel.clone(), f));
        }
        let shard_set: std::collections::HashSet<&PathBuf> =
            shard_names.iter().map(|(p, _, _)| p).collect();
        let mut others = Vec::new();
        list_others(root, &confined, Path::new(""), &shard_set, &mut others)?;
        others.sort();
        // Stale copies are those of a model this checkpoint holds: anywhere in a plain folder,
        // inside the merged components of a pipeline (another component's only weights, say a
        // safety checker's pytorch_model.bin, are copied as they are).
        let (left_out, others): (Vec<PathBuf>, Vec<PathBuf>) = others.into_iter().partition(|p| {
            is_weight_file(p)
                && !indices.contains(p)
                && (!pipeline
                    || p.components()
                        .next()
                        .is_some_and(|c| components.iter().any(|n| c.as_os_str() == n.as_str())))
        });
        let mut ck = Checkpoint::assemble(root, layout, files, others)?;
        ck.left_out = left_out;
        ck.confined = Some(confined);
        // Every tensor an index names must be in the shard it names.
        for ((index, comp), index_rel) in read_indices.iter().zip(&indices) {
            let index_path = root.join(index_rel);
            let rels: Vec<PathBuf> = index
                .shards
                .iter()
                .map(|s| Path::new(comp).join(s))
                .collect();
            for (name, si) in index.entries() {
                let n = qualify(comp, name);
                let rel = &rels[si];
                match ck.locate(&n) {
                    Some((fi, _)) if &ck.files[fi].0 == rel => {}
                    Some((fi, _)) => {
                        return Err(err(
                            Class::BadIndex,
                            &index_path,
                            format!(
                                "index puts {n:?} in {} but it is stored in {}",
                                rel.display(),
                                ck.files[fi].0.display()
                            ),
                        ))
                    }
                    None => {
                        return Err(err(
                            Class::BadIndex,
                            &index_path,
                            format!(
                                "index names tensor {n:?} which {} does not hold",
                                rel.display()
                            ),
                        ))
                    }
                }
            }
        }
        Ok(ck)
    }

    fn assemble(
        root: &Path,
        layout: Layout,
        files: Vec<(PathBuf, SafeFile)>,
        others: Vec<PathBuf>,
    ) -> Result<Checkpoint> {
        // Every (file, tensor) sorted by name, file order breaking ties: eight bytes a tensor
        // where a map would hold another copy of every name.
        let name = |&(fi, ti): &(u32, u32)| files[fi as usize].1.tensors[ti as usize].name.as_str();
        let mut by_name: Vec<(u32, u32)> = Vec::new();
        for (fi, (_, f)) in files.iter().enumerate() {
            by_name.extend((0..f.tensors.len() as u32).map(|ti| (fi as u32, ti)));
        }
        by_name.sort_unstable_by(|a, b| name(a).cmp(name(b)).then(a.cmp(b)));
        if let Some(w) = by_name.windows(2).find(|w| name(&w[0]) == name(&w[1])) {
            let (prev, later) = (&files[w[0].0 as usize].1, &files[w[1].0 as usize].1);
            return Err(err(
                Class::DuplicateTensor,
                &later.path,
                format!(
                    "tensor {:?} is also stored in {}",
                    name(&w[0]),
                    prev.path.display()
                ),
            ));
        }
        Ok(Checkpoint {
            root: root.to_path_buf(),
            layout,
            files,
            others,
            left_out: Vec::new(),
            by_name,
            confined: None,
        })
    }

    /// A single-file checkpoint already in memory (`SafeFile::from_bytes`), for callers that
    /// hold their bytes themselves (the fuzz targets); it names no folder and copies nothing.
    pub fn from_file(f: SafeFile) -> Result<Checkpoint> {
        let root = f.path.clone();
        let name = PathBuf::from(root.file_name().unwrap_or_default());
        Checkpoint::assemble(&root, Layout::File, vec![(name, f)], vec![])
    }

    /// Open one of the folder's other files (`others`) to copy it: the file checked when the
    /// folder was opened, or an error if the path now leads elsewhere (see `Confinement::open`).
    pub fn open_other(&self, rel: &Path) -> Result<File> {
        let p = self.root.join(rel);
        match &self.confined {
            Some(c) => c.open(&p, "a regular file"),
            None => file::open_regular(&p, "a regular file"),
        }
    }

    /// Positions (file, tensor) of the tensor called `name`.
    fn locate(&self, name: &str) -> Option<(usize, usize)> {
        let name_at = |&(fi, ti): &(u32, u32)| {
            self.files
                .get(fi as usize)
                .and_then(|(_, f)| f.tensors.get(ti as usize))
                .map_or("", |t| t.name.as_str())
        };
        let at = self
            .by_name
            .binary_search_by(|p| name_at(p).cmp(name))
            .ok()?;
        let (fi, ti) = self.by_name[at];
        Some((fi as usize, ti as usize))
    }

    /// The file holding the tensor called `name`, and the tensor.
    pub fn get(&self, name: &str) -> Option<(&SafeFile, &TensorInfo)> {
        let (fi, ti) = self.locate(name)?;
        let f = &self.files[fi].1;
        Some((f, &f.tensors[ti]))
    }

    /// Every tensor name, file by file.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.files
            .iter()
            .flat_map(|(_, f)| f.tensors.iter().map(|t| t.name.as_str()))
    }

    /// Whether the checkpoint is a folder (outputs are then folders too).
    pub fn is_folder(&self) -> bool {
        self.layout != Layout::File
    }

    /// Every file a merge reads: the root (a file, or the folder) and, for a folder, each
    /// safetensors file and each file copied verbatim, by the path it is opened through (which
    /// may be a symlink to somewhere else, as in a Hugging Face cache snapshot).
    pub fn input_paths(&self) -> Vec<PathBuf> {
        let mut out = vec![self.root.clone()];
        if self.is_folder() {
            let rels = self.files.iter().map(|(r, _)| r).chain(&self.others);
            out.extend(rels.map(|r| self.root.join(r)));
        }
        out
    }

    /// Total bytes of all safetensors files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|(_, f)| f.len() as u64).sum()
    }
}

/// The file that makes a folder a diffusers pipeline.
pub const PIPELINE_INDEX: &str = "model_index.json";

/// The (index, single file) names of the weights a folder holds, if it holds any.
fn weights_names(dir: &Path) -> Option<(&'static str, &'static str)> {
    FOLDER_NAMES
        .iter()
        .copied()
        .find(|(i, s)| dir.join(i).exists() || dir.join(s).exists())
}

/// `<component>.<name>` inside a pipeline, the name itself elsewhere.
fn qualify(component: &str, name: &str) -> String {
    if component.is_empty() {
        name.to_string()
    } else {
        format!("{component}.{name}")
    }
}

fn no_weights(root: &Path) -> Error {
    let components: Vec<&str> = ["unet", "transformer", "text_encoder", "text_encoder_2"]
        .into_iter()
        .filter(|c| weights_names(&root.join(c)).is_some())
        .collect();
    err(
        Class::NotFound,
        root,
        if components.is_empty() {
            format!("folder holds neither {SINGLE_NAME} nor {INDEX_NAME}")
        } else {
            format!(
                "a diffusers pipeline folder without {PIPELINE_INDEX}: pass one component \
                 folder ({})",
                components.join(", ")
            )
        },
    )
}

/// The components of a pipeline folder that hold safetensors weights, in name order. Only
/// direct subfolders count (diffusers keeps each component in one); their names must be plain
/// names since they become tensor-name prefixes.
fn pipeline_components(root: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).map_err(|e| Error::io(root, e))? {
        let e = e.map_err(|e| Error::io(root, e))?;
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let dir = root.join(&name);
        // A dotted name (`.cache`, `unet.bak`) is no diffusers component and would make
        // ambiguous tensor-name prefixes.
        if !name.contains('.') && dir.is_dir() && weights_names(&dir).is_some() {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Whether a file (not part of the checkpoint) holds model weights in some format: other
/// safetensors files and their indexes (variants such as `.fp16.safetensors`), PyTorch pickles
/// of weights (`pytorch_model*.bin`, `diffusion_pytorch_model*.bin`, `*.pt`, `*.pth`, `*.ckpt`),
/// TensorFlow, Flax, ONNX and GGUF weights. Copied beside merged weights they would be stale
/// copies of the unmerged model that a loader may pick (`variant="fp16"`, `from_tf`).
/// `training_args.bin` and tokenizer or config files are not weights.
pub fn is_weight_file(rel: &Path) -> bool {
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let ext = |e: &str| name.ends_with(e);
    ext(".safetensors")
        || ext(".safetensors.index.json")
        || ((name.starts_with("pytorch_model") || name.starts_with("diffusion_pytorch_model"))
            && (ext(".bin") || ext(".bin.index.json")))
        || ext(".pt")
        || ext(".pth")
        || ext(".ckpt")
        || ext(".h5")
        || ext(".msgpack")
        || ext(".onnx")
        || ext(".onnx_data")
        || ext(".gguf")
}

/// An index larger than this is not an index (a real one for thousands of tensors is well under 1 MB).
pub const MAX_INDEX: u64 = 100_000_000;

/// Read and parse an index file.
fn read_index(path: &Path, confined: &Confinement) -> Result<Index> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(err(Class::BadIndex, path, "is not a regular file"));
    }
    // Read through the handle checked, no further than the limit even if the file grows.
    let f = confined.open(path, "an index file")?;
    let text = file::read_at_most(f, path, MAX_INDEX)?.map_err(|len| {
        err(
            Class::BadIndex,
            path,
            format!("{len} bytes exceeds the {MAX_INDEX}-byte limit for an index"),
        )
    })?;
    parse_index(&text).map_err(|e| e.at(path))
}

/// A parsed `model.safetensors.index.json`: its shards and the shard of every tensor it names.
/// The names share one buffer: an index may list millions, and a `String` each would take
/// several times the file.
pub struct Index {
    /// The shards in order of first appearance, each once, as safe relative paths.
    pub shards: Vec<PathBuf>,
    names: String,
    /// Per entry in file order: where its name ends in `names`, and its shard in `shards`.
    entries: Vec<(u32, u32)>,
}

impl Index {
    /// Every tensor the index names (in file order) with its shard's position in `shards`.
    pub fn entries(&self) -> impl Iterator<Item = (&str, usize)> {
        let mut start = 0usize;
        self.entries.iter().map(move |&(end, shard)| {
            let name = &self.names[start..end as usize];
            start = end as usize;
            (name, shard as usize)
        })
    }
}

/// Parse the bytes of a `model.safetensors.index.json`. Errors carry no path.
pub fn parse_index(bytes: &[u8]) -> Result<Index> {
    fn bare(class: Class, message: impl Into<String>) -> Error {
        Error::bare(class, message)
    }
    let top: IndexTop = serde_json::from_slice(bytes)
        .map_err(|e| bare(Class::BadIndex, format!("not valid JSON ({e})")))?;
    let ShardEntries {
        names,
        mut entries,
        shard_names,
        too_many_shards,
    } = top
        .weight_map
        .ok_or_else(|| bare(Class::BadIndex, "no \"weight_map\" object"))?;
    if too_many_shards {
        return Err(bare(
            Class::BadIndex,
            format!("weight_map names more than {MAX_SHARDS} shard files"),
        ));
    }
    fn name_of<'a>(names: &'a str, entries: &[(u32, u32)], i: usize) -> &'a str {
        let start = if i == 0 { 0 } else { entries[i - 1].0 as usize };
        &names[start..entries[i].0 as usize]
    }
    // Compared as bytes (UTF-8 orders as its code points), without a boundary check each time.
    let name = |i: usize| {
        let start = if i == 0 { 0 } else { entries[i - 1].0 as usize };
        &names.as_bytes()[start..entries[i].0 as usize]
    };
    // Duplicates first, by sorting positions (four bytes an entry, no second copy of a name).
    {
        let mut order: Vec<u32> = (0..entries.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| name(a as usize).cmp(name(b as usize)));
        if let Some(w) = order
            .windows(2)
            .find(|w| name(w[0] as usize) == name(w[1] as usize))
        {
            return Err(bare(
                Class::BadIndex,
                format!(
                    "weight_map lists {:?} twice",
                    name_of(&names, &entries, w[0] as usize)
                ),
            ));
        }
    }
    let mut shards: Vec<PathBuf> = Vec::new();
    let mut pos: HashMap<PathBuf, usize> = HashMap::new();
    // Where each distinct shard string lands in `shards`, worked out once per string.
    let mut slot: Vec<Option<usize>> = vec![None; shard_names.len()];
    for i in 0..entries.len() {
        let si = entries[i].1;
        if si == NOT_A_STRING {
            return Err(bare(
                Class::BadIndex,
                format!(
                    "weight_map entry for {:?} is not a string",
                    name_of(&names, &entries, i)
                ),
            ));
        }
        let at = match slot[si as usize] {
            Some(at) => at,
            None => {
                let shard = shard_names[si as usize].as_str();
                let rel = safe_relative(shard).ok_or_else(|| {
                    let escapes = Path::new(shard).is_absolute()
                        || Path::new(shard)
                            .components()
                            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
                    if escapes {
                        bare(
                            Class::PathEscape,
                            format!("shard {shard:?} points outside the checkpoint folder"),
                        )
                    } else {
                        // "", "." or "./": inside the folder, but no file.
                        bare(
                            Class::BadIndex,
                            format!("shard {shard:?} names no file (the folder itself at most)"),
                        )
                    }
                })?;
                // `a.safetensors` and `./a.safetensors` are one shard.
                let at = *pos.entry(rel.clone()).or_insert_with(|| {
                    shards.push(rel);
                    shards.len() - 1
                });
                slot[si as usize] = Some(at);
                at
            }
        };
        entries[i].1 = at as u32;
    }
    if shards.is_empty() {
        return Err(bare(Class::BadIndex, "weight_map is empty"));
    }
    Ok(Index {
        shards,
        names,
        entries,
    })
}

/// What an index is read into: only `weight_map`'s entries (in file order, each shard if it is a
/// string), None when it is absent or not an object. Nothing else of the file is kept (no JSON
/// tree), so memory follows the tensors listed, not what a hostile file pads itself with.
struct IndexTop {
    weight_map: Option<ShardEntries>,
}

/// `weight_map`'s entries in file order: where each name ends in `names`, and the index of its
/// shard string in `shard_names` (`NOT_A_STRING` when the value is not a string). A checkpoint
/// has a few shards and up to millions of entries: each distinct shard string is held once, and
/// the names share one buffer.
struct ShardEntries {
    names: String,
    entries: Vec<(u32, u32)>,
    shard_names: Vec<String>,
    /// More than `MAX_SHARDS` distinct shard strings: the rest was read without being kept.
    too_many_shards: bool,
}

/// The most shard files one index may name. Real checkpoints have one to a few thousand; each
/// distinct name costs a path and a lookup entry, so without a cap an index of `"a":"a"` pairs
/// would hold several copies of itself.
pub const MAX_SHARDS: usize = 65_536;

/// The shard of a `weight_map` entry whose value is not a string.
const NOT_A_STRING: u32 = u32::MAX;

/// Skip the rest of a JSON array or object as it is read; used for values of a type other than
/// the one a visitor keeps.
macro_rules! skip_others {
    ($out:ty, $none:expr) => {
        fn visit_bool<E>(self, _: bool) -> std::result::Result<$out, E> {
            Ok($none)
        }
        fn visit_i64<E>(self, _: i64) -> std::result::Result<$out, E> {
            Ok($none)
        }
        fn visit_u64<E>(self, _: u64) -> std::result::Result<$out, E> {
            Ok($none)
        }
        fn visit_f64<E>(self, _: f64) -> std::result::Result<$out, E> {
            Ok($none)
        }
        fn visit_unit<E>(self) -> std::result::Result<$out, E> {
            Ok($none)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut a: A,
        ) -> std::result::Result<$out, A::Error> {
            while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok($none)
        }
    };
}

/// A JSON value kept only if it is a string.
struct StrOrSkip(Option<String>);

impl<'de> serde::Deserialize<'de> for StrOrSkip {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StrOrSkip;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<StrOrSkip, E> {
                Ok(StrOrSkip(Some(v.to_string())))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<StrOrSkip, A::Error> {
                while a
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(StrOrSkip(None))
            }
            skip_others!(StrOrSkip, StrOrSkip(None));
        }
        d.deserialize_any(V)
    }
}

/// A JSON object's entries with `StrOrSkip` values, or None for any other value.
struct ShardMap(Option<ShardEntries>);

impl<'de> serde::Deserialize<'de> for ShardMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ShardMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<ShardMap, A::Error> {
                let mut names = String::new();
                let mut entries = Vec::new();
                let mut shard_names: Vec<String> = Vec::new();
                let mut index: HashMap<String, u32> = HashMap::new();
                let mut too_many_shards = false;
                while let Some((k, StrOrSkip(s))) =
                    a.next_entry::<std::borrow::Cow<'de, str>, StrOrSkip>()?
                {
                    if too_many_shards {
                        continue;
                    }
                    if s.as_ref().is_some_and(|s| !index.contains_key(s))
                        && shard_names.len() >= MAX_SHARDS
                    {
                        too_many_shards = true;
                        continue;
                    }
                    let si = s.map_or(NOT_A_STRING, |s| match index.get(&s) {
                        Some(&i) => i,
                        None => {
                            let i = shard_names.len() as u32;
                            index.insert(s.clone(), i);
                            shard_names.push(s);
                            i
                        }
                    });
                    names.push_str(&k);
                    // Positions are 32-bit: an index is at most 100 MB (`MAX_INDEX`), and
                    // distinct shard strings can be no more numerous than entries.
                    let end = u32::try_from(names.len())
                        .map_err(|_| serde::de::Error::custom("weight_map names exceed 4 GiB"))?;
                    if shard_names.len() >= NOT_A_STRING as usize {
                        return Err(serde::de::Error::custom("too many shard names"));
                    }
                    entries.push((end, si));
                }
                Ok(ShardMap(Some(ShardEntries {
                    names,
                    entries,
                    shard_names,
                    too_many_shards,
                })))
            }
            fn visit_str<E>(self, _: &str) -> std::result::Result<ShardMap, E> {
                Ok(ShardMap(None))
            }
            skip_others!(ShardMap, ShardMap(None));
        }
        d.deserialize_any(V)
    }
}

impl<'de> serde::Deserialize<'de> for IndexTop {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = IndexTop;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<IndexTop, A::Error> {
                let mut top = IndexTop { weight_map: None };
                while let Some(k) = a.next_key::<String>()? {
                    if k == "weight_map" {
                        // A repeated key: the last one counts, as a JSON object read whole.
                        top.weight_map = a.next_value::<ShardMap>()?.0;
                    } else {
                        a.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(top)
            }
            fn visit_str<E>(self, _: &str) -> std::result::Result<IndexTop, E> {
                Ok(IndexTop { weight_map: None })
            }
            skip_others!(IndexTop, IndexTop { weight_map: None });
        }
        d.deserialize_any(V)
    }
}

/// Where the files of a checkpoint folder may really live: inside the folder, and for a folder
/// in a Hugging Face cache snapshot, also in that repository's `blobs/` (every file there is a
/// relative symlink into it; `crate::paths::blobs_of`).
/// PEFT adapter folders are confined the same way (`Confinement::adapter`).
pub(crate) struct Confinement {
    root: PathBuf,
    blobs: Option<PathBuf>,
    /// What the folder is, for messages: "checkpoint folder", "adapter folder".
    what: &'static str,
}

impl Confinement {
    fn new(canon_root: PathBuf) -> Confinement {
        let blobs = crate::paths::blobs_of(&canon_root);
        Confinement {
            root: canon_root,
            blobs,
            what: "checkpoint folder",
        }
    }

    /// The confinement of a PEFT adapter folder (the folder as given; it is canonicalised here).
    pub(crate) fn adapter(dir: &Path) -> Result<Confinement> {
        let canon = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
        Ok(Confinement {
            what: "adapter folder",
            ..Confinement::new(canon)
        })
    }

    /// Refuse a path whose real location (after following symlinks) leaves the folder (or,
    /// in a cache snapshot, is not one of its repository's blobs).
    pub(crate) fn check(&self, p: &Path) -> Result<PathBuf> {
        let real = p.canonicalize().map_err(|e| Error::io(p, e))?;
        self.allow(p, &real)?;
        Ok(real)
    }

    /// Whether `real`, where `p` resolves to, lies inside the confinement.
    fn allow(&self, p: &Path, real: &Path) -> Result<()> {
        let in_blobs = || {
            self.blobs
                .as_deref()
                .is_some_and(|b| crate::paths::is_blob(b, real))
        };
        if !real.starts_with(&self.root) && !in_blobs() {
            return Err(err(
                Class::PathEscape,
                p,
                format!(
                    "resolves to {} outside the {}; symlinks are followed only inside it{}",
                    real.display(),
                    self.what,
                    if self.blobs.is_some() {
                        " and into its Hugging Face cache repository's blobs/"
                    } else {
                        ""
                    }
                ),
            ));
        }
        Ok(())
    }

    /// Open a file of the folder for reading: a regular file (`what` names the expected kind)
    /// lying inside the confinement. What is checked is where the opened file lies, as the
    /// kernel resolved it at the open (`/proc/self/fd`): resolving the path a second time would
    /// leave a moment in which another process swaps it for a symlink to elsewhere.
    pub(crate) fn open(&self, p: &Path, what: &str) -> Result<File> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let file = file::open_regular(p, what)?;
        if let Ok(real) = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())) {
            if real.is_absolute() {
                self.allow(p, &real)?;
                return Ok(file);
            }
        }
        // Without /proc: resolve the path again and require that it still leads to the file
        // opened, without following a link planted at the resolved path meanwhile.
        let real = self.check(p)?;
        let opened = file.metadata().map_err(|e| Error::io(p, e))?;
        let checked = std::fs::symlink_metadata(&real).map_err(|e| Error::io(p, e))?;
        if (opened.dev(), opened.ino()) != (checked.dev(), checked.ino()) {
            return Err(err(
                Class::Io,
                p,
                "was replaced by another process while being opened",
            ));
        }
        Ok(file)
    }
}

/// Folders nested deeper than this (symlinks included) are refused rather than walked.
const MAX_DEPTH: usize = 64;

/// Collect the folder's other files. `ancestors` holds the real paths of the folders being
/// walked, so a symlink leading back to one of them (a cycle) is refused instead of followed
/// forever; `seen` every real folder walked, so none is walked twice.
fn list_others(
    root: &Path,
    confined: &Confinement,
    rel: &Path,
    shards: &std::collections::HashSet<&PathBuf>,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    let mut ancestors = vec![confined.root.clone()];
    let mut seen = std::collections::HashSet::from([confined.root.clone()]);
    walk_others(root, confined, rel, shards, out, &mut ancestors, &mut seen)
}

fn walk_others(
    root: &Path,
    confined: &Confinement,
    rel: &Path,
    shards: &std::collections::HashSet<&PathBuf>,
    out: &mut Vec<PathBuf>,
    ancestors: &mut Vec<PathBuf>,
    seen: &mut std::collections::HashSet<PathBuf>,
) -> Result<()> {
    let dir = root.join(rel);
    let rd = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(&dir, e))?;
        let r = rel.join(entry.file_name());
        if shards.contains(&r) {
            continue;
        }
        let p = root.join(&r);
        let real = confined.check(&p)?;
        let meta = std::fs::metadata(&real).map_err(|e| Error::io(&p, e))?;
        if meta.is_dir() {
            if ancestors.contains(&real) {
                return Err(err(
                    Class::SymlinkLoop,
                    &p,
                    format!(
                        "leads back to {}, which contains it (a symlink cycle)",
                        real.display()
                    ),
                ));
            }
            if ancestors.len() > MAX_DEPTH {
                return Err(err(
                    Class::SymlinkLoop,
                    &p,
                    format!("nested more than {MAX_DEPTH} folders deep"),
                ));
            }
            // Two symlinks to one folder would copy it twice, and links to links (a DAG of
            // depth d) 2^d times: every real folder is walked once, a second way in is refused.
            if !seen.insert(real.clone()) {
                return Err(err(
                    Class::SymlinkLoop,
                    &p,
                    format!(
                        "leads to {}, which this folder already reaches another way (folders are \
                         copied once; symlinks to one folder are refused)",
                        real.display()
                    ),
                ));
            }
            ancestors.push(real);
            walk_others(root, confined, &r, shards, out, ancestors, seen)?;
            ancestors.pop();
        } else if meta.is_file() {
            out.push(r);
        } else {
            return Err(err(
                Class::Io,
                &p,
                "is not a regular file or folder (a FIFO, socket or device); it cannot be copied",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_relative_rejects_escapes() {
        assert!(safe_relative("../x.safetensors").is_none());
        assert!(safe_relative("/etc/passwd").is_none());
        assert!(safe_relative("a/../../b").is_none());
        assert!(safe_relative("").is_none());
        assert_eq!(
            safe_relative("./model-1.safetensors").unwrap(),
            PathBuf::from("model-1.safetensors")
        );
    }
}
