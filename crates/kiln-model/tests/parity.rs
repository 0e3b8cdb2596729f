//! kiln against transformers and PEFT: the reference outputs in testdata/hf were computed by
//! transformers 5.24 / PEFT 0.21 in float32 on CPU. Tolerances are the fixtures' own: logits
//! within 1e-4 absolute, NLL and summed log-probs within 1e-4 relative, greedy ids equal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::{D, DType, Tensor};
use common::*;
use kiln_model::{GenerateParams, LoadOptions, LoadedModel, SamplingParams, generate, perplexity};

const LOGIT_TOL: f32 = 1e-4;

fn last_logits(m: &LoadedModel, prompt: &[u32]) -> Vec<f32> {
    let ids = Tensor::new(prompt, m.model.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.model
        .forward_last(&ids, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn greedy(m: &LoadedModel, prompt: &[u32], n: usize, use_kv_cache: bool) -> Vec<u32> {
    let params = GenerateParams {
        max_new_tokens: n,
        sampling: SamplingParams::greedy(),
        eos_token_ids: m.eos_token_ids(),
        ignore_eos: true,
        use_kv_cache,
    };
    generate(&m.model, prompt, &params, |_| {})
        .unwrap()
        .token_ids
}

/// The model in `dir` gives the fixture model's reference logits for the first prompt.
fn assert_matches_reference_logits(dir: &std::path::Path) {
    let case = &expected(&llama_dir())["last_logits"][0];
    let diff = max_abs_diff(
        &last_logits(&load(dir), &ids(&case["prompt_ids"])),
        &floats(&case["logits"]),
    );
    assert!(diff < LOGIT_TOL, "{}: max |Δlogit| = {diff}", dir.display());
}

#[test]
fn tokenizer_encodes_and_decodes_like_transformers() {
    let m = load(&llama_dir());
    for case in expected(&llama_dir())["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = m.tokenizer.encode(text, true).unwrap();
        assert_eq!(ids, common::ids(&case["ids"]), "ids of {text:?}");
        assert_eq!(
            m.tokenizer.decode(&ids, true).unwrap(),
            case["decoded"].as_str().unwrap()
        );
    }
}

#[test]
fn chat_template_renders_like_apply_chat_template() {
    let m = load(&llama_dir());
    let chat = &expected(&llama_dir())["chat"];
    let text = m
        .tokenizer
        .apply_chat_template(
            &chat["messages"],
            chat["add_generation_prompt"].as_bool().unwrap(),
        )
        .unwrap();
    assert_eq!(text, chat["text"].as_str().unwrap());
    assert_eq!(m.tokenizer.encode(&text, false).unwrap(), ids(&chat["ids"]));
}

#[test]
fn last_position_logits_match() {
    let m = load(&llama_dir());
    for case in expected(&llama_dir())["last_logits"].as_array().unwrap() {
        let got = last_logits(&m, &ids(&case["prompt_ids"]));
        let diff = max_abs_diff(&got, &floats(&case["logits"]));
        assert!(diff < LOGIT_TOL, "max |Δlogit| = {diff}");
    }
}

#[test]
fn greedy_ids_match_with_and_without_kv_cache() {
    let m = load(&llama_dir());
    for case in expected(&llama_dir())["greedy"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["new_ids"]);
        assert_eq!(
            greedy(&m, &prompt, want.len(), true),
            want,
            "cached, prompt {prompt:?}"
        );
        assert_eq!(
            greedy(&m, &prompt, want.len(), false),
            want,
            "uncached, prompt {prompt:?}"
        );
    }
}

#[test]
fn kv_cache_logits_equal_full_recompute() {
    // Stronger than equal argmaxes: every decode step's logits match a full forward pass.
    let m = load(&llama_dir());
    let seq: Vec<u32> = vec![0, 407, 404, 385, 190, 6, 410, 254, 307, 138];
    let mut cache = m.model.new_cache();
    let dev = m.model.device();
    let prefill = Tensor::new(&seq[..4], dev).unwrap().unsqueeze(0).unwrap();
    m.model.forward_last(&prefill, Some(&mut cache)).unwrap();
    for t in 4..seq.len() {
        let step = Tensor::new(&seq[t..t + 1], dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let cached: Vec<f32> = m
            .model
            .forward_last(&step, Some(&mut cache))
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let full = last_logits(&m, &seq[..=t]);
        assert!(max_abs_diff(&cached, &full) < 1e-5, "step {t}");
    }
    assert_eq!(cache.len(), seq.len());
}

#[test]
fn perplexity_matches_labels_equal_input_ids() {
    let m = load(&llama_dir());
    let case = &expected(&llama_dir())["perplexity"];
    let text_ids = m
        .tokenizer
        .encode(case["text"].as_str().unwrap(), true)
        .unwrap();
    assert_eq!(text_ids, ids(&case["ids"]));
    let p = perplexity(&m.model, &text_ids, 512, 256).unwrap();
    let want = case["mean_nll"].as_f64().unwrap();
    assert!(
        ((p.mean_nll - want) / want).abs() < 1e-4,
        "{} vs {want}",
        p.mean_nll
    );
    assert!(((p.perplexity - case["ppl"].as_f64().unwrap()) / p.perplexity).abs() < 1e-3);
    assert_eq!(
        (p.tokens, p.predicted_tokens),
        (text_ids.len(), text_ids.len() - 1)
    );
}

#[test]
fn windowed_perplexity_scores_each_token_once_with_the_window_context() {
    // Window 6, stride 1: token p is predicted from tokens max(0, p-5)..p. Recompute that
    // independently, one forward pass per token.
    let m = load(&llama_dir());
    let ids = ids(&expected(&llama_dir())["perplexity"]["ids"]);
    let (window, stride) = (6, 1);
    let got = perplexity(&m.model, &ids, window, stride).unwrap();
    let mut nll = 0.0f64;
    for p in 1..ids.len() {
        let ctx_start = p.saturating_sub(window - 1);
        let logits = last_logits(&m, &ids[ctx_start..p]);
        let t = Tensor::new(logits.as_slice(), m.model.device()).unwrap();
        let lp: Vec<f32> = candle_nn::ops::log_softmax(&t, D::Minus1)
            .unwrap()
            .to_vec1()
            .unwrap();
        nll -= f64::from(lp[ids[p] as usize]);
    }
    let want = nll / (ids.len() - 1) as f64;
    assert!(
        (got.mean_nll - want).abs() < 1e-5,
        "{} vs {want}",
        got.mean_nll
    );
    // And a short window really changes the answer (the test above would catch a no-op).
    let full = perplexity(&m.model, &ids, 512, 256).unwrap();
    assert!((full.mean_nll - got.mean_nll).abs() > 1e-3);
}

#[test]
fn completion_log_probs_match_trl() {
    let m = load(&llama_dir());
    let dev = m.model.device();
    for case in expected(&llama_dir())["completion_logps"]
        .as_array()
        .unwrap()
    {
        let prompt_len = m
            .tokenizer
            .encode(case["prompt"].as_str().unwrap(), false)
            .unwrap()
            .len();
        for side in ["chosen", "rejected"] {
            let seq = ids(&case[format!("{side}_ids")]);
            let input = Tensor::new(seq.as_slice(), dev)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = m.model.forward(&input, None).unwrap().squeeze(0).unwrap();
            let lp: Vec<Vec<f32>> = candle_nn::ops::log_softmax(&logits, D::Minus1)
                .unwrap()
                .to_vec2()
                .unwrap();
            let sum: f64 = (prompt_len..seq.len())
                .map(|p| f64::from(lp[p - 1][seq[p] as usize]))
                .sum();
            let want = case[format!("{side}_logps")].as_f64().unwrap();
            assert!(
                ((sum - want) / want).abs() < 1e-4,
                "{side}: {sum} vs {want}"
            );
        }
    }
}

#[test]
fn lora_adapter_matches_peft_unmerged_and_merged() {
    let exp = expected(&lora_dir());
    for merge_adapter in [false, true] {
        let options = LoadOptions {
            adapter: Some(lora_dir()),
            merge_adapter,
            ..LoadOptions::default()
        };
        let m = LoadedModel::load(llama_dir().to_str().unwrap(), &options).unwrap();
        for case in exp["last_logits"].as_array().unwrap() {
            let diff = max_abs_diff(
                &last_logits(&m, &ids(&case["prompt_ids"])),
                &floats(&case["logits"]),
            );
            assert!(
                diff < LOGIT_TOL,
                "merge={merge_adapter}: max |Δlogit| = {diff}"
            );
        }
        for case in exp["greedy"].as_array().unwrap() {
            let want = ids(&case["new_ids"]);
            assert_eq!(
                greedy(&m, &ids(&case["prompt_ids"]), want.len(), true),
                want,
                "merge={merge_adapter}"
            );
        }
    }
}

#[test]
fn rope_parameters_and_dtype_spelling_loads_the_same_model() {
    let dir = copy_dir(&llama_dir());
    edit_json(&dir.path().join("config.json"), |c| {
        c.remove("rope_theta");
        c.remove("rope_scaling");
        c.remove("torch_dtype");
        c.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "default", "rope_theta": 10000.0}),
        );
        c.insert("dtype".into(), "float32".into());
    });
    assert_matches_reference_logits(dir.path());
}

