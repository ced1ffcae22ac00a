//! Extraction: the OFT/BOFT adapter that best turns a base checkpoint into a fine-tuned one, and
//! how much of the fine-tune each structure (block size b, butterfly factors m) can hold
//! (docs/EXTRACT.md). `fit.rs` fits one tensor pair; this file chooses the pairs, builds the
//! canonical adapter and the report.

pub mod fit;

use serde::Serialize;

use crate::adapter::{Adapter, BlockKind, Side, Target};
use crate::checkpoint::{Checkpoint, Dtype, SafeFile, TensorInfo};
use crate::error::{Class, Error, Result};
use crate::math::{perm, procrustes};
use crate::merge::Progress;

use fit::{Data, Matrix, State, Stop};

/// Whose permutation convention the butterfly factors follow, which decides where the result
/// can be exported (docs/EXTRACT.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Convention {
    /// PEFT BOFT's butterfly permutations (input side).
    Peft,
    /// LyCORIS boft's row orders (output side).
    Lycoris,
}

impl Convention {
    /// The convention of the library that rotates `side`.
    pub fn of(side: Side) -> Convention {
        match side {
            Side::Input => Convention::Peft,
            Side::Output => Convention::Lycoris,
        }
    }

    /// Gather permutations of `m` factors of blocks of `h` over `n` features (None: identity).
    /// Factor 0 is unpermuted in both: LyCORIS's stage 0 only reorders rows inside each block,
    /// which the exporter folds into the blocks.
    pub fn perms(self, n: usize, h: usize, m: usize) -> Vec<Option<Vec<u32>>> {
        (0..m)
            .map(|i| {
                if i == 0 {
                    return None;
                }
                let p = match self {
                    Convention::Peft => perm::invert(&perm::peft_boft(n, h, i)),
                    Convention::Lycoris => perm::lycoris_boft(n, h, i),
                };
                (!perm::is_identity(&p)).then_some(p)
            })
            .collect()
    }
}

/// Where the extracted adapter is going, which limits the structures it may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// The canonical file: any block size dividing the axis.
    Canonical,
    /// PEFT OFT / BOFT.
    Peft,
    /// LyCORIS diag-oft / boft.
    Lycoris,
}

/// What to fit, and how hard to try.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Which axis the rotation mixes.
    pub side: Side,
    /// Fit a per-output-row scale too.
    pub row_scale: bool,
    /// Stop when a sweep raises the captured share by less than this.
    pub tol: f64,
    /// Most sweeps per fit.
    pub max_sweeps: usize,
    /// Tensors whose name contains any of these are left alone.
    pub exclude: Vec<String>,
    /// Where the result goes.
    pub destination: Destination,
}

impl Settings {
    fn stop(&self, reference: f64) -> Stop {
        Stop {
            tol: self.tol,
            reference,
            max_sweeps: self.max_sweeps,
        }
    }
}

/// One weight both checkpoints hold, changed by the fine-tune.
pub struct Pair<'a> {
    /// The tensor's name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    base: (&'a SafeFile, &'a TensorInfo),
    tuned: (&'a SafeFile, &'a TensorInfo),
}

impl Pair<'_> {
    fn data(&self, side: Side) -> Data<'_> {
        let rows = self.shape[0];
        let cols = self.shape[1..].iter().product();
        fn m<'b>((f, t): (&'b SafeFile, &'b TensorInfo), rows: usize, cols: usize) -> Matrix<'b> {
            Matrix {
                bytes: f.data(t),
                dtype: t.dtype,
                rows,
                cols,
            }
        }
        Data {
            base: m(self.base, rows, cols),
            tuned: m(self.tuned, rows, cols),
            columns: side == Side::Output,
        }
    }

    fn bytes(&self) -> u64 {
        (self.base.0.data(self.base.1).len() + self.tuned.0.data(self.tuned.1).len()) as u64
    }
}

/// A tensor that changed but is not fitted, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// The tensor's name.
    pub name: String,
    /// Why it was not fitted.
    pub reason: String,
    /// ‖T − B‖², when it was measured.
    pub diff_sq: Option<f64>,
}

