//! Export: write a canonical adapter back out in a library's own format, exactly or not at all.
//!
//! * `peft`: a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`) for
//!   input-side targets. Several factors, permutations or a scale → PEFT BOFT (`boft_R` holds the
//!   skew generator S itself, since PEFT takes `½(A − Aᵀ) = S`; `boft_s` the scale); one factor,
//!   no permutation and no (or an all-ones) scale → PEFT OFT v2 with `use_cayley_neumann: false`
//!   (`oft_R.weight` holds the strict upper triangle of S, `S = U − Uᵀ`).
//! * `lycoris`: one LyCORIS safetensors file for output-side targets: diag-oft `oft_blocks (D, H, H)`
//!   or boft `oft_blocks (m, D, H, H)` holding `A = ½Q` (LyCORIS forms `Q = A − Aᵀ`), `alpha = 0`
//!   (no constraint) and `rescale` when the target has a scale.
//!
//! Every block must be an exact Cayley transform (`block_kind: cayley`): the generator is found
//! with the inverse Cayley map, and the library's own map of the stored f32 generator is checked
//! to give the block back. Everything else (Neumann series, cropped or raw blocks, a block with an
//! eigenvalue −1, a geometry or permutation the library cannot express, the other rotated side)
//! is refused with one line saying why: nothing is approximated. docs/EXPORT.md has the details.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{json, Value};

use crate::adapter::{Adapter, BlockKind, Side, Target};
use crate::checkpoint::{Dtype, SafeFile};
use crate::error::{Class, Error, Result};
use crate::math::{cayley, perm};
use crate::output::Staged;

/// Largest difference allowed between a block and the library's map of the exported generator.
const BLOCK_TOL: f64 = 1e-5;

/// What an export wrote, for the summary line.
#[derive(Debug, Clone)]
pub struct Exported {
    /// `PEFT BOFT`, `PEFT OFT`, `LyCORIS diag-oft`, `LyCORIS boft`, `LyCORIS diag-oft + boft`.
    pub kind: String,
    pub targets: usize,
    pub replaced: usize,
}

fn refuse(t: &Target, why: impl std::fmt::Display) -> Error {
    let label = t.label();
    let from = if t.module.is_empty() || label.starts_with(&t.module) {
        String::new()
    } else {
        format!(" (from {})", t.module)
    };
    Error::bare(Class::NotExportable, format!("{label}{from}: {why}"))
}

/// The adapter with every block computed (shared blocks expanded), every target checked to be
/// an exact Cayley rotation that stands alone.
fn prepare(adapter: &Adapter) -> Result<Adapter> {
    check_views(adapter)?;
    let mut a = adapter.clone();
    a.materialise()?;
    for t in &a.targets {
        if t.share {
            return Err(refuse(
                t,
                "shared blocks (block_share) need the base to know how many there are; pass --base",
            ));
        }
        match t.kind {
            BlockKind::Cayley => {}
            BlockKind::Neumann => {
                return Err(refuse(
                    t,
                    "blocks are a truncated Neumann series, not an exact Cayley transform: no \
                     generator reproduces them exactly, so there is no exact export",
                ))
            }
            BlockKind::Cropped => {
                return Err(refuse(
                    t,
                    "blocks are cropped to a non-multiple of the block size (not orthogonal): no \
                     exact export",
                ))
            }
            BlockKind::Raw => {
                return Err(refuse(
                    t,
                    "blocks are raw matrices with no known generator: no exact export",
                ))
            }
        }
        if t.crop.is_some() {
            return Err(refuse(t, "the rotation is cropped: no exact export"));
        }
        if t.croppable && t.shape.is_none() {
            return Err(refuse(
                t,
                "the source crops the rotation when the base is shorter than the blocks; pass \
                 --base so the export can check it is not cropped",
            ));
        }
    }
    if a.targets.is_empty() {
        return Err(Error::bare(
            Class::NotExportable,
            "the adapter transforms no tensor: nothing to export",
        ));
    }
    Ok(a)
}

