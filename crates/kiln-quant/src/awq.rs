//! AWQ (Lin et al., 2023, <https://arxiv.org/abs/2306.00978>): protect the weights that meet
//! large activations by scaling their input channels up before quantizing and folding the
//! inverse scale into the operation that feeds them, then clip each group's range.
//!
//! Per decoder block, for each set of linear layers that share an input (q/k/v after the input
//! norm, o after v, gate/up after the post-attention norm, down after up):
//! 1. `s_x` = mean |activation| per input channel over the calibration tokens;
//! 2. grid search over `α ∈ {0, 1/20, …, 19/20}`: `s = s_x^α`, normalized by `√(max·min)`; the
//!    set's weights become `Q(W·diag(s))·diag(s)⁻¹` and the loss is the MSE of the **block's
//!    output** against the full-precision block (llm-awq measures the sub-module's output; the
//!    block's is what the next block sees);
//! 3. the best `s` is applied: `W ← W·diag(s)` and the feeding norm (or the previous linear's
//!    output rows) divided by `s`, which leaves the full-precision function unchanged. o gets a
//!    scale only when v's outputs line up with o's inputs (no grouped-query attention), as in
//!    llm-awq.
//!
//! Then the clipping search (`auto_clip`): for every layer but q and k, each output row's group
//! range is shrunk by `1 − i/20` for `i < 10`, keeping the one whose quantized group minimizes
//! `Σ_t (x_t · (Q(w) − w))²` over up to 512 calibration tokens.

use candle_core::{DType, Device, Result, Tensor};
use kiln_model::CausalLm;
use kiln_model::quant::QuantizedMatrix;
use rayon::prelude::*;

use crate::gptq::rtn_quantize;
use crate::quantizer::QuantSpec;

/// Grid points of the scale search.
const N_GRID: usize = 20;
/// Calibration tokens the clipping search weighs errors with.
const CLIP_TOKENS: usize = 512;
/// Shrink steps of the clipping search (ratios 1.0 down to 0.55).
const CLIP_STEPS: usize = 10;

/// A set of linear layers with one input, and what feeds it.
struct ScaleSet {
    /// Where the input statistics are observed.
    input_of: &'static str,
    members: &'static [&'static str],
    feeder: Feeder,
}

