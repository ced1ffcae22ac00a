//! Writing results safely: everything goes to a hidden temporary name beside the destination
//! and is renamed into place only once complete, so an error, a full disk or a signal never
//! leaves a partial output behind, and an existing output survives until its replacement is whole.

use std::ffi::{CStr, CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{err, Class, Error, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Turn SIGINT/SIGTERM into a flag the workers poll; the staged output is then removed by the
/// normal error path instead of the process dying mid-write.
pub fn install_signal_handler() {
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
}

/// Whether SIGINT or SIGTERM has arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// An `[interrupted]` error once SIGINT or SIGTERM has arrived.
pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        Err(Error::bare(
            Class::Interrupted,
            "interrupted by a signal; no output was written",
        ))
    } else {
        Ok(())
    }
}

/// Longest file name Linux filesystems take (bytes).
const NAME_MAX: usize = 255;
/// Longest `-<pid>` suffix a staged name can get (pids fit in 10 digits).
const PID_MAX_DIGITS: usize = 10;

/// The part of a staged name before the pid: `.<name>.boft-<tag>-`. A name too long to leave room
/// for the rest within NAME_MAX is cut (at a character boundary) and followed by `~` and 16 hex
/// digits of its SHA-256, so every valid output name has a valid staged name, still recognisable
/// and still distinct for distinct names. Depends only on the name and the tag, so a later run
/// finds the staged names an earlier one left (`reclaim`).
pub(crate) fn staged_prefix(dest: &Path, tag: &str) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    use std::os::unix::ffi::OsStrExt;
    let name: &[u8] = dest.file_name().map(|n| n.as_bytes()).unwrap_or(b"output");
    let fixed = 1 + ".boft-".len() + tag.len() + 1 + PID_MAX_DIGITS;
    let mut out = vec![b'.'];
    if fixed + name.len() <= NAME_MAX {
        out.extend_from_slice(name);
    } else {
        let hash = Sha256::digest(name);
        let keep = NAME_MAX - fixed - 1 - 16;
        let mut cut = keep.min(name.len());
        // Do not split a UTF-8 character: back up over continuation bytes.
        while cut > 0 && cut < name.len() && name[cut] & 0xc0 == 0x80 {
            cut -= 1;
        }
        out.extend_from_slice(&name[..cut]);
        out.push(b'~');
        out.extend(
            hash[..8]
                .iter()
                .flat_map(|b| format!("{b:02x}").into_bytes()),
        );
    }
    out.extend_from_slice(format!(".boft-{tag}-").as_bytes());
    out
}

pub(crate) fn parent_of(dest: &Path) -> &Path {
    dest.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn sibling(dest: &Path, tag: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let mut leaf = staged_prefix(dest, tag);
    leaf.extend_from_slice(std::process::id().to_string().as_bytes());
    let leaf = PathBuf::from(std::ffi::OsString::from_vec(leaf));
    match dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(p) => p.join(leaf),
        None => leaf,
    }
}

