//! What the three binaries share: error reporting, exit codes, progress bars, thread pools.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::error::Error;

/// Exit code for unreadable input, usage errors and refused operations.
pub const EXIT_ERROR: i32 = 2;

/// Run a binary's body: print any error as one line on stderr and exit 2.
pub fn run(program: &str, body: impl FnOnce() -> Result<i32, Error>) -> ! {
    crate::output::install_signal_handler();
    let code = match body() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{program}: error{e}");
            EXIT_ERROR
        }
    };
    std::process::exit(code)
}

/// Parse the command line. `--help` and `--version` print as usual (exit 0); a usage error is
/// reported like every other error: one `[usage]` line on stderr, exit 2.
pub fn parse_args<T: clap::Parser>(program: &str) -> T {
    use clap::error::ErrorKind;
    match T::try_parse() {
        Ok(args) => args,
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
            _ => {
                let text = e.render().to_string();
                let text = text.split("Usage:").next().unwrap_or_default();
                let text = text.trim().trim_start_matches("error:");
                let words: Vec<&str> = text.split_whitespace().collect();
                let err = Error::bare(
                    crate::error::Class::Usage,
                    format!("{} (see {program} --help)", words.join(" ")),
                );
                eprintln!("{program}: error{err}");
                std::process::exit(EXIT_ERROR)
            }
        },
    }
}

/// A byte progress bar on a terminal; hidden when stderr is not one or when disabled.
pub fn progress_bar(total: u64, enabled: bool) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .expect("valid template"),
    );
    bar
}

/// Run `f` on a rayon pool of `threads` threads (all cores when None).
pub fn with_threads<T: Send>(
    threads: Option<usize>,
    f: impl FnOnce() -> Result<T, Error> + Send,
) -> Result<T, Error> {
    match threads {
        Some(0) => Err(Error::bare(
            crate::error::Class::Usage,
            "--threads must be at least 1",
        )),
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map_err(|e| {
                Error::bare(
                    crate::error::Class::Usage,
                    format!("cannot start {n} threads: {e}"),
                )
            })?
            .install(f),
        None => f(),
    }
}

/// Pick the compute backend named by `--device`.
pub fn backend(device: &str) -> Result<Box<dyn crate::merge::Backend>, Error> {
    use crate::error::Class;
    match device {
        "cpu" => Ok(Box::new(crate::merge::CpuBackend)),
        d if d == "cuda" || d.starts_with("cuda:") => crate::merge::cuda_backend(d),
        #[cfg(feature = "candle")]
        "candle-cpu" => Ok(Box::new(crate::merge::candle::CandleBackend::cpu())),
        other => Err(Error::bare(
            Class::Usage,
            format!("unknown --device {other:?} (expected cpu or cuda[:N])"),
        )),
    }
}

/// One-paragraph description of an adapter for `boft-convert`.
pub fn summary(adapter: &crate::adapter::Adapter, path: &std::path::Path) -> String {
    let t = &adapter.targets;
    let range = |f: fn(&crate::adapter::Target) -> usize| {
        let lo = t.iter().map(f).min().unwrap_or(0);
        let hi = t.iter().map(f).max().unwrap_or(0);
        if lo == hi {
            lo.to_string()
        } else {
            format!("{lo}–{hi}")
        }
    };
    // A source without a version (LyCORIS files carry none) gets no empty "()".
    let version = if adapter.source_version.is_empty() {
        String::new()
    } else {
        format!(" ({})", adapter.source_version)
    };
    format!(
        "wrote {}: {} targets from {}{version}, factors {}, block size {}, {} parameters, {} replaced tensors",
        path.display(),
        t.len(),
        adapter.source_format,
        range(|x| x.factors),
        range(|x| x.block_size),
        adapter.parameter_count(),
        adapter.replacements.len()
    )
}
