#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `quantize_dir` and `quantize_model` end to end on the tiny fixtures: every method and bit
//! width writes a checkpoint that reloads into the very model quantization left in memory, the
//! algorithms beat round-to-nearest where they claim to, and bad requests are refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use kiln_model::quant::checkpoint::Format;
use kiln_model::{CausalLm, LinearWeight, LoadOptions, LoadedModel};
use kiln_quant::pipeline::QuantizedModel;
use kiln_quant::{
    Method, QuantSpec, QuantizeDirOptions, QuantizeOptions, QuantizeReport, calib, quantize_dir,
    quantize_model,
};

const SAMPLES: usize = 8;
const SEQ_LEN: usize = 64;
const PROMPT: &str = "The quick brown fox jumps over the lazy dog, and the model learns.";

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/hf")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

/// A fixed calibration text: 60 documents of pseudo-random English words, separated by blank
/// lines.
fn calibration_text() -> String {
    const WORDS: [&str; 40] = [
        "the", "model", "learns", "to", "predict", "next", "token", "from", "a", "small", "world",
        "of", "words", "and", "numbers", "every", "day", "river", "flows", "into", "sea", "while",
        "birds", "sing", "over", "green", "hills", "under", "bright", "sky", "people", "write",
        "stories", "about", "quiet", "cities", "where", "trains", "arrive", "late",
    ];
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as usize
    };
    let mut docs = Vec::new();
    for _ in 0..60 {
        let len = 30 + next() % 30;
        let words: Vec<&str> = (0..len).map(|_| WORDS[next() % WORDS.len()]).collect();
        docs.push(format!("{}.", words.join(" ")));
    }
    docs.join("\n\n")
}

fn write_calibration(dir: &Path) -> PathBuf {
    let path = dir.join("calibration.txt");
    std::fs::write(&path, calibration_text()).unwrap();
    path
}

fn spec(bits: u8, group_size: Option<usize>) -> QuantSpec {
    QuantSpec {
        bits,
        group_size,
        sym: false,
    }
}

fn dir_options(
    model: &str,
    out: &Path,
    method: Method,
    spec: QuantSpec,
    calibration: &Path,
) -> QuantizeDirOptions {
    let mut opts = QuantizeDirOptions::new(model, out, method, spec);
    opts.calibration = Some(calibration.to_path_buf());
    opts.samples = SAMPLES;
    opts.seq_len = SEQ_LEN;
    opts.max_eval_tokens = 512;
    opts
}

fn load(spec: &str) -> LoadedModel {
    LoadedModel::load(spec, &LoadOptions::default()).unwrap()
}

/// The calibration windows `quantize_dir` draws for `opts`, as it draws them.
fn windows_of(loaded: &LoadedModel, opts: &QuantizeDirOptions) -> Vec<Vec<u32>> {
    let docs = calib::read_documents(opts.calibration.as_ref().unwrap()).unwrap();
    let (calib_docs, _) = calib::split_documents(&docs);
    let seq_len = opts
        .seq_len
        .min(loaded.config.max_position_embeddings)
        .max(2);
    let stream = calib::token_stream(&loaded.tokenizer, &calib_docs).unwrap();
    calib::windows(&stream, opts.samples, seq_len, opts.seed).unwrap()
}

/// `quantize_model` as `quantize_dir` runs it: the model it leaves in memory.
fn quantize_in_memory(opts: &QuantizeDirOptions) -> (CausalLm, LoadedModel, QuantizedModel) {
    let source = load(&opts.model);
    let windows = windows_of(&source, opts);
    let mut model = load(&opts.model).model;
    let qopts = QuantizeOptions {
        method: opts.method,
        spec: opts.spec,
        act_order: opts.act_order,
        percdamp: opts.percdamp,
        batch: 8,
    };
    let q = quantize_model(&mut model, &windows, &qopts, |_| {}).unwrap();
    (model, source, q)
}

fn ids_tensor(ids: &[u32]) -> Tensor {
    Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap()
}

fn logits(model: &CausalLm, ids: &Tensor) -> Vec<f32> {
    model
        .forward(ids, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `‖a − b‖ / ‖b‖`.
fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den).sqrt()
}

