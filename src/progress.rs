//! What a person (or a machine) sees while a rank trains: a progress bar on an interactive
//! terminal, plain `tracing` lines otherwise.
//!
//! The library never decides by itself to draw: the binary picks a [`ProgressMode`] (a bar
//! only when stderr is a terminal, the log format is text and `--quiet` is off) and puts
//! it in the training configuration. Only rank 0 reports progress. While a bar is on
//! screen, log lines written through [`LogWriter`] clear it, print, and redraw it, so the
//! two never garble each other.

use std::fmt;
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (`tracing-subscriber`'s JSON format).
    Json,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// How rank 0 reports training progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// An `info` log line every `--log-every` steps.
    #[default]
    Log,
    /// A progress bar on stderr (epoch, step, loss, samples/s, ETA) instead of those lines.
    Bar,
}

/// The bar currently on screen, for [`LogWriter`].
static ACTIVE: Mutex<Option<ProgressBar>> = Mutex::new(None);

fn active() -> Option<ProgressBar> {
    ACTIVE.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

fn set_active(bar: Option<ProgressBar>) {
    *ACTIVE.lock().unwrap_or_else(|p| p.into_inner()) = bar;
}

/// One rank's progress reporter for one run.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    steps_per_epoch: u64,
    epochs: u64,
}

impl Progress {
    /// A reporter for a run of `total` steps, `steps_per_epoch` to an epoch. Draws only in
    /// [`ProgressMode::Bar`] on rank 0.
    pub fn new(mode: ProgressMode, rank: usize, total: u64, steps_per_epoch: u64) -> Progress {
        let steps_per_epoch = steps_per_epoch.max(1);
        let epochs = total.div_ceil(steps_per_epoch).max(1);
        let bar = (mode == ProgressMode::Bar && rank == 0).then(|| {
            let style = ProgressStyle::with_template(
                "{spinner} epoch {prefix} [{bar:30}] step {pos}/{len} {msg} ETA {eta}",
            )
            .expect("the template is valid")
            .progress_chars("=> ");
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
                .with_style(style)
                .with_prefix(format!("1/{epochs}"));
            bar.enable_steady_tick(Duration::from_millis(200));
            set_active(Some(bar.clone()));
            bar
        });
        Progress {
            bar,
            steps_per_epoch,
            epochs,
        }
    }

    /// Whether a bar is drawn (then the caller skips its progress log lines).
    pub fn is_bar(&self) -> bool {
        self.bar.is_some()
    }

    /// `done` steps are finished.
    pub fn step(&self, done: u64) {
        let Some(bar) = &self.bar else { return };
        let epoch = (done.saturating_sub(1) / self.steps_per_epoch + 1).min(self.epochs);
        bar.set_prefix(format!("{epoch}/{}", self.epochs));
        bar.set_position(done);
    }

    /// The mean loss and throughput of the last logging window.
    pub fn window(&self, loss: f64, samples_per_sec: f64) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("loss {loss:.4} {samples_per_sec:.0} samples/s"));
        }
    }

    /// The run ended well: leave the full bar on screen.
    pub fn finish(mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
            set_active(None);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // The run failed: keep the bar where it stopped and let the error print below it.
        if let Some(bar) = self.bar.take() {
            bar.abandon();
            set_active(None);
        }
    }
}

/// A `tracing-subscriber` writer to stderr that moves an active progress bar out of the
/// way of each line.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWriter;

/// The writer [`LogWriter`] hands out for one log line.
#[derive(Debug)]
pub struct LineWriter;

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let write = || std::io::stderr().lock().write_all(buf);
        match active() {
            Some(bar) => bar.suspend(write)?,
            None => write()?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rank_0_in_bar_mode_draws() {
        assert!(!Progress::new(ProgressMode::Log, 0, 10, 5).is_bar());
        assert!(!Progress::new(ProgressMode::Bar, 1, 10, 5).is_bar());
        let p = Progress::new(ProgressMode::Bar, 0, 10, 4);
        assert!(p.is_bar());
        p.step(5);
        p.window(0.5, 100.0);
        let bar = p.bar.clone().unwrap();
        assert_eq!(bar.position(), 5);
        assert_eq!(bar.prefix(), "2/3");
        p.finish();
        assert!(active().is_none());
    }

    #[test]
    fn log_format_names_parse_back() {
        use clap::ValueEnum;
        for f in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(LogFormat::from_str(&f.to_string(), false), Ok(f));
        }
    }
}
