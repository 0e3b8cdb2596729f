//! Swapping an adapter in a running server through `POST /admin/adapters`, over a real bound
//! port: under load no request fails, requests in flight finish on the old weights, requests
//! sent after a swap answered get the new ones; and the admin API's keys and refusals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{fixture, get_text, metric, model_path, parse_sse, series, start, streamed_texts};
use futures_util::StreamExt;
use kiln_model::{GenerateParams, LoadOptions, LoadedModel, SamplingParams};
use serde_json::{Value, json};

const ADMIN_KEY: &str = "admin-secret";
const API_KEY: &str = "api-secret";
/// Longer than one KV block (16 positions), so the prefix cache holds blocks of it per adapter.
const PROMPT: &str = "The quick brown fox jumps over the lazy dog while the model learns to count";
const SHORT: usize = 32;
const LONG: usize = 200;

/// A copy of the fixture adapter with its `lora_B` weights scaled by `scale`, in `dir`.
fn scaled_adapter(dir: &Path, scale: f64) -> PathBuf {
    let source = fixture("llama-lora");
    std::fs::copy(
        source.join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    let tensors = candle_core::safetensors::load(
        source.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let scaled: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(name, t)| {
            let t = if name.contains("lora_B") {
                (t * scale).unwrap()
            } else {
                t
            };
            (name, t)
        })
        .collect();
    candle_core::safetensors::save(&scaled, dir.join("adapter_model.safetensors")).unwrap();
    dir.to_path_buf()
}

/// The greedy completion of [`PROMPT`] past EOS, as `kiln generate` computes it with `adapter`
/// attached (unmerged, as the server attaches it).
fn reference(adapter: &Path, max_tokens: usize) -> String {
    let options = LoadOptions {
        dtype: Some(candle_core::DType::F32),
        adapter: Some(adapter.to_path_buf()),
        merge_adapter: false,
        ..LoadOptions::default()
    };
    let loaded = LoadedModel::load(&model_path(), &options).unwrap();
    let ids = loaded.tokenizer.encode(PROMPT, true).unwrap();
    let params = GenerateParams {
        max_new_tokens: max_tokens,
        sampling: SamplingParams::greedy(),
        eos_token_ids: loaded.eos_token_ids(),
        ignore_eos: true,
        use_kv_cache: true,
    };
    let generation = kiln_model::generate(&loaded.model, &ids, &params, |_| {}).unwrap();
    assert_eq!(generation.token_ids.len(), max_tokens);
    loaded
        .tokenizer
        .decode(&generation.token_ids, false)
        .unwrap()
}

fn completion(max_tokens: usize, stream: bool) -> Value {
    json!({"model": "prod", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
           "ignore_eos": true, "stream": stream})
}

/// A completion's text and finish reason, streamed or not; panics unless it is a 200 with a
/// complete reply (a finish reason, and `[DONE]` for a stream).
async fn complete(client: &reqwest::Client, url: &str, body: &Value) -> String {
    let response = client.post(url).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    if body["stream"] == true {
        let events = parse_sse(&text);
        let reason = events
            .iter()
            .filter_map(|e| e["choices"][0]["finish_reason"].as_str())
            .next_back();
        assert_eq!(reason, Some("length"), "{text}");
        streamed_texts(&events, 1).remove(0)
    } else {
        let json: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["choices"][0]["finish_reason"], "length", "{json}");
        assert_eq!(json["usage"]["completion_tokens"], body["max_tokens"]);
        json["choices"][0]["text"].as_str().unwrap().to_string()
    }
}

async fn admin(
    client: &reqwest::Client,
    base: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let url = format!("{base}/admin/adapters");
    let mut request = match body {
        Some(body) => client.post(url).json(body),
        None => client.get(url),
    };
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: {e}: {text}")),
    )
}

/// A stream opened and read up to its first generated text, the rest left to [`finish`].
struct OpenStream {
    body: String,
    chunks: futures_util::stream::BoxStream<'static, reqwest::Result<axum::body::Bytes>>,
}

