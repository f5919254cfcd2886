//! Progress of an interactive `sync`: one bar per target on a terminal (stderr), nothing
//! otherwise (the per-target summary lines are printed either way). Fed by the apply hook
//! `reconcile::Pass::progress`; it never changes what a sync does.

use std::collections::BTreeMap;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct ProgressBars {
    multi: MultiProgress,
    bars: Mutex<BTreeMap<String, ProgressBar>>,
    style: ProgressStyle,
}

impl ProgressBars {
    /// Bars on stderr when it is a terminal; `None` otherwise (logs, pipes, systemd).
    pub fn for_terminal() -> Option<ProgressBars> {
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            return None;
        }
        let style = ProgressStyle::with_template("{prefix:>16} [{bar:30}] {pos}/{len} changes")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        Some(ProgressBars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            bars: Mutex::new(BTreeMap::new()),
            style,
        })
    }

    /// The hook for `Pass::progress`: (target, done, total).
    pub fn update(&self, target: &str, done: usize, total: usize) {
        let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        let bar = bars.entry(target.to_string()).or_insert_with(|| {
            let bar = self.multi.add(ProgressBar::new(total as u64));
            bar.set_style(self.style.clone());
            bar.set_prefix(target.to_string());
            bar
        });
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    }

    /// Leaves the finished bars on screen.
    pub fn finish(&self) {
        let bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        for bar in bars.values() {
            bar.finish();
        }
    }
}
