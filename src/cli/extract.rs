//! `boft-extract`: fit an OFT/BOFT adapter to a fine-tuned checkpoint, or measure how much of
//! the fine-tune each structure can hold (`--sweep`). docs/EXTRACT.md.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::{Parser, ValueEnum};
use serde::Serialize;

use super::convert::To;
use crate::adapter::{canonical, Side};
use crate::checkpoint::Checkpoint;
use crate::error::{Class, Error};
use crate::extract::{self, Destination, Report, Settings, SweepReport};
use crate::formats::{lycoris, peft};
use crate::hub::{locate, Role};

/// The program name in messages.
pub const PROGRAM: &str = "boft-extract";

/// `--side`: which axis the fitted rotation mixes.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SideArg {
    /// Columns (input features), as PEFT BOFT and OFT rotate: W' = W·Mᵀ.
    Input,
    /// Rows (output features), as LyCORIS and kohya rotate: W' = M·W.
    Output,
}

impl From<SideArg> for Side {
    fn from(s: SideArg) -> Side {
        match s {
            SideArg::Input => Side::Input,
            SideArg::Output => Side::Output,
        }
    }
}

/// Fit an orthogonal (OFT/BOFT) adapter that turns a base checkpoint into a fine-tuned one, and
/// report how much of the fine-tune it captures (docs/EXTRACT.md).
#[derive(Parser)]
#[command(
    name = "boft-extract",
    version,
    after_help = "Examples:\n  \
boft-extract --base base/ --tuned tuned/ -o oft.safetensors --side input --block-size 8\n  \
boft-extract --base base/ --tuned tuned/ -o peft-boft/ --side input --block-size 8 --factors 2 --row-scale --to peft\n  \
boft-extract --base base/ --tuned tuned/ -o lyco.safetensors --side output --block-size 8 --to lycoris\n  \
boft-extract --base base/ --tuned tuned/ --side input --sweep b=4,8,16,32,m=1,2,3 -o sweep.png\n\n\
Targets: every 2-D/4-D weight that differs between the checkpoints (less --exclude).\n\
Captured share = 1 − ‖T − F(B)‖² / ‖T − B‖²; relative residual = ‖T − F(B)‖ / ‖T‖.\n\
--sweep fits every (b, m) in one run over the data and writes nothing but the plot (-o, a .png).\n\
Exit status: 0 success, 2 error (one line on stderr)."
)]
pub struct Args {
    /// The checkpoint before fine-tuning (a file, a folder, or a hub id in the local cache).
    #[arg(long)]
    pub base: PathBuf,
    /// The fine-tuned checkpoint: the same tensor names and shapes.
    #[arg(long)]
    pub tuned: PathBuf,
    /// Where to write the adapter (a file; a folder for --to peft); with --sweep, the PNG plot.
    #[arg(short = 'o', long = "output", required_unless_present = "sweep")]
    pub output: Option<PathBuf>,
    /// Which axis the rotation mixes: input (PEFT) or output (LyCORIS, kohya).
    #[arg(long, value_enum)]
    pub side: SideArg,
    /// Size of each orthogonal block b.
    #[arg(long, required_unless_present = "sweep", conflicts_with = "sweep")]
    pub block_size: Option<usize>,
    /// Butterfly factors m (1: OFT).
    #[arg(long, default_value_t = 1, conflicts_with = "sweep")]
    pub factors: usize,
    /// Also fit a per-output-row scale (PEFT BOFT's boft_s, OFT v1's oft_s, LyCORIS rescale).
    #[arg(long)]
    pub row_scale: bool,
    /// Output format: canonical (any structure), peft (input side) or lycoris (output side).
    #[arg(
        long,
        value_enum,
        default_value = "canonical",
        conflicts_with = "sweep"
    )]
    pub to: To,
    /// Fit several structures and report them instead of writing an adapter:
    /// b=SIZES,m=FACTORS, e.g. b=4,8,16,m=1,2 (m defaults to 1).
    #[arg(long, value_name = "b=…,m=…")]
    pub sweep: Option<String>,
    /// Leave out tensors whose name contains this (repeatable), e.g. embed_tokens.
    #[arg(long, value_name = "SUBSTRING")]
    pub exclude: Vec<String>,
    /// Stop a fit when a sweep raises its captured share by less than this.
    #[arg(long, default_value_t = 1e-4)]
    pub tol: f64,
    /// Most sweeps of block-coordinate descent per tensor.
    #[arg(long, default_value_t = 50)]
    pub max_sweeps: usize,
    /// --sweep: compute the dense Procrustes ceiling when every rotated axis is at most this
    /// long (it costs n³ per tensor).
    #[arg(long, default_value_t = 1024, value_name = "FEATURES")]
    pub ceiling_max: usize,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
}

