//! The optimizer a recipe asks for by its Hugging Face `optim` name.
//!
//! An enum rather than a trait object: the set is closed (the names `TrainingArguments.optim`
//! accepts that kiln implements), checkpoints need to know which state format they hold, and the
//! trainer loop calls the same handful of methods on each.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};

use crate::optim::{AdamW, AdamWConfig, NamedVar, Sgd, SgdConfig};
use crate::optim8bit::AdamW8bit;

/// The `optim` names [`Optimizer::from_name`] accepts.
pub const OPTIMIZER_NAMES: [&str; 7] = [
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_hf",
    "adamw_8bit",
    "adamw_bnb_8bit",
    "paged_adamw_8bit",
    "sgd",
];

#[derive(Debug)]
pub enum Optimizer {
    /// `torch.optim.AdamW` with f32 moments.
    AdamW(AdamW),
    /// bitsandbytes' 8-bit AdamW (also the paged variant).
    AdamW8bit(AdamW8bit),
    /// `torch.optim.SGD` without momentum.
    Sgd(Sgd),
}

impl Optimizer {
    /// Builds the optimizer the HF Trainer builds for `optim: NAME`, over `params` (decay or
    /// not per [`NamedVar::decay`]) with `config`'s hyper-parameters:
    ///
    /// * `adamw_torch`, and its aliases `adamw_torch_fused` (the fused CUDA kernel: the same
    ///   update) and `adamw_hf` (transformers' own, since removed, AdamW): [`AdamW`].
    /// * `adamw_8bit`, and its HF alias `adamw_bnb_8bit`: [`AdamW8bit`].
    /// * `paged_adamw_8bit`: also [`AdamW8bit`], identical on the CPU. In bitsandbytes "paging"
    ///   means the state lives in CUDA unified memory, which the driver moves to host RAM only
    ///   when the GPU runs out of memory; on the CPU there is nothing to page.
    /// * `sgd`: [`Sgd`] with `config.lr` and `config.weight_decay` (betas and eps unused).
    ///
    /// Any other name is an error that lists these.
    pub fn from_name(
        name: &str,
        params: Vec<NamedVar>,
        config: AdamWConfig,
    ) -> std::result::Result<Self, String> {
        Ok(match name {
            "adamw_torch" | "adamw_torch_fused" | "adamw_hf" => {
                Self::AdamW(AdamW::new(params, config))
            }
            "adamw_8bit" | "adamw_bnb_8bit" => Self::AdamW8bit(AdamW8bit::new(params, config)),
            "paged_adamw_8bit" => Self::AdamW8bit(AdamW8bit::new_paged(params, config)),
            "sgd" => Self::Sgd(Sgd::new(
                params,
                SgdConfig {
                    lr: config.lr,
                    weight_decay: config.weight_decay,
                },
            )),
            other => {
                return Err(format!(
                    "unknown optimizer `{other}`: expected one of {}",
                    OPTIMIZER_NAMES.join(", ")
                ));
            }
        })
    }

    /// The canonical name: `adamw_torch`, `adamw_8bit`, `paged_adamw_8bit` or `sgd`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::AdamW(_) => "adamw_torch",
            Self::AdamW8bit(o) => o.name(),
            Self::Sgd(_) => "sgd",
        }
    }

    /// The kind of state this optimizer saves: optimizers of one kind can resume each other's
    /// checkpoints (`adamw_8bit` and `paged_adamw_8bit` share one).
    pub fn state_kind(&self) -> &'static str {
        match self {
            Self::AdamW(_) => "adamw_torch",
            Self::AdamW8bit(_) => "adamw_8bit",
            Self::Sgd(_) => "sgd",
        }
    }

    /// [`Optimizer::state_kind`] of the optimizer an accepted `optim` name builds.
    pub fn state_kind_of(name: &str) -> Option<&'static str> {
        match name {
            "adamw_torch" | "adamw_torch_fused" | "adamw_hf" => Some("adamw_torch"),
            "adamw_8bit" | "adamw_bnb_8bit" | "paged_adamw_8bit" => Some("adamw_8bit"),
            "sgd" => Some("sgd"),
            _ => None,
        }
    }

    pub fn params(&self) -> &[NamedVar] {
        match self {
            Self::AdamW(o) => o.params(),
            Self::AdamW8bit(o) => o.params(),
            Self::Sgd(o) => o.params(),
        }
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            Self::AdamW(o) => o.config().lr,
            Self::AdamW8bit(o) => o.config().lr,
            Self::Sgd(o) => o.config().lr,
        }
    }

    pub fn set_lr(&mut self, lr: f64) {
        match self {
            Self::AdamW(o) => o.set_lr(lr),
            Self::AdamW8bit(o) => o.set_lr(lr),
            Self::Sgd(o) => o.set_lr(lr),
        }
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        match self {
            Self::AdamW(o) => o.step_count(),
            Self::AdamW8bit(o) => o.step_count(),
            Self::Sgd(o) => o.step_count(),
        }
    }

    /// Applies one update from `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        match self {
            Self::AdamW(o) => o.step(grads),
            Self::AdamW8bit(o) => o.step(grads),
            Self::Sgd(o) => o.step(grads),
        }
    }

    /// Bytes of optimizer state held now (moments appear with a parameter's first gradient).
    pub fn state_bytes(&self) -> usize {
        match self {
            Self::AdamW(o) => o.state_bytes(),
            Self::AdamW8bit(o) => o.state_bytes(),
            Self::Sgd(o) => o.state_bytes(),
        }
    }

    /// The state as named tensors plus the step count, for checkpoints.
    pub fn state_tensors(&self) -> Result<(HashMap<String, Tensor>, u64)> {
        match self {
            Self::AdamW(o) => o.state_tensors(),
            Self::AdamW8bit(o) => o.state_tensors(),
            Self::Sgd(o) => Ok(o.state_tensors()),
        }
    }

    /// Restores state saved by [`Optimizer::state_tensors`] of an optimizer of the same
    /// [`Optimizer::state_kind`].
    pub fn load_state(&mut self, tensors: HashMap<String, Tensor>, step: u64) -> Result<()> {
        match self {
            Self::AdamW(o) => o.load_state(tensors, step),
            Self::AdamW8bit(o) => o.load_state(tensors, step),
            Self::Sgd(o) => o.load_state(tensors, step),
        }
    }
}
