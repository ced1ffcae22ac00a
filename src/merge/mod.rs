//! Merge planning and execution. The engine sees only canonical adapters: it resolves each target
//! to a base tensor, checks geometry, builds kernel chains, and streams every file of the base
//! to the output at the same offsets — untouched tensors copied byte for byte (in the kernel when
//! possible), targeted ones transformed chunk by chunk with bounded memory.

pub mod backend;
#[cfg(feature = "candle")]
pub mod candle;
mod expect;
pub mod progress;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;

use crate::adapter::{Adapter, Replacement, Side, Strength, Target};
use crate::checkpoint::{dtype, Checkpoint, SafeFile, TensorInfo};
use crate::error::{err, Class, Error, Result};
use crate::math::kernel::{Chain, Scratch};
use crate::output::{self, Staged};
pub use backend::{cuda_backend, Backend, CpuBackend, Device};
pub use expect::Fate;
pub use progress::{NoProgress, Progress};

/// What happens to one base tensor.
enum Action<'a> {
    /// Transform whole rows (input side, one target).
    Rows(&'a Target),
    /// Transform columns of row slices (output side; several slices for fused weights).
    Columns(Vec<((usize, usize), &'a Target)>),
    Replace(&'a Replacement),
}

/// An action's kernel chains, built just before its tensor is processed so that only a few
/// targets' blocks exist at any time.
enum Built<'a> {
    Rows(Chain),
    /// Row slices and their chains, and the number of columns the tensor is read as.
    Columns(Vec<((usize, usize), Chain)>, Option<usize>),
    Replace(&'a Replacement),
}

/// A merge resolved against its base: what happens to every tensor it touches.
pub struct Plan<'a> {
    /// The checkpoint the plan applies to.
    pub base: &'a Checkpoint,
    actions: HashMap<String, Action<'a>>,
    inverse: bool,
    /// Strength every chain is built at (full unless set).
    pub strength: Strength,
}

/// What a merge wrote, for the summary line.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Tensors transformed.
    pub transformed: usize,
    /// Tensors replaced.
    pub replaced: usize,
    /// Tensors copied byte for byte.
    pub copied: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Weight files of the base folder that are not part of the checkpoint and were not
    /// written (`Checkpoint::left_out`).
    pub left_out: Vec<PathBuf>,
}

/// Which way a plan goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Apply the adapter.
    Merge,
    /// Undo the transforms; refuse adapters that replaced tensors outright.
    Unmerge,
    /// Undo the transforms and leave replaced tensors as they are.
    UnmergeKeepReplaced,
}

/// How to run a merge.
pub struct Options<'a> {
    /// Merge or un-merge.
    pub direction: Direction,
    /// Told the bytes written as the output is written.
    pub progress: &'a dyn Progress,
    /// Strength every chain is built at.
    pub strength: Strength,
}

