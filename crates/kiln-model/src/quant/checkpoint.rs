//! Quantized model directories in the layouts the Hugging Face ecosystem reads: GPTQ (v1, as
//! AutoGPTQ and GPTQModel write it) and AWQ (AutoAWQ's GEMM), written and loaded back.
//!
//! A quantized directory is an ordinary model directory whose `config.json` carries a
//! `quantization_config` and whose quantized linear layers store `qweight`/`qzeros`/`scales`
//! (and GPTQ's `g_idx`) instead of `weight`. Everything else (embeddings, norms, the LM head,
//! biases) stays dense under its usual name. So loading is [`CausalLm::load_with_linears`] with
//! a loader that looks for `{layer}.qweight`: the model code, the adapters and the KV cache are
//! the same as for a dense model, and only the layers differ (`LinearWeight::Packed`).
//!
//! Layers kiln's packed kernels cannot hold (4-bit groups or rows that are not whole 32-input
//! blocks, or act-order groups of uneven sizes) are loaded as dense layers from their
//! dequantized values instead: the same numbers, without the memory saving. kiln-model has no
//! logging dependency, so this happens silently; `LinearWeight` tells which layers did.
//!
//! The `quantization_config` written is the one transformers' `GPTQConfig` / `AwqConfig`,
//! AutoGPTQ and AutoAWQ write (`/work/shared/reference/quant.md` §3), so `from_pretrained` and
//! vLLM recognize the directory; GPTQ directories also get AutoGPTQ's `quantize_config.json`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};
use kiln_core::{Error, ModelConfig, ModelDir, Result, SafetensorsWeights};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{PackedWeight, QuantizedMatrix, awq_format, gptq_format};
use crate::linear::Linear;
use crate::save::{copy_side_files, io_err, write_json, write_safetensors};
use crate::transformer::CausalLm;

/// The checkpoint layouts kiln writes and reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// AutoGPTQ v1 (`checkpoint_format: "gptq"`): 4 or 8 bits, optional act-order `g_idx`.
    Gptq,
    /// AutoAWQ GEMM (`version: "gemm"`): 4 bits, no `g_idx`.
    Awq,
}

impl Format {
    /// `quant_method` in `quantization_config`.
    pub fn quant_method(self) -> &'static str {
        match self {
            Self::Gptq => "gptq",
            Self::Awq => "awq",
        }
    }
}

/// `config.json`'s `quantization_config`, as transformers, AutoGPTQ, GPTQModel and AutoAWQ
/// write it. Synonyms are accepted (`w_bit`, `q_group_size`).
#[derive(Debug, Clone, Default, Deserialize)]
struct RawQuantizationConfig {
    quant_method: Option<String>,
    #[serde(alias = "w_bit")]
    bits: Option<u8>,
    #[serde(alias = "q_group_size")]
    group_size: Option<i64>,
    desc_act: Option<bool>,
    sym: Option<bool>,
    damp_percent: Option<f64>,
    true_sequential: Option<bool>,
    checkpoint_format: Option<String>,
    static_groups: Option<bool>,
    lm_head: Option<bool>,
    is_marlin_format: Option<bool>,
    zero_point: Option<bool>,
    version: Option<String>,
    modules_to_not_convert: Option<Vec<String>>,
}

/// A validated `quantization_config`: a layout kiln reads.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizationConfig {
    pub format: Format,
    /// 4 or 8 (GPTQ), 4 (AWQ).
    pub bits: u8,
    /// Inputs per group; `None` for one group per row (`group_size: -1`).
    pub group_size: Option<usize>,
    /// GPTQ act-order: groups follow `g_idx` rather than the input order.
    pub desc_act: bool,
    pub sym: bool,
    pub damp_percent: Option<f64>,
    pub true_sequential: bool,
    pub static_groups: bool,
    /// Whether the LM head is quantized too (a layer is read as quantized exactly when it
    /// stores a `qweight`, so this is informational).
    pub lm_head: bool,
    /// How GPTQ's `qzeros` are stored: v1 (`"gptq"`, `zero − 1`) or `"gptq_v2"` (exact).
    pub zeros: gptq_format::ZeroConvention,
    /// AWQ's `zero_point` (asymmetric); GEMM checkpoints store `qzeros` either way.
    pub zero_point: bool,
    /// AWQ's modules left dense (they store `weight` and load as dense layers).
    pub modules_to_not_convert: Vec<String>,
}

