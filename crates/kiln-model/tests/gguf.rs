//! GGUF out and back in: files kiln writes carry llama.cpp's tensor names, types and metadata,
//! and kiln reads them back to the same tensors, the same config, the same tokenizer and (for
//! f16) the original model's logits and greedy tokens, which also proves the q/k row permutation
//! is undone correctly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::*;
use kiln_model::quant::gguf::{ExportReport, GgufType, export_loaded, load_gguf};
use kiln_model::{CausalLm, LoadOptions, LoadedModel};

const ARCHS: [&str; 3] = ["llama", "mistral", "qwen2"];

fn fixture(name: &str) -> LoadedModel {
    load(&testdata().join(name))
}

fn export(loaded: &LoadedModel, ty: GgufType, dir: &Path) -> (PathBuf, ExportReport) {
    let out = dir.join(format!("model-{ty}.gguf"));
    let report = export_loaded(loaded, ty, &out, &|_| {}).expect("export");
    (out, report)
}

fn read(path: &Path) -> (Content, HashMap<String, QTensor>) {
    let mut r = BufReader::new(File::open(path).unwrap());
    let content = Content::read(&mut r).unwrap();
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    let tensors = names
        .into_iter()
        .map(|n| {
            let t = content.tensor(&mut r, &n, &Device::Cpu).unwrap();
            (n, t)
        })
        .collect();
    (content, tensors)
}

/// Writes a copy of `src` with its metadata edited.
fn rewrite(src: &Path, dst: &Path, edit: impl FnOnce(&mut Vec<(String, Value)>)) {
    let (content, tensors) = read(src);
    let mut md: Vec<(String, Value)> = content.metadata.into_iter().collect();
    edit(&mut md);
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut w = std::io::BufWriter::new(File::create(dst).unwrap());
    gguf_file::write(&mut w, &md_refs, &t_refs).unwrap();
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// HF row order from the `llama` GGUF layout: GGUF row `h·d + 2i + s` is HF row `h·d + s·d/2 + i`.
fn unpermute(t: &Tensor, n_head: usize) -> Tensor {
    let rows = t.dims()[0];
    let d = rows / n_head;
    let mut from = vec![0u32; rows];
    for h in 0..n_head {
        for i in 0..d / 2 {
            for s in 0..2 {
                from[h * d + s * d / 2 + i] = (h * d + 2 * i + s) as u32;
            }
        }
    }
    t.index_select(&Tensor::new(from.as_slice(), &Device::Cpu).unwrap(), 0)
        .unwrap()
}

fn last_logits(model: &CausalLm, ids: &[u32]) -> Vec<f32> {
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    to_vec(&model.forward_last(&x, None).unwrap())
}

fn greedy(model: &CausalLm, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut ids = prompt.to_vec();
    for _ in 0..n {
        let logits = last_logits(model, &ids);
        let best = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        ids.push(best as u32);
    }
    ids[prompt.len()..].to_vec()
}

fn md_u32(c: &Content, key: &str) -> u32 {
    c.metadata
        .get(key)
        .unwrap_or_else(|| panic!("missing {key}"))
        .to_u32()
        .unwrap()
}

fn md_str<'a>(c: &'a Content, key: &str) -> &'a str {
    c.metadata
        .get(key)
        .unwrap_or_else(|| panic!("missing {key}"))
        .to_string()
        .unwrap()
}

