//! The uniform quantizer every method shares: a scale and an integer zero point per group,
//! from the group's range (always widened to include 0), as GPTQ's reference `Quantizer` and
//! AWQ's `pseudo_quantize_tensor` compute them.

use half::f16;

/// What to quantize to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantSpec {
    /// 4 or 8.
    pub bits: u8,
    /// Input features per group; `None` for one group per output row.
    pub group_size: Option<usize>,
    /// Symmetric: the zero point is fixed at the middle code (`2^(bits−1)`).
    pub sym: bool,
}

impl QuantSpec {
    pub fn maxq(&self) -> f32 {
        f32::from(((1u16 << self.bits) - 1) as u8)
    }

    /// The group size for rows of `in_features`.
    pub fn group_for(&self, in_features: usize) -> usize {
        self.group_size.unwrap_or(in_features).min(in_features)
    }

    /// Scale (rounded to f16, the precision checkpoints store) and zero point for a group of
    /// weights with range `[lo, hi]`.
    pub fn params(&self, lo: f32, hi: f32) -> (f32, u8) {
        let maxq = self.maxq();
        let (mut lo, mut hi) = (lo.min(0.0), hi.max(0.0));
        if self.sym {
            hi = hi.max(-lo);
            if lo < 0.0 {
                lo = -hi;
            }
        }
        if lo == 0.0 && hi == 0.0 {
            (lo, hi) = (-1.0, 1.0);
        }
        let scale = f16::from_f32((hi - lo) / maxq).to_f32();
        // An f16 underflow (a group of tiny weights) would divide by zero below.
        let scale = if scale > 0.0 {
            scale
        } else {
            f32::from(f16::MIN_POSITIVE_SUBNORMAL)
        };
        let zero = if self.sym {
            (maxq + 1.0) / 2.0
        } else {
            (-lo / scale).round().clamp(0.0, maxq)
        };
        (scale, zero as u8)
    }

    /// Scale and zero point of a group of weights.
    pub fn params_of(&self, xs: impl IntoIterator<Item = f32>) -> (f32, u8) {
        let (lo, hi) = xs
            .into_iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), x| {
                (a.min(x), b.max(x))
            });
        if lo > hi {
            return self.params(0.0, 0.0);
        }
        self.params(lo, hi)
    }

    /// The code of `x` under `(scale, zero)`.
    pub fn code(&self, x: f32, scale: f32, zero: u8) -> u8 {
        ((x / scale).round() + f32::from(zero)).clamp(0.0, self.maxq()) as u8
    }

    /// `x` quantized and dequantized.
    pub fn fake(&self, x: f32, scale: f32, zero: u8) -> f32 {
        scale * (f32::from(self.code(x, scale, zero)) - f32::from(zero))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asymmetric_range_maps_to_all_codes() {
        let spec = QuantSpec {
            bits: 4,
            group_size: None,
            sym: false,
        };
        let (s, z) = spec.params(-0.3, 1.2);
        assert!((s - 0.1).abs() < 1e-3, "{s}");
        assert_eq!(z, 3);
        assert_eq!(spec.code(-0.3, s, z), 0);
        assert_eq!(spec.code(1.2, s, z), 15);
        // Error within half a step.
        for x in [-0.3f32, -0.01, 0.0, 0.55, 1.2] {
            assert!((spec.fake(x, s, z) - x).abs() <= s / 2.0 + 1e-6);
        }
    }

    #[test]
    fn symmetric_zero_is_the_middle_code() {
        let spec = QuantSpec {
            bits: 4,
            group_size: Some(32),
            sym: true,
        };
        let (_, z) = spec.params(-0.5, 0.2);
        assert_eq!(z, 8);
        let spec8 = QuantSpec { bits: 8, ..spec };
        assert_eq!(spec8.params(-0.5, 0.2).1, 128);
    }

    #[test]
    fn all_zero_groups_stay_finite() {
        let spec = QuantSpec {
            bits: 4,
            group_size: None,
            sym: false,
        };
        let (s, z) = spec.params_of([0.0f32; 8]);
        assert!(s > 0.0);
        assert_eq!(spec.fake(0.0, s, z), 0.0);
        let (s, _) = spec.params(-1e-9, 1e-9);
        assert!(s > 0.0 && s.is_finite());
    }
}
