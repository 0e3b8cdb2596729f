//! Fused CPU kernels that record their own backward pass.
//!
//! candle's fused softmax has no backward, and the differentiable composition (max, subtract,
//! exp, sum, divide) sweeps and allocates the whole tensor five times forward and more than
//! twice that backward. These ops do one pass forward and write the gradient from the saved
//! output with the closed forms:
//!
//! - softmax: `∂x = p ⊙ (g − Σ g⊙p)`;
//! - RMSNorm `y = x·r·w` with `r = (mean(x²) + ε)^(−1/2)` per row:
//!   `∂x = r·(g⊙w) − x·r³·mean(g⊙w⊙x)`, `∂w = Σ_rows g⊙x·r`;
//! - cross-entropy of logits `z` and target `t` per row: `ℓ = logsumexp(z) − z_t`,
//!   `∂z = g · (softmax(z) − onehot(t))`.
//!
//! They run for contiguous f32 tensors on the CPU; anything else takes the composed path, so
//! results never depend on which path ran (tests compare both and check finite differences).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

fn f32_rows<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<(&'a [f32], usize)> {
    let data = storage.as_slice::<f32>()?;
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{what}: input must be contiguous");
    };
    let cols = layout.dims().last().copied().unwrap_or(1).max(1);
    Ok((&data[start..end], cols))
}

fn softmax_row(src: &[f32], dst: &mut [f32]) {
    let max = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = (s - max).exp();
        sum += *d;
    }
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
        let (w, _) = f32_rows(s2, l2, self.name())?;
        if w.len() != cols {
            candle_core::bail!("{}: weight of {} for rows of {cols}", self.name(), w.len());
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(cols)
            .zip(x.par_chunks(cols))
            .for_each(|(d, row)| {
                let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / cols as f32;
                let r = 1.0 / (mean_sq + self.eps).sqrt();
                for ((d, &v), &wv) in d.iter_mut().zip(row).zip(w) {
                    *d = v * r * wv;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + f64::from(self.eps))?
            .sqrt()?
            .recip()?;
        let gw = g.broadcast_mul(w)?;
        let mean_gwx = (&gw * x)?.mean_keepdim(D::Minus1)?;
        let dx = (gw.broadcast_mul(&r)? - x.broadcast_mul(&(r.powf(3.0)? * mean_gwx)?)?)?;
        let normed = x.broadcast_mul(&r)?;
        let cols = x.dim(D::Minus1)?;
        let dw = (g * normed)?.reshape(((), cols))?.sum(0)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// RMSNorm of `x` (`[.., hidden]`) with weight `w` (`[hidden]`), differentiable in both; fused
/// for f32 CPU tensors.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if x.dtype() == DType::F32 && w.dtype() == DType::F32 && x.device().is_cpu() {
        x.contiguous()?
            .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
    } else {
        let x32 = x.to_dtype(DType::F32)?;
        let inv = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?
            .sqrt()?
            .recip()?;
        x32.broadcast_mul(&inv)?
            .to_dtype(x.dtype())?
            .broadcast_mul(w)
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
            .map(|(row, &t)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|&z| (z - max).exp()).sum();
                max + sum.ln() - row.get(t as usize).copied().unwrap_or(f32::NAN)
            })
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

fn contiguous_u32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [u32]> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff")
    }

    /// The composed reference: differentiable candle ops only.
    fn composed_softmax(x: &Tensor) -> Result<Tensor> {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }

    #[test]
    fn softmax_matches_composed_forward_and_backward() -> Result<()> {
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
    fn rms_norm_matches_composed_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 3, 16), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, 16, &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 16), &dev)?;
        let fused = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5)?;
        let inv = (x.as_tensor().sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?
            .sqrt()?
            .recip()?;
        let composed = x
            .as_tensor()
            .broadcast_mul(&inv)?
            .broadcast_mul(w.as_tensor())?;
        assert!(max_diff(&fused, &composed) < 1e-5);
        let gf = (fused * &probe)?.sum_all()?.backward()?;
        let gc = (composed * &probe)?.sum_all()?.backward()?;
        for v in [&x, &w] {
            let (a, b) = (
                gf.get(v.as_tensor()).expect("grad"),
                gc.get(v.as_tensor()).expect("grad"),
            );
            assert!(max_diff(a, b) < 1e-4, "{}", max_diff(a, b));
        }
        // A finite difference on one input coordinate.
        let loss = |xs: &Tensor| -> Result<f32> {
            (rms_norm(xs, w.as_tensor(), 1e-5)? * &probe)?
                .sum_all()?
                .to_scalar::<f32>()
        };
        let base: Vec<f32> = x.as_tensor().flatten_all()?.to_vec1()?;
        let eps = 1e-2f32;
        let at = 7;
        let shifted = |delta: f32| -> Result<Tensor> {
            let mut v = base.clone();
            v[at] += delta;
            Tensor::from_vec(v, (2, 3, 16), &dev)
        };
        let fd = (loss(&shifted(eps)?)? - loss(&shifted(-eps)?)?) / (2.0 * eps);
        let analytic: Vec<f32> = gf
            .get(x.as_tensor())
            .expect("grad")
            .flatten_all()?
            .to_vec1()?;
        assert!((fd - analytic[at]).abs() < 5e-3, "{fd} vs {}", analytic[at]);
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
}
