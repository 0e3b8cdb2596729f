//! `kiln pretrain`: a Llama trained from scratch on a text corpus, saved as a model directory
//! that transformers and kiln both load.
//!
//! The steps: validate the whole config (before any work), train or load a byte-level BPE
//! tokenizer, stream the corpus into token files with a held-out split, then train with AdamW,
//! the configured schedule, clipping and gradient accumulation, logging `metrics.jsonl`,
//! evaluating, checkpointing atomically, and finally saving `config.json`, `model.safetensors`,
//! the tokenizer files, `generation_config.json` and a loss-curve PNG.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use kiln_core::config::RawConfig;
use kiln_core::{Error, ModelConfig, Result};
use kiln_model::CausalLm;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, TrainerState};
use crate::corpus::{self, TokenBlocks};
use crate::grads::{GradAccumulator, clip_grad_norm, ensure_all_have_gradients};
use crate::optim::{AdamW, AdamWConfig, NamedVar};
use crate::optimizer::Optimizer;
use crate::run::{RunLog, io_err, prepare_output_dir, write_results};
use crate::schedule::{LrSchedule, ScheduleKind};

defaults! {
    d_vocab: usize = 2048;
    d_hidden: usize = 256;
    d_intermediate: usize = 688;
    d_layers: usize = 4;
    d_heads: usize = 8;
    d_rope_theta: f64 = 10_000.0;
    d_max_length: usize = 256;
    d_batch: usize = 8;
    d_one: usize = 1;
    d_lr: f64 = 1e-3;
    d_scheduler: String = "cosine".to_string();
    d_weight_decay: f64 = 0.1;
    d_beta1: f64 = 0.9;
    d_beta2: f64 = 0.95;
    d_eps: f64 = 1e-8;
    d_max_grad_norm: f64 = 1.0;
    d_max_steps: u64 = 1000;
    d_logging_steps: u64 = 10;
    d_eval_steps: u64 = 100;
    d_save_steps: u64 = 500;
    d_seed: u64 = 42;
    d_val_pct: f64 = 5.0;
    d_max_eval: usize = 64;
    d_init_range: f64 = 0.02;
    d_rms_eps: f64 = 1e-5;
}

/// The `kiln pretrain` config: one flat YAML mapping, Hugging Face key names.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainConfig {
    /// A `.txt`/`.jsonl` file or a directory of them (JSONL rows are `{"text"}`).
    pub dataset_path: PathBuf,
    pub output_dir: PathBuf,
    /// An existing `tokenizer.json` (or a directory holding one); otherwise one is trained.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (no grouping).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `max_length`.
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default = "d_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "d_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "d_init_range")]
    pub initializer_range: f64,
    /// Tokens per training sequence.
    #[serde(default = "d_max_length")]
    pub max_length: usize,
    #[serde(default = "d_batch")]
    pub per_device_train_batch_size: usize,
    #[serde(default = "d_one")]
    pub gradient_accumulation_steps: usize,
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    #[serde(default = "d_scheduler")]
    pub lr_scheduler_type: String,
    #[serde(default)]
    pub warmup_steps: u64,
    /// Used when `warmup_steps` is 0.
    #[serde(default)]
    pub warmup_ratio: f64,
    #[serde(default = "d_weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "d_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "d_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "d_eps")]
    pub adam_epsilon: f64,
    #[serde(default = "d_max_grad_norm")]
    pub max_grad_norm: f64,
    #[serde(default = "d_max_steps")]
    pub max_steps: u64,
    #[serde(default = "d_logging_steps")]
    pub logging_steps: u64,
    #[serde(default = "d_eval_steps")]
    pub eval_steps: u64,
    #[serde(default = "d_save_steps")]
    pub save_steps: u64,
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Percent of documents held out for evaluation.
    #[serde(default = "d_val_pct")]
    pub validation_split_percentage: f64,
    /// Evaluation sequences at most.
    #[serde(default = "d_max_eval")]
    pub max_eval_samples: usize,
    /// Continue from the newest checkpoint in `output_dir`.
    #[serde(default)]
    pub resume_from_checkpoint: bool,
}

