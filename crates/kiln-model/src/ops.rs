//! Fused CPU kernels that record their own backward pass.
//!
//! candle's fused softmax has no backward, and the differentiable composition (max, subtract,
//! exp, sum, divide) sweeps and allocates the whole tensor five times forward and more than
//! twice that backward. These ops do one pass forward and write the gradient from the saved
//! output with the closed forms:
//!
//! - softmax: `∂x = p ⊙ (g − Σ g⊙p)`;
//! - cross-entropy of logits `z` and target `t` per row: `ℓ = logsumexp(z) − z_t`,
//!   `∂z = g · (softmax(z) − onehot(t))`.
//!
//! - RMSNorm `y = w ⊙ x·r`, `r = (mean(x²) + ε)^(-1/2)` per row:
//!   `∂x = r·(g⊙w) − x·r³·mean(g⊙w⊙x)`, `∂w = Σ_rows g⊙x·r`;
//! - SwiGLU `y = silu(a) ⊙ u`: `∂a = g⊙u·σ(a)·(1 + a·(1 − σ(a)))`, `∂u = g⊙silu(a)`.
//!
//! They run for contiguous f32 tensors on the CPU; anything else takes the composed path, so
//! results never depend on which path ran (tests compare both and check finite differences).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Storage, Tensor,
};
use rayon::prelude::*;

/// The f32 values of a contiguous CPU storage; `what` names the op in the error.
pub fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// [`with_cpu_f32`] for three tensors at once.
pub(crate) fn with_cpu_f32_3<R>(
    (a, b, c): (&Tensor, &Tensor, &Tensor),
    what: &str,
    f: impl FnOnce(&[f32], &[f32], &[f32]) -> Result<R>,
) -> Result<R> {
    with_cpu_f32(a, what, |a| {
        with_cpu_f32(b, what, |b| with_cpu_f32(c, what, |c| f(a, b, c)))
    })
}

/// The values of a contiguous f32 storage and its row length (last dimension).
fn f32_rows<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<(&'a [f32], usize)> {
    let cols = layout.dims().last().copied().unwrap_or(1).max(1);
    Ok((contiguous_f32(storage, layout, what)?, cols))
}

/// The f32 values of a CPU tensor, borrowed for `f` (backward passes read their saved inputs
/// this way).
pub fn with_cpu_f32<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(contiguous_f32(cpu, layout, what)?),
        _ => candle_core::bail!("{what} must be on the CPU"),
    }
}

/// `eˣ` for f32, branch-free so that loops over slices vectorize (libm's `expf` is a call per
/// element, and was a tenth of a training step). Cody–Waite range reduction `x = n·ln 2 + r`
/// and Cephes' degree-6 polynomial for `eʳ`; within 2 ulp of `f32::exp` on `[-87, 88]`.
/// Inputs are clamped to that range: below it the result is ~1e-38 rather than 0, which no
/// softmax or sigmoid here can tell apart.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2²³ rounds to an integer and leaves it in the low mantissa bits: `n` and
    // its bits without a float-to-int conversion, which would not vectorize.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // 2ⁿ: the biased exponent n + 127 in the exponent field.
    let two_n = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits() - 127) << 23);
    er * two_n
}

/// Writes `exp(src − shift)` into `dst` and returns the sum.
pub(crate) fn exp_shifted_sum(src: &[f32], shift: f32, dst: &mut [f32]) -> f32 {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s - shift;
    }
    exp_sum_in_place(dst)
}

