//! A mapped input that another process truncates faults (SIGBUS) on the next read of a page past
//! its new end; no check made before the read can exclude it. The merge reads mapped files, so
//! the fault is turned into the error contract instead: mapped ranges (with the file each holds)
//! and staged outputs are registered here, and the handler the binaries install names the file in
//! one `[io]` line, removes every staged output and exits with status 2.
//!
//! The handler runs inside a signal: it only loads atomics and makes async-signal-safe system
//! calls (write, unlink, openat, getdents64, unlinkat, _exit). Registration happens outside it, and
//! an unregistered slot is cleared before its memory is freed.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};

/// Mapped files registered at once (a checkpoint of 4 200 shards is not absurd; the table is
/// 384 KiB of zeros). Past this a fault is still turned into the error line and the cleanup, only
/// without the file's name.
const MAP_SLOTS: usize = 16384;
/// Staged outputs registered at once (a run has one).
const STAGED_SLOTS: usize = 64;

struct MapSlot {
    start: AtomicUsize,
    end: AtomicUsize,
    path: AtomicPtr<libc::c_char>,
}

struct StagedSlot {
    path: AtomicPtr<libc::c_char>,
    is_dir: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_MAP: MapSlot = MapSlot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    path: AtomicPtr::new(std::ptr::null_mut()),
};
#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_STAGED: StagedSlot = StagedSlot {
    path: AtomicPtr::new(std::ptr::null_mut()),
    is_dir: AtomicBool::new(false),
};

static MAPS: [MapSlot; MAP_SLOTS] = [EMPTY_MAP; MAP_SLOTS];
static STAGED: [StagedSlot; STAGED_SLOTS] = [EMPTY_STAGED; STAGED_SLOTS];
/// `<program>: ` for the line the handler writes.
static PROGRAM: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());

fn c_path(p: &Path) -> *mut libc::c_char {
    // A path with a NUL byte cannot have been opened; it is registered without a name.
    CString::new(p.as_os_str().as_bytes())
        .unwrap_or_default()
        .into_raw()
}

/// Free a registered path once its slot no longer points to it.
fn free(p: *mut libc::c_char) {
    if !p.is_null() {
        // SAFETY: every non-null pointer stored in a slot came from `CString::into_raw`, and it
        // was swapped out of its slot (so it is freed once).
        drop(unsafe { CString::from_raw(p) });
    }
}

/// A mapped range known to the handler until this is dropped.
pub struct MapGuard(Option<usize>);

/// Register `len` mapped bytes at `start` as the contents of `path`.
pub fn register_map(start: *const u8, len: usize, path: &Path) -> MapGuard {
    if len == 0 {
        return MapGuard(None);
    }
    for (i, s) in MAPS.iter().enumerate() {
        if s.start
            .compare_exchange(0, start as usize, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            s.path.store(c_path(path), Ordering::SeqCst);
            s.end.store(start as usize + len, Ordering::SeqCst);
            return MapGuard(Some(i));
        }
    }
    MapGuard(None)
}

impl Drop for MapGuard {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            let s = &MAPS[i];
            s.end.store(0, Ordering::SeqCst);
            free(s.path.swap(std::ptr::null_mut(), Ordering::SeqCst));
            s.start.store(0, Ordering::SeqCst);
        }
    }
}

/// A staged output the handler removes until this is dropped.
pub struct StagedGuard(Option<usize>);

/// Register a staged output (a file, or a folder and everything in it).
pub fn register_staged(path: &Path, is_dir: bool) -> StagedGuard {
    let p = c_path(path);
    for (i, s) in STAGED.iter().enumerate() {
        if s.path
            .compare_exchange(std::ptr::null_mut(), p, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            s.is_dir.store(is_dir, Ordering::SeqCst);
            return StagedGuard(Some(i));
        }
    }
    free(p);
    StagedGuard(None)
}

impl Drop for StagedGuard {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            free(STAGED[i].path.swap(std::ptr::null_mut(), Ordering::SeqCst));
        }
    }
}

