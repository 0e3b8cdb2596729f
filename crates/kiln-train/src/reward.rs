//! `kiln reward`: reward modelling with TRL's `RewardTrainer` semantics, from the same YAML as
//! `kiln sft` (`model_id`, `dataset_path`, `peft_config`, `training_args`), with
//! `RewardConfig`'s keys in `training_args`:
//!
//! ```yaml
//! model_id: runs/sft-merged                   # a causal LM (a fresh head) or a reward model
//! dataset_path: data/preference/train.jsonl   # {"prompt", "chosen", "rejected"[, "margin"]}
//! training_args:
//!   center_rewards_coefficient: 0.01          # optional (arXiv 2312.09244)
//!   on_invalid_pair: skip                     # or error
//! ```
//!
//! The model is a sequence classifier with one output ([`RewardModel`]: transformers'
//! `LlamaForSequenceClassification` and its Mistral/Qwen2 twins, the score read at the last
//! token that is not padding). Starting from a causal LM, the head is drawn as transformers
//! initialises it (N(0, `initializer_range`²), seeded); starting from a reward model, it is
//! kept. Each pair's chosen and rejected sequences run in one forward pass, and the loss is
//! Bradley–Terry's `-logσ(r⁺ − r⁻ − margin)` averaged over the pairs, plus
//! `center_rewards_coefficient · mean((r⁺ + r⁻)²)` when set ([`bradley_terry_loss`]).
//!
//! Full fine-tuning of decoder and head is the default. With `peft_config`, LoRA adapters train
//! on the decoder and the head trains in full (what PEFT's `task_type: SEQ_CLS` does by putting
//! `score` in `modules_to_save`); the result is saved **merged**, as a complete reward-model
//! directory that `kiln eval reward`, PPO and transformers' `AutoModelForSequenceClassification`
//! load directly. `adapter_path` is not supported: continue from a saved reward model by passing
//! it as `model_id`.
//!
//! TRL's defaults: `learning_rate` 1e-4, `max_length` 1024 (pairs whose chosen or rejected
//! sequence is longer are dropped, as `RewardTrainer` filters them). Logged metrics, as TRL
//! names them: `accuracy` (share of pairs with r⁺ > r⁻), `margin` (mean r⁺ − r⁻), `min_reward`,
//! `mean_reward`, `max_reward`, and their `eval_` twins.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use kiln_core::{Error, ModelDir, Result, Tokenizer};
use kiln_model::lora_train::attach_trainable_lora;
use kiln_model::reward::{RewardModel, SCORE_WEIGHT};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::json;

use crate::checkpoint::Checkpoint;
use crate::corpus::EpochOrder;
use crate::finetune::{FineTuneConfig, MethodArgs};
use crate::grads::GradAccumulator;
use crate::metrics::plot_metrics;
use crate::optim::NamedVar;
use crate::pref_data::{
    InvalidPairs, PairRecipe, PrefDataOptions, PreferenceDataset, PreferencePair,
    load_preference_dataset,
};
use crate::run::{RunLog, optimizer_step, prepare_output_dir, start_state, write_results};

/// `kiln reward`'s config file.
pub type RewardConfig = FineTuneConfig<RewardArgs>;

/// `RewardConfig`'s keys in `training_args`, under TRL's names and defaults, and
/// `on_invalid_pair` (kiln's): what to do with pairs that cannot teach a preference.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardArgs {
    /// Adds `coef · mean((r⁺ + r⁻)²)` to the loss, keeping rewards centred on zero
    /// (Eisenstein et al., arXiv 2312.09244; TRL recommends 0.01). Default: none.
    #[serde(default, deserialize_with = "center_coefficient")]
    pub center_rewards_coefficient: Option<f64>,
    /// `skip` (default): count invalid pairs (empty or identical completions, longer than
    /// `max_length`), list them and train on the rest; `error`: stop before training.
    #[serde(default, deserialize_with = "on_invalid_pair")]
    pub on_invalid_pair: InvalidPairs,
}

