//! Man pages and shell completions for the four commands, generated from their clap
//! definitions so they never drift from the real flags.

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

use crate::error::Error;

/// The four commands' clap definitions.
pub fn commands() -> Vec<clap::Command> {
    vec![
        super::merge::Args::command(),
        super::convert::Args::command(),
        super::verify::Args::command(),
        super::extract::Args::command(),
    ]
}

/// Write `boft-*.1` man pages and bash, zsh and fish completions under `prefix`, where man and
/// the shells look for them (`share/man/man1`, `share/bash-completion/completions`,
/// `share/zsh/site-functions`, `share/fish/vendor_completions.d`). Returns the files written.
pub fn install(prefix: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut written = Vec::new();
    for mut cmd in commands() {
        let name = cmd.get_name().to_string();
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone())
            .render(&mut page)
            .map_err(|e| Error::io(prefix, e))?;
        written.push(write(
            &prefix.join("share/man/man1").join(format!("{name}.1")),
            &page,
        )?);
        for (shell, dir, file) in [
            (
                Shell::Bash,
                "share/bash-completion/completions",
                name.clone(),
            ),
            (Shell::Zsh, "share/zsh/site-functions", format!("_{name}")),
            (
                Shell::Fish,
                "share/fish/vendor_completions.d",
                format!("{name}.fish"),
            ),
        ] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, name.clone(), &mut script);
            written.push(write(&prefix.join(dir).join(file), &script)?);
        }
    }
    Ok(written)
}

fn write(path: &Path, bytes: &[u8]) -> Result<PathBuf, Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))?;
    Ok(path.to_path_buf())
}
