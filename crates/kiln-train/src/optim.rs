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
//!
//! [`Sgd`] is `torch.optim.SGD` as the HF Trainer builds it for `optim: sgd` (no momentum, L2
//! weight decay added to the gradient). The 8-bit AdamW of bitsandbytes is in
//! [`crate::optim8bit`]; [`crate::optimizer::Optimizer`] picks one by its HF `optim` name.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var};
use kiln_model::ops::contiguous_f32;
use rayon::prelude::*;

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

/// The f32 first and second moments of one parameter.
#[derive(Debug)]
pub(crate) struct Moments {
    pub(crate) m: Tensor,
    pub(crate) v: Tensor,
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
        for (param, moments) in self.params.iter().zip(self.moments.iter_mut()) {
            let Some(g) = grads.get(param.var.as_tensor()) else {
                continue;
            };
            let k = Scalars::new(&self.config, self.step, param.decay);
            *moments = Some(update(&param.var, g, moments.take(), &k)?);
        }
        Ok(())
    }

    /// The optimizer state as named tensors (`NAME.exp_avg`, `NAME.exp_avg_sq`) and the step
    /// count, for checkpoints. The tensors are copies: the live moments are updated in place.
    pub fn state_tensors(&self) -> Result<(HashMap<String, Tensor>, u64)> {
        let mut out = HashMap::new();
        for (param, moments) in self.params.iter().zip(&self.moments) {
            if let Some(s) = moments {
                out.insert(format!("{}.exp_avg", param.name), s.m.copy()?);
                out.insert(format!("{}.exp_avg_sq", param.name), s.v.copy()?);
            }
        }
        Ok((out, self.step))
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
                    // Own copies: the moments are updated in place, and a conversion to the
                    // same dtype and device would share the caller's storage.
                    let own = |t: Tensor| {
                        t.to_dtype(DType::F32)?
                            .to_device(param.var.device())?
                            .copy()
                    };
                    Some(Moments {
                        m: own(m)?,
                        v: own(v)?,
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

/// `torch.optim.SGD`'s hyper-parameters as the HF Trainer passes them for `optim: sgd`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    pub lr: f64,
    /// L2 penalty added to the gradient (`g + wd·p`), applied to parameters with
    /// [`NamedVar::decay`] only, as the HF Trainer's parameter groups do.
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    /// `torch.optim.SGD`'s defaults.
    fn default() -> Self {
        Self {
            lr: 1e-3,
            weight_decay: 0.0,
        }
    }
}

/// Plain stochastic gradient descent, `torch.optim.SGD` with no momentum:
///
/// ```text
/// p ← p − lr · (g + wd·p)
/// ```
///
/// Unlike AdamW's, this weight decay is not decoupled: torch adds it to the gradient. There is
/// no optimizer state.
#[derive(Debug)]
pub struct Sgd {
    params: Vec<NamedVar>,
    config: SgdConfig,
    step: u64,
}

impl Sgd {
    pub fn new(params: Vec<NamedVar>, config: SgdConfig) -> Self {
        Self {
            params,
            config,
            step: 0,
        }
    }

    pub fn params(&self) -> &[NamedVar] {
        &self.params
    }

    pub fn config(&self) -> &SgdConfig {
        &self.config
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Applies one update from `grads`; a parameter without a gradient is left alone.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        for param in &self.params {
            let Some(g) = grads.get(param.var.as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(DType::F32)?;
            let op = SgdStep {
                lr: self.config.lr as f32,
                weight_decay: if param.decay {
                    self.config.weight_decay as f32
                } else {
                    0.0
                },
            };
            let p = param.var.as_tensor();
            let fused = [p, &g]
                .iter()
                .all(|t| t.dtype() == DType::F32 && t.device().is_cpu() && t.is_contiguous());
            if fused {
                p.inplace_op2(&g, &op)?;
            } else {
                // Tensor ops for parameters off the CPU or not in f32.
                let p32 = p.to_dtype(DType::F32)?;
                let d = (&g + (&p32 * f64::from(op.weight_decay))?)?;
                let updated = (p32 - (d * f64::from(op.lr))?)?;
                param.var.set(&updated.to_dtype(param.var.dtype())?)?;
            }
        }
        Ok(())
    }

    /// SGD without momentum keeps no state: no tensors, and the step count.
    pub fn state_tensors(&self) -> (HashMap<String, Tensor>, u64) {
        (HashMap::new(), self.step)
    }

    /// Restores the step count; SGD state holds no tensors, so any tensor is an error (it was
    /// written by another optimizer).
    pub fn load_state(&mut self, tensors: HashMap<String, Tensor>, step: u64) -> Result<()> {
        if let Some(name) = tensors.keys().next() {
            candle_core::bail!(
                "SGD keeps no optimizer state, but the saved state holds `{name}` (written by another optimizer?)"
            );
        }
        self.step = step;
        Ok(())
    }

    /// Bytes of optimizer state: none.
    pub fn state_bytes(&self) -> usize {
        0
    }
}

/// The per-step constants of the update, in the f32 the arithmetic runs in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scalars {
    pub(crate) beta1: f32,
    pub(crate) beta2: f32,
    /// `1 − lr·wd`, or 1 for a parameter exempt from decay.
    pub(crate) decay: f32,
    pub(crate) bias_correction2_sqrt: f32,
    pub(crate) eps: f32,
    /// `lr / (1 − β1ᵗ)`.
    pub(crate) step_size: f32,
}

impl Scalars {
    /// The constants of step `step` (counted from 1) for a parameter with or without decay.
    pub(crate) fn new(c: &AdamWConfig, step: u64, decay: bool) -> Self {
        let t = i32::try_from(step).unwrap_or(i32::MAX);
        Self {
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            decay: if decay {
                (1.0 - c.lr * c.weight_decay) as f32
            } else {
                1.0
            },
            bias_correction2_sqrt: (1.0 - c.beta2.powi(t)).sqrt() as f32,
            eps: c.eps as f32,
            step_size: (c.lr / (1.0 - c.beta1.powi(t))) as f32,
        }
    }
}

/// One AdamW update of `var` from its gradient `g` with f32 moments (zero when `state` is
/// `None`), returning the new moments. CPU f32 parameters are updated in place; others through
/// tensor ops.
pub(crate) fn update(
    var: &Var,
    g: &Tensor,
    state: Option<Moments>,
    k: &Scalars,
) -> Result<Moments> {
    let g = g.to_dtype(DType::F32)?;
    let state = match state {
        Some(s) => s,
        None => Moments {
            m: g.zeros_like()?,
            v: g.zeros_like()?,
        },
    };
    let p = var.as_tensor();
    let fused = [p, &g, &state.m, &state.v]
        .iter()
        .all(|t| t.dtype() == DType::F32 && t.device().is_cpu() && t.is_contiguous());
    if fused {
        // In place, three passes over memory and no allocation.
        state.m.inplace_op2(&g, &FirstMoment(k.beta1))?;
        state.v.inplace_op2(&g, &SecondMoment(k.beta2))?;
        p.inplace_op3(&state.m, &state.v, &ParamStep(*k))?;
        Ok(state)
    } else {
        let (p, m, v) = composed_update(&p.to_dtype(DType::F32)?, &g, &state, k)?;
        var.set(&p.to_dtype(var.dtype())?)?;
        Ok(Moments { m, v })
    }
}

/// Elements per parallel work item of the in-place kernels.
const CHUNK: usize = 16 * 1024;

pub(crate) fn cpu_f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("optimizer: updated tensors must be contiguous");
    };
    match s {
        CpuStorage::F32(data) => Ok(&mut data[start..end]),
        _ => candle_core::bail!("optimizer: updated tensors must be f32"),
    }
}