/// The weights to fit: every 2-D or 4-D float tensor that differs between the two checkpoints,
/// less the excluded ones. Both checkpoints must hold the same tensor names with the same shapes.
pub fn pairs<'a>(
    base: &'a Checkpoint,
    tuned: &'a Checkpoint,
    exclude: &[String],
) -> Result<(Vec<Pair<'a>>, Vec<Skipped>)> {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for name in base.tensor_names() {
        let Some(t) = tuned.get(name) else {
            let (f, _) = base.get(name).expect("listed");
            return Err(Error::new(
                Class::MissingTarget,
                &f.path,
                format!("{name} is in the base but not in the tuned checkpoint"),
            ));
        };
        let b = base.get(name).expect("listed");
        if b.1.shape != t.1.shape {
            return Err(Error::new(
                Class::ShapeMismatch,
                &t.0.path,
                format!(
                    "{name} has shape {:?} here but {:?} in the base",
                    t.1.shape, b.1.shape
                ),
            ));
        }
        let float = |d: Dtype| d.float_size().is_some();
        let same = b.1.dtype == t.1.dtype && b.0.data(b.1) == t.0.data(t.1);
        if same {
            continue;
        }
        let skip = |reason: &str| Skipped {
            name: name.to_string(),
            reason: reason.to_string(),
            diff_sq: None,
        };
        if !float(b.1.dtype) || !float(t.1.dtype) {
            skipped.push(skip("not a float tensor"));
        } else if !matches!(b.1.shape.len(), 2 | 4) || b.1.numel() == 0 {
            skipped.push(skip("not a 2-D or 4-D weight: no rotation reaches it"));
        } else if exclude.iter().any(|e| name.contains(e.as_str())) {
            skipped.push(skip("excluded"));
        } else {
            out.push(Pair {
                name: name.to_string(),
                shape: b.1.shape.clone(),
                base: b,
                tuned: t,
            });
        }
    }
    for name in tuned.tensor_names() {
        if base.get(name).is_none() {
            let (f, _) = tuned.get(name).expect("listed");
            return Err(Error::new(
                Class::MissingTarget,
                &f.path,
                format!("{name} is in the tuned checkpoint but not in the base"),
            ));
        }
    }
    Ok((out, skipped))
}

/// Largest block extraction fits: every worker accumulates `n × b` f64 cross products and each
/// block costs an SVD of b³, so a block as wide as a large axis would take gigabytes and hours
/// (the dense ceiling of a 14 336-wide projection: 1.6 GB per thread).
pub const MAX_BLOCK: usize = 4096;

/// Why a structure cannot be fitted to an axis of `n` features for `dest`, if it cannot.
pub fn unfit(n: usize, h: usize, m: usize, dest: Destination, side: Side) -> Option<String> {
    if h == 0 || m == 0 {
        return Some("empty structure".into());
    }
    if !n.is_multiple_of(h) {
        return Some(format!(
            "block size {h} does not divide the {n} rotated features"
        ));
    }
    let d = n / h;
    if m > 1 && (!h.is_multiple_of(2) || !perm::multiple_of_pow2(d, m - 1)) {
        return Some(format!(
            "{m} butterfly factors need an even block size and a block count divisible by {}; \
             {n} features make {d} blocks of {h}",
            perm::pow2_text(m - 1)
        ));
    }
    if dest == Destination::Lycoris && side == Side::Output {
        let diag = m == 1 && h <= d;
        let boft =
            h.is_multiple_of(2) && d.is_power_of_two() && m <= d.trailing_zeros() as usize + 1;
        if !diag && !boft {
            return Some(format!(
                "LyCORIS holds neither {d} blocks of {h} as diag-oft (blocks ≤ block count) nor \
                 as boft (even block size, power-of-two block count, at most log2(blocks)+1 \
                 factors)"
            ));
        }
    }
    None
}

/// How well one structure fits one tensor.
#[derive(Debug, Clone, Serialize)]
pub struct TensorFit {
    /// The tensor's name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Features the rotation mixes.
    pub n: usize,
    /// Block size b.
    pub block_size: usize,
    /// Butterfly factors m.
    pub factors: usize,
    /// How much of the fine-tune it holds.
    #[serde(flatten)]
    pub measure: Measure,
    /// Sweeps accepted (1 for one exact factor).
    pub sweeps: usize,
    /// Residual after each accepted sweep.
    pub history: Vec<f64>,
    /// Mean block angle, degrees (`procrustes::mean_angle`).
    pub angle_mean_deg: f64,
    /// Largest block angle, degrees.
    pub angle_max_deg: f64,
}