impl QuantizationConfig {
    /// Parses and validates `value`, the `quantization_config` of the `config.json` at `path`
    /// (named in errors). Unsupported methods, bit widths and packings are errors that name
    /// them.
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let key = |k: &str| format!("quantization_config.{k}");
        let raw: RawQuantizationConfig = serde_json::from_value(value.clone())
            .map_err(|e| Error::config(path, "quantization_config", e.to_string()))?;
        let method = raw.quant_method.as_deref().unwrap_or("gptq").to_lowercase();
        let format = match method.as_str() {
            "gptq" => Format::Gptq,
            "awq" => Format::Awq,
            other => {
                return Err(Error::config(
                    path,
                    &key("quant_method"),
                    format!(
                        "`{other}` is not supported (kiln reads `gptq` and `awq` checkpoints, and GGUF files)"
                    ),
                ));
            }
        };
        let bits = raw.bits.unwrap_or(4);
        let group_size = match raw.group_size {
            None | Some(-1) => None,
            Some(g) if g > 0 => Some(g as usize),
            Some(g) => {
                return Err(Error::config(
                    path,
                    &key("group_size"),
                    format!("{g}: expected a positive group size or -1 (one group per row)"),
                ));
            }
        };
        let mut zeros = gptq_format::ZeroConvention::MinusOne;
        match format {
            Format::Gptq => {
                if !matches!(bits, 4 | 8) {
                    return Err(Error::config(
                        path,
                        &key("bits"),
                        format!("{bits}-bit GPTQ is not supported (kiln reads 4- and 8-bit GPTQ)"),
                    ));
                }
                if raw.is_marlin_format == Some(true) {
                    return Err(Error::config(
                        path,
                        &key("is_marlin_format"),
                        "Marlin-repacked GPTQ is not supported (kiln reads the `gptq` layout)",
                    ));
                }
                match raw.checkpoint_format.as_deref().unwrap_or("gptq") {
                    "gptq" => {}
                    "gptq_v2" => zeros = gptq_format::ZeroConvention::Exact,
                    other => {
                        return Err(Error::config(
                            path,
                            &key("checkpoint_format"),
                            format!("`{other}` is not supported (kiln reads `gptq` and `gptq_v2`)"),
                        ));
                    }
                }
            }
            Format::Awq => {
                if bits != 4 {
                    return Err(Error::config(
                        path,
                        &key("bits"),
                        format!("{bits}-bit AWQ is not supported (AWQ GEMM is 4-bit)"),
                    ));
                }
                let version = raw.version.as_deref().unwrap_or("gemm").to_lowercase();
                if version != "gemm" {
                    return Err(Error::config(
                        path,
                        &key("version"),
                        format!(
                            "AWQ version `{version}` is not supported: kiln reads the `gemm` \
                             layout (`gemv`, `gemv_fast`, `marlin`, `exllama` and `ipex` pack \
                             differently)"
                        ),
                    ));
                }
            }
        }
        Ok(Self {
            format,
            bits,
            group_size,
            desc_act: raw.desc_act.unwrap_or(false),
            sym: raw.sym.unwrap_or(format == Format::Gptq),
            damp_percent: raw.damp_percent,
            true_sequential: raw.true_sequential.unwrap_or(true),
            static_groups: raw.static_groups.unwrap_or(false),
            lm_head: raw.lm_head.unwrap_or(false),
            zeros,
            zero_point: raw.zero_point.unwrap_or(true),
            modules_to_not_convert: raw.modules_to_not_convert.unwrap_or_default(),
        })
    }

    /// The `quantization_config` of the `config.json` at `path`, or `None` for a dense model.
    pub fn from_config_file(path: &Path) -> Result<Option<Self>> {
        let config: Value = kiln_core::read_json(path)?;
        match config.get("quantization_config") {
            None | Some(Value::Null) => Ok(None),
            Some(q) => Self::from_json(q, path).map(Some),
        }
    }

    /// The group size of a layer with `in_features` inputs.
    pub fn group_size_for(&self, in_features: usize) -> usize {
        self.group_size.unwrap_or(in_features).min(in_features)
    }
}

/// How the matrices being saved were made: the `quantization_config` fields the matrices
/// themselves do not tell.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeMeta {
    /// Symmetric quantization (GPTQ's `sym`).
    pub sym: bool,
    /// Act-order; also set when any layer carries a `g_idx`.
    pub desc_act: bool,
    pub damp_percent: f64,
    pub true_sequential: bool,
    pub static_groups: bool,
    /// Extra entries for GPTQ's `quantization_config.meta` (the quantizer, its version and the
    /// method go in already), e.g. the calibration set.
    pub extra: Map<String, Value>,
}

