//! LyCORIS (`lycoris-lora`) diag-oft and boft, and kohya sd-scripts `networks.oft`: single
//! safetensors files keyed `<prefix>_<module path, '.' → '_'>.<tensor>`. All rotate the output
//! side (rows of the weight).
//!
//! * LyCORIS diag-oft: `oft_blocks (D, H, H)`, `alpha` (the constraint), optional `rescale`.
//!   `Q = A − Aᵀ` over all blocks; with `c = alpha·out > 0` and `‖Q‖_F + 1e-8 > c`,
//!   `Q ← Q·c/(‖Q‖ + 1e-8)`; `R_k = C+(Q_k)`; merge `W'_k = R_kᵀ·W_k`, then rows × rescale.
//!   The canonical block is `R_kᵀ = C−(Q_k)`.
//! * LyCORIS boft: `oft_blocks (m, D, H, H)`; same Q, constraint (norm over all m·D blocks) and
//!   `R = C+(Q)`. Stage i gathers rows by LyCORIS's pattern (groups of `2k`, `k = 2^i·H/2`,
//!   interleaved halves), multiplies each H-row block by `R` (not its transpose), scatters back.
//! * kohya `networks.oft` (`oft_unet_*`): diag-oft maths with the clamp always applied,
//!   `Q·(min(‖Q‖, c) + 1e-8)/(‖Q‖ + 1e-8)`, no rescale.
//!
//! `export` writes such files back out.
//!
//! Module names are left as the file spells them (`lycoris_down_blocks_0_…`); `crate::names`
//! resolves them against the base checkpoint.

pub mod export;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::adapter::{Adapter, BlockKind, Deferred, Side, Target};
use crate::checkpoint::{dtype, Dtype, SafeFile, TensorInfo};
use crate::error::{err, Class, Result};
use crate::formats::read::{self, check_floats, floats};
use crate::math::perm;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Flavour {
    DiagOft,
    Boft,
    Kohya,
}

#[derive(Default)]
struct Module<'a> {
    blocks: Option<&'a TensorInfo>,
    /// kohya FLUX: one `oft_blocks.<j>` per row split of a fused weight, in row order.
    splits: BTreeMap<usize, &'a TensorInfo>,
    /// LyCORIS 2.0: the finished `diag(s)·R` per block.
    diag: Option<&'a TensorInfo>,
    alpha: Option<&'a TensorInfo>,
    rescale: Option<&'a TensorInfo>,
}

/// True when the tensor names look like a LyCORIS or kohya OFT file.
pub fn detect(f: &SafeFile) -> bool {
    f.tensors.iter().any(|t| {
        t.name.ends_with(".oft_blocks")
            || t.name.ends_with(".oft_diag")
            || t.name.contains(".oft_blocks.")
    })
}