/// Replaces each value by its exponential and returns the sum, kept in eight lanes so that
/// the sum vectorizes too.
pub(crate) fn exp_sum_in_place(dst: &mut [f32]) -> f32 {
    for d in dst.iter_mut() {
        *d = fast_exp(*d);
    }
    let mut lanes = [0f32; 8];
    let chunks = dst.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

pub(crate) fn max_of(xs: &[f32]) -> f32 {
    xs.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

fn softmax_row(src: &[f32], dst: &mut [f32]) {
    let sum = exp_shifted_sum(src, max_of(src), dst);
    let inv = 1.0 / sum;
    dst.iter_mut().for_each(|d| *d *= inv);
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "kiln-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (src, cols) = f32_rows(storage, layout, self.name())?;
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(cols)
            .zip(src.par_chunks(cols))
            .for_each(|(d, s)| softmax_row(s, d));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let dot = (grad_res * res)?.sum_keepdim(D::Minus1)?;
        Ok(Some((res * grad_res.broadcast_sub(&dot)?)?))
    }
}

/// Softmax over the last dimension, differentiable, fused for f32 CPU tensors.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 && x.device().is_cpu() {
        x.contiguous()?.apply_op1(SoftmaxLastDim)
    } else {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }
}

struct CrossEntropy;

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "kiln-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (logits, cols) = f32_rows(s1, l1, self.name())?;
        let targets = contiguous_u32(s2, l2)?;
        let rows = logits.len() / cols;
        if targets.len() != rows {
            candle_core::bail!("{}: {} targets for {rows} rows", self.name(), targets.len());
        }
        let out: Vec<f32> = logits
            .par_chunks(cols)
            .zip(targets.par_iter())
            .map_init(
                || vec![0f32; cols],
                |scratch, (row, &t)| {
                    let max = max_of(row);
                    let sum = exp_shifted_sum(row, max, scratch);
                    max + sum.ln() - row.get(t as usize).copied().unwrap_or(f32::NAN)
                },
            )
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = logits.contiguous()?.apply_op3_no_bwd(
            &targets.contiguous()?,
            &grad.contiguous()?,
            &CrossEntropyGrad,
        )?;
        Ok((Some(grad), None))
    }
}

struct CrossEntropyGrad;

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "kiln-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (logits, cols) = f32_rows(s1, l1, self.name())?;
        let targets = contiguous_u32(s2, l2)?;
        let (grads, _) = f32_rows(s3, l3, self.name())?;
        let mut out = vec![0f32; logits.len()];
        out.par_chunks_mut(cols)
            .zip(logits.par_chunks(cols))
            .zip(targets.par_iter().zip(grads.par_iter()))
            .for_each(|((d, row), (&t, &g))| {
                softmax_row(row, d);
                d.iter_mut().for_each(|v| *v *= g);
                if let Some(v) = d.get_mut(t as usize) {
                    *v -= g;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// The u32 values of a contiguous CPU storage (token ids, targets).
pub(crate) fn contiguous_u32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [u32]> {
    let data = storage.as_slice::<u32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("targets must be contiguous"),
    }
}

/// Per-row cross-entropy `logsumexp(z) − z[target]` of logits `[rows, vocab]` and u32 targets
/// `[rows]`, differentiable with respect to the logits; fused for f32 CPU tensors.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.dtype() == DType::F32 && logits.device().is_cpu() && targets.dtype() == DType::U32 {
        logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, CrossEntropy)
    } else {
        let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        log_probs
            .gather(&targets.unsqueeze(1)?, 1)?
            .squeeze(1)?
            .neg()
    }
}

/// `(mean(x²) + ε)^(-1/2)` of one row.
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let mean_sq = row.iter().map(|x| x * x).sum::<f32>() / row.len() as f32;
    1.0 / (mean_sq + eps).sqrt()
}

/// RMSNorm of each `w.len()`-wide row of `x` into `out`.
pub(crate) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let cols = w.len();
    out.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .for_each(|(y, x)| {
            let r = inv_rms(x, eps);
            for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                *y = x * r * w;
            }
        });
}

