//! `kiln reward`: trains a reward model (a sequence classifier with one output) on preference
//! pairs, with TRL's RewardTrainer semantics.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use kiln_train::reward::{RewardConfig, reward};

#[derive(Args, Debug)]
#[command(
    after_help = "Example (see docs/reward.md for the whole vocabulary):\n  \
    kiln reward --config reward.yaml --set training_args.max_steps=100 \
    --set training_args.center_rewards_coefficient=0.01"
)]
pub struct RewardArgs {
    /// YAML config: model_id (a causal LM or a reward model), dataset_path (preference pairs,
    /// optional `margin` column), peft_config (PEFT's LoraConfig; the result is saved merged) and
    /// training_args (TrainingArguments / RewardConfig names: center_rewards_coefficient,
    /// on_invalid_pair, max_length, …).
    #[arg(long, value_name = "FILE.yaml")]
    config: PathBuf,

    /// Override a config key, e.g. --set training_args.learning_rate=5e-5 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,

    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: RewardArgs) -> Result<()> {
    let cfg = RewardConfig::load(&args.config, &args.overrides)?;
    let summary = reward(&cfg, std::io::stderr().is_terminal())
        .with_context(|| format!("training a reward model with {}", args.config.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    println!(
        "reward model ({}, head {}) trained on {} {} pairs: {} steps, {:.2} epochs in {:.1} s ({:.3} s/step)",
        summary.method,
        if summary.head_initialized {
            "initialized"
        } else {
            "loaded"
        },
        summary.train_pairs,
        summary.dataset_format,
        summary.steps,
        summary.epochs,
        summary.wall_seconds,
        summary.seconds_per_step
    );
    println!(
        "  {} of {} parameters trained · optimizer {} · pad token id {}",
        summary.trainable_parameters,
        summary.total_parameters,
        summary.optimizer,
        summary
            .pad_token_id
            .map_or_else(|| "none".to_string(), |p| p.to_string())
    );
    if summary.skipped_pairs > 0 {
        println!("  skipped {} invalid pairs", summary.skipped_pairs);
    }
    let num = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
    if let Some(loss) = summary.final_loss {
        println!(
            "  train: loss {loss:.4} · accuracy {} · margin {}",
            num(summary.accuracy),
            num(summary.margin)
        );
    }
    if summary.eval_accuracy.is_some() {
        println!(
            "  held-out ({} pairs): accuracy {} → {} · margin {} · loss {}",
            summary.eval_pairs,
            num(summary.eval_accuracy_before),
            num(summary.eval_accuracy),
            num(summary.eval_margin),
            num(summary.eval_loss)
        );
    }
    println!("  reward model {}", summary.saved.display());
    if let Some(curve) = &summary.loss_curve {
        println!("  loss curve {}", curve.display());
    }
    Ok(())
}