#[test]
fn sharded_checkpoint_loads_the_same_model() {
    let dir = copy_dir(&llama_dir());
    shard_fixture(dir.path());
    assert_matches_reference_logits(dir.path());
}

#[test]
fn half_precision_checkpoints_load_and_stay_close() {
    let case = &expected(&llama_dir())["last_logits"][0];
    for (dtype, name, tol) in [
        (DType::F16, "float16", 2e-2),
        (DType::BF16, "bfloat16", 1.5e-1),
    ] {
        let dir = llama_in_dtype(dtype, name);
        let m = load(dir.path());
        assert_eq!(m.config.dtype, dtype);
        let diff = max_abs_diff(
            &last_logits(&m, &ids(&case["prompt_ids"])),
            &floats(&case["logits"]),
        );
        assert!(diff < tol && diff > 0.0, "{name}: {diff}");
    }
}

#[test]
fn hub_id_resolves_in_the_hf_cache() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--kiln-test--tiny-llama");
    let snap = repo.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for entry in std::fs::read_dir(llama_dir()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), snap.join(entry.file_name())).unwrap();
    }
    let dir = kiln_core::ModelDir::from_hf_cache("kiln-test/tiny-llama", cache.path()).unwrap();
    assert_eq!(dir.root(), snap);
    assert_eq!(dir.config().unwrap().num_layers, 2);
}
