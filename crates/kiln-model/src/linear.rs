//! The one linear layer of the model. Its weight is dense or quantized, and it may carry a LoRA
//! adapter: quantization and LoRA are properties of the layer, so a model is never copied to be
//! adapted or quantized, and the training and inference paths share every line.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::quant::PackedWeight;

/// The frozen (or trainable) base weight, `[out_features, in_features]` when dense.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    Dense(Tensor),
    /// A GGML block-quantized weight; matmuls run on the quantized blocks directly.
    Quantized(QMatMul),
    /// 4- or 8-bit codes with a scale and offset per group (RTN, GPTQ, AWQ, GGUF), multiplied by
    /// kiln's own kernels (`quant::PackedWeight`).
    Packed(Arc<PackedWeight>),
}

/// A LoRA update `scale · B·A` (Hu et al., 2021, <https://arxiv.org/abs/2106.09685>) applied
/// beside the base weight: `y = W·x + scale · B·(A·dropout(x))`, as PEFT computes it.
///
/// Dropout applies only in training passes, which are those where the adapter's weights are
/// trainable variables: an adapter loaded for inference, or the detached view an evaluation
/// runs on, never drops anything.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    /// `[r, in_features]`
    pub a: Tensor,
    /// `[out_features, r]`
    pub b: Tensor,
    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
    pub scale: f64,
    /// PEFT's `lora_dropout`: the probability of zeroing an input of A in a training pass.
    pub dropout: f32,
    masks: DropoutStream,
}

/// Seeds of successive dropout masks: one per training pass, shared by the clones of a layer so
/// that the fused and composed paths of one pass draw the same mask.
#[derive(Debug, Clone, Default)]
struct DropoutStream {
    seed: u64,
    passes: Arc<AtomicU64>,
}

impl LoraLayer {
    /// An adapter without dropout.
    pub fn new(a: Tensor, b: Tensor, scale: f64) -> Self {
        Self {
            a,
            b,
            scale,
            dropout: 0.0,
            masks: DropoutStream::default(),
        }
    }

    /// Drops each input of A with probability `p` in training passes, masks drawn from `seed`.
    pub fn with_dropout(mut self, p: f32, seed: u64) -> Self {
        self.dropout = p;
        self.masks = DropoutStream {
            seed,
            passes: Arc::new(AtomicU64::new(0)),
        };
        self
    }

    /// Whether this pass trains the adapter (its weights are variables of a graph).
    pub fn is_training(&self) -> bool {
        self.a.track_op() || self.b.track_op()
    }

    /// The seed of the next training pass's dropout mask, or `None` when nothing is dropped.
    pub(crate) fn next_mask_seed(&self) -> Option<u64> {
        (self.dropout > 0.0 && self.is_training()).then(|| {
            let pass = self.masks.passes.fetch_add(1, Ordering::Relaxed);
            crate::ops::mix64(self.masks.seed ^ crate::ops::mix64(pass))
        })
    }

    /// The same adapter outside any graph (see [`Linear::detached`]).
    fn detached(&self) -> Self {
        Self {
            a: self.a.detach(),
            b: self.b.detach(),
            ..self.clone()
        }
    }
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    lora: Option<LoraLayer>,
    in_features: usize,
    out_features: usize,
}

impl Linear {
    /// Loads `weight` (and `bias` when asked) under `vb`.
    pub fn load(
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = vb.get((out_features, in_features), "weight")?;
        let bias = if bias {
            Some(vb.get(out_features, "bias")?)
        } else {
            None
        };
        Self::new(weight, bias)
    }

