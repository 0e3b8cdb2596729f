//! Token losses straight from hidden states: the LM head's projection and the cross-entropy as
//! one op.
//!
//! Projected by a separate matmul, the `[tokens, vocab]` logits are allocated, then candle's
//! backward pass allocates their gradient, zero-fills another to accumulate it into, and adds a
//! reshape's worth more — several sweeps of the largest tensor of a step. Here the logits are
//! formed in blocks of rows, reduced to `logsumexp − z[target]` at once, and kept only while
//! the backward pass needs them: saved when they fit in [`SAVED_LOGITS_MAX`] values, recomputed
//! block by block otherwise, so a large vocabulary never needs the whole matrix in memory
//! twice. Per row, `∂z = g · (softmax(z) − onehot(target))`, `∂h = ∂z·W`, `∂W = Σ ∂zᵀ·h`.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::gemm::{MatMut, MatRef, matmul_threaded};
use crate::ops::{contiguous_f32, contiguous_u32, exp_shifted_sum, max_of, with_cpu_f32_3};

/// Rows of logits formed at once.
const BLOCK_ROWS: usize = 512;

/// Up to this many logits (256 MiB in f32) are kept from the forward pass for the backward
/// pass; beyond it they are recomputed.
pub const SAVED_LOGITS_MAX: usize = 64 << 20;

#[derive(Clone)]
struct LinearCrossEntropy {
    /// Keep the logits for the backward pass when there are at most this many.
    save_limit: usize,
    saved_logits: Arc<Mutex<Option<Vec<f32>>>>,
}

/// `logits[rows] = h[rows] · Wᵀ` for one block of rows.
fn block_logits(h: &[f32], w: &[f32], hidden: usize, vocab: usize, out: &mut [f32]) -> Result<()> {
    let rows = h.len() / hidden;
    matmul_threaded(
        &mut MatMut::new(out, 0, rows, vocab, vocab)?,
        MatRef::new(h, 0, rows, hidden, hidden)?,
        MatRef::new(w, 0, vocab, hidden, hidden)?.t(),
        1.0,
        false,
    )
}

impl LinearCrossEntropy {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Option<Vec<f32>>>> {
        self.saved_logits
            .lock()
            .map_err(|_| candle_core::Error::Msg("linear cross-entropy: state poisoned".into()))
    }
}

impl CustomOp3 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "kiln-linear-cross-entropy"
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
        let h = contiguous_f32(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        let targets = contiguous_u32(s3, l3)?;
        let (vocab, hidden) = l2.shape().dims2()?;
        let rows = targets.len();
        if h.len() != rows * hidden {
            candle_core::bail!(
                "{}: {} hidden values for {rows} targets of width {hidden}",
                self.name(),
                h.len()
            );
        }
        if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
            candle_core::bail!(
                "{}: target id {t} outside a vocabulary of {vocab}",
                self.name()
            );
        }
        let save = rows * vocab <= self.save_limit;
        let mut saved = if save {
            vec![0f32; rows * vocab]
        } else {
            Vec::new()
        };
        let mut scratch = if save {
            Vec::new()
        } else {
            vec![0f32; BLOCK_ROWS * vocab]
        };
        let mut nll = vec![0f32; rows];
        for (block, (nll, t)) in nll
            .chunks_mut(BLOCK_ROWS)
            .zip(targets.chunks(BLOCK_ROWS))
            .enumerate()
        {
            let r0 = block * BLOCK_ROWS;
            let n = t.len();
            let logits = if save {
                &mut saved[r0 * vocab..(r0 + n) * vocab]
            } else {
                &mut scratch[..n * vocab]
            };
            block_logits(&h[r0 * hidden..(r0 + n) * hidden], w, hidden, vocab, logits)?;
            nll.par_iter_mut()
                .zip(logits.par_chunks(vocab).zip(t.par_iter()))
                .for_each_init(
                    || vec![0f32; vocab],
                    |buf, (nll, (z, &t))| {
                        let max = max_of(z);
                        *nll = max + exp_shifted_sum(z, max, buf).ln() - z[t as usize];
                    },
                );
        }
        *self.lock()? = save.then_some(saved);
        Ok((CpuStorage::F32(nll), Shape::from(rows)))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (vocab, width) = weight.dims2()?;
        let targets: Vec<u32> = targets.flatten_all()?.to_vec1()?;
        let saved = self.lock()?.take();
        let (dh, dw) = with_cpu_f32_3((hidden, weight, grad), self.name(), |h, w, g| {
            let rows = targets.len();
            let mut dh = vec![0f32; rows * width];
            let mut dw = vec![0f32; vocab * width];
            let mut dz = vec![0f32; BLOCK_ROWS.min(rows) * vocab];
            for r0 in (0..rows).step_by(BLOCK_ROWS) {
                let n = BLOCK_ROWS.min(rows - r0);
                let dz = &mut dz[..n * vocab];
                let hb = &h[r0 * width..(r0 + n) * width];
                match &saved {
                    Some(z) => dz.copy_from_slice(&z[r0 * vocab..(r0 + n) * vocab]),
                    None => block_logits(hb, w, width, vocab, dz)?,
                }
                // ∂z = g · (softmax(z) − onehot(t)), in place over the logits.
                dz.par_chunks_mut(vocab)
                    .zip(targets[r0..r0 + n].par_iter().zip(&g[r0..r0 + n]))
                    .for_each(|(z, (&t, &g))| {
                        let max = max_of(z);
                        z.iter_mut().for_each(|v| *v -= max);
                        let inv = g / crate::ops::exp_sum_in_place(z);
                        z.iter_mut().for_each(|v| *v *= inv);
                        z[t as usize] -= g;
                    });
                matmul_threaded(
                    &mut MatMut::new(&mut dh, r0 * width, n, width, width)?,
                    MatRef::new(dz, 0, n, vocab, vocab)?,
                    MatRef::new(w, 0, vocab, width, width)?,
                    1.0,
                    false,
                )?;
                if weight.track_op() {
                    matmul_threaded(
                        &mut MatMut::new(&mut dw, 0, vocab, width, width)?,
                        MatRef::new(dz, 0, n, vocab, vocab)?.t(),
                        MatRef::new(hb, 0, n, width, width)?,
                        1.0,
                        true,
                    )?;
                }
            }
            Ok((dh, dw))
        })?;
        Ok((
            Some(Tensor::from_vec(dh, hidden.shape(), hidden.device())?),
            weight
                .track_op()
                .then(|| Tensor::from_vec(dw, weight.shape(), weight.device()))
                .transpose()?,
            None,
        ))
    }
}

