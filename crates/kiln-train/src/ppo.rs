//! `kiln ppo`: RLHF with proximal policy optimization (Schulman et al. 2017,
//! <https://arxiv.org/abs/1707.06347>; for language models, Ouyang et al. 2022,
//! <https://arxiv.org/abs/2203.02155>), with the semantics, names and defaults of TRL's
//! `PPOTrainer` / `PPOConfig` (`trl/experimental/ppo`), and a reward that is any [`RewardFn`]:
//! a reward model, or a rule (the synthetic world's checks, a regex, an exact-match list).
//!
//! ```yaml
//! model_id: out/sft-merged                 # the policy to train (and the frozen reference)
//! dataset_path: data/world/rl/prompts.jsonl  # prompt-only rows: {"prompt": str | messages}
//! peft_config: {r: 16, lora_alpha: 32}       # absent: the policy trains in full
//! training_args:
//!   reward: {rule: world, world_path: data/world/world.json}   # or reward_model_path: DIR
//!   per_device_train_batch_size: 8
//!   total_episodes: 2000
//!   kl_coef: 0.05
//! ```
//!
//! Each step (TRL's "update") takes `per_device_train_batch_size × gradient_accumulation_steps
//! × num_mini_batches` prompts and:
//!
//! 1. **Rollout.** Samples a response to each prompt at `temperature` through the same KV-cache
//!    path as `kiln generate` ([`kiln_model::generate`]), stopping at EOS or `response_length`
//!    tokens; then, in one forward pass per chunk of `local_rollout_forward_batch_size`, the
//!    policy's log-probabilities and values and the reference's log-probabilities of the
//!    response tokens (of `logits / (temperature + 1e-7)`, as TRL computes them).
//! 2. **Score.** The reward scores the EOS-truncated response; `missing_eos_penalty` is
//!    subtracted when it has no EOS.
//! 3. **Per-token reward.** `−kl_coef · kl_t` at every response token (`kl_t` is `logπ − logπref`
//!    for `k1`, `(r − 1) − log r` with `r = πref/π` for `k3`), plus the score at the last one.
//! 4. **GAE.** `δ_t = r_t + γ·V(t+1) − V(t)` (with `V` after the last token 0),
//!    `A_t = Σ_k (γλ)^k δ_{t+k}`, `returns = A + V`; `A` is whitened over every response token
//!    of the batch.
//! 5. **PPO epochs.** `num_ppo_epochs` passes over the batch in `num_mini_batches` shuffled
//!    mini-batches, one optimizer step each (micro-batches of `per_device_train_batch_size`
//!    accumulate): `pg = max(−A·ρ, −A·clip(ρ, 1 ± cliprange))`,
//!    `vf = ½·max((v − R)², (clip(v, v_old ± cliprange_value) − R)²)`, both averaged over the
//!    response tokens, `loss = pg + vf_coef · vf`.
//!
//! **The value head** is a `Linear(hidden, 1)` (with bias) on the policy's own final hidden
//! states, trained jointly with the policy — TRL's legacy `AutoModelForCausalLMWithValueHead`
//! rather than its current separate value model (a second backbone initialised from the reward
//! model). A shared backbone costs one forward pass per batch instead of two and no second copy
//! of the weights, which is what lets PPO run on a laptop; the price is that the value loss also
//! moves the policy's weights (scaled by `vf_coef`). The head starts at zero, so the first value
//! estimates are 0 and the value loss sends no gradient into the backbone until the head has
//! learned something. It is saved in the checkpoints as `v_head.summary.{weight,bias}` (TRL's
//! names); the output directory holds the policy alone, as TRL's does.
//!
//! **The reference** is the policy as it was before training. In a LoRA run it is the same model
//! with the adapter switched off ([`CausalLm::without_adapters`], PEFT's `disable_adapter()`):
//! no second copy of the weights. Continuing an adapter (`adapter_path`), the reference is the
//! base with a frozen copy of the starting adapter (a few MB). With `modules_to_save` (weights
//! that train in full beside the adapter) and in full fine-tuning, it is a second, frozen load.
//!
//! Where kiln departs from TRL, and why:
//!
//! - the score is added at the last response token, as the algorithm states it; TRL's
//!   `padding_mask_p1` bookkeeping puts it one position *after* an EOS (a step the policy never
//!   takes) when the response ended early;
//! - dropout is off in the policy (TRL disables it in every model for PPO: the ratio must start
//!   at 1), so `peft_config.lora_dropout` is ignored;
//! - `max_grad_norm` is honoured (TRL's PPO loop never clips); `max_steps`, when set, counts
//!   steps (updates) and takes precedence over `total_episodes`;
//! - metric means are over response tokens (TRL's `approxkl` and `objective/entropy` also
//!   average in padding);
//! - gradient accumulation normalises by the response tokens of the whole mini-batch, so that
//!   `k` micro-batches equal one micro-batch `k` times larger (TRL averages per-micro-batch
//!   means).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{D, DType, Device, Tensor, Var};
use kiln_core::{Error, Result, Tokenizer};
use kiln_model::{CausalLm, GenerateParams, SamplingParams, generate};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::checkpoint::Checkpoint;
use crate::corpus::EpochOrder;
use crate::finetune::{FineTuneConfig, FineTuneModel, MethodArgs};
use crate::grads::{GradAccumulator, clip_grad_norm};
use crate::metrics::plot_metrics;
use crate::optim::NamedVar;
use crate::optimizer::Optimizer;
pub use crate::ppo_reward::{
    KlEstimator, PpoPrompt, gae, kl_estimate, load_prompts, masked_whiten, token_rewards,
};
use crate::ppo_reward::{RewardFn, RewardSpec, Rollout, whiten_ragged};
use crate::run::{RunLog, prepare_output_dir, start_state, write_results};