impl PretrainConfig {
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        crate::yaml::load(path, overrides)
    }

    /// The model configuration this run trains, validated.
    pub fn model_config(&self, vocab_size: usize) -> Result<ModelConfig> {
        let raw: RawConfig = serde_json::from_value(serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            "max_position_embeddings": self.max_position_embeddings.unwrap_or(self.max_length),
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": corpus::BOS_ID,
            "eos_token_id": [corpus::END_OF_TEXT_ID, corpus::IM_END_ID],
            "pad_token_id": corpus::PAD_ID,
            "torch_dtype": "float32",
        }))
        .map_err(|e| Error::InvalidInput(format!("model shape: {e}")))?;
        ModelConfig::from_raw(raw, Path::new("pretrain config"))
    }

    /// Checks everything that can be checked before any work starts.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::InvalidInput(format!("`{key}`: {msg}")));
        self.model_config(self.vocab_size.max(1))?;
        let positions = self.max_position_embeddings.unwrap_or(self.max_length);
        if self.max_length < 2 {
            return bad(
                "max_length",
                format!(
                    "{} is too short to learn from (need at least 2)",
                    self.max_length
                ),
            );
        }
        if self.max_length > positions {
            return bad(
                "max_length",
                format!(
                    "{} exceeds max_position_embeddings ({positions})",
                    self.max_length
                ),
            );
        }
        crate::run::require_nonzero(
            "",
            &[
                (
                    "per_device_train_batch_size",
                    self.per_device_train_batch_size as u64,
                ),
                (
                    "gradient_accumulation_steps",
                    self.gradient_accumulation_steps as u64,
                ),
                ("max_steps", self.max_steps),
                ("logging_steps", self.logging_steps),
                ("eval_steps", self.eval_steps),
                ("save_steps", self.save_steps),
            ],
        )?;
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad(
                "learning_rate",
                format!("{} must be positive", self.learning_rate),
            );
        }
        if !(0.0..100.0).contains(&self.validation_split_percentage) {
            return bad("validation_split_percentage", "must be in [0, 100)".into());
        }
        self.lr_scheduler_type
            .parse::<ScheduleKind>()
            .map_err(Error::InvalidInput)?;
        if self.tokenizer.is_none() && self.vocab_size < 256 + corpus::SPECIAL_TOKENS.len() {
            return bad(
                "vocab_size",
                format!(
                    "{} is below 261 (256 bytes + 5 special tokens)",
                    self.vocab_size
                ),
            );
        }
        Ok(())
    }
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct PretrainSummary {
    pub output_dir: PathBuf,
    pub parameters: usize,
    pub vocab_size: usize,
    pub steps: u64,
    pub train_tokens: u64,
    pub tokens_trained: u64,
    pub final_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub eval_perplexity: Option<f64>,
    pub wall_seconds: f64,
    pub tokens_per_second: f64,
    pub loss_curve: Option<PathBuf>,
}

