//! `kiln generate`: sample a continuation of a prompt, streamed to stdout.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use kiln_core::tokenizer::IncrementalDecoder;
use kiln_model::{GenerateParams, SamplingParams, generate};
use serde::Serialize;

use crate::model_args::ModelArgs;

/// Example: kiln generate --model testdata/hf/llama --prompt "The model learns" --max-tokens 16 --seed 1
#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  kiln generate --model testdata/hf/llama --prompt \"The model learns\" --max-tokens 16 --temperature 0 --json"
)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,

    /// The prompt, encoded as `tokenizer(prompt)` encodes it (BOS included).
    #[arg(long)]
    prompt: String,

    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,

    /// New tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,

    /// 0 is greedy. Default: the checkpoint's generation_config.json when it samples, else 0.
    #[arg(long)]
    temperature: Option<f32>,

    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long)]
    top_p: Option<f32>,

    /// Keep only the K most likely tokens (0: all).
    #[arg(long)]
    top_k: Option<usize>,

    /// Drop tokens less likely than P times the most likely one.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,

    /// Penalise tokens already in the prompt or the output (1: off).
    #[arg(long)]
    repetition_penalty: Option<f32>,

    /// Random seed: the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// Keep generating past EOS until --max-tokens.
    #[arg(long)]
    ignore_eos: bool,

    /// Print one JSON object {text, prompt_token_ids, token_ids, finish_reason} instead of streaming.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct GenerateOutput {
    text: String,
    prompt_token_ids: Vec<u32>,
    token_ids: Vec<u32>,
    finish_reason: kiln_model::FinishReason,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let loaded = args.model.load()?;
    let tok = &loaded.tokenizer;
    let prompt_ids = if args.chat {
        let messages = serde_json::json!([{"role": "user", "content": args.prompt}]);
        let text = tok.apply_chat_template(&messages, true)?;
        // apply_chat_template(tokenize=True) encodes the rendered text without adding specials.
        tok.encode(&text, false)?
    } else {
        tok.encode(&args.prompt, true)?
    };

    let gen_cfg = &loaded.generation_config;
    let samples_by_default = gen_cfg.do_sample == Some(true);
    let sampling = SamplingParams {
        temperature: args.temperature.unwrap_or(if samples_by_default {
            gen_cfg.temperature.unwrap_or(1.0) as f32
        } else {
            0.0
        }),
        top_p: args
            .top_p
            .or(samples_by_default
                .then_some(gen_cfg.top_p)
                .flatten()
                .map(|p| p as f32))
            .unwrap_or(1.0),
        top_k: args
            .top_k
            .or(samples_by_default.then_some(gen_cfg.top_k).flatten())
            .unwrap_or(0),
        min_p: args.min_p,
        repetition_penalty: args
            .repetition_penalty
            .or(gen_cfg.repetition_penalty.map(|p| p as f32))
            .unwrap_or(1.0),
        seed: args.seed,
    };
    sampling.validate().map_err(anyhow::Error::msg)?;
    let params = GenerateParams {
        max_new_tokens: args.max_tokens,
        sampling,
        eos_token_ids: loaded.eos_token_ids(),
        ignore_eos: args.ignore_eos,
        use_kv_cache: true,
    };

    let started = Instant::now();
    let mut first_token_at = None;
    // Text is decoded as `tokenizer.decode(ids)` does, special tokens included, except the EOS
    // that ends generation, which is the end of the text rather than part of it.
    let stops = |id: u32| !args.ignore_eos && params.eos_token_ids.contains(&id);
    let mut decoder = IncrementalDecoder::new(false);
    let mut stdout = std::io::stdout().lock();
    let mut stream_error = None;
    let generation = generate(&loaded.model, &prompt_ids, &params, |id| {
        first_token_at.get_or_insert_with(Instant::now);
        if args.json || stream_error.is_some() || stops(id) {
            return;
        }
        let printed = decoder
            .push(tok, id)
            .map_err(anyhow::Error::from)
            .and_then(|delta| match delta {
                Some(text) => Ok(write!(stdout, "{text}").and_then(|()| stdout.flush())?),
                None => Ok(()),
            });
        if let Err(e) = printed {
            stream_error = Some(e);
        }
    })
    .context("generation failed")?;
    if let Some(e) = stream_error {
        return Err(e);
    }
    let elapsed = started.elapsed();
    let text_ids = match generation.token_ids.split_last() {
        Some((&last, rest)) if stops(last) => rest,
        _ => &generation.token_ids[..],
    };
    let text = tok.decode(text_ids, false)?;

    if args.json {
        let out = GenerateOutput {
            text,
            prompt_token_ids: prompt_ids,
            token_ids: generation.token_ids,
            finish_reason: generation.finish_reason,
        };
        writeln!(stdout, "{}", serde_json::to_string(&out)?)?;
    } else {
        writeln!(stdout)?;
        let n = generation.token_ids.len();
        let ttft = first_token_at.map_or(elapsed, |t| t - started);
        let decode = elapsed.saturating_sub(ttft);
        let rate = if n > 1 {
            (n - 1) as f64 / decode.as_secs_f64().max(1e-9)
        } else {
            0.0
        };
        eprintln!(
            "[{} prompt tokens, {n} new, finish: {:?}; first token {:.1} ms, decode {rate:.1} tokens/s]",
            prompt_ids.len(),
            generation.finish_reason,
            ttft.as_secs_f64() * 1e3,
        );
    }
    Ok(())
}