enum Feeder {
    InputNorm,
    PostAttentionNorm,
    Linear(&'static str),
}

const SETS: [ScaleSet; 4] = [
    ScaleSet {
        input_of: "self_attn.q_proj",
        members: &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        feeder: Feeder::InputNorm,
    },
    ScaleSet {
        input_of: "self_attn.o_proj",
        members: &["self_attn.o_proj"],
        feeder: Feeder::Linear("self_attn.v_proj"),
    },
    ScaleSet {
        input_of: "mlp.gate_proj",
        members: &["mlp.gate_proj", "mlp.up_proj"],
        feeder: Feeder::PostAttentionNorm,
    },
    ScaleSet {
        input_of: "mlp.down_proj",
        members: &["mlp.down_proj"],
        feeder: Feeder::Linear("mlp.up_proj"),
    },
];

/// What the search chose for one block.
#[derive(Debug, Clone)]
pub struct AwqBlockReport {
    /// The α chosen for each scale set (`None` where the set was skipped).
    pub alphas: Vec<(&'static str, Option<f64>)>,
    /// Block-output MSE of plain round-to-nearest (α = 0) and of the chosen scales, summed over
    /// the sets.
    pub rtn_loss: f64,
    pub awq_loss: f64,
}

/// `Q(w)` with `w` `[out, in]` as f32 values.
pub(crate) fn fake_quantize(w: &[f32], out: usize, inp: usize, spec: &QuantSpec) -> Vec<f32> {
    rtn_quantize(w, out, inp, spec).dequantize()
}

fn tensor(data: Vec<f32>, shape: (usize, usize)) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// Runs block `layer` over every calibration batch.
pub(crate) fn block_outputs(
    model: &CausalLm,
    layer: usize,
    xs: &[Tensor],
    seq: usize,
    observe: Option<kiln_model::Observer>,
) -> Result<Vec<Tensor>> {
    xs.iter()
        .map(|x| model.layer_forward(layer, x, x.dim(0)? / seq, seq, observe))
        .collect()
}

fn mse(a: &[Tensor], b: &[Tensor]) -> Result<f64> {
    let mut total = 0.0;
    let mut n = 0usize;
    for (a, b) in a.iter().zip(b) {
        total += f64::from((a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()?);
        n += a.elem_count();
    }
    Ok(total / n.max(1) as f64)
}

/// Searches and applies AWQ's scales and clipping in block `layer`, then quantizes its linear
/// layers: returns them by name within the block. The block is left holding the dequantized
/// weights (so the next block calibrates on what this one will compute).
pub fn awq_block(
    model: &mut CausalLm,
    layer: usize,
    xs: &[Tensor],
    seq: usize,
    spec: &QuantSpec,
) -> Result<(Vec<(&'static str, QuantizedMatrix)>, AwqBlockReport)> {
    // Mean |x| per channel at each set's input, and the full-precision block output.
    let stats: std::cell::RefCell<Vec<(String, Tensor, usize)>> = Default::default();
    let failure = std::cell::RefCell::new(None);
    let accumulate = |name: &str, x: &Tensor| -> Result<()> {
        let sum = x.to_dtype(DType::F32)?.abs()?.sum(0)?;
        let rows = x.dim(0)?;
        let mut stats = stats.borrow_mut();
        match stats.iter_mut().find(|(n, _, _)| n == name) {
            Some((_, acc, count)) => {
                *acc = acc.add(&sum)?;
                *count += rows;
            }
            None => stats.push((name.to_string(), sum, rows)),
        }
        Ok(())
    };
    let observe = |name: &str, x: &Tensor| {
        if SETS.iter().any(|s| s.input_of == name)
            && let Err(e) = accumulate(name, x)
        {
            failure.borrow_mut().get_or_insert(e);
        }
    };
    let reference = block_outputs(model, layer, xs, seq, Some(&observe))?;
    if let Some(e) = failure.into_inner() {
        return Err(e);
    }
    let stats = stats.into_inner();

    let mut report = AwqBlockReport {
        alphas: Vec::new(),
        rtn_loss: 0.0,
        awq_loss: 0.0,
    };
    for set in &SETS {
        if let Feeder::Linear(feeder) = set.feeder {
            let out = model.layer_linear_mut(layer, feeder)?.out_features();
            let inp = model.layer_linear_mut(layer, set.members[0])?.in_features();
            if out != inp {
                report.alphas.push((set.input_of, None));
                continue;
            }
        }
        let Some((_, sum, count)) = stats.iter().find(|(n, _, _)| n == set.input_of) else {
            candle_core::bail!("AWQ: no calibration input reached `{}`", set.input_of);
        };
        let x_mean = (sum / *count as f64)?;
        let originals: Vec<Tensor> = set
            .members
            .iter()
            .map(|m| model.layer_linear_mut(layer, m)?.dense_weight())
            .collect::<Result<_>>()?;
        let mut best: Option<(f64, f64, Tensor)> = None;
        for step in 0..N_GRID {
            let alpha = step as f64 / N_GRID as f64;
            let s = x_mean.powf(alpha)?.clamp(1e-4, f64::INFINITY)?;
            let (hi, lo) = (s.max(0)?.to_scalar::<f32>()?, s.min(0)?.to_scalar::<f32>()?);
            let s = (s / f64::from(hi * lo).sqrt())?;
            for (name, w) in set.members.iter().zip(&originals) {
                let (o, i) = w.dims2()?;
                let scaled: Vec<f32> = w
                    .broadcast_mul(&s.reshape((1, i))?)?
                    .flatten_all()?
                    .to_vec1()?;
                let q = tensor(fake_quantize(&scaled, o, i, spec), (o, i))?;
                model
                    .layer_linear_mut(layer, name)?
                    .set_dense(q.broadcast_div(&s.reshape((1, i))?)?)?;
            }
            let loss = mse(&block_outputs(model, layer, xs, seq, None)?, &reference)?;
            if step == 0 {
                report.rtn_loss += loss;
            }
            if best.as_ref().is_none_or(|(l, _, _)| loss < *l) {
                best = Some((loss, alpha, s));
            }
        }
        let Some((loss, alpha, s)) = best else {
            candle_core::bail!("AWQ: empty grid");
        };
        if !loss.is_finite() {
            candle_core::bail!(
                "AWQ: block {layer} `{}`: every scale gave a non-finite loss; check the \
                 calibration data",
                set.input_of
            );
        }
        report.awq_loss += loss;
        report.alphas.push((set.input_of, Some(alpha)));
        for (name, w) in set.members.iter().zip(&originals) {
            let linear = model.layer_linear_mut(layer, name)?;
            linear.set_dense(w.clone())?;
            linear.multiply_inputs(&s)?;
        }
        match set.feeder {
            Feeder::InputNorm => model.divide_layer_norm(layer, false, &s)?,
            Feeder::PostAttentionNorm => model.divide_layer_norm(layer, true, &s)?,
            Feeder::Linear(name) => model.layer_linear_mut(layer, name)?.divide_outputs(&s)?,
        }
    }

    // Clipping, on the inputs as the scaled block now sees them.
    let samples: std::cell::RefCell<Vec<(String, Tensor)>> = Default::default();
    let observe = |name: &str, x: &Tensor| {
        let mut samples = samples.borrow_mut();
        let have = samples
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, t)| t.dim(0).unwrap_or(0))
            .sum::<usize>();
        if have < CLIP_TOKENS
            && let Ok(rows) = x.narrow(0, 0, (CLIP_TOKENS - have).min(x.dim(0).unwrap_or(0)))
        {
            samples.push((name.to_string(), rows));
        }
    };
    block_outputs(model, layer, xs, seq, Some(&observe))?;
    let samples = samples.into_inner();
    let mut quantized = Vec::new();
    for name in CausalLm::LAYER_LINEARS {
        let linear = model.layer_linear_mut(layer, name)?;
        let w = linear.dense_weight()?;
        let (o, i) = w.dims2()?;
        let mut data: Vec<f32> = w.flatten_all()?.to_vec1()?;
        if !matches!(name, "self_attn.q_proj" | "self_attn.k_proj") {
            let rows: Vec<&Tensor> = samples
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, t)| t)
                .collect();
            if !rows.is_empty() {
                let x = Tensor::cat(&rows, 0)?.to_dtype(DType::F32)?;
                clip(&mut data, i, &x, spec)?;
            }
        }
        let m = rtn_quantize(&data, o, i, spec);
        model
            .layer_linear_mut(layer, name)?
            .set_dense(tensor(m.dequantize(), (o, i))?)?;
        quantized.push((name, m));
    }
    Ok((quantized, report))
}