/// The RMSNorm backward pass: writes `∂x` for the output gradient `g` and returns `∂w`.
pub(crate) fn rms_norm_backward_rows(
    x: &[f32],
    w: &[f32],
    eps: f32,
    g: &[f32],
    dx: &mut [f32],
) -> Vec<f32> {
    // Partial weight gradients over fixed blocks of rows, summed in order: the result must
    // not depend on how rayon splits the work, or a resumed run would drift from the
    // uninterrupted one in the last bits.
    const BLOCK_ROWS: usize = 64;
    let cols = w.len();
    let block = cols * BLOCK_ROWS;
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(block)
        .zip(x.par_chunks(block).zip(g.par_chunks(block)))
        .map(|(dx, (x, g))| {
            let mut dw = vec![0f32; cols];
            for (dx, (x, g)) in dx
                .chunks_exact_mut(cols)
                .zip(x.chunks_exact(cols).zip(g.chunks_exact(cols)))
            {
                let r = inv_rms(x, eps);
                let dot: f32 = g.iter().zip(w).zip(x).map(|((g, w), x)| g * w * x).sum();
                let c = r * r * r * dot / cols as f32;
                for i in 0..cols {
                    dx[i] = r * g[i] * w[i] - c * x[i];
                    dw[i] += g[i] * x[i] * r;
                }
            }
            dw
        })
        .collect();
    let mut dw = vec![0f32; cols];
    for p in &partials {
        dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    dw
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "kiln-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, cols) = f32_rows(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        if w.len() != cols {
            candle_core::bail!("{}: weight of {} for rows of {cols}", self.name(), w.len());
        }
        let mut out = vec![0f32; x.len()];
        rms_norm_rows(x, w, self.eps, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = with_cpu_f32_3((x, w, grad), self.name(), |x, w, g| {
            let mut dx = vec![0f32; x.len()];
            let dw = rms_norm_backward_rows(x, w, self.eps, g, &mut dx);
            Ok((dx, dw))
        })?;
        // A frozen input (the norm weight of a LoRA run) gets no gradient to store.
        Ok((
            x.track_op()
                .then(|| Tensor::from_vec(dx, x.shape(), x.device()))
                .transpose()?,
            w.track_op()
                .then(|| Tensor::from_vec(dw, w.shape(), w.device()))
                .transpose()?,
        ))
    }
}

/// RMSNorm over the last dimension with weight `w`, differentiable in both; fused for f32 CPU
/// tensors.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if x.dtype() == DType::F32 && w.dtype() == DType::F32 && x.device().is_cpu() {
        x.contiguous()?
            .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
    } else {
        let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&inv_rms)?.broadcast_mul(w)
    }
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

/// Elements per parallel work item of the element-wise kernels.
const ELEMENTWISE_CHUNK: usize = 4096;

/// `silu(a) ⊙ u` into `out`.
pub(crate) fn swiglu_slices(a: &[f32], u: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(
            a.par_chunks(ELEMENTWISE_CHUNK)
                .zip(u.par_chunks(ELEMENTWISE_CHUNK)),
        )
        .for_each(|(y, (a, u))| {
            for ((y, &a), &u) in y.iter_mut().zip(a).zip(u) {
                *y = a * sigmoid(a) * u;
            }
        });
}

/// The SwiGLU backward pass for the output gradient `g`: `∂a` and `∂u`.
pub(crate) fn swiglu_backward_slices(
    a: &[f32],
    u: &[f32],
    g: &[f32],
    da: &mut [f32],
    du: &mut [f32],
) {
    let n = ELEMENTWISE_CHUNK;
    da.par_chunks_mut(n)
        .zip(du.par_chunks_mut(n))
        .zip(a.par_chunks(n).zip(u.par_chunks(n)).zip(g.par_chunks(n)))
        .for_each(|((da, du), ((a, u), g))| {
            for i in 0..a.len() {
                let s = sigmoid(a[i]);
                da[i] = g[i] * u[i] * s * (1.0 + a[i] * (1.0 - s));
                du[i] = g[i] * a[i] * s;
            }
        });
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "kiln-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = contiguous_f32(s1, l1, self.name())?;
        let u = contiguous_f32(s2, l2, self.name())?;
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "{}: gate {:?} vs up {:?}",
                self.name(),
                l1.dims(),
                l2.dims()
            );
        }
        let mut out = vec![0f32; a.len()];
        swiglu_slices(a, u, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (da, du) = with_cpu_f32_3((a, u, grad), self.name(), |a, u, g| {
            let mut da = vec![0f32; a.len()];
            let mut du = vec![0f32; a.len()];
            swiglu_backward_slices(a, u, g, &mut da, &mut du);
            Ok((da, du))
        })?;
        Ok((
            Some(Tensor::from_vec(da, a.shape(), a.device())?),
            Some(Tensor::from_vec(du, u.shape(), u.device())?),
        ))
    }
}

