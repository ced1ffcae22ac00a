//! `memory`: the memory-speed regime (issue 16). Inputs and outputs on a RAM-backed filesystem
//! (tmpfs, `/dev/shm` by default), so that the disk is not the limit and the engine is what is
//! measured, side by side in one run:
//!
//! * the `cp` floor, `boft-merge` with `--threads 1`, held to one core (CPU affinity) and on all
//!   cores, and `boft-verify --merged` of the merge, on the input-side Llama case (PEFT BOFT)
//!   and on output-side U-Net-shaped cases (LyCORIS diag-oft and boft, fp16, made by LyCORIS
//!   itself: lycoris_unet.py);
//! * LyCORIS's own merge (`merge_to`) of the same U-Net files, when Python with torch and
//!   lycoris-lora is there;
//! * the block kernel alone, in this process, on the Llama adapter's geometry, for every compiled
//!   form the CPU runs (AVX-512, AVX2, portable), one thread and all cores, against the FMA peak
//!   of that form measured by a register-only loop.
//!
//! Writes docs/BENCHMARKS-memory.md and docs/bench-memory.csv.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use boft::math::kernel::{Chain, Factor, Isa, ScaleOn, Scratch};

use crate::gen::{self, ShapeArgs, Spec};
use crate::measure;
use crate::report;
use crate::units::digest;

#[derive(Args, Debug)]
pub struct MemoryArgs {
    /// Size of the Llama case in MB (10^6 bytes).
    #[arg(long, default_value_t = 230)]
    pub size: u64,
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Timed runs of each command (medians reported; LyCORIS's merge runs once per case).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// A folder on a RAM-backed filesystem for inputs and outputs (refused if it is not tmpfs).
    #[arg(long, default_value = "/dev/shm/boft-bench-memory")]
    pub data: PathBuf,
    /// Keep the generated data.
    #[arg(long)]
    pub keep_data: bool,
    /// Where the report goes (default: docs/ of this repository).
    #[arg(long)]
    pub doc_dir: Option<PathBuf>,
    /// The boft-merge to measure (boft-verify beside it); default: the one cargo built.
    #[arg(long)]
    pub bin: Option<PathBuf>,
    /// Python with torch and safetensors for the U-Net cases (default: the fixtures venv).
    #[arg(long, default_value = "/work/venv-fixtures/bin/python")]
    pub python: PathBuf,
    /// Folder holding lycoris-lora==4.1.3 (`pip install --no-deps --target DIR ...`).
    #[arg(long, default_value = "/work/lycoris-4")]
    pub lycoris: PathBuf,
    /// Channel widths of the U-Net-shaped cases.
    #[arg(long, default_value = "320,640,1280")]
    pub unet_widths: String,
    /// LyCORIS block size of the U-Net cases.
    #[arg(long, default_value_t = 32)]
    pub unet_dim: usize,
    /// Measure only the block kernel against the FMA peak and print its table (no data, no
    /// report written): for trying a kernel change quickly.
    #[arg(long)]
    pub kernel_only: bool,
}

/// One measured command of one case.
struct Timed {
    case: String,
    /// The case's side: `input` or `output`.
    side: &'static str,
    what: &'static str,
    secs: Vec<f64>,
    /// Bytes of tensor data the command reads (and writes), for GB/s.
    bytes: u64,
    note: String,
    /// LyCORIS only: the seconds of `merge_to` alone, inside its process.
    inner_s: Option<f64>,
}

impl Timed {
    fn median(&self) -> f64 {
        median(&mut self.secs.clone())
    }
}

fn time(mut c: Command, what: &str) -> Result<(f64, String)> {
    c.stdin(Stdio::null());
    let t0 = Instant::now();
    let o = c.output()?;
    let s = t0.elapsed().as_secs_f64();
    if !o.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok((s, String::from_utf8_lossy(&o.stdout).into_owned()))
}

fn is_tmpfs(p: &Path) -> bool {
    Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(p)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "tmpfs")
        .unwrap_or(false)
}

/// One case: a base, an adapter, which side its transform acts on.
struct Case {
    name: String,
    side: &'static str,
    base: PathBuf,
    adapter: PathBuf,
    bytes: u64,
}