/// `m ← β1·m + (1 − β1)·g`, in place.
struct FirstMoment(f32);

impl InplaceOp2 for FirstMoment {
    fn name(&self) -> &'static str {
        "kiln-adamw-first-moment"
    }

    fn cpu_fwd(&self, m: &mut CpuStorage, ml: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        let (m, g, b) = (cpu_f32_mut(m, ml)?, contiguous_f32(g, gl, "AdamW")?, self.0);
        m.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(m, g)| {
                m.iter_mut()
                    .zip(g)
                    .for_each(|(m, g)| *m = *m * b + g * (1.0 - b))
            });
        Ok(())
    }
}

/// `v ← β2·v + (1 − β2)·g²`, in place.
struct SecondMoment(f32);

impl InplaceOp2 for SecondMoment {
    fn name(&self) -> &'static str {
        "kiln-adamw-second-moment"
    }

    fn cpu_fwd(&self, v: &mut CpuStorage, vl: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        let (v, g, b) = (cpu_f32_mut(v, vl)?, contiguous_f32(g, gl, "AdamW")?, self.0);
        v.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(v, g)| {
                v.iter_mut()
                    .zip(g)
                    .for_each(|(v, g)| *v = *v * b + g * g * (1.0 - b))
            });
        Ok(())
    }
}

