//! Quantizing a whole model, one decoder block at a time.
//!
//! The calibration windows are embedded once; each block is then calibrated on the inputs the
//! already-quantized blocks before it produce (as GPTQ's and AWQ's reference pipelines do), its
//! linear layers are quantized, and its outputs become the next block's inputs. GPTQ runs "true
//! sequential" inside a block: q/k/v, then o, then gate/up, then down, each set calibrated on
//! inputs that already went through the quantized sets before it. The LM head stays in full
//! precision (AutoGPTQ's `lm_head: false`).

use candle_core::{DType, Device, Result, Tensor};
use kiln_model::CausalLm;
use kiln_model::quant::{PackedWeight, QuantizedMatrix};

use crate::awq::{AwqBlockReport, awq_block, block_outputs};
use crate::gptq::{GptqOptions, Hessian, gptq_quantize, rtn_quantize};
use crate::quantizer::QuantSpec;

/// Which algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Rtn,
    Gptq,
    Awq,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
            Method::Awq => "awq",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "rtn" => Ok(Method::Rtn),
            "gptq" => Ok(Method::Gptq),
            "awq" => Ok(Method::Awq),
            other => Err(format!("`{other}`: expected rtn, gptq or awq")),
        }
    }
}

/// How to quantize.
#[derive(Debug, Clone, Copy)]
pub struct QuantizeOptions {
    pub method: Method,
    pub spec: QuantSpec,
    /// GPTQ only: columns in order of decreasing activation (`desc_act`).
    pub act_order: bool,
    /// GPTQ only: initial dampening fraction.
    pub percdamp: f64,
    /// Calibration windows per forward pass.
    pub batch: usize,
}

/// One quantized layer.
#[derive(Debug, Clone)]
pub struct QuantizedLayer {
    /// Module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    pub matrix: QuantizedMatrix,
    pub bias: Option<Tensor>,
    /// GPTQ's loss for the layer; `None` for the other methods.
    pub gptq_loss: Option<f64>,
    /// GPTQ's dampening that factorized, when it had to grow.
    pub percdamp: Option<f64>,
}

/// The result of [`quantize_model`].
#[derive(Debug)]
pub struct QuantizedModel {
    pub layers: Vec<QuantizedLayer>,
    /// Every tensor that stays dense (embedding, norms, LM head), by checkpoint name.
    pub dense: Vec<(String, Tensor)>,
    /// AWQ's choices per block.
    pub awq: Vec<AwqBlockReport>,
}

/// Which stage of which block is running (for progress bars).
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub block: usize,
    pub blocks: usize,
}

/// Quantizes every decoder linear layer of `model` in place: afterwards each holds a packed
/// weight and the model runs quantized. `windows` are the calibration token windows (equal
/// lengths; unused by RTN).
pub fn quantize_model(
    model: &mut CausalLm,
    windows: &[Vec<u32>],
    opts: &QuantizeOptions,
    mut progress: impl FnMut(Progress),
) -> Result<QuantizedModel> {
    let blocks = model.config().num_layers;
    let mut layers = Vec::new();
    let mut awq_reports = Vec::new();
    let mut xs = if opts.method == Method::Rtn {
        Vec::new()
    } else {
        embed_windows(model, windows, opts.batch)?
    };
    let seq = windows.first().map_or(0, Vec::len);
    for block in 0..blocks {
        progress(Progress { block, blocks });
        let quantized: BlockResult = match opts.method {
            Method::Rtn => CausalLm::LAYER_LINEARS
                .iter()
                .map(|name| {
                    let w = model.layer_linear_mut(block, name)?.dense_weight()?;
                    let (o, i) = w.dims2()?;
                    let data: Vec<f32> = w.flatten_all()?.to_vec1()?;
                    Ok((*name, rtn_quantize(&data, o, i, &opts.spec), None))
                })
                .collect::<Result<_>>()?,
            Method::Gptq => gptq_block(model, block, &xs, seq, opts)?,
            Method::Awq => {
                let (q, report) = awq_block(model, block, &xs, seq, &opts.spec)?;
                awq_reports.push(report);
                q.into_iter().map(|(n, m)| (n, m, None)).collect()
            }
        };
        for (name, matrix, gptq) in quantized {
            let linear = model.layer_linear_mut(block, name)?;
            let bias = linear.bias().cloned();
            // The block computes with the dequantized weights while the next one calibrates.
            linear.set_dense(Tensor::from_vec(
                matrix.dequantize(),
                (matrix.out_features, matrix.in_features),
                &Device::Cpu,
            )?)?;
            layers.push(QuantizedLayer {
                path: format!("model.layers.{block}.{name}"),
                matrix,
                bias,
                gptq_loss: gptq.map(|(l, _)| l),
                percdamp: gptq.map(|(_, d)| d),
            });
        }
        if opts.method != Method::Rtn {
            xs = block_outputs(model, block, &xs, seq, None)?;
        }
    }
    // Dense tensors as they now are (AWQ rescaled some norms), then the switch to packed weights.
    let quantized_paths: std::collections::HashSet<&str> =
        layers.iter().map(|l| l.path.as_str()).collect();
    let dense = model
        .state_dict()?
        .into_iter()
        .filter(|(name, _)| {
            let module = name
                .strip_suffix(".weight")
                .or_else(|| name.strip_suffix(".bias"));
            !module.is_some_and(|m| quantized_paths.contains(m))
        })
        .collect();
    for layer in &layers {
        let (block, name) = split_path(&layer.path)?;
        model
            .layer_linear_mut(block, name)?
            .set_packed(PackedWeight::from_quantized(&layer.matrix)?)?;
    }
    Ok(QuantizedModel {
        layers,
        dense,
        awq: awq_reports,
    })
}

