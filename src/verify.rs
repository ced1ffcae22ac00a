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
use crate::merge::{self, Action, Backend, CpuBackend};

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
    "merged-tensors",
    "merged-untouched",
    "merged-values",
    "restored-values",
];

/// What a check examines besides the adapter; a check is applicable when these inputs are given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    Adapter,
    Base,
    /// `--merged` or `--restored` (with `--base`).
    Second,
    Merged,
    Restored,
}

pub fn needs(check: &str) -> Needs {
    match check {
        "target-present" | "base-compatible" | "hyperspherical-energy" => Needs::Base,
        "merged-layout" | "merged-tensors" | "merged-untouched" => Needs::Second,
        "merged-values" => Needs::Merged,
        "restored-values" => Needs::Restored,
        _ => Needs::Adapter,
    }
}

/// Checks that may have nothing to examine on honest inputs (no target has a scale, no target
/// is input-side, every tensor is targeted). Selected by default they are then left out of the
/// report; selected by name (`--checks`) they fail like every other check with nothing to examine.
pub const CONDITIONAL: &[&str] = &["scale-range", "hyperspherical-energy", "merged-untouched"];

/// Which inputs a run was given.
#[derive(Debug, Clone, Copy, Default)]
pub struct Inputs {
    pub base: bool,
    pub merged: bool,
    pub restored: bool,
}

impl Inputs {
    fn has(&self, n: Needs) -> bool {
        match n {
            Needs::Adapter => true,
            Needs::Base => self.base,
            Needs::Second => self.base && (self.merged || self.restored),
            Needs::Merged => self.base && self.merged,
            Needs::Restored => self.base && self.restored,
        }
    }
}

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
    /// `--same-layout`: the merged (or restored) checkpoint must have the base's files and
    /// the same headers (boft-merge's outputs do); otherwise the layout is only reported.
    pub same_layout: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            tolerance: 1e-5,
            approx_tolerance: 0.05,
            merged_tolerance: 1e-5,
            checks: None,
            probes: 8,
            same_layout: false,
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
        if set.is_empty() {
            return Err(Error::bare(
                Class::Usage,
                format!(
                    "--checks {list:?} selects no check; known: {}",
                    CHECKS.join(", ")
                ),
            ));
        }
        Ok(set)
    }

    /// The checks this run must report on, in report order. A check named in `--checks` whose
    /// input is missing is a usage error (it could examine nothing); by default every check
    /// applicable to the given inputs is selected.
    pub fn selected(&self, inputs: Inputs) -> Result<Vec<&'static str>> {
        let mut out = Vec::new();
        for &c in CHECKS {
            let applicable = inputs.has(needs(c));
            match &self.checks {
                Some(set) if set.contains(c) => {
                    if !applicable {
                        let what = match needs(c) {
                            Needs::Adapter => unreachable!(),
                            Needs::Base => "--base",
                            Needs::Second => "--base and --merged or --restored",
                            Needs::Merged => "--base and --merged",
                            Needs::Restored => "--base and --restored",
                        };
                        return Err(Error::bare(
                            Class::Usage,
                            format!(
                                "check {c} needs {what}: without it there is nothing to examine"
                            ),
                        ));
                    }
                    out.push(c);
                }
                Some(_) => {}
                None if applicable => out.push(c),
                None => {}
            }
        }
        if self.same_layout && !(inputs.merged || inputs.restored) {
            return Err(Error::bare(
                Class::Usage,
                "--same-layout needs --merged or --restored",
            ));
        }
        Ok(out)
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
    /// A failing `merged-values`/`restored-values`: its worst element.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub element: Option<Element>,
}