#[test]
fn every_type_writes_llama_cpp_names_types_and_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ARCHS {
        let loaded = fixture(arch);
        let cfg = &loaded.config;
        for ty in GgufType::ALL {
            let (path, report) = export(&loaded, ty, tmp.path());
            let (c, tensors) = read(&path);
            let g = if arch == "qwen2" { "qwen2" } else { "llama" };
            assert_eq!(md_str(&c, "general.architecture"), g);
            assert_eq!(md_u32(&c, "general.file_type"), ty.file_type());
            assert_eq!(md_u32(&c, "general.quantization_version"), 2);
            assert_eq!(md_u32(&c, "general.alignment"), 32);
            for (key, want) in [
                ("context_length", cfg.max_position_embeddings),
                ("embedding_length", cfg.hidden_size),
                ("block_count", cfg.num_layers),
                ("feed_forward_length", cfg.intermediate_size),
                ("attention.head_count", cfg.num_heads),
                ("attention.head_count_kv", cfg.num_kv_heads),
                ("attention.key_length", cfg.head_dim),
                ("attention.value_length", cfg.head_dim),
                ("vocab_size", cfg.vocab_size),
            ] {
                assert_eq!(
                    md_u32(&c, &format!("{g}.{key}")) as usize,
                    want,
                    "{arch} {key}"
                );
            }
            let eps = c.metadata[&format!("{g}.attention.layer_norm_rms_epsilon")]
                .to_f32()
                .unwrap();
            assert_eq!(eps, cfg.rms_norm_eps as f32);
            assert_eq!(
                c.metadata[&format!("{g}.rope.freq_base")].to_f32().unwrap(),
                cfg.rope.theta as f32
            );
            if arch == "mistral" {
                assert_eq!(md_u32(&c, "llama.attention.sliding_window"), 4);
            }
            assert_eq!(md_str(&c, "tokenizer.ggml.model"), "gpt2");
            assert_eq!(md_str(&c, "tokenizer.ggml.pre"), "gpt-2");
            let tokens = c.metadata["tokenizer.ggml.tokens"].to_vec().unwrap();
            let types = c.metadata["tokenizer.ggml.token_type"].to_vec().unwrap();
            assert_eq!(
                (tokens.len(), types.len()),
                (cfg.vocab_size, cfg.vocab_size)
            );
            assert_eq!(tokens[3].to_string().unwrap(), "<|im_end|>");
            assert_eq!(
                types[3].to_i32().unwrap(),
                3,
                "special added tokens are CONTROL"
            );
            assert_eq!(types[100].to_i32().unwrap(), 1);
            assert!(
                !c.metadata["tokenizer.ggml.merges"]
                    .to_vec()
                    .unwrap()
                    .is_empty()
            );
            assert_eq!(md_u32(&c, "tokenizer.ggml.bos_token_id"), 0);
            assert_eq!(md_u32(&c, "tokenizer.ggml.eos_token_id"), 3);
            assert_eq!(md_u32(&c, "tokenizer.ggml.padding_token_id"), 4);
            assert!(
                c.metadata["tokenizer.ggml.add_bos_token"]
                    .to_bool()
                    .unwrap()
            );
            assert!(md_str(&c, "tokenizer.chat_template").contains("<|im_start|>"));
            assert!(md_str(&c, "tokenizer.huggingface.json").contains("\"BPE\""));

            // One tensor per weight, llama.cpp's names, the model's shapes.
            let mut want: Vec<String> =
                vec!["token_embd.weight".into(), "output_norm.weight".into()];
            if !cfg.tie_word_embeddings {
                want.push("output.weight".into());
            }
            for i in 0..cfg.num_layers {
                for n in [
                    "attn_norm",
                    "attn_q",
                    "attn_k",
                    "attn_v",
                    "attn_output",
                    "ffn_norm",
                    "ffn_gate",
                    "ffn_up",
                    "ffn_down",
                ] {
                    want.push(format!("blk.{i}.{n}.weight"));
                }
                if cfg.qkv_bias {
                    for n in ["attn_q", "attn_k", "attn_v"] {
                        want.push(format!("blk.{i}.{n}.bias"));
                    }
                }
            }
            let mut got: Vec<String> = tensors.keys().cloned().collect();
            want.sort();
            got.sort();
            assert_eq!(got, want, "{arch} {ty}");
            assert_eq!(report.tensors(), want.len());
            let q = &tensors["blk.0.attn_q.weight"];
            assert_eq!(
                q.shape().dims(),
                [cfg.num_heads * cfg.head_dim, cfg.hidden_size]
            );
            assert_eq!(
                tensors["blk.1.ffn_down.weight"].shape().dims(),
                [cfg.hidden_size, cfg.intermediate_size]
            );

            // Types: norms F32; matrices per the mix, with fallbacks for rows of 64 and 96.
            assert_eq!(tensors["blk.0.attn_norm.weight"].dtype(), GgmlDType::F32);
            let (matrix, output, v1) = match ty {
                GgufType::F16 => (GgmlDType::F16, GgmlDType::F16, GgmlDType::F16),
                GgufType::Q8_0 => (GgmlDType::Q8_0, GgmlDType::Q8_0, GgmlDType::Q8_0),
                // Output wants Q6_K; rows of 64 fall back to Q8_0.
                GgufType::Q4_0 => (GgmlDType::Q4_0, GgmlDType::Q8_0, GgmlDType::Q4_0),
                // Q4_K → Q5_0; layer 1 of 2 is a use_more_bits layer: Q6_K → Q8_0.
                GgufType::Q4KM => (GgmlDType::Q5_0, GgmlDType::Q8_0, GgmlDType::Q8_0),
            };
            assert_eq!(
                tensors["blk.0.attn_q.weight"].dtype(),
                matrix,
                "{arch} {ty}"
            );
            assert_eq!(
                tensors["blk.0.attn_v.weight"].dtype(),
                matrix,
                "{arch} {ty}"
            );
            assert_eq!(tensors["blk.1.attn_v.weight"].dtype(), v1, "{arch} {ty}");
            let head = if cfg.tie_word_embeddings {
                "token_embd.weight"
            } else {
                "output.weight"
            };
            assert_eq!(tensors[head].dtype(), output, "{arch} {ty}");
            if ty == GgufType::Q4KM {
                assert!(
                    report
                        .fallbacks
                        .iter()
                        .any(|f| f.tensor == "blk.0.attn_q.weight" && f.wanted == GgmlDType::Q4K)
                );
            }
            let bytes = std::fs::metadata(&path).unwrap().len();
            assert_eq!(report.file_bytes, bytes);
            assert!(report.bits_per_weight() > 4.0 && report.bits_per_weight() <= 32.0);
        }
    }
}

