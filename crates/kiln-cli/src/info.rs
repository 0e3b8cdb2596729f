//! `kiln info`: what a checkpoint is, without running it.

use anyhow::{Context, Result};
use clap::Args;
use kiln_core::{ModelDir, RopeScaling};
use serde::Serialize;

#[derive(Args, Debug)]
#[command(after_help = "Example:\n  kiln info --model testdata/hf/llama")]
pub struct InfoArgs {
    /// A model directory, or a hub id in the local Hugging Face cache.
    #[arg(long, value_name = "M")]
    model: String,

    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Info {
    path: String,
    architecture: &'static str,
    parameters: usize,
    dtype: String,
    context_length: usize,
    layers: usize,
    hidden_size: usize,
    intermediate_size: usize,
    attention_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab_size: usize,
    tied_embeddings: bool,
    rope_theta: f64,
    rope_scaling: String,
    sliding_window: Option<usize>,
    weight_files: usize,
}

pub fn run(args: InfoArgs) -> Result<()> {
    let dir = ModelDir::resolve(&args.model)?;
    let cfg = dir
        .config()
        .with_context(|| format!("reading `{}`", args.model))?;
    let weight_files = dir.weight_files()?.len();
    let info = Info {
        path: dir.root().display().to_string(),
        architecture: cfg.architecture.hf_name(),
        parameters: cfg.num_parameters(),
        dtype: format!("{:?}", cfg.dtype).to_lowercase(),
        context_length: cfg.max_position_embeddings,
        layers: cfg.num_layers,
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        attention_heads: cfg.num_heads,
        kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        vocab_size: cfg.vocab_size,
        tied_embeddings: cfg.tie_word_embeddings,
        rope_theta: cfg.rope.theta,
        rope_scaling: match cfg.rope.scaling {
            RopeScaling::None => "none".into(),
            RopeScaling::Linear { factor } => format!("linear x{factor}"),
            RopeScaling::Llama3 { factor, .. } => format!("llama3 x{factor}"),
        },
        sliding_window: cfg.sliding_window,
        weight_files,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    println!("{}", info.path);
    println!("  architecture    {}", info.architecture);
    println!(
        "  parameters      {} ({})",
        info.parameters,
        human(info.parameters)
    );
    println!("  dtype           {}", info.dtype);
    println!("  context length  {}", info.context_length);
    println!(
        "  layers {} · hidden {} · mlp {} · heads {} (kv {}) · head dim {} · vocab {}",
        info.layers,
        info.hidden_size,
        info.intermediate_size,
        info.attention_heads,
        info.kv_heads,
        info.head_dim,
        info.vocab_size
    );
    println!(
        "  rope θ={} scaling {} · tied embeddings {} · sliding window {}",
        info.rope_theta,
        info.rope_scaling,
        info.tied_embeddings,
        info.sliding_window
            .map_or("none".to_string(), |w| w.to_string())
    );
    println!("  weights in {} safetensors file(s)", info.weight_files);
    Ok(())
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}
