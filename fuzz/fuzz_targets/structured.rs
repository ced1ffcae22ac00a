//! Structure-aware inputs: the fuzzer's bytes are read as a stream of choices that build a small
//! base tensor and a canonical adapter (tests/common/canonical_gen.rs, shared with the property
//! test), or a PEFT `adapter_config.json` with tensors that mostly fit it. libFuzzer then mutates
//! the structure (sides, block sizes, factors, permutations, crops, views, row slices, config
//! fields) instead of bytes that would mostly fail to parse.

#![allow(dead_code)]

use std::collections::HashMap;

use boft::adapter::Target;
use boft::checkpoint::{serialize, Checkpoint, OwnedTensor, SafeFile};
use boft::Error;

#[path = "../../tests/common/canonical_gen.rs"]
pub mod canonical_gen;
pub use canonical_gen::{random_case, reference, Case, Draw};

/// The fuzzer's bytes as choices, eight at a time; zeros once they run out (every choice then
/// takes its first option, so short inputs are small, consistent cases).
pub struct Bytes<'a>(pub &'a [u8]);

impl Draw for Bytes<'_> {
    fn next(&mut self) -> u64 {
        let take = self.0.len().min(8);
        let mut b = [0u8; 8];
        b[..take].copy_from_slice(&self.0[..take]);
        self.0 = &self.0[take..];
        u64::from_le_bytes(b)
    }
}

/// Values that break arithmetic, for data the generator fills with small numbers.
const EXTREMES: &[f32] = &[
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::MAX,
    -f32::MAX,
    1e30,
    1e-40,
    -0.0,
    0.0,
    1.0,
];

/// With some chance, put an extreme value into a target's blocks or scale. Returns whether it did.
pub fn extremes(d: &mut impl Draw, targets: &mut [Target]) -> bool {
    let mut any = false;
    for t in targets {
        if !t.data.is_empty() && d.chance(0.1) {
            let i = d.range(0, t.data.len() - 1);
            t.data[i] = EXTREMES[d.range(0, EXTREMES.len() - 1)];
            any = true;
        }
        if let Some(s) = t.scale.as_mut().filter(|s| !s.is_empty()) {
            if d.chance(0.1) {
                let i = d.range(0, s.len() - 1);
                s[i] = EXTREMES[d.range(0, EXTREMES.len() - 1)];
                any = true;
            }
        }
    }
    any
}

