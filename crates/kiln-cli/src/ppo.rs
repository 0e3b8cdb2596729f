//! `kiln ppo`: RLHF with PPO against a reward model or a rule reward.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use kiln_train::ppo::{PpoConfig, ppo};

#[derive(Args, Debug)]
#[command(after_help = "Example (see docs/ppo.md for the whole vocabulary):\n  \
    kiln ppo --config ppo.yaml --set training_args.total_episodes=512 --set training_args.kl_coef=0.1")]
pub struct PpoArgs {
    /// YAML config: model_id, dataset_path (prompts), peft_config (PEFT's LoraConfig) and
    /// training_args (TrainingArguments / PPOConfig names, plus `reward` for a rule reward).
    #[arg(long, value_name = "FILE.yaml")]
    config: PathBuf,

    /// Override a config key, e.g. --set training_args.kl_coef=0.1 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,

    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: PpoArgs) -> Result<()> {
    let cfg = PpoConfig::load(&args.config, &args.overrides)?;
    let summary = ppo(&cfg, std::io::stderr().is_terminal())
        .with_context(|| format!("PPO with {}", args.config.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    println!(
        "PPO ({}) trained {} of {} parameters ({:.2}%, value head included) in {:.1} s",
        summary.method,
        summary.trainable_parameters,
        summary.total_parameters,
        100.0 * summary.trainable_parameters as f64 / summary.total_parameters.max(1) as f64,
        summary.wall_seconds
    );
    println!(
        "  {} steps · {} optimizer steps · {} episodes on {} prompts · {:.3} s/step ({:.0}% rollouts)",
        summary.steps,
        summary.optimizer_steps,
        summary.episodes,
        summary.train_prompts,
        summary.seconds_per_step,
        100.0 * summary.rollout_seconds
            / (summary.seconds_per_step * summary.steps.max(1) as f64).max(1e-9)
    );
    let how = if summary.eval_temperature == 0.0 {
        "greedy".to_string()
    } else {
        format!("temperature {}", summary.eval_temperature)
    };
    println!(
        "  mean reward ({}) {:.4} → {:.4} ({how}, {} {} prompts)",
        summary.reward,
        summary.mean_reward_before,
        summary.mean_reward_after,
        summary.eval_prompts,
        if summary.eval_held_out {
            "held-out"
        } else {
            "training"
        }
    );
    if let (Some(scores), Some(kl)) = (summary.final_scores, summary.final_kl) {
        println!("  last logged objective/scores {scores:.4} · objective/kl {kl:.4}");
    }
    if summary.prompts_dropped > 0 {
        println!(
            "  {} prompts dropped (prompt + response_length over max_length)",
            summary.prompts_dropped
        );
    }
    println!(
        "  {} {}",
        if summary.method == "lora" {
            "adapter"
        } else {
            "model directory"
        },
        summary.saved.display()
    );
    if let Some(curve) = &summary.loss_curve {
        println!("  loss curve {}", curve.display());
    }
    Ok(())
}
