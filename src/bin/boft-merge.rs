use std::path::PathBuf;

use boft::checkpoint::Checkpoint;
use boft::cli;
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
    /// Base checkpoint: a .safetensors file, or a folder with model.safetensors or
    /// model.safetensors.index.json and its shards.
    #[arg(long)]
    base: PathBuf,
    /// Adapter: a canonical .safetensors file or a PEFT adapter folder.
    #[arg(long)]
    adapter: PathBuf,
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
    /// Print nothing but errors.
    #[arg(short, long)]
    quiet: bool,
}

fn main() {
    let args: Args = cli::parse_args("boft-merge");
    cli::run("boft-merge", || {
        let backend = cli::backend(&args.device)?;
        let base = Checkpoint::open(&args.base)?;
        let mut adapter = boft::formats::load_deferred(&args.adapter)?;
        merge::fit(&base, &mut adapter)?;
        let opts = Options {
            direction: match (args.unmerge, args.keep_replaced) {
                (false, _) => Direction::Merge,
                (true, false) => Direction::Unmerge,
                (true, true) => Direction::UnmergeKeepReplaced,
            },
            progress: !args.quiet,
        };
        let stats = cli::with_threads(args.threads, || {
            merge::merge_to(
                &base,
                &adapter,
                &args.output,
                &[&args.base, &args.adapter],
                args.force,
                backend.as_ref(),
                &opts,
            )
        })?;
        if !args.quiet {
            eprintln!(
                "{} {}: {} tensors transformed, {} replaced, {} copied ({} bytes) on {}",
                if args.unmerge { "unmerged" } else { "merged" },
                args.output.display(),
                stats.transformed,
                stats.replaced,
                stats.copied,
                stats.bytes,
                backend.name()
            );
        }
        Ok(0)
    })
}
