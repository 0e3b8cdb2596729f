//! The packed weight a quantized [`crate::Linear`] multiplies with, and its two kernels.
//!
//! Layout: one run of codes per output row, inputs in kernel order (act-order permutations are
//! applied once, at packing, and the activations are gathered to match). 8-bit codes take a
//! byte each; 4-bit codes go 32 to 16 bytes, byte `j` holding code `j` in its low nibble and
//! code `j + 16` in its high one, so one block decodes to two runs of 16 lanes. Each group of
//! `group_size` inputs has an f32 `scale` and `min`: `w = scale · q + min`.
//!
//! - **Up to 8 rows** (decode, small batched decode): each block of codes is decoded once, in
//!   registers (AVX2, or AVX-512 when the CPU has it), and multiplied with every row while hot;
//!   the memory read is the packed weight, ~7× less than f32 at 4 bits.
//! - **More rows** (prompt processing, large batches): the weight is dequantized into a reused
//!   f32 scratch and multiplied by the GEMM in one call, in the orientation measured fastest for
//!   the row count (`W·xᵀ` up to 64 rows, `x·Wᵀ` from a `[in, out]` scratch beyond). The decode
//!   costs O(out · in) per call against O(rows · out · in) for the product.
//!
//! Measured (2048 × 2048, 2 cores, `cargo bench -p kiln-quant --bench quant_matmul`), 4-bit
//! against f32: 1 row 0.21 vs 0.70 ms, 8 rows 0.71–0.92 vs 1.27, 16 rows 1.93 vs 1.72, 32 rows
//! 2.33 vs 3.40, 64 rows 3.46 vs 6.14, 512 rows 19.1 vs 16.4.

use candle_core::Result;
use rayon::prelude::*;

use super::{QuantizedMatrix, simd};
use crate::gemm::{MatMut, MatRef, matmul_threaded};

/// Up to this many activation rows take the decode-in-registers kernel; more take the tiled
/// dequantize + GEMM one (the crossover measured in kiln-quant's `benches/quant_matmul.rs`).
const MAX_GEMV_ROWS: usize = 8;
/// Matrices with fewer weights than this run the decode kernel on the calling thread: a
/// narrow model's layers take microseconds, less than waking the thread pool.
const SEQUENTIAL_WEIGHTS: usize = 1 << 16;
/// Up to this many rows the GEMM path multiplies `W·xᵀ` (see `narrow_gemm`).
const NARROW_GEMM_ROWS: usize = 64;
/// The fewest output rows a tile of the GEMM path dequantizes at once.
const TILE_ROWS: usize = 32;
/// The most weights the GEMM path dequantizes at once (256 MiB of f32).
const MAX_SCRATCH: usize = 1 << 26;
/// The fewest output rows a task of the decode path computes.
const GEMV_CHUNK: usize = 16;

/// A `[out_features, in_features]` weight as 4- or 8-bit codes with a scale and an offset per
/// group of inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedWeight {
    bits: u8,
    group_size: usize,
    in_features: usize,
    out_features: usize,
    /// `out_features` rows of `row_bytes` each.
    codes: Vec<u8>,
    /// `[out_features, n_groups]`.
    scales: Vec<f32>,
    mins: Vec<f32>,
    /// Kernel input `k` reads activation `perm[k]`; `None` for the natural order.
    perm: Option<Vec<u32>>,
}

