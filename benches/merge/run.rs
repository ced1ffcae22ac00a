//! The `run` subcommand: for each size, generate (or reuse) the data, then time on the same files
//! the floor copies, `boft-merge`, `boft-merge --unmerge`, the multi-adapter commands (see
//! `multi`), the extractions (see `extract`) and optionally the PEFT recipe, warm and cold, and
//! rewrite the reports after each size.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use crate::extract;
use crate::gen::{self, Generated, ShapeArgs, Spec};
use crate::measure::{self, Sample};
use crate::multi::{self, Kind};
use crate::repo::root as repo;
use crate::report::{self, Asked, Meta, Row, SizeInfo};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Cold {
    /// Measure cold cache when dropping the page cache works.
    Auto,
    On,
    Off,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Base sizes in MB (10^6 bytes), comma-separated. Each picks a layer count at --hidden.
    #[arg(long, value_delimiter = ',', default_value = "100,230,1000,4100")]
    pub sizes: Vec<u64>,
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Timed runs of each command in each cache state; the report gives the median (and min).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Cold-cache runs (drop the page cache before each run; needs root).
    #[arg(long, value_enum, default_value_t = Cold::Auto)]
    pub cold: Cold,
    /// Python with torch, peft and transformers for the PEFT recipe (default: the fixtures venv
    /// if present, else python3). Skipped if those imports fail.
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Do not run the PEFT recipe.
    #[arg(long)]
    pub no_peft: bool,
    /// Run the PEFT recipe only up to this base size (MB): it is slow (minutes per GB on two
    /// cores) and holds the whole model in RAM.
    #[arg(long, default_value_t = 300)]
    pub peft_max_mb: u64,
    /// Timed PEFT runs per size (warm cache only).
    #[arg(long, default_value_t = 1)]
    pub peft_repeats: usize,
    /// Measure thread scaling (--threads 1, 2, 4, ... up to the core count) at the size closest
    /// to this (MB); 0 to skip.
    #[arg(long, default_value_t = 230)]
    pub threads_at: u64,
    /// Where generated checkpoints and outputs go (default: bench-data/ in the repository, which
    /// git ignores).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Keep the generated base and adapter of each size (reused by later runs with the same
    /// geometry). Outputs are always deleted.
    #[arg(long)]
    pub keep_data: bool,
    /// Folder for BENCHMARKS.md, bench.csv, bench.png, BENCHMARKS-compose.md,
    /// bench-compose.csv, BENCHMARKS-extract.md and bench-extract.csv (default: docs/ in the
    /// repository).
    #[arg(long)]
    pub doc_dir: Option<PathBuf>,
    /// boft-merge binary to measure (default: the one cargo built beside this bench). The
    /// extraction rows run the boft-extract in the same folder.
    #[arg(long)]
    pub bin: Option<PathBuf>,
    /// Memory sampling interval in milliseconds.
    #[arg(long, default_value_t = 5)]
    pub sample_ms: u64,
    /// Do not measure several adapters in one pass (two adapters, a switch, a batch of 4, each
    /// against single-adapter runs one after another); nor write BENCHMARKS-compose.md.
    #[arg(long)]
    pub no_multi: bool,
    /// Measure only the floor, the single merge and un-merge and the multi-adapter commands (no
    /// PEFT, no thread scaling), and write only BENCHMARKS-compose.md and bench-compose.csv:
    /// BENCHMARKS.md, bench.csv and bench.png are left as they are.
    #[arg(long, conflicts_with = "no_multi")]
    pub multi_only: bool,
    /// Do not measure `boft-extract` (OFT and BOFT fits of the base merged with the adapter);
    /// nor write BENCHMARKS-extract.md.
    #[arg(long)]
    pub no_extract: bool,
    /// Measure only the floor, the single merge and the extractions (no un-merge, no
    /// multi-adapter commands, no PEFT, no thread scaling), and write only BENCHMARKS-extract.md
    /// and bench-extract.csv: the other reports are left as they are.
    #[arg(long, conflicts_with_all = ["no_extract", "multi_only"])]
    pub extract_only: bool,
}

/// Which of the measured commands a row belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    FloorRw,
    FloorCfr,
    Merge,
    Unmerge,
    Peft,
}

