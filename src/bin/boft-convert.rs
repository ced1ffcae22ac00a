use std::path::PathBuf;

use boft::adapter::canonical;
use boft::checkpoint::Checkpoint;
use boft::cli;
use clap::Parser;

/// Convert a BOFT/OFT adapter to the canonical format (docs/FORMAT.md).
#[derive(Parser)]
#[command(
    name = "boft-convert",
    version,
    after_help = "Example:\n  boft-convert fixtures/peft_boft/adapters/llama_f32_f2 -o llama_f2.safetensors\n\n\
With --base, every target is checked against the base checkpoint and its shape recorded.\n\
Exit status: 0 success, 2 error (one line on stderr)."
)]
struct Args {
    /// Adapter to read: a PEFT adapter folder or a canonical file.
    input: PathBuf,
    /// Canonical .safetensors file to write.
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
    /// Base checkpoint to resolve and check targets against.
    #[arg(long)]
    base: Option<PathBuf>,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
}

fn main() {
    let args: Args = cli::parse_args("boft-convert");
    cli::run("boft-convert", || {
        let mut adapter = boft::formats::load(&args.input)?;
        if let Some(b) = &args.base {
            let base = Checkpoint::open(b)?;
            boft::merge::resolve_shapes(&base, &mut adapter)?;
        }
        boft::output::check_destination(&args.output, &[&args.input], args.force)?;
        canonical::write(&adapter, &args.output)?;
        println!("{}", cli::summary(&adapter, &args.output));
        Ok(0)
    })
}