/// `kiln ppo`'s config file.
pub type PpoConfig = FineTuneConfig<PpoArgs>;

defaults! {
    d_ppo_epochs: usize = 4;
    d_one: usize = 1;
    d_kl_coef: f64 = 0.05;
    d_kl_estimator: String = "k1".to_string();
    d_clip: f64 = 0.2;
    d_vf_coef: f64 = 0.1;
    d_gamma: f64 = 1.0;
    d_lam: f64 = 0.95;
    d_response_length: usize = 53;
    d_temperature: f64 = 0.7;
    d_forward_batch: usize = 64;
}

/// `PPOConfig`'s keys in `training_args`, under TRL's names and defaults, plus kiln's `reward`
/// (a rule reward) and `eval_temperature`. `learning_rate` defaults to 3e-6, as in TRL.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PpoArgs {
    /// Passes over each batch of rollouts.
    #[serde(default = "d_ppo_epochs")]
    pub num_ppo_epochs: usize,
    /// Optimizer steps per pass over a batch.
    #[serde(default = "d_one")]
    pub num_mini_batches: usize,
    /// Rollouts in the whole run; default `num_train_epochs × prompts`.
    #[serde(default)]
    pub total_episodes: Option<u64>,
    #[serde(default = "d_kl_coef")]
    pub kl_coef: f64,
    /// `k1` (`logπ − logπref`) or `k3` (`(r − 1) − log r`, `r = πref/π`; never negative).
    #[serde(default = "d_kl_estimator")]
    pub kl_estimator: String,
    #[serde(default = "d_clip")]
    pub cliprange: f64,
    #[serde(default = "d_vf_coef")]
    pub vf_coef: f64,
    #[serde(default = "d_clip")]
    pub cliprange_value: f64,
    #[serde(default = "d_gamma")]
    pub gamma: f64,
    #[serde(default = "d_lam")]
    pub lam: f64,
    /// Whitens the per-token rewards (without shifting their mean) before GAE.
    #[serde(default)]
    pub whiten_rewards: bool,
    /// The most tokens a response may have.
    #[serde(default = "d_response_length")]
    pub response_length: usize,
    /// The sampling temperature of rollouts (and of the log-probabilities PPO trains).
    #[serde(default = "d_temperature")]
    pub temperature: f64,
    /// Subtracted from the score of a response that has no EOS token.
    #[serde(default)]
    pub missing_eos_penalty: Option<f64>,
    /// Sequences per forward pass when scoring rollouts.
    #[serde(default = "d_forward_batch")]
    pub local_rollout_forward_batch_size: usize,
    /// A reward model directory (TRL's key); or give `reward`.
    #[serde(default)]
    pub reward_model_path: Option<PathBuf>,
    /// A rule reward: `{rule: world, world_path: FILE}`, `{regex: PATTERN}` or
    /// `{exact: [STRING, …]}` (see [`crate::ppo_reward`]).
    #[serde(default)]
    pub reward: Option<Value>,
    /// The temperature of the rollouts that measure the mean reward before and after training
    /// (0, the default: greedy).
    #[serde(default)]
    pub eval_temperature: f64,
}

impl MethodArgs for PpoArgs {
    const KEYS: &'static [&'static str] = &[
        "num_ppo_epochs",
        "num_mini_batches",
        "total_episodes",
        "kl_coef",
        "kl_estimator",
        "cliprange",
        "vf_coef",
        "cliprange_value",
        "gamma",
        "lam",
        "whiten_rewards",
        "response_length",
        "temperature",
        "missing_eos_penalty",
        "local_rollout_forward_batch_size",
        "reward_model_path",
        "reward",
        "eval_temperature",
    ];

    fn default_overrides() -> Vec<(&'static str, Value)> {
        vec![("learning_rate", json!(3e-6))]
    }

    fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| {
            Err(Error::InvalidInput(format!("training_args.{key}: {msg}")))
        };
        crate::run::require_nonzero(
            "training_args.",
            &[
                ("num_ppo_epochs", self.num_ppo_epochs as u64),
                ("num_mini_batches", self.num_mini_batches as u64),
                ("response_length", self.response_length as u64),
                (
                    "local_rollout_forward_batch_size",
                    self.local_rollout_forward_batch_size as u64,
                ),
                ("total_episodes", self.total_episodes.unwrap_or(1)),
            ],
        )?;
        self.kl_estimator()?;
        let (unit, positive) = ((0.0..=1.0), (f64::MIN_POSITIVE..=f64::MAX));
        let checks = [
            ("kl_coef", self.kl_coef, 0.0..=f64::MAX, ">= 0"),
            ("cliprange", self.cliprange, positive.clone(), "> 0"),
            (
                "cliprange_value",
                self.cliprange_value,
                positive.clone(),
                "> 0",
            ),
            ("vf_coef", self.vf_coef, 0.0..=f64::MAX, ">= 0"),
            ("gamma", self.gamma, unit.clone(), "in [0, 1]"),
            ("lam", self.lam, unit, "in [0, 1]"),
            (
                "temperature",
                self.temperature,
                positive,
                "> 0 (PPO samples)",
            ),
            (
                "eval_temperature",
                self.eval_temperature,
                0.0..=f64::MAX,
                ">= 0 (0: greedy)",
            ),
            (
                "missing_eos_penalty",
                self.missing_eos_penalty.unwrap_or(0.0),
                f64::MIN..=f64::MAX,
                "finite",
            ),
        ];
        for (key, value, range, what) in checks {
            if !range.contains(&value) {
                return bad(key, format!("{value} must be {what}"));
            }
        }
        if self.reward.is_some() || self.reward_model_path.is_some() {
            self.reward_spec()?;
        }
        Ok(())
    }
}

