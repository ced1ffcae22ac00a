use std::path::PathBuf;

use boft::adapter::{Strength, StrengthMode};
use boft::checkpoint::Checkpoint;
use boft::cli;
use boft::hub::{locate, Role};
use boft::merge::{self, Direction, Options};
use clap::Parser;

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
struct Args {
    /// Base checkpoint: a .safetensors file; a folder with model.safetensors or
    /// model.safetensors.index.json and its shards; a diffusers pipeline folder (model_index.json;
    /// every component the adapter targets is merged); or a hub id org/name[@revision][/subfolder]
    /// found in the local Hugging Face cache.
    #[arg(long)]
    base: PathBuf,
    /// Adapter: a canonical .safetensors file, a PEFT adapter folder, a LyCORIS/kohya OFT
    /// .safetensors file, or a hub id org/name[@revision][/file] in the local Hugging Face cache.
    #[arg(long)]
    adapter: PathBuf,
    /// Resolve adapter module names only among this component's tensors (unet, transformer,
    /// text_encoder, text_encoder_2, vae, or a pipeline's component folder), for names that
    /// several components share.
    #[arg(long)]
    component: Option<String>,
    /// Reader for the adapter: auto (detected), canonical, peft, peft-legacy-conv, lycoris, kohya.
    #[arg(long, default_value = "auto")]
    from: String,
    /// Output: a folder when the base is a folder, a file when the base is a file.
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
    /// Remove the adapter from a merged checkpoint instead of applying it.
    #[arg(long)]
    unmerge: bool,
    /// With --unmerge: leave tensors the adapter replaced outright (modules_to_save, trained
    /// biases) as they are instead of refusing; their originals are not in the adapter.
    #[arg(long, requires = "unmerge")]
    keep_replaced: bool,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Where to compute: cpu (default), or cuda[:N] when built with the cuda feature.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Apply the adapter at this strength (1 = as trained).
    #[arg(long, default_value_t = 1.0)]
    strength: f64,
    /// How a strength other than 1 is applied: linear (W + t·(F(W) − W), what A1111 and kohya do),
    /// per-factor (each block tB + (1 − t)I, what LyCORIS does), geodesic (each rotation to the
    /// power t: exactly orthogonal, two merges at t = ½ equal one at 1 for block-diagonal
    /// adapters). docs/STRENGTH.md says which tool each mode reproduces.
    #[arg(long, value_enum, default_value = "linear")]
    strength_mode: Mode,
    /// Print nothing but errors.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Mode {
    Linear,
    PerFactor,
    Geodesic,
}

fn main() {
    let args: Args = cli::parse_args("boft-merge");
    cli::run("boft-merge", || {
        let backend = cli::backend(&args.device)?;
        let base_path = locate(&args.base, Role::Checkpoint)?;
        let adapter_path = locate(&args.adapter, Role::Adapter)?;
        let base = Checkpoint::open(&base_path)?;
        let source = boft::formats::Source::parse(&args.from)?;
        let mut adapter = boft::formats::load_deferred_as(&adapter_path, source)?;
        merge::fit_in(&base, &mut adapter, true, args.component.as_deref())?;
        let opts = Options {
            direction: match (args.unmerge, args.keep_replaced) {
                (false, _) => Direction::Merge,
                (true, false) => Direction::Unmerge,
                (true, true) => Direction::UnmergeKeepReplaced,
            },
            progress: !args.quiet,
            strength: Strength {
                t: args.strength,
                mode: match args.strength_mode {
                    Mode::Linear => StrengthMode::Linear,
                    Mode::PerFactor => StrengthMode::PerFactor,
                    Mode::Geodesic => StrengthMode::Geodesic,
                },
            },
        };
        if !args.strength.is_finite() {
            return Err(boft::Error::bare(
                boft::Class::Usage,
                format!("--strength {}: expected a finite number", args.strength),
            ));
        }
        let stats = cli::with_threads(args.threads, || {
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
        if !args.quiet {
            eprintln!(
                "{} {}: {} tensors transformed, {} replaced, {} copied; {} bytes of tensor data written on {}",
                if args.unmerge { "unmerged" } else { "merged" },
                args.output.display(),
                stats.transformed,
                stats.replaced,
                stats.copied,
                stats.bytes,
                backend.name()
            );
            if !stats.left_out.is_empty() {
                let names: Vec<String> = stats
                    .left_out
                    .iter()
                    .take(3)
                    .map(|p| p.display().to_string())
                    .collect();
                eprintln!(
                    "left out {} weight file(s) that are not part of the checkpoint and would be \
                     stale: {}{}",
                    stats.left_out.len(),
                    names.join(", "),
                    if stats.left_out.len() > 3 {
                        ", …"
                    } else {
                        ""
                    }
                );
            }
        }
        Ok(0)
    })
}
