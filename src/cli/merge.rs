//! `boft-merge`: bake adapters into a checkpoint, take them out again, or switch one for another,
//! in one pass over the base; or many such merges of one base at once (`--batch`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;

use super::values::{AdapterSpec, AdapterSpecParser};
use crate::adapter::{Adapter, Strength};
use crate::checkpoint::Checkpoint;
use crate::error::{err, Class, Error};
use crate::hub::{locate, Role};
use crate::merge::{self, Direction, Job, Layer, Stats};

/// The program name in messages.
pub const PROGRAM: &str = "boft-merge";

/// Bake BOFT/OFT adapters into a safetensors checkpoint (or take them out again), in one pass.
#[derive(Parser)]
#[command(
    name = "boft-merge",
    version,
    after_help = "Examples:\n  boft-merge --base fixtures/peft_boft/bases/llama_f32 \\\n             --adapter fixtures/peft_boft/adapters/llama_f32_f2 -o merged-llama\n  \
boft-merge --base B --adapter A1 --adapter 'A2,strength=0.5,mode=geodesic' -o OUT\n  \
boft-merge --base merged-with-A --unmerge-adapter A --adapter B -o merged-with-B\n  \
boft-merge --base B --batch jobs.json\n  \
boft-merge --base B --adapter A -o OUT --unit 3/8   (worker 3 of 8; then --finalize: docs/SCALE.md)\n\n\
Adapters apply in the order given, after every --unmerge-adapter is taken out (in reverse order);\n\
each tensor is read once, transformed in f32 by all of them and rounded once (docs/COMPOSE.md).\n\
The output keeps the base's layout (same files, shards, index and metadata); tensors no adapter\n\
touches are copied byte for byte. It is written under a temporary name and renamed into place\n\
only when complete. Exit status: 0 success, 2 error (one line on stderr)."
)]
pub struct Args {
    /// Base checkpoint: a .safetensors file; a folder with model.safetensors or
    /// model.safetensors.index.json and its shards; a diffusers pipeline folder (model_index.json;
    /// every component the adapter targets is merged); or a hub id org/name[@revision][/subfolder]
    /// found in the local Hugging Face cache.
    #[arg(long)]
    pub base: PathBuf,
    /// Adapter to apply, repeatable (applied in the order given): a canonical .safetensors file,
    /// a PEFT adapter folder, a LyCORIS/kohya OFT .safetensors file, or a hub id
    /// org/name[@revision][/file] in the local Hugging Face cache. Per-adapter options may follow
    /// the path: PATH[,strength=T][,mode=linear|per-factor|geodesic][,from=READER].
    #[arg(long, value_name = "ADAPTER", value_parser = AdapterSpecParser)]
    pub adapter: Vec<AdapterSpec>,
    /// Adapter to take out of the base first (exact inverse), repeatable: list them in the order
    /// they were merged; they are undone in reverse order, before any --adapter applies. Same
    /// per-adapter options as --adapter (the strength and mode it was merged with).
    #[arg(long, value_name = "ADAPTER", value_parser = AdapterSpecParser)]
    pub unmerge_adapter: Vec<AdapterSpec>,
    /// Many merges of the base in one pass: a JSON file {"jobs": [{"output": OUT, "adapters":
    /// [ADAPTER…], "unmerge_adapters": [ADAPTER…]}…]} (paths relative to the current folder);
    /// each base tensor is read once and written to every output. Replaces -o and the adapter
    /// flags.
    #[arg(long, value_name = "JOBS.json", conflicts_with_all = ["adapter", "unmerge_adapter", "output", "unmerge"])]
    pub batch: Option<PathBuf>,
    /// Resolve adapter module names only among this component's tensors (unet, transformer,
    /// text_encoder, text_encoder_2, vae, or a pipeline's component folder), for names that
    /// several components share.
    #[arg(long)]
    pub component: Option<String>,
    /// Reader for every adapter (unless its own from= says otherwise): auto (detected),
    /// canonical, peft, peft-legacy-conv, lycoris, kohya.
    #[arg(long, value_enum, default_value = "auto", hide_possible_values = true)]
    pub from: super::values::From,
    /// Output: a folder when the base is a folder, a file when the base is a file.
    #[arg(short = 'o', long = "output", required_unless_present = "batch")]
    pub output: Option<PathBuf>,
    /// Take every --adapter out of a merged checkpoint (in reverse order) instead of applying
    /// it, as --unmerge-adapter does.
    #[arg(long)]
    pub unmerge: bool,
    /// When taking adapters out: leave tensors they replaced outright (modules_to_save, trained
    /// biases) as they are instead of refusing; their originals are not in the adapter.
    #[arg(long)]
    pub keep_replaced: bool,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where to compute: cpu (default), or cuda[:N] when built with the cuda feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Apply every adapter at this strength (1 = as trained), unless its own strength= says
    /// otherwise.
    #[arg(long, default_value_t = 1.0)]
    pub strength: f64,
    /// How a strength other than 1 is applied: linear (W + t·(F(W) − W), what A1111 and kohya do),
    /// per-factor (each block tB + (1 − t)I, what LyCORIS does), geodesic (each rotation to the
    /// power t: exactly orthogonal, two merges at t = ½ equal one at 1 for block-diagonal
    /// adapters). docs/STRENGTH.md says which tool each mode reproduces.
    #[arg(long, value_enum, default_value = "linear")]
    pub strength_mode: super::values::Mode,
    /// Print nothing but errors.
    #[arg(short, long)]
    pub quiet: bool,
    /// Write nothing; print the merge's independent units as JSON on stdout: one per output
    /// file (for a batch, per job and file), with the ranges it reads, the file it writes, its
    /// tensors and bytes (docs/SCALE.md). With --unit K/N, only worker K's share.
    #[arg(long, conflicts_with = "finalize")]
    pub plan: bool,
    /// Run only worker K's share of the units when the merge is split among N workers (K = 0 …
    /// N−1, as SLURM_ARRAY_TASK_ID counts; every worker names the same output), into the
    /// staging folder .OUT.boft-units beside the output; then --finalize. A unit already done
    /// for this merge is skipped.
    #[arg(long, value_name = "K/N", conflicts_with = "finalize")]
    pub unit: Option<merge::units::Share>,
    /// Put together the output from its units once all have run: every unit's record must
    /// belong to this merge and its file be the one recorded; then the output is moved into
    /// place and the staging folder removed. Otherwise one line names a unit and nothing moves.
    #[arg(long)]
    pub finalize: bool,
    /// With --finalize: also read every unit's file again and check it against the SHA-256 its
    /// record holds.
    #[arg(long, requires = "finalize")]
    pub rehash: bool,
}

