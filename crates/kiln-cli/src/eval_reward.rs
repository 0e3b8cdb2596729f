//! `kiln eval reward`: a reward model's score of each row of a JSONL file, computed as
//! transformers' `AutoModelForSequenceClassification` computes it (`tokenizer(text)`, the score
//! read at the last token that is not padding).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use clap::Args;
use kiln_core::Tokenizer;
use kiln_model::reward::RewardModel;
use serde_json::Value;

#[derive(Args, Debug)]
#[command(after_help = "Example:\n  \
    kiln eval reward --model testdata/hf/llama-reward --data rows.jsonl --json\n\n\
    Rows: {\"text\": ...}, or {\"prompt\": ..., \"completion\": ...} scored as prompt + completion\n\
    (message lists are rendered with the chat template).")]
pub struct EvalRewardArgs {
    /// A reward model directory (written by `kiln reward`, or by transformers with
    /// `num_labels=1`), or a hub id in the local Hugging Face cache.
    #[arg(long, value_name = "M")]
    model: String,

    /// JSONL rows: {"text"} or {"prompt", "completion"}.
    #[arg(long, value_name = "FILE.jsonl")]
    data: PathBuf,

    /// Rows per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,

    /// Compute dtype: f32, f16 or bf16 (default f32).
    #[arg(long, value_name = "DTYPE")]
    dtype: Option<String>,

    /// Print one JSON line per row: {"score": f}.
    #[arg(long)]
    json: bool,
}

/// One row to score: where it is, its text (for the table) and its tokens.
struct Row {
    line: usize,
    preview: String,
    ids: Vec<u32>,
}

pub fn run(args: EvalRewardArgs) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size: must be at least 1");
    }
    let dtype = match args.dtype.as_deref() {
        None => DType::F32,
        Some(d) => match kiln_core::config::parse_dtype(d) {
            Some(t) => t,
            None => bail!("--dtype {d}: expected f32, f16 or bf16"),
        },
    };
    let model = RewardModel::load(Path::new(&args.model), dtype, &Device::Cpu)
        .with_context(|| format!("loading reward model `{}`", args.model))?;
    let dir = kiln_core::ModelDir::resolve(&args.model)?;
    let tokenizer = Tokenizer::from_dir(dir.root())?;
    let max_tokens = model.backbone().config().max_position_embeddings;
    // Every row is read and checked before the first is scored.
    let rows = read_rows(&args.data, &tokenizer, max_tokens)?;

    // Rows of similar length share a forward pass; the output keeps the file's order.
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| rows[i].ids.len());
    let bar = if std::io::stderr().is_terminal() && rows.len() > args.batch_size {
        indicatif::ProgressBar::new(rows.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut scores = vec![0f32; rows.len()];
    for chunk in order.chunks(args.batch_size) {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| rows[i].ids.clone()).collect();
        let got = model
            .score_rows(&batch)
            .with_context(|| format!("scoring {}", args.data.display()))?;
        for (&i, s) in chunk.iter().zip(got) {
            scores[i] = s;
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();

    match print_scores(&args, &rows, &scores) {
        // `kiln eval reward … | head`: the reader left; not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn print_scores(args: &EvalRewardArgs, rows: &[Row], scores: &[f32]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    let file = args.data.display();
    for (row, score) in rows.iter().zip(scores) {
        if args.json {
            writeln!(out, "{}", serde_json::json!({ "score": score }))?;
        } else {
            writeln!(out, "{file}:{:<5} {score:>10.4}  {}", row.line, row.preview)?;
        }
    }
    if !args.json && !scores.is_empty() {
        let mean = scores.iter().map(|&s| f64::from(s)).sum::<f64>() / scores.len() as f64;
        writeln!(out, "{} rows · mean score {mean:.4}", scores.len())?;
    }
    out.flush()
}

/// Reads every row of `path`; errors name `file:line`.
fn read_rows(path: &Path, tokenizer: &Tokenizer, max_tokens: usize) -> Result<Vec<Row>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("{at}: invalid JSON"))?;
        let (text, ids) = encode_row(&value, tokenizer).with_context(|| at.clone())?;
        if ids.is_empty() {
            bail!("{at}: the row has no tokens to score");
        }
        if ids.len() > max_tokens {
            bail!(
                "{at}: {} tokens, above the model's max_position_embeddings ({max_tokens})",
                ids.len()
            );
        }
        rows.push(Row {
            line: i + 1,
            preview: preview(&text),
            ids,
        });
    }
    if rows.is_empty() {
        bail!("{}: no rows to score", path.display());
    }
    Ok(rows)
}

/// The row's text and tokens: `tokenizer(text)` for text (special tokens added as the
/// post-processor adds them, no EOS appended); the chat template's rendering of
/// `prompt + completion` for message lists.
fn encode_row(value: &Value, tokenizer: &Tokenizer) -> Result<(String, Vec<u32>)> {
    let Value::Object(row) = value else {
        bail!("expected a JSON object with `text`, or `prompt` and `completion`");
    };
    match (row.get("text"), row.get("prompt"), row.get("completion")) {
        (Some(Value::String(text)), _, _) => Ok((text.clone(), tokenizer.encode(text, true)?)),
        (Some(other), _, _) => bail!("`text`: expected a string, found {other}"),
        (None, Some(Value::String(p)), Some(Value::String(c))) => {
            let text = format!("{p}{c}");
            let ids = tokenizer.encode(&text, true)?;
            Ok((text, ids))
        }
        (None, Some(Value::Array(p)), Some(Value::Array(c))) => {
            let messages: Vec<Value> = p.iter().chain(c).cloned().collect();
            let text = tokenizer.apply_chat_template(&messages, false)?;
            let ids = tokenizer.encode(&text, false)?;
            Ok((text, ids))
        }
        (None, Some(_), Some(_)) => {
            bail!("`prompt` and `completion`: expected two strings or two lists of messages")
        }
        (None, _, _) => bail!("expected a `text` column, or `prompt` and `completion` columns"),
    }
}

/// `text` on one line (runs of whitespace as one space), at most 60 characters.
fn preview(text: &str) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out: String = flat.chars().take(60).collect();
    if out.len() < flat.len() {
        out.push('…');
    }
    out
}