impl MethodArgs for RewardArgs {
    const KEYS: &'static [&'static str] = &["center_rewards_coefficient", "on_invalid_pair"];

    fn default_overrides() -> Vec<(&'static str, serde_json::Value)> {
        vec![("learning_rate", json!(1e-4))]
    }

    fn validate(&self) -> Result<()> {
        match self.center_rewards_coefficient {
            Some(c) if !(c.is_finite() && c >= 0.0) => Err(Error::InvalidInput(format!(
                "training_args.center_rewards_coefficient: {c} must be a finite number ≥ 0 (TRL recommends 0.01)"
            ))),
            _ => Ok(()),
        }
    }
}

fn center_coefficient<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<f64>, D::Error> {
    Option::<f64>::deserialize(d).map_err(|e| {
        serde::de::Error::custom(format!(
            "training_args.center_rewards_coefficient: expected a number or null ({e})"
        ))
    })
}

fn on_invalid_pair<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<InvalidPairs, D::Error> {
    let raw = serde_json::Value::deserialize(d)?;
    serde_json::from_value(raw.clone()).map_err(|_| {
        serde::de::Error::custom(format!(
            "training_args.on_invalid_pair: {raw} is not one of \"skip\", \"error\""
        ))
    })
}

impl RewardConfig {
    fn pref_options(&self) -> PrefDataOptions {
        let t = &self.training_args;
        PrefDataOptions {
            max_length: t.max_length,
            recipe: PairRecipe::Reward,
            on_invalid: t.method.on_invalid_pair,
        }
    }

    /// The config with PEFT's reward-model task type (`SEQ_CLS`) accepted: it is what the
    /// run does anyway (the head trains in full), so it is cleared before the shared checks,
    /// which know causal LMs only.
    fn normalized(&self) -> Self {
        let mut cfg = self.clone();
        if let Some(p) = &mut cfg.peft_config
            && p.task_type.as_deref() == Some("SEQ_CLS")
        {
            p.task_type = None;
        }
        cfg
    }

    /// [`FineTuneConfig::validate`] for a reward run: also accepts `peft_config.task_type:
    /// SEQ_CLS` and refuses `adapter_path`. Checks everything that can be checked before the
    /// model and data are read; [`reward`] calls it first.
    pub fn validate_for_reward(&self) -> Result<()> {
        let cfg = self.normalized();
        if cfg.adapter_path.is_some() {
            return Err(Error::InvalidInput(
                "adapter_path: not supported by kiln reward, which saves merged reward models; \
                 to continue training one, pass its directory as model_id"
                    .into(),
            ));
        }
        if let Some(t) = cfg
            .peft_config
            .as_ref()
            .and_then(|p| p.task_type.as_deref())
        {
            return Err(Error::InvalidInput(format!(
                "peft_config.task_type: `{t}` is not a reward-model task (use SEQ_CLS or leave it out)"
            )));
        }
        FineTuneConfig::validate(&cfg)
    }
}

