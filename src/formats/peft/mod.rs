//! Hugging Face PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors`.
//! Dispatches on `peft_type`; the per-method files (`boft`, `oft`) do the maths, `export` writes
//! such folders back out.

pub mod boft;
pub mod export;
pub mod oft;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use crate::adapter::{Adapter, Replacement};
use crate::checkpoint::{dtype, Dtype, SafeFile, TensorInfo};
use crate::error::{err, Class, Error, Result};
use crate::formats::read::sha256_hex;

/// The config file of a PEFT adapter folder.
pub const CONFIG: &str = "adapter_config.json";
/// The weights file of a PEFT adapter folder.
pub const WEIGHTS: &str = "adapter_model.safetensors";
/// Prefix PEFT puts in front of every module path.
pub const PREFIX: &str = "base_model.model.";

/// Load a PEFT adapter folder. With `hash`, record the sha256 of its files (what a canonical
/// file keeps as provenance); a merge skips that read of the whole adapter.
pub fn load_folder(dir: &Path, hash: bool, source: crate::formats::Source) -> Result<Adapter> {
    let cfg_path = dir.join(CONFIG);
    if !cfg_path.is_file() {
        let subs: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join(CONFIG).is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let msg = if subs.is_empty() {
            format!("no {CONFIG}: not a PEFT adapter folder")
        } else {
            format!(
                "no {CONFIG} here, but adapters in subfolders {}: pass one of them",
                subs.join(", ")
            )
        };
        return Err(err(Class::NotFound, dir, msg));
    }
    // Confined like a checkpoint folder: symlinks only inside the folder (or, in a Hugging Face
    // cache snapshot, into its repository's blobs/).
    let confined = crate::checkpoint::Confinement::adapter(dir)?;
    confined.check(&cfg_path)?;
    let text = read_config(&cfg_path, confined.open(&cfg_path, "a JSON file")?)?;
    let config = parse_config(&text, &cfg_path)?;
    let weights = dir.join(WEIGHTS);
    if weights.exists() {
        confined.check(&weights)?;
    }
    if !weights.is_file() {
        let msg = if dir.join("adapter_model.bin").is_file() {
            format!("only adapter_model.bin (a pickle) is present; {WEIGHTS} is required (pickles are not loaded)")
        } else {
            format!("{WEIGHTS} is missing")
        };
        return Err(err(Class::NotFound, &weights, msg));
    }
    let f = Arc::new(SafeFile::from_file(
        &weights,
        confined.open(&weights, crate::checkpoint::file::SAFETENSORS)?,
    )?);
    let legacy = match source {
        crate::formats::Source::Peft => Some(false),
        crate::formats::Source::PeftLegacyConv => Some(true),
        _ => None,
    };
    let mut adapter = import_config(&config, &cfg_path, &f, legacy)?;
    if hash {
        adapter
            .source_sha256
            .insert(CONFIG.into(), sha256_hex(&text));
        adapter
            .source_sha256
            .insert(WEIGHTS.into(), sha256_hex(f.bytes()));
    }
    Ok(adapter)
}

/// The most bytes an `adapter_config.json` may hold. PEFT writes a few kilobytes (a long
/// `target_modules` list or `rank_pattern` some hundreds; every module of a 671B MoE model named
/// one by one, about 2.5 MB); a larger file (a sparse gigabyte) is refused before it is read. The
/// config is read as a JSON tree, which can take ~25 times its size in memory (a list of empty
/// objects): 4 MiB keeps that near 100 MB.
pub const MAX_CONFIG: u64 = 4 << 20;

/// A config field PEFT declares as a bool: absent is PEFT's default, `null` is false (PEFT loads
/// the JSON into its config class and tests the field's truth: `None` is false). Another type is
/// refused: Python would read `1` or `"false"` as true, where a strict reader would not, and a
/// guess either way changes the merged weights.
pub(crate) fn config_bool(c: &Value, key: &str, default: bool, path: &Path) -> Result<bool> {
    match c.get(key) {
        None => Ok(default),
        Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(wrong_type(key, v, "true or false", path)),
    }
}

/// A config field PEFT declares as an int ≥ 0: absent is PEFT's default; `null` or another type
/// is refused (PEFT's arithmetic on `None` raises, so no file PEFT can load holds it).
pub(crate) fn config_uint(c: &Value, key: &str, default: u64, path: &Path) -> Result<u64> {
    match c.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| wrong_type(key, v, "a non-negative integer", path)),
    }
}

/// A config field PEFT declares as a float (see `config_uint`); integers are numbers too.
pub(crate) fn config_f64(c: &Value, key: &str, default: f64, path: &Path) -> Result<f64> {
    match c.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_f64()
            .ok_or_else(|| wrong_type(key, v, "a number", path)),
    }
}

fn wrong_type(key: &str, v: &Value, want: &str, path: &Path) -> Error {
    let mut shown = v.to_string();
    if shown.len() > 40 {
        shown = format!("{}…", shown.chars().take(40).collect::<String>());
    }
    err(
        Class::BadAdapter,
        path,
        format!("{key} is {shown}, expected {want}"),
    )
}

