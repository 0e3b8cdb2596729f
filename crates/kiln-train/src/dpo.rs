//! `kiln dpo`: direct preference optimization with TRL's `DPOTrainer` semantics, from the same
//! YAML as `kiln sft` (`model_id`, `dataset_path`, `peft_config`, `training_args`), with
//! `DPOConfig`'s keys in `training_args`:
//!
//! ```yaml
//! model_id: runs/sft-merged
//! dataset_path: data/preference/train.jsonl   # {"prompt", "chosen", "rejected"}
//! peft_config: {r: 16, lora_alpha: 32, target_modules: all-linear}
//! training_args:
//!   beta: 0.1
//!   loss_type: sigmoid          # ipo, hinge, robust, simpo
//!   precompute_ref_log_probs: true
//! ```
//!
//! A sequence's log-probability is the sum of its completion tokens' log-probs (the prompt is
//! masked), computed on `[chosen; rejected]` in one forward pass, as TRL does. The reference is
//! the same base with the adapter removed in a LoRA run (no second copy of the weights), a frozen
//! copy in full fine-tuning, reference log-probs precomputed once and cached on disk
//! (`precompute_ref_log_probs`), or nothing for the reference-free `simpo`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use kiln_core::{Error, Result};
use kiln_model::CausalLm;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::checkpoint::Checkpoint;
use crate::corpus::EpochOrder;
use crate::finetune::{FineTuneConfig, FineTuneModel, MethodArgs};
use crate::grads::GradAccumulator;
use crate::metrics::plot_metrics;
use crate::pref_data::{
    InvalidPairs, PairRecipe, PrefDataOptions, PreferenceDataset, PreferencePair,
    load_preference_dataset,
};
use crate::run::{RunLog, io_err, optimizer_step, start_state, write_results};
use crate::sft_data::{SftExample, make_batch};

/// `kiln dpo`'s config file.
pub type DpoConfig = FineTuneConfig<DpoArgs>;

defaults! {
    d_beta: f64 = 0.1;
    d_loss_type: LossTypes = LossTypes(vec![LossType::Sigmoid]);
    d_simpo_gamma: f64 = 0.5;
    d_truncation: Truncation = Truncation::KeepStart;
}

/// The DPO loss, by TRL's `loss_type` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossType {
    /// `-logσ(βΔ)`: the DPO paper's loss.
    Sigmoid,
    /// `relu(1 - βΔ)` (RSO / SLiC).
    Hinge,
    /// `((Δc/|c| - Δr/|r|) - 1/(2β))²`, the log-ratios divided by completion length.
    Ipo,
    /// `[-(1-ε)logσ(βΔ) + ε·logσ(-βΔ)] / (1-2ε)`, `ε = label_smoothing`.
    Robust,
    /// Reference-free: `-logσ(β(log πc/|c| - log πr/|r|) - γ)`, `γ = simpo_gamma`.
    Simpo,
}

/// One loss type or a list of them (combined with `loss_weights`), as `DPOConfig` takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct LossTypes(pub Vec<LossType>);

impl<'de> Deserialize<'de> for LossTypes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let names = match OneOrMany::deserialize(d)? {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        };
        names
            .iter()
            .map(|name| {
                serde_json::from_value(Value::String(name.clone())).map_err(|_| {
                    serde::de::Error::custom(format!(
                        "loss_type `{name}` is not supported (kiln implements sigmoid, ipo, hinge, robust and simpo)"
                    ))
                })
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(LossTypes)
    }
}

/// `truncation_mode`: which end of a too-long sequence is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    KeepStart,
    KeepEnd,
}