/// Per-row cross-entropy of the logits `hidden · weightᵀ` against `targets`: `hidden`
/// `[rows, width]`, `weight` `[vocab, width]` (the LM head), u32 `targets` `[rows]`.
/// Differentiable in `hidden` and `weight`; fused for f32 CPU tensors, composed otherwise.
pub fn linear_cross_entropy(hidden: &Tensor, weight: &Tensor, targets: &Tensor) -> Result<Tensor> {
    linear_cross_entropy_saving(hidden, weight, targets, SAVED_LOGITS_MAX)
}

fn linear_cross_entropy_saving(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    save_limit: usize,
) -> Result<Tensor> {
    let fused = hidden.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && targets.dtype() == DType::U32
        && hidden.device().is_cpu();
    if fused {
        hidden.contiguous()?.apply_op3(
            &weight.contiguous()?,
            &targets.contiguous()?,
            LinearCrossEntropy {
                save_limit,
                saved_logits: Arc::new(Mutex::new(None)),
            },
        )
    } else {
        let logits = hidden.matmul(&weight.t()?)?.to_dtype(DType::F32)?;
        crate::ops::cross_entropy_rows(&logits, targets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_matches_finite_differences, max_diff, weighted_sum};
    use candle_core::{Device, Var};

    #[test]
    fn matches_projection_then_cross_entropy() -> Result<()> {
        check_against_composed(SAVED_LOGITS_MAX)
    }

    #[test]
    fn recomputed_logits_give_the_same_gradients() -> Result<()> {
        check_against_composed(0)
    }

    fn check_against_composed(save_limit: usize) -> Result<()> {
        let dev = Device::Cpu;
        // More rows than a block, so blocks and their boundaries are exercised.
        let rows = BLOCK_ROWS + 37;
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, 16), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, (29, 16), &dev)?)?;
        let t: Vec<u32> = (0..rows as u32).map(|i| (i * 7) % 29).collect();
        let t = Tensor::from_vec(t, rows, &dev)?;
        let g = Tensor::randn(0f32, 1.0, rows, &dev)?;

        let fused = linear_cross_entropy_saving(h.as_tensor(), w.as_tensor(), &t, save_limit)?;
        let logits = h.as_tensor().matmul(&w.as_tensor().t()?)?;
        let composed = crate::ops::cross_entropy_rows(&logits, &t)?;
        assert!(max_diff(&fused, &composed) < 1e-5);

        let gf = (&fused * &g)?.sum_all()?.backward()?;
        let gc = (&composed * &g)?.sum_all()?.backward()?;
        for v in [&h, &w] {
            let (a, b) = (gf.get(v).expect("fused"), gc.get(v).expect("composed"));
            assert!(max_diff(a, b) < 1e-4, "{}", max_diff(a, b));
        }

        assert_matches_finite_differences(&[&h, &w], &gf, |x| {
            weighted_sum(
                &linear_cross_entropy_saving(&x[0], &x[1], &t, save_limit)?,
                &g,
            )
        })?;
        Ok(())
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let h = Tensor::zeros((2, 4), DType::F32, &dev)?;
        let w = Tensor::zeros((5, 4), DType::F32, &dev)?;
        let t = Tensor::new(&[1u32, 5], &dev)?;
        let err = linear_cross_entropy(&h, &w, &t).unwrap_err();
        assert!(err.to_string().contains("target id 5"), "{err}");
        Ok(())
    }
}
