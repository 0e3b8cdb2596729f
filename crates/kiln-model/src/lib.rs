//! The transformer kiln trains and serves, and everything that runs it: LoRA, the KV cache,
//! sampling, generation and perplexity.
//!
//! There is exactly one model implementation ([`CausalLm`]). Its linear layers ([`Linear`]) are
//! dense, quantized or LoRA-wrapped in place; its forward pass is differentiable end to end and
//! takes candle's fused kernels only where no gradient is needed; inference state (the
//! [`KvCache`]) lives outside the weights and is passed in.

pub mod attention;
pub mod eval;
pub mod fused_layer;
mod gemm;
pub mod generation;
pub mod init;
pub mod kv_cache;
pub mod linear;
pub mod lora;
pub mod lora_train;
pub mod loss;
pub mod ops;
pub mod paged;
pub mod quant;
pub mod reward;
pub mod rope;
pub mod sampling;
pub mod save;
pub mod transformer;

#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::backprop::GradStore;
    use candle_core::{Result, Tensor, Var};

    /// Checks the gradients of a scalar `loss` of `inputs` against central differences at the
    /// first, middle and last coordinate of each input (steps of 0.01, in f64 around f32
    /// values).
    pub fn assert_matches_finite_differences(
        inputs: &[&Var],
        grads: &GradStore,
        loss: impl Fn(&[Tensor]) -> Result<f64>,
    ) -> Result<()> {
        let eps = 1e-2f32;
        let values: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().detach()).collect();
        for (which, var) in inputs.iter().enumerate() {
            let grad: Vec<f32> = grads.get(var).expect("gradient").flatten_all()?.to_vec1()?;
            let base: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
            for idx in [0, base.len() / 2, base.len() - 1] {
                let at = |delta: f32| -> Result<f64> {
                    let mut data = base.clone();
                    data[idx] += delta;
                    let mut moved = values.clone();
                    moved[which] = Tensor::from_vec(data, var.shape(), var.device())?;
                    loss(&moved)
                };
                let fd = (at(eps)? - at(-eps)?) / (2.0 * f64::from(eps));
                assert!(
                    (fd - f64::from(grad[idx])).abs() < 2e-3 * (1.0 + fd.abs()),
                    "input {which}[{idx}]: finite difference {fd} vs gradient {}",
                    grad[idx]
                );
            }
        }
        Ok(())
    }

    /// `Σ y·w` in f64: a scalar loss that weighs every output differently.
    pub fn weighted_sum(y: &Tensor, w: &Tensor) -> Result<f64> {
        let (y, w) = (
            y.to_dtype(candle_core::DType::F64)?,
            w.to_dtype(candle_core::DType::F64)?,
        );
        (y * w)?.sum_all()?.to_scalar::<f64>()
    }

    /// Largest absolute element-wise difference of two tensors of the same shape.
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff")
    }
}

use std::path::PathBuf;

use candle_core::{DType, Device};
use kiln_core::{GenerationConfig, ModelConfig, ModelDir, Result, SafetensorsWeights, Tokenizer};

pub use eval::{Perplexity, perplexity, perplexity_with_progress};
pub use generation::{FinishReason, GenerateParams, Generation, generate};
pub use kv_cache::KvCache;
pub use linear::{Linear, LinearWeight, LoraLayer};
pub use lora::{LoraAdapter, LoraConfig, TargetModules};
pub use paged::{PagedKvCache, PagedSeq};
pub use sampling::{Sampler, SamplingParams};
pub use save::{SavedModel, save_model_dir};
pub use transformer::{CausalLm, LinearLoader, Observer};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype; by default f32 on CPU, whatever the checkpoint was saved in.
    pub dtype: Option<DType>,
    /// A PEFT LoRA adapter directory to apply (its `modules_to_save` weights replace the base's).
    pub adapter: Option<PathBuf>,
    /// Fold the adapter into the base weights (faster inference) instead of applying it beside them.
    pub merge_adapter: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: None,
            adapter: None,
            merge_adapter: false,
        }
    }
}

/// A model directory loaded for use: config, weights (with any adapter), tokenizer.
#[derive(Debug)]
pub struct LoadedModel {
    pub dir: ModelDir,
    pub config: ModelConfig,
    pub generation_config: GenerationConfig,
    pub model: CausalLm,
    pub tokenizer: Tokenizer,
    pub adapter: Option<LoraAdapter>,
}

impl LoadedModel {
    /// Loads `spec`: a directory, a hub id found in the local Hugging Face cache, or a `.gguf`
    /// file. A directory whose `config.json` has a `quantization_config` (GPTQ, AWQ) loads its
    /// quantized layers as such ([`quant::checkpoint`]); an adapter on it is applied unmerged
    /// to those layers, since a quantized weight cannot absorb it (`merge_adapter` then merges
    /// into the dense layers only).
    pub fn load(spec: &str, options: &LoadOptions) -> Result<Self> {
        let as_path = std::path::Path::new(spec);
        if as_path.is_file()
            && as_path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            return quant::gguf::load_gguf(as_path, options);
        }
        let dir = ModelDir::resolve(spec)?;
        let config = dir.config()?;
        let quantization =
            quant::checkpoint::QuantizationConfig::from_config_file(&dir.file("config.json"))?;
        let generation_config = dir.generation_config()?;
        let dtype = options.dtype.unwrap_or(match options.device {
            Device::Cpu => DType::F32,
            _ => config.dtype,
        });
        let mut weights = SafetensorsWeights::open(&dir.weight_files()?)?;
        // The adapter's `modules_to_save` weights are base weights: they replace the
        // checkpoint's before the model is built; its LoRA updates attach afterwards.
        let adapter = match &options.adapter {
            Some(path) => {
                let adapter = LoraAdapter::load(path, dtype, &options.device)?;
                adapter.overlay(&mut weights)?;
                Some(adapter)
            }
            None => None,
        };
        let mut model = match &quantization {
            Some(qcfg) => quant::checkpoint::load_quantized_weights(
                weights,
                &config,
                qcfg,
                dtype,
                &options.device,
            )?,
            None => CausalLm::load(weights.into_var_builder(dtype, &options.device), &config)?,
        };
        if let Some(adapter) = &adapter {
            adapter.apply(&mut model)?;
            if options.merge_adapter {
                if quantization.is_some() {
                    for (_, linear) in model.linears_mut() {
                        if matches!(linear.weight(), LinearWeight::Dense(_)) {
                            linear.merge_lora()?;
                        }
                    }
                } else {
                    model.merge_lora()?;
                }
            }
        }
        let tokenizer = Tokenizer::from_dir(dir.root())?;
        Ok(Self {
            dir,
            config,
            generation_config,
            model,
            tokenizer,
            adapter,
        })
    }

    /// Every id that ends generation: `config.json`'s, `generation_config.json`'s and the
    /// tokenizer's EOS, deduplicated.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let mut ids = self.config.eos_token_ids.clone();
        ids.extend(self.generation_config.eos_token_ids());
        ids.extend(self.tokenizer.eos_token_id());
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}