/// `DPOConfig`'s keys in `training_args`, under TRL's names and defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoArgs {
    #[serde(default = "d_beta")]
    pub beta: f64,
    #[serde(default = "d_loss_type")]
    pub loss_type: LossTypes,
    /// One weight per `loss_type` (default: 1 each).
    #[serde(default)]
    pub loss_weights: Option<Vec<f64>>,
    /// ε of the `robust` loss, in [0, 0.5).
    #[serde(default)]
    pub label_smoothing: f64,
    /// SimPO's target reward margin γ.
    #[serde(default = "d_simpo_gamma")]
    pub simpo_gamma: f64,
    /// Compute the reference log-probs once before training, cache them on disk and hold no
    /// reference model while training.
    #[serde(default)]
    pub precompute_ref_log_probs: bool,
    /// Batch size of the precomputation (default: `per_device_eval_batch_size`).
    #[serde(default)]
    pub precompute_ref_batch_size: Option<usize>,
    /// Where precomputed reference log-probs are cached, keyed by model and data (kiln's own
    /// key; default `OUTPUT_DIR/ref_logps`). Point several runs at one directory to share them.
    #[serde(default)]
    pub ref_logps_cache_dir: Option<PathBuf>,
    #[serde(default = "d_truncation")]
    pub truncation_mode: Truncation,
    /// `skip` (the default) or `error`: what to do with pairs that cannot teach a preference.
    #[serde(default)]
    pub on_invalid_pair: InvalidPairs,
    /// TRL's default: dropout off in policy and reference, so the two agree at step 0.
    #[serde(default = "d_true")]
    pub disable_dropout: bool,
}

fn d_true() -> bool {
    true
}

impl MethodArgs for DpoArgs {
    const KEYS: &'static [&'static str] = &[
        "beta",
        "loss_type",
        "loss_weights",
        "label_smoothing",
        "simpo_gamma",
        "precompute_ref_log_probs",
        "precompute_ref_batch_size",
        "ref_logps_cache_dir",
        "truncation_mode",
        "on_invalid_pair",
        "disable_dropout",
    ];

    fn default_overrides() -> Vec<(&'static str, Value)> {
        vec![("learning_rate", json!(1e-6))]
    }

    fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| {
            Err(Error::InvalidInput(format!("training_args.{key}: {msg}")))
        };
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return bad("beta", format!("{} must be positive", self.beta));
        }
        if self.loss_type.0.is_empty() {
            return bad("loss_type", "names no loss".into());
        }
        if let Some(w) = &self.loss_weights
            && w.len() != self.loss_type.0.len()
        {
            return bad(
                "loss_weights",
                format!(
                    "{} weights for {} loss types; give one per loss_type",
                    w.len(),
                    self.loss_type.0.len()
                ),
            );
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return bad(
                "label_smoothing",
                format!("{} must be in [0, 0.5)", self.label_smoothing),
            );
        }
        if self.precompute_ref_batch_size == Some(0) {
            return bad("precompute_ref_batch_size", "must be at least 1".into());
        }
        Ok(())
    }
}

impl DpoArgs {
    /// Whether any loss needs reference log-probs.
    pub fn needs_reference(&self) -> bool {
        self.loss_type.0.iter().any(|l| *l != LossType::Simpo)
    }

    fn weights(&self) -> Vec<f64> {
        self.loss_weights
            .clone()
            .unwrap_or_else(|| vec![1.0; self.loss_type.0.len()])
    }
}

// ---------------------------------------------------------------------------------------------
// Log-probs

/// `[chosen; rejected]` of a batch of pairs, padded right, shifted for next-token targets.
pub struct PairBatch {
    /// `[2B, T]` inputs.
    pub input_ids: Tensor,
    /// `[2B · T]` next-token targets.
    pub targets: Tensor,
    /// `[2B, T]` 1.0 where the target is a completion token.
    pub completion_mask: Tensor,
    /// Completion tokens of each of the `2B` sequences (after truncation).
    pub lengths: Vec<usize>,
    pub pairs: usize,
}

impl PairBatch {
    /// Builds the batch as TRL's collator does: `prompt ⧺ completion` with a completion mask,
    /// each sequence cut to `max_length` (`truncation`), chosen sequences first.
    pub fn new(
        pairs: &[&PreferencePair],
        max_length: usize,
        truncation: Truncation,
        pad_id: u32,
        device: &Device,
    ) -> Result<Self> {
        let sequence = |prompt: &[u32], completion: &[u32]| {
            let mut input_ids = [prompt, completion].concat();
            let mut loss_mask: Vec<bool> =
                (0..input_ids.len()).map(|i| i >= prompt.len()).collect();
            if input_ids.len() > max_length {
                let range = match truncation {
                    Truncation::KeepStart => 0..max_length,
                    Truncation::KeepEnd => input_ids.len() - max_length..input_ids.len(),
                };
                input_ids = input_ids[range.clone()].to_vec();
                loss_mask = loss_mask[range].to_vec();
            }
            // The first token is never a target (nothing precedes it).
            if let Some(first) = loss_mask.first_mut() {
                *first = false;
            }
            SftExample {
                input_ids,
                loss_mask,
            }
        };
        let examples: Vec<SftExample> = pairs
            .iter()
            .map(|p| sequence(&p.prompt_ids, &p.chosen_ids))
            .chain(
                pairs
                    .iter()
                    .map(|p| sequence(&p.prompt_ids, &p.rejected_ids)),
            )
            .collect();
        let refs: Vec<&SftExample> = examples.iter().collect();
        let batch = make_batch(&refs, pad_id);
        let rows = examples.len();
        let t = batch.seq_len;
        if t == 0 {
            return Err(Error::InvalidInput(
                "a preference batch has no sequence longer than one token".into(),
            ));
        }
        Ok(Self {
            input_ids: Tensor::new(batch.input_ids, device)?,
            targets: Tensor::new(batch.targets.as_slice(), device)?,
            completion_mask: Tensor::from_vec(batch.weights, (rows, t), device)?,
            lengths: examples.iter().map(SftExample::trained_tokens).collect(),
            pairs: pairs.len(),
        })
    }
}

