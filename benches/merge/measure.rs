//! Running one command as a child process and measuring it: wall time, CPU time, peak resident
//! memory (the kernel's own `ru_maxrss`) and peak anonymous memory (the largest `RssAnon` seen by
//! sampling `/proc/<pid>/status`), and the bytes it read (`/proc/<pid>/io`, read once more after
//! it has exited and before it is reaped). Also the page-cache controls and the floor copies.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub wall_s: f64,
    pub user_s: f64,
    pub sys_s: f64,
    /// Peak resident set (KiB): the largest `VmHWM` (the kernel's high-water mark of this
    /// process image: anonymous + mapped file pages) read from /proc; the last read is at most
    /// one sampling interval before exit.
    pub max_rss_kib: u64,
    /// `ru_maxrss` from wait4 (KiB). Not used in the report: Linux carries the parent's peak over
    /// fork+exec, so a small child reports at least the runner's own size.
    pub ru_maxrss_kib: u64,
    /// Largest RssAnon sampled (KiB): heap, stacks, private buffers; not the page cache.
    pub peak_anon_kib: u64,
    /// Largest VmRSS sampled (KiB), to compare with `max_rss_kib`.
    pub peak_rss_sampled_kib: u64,
    pub samples: u64,
    /// Time the child's threads spent runnable but waiting for a CPU (s): the sum of each
    /// thread's last-sampled `/proc/<pid>/task/<tid>/schedstat` run-queue delay. High when other
    /// processes compete for the cores.
    pub runq_wait_s: f64,
    /// Seconds from spawn to the first byte written (NaN if not tracked): startup — opening the
    /// inputs, loading the adapter, planning.
    pub first_write_s: f64,
    /// Seconds from spawn until every output byte had been handed to the kernel (NaN if not
    /// tracked); the rest of the wall time is fsync + rename + exit.
    pub all_written_s: f64,
    /// `read_bytes` of `/proc/<pid>/io`: bytes the process caused to be fetched from storage
    /// (page-cache misses, memory-mapped ones included); read after the child exited, before it
    /// was reaped (else the last sample). None if /proc did not say.
    pub read_bytes: Option<u64>,
    /// `rchar` of `/proc/<pid>/io`: bytes passed through read-like system calls (read, pread,
    /// copy_file_range, …) whether or not they came from the cache; memory-mapped reads are not
    /// counted.
    pub rchar: Option<u64>,
    pub stdout: String,
}

impl Sample {
    /// Several children run one after another, as one measurement: times, CPU and bytes add up,
    /// memory peaks are the largest; the phases are not tracked.
    pub fn sum(steps: &[Sample]) -> Sample {
        let add = |f: fn(&Sample) -> Option<u64>| -> Option<u64> {
            steps.iter().map(f).sum::<Option<u64>>()
        };
        Sample {
            wall_s: steps.iter().map(|s| s.wall_s).sum(),
            user_s: steps.iter().map(|s| s.user_s).sum(),
            sys_s: steps.iter().map(|s| s.sys_s).sum(),
            max_rss_kib: steps.iter().map(|s| s.max_rss_kib).max().unwrap_or(0),
            ru_maxrss_kib: steps.iter().map(|s| s.ru_maxrss_kib).max().unwrap_or(0),
            peak_anon_kib: steps.iter().map(|s| s.peak_anon_kib).max().unwrap_or(0),
            peak_rss_sampled_kib: steps
                .iter()
                .map(|s| s.peak_rss_sampled_kib)
                .max()
                .unwrap_or(0),
            samples: steps.iter().map(|s| s.samples).sum(),
            runq_wait_s: steps.iter().map(|s| s.runq_wait_s).sum(),
            first_write_s: f64::NAN,
            all_written_s: f64::NAN,
            read_bytes: add(|s| s.read_bytes),
            rchar: add(|s| s.rchar),
            stdout: steps.iter().map(|s| s.stdout.as_str()).collect(),
        }
    }
}

fn status_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find(|l| l.starts_with(key)).and_then(|l| {
        l[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    })
}

/// Run `cmd` to completion, sampling its memory every `every`. Fails if it exits non-zero; its
/// stdout/stderr go to `log` (stdout is also returned).
/// What the sampler thread saw.
#[derive(Default)]
struct Seen {
    anon: u64,
    rss: u64,
    hwm: u64,
    n: u64,
    /// Last run-queue delay per thread id (ns).
    waits: std::collections::HashMap<String, u64>,
    /// Seconds after spawn at which `wchar` first exceeded 0 / reached the expected total.
    first_write: Option<f64>,
    all_written: Option<f64>,
    /// Last `read_bytes` and `rchar` read from `/proc/<pid>/io`.
    read_bytes: Option<u64>,
    rchar: Option<u64>,
}