/// Read a config, refusing one larger than `MAX_CONFIG` without reading past the limit.
fn read_config(path: &Path, f: std::fs::File) -> Result<Vec<u8>> {
    crate::checkpoint::file::read_at_most(f, path, MAX_CONFIG)?.map_err(|_| {
        err(
            Class::BadAdapter,
            path,
            format!("larger than the {MAX_CONFIG}-byte limit for an adapter config"),
        )
    })
}

/// Import a PEFT adapter held in memory: the bytes of `adapter_config.json` and the parsed
/// `adapter_model.safetensors` (see `SafeFile::from_bytes`). Used by the fuzz targets; validated
/// as `formats::open` validates every reader's output.
pub fn import_bytes(config: &[u8], weights: SafeFile) -> Result<Adapter> {
    let cfg_path = Path::new(CONFIG);
    let config = parse_config(config, cfg_path)?;
    let weights = Arc::new(weights);
    let mut adapter = import_config(&config, cfg_path, &weights, None)?;
    adapter.validate().map_err(|e| e.at(&weights.path))?;
    adapter.materialise()?;
    Ok(adapter)
}

fn parse_config(text: &[u8], cfg_path: &Path) -> Result<Value> {
    let config: Value = serde_json::from_slice(text)
        .map_err(|e| err(Class::BadAdapter, cfg_path, format!("not valid JSON ({e})")))?;
    if !config.is_object() {
        return Err(err(
            Class::BadAdapter,
            cfg_path,
            "config is not a JSON object",
        ));
    }
    Ok(config)
}

/// Dispatch on `peft_type` and check the result.
/// `legacy_conv` forces (or rules out) PEFT ≤ 0.13's Conv2d BOFT rule; None detects it.
fn import_config(
    config: &Value,
    cfg_path: &Path,
    f: &Arc<SafeFile>,
    legacy_conv: Option<bool>,
) -> Result<Adapter> {
    let peft_type = config
        .get("peft_type")
        .and_then(Value::as_str)
        .unwrap_or("");
    let mut adapter = match peft_type {
        "BOFT" => boft::import(config, cfg_path, f, legacy_conv)?,
        "OFT" => oft::import(config, cfg_path, f)?,
        other => {
            return Err(err(
                Class::UnknownFormat,
                cfg_path,
                format!("peft_type {other:?} is not an orthogonal adapter this tool reads"),
            ))
        }
    };
    adapter.source_version = version(config);
    Ok(adapter)
}

/// PEFT writes its version into the config from 0.18 on; older files carry none.
pub fn version(config: &Value) -> String {
    config
        .get("peft_version")
        .and_then(Value::as_str)
        .map(|v| format!("peft {v}"))
        .unwrap_or_else(|| "peft (version not recorded)".into())
}

/// A saved tensor that is not part of the adapter's maths (`modules_to_save`, trained biases):
/// it replaces the base tensor it names. F64 is stored as F32; the base dtype decides the final
/// rounding.
pub fn replacement(path: &Path, f: &SafeFile, t: &TensorInfo) -> Result<Replacement> {
    if t.dtype.float_size().is_none() && t.dtype != Dtype::F64 {
        return Err(err(
            Class::BadAdapter,
            path,
            format!(
                "tensor {:?} is {}, not a float tensor",
                t.name,
                t.dtype.name()
            ),
        ));
    }
    let data = f.data(t);
    let values = dtype::decode_any_f32(t.dtype, data).expect("float");
    if values.iter().any(|x| !x.is_finite()) {
        return Err(err(
            Class::NonFinite,
            path,
            format!("tensor {:?} holds NaN/Inf", t.name),
        ));
    }
    let (dt, bytes) = if t.dtype == Dtype::F64 {
        (
            Dtype::F32,
            values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    } else {
        (t.dtype, data.to_vec())
    };
    Ok(Replacement {
        name: replaced_name(&t.name),
        dtype: dt,
        shape: t.shape.clone(),
        data: bytes,
    })
}

/// Strip PEFT's `base_model.model.` prefix from a key.
pub fn module_key(key: &str) -> &str {
    key.strip_prefix(PREFIX).unwrap_or(key)
}

/// The base tensor a saved non-adapter tensor replaces: `<m>.base_layer.bias` → `<m>.bias`,
/// `<m>.modules_to_save.<param>` → `<m>.<param>`.
pub fn replaced_name(key: &str) -> String {
    let k = module_key(key);
    if let Some((m, rest)) = k.split_once(".modules_to_save.") {
        return format!("{m}.{rest}");
    }
    k.replace(".base_layer.", ".")
}

/// The files a reader opens beside an input it was given (the inputs an output must not
/// overwrite, `output::check_destination`): for a PEFT adapter (its folder, or its
/// `adapter_model.safetensors` given as a file) the folder's `adapter_config.json` and
/// `adapter_model.safetensors`, which may be symlinks to elsewhere (a Hugging Face cache's blobs).
pub fn read_alongside(input: &Path) -> Vec<PathBuf> {
    let dir = if input.is_dir() {
        Some(input)
    } else {
        input
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .filter(|p| fs::symlink_metadata(p.join(CONFIG)).is_ok())
    };
    let mut out = vec![input.to_path_buf()];
    if let Some(d) = dir {
        out.push(d.join(CONFIG));
        out.push(d.join(WEIGHTS));
    }
    out
}
