//! The inner loops of the quantized kernels: decode 4- or 8-bit codes to f32 and multiply.
//!
//! LLVM does not vectorize these loops on its own (measured: the portable versions below run
//! one lane at a time, ~1 weight per cycle, slower than the f32 product they replace), so on
//! x86-64 with AVX2 and FMA (the `x86-64-v3` level `.cargo/config.toml` builds for) they are
//! written with intrinsics: one 16-byte load gives 32 codes, widened to four vectors of eight
//! f32 and fused-multiply-added into four independent accumulators. Every function checks its
//! slices before the unsafe block, so no index can leave them; elsewhere the portable
//! versions run.

/// One output row against `M` activation rows (`x`, `M × k`): `Σ_g scale[g] · Σ_{i∈g} q_i·x_i`
/// for 4-bit codes `c` (`k / 2` bytes), groups of `gs` inputs (a multiple of 32). Group sums
/// stay in vector registers; one horizontal sum per row at the end.
pub(crate) fn row_4bit<const M: usize>(
    c: &[u8],
    x: &[f32],
    k: usize,
    stride: usize,
    gs: usize,
    scales: &[f32],
) -> [f32; M] {
    assert!(
        k.is_multiple_of(32)
            && gs.is_multiple_of(32)
            && gs > 0
            && c.len() >= k / 2
            && stride >= k
            && x.len() >= (M - 1) * stride + k
            && scales.len() >= k.div_ceil(gs),
        "row_4bit: {} bytes, {} activations, {} scales for {M} rows of {k} in groups of {gs}",
        c.len(),
        x.len(),
        scales.len()
    );
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        return avx512::row_4bit(c, x, k, stride, gs, scales);
    }
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        avx2::row_4bit(c, x, k, stride, gs, scales)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    {
        std::array::from_fn(|r| {
            (0..k.div_ceil(gs))
                .map(|g| {
                    let (s, e) = (g * gs, ((g + 1) * gs).min(k));
                    scales[g]
                        * portable::dot_4bit(&c[s / 2..e / 2], &x[r * stride + s..r * stride + e])
                })
                .sum()
        })
    }
}

