//! What every training recipe's run shares: the output directory's checkpoint guard, the
//! metrics log with its progress bar and loss-curve plot, and `train_results.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln_core::{Error, Result};
use serde::Serialize;

use crate::checkpoint::{Checkpoint, TrainerState};
use crate::grads::{clip_grad_norm, ensure_all_have_gradients};
use crate::metrics::{MetricsLog, MetricsRecord, plot_loss, read_metrics};
use crate::optim::NamedVar;
use crate::optimizer::Optimizer;
use candle_core::backprop::GradStore;

/// Maps an I/O error on `path` to kiln's error, naming the path.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `out` and returns its newest checkpoint when the run resumes. Checkpoints left by an
/// earlier run are an error unless resuming was asked for (`resume_key` names the setting).
pub(crate) fn prepare_output_dir(
    out: &Path,
    resume: bool,
    resume_key: &str,
) -> Result<Option<Checkpoint>> {
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let latest = Checkpoint::latest(out)?;
    if latest.is_some() && !resume {
        return Err(Error::InvalidInput(format!(
            "output_dir {} already holds checkpoints: set {resume_key}: true to continue that run, or choose another output_dir",
            out.display()
        )));
    }
    Ok(latest)
}

/// The trainer state to start from: a fresh one for `seed`, or the checkpoint's with `params`
/// and the optimizer's state restored from it (and a line on stderr saying so).
pub(crate) fn start_state(
    resume_from: Option<&Checkpoint>,
    params: &[NamedVar],
    opt: &mut Optimizer,
    seed: u64,
) -> Result<TrainerState> {
    let Some(ckpt) = resume_from else {
        return Ok(TrainerState {
            seed,
            ..TrainerState::default()
        });
    };
    let state = ckpt.restore(params, opt)?;
    eprintln!(
        "resuming from {} (step {})",
        ckpt.dir.display(),
        state.global_step
    );
    Ok(state)
}

/// One optimizer update from a step's summed gradients: on the run's first step, a check that
/// every trained tensor was reached by the backward pass (a fresh adapter's `lora_A` excepted:
/// its gradient is zero while `lora_B` is, as in PEFT), then clipping to `max_grad_norm` and the
/// step. Returns the gradient norm before clipping.
pub(crate) fn optimizer_step(
    params: &[NamedVar],
    mut grads: GradStore,
    opt: &mut Optimizer,
    max_grad_norm: f64,
    first_step: bool,
) -> Result<f64> {
    if first_step {
        let checked: Vec<NamedVar> = params
            .iter()
            .filter(|p| !p.name.ends_with("lora_A.weight"))
            .cloned()
            .collect();
        ensure_all_have_gradients(&checked, &grads)?;
    }
    let norm = clip_grad_norm(params, &mut grads, max_grad_norm)?;
    opt.step(&grads)?;
    Ok(norm)
}

/// Checks that every count of `values` (config key, value) is at least 1; errors name the key
/// under `prefix` (`"training_args."`, or `""` for a flat config).
pub(crate) fn require_nonzero(prefix: &str, values: &[(&str, u64)]) -> Result<()> {
    match values.iter().find(|(_, v)| *v == 0) {
        Some((key, _)) => Err(Error::InvalidInput(format!(
            "`{prefix}{key}`: must be at least 1"
        ))),
        None => Ok(()),
    }
}

/// Writes a run's summary as `train_results.json` in `out`.
pub(crate) fn write_results<T: Serialize>(out: &Path, summary: &T) -> Result<()> {
    let path = out.join("train_results.json");
    let json = serde_json::to_string_pretty(summary).map_err(|source| Error::Json {
        path: path.clone(),
        source,
    })?;
    std::fs::write(&path, json).map_err(io_err(&path))
}

/// `metrics.jsonl`, the progress bar and the window of steps since the last log line.
pub(crate) struct RunLog {
    path: PathBuf,
    log: MetricsLog,
    bar: indicatif::ProgressBar,
    window: LogWindow,
    logging_steps: u64,
    total_steps: u64,
    last_eval: Option<f64>,
}

