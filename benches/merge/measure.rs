//! Running one command as a child process and measuring it: wall time, CPU time, peak resident
//! memory (the kernel's own `ru_maxrss`) and peak anonymous memory (the largest `RssAnon` seen by
//! sampling `/proc/<pid>/status`). Also the page-cache controls and the floor copies.

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
    pub stdout: String,
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
pub fn run(cmd: &mut Command, every: Duration, log: &Path) -> Result<Sample> {
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
            let path = format!("/proc/{pid}/status");
            let (mut anon, mut rss, mut hwm, mut n) = (0u64, 0u64, 0u64, 0u64);
            let mut waits: std::collections::HashMap<String, u64> = Default::default();
            let tasks = format!("/proc/{pid}/task");
            while !stop.load(Ordering::Relaxed) {
                if let Ok(dir) = fs::read_dir(&tasks) {
                    for e in dir.flatten() {
                        let tid = e.file_name().to_string_lossy().into_owned();
                        if let Ok(st) = fs::read_to_string(e.path().join("schedstat")) {
                            if let Some(w) =
                                st.split_whitespace().nth(1).and_then(|x| x.parse().ok())
                            {
                                waits.insert(tid, w);
                            }
                        }
                    }
                }
                if let Ok(s) = fs::read_to_string(&path) {
                    if let Some(a) = status_kib(&s, "RssAnon:") {
                        anon = anon.max(a);
                        n += 1;
                    }
                    if let Some(r) = status_kib(&s, "VmRSS:") {
                        rss = rss.max(r);
                    }
                    if let Some(h) = status_kib(&s, "VmHWM:") {
                        hwm = hwm.max(h);
                    }
                }
                std::thread::sleep(every);
            }
            (anon, rss, hwm, n, waits.values().sum::<u64>())
        })
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
    let (anon, rss, hwm, n, wait_ns) = sampler.join().unwrap();
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
        max_rss_kib: hwm,
        ru_maxrss_kib: ru.ru_maxrss as u64,
        peak_anon_kib: anon,
        peak_rss_sampled_kib: rss,
        samples: n,
        runq_wait_s: wait_ns as f64 * 1e-9,
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
    /// Destination folder (or file); must not exist.
    pub dst: PathBuf,
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

/// The `copy` subcommand: copy every file of `src` to `dst`, fsync each, print bytes copied.
pub fn copy_main(a: CopyArgs) -> Result<()> {
    let files = files_under(&a.src)?;
    let single = a.src.is_file();
    if !single {
        fs::create_dir(&a.dst).with_context(|| format!("create {}", a.dst.display()))?;
    }
    let mut buf = vec![0u8; a.buf_kib.max(4) << 10];
    let mut total = 0u64;
    for f in files {
        let to = if single {
            a.dst.clone()
        } else {
            let rel = f.strip_prefix(&a.src)?;
            let to = a.dst.join(rel);
            if let Some(p) = to.parent() {
                fs::create_dir_all(p)?;
            }
            to
        };
        let mut s = File::open(&f)?;
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
    println!("{total}");
    Ok(())
}