/// `p ← p·(1 − lr·wd) − step · m / (√v / √(1 − β2ᵗ) + ε)`, in place.
struct ParamStep(Scalars);

impl InplaceOp3 for ParamStep {
    fn name(&self) -> &'static str {
        "kiln-adamw-step"
    }

    fn cpu_fwd(
        &self,
        p: &mut CpuStorage,
        pl: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let (p, m, v, k) = (
            cpu_f32_mut(p, pl)?,
            contiguous_f32(m, ml, "AdamW")?,
            contiguous_f32(v, vl, "AdamW")?,
            &self.0,
        );
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(p, (m, v))| {
                for ((p, m), v) in p.iter_mut().zip(m).zip(v) {
                    let denom = v.sqrt() / k.bias_correction2_sqrt + k.eps;
                    *p = *p * k.decay - m / denom * k.step_size;
                }
            });
        Ok(())
    }
}

/// `p ← p − lr·(g + wd·p)`, in place.
struct SgdStep {
    lr: f32,
    weight_decay: f32,
}

impl InplaceOp2 for SgdStep {
    fn name(&self) -> &'static str {
        "kiln-sgd-step"
    }

    fn cpu_fwd(&self, p: &mut CpuStorage, pl: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        let (p, g) = (cpu_f32_mut(p, pl)?, contiguous_f32(g, gl, "SGD")?);
        let (lr, wd) = (self.lr, self.weight_decay);
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(p, g)| {
                p.iter_mut()
                    .zip(g)
                    .for_each(|(p, g)| *p -= lr * (g + wd * *p))
            });
        Ok(())
    }
}

/// The same update from tensor ops, for parameters off the CPU or not in f32.
fn composed_update(
    p: &Tensor,
    g: &Tensor,
    state: &Moments,
    k: &Scalars,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b1, b2) = (f64::from(k.beta1), f64::from(k.beta2));
    let m = ((&state.m * b1)? + (g * (1.0 - b1))?)?;
    let v = ((&state.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
    let denom = ((v.sqrt()? / f64::from(k.bias_correction2_sqrt))? + f64::from(k.eps))?;
    let p = ((p * f64::from(k.decay))? - (m.div(&denom)? * f64::from(k.step_size))?)?;
    Ok((p, m, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The in-place f32 kernels and the tensor-op path (taken for other dtypes, here f64) give
    /// the same trajectory.
    #[test]
    fn in_place_and_composed_updates_agree() -> Result<()> {
        let dev = Device::Cpu;
        let init = Tensor::randn(0f32, 1.0, (5, 7), &dev)?;
        let run = |dtype: DType| -> Result<Vec<f32>> {
            let var = Var::from_tensor(&init.to_dtype(dtype)?)?;
            let mut opt = AdamW::new(
                vec![NamedVar::new("w", var.clone())],
                AdamWConfig {
                    lr: 0.05,
                    ..AdamWConfig::default()
                },
            );
            for _ in 0..4 {
                let loss = (var.as_tensor().sqr()? * var.as_tensor().sin()?)?.sum_all()?;
                opt.step(&loss.backward()?)?;
            }
            var.as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()
        };
        let (fused, composed) = (run(DType::F32)?, run(DType::F64)?);
        let moved = fused
            .iter()
            .zip(init.flatten_all()?.to_vec1::<f32>()?)
            .any(|(a, b)| (a - b).abs() > 0.1);
        assert!(moved, "four steps of lr 0.05 move the weights");
        for (a, b) in fused.iter().zip(&composed) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        Ok(())
    }
}