/// How much of a fine-tune a fit holds: of one tensor, or summed over tensors.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Measure {
    /// Degrees of freedom: b(b−1)/2 per block and factor, plus the scale's entries.
    pub parameters: u64,
    /// ‖T − B‖².
    pub diff_sq: f64,
    /// ‖T − F(B)‖².
    pub residual_sq: f64,
    /// ‖T‖².
    pub tuned_sq: f64,
    /// 1 − residual / diff.
    pub captured: f64,
    /// ‖T − F(B)‖ / ‖T‖.
    pub relative_residual: f64,
}

impl Measure {
    fn new(parameters: u64, diff_sq: f64, residual_sq: f64, tuned_sq: f64) -> Measure {
        let mut m = Measure {
            parameters,
            diff_sq,
            residual_sq,
            tuned_sq,
            ..Default::default()
        };
        m.finish();
        m
    }

    fn add(&mut self, o: &Measure) {
        self.parameters += o.parameters;
        self.diff_sq += o.diff_sq;
        self.residual_sq += o.residual_sq;
        self.tuned_sq += o.tuned_sq;
        self.finish();
    }

    fn finish(&mut self) {
        self.captured = captured(self.residual_sq, self.diff_sq);
        self.relative_residual = ratio(self.residual_sq, self.tuned_sq).sqrt();
    }
}

/// Totals over the fitted tensors.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Total {
    /// Tensors fitted.
    pub tensors: usize,
    /// Their sums.
    #[serde(flatten)]
    pub measure: Measure,
}