/// Targets no library merges the way the canonical model says, whatever the side.
fn check_views(adapter: &Adapter) -> Result<()> {
    match adapter.targets.iter().find(|t| t.view.is_some()) {
        Some(t) => Err(refuse(
            t,
            "PEFT ≤ 0.13 merged this Conv2d layer by reinterpreting the kernel buffer, which \
             PEFT 0.21 and LyCORIS do not do: no exact export",
        )),
        None => Ok(()),
    }
}

/// Which Cayley convention the library applies to the stored generator.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Map {
    /// `C−(S) = (I − S)(I + S)⁻¹` (PEFT; also LyCORIS diag-oft, whose merge uses `C+(Q)ᵀ`).
    Minus,
    /// `C+(S) = (I + S)(I − S)⁻¹` (LyCORIS boft multiplies by it directly).
    Plus,
}

/// The skew generator S (f32, row-major) with `map(S) = q`, checked by mapping the rounded S back.
fn generator(t: &Target, f: usize, k: usize, map: Map) -> Result<Vec<f32>> {
    let h = t.block_size;
    let q: Vec<f64> = t.block(f, k).iter().map(|&x| x as f64).collect();
    let s = cayley::inverse_cayley_minus(h, &q).ok_or_else(|| {
        refuse(
            t,
            format!(
                "block {k} of factor {f} has an eigenvalue −1 (a rotation by π), which no Cayley \
                 generator reaches: no exact export"
            ),
        )
    })?;
    // The stored block is orthogonal to f32 rounding: keep the skew part of its generator.
    let sign = if map == Map::Minus { 1.0 } else { -1.0 };
    let s32: Vec<f32> = (0..h * h)
        .map(|i| (sign * 0.5 * (s[i] - s[(i % h) * h + i / h])) as f32)
        .collect();
    let s64: Vec<f64> = s32.iter().map(|&x| x as f64).collect();
    let back = match map {
        Map::Minus => cayley::cayley_minus(h, &s64),
        Map::Plus => cayley::cayley_plus(h, &s64),
    };
    let err = back
        .iter()
        .zip(&q)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    if err.is_nan() || err > BLOCK_TOL {
        return Err(refuse(
            t,
            format!(
                "block {k} of factor {f} is too close to a rotation by π: its generator does not \
                 reproduce it in f32 (error {err:.1e}), no exact export"
            ),
        ));
    }
    Ok(s32)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

use crate::checkpoint::OwnedTensor as Tensor;

fn f32_tensor(shape: Vec<usize>, v: &[f32]) -> Tensor {
    Tensor {
        dtype: safetensors::Dtype::F32,
        shape,
        data: f32_bytes(v),
    }
}

fn serialize(
    tensors: &BTreeMap<String, Tensor>,
    meta: BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    crate::checkpoint::serialize(tensors, meta.into_iter().collect())
}

/// The module path of a target named `<module>.weight`.
fn module_of(t: &Target) -> Result<&str> {
    t.name.strip_suffix(".weight").ok_or_else(|| {
        refuse(
            t,
            "the target is not a module's `.weight` (pass --base to resolve flattened names)",
        )
    })
}

fn all_ones(s: &Option<Vec<f32>>) -> bool {
    s.as_ref().is_none_or(|v| v.iter().all(|&x| x == 1.0))
}

fn regex_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            o.push('\\');
        }
        o.push(c);
    }
    o
}

fn safetensors_dtype(d: Dtype) -> Option<safetensors::Dtype> {
    Some(match d {
        Dtype::F32 => safetensors::Dtype::F32,
        Dtype::F16 => safetensors::Dtype::F16,
        Dtype::BF16 => safetensors::Dtype::BF16,
        _ => return None,
    })
}

/// PEFT OFT modules that are `nn.Embedding` in the source adapter folder (`oft_embedding_R`);
/// empty for anything else. The canonical model does not record layer types.
pub fn peft_embedding_modules(input: &Path) -> BTreeSet<String> {
    let file = input.join(super::peft::WEIGHTS);
    if !input.is_dir() || !file.is_file() {
        return BTreeSet::new();
    }
    let Ok(f) = SafeFile::open(&file) else {
        return BTreeSet::new();
    };
    f.tensors
        .iter()
        .filter_map(|t| {
            super::peft::module_key(&t.name)
                .strip_suffix(".oft_embedding_R.weight")
                .map(str::to_string)
        })
        .collect()
}

