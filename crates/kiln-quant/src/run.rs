//! `kiln quantize` as a library call: load, calibrate, quantize, measure, save, report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Result;
use kiln_model::quant::checkpoint::{Format, QuantizeMeta, save_quantized_dir};
use kiln_model::{CausalLm, LoadOptions, LoadedModel};
use serde::Serialize;

use crate::calib;
use crate::pipeline::{Method, QuantizeOptions, QuantizedModel, quantize_model};
use crate::quantizer::QuantSpec;

/// Everything `kiln quantize` takes.
#[derive(Debug, Clone)]
pub struct QuantizeDirOptions {
    pub model: String,
    pub out: PathBuf,
    pub method: Method,
    pub spec: QuantSpec,
    pub act_order: bool,
    pub percdamp: f64,
    /// Calibration documents; the synthetic world's corpus when `None`.
    pub calibration: Option<PathBuf>,
    /// Text to measure perplexity on; a held-out tenth of the calibration documents when `None`.
    pub eval_text: Option<PathBuf>,
    pub samples: usize,
    pub seq_len: usize,
    pub seed: u64,
    /// The checkpoint layout; AWQ's for 4-bit AWQ, GPTQ's otherwise, when `None`.
    pub format: Option<Format>,
    /// Measure perplexity before and after.
    pub evaluate: bool,
    /// At most this many evaluation tokens.
    pub max_eval_tokens: usize,
    /// Show progress bars.
    pub progress: bool,
}

impl QuantizeDirOptions {
    /// Defaults as the reference tools set them: 128 samples of 512 tokens, damp 0.01.
    pub fn new(model: &str, out: &Path, method: Method, spec: QuantSpec) -> Self {
        Self {
            model: model.to_string(),
            out: out.to_path_buf(),
            method,
            spec,
            act_order: false,
            percdamp: 0.01,
            calibration: None,
            eval_text: None,
            samples: 128,
            seq_len: 512,
            seed: 0,
            format: None,
            evaluate: true,
            max_eval_tokens: 8192,
            progress: false,
        }
    }
}

/// One layer's line in the report.
#[derive(Debug, Clone, Serialize)]
pub struct LayerLine {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gptq_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percdamp: Option<f64>,
}

/// What `kiln quantize` prints and writes to `quantize_report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeReport {
    pub model: String,
    pub out: PathBuf,
    pub method: &'static str,
    pub bits: u8,
    /// -1 for one group per row.
    pub group_size: i64,
    pub sym: bool,
    pub act_order: bool,
    pub format: &'static str,
    pub calibration: String,
    pub samples: usize,
    pub seq_len: usize,
    /// Bytes of the source model's weight files and of the quantized model's.
    pub source_bytes: u64,
    pub quantized_bytes: u64,
    /// Weights in the quantized linear layers, and their storage per weight, codes, scales,
    /// zero points and `g_idx` included.
    pub quantized_weights: u64,
    pub bits_per_weight: f64,
    /// Bits of the whole weight file per model parameter (the embedding and the LM head stay
    /// in their source precision).
    pub model_bits_per_weight: f64,
    pub perplexity_before: Option<f64>,
    pub perplexity_after: Option<f64>,
    pub eval_tokens: usize,
    pub seconds: f64,
    /// AWQ: the α chosen per block and scale set (`null` where the set was skipped).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub awq_alphas: Vec<Vec<(String, Option<f64>)>>,
    pub layers: Vec<LayerLine>,
}

impl QuantizeReport {
    /// Relative perplexity change, `after / before − 1`.
    pub fn perplexity_change(&self) -> Option<f64> {
        Some(self.perplexity_after? / self.perplexity_before? - 1.0)
    }
}

fn err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::msg(e.to_string())
}

/// Sum of the sizes of a model directory's weight files.
pub fn weights_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.path()
                .extension()
                .is_some_and(|x| x == "safetensors" || x == "gguf")
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Perplexity of `ids` in windows of `window` tokens.
pub fn perplexity(model: &CausalLm, ids: &[u32], window: usize) -> Result<f64> {
    let window = window.min(ids.len()).max(2);
    Ok(kiln_model::perplexity(model, ids, window, (window / 2).max(1))?.perplexity)
}

