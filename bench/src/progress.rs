//! A progress bar on stderr for suite runs: shown only when stderr is a terminal, and only once a
//! run has taken a second, so short runs and redirected output stay clean.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long a run goes before its bar appears.
const SHOW_AFTER: Duration = Duration::from_secs(1);

/// Progress over a known number of steps (cases). Cheap to update; safe to share between threads.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    start: Instant,
    shown: AtomicBool,
    enabled: bool,
}

impl Progress {
    /// A bar of `len` steps, drawn when stderr is a terminal.
    pub fn new(len: u64) -> Self {
        Self::with_enabled(len, std::io::stderr().is_terminal())
    }

    /// A bar that never draws.
    pub fn hidden(len: u64) -> Self {
        Self::with_enabled(len, false)
    }

    fn with_enabled(len: u64, enabled: bool) -> Self {
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
        if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} eta {eta} {msg}") {
            bar.set_style(style.progress_chars("=> "));
        }
        Self { bar, start: Instant::now(), shown: AtomicBool::new(false), enabled }
    }

    /// Names the step in progress.
    pub fn set_message(&self, msg: impl Into<String>) {
        self.maybe_show();
        self.bar.set_message(msg.into());
    }

    /// Marks one step done.
    pub fn inc(&self) {
        self.maybe_show();
        self.bar.inc(1);
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }

    fn maybe_show(&self) {
        if self.enabled && !self.shown.load(Ordering::Relaxed) && self.start.elapsed() >= SHOW_AFTER {
            self.shown.store(true, Ordering::Relaxed);
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
            self.bar.enable_steady_tick(Duration::from_millis(250));
        }
    }
}