/// Write `adapter` as a PEFT adapter folder at `dest` (staged, renamed into place when whole).
/// `embeddings` names the modules that are `nn.Embedding` layers.
pub fn write_peft(
    adapter: &Adapter,
    dest: &Path,
    embeddings: &BTreeSet<String>,
) -> Result<Exported> {
    let (config, bytes, kind) = peft_bytes(adapter, embeddings)?;
    let staged = Staged::dir(dest)?;
    let write = |name: &str, data: &[u8]| {
        use std::io::Write;
        let p = staged.path().join(name);
        let mut f = staged.create(Path::new(name))?;
        f.write_all(data)
            .and_then(|()| f.sync_all())
            .map_err(|e| staged.blame_dest(Error::io(&p, e)))
    };
    let mut text = serde_json::to_string_pretty(&config).expect("config serialises");
    text.push('\n');
    write(super::peft::CONFIG, text.as_bytes())?;
    write(super::peft::WEIGHTS, &bytes)?;
    staged.commit()?;
    Ok(Exported {
        kind,
        targets: adapter.targets.len(),
        replaced: adapter.replacements.len(),
    })
}

/// The PEFT config, the bytes of `adapter_model.safetensors` and the PEFT method's name.
pub fn peft_bytes(
    adapter: &Adapter,
    embeddings: &BTreeSet<String>,
) -> Result<(Value, Vec<u8>, String)> {
    check_views(adapter)?;
    for t in &adapter.targets {
        if t.side != Side::Input {
            return Err(refuse(
                t,
                "output-side rotation (rows of the weight), PEFT BOFT/OFT rotate the input side: \
                 no exact conversion to PEFT (try --to lycoris)",
            ));
        }
    }
    let a = prepare(adapter)?;
    for t in &a.targets {
        module_of(t)?;
        if let Some(s) = &t.shape {
            if s.len() == 4 && s[2] != s[3] {
                return Err(refuse(
                    t,
                    format!("PEFT supports square Conv2d kernels only; the base kernel is {s:?}"),
                ));
            }
            if s.len() != 2 && s.len() != 4 {
                return Err(refuse(
                    t,
                    format!("PEFT BOFT/OFT rotate Linear, Conv2d and Embedding weights; the base tensor has shape {s:?}"),
                ));
            }
        }
    }
    let boft = a.targets.iter().any(|t| {
        t.factors > 1
            || t.perms.iter().flatten().any(|p| !perm::is_identity(p))
            || !all_ones(&t.scale)
    });
    if boft {
        peft_boft(&a, embeddings)
    } else {
        peft_oft(&a, embeddings)
    }
}

/// The one block size or block count every target shares, as `(size, count)` config values.
fn uniform_geometry(a: &Adapter, method: &str) -> Result<(usize, usize)> {
    let sizes: BTreeSet<usize> = a.targets.iter().map(|t| t.block_size).collect();
    let counts: BTreeSet<usize> = a.targets.iter().map(|t| t.blocks).collect();
    if sizes.len() == 1 {
        return Ok((*sizes.first().unwrap(), 0));
    }
    if counts.len() == 1 {
        return Ok((0, *counts.first().unwrap()));
    }
    Err(Error::bare(
        Class::NotExportable,
        format!(
            "{method} derives every layer's blocks from one block size or one block count, but the \
             targets have block sizes {sizes:?} and block counts {counts:?}: not expressible in one \
             PEFT config"
        ),
    ))
}