/// Take an exclusive `flock` on a staged file or folder without waiting. A staging run holds it
/// on its staged output for as long as the process lives (the kernel drops it when the process
/// dies, however it dies), so a lock that can be taken means its owner is gone. `false` when the
/// lock is held elsewhere or the filesystem has no locks.
pub(crate) fn try_lock(f: &File) -> bool {
    // SAFETY: plain syscall on an open descriptor we own.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Whether no process has this pid (`kill(pid, 0)` fails with ESRCH).
fn process_gone(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists; nothing is delivered.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Remove what earlier runs staged for `dest` and left behind when killed outright (SIGKILL, the
/// OOM killer, a power cut): entries `<prefix><pid>` beside it whose owner process is gone — no
/// process here has that pid (or it is ours), and the `flock` the owner held for its lifetime can
/// be taken (which also holds across pid namespaces sharing the folder, and between two stagings
/// of one destination inside one process). A live run's staged output (lock held), anything that is not a regular
/// file or folder (a symlink) and the `.boft-old-` copy of a replaced output are left alone.
/// Best effort: whatever cannot be examined or removed is left as it is.
fn reclaim(dest: &Path) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let prefix = staged_prefix(dest, "partial");
    let parent = parent_of(dest);
    let Ok(rd) = fs::read_dir(parent) else {
        return;
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.as_bytes().strip_prefix(prefix.as_slice()) else {
            continue;
        };
        if pid.is_empty() || pid.len() > PID_MAX_DIGITS || !pid.iter().all(u8::is_ascii_digit) {
            continue;
        }
        // The owner must be gone: no process has its pid (or the pid is ours, and this run has
        // not staged yet), which also covers the moment between a live run creating its staged
        // output and locking it. A pid reused by an unrelated live process keeps the leftover
        // until that process ends; the lock below covers the opposite case.
        let pid: u32 = std::str::from_utf8(pid)
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if pid != std::process::id() && !process_gone(pid) {
            continue;
        }
        let path = parent.join(&name);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let is_dir = meta.is_dir();
        if !is_dir && !meta.is_file() {
            continue;
        }
        let mut flags = libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK;
        if is_dir {
            flags |= libc::O_DIRECTORY;
        }
        let Ok(f) = OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(&path)
        else {
            continue;
        };
        if !try_lock(&f) {
            continue;
        }
        // Still the entry that was locked (not replaced since it was listed)?
        let same = f.metadata().ok().zip(fs::symlink_metadata(&path).ok());
        if !same.is_some_and(|(a, b)| a.dev() == b.dev() && a.ino() == b.ino()) {
            continue;
        }
        let _ = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
    }
}

/// Absolute form of a path that may not exist yet: its existing ancestor canonicalised, the rest
/// appended. Used to compare outputs with inputs through symlinks and `..`.
pub fn resolve(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    let mut tail = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = cur.canonicalize() {
            let mut out = c;
            for t in tail.iter().rev() {
                out.push(t);
            }
            return out;
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                tail.push(name.to_os_string());
                cur = parent;
            }
            _ => return abs,
        }
    }
}

/// What an existing entry at the destination is, when `--force` may not replace it: only a
/// regular file, a folder or a symlink (the link itself) is replaced.
fn special_kind(ft: fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_fifo() {
        Some("a FIFO")
    } else if ft.is_socket() {
        Some("a socket")
    } else if ft.is_block_device() || ft.is_char_device() {
        Some("a device node")
    } else if ft.is_file() || ft.is_dir() || ft.is_symlink() {
        None
    } else {
        Some("not a regular file, folder or symlink")
    }
}

fn refuse_special(dest: &Path) -> Result<()> {
    if let Ok(m) = fs::symlink_metadata(dest) {
        if let Some(kind) = special_kind(m.file_type()) {
            return Err(err(
                Class::OutputExists,
                dest,
                format!(
                    "is {kind}; only a regular file, a folder or a symlink is replaced, \
                     even with --force"
                ),
            ));
        }
    }
    Ok(())
}

/// Refuse outputs that would overwrite or sit inside an input, or that exist without `force`.
/// `inputs` are every file a reader opens (callers expand what they were given with
/// `formats::read_alongside`); symlinks and `..` are resolved on both sides.
pub fn check_destination(dest: &Path, inputs: &[&Path], force: bool) -> Result<()> {
    let d = resolve(dest);
    for input in inputs {
        let i = resolve(input);
        if d == i {
            return Err(err(
                Class::OutputIsInput,
                dest,
                format!("output is the input {}", input.display()),
            ));
        }
        if d.starts_with(&i) {
            return Err(err(
                Class::OutputIsInput,
                dest,
                format!("output lies inside the input {}", input.display()),
            ));
        }
        if i.starts_with(&d) {
            return Err(err(
                Class::OutputIsInput,
                dest,
                format!(
                    "output would contain (and replace) the input {}",
                    input.display()
                ),
            ));
        }
    }
    refuse_special(dest)?;
    if fs::symlink_metadata(dest).is_ok() && !force {
        return Err(err(
            Class::OutputExists,
            dest,
            "already exists; pass --force to replace it",
        ));
    }
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(err(Class::NotFound, parent, "output folder does not exist"));
        }
    }
    Ok(())
}