/// `kohya`: force kohya's (Some(true)) or LyCORIS's (Some(false)) maths; None decides by the
/// `oft_unet_` prefix kohya writes.
pub fn import(f: &Arc<SafeFile>, kohya: Option<bool>) -> Result<Adapter> {
    let path = f.path.as_path();
    let mut modules: BTreeMap<&str, Module> = BTreeMap::new();
    for t in &f.tensors {
        let (m, kind) = t.name.rsplit_once('.').unwrap_or((t.name.as_str(), ""));
        match kind {
            "oft_blocks" => modules.entry(m).or_default().blocks = Some(t),
            "alpha" => modules.entry(m).or_default().alpha = Some(t),
            "rescale" => modules.entry(m).or_default().rescale = Some(t),
            "oft_diag" => modules.entry(m).or_default().diag = Some(t),
            j if t.name.contains(".oft_blocks.") => {
                let (m, _) = t.name.rsplit_once(".oft_blocks.").expect("contains it");
                let j: usize = j.parse().map_err(|_| {
                    err(
                        Class::BadAdapter,
                        path,
                        format!("tensor {:?}: split index {j:?} is not a number", t.name),
                    )
                })?;
                modules.entry(m).or_default().splits.insert(j, t);
            }
            _ => {
                return Err(err(
                    Class::BadAdapter,
                    path,
                    format!(
                        "tensor {:?} is not part of a LyCORIS/kohya OFT module",
                        t.name
                    ),
                ))
            }
        }
    }
    let prefixed = modules.keys().any(|k| k.starts_with("oft_unet_"));
    if kohya.is_none() && prefixed && modules.keys().any(|k| !k.starts_with("oft_unet_")) {
        return Err(err(
            Class::UnknownFormat,
            path,
            "mixes kohya (oft_unet_*) and other module names: not one file format (--from \
             lycoris or --from kohya decides)",
        ));
    }
    let kohya = kohya.unwrap_or(prefixed);
    let meta_constraint = metadata_constraint(f);
    let mut targets = Vec::with_capacity(modules.len());
    let mut flavours = std::collections::BTreeSet::new();
    for (name, m) in &modules {
        if let Some(t) = m.diag {
            if m.blocks.is_some() || !m.splits.is_empty() || kohya {
                return Err(err(
                    Class::BadAdapter,
                    path,
                    format!("{name}: oft_diag (LyCORIS 2.0) beside other OFT tensors"),
                ));
            }
            flavours.insert("DiagOft".to_string());
            targets.push(finished_target(path, f, name, t)?);
            continue;
        }
        if !m.splits.is_empty() {
            if m.blocks.is_some() || !kohya {
                return Err(err(
                    Class::BadAdapter,
                    path,
                    format!(
                        "{name}: split oft_blocks.<j> tensors belong to kohya FLUX files \
                         (oft_unet_*), alone"
                    ),
                ));
            }
            if m.splits.keys().copied().ne(0..m.splits.len()) {
                return Err(err(
                    Class::BadAdapter,
                    path,
                    format!("{name}: split indices are not 0..{}", m.splits.len()),
                ));
            }
            flavours.insert("Kohya".to_string());
            // Splits rotate consecutive row ranges of the fused weight, each on its own.
            let mut row = 0usize;
            for t in m.splits.values() {
                let rows_j = match t.shape.as_slice() {
                    &[d, h, _] => d.saturating_mul(h),
                    _ => 0,
                };
                let range = (m.splits.len() > 1).then_some((row, row + rows_j));
                targets.push(module_target(
                    path,
                    f,
                    name,
                    m,
                    t,
                    Flavour::Kohya,
                    meta_constraint,
                    range,
                )?);
                row += rows_j;
            }
            continue;
        }
        let blocks = m.blocks.ok_or_else(|| {
            err(
                Class::BadAdapter,
                path,
                format!("{name}: alpha/rescale without oft_blocks"),
            )
        })?;
        let flavour = match (kohya, blocks.shape.len()) {
            (true, 3) => Flavour::Kohya,
            (false, 3) => Flavour::DiagOft,
            (false, 4) => Flavour::Boft,
            _ => {
                return Err(err(
                    Class::BadAdapter,
                    path,
                    format!(
                        "{name}.oft_blocks has shape {:?}, expected (D, H, H){}",
                        blocks.shape,
                        if kohya { "" } else { " or (m, D, H, H)" }
                    ),
                ))
            }
        };
        flavours.insert(format!("{flavour:?}"));
        targets.push(module_target(
            path,
            f,
            name,
            m,
            blocks,
            flavour,
            meta_constraint,
            None,
        )?);
    }
    if targets.is_empty() {
        return Err(err(Class::BadAdapter, path, "no oft_blocks tensors"));
    }
    let source_format = if kohya {
        "kohya-oft"
    } else if flavours.len() > 1 {
        "lycoris-oft"
    } else if flavours.contains("Boft") {
        "lycoris-boft"
    } else {
        "lycoris-diag-oft"
    };
    let version = f
        .metadata
        .as_ref()
        .and_then(|m| m.get("ss_network_module").cloned())
        .unwrap_or_default();
    Ok(Adapter {
        targets,
        replacements: Vec::new(),
        source_format: source_format.into(),
        source_version: version,
        ..Default::default()
    })
}

/// LyCORIS 2.1.0–2.1.0.post2 files carry no `alpha`; their constraint is in the training
/// arguments, when those were kept.
fn metadata_constraint(f: &SafeFile) -> Option<f64> {
    let args = f.metadata.as_ref()?.get("ss_network_args")?;
    let v: serde_json::Value = serde_json::from_str(args).ok()?;
    ["constraint", "constrain"]
        .iter()
        .find_map(|k| match v.get(k)? {
            serde_json::Value::String(s) => s.parse().ok(),
            x => x.as_f64(),
        })
}

