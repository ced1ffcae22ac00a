//! The Hugging Face hub cache, offline: naming a model by its hub id (`org/name[@revision]`) and
//! knowing the cache's layout, so a snapshot folder (whose files are relative symlinks into the
//! repository's `blobs/`) can be read without opening the way to the rest of the disk.
//!
//! Layout, as huggingface_hub writes it (`file_download.py`: `repo_folder_name`,
//! `_create_symlink`, `_cache_commit_hash_for_specific_revision`):
//!
//! ```text
//! <cache>/models--<org>--<name>/refs/<branch>          the commit hash the branch points to
//! <cache>/models--<org>--<name>/blobs/<etag>           file contents (sha256 or git sha1)
//! <cache>/models--<org>--<name>/snapshots/<commit>/…   relative symlinks ../../blobs/<etag>
//! ```
//!
//! Nothing here touches the network: a repository or revision that is not in the cache is an
//! error naming the cache searched.

use std::path::{Path, PathBuf};

use crate::error::{err, Class, Error, Result};

/// The cache folder and how it was chosen, with huggingface_hub's precedence (`constants.py`):
/// `HF_HUB_CACHE`, then the older `HUGGINGFACE_HUB_CACHE`, then `HF_HOME/hub`, then
/// `$XDG_CACHE_HOME/huggingface/hub`, then `~/.cache/huggingface/hub`.
pub fn cache_dir() -> (PathBuf, &'static str) {
    cache_dir_from(|k| std::env::var_os(k).filter(|v| !v.is_empty()))
}

fn cache_dir_from(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> (PathBuf, &'static str) {
    let expand = |v: std::ffi::OsString| -> PathBuf {
        // huggingface_hub applies os.path.expanduser to these.
        let s = v.to_string_lossy();
        match (s.strip_prefix("~/"), var("HOME")) {
            (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
            _ => PathBuf::from(v),
        }
    };
    if let Some(v) = var("HF_HUB_CACHE") {
        return (expand(v), "HF_HUB_CACHE");
    }
    if let Some(v) = var("HUGGINGFACE_HUB_CACHE") {
        return (expand(v), "HUGGINGFACE_HUB_CACHE");
    }
    if let Some(v) = var("HF_HOME") {
        return (expand(v).join("hub"), "HF_HOME");
    }
    if let Some(v) = var("XDG_CACHE_HOME") {
        return (expand(v).join("huggingface").join("hub"), "XDG_CACHE_HOME");
    }
    let home = var("HOME").map(PathBuf::from).unwrap_or_default();
    (
        home.join(".cache").join("huggingface").join("hub"),
        "the default",
    )
}

/// A parsed hub id: `org/name`, an optional `@revision`, an optional path inside the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    /// `org/name`.
    pub repo: String,
    /// The branch, tag or commit (`main` unless given).
    pub revision: String,
    /// A path inside the repository, when given.
    pub subpath: Option<PathBuf>,
}

/// Parse `org/name[@revision][/path/in/repo]`, or None when the text is not shaped like one.
/// Revisions are a branch or tag name without `/`, or a commit hash.
pub fn parse_id(text: &str) -> Option<HubId> {
    let ok_part = |s: &str| {
        !s.is_empty()
            && s.len() <= 96
            && s != "."
            && s != ".."
            && !s.starts_with('-')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let mut parts = text.splitn(3, '/');
    let org = parts.next()?;
    let name_rev = parts.next()?;
    let rest = parts.next();
    let (name, revision) = match name_rev.split_once('@') {
        Some((n, r)) => (n, r),
        None => (name_rev, "main"),
    };
    if !ok_part(org) || !ok_part(name) || !ok_part(revision) {
        return None;
    }
    let subpath = match rest {
        Some(r) => Some(crate::paths::safe_relative(r)?),
        None => None,
    };
    Some(HubId {
        repo: format!("{org}/{name}"),
        revision: revision.to_string(),
        subpath,
    })
}

/// What the argument names, so that a repository root can be narrowed to the one file that
/// holds an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A checkpoint (file or folder).
    Checkpoint,
    /// An adapter (folder or one file).
    Adapter,
}

/// The path an argument of a command names: the argument itself when it exists on disk, else
/// the snapshot of the hub id it spells, found in the local cache. An adapter repository without
/// `adapter_config.json` whose snapshot holds exactly one `.safetensors` file names that file.
pub fn locate(arg: &Path, role: Role) -> Result<PathBuf> {
    if std::fs::symlink_metadata(arg).is_ok() {
        return Ok(arg.to_path_buf());
    }
    let id = arg.to_str().and_then(parse_id).ok_or_else(|| {
        err(
            Class::NotFound,
            arg,
            "no such file or folder (nor is it a hub id org/name[@revision])",
        )
    })?;
    let (cache, how) = cache_dir();
    let found = snapshot(&cache, &id).map_err(|e| match e.path {
        Some(_) => e,
        None => err(
            e.class,
            arg,
            format!(
                "no such file or folder, and as a hub id: {} (Hugging Face cache {}, chosen by \
                 {how}; nothing is downloaded: fetch it first, e.g. `huggingface-cli download {}`)",
                e.message,
                cache.display(),
                id.repo
            ),
        ),
    })?;
    if role == Role::Adapter && id.subpath.is_none() && !found.join("adapter_config.json").exists()
    {
        if let Some(file) = only_safetensors(&found)? {
            return Ok(file);
        }
    }
    Ok(found)
}

/// The snapshot folder (or the path inside it) of a hub id in `cache`.
pub fn snapshot(cache: &Path, id: &HubId) -> Result<PathBuf> {
    let repo_dir = cache.join(format!("models--{}", id.repo.replace('/', "--")));
    if !repo_dir.is_dir() {
        return Err(Error::bare(
            Class::NotFound,
            format!("repository {} is not in the cache", id.repo),
        ));
    }
    // A branch or tag is a file under refs/ holding the commit hash; anything else must be the
    // name of a snapshot (a commit hash), as huggingface_hub's try_to_load_from_cache resolves.
    let ref_file = repo_dir.join("refs").join(&id.revision);
    let commit = if ref_file.is_file() {
        let text = read_small(&ref_file)?;
        let hash = text.trim();
        if !is_commit_hash(hash) {
            return Err(err(
                Class::BadIndex,
                &ref_file,
                format!("does not hold a commit hash (found {:?})", truncate(hash)),
            ));
        }
        hash.to_string()
    } else {
        id.revision.clone()
    };
    let snap = repo_dir.join("snapshots").join(&commit);
    if !snap.is_dir() {
        return Err(Error::bare(
            Class::NotFound,
            if commit == id.revision {
                format!(
                    "revision {:?} of {} is not in the cache (no refs/{} and no snapshot {})",
                    id.revision, id.repo, id.revision, id.revision
                )
            } else {
                format!(
                    "revision {:?} of {} points to commit {commit}, whose snapshot is not in the cache",
                    id.revision, id.repo
                )
            },
        ));
    }
    match &id.subpath {
        None => Ok(snap),
        Some(p) => {
            let full = snap.join(p);
            if std::fs::symlink_metadata(&full).is_err() {
                return Err(Error::bare(
                    Class::NotFound,
                    format!(
                        "{} is not in the cached snapshot {commit} of {}",
                        p.display(),
                        id.repo
                    ),
                ));
            }
            Ok(full)
        }
    }
}

/// The one `.safetensors` file directly in `dir`, if there is exactly one.
fn only_safetensors(dir: &Path) -> Result<Option<PathBuf>> {
    let mut found = None;
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let p = e.path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            if found.is_some() {
                return Ok(None);
            }
            found = Some(p);
        }
    }
    Ok(found)
}