/// Shrinks each row's group ranges where that lowers the group's output error on `x`
/// (`[tokens, in]`), in place.
fn clip(w: &mut [f32], inp: usize, x: &Tensor, spec: &QuantSpec) -> Result<()> {
    let group = spec.group_for(inp);
    let tokens = x.dim(0)?;
    // Per token and group, the x values: laid out `[group][token][k]` for locality.
    let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let n_groups = inp.div_ceil(group);
    let mut by_group: Vec<Vec<f32>> = vec![Vec::new(); n_groups];
    for (g, buf) in by_group.iter_mut().enumerate() {
        let (start, end) = (g * group, ((g + 1) * group).min(inp));
        buf.reserve(tokens * (end - start));
        for t in 0..tokens {
            buf.extend_from_slice(&xv[t * inp + start..t * inp + end]);
        }
    }
    w.par_chunks_mut(inp).for_each(|row| {
        for (g, xs) in by_group.iter().enumerate() {
            let (start, end) = (g * group, ((g + 1) * group).min(inp));
            let orig: Vec<f32> = row[start..end].to_vec();
            let len = orig.len();
            let max_abs = orig.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let mut best = (f64::INFINITY, orig.clone());
            for step in 0..CLIP_STEPS {
                let limit = max_abs * (1.0 - step as f32 / 20.0);
                let clipped: Vec<f32> = orig.iter().map(|v| v.clamp(-limit, limit)).collect();
                let (s, z) = spec.params_of(clipped.iter().copied());
                let diff: Vec<f32> = clipped
                    .iter()
                    .zip(&orig)
                    .map(|(&c, &o)| spec.fake(c, s, z) - o)
                    .collect();
                let err: f64 = xs
                    .chunks(len)
                    .map(|xt| {
                        let d: f32 = xt.iter().zip(&diff).map(|(a, b)| a * b).sum();
                        f64::from(d) * f64::from(d)
                    })
                    .sum();
                if err < best.0 {
                    best = (err, clipped);
                }
            }
            row[start..end].copy_from_slice(&best.1);
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_never_raises_the_output_error() -> Result<()> {
        let dev = Device::Cpu;
        let (out, inp) = (8, 64);
        let mut w: Vec<f32> = Tensor::randn(0f32, 0.05, (out, inp), &dev)?
            .flatten_all()?
            .to_vec1()?;
        // An outlier weight per row makes clipping worthwhile.
        for r in 0..out {
            w[r * inp + r] = 0.6;
        }
        let x = Tensor::randn(0f32, 1.0, (128, inp), &dev)?;
        let spec = QuantSpec {
            bits: 4,
            // One group per row: then the per-group objective the search minimizes is exactly the
            // row's output error (with several groups the cross terms between groups are not
            // part of it, and the total can rise slightly).
            group_size: None,
            sym: false,
        };
        let err = |w: &[f32]| -> Result<f32> {
            let q = tensor(fake_quantize(w, out, inp, &spec), (out, inp))?;
            let orig = tensor(w.to_vec(), (out, inp))?;
            (x.matmul(&q.t()?)? - x.matmul(&orig.t()?)?)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()
        };
        let before = err(&w)?;
        let orig = w.clone();
        clip(&mut w, inp, &x, &spec)?;
        // The error of the clipped-then-quantized weights against the ORIGINAL weights.
        let q = tensor(fake_quantize(&w, out, inp, &spec), (out, inp))?;
        let orig_t = tensor(orig, (out, inp))?;
        let after = (x.matmul(&q.t()?)? - x.matmul(&orig_t.t()?)?)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()?;
        assert!(
            after <= before * 1.0001,
            "clipped {after} vs unclipped {before}"
        );
        Ok(())
    }
}