struct Recipe {
    flavour: Flavour,
    /// `c = alpha · out` (0: no constraint).
    constraint: f64,
    h: usize,
}

#[allow(clippy::too_many_arguments)]
fn module_target(
    path: &Path,
    f: &Arc<SafeFile>,
    name: &str,
    m: &Module,
    blocks: &TensorInfo,
    flavour: Flavour,
    meta_constraint: Option<f64>,
    rows: Option<(usize, usize)>,
) -> Result<Target> {
    let bad = |msg: String| err(Class::BadAdapter, path, format!("{name}: {msg}"));
    let (nf, d, h) = match blocks.shape.as_slice() {
        &[d, a, b] if a == b => (1, d, a),
        &[m, d, a, b] if a == b => (m, d, a),
        s => {
            return Err(bad(format!(
                "oft_blocks has shape {s:?}, blocks are not square"
            )))
        }
    };
    if nf == 0 || d == 0 || h == 0 {
        return Err(bad(format!(
            "oft_blocks has an empty dimension {:?}",
            blocks.shape
        )));
    }
    if flavour == Flavour::Boft {
        // Stage i pairs half-blocks across 2^i blocks.
        if h % 2 != 0 || nf > 1 && !perm::multiple_of_pow2(d, nf - 1) {
            return Err(bad(format!(
                "{nf} butterfly stages need an even block size and a block count divisible by {}; \
                 oft_blocks holds {d} blocks of {h}",
                perm::pow2_text(nf - 1)
            )));
        }
    }
    check_floats(path, f, blocks)?;
    let out = d * h;
    let alpha = match m.alpha {
        Some(a) => {
            let v = floats(path, f, a)?;
            if v.len() != 1 {
                return Err(bad(format!(
                    "alpha has shape {:?}, expected a scalar",
                    a.shape
                )));
            }
            v[0] as f64
        }
        None if flavour == Flavour::Kohya => {
            return Err(bad("kohya OFT module without alpha".into()));
        }
        None => meta_constraint.unwrap_or(0.0),
    };
    let scale = match m.rescale {
        Some(r) => {
            let v = floats(path, f, r)?;
            if r.shape.first() != Some(&out) || v.len() != out {
                return Err(bad(format!(
                    "rescale has shape {:?}, expected ({out}, 1, …)",
                    r.shape
                )));
            }
            Some(v)
        }
        None => None,
    };
    let perms = (0..nf)
        .map(|i| (flavour == Flavour::Boft).then(|| crate::math::perm::lycoris_boft(out, h, i)))
        .map(|p| p.filter(|p| !crate::math::perm::is_identity(p)))
        .collect();
    let recipe = Arc::new(Recipe {
        flavour,
        constraint: alpha * out as f64,
        h,
    });
    let deferred = {
        let (f, t, path) = (f.clone(), blocks.clone(), path.to_path_buf());
        Deferred {
            path: path.clone(),
            compute: Arc::new(move |dt| compute_blocks(&path, &f, &t, &recipe, dt)),
            base_dtype: None,
        }
    };
    Ok(Target {
        name: name.to_string(),
        module: name.to_string(),
        side: Side::Output,
        rows,
        factors: nf,
        blocks: d,
        block_size: h,
        deferred: Some(deferred),
        perms,
        scale,
        kind: BlockKind::Cayley,
        ..Default::default()
    })
}

/// LyCORIS 2.0.x stored each block finished, `oft_diag_k = diag(s_k)·R_k` (constraint and
/// rescale applied), and merged `W'_k = oft_diag_kᵀ·W_k`; at multiplier t the block is
/// `t·oft_diag + (1 − t)·I` (`--strength-mode per-factor`). The canonical block is the transpose;
/// with a rescale it is not orthogonal (`block_kind: raw`).
fn finished_target(path: &Path, f: &Arc<SafeFile>, name: &str, t: &TensorInfo) -> Result<Target> {
    let (d, h) = match t.shape.as_slice() {
        &[d, a, b] if a == b && d > 0 && a > 0 => (d, a),
        s => {
            return Err(err(
                Class::BadAdapter,
                path,
                format!("{name}.oft_diag has shape {s:?}, expected (D, H, H)"),
            ))
        }
    };
    check_floats(path, f, t)?;
    let deferred = {
        let (f, t, path) = (f.clone(), t.clone(), path.to_path_buf());
        Deferred {
            path: path.clone(),
            base_dtype: None,
            compute: Arc::new(move |_| {
                let v = floats(&path, &f, &t)?;
                let hh = h * h;
                Ok(v.chunks_exact(hh)
                    .flat_map(|b| (0..hh).map(move |i| b[(i % h) * h + i / h]))
                    .collect())
            }),
        }
    };
    Ok(Target {
        name: name.to_string(),
        module: name.to_string(),
        side: Side::Output,
        factors: 1,
        blocks: d,
        block_size: h,
        deferred: Some(deferred),
        perms: vec![None],
        scale: None,
        kind: BlockKind::Raw,
        ..Default::default()
    })
}

