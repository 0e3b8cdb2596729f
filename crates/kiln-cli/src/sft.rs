//! `kiln sft`: supervised fine-tuning with LoRA (PEFT-compatible adapters) or in full.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use kiln_train::sft::{SftConfig, sft};

#[derive(Args, Debug)]
#[command(after_help = "Example (see docs/sft.md for the whole vocabulary):\n  \
    kiln sft --config sft.yaml --set training_args.max_steps=200 --set peft_config.r=8")]
pub struct SftArgs {
    /// YAML config: model_id, dataset_path, peft_config (PEFT's LoraConfig) and training_args
    /// (TrainingArguments / SFTConfig names).
    #[arg(long, value_name = "FILE.yaml")]
    config: PathBuf,

    /// Override a config key, e.g. --set training_args.learning_rate=2e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,

    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: SftArgs) -> Result<()> {
    let cfg = SftConfig::load(&args.config, &args.overrides)?;
    let summary = sft(&cfg, std::io::stderr().is_terminal())
        .with_context(|| format!("fine-tuning with {}", args.config.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    println!(
        "fine-tuned ({}) {} of {} parameters ({:.2}%) in {:.1} s",
        summary.method,
        summary.trainable_parameters,
        summary.total_parameters,
        100.0 * summary.trainable_parameters as f64 / summary.total_parameters.max(1) as f64,
        summary.wall_seconds
    );
    println!(
        "  {} steps · {:.2} epochs of {} {} examples · {:.3} s/step · {:.0} tokens/s",
        summary.steps,
        summary.epochs,
        summary.train_examples,
        summary.dataset_format,
        summary.seconds_per_step,
        summary.tokens_per_second
    );
    println!(
        "  optimizer {} · state {:.2} MiB",
        summary.optimizer,
        mib(summary.optimizer_state_bytes)
    );
    if let Some(loss) = summary.final_loss {
        println!("  final train loss {loss:.4}");
    }
    if let Some(loss) = summary.eval_loss {
        println!(
            "  eval loss {loss:.4} on {} examples",
            summary.eval_examples
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