impl PpoArgs {
    pub fn kl_estimator(&self) -> Result<KlEstimator> {
        match self.kl_estimator.as_str() {
            "k1" => Ok(KlEstimator::K1),
            "k3" => Ok(KlEstimator::K3),
            other => Err(Error::InvalidInput(format!(
                "training_args.kl_estimator: `{other}` is not an estimator (expected k1 or k3)"
            ))),
        }
    }

    /// The reward the config names; an error naming `training_args.reward` when it names none.
    pub fn reward_spec(&self) -> Result<RewardSpec> {
        RewardSpec::from_args(self.reward.as_ref(), self.reward_model_path.as_deref())
    }
}

/// What a finished run reports (also written to `train_results.json`).
#[derive(Debug, Clone, Serialize)]
pub struct PpoSummary {
    pub output_dir: PathBuf,
    /// `"lora"` or `"full"`.
    pub method: String,
    /// The reward's description (`rule: world`, `regex: …`, `reward model DIR`).
    pub reward: String,
    pub train_prompts: usize,
    /// The prompts the before/after reward is measured on.
    pub eval_prompts: usize,
    /// Whether those are held out (`eval_dataset_path` or `eval_split`) or the training prompts.
    pub eval_held_out: bool,
    /// Prompts left out because prompt and response would not fit in `max_length`.
    pub prompts_dropped: usize,
    /// PPO steps (TRL's updates: one batch of rollouts each).
    pub steps: u64,
    pub optimizer_steps: u64,
    /// Rollouts trained on.
    pub episodes: u64,
    pub total_parameters: usize,
    /// Policy parameters trained, and the value head.
    pub trainable_parameters: usize,
    pub optimizer: String,
    /// The mean reward of rollouts at `eval_temperature` on the eval prompts, before training…
    pub mean_reward_before: f64,
    /// … and after, measured the same way (same prompts, same seeds).
    pub mean_reward_after: f64,
    pub eval_temperature: f64,
    /// `objective/scores` and `objective/kl` of the last logged step.
    pub final_scores: Option<f64>,
    pub final_kl: Option<f64>,
    pub tokens_generated: u64,
    pub wall_seconds: f64,
    pub seconds_per_step: f64,
    /// Of the training time, the part spent sampling and scoring rollouts.
    pub rollout_seconds: f64,
    pub loss_curve: Option<PathBuf>,
    /// `reward_curve.png`: the rollouts' scores, the KL-penalized reward and the held-out
    /// mean reward.
    pub reward_curve: Option<PathBuf>,
    /// The adapter (LoRA) or model (full) directory written.
    pub saved: PathBuf,
}

// ---------------------------------------------------------------------------------------------
// The clipped losses.

/// PPO's clipped surrogate, summed over the tokens where `mask` is 1 and divided by
/// `normalizer`: `max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))` with `ρ = exp(new − old)`. Returns the
/// loss and the number of masked tokens where the clipped branch is the larger (TRL's clipfrac
/// numerator). All inputs are `[tokens]` f32.
pub fn clipped_policy_loss(
    new_logprobs: &Tensor,
    old_logprobs: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    cliprange: f64,
    normalizer: f64,
) -> Result<(Tensor, f64)> {
    let ratio = (new_logprobs - old_logprobs)?.exp()?;
    let neg_adv = advantages.neg()?;
    let unclipped = (&neg_adv * &ratio)?;
    let clipped = (&neg_adv * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)?)?;
    let loss = (unclipped.maximum(&clipped)? * mask)?.sum_all()?;
    let n_clipped = (clipped.gt(&unclipped)?.to_dtype(DType::F32)? * mask)?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok(((loss / normalizer.max(1e-12))?, f64::from(n_clipped)))
}

/// PPO's clipped value loss, summed over the masked tokens and divided by `normalizer`:
/// `½·max((v − R)², (clip(v, v_old − ε, v_old + ε) − R)²)`. Returns the loss and the number of
/// masked tokens where the clipped branch is the larger (TRL's `val/clipfrac` numerator).
pub fn clipped_value_loss(
    values: &Tensor,
    old_values: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    cliprange_value: f64,
    normalizer: f64,
) -> Result<(Tensor, f64)> {
    let clipped_v = values
        .maximum(&(old_values - cliprange_value)?)?
        .minimum(&(old_values + cliprange_value)?)?;
    let unclipped = (values - returns)?.sqr()?;
    let clipped = (clipped_v - returns)?.sqr()?;
    let loss = (unclipped.maximum(&clipped)? * mask)?.sum_all()?;
    let n_clipped = (clipped.gt(&unclipped)?.to_dtype(DType::F32)? * mask)?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok((
        (loss * (0.5 / normalizer.max(1e-12)))?,
        f64::from(n_clipped),
    ))
}

// ---------------------------------------------------------------------------------------------
// Models: the value head and the reference.

/// `Linear(hidden, 1)` on the policy's final hidden states (see the module docs).
#[derive(Debug, Clone)]
pub struct ValueHead {
    /// `[1, hidden]`
    pub weight: Var,
    /// `[1]`
    pub bias: Var,
}

