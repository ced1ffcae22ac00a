//! Reading checkpoints: one `.safetensors` file, a folder with `model.safetensors`, or a folder
//! with `model.safetensors.index.json` and its shards. Everything is memory-mapped; nothing is
//! read whole.

pub mod dtype;
pub mod file;

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

pub use dtype::Dtype;
pub use file::{serialize, OwnedTensor, SafeFile, TensorInfo};

use crate::error::{err, Class, Error, Result};

pub const INDEX_NAME: &str = "model.safetensors.index.json";
pub const SINGLE_NAME: &str = "model.safetensors";
/// (index, single file) names a checkpoint folder may use: Hugging Face transformers, then the
/// component folders of a diffusers pipeline (`unet/`, `transformer/`, `text_encoder/`).
const FOLDER_NAMES: &[(&str, &str)] = &[
    (INDEX_NAME, SINGLE_NAME),
    (
        "diffusion_pytorch_model.safetensors.index.json",
        "diffusion_pytorch_model.safetensors",
    ),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// A bare `.safetensors` file.
    File,
    /// A folder holding `model.safetensors`.
    Folder,
    /// A folder holding an index and its shards.
    Sharded,
}

pub struct Checkpoint {
    /// The path the user gave (file or folder).
    pub root: PathBuf,
    pub layout: Layout,
    /// Safetensors files, each with its path relative to the folder (its file name for `File`).
    pub files: Vec<(PathBuf, SafeFile)>,
    /// Other files of the folder to copy verbatim, relative to the folder (index.json included).
    pub others: Vec<PathBuf>,
    by_name: HashMap<String, (usize, usize)>,
}

impl Checkpoint {
    pub fn open(root: &Path) -> Result<Checkpoint> {
        let meta = std::fs::metadata(root).map_err(|e| Error::io(root, e))?;
        if !meta.is_dir() {
            let f = SafeFile::open(root)?;
            let name = PathBuf::from(root.file_name().unwrap_or_default());
            return Checkpoint::assemble(root, Layout::File, vec![(name, f)], vec![]);
        }
        let canon_root = root.canonicalize().map_err(|e| Error::io(root, e))?;
        let (index_name, single_name) = FOLDER_NAMES
            .iter()
            .copied()
            .find(|(i, s)| root.join(i).exists() || root.join(s).exists())
            .unwrap_or(FOLDER_NAMES[0]);
        let index_path = root.join(index_name);
        let (layout, shard_names) = if index_path.exists() {
            confine(&canon_root, &index_path)?;
            (Layout::Sharded, read_index(&index_path)?)
        } else if root.join(single_name).exists() {
            (Layout::Folder, vec![(PathBuf::from(single_name), vec![])])
        } else {
            let components: Vec<&str> = ["unet", "transformer", "text_encoder", "text_encoder_2"]
                .into_iter()
                .filter(|c| {
                    FOLDER_NAMES.iter().any(|(i, s)| {
                        root.join(c).join(i).exists() || root.join(c).join(s).exists()
                    })
                })
                .collect();
            return Err(err(
                Class::NotFound,
                root,
                if components.is_empty() {
                    format!("folder holds neither {SINGLE_NAME} nor {INDEX_NAME}")
                } else {
                    format!(
                        "a diffusers pipeline folder: pass one component folder ({})",
                        components.join(", ")
                    )
                },
            ));
        };
        let mut files = Vec::new();
        for (rel, _) in &shard_names {
            let p = root.join(rel);
            if !p.exists() {
                return Err(err(
                    Class::MissingShard,
                    &p,
                    format!("shard named in {index_name} does not exist"),
                ));
            }
            confine(&canon_root, &p)?;
            files.push((rel.clone(), SafeFile::open(&p)?));
        }
        let shard_set: std::collections::HashSet<&PathBuf> =
            shard_names.iter().map(|(p, _)| p).collect();
        let mut others = Vec::new();
        list_others(root, &canon_root, Path::new(""), &shard_set, &mut others)?;
        others.sort();
        let ck = Checkpoint::assemble(root, layout, files, others)?;
        // Every tensor the index names must be in the shard it names.
        for (rel, names) in &shard_names {
            for n in names {
                match ck.by_name.get(n) {
                    Some(&(fi, _)) if &ck.files[fi].0 == rel => {}
                    Some(&(fi, _)) => {
                        return Err(err(
                            Class::BadIndex,
                            &index_path,
                            format!(
                                "index puts {n:?} in {} but it is stored in {}",
                                rel.display(),
                                ck.files[fi].0.display()
                            ),
                        ))
                    }
                    None => {
                        return Err(err(
                            Class::BadIndex,
                            &index_path,
                            format!(
                                "index names tensor {n:?} which {} does not hold",
                                rel.display()
                            ),
                        ))
                    }
                }
            }
        }
        Ok(ck)
    }

    fn assemble(
        root: &Path,
        layout: Layout,
        files: Vec<(PathBuf, SafeFile)>,
        others: Vec<PathBuf>,
    ) -> Result<Checkpoint> {
        let mut by_name = HashMap::new();
        for (fi, (_, f)) in files.iter().enumerate() {
            for (ti, t) in f.tensors.iter().enumerate() {
                if let Some((prev, _)) = by_name.insert(t.name.clone(), (fi, ti)) {
                    return Err(err(
                        Class::DuplicateTensor,
                        &f.path,
                        format!(
                            "tensor {:?} is also stored in {}",
                            t.name,
                            files[prev].1.path.display()
                        ),
                    ));
                }
            }
        }
        Ok(Checkpoint {
            root: root.to_path_buf(),
            layout,
            files,
            others,
            by_name,
        })
    }