/// Summed completion log-probs of every sequence of `batch`, `[2B]` (chosen, then rejected),
/// differentiable when `model` trains.
pub fn sequence_logps(model: &CausalLm, batch: &PairBatch) -> Result<Tensor> {
    let nll = model.token_nll(&batch.input_ids, &batch.targets)?;
    let nll = nll.reshape(batch.completion_mask.dims())?;
    Ok((nll * &batch.completion_mask)?.sum(1)?.neg()?)
}

/// Summed completion log-probs `(chosen, rejected)` of each pair, in batches of `batch_size`.
pub fn pair_logps(
    model: &CausalLm,
    pairs: &[PreferencePair],
    batch_size: usize,
    (max_length, truncation, pad_id): (usize, Truncation, u32),
    mut progress: impl FnMut(usize),
) -> Result<Vec<(f64, f64)>> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&PreferencePair> = chunk.iter().collect();
        let batch = PairBatch::new(&refs, max_length, truncation, pad_id, model.device())?;
        let logps = sequence_logps(model, &batch)?.to_vec1::<f32>()?;
        let n = chunk.len();
        out.extend((0..n).map(|i| (f64::from(logps[i]), f64::from(logps[n + i]))));
        progress(out.len());
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Losses

/// What the losses of a batch see: the policy's summed log-probs (differentiable), the
/// reference's (constants), and the completion lengths.
pub struct LossInputs<'a> {
    /// `[B]` each.
    pub chosen: &'a Tensor,
    pub rejected: &'a Tensor,
    /// `[B]` each; zeros when there is no reference.
    pub ref_chosen: &'a Tensor,
    pub ref_rejected: &'a Tensor,
    pub chosen_len: &'a Tensor,
    pub rejected_len: &'a Tensor,
}

/// `log σ(x)`, stable for large |x|: `min(x, 0) - log(1 + e^{-|x|})`.
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((x.minimum(0.0)? - tail)?)
}

/// The per-pair loss `[B]` of `loss`, exactly as TRL 1.x codes it (see [`LossType`]).
pub fn per_pair_loss(loss: LossType, args: &DpoArgs, x: &LossInputs<'_>) -> Result<Tensor> {
    let beta = args.beta;
    let chosen_ratio = (x.chosen - x.ref_chosen)?;
    let rejected_ratio = (x.rejected - x.ref_rejected)?;
    let delta = (&chosen_ratio - &rejected_ratio)?;
    let eps = args.label_smoothing;
    Ok(match loss {
        LossType::Sigmoid => log_sigmoid(&(&delta * beta)?)?.neg()?,
        LossType::Hinge => (1.0 - (&delta * beta)?)?.relu()?,
        LossType::Ipo => {
            let d = ((chosen_ratio / x.chosen_len)? - (rejected_ratio / x.rejected_len)?)?;
            (d - 1.0 / (2.0 * beta))?.sqr()?
        }
        LossType::Robust => {
            let z = (&delta * beta)?;
            let pos = (log_sigmoid(&z)? * -(1.0 - eps))?;
            let neg = (log_sigmoid(&z.neg()?)? * eps)?;
            ((pos + neg)? / (1.0 - 2.0 * eps))?
        }
        LossType::Simpo => {
            let avg = ((x.chosen / x.chosen_len)? - (x.rejected / x.rejected_len)?)?;
            let z = ((avg * beta)? - args.simpo_gamma)?;
            let pos = (log_sigmoid(&z)? * -(1.0 - eps))?;
            let neg = (log_sigmoid(&z.neg()?)? * eps)?;
            (pos - neg)?
        }
    })
}