impl Default for QuantizeMeta {
    /// AutoGPTQ's defaults, act-order off.
    fn default() -> Self {
        Self {
            sym: true,
            desc_act: false,
            damp_percent: 0.01,
            true_sequential: true,
            static_groups: false,
            extra: Map::new(),
        }
    }
}

/// What [`save_quantized_dir`] wrote.
#[derive(Debug, Clone)]
pub struct SavedQuantized {
    pub dir: PathBuf,
    pub format: Format,
    /// Size of `model.safetensors` in bytes.
    pub weights_bytes: u64,
    /// Every file written, with its size in bytes.
    pub files: Vec<(String, u64)>,
    pub tensors: usize,
    pub quantized_layers: usize,
    /// The `quantization_config` written into `config.json`.
    pub quantization_config: Value,
}

/// The group size a checkpoint declares for `layers`: the one size every grouped layer shares,
/// or `None` (-1) when every layer is one group per row. Errors when the layers disagree or a
/// per-row layer would be read back with more than one group.
fn checkpoint_group_size(
    layers: &[(String, QuantizedMatrix, Option<Tensor>)],
) -> Result<Option<usize>> {
    let grouped: BTreeSet<usize> = layers
        .iter()
        .filter(|(_, m, _)| m.group_size < m.in_features)
        .map(|(_, m, _)| m.group_size)
        .collect();
    if grouped.len() > 1 {
        return Err(Error::InvalidInput(format!(
            "quantized layers use group sizes {grouped:?}: a checkpoint declares one"
        )));
    }
    let group = grouped.first().copied();
    if let Some(g) = group {
        for (path, m, _) in layers {
            if m.in_features.div_ceil(g) != m.n_groups() {
                return Err(Error::InvalidInput(format!(
                    "`{path}` has {} group(s) of {} inputs, but the checkpoint's group size {g} \
                     gives it {}",
                    m.n_groups(),
                    m.group_size,
                    m.in_features.div_ceil(g)
                )));
            }
        }
    }
    Ok(group)
}

