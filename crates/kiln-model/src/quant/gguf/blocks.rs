//! GGML's block formats read into kiln's packed form, byte by byte.
//!
//! Every GGUF type kiln writes (and the Q5_0 that Q4_K falls back to) is affine per group of
//! inputs, `w = scale · q + min`, so each converts exactly into [`PackedWeight`]'s codes:
//!
//! | GGML | block | kiln codes | group | scale | min |
//! |---|---|---|---|---|---|
//! | Q8_0 | `f16 d; i8 qs[32]`, `x = d·q` | 8-bit `q + 128` | 32 | `d` | `−128·d` |
//! | Q4_0 | `f16 d; u8 qs[16]`, `x = d·(q − 8)` | 4-bit `q` | 32 | `d` | `−8·d` |
//! | Q5_0 | `f16 d; u32 qh; u8 qs[16]`, `x = d·(q − 16)` | 8-bit `q` | 32 | `d` | `−16·d` |
//! | Q4_K | `f16 d, dmin; u8 scales[12]; u8 qs[128]`, `x = d·sc·q − dmin·m` | 4-bit `q` | 32 | `d·sc` | `−dmin·m` |
//! | Q6_K | `u8 ql[128], qh[64]; i8 scales[16]; f16 d`, `x = d·sc·(q − 32)` | 8-bit `q` | 16 | `d·sc` | `−32·d·sc` |
//!
//! The layouts follow ggml's `ggml-common.h` and candle's `k_quants.rs` (`to_float`); the tests
//! check every conversion against candle's own dequantization. The bytes are parsed with safe
//! slice code: no transmutes of block structs.

use candle_core::quantized::GgmlDType;
use half::f16;

use crate::quant::PackedWeight;

/// Natural-order codes with a scale and a min per group, row-major: what [`PackedWeight::new`]
/// takes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Codes {
    pub bits: u8,
    pub group_size: usize,
    pub rows: usize,
    pub cols: usize,
    pub q: Vec<u8>,
    pub scales: Vec<f32>,
    pub mins: Vec<f32>,
}

impl Codes {
    pub fn into_packed(self) -> candle_core::Result<PackedWeight> {
        PackedWeight::new(
            self.bits,
            self.group_size,
            self.rows,
            self.cols,
            &self.q,
            self.scales,
            self.mins,
            None,
        )
    }

    /// Reorders the rows: row `r` of the result is row `from[r]` of `self`.
    pub fn gather_rows(&self, from: &[usize]) -> Self {
        let groups = self.cols / self.group_size;
        let mut out = self.clone();
        for (r, &src) in from.iter().enumerate() {
            out.q[r * self.cols..(r + 1) * self.cols]
                .copy_from_slice(&self.q[src * self.cols..(src + 1) * self.cols]);
            out.scales[r * groups..(r + 1) * groups]
                .copy_from_slice(&self.scales[src * groups..(src + 1) * groups]);
            out.mins[r * groups..(r + 1) * groups]
                .copy_from_slice(&self.mins[src * groups..(src + 1) * groups]);
        }
        out
    }
}

/// Whether [`to_codes`] converts this type.
pub(crate) fn is_packable(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q5_0 | GgmlDType::Q4K | GgmlDType::Q6K
    )
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Converts the raw blocks of a `[rows, cols]` tensor. `Err` carries a message for a type that
/// does not convert, a row length that is not whole blocks, or a byte count that does not match.
pub(crate) fn to_codes(
    dtype: GgmlDType,
    data: &[u8],
    rows: usize,
    cols: usize,
) -> Result<Codes, String> {
    if !is_packable(dtype) {
        return Err(format!(
            "{dtype:?} has no exact packed form in kiln (Q8_0, Q4_0, Q5_0, Q4_K and Q6_K do)"
        ));
    }
    let (block, bytes) = (dtype.block_size(), dtype.type_size());
    if !cols.is_multiple_of(block) {
        return Err(format!(
            "rows of {cols} values are not whole {dtype:?} blocks of {block}"
        ));
    }
    let n_blocks = rows * cols / block;
    if data.len() != n_blocks * bytes {
        return Err(format!(
            "{} bytes of {dtype:?} data for a {rows}x{cols} tensor; expected {}",
            data.len(),
            n_blocks * bytes
        ));
    }
    let (bits, group_size) = match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q4K => (4, 32),
        GgmlDType::Q6K => (8, 16),
        _ => (8, 32),
    };
    let n_groups = rows * cols / group_size;
    let mut codes = Codes {
        bits,
        group_size,
        rows,
        cols,
        q: Vec::with_capacity(rows * cols),
        scales: Vec::with_capacity(n_groups),
        mins: Vec::with_capacity(n_groups),
    };
    // Groups never straddle rows (rows are whole blocks), so the blocks can be read in file
    // order and the codes, scales and mins come out row-major.
    for b in data.chunks_exact(bytes) {
        match dtype {
            GgmlDType::Q8_0 => q8_0(b, &mut codes),
            GgmlDType::Q4_0 => q4_0(b, &mut codes),
            GgmlDType::Q5_0 => q5_0(b, &mut codes),
            GgmlDType::Q4K => q4_k(b, &mut codes),
            _ => q6_k(b, &mut codes),
        }
    }
    Ok(codes)
}

