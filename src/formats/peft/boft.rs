//! PEFT BOFT (`peft_type: "BOFT"`, PEFT ≥ 0.11): per module `boft_R (N, D, H, H)` raw blocks,
//! `boft_s` per-output-row scale, and in 0.11–0.12 files `boft_P` permutation matrices.
//!
//! PEFT builds each factor as `P_i · blockdiag(C−(½(A − Aᵀ))) · P_iᵀ` with `P_i[j, p_i[j]] = 1`
//! and merges `W' = diag(s) · W · Mᵀ` with `M = B_{N−1}⋯B_0`. In the canonical convention
//! (`Pᵀ · blockdiag · P`) the gather permutation is therefore `p_i⁻¹`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use super::{module_key, replacement};
use crate::adapter::{Adapter, BlockKind, Deferred, Side, Target};
use crate::checkpoint::{SafeFile, TensorInfo};
use crate::error::{err, Class, Result};
use crate::formats::read::{self, check_floats, floats};
use crate::math::{cayley, perm};

#[derive(Default)]
struct Module<'a> {
    r: Option<&'a TensorInfo>,
    s: Option<&'a TensorInfo>,
    p: Option<&'a TensorInfo>,
}

/// The blocks are deferred (computed from the mapped file when needed); values are checked for
/// NaN/Inf here so that a broken file fails before any work.
pub fn import(
    config: &Value,
    cfg_path: &Path,
    f: &Arc<SafeFile>,
    legacy_conv: Option<bool>,
) -> Result<Adapter> {
    let path = f.path.as_path();
    let mut modules: BTreeMap<String, Module> = BTreeMap::new();
    let mut replacements = Vec::new();
    for t in &f.tensors {
        let k = module_key(&t.name);
        if let Some(m) = k.strip_suffix(".boft_R") {
            modules.entry(m.to_string()).or_default().r = Some(t);
        } else if let Some(m) = k.strip_suffix(".boft_s") {
            modules.entry(m.to_string()).or_default().s = Some(t);
        } else if let Some(m) = k.strip_suffix(".boft_P") {
            modules.entry(m.to_string()).or_default().p = Some(t);
        } else {
            replacements.push(replacement(path, f, t)?);
        }
    }
    if modules.is_empty() {
        return Err(err(
            Class::BadAdapter,
            path,
            "no boft_R tensors: not a BOFT adapter",
        ));
    }
    // PEFT ≤ 0.13 merged Conv2d layers by reinterpreting the kernel buffer; configs written by
    // those versions lack `exclude_modules`.
    let legacy = legacy_conv.unwrap_or_else(|| {
        config.get("exclude_modules").is_none() && config.get("peft_version").is_none()
    });

    let mut targets = Vec::with_capacity(modules.len());
    for (name, m) in modules {
        let r = m.r.ok_or_else(|| {
            err(
                Class::BadAdapter,
                path,
                format!("{name}: boft_s without boft_R"),
            )
        })?;
        let s = m.s.ok_or_else(|| {
            err(
                Class::BadAdapter,
                path,
                format!("{name}: boft_R without boft_s"),
            )
        })?;
        targets.push(module_target(
            path, cfg_path, config, &name, f, r, s, m.p, legacy,
        )?);
    }
    Ok(Adapter {
        targets,
        replacements,
        source_format: "peft-boft".into(),
        source_version: String::new(),
        source_sha256: BTreeMap::new(),
    })
}

