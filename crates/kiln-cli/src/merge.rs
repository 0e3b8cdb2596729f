//! `kiln merge`: fold a LoRA adapter into its base model and save the result as a plain model
//! directory that transformers and kiln load without PEFT.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use kiln_model::{LoadOptions, LoadedModel, save_model_dir};

#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  kiln merge --model testdata/hf/llama --adapter testdata/hf/llama-lora --out /tmp/llama-merged"
)]
pub struct MergeArgs {
    /// The base model: a directory as transformers writes it, or a hub id in the local cache.
    #[arg(long, value_name = "M")]
    model: String,

    /// The PEFT LoRA adapter directory to merge (adapter_config.json + adapter_model.safetensors).
    #[arg(long, value_name = "A")]
    adapter: PathBuf,

    /// The output directory; refused if it already holds a model.safetensors.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    /// Dtype of the saved weights: f32, f16 or bf16 (default: the base checkpoint's). The merge
    /// itself is computed in f32.
    #[arg(long, value_name = "DTYPE")]
    dtype: Option<String>,
}

pub fn run(args: MergeArgs) -> Result<()> {
    let save_dtype = args
        .dtype
        .as_deref()
        .map(|d| match kiln_core::config::parse_dtype(d) {
            Some(t) => Ok(t),
            None => anyhow::bail!("--dtype {d}: expected f32, f16 or bf16"),
        })
        .transpose()?;
    let existing = args.out.join("model.safetensors");
    if existing.exists() {
        anyhow::bail!(
            "{}: already exists; refusing to overwrite a model (choose another --out or remove it)",
            existing.display()
        );
    }
    let options = LoadOptions {
        device: Device::Cpu,
        dtype: Some(DType::F32),
        adapter: Some(args.adapter.clone()),
        merge_adapter: true,
    };
    let loaded = LoadedModel::load(&args.model, &options).with_context(|| {
        format!(
            "loading model `{}` with adapter {}",
            args.model,
            args.adapter.display()
        )
    })?;
    let adapter = loaded
        .adapter
        .as_ref()
        .context("the adapter was not loaded")?;
    let dtype = save_dtype.unwrap_or(loaded.config.dtype);
    let saved = save_model_dir(&loaded.model, loaded.dir.root(), &args.out, dtype)
        .with_context(|| format!("saving the merged model to {}", args.out.display()))?;
    let replaced = if adapter.saved_modules.is_empty() {
        String::new()
    } else {
        format!(
            " and {} modules_to_save weights",
            adapter.saved_modules.len()
        )
    };
    println!(
        "merged {} LoRA modules{replaced} into {} -> {} ({} tensors, {}, {:.1} MB)",
        adapter.modules.len(),
        args.model,
        saved.dir.display(),
        saved.tensors,
        kiln_model::save::torch_dtype_name(dtype)?,
        saved.weights_bytes as f64 / 1e6
    );
    Ok(())
}
