//! The inner loops of the quantized kernels: decode 4- or 8-bit codes to f32 and multiply.
//!
//! LLVM does not vectorize these loops on its own (measured: the portable versions below run
//! one lane at a time, ~1 weight per cycle, slower than the f32 product they replace), so on
//! x86-64 with AVX2 and FMA (the `x86-64-v3` level `.cargo/config.toml` builds for) they are
//! written with intrinsics: one 16-byte load gives 32 codes, widened to four vectors of eight
//! f32 and fused-multiply-added into four independent accumulators. Every function checks its
//! slices before the unsafe block, so no index can leave them; elsewhere the portable
//! versions run.

/// `Σ q·x` over 4-bit blocks (`c.len() / 16` blocks of 32 codes; byte `j` of a block holds code
/// `j` low and code `j + 16` high) against each of `M` activation rows (32 per block): each
/// block is decoded once.
pub(crate) fn dot_4bit_rows<const M: usize>(c: &[u8], xs: [&[f32]; M]) -> [f32; M] {
    let blocks = xs.iter().fold(c.len() / 16, |b, x| b.min(x.len() / 32));
    let xs: [&[f32]; M] = std::array::from_fn(|r| &xs[r][..32 * blocks]);
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        avx2::dot_4bit_rows(&c[..16 * blocks], xs)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    {
        std::array::from_fn(|r| portable::dot_4bit(&c[..16 * blocks], xs[r]))
    }
}

/// `Σ q·x` over 8-bit codes against each of `M` activation rows.
pub(crate) fn dot_8bit_rows<const M: usize>(c: &[u8], xs: [&[f32]; M]) -> [f32; M] {
    let n = xs.iter().fold(c.len(), |n, x| n.min(x.len()));
    let xs: [&[f32]; M] = std::array::from_fn(|r| &xs[r][..n]);
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        avx2::dot_8bit_rows(&c[..n], xs)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    {
        std::array::from_fn(|r| portable::dot_8bit(&c[..n], xs[r]))
    }
}

/// `out = scale · q + min` for 4-bit blocks (32 outputs per 16 bytes).
pub(crate) fn dequantize_4bit(c: &[u8], scale: f32, min: f32, out: &mut [f32]) {
    let blocks = (c.len() / 16).min(out.len() / 32);
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        avx2::dequantize_4bit(&c[..16 * blocks], scale, min, &mut out[..32 * blocks]);
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    {
        portable::dequantize_4bit(&c[..16 * blocks], scale, min, &mut out[..32 * blocks]);
    }
}

/// `out = scale · q + min` for 8-bit codes.
pub(crate) fn dequantize_8bit(c: &[u8], scale: f32, min: f32, out: &mut [f32]) {
    let n = c.len().min(out.len());
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        avx2::dequantize_8bit(&c[..n], scale, min, &mut out[..n]);
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    {
        portable::dequantize_8bit(&c[..n], scale, min, &mut out[..n]);
    }
}

/// Plain Rust, for every target; also the reference the intrinsics are tested against.
#[cfg_attr(
    all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ),
    allow(dead_code)
)]
mod portable {
    pub fn dot_4bit(c: &[u8], x: &[f32]) -> f32 {
        let mut acc = 0f32;
        for (block, xs) in c.chunks_exact(16).zip(x.chunks_exact(32)) {
            for j in 0..16 {
                acc += f32::from(block[j] & 0x0f) * xs[j] + f32::from(block[j] >> 4) * xs[j + 16];
            }
        }
        acc
    }

    pub fn dot_8bit(c: &[u8], x: &[f32]) -> f32 {
        c.iter().zip(x).map(|(&q, &x)| f32::from(q) * x).sum()
    }

    pub fn dequantize_4bit(c: &[u8], scale: f32, min: f32, out: &mut [f32]) {
        for (block, w) in c.chunks_exact(16).zip(out.chunks_exact_mut(32)) {
            for j in 0..16 {
                w[j] = f32::from(block[j] & 0x0f).mul_add(scale, min);
                w[j + 16] = f32::from(block[j] >> 4).mul_add(scale, min);
            }
        }
    }