impl Mode {
    pub fn key(self) -> &'static str {
        match self {
            Mode::FloorRw => "floor_rw",
            Mode::FloorCfr => "floor_cfr",
            Mode::Merge => "merge",
            Mode::Unmerge => "unmerge",
            Mode::Peft => "peft",
        }
    }
}

pub struct Ctx<'a> {
    a: &'a RunArgs,
    /// The boft-merge binary measured.
    pub bin: PathBuf,
    /// This harness (for the floor copies).
    pub me: PathBuf,
    python: Option<PathBuf>,
    /// Sampling interval.
    pub every: Duration,
    /// Where each child's stdout and stderr go.
    pub logs: PathBuf,
}

impl Ctx<'_> {
    fn command(
        &self,
        mode: Mode,
        g: &Generated,
        merged: &Path,
        out: &Path,
        threads: usize,
    ) -> Command {
        match mode {
            Mode::FloorRw | Mode::FloorCfr => {
                let mut c = Command::new(&self.me);
                c.arg("copy")
                    .arg("--mode")
                    .arg(if mode == Mode::FloorRw { "rw" } else { "cfr" })
                    .arg(&g.base)
                    .arg(out);
                c
            }
            Mode::Merge | Mode::Unmerge => {
                let mut c = Command::new(&self.bin);
                c.arg("--base")
                    .arg(if mode == Mode::Merge { &g.base } else { merged })
                    .arg("--adapter")
                    .arg(&g.adapter)
                    .arg("-o")
                    .arg(out)
                    .arg("-q");
                if mode == Mode::Unmerge {
                    c.arg("--unmerge");
                }
                if threads > 0 {
                    c.arg("--threads").arg(threads.to_string());
                }
                c
            }
            Mode::Peft => {
                let mut c = Command::new(self.python.as_ref().expect("checked"));
                c.arg(repo().join("benches/merge/peft_merge.py"))
                    .arg(&g.base)
                    .arg(&g.adapter)
                    .arg(out)
                    .arg(self.a.shape.dtype.cli_name())
                    .arg(self.a.shape.factors.to_string())
                    .arg(format!("{}MB", self.a.shape.max_shard_mb));
                c
            }
        }
    }

    /// One timed run: clear the output, flush, set the cache state, run.
    #[allow(clippy::too_many_arguments)]
    fn timed(
        &self,
        mode: Mode,
        cold: bool,
        g: &Generated,
        merged: &Path,
        out: &Path,
        threads: usize,
        tag: &str,
    ) -> Result<Sample> {
        measure::remove(out)?;
        measure::sync_all();
        if cold {
            measure::drop_caches()?;
        } else {
            let input: &Path = if mode == Mode::Unmerge {
                merged
            } else {
                &g.base
            };
            measure::prewarm(&[input, &g.adapter])?;
        }
        let mut cmd = self.command(mode, g, merged, out, threads);
        let log = self.logs.join(format!("{tag}-{}", mode.key()));
        // Every command writes as many bytes as the base's files hold (PEFT re-serialises).
        let expect = (mode != Mode::Peft).then_some(g.base_file_bytes);
        let s = measure::run(&mut cmd, self.every, &log, expect)?;
        eprintln!(
            "    {:<9} {:<4} t={} {:>8.3} s  {:>6.2} GB/s  cpu {:>6.2} s  runq {:>5.2} s  rss {:>7.1} MiB  anon {:>7.1} MiB",
            mode.key(),
            if cold { "cold" } else { "warm" },
            threads,
            s.wall_s,
            g.base_file_bytes as f64 / s.wall_s / 1e9,
            s.user_s + s.sys_s,
            s.runq_wait_s,
            s.max_rss_kib as f64 / 1024.0,
            s.peak_anon_kib as f64 / 1024.0
        );
        Ok(s)
    }
}