/// The implicit rewards TRL logs: `β·(log π − log π_ref)` summed over the completion, or for
/// SimPO (reference-free) `β·log π / |completion|`.
fn rewards(args: &DpoArgs, logps: &Tensor, ref_logps: &Tensor, len: &Tensor) -> Result<Tensor> {
    if args.needs_reference() {
        Ok(((logps - ref_logps)? * args.beta)?)
    } else {
        Ok(((logps / len)? * args.beta)?)
    }
}

/// The metrics of one batch, under TRL's names: sums over its pairs, divided by the pair count
/// when logged.
#[derive(Debug, Clone, Default)]
pub struct DpoMetrics {
    sums: BTreeMap<&'static str, f64>,
    pub pairs: usize,
}

impl DpoMetrics {
    fn add(&mut self, name: &'static str, values: &[f32]) {
        *self.sums.entry(name).or_default() += values.iter().map(|&v| f64::from(v)).sum::<f64>();
    }

    pub fn merge(&mut self, other: &DpoMetrics) {
        for (k, v) in &other.sums {
            *self.sums.entry(k).or_default() += v;
        }
        self.pairs += other.pairs;
    }

    /// Means over the pairs: `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`,
    /// `rewards/margins`, `logps/chosen`, `logps/rejected`, `loss`.
    pub fn means(&self) -> Vec<(&'static str, f64)> {
        let n = self.pairs.max(1) as f64;
        self.sums.iter().map(|(k, v)| (*k, v / n)).collect()
    }

    pub fn mean(&self, name: &str) -> Option<f64> {
        self.sums.get(name).map(|v| v / self.pairs.max(1) as f64)
    }
}

/// The loss of a batch (mean over its pairs of the weighted per-pair losses) and its metrics.
pub fn dpo_loss(
    args: &DpoArgs,
    policy: &Tensor,
    reference: Option<&Tensor>,
    lengths: &[usize],
) -> Result<(Tensor, DpoMetrics)> {
    let n = policy.dim(0)? / 2;
    let device = policy.device();
    let zeros = Tensor::zeros(2 * n, DType::F32, device)?;
    let reference = reference.unwrap_or(&zeros);
    let len: Vec<f32> = lengths.iter().map(|&l| l.max(1) as f32).collect();
    let len = Tensor::from_vec(len, 2 * n, device)?;
    let half = |t: &Tensor, i: usize| t.narrow(0, i * n, n);
    let (chosen, rejected) = (half(policy, 0)?, half(policy, 1)?);
    let (ref_chosen, ref_rejected) = (half(reference, 0)?, half(reference, 1)?);
    let (chosen_len, rejected_len) = (half(&len, 0)?, half(&len, 1)?);
    let inputs = LossInputs {
        chosen: &chosen,
        rejected: &rejected,
        ref_chosen: &ref_chosen,
        ref_rejected: &ref_rejected,
        chosen_len: &chosen_len,
        rejected_len: &rejected_len,
    };
    let mut total: Option<Tensor> = None;
    for (&loss, weight) in args.loss_type.0.iter().zip(args.weights()) {
        let l = (per_pair_loss(loss, args, &inputs)? * weight)?;
        total = Some(match total {
            Some(t) => (t + l)?,
            None => l,
        });
    }
    let per_pair = total.ok_or_else(|| Error::InvalidInput("loss_type names no loss".into()))?;

    let mut metrics = DpoMetrics {
        pairs: n,
        ..DpoMetrics::default()
    };
    let rc = rewards(args, &chosen.detach(), &ref_chosen, &chosen_len)?;
    let rr = rewards(args, &rejected.detach(), &ref_rejected, &rejected_len)?;
    let rc_v = rc.to_vec1::<f32>()?;
    let rr_v = rr.to_vec1::<f32>()?;
    let acc: Vec<f32> = rc_v
        .iter()
        .zip(&rr_v)
        .map(|(c, r)| if c > r { 1.0 } else { 0.0 })
        .collect();
    let margins: Vec<f32> = rc_v.iter().zip(&rr_v).map(|(c, r)| c - r).collect();
    metrics.add("rewards/chosen", &rc_v);
    metrics.add("rewards/rejected", &rr_v);
    metrics.add("rewards/accuracies", &acc);
    metrics.add("rewards/margins", &margins);
    metrics.add("logps/chosen", &chosen.to_vec1::<f32>()?);
    metrics.add("logps/rejected", &rejected.to_vec1::<f32>()?);
    metrics.add("loss", &per_pair.to_vec1::<f32>()?);
    Ok((per_pair.sum_all()?, metrics))
}