pub fn main(a: MemoryArgs, argv: &[String]) -> Result<()> {
    if a.kernel_only {
        let spec = Spec::resolve(&a.shape, a.size, None)?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        println!("{}", kernel_table(&kernel_rows(&spec, cores)));
        return Ok(());
    }
    let root = crate::repo::root();
    let bin = crate::run::merge_bin(a.bin.clone())?;
    let verify = bin.with_file_name("boft-verify");
    fs::create_dir_all(&a.data)?;
    let data = a.data.canonicalize()?;
    if !is_tmpfs(&data) {
        bail!(
            "{} is not on tmpfs: the memory regime needs RAM-backed input and output",
            data.display()
        );
    }
    let spec = Spec::resolve(&a.shape, a.size, None)?;
    let g = gen::generate(&spec, &data.join("llama"), true)?;
    let meta = report::Meta::collect_plain(&data, &bin, argv, a.repeats);
    let mut cases = vec![Case {
        name: format!(
            "Llama {} (PEFT BOFT b={}, m={})",
            spec.dtype.cli_name(),
            spec.block_size,
            spec.factors
        ),
        side: "input",
        base: g.base.clone(),
        adapter: g.adapter.clone(),
        bytes: g.base_file_bytes,
    }];
    let script = root.join("benches/merge/lycoris_unet.py");
    let python_ok = Command::new(&a.python)
        .args(["-c", "import torch, safetensors"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        && a.lycoris.join("lycoris").is_dir();
    let mut lycoris_note = String::new();
    if python_ok {
        for algo in ["diag-oft", "boft"] {
            let dir = data.join(format!("unet-{algo}"));
            if !dir.join("adapter.safetensors").is_file() {
                let mut c = Command::new(&a.python);
                c.arg(&script)
                    .args(["gen", "--algo", algo])
                    .arg("--out")
                    .arg(&dir);
                c.arg("--dim")
                    .arg(a.unet_dim.to_string())
                    .arg("--widths")
                    .arg(&a.unet_widths);
                c.arg("--lycoris").arg(&a.lycoris);
                let (_, out) = time(c, "lycoris_unet.py gen")?;
                eprintln!("unet {algo}: {}", out.trim());
            }
            let base = dir.join("base");
            let bytes = fs::metadata(base.join("model.safetensors"))?.len();
            cases.push(Case {
                name: format!(
                    "U-Net fp16, widths {} (LyCORIS {algo}, block {})",
                    a.unet_widths, a.unet_dim
                ),
                side: "output",
                base,
                adapter: dir.join("adapter.safetensors"),
                bytes,
            });
        }
    } else {
        lycoris_note = format!(
            "The output-side cases were not run: {} with torch and safetensors, or lycoris-lora \
             in {}, was not found.",
            a.python.display(),
            a.lycoris.display()
        );
    }

    let outs = data.join("outs");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rows: Vec<Timed> = Vec::new();
    for case in &cases {
        fs::create_dir_all(&outs)?;
        let out = outs.join("merged");
        let floor = outs.join("floor");
        let t = |rows: &mut Vec<Timed>, what: &'static str, note: String| {
            rows.push(Timed {
                case: case.name.clone(),
                side: case.side,
                what,
                secs: Vec::new(),
                bytes: case.bytes,
                note,
                inner_s: None,
            });
            rows.len() - 1
        };
        let i_floor = t(&mut rows, "floor: `cp -r` of the base", String::new());
        let i_m1 = t(&mut rows, "`boft-merge --threads 1`", String::new());
        let i_c1 = t(
            &mut rows,
            "`boft-merge` on one core",
            "all threads, CPU affinity one core".to_string(),
        );
        let i_m = t(
            &mut rows,
            "`boft-merge` (all cores)",
            format!("{cores} threads"),
        );
        let i_v = t(
            &mut rows,
            "`boft-verify --base --merged` (all default checks)",
            String::new(),
        );
        let mut want = None;
        for r in 0..a.repeats {
            measure::remove(&floor)?;
            let mut c = Command::new("cp");
            c.arg("-r").arg(&case.base).arg(&floor);
            rows[i_floor].secs.push(time(c, "cp")?.0);
            for (i, threads, one_core) in [
                (i_m1, Some(1), false),
                (i_c1, None, true),
                (i_m, None, false),
            ] {
                measure::remove(&out)?;
                let mut c = Command::new(&bin);
                c.arg("--base")
                    .arg(&case.base)
                    .arg("--adapter")
                    .arg(&case.adapter);
                c.arg("-o").arg(&out).arg("-q");
                if let Some(n) = threads {
                    c.arg("--threads").arg(n.to_string());
                }
                if one_core {
                    pin_to_one_core(&mut c);
                }
                rows[i].secs.push(time(c, "boft-merge")?.0);
                let d = digest(&out)?;
                match &want {
                    None => want = Some(d),
                    Some(w) if *w != d => bail!("{}: merge #{r} differs from the first", case.name),
                    _ => {}
                }
            }
            let mut c = Command::new(&verify);
            c.arg(&case.adapter)
                .arg("--base")
                .arg(&case.base)
                .arg("--merged")
                .arg(&out);
            rows[i_v].secs.push(time(c, "boft-verify")?.0);
            eprintln!(
                "{} #{r}: floor {:.3} s, merge {:.3}/{:.3}/{:.3} s (threads 1/one core/all), verify {:.3} s",
                case.name,
                rows[i_floor].secs[r],
                rows[i_m1].secs[r],
                rows[i_c1].secs[r],
                rows[i_m].secs[r],
                rows[i_v].secs[r]
            );
        }
        if case.side == "output" && python_ok {
            let lyc = outs.join("lycoris");
            let mut i = None;
            let mut inner = Vec::new();
            // A few runs: a Python process's times vary more than ours.
            for _ in 0..a.repeats.clamp(1, 3) {
                measure::remove(&lyc)?;
                let mut c = Command::new(&a.python);
                c.arg(&script).arg("merge").arg("--base").arg(&case.base);
                c.arg("--adapter").arg(&case.adapter).arg("--out").arg(&lyc);
                c.arg("--lycoris").arg(&a.lycoris).stderr(Stdio::null());
                let (s, out) = time(c, "LyCORIS merge")?;
                let j: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or("{}"))
                    .context("LyCORIS merge's JSON line")?;
                let f = |k: &str| j[k].as_f64().unwrap_or(f64::NAN);
                let k = *i.get_or_insert_with(|| {
                    t(
                        &mut rows,
                        "LyCORIS 4.1.3: load, `create_lycoris_from_weights`, `merge_to(1.0)`, save (one process)",
                        format!(
                            "first run: `merge_to` alone {:.2} s; load {:.2} s, save {:.2} s; torch threads {}",
                            f("merge_to_s"),
                            f("load_s"),
                            f("save_s"),
                            j["threads"]
                        ),
                    )
                });
                rows[k].secs.push(s);
                inner.push(f("merge_to_s"));
            }
            if let Some(k) = i {
                inner.sort_by(|x, y| x.total_cmp(y));
                rows[k].inner_s = Some(inner[inner.len() / 2]);
            }
            measure::remove(&lyc)?;
        }
        measure::remove(&outs)?;
    }

    let kernel = kernel_rows(&spec, cores);
    let doc_dir = a.doc_dir.clone().unwrap_or_else(|| root.join("docs"));
    fs::create_dir_all(&doc_dir)?;
    write(&doc_dir, &meta, &spec, &rows, &kernel, &lycoris_note, cores)?;
    if !a.keep_data {
        measure::remove(&data)?;
    }
    Ok(())
}