    pub fn dequantize_8bit(c: &[u8], scale: f32, min: f32, out: &mut [f32]) {
        for (w, &q) in out.iter_mut().zip(c) {
            *w = f32::from(q).mul_add(scale, min);
        }
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::*;

    /// The sum of a vector's eight lanes.
    #[inline(always)]
    fn hsum(v: __m256) -> f32 {
        // SAFETY: register-only intrinsics of AVX, which this module is compiled with.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }

    /// Callers pass `c.len() == 16 · n` and every `xs[r].len() == 32 · n`.
    pub fn dot_4bit_rows<const M: usize>(c: &[u8], xs: [&[f32]; M]) -> [f32; M] {
        let blocks = c.len() / 16;
        assert!(
            xs.iter().all(|x| x.len() >= 32 * blocks),
            "dot_4bit_rows: activations shorter than codes"
        );
        // SAFETY: block `b` reads bytes `16b..16b+16` of `c` and floats `32b..32b+32` of every
        // row, in bounds for `b < blocks` by the assertion above.
        unsafe {
            let mask = _mm_set1_epi8(0x0f);
            let mut acc = [_mm256_setzero_ps(); M];
            let cp = c.as_ptr();
            for b in 0..blocks {
                let bytes = _mm_loadu_si128(cp.add(16 * b).cast());
                let lo = _mm_and_si128(bytes, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
                let w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
                let w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
                let w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
                let w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
                for r in 0..M {
                    let xb = xs[r].as_ptr().add(32 * b);
                    let a = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), acc[r]);
                    let a = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb.add(8)), a);
                    let a = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb.add(16)), a);
                    acc[r] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb.add(24)), a);
                }
            }
            std::array::from_fn(|r| hsum(acc[r]))
        }
    }

    /// Callers pass `c.len() == xs[r].len()` for every row.
    pub fn dot_8bit_rows<const M: usize>(c: &[u8], xs: [&[f32]; M]) -> [f32; M] {
        let n = xs.iter().fold(c.len(), |n, x| n.min(x.len()));
        let chunks = n / 16;
        // SAFETY: chunk `i` reads bytes `16i..16i+16` of `c` and floats `16i..16i+16` of every
        // row, all within `n` for `i < n / 16`.
        let mut out = unsafe {
            let mut acc = [_mm256_setzero_ps(); M];
            let cp = c.as_ptr();
            for i in 0..chunks {
                let bytes = _mm_loadu_si128(cp.add(16 * i).cast());
                let w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
                let w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)));
                for r in 0..M {
                    let xb = xs[r].as_ptr().add(16 * i);
                    let a = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), acc[r]);
                    acc[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb.add(8)), a);
                }
            }
            let out: [f32; M] = std::array::from_fn(|r| hsum(acc[r]));
            out
        };
        for i in 16 * chunks..n {
            for r in 0..M {
                out[r] += f32::from(c[i]) * xs[r][i];
            }
        }
        out
    }

    /// Callers pass `c.len() == 16 · n` and `out.len() == 32 · n`.
    pub fn dequantize_4bit(c: &[u8], scale: f32, min: f32, out: &mut [f32]) {
        let blocks = c.len() / 16;
        assert!(
            out.len() >= 32 * blocks,
            "dequantize_4bit: output shorter than codes"
        );
        // SAFETY: block `b` reads bytes `16b..16b+16` of `c` and writes floats `32b..32b+32` of
        // `out`, in bounds for every `b < blocks` by the assertion above.
        unsafe {
            let mask = _mm_set1_epi8(0x0f);
            let (s, m) = (_mm256_set1_ps(scale), _mm256_set1_ps(min));
            let (cp, op) = (c.as_ptr(), out.as_mut_ptr());
            for b in 0..blocks {
                let bytes = _mm_loadu_si128(cp.add(16 * b).cast());
                let lo = _mm_and_si128(bytes, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
                let ob = op.add(32 * b);
                let parts = [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)];
                for (k, part) in parts.into_iter().enumerate() {
                    let w = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part));
                    _mm256_storeu_ps(ob.add(8 * k), _mm256_fmadd_ps(w, s, m));
                }
            }
        }
    }

    /// Callers pass `c.len() == out.len()`.
    pub fn dequantize_8bit(c: &[u8], scale: f32, min: f32, out: &mut [f32]) {
        let n = c.len().min(out.len());
        let chunks = n / 8;
        // SAFETY: chunk `i` reads bytes `8i..8i+8` of `c` and writes floats `8i..8i+8` of `out`,
        // within `n` for `i < n / 8`.
        unsafe {
            let (s, m) = (_mm256_set1_ps(scale), _mm256_set1_ps(min));
            let (cp, op) = (c.as_ptr(), out.as_mut_ptr());
            for i in 0..chunks {
                let bytes = _mm_loadl_epi64(cp.add(8 * i).cast());
                let w = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
                _mm256_storeu_ps(op.add(8 * i), _mm256_fmadd_ps(w, s, m));
            }
        }
        for i in 8 * chunks..n {
            out[i] = f32::from(c[i]).mul_add(scale, min);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> (Vec<u8>, Vec<f32>) {
        let c: Vec<u8> = (0..n).map(|i| (i * 37 % 251) as u8).collect();
        let x: Vec<f32> = (0..2 * n + 8)
            .map(|i| ((i % 13) as f32 - 6.0) * 0.1)
            .collect();
        (c, x)
    }

    #[test]
    fn kernels_match_the_portable_loops() {
        for n in [0usize, 16, 48, 160] {
            let (c, x) = data(n);
            let want = portable::dot_4bit(&c, &x);
            assert!(
                (dot_4bit_rows::<1>(&c, [&x[..2 * n]])[0] - want).abs() < 1e-3 * (1.0 + want.abs()),
                "4-bit dot, {n}"
            );
            let mut a = vec![0f32; 2 * n];
            let mut b = vec![0f32; 2 * n];
            dequantize_4bit(&c, 0.5, -3.0, &mut a);
            portable::dequantize_4bit(&c, 0.5, -3.0, &mut b);
            assert_eq!(a, b);
        }
        for n in [16usize, 32, 96] {
            let (c, x) = data(n);
            let rows: [&[f32]; 3] = [&x[..2 * n], &x[1..2 * n + 1], &x[..2 * n]];
            let got = dot_4bit_rows::<3>(&c[..n], rows);
            for r in 0..3 {
                let want = portable::dot_4bit(&c[..n], rows[r]);
                assert!(
                    (got[r] - want).abs() < 1e-3 * (1.0 + want.abs()),
                    "4-bit rows, {n}"
                );
            }
        }
        for n in [0usize, 7, 16, 37, 160] {
            let (c, x) = data(n);
            let rows: [&[f32]; 2] = [&x[..n], &x[n..2 * n]];
            let got = dot_8bit_rows::<2>(&c, rows);
            for r in 0..2 {
                let want = portable::dot_8bit(&c, rows[r]);
                assert!(
                    (got[r] - want).abs() < 1e-3 * (1.0 + want.abs()),
                    "8-bit rows, {n}"
                );
            }
            let want = portable::dot_8bit(&c, &x[..n]);
            let got = dot_8bit_rows::<1>(&c, [&x[..n]])[0];
            assert!(
                (got - want).abs() < 1e-3 * (1.0 + want.abs()),
                "8-bit dot, {n}"
            );
            let mut a = vec![0f32; n];
            let mut b = vec![0f32; n];
            dequantize_8bit(&c, 0.25, 1.0, &mut a);
            portable::dequantize_8bit(&c, 0.25, 1.0, &mut b);
            assert_eq!(a, b);
        }
    }
}
