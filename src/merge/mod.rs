//! Merge planning and execution. The engine sees only canonical adapters: it resolves each target
//! to a base tensor, checks geometry, orders what every adapter does to each tensor, and streams
//! every file of the base to one or more outputs at the same offsets — untouched tensors copied
//! byte for byte (in the kernel when possible), targeted ones transformed with bounded memory and
//! rounded once, however many adapters touch them (`apply`, `pipeline`).

mod apply;
pub mod backend;
#[cfg(feature = "candle")]
pub mod candle;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device_plan;
mod expect;
mod pipeline;
pub mod progress;
pub mod units;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::adapter::{Adapter, Replacement, Side, Strength, StrengthMode, Target};
use crate::checkpoint::Checkpoint;
use crate::error::{err, Class, Result};
use crate::output::{self, Staged};
pub use backend::{cuda_backend, Backend, CpuBackend, Device};
pub use expect::Fate;
pub use progress::{NoProgress, Progress};

/// One step of what an adapter does to a tensor.
enum Stage<'a> {
    /// Transform whole rows (input side, one target).
    Rows(&'a Target),
    /// Transform columns of row slices (output side; several slices for fused weights).
    Columns(Vec<((usize, usize), &'a Target)>),
}

/// What one adapter (a `Layer`) does to a tensor: its stages in the order they apply.
struct Group<'a> {
    stages: Vec<Stage<'a>>,
    /// Un-merging: every chain inverted, the stages in reverse order.
    inverse: bool,
    strength: Strength,
}

/// What happens to one base tensor: start from the base's values or a replacement's, then every
/// adapter's group in turn.
#[derive(Default)]
struct Action<'a> {
    start: Option<&'a Replacement>,
    groups: Vec<Group<'a>>,
}

impl Action<'_> {
    /// Whether its tensor streams in row chunks (`apply::Built::rows_only`, known before the
    /// chains are built): every stage on whole rows, from the base's values.
    fn streams(&self) -> bool {
        self.start.is_none()
            && self
                .groups
                .iter()
                .all(|g| g.stages.iter().all(|s| matches!(s, Stage::Rows(_))))
    }
}

/// One adapter of a merge and how it is applied.
#[derive(Clone, Copy)]
pub struct Layer<'a> {
    /// The adapter, fitted to the base.
    pub adapter: &'a Adapter,
    /// Applied, or taken out.
    pub direction: Direction,
    /// The strength its chains are built at.
    pub strength: Strength,
}

impl<'a> Layer<'a> {
    /// The adapter applied as trained.
    pub fn full(adapter: &'a Adapter) -> Layer<'a> {
        Layer {
            adapter,
            direction: Direction::Merge,
            strength: Strength::FULL,
        }
    }
}

/// A merge resolved against its base: what happens to every tensor it touches.
pub struct Plan<'a> {
    /// The checkpoint the plan applies to.
    pub base: &'a Checkpoint,
    actions: HashMap<String, Action<'a>>,
}

/// What a merge wrote, for the summary line.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Tensors transformed.
    pub transformed: usize,
    /// Tensors replaced.
    pub replaced: usize,
    /// Tensors copied byte for byte.
    pub copied: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Weight files of the base folder that are not part of the checkpoint and were not
    /// written (`Checkpoint::left_out`).
    pub left_out: Vec<PathBuf>,
}

/// Which way an adapter goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Apply the adapter.
    Merge,
    /// Undo the transforms; refuse adapters that replaced tensors outright.
    Unmerge,
    /// Undo the transforms and leave replaced tensors as they are.
    UnmergeKeepReplaced,
}

/// Resolve every target and replacement against the base and check it fits. Nothing is written.
pub fn plan<'a>(base: &'a Checkpoint, adapter: &'a Adapter, dir: Direction) -> Result<Plan<'a>> {
    plan_layers(
        base,
        &[Layer {
            adapter,
            direction: dir,
            strength: Strength::FULL,
        }],
    )
}