impl PackedWeight {
    /// Packs codes given in natural order, row-major `[out, in]` (`q[o · in + i]`, each below
    /// `2^bits`), with `scales` and `mins` `[out, n_groups]`. `g_idx`, when given, is the group of
    /// each input; inputs are then reordered so that every group is contiguous, which requires
    /// each group to hold `group_size` inputs (the last one may hold fewer).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        bits: u8,
        group_size: usize,
        out_features: usize,
        in_features: usize,
        q: &[u8],
        scales: Vec<f32>,
        mins: Vec<f32>,
        g_idx: Option<&[u32]>,
    ) -> Result<Self> {
        let n_groups = in_features.div_ceil(group_size.max(1));
        if !matches!(bits, 4 | 8) {
            candle_core::bail!("packed weights hold 4- or 8-bit codes, not {bits}");
        }
        if group_size == 0
            || (bits == 4 && (!group_size.is_multiple_of(32) || !in_features.is_multiple_of(32)))
        {
            candle_core::bail!(
                "a 4-bit packed weight needs groups and rows of whole 32-input blocks \
                 (group size {group_size}, {in_features} inputs)"
            );
        }
        if q.len() != out_features * in_features
            || scales.len() != out_features * n_groups
            || mins.len() != out_features * n_groups
        {
            candle_core::bail!(
                "packing a {out_features}x{in_features} weight in groups of {group_size}: got {} \
                 codes, {} scales, {} mins (expected {}, {n}, {n})",
                q.len(),
                scales.len(),
                mins.len(),
                out_features * in_features,
                n = out_features * n_groups
            );
        }
        let perm = match g_idx {
            Some(g) => Self::group_order(g, group_size, n_groups)?,
            None => None,
        };
        let mut this = Self {
            bits,
            group_size,
            in_features,
            out_features,
            codes: Vec::new(),
            scales,
            mins,
            perm,
        };
        let row_bytes = this.row_bytes();
        let mut codes = vec![0u8; out_features * row_bytes];
        let mut ordered = vec![0u8; in_features];
        for (o, dst) in codes.chunks_mut(row_bytes).enumerate() {
            let row = &q[o * in_features..(o + 1) * in_features];
            match &this.perm {
                Some(p) => {
                    for (v, &src) in ordered.iter_mut().zip(p) {
                        *v = row[src as usize];
                    }
                }
                None => ordered.copy_from_slice(row),
            }
            if bits == 8 {
                dst.copy_from_slice(&ordered);
            } else {
                for (block, out) in ordered.chunks(32).zip(dst.chunks_mut(16)) {
                    for j in 0..16 {
                        out[j] = (block[j] & 0x0f) | (block[j + 16] << 4);
                    }
                }
            }
        }
        this.codes = codes;
        Ok(this)
    }

    /// Packs a GPTQ/AWQ-style matrix: `min = −scale · zero`.
    pub fn from_quantized(m: &QuantizedMatrix) -> Result<Self> {
        m.validate()?;
        let mins = m
            .scales
            .iter()
            .zip(&m.zeros)
            .map(|(s, &z)| -s * f32::from(z))
            .collect();
        Self::new(
            m.bits,
            m.group_size,
            m.out_features,
            m.in_features,
            &m.q,
            m.scales.clone(),
            mins,
            m.g_idx.as_deref(),
        )
    }

    /// The order that makes every group contiguous, or `None` when the inputs already are.
    fn group_order(g_idx: &[u32], group_size: usize, n_groups: usize) -> Result<Option<Vec<u32>>> {
        if g_idx
            .iter()
            .enumerate()
            .all(|(i, &g)| g as usize == i / group_size)
        {
            return Ok(None);
        }
        let mut perm: Vec<u32> = (0..g_idx.len() as u32).collect();
        perm.sort_by_key(|&i| g_idx[i as usize]);
        for (k, &i) in perm.iter().enumerate() {
            let g = g_idx[i as usize] as usize;
            if g != k / group_size || g >= n_groups {
                candle_core::bail!(
                    "g_idx puts input {i} in group {g}, but groups must each hold {group_size} inputs"
                );
            }
        }
        Ok(Some(perm))
    }

    pub fn bits(&self) -> u8 {
        self.bits
    }

    pub fn group_size(&self) -> usize {
        self.group_size
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Bytes held in memory: codes, scales, offsets and the permutation.
    pub fn storage_bytes(&self) -> usize {
        self.codes.len()
            + 4 * (self.scales.len() + self.mins.len())
            + 4 * self.perm.as_ref().map_or(0, Vec::len)
    }

    fn n_groups(&self) -> usize {
        self.in_features.div_ceil(self.group_size)
    }

    fn row_bytes(&self) -> usize {
        self.in_features * usize::from(self.bits) / 8
    }

    /// The codes of output row `o` in natural input order.
    pub fn codes_of_row(&self, o: usize) -> Vec<u8> {
        let row = &self.codes[o * self.row_bytes()..(o + 1) * self.row_bytes()];
        let ordered: Vec<u8> = if self.bits == 8 {
            row.to_vec()
        } else {
            row.chunks(16)
                .flat_map(|b| {
                    let lo = b.iter().map(|&c| c & 0x0f);
                    let hi = b.iter().map(|&c| c >> 4);
                    lo.chain(hi).collect::<Vec<_>>()
                })
                .collect()
        };
        match &self.perm {
            Some(p) => {
                let mut natural = vec![0u8; self.in_features];
                for (k, &i) in p.iter().enumerate() {
                    natural[i as usize] = ordered[k];
                }
                natural
            }
            None => ordered,
        }
    }

    /// Dequantizes row `o` in kernel order into `dst`.
    fn dequantize_row_ordered(&self, o: usize, dst: &mut [f32]) {
        self.dequantize_range(o, 0, self.in_features, dst);
    }

    /// Dequantizes inputs `i0..i1` (kernel order) of row `o` into `dst`; `i0` starts a group.
    fn dequantize_range(&self, o: usize, i0: usize, i1: usize, dst: &mut [f32]) {
        let rb = self.row_bytes();
        let bits = usize::from(self.bits);
        let codes = &self.codes[o * rb + i0 * bits / 8..o * rb + i1 * bits / 8];
        let g_n = self.n_groups();
        let gs = self.group_size;
        let (scales, mins) = (
            &self.scales[o * g_n + i0 / gs..(o + 1) * g_n],
            &self.mins[o * g_n + i0 / gs..(o + 1) * g_n],
        );
        let bytes_per_group = gs * bits / 8;
        for (g, (w, c)) in dst[..i1 - i0]
            .chunks_mut(gs)
            .zip(codes.chunks(bytes_per_group))
            .enumerate()
        {
            if self.bits == 8 {
                simd::dequantize_8bit(c, scales[g], mins[g], w);
            } else {
                simd::dequantize_4bit(c, scales[g], mins[g], w);
            }
        }
    }

    /// The dense weight, row-major `[out_features, in_features]`, natural input order.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut ordered = vec![0f32; self.in_features];
        let mut out = vec![0f32; self.out_features * self.in_features];
        for (o, row) in out.chunks_mut(self.in_features).enumerate() {
            self.dequantize_row_ordered(o, &mut ordered);
            match &self.perm {
                Some(p) => {
                    for (k, &i) in p.iter().enumerate() {
                        row[i as usize] = ordered[k];
                    }
                }
                None => row.copy_from_slice(&ordered),
            }
        }
        out
    }

    /// `y = x · Wᵀ` for `rows` activation rows `x` (`[rows, in_features]`, row-major); returns
    /// `[rows, out_features]`.
    pub fn matmul(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let (k, n) = (self.in_features, self.out_features);
        if x.len() != rows * k {
            candle_core::bail!(
                "quantized matmul: {} activations for {rows} rows of {k}",
                x.len()
            );
        }
        let gathered;
        let x = match &self.perm {
            Some(p) => {
                gathered = x
                    .chunks(k)
                    .flat_map(|row| p.iter().map(|&i| row[i as usize]))
                    .collect::<Vec<f32>>();
                &gathered[..]
            }
            None => x,
        };
        if rows > MAX_GEMV_ROWS {
            return self.tiled_gemm(x, rows);
        }
        if rows == 1 {
            let mut y = vec![0f32; n];
            self.gemv::<1>(x, &mut y);
            return Ok(y);
        }
        // The kernel writes yᵀ (`[out, rows]`): each task owns a run of outputs.
        let mut yt = vec![0f32; n * rows];
        match rows {
            2 => self.gemv::<2>(x, &mut yt),
            3 => self.gemv::<3>(x, &mut yt),
            4 => self.gemv::<4>(x, &mut yt),
            5 => self.gemv::<5>(x, &mut yt),
            6 => self.gemv::<6>(x, &mut yt),
            7 => self.gemv::<7>(x, &mut yt),
            _ => self.gemv::<8>(x, &mut yt),
        }
        let mut y = vec![0f32; rows * n];
        scatter_transposed(&yt, rows, n, 0, &mut y);
        Ok(y)
    }

    /// Decode-in-registers kernel for `M` rows: each block of codes is decoded once and
    /// multiplied with every row.
    fn gemv<const M: usize>(&self, x: &[f32], yt: &mut [f32]) {
        let (k, gs, g_n) = (self.in_features, self.group_size, self.n_groups());
        // Σx per row and group: the `min` term of every output is `min · Σx`.
        let xsum: Vec<f32> = x
            .chunks(k)
            .flat_map(|row| row.chunks(gs).map(|g| g.iter().sum::<f32>()))
            .collect();
        let rb = self.row_bytes();
        // Rows of x whose starts are a multiple of 4 KiB apart fall into the same L1 sets, and
        // sixteen of them thrash it (measured: 16 rows ran at 2× the time of 8); a copy with
        // rows one cache line further apart avoids it.
        let stride = if M > 1 && k % 1024 == 0 { k + 16 } else { k };
        let padded;
        let x = if stride == k {
            x
        } else {
            let mut p = vec![0f32; M * stride];
            for (dst, src) in p.chunks_mut(stride).zip(x.chunks(k)) {
                dst[..k].copy_from_slice(src);
            }
            padded = p;
            &padded[..]
        };
        // A few tasks per thread: enough to balance, few enough that scheduling is free; small
        // matrices (a narrow model's) run on the calling thread.
        let chunk_rows = if self.out_features * k < SEQUENTIAL_WEIGHTS {
            self.out_features
        } else {
            (self.out_features / (4 * rayon::current_num_threads())).max(GEMV_CHUNK)
        };
        let task = |(chunk, out): (usize, &mut [f32])| {
            for (local, y) in out.chunks_exact_mut(M).enumerate() {
                let o = chunk * chunk_rows + local;
                let codes = &self.codes[o * rb..(o + 1) * rb];
                let scales = &self.scales[o * g_n..(o + 1) * g_n];
                let mins = &self.mins[o * g_n..(o + 1) * g_n];
                let mut acc = if self.bits == 4 {
                    simd::row_4bit::<M>(codes, x, k, stride, gs, scales)
                } else {
                    simd::row_8bit::<M>(codes, x, k, stride, gs, scales)
                };
                for (r, a) in acc.iter_mut().enumerate() {
                    let xs = &xsum[r * g_n..(r + 1) * g_n];
                    *a += mins.iter().zip(xs).map(|(m, s)| m * s).sum::<f32>();
                }
                y.copy_from_slice(&acc);
            }
        };
        if chunk_rows >= self.out_features {
            task((0, yt));
        } else {
            yt.par_chunks_mut(chunk_rows * M).enumerate().for_each(task);
        }
    }

    /// Dequantizes the weight (in parallel) into a reused scratch buffer laid out `[in, out]`,
    /// the layout `kiln serve` gives dense weights (`Linear::store_transposed`), and multiplies
    /// it with the threaded GEMM in one call: the product then costs what the f32 one costs, plus
    /// the decode. Measured (2048 × 2048, 512 rows): one call over the whole matrix ran at the f32
    /// product's speed, where tiles of 512 rows, each re-packing the activations, ran up to 2×
    /// slower; and on a 100M-parameter model's 128-token prefill the `[out, in]` layout read
    /// transposed ran 1.6× slower than f32. Matrices above `MAX_SCRATCH` weights go in tiles of
    /// output columns, to bound the scratch.
    fn tiled_gemm(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let (k, n) = (self.in_features, self.out_features);
        let tile_cols = (MAX_SCRATCH / k).clamp(TILE_ROWS, n.max(TILE_ROWS));
        if rows <= NARROW_GEMM_ROWS {
            return self.narrow_gemm(x, rows, tile_cols);
        }
        let mut y = vec![0f32; rows * n];
        // Each thread decodes a band of inputs (whole groups) for every output, sixteen outputs
        // at a time, and writes its own rows of the scratch.
        let gs = self.group_size;
        let band = k.div_ceil(rayon::current_num_threads()).div_ceil(gs).max(1) * gs;
        SCRATCH.with(|cell| -> Result<()> {
            let mut scratch = cell.borrow_mut();
            for first in (0..n).step_by(tile_cols) {
                let t = tile_cols.min(n - first);
                scratch.resize(k * t, 0.0);
                scratch
                    .par_chunks_mut(band * t)
                    .enumerate()
                    .for_each(|(part, dst)| {
                        let (i0, i1) = (part * band, ((part + 1) * band).min(k));
                        let len = i1 - i0;
                        let mut buf = vec![0f32; 16 * len];
                        for o0 in (0..t).step_by(16) {
                            let cnt = 16.min(t - o0);
                            for (r, row) in buf.chunks_mut(len).take(cnt).enumerate() {
                                self.dequantize_range(first + o0 + r, i0, i1, row);
                            }
                            for i in 0..len {
                                let line = &mut dst[i * t + o0..i * t + o0 + cnt];
                                for (r, v) in line.iter_mut().enumerate() {
                                    *v = buf[r * len + i];
                                }
                            }
                        }
                    });
                let mut dst = MatMut::new(&mut y, first, rows, t, n)?;
                let w = MatRef::new(&scratch, 0, k, t, t)?;
                let xs = MatRef::new(x, 0, rows, k, k)?;
                matmul_threaded(&mut dst, xs, w, 1.0, false)?;
            }
            Ok(())
        })?;
        Ok(y)
    }

    /// The GEMM path for a few dozen rows: the weight dequantized in its own `[out, in]` layout
    /// (no transposition), `yᵀ = W·xᵀ`, then `y`. Measured on 2048 × 2048 at 64 rows: 3.2 ms,
    /// against 7.1 ms through the `[in, out]` scratch and 5.2 ms for f32; at 512 rows the other
    /// way round (29 ms against 19).
    fn narrow_gemm(&self, x: &[f32], rows: usize, tile_rows: usize) -> Result<Vec<f32>> {
        let (k, n) = (self.in_features, self.out_features);
        let mut y = vec![0f32; rows * n];
        SCRATCH.with(|cell| -> Result<()> {
            let mut scratch = cell.borrow_mut();
            for first in (0..n).step_by(tile_rows) {
                let t = tile_rows.min(n - first);
                scratch.resize(k * t, 0.0);
                scratch
                    .par_chunks_mut(k)
                    .enumerate()
                    .for_each(|(local, w)| {
                        self.dequantize_row_ordered(first + local, w);
                    });
                let mut yt = vec![0f32; t * rows];
                let mut dst = MatMut::new(&mut yt, 0, t, rows, rows)?;
                let w = MatRef::new(&scratch, 0, t, k, k)?;
                let xt = MatRef::new(x, 0, rows, k, k)?.t();
                matmul_threaded(&mut dst, w, xt, 1.0, false)?;
                scatter_transposed(&yt, rows, n, first, &mut y);
            }
            Ok(())
        })?;
        Ok(y)
    }
}

