//! What one tensor becomes. Its plan (`Action`: a replacement to start from, then groups of
//! stages, one group per adapter) is built into kernel chains and applied in f32, and the result
//! is rounded to the tensor's dtype once, however many adapters touched it.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rayon::prelude::*;

use std::collections::HashMap;
use std::sync::Arc;

use crate::adapter::{Replacement, Strength, StrengthMode, Target};
use crate::checkpoint::{dtype, SafeFile, TensorInfo};
use crate::error::{err, Class, Error, Result};
use crate::math::kernel::{Chain, Scratch};

use super::{Action, Backend, Plan, Stage};

/// Row slices of an output-side stage and their chains.
type ColumnSlices = [((usize, usize), Arc<Chain>)];

/// A stage's kernel chains.
pub(super) enum BuiltStage {
    /// Whole rows (input side), and the chain's transpose (`Chain::transposed`, made once the
    /// chains are final): the CPU kernel reads each block's operand from it instead of
    /// transposing every block on every call, which was a quarter of the kernel's time.
    Rows(Arc<Chain>, Option<Chain>),
    /// Row slices and their chains (output side), and the number of columns the tensor is read
    /// as.
    Columns(Vec<((usize, usize), Arc<Chain>)>, Option<usize>),
}

/// One adapter's stages on a tensor, built.
pub(super) struct BuiltGroup {
    stages: Vec<BuiltStage>,
    /// A linear strength applied to the group as a whole (`x + t·(F(x) − x)`, F all its
    /// stages); 1 when it is inside the chains (a group of one stage) or there is none.
    blend: f32,
}

/// An action's kernel chains, built just before its tensor is processed so that only a few
/// targets' blocks exist at any time.
pub(super) struct Built<'a> {
    /// The values start from this replacement instead of the base tensor.
    start: Option<&'a Replacement>,
    groups: Vec<BuiltGroup>,
}

impl Built<'_> {
    /// The groups, in the order they apply.
    pub(super) fn groups(&self) -> &[BuiltGroup] {
        &self.groups
    }

    /// Every stage transforms whole rows, from the base's values: the tensor can stream in row
    /// chunks.
    pub(super) fn rows_only(&self) -> bool {
        self.start.is_none()
            && self
                .groups
                .iter()
                .all(|g| g.stages.iter().all(|s| matches!(s, BuiltStage::Rows(..))))
    }
}

impl Plan<'_> {
    /// Compute an action's blocks and build its chains (the inverse ones for un-merged groups).
    pub(super) fn build<'b>(&self, a: &Action<'b>) -> Result<Built<'b>> {
        let at = |e: Error| e.at(&self.base.root);
        // An adapter named several times builds its chains once: what a tensor holds follows
        // the distinct adapters, not the length of the command line.
        let mut built: HashMap<(*const Target, bool, u64, StrengthMode), Arc<Chain>> =
            HashMap::new();
        let mut groups = Vec::with_capacity(a.groups.len());
        for g in &a.groups {
            // A linear blend of several stages blends their product, not each stage: the chains
            // are built at full strength and the group blended once.
            let several = g.stages.len() > 1;
            let linear = g.strength.mode == StrengthMode::Linear && g.strength.t != 1.0;
            let (strength, blend) = if several && linear && !g.inverse {
                (Strength::FULL, g.strength.t as f32)
            } else {
                (g.strength, 1.0)
            };
            let mut chain = |t: &Target| -> Result<Arc<Chain>> {
                let key = (
                    t as *const Target,
                    g.inverse,
                    strength.t.to_bits(),
                    strength.mode,
                );
                if let Some(c) = built.get(&key) {
                    return Ok(c.clone());
                }
                let c = Arc::new(t.chain_at(g.inverse, strength).map_err(at)?);
                built.insert(key, c.clone());
                Ok(c)
            };
            let stages = g
                .stages
                .iter()
                .map(|s| {
                    Ok(match s {
                        Stage::Rows(t) => BuiltStage::Rows(chain(t)?, None),
                        Stage::Columns(slices) => BuiltStage::Columns(
                            slices
                                .iter()
                                .map(|(r, t)| Ok((*r, chain(t)?)))
                                .collect::<Result<_>>()?,
                            slices.iter().find_map(|(_, t)| t.view.map(|v| v.1)),
                        ),
                    })
                })
                .collect::<Result<_>>()?;
            groups.push(BuiltGroup { stages, blend });
        }
        collapse_junctions(&mut groups);
        for s in groups.iter_mut().flat_map(|g| g.stages.iter_mut()) {
            if let BuiltStage::Rows(c, mt) = s {
                *mt = Some(c.transposed());
            }
        }
        Ok(Built {
            start: a.start,
            groups,
        })
    }
}

/// Where one input-side chain ends and the next begins with unpermuted block-diagonal factors
/// of one geometry and no scale between them (an un-merge followed by a merge of PEFT BOFT
/// adapters, whose first factor is not permuted), the two factors are one: each block the
/// product of the two, in f64. A switch then applies one factor fewer to every row. Groups
/// blended as a whole (a linear strength of several stages) are left as they are.
fn collapse_junctions(groups: &mut [BuiltGroup]) {
    let mut prev: Option<&mut Arc<Chain>> = None;
    for g in groups.iter_mut() {
        if g.blend != 1.0 {
            // Nothing crosses into or out of a group blended as a whole.
            prev = None;
            continue;
        }
        for s in g.stages.iter_mut() {
            match s {
                BuiltStage::Rows(c, _) => {
                    if let Some(p) = prev.take() {
                        collapse(p, c);
                    }
                    prev = Some(c);
                }
                BuiltStage::Columns(..) => prev = None,
            }
        }
    }
}

