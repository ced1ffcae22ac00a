//! docs/bench.csv (one row per timed run), docs/BENCHMARKS.md and docs/bench.png; for the
//! multi-adapter measurements docs/bench-compose.csv and docs/BENCHMARKS-compose.md; for the
//! extractions docs/bench-extract.csv and docs/BENCHMARKS-extract.md.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;

use crate::extract;
use crate::gen::Spec;
use crate::measure::Sample;
use crate::multi;
use crate::repo::root as repo;

const MIB: f64 = 1024.0 * 1024.0;

/// Everything about the machine and the invocation.
pub struct Meta {
    pub started: String,
    pub finished: String,
    pub command: String,
    pub cpu: String,
    pub cores: usize,
    pub ram: String,
    pub storage: String,
    pub kernel: String,
    pub commit: String,
    pub rustc: String,
    pub bin: PathBuf,
    pub cold: bool,
    pub python: String,
    pub plot_pythons: Vec<PathBuf>,
    pub repeats: usize,
    pub sample_ms: u64,
    /// The multi-adapter commands were measured (BENCHMARKS-compose.md).
    pub multi: bool,
    /// The boft-extract measured (BENCHMARKS-extract.md), if the extractions were.
    pub extract_bin: Option<PathBuf>,
}

fn sh(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd).args(args).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

pub fn now() -> String {
    sh("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]).unwrap_or_default()
}

fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Mount point, device, filesystem and options of the mount holding `p`.
fn storage(p: &Path) -> String {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let best = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4 && p.starts_with(f[1])).then(|| (f[1].len(), f[0], f[1], f[2], f[3]))
        })
        .max_by_key(|x| x.0);
    let mut s = match best {
        Some((_, dev, mnt, fstype, opts)) => format!("{dev} mounted at {mnt}, {fstype} ({opts})"),
        None => "unknown".into(),
    };
    if let Some((_, dev, ..)) = best {
        let name = dev.trim_start_matches("/dev/");
        let q = |f: &str| {
            fs::read_to_string(format!("/sys/block/{name}/queue/{f}"))
                .ok()
                .map(|x| x.trim().to_string())
        };
        if let Some(r) = q("rotational") {
            let _ = write!(s, "; rotational={r}");
        }
        if let Some(sch) = q("scheduler") {
            let _ = write!(s, "; scheduler {sch}");
        }
    }
    // SAFETY: statvfs fills a plain struct from a NUL-terminated path.
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap_or_default();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0 {
        let free = st.f_bavail as f64 * st.f_frsize as f64 / 1e9;
        let total = st.f_blocks as f64 * st.f_frsize as f64 / 1e9;
        let _ = write!(s, "; {free:.0} GB free of {total:.0} GB at start");
    }
    s
}

/// What the run was asked for that the report states (from `run`'s arguments).
pub struct Asked<'a> {
    /// `--python`, tried first for the plot.
    pub python: Option<&'a Path>,
    pub repeats: usize,
    pub sample_ms: u64,
    pub multi: bool,
    /// The boft-extract to measure; None when the extractions are not.
    pub extract_bin: Option<&'a Path>,
}

impl Meta {
    /// `collect` for the reports that measure only boft-merge (no PEFT, no cold cache, no
    /// memory sampling).
    pub fn collect_plain(data: &Path, bin: &Path, argv: &[String], repeats: usize) -> Meta {
        Meta::collect(
            data,
            bin,
            argv,
            false,
            "",
            &Asked {
                python: None,
                repeats,
                sample_ms: 0,
                multi: false,
                extract_bin: None,
            },
        )
    }

    pub fn collect(
        data: &Path,
        bin: &Path,
        argv: &[String],
        cold: bool,
        python: &str,
        a: &Asked,
    ) -> Meta {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("unknown")
            .trim()
            .to_string();
        let ram = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            })
            .map(|kib| format!("{:.1} GiB", kib / MIB))
            .unwrap_or_default();
        let root = repo();
        let root_s = root.to_string_lossy().to_string();
        let mut commit =
            sh("git", &["-C", &root_s, "rev-parse", "HEAD"]).unwrap_or("unknown".into());
        if sh(
            "git",
            &[
                "-C",
                &root_s,
                "status",
                "--porcelain",
                "--untracked-files=no",
            ],
        )
        .is_some_and(|s| !s.is_empty())
        {
            commit.push_str(" + uncommitted changes");
        }
        let mut plot_pythons: Vec<PathBuf> = a.python.iter().map(|p| p.to_path_buf()).collect();
        plot_pythons.push("/work/venv-fixtures/bin/python".into());
        plot_pythons.push("python3".into());
        Meta {
            started: now(),
            finished: String::new(),
            command: std::iter::once("cargo bench --bench merge --".to_string())
                .chain(argv.iter().map(|s| quote(s)))
                .collect::<Vec<_>>()
                .join(" "),
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            ram,
            storage: storage(data),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            commit,
            rustc: sh("rustc", &["-V"]).unwrap_or_default(),
            bin: bin.to_path_buf(),
            cold,
            python: python.to_string(),
            plot_pythons,
            repeats: a.repeats,
            sample_ms: a.sample_ms,
            multi: a.multi,
            extract_bin: a.extract_bin.map(Path::to_path_buf),
        }
    }
}

/// What was generated for one size.
#[derive(Clone)]
pub struct SizeInfo {
    pub size_mb: u64,
    pub spec: Spec,
    pub base_bytes: u64,
    pub adapter_bytes: u64,
    pub shards: usize,
    pub gen_seconds: f64,
    pub sanity: String,
    /// Bytes of adapters A1..A4 of the multi-adapter runs (empty if not run).
    pub multi_adapter_bytes: Vec<u64>,
    pub multi_sanity: String,
    /// The untimed `--json` run of each extraction (empty if not run).
    pub extract_fits: Vec<extract::Fit>,
    pub load_before: String,
    pub load_after: String,
}

impl SizeInfo {
    fn largest(&self) -> u64 {
        self.spec.largest_tensor_bytes(false)
    }
    fn bound(&self) -> f64 {
        2.0 * self.largest() as f64 + 64.0 * MIB
    }
}

/// One timed run.
pub struct Row {
    pub size_mb: u64,
    pub base_bytes: u64,
    pub mode: String,
    pub cache: String,
    /// 0: the binary's default (all cores).
    pub threads: usize,
    pub rep: usize,
    pub s: Sample,
    pub note: String,
    cols: String,
}

impl Row {
    pub fn new(
        i: &SizeInfo,
        mode: &str,
        cache: &str,
        threads: usize,
        rep: usize,
        s: Sample,
        note: String,
    ) -> Row {
        let sp = &i.spec;
        let cols = format!(
            "{},{},{},{},{},{},{},{},{},{},{},{}",
            sp.layers,
            sp.hidden,
            sp.intermediate,
            sp.vocab,
            sp.dtype.cli_name(),
            sp.block_size,
            sp.factors,
            i.shards,
            sp.largest_tensor_bytes(false),
            sp.largest_tensor_bytes(true),
            i.adapter_bytes,
            i.spec.total_bytes()
        );
        Row {
            size_mb: i.size_mb,
            base_bytes: i.base_bytes,
            mode: mode.into(),
            cache: cache.into(),
            threads,
            rep,
            s,
            note: note.replace([',', '\n'], ";"),
            cols,
        }
    }
}

const CSV_HEADER: &str = "size_mb,base_bytes,layers,hidden,intermediate,vocab,dtype,block_size,factors,shards,\
largest_tensor_bytes,largest_target_bytes,adapter_bytes,tensor_bytes,mode,cache,threads,rep,wall_s,user_s,sys_s,\
max_rss_kib,peak_anon_kib,peak_rss_sampled_kib,samples,ru_maxrss_kib,runq_wait_s,first_write_s,all_written_s,\
read_bytes,rchar,note";