/// `plan` for several adapters applied in order: each tensor starts from the base (or the last
/// replacement of it) and goes through every adapter's stages in turn.
pub fn plan_layers<'a>(base: &'a Checkpoint, layers: &[Layer<'a>]) -> Result<Plan<'a>> {
    let mut actions: HashMap<String, Action<'a>> = HashMap::new();
    for layer in layers {
        plan_layer(base, layer, &mut actions)?;
    }
    for (name, a) in &actions {
        // Every factor is applied to every row, and every group's chains are held while its
        // tensor is transformed: an adapter named many times must not multiply both without
        // bound.
        let depth: usize = a
            .groups
            .iter()
            .flat_map(|g| &g.stages)
            .map(|s| match s {
                Stage::Rows(t) => t.factors,
                Stage::Columns(slices) => slices.iter().map(|(_, t)| t.factors).max().unwrap_or(0),
            })
            .sum();
        if depth > MAX_PASS_FACTORS {
            return Err(err(
                Class::Usage,
                &base.root,
                format!(
                    "{name}: the adapters of this merge chain {depth} factors on it, past the \
                     {MAX_PASS_FACTORS} one pass applies (merge in several passes)"
                ),
            ));
        }
    }
    Ok(Plan { base, actions })
}

/// The most factors one pass applies to a tensor, over all its adapters (four adapters at the
/// per-adapter limit, `adapter::MAX_FACTORS`): the work per byte of the base and the blocks held
/// for a tensor stay bounded whatever the command line or a batch file names.
pub const MAX_PASS_FACTORS: usize = 4 * crate::adapter::MAX_FACTORS;

fn plan_layer<'a>(
    base: &'a Checkpoint,
    layer: &Layer<'a>,
    actions: &mut HashMap<String, Action<'a>>,
) -> Result<()> {
    let (adapter, dir) = (layer.adapter, layer.direction);
    let inverse = dir != Direction::Merge;
    let missing = |what: &str, name: &str, module: &str| {
        err(
            Class::MissingTarget,
            &base.root,
            format!(
                "{what} {name:?} (from adapter module {module:?}) is not in the base checkpoint"
            ),
        )
    };
    let s = layer.strength;
    if let (true, Some(t)) = (
        inverse && s.mode == StrengthMode::Linear && s.t != 1.0,
        adapter.targets.first(),
    ) {
        // Said before anything is written (the chains would say it when built).
        t.chain_at(true, s).map_err(|e| e.at(&base.root))?;
    }
    let mut by_tensor: HashMap<&str, Vec<&Target>> = HashMap::new();
    for t in &adapter.targets {
        by_tensor.entry(t.name.as_str()).or_default().push(t);
    }
    for (name, mut targets) in by_tensor {
        let (_, info) = base
            .get(name)
            .ok_or_else(|| missing("target tensor", name, &targets[0].module))?;
        for t in &targets {
            t.check_base(info.dtype, &info.shape)
                .map_err(|e| e.at(&base.root))?;
        }
        crate::adapter::check_tensor(name, &targets).map_err(|e| e.at(&base.root))?;
        targets.sort_by_key(|t| t.stage);
        let mut stages = Vec::new();
        for stage in targets.chunk_by(|a, b| a.stage == b.stage) {
            stages.push(if stage[0].side == Side::Input {
                Stage::Rows(stage[0])
            } else {
                let mut slices: Vec<_> = stage
                    .iter()
                    .map(|t| {
                        let range = t.rows.unwrap_or((0, t.view.map_or(info.shape[0], |v| v.0)));
                        (range, *t)
                    })
                    .collect();
                slices.sort_by_key(|s| s.0);
                Stage::Columns(slices)
            });
        }
        if inverse {
            stages.reverse();
        }
        actions
            .entry(name.to_string())
            .or_default()
            .groups
            .push(Group {
                stages,
                inverse,
                strength: layer.strength,
            });
    }
    for r in &adapter.replacements {
        let (_, info) = base
            .get(&r.name)
            .ok_or_else(|| missing("replaced tensor", &r.name, &r.name))?;
        if info.shape != r.shape {
            return Err(err(
                Class::ShapeMismatch,
                &base.root,
                format!(
                    "replacement for {} has shape {:?}, base has {:?}",
                    r.name, r.shape, info.shape
                ),
            ));
        }
        if info.dtype != r.dtype && info.dtype.float_size().is_none() {
            return Err(err(
                Class::UnsupportedDtype,
                &base.root,
                format!(
                    "replacement for {} is {} but the base tensor is {}",
                    r.name,
                    r.dtype.name(),
                    info.dtype.name()
                ),
            ));
        }
        match dir {
            // Whatever earlier adapters did to the tensor is overwritten.
            Direction::Merge => {
                let a = actions.entry(r.name.clone()).or_default();
                a.start = Some(r);
                a.groups.clear();
            }
            // The base tensor a replacement overwrote is not in the adapter: it cannot be restored.
            Direction::Unmerge => {
                return Err(err(
                    Class::BadAdapter,
                    &base.root,
                    format!(
                        "the adapter replaces {} outright (modules_to_save or bias); the original \
                         cannot be recovered by --unmerge (--keep-replaced un-merges the rest and \
                         leaves such tensors as they are)",
                        r.name
                    ),
                ));
            }
            Direction::UnmergeKeepReplaced => {}
        }
    }
    Ok(())
}