/// Fold `x`'s last factor into `y`'s first where nothing stands between them (see
/// `collapse_junctions`); `x` keeps at least one factor.
fn collapse(x: &mut Arc<Chain>, y: &mut Arc<Chain>) {
    let between_free = (x.scale.is_none() || x.scale_first)
        && (y.scale.is_none() || !y.scale_first)
        && x.blend == 1.0
        && y.blend == 1.0
        && x.factors.len() >= 2;
    let (Some(a), Some(b)) = (x.factors.last(), y.factors.first()) else {
        return;
    };
    let fits = a.perm.is_none()
        && b.perm.is_none()
        && (a.h, a.d, a.repeat) == (b.h, b.d, b.repeat)
        && a.blocks.len() == b.blocks.len();
    if !between_free || !fits {
        return;
    }
    let h = a.h;
    let first = Arc::make_mut(x)
        .factors
        .pop()
        .expect("two factors at least");
    crate::math::blocks::fold_after(h, &first.blocks, &mut Arc::make_mut(y).factors[0].blocks);
}

/// Elements per work chunk: large enough for efficient block GEMMs, small enough to stay in cache.
const CHUNK_ELEMS: usize = 1 << 17;

/// A targeted tensor's stored bytes: `bytes` (mapped), and, where the file is at hand, the file,
/// the offset of the tensor's first byte in it and its path for messages (`file`), from which
/// row chunks are read with `pread` into a per-thread buffer instead: faulting page-cached
/// pages into the map cost about three times copying them out (a sixth of a merge's CPU on
/// tmpfs, where `cp` spends none of it).
#[derive(Clone, Copy)]
pub(super) struct Source<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) file: Option<(&'a File, u64, &'a Path)>,
}

impl<'a> Source<'a> {
    /// Tensor `t` of file `f`: mapped, and read from `f`'s handle where it has one.
    pub(super) fn of(f: &'a SafeFile, t: &TensorInfo) -> Source<'a> {
        Source {
            bytes: f.data(t),
            file: f
                .handle()
                .map(|h| (h, (f.data_offset + t.start) as u64, f.path.as_path())),
        }
    }

    /// Bytes `range` of the tensor: read from the file into `buf` where it is at hand, else
    /// the map's.
    fn read<'b>(&'b self, range: Range<usize>, buf: &'b mut Vec<u8>) -> Result<&'b [u8]> {
        if self.file.is_none() {
            return Ok(&self.bytes[range]);
        }
        buf.resize(range.len(), 0);
        self.read_into(range.start, buf)?;
        Ok(buf)
    }

    /// The tensor's bytes from offset `at` into all of `dst`: read from the file where it is at
    /// hand, else copied from the map.
    fn read_into(&self, at: usize, dst: &mut [u8]) -> Result<()> {
        let Some((f, start, path)) = self.file else {
            dst.copy_from_slice(&self.bytes[at..at + dst.len()]);
            return Ok(());
        };
        f.read_exact_at(dst, start + at as u64)
            .map_err(|e| match e.kind() {
                // What a mapped read of the same bytes reports (`fault`).
                std::io::ErrorKind::UnexpectedEof => err(
                    Class::Io,
                    path,
                    "shrank while being read (truncated by another process?); nothing was written",
                ),
                _ => Error::io(path, e),
            })
    }
}

/// Where finished pieces of a tensor go as soon as they are encoded: `(offset in the tensor,
/// bytes)`.
pub(super) type Sink<'a> = &'a (dyn Fn(usize, &[u8]) -> Result<()> + Sync);

/// The output bytes of one targeted tensor (`src` its base bytes, `path` its file for
/// messages). A tensor that streams in row chunks hands each chunk to `sink` while the chunk is
/// still in cache (writing it then costs the kernel's copy a fraction of copying a whole tensor
/// from memory later), and `true` is returned; any other is made whole in `out`, resized to it
/// (`false`).
#[allow(clippy::too_many_arguments)]
pub(super) fn tensor_bytes(
    path: &Path,
    t: &TensorInfo,
    source: Source,
    b: &Built,
    backend: &dyn Backend,
    stop: &(dyn Fn() -> bool + Sync),
    out: &mut Vec<u8>,
    sink: Sink,
) -> Result<bool> {
    if b.rows_only() {
        // Checked chunk by chunk, while each is in cache.
        rows_into(path, t, source, &b.groups, backend, stop, sink)?;
        return Ok(true);
    }
    let src = source.bytes;
    out.resize(t.end - t.start, 0);
    match (b.start, b.groups.is_empty()) {
        (Some(r), true) if r.dtype == t.dtype => out.copy_from_slice(&r.data),
        (Some(r), true) => {
            let v = dtype::decode_any_f32(r.dtype, &r.data).expect("float replacement");
            dtype::encode_f32(t.dtype, &v, out);
        }
        _ => match columns_direct(t, src, b, backend, out) {
            Some(r) => r?,
            None => dtype::encode_f32(t.dtype, &whole_f32(t, src, b, backend)?, out),
        },
    }
    safe_merge(path, t, 0, src, out).map(|()| false)
}

/// PEFT's `safe_merge`, element by element: refuse an output tensor that holds NaN or ±Inf where
/// the base held a finite value (a huge `--strength`, an `--unmerge` by a scale near zero, or a
/// value past the dtype's range once rounded). `base` and `out` are the encoded bytes of the same
/// elements, the first of which is element `first` of the tensor.
fn safe_merge(path: &Path, t: &TensorInfo, first: usize, base: &[u8], out: &[u8]) -> Result<()> {
    match dtype::first_new_non_finite(t.dtype, base, out) {
        None => Ok(()),
        Some((i, b, v)) => Err(err(
            Class::NonFinite,
            path,
            format!(
                "{}: the merged value of element {} is {v} where the base holds {b}: it does not \
                 fit {} (too large a --strength, or an --unmerge by a scale near zero?); nothing \
                 was written",
                t.name,
                first + i,
                t.dtype.name()
            ),
        )),
    }
}

/// Length of a row as the input-side chains see it.
fn row_len(t: &TensorInfo) -> usize {
    t.shape[1..].iter().product()
}

/// `rows_chunked`, each chunk encoded, checked and handed to `sink`.
fn rows_into(
    path: &Path,
    t: &TensorInfo,
    src: Source,
    groups: &[BuiltGroup],
    backend: &dyn Backend,
    stop: &(dyn Fn() -> bool + Sync),
    sink: Sink,
) -> Result<()> {
    let esize = t.dtype.float_size().expect("checked at planning");
    let n = row_len(t);
    let row_bytes = n * esize;
    if let Some(chains) = unblended_chains(groups) {
        if backend.takes_stored(&chains, t.dtype) {
            return rows_stored(t, src, &chains, backend, stop, |r0, base, out, flagged| {
                if flagged {
                    safe_merge(path, t, r0 * n, base, out)?;
                }
                sink(r0 * row_bytes, out)
            });
        }
    }
    rows_chunked(t, src, groups, backend, stop, |r0, base, x, bytes| {
        bytes.resize(x.len() * esize, 0);
        dtype::encode_f32(t.dtype, x, bytes);
        safe_merge(path, t, r0 * n, base, bytes)?;
        sink(r0 * row_bytes, bytes)
    })
}

/// Elements per row chunk with `backend`.
pub(super) fn chunk_elems(backend: &dyn Backend) -> usize {
    backend.chunk_elems().max(CHUNK_ELEMS)
}

/// Most elements `gemm_rows` may make a chunk: 16 MiB of f32 per buffer, a few buffers a thread.
const GEMM_CHUNK_MAX: usize = 1 << 22;

/// Rows per chunk: `chunk_elems` of them, and at least `min_rows` where that stays within
/// `GEMM_CHUNK_MAX` elements.
fn chunk_rows(t: &TensorInfo, backend: &dyn Backend, min_rows: usize) -> usize {
    let (rows, n) = (t.shape[0], row_len(t).max(1));
    (chunk_elems(backend) / n)
        .max(min_rows.min(GEMM_CHUNK_MAX / n))
        .clamp(1, rows.max(1))
}

/// The fewest rows a chunk through `chains` should have on the CPU: blocks wider than the
/// fixed-size kernels (32) go through a GEMM that packs each h × h block for every chunk, which
/// cost twice the product itself at b = 256 with the 16–64 rows of a 128 Ki-element chunk. With
/// at least h rows the packing is a small share. 0 where every block is 32 wide or less.
fn gemm_rows<'a>(chains: impl Iterator<Item = &'a Chain>) -> usize {
    chains
        .flat_map(|c| c.factors.iter().map(|f| f.h))
        .filter(|&h| h > 32)
        .max()
        .unwrap_or(0)
}