fn check_report(r: &QuantizeReport, bits: u8, format: &str) {
    let bpw = r.bits_per_weight;
    assert!(
        bpw >= f64::from(bits) && bpw <= f64::from(bits) + 2.0,
        "bits per weight {bpw} for {bits} bits"
    );
    assert!(
        r.quantized_bytes < r.source_bytes,
        "{} ≥ {}",
        r.quantized_bytes,
        r.source_bytes
    );
    assert!(r.quantized_weights > 0);
    assert_eq!(r.bits, bits);
    assert_eq!(r.format, format);
    assert_eq!(r.samples, SAMPLES);
    assert_eq!(r.seq_len, SEQ_LEN);
    assert!(r.eval_tokens > 0 && r.eval_tokens <= 512);
    let (before, after) = (r.perplexity_before.unwrap(), r.perplexity_after.unwrap());
    assert!(before.is_finite() && before > 1.0, "{before}");
    assert!(after.is_finite() && after > 1.0, "{after}");
    assert!(r.perplexity_change().unwrap().is_finite());
    assert!(r.out.join("quantize_report.json").is_file());
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r.out.join("quantize_report.json")).unwrap())
            .unwrap();
    assert_eq!(json["bits"], bits);
    assert_eq!(json["format"], format);
}

/// Every block linear of `model` is packed; the LM head (when untied) stays dense.
fn check_packed(model: &CausalLm) {
    let linears = model.linears();
    assert!(!linears.is_empty());
    for (path, linear) in linears {
        if path == "lm_head" {
            assert!(
                matches!(linear.weight(), LinearWeight::Dense(_)),
                "lm_head should stay dense"
            );
        } else {
            assert!(
                matches!(linear.weight(), LinearWeight::Packed(_)),
                "{path} should be packed"
            );
        }
    }
}

/// Quantizes `model` into a tempdir with `quantize_dir`, checks the report, reloads the
/// directory and compares its logits with the in-memory quantized model's. Returns the
/// reloaded model's and the source model's logits on the prompt.
fn round_trip(
    model: &str,
    method: Method,
    bits: u8,
    act_order: bool,
    format: &str,
) -> (LoadedModel, Vec<f32>, Vec<f32>) {
    let tmp = tempfile::tempdir().unwrap();
    let calibration = write_calibration(tmp.path());
    let out = tmp.path().join("out");
    let mut opts = dir_options(model, &out, method, spec(bits, Some(32)), &calibration);
    opts.act_order = act_order;
    let report = quantize_dir(&opts).unwrap();
    let what = format!("{} {bits}-bit act_order={act_order}", method.name());
    check_report(&report, bits, format);
    assert_eq!(report.method, method.name(), "{what}");
    assert_eq!(report.act_order, act_order);

    let reloaded = load(out.to_str().unwrap());
    check_packed(&reloaded.model);
    let (in_memory, source, q) = quantize_in_memory(&opts);
    check_packed(&in_memory);
    assert_eq!(q.layers.len(), report.layers.len());
    for (a, b) in q.layers.iter().zip(&report.layers) {
        assert_eq!(a.path, b.path);
    }
    let ids = ids_tensor(&source.tokenizer.encode(PROMPT, true).unwrap());
    let reloaded_logits = logits(&reloaded.model, &ids);
    let memory_logits = logits(&in_memory, &ids);
    let diff = max_abs_diff(&reloaded_logits, &memory_logits);
    assert!(diff <= 1e-4, "{what}: reload differs by {diff}");
    let source_logits = logits(&source.model, &ids);
    let rel = relative_error(&reloaded_logits, &source_logits);
    // The tiny random fixtures' logits are small, so 4 bits moves them a lot in relative terms.
    let bound = if bits == 4 { 0.8 } else { 0.1 };
    assert!(
        rel.is_finite() && rel < bound,
        "{what}: relative error {rel}"
    );
    (reloaded, reloaded_logits, source_logits)
}

#[test]
fn rtn_round_trips_at_4_and_8_bits() {
    for bits in [4, 8] {
        round_trip(&fixture("llama"), Method::Rtn, bits, false, "gptq");
    }
}

#[test]
fn gptq_round_trips_at_4_and_8_bits() {
    for bits in [4, 8] {
        round_trip(&fixture("llama"), Method::Gptq, bits, false, "gptq");
    }
}

#[test]
fn gptq_act_order_round_trips_at_4_and_8_bits() {
    for bits in [4, 8] {
        round_trip(&fixture("llama"), Method::Gptq, bits, true, "gptq");
    }
}