impl Total {
    fn add(&mut self, t: &TensorFit) {
        self.tensors += 1;
        self.measure.add(&t.measure);
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

fn captured(residual: f64, diff: f64) -> f64 {
    if diff > 0.0 {
        1.0 - residual / diff
    } else {
        1.0
    }
}

/// What `extract` found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Which axis the rotation mixes.
    pub side: Side,
    /// Whose permutations the factors follow.
    pub convention: Convention,
    /// Block size b.
    pub block_size: usize,
    /// Butterfly factors m.
    pub factors: usize,
    /// Whether a per-output-row scale was fitted.
    pub row_scale: bool,
    /// The stopping tolerance.
    pub tol: f64,
    /// Per fitted tensor.
    pub tensors: Vec<TensorFit>,
    /// Changed tensors left alone, and why.
    pub skipped: Vec<Skipped>,
    /// Totals over the fitted tensors.
    pub total: Total,
}

/// One structure fitted to one pair, from `start` (identity for a cold start).
struct One {
    state: State,
    fit: TensorFit,
}

/// Where a fit of `m` factors of blocks of `h` starts: the identity, or `warm`'s chain (with its
/// residual) followed by identity factors.
fn start(
    pair: &Pair,
    n: usize,
    norms_diff: f64,
    h: usize,
    m: usize,
    settings: &Settings,
    warm: Option<(&State, f64)>,
) -> (State, f64) {
    let conv = Convention::of(settings.side);
    let perms = conv.perms(n, h, m);
    let scale_len = settings.row_scale.then_some(pair.shape[0]);
    match warm {
        Some((s, r)) => {
            // The smaller chain followed by identity factors: the same transform, so the
            // larger structure starts where the smaller one ended.
            let mut st = State::identity(n, h, perms, scale_len);
            for (i, f) in s.factors.iter().enumerate() {
                st.factors[i].blocks = f.blocks.clone();
                st.identity[i] = s.identity[i];
            }
            st.scale = s.scale.clone();
            (st, r)
        }
        None => (State::identity(n, h, perms, scale_len), norms_diff),
    }
}

/// Fit from `start` (`first`: its factor 0 cross products, if a pass already gathered them).
fn fit_one(
    pair: &Pair,
    data: &Data,
    norms: &fit::Norms,
    settings: &Settings,
    (start, start_residual): (State, f64),
    first: Option<Vec<f64>>,
) -> Result<One> {
    let n = data.n();
    let (h, m) = (start.factors[0].h, start.factors.len());
    let fitted = fit::fit(
        data,
        start,
        start_residual,
        settings.stop(norms.diff),
        first,
    )?;
    let d = (n / h) as u64;
    let dof = m as u64 * d * (h as u64 * (h as u64 - 1) / 2)
        + if settings.row_scale {
            pair.shape[0] as u64
        } else {
            0
        };
    let mut angles = Vec::new();
    for f in &fitted.state.factors {
        for q in f.blocks.chunks_exact(h * h) {
            angles.push(procrustes::mean_angle(h, q).to_degrees());
        }
    }
    let fit = TensorFit {
        name: pair.name.clone(),
        shape: pair.shape.clone(),
        n,
        block_size: h,
        factors: m,
        measure: Measure::new(dof, norms.diff, fitted.residual, norms.tuned),
        sweeps: fitted.history.len(),
        history: fitted.history,
        angle_mean_deg: angles.iter().sum::<f64>() / angles.len().max(1) as f64,
        angle_max_deg: angles.iter().fold(0.0, |a, &b| a.max(b)),
    };
    Ok(One {
        state: fitted.state,
        fit,
    })
}

fn target(pair: &Pair, side: Side, state: State, h: usize) -> Target {
    let n = match side {
        Side::Input => pair.shape[1..].iter().product(),
        Side::Output => pair.shape[0],
    };
    let m = state.factors.len();
    let mut data = Vec::with_capacity(m * n * h);
    let mut perms = Vec::with_capacity(m);
    for f in state.factors {
        data.extend(f.blocks);
        perms.push(f.perm);
    }
    Target {
        name: pair.name.clone(),
        module: pair
            .name
            .strip_suffix(".weight")
            .unwrap_or(&pair.name)
            .to_string(),
        side,
        shape: Some(pair.shape.clone()),
        factors: m,
        blocks: n / h,
        block_size: h,
        data,
        perms,
        scale: state.scale,
        kind: BlockKind::Cayley,
        ..Default::default()
    }
}

/// Fit `m` factors of blocks of `h` to every pair and return the adapter and the report.
/// Pairs the structure (or the destination) cannot take are reported as skipped.
pub fn extract(
    base: &Checkpoint,
    tuned: &Checkpoint,
    settings: &Settings,
    h: usize,
    m: usize,
    progress: &dyn Progress,
) -> Result<(Adapter, Report)> {
    let (pairs, mut skipped) = pairs(base, tuned, &settings.exclude)?;
    progress.start(pairs.iter().map(Pair::bytes).sum());
    let mut targets = Vec::new();
    let mut fits = Vec::new();
    let mut total = Total::default();
    for pair in &pairs {
        let data = pair.data(settings.side);
        if let Some(why) = unfit(data.n(), h, m, settings.destination, settings.side) {
            let (norms, _) = fit::norms(&data, &pair.name, None)?;
            skipped.push(Skipped {
                name: pair.name.clone(),
                reason: why,
                diff_sq: Some(norms.diff),
            });
            progress.advance(pair.bytes());
            continue;
        }
        // The cold start's first step is gathered in the pass that measures the pair.
        let (state, _) = start(pair, data.n(), 0.0, h, m, settings, None);
        let (norms, first) = fit::norms(&data, &pair.name, Some(&state))?;
        let one = fit_one(pair, &data, &norms, settings, (state, norms.diff), first)?;
        total.add(&one.fit);
        targets.push(target(pair, settings.side, one.state, h));
        fits.push(one.fit);
        progress.advance(pair.bytes());
    }
    progress.finish();
    let adapter = Adapter {
        targets,
        replacements: Vec::new(),
        source_format: "boft-extract".into(),
        source_version: env!("CARGO_PKG_VERSION").into(),
        source_sha256: Default::default(),
    };
    if !adapter.targets.is_empty() {
        adapter.validate()?;
    }
    let report = Report {
        side: settings.side,
        convention: Convention::of(settings.side),
        block_size: h,
        factors: m,
        row_scale: settings.row_scale,
        tol: settings.tol,
        tensors: fits,
        skipped,
        total,
    };
    Ok((adapter, report))
}

/// One structure's result in a sweep.
#[derive(Debug, Clone, Serialize)]
pub struct SweepRow {
    /// Block size b.
    pub block_size: usize,
    /// Butterfly factors m.
    pub factors: usize,
    /// Fitted tensors' totals; tensors this structure cannot take count as not captured.
    pub total: Total,
    /// Tensors this structure could not take.
    pub unfit: Vec<String>,
    /// Most sweeps any tensor needed.
    pub max_sweeps: usize,
}

/// What `sweep` found.
#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    /// Which axis the rotation mixes.
    pub side: Side,
    /// Whose permutations the factors follow.
    pub convention: Convention,
    /// Whether a per-output-row scale was fitted.
    pub row_scale: bool,
    /// Rows of the 2-D view.
    pub rows: Vec<SweepRow>,
    /// One dense orthogonal Procrustes rotation per tensor (block size = the whole axis), the
    /// most any structure can capture; None when some tensor is wider than the limit.
    pub ceiling: Option<Total>,
    /// Widest axis the ceiling was computed for.
    pub ceiling_max_features: usize,
    /// Changed tensors left alone, and why.
    pub skipped: Vec<Skipped>,
}