fn read_small(p: &Path) -> Result<String> {
    use std::io::Read;
    // Not blocking on a FIFO planted as a ref, not reading a device.
    let f = crate::checkpoint::file::open_regular(p, "a ref file")?;
    let mut s = String::new();
    // A ref holds 40 characters; reading more would only let a hostile file cost memory.
    f.take(256)
        .read_to_string(&mut s)
        .map_err(|e| Error::io(p, e))?;
    Ok(s)
}

fn truncate(s: &str) -> String {
    s.chars().take(48).collect()
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hub_ids() {
        let id = parse_id("org/name").unwrap();
        assert_eq!(
            (id.repo.as_str(), id.revision.as_str()),
            ("org/name", "main")
        );
        assert_eq!(id.subpath, None);
        let id = parse_id("stabilityai/sdxl-base-1.0@v1.0/unet").unwrap();
        assert_eq!(id.repo, "stabilityai/sdxl-base-1.0");
        assert_eq!(id.revision, "v1.0");
        assert_eq!(id.subpath, Some(PathBuf::from("unet")));
        for bad in [
            "name",
            "org/",
            "/abs/path",
            "../x",
            "org/name@",
            "org/name@..",
            "org/name/../../etc",
            "org/na me",
            "./a",
        ] {
            assert!(parse_id(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn cache_precedence() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        let all: &[(&str, &str)] = &[
            ("HF_HUB_CACHE", "/a"),
            ("HUGGINGFACE_HUB_CACHE", "/b"),
            ("HF_HOME", "/c"),
            ("XDG_CACHE_HOME", "/d"),
            ("HOME", "/h"),
        ];
        assert_eq!(cache_dir_from(env(all)).0, PathBuf::from("/a"));
        assert_eq!(cache_dir_from(env(&all[1..])).0, PathBuf::from("/b"));
        assert_eq!(cache_dir_from(env(&all[2..])).0, PathBuf::from("/c/hub"));
        assert_eq!(
            cache_dir_from(env(&all[3..])).0,
            PathBuf::from("/d/huggingface/hub")
        );
        assert_eq!(
            cache_dir_from(env(&all[4..])).0,
            PathBuf::from("/h/.cache/huggingface/hub")
        );
        assert_eq!(
            cache_dir_from(env(&[("HF_HOME", "~/hf"), ("HOME", "/h")])).0,
            PathBuf::from("/h/hf/hub")
        );
    }
}