/// The Bradley–Terry loss of a batch of pairs: `mean(-logσ(r⁺ − r⁻ − margin))`, plus
/// `coef · mean((r⁺ + r⁻)²)` with a `center_rewards_coefficient`, exactly TRL's
/// `RewardTrainer.compute_loss`. `chosen`, `rejected` and `margin` are `[B]`; the result is a
/// scalar, differentiable.
pub fn bradley_terry_loss(
    chosen: &Tensor,
    rejected: &Tensor,
    margin: Option<&Tensor>,
    center_rewards_coefficient: Option<f64>,
) -> Result<Tensor> {
    let mut diff = (chosen - rejected)?;
    if let Some(m) = margin {
        diff = (diff - m)?;
    }
    // -logσ(x) = softplus(-x) = max(-x, 0) + log(1 + e^{-|x|}), stable for any x.
    let nll = (diff.neg()?.relu()? + (diff.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    let mut loss = nll.mean_all()?;
    if let Some(coef) = center_rewards_coefficient {
        let center = (chosen + rejected)?.sqr()?.mean_all()?;
        loss = (loss + (center * coef)?)?;
    }
    Ok(loss)
}

/// Metrics of scored pairs, under TRL's names.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PairMetrics {
    /// Share of pairs with r⁺ > r⁻ (a tie counts as wrong).
    pub accuracy: f64,
    /// Mean r⁺ − r⁻.
    pub margin: f64,
    /// Over every chosen and rejected reward.
    pub min_reward: f64,
    pub mean_reward: f64,
    pub max_reward: f64,
}

impl PairMetrics {
    /// The metrics of `chosen[i]` versus `rejected[i]`; `None` without pairs.
    pub fn of(chosen: &[f32], rejected: &[f32]) -> Option<Self> {
        let n = chosen.len().min(rejected.len());
        if n == 0 {
            return None;
        }
        let pairs = chosen.iter().zip(rejected).take(n);
        let correct = pairs.clone().filter(|(c, r)| c > r).count();
        let margin = pairs.map(|(c, r)| f64::from(c - r)).sum::<f64>() / n as f64;
        let all = chosen[..n]
            .iter()
            .chain(&rejected[..n])
            .map(|&x| f64::from(x));
        Some(Self {
            accuracy: correct as f64 / n as f64,
            margin,
            min_reward: all.clone().fold(f64::INFINITY, f64::min),
            mean_reward: all.clone().sum::<f64>() / (2 * n) as f64,
            max_reward: all.fold(f64::NEG_INFINITY, f64::max),
        })
    }

    /// `(name, value)` for the run log.
    pub fn named(&self) -> [(&'static str, f64); 5] {
        [
            ("accuracy", self.accuracy),
            ("margin", self.margin),
            ("min_reward", self.min_reward),
            ("mean_reward", self.mean_reward),
            ("max_reward", self.max_reward),
        ]
    }
}

/// Held-out results: the loss over every pair and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RewardEval {
    pub pairs: usize,
    pub loss: f64,
    #[serde(flatten)]
    pub metrics: PairMetrics,
}

/// The chosen and rejected scores of `pairs`, `batch` pairs per forward pass, on a detached
/// view of `model`.
pub fn score_pairs(
    model: &RewardModel,
    pairs: &[PreferencePair],
    batch: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (mut chosen, mut rejected) = (Vec::new(), Vec::new());
    for chunk in pairs.chunks(batch.max(1)) {
        let scores = model.score_rows(&pair_rows(chunk))?;
        let (c, r) = scores.split_at(chunk.len());
        chosen.extend_from_slice(c);
        rejected.extend_from_slice(r);
    }
    Ok((chosen, rejected))
}

/// Loss and metrics over every pair of `pairs` (not a mean of per-batch means).
pub fn evaluate(
    model: &RewardModel,
    pairs: &[PreferencePair],
    batch: usize,
    center_rewards_coefficient: Option<f64>,
) -> Result<Option<RewardEval>> {
    let (chosen, rejected) = score_pairs(model, pairs, batch)?;
    let Some(metrics) = PairMetrics::of(&chosen, &rejected) else {
        return Ok(None);
    };
    let device = Device::Cpu;
    let margin = margins(pairs, &device)?;
    let loss = bradley_terry_loss(
        &Tensor::new(chosen.as_slice(), &device)?,
        &Tensor::new(rejected.as_slice(), &device)?,
        margin.as_ref(),
        center_rewards_coefficient,
    )?;
    Ok(Some(RewardEval {
        pairs: chosen.len(),
        loss: f64::from(loss.to_scalar::<f32>()?),
        metrics,
    }))
}

/// Held-out preference accuracy: the share of `pairs` whose chosen sequence scores above the
/// rejected one (0 without pairs).
pub fn preference_accuracy(
    model: &RewardModel,
    pairs: &[PreferencePair],
    batch: usize,
) -> Result<f64> {
    Ok(evaluate(model, pairs, batch, None)?.map_or(0.0, |e| e.metrics.accuracy))
}

/// The rows of a batch of pairs: every chosen sequence, then every rejected one.
fn pair_rows<'a>(pairs: impl IntoIterator<Item = &'a PreferencePair> + Clone) -> Vec<Vec<u32>> {
    let chosen = pairs
        .clone()
        .into_iter()
        .map(PreferencePair::chosen_sequence);
    let rejected = pairs.into_iter().map(PreferencePair::rejected_sequence);
    chosen.chain(rejected).collect()
}