/// Create a new file for writing: `O_CREAT|O_EXCL|O_NOFOLLOW`, so an existing entry of that name
/// (a file, or a symlink planted there, dangling or not) makes it fail instead of being followed
/// or truncated. Everything staged is written through the handle this returns, never by reopening
/// the path.
pub fn create_new_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// The staged name could not be created. When something already has that name it was not made
/// by this run (a symlink planted there, say): it is left alone, neither followed nor removed.
fn staging_failed(dest: &Path, temp: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::AlreadyExists {
        return err(
            Class::Io,
            dest,
            format!(
                "the staged name {} is taken by something this run did not create; it was left \
                 alone (remove it if it is yours)",
                temp.display()
            ),
        );
    }
    Error::io(dest, e)
}

/// A file or folder being written under a temporary name. Dropped without `commit`, it is removed.
pub struct Staged {
    dest: PathBuf,
    temp: PathBuf,
    is_dir: bool,
    committed: bool,
    /// The staged file, or the staged folder opened read-only.
    handle: File,
    /// Lets the SIGBUS handler remove the staged output (`fault`).
    _fault: crate::fault::StagedGuard,
}

impl Staged {
    /// Stage a file: it is created (exclusively, never through a symlink) before this returns;
    /// write it through `file`.
    pub fn file(dest: &Path) -> Result<Staged> {
        reclaim(dest);
        let temp = sibling(dest, "partial");
        let handle = create_new_file(&temp).map_err(|e| staging_failed(dest, &temp, e))?;
        try_lock(&handle);
        Ok(Staged {
            dest: dest.to_path_buf(),
            _fault: crate::fault::register_staged(&temp, false),
            temp,
            is_dir: false,
            committed: false,
            handle,
        })
    }