/// A refusal is one non-empty line (the CLI prints it after the file name and class).
pub fn one_line(e: &Error) {
    assert!(
        !e.message.is_empty() && !e.message.contains('\n'),
        "error is not one line: {:?}",
        e.message
    );
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// An in-memory single-file checkpoint of f32 tensors.
pub fn checkpoint(label: &str, tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Checkpoint {
    let owned: Vec<(String, OwnedTensor)> = tensors
        .iter()
        .map(|(n, shape, v)| {
            (
                n.to_string(),
                OwnedTensor {
                    dtype: safetensors::Dtype::F32,
                    shape: shape.clone(),
                    data: f32_bytes(v),
                },
            )
        })
        .collect();
    let bytes = serialize(owned.iter().map(|(k, t)| (k, t)), HashMap::new()).expect("serialises");
    let f = SafeFile::from_bytes(label, bytes).expect("our own file parses");
    Checkpoint::from_file(f).expect("one file, distinct names")
}

/// The base of a canonical case: `w.weight` and an untouched `w.bias`.
pub fn base_of(case: &Case) -> Checkpoint {
    checkpoint(
        "base.safetensors",
        &[
            ("w.weight", case.shape.clone(), case.w.clone()),
            ("w.bias", vec![3], vec![1.0, 2.0, 3.0]),
        ],
    )
}

/// One JSON value for a config field: usually the fitting one, sometimes a value of another
/// type or an extreme.
fn odd_value(d: &mut impl Draw, fit: serde_json::Value) -> serde_json::Value {
    use serde_json::json;
    if d.chance(0.85) {
        return fit;
    }
    match d.range(0, 11) {
        0 => json!(null),
        1 => json!(-1),
        2 => json!(0),
        3 => json!(1.5),
        4 => json!(u64::MAX),
        5 => json!(i64::MIN),
        6 => json!(1e300),
        7 => json!("8"),
        8 => json!([8]),
        9 => json!({"a": 1}),
        10 => json!(true),
        _ => json!(1u64 << 40),
    }
}

/// A PEFT adapter (config bytes, weights file) for one or two linear modules of a small base:
/// BOFT (`boft_R`, `boft_s`), OFT ≥ 0.16 (`oft_R.weight`, packed upper triangles) or OFT ≤ 0.13
/// (`oft_r`, optionally shared), with config numbers that mostly fit the tensors.
pub struct Peft {
    pub config: Vec<u8>,
    pub weights: Vec<u8>,
    pub base: Checkpoint,
}

pub fn random_peft(d: &mut impl Draw) -> Peft {
    use serde_json::{json, Map, Value};
    let kind = d.range(0, 2); // 0 BOFT, 1 OFT v2, 2 OFT v0
    let modules = d.range(1, 2);
    let mut cfg = Map::new();
    let b = [1usize, 2, 4, 8][d.range(0, 3)];
    let blocks = d.range(1, 4);
    let n = b * blocks;
    let out = if d.chance(0.8) { n } else { d.range(1, 9) };
    let nf = d.range(1, 3);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut base: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let names = ["q_proj", "v_proj"];
    for name in names.iter().take(modules) {
        let module = format!("model.layers.0.{name}");
        let cols = if d.chance(0.9) { n } else { d.range(1, 12) };
        base.push((
            format!("{module}.weight"),
            vec![out, cols],
            (0..out * cols).map(|_| d.f32()).collect(),
        ));
        let prefix = format!("base_model.model.{module}");
        // Tensor shapes follow the config unless the draw says otherwise.
        let (j1, j2) = (d.chance(0.05), d.chance(0.05));
        let jitter = |odd: bool, x: usize| if odd { x + 1 } else { x };
        match kind {
            0 => {
                let shape = vec![jitter(j1, nf), blocks, b, jitter(j2, b)];
                let numel = shape.iter().product();
                tensors.push((format!("{prefix}.boft_R"), shape, vec![0.0; numel]));
                tensors.push((format!("{prefix}.boft_s"), vec![out, 1], vec![1.0; out]));
            }
            1 => {
                let packed = b * (b.max(1) - 1) / 2;
                let shape = vec![jitter(j1, blocks), jitter(j2, packed)];
                let numel = shape.iter().product();
                tensors.push((format!("{prefix}.oft_R.weight"), shape, vec![0.0; numel]));
            }
            _ => {
                let stored = if d.chance(0.3) { 1 } else { blocks };
                let shape = vec![stored, b, jitter(j2, b)];
                let numel = shape.iter().product();
                tensors.push((format!("{prefix}.oft_r"), shape, vec![0.0; numel]));
                if d.chance(0.5) {
                    tensors.push((format!("{prefix}.oft_s"), vec![out, 1], vec![1.0; out]));
                }
            }
        }
    }
    for (_, _, v) in tensors.iter_mut() {
        for x in v.iter_mut() {
            *x = 0.3 * d.f32();
        }
        if !v.is_empty() && d.chance(0.05) {
            let i = d.range(0, v.len() - 1);
            v[i] = EXTREMES[d.range(0, EXTREMES.len() - 1)];
        }
    }
    let targets: Vec<Value> = names[..modules].iter().map(|s| json!(s)).collect();
    cfg.insert("target_modules".into(), odd_value(d, json!(targets)));
    cfg.insert("fan_in_fan_out".into(), odd_value(d, json!(false)));
    cfg.insert("bias".into(), odd_value(d, json!("none")));
    cfg.insert("modules_to_save".into(), odd_value(d, json!(null)));
    cfg.insert("inference_mode".into(), odd_value(d, json!(true)));
    match kind {
        0 => {
            cfg.insert("peft_type".into(), odd_value(d, json!("BOFT")));
            let (size, num) = if d.chance(0.5) { (b, 0) } else { (0, blocks) };
            cfg.insert("boft_block_size".into(), odd_value(d, json!(size)));
            cfg.insert("boft_block_num".into(), odd_value(d, json!(num)));
            cfg.insert("boft_n_butterfly_factor".into(), odd_value(d, json!(nf)));
            cfg.insert("peft_version".into(), odd_value(d, json!("0.21.2")));
        }
        1 => {
            cfg.insert("peft_type".into(), odd_value(d, json!("OFT")));
            cfg.insert("r".into(), odd_value(d, json!(0)));
            cfg.insert("oft_block_size".into(), odd_value(d, json!(b)));
            cfg.insert("use_cayley_neumann".into(), {
                let v = d.chance(0.5);
                odd_value(d, json!(v))
            });
            let terms = d.range(1, 7);
            cfg.insert(
                "num_cayley_neumann_terms".into(),
                odd_value(d, json!(terms)),
            );
            cfg.insert("coft".into(), {
                let v = d.chance(0.3);
                odd_value(d, json!(v))
            });
            cfg.insert("eps".into(), odd_value(d, json!(6e-5)));
            cfg.insert("block_share".into(), odd_value(d, json!(false)));
            cfg.insert("peft_version".into(), odd_value(d, json!("0.21.2")));
        }
        _ => {
            cfg.insert("peft_type".into(), odd_value(d, json!("OFT")));
            cfg.insert("r".into(), odd_value(d, json!(blocks)));
            cfg.insert("coft".into(), {
                let v = d.chance(0.3);
                odd_value(d, json!(v))
            });
            cfg.insert("eps".into(), odd_value(d, json!(6e-5)));
            let shared = tensors.iter().any(|(_, s, _)| s.len() == 3 && s[0] == 1);
            cfg.insert(
                "block_share".into(),
                odd_value(d, json!(shared && blocks > 1)),
            );
        }
    }
    if d.chance(0.1) {
        cfg.remove(&*["peft_type", "r", "target_modules", "oft_block_size"][d.range(0, 3)]);
    }
    let config = serde_json::to_vec(&Value::Object(cfg)).expect("json");
    let owned: Vec<(String, OwnedTensor)> = tensors
        .into_iter()
        .map(|(n, shape, v)| {
            (
                n,
                OwnedTensor {
                    dtype: safetensors::Dtype::F32,
                    shape,
                    data: f32_bytes(&v),
                },
            )
        })
        .collect();
    let weights = serialize(owned.iter().map(|(k, t)| (k, t)), HashMap::new()).expect("serialises");
    let base_refs: Vec<(&str, Vec<usize>, Vec<f32>)> = base
        .iter()
        .map(|(n, s, v)| (n.as_str(), s.clone(), v.clone()))
        .collect();
    Peft {
        config,
        weights,
        base: checkpoint("base.safetensors", &base_refs),
    }
}
