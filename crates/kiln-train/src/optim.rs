//! AdamW (Loshchilov & Hutter, 2019, <https://arxiv.org/abs/1711.05101>) with
//! `torch.optim.AdamW`'s update, step for step:
//!
//! ```text
//! p ← p · (1 − lr·wd)                      (decoupled weight decay)
//! m ← β1·m + (1 − β1)·g ;  v ← β2·v + (1 − β2)·g²
//! p ← p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε)
//! ```
//!
//! Moments are kept in f32 whatever the parameter dtype. Parameters excluded from weight decay
//! (biases and norm weights, as the HF Trainer does) are marked per parameter.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

/// A trainable parameter and its checkpoint name.
#[derive(Debug, Clone)]
pub struct NamedVar {
    pub name: String,
    pub var: Var,
    /// Whether weight decay applies (the HF Trainer exempts biases and norm weights).
    pub decay: bool,
}

impl NamedVar {
    /// A parameter with the HF Trainer's decay rule: no decay for biases and norm weights.
    pub fn new(name: impl Into<String>, var: Var) -> Self {
        let name = name.into();
        let decay = !(name.ends_with(".bias") || name.contains("norm"));
        Self { name, var, decay }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// `torch.optim.AdamW`'s defaults.
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

#[derive(Debug)]
struct Moments {
    m: Tensor,
    v: Tensor,
}

#[derive(Debug)]
pub struct AdamW {
    params: Vec<NamedVar>,
    config: AdamWConfig,
    moments: Vec<Option<Moments>>,
    step: u64,
}

impl AdamW {
    pub fn new(params: Vec<NamedVar>, config: AdamWConfig) -> Self {
        let moments = params.iter().map(|_| None).collect();
        Self {
            params,
            config,
            moments,
            step: 0,
        }
    }

    pub fn params(&self) -> &[NamedVar] {
        &self.params
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Applies one update from `grads`. A parameter without a gradient is left alone (and keeps
    /// its moments), as PyTorch does for `grad is None`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - c.beta1.powi(t);
        let bias_correction2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let step_size = c.lr / bias_correction1;
        for (param, moments) in self.params.iter().zip(self.moments.iter_mut()) {
            let Some(g) = grads.get(param.var.as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(DType::F32)?;
            let state = match moments.take() {
                Some(s) => s,
                None => Moments {
                    m: g.zeros_like()?,
                    v: g.zeros_like()?,
                },
            };
            let m = ((&state.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&state.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let p = param.var.as_tensor().to_dtype(DType::F32)?;
            let p = if param.decay && c.weight_decay != 0.0 {
                (p * (1.0 - c.lr * c.weight_decay))?
            } else {
                p
            };
            let denom = ((v.sqrt()? / bias_correction2_sqrt)? + c.eps)?;
            let update = (m.div(&denom)? * step_size)?;
            let p = (p - update)?.to_dtype(param.var.dtype())?;
            param.var.set(&p)?;
            *moments = Some(Moments { m, v });
        }
        Ok(())
    }

    /// The optimizer state as named tensors (`NAME.exp_avg`, `NAME.exp_avg_sq`) and the step
    /// count, for checkpoints.
    pub fn state_tensors(&self) -> (HashMap<String, Tensor>, u64) {
        let mut out = HashMap::new();
        for (param, moments) in self.params.iter().zip(&self.moments) {
            if let Some(s) = moments {
                out.insert(format!("{}.exp_avg", param.name), s.m.clone());
                out.insert(format!("{}.exp_avg_sq", param.name), s.v.clone());
            }
        }
        (out, self.step)
    }

    /// Restores state saved by [`AdamW::state_tensors`]; every saved tensor must belong to a
    /// parameter of this optimizer with the same shape.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (param, moments) in self.params.iter().zip(self.moments.iter_mut()) {
            let m = tensors.remove(&format!("{}.exp_avg", param.name));
            let v = tensors.remove(&format!("{}.exp_avg_sq", param.name));
            *moments = match (m, v) {
                (Some(m), Some(v)) => {
                    if m.dims() != param.var.dims() || v.dims() != param.var.dims() {
                        candle_core::bail!(
                            "optimizer state for `{}` has shape {:?}, the parameter {:?}",
                            param.name,
                            m.dims(),
                            param.var.dims()
                        );
                    }
                    let device = param.var.device();
                    Some(Moments {
                        m: m.to_dtype(DType::F32)?.to_device(device)?,
                        v: v.to_dtype(DType::F32)?.to_device(device)?,
                    })
                }
                (None, None) => None,
                _ => candle_core::bail!("optimizer state for `{}` is incomplete", param.name),
            };
        }
        if let Some(extra) = tensors.keys().next() {
            candle_core::bail!("optimizer state holds `{extra}`, which matches no parameter");
        }
        self.step = step;
        Ok(())
    }

    /// Bytes of optimizer state (both moments of every parameter that has them).
    pub fn state_bytes(&self) -> usize {
        self.moments
            .iter()
            .flatten()
            .map(|s| (s.m.elem_count() + s.v.elem_count()) * 4)
            .sum()
    }
}