async fn open_stream(client: &reqwest::Client, url: &str, body: &Value) -> OpenStream {
    let response = client.post(url).json(body).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut open = OpenStream {
        body: String::new(),
        chunks: response.bytes_stream().boxed(),
    };
    // Read until one event carries text: the sequence is running on the adapter it resolved.
    while !open
        .body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .any(|e| {
            e["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
    {
        let chunk = open
            .chunks
            .next()
            .await
            .expect("the stream goes on")
            .unwrap();
        open.body.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    open
}

async fn finish(mut open: OpenStream) -> String {
    while let Some(chunk) = open.chunks.next().await {
        open.body
            .push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    streamed_texts(&parse_sse(&open.body), 1).remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swaps_under_load_drop_nothing_and_keep_running_requests_on_old_weights() {
    let temp = tempfile::tempdir().unwrap();
    let a = fixture("llama-lora");
    let b = scaled_adapter(temp.path(), 8.0);
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let server = start(|o| {
        o.adapters = vec![format!("prod={}", a.display()).parse().unwrap()];
        o.admin_key = Some(ADMIN_KEY.into());
    });
    let base = server.url();
    let url = format!("{base}/v1/completions");
    // [A, B] references, short and long.
    let short = [reference(&a, SHORT), reference(&b, SHORT)];
    let long = [reference(&a, LONG), reference(&b, LONG)];
    assert_ne!(
        short[0], short[1],
        "the scaled adapter must change the output"
    );
    assert_ne!(long[0], long[1]);
    let client = reqwest::Client::new();
    assert_eq!(
        complete(&client, &url, &completion(SHORT, false)).await,
        short[0]
    );

    // Adapter index (0: A, 1: B) prod serves after each swap.
    let swaps = [1, 0, 1, 0];
    let swaps_done = Arc::new(AtomicUsize::new(0));
    const CLIENTS: usize = 8;
    const MAX_PER_CLIENT: usize = 40;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (url, swaps_done) = (url.clone(), swaps_done.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut outputs = Vec::new();
                // Until the last swap has answered (and once more after it), boundedly.
                loop {
                    let seen = swaps_done.load(Ordering::SeqCst);
                    let body = completion(SHORT, (c + outputs.len()) % 2 == 0);
                    outputs.push((seen, complete(&client, &url, &body).await));
                    if seen == swaps.len() || outputs.len() == MAX_PER_CLIENT {
                        return outputs;
                    }
                }
            })
        })
        .collect();

    let mut serving = 0;
    for (i, &next) in swaps.iter().enumerate() {
        // A long request running on the current adapter when the swap comes.
        let running = open_stream(&client, &url, &completion(LONG, true)).await;
        let dir = if next == 0 { &a } else { &b };
        let (status, swapped) = admin(
            &client,
            &base,
            Some(ADMIN_KEY),
            Some(&json!({"name": "prod", "path": path(dir)})),
        )
        .await;
        assert_eq!(status, 200, "{swapped}");
        assert_eq!(swapped["name"], "prod");
        assert_eq!(swapped["path"], path(dir));
        assert_eq!(swapped["replaced"], true);
        let previous = if serving == 0 { &a } else { &b };
        assert_eq!(swapped["previous_path"], path(previous));
        assert!(swapped["load_ms"].is_u64(), "{swapped}");
        swaps_done.store(i + 1, Ordering::SeqCst);

        assert_eq!(
            finish(running).await,
            long[serving],
            "swap {i}: a request running at the swap finishes on the old adapter"
        );
        for stream in [false, true] {
            assert_eq!(
                complete(&client, &url, &completion(SHORT, stream)).await,
                short[next],
                "swap {i}: a request sent after the swap answered uses the new adapter"
            );
        }
        serving = next;
    }

    let mut sent = 0;
    for task in clients {
        for (seen, text) in task.await.unwrap() {
            sent += 1;
            assert!(
                short.contains(&text),
                "an output of neither adapter: {text:?}"
            );
            if seen == swaps.len() {
                assert_eq!(text, short[serving], "sent after the last swap");
            }
        }
    }
    assert!(sent >= CLIENTS, "every client sent");

    let (_, listed) = admin(&client, &base, Some(ADMIN_KEY), None).await;
    assert_eq!(listed["object"], "list");
    assert_eq!(listed["data"][0]["name"], "prod");
    assert_eq!(listed["data"][0]["path"], path(&a));
    assert_eq!(listed["data"][0]["swaps"], swaps.len());
    let (_, metrics) = get_text(&format!("{base}/metrics")).await;
    assert_eq!(
        metric(&metrics, "kiln:adapter_swaps_total", &[]),
        swaps.len() as f64
    );
    assert_eq!(
        series(&metrics, "kiln:request_success_total", &["abort"]),
        None,
        "no request was aborted"
    );
    // The retired adapters' weights are gone once their requests are done: only prod's
    // current one is held (the engine publishes its stats just after its last step).
    let engine = server.state().engine();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while engine.stats().adapters_loaded != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "retired adapters still held: {:?}",
            engine.stats()
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    eprintln!(
        "{sent} requests from {CLIENTS} clients across {} swaps",
        swaps.len()
    );
    server.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_its_own_key_and_refuses_what_it_cannot_load() {
    let temp = tempfile::tempdir().unwrap();
    let b = scaled_adapter(temp.path(), 8.0);
    let startup = fixture("llama-lora");
    let server = start(|o| {
        o.adapters = vec![format!("prod={}", startup.display()).parse().unwrap()];
        o.admin_key = Some(ADMIN_KEY.into());
        o.api_key = Some(API_KEY.into());
    });
    let base = server.url();
    let client = reqwest::Client::new();
    let load = json!({"name": "canary", "path": b.to_string_lossy()});

    for key in [None, Some(API_KEY), Some("wrong")] {
        for body in [None, Some(&load)] {
            let (status, error) = admin(&client, &base, key, body).await;
            assert_eq!(status, 401, "key {key:?}: {error}");
            assert_eq!(error["error"]["code"], "invalid_api_key");
            assert_eq!(error["error"]["type"], "invalid_request_error");
        }
    }

    let missing = "/nonexistent/kiln-adapter";
    let refusals = [
        (json!({"name": "x", "path": missing}), "path", Some(missing)),
        (
            json!({"name": "x", "path": temp.path().join("empty").to_string_lossy()}),
            "path",
            Some("empty"),
        ),
        (
            json!({"name": "llama", "path": b.to_string_lossy()}),
            "name",
            Some("llama"),
        ),
        (
            json!({"name": "", "path": b.to_string_lossy()}),
            "name",
            None,
        ),
        (json!({"name": "x", "path": ""}), "path", None),
        (json!({"name": "x"}), "path", None),
        (json!({"name": 3, "path": "p"}), "name", None),
    ];
    std::fs::create_dir(temp.path().join("empty")).unwrap();
    for (body, param, quoted) in refusals {
        let (status, error) = admin(&client, &base, Some(ADMIN_KEY), Some(&body)).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
        assert_eq!(error["error"]["param"], param, "{body}: {error}");
        if let Some(quoted) = quoted {
            let message = error["error"]["message"].as_str().unwrap();
            assert!(message.contains(quoted), "{message}");
        }
    }
    let malformed = client
        .post(format!("{base}/admin/adapters"))
        .bearer_auth(ADMIN_KEY)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status().as_u16(), 400);

    // A new name is added beside the startup adapter.
    let (status, added) = admin(&client, &base, Some(ADMIN_KEY), Some(&load)).await;
    assert_eq!(status, 200, "{added}");
    assert_eq!(added["replaced"], false);
    assert_eq!(added["previous_path"], Value::Null);
    assert_eq!(added["path"], b.to_string_lossy().as_ref());

    let models: Value = client
        .get(format!("{base}/v1/models"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["llama", "prod", "canary"]);

    let (status, listed) = admin(&client, &base, Some(ADMIN_KEY), None).await;
    assert_eq!(status, 200);
    let data = listed["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["name"], "prod");
    assert_eq!(data[0]["path"], startup.to_string_lossy().as_ref());
    assert_eq!(data[0]["swaps"], 0);
    assert_eq!(data[1]["name"], "canary");
    assert_eq!(data[1]["swaps"], 0);
    assert!(data[1]["loaded_at"].as_u64().unwrap() > 1_600_000_000);

    let response = client
        .post(format!("{base}/v1/completions"))
        .bearer_auth(API_KEY)
        .json(
            &json!({"model": "canary", "prompt": PROMPT, "max_tokens": SHORT,
                      "temperature": 0, "ignore_eos": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["text"], reference(&b, SHORT));
    server.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_key_the_admin_api_is_not_there() {
    let server = start(|o| o.api_key = Some(API_KEY.into()));
    let client = reqwest::Client::new();
    let load = json!({"name": "prod", "path": fixture("llama-lora").to_string_lossy()});
    for (key, body) in [
        (None, None),
        (Some(API_KEY), Some(&load)),
        (None, Some(&load)),
    ] {
        let (status, error) = admin(&client, &server.url(), key, body).await;
        assert_eq!(status, 404, "{error}");
        assert_eq!(error["error"]["type"], "invalid_request_error");
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--admin-key"),
            "{error}"
        );
    }
    let (_, models) = get_text(&format!("{}/v1/models", server.url())).await;
    assert!(
        models.contains("invalid_api_key"),
        "the API key still guards /v1"
    );
    server.shutdown().unwrap();
}