/// Replacements as PEFT stores them: biases of targeted modules as `<m>.base_layer.bias`
/// (config `bias: "<method>_only"`), anything else as a `modules_to_save` module.
fn peft_replacements(
    a: &Adapter,
    tensors: &mut BTreeMap<String, Tensor>,
) -> Result<(bool, Vec<String>)> {
    let targeted: BTreeSet<&str> = a
        .targets
        .iter()
        .filter_map(|t| t.name.strip_suffix(".weight"))
        .collect();
    let mut bias = false;
    let mut save = BTreeSet::new();
    for r in &a.replacements {
        let dtype = safetensors_dtype(r.dtype).ok_or_else(|| {
            Error::bare(
                Class::UnsupportedDtype,
                format!("replacement {} has dtype {}", r.name, r.dtype.name()),
            )
        })?;
        let (module, param) = r.name.rsplit_once('.').ok_or_else(|| {
            Error::bare(
                Class::NotExportable,
                format!(
                    "replacement {}: not a module parameter, PEFT cannot store it",
                    r.name
                ),
            )
        })?;
        let key = if targeted.contains(module) {
            if param != "bias" {
                return Err(Error::bare(
                    Class::NotExportable,
                    format!(
                        "replacement {}: PEFT stores only the bias of a rotated module",
                        r.name
                    ),
                ));
            }
            bias = true;
            format!("{}{module}.base_layer.bias", super::peft::PREFIX)
        } else {
            save.insert(module.to_string());
            format!("{}{}", super::peft::PREFIX, r.name)
        };
        tensors.insert(
            key,
            Tensor {
                dtype,
                shape: r.shape.clone(),
                data: r.data.clone(),
            },
        );
    }
    Ok((bias, save.into_iter().collect()))
}

fn target_regex(a: &Adapter) -> String {
    let names: Vec<String> = a
        .targets
        .iter()
        .filter_map(|t| t.name.strip_suffix(".weight"))
        .map(regex_escape)
        .collect();
    format!("^(?:{})$", names.join("|"))
}

fn peft_boft(a: &Adapter, embeddings: &BTreeSet<String>) -> Result<(Value, Vec<u8>, String)> {
    let nf = a.targets.iter().map(|t| t.factors).max().unwrap_or(1);
    let (bs, bn) = uniform_geometry(a, "PEFT BOFT")?;
    let mut tensors = BTreeMap::new();
    for t in &a.targets {
        let module = module_of(t)?;
        if embeddings.contains(module) {
            return Err(refuse(
                t,
                "an Embedding layer with several factors, permutations or a scale: PEFT BOFT does \
                 not rotate embeddings and PEFT OFT has no scale or permutation",
            ));
        }
        let (d, h, n) = (t.blocks, t.block_size, t.n());
        if nf > 1 && (h % 2 != 0 || !perm::multiple_of_pow2(d, nf - 1)) {
            return Err(refuse(
                t,
                format!(
                    "PEFT BOFT with {nf} butterfly factors needs an even block size and a block count \
                     divisible by {}; this target has {d} blocks of {h}",
                    perm::pow2_text(nf - 1)
                ),
            ));
        }
        for (i, p) in t.perms.iter().enumerate() {
            let want = perm::invert(&perm::peft_boft(n, h, i));
            let ok = match p {
                Some(p) => *p == want,
                None => perm::is_identity(&want),
            };
            if !ok {
                return Err(refuse(
                    t,
                    format!(
                        "the permutation of factor {i} is not PEFT's butterfly permutation for {d} \
                         blocks of {h}: no exact PEFT BOFT export"
                    ),
                ));
            }
        }
        let hh = h * h;
        // Factors beyond the target's own are identities: generator 0.
        let mut r = vec![0f32; nf * d * hh];
        for f in 0..t.factors {
            for k in 0..d {
                let s = generator(t, f, k, Map::Minus)?;
                r[(f * d + k) * hh..(f * d + k + 1) * hh].copy_from_slice(&s);
            }
        }
        let key = format!("{}{module}", super::peft::PREFIX);
        tensors.insert(format!("{key}.boft_R"), f32_tensor(vec![nf, d, h, h], &r));
        let Some(shape) = &t.shape else {
            return Err(refuse(
                t,
                "PEFT BOFT's boft_s is laid out by layer type (Linear (out, 1), Conv2d (1, out)), \
                 which only the base tells: pass --base",
            ));
        };
        let scale = t.scale.clone().unwrap_or_else(|| vec![1.0; shape[0]]);
        let conv = shape.len() == 4;
        let shape = if conv {
            vec![1, scale.len()]
        } else {
            vec![scale.len(), 1]
        };
        tensors.insert(format!("{key}.boft_s"), f32_tensor(shape, &scale));
    }
    let (bias, save) = peft_replacements(a, &mut tensors)?;
    let config = peft_config(
        a,
        if bias { "boft_only" } else { "none" },
        &save,
        json!({
            "peft_type": "BOFT",
            "boft_block_size": bs,
            "boft_block_num": bn,
            "boft_n_butterfly_factor": nf,
            "boft_dropout": 0.0,
        }),
    );
    let bytes = serialize(&tensors, peft_meta())?;
    Ok((config, bytes, "PEFT BOFT".into()))
}