/// The block kernel alone on one form: (form, threads, GFLOP/s achieved, FMA peak GFLOP/s).
struct KernelRow {
    /// "input" (rows, the Llama case) or "output" (columns, the U-Net case).
    side: &'static str,
    isa: Isa,
    threads: usize,
    gflops: f64,
    peak: f64,
}

/// A chain of the benchmark adapter's geometry (PEFT BOFT: block `b`, `m` factors, butterfly
/// permutations after the first) on rows of the widest targeted layer, random orthogonal-ish
/// blocks: the arithmetic does not depend on the values.
fn bench_chain(spec: &Spec) -> Chain {
    let n = spec.hidden;
    let h = spec.block_size;
    let perms = (0..spec.factors)
        .map(|i| (i > 0).then(|| boft::math::perm::peft_boft(n, h, i)))
        .collect();
    chain_of(n, h, perms, Some(vec![1.0; 1 << 20]))
}

/// The output-side case's widest layer: LyCORIS boft on 1280 outputs (blocks of 20, 64 of
/// them, seven factors, each with its interleaving permutation), what the U-Net case merges.
fn bench_chain_output() -> Chain {
    let (n, h) = (1280, 20);
    let factors = (64u32 - 1).count_ones() as usize + 1;
    let perms = (0..factors)
        .map(|i| Some(boft::math::perm::lycoris_boft(n, h, i)))
        .collect();
    chain_of(n, h, perms, None)
}

