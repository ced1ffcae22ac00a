//! The canonical file, version 1 (docs/FORMAT.md): one safetensors file whose `__metadata__`
//! describes every target and whose tensors hold the materialised blocks, permutations, scales
//! and replacement tensors.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Adapter, BlockKind, Deferred, Replacement, Side, Target};
use crate::checkpoint::file::SafeFile;
use crate::checkpoint::{dtype, Dtype, OwnedTensor};
use crate::error::{err, Class, Error, Result};

/// The `format` metadata value that marks a canonical file.
pub const FORMAT_NAME: &str = "boft-canonical";
/// The canonical format version this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct TargetMeta {
    key: String,
    target: String,
    module: String,
    side: Side,
    #[serde(default)]
    shape: Option<Vec<usize>>,
    #[serde(default)]
    rows: Option<(usize, usize)>,
    factors: usize,
    blocks: usize,
    block_size: usize,
    block_kind: BlockKind,
    permuted: bool,
    scaled: bool,
    /// The rotated axis when shorter than blocks × block_size; written only for cropped targets
    /// (a reader that ignores it fails the geometry check instead of merging wrongly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crop: Option<usize>,
    /// The base tensor read as this (rows, cols) matrix, scale on its columns (PEFT ≤ 0.13
    /// Conv2d BOFT); written only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    view: Option<(usize, usize)>,
    /// One stored block per factor serves every position (PEFT `block_share`); `blocks` may be
    /// 0, the count then following from the base. Written only when set (a reader that ignores
    /// it finds the blocks tensor one block long and refuses it, unless there is one block).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    shared: bool,
    /// Where the target sits in its tensor's sequence of transforms (a composed adapter);
    /// written only when not 0. A reader that ignores it finds two targets on one tensor and
    /// refuses them, unless they are disjoint row slices, which commute.
    #[serde(default, skip_serializing_if = "is_zero")]
    stage: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

#[derive(Serialize, Deserialize)]
struct ReplacementMeta {
    key: String,
    target: String,
}

/// True when the file's metadata says it is a canonical adapter.
pub fn is_canonical(f: &SafeFile) -> bool {
    f.metadata
        .as_ref()
        .and_then(|m| m.get("format"))
        .is_some_and(|v| v == FORMAT_NAME)
}

/// Write `adapter` as a canonical file at `path` (staged, renamed into place when whole).
pub fn write(adapter: &Adapter, path: &Path) -> Result<()> {
    let bytes = to_bytes(adapter)?;
    crate::output::write_file_atomic(path, &bytes)
}

/// The bytes of the canonical file for `adapter`.
pub fn to_bytes(adapter: &Adapter) -> Result<Vec<u8>> {
    let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut tensors: Vec<(String, OwnedTensor)> = Vec::new();
    let mut metas = Vec::new();
    let mut keys = std::collections::HashSet::new();
    // Stage 0 keys are the labels; a later stage's key is its label and `#stage`, or another
    // free name when a target is literally named like that. Two targets with one key cannot
    // both be stored (and the serialiser would panic). Nothing else is checked here:
    // `Adapter::validate` judges what is read back.
    let mut stage_keys: Vec<String> = Vec::with_capacity(adapter.targets.len());
    for t in &adapter.targets {
        let key = t.label();
        if t.stage == 0 && !keys.insert(key.clone()) {
            return Err(Error::bare(
                Class::BadAdapter,
                format!("{key} is targeted twice"),
            ));
        }
        stage_keys.push(key);
    }
    for (t, key) in adapter.targets.iter().zip(stage_keys.iter_mut()) {
        if t.stage > 0 {
            let mut n = 1;
            *key = format!("{}#{}", t.label(), t.stage);
            while !keys.insert(key.clone()) {
                n += 1;
                *key = format!("{}#{}.{n}", t.label(), t.stage);
            }
        }
    }
    for (t, key) in adapter.targets.iter().zip(stage_keys) {
        tensors.push((
            format!("{key}::blocks"),
            OwnedTensor {
                dtype: safetensors::Dtype::F32,
                shape: vec![t.factors, t.stored(), t.block_size, t.block_size],
                data: f32_bytes(&t.blocks_data()?),
            },
        ));
        let permuted = t.perms.iter().any(Option::is_some);
        if permuted {
            let n = t.n() as u32;
            let mut data = Vec::with_capacity(t.factors * t.n() * 4);
            for p in &t.perms {
                match p {
                    Some(p) => data.extend(p.iter().flat_map(|x| (*x as i32).to_le_bytes())),
                    None => data.extend((0..n).flat_map(|x| (x as i32).to_le_bytes())),
                }
            }
            tensors.push((
                format!("{key}::perm"),
                OwnedTensor {
                    dtype: safetensors::Dtype::I32,
                    shape: vec![t.factors, t.n()],
                    data,
                },
            ));
        }
        if let Some(s) = &t.scale {
            tensors.push((
                format!("{key}::scale"),
                OwnedTensor {
                    dtype: safetensors::Dtype::F32,
                    shape: vec![s.len()],
                    data: f32_bytes(s),
                },
            ));
        }
        metas.push(TargetMeta {
            key,
            target: t.name.clone(),
            module: t.module.clone(),
            side: t.side,
            shape: t.shape.clone(),
            rows: t.rows,
            factors: t.factors,
            blocks: t.blocks,
            block_size: t.block_size,
            block_kind: t.kind,
            permuted,
            scaled: t.scale.is_some(),
            crop: t.crop,
            view: t.view,
            shared: t.share,
            stage: t.stage,
        });
    }
    let mut rmetas = Vec::new();
    for r in &adapter.replacements {
        let key = format!("{}::replace", r.name);
        if !keys.insert(key.clone()) {
            return Err(Error::bare(
                Class::BadAdapter,
                format!("{} is replaced twice", r.name),
            ));
        }
        let dtype = r.dtype.to_safetensors().ok_or_else(|| {
            Error::bare(
                Class::UnsupportedDtype,
                format!("replacement {} has dtype {}", r.name, r.dtype.name()),
            )
        })?;
        tensors.push((
            key.clone(),
            OwnedTensor {
                dtype,
                shape: r.shape.clone(),
                data: r.data.clone(),
            },
        ));
        rmetas.push(ReplacementMeta {
            key,
            target: r.name.clone(),
        });
    }
    let mut meta: HashMap<String, String> = HashMap::new();
    meta.insert("format".into(), FORMAT_NAME.into());
    meta.insert("format_version".into(), FORMAT_VERSION.to_string());
    meta.insert("source_format".into(), adapter.source_format.clone());
    meta.insert("source_version".into(), adapter.source_version.clone());
    meta.insert(
        "source_sha256".into(),
        serde_json::to_string(&adapter.source_sha256).expect("map serialises"),
    );
    meta.insert(
        "targets".into(),
        serde_json::to_string(&metas).expect("serialises"),
    );
    meta.insert(
        "replacements".into(),
        serde_json::to_string(&rmetas).expect("serialises"),
    );
    meta.insert(
        "writer".into(),
        format!("boft {}", env!("CARGO_PKG_VERSION")),
    );
    crate::checkpoint::serialize(tensors.iter().map(|(k, t)| (k, t)), meta)
}