/// An `adapter_config.json`: the fields PEFT's BOFT and OFT configs share, plus `method`'s.
fn peft_config(a: &Adapter, bias: &str, save: &[String], method: Value) -> Value {
    let mut c = json!({
        "task_type": null,
        "base_model_name_or_path": null,
        "revision": null,
        "inference_mode": true,
        "target_modules": target_regex(a),
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "bias": bias,
        "modules_to_save": if save.is_empty() { Value::Null } else { json!(save) },
        "init_weights": true,
        "layers_to_transform": null,
        "layers_pattern": null,
    });
    let (Value::Object(c_map), Value::Object(m)) = (&mut c, method) else {
        unreachable!("both are JSON objects")
    };
    c_map.extend(m);
    c
}

fn peft_meta() -> BTreeMap<String, String> {
    BTreeMap::from([("format".to_string(), "pt".to_string())])
}

fn peft_oft(a: &Adapter, embeddings: &BTreeSet<String>) -> Result<(Value, Vec<u8>, String)> {
    let (bs, bn) = uniform_geometry(a, "PEFT OFT")?;
    let mut tensors = BTreeMap::new();
    for t in &a.targets {
        let module = module_of(t)?;
        let (d, h) = (t.blocks, t.block_size);
        if h < 2 {
            return Err(refuse(
                t,
                "blocks of size 1 have no generator entries in PEFT OFT",
            ));
        }
        let embedding = embeddings.contains(module);
        let len = h * (h - 1) / 2;
        let mut v = Vec::with_capacity(d * len);
        for k in 0..d {
            // PEFT rotates embeddings by the transpose of its block: generator −S.
            let s = generator(t, 0, k, Map::Minus)?;
            let sign = if embedding { -1.0 } else { 1.0 };
            for i in 0..h {
                for j in i + 1..h {
                    v.push(sign * s[i * h + j]);
                }
            }
        }
        let leaf = if embedding {
            "oft_embedding_R.weight"
        } else {
            "oft_R.weight"
        };
        tensors.insert(
            format!("{}{module}.{leaf}", super::peft::PREFIX),
            f32_tensor(vec![d, len], &v),
        );
    }
    let (bias, save) = peft_replacements(a, &mut tensors)?;
    let config = peft_config(
        a,
        if bias { "oft_only" } else { "none" },
        &save,
        json!({
            "peft_type": "OFT",
            "r": bn,
            "oft_block_size": bs,
            "module_dropout": 0.0,
            "coft": false,
            "eps": 6e-05,
            "block_share": false,
            "use_cayley_neumann": false,
            "num_cayley_neumann_terms": 5,
        }),
    );
    let bytes = serialize(&tensors, peft_meta())?;
    Ok((config, bytes, "PEFT OFT".into()))
}

/// LyCORIS's name for a target: `lycoris_<module path with '.' → '_'>`.
fn lycoris_name(t: &Target) -> Result<String> {
    if let Some(m) = t.name.strip_suffix(".weight") {
        return Ok(format!("lycoris_{}", m.replace('.', "_")));
    }
    if !t.name.contains('.') {
        if let Some(rest) = crate::names::strip_flat_prefix(&t.name) {
            return Ok(format!("lycoris_{rest}"));
        }
    }
    Err(refuse(
        t,
        "not a module's `.weight` nor a flattened LyCORIS/kohya name: no LyCORIS key for it",
    ))
}

