//! `boft-verify`: structural and numerical checks of an adapter, against a base, and of a merged
//! checkpoint against base ⊕ adapter. Every check reports its measured value and its threshold;
//! the schema of the JSON report is docs/verify-schema.json.

use std::collections::BTreeSet;

use nalgebra::DMatrix;
use rayon::prelude::*;
use serde::Serialize;

use crate::adapter::{Adapter, BlockKind, Side, Target};
use crate::checkpoint::{dtype, Checkpoint, Dtype};
use crate::error::{Class, Error, Result};
use crate::math::blocks;
use crate::math::kernel::{Chain, Scratch};
use crate::merge::{self, Action, CpuBackend};

/// Every check id, in report order. `--checks` selects among these.
pub const CHECKS: &[&str] = &[
    "finite",
    "geometry",
    "block-orthogonality",
    "determinant",
    "transform-orthogonality",
    "connectivity",
    "degrees-of-freedom",
    "distance-from-identity",
    "scale-range",
    "target-present",
    "base-compatible",
    "hyperspherical-energy",
    "merged-layout",
    "merged-untouched",
    "merged-values",
];

/// Transforms up to this size are measured exactly on the dense matrix; larger ones on probes.
pub const DENSE_MAX: usize = 512;

#[derive(Debug, Clone)]
pub struct Settings {
    /// Orthogonality tolerance for exact (Cayley) blocks and the composed transform.
    pub tolerance: f64,
    /// Tolerance for blocks that are orthogonal only approximately by construction.
    pub approx_tolerance: f64,
    /// Relative tolerance (of the tensor's largest magnitude) for f32 merged values.
    pub merged_tolerance: f64,
    pub checks: Option<BTreeSet<String>>,
    pub probes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            tolerance: 1e-5,
            approx_tolerance: 0.05,
            merged_tolerance: 1e-5,
            checks: None,
            probes: 8,
        }
    }
}

