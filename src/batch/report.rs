//! What a run reports: each case's outcome, the end-of-run summary (throughput, metrics CSV)
//! and the progress bar on the terminal.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use crate::metrics::{self, Scores};

/// What happened to one case.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Written; images (slices) encoded and metrics when ground truth was given.
    Done {
        /// 2D images or volume slices encoded.
        images: usize,
        /// Dice/IoU/HD95 against the ground truth.
        scores: Option<Scores>,
    },
    /// Output existed and `skip_existing` was set.
    Skipped,
    /// The reason it failed.
    Failed(String),
}

/// The end-of-run report.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// `(case name, outcome)` in processing order.
    pub cases: Vec<(String, Outcome)>,
    /// Wall time.
    pub seconds: f64,
}

impl Summary {
    /// Cases that failed.
    pub fn failed(&self) -> usize {
        self.cases
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Failed(_)))
            .count()
    }

    /// Images (slices) encoded so far.
    pub fn images(&self) -> usize {
        self.cases
            .iter()
            .map(|(_, o)| match o {
                Outcome::Done { images, .. } => *images,
                _ => 0,
            })
            .sum()
    }

    /// Images (slices) encoded per second.
    pub fn images_per_s(&self) -> f64 {
        self.images() as f64 / self.seconds.max(1e-9)
    }

    /// The per-case metrics CSV (`case,dice,iou,hd95`, then the means over cases with finite
    /// values), when any case was evaluated.
    pub fn metrics_csv(&self) -> Option<String> {
        let rows: Vec<(String, Scores)> = self
            .cases
            .iter()
            .filter_map(|(n, o)| match o {
                Outcome::Done {
                    scores: Some(s), ..
                } => Some((n.clone(), *s)),
                _ => None,
            })
            .collect();
        (!rows.is_empty()).then(|| metrics::csv(&rows))
    }
}

pub(super) struct Progress {
    on: bool,
    total: usize,
    start: Instant,
}

impl Progress {
    pub(super) fn new(total: usize, quiet: bool) -> Self {
        Progress {
            on: !quiet && std::io::stderr().is_terminal(),
            total,
            start: Instant::now(),
        }
    }

    pub(super) fn show(&self, done: usize, images: usize, name: &str) {
        if !self.on {
            return;
        }
        let w = 30;
        let filled = (done * w).checked_div(self.total).unwrap_or(w);
        let rate = images as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
        let mut e = std::io::stderr();
        let _ = write!(
            e,
            "\r[{}{}] {done}/{} cases, {rate:.2} img/s  {name:<30.30}",
            "#".repeat(filled),
            " ".repeat(w - filled),
            self.total
        );
        let _ = e.flush();
    }

    pub(super) fn finish(&self) {
        if self.on {
            let _ = writeln!(std::io::stderr());
        }
    }
}
