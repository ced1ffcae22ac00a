//! PEFT OFT (`peft_type: "OFT"`), three on-disk generations, told apart by their tensors:
//!
//! * v2 (PEFT ≥ 0.16): `<m>.oft_R.weight (r, H(H−1)/2)`, the strict upper triangle of each
//!   block's generator, `S = U − Uᵀ`; the block is the exact `C−(S)` or, with
//!   `use_cayley_neumann` (the default), PEFT's truncated Neumann series of `C+(S)`. Input side:
//!   `W' = W · BDᵀ`; embeddings (`oft_embedding_R`) `E' = E · BD`.
//! * v1 (PEFT 0.14–0.15): `<m>.oft_r (r, H, H)` raw blocks and `<m>.oft_s (out, 1)`;
//!   `C−(½(A − Aᵀ))`, input side, `W' = diag(s) · W · BDᵀ`.
//! * v0 (PEFT 0.7–0.13): `<m>.oft_r (r, Hb, Hb)` alone, `Hb = ceil(out / r)`; output side,
//!   `W' = BDᵀ · W` with BD cropped to `out × out` when r does not divide out.
//!
//! A first dimension of 1 with `block_share` is one block repeated over the diagonal. `coft`
//! clamps each block before the Cayley map: v2 clamps `S` to Frobenius norm `eps/√r`, v0/v1 clamp
//! the raw block to `eps·k²/√r` (`k = Hb` in v0, `ceil(out / blocks)` in v1), r = stored blocks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::{module_key, replacement};
use crate::adapter::{Adapter, BlockKind, Deferred, Side, Target};
use crate::checkpoint::{SafeFile, TensorInfo};
use crate::error::{err, Class, Result};
use crate::formats::read::{check_floats, floats, solve_blocks};
use crate::math::cayley;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Gen {
    V0,
    V1,
    V2,
}

/// How one module's stored tensor becomes its blocks.
#[derive(Clone)]
struct Recipe {
    gen: Gen,
    h: usize,
    /// Frobenius bound of the COFT constraint (on S in v2, on the raw block in v0/v1).
    clamp: Option<f64>,
    /// v2: Neumann terms and whether the series is PEFT 0.16–0.17's.
    neumann: Option<(usize, bool)>,
    /// Output side (v0) and embeddings store the transpose of PEFT's block.
    transpose: bool,
}

#[derive(Default)]
struct Module<'a> {
    r: Option<&'a TensorInfo>,
    s: Option<&'a TensorInfo>,
    embedding: bool,
}

/// Read a PEFT OFT adapter (any generation) from its parsed config and weights.
pub fn import(config: &Value, cfg_path: &Path, f: &Arc<SafeFile>) -> Result<Adapter> {
    let path = f.path.as_path();
    let mut modules: BTreeMap<String, Module> = BTreeMap::new();
    let mut replacements = Vec::new();
    let mut gens = std::collections::BTreeSet::new();
    for t in &f.tensors {
        let k = module_key(&t.name);
        if let Some(m) = k.strip_suffix(".oft_R.weight") {
            gens.insert("oft_R.weight");
            modules.entry(m.to_string()).or_default().r = Some(t);
        } else if let Some(m) = k.strip_suffix(".oft_embedding_R.weight") {
            gens.insert("oft_R.weight");
            let e = modules.entry(m.to_string()).or_default();
            e.r = Some(t);
            e.embedding = true;
        } else if let Some(m) = k.strip_suffix(".oft_r") {
            gens.insert("oft_r");
            modules.entry(m.to_string()).or_default().r = Some(t);
        } else if let Some(m) = k.strip_suffix(".oft_s") {
            modules.entry(m.to_string()).or_default().s = Some(t);
        } else {
            replacements.push(replacement(path, f, t)?);
        }
    }
    if gens.len() > 1 {
        return Err(err(
            Class::UnknownFormat,
            path,
            "mixes oft_R.weight (PEFT ≥ 0.16) and oft_r (PEFT ≤ 0.15) tensors: not one PEFT version",
        ));
    }
    if modules.is_empty() {
        return Err(err(
            Class::BadAdapter,
            path,
            "no oft_R.weight or oft_r tensors: not an OFT adapter",
        ));
    }
    let gen = if gens.contains("oft_R.weight") {
        Gen::V2
    } else if modules.values().any(|m| m.s.is_some()) {
        Gen::V1
    } else {
        Gen::V0
    };
    let cfg = Config::read(config, cfg_path)?;
    let mut targets = Vec::with_capacity(modules.len());
    for (name, m) in &modules {
        let r = m.r.ok_or_else(|| {
            err(
                Class::BadAdapter,
                path,
                format!("{name}: oft_s without oft_r"),
            )
        })?;
        if gen == Gen::V1 && m.s.is_none() {
            return Err(err(
                Class::BadAdapter,
                path,
                format!("{name}: oft_r without oft_s, while other modules have one"),
            ));
        }
        targets.push(module_target(path, &cfg, gen, name, f, r, m)?);
    }
    Ok(Adapter {
        targets,
        replacements,
        source_format: match gen {
            Gen::V0 => "peft-oft-v0",
            Gen::V1 => "peft-oft-v1",
            Gen::V2 => "peft-oft-v2",
        }
        .into(),
        ..Default::default()
    })
}

