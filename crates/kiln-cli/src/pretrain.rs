//! `kiln pretrain`: train a Llama from scratch on a text corpus.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use kiln_train::pretrain::{PretrainConfig, pretrain};

#[derive(Args, Debug)]
#[command(
    after_help = "Example (a config file with at least dataset_path and output_dir):\n  \
    kiln pretrain --config pretrain.yaml --set max_steps=200 --set learning_rate=3e-4"
)]
pub struct PretrainArgs {
    /// YAML config: one flat mapping with Hugging Face key names (see docs/pretrain.md).
    #[arg(long, value_name = "FILE.yaml")]
    config: PathBuf,

    /// Override a config key, e.g. --set max_steps=100 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,

    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: PretrainArgs) -> Result<()> {
    let cfg = PretrainConfig::load(&args.config, &args.overrides)?;
    let summary = pretrain(&cfg, std::io::stderr().is_terminal())
        .with_context(|| format!("pretraining with {}", args.config.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    println!(
        "pretrained {} parameters (vocab {}) in {:.1} s",
        summary.parameters, summary.vocab_size, summary.wall_seconds
    );
    println!(
        "  {} steps · {} tokens trained · {:.0} tokens/s",
        summary.steps, summary.tokens_trained, summary.tokens_per_second
    );
    if let Some(loss) = summary.final_loss {
        println!("  final train loss {loss:.4}");
    }
    if let (Some(loss), Some(ppl)) = (summary.eval_loss, summary.eval_perplexity) {
        println!("  eval loss {loss:.4} (perplexity {ppl:.2})");
    }
    println!("  model directory {}", summary.output_dir.display());
    if let Some(curve) = &summary.loss_curve {
        println!("  loss curve {}", curve.display());
    }
    Ok(())
}