    pub fn get(&self, name: &str) -> Option<(&SafeFile, &TensorInfo)> {
        self.by_name.get(name).map(|&(fi, ti)| {
            let f = &self.files[fi].1;
            (f, &f.tensors[ti])
        })
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.files
            .iter()
            .flat_map(|(_, f)| f.tensors.iter().map(|t| t.name.as_str()))
    }

    pub fn is_folder(&self) -> bool {
        self.layout != Layout::File
    }

    /// Total bytes of all safetensors files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|(_, f)| f.len() as u64).sum()
    }
}

/// An index larger than this is not an index (a real one for thousands of tensors is well under 1 MB).
pub const MAX_INDEX: u64 = 100_000_000;

/// Read and parse an index file.
fn read_index(path: &Path) -> Result<Vec<(PathBuf, Vec<String>)>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(err(Class::BadIndex, path, "is not a regular file"));
    }
    if meta.len() > MAX_INDEX {
        return Err(err(
            Class::BadIndex,
            path,
            format!(
                "{} bytes exceeds the {MAX_INDEX}-byte limit for an index",
                meta.len()
            ),
        ));
    }
    let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_index(&text).map_err(|e| e.at(path))
}

/// Parse the bytes of a `model.safetensors.index.json`, returning each shard (in order of first
/// appearance, as a safe relative path) with the tensors it holds. Errors carry no path.
pub fn parse_index(bytes: &[u8]) -> Result<Vec<(PathBuf, Vec<String>)>> {
    fn bare(class: Class, message: impl Into<String>) -> Error {
        Error::bare(class, message)
    }
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| bare(Class::BadIndex, format!("not valid JSON ({e})")))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| bare(Class::BadIndex, "no \"weight_map\" object"))?;
    let mut shards: Vec<(PathBuf, Vec<String>)> = Vec::new();
    let mut pos: HashMap<PathBuf, usize> = HashMap::new();
    for (tensor, shard) in map {
        let shard = shard.as_str().ok_or_else(|| {
            bare(
                Class::BadIndex,
                format!("weight_map entry for {tensor:?} is not a string"),
            )
        })?;
        let rel = safe_relative(shard).ok_or_else(|| {
            bare(
                Class::PathEscape,
                format!("shard {shard:?} points outside the checkpoint folder"),
            )
        })?;
        // `a.safetensors` and `./a.safetensors` are one shard.
        let i = *pos.entry(rel.clone()).or_insert_with(|| {
            shards.push((rel, Vec::new()));
            shards.len() - 1
        });
        shards[i].1.push(tensor.clone());
    }
    if shards.is_empty() {
        return Err(bare(Class::BadIndex, "weight_map is empty"));
    }
    Ok(shards)
}

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

/// Refuse a path whose real location (after following symlinks) leaves the folder.
fn confine(canon_root: &Path, p: &Path) -> Result<PathBuf> {
    let real = p.canonicalize().map_err(|e| Error::io(p, e))?;
    if !real.starts_with(canon_root) {
        return Err(err(
            Class::PathEscape,
            p,
            format!(
                "resolves to {} outside the checkpoint folder; symlinks are followed only inside it",
                real.display()
            ),
        ));
    }
    Ok(real)
}

/// Folders nested deeper than this (symlinks included) are refused rather than walked.
const MAX_DEPTH: usize = 64;

/// Collect the folder's other files. `ancestors` holds the real paths of the folders being
/// walked, so a symlink leading back to one of them (a cycle) is refused instead of followed
/// forever.
fn list_others(
    root: &Path,
    canon_root: &Path,
    rel: &Path,
    shards: &std::collections::HashSet<&PathBuf>,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    let mut ancestors = vec![canon_root.to_path_buf()];
    walk_others(root, canon_root, rel, shards, out, &mut ancestors)
}

fn walk_others(
    root: &Path,
    canon_root: &Path,
    rel: &Path,
    shards: &std::collections::HashSet<&PathBuf>,
    out: &mut Vec<PathBuf>,
    ancestors: &mut Vec<PathBuf>,
) -> Result<()> {
    let dir = root.join(rel);
    let rd = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(&dir, e))?;
        let r = rel.join(entry.file_name());
        if shards.contains(&r) {
            continue;
        }
        let p = root.join(&r);
        let real = confine(canon_root, &p)?;
        let meta = std::fs::metadata(&real).map_err(|e| Error::io(&p, e))?;
        if meta.is_dir() {
            if ancestors.contains(&real) {
                return Err(err(
                    Class::SymlinkLoop,
                    &p,
                    format!(
                        "leads back to {}, which contains it (a symlink cycle)",
                        real.display()
                    ),
                ));
            }
            if ancestors.len() > MAX_DEPTH {
                return Err(err(
                    Class::SymlinkLoop,
                    &p,
                    format!("nested more than {MAX_DEPTH} folders deep"),
                ));
            }
            ancestors.push(real);
            walk_others(root, canon_root, &r, shards, out, ancestors)?;
            ancestors.pop();
        } else if meta.is_file() {
            out.push(r);
        } else {
            return Err(err(
                Class::Io,
                &p,
                "is not a regular file or folder (a FIFO, socket or device); it cannot be copied",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_relative_rejects_escapes() {
        assert!(safe_relative("../x.safetensors").is_none());
        assert!(safe_relative("/etc/passwd").is_none());
        assert!(safe_relative("a/../../b").is_none());
        assert!(safe_relative("").is_none());
        assert_eq!(
            safe_relative("./model-1.safetensors").unwrap(),
            PathBuf::from("model-1.safetensors")
        );
    }
}
