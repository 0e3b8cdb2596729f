//! What the fine-tuning recipes share: the config file (`model_id`, `dataset_path`,
//! `peft_config`, `training_args`, …), its `TrainingArguments` vocabulary, and the model being
//! trained with its trainable parameters (a LoRA adapter or every weight).
//!
//! Each recipe adds its own keys to `training_args`, as TRL's `SFTConfig` and `DPOConfig` extend
//! `TrainingArguments`: a [`MethodArgs`] type lists them, and [`Args`] reads one YAML mapping into
//! the shared part and the recipe's part, rejecting a key that belongs to neither by name.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use kiln_core::{Error, ModelDir, Result, SafetensorsWeights, Tokenizer};
use kiln_model::lora_train::{LoraVar, attach_trainable_lora, make_lora_trainable};
use kiln_model::{CausalLm, LoraAdapter, LoraConfig, TargetModules};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::optim::{AdamWConfig, NamedVar};
use crate::optimizer::Optimizer;
use crate::schedule::{LrSchedule, ScheduleKind};

/// A recipe's own `training_args` keys (`beta`, `loss_type`, … for DPO).
pub trait MethodArgs: Serialize + DeserializeOwned + Clone + Debug {
    /// The keys this recipe adds to `training_args`.
    const KEYS: &'static [&'static str];
    /// Shared keys whose default the recipe changes, as `DPOConfig` sets `learning_rate=1e-6`.
    fn default_overrides() -> Vec<(&'static str, Value)> {
        Vec::new()
    }
    /// Checks the recipe's keys; errors name them as `training_args.KEY`.
    fn validate(&self) -> Result<()> {
        Ok(())
    }
}

/// `training_args`: the shared [`TrainingArgs`] (reached through `Deref`) and the recipe's keys.
#[derive(Debug, Clone)]
pub struct Args<M> {
    pub common: TrainingArgs,
    pub method: M,
}

impl<M> Deref for Args<M> {
    type Target = TrainingArgs;
    fn deref(&self) -> &TrainingArgs {
        &self.common
    }
}

impl<M: MethodArgs> Default for Args<M> {
    fn default() -> Self {
        // Every field has a default: an empty mapping is the default.
        Self::from_map(Map::new()).unwrap_or_else(|e| unreachable!("{e}"))
    }
}

impl<M: MethodArgs> Args<M> {
    fn from_map(mut map: Map<String, Value>) -> std::result::Result<Self, String> {
        let mut own = Map::new();
        for key in M::KEYS {
            if let Some(v) = map.remove(*key) {
                own.insert((*key).to_string(), v);
            }
        }
        for (key, value) in M::default_overrides() {
            map.entry(key).or_insert(value);
        }
        let common = serde_json::from_value(Value::Object(map)).map_err(|e| {
            let extra = if M::KEYS.is_empty() {
                String::new()
            } else {
                format!(" (this recipe adds: {})", M::KEYS.join(", "))
            };
            format!("{e}{extra}")
        })?;
        let method = serde_json::from_value(Value::Object(own)).map_err(|e| e.to_string())?;
        Ok(Self { common, method })
    }
}

impl<'de, M: MethodArgs> Deserialize<'de> for Args<M> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let map = Option::<Map<String, Value>>::deserialize(deserializer)?.unwrap_or_default();
        Self::from_map(map).map_err(serde::de::Error::custom)
    }
}

impl<M: MethodArgs> Serialize for Args<M> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        let mut map = match serde_json::to_value(&self.common).map_err(S::Error::custom)? {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        if let Value::Object(own) = serde_json::to_value(&self.method).map_err(S::Error::custom)? {
            map.extend(own);
        }
        map.serialize(serializer)
    }
}

/// The config file of a fine-tuning recipe (`kiln sft`, `kiln dpo`, `kiln reward`, `kiln ppo`):
/// the same top-level keys for all, and `training_args` with the shared `TrainingArguments`
/// vocabulary plus the recipe's own keys `M` (as TRL's `SFTConfig`, `DPOConfig`, … extend
/// `TrainingArguments`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, bound = "M: MethodArgs")]
pub struct FineTuneConfig<M> {
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
    pub training_args: Args<M>,
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

impl TrainingArgs {
    /// Optimizer steps of the run: `max_steps`, or `num_train_epochs` over `examples` in
    /// batches of `per_device_train_batch_size × gradient_accumulation_steps`.
    pub fn total_steps(&self, examples: usize) -> u64 {
        if self.max_steps > 0 {
            return self.max_steps as u64;
        }
        let per_step = self.per_device_train_batch_size * self.gradient_accumulation_steps;
        let steps_per_epoch = examples.div_ceil(per_step.max(1)) as u64;
        ((steps_per_epoch as f64) * self.num_train_epochs)
            .ceil()
            .max(1.0) as u64
    }

    /// The optimizer `optim` names, over `params`, with the `adam_*` settings.
    pub fn optimizer(&self, params: Vec<NamedVar>) -> Result<Optimizer> {
        Optimizer::from_name(
            &self.optim,
            params,
            AdamWConfig {
                lr: self.learning_rate,
                beta1: self.adam_beta1,
                beta2: self.adam_beta2,
                eps: self.adam_epsilon,
                weight_decay: self.weight_decay,
            },
        )
        .map_err(|e| Error::InvalidInput(format!("training_args.optim: {e}")))
    }

