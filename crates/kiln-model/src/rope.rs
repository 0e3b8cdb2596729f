//! Rotary position embeddings (Su et al., 2021, <https://arxiv.org/abs/2104.09864>) in the
//! "rotate half" layout transformers uses for Llama, Mistral and Qwen2, with the `linear` and
//! `llama3` frequency scalings of `transformers.modeling_rope_utils`.

use candle_core::{D, DType, Device, Result, Tensor};
use kiln_core::{RopeConfig, RopeScaling};

/// The inverse frequencies of every rotary pair; angles are computed per call for the positions
/// in use, so there is no table to size and no context limit baked in.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// `[1, head_dim / 2]`, f32.
    inv_freq: Tensor,
}

/// `cos` and `sin` of the rotation angles for a run of positions, `[seq, head_dim / 2]`.
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

/// The inverse frequencies `theta^(-2i/d)`, rescaled as the config says.
pub fn inverse_frequencies(rope: &RopeConfig, head_dim: usize) -> Vec<f64> {
    let base: Vec<f64> = (0..head_dim / 2)
        .map(|i| 1.0 / rope.theta.powf((2 * i) as f64 / head_dim as f64))
        .collect();
    match rope.scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old_ctx = original_max_position_embeddings as f64;
            let low_freq_wavelen = old_ctx / low_freq_factor;
            let high_freq_wavelen = old_ctx / high_freq_factor;
            base.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_ctx / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

impl RotaryEmbedding {
    pub fn new(rope: &RopeConfig, head_dim: usize, device: &Device) -> Result<Self> {
        // transformers keeps inv_freq in f32 and forms the angles as an f32 product; so do we,
        // so that long positions round identically.
        let inv_freq: Vec<f32> = inverse_frequencies(rope, head_dim)
            .into_iter()
            .map(|f| f as f32)
            .collect();
        let half = inv_freq.len();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv_freq, (1, half), device)?,
        })
    }

    /// Tables for positions `start..start + len`, in `dtype`.
    pub fn tables(&self, start: usize, len: usize, dtype: DType) -> Result<RopeTables> {
        let positions = Tensor::arange(start as u32, (start + len) as u32, self.inv_freq.device())?
            .to_dtype(DType::F32)?
            .reshape((len, 1))?;
        let angles = positions.broadcast_mul(&self.inv_freq)?;
        Ok(RopeTables {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
        })
    }
}

impl RopeTables {
    /// `cos` and `sin` as flat f32 `[seq · head_dim / 2]` vectors, for the fused kernels.
    pub(crate) fn to_f32_vecs(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let flat = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        Ok((flat(&self.cos)?, flat(&self.sin)?))
    }

    /// Rotates `x` (`[batch, heads, seq, head_dim]`).
    ///
    /// candle's fused `rope` kernel records no backward, so it is used only when `x` carries no
    /// gradient; training takes the differentiable composition.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() {
            let cos = Tensor::cat(&[&self.cos, &self.cos], D::Minus1)?;
            let sin = Tensor::cat(&[&self.sin, &self.sin], D::Minus1)?;
            let half = x.dim(D::Minus1)? / 2;
            let x1 = x.narrow(D::Minus1, 0, half)?;
            let x2 = x.narrow(D::Minus1, half, half)?;
            let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
            x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
        } else {
            candle_nn::rotary_emb::rope(&x.contiguous()?, &self.cos, &self.sin)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_divides_low_and_smooths_the_middle() {
        // Llama 3.1 8B's settings (head_dim 128).
        let rope = RopeConfig {
            theta: 500_000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
        };
        let f = inverse_frequencies(&rope, 128);
        // High frequencies untouched, low ones divided by the factor, the middle band smoothed.
        assert_eq!(f[0], 1.0);
        let plain = inverse_frequencies(
            &RopeConfig {
                theta: 500_000.0,
                scaling: RopeScaling::None,
            },
            128,
        );
        assert!((f[63] - plain[63] / 8.0).abs() < 1e-15);
        let mid = (0..64)
            .find(|&i| {
                let w = 2.0 * std::f64::consts::PI / plain[i];
                (8192.0 / 4.0..=8192.0).contains(&w)
            })
            .expect("a medium-frequency band exists");
        assert!(f[mid] < plain[mid] && f[mid] > plain[mid] / 8.0);
    }

    #[test]
    fn fused_and_differentiable_paths_agree() -> Result<()> {
        let dev = Device::Cpu;
        let rope = RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::None,
        };
        let tables = RotaryEmbedding::new(&rope, 16, &dev)?.tables(7, 5, DType::F32)?;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 16), &dev)?;
        let fused = tables.apply(&x)?;
        let var = candle_core::Var::from_tensor(&x)?;
        let composed = tables.apply(var.as_tensor())?;
        let diff = (fused - composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max diff {diff}");
        Ok(())
    }
}