    /// Stage a folder: created with `mkdir` (which fails if anything has that name); fill it with
    /// `create`.
    pub fn dir(dest: &Path) -> Result<Staged> {
        reclaim(dest);
        let temp = sibling(dest, "partial");
        fs::create_dir(&temp).map_err(|e| staging_failed(dest, &temp, e))?;
        let handle = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temp);
        let handle = match handle {
            Ok(h) => {
                try_lock(&h);
                h
            }
            Err(e) => {
                let _ = fs::remove_dir(&temp);
                return Err(Error::io(dest, e));
            }
        };
        Ok(Staged {
            dest: dest.to_path_buf(),
            _fault: crate::fault::register_staged(&temp, true),
            temp,
            is_dir: true,
            committed: false,
            handle,
        })
    }

    /// The staged file (for a staged folder: the folder, opened read-only).
    pub fn file_handle(&self) -> &File {
        &self.handle
    }

    /// Stage a file as a second name (a hard link) of the finished file `name` in the folder
    /// `dir`, whose inode is `ino`, instead of writing a copy. `None` when that cannot be done (a
    /// filesystem without hard links, the file gone): the caller stages a copy with `file`.
    pub fn file_linked(
        dest: &Path,
        dir: BorrowedFd,
        name: &CStr,
        ino: u64,
    ) -> Result<Option<Staged>> {
        use std::os::unix::fs::MetadataExt;
        reclaim(dest);
        let temp = sibling(dest, "partial");
        let ctemp = c_name(temp.as_os_str()).map_err(|e| Error::io(dest, e))?;
        // A symlink at `name` would be linked itself, and is refused below.
        if let Err(e) = link_at(dir.as_raw_fd(), name, libc::AT_FDCWD, &ctemp) {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                return Err(staging_failed(dest, &temp, e));
            }
            return Ok(None);
        }
        let handle = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temp);
        match handle {
            Ok(h) if h.metadata().is_ok_and(|m| m.is_file() && m.ino() == ino) => {
                try_lock(&h);
                Ok(Some(Staged {
                    dest: dest.to_path_buf(),
                    _fault: crate::fault::register_staged(&temp, false),
                    temp,
                    is_dir: false,
                    committed: false,
                    handle: h,
                }))
            }
            _ => {
                let _ = fs::remove_file(&temp);
                Ok(None)
            }
        }
    }

    /// Give the finished file `name` in the folder `dir`, whose inode is `ino`, the name `rel`
    /// inside a staged folder (a hard link), instead of writing a copy. `false` when that cannot
    /// be done (a filesystem without hard links, the file replaced or gone): the caller writes
    /// `rel` with `create`, which reports whatever is really wrong.
    pub fn adopt(&self, dir: BorrowedFd, name: &CStr, ino: u64, rel: &Path) -> bool {
        let Ok((to_dir, to, _)) = self.parent_at(rel, true) else {
            return false;
        };
        if link_at(dir.as_raw_fd(), name, to_dir.as_raw_fd(), &to).is_err() {
            return false;
        }
        // Still the file that was checked (not one renamed over it since)?
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: plain syscall on an open descriptor, a NUL-terminated name and a live struct.
        let ok = unsafe {
            libc::fstatat(
                to_dir.as_raw_fd(),
                to.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            ) == 0
        };
        if ok && st.st_ino == ino && (st.st_mode & libc::S_IFMT) == libc::S_IFREG {
            return true;
        }
        // SAFETY: as above.
        unsafe { libc::unlinkat(to_dir.as_raw_fd(), to.as_ptr(), 0) };
        false
    }

    /// The folder that holds `rel` inside a staged folder, opened, and `rel`'s last name in it;
    /// missing folders on the way are made when `make`. Everything is reached from the handle
    /// taken when the staged folder was made, one name at a time and never through a symlink: the
    /// staged name (or a folder inside) swapped for a symlink by another process leads nowhere
    /// else, and writes still land in the folder this run made.
    fn parent_at(&self, rel: &Path, make: bool) -> Result<(OwnedFd, CString, PathBuf)> {
        use std::path::Component;
        debug_assert!(self.is_dir);
        let mut names = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(n) => names.push(n),
                Component::CurDir => {}
                _ => {
                    return Err(err(
                        Class::Io,
                        self.dest.join(rel),
                        "is not a plain relative name inside the output",
                    ))
                }
            }
        }
        let Some((last, parents)) = names.split_last() else {
            return Err(err(
                Class::Io,
                &self.dest,
                "empty file name inside the output",
            ));
        };
        let mut path = self.temp.clone();
        let mut dir = OwnedFd::from(
            self.handle
                .try_clone()
                .map_err(|e| self.blame_dest(Error::io(&path, e)))?,
        );
        for name in parents {
            path.push(name);
            let c = c_name(name).map_err(|e| self.blame_dest(Error::io(&path, e)))?;
            if make {
                match mkdir_at(dir.as_fd(), &c) {
                    Ok(()) => {}
                    // Made for an earlier file of ours; opened below without following a link.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(self.blame_dest(Error::io(&path, e))),
                }
            }
            dir = open_dir_at(dir.as_fd(), &c).map_err(|e| {
                self.blame_dest(match e.raw_os_error() {
                    Some(libc::ELOOP | libc::ENOTDIR) => err(
                        Class::Io,
                        &path,
                        "exists in the staged output and is not a folder",
                    ),
                    _ => Error::io(&path, e),
                })
            })?;
        }
        path.push(last);
        let c = c_name(last).map_err(|e| self.blame_dest(Error::io(&path, e)))?;
        Ok((dir, c, path))
    }

    /// Create a new file at `rel` inside a staged folder (its parent folders made as needed),
    /// exclusively and without following symlinks, inside the folder this run made.
    pub fn create(&self, rel: &Path) -> Result<File> {
        let (dir, name, path) = self.parent_at(rel, true)?;
        create_new_at(dir.as_fd(), &name).map_err(|e| self.blame_dest(Error::io(&path, e)))
    }

    /// Give the file already written at `existing` inside a staged folder a second name `rel`
    /// (a hard link), so that one file reached by several names is stored once. `false` when
    /// that cannot be done (a filesystem without hard links, a link count at its limit, …): the
    /// caller writes `rel` as a file of its own, and `create` reports whatever is really wrong.
    pub fn link(&self, existing: &Path, rel: &Path) -> bool {
        let Ok((from_dir, from, _)) = self.parent_at(existing, false) else {
            return false;
        };
        let Ok((to_dir, to, _)) = self.parent_at(rel, true) else {
            return false;
        };
        link_at(from_dir.as_raw_fd(), &from, to_dir.as_raw_fd(), &to).is_ok()
    }

    /// Where the output goes once committed.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Where the output is staged.
    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// Report an error about the temporary name (removed by the time the user reads it) as one
    /// about the destination.
    pub fn blame_dest(&self, mut e: Error) -> Error {
        if let Some(p) = &e.path {
            if let Ok(rest) = p.strip_prefix(&self.temp) {
                e.path = Some(if rest.as_os_str().is_empty() {
                    self.dest.clone()
                } else {
                    self.dest.join(rest)
                });
            }
        }
        e
    }

    /// Whether `path` is (not through a symlink) the file or folder this run staged.
    fn is_ours(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self.handle.metadata(), fs::symlink_metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }

    fn replaced(&self) -> Error {
        err(
            Class::Io,
            &self.dest,
            format!(
                "the staged output {} was replaced by another process; nothing was moved into \
                 place",
                self.temp.display()
            ),
        )
    }

    /// Move the finished output into place, replacing an existing one. Only what this run staged
    /// is moved: renames go by name, so the staged name is checked to still be the file or
    /// folder made (a symlink or another folder put there by another process is refused), and the
    /// destination checked again once renamed.
    pub fn commit(self) -> Result<()> {
        check_interrupted()?;
        self.check_commit()?;
        self.commit_checked()
    }

    /// What `commit` checks before it moves anything: the destination can still be replaced (it
    /// may have changed since `check_destination`) and the staged output is still the one made.
    /// Several outputs committed together (a batch) are all checked before any is moved.
    pub fn check_commit(&self) -> Result<()> {
        refuse_special(&self.dest)?;
        if !self.is_ours(&self.temp) {
            return Err(self.replaced());
        }
        if !self.is_dir && fs::symlink_metadata(&self.dest).is_ok_and(|m| m.is_dir()) {
            return Err(err(
                Class::OutputExists,
                &self.dest,
                "is a folder, expected a file",
            ));
        }
        Ok(())
    }

    /// `commit` once `check_commit` passed, whatever signal arrives meanwhile: the renames of a
    /// batch are not stopped half way.
    pub fn commit_checked(mut self) -> Result<()> {
        if !self.is_ours(&self.temp) {
            return Err(self.replaced());
        }
        if self.is_dir && fs::symlink_metadata(&self.dest).is_ok() {
            // Swap the two atomically where the filesystem can: the destination is never missing,
            // and the old output, now under the staged name, is removed (a kill during that
            // leaves it for `reclaim`).
            if exchange(&self.temp, &self.dest) {
                if !self.is_ours(&self.dest) {
                    // Swapped in between the check and the exchange: swap back, which puts the
                    // old output where it was.
                    exchange(&self.temp, &self.dest);
                    return Err(self.replaced());
                }
                self.committed = true;
                let _ = if fs::symlink_metadata(&self.temp).is_ok_and(|m| m.is_dir()) {
                    fs::remove_dir_all(&self.temp)
                } else {
                    fs::remove_file(&self.temp)
                };
                return Ok(());
            }
            let old = sibling(&self.dest, "old");
            fs::rename(&self.dest, &old).map_err(|e| Error::io(&self.dest, e))?;
            if let Err(e) = fs::rename(&self.temp, &self.dest) {
                let _ = fs::rename(&old, &self.dest);
                return Err(Error::io(&self.dest, e));
            }
            if !self.is_ours(&self.dest) {
                let _ = rename_noreplace(&self.dest, &self.temp);
                let _ = rename_noreplace(&old, &self.dest);
                return Err(self.replaced());
            }
            let _ = if fs::symlink_metadata(&old).is_ok_and(|m| m.is_dir()) {
                fs::remove_dir_all(&old)
            } else {
                fs::remove_file(&old)
            };
        } else {
            if !self.is_dir && fs::symlink_metadata(&self.dest).is_ok_and(|m| m.is_dir()) {
                return Err(err(
                    Class::OutputExists,
                    &self.dest,
                    "is a folder, expected a file",
                ));
            }
            fs::rename(&self.temp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
            if !self.is_ours(&self.dest) {
                // Swapped in between the check and the rename: put it back under the staged name
                // (where it was left alone), unless that name is taken again.
                let _ = rename_noreplace(&self.dest, &self.temp);
                return Err(self.replaced());
            }
        }
        self.committed = true;
        Ok(())
    }
}