fn chain_of(n: usize, h: usize, perms: Vec<Option<Vec<u32>>>, scale: Option<Vec<f32>>) -> Chain {
    let d = n / h;
    let factors = perms
        .into_iter()
        .map(|perm| Factor {
            h,
            d,
            blocks: (0..d * h * h)
                .map(|k| ((k as f32) * 0.618).sin() * 0.2)
                .collect(),
            repeat: 0,
            perm,
        })
        .collect();
    Chain {
        n,
        factors,
        scale,
        scale_on: ScaleOn::Vector,
        scale_first: false,
        blend: 1.0,
    }
}

/// Rounds of each kernel measurement (the median is reported).
const KERNEL_ROUNDS: usize = 5;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Columns of the output-side kernel case: the strip the merge hands the kernel for 1280
/// outputs on a 512 KiB L2 (`strip_cols` in src/merge/apply.rs).
const OUTPUT_STRIP: usize = 32;

fn kernel_rows(spec: &Spec, cores: usize) -> Vec<KernelRow> {
    let input = bench_chain(spec);
    let output = bench_chain_output();
    // The merge holds each input-side chain's transpose and the kernel takes its operands from it.
    let input_t = input.transposed();
    // Input side: one work chunk of the merge (128 Ki elements), rows of the chain's length.
    let rows = (1usize << 17) / input.n;
    let mut out = Vec::new();
    for (side, chain, vectors) in [("input", &input, rows), ("output", &output, OUTPUT_STRIP)] {
        let n = chain.n;
        let flops_per_apply =
            2.0 * (vectors * n) as f64 * chain.factors.iter().map(|f| f.h).sum::<usize>() as f64;
        for isa in [Isa::Avx512, Isa::Avx2, Isa::Portable] {
            if (isa as u8) < Isa::best() as u8 {
                continue;
            }
            for threads in [1, cores] {
                // Seconds inside the kernel alone: the rescaling between calls is not timed.
                let per_thread = |iters: usize| -> f64 {
                    let mut x: Vec<f32> = (0..vectors * n)
                        .map(|i| ((i as f32) * 0.37).cos())
                        .collect();
                    let mut s = Scratch::default();
                    let mut secs = 0.0;
                    for _ in 0..iters {
                        let t0 = Instant::now();
                        if side == "input" {
                            chain.apply_rows_given_transpose_isa(
                                isa, &input_t, &mut x, 0, vectors, &mut s,
                            );
                        } else {
                            chain.apply_cols_isa(isa, &mut x, 0, vectors, &mut s);
                        }
                        secs += t0.elapsed().as_secs_f64();
                        // Keep the values bounded whatever the blocks' norms.
                        let m = 1.0 / x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
                        x.iter_mut().for_each(|v| *v *= m);
                    }
                    secs
                };
                // About the same flops per measurement for both cases.
                let base = if isa == Isa::Portable { 20 } else { 200 };
                let iters = (base as f64 * 2.0 * (1 << 17) as f64 * 64.0 / flops_per_apply)
                    .ceil()
                    .max(1.0) as usize;
                // Rounds of the kernel and the peak in turn, medians of each: on a shared
                // machine the clock moves between rounds, and both sides of the ratio should
                // see it.
                let (mut rates, mut peaks) = (Vec::new(), Vec::new());
                for _ in 0..KERNEL_ROUNDS {
                    let secs: Vec<f64> = std::thread::scope(|s| {
                        let hs: Vec<_> = (0..threads)
                            .map(|_| s.spawn(|| per_thread(iters)))
                            .collect();
                        hs.into_iter().map(|h| h.join().unwrap()).collect()
                    });
                    // The threads ran at once: their rates add up.
                    rates.push(
                        secs.iter()
                            .map(|s| flops_per_apply * iters as f64 / s / 1e9)
                            .sum::<f64>(),
                    );
                    if isa != Isa::Portable {
                        peaks.push(fma_peak(isa, threads));
                    }
                }
                out.push(KernelRow {
                    side,
                    isa,
                    threads,
                    gflops: median(&mut rates),
                    peak: if isa == Isa::Portable {
                        f64::NAN
                    } else {
                        median(&mut peaks)
                    },
                });
                if threads == cores {
                    break;
                }
            }
        }
    }
    out
}

