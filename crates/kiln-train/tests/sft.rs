//! `kiln sft` end to end on the fixture model: LoRA and full fine-tuning learn, the adapter
//! reloads with identical outputs, a PEFT adapter continues training, and bad configs and data
//! are refused before any work.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use kiln_model::{LoadOptions, LoadedModel, LoraAdapter};
use kiln_train::metrics::read_metrics;
use kiln_train::sft::{SftConfig, sft};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/hf")
}

/// Prompt-completion rows the fixture's tokenizer handles: a fact per name, learnable.
fn dataset(dir: &Path) -> PathBuf {
    let path = dir.join("train.jsonl");
    let names = ["Ada", "Bo", "Cy", "Dee", "Eve", "Flo"];
    let towns = ["Oakford", "Riverton", "Lakeside"];
    let rows: Vec<String> = (0..48)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("Where does {} live?", names[i % 6]),
                "completion": format!(" {} lives in {}.", names[i % 6], towns[i % 6 % 3]),
            })
            .to_string()
        })
        .collect();
    std::fs::write(&path, rows.join("\n")).unwrap();
    path
}

fn config(dir: &Path, peft: &str, args: &str) -> SftConfig {
    config_with(dir, peft, args, &[])
}

fn config_with(dir: &Path, peft: &str, args: &str, overrides: &[&str]) -> SftConfig {
    let yaml = format!(
        "model_id: {}\ndataset_path: {}\neval_split: 0.25\n{peft}training_args:\n  output_dir: {}\n  \
         per_device_train_batch_size: 4\n  gradient_accumulation_steps: 2\n  max_steps: 12\n  \
         learning_rate: 0.01\n  logging_steps: 2\n  eval_steps: 6\n  save_steps: 6\n  seed: 5\n{args}",
        testdata().join("llama").display(),
        dataset(dir).display(),
        dir.join("out").display()
    );
    let file = dir.join("sft.yaml");
    std::fs::write(&file, yaml).unwrap();
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    SftConfig::load(&file, &overrides).unwrap()
}

const LORA: &str =
    "peft_config:\n  r: 8\n  lora_alpha: 16\n  lora_dropout: 0.05\n  target_modules: all-linear\n";

fn last_logits(m: &LoadedModel) -> Tensor {
    let ids = m.tokenizer.encode("Where does Cy live?", true).unwrap();
    let ids = Tensor::new(ids.as_slice(), &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.model.forward_last(&ids, None).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn lora_learns_and_the_adapter_reloads_with_the_same_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), LORA, "  optim: paged_adamw_8bit\n");
    let summary = sft(&cfg, false).unwrap();
    assert_eq!(summary.method, "lora");
    assert_eq!(summary.steps, 12);
    assert!(summary.trainable_parameters < summary.total_parameters / 4);
    assert!(summary.optimizer_state_bytes > 0);
    let records = read_metrics(&cfg.training_args.output_dir.join("metrics.jsonl")).unwrap();
    let evals: Vec<f64> = records.iter().filter_map(|r| r.eval_loss).collect();
    assert_eq!(evals.len(), 2, "eval at steps 6 and 12");
    let first = records.iter().find_map(|r| r.loss).unwrap();
    let last = summary.final_loss.unwrap();
    assert!(last < 0.7 * first, "train loss {first} -> {last}");

    let out = &cfg.training_args.output_dir;
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "train_results.json",
        "loss_curve.png",
        "checkpoint-6/trainer_state.json",
    ] {
        assert!(out.join(f).is_file(), "{f} written");
    }
    let adapter =
        LoraAdapter::load(out, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    assert_eq!(
        adapter.modules.len(),
        2 * 7,
        "all-linear: 7 linears × 2 layers"
    );

    // Unmerged and merged reloads agree with each other and differ from the base model.
    let load = |adapter: Option<&Path>, merge: bool| {
        LoadedModel::load(
            testdata().join("llama").to_str().unwrap(),
            &LoadOptions {
                adapter: adapter.map(Path::to_path_buf),
                merge_adapter: merge,
                ..LoadOptions::default()
            },
        )
        .unwrap()
    };
    let unmerged = last_logits(&load(Some(out), false));
    let merged = last_logits(&load(Some(out), true));
    let base = last_logits(&load(None, false));
    assert!(max_diff(&unmerged, &merged) < 1e-5);
    assert!(
        max_diff(&unmerged, &base) > 1e-2,
        "the adapter changed the model"
    );
}