fn csv<'a>(rows: impl Iterator<Item = &'a Row>) -> String {
    let mut s = String::from(CSV_HEADER);
    s.push('\n');
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    for r in rows {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{:.6},{:.6},{:.6},{},{},{},{},{},{:.6},{:.6},{:.6},{},{},{}",
            r.size_mb,
            r.base_bytes,
            r.cols,
            r.mode,
            r.cache,
            r.threads,
            r.rep,
            r.s.wall_s,
            r.s.user_s,
            r.s.sys_s,
            r.s.max_rss_kib,
            r.s.peak_anon_kib,
            r.s.peak_rss_sampled_kib,
            r.s.samples,
            r.s.ru_maxrss_kib,
            r.s.runq_wait_s,
            r.s.first_write_s,
            r.s.all_written_s,
            opt(r.s.read_bytes),
            opt(r.s.rchar),
            r.note
        );
    }
    s
}

/// Median and friends over the repeats of one command.
#[derive(Clone, Copy)]
struct Agg {
    med: f64,
    min: f64,
    n: usize,
    cpu: f64,
    wait: f64,
    /// Phases (medians; NaN when not tracked): spawn → first output byte, first → last output
    /// byte handed to the kernel, last byte → exit.
    startup: f64,
    write: f64,
    tail: f64,
    rss: f64,
    anon: f64,
    /// Medians of `read_bytes` and `rchar` (NaN if not known).
    read: f64,
    rchar: f64,
}

/// Median of the finite values (NaN if none).
fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn agg(rows: &[Row], size: u64, mode: &str, cache: &str, threads: usize) -> Option<Agg> {
    let rs: Vec<&Row> = rows
        .iter()
        .filter(|r| r.size_mb == size && r.mode == mode && r.cache == cache && r.threads == threads)
        .collect();
    if rs.is_empty() {
        return None;
    }
    Some(Agg {
        med: median(rs.iter().map(|r| r.s.wall_s).collect()),
        min: rs.iter().map(|r| r.s.wall_s).fold(f64::INFINITY, f64::min),
        n: rs.len(),
        cpu: median(rs.iter().map(|r| r.s.user_s + r.s.sys_s).collect()),
        wait: median(rs.iter().map(|r| r.s.runq_wait_s).collect()),
        startup: median(rs.iter().map(|r| r.s.first_write_s).collect()),
        write: median(
            rs.iter()
                .map(|r| r.s.all_written_s - r.s.first_write_s)
                .collect(),
        ),
        tail: median(rs.iter().map(|r| r.s.wall_s - r.s.all_written_s).collect()),
        rss: rs.iter().map(|r| r.s.max_rss_kib).max().unwrap_or(0) as f64 / 1024.0,
        anon: rs.iter().map(|r| r.s.peak_anon_kib).max().unwrap_or(0) as f64 / 1024.0,
        read: median(
            rs.iter()
                .map(|r| r.s.read_bytes.map_or(f64::NAN, |b| b as f64))
                .collect(),
        ),
        rchar: median(
            rs.iter()
                .map(|r| r.s.rchar.map_or(f64::NAN, |b| b as f64))
                .collect(),
        ),
    })
}

/// The floor for a cache state: the faster (by median) of the two plain copies.
fn floor(rows: &[Row], size: u64, cache: &str) -> Option<(f64, &'static str)> {
    let rw = agg(rows, size, "floor_rw", cache, 0).map(|a| (a.med, "read/write"));
    let cfr = agg(rows, size, "floor_cfr", cache, 0).map(|a| (a.med, "copy_file_range"));
    match (rw, cfr) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "**PASS**"
    } else {
        "**FAIL**"
    }
}

fn gb(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else {
        format!("{:.0} MB", b / 1e6)
    }
}

fn plot(doc_dir: &Path, meta: &Meta, csv_path: &Path) -> String {
    let png = doc_dir.join("bench.png");
    let subtitle = format!(
        "{} · {} cores · {} · {} · {}",
        meta.cpu,
        meta.cores,
        meta.ram,
        meta.started,
        meta.commit.chars().take(12).collect::<String>()
    );
    let script = repo().join("benches/merge/plot.py");
    let mut errors = Vec::new();
    for py in &meta.plot_pythons {
        match Command::new(py)
            .arg(&script)
            .arg(csv_path)
            .arg(&png)
            .arg(&subtitle)
            .output()
        {
            Ok(o) if o.status.success() => return format!("![time and memory vs model size](bench.png)\n\nPlotted with {} by `benches/merge/plot.py` from `bench.csv`.", py.display()),
            Ok(o) => errors.push(format!(
                "{}: {}",
                py.display(),
                String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
            )),
            Err(e) => errors.push(format!("{}: {e}", py.display())),
        }
    }
    format!(
        "_No plot: no Python with matplotlib found ({}). Install matplotlib and rerun, or run \
         `python benches/merge/plot.py docs/bench.csv docs/bench.png`._",
        errors.join("; ")
    )
}

pub fn write_all(doc_dir: &Path, meta: &Meta, infos: &[SizeInfo], rows: &[Row]) -> Result<()> {
    let csv_path = doc_dir.join("bench.csv");
    // The multi-adapter rows go to bench-compose.csv (write_compose), the extractions to
    // bench-extract.csv (write_extract).
    fs::write(
        &csv_path,
        csv(rows
            .iter()
            .filter(|r| !multi::is_multi(&r.mode) && !extract::is_extract(&r.mode))),
    )?;
    let plot_md = plot(doc_dir, meta, &csv_path);
    fs::write(
        doc_dir.join("BENCHMARKS.md"),
        markdown(meta, infos, rows, &plot_md),
    )?;
    Ok(())
}

/// The heading and the rows of the Machine section every report has.
pub fn machine_rows(w: &mut String, meta: &Meta) {
    let _ = writeln!(w, "## Machine\n");
    let _ = writeln!(w, "| | |\n|---|---|");
    let _ = writeln!(w, "| CPU | {} ({} cores available) |", meta.cpu, meta.cores);
    let _ = writeln!(w, "| RAM | {} |", meta.ram);
    let _ = writeln!(w, "| Storage of the data folder | {} |", meta.storage);
    let _ = writeln!(w, "| Kernel | Linux {} |", meta.kernel);
    let _ = writeln!(w, "| Commit | `{}` |", meta.commit);
    let _ = writeln!(w, "| Compiler | {} |", meta.rustc);
    let _ = writeln!(w, "| Binary measured | `{}` |", meta.bin.display());
}

/// The Machine section, shared by both reports.
fn machine(w: &mut String, meta: &Meta, infos: &[SizeInfo]) {
    machine_rows(w, meta);
    if let Some(b) = &meta.extract_bin {
        let _ = writeln!(w, "| Extraction binary | `{}` |", b.display());
    }
    let _ = writeln!(w, "| PEFT recipe | {} |", meta.python);
    let _ = writeln!(
        w,
        "| Page cache | {} |",
        if meta.cold {
            "cold runs drop it (`sync; echo 3 > /proc/sys/vm/drop_caches`) before each run"
        } else {
            "warm only: dropping the page cache is not permitted here (or --cold off)"
        }
    );
    let loads: Vec<String> = infos
        .iter()
        .map(|i| format!("{} MB: {} → {}", i.size_mb, i.load_before, i.load_after))
        .collect();
    let _ = writeln!(
        w,
        "| Load average (1/5/15 min) before → after each size | {} |\n",
        loads.join("; ")
    );
    let _ = writeln!(
        w,
        "Other processes on the machine share the CPUs and the disk; a load average well above 0 \
         while this ran means the numbers are noisy.\n"
    );
}

