//! The merge's progress as a byte bar on stderr: the command line's side of
//! `merge::Progress`, so that the library never draws.

use std::io::IsTerminal;
use std::sync::OnceLock;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::merge::Progress;

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

/// A `merge::Progress` drawn as `progress_bar`, made when the merge knows its total.
pub struct Bar {
    enabled: bool,
    bar: OnceLock<ProgressBar>,
}

impl Bar {
    /// A bar that draws only when `enabled` and stderr is a terminal.
    pub fn new(enabled: bool) -> Bar {
        Bar {
            enabled,
            bar: OnceLock::new(),
        }
    }
}

impl Progress for Bar {
    fn start(&self, total: u64) {
        let _ = self.bar.set(progress_bar(total, self.enabled));
    }

    fn advance(&self, bytes: u64) {
        if let Some(b) = self.bar.get() {
            b.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Some(b) = self.bar.get() {
            b.finish_and_clear();
        }
    }
}