/// Fit every (b, m) to every pair in one run over the data: per tensor, each block size's
/// factor counts in increasing order, each starting from the previous one's chain (so captured
/// shares never fall as m grows), and the dense ceiling when the axis is at most `ceiling_max`.
pub fn sweep(
    base: &Checkpoint,
    tuned: &Checkpoint,
    settings: &Settings,
    sizes: &[usize],
    factors: &[usize],
    ceiling_max: usize,
    progress: &dyn Progress,
) -> Result<SweepReport> {
    let (pairs, skipped) = pairs(base, tuned, &settings.exclude)?;
    let mut ms = factors.to_vec();
    ms.sort_unstable();
    ms.dedup();
    let mut rows: Vec<SweepRow> = sizes
        .iter()
        .flat_map(|&h| {
            ms.iter().map(move |&m| SweepRow {
                block_size: h,
                factors: m,
                total: Total::default(),
                unfit: Vec::new(),
                max_sweeps: 0,
            })
        })
        .collect();
    let mut ceiling = Some(Total::default());
    progress.start(pairs.iter().map(Pair::bytes).sum());
    for pair in &pairs {
        let data = pair.data(settings.side);
        let (norms, _) = fit::norms(&data, &pair.name, None)?;
        let n = data.n();
        for (hi, &h) in sizes.iter().enumerate() {
            let mut warm: Option<(State, f64)> = None;
            for (mi, &m) in ms.iter().enumerate() {
                let row = &mut rows[hi * ms.len() + mi];
                if let Some(_why) = unfit(n, h, m, settings.destination, settings.side) {
                    row.unfit.push(pair.name.clone());
                    // Counted as not captured, so every row sums over the same tensors.
                    row.total
                        .measure
                        .add(&Measure::new(0, norms.diff, norms.diff, norms.tuned));
                    continue;
                }
                let from = start(
                    pair,
                    n,
                    norms.diff,
                    h,
                    m,
                    settings,
                    warm.as_ref().map(|(s, r)| (s, *r)),
                );
                let one = fit_one(pair, &data, &norms, settings, from, None)?;
                row.total.add(&one.fit);
                row.max_sweeps = row.max_sweeps.max(one.fit.sweeps);
                warm = Some((one.state, one.fit.measure.residual_sq));
            }
        }
        if let Some(c) = &mut ceiling {
            if n <= ceiling_max {
                let dense = Settings {
                    destination: Destination::Canonical,
                    ..settings.clone()
                };
                let from = start(pair, n, norms.diff, n, 1, &dense, None);
                let one = fit_one(pair, &data, &norms, &dense, from, None)?;
                c.add(&one.fit);
            } else {
                ceiling = None;
            }
        }
        progress.advance(pair.bytes());
    }
    progress.finish();
    Ok(SweepReport {
        side: settings.side,
        convention: Convention::of(settings.side),
        row_scale: settings.row_scale,
        rows,
        ceiling,
        ceiling_max_features: ceiling_max,
        skipped,
    })
}