/// Install the SIGBUS handler; `program` starts the line it writes. For the binaries: a library
/// embedded elsewhere (the Python module) leaves the process's signals alone.
pub fn install(program: &str) {
    let prefix = CString::new(format!("{program}: ")).unwrap_or_default();
    let old = PROGRAM.swap(prefix.into_raw(), Ordering::SeqCst);
    free(old);
    // SAFETY: a handler with the signature SA_SIGINFO expects, installed with sigaction.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

fn write_all(bytes: &[u8]) {
    let mut rest = bytes;
    while !rest.is_empty() {
        // SAFETY: write(2) on stderr from a valid buffer.
        let n = unsafe { libc::write(2, rest.as_ptr().cast(), rest.len()) };
        if n <= 0 {
            return;
        }
        rest = &rest[n as usize..];
    }
}

/// SAFETY (caller): `p` is null or a NUL-terminated string.
unsafe fn c_bytes<'a>(p: *const libc::c_char) -> &'a [u8] {
    if p.is_null() {
        return &[];
    }
    std::ffi::CStr::from_ptr(p).to_bytes()
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; everything below is an
    // atomic load or an async-signal-safe system call.
    unsafe {
        let addr = (*info).si_addr() as usize;
        let hit = MAPS.iter().find(|s| {
            let (a, b) = (s.start.load(Ordering::SeqCst), s.end.load(Ordering::SeqCst));
            a != 0 && a <= addr && addr < b
        });
        // A SIGBUS in this program comes from a mapped file that shrank: a fault outside the
        // registered ranges (a map past MAP_SLOTS) gets the same cleanup and a line without
        // the file's name.
        for s in &STAGED {
            let p = s.path.load(Ordering::SeqCst);
            if !p.is_null() {
                if s.is_dir.load(Ordering::SeqCst) {
                    remove_tree(p);
                } else {
                    libc::unlink(p);
                }
            }
        }
        write_all(c_bytes(PROGRAM.load(Ordering::SeqCst)));
        match hit {
            Some(slot) => {
                write_all(b"error[io] ");
                write_all(c_bytes(slot.path.load(Ordering::SeqCst)));
                write_all(b": shrank while being read");
            }
            None => write_all(b"error[io] a mapped input file shrank while being read"),
        }
        write_all(b" (truncated by another process?); nothing was written\n");
        libc::_exit(2);
    }
}

/// Remove a folder and everything in it with raw system calls (no allocation, no locks).
unsafe fn remove_tree(path: *const libc::c_char) {
    let fd = libc::open(
        path,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
    );
    if fd >= 0 {
        remove_children(fd, 0);
        libc::close(fd);
    }
    libc::rmdir(path);
}

/// Staged folders are a few levels deep (pipeline components); deeper ones are left to
/// `output::reclaim` on the next run.
const MAX_DEPTH: usize = 16;

unsafe fn remove_children(dir: libc::c_int, depth: usize) {
    if depth > MAX_DEPTH {
        return;
    }
    let mut buf = [0u8; 4096];
    // Removing entries while reading the folder can skip some: read it again until a pass finds
    // nothing left (bounded, in case something cannot be removed).
    for _ in 0..64 {
        libc::lseek(dir, 0, libc::SEEK_SET);
        let mut removed = false;
        loop {
            let n = libc::syscall(libc::SYS_getdents64, dir, buf.as_mut_ptr(), buf.len());
            if n <= 0 {
                break;
            }
            let mut off = 0usize;
            while off < n as usize {
                // struct linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name.
                let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
                let kind = buf[off + 18];
                let name = buf.as_ptr().add(off + 19).cast::<libc::c_char>();
                off += reclen.max(1);
                let bytes = c_bytes(name);
                if bytes == b"." || bytes == b".." {
                    continue;
                }
                if kind == libc::DT_DIR {
                    let sub = libc::openat(
                        dir,
                        name,
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    );
                    if sub >= 0 {
                        remove_children(sub, depth + 1);
                        libc::close(sub);
                    }
                    libc::unlinkat(dir, name, libc::AT_REMOVEDIR);
                } else {
                    libc::unlinkat(dir, name, 0);
                }
                removed = true;
            }
        }
        if !removed {
            return;
        }
    }
}
