//! Export to a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`) for
//! input-side targets. Several factors, permutations or a scale → PEFT BOFT (`boft_R` holds the
//! skew generator S itself, since PEFT takes `½(A − Aᵀ) = S`; `boft_s` the scale); one factor,
//! no permutation and no (or an all-ones) scale → PEFT OFT v2 with `use_cayley_neumann: false`
//! (`oft_R.weight` holds the strict upper triangle of S, `S = U − Uᵀ`). Exact or refused: the
//! gate is `formats::export`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{json, Value};

use super::{CONFIG, PREFIX, WEIGHTS};
use crate::adapter::{Adapter, Side, Target};
use crate::checkpoint::SafeFile;
use crate::error::{Class, Error, Result};
use crate::formats::export::{
    check_views, f32_tensor, prepare, refuse, serialize, Exported, Generators, Map, Tensor,
};
use crate::math::perm;
use crate::output::Staged;

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

/// PEFT OFT modules that are `nn.Embedding` in the source adapter folder (`oft_embedding_R`);
/// empty for anything else. The canonical model does not record layer types.
pub fn peft_embedding_modules(input: &Path) -> BTreeSet<String> {
    let file = input.join(WEIGHTS);
    if !input.is_dir() || !file.is_file() {
        return BTreeSet::new();
    }
    let Ok(f) = SafeFile::open(&file) else {
        return BTreeSet::new();
    };
    f.tensors
        .iter()
        .filter_map(|t| {
            super::module_key(&t.name)
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
    write(CONFIG, text.as_bytes())?;
    write(WEIGHTS, &bytes)?;
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
        let dtype = r.dtype.to_safetensors().ok_or_else(|| {
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
            format!("{}{module}.base_layer.bias", PREFIX)
        } else {
            save.insert(module.to_string());
            format!("{}{}", PREFIX, r.name)
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
        let mut gens = Generators::default();
        for f in 0..t.factors {
            for k in 0..d {
                let s = gens.get(t, f, k, Map::Minus)?;
                r[(f * d + k) * hh..(f * d + k + 1) * hh].copy_from_slice(&s);
            }
        }
        let key = format!("{}{module}", PREFIX);
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
        let mut gens = Generators::default();
        for k in 0..d {
            // PEFT rotates embeddings by the transpose of its block: generator −S.
            let s = gens.get(t, 0, k, Map::Minus)?;
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
            format!("{}{module}.{leaf}", PREFIX),
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
