//! Reward models against transformers: testdata/hf/llama-reward is `LlamaForSequenceClassification`
//! (num_labels=1, pad_token_id 4) on testdata/hf/llama's weights with a random score head, and its
//! expected.json holds transformers 5.24's float32 scores (made by scripts/reward_fixture.py).
//! Scores agree within 1e-4 absolute.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use kiln_core::Tokenizer;
use kiln_model::reward::{RewardModel, SCORE_WEIGHT};
use serde_json::Value;

const TOL: f32 = 1e-4;

fn reward_dir() -> PathBuf {
    testdata().join("llama-reward")
}

fn load_reward(dir: &Path) -> RewardModel {
    RewardModel::load(dir, DType::F32, &Device::Cpu).expect("reward model loads")
}

fn texts() -> Vec<Value> {
    expected(&reward_dir())["texts"].as_array().unwrap().clone()
}

fn fixture_scores() -> Vec<f32> {
    texts()
        .iter()
        .map(|c| c["score"].as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn scores_match_transformers_one_text_at_a_time() {
    let model = load_reward(&reward_dir());
    assert_eq!(model.pad_token_id(), Some(4));
    let tokenizer = Tokenizer::from_dir(&reward_dir()).unwrap();
    for case in texts() {
        let text = case["text"].as_str().unwrap();
        let row = tokenizer.encode(text, true).unwrap();
        assert_eq!(row, ids(&case["ids"]), "ids of {text:?}");
        let score = model.score_rows(&[row]).unwrap()[0];
        let want = case["score"].as_f64().unwrap() as f32;
        assert!(
            (score - want).abs() < TOL,
            "{text:?}: kiln {score}, transformers {want}"
        );
    }
}

#[test]
fn a_batch_scores_what_each_row_scores_alone() {
    let model = load_reward(&reward_dir());
    let rows: Vec<Vec<u32>> = texts().iter().map(|c| ids(&c["ids"])).collect();
    let got = model.score_rows(&rows).unwrap();
    let diff = max_abs_diff(&got, &fixture_scores());
    assert!(diff < TOL, "batched scores off by {diff}: {got:?}");
}

/// transformers' padded batch, passed in already padded: the rule "rightmost token that is not
/// the pad id" finds each row's end.
#[test]
fn prepadded_batch_matches_transformers_batch() {
    let model = load_reward(&reward_dir());
    let batch = &expected(&reward_dir())["batch"];
    let rows: Vec<Vec<u32>> = batch["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    assert!(
        rows.iter().any(|r| r.last() == Some(&4)),
        "the batch is padded"
    );
    let got = model.score_rows(&rows).unwrap();
    let diff = max_abs_diff(&got, &floats(&batch["scores"]));
    assert!(diff < TOL, "padded batch off by {diff}: {got:?}");
}

/// A text ending in the pad token is read before it (transformers' rule), so "hello world<pad>"
/// scores exactly what "hello world" scores; without a pad id the last position is read.
#[test]
fn trailing_pad_tokens_are_skipped_only_with_a_pad_id() {
    let model = load_reward(&reward_dir());
    let cases = texts();
    let plain = ids(&cases[0]["ids"]);
    let padded = ids(&cases[3]["ids"]);
    assert_eq!(padded.last(), Some(&4));
    let s = model.score_rows(&[plain.clone(), padded.clone()]).unwrap();
    assert_eq!(s[0], s[1]);
    let no_pad = model.clone().with_pad_token_id(None);
    let s2 = no_pad.score_rows(&[plain, padded]).unwrap();
    assert!((s2[0] - s[0]).abs() < 1e-6);
    assert!(
        (s2[1] - s[1]).abs() > 1e-3,
        "the last position (the pad token) is read"
    );
}

#[test]
fn save_then_load_round_trips_exactly() {
    let model = load_reward(&reward_dir());
    let out = tempfile::tempdir().unwrap();
    let saved = model.save(&reward_dir(), out.path()).unwrap();
    assert!(saved.copied.contains(&"tokenizer.json".to_string()));
    let tensors = read_tensors(&out.path().join("model.safetensors"));
    assert!(tensors.contains_key(SCORE_WEIGHT));
    assert!(tensors.contains_key("model.embed_tokens.weight"));
    assert!(
        !tensors.contains_key("lm_head.weight"),
        "no LM head is saved"
    );
    let original = read_tensors(&reward_dir().join("model.safetensors"));
    assert_eq!(
        {
            let mut k: Vec<_> = tensors.keys().collect();
            k.sort();
            k
        },
        {
            let mut k: Vec<_> = original.keys().collect();
            k.sort();
            k
        },
        "the same tensors transformers saved"
    );
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(config["id2label"]["0"], "LABEL_0");
    assert_eq!(config["label2id"]["LABEL_0"], 0);
    assert_eq!(config["pad_token_id"], 4);

    let reloaded = load_reward(out.path());
    let rows: Vec<Vec<u32>> = texts().iter().map(|c| ids(&c["ids"])).collect();
    assert_eq!(
        model.score_rows(&rows).unwrap(),
        reloaded.score_rows(&rows).unwrap()
    );
    for ((na, a), (nb, b)) in model
        .state_dict()
        .unwrap()
        .iter()
        .zip(reloaded.state_dict().unwrap().iter())
    {
        assert_eq!(na, nb);
        assert_eq!(max_diff(a, b), 0.0, "{na}");
    }
    let again = model.save(&reward_dir(), out.path()).unwrap_err();
    assert!(
        again.to_string().contains("refusing to overwrite"),
        "{again}"
    );
}

/// The fixture is llama's decoder plus a head: a reward model built on the causal LM with that
/// head scores what transformers scores, and starting a run from the causal LM draws a seeded head.
#[test]
fn a_causal_lm_becomes_a_reward_model() {
    let lm = load(&llama_dir()).model;
    let head = load_reward(&reward_dir()).score_weight().clone();
    let model = RewardModel::from_parts(lm.clone(), head, Some(4)).unwrap();
    let rows: Vec<Vec<u32>> = texts().iter().map(|c| ids(&c["ids"])).collect();
    let diff = max_abs_diff(&model.score_rows(&rows).unwrap(), &fixture_scores());
    assert!(diff < TOL, "{diff}");
    assert!(
        !model
            .state_dict()
            .unwrap()
            .iter()
            .any(|(n, _)| n == "lm_head.weight")
    );

    let (a, fresh) = RewardModel::load_or_init(&llama_dir(), DType::F32, &Device::Cpu, 3).unwrap();
    assert!(fresh);
    let b = RewardModel::from_causal_lm(lm, 0.02, 3).unwrap();
    assert_eq!(max_diff(a.score_weight(), b.score_weight()), 0.0, "seeded");
    assert_eq!(a.pad_token_id(), Some(4));
    let (_, fresh) = RewardModel::load_or_init(&reward_dir(), DType::F32, &Device::Cpu, 3).unwrap();
    assert!(!fresh, "a reward model keeps its head");
}

/// `score.weight`'s gradient of Σ scores is the sum of the hidden states the scores were read
/// at, and the decoder's weights get gradients through the fused training layers.
#[test]
fn scores_are_differentiable_through_head_and_backbone() {
    let mut model = load_reward(&reward_dir());
    let vars = model.make_trainable(|_| true).unwrap();
    assert!(vars.iter().any(|(n, _)| n == SCORE_WEIGHT));
    assert!(!vars.iter().any(|(n, _)| n == "lm_head.weight"));
    let rows = vec![ids(&texts()[0]["ids"]), ids(&texts()[2]["ids"])];
    let loss = model.scores(&rows).unwrap().sum_all().unwrap();
    let grads = model.backward(&loss).unwrap();
    let score_var = &vars.iter().find(|(n, _)| n == SCORE_WEIGHT).unwrap().1;
    let g = grads.get(score_var).expect("head gradient");

    let detached = model.detached();
    let mut want = Tensor::zeros((1, 64), DType::F32, &Device::Cpu).unwrap();
    for row in &rows {
        let ids = Tensor::new(row.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let h = detached.backbone().forward_hidden(&ids, None).unwrap();
        let last = h.narrow(1, row.len() - 1, 1).unwrap().squeeze(1).unwrap();
        want = (want + last).unwrap();
    }
    assert!(max_diff(g, &want) < 1e-4);
    for name in [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.norm.weight",
    ] {
        let var = &vars.iter().find(|(n, _)| n == name).unwrap().1;
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{name}: zero gradient");
    }
}

#[test]
fn a_causal_lm_is_not_a_reward_model() {
    let err = RewardModel::load(&llama_dir(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("score.weight") && err.contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn a_misshaped_head_names_the_tensor_and_shapes() {
    let dir = copy_dir(&reward_dir());
    let file = dir.path().join("model.safetensors");
    let mut tensors = read_tensors(&file);
    let two = Tensor::zeros((2, 64), DType::F32, &Device::Cpu).unwrap();
    tensors.insert(SCORE_WEIGHT.to_string(), two);
    write_tensors(&tensors, &file);
    let err = RewardModel::load(dir.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("score.weight") && err.contains("[1, 64]") && err.contains("[2, 64]"),
        "{err}"
    );
}

#[test]
fn more_than_one_label_is_refused_by_key() {
    let dir = copy_dir(&reward_dir());
    edit_json(&dir.path().join("config.json"), |c| {
        c.insert(
            "id2label".into(),
            serde_json::json!({"0": "LABEL_0", "1": "LABEL_1"}),
        );
    });
    let err = RewardModel::load(dir.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("id2label") && err.contains("num_labels = 1"),
        "{err}"
    );
}

#[test]
fn empty_rows_are_an_error() {
    let model = load_reward(&reward_dir());
    let err = model
        .score_rows(&[vec![0, 5], vec![]])
        .unwrap_err()
        .to_string();
    assert!(err.contains("row 1"), "{err}");
    assert!(model.score_rows(&[]).unwrap().is_empty());
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