impl ValueHead {
    /// A head that answers 0 everywhere until it learns.
    pub fn zeros(hidden: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            weight: Var::zeros((1, hidden), DType::F32, device)?,
            bias: Var::zeros(1, DType::F32, device)?,
        })
    }

    /// Its parameters under TRL's names.
    pub fn params(&self) -> Vec<NamedVar> {
        vec![
            NamedVar::new("v_head.summary.weight", self.weight.clone()),
            NamedVar::new("v_head.summary.bias", self.bias.clone()),
        ]
    }

    /// Values of hidden-state rows `[rows, hidden]` → `[rows]`; `train` keeps the graph.
    pub fn forward(&self, rows: &Tensor, train: bool) -> Result<Tensor> {
        let (w, b) = if train {
            (
                self.weight.as_tensor().clone(),
                self.bias.as_tensor().clone(),
            )
        } else {
            (
                self.weight.as_tensor().detach(),
                self.bias.as_tensor().detach(),
            )
        };
        Ok(rows
            .to_dtype(DType::F32)?
            .matmul(&w.t()?)?
            .broadcast_add(&b)?
            .squeeze(1)?)
    }
}

/// Turns LoRA dropout off (TRL disables dropout in every PPO model).
fn disable_dropout(model: &mut CausalLm) -> Result<()> {
    for (_, linear) in model.linears_mut() {
        if let Some(mut lora) = linear.remove_lora() {
            lora.dropout = 0.0;
            linear.set_lora(lora)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Rollouts.

/// One rollout with everything PPO needs of it; the per-token vectors cover the response.
#[derive(Debug, Clone)]
struct Experience {
    prompt_ids: Vec<u32>,
    response_ids: Vec<u32>,
    logprobs: Vec<f32>,
    values: Vec<f32>,
    advantages: Vec<f32>,
    returns: Vec<f32>,
}

/// What the run shares between rollouts, training and evaluation.
struct Ctx<'a> {
    policy: &'a CausalLm,
    /// The policy outside the graph, for sampling and scoring.
    sampler: CausalLm,
    reference: &'a CausalLm,
    head: &'a ValueHead,
    tokenizer: &'a Tokenizer,
    reward: &'a dyn RewardFn,
    eos: Vec<u32>,
    pad: u32,
    args: &'a PpoArgs,
    estimator: KlEstimator,
    seed: u64,
}

/// Sequences right-padded into one batch, and where each response token is predicted.
struct Packed {
    ids: Tensor,
    /// Flat `[batch · seq]` row of the hidden state that predicts each response token,
    /// `[batch · width]` (padding points at row 0).
    rows: Tensor,
    targets: Tensor,
    mask: Vec<f32>,
    width: usize,
}

fn pack(seqs: &[(&[u32], &[u32])], pad: u32, device: &Device) -> Result<Packed> {
    let t = seqs
        .iter()
        .map(|(p, r)| p.len() + r.len())
        .max()
        .unwrap_or(1);
    let width = seqs.iter().map(|(_, r)| r.len()).max().unwrap_or(1);
    let mut ids = Vec::with_capacity(seqs.len() * t);
    let (mut rows, mut targets, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for (b, (p, r)) in seqs.iter().enumerate() {
        ids.extend_from_slice(p);
        ids.extend_from_slice(r);
        ids.resize((b + 1) * t, pad);
        for j in 0..width {
            let real = j < r.len();
            rows.push(if real {
                (b * t + p.len() + j - 1) as u32
            } else {
                0
            });
            targets.push(if real { r[j] } else { pad });
            mask.push(f32::from(u8::from(real)));
        }
    }
    Ok(Packed {
        ids: Tensor::from_vec(ids, (seqs.len(), t), device)?,
        rows: Tensor::new(rows.as_slice(), device)?,
        targets: Tensor::new(targets.as_slice(), device)?,
        mask,
        width,
    })
}

/// Log-probabilities of the response tokens under `logits / (temperature + 1e-7)`, the values
/// when a head is given, and the scaled logits, all `[batch · width, …]`.
fn response_outputs(
    model: &CausalLm,
    head: Option<(&ValueHead, bool)>,
    packed: &Packed,
    temperature: f64,
) -> Result<(Tensor, Option<Tensor>, Tensor)> {
    let hidden = model.forward_hidden(&packed.ids, None)?;
    let (b, t, h) = hidden.dims3()?;
    let rows = hidden.reshape((b * t, h))?.index_select(&packed.rows, 0)?;
    let logits = (model.project(&rows)? / (temperature + 1e-7))?;
    let logprobs = kiln_model::ops::cross_entropy_rows(&logits, &packed.targets)?.neg()?;
    let values = head.map(|(h, train)| h.forward(&rows, train)).transpose()?;
    Ok((logprobs, values, logits))
}

/// The entropy of the scaled logits summed over the rows where `mask` is 1 (no graph).
fn entropy_sum(logits: &Tensor, mask: &[f32]) -> Result<f64> {
    let logp = candle_nn::ops::log_softmax(&logits.detach(), D::Minus1)?;
    let entropy: Vec<f32> = (logp.exp()? * &logp)?.sum(D::Minus1)?.neg()?.to_vec1()?;
    Ok(entropy
        .iter()
        .zip(mask)
        .map(|(e, m)| f64::from(e * m))
        .sum())
}

fn rows_of(flat: &[f32], width: usize, lens: impl Iterator<Item = usize>) -> Vec<Vec<f32>> {
    lens.enumerate()
        .map(|(b, n)| flat[b * width..b * width + n].to_vec())
        .collect()
}

/// Samples a response per prompt (`temperature` 0: greedy) with per-prompt seeds; each ends at
/// its first EOS (included) or after `response_length` tokens.
fn sample(ctx: &Ctx, prompts: &[&[u32]], temperature: f64, seeds: &[u64]) -> Result<Vec<Vec<u32>>> {
    prompts
        .iter()
        .zip(seeds)
        .map(|(ids, seed)| {
            let params = GenerateParams {
                max_new_tokens: ctx.args.response_length,
                sampling: SamplingParams {
                    temperature: temperature as f32,
                    seed: *seed,
                    ..SamplingParams::default()
                },
                eos_token_ids: ctx.eos.clone(),
                ..GenerateParams::default()
            };
            Ok(generate(&ctx.sampler, ids, &params, |_| {})?.token_ids)
        })
        .collect()
}

/// Scores responses with the reward (and the missing-EOS penalty when `penalize`).
fn score(
    ctx: &Ctx,
    prompts: &[&PpoPrompt],
    responses: &[Vec<u32>],
    penalize: bool,
) -> Result<Vec<f32>> {
    let replies: Vec<String> = responses
        .iter()
        .map(|r| ctx.tokenizer.decode(r, true))
        .collect::<Result<_>>()?;
    let rollouts: Vec<Rollout> = prompts
        .iter()
        .zip(responses)
        .zip(&replies)
        .map(|((p, r), reply)| Rollout {
            row: &p.row,
            prompt_ids: &p.ids,
            response_ids: r,
            reply,
        })
        .collect();
    let mut scores = Vec::with_capacity(rollouts.len());
    for chunk in rollouts.chunks(ctx.args.local_rollout_forward_batch_size) {
        scores.extend(ctx.reward.score(chunk)?);
    }
    if scores.len() != rollouts.len() {
        return Err(Error::InvalidInput(format!(
            "reward `{}` returned {} scores for {} rollouts",
            ctx.reward.name(),
            scores.len(),
            rollouts.len()
        )));
    }
    if let (true, Some(penalty)) = (penalize, ctx.args.missing_eos_penalty) {
        for (s, r) in scores.iter_mut().zip(responses) {
            if !r.iter().any(|t| ctx.eos.contains(t)) {
                *s -= penalty as f32;
            }
        }
    }
    Ok(scores)
}

/// The mean reward of one rollout per prompt at `eval_temperature`, seeded per prompt, so two
/// calls on the same weights agree.
fn mean_reward(ctx: &Ctx, prompts: &[PpoPrompt]) -> Result<f64> {
    let refs: Vec<&PpoPrompt> = prompts.iter().collect();
    let ids: Vec<&[u32]> = prompts.iter().map(|p| p.ids.as_slice()).collect();
    let seeds: Vec<u64> = (0..prompts.len())
        .map(|i| mix(ctx.seed ^ 0x0E7A_1000, i as u64))
        .collect();
    let responses = sample(ctx, &ids, ctx.args.eval_temperature, &seeds)?;
    let scores = score(ctx, &refs, &responses, false)?;
    Ok(scores.iter().map(|s| f64::from(*s)).sum::<f64>() / scores.len().max(1) as f64)
}

fn mix(a: u64, b: u64) -> u64 {
    kiln_model::ops::mix64(a ^ kiln_model::ops::mix64(b))
}

/// The step's metrics that come from the rollouts.
struct RolloutStats {
    kl: f64,
    entropy: f64,
    non_score: f64,
    scores: f64,
    eos: f64,
    tokens: u64,
}

/// Samples, scores and computes advantages for one batch of prompts.
fn rollout(
    ctx: &Ctx,
    prompts: &[&PpoPrompt],
    step: u64,
) -> Result<(Vec<Experience>, RolloutStats)> {
    let a = ctx.args;
    let ids: Vec<&[u32]> = prompts.iter().map(|p| p.ids.as_slice()).collect();
    let seeds: Vec<u64> = (0..prompts.len())
        .map(|i| mix(ctx.seed ^ step.wrapping_mul(0x9E37_79B9), i as u64))
        .collect();
    let responses = sample(ctx, &ids, a.temperature, &seeds)?;
    let scores = score(ctx, prompts, &responses, true)?;

    let (mut logprobs, mut ref_logprobs, mut values) = (Vec::new(), Vec::new(), Vec::new());
    let seqs: Vec<(&[u32], &[u32])> = ids
        .iter()
        .zip(&responses)
        .map(|(p, r)| (*p, r.as_slice()))
        .collect();
    let device = ctx.sampler.device();
    for chunk in seqs.chunks(a.local_rollout_forward_batch_size) {
        let packed = pack(chunk, ctx.pad, device)?;
        let (lp, v, _) = response_outputs(
            &ctx.sampler,
            Some((ctx.head, false)),
            &packed,
            a.temperature,
        )?;
        let (ref_lp, _, _) = response_outputs(ctx.reference, None, &packed, a.temperature)?;
        let lens = || chunk.iter().map(|(_, r)| r.len());
        logprobs.extend(rows_of(&lp.to_vec1()?, packed.width, lens()));
        ref_logprobs.extend(rows_of(&ref_lp.to_vec1()?, packed.width, lens()));
        let v = v.map(|v| v.to_vec1()).transpose()?.unwrap_or_default();
        values.extend(rows_of(&v, packed.width, lens()));
    }

    let n = prompts.len() as f64;
    let mut stats = RolloutStats {
        kl: 0.0,
        entropy: 0.0,
        non_score: 0.0,
        scores: scores.iter().map(|s| f64::from(*s)).sum::<f64>() / n,
        eos: responses
            .iter()
            .filter(|r| r.last().is_some_and(|t| ctx.eos.contains(t)))
            .count() as f64,
        tokens: seqs.iter().map(|(p, r)| (p.len() + r.len()) as u64).sum(),
    };
    let mut rewards = Vec::with_capacity(prompts.len());
    for i in 0..prompts.len() {
        let kl: Vec<f32> = logprobs[i]
            .iter()
            .zip(&ref_logprobs[i])
            .map(|(lp, rlp)| kl_estimate(*lp, *rlp, ctx.estimator))
            .collect();
        let kl_sum: f64 = kl.iter().map(|k| f64::from(*k)).sum();
        stats.kl += kl_sum / n;
        stats.non_score += -a.kl_coef * kl_sum / n;
        stats.entropy += -logprobs[i].iter().map(|l| f64::from(*l)).sum::<f64>() / n;
        rewards.push(token_rewards(&kl, scores[i], a.kl_coef));
    }
    if a.whiten_rewards {
        rewards = whiten_ragged(&rewards, false);
    }
    let mut advantages = Vec::with_capacity(prompts.len());
    let mut returns = Vec::with_capacity(prompts.len());
    for (r, v) in rewards.iter().zip(&values) {
        let (adv, ret) = gae(r, v, a.gamma, a.lam);
        advantages.push(adv);
        returns.push(ret);
    }
    let advantages = whiten_ragged(&advantages, true);
    let experiences = prompts
        .iter()
        .zip(responses)
        .zip(logprobs)
        .zip(values)
        .zip(advantages)
        .zip(returns)
        .map(
            |(((((p, response_ids), logprobs), values), advantages), returns)| Experience {
                prompt_ids: p.ids.clone(),
                response_ids,
                logprobs,
                values,
                advantages,
                returns,
            },
        )
        .collect();
    Ok((experiences, stats))
}

// ---------------------------------------------------------------------------------------------
// Optimization.

/// Sums over the tokens of a step, for its metrics.
#[derive(Debug, Default)]
struct StepSums {
    tokens: f64,
    pg_clipped: f64,
    vf_clipped: f64,
    approxkl: f64,
    entropy: f64,
    ratio: f64,
    ratio_sq: f64,
    pg_loss: f64,
    vf_loss: f64,
    loss: f64,
    grad_norm: f64,
    steps: u64,
}

/// The PPO epochs over one batch of experiences.
fn optimize(
    ctx: &Ctx,
    batch: &[Experience],
    (params, opt): (&[NamedVar], &mut Optimizer),
    (step, max_grad_norm, micro, check_graph): (u64, f64, usize, bool),
) -> Result<StepSums> {
    let a = ctx.args;
    let device = ctx.policy.device();
    let mini = batch.len().div_ceil(a.num_mini_batches).max(1);
    let mut sums = StepSums::default();
    let mut check_graph = check_graph;
    for epoch in 0..a.num_ppo_epochs {
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(
            ctx.seed ^ step.wrapping_mul(0x5851_F42D),
            epoch as u64,
        )));
        for mb in order.chunks(mini) {
            let mb_tokens: usize = mb.iter().map(|&i| batch[i].response_ids.len()).sum();
            let mut acc = GradAccumulator::new();
            for micro_idx in mb.chunks(micro.max(1)) {
                let exps: Vec<&Experience> = micro_idx.iter().map(|&i| &batch[i]).collect();
                let seqs: Vec<(&[u32], &[u32])> = exps
                    .iter()
                    .map(|e| (e.prompt_ids.as_slice(), e.response_ids.as_slice()))
                    .collect();
                let packed = pack(&seqs, ctx.pad, device)?;
                let w = packed.width;
                let col = |f: fn(&Experience) -> &Vec<f32>| -> Result<Tensor> {
                    let mut flat = Vec::with_capacity(exps.len() * w);
                    for e in &exps {
                        let mut r = f(e).clone();
                        r.resize(w, 0.0);
                        flat.extend(r);
                    }
                    Ok(Tensor::from_vec(flat, exps.len() * w, device)?)
                };
                let old_lp = col(|e| &e.logprobs)?;
                let old_v = col(|e| &e.values)?;
                let adv = col(|e| &e.advantages)?;
                let ret = col(|e| &e.returns)?;
                let mask = Tensor::new(packed.mask.as_slice(), device)?;
                let (new_lp, vpred, logits) =
                    response_outputs(ctx.policy, Some((ctx.head, true)), &packed, a.temperature)?;
                let vpred = vpred.ok_or_else(|| {
                    Error::InvalidInput("PPO: the value head returned no values".into())
                })?;
                let norm = mb_tokens as f64;
                let (pg, pg_clipped) =
                    clipped_policy_loss(&new_lp, &old_lp, &adv, &mask, a.cliprange, norm)?;
                let (vf, vf_clipped) =
                    clipped_value_loss(&vpred, &old_v, &ret, &mask, a.cliprange_value, norm)?;
                let loss = (&pg + (&vf * a.vf_coef)?)?;
                let grads = ctx.policy.backward(&loss)?;
                acc.add(params, &grads)?;

                let diff: Vec<f32> = (new_lp.detach() - &old_lp)?.to_vec1()?;
                for (d, m) in diff.iter().zip(&packed.mask) {
                    if *m > 0.0 {
                        let (d, r) = (f64::from(*d), f64::from(*d).exp());
                        sums.approxkl += 0.5 * d * d;
                        sums.ratio += r;
                        sums.ratio_sq += r * r;
                        sums.tokens += 1.0;
                    }
                }
                sums.entropy += entropy_sum(&logits, &packed.mask)?;
                sums.pg_clipped += pg_clipped;
                sums.vf_clipped += vf_clipped;
                let (pg, vf) = (
                    f64::from(pg.to_scalar::<f32>()?),
                    f64::from(vf.to_scalar::<f32>()?),
                );
                sums.pg_loss += pg;
                sums.vf_loss += vf;
                sums.loss += pg + a.vf_coef * vf;
            }
            let mut grads = acc.take(params)?;
            if check_graph {
                ensure_graph_reaches(params, &grads)?;
                check_graph = false;
            }
            // `max_grad_norm` 0 turns clipping off (TRL's PPO never clips); the norm is logged.
            sums.grad_norm += clip_grad_norm(params, &mut grads, max_grad_norm)?;
            opt.step(&grads)?;
            sums.steps += 1;
        }
    }
    Ok(sums)
}

/// Fails, naming them, when the first backward pass reached no gradient to some trainable
/// parameters (a cut graph). Unlike SFT's check, an all-zero gradient is allowed: a batch whose
/// rewards are all equal has zero advantages.
fn ensure_graph_reaches(params: &[NamedVar], grads: &GradStore) -> Result<()> {
    let cut: Vec<&str> = params
        .iter()
        .filter(|p| grads.get(p.var.as_tensor()).is_none())
        .map(|p| p.name.as_str())
        .collect();
    if cut.is_empty() {
        return Ok(());
    }
    Err(Error::InvalidInput(format!(
        "{} of {} trainable parameters received no gradient at the first step: {} — the forward pass does not reach them",
        cut.len(),
        params.len(),
        cut.iter().take(10).copied().collect::<Vec<_>>().join(", ")
    )))
}

// ---------------------------------------------------------------------------------------------
// The run.

/// Runs PPO with the reward `cfg` names (`training_args.reward` or `reward_model_path`).
/// `show_progress` draws a progress bar on stderr.
pub fn ppo(cfg: &PpoConfig, show_progress: bool) -> Result<PpoSummary> {
    cfg.validate()?;
    let reward = cfg.training_args.method.reward_spec()?.build()?;
    ppo_with_reward(cfg, reward.as_ref(), show_progress)
}

/// Runs PPO with any reward; `training_args.reward` and `reward_model_path` are not read.
pub fn ppo_with_reward(
    cfg: &PpoConfig,
    reward: &dyn RewardFn,
    show_progress: bool,
) -> Result<PpoSummary> {
    let started = Instant::now();
    cfg.validate()?;
    let t = &cfg.training_args;
    let a = &t.method;
    let out = &t.output_dir;
    if t.max_length <= a.response_length {
        return Err(Error::InvalidInput(format!(
            "training_args.max_length: {} leaves no room for a prompt before a response of up to response_length {} tokens",
            t.max_length, a.response_length
        )));
    }
    let resume_from = prepare_output_dir(
        out,
        t.resume_from_checkpoint,
        "training_args.resume_from_checkpoint",
    )?;
    let full = cfg.peft_config.is_none() && cfg.adapter_path.is_none();
    if full && out.join("model.safetensors").exists() {
        return Err(Error::InvalidInput(format!(
            "output_dir {} already holds a model.safetensors: full fine-tuning writes the model there; choose another output_dir",
            out.display()
        )));
    }

    // Data first: a bad row fails before any model loads.
    let tokenizer = Tokenizer::from_dir(kiln_core::ModelDir::resolve(&cfg.model_id)?.root())?;
    let system = reward.system_prompt();
    let read = |p: &Path| load_prompts(p, &tokenizer, system.as_deref(), reward);
    let fits = |p: &PpoPrompt| p.ids.len() + a.response_length <= t.max_length;
    let mut train = read(&cfg.dataset_path)?;
    let mut eval = match &cfg.eval_dataset_path {
        Some(p) => Some(read(p)?),
        None if cfg.eval_split > 0.0 => {
            let mut order: Vec<usize> = (0..train.len()).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(t.seed));
            let n_eval = ((train.len() as f64 * cfg.eval_split).round() as usize)
                .clamp(1, train.len().saturating_sub(1).max(1));
            let mut is_eval = vec![false; train.len()];
            for &i in &order[..n_eval] {
                is_eval[i] = true;
            }
            let (e, tr): (Vec<_>, Vec<_>) = train.into_iter().zip(is_eval).partition(|(_, e)| *e);
            train = tr.into_iter().map(|(p, _)| p).collect();
            Some(e.into_iter().map(|(p, _)| p).collect())
        }
        None => None,
    };
    let before = train.len() + eval.as_ref().map_or(0, Vec::len);
    train.retain(fits);
    if let Some(e) = &mut eval {
        e.retain(fits);
    }
    let prompts_dropped = before - train.len() - eval.as_ref().map_or(0, Vec::len);
    if train.is_empty() {
        return Err(Error::InvalidInput(format!(
            "{}: no training prompt is left ({prompts_dropped} dropped: prompt plus response_length {} exceeds max_length {})",
            cfg.dataset_path.display(),
            a.response_length,
            t.max_length
        )));
    }
    let eval_held_out = eval.as_ref().is_some_and(|e| !e.is_empty());
    let eval_prompts: &[PpoPrompt] = match &eval {
        Some(e) if !e.is_empty() => e,
        _ => &train,
    };

    let mut policy = FineTuneModel::load(cfg)?;
    disable_dropout(&mut policy.model)?;
    let (reference, _) = policy.reference(cfg)?;
    let model_cfg = policy.model.config().clone();
    let head = ValueHead::zeros(model_cfg.hidden_size, policy.model.device())?;
    let mut params: Vec<NamedVar> = policy.params.clone();
    params.extend(head.params());

    let mut eos = model_cfg.eos_token_ids.clone();
    eos.extend(policy.dir.generation_config()?.eos_token_ids());
    eos.extend(tokenizer.eos_token_id());
    eos.sort_unstable();
    eos.dedup();
    let pad = tokenizer
        .token_id("<pad>")
        .or(model_cfg.pad_token_id)
        .or_else(|| tokenizer.eos_token_id())
        .unwrap_or(0);

    let micro = t.per_device_train_batch_size;
    let batch_size = micro * t.gradient_accumulation_steps * a.num_mini_batches;
    let total_episodes = a
        .total_episodes
        .unwrap_or_else(|| (t.num_train_epochs * train.len() as f64).ceil() as u64);
    let max_steps = if t.max_steps > 0 {
        t.max_steps as u64
    } else {
        total_episodes.div_ceil(batch_size as u64).max(1)
    };

    let mut opt = t.optimizer(params.clone())?;
    let schedule = t.schedule(max_steps)?;
    let mut state = start_state(resume_from.as_ref(), &params, &mut opt, t.seed)?;

    let ctx = Ctx {
        policy: &policy.model,
        sampler: policy.model.detached(),
        reference: &reference,
        head: &head,
        tokenizer: &tokenizer,
        reward,
        eos,
        pad,
        args: a,
        estimator: a.kl_estimator()?,
        seed: t.seed,
    };
    let mean_reward_before = mean_reward(&ctx, eval_prompts)?;

    let mut run_log = RunLog::open(
        out,
        resume_from.is_some(),
        (state.global_step, max_steps),
        t.logging_steps,
        show_progress,
    )?;
    let mut order = EpochOrder::default();
    let train_started = Instant::now();
    let first_step = state.global_step;
    let (mut rollout_seconds, mut tokens_generated, mut optimizer_steps) = (0.0, 0u64, 0u64);
    while state.global_step < max_steps {
        let lr = schedule.lr(state.global_step);
        opt.set_lr(lr);
        let batch: Vec<&PpoPrompt> = (0..batch_size)
            .map(|_| {
                let i = order.index(train.len(), t.seed, state.data_position);
                state.data_position += 1;
                &train[i]
            })
            .collect();
        let rollout_started = Instant::now();
        let (experiences, r) = rollout(&ctx, &batch, state.global_step)?;
        rollout_seconds += rollout_started.elapsed().as_secs_f64();
        tokens_generated += experiences
            .iter()
            .map(|e| e.response_ids.len() as u64)
            .sum::<u64>();
        let s = optimize(
            &ctx,
            &experiences,
            (&params, &mut opt),
            (
                state.global_step,
                t.max_grad_norm,
                micro,
                state.global_step == first_step,
            ),
        )?;
        optimizer_steps += s.steps;
        state.global_step += 1;
        let step = state.global_step;
        let (tok, n) = (s.tokens.max(1.0), s.steps.max(1) as f64);
        let ratio_mean = s.ratio / tok;
        run_log.add_metrics([
            ("objective/kl", r.kl),
            ("objective/entropy", r.entropy),
            ("objective/non_score_reward", r.non_score),
            ("objective/rlhf_reward", r.non_score + r.scores),
            ("objective/scores", r.scores),
            ("policy/approxkl", s.approxkl / tok),
            ("policy/clipfrac", s.pg_clipped / tok),
            ("policy/entropy", s.entropy / tok),
            ("loss/policy", s.pg_loss / n),
            ("loss/value", s.vf_loss / n),
            ("val/clipfrac", s.vf_clipped / tok),
            ("val/ratio", ratio_mean),
            (
                "val/ratio_var",
                (s.ratio_sq / tok - ratio_mean * ratio_mean).max(0.0),
            ),
            ("val/num_eos_tokens", r.eos),
        ]);
        if let Some(every) = t.eval_steps
            && (step.is_multiple_of(every) || step == max_steps)
        {
            run_log.add_eval_metrics([("reward", mean_reward(&ctx, eval_prompts)?)]);
        }
        run_log.step(step, (s.loss / n, r.tokens), (lr, s.grad_norm / n), None)?;
        if step.is_multiple_of(t.save_steps) && step < max_steps {
            Checkpoint::save(out, &params, &opt, &state)?;
        }
    }
    let train_seconds = train_started.elapsed().as_secs_f64();
    let mean_reward_after = mean_reward(&ctx, eval_prompts)?;

    policy.save(out)?;
    let (records, loss_curve) = run_log.finish(out, "kiln ppo")?;
    let reward_curve = out.join("reward_curve.png");
    let reward_curve = plot_metrics(
        &records,
        &["objective/scores", "objective/rlhf_reward", "eval_reward"],
        ("kiln ppo: reward", "reward"),
        &reward_curve,
    )
    .ok()
    .map(|()| reward_curve);
    let last = |key: &str| records.iter().rev().find_map(|r| r.extra.get(key).copied());
    let steps_run = state.global_step - first_step;
    let summary = PpoSummary {
        output_dir: out.clone(),
        method: if policy.lora.is_some() {
            "lora"
        } else {
            "full"
        }
        .into(),
        reward: reward.name(),
        train_prompts: train.len(),
        eval_prompts: eval_prompts.len(),
        eval_held_out,
        prompts_dropped,
        steps: state.global_step,
        optimizer_steps,
        episodes: state.data_position,
        total_parameters: policy.model.num_parameters(),
        trainable_parameters: params.iter().map(|p| p.var.elem_count()).sum(),
        optimizer: t.optim.clone(),
        mean_reward_before,
        mean_reward_after,
        eval_temperature: a.eval_temperature,
        final_scores: last("objective/scores"),
        final_kl: last("objective/kl"),
        tokens_generated,
        wall_seconds: started.elapsed().as_secs_f64(),
        seconds_per_step: train_seconds / steps_run.max(1) as f64,
        rollout_seconds,
        loss_curve,
        reward_curve,
        saved: out.clone(),
    };
    write_results(out, &summary)?;
    Ok(summary)
}
