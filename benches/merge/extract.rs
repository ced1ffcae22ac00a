//! The extraction measurements of `run`: `boft-extract` fitting an orthogonal adapter to a
//! fine-tune, timed beside `boft-merge` on the same files. Reported in BENCHMARKS-extract.md.
//!
//! What: the fine-tuned checkpoint is the base merged with the generated adapter (PEFT BOFT,
//! `boft_s` row scale), made once, untimed (the copy the un-merge row reads). On it, in the same
//! repeats and cache states as the floor copies and the merge, `boft-extract --side input` with
//! the adapter's block size and `--row-scale` fits plain OFT (one factor) and BOFT with two
//! butterfly factors; every row records wall time, CPU time and peak anonymous memory as
//! `measure` measures any child. Each fit also runs once more, untimed, with `--json`, for the
//! captured share of the fine-tune (`total.captured`) and the most sweeps of block-coordinate
//! descent any tensor took (`tensors[].sweeps`).
//!
//! Why: a merge reads one checkpoint and applies a known transform in one pass; an extraction
//! reads two and iterates a fit per tensor, so it cannot be as fast, but it should stay within a
//! small multiple of the merge (OFT ≤ 3×, BOFT with two factors ≤ 20×) and hold memory per tensor
//! like the merge does, not per model. The generated fine-tune is exactly a BOFT of that
//! geometry, so the BOFT fit should capture nearly all of it (bf16 rounding of the tuned weights
//! aside) and the OFT fit only part: the captured share tells a fast fit from one that gave up.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::gen::Generated;
use crate::measure::{self, Sample};
use crate::run::Ctx;

/// The binary's name; it is looked for beside the `boft-merge` measured.
pub const BIN: &str = "boft-extract";

/// One extraction measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `--factors 1` without `--row-scale`: a pure rotation, one exact Procrustes step.
    OftPlain,
    /// `--factors 1`: block-diagonal OFT.
    Oft,
    /// `--factors 2`: BOFT with two butterfly factors.
    Boft,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::OftPlain, Kind::Oft, Kind::Boft];

    pub fn key(self) -> &'static str {
        match self {
            Kind::OftPlain => "extract_oft_plain",
            Kind::Oft => "extract_oft",
            Kind::Boft => "extract_boft",
        }
    }

    /// Butterfly factors fitted (`--factors`).
    pub fn factors(self) -> usize {
        match self {
            Kind::OftPlain | Kind::Oft => 1,
            Kind::Boft => 2,
        }
    }

    /// Whether `--row-scale` is fitted (the generated adapter has PEFT's `boft_s`).
    pub fn row_scale(self) -> bool {
        self != Kind::OftPlain
    }

    /// Target: median wall time at most this many times the merge's (same cache state).
    pub fn target(self) -> f64 {
        match self {
            Kind::OftPlain | Kind::Oft => 3.0,
            Kind::Boft => 20.0,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::OftPlain => "OFT (m = 1), no scale",
            Kind::Oft => "OFT (m = 1)",
            Kind::Boft => "BOFT (m = 2)",
        }
    }
}

/// The command line of `kind` at `block_size`, for the report (paths shortened to B, T, OUT).
pub fn shown(kind: Kind, block_size: usize) -> String {
    format!(
        "{BIN} --base B --tuned T -o OUT.safetensors --side input --block-size {block_size} \
         --factors {}{} -q",
        kind.factors(),
        if kind.row_scale() { " --row-scale" } else { "" }
    )
}

/// Is `mode` (a row's) one of the extraction measurements?
pub fn is_extract(mode: &str) -> bool {
    Kind::ALL.iter().any(|k| k.key() == mode)
}

/// `boft-extract` beside the `boft-merge` binary `merge_bin`.
pub fn find_bin(merge_bin: &Path) -> Result<PathBuf> {
    let p = merge_bin.with_file_name(BIN);
    if !p.is_file() {
        bail!(
            "{} does not exist (looked beside --bin {}); build it with cargo build --release, \
             or pass --no-extract",
            p.display(),
            merge_bin.display()
        );
    }
    Ok(p)
}

/// What the untimed `--json` run of one extraction reported.
#[derive(Clone, Debug)]
pub struct Fit {
    pub kind: Kind,
    /// `total.captured`: 1 − ‖T − F(B)‖² / ‖T − B‖² over all targets.
    pub captured: f64,
    /// `total.relative_residual`: ‖T − F(B)‖ / ‖T‖.
    pub relative_residual: f64,
    /// The largest `sweeps` over `tensors[]`.
    pub max_sweeps: u64,
    /// Tensors fitted (`total.tensors`) and skipped (`skipped[]`).
    pub tensors: u64,
    pub skipped: usize,
    /// Bytes of the adapter file written.
    pub output_bytes: u64,
    /// Wall time of this run (s); not a measurement, a cross-check of the timed rows.
    pub wall_s: f64,
}

impl Fit {
    /// The note carried by this extraction's rows in the CSV.
    pub fn note(&self) -> String {
        format!(
            "captured={:.6} max_sweeps={} tensors={}",
            self.captured, self.max_sweeps, self.tensors
        )
    }
}