impl Plan<'_> {
    fn action(&self, name: &str) -> Option<&Action<'_>> {
        self.actions.get(name)
    }

    /// Write the merged checkpoint under `staged` (a folder for folder bases, a file otherwise).
    pub fn execute(
        &self,
        staged: &Staged,
        backend: &dyn Backend,
        progress: &dyn Progress,
    ) -> Result<Stats> {
        let mut stats = pipeline::execute(&[(self, staged)], backend, progress)?;
        Ok(stats.remove(0))
    }
}

/// Resolve every target's name against the base (`crate::names`) and fit it to its base
/// tensor (the count of shared blocks, crops; see `Target::fit`).
pub fn fit(base: &Checkpoint, adapter: &mut Adapter) -> Result<()> {
    fit_with(base, adapter, true)
}

/// `fit`, leaving names that resolve to no tensor (or to several) as they are when not `strict`.
pub fn fit_with(base: &Checkpoint, adapter: &mut Adapter, strict: bool) -> Result<()> {
    fit_in(base, adapter, strict, None)
}

/// `fit_with`, resolving names only among the tensors of one component (`--component`).
pub fn fit_in(
    base: &Checkpoint,
    adapter: &mut Adapter,
    strict: bool,
    component: Option<&str>,
) -> Result<()> {
    crate::names::resolve_in(base, adapter, strict, component)?;
    for t in &mut adapter.targets {
        if let Some((_, info)) = base.get(&t.name) {
            t.fit(info.dtype, &info.shape)
                .map_err(|e| e.at(&base.root))?;
        } else if t.share && t.blocks == 0 {
            // Not resolved (allowed when not strict), yet the blocks cannot be counted without
            // it: say so, rather than later asking for the --base that was given.
            return Err(err(
                Class::MissingTarget,
                &base.root,
                format!(
                    "{}: not in the base checkpoint, and its shared blocks (block_share) take \
                     their count from that tensor",
                    t.name
                ),
            ));
        }
    }
    // Resolving may have made two source names one tensor, and fitting sets crops and counts.
    adapter.validate().map_err(|e| e.at(&base.root))
}

/// Check every target against the base and record the base shape in it (for `boft-convert --base`).
pub fn resolve_shapes(
    base: &Checkpoint,
    adapter: &mut Adapter,
    component: Option<&str>,
) -> Result<()> {
    fit_in(base, adapter, true, component)?;
    plan(base, adapter, Direction::Merge)?;
    for t in &mut adapter.targets {
        if let Some((_, info)) = base.get(&t.name) {
            t.shape = Some(info.shape.clone());
        }
    }
    Ok(())
}