/// What a merge did.
pub struct Merged {
    /// What `--plan` printed (JSON), `--plan` only.
    pub plan: Option<String>,
    /// What `--unit K/N` did, `--unit` only.
    pub units: Option<merge::units::UnitsDone>,
    /// What was written (the first output's, for a batch).
    pub stats: Stats,
    /// Every output and what was written to it, in the order given.
    pub outputs: Vec<(PathBuf, Stats)>,
    /// The backend's name, as the summary line prints it.
    pub backend: String,
}

/// The command: parse `argv` (program name first), run, report; returns the exit code.
pub fn main<I, T>(argv: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    super::main_with(PROGRAM, argv, |args: &Args| {
        let done = run(args)?;
        if let Some(plan) = &done.plan {
            println!("{plan}");
            return Ok(0);
        }
        if let (Some(u), Some(share)) = (&done.units, args.unit) {
            if !args.quiet {
                let list = |v: &[merge::units::Unit]| {
                    v.iter()
                        .map(|u| u.index.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let bytes: u64 = u.ran.iter().map(|u| u.bytes).sum();
                eprintln!(
                    "unit {}/{}: {} of the merge's {} units written ({bytes} bytes){}{}; \
                     --finalize puts the output together once all have run",
                    share.k,
                    share.n,
                    u.ran.len(),
                    u.total,
                    if u.ran.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", list(&u.ran))
                    },
                    if u.skipped.is_empty() {
                        String::new()
                    } else {
                        format!("; already done: {}", list(&u.skipped))
                    },
                );
            }
            return Ok(0);
        }
        if !args.quiet {
            let verb = if args.unmerge && args.unmerge_adapter.is_empty() {
                "unmerged"
            } else {
                "merged"
            };
            for (path, stats) in &done.outputs {
                eprintln!(
                    "{verb} {}: {} tensors transformed, {} replaced, {} copied; {} bytes of \
                     tensor data written on {}",
                    path.display(),
                    stats.transformed,
                    stats.replaced,
                    stats.copied,
                    stats.bytes,
                    done.backend
                );
            }
            let left_out = &done.stats.left_out;
            if !left_out.is_empty() {
                let names: Vec<String> = left_out
                    .iter()
                    .take(3)
                    .map(|p| p.display().to_string())
                    .collect();
                eprintln!(
                    "left out {} weight file(s) that are not part of the checkpoint and would be \
                     stale: {}{}",
                    left_out.len(),
                    names.join(", "),
                    if left_out.len() > 3 { ", …" } else { "" }
                );
            }
        }
        Ok(0)
    })
}

/// One job of a batch file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobSpec {
    output: PathBuf,
    #[serde(default)]
    adapters: Vec<String>,
    #[serde(default)]
    unmerge_adapters: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchSpec {
    jobs: Vec<JobSpec>,
}

/// The most jobs a batch may hold: every output's files are open at once.
pub const MAX_JOBS: usize = 256;

/// A batch file's jobs: (output, adapters to take out, adapters to apply).
type Jobs = Vec<(PathBuf, Vec<AdapterSpec>, Vec<AdapterSpec>)>;

fn read_batch(path: &Path) -> Result<Jobs, Error> {
    // A jobs file is small: past 16 MiB it is not one.
    const MAX: u64 = 16 << 20;
    let f = crate::checkpoint::file::open_regular(path, "a jobs file")?;
    let mut text = String::new();
    use std::io::Read;
    f.take(MAX + 1)
        .read_to_string(&mut text)
        .map_err(|e| Error::io(path, e))?;
    let bad = |m: String| err(Class::Usage, path, m);
    if text.len() as u64 > MAX {
        return Err(bad(format!("larger than {MAX} bytes: not a jobs file")));
    }
    let spec: BatchSpec = serde_json::from_str(&text)
        .map_err(|e| bad(format!("not a jobs file ({e}); see boft-merge --help")))?;
    if spec.jobs.is_empty() || spec.jobs.len() > MAX_JOBS {
        return Err(bad(format!(
            "{} jobs: a batch holds 1 to {MAX_JOBS}",
            spec.jobs.len()
        )));
    }
    let parse = |v: &[String], j: usize| {
        v.iter()
            .map(|s| AdapterSpec::parse(s.as_ref()).map_err(|m| bad(format!("job {}: {m}", j + 1))))
            .collect::<Result<Vec<_>, _>>()
    };
    spec.jobs
        .iter()
        .enumerate()
        .map(|(j, job)| {
            if job.adapters.is_empty() && job.unmerge_adapters.is_empty() {
                return Err(bad(format!("job {}: no adapters", j + 1)));
            }
            Ok((
                job.output.clone(),
                parse(&job.unmerge_adapters, j)?,
                parse(&job.adapters, j)?,
            ))
        })
        .collect()
}

/// Raise the soft limit on open files to `need` where the hard limit allows; refuse a batch that
/// cannot fit under it before anything is opened for writing.
fn open_files(need: usize) -> Result<(), Error> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a pointer to a live struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Ok(());
    }
    let need = need as libc::rlim_t;
    if lim.rlim_cur >= need {
        return Ok(());
    }
    if lim.rlim_max < need {
        return Err(Error::bare(
            Class::Usage,
            format!(
                "this merge keeps about {need} files open at once and the limit is {} \
                 (ulimit -Hn): split the batch into smaller ones",
                lim.rlim_max
            ),
        ));
    }
    lim.rlim_cur = need;
    // SAFETY: as above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    Ok(())
}

