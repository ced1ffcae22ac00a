//! `boft-verify`: check adapters, their fit to a base, and a merged checkpoint.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

use crate::checkpoint::Checkpoint;
use crate::error::{Class, Error};
use crate::hub::{locate, Role};
use crate::verify::{self, Report, Settings};

/// The program name in messages.
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
base-compatible, hyperspherical-energy, merged-layout, merged-tensors, merged-untouched,\n\
merged-values, restored-values. A selected check with nothing to examine fails.\n\
Exit status: 0 all checks pass, 1 a check failed (named in the report), 2 unreadable input or\n\
usage error. The JSON schema is docs/verify-schema.json."
)]
pub struct Args {
    /// Adapters: canonical files, PEFT adapter folders, LyCORIS/kohya OFT files.
    #[arg(required = true)]
    pub adapters: Vec<PathBuf>,
    /// Reader for the adapters: auto (detected), canonical, peft, peft-legacy-conv, lycoris, kohya.
    #[arg(long, value_enum, default_value = "auto", hide_possible_values = true)]
    pub from: super::values::From,
    /// Base checkpoint to check targets against (a path, or a hub id org/name[@revision] in the
    /// local Hugging Face cache).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Resolve adapter module names only among this component's tensors (see boft-merge --help).
    #[arg(long)]
    pub component: Option<String>,
    /// Merged checkpoint to prove equal to base ⊕ adapter, by tensor name, whatever its
    /// sharding (needs --base and one adapter).
    #[arg(long)]
    pub merged: Option<PathBuf>,
    /// Un-merged checkpoint (boft-merge --unmerge of a merge) to prove equal to the --base
    /// within the rounding of the merged tensors (needs --base and one adapter).
    #[arg(long, conflicts_with = "merged")]
    pub restored: Option<PathBuf>,
    /// Fail unless the merged/restored checkpoint has the base's files and the same
    /// headers (as boft-merge writes); otherwise the layout is only reported.
    #[arg(long)]
    pub same_layout: bool,
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
        same_layout: args.same_layout,
        ..Settings::default()
    };
    if let Some(c) = &args.checks {
        settings.checks = Some(Settings::parse_checks(c)?);
    }
    if (args.merged.is_some() || args.restored.is_some())
        && (args.base.is_none() || args.adapters.len() != 1)
    {
        return Err(Error::bare(
            Class::Usage,
            "--merged/--restored need --base and exactly one adapter",
        ));
    }
    let open = |p: &PathBuf| Checkpoint::open(&locate(p, Role::Checkpoint)?);
    let base = args.base.as_ref().map(open).transpose()?;
    let second = match (&args.merged, &args.restored) {
        (Some(m), _) => Some((open(m)?, verify::Proof::Merged)),
        (_, Some(r)) => Some((open(r)?, verify::Proof::Restored)),
        _ => None,
    };
    let mut adapters = Vec::new();
    for a in &args.adapters {
        let path = locate(a, Role::Adapter)?;
        let mut adapter = crate::formats::load_deferred_as(&path, args.from.into())?;
        if let Some(b) = &base {
            // Names, shared and cropped blocks and some sources' arithmetic follow the base.
            // Unresolvable names are reported by the target-present check.
            crate::merge::fit_in(b, &mut adapter, false, args.component.as_deref())?;
        }
        adapter.materialise()?;
        adapters.push((a.display().to_string(), adapter));
    }
    verify::verify(
        &adapters,
        base.as_ref(),
        second.as_ref().map(|(c, p)| (c, *p)),
        &settings,
    )
}
