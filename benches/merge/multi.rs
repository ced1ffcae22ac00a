//! The multi-adapter measurements of `run` (issue 13): `boft-merge` with two adapters in one pass,
//! a switch from one adapter to another in one pass, and a batch of four merges of one base,
//! each against doing the same with single-adapter runs one after another, and the batch against
//! the floor of writing four copies. Measured in the same repeats and cache states as the
//! single-adapter rows; reported in BENCHMARKS-compose.md.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::gen::{self, Generated, Spec};
use crate::measure::{self, Sample};
use crate::run::Ctx;

/// Jobs in the batch (and single merges it is compared with).
pub const N: usize = 4;

/// One multi-adapter measurement: one child process, or several run one after another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The floor copy (read/write) of the base to 4 outputs, one process.
    Floor4Rw,
    /// The floor copy (copy_file_range) of the base to 4 outputs, one process.
    Floor4Cfr,
    /// `--adapter A1 --adapter A2`, one pass.
    Merge2,
    /// Merge A1 into a temporary copy, then A2 into that.
    Merge2Seq,
    /// `--unmerge-adapter A1 --adapter A2` on the base merged with A1, one pass.
    Switch,
    /// `--unmerge` A1 into a temporary copy, then merge A2 into that.
    SwitchSeq,
    /// `--batch` with 4 jobs, adapter Ak to output k.
    Batch,
    /// 4 single merges, adapter Ak to output k, one after another.
    Singles,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Floor4Rw,
        Kind::Floor4Cfr,
        Kind::Merge2,
        Kind::Merge2Seq,
        Kind::Switch,
        Kind::SwitchSeq,
        Kind::Batch,
        Kind::Singles,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Kind::Floor4Rw => "floor4_rw",
            Kind::Floor4Cfr => "floor4_cfr",
            Kind::Merge2 => "merge2",
            Kind::Merge2Seq => "merge2_seq",
            Kind::Switch => "switch",
            Kind::SwitchSeq => "switch_seq",
            Kind::Batch => "batch4",
            Kind::Singles => "merge_x4",
        }
    }

    /// Outputs written (each as large as the base).
    pub fn outputs(self) -> usize {
        match self {
            Kind::Floor4Rw | Kind::Floor4Cfr | Kind::Batch | Kind::Singles => N,
            _ => 1,
        }
    }
}

/// Is `mode` (a row's) one of the multi-adapter measurements?
pub fn is_multi(mode: &str) -> bool {
    Kind::ALL.iter().any(|k| k.key() == mode)
}

/// The extra inputs of one size: adapters A1 (the generated one) to A4, and the jobs file.
pub struct Data {
    pub adapters: Vec<PathBuf>,
    /// Bytes of each adapter's adapter_model.safetensors.
    pub adapter_bytes: Vec<u64>,
    /// Where the outputs go: one folder per kind.
    root: PathBuf,
    jobs: PathBuf,
}

impl Data {
    /// Make (or reuse) adapters A2..A4 beside the generated data in `dir`, and the jobs file.
    pub fn prepare(spec: &Spec, g: &Generated, dir: &Path) -> Result<Data> {
        let mut adapters = vec![g.adapter.clone()];
        let mut adapter_bytes = vec![g.adapter_bytes];
        for k in 2..=N as u64 {
            let (p, b) = gen::extra_adapter(spec, dir, k)?;
            adapters.push(p);
            adapter_bytes.push(b);
        }
        let root = dir.join("multi");
        measure::remove(&root)?;
        fs::create_dir_all(&root)?;
        let root = root.canonicalize()?;
        let adapters = adapters
            .iter()
            .map(|p| p.canonicalize())
            .collect::<std::io::Result<_>>()?;
        let d = Data {
            adapters,
            adapter_bytes,
            jobs: root.join("jobs.json"),
            root,
        };
        let jobs: Vec<_> = (0..N)
            .map(|k| {
                json!({
                    "output": d.out(Kind::Batch, k),
                    "adapters": [d.adapters[k]],
                })
            })
            .collect();
        fs::write(
            &d.jobs,
            serde_json::to_string_pretty(&json!({ "jobs": jobs }))? + "\n",
        )?;
        Ok(d)
    }

    fn dir(&self, kind: Kind) -> PathBuf {
        self.root.join(kind.key())
    }

    /// Output `k` (0-based) of `kind`.
    fn out(&self, kind: Kind, k: usize) -> PathBuf {
        if kind.outputs() == 1 {
            self.dir(kind).join("out")
        } else {
            self.dir(kind).join(format!("out{}", k + 1))
        }
    }

    fn tmp(&self, kind: Kind) -> PathBuf {
        self.dir(kind).join("tmp")
    }

    /// Delete every output of `kind`.
    pub fn clear(&self, kind: Kind) -> Result<()> {
        measure::remove(&self.dir(kind))
    }

    /// Delete every output (the jobs file stays until the size's data is removed).
    pub fn clear_all(&self) -> Result<()> {
        for k in Kind::ALL {
            self.clear(k)?;
        }
        Ok(())
    }