#[allow(clippy::too_many_arguments)]
fn module_target(
    path: &Path,
    cfg_path: &Path,
    config: &Value,
    name: &str,
    f: &Arc<SafeFile>,
    r: &TensorInfo,
    s: &TensorInfo,
    p: Option<&TensorInfo>,
    legacy: bool,
) -> Result<Target> {
    let bad = |m: String| err(Class::BadAdapter, path, format!("{name}: {m}"));
    if r.shape.len() != 4 || r.shape[2] != r.shape[3] {
        return Err(bad(format!(
            "boft_R has shape {:?}, expected (N, D, H, H)",
            r.shape
        )));
    }
    let (nf, d, h) = (r.shape[0], r.shape[1], r.shape[2]);
    if nf == 0 || d == 0 || h == 0 {
        return Err(bad(format!("boft_R has an empty dimension {:?}", r.shape)));
    }
    // No dimension is zero, so the tensor's byte length (checked against the file) bounds n.
    let n = d * h;
    if nf > 1 {
        // Every butterfly factor after the first pairs half-blocks across 2^i blocks.
        if h % 2 != 0 || !perm::multiple_of_pow2(d, nf - 1) {
            return Err(bad(format!(
                "{nf} butterfly factors need an even block size and a block count divisible by {}; \
                 boft_R has {d} blocks of {h}",
                perm::pow2_text(nf - 1)
            )));
        }
    }
    // Either the block size or the block count is fixed by the config (the other is derived per
    // layer); a file whose tensors disagree with it was not written with this config.
    let cfg =
        |k: &str| super::config_uint(config, k, 0, cfg_path).map(|v| Some(v).filter(|&v| v != 0));
    if let Some(bs) = cfg("boft_block_size")? {
        if bs as usize != h {
            return Err(err(
                Class::BadAdapter,
                cfg_path,
                format!("{name}: config says boft_block_size {bs} but boft_R holds blocks of {h}"),
            ));
        }
    } else if let Some(bn) = cfg("boft_block_num")? {
        if bn as usize != d {
            return Err(err(
                Class::BadAdapter,
                cfg_path,
                format!("{name}: config says boft_block_num {bn} but boft_R holds {d} blocks"),
            ));
        }
    }
    let is_conv = s.shape.len() == 2 && s.shape[0] == 1 && s.shape[1] > 1;
    let rows = match s.shape.as_slice() {
        [o, 1] => *o,
        [1, o] => *o,
        _ => {
            return Err(bad(format!(
                "boft_s has shape {:?}, expected (out, 1) or (1, out)",
                s.shape
            )))
        }
    };
    // PEFT ≤ 0.13 merged Conv2d layers by reading the raw (out, C, kh, kw) buffer as an
    // (n, out) matrix V: V' = M · V · diag(s).
    let legacy_conv = is_conv && legacy;
    check_floats(path, f, r)?;
    let scale = floats(path, f, s)?;
    let deferred = {
        let (f, r, path, name) = (f.clone(), r.clone(), path.to_path_buf(), name.to_string());
        Deferred {
            path: path.clone(),
            compute: Arc::new(move |_| cayley_blocks(&path, &name, &f, &r, h)),
            base_dtype: None,
        }
    };
    let perms: Vec<Option<Vec<u32>>> = (0..nf)
        .map(|i| {
            let pi = perm::peft_boft(n, h, i);
            (!perm::is_identity(&pi)).then(|| perm::invert(&pi))
        })
        .collect();
    if let Some(pt) = p {
        check_stored_perms(path, name, f, pt, nf, n, h)?;
    }
    Ok(Target {
        name: format!("{name}.weight"),
        module: name.to_string(),
        side: if legacy_conv {
            Side::Output
        } else {
            Side::Input
        },
        factors: nf,
        blocks: d,
        block_size: h,
        deferred: Some(deferred),
        perms,
        scale: Some(scale).filter(|_| rows > 0),
        kind: BlockKind::Cayley,
        view: legacy_conv.then_some((n, rows)),
        ..Default::default()
    })
}

/// `C−(½(A − Aᵀ))` of every stored block, solved in f64 and rounded once to f32.
fn cayley_blocks(
    path: &Path,
    name: &str,
    f: &SafeFile,
    r: &TensorInfo,
    h: usize,
) -> Result<Vec<f32>> {
    let raw: Vec<f64> = floats(path, f, r)?.iter().map(|&x| x as f64).collect();
    read::cayley_blocks(path, &format!("{name}.boft_R"), &raw, (h * h, h), |a| {
        cayley::skew_half(h, a)
    })
}

/// PEFT 0.11–0.12 saved the permutation matrices; they must be the ones we derive.
fn check_stored_perms(
    path: &Path,
    name: &str,
    f: &SafeFile,
    pt: &TensorInfo,
    nf: usize,
    n: usize,
    h: usize,
) -> Result<()> {
    if pt.shape != [nf, n, n] {
        return Err(err(
            Class::BadAdapter,
            path,
            format!(
                "{name}: boft_P has shape {:?}, expected [{nf}, {n}, {n}]",
                pt.shape
            ),
        ));
    }
    let v = floats(path, f, pt)?;
    for i in 0..nf {
        let pi = perm::peft_boft(n, h, i);
        for (j, &pj) in pi.iter().enumerate() {
            let row = &v[(i * n + j) * n..(i * n + j + 1) * n];
            if row[pj as usize] != 1.0 || row.iter().filter(|&&x| x != 0.0).count() != 1 {
                return Err(err(
                    Class::BadAdapter,
                    path,
                    format!("{name}: stored boft_P of factor {i} is not the butterfly permutation"),
                ));
            }
        }
    }
    Ok(())
}