/// `linkat` without flags: `from` in the folder `from_dir` gets the second name `to` in `to_dir`
/// (either may be `AT_FDCWD`); a symlink at `from` is linked itself, never followed.
fn link_at(
    from_dir: libc::c_int,
    from: &CStr,
    to_dir: libc::c_int,
    to: &CStr,
) -> std::io::Result<()> {
    // SAFETY: plain syscall on descriptors and NUL-terminated names that outlive it.
    if unsafe { libc::linkat(from_dir, from.as_ptr(), to_dir, to.as_ptr(), 0) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `renameat2(RENAME_NOREPLACE)`: move `a` to `b` only if nothing is at `b`.
fn rename_noreplace(a: &Path, b: &Path) -> std::io::Result<()> {
    let (ca, cb) = (c_name(a.as_os_str())?, c_name(b.as_os_str())?);
    // SAFETY: plain syscall with NUL-terminated paths that outlive it.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn c_name(name: &OsStr) -> std::io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(name.as_bytes()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a NUL byte in a file name",
        )
    })
}

pub(crate) fn fd_result(fd: libc::c_int) -> std::io::Result<OwnedFd> {
    if fd < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        // SAFETY: a descriptor the kernel just returned, owned by nothing else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// Open the folder `name` in `dir`, refusing a symlink there.
pub(crate) fn open_dir_at(dir: BorrowedFd, name: &CStr) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall on an open descriptor and a NUL-terminated name that outlive it.
    fd_result(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })
}