/// Resolve every target and replacement against the base and check it fits. Nothing is written.
pub fn plan<'a>(base: &'a Checkpoint, adapter: &'a Adapter, dir: Direction) -> Result<Plan<'a>> {
    let unmerge = dir != Direction::Merge;
    let mut actions: HashMap<String, Action<'a>> = HashMap::new();
    let missing = |what: &str, name: &str, module: &str| {
        err(
            Class::MissingTarget,
            &base.root,
            format!(
                "{what} {name:?} (from adapter module {module:?}) is not in the base checkpoint"
            ),
        )
    };
    let mut by_tensor: HashMap<&str, Vec<&Target>> = HashMap::new();
    for t in &adapter.targets {
        by_tensor.entry(t.name.as_str()).or_default().push(t);
    }
    for (name, targets) in by_tensor {
        let (_, info) = base
            .get(name)
            .ok_or_else(|| missing("target tensor", name, &targets[0].module))?;
        for t in &targets {
            t.check_base(info.dtype, &info.shape)
                .map_err(|e| e.at(&base.root))?;
        }
        crate::adapter::check_tensor(name, &targets).map_err(|e| e.at(&base.root))?;
        let action = if targets[0].side == Side::Input {
            Action::Rows(targets[0])
        } else {
            let mut slices: Vec<_> = targets
                .iter()
                .map(|t| {
                    let range = t.rows.unwrap_or((0, t.view.map_or(info.shape[0], |v| v.0)));
                    (range, *t)
                })
                .collect();
            slices.sort_by_key(|s| s.0);
            Action::Columns(slices)
        };
        actions.insert(name.to_string(), action);
    }
    for r in &adapter.replacements {
        let (_, info) = base
            .get(&r.name)
            .ok_or_else(|| missing("replaced tensor", &r.name, &r.name))?;
        if info.shape != r.shape {
            return Err(err(
                Class::ShapeMismatch,
                &base.root,
                format!(
                    "replacement for {} has shape {:?}, base has {:?}",
                    r.name, r.shape, info.shape
                ),
            ));
        }
        if info.dtype != r.dtype && info.dtype.float_size().is_none() {
            return Err(err(
                Class::UnsupportedDtype,
                &base.root,
                format!(
                    "replacement for {} is {} but the base tensor is {}",
                    r.name,
                    r.dtype.name(),
                    info.dtype.name()
                ),
            ));
        }
        match dir {
            Direction::Merge => {
                actions.insert(r.name.clone(), Action::Replace(r));
            }
            // The base tensor a replacement overwrote is not in the adapter: it cannot be restored.
            Direction::Unmerge => {
                return Err(err(
                    Class::BadAdapter,
                    &base.root,
                    format!(
                        "the adapter replaces {} outright (modules_to_save or bias); the original \
                         cannot be recovered by --unmerge (--keep-replaced un-merges the rest and \
                         leaves such tensors as they are)",
                        r.name
                    ),
                ));
            }
            Direction::UnmergeKeepReplaced => {}
        }
    }
    Ok(Plan {
        base,
        actions,
        inverse: unmerge,
        strength: Strength::FULL,
    })
}

/// One output file being written at the same offsets as its input.
struct OutFile<'a> {
    src: &'a SafeFile,
    dst: File,
    dst_path: PathBuf,
}

/// One piece of the output, in file and offset order.
enum Step<'a> {
    Copy(CopyRun),
    Work(usize, &'a TensorInfo, &'a Action<'a>),
}

/// Contiguous run of untouched tensors to copy verbatim.
struct CopyRun {
    file: usize,
    start: usize,
    len: usize,
}

