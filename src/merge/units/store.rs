//! The staging folder of a split merge: `.<OUT>.boft-units/` beside the output. Units write
//! their files into `data/` under names of their own and then publish a record for each in
//! `records/` by an atomic rename; finalize reads the records, checks the files they name and
//! links them into the output. Several processes (on several machines, on one shared filesystem)
//! write into it at once, so nothing in it is ever written in place: a record names a file that
//! was complete and synced before the record existed, and the last record renamed wins whole.

use std::ffi::{CStr, CString, OsString};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::{err, Class, Error, Result};
use crate::output::{create_new_at, fd_result, mkdir_at, open_dir_at, try_lock};

/// What a unit leaves for finalize about one output file it wrote.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Always `RECORD_FORMAT`.
    pub format: String,
    /// `RECORD_VERSION`.
    pub version: u32,
    /// The plan id of the job the file belongs to (`super::plan_id`).
    pub plan: String,
    /// The fingerprint of the base file it was made from (`super::file_fingerprint`).
    pub base: String,
    /// The base file it is the merged copy of (relative to the base folder).
    pub file: String,
    /// Its name in `data/`.
    pub data: String,
    /// Its size in bytes.
    pub size: u64,
    /// SHA-256 of its bytes, as written and synced.
    pub sha256: String,
    /// Its inode and modification time (ns) once in place: a file changed or replaced since
    /// changes them.
    pub ino: u64,
    /// Modification time in nanoseconds since the epoch.
    pub mtime_ns: i64,
}

/// The `format` of a record.
pub const RECORD_FORMAT: &str = "boft-merge-unit";
/// The version of the record layout.
pub const RECORD_VERSION: u32 = 1;
/// How long a data file nobody holds must have gone unwritten before a unit run removes it.
pub const SWEEP_AFTER: std::time::Duration = std::time::Duration::from_secs(600);
/// A record is a few hundred bytes: past this it is not one.
const RECORD_MAX: u64 = 64 << 10;

/// An open staging folder.
pub struct Store {
    path: PathBuf,
    root: OwnedFd,
    data: OwnedFd,
    records: OwnedFd,
}

/// The staging folder of the output `dest`: `.<name>.boft-units` beside it.
pub fn path_for(dest: &Path) -> PathBuf {
    let mut leaf = crate::output::staged_prefix(dest, "units");
    // The prefix ends in `-`, where a staged output's pid would follow.
    leaf.pop();
    crate::output::parent_of(dest).join(OsString::from_vec(leaf))
}

