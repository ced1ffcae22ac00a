//! `boft-verify`: structural and numerical checks of an adapter, against a base, and of a merged
//! checkpoint against base ⊕ adapter. Every check reports its measured value and its threshold;
//! the schema of the JSON report is docs/verify-schema.json.
//!
//! This file holds the report model, the settings and the run over every adapter; the checks
//! themselves are in `target` (one adapter target, alone or against the base), `measure` (what is
//! measured on a transform), `merged` (the proof of a merged or restored checkpoint), and the text
//! rendering in `render`. Everything the merge engine is asked goes through its public API
//! (`merge::plan`, `Plan::fate`, `Plan::expected_f32`).

mod measure;
mod merged;
mod render;
mod target;

use std::collections::BTreeSet;

use rayon::prelude::*;
use serde::Serialize;

use crate::adapter::{Adapter, BlockKind, Side};
use crate::checkpoint::Checkpoint;
use crate::error::{Class, Error, Result};

pub use measure::{connectivity, degrees_of_freedom, DENSE_MAX};
pub use merged::{ulp, ulps, Proof};
pub use render::render;

use merged::check_second;
use target::check_target;

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
    /// The adapter alone.
    Adapter,
    /// `--base`.
    Base,
    /// `--merged` or `--restored` (with `--base`).
    Second,
    /// `--merged` (with `--base`).
    Merged,
    /// `--restored` (with `--base`).
    Restored,
}

/// What `check` examines besides the adapter.
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
    /// `--base` was given.
    pub base: bool,
    /// `--merged` was given.
    pub merged: bool,
    /// `--restored` was given.
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

/// How a run checks: tolerances, the checks selected, probes.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Orthogonality tolerance for exact (Cayley) blocks and the composed transform.
    pub tolerance: f64,
    /// Tolerance for blocks that are orthogonal only approximately by construction.
    pub approx_tolerance: f64,
    /// Relative tolerance (of the tensor's largest magnitude) for f32 merged values.
    pub merged_tolerance: f64,
    /// `--checks`: the checks selected by name; None for every applicable one.
    pub checks: Option<BTreeSet<String>>,
    /// Random probes for transforms larger than `DENSE_MAX`.
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
    /// Parse `--checks` (comma-separated check ids).
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

/// The outcome of one check on one subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Within its threshold.
    Pass,
    /// Past its threshold, or nothing to examine.
    Fail,
    /// A measured property with no pass/fail meaning by default.
    Info,
}

/// One check on one subject (a target, a tensor, a checkpoint).
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// The check id (`CHECKS`).
    pub check: &'static str,
    /// The adapter's display path.
    pub adapter: String,
    /// What was examined.
    pub subject: String,
    /// Its outcome.
    pub status: Status,
    /// The measured value, when there is one.
    pub value: Option<f64>,
    /// The threshold it was held to, when there is one.
    pub threshold: Option<f64>,
    /// One line saying what was found.
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
    /// The value found in the checkpoint.
    pub found: f64,
    /// |found − expected| in ulps of the tensor's dtype.
    pub ulps: f64,
}

/// A measured property of a transform and how it was measured.
#[derive(Debug, Clone, Serialize)]
pub struct Measure {
    /// The measured value.
    pub value: f64,
    /// `exact` (dense, n ≤ 512) or `probe`/`estimate` (matrix-free).
    pub method: &'static str,
}

/// How many inputs each output of a transform reaches.
#[derive(Debug, Clone, Serialize)]
pub struct Reach {
    /// Fewest inputs an output reaches.
    pub min: usize,
    /// Most inputs an output reaches.
    pub max: usize,
    /// Mean over outputs.
    pub mean: f64,
    /// Every output reaches every input.
    pub dense: bool,
    /// Blocks of the last factor whose outputs were followed (all, or an even sample of
    /// `REACH_SAMPLE`).
    pub followed: usize,
    /// Blocks of the last factor.
    pub blocks: usize,
    /// What `factors` butterfly factors of this block size reach at best: min(n, b·2^(N−1)).
    pub butterfly_reach: usize,
    /// The paper's log2(n/b)+1: butterfly factors needed for a dense transform.
    pub factors_for_full_density: usize,
}