/// `C±(Q)` of every block. LyCORIS merges with its module cast to the model's dtype, so on a
/// 16-bit model it rounds the blocks, `Q = A − Aᵀ`, its norm and the clamped Q to that dtype
/// before solving in f32; `dt` (the base dtype, when known) reproduces that. kohya computes in
/// the stored dtype and f32.
fn compute_blocks(
    path: &Path,
    f: &SafeFile,
    t: &TensorInfo,
    r: &Recipe,
    dt: Option<Dtype>,
) -> Result<Vec<f32>> {
    let raw = floats(path, f, t)?;
    let h = r.h;
    let hh = h * h;
    let low = dt.filter(|d| r.flavour != Flavour::Kohya && matches!(d, Dtype::BF16 | Dtype::F16));
    let round = |x: f32| match low {
        Some(d) => dtype::round_f32(d, x),
        None => x,
    };
    let mut q: Vec<f64> = vec![0.0; raw.len()];
    let skew = |src: &[f32], dst: &mut [f32]| {
        for (blk, out) in src.chunks_exact(hh).zip(dst.chunks_exact_mut(hh)) {
            for i in 0..h {
                for j in 0..h {
                    out[i * h + j] = blk[i * h + j] - blk[j * h + i];
                }
            }
        }
    };
    match low {
        Some(d) => {
            // round(round(a_ij) − round(a_ji)), each rounding over the whole array at once.
            let mut a = raw.clone();
            dtype::round_slice(d, &mut a);
            let mut s = vec![0f32; a.len()];
            skew(&a, &mut s);
            dtype::round_slice(d, &mut s);
            q.iter_mut().zip(&s).for_each(|(q, &s)| *q = s as f64);
        }
        None => {
            for (blk, out) in raw.chunks_exact(hh).zip(q.chunks_exact_mut(hh)) {
                for i in 0..h {
                    for j in 0..h {
                        out[i * h + j] = blk[i * h + j] as f64 - blk[j * h + i] as f64;
                    }
                }
            }
        }
    }
    let mut norm = q.iter().map(|x| x * x).sum::<f64>().sqrt();
    if low.is_some() {
        norm = round(norm as f32) as f64;
    }
    match r.flavour {
        Flavour::Kohya => {
            let factor = (norm.min(r.constraint) + 1e-8) / (norm + 1e-8);
            q.iter_mut().for_each(|x| *x *= factor);
        }
        _ if r.constraint > 0.0 && norm + 1e-8 > r.constraint => match low {
            Some(d) => {
                let (c, n) = (r.constraint as f32, round((norm + 1e-8) as f32));
                let mut s: Vec<f32> = q.iter().map(|&x| x as f32 * c).collect();
                dtype::round_slice(d, &mut s);
                s.iter_mut().for_each(|x| *x /= n);
                dtype::round_slice(d, &mut s);
                q.iter_mut().zip(&s).for_each(|(q, &s)| *q = s as f64);
            }
            None => {
                let factor = r.constraint / (norm + 1e-8);
                q.iter_mut().for_each(|x| *x *= factor);
            }
        },
        _ => {}
    }
    // The canonical block of diag-oft/kohya is Rᵀ = C+(Q)ᵀ = C−(Q); boft multiplies by
    // R = C+(Q) itself.
    read::cayley_blocks(path, &t.name, &q, (hh, h), |s| match r.flavour {
        Flavour::Boft => s.iter().map(|x| -x).collect(),
        _ => s.to_vec(),
    })
}
