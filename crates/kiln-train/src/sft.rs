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

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Tensor;
use kiln_core::{Error, Result};
use kiln_model::CausalLm;
use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::corpus::EpochOrder;
use crate::finetune::{FineTuneConfig, FineTuneModel, MethodArgs};
use crate::grads::GradAccumulator;
use crate::run::{RunLog, optimizer_step, start_state, write_results};
use crate::sft_data::{SftDataOptions, SftDataset, SftExample, load_sft_dataset, make_batch};

/// `kiln sft`'s config file.
pub type SftConfig = FineTuneConfig<SftArgs>;
/// The model `kiln sft` trains.
pub type SftModel = FineTuneModel;

defaults! {
    d_true: bool = true;
}

/// `SFTConfig`'s keys in `training_args`, under TRL's names and defaults but one:
/// `assistant_only_loss` is on by default (TRL's is off), so conversations train the
/// assistant's replies rather than the whole rendered chat.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftArgs {
    #[serde(default)]
    pub packing: bool,
    /// Loss on completions only for prompt-completion and preference data (TRL's default).
    #[serde(default = "d_true")]
    pub completion_only_loss: bool,
    /// Loss on assistant turns only for conversations.
    #[serde(default = "d_true")]
    pub assistant_only_loss: bool,
}

impl MethodArgs for SftArgs {
    const KEYS: &'static [&'static str] =
        &["packing", "completion_only_loss", "assistant_only_loss"];
}

impl SftConfig {
    fn data_options(&self) -> SftDataOptions {
        let t = &self.training_args;
        SftDataOptions {
            max_length: t.max_length,
            packing: t.method.packing,
            completion_only_loss: t.method.completion_only_loss,
            assistant_only_loss: t.method.assistant_only_loss,
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
    let resume_from = cfg.prepare_output_dir()?;
    let sft_model = SftModel::load(cfg)?;
    let tokenizer = &sft_model.tokenizer;
    let pad_id = sft_model.pad_id();

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
    let max_steps = t.total_steps(train.examples.len());

    let SftModel {
        model,
        params,
        lora,
        ..
    } = &sft_model;
    let eval_model = model.detached();
    let mut opt = t.optimizer(params.clone())?;
    let schedule = t.schedule(max_steps)?;
    let mut state = start_state(resume_from.as_ref(), params, &mut opt, t.seed)?;

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
        let grads = acc.take(params)?;
        let first = state.global_step == first_step;
        let grad_norm = optimizer_step(params, grads, &mut opt, t.max_grad_norm, first)?;
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