impl Settings {
    pub fn parse_checks(list: &str) -> Result<BTreeSet<String>> {
        let mut set = BTreeSet::new();
        for c in list.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if !CHECKS.contains(&c) {
                return Err(Error::bare(
                    Class::Usage,
                    format!("unknown check {c:?}; known: {}", CHECKS.join(", ")),
                ));
            }
            set.insert(c.to_string());
        }
        Ok(set)
    }

    fn wants(&self, check: &str) -> bool {
        self.checks.as_ref().is_none_or(|s| s.contains(check))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    /// A measured property with no pass/fail meaning by default.
    Info,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub adapter: String,
    pub subject: String,
    pub status: Status,
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Measure {
    pub value: f64,
    /// `exact` (dense, n ≤ 512) or `probe`/`estimate` (matrix-free).
    pub method: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Reach {
    pub min: usize,
    pub max: usize,
    pub mean: f64,
    pub dense: bool,
    /// What `factors` butterfly factors of this block size reach at best: min(n, b·2^(N−1)).
    pub butterfly_reach: usize,
    /// The paper's log2(n/b)+1: butterfly factors needed for a dense transform.
    pub factors_for_full_density: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Dof {
    /// Skew-symmetric generator entries: factors · blocks · b(b−1)/2.
    pub adapter: usize,
    pub scale: usize,
    pub dense_orthogonal: usize,
    pub oft_same_block: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Energy {
    pub before: f64,
    pub after: f64,
    pub rel_diff: f64,
    pub rows_sampled: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    pub target: String,
    pub module: String,
    pub side: Side,
    pub factors: usize,
    pub blocks: usize,
    pub block_size: usize,
    pub n: usize,
    pub block_kind: BlockKind,
    pub block_orthogonality: f64,
    pub negative_determinants: usize,
    pub transform_orthogonality: Measure,
    pub reach: Reach,
    pub dof: Dof,
    pub distance_from_identity: Measure,
    pub max_angle_deg: Measure,
    pub scale_min: Option<f64>,
    pub scale_max: Option<f64>,
    pub hyperspherical_energy: Option<Energy>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdapterReport {
    pub path: String,
    pub source_format: String,
    pub source_version: String,
    pub targets: Vec<TargetReport>,
    pub replacements: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct MergedReport {
    pub path: String,
    pub tensors: usize,
    pub transformed: usize,
    pub replaced: usize,
    pub untouched: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub version: &'static str,
    pub passed: bool,
    /// `check:subject` of every failed check.
    pub failed: Vec<String>,
    pub adapters: Vec<AdapterReport>,
    pub merged: Option<MergedReport>,
    pub checks: Vec<Check>,
}

struct Ctx<'a> {
    settings: &'a Settings,
    adapter: String,
    checks: Vec<Check>,
}

impl Ctx<'_> {
    fn push(
        &mut self,
        check: &'static str,
        subject: &str,
        status: Status,
        value: Option<f64>,
        threshold: Option<f64>,
        message: impl Into<String>,
    ) {
        if self.settings.wants(check) {
            self.checks.push(Check {
                check,
                adapter: self.adapter.clone(),
                subject: subject.to_string(),
                status,
                value,
                threshold,
                message: message.into(),
            });
        }
    }

    fn bound(
        &mut self,
        check: &'static str,
        subject: &str,
        value: f64,
        threshold: f64,
        what: &str,
    ) {
        let status = if value <= threshold {
            Status::Pass
        } else {
            Status::Fail
        };
        self.push(
            check,
            subject,
            status,
            Some(value),
            Some(threshold),
            format!("{what} {value:.3e} (threshold {threshold:.1e})"),
        );
    }
}

/// Verify adapters (each with its display path), optionally against a base and a merged checkpoint.
pub fn verify(
    adapters: &[(String, Adapter)],
    base: Option<&Checkpoint>,
    merged: Option<&Checkpoint>,
    settings: &Settings,
) -> Result<Report> {
    let mut checks = Vec::new();
    let mut reports = Vec::new();
    let mut merged_report = None;
    for (label, adapter) in adapters {
        let mut ctx = Ctx {
            settings,
            adapter: label.clone(),
            checks: Vec::new(),
        };
        // Targets are independent: check them in parallel, keep the report in adapter order.
        let per_target: Vec<Result<(TargetReport, Vec<Check>)>> = adapter
            .targets
            .par_iter()
            .map(|t| {
                let mut c = Ctx {
                    settings,
                    adapter: label.clone(),
                    checks: Vec::new(),
                };
                check_target(&mut c, t, base).map(|r| (r, c.checks))
            })
            .collect();
        let mut targets = Vec::with_capacity(per_target.len());
        for r in per_target {
            let (report, checks) = r?;
            targets.push(report);
            ctx.checks.extend(checks);
        }
        if let Some(base) = base {
            for r in &adapter.replacements {
                match base.get(&r.name) {
                    None => ctx.push(
                        "target-present",
                        &r.name,
                        Status::Fail,
                        None,
                        None,
                        "replaced tensor is not in the base",
                    ),
                    Some((_, info)) if info.shape != r.shape => ctx.push(
                        "base-compatible",
                        &r.name,
                        Status::Fail,
                        None,
                        None,
                        format!("replacement shape {:?}, base {:?}", r.shape, info.shape),
                    ),
                    Some(_) => ctx.push(
                        "target-present",
                        &r.name,
                        Status::Pass,
                        None,
                        None,
                        "replaced tensor present with the same shape",
                    ),
                }
            }
        }
        if let (Some(base), Some(m)) = (base, merged) {
            merged_report = Some(check_merged(&mut ctx, base, m, adapter)?);
        }
        checks.extend(ctx.checks);
        reports.push(AdapterReport {
            path: label.clone(),
            source_format: adapter.source_format.clone(),
            source_version: adapter.source_version.clone(),
            targets,
            replacements: adapter.replacements.len(),
        });
    }
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| c.status == Status::Fail)
        .map(|c| format!("{}:{}", c.check, c.subject))
        .collect();
    Ok(Report {
        tool: "boft-verify",
        version: env!("CARGO_PKG_VERSION"),
        passed: failed.is_empty(),
        failed,
        adapters: reports,
        merged: merged_report,
        checks,
    })
}

fn check_target(ctx: &mut Ctx, t: &Target, base: Option<&Checkpoint>) -> Result<TargetReport> {
    let label = t.label();
    let (h, d, nf, n) = (t.block_size, t.blocks, t.factors, t.n());
    // Loading already refused non-finite values and broken geometry; record that they held.
    ctx.push(
        "finite",
        &label,
        Status::Pass,
        None,
        None,
        "all block and scale values finite",
    );
    ctx.push(
        "geometry",
        &label,
        Status::Pass,
        Some(n as f64),
        None,
        format!("{nf} factors × {d} blocks × {h}; permutations valid"),
    );

    let mut worst = 0f64;
    let mut negative = 0usize;
    for f in 0..nf {
        for k in 0..d {
            let b = t.block(f, k);
            worst = worst.max(blocks::orth_error(h, b));
            if blocks::determinant(h, b) < 0.0 {
                negative += 1;
            }
        }
    }
    let exact = t.kind == BlockKind::Cayley;
    let orth_tol = if exact {
        ctx.settings.tolerance
    } else {
        ctx.settings.approx_tolerance
    };
    let what = match t.kind {
        BlockKind::Cayley => "worst |BᵀB − I| over blocks",
        BlockKind::Neumann => "worst |BᵀB − I| (expected: truncated Neumann series)",
        BlockKind::Cropped => "worst |BᵀB − I| (expected: cropped blocks)",
        BlockKind::Raw => "worst |BᵀB − I| (stored finished blocks)",
    };
    ctx.bound("block-orthogonality", &label, worst, orth_tol, what);
    if exact {
        ctx.push(
            "determinant",
            &label,
            if negative == 0 {
                Status::Pass
            } else {
                Status::Fail
            },
            Some(negative as f64),
            Some(0.0),
            format!("{negative} of {} Cayley blocks with determinant −1", nf * d),
        );
    } else {
        ctx.push(
            "determinant",
            &label,
            Status::Info,
            Some(negative as f64),
            None,
            format!("{negative} blocks with negative determinant"),
        );
    }

    let m_chain = {
        let mut c = t.chain(false)?;
        c.scale = None;
        c
    };
    let props = transform_properties(&m_chain, ctx.settings.probes, DENSE_MAX);
    ctx.bound(
        "transform-orthogonality",
        &label,
        props.orth.value,
        orth_tol * (nf as f64).max(1.0),
        &format!("composed M: max |MᵀM − I| ({})", props.orth.method),
    );

    let reach = connectivity(&m_chain);
    ctx.push(
        "connectivity",
        &label,
        Status::Info,
        Some(reach.min as f64),
        Some(reach.butterfly_reach as f64),
        format!(
            "each output reaches {}–{} of {n} inputs (butterfly depth {nf} gives {}; dense needs {} factors){}",
            reach.min,
            reach.max,
            reach.butterfly_reach,
            reach.factors_for_full_density,
            if reach.dense { "; M is dense" } else { "" }
        ),
    );
    let dof = degrees_of_freedom(t);
    ctx.push(
        "degrees-of-freedom",
        &label,
        Status::Info,
        Some(dof.adapter as f64),
        None,
        format!(
            "{} generator parameters (+{} scale) vs {} for a dense orthogonal n={n} and {} for OFT with b={h}",
            dof.adapter, dof.scale, dof.dense_orthogonal, dof.oft_same_block
        ),
    );
    ctx.push(
        "distance-from-identity",
        &label,
        Status::Info,
        Some(props.distance.value),
        None,
        format!(
            "‖M − I‖_F = {:.4} ({}), largest rotation angle {:.3}° ({})",
            props.distance.value, props.distance.method, props.angle.value, props.angle.method
        ),
    );
    let (smin, smax) = match &t.scale {
        Some(s) if !s.is_empty() => {
            let lo = s.iter().fold(f32::INFINITY, |a, &b| a.min(b)) as f64;
            let hi = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            ctx.push(
                "scale-range",
                &label,
                Status::Info,
                Some(hi),
                None,
                format!("per-row scale in [{lo:.4}, {hi:.4}]"),
            );
            (Some(lo), Some(hi))
        }
        _ => (None, None),
    };

    let mut energy = None;
    if let Some(base) = base {
        match base.get(&t.name) {
            None => ctx.push(
                "target-present",
                &label,
                Status::Fail,
                None,
                None,
                format!(
                    "module {} targets {} which the base lacks",
                    t.module, t.name
                ),
            ),
            Some((file, info)) => {
                ctx.push(
                    "target-present",
                    &label,
                    Status::Pass,
                    None,
                    None,
                    "present in the base",
                );
                match t.check_base(info.dtype, &info.shape) {
                    Err(e) => ctx.push(
                        "base-compatible",
                        &label,
                        Status::Fail,
                        None,
                        None,
                        e.message,
                    ),
                    Ok(()) => {
                        ctx.push(
                            "base-compatible",
                            &label,
                            Status::Pass,
                            None,
                            None,
                            format!("{} {:?}", info.dtype.name(), info.shape),
                        );
                        if t.side == Side::Input && ctx.settings.wants("hyperspherical-energy") {
                            let chain = t.chain(false)?;
                            let e =
                                hyperspherical(&chain, info.dtype, &info.shape, file.data(info));
                            ctx.bound(
                                "hyperspherical-energy",
                                &label,
                                e.rel_diff,
                                1e-4,
                                &format!(
                                    "relative change of the energy of {} sampled neurons",
                                    e.rows_sampled
                                ),
                            );
                            energy = Some(e);
                        }
                    }
                }
            }
        }
    }

    Ok(TargetReport {
        target: t.name.clone(),
        module: t.module.clone(),
        side: t.side,
        factors: nf,
        blocks: d,
        block_size: h,
        n,
        block_kind: t.kind,
        block_orthogonality: worst,
        negative_determinants: negative,
        transform_orthogonality: props.orth,
        reach,
        dof,
        distance_from_identity: props.distance,
        max_angle_deg: props.angle,
        scale_min: smin,
        scale_max: smax,
        hyperspherical_energy: energy,
    })
}

struct Props {
    orth: Measure,
    distance: Measure,
    angle: Measure,
}

/// The chain's `Mᵀ`: factors in reverse order with transposed blocks (`(PᵀQP)ᵀ = PᵀQᵀP`).
pub fn transposed(c: &Chain) -> Chain {
    let mut t = c.clone();
    t.factors.reverse();
    for f in &mut t.factors {
        let mut b = Vec::with_capacity(f.blocks.len());
        for k in 0..f.d {
            b.extend(blocks::transpose(f.h, f.block(k)));
        }
        f.blocks = b;
    }
    t.scale = None;
    t
}

/// Dense M (row-major) by pushing the identity through the chain: row j of the result is
/// `M e_j`, i.e. the result is Mᵀ; transpose it back.
pub fn dense(chain: &Chain) -> Vec<f64> {
    let n = chain.n;
    let mut x = vec![0f32; n * n];
    for j in 0..n {
        x[j * n + j] = 1.0;
    }
    chain.apply_rows(&mut x, 0, n, &mut Scratch::default());
    let mut m = vec![0f64; n * n];
    for j in 0..n {
        for i in 0..n {
            m[i * n + j] = x[j * n + i] as f64;
        }
    }
    m
}

fn transform_properties(chain: &Chain, probes: usize, dense_max: usize) -> Props {
    let n = chain.n;
    if n <= dense_max {
        let m = dense(chain);
        let mm = DMatrix::from_row_slice(n, n, &m);
        let gram = mm.transpose() * &mm;
        let mut orth = 0f64;
        let mut dist = 0f64;
        for i in 0..n {
            for j in 0..n {
                let id = if i == j { 1.0 } else { 0.0 };
                orth = orth.max((gram[(i, j)] - id).abs());
                dist += (mm[(i, j)] - id).powi(2);
            }
        }
        let sym = (&mm + mm.transpose()) * 0.5;
        let lmin = sym
            .symmetric_eigenvalues()
            .iter()
            .fold(f64::INFINITY, |a, &b| a.min(b));
        return Props {
            orth: Measure {
                value: orth,
                method: "exact",
            },
            distance: Measure {
                value: dist.sqrt(),
                method: "exact",
            },
            angle: Measure {
                value: lmin.clamp(-1.0, 1.0).acos().to_degrees(),
                method: "exact",
            },
        };
    }
    // Matrix-free: Gaussian probes for orthogonality and a Hutchinson estimate of ‖M − I‖_F².
    let mut rng = Rng(0x5eed);
    let k = probes.max(2);
    let mut v: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
    let orig = v.clone();
    chain.apply_rows(&mut v, 0, k, &mut Scratch::default());
    let dot = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| x as f64 * y as f64)
            .sum::<f64>()
    };
    let mut orth = 0f64;
    let mut dist2 = 0f64;
    for a in 0..k {
        let (va, oa) = (&v[a * n..(a + 1) * n], &orig[a * n..(a + 1) * n]);
        dist2 += va
            .iter()
            .zip(oa)
            .map(|(&x, &y)| ((x - y) as f64).powi(2))
            .sum::<f64>();
        for b in a..k {
            let (vb, ob) = (&v[b * n..(b + 1) * n], &orig[b * n..(b + 1) * n]);
            let norm = (dot(oa, oa) * dot(ob, ob)).sqrt();
            orth = orth.max((dot(va, vb) - dot(oa, ob)).abs() / norm);
        }
    }
    // Largest rotation angle: power iteration on I − ½(M + Mᵀ), whose top eigenvalue is 1 − cos θ.
    let mt = transposed(chain);
    let mut x: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
    let mut lambda = 0f64;
    let mut s = Scratch::default();
    for _ in 0..100 {
        let norm = dot(&x, &x).sqrt().max(1e-30);
        x.iter_mut().for_each(|e| *e /= norm as f32);
        let mut a = x.clone();
        chain.apply_rows(&mut a, 0, 1, &mut s);
        let mut b = x.clone();
        mt.apply_rows(&mut b, 0, 1, &mut s);
        let y: Vec<f32> = (0..n).map(|i| x[i] - 0.5 * (a[i] + b[i])).collect();
        lambda = dot(&x, &y);
        x = y;
    }
    Props {
        orth: Measure {
            value: orth,
            method: "probe",
        },
        distance: Measure {
            value: (dist2 / k as f64).sqrt(),
            method: "estimate",
        },
        angle: Measure {
            value: (1.0 - lambda).clamp(-1.0, 1.0).acos().to_degrees(),
            method: "estimate",
        },
    }
}

/// Structural reach of every output through the factor chain, assuming dense blocks: output i
/// of a factor depends on the inputs gathered into the same block.
pub fn connectivity(chain: &Chain) -> Reach {
    let n = chain.n;
    let nf = chain.factors.len();
    // group[f][i]: the block of factor f that input/output index i belongs to.
    let groups: Vec<Vec<u32>> = chain
        .factors
        .iter()
        .map(|f| {
            let mut g = vec![0u32; n];
            for j in 0..n {
                let idx = f.perm.as_ref().map_or(j, |p| p[j] as usize);
                g[idx] = (j / f.h) as u32;
            }
            g
        })
        .collect();
    let members: Vec<Vec<Vec<u32>>> = chain
        .factors
        .iter()
        .zip(&groups)
        .map(|(f, g)| {
            let mut m = vec![Vec::with_capacity(f.h); f.d];
            for (i, &k) in g.iter().enumerate() {
                m[k as usize].push(i as u32);
            }
            m
        })
        .collect();
    let (mut lo, mut hi, mut total) = (usize::MAX, 0usize, 0usize);
    let last = nf - 1;
    let mut seen = vec![false; n];
    let mut touched = vec![false; n];
    for group in &members[last] {
        seen.iter_mut().for_each(|s| *s = false);
        for &i in group {
            seen[i as usize] = true;
        }
        for f in (0..last).rev() {
            touched.iter_mut().for_each(|s| *s = false);
            let mut marks = vec![false; chain.factors[f].d];
            for i in 0..n {
                if seen[i] {
                    marks[groups[f][i] as usize] = true;
                }
            }
            for (k, m) in marks.iter().enumerate() {
                if *m {
                    for &i in &members[f][k] {
                        touched[i as usize] = true;
                    }
                }
            }
            std::mem::swap(&mut seen, &mut touched);
        }
        let count = seen.iter().filter(|&&s| s).count();
        lo = lo.min(count);
        hi = hi.max(count);
        total += count * group.len();
    }
    let h = chain.factors[0].h;
    let ratio = (n / h).max(1);
    Reach {
        min: lo,
        max: hi,
        mean: total as f64 / n as f64,
        dense: lo == n,
        butterfly_reach: n.min(h.saturating_mul(1usize << (nf - 1).min(40))),
        factors_for_full_density: (usize::BITS - (ratio - 1).leading_zeros()) as usize + 1,
    }
}

pub fn degrees_of_freedom(t: &Target) -> Dof {
    let (h, d, n) = (t.block_size, t.blocks, t.n());
    let per_block = h * (h - 1) / 2;
    Dof {
        adapter: t.factors * d * per_block,
        scale: t.scale.as_ref().map_or(0, Vec::len),
        dense_orthogonal: n * (n - 1) / 2,
        oft_same_block: d * per_block,
    }
}

/// Hyperspherical energy Σ_{i<j} 1/‖ŵ_i − ŵ_j‖ of a sample of neurons (rows), before and after.
fn hyperspherical(chain: &Chain, dt: Dtype, shape: &[usize], data: &[u8]) -> Energy {
    let rows = shape[0];
    let n = chain.n;
    let esize = dt.float_size().expect("float");
    let take = rows.min(256);
    let picks: Vec<usize> = (0..take).map(|i| i * rows / take).collect();
    let mut before = vec![0f32; take * n];
    for (k, &r) in picks.iter().enumerate() {
        dtype::decode_f32(
            dt,
            &data[r * n * esize..(r + 1) * n * esize],
            &mut before[k * n..(k + 1) * n],
        );
    }
    let mut after = Vec::with_capacity(take * n);
    let mut s = Scratch::default();
    for (k, &r) in picks.iter().enumerate() {
        let mut x = before[k * n..(k + 1) * n].to_vec();
        chain.apply_rows(&mut x, r, 1, &mut s);
        after.extend(x);
    }
    let energy = |w: &[f32]| -> f64 {
        let unit: Vec<Vec<f64>> = w
            .chunks(n)
            .map(|r| {
                let norm = r
                    .iter()
                    .map(|&x| (x as f64).powi(2))
                    .sum::<f64>()
                    .sqrt()
                    .max(1e-30);
                r.iter().map(|&x| x as f64 / norm).collect()
            })
            .collect();
        let mut e = 0.0;
        for i in 0..unit.len() {
            for j in i + 1..unit.len() {
                let d: f64 = unit[i]
                    .iter()
                    .zip(&unit[j])
                    .map(|(a, b)| (a - b).powi(2))
                    .sum::<f64>()
                    .sqrt();
                if d > 1e-12 {
                    e += 1.0 / d;
                }
            }
        }
        e
    };
    let (b, a) = (energy(&before), energy(&after));
    Energy {
        before: b,
        after: a,
        rel_diff: (a - b).abs() / b.abs().max(1e-30),
        rows_sampled: take,
    }
}

/// Per-element tolerance for a merged value: f32 relative to the tensor's largest magnitude;
/// 16-bit types one ulp of the element (or the f32 summation noise for elements near zero).
fn element_ok(dt: Dtype, got: f32, want: f32, scale: f32, f32_tol: f64) -> bool {
    let diff = (got - want).abs() as f64;
    match dt {
        Dtype::F32 => diff <= f32_tol * scale as f64,
        Dtype::BF16 | Dtype::F16 => {
            let mag = got.abs().max(want.abs());
            let ulp = match dt {
                Dtype::BF16 => {
                    let b = half::bf16::from_f32(mag).to_bits();
                    half::bf16::from_bits(b.saturating_add(1)).to_f32()
                        - half::bf16::from_bits(b).to_f32()
                }
                _ => {
                    let b = half::f16::from_f32(mag).to_bits();
                    half::f16::from_bits(b.saturating_add(1)).to_f32()
                        - half::f16::from_bits(b).to_f32()
                }
            } as f64;
            diff <= ulp * 1.0001 || diff <= 2e-6 * scale as f64
        }
        _ => got.to_bits() == want.to_bits(),
    }
}

fn check_merged(
    ctx: &mut Ctx,
    base: &Checkpoint,
    merged: &Checkpoint,
    adapter: &Adapter,
) -> Result<MergedReport> {
    let plan = merge::plan(base, adapter, merge::Direction::Merge)?;
    let subject = merged.root.display().to_string();
    // Layout: same files, each tensor in the same file with the same dtype and shape.
    let base_files: Vec<_> = base.files.iter().map(|(r, _)| r.clone()).collect();
    let merged_files: Vec<_> = merged.files.iter().map(|(r, _)| r.clone()).collect();
    let mut layout_problem = None;
    if base.is_folder() && base_files != merged_files {
        layout_problem = Some(format!(
            "files {merged_files:?} differ from the base's {base_files:?}"
        ));
    }
    for (rel, f) in &base.files {
        for t in &f.tensors {
            let problem = match merged.get(&t.name) {
                None => Some(format!("tensor {} is missing", t.name)),
                Some((mf, mt)) => {
                    let mrel = merged
                        .files
                        .iter()
                        .find(|(_, x)| std::ptr::eq(x, mf))
                        .map(|(r, _)| r);
                    if base.is_folder() && mrel != Some(rel) {
                        Some(format!("tensor {} moved to another file", t.name))
                    } else if mt.dtype != t.dtype || mt.shape != t.shape {
                        Some(format!(
                            "tensor {} is {} {:?}, base {} {:?}",
                            t.name,
                            mt.dtype.name(),
                            mt.shape,
                            t.dtype.name(),
                            t.shape
                        ))
                    } else {
                        None
                    }
                }
            };
            if layout_problem.is_none() {
                layout_problem = problem;
            }
        }
    }
    let extra = merged
        .tensor_names()
        .filter(|n| base.get(n).is_none())
        .count();
    if layout_problem.is_none() && extra > 0 {
        layout_problem = Some(format!("{extra} tensors not in the base"));
    }
    if let Some(p) = layout_problem {
        ctx.push("merged-layout", &subject, Status::Fail, None, None, p);
        return Ok(MergedReport {
            path: subject,
            tensors: 0,
            transformed: 0,
            replaced: 0,
            untouched: 0,
        });
    }
    ctx.push(
        "merged-layout",
        &subject,
        Status::Pass,
        None,
        None,
        "same files, tensors, dtypes and shapes",
    );

    let mut report = MergedReport {
        path: subject,
        tensors: 0,
        transformed: 0,
        replaced: 0,
        untouched: 0,
    };
    let never = || false;
    let mut untouched_bad = 0usize;
    for (_, f) in &base.files {
        for t in &f.tensors {
            report.tensors += 1;
            let (mf, mt) = merged.get(&t.name).expect("layout checked");
            let got = mf.data(mt);
            let src = f.data(t);
            match plan.action(&t.name) {
                None => {
                    report.untouched += 1;
                    if got != src {
                        untouched_bad += 1;
                        let at = got.iter().zip(src).position(|(a, b)| a != b).unwrap_or(0);
                        ctx.push(
                            "merged-untouched",
                            &t.name,
                            Status::Fail,
                            None,
                            None,
                            format!(
                                "not targeted by the adapter but differs from the base (byte {at})"
                            ),
                        );
                    }
                }
                Some(Action::Replace(r)) => {
                    report.replaced += 1;
                    let want = dtype::decode_any_f32(r.dtype, &r.data).expect("float");
                    let mut bytes = vec![0u8; want.len() * t.dtype.float_size().unwrap_or(4)];
                    dtype::encode_f32(t.dtype, &want, &mut bytes);
                    let same = if r.dtype == t.dtype {
                        got == r.data.as_slice()
                    } else {
                        got == bytes.as_slice()
                    };
                    ctx.push(
                        "merged-values",
                        &t.name,
                        if same { Status::Pass } else { Status::Fail },
                        None,
                        None,
                        if same {
                            "equals the adapter's replacement"
                        } else {
                            "differs from the adapter's replacement"
                        },
                    );
                }
                Some(action) => {
                    report.transformed += 1;
                    let dt = t.dtype;
                    let got_f = dtype::decode_any_f32(dt, got).expect("float");
                    let scale = got_f.iter().fold(0f32, |m, x| m.max(x.abs()));
                    let tol = ctx.settings.merged_tolerance;
                    // (element index, worst deviation relative to the tensor's scale)
                    let worst = std::sync::Mutex::new((None::<usize>, 0f64));
                    let compare = |offset: usize, want: &[f32]| {
                        let mut w = worst.lock().unwrap();
                        for (i, &v) in want.iter().enumerate() {
                            let g = got_f[offset + i];
                            let dev = (g - v).abs() as f64 / scale.max(1e-30) as f64;
                            if dev > w.1 {
                                w.1 = dev;
                            }
                            if w.0.is_none() && !element_ok(dt, g, v, scale, tol) {
                                w.0 = Some(offset + i);
                            }
                        }
                    };
                    match plan.build(action)? {
                        merge::Built::Rows(chain) => {
                            let n = chain.n;
                            merge::rows_chunked(
                                t,
                                src,
                                &chain,
                                &CpuBackend,
                                &never,
                                |r0, x, _| {
                                    compare(r0 * n, x);
                                    Ok(())
                                },
                            )?;
                        }
                        merge::Built::Columns(slices, cols) => {
                            let w = merge::columns_f32(t, src, &slices, cols, &CpuBackend)?;
                            compare(0, &w);
                        }
                        merge::Built::Replace(_) => unreachable!(),
                    }
                    let (bad, dev) = worst.into_inner().unwrap();
                    match bad {
                        None => ctx.push(
                            "merged-values",
                            &t.name,
                            Status::Pass,
                            Some(dev),
                            (dt == Dtype::F32).then_some(tol),
                            format!(
                                "equals base ⊕ adapter within {} (worst deviation {dev:.2e} of the largest magnitude)",
                                if dt == Dtype::F32 { "the relative tolerance".to_string() } else { format!("one {} ulp", dt.name()) }
                            ),
                        ),
                        Some(i) => ctx.push(
                            "merged-values",
                            &t.name,
                            Status::Fail,
                            Some(dev),
                            (dt == Dtype::F32).then_some(tol),
                            format!(
                                "element {i} is {} but base ⊕ adapter gives a value more than {} rounding away",
                                got_f[i],
                                dt.name()
                            ),
                        ),
                    }
                }
            }
        }
    }
    if untouched_bad == 0 {
        ctx.push(
            "merged-untouched",
            &report.path.clone(),
            Status::Pass,
            Some(report.untouched as f64),
            None,
            format!(
                "{} tensors not targeted are byte-identical to the base",
                report.untouched
            ),
        );
    }
    Ok(report)
}

/// A small deterministic generator for probes (reproducible reports).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f32 {
        let (u, v) = (self.next(), self.next());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

/// The human-readable report.
pub fn render(report: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for a in &report.adapters {
        let _ = writeln!(
            s,
            "adapter {} ({} {}): {} targets, {} replaced tensors",
            a.path,
            a.source_format,
            a.source_version,
            a.targets.len(),
            a.replacements
        );
        let _ = writeln!(
            s,
            "  {:<48} {:>6} {:>3} {:>4} {:>11} {:>9} {:>9} {:>8} {:>13}",
            "target", "n", "N", "b", "|BᵀB−I|", "reach", "‖M−I‖F", "θmax°", "scale"
        );
        for t in &a.targets {
            let scale = match (t.scale_min, t.scale_max) {
                (Some(lo), Some(hi)) => format!("{lo:.3}..{hi:.3}"),
                _ => "-".into(),
            };
            let _ = writeln!(
                s,
                "  {:<48} {:>6} {:>3} {:>4} {:>11.2e} {:>9} {:>9.4} {:>8.3} {:>13}",
                t.target,
                t.n,
                t.factors,
                t.block_size,
                t.block_orthogonality,
                format!("{}/{}", t.reach.min, t.n),
                t.distance_from_identity.value,
                t.max_angle_deg.value,
                scale
            );
        }
    }
    if let Some(m) = &report.merged {
        let _ = writeln!(
            s,
            "merged {}: {} tensors ({} transformed, {} replaced, {} untouched)",
            m.path, m.tensors, m.transformed, m.replaced, m.untouched
        );
    }
    let _ = writeln!(s, "checks:");
    let mut ids: Vec<&str> = Vec::new();
    for c in &report.checks {
        if !ids.contains(&c.check) {
            ids.push(c.check);
        }
    }
    for id in ids {
        let of: Vec<&Check> = report.checks.iter().filter(|c| c.check == id).collect();
        let fails = of.iter().filter(|c| c.status == Status::Fail).count();
        let info = of.iter().all(|c| c.status == Status::Info);
        let worst = of
            .iter()
            .filter_map(|c| c.value)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        let thr = of.iter().find_map(|c| c.threshold);
        let status = if info {
            "INFO"
        } else if fails > 0 {
            "FAIL"
        } else {
            "PASS"
        };
        let detail = match (info, worst, thr) {
            (false, Some(w), Some(t)) => format!(" worst {w:.3e}, threshold {t:.1e}"),
            _ => String::new(),
        };
        let _ = writeln!(s, "  {status} {id:<24} {} subjects{detail}", of.len());
        for c in of.iter().filter(|c| c.status == Status::Fail) {
            let _ = writeln!(s, "    FAIL {} {}: {}", c.check, c.subject, c.message);
        }
    }
    let _ = writeln!(
        s,
        "{}: {} checks, {} failed",
        if report.passed { "PASS" } else { "FAIL" },
        report
            .checks
            .iter()
            .filter(|c| c.status != Status::Info)
            .count(),
        report.failed.len()
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::kernel::{Factor, ScaleOn};
    use crate::math::{cayley, perm};

    fn chain(
        n: usize,
        h: usize,
        nf: usize,
        mut perms: impl FnMut(usize) -> Option<Vec<u32>>,
        seed: u64,
    ) -> Chain {
        let mut rng = Rng(seed);
        let d = n / h;
        Chain {
            n,
            factors: (0..nf)
                .map(|i| {
                    let mut blocks = Vec::new();
                    for _ in 0..d {
                        let a: Vec<f64> = (0..h * h).map(|_| rng.normal() as f64).collect();
                        let q = cayley::cayley_minus(h, &cayley::skew_half(h, &a));
                        blocks.extend(q.iter().map(|&x| x as f32));
                    }
                    Factor {
                        h,
                        d,
                        blocks,
                        perm: perms(i),
                    }
                })
                .collect(),
            scale: None,
            scale_on: ScaleOn::Vector,
            scale_first: false,
            blend: 1.0,
        }
    }

    /// Brute force: count the non-zero entries of each row of the dense M.
    fn brute_reach(c: &Chain) -> (usize, usize, f64) {
        let n = c.n;
        let m = dense(c);
        let counts: Vec<usize> = (0..n)
            .map(|i| (0..n).filter(|&j| m[i * n + j].abs() > 1e-9).count())
            .collect();
        (
            *counts.iter().min().unwrap(),
            *counts.iter().max().unwrap(),
            counts.iter().sum::<usize>() as f64 / n as f64,
        )
    }

    #[test]
    fn connectivity_matches_brute_force() {
        let mut cases = Vec::new();
        for (n, h) in [(16usize, 2usize), (32, 4), (64, 8), (48, 6), (24, 6)] {
            let d = n / h;
            for nf in 1..=4usize {
                if nf > 1 && d % (1 << (nf - 1)) != 0 {
                    continue;
                }
                cases.push((n, h, nf));
            }
        }
        for (seed, (n, h, nf)) in cases.into_iter().enumerate() {
            // PEFT's butterfly permutations, stored inverted as the importer does.
            let c = chain(
                n,
                h,
                nf,
                |i| Some(perm::invert(&perm::peft_boft(n, h, i))),
                seed as u64,
            );
            let r = connectivity(&c);
            assert_eq!(
                (r.min, r.max, r.mean),
                brute_reach(&c),
                "n={n} h={h} N={nf}"
            );
            assert_eq!(
                r.min,
                n.min(h << (nf - 1)),
                "butterfly reach n={n} h={h} N={nf}"
            );
            assert_eq!(r.butterfly_reach, r.min);
            assert_eq!(r.dense, r.min == n);
            // Random permutations break the butterfly pattern but the count still matches.
            let mut rng = Rng(seed as u64 + 99);
            let c = chain(
                n,
                h,
                nf,
                |_| {
                    let mut p: Vec<u32> = (0..n as u32).collect();
                    for k in (1..n).rev() {
                        let j = (rng.next() * (k + 1) as f64) as usize;
                        p.swap(k, j.min(k));
                    }
                    Some(p)
                },
                seed as u64,
            );
            let r = connectivity(&c);
            assert_eq!(
                (r.min, r.max, r.mean),
                brute_reach(&c),
                "random perms n={n} h={h} N={nf}"
            );
        }
        // The paper's depth for full density: log2(n/b) + 1.
        let c = chain(
            64,
            8,
            4,
            |i| Some(perm::invert(&perm::peft_boft(64, 8, i))),
            5,
        );
        let r = connectivity(&c);
        assert!(r.dense);
        assert_eq!(r.factors_for_full_density, 4);
    }

    /// Rank of the Jacobian (central differences, f64) of raw parameters → materialised
    /// matrices: the number of independent directions the parametrisation really has.
    fn jacobian_rank(params: usize, f: impl Fn(&[f64]) -> Vec<f64>) -> usize {
        let mut rng = Rng(7);
        let x0: Vec<f64> = (0..params).map(|_| rng.normal() as f64 * 0.3).collect();
        let eps = 1e-6;
        let rows = f(&x0).len();
        let mut j = DMatrix::<f64>::zeros(rows, params);
        for p in 0..params {
            let (mut a, mut b) = (x0.clone(), x0.clone());
            a[p] += eps;
            b[p] -= eps;
            let (fa, fb) = (f(&a), f(&b));
            for r in 0..rows {
                j[(r, p)] = (fa[r] - fb[r]) / (2.0 * eps);
            }
        }
        j.svd(false, false)
            .singular_values
            .iter()
            .filter(|&&s| s > 1e-6)
            .count()
    }

    #[test]
    fn degrees_of_freedom_match_brute_force_rank() {
        // A PEFT-style target: raw blocks A → C−(½(A − Aᵀ)) per block, per factor.
        for (h, d, nf) in [(2usize, 4usize, 1usize), (4, 2, 2), (3, 3, 1), (4, 4, 3)] {
            let t = Target {
                name: "w".into(),
                module: "m".into(),
                side: Side::Input,
                shape: None,
                rows: None,
                factors: nf,
                blocks: d,
                block_size: h,
                data: vec![0.0; nf * d * h * h],
                deferred: None,
                perms: vec![None; nf],
                scale: None,
                kind: BlockKind::Cayley,
                ..Default::default()
            };
            let dof = degrees_of_freedom(&t);
            let raw = nf * d * h * h;
            let rank = jacobian_rank(raw, |x| {
                x.chunks(h * h)
                    .flat_map(|a| cayley::cayley_minus(h, &cayley::skew_half(h, a)))
                    .collect()
            });
            assert_eq!(dof.adapter, rank, "h={h} d={d} N={nf}");
            assert_eq!(dof.oft_same_block * nf, rank);
            // A dense orthogonal matrix of the same n: rank of the Cayley map on n×n.
            let n = h * d;
            if n <= 8 {
                let dense_rank =
                    jacobian_rank(n * n, |a| cayley::cayley_minus(n, &cayley::skew_half(n, a)));
                assert_eq!(dof.dense_orthogonal, dense_rank, "n={n}");
            }
        }
    }

    #[test]
    fn probe_measures_agree_with_exact_ones() {
        let n = 64;
        let c = chain(
            n,
            8,
            3,
            |i| Some(perm::invert(&perm::peft_boft(n, 8, i))),
            11,
        );
        let exact = transform_properties(&c, 8, DENSE_MAX);
        assert_eq!(exact.orth.method, "exact");
        assert!(exact.orth.value < 1e-5);
        let probe = transform_properties(&c, 64, 0);
        assert_eq!(probe.orth.method, "probe");
        assert!(probe.orth.value < 1e-5);
        // Hutchinson's estimate of ‖M − I‖_F with 64 probes: within 20%.
        let rel = (probe.distance.value - exact.distance.value).abs() / exact.distance.value;
        assert!(
            rel < 0.2,
            "{} vs {}",
            probe.distance.value,
            exact.distance.value
        );
        // Power iteration finds the largest rotation angle.
        assert!(
            (probe.angle.value - exact.angle.value).abs() < 2.0,
            "{} vs {}",
            probe.angle.value,
            exact.angle.value
        );
        // A non-orthogonal chain is caught by the probes too.
        let mut bad = c.clone();
        bad.factors[1].blocks[0] += 0.1;
        assert!(transform_properties(&bad, 8, 0).orth.value > 1e-3);
        // A single 2×2 rotation by θ: the largest rotation angle is θ.
        let theta = 0.3f64;
        let rot = Chain {
            n: 2,
            factors: vec![Factor {
                h: 2,
                d: 1,
                blocks: vec![
                    theta.cos() as f32,
                    -theta.sin() as f32,
                    theta.sin() as f32,
                    theta.cos() as f32,
                ],
                perm: None,
            }],
            scale: None,
            scale_on: ScaleOn::Vector,
            scale_first: false,
            blend: 1.0,
        };
        let p = transform_properties(&rot, 4, DENSE_MAX);
        assert!(
            (p.angle.value - theta.to_degrees()).abs() < 1e-3,
            "{}",
            p.angle.value
        );
        assert!((p.distance.value - (2.0 * (2.0 - 2.0 * theta.cos())).sqrt()).abs() < 1e-5);
    }

    #[test]
    fn transposed_chain_is_the_inverse_of_an_orthogonal_chain() {
        let n = 32;
        let c = chain(
            n,
            4,
            3,
            |i| Some(perm::invert(&perm::peft_boft(n, 4, i))),
            3,
        );
        let t = transposed(&c);
        let x: Vec<f32> = (0..n).map(|i| i as f32 * 0.1 - 1.0).collect();
        let y = crate::math::kernel::apply_vec(&t, &crate::math::kernel::apply_vec(&c, &x));
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