/// The pairs' `margin` column as `[B]` (0 where a row has none), or `None` when no row has one.
fn margins<'a>(
    pairs: impl IntoIterator<Item = &'a PreferencePair> + Clone,
    device: &Device,
) -> Result<Option<Tensor>> {
    if !pairs.clone().into_iter().any(|p| p.margin.is_some()) {
        return Ok(None);
    }
    let m: Vec<f32> = pairs
        .into_iter()
        .map(|p| p.margin.unwrap_or(0.0) as f32)
        .collect();
    Ok(Some(Tensor::new(m.as_slice(), device)?))
}

/// What a finished run reports (also written to `train_results.json`).
#[derive(Debug, Clone, Serialize)]
pub struct RewardSummary {
    pub output_dir: PathBuf,
    /// `"lora"` (saved merged) or `"full"`.
    pub method: String,
    /// `"standard"` (text) or `"conversational"`.
    pub dataset_format: String,
    /// Whether the score head was drawn fresh (the model was a causal LM) or loaded.
    pub head_initialized: bool,
    pub pad_token_id: Option<u32>,
    pub train_pairs: usize,
    pub eval_pairs: usize,
    /// Invalid pairs left out (empty, identical, too long).
    pub skipped_pairs: usize,
    pub steps: u64,
    pub epochs: f64,
    pub total_parameters: usize,
    pub trainable_parameters: usize,
    pub optimizer: String,
    pub tokens_trained: u64,
    pub final_loss: Option<f64>,
    /// Training accuracy and margin of the last logged window.
    pub accuracy: Option<f64>,
    pub margin: Option<f64>,
    /// Held-out results before the first step and at the end.
    pub eval_accuracy_before: Option<f64>,
    pub eval_loss: Option<f64>,
    pub eval_accuracy: Option<f64>,
    pub eval_margin: Option<f64>,
    pub wall_seconds: f64,
    pub seconds_per_step: f64,
    pub loss_curve: Option<PathBuf>,
    /// `accuracy.png`: training and held-out preference accuracy.
    pub accuracy_curve: Option<PathBuf>,
    /// The reward-model directory written.
    pub saved: PathBuf,
}

/// The reward model being trained and its trainable parameters.
struct Trainee {
    model: RewardModel,
    params: Vec<NamedVar>,
    lora: bool,
    head_initialized: bool,
}

