//! `kiln export gguf`: write a model directory as a GGUF file that llama.cpp, Ollama and kiln
//! itself load (see `docs/gguf.md`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use kiln_model::quant::gguf::{ExportProgress, GgufType, export_gguf, ggml_type_name};

#[derive(Subcommand, Debug)]
pub enum ExportCommand {
    /// A GGUF file for llama.cpp and Ollama: weights in f16, q8_0, q4_0 or q4_k_m, with the
    /// hyperparameters, tokenizer and chat template as metadata.
    Gguf(GgufArgs),
}

#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  kiln export gguf --model testdata/hf/llama --type q4_k_m --out /tmp/llama.gguf"
)]
pub struct GgufArgs {
    /// The model: a directory as transformers writes it, or a hub id in the local cache.
    #[arg(long, value_name = "M")]
    model: String,

    /// The tensor types: f16, q8_0, q4_0 or q4_k_m (llama-quantize's mixes of those names).
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_type)]
    ty: GgufType,

    /// The GGUF file to write (replaced if it exists).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

fn parse_type(s: &str) -> std::result::Result<GgufType, String> {
    s.parse()
}

pub fn run(cmd: ExportCommand) -> Result<()> {
    match cmd {
        ExportCommand::Gguf(args) => gguf(args),
    }
}

fn gguf(args: GgufArgs) -> Result<()> {
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "quantizing {bar:30} {pos}/{len} tensors {msg:.dim}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let progress = |p: ExportProgress<'_>| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
        bar.set_message(p.tensor.to_string());
    };
    let report = export_gguf(&args.model, args.ty, &args.out, &progress).with_context(|| {
        format!(
            "exporting `{}` to {} as {}",
            args.model,
            args.out.display(),
            args.ty
        )
    })?;
    bar.finish_and_clear();

    println!(
        "wrote {} ({} architecture, {}): {} tensors",
        report.path.display(),
        report.architecture,
        report.file_type,
        report.tensors()
    );
    for (ty, n) in &report.tensors_by_type {
        println!("  {ty:<5} {n:>5} tensors");
    }
    if !report.fallbacks.is_empty() {
        println!(
            "  {} tensors fell back to another type (rows not whole blocks of the wanted one):",
            report.fallbacks.len()
        );
        for f in &report.fallbacks {
            println!(
                "    {}: {} -> {}",
                f.tensor,
                ggml_type_name(f.wanted),
                ggml_type_name(f.used)
            );
        }
    }
    println!(
        "  size on disk {:.2} MB ({} bytes), {:.2} bits per weight over {} values",
        report.file_bytes as f64 / 1e6,
        report.file_bytes,
        report.bits_per_weight(),
        report.elements
    );
    Ok(())
}