/// The chains of a tensor's row stages.
fn row_chains(groups: &[BuiltGroup]) -> impl Iterator<Item = &Chain> {
    groups.iter().flat_map(|g| {
        g.stages.iter().filter_map(|s| match s {
            BuiltStage::Rows(c, _) => Some(c.as_ref()),
            BuiltStage::Columns(..) => None,
        })
    })
}

/// Apply row-stage groups to `rows` rows in `x` (the first of them row `row0`).
pub(super) fn apply_rows(
    groups: &[BuiltGroup],
    backend: &dyn Backend,
    x: &mut Vec<f32>,
    row0: usize,
    rows: usize,
    scratch: &mut Scratch,
    orig: &mut Vec<f32>,
) -> Result<()> {
    for g in groups {
        if g.blend != 1.0 {
            orig.clear();
            orig.extend_from_slice(x);
        }
        for s in &g.stages {
            let BuiltStage::Rows(chain, mt) = s else {
                unreachable!("row chunks are only made of row stages");
            };
            apply_chain(backend, chain, mt.as_ref(), x, row0, rows, scratch)?;
        }
        if g.blend != 1.0 {
            blend(x, orig, g.blend);
        }
    }
    Ok(())
}

/// An input-side chain on `rows` rows of `x`, through its transpose where the stage holds one.
fn apply_chain(
    backend: &dyn Backend,
    chain: &Chain,
    mt: Option<&Chain>,
    x: &mut Vec<f32>,
    row0: usize,
    rows: usize,
    scratch: &mut Scratch,
) -> Result<()> {
    match mt {
        Some(mt) => backend.apply_given_transpose(chain, mt, x, row0, rows, scratch),
        None => backend.apply(chain, x, row0, rows, scratch),
    }
}

/// `x ← orig + t·(x − orig)`, the kernel's own linear strength.
fn blend(x: &mut [f32], orig: &[f32], t: f32) {
    for (v, o) in x.iter_mut().zip(orig) {
        *v = o + t * (*v - o);
    }
}

/// Per-thread buffers for one chunk: the kernel's scratch, the chunk's values, a byte buffer for
/// the caller, the values before a blended group, another f32 buffer, and the chunk's stored
/// bytes where they are read from the file.
type Work = (Scratch, Vec<f32>, Vec<u8>, Vec<f32>, Vec<f32>, Vec<u8>);

thread_local! {
    /// Per-thread buffers that live as long as the worker thread: rayon's `*_init` helpers make
    /// fresh ones for every work split, and faulting in and zeroing megabytes of new pages per
    /// split cost more than the arithmetic.
    static WORK: std::cell::RefCell<Work> = std::cell::RefCell::new(Default::default());
}

/// Run `body` with this thread's buffers.
fn with_work<R>(body: impl FnOnce(&mut Work) -> R) -> R {
    // A backend that itself uses rayon may run another chunk on this thread while the buffers
    // are borrowed; that chunk gets buffers of its own.
    WORK.with(|w| match w.try_borrow_mut() {
        Ok(mut g) => body(&mut g),
        Err(_) => body(&mut Default::default()),
    })
}

