//! `kiln ppo` through the binary: a tiny run on a synthetic world written by `kiln data synth`,
//! with the world's rule reward, and a bad config refused with the key named.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/hf/llama")
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

fn write_config(dir: &Path, world: &Path, reward: &str) -> PathBuf {
    let yaml = format!(
        "model_id: {}\ndataset_path: {}\neval_split: 0.1\n\
         peft_config:\n  r: 4\n  lora_alpha: 8\n  target_modules: all-linear\n\
         training_args:\n  output_dir: {}\n  reward: {reward}\n  per_device_train_batch_size: 4\n  \
         max_steps: 2\n  response_length: 6\n  logging_steps: 1\n",
        model().display(),
        world.join("rl/prompts.jsonl").display(),
        dir.join("out").display()
    );
    let path = dir.join("ppo.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn ppo_trains_on_a_synthetic_world_and_reports_the_reward_before_and_after() {
    let dir = tempfile::tempdir().unwrap();
    let world = dir.path().join("world");
    ok(&kiln(&[
        "data",
        "synth",
        "--out",
        world.to_str().unwrap(),
        "--quick",
    ]));
    let reward = format!(
        "{{rule: world, world_path: {}}}",
        world.join("world.json").display()
    );
    let config = write_config(dir.path(), &world, &reward);
    let config = config.to_str().unwrap();
    let out = ok(&kiln(&[
        "ppo",
        "--config",
        config,
        "--set",
        "training_args.kl_estimator=k3",
        "--json",
    ]));
    let v: Value = serde_json::from_str(&out).expect("stdout is JSON");
    assert_eq!(v["method"], "lora");
    assert_eq!(v["reward"], "rule: world");
    assert_eq!(v["steps"], 2);
    assert_eq!(
        v["optimizer_steps"], 8,
        "4 PPO epochs × 1 mini-batch × 2 steps"
    );
    assert_eq!(v["eval_held_out"], true);
    for key in ["mean_reward_before", "mean_reward_after"] {
        let r = v[key].as_f64().unwrap();
        assert!((-1.0..=1.0).contains(&r), "{key} {r}");
    }
    let out_dir = dir.path().join("out");
    for file in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "metrics.jsonl",
        "train_results.json",
    ] {
        assert!(out_dir.join(file).exists(), "{file}");
    }
    let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"objective/kl\"") && metrics.contains("\"policy/clipfrac\""));

    // The same run again prints a readable summary (into another output directory).
    let text = ok(&kiln(&[
        "ppo",
        "--config",
        config,
        "--set",
        &format!(
            "training_args.output_dir={}",
            dir.path().join("out2").display()
        ),
    ]));
    assert!(
        text.contains("mean reward (rule: world)") && text.contains("held-out"),
        "{text}"
    );
}

#[test]
fn a_bad_ppo_config_is_refused_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let world = dir.path().join("world");
    std::fs::create_dir_all(world.join("rl")).unwrap();
    std::fs::write(world.join("rl/prompts.jsonl"), "{\"prompt\": \"Hello\"}\n").unwrap();
    for (reward, needle) in [
        ("{rgex: '^a'}", "training_args.reward.rgex"),
        (
            "{regex: '^a'}\n  kl_estimator: k7",
            "training_args.kl_estimator",
        ),
    ] {
        let config = write_config(dir.path(), &world, reward);
        let out = kiln(&["ppo", "--config", config.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(needle),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!dir.path().join("out/metrics.jsonl").exists());
    }
}