    /// The inputs `kind` reads (prewarmed for the warm state): the base or the merged copy, and
    /// its adapters.
    fn inputs<'a>(&'a self, kind: Kind, g: &'a Generated, merged: &'a Path) -> Vec<&'a Path> {
        let mut v: Vec<&Path> = vec![match kind {
            Kind::Switch | Kind::SwitchSeq => merged,
            _ => &g.base,
        }];
        let adapters = match kind {
            Kind::Floor4Rw | Kind::Floor4Cfr => 0,
            Kind::Merge2 | Kind::Merge2Seq | Kind::Switch | Kind::SwitchSeq => 2,
            Kind::Batch | Kind::Singles => N,
        };
        v.extend(self.adapters[..adapters].iter().map(PathBuf::as_path));
        v
    }
}

fn merge_cmd(ctx: &Ctx, base: &Path, args: &[(&str, &Path)], out: Option<&Path>) -> Command {
    let mut c = Command::new(&ctx.bin);
    c.arg("--base").arg(base);
    for (flag, p) in args {
        c.arg(flag);
        if !p.as_os_str().is_empty() {
            c.arg(p);
        }
    }
    if let Some(o) = out {
        c.arg("-o").arg(o);
    }
    c.arg("-q");
    c
}

/// The child processes of `kind`, in order, each with the output bytes it writes.
fn steps(ctx: &Ctx, d: &Data, kind: Kind, g: &Generated, merged: &Path) -> Vec<(Command, u64)> {
    let a = &d.adapters;
    let one = g.base_file_bytes;
    let none = Path::new("");
    match kind {
        Kind::Floor4Rw | Kind::Floor4Cfr => {
            let mut c = Command::new(&ctx.me);
            c.arg("copy")
                .arg("--mode")
                .arg(if kind == Kind::Floor4Rw { "rw" } else { "cfr" })
                .arg(&g.base);
            for k in 0..N {
                c.arg(d.out(kind, k));
            }
            vec![(c, N as u64 * one)]
        }
        Kind::Merge2 => vec![(
            merge_cmd(
                ctx,
                &g.base,
                &[("--adapter", &a[0]), ("--adapter", &a[1])],
                Some(&d.out(kind, 0)),
            ),
            one,
        )],
        Kind::Merge2Seq => vec![
            (
                merge_cmd(ctx, &g.base, &[("--adapter", &a[0])], Some(&d.tmp(kind))),
                one,
            ),
            (
                merge_cmd(
                    ctx,
                    &d.tmp(kind),
                    &[("--adapter", &a[1])],
                    Some(&d.out(kind, 0)),
                ),
                one,
            ),
        ],
        Kind::Switch => vec![(
            merge_cmd(
                ctx,
                merged,
                &[("--unmerge-adapter", &a[0]), ("--adapter", &a[1])],
                Some(&d.out(kind, 0)),
            ),
            one,
        )],
        Kind::SwitchSeq => vec![
            (
                merge_cmd(
                    ctx,
                    merged,
                    &[("--adapter", &a[0]), ("--unmerge", none)],
                    Some(&d.tmp(kind)),
                ),
                one,
            ),
            (
                merge_cmd(
                    ctx,
                    &d.tmp(kind),
                    &[("--adapter", &a[1])],
                    Some(&d.out(kind, 0)),
                ),
                one,
            ),
        ],
        Kind::Batch => vec![(
            merge_cmd(ctx, &g.base, &[("--batch", &d.jobs)], None),
            N as u64 * one,
        )],
        Kind::Singles => (0..N)
            .map(|k| {
                (
                    merge_cmd(ctx, &g.base, &[("--adapter", &a[k])], Some(&d.out(kind, k))),
                    one,
                )
            })
            .collect(),
    }
}