/// Runs pre-training. `show_progress` draws a progress bar on stderr.
pub fn pretrain(cfg: &PretrainConfig, show_progress: bool) -> Result<PretrainSummary> {
    let started = Instant::now();
    cfg.validate()?;
    let out = &cfg.output_dir;
    let resume_from =
        prepare_output_dir(out, cfg.resume_from_checkpoint, "resume_from_checkpoint")?;
    let probe = out.join(".kiln-write-test");
    std::fs::write(&probe, b"ok")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| {
            Error::InvalidInput(format!("output_dir {} is not writable: {e}", out.display()))
        })?;
    let files = corpus::corpus_files(&cfg.dataset_path)?;

    // Tokenizer: the resumed run's own, a given one, or a freshly trained one.
    let tokenizer_path = out.join("tokenizer.json");
    let tokenizer = if resume_from.is_some() && tokenizer_path.is_file() {
        load_tokenizer(&tokenizer_path)?
    } else {
        let tok = match &cfg.tokenizer {
            Some(p) => load_tokenizer(&if p.is_dir() {
                p.join("tokenizer.json")
            } else {
                p.clone()
            })?,
            None => corpus::train_tokenizer(&files, cfg.vocab_size)?,
        };
        corpus::write_tokenizer_files(&tok, out)?;
        tok
    };
    let vocab_size = tokenizer.get_vocab_size(true);

    let cache = out.join(".kiln-cache");
    std::fs::create_dir_all(&cache).map_err(io_err(&cache))?;
    let (train_bin, eval_bin) = (cache.join("train.u32"), cache.join("eval.u32"));
    let counts = if resume_from.is_some() && train_bin.is_file() && eval_bin.is_file() {
        let len = |p: &Path| std::fs::metadata(p).map(|m| m.len() / 4).unwrap_or(0);
        corpus::TokenizedCorpus {
            documents: 0,
            train_tokens: len(&train_bin),
            eval_tokens: len(&eval_bin),
        }
    } else {
        corpus::tokenize_corpus(
            &tokenizer,
            &files,
            cfg.validation_split_percentage,
            &train_bin,
            &eval_bin,
        )?
    };
    let block = cfg.max_length + 1;
    let mut train_blocks = TokenBlocks::open(&train_bin, block)?;
    if train_blocks.is_empty() {
        return Err(Error::InvalidInput(format!(
            "the corpus gives {} training tokens, fewer than one sequence of max_length + 1 = {block}",
            counts.train_tokens
        )));
    }
    let mut eval_blocks = TokenBlocks::open(&eval_bin, block)?;

    // The model, freshly initialised, every weight a trainable variable.
    let model_cfg = cfg.model_config(vocab_size)?;
    let device = Device::Cpu;
    let varmap = VarMap::new();
    {
        let init = kiln_model::init::init_weights(
            &model_cfg,
            cfg.initializer_range,
            cfg.seed,
            DType::F32,
            &device,
        )?;
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| Error::InvalidInput("variable map poisoned".into()))?;
        for (name, t) in init {
            data.insert(name, Var::from_tensor(&t)?);
        }
    }
    let model = CausalLm::load(
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
        &model_cfg,
    )?;
    // Shares the variables' storage: sees every update, records no graph.
    let eval_model = model.detached();
    let mut params: Vec<NamedVar> = varmap
        .data()
        .lock()
        .map_err(|_| Error::InvalidInput("variable map poisoned".into()))?
        .iter()
        .map(|(n, v)| NamedVar::new(n.clone(), v.clone()))
        .collect();
    params.sort_by(|a, b| a.name.cmp(&b.name));

    let warmup = if cfg.warmup_steps > 0 {
        cfg.warmup_steps
    } else {
        LrSchedule::warmup_from_ratio(cfg.warmup_ratio, cfg.max_steps)
    };
    let schedule = LrSchedule {
        kind: cfg.lr_scheduler_type.parse().map_err(Error::InvalidInput)?,
        base_lr: cfg.learning_rate,
        warmup_steps: warmup,
        total_steps: cfg.max_steps,
    };
    let mut opt = Optimizer::AdamW(AdamW::new(
        params.clone(),
        AdamWConfig {
            lr: cfg.learning_rate,
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
            weight_decay: cfg.weight_decay,
        },
    ));
    let mut state = TrainerState {
        seed: cfg.seed,
        ..TrainerState::default()
    };
    if let Some(ckpt) = &resume_from {
        state = ckpt.restore(&params, &mut opt)?;
        eprintln!(
            "resuming from {} (step {})",
            ckpt.dir.display(),
            state.global_step
        );
    }

    let mut run_log = RunLog::open(
        out,
        resume_from.is_some(),
        (state.global_step, cfg.max_steps),
        cfg.logging_steps,
        show_progress,
    )?;
    let tokens_per_step =
        (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * cfg.max_length) as u64;
    let mut tokens_trained = 0u64;

    while state.global_step < cfg.max_steps {
        let lr = schedule.lr(state.global_step);
        opt.set_lr(lr);
        let mut acc = GradAccumulator::new();
        let mut step_loss = 0.0;
        for _ in 0..cfg.gradient_accumulation_steps {
            let rows = (0..cfg.per_device_train_batch_size)
                .map(|_| {
                    let idx = train_blocks.shuffled_index(cfg.seed, state.data_position);
                    state.data_position += 1;
                    train_blocks.block(idx)
                })
                .collect::<Result<Vec<_>>>()?;
            let loss = lm_loss(&model, &rows, tokens_per_step as usize)?;
            step_loss += f64::from(loss.to_scalar::<f32>()?);
            acc.add(&params, &model.backward(&loss)?)?;
        }
        let mut grads = acc.take(&params)?;
        if state.global_step == 0 {
            ensure_all_have_gradients(&params, &grads)?;
        }
        let grad_norm = clip_grad_norm(&params, &mut grads, cfg.max_grad_norm)?;
        opt.step(&grads)?;
        state.global_step += 1;
        tokens_trained += tokens_per_step;

        let step = state.global_step;
        let eval_now = step.is_multiple_of(cfg.eval_steps) || step == cfg.max_steps;
        let eval_loss = if eval_now && !eval_blocks.is_empty() {
            Some(evaluate(&eval_model, &mut eval_blocks, cfg)?)
        } else {
            None
        };
        run_log.step(
            step,
            (step_loss, tokens_per_step),
            (lr, grad_norm),
            eval_loss,
        )?;
        if step.is_multiple_of(cfg.save_steps) && step < cfg.max_steps {
            Checkpoint::save(out, &params, &opt, &state)?;
        }
    }
    let last_eval = run_log.last_eval();

    save_model_dir(&model_cfg, &varmap, out)?;
    let (records, loss_curve) = run_log.finish(out, "kiln pretrain")?;
    let final_loss = records.iter().rev().find_map(|r| r.loss);
    let wall = started.elapsed().as_secs_f64();
    let summary = PretrainSummary {
        output_dir: out.clone(),
        parameters: model_cfg.num_parameters(),
        vocab_size,
        steps: state.global_step,
        train_tokens: counts.train_tokens,
        tokens_trained,
        final_loss,
        eval_loss: last_eval,
        eval_perplexity: last_eval.map(f64::exp),
        wall_seconds: wall,
        tokens_per_second: tokens_trained as f64 / wall.max(1e-9),
        loss_curve,
    };
    write_results(out, &summary)?;
    Ok(summary)
}

fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
        path: path.to_path_buf(),
        message: format!("cannot be loaded: {e}"),
    })
}

/// Mean next-token NLL of `rows` (each `max_length + 1` tokens), summed and divided by
/// `normalizer` tokens so that accumulated micro-batches add up to the window's mean.
pub fn lm_loss(model: &CausalLm, rows: &[Vec<u32>], normalizer: usize) -> Result<Tensor> {
    let ids = Tensor::new(rows.to_vec(), model.device())?;
    let s = ids.dim(1)?;
    let targets = ids.narrow(1, 1, s - 1)?.flatten_all()?;
    let nll = model.token_nll(&ids.narrow(1, 0, s - 1)?, &targets)?;
    Ok((nll.sum_all()? / normalizer as f64)?)
}

/// Mean NLL over the held-out blocks (at most `max_eval_samples`), computed on a detached view
/// of the model (no graph, no saved activations).
fn evaluate(model: &CausalLm, blocks: &mut TokenBlocks, cfg: &PretrainConfig) -> Result<f64> {
    let n = blocks.len().min(cfg.max_eval_samples);
    let mut total = 0.0;
    let mut start = 0;
    while start < n {
        let end = (start + cfg.per_device_train_batch_size).min(n);
        let rows = (start..end)
            .map(|i| blocks.block(i))
            .collect::<Result<Vec<_>>>()?;
        let loss = lm_loss(model, &rows, n * cfg.max_length)?;
        total += f64::from(loss.to_scalar::<f32>()?);
        start = end;
    }
    Ok(total)
}

fn save_model_dir(model_cfg: &ModelConfig, varmap: &VarMap, out: &Path) -> Result<()> {
    let write_json = |name: &str, v: &serde_json::Value| {
        let p = out.join(name);
        std::fs::write(&p, serde_json::to_string_pretty(v).unwrap_or_default()).map_err(io_err(&p))
    };
    write_json("config.json", &model_cfg.to_hf_json())?;
    write_json(
        "generation_config.json",
        &serde_json::json!({
            "bos_token_id": corpus::BOS_ID,
            "eos_token_id": [corpus::END_OF_TEXT_ID, corpus::IM_END_ID],
            "pad_token_id": corpus::PAD_ID,
        }),
    )?;
    let weights = out.join("model.safetensors");
    varmap
        .save(&weights)
        .map_err(|e| Error::InvalidInput(format!("{}: cannot write: {e}", weights.display())))
}
