//! `kiln dpo`: direct preference optimization with TRL's DPOTrainer semantics.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use kiln_train::dpo::{DpoConfig, dpo};

#[derive(Args, Debug)]
#[command(after_help = "Example (see docs/dpo.md for the whole vocabulary):\n  \
    kiln dpo --config dpo.yaml --set training_args.beta=0.2 --set training_args.loss_type=ipo")]
pub struct DpoArgs {
    /// YAML config: model_id, dataset_path, peft_config (PEFT's LoraConfig) and training_args
    /// (TrainingArguments / DPOConfig names: beta, loss_type, precompute_ref_log_probs, …).
    #[arg(long, value_name = "FILE.yaml")]
    config: PathBuf,

    /// Override a config key, e.g. --set training_args.beta=0.5 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,

    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: DpoArgs) -> Result<()> {
    let cfg = DpoConfig::load(&args.config, &args.overrides)?;
    let summary = dpo(&cfg, std::io::stderr().is_terminal())
        .with_context(|| format!("DPO with {}", args.config.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    let names: Vec<String> = summary
        .loss_type
        .iter()
        .map(|l| format!("{l:?}").to_lowercase())
        .collect();
    println!(
        "DPO ({}, loss {}, β {}) on {} pairs: {} steps in {:.1} s ({:.3} s/step)",
        summary.method,
        names.join("+"),
        summary.beta,
        summary.train_pairs,
        summary.steps,
        summary.wall_seconds,
        summary.seconds_per_step
    );
    println!("  reference: {}", summary.reference);
    if let Some(path) = &summary.ref_logps_cache {
        println!(
            "  reference log-probs {} {}",
            if summary.ref_logps_cache_hit {
                "reused from"
            } else {
                "cached in"
            },
            path.display()
        );
    }
    if summary.skipped_pairs > 0 {
        println!("  skipped {} invalid pairs", summary.skipped_pairs);
    }
    let metric = |m: &std::collections::BTreeMap<String, f64>, k: &str| {
        m.get(k).map_or("-".to_string(), |v| format!("{v:.3}"))
    };
    if let Some(loss) = summary.final_loss {
        println!(
            "  train: loss {loss:.4} · rewards/accuracies {} · rewards/margins {}",
            metric(&summary.train_metrics, "rewards/accuracies"),
            metric(&summary.train_metrics, "rewards/margins")
        );
    }
    if !summary.eval_metrics.is_empty() {
        println!(
            "  held-out ({} pairs): rewards/accuracies {} → {} · rewards/margins {} → {} · loss {} → {}",
            summary.eval_pairs,
            metric(&summary.eval_metrics_before, "rewards/accuracies"),
            metric(&summary.eval_metrics, "rewards/accuracies"),
            metric(&summary.eval_metrics_before, "rewards/margins"),
            metric(&summary.eval_metrics, "rewards/margins"),
            metric(&summary.eval_metrics_before, "loss"),
            metric(&summary.eval_metrics, "loss"),
        );
    }
    if let Some(rss) = summary.peak_rss_bytes {
        println!("  peak memory {:.1} MiB", rss as f64 / (1024.0 * 1024.0));
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
    if let Some(curve) = &summary.rewards_curve {
        println!("  rewards curve {}", curve.display());
    }
    Ok(())
}
