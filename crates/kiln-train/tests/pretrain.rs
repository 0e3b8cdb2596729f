//! `kiln pretrain` end to end on a small generated corpus: it learns, it saves a directory kiln
//! reloads with the same held-out loss, it resumes exactly, and it refuses bad input up front.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use kiln_model::{LoadOptions, LoadedModel};
use kiln_train::corpus::TokenBlocks;
use kiln_train::metrics::read_metrics;
use kiln_train::pretrain::{PretrainConfig, lm_loss, pretrain};

fn corpus(dir: &Path) -> PathBuf {
    let path = dir.join("corpus.jsonl");
    let names = ["Ada", "Bo", "Cy", "Dee"];
    let towns = ["Oakford", "Riverton", "Lakeside"];
    let rows: Vec<String> = (0..600)
        .map(|i| {
            let text = format!(
                "{} lives in {}. {} plus {} is {}.",
                names[i % 4],
                towns[i % 3],
                i % 17,
                i % 13,
                i % 17 + i % 13
            );
            serde_json::json!({ "text": text }).to_string()
        })
        .collect();
    std::fs::write(&path, rows.join("\n")).unwrap();
    path
}

fn config(dir: &Path, extra: &str) -> PretrainConfig {
    let yaml = format!(
        "dataset_path: {}\noutput_dir: {}\nvocab_size: 300\nhidden_size: 32\nintermediate_size: 64\n\
         num_hidden_layers: 2\nnum_attention_heads: 4\nnum_key_value_heads: 2\nmax_length: 32\n\
         per_device_train_batch_size: 4\nlearning_rate: 0.01\nwarmup_steps: 2\nmax_steps: 10\n\
         logging_steps: 1\neval_steps: 5\nsave_steps: 5\nseed: 3\n{extra}",
        corpus(dir).display(),
        dir.join("out").display()
    );
    let file = dir.join("pretrain.yaml");
    std::fs::write(&file, yaml).unwrap();
    PretrainConfig::load(&file, &[]).unwrap()
}

#[test]
fn learns_saves_and_reloads_with_the_same_eval_loss() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "gradient_accumulation_steps: 2\n");
    let summary = pretrain(&cfg, false).unwrap();
    let out = dir.path().join("out");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "metrics.jsonl",
        "loss_curve.png",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let records = read_metrics(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(records.len(), 10);
    let first = records[0].loss.unwrap();
    let last = records[9].loss.unwrap();
    assert!(last < first * 0.7, "loss {first} -> {last}");
    assert!(records.iter().all(|r| r.grad_norm.is_some()
        && r.learning_rate.is_some()
        && r.tokens_per_second.is_some()));
    assert_eq!(records.iter().filter(|r| r.eval_loss.is_some()).count(), 2);

    // The saved directory reloads in kiln and scores the held-out blocks identically.
    let m = LoadedModel::load(out.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let mut blocks = TokenBlocks::open(&out.join(".kiln-cache/eval.u32"), 33).unwrap();
    let n = blocks.len().min(cfg.max_eval_samples);
    let rows: Vec<Vec<u32>> = (0..n).map(|i| blocks.block(i).unwrap()).collect();
    let reloaded: f64 = rows
        .chunks(4)
        .map(|c| {
            f64::from(
                lm_loss(&m.model, c, n * 32)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
            )
        })
        .sum();
    let saved = summary.eval_loss.unwrap();
    assert!((reloaded - saved).abs() < 1e-4, "{reloaded} vs {saved}");
    // And the tokenizer encodes as the run did: BOS first.
    assert_eq!(m.tokenizer.encode("Ada lives", true).unwrap()[0], 0);
}

#[test]
fn resumed_run_logs_the_same_metrics_as_the_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    pretrain(&cfg, false).unwrap();
    let out = dir.path().join("out");
    let straight = read_metrics(&out.join("metrics.jsonl")).unwrap();

    // Rebuild the state a crash right after step 5's checkpoint would leave.
    let crashed = dir.path().join("crashed");
    std::fs::create_dir_all(crashed.join(".kiln-cache")).unwrap();
    copy(&out.join("checkpoint-5"), &crashed.join("checkpoint-5"));
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        std::fs::copy(out.join(f), crashed.join(f)).unwrap();
    }
    copy(&out.join(".kiln-cache"), &crashed.join(".kiln-cache"));
    let head: Vec<String> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .take(5)
        .map(str::to_string)
        .collect();
    std::fs::write(crashed.join("metrics.jsonl"), head.join("\n") + "\n").unwrap();

    let mut resumed_cfg = cfg.clone();
    resumed_cfg.output_dir = crashed.clone();
    let err = pretrain(&resumed_cfg, false).unwrap_err().to_string();
    assert!(err.contains("resume_from_checkpoint"), "{err}");
    resumed_cfg.resume_from_checkpoint = true;
    pretrain(&resumed_cfg, false).unwrap();
    let resumed = read_metrics(&crashed.join("metrics.jsonl")).unwrap();
    assert_eq!(resumed.len(), 10);
    for (a, b) in straight.iter().zip(&resumed) {
        assert_eq!(
            (a.step, a.loss, a.grad_norm, a.eval_loss),
            (b.step, b.loss, b.grad_norm, b.eval_loss)
        );
    }
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn bad_input_is_refused_before_any_training() {
    let dir = tempfile::tempdir().unwrap();
    let base = config(dir.path(), "");
    let expect_err = |cfg: &PretrainConfig, needle: &str| {
        let e = pretrain(cfg, false).unwrap_err().to_string();
        assert!(e.contains(needle), "expected {needle:?} in: {e}");
    };
    let mut c = base.clone();
    c.num_attention_heads = 5;
    expect_err(&c, "num_key_value_heads");
    c.num_key_value_heads = Some(5);
    expect_err(&c, "hidden_size");
    let mut c = base.clone();
    c.max_position_embeddings = Some(16);
    expect_err(&c, "max_position_embeddings");
    let mut c = base.clone();
    c.lr_scheduler_type = "polynomial".into();
    expect_err(&c, "lr_scheduler_type");
    // An output_dir below a regular file cannot be created.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let mut c = base.clone();
    c.output_dir = file.join("out");
    expect_err(&c, "a-file");
    // Empty and non-UTF-8 corpora.
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let mut c = base.clone();
    c.dataset_path = empty;
    c.output_dir = dir.path().join("o1");
    expect_err(&c, "no text");
    let binary = dir.path().join("binary.txt");
    std::fs::write(&binary, [b'o', b'k', b'\n', 0xff, 0xfe, b'\n']).unwrap();
    let mut c = base.clone();
    c.dataset_path = binary;
    c.output_dir = dir.path().join("o2");
    expect_err(&c, "binary.txt:2");
    let bad_row = dir.path().join("rows.jsonl");
    std::fs::write(&bad_row, "{\"text\": \"fine\"}\n{\"txt\": \"typo\"}\n").unwrap();
    let mut c = base.clone();
    c.dataset_path = bad_row;
    c.output_dir = dir.path().join("o3");
    expect_err(&c, "rows.jsonl:2");
    // Unknown keys are named.
    let yaml = dir.path().join("typo.yaml");
    std::fs::write(&yaml, "dataset_path: x\noutput_dir: y\nlearning_rte: 1\n").unwrap();
    let e = PretrainConfig::load(&yaml, &[]).unwrap_err().to_string();
    assert!(e.contains("learning_rte"), "{e}");
}
