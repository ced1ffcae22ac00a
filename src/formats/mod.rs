//! Source formats: which library wrote a file, and which reader takes it. Each library's folder
//! (`peft/`, `lycoris/`) reads its files into the canonical model and writes them back out;
//! `read` holds what the readers share, `export` the exact-or-refuse gate the writers share.
//! Nothing outside this folder knows about any library's layout.

pub mod export;
pub mod lycoris;
pub mod peft;
pub mod read;

pub use peft::read_alongside;
pub use read::sha256_hex;

use std::path::Path;

use crate::adapter::{canonical, Adapter};
use crate::checkpoint::SafeFile;
use crate::error::{err, Class, Error, Result};

/// Which reader to use (`--from`): detected from the files, or forced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Source {
    /// Detect the reader from the files.
    #[default]
    Auto,
    /// A canonical file (docs/FORMAT.md).
    Canonical,
    /// A PEFT folder, with today's rules (also for Conv2d BOFT files from PEFT ≤ 0.13).
    Peft,
    /// A PEFT folder whose Conv2d BOFT layers use PEFT ≤ 0.13's buffer reinterpretation, whatever
    /// the config says.
    PeftLegacyConv,
    /// LyCORIS diag-oft/boft semantics (the constraint only when exceeded), whatever the prefix.
    Lycoris,
    /// kohya `networks.oft` semantics (the clamp always applied), whatever the prefix.
    Kohya,
}

impl Source {
    /// Each source's `--from` name, in declaration order (for messages).
    pub const NAMES: &'static [&'static str] = &[
        "auto",
        "canonical",
        "peft",
        "peft-legacy-conv",
        "lycoris",
        "kohya",
    ];
}

/// Load any adapter we can read (a canonical file, a PEFT adapter folder, a LyCORIS or kohya
/// file), every block computed and checked, with the sha256 of the source files.
pub fn load(path: &Path) -> Result<Adapter> {
    load_as(path, Source::Auto)
}

/// `load` with the reader forced by `--from`.
pub fn load_as(path: &Path, source: Source) -> Result<Adapter> {
    let mut a = open(path, true, source)?;
    a.materialise()?;
    Ok(a)
}

/// Load for merging, with the reader `--from` chose: blocks are computed when the merge reaches
/// their tensor (so memory does not grow with the adapter) and source files are not hashed.
/// Values are still checked for NaN/Inf and geometry up front.
pub fn load_deferred_as(path: &Path, source: Source) -> Result<Adapter> {
    open(path, false, source)
}

/// Every reader's output is validated here (`Adapter::validate`), whatever the source format.
fn open(path: &Path, hash: bool, source: Source) -> Result<Adapter> {
    let adapter = read(path, hash, source)?;
    adapter.validate().map_err(|e| e.at(path))?;
    Ok(adapter)
}

fn read(path: &Path, hash: bool, source: Source) -> Result<Adapter> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let not = |what: &str| {
        err(
            Class::UnknownFormat,
            path,
            format!("--from {}: this is {what}", Source::NAMES[source as usize]),
        )
    };
    let peft_folder = |dir: &Path| match source {
        Source::Auto | Source::Peft | Source::PeftLegacyConv => {
            peft::load_folder(dir, hash, source)
        }
        _ => Err(not("a PEFT adapter folder")),
    };
    if meta.is_dir() {
        return peft_folder(path);
    }
    let f = std::sync::Arc::new(SafeFile::open(path)?);
    if canonical::is_canonical(&f) {
        return match source {
            Source::Auto | Source::Canonical => canonical::from_shared(&f),
            _ => Err(not("a canonical adapter file")),
        };
    }
    let names: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
    let has = |suffix: &str| names.iter().any(|n| n.ends_with(suffix));
    if has(".boft_R") || has(".oft_r") || has(".oft_R.weight") {
        let folder = path.parent().unwrap_or(Path::new("."));
        if folder.join("adapter_config.json").is_file() {
            return peft_folder(folder);
        }
        return Err(err(
            Class::BadAdapter,
            path,
            "looks like a PEFT adapter_model.safetensors but adapter_config.json is not beside it; \
             pass the adapter folder",
        ));
    }
    if lycoris::detect(&f) {
        return match source {
            Source::Auto => lycoris::import(&f, None),
            Source::Lycoris => lycoris::import(&f, Some(false)),
            Source::Kohya => lycoris::import(&f, Some(true)),
            _ => Err(not("a LyCORIS/kohya OFT file")),
        };
    }
    Err(err(
        Class::UnknownFormat,
        path,
        "not a recognised adapter (expected a canonical file, a PEFT adapter folder, or a LyCORIS/kohya OFT file)",
    ))
}