/// Quantizes `opts.model` into `opts.out`.
pub fn quantize_dir(opts: &QuantizeDirOptions) -> Result<QuantizeReport> {
    let started = Instant::now();
    if opts.method == Method::Awq && opts.act_order {
        candle_core::bail!("--act-order is a GPTQ option; AWQ has no column order");
    }
    let format = opts.format.unwrap_or(match opts.method {
        Method::Awq if opts.spec.bits == 4 => Format::Awq,
        _ => Format::Gptq,
    });
    if format == Format::Awq && opts.spec.bits != 4 {
        candle_core::bail!(
            "the AWQ (GEMM) layout holds 4-bit weights only; use --format gptq for 8 bits"
        );
    }
    let loaded = LoadedModel::load(&opts.model, &LoadOptions::default()).map_err(err)?;
    let LoadedModel {
        dir,
        config,
        mut model,
        tokenizer,
        ..
    } = loaded;
    if model
        .linears()
        .iter()
        .any(|(_, l)| !matches!(l.weight(), kiln_model::LinearWeight::Dense(_)))
    {
        candle_core::bail!("{}: the model is already quantized", opts.model);
    }

    let (docs, calibration) = match &opts.calibration {
        Some(path) => (calib::read_documents(path)?, path.display().to_string()),
        None => (
            calib::synthetic_documents(0)?,
            "synthetic world corpus".to_string(),
        ),
    };
    let (calib_docs, held_out) = calib::split_documents(&docs);
    let eval_text = match &opts.eval_text {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?,
        None => held_out,
    };
    let seq_len = opts.seq_len.min(config.max_position_embeddings).max(2);
    let mut stream = calib::token_stream(&tokenizer, &calib_docs)?;
    let mut eval_ids = tokenizer.encode(&eval_text, true).map_err(err)?;
    if opts.evaluate && opts.eval_text.is_none() && eval_ids.len() < 2 {
        // A single calibration document leaves no document to hold out: hold out the last
        // tenth of its tokens instead.
        let held = stream.len() / 10;
        if held >= 2 {
            eval_ids = stream.split_off(stream.len() - held);
        }
    }
    if opts.evaluate && eval_ids.len() < 2 {
        candle_core::bail!(
            "the evaluation text has {} token(s), too few to measure perplexity on: pass \
             --eval-text FILE, more calibration text, or --no-eval",
            eval_ids.len()
        );
    }
    let windows = calib::windows(&stream, opts.samples, seq_len, opts.seed)?;
    // The windows are shorter than asked when the whole calibration stream is.
    let window_len = windows.first().map_or(seq_len, Vec::len);
    eval_ids.truncate(opts.max_eval_tokens);

    let perplexity_before = if opts.evaluate {
        Some(perplexity(&model, &eval_ids, seq_len)?)
    } else {
        None
    };

    let bar = if opts.progress {
        indicatif::ProgressBar::new(config.num_layers as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] block {pos}/{len} {elapsed_precise}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("{} {}-bit", opts.method.name(), opts.spec.bits));
    let qopts = QuantizeOptions {
        method: opts.method,
        spec: opts.spec,
        act_order: opts.act_order,
        percdamp: opts.percdamp,
        batch: 8,
    };
    let QuantizedModel { layers, dense, awq } =
        quantize_model(&mut model, &windows, &qopts, |p| {
            bar.set_position(p.block as u64)
        })?;
    bar.finish_and_clear();

    let perplexity_after = if opts.evaluate {
        Some(perplexity(&model, &eval_ids, seq_len)?)
    } else {
        None
    };

    let config_json: serde_json::Value = {
        let path = dir.file("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
        serde_json::from_str(&text)
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?
    };
    let mut extra = serde_json::Map::new();
    extra.insert("method".into(), opts.method.name().into());
    extra.insert("calibration".into(), calibration.clone().into());
    extra.insert("samples".into(), windows.len().into());
    extra.insert("seq_len".into(), window_len.into());
    let meta = QuantizeMeta {
        sym: opts.spec.sym,
        desc_act: opts.act_order,
        damp_percent: opts.percdamp,
        true_sequential: opts.method == Method::Gptq,
        static_groups: false,
        extra,
    };
    let to_save: Vec<_> = layers
        .iter()
        .map(|l| (l.path.clone(), l.matrix.clone(), l.bias.clone()))
        .collect();
    let saved = save_quantized_dir(
        &opts.out,
        dir.root(),
        &config_json,
        &dense,
        &to_save,
        format,
        &meta,
    )
    .map_err(err)?;

    let quantized_weights: u64 = layers
        .iter()
        .map(|l| (l.matrix.out_features * l.matrix.in_features) as u64)
        .sum();
    let storage_bits: u64 = layers
        .iter()
        .map(|l| {
            let m = &l.matrix;
            let groups = (m.out_features * m.n_groups()) as u64;
            let g_idx = if format == Format::Gptq {
                32 * m.in_features as u64
            } else {
                0
            };
            u64::from(m.bits) * (m.out_features * m.in_features) as u64
                + groups * (16 + u64::from(m.bits))
                + g_idx
        })
        .sum();
    let total_params = model.num_parameters() as f64;
    let report = QuantizeReport {
        model: opts.model.clone(),
        out: opts.out.clone(),
        method: opts.method.name(),
        bits: opts.spec.bits,
        group_size: opts.spec.group_size.map_or(-1, |g| g as i64),
        sym: opts.spec.sym,
        act_order: opts.act_order,
        format: format.quant_method(),
        calibration,
        samples: windows.len(),
        seq_len: window_len,
        source_bytes: weights_bytes(dir.root()),
        quantized_bytes: saved.weights_bytes,
        quantized_weights,
        bits_per_weight: storage_bits as f64 / quantized_weights.max(1) as f64,
        model_bits_per_weight: saved.weights_bytes as f64 * 8.0 / total_params.max(1.0),
        perplexity_before,
        perplexity_after,
        eval_tokens: eval_ids.len(),
        seconds: started.elapsed().as_secs_f64(),
        awq_alphas: awq
            .iter()
            .map(|b| b.alphas.iter().map(|(n, a)| (n.to_string(), *a)).collect())
            .collect(),
        layers: layers
            .iter()
            .map(|l| LayerLine {
                path: l.path.clone(),
                gptq_loss: l.gptq_loss,
                percdamp: l.percdamp,
            })
            .collect(),
    };
    let json = serde_json::to_string_pretty(&report).map_err(err)?;
    std::fs::write(opts.out.join("quantize_report.json"), json + "\n")
        .map_err(|e| candle_core::Error::msg(format!("{}: {e}", opts.out.display())))?;
    Ok(report)
}
