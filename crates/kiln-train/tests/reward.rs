//! `kiln reward`: the Bradley–Terry loss on hand-computed numbers, a short run on the quick
//! synthetic world that must learn held-out preferences, LoRA runs saved merged, and the
//! handling of invalid pairs and bad configs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use kiln_core::Tokenizer;
use kiln_model::reward::{RewardModel, SCORE_WEIGHT};
use kiln_train::pref_data::{InvalidPairs, PairRecipe, PrefDataOptions, load_preference_dataset};
use kiln_train::reward::{RewardConfig, bradley_terry_loss, evaluate, preference_accuracy, reward};
use serde_json::Value;

fn llama_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/hf/llama")
}

fn t(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

fn scalar(x: &Tensor) -> f64 {
    f64::from(x.to_scalar::<f32>().unwrap())
}

/// -logσ(x) = log(1 + e^{-x}), in f64.
fn nls(x: f64) -> f64 {
    (1.0 + (-x).exp()).ln()
}

#[test]
fn bradley_terry_loss_matches_hand_computed_values() {
    let (c, r) = (t(&[2.0, 0.5]), t(&[1.0, 1.5]));
    // Differences 1 and -1: (log(1 + e^-1) + log(1 + e)) / 2 = 0.813262 (and nls(1) = 0.313262).
    let plain = scalar(&bradley_terry_loss(&c, &r, None, None).unwrap());
    assert!((plain - 0.813_261_7).abs() < 1e-6, "{plain}");
    assert!((nls(1.0) - 0.313_261_7).abs() < 1e-6);

    // Margins 0.5 and -1 leave differences 0.5 and 0: (log(1 + e^-0.5) + log 2) / 2.
    let m = t(&[0.5, -1.0]);
    let with_margin = scalar(&bradley_terry_loss(&c, &r, Some(&m), None).unwrap());
    assert!(
        (with_margin - (0.474_076_98 + std::f64::consts::LN_2) / 2.0).abs() < 1e-6,
        "{with_margin}"
    );

    // center_rewards_coefficient 0.01: + 0.01 · mean((3)², (2)²) = + 0.065.
    let centred = scalar(&bradley_terry_loss(&c, &r, Some(&m), Some(0.01)).unwrap());
    assert!((centred - (with_margin + 0.065)).abs() < 1e-6, "{centred}");

    // Stable far from zero: no overflow to inf, no underflow to a wrong constant.
    let far =
        scalar(&bradley_terry_loss(&t(&[100.0, -100.0]), &t(&[0.0, 0.0]), None, None).unwrap());
    assert!((far - 50.0).abs() < 1e-4, "{far}");
}

/// d/dr⁺ of mean(-logσ(r⁺ − r⁻)) is −σ(−(r⁺ − r⁻)) / B; d/dr⁻ its negative; the centring term
/// adds 2·coef·(r⁺ + r⁻) / B to both.
#[test]
fn bradley_terry_gradients_are_the_analytic_ones() {
    let chosen = Var::new(&[2.0f32, 0.5], &Device::Cpu).unwrap();
    let rejected = Var::new(&[1.0f32, 1.5], &Device::Cpu).unwrap();
    let loss =
        bradley_terry_loss(chosen.as_tensor(), rejected.as_tensor(), None, Some(0.1)).unwrap();
    let grads = loss.backward().unwrap();
    let gc: Vec<f32> = grads.get(&chosen).unwrap().to_vec1().unwrap();
    let gr: Vec<f32> = grads.get(&rejected).unwrap().to_vec1().unwrap();
    let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
    for (i, (c, r)) in [(2.0f64, 1.0f64), (0.5, 1.5)].into_iter().enumerate() {
        let bt = -sigmoid(-(c - r)) / 2.0;
        let centre = 2.0 * 0.1 * (c + r) / 2.0;
        assert!(
            (f64::from(gc[i]) - (bt + centre)).abs() < 1e-6,
            "chosen {i}"
        );
        assert!(
            (f64::from(gr[i]) - (-bt + centre)).abs() < 1e-6,
            "rejected {i}"
        );
    }
}

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("reward.yaml");
    std::fs::write(&path, body).unwrap();
    path
}

