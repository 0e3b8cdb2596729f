//! Gradients between the backward pass and the optimizer: accumulation over micro-batches, the
//! global-norm clip, and the first-step guard against parameters the graph never reached.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};

use crate::optim::NamedVar;

/// Sums the gradients of several backward passes (micro-batches) parameter by parameter.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sums: Vec<Option<Tensor>>,
    micro_batches: usize,
}

impl GradAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// Adds one backward pass's gradients of `params`. Normalise the loss by the tokens of the
    /// whole accumulation window before `backward`, and the sum is the big batch's gradient.
    pub fn add(&mut self, params: &[NamedVar], grads: &GradStore) -> Result<()> {
        if self.sums.is_empty() {
            self.sums = vec![None; params.len()];
        }
        for (param, sum) in params.iter().zip(self.sums.iter_mut()) {
            if let Some(g) = grads.get(param.var.as_tensor()) {
                let g = g.to_dtype(DType::F32)?;
                *sum = Some(match sum.take() {
                    Some(s) => (s + g)?,
                    None => g,
                });
            }
        }
        self.micro_batches += 1;
        Ok(())
    }

    /// The accumulated gradients as a `GradStore` keyed by the parameters, and a reset.
    pub fn take(&mut self, params: &[NamedVar]) -> Result<GradStore> {
        let mut store = GradStore::default();
        for (param, sum) in params.iter().zip(std::mem::take(&mut self.sums)) {
            if let Some(g) = sum {
                store.insert(param.var.as_tensor(), g);
            }
        }
        self.micro_batches = 0;
        Ok(store)
    }
}

/// `torch.nn.utils.clip_grad_norm_`: scales every gradient by `max_norm / (norm + 1e-6)` when the
/// global L2 norm exceeds `max_norm`, as the HF Trainer calls it: a `max_norm` of 0 (or below)
/// turns clipping off. Returns the norm before clipping (what HF logs as `grad_norm`).
pub fn clip_grad_norm(params: &[NamedVar], grads: &mut GradStore, max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for p in params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            total += g
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()? as f64;
        }
    }
    let norm = total.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if max_norm > 0.0 && coef < 1.0 {
        for p in params {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                let clipped = (g * coef)?;
                grads.insert(p.var.as_tensor(), clipped);
            }
        }
    }
    Ok(norm)
}

/// Fails, naming them, when any trainable parameter received no gradient or an all-zero one: the
/// signature of a forward pass that cut the graph (a fused op without backward, a detach).
pub fn ensure_all_have_gradients(params: &[NamedVar], grads: &GradStore) -> Result<()> {
    let mut cut = Vec::new();
    for p in params {
        let reached = match grads.get(p.var.as_tensor()) {
            Some(g) => {
                g.to_dtype(DType::F32)?
                    .abs()?
                    .sum_all()?
                    .to_scalar::<f32>()?
                    > 0.0
            }
            None => false,
        };
        if !reached {
            cut.push(p.name.as_str());
        }
    }
    if cut.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = cut.iter().take(10).copied().collect();
    candle_core::bail!(
        "{} of {} trainable parameters received no gradient at the first step: {}{} \
         — the forward pass does not reach them",
        cut.len(),
        params.len(),
        shown.join(", "),
        if cut.len() > shown.len() { ", …" } else { "" }
    )
}
