//! Writing results safely: everything goes to a hidden temporary name beside the destination
//! and is renamed into place only once complete, so an error, a full disk or a signal never
//! leaves a partial output behind, and an existing output survives until its replacement is whole.

use std::fs;
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

/// Refuse outputs that would overwrite or sit inside an input, or that exist without `force`.
pub fn check_destination(dest: &Path, inputs: &[&Path], force: bool) -> Result<()> {
    let d = resolve(dest);
    for input in inputs {
        let i = resolve(input);
        if d == i {
            return Err(err(
                Class::OutputIsInput,
                dest,
                "output is the same path as an input",
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

/// A file or folder being written under a temporary name. Dropped without `commit`, it is removed.
pub struct Staged {
    dest: PathBuf,
    temp: PathBuf,
    is_dir: bool,
    committed: bool,
}

impl Staged {
    pub fn file(dest: &Path) -> Result<Staged> {
        let temp = sibling(dest, "partial");
        let _ = fs::remove_file(&temp);
        Ok(Staged {
            dest: dest.to_path_buf(),
            temp,
            is_dir: false,
            committed: false,
        })
    }

    pub fn dir(dest: &Path) -> Result<Staged> {
        let temp = sibling(dest, "partial");
        let _ = fs::remove_dir_all(&temp);
        fs::create_dir(&temp).map_err(|e| Error::io(dest, e))?;
        Ok(Staged {
            dest: dest.to_path_buf(),
            temp,
            is_dir: true,
            committed: false,
        })
    }

    /// Where to write.
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
        if self.is_dir && fs::symlink_metadata(&self.dest).is_ok() {
            let old = sibling(&self.dest, "old");
            fs::rename(&self.dest, &old).map_err(|e| Error::io(&self.dest, e))?;
            if let Err(e) = fs::rename(&self.temp, &self.dest) {
                let _ = fs::rename(&old, &self.dest);
                return Err(Error::io(&self.dest, e));
            }
            let _ = if old.is_dir() {
                fs::remove_dir_all(&old)
            } else {
                fs::remove_file(&old)
            };
        } else {
            if !self.is_dir && self.dest.is_dir() {
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

/// Write a small file (an adapter) atomically.
pub fn write_file_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    let staged = Staged::file(dest)?;
    fs::write(staged.path(), bytes).map_err(|e| Error::io(dest, e))?;
    staged.commit()
}