    /// A dense layer from a `[out, in]` weight.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        Ok(Self {
            weight: LinearWeight::Dense(weight),
            bias,
            lora: None,
            in_features,
            out_features,
        })
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn lora(&self) -> Option<&LoraLayer> {
        self.lora.as_ref()
    }

    /// The same layer on the same storage, outside any autograd graph: for evaluation passes of
    /// a model being trained (it sees every in-place update of the weights).
    pub fn detached(&self) -> Self {
        Self {
            weight: match &self.weight {
                LinearWeight::Dense(w) => LinearWeight::Dense(w.detach()),
                LinearWeight::Quantized(q) => LinearWeight::Quantized(q.clone()),
                LinearWeight::Packed(p) => LinearWeight::Packed(p.clone()),
            },
            bias: self.bias.as_ref().map(Tensor::detach),
            lora: self.lora.as_ref().map(LoraLayer::detached),
            ..*self
        }
    }

    /// Attaches (or replaces) a LoRA update, applied unmerged.
    pub fn set_lora(&mut self, lora: LoraLayer) -> Result<()> {
        let (r, a_in) = lora.a.dims2()?;
        let (b_out, b_r) = lora.b.dims2()?;
        if a_in != self.in_features || b_out != self.out_features || b_r != r {
            candle_core::bail!(
                "LoRA shapes A {:?} / B {:?} do not fit a linear layer of {} -> {} (expected A [r, {}], B [{}, r])",
                lora.a.dims(),
                lora.b.dims(),
                self.in_features,
                self.out_features,
                self.in_features,
                self.out_features
            );
        }
        self.lora = Some(lora);
        Ok(())
    }

    pub fn remove_lora(&mut self) -> Option<LoraLayer> {
        self.lora.take()
    }

    /// The LoRA delta `scale · B·A` as a `[out, in]` matrix.
    fn lora_delta(lora: &LoraLayer, dtype: DType) -> Result<Tensor> {
        (lora
            .b
            .to_dtype(DType::F32)?
            .matmul(&lora.a.to_dtype(DType::F32)?)?
            * lora.scale)?
            .to_dtype(dtype)
    }

    /// Folds the LoRA update into the dense weight (`W + scale·B·A`) and drops it; afterwards the
    /// layer costs what the base layer costs.
    pub fn merge_lora(&mut self) -> Result<()> {
        let Some(lora) = self.lora.take() else {
            return Ok(());
        };
        match &self.weight {
            LinearWeight::Dense(w) => {
                let merged = (w + Self::lora_delta(&lora, w.dtype())?)?;
                self.weight = LinearWeight::Dense(merged.detach());
                Ok(())
            }
            LinearWeight::Quantized(_) | LinearWeight::Packed(_) => {
                self.lora = Some(lora);
                candle_core::bail!(
                    "cannot merge a LoRA adapter into a quantized weight; apply it unmerged"
                )
            }
        }
    }

    /// Stores a dense weight transposed (`[in, out]` in memory, still `[out, in]` to every
    /// reader): candle's GEMM then reads `x·Wᵀ` without packing the weight on every call, which
    /// for a few rows (batched decode, short prefills) costs ~10× the product itself. Same
    /// values, same memory; for inference, where nothing updates the weight in place.
    pub fn store_transposed(&mut self) -> Result<()> {
        if let LinearWeight::Dense(w) = &self.weight
            && w.is_contiguous()
        {
            self.weight = LinearWeight::Dense(w.t()?.contiguous()?.t()?);
        }
        Ok(())
    }

    /// A layer over a packed quantized weight.
    pub fn from_packed(weight: PackedWeight, bias: Option<Tensor>) -> Self {
        Self {
            in_features: weight.in_features(),
            out_features: weight.out_features(),
            weight: LinearWeight::Packed(Arc::new(weight)),
            bias,
            lora: None,
        }
    }

    /// Replaces the weight by a packed quantized one of the same shape (bias and any LoRA
    /// update stay).
    pub fn set_packed(&mut self, weight: PackedWeight) -> Result<()> {
        if (weight.out_features(), weight.in_features()) != (self.out_features, self.in_features) {
            candle_core::bail!(
                "a packed {}x{} weight cannot replace a {}x{} one",
                weight.out_features(),
                weight.in_features(),
                self.out_features,
                self.in_features
            );
        }
        self.weight = LinearWeight::Packed(Arc::new(weight));
        Ok(())
    }

    /// Replaces the weight by a dense one of the same shape.
    pub fn set_dense(&mut self, weight: Tensor) -> Result<()> {
        let (o, i) = weight.dims2()?;
        if (o, i) != (self.out_features, self.in_features) {
            candle_core::bail!(
                "a dense {o}x{i} weight cannot replace a {}x{} one",
                self.out_features,
                self.in_features
            );
        }
        self.weight = LinearWeight::Dense(weight);
        Ok(())
    }

    /// The weight as a dense `[out, in]` f32 tensor, whatever its storage.
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => w.to_dtype(DType::F32),
            LinearWeight::Quantized(q) => q.dequantize_f16()?.to_dtype(DType::F32),
            LinearWeight::Packed(p) => Tensor::from_vec(
                p.dequantize(),
                (self.out_features, self.in_features),
                &candle_core::Device::Cpu,
            ),
        }
    }

    /// `W ← W · diag(s)`: scales input channel `j` by `s[j]` (a dense weight; AWQ's scaling).
    pub fn multiply_inputs(&mut self, s: &Tensor) -> Result<()> {
        let LinearWeight::Dense(w) = &self.weight else {
            candle_core::bail!("only a dense weight can be rescaled");
        };
        let s = s.to_dtype(w.dtype())?.reshape((1, self.in_features))?;
        self.weight = LinearWeight::Dense(w.broadcast_mul(&s)?.detach());
        Ok(())
    }

    /// `W ← diag(1/s) · W`, `b ← b / s`: divides output channel `j` by `s[j]`, so that a next layer
    /// whose inputs are multiplied by `s` computes what it computed before (AWQ's folding).
    pub fn divide_outputs(&mut self, s: &Tensor) -> Result<()> {
        let LinearWeight::Dense(w) = &self.weight else {
            candle_core::bail!("only a dense weight can be rescaled");
        };
        let col = s.to_dtype(w.dtype())?.reshape((self.out_features, 1))?;
        self.weight = LinearWeight::Dense(w.broadcast_div(&col)?.detach());
        if let Some(b) = &self.bias {
            self.bias = Some(b.broadcast_div(&s.to_dtype(b.dtype())?)?.detach());
        }
        Ok(())
    }

    /// Quantizes a dense weight in place to a GGML block format.
    pub fn quantize(&mut self, dtype: GgmlDType) -> Result<()> {
        if let LinearWeight::Dense(w) = &self.weight {
            let q = QTensor::quantize(&w.to_dtype(DType::F32)?, dtype)?;
            self.weight = LinearWeight::Quantized(QMatMul::from_qtensor(q)?);
        }
        Ok(())
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = match &self.weight {
            LinearWeight::Dense(w) if x.rank() == 2 => x.matmul(&w.t()?)?,
            LinearWeight::Dense(w) => {
                // One GEMM over all leading dimensions: [.., in] -> [n, in] · [in, out].
                let dims = x.dims();
                let lead: Vec<usize> = dims[..dims.len() - 1].to_vec();
                let x2 = x.reshape(((), self.in_features))?;
                let y = x2.matmul(&w.t()?)?;
                let mut out_shape = lead;
                out_shape.push(self.out_features);
                y.reshape(out_shape)?
            }
            LinearWeight::Quantized(q) => {
                let dtype = x.dtype();
                q.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)?
            }
            LinearWeight::Packed(p) => {
                let dims = x.dims();
                let rows = x.elem_count() / self.in_features;
                // The activations are read in place (no copy): at 512 rows a copy cost ~10% of
                // the product.
                let y = crate::ops::with_cpu_f32(
                    &x.to_dtype(DType::F32)?,
                    "a quantized layer's input",
                    |xs| p.matmul(xs, rows),
                )?;
                let mut out_shape = dims[..dims.len() - 1].to_vec();
                out_shape.push(self.out_features);
                Tensor::from_vec(y, out_shape, x.device())?.to_dtype(x.dtype())?
            }
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(lora) = &self.lora {
            let x = match lora.next_mask_seed() {
                Some(seed) => {
                    let mask = crate::ops::dropout_mask(seed, x.elem_count(), lora.dropout);
                    let mask =
                        Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
                    (x * mask)?
                }
                None => x.clone(),
            };
            let down = x.broadcast_matmul(&lora.a.t()?)?;
            let up = down.broadcast_matmul(&lora.b.t()?)?;
            y = (y + (up * lora.scale)?)?;
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_diff;
    use candle_core::Device;

    #[test]
    fn merged_lora_equals_unmerged() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (24, 16), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 24, &dev)?;
        let mut layer = Linear::new(w.clone(), Some(b))?;
        layer.set_lora(LoraLayer::new(
            Tensor::randn(0f32, 1.0, (4, 16), &dev)?,
            Tensor::randn(0f32, 1.0, (24, 4), &dev)?,
            2.0,
        ))?;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 16), &dev)?;
        let unmerged = layer.forward(&x)?;
        layer.merge_lora()?;
        let merged = layer.forward(&x)?;
        assert!(max_diff(&unmerged, &merged) < 1e-4);
        // And the LoRA path really changed the output.
        let base = Linear::new(w, layer.bias().cloned())?.forward(&x)?;
        assert!(max_diff(&base, &merged) > 1e-2);
        Ok(())
    }

    #[test]
    fn misshaped_lora_is_rejected_with_shapes() -> Result<()> {
        let dev = Device::Cpu;
        let mut layer = Linear::new(Tensor::zeros((24, 16), DType::F32, &dev)?, None)?;
        let err = layer
            .set_lora(LoraLayer::new(
                Tensor::zeros((4, 8), DType::F32, &dev)?,
                Tensor::zeros((24, 4), DType::F32, &dev)?,
                1.0,
            ))
            .unwrap_err();
        assert!(err.to_string().contains("[4, 8]"), "{err}");
        Ok(())
    }

    #[test]
    fn q8_0_stays_close_to_dense() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.05, (64, 256), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (1, 5, 256), &dev)?;
        let mut layer = Linear::new(w, None)?;
        let dense = layer.forward(&x)?;
        layer.quantize(GgmlDType::Q8_0)?;
        let quant = layer.forward(&x)?;
        let scale = dense.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(max_diff(&dense, &quant) < 0.02 * scale);
        Ok(())
    }
}