/// The inputs and outputs of one size's extractions.
pub struct Data {
    bin: PathBuf,
    /// The fine-tuned checkpoint: the base merged with the generated adapter.
    pub tuned: PathBuf,
    block_size: usize,
    /// Where the adapters go.
    root: PathBuf,
}

impl Data {
    /// `tuned` must already hold the base merged with the generated adapter.
    pub fn prepare(bin: &Path, tuned: &Path, block_size: usize, dir: &Path) -> Result<Data> {
        let root = dir.join("extract");
        measure::remove(&root)?;
        fs::create_dir_all(&root)?;
        Ok(Data {
            bin: bin.to_path_buf(),
            tuned: tuned.to_path_buf(),
            block_size,
            root: root.canonicalize()?,
        })
    }

    fn out(&self, kind: Kind) -> PathBuf {
        self.root.join(format!("{}.safetensors", kind.key()))
    }

    fn command(&self, kind: Kind, g: &Generated, json: bool) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--base")
            .arg(&g.base)
            .arg("--tuned")
            .arg(&self.tuned)
            .arg("-o")
            .arg(self.out(kind))
            .args(["--side", "input", "--block-size"])
            .arg(self.block_size.to_string())
            .arg("--factors")
            .arg(kind.factors().to_string())
            .arg("-q");
        if kind.row_scale() {
            c.arg("--row-scale");
        }
        if json {
            c.arg("--json");
        }
        c
    }

    /// Delete every adapter written, and their folder.
    pub fn clear(&self) -> Result<()> {
        measure::remove(&self.root)
    }
}

/// Run `kind` once with `--json`, untimed (warm cache), and read its report.
pub fn fit(ctx: &Ctx, d: &Data, kind: Kind, g: &Generated, tag: &str) -> Result<Fit> {
    let out = d.out(kind);
    measure::remove(&out)?;
    measure::prewarm(&[&g.base, &d.tuned])?;
    let mut cmd = d.command(kind, g, true);
    let log = ctx.logs.join(format!("{tag}-{}-json", kind.key()));
    let s = measure::run(&mut cmd, ctx.every, &log, None)?;
    let v: Value = serde_json::from_str(&s.stdout).with_context(|| {
        format!(
            "{BIN} --json printed no JSON report (see {})",
            log.display()
        )
    })?;
    let total = &v["total"];
    let num = |x: &Value, what: &str| {
        x.as_f64()
            .with_context(|| format!("{BIN} --json: no number at {what}"))
    };
    let tensors = v["tensors"]
        .as_array()
        .with_context(|| format!("{BIN} --json: no tensors[]"))?;
    let fit = Fit {
        kind,
        captured: num(&total["captured"], "total.captured")?,
        relative_residual: num(&total["relative_residual"], "total.relative_residual")?,
        max_sweeps: tensors
            .iter()
            .filter_map(|t| t["sweeps"].as_u64())
            .max()
            .unwrap_or(0),
        tensors: total["tensors"].as_u64().unwrap_or(tensors.len() as u64),
        skipped: v["skipped"].as_array().map_or(0, Vec::len),
        output_bytes: fs::metadata(&out).map(|m| m.len()).unwrap_or(0),
        wall_s: s.wall_s,
    };
    measure::remove(&out)?;
    if fit.tensors == 0 {
        bail!("{BIN} fitted no tensor: the tuned checkpoint does not differ from the base");
    }
    eprintln!(
        "    {:<12} json  {:>8.3} s  captured {:.6}  rel.res {:.3e}  most sweeps {}  {} tensors ({} skipped)  adapter {:.1} MB",
        kind.key(),
        fit.wall_s,
        fit.captured,
        fit.relative_residual,
        fit.max_sweeps,
        fit.tensors,
        fit.skipped,
        fit.output_bytes as f64 / 1e6
    );
    Ok(fit)
}

/// One timed extraction: delete its output, flush, set the cache state (warm: the base and the
/// tuned checkpoint read into the page cache), run.
pub fn timed(
    ctx: &Ctx,
    d: &Data,
    kind: Kind,
    cold: bool,
    g: &Generated,
    tag: &str,
) -> Result<Sample> {
    let out = d.out(kind);
    measure::remove(&out)?;
    measure::sync_all();
    if cold {
        measure::drop_caches()?;
    } else {
        measure::prewarm(&[&g.base, &d.tuned])?;
    }
    let mut cmd = d.command(kind, g, false);
    let log = ctx.logs.join(format!("{tag}-{}", kind.key()));
    // The adapter written is small and comes at the end: no write phases to track.
    let s = measure::run(&mut cmd, ctx.every, &log, None)?;
    measure::remove(&out)?;
    eprintln!(
        "    {:<12} {:<4} {:>8.3} s  cpu {:>6.2} s  runq {:>5.2} s  rss {:>7.1} MiB  anon {:>7.1} MiB",
        kind.key(),
        if cold { "cold" } else { "warm" },
        s.wall_s,
        s.user_s + s.sys_s,
        s.runq_wait_s,
        s.max_rss_kib as f64 / 1024.0,
        s.peak_anon_kib as f64 / 1024.0
    );
    Ok(s)
}
