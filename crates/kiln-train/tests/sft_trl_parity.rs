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