/// `key` (`read_bytes:`, `rchar:`, …) of a `/proc/<pid>/io` text.
fn io_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

/// Run `cmd` to completion, sampling its memory every `every`. Fails if it exits non-zero; its
/// stdout/stderr go to `log` (stdout is also returned). With `expect_write`, also notes when the
/// child first writes and when it has written that many bytes (`/proc/<pid>/io` `wchar`, which
/// counts write, pwrite and copy_file_range alike), to split its time into phases.
pub fn run(
    cmd: &mut Command,
    every: Duration,
    log: &Path,
    expect_write: Option<u64>,
) -> Result<Sample> {
    let out_path = log.with_extension("out");
    let err_path = log.with_extension("err");
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?);
    let t0 = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let pid = child.id() as libc::pid_t;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let status = format!("/proc/{pid}/status");
            let io = format!("/proc/{pid}/io");
            let tasks = format!("/proc/{pid}/task");
            let mut seen = Seen::default();
            while !stop.load(Ordering::Relaxed) {
                let io_text = fs::read_to_string(&io).ok();
                if let Some(t) = &io_text {
                    seen.read_bytes = io_field(t, "read_bytes:").or(seen.read_bytes);
                    seen.rchar = io_field(t, "rchar:").or(seen.rchar);
                }
                if let Some(total) = expect_write.filter(|_| seen.all_written.is_none()) {
                    if let Some(w) = io_text.as_deref().and_then(|s| io_field(s, "wchar:")) {
                        let t = t0.elapsed().as_secs_f64();
                        if w > 0 && seen.first_write.is_none() {
                            seen.first_write = Some(t);
                        }
                        if w >= total {
                            seen.all_written = Some(t);
                        }
                    }
                }
                if let Ok(dir) = fs::read_dir(&tasks) {
                    for e in dir.flatten() {
                        let tid = e.file_name().to_string_lossy().into_owned();
                        if let Ok(st) = fs::read_to_string(e.path().join("schedstat")) {
                            if let Some(w) =
                                st.split_whitespace().nth(1).and_then(|x| x.parse().ok())
                            {
                                seen.waits.insert(tid, w);
                            }
                        }
                    }
                }
                if let Ok(s) = fs::read_to_string(&status) {
                    if let Some(a) = status_kib(&s, "RssAnon:") {
                        seen.anon = seen.anon.max(a);
                        seen.n += 1;
                    }
                    if let Some(r) = status_kib(&s, "VmRSS:") {
                        seen.rss = seen.rss.max(r);
                    }
                    if let Some(h) = status_kib(&s, "VmHWM:") {
                        seen.hwm = seen.hwm.max(h);
                    }
                }
                std::thread::sleep(every);
            }
            seen
        })
    };
    // Wait for the exit without reaping (WNOWAIT): the zombie's /proc/<pid>/io holds the final
    // totals of all its threads, which the sampler may have read up to one interval early.
    let final_io = loop {
        // SAFETY: an all-zero siginfo_t is a valid value; waitid fills it in.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: plain syscall on our own child's pid with a pointer to a local.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == -1 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        break (r == 0)
            .then(|| fs::read_to_string(format!("/proc/{pid}/io")).ok())
            .flatten();
    };
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it in.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // Reap the child ourselves (std's Child would discard the rusage).
    // SAFETY: plain syscall on our own child's pid with pointers to locals.
    let r = loop {
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == -1 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        break r;
    };
    let wall = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let seen = sampler.join().unwrap();
    drop(child);
    if r != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    let stdout = fs::read_to_string(&out_path).unwrap_or_default();
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        let err = fs::read_to_string(&err_path).unwrap_or_default();
        let tail: Vec<&str> = err.lines().rev().take(15).collect();
        bail!(
            "{cmd:?} failed (status {status:#x}); stderr tail:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Ok(Sample {
        wall_s: wall,
        user_s: tv(ru.ru_utime),
        sys_s: tv(ru.ru_stime),
        max_rss_kib: seen.hwm,
        ru_maxrss_kib: ru.ru_maxrss as u64,
        peak_anon_kib: seen.anon,
        peak_rss_sampled_kib: seen.rss,
        samples: seen.n,
        runq_wait_s: seen.waits.values().sum::<u64>() as f64 * 1e-9,
        first_write_s: seen.first_write.unwrap_or(f64::NAN),
        // Exited before a sample saw the last byte: it wrote until (almost) the end.
        all_written_s: seen
            .all_written
            .or(seen.first_write.map(|_| wall))
            .unwrap_or(f64::NAN),
        read_bytes: final_io
            .as_deref()
            .and_then(|t| io_field(t, "read_bytes:"))
            .or(seen.read_bytes),
        rchar: final_io
            .as_deref()
            .and_then(|t| io_field(t, "rchar:"))
            .or(seen.rchar),
        stdout,
    })
}