/// Read a canonical file, every block checked.
pub fn read(path: &Path) -> Result<Adapter> {
    from_file(SafeFile::open(path)?)
}

/// Read a canonical file with every block decoded.
pub fn from_file(f: SafeFile) -> Result<Adapter> {
    let path = f.path.clone();
    let mut a = from_shared(&Arc::new(f))?;
    a.validate().map_err(|e| e.at(&path))?;
    a.materialise()?;
    Ok(a)
}

/// Read a canonical file, leaving the blocks in the (mapped) file until they are needed; their
/// values are checked for NaN/Inf here. Not validated (`formats::open` validates every reader's
/// output).
pub fn from_shared(f: &Arc<SafeFile>) -> Result<Adapter> {
    let path = f.path.as_path();
    let meta = f
        .metadata
        .as_ref()
        .filter(|_| is_canonical(f))
        .ok_or_else(|| err(Class::UnknownFormat, path, "not a canonical adapter file"))?;
    let bad = |m: String| err(Class::BadAdapter, path, m);
    let version: u32 = meta
        .get("format_version")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("missing format_version".into()))?;
    if version > FORMAT_VERSION {
        return Err(bad(format!(
            "canonical format version {version} is newer than this tool reads ({FORMAT_VERSION})"
        )));
    }
    let get_json = |k: &str| -> Result<&str> {
        meta.get(k)
            .map(String::as_str)
            .ok_or_else(|| bad(format!("metadata lacks {k:?}")))
    };
    let metas: Vec<TargetMeta> = serde_json::from_str(get_json("targets")?)
        .map_err(|e| bad(format!("metadata \"targets\" is malformed ({e})")))?;
    let rmetas: Vec<ReplacementMeta> = match meta.get("replacements") {
        Some(s) => serde_json::from_str(s)
            .map_err(|e| bad(format!("metadata \"replacements\" is malformed ({e})")))?,
        None => vec![],
    };
    let source_sha256: BTreeMap<String, String> = match meta.get("source_sha256") {
        Some(s) => serde_json::from_str(s)
            .map_err(|e| bad(format!("metadata \"source_sha256\" is malformed ({e})")))?,
        None => BTreeMap::new(),
    };
    let tensor = |name: &str, want_dtype: Dtype, want_shape: &[usize]| -> Result<&[u8]> {
        let t = f
            .tensor(name)
            .ok_or_else(|| bad(format!("tensor {name:?} is missing")))?;
        if t.dtype != want_dtype || t.shape != want_shape {
            return Err(bad(format!(
                "tensor {name:?} is {} {:?}, expected {} {:?}",
                t.dtype.name(),
                t.shape,
                want_dtype.name(),
                want_shape
            )));
        }
        Ok(f.data(t))
    };
    let to_f32 = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let mut targets = Vec::with_capacity(metas.len());
    // Each record owns its tensors: two records naming one key would each decode the same
    // bytes again, so that a file's work could grow with its records and not its bytes.
    let mut keys = std::collections::HashSet::new();
    for k in metas
        .iter()
        .map(|m| &m.key)
        .chain(rmetas.iter().map(|r| &r.key))
    {
        if !keys.insert(k.as_str()) {
            return Err(bad(format!("key {k:?} is used by two records")));
        }
    }
    for m in metas {
        let (nf, d, h) = (m.factors, m.blocks, m.block_size);
        // Checked before anything is sized by these numbers: with one of them zero the blocks
        // tensor is empty and the others could be anything.
        if nf == 0 || (d == 0 && !m.shared) || h == 0 {
            return Err(bad(format!(
                "{}: empty transform (zero factors, blocks or block size)",
                m.key
            )));
        }
        let n = d
            .checked_mul(h)
            .ok_or_else(|| bad(format!("{}: geometry overflows", m.key)))?;
        let blocks_key = format!("{}::blocks", m.key);
        let stored = if m.shared { 1 } else { d };
        let raw = tensor(&blocks_key, Dtype::F32, &[nf, stored, h, h])?;
        if let Some((i, x)) = dtype::first_non_finite(Dtype::F32, raw) {
            return Err(err(
                Class::NonFinite,
                path,
                format!("{}: block value #{i} is {x} (NaN/Inf)", m.target),
            ));
        }
        let deferred = {
            let f = f.clone();
            Deferred {
                path: path.to_path_buf(),
                base_dtype: None,
                compute: Arc::new(move |_| {
                    let t = f
                        .tensor(&blocks_key)
                        .expect("checked when the file was read");
                    Ok(dtype::decode_any_f32(Dtype::F32, f.data(t)).expect("f32"))
                }),
            }
        };
        let perms = if m.permuted {
            let raw = tensor(&format!("{}::perm", m.key), Dtype::I32, &[nf, n])?;
            let all: Vec<i32> = raw
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let mut perms = Vec::with_capacity(nf);
            for (i, row) in all.chunks(n.max(1)).enumerate().take(nf) {
                if row.iter().any(|&x| x < 0 || x as usize >= n) {
                    return Err(err(
                        Class::BadAdapter,
                        path,
                        format!("{}: factor {i}: gather index out of range 0..{n}", m.key),
                    ));
                }
                let p: Vec<u32> = row.iter().map(|&x| x as u32).collect();
                perms.push(if crate::math::perm::is_identity(&p) {
                    None
                } else {
                    Some(p)
                });
            }
            perms
        } else {
            vec![None; nf]
        };
        let scale = if m.scaled {
            // A view's scale is on its columns (validate checks the length).
            let len = match (m.rows, m.view) {
                (Some((a, b)), None) => b.saturating_sub(a),
                _ => f
                    .tensor(&format!("{}::scale", m.key))
                    .map(|t| t.numel())
                    .unwrap_or(0),
            };
            Some(to_f32(tensor(
                &format!("{}::scale", m.key),
                Dtype::F32,
                &[len],
            )?))
        } else {
            None
        };
        let t = Target {
            name: m.target,
            module: m.module,
            side: m.side,
            shape: m.shape,
            rows: m.rows,
            factors: nf,
            blocks: d,
            block_size: h,
            deferred: Some(deferred),
            perms,
            scale,
            kind: m.block_kind,
            crop: m.crop,
            view: m.view,
            share: m.shared,
            stage: m.stage,
            ..Default::default()
        };
        targets.push(t);
    }
    let mut replacements = Vec::new();
    for r in rmetas {
        let t = f
            .tensor(&r.key)
            .ok_or_else(|| bad(format!("tensor {:?} is missing", r.key)))?;
        if t.dtype.float_size().is_none() {
            return Err(bad(format!(
                "replacement {:?} is {}",
                r.key,
                t.dtype.name()
            )));
        }
        let data = f.data(t).to_vec();
        if let Some(v) = dtype::decode_any_f32(t.dtype, &data) {
            if v.iter().any(|x| !x.is_finite()) {
                return Err(err(
                    Class::NonFinite,
                    path,
                    format!("replacement for {} holds NaN/Inf", r.target),
                ));
            }
        }
        replacements.push(Replacement {
            name: r.target,
            dtype: t.dtype,
            shape: t.shape.clone(),
            data,
        });
    }
    let adapter = Adapter {
        targets,
        replacements,
        source_format: meta.get("source_format").cloned().unwrap_or_default(),
        source_version: meta.get("source_version").cloned().unwrap_or_default(),
        source_sha256,
    };
    Ok(adapter)
}