/// Write `adapter` as one LyCORIS safetensors file at `dest` (staged, renamed when whole).
pub fn write_lycoris(adapter: &Adapter, dest: &Path) -> Result<Exported> {
    let (bytes, kind) = lycoris_bytes(adapter)?;
    crate::output::write_file_atomic(dest, &bytes)?;
    Ok(Exported {
        kind,
        targets: adapter.targets.len(),
        replaced: 0,
    })
}

/// The bytes of the LyCORIS file and a description of the algorithms used.
pub fn lycoris_bytes(adapter: &Adapter) -> Result<(Vec<u8>, String)> {
    check_views(adapter)?;
    for t in &adapter.targets {
        if t.side != Side::Output {
            return Err(refuse(
                t,
                "input-side rotation (columns of the weight), LyCORIS rotates the output side: \
                 no exact conversion to LyCORIS (try --to peft)",
            ));
        }
    }
    let a = prepare(adapter)?;
    if let Some(r) = a.replacements.first() {
        return Err(Error::bare(
            Class::NotExportable,
            format!(
                "the adapter replaces {} (and {} more tensors) outright, which a LyCORIS OFT file \
                 cannot carry: no exact export",
                r.name,
                a.replacements.len() - 1
            ),
        ));
    }
    let mut tensors = BTreeMap::new();
    let mut algos = BTreeSet::new();
    for t in &a.targets {
        if t.rows.is_some() {
            return Err(refuse(
                t,
                "rotates a row slice of a fused weight, which a LyCORIS module cannot: no exact export",
            ));
        }
        let name = lycoris_name(t)?;
        let (d, h, n) = (t.blocks, t.block_size, t.n());
        let hh = h * h;
        let permuted = t.perms.iter().flatten().any(|p| !perm::is_identity(p));
        // LyCORIS rebuilds diag-oft's geometry from (out, H): factorization() makes the block
        // size the smaller of H and out/H.
        let diag = t.factors == 1 && !permuted && h <= d;
        let blocks = if diag {
            let mut v = Vec::with_capacity(d * hh);
            for k in 0..d {
                // Canonical block = C+(Q)ᵀ = C−(Q); A = ½Q.
                v.extend(generator(t, 0, k, Map::Minus)?.iter().map(|x| 0.5 * x));
            }
            algos.insert("diag-oft");
            f32_tensor(vec![d, h, h], &v)
        } else {
            let m = d.trailing_zeros() as usize + 1;
            if h % 2 != 0 || !d.is_power_of_two() || t.factors > m {
                let why = if t.factors == 1 && !permuted {
                    format!(
                        "LyCORIS diag-oft needs at least as many blocks as the block size and \
                         LyCORIS boft an even block size and a power-of-two block count; {d} \
                         blocks of {h} fit neither: no exact export"
                    )
                } else {
                    format!(
                        "LyCORIS boft needs an even block size, a power-of-two block count D and \
                         at most log2(D) + 1 stages; this target has {} factors of {d} blocks of \
                         {h}: no exact export",
                        t.factors
                    )
                };
                return Err(refuse(t, why));
            }
            // Stage 0's row order only permutes rows inside each block: a factor 0 without
            // permutation is stage 0 with its blocks conjugated, `B[a][b] = Q[p0[a]][p0[b]]`.
            let p0 = crate::math::perm::lycoris_boft(h, h, 0);
            let mut conjugate0 = false;
            for (i, p) in t.perms.iter().enumerate() {
                let want = crate::math::perm::lycoris_boft(n, h, i);
                let ok = match p {
                    Some(p) => *p == want,
                    None => perm::is_identity(&want) || i == 0,
                };
                conjugate0 |= i == 0 && p.as_ref().is_none_or(|p| perm::is_identity(p));
                if !ok {
                    return Err(refuse(
                        t,
                        format!(
                            "the permutation of factor {i} is not LyCORIS boft's row order for {d} \
                             blocks of {h}: no exact export"
                        ),
                    ));
                }
            }
            let mut t = t.clone();
            if conjugate0 {
                for k in 0..d {
                    let q = t.block(0, k).to_vec();
                    let b = &mut t.data[k * hh..(k + 1) * hh];
                    for a in 0..h {
                        for c in 0..h {
                            b[a * h + c] = q[p0[a] as usize * h + p0[c] as usize];
                        }
                    }
                }
            }
            // Stages beyond the target's own factors are identities: A = 0.
            let mut v = vec![0f32; m * d * hh];
            for f in 0..t.factors {
                for k in 0..d {
                    // Canonical block = C+(Q); A = ½Q.
                    let s = generator(&t, f, k, Map::Plus)?;
                    for (o, x) in v[(f * d + k) * hh..(f * d + k + 1) * hh].iter_mut().zip(s) {
                        *o = 0.5 * x;
                    }
                }
            }
            algos.insert("boft");
            f32_tensor(vec![m, d, h, h], &v)
        };
        tensors.insert(format!("{name}.oft_blocks"), blocks);
        tensors.insert(format!("{name}.alpha"), f32_tensor(vec![], &[0.0]));
        if let Some(s) = &t.scale {
            let Some(shape) = &t.shape else {
                return Err(refuse(
                    t,
                    "LyCORIS's rescale is laid out by layer type (Linear (out, 1), Conv2d \
                     (out, 1, 1, 1)), which only the base tells: pass --base",
                ));
            };
            let dims = shape.len().max(2);
            let mut shape = vec![s.len()];
            shape.resize(dims, 1);
            tensors.insert(format!("{name}.rescale"), f32_tensor(shape, s));
        }
    }
    let algo = algos.iter().copied().collect::<Vec<_>>().join(" + ");
    let meta = BTreeMap::from([
        ("ss_network_module".to_string(), "lycoris.kohya".to_string()),
        (
            "ss_network_args".to_string(),
            json!({"algo": algos.iter().next().copied().unwrap_or("diag-oft"), "constraint": 0.0})
                .to_string(),
        ),
        (
            "boft_export".to_string(),
            format!(
                "boft {} from {} ({})",
                env!("CARGO_PKG_VERSION"),
                adapter.source_format,
                adapter.source_version
            ),
        ),
    ]);
    // Two targets flattening to one LyCORIS name would overwrite each other.
    let mut seen = BTreeMap::new();
    for t in &a.targets {
        if let Some(other) = seen.insert(lycoris_name(t)?, t.label()) {
            return Err(refuse(
                t,
                format!("has the same LyCORIS name as {other}: no exact export"),
            ));
        }
    }
    let bytes = serialize(&tensors, meta)?;
    Ok((bytes, format!("LyCORIS {algo}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rot(h: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        let a: Vec<f64> = (0..h * h)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 0.4
            })
            .collect();
        cayley::cayley_minus(h, &cayley::skew_half(h, &a))
            .iter()
            .map(|&v| v as f32)
            .collect()
    }

    /// A one-target adapter read from canonical bytes (independent of `Target`'s fields).
    fn target(h: usize, d: usize, kind: BlockKind, side: Side) -> Target {
        let mut data = Vec::new();
        for k in 0..d {
            data.extend(rot(h, k as u64 + 1));
        }
        let meta = json!([{
            "key": "m.weight", "target": "m.weight", "module": "m", "side": side,
            "shape": null, "rows": null, "factors": 1, "blocks": d, "block_size": h,
            "block_kind": kind, "permuted": false, "scaled": false,
        }]);
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "m.weight::blocks".to_string(),
            f32_tensor(vec![1, d, h, h], &data),
        );
        let md = BTreeMap::from([
            ("format".to_string(), "boft-canonical".to_string()),
            ("format_version".to_string(), "1".to_string()),
            ("source_format".to_string(), "test".to_string()),
            ("source_version".to_string(), String::new()),
            ("source_sha256".to_string(), "{}".to_string()),
            ("targets".to_string(), meta.to_string()),
            ("replacements".to_string(), "[]".to_string()),
            ("writer".to_string(), "test".to_string()),
        ]);
        let bytes = serialize(&tensors, md).unwrap();
        let f = SafeFile::from_bytes("test.safetensors", bytes).unwrap();
        let mut a = crate::adapter::canonical::from_file(f).unwrap();
        a.targets.remove(0)
    }

    #[test]
    fn generators_reproduce_their_blocks_in_both_conventions() {
        let t = target(4, 2, BlockKind::Cayley, Side::Input);
        for k in 0..2 {
            let s = generator(&t, 0, k, Map::Minus).unwrap();
            let q = cayley::cayley_minus(4, &s.iter().map(|&x| x as f64).collect::<Vec<_>>());
            assert!(q
                .iter()
                .zip(t.block(0, k))
                .all(|(a, &b)| (a - b as f64).abs() < 1e-6));
            let s = generator(&t, 0, k, Map::Plus).unwrap();
            let q = cayley::cayley_plus(4, &s.iter().map(|&x| x as f64).collect::<Vec<_>>());
            assert!(q
                .iter()
                .zip(t.block(0, k))
                .all(|(a, &b)| (a - b as f64).abs() < 1e-6));
        }
    }

    #[test]
    fn rotation_by_pi_is_refused() {
        let mut t = target(2, 1, BlockKind::Cayley, Side::Input);
        t.data = vec![-1.0, 0.0, 0.0, -1.0];
        let e = generator(&t, 0, 0, Map::Minus).unwrap_err();
        assert_eq!(e.class, Class::NotExportable);
    }

    #[test]
    fn sides_and_kinds_are_refused() {
        let a = |t: Target| Adapter {
            targets: vec![t],
            ..Default::default()
        };
        let none = BTreeSet::new();
        let e = peft_bytes(&a(target(4, 2, BlockKind::Cayley, Side::Output)), &none).unwrap_err();
        assert!(e.message.contains("output-side"), "{e}");
        let e = peft_bytes(&a(target(4, 2, BlockKind::Neumann, Side::Input)), &none).unwrap_err();
        assert!(e.message.contains("Neumann"), "{e}");
        let e = lycoris_bytes(&a(target(4, 4, BlockKind::Cayley, Side::Input))).unwrap_err();
        assert!(e.message.contains("input-side"), "{e}");
        // diag-oft: LyCORIS needs at least as many blocks as the block size.
        let e = lycoris_bytes(&a(target(3, 2, BlockKind::Cayley, Side::Output))).unwrap_err();
        assert!(e.message.contains("fit neither"), "{e}");
        // 2 blocks of 4: LyCORIS boft, stage 0 conjugated, stage 1 the identity.
        assert!(
            lycoris_bytes(&a(target(4, 2, BlockKind::Cayley, Side::Output)))
                .unwrap()
                .1
                .contains("boft")
        );
        assert!(lycoris_bytes(&a(target(4, 4, BlockKind::Cayley, Side::Output))).is_ok());
        assert!(peft_bytes(&a(target(4, 2, BlockKind::Cayley, Side::Input)), &none).is_ok());
    }

    #[test]
    fn replacements_cannot_go_into_a_lycoris_file() {
        let a = Adapter {
            targets: vec![target(4, 4, BlockKind::Cayley, Side::Output)],
            replacements: vec![crate::adapter::Replacement {
                name: "m.bias".into(),
                dtype: Dtype::F32,
                shape: vec![1],
                data: vec![0; 4],
            }],
            ..Default::default()
        };
        let e = lycoris_bytes(&a).unwrap_err();
        assert!(e.message.contains("outright"), "{e}");
    }

    #[test]
    fn lycoris_perm_matches_the_reference_example() {
        assert_eq!(crate::math::perm::lycoris_boft(4, 4, 0), vec![0, 2, 1, 3]);
    }
}