/// Loads `cfg.model_id` in f32 with what `cfg` trains as variables: everything (full), or the
/// head, any `modules_to_save` and fresh adapters (LoRA).
fn load_trainee(cfg: &RewardConfig, dir: &ModelDir, pad_token_id: Option<u32>) -> Result<Trainee> {
    let seed = cfg.training_args.seed;
    let (model, head_initialized) =
        RewardModel::load_or_init(dir.root(), DType::F32, &Device::Cpu, seed)?;
    let mut model = model.with_pad_token_id(pad_token_id);
    let lora = match &cfg.peft_config {
        Some(p) => Some(p.to_lora_config(&cfg.model_id)?),
        None => None,
    };
    let Some(lora) = lora else {
        let params = model
            .make_trainable(|_| true)?
            .into_iter()
            .map(|(name, var)| NamedVar::new(name, var))
            .collect();
        return Ok(Trainee {
            model,
            params,
            lora: false,
            head_initialized,
        });
    };
    let names: Vec<String> = model
        .backbone()
        .state_dict()?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for entry in &lora.modules_to_save {
        let module_of = |n: &str| {
            n.strip_suffix(".weight")
                .or_else(|| n.strip_suffix(".bias"))
                .unwrap_or(n)
                .to_string()
        };
        if entry != "score" && !names.iter().any(|n| module_of(n).ends_with(entry.as_str())) {
            return Err(Error::InvalidInput(format!(
                "peft_config.modules_to_save: `{entry}` is not a module of the reward model (the head `score` always trains in full)"
            )));
        }
    }
    let saves = |name: &str| {
        let module = name
            .strip_suffix(".weight")
            .or_else(|| name.strip_suffix(".bias"))
            .unwrap_or(name);
        name == SCORE_WEIGHT || lora.saves_module(module)
    };
    let mut params: Vec<NamedVar> = model
        .make_trainable(saves)?
        .into_iter()
        .map(|(name, var)| NamedVar::new(format!("base_model.model.{name}"), var))
        .collect();
    let adapters = attach_trainable_lora(model.backbone_mut(), &lora, seed)?;
    params.extend(adapters.into_iter().map(|v| NamedVar {
        name: v.name,
        var: v.var,
        decay: true,
    }));
    params.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Trainee {
        model,
        params,
        lora: true,
        head_initialized,
    })
}

/// The pad id the scores are read by, as TRL's `RewardTrainer` picks it: the tokenizer's
/// `pad_token`, else its EOS, else the config's `pad_token_id`.
fn pad_token_id(tokenizer: &Tokenizer, config_pad: Option<u32>) -> Option<u32> {
    tokenizer
        .special_token("pad_token")
        .and_then(|t| tokenizer.token_id(t))
        .or_else(|| tokenizer.eos_token_id())
        .or(config_pad)
}

/// Prints the first few skipped pairs, with row and reason, and a count.
fn report_skipped(d: &PreferenceDataset) {
    const SHOWN: usize = 5;
    if let Some(line) = d.skipped_summary() {
        eprintln!("warning: {line}");
        for s in d.skipped.iter().skip(1).take(SHOWN - 1) {
            eprintln!("  {}: {}", s.row, s.reason);
        }
        if d.skipped.len() > SHOWN {
            eprintln!("  … and {} more", d.skipped.len() - SHOWN);
        }
    }
}