/// What a run produced.
pub enum Extracted {
    /// An adapter, written.
    Adapter {
        /// What was fitted.
        report: Report,
        /// Where the adapter was written.
        output: PathBuf,
        /// The format it was written as.
        kind: String,
    },
    /// A sweep (and its plot, if asked for).
    Sweep {
        /// What was fitted.
        report: SweepReport,
        /// The plot written, if any.
        plot: Option<PathBuf>,
    },
}

/// The command: parse `argv` (program name first), run, report; returns the exit code.
pub fn main<I, T>(argv: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    super::main_with(PROGRAM, argv, |args: &Args| {
        let done = run(args)?;
        print!("{}", render(&done, args.json));
        Ok(0)
    })
}

fn usage(msg: impl Into<String>) -> Error {
    Error::bare(
        Class::Usage,
        format!("{} (see {PROGRAM} --help)", msg.into()),
    )
}

/// `b=4,8,m=1,2` → ([4, 8], [1, 2]).
pub fn parse_sweep(text: &str) -> Result<(Vec<usize>, Vec<usize>), Error> {
    let (mut sizes, mut factors) = (Vec::new(), Vec::new());
    let mut current: Option<char> = None;
    for piece in text.split(',') {
        let piece = piece.trim();
        let value = if let Some(v) = piece.strip_prefix("b=") {
            current = Some('b');
            v
        } else if let Some(v) = piece.strip_prefix("m=") {
            current = Some('m');
            v
        } else {
            piece
        };
        let v: usize =
            value.parse().ok().filter(|&v| v > 0).ok_or_else(|| {
                usage(format!("--sweep: {piece:?} is not a positive whole number"))
            })?;
        match current {
            Some('b') => sizes.push(v),
            Some('m') => factors.push(v),
            _ => return Err(usage("--sweep starts with b= (e.g. b=4,8,16,m=1,2)")),
        }
    }
    if sizes.is_empty() {
        return Err(usage("--sweep names no block size (b=…)"));
    }
    if factors.is_empty() {
        factors.push(1);
    }
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.len() * factors.len() > 256 {
        return Err(usage("--sweep asks for more than 256 structures"));
    }
    Ok((sizes, factors))
}