fn python_versions(py: &Path) -> Result<String> {
    let o = Command::new(py)
        .args([
            "-c",
            "import torch, peft, transformers; \
             print(f'torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}')",
        ])
        .env("CUDA_VISIBLE_DEVICES", "")
        .output()
        .with_context(|| format!("cannot run {}", py.display()))?;
    if !o.status.success() {
        let e = String::from_utf8_lossy(&o.stderr);
        bail!("{}", e.lines().last().unwrap_or("import failed"));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Compare layer 0's q_proj and down_proj: merged must differ from base, unmerged must be
/// within rounding of base. A cheap guard against timing a merge that does nothing.
fn sanity(base: &Path, merged: &Path, unmerged: &Path) -> Result<String> {
    use boft::checkpoint::{dtype, Checkpoint};
    let b = Checkpoint::open(base)?;
    let m = Checkpoint::open(merged)?;
    let u = Checkpoint::open(unmerged)?;
    let mut parts = Vec::new();
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    ] {
        let load = |c: &Checkpoint| -> Result<Vec<f32>> {
            let (f, t) = c.get(name).context(format!("{name} missing"))?;
            dtype::decode_any_f32(t.dtype, f.data(t)).context("not a float tensor")
        };
        let (vb, vm, vu) = (load(&b)?, load(&m)?, load(&u)?);
        let scale = vb.iter().fold(0f32, |a, x| a.max(x.abs()));
        let changed = vb.iter().zip(&vm).filter(|(x, y)| x != y).count() as f64 / vb.len() as f64;
        let back = vb
            .iter()
            .zip(&vu)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()))
            / scale;
        if changed < 0.5 || back > 0.05 {
            bail!(
                "sanity check failed on {name}: merge changed {:.1}% of elements, unmerge is off \
                 by {back:.3e} of the largest magnitude",
                changed * 100.0
            );
        }
        let short = name
            .trim_start_matches("model.layers.0.")
            .trim_end_matches(".weight");
        parts.push(format!(
            "{short}: merge changed {:.1}% of elements; unmerge(merge(W)) within {back:.1e}·max|W| of W",
            changed * 100.0
        ));
    }
    Ok(parts.join("; "))
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The boft-merge to measure: `--bin`, or the one cargo built beside this bench.
pub fn merge_bin(bin: Option<PathBuf>) -> Result<PathBuf> {
    let bin = bin.unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_boft-merge")));
    if !bin.is_file() {
        bail!(
            "{} does not exist; build it with cargo build --release",
            bin.display()
        );
    }
    Ok(bin)
}

