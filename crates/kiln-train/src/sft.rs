//! `kiln sft`: supervised fine-tuning of a Hugging Face model, with LoRA (PEFT-compatible
//! adapters) or in full, driven by the YAML users already write for TRL and PEFT:
//!
//! ```yaml
//! model_id: meta-llama/Llama-2-7b-hf        # a model directory, or a hub id in the local HF cache
//! dataset_path: /data/preference_pairs/     # a JSONL/Parquet file or a directory of them
//! peft_config:                              # PEFT's LoraConfig; absent: full fine-tuning
//!   r: 16
//!   lora_alpha: 32
//!   target_modules: ["q_proj", "v_proj"]
//! training_args:                            # TrainingArguments / SFTConfig names
//!   per_device_train_batch_size: 4
//!   gradient_accumulation_steps: 8
//!   max_steps: 1000
//!   optim: paged_adamw_8bit
//! ```
//!
//! The whole config and the whole dataset are validated before any training starts. The run
//! writes `metrics.jsonl`, atomic checkpoints (trainable parameters and optimizer state only),
//! a loss-curve PNG, `train_results.json`, and either a PEFT adapter directory
//! (`adapter_config.json` + `adapter_model.safetensors`) or, for full fine-tuning, a complete
//! model directory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use kiln_core::{Error, ModelDir, Result, SafetensorsWeights, Tokenizer};
use kiln_model::lora_train::{LoraVar, attach_trainable_lora, make_lora_trainable};
use kiln_model::{CausalLm, LoraAdapter, LoraConfig, TargetModules};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::checkpoint::{Checkpoint, TrainerState};
use crate::corpus::EpochOrder;
use crate::grads::{GradAccumulator, clip_grad_norm, ensure_all_have_gradients};
use crate::optim::{AdamWConfig, NamedVar};
use crate::optimizer::Optimizer;
use crate::run::{RunLog, prepare_output_dir, write_results};
use crate::schedule::{LrSchedule, ScheduleKind};
use crate::sft_data::{SftDataOptions, SftDataset, SftExample, load_sft_dataset, make_batch};

/// The `kiln sft` config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    /// A model directory, or a hub id (`ORG/NAME[@REVISION]`) in the local Hugging Face cache.
    pub model_id: String,
    /// A JSONL/Parquet file or a directory of them, in one of TRL's dataset formats.
    pub dataset_path: PathBuf,
    /// Held-out data for `eval_steps`; without it, `eval_split` of `dataset_path` is held out.
    #[serde(default)]
    pub eval_dataset_path: Option<PathBuf>,
    /// The fraction of `dataset_path` held out for evaluation when there is no
    /// `eval_dataset_path` (0: no evaluation).
    #[serde(default)]
    pub eval_split: f64,
    /// PEFT's `LoraConfig`. Absent: full fine-tuning.
    #[serde(default)]
    pub peft_config: Option<PeftConfig>,
    /// Continue training an existing PEFT adapter directory (its `adapter_config.json` takes the
    /// place of `peft_config`).
    #[serde(default)]
    pub adapter_path: Option<PathBuf>,
    #[serde(default)]
    pub training_args: TrainingArgs,
}

defaults! {
    d_r: usize = 8;
    d_alpha: f64 = 8.0;
    d_true: bool = true;
    d_bias: String = "none".to_string();
    d_batch: usize = 8;
    d_one: usize = 1;
    d_lr: f64 = 2e-5;
    d_epochs: f64 = 3.0;
    d_max_steps: i64 = -1;
    d_scheduler: String = "linear".to_string();
    d_beta1: f64 = 0.9;
    d_beta2: f64 = 0.999;
    d_eps: f64 = 1e-8;
    d_max_grad_norm: f64 = 1.0;
    d_logging_steps: u64 = 10;
    d_save_steps: u64 = 500;
    d_seed: u64 = 42;
    d_output_dir: PathBuf = PathBuf::from("trainer_output");
    d_max_length: usize = 1024;
    d_optim: String = "adamw_torch".to_string();
}

