//! kiln's training engine, shared by pre-training, SFT, reward modelling, DPO and PPO.
//!
//! The pieces follow PyTorch and Hugging Face semantics exactly, because users compare loss
//! curves across frameworks and carry hyper-parameters over: [`AdamW`] is `torch.optim.AdamW`
//! (decoupled weight decay, bias correction, `eps` outside the square root), [`AdamW8bit`] is
//! bitsandbytes' block-wise 8-bit AdamW (`optim: adamw_8bit` / `paged_adamw_8bit`), [`Sgd`] is
//! `torch.optim.SGD`, and [`Optimizer`] picks one by its HF `optim` name; [`LrSchedule`] is
//! `transformers.get_scheduler` (the first update of a warmup runs at learning rate 0, as it does
//! there), [`clip_grad_norm`] is `torch.nn.utils.clip_grad_norm_`. Gradient accumulation sums
//! per-micro-batch gradients of a loss normalised by the tokens of the whole accumulation window,
//! so `k` micro-batches of `b` equal one batch of `k·b` (the bug transformers fixed in 2024).
//! Checkpoints are written to a temporary directory and renamed into place, so a crash never
//! leaves a checkpoint that loads wrong.

/// Serde default functions: `name: Type = value;` becomes `fn name() -> Type { value }`.
macro_rules! defaults {
    ($($name:ident: $ty:ty = $value:expr;)*) => {
        $(fn $name() -> $ty { $value })*
    };
}

pub mod checkpoint;
pub mod corpus;
pub mod dpo;
pub mod finetune;
pub mod grads;
pub mod metrics;
pub mod optim;
pub mod optim8bit;
pub mod optimizer;
pub mod ppo;
pub mod ppo_reward;
pub mod pref_data;
pub mod pretrain;
pub mod reward;
mod run;
pub mod schedule;
pub mod sft;
pub mod sft_data;
pub mod yaml;

pub use checkpoint::{Checkpoint, TrainerState};
pub use grads::{GradAccumulator, clip_grad_norm, ensure_all_have_gradients};
pub use optim::{AdamW, AdamWConfig, NamedVar, Sgd, SgdConfig};
pub use optim8bit::AdamW8bit;
pub use optimizer::Optimizer;
pub use schedule::{LrSchedule, ScheduleKind};