#[test]
fn reloaded_weights_are_the_files_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["llama", "qwen2"] {
        let loaded = fixture(arch);
        let cfg = loaded.config.clone();
        for ty in GgufType::ALL {
            let (path, _) = export(&loaded, ty, tmp.path());
            let (_, tensors) = read(&path);
            let back = load_gguf(&path, &LoadOptions::default()).unwrap();
            assert_eq!(back.config, cfg, "{arch} {ty}: the config survives");
            let file = |name: &str| tensors[name].dequantize(&Device::Cpu).unwrap();
            let mut checked = 0;
            for (module, linear) in back.model.linears() {
                let gguf = if module == "lm_head" {
                    "output".to_string()
                } else {
                    let rest = module.strip_prefix("model.layers.").unwrap();
                    let (i, m) = rest.split_once('.').unwrap();
                    let n = match m {
                        "self_attn.q_proj" => "attn_q",
                        "self_attn.k_proj" => "attn_k",
                        "self_attn.v_proj" => "attn_v",
                        "self_attn.o_proj" => "attn_output",
                        "mlp.gate_proj" => "ffn_gate",
                        "mlp.up_proj" => "ffn_up",
                        _ => "ffn_down",
                    };
                    format!("blk.{i}.{n}")
                };
                let mut want = file(&format!("{gguf}.weight"));
                if arch == "llama" && gguf.ends_with("attn_q") {
                    want = unpermute(&want, cfg.num_heads);
                }
                if arch == "llama" && gguf.ends_with("attn_k") {
                    want = unpermute(&want, cfg.num_kv_heads);
                }
                let (got, want) = (to_vec(&linear.dense_weight().unwrap()), to_vec(&want));
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = max_abs_diff(&got, &want);
                assert!(
                    diff <= 1e-6 * scale,
                    "{arch} {ty} {gguf}: {diff} (scale {scale})"
                );
                if let Some(b) = linear.bias() {
                    let mut fb = file(&format!("{gguf}.bias"));
                    if arch == "llama" && gguf.ends_with("attn_q") {
                        fb = unpermute(&fb, cfg.num_heads);
                    }
                    assert_eq!(to_vec(b), to_vec(&fb), "{arch} {ty} {gguf}.bias");
                }
                checked += 1;
            }
            assert_eq!(checked, back.model.linears().len());
        }
    }
}

