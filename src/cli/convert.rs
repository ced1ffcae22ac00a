//! `boft-convert`: an adapter to the canonical format, or exported to PEFT or LyCORIS.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::adapter::canonical;
use crate::checkpoint::Checkpoint;
use crate::error::Error;
use crate::formats::{lycoris, peft};
use crate::hub::{locate, Role};

/// The program name in messages.
pub const PROGRAM: &str = "boft-convert";

/// `--to`: the format to write.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum To {
    /// The canonical file (docs/FORMAT.md).
    Canonical,
    /// A PEFT adapter folder: BOFT, or OFT (exact Cayley); input-side targets only.
    Peft,
    /// A LyCORIS diag-oft/boft .safetensors file; output-side targets only.
    Lycoris,
}

/// Convert a BOFT/OFT adapter to the canonical format (docs/FORMAT.md), or export it exactly to
/// PEFT or LyCORIS (docs/EXPORT.md).
#[derive(Parser)]
#[command(
    name = "boft-convert",
    version,
    after_help = "Examples:\n  boft-convert fixtures/peft_boft/adapters/llama_f32_f2 -o llama_f2.safetensors\n  \
boft-convert adapter.safetensors --to peft -o my-peft-adapter/ --base model/\n  \
boft-convert lycoris.safetensors --to lycoris -o out.safetensors --base unet/\n  \
boft-convert --compose A B 'C,strength=0.5,mode=geodesic' -o composed.safetensors --base model/\n\n\
--compose writes one adapter equal to applying its parts in order (docs/COMPOSE.md).\n\
With --base, every target is checked against the base checkpoint and its shape recorded (an\n\
export needs it for Conv2d layers and shared blocks). An export is exact or refused.\n\
Exit status: 0 success, 2 error (one line on stderr)."
)]
pub struct Args {
    /// Adapter to read: a PEFT adapter folder, a LyCORIS/kohya file or a canonical file.
    #[arg(required_unless_present = "compose")]
    pub input: Option<PathBuf>,
    /// Adapters to compose into one, applied in the order given (at least two; replaces the
    /// input): each PATH[,strength=T][,mode=per-factor|geodesic][,from=READER]. With --base their
    /// names are resolved against it first, so parts from different formats line up.
    #[arg(long, num_args = 1.., value_name = "ADAPTER", value_parser = super::values::AdapterSpecParser, conflicts_with = "input")]
    pub compose: Vec<super::values::AdapterSpec>,
    /// File (canonical, lycoris) or folder (peft) to write.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "canonical")]
    pub to: To,
    /// Reader for the input: auto (detected), canonical, peft, peft-legacy-conv, lycoris, kohya.
    #[arg(long, value_enum, default_value = "auto", hide_possible_values = true)]
    pub from: super::values::From,
    /// Base checkpoint to resolve and check targets against (a path, or a hub id
    /// org/name[@revision] in the local Hugging Face cache).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// With --base: resolve adapter module names only among this component's tensors (see
    /// boft-merge --help).
    #[arg(long, requires = "base")]
    pub component: Option<String>,
    /// --to peft: a module (e.g. model.embed_tokens) that is an nn.Embedding, which PEFT OFT
    /// stores as oft_embedding_R (found by itself when the input is a PEFT OFT folder).
    #[arg(long = "embedding", value_name = "MODULE")]
    pub embeddings: Vec<String>,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
}

/// What a conversion wrote.
pub struct Converted {
    /// `canonical`, or the export's kind (`PEFT BOFT`, `LyCORIS diag-oft`, ...).
    pub kind: String,
    /// The reader that took the input.
    pub source_format: String,
    /// The source library's version, when known.
    pub source_version: String,
    /// Targets written.
    pub targets: usize,
    /// Replaced tensors written.
    pub replaced: usize,
    /// The line the command prints on stdout.
    pub message: String,
}

/// The command: parse `argv` (program name first), run, report; returns the exit code.
pub fn main<I, T>(argv: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    super::main_with(PROGRAM, argv, |args: &Args| {
        println!("{}", run(args)?.message);
        Ok(0)
    })
}

/// The conversion itself: no printing, no exit.
pub fn run(args: &Args) -> Result<Converted, Error> {
    let base = match &args.base {
        Some(b) => Some(Checkpoint::open(&locate(b, Role::Checkpoint)?)?),
        None => None,
    };
    let component = args.component.as_deref();
    let mut inputs = Vec::new();
    let mut adapter = match &args.input {
        Some(path) => {
            let input = locate(path, Role::Adapter)?;
            let adapter = crate::formats::load_as(&input, args.from.into())?;
            inputs.push(input);
            adapter
        }
        None => {
            if args.compose.len() < 2 {
                return Err(Error::bare(
                    crate::error::Class::Usage,
                    "--compose takes at least two adapters (see boft-convert --help)",
                ));
            }
            let mut parts = Vec::with_capacity(args.compose.len());
            for spec in &args.compose {
                let path = locate(&spec.path, Role::Adapter)?;
                let mut a = crate::formats::load_as(&path, spec.from.unwrap_or(args.from).into())?;
                if let Some(base) = &base {
                    crate::merge::fit_in(base, &mut a, true, component)?;
                }
                let strength = crate::adapter::Strength {
                    t: spec.strength.unwrap_or(1.0),
                    mode: spec.mode.unwrap_or(super::values::Mode::Linear).into(),
                };
                parts.push((a, strength, path.clone()));
                inputs.push(path);
            }
            crate::adapter::compose::compose(&parts)?
        }
    };
    let sources = inputs.clone();
    if let Some(base) = &base {
        crate::merge::resolve_shapes(base, &mut adapter, component)?;
        inputs.extend(base.input_paths());
    }
    let inputs: Vec<PathBuf> = inputs
        .iter()
        .flat_map(|p| crate::formats::read_alongside(p))
        .collect();
    let inputs: Vec<&std::path::Path> = inputs.iter().map(PathBuf::as_path).collect();
    crate::output::check_destination(&args.output, &inputs, args.force)?;
    let done = match args.to {
        To::Canonical => {
            canonical::write(&adapter, &args.output)?;
            return Ok(Converted {
                kind: "canonical".into(),
                source_format: adapter.source_format.clone(),
                source_version: adapter.source_version.clone(),
                targets: adapter.targets.len(),
                replaced: adapter.replacements.len(),
                message: super::summary(&adapter, &args.output),
            });
        }
        To::Peft => {
            // Every PEFT source's embedding modules, a composed adapter's parts included.
            let mut emb: BTreeSet<String> = sources
                .iter()
                .flat_map(|p| peft::export::peft_embedding_modules(p))
                .collect();
            emb.extend(args.embeddings.iter().cloned());
            peft::export::write_peft(&adapter, &args.output, &emb)?
        }
        To::Lycoris => lycoris::export::write_lycoris(&adapter, &args.output)?,
    };
    let version = super::version_suffix(&adapter);
    let message = format!(
        "wrote {}: {} targets from {}{version} as {}, {} replaced tensors",
        args.output.display(),
        done.targets,
        adapter.source_format,
        done.kind,
        done.replaced
    );
    Ok(Converted {
        kind: done.kind,
        source_format: adapter.source_format.clone(),
        source_version: adapter.source_version.clone(),
        targets: done.targets,
        replaced: done.replaced,
        message,
    })
}
