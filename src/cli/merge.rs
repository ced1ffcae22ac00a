//! `boft-merge`: bake an adapter into a checkpoint, or take it out again.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

use crate::adapter::Strength;
use crate::checkpoint::Checkpoint;
use crate::error::{Class, Error};
use crate::hub::{locate, Role};
use crate::merge::{self, Direction, Options, Stats};

/// The program name in messages.
pub const PROGRAM: &str = "boft-merge";

/// Bake a BOFT/OFT adapter into a safetensors checkpoint (or take it out again with --unmerge).
#[derive(Parser)]
#[command(
    name = "boft-merge",
    version,
    after_help = "Example:\n  boft-merge --base fixtures/peft_boft/bases/llama_f32 \\\n             --adapter fixtures/peft_boft/adapters/llama_f32_f2 -o merged-llama\n\n\
The output keeps the base's layout (same files, shards, index and metadata); tensors the adapter\n\
does not touch are copied byte for byte. It is written under a temporary name and renamed into\n\
place only when complete. Exit status: 0 success, 2 error (one line on stderr)."
)]
pub struct Args {
    /// Base checkpoint: a .safetensors file; a folder with model.safetensors or
    /// model.safetensors.index.json and its shards; a diffusers pipeline folder (model_index.json;
    /// every component the adapter targets is merged); or a hub id org/name[@revision][/subfolder]
    /// found in the local Hugging Face cache.
    #[arg(long)]
    pub base: PathBuf,
    /// Adapter: a canonical .safetensors file, a PEFT adapter folder, a LyCORIS/kohya OFT
    /// .safetensors file, or a hub id org/name[@revision][/file] in the local Hugging Face cache.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Resolve adapter module names only among this component's tensors (unet, transformer,
    /// text_encoder, text_encoder_2, vae, or a pipeline's component folder), for names that
    /// several components share.
    #[arg(long)]
    pub component: Option<String>,
    /// Reader for the adapter: auto (detected), canonical, peft, peft-legacy-conv, lycoris, kohya.
    #[arg(long, value_enum, default_value = "auto", hide_possible_values = true)]
    pub from: super::values::From,
    /// Output: a folder when the base is a folder, a file when the base is a file.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Remove the adapter from a merged checkpoint instead of applying it.
    #[arg(long)]
    pub unmerge: bool,
    /// With --unmerge: leave tensors the adapter replaced outright (modules_to_save, trained
    /// biases) as they are instead of refusing; their originals are not in the adapter.
    #[arg(long, requires = "unmerge")]
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
    /// Apply the adapter at this strength (1 = as trained).
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
}

/// What a merge did.
pub struct Merged {
    /// What was written.
    pub stats: Stats,
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
        if !args.quiet {
            eprintln!(
                "{} {}: {} tensors transformed, {} replaced, {} copied; {} bytes of tensor data written on {}",
                if args.unmerge { "unmerged" } else { "merged" },
                args.output.display(),
                done.stats.transformed,
                done.stats.replaced,
                done.stats.copied,
                done.stats.bytes,
                done.backend
            );
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

/// The merge itself: no printing (but the progress bar, on a terminal, unless `quiet`), no exit.
pub fn run(args: &Args) -> Result<Merged, Error> {
    let backend = merge::Device::parse(&args.device)?.backend()?;
    let base_path = locate(&args.base, Role::Checkpoint)?;
    let adapter_path = locate(&args.adapter, Role::Adapter)?;
    let base = Checkpoint::open(&base_path)?;
    let source = args.from.into();
    let mut adapter = crate::formats::load_deferred_as(&adapter_path, source)?;
    merge::fit_in(&base, &mut adapter, true, args.component.as_deref())?;
    let bar = super::progress::Bar::new(!args.quiet);
    let opts = Options {
        direction: match (args.unmerge, args.keep_replaced) {
            (false, _) => Direction::Merge,
            (true, false) => Direction::Unmerge,
            (true, true) => Direction::UnmergeKeepReplaced,
        },
        progress: &bar,
        strength: Strength {
            t: args.strength,
            mode: args.strength_mode.into(),
        },
    };
    if !args.strength.is_finite() {
        return Err(Error::bare(
            Class::Usage,
            format!("--strength {}: expected a finite number", args.strength),
        ));
    }
    let stats = super::with_threads(args.threads, || {
        merge::merge_to(
            &base,
            &adapter,
            &args.output,
            &[&base_path, &adapter_path],
            args.force,
            backend.as_ref(),
            &opts,
        )
    })?;
    Ok(Merged {
        stats,
        backend: backend.name(),
    })
}
