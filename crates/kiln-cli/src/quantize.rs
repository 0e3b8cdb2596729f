//! `kiln quantize`: RTN, GPTQ or AWQ to 4 or 8 bits, written as a GPTQ or AWQ checkpoint that
//! transformers-based tools and every kiln command load.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use kiln_model::quant::checkpoint::Format;
use kiln_quant::{Method, QuantSpec, QuantizeDirOptions, QuantizeReport};

#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  kiln quantize --model testdata/hf/llama --method gptq --bits 4 \
     --group-size 32 --samples 16 --seq-len 128 --out /tmp/llama-gptq"
)]
pub struct QuantizeArgs {
    /// The model to quantize: a directory as transformers writes it, or a cached hub id.
    #[arg(long, value_name = "M")]
    model: String,

    /// rtn (round-to-nearest, no calibration), gptq or awq.
    #[arg(long, value_parser = parse_method)]
    method: Method,

    /// 4 or 8.
    #[arg(long, value_parser = parse_bits)]
    bits: u8,

    /// Input features per group (scale and zero point); -1 for one group per output row.
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    group_size: i64,

    /// Symmetric quantization (zero point fixed at the middle code).
    #[arg(long)]
    sym: bool,

    /// GPTQ: quantize columns in order of decreasing activation (`desc_act`).
    #[arg(long)]
    act_order: bool,

    /// Calibration text: JSONL rows with a "text" field, or plain text with documents separated
    /// by blank lines (default: the synthetic world's corpus).
    #[arg(long, value_name = "FILE")]
    calibration: Option<PathBuf>,

    /// Calibration windows.
    #[arg(long, default_value_t = 128)]
    samples: usize,

    /// Tokens per calibration window (at most the model's context length).
    #[arg(long, default_value_t = 512)]
    seq_len: usize,

    /// Output model directory.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    /// Checkpoint layout: gptq or awq (default: awq for 4-bit AWQ, gptq otherwise).
    #[arg(long, value_parser = parse_format)]
    format: Option<Format>,

    /// GPTQ: initial dampening, as a fraction of the Hessian's mean diagonal.
    #[arg(long, default_value_t = 0.01)]
    damp: f64,

    /// Text to measure perplexity before and after on (default: a held-out tenth of the
    /// calibration documents).
    #[arg(long, value_name = "FILE")]
    eval_text: Option<PathBuf>,

    /// Skip the perplexity measurement.
    #[arg(long)]
    no_eval: bool,

    /// Seed of the calibration windows.
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_method(s: &str) -> Result<Method, String> {
    s.parse()
}

fn parse_bits(s: &str) -> Result<u8, String> {
    match s {
        "4" => Ok(4),
        "8" => Ok(8),
        other => Err(format!("`{other}`: kiln quantizes to 4 or 8 bits")),
    }
}

fn parse_format(s: &str) -> Result<Format, String> {
    match s {
        "gptq" => Ok(Format::Gptq),
        "awq" => Ok(Format::Awq),
        other => Err(format!("`{other}`: expected gptq or awq")),
    }
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    let group_size = match args.group_size {
        -1 => None,
        g if g > 0 => Some(g as usize),
        g => anyhow::bail!("--group-size {g}: expected a positive size or -1"),
    };
    let spec = QuantSpec {
        bits: args.bits,
        group_size,
        sym: args.sym,
    };
    let mut opts = QuantizeDirOptions::new(&args.model, &args.out, args.method, spec);
    opts.act_order = args.act_order;
    opts.percdamp = args.damp;
    opts.calibration = args.calibration;
    opts.eval_text = args.eval_text;
    opts.samples = args.samples;
    opts.seq_len = args.seq_len;
    opts.seed = args.seed;
    opts.format = args.format;
    opts.evaluate = !args.no_eval;
    opts.progress = !args.json;
    let report =
        kiln_quant::quantize_dir(&opts).with_context(|| format!("quantizing `{}`", args.model))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", summary(&report));
    }
    Ok(())
}

/// The report as a person reads it.
pub fn summary(r: &QuantizeReport) -> String {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let group = if r.group_size < 0 {
        "per row".to_string()
    } else {
        format!("group {}", r.group_size)
    };
    let mut s = format!(
        "{} {}-bit ({group}, {}{}) → {} ({} layout)\n",
        r.method.to_uppercase(),
        r.bits,
        if r.sym { "sym" } else { "asym" },
        if r.act_order { ", act-order" } else { "" },
        r.out.display(),
        r.format,
    );
    s += &format!(
        "  calibration    {} windows × {} tokens from {}\n",
        r.samples, r.seq_len, r.calibration
    );
    s += &format!(
        "  size on disk   {:.2} MiB → {:.2} MiB ({:.1}× smaller)\n",
        mib(r.source_bytes),
        mib(r.quantized_bytes),
        r.source_bytes as f64 / r.quantized_bytes.max(1) as f64
    );
    s += &format!(
        "  bits/weight    {:.2} in the {} quantized weights; {:.2} over the whole file\n",
        r.bits_per_weight, r.quantized_weights, r.model_bits_per_weight
    );
    if let (Some(before), Some(after)) = (r.perplexity_before, r.perplexity_after) {
        s += &format!(
            "  perplexity     {before:.4} → {after:.4} ({:+.2}%) on {} held-out tokens\n",
            100.0 * (after / before - 1.0),
            r.eval_tokens
        );
    }
    s += &format!("  took           {:.1} s\n", r.seconds);
    s
}
