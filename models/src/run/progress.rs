//! The training progress bar: step/total, loss, learning rate, tokens/s and time left, redrawn
//! in place on stderr. When stderr is not a terminal (a log file, CI) indicatif draws nothing,
//! so logs are not flooded with redraws; `println` still prints there.

use indicatif::{ProgressBar, ProgressStyle};

#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar for steps `start..total` (start > 0 when resuming, so the ETA counts only the
    /// steps still to run).
    pub fn new(total_steps: u64, start_step: u64) -> Progress {
        let style = ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let bar = ProgressBar::new(total_steps).with_style(style);
        bar.set_position(start_step);
        bar.reset_eta();
        Progress { bar }
    }

    /// A bar that draws nothing (a quiet run, or one whose caller shows its own progress).
    pub fn hidden() -> Progress {
        Progress { bar: ProgressBar::hidden() }
    }

    /// Moves the bar to `step` (the number of steps done) and shows the latest numbers.
    pub fn update(&self, step: u64, loss: f64, lr: f64, tokens_per_sec: f64) {
        self.bar.set_message(format!(
            "loss {loss:.4} | lr {lr:.2e} | {} tok/s",
            human_rate(tokens_per_sec)
        ));
        self.bar.set_position(step);
    }

    /// Replaces the text after the counts.
    pub fn set_message(&self, msg: impl Into<String>) {
        self.bar.set_message(msg.into());
    }

    /// Prints a line above the bar (or plainly, when the bar is hidden) without garbling it.
    pub fn println(&self, msg: impl AsRef<str>) {
        self.bar.suspend(|| eprintln!("{}", msg.as_ref()));
    }

    /// Moves the bar without new numbers (work that has no loss to show, such as evaluation).
    pub fn set_position(&self, position: u64) {
        self.bar.set_position(position);
    }

    /// Adds `steps` to the total (work found to be needed on the way).
    pub fn add_steps(&self, steps: u64) {
        self.bar.inc_length(steps);
    }

    /// Removes the bar from the screen.
    pub fn clear(&self) {
        self.bar.finish_and_clear();
    }

    /// Leaves the final state of the bar on screen.
    pub fn finish(&self) {
        self.bar.finish();
    }
}

fn human_rate(x: f64) -> String {
    match x {
        x if !x.is_finite() => "-".to_string(),
        x if x >= 1e6 => format!("{:.2}M", x / 1e6),
        x if x >= 1e4 => format!("{:.1}k", x / 1e3),
        x => format!("{x:.0}"),
    }
}

/// 1234567 → "1,234,567".
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_and_prints_without_a_terminal() {
        let p = Progress::new(10, 2);
        for step in 3..=10 {
            p.update(step, 2.5, 6e-4, 12_345.0);
        }
        p.println("validation loss 2.4");
        p.finish();
        assert_eq!(human_rate(1_234_567.0), "1.23M");
        assert_eq!(human_rate(51_234.0), "51.2k");
        assert_eq!(human_rate(999.4), "999");
    }
}