pub(crate) fn mkdir_at(dir: BorrowedFd, name: &CStr) -> std::io::Result<()> {
    // SAFETY: plain syscall on an open descriptor and a NUL-terminated name that outlive it.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o777) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `create_new_file` relative to an open folder.
pub(crate) fn create_new_at(dir: BorrowedFd, name: &CStr) -> std::io::Result<File> {
    // SAFETY: plain syscall on an open descriptor and a NUL-terminated name that outlive it.
    let fd = fd_result(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o666 as libc::c_uint,
        )
    })?;
    Ok(File::from(fd))
}

/// `renameat2(RENAME_EXCHANGE)`: swap two existing entries atomically. `false` when it fails (a
/// filesystem or kernel without it), with nothing changed.
fn exchange(a: &Path, b: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let (Ok(ca), Ok(cb)) = (
        std::ffi::CString::new(a.as_os_str().as_bytes()),
        std::ffi::CString::new(b.as_os_str().as_bytes()),
    ) else {
        return false;
    };
    // SAFETY: plain syscall with NUL-terminated paths that outlive it.
    unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        ) == 0
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // Whatever another process put at the staged name is not ours to remove.
        if !self.committed && self.is_ours(&self.temp) {
            let _ = if self.is_dir {
                fs::remove_dir_all(&self.temp)
            } else {
                fs::remove_file(&self.temp)
            };
        }
    }
}