/// A name no other process, here or on another machine, picks: host, pid, time and a counter,
/// hashed.
fn nonce() -> String {
    use sha2::{Digest, Sha256};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let mut host = [0u8; 256];
    // SAFETY: writes at most `host.len()` bytes into a live buffer.
    unsafe { libc::gethostname(host.as_mut_ptr().cast(), host.len()) };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut h = Sha256::new();
    h.update(host);
    h.update(std::process::id().to_le_bytes());
    h.update(now.as_nanos().to_le_bytes());
    h.update(COUNT.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    format!("{:x}", h.finalize())[..16].to_string()
}

fn cname(s: &str) -> CString {
    CString::new(s).expect("names made here hold no NUL")
}

fn fsync_dir(fd: BorrowedFd) {
    // SAFETY: plain syscall on an open descriptor. Best effort: a filesystem that cannot sync
    // folders still orders the renames the records rely on.
    unsafe { libc::fsync(fd.as_raw_fd()) };
}

fn rename_at(dir: BorrowedFd, from: &CStr, to: &CStr) -> std::io::Result<()> {
    // SAFETY: plain syscall on an open descriptor and NUL-terminated names that outlive it.
    let rc =
        unsafe { libc::renameat(dir.as_raw_fd(), from.as_ptr(), dir.as_raw_fd(), to.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn open_at(dir: BorrowedFd, name: &CStr) -> std::io::Result<File> {
    // SAFETY: plain syscall on an open descriptor and a NUL-terminated name that outlive it.
    fd_result(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    })
    .map(File::from)
}

fn unlink_at(dir: BorrowedFd, name: &CStr) {
    // SAFETY: plain syscall on an open descriptor and a NUL-terminated name that outlive it.
    unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) };
}

/// The data file of base file `file` is `f<file>.<nonce>.safetensors`; its record `f<file>.json`.
fn data_prefix(file: usize) -> String {
    format!("f{file}.")
}

fn record_name(file: usize) -> String {
    format!("f{file}.json")
}

impl Store {
    /// Open the staging folder of `dest`, making it when `create` (units do, finalize does not:
    /// `None` when it is missing). It and its two folders are opened without following
    /// symlinks, and everything after is reached through those handles.
    pub fn open(dest: &Path, create: bool) -> Result<Option<Store>> {
        let path = path_for(dest);
        let not_ours = |e: std::io::Error, at: &Path| match e.raw_os_error() {
            Some(libc::ELOOP | libc::ENOTDIR) => err(
                Class::Io,
                at,
                "is not a folder (a symlink or a file): not a units folder this tool made; \
                 remove it",
            ),
            _ => Error::io(at, e),
        };
        if create {
            match std::fs::create_dir(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        let root = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => OwnedFd::from(f),
            Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(not_ours(e, &path)),
        };
        let sub = |name: &str| -> Result<OwnedFd> {
            let c = cname(name);
            let at = path.join(name);
            if create {
                match mkdir_at(root.as_fd(), &c) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(Error::io(&at, e)),
                }
            }
            open_dir_at(root.as_fd(), &c).map_err(|e| not_ours(e, &at))
        };
        let data = sub("data")?;
        let records = sub("records")?;
        Ok(Some(Store {
            path,
            root,
            data,
            records,
        }))
    }

    /// The folder the data files are in, to link them from.
    pub fn data_dir(&self) -> BorrowedFd<'_> {
        self.data.as_fd()
    }

    /// A new, empty data file for base file `file`, under a name no other writer picks, locked
    /// for as long as it is open (`sweep` leaves a locked file alone). Returns it, its name and
    /// its path.
    pub fn create_data(&self, file: usize) -> Result<(File, String, PathBuf)> {
        let name = format!("{}{}.safetensors", data_prefix(file), nonce());
        let path = self.path.join("data").join(&name);
        let f = create_new_at(self.data.as_fd(), &cname(&name)).map_err(|e| Error::io(&path, e))?;
        try_lock(&f);
        Ok((f, name, path))
    }

    /// Where a data file is, for messages.
    pub fn data_path(&self, name: &str) -> PathBuf {
        self.path.join("data").join(name)
    }

    /// Open a data file named by a record, not through a symlink.
    pub fn open_data(&self, name: &str) -> std::io::Result<File> {
        if !is_plain_name(name) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not a plain file name",
            ));
        }
        open_at(self.data.as_fd(), &cname(name))
    }

    /// Remove a data file this process made and did not publish.
    pub fn remove_data(&self, name: &str) {
        unlink_at(self.data.as_fd(), &cname(name));
    }

    /// The record of base file `file`: `None` when there is none. A record that cannot be read
    /// or parsed is an error naming it.
    pub fn read_record(&self, file: usize) -> Result<Option<Record>> {
        use std::io::Read;
        let name = record_name(file);
        let at = self.path.join("records").join(&name);
        let f = match open_at(self.records.as_fd(), &cname(&name)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&at, e)),
        };
        let meta = f.metadata().map_err(|e| Error::io(&at, e))?;
        if !meta.is_file() || meta.len() > RECORD_MAX {
            return Err(err(Class::UnitsIncomplete, &at, "is not a unit record"));
        }
        let mut text = String::new();
        f.take(RECORD_MAX)
            .read_to_string(&mut text)
            .map_err(|e| Error::io(&at, e))?;
        let r: Record = serde_json::from_str(&text).map_err(|e| {
            err(
                Class::UnitsIncomplete,
                &at,
                format!("is not a unit record ({e}); run the unit again"),
            )
        })?;
        if r.format != RECORD_FORMAT || r.version != RECORD_VERSION || !is_plain_name(&r.data) {
            return Err(err(
                Class::UnitsIncomplete,
                &at,
                "is not a unit record of this version; run the unit again",
            ));
        }
        Ok(Some(r))
    }

    /// Publish the record of base file `file`: written whole under a name of its own, synced,
    /// then renamed over any earlier one, so a reader sees the old record or the new, never a
    /// part.
    pub fn write_record(&self, file: usize, r: &Record) -> Result<()> {
        let name = record_name(file);
        let tmp = format!(".{name}.{}", nonce());
        let at = self.path.join("records").join(&name);
        let (cn, ct) = (cname(&name), cname(&tmp));
        let mut f = create_new_at(self.records.as_fd(), &ct).map_err(|e| Error::io(&at, e))?;
        let text = serde_json::to_string_pretty(r).expect("a record serialises");
        let res = f
            .write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .and_then(|()| rename_at(self.records.as_fd(), &ct, &cn));
        if let Err(e) = res {
            unlink_at(self.records.as_fd(), &ct);
            return Err(Error::io(&at, e));
        }
        fsync_dir(self.records.as_fd());
        Ok(())
    }

    /// Make the data files' names durable before records point at them.
    pub fn sync_data(&self) {
        fsync_dir(self.data.as_fd());
    }

    /// Remove the data files of base file `file` left by runs that are over (killed, or a
    /// duplicate run whose record lost): not `keep`, not the file the record names, not one a
    /// live writer holds locked, and not one written in the last `SWEEP_AFTER` (where `flock`
    /// is local to each node, another node's live writer does not hold a lock seen here, but
    /// its file is being written). Best effort: what is left goes with the folder at finalize.
    pub fn sweep(&self, file: usize, keep: &str) {
        use std::os::unix::fs::MetadataExt;
        let prefix = data_prefix(file);
        let Ok(rd) = std::fs::read_dir(self.path.join("data")) else {
            return;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        for entry in rd.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name == keep || !name.starts_with(&prefix) || !is_plain_name(name) {
                continue;
            }
            let c = cname(name);
            let Ok(f) = open_at(self.data.as_fd(), &c) else {
                continue;
            };
            let old = f
                .metadata()
                .is_ok_and(|m| m.is_file() && now - m.mtime() > SWEEP_AFTER.as_secs() as i64);
            // The lock first, then the record: a writer publishes its record before it lets go
            // of its file, so a record read after the lock is taken names it if it won.
            if !old || !try_lock(&f) {
                continue;
            }
            if matches!(self.read_record(file), Ok(Some(r)) if r.data == name) {
                continue;
            }
            unlink_at(self.data.as_fd(), &c);
        }
    }

    /// Remove the folder once its files are in the output. Best effort: what is left is garbage
    /// a later `--unit` run of another plan ignores.
    pub fn remove(self) {
        use std::os::unix::fs::MetadataExt;
        let Store { path, root, .. } = self;
        let held = File::from(root).metadata().ok();
        let now = std::fs::symlink_metadata(&path).ok();
        if let (Some(a), Some(b)) = (held, now) {
            if b.is_dir() && a.dev() == b.dev() && a.ino() == b.ino() {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
}

/// A name inside `data/` as this tool makes them: no separators, not hidden, not `.`/`..`.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains('/')
        && !name.contains('\0')
}
