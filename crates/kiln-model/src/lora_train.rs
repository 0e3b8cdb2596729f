//! Fresh, trainable LoRA adapters initialised as PEFT initialises them (`init_lora_weights=True`):
//! A from Kaiming-uniform with `a = √5` — uniform on `±1/√in_features` — and B at zero, so the
//! adapted model starts out computing exactly what the base model computes.

use candle_core::{DType, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::linear::{Linear, LoraLayer};
use crate::lora::LoraConfig;
use crate::transformer::CausalLm;

/// One trainable adapter matrix: its PEFT checkpoint key
/// (`base_model.model.<module>.lora_A.weight`) and the variable.
#[derive(Debug, Clone)]
pub struct LoraVar {
    pub name: String,
    pub var: Var,
}

/// Attaches a fresh adapter to every linear layer `config` targets and returns the adapter
/// weights, the only trainable parameters of a LoRA run. Ranks and scales follow
/// `rank_pattern`/`alpha_pattern` and rsLoRA as PEFT's do; `lora_dropout` applies in training
/// passes. Every name in `target_modules` must match a layer of the model.
pub fn attach_trainable_lora(
    model: &mut CausalLm,
    config: &LoraConfig,
    seed: u64,
) -> Result<Vec<LoraVar>> {
    let dtype = model.dtype();
    let device = model.device().clone();
    let mut linears = model.linears_mut();
    config
        .check_targets(linears.iter().map(|(path, _)| path.as_str()))
        .map_err(|m| candle_core::Error::Msg(format!("peft_config.target_modules: {m}")))?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut vars = Vec::new();
    for (index, (path, linear)) in linears.iter_mut().enumerate() {
        if !config.targets(path) {
            continue;
        }
        let r = config.rank_for(path);
        let (in_f, out_f) = (linear.in_features(), linear.out_features());
        let bound = 1.0 / (in_f as f64).sqrt();
        let a: Vec<f32> = (0..r * in_f)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        let (a, b) = (
            Tensor::from_vec(a, (r, in_f), &device)?.to_dtype(dtype)?,
            Tensor::zeros((out_f, r), dtype, &device)?,
        );
        let scale = config.scale_for(path);
        let dropout = (config.lora_dropout as f32, index);
        vars.extend(attach(linear, path, (&a, &b), scale, dropout, seed)?);
    }
    if vars.is_empty() {
        candle_core::bail!("peft_config.target_modules selects no linear layer of the model");
    }
    Ok(vars)
}

/// Makes an attached (for example loaded) adapter trainable: its A and B become variables, with
/// dropout `p`. Returns them as [`attach_trainable_lora`] does.
pub fn make_lora_trainable(model: &mut CausalLm, dropout: f32, seed: u64) -> Result<Vec<LoraVar>> {
    let mut vars = Vec::new();
    for (index, (path, linear)) in model.linears_mut().into_iter().enumerate() {
        let Some(lora) = linear.remove_lora() else {
            continue;
        };
        let pair = (&lora.a.to_dtype(DType::F32)?, &lora.b.to_dtype(DType::F32)?);
        vars.extend(attach(
            linear,
            &path,
            pair,
            lora.scale,
            (dropout, index),
            seed,
        )?);
    }
    Ok(vars)
}

/// Attaches `(a, b)` to `linear` as trainable variables, with dropout `p` drawn from a stream
/// seeded by the run's seed and the layer's index; returns them under PEFT's keys.
fn attach(
    linear: &mut Linear,
    path: &str,
    (a, b): (&Tensor, &Tensor),
    scale: f64,
    (p, index): (f32, usize),
    seed: u64,
) -> Result<[LoraVar; 2]> {
    let (a, b) = (Var::from_tensor(a)?, Var::from_tensor(b)?);
    linear.set_lora(
        LoraLayer::new(a.as_tensor().clone(), b.as_tensor().clone(), scale)
            .with_dropout(p, crate::ops::mix64(seed ^ index as u64)),
    )?;
    let key = |which: &str| format!("base_model.model.{path}.{which}.weight");
    Ok([
        LoraVar {
            name: key("lora_A"),
            var: a,
        },
        LoraVar {
            name: key("lora_B"),
            var: b,
        },
    ])
}
