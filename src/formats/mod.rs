//! Source formats. Each file here knows one framework's on-disk layout and turns it into the
//! canonical model; nothing outside this folder knows about any of them.

pub mod export;
pub mod lycoris;
pub mod peft;
pub mod peft_boft;
pub mod peft_oft;

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::adapter::{canonical, Adapter};
use crate::checkpoint::SafeFile;
use crate::error::{err, Class, Error, Result};

/// Load any adapter we can read (a canonical file, or a PEFT adapter folder), every block
/// computed and checked, with the sha256 of the source files.
pub fn load(path: &Path) -> Result<Adapter> {
    let mut a = open(path, true)?;
    a.materialise()?;
    Ok(a)
}

/// Load for merging: blocks are computed when the merge reaches their tensor (so memory does not
/// grow with the adapter) and source files are not hashed. Values are still checked for NaN/Inf
/// and geometry up front.
pub fn load_deferred(path: &Path) -> Result<Adapter> {
    open(path, false)
}

fn open(path: &Path, hash: bool) -> Result<Adapter> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return peft::load_folder(path, hash);
    }
    let f = std::sync::Arc::new(SafeFile::open(path)?);
    if canonical::is_canonical(&f) {
        return canonical::from_shared(&f);
    }
    let names: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
    let has = |suffix: &str| names.iter().any(|n| n.ends_with(suffix));
    if has(".boft_R") || has(".oft_r") || has(".oft_R.weight") {
        let folder = path.parent().unwrap_or(Path::new("."));
        if folder.join("adapter_config.json").is_file() {
            return peft::load_folder(folder, hash);
        }
        return Err(err(
            Class::BadAdapter,
            path,
            "looks like a PEFT adapter_model.safetensors but adapter_config.json is not beside it; \
             pass the adapter folder",
        ));
    }
    if lycoris::detect(&f) {
        return lycoris::import(&f);
    }
    Err(err(
        Class::UnknownFormat,
        path,
        "not a recognised adapter (expected a canonical file, a PEFT adapter folder, or a LyCORIS/kohya OFT file)",
    ))
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(format!("{:x}", h.finalize()))
}
