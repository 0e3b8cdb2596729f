//! `kiln eval logps`: the summed completion log-probs of preference pairs, with TRL
//! DPOTrainer's semantics (EOS appended to text completions, prompt and completion tokenized
//! as TRL does, the prompt masked).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use kiln_train::dpo::{Truncation, pair_logps};
use kiln_train::pref_data::{InvalidPairs, PairRecipe, PrefDataOptions, load_preference_dataset};

use crate::model_args::ModelArgs;

#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  kiln eval logps --model testdata/hf/llama --data prefs.jsonl --json"
)]
pub struct EvalLogpsArgs {
    #[command(flatten)]
    model: ModelArgs,

    /// Preference pairs: JSONL or Parquet rows of {"prompt", "chosen", "rejected"} (strings or
    /// message lists), as `kiln dpo` reads them.
    #[arg(long, value_name = "PREFS.jsonl")]
    data: PathBuf,

    /// Pairs per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,

    /// Print one JSON line per row: {"chosen_logps", "rejected_logps"}.
    #[arg(long)]
    json: bool,
}

pub fn run(args: EvalLogpsArgs) -> Result<()> {
    let loaded = args.model.load()?;
    let max_length = loaded.config.max_position_embeddings;
    // Every row is scored: a pair that cannot be is an error naming it, never a silent gap.
    let opts = PrefDataOptions {
        max_length,
        recipe: PairRecipe::Dpo,
        on_invalid: InvalidPairs::Error,
    };
    let data = load_preference_dataset(&args.data, &loaded.tokenizer, &opts)
        .with_context(|| format!("reading {}", args.data.display()))?;
    let pad = loaded
        .config
        .pad_token_id
        .or_else(|| loaded.tokenizer.eos_token_id())
        .unwrap_or(0);
    let logps = pair_logps(
        &loaded.model,
        &data.pairs,
        args.batch_size,
        (max_length, Truncation::KeepStart, pad),
        |_| {},
    )
    .with_context(|| format!("scoring {}", args.data.display()))?;
    for (pair, (chosen, rejected)) in data.pairs.iter().zip(&logps) {
        if args.json {
            println!(
                "{}",
                serde_json::json!({"chosen_logps": chosen, "rejected_logps": rejected})
            );
        } else {
            println!(
                "{}: chosen {chosen:.4}  rejected {rejected:.4}  ({} over {} + {} completion tokens)",
                pair.row,
                if chosen > rejected {
                    "prefers chosen"
                } else {
                    "prefers rejected"
                },
                pair.chosen_ids.len(),
                pair.rejected_ids.len()
            );
        }
    }
    Ok(())
}