/// [`row_4bit`] for 8-bit codes (`k` bytes), groups of any size.
pub(crate) fn row_8bit<const M: usize>(
    c: &[u8],
    x: &[f32],
    k: usize,
    stride: usize,
    gs: usize,
    scales: &[f32],
) -> [f32; M] {
    assert!(
        gs > 0
            && c.len() >= k
            && stride >= k
            && x.len() >= (M - 1) * stride + k
            && scales.len() >= k.div_ceil(gs),
        "row_8bit: {} bytes, {} activations, {} scales for {M} rows of {k} in groups of {gs}",
        c.len(),
        x.len(),
        scales.len()
    );
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        return avx512::row_8bit(c, x, k, stride, gs, scales);
    }
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        avx2::row_8bit(c, x, k, stride, gs, scales)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    {
        std::array::from_fn(|r| {
            (0..k.div_ceil(gs))
                .map(|g| {
                    let (s, e) = (g * gs, ((g + 1) * gs).min(k));
                    scales[g] * portable::dot_8bit(&c[s..e], &x[r * stride + s..r * stride + e])
                })
                .sum()
        })
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
#[allow(unsafe_code, clippy::needless_range_loop)]
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

    /// Checked by [`super::row_4bit`]: `k` and `gs` multiples of 32, `c` ≥ `k/2` bytes, `x` ≥
    /// `M·k` floats, a scale per group.
    pub fn row_4bit<const M: usize>(
        c: &[u8],
        x: &[f32],
        k: usize,
        stride: usize,
        gs: usize,
        scales: &[f32],
    ) -> [f32; M] {
        // SAFETY: block `b < k/32` reads bytes `16b..16b+16` of `c` (< k/2) and floats
        // `r·k + 32b .. r·k + 32b + 32` of `x` (< M·k) for `r < M`, as the caller checked.
        unsafe {
            let mask = _mm_set1_epi8(0x0f);
            let mut total = [_mm256_setzero_ps(); M];
            let (cp, xp) = (c.as_ptr(), x.as_ptr());
            for (g, &scale) in scales.iter().enumerate().take(k.div_ceil(gs)) {
                let (first, last) = (g * gs / 32, ((g + 1) * gs).min(k) / 32);
                // The scale goes into the decoded weights (shared by all rows), so one
                // accumulator per row suffices.
                let s = _mm256_set1_ps(scale);
                let decode =
                    |v: __m128i| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), s);
                for b in first..last {
                    let bytes = _mm_loadu_si128(cp.add(16 * b).cast());
                    let lo = _mm_and_si128(bytes, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
                    let w0 = decode(lo);
                    let w1 = decode(_mm_srli_si128(lo, 8));
                    let w2 = decode(hi);
                    let w3 = decode(_mm_srli_si128(hi, 8));
                    for r in 0..M {
                        let xb = xp.add(r * stride + 32 * b);
                        let a = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), total[r]);
                        let a = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb.add(8)), a);
                        let a = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb.add(16)), a);
                        total[r] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb.add(24)), a);
                    }
                }
            }
            std::array::from_fn(|r| hsum(total[r]))
        }
    }

    /// Checked by [`super::row_8bit`]: `c` ≥ `k` bytes, `x` ≥ `M·k` floats, a scale per group.
    pub fn row_8bit<const M: usize>(
        c: &[u8],
        x: &[f32],
        k: usize,
        stride: usize,
        gs: usize,
        scales: &[f32],
    ) -> [f32; M] {
        let mut tail = [0f32; M];
        // SAFETY: within group `g` (inputs `start..end`, `end ≤ k`), chunk `i` reads bytes
        // `start+16i .. start+16i+16 ≤ end` of `c` and the same floats of each row `r·k + …` of
        // `x`, all in bounds as the caller checked.
        let mut out = unsafe {
            let mut total = [_mm256_setzero_ps(); M];
            let (cp, xp) = (c.as_ptr(), x.as_ptr());
            for (g, &scale) in scales.iter().enumerate().take(k.div_ceil(gs)) {
                let (start, end) = (g * gs, ((g + 1) * gs).min(k));
                let chunks = (end - start) / 16;
                let s = _mm256_set1_ps(scale);
                for i in 0..chunks {
                    let at = start + 16 * i;
                    let bytes = _mm_loadu_si128(cp.add(at).cast());
                    let w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)), s);
                    let w1 = _mm256_mul_ps(
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8))),
                        s,
                    );
                    for r in 0..M {
                        let xb = xp.add(r * stride + at);
                        let a = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), total[r]);
                        total[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb.add(8)), a);
                    }
                }
                for i in start + 16 * chunks..end {
                    for r in 0..M {
                        tail[r] += scale * f32::from(c[i]) * x[r * stride + i];
                    }
                }
            }
            let out: [f32; M] = std::array::from_fn(|r| hsum(total[r]));
            out
        };
        for r in 0..M {
            out[r] += tail[r];
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

/// AVX-512 versions of the whole-row kernels, picked at run time (the build targets AVX2):
/// sixteen lanes and thirty-two registers let one decoded block serve sixteen rows.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code, clippy::needless_range_loop)]
mod avx512 {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx512f"))
    }

    /// The bounds [`super::row_4bit`] checked; callers check [`available`].
    pub fn row_4bit<const M: usize>(
        c: &[u8],
        x: &[f32],
        k: usize,
        stride: usize,
        gs: usize,
        scales: &[f32],
    ) -> [f32; M] {
        // SAFETY: `available()` established AVX-512F; the bounds are those of `super::row_4bit`.
        unsafe { row_4bit_impl(c, x, k, stride, gs, scales) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn row_4bit_impl<const M: usize>(
        c: &[u8],
        x: &[f32],
        k: usize,
        stride: usize,
        gs: usize,
        scales: &[f32],
    ) -> [f32; M] {
        // SAFETY: block `b < k/32` reads bytes `16b..16b+16` of `c` and floats
        // `r·k + 32b .. + 32` of `x`, within the lengths `super::row_4bit` asserted.
        unsafe {
            let mask = _mm_set1_epi8(0x0f);
            let mut total = [_mm512_setzero_ps(); M];
            let (cp, xp) = (c.as_ptr(), x.as_ptr());
            for (g, &scale) in scales.iter().enumerate().take(k.div_ceil(gs)) {
                let (first, last) = (g * gs / 32, ((g + 1) * gs).min(k) / 32);
                // The scale goes into the decoded weights (shared by all rows), so one
                // accumulator per row suffices.
                let s = _mm512_set1_ps(scale);
                for b in first..last {
                    let bytes = _mm_loadu_si128(cp.add(16 * b).cast());
                    let lo = _mm_and_si128(bytes, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
                    let w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), s);
                    let w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), s);
                    for r in 0..M {
                        let xb = xp.add(r * stride + 32 * b);
                        let a = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), total[r]);
                        total[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb.add(16)), a);
                    }
                }
            }
            std::array::from_fn(|r| _mm512_reduce_add_ps(total[r]))
        }
    }

    /// The bounds [`super::row_8bit`] checked; callers check [`available`].
    pub fn row_8bit<const M: usize>(
        c: &[u8],
        x: &[f32],
        k: usize,
        stride: usize,
        gs: usize,
        scales: &[f32],
    ) -> [f32; M] {
        // SAFETY: `available()` established AVX-512F; the bounds are those of `super::row_8bit`.
        unsafe { row_8bit_impl(c, x, k, stride, gs, scales) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn row_8bit_impl<const M: usize>(
        c: &[u8],
        x: &[f32],
        k: usize,
        stride: usize,
        gs: usize,
        scales: &[f32],
    ) -> [f32; M] {
        let mut tail = [0f32; M];
        // SAFETY: within group `g` (inputs `start..end ≤ k`), chunk `i` reads bytes
        // `start+16i .. +16 ≤ end` of `c` and the same floats of each row of `x`.
        let mut out: [f32; M] = unsafe {
            let mut total = [_mm512_setzero_ps(); M];
            let (cp, xp) = (c.as_ptr(), x.as_ptr());
            for (g, &scale) in scales.iter().enumerate().take(k.div_ceil(gs)) {
                let (start, end) = (g * gs, ((g + 1) * gs).min(k));
                let chunks = (end - start) / 16;
                let s = _mm512_set1_ps(scale);
                for i in 0..chunks {
                    let at = start + 16 * i;
                    let w = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                        cp.add(at).cast(),
                    )));
                    let w = _mm512_mul_ps(w, s);
                    for r in 0..M {
                        total[r] =
                            _mm512_fmadd_ps(w, _mm512_loadu_ps(xp.add(r * stride + at)), total[r]);
                    }
                }
                for i in start + 16 * chunks..end {
                    for r in 0..M {
                        tail[r] += scale * f32::from(c[i]) * x[r * stride + i];
                    }
                }
            }
            std::array::from_fn(|r| _mm512_reduce_add_ps(total[r]))
        };
        for r in 0..M {
            out[r] += tail[r];
        }
        out
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
    fn whole_rows_match_the_group_sums() {
        let k = 192;
        let (c, _) = data(k);
        let x: Vec<f32> = (0..3 * k)
            .map(|i| ((i * 7 % 17) as f32 - 8.0) * 0.05)
            .collect();
        for gs in [32usize, 64, 96, 192] {
            let scales: Vec<f32> = (0..k.div_ceil(gs)).map(|g| 0.5 + g as f32).collect();
            let got = row_4bit::<3>(&c[..k / 2], &x, k, k, gs, &scales);
            for r in 0..3 {
                let want: f32 = (0..k / gs)
                    .map(|g| {
                        let s = g * gs;
                        scales[g]
                            * portable::dot_4bit(
                                &c[s / 2..(s + gs) / 2],
                                &x[r * k + s..r * k + s + gs],
                            )
                    })
                    .sum();
                assert!(
                    (got[r] - want).abs() < 1e-3 * (1.0 + want.abs()),
                    "4-bit g{gs} row {r}"
                );
            }
        }
        for gs in [16usize, 40, 192] {
            let scales: Vec<f32> = (0..k.div_ceil(gs)).map(|g| 0.25 * (g + 1) as f32).collect();
            let got = row_8bit::<3>(&c, &x, k, k, gs, &scales);
            for r in 0..3 {
                let want: f32 = (0..k.div_ceil(gs))
                    .map(|g| {
                        let (s, e) = (g * gs, ((g + 1) * gs).min(k));
                        scales[g] * portable::dot_8bit(&c[s..e], &x[r * k + s..r * k + e])
                    })
                    .sum();
                assert!(
                    (got[r] - want).abs() < 1e-3 * (1.0 + want.abs()),
                    "8-bit g{gs} row {r}"
                );
            }
        }
    }

    #[test]
    fn kernels_match_the_portable_loops() {
        for n in [16usize, 48, 160] {
            let (c, x) = data(n);
            let k = 2 * n;
            let want = portable::dot_4bit(&c, &x[..k]);
            let got = row_4bit::<1>(&c, &x, k, k, k, &[1.0])[0];
            assert!(
                (got - want).abs() < 1e-3 * (1.0 + want.abs()),
                "4-bit dot, {n}"
            );
            let mut a = vec![0f32; k];
            let mut b = vec![0f32; k];
            dequantize_4bit(&c, 0.5, -3.0, &mut a);
            portable::dequantize_4bit(&c, 0.5, -3.0, &mut b);
            assert_eq!(a, b);
        }
        for n in [7usize, 16, 37, 160] {
            let (c, x) = data(n);
            let want = portable::dot_8bit(&c, &x[..n]);
            let got = row_8bit::<1>(&c, &x, n, n, n, &[1.0])[0];
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