fn i32_tensor(data: Vec<i32>, shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

fn f16_tensor(data: Vec<half::f16>, shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// Writes a quantized model directory `out` in `format`:
///
/// - `model.safetensors`: the `dense` tensors as given (embeddings, norms, the LM head), and
///   for each quantized layer `{path}.qweight`, `.qzeros`, `.scales`, `.g_idx` (GPTQ) and
///   `.bias` (in the bias tensor's own dtype);
/// - `config.json`: `config_json` (the source model's) with the `quantization_config`
///   transformers writes;
/// - `quantize_config.json` (GPTQ): AutoGPTQ's `BaseQuantizeConfig`;
/// - the tokenizer and generation files `source_dir` has.
///
/// `out` is created if needed; one that already holds weights is refused. `config.json` is
/// written last, so an interrupted save does not load.
pub fn save_quantized_dir(
    out: &Path,
    source_dir: &Path,
    config_json: &Value,
    dense: &[(String, Tensor)],
    layers: &[(String, QuantizedMatrix, Option<Tensor>)],
    format: Format,
    meta: &QuantizeMeta,
) -> Result<SavedQuantized> {
    for existing in ["model.safetensors", "model.safetensors.index.json"] {
        let path = out.join(existing);
        if path.exists() {
            return Err(Error::InvalidInput(format!(
                "{}: already exists; refusing to overwrite a saved model (choose a new output directory or remove it)",
                path.display()
            )));
        }
    }
    let mut config = config_json.clone();
    let Some(fields) = config.as_object_mut() else {
        return Err(Error::InvalidInput(
            "the source config.json must be a JSON object".into(),
        ));
    };
    let bits: BTreeSet<u8> = layers.iter().map(|(_, m, _)| m.bits).collect();
    let bits = match bits.into_iter().collect::<Vec<_>>().as_slice() {
        [b] => *b,
        [] => {
            return Err(Error::InvalidInput(
                "no quantized layers to save".to_string(),
            ));
        }
        many => {
            return Err(Error::InvalidInput(format!(
                "quantized layers use {many:?} bits: a checkpoint declares one width"
            )));
        }
    };
    let group = checkpoint_group_size(layers)?;
    let dense_names: BTreeSet<&str> = dense.iter().map(|(n, _)| n.as_str()).collect();

    let mut tensors: Vec<(String, Tensor)> = dense.to_vec();
    for (path, m, bias) in layers {
        if dense_names.contains(format!("{path}.weight").as_str()) {
            return Err(Error::InvalidInput(format!(
                "`{path}` is both quantized and listed as a dense `{path}.weight`"
            )));
        }
        let layer_err = |e: candle_core::Error| Error::InvalidInput(format!("`{path}`: {e}"));
        let (inp, outf) = (m.in_features, m.out_features);
        match format {
            Format::Gptq => {
                let sh = gptq_format::shapes(m.bits, m.group_size, inp, outf).map_err(layer_err)?;
                let t = gptq_format::pack(m).map_err(layer_err)?;
                tensors.push((
                    format!("{path}.qweight"),
                    i32_tensor(t.qweight, &sh.qweight)?,
                ));
                tensors.push((format!("{path}.qzeros"), i32_tensor(t.qzeros, &sh.qzeros)?));
                tensors.push((format!("{path}.scales"), f16_tensor(t.scales, &sh.scales)?));
                tensors.push((format!("{path}.g_idx"), i32_tensor(t.g_idx, &sh.g_idx)?));
            }
            Format::Awq => {
                let sh = awq_format::shapes(m.bits, m.group_size, inp, outf).map_err(layer_err)?;
                let t = awq_format::pack(m).map_err(layer_err)?;
                tensors.push((
                    format!("{path}.qweight"),
                    i32_tensor(t.qweight, &sh.qweight)?,
                ));
                tensors.push((format!("{path}.qzeros"), i32_tensor(t.qzeros, &sh.qzeros)?));
                tensors.push((format!("{path}.scales"), f16_tensor(t.scales, &sh.scales)?));
            }
        }
        if let Some(b) = bias {
            tensors.push((format!("{path}.bias"), b.clone()));
        }
    }

    let group_json = group.map_or(json!(-1), |g| json!(g));
    let desc_act = meta.desc_act || layers.iter().any(|(_, m, _)| m.g_idx.is_some());
    let quantization_config = match format {
        Format::Gptq => {
            let mut meta_json = Map::new();
            meta_json.insert(
                "quantizer".into(),
                json!([format!("kiln:{}", env!("CARGO_PKG_VERSION"))]),
            );
            meta_json.extend(meta.extra.clone());
            json!({
                "quant_method": "gptq",
                "bits": bits,
                "group_size": group_json,
                "desc_act": desc_act,
                "sym": meta.sym,
                "damp_percent": meta.damp_percent,
                "true_sequential": meta.true_sequential,
                "static_groups": meta.static_groups,
                "checkpoint_format": "gptq",
                "lm_head": false,
                "meta": meta_json,
            })
        }
        Format::Awq => json!({
            "quant_method": "awq",
            "zero_point": true,
            "group_size": group_json,
            "bits": bits,
            "version": "gemm",
            "modules_to_not_convert": null,
        }),
    };
    fields.insert("quantization_config".into(), quantization_config.clone());

    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let n_tensors = tensors.len();
    let weights = out.join("model.safetensors");
    write_safetensors(&weights, tensors)?;
    let mut written = vec!["model.safetensors".to_string()];
    written.extend(copy_side_files(source_dir, out)?);
    if format == Format::Gptq {
        let autogptq = json!({
            "bits": bits,
            "group_size": group_json,
            "damp_percent": meta.damp_percent,
            "desc_act": desc_act,
            "static_groups": meta.static_groups,
            "sym": meta.sym,
            "true_sequential": meta.true_sequential,
            "model_name_or_path": null,
            "model_file_base_name": "model",
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
        });
        write_json(&out.join("quantize_config.json"), &autogptq)?;
        written.push("quantize_config.json".into());
    }
    write_json(&out.join("config.json"), &config)?;
    written.push("config.json".into());

    let mut files = Vec::with_capacity(written.len());
    for name in written {
        let path = out.join(&name);
        let len = std::fs::metadata(&path).map_err(io_err(&path))?.len();
        files.push((name, len));
    }
    let weights_bytes = files.first().map_or(0, |(_, n)| *n);
    Ok(SavedQuantized {
        dir: out.to_path_buf(),
        format,
        weights_bytes,
        files,
        tensors: n_tensors,
        quantized_layers: layers.len(),
        quantization_config,
    })
}

/// Reads one quantized layer under `vb` (rooted at the layer) as a [`QuantizedMatrix`]. Shape
/// errors name the file, the tensor and both shapes; a missing tensor is named.
pub fn read_quantized_layer(
    vb: &VarBuilder,
    qcfg: &QuantizationConfig,
    in_features: usize,
    out_features: usize,
) -> candle_core::Result<QuantizedMatrix> {
    let group = qcfg.group_size_for(in_features);
    let (inp, out) = (in_features, out_features);
    let get_i32 = |shape: &[usize], name: &str| -> candle_core::Result<Vec<i32>> {
        vb.get_with_hints_dtype(shape, name, Init::Const(0.0), DType::I32)?
            .flatten_all()?
            .to_vec1::<i32>()
    };
    let get_scales = |shape: &[usize]| -> candle_core::Result<Vec<half::f16>> {
        vb.get_with_hints_dtype(shape, "scales", Init::Const(0.0), DType::F16)?
            .flatten_all()?
            .to_vec1::<half::f16>()
    };
    let named = |e: candle_core::Error| candle_core::Error::Msg(format!("`{}`: {e}", vb.prefix()));
    match qcfg.format {
        Format::Gptq => {
            let sh = gptq_format::shapes(qcfg.bits, group, inp, out).map_err(named)?;
            let g_idx = if vb.contains_tensor("g_idx") {
                get_i32(&sh.g_idx, "g_idx")?
            } else if qcfg.desc_act {
                candle_core::bail!(
                    "`{}.g_idx` is missing: an act-order (desc_act) GPTQ layer needs it",
                    vb.prefix()
                );
            } else {
                (0..inp).map(|i| (i / group) as i32).collect()
            };
            let t = gptq_format::GptqTensors {
                qweight: get_i32(&sh.qweight, "qweight")?,
                qzeros: get_i32(&sh.qzeros, "qzeros")?,
                scales: get_scales(&sh.scales)?,
                g_idx,
            };
            gptq_format::unpack_as(&t, qcfg.bits, group, inp, out, qcfg.zeros).map_err(named)
        }
        Format::Awq => {
            let sh = awq_format::shapes(qcfg.bits, group, inp, out).map_err(named)?;
            let t = awq_format::AwqTensors {
                qweight: get_i32(&sh.qweight, "qweight")?,
                qzeros: get_i32(&sh.qzeros, "qzeros")?,
                scales: get_scales(&sh.scales)?,
            };
            awq_format::unpack(&t, qcfg.bits, group, inp, out).map_err(named)
        }
    }
}

/// Builds a linear layer from `m`: packed when kiln's kernels hold its layout, else dense from
/// the dequantized values (in `vb`'s dtype).
fn quantized_linear(
    m: &QuantizedMatrix,
    bias: Option<Tensor>,
    vb: &VarBuilder,
) -> candle_core::Result<Linear> {
    m.validate()?;
    match PackedWeight::from_quantized(m) {
        Ok(packed) => Ok(Linear::from_packed(packed, bias)),
        // `validate` passed, so this is a layout the packed kernels do not take.
        Err(_) => {
            let w = Tensor::from_vec(m.dequantize(), (m.out_features, m.in_features), vb.device())?
                .to_dtype(vb.dtype())?;
            Linear::new(w, bias)
        }
    }
}

/// Builds the model from `weights` (a quantized checkpoint, possibly with an adapter's
/// overrides): layers that store a `qweight` are read in `qcfg`'s layout, all other tensors
/// as usual, in `dtype` on `device`.
pub fn load_quantized_weights(
    weights: SafetensorsWeights,
    config: &ModelConfig,
    qcfg: &QuantizationConfig,
    dtype: DType,
    device: &Device,
) -> Result<CausalLm> {
    let vb = weights.into_var_builder(dtype, device);
    let loader =
        |vb: VarBuilder, inp: usize, out: usize, bias: bool| -> candle_core::Result<Linear> {
            if !vb.contains_tensor("qweight") {
                return Linear::load(vb, inp, out, bias);
            }
            let m = read_quantized_layer(&vb, qcfg, inp, out)?;
            // A quantized layer's stored bias is used even where the architecture has none
            // (AutoGPTQ's QuantLinear may carry one).
            let bias = if bias || vb.contains_tensor("bias") {
                Some(vb.get(out, "bias")?)
            } else {
                None
            };
            quantized_linear(&m, bias, &vb)
        };
    Ok(CausalLm::load_with_linears(vb, config, &loader)?)
}

/// Loads a quantized model directory (see [`load_quantized_weights`]).
pub fn load_quantized_model(
    dir: &ModelDir,
    config: &ModelConfig,
    qcfg: &QuantizationConfig,
    dtype: DType,
    device: &Device,
) -> Result<CausalLm> {
    let weights = SafetensorsWeights::open(&dir.weight_files()?)?;
    load_quantized_weights(weights, config, qcfg, dtype, device)
}