#[test]
fn full_fine_tuning_saves_a_model_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with(
        dir.path(),
        "",
        "  optim: adamw_torch\n",
        &["training_args.max_steps=6"],
    );
    let summary = sft(&cfg, false).unwrap();
    assert_eq!(summary.method, "full");
    assert_eq!(summary.trainable_parameters, summary.total_parameters);
    let out = &cfg.training_args.output_dir;
    let tuned = LoadedModel::load(out.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let base = LoadedModel::load(
        testdata().join("llama").to_str().unwrap(),
        &LoadOptions::default(),
    )
    .unwrap();
    assert!(max_diff(&last_logits(&tuned), &last_logits(&base)) > 1e-2);

    // The model is written into output_dir: a second run there stops before training.
    let started = std::time::Instant::now();
    let err = sft(&cfg, false).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(started.elapsed().as_secs_f64() < 5.0);
}

/// A run resumed from its step-6 checkpoint continues to step 12 and logs each step once.
#[test]
fn a_resumed_run_logs_each_step_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), LORA, "");
    sft(&cfg, false).unwrap();
    let resumed = config_with(
        dir.path(),
        LORA,
        "",
        &["training_args.resume_from_checkpoint=true"],
    );
    std::fs::remove_dir_all(resumed.training_args.output_dir.join("checkpoint-12")).ok();
    let summary = sft(&resumed, false).unwrap();
    assert_eq!(summary.steps, 12);
    let text =
        std::fs::read_to_string(resumed.training_args.output_dir.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    assert_eq!(steps.last(), Some(&12));
}

/// The PEFT-written fixture adapter loads, trains further, and is saved under the same keys.
#[test]
fn a_peft_adapter_continues_training() {
    let dir = tempfile::tempdir().unwrap();
    let adapter_dir = testdata().join("llama-lora");
    let cfg = config_with(
        dir.path(),
        &format!("adapter_path: {}\n", adapter_dir.display()),
        "  optim: sgd\n",
        &["training_args.max_steps=6"],
    );
    let summary = sft(&cfg, false).unwrap();
    assert_eq!(summary.method, "lora");
    let dev = candle_core::Device::Cpu;
    let before = LoraAdapter::load(&adapter_dir, candle_core::DType::F32, &dev).unwrap();
    let after =
        LoraAdapter::load(&cfg.training_args.output_dir, candle_core::DType::F32, &dev).unwrap();
    assert_eq!(
        before.modules.keys().collect::<Vec<_>>(),
        after.modules.keys().collect::<Vec<_>>()
    );
    let moved = before
        .modules
        .values()
        .zip(after.modules.values())
        .map(|((a0, b0), (a1, b1))| max_diff(a0, a1).max(max_diff(b0, b1)))
        .fold(0f32, f32::max);
    assert!(moved > 1e-4, "training moved the adapter ({moved})");
    assert_eq!(after.config.r, 4);
    assert_eq!(after.config.lora_alpha, 8.0);
}

#[test]
fn unknown_keys_and_bad_rows_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sft.yaml");
    std::fs::write(
        &file,
        "model_id: x\ndataset_path: y\ntraining_args:\n  learning_rte: 0.1\n",
    )
    .unwrap();
    let err = SftConfig::load(&file, &[]).unwrap_err().to_string();
    assert!(err.contains("learning_rte"), "{err}");
    std::fs::write(
        &file,
        "model_id: x\ndataset_path: y\npeft_config:\n  rank: 4\n",
    )
    .unwrap();
    let err = SftConfig::load(&file, &[]).unwrap_err().to_string();
    assert!(err.contains("rank"), "{err}");

    let cfg = config(dir.path(), LORA, "  optim: adamw_9bit\n");
    let err = sft(&cfg, false).unwrap_err().to_string();
    assert!(
        err.contains("adamw_9bit") && err.contains("paged_adamw_8bit"),
        "{err}"
    );

    let cfg = config(dir.path(), LORA, "");
    let data = std::fs::read_to_string(&cfg.dataset_path).unwrap();
    let mut lines: Vec<&str> = data.lines().collect();
    lines[4] = r#"{"prompt": "Where?", "completion": 7}"#;
    std::fs::write(&cfg.dataset_path, lines.join("\n")).unwrap();
    let err = sft(&cfg, false).unwrap_err().to_string();
    assert!(err.contains("train.jsonl:5"), "{err}");
    assert!(
        !cfg.training_args.output_dir.join("metrics.jsonl").exists(),
        "no training started"
    );
}