/// PEFT's `LoraConfig` fields, under PEFT's names and defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeftConfig {
    #[serde(default = "d_r")]
    pub r: usize,
    #[serde(default = "d_alpha")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    /// A list of module names, a regex, or `"all-linear"`; PEFT's default for Llama-family
    /// models is `["q_proj", "v_proj"]`.
    #[serde(default)]
    pub target_modules: Option<Value>,
    #[serde(default)]
    pub use_rslora: bool,
    /// Modules trained in full and saved beside the adapter (e.g. `["lm_head"]`).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Only `"none"` (PEFT's default): biases stay frozen.
    #[serde(default = "d_bias")]
    pub bias: String,
    /// Only `CAUSAL_LM` (or unset).
    #[serde(default)]
    pub task_type: Option<String>,
    /// Only `true` (PEFT's default): Kaiming-uniform A, zero B.
    #[serde(default = "d_true")]
    pub init_lora_weights: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub inference_mode: bool,
}

/// The `TrainingArguments` / `SFTConfig` vocabulary kiln implements, under the same names and
/// defaults, but one: `assistant_only_loss` is on by default (TRL's is off), so conversations
/// train the assistant's replies rather than the whole rendered chat. Accepted for compatibility and without effect on the CPU: `bf16`, `fp16`,
/// `gradient_checkpointing`, `report_to`, `run_name`, `dataloader_num_workers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingArgs {
    #[serde(default = "d_output_dir")]
    pub output_dir: PathBuf,
    #[serde(default = "d_batch")]
    pub per_device_train_batch_size: usize,
    #[serde(default)]
    pub per_device_eval_batch_size: Option<usize>,
    #[serde(default = "d_one")]
    pub gradient_accumulation_steps: usize,
    /// Optimizer steps; -1 (the default) trains `num_train_epochs` epochs.
    #[serde(default = "d_max_steps")]
    pub max_steps: i64,
    #[serde(default = "d_epochs")]
    pub num_train_epochs: f64,
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    #[serde(default = "d_scheduler")]
    pub lr_scheduler_type: String,
    #[serde(default)]
    pub warmup_ratio: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "d_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "d_eps")]
    pub adam_epsilon: f64,
    #[serde(default = "d_max_grad_norm")]
    pub max_grad_norm: f64,
    /// `adamw_torch`, `adamw_8bit`, `paged_adamw_8bit`, `sgd`, … (see [`Optimizer::from_name`]).
    #[serde(default = "d_optim")]
    pub optim: String,
    #[serde(default = "d_logging_steps")]
    pub logging_steps: u64,
    /// Defaults to `logging_steps`, as in transformers.
    #[serde(default)]
    pub eval_steps: Option<u64>,
    #[serde(default = "d_save_steps")]
    pub save_steps: u64,
    #[serde(default = "d_seed")]
    pub seed: u64,
    #[serde(default = "d_max_length")]
    pub max_length: usize,
    #[serde(default)]
    pub packing: bool,
    /// Loss on completions only for prompt-completion and preference data (TRL's default).
    #[serde(default = "d_true")]
    pub completion_only_loss: bool,
    /// Loss on assistant turns only for conversations.
    #[serde(default = "d_true")]
    pub assistant_only_loss: bool,
    #[serde(default)]
    pub resume_from_checkpoint: bool,
    #[serde(default)]
    pub bf16: bool,
    #[serde(default)]
    pub fp16: bool,
    #[serde(default)]
    pub gradient_checkpointing: bool,
    #[serde(default)]
    pub report_to: Option<Value>,
    #[serde(default)]
    pub run_name: Option<String>,
    #[serde(default)]
    pub dataloader_num_workers: Option<usize>,
}

impl Default for TrainingArgs {
    fn default() -> Self {
        // Every field has a serde default; an empty mapping is the default.
        serde_json::from_value(serde_json::json!({})).unwrap_or_else(|_| unreachable!())
    }
}

/// PEFT's default `target_modules` for Llama, Mistral and Qwen2.
const DEFAULT_TARGETS: [&str; 2] = ["q_proj", "v_proj"];