struct Config {
    path: PathBuf,
    r: usize,
    coft: bool,
    eps: f64,
    block_share: bool,
    neumann: bool,
    terms: usize,
    /// PEFT 0.16–0.17 summed another series; their configs carry no `peft_version`.
    legacy_series: bool,
}

impl Config {
    fn read(c: &Value, path: &Path) -> Result<Config> {
        use super::{config_bool, config_f64, config_uint};
        let terms = config_uint(c, "num_cayley_neumann_terms", 5, path)?;
        if !(1..=64).contains(&terms) {
            return Err(err(
                Class::BadAdapter,
                path,
                format!("num_cayley_neumann_terms {terms} is outside 1..=64"),
            ));
        }
        let eps = config_f64(c, "eps", 6e-5, path)?;
        if !eps.is_finite() || eps < 0.0 {
            return Err(err(
                Class::BadAdapter,
                path,
                format!("eps {eps} is not a finite non-negative number"),
            ));
        }
        let block_share = config_bool(c, "block_share", false, path)?;
        // PEFT looks ranks up in it by module name: anything but an object (or null, none) is
        // not a config PEFT loads.
        if let Some(v) = c
            .get("rank_pattern")
            .filter(|v| !v.is_null() && !v.is_object())
        {
            return Err(err(
                Class::BadAdapter,
                path,
                format!("rank_pattern is {v}, expected an object"),
            ));
        }
        if c.get("rank_pattern")
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
            && block_share
        {
            return Err(err(
                Class::UnknownFormat,
                path,
                "block_share together with rank_pattern is not supported",
            ));
        }
        let r = config_uint(c, "r", 0, path)?;
        Ok(Config {
            path: path.to_path_buf(),
            r: usize::try_from(r).unwrap_or(usize::MAX),
            coft: config_bool(c, "coft", false, path)?,
            eps,
            block_share,
            neumann: config_bool(c, "use_cayley_neumann", true, path)?,
            terms: terms as usize,
            legacy_series: c.get("peft_version").is_none(),
        })
    }
}