fn markdown(meta: &Meta, infos: &[SizeInfo], rows: &[Row], plot_md: &str) -> String {
    let mut m = String::new();
    let w = &mut m;
    let _ = writeln!(
        w,
        "# Benchmarks: `boft-merge` against the disk floor and PEFT\n"
    );
    let _ = writeln!(
        w,
        "_Written by the benchmark harness (`benches/merge/`) from {} to {}. Do not edit by hand: \
         rerun the command below. Every timed run is in [bench.csv](bench.csv)._\n",
        meta.started, meta.finished
    );
    machine(w, meta, infos);

    let _ = writeln!(w, "## Reproduce\n");
    let _ = writeln!(w, "```sh\n{}\n```\n", meta.command);
    let _ = writeln!(
        w,
        "`cargo bench` builds `target/release/boft-merge` (release profile) and the harness. \
         Generated data goes to `bench-data/` (git-ignored) and is deleted after each size unless \
         `--keep-data`; the largest size needs about 4.5× its size in free disk. Options: \
         `cargo bench --bench merge -- run --help`. To make only the data: \
         `cargo bench --bench merge -- gen --size 230 --out bench-data/m230`.\n"
    );

    let _ = writeln!(w, "## Method\n");
    let _ = writeln!(
        w,
        "* **Data.** Synthetic Llama checkpoints (`LlamaForCausalLM` config; embed_tokens, per layer \
         q/k/v/o/gate/up/down + 2 RMSNorms, final norm, untied lm_head), deterministic \
         pseudo-random values, sharded the way Hugging Face does (state-dict order, new shard when \
         the next tensor would overflow the maximum shard size; tensors sorted by name in each \
         shard; index with `total_size`). Sizes are reached by the number of layers at a fixed \
         hidden size, so every size has the same tensor shapes. The adapter is a PEFT BOFT folder \
         (`adapter_config.json`, `adapter_model.safetensors` with `boft_R` (N, D, b, b) and \
         `boft_s` (out, 1), f32) targeting all seven linear layers of every decoder layer.\n\
         * **Commands**, each a separate child process, on the same files:\n  \
         * *floor read/write*: the harness's own `copy --mode rw` (1 MiB `read`/`write` loop) of \
         every file of the base folder, then `fsync` of each output file;\n  \
         * *floor copy_file_range*: the same with `copy_file_range(2)` in 64 MiB requests (what \
         `boft-merge` uses for untouched tensors), then `fsync`;\n  \
         * `boft-merge --base B --adapter A -o OUT -q` (it fsyncs its outputs);\n  \
         * `boft-merge --unmerge` of a merged copy (made untimed beforehand) with the same adapter;\n  \
         * the PEFT recipe (`benches/merge/peft_merge.py`): `AutoModelForCausalLM.from_pretrained` \
         + `PeftModel.from_pretrained` + `merge_and_unload` + `save_pretrained`, then `fsync` of \
         its outputs; timed as a whole Python process (imports included; the phases are listed \
         below). PEFT needs its CUDA extension for more than one butterfly factor; a CPU stand-in \
         (as in `fixtures/generate/make_peft_boft.py`) is installed so it really merges all factors.\n\
         * **Cache states.** *warm*: all inputs read into the page cache just before the run. \
         *cold*: `sync` and `echo 3 > /proc/sys/vm/drop_caches` just before the run. Before every \
         run the previous output is deleted and `sync` is called (untimed), so no run pays for \
         another's writeback. Commands are interleaved within each repeat.\n\
         * **Numbers.** Wall time: spawn to reap. {} runs per command and cache state; tables give \
         the **median** (and the minimum). GB/s = bytes of the base's files / wall time. \
         × floor = median / the faster median of the two floor copies in the same cache state. \
         Peak RSS = the largest `VmHWM` (the kernel's resident high-water mark, which includes \
         file pages of the memory-mapped base) read from `/proc/<pid>/status`. \
         Peak anon = the largest `RssAnon` in `/proc/<pid>/status`, sampled every {} ms (heap and \
         buffers, not the page cache; a spike shorter than the interval can be missed). \
         Run-queue wait = time the command's threads were runnable but had no CPU (from \
         `/proc/<pid>/task/*/schedstat`): other load on the machine shows up there. \
         bench.csv also records `read_bytes` (bytes read from storage) and `rchar` of \
         `/proc/<pid>/io`, read after the child exits and before it is reaped.\n",
        meta.repeats, meta.sample_ms
    );
    if meta.multi {
        let _ = writeln!(
            w,
            "* **Several adapters in one pass** (issue 13: two adapters, a switch, a batch of {})              were measured in the same repeats and cache states, interleaved with the commands              above; their method, targets and numbers are in [{COMPOSE_MD}]({COMPOSE_MD}) and              their runs in [{COMPOSE_CSV}]({COMPOSE_CSV}).\n",
            multi::N
        );
    }
    if meta.extract_bin.is_some() {
        let _ = writeln!(
            w,
            "* **Extraction** (`boft-extract`, OFT and BOFT fits of the base merged with the \
             adapter) was measured in the same repeats and cache states; its method, targets and \
             numbers are in [{EXTRACT_MD}]({EXTRACT_MD}) and its runs in \
             [{EXTRACT_CSV}]({EXTRACT_CSV}).\n"
        );
    }

    // ---- targets
    let _ = writeln!(w, "## Targets (issue 5)\n");
    let reference = infos.iter().min_by_key(|i| i.size_mb.abs_diff(230));
    let largest = infos.iter().max_by_key(|i| i.base_bytes);
    let _ = writeln!(w, "| target | measured | status |\n|---|---|---|");
    if let Some(r) = reference {
        let sz = r.size_mb;
        for cache in ["warm", "cold"] {
            if let (Some(mg), Some((fl, which))) =
                (agg(rows, sz, "merge", cache, 0), floor(rows, sz, cache))
            {
                let ratio = mg.med / fl;
                let _ = writeln!(
                    w,
                    "| merge ≤ 1.5× floor, {} ({cache} cache) | {:.3} s vs floor {:.3} s ({which}): **{ratio:.2}×** | {} |",
                    gb(r.base_bytes),
                    mg.med,
                    fl,
                    pass(ratio <= 1.5)
                );
            }
        }
        match (
            agg(rows, sz, "merge", "warm", 0),
            agg(rows, sz, "peft", "warm", 0),
        ) {
            (Some(mg), Some(p)) => {
                let x = p.med / mg.med;
                let _ = writeln!(
                    w,
                    "| ≥ 30× faster than PEFT, {} (warm) | PEFT {:.1} s vs {:.3} s: **{x:.0}×** | {} |",
                    gb(r.base_bytes),
                    p.med,
                    mg.med,
                    pass(x >= 30.0)
                );
            }
            _ => {
                let _ = writeln!(w, "| ≥ 30× faster than PEFT | PEFT not measured | — |");
            }
        }
    }
    for i in infos {
        let is_ref = reference.is_some_and(|r| r.size_mb == i.size_mb);
        let is_big = largest.is_some_and(|l| l.size_mb == i.size_mb);
        if !(is_ref || is_big) {
            continue;
        }
        let anon = ["merge", "unmerge"]
            .iter()
            .filter_map(|m| agg(rows, i.size_mb, m, "warm", 0).map(|a| a.anon))
            .chain(
                ["merge", "unmerge"]
                    .iter()
                    .filter_map(|m| agg(rows, i.size_mb, m, "cold", 0).map(|a| a.anon)),
            )
            .fold(0f64, f64::max);
        let bound = i.bound() / MIB;
        let _ = writeln!(
            w,
            "| peak anon ≤ 2× largest tensor + 64 MiB, {} | {anon:.1} MiB vs bound {bound:.1} MiB (largest tensor {:.1} MiB) | {} |",
            gb(i.base_bytes),
            i.largest() as f64 / MIB,
            pass(anon <= bound)
        );
    }
    if largest.is_none_or(|l| l.base_bytes < 4_000_000_000) {
        let _ = writeln!(
            w,
            "| peak anon bound at ≥ 4 GB | no size of ≥ 4 GB (4·10⁹ bytes) was run | — |"
        );
    }
    // Linearity: seconds per GB of the warm merge across sizes.
    let per_gb: Vec<(f64, f64)> = infos
        .iter()
        .filter_map(|i| {
            agg(rows, i.size_mb, "merge", "warm", 0).map(|a| {
                (
                    i.base_bytes as f64 / 1e9,
                    a.med / (i.base_bytes as f64 / 1e9),
                )
            })
        })
        .collect();
    if per_gb.len() >= 2 {
        let lo = per_gb.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
        let hi = per_gb.iter().map(|x| x.1).fold(0f64, f64::max);
        let span_lo = per_gb.iter().map(|x| x.0).fold(f64::INFINITY, f64::min);
        let span_hi = per_gb.iter().map(|x| x.0).fold(0f64, f64::max);
        let list: Vec<String> = per_gb
            .iter()
            .map(|(g, s)| format!("{g:.2} GB: {s:.2} s/GB"))
            .collect();
        let covers = span_lo <= 0.15 && span_hi >= 4.0;
        let _ = writeln!(
            w,
            "| linear in size, 100 MB → ≥ 4 GB (warm merge; pass: max/min of s/GB ≤ 1.25) | {}; max/min {:.2}{} | {} |",
            list.join(", "),
            hi / lo,
            if covers { "" } else { " (range does not cover 0.1–4 GB)" },
            if covers { pass(hi / lo <= 1.25) } else { "—" }
        );
    }
    if let Some(r) = reference {
        let t: Vec<(usize, Agg)> = rows
            .iter()
            .filter(|x| x.size_mb == r.size_mb && x.threads > 0)
            .map(|x| x.threads)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter_map(|t| agg(rows, r.size_mb, "merge", "warm", t).map(|a| (t, a)))
            .collect();
        if let (Some(one), Some(all)) = (t.first(), t.last()) {
            if one.0 == 1 && all.0 > 1 {
                let sp = one.1.med / all.1.med;
                let _ = writeln!(
                    w,
                    "| threads scale across cores, {} (warm; pass: speedup ≥ 0.75 × threads) | 1 thread {:.3} s, {} threads {:.3} s: **{sp:.2}×** | {} |",
                    gb(r.base_bytes),
                    one.1.med,
                    all.0,
                    all.1.med,
                    pass(sp >= 0.75 * all.0 as f64)
                );
            }
        }
    }
    let _ = writeln!(w);

    // ---- per size
    let _ = writeln!(w, "## Results by size\n");
    for i in infos {
        let sp = &i.spec;
        let _ = writeln!(
            w,
            "### {} MB requested: {} in {} shard(s)\n",
            i.size_mb,
            gb(i.base_bytes),
            i.shards
        );
        let _ = writeln!(
            w,
            "{} layers, hidden {}, intermediate {}, {} heads ({} KV), vocab {}, {}; adapter: BOFT \
             b={}, {} factor(s), {} targets, {}. Largest tensor {:.1} MiB (largest targeted {:.1} \
             MiB); memory bound 2× largest + 64 MiB = {:.1} MiB. {}\n",
            sp.layers,
            sp.hidden,
            sp.intermediate,
            sp.heads,
            sp.kv_heads,
            sp.vocab,
            sp.dtype.cli_name(),
            sp.block_size,
            sp.factors,
            sp.layers * crate::gen::MODULES.len(),
            gb(i.adapter_bytes),
            i.largest() as f64 / MIB,
            sp.largest_tensor_bytes(true) as f64 / MIB,
            i.bound() / MIB,
            if i.gen_seconds > 0.0 {
                format!("Generated in {:.1} s.", i.gen_seconds)
            } else {
                "Data reused from an earlier run.".into()
            }
        );
        if !i.sanity.is_empty() {
            let _ = writeln!(w, "Sanity check (layer 0): {}.\n", i.sanity);
        }
        let _ = writeln!(
            w,
            "| command | cache | median s | min s | runs | GB/s | × floor | CPU s (user+sys) | run-queue wait s | peak RSS MiB | peak anon MiB |\n\
             |---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
        );
        for (mode, label) in [
            ("floor_rw", "floor: read/write + fsync"),
            ("floor_cfr", "floor: copy_file_range + fsync"),
            ("merge", "`boft-merge`"),
            ("unmerge", "`boft-merge --unmerge`"),
            ("peft", "PEFT recipe"),
        ] {
            for cache in ["warm", "cold"] {
                let Some(a) = agg(rows, i.size_mb, mode, cache, 0) else {
                    continue;
                };
                let x = floor(rows, i.size_mb, cache)
                    .map(|(f, _)| format!("{:.2}", a.med / f))
                    .unwrap_or("—".into());
                let _ = writeln!(
                    w,
                    "| {label} | {cache} | {:.3} | {:.3} | {} | {:.2} | {x} | {:.2} | {:.2} | {:.1} | {:.1} |",
                    a.med,
                    a.min,
                    a.n,
                    i.base_bytes as f64 / a.med / 1e9,
                    a.cpu,
                    a.wait,
                    a.rss,
                    a.anon
                );
            }
        }
        let _ = writeln!(w);
        let mut phase_rows = Vec::new();
        let groups: BTreeSet<(String, String, usize)> = rows
            .iter()
            .filter(|r| r.size_mb == i.size_mb && r.mode != "peft")
            .map(|r| (r.mode.clone(), r.cache.clone(), r.threads))
            .collect();
        for (mode, cache, threads) in &groups {
            if let Some(a) = agg(rows, i.size_mb, mode, cache, *threads) {
                if a.startup.is_finite() && a.write.is_finite() {
                    phase_rows.push(format!(
                        "| {mode} | {cache} | {} | {:.3} | {:.3} | {:.3} | {:.3} |",
                        if *threads == 0 {
                            "all".to_string()
                        } else {
                            threads.to_string()
                        },
                        a.startup,
                        a.write,
                        a.tail,
                        a.med
                    ));
                }
            }
        }
        if !phase_rows.is_empty() {
            let _ = writeln!(
                w,
                "Where the time goes (medians, s; from `wchar` in `/proc/<pid>/io`, sampled): \
                 *startup* = spawn → first output byte (open inputs, load and convert the adapter, \
                 plan); *write* = first → last output byte handed to the kernel (transform and \
                 copy); *tail* = last byte → exit (fsync, rename). The floor copies fsync each \
                 file as they go, so their tail is only the last file's fsync.\n\n\
                 | command | cache | threads | startup | write | tail | total |\n\
                 |---|---|--:|--:|--:|--:|--:|\n{}\n",
                phase_rows.join("\n")
            );
        }
        let peft_notes: Vec<&str> = rows
            .iter()
            .filter(|r| r.size_mb == i.size_mb && r.mode == "peft" && !r.note.is_empty())
            .map(|r| r.note.as_str())
            .collect();
        if !peft_notes.is_empty() {
            let _ = writeln!(
                w,
                "PEFT phases (s): {}.\n",
                peft_notes.join(" | ").replace('=', " ")
            );
        }
        let threads: BTreeSet<usize> = rows
            .iter()
            .filter(|r| r.size_mb == i.size_mb && r.threads > 0)
            .map(|r| r.threads)
            .collect();
        if !threads.is_empty() {
            let one = agg(rows, i.size_mb, "merge", "warm", 1).map(|a| a.med);
            let _ = writeln!(
                w,
                "Thread scaling (`boft-merge --threads N`, warm):\n\n\
                 | threads | median s | min s | speedup vs 1 | CPU s | CPU / wall | run-queue wait s | × floor (warm) |\n\
                 |--:|--:|--:|--:|--:|--:|--:|--:|"
            );
            for t in threads {
                if let Some(a) = agg(rows, i.size_mb, "merge", "warm", t) {
                    let x = floor(rows, i.size_mb, "warm")
                        .map(|(f, _)| format!("{:.2}", a.med / f))
                        .unwrap_or("—".into());
                    let _ = writeln!(
                        w,
                        "| {t} | {:.3} | {:.3} | {} | {:.2} | {:.2} | {:.2} | {x} |",
                        a.med,
                        a.min,
                        one.map(|o| format!("{:.2}", o / a.med))
                            .unwrap_or("—".into()),
                        a.cpu,
                        a.cpu / a.med,
                        a.wait
                    );
                }
            }
            let _ = writeln!(w);
        }
    }
    let _ = writeln!(w, "## Plot\n\n{plot_md}");
    m
}

