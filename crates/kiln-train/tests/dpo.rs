//! `kiln dpo`: log-probs equal TRL's on the reference fixture, each loss type equals its
//! formula, the loss starts at ln 2 with policy = reference, training raises the held-out
//! preference accuracy, a LoRA run's reference shares the base weights, reference log-probs are
//! cached and reused, and invalid pairs are counted and skipped or refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use kiln_core::Tokenizer;
use kiln_model::{LoadOptions, LoadedModel};
use kiln_train::dpo::{
    DpoArgs, DpoConfig, LossInputs, LossType, Truncation, dpo, dpo_loss, pair_logps, per_pair_loss,
};
use kiln_train::finetune::Args;
use kiln_train::metrics::read_metrics;
use kiln_train::pref_data::{InvalidPairs, PairRecipe, PrefDataOptions, load_preference_dataset};
use serde_json::{Value, json};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/hf")
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: Vec<String> = rows.iter().map(Value::to_string).collect();
    std::fs::write(path, text.join("\n")).unwrap();
}

fn fixture_rows() -> Vec<Value> {
    let text = std::fs::read_to_string(testdata().join("llama/expected.json")).unwrap();
    let expected: Value = serde_json::from_str(&text).unwrap();
    expected["completion_logps"].as_array().unwrap().clone()
}

fn options(max_length: usize, on_invalid: InvalidPairs) -> PrefDataOptions {
    PrefDataOptions {
        max_length,
        recipe: PairRecipe::Dpo,
        on_invalid,
    }
}

#[test]
fn log_probs_equal_trl_on_the_reference_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let rows = fixture_rows();
    let data: Vec<Value> = rows
        .iter()
        .map(|r| json!({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}))
        .collect();
    let path = dir.path().join("prefs.jsonl");
    write_jsonl(&path, &data);
    let model = LoadedModel::load(
        testdata().join("llama").to_str().unwrap(),
        &LoadOptions::default(),
    )
    .unwrap();
    let prefs =
        load_preference_dataset(&path, &model.tokenizer, &options(512, InvalidPairs::Error))
            .unwrap();
    assert_eq!(prefs.pairs.len(), rows.len());
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for (pair, row) in prefs.pairs.iter().zip(&rows) {
        assert_eq!(
            pair.chosen_sequence(),
            ids(&row["chosen_ids"]),
            "{}",
            pair.row
        );
        assert_eq!(
            pair.rejected_sequence(),
            ids(&row["rejected_ids"]),
            "{}",
            pair.row
        );
    }
    // Batched (with padding) and one by one give the same sums.
    for batch in [1, 3] {
        let logps = pair_logps(
            &model.model,
            &prefs.pairs,
            batch,
            (512, Truncation::KeepStart, 4),
            |_| {},
        )
        .unwrap();
        for ((chosen, rejected), row) in logps.iter().zip(&rows) {
            for (got, key) in [(chosen, "chosen_logps"), (rejected, "rejected_logps")] {
                let want = row[key].as_f64().unwrap();
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs(),
                    "{key}: kiln {got} vs TRL {want} (batch {batch})"
                );
            }
        }
    }
}

fn args(loss: LossType, beta: f64, label_smoothing: f64) -> DpoArgs {
    let mut args: Args<DpoArgs> = serde_json::from_value(json!({})).unwrap();
    args.method.loss_type.0 = vec![loss];
    args.method.beta = beta;
    args.method.label_smoothing = label_smoothing;
    args.method
}

