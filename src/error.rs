//! One error type for the whole library. Every failure a user can cause carries the file it
//! concerns and a stable class name, so the binaries can print exactly one line and tests can
//! assert on the class rather than on prose.

use std::fmt;
use std::path::{Path, PathBuf};

/// Stable machine-readable error classes. The string form (`Class::as_str`) is printed in
/// brackets on every error line and is part of the command-line contract (docs/ERRORS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Reading or writing failed at the operating system.
    Io,
    /// A path that does not exist.
    NotFound,
    /// A zero-byte file where a safetensors file was expected.
    EmptyFile,
    /// Shorter than the 8-byte header length, or a header length below 2.
    HeaderTooSmall,
    /// A header length above the reference loader's limit.
    HeaderTooLarge,
    /// The header length runs past the end of the file.
    HeaderPastEnd,
    /// The header is not UTF-8 or not valid JSON.
    HeaderNotJson,
    /// The header is valid JSON but not an object.
    HeaderNotObject,
    /// A tensor entry without a valid dtype, shape or offsets.
    BadTensorInfo,
    /// A dtype the safetensors format does not name.
    UnknownDtype,
    /// Tensor byte ranges that run backwards, overlap, leave gaps or trailing bytes, or disagree
    /// with shape and dtype.
    BadOffsets,
    /// A tensor name given twice.
    DuplicateTensor,
    /// A checkpoint index that cannot be used.
    BadIndex,
    /// A shard the index names that is not there.
    MissingShard,
    /// A path (index entry or symlink) that leads outside the folder it must stay in.
    PathEscape,
    /// Symlinked folders that lead back into the walk (a cycle, or a folder reached twice).
    SymlinkLoop,
    /// Not an adapter this tool reads, or not the one `--from` names.
    UnknownFormat,
    /// An adapter that contradicts itself.
    BadAdapter,
    /// NaN or ±Inf where values must be finite.
    NonFinite,
    /// An adapter target the base does not hold.
    MissingTarget,
    /// An adapter and a base tensor whose shapes do not fit.
    ShapeMismatch,
    /// A tensor to transform or replace that is not F32, F16 or BF16.
    UnsupportedDtype,
    /// The output exists (and `--force` was not given, or may not replace it).
    OutputExists,
    /// The output is, holds or lies inside an input.
    OutputIsInput,
    /// A command-line error.
    Usage,
    /// A signal arrived while working; the staged output was removed.
    Interrupted,
    /// The `--device` asked for is not available.
    NoDevice,
    /// An export that could not be exact.
    NotExportable,
    /// `boft-merge --finalize`: a unit of a split merge has not run, ran for another plan, or its
    /// output is not what its record says.
    UnitsIncomplete,
}

impl Class {
    /// The class's stable name, printed as `[name]` (docs/ERRORS.md).
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Io => "io",
            Class::NotFound => "not-found",
            Class::EmptyFile => "empty-file",
            Class::HeaderTooSmall => "header-too-small",
            Class::HeaderTooLarge => "header-too-large",
            Class::HeaderPastEnd => "header-past-end",
            Class::HeaderNotJson => "header-not-json",
            Class::HeaderNotObject => "header-not-object",
            Class::BadTensorInfo => "bad-tensor-info",
            Class::UnknownDtype => "unknown-dtype",
            Class::BadOffsets => "bad-offsets",
            Class::DuplicateTensor => "duplicate-tensor",
            Class::BadIndex => "bad-index",
            Class::MissingShard => "missing-shard",
            Class::PathEscape => "path-escape",
            Class::SymlinkLoop => "symlink-loop",
            Class::UnknownFormat => "unknown-format",
            Class::BadAdapter => "bad-adapter",
            Class::NonFinite => "non-finite",
            Class::MissingTarget => "missing-target",
            Class::ShapeMismatch => "shape-mismatch",
            Class::UnsupportedDtype => "unsupported-dtype",
            Class::OutputExists => "output-exists",
            Class::OutputIsInput => "output-is-input",
            Class::Usage => "usage",
            Class::Interrupted => "interrupted",
            Class::NoDevice => "no-device",
            Class::NotExportable => "not-exportable",
            Class::UnitsIncomplete => "units-incomplete",
        }
    }
}

/// An error about one file (or none, for usage errors), rendered on a single line.
#[derive(Debug)]
pub struct Error {
    /// Which kind of failure.
    pub class: Class,
    /// The file or folder it concerns, when there is one.
    pub path: Option<PathBuf>,
    /// What went wrong, in one line.
    pub message: String,
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error about `path`.
    pub fn new(class: Class, path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error {
            class,
            path: Some(path.as_ref().to_path_buf()),
            message: message.into(),
        }
    }

    /// An error about no path in particular.
    pub fn bare(class: Class, message: impl Into<String>) -> Self {
        Error {
            class,
            path: None,
            message: message.into(),
        }
    }

    /// An I/O error at `path`, classed by its kind (`NotFound`, else `Io`).
    pub fn io(path: impl AsRef<Path>, err: std::io::Error) -> Self {
        let class = match err.kind() {
            std::io::ErrorKind::NotFound => Class::NotFound,
            _ => Class::Io,
        };
        let message = match err.raw_os_error() {
            Some(libc::ENOSPC) => "no space left on device".to_string(),
            _ => err.to_string(),
        };
        Error::new(class, path, message)
    }

    /// Attach a path to an error that was raised without one.
    pub fn at(mut self, path: impl AsRef<Path>) -> Self {
        if self.path.is_none() {
            self.path = Some(path.as_ref().to_path_buf());
        }
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Newlines inside a message would break the one-line contract.
        let msg = self.message.replace(['\n', '\r'], " ");
        match &self.path {
            Some(p) => write!(
                f,
                "[{}] {}: {}",
                self.class.as_str(),
                escape_controls(&p.display().to_string()),
                msg
            ),
            None => write!(f, "[{}] {}", self.class.as_str(), msg),
        }
    }
}

impl std::error::Error for Error {}

/// A path as it goes into the one error line: a file name may hold a newline (which would make it
/// two lines) or terminal escape sequences; control characters are shown escaped (`\n`, `\u{1b}`).
fn escape_controls(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Shorthand for building an error about a path inside `map_err`/`ok_or_else`.
pub fn err(class: Class, path: impl AsRef<Path>, message: impl Into<String>) -> Error {
    Error::new(class, path, message)
}