/// One timed measurement of `kind`: delete its outputs, flush, set the cache state once, run its
/// steps back to back (the later steps find in the cache what the earlier ones left there).
/// Intermediate outputs are deleted afterwards, untimed; the outputs stay unless `!keep`.
/// Returns the steps' sum and, for several steps, a note with each step's wall time.
#[allow(clippy::too_many_arguments)]
pub fn timed(
    ctx: &Ctx,
    d: &Data,
    kind: Kind,
    cold: bool,
    g: &Generated,
    merged: &Path,
    tag: &str,
    keep: bool,
) -> Result<(Sample, String)> {
    d.clear(kind)?;
    fs::create_dir_all(d.dir(kind))?;
    measure::sync_all();
    if cold {
        measure::drop_caches()?;
    } else {
        measure::prewarm(&d.inputs(kind, g, merged))?;
    }
    let mut samples = Vec::new();
    for (i, (mut cmd, bytes)) in steps(ctx, d, kind, g, merged).into_iter().enumerate() {
        let log = ctx.logs.join(format!("{tag}-{}-{}", kind.key(), i + 1));
        samples.push(measure::run(&mut cmd, ctx.every, &log, Some(bytes))?);
    }
    let note = if samples.len() > 1 {
        let walls: Vec<String> = samples.iter().map(|s| format!("{:.3}", s.wall_s)).collect();
        format!("steps={}", walls.join("+"))
    } else {
        String::new()
    };
    let n = samples.len();
    let s = if n == 1 {
        samples.pop().expect("one step")
    } else {
        Sample::sum(&samples)
    };
    measure::remove(&d.tmp(kind))?;
    if !keep || matches!(kind, Kind::Floor4Rw | Kind::Floor4Cfr) {
        d.clear(kind)?;
    }
    let mb = |b: Option<u64>| b.map_or(f64::NAN, |b| b as f64 / 1e6);
    eprintln!(
        "    {:<10} {:<4} {:>8.3} s  ({} step{})  cpu {:>6.2} s  runq {:>5.2} s  anon {:>7.1} MiB  read {:>7.1} MB  rchar {:>7.1} MB",
        kind.key(),
        if cold { "cold" } else { "warm" },
        s.wall_s,
        n,
        if n > 1 { "s" } else { "" },
        s.user_s + s.sys_s,
        s.runq_wait_s,
        s.peak_anon_kib as f64 / 1024.0,
        mb(s.read_bytes),
        mb(s.rchar),
    );
    Ok((s, note))
}

fn load(dir: &Path, name: &str) -> Result<Vec<f32>> {
    use boft::checkpoint::{dtype, Checkpoint};
    let c = Checkpoint::open(dir)?;
    let (f, t) = c.get(name).context(format!("{name} missing"))?;
    dtype::decode_any_f32(t.dtype, f.data(t)).context("not a float tensor")
}

/// Largest |x − y| over max |base|, and the fraction of elements that differ.
fn compare(base: &[f32], x: &[f32], y: &[f32]) -> (f32, f64) {
    let scale = base.iter().fold(0f32, |a, v| a.max(v.abs()));
    let diff = x.iter().zip(y).fold(0f32, |a, (p, q)| a.max((p - q).abs())) / scale;
    let changed = x.iter().zip(y).filter(|(p, q)| p != q).count() as f64 / x.len() as f64;
    (diff, changed)
}

/// Check the outputs of one repeat (all kinds kept): the two-adapter merges apply both adapters
/// and agree; both switches give the base merged with A2; the batch gives what the single merges
/// give. A cheap guard against timing commands that do not do what they are said to.
pub fn sanity(d: &Data, base: &Path) -> Result<String> {
    let name = "model.layers.0.self_attn.q_proj.weight";
    let b = load(base, name)?;
    let get = |kind: Kind, k: usize| load(&d.out(kind, k), name);
    let a1 = get(Kind::Singles, 0)?;
    let a2 = get(Kind::Singles, 1)?;
    let two = get(Kind::Merge2, 0)?;
    let two_seq = get(Kind::Merge2Seq, 0)?;
    let sw = get(Kind::Switch, 0)?;
    let sw_seq = get(Kind::SwitchSeq, 0)?;
    let tol = 0.05;
    let mut parts = Vec::new();
    let (d_two, _) = compare(&b, &two, &two_seq);
    let (_, ch_two) = compare(&b, &two, &a1);
    if d_two > tol || ch_two < 0.5 {
        bail!(
            "multi sanity: two adapters in one pass differ from two merges by {d_two:.3e}·max|W| \
             and change {:.1}% of the elements of the merge with A1 alone",
            ch_two * 100.0
        );
    }
    parts.push(format!(
        "two adapters in one pass change {:.1}% of the elements of merge(W, A1) and are within \
         {d_two:.1e}·max|W| of two merges",
        ch_two * 100.0
    ));
    let (d_sw, _) = compare(&b, &sw, &a2);
    let (d_sw_seq, _) = compare(&b, &sw_seq, &a2);
    let (_, ch_sw) = compare(&b, &sw, &a1);
    if d_sw > tol || d_sw_seq > tol || ch_sw < 0.5 {
        bail!(
            "multi sanity: the switch is {d_sw:.3e}·max|W| (one pass) / {d_sw_seq:.3e} (un-merge \
             + merge) from merge(W, A2), and differs from merge(W, A1) in {:.1}% of elements",
            ch_sw * 100.0
        );
    }
    parts.push(format!(
        "the switch is within {d_sw:.1e}·max|W| (one pass) and {d_sw_seq:.1e} (un-merge + merge) \
         of merge(W, A2)"
    ));
    let mut worst = 0f32;
    for k in 0..N {
        let (dk, _) = compare(&b, &get(Kind::Batch, k)?, &get(Kind::Singles, k)?);
        worst = worst.max(dk);
    }
    if worst > tol {
        bail!("multi sanity: a batch output is {worst:.3e}·max|W| from its single merge");
    }
    parts.push(format!(
        "the {N} batch outputs are within {worst:.1e}·max|W| of the {N} single merges"
    ));
    Ok(format!("{name}: {}", parts.join("; ")))
}
