//! Writing results safely: everything goes to a hidden temporary name beside the destination
//! and is renamed into place only once complete, so an error, a full disk or a signal never
//! leaves a partial output behind, and an existing output survives until its replacement is whole.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
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

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

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

fn sibling(dest: &Path, tag: &str) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty());
    let leaf = format!(".{name}.boft-{tag}-{}", std::process::id());
    match parent {
        Some(p) => p.join(leaf),
        None => PathBuf::from(leaf),
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

/// The files a reader opens beside an input it was given: for a PEFT adapter (its folder, or its
/// `adapter_model.safetensors` given as a file) the folder's `adapter_config.json` and
/// `adapter_model.safetensors`, which may be symlinks to elsewhere (a Hugging Face cache's blobs).
fn read_alongside(input: &Path) -> Vec<PathBuf> {
    use crate::formats::peft::{CONFIG, WEIGHTS};
    let dir = if input.is_dir() {
        Some(input)
    } else {
        input
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .filter(|p| fs::symlink_metadata(p.join(CONFIG)).is_ok())
    };
    let mut out = vec![input.to_path_buf()];
    if let Some(d) = dir {
        out.push(d.join(CONFIG));
        out.push(d.join(WEIGHTS));
    }
    out
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
/// Each input stands for every file its reader opens (`read_alongside`); symlinks and `..` are
/// resolved on both sides.
pub fn check_destination(dest: &Path, inputs: &[&Path], force: bool) -> Result<()> {
    let d = resolve(dest);
    for given in inputs {
        for input in read_alongside(given) {
            let i = resolve(&input);
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
}

impl Staged {
    /// Stage a file: it is created (exclusively, never through a symlink) before this returns;
    /// write it through `file`.
    pub fn file(dest: &Path) -> Result<Staged> {
        let temp = sibling(dest, "partial");
        let handle = create_new_file(&temp).map_err(|e| staging_failed(dest, &temp, e))?;
        Ok(Staged {
            dest: dest.to_path_buf(),
            temp,
            is_dir: false,
            committed: false,
            handle,
        })
    }

    /// Stage a folder: created with `mkdir` (which fails if anything has that name); fill it with
    /// `create`.
    pub fn dir(dest: &Path) -> Result<Staged> {
        let temp = sibling(dest, "partial");
        fs::create_dir(&temp).map_err(|e| staging_failed(dest, &temp, e))?;
        let handle = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temp);
        let handle = match handle {
            Ok(h) => h,
            Err(e) => {
                let _ = fs::remove_dir(&temp);
                return Err(Error::io(dest, e));
            }
        };
        Ok(Staged {
            dest: dest.to_path_buf(),
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

    /// Create a new file at `rel` inside a staged folder (its parent folders made as needed, each
    /// with `mkdir`), exclusively and without following symlinks.
    pub fn create(&self, rel: &Path) -> Result<File> {
        debug_assert!(self.is_dir);
        let mut dir = self.temp.clone();
        let parts: Vec<_> = rel.components().collect();
        let Some((last, parents)) = parts.split_last() else {
            return Err(err(
                Class::Io,
                &self.dest,
                "empty file name inside the output",
            ));
        };
        for c in parents {
            dir.push(c);
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    // Made by an earlier file of ours: a real folder, never a symlink.
                    let real_dir = fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir());
                    if !real_dir {
                        return Err(self.blame_dest(err(
                            Class::Io,
                            &dir,
                            "exists in the staged output and is not a folder",
                        )));
                    }
                }
                Err(e) => return Err(self.blame_dest(Error::io(&dir, e))),
            }
        }
        let path = dir.join(last);
        create_new_file(&path).map_err(|e| self.blame_dest(Error::io(&path, e)))
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

    /// Move the finished output into place, replacing an existing one.
    pub fn commit(mut self) -> Result<()> {
        check_interrupted()?;
        // Checked again here: the destination may have changed since `check_destination`.
        refuse_special(&self.dest)?;
        if self.is_dir && fs::symlink_metadata(&self.dest).is_ok() {
            let old = sibling(&self.dest, "old");
            fs::rename(&self.dest, &old).map_err(|e| Error::io(&self.dest, e))?;
            if let Err(e) = fs::rename(&self.temp, &self.dest) {
                let _ = fs::rename(&old, &self.dest);
                return Err(Error::io(&self.dest, e));
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
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
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