fn t(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

/// Per-pair losses of one pair with policy (c, r), reference (rc, rr) and lengths (lc, lr).
fn one_pair(loss: LossType, beta: f64, eps: f64, x: [f32; 6]) -> f64 {
    let [c, r, rc, rr, lc, lr] = x.map(|v| t(&[v]));
    let inputs = LossInputs {
        chosen: &c,
        rejected: &r,
        ref_chosen: &rc,
        ref_rejected: &rr,
        chosen_len: &lc,
        rejected_len: &lr,
    };
    let out = per_pair_loss(loss, &args(loss, beta, eps), &inputs).unwrap();
    f64::from(out.to_vec1::<f32>().unwrap()[0])
}

fn log_sigmoid(x: f64) -> f64 {
    -(1.0 + (-x).exp()).ln()
}

#[test]
fn each_loss_type_equals_its_formula_on_hand_numbers() {
    // Policy log-probs −10 (chosen, 4 tokens) and −14 (rejected, 7 tokens); reference −11, −12.
    let x = [-10.0, -14.0, -11.0, -12.0, 4.0, 7.0];
    // Δ = (−10 − −11) − (−14 − −12) = 1 + 2 = 3.
    let delta = 3.0;
    let close = |got: f64, want: f64, what: &str| {
        assert!((got - want).abs() < 1e-5, "{what}: {got} vs {want}");
    };
    close(
        one_pair(LossType::Sigmoid, 0.1, 0.0, x),
        -log_sigmoid(0.1 * delta),
        "sigmoid",
    );
    close(
        one_pair(LossType::Hinge, 0.1, 0.0, x),
        1.0 - 0.1 * delta,
        "hinge",
    );
    close(
        one_pair(LossType::Hinge, 0.5, 0.0, x),
        0.0,
        "hinge (clipped)",
    );
    // IPO: ((1/4 − (−2)/7) − 1/(2·0.1))² = (0.25 + 0.2857142857 − 5)².
    close(
        one_pair(LossType::Ipo, 0.1, 0.0, x),
        (0.25 + 2.0 / 7.0 - 5.0f64).powi(2),
        "ipo",
    );
    let eps = 0.2;
    close(
        one_pair(LossType::Robust, 0.1, eps, x),
        (-(1.0 - eps) * log_sigmoid(0.3) + eps * log_sigmoid(-0.3)) / (1.0 - 2.0 * eps),
        "robust",
    );
    // SimPO: −logσ(β(−10/4 − −14/7) − γ) = −logσ(2·(−0.5) − 0.5), reference ignored.
    close(
        one_pair(LossType::Simpo, 2.0, 0.0, x),
        -log_sigmoid(2.0 * (-2.5 + 2.0) - 0.5),
        "simpo",
    );
}

#[test]
fn the_loss_is_ln_2_when_the_policy_is_the_reference() {
    let args = args(LossType::Sigmoid, 0.1, 0.0);
    let logps = t(&[-12.0, -30.5, -8.0, -20.0]);
    let (sum, metrics) = dpo_loss(&args, &logps, Some(&logps), &[3, 9, 2, 6]).unwrap();
    let mean = f64::from(sum.to_scalar::<f32>().unwrap()) / 2.0;
    assert!((mean - std::f64::consts::LN_2).abs() < 1e-6, "{mean}");
    assert_eq!(metrics.mean("rewards/accuracies"), Some(0.0));
    assert_eq!(metrics.mean("rewards/margins"), Some(0.0));
    assert_eq!(metrics.mean("logps/chosen"), Some(-21.25));
}

/// Preference pairs the fixture tokenizer handles: a polite, formatted answer against a rude or
/// unformatted one, over many prompts.
fn preference_data(dir: &Path) -> PathBuf {
    let names = ["Ada", "Bo", "Cy", "Dee", "Eve", "Flo", "Gus", "Hal"];
    let towns = ["Oakford", "Riverton", "Lakeside", "Millbrook"];
    let rows: Vec<Value> = (0..64)
        .map(|i| {
            let name = names[i % names.len()];
            let town = towns[(i / names.len()) % towns.len()];
            let prompt = format!("Where does {name} live?");
            if i % 2 == 0 {
                json!({"prompt": prompt, "chosen": format!(" Answer: {town}."), "rejected": format!(" ugh, {town} whatever")})
            } else {
                json!({"prompt": prompt, "chosen": format!(" Of course! Answer: {town}."), "rejected": format!(" no idea, go away")})
            }
        })
        .collect();
    let path = dir.join("prefs.jsonl");
    write_jsonl(&path, &rows);
    path
}

fn config(dir: &Path, peft: &str, args: &[&str]) -> DpoConfig {
    let yaml = format!(
        "model_id: {}\ndataset_path: {}\neval_split: 0.25\n{peft}training_args:\n  output_dir: {}\n  \
         per_device_train_batch_size: 8\n  max_steps: 16\n  learning_rate: 0.005\n  \
         logging_steps: 1\n  eval_steps: 8\n  save_steps: 8\n  seed: 3\n",
        testdata().join("llama").display(),
        preference_data(dir).display(),
        dir.join("out").display()
    );
    let file = dir.join("dpo.yaml");
    std::fs::write(&file, yaml).unwrap();
    let overrides: Vec<String> = args.iter().map(|a| format!("training_args.{a}")).collect();
    DpoConfig::load(&file, &overrides).unwrap()
}

const LORA: &str = "peft_config:\n  r: 8\n  lora_alpha: 16\n  target_modules: all-linear\n";

#[test]
fn lora_dpo_starts_at_ln_2_and_raises_held_out_accuracy_with_a_shared_reference() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), LORA, &[]);
    let summary = dpo(&cfg, false).unwrap();
    // A fresh adapter (B = 0) is the reference: the first step's loss is ln 2.
    let records = read_metrics(&dir.path().join("out/metrics.jsonl")).unwrap();
    let first = records[0].loss.unwrap();
    assert!((first - std::f64::consts::LN_2).abs() < 1e-5, "{first}");
    assert_eq!(summary.reference_weight_copies, 0, "{}", summary.reference);
    assert!(summary.reference.contains("shared"));
    let before = summary.eval_metrics_before["rewards/accuracies"];
    let after = summary.eval_metrics["rewards/accuracies"];
    assert_eq!(before, 0.0, "nothing is preferred before training");
    assert!(after >= 0.8, "held-out rewards/accuracies {after}");
    assert!(summary.eval_metrics["rewards/margins"] > 0.0);
    for key in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ] {
        assert!(
            records[0].extra.contains_key(key),
            "metrics.jsonl lacks {key}"
        );
    }
    assert!(
        records
            .iter()
            .any(|r| r.extra.contains_key("eval_rewards/accuracies"))
    );
    assert!(dir.path().join("out/adapter_model.safetensors").exists());
}

