//! The streaming writer: every file of the base written to one or more outputs front to back at
//! the base's offsets, untouched runs copied, targeted tensors transformed (`apply`), with a
//! builder computing blocks ahead, the cores transforming, and a writer keeping the disks busy.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::checkpoint::{Checkpoint, SafeFile, TensorInfo};
use crate::error::{err, Class, Error, Result};
use crate::output::{self, Staged};

use super::apply::{chunk_elems, tensor_bytes, Built, Source};
use super::{Action, Backend, Plan, Progress, Stats};

/// Targets whose chains the builder makes at once.
const BUILD_TOGETHER: usize = 4;

/// At most this many tensors are transformed at once (`streamed_together`).
const MAX_TOGETHER: usize = 16;

/// Elements of streamed tensors worth transforming together: two chunks for every worker.
fn streamed_together(backend: &dyn Backend) -> usize {
    2 * rayon::current_num_threads() * chunk_elems(backend)
}

fn numel(t: &TensorInfo) -> usize {
    t.shape.iter().product()
}

/// One output file being written at the same offsets as its input.
pub(super) struct OutFile<'a> {
    /// The plan (of those `write` is given) whose result this file holds.
    job: usize,
    /// Which file of the base it is.
    file: usize,
    src: &'a SafeFile,
    dst: File,
    dst_path: PathBuf,
    /// Held by whoever writes a transformed chunk (`tensor_bytes`'s sink).
    write_lock: Mutex<()>,
}

impl<'a> OutFile<'a> {
    /// Make `dst` (new and empty) the output of file `file` of `base` for plan `job`: its whole
    /// length reserved (`sparse`: what earlier outputs of this merge promised on tmpfs, see
    /// `reserve`) and the base's header written.
    pub(super) fn new(
        base: &'a Checkpoint,
        job: usize,
        file: usize,
        dst: File,
        dst_path: PathBuf,
        sparse: &mut Sparse,
    ) -> Result<OutFile<'a>> {
        let f = &base.files[file].1;
        reserve(&dst, f.len() as u64, sparse).map_err(|e| Error::io(&dst_path, e))?;
        dst.write_all_at(f.header_bytes(), 0)
            .map_err(|e| Error::io(&dst_path, e))?;
        Ok(OutFile {
            job,
            file,
            src: f,
            dst,
            dst_path,
            write_lock: Mutex::new(()),
        })
    }
}

/// One piece of an output, in file and offset order.
enum Step<'a> {
    Copy(CopyRun),
    /// Output file `out` gets tensor `t` as plan `job` makes it.
    Work {
        out: usize,
        job: usize,
        t: &'a TensorInfo,
        action: &'a Action<'a>,
    },
}

impl Step<'_> {
    fn out(&self) -> usize {
        match self {
            Step::Copy(r) => r.out,
            Step::Work { out, .. } => *out,
        }
    }
}

/// Contiguous run of untouched tensors to copy verbatim into output file `out`.
struct CopyRun {
    out: usize,
    start: usize,
    len: usize,
}

/// Create every file of `base` under `staged` (headers written, data reserved) for plan `job`,
/// and copy the folder's other files.
fn open_outputs<'a>(
    base: &'a Checkpoint,
    job: usize,
    staged: &Staged,
    sparse: &mut Sparse,
) -> Result<Vec<OutFile<'a>>> {
    let mut outs = Vec::with_capacity(base.files.len());
    for (fi, (rel, _)) in base.files.iter().enumerate() {
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
        outs.push(OutFile::new(base, job, fi, dst, path, sparse)?);
    }
    copy_others(base, staged)?;
    Ok(outs)
}

/// Copy the base folder's files other than its weights (configs, the index, tokenizer files)
/// into a staged folder; nothing for a single-file base.
pub(super) fn copy_others(base: &Checkpoint, staged: &Staged) -> Result<()> {
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
    Ok(())
}