fn module_target(
    path: &Path,
    cfg: &Config,
    gen: Gen,
    name: &str,
    f: &Arc<SafeFile>,
    r: &TensorInfo,
    m: &Module,
) -> Result<Target> {
    let bad = |msg: String| err(Class::BadAdapter, path, format!("{name}: {msg}"));
    let tname = match (gen, m.embedding) {
        (Gen::V2, true) => "oft_embedding_R.weight",
        (Gen::V2, false) => "oft_R.weight",
        _ => "oft_r",
    };
    let (stored, h) = match (gen, r.shape.as_slice()) {
        (Gen::V2, &[k, len]) => (
            k,
            cayley::triu_size(len).ok_or_else(|| {
                bad(format!(
                    "{tname} rows hold {len} values, not the strict upper triangle of a square block"
                ))
            })?,
        ),
        (Gen::V0 | Gen::V1, &[k, a, b]) if a == b => (k, a),
        _ => {
            return Err(bad(format!(
                "{tname} has shape {:?}, expected {}",
                r.shape,
                if gen == Gen::V2 {
                    "(r, H(H−1)/2)"
                } else {
                    "(r, H, H)"
                }
            )))
        }
    };
    if stored == 0 || h == 0 {
        return Err(bad(format!("{tname} has an empty dimension {:?}", r.shape)));
    }
    check_floats(path, f, r)?;
    let share = cfg.block_share && stored == 1;
    if cfg.block_share && stored != 1 {
        return Err(err(
            Class::BadAdapter,
            &cfg.path,
            format!("{name}: config says block_share but {tname} holds {stored} blocks"),
        ));
    }
    let scale = match m.s {
        Some(s) => {
            let v = floats(path, f, s)?;
            if !matches!(s.shape.as_slice(), [_, 1]) {
                return Err(bad(format!(
                    "oft_s has shape {:?}, expected (out, 1)",
                    s.shape
                )));
            }
            Some(v)
        }
        None => None,
    };
    // v0 repeats a shared block r times (r from the config); v1/v2 fill the input axis, whose
    // length only the base knows.
    let blocks = match (share, gen) {
        (false, _) => stored,
        (true, Gen::V0) => {
            if cfg.r == 0 {
                return Err(err(
                    Class::BadAdapter,
                    &cfg.path,
                    format!("{name}: block_share needs r in the config"),
                ));
            }
            cfg.r
        }
        (true, _) => 0,
    };
    let clamp = match (cfg.coft, gen) {
        (false, _) => None,
        (true, Gen::V2) => Some(cfg.eps / (stored as f64).sqrt()),
        (true, Gen::V0) => Some(cfg.eps * (h * h) as f64 / (stored as f64).sqrt()),
        (true, Gen::V1) => {
            let out = scale.as_ref().map_or(0, Vec::len);
            if share {
                return Err(err(
                    Class::UnknownFormat,
                    &cfg.path,
                    format!(
                        "{name}: coft with block_share in a PEFT 0.14–0.15 file depends on the \
                         layer's input size; not supported"
                    ),
                ));
            }
            let k = out.div_ceil(stored) as f64;
            Some(cfg.eps * k * k / (stored as f64).sqrt())
        }
    };
    let neumann = (gen == Gen::V2 && cfg.neumann).then_some((cfg.terms, cfg.legacy_series));
    let recipe = Recipe {
        gen,
        h,
        clamp,
        neumann,
        transpose: gen == Gen::V0 || m.embedding,
    };
    let deferred = {
        let (f, r, path) = (f.clone(), r.clone(), path.to_path_buf());
        Deferred {
            path: path.clone(),
            compute: Arc::new(move |_| compute_blocks(&path, &f, &r, &recipe)),
            base_dtype: None,
        }
    };
    Ok(Target {
        name: format!("{name}.weight"),
        module: name.to_string(),
        side: if gen == Gen::V0 {
            Side::Output
        } else {
            Side::Input
        },
        factors: 1,
        blocks,
        block_size: h,
        deferred: Some(deferred),
        perms: vec![None],
        scale,
        kind: if neumann.is_some() {
            BlockKind::Neumann
        } else {
            BlockKind::Cayley
        },
        share,
        croppable: gen == Gen::V0,
        ..Default::default()
    })
}

/// Every stored block, as PEFT builds it, in f64 and rounded once to f32.
fn compute_blocks(path: &Path, f: &SafeFile, t: &TensorInfo, r: &Recipe) -> Result<Vec<f32>> {
    let raw: Vec<f64> = floats(path, f, t)?.iter().map(|&x| x as f64).collect();
    let h = r.h;
    let per = if r.gen == Gen::V2 {
        h * (h - 1) / 2
    } else {
        h * h
    };
    solve_blocks(path, &t.name, &raw, per, |blk| {
        let mut a = blk.to_vec();
        let q = if r.gen == Gen::V2 {
            let mut s = cayley::skew_from_triu(h, &a);
            if let Some(c) = r.clamp {
                cayley::clamp_frobenius(&mut s, c);
            }
            match r.neumann {
                Some((terms, legacy)) => Some(cayley::neumann_plus(h, &s, terms, legacy)),
                None => cayley::try_cayley_minus(h, &s),
            }
        } else {
            if let Some(c) = r.clamp {
                cayley::clamp_frobenius(&mut a, c);
            }
            cayley::try_cayley_minus(h, &cayley::skew_half(h, &a))
        }?;
        Some(if r.transpose {
            (0..h * h).map(|i| q[(i % h) * h + i / h]).collect()
        } else {
            q
        })
    })
}
