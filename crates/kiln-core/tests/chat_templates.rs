//! Chat templates rendered by kiln against transformers' `apply_chat_template(tokenize=False)`
//! (reference renderings in testdata/chat_templates/expected.json, made by
//! testdata/hf/tools/make_chat_fixtures.py). The templates follow the shapes of the Llama 3,
//! Mistral and Qwen2.5 templates (system-message extraction, role alternation checks with
//! `raise_exception`, tool calls printed with `tojson`) plus one that exercises Jinja features
//! (`trim_blocks`/`lstrip_blocks`, `namespace`, `break`/`continue`, Python string methods).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_core::{ChatTemplate, Tokenizer};
use serde_json::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/chat_templates")
}

#[test]
fn templates_render_like_transformers() {
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(dir().join("expected.json")).unwrap())
            .unwrap();
    let special = BTreeMap::from([
        ("bos_token".to_string(), "<|begin_of_text|>".to_string()),
        ("eos_token".to_string(), "<|im_end|>".to_string()),
        ("pad_token".to_string(), "<pad>".to_string()),
    ]);
    assert!(cases.len() >= 9);
    for case in &cases {
        let name = case["template"].as_str().unwrap();
        let source = std::fs::read_to_string(dir().join(format!("{name}.jinja"))).unwrap();
        let template = ChatTemplate::new(&source, special.clone()).unwrap();
        let rendered = template.render(
            &case["messages"],
            case["add_generation_prompt"].as_bool().unwrap(),
        );
        match (&case["text"], &case["error"]) {
            (Value::String(want), _) => assert_eq!(&rendered.unwrap(), want, "template {name}"),
            (_, Value::String(want)) => {
                let err = rendered.unwrap_err().to_string();
                assert!(
                    err.contains(want.as_str()),
                    "template {name}: {err} does not contain {want}"
                );
            }
            _ => panic!("case without text or error"),
        }
    }
}

#[test]
fn incremental_decoding_never_splits_a_character() {
    // Byte-level BPE: "é", "°" and the emoji span several byte tokens each.
    let tok = Tokenizer::from_dir(&dir().join("../hf/llama")).unwrap();
    let text = "21 °C in Paris, l'été 🙂 ok";
    let ids = tok.encode(text, false).unwrap();
    assert!(ids.len() > text.chars().count() / 2);
    let mut decoder = kiln_core::tokenizer::IncrementalDecoder::new(false);
    let mut streamed = String::new();
    for &id in &ids {
        if let Some(delta) = decoder.push(&tok, id).unwrap() {
            assert!(
                !delta.contains('\u{FFFD}'),
                "delta {delta:?} splits a character"
            );
            streamed.push_str(&delta);
        }
    }
    assert_eq!(streamed, text);
}