/// Write every plan's output under its staged name, all from one pass over the base (the plans
/// share it): each tensor is read once and written to every output before the next, untouched
/// runs copied in pieces of at most `COPY_CHUNK` between outputs so that what one output reads
/// is still cached for the next. Returns each output's statistics.
pub(super) fn execute(
    jobs: &[(&Plan, &Staged)],
    backend: &dyn Backend,
    bar: &dyn Progress,
) -> Result<Vec<Stats>> {
    let base = jobs[0].0.base;
    let mut outs = Vec::with_capacity(jobs.len() * base.files.len());
    let mut sparse = Sparse::default();
    for (j, (_, staged)) in jobs.iter().enumerate() {
        outs.extend(open_outputs(base, j, staged, &mut sparse)?);
    }
    let plans: Vec<&Plan> = jobs.iter().map(|(p, _)| *p).collect();
    let dests: Vec<&Path> = jobs.iter().map(|(_, s)| s.dest()).collect();
    write(&plans, &dests, outs, backend, bar, &|_| Ok(()))
}

/// Write `outs` (any files of the base, for any of `plans`, each output file at most once) in
/// one pass over the base, as `execute` does; `dests` name each plan's output in messages.
/// `done(i)` runs once `outs[i]` is complete and synced, while the others are still written.
/// Returns each plan's statistics over the files it was given.
pub(super) fn write(
    plans: &[&Plan],
    dests: &[&Path],
    outs: Vec<OutFile>,
    backend: &dyn Backend,
    bar: &dyn Progress,
    done: &(dyn Fn(usize) -> Result<()> + Sync),
) -> Result<Vec<Stats>> {
    let base = plans[0].base;
    debug_assert!(plans.iter().all(|p| std::ptr::eq(p.base, base)));
    // The outputs of each base file, in plan order.
    let mut by_file: Vec<Vec<usize>> = vec![Vec::new(); base.files.len()];
    for (o, out) in outs.iter().enumerate() {
        by_file[out.file].push(o);
    }

    // Every output file is written front to back in one stream (untouched runs copied, targeted
    // tensors transformed, in offset order) so that writeback stays sequential.
    let cap = if plans.len() > 1 {
        COPY_CHUNK
    } else {
        usize::MAX
    };
    let mut steps: Vec<Step> = Vec::new();
    let mut last: Vec<Option<usize>> = vec![None; outs.len()];
    let mut stats: Vec<Stats> = (0..plans.len())
        .map(|_| Stats {
            left_out: base.left_out.clone(),
            ..Stats::default()
        })
        .collect();
    for (fi, (_, f)) in base.files.iter().enumerate() {
        for t in &f.tensors {
            for &out in &by_file[fi] {
                let j = outs[out].job;
                let plan = plans[j];
                let st = &mut stats[j];
                st.bytes += (t.end - t.start) as u64;
                if let Some(action) = plan.action(&t.name) {
                    if action.groups.is_empty() {
                        st.replaced += 1;
                    } else {
                        st.transformed += 1;
                    }
                    last[out] = Some(steps.len());
                    steps.push(Step::Work {
                        out,
                        job: j,
                        t,
                        action,
                    });
                    continue;
                }
                st.copied += 1;
                if let Some(Step::Copy(r)) = last[out].map(|i| &mut steps[i]) {
                    if r.start + r.len == t.start && r.len < cap {
                        r.len += t.end - t.start;
                        continue;
                    }
                }
                last[out] = Some(steps.len());
                steps.push(Step::Copy(CopyRun {
                    out,
                    start: t.start,
                    len: t.end - t.start,
                }));
            }
        }
    }

    bar.start(stats.iter().map(|s| s.bytes).sum());
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
        let (built_tx, built_rx) = std::sync::mpsc::sync_channel(2);
        // A transformed tensor's bytes, or None when its chunks were written as they were made
        // (`tensor_bytes`).
        let (out_tx, out_rx) = std::sync::mpsc::sync_channel::<Result<Option<Vec<u8>>>>(1);
        let (pool_tx, pool_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let steps = &steps;
        s.spawn(move || {
            use rayon::prelude::*;
            let works: Vec<(usize, &Action)> = steps
                .iter()
                .filter_map(|s| match s {
                    Step::Work { job, action, .. } => Some((*job, *action)),
                    Step::Copy(_) => None,
                })
                .collect();
            // Several targets at a time: one target's Cayley transforms are a few tasks (b = 256
            // and 4 factors on 2048 features: 4 groups of 8 blocks), too few to keep a
            // many-core machine busy while a GPU does the product.
            for group in works.chunks(BUILD_TOGETHER) {
                if stop() {
                    return;
                }
                let built: Vec<_> = group
                    .par_iter()
                    .map(|(job, action)| plans[*job].build(action))
                    .collect();
                for b in built {
                    if built_tx.send(b).is_err() {
                        return;
                    }
                }
            }
        });
        let (outs, fail, done) = (&outs, &fail, done);
        // Each file is fsynced as soon as its last byte is written, on a thread of its own,
        // so that flushing one file overlaps the work on the next.
        let (sync_tx, sync_rx) = std::sync::mpsc::channel::<usize>();
        // And handed to `done` on another thread, so that what it does (a unit hashes the file)
        // overlaps the next file's sync.
        let (done_tx, done_rx) = std::sync::mpsc::channel::<usize>();
        s.spawn(move || {
            for fi in sync_rx {
                let o = &outs[fi];
                if let Err(e) = o.dst.sync_all() {
                    fail(Error::io(&o.dst_path, e));
                    return;
                }
                let _ = done_tx.send(fi);
            }
        });
        s.spawn(move || {
            for fi in done_rx {
                if let Err(e) = done(fi) {
                    fail(e);
                    return;
                }
            }
        });
        s.spawn(move || {
            // Files without tensors are complete already.
            for (fi, l) in last.iter().enumerate() {
                if l.is_none() {
                    let _ = sync_tx.send(fi);
                }
            }
            let mut done = out_rx.into_iter();
            for (si, step) in steps.iter().enumerate() {
                if stop() {
                    return;
                }
                let res = match step {
                    Step::Copy(r) => copy_range(&outs[r.out], r.start, r.len, &stop, &|n| {
                        bar.advance(n as u64)
                    }),
                    Step::Work { out, t, .. } => match done.next() {
                        Some(Ok(bytes)) => {
                            let o = &outs[*out];
                            let off = (o.src.data_offset + t.start) as u64;
                            let len = t.end - t.start;
                            let r = match bytes {
                                Some(bytes) => {
                                    let r = o
                                        .dst
                                        .write_all_at(&bytes, off)
                                        .map_err(|e| Error::io(&o.dst_path, e));
                                    let _ = pool_tx.send(bytes);
                                    r
                                }
                                None => Ok(()),
                            };
                            start_writeback(&o.dst, off, len);
                            bar.advance(len as u64);
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
                if last[step.out()] == Some(si) {
                    let _ = sync_tx.send(step.out());
                }
            }
        });
        let mut built = built_rx.into_iter();
        // A buffer a streamed tensor did not need, kept for the next whole one.
        let mut spare: Option<Vec<u8>> = None;
        // The bytes of one tensor: streamed into its output (None) or made whole in `buf`.
        let transform =
            |out: usize, t: &TensorInfo, job: usize, b: Result<Built>, buf: &mut Vec<u8>| {
                let o = &outs[out];
                let src = o.src;
                let base_off = src.data_offset + t.start;
                // One writer at a time: the kernel serialises writes to a file on its inode lock,
                // and a second thread spins on that lock (15% of a merge's CPU in a profile) where
                // it sleeps on this one.
                let sink = |at: usize, bytes: &[u8]| {
                    let _one = o.write_lock.lock().unwrap_or_else(|p| p.into_inner());
                    o.dst
                        .write_all_at(bytes, (base_off + at) as u64)
                        .map_err(|e| Error::io(&o.dst_path, e))
                };
                b.and_then(|b| {
                    let source = Source::of(src, t);
                    tensor_bytes(&src.path, t, source, &b, backend, &stop, buf, &sink)
                })
                .map_err(|mut e| {
                    // In a batch, say whose merge it was.
                    if plans.len() > 1 {
                        let dest = dests[job].display();
                        e.message = format!("{} (job {}, output {dest})", e.message, job + 1);
                    }
                    e
                })
            };
        let works: Vec<(usize, &TensorInfo, usize, &Action)> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Work {
                    out,
                    t,
                    job,
                    action,
                } => Some((*out, *t, *job, *action)),
                Step::Copy(_) => None,
            })
            .collect();
        // Streamed tensors too small to keep every worker busy are transformed several at once
        // (each still in row chunks across the cores): one at a time, a 1024 × 1024 tensor is
        // a few chunks, fewer than a many-core machine has cores, and on a device each is a
        // batch whose round trip the others could overlap.
        let together = streamed_together(backend);
        let mut k = 0;
        while k < works.len() {
            if stop() {
                break;
            }
            let mut end = k + 1;
            let mut elems = numel(works[k].1);
            while end < works.len()
                && end - k < MAX_TOGETHER
                && works[k].3.streams()
                && works[end].3.streams()
                && elems + numel(works[end].1) <= together
            {
                elems += numel(works[end].1);
                end += 1;
            }
            let results: Vec<Result<Option<Vec<u8>>>> = if end - k == 1 {
                let (out, t, job, _) = works[k];
                let mut buf = spare
                    .take()
                    .or_else(|| pool_rx.try_recv().ok())
                    .unwrap_or_default();
                // The builder ends early only when stopping.
                let Some(b) = built.next() else {
                    break;
                };
                vec![transform(out, t, job, b, &mut buf).map(|streamed| {
                    if streamed {
                        spare = Some(buf);
                        None
                    } else {
                        Some(buf)
                    }
                })]
            } else {
                let Some(bs) = (k..end).map(|_| built.next()).collect::<Option<Vec<_>>>() else {
                    break;
                };
                use rayon::prelude::*;
                works[k..end]
                    .par_iter()
                    .zip(bs)
                    .map(|(&(out, t, job, _), b)| {
                        // Every one of them streams: nothing comes back to write.
                        transform(out, t, job, b, &mut Vec::new()).map(|_| None)
                    })
                    .collect()
            };
            k = end;
            let mut failed = false;
            for r in results {
                failed = r.is_err();
                if out_tx.send(r).is_err() || failed {
                    break;
                }
            }
            if failed {
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

/// Bytes of outputs sized sparse on tmpfs so far, by device: the free space each later one is
/// checked against must leave room for them too.
#[derive(Default)]
pub(super) struct Sparse(HashMap<u64, u64>);

/// Reserve the whole file up front so a full disk fails before any work, where the filesystem
/// supports it; otherwise size it and let the writes report ENOSPC.
fn reserve(f: &File, len: u64, sparse: &mut Sparse) -> std::io::Result<()> {
    // On tmpfs a reservation allocates and zeroes every page before the first byte is written:
    // a tenth of a second per 250 MB, on one thread, ahead of all the work (a fifth of a merge
    // in RAM). The free space is checked instead (less what earlier outputs of this merge will
    // take), and the file sized sparse.
    // SAFETY: plain syscalls on an owned, open descriptor, into a zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) } == 0 && st.f_type == libc::TMPFS_MAGIC {
        use std::os::unix::fs::MetadataExt;
        let promised = sparse.0.entry(f.metadata()?.dev()).or_default();
        let free = (st.f_bavail as u64).saturating_mul(st.f_bsize as u64);
        let need = promised.saturating_add(len);
        // f_blocks 0: a tmpfs without a size limit.
        if st.f_blocks != 0 && free < need {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        *promised = need;
        return f.set_len(len);
    }
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