/// Read and decode rows `r0..r1`, apply the groups, hand their stored bytes, the f32 result and
/// a reusable byte buffer to `f`, with per-thread buffers.
#[allow(clippy::too_many_arguments)]
fn with_chunk(
    t: &TensorInfo,
    src: Source,
    groups: &[BuiltGroup],
    backend: &dyn Backend,
    r0: usize,
    r1: usize,
    f: impl FnOnce(&[u8], &[f32], &mut Vec<u8>) -> Result<()>,
) -> Result<()> {
    let esize = t.dtype.float_size().expect("checked at planning");
    let n = row_len(t);
    with_work(|(scratch, x, bytes, orig, _, input)| {
        let stored = src.read(r0 * n * esize..r1 * n * esize, input)?;
        x.resize((r1 - r0) * n, 0.0);
        dtype::decode_f32(t.dtype, stored, x);
        apply_rows(groups, backend, x, r0, r1 - r0, scratch, orig)?;
        f(stored, x, bytes)
    })
}

/// Transform a row-stage tensor in row chunks, in parallel, handing each finished chunk (its
/// first row, its stored bytes and its f32 values) to `sink` with a reusable byte buffer.
/// Memory stays at a few chunks per thread whatever the tensor's size.
pub(super) fn rows_chunked(
    t: &TensorInfo,
    src: Source,
    groups: &[BuiltGroup],
    backend: &dyn Backend,
    stop: &(dyn Fn() -> bool + Sync),
    sink: impl Fn(usize, &[u8], &[f32], &mut Vec<u8>) -> Result<()> + Sync,
) -> Result<()> {
    let chunk_rows = chunk_rows(t, backend, gemm_rows(row_chains(groups)));
    for_chunks(t.shape[0], chunk_rows, stop, |r0, r1| {
        with_chunk(t, src, groups, backend, r0, r1, |stored, x, bytes| {
            sink(r0, stored, x, bytes)
        })
    })
}

/// `body(r0, r1)` for every chunk of `chunk_rows` rows of `rows`, in parallel, none once `stop`
/// says so.
fn for_chunks(
    rows: usize,
    chunk_rows: usize,
    stop: &(dyn Fn() -> bool + Sync),
    body: impl Fn(usize, usize) -> Result<()> + Sync,
) -> Result<()> {
    (0..rows.div_ceil(chunk_rows))
        .into_par_iter()
        .try_for_each(|c| -> Result<()> {
            if stop() {
                return Ok(());
            }
            let r0 = c * chunk_rows;
            body(r0, (r0 + chunk_rows).min(rows))
        })
}

