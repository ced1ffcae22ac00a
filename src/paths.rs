//! Path checks shared by the checkpoint layouts (shard names in an index) and the hub (subpaths
//! of a hub id): a leaf, so that neither has to import the other for it.

use std::path::{Component, Path, PathBuf};

/// A relative path with only normal components, or None (absolute, `..`, empty).
pub fn safe_relative(s: &str) -> Option<PathBuf> {
    let p = Path::new(s);
    if s.is_empty() || p.is_absolute() {
        return None;
    }
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(x) => out.push(x),
            Component::CurDir => {}
            _ => return None,
        }
    }
    if out.as_os_str().is_empty() {
        None
    } else {
        Some(out)
    }
}