/// The merge itself: no printing (but the progress bar, on a terminal, unless `quiet`), no exit.
pub fn run(args: &Args) -> Result<Merged, Error> {
    if !args.strength.is_finite() {
        return Err(Error::bare(
            Class::Usage,
            format!("--strength {}: expected a finite number", args.strength),
        ));
    }
    let jobs: Jobs = match &args.batch {
        Some(path) => read_batch(path)?,
        None => {
            let output = args
                .output
                .clone()
                .expect("clap requires -o without --batch");
            if args.adapter.is_empty() && args.unmerge_adapter.is_empty() {
                return Err(Error::bare(
                    Class::Usage,
                    "no adapter: give --adapter or --unmerge-adapter (see boft-merge --help)",
                ));
            }
            if args.unmerge {
                // --unmerge takes every --adapter out, as if each were an --unmerge-adapter.
                let mut out = args.unmerge_adapter.clone();
                out.extend(args.adapter.iter().cloned());
                vec![(output, out, Vec::new())]
            } else {
                vec![(output, args.unmerge_adapter.clone(), args.adapter.clone())]
            }
        }
    };
    if args.keep_replaced && !jobs.iter().any(|(_, unmerge, _)| !unmerge.is_empty()) {
        return Err(Error::bare(
            Class::Usage,
            "--keep-replaced applies only when adapters are taken out (--unmerge, \
             --unmerge-adapter)",
        ));
    }
    let device = merge::Device::parse(&args.device)?;
    // Opening a GPU (driver, context, cuBLAS) takes a good part of a second: it overlaps
    // reading the base and the adapters, and is waited for before anything is written.
    let opening = std::thread::spawn(move || device.backend());
    let base_path = locate(&args.base, Role::Checkpoint)?;
    let base = Checkpoint::open(&base_path)?;

    // Each distinct adapter is read and fitted once, however many jobs name it.
    let mut loaded: Vec<(PathBuf, super::values::From, PathBuf, Adapter)> = Vec::new();
    let mut index = |spec: &AdapterSpec| -> Result<usize, Error> {
        let from = spec.from.unwrap_or(args.from);
        if let Some(i) = loaded
            .iter()
            .position(|(p, f, _, _)| *p == spec.path && *f == from)
        {
            return Ok(i);
        }
        let path = locate(&spec.path, Role::Adapter)?;
        let mut adapter = crate::formats::load_deferred_as(&path, from.into())?;
        merge::fit_in(&base, &mut adapter, true, args.component.as_deref())?;
        loaded.push((spec.path.clone(), from, path, adapter));
        Ok(loaded.len() - 1)
    };
    let strength = |spec: &AdapterSpec| Strength {
        t: spec.strength.unwrap_or(args.strength),
        mode: spec.mode.unwrap_or(args.strength_mode).into(),
    };
    let out_dir = if args.keep_replaced {
        Direction::UnmergeKeepReplaced
    } else {
        Direction::Unmerge
    };
    // (output, [(adapter index, direction, strength)]) with the un-merges first, reversed.
    let mut recipes = Vec::with_capacity(jobs.len());
    for (output, unmerge, merge) in &jobs {
        let mut layers = Vec::new();
        for spec in unmerge.iter().rev() {
            layers.push((index(spec)?, out_dir, strength(spec)));
        }
        for spec in merge {
            layers.push((index(spec)?, Direction::Merge, strength(spec)));
        }
        recipes.push((output.clone(), layers));
    }
    let jobs: Vec<Job> = recipes
        .iter()
        .map(|(output, layers)| Job {
            dest: output.clone(),
            layers: layers
                .iter()
                .map(|&(i, direction, strength)| Layer {
                    adapter: &loaded[i].3,
                    direction,
                    strength,
                })
                .collect(),
        })
        .collect();
    let backend = opening.join().expect("opening the device does not panic")?;
    let mut inputs: Vec<&Path> = vec![&base_path];
    inputs.extend(loaded.iter().map(|l| l.2.as_path()));
    // The jobs file is an input too: no job may write over it.
    inputs.extend(args.batch.as_deref());
    let split = args.plan || args.unit.is_some() || args.finalize;
    if split {
        return run_split(
            args,
            &base,
            &jobs,
            &recipes,
            &loaded,
            &inputs,
            backend.as_ref(),
        );
    }
    // Every output's files are open at once: two descriptors a file of the base (the output and
    // its copy source), plus what the inputs and the runtime hold.
    open_files(jobs.len() * base.files.len() * 2 + loaded.len() * 4 + 64)?;
    let bar = super::progress::Bar::new(!args.quiet);
    let stats = super::with_threads(args.threads, || {
        merge::merge_batch(&base, &jobs, &inputs, args.force, backend.as_ref(), &bar)
    })?;
    let outputs: Vec<(PathBuf, Stats)> = jobs.iter().map(|j| j.dest.clone()).zip(stats).collect();
    Ok(Merged {
        plan: None,
        units: None,
        stats: outputs[0].1.clone(),
        outputs,
        backend: backend.name(),
    })
}