/// Write a small file (an adapter) atomically, through the staged file's handle.
pub fn write_file_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    let staged = Staged::file(dest)?;
    let mut f = staged.file_handle();
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(dest, e))?;
    staged.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    fn leaf(p: &Path) -> Vec<u8> {
        p.file_name().unwrap().as_bytes().to_vec()
    }

    #[test]
    fn staged_names_fit_name_max() {
        let pid = std::process::id().to_string();
        let short = sibling(Path::new("d/merged.safetensors"), "partial");
        assert_eq!(
            short,
            PathBuf::from(format!("d/.merged.safetensors.boft-partial-{pid}"))
        );
        for len in [200, 229, 230, 252, 255] {
            let name = "é".repeat(len / 2) + &"m".repeat(len % 2);
            let s = sibling(&Path::new("d").join(&name), "partial");
            let l = leaf(&s);
            assert!(l.len() <= NAME_MAX, "{len}: {} bytes", l.len());
            assert!(std::str::from_utf8(&l).is_ok(), "{len}: split a character");
            assert!(l.ends_with(format!(".boft-partial-{pid}").as_bytes()));
            assert!(l.starts_with(".é".as_bytes()));
        }
        // Long names that share their first 200 bytes still get distinct staged names.
        let a = "x".repeat(250) + "a";
        let b = "x".repeat(250) + "b";
        assert_ne!(
            sibling(Path::new(&a), "partial"),
            sibling(Path::new(&b), "partial")
        );
    }

    /// A pid that no process has (a child that has exited and been reaped).
    fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    }

    #[test]
    fn reclaims_only_what_dead_runs_left() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("out");
        let name = |pid: u32| tmp.path().join(format!(".out.boft-partial-{pid}"));
        let dead = dead_pid();
        // A dead run's folder, with a symlink inside (removed, not followed).
        let victim = tmp.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        fs::create_dir(name(dead)).unwrap();
        std::os::unix::fs::symlink(&victim, name(dead).join("link")).unwrap();
        // A live process's staged file.
        let mut live = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        fs::write(name(live.id()), b"live").unwrap();
        // A dead pid whose lock is held (by this process: another namespace's run, say).
        let dead2 = dead_pid();
        fs::write(name(dead2), b"locked").unwrap();
        let held = File::open(name(dead2)).unwrap();
        assert!(try_lock(&held));
        // A symlink at a staged name, a staged-looking name with junk after the pid, another
        // destination's leftover: none of them touched.
        let dead3 = dead_pid();
        std::os::unix::fs::symlink(&victim, name(dead3)).unwrap();
        let junk = tmp.path().join(format!(".out.boft-partial-{dead}x"));
        fs::write(&junk, b"").unwrap();
        let other = tmp.path().join(format!(".other.boft-partial-{dead}"));
        fs::write(&other, b"").unwrap();

        reclaim(&dest);
        let _ = live.kill();
        let _ = live.wait();
        assert!(
            fs::symlink_metadata(name(dead)).is_err(),
            "dead run's folder kept"
        );
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        assert!(name(live.id()).exists(), "live run's file removed");
        assert!(name(dead2).exists(), "locked file removed");
        assert!(fs::symlink_metadata(name(dead3)).is_ok(), "symlink removed");
        assert!(junk.exists() && other.exists());
        drop(held);
        reclaim(&dest);
        assert!(!name(dead2).exists(), "unlocked dead file kept");
    }

    #[test]
    fn staging_reclaims_a_dead_run_with_our_own_pid() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("out.safetensors");
        // Left by an earlier process that had this pid (a container restarted, say).
        let mine = sibling(&dest, "partial");
        fs::write(&mine, b"stale").unwrap();
        let staged = Staged::file(&dest).unwrap();
        staged.file_handle().write_all(b"new").unwrap();
        staged.commit().unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"new");
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    /// The staged folder renamed away and a symlink to `victim` put at its name.
    fn swap_staged(staged: &Staged, victim: &Path) -> PathBuf {
        let moved = staged.path().with_file_name("moved-away");
        fs::rename(staged.path(), &moved).unwrap();
        std::os::unix::fs::symlink(victim, staged.path()).unwrap();
        moved
    }

    #[test]
    fn files_are_created_in_the_held_folder_not_through_its_name() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::create_dir(&victim).unwrap();
        let staged = Staged::dir(&tmp.path().join("out")).unwrap();
        let name = staged.path().to_path_buf();
        let moved = swap_staged(&staged, &victim);
        staged
            .create(Path::new("a/b/c.txt"))
            .unwrap()
            .write_all(b"c")
            .unwrap();
        staged.create(Path::new("top.txt")).unwrap();
        assert_eq!(fs::read(moved.join("a/b/c.txt")).unwrap(), b"c");
        assert!(moved.join("top.txt").is_file());
        assert_eq!(fs::read_dir(&victim).unwrap().count(), 0);
        let e = staged.commit().unwrap_err();
        assert_eq!(e.class, Class::Io);
        assert!(e.message.contains("replaced"), "{}", e.message);
        // The planted symlink is left alone, and so is what it points to.
        assert!(fs::symlink_metadata(&name)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(fs::symlink_metadata(tmp.path().join("out")).is_err());
    }

    #[test]
    fn a_symlinked_subfolder_inside_the_staged_folder_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::create_dir(&victim).unwrap();
        let staged = Staged::dir(&tmp.path().join("out")).unwrap();
        staged.create(Path::new("a/x")).unwrap();
        fs::remove_file(staged.path().join("a/x")).unwrap();
        fs::remove_dir(staged.path().join("a")).unwrap();
        std::os::unix::fs::symlink(&victim, staged.path().join("a")).unwrap();
        let e = staged.create(Path::new("a/y")).unwrap_err();
        assert_eq!(e.class, Class::Io);
        assert_eq!(e.path.as_deref(), Some(tmp.path().join("out/a").as_path()));
        assert_eq!(fs::read_dir(&victim).unwrap().count(), 0);
    }

    #[test]
    fn names_leaving_the_staged_folder_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let staged = Staged::dir(&tmp.path().join("out")).unwrap();
        for rel in ["../escape.txt", "a/../../escape.txt", "/tmp/escape.txt", ""] {
            let e = staged.create(Path::new(rel)).unwrap_err();
            assert_eq!(e.class, Class::Io, "{rel}");
        }
        assert!(!tmp.path().join("escape.txt").exists());
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_second_name_for_one_file_is_a_hard_link() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("out");
        let staged = Staged::dir(&dest).unwrap();
        staged
            .create(Path::new("blob.json"))
            .unwrap()
            .write_all(b"blob")
            .unwrap();
        assert!(staged.link(Path::new("blob.json"), Path::new("deep/er/name.json")));
        // An existing name is not replaced, and a missing first copy links nothing.
        assert!(!staged.link(Path::new("blob.json"), Path::new("deep/er/name.json")));
        assert!(!staged.link(Path::new("missing"), Path::new("other.json")));
        staged.commit().unwrap();
        let a = fs::metadata(dest.join("blob.json")).unwrap();
        let b = fs::symlink_metadata(dest.join("deep/er/name.json")).unwrap();
        assert!(b.is_file());
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
        assert!(!dest.join("other.json").exists());
    }

    #[test]
    fn dropping_leaves_a_symlink_planted_at_the_staged_name() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::create_dir(&victim).unwrap();
        fs::write(victim.join("keep"), b"keep").unwrap();
        let staged = Staged::dir(&tmp.path().join("out")).unwrap();
        let name = staged.path().to_path_buf();
        swap_staged(&staged, &victim);
        drop(staged);
        assert!(fs::symlink_metadata(&name)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(victim.join("keep")).unwrap(), b"keep");
    }
}