/// `sync(2)`: flush every dirty page so the next measurement does not pay for earlier writes.
pub fn sync_all() {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::sync() };
}

/// Drop the page cache (needs root and a writable /proc/sys/vm/drop_caches).
pub fn drop_caches() -> Result<()> {
    sync_all();
    fs::write("/proc/sys/vm/drop_caches", b"3").context("writing /proc/sys/vm/drop_caches")?;
    Ok(())
}

/// Does dropping the page cache work here (root, writable /proc/sys/vm)?
pub fn can_drop_caches() -> bool {
    drop_caches().is_ok()
}

/// Read every file under `paths` so it sits in the page cache.
pub fn prewarm(paths: &[&Path]) -> Result<()> {
    let mut buf = vec![0u8; 8 << 20];
    for p in paths {
        for f in files_under(p)? {
            let mut fh = File::open(&f)?;
            while fh.read(&mut buf)? > 0 {}
        }
    }
    Ok(())
}

pub fn files_under(p: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if p.is_file() {
        out.push(p.to_path_buf());
        return Ok(out);
    }
    let mut entries: Vec<_> = fs::read_dir(p)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        if e.file_type()?.is_dir() {
            out.extend(files_under(&path)?);
        } else {
            out.push(path);
        }
    }
    Ok(out)
}

pub fn remove(p: &Path) -> Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p)?,
        Ok(_) => fs::remove_file(p)?,
        Err(_) => {}
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// The floor: a plain copy of the same files, fsynced like boft-merge fsyncs its outputs.
// ------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CopyMode {
    /// read(2) into a user buffer, write(2) out.
    Rw,
    /// copy_file_range(2) in 64 MiB requests (what boft-merge uses for untouched tensors).
    Cfr,
}

#[derive(Args, Debug)]
pub struct CopyArgs {
    #[arg(long, value_enum)]
    pub mode: CopyMode,
    /// Buffer size for --mode rw, in KiB.
    #[arg(long, default_value_t = 1024)]
    pub buf_kib: usize,
    /// Source folder (or file).
    pub src: PathBuf,
    /// Destination folder (or file); must not exist. Several: the source is copied to each in
    /// turn (the floor for writing that many copies).
    #[arg(required = true)]
    pub dst: Vec<PathBuf>,
}

fn copy_rw(src: &mut File, dst: &mut File, buf: &mut [u8]) -> Result<u64> {
    let mut total = 0;
    loop {
        let n = src.read(buf)?;
        if n == 0 {
            return Ok(total);
        }
        dst.write_all(&buf[..n])?;
        total += n as u64;
    }
}

fn copy_cfr(src: &File, dst: &File, len: u64) -> Result<u64> {
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(64 << 20) as usize;
        // SAFETY: both descriptors are open; null offsets use and advance the file positions.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                std::ptr::null_mut(),
                dst.as_raw_fd(),
                std::ptr::null_mut(),
                want,
                0,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        if n == 0 {
            bail!("source shrank while being copied");
        }
        done += n as u64;
    }
    Ok(done)
}

/// The `copy` subcommand: copy every file of `src` to each `dst` in turn, fsync each file, print
/// the bytes copied.
pub fn copy_main(a: CopyArgs) -> Result<()> {
    let files = files_under(&a.src)?;
    let single = a.src.is_file();
    let mut buf = vec![0u8; a.buf_kib.max(4) << 10];
    let mut total = 0u64;
    for dst in &a.dst {
        if !single {
            fs::create_dir(dst).with_context(|| format!("create {}", dst.display()))?;
        }
        for f in &files {
            let to = if single {
                dst.clone()
            } else {
                let rel = f.strip_prefix(&a.src)?;
                let to = dst.join(rel);
                if let Some(p) = to.parent() {
                    fs::create_dir_all(p)?;
                }
                to
            };
            let mut s = File::open(f)?;
            let mut d = File::options().write(true).create_new(true).open(&to)?;
            total += match a.mode {
                CopyMode::Rw => copy_rw(&mut s, &mut d, &mut buf)?,
                CopyMode::Cfr => {
                    let len = s.metadata()?.len();
                    copy_cfr(&s, &d, len)?
                }
            };
            d.sync_all()?;
        }
    }
    println!("{total}");
    Ok(())
}