impl Plan<'_> {
    fn action(&self, name: &str) -> Option<&Action<'_>> {
        self.actions.get(name)
    }

    /// Compute an action's blocks and build its chains (the inverse ones for an unmerge).
    fn build<'b>(&self, a: &Action<'b>) -> Result<Built<'b>> {
        let at = |e: Error| e.at(&self.base.root);
        Ok(match a {
            Action::Rows(t) => Built::Rows(t.chain_at(self.inverse, self.strength).map_err(at)?),
            Action::Columns(slices) => Built::Columns(
                slices
                    .iter()
                    .map(|(r, t)| Ok((*r, t.chain_at(self.inverse, self.strength).map_err(at)?)))
                    .collect::<Result<_>>()?,
                slices.iter().find_map(|(_, t)| t.view.map(|v| v.1)),
            ),
            Action::Replace(r) => Built::Replace(r),
        })
    }

    /// Write the merged checkpoint under `staged` (a folder for folder bases, a file otherwise).
    pub fn execute(&self, staged: &Staged, backend: &dyn Backend, opts: &Options) -> Result<Stats> {
        let base = self.base;
        let mut outs = Vec::with_capacity(base.files.len());
        for (rel, f) in &base.files {
            // Created once, exclusively and not through a symlink, and written only through
            // this handle (`Staged`).
            let (path, dst) = if base.is_folder() {
                (staged.path().join(rel), staged.create(rel)?)
            } else {
                let path = staged.path().to_path_buf();
                let dst = staged
                    .file_handle()
                    .try_clone()
                    .map_err(|e| Error::io(&path, e))?;
                (path, dst)
            };
            reserve(&dst, f.len() as u64).map_err(|e| Error::io(&path, e))?;
            dst.write_all_at(f.header_bytes(), 0)
                .map_err(|e| Error::io(&path, e))?;
            outs.push(OutFile {
                src: f,
                dst,
                dst_path: path,
            });
        }
        if base.is_folder() {
            // Several names for one file (a Hugging Face snapshot's links to one blob) keep every
            // name in the output but its bytes once: later names become hard links to the first
            // copy. Same file = same device and inode of the handle opened to copy it.
            let mut first_copy: HashMap<(u64, u64), &Path> = HashMap::new();
            for rel in &base.others {
                let from = base.root.join(rel);
                let to = staged.path().join(rel);
                let mut src = base.open_other(rel)?;
                let id = src.metadata().ok().map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    (m.dev(), m.ino())
                });
                if let Some(first) = id.and_then(|id| first_copy.get(&id)) {
                    if staged.link(first, rel) {
                        continue;
                    }
                }
                if let Some(id) = id {
                    first_copy.entry(id).or_insert(rel.as_path());
                }
                let mut dst = staged.create(rel)?;
                std::io::copy(&mut src, &mut dst).map_err(|e| {
                    // A full or read-only disk is the destination's fault, not the input's.
                    let dst_fault = matches!(
                        e.raw_os_error(),
                        Some(libc::ENOSPC | libc::EDQUOT | libc::EROFS | libc::EFBIG)
                    );
                    Error::io(if dst_fault { &to } else { &from }, e)
                })?;
            }
        }

        // Every file is written front to back in one stream (untouched runs copied, targeted
        // tensors transformed, in offset order) so that writeback stays sequential.
        let mut steps: Vec<Step> = Vec::new();
        let mut stats = Stats {
            left_out: base.left_out.clone(),
            ..Stats::default()
        };
        for (fi, o) in outs.iter().enumerate() {
            for t in &o.src.tensors {
                stats.bytes += (t.end - t.start) as u64;
                match self.actions.get(&t.name) {
                    Some(a) => {
                        match a {
                            Action::Replace(_) => stats.replaced += 1,
                            _ => stats.transformed += 1,
                        }
                        steps.push(Step::Work(fi, t, a));
                    }
                    None => {
                        stats.copied += 1;
                        match steps.last_mut() {
                            Some(Step::Copy(r)) if r.file == fi && r.start + r.len == t.start => {
                                r.len += t.end - t.start
                            }
                            _ => steps.push(Step::Copy(CopyRun {
                                file: fi,
                                start: t.start,
                                len: t.end - t.start,
                            })),
                        }
                    }
                }
            }
        }

        let bar = opts.progress;
        bar.start(stats.bytes);
        let abort = AtomicBool::new(false);
        let first_err: Mutex<Option<Error>> = Mutex::new(None);
        let fail = |e: Error| {
            abort.store(true, Ordering::SeqCst);
            let mut g = first_err.lock().unwrap();
            if g.is_none() {
                *g = Some(e);
            }
        };
        let stop = || abort.load(Ordering::Relaxed) || output::interrupted();

        std::thread::scope(|s| {
            // Three stages run at once: a builder computes blocks (and un-merge inverses) ahead,
            // this thread transforms tensors into buffers (in parallel across the cores), and a
            // writer goes through each file front to back, copying untouched runs and writing
            // finished tensors, so the disk stays busy while the cores compute. The channels are
            // bounded: memory holds a few targets' blocks and at most three transformed tensors.
            let (built_tx, built_rx) = std::sync::mpsc::sync_channel::<Result<Built>>(2);
            let (out_tx, out_rx) = std::sync::mpsc::sync_channel::<Result<Vec<u8>>>(1);
            let (pool_tx, pool_rx) = std::sync::mpsc::channel::<Vec<u8>>();
            let steps = &steps;
            s.spawn(move || {
                for step in steps {
                    if let Step::Work(_, _, a) = step {
                        if stop() || built_tx.send(self.build(a)).is_err() {
                            return;
                        }
                    }
                }
            });
            let (outs, fail) = (&outs, &fail);
            // Each file is fsynced as soon as its last byte is written, on a thread of its own,
            // so that flushing one file overlaps the work on the next.
            let (sync_tx, sync_rx) = std::sync::mpsc::channel::<usize>();
            s.spawn(move || {
                for fi in sync_rx {
                    let o = &outs[fi];
                    if let Err(e) = o.dst.sync_all() {
                        fail(Error::io(&o.dst_path, e));
                        return;
                    }
                }
            });
            let last_step: Vec<usize> = (0..outs.len())
                .map(|fi| {
                    steps
                        .iter()
                        .rposition(|st| match st {
                            Step::Copy(r) => r.file == fi,
                            Step::Work(f, _, _) => *f == fi,
                        })
                        .unwrap_or(usize::MAX)
                })
                .collect();
            s.spawn(move || {
                // Files without tensors are complete already.
                for (fi, &l) in last_step.iter().enumerate() {
                    if l == usize::MAX {
                        let _ = sync_tx.send(fi);
                    }
                }
                let mut done = out_rx.into_iter();
                for (si, step) in steps.iter().enumerate() {
                    if stop() {
                        return;
                    }
                    let res = match step {
                        Step::Copy(r) => copy_range(&outs[r.file], r.start, r.len, &stop, &|n| {
                            bar.advance(n as u64)
                        }),
                        Step::Work(fi, t, _) => match done.next() {
                            Some(Ok(bytes)) => {
                                let o = &outs[*fi];
                                let off = (o.src.data_offset + t.start) as u64;
                                let r = o
                                    .dst
                                    .write_all_at(&bytes, off)
                                    .map_err(|e| Error::io(&o.dst_path, e));
                                start_writeback(&o.dst, off, bytes.len());
                                bar.advance(bytes.len() as u64);
                                let _ = pool_tx.send(bytes);
                                r
                            }
                            Some(Err(e)) => Err(e),
                            None => return,
                        },
                    };
                    if let Err(e) = res {
                        fail(e);
                        return;
                    }
                    if let Some(fi) = last_step.iter().position(|&l| l == si) {
                        let _ = sync_tx.send(fi);
                    }
                }
            });
            let mut built = built_rx.into_iter();
            for step in steps {
                let Step::Work(fi, t, _) = step else {
                    continue;
                };
                if stop() {
                    break;
                }
                let mut buf = pool_rx.try_recv().unwrap_or_default();
                buf.resize(t.end - t.start, 0);
                let o = &outs[*fi];
                // The builder ends early only when stopping.
                let Some(b) = built.next() else {
                    break;
                };
                let res = b
                    .and_then(|b| tensor_bytes(o, t, &b, backend, &stop, &mut buf))
                    .map(|()| buf);
                let failed = res.is_err();
                if out_tx.send(res).is_err() || failed {
                    break;
                }
            }
            drop(out_tx);
        });
        bar.finish();
        if let Some(e) = first_err.into_inner().unwrap() {
            return Err(e);
        }
        output::check_interrupted()?;
        Ok(stats)
    }
}