/// Peak fused multiply-add throughput of a form, GFLOP/s over `threads` threads: a loop of
/// independent FMAs on registers only (enough accumulators to cover the latency of two ports).
fn fma_peak(isa: Isa, threads: usize) -> f64 {
    const ITERS: u64 = 5_000_000;
    let run = move || -> (f64, f32) {
        let t0 = Instant::now();
        let s = match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: only called for forms the CPU runs (checked by the caller).
            Isa::Avx512 => unsafe { peak_avx512(ITERS) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { peak_avx2(ITERS) },
            _ => unreachable!("no peak is measured for the portable form"),
        };
        (t0.elapsed().as_secs_f64(), s)
    };
    let lanes = match isa {
        Isa::Avx512 => 16.0,
        Isa::Avx2 => 8.0,
        Isa::Portable => 1.0,
    };
    let iters = if isa == Isa::Portable {
        ITERS / 8
    } else {
        ITERS
    };
    let t0 = Instant::now();
    let sink: f32 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads).map(|_| s.spawn(run)).collect();
        hs.into_iter().map(|h| h.join().unwrap().1).sum()
    });
    let secs = t0.elapsed().as_secs_f64();
    std::hint::black_box(sink);
    // 12 accumulators, one FMA (2 flops per lane) each per iteration.
    12.0 * lanes * 2.0 * (iters * threads as u64) as f64 / secs / 1e9
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn peak_avx512(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let (m, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut acc = [_mm512_set1_ps(1.0); 12];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = _mm512_fmadd_ps(*a, m, b);
        }
    }
    acc.iter().map(|a| _mm512_reduce_add_ps(*a)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn peak_avx2(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let (m, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(1.0); 12];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = _mm256_fmadd_ps(*a, m, b);
        }
    }
    let mut out = [0f32; 8];
    let mut s = 0.0;
    for a in acc {
        _mm256_storeu_ps(out.as_mut_ptr(), a);
        s += out.iter().sum::<f32>();
    }
    s
}