/// The adapters a merge reads: (as named, reader, where found, fitted).
type Loaded = Vec<(PathBuf, super::values::From, PathBuf, Adapter)>;
/// Each job's output and its layers: (adapter index in `Loaded`, direction, strength).
type Recipes = Vec<(PathBuf, Vec<(usize, Direction, Strength)>)>;

/// `--plan`, `--unit K/N`, `--finalize` (docs/SCALE.md).
fn run_split(
    args: &Args,
    base: &Checkpoint,
    jobs: &[Job],
    recipes: &Recipes,
    loaded: &Loaded,
    inputs: &[&Path],
    backend: &dyn merge::Backend,
) -> Result<Merged, Error> {
    use merge::units;
    // What each job does, in the terms its plan id is made of: each adapter by its files'
    // bytes and how it is applied, and what decides which tensors it reaches.
    let digests = loaded
        .iter()
        .map(|l| units::adapter_digest(&l.2))
        .collect::<Result<Vec<_>, _>>()?;
    let base_id = units::base_digest(base);
    let ids: Vec<String> = recipes
        .iter()
        .map(|(_, layers)| {
            let mut recipe = Vec::new();
            recipe.extend(format!("component={:?}\0", args.component).into_bytes());
            for &(i, direction, strength) in layers {
                recipe.extend_from_slice(&digests[i]);
                recipe.extend(
                    format!(
                        "{:?} {:?} {:?} {}\0",
                        loaded[i].1,
                        direction,
                        strength.mode,
                        strength.t.to_bits()
                    )
                    .into_bytes(),
                );
            }
            units::plan_id(&base_id, &recipe)
        })
        .collect();
    let stats_of = |stats: Vec<Stats>| {
        let outputs: Vec<(PathBuf, Stats)> =
            jobs.iter().map(|j| j.dest.clone()).zip(stats).collect();
        Merged {
            plan: None,
            units: None,
            stats: outputs[0].1.clone(),
            outputs,
            backend: backend.name(),
        }
    };
    if args.plan {
        let files: Vec<Vec<PathBuf>> = recipes
            .iter()
            .map(|(_, layers)| {
                let mut v: Vec<PathBuf> = Vec::new();
                for &(i, _, _) in layers {
                    for p in units::adapter_files(&loaded[i].2) {
                        if !v.contains(&p) {
                            v.push(p);
                        }
                    }
                }
                v
            })
            .collect();
        let doc = units::plan_doc(base, jobs, &ids, &files, args.unit)?;
        let mut done = stats_of(vec![Stats::default(); jobs.len()]);
        done.plan = Some(serde_json::to_string_pretty(&doc).expect("a plan serialises"));
        return Ok(done);
    }
    if args.finalize {
        let stats = super::with_threads(args.threads, || {
            units::finalize(base, jobs, &ids, inputs, args.force, args.rehash)
        })?;
        return Ok(stats_of(stats));
    }
    let share = args.unit.expect("one of the three");
    // Three descriptors a unit of this worker's share (its file, a second handle on it, the
    // base file), plus what the inputs and the runtime hold.
    let who = units::assign(&units::units(base, jobs.len()), share.n);
    let mine = who.iter().filter(|&&w| w == share.k).count();
    open_files(mine * 3 + loaded.len() * 4 + 64)?;
    let bar = super::progress::Bar::new(!args.quiet);
    let done = super::with_threads(args.threads, || {
        units::run(base, jobs, &ids, share, inputs, args.force, backend, &bar)
    })?;
    let mut out = stats_of(done.stats.clone());
    out.units = Some(done);
    Ok(out)
}