#[test]
fn f16_reload_is_the_f16_rounded_original() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ARCHS {
        let loaded = fixture(arch);
        let (path, _) = export(&loaded, GgufType::F16, tmp.path());
        let back = load_gguf(&path, &LoadOptions::default()).unwrap();
        let original: HashMap<String, Tensor> =
            loaded.model.state_dict().unwrap().into_iter().collect();
        let reloaded = back.model.state_dict().unwrap();
        assert_eq!(reloaded.len(), original.len());
        for (name, t) in reloaded {
            let o = &original[&name];
            let rounded = o
                .to_dtype(candle_core::DType::F16)
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap();
            // Vectors stay F32; matrices are F16.
            let want = if o.rank() == 1 { o.clone() } else { rounded };
            assert_eq!(to_vec(&t), to_vec(&want), "{arch} {name}");
        }
    }
}

#[test]
fn f16_reload_keeps_logits_and_greedy_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ARCHS {
        let dir = testdata().join(arch);
        let loaded = load(&dir);
        let (path, _) = export(&loaded, GgufType::F16, tmp.path());
        // Through the generic entry point, as the CLI and server load it.
        let back = LoadedModel::load(path.to_str().unwrap(), &LoadOptions::default()).unwrap();
        let exp = expected(&dir);
        for case in exp["last_logits"].as_array().unwrap() {
            let prompt = ids(&case["prompt_ids"]);
            let diff = max_abs_diff(
                &last_logits(&back.model, &prompt),
                &last_logits(&loaded.model, &prompt),
            );
            // f16 rounding of every matrix (and of qwen2's tied embedding) moves these tiny
            // random models' logits (|logit| ≤ ~6) by up to ~0.012.
            assert!(diff < 2e-2, "{arch}: f16 GGUF logits differ by {diff}");
            // The HF reference too: the permutation is undone, not merely self-consistent.
            let diff = max_abs_diff(&last_logits(&back.model, &prompt), &floats(&case["logits"]));
            assert!(
                diff < 2e-2,
                "{arch}: f16 GGUF vs transformers logits differ by {diff}"
            );
        }
        for case in exp["greedy"].as_array().unwrap() {
            // A near tie can flip under f16 rounding; the fixtures' closest is 0.008.
            if case["min_top2_margin"].as_f64().unwrap() < 0.05 {
                continue;
            }
            let new = ids(&case["new_ids"]);
            assert_eq!(
                greedy(&back.model, &ids(&case["prompt_ids"]), new.len()),
                new,
                "{arch}: greedy tokens of the f16 GGUF"
            );
        }
    }
}

#[test]
fn quantized_reloads_keep_logits_close_and_more_bits_help() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ARCHS {
        let dir = testdata().join(arch);
        let loaded = load(&dir);
        let prompts: Vec<Vec<u32>> = expected(&dir)["last_logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| ids(&c["prompt_ids"]))
            .collect();
        let error = |ty: GgufType| -> (f32, f32) {
            let (path, _) = export(&loaded, ty, tmp.path());
            let back = load_gguf(&path, &LoadOptions::default()).unwrap();
            prompts.iter().fold((0f32, 0f32), |(d, s), p| {
                let (q, f) = (last_logits(&back.model, p), last_logits(&loaded.model, p));
                let scale = f.iter().fold(0f32, |m, v| m.max(v.abs()));
                (d.max(max_abs_diff(&q, &f)), s.max(scale))
            })
        };
        let (q8, scale) = error(GgufType::Q8_0);
        let (q4, _) = error(GgufType::Q4_0);
        // candle's own Q8_0 matmuls move these random models' logits by up to 0.4 (of ~6);
        // kiln's exact Q8_0 weights (f32 activations) stay within 10% of the largest logit.
        assert!(
            q8 < 0.1 * scale,
            "{arch}: q8_0 logits differ by {q8} (max |logit| {scale})"
        );
        assert!(q8 < q4, "{arch}: q8_0 error {q8} is not below q4_0's {q4}");
    }
}