/// The extraction itself: no printing (but the progress bar), no exit.
pub fn run(args: &Args) -> Result<Extracted, Error> {
    let side: Side = args.side.into();
    let destination = match args.to {
        To::Canonical => Destination::Canonical,
        To::Peft if side == Side::Output => {
            return Err(usage(
                "--to peft writes input-side adapters (PEFT BOFT/OFT); use --side input",
            ))
        }
        To::Peft => Destination::Peft,
        To::Lycoris if side == Side::Input => {
            return Err(usage(
                "--to lycoris writes output-side adapters (diag-oft/boft); use --side output",
            ))
        }
        To::Lycoris => Destination::Lycoris,
    };
    if !(args.tol >= 0.0 && args.tol.is_finite()) {
        return Err(usage("--tol must be a finite number ≥ 0"));
    }
    if args.max_sweeps == 0 || args.factors == 0 {
        return Err(usage("--max-sweeps and --factors must be at least 1"));
    }
    if args.factors > crate::adapter::MAX_FACTORS {
        return Err(usage(format!(
            "--factors {} is more than the limit of {}",
            args.factors,
            crate::adapter::MAX_FACTORS
        )));
    }
    let sweep = args.sweep.as_deref().map(parse_sweep).transpose()?;
    let widest = sweep
        .as_ref()
        .map(|(sizes, _)| {
            sizes
                .iter()
                .copied()
                .max()
                .unwrap_or(0)
                .max(args.ceiling_max)
        })
        .or(args.block_size)
        .unwrap_or(0);
    if widest > extract::MAX_BLOCK {
        return Err(usage(format!(
            "a block of {widest} (--block-size, --sweep b= or --ceiling-max) is more than the \
             limit of {}: each costs b³ to solve and n·b to accumulate per thread",
            extract::MAX_BLOCK
        )));
    }
    if let (Some(_), Some(o)) = (&sweep, &args.output) {
        if o.extension().and_then(|e| e.to_str()) != Some("png") {
            return Err(usage(
                "with --sweep, -o names the plot to write: a .png file",
            ));
        }
    }
    let base = Checkpoint::open(&locate(&args.base, Role::Checkpoint)?)?;
    let tuned = Checkpoint::open(&locate(&args.tuned, Role::Checkpoint)?)?;
    let inputs: Vec<PathBuf> = base
        .input_paths()
        .into_iter()
        .chain(tuned.input_paths())
        .collect();
    let inputs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    if let Some(o) = &args.output {
        crate::output::check_destination(o, &inputs, args.force)?;
    }
    let settings = Settings {
        side,
        row_scale: args.row_scale,
        tol: args.tol,
        max_sweeps: args.max_sweeps,
        exclude: args.exclude.clone(),
        destination,
    };
    let bar = super::progress::Bar::new(!args.quiet);
    if let Some((sizes, factors)) = sweep {
        let report = super::with_threads(args.threads, || {
            extract::sweep(
                &base,
                &tuned,
                &settings,
                &sizes,
                &factors,
                args.ceiling_max,
                &bar,
            )
        })?;
        if let Some(o) = &args.output {
            let png = super::plot::png(
                &plot_title(&report),
                &plot_series(&report),
                ceiling_point(&report).as_ref(),
            );
            crate::output::write_file_atomic(o, &png)?;
        }
        return Ok(Extracted::Sweep {
            report,
            plot: args.output.clone(),
        });
    }
    let h = args.block_size.expect("clap requires it without --sweep");
    if h == 0 {
        return Err(usage("--block-size must be at least 1"));
    }
    let (adapter, report) = super::with_threads(args.threads, || {
        extract::extract(&base, &tuned, &settings, h, args.factors, &bar)
    })?;
    let output = args
        .output
        .clone()
        .expect("clap requires it without --sweep");
    if adapter.targets.is_empty() {
        return Err(Error::bare(
            Class::Usage,
            format!(
                "no tensor could be fitted ({} changed tensors skipped: {}); nothing written",
                report.skipped.len(),
                report
                    .skipped
                    .first()
                    .map(|s| format!("{}: {}", s.name, s.reason))
                    .unwrap_or_else(|| "the checkpoints are equal".into())
            ),
        ));
    }
    let kind = match args.to {
        To::Canonical => {
            canonical::write(&adapter, &output)?;
            "canonical".to_string()
        }
        To::Peft => peft::export::write_peft(&adapter, &output, &Default::default())?.kind,
        To::Lycoris => lycoris::export::write_lycoris(&adapter, &output)?.kind,
    };
    Ok(Extracted::Adapter {
        report,
        output,
        kind,
    })
}

fn plot_title(r: &SweepReport) -> String {
    format!(
        "{} side{}: captured share of the fine-tune",
        match r.side {
            Side::Input => "input",
            Side::Output => "output",
        },
        if r.row_scale { ", row scale" } else { "" }
    )
}

fn plot_series(r: &SweepReport) -> Vec<super::plot::Series> {
    let mut ms: Vec<usize> = r.rows.iter().map(|x| x.factors).collect();
    ms.sort_unstable();
    ms.dedup();
    ms.iter()
        .map(|&m| super::plot::Series {
            label: format!("m={m}"),
            points: r
                .rows
                .iter()
                .filter(|x| x.factors == m && x.unfit.is_empty())
                .map(|x| super::plot::Point {
                    x: x.total.measure.parameters as f64,
                    y: x.total.measure.captured,
                    tag: format!("b={}", x.block_size),
                })
                .collect(),
        })
        .collect()
}