// ---------------------------------------------------------------------------------------------
// The reference

/// Where the reference log-probs come from.
enum Reference {
    /// A model run alongside the policy: the adapter-free base view or a frozen copy.
    Model(Box<CausalLm>),
    /// Precomputed `(chosen, rejected)` per training and evaluation pair.
    Precomputed {
        train: Vec<(f64, f64)>,
        eval: Vec<(f64, f64)>,
    },
    /// SimPO needs none.
    None,
}

/// How the run's reference is held, for the summary.
fn describe(reference: &Reference, shared: bool) -> &'static str {
    match reference {
        Reference::Model(_) if shared => "base model with the adapter removed (shared weights)",
        Reference::Model(_) => "frozen copy of the initial model",
        Reference::Precomputed { .. } => "precomputed log-probs (no reference model held)",
        Reference::None => "none (reference-free loss)",
    }
}

/// The cache key of precomputed reference log-probs: the reference model's files (path, size,
/// modification time) and every pair's tokens and truncation.
fn cache_key(
    cfg: &DpoConfig,
    policy: &FineTuneModel,
    pairs: &[&[PreferencePair]],
) -> Result<String> {
    let mut h = Sha256::new();
    let mut files = policy.dir.weight_files()?;
    files.push(policy.dir.root().join("config.json"));
    if let Some(a) = &cfg.adapter_path {
        files.push(a.join("adapter_model.safetensors"));
    }
    for f in files {
        let meta = std::fs::metadata(&f).map_err(io_err(&f))?;
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let path = std::fs::canonicalize(&f).unwrap_or(f);
        h.update(format!("{}|{}|{modified}\n", path.display(), meta.len()));
    }
    let t = &cfg.training_args;
    h.update(format!("{}|{:?}\n", t.max_length, t.method.truncation_mode));
    for set in pairs {
        for p in *set {
            for ids in [&p.prompt_ids, &p.chosen_ids, &p.rejected_ids] {
                h.update((ids.len() as u64).to_le_bytes());
                for id in ids {
                    h.update(id.to_le_bytes());
                }
            }
        }
        h.update(b"|");
    }
    Ok(h.finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[derive(Serialize, Deserialize)]
struct CachedLogps {
    key: String,
    train: Vec<(f64, f64)>,
    eval: Vec<(f64, f64)>,
}

/// Reference log-probs of the train and eval pairs: read from the cache when a file with the
/// same key is there, else computed with the reference model and written to it.
fn precomputed(
    cfg: &DpoConfig,
    policy: &FineTuneModel,
    (train, eval): (&[PreferencePair], &[PreferencePair]),
    pad_id: u32,
    show_progress: bool,
) -> Result<(Reference, PathBuf, bool)> {
    let t = &cfg.training_args;
    let key = cache_key(cfg, policy, &[train, eval])?;
    let dir = t
        .method
        .ref_logps_cache_dir
        .clone()
        .unwrap_or_else(|| t.output_dir.join("ref_logps"));
    let path = dir.join(format!("{key}.json"));
    if path.exists() {
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        if let Ok(c) = serde_json::from_str::<CachedLogps>(&text)
            && c.key == key
            && c.train.len() == train.len()
            && c.eval.len() == eval.len()
        {
            return Ok((
                Reference::Precomputed {
                    train: c.train,
                    eval: c.eval,
                },
                path,
                true,
            ));
        }
    }
    let (model, _) = policy.reference(cfg)?;
    let batch = t
        .method
        .precompute_ref_batch_size
        .or(t.per_device_eval_batch_size)
        .unwrap_or(t.per_device_train_batch_size);
    let bar = if show_progress {
        indicatif::ProgressBar::new((train.len() + eval.len()) as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_message("reference log-probs");
    let shape = (t.max_length, t.method.truncation_mode, pad_id);
    let train_logps = pair_logps(&model, train, batch, shape, |n| bar.set_position(n as u64))?;
    let eval_logps = pair_logps(&model, eval, batch, shape, |n| {
        bar.set_position((train.len() + n) as u64)
    })?;
    bar.finish_and_clear();
    drop(model);
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let cached = CachedLogps {
        key,
        train: train_logps,
        eval: eval_logps,
    };
    let json = serde_json::to_vec(&cached).map_err(|source| Error::Json {
        path: path.clone(),
        source,
    })?;
    kiln_model::save::write_atomic(&path, &json)?;
    Ok((
        Reference::Precomputed {
            train: cached.train,
            eval: cached.eval,
        },
        path,
        false,
    ))
}

// ---------------------------------------------------------------------------------------------
// Training

/// What a finished run reports (also written to `train_results.json`).
#[derive(Debug, Clone, Serialize)]
pub struct DpoSummary {
    pub output_dir: PathBuf,
    /// `"lora"` or `"full"`.
    pub method: String,
    pub loss_type: Vec<LossType>,
    pub beta: f64,
    /// How the reference is held.
    pub reference: String,
    /// Copies of the base weights the run holds for the reference: 0 when shared with the
    /// policy, precomputed or not needed; 1 for a frozen copy.
    pub reference_weight_copies: usize,
    /// The reference log-prob cache file, and whether this run found it already there.
    pub ref_logps_cache: Option<PathBuf>,
    pub ref_logps_cache_hit: bool,
    pub train_pairs: usize,
    pub eval_pairs: usize,
    /// Invalid pairs left out (empty, identical, too long).
    pub skipped_pairs: usize,
    pub steps: u64,
    pub epochs: f64,
    pub trainable_parameters: usize,
    pub total_parameters: usize,
    pub final_loss: Option<f64>,
    /// Training metrics of the last logged window, under TRL's names.
    pub train_metrics: BTreeMap<String, f64>,
    /// Held-out metrics before the first step and at the end (`rewards/accuracies`, …).
    pub eval_metrics_before: BTreeMap<String, f64>,
    pub eval_metrics: BTreeMap<String, f64>,
    /// Peak resident memory of the process (Linux), bytes.
    pub peak_rss_bytes: Option<u64>,
    pub wall_seconds: f64,
    pub seconds_per_step: f64,
    pub loss_curve: Option<PathBuf>,
    /// `rewards.png`: the implicit rewards of chosen and rejected replies and their margin.
    pub rewards_curve: Option<PathBuf>,
    pub saved: PathBuf,
}

/// The process's peak resident set (`VmHWM`), where `/proc` has it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl DpoConfig {
    fn pref_options(&self) -> PrefDataOptions {
        let t = &self.training_args;
        PrefDataOptions {
            max_length: t.max_length,
            recipe: PairRecipe::Dpo,
            on_invalid: t.method.on_invalid_pair,
        }
    }
}

/// Held-out metrics of the policy (a detached view) against the reference.
fn evaluate(
    args: &DpoArgs,
    model: &CausalLm,
    reference: &Reference,
    pairs: &[PreferencePair],
    (batch, max_length, pad_id): (usize, usize, u32),
) -> Result<DpoMetrics> {
    let mut all = DpoMetrics::default();
    for (i, chunk) in pairs.chunks(batch.max(1)).enumerate() {
        let refs: Vec<&PreferencePair> = chunk.iter().collect();
        let b = PairBatch::new(
            &refs,
            max_length,
            args.truncation_mode,
            pad_id,
            model.device(),
        )?;
        let policy = sequence_logps(model, &b)?;
        let start = i * batch.max(1);
        let indices: Vec<usize> = (start..start + chunk.len()).collect();
        let ref_logps = reference_logps(reference, &b, &indices, true)?;
        let (_, m) = dpo_loss(args, &policy, ref_logps.as_ref(), &b.lengths)?;
        all.merge(&m);
    }
    Ok(all)
}

/// The reference log-probs `[2B]` of a batch: computed, or looked up by the indices of its
/// pairs in the training (or, with `eval`, the evaluation) set.
fn reference_logps(
    reference: &Reference,
    batch: &PairBatch,
    indices: &[usize],
    eval: bool,
) -> Result<Option<Tensor>> {
    let device = batch.input_ids.device();
    match reference {
        Reference::Model(m) => Ok(Some(sequence_logps(m, batch)?.detach())),
        Reference::Precomputed { train, eval: e } => {
            let table = if eval { e } else { train };
            let picked: Vec<(f64, f64)> = indices.iter().map(|&i| table[i]).collect();
            Ok(Some(pair_tensor(&picked, device)?))
        }
        Reference::None => Ok(None),
    }
}

/// `[2B]`: the chosen values, then the rejected.
fn pair_tensor(values: &[(f64, f64)], device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = values
        .iter()
        .map(|p| p.0 as f32)
        .chain(values.iter().map(|p| p.1 as f32))
        .collect();
    Ok(Tensor::from_vec(v, 2 * values.len(), device)?)
}

/// Runs DPO. `show_progress` draws progress bars on stderr.
pub fn dpo(cfg: &DpoConfig, show_progress: bool) -> Result<DpoSummary> {
    let started = Instant::now();
    cfg.validate()?;
    let t = &cfg.training_args;
    let args = &t.method;
    let out = &t.output_dir;
    let resume_from = cfg.prepare_output_dir()?;
    let policy = FineTuneModel::load_with_dropout(cfg, !args.disable_dropout)?;
    let tokenizer = &policy.tokenizer;
    let pad_id = policy.pad_id();

    let opts = cfg.pref_options();
    let data = load_preference_dataset(&cfg.dataset_path, tokenizer, &opts)?;
    let (train, eval): (PreferenceDataset, Option<PreferenceDataset>) = match &cfg.eval_dataset_path
    {
        Some(p) => (data, Some(load_preference_dataset(p, tokenizer, &opts)?)),
        None if cfg.eval_split > 0.0 => {
            let (train, eval) = data.split(cfg.eval_split, t.seed);
            (train, Some(eval))
        }
        None => (data, None),
    };
    let mut skipped = train.skipped.len();
    if let Some(e) = &eval
        && cfg.eval_dataset_path.is_some()
    {
        skipped += e.skipped.len();
    }
    for d in std::iter::once(&train).chain(&eval) {
        if let Some(line) = d.skipped_summary() {
            eprintln!("warning: {line}");
        }
    }
    let eval_pairs: &[PreferencePair] = eval.as_ref().map_or(&[], |e| &e.pairs);

    let micro = t.per_device_train_batch_size;
    let max_steps = t.total_steps(train.pairs.len());

    // The reference: precomputed before any step, or a model beside the policy.
    let mut cache = None;
    let mut cache_hit = false;
    let mut shared = false;
    let reference = if !args.needs_reference() {
        Reference::None
    } else if args.precompute_ref_log_probs {
        let (r, path, hit) = precomputed(
            cfg,
            &policy,
            (&train.pairs, eval_pairs),
            pad_id,
            show_progress,
        )?;
        cache = Some(path);
        cache_hit = hit;
        r
    } else {
        let (m, s) = policy.reference(cfg)?;
        shared = s;
        Reference::Model(Box::new(m))
    };
    let reference_weight_copies = usize::from(matches!(reference, Reference::Model(_)) && !shared);

    let FineTuneModel {
        model,
        params,
        lora,
        ..
    } = &policy;
    let eval_model = model.detached();
    let mut opt = t.optimizer(params.clone())?;
    let schedule = t.schedule(max_steps)?;
    let mut state = start_state(resume_from.as_ref(), params, &mut opt, t.seed)?;
    let eval_batch = t.per_device_eval_batch_size.unwrap_or(micro);
    let eval_shape = (eval_batch, t.max_length, pad_id);
    let eval_before = if eval_pairs.is_empty() {
        None
    } else {
        Some(evaluate(
            args,
            &eval_model,
            &reference,
            eval_pairs,
            eval_shape,
        )?)
    };

    let mut run_log = RunLog::open(
        out,
        resume_from.is_some(),
        (state.global_step, max_steps),
        t.logging_steps,
        show_progress,
    )?;
    let mut order = EpochOrder::default();
    let eval_steps = t.eval_steps.unwrap_or(t.logging_steps);
    let train_started = Instant::now();
    let first_step = state.global_step;
    let mut last_window = DpoMetrics::default();
    let mut last_eval = eval_before.clone();

    while state.global_step < max_steps {
        let lr = schedule.lr(state.global_step);
        opt.set_lr(lr);
        let mut acc = GradAccumulator::new();
        let mut step_metrics = DpoMetrics::default();
        let mut step_tokens = 0u64;
        let window = (micro * t.gradient_accumulation_steps) as f64;
        for _ in 0..t.gradient_accumulation_steps {
            let indices: Vec<usize> = (0..micro)
                .map(|_| {
                    let i = order.index(train.pairs.len(), t.seed, state.data_position);
                    state.data_position += 1;
                    i
                })
                .collect();
            let refs: Vec<&PreferencePair> = indices.iter().map(|&i| &train.pairs[i]).collect();
            let batch = PairBatch::new(
                &refs,
                t.max_length,
                args.truncation_mode,
                pad_id,
                model.device(),
            )?;
            step_tokens += batch.input_ids.elem_count() as u64;
            let policy_logps = sequence_logps(model, &batch)?;
            let ref_logps = reference_logps(&reference, &batch, &indices, false)?;
            let (loss_sum, metrics) =
                dpo_loss(args, &policy_logps, ref_logps.as_ref(), &batch.lengths)?;
            let loss = (loss_sum / window)?;
            acc.add(params, &model.backward(&loss)?)?;
            step_metrics.merge(&metrics);
        }
        let grads = acc.take(params)?;
        let first = state.global_step == first_step;
        let grad_norm = optimizer_step(params, grads, &mut opt, t.max_grad_norm, first)?;
        state.global_step += 1;

        let step = state.global_step;
        let eval_now =
            !eval_pairs.is_empty() && (step.is_multiple_of(eval_steps) || step == max_steps);
        let mut eval_loss = None;
        if eval_now {
            let m = evaluate(args, &eval_model, &reference, eval_pairs, eval_shape)?;
            eval_loss = m.mean("loss");
            run_log.add_eval_metrics(m.means().into_iter().filter(|(k, _)| *k != "loss"));
            last_eval = Some(m);
        }
        let step_loss = step_metrics.mean("loss").unwrap_or(f64::NAN);
        run_log.add_metrics(
            step_metrics
                .means()
                .into_iter()
                .filter(|(k, _)| *k != "loss"),
        );
        last_window = step_metrics;
        run_log.step(step, (step_loss, step_tokens), (lr, grad_norm), eval_loss)?;
        if step.is_multiple_of(t.save_steps) && step < max_steps {
            Checkpoint::save(out, params, &opt, &state)?;
        }
    }
    let train_seconds = train_started.elapsed().as_secs_f64();
    policy.save(out)?;
    let (records, loss_curve) = run_log.finish(out, "kiln dpo")?;
    let rewards_curve = out.join("rewards.png");
    let rewards_curve = plot_metrics(
        &records,
        &[
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "eval_rewards/margins",
        ],
        ("kiln dpo: implicit rewards", "β·log(π/π_ref)"),
        &rewards_curve,
    )
    .ok()
    .map(|()| rewards_curve);
    let steps_run = state.global_step - first_step;
    let to_map = |m: &DpoMetrics| -> BTreeMap<String, f64> {
        m.means()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    };
    let summary = DpoSummary {
        output_dir: out.clone(),
        method: if lora.is_some() { "lora" } else { "full" }.into(),
        loss_type: args.loss_type.0.clone(),
        beta: args.beta,
        reference: describe(&reference, shared).into(),
        reference_weight_copies,
        ref_logps_cache: cache,
        ref_logps_cache_hit: cache_hit,
        train_pairs: train.pairs.len(),
        eval_pairs: eval_pairs.len(),
        skipped_pairs: skipped,
        steps: state.global_step,
        epochs: state.data_position as f64 / train.pairs.len() as f64,
        trainable_parameters: policy.trainable_parameters(),
        total_parameters: model.num_parameters(),
        final_loss: records.iter().rev().find_map(|r| r.loss),
        train_metrics: to_map(&last_window),
        eval_metrics_before: eval_before.as_ref().map(to_map).unwrap_or_default(),
        eval_metrics: last_eval.as_ref().map(to_map).unwrap_or_default(),
        peak_rss_bytes: peak_rss_bytes(),
        wall_seconds: started.elapsed().as_secs_f64(),
        seconds_per_step: train_seconds / steps_run.max(1) as f64,
        loss_curve,
        rewards_curve,
        saved: out.clone(),
    };
    write_results(out, &summary)?;
    Ok(summary)
}
