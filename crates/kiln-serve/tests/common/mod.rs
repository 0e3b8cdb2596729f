//! What the HTTP tests share: a server on a free port over the tiny Llama fixture, the reference
//! generation to compare against, SSE parsing and JSON snapshots.
//!
//! Snapshots are committed JSON files in `tests/snapshots/`; run with `UPDATE_SNAPSHOTS=1` to
//! rewrite them after an intended change, and review the diff.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use kiln_model::{GenerateParams, LoadOptions, LoadedModel, SamplingParams};
use kiln_serve::server::{ServeOptions, ServerHandle};
use serde_json::Value;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/hf")
        .join(name)
}

pub fn model_path() -> String {
    fixture("llama").to_string_lossy().into_owned()
}

/// A server over the fixture on 127.0.0.1, port 0, with `configure` applied to the defaults.
pub fn start(configure: impl FnOnce(&mut ServeOptions)) -> ServerHandle {
    let mut options = ServeOptions::new(model_path());
    configure(&mut options);
    ServerHandle::start(&options, "127.0.0.1:0".parse().expect("address"))
        .expect("the server starts")
}

/// The fixture loaded as `kiln generate` loads it (f32, CPU), optionally with an adapter
/// attached (not merged, as the server attaches it).
pub fn reference_model(adapter: Option<&str>) -> LoadedModel {
    let options = LoadOptions {
        dtype: Some(candle_core::DType::F32),
        adapter: adapter.map(fixture),
        merge_adapter: false,
        ..LoadOptions::default()
    };
    LoadedModel::load(&model_path(), &options).expect("fixture loads")
}

/// `kiln generate --temperature 0 --json`'s text and finish reason for `prompt_ids`.
pub fn reference_greedy(
    loaded: &LoadedModel,
    prompt_ids: &[u32],
    max_tokens: usize,
) -> (String, &'static str) {
    let params = GenerateParams {
        max_new_tokens: max_tokens,
        sampling: SamplingParams::greedy(),
        eos_token_ids: loaded.eos_token_ids(),
        ignore_eos: false,
        use_kv_cache: true,
    };
    let generation =
        kiln_model::generate(&loaded.model, prompt_ids, &params, |_| {}).expect("generates");
    let ids = match generation.token_ids.split_last() {
        Some((last, rest)) if params.eos_token_ids.contains(last) => rest,
        _ => &generation.token_ids[..],
    };
    let text = loaded.tokenizer.decode(ids, false).expect("decodes");
    let reason = match generation.finish_reason {
        kiln_model::FinishReason::Stop => "stop",
        kiln_model::FinishReason::Length => "length",
    };
    (text, reason)
}

/// The prompt ids of a one-message chat, as the server renders it.
pub fn chat_prompt_ids(loaded: &LoadedModel, user: &str) -> Vec<u32> {
    let messages = serde_json::json!([{"role": "user", "content": user}]);
    let text = loaded
        .tokenizer
        .apply_chat_template(&messages, true)
        .expect("template renders");
    loaded.tokenizer.encode(&text, false).expect("encodes")
}

pub async fn post(url: &str, body: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .expect("request sent");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body read");
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text}"));
    (status, json)
}

/// The events of a server-sent event stream: each `data:` payload parsed, the stream required
/// to end with `data: [DONE]` and nothing after it.
pub fn parse_sse(body: &str) -> Vec<Value> {
    let events: Vec<&str> = body
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
        })
        .collect();
    assert_eq!(
        events.last(),
        Some(&"[DONE]"),
        "the stream ends with [DONE]"
    );
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("{err}: {e}")))
        .collect()
}

pub async fn post_stream(url: &str, body: &Value) -> Vec<Value> {
    let response = reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .expect("request sent");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/event-stream",
        "SSE content type"
    );
    parse_sse(&response.text().await.expect("body read"))
}

/// The text a stream carried, per choice index (chat `delta.content` or completions `text`).
pub fn streamed_texts(events: &[Value], n: usize) -> Vec<String> {
    let mut texts = vec![String::new(); n];
    for event in events {
        for choice in event["choices"].as_array().expect("choices") {
            let i = choice["index"].as_u64().expect("index") as usize;
            let piece = choice["delta"]["content"]
                .as_str()
                .or(choice["text"].as_str())
                .unwrap_or("");
            texts[i].push_str(piece);
        }
    }
    texts
}

/// Replaces what legitimately changes between runs or belongs to the engine: ids, timestamps,
/// prefix-cache hits, and every non-integer number (log-probs, entropies; their values are
/// checked by assertions, not snapshots).
pub fn mask(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let masked = match (k.as_str(), v) {
                        ("id", Value::String(_)) => Value::String("<id>".into()),
                        ("created", Value::Number(_)) => Value::String("<created>".into()),
                        ("cached_tokens", Value::Number(_)) => Value::String("<cached>".into()),
                        _ => mask(v),
                    };
                    (k.clone(), masked)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(mask).collect()),
        Value::Number(n) if n.is_f64() => Value::String("<float>".into()),
        other => other.clone(),
    }
}

/// Compares `value` with `tests/snapshots/NAME.json`; `UPDATE_SNAPSHOTS=1` rewrites the file.
pub fn assert_snapshot(name: &str, value: &Value) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.json"));
    let mut actual = serde_json::to_string_pretty(value).expect("serializes");
    actual.push('\n');
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &actual).expect("snapshot written");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with UPDATE_SNAPSHOTS=1 to write it",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "snapshot {name} differs (UPDATE_SNAPSHOTS=1 rewrites it after an intended change)\n--- committed\n{expected}\n--- now\n{actual}"
    );
}

/// A metric's value in Prometheus text: the first series called `name` whose labels include
/// every one of `labels` (`finished_reason="abort"`).
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    series(text, name, labels).unwrap_or_else(|| panic!("no series {name} {labels:?} in\n{text}"))
}

/// Like [`metric`], `None` for a series not (yet) exported: a labelled counter appears once it
/// is first counted.
pub fn series(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub async fn get_text(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.expect("request sent");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body read"))
}