/// Trains a reward model. `show_progress` draws a progress bar on stderr.
pub fn reward(cfg: &RewardConfig, show_progress: bool) -> Result<RewardSummary> {
    let started = Instant::now();
    cfg.validate_for_reward()?;
    let cfg = &cfg.normalized();
    let t = &cfg.training_args;
    let center = t.method.center_rewards_coefficient;
    let out = &t.output_dir;
    let resume_from = prepare_output_dir(
        out,
        t.resume_from_checkpoint,
        "training_args.resume_from_checkpoint",
    )?;
    if out.join("model.safetensors").exists() {
        return Err(Error::InvalidInput(format!(
            "output_dir {} already holds a model.safetensors: the reward model is written there; choose another output_dir",
            out.display()
        )));
    }
    let dir = ModelDir::resolve(&cfg.model_id)?;
    let tokenizer = Tokenizer::from_dir(dir.root())?;
    let pad = pad_token_id(&tokenizer, dir.config()?.pad_token_id);

    // The whole dataset is read, tokenized and checked before the model is.
    let opts = cfg.pref_options();
    let data = load_preference_dataset(&cfg.dataset_path, &tokenizer, &opts)?;
    let (train, eval): (PreferenceDataset, Option<PreferenceDataset>) = match &cfg.eval_dataset_path
    {
        Some(p) => (data, Some(load_preference_dataset(p, &tokenizer, &opts)?)),
        None if cfg.eval_split > 0.0 => {
            let (train, eval) = data.split(cfg.eval_split, t.seed);
            (train, Some(eval))
        }
        None => (data, None),
    };
    let mut skipped = train.skipped.len();
    report_skipped(&train);
    if let Some(e) = &eval
        && cfg.eval_dataset_path.is_some()
    {
        skipped += e.skipped.len();
        report_skipped(e);
    }
    if train.pairs.is_empty() {
        return Err(Error::InvalidInput(format!(
            "{}: no training pair is left after holding out eval_split {}",
            cfg.dataset_path.display(),
            cfg.eval_split
        )));
    }
    let eval_pairs: &[PreferencePair] = eval.as_ref().map_or(&[], |e| &e.pairs);

    let micro = t.per_device_train_batch_size;
    let accumulation = t.gradient_accumulation_steps;
    let max_steps = t.total_steps(train.pairs.len());

    let mut trainee = load_trainee(cfg, &dir, pad)?;
    let params = &trainee.params;
    let mut opt = t.optimizer(params.clone())?;
    let schedule = t.schedule(max_steps)?;
    let mut state = start_state(resume_from.as_ref(), params, &mut opt, t.seed)?;

    let model = &trainee.model;
    let eval_batch = t.per_device_eval_batch_size.unwrap_or(micro);
    let eval_before = evaluate(model, eval_pairs, eval_batch, center)?;
    let mut run_log = RunLog::open(
        out,
        resume_from.is_some(),
        (state.global_step, max_steps),
        t.logging_steps,
        show_progress,
    )?;
    let mut order = EpochOrder::default();
    let eval_steps = t.eval_steps.unwrap_or(t.logging_steps);
    let mut tokens_trained = 0u64;
    let mut last_eval = None;
    let train_started = Instant::now();
    let first_step = state.global_step;

    while state.global_step < max_steps {
        let lr = schedule.lr(state.global_step);
        opt.set_lr(lr);
        let mut acc = GradAccumulator::new();
        let mut step_loss = 0.0;
        let mut step_tokens = 0u64;
        for _ in 0..accumulation {
            let batch: Vec<&PreferencePair> = (0..micro)
                .map(|_| {
                    let i = order.index(train.pairs.len(), t.seed, state.data_position);
                    state.data_position += 1;
                    &train.pairs[i]
                })
                .collect();
            let rows = pair_rows(batch.iter().copied());
            step_tokens += rows.iter().map(|r| r.len() as u64).sum::<u64>();
            let scores = model.scores(&rows)?;
            let (chosen, rejected) = (scores.narrow(0, 0, micro)?, scores.narrow(0, micro, micro)?);
            let margin = margins(batch.iter().copied(), model.device())?;
            // A mean over the micro-batch's pairs; the window's micro-batches average.
            let loss = (bradley_terry_loss(&chosen, &rejected, margin.as_ref(), center)?
                / accumulation as f64)?;
            step_loss += f64::from(loss.to_scalar::<f32>()?);
            acc.add(params, &model.backward(&loss)?)?;
            let (c, r): (Vec<f32>, Vec<f32>) = (chosen.to_vec1()?, rejected.to_vec1()?);
            if let Some(m) = PairMetrics::of(&c, &r) {
                run_log.add_metrics(m.named());
            }
        }
        let grads = acc.take(params)?;
        let first = state.global_step == first_step;
        let grad_norm = optimizer_step(params, grads, &mut opt, t.max_grad_norm, first)?;
        state.global_step += 1;
        tokens_trained += step_tokens;

        let step = state.global_step;
        let eval_now = step.is_multiple_of(eval_steps) || step == max_steps;
        let mut eval_loss = None;
        if eval_now && let Some(e) = evaluate(model, eval_pairs, eval_batch, center)? {
            eval_loss = Some(e.loss);
            run_log.add_eval_metrics(e.metrics.named());
            last_eval = Some(e);
        }
        run_log.step(step, (step_loss, step_tokens), (lr, grad_norm), eval_loss)?;
        if step.is_multiple_of(t.save_steps) && step < max_steps {
            Checkpoint::save(out, params, &opt, &state)?;
        }
    }
    let train_seconds = train_started.elapsed().as_secs_f64();

    if trainee.lora {
        trainee.model.merge_lora()?;
    }
    trainee.model.save(dir.root(), out)?;
    let (records, loss_curve) = run_log.finish(out, "kiln reward")?;
    let accuracy_curve = out.join("accuracy.png");
    let accuracy_curve = plot_metrics(
        &records,
        &["accuracy", "eval_accuracy"],
        ("kiln reward: preference accuracy", "accuracy"),
        &accuracy_curve,
    )
    .ok()
    .map(|()| accuracy_curve);
    let last_train = records.iter().rev().find(|r| r.loss.is_some());
    let steps_run = state.global_step - first_step;
    let summary = RewardSummary {
        output_dir: out.clone(),
        method: if trainee.lora { "lora" } else { "full" }.into(),
        dataset_format: if train.conversational {
            "conversational"
        } else {
            "standard"
        }
        .into(),
        head_initialized: trainee.head_initialized,
        pad_token_id: pad,
        train_pairs: train.pairs.len(),
        eval_pairs: eval_pairs.len(),
        skipped_pairs: skipped,
        steps: state.global_step,
        epochs: state.data_position as f64 / train.pairs.len() as f64,
        total_parameters: trainee.model.num_parameters(),
        trainable_parameters: trainee.params.iter().map(|p| p.var.elem_count()).sum(),
        optimizer: t.optim.clone(),
        tokens_trained,
        final_loss: last_train.and_then(|r| r.loss),
        accuracy: last_train.and_then(|r| r.extra.get("accuracy").copied()),
        margin: last_train.and_then(|r| r.extra.get("margin").copied()),
        eval_accuracy_before: eval_before.map(|e| e.metrics.accuracy),
        eval_loss: last_eval.map(|e| e.loss),
        eval_accuracy: last_eval.map(|e| e.metrics.accuracy),
        eval_margin: last_eval.map(|e| e.metrics.margin),
        wall_seconds: started.elapsed().as_secs_f64(),
        seconds_per_step: train_seconds / steps_run.max(1) as f64,
        loss_curve,
        accuracy_curve,
        saved: out.clone(),
    };
    write_results(out, &summary)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trl_defaults_and_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("reward.yaml");
        std::fs::write(
            &path,
            "model_id: m\ndataset_path: d.jsonl\ntraining_args:\n  center_rewards_coefficient: 0.01\n",
        )
        .expect("write");
        let cfg = RewardConfig::load(&path, &[]).expect("parses");
        cfg.validate_for_reward().expect("valid");
        let t = &cfg.training_args;
        assert_eq!(t.learning_rate, 1e-4);
        assert_eq!(t.max_length, 1024);
        assert_eq!(t.method.center_rewards_coefficient, Some(0.01));
        assert_eq!(t.method.on_invalid_pair, InvalidPairs::Skip);
        let cfg = RewardConfig::load(&path, &["training_args.on_invalid_pair=error".into()])
            .expect("parses");
        assert_eq!(
            cfg.training_args.method.on_invalid_pair,
            InvalidPairs::Error
        );
    }

    #[test]
    fn metrics_follow_trl() {
        let m = PairMetrics::of(&[1.0, 0.5, 2.0], &[0.0, 0.5, 3.0]).expect("pairs");
        assert!((m.accuracy - 1.0 / 3.0).abs() < 1e-12, "a tie is not a win");
        assert!((m.margin - 0.0).abs() < 1e-12);
        assert_eq!((m.min_reward, m.max_reward), (0.0, 3.0));
        assert!((m.mean_reward - 7.0 / 6.0).abs() < 1e-12);
        assert!(PairMetrics::of(&[], &[]).is_none());
    }
}