/// Reserve the whole file up front so a full disk fails before any work, where the filesystem
/// supports it; otherwise size it and let the writes report ENOSPC.
fn reserve(f: &File, len: u64) -> std::io::Result<()> {
    // SAFETY: plain syscall on an owned, open descriptor.
    let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len as libc::off_t) };
    match rc {
        0 => Ok(()),
        libc::EOPNOTSUPP | libc::EINVAL => f.set_len(len),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

const COPY_CHUNK: usize = 64 << 20;

/// Ask the kernel to start writing a range out now. Without this, dirty pages pile up until the
/// final fsync, which then writes the whole output while nothing else happens; with it the disk
/// works while the transforms run, and the fsync at the end finds little left. Advisory: errors
/// are left to the fsync.
fn start_writeback(f: &File, off: u64, len: usize) {
    // SAFETY: plain syscall on an open descriptor; it reads no memory of ours.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            off as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

fn copy_range(
    o: &OutFile,
    start: usize,
    len: usize,
    stop: &dyn Fn() -> bool,
    progress: &dyn Fn(usize),
) -> Result<()> {
    let base = o.src.data_offset + start;
    // The file that was mapped and checked, not whatever its path names by now.
    let Some(src_file) = o.src.handle() else {
        let bytes = &o.src.bytes()[base..base + len];
        progress(len);
        return o
            .dst
            .write_all_at(bytes, base as u64)
            .map_err(|e| Error::io(&o.dst_path, e));
    };
    let mut done = 0usize;
    while done < len {
        if stop() {
            return Ok(());
        }
        let want = (len - done).min(COPY_CHUNK);
        let mut off_in = (base + done) as libc::loff_t;
        let mut off_out = (base + done) as libc::loff_t;
        // SAFETY: both descriptors are open for the duration of the call; offsets are passed by
        // pointer to locals, so the files' own positions are untouched.
        let n = unsafe {
            libc::copy_file_range(
                src_file.as_raw_fd(),
                &mut off_in,
                o.dst.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        let copied = if n > 0 {
            n as usize
        } else {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // Not supported across these files: fall back to writing from the map.
                Some(libc::EXDEV)
                | Some(libc::ENOSYS)
                | Some(libc::EINVAL)
                | Some(libc::EOPNOTSUPP)
                | None => {
                    let bytes = &o.src.bytes()[base + done..base + done + want];
                    o.dst
                        .write_all_at(bytes, (base + done) as u64)
                        .map_err(|e| Error::io(&o.dst_path, e))?;
                    want
                }
                _ if n == 0 => {
                    return Err(err(
                        Class::Io,
                        &o.src.path,
                        "file shrank while being copied",
                    ))
                }
                _ => return Err(Error::io(&o.dst_path, e)),
            }
        };
        start_writeback(&o.dst, (base + done) as u64, copied);
        done += copied;
        progress(copied);
    }
    Ok(())
}

/// Elements per work chunk: large enough for efficient block GEMMs, small enough to stay in cache.
const CHUNK_ELEMS: usize = 1 << 17;

/// The output bytes of one targeted tensor, into `out` (its size).
fn tensor_bytes(
    o: &OutFile,
    t: &TensorInfo,
    b: &Built,
    backend: &dyn Backend,
    stop: &(dyn Fn() -> bool + Sync),
    out: &mut [u8],
) -> Result<()> {
    let src = o.src.data(t);
    match b {
        // Checked chunk by chunk, while each is in cache.
        Built::Rows(chain) => rows_into(o, t, src, chain, backend, stop, out),
        Built::Columns(slices, cols) => {
            let w = columns_f32(t, src, slices, *cols, backend)?;
            dtype::encode_f32(t.dtype, &w, out);
            safe_merge(o, t, 0, src, out)
        }
        Built::Replace(r) => {
            if r.dtype == t.dtype {
                out.copy_from_slice(&r.data);
            } else {
                let v = dtype::decode_any_f32(r.dtype, &r.data).expect("float replacement");
                dtype::encode_f32(t.dtype, &v, out);
            }
            safe_merge(o, t, 0, src, out)
        }
    }
}

/// PEFT's `safe_merge`, element by element: refuse an output tensor that holds NaN or ±Inf where
/// the base held a finite value (a huge `--strength`, an `--unmerge` by a scale near zero, or a
/// value past the dtype's range once rounded). `base` and `out` are the encoded bytes of the same
/// elements, the first of which is element `first` of the tensor.
fn safe_merge(o: &OutFile, t: &TensorInfo, first: usize, base: &[u8], out: &[u8]) -> Result<()> {
    match dtype::first_new_non_finite(t.dtype, base, out) {
        None => Ok(()),
        Some((i, b, v)) => Err(err(
            Class::NonFinite,
            &o.src.path,
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

/// `rows_chunked`, encoding each chunk into its place in `out` (the tensor's bytes).
fn rows_into(
    o: &OutFile,
    t: &TensorInfo,
    src: &[u8],
    chain: &Chain,
    backend: &dyn Backend,
    stop: &(dyn Fn() -> bool + Sync),
    out: &mut [u8],
) -> Result<()> {
    let esize = t.dtype.float_size().expect("checked at planning");
    let row_bytes = chain.n * esize;
    let chunk_rows = chunk_rows(t, chain, backend);
    out.par_chunks_mut(chunk_rows * row_bytes)
        .enumerate()
        .try_for_each(|(c, dst)| {
            if stop() {
                return Ok(());
            }
            let r0 = c * chunk_rows;
            with_chunk(
                t,
                src,
                chain,
                backend,
                r0,
                r0 + dst.len() / row_bytes,
                |x, _| {
                    dtype::encode_f32(t.dtype, x, dst);
                    let base = &src[r0 * row_bytes..r0 * row_bytes + dst.len()];
                    safe_merge(o, t, r0 * chain.n, base, dst)
                },
            )
        })
}

fn chunk_rows(t: &TensorInfo, chain: &Chain, backend: &dyn Backend) -> usize {
    let rows = t.shape[0];
    (backend.chunk_elems().max(CHUNK_ELEMS) / chain.n).clamp(1, rows.max(1))
}

/// Decode rows `r0..r1`, apply the chain, hand the f32 result (and a reusable byte buffer) to
/// `f`, with per-thread buffers.
fn with_chunk(
    t: &TensorInfo,
    src: &[u8],
    chain: &Chain,
    backend: &dyn Backend,
    r0: usize,
    r1: usize,
    f: impl FnOnce(&[f32], &mut Vec<u8>) -> Result<()>,
) -> Result<()> {
    let esize = t.dtype.float_size().expect("checked at planning");
    let n = chain.n;
    let body = |(scratch, x, bytes): &mut (Scratch, Vec<f32>, Vec<u8>)| {
        x.resize((r1 - r0) * n, 0.0);
        dtype::decode_f32(t.dtype, &src[r0 * n * esize..r1 * n * esize], x);
        backend.apply(chain, x, r0, r1 - r0, scratch)?;
        f(x, bytes)
    };
    // A backend that itself uses rayon may run another chunk on this thread while the buffers
    // are borrowed; that chunk gets buffers of its own.
    WORK.with(|w| match w.try_borrow_mut() {
        Ok(mut g) => body(&mut g),
        Err(_) => body(&mut Default::default()),
    })
}

/// Transform an input-side tensor in row chunks, in parallel, handing each finished chunk (its
/// first row and its f32 values) to `sink` with a reusable byte buffer. Memory stays at a few
/// chunks per thread whatever the tensor's size.
fn rows_chunked(
    t: &TensorInfo,
    src: &[u8],
    chain: &Chain,
    backend: &dyn Backend,
    stop: &(dyn Fn() -> bool + Sync),
    sink: impl Fn(usize, &[f32], &mut Vec<u8>) -> Result<()> + Sync,
) -> Result<()> {
    let rows = t.shape[0];
    let chunk_rows = chunk_rows(t, chain, backend);
    (0..rows.div_ceil(chunk_rows))
        .into_par_iter()
        .try_for_each(|c| -> Result<()> {
            if stop() {
                return Ok(());
            }
            let r0 = c * chunk_rows;
            let r1 = (r0 + chunk_rows).min(rows);
            with_chunk(t, src, chain, backend, r0, r1, |x, bytes| {
                sink(r0, x, bytes)
            })
        })
}

thread_local! {
    /// Per-thread buffers that live as long as the worker thread: rayon's `*_init` helpers make
    /// fresh ones for every work split, and faulting in and zeroing megabytes of new pages per
    /// split cost more than the arithmetic.
    static WORK: std::cell::RefCell<(Scratch, Vec<f32>, Vec<u8>)> =
        std::cell::RefCell::new((Scratch::default(), Vec::new(), Vec::new()));
}

/// Output-side transforms mix rows, so each row slice is handled as column vectors: the slice
/// is transposed (one vector per column), transformed in parallel batches, and transposed back.
/// Returns the whole tensor in f32; memory is bounded by the targeted tensor, not the model.
fn columns_f32(
    t: &TensorInfo,
    src: &[u8],
    slices: &[((usize, usize), Chain)],
    view_cols: Option<usize>,
    backend: &dyn Backend,
) -> Result<Vec<f32>> {
    let cols: usize = view_cols.unwrap_or_else(|| t.shape[1..].iter().product());
    let mut w = dtype::decode_any_f32(t.dtype, src).expect("float tensor");
    for ((a, b), chain) in slices {
        // A cropped transform (chain.n > b − a) acts on columns padded with zeros.
        let (m, n) = (b - a, chain.n);
        let mut xt = vec![0f32; n * cols];
        for i in 0..m {
            for c in 0..cols {
                xt[c * n + i] = w[(a + i) * cols + c];
            }
        }
        let batch = (CHUNK_ELEMS / n).clamp(1, cols.max(1)) * n;
        xt.par_chunks_mut(batch).enumerate().try_for_each_init(
            || (Scratch::default(), Vec::<f32>::new()),
            |(scratch, x), (ci, chunk)| -> Result<()> {
                x.clear();
                x.extend_from_slice(chunk);
                // Each column is a vector: a per-vector scale is indexed by column.
                backend.apply(chain, x, ci * batch / n, chunk.len() / n, scratch)?;
                chunk.copy_from_slice(x);
                Ok(())
            },
        )?;
        for i in 0..m {
            for c in 0..cols {
                w[(a + i) * cols + c] = xt[c * n + i];
            }
        }
    }
    Ok(w)
}

/// Resolve every target's name against the base (`crate::names`) and fit it to its base
/// tensor (the count of shared blocks, crops; see `Target::fit`).
pub fn fit(base: &Checkpoint, adapter: &mut Adapter) -> Result<()> {
    fit_with(base, adapter, true)
}

/// `fit`, leaving names that resolve to no tensor (or to several) as they are when not `strict`.
pub fn fit_with(base: &Checkpoint, adapter: &mut Adapter, strict: bool) -> Result<()> {
    fit_in(base, adapter, strict, None)
}

/// `fit_with`, resolving names only among the tensors of one component (`--component`).
pub fn fit_in(
    base: &Checkpoint,
    adapter: &mut Adapter,
    strict: bool,
    component: Option<&str>,
) -> Result<()> {
    crate::names::resolve_in(base, adapter, strict, component)?;
    for t in &mut adapter.targets {
        if let Some((_, info)) = base.get(&t.name) {
            t.fit(info.dtype, &info.shape)
                .map_err(|e| e.at(&base.root))?;
        } else if t.share && t.blocks == 0 {
            // Not resolved (allowed when not strict), yet the blocks cannot be counted without
            // it: say so, rather than later asking for the --base that was given.
            return Err(err(
                Class::MissingTarget,
                &base.root,
                format!(
                    "{}: not in the base checkpoint, and its shared blocks (block_share) take \
                     their count from that tensor",
                    t.name
                ),
            ));
        }
    }
    // Resolving may have made two source names one tensor, and fitting sets crops and counts.
    adapter.validate().map_err(|e| e.at(&base.root))
}

/// Check every target against the base and record the base shape in it (for `boft-convert --base`).
pub fn resolve_shapes(
    base: &Checkpoint,
    adapter: &mut Adapter,
    component: Option<&str>,
) -> Result<()> {
    fit_in(base, adapter, true, component)?;
    plan(base, adapter, Direction::Merge)?;
    for t in &mut adapter.targets {
        if let Some((_, info)) = base.get(&t.name) {
            t.shape = Some(info.shape.clone());
        }
    }
    Ok(())
}

/// The whole merge as the command line runs it: check destination, plan, stage, execute, commit.
pub fn merge_to(
    base: &Checkpoint,
    adapter: &Adapter,
    dest: &Path,
    inputs: &[&Path],
    force: bool,
    backend: &dyn Backend,
    opts: &Options,
) -> Result<Stats> {
    // The base's own files count as inputs too: some may be symlinks to elsewhere.
    let base_files = base.input_paths();
    let all: Vec<PathBuf> = inputs
        .iter()
        .copied()
        .chain(base_files.iter().map(PathBuf::as_path))
        .flat_map(crate::formats::read_alongside)
        .collect();
    let all: Vec<&Path> = all.iter().map(PathBuf::as_path).collect();
    output::check_destination(dest, &all, force)?;
    let mut plan = plan(base, adapter, opts.direction)?;
    plan.strength = opts.strength;
    let staged = if base.is_folder() {
        Staged::dir(dest)?
    } else {
        Staged::file(dest)?
    };
    let stats = plan
        .execute(&staged, backend, opts)
        .map_err(|e| staged.blame_dest(e))?;
    staged.commit()?;
    Ok(stats)
}