fn write(
    doc_dir: &Path,
    meta: &report::Meta,
    spec: &Spec,
    rows: &[Timed],
    kernel: &[KernelRow],
    lycoris_note: &str,
    cores: usize,
) -> Result<()> {
    let mut csv = String::from("case,command,repeat,seconds,bytes\n");
    for r in rows {
        for (i, s) in r.secs.iter().enumerate() {
            let _ = writeln!(
                csv,
                "\"{}\",\"{}\",{i},{s:.4},{}",
                r.case,
                r.what.replace('`', ""),
                r.bytes
            );
        }
    }
    for k in kernel {
        let _ = writeln!(
            csv,
            "\"kernel {}\",\"{} threads GFLOP/s (peak {:.1})\",0,{:.2},0",
            k.isa.name(),
            k.threads,
            k.peak,
            k.gflops
        );
    }
    fs::write(doc_dir.join("bench-memory.csv"), csv).context("writing bench-memory.csv")?;

    let mut w = String::new();
    let _ = writeln!(
        w,
        "# The memory-speed regime: inputs and outputs on tmpfs\n"
    );
    let _ = writeln!(
        w,
        "_Written by the benchmark harness (`benches/merge/memory.rs`) from {} to {}. Do not edit \
         by hand: rerun the command below. Every timed run is in [bench-memory.csv](bench-memory.csv)._\n",
        meta.started,
        report::now()
    );
    report::machine_rows(&mut w, meta);
    let _ = writeln!(
        w,
        "| Kernel form chosen by `boft-merge` | {} (`BOFT_KERNEL=avx2\\|portable` narrows it) |",
        Isa::detect().name()
    );
    let _ = writeln!(w);
    let _ = writeln!(w, "## Reproduce\n\n```sh\n{}\n```\n", meta.command);
    let _ = writeln!(
        w,
        "Base, adapter and every output are on tmpfs (RAM), so no command waits for a disk: this \
         is the engine's own speed, what a server with fast NVMe and a warm page cache sees. \
         Medians of {} runs; GB/s is the base's file bytes over the median wall time (each \
         command reads them once and writes as many). The `cp` floor is the same bytes read and \
         written by coreutils.\n",
        rows.first().map_or(0, |r| r.secs.len())
    );
    let _ = writeln!(w, "## Commands\n");
    let _ = writeln!(w, "| case | side | command | median s | GB/s | × floor | notes |\n|---|---|---|---:|---:|---:|---|");
    let mut case = "";
    let mut floor = f64::NAN;
    for r in rows {
        if r.case != case {
            case = &r.case;
            floor = r.median();
        }
        let m = r.median();
        let _ = writeln!(
            w,
            "| {} | {} | {} | {m:.3} | {:.2} | {:.2} | {} |",
            r.case,
            r.side,
            r.what,
            r.bytes as f64 / m / 1e9,
            m / floor,
            r.note
        );
    }
    if !lycoris_note.is_empty() {
        let _ = writeln!(w, "\n{lycoris_note}");
    }
    // The input-side (Llama) case's rows.
    let get = |what_prefix: &str| {
        rows.iter()
            .find(|r| r.side == "input" && r.what.starts_with(what_prefix))
            .map(|r| (r.median(), r.bytes))
    };
    let _ = writeln!(w, "\n## Against the issue's targets\n");
    let _ = writeln!(w, "| target | measured |\n|---|---|");
    if let (Some(f), Some(m), Some(m1), Some(v)) = (
        get("floor"),
        get("`boft-merge` (all"),
        get("`boft-merge --threads 1"),
        get("`boft-verify"),
    ) {
        let _ = writeln!(
            w,
            "| merge ≤ 1.5× the `cp` floor (Llama) | {:.2}× |",
            m.0 / f.0
        );
        let _ = writeln!(
            w,
            "| {cores} threads ≥ 1.8× one thread (Llama, `--threads 1`: the kernel's pool; the reader, builder and writer threads still run) | {:.2}× |",
            m1.0 / m.0
        );
        if let Some(c1) = get("`boft-merge` on one core") {
            let _ = writeln!(
                w,
                "| … {cores} cores against one (Llama, the whole process held to one core by its CPU affinity) | {:.2}× |",
                c1.0 / m.0
            );
        }
        let _ = writeln!(
            w,
            "| `boft-verify --merged` ≤ 1.5× the merge (Llama) | {:.2}× |",
            v.0 / m.0
        );
        for algo in ["diag-oft", "boft"] {
            let Some(o) = rows
                .iter()
                .find(|r| r.case.contains(algo) && r.what.starts_with("`boft-merge` (all"))
            else {
                continue;
            };
            let (ob, ib) = (o.bytes as f64 / o.median(), m.1 as f64 / m.0);
            let _ = writeln!(
                w,
                "| output-side GB/s within 20% of input-side ({algo}) | {:.2} against {:.2} GB/s ({:+.0}%) |",
                ob / 1e9,
                ib / 1e9,
                (ob / ib - 1.0) * 100.0
            );
            if let Some(l) = rows
                .iter()
                .find(|r| r.case.contains(algo) && r.what.starts_with("LyCORIS"))
            {
                let _ = writeln!(
                    w,
                    "| faster than LyCORIS's own merge ({algo}) | {:.1}× faster ({:.2} s against {:.2} s) |",
                    l.median() / o.median(),
                    o.median(),
                    l.median()
                );

                if let Some(inner) = l.inner_s {
                    let _ = writeln!(
                        w,
                        "| … against LyCORIS's `merge_to` alone ({algo}: in its process, without Python's start, the load or the save) | {:.1}× ({:.2} s against {:.2} s) |",
                        inner / o.median(),
                        o.median(),
                        inner
                    );
                }
            }
        }
    }
    let best = kernel
        .iter()
        .filter(|k| k.isa == Isa::detect() && k.threads == cores)
        .map(|k| (k.side, k.gflops / k.peak));
    for (side, b) in best {
        let _ = writeln!(
            w,
            "| transform ≥ 50% of the FMA peak of the kernel that ran ({side} side) | {:.0}% ({}) |",
            b * 100.0,
            Isa::detect().name()
        );
    }
    let _ = writeln!(
        w,
        "\n## The block kernel alone\n\nIn the harness's own process, no I/O: one merge work \
         chunk (128 Ki elements: {} rows of {}) of the Llama adapter's geometry (b = {}, {} \
         factors, butterfly permutations after the first, per-row scale) transformed over and \
         over by `Chain::apply_rows_given_transpose_isa` (as the merge calls it, with the \
         chain's transpose made once), per compiled form; only the calls are timed (the \
         rescaling between them is not). 2·b flops per element per factor. The peak is a loop \
         of independent register-only FMAs of the same vector width. Medians of {} rounds, \
         each timing the kernel and then the peak, so that both see the same clock on a shared \
         machine. The output side is the U-Net case's widest layer (LyCORIS boft, 1280 outputs, \
         blocks of 20, 7 factors with their interleaving permutations) on a strip of {} columns, \
         what the merge hands the kernel (`Chain::apply_cols_isa`).\n",
        (1usize << 17) / spec.hidden,
        spec.hidden,
        spec.block_size,
        spec.factors,
        KERNEL_ROUNDS,
        OUTPUT_STRIP
    );
    w.push_str(&kernel_table(kernel));
    let _ = writeln!(
        w,
        "\nThe portable form runs the fixed sizes through `matrixmultiply`, which picks its own \
         vector width at run time: it has no FMA peak of its own to compare with.\n\nThe \
         merges above ran the form `boft-merge` chooses ({}). Blocks of 16 and 32 run the \
         register-tiled row kernel (`src/math/tile.rs`): eight rows' accumulators per AVX-512 \
         tile (three to six on AVX2), the permutation folded into its loads and stores. \
         Output-side strips run the column kernel (`col_blocks_fixed` in \
         `src/math/kernel.rs`): four output rows by 16 columns per AVX2 register tile (by 32 on \
         AVX-512), the permutation folded into the rows it reads and writes.",
        Isa::detect().name()
    );
    fs::write(doc_dir.join("BENCHMARKS-memory.md"), w).context("writing BENCHMARKS-memory.md")?;
    Ok(())
}

