//! `kiln eval logps` and `kiln dpo` through the binary: TRL's log-probs on the reference
//! fixture, a DPO run whose adapter `kiln eval logps --adapter` reads back, and clear errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/hf")
}

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("kiln runs")
}

fn model() -> String {
    testdata().join("llama").to_str().unwrap().to_string()
}

fn fixture_pairs(dir: &Path) -> (PathBuf, Vec<Value>) {
    let text = std::fs::read_to_string(testdata().join("llama/expected.json")).unwrap();
    let expected: Value = serde_json::from_str(&text).unwrap();
    let rows = expected["completion_logps"].as_array().unwrap().clone();
    let lines: Vec<String> = rows
        .iter()
        .map(|r| {
            json!({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
                .to_string()
        })
        .collect();
    let path = dir.join("prefs.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    (path, rows)
}

fn json_lines(out: &Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "kiln failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn eval_logps_equals_the_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let (data, rows) = fixture_pairs(dir.path());
    let out = kiln(&[
        "eval",
        "logps",
        "--model",
        &model(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    let got = json_lines(&out);
    assert_eq!(got.len(), rows.len());
    for (g, want) in got.iter().zip(&rows) {
        for key in ["chosen_logps", "rejected_logps"] {
            let (a, b) = (g[key].as_f64().unwrap(), want[key].as_f64().unwrap());
            assert!((a - b).abs() <= 1e-4 * b.abs(), "{key}: {a} vs {b}");
        }
    }
}

#[test]
fn dpo_trains_an_adapter_eval_logps_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = fixture_pairs(dir.path());
    let out_dir = dir.path().join("dpo");
    let config = dir.path().join("dpo.yaml");
    std::fs::write(
        &config,
        format!(
            "model_id: {}\ndataset_path: {}\npeft_config:\n  r: 4\n  lora_alpha: 8\n\
             training_args:\n  output_dir: {}\n  per_device_train_batch_size: 3\n  max_steps: 6\n  \
             learning_rate: 0.01\n  logging_steps: 2\n",
            model(),
            data.display(),
            out_dir.display()
        ),
    )
    .unwrap();
    let out = kiln(&["dpo", "--config", config.to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["method"], "lora");
    assert_eq!(summary["reference_weight_copies"], 0);
    assert!(
        summary["train_metrics"]["rewards/margins"]
            .as_f64()
            .unwrap()
            > 0.0
    );

    // The trained adapter prefers the chosen completions more than the base model does.
    let base = json_lines(&kiln(&[
        "eval",
        "logps",
        "--model",
        &model(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]));
    let tuned = json_lines(&kiln(&[
        "eval",
        "logps",
        "--model",
        &model(),
        "--adapter",
        out_dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]));
    let margin =
        |v: &Value| v["chosen_logps"].as_f64().unwrap() - v["rejected_logps"].as_f64().unwrap();
    let gain: f64 = tuned
        .iter()
        .zip(&base)
        .map(|(t, b)| margin(t) - margin(b))
        .sum();
    assert!(gain > 0.0, "margin gain {gain}");
}

#[test]
fn bad_preference_rows_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"Hi\", \"chosen\": \" a\", \"rejected\": \" b\"}\n{\"prompt\": \"Hi\", \"chosen\": \" same\", \"rejected\": \" same\"}\n",
    )
    .unwrap();
    let out = kiln(&[
        "eval",
        "logps",
        "--model",
        &model(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.jsonl:2") && err.contains("identical"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
