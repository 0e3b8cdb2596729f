//! Mistral, Qwen2 and the RoPE scalings against transformers: tiny random checkpoints written by
//! transformers' own `save_pretrained` (so their config.json uses transformers 5's
//! `rope_parameters`/`dtype` spelling), with reference logits and greedy ids computed in float32
//! on CPU by `testdata/hf/tools/make_arch_fixtures.py`.
//!
//! - `qwen2`: q/k/v biases, tied embeddings (no `lm_head.weight` in the file);
//! - `mistral`: a 4-token sliding window, which the 9- and 15-token prompts exceed;
//! - `llama-rope-llama3`: Llama 3.1 frequency scaling (original context 64);
//! - `llama-rope-linear`: linear position scaling (factor 4).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::Tensor;
use common::*;
use kiln_model::{GenerateParams, SamplingParams, generate};

fn check(name: &str) {
    let dir = testdata().join(name);
    let m = load(&dir);
    let exp = expected(&dir);
    for case in exp["last_logits"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let input = Tensor::new(prompt.as_slice(), m.model.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let got: Vec<f32> = m
            .model
            .forward_last(&input, None)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let diff = max_abs_diff(&got, &floats(&case["logits"]));
        assert!(
            diff < 1e-4,
            "{name}, prompt of {}: max |Δlogit| = {diff}",
            prompt.len()
        );
    }
    for case in exp["greedy"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["new_ids"]);
        for use_kv_cache in [true, false] {
            let params = GenerateParams {
                max_new_tokens: want.len(),
                sampling: SamplingParams::greedy(),
                ignore_eos: true,
                use_kv_cache,
                ..GenerateParams::default()
            };
            let got = generate(&m.model, &prompt, &params, |_| {})
                .unwrap()
                .token_ids;
            assert_eq!(
                got,
                want,
                "{name}, prompt of {}, kv cache {use_kv_cache}",
                prompt.len()
            );
        }
    }
}

#[test]
fn qwen2_matches_transformers() {
    let m = load(&testdata().join("qwen2"));
    assert!(m.config.qkv_bias && m.config.tie_word_embeddings);
    check("qwen2");
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    assert_eq!(
        load(&testdata().join("mistral")).config.sliding_window,
        Some(4)
    );
    check("mistral");
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    check("llama-rope-llama3");
}

#[test]
fn linear_rope_scaling_matches_transformers() {
    check("llama-rope-linear");
}