#[test]
fn precomputed_reference_log_probs_are_cached_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cache_dir = format!("ref_logps_cache_dir={}", cache.display());
    let args = ["precompute_ref_log_probs=true", &cache_dir, "max_steps=4"];
    // Full fine-tuning: with precomputed log-probs no reference model is held at all.
    let cfg = config(dir.path(), "", &args);
    let first = dpo(&cfg, false).unwrap();
    assert!(!first.ref_logps_cache_hit);
    assert_eq!(first.reference_weight_copies, 0);
    let cached = first.ref_logps_cache.clone().unwrap();
    assert!(cached.starts_with(&cache));

    let dir2 = tempfile::tempdir().unwrap();
    let cfg2 = config(dir2.path(), "", &args);
    let second = dpo(&cfg2, false).unwrap();
    assert!(
        second.ref_logps_cache_hit,
        "the second run reuses the cache"
    );
    assert_eq!(second.ref_logps_cache, Some(cached));
    assert_eq!(first.final_loss, second.final_loss);
    assert_eq!(first.eval_metrics, second.eval_metrics);
}

#[test]
fn full_dpo_holds_a_frozen_copy_and_simpo_holds_none() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "", &["max_steps=2"]);
    let summary = dpo(&cfg, false).unwrap();
    assert_eq!(summary.reference_weight_copies, 1);
    assert!(dir.path().join("out/model.safetensors").exists());

    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        LORA,
        &["max_steps=2", "loss_type=simpo", "beta=2.0"],
    );
    let summary = dpo(&cfg, false).unwrap();
    assert_eq!(summary.reference_weight_copies, 0);
    assert!(summary.reference.starts_with("none"));
}

#[test]
fn invalid_pairs_are_counted_and_skipped_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = Tokenizer::from_dir(&testdata().join("llama")).unwrap();
    let long_prompt = "word ".repeat(200);
    let rows = vec![
        json!({"prompt": "Hi?", "chosen": " Hello.", "rejected": " Go away."}),
        json!({"prompt": "Hi?", "chosen": "", "rejected": " Go away."}),
        json!({"prompt": "Hi?", "chosen": " Same.", "rejected": " Same."}),
        json!({"prompt": long_prompt, "chosen": " Hello.", "rejected": " Go away."}),
    ];
    let path = dir.path().join("bad.jsonl");
    write_jsonl(&path, &rows);
    let data =
        load_preference_dataset(&path, &tokenizer, &options(64, InvalidPairs::Skip)).unwrap();
    assert_eq!(data.pairs.len(), 1);
    assert_eq!(data.rows, 4);
    let reasons: Vec<&str> = data.skipped.iter().map(|s| s.reason.as_str()).collect();
    assert!(reasons[0].starts_with("empty completion"), "{reasons:?}");
    assert!(
        reasons[1].starts_with("identical completions"),
        "{reasons:?}"
    );
    assert!(reasons[2].starts_with("too long"), "{reasons:?}");
    assert!(
        data.skipped[0].row.ends_with("bad.jsonl:2"),
        "{}",
        data.skipped[0].row
    );
    let summary = data.skipped_summary().unwrap();
    assert!(summary.contains("skipped 3 of 4"), "{summary}");

    let err = load_preference_dataset(&path, &tokenizer, &options(64, InvalidPairs::Error))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.jsonl:2") && err.contains("empty completion"),
        "{err}"
    );

    // A malformed row is always an error naming its line.
    write_jsonl(&path, &[json!({"prompt": "Hi?", "chosen": " Hello."})]);
    let err = load_preference_dataset(&path, &tokenizer, &options(64, InvalidPairs::Skip))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.jsonl:1") && err.contains("missing `rejected`"),
        "{err}"
    );
}

