//! The native half of the Python package (`boft._native`, built by maturin with the `python`
//! feature). It runs the commands' own clap parsers and `run` functions, so a keyword option
//! means exactly what the flag of the same name means; python/boft/__init__.py turns keyword
//! arguments into flags. See docs/PYTHON.md.

use std::ffi::OsString;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::cli;
use crate::error::Error;

pyo3::create_exception!(
    boft,
    BoftError,
    pyo3::exceptions::PyException,
    "An error the commands report with exit code 2; `error_class` is the bracketed class."
);

/// The error as the command would print it, with its class and path as attributes.
fn raise(py: Python<'_>, program: &str, e: Error) -> PyErr {
    let err = BoftError::new_err(format!("{program}: error{e}"));
    let value = err.value(py);
    let attrs = (|| -> PyResult<()> {
        value.setattr("error_class", e.class.as_str())?;
        value.setattr(
            "path",
            e.path.as_ref().map(|p| p.as_os_str().to_os_string()),
        )?;
        value.setattr("message", e.message.as_str())
    })();
    match attrs {
        Ok(()) => err,
        Err(other) => other,
    }
}

/// Parse `argv` (flags only) with the command's own parser; any clap error is a usage error.
fn parse<A: clap::Parser>(py: Python<'_>, program: &str, argv: Vec<OsString>) -> PyResult<A> {
    let full = std::iter::once(OsString::from(program)).chain(argv);
    cli::parse_from::<A, _, _>(full).map_err(|e| raise(py, program, cli::usage_error(program, &e)))
}

fn command(program: &str) -> Option<clap::Command> {
    cli::docs::commands()
        .into_iter()
        .find(|c| c.get_name() == program)
}

#[pymodule]
#[pyo3(name = "_native")]
mod native {
    use super::*;

    #[pymodule_export]
    use super::BoftError;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))
    }

    /// Run a command as its binary would (argv[0] first) and return its exit code. The process
    /// is the command, so SIGINT/SIGTERM get the binaries' handler: an interrupted run removes
    /// its staged output and exits 2, as the Rust binaries do.
    #[pyfunction]
    fn run_command(py: Python<'_>, program: &str, argv: Vec<OsString>) -> PyResult<i32> {
        let main: fn(Vec<OsString>) -> i32 = match program {
            cli::merge::PROGRAM => cli::merge::main,
            cli::convert::PROGRAM => cli::convert::main,
            cli::verify::PROGRAM => cli::verify::main,
            cli::extract::PROGRAM => cli::extract::main,
            other => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "unknown command {other:?}"
                )))
            }
        };
        cli::install_handlers(program);
        Ok(py.detach(|| main(argv)))
    }

    /// The command's long options as (name, takes a value, may repeat), help and version left
    /// out: what the keyword arguments may be.
    #[pyfunction]
    fn options(program: &str) -> PyResult<Vec<(String, bool, bool)>> {
        let cmd = command(program).ok_or_else(|| {
            pyo3::exceptions::PyValueError::new_err(format!("unknown command {program:?}"))
        })?;
        Ok(cmd
            .get_arguments()
            .filter(|a| {
                !matches!(
                    a.get_action(),
                    clap::ArgAction::Help | clap::ArgAction::Version
                )
            })
            .filter_map(|a| {
                let long = a.get_long()?;
                let takes = a.get_action().takes_values();
                let repeats = matches!(a.get_action(), clap::ArgAction::Append);
                Some((long.to_string(), takes, repeats))
            })
            .collect())
    }

    /// `boft-merge` with these flags; returns the statistics its summary line prints.
    #[pyfunction]
    fn merge<'py>(py: Python<'py>, argv: Vec<OsString>) -> PyResult<Bound<'py, PyDict>> {
        let program = cli::merge::PROGRAM;
        let args: cli::merge::Args = parse(py, program, argv)?;
        let done = py
            .detach(|| cli::merge::run(&args))
            .map_err(|e| raise(py, program, e))?;
        let d = PyDict::new(py);
        d.set_item("transformed", done.stats.transformed)?;
        d.set_item("replaced", done.stats.replaced)?;
        d.set_item("copied", done.stats.copied)?;
        d.set_item("bytes", done.stats.bytes)?;
        let left_out: Vec<String> = done
            .stats
            .left_out
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        d.set_item("left_out", left_out)?;
        d.set_item("backend", done.backend)?;
        let outputs = pyo3::types::PyList::empty(py);
        for (path, stats) in &done.outputs {
            let o = PyDict::new(py);
            o.set_item("path", path.display().to_string())?;
            o.set_item("transformed", stats.transformed)?;
            o.set_item("replaced", stats.replaced)?;
            o.set_item("copied", stats.copied)?;
            o.set_item("bytes", stats.bytes)?;
            outputs.append(o)?;
        }
        d.set_item("outputs", outputs)?;
        if let Some(plan) = &done.plan {
            let json = py.import("json")?;
            d.set_item("plan", json.call_method1("loads", (plan.as_str(),))?)?;
        }
        if let Some(u) = &done.units {
            let units = PyDict::new(py);
            let index =
                |v: &[crate::merge::units::Unit]| v.iter().map(|u| u.index).collect::<Vec<_>>();
            units.set_item("ran", index(&u.ran))?;
            units.set_item("skipped", index(&u.skipped))?;
            units.set_item("total", u.total)?;
            d.set_item("units", units)?;
        }
        Ok(d)
    }

    /// `boft-convert` with these flags; returns what was written.
    #[pyfunction]
    fn convert<'py>(py: Python<'py>, argv: Vec<OsString>) -> PyResult<Bound<'py, PyDict>> {
        let program = cli::convert::PROGRAM;
        let args: cli::convert::Args = parse(py, program, argv)?;
        let done = py
            .detach(|| cli::convert::run(&args))
            .map_err(|e| raise(py, program, e))?;
        let d = PyDict::new(py);
        d.set_item("kind", done.kind)?;
        d.set_item("source_format", done.source_format)?;
        d.set_item("source_version", done.source_version)?;
        d.set_item("targets", done.targets)?;
        d.set_item("replaced", done.replaced)?;
        d.set_item("message", done.message)?;
        Ok(d)
    }

    /// `boft-verify` with these flags; returns the report as the JSON `--json` prints (the
    /// Python side loads it), failed checks included.
    #[pyfunction]
    fn verify(py: Python<'_>, argv: Vec<OsString>) -> PyResult<String> {
        let program = cli::verify::PROGRAM;
        let args: cli::verify::Args = parse(py, program, argv)?;
        let report = py
            .detach(|| cli::verify::run(&args))
            .map_err(|e| raise(py, program, e))?;
        Ok(serde_json::to_string(&report).expect("report serialises"))
    }

    /// Write the man pages and completions under `prefix`; returns the files written.
    #[pyfunction]
    fn install_completions(py: Python<'_>, prefix: std::path::PathBuf) -> PyResult<Vec<String>> {
        let files = cli::docs::install(&prefix).map_err(|e| raise(py, "boft", e))?;
        Ok(files.iter().map(|p| p.display().to_string()).collect())
    }
}