#[test]
fn awq_round_trips_in_the_awq_layout_at_4_bits_and_gptq_at_8() {
    round_trip(&fixture("llama"), Method::Awq, 4, false, "awq");
    round_trip(&fixture("llama"), Method::Awq, 8, false, "gptq");
}

#[test]
fn eight_bits_is_closer_than_four() {
    let (_, q4, src) = round_trip(&fixture("llama"), Method::Rtn, 4, false, "gptq");
    let (_, q8, _) = round_trip(&fixture("llama"), Method::Rtn, 8, false, "gptq");
    let (e4, e8) = (relative_error(&q4, &src), relative_error(&q8, &src));
    assert!(e8 < e4, "8-bit {e8} vs 4-bit {e4}");
}

#[test]
fn qwen2_with_biases_round_trips_with_every_method() {
    let source = load(&fixture("qwen2"));
    let bias_of = |model: &CausalLm, path: &str| -> Vec<f32> {
        let (_, linear) = model
            .linears()
            .into_iter()
            .find(|(p, _)| p == path)
            .unwrap();
        linear
            .bias()
            .unwrap_or_else(|| panic!("{path} lost its bias"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let mut errors = HashMap::new();
    for (method, format) in [
        (Method::Rtn, "gptq"),
        (Method::Gptq, "gptq"),
        (Method::Awq, "awq"),
    ] {
        let (reloaded, q, src) = round_trip(&fixture("qwen2"), method, 4, false, format);
        for layer in 0..source.config.num_layers {
            for name in ["q_proj", "k_proj", "v_proj"] {
                let path = format!("model.layers.{layer}.self_attn.{name}");
                let kept = bias_of(&reloaded.model, &path);
                let orig = bias_of(&source.model, &path);
                // Grouped-query attention: AWQ scales no o_proj, so no bias is rescaled.
                assert!(
                    max_abs_diff(&kept, &orig) < 1e-6,
                    "{} {path}: bias changed",
                    method.name()
                );
            }
        }
        errors.insert(method.name(), relative_error(&q, &src));
    }
    let (rtn, gptq, awq) = (errors["rtn"], errors["gptq"], errors["awq"]);
    assert!(gptq < 1.5 * rtn, "gptq {gptq} vs rtn {rtn}");
    assert!(awq < 1.5 * rtn, "awq {awq} vs rtn {rtn}");
}

/// A Qwen2-shaped model without grouped-query attention (so AWQ scales o_proj and folds the
/// inverse into v_proj's weight and bias), with non-zero biases.
fn mha_qwen2_with_biases() -> CausalLm {
    let raw: kiln_core::config::RawConfig = serde_json::from_str(
        r#"{"architectures": ["Qwen2ForCausalLM"], "vocab_size": 445, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 512,
        "tie_word_embeddings": true, "torch_dtype": "float32"}"#,
    )
    .unwrap();
    let cfg = kiln_core::ModelConfig::from_raw(raw, Path::new("config.json")).unwrap();
    assert!(cfg.qkv_bias && cfg.num_kv_heads == cfg.num_heads);
    let mut tensors =
        kiln_model::init::init_weights(&cfg, 0.2, 11, DType::F32, &Device::Cpu).unwrap();
    let mut names: Vec<String> = tensors
        .keys()
        .filter(|k| k.ends_with(".bias"))
        .cloned()
        .collect();
    names.sort();
    assert!(!names.is_empty());
    for (salt, name) in names.into_iter().enumerate() {
        let len = tensors[&name].elem_count();
        let values: Vec<f32> = (0..len)
            .map(|i| 0.3 * ((i * 7 + salt * 13) as f32 * 0.37).sin())
            .collect();
        tensors.insert(name, Tensor::from_vec(values, len, &Device::Cpu).unwrap());
    }
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    CausalLm::load(vb, &cfg).unwrap()
}

fn random_windows(n: usize, seq: usize, vocab: u32, seed: u64) -> Vec<Vec<u32>> {
    let mut state = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    (0..n)
        .map(|_| {
            (0..seq)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    ((state >> 33) % u64::from(vocab)) as u32
                })
                .collect()
        })
        .collect()
}