/// One output of a batch: the adapters applied to the base (in order) and where the result goes.
pub struct Job<'a> {
    /// The adapters, in the order they apply.
    pub layers: Vec<Layer<'a>>,
    /// The output: a folder when the base is a folder, a file otherwise.
    pub dest: PathBuf,
}

/// The whole merge as the command line runs it: check destination, plan, stage, execute, commit.
/// `inputs` are the adapter paths (the base's own files are added), which the output may not
/// overwrite.
pub fn merge_to(
    base: &Checkpoint,
    layers: &[Layer],
    dest: &Path,
    inputs: &[&Path],
    force: bool,
    backend: &dyn Backend,
    progress: &dyn Progress,
) -> Result<Stats> {
    let job = Job {
        layers: layers.to_vec(),
        dest: dest.to_path_buf(),
    };
    let mut stats = merge_batch(base, &[job], inputs, force, backend, progress)?;
    Ok(stats.remove(0))
}

/// Several merges of one base in one pass (`boft-merge --batch`): every job planned before
/// anything is written, each base tensor read once and written to every output, each output
/// staged and moved into place only when all are complete (a failure leaves none of them).
pub fn merge_batch(
    base: &Checkpoint,
    jobs: &[Job],
    inputs: &[&Path],
    force: bool,
    backend: &dyn Backend,
    progress: &dyn Progress,
) -> Result<Vec<Stats>> {
    check_outputs(base, jobs, inputs, force)?;
    let plans = jobs
        .iter()
        .map(|j| plan_layers(base, &j.layers))
        .collect::<Result<Vec<_>>>()?;
    let mut staged = Vec::with_capacity(jobs.len());
    for job in jobs {
        staged.push(if base.is_folder() {
            Staged::dir(&job.dest)?
        } else {
            Staged::file(&job.dest)?
        });
    }
    let pairs: Vec<(&Plan, &Staged)> = plans.iter().zip(&staged).collect();
    let stats = pipeline::execute(&pairs, backend, progress)
        .map_err(|e| staged.iter().fold(e, |e, s| s.blame_dest(e)))?;
    // All or none, as far as renames allow: every output is checked before any is moved, and
    // once moving starts a signal no longer stops it.
    output::check_interrupted()?;
    for s in &staged {
        s.check_commit()?;
    }
    for s in staged {
        s.commit_checked()?;
    }
    Ok(stats)
}

/// What every merge of `jobs` checks before it writes: no output is (or holds, or lies inside)
/// an input or another job's output, and none exists unless `force`.
fn check_outputs(base: &Checkpoint, jobs: &[Job], inputs: &[&Path], force: bool) -> Result<()> {
    // The base's own files count as inputs too: some may be symlinks to elsewhere.
    let base_files = base.input_paths();
    let all: Vec<PathBuf> = inputs
        .iter()
        .copied()
        .chain(base_files.iter().map(PathBuf::as_path))
        .flat_map(crate::formats::read_alongside)
        .collect();
    let all: Vec<&Path> = all.iter().map(PathBuf::as_path).collect();
    let dests: Vec<PathBuf> = jobs.iter().map(|j| output::resolve(&j.dest)).collect();
    for (i, job) in jobs.iter().enumerate() {
        output::check_destination(&job.dest, &all, force)?;
        // One output replacing (or inside) another would destroy it when moved into place.
        if let Some(j) =
            (0..i).find(|&j| dests[i].starts_with(&dests[j]) || dests[j].starts_with(&dests[i]))
        {
            return Err(err(
                Class::Usage,
                &job.dest,
                if dests[i] == dests[j] {
                    format!("jobs {} and {} write the same output", j + 1, i + 1)
                } else {
                    format!(
                        "the outputs of jobs {} and {} lie one inside the other",
                        j + 1,
                        i + 1
                    )
                },
            ));
        }
    }
    Ok(())
}