fn world(dir: &Path) -> PathBuf {
    let world = dir.join("world");
    // The quick world, with 100 held-out pairs rather than 20 so that accuracy is measured
    // in steps of 1%.
    let opts = kiln_data::SynthOptions {
        eval_examples: 100,
        ..kiln_data::SynthOptions::sized(true, 0)
    };
    kiln_data::write_world(&world, &opts).unwrap();
    world
}

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The outcome that matters: after a short full fine-tuning run on the quick world, the reward
/// model prefers the held-out chosen replies (polite, formatted, refusing to leak, correct) well
/// above chance, and the saved directory scores them the same way.
#[test]
fn a_short_run_learns_held_out_preferences() {
    let tmp = tempfile::tempdir().unwrap();
    let world = world(tmp.path());
    let out = tmp.path().join("rm");
    let yaml = format!(
        "model_id: {}\ndataset_path: {}\neval_dataset_path: {}\ntraining_args:\n  \
         output_dir: {}\n  max_steps: 100\n  per_device_train_batch_size: 8\n  \
         learning_rate: 1.0e-3\n  lr_scheduler_type: constant\n  logging_steps: 25\n  \
         save_steps: 1000\n  seed: 1\n",
        llama_dir().display(),
        world.join("preference/train.jsonl").display(),
        world.join("preference/test.jsonl").display(),
        out.display()
    );
    let cfg = RewardConfig::load(&write_config(tmp.path(), &yaml), &[]).unwrap();
    let summary = reward(&cfg, false).unwrap();
    assert_eq!(summary.method, "full");
    assert!(summary.head_initialized);
    assert_eq!((summary.train_pairs, summary.eval_pairs), (200, 100));
    assert_eq!(summary.skipped_pairs, 0);
    assert_eq!(summary.steps, 100);
    let eval_accuracy = summary.eval_accuracy.unwrap();
    assert!(
        eval_accuracy > 0.6,
        "held-out accuracy {eval_accuracy} (before training {:?})",
        summary.eval_accuracy_before
    );
    assert!(summary.accuracy.unwrap() > 0.6, "{summary:?}");

    // Every TRL metric is logged, training and evaluation.
    let log = metrics(&out);
    let last = log.last().unwrap();
    for key in [
        "loss",
        "accuracy",
        "margin",
        "min_reward",
        "mean_reward",
        "max_reward",
        "eval_loss",
        "eval_accuracy",
        "eval_margin",
    ] {
        assert!(last.get(key).is_some(), "{key} missing from {last}");
    }
    assert!(out.join("train_results.json").is_file());

    // The saved reward model scores the held-out pairs as the run's last evaluation did.
    let saved = RewardModel::load(&out, DType::F32, &Device::Cpu).unwrap();
    let tokenizer = Tokenizer::from_dir(&out).unwrap();
    let opts = PrefDataOptions {
        max_length: 1024,
        recipe: PairRecipe::Reward,
        on_invalid: InvalidPairs::Error,
    };
    let test =
        load_preference_dataset(&world.join("preference/test.jsonl"), &tokenizer, &opts).unwrap();
    assert_eq!(
        preference_accuracy(&saved, &test.pairs, 7).unwrap(),
        eval_accuracy
    );
    let e = evaluate(&saved, &test.pairs, 20, None).unwrap().unwrap();
    assert!((e.metrics.margin - summary.eval_margin.unwrap()).abs() < 1e-4);
}

/// With `peft_config`, adapters train on the decoder and the head in full, and the result is a
/// merged reward model: no adapter keys, the head moved, the scores those of the trained model.
#[test]
fn a_lora_run_saves_a_merged_reward_model() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("pairs.jsonl");
    let rows: Vec<String> = (0..12)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("Question {i}: be nice?"),
                "chosen": "Of course, happy to help!",
                "rejected": "Go away.",
                "margin": 0.5,
            })
            .to_string()
        })
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let out = tmp.path().join("rm-lora");
    let yaml = format!(
        "model_id: {}\ndataset_path: {}\neval_split: 0.25\npeft_config:\n  r: 4\n  lora_alpha: 8\n  \
         target_modules: all-linear\n  task_type: SEQ_CLS\ntraining_args:\n  output_dir: {}\n  \
         max_steps: 4\n  per_device_train_batch_size: 3\n  logging_steps: 2\n  \
         center_rewards_coefficient: 0.01\n",
        llama_dir().display(),
        data.display(),
        out.display()
    );
    let cfg = RewardConfig::load(&write_config(tmp.path(), &yaml), &[]).unwrap();
    let summary = reward(&cfg, false).unwrap();
    assert_eq!(summary.method, "lora");
    assert_eq!((summary.train_pairs, summary.eval_pairs), (9, 3));
    let tensors =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(tensors.contains_key(SCORE_WEIGHT));
    assert!(
        !tensors
            .keys()
            .any(|k| k.contains("lora_") || k == "lm_head.weight")
    );
    assert!(!out.join("adapter_config.json").exists());
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(config["pad_token_id"], 4);

    // The merged decoder changed (adapters were folded in) and the head trained.
    let base = candle_core::safetensors::load(llama_dir().join("model.safetensors"), &Device::Cpu)
        .unwrap();
    let q = "model.layers.0.self_attn.q_proj.weight";
    let moved = (&tensors[q] - &base[q])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(
        moved.to_scalar::<f32>().unwrap() > 0.0,
        "LoRA merged into q_proj"
    );
    let (fresh, _) = RewardModel::load_or_init(&llama_dir(), DType::F32, &Device::Cpu, 42).unwrap();
    let head_moved = (&tensors[SCORE_WEIGHT] - fresh.score_weight())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(
        head_moved.to_scalar::<f32>().unwrap() > 1e-6,
        "the head trained"
    );

    // Reloaded, it gives the margin the run measured on its held-out pairs (before merging).
    let saved = RewardModel::load(&out, DType::F32, &Device::Cpu).unwrap();
    let tokenizer = Tokenizer::from_dir(&out).unwrap();
    let opts = PrefDataOptions {
        max_length: 1024,
        recipe: PairRecipe::Reward,
        on_invalid: InvalidPairs::Error,
    };
    let all = load_preference_dataset(&data, &tokenizer, &opts).unwrap();
    let (_, held_out) = all.split(0.25, 42);
    let e = evaluate(&saved, &held_out.pairs, 8, Some(0.01))
        .unwrap()
        .unwrap();
    assert!((e.metrics.margin - summary.eval_margin.unwrap()).abs() < 1e-4);
    assert!((e.loss - summary.eval_loss.unwrap()).abs() < 1e-4);
}