pub fn main(a: RunArgs, argv: &[String]) -> Result<()> {
    if a.sizes.is_empty() || a.repeats == 0 {
        bail!("--sizes and --repeats must not be empty/zero");
    }
    let data = a.data.clone().unwrap_or_else(|| repo().join("bench-data"));
    let doc_dir = a.doc_dir.clone().unwrap_or_else(|| repo().join("docs"));
    fs::create_dir_all(&data)?;
    fs::create_dir_all(&doc_dir)?;
    let data = data.canonicalize()?;
    let logs = data.join("logs");
    fs::create_dir_all(&logs)?;
    let bin = merge_bin(a.bin.clone())?;
    let cold = match a.cold {
        Cold::Off => false,
        Cold::On => {
            measure::drop_caches().context("--cold on")?;
            true
        }
        Cold::Auto => measure::can_drop_caches(),
    };
    let (python, python_note) = if a.no_peft || a.peft_max_mb == 0 || a.multi_only || a.extract_only
    {
        (
            None,
            if a.multi_only {
                "not run (--multi-only)"
            } else if a.extract_only {
                "not run (--extract-only)"
            } else {
                "not run (--no-peft)"
            }
            .to_string(),
        )
    } else {
        let py = a.python.clone().unwrap_or_else(|| {
            let venv = PathBuf::from("/work/venv-fixtures/bin/python");
            if venv.is_file() {
                venv
            } else {
                PathBuf::from("python3")
            }
        });
        match python_versions(&py) {
            Ok(v) => (Some(py.clone()), format!("{} ({v})", py.display())),
            Err(e) => (
                None,
                format!(
                    "not run: {} cannot import torch/peft/transformers ({e})",
                    py.display()
                ),
            ),
        }
    };
    let run_multi = !a.no_multi && !a.extract_only;
    let extract_bin = if a.no_extract || a.multi_only {
        None
    } else {
        Some(extract::find_bin(&bin)?)
    };
    let asked = Asked {
        python: a.python.as_deref(),
        repeats: a.repeats,
        sample_ms: a.sample_ms,
        multi: run_multi,
        extract_bin: extract_bin.as_deref(),
    };
    let mut meta = Meta::collect(&data, &bin, argv, cold, &python_note, &asked);
    let ctx = Ctx {
        a: &a,
        bin,
        me: std::env::current_exe()?,
        python,
        every: Duration::from_millis(a.sample_ms.max(1)),
        logs,
    };
    let threads_at = if a.threads_at == 0 || a.multi_only || a.extract_only {
        None
    } else {
        a.sizes
            .iter()
            .copied()
            .min_by_key(|s| s.abs_diff(a.threads_at))
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut thread_list: Vec<usize> = std::iter::successors(Some(1usize), |t| Some(t * 2))
        .take_while(|&t| t < cores)
        .collect();
    thread_list.push(cores);

    let mut rows: Vec<Row> = Vec::new();
    let mut infos: Vec<SizeInfo> = Vec::new();
    let mut sizes = a.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    for &size in &sizes {
        let spec = Spec::resolve(&a.shape, size, None)?;
        let dir = data.join(spec.tag());
        eprintln!(
            "== {size} MB: {} layers of hidden {} ({}), load {}",
            spec.layers,
            spec.hidden,
            spec.tag(),
            loadavg()
        );
        let load_before = loadavg();
        let g = gen::generate(&spec, &dir, true)?;
        eprintln!(
            "  data: base {:.1} MB in {} shard(s), adapter {:.1} MB ({})",
            g.base_file_bytes as f64 / 1e6,
            g.shards,
            g.adapter_bytes as f64 / 1e6,
            if g.seconds > 0.0 {
                format!("generated in {:.1} s", g.seconds)
            } else {
                "reused".into()
            }
        );
        let merged = dir.join("merged");
        let out = dir.join("out");
        measure::remove(&merged)?;
        // The unmerge input, made by an untimed merge.
        let mut c = ctx.command(Mode::Merge, &g, &merged, &merged, 0);
        measure::run(
            &mut c,
            ctx.every,
            &ctx.logs.join(format!("{size}-prepare")),
            None,
        )?;
        // Adapters A2..A4 and the batch's jobs file.
        let multi = if run_multi {
            Some(multi::Data::prepare(&spec, &g, &dir)?)
        } else {
            None
        };
        // The extractions' tuned checkpoint is that merged copy; each fit runs once untimed
        // with --json first (its captured share and sweeps; and a failure before any timing).
        let extract = match &extract_bin {
            Some(b) => Some(extract::Data::prepare(b, &merged, spec.block_size, &dir)?),
            None => None,
        };
        let mut fits = Vec::new();
        if let Some(d) = &extract {
            for kind in extract::Kind::ALL {
                fits.push(extract::fit(&ctx, d, kind, &g, &size.to_string())?);
            }
        }

        let info_base = SizeInfo {
            size_mb: size,
            spec: spec.clone(),
            base_bytes: g.base_file_bytes,
            adapter_bytes: g.adapter_bytes,
            shards: g.shards,
            gen_seconds: g.seconds,
            sanity: String::new(),
            multi_adapter_bytes: multi
                .as_ref()
                .map(|d| d.adapter_bytes.clone())
                .unwrap_or_default(),
            multi_sanity: String::new(),
            extract_fits: fits.clone(),
            load_before: load_before.clone(),
            load_after: String::new(),
        };
        let push = |rows: &mut Vec<Row>,
                    mode: &str,
                    cache: &str,
                    threads: usize,
                    rep: usize,
                    s: Sample,
                    note: String| {
            rows.push(Row::new(&info_base, mode, cache, threads, rep, s, note));
        };

        let modes: &[Mode] = if a.extract_only {
            &[Mode::FloorRw, Mode::FloorCfr, Mode::Merge]
        } else {
            &[Mode::FloorRw, Mode::FloorCfr, Mode::Merge, Mode::Unmerge]
        };
        let mut sanity_note = String::new();
        let mut multi_sanity = String::new();
        let caches: &[bool] = if cold { &[false, true] } else { &[false] };
        for &is_cold in caches {
            let cache = if is_cold { "cold" } else { "warm" };
            // Interleave the commands so slow drifts in machine load hit them alike.
            for rep in 0..a.repeats {
                for &mode in modes {
                    let tag = format!("{size}-{cache}-{rep}");
                    let s = ctx.timed(mode, is_cold, &g, &merged, &out, 0, &tag)?;
                    if mode == Mode::Unmerge && sanity_note.is_empty() {
                        sanity_note = sanity(&g.base, &merged, &out)?;
                    }
                    push(&mut rows, mode.key(), cache, 0, rep, s, String::new());
                }
                // The multi-adapter commands, in the same repeat and cache state. The first
                // repeat keeps every output until they have been checked against each other.
                if let Some(d) = &multi {
                    let keep = multi_sanity.is_empty();
                    for kind in Kind::ALL {
                        let tag = format!("{size}-{cache}-{rep}");
                        let (s, note) =
                            multi::timed(&ctx, d, kind, is_cold, &g, &merged, &tag, keep)?;
                        push(&mut rows, kind.key(), cache, 0, rep, s, note);
                    }
                    if keep {
                        multi_sanity = multi::sanity(d, &g.base)?;
                        d.clear_all()?;
                    }
                }
                // The extractions, in the same repeat and cache state.
                if let Some(d) = &extract {
                    for (kind, fit) in extract::Kind::ALL.into_iter().zip(&fits) {
                        let tag = format!("{size}-{cache}-{rep}");
                        let s = extract::timed(&ctx, d, kind, is_cold, &g, &tag)?;
                        push(&mut rows, kind.key(), cache, 0, rep, s, fit.note());
                    }
                }
            }
        }
        if Some(size) == threads_at {
            for rep in 0..a.repeats {
                for &t in &thread_list {
                    let tag = format!("{size}-threads{t}-{rep}");
                    let s = ctx.timed(Mode::Merge, false, &g, &merged, &out, t, &tag)?;
                    push(
                        &mut rows,
                        Mode::Merge.key(),
                        "warm",
                        t,
                        rep,
                        s,
                        String::new(),
                    );
                }
            }
        }
        if ctx.python.is_some() && size <= a.peft_max_mb {
            for rep in 0..a.peft_repeats {
                let tag = format!("{size}-warm-{rep}");
                let s = ctx.timed(Mode::Peft, false, &g, &merged, &out, 0, &tag)?;
                let note = s
                    .stdout
                    .lines()
                    .last()
                    .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .map(|v| {
                        [
                            "import",
                            "load_base",
                            "load_adapter",
                            "merge",
                            "save",
                            "fsync",
                        ]
                        .iter()
                        .map(|k| format!("{k}={:.2}", v[k].as_f64().unwrap_or(f64::NAN)))
                        .collect::<Vec<_>>()
                        .join(" ")
                    })
                    .unwrap_or_default();
                push(&mut rows, Mode::Peft.key(), "warm", 0, rep, s, note);
            }
        }
        measure::remove(&out)?;
        measure::remove(&merged)?;
        if let Some(d) = &multi {
            d.clear_all()?;
        }
        if let Some(d) = &extract {
            d.clear()?;
        }
        if !a.keep_data {
            measure::remove(&dir)?;
        }
        let mut info = info_base.clone();
        info.sanity = sanity_note;
        info.multi_sanity = multi_sanity;
        info.load_after = loadavg();
        infos.push(info);
        meta.finished = report::now();
        if !a.multi_only && !a.extract_only {
            report::write_all(&doc_dir, &meta, &infos, &rows)?;
            eprintln!(
                "  report updated: {}",
                doc_dir.join("BENCHMARKS.md").display()
            );
        }
        if multi.is_some() {
            report::write_compose(&doc_dir, &meta, &infos, &rows)?;
            eprintln!(
                "  report updated: {}",
                doc_dir.join(report::COMPOSE_MD).display()
            );
        }
        if extract.is_some() {
            report::write_extract(&doc_dir, &meta, &infos, &rows)?;
            eprintln!(
                "  report updated: {}",
                doc_dir.join(report::EXTRACT_MD).display()
            );
        }
    }
    Ok(())
}
