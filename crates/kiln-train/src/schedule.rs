//! Learning-rate schedules by their Hugging Face names, with `transformers.get_scheduler`'s
//! multipliers: `step` is the number of optimizer steps already taken, so the first update of a
//! warmup runs at learning rate 0, exactly as in transformers.

use std::f64::consts::PI;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
}

impl FromStr for ScheduleKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "constant" => Ok(Self::Constant),
            "constant_with_warmup" => Ok(Self::ConstantWithWarmup),
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            other => Err(format!(
                "unknown lr_scheduler_type `{other}` (expected constant, constant_with_warmup, linear or cosine)"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    /// `warmup_ratio` becomes `ceil(ratio · total)` warmup steps, as in `TrainingArguments`.
    pub fn warmup_from_ratio(ratio: f64, total_steps: u64) -> u64 {
        (ratio * total_steps as f64).ceil() as u64
    }

    /// The learning rate of the update that follows `step` completed updates.
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.multiplier(step)
    }

    fn multiplier(&self, step: u64) -> f64 {
        let (s, w, n) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if self.kind != ScheduleKind::Constant && step < self.warmup_steps {
            return s / w.max(1.0);
        }
        match self.kind {
            ScheduleKind::Constant | ScheduleKind::ConstantWithWarmup => 1.0,
            ScheduleKind::Linear => ((n - s) / (n - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (s - w) / (n - w).max(1.0);
                (0.5 * (1.0 + (PI * progress).cos())).max(0.0)
            }
        }
    }
}
