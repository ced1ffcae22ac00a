//! The three commands, one submodule each (its clap `Args`, `main` and a typed `run`), and what
//! they share: error reporting, exit codes, thread pools (the progress bar is `progress`). The binaries and the
//! Python module are thin callers, so both keep one command-line contract.

use std::ffi::OsString;
use std::io::Write;

use crate::error::Error;

/// Exit code for unreadable input, usage errors and refused operations.
pub const EXIT_ERROR: i32 = 2;

pub mod convert;
pub mod docs;
pub mod extract;
pub mod merge;
pub mod plot;
pub mod progress;
pub mod values;
pub mod verify;

/// A binary's whole `main`: SIGINT/SIGTERM become a clean `[interrupted]` error (the staged
/// output is removed), a mapped input truncated under the run one `[io]` line (`fault`), then the
/// process exits with the command's code. Only processes that are the command install the
/// handlers: a host program such as Python keeps its own.
pub fn run(program: &str, command: impl FnOnce() -> i32) -> ! {
    install_handlers(program);
    std::process::exit(command())
}

/// The signal handlers of a process that is the command `program`.
pub fn install_handlers(program: &str) {
    crate::output::install_signal_handler();
    crate::fault::install(program);
}

/// Parse a command line (program name first) without printing or exiting.
pub fn parse_from<A, I, T>(argv: I) -> Result<A, clap::Error>
where
    A: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    A::try_parse_from(argv)
}

/// A clap error as the one-line `[usage]` error every command reports.
pub fn usage_error(program: &str, e: &clap::Error) -> Error {
    let text = e.render().to_string();
    let text = text.split("Usage:").next().unwrap_or_default();
    let text = text.trim().trim_start_matches("error:");
    let words: Vec<&str> = text.split_whitespace().collect();
    Error::bare(
        crate::error::Class::Usage,
        format!("{} (see {program} --help)", words.join(" ")),
    )
}

/// The command-line contract shared by the three commands, minus the process: `--help` and
/// `--version` print as usual (code 0); a usage error and every error from `body` are one line
/// on stderr (code 2); otherwise `body`'s code. Returns the exit code instead of exiting so that
/// a host process (the Python console scripts) can run it too.
pub(crate) fn main_with<A, I, T>(
    program: &str,
    argv: I,
    body: impl FnOnce(&A) -> Result<i32, Error>,
) -> i32
where
    A: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    use clap::error::ErrorKind;
    let code = match parse_from::<A, _, _>(argv) {
        Ok(args) => match body(&args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("{program}: error{e}");
                EXIT_ERROR
            }
        },
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                let _ = e.print();
                e.exit_code()
            }
            _ => {
                eprintln!("{program}: error{}", usage_error(program, &e));
                EXIT_ERROR
            }
        },
    };
    // A host process that outlives the command would otherwise keep a partial last line
    // (the verify table ends without one) in Rust's stdout buffer.
    let _ = std::io::stdout().flush();
    code
}

/// The most worker threads `--threads` may ask for: each reserves a stack, and a million of them
/// exhaust memory or the process limit long before they help.
pub const MAX_THREADS: usize = 1024;

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
        Some(n) if n > MAX_THREADS => Err(Error::bare(
            crate::error::Class::Usage,
            format!("--threads {n} is more than the limit of {MAX_THREADS}"),
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
    let version = version_suffix(adapter);
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

/// ` (<version>)` after a source format's name, or nothing for a source without a version
/// (LyCORIS files carry none), never an empty "()".
pub(crate) fn version_suffix(adapter: &crate::adapter::Adapter) -> String {
    if adapter.source_version.is_empty() {
        String::new()
    } else {
        format!(" ({})", adapter.source_version)
    }
}