#[test]
fn tokenizer_round_trips_embedded_and_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = llama_dir();
    let loaded = load(&dir);
    let (path, _) = export(&loaded, GgufType::Q8_0, tmp.path());
    let bare = tmp.path().join("no-hf-json.gguf");
    rewrite(&path, &bare, |md| {
        md.retain(|(k, _)| k != "tokenizer.huggingface.json")
    });
    let exp = expected(&dir);
    for file in [&path, &bare] {
        let back = load_gguf(file, &LoadOptions::default()).unwrap();
        for case in exp["encode"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let got = back.tokenizer.encode(text, true).unwrap();
            assert_eq!(got, ids(&case["ids"]), "{}: `{text}`", file.display());
            assert_eq!(
                back.tokenizer.decode(&got, true).unwrap(),
                case["decoded"].as_str().unwrap()
            );
        }
        assert_eq!(back.tokenizer.eos_token_id(), Some(3));
        assert_eq!(back.eos_token_ids(), loaded.eos_token_ids());
        let chat = &exp["chat"];
        let rendered = back
            .tokenizer
            .apply_chat_template(&chat["messages"], true)
            .unwrap();
        assert_eq!(rendered, chat["text"].as_str().unwrap());
        assert_eq!(
            back.tokenizer.encode(&rendered, false).unwrap(),
            ids(&chat["ids"])
        );
    }
}

#[test]
fn rope_scaling_survives_the_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["llama-rope-linear", "llama-rope-llama3"] {
        let loaded = fixture(name);
        let (path, _) = export(&loaded, GgufType::F16, tmp.path());
        let (c, tensors) = read(&path);
        if name.ends_with("llama3") {
            // llama.cpp's form: per-pair frequency divisors, no scaling type it would reject.
            assert_eq!(
                tensors["rope_freqs.weight"].shape().dims(),
                [loaded.config.head_dim / 2]
            );
            assert!(!c.metadata.contains_key("llama.rope.scaling.type"));
        } else {
            assert_eq!(md_str(&c, "llama.rope.scaling.type"), "linear");
        }
        let back = load_gguf(&path, &LoadOptions::default()).unwrap();
        assert_eq!(back.config, loaded.config, "{name}");
        let prompt = ids(&expected(&testdata().join(name))["last_logits"][0]["prompt_ids"]);
        let diff = max_abs_diff(
            &last_logits(&back.model, &prompt),
            &last_logits(&loaded.model, &prompt),
        );
        assert!(diff < 1e-2, "{name}: {diff}");
    }
}

#[test]
fn bad_files_are_errors_naming_the_file_and_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let not_gguf = tmp.path().join("config.gguf");
    std::fs::copy(llama_dir().join("config.json"), &not_gguf).unwrap();
    let e = load_gguf(&not_gguf, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("config.gguf") && e.contains("not a GGUF file"),
        "{e}"
    );

    let loaded = fixture("llama");
    let (path, _) = export(&loaded, GgufType::Q4_0, tmp.path());
    let bytes = std::fs::read(&path).unwrap();
    for (name, len) in [("header.gguf", 200), ("data.gguf", bytes.len() - 100)] {
        let cut = tmp.path().join(name);
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let e = load_gguf(&cut, &LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(name), "{e}");
        if name == "header.gguf" {
            assert!(e.contains("truncated or corrupt"), "{e}");
        } else {
            assert!(e.contains("tensor `") && e.contains("remaining"), "{e}");
        }
    }

    let gpt2 = tmp.path().join("gpt2.gguf");
    rewrite(&path, &gpt2, |md| {
        for (k, v) in md.iter_mut() {
            if k == "general.architecture" {
                *v = Value::String("gpt2".into());
            }
        }
    });
    let e = load_gguf(&gpt2, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("gpt2.gguf") && e.contains("general.architecture") && e.contains("`gpt2`"),
        "{e}"
    );

    let no_layers = tmp.path().join("no-layers.gguf");
    rewrite(&path, &no_layers, |md| {
        md.retain(|(k, _)| k != "llama.block_count")
    });
    let e = load_gguf(&no_layers, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no-layers.gguf") && e.contains("llama.block_count"),
        "{e}"
    );

    let missing = tmp.path().join("absent.gguf");
    let e = load_gguf(&missing, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("absent.gguf"), "{e}");
}