// ------------------------------------------------------------------------------------------
// Several adapters in one pass (issue 13): BENCHMARKS-compose.md and bench-compose.csv
// ------------------------------------------------------------------------------------------

pub const COMPOSE_MD: &str = "BENCHMARKS-compose.md";
pub const COMPOSE_CSV: &str = "bench-compose.csv";

/// Target of issue 13: a one-pass switch takes at most this share of un-merge + merge.
const SWITCH_TARGET: f64 = 0.6;
/// Target of issue 13: a batch of 4 takes at most this many times the floor of writing 4 copies.
const BATCH_TARGET: f64 = 1.3;
/// A batch reads the base from storage "about once": at most this many times the bytes of its
/// inputs (base files + adapters) in the cold state.
const READ_ONCE_SLACK: f64 = 1.25;

/// Rows of the multi-adapter report: label, processes, outputs.
const COMPOSE_ROWS: [(&str, &str, usize, usize); 12] = [
    ("floor_rw", "floor: read/write + fsync", 1, 1),
    ("floor_cfr", "floor: copy_file_range + fsync", 1, 1),
    ("merge", "`boft-merge` (A1)", 1, 1),
    ("unmerge", "`boft-merge --unmerge` (A1)", 1, 1),
    (
        "merge2",
        "2 adapters, one pass: `--adapter A1 --adapter A2`",
        1,
        1,
    ),
    (
        "merge2_seq",
        "2 adapters, two merges: A1 → tmp, then A2",
        2,
        1,
    ),
    (
        "switch",
        "switch, one pass: `--unmerge-adapter A1 --adapter A2`",
        1,
        1,
    ),
    (
        "switch_seq",
        "switch, two runs: `--unmerge` A1 → tmp, then merge A2",
        2,
        1,
    ),
    (
        "floor4_rw",
        "floor ×4: read/write + fsync to 4 outputs",
        1,
        4,
    ),
    (
        "floor4_cfr",
        "floor ×4: copy_file_range + fsync to 4 outputs",
        1,
        4,
    ),
    ("batch4", "batch of 4: `--batch` (A1, A2, A3, A4)", 1, 4),
    (
        "merge_x4",
        "4 single merges (A1 … A4), one after another",
        4,
        4,
    ),
];