/// `silu(gate) ⊙ up`, the gated activation of the Llama MLP, differentiable in both; fused
/// for f32 CPU tensors.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dtype() == DType::F32 && up.dtype() == DType::F32 && gate.device().is_cpu() {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
    } else {
        gate.silu()? * up
    }
}

/// SplitMix64's finaliser: a bijective 64-bit mix, the hash behind dropout masks.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Element `i` of the dropout mask `seed` draws for drop probability `p`: `0` for a dropped
/// element, `1 / (1 − p)` for a kept one (inverted dropout, as `torch.nn.Dropout` scales).
/// A pure function of `(seed, i)`, so a backward pass regenerates the forward pass's mask
/// instead of storing it, and any thread order gives the same mask.
#[inline]
pub fn dropout_keep_scale(seed: u64, i: usize, p: f32) -> f32 {
    let u = (mix64(seed ^ mix64(i as u64)) >> 40) as f32 / (1u64 << 24) as f32;
    if u < p { 0.0 } else { 1.0 / (1.0 - p) }
}

/// The whole mask of [`dropout_keep_scale`] for `len` elements.
pub fn dropout_mask(seed: u64, len: usize, p: f32) -> Vec<f32> {
    let mut mask = vec![0f32; len];
    dropout_mask_into(seed, p, &mut mask, |_, m, _| m);
    mask
}