#[test]
fn implicit_prompts_are_extracted_as_trl_does() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = Tokenizer::from_dir(&testdata().join("llama")).unwrap();
    let path = dir.path().join("implicit.jsonl");
    write_jsonl(
        &path,
        &[json!({"chosen": "Where is it? It is here.", "rejected": "Where is it? Not sure."})],
    );
    let data =
        load_preference_dataset(&path, &tokenizer, &options(64, InvalidPairs::Error)).unwrap();
    let pair = &data.pairs[0];
    // TRL's extract_prompt leaves the space before the split with the completions.
    assert_eq!(
        tokenizer.decode(&pair.prompt_ids, false).unwrap(),
        "Where is it?"
    );
    let chosen = tokenizer.decode(&pair.chosen_ids, false).unwrap();
    assert_eq!(chosen, " It is here.<|im_end|>");
}

#[test]
fn config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dpo.yaml");
    for (args, needle) in [
        ("  beta: 0\n", "training_args.beta"),
        ("  loss_type: kto\n", "loss_type `kto` is not supported"),
        ("  label_smoothing: 0.7\n", "training_args.label_smoothing"),
        ("  packing: true\n", "packing"),
    ] {
        std::fs::write(
            &file,
            format!("model_id: m\ndataset_path: d.jsonl\ntraining_args:\n{args}"),
        )
        .unwrap();
        let err = match DpoConfig::load(&file, &[]) {
            Ok(cfg) => cfg.validate().unwrap_err().to_string(),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(needle), "{args}: {err}");
    }
    // TRL's DPOConfig defaults.
    std::fs::write(&file, "model_id: m\ndataset_path: d.jsonl\n").unwrap();
    let cfg = DpoConfig::load(&file, &[]).unwrap();
    let t = &cfg.training_args;
    assert_eq!(t.learning_rate, 1e-6);
    assert_eq!(t.method.beta, 0.1);
    assert_eq!(t.method.loss_type.0, vec![LossType::Sigmoid]);
    assert_eq!(t.max_length, 1024);
}

/// Gradient accumulation is a larger batch: k micro-batches of b pairs take the same step as
/// one batch of k·b (the loss is the mean over the window's pairs). With SGD the update is the
/// gradient itself, so a wrong normalisation would show.
#[test]
fn accumulated_micro_batches_equal_one_large_batch() {
    let adapter_after = |batch: &str, accumulation: &str| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            LORA,
            &[
                "max_steps=1",
                "optim=sgd",
                "learning_rate=0.5",
                "weight_decay=0.0",
                "max_grad_norm=0",
                &format!("per_device_train_batch_size={batch}"),
                &format!("gradient_accumulation_steps={accumulation}"),
            ],
        );
        dpo(&cfg, false).unwrap();
        let path = dir.path().join("out/adapter_model.safetensors");
        let mut tensors: Vec<(String, Tensor)> =
            candle_core::safetensors::load(&path, &Device::Cpu)
                .unwrap()
                .into_iter()
                .collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        tensors
    };
    let one = adapter_after("8", "1");
    let four = adapter_after("2", "4");
    let mut moved = 0.0f32;
    for ((name, a), (_, b)) in one.iter().zip(&four) {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let scale = a.abs().unwrap().max_all().unwrap();
        let (diff, scale) = (
            diff.to_scalar::<f32>().unwrap(),
            scale.to_scalar::<f32>().unwrap(),
        );
        assert!(
            diff <= 1e-5 * scale.max(1e-3),
            "{name}: {diff} (scale {scale})"
        );
        if name.contains("lora_B") {
            moved = moved.max(scale);
        }
    }
    assert!(moved > 0.0, "the step moved lora_B");
}

/// Training an existing adapter further: the reference is the base with the *initial* adapter
/// (as TRL loads a copy of it as the "ref" adapter), so the first loss is again ln 2.
#[test]
fn continuing_an_adapter_references_the_initial_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = format!(
        "adapter_path: {}\n",
        testdata().join("llama-lora").display()
    );
    let cfg = config(dir.path(), &adapter, &["max_steps=3"]);
    let summary = dpo(&cfg, false).unwrap();
    assert_eq!(summary.reference_weight_copies, 0, "{}", summary.reference);
    let records = read_metrics(&dir.path().join("out/metrics.jsonl")).unwrap();
    let first = records[0].loss.unwrap();
    assert!((first - std::f64::consts::LN_2).abs() < 1e-5, "{first}");
    assert!(records[0].extra["logps/chosen"] != 0.0);
}