fn ceiling_point(r: &SweepReport) -> Option<super::plot::Point> {
    r.ceiling.as_ref().map(|c| super::plot::Point {
        x: c.measure.parameters as f64,
        y: c.measure.captured,
        tag: "dense Procrustes".into(),
    })
}

#[derive(Serialize)]
struct AdapterJson<'a> {
    output: &'a Path,
    written_as: &'a str,
    #[serde(flatten)]
    report: &'a Report,
}

#[derive(Serialize)]
struct SweepJson<'a> {
    plot: Option<&'a Path>,
    #[serde(flatten)]
    report: &'a SweepReport,
}

/// What the command prints.
pub fn render(done: &Extracted, json: bool) -> String {
    let mut s = String::new();
    match done {
        Extracted::Adapter {
            report,
            output,
            kind,
        } => {
            if json {
                let j = AdapterJson {
                    output,
                    written_as: kind,
                    report,
                };
                return serde_json::to_string_pretty(&j).expect("serialisable") + "\n";
            }
            let _ = writeln!(
                s,
                "{:<48} {:>6} {:>9} {:>9} {:>6} {:>9} {:>8}",
                "tensor", "n", "captured", "rel.res", "sweeps", "angle°", "max°"
            );
            for t in &report.tensors {
                let _ = writeln!(
                    s,
                    "{:<48} {:>6} {:>9.6} {:>9.2e} {:>6} {:>9.3} {:>8.3}",
                    t.name,
                    t.n,
                    t.measure.captured,
                    t.measure.relative_residual,
                    t.sweeps,
                    t.angle_mean_deg,
                    t.angle_max_deg
                );
            }
            for k in &report.skipped {
                let _ = writeln!(s, "{:<48} skipped: {}", k.name, k.reason);
            }
            let t = &report.total;
            let _ = writeln!(
                s,
                "total: {} tensors, {} parameters, captured {:.6}, relative residual {:.3e}",
                t.tensors, t.measure.parameters, t.measure.captured, t.measure.relative_residual
            );
            let _ = writeln!(
                s,
                "wrote {}: {} targets as {kind} ({} side, b = {}, m = {}{})",
                output.display(),
                t.tensors,
                match report.side {
                    Side::Input => "input",
                    Side::Output => "output",
                },
                report.block_size,
                report.factors,
                if report.row_scale { ", row scale" } else { "" }
            );
        }
        Extracted::Sweep { report, plot } => {
            if json {
                let j = SweepJson {
                    plot: plot.as_deref(),
                    report,
                };
                return serde_json::to_string_pretty(&j).expect("serialisable") + "\n";
            }
            let _ = writeln!(
                s,
                "{:>6} {:>3} {:>12} {:>10} {:>10} {:>7} {:>6}",
                "b", "m", "parameters", "captured", "rel.res", "sweeps", "unfit"
            );
            for r in &report.rows {
                let _ = writeln!(
                    s,
                    "{:>6} {:>3} {:>12} {:>10.6} {:>10.3e} {:>7} {:>6}",
                    r.block_size,
                    r.factors,
                    r.total.measure.parameters,
                    r.total.measure.captured,
                    r.total.measure.relative_residual,
                    r.max_sweeps,
                    r.unfit.len()
                );
            }
            match &report.ceiling {
                Some(c) => {
                    let _ = writeln!(
                        s,
                        "{:>6} {:>3} {:>12} {:>10.6} {:>10.3e}   dense orthogonal Procrustes (ceiling)",
                        "n", 1, c.measure.parameters, c.measure.captured, c.measure.relative_residual
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        "ceiling not computed: some rotated axis is longer than --ceiling-max {}",
                        report.ceiling_max_features
                    );
                }
            }
            for k in &report.skipped {
                let _ = writeln!(s, "skipped {}: {}", k.name, k.reason);
            }
            if let Some(p) = plot {
                let _ = writeln!(s, "wrote {}", p.display());
            }
        }
    }
    s
}