fn bad_rows(path: &Path) {
    let long = "very ".repeat(200);
    let rows = [
        r#"{"prompt": "Hi?", "chosen": "Hello, nice to meet you!", "rejected": "Go away."}"#
            .to_string(),
        r#"{"prompt": "Hi?", "chosen": "", "rejected": "Go away."}"#.to_string(),
        r#"{"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."}"#.to_string(),
        format!(r#"{{"prompt": "Hi?", "chosen": "{long}", "rejected": "No."}}"#),
        r#"{"prompt": "Thanks!", "chosen": "You are welcome!", "rejected": "Whatever."}"#
            .to_string(),
    ];
    std::fs::write(path, rows.join("\n")).unwrap();
}

#[test]
fn invalid_pairs_are_skipped_and_counted_or_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bad.jsonl");
    bad_rows(&data);
    let yaml = format!(
        "model_id: {}\ndataset_path: {}\ntraining_args:\n  output_dir: {}\n  max_steps: 1\n  \
         per_device_train_batch_size: 2\n  max_length: 128\n",
        llama_dir().display(),
        data.display(),
        tmp.path().join("out").display()
    );
    let cfg = RewardConfig::load(&write_config(tmp.path(), &yaml), &[]).unwrap();
    let summary = reward(&cfg, false).unwrap();
    assert_eq!((summary.train_pairs, summary.skipped_pairs), (2, 3));

    let cfg = RewardConfig::load(
        &write_config(tmp.path(), &yaml),
        &[
            "training_args.on_invalid_pair=error".into(),
            format!(
                "training_args.output_dir={}",
                tmp.path().join("out2").display()
            ),
        ],
    )
    .unwrap();
    let err = reward(&cfg, false).unwrap_err().to_string();
    assert!(
        err.contains("bad.jsonl:2") && err.contains("empty"),
        "{err}"
    );
    assert!(
        !tmp.path().join("out2/model.safetensors").exists(),
        "nothing trained"
    );
}

#[test]
fn config_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let base = format!(
        "model_id: {}\ndataset_path: x.jsonl\n",
        llama_dir().display()
    );
    let cases = [
        (
            "training_args:\n  center_rewards_coefficient: -1\n",
            "training_args.center_rewards_coefficient",
        ),
        (
            "training_args:\n  center_rewards_coefficient: lots\n",
            "center_rewards_coefficient",
        ),
        (
            "training_args:\n  on_invalid_pair: maybe\n",
            "on_invalid_pair",
        ),
        (
            "training_args:\n  centre_rewards_coefficient: 0.1\n",
            "centre_rewards_coefficient",
        ),
        ("adapter_path: some/adapter\n", "adapter_path"),
        (
            "peft_config:\n  task_type: CAUSAL_LM\n",
            "peft_config.task_type",
        ),
        ("training_args:\n  max_length: 0\n", "max_length"),
    ];
    for (extra, key) in cases {
        let path = write_config(tmp.path(), &format!("{base}{extra}"));
        let err = match RewardConfig::load(&path, &[]) {
            Err(e) => e.to_string(),
            Ok(cfg) => reward(&cfg, false).unwrap_err().to_string(),
        };
        assert!(err.contains(key), "{extra:?}: {err}");
    }
}