/// The worst element of a failed value comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Element {
    /// Row-major index into the flattened tensor.
    pub index: usize,
    /// The same index per dimension.
    pub coords: Vec<usize>,
    /// The value recomputed here (f32, before rounding to the tensor's dtype).
    pub expected: f64,
    pub found: f64,
    /// |found − expected| in ulps of the tensor's dtype.
    pub ulps: f64,
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
    /// `merged` (`--merged`) or `restored` (`--restored`).
    pub proof: &'static str,
    /// Same files and headers (tensors, offsets, __metadata__) as the base.
    pub same_layout: bool,
    /// Tensors compared (by name), and their elements.
    pub tensors: usize,
    pub elements: u64,
    pub transformed: usize,
    pub replaced: usize,
    pub untouched: usize,
    /// Base tensors absent (or with another dtype or shape), and tensors the base lacks.
    pub missing: usize,
    pub extra: usize,
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
                element: None,
            });
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn push_element(
        &mut self,
        check: &'static str,
        subject: &str,
        value: Option<f64>,
        threshold: Option<f64>,
        message: String,
        element: Element,
    ) {
        self.push(check, subject, Status::Fail, value, threshold, message);
        if let Some(c) = self.checks.last_mut() {
            if c.check == check && c.subject == subject {
                c.element = Some(element);
            }
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

/// Verify adapters (each with its display path), optionally against a base and a merged (or
/// restored) checkpoint. Every selected check must examine at least one subject per adapter:
/// one with nothing to examine is reported as a failure saying so.
pub fn verify(
    adapters: &[(String, Adapter)],
    base: Option<&Checkpoint>,
    second: Option<(&Checkpoint, Proof)>,
    settings: &Settings,
) -> Result<Report> {
    let inputs = Inputs {
        base: base.is_some(),
        merged: matches!(second, Some((_, Proof::Merged))),
        restored: matches!(second, Some((_, Proof::Restored))),
    };
    let selected = settings.selected(inputs)?;
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
        if let (Some(base), Some((m, proof))) = (base, second) {
            merged_report = Some(check_second(&mut ctx, base, m, adapter, proof)?);
        }
        // No check passes on nothing.
        for &id in &selected {
            if ctx.checks.iter().any(|c| c.check == id) {
                continue;
            }
            if settings.checks.is_none() && CONDITIONAL.contains(&id) {
                continue;
            }
            let why = match id {
                "scale-range" => "no target has a per-row scale",
                "hyperspherical-energy" => "no input-side target found in the base",
                "target-present" | "base-compatible" => "the adapter has no targets or replaced tensors to look up",
                "merged-tensors" => "neither checkpoint holds a tensor",
                "merged-untouched" => "no tensor outside the adapter's targets is in both checkpoints with the same dtype and shape",
                "merged-values" | "restored-values" => "no tensor the adapter targets or replaces is in both checkpoints with the same dtype and shape",
                _ => "the adapter has no targets",
            };
            ctx.push(
                id,
                "(nothing)",
                Status::Fail,
                Some(0.0),
                None,
                format!("nothing to examine: {why}"),
            );
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

/// One unit in the last place of `dt` at magnitude `mag` (the spacing just above it).
pub fn ulp(dt: Dtype, mag: f32) -> f64 {
    let mag = mag.abs();
    match dt {
        Dtype::BF16 => {
            let b = half::bf16::from_f32(mag).to_bits();
            (half::bf16::from_bits(b.saturating_add(1)).to_f32()
                - half::bf16::from_bits(b).to_f32()) as f64
        }
        Dtype::F16 => {
            let b = half::f16::from_f32(mag).to_bits();
            (half::f16::from_bits(b.saturating_add(1)).to_f32() - half::f16::from_bits(b).to_f32())
                as f64
        }
        _ if mag.is_finite() => (f32::from_bits(mag.to_bits() + 1) - mag) as f64,
        _ => f64::INFINITY,
    }
}

/// Distance between two values in ulps of `dt` at the larger magnitude.
pub fn ulps(dt: Dtype, a: f32, b: f32) -> f64 {
    let d = (a as f64 - b as f64).abs();
    if d == 0.0 {
        return 0.0;
    }
    d / ulp(dt, a.abs().max(b.abs())).max(f64::MIN_POSITIVE)
}

/// Largest difference allowed between a found value and the f32 value recomputed here: f32
/// relative to the tensor's largest magnitude; 16-bit types one ulp of the element, or the f32
/// summation noise (2e-6 of the largest magnitude) for elements that cancel to near zero.
fn allowed(dt: Dtype, got: f32, want: f32, scale: f32, f32_tol: f64) -> f64 {
    match dt {
        Dtype::F32 => f32_tol * scale as f64,
        Dtype::BF16 | Dtype::F16 => {
            (ulp(dt, got.abs().max(want.abs())) * 1.0001).max(2e-6 * scale as f64)
        }
        _ => 0.0,
    }
}

/// Which second checkpoint is being proven against base ⊕ adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// `--merged`: base ⊕ adapter.
    Merged,
    /// `--restored`: an un-merge of base ⊕ adapter, i.e. the base back, up to what rounding the
    /// merged tensor to the base's dtype allows.
    Restored,
}

impl Proof {
    fn values_check(self) -> &'static str {
        match self {
            Proof::Merged => "merged-values",
            Proof::Restored => "restored-values",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Proof::Merged => "merged",
            Proof::Restored => "restored",
        }
    }
}

/// Whether two checkpoints have the same files with the same headers (what boft-merge
/// writes), or the first difference.
fn layout_difference(base: &Checkpoint, other: &Checkpoint) -> Option<String> {
    if base.is_folder() != other.is_folder() {
        return Some(format!(
            "one is a {} and the other a {}",
            if base.is_folder() { "folder" } else { "file" },
            if other.is_folder() { "folder" } else { "file" }
        ));
    }
    let names = |c: &Checkpoint| -> Vec<String> {
        c.files
            .iter()
            .map(|(r, _)| r.display().to_string())
            .collect()
    };
    if base.is_folder() && names(base) != names(other) {
        return Some(format!(
            "files {:?}, the base's {:?}",
            names(other),
            names(base)
        ));
    }
    for ((rel, b), (_, o)) in base.files.iter().zip(&other.files) {
        // The same header: tensors (names, dtypes, shapes, offsets) and __metadata__; the
        // JSON's spelling (key order, padding) is the writer's and not compared.
        let same_tensors = b.tensors.len() == o.tensors.len()
            && b.tensors.iter().zip(&o.tensors).all(|(x, y)| {
                (&x.name, x.dtype, &x.shape, x.start, x.end)
                    == (&y.name, y.dtype, &y.shape, y.start, y.end)
            });
        if !same_tensors {
            return Some(format!(
                "{} holds other tensors or the same at other offsets",
                rel.display()
            ));
        }
        if b.metadata != o.metadata {
            return Some(format!("the __metadata__ of {} differs", rel.display()));
        }
    }
    None
}

/// Flat index → index per dimension.
fn coords(shape: &[usize], mut flat: usize) -> Vec<usize> {
    let mut c = vec![0; shape.len()];
    for (i, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            c[i] = flat % d;
            flat /= d;
        }
    }
    c
}

/// Worst element of a comparison: the largest deviation relative to what is allowed.
#[derive(Default)]
struct Worst {
    /// (ratio to the allowed deviation, flat index, found, expected)
    element: Option<(f64, usize, f32, f32)>,
    /// Largest |found − expected| relative to the tensor's largest magnitude.
    dev: f64,
    /// Largest distance in ulps of the tensor's dtype.
    ulps: f64,
}

/// Prove `other` (a merged or restored checkpoint) against base ⊕ adapter, tensor by tensor and
/// by name: whatever the sharding, tensor order or header metadata.
fn check_second(
    ctx: &mut Ctx,
    base: &Checkpoint,
    other: &Checkpoint,
    adapter: &Adapter,
    proof: Proof,
) -> Result<MergedReport> {
    let plan = merge::plan(base, adapter, merge::Direction::Merge)?;
    let inverse = match proof {
        Proof::Merged => None,
        Proof::Restored => Some(merge::plan(
            base,
            adapter,
            merge::Direction::UnmergeKeepReplaced,
        )?),
    };
    let subject = other.root.display().to_string();
    let values = proof.values_check();
    let noun = proof.noun();

    // Layout: reported; a failure only when --same-layout asks for it.
    let difference = layout_difference(base, other);
    let same_layout = difference.is_none();
    ctx.push(
        "merged-layout",
        &subject,
        match (ctx.settings.same_layout, same_layout) {
            (false, _) => Status::Info,
            (true, true) => Status::Pass,
            (true, false) => Status::Fail,
        },
        None,
        None,
        match &difference {
            None => {
                "same files and headers (tensors, offsets, __metadata__) as the base".to_string()
            }
            Some(d) => format!("layout differs from the base: {d}"),
        },
    );

    let mut report = MergedReport {
        path: subject.clone(),
        proof: noun,
        same_layout,
        tensors: 0,
        elements: 0,
        transformed: 0,
        replaced: 0,
        untouched: 0,
        missing: 0,
        extra: 0,
    };

    // Names: every base tensor present with its dtype and shape, nothing extra.
    let mut names = 0usize;
    let mut comparable = Vec::new();
    for (_, f) in &base.files {
        for t in &f.tensors {
            names += 1;
            match other.get(&t.name) {
                None => {
                    report.missing += 1;
                    ctx.push(
                        "merged-tensors",
                        &t.name,
                        Status::Fail,
                        None,
                        None,
                        format!("in the base but missing from the {noun} checkpoint"),
                    );
                }
                Some((_, mt)) if mt.dtype != t.dtype || mt.shape != t.shape => {
                    report.missing += 1;
                    ctx.push(
                        "merged-tensors",
                        &t.name,
                        Status::Fail,
                        None,
                        None,
                        format!(
                            "{noun} tensor is {} {:?}, the base's {} {:?}",
                            mt.dtype.name(),
                            mt.shape,
                            t.dtype.name(),
                            t.shape
                        ),
                    );
                }
                Some((mf, mt)) => comparable.push((f, t, mf, mt)),
            }
        }
    }
    for name in other.tensor_names() {
        if base.get(name).is_none() {
            names += 1;
            report.extra += 1;
            ctx.push(
                "merged-tensors",
                name,
                Status::Fail,
                None,
                None,
                format!("in the {noun} checkpoint but not in the base"),
            );
        }
    }
    if names > 0 && report.missing == 0 && report.extra == 0 {
        ctx.push(
            "merged-tensors",
            &subject,
            Status::Pass,
            Some(names as f64),
            None,
            format!("all {names} tensors of the base present by name with their dtype and shape, none extra"),
        );
    }

    let never = || false;
    let mut untouched_bad = 0usize;
    for (f, t, mf, mt) in comparable {
        let got = mf.data(mt);
        let src = f.data(t);
        match plan.action(&t.name) {
            None => {
                if !ctx.settings.wants("merged-untouched") {
                    continue;
                }
                report.tensors += 1;
                report.untouched += 1;
                report.elements += t.numel() as u64;
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
                if !ctx.settings.wants(values) {
                    continue;
                }
                report.tensors += 1;
                report.replaced += 1;
                report.elements += t.numel() as u64;
                let want = if r.dtype == t.dtype {
                    r.data.clone()
                } else {
                    let v = dtype::decode_any_f32(r.dtype, &r.data).expect("float");
                    let mut bytes = vec![0u8; v.len() * t.dtype.float_size().unwrap_or(4)];
                    dtype::encode_f32(t.dtype, &v, &mut bytes);
                    bytes
                };
                let (status, message) = match proof {
                    Proof::Merged if got == want.as_slice() => {
                        (Status::Pass, "equals the adapter's replacement")
                    }
                    Proof::Merged => (Status::Fail, "differs from the adapter's replacement"),
                    Proof::Restored if got == src => (Status::Pass, "byte-identical to the base"),
                    Proof::Restored if got == want.as_slice() => (
                        Status::Pass,
                        "kept as merged (--keep-replaced): equals the adapter's replacement; the \
                         original is not in the adapter",
                    ),
                    Proof::Restored => (
                        Status::Fail,
                        "neither the base's tensor nor the adapter's replacement",
                    ),
                };
                ctx.push(values, &t.name, status, None, None, message);
            }
            Some(action) => {
                if !ctx.settings.wants(values) {
                    continue;
                }
                report.tensors += 1;
                report.transformed += 1;
                report.elements += t.numel() as u64;
                let dt = t.dtype;
                let got_f = dtype::decode_any_f32(dt, got).expect("float");
                let scale = got_f.iter().fold(0f32, |m, x| m.max(x.abs()));
                let tol = ctx.settings.merged_tolerance;
                let worst = std::sync::Mutex::new(Worst::default());
                let compare = |offset: usize, want: &[f32]| {
                    let mut local = Worst::default();
                    for (i, &v) in want.iter().enumerate() {
                        let g = got_f[offset + i];
                        let d = (g as f64 - v as f64).abs();
                        local.dev = local.dev.max(d / scale.max(1e-30) as f64);
                        local.ulps = local.ulps.max(ulps(dt, g, v));
                        let a = allowed(dt, g, v, scale, tol);
                        let ratio = if d == 0.0 {
                            0.0
                        } else if a > 0.0 {
                            d / a
                        } else {
                            f64::INFINITY
                        };
                        // NaN never compares greater: count it as the worst.
                        let ratio = if ratio.is_nan() { f64::INFINITY } else { ratio };
                        if local.element.is_none_or(|e| ratio > e.0) {
                            local.element = Some((ratio, offset + i, g, v));
                        }
                    }
                    let mut w = worst.lock().unwrap();
                    w.dev = w.dev.max(local.dev);
                    w.ulps = w.ulps.max(local.ulps);
                    if let Some(e) = local.element {
                        if w.element
                            .is_none_or(|x| e.0 > x.0 || (e.0 == x.0 && e.1 < x.1))
                        {
                            w.element = Some(e);
                        }
                    }
                };
                let inv = inverse
                    .as_ref()
                    .map(|p| p.build(p.action(&t.name).expect("same targets")));
                match (plan.build(action)?, inv.transpose()?) {
                    (merge::Built::Rows(chain), None) => {
                        let n = chain.n;
                        merge::rows_chunked(t, src, &chain, &CpuBackend, &never, |r0, x, _| {
                            compare(r0 * n, x);
                            Ok(())
                        })?;
                    }
                    (merge::Built::Rows(chain), Some(merge::Built::Rows(back))) => {
                        // The un-merge of the merged tensor as stored: round F(W) to the dtype,
                        // then apply F⁻¹, as boft-merge --unmerge does.
                        let n = chain.n;
                        merge::rows_chunked(t, src, &chain, &CpuBackend, &never, |r0, x, _| {
                            let mut y: Vec<f32> =
                                x.iter().map(|&v| dtype::round_f32(dt, v)).collect();
                            let rows = y.len() / n;
                            CpuBackend.apply(&back, &mut y, r0, rows, &mut Scratch::default())?;
                            compare(r0 * n, &y);
                            Ok(())
                        })?;
                    }
                    (merge::Built::Columns(slices, cols), None) => {
                        let w = merge::columns_f32(t, src, &slices, cols, &CpuBackend)?;
                        compare(0, &w);
                    }
                    (
                        merge::Built::Columns(slices, cols),
                        Some(merge::Built::Columns(back, bcols)),
                    ) => {
                        let w = merge::columns_f32(t, src, &slices, cols, &CpuBackend)?;
                        let mut bytes = vec![0u8; got.len()];
                        dtype::encode_f32(dt, &w, &mut bytes);
                        let y = merge::columns_f32(t, &bytes, &back, bcols, &CpuBackend)?;
                        compare(0, &y);
                    }
                    _ => unreachable!("merge and un-merge plans build the same kinds"),
                }
                let w = worst.into_inner().unwrap();
                // How far the restored tensor is from the base itself (the rounding of the
                // merged tensor, carried back).
                let from_base = (proof == Proof::Restored).then(|| {
                    let base_f = dtype::decode_any_f32(dt, src).expect("float");
                    let (mut differ, mut one_ulp, mut max_dev) = (0usize, 0usize, 0f64);
                    for (&a, &b) in got_f.iter().zip(&base_f) {
                        if a.to_bits() != b.to_bits() {
                            differ += 1;
                            if ulps(dt, a, b) <= 1.0 {
                                one_ulp += 1;
                            }
                            max_dev = max_dev.max((a as f64 - b as f64).abs());
                        }
                    }
                    format!(
                        "; {differ} of {} elements differ from the base ({one_ulp} by one ulp; largest difference {:.2e} of the largest magnitude): the rounding of the merged tensor, carried back",
                        got_f.len(),
                        max_dev / scale.max(1e-30) as f64
                    )
                });
                let from_base = from_base.unwrap_or_default();
                let expected = match proof {
                    Proof::Merged => "base ⊕ adapter",
                    Proof::Restored => "the un-merge of round(base ⊕ adapter)",
                };
                let within = if dt == Dtype::F32 {
                    format!("{tol:.0e} of the largest magnitude")
                } else {
                    format!(
                        "one {} ulp (or 2e-6 of the largest magnitude near zero)",
                        dt.name()
                    )
                };
                match w.element {
                    Some((ratio, i, g, v)) if ratio > 1.0 => {
                        let c = coords(&t.shape, i);
                        let u = ulps(dt, g, v);
                        let rv = dtype::round_f32(dt, v);
                        ctx.push_element(
                            values,
                            &t.name,
                            Some(w.dev),
                            (dt == Dtype::F32).then_some(tol),
                            format!(
                                "element {i} {c:?}: found {g:e}, {expected} gives {v:e}{}: {u:.1} {} ulp apart (allowed: {within}){from_base}",
                                if rv != v { format!(" (rounds to {rv:e})") } else { String::new() },
                                dt.name()
                            ),
                            Element {
                                index: i,
                                coords: c,
                                expected: v as f64,
                                found: g as f64,
                                ulps: u,
                            },
                        );
                    }
                    _ => ctx.push(
                        values,
                        &t.name,
                        Status::Pass,
                        Some(w.dev),
                        (dt == Dtype::F32).then_some(tol),
                        format!(
                            "{} elements equal {expected} within {within} (worst {:.2e} of the largest magnitude, {:.2} ulp){from_base}",
                            got_f.len(),
                            w.dev,
                            w.ulps
                        ),
                    ),
                }
            }
        }
    }
    if untouched_bad == 0 && report.untouched > 0 {
        ctx.push(
            "merged-untouched",
            &subject,
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
            "{} {}: compared by name {} tensors, {} elements ({} transformed, {} replaced, {} untouched); {} missing, {} extra; {} layout as the base",
            m.proof,
            m.path,
            m.tensors,
            m.elements,
            m.transformed,
            m.replaced,
            m.untouched,
            m.missing,
            m.extra,
            if m.same_layout { "same" } else { "not the same" }
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
    let mut ids: Vec<&str> = report.checks.iter().map(|c| c.check).collect();
    ids.dedup();
    ids.sort();
    ids.dedup();
    let _ = write!(
        s,
        "{}: {} checks on {} results ({} pass, {} info, {} failed)",
        if report.passed { "PASS" } else { "FAIL" },
        ids.len(),
        report.checks.len(),
        report
            .checks
            .iter()
            .filter(|c| c.status == Status::Pass)
            .count(),
        report
            .checks
            .iter()
            .filter(|c| c.status == Status::Info)
            .count(),
        report.failed.len()
    );
    if let Some(m) = &report.merged {
        let _ = write!(
            s,
            "; {} tensors and {} elements compared",
            m.tensors, m.elements
        );
    }
    let _ = writeln!(s);
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
