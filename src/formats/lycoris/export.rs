//! Export to one LyCORIS safetensors file for output-side targets: diag-oft
//! `oft_blocks (D, H, H)` or boft `oft_blocks (m, D, H, H)` holding `A = ½Q` (LyCORIS forms
//! `Q = A − Aᵀ`), `alpha = 0` (no constraint) and `rescale` when the target has a scale. Exact
//! or refused: the gate is `formats::export`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::json;

use crate::adapter::{Adapter, Side, Target};
use crate::error::{Class, Error, Result};
use crate::formats::export::{
    check_views, f32_tensor, prepare, refuse, serialize, Exported, Generators, Map,
};
use crate::math::perm;

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
            let mut gens = Generators::default();
            for k in 0..d {
                // Canonical block = C+(Q)ᵀ = C−(Q); A = ½Q.
                v.extend(gens.get(t, 0, k, Map::Minus)?.iter().map(|x| 0.5 * x));
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
            let mut gens = Generators::default();
            for f in 0..t.factors {
                for k in 0..d {
                    // Canonical block = C+(Q); A = ½Q.
                    let s = gens.get(&t, f, k, Map::Plus)?;
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