/// Writes `yt` (`[outputs, rows]`) into columns `first..` of `y` (`[rows, n]`).
fn scatter_transposed(yt: &[f32], rows: usize, n: usize, first: usize, y: &mut [f32]) {
    for (o, col) in yt.chunks(rows).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            y[r * n + first + o] = v;
        }
    }
}

thread_local! {
    /// The dequantized weights of [`PackedWeight::tiled_gemm`], reused across calls.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_matrix(bits: u8, group: usize, out: usize, inp: usize, seed: u64) -> QuantizedMatrix {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let maxq = (1u16 << bits) - 1;
        let g_n = inp.div_ceil(group);
        QuantizedMatrix {
            bits,
            group_size: group,
            out_features: out,
            in_features: inp,
            q: (0..out * inp)
                .map(|_| rng.random_range(0..=maxq) as u8)
                .collect(),
            scales: (0..out * g_n)
                .map(|_| rng.random_range(0.01..0.1))
                .collect(),
            zeros: (0..out * g_n)
                .map(|_| rng.random_range(0..=maxq) as u8)
                .collect(),
            g_idx: None,
        }
    }

    fn reference(w: &[f32], x: &[f32], rows: usize, out: usize, inp: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * out];
        for r in 0..rows {
            for o in 0..out {
                y[r * out + o] = (0..inp)
                    .map(|i| f64::from(w[o * inp + i]) * f64::from(x[r * inp + i]))
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    fn check(m: &QuantizedMatrix) -> Result<()> {
        let packed = PackedWeight::from_quantized(m)?;
        let w = m.dequantize();
        let pw = packed.dequantize();
        for (a, b) in w.iter().zip(&pw) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + a.abs()), "{a} vs {b}");
        }
        for o in [0, m.out_features - 1] {
            assert_eq!(
                packed.codes_of_row(o),
                m.q[o * m.in_features..(o + 1) * m.in_features]
            );
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for rows in [1, 3, 8, 12, 16, 17, 33, 70] {
            let x: Vec<f32> = (0..rows * m.in_features)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let got = packed.matmul(&x, rows)?;
            let want = reference(&w, &x, rows, m.out_features, m.in_features);
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() < 1e-3 * (1.0 + b.abs()),
                    "rows {rows}: {a} vs {b}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn both_kernels_match_the_dequantized_product() -> Result<()> {
        check(&random_matrix(4, 32, 40, 96, 1))?;
        check(&random_matrix(4, 64, 33, 128, 2))?;
        check(&random_matrix(8, 16, 19, 72, 3))?;
        check(&random_matrix(8, 72, 5, 72, 4))?;
        Ok(())
    }

    #[test]
    fn act_order_groups_are_gathered() -> Result<()> {
        let mut m = random_matrix(4, 32, 24, 96, 5);
        // Groups formed in a shuffled order of the inputs, as act-order does.
        let mut order: Vec<usize> = (0..96).collect();
        order.reverse();
        order.swap(3, 50);
        let mut g_idx = vec![0u32; 96];
        for (k, &i) in order.iter().enumerate() {
            g_idx[i] = (k / 32) as u32;
        }
        m.g_idx = Some(g_idx);
        check(&m)
    }

    #[test]
    fn bad_shapes_are_named() {
        let m = random_matrix(4, 32, 8, 64, 6);
        let err = PackedWeight::new(4, 32, 8, 64, &m.q[1..], m.scales.clone(), m.scales, None)
            .unwrap_err();
        assert!(err.to_string().contains("511 codes"), "{err}");
        let err = PackedWeight::new(4, 16, 8, 64, &m.q, vec![], vec![], None).unwrap_err();
        assert!(err.to_string().contains("32-input blocks"), "{err}");
    }
}
