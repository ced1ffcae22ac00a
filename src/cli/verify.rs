//! `boft-verify`: check adapters, their fit to a base, and a merged checkpoint.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

use crate::checkpoint::Checkpoint;
use crate::error::{Class, Error};
use crate::verify::{self, Report, Settings};

pub const PROGRAM: &str = "boft-verify";

/// Check the orthogonality and expressivity of BOFT/OFT adapters, their fit to a base
/// checkpoint, and that a merged checkpoint really is base ⊕ adapter.
#[derive(Parser)]
#[command(
    name = "boft-verify",
    version,
    after_help = "Examples:\n  boft-verify fixtures/peft_boft/adapters/llama_f32_f2\n  \
boft-verify adapter.safetensors --base base/ --merged merged/ --json\n\n\
Checks: finite, geometry, block-orthogonality, determinant, transform-orthogonality,\n\
connectivity, degrees-of-freedom, distance-from-identity, scale-range, target-present,\n\
base-compatible, hyperspherical-energy, merged-layout, merged-untouched, merged-values.\n\
Exit status: 0 all checks pass, 1 a check failed (named in the report), 2 unreadable input or\n\
usage error. The JSON schema is docs/verify-schema.json."
)]
pub struct Args {
    /// Adapters: canonical files, PEFT adapter folders, LyCORIS/kohya OFT files.
    #[arg(required = true)]
    pub adapters: Vec<PathBuf>,
    /// Reader for the adapters: auto (detected), canonical, peft, peft-legacy-conv, lycoris, kohya.
    #[arg(long, default_value = "auto")]
    pub from: String,
    /// Base checkpoint to check targets against.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Merged checkpoint to prove equal to base ⊕ adapter (needs --base and one adapter).
    #[arg(long)]
    pub merged: Option<PathBuf>,
    /// Print one JSON document on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Orthogonality tolerance for exact (Cayley) blocks.
    #[arg(long, default_value_t = 1e-5)]
    pub tolerance: f64,
    /// Relative tolerance for f32 merged values (16-bit types use one ulp).
    #[arg(long, default_value_t = 1e-5)]
    pub merged_tolerance: f64,
    /// Only run these checks (comma-separated ids).
    #[arg(long)]
    pub checks: Option<String>,
}

/// The command: parse `argv` (program name first), run, print the table or the JSON; returns
/// 0 when every check passed, 1 when one failed, 2 on an error.
pub fn main<I, T>(argv: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    super::main_with(PROGRAM, argv, |args: &Args| {
        let report = run(args)?;
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).expect("report serialises")
            );
        } else {
            print!("{}", verify::render(&report));
        }
        Ok(if report.passed { 0 } else { 1 })
    })
}

/// The checks themselves: the report (failed checks included), or an error for input that
/// cannot be checked at all. No printing, no exit.
pub fn run(args: &Args) -> Result<Report, Error> {
    let mut settings = Settings {
        tolerance: args.tolerance,
        merged_tolerance: args.merged_tolerance,
        ..Settings::default()
    };
    if let Some(c) = &args.checks {
        settings.checks = Some(Settings::parse_checks(c)?);
    }
    if args.merged.is_some() && (args.base.is_none() || args.adapters.len() != 1) {
        return Err(Error::bare(
            Class::Usage,
            "--merged needs --base and exactly one adapter",
        ));
    }
    let base = args.base.as_deref().map(Checkpoint::open).transpose()?;
    let merged = args.merged.as_deref().map(Checkpoint::open).transpose()?;
    let mut adapters = Vec::new();
    for a in &args.adapters {
        let mut adapter =
            crate::formats::load_deferred_as(a, crate::formats::Source::parse(&args.from)?)?;
        if let Some(b) = &base {
            // Names, shared and cropped blocks and some sources' arithmetic follow the base.
            // Unresolvable names are reported by the target-present check.
            crate::merge::fit_with(b, &mut adapter, false)?;
        }
        adapter.materialise()?;
        adapters.push((a.display().to_string(), adapter));
    }
    verify::verify(&adapters, base.as_ref(), merged.as_ref(), &settings)
}