#[test]
fn awq_folds_the_o_proj_scale_into_v_proj_bias() {
    let windows = random_windows(8, 64, 445, 3);
    let probe = ids_tensor(&random_windows(1, 48, 445, 99)[0]);
    let original = logits(&mha_qwen2_with_biases(), &probe);
    for bits in [4, 8] {
        let mut errors = Vec::new();
        for method in [Method::Rtn, Method::Awq] {
            let mut model = mha_qwen2_with_biases();
            let opts = QuantizeOptions {
                method,
                spec: spec(bits, Some(32)),
                act_order: false,
                percdamp: 0.01,
                batch: 8,
            };
            let q = quantize_model(&mut model, &windows, &opts, |_| {}).unwrap();
            if method == Method::Awq {
                for block in &q.awq {
                    // Every scale set ran, o_proj's included (no grouped-query attention).
                    assert_eq!(block.alphas.len(), 4);
                    assert!(block.alphas.iter().all(|(_, a)| a.is_some()), "{block:?}");
                    assert!(block.awq_loss <= block.rtn_loss, "{block:?}");
                }
            }
            // The v_proj biases in the saved layers are what the model computes with.
            for layer in &q.layers {
                let (_, linear) = model
                    .linears()
                    .into_iter()
                    .find(|(p, _)| *p == layer.path)
                    .unwrap();
                match (&layer.bias, linear.bias()) {
                    (Some(a), Some(b)) => {
                        let (a, b): (Vec<f32>, Vec<f32>) = (
                            a.flatten_all().unwrap().to_vec1().unwrap(),
                            b.flatten_all().unwrap().to_vec1().unwrap(),
                        );
                        assert!(max_abs_diff(&a, &b) < 1e-6, "{}", layer.path);
                    }
                    (None, None) => {}
                    _ => panic!("{}: bias kept in one place only", layer.path),
                }
            }
            errors.push(relative_error(&logits(&model, &probe), &original));
        }
        let (rtn, awq) = (errors[0], errors[1]);
        assert!(
            awq.is_finite() && awq < 1.5 * rtn + 1e-3,
            "{bits}-bit: awq {awq} vs rtn {rtn}"
        );
    }
}

/// Mean squared difference of the logits of `a` and `b` over `windows`.
fn logits_mse(a: &CausalLm, b: &CausalLm, windows: &[Vec<u32>]) -> f64 {
    let mut total = 0.0;
    let mut n = 0usize;
    for w in windows {
        let ids = ids_tensor(w);
        let (x, y) = (logits(a, &ids), logits(b, &ids));
        total += x
            .iter()
            .zip(&y)
            .map(|(p, q)| f64::from(p - q).powi(2))
            .sum::<f64>();
        n += x.len();
    }
    total / n as f64
}

#[test]
fn gptq_beats_rtn_on_the_calibration_windows_and_awq_beats_rtn_per_block() {
    let tmp = tempfile::tempdir().unwrap();
    let calibration = write_calibration(tmp.path());
    let per_row = spec(4, None);
    let opts = dir_options(
        &fixture("llama"),
        &tmp.path().join("unused"),
        Method::Gptq,
        per_row,
        &calibration,
    );
    let reference = load(&opts.model);
    let windows = windows_of(&reference, &opts);
    assert_eq!(windows.len(), SAMPLES);
    let quantized = |method: Method| {
        let mut model = load(&opts.model).model;
        let qopts = QuantizeOptions {
            method,
            spec: per_row,
            act_order: false,
            percdamp: 0.01,
            batch: 8,
        };
        let q = quantize_model(&mut model, &windows, &qopts, |_| {}).unwrap();
        (model, q)
    };
    let (rtn, _) = quantized(Method::Rtn);
    let (gptq, gq) = quantized(Method::Gptq);
    assert!(
        gq.layers
            .iter()
            .all(|l| l.gptq_loss.is_some_and(f64::is_finite))
    );
    let (rtn_mse, gptq_mse) = (
        logits_mse(&rtn, &reference.model, &windows),
        logits_mse(&gptq, &reference.model, &windows),
    );
    assert!(
        gptq_mse < rtn_mse,
        "GPTQ logits MSE {gptq_mse} should be below RTN's {rtn_mse}"
    );

    let (_, aq) = quantized(Method::Awq);
    assert_eq!(aq.awq.len(), reference.config.num_layers);
    for (i, block) in aq.awq.iter().enumerate() {
        assert!(
            block.awq_loss.is_finite() && block.awq_loss <= block.rtn_loss,
            "block {i}: AWQ {} vs RTN {}",
            block.awq_loss,
            block.rtn_loss
        );
    }
}