/// `out[i] = f(i, mask[i], out[i])` for the mask of [`dropout_keep_scale`], in parallel.
pub fn dropout_mask_into(
    seed: u64,
    p: f32,
    out: &mut [f32],
    f: impl Fn(usize, f32, f32) -> f32 + Sync,
) {
    const CHUNK: usize = 1 << 14;
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (j, o) in chunk.iter_mut().enumerate() {
                let i = c * CHUNK + j;
                *o = f(i, dropout_keep_scale(seed, i, p), *o);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_matches_finite_differences, max_diff, weighted_sum};
    use candle_core::{Device, Var};

    /// The composed reference: differentiable candle ops only.
    fn composed_softmax(x: &Tensor) -> Result<Tensor> {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }

    #[test]
    fn softmax_matches_composed_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (3, 5, 17), &dev)?))?;
        let w = Tensor::randn(0f32, 1.0, (3, 5, 17), &dev)?;
        let fused = softmax_last_dim(x.as_tensor())?;
        let composed = composed_softmax(x.as_tensor())?;
        assert!(max_diff(&fused, &composed) < 1e-6);
        let gf = (fused * &w)?.sum_all()?.backward()?;
        let gc = (composed * &w)?.sum_all()?.backward()?;
        let (a, b) = (
            gf.get(x.as_tensor()).expect("grad"),
            gc.get(x.as_tensor()).expect("grad"),
        );
        assert!(max_diff(a, b) < 1e-6, "{}", max_diff(a, b));
        Ok(())
    }

    #[test]
    fn cross_entropy_matches_composed_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let z = Var::from_tensor(&Tensor::randn(0f32, 2.0, (6, 11), &dev)?)?;
        let t = Tensor::new(&[0u32, 3, 10, 5, 5, 1], &dev)?;
        let w = Tensor::new(&[1.0f32, 0.5, 2.0, -1.0, 0.25, 3.0], &dev)?;
        let fused = cross_entropy_rows(z.as_tensor(), &t)?;
        let lp = candle_nn::ops::log_softmax(z.as_tensor(), D::Minus1)?;
        let composed = lp.gather(&t.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
        assert!(max_diff(&fused, &composed) < 1e-5);
        let loss = |x: &Tensor| -> Result<f32> {
            (cross_entropy_rows(x, &t)? * &w)?
                .sum_all()?
                .to_scalar::<f32>()
        };
        let gf = (fused * &w)?.sum_all()?.backward()?;
        let gc = (composed * &w)?.sum_all()?.backward()?;
        let grad = gf.get(z.as_tensor()).expect("grad");
        assert!(max_diff(grad, gc.get(z.as_tensor()).expect("grad")) < 1e-5);
        // Central differences on a few coordinates, in f64 arithmetic around f32 values.
        let base: Vec<Vec<f32>> = z.as_tensor().to_vec2()?;
        let g: Vec<Vec<f32>> = grad.to_vec2()?;
        let eps = 1e-2f32;
        for (r, c) in [(0, 0), (1, 3), (2, 7), (5, 1), (4, 5)] {
            let mut plus = base.clone();
            plus[r][c] += eps;
            let mut minus = base.clone();
            minus[r][c] -= eps;
            let fd = (loss(&Tensor::new(plus, &dev)?)? - loss(&Tensor::new(minus, &dev)?)?)
                / (2.0 * eps);
            assert!(
                (fd - g[r][c]).abs() < 2e-3,
                "({r},{c}): finite difference {fd} vs {}",
                g[r][c]
            );
        }
        Ok(())
    }

    /// Checks a fused two-input op against its composition: values, gradients of a weighted
    /// sum, and central differences on a few coordinates.
    fn check_op2(
        fused: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
        composed: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
        a: Tensor,
        b: Tensor,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let (va, vb) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
        let yf = fused(va.as_tensor(), vb.as_tensor())?;
        let yc = composed(va.as_tensor(), vb.as_tensor())?;
        assert!(max_diff(&yf, &yc) < 1e-5, "forward {}", max_diff(&yf, &yc));
        let w = Tensor::randn(0f32, 1.0, yf.shape(), &dev)?;
        let gf = (&yf * &w)?.sum_all()?.backward()?;
        let gc = (&yc * &w)?.sum_all()?.backward()?;
        for v in [&va, &vb] {
            let (x, y) = (gf.get(v).expect("fused"), gc.get(v).expect("composed"));
            assert!(max_diff(x, y) < 1e-4, "gradient {}", max_diff(x, y));
        }
        assert_matches_finite_differences(&[&va, &vb], &gf, |x| {
            weighted_sum(&fused(&x[0], &x[1])?, &w)
        })?;
        Ok(())
    }

    #[test]
    fn rms_norm_matches_composed_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        check_op2(
            |x, w| rms_norm(x, w, 1e-5),
            |x, w| {
                let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?
                    .sqrt()?
                    .recip()?;
                x.broadcast_mul(&inv)?.broadcast_mul(w)
            },
            Tensor::randn(0f32, 2.0, (5, 3, 16), &dev)?,
            Tensor::randn(1f32, 0.3, 16, &dev)?,
        )
    }

    #[test]
    fn swiglu_matches_composed_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        check_op2(
            swiglu,
            |a, u| a.silu()? * u,
            Tensor::randn(0f32, 2.0, (4, 33), &dev)?,
            Tensor::randn(0f32, 1.0, (4, 33), &dev)?,
        )
    }

    #[test]
    fn fast_exp_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (want, got) = (x.exp(), fast_exp(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_3;
        }
        assert!(worst < 3.0 * f32::EPSILON, "worst relative error {worst}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert!(fast_exp(-1000.0) < 1e-37 && fast_exp(-1000.0) >= 0.0);
        assert!(fast_exp(1000.0).is_finite());
    }

    #[test]
    fn dropout_mask_drops_about_p_and_rescales() {
        let mask = dropout_mask(7, 100_000, 0.25);
        let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f64 / mask.len() as f64;
        assert!((dropped - 0.25).abs() < 0.01, "dropped {dropped}");
        assert!(
            mask.iter()
                .all(|&m| m == 0.0 || (m - 1.0 / 0.75).abs() < 1e-6)
        );
        assert_eq!(
            mask,
            dropout_mask(7, 100_000, 0.25),
            "a seed gives one mask"
        );
        assert_ne!(mask, dropout_mask(8, 100_000, 0.25));
        assert!(dropout_mask(7, 1000, 0.0).iter().all(|&m| m == 1.0));
    }
}
