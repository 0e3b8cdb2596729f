//! `kiln eval …`: scoring a model.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use crate::model_args::ModelArgs;

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Perplexity of a text file, with transformers' `labels=input_ids` semantics.
    #[command(
        after_help = "Example:\n  kiln eval perplexity --model testdata/hf/llama --text-file README.md --json"
    )]
    Perplexity(PerplexityArgs),
    /// Reward-model scores of `{"text"}` or `{"prompt","completion"}` rows, one JSON line each.
    Reward(crate::eval_reward::EvalRewardArgs),
    /// Summed completion log-probs of preference pairs, with TRL DPOTrainer semantics.
    Logps(crate::eval_logps::EvalLogpsArgs),
}

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,

    /// UTF-8 text, scored as one sequence (`tokenizer(text)`, BOS included).
    #[arg(long, value_name = "F")]
    text_file: PathBuf,

    /// Tokens per forward pass (default: the model's context length).
    #[arg(long)]
    window: Option<usize>,

    /// Tokens each window advances for texts longer than the window (default: window / 2).
    #[arg(long)]
    stride: Option<usize>,

    /// Print {"mean_nll", "perplexity", "tokens", "predicted_tokens"} as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Perplexity(args) => perplexity(args),
        EvalCommand::Reward(args) => crate::eval_reward::run(args),
        EvalCommand::Logps(args) => crate::eval_logps::run(args),
    }
}

fn perplexity(args: PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.text_file)
        .with_context(|| format!("reading {}", args.text_file.display()))?;
    let loaded = args.model.load()?;
    let ids = loaded.tokenizer.encode(&text, true)?;
    let window = args.window.unwrap_or(loaded.config.max_position_embeddings);
    let stride = args.stride.unwrap_or((window / 2).max(1));
    let bar = indicatif::ProgressBar::new(ids.len().saturating_sub(1) as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "scoring {bar:30} {pos}/{len} tokens · {per_sec} · eta {eta}",
        )?,
    );
    let result =
        kiln_model::perplexity_with_progress(&loaded.model, &ids, window, stride, |done, _| {
            bar.set_position(done as u64)
        })
        .with_context(|| format!("scoring {}", args.text_file.display()))?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!(
            "perplexity {:.4}  (mean NLL {:.6} over {} predicted tokens; window {window}, stride {stride})",
            result.perplexity, result.mean_nll, result.predicted_tokens
        );
    }
    Ok(())
}