impl PeftConfig {
    /// The LoRA configuration this describes, checked.
    pub fn to_lora_config(&self, base_model: &str) -> Result<LoraConfig> {
        let bad =
            |key: &str, msg: &str| Err(Error::InvalidInput(format!("peft_config.{key}: {msg}")));
        if self.r == 0 {
            return bad("r", "must be at least 1");
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad("lora_dropout", "must be in [0, 1)");
        }
        if self.bias != "none" {
            return bad(
                "bias",
                "only \"none\" is supported (kiln trains no biases in a LoRA run)",
            );
        }
        if let Some(t) = self.task_type.as_deref().filter(|t| *t != "CAUSAL_LM") {
            return Err(Error::InvalidInput(format!(
                "peft_config.task_type: `{t}` is not supported (kiln fine-tunes causal language models: CAUSAL_LM)"
            )));
        }
        if !self.init_lora_weights {
            return bad(
                "init_lora_weights",
                "only true (Kaiming-uniform A, zero B) is supported",
            );
        }
        if self.use_dora {
            return bad("use_dora", "DoRA is not supported yet");
        }
        if self.fan_in_fan_out {
            return bad(
                "fan_in_fan_out",
                "true is for GPT-2 style Conv1D layers, which kiln's models do not have",
            );
        }
        if self.inference_mode {
            return bad(
                "inference_mode",
                "true freezes the adapter: nothing to train",
            );
        }
        let target_modules = match &self.target_modules {
            None => TargetModules::Names(DEFAULT_TARGETS.map(String::from).to_vec()),
            Some(Value::String(s)) if s == "all-linear" => TargetModules::AllLinear,
            Some(Value::String(s)) => TargetModules::Regex(s.clone()),
            Some(Value::Array(items)) => TargetModules::Names(
                items
                    .iter()
                    .map(|v| {
                        v.as_str().map(str::to_string).ok_or_else(|| {
                            Error::InvalidInput(format!(
                                "peft_config.target_modules: expected module names, found {v}"
                            ))
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(other) => {
                return Err(Error::InvalidInput(format!(
                    "peft_config.target_modules: expected a list of module names, a regex or \"all-linear\", found {other}"
                )));
            }
        };
        let mut config = LoraConfig::new(self.r, self.lora_alpha, target_modules);
        config.use_rslora = self.use_rslora;
        config.lora_dropout = self.lora_dropout;
        config.rank_pattern = self.rank_pattern.clone();
        config.alpha_pattern = self.alpha_pattern.clone();
        config.modules_to_save = self.modules_to_save.clone().unwrap_or_default();
        config.base_model_name_or_path = Some(base_model.to_string());
        Ok(config)
    }
}

impl SftConfig {
    /// Reads the YAML file with `--set key=value` overrides (dotted keys reach into
    /// `training_args.*` and `peft_config.*`).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        crate::yaml::load(path, overrides)
    }

    /// Checks everything that can be checked before the model and data are read.
    pub fn validate(&self) -> Result<()> {
        let t = &self.training_args;
        let bad = |key: &str, msg: String| {
            Err(Error::InvalidInput(format!("training_args.{key}: {msg}")))
        };
        crate::run::require_nonzero(
            "training_args.",
            &[
                (
                    "per_device_train_batch_size",
                    t.per_device_train_batch_size as u64,
                ),
                (
                    "gradient_accumulation_steps",
                    t.gradient_accumulation_steps as u64,
                ),
                ("logging_steps", t.logging_steps),
                ("save_steps", t.save_steps),
                ("eval_steps", t.eval_steps.unwrap_or(1)),
                ("max_length", t.max_length as u64),
            ],
        )?;
        if t.max_length < 2 {
            return bad("max_length", "must be at least 2".into());
        }
        if t.max_steps == 0 || t.max_steps < -1 {
            return bad(
                "max_steps",
                format!(
                    "{} must be positive, or -1 to train num_train_epochs",
                    t.max_steps
                ),
            );
        }
        if t.max_steps == -1 && !(t.num_train_epochs > 0.0 && t.num_train_epochs.is_finite()) {
            return bad(
                "num_train_epochs",
                format!("{} must be positive", t.num_train_epochs),
            );
        }
        if !(t.learning_rate > 0.0 && t.learning_rate.is_finite()) {
            return bad(
                "learning_rate",
                format!("{} must be positive", t.learning_rate),
            );
        }
        if !(0.0..=1.0).contains(&t.warmup_ratio) {
            return bad("warmup_ratio", "must be in [0, 1]".into());
        }
        if !(0.0..1.0).contains(&self.eval_split) {
            return Err(Error::InvalidInput("eval_split: must be in [0, 1)".into()));
        }
        t.lr_scheduler_type
            .parse::<ScheduleKind>()
            .map_err(|e| Error::InvalidInput(format!("training_args.lr_scheduler_type: {e}")))?;
        Optimizer::from_name(&t.optim, Vec::new(), AdamWConfig::default())
            .map_err(|e| Error::InvalidInput(format!("training_args.optim: {e}")))?;
        if self.peft_config.is_some() && self.adapter_path.is_some() {
            return Err(Error::InvalidInput(
                "give either peft_config (a new adapter) or adapter_path (continue an existing one), not both".into(),
            ));
        }
        if let Some(p) = &self.peft_config {
            p.to_lora_config(&self.model_id)?;
        }
        Ok(())
    }

    fn data_options(&self) -> SftDataOptions {
        let t = &self.training_args;
        SftDataOptions {
            max_length: t.max_length,
            packing: t.packing,
            completion_only_loss: t.completion_only_loss,
            assistant_only_loss: t.assistant_only_loss,
        }
    }
}

/// What a finished run reports (also written to `train_results.json`).
#[derive(Debug, Clone, Serialize)]
pub struct SftSummary {
    pub output_dir: PathBuf,
    /// `"lora"` or `"full"`.
    pub method: String,
    pub dataset_format: String,
    pub train_examples: usize,
    pub eval_examples: usize,
    pub steps: u64,
    pub epochs: f64,
    pub total_parameters: usize,
    pub trainable_parameters: usize,
    pub optimizer: String,
    /// Bytes of optimizer state (moments, quantization scales).
    pub optimizer_state_bytes: usize,
    pub tokens_trained: u64,
    pub final_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub wall_seconds: f64,
    pub seconds_per_step: f64,
    pub tokens_per_second: f64,
    pub loss_curve: Option<PathBuf>,
    /// The adapter (LoRA) or model (full) directory written.
    pub saved: PathBuf,
}

/// The model being fine-tuned and what trains in it.
pub struct SftModel {
    pub model: CausalLm,
    pub params: Vec<NamedVar>,
    /// The adapter's configuration in a LoRA run; `None` in full fine-tuning.
    pub lora: Option<LoraConfig>,
    pub dir: ModelDir,
    pub tokenizer: Tokenizer,
}

impl SftModel {
    /// Loads `cfg.model_id` in f32 with the parameters `cfg` trains as variables: adapter
    /// weights (and `modules_to_save`) with LoRA, every weight without.
    pub fn load(cfg: &SftConfig) -> Result<Self> {
        let dir = ModelDir::resolve(&cfg.model_id)?;
        let model_cfg = dir.config()?;
        let tokenizer = Tokenizer::from_dir(dir.root())?;
        let device = Device::Cpu;
        let weights = SafetensorsWeights::open(&dir.weight_files()?)?;
        let seed = cfg.training_args.seed;

        let adapter = match &cfg.adapter_path {
            Some(p) => Some(LoraAdapter::load(p, DType::F32, &device)?),
            None => None,
        };
        let lora = match (&cfg.peft_config, &adapter) {
            (Some(p), _) => Some(p.to_lora_config(&cfg.model_id)?),
            (None, Some(a)) => Some(a.config.clone()),
            (None, None) => None,
        };
        let full = lora.is_none();
        let saves = |name: &str| {
            let module = name.strip_suffix(".weight").unwrap_or(name);
            lora.as_ref().is_some_and(|l| l.saves_module(module))
        };

        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        let mut params = Vec::new();
        for name in weights.names() {
            let mut t = weights.load(name, DType::F32, &device)?;
            if let Some(saved) = adapter.as_ref().and_then(|a| a.saved_modules.get(name)) {
                t = saved.to_dtype(DType::F32)?;
            }
            if full || saves(name) {
                let var = Var::from_tensor(&t)?;
                t = var.as_tensor().clone();
                params.push(NamedVar::new(
                    if full {
                        name.to_string()
                    } else {
                        format!("base_model.model.{name}")
                    },
                    var,
                ));
            }
            tensors.insert(name.to_string(), t);
        }
        let mut model = CausalLm::load(
            VarBuilder::from_tensors(tensors, DType::F32, &device),
            &model_cfg,
        )?;
        if let Some(l) = &lora {
            let vars: Vec<LoraVar> = match &adapter {
                Some(a) => {
                    a.apply(&mut model)?;
                    make_lora_trainable(&mut model, l.lora_dropout as f32, seed)?
                }
                None => attach_trainable_lora(&mut model, l, seed)?,
            };
            params.extend(vars.into_iter().map(|v| NamedVar {
                name: v.name,
                var: v.var,
                decay: true,
            }));
        }
        params.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self {
            model,
            params,
            lora,
            dir,
            tokenizer,
        })
    }

    pub fn trainable_parameters(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    /// Writes the result: the adapter (LoRA) or the whole model directory (full).
    pub fn save(&self, out: &Path) -> Result<()> {
        match &self.lora {
            Some(config) => {
                let adapter = LoraAdapter::from_model(&self.model, config.clone())?;
                adapter.save(out)?;
                // TRL saves the tokenizer with the adapter, so the directory serves alone.
                kiln_model::save::copy_side_files(self.dir.root(), out)?;
                Ok(())
            }
            None => kiln_model::save::save_model_dir(
                &self.model,
                self.dir.root(),
                out,
                self.model.config().dtype,
            )
            .map(|_| ()),
        }
    }
}

/// The per-token negative log-likelihood summed over a batch's trained tokens and divided by
/// `normalizer` (the trained tokens of the whole accumulation window), so that the micro-batches
/// of a step add up to the mean over its tokens, as transformers computes it since 2024.
pub fn sft_loss(
    model: &CausalLm,
    examples: &[&SftExample],
    pad_id: u32,
    normalizer: usize,
) -> Result<Tensor> {
    let batch = make_batch(examples, pad_id);
    let device = model.device();
    let ids = Tensor::new(batch.input_ids, device)?;
    let targets = Tensor::new(batch.targets.as_slice(), device)?;
    let weights = Tensor::new(batch.weights.as_slice(), device)?;
    let nll = model.token_nll(&ids, &targets)?;
    Ok(((nll * weights)?.sum_all()? / normalizer.max(1) as f64)?)
}

/// The mean NLL per trained token over `examples` on a detached view of the model.
pub fn evaluate(
    model: &CausalLm,
    examples: &[SftExample],
    batch: usize,
    pad_id: u32,
) -> Result<f64> {
    let total: usize = examples.iter().map(SftExample::trained_tokens).sum();
    let mut sum = 0.0;
    for chunk in examples.chunks(batch.max(1)) {
        let refs: Vec<&SftExample> = chunk.iter().collect();
        let loss = sft_loss(model, &refs, pad_id, total)?;
        sum += f64::from(loss.to_scalar::<f32>()?);
    }
    Ok(sum)
}

/// Runs supervised fine-tuning. `show_progress` draws a progress bar on stderr.
pub fn sft(cfg: &SftConfig, show_progress: bool) -> Result<SftSummary> {
    let started = Instant::now();
    cfg.validate()?;
    let t = &cfg.training_args;
    let out = &t.output_dir;
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
    let sft_model = SftModel::load(cfg)?;
    let tokenizer = &sft_model.tokenizer;
    let pad_id = tokenizer
        .token_id("<pad>")
        .or_else(|| sft_model.model.config().pad_token_id)
        .or_else(|| tokenizer.eos_token_id())
        .unwrap_or(0);

    // The whole dataset is read, tokenized and validated before the first step.
    let opts = cfg.data_options();
    let data = load_sft_dataset(&cfg.dataset_path, tokenizer, &opts)?;
    let (train, eval): (SftDataset, Option<SftDataset>) = match &cfg.eval_dataset_path {
        Some(p) => (data, Some(load_sft_dataset(p, tokenizer, &opts)?)),
        None if cfg.eval_split > 0.0 => {
            let (train, eval) = data.split(cfg.eval_split, t.seed);
            (train, Some(eval))
        }
        None => (data, None),
    };
    if train.examples.is_empty() {
        return Err(Error::InvalidInput(format!(
            "{}: no training example is left ({} rows read, {} without a trained token after truncation to max_length {})",
            cfg.dataset_path.display(),
            train.rows,
            train.dropped,
            t.max_length
        )));
    }
    let micro = t.per_device_train_batch_size;
    let per_step = micro * t.gradient_accumulation_steps;
    let steps_per_epoch = train.examples.len().div_ceil(per_step) as u64;
    let max_steps = if t.max_steps > 0 {
        t.max_steps as u64
    } else {
        ((steps_per_epoch as f64) * t.num_train_epochs)
            .ceil()
            .max(1.0) as u64
    };

    let SftModel {
        model,
        params,
        lora,
        ..
    } = &sft_model;
    let eval_model = model.detached();
    let mut opt = Optimizer::from_name(
        &t.optim,
        params.clone(),
        AdamWConfig {
            lr: t.learning_rate,
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_epsilon,
            weight_decay: t.weight_decay,
        },
    )
    .map_err(|e| Error::InvalidInput(format!("training_args.optim: {e}")))?;
    let schedule = LrSchedule {
        kind: t.lr_scheduler_type.parse().map_err(Error::InvalidInput)?,
        base_lr: t.learning_rate,
        warmup_steps: if t.warmup_steps > 0 {
            t.warmup_steps
        } else {
            LrSchedule::warmup_from_ratio(t.warmup_ratio, max_steps)
        },
        total_steps: max_steps,
    };
    let mut state = TrainerState {
        seed: t.seed,
        ..TrainerState::default()
    };
    if let Some(ckpt) = &resume_from {
        state = ckpt.restore(params, &mut opt)?;
        eprintln!(
            "resuming from {} (step {})",
            ckpt.dir.display(),
            state.global_step
        );
    }

    let mut run_log = RunLog::open(
        out,
        resume_from.is_some(),
        (state.global_step, max_steps),
        t.logging_steps,
        show_progress,
    )?;
    let mut order = EpochOrder::default();
    let eval_steps = t.eval_steps.unwrap_or(t.logging_steps);
    let eval_batch = t.per_device_eval_batch_size.unwrap_or(micro);
    let mut tokens_trained = 0u64;
    let train_started = Instant::now();
    let first_step = state.global_step;

    while state.global_step < max_steps {
        let lr = schedule.lr(state.global_step);
        opt.set_lr(lr);
        // The step's micro-batches are drawn first: the loss is normalised by the trained
        // tokens of the whole window.
        let batches: Vec<Vec<&SftExample>> = (0..t.gradient_accumulation_steps)
            .map(|_| {
                (0..micro)
                    .map(|_| {
                        let i = order.index(train.examples.len(), t.seed, state.data_position);
                        state.data_position += 1;
                        &train.examples[i]
                    })
                    .collect()
            })
            .collect();
        let window_tokens: usize = batches
            .iter()
            .flat_map(|b| b.iter().map(|e| e.trained_tokens()))
            .sum();
        let mut acc = GradAccumulator::new();
        let mut step_loss = 0.0;
        let mut step_tokens = 0u64;
        for batch in &batches {
            let loss = sft_loss(model, batch, pad_id, window_tokens)?;
            step_loss += f64::from(loss.to_scalar::<f32>()?);
            step_tokens += batch.iter().map(|e| e.input_ids.len() as u64).sum::<u64>();
            acc.add(params, &model.backward(&loss)?)?;
        }
        let mut grads = acc.take(params)?;
        if state.global_step == first_step {
            // Every trained tensor must be reached by the first backward pass; a fresh adapter's
            // A is the exception, with a zero gradient while B is still zero (as in PEFT).
            let checked: Vec<NamedVar> = params
                .iter()
                .filter(|p| !p.name.ends_with("lora_A.weight"))
                .cloned()
                .collect();
            ensure_all_have_gradients(&checked, &grads)?;
        }
        let grad_norm = clip_grad_norm(params, &mut grads, t.max_grad_norm)?;
        opt.step(&grads)?;
        state.global_step += 1;
        tokens_trained += step_tokens;

        let step = state.global_step;
        let eval_now = step.is_multiple_of(eval_steps) || step == max_steps;
        let eval_loss = match &eval {
            Some(e) if eval_now && !e.examples.is_empty() => {
                Some(evaluate(&eval_model, &e.examples, eval_batch, pad_id)?)
            }
            _ => None,
        };
        run_log.step(step, (step_loss, step_tokens), (lr, grad_norm), eval_loss)?;
        if step.is_multiple_of(t.save_steps) && step < max_steps {
            Checkpoint::save(out, params, &opt, &state)?;
        }
    }
    let train_seconds = train_started.elapsed().as_secs_f64();

    sft_model.save(out)?;
    let last_eval = run_log.last_eval();
    let (records, loss_curve) = run_log.finish(out, "kiln sft")?;
    let steps_run = state.global_step - first_step;
    let summary = SftSummary {
        output_dir: out.clone(),
        method: if lora.is_some() { "lora" } else { "full" }.into(),
        dataset_format: train.format.to_string(),
        train_examples: train.examples.len(),
        eval_examples: eval.as_ref().map_or(0, |e| e.examples.len()),
        steps: state.global_step,
        epochs: state.data_position as f64 / train.examples.len() as f64,
        total_parameters: model.num_parameters(),
        trainable_parameters: sft_model.trainable_parameters(),
        optimizer: t.optim.clone(),
        optimizer_state_bytes: opt.state_bytes(),
        tokens_trained,
        final_loss: records.iter().rev().find_map(|r| r.loss),
        eval_loss: last_eval,
        wall_seconds: started.elapsed().as_secs_f64(),
        seconds_per_step: train_seconds / steps_run.max(1) as f64,
        tokens_per_second: tokens_trained as f64 / train_seconds.max(1e-9),
        loss_curve,
        saved: out.clone(),
    };
    write_results(out, &summary)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file a tutorial shows, accepted exactly as written.
    #[test]
    fn the_tutorial_config_is_accepted_as_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sft.yaml");
        std::fs::write(
            &path,
            "model_id: meta-llama/Llama-2-7b-hf\n\
             dataset_path: /data/preference_pairs/\n\
             peft_config:\n  r: 16\n  lora_alpha: 32\n  target_modules: [\"q_proj\", \"v_proj\"]\n\
             training_args:\n  per_device_train_batch_size: 4\n  gradient_accumulation_steps: 8\n  \
             max_steps: 1000\n  optim: paged_adamw_8bit\n",
        )
        .expect("write");
        let cfg = SftConfig::load(&path, &[]).expect("parses");
        cfg.validate().expect("valid");
        let lora = cfg
            .peft_config
            .as_ref()
            .expect("peft_config")
            .to_lora_config(&cfg.model_id)
            .expect("lora config");
        assert_eq!(lora.r, 16);
        assert_eq!(lora.scale_for("model.layers.0.self_attn.q_proj"), 2.0);
        assert!(lora.targets("model.layers.3.self_attn.v_proj"));
        assert!(!lora.targets("model.layers.3.mlp.up_proj"));
        let t = &cfg.training_args;
        assert_eq!(
            (
                t.per_device_train_batch_size,
                t.gradient_accumulation_steps,
                t.max_steps
            ),
            (4, 8, 1000)
        );
        assert_eq!(t.optim, "paged_adamw_8bit");
        // HF's defaults for what the file leaves out.
        assert_eq!(t.learning_rate, 2e-5);
        assert_eq!(t.lr_scheduler_type, "linear");
        assert_eq!(t.output_dir, PathBuf::from("trainer_output"));
    }
}