/// The kernel's table: GFLOP/s per form and thread count against the FMA peak.
fn kernel_table(kernel: &[KernelRow]) -> String {
    let mut w = String::from(
        "| side | form | threads | GFLOP/s | FMA peak GFLOP/s | share |\n|---|---|---:|---:|---:|---:|\n",
    );
    for k in kernel {
        let _ = if k.isa == Isa::Portable {
            writeln!(
                w,
                "| {} | {} | {} | {:.1} | — | — |",
                k.side,
                k.isa.name(),
                k.threads,
                k.gflops
            )
        } else {
            writeln!(
                w,
                "| {} | {} | {} | {:.1} | {:.1} | {:.0}% |",
                k.side,
                k.isa.name(),
                k.threads,
                k.gflops,
                k.peak,
                k.gflops / k.peak * 100.0
            )
        };
    }
    w
}

/// Hold the child to one CPU (the first this process may use): the whole merge on one core,
/// whatever threads it starts, which `--threads 1` does not do (it sizes only the kernel's pool).
fn pin_to_one_core(c: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure only calls async-signal-safe syscalls on a
    // zeroed CPU set of its own stack.
    unsafe {
        c.pre_exec(|| {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let first = (0..libc::CPU_SETSIZE as usize)
                .find(|&i| libc::CPU_ISSET(i, &set))
                .unwrap_or(0);
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(first, &mut one);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