impl RunLog {
    /// Opens `out/metrics.jsonl`: afresh for a new run; for a resumed one, the records up to
    /// the checkpoint's step `position` are kept (a run resumed from an earlier checkpoint
    /// logs the later steps again) and new ones appended.
    pub(crate) fn open(
        out: &Path,
        resumed: bool,
        (position, total_steps): (u64, u64),
        logging_steps: u64,
        show_progress: bool,
    ) -> Result<Self> {
        let path = out.join("metrics.jsonl");
        let kept = if resumed && path.exists() {
            read_metrics(&path)?
                .into_iter()
                .filter(|r| r.step <= position)
                .collect()
        } else {
            Vec::new()
        };
        if path.exists() {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
        let mut log = MetricsLog::open(&path)?;
        for record in &kept {
            log.write(record)?;
        }
        Ok(Self {
            log,
            path,
            bar: progress_bar(total_steps, position, show_progress),
            window: LogWindow::new(),
            logging_steps,
            total_steps,
            last_eval: None,
        })
    }

    /// Records a finished optimizer step; writes a log line every `logging_steps`, at an
    /// evaluation and at the last step.
    pub(crate) fn step(
        &mut self,
        step: u64,
        (loss, tokens): (f64, u64),
        (lr, grad_norm): (f64, f64),
        eval_loss: Option<f64>,
    ) -> Result<()> {
        self.window.add(loss, tokens);
        if eval_loss.is_some() {
            self.last_eval = eval_loss;
        }
        if step.is_multiple_of(self.logging_steps)
            || eval_loss.is_some()
            || step == self.total_steps
        {
            let record = self.window.record(step, lr, grad_norm, eval_loss);
            self.bar.set_message(format!(
                "loss {:.4} · lr {lr:.2e} · {:.0} tok/s{}",
                record.loss.unwrap_or(f64::NAN),
                record.tokens_per_second.unwrap_or(0.0),
                self.last_eval
                    .map(|l| format!(" · eval {l:.4}"))
                    .unwrap_or_default()
            ));
            self.log.write(&record)?;
        }
        self.bar.set_position(step);
        Ok(())
    }

    /// Adds a recipe's metrics of the step about to be recorded (logged as the mean over the
    /// steps of a log line).
    pub(crate) fn add_metrics<'a>(&mut self, metrics: impl IntoIterator<Item = (&'a str, f64)>) {
        for (name, value) in metrics {
            let (sum, n) = self.window.extra.entry(name.to_string()).or_default();
            *sum += value;
            *n += 1;
        }
    }

    /// Evaluation metrics for the next log line, written as `eval_NAME`.
    pub(crate) fn add_eval_metrics<'a>(
        &mut self,
        metrics: impl IntoIterator<Item = (&'a str, f64)>,
    ) {
        for (name, value) in metrics {
            self.window.eval.insert(format!("eval_{name}"), value);
        }
    }

    /// The latest evaluation loss.
    pub(crate) fn last_eval(&self) -> Option<f64> {
        self.last_eval
    }

    /// Clears the bar, reads the whole log back and plots `out/loss_curve.png`: the records
    /// and the plot's path (none when plotting failed: the run's result does not depend on it).
    pub(crate) fn finish(
        self,
        out: &Path,
        title: &str,
    ) -> Result<(Vec<MetricsRecord>, Option<PathBuf>)> {
        self.bar.finish_and_clear();
        let records = read_metrics(&self.path)?;
        let curve = out.join("loss_curve.png");
        let plotted = plot_loss(&records, title, &curve).ok().map(|()| curve);
        Ok((records, plotted))
    }
}

fn progress_bar(total: u64, position: u64, visible: bool) -> indicatif::ProgressBar {
    if !visible {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("step {pos}/{len} {bar:28} {msg} · eta {eta}")
    {
        bar.set_style(style);
    }
    bar.set_position(position);
    bar
}

/// Training loss and throughput since the last log line.
struct LogWindow {
    loss_sum: f64,
    steps: u64,
    tokens: u64,
    since: Instant,
    /// Sum and count of each recipe metric.
    extra: BTreeMap<String, (f64, u64)>,
    eval: BTreeMap<String, f64>,
}

impl LogWindow {
    fn new() -> Self {
        Self {
            loss_sum: 0.0,
            steps: 0,
            tokens: 0,
            since: Instant::now(),
            extra: BTreeMap::new(),
            eval: BTreeMap::new(),
        }
    }

    fn add(&mut self, loss: f64, tokens: u64) {
        self.loss_sum += loss;
        self.steps += 1;
        self.tokens += tokens;
    }

    fn record(
        &mut self,
        step: u64,
        lr: f64,
        grad_norm: f64,
        eval_loss: Option<f64>,
    ) -> MetricsRecord {
        let elapsed = self.since.elapsed().as_secs_f64().max(1e-9);
        let record = MetricsRecord {
            step,
            loss: (self.steps > 0).then(|| self.loss_sum / self.steps as f64),
            learning_rate: Some(lr),
            grad_norm: Some(grad_norm),
            tokens_per_second: Some(self.tokens as f64 / elapsed),
            eval_loss,
            extra: std::mem::take(&mut self.extra)
                .into_iter()
                .map(|(k, (sum, n))| (k, sum / n.max(1) as f64))
                .chain(std::mem::take(&mut self.eval))
                .collect(),
        };
        *self = Self::new();
        record
    }
}
