//! Install the man pages and bash/zsh/fish completions of boft-merge, boft-convert and
//! boft-verify: `cargo run --example install-completions -- [--prefix DIR]` (default ~/.local).
//! The Python package does the same with `python -m boft install-completions`.

use std::path::PathBuf;

fn main() {
    let mut args = std::env::args_os().skip(1);
    let prefix = match (args.next(), args.next(), args.next()) {
        (None, _, _) => match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(".local"),
            None => fail("HOME is not set; pass --prefix DIR"),
        },
        (Some(flag), Some(dir), None) if flag == "--prefix" => PathBuf::from(dir),
        _ => fail("usage: install-completions [--prefix DIR]"),
    };
    match boft::cli::docs::install(&prefix) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
        }
        Err(e) => fail(&format!("error{e}")),
    }
}

fn fail(message: &str) -> ! {
    eprintln!("install-completions: {message}");
    std::process::exit(2)
}