/// Every stage's chain in order, where no group is blended as a whole (a blended group needs
/// its input kept beside the chains'), else None.
fn unblended_chains(groups: &[BuiltGroup]) -> Option<Vec<&Arc<Chain>>> {
    groups
        .iter()
        .flat_map(|g| g.stages.iter().map(move |s| (g.blend, s)))
        .map(|(blend, s)| match s {
            BuiltStage::Rows(c, _) if blend == 1.0 => Some(c),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .filter(|c| !c.is_empty())
}

/// `rows_chunked` through the backend's `apply_stored`: each chunk's stored bytes go to the
/// backend as they are and come back as the result's stored bytes, handed to `sink` with the
/// chunk's first row, its stored input, and whether the backend saw a value become non-finite.
fn rows_stored(
    t: &TensorInfo,
    src: Source,
    chains: &[&Arc<Chain>],
    backend: &dyn Backend,
    stop: &(dyn Fn() -> bool + Sync),
    sink: impl Fn(usize, &[u8], &[u8], bool) -> Result<()> + Sync,
) -> Result<()> {
    let row_bytes = row_len(t) * t.dtype.float_size().expect("checked at planning");
    // The device's batches are its own size (cuBLAS packs nothing per batch).
    let chunk_rows = chunk_rows(t, backend, 0);
    for_chunks(t.shape[0], chunk_rows, stop, |r0, r1| {
        backend.apply_stored(
            chains,
            t.dtype,
            r0,
            r1 - r0,
            &mut |buf| src.read_into(r0 * row_bytes, buf),
            &mut |base, out, flagged| sink(r0, base, out, flagged),
        )
    })
}

/// The whole tensor in f32 after every group: the base's values (or the replacement's), each
/// stage applied in turn. Memory is bounded by the tensor, not the model.
pub(super) fn whole_f32(
    t: &TensorInfo,
    src: &[u8],
    b: &Built,
    backend: &dyn Backend,
) -> Result<Vec<f32>> {
    let mut w = match b.start {
        Some(r) => dtype::decode_any_f32(r.dtype, &r.data).expect("float tensor"),
        None => {
            // Across the cores: a whole U-Net tensor decoded (and its pages first touched) on
            // one thread left the others idle for a tenth of a verify.
            let esize = t.dtype.float_size().expect("checked at planning");
            const PIECE: usize = 1 << 16;
            let mut w = vec![0f32; src.len() / esize];
            w.par_chunks_mut(PIECE)
                .zip(src.par_chunks(PIECE * esize))
                .for_each(|(w, s)| dtype::decode_f32(t.dtype, s, w));
            w
        }
    };
    let mut orig = Vec::new();
    for g in &b.groups {
        if g.blend != 1.0 {
            orig.clone_from(&w);
        }
        for s in &g.stages {
            match s {
                BuiltStage::Rows(chain, mt) => {
                    rows_in_place(t, &mut w, chain, mt.as_ref(), backend)?
                }
                BuiltStage::Columns(slices, cols) => columns(t, &mut w, slices, *cols, backend)?,
            }
        }
        if g.blend != 1.0 {
            blend(&mut w, &orig, g.blend);
        }
    }
    Ok(w)
}

/// Apply an input-side chain to every row of `w` (tensor `t` in f32), in parallel chunks.
fn rows_in_place(
    t: &TensorInfo,
    w: &mut [f32],
    chain: &Chain,
    mt: Option<&Chain>,
    backend: &dyn Backend,
) -> Result<()> {
    let n = chain.n;
    let chunk_rows = chunk_rows(t, backend, gemm_rows(std::iter::once(chain)));
    w.par_chunks_mut(chunk_rows * n)
        .enumerate()
        .try_for_each(|(c, chunk)| {
            with_work(|(scratch, x, _, _, _, _)| {
                x.clear();
                x.extend_from_slice(chunk);
                let (row0, rows) = (c * chunk_rows, chunk.len() / n);
                apply_chain(backend, chain, mt, x, row0, rows, scratch)?;
                chunk.copy_from_slice(x);
                Ok(())
            })
        })
}

/// A tensor's storage seen as rows of `cols` elements, shared by the tiles of one slice: every
/// tile reads and writes only its own columns, so no element is touched by two threads.
struct Cells<T> {
    ptr: *mut T,
    len: usize,
    cols: usize,
}

// SAFETY: `Cells` is only used by `columns_tiled`, whose tiles address disjoint column ranges.
unsafe impl<T: Send> Sync for Cells<T> {}

impl<T> Cells<T> {
    fn new(v: &mut [T], cols: usize) -> Cells<T> {
        Cells {
            ptr: v.as_mut_ptr(),
            len: v.len(),
            cols,
        }
    }

    /// Elements `c0..c0 + len` of row `row`.
    ///
    /// # Safety
    /// No other live reference may address these elements (distinct tiles, distinct columns).
    #[allow(clippy::mut_from_ref)]
    unsafe fn piece(&self, row: usize, c0: usize, len: usize) -> &mut [T] {
        let at = row * self.cols + c0;
        assert!(at + len <= self.len && c0 + len <= self.cols);
        std::slice::from_raw_parts_mut(self.ptr.add(at), len)
    }
}

/// Columns per tile. A tile loads and stores a piece of every row it covers, so wide tiles
/// (long, sequential row pieces) are what make those loads and stores fast; the transform runs
/// on narrower strips of the tile (`strip_cols`). About `TILE_ELEMS` elements, in multiples of
/// 32 columns (whole cache lines of every 16-bit row piece), and at least two tiles per thread
/// where the tensor is wide enough.
fn tile_cols(n: usize, cols: usize, backend: &dyn Backend) -> usize {
    let by_size = backend.chunk_elems().max(TILE_ELEMS) / n.max(1);
    let by_threads = cols.div_ceil(2 * rayon::current_num_threads().max(1));
    (by_size.min(by_threads) / 32 * 32).max(32).min(cols.max(1))
}

/// Elements per output-side tile (1 MiB of f32): on the 2-core EPYC (512 KiB L2, 32 MiB L3)
/// the U-Net boft case of the benchmark merged in 2.2–2.9 s with this, 2.3–2.6 s with 512 KiB,
/// 3.1–3.3 s with 4 MiB and 3.4–3.5 s with 256 KiB tiles (row pieces too short to load fast).
const TILE_ELEMS: usize = 1 << 18;

/// Columns per strip of a tile: every factor passes over the whole strip, so a strip and the
/// kernel's second buffer take about two thirds of one core's L2 cache (the factors' blocks
/// pass through it too), in multiples of 16 columns (the column kernel's register tiles): 32
/// columns for 1280 outputs on a 512 KiB L2, where 16 ran the kernel measurably slower. A
/// device backend takes the whole tile at once.
fn strip_cols(n: usize, tile: usize, backend: &dyn Backend) -> usize {
    if backend.chunk_elems() != 0 {
        return tile;
    }
    let by_cache = crate::math::kernel::l2_bytes() / 12 / n.max(1);
    (by_cache / 16 * 16).max(16).min(tile)
}

/// Output-side stages of one row slice `a..a + m`, tile by tile, tiles in parallel. A tile's
/// columns are vectors of length `n`, kept as the tensor stores them (an `n × tc` row-major
/// block; rows past `m` zero: a cropped transform acts on columns padded with zeros). Every
/// stage's chain is applied to one strip of the tile after another, each strip copied out into
/// an `n × w` block of its own and back.
/// `load(row, c0, dst)` and `store(row, c0, src)` move one row piece between the tensor and f32;
/// the same column ranges are never given to two calls at once.
fn columns_tiled(
    (a, m): (usize, usize),
    cols: usize,
    groups: &[(f32, Vec<&Arc<Chain>>)],
    backend: &dyn Backend,
    load: &(dyn Fn(usize, usize, &mut [f32]) + Sync),
    store: &(dyn Fn(usize, usize, &[f32]) + Sync),
) -> Result<()> {
    let n = groups[0].1[0].n;
    let tile = tile_cols(n, cols, backend);
    let strip = strip_cols(n, tile, backend);
    (0..cols.div_ceil(tile))
        .into_par_iter()
        .try_for_each(|ti| -> Result<()> {
            let c0 = ti * tile;
            let tc = tile.min(cols - c0);
            with_work(|(scratch, x, _, orig, y, _)| {
                // Rows below m are all overwritten: only the padding needs zeroing.
                x.resize(n * tc, 0.0);
                x[m * tc..].fill(0.0);
                for i in 0..m {
                    load(a + i, c0, &mut x[i * tc..(i + 1) * tc]);
                }
                for s0 in (0..tc).step_by(strip) {
                    let w = strip.min(tc - s0);
                    y.resize(n * w, 0.0);
                    copy_cols(y, w, 0, &x[s0..], tc, n, w);
                    let mut first = true;
                    for (blend_t, chains) in groups {
                        if *blend_t != 1.0 {
                            orig.clear();
                            orig.extend_from_slice(y);
                        }
                        for chain in chains {
                            if !first && n > m {
                                // Each stage sees the tensor's rows only, as if read afresh.
                                y[m * w..].fill(0.0);
                            }
                            first = false;
                            // Each column is a vector: a per-vector scale is indexed by column.
                            backend.apply_cols(chain, y, c0 + s0, w, scratch)?;
                        }
                        if *blend_t != 1.0 {
                            blend(y, orig, *blend_t);
                        }
                    }
                    copy_cols(x, tc, s0, y, w, m, w);
                }
                for i in 0..m {
                    store(a + i, c0, &x[i * tc..(i + 1) * tc]);
                }
                Ok(())
            })
        })
}

/// `w` columns of `rows` rows from `src` (row stride `ss`) into `dst` from column `d0` (row
/// stride `ds`).
fn copy_cols(dst: &mut [f32], ds: usize, d0: usize, src: &[f32], ss: usize, rows: usize, w: usize) {
    for r in 0..rows {
        dst[r * ds + d0..][..w].copy_from_slice(&src[r * ss..][..w]);
    }
}

/// Output-side transforms mix rows, so each row slice is handled as column vectors, a
/// cache-sized tile of columns at a time across all cores (never transposed): `w` is the whole
/// tensor in f32.
fn columns(
    t: &TensorInfo,
    w: &mut [f32],
    slices: &[((usize, usize), Arc<Chain>)],
    view_cols: Option<usize>,
    backend: &dyn Backend,
) -> Result<()> {
    let cols: usize = view_cols.unwrap_or_else(|| row_len(t));
    let cells = Cells::new(w, cols);
    for ((a, b), chain) in slices {
        // SAFETY (both closures): tiles of one slice address disjoint columns of its rows, and
        // nothing else borrows `w` while `cells` is in use.
        let load = |r: usize, c0: usize, dst: &mut [f32]| {
            dst.copy_from_slice(unsafe { cells.piece(r, c0, dst.len()) })
        };
        let store = |r: usize, c0: usize, src: &[f32]| {
            unsafe { cells.piece(r, c0, src.len()) }.copy_from_slice(src)
        };
        columns_tiled(
            (*a, b - a),
            cols,
            &[(1.0, vec![chain])],
            backend,
            &load,
            &store,
        )?;
    }
    Ok(())
}

/// A tensor whose every stage is output-side over the same row slices, from the base's values:
/// decoded, transformed and encoded tile by tile straight from `src` into `out` (same dtype),
/// with no whole-tensor f32 copy. Rows no slice covers are copied. None when the tensor does not
/// have that shape of plan.
fn columns_direct(
    t: &TensorInfo,
    src: &[u8],
    built: &Built,
    backend: &dyn Backend,
    out: &mut [u8],
) -> Option<Result<()>> {
    if built.start.is_some() || built.groups.is_empty() {
        return None;
    }
    let mut first: Option<(&ColumnSlices, Option<usize>)> = None;
    for s in built.groups.iter().flat_map(|g| &g.stages) {
        let BuiltStage::Columns(slices, cols) = s else {
            return None;
        };
        match first {
            None => first = Some((slices, *cols)),
            Some((f, c)) => {
                let same = c == *cols
                    && f.len() == slices.len()
                    && f.iter()
                        .zip(slices)
                        .all(|(x, y)| x.0 == y.0 && x.1.n == y.1.n);
                if !same {
                    return None;
                }
            }
        }
    }
    let (slices, view_cols) = first?;
    let cols: usize = view_cols.unwrap_or_else(|| row_len(t));
    let es = t.dtype.float_size().expect("checked at planning");
    let row_bytes = cols * es;
    let rows = out.len() / row_bytes.max(1);
    // Rows outside every slice keep their bytes.
    let mut next = 0;
    for &(a, b) in slices.iter().map(|s| &s.0).chain([&(rows, rows)]) {
        if a > next {
            out[next * row_bytes..a * row_bytes]
                .copy_from_slice(&src[next * row_bytes..a * row_bytes]);
        }
        next = next.max(b);
    }
    let cells = Cells::new(out, row_bytes);
    let dt = t.dtype;
    // SAFETY (store): tiles of one slice address disjoint columns of its rows, and nothing else
    // borrows `out` while `cells` is in use.
    let load = |r: usize, c0: usize, dst: &mut [f32]| {
        let at = r * row_bytes + c0 * es;
        dtype::decode_f32(dt, &src[at..at + dst.len() * es], dst)
    };
    let store = |r: usize, c0: usize, v: &[f32]| {
        let piece = unsafe { cells.piece(r, c0 * es, v.len() * es) };
        dtype::encode_f32(dt, v, piece)
    };
    for (k, ((a, b), _)) in slices.iter().enumerate() {
        let groups: Vec<(f32, Vec<&Arc<Chain>>)> = built
            .groups
            .iter()
            .map(|g| {
                let chains = g
                    .stages
                    .iter()
                    .map(|s| match s {
                        BuiltStage::Columns(sl, _) => &sl[k].1,
                        BuiltStage::Rows(..) => unreachable!("checked above"),
                    })
                    .collect();
                (g.blend, chains)
            })
            .collect();
        if let Err(e) = columns_tiled((*a, b - a), cols, &groups, backend, &load, &store) {
            return Some(Err(e));
        }
    }
    Some(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::kernel::{apply_vec, Factor, ScaleOn};
    use crate::merge::CpuBackend;

    fn factor(h: usize, d: usize, seed: f32, perm: Option<Vec<u32>>) -> Factor {
        Factor {
            h,
            d,
            blocks: (0..d * h * h)
                .map(|i| ((i as f32 + seed) * 0.37).sin())
                .collect(),
            repeat: 0,
            perm,
        }
    }

    fn chain(factors: Vec<Factor>, scale_first: bool) -> Arc<Chain> {
        Arc::new(Chain {
            n: factors[0].n(),
            factors,
            scale: Some(vec![1.5]),
            scale_on: ScaleOn::Vector,
            scale_first,
            blend: 1.0,
        })
    }

    /// Naive reference of an output-side stage: every column of rows `a..b` copied out as one
    /// vector (zero-padded to the chain's length), transformed alone, copied back.
    fn naive_columns(w: &mut [f32], cols: usize, (a, b): (usize, usize), chain: &Chain) {
        for c in 0..cols {
            let mut v = vec![0f32; chain.n];
            for i in a..b {
                v[i - a] = w[i * cols + c];
            }
            chain.apply_rows(&mut v, c, 1, &mut Scratch::default());
            for i in a..b {
                w[i * cols + c] = v[i - a];
            }
        }
    }

    #[test]
    fn chunks_read_from_the_file_are_the_mapped_bytes_and_a_shrunk_file_is_one_error() {
        let dir = std::env::temp_dir().join(format!("boft-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.bin");
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = File::open(&path).unwrap();
        // The tensor starts 100 bytes into the file.
        let src = Source {
            bytes: &data[100..],
            file: Some((&f, 100, path.as_path())),
        };
        let mut buf = Vec::new();
        for r in [0..10, 7..2000, 3000..3996] {
            assert_eq!(
                src.read(r.clone(), &mut buf).unwrap(),
                &data[100 + r.start..100 + r.end]
            );
            let mapped = Source {
                bytes: &data[100..],
                file: None,
            };
            assert_eq!(
                mapped.read(r.clone(), &mut buf).unwrap(),
                &data[100 + r.start..100 + r.end]
            );
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(2000)
            .unwrap();
        let e = src.read(1000..3000, &mut buf).unwrap_err();
        assert_eq!(e.class, Class::Io);
        let line = e.to_string();
        assert!(
            line.contains("t.bin") && line.contains("shrank while being read"),
            "{line}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn output_side_tiles_give_what_each_column_alone_gives() {
        use crate::checkpoint::Dtype;
        // Column counts below and across tile widths (and not multiples of 16), several row slices
        // with rows left between them, a cropped chain, a per-column scale, every dtype, two
        // stages and a blended group: the tiled whole-tensor path and the direct byte path
        // both give, bit for bit, what each column transformed alone gives.
        let perm =
            |n: usize| -> Vec<u32> { (0..n as u32).map(|j| (j * 3 + 1) % n as u32).collect() };
        for cols in [1usize, 5, 17, 33, 2100, 16384 * 2 + 5] {
            for dt in [Dtype::F32, Dtype::BF16, Dtype::F16] {
                let rows = 30;
                let c1 = Arc::new(Chain {
                    n: 8,
                    factors: vec![factor(4, 2, 0.5, None), factor(2, 4, 1.5, Some(perm(8)))],
                    scale: Some((0..cols).map(|c| 1.0 + c as f32 * 1e-3).collect()),
                    scale_on: ScaleOn::Vector,
                    scale_first: false,
                    blend: 1.0,
                });
                // Rows 12..18 (6 of them) under an 8-long chain: cropped.
                let c2 = Arc::new(Chain {
                    n: 8,
                    factors: vec![factor(8, 1, 2.5, None)],
                    scale: Some((0..8).map(|i| 0.5 + i as f32 * 0.1).collect()),
                    scale_on: ScaleOn::Component,
                    scale_first: false,
                    blend: 1.0,
                });
                let slices = vec![((2usize, 10usize), c1.clone()), ((12, 18), c2.clone())];
                let info = TensorInfo {
                    name: "w".into(),
                    dtype: dt,
                    shape: vec![rows, cols],
                    start: 0,
                    end: rows * cols * dt.float_size().unwrap(),
                };
                let vals: Vec<f32> = (0..rows * cols)
                    .map(|i| ((i as f32) * 0.731).sin())
                    .collect();
                let mut src = vec![0u8; info.end];
                dtype::encode_f32(dt, &vals, &mut src);
                let base = dtype::decode_any_f32(dt, &src).unwrap();
                for (groups, blend_t) in [(1usize, 1.0f32), (2, 1.0), (2, 0.3)] {
                    let stage = || BuiltStage::Columns(slices.clone(), None);
                    let built = Built {
                        start: None,
                        groups: (0..groups)
                            .map(|_| BuiltGroup {
                                stages: vec![stage(), stage()],
                                blend: blend_t,
                            })
                            .collect(),
                    };
                    let mut want = base.clone();
                    for _ in 0..groups {
                        let orig = want.clone();
                        for _ in 0..2 {
                            for ((a, b), c) in &slices {
                                naive_columns(&mut want, cols, (*a, *b), c);
                            }
                        }
                        if blend_t != 1.0 {
                            blend(&mut want, &orig, blend_t);
                        }
                    }
                    let got = whole_f32(&info, &src, &built, &CpuBackend).unwrap();
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(x, y)| x.to_bits() == y.to_bits()),
                        "whole: cols={cols} {dt:?} groups={groups} blend={blend_t}"
                    );
                    let mut direct = vec![0u8; src.len()];
                    columns_direct(&info, &src, &built, &CpuBackend, &mut direct)
                        .expect("a plan of output-side stages")
                        .unwrap();
                    let mut encoded = vec![0u8; src.len()];
                    dtype::encode_f32(dt, &want, &mut encoded);
                    assert_eq!(
                        direct, encoded,
                        "direct: cols={cols} {dt:?} groups={groups}"
                    );
                }
            }
        }
    }

    #[test]
    fn chunks_through_wide_blocks_hold_a_block_of_rows_within_the_bound() {
        let info = |rows: usize, n: usize| TensorInfo {
            name: "w".into(),
            dtype: crate::checkpoint::Dtype::BF16,
            shape: vec![rows, n],
            start: 0,
            end: rows * n * 2,
        };
        let wide = chain(vec![factor(256, 8, 0.5, None)], false);
        let narrow = chain(vec![factor(32, 64, 0.5, None)], false);
        assert_eq!(gemm_rows([narrow.as_ref()].into_iter()), 0);
        assert_eq!(gemm_rows([narrow.as_ref(), wide.as_ref()].into_iter()), 256);
        // 8192 features: 16 rows by element count, 256 for the GEMM's sake.
        assert_eq!(chunk_rows(&info(4096, 8192), &CpuBackend, 0), 16);
        assert_eq!(chunk_rows(&info(4096, 8192), &CpuBackend, 256), 256);
        // Never past GEMM_CHUNK_MAX elements, never past the tensor.
        assert_eq!(chunk_rows(&info(65536, 1 << 16), &CpuBackend, 4096), 64);
        assert_eq!(chunk_rows(&info(100, 8192), &CpuBackend, 256), 100);
    }

    /// The CPU kernel, taking rows through `apply_stored`'s default (the path a device takes).
    struct Stored;

    impl Backend for Stored {
        fn apply(
            &self,
            chain: &Chain,
            x: &mut Vec<f32>,
            row0: usize,
            rows: usize,
            scratch: &mut Scratch,
        ) -> Result<()> {
            CpuBackend.apply(chain, x, row0, rows, scratch)
        }

        fn takes_stored(&self, _: &[&Arc<Chain>], _: crate::checkpoint::Dtype) -> bool {
            true
        }

        fn name(&self) -> String {
            "stored".into()
        }
    }

    /// `tensor_bytes` of a row-stage tensor with `backend`: the bytes its sink got, in place.
    fn row_bytes(
        info: &TensorInfo,
        src: &[u8],
        built: &Built,
        backend: &dyn Backend,
    ) -> Result<Vec<u8>> {
        let got = std::sync::Mutex::new(vec![0u8; src.len()]);
        let sink = |at: usize, b: &[u8]| -> Result<()> {
            got.lock().unwrap()[at..at + b.len()].copy_from_slice(b);
            Ok(())
        };
        let source = Source {
            bytes: src,
            file: None,
        };
        let streamed = tensor_bytes(
            Path::new("m.safetensors"),
            info,
            source,
            built,
            backend,
            &|| false,
            &mut Vec::new(),
            &sink,
        )?;
        assert!(streamed);
        Ok(got.into_inner().unwrap())
    }

    #[test]
    fn rows_through_apply_stored_are_the_bytes_of_the_f32_path() {
        use crate::checkpoint::Dtype;
        // Two adapters' chains in turn, each dtype, enough rows for several chunks: the same
        // bytes whichever way the rows go, and the same error where a value overflows.
        let perm: Vec<u32> = (0..8u32).map(|j| (j * 3 + 1) % 8).collect();
        for dt in [Dtype::F32, Dtype::BF16, Dtype::F16] {
            let rows = 40_000;
            let mut c1 = chain(
                vec![
                    factor(4, 2, 0.5, None),
                    factor(2, 4, 1.5, Some(perm.clone())),
                ],
                false,
            );
            Arc::make_mut(&mut c1).scale = Some((0..rows).map(|r| 1.0 + r as f32 * 1e-5).collect());
            let mut c2 = chain(vec![factor(8, 1, 2.5, None)], true);
            Arc::make_mut(&mut c2).scale = Some((0..8).map(|i| 0.5 + i as f32 * 0.1).collect());
            Arc::make_mut(&mut c2).scale_on = ScaleOn::Component;
            let info = TensorInfo {
                name: "w".into(),
                dtype: dt,
                shape: vec![rows, 8],
                start: 0,
                end: rows * 8 * dt.float_size().unwrap(),
            };
            let vals: Vec<f32> = (0..rows * 8).map(|i| ((i as f32) * 0.731).sin()).collect();
            let mut src = vec![0u8; info.end];
            dtype::encode_f32(dt, &vals, &mut src);
            let built = |c2: &Arc<Chain>| Built {
                start: None,
                groups: [c1.clone(), c2.clone()]
                    .into_iter()
                    .map(|c| BuiltGroup {
                        stages: vec![BuiltStage::Rows(c.clone(), Some(c.transposed()))],
                        blend: 1.0,
                    })
                    .collect(),
            };
            let want = row_bytes(&info, &src, &built(&c2), &CpuBackend).unwrap();
            let got = row_bytes(&info, &src, &built(&c2), &Stored).unwrap();
            assert!(want == got, "{dt:?}");
            let mut huge = c2.clone();
            Arc::make_mut(&mut huge).scale = Some(vec![1e38; 8]);
            let a = row_bytes(&info, &src, &built(&huge), &CpuBackend).unwrap_err();
            let b = row_bytes(&info, &src, &built(&huge), &Stored).unwrap_err();
            assert_eq!((a.class, a.to_string()), (b.class, b.to_string()), "{dt:?}");
            assert_eq!(a.class, Class::NonFinite);
        }
    }

    #[test]
    fn a_junction_of_unpermuted_factors_collapses_into_one() {
        let (h, d) = (3, 2);
        let rev: Vec<u32> = (0..(h * d) as u32).rev().collect();
        // An un-merge (scale first) ending unpermuted, then a merge (scale last) starting so.
        let x = chain(
            vec![
                factor(h, d, 1.0, Some(rev.clone())),
                factor(h, d, 2.0, None),
            ],
            true,
        );
        let y = chain(
            vec![factor(h, d, 3.0, None), factor(h, d, 4.0, Some(rev))],
            false,
        );
        let v: Vec<f32> = (0..h * d).map(|i| i as f32 * 0.25 - 0.5).collect();
        let want = apply_vec(&y, &apply_vec(&x, &v));
        let mut groups = vec![BuiltGroup {
            stages: vec![BuiltStage::Rows(x, None), BuiltStage::Rows(y, None)],
            blend: 1.0,
        }];
        collapse_junctions(&mut groups);
        let [BuiltStage::Rows(x, _), BuiltStage::Rows(y, _)] = &groups[0].stages[..] else {
            unreachable!()
        };
        assert_eq!((x.factors.len(), y.factors.len()), (1, 2));
        let got = apply_vec(y, &apply_vec(x, &v));
        for (a, b) in want.iter().zip(&got) {
            assert!((a - b).abs() < 1e-5, "{want:?} vs {got:?}");
        }
    }

    #[test]
    fn a_scale_between_the_chains_keeps_them_apart() {
        let (h, d) = (2, 2);
        let x = chain(
            vec![factor(h, d, 1.0, None), factor(h, d, 2.0, None)],
            false,
        );
        let y = chain(vec![factor(h, d, 3.0, None)], false);
        let mut groups = vec![BuiltGroup {
            stages: vec![BuiltStage::Rows(x, None), BuiltStage::Rows(y, None)],
            blend: 1.0,
        }];
        collapse_junctions(&mut groups);
        let BuiltStage::Rows(x, _) = &groups[0].stages[0] else {
            unreachable!()
        };
        assert_eq!(x.factors.len(), 2);
    }
}
