//! `units`: a merge split into units (issue 17, docs/SCALE.md), measured against the single
//! `boft-merge` of the same inputs in one run: the whole merge as one unit, split between two
//! processes at once, each followed by `--finalize`; every output checked byte for byte against
//! the single merge, and every split 1..files of the model run once in a shuffled order with one
//! unit repeated (the issue's "any split, any order" on the benchmark model). Writes
//! docs/BENCHMARKS-units.md and docs/bench-units.csv.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::gen::{self, ShapeArgs, Spec};
use crate::measure;
use crate::report;

#[derive(Args, Debug)]
pub struct UnitsArgs {
    /// Base size in MB (10^6 bytes).
    #[arg(long, default_value_t = 1000)]
    pub size: u64,
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Timed runs of each command (medians reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Where the generated data and outputs go (default: bench-data/units).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Keep the generated data.
    #[arg(long)]
    pub keep_data: bool,
    /// Where the report goes (default: docs/ of this repository).
    #[arg(long)]
    pub doc_dir: Option<PathBuf>,
    /// The boft-merge to measure (default: the one cargo built beside this bench).
    #[arg(long)]
    pub bin: Option<PathBuf>,
}

/// One timed way of producing the merged output.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// The copy_file_range floor of the base's files (the harness's `copy`).
    Floor,
    /// `boft-merge` as usual.
    Single,
    /// `--unit 0/1`, then `--finalize`.
    Units1,
    /// `--unit 0/2` and `--unit 1/2` in two processes at once (one thread each), then
    /// `--finalize`.
    Units2,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Floor, Kind::Single, Kind::Units1, Kind::Units2];
    fn key(self) -> &'static str {
        match self {
            Kind::Floor => "floor_cfr",
            Kind::Single => "merge",
            Kind::Units1 => "units_1",
            Kind::Units2 => "units_2",
        }
    }
    fn what(self) -> &'static str {
        match self {
            Kind::Floor => "floor: copy_file_range of the base's files, fsync",
            Kind::Single => "`boft-merge` (one process, all cores)",
            Kind::Units1 => "1 process: `--unit 0/1` (all cores), then `--finalize`",
            Kind::Units2 => {
                "2 processes at once: `--unit 0/2`, `--unit 1/2` (`--threads 1` each), then \
                 `--finalize`"
            }
        }
    }
}

struct Timed {
    kind: Kind,
    repeat: usize,
    /// Units (or the whole command).
    work_s: f64,
    /// `--finalize` (0 for the floor and the single merge).
    finalize_s: f64,
}

fn cmd(bin: &Path, base: &Path, adapter: &Path, out: &Path) -> Command {
    let mut c = Command::new(bin);
    c.arg("--base").arg(base).arg("--adapter").arg(adapter);
    c.arg("-o").arg(out).arg("-q");
    c.stdin(Stdio::null()).stdout(Stdio::null());
    c
}

