//! kiln's SFT tokenization and loss masks equal TRL's: `testdata/trl/sft_labels.json` holds the
//! `input_ids` and `labels` TRL 1.16's SFTTrainer builds for a few rows of each format with the
//! fixture's tokenizer (written by `scripts/trl_sft_labels.py`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use kiln_core::Tokenizer;
use kiln_train::sft_data::{SftDataOptions, load_sft_dataset};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

#[test]
fn token_ids_and_loss_masks_match_trl() {
    let tokenizer = Tokenizer::from_dir(&root().join("hf/llama")).unwrap();
    let text = std::fs::read_to_string(root().join("trl/sft_labels.json")).unwrap();
    let reference: Value = serde_json::from_str(&text).unwrap();
    let cases = reference["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 3);
    for (name, items) in cases {
        let items = items.as_array().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.jsonl");
        let rows: Vec<String> = items.iter().map(|i| i["row"].to_string()).collect();
        std::fs::write(&path, rows.join("\n")).unwrap();
        // TRL's defaults: loss on the completion of prompt-completion rows, and on the whole
        // rendered completion (assistant_only_loss off).
        let opts = SftDataOptions {
            max_length: 128,
            packing: false,
            completion_only_loss: true,
            assistant_only_loss: false,
        };
        let data = load_sft_dataset(&path, &tokenizer, &opts).unwrap();
        assert_eq!(data.examples.len(), items.len(), "{name}");
        for (example, item) in data.examples.iter().zip(items) {
            let ids: Vec<u32> = item["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(example.input_ids, ids, "{name}: input_ids");
            // HF shifts labels inside the loss, so position 0 is never a target in either.
            let trained: Vec<bool> = item["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap() != -100)
                .skip(1)
                .collect();
            assert_eq!(
                &example.loss_mask[1..],
                trained.as_slice(),
                "{name}: loss mask"
            );
            assert!(trained.iter().any(|&t| t) && !example.loss_mask[0]);
        }
    }
}

/// The SFT loss of a padded batch and the adapter's gradients equal what transformers and PEFT
/// compute for the same rows (`peft` in the reference file).
#[test]
fn loss_and_adapter_gradients_match_peft() {
    use kiln_train::sft::{SftConfig, SftModel, sft_loss};
    use kiln_train::sft_data::SftExample;

    let text = std::fs::read_to_string(root().join("trl/sft_labels.json")).unwrap();
    let reference: Value = serde_json::from_str(&text).unwrap();
    let examples: Vec<SftExample> = reference["cases"]["prompt_completion"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| SftExample {
            input_ids: item["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect(),
            loss_mask: item["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap() != -100)
                .collect(),
        })
        .collect();
    let refs: Vec<&SftExample> = examples.iter().collect();
    let trained: usize = examples
        .iter()
        .map(|e| e.loss_mask[1..].iter().filter(|&&m| m).count())
        .sum();
    let peft = &reference["peft"];

    let dir = tempfile::tempdir().unwrap();
    let load = |extra: &str| {
        let path = dir.path().join("sft.yaml");
        std::fs::write(
            &path,
            format!(
                "model_id: {}\ndataset_path: unused.jsonl\n{extra}",
                root().join("hf/llama").display()
            ),
        )
        .unwrap();
        SftModel::load(&SftConfig::load(&path, &[]).unwrap()).unwrap()
    };
    let close = |a: f64, b: f64, rel: f64, what: &str| {
        assert!(
            (a - b).abs() <= rel * b.abs().max(1e-6),
            "{what}: kiln {a} vs PEFT {b}"
        );
    };

    // Full fine-tuning view of the base: the loss alone.
    let base = load("");
    let loss = sft_loss(&base.model, &refs, 4, trained).unwrap();
    close(
        f64::from(loss.to_scalar::<f32>().unwrap()),
        peft["base_loss"].as_f64().unwrap(),
        1e-4,
        "base loss",
    );

    // The PEFT fixture adapter, trainable: loss and every adapter gradient.
    let adapted = load(&format!(
        "adapter_path: {}\n",
        root().join("hf/llama-lora").display()
    ));
    let loss = sft_loss(&adapted.model, &refs, 4, trained).unwrap();
    close(
        f64::from(loss.to_scalar::<f32>().unwrap()),
        peft["adapter_loss"].as_f64().unwrap(),
        1e-4,
        "adapter loss",
    );
    let grads = adapted.model.backward(&loss).unwrap();
    let expected = peft["adapter_grads"].as_object().unwrap();
    assert_eq!(adapted.params.len(), expected.len());
    for p in &adapted.params {
        let want = &expected[&p.name];
        let g = grads.get(p.var.as_tensor()).expect("gradient");
        let values: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        let norm = values
            .iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            .sqrt();
        close(norm, want["norm"].as_f64().unwrap(), 1e-3, &p.name);
        for (got, want) in values.iter().zip(want["first"].as_array().unwrap()) {
            let want = want.as_f64().unwrap();
            assert!(
                (f64::from(*got) - want).abs() < 1e-4,
                "{}: gradient value {got} vs PEFT {want}",
                p.name
            );
        }
    }
}
