//! Path facts shared by the checkpoint layouts and the hub, in a leaf so that neither imports the
//! other for them: relative paths that cannot escape (shard names in an index, subpaths of a hub
//! id), and where a Hugging Face cache snapshot's files really live (its repository's `blobs/`),
//! which confinement allows.

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

/// Where a folder inside a cache snapshot may also read from: the repository's `blobs/` folder,
/// when `canon_root` (a canonical path) lies inside `…/models--<org>--<name>/snapshots/<commit>/`
/// and `blobs/` is a real folder (not a symlink that could lead anywhere).
pub fn blobs_of(canon_root: &Path) -> Option<PathBuf> {
    let comps: Vec<Component> = canon_root.components().collect();
    let i = comps
        .iter()
        .rposition(|c| matches!(c, Component::Normal(n) if *n == "snapshots"))?;
    let repo_name = match comps.get(i.checked_sub(1)?)? {
        Component::Normal(n) => n.to_str()?,
        _ => return None,
    };
    let commit = match comps.get(i + 1)? {
        Component::Normal(n) => n.to_str()?,
        _ => return None,
    };
    if !(repo_name.starts_with("models--") || repo_name.starts_with("datasets--"))
        || commit.is_empty()
    {
        return None;
    }
    let repo: PathBuf = comps[..i].iter().collect();
    let blobs = repo.join("blobs");
    let meta = std::fs::symlink_metadata(&blobs).ok()?;
    meta.is_dir().then_some(blobs)
}

/// Whether `real` (a canonical path) is a blob of the cache repository `blobs`: directly inside
/// it, as huggingface_hub stores them.
pub fn is_blob(blobs: &Path, real: &Path) -> bool {
    real.parent() == Some(blobs)
}