fn split_path(path: &str) -> Result<(usize, &str)> {
    let rest = path.strip_prefix("model.layers.").unwrap_or(path);
    match rest.split_once('.') {
        Some((i, name)) => match i.parse() {
            Ok(i) => Ok((i, name)),
            Err(_) => candle_core::bail!("not a block layer path: {path}"),
        },
        None => candle_core::bail!("not a block layer path: {path}"),
    }
}

/// Embedding rows of the windows, `batch` windows per tensor.
fn embed_windows(model: &CausalLm, windows: &[Vec<u32>], batch: usize) -> Result<Vec<Tensor>> {
    if windows.is_empty() {
        candle_core::bail!("calibration needs at least one window of tokens");
    }
    let seq = windows[0].len();
    if let Some(w) = windows.iter().find(|w| w.len() != seq) {
        candle_core::bail!(
            "calibration windows must have one length: {} and {seq}",
            w.len()
        );
    }
    windows
        .chunks(batch.max(1))
        .map(|chunk| {
            let ids: Vec<u32> = chunk.iter().flatten().copied().collect();
            let ids = Tensor::from_vec(ids, (chunk.len(), seq), model.device())?;
            model.embed_rows(&ids)?.to_dtype(DType::F32)
        })
        .collect()
}

/// GPTQ's sets of layers sharing an input, in the order a block computes them.
const GPTQ_SETS: [&[&str]; 4] = [
    &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    &["self_attn.o_proj"],
    &["mlp.gate_proj", "mlp.up_proj"],
    &["mlp.down_proj"],
];

type BlockResult = Vec<(&'static str, QuantizedMatrix, Option<(f64, f64)>)>;

fn gptq_block(
    model: &mut CausalLm,
    block: usize,
    xs: &[Tensor],
    seq: usize,
    opts: &QuantizeOptions,
) -> Result<BlockResult> {
    let mut out = Vec::new();
    for set in GPTQ_SETS {
        let dim = model.layer_linear_mut(block, set[0])?.in_features();
        let hessian = std::cell::RefCell::new(Hessian::new(dim));
        let failure = std::cell::RefCell::new(None);
        let observe = |name: &str, x: &Tensor| {
            if name == set[0]
                && let Err(e) = hessian.borrow_mut().add_batch(x)
            {
                *failure.borrow_mut() = Some(e);
            }
        };
        block_outputs(model, block, xs, seq, Some(&observe))?;
        if let Some(e) = failure.into_inner() {
            return Err(e);
        }
        let hessian = hessian.into_inner();
        let gopts = GptqOptions {
            act_order: opts.act_order,
            percdamp: opts.percdamp,
            ..GptqOptions::new(opts.spec)
        };
        for name in set.iter().copied() {
            let linear = model.layer_linear_mut(block, name)?;
            let w = linear.dense_weight()?;
            let (o, i) = w.dims2()?;
            let data: Vec<f32> = w.flatten_all()?.to_vec1()?;
            let r = gptq_quantize(&data, o, i, &hessian, &gopts).map_err(|e| {
                candle_core::Error::msg(format!("model.layers.{block}.{name}: {e}"))
            })?;
            linear.set_dense(Tensor::from_vec(
                r.matrix.dequantize(),
                (o, i),
                &Device::Cpu,
            )?)?;
            out.push((name, r.matrix, Some((r.loss, r.percdamp))));
        }
    }
    Ok(out)
}