fn q8_0(b: &[u8], c: &mut Codes) {
    let d = f16_at(b, 0);
    c.q.extend(b[2..34].iter().map(|&v| (v as i8 as i16 + 128) as u8));
    c.scales.push(d);
    c.mins.push(-128.0 * d);
}

fn q4_0(b: &[u8], c: &mut Codes) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    c.q.extend(qs.iter().map(|&v| v & 0x0f));
    c.q.extend(qs.iter().map(|&v| v >> 4));
    c.scales.push(d);
    c.mins.push(-8.0 * d);
}

fn q5_0(b: &[u8], c: &mut Codes) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for (j, &v) in qs.iter().enumerate() {
        c.q.push((v & 0x0f) | ((((qh >> j) << 4) & 0x10) as u8));
    }
    for (j, &v) in qs.iter().enumerate() {
        c.q.push((v >> 4) | (((qh >> (j + 12)) & 0x10) as u8));
    }
    c.scales.push(d);
    c.mins.push(-16.0 * d);
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn q4_k(b: &[u8], c: &mut Codes) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    // Each 32 bytes of `qs` hold two sub-blocks: 32 values in the low nibbles, the next 32 in
    // the high ones.
    for (pair, chunk) in qs.chunks_exact(32).enumerate() {
        for (half, shift) in [(0, 0u8), (1, 4u8)] {
            let (sc, m) = scale_min_k4(2 * pair + half, scales);
            c.q.extend(chunk.iter().map(|&v| (v >> shift) & 0x0f));
            c.scales.push(d * f32::from(sc));
            c.mins.push(-(dmin * f32::from(m)));
        }
    }
}

fn q6_k(b: &[u8], c: &mut Codes) {
    let (ql, qh) = (&b[0..128], &b[128..192]);
    let scales = &b[192..208];
    let d = f16_at(b, 208);
    let start = c.q.len();
    c.q.resize(start + 256, 0);
    let out = &mut c.q[start..];
    // Two halves of 128 values; in each, value `l + 32·k` takes its low 4 bits from `ql` and its
    // high 2 bits from bits `2k..2k+2` of `qh[l]`.
    for half in 0..2 {
        let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
        let out = &mut out[128 * half..];
        for l in 0..32 {
            out[l] = (ql[l] & 0x0f) | ((qh[l] & 3) << 4);
            out[l + 32] = (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4);
            out[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            out[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    for &sc in scales {
        let s = d * f32::from(sc as i8);
        c.scales.push(s);
        c.mins.push(-32.0 * s);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use super::*;

    /// A weight with a spread of magnitudes per row, so scales and mins differ between groups.
    fn weight(rows: usize, cols: usize) -> Tensor {
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let x = (i as f32 * 0.618_034).fract() - 0.4;
                x * (1.0 + (i / 16 % 7) as f32) * 0.05
            })
            .collect();
        Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
    }

    fn check(dtype: GgmlDType, rows: usize, cols: usize) {
        let qt = QTensor::quantize(&weight(rows, cols), dtype).unwrap();
        let want: Vec<f32> = qt
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let codes = to_codes(dtype, &qt.data().unwrap(), rows, cols).unwrap();
        assert!(codes.q.iter().all(|&q| u16::from(q) < 1 << codes.bits));
        let got = codes.into_packed().unwrap().dequantize();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * scale,
                "{dtype:?} element {i}: kiln {g} vs candle {w}"
            );
        }
    }

    #[test]
    fn q8_0_matches_candle() {
        check(GgmlDType::Q8_0, 3, 64);
    }

    #[test]
    fn q4_0_matches_candle() {
        check(GgmlDType::Q4_0, 3, 64);
    }

    #[test]
    fn q5_0_matches_candle() {
        check(GgmlDType::Q5_0, 3, 96);
    }

    #[test]
    fn q4_k_matches_candle() {
        check(GgmlDType::Q4K, 3, 512);
    }

    #[test]
    fn q6_k_matches_candle() {
        check(GgmlDType::Q6K, 3, 512);
    }

    #[test]
    fn gathered_rows_move_their_scales_along() {
        let qt = QTensor::quantize(&weight(4, 64), GgmlDType::Q8_0).unwrap();
        let codes = to_codes(GgmlDType::Q8_0, &qt.data().unwrap(), 4, 64).unwrap();
        let moved = codes.gather_rows(&[2, 0, 3, 1]);
        let (a, b) = (
            codes.into_packed().unwrap().dequantize(),
            moved.into_packed().unwrap().dequantize(),
        );
        for (r, src) in [2, 0, 3, 1].into_iter().enumerate() {
            assert_eq!(b[r * 64..(r + 1) * 64], a[src * 64..(src + 1) * 64]);
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(to_codes(GgmlDType::Q8_0, &[0; 33], 1, 32).is_err());
        assert!(to_codes(GgmlDType::Q4K, &[0; 144], 1, 128).is_err());
        assert!(to_codes(GgmlDType::Q2K, &[0; 84], 1, 256).is_err());
    }
}
