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
    use crate::test_util::max_diff;
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
}