/// Outputs written by a row of `mode`.
fn outputs_of(mode: &str) -> usize {
    COMPOSE_ROWS.iter().find(|r| r.0 == mode).map_or(1, |r| r.3)
}

/// The floor of writing four copies: the faster (by median) of the two floor ×4 copies.
fn floor4(rows: &[Row], size: u64, cache: &str) -> Option<(f64, &'static str)> {
    let rw = agg(rows, size, "floor4_rw", cache, 0).map(|a| (a.med, "read/write"));
    let cfr = agg(rows, size, "floor4_cfr", cache, 0).map(|a| (a.med, "copy_file_range"));
    match (rw, cfr) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn mb(bytes: f64) -> String {
    if bytes.is_finite() {
        format!("{:.1}", bytes / 1e6)
    } else {
        "—".into()
    }
}

pub fn write_compose(doc_dir: &Path, meta: &Meta, infos: &[SizeInfo], rows: &[Row]) -> Result<()> {
    // Every run this report uses: the multi-adapter rows and the single-adapter rows (floor,
    // merge, un-merge) measured beside them.
    fs::write(
        doc_dir.join(COMPOSE_CSV),
        csv(rows
            .iter()
            .filter(|r| r.threads == 0 && COMPOSE_ROWS.iter().any(|c| c.0 == r.mode))),
    )?;
    fs::write(
        doc_dir.join(COMPOSE_MD),
        compose_markdown(meta, infos, rows),
    )?;
    Ok(())
}

fn compose_markdown(meta: &Meta, infos: &[SizeInfo], rows: &[Row]) -> String {
    let mut m = String::new();
    let w = &mut m;
    let n = multi::N;
    let _ = writeln!(w, "# Benchmarks: several adapters in one pass (issue 13)\n");
    let _ = writeln!(
        w,
        "_Written by the benchmark harness (`benches/merge/`, `run`) from {} to {}. Do not edit by \
         hand: rerun the command below. Every timed run is in [{COMPOSE_CSV}]({COMPOSE_CSV}). The \
         single-adapter benchmark (all sizes, PEFT, thread scaling) is [BENCHMARKS.md](BENCHMARKS.md), \
         which a plain `run` rewrites and `--multi-only` leaves as it is._\n",
        meta.started, meta.finished
    );
    machine(w, meta, infos);

    let _ = writeln!(w, "## Reproduce\n");
    let _ = writeln!(w, "```sh\n{}\n```\n", meta.command);
    let _ = writeln!(
        w,
        "A plain `cargo bench --bench merge -- run` measures these commands too and writes this \
         file beside BENCHMARKS.md (`--no-multi` skips them). `--multi-only` measures only the \
         floor copies, the single merge and un-merge and the commands below (no PEFT, no thread \
         scaling) and writes only this file and {COMPOSE_CSV}. Options: `cargo bench --bench \
         merge -- run --help`.\n"
    );

    let _ = writeln!(w, "## Method\n");
    let _ = writeln!(
        w,
        "* **Data.** The base and adapter *A1* are the ones BENCHMARKS.md describes (synthetic \
         sharded Llama checkpoint; PEFT BOFT adapter folder targeting all seven linear layers of \
         every layer). *A2*, *A3*, *A4* are made by the same generator (`gen.rs`, \
         `write_adapter`): same geometry, keys, config and value ranges, another seed of the \
         pseudo-random values each. *M1* is the base merged with A1, made untimed beforehand \
         (the same copy the un-merge row uses).\n\
         * **Commands**, each line one child process (`-q`; `boft-merge` fsyncs its outputs):\n  \
         * *2 adapters, one pass*: `boft-merge --base B --adapter A1 --adapter A2 -o OUT`;\n  \
         * *2 adapters, two merges*: `boft-merge --base B --adapter A1 -o TMP`, then \
         `boft-merge --base TMP --adapter A2 -o OUT`;\n  \
         * *switch, one pass*: `boft-merge --base M1 --unmerge-adapter A1 --adapter A2 -o OUT`;\n  \
         * *switch, two runs*: `boft-merge --base M1 --adapter A1 --unmerge -o TMP`, then \
         `boft-merge --base TMP --adapter A2 -o OUT`;\n  \
         * *batch of {n}*: `boft-merge --base B --batch jobs.json`, job k writing OUTk with \
         adapter Ak (absolute paths);\n  \
         * *{n} single merges*: `boft-merge --base B --adapter Ak -o OUTk` for k = 1 … {n}, one \
         after another;\n  \
         * *floor ×{n}*: the harness's floor copy (`copy --mode rw` or `--mode cfr`, as in \
         BENCHMARKS.md) given {n} destinations: one process copies the base folder to each in \
         turn, fsyncing each file. The floor of writing {n} copies is the faster median of the \
         two.\n\
         * **Timing.** A measurement with several processes is the sum of their wall times \
         (spawn to reap, run back to back; CPU time, run-queue wait and bytes read are summed, \
         memory is the largest); the intermediate TMP is deleted afterwards, untimed. Every \
         measurement is interleaved with the single-adapter rows (floor, merge, un-merge) in each \
         repeat, so they share the machine's drifts. {} runs per measurement and cache state; \
         tables give the **median** (and the minimum); ratios are ratios of medians in the same \
         cache state.\n\
         * **Cache states**, set once per measurement, as for the single-adapter rows: before it, \
         its previous outputs are deleted and `sync` is called; *warm*: every input (B or M1, \
         and each adapter it uses) read into the page cache; *cold*: `sync` and `echo 3 > \
         /proc/sys/vm/drop_caches`. The later processes of a sequence find in the cache what the \
         earlier ones left there (the TMP just written, the base just read), as they would in a \
         script.\n\
         * **Bytes read.** `/proc/<pid>/io` of each child, read once more after it has exited \
         and before the harness reaps it (`waitid(WNOWAIT)`; otherwise the last of the samples \
         taken every {} ms). *read from storage* = `read_bytes`: bytes the process caused to be \
         read from the disk, page faults of memory-mapped files included (how `boft-merge` reads \
         the base), page-cache hits not. *rchar* = bytes passed through read-like system calls \
         (`read`, `pread`, `copy_file_range`), from the cache or not; memory-mapped reads are not \
         in it. Both summed over the processes of a sequence. Caveat: a base that fits in the \
         page cache is read from the disk only once by anything that reads it several times in \
         a row, so in the cold state the {n} single merges also read it from storage about once \
         (the first merge; the next three hit the cache); the batch's figure shows that the one \
         process does not read it more than once, and its time shows what the single pass saves.\n",
        meta.repeats, meta.sample_ms
    );

    // ---- targets at the size closest to 230 MB
    let _ = writeln!(w, "## Targets (issue 13)\n");
    let _ = writeln!(w, "| target | measured | status |\n|---|---|---|");
    let reference = infos
        .iter()
        .filter(|i| !i.multi_adapter_bytes.is_empty())
        .min_by_key(|i| i.size_mb.abs_diff(230));
    if let Some(r) = reference {
        let sz = r.size_mb;
        for cache in ["warm", "cold"] {
            if let (Some(one), Some(two)) = (
                agg(rows, sz, "switch", cache, 0),
                agg(rows, sz, "switch_seq", cache, 0),
            ) {
                let x = one.med / two.med;
                let _ = writeln!(
                    w,
                    "| switch in one pass ≤ {SWITCH_TARGET}× (`--unmerge` + merge), {} ({cache} cache) | {:.3} s vs {:.3} s: **{x:.2}×** | {} |",
                    gb(r.base_bytes),
                    one.med,
                    two.med,
                    pass(x <= SWITCH_TARGET)
                );
            }
        }
        for cache in ["warm", "cold"] {
            if let (Some(b), Some((fl, which))) =
                (agg(rows, sz, "batch4", cache, 0), floor4(rows, sz, cache))
            {
                let x = b.med / fl;
                let _ = writeln!(
                    w,
                    "| batch of {n} ≤ {BATCH_TARGET}× the floor of writing {n} copies, {} ({cache} cache) | {:.3} s vs floor ×{n} {:.3} s ({which}): **{x:.2}×** | {} |",
                    gb(r.base_bytes),
                    b.med,
                    fl,
                    pass(x <= BATCH_TARGET)
                );
            }
        }
        let inputs = r.base_bytes + r.multi_adapter_bytes.iter().sum::<u64>();
        match agg(rows, sz, "batch4", "cold", 0) {
            Some(b) if b.read.is_finite() => {
                let singles = agg(rows, sz, "merge_x4", "cold", 0)
                    .map(|a| format!("; {n} single merges: {} MB", mb(a.read)))
                    .unwrap_or_default();
                let _ = writeln!(
                    w,
                    "| batch of {n} reads the base from storage about once (cold; pass: read ≤ {READ_ONCE_SLACK}× base files + {n} adapters = {} MB) | {} MB = **{:.2}×** the base files ({} MB){singles} | {} |",
                    mb(inputs as f64 * READ_ONCE_SLACK),
                    mb(b.read),
                    b.read / r.base_bytes as f64,
                    mb(r.base_bytes as f64),
                    pass(b.read <= inputs as f64 * READ_ONCE_SLACK)
                );
            }
            _ => {
                let _ = writeln!(
                    w,
                    "| batch of {n} reads the base from storage about once (cold) | no cold runs (or no /proc/<pid>/io) | — |"
                );
            }
        }
    }
    let _ = writeln!(w);

    // ---- per size
    let _ = writeln!(w, "## Results by size\n");
    for i in infos.iter().filter(|i| !i.multi_adapter_bytes.is_empty()) {
        let sz = i.size_mb;
        let _ = writeln!(
            w,
            "### {} MB requested: {} in {} shard(s)\n",
            sz,
            gb(i.base_bytes),
            i.shards
        );
        let ad: Vec<String> = i.multi_adapter_bytes.iter().map(|&b| gb(b)).collect();
        let _ = writeln!(
            w,
            "{} layers, hidden {}, {}; adapters A1 … A{}: BOFT b={}, {} factor(s), {} targets, {} \
             (adapter_model.safetensors each).\n",
            i.spec.layers,
            i.spec.hidden,
            i.spec.dtype.cli_name(),
            ad.len(),
            i.spec.block_size,
            i.spec.factors,
            i.spec.layers * crate::gen::MODULES.len(),
            ad.join(", ")
        );
        if !i.multi_sanity.is_empty() {
            let _ = writeln!(
                w,
                "Sanity check (layer 0, first repeat): {}.\n",
                i.multi_sanity
            );
        }
        let _ = writeln!(
            w,
            "| command | processes | outputs | cache | median s | min s | runs | × floor (as many copies) | CPU s (user+sys) | run-queue wait s | read from storage MB | rchar MB | peak anon MiB |\n\
             |---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
        );
        for cache in ["warm", "cold"] {
            for (mode, label, procs, _) in COMPOSE_ROWS {
                let Some(a) = agg(rows, sz, mode, cache, 0) else {
                    continue;
                };
                let outs = outputs_of(mode);
                let fl = if outs == 1 {
                    floor(rows, sz, cache)
                } else {
                    floor4(rows, sz, cache)
                };
                let x = fl
                    .map(|(f, _)| format!("{:.2}", a.med / f))
                    .unwrap_or("—".into());
                let _ = writeln!(
                    w,
                    "| {label} | {procs} | {outs} | {cache} | {:.3} | {:.3} | {} | {x} | {:.2} | {:.2} | {} | {} | {:.1} |",
                    a.med,
                    a.min,
                    a.n,
                    a.cpu,
                    a.wait,
                    mb(a.read),
                    mb(a.rchar),
                    a.anon
                );
            }
        }
        let _ = writeln!(w);
        let _ = writeln!(
            w,
            "One pass against the same work done by single-adapter runs (ratios of medians; below \
             1 the one pass is faster):\n\n\
             | comparison | cache | one pass s | the alternative s | ratio | target |\n\
             |---|---|--:|--:|--:|---|"
        );
        for cache in ["warm", "cold"] {
            let pairs: [(&str, &str, &str, Option<f64>); 3] = [
                (
                    "2 adapters: one pass / two merges",
                    "merge2",
                    "merge2_seq",
                    None,
                ),
                (
                    "switch: one pass / (`--unmerge`, then merge)",
                    "switch",
                    "switch_seq",
                    Some(SWITCH_TARGET),
                ),
                ("batch of 4 / 4 single merges", "batch4", "merge_x4", None),
            ];
            for (label, a, b, target) in pairs {
                if let (Some(x), Some(y)) = (agg(rows, sz, a, cache, 0), agg(rows, sz, b, cache, 0))
                {
                    let r = x.med / y.med;
                    let t = target
                        .map(|t| format!("≤ {t}: {}", pass(r <= t)))
                        .unwrap_or("—".into());
                    let _ = writeln!(
                        w,
                        "| {label} | {cache} | {:.3} | {:.3} | {r:.2} | {t} |",
                        x.med, y.med
                    );
                }
            }
            if let (Some(x), Some((fl, which))) =
                (agg(rows, sz, "batch4", cache, 0), floor4(rows, sz, cache))
            {
                let r = x.med / fl;
                let _ = writeln!(
                    w,
                    "| batch of 4 / floor of writing 4 copies ({which}) | {cache} | {:.3} | {fl:.3} | {r:.2} | ≤ {BATCH_TARGET}: {} |",
                    x.med,
                    pass(r <= BATCH_TARGET)
                );
            }
            // The same two comparisons against the standalone rows, which no back-to-back
            // sequence slows: reported beside the targets, not instead of them.
            if let (Some(x), Some(u), Some(m)) = (
                agg(rows, sz, "switch", cache, 0),
                agg(rows, sz, "unmerge", cache, 0),
                agg(rows, sz, "merge", cache, 0),
            ) {
                let y = u.med + m.med;
                let _ = writeln!(
                    w,
                    "| switch: one pass / (standalone `--unmerge` row + standalone merge row) | {cache} | {:.3} | {y:.3} | {:.2} | info |",
                    x.med,
                    x.med / y
                );
            }
            if let (Some(x), Some((fl, which))) =
                (agg(rows, sz, "batch4", cache, 0), floor(rows, sz, cache))
            {
                let y = 4.0 * fl;
                let _ = writeln!(
                    w,
                    "| batch of 4 / 4 × the floor of one copy ({which}) | {cache} | {:.3} | {y:.3} | {:.2} | info |",
                    x.med,
                    x.med / y
                );
            }
        }
        let _ = writeln!(w);
        let notes: Vec<String> = rows
            .iter()
            .filter(|r| r.size_mb == sz && r.note.starts_with("steps="))
            .map(|r| {
                format!(
                    "{} {} #{}: {}",
                    r.mode,
                    r.cache,
                    r.rep + 1,
                    r.note.trim_start_matches("steps=")
                )
            })
            .collect();
        if !notes.is_empty() {
            let _ = writeln!(
                w,
                "Wall time of each process of the sequences (s): {}.\n",
                notes.join("; ")
            );
        }
    }
    m
}

// ------------------------------------------------------------------------------------------
// Extraction: BENCHMARKS-extract.md and bench-extract.csv
// ------------------------------------------------------------------------------------------

pub const EXTRACT_MD: &str = "BENCHMARKS-extract.md";
pub const EXTRACT_CSV: &str = "bench-extract.csv";

/// Rows of the extraction report: mode, label.
const EXTRACT_ROWS: [(&str, &str); 6] = [
    ("floor_rw", "floor: read/write + fsync"),
    ("floor_cfr", "floor: copy_file_range + fsync"),
    ("merge", "`boft-merge` (the reference)"),
    ("extract_oft_plain", "`boft-extract` OFT (m = 1), no scale"),
    ("extract_oft", "`boft-extract` OFT (m = 1)"),
    ("extract_boft", "`boft-extract` BOFT (m = 2)"),
];

/// "Does not grow with the model": the extractions' peak anonymous memory varies by at most this
/// factor (max/min) across the sizes run.
const EXTRACT_ANON_GROWTH: f64 = 1.25;

pub fn write_extract(doc_dir: &Path, meta: &Meta, infos: &[SizeInfo], rows: &[Row]) -> Result<()> {
    // Every run this report uses: the extractions and the floor and merge measured beside them.
    fs::write(
        doc_dir.join(EXTRACT_CSV),
        csv(rows
            .iter()
            .filter(|r| r.threads == 0 && EXTRACT_ROWS.iter().any(|c| c.0 == r.mode))),
    )?;
    fs::write(
        doc_dir.join(EXTRACT_MD),
        extract_markdown(meta, infos, rows),
    )?;
    Ok(())
}

/// Largest peak anon (MiB) of the extractions at `size`, over both cache states.
fn extract_anon(rows: &[Row], size: u64) -> Option<f64> {
    extract::Kind::ALL
        .iter()
        .flat_map(|k| ["warm", "cold"].map(|c| agg(rows, size, k.key(), c, 0)))
        .flatten()
        .map(|a| a.anon)
        .reduce(f64::max)
}

fn extract_markdown(meta: &Meta, infos: &[SizeInfo], rows: &[Row]) -> String {
    let mut m = String::new();
    let w = &mut m;
    let measured: Vec<&SizeInfo> = infos
        .iter()
        .filter(|i| !i.extract_fits.is_empty())
        .collect();
    let _ = writeln!(
        w,
        "# Benchmarks: extracting an adapter (`boft-extract`) against the merge\n"
    );
    let _ = writeln!(
        w,
        "_Written by the benchmark harness (`benches/merge/`, `run`) from {} to {}. Do not edit by \
         hand: rerun the command below. Every timed run is in [{EXTRACT_CSV}]({EXTRACT_CSV}). The \
         merge benchmark (all sizes, PEFT, thread scaling) is [BENCHMARKS.md](BENCHMARKS.md), \
         which a plain `run` rewrites and `--extract-only` leaves as it is._\n",
        meta.started, meta.finished
    );
    machine(w, meta, infos);

    let _ = writeln!(w, "## Reproduce\n");
    let _ = writeln!(w, "```sh\n{}\n```\n", meta.command);
    let _ = writeln!(
        w,
        "A plain `cargo bench --bench merge -- run` measures these commands too and writes this \
         file beside BENCHMARKS.md (`--no-extract` skips them). `--extract-only` measures only \
         the floor copies, the merge and the extractions (no un-merge, no multi-adapter \
         commands, no PEFT, no thread scaling) and writes only this file and {EXTRACT_CSV}. \
         `boft-extract` is the one in the folder of the `boft-merge` measured (`--bin`). Options: \
         `cargo bench --bench merge -- run --help`.\n"
    );

    let _ = writeln!(w, "## Method\n");
    let _ = writeln!(
        w,
        "* **Data.** The base *B* and adapter *A* are the ones BENCHMARKS.md describes (synthetic \
         sharded Llama checkpoint; PEFT BOFT adapter with `boft_s`, targeting all seven linear \
         layers of every layer). The fine-tuned checkpoint *T* is `boft-merge --base B --adapter \
         A -o T`, made once per size, untimed (the copy the un-merge row of BENCHMARKS.md \
         reads). T differs from B in the targeted weights only (embeddings, `lm_head` and the \
         norms are equal), so those are what `boft-extract` fits; T is exactly a BOFT of the \
         adapter's geometry applied to B, then rounded to B's dtype.\n\
         * **Commands**, each a separate child process on the same files, interleaved within \
         each repeat:\n  \
         * `boft-merge --base B --adapter A -o OUT -q` (it fsyncs its output): the reference \
         time;\n  \
         * `boft-extract --base B --tuned T -o OUT.safetensors --side input --block-size b \
         --factors 1 -q`: OFT as a pure rotation (one exact Procrustes step per block), b = \
         the adapter's block size;\n  \
         * the same with `--row-scale` (OFT with PEFT's per-row scale: alternating rotation and \
         scale), and with `--factors 2 --row-scale`: BOFT with two butterfly factors;\n  \
         * the floor copies of BENCHMARKS.md (`copy --mode rw` / `--mode cfr` of B, fsynced), \
         for scale.\n  \
         The extractions run with their defaults otherwise (`--tol`, `--max-sweeps`, all \
         cores) and write a canonical adapter file of a few MB.\n\
         * **Fit quality.** Before the timed runs, each extraction runs once more, untimed, warm, \
         with `--json` added: *captured* = its `total.captured`, 1 − ‖T − F(B)‖² / ‖T − B‖² over \
         all fitted tensors; *most sweeps* = the largest `sweeps` over `tensors[]` (sweeps of \
         block-coordinate descent accepted for the slowest tensor). The timed rows carry these \
         in the note column of {EXTRACT_CSV}.\n\
         * **Cache states.** Before every run its previous output is deleted and `sync` is \
         called (untimed). *warm*: the inputs read into the page cache just before the run (B \
         and A for the merge, B and T for the extractions); *cold*: `sync` and `echo 3 > \
         /proc/sys/vm/drop_caches` just before the run.\n\
         * **Numbers.** Wall time: spawn to reap. {} runs per command and cache state; tables \
         give the **median** (and the minimum). × merge = median / the merge's median in the \
         same cache state; × floor likewise against the faster floor copy. CPU = user + sys of \
         the child (CPU / wall: the cores it kept busy). Peak anon = the largest `RssAnon` in \
         `/proc/<pid>/status`, sampled every {} ms (heap and buffers, not the page cache; a \
         spike shorter than the interval can be missed). Peak RSS = the largest `VmHWM`, which \
         also counts the pages of memory-mapped inputs. Run-queue wait = time the child's \
         threads were runnable but had no CPU (other load on the machine).\n",
        meta.repeats, meta.sample_ms
    );

    // ---- targets at the size closest to 230 MB
    let _ = writeln!(w, "## Targets\n");
    let _ = writeln!(w, "| target | measured | status |\n|---|---|---|");
    if let Some(r) = measured.iter().min_by_key(|i| i.size_mb.abs_diff(230)) {
        let sz = r.size_mb;
        for cache in ["warm", "cold"] {
            let Some(mg) = agg(rows, sz, "merge", cache, 0) else {
                continue;
            };
            for kind in extract::Kind::ALL {
                if let Some(x) = agg(rows, sz, kind.key(), cache, 0) {
                    let ratio = x.med / mg.med;
                    let t = kind.target();
                    let verdict = if ratio <= t {
                        pass(true).to_string()
                    } else {
                        format!("{} ({:.0}% over)", pass(false), (ratio / t - 1.0) * 100.0)
                    };
                    let _ = writeln!(
                        w,
                        "| {} ≤ {t}× the merge, {} ({cache} cache) | {:.3} s vs merge {:.3} s: **{ratio:.2}×** | {verdict} |",
                        kind.label(),
                        gb(r.base_bytes),
                        x.med,
                        mg.med,
                    );
                }
            }
        }
    }
    for i in &measured {
        let sz = i.size_mb;
        let merge_anon = ["warm", "cold"]
            .iter()
            .filter_map(|c| agg(rows, sz, "merge", c, 0).map(|a| a.anon))
            .reduce(f64::max);
        let per_kind: Vec<String> = extract::Kind::ALL
            .iter()
            .filter_map(|k| {
                ["warm", "cold"]
                    .iter()
                    .filter_map(|c| agg(rows, sz, k.key(), c, 0).map(|a| a.anon))
                    .reduce(f64::max)
                    .map(|a| format!("{} {a:.1} MiB", k.label()))
            })
            .collect();
        let (Some(anon), Some(merge_anon)) = (extract_anon(rows, sz), merge_anon) else {
            continue;
        };
        let bound = i.bound() / MIB;
        let _ = writeln!(
            w,
            "| peak anon bounded like the merge's: ≤ 2× largest tensor + 64 MiB (the merge's bound, \
             BENCHMARKS.md), {} | {}; merge {merge_anon:.1} MiB (**{:.2}×** the merge's); bound \
             {bound:.1} MiB | {} |",
            gb(i.base_bytes),
            per_kind.join(", "),
            anon / merge_anon,
            pass(anon <= bound)
        );
    }
    let per_size: Vec<(u64, u64, f64)> = measured
        .iter()
        .filter_map(|i| extract_anon(rows, i.size_mb).map(|a| (i.size_mb, i.base_bytes, a)))
        .collect();
    if per_size.len() >= 2 {
        let lo = per_size.iter().map(|x| x.2).fold(f64::INFINITY, f64::min);
        let hi = per_size.iter().map(|x| x.2).fold(0f64, f64::max);
        let list: Vec<String> = per_size
            .iter()
            .map(|(_, b, a)| format!("{}: {a:.1} MiB", gb(*b)))
            .collect();
        let _ = writeln!(
            w,
            "| peak anon of the extractions does not grow with the model (pass: max/min over sizes \
             ≤ {EXTRACT_ANON_GROWTH}) | {}; max/min **{:.2}** | {} |",
            list.join(", "),
            hi / lo,
            pass(hi / lo <= EXTRACT_ANON_GROWTH)
        );
    } else {
        let _ = writeln!(
            w,
            "| peak anon of the extractions does not grow with the model | one size measured: \
             growth not tested (run `--sizes 100,230,1000` to test it) | — |"
        );
    }
    let _ = writeln!(w);

    // ---- per size
    let _ = writeln!(w, "## Results by size\n");
    for i in &measured {
        let sz = i.size_mb;
        let sp = &i.spec;
        let _ = writeln!(
            w,
            "### {} MB requested: {} in {} shard(s)\n",
            sz,
            gb(i.base_bytes),
            i.shards
        );
        let _ = writeln!(
            w,
            "{} layers, hidden {}, intermediate {}, {}; adapter A: BOFT b={}, {} factor(s), \
             `boft_s`, {} targets, {}. Largest tensor {:.1} MiB (largest targeted {:.1} MiB); the \
             merge's memory bound 2× largest + 64 MiB = {:.1} MiB.\n",
            sp.layers,
            sp.hidden,
            sp.intermediate,
            sp.dtype.cli_name(),
            sp.block_size,
            sp.factors,
            sp.layers * crate::gen::MODULES.len(),
            gb(i.adapter_bytes),
            i.largest() as f64 / MIB,
            sp.largest_tensor_bytes(true) as f64 / MIB,
            i.bound() / MIB,
        );
        let _ = writeln!(
            w,
            "Fit quality (the untimed `--json` run of each extraction):\n\n\
             | extraction | command | tensors fitted | skipped | captured | relative residual | most sweeps | adapter file MB | `--json` run s |\n\
             |---|---|--:|--:|--:|--:|--:|--:|--:|"
        );
        for f in &i.extract_fits {
            let _ = writeln!(
                w,
                "| {} | `{}` | {} | {} | {:.6} | {:.3e} | {} | {:.1} | {:.3} |",
                f.kind.label(),
                extract::shown(f.kind, sp.block_size),
                f.tensors,
                f.skipped,
                f.captured,
                f.relative_residual,
                f.max_sweeps,
                f.output_bytes as f64 / 1e6,
                f.wall_s
            );
        }
        let _ = writeln!(w);
        let _ = writeln!(
            w,
            "| command | cache | median s | min s | runs | × merge | × floor | CPU s (user+sys) | CPU / wall | run-queue wait s | peak RSS MiB | peak anon MiB | read from storage MB |\n\
             |---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
        );
        for cache in ["warm", "cold"] {
            let merge = agg(rows, sz, "merge", cache, 0);
            for (mode, label) in EXTRACT_ROWS {
                let Some(a) = agg(rows, sz, mode, cache, 0) else {
                    continue;
                };
                let xm = merge
                    .map(|m| format!("{:.2}", a.med / m.med))
                    .unwrap_or("—".into());
                let xf = floor(rows, sz, cache)
                    .map(|(f, _)| format!("{:.2}", a.med / f))
                    .unwrap_or("—".into());
                let _ = writeln!(
                    w,
                    "| {label} | {cache} | {:.3} | {:.3} | {} | {xm} | {xf} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {} |",
                    a.med,
                    a.min,
                    a.n,
                    a.cpu,
                    a.cpu / a.med,
                    a.wait,
                    a.rss,
                    a.anon,
                    mb(a.read)
                );
            }
        }
        let _ = writeln!(w);
    }
    m
}
