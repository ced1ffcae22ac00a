//! Where the harness finds its scripts and puts its outputs by default: this repository.

use std::path::PathBuf;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
