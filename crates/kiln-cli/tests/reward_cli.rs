//! `kiln eval reward` and `kiln reward` end to end: the binary scores the reward fixture as
//! transformers does (testdata/hf/llama-reward/expected.json), trains a reward model that it
//! then scores, and names file:line for a bad row.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/hf")
}

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("kiln runs")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "kiln failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn reward_fixture() -> PathBuf {
    testdata().join("llama-reward")
}

#[test]
fn eval_reward_json_matches_transformers() {
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(reward_fixture().join("expected.json")).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("rows.jsonl");
    let cases = expected["texts"].as_array().unwrap();
    // Text rows, and the same texts split into prompt + completion (concatenated to score).
    let mut rows: Vec<String> = cases
        .iter()
        .map(|c| serde_json::json!({"text": c["text"]}).to_string())
        .collect();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let cut = text
            .char_indices()
            .nth(text.chars().count() / 2)
            .map_or(0, |(i, _)| i);
        rows.push(
            serde_json::json!({"prompt": &text[..cut], "completion": &text[cut..]}).to_string(),
        );
    }
    std::fs::write(&data, rows.join("\n") + "\n\n").unwrap();
    let out = ok(&kiln(&[
        "eval",
        "reward",
        "--model",
        reward_fixture().to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--batch-size",
        "3",
        "--json",
    ]));
    let got = json_lines(&out);
    assert_eq!(got.len(), 2 * cases.len(), "one line per row");
    for (i, line) in got.iter().enumerate() {
        let want = cases[i % cases.len()]["score"].as_f64().unwrap();
        let score = line["score"].as_f64().unwrap();
        assert!(
            (score - want).abs() < 1e-4,
            "row {i}: kiln {score}, transformers {want}"
        );
    }

    // Without --json: a readable line per row naming it, and the mean.
    let table = ok(&kiln(&[
        "eval",
        "reward",
        "--model",
        reward_fixture().to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]));
    assert!(table.contains("rows.jsonl:1 "), "{table}");
    assert!(table.contains("hello world"), "{table}");
    assert!(table.contains("mean score"), "{table}");
}

#[test]
fn a_bad_row_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("rows.jsonl");
    for (bad, why) in [
        (r#"{"text": 5}"#, "`text`"),
        (r#"{"prompt": "only a prompt"}"#, "`completion`"),
        ("not json", "invalid JSON"),
    ] {
        std::fs::write(&data, format!("{{\"text\": \"fine\"}}\n{bad}\n")).unwrap();
        let out = kiln(&[
            "eval",
            "reward",
            "--model",
            reward_fixture().to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--json",
        ]);
        assert!(!out.status.success(), "{bad} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("rows.jsonl:2") && err.contains(why),
            "{bad}: {err}"
        );
        assert!(
            out.stdout.is_empty(),
            "no score before every row is checked"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    // A causal LM is not a reward model.
    std::fs::write(&data, "{\"text\": \"fine\"}\n").unwrap();
    let out = kiln(&[
        "eval",
        "reward",
        "--model",
        testdata().join("llama").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("score.weight"), "{err}");
}

/// A tiny `kiln reward` run from the causal LM writes a reward model `kiln eval reward` scores,
/// and its summary is JSON with the held-out accuracy.
#[test]
fn reward_trains_a_model_eval_reward_scores() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pairs.jsonl");
    let rows: Vec<String> = (0..16)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("Request {i}: help me?"),
                "chosen": "Of course! Happy to help.",
                "rejected": "No. Go away.",
            })
            .to_string()
        })
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let out_dir = dir.path().join("rm");
    let config = dir.path().join("reward.yaml");
    std::fs::write(
        &config,
        format!(
            "model_id: {}\ndataset_path: {}\neval_split: 0.25\ntraining_args:\n  output_dir: {}\n  \
             per_device_train_batch_size: 4\n  max_steps: 100\n",
            testdata().join("llama").display(),
            data.display(),
            out_dir.display()
        ),
    )
    .unwrap();
    let summary: Value = serde_json::from_str(&ok(&kiln(&[
        "reward",
        "--config",
        config.to_str().unwrap(),
        "--set",
        "training_args.max_steps=6",
        "--set",
        "training_args.learning_rate=1e-3",
        "--json",
    ])))
    .unwrap();
    assert_eq!(summary["steps"], 6);
    assert_eq!(summary["method"], "full");
    assert_eq!(summary["eval_pairs"], 4);
    assert_eq!(
        summary["eval_accuracy"], 1.0,
        "an obvious preference is learnt: {summary}"
    );

    let rows = dir.path().join("score.jsonl");
    std::fs::write(
        &rows,
        "{\"prompt\": \"Request 99: help me?\", \"completion\": \"Of course! Happy to help.<|im_end|>\"}\n\
         {\"prompt\": \"Request 99: help me?\", \"completion\": \"No. Go away.<|im_end|>\"}\n",
    )
    .unwrap();
    let scores = json_lines(&ok(&kiln(&[
        "eval",
        "reward",
        "--model",
        out_dir.to_str().unwrap(),
        "--data",
        rows.to_str().unwrap(),
        "--json",
    ])));
    let (good, bad) = (
        scores[0]["score"].as_f64().unwrap(),
        scores[1]["score"].as_f64().unwrap(),
    );
    assert!(good > bad, "chosen {good} vs rejected {bad}");

    // The human-readable summary, and a misspelt key named with no panic.
    let text = ok(&kiln(&[
        "reward",
        "--config",
        config.to_str().unwrap(),
        "--set",
        &format!(
            "training_args.output_dir={}",
            dir.path().join("rm2").display()
        ),
        "--set",
        "training_args.max_steps=1",
    ]));
    assert!(
        text.contains("reward model (full, head initialized)"),
        "{text}"
    );
    let out = kiln(&[
        "reward",
        "--config",
        config.to_str().unwrap(),
        "--set",
        "training_args.center_reward_coefficient=0.1",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("center_reward_coefficient"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