fn error_of(opts: &QuantizeDirOptions) -> String {
    quantize_dir(opts).unwrap_err().to_string()
}

#[test]
fn awq_refuses_act_order() {
    let tmp = tempfile::tempdir().unwrap();
    let calibration = write_calibration(tmp.path());
    let out = tmp.path().join("out");
    let mut opts = dir_options(
        &fixture("llama"),
        &out,
        Method::Awq,
        spec(4, Some(32)),
        &calibration,
    );
    opts.act_order = true;
    let err = error_of(&opts);
    assert!(err.contains("act-order"), "{err}");
    assert!(!out.join("config.json").exists());
}

#[test]
fn the_awq_layout_refuses_8_bits() {
    let tmp = tempfile::tempdir().unwrap();
    let calibration = write_calibration(tmp.path());
    let out = tmp.path().join("out");
    for method in [Method::Awq, Method::Gptq, Method::Rtn] {
        let mut opts = dir_options(
            &fixture("llama"),
            &out,
            method,
            spec(8, Some(32)),
            &calibration,
        );
        opts.format = Some(Format::Awq);
        let err = error_of(&opts);
        assert!(err.contains("4-bit") && err.contains("AWQ"), "{err}");
        assert!(!out.join("config.json").exists());
    }
}

#[test]
fn an_already_quantized_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let calibration = write_calibration(tmp.path());
    let first = tmp.path().join("first");
    let mut opts = dir_options(
        &fixture("llama"),
        &first,
        Method::Rtn,
        spec(4, Some(32)),
        &calibration,
    );
    opts.evaluate = false;
    quantize_dir(&opts).unwrap();
    let again = dir_options(
        first.to_str().unwrap(),
        &tmp.path().join("second"),
        Method::Gptq,
        spec(4, Some(32)),
        &calibration,
    );
    let err = error_of(&again);
    assert!(err.contains("already quantized"), "{err}");
    assert!(!tmp.path().join("second").join("config.json").exists());
}

#[test]
fn a_bad_calibration_line_is_named_by_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let calibration = tmp.path().join("calib.jsonl");
    std::fs::write(
        &calibration,
        "{\"text\": \"one document\"}\n\n{\"text\": \"two\"}\nnot json\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let opts = dir_options(
        &fixture("llama"),
        &out,
        Method::Gptq,
        spec(4, Some(32)),
        &calibration,
    );
    let err = error_of(&opts);
    assert!(err.contains("calib.jsonl:4"), "{err}");
    assert!(!out.join("config.json").exists());

    std::fs::write(&calibration, "{\"text\": \"a\"}\n{\"body\": \"b\"}\n").unwrap();
    let err = error_of(&opts);
    assert!(
        err.contains("calib.jsonl:2") && err.contains("\"text\""),
        "{err}"
    );
}

#[test]
fn a_single_document_calibration_file_holds_out_its_last_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let calibration = tmp.path().join("one.txt");
    std::fs::write(&calibration, calibration_text().replace("\n\n", " ")).unwrap();
    let out = tmp.path().join("out");
    let opts = dir_options(
        &fixture("llama"),
        &out,
        Method::Rtn,
        spec(4, Some(32)),
        &calibration,
    );
    let report = quantize_dir(&opts).unwrap();
    assert!(report.eval_tokens >= 2, "{}", report.eval_tokens);
    assert!(report.perplexity_after.unwrap().is_finite());
    assert_eq!(report.seq_len, SEQ_LEN);

    // Too little text to hold any out: a clear error, or fine without the measurement.
    std::fs::write(&calibration, "the model learns").unwrap();
    let out = tmp.path().join("short");
    let mut opts = dir_options(
        &fixture("llama"),
        &out,
        Method::Gptq,
        spec(4, Some(32)),
        &calibration,
    );
    let err = error_of(&opts);
    assert!(
        err.contains("--eval-text") && err.contains("--no-eval"),
        "{err}"
    );
    opts.evaluate = false;
    let report = quantize_dir(&opts).unwrap();
    // One window of the whole (short) stream, reported at its real length.
    assert_eq!(report.samples, 1);
    assert!(report.seq_len < SEQ_LEN, "{}", report.seq_len);
    assert!(report.perplexity_before.is_none());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["quantization_config"]["meta"]["seq_len"], report.seq_len,
        "{}",
        config["quantization_config"]
    );
}
