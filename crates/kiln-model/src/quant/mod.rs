//! Quantized weights: the integer matrices GPTQ, AWQ and RTN produce ([`QuantizedMatrix`]), the
//! packed form a [`crate::Linear`] multiplies with ([`PackedWeight`]), and the on-disk formats
//! they travel in (GPTQ and AWQ checkpoints, GGUF).
//!
//! Every format lands in one runtime form: codes of 4 or 8 bits with a scale and an offset per
//! group of inputs (`w = scale · q + min`). GPTQ's and AWQ's `scale · (q − zero)`, GGUF's Q8_0,
//! Q4_0, Q4_K and Q6_K all say exactly that, so one pair of kernels serves them all.

pub mod awq_format;
pub mod checkpoint;
pub mod gguf;
pub mod gptq_format;
mod packed;
mod simd;

pub use packed::PackedWeight;

use candle_core::Result;

/// A weight matrix quantized per group of input features, in the terms GPTQ and AWQ use:
/// `w[o, i] = scales[o, g] · (q[o, i] − zeros[o, g])` with `g` the group of input `i`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedMatrix {
    /// 4 or 8.
    pub bits: u8,
    /// Input features per group; `in_features` for one group per row (GPTQ's `group_size: -1`).
    pub group_size: usize,
    pub out_features: usize,
    pub in_features: usize,
    /// Integer weights in `0..2^bits`, row-major `[out_features, in_features]`.
    pub q: Vec<u8>,
    /// `[out_features, n_groups]`, row-major. Formats store them as f16: quantizers round them
    /// to f16 before computing `q`, so that a save and a load change nothing.
    pub scales: Vec<f32>,
    /// Integer zero points in `0..2^bits`, `[out_features, n_groups]`.
    pub zeros: Vec<u8>,
    /// The group of each input feature (GPTQ's `g_idx`), when it is not `i / group_size`: GPTQ
    /// with act-order (`desc_act`) forms its groups in order of decreasing activation.
    pub g_idx: Option<Vec<u32>>,
}

impl QuantizedMatrix {
    pub fn n_groups(&self) -> usize {
        self.in_features.div_ceil(self.group_size)
    }

    /// The group of input feature `i`.
    pub fn group_of(&self, i: usize) -> usize {
        match &self.g_idx {
            Some(g) => g[i] as usize,
            None => i / self.group_size,
        }
    }

    /// Checks that every buffer has the length and range its shape demands.
    pub fn validate(&self) -> Result<()> {
        let (o, i, g) = (self.out_features, self.in_features, self.n_groups());
        if !matches!(self.bits, 4 | 8) {
            candle_core::bail!("{} bits: kiln quantizes to 4 or 8 bits", self.bits);
        }
        if self.group_size == 0 {
            candle_core::bail!("group size 0");
        }
        let maxq = ((1u16 << self.bits) - 1) as u8;
        let checks = [
            ("q", self.q.len(), o * i),
            ("scales", self.scales.len(), o * g),
            ("zeros", self.zeros.len(), o * g),
        ];
        for (name, got, want) in checks {
            if got != want {
                candle_core::bail!(
                    "quantized {o}x{i} matrix (group {}): `{name}` has {got} values, expected {want}",
                    self.group_size
                );
            }
        }
        if self.bits < 8 && self.q.iter().chain(&self.zeros).any(|&v| v > maxq) {
            candle_core::bail!(
                "a code or zero point exceeds {maxq} in a {}-bit matrix",
                self.bits
            );
        }
        if let Some(g_idx) = &self.g_idx {
            if g_idx.len() != i {
                candle_core::bail!("g_idx has {} entries for {i} input features", g_idx.len());
            }
            if let Some(bad) = g_idx.iter().find(|&&v| v as usize >= g) {
                candle_core::bail!("g_idx names group {bad}; the matrix has {g} groups");
            }
        }
        Ok(())
    }

    /// The dequantized weights, row-major `[out_features, in_features]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let (i_n, g_n) = (self.in_features, self.n_groups());
        let groups: Vec<usize> = (0..i_n).map(|i| self.group_of(i)).collect();
        let mut w = vec![0f32; self.out_features * i_n];
        for (o, row) in w.chunks_mut(i_n).enumerate() {
            for (i, v) in row.iter_mut().enumerate() {
                let g = o * g_n + groups[i];
                *v = self.scales[g] * (f32::from(self.q[o * i_n + i]) - f32::from(self.zeros[g]));
            }
        }
        w
    }
}
