//! The model-selection flags every command shares.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use kiln_model::{LoadOptions, LoadedModel};

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A model directory as transformers writes it, or a hub id (ORG/NAME[@REVISION]) already in
    /// the local Hugging Face cache ($HF_HOME/hub).
    #[arg(long, value_name = "M")]
    pub model: String,

    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long, value_name = "A")]
    pub adapter: Option<PathBuf>,

    /// Compute dtype: f32, f16 or bf16 (default: f32 on CPU).
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<String>,
}

impl ModelArgs {
    /// Loads the model; an adapter is merged into the weights, which is exact and makes
    /// inference cost what the base model costs.
    pub fn load(&self) -> Result<LoadedModel> {
        let dtype = self
            .dtype
            .as_deref()
            .map(|d| match kiln_core::config::parse_dtype(d) {
                Some(t) => Ok(t),
                None => anyhow::bail!("--dtype {d}: expected f32, f16 or bf16"),
            })
            .transpose()?;
        let options = LoadOptions {
            device: Device::Cpu,
            dtype: dtype.or(Some(DType::F32)),
            adapter: self.adapter.clone(),
            merge_adapter: true,
        };
        LoadedModel::load(&self.model, &options)
            .with_context(|| format!("loading model `{}`", self.model))
    }
}