fn check(mut c: Command, what: &str) -> Result<()> {
    let o = c.stderr(Stdio::piped()).output()?;
    if !o.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

fn spawn_checked(mut c: Command) -> Result<std::process::Child> {
    Ok(c.stderr(Stdio::piped()).spawn()?)
}

fn wait_checked(ch: std::process::Child, what: &str) -> Result<()> {
    let o = ch.wait_with_output()?;
    if !o.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

/// Every file under `p` by relative name, hashed.
/// SHA-256 of every file under `p`, by relative path.
pub fn digest(p: &Path) -> Result<Vec<(PathBuf, [u8; 32])>> {
    use sha2::{Digest, Sha256};
    let mut out = Vec::new();
    for f in measure::files_under(p)? {
        let mut h = Sha256::new();
        let mut fh = fs::File::open(&f)?;
        std::io::copy(&mut fh, &mut h)?;
        out.push((f.strip_prefix(p)?.to_path_buf(), h.finalize().into()));
    }
    Ok(out)
}

/// A deterministic shuffle of 0..n.
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn main(a: UnitsArgs, argv: &[String]) -> Result<()> {
    let root = crate::repo::root();
    let bin = crate::run::merge_bin(a.bin.clone())?;
    let me = std::env::current_exe()?;
    let data = a
        .data
        .clone()
        .unwrap_or_else(|| root.join("bench-data/units"));
    fs::create_dir_all(&data)?;
    let data = data.canonicalize()?;
    let spec = Spec::resolve(&a.shape, a.size, None)?;
    let g = gen::generate(&spec, &data, true)?;
    let meta = report::Meta::collect_plain(&data, &bin, argv, a.repeats);
    let (base, adapter) = (g.base.clone(), g.adapter.clone());
    let outs = data.join("outs");
    measure::remove(&outs)?;
    fs::create_dir_all(&outs)?;
    let want = outs.join("want");
    check(cmd(&bin, &base, &adapter, &want), "the single merge")?;
    let want_digest = digest(&want)?;

    // Any split, any order, one unit run twice: byte-identical to the single merge.
    let mut splits = Vec::new();
    for n in 1..=g.shards {
        let out = outs.join(format!("split{n}"));
        let mut order = shuffled(n, n as u64);
        order.push(order[0]);
        for k in order {
            let mut c = cmd(&bin, &base, &adapter, &out);
            c.arg("--unit").arg(format!("{k}/{n}"));
            check(c, "a unit")?;
        }
        let mut c = cmd(&bin, &base, &adapter, &out);
        c.arg("--finalize");
        check(c, "finalize")?;
        let same = digest(&out)? == want_digest;
        eprintln!(
            "split into {n}: {}",
            if same { "identical" } else { "DIFFERS" }
        );
        splits.push((n, same));
        measure::remove(&out)?;
    }

    let robust = robustness(&bin, &base, &adapter, &outs, &want_digest, g.shards)?;

    let mut rows = Vec::new();
    for repeat in 0..a.repeats {
        for kind in Kind::ALL {
            let out = outs.join(kind.key());
            measure::remove(&out)?;
            measure::sync_all();
            measure::prewarm(&[&base, &adapter])?;
            let t0 = Instant::now();
            let mut finalize_s = 0.0;
            match kind {
                Kind::Floor => {
                    let mut c = Command::new(&me);
                    c.args(["copy", "--mode", "cfr"]).arg(&base).arg(&out);
                    check(c, "the floor copy")?;
                }
                Kind::Single => check(cmd(&bin, &base, &adapter, &out), "the merge")?,
                Kind::Units1 | Kind::Units2 => {
                    let n = if kind == Kind::Units1 { 1 } else { 2 };
                    let mut children = Vec::new();
                    for k in 0..n {
                        let mut c = cmd(&bin, &base, &adapter, &out);
                        c.arg("--unit").arg(format!("{k}/{n}"));
                        if n > 1 {
                            c.args(["--threads", "1"]);
                        }
                        children.push(spawn_checked(c)?);
                    }
                    for ch in children {
                        wait_checked(ch, "a unit")?;
                    }
                    let t1 = Instant::now();
                    let mut c = cmd(&bin, &base, &adapter, &out);
                    c.arg("--finalize");
                    check(c, "finalize")?;
                    finalize_s = t1.elapsed().as_secs_f64();
                }
            }
            let total = t0.elapsed().as_secs_f64();
            if kind != Kind::Floor && digest(&out)? != want_digest {
                bail!("{} differs from the single merge", kind.key());
            }
            eprintln!("{} #{repeat}: {total:.3} s", kind.key());
            rows.push(Timed {
                kind,
                repeat,
                work_s: total - finalize_s,
                finalize_s,
            });
            measure::remove(&out)?;
        }
    }
    let doc_dir = a.doc_dir.clone().unwrap_or_else(|| root.join("docs"));
    write(&doc_dir, &meta, &spec, &g, &splits, &robust, &rows)?;
    if !a.keep_data {
        measure::remove(&data)?;
    }
    Ok(())
}

fn write(
    doc_dir: &Path,
    meta: &report::Meta,
    spec: &Spec,
    g: &gen::Generated,
    splits: &[(usize, bool)],
    robust: &[(String, String)],
    rows: &[Timed],
) -> Result<()> {
    let mut csv = String::from("kind,repeat,work_s,finalize_s,total_s\n");
    for r in rows {
        let _ = writeln!(
            csv,
            "{},{},{:.4},{:.4},{:.4}",
            r.kind.key(),
            r.repeat,
            r.work_s,
            r.finalize_s,
            r.work_s + r.finalize_s
        );
    }
    fs::write(doc_dir.join("bench-units.csv"), csv).context("writing bench-units.csv")?;
    let gb = g.base_file_bytes as f64 / 1e9;
    let med = |k: Kind, f: &dyn Fn(&Timed) -> f64| {
        median(rows.iter().filter(|r| r.kind == k).map(f).collect())
    };
    let single = med(Kind::Single, &|r| r.work_s);
    let mut w = String::new();
    let _ = writeln!(w, "# Split merges: units against the single merge\n");
    let _ = writeln!(
        w,
        "_Written by the benchmark harness (`benches/merge/units.rs`) from {} to {}. Do not edit \
         by hand: rerun the command below. Every timed run is in [bench-units.csv](bench-units.csv)._\n",
        meta.started,
        report::now()
    );
    report::machine_rows(&mut w, meta);
    let _ = writeln!(w);
    let _ = writeln!(w, "## Reproduce\n\n```sh\n{}\n```\n", meta.command);
    let _ = writeln!(
        w,
        "## Data\n\nThe benchmark model: a synthetic Llama checkpoint of {gb:.2} GB ({} layers, \
         hidden {}, {}) in {} shards of at most {} MB, and a PEFT BOFT adapter (b={}, {} \
         factor(s)) on all seven linear layers of every decoder layer: {} units.\n",
        spec.layers,
        spec.hidden,
        spec.dtype.cli_name(),
        g.shards,
        spec.max_shard_bytes / 1_000_000,
        spec.block_size,
        spec.factors,
        g.shards
    );
    let _ = writeln!(
        w,
        "## Any split, any order\n\nEvery split of the model into N = 1 … {} workers, the \
         workers run one after another in a shuffled order and the first of them run a second \
         time, then `--finalize`: the output against the single merge's, file by file (SHA-256).\n",
        g.shards
    );
    let _ = writeln!(w, "| N | output |\n|---|---|");
    for (n, same) in splits {
        let _ = writeln!(
            w,
            "| {n} | {} |",
            if *same { "identical" } else { "**DIFFERS**" }
        );
    }
    let _ = writeln!(
        w,
        "\n## Killed, tampered, incomplete\n\nOn the same model, split into {} workers \
         (one unit each):\n\n| what was done | what happened |\n|---|---|",
        g.shards
    );
    for (what, happened) in robust {
        let _ = writeln!(w, "| {what} | {happened} |");
    }
    let _ = writeln!(
        w,
        "\n## Times (warm page cache)\n\nBefore each run the previous output is removed, `sync` \
         is called and the base and adapter are read into the page cache (untimed); the kinds \
         are interleaved within each repeat. Median of {} runs (min in brackets); every merged \
         output was checked byte for byte against the single merge's.\n",
        meta.repeats
    );
    let _ = writeln!(
        w,
        "| command | units (s) | finalize (s) | total (s) | GB/s | × single merge |\n|---|---|---|---|---|---|"
    );
    for k in Kind::ALL {
        let work = med(k, &|r| r.work_s);
        let fin = med(k, &|r| r.finalize_s);
        let total = med(k, &|r| r.work_s + r.finalize_s);
        let min = rows
            .iter()
            .filter(|r| r.kind == k)
            .map(|r| r.work_s + r.finalize_s)
            .fold(f64::INFINITY, f64::min);
        let _ = writeln!(
            w,
            "| {} | {} | {} | {total:.3} ({min:.3}) | {:.2} | {:.2} |",
            k.what(),
            if matches!(k, Kind::Units1 | Kind::Units2) {
                format!("{work:.3}")
            } else {
                "—".into()
            },
            if matches!(k, Kind::Units1 | Kind::Units2) {
                format!("{fin:.3}")
            } else {
                "—".into()
            },
            gb / total,
            total / single
        );
    }
    fs::write(doc_dir.join("BENCHMARKS-units.md"), w).context("writing BENCHMARKS-units.md")?;
    Ok(())
}

/// The split into one unit per worker with a unit killed mid-write, a unit missing and a unit
/// tampered with: finalize must refuse the incomplete and tampered sets (exit 2, nothing moved)
/// and, once the units are run again, write the single merge's bytes. Returns (what was done,
/// what happened) rows.
fn robustness(
    bin: &Path,
    base: &Path,
    adapter: &Path,
    outs: &Path,
    want: &[(PathBuf, [u8; 32])],
    n: usize,
) -> Result<Vec<(String, String)>> {
    let out = outs.join("robust");
    let staging = outs.join(".robust.boft-units");
    let unit = |k: usize| {
        let mut c = cmd(bin, base, adapter, &out);
        c.arg("--unit").arg(format!("{k}/{n}"));
        c
    };
    let finalize = || -> Result<(bool, String)> {
        let mut c = cmd(bin, base, adapter, &out);
        c.arg("--finalize");
        let o = c.stderr(Stdio::piped()).output()?;
        Ok((
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).trim().to_string(),
        ))
    };
    let refused = |(ok, line): (bool, String)| -> Result<String> {
        if ok || out.exists() {
            bail!("finalize accepted a broken set");
        }
        // The line without the output's path, which differs between machines.
        let after_class = line.split_once("] ").map_or(line.as_str(), |(_, m)| m);
        Ok(after_class
            .split_once(": ")
            .map_or(after_class, |(_, m)| m)
            .to_string())
    };
    let mut rows = Vec::new();
    for k in 1..n {
        check(unit(k), "a unit")?;
    }
    // Worker 0 killed once its file exists (mid-write: its record comes after the whole file).
    let data = staging.join("data");
    let count = |d: &Path| fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
    let before = count(&data);
    let mut child = unit(0).stderr(Stdio::null()).spawn()?;
    let t0 = Instant::now();
    while count(&data) == before {
        if t0.elapsed().as_secs() > 120 {
            bail!("the unit made no file");
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    child.kill()?;
    child.wait()?;
    let records = count(&staging.join("records"));
    rows.push((
        format!("worker 0 of {n} killed (SIGKILL) once its file existed"),
        format!("{records} of {n} records; a file of the killed unit left in data/"),
    ));
    rows.push((
        "`--finalize` then".into(),
        format!("refused: `{}`", refused(finalize()?)?),
    ));
    check(unit(0), "the unit run again")?;
    rows.push((
        "worker 0 run again, then `--finalize`".into(),
        verdict(finalize()?.0 && digest(&out)? == want),
    ));
    measure::remove(&out)?;
    // Every unit run, then one byte of one unit's file flipped (after a clock tick).
    for k in 0..n {
        check(unit(k), "a unit")?;
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    // A file a record names (leftovers of the killed run are in data/ too).
    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(staging.join("records").join("f0.json"))?)?;
    let victim = data.join(record["data"].as_str().context("no data in the record")?);
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&victim)?;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 4096)?;
        f.write_all_at(&[b[0] ^ 0x40], 4096)?;
    }
    rows.push((
        "every unit run, then one byte of one unit's file flipped; `--finalize`".into(),
        format!("refused: `{}`", refused(finalize()?)?),
    ));
    for k in 0..n {
        check(unit(k), "a unit")?;
    }
    rows.push((
        "every worker run again (the others skip: already done), then `--finalize`".into(),
        verdict(finalize()?.0 && digest(&out)? == want),
    ));
    measure::remove(&out)?;
    Ok(rows)
}

fn verdict(same: bool) -> String {
    if same {
        "identical to the single merge".into()
    } else {
        "**DIFFERS**".into()
    }
}
