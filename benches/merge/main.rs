//! Benchmark harness for `boft-merge` (issue 5): not a timed test, a tool.
//!
//! ```sh
//! cargo bench --bench merge -- run                      # the full benchmark -> docs/BENCHMARKS.md
//! cargo bench --bench merge -- run --multi-only --sizes 230   # several adapters -> docs/BENCHMARKS-compose.md
//! cargo bench --bench merge -- run --extract-only --sizes 230 # boft-extract -> docs/BENCHMARKS-extract.md
//! cargo bench --bench merge -- gen --size 230 --out bench-data/m230
//! cargo bench --bench merge -- units --size 1000       # split merges -> docs/BENCHMARKS-units.md
//! cargo bench --bench merge -- memory                  # on tmpfs -> docs/BENCHMARKS-memory.md
//! cargo bench --bench merge -- copy --mode cfr SRC DST  # one floor copy
//! cargo bench --bench merge -- measure -- CMD ARGS...   # time + peak memory of any command
//! ```
//! Run with no subcommand (as plain `cargo bench` or `cargo test --benches` do) it only prints help.

mod extract;
mod gen;
mod measure;
mod memory;
mod multi;
mod repo;
mod report;
mod run;
mod units;

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo bench --bench merge --",
    about = "Benchmark harness for boft-merge: synthetic Llama checkpoints + PEFT BOFT adapters, \
             timed against the read+write floor of the disk and the PEFT recipe"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a synthetic sharded Llama-shaped checkpoint (OUT/base) and a matching PEFT BOFT
    /// adapter targeting every linear layer (OUT/adapter).
    Gen(gen::GenArgs),
    /// Generate, measure and report: writes docs/BENCHMARKS.md, docs/bench.csv, docs/bench.png,
    /// (unless --no-multi) docs/BENCHMARKS-compose.md and docs/bench-compose.csv, and (unless
    /// --no-extract) docs/BENCHMARKS-extract.md and docs/bench-extract.csv.
    Run(run::RunArgs),
    /// A merge split into units (--unit K/N, --finalize) against the single merge, in one run:
    /// writes docs/BENCHMARKS-units.md and docs/bench-units.csv (docs/SCALE.md).
    Units(units::UnitsArgs),
    /// The memory-speed regime: the Llama case and LyCORIS U-Net cases on tmpfs, the `cp`
    /// floor, merges with one and all threads, verify, LyCORIS's own merge, and the block kernel
    /// alone against the FMA peak: writes docs/BENCHMARKS-memory.md and docs/bench-memory.csv.
    Memory(memory::MemoryArgs),
    /// Floor copy of a folder (used by `run` as a child process): copy every file, fsync each;
    /// to several destinations in turn if given several.
    Copy(measure::CopyArgs),
    /// Run any command and print its wall time, CPU time, peak RSS and peak anonymous memory.
    Measure {
        /// Sampling interval of /proc/<pid>/status, in milliseconds.
        #[arg(long, default_value_t = 5)]
        sample_ms: u64,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<String>,
    },
}

fn main() -> Result<()> {
    // `cargo bench` appends --bench to every harness = false target; it means nothing here.
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let cli = Cli::parse_from(&args);
    match cli.cmd {
        None => {
            Cli::command().print_help()?;
            println!();
            Ok(())
        }
        Some(Cmd::Gen(a)) => gen::main(a),
        Some(Cmd::Run(a)) => run::main(a, &args[1..]),
        Some(Cmd::Units(a)) => units::main(a, &args[1..]),
        Some(Cmd::Memory(a)) => memory::main(a, &args[1..]),
        Some(Cmd::Copy(a)) => measure::copy_main(a),
        Some(Cmd::Measure { sample_ms, cmd }) => {
            let mut c = Command::new(&cmd[0]);
            c.args(&cmd[1..]);
            let log =
                std::env::temp_dir().join(format!("boft-bench-measure-{}", std::process::id()));
            let s = measure::run(&mut c, Duration::from_millis(sample_ms), &log, None)?;
            let _ = std::fs::remove_file(log.with_extension("out"));
            let _ = std::fs::remove_file(log.with_extension("err"));
            print!("{}", s.stdout);
            let mb = |b: Option<u64>| b.map_or("?".into(), |b| format!("{:.1}", b as f64 / 1e6));
            println!(
                "wall {:.3} s, user {:.3} s, sys {:.3} s, run-queue wait {:.3} s, peak RSS {:.1} MiB, peak anon {:.1} MiB ({} samples), read from storage {} MB, rchar {} MB",
                s.wall_s,
                s.user_s,
                s.sys_s,
                s.runq_wait_s,
                s.max_rss_kib as f64 / 1024.0,
                s.peak_anon_kib as f64 / 1024.0,
                s.samples,
                mb(s.read_bytes),
                mb(s.rchar)
            );
            Ok(())
        }
    }
}