    /// The learning-rate schedule of a run of `total_steps` (`warmup_steps` wins over
    /// `warmup_ratio`, as in transformers).
    pub fn schedule(&self, total_steps: u64) -> Result<LrSchedule> {
        Ok(LrSchedule {
            kind: self
                .lr_scheduler_type
                .parse()
                .map_err(Error::InvalidInput)?,
            base_lr: self.learning_rate,
            warmup_steps: if self.warmup_steps > 0 {
                self.warmup_steps
            } else {
                LrSchedule::warmup_from_ratio(self.warmup_ratio, total_steps)
            },
            total_steps,
        })
    }
}

impl<M: MethodArgs> FineTuneConfig<M> {
    /// Reads the YAML file with `--set key=value` overrides (dotted keys reach into
    /// `training_args.*` and `peft_config.*`).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        crate::yaml::load(path, overrides)
    }

    /// Creates `output_dir` and returns its newest checkpoint when the run resumes (see
    /// [`crate::run`]); refuses to write a fully fine-tuned model over one already there.
    pub fn prepare_output_dir(&self) -> Result<Option<crate::checkpoint::Checkpoint>> {
        let t = &self.training_args;
        let out = &t.output_dir;
        let resume_from = crate::run::prepare_output_dir(
            out,
            t.resume_from_checkpoint,
            "training_args.resume_from_checkpoint",
        )?;
        let full = self.peft_config.is_none() && self.adapter_path.is_none();
        if full && out.join("model.safetensors").exists() {
            return Err(Error::InvalidInput(format!(
                "output_dir {} already holds a model.safetensors: full fine-tuning writes the model there; choose another output_dir",
                out.display()
            )));
        }
        Ok(resume_from)
    }

    /// Checks everything that can be checked before the model and data are read.
    pub fn validate(&self) -> Result<()> {
        self.training_args.method.validate()?;
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
}

/// The model being fine-tuned and what trains in it.
pub struct FineTuneModel {
    pub model: CausalLm,
    pub params: Vec<NamedVar>,
    /// The adapter's configuration in a LoRA run; `None` in full fine-tuning.
    pub lora: Option<LoraConfig>,
    pub dir: ModelDir,
    pub tokenizer: Tokenizer,
}

impl FineTuneModel {
    /// Loads `cfg.model_id` in f32 with the parameters `cfg` trains as variables: adapter
    /// weights (and `modules_to_save`) with LoRA, every weight without.
    pub fn load<M: MethodArgs>(cfg: &FineTuneConfig<M>) -> Result<Self> {
        Self::load_with_dropout(cfg, true)
    }

    /// [`FineTuneModel::load`], with the adapter's `lora_dropout` left out of training passes
    /// when `dropout` is false (DPO's `disable_dropout`); the saved adapter keeps its value.
    pub fn load_with_dropout<M: MethodArgs>(
        cfg: &FineTuneConfig<M>,
        dropout: bool,
    ) -> Result<Self> {
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
            let p_drop = if dropout { l.lora_dropout } else { 0.0 };
            let vars: Vec<LoraVar> = match &adapter {
                Some(a) => {
                    a.apply(&mut model)?;
                    make_lora_trainable(&mut model, p_drop as f32, seed)?
                }
                None => {
                    let mut attached = l.clone();
                    attached.lora_dropout = p_drop;
                    attach_trainable_lora(&mut model, &attached, seed)?
                }
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

    /// The frozen reference DPO and PPO compare the policy with: in a LoRA run without
    /// `modules_to_save`, the policy's own base weights with the adapter removed (PEFT's
    /// `disable_adapter()`; no copy is made), with the initial adapter re-applied as constants
    /// when `adapter_path` is trained on; otherwise a separate frozen load of the initial model.
    /// The flag says whether the base weights are shared with the policy.
    pub fn reference<M: MethodArgs>(&self, cfg: &FineTuneConfig<M>) -> Result<(CausalLm, bool)> {
        let shares = self
            .lora
            .as_ref()
            .is_some_and(|l| l.modules_to_save.is_empty());
        if shares {
            let mut base = self.model.without_adapters();
            if let Some(path) = &cfg.adapter_path {
                LoraAdapter::load(path, DType::F32, &Device::Cpu)?.apply(&mut base)?;
            }
            return Ok((base, true));
        }
        let options = kiln_model::LoadOptions {
            dtype: Some(DType::F32),
            adapter: cfg.adapter_path.clone(),
            ..Default::default()
        };
        let loaded = kiln_model::LoadedModel::load(&cfg.model_id, &options)?;
        Ok((loaded.model, false))
    }

    /// The id batches are padded with: the tokenizer's `<pad>`, the config's `pad_token_id`,
    /// or EOS (padding is never a target, so any id serves).
    pub fn pad_id(&self) -> u32 {
        self.tokenizer
            .token_id("<pad>")
            .or_else(|| self.model.config().pad_token_id)
            .or_else(|| self.tokenizer.eos_token_id())
            .unwrap_or(0)
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