/// Degrees of freedom of a target and of its alternatives.
#[derive(Debug, Clone, Serialize)]
pub struct Dof {
    /// Skew-symmetric generator entries: factors · stored blocks (one per factor when shared)
    /// · b(b−1)/2.
    pub adapter: usize,
    /// Scale entries.
    pub scale: usize,
    /// Generator entries of a dense orthogonal n×n matrix: n(n−1)/2.
    pub dense_orthogonal: usize,
    /// Generator entries of one OFT factor with the same blocks.
    pub oft_same_block: usize,
}

/// Hyperspherical energy of a sample of the base's neurons, before and after the transform.
#[derive(Debug, Clone, Serialize)]
pub struct Energy {
    /// Energy of the base rows.
    pub before: f64,
    /// Energy of the transformed rows.
    pub after: f64,
    /// |after − before| / before.
    pub rel_diff: f64,
    /// Rows sampled.
    pub rows_sampled: usize,
}

/// The measures of one target.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    /// Base tensor name.
    pub target: String,
    /// Adapter module.
    pub module: String,
    /// Rotated side.
    pub side: Side,
    /// Factors.
    pub factors: usize,
    /// Blocks per factor.
    pub blocks: usize,
    /// Block size.
    pub block_size: usize,
    /// Transform size.
    pub n: usize,
    /// How the blocks were made.
    pub block_kind: BlockKind,
    /// Worst |BᵀB − I| over blocks.
    pub block_orthogonality: f64,
    /// Blocks with determinant −1.
    pub negative_determinants: usize,
    /// Worst |MᵀM − I| of the composed transform.
    pub transform_orthogonality: Measure,
    /// Structural reach.
    pub reach: Reach,
    /// Degrees of freedom.
    pub dof: Dof,
    /// ‖M − I‖_F.
    pub distance_from_identity: Measure,
    /// Largest rotation angle, in degrees.
    pub max_angle_deg: Measure,
    /// Smallest scale entry.
    pub scale_min: Option<f64>,
    /// Largest scale entry.
    pub scale_max: Option<f64>,
    /// Hyperspherical energy, for input-side targets found in the base.
    pub hyperspherical_energy: Option<Energy>,
}

/// The report on one adapter.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterReport {
    /// Its display path.
    pub path: String,
    /// The reader that took it.
    pub source_format: String,
    /// The source library's version, when known.
    pub source_version: String,
    /// One report per target.
    pub targets: Vec<TargetReport>,
    /// Replaced tensors.
    pub replacements: usize,
}

/// The report on a merged or restored checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct MergedReport {
    /// Its display path.
    pub path: String,
    /// `merged` (`--merged`) or `restored` (`--restored`).
    pub proof: &'static str,
    /// Same files and headers (tensors, offsets, __metadata__) as the base.
    pub same_layout: bool,
    /// Tensors compared (by name), and their elements.
    pub tensors: usize,
    /// Elements compared.
    pub elements: u64,
    /// Tensors compared as transformed.
    pub transformed: usize,
    /// Tensors compared as replaced.
    pub replaced: usize,
    /// Tensors compared as untouched.
    pub untouched: usize,
    /// Base tensors absent (or with another dtype or shape), and tensors the base lacks.
    pub missing: usize,
    /// Tensors the base lacks.
    pub extra: usize,
}

/// The whole `boft-verify` report (docs/verify-schema.json).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `boft-verify`.
    pub tool: &'static str,
    /// This build's version.
    pub version: &'static str,
    /// No check failed.
    pub passed: bool,
    /// `check:subject` of every failed check.
    pub failed: Vec<String>,
    /// One report per adapter.
    pub adapters: Vec<AdapterReport>,
    /// The second checkpoint's report, when one was given.
    pub merged: Option<MergedReport>,
    /// Every check, in report order.
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
                // SIGINT/SIGTERM end a long check between targets (the binaries set the flag).
                crate::output::check_interrupted()?;
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
    // A signal that arrived during the last, longest check still ends the run as interrupted:
    // a report of checks cut short must not read as a pass.
    crate::output::check_interrupted()?;
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
