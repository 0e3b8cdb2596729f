//! The API over a real bound port: response and event-stream shapes (snapshots), greedy text equal
//! to `kiln_model::generate`, stop strings, adapters, and the small endpoints.

mod common;

use common::{
    assert_snapshot, chat_prompt_ids, get_text, mask, metric, post, post_stream, reference_greedy,
    reference_model, start, streamed_texts,
};
use serde_json::{Value, json};

const PROMPT: &str = "The model learns";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_response_shape() {
    let server = start(|_| {});
    let url = format!("{}/v1/completions", server.url());
    let (status, body) = post(
        &url,
        &json!({"model": "llama", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("cmpl-"))
    );
    assert_snapshot("completion", &mask(&body));

    let (status, body) = post(
        &url,
        &json!({"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 2}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let logprobs = &body["choices"][0]["logprobs"];
    let tokens: Vec<&str> = logprobs["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_str().expect("token text"))
        .collect();
    assert_eq!(
        tokens.concat(),
        body["choices"][0]["text"].as_str().expect("text"),
        "the tokens spell the text"
    );
    for (lp, top) in logprobs["token_logprobs"]
        .as_array()
        .expect("token_logprobs")
        .iter()
        .zip(logprobs["top_logprobs"].as_array().expect("top_logprobs"))
    {
        let lp = lp.as_f64().expect("number");
        assert!(lp <= 0.0, "a log-prob is at most 0: {lp}");
        let best = top
            .as_object()
            .expect("map")
            .values()
            .map(|v| v.as_f64().expect("number"))
            .fold(f64::NEG_INFINITY, f64::max);
        assert!(
            (best - lp).abs() < 1e-4,
            "greedy picks the most likely token: {best} vs {lp}"
        );
    }
    assert_snapshot("completion_logprobs", &mask(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_response_shape_and_confidence() {
    let server = start(|_| {});
    let (status, body) = post(
        &format!("{}/v1/chat/completions", server.url()),
        &json!({
            "model": "llama",
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
            "max_tokens": 5,
            "temperature": 0,
            "logprobs": true,
            "top_logprobs": 2,
        }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("chatcmpl-"))
    );
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("content");
    let mut sum = 0.0;
    for entry in content {
        let lp = entry["logprob"].as_f64().expect("logprob");
        assert!(lp <= 0.0);
        sum += lp;
        let bytes: Vec<u8> = entry["bytes"]
            .as_array()
            .expect("bytes")
            .iter()
            .map(|b| b.as_u64().expect("byte") as u8)
            .collect();
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            entry["token"].as_str().expect("token")
        );
        assert_eq!(entry["top_logprobs"].as_array().expect("top").len(), 2);
    }
    // With no EOS among the 5 tokens, the mean covers exactly the listed tokens.
    if body["choices"][0]["finish_reason"] == "length" {
        let mean = body["kiln"]["choices"][0]["mean_logprob"]
            .as_f64()
            .expect("mean_logprob");
        assert!((mean - sum / content.len() as f64).abs() < 1e-4);
    }
    let entropy = body["kiln"]["choices"][0]["mean_entropy"]
        .as_f64()
        .expect("mean_entropy");
    assert!(entropy > 0.0, "an untrained model is uncertain: {entropy}");
    assert_snapshot("chat", &mask(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_stream_shape_matches_the_whole_response() {
    let server = start(|_| {});
    let url = format!("{}/v1/chat/completions", server.url());
    let request = json!({
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 6,
        "temperature": 0,
    });
    let (_, whole) = post(&url, &request).await;
    let mut streaming = request.clone();
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let events = post_stream(&url, &streaming).await;

    assert_eq!(
        events[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let last = events.last().expect("events");
    assert_eq!(last["choices"], json!([]));
    for count in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(last["usage"][count], whole["usage"][count], "{count}");
    }
    let closing = &events[events.len() - 2];
    assert_eq!(closing["choices"][0]["delta"], json!({}));
    assert_eq!(
        closing["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    assert!(closing["kiln"]["choices"][0]["mean_logprob"].is_f64());
    for event in &events[..events.len() - 1] {
        assert_eq!(event["usage"], Value::Null, "usage is null until the end");
        assert_eq!(event["object"], "chat.completion.chunk");
    }
    assert_eq!(
        streamed_texts(&events, 1)[0],
        whole["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
    );
    assert_snapshot("chat_stream", &mask(&Value::Array(events)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_stream_interleaves_choices() {
    let server = start(|_| {});
    let url = format!("{}/v1/completions", server.url());
    let events = post_stream(
        &url,
        &json!({"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "n": 2, "stream": true}),
    )
    .await;
    for event in &events {
        assert_eq!(event["object"], "text_completion");
        assert!(
            event.get("usage").is_none(),
            "no usage without include_usage"
        );
    }
    let texts = streamed_texts(&events, 2);
    assert_eq!(texts[0], texts[1], "greedy choices agree");
    let (_, whole) = post(
        &url,
        &json!({"prompt": PROMPT, "max_tokens": 5, "temperature": 0}),
    )
    .await;
    assert_eq!(
        texts[0],
        whole["choices"][0]["text"].as_str().expect("text")
    );
    let closing: Vec<&Value> = events
        .iter()
        .filter(|e| !e["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(closing.len(), 2, "one closing chunk per choice");
    // How the two choices interleave depends on timing; each one's own events do not.
    let mut by_choice = events.clone();
    by_choice.sort_by_key(|e| e["choices"][0]["index"].as_u64());
    assert_snapshot("completion_stream", &mask(&Value::Array(by_choice)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_text_equals_kiln_generate() {
    let server = start(|_| {});
    let loaded = reference_model(None);
    for (prompt, max_tokens) in [(PROMPT, 12), ("Once upon a time", 40), ("a", 3)] {
        let ids = loaded.tokenizer.encode(prompt, true).expect("encodes");
        let (text, reason) = reference_greedy(&loaded, &ids, max_tokens);
        let (status, body) = post(
            &format!("{}/v1/completions", server.url()),
            &json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["text"], text, "prompt {prompt:?}");
        assert_eq!(body["choices"][0]["finish_reason"], reason);
        assert_eq!(body["usage"]["prompt_tokens"], ids.len());

        // Token ids in, same text out.
        let (_, by_ids) = post(
            &format!("{}/v1/completions", server.url()),
            &json!({"prompt": ids, "max_tokens": max_tokens, "temperature": 0}),
        )
        .await;
        assert_eq!(by_ids["choices"][0]["text"], text);

        let chat_ids = chat_prompt_ids(&loaded, prompt);
        let (text, reason) = reference_greedy(&loaded, &chat_ids, max_tokens);
        let (status, body) = post(
            &format!("{}/v1/chat/completions", server.url()),
            &json!({"messages": [{"role": "user", "content": prompt}],
                    "max_completion_tokens": max_tokens, "temperature": 0}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], text);
        assert_eq!(body["choices"][0]["finish_reason"], reason);
        assert_eq!(body["usage"]["prompt_tokens"], chat_ids.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_string_ends_the_text_before_it() {
    let server = start(|_| {});
    let url = format!("{}/v1/completions", server.url());
    let base = json!({"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "ignore_eos": true});
    let (_, whole) = post(&url, &base).await;
    let full = whole["choices"][0]["text"]
        .as_str()
        .expect("text")
        .to_string();
    // A stop string from the middle of the greedy text, spanning token boundaries.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 12, "enough text to cut: {full:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let expected = &full[..full.find(&stop).expect("stop occurs")];

    let mut request = base.clone();
    request["stop"] = json!(["never appears", stop]);
    let (_, cut) = post(&url, &request).await;
    assert_eq!(cut["choices"][0]["text"], expected);
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");

    request["stream"] = json!(true);
    let events = post_stream(&url, &request).await;
    assert_eq!(streamed_texts(&events, 1)[0], expected);
    let closing = events.last().expect("events");
    assert_eq!(closing["choices"][0]["finish_reason"], "stop");
    for event in &events {
        let piece = event["choices"][0]["text"].as_str().unwrap_or("");
        assert!(!piece.contains(&stop), "the stop string is never sent");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_repeats_and_choices_differ() {
    let server = start(|_| {});
    let url = format!("{}/v1/completions", server.url());
    let request = json!({"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0,
                         "seed": 7, "n": 2, "ignore_eos": true});
    let (_, a) = post(&url, &request).await;
    let (_, b) = post(&url, &request).await;
    assert_eq!(a["choices"], b["choices"], "same seed, same text");
    assert_ne!(
        a["choices"][0]["text"], a["choices"][1]["text"],
        "choice i samples with seed + i"
    );
    assert_eq!(a["usage"]["completion_tokens"], 24);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_are_listed_and_served_by_name() {
    let server = start(|o| {
        let spec = format!("lora={}", common::fixture("llama-lora").display());
        o.adapters = vec![spec.parse().expect("NAME=DIR")];
    });
    let (status, models) = get_text(&format!("{}/v1/models", server.url())).await;
    assert_eq!(status, 200);
    let mut models: Value = serde_json::from_str(&models).expect("JSON");
    assert_eq!(models["data"][0]["id"], "llama");
    assert_eq!(models["data"][1]["id"], "lora");
    assert_eq!(models["data"][1]["parent"], "llama");
    assert!(models["data"][0].get("parent").is_none());
    assert_eq!(models["data"][0]["max_model_len"], 512);
    for card in models["data"].as_array_mut().expect("data") {
        card["created"] = json!("<created>");
    }
    assert_snapshot("models", &models);

    let base = reference_model(None);
    let adapted = reference_model(Some("llama-lora"));
    let ids = base.tokenizer.encode(PROMPT, true).expect("encodes");
    let (base_text, _) = reference_greedy(&base, &ids, 16);
    let (lora_text, _) = reference_greedy(&adapted, &ids, 16);
    assert_ne!(base_text, lora_text, "the adapter changes the output");
    for (model, expected) in [("llama", &base_text), ("lora", &lora_text)] {
        let (status, body) = post(
            &format!("{}/v1/completions", server.url()),
            &json!({"model": model, "prompt": PROMPT, "max_tokens": 16, "temperature": 0}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["model"], model);
        assert_eq!(&body["choices"][0]["text"], expected, "model {model}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_and_detokenize() {
    let server = start(|_| {});
    let loaded = reference_model(None);
    let (status, body) = post(
        &format!("{}/tokenize", server.url()),
        &json!({"prompt": PROMPT}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let ids = loaded.tokenizer.encode(PROMPT, true).expect("encodes");
    assert_eq!(
        body,
        json!({"count": ids.len(), "max_model_len": 512, "tokens": ids})
    );

    let (_, chat) = post(
        &format!("{}/tokenize", server.url()),
        &json!({"messages": [{"role": "user", "content": PROMPT}]}),
    )
    .await;
    assert_eq!(chat["tokens"], json!(chat_prompt_ids(&loaded, PROMPT)));

    let (status, body) = post(
        &format!("{}/detokenize", server.url()),
        &json!({"tokens": ids}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["prompt"],
        loaded.tokenizer.decode(&ids, false).expect("decodes")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_openapi() {
    let server = start(|_| {});
    let (status, body) = get_text(&format!("{}/health", server.url())).await;
    assert_eq!((status, body.as_str()), (200, ""));

    post(
        &format!("{}/v1/completions", server.url()),
        &json!({"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    let response = reqwest::get(format!("{}/metrics", server.url()))
        .await
        .expect("request sent");
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4"
    );
    let text = response.text().await.expect("body");
    assert_eq!(
        metric(
            &text,
            "kiln:request_success_total",
            &[r#"finished_reason="length""#]
        ),
        1.0
    );
    assert_eq!(metric(&text, "kiln:generation_tokens_total", &[]), 3.0);

    let (status, spec) = get_text(&format!("{}/openapi.json", server.url())).await;
    assert_eq!(status, 200);
    let spec: Value = serde_json::from_str(&spec).expect("JSON");
    assert_eq!(
        spec,
        serde_json::to_value(kiln_serve::openapi::spec()).expect("serializes")
    );
}

/// Concatenated token bytes, decoded as the tokenizer decodes (invalid UTF-8 as U+FFFD).
fn spelled(entries: &[Value]) -> String {
    let bytes: Vec<u8> = entries
        .iter()
        .flat_map(|e| e["bytes"].as_array().expect("bytes").clone())
        .map(|b| b.as_u64().expect("byte") as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_logprobs_spell_the_text() {
    let server = start(|_| {});
    let url = format!("{}/v1/chat/completions", server.url());
    let request = json!({
        "messages": [{"role": "user", "content": "Spell it"}],
        "max_tokens": 10,
        "temperature": 0,
        "logprobs": true,
        "top_logprobs": 1,
        // Unknown fields are ignored, as vLLM ignores them.
        "user": "someone",
        "kiln_unknown_option": {"x": 1},
    });
    let (status, whole) = post(&url, &request).await;
    assert_eq!(status, 200, "{whole}");
    let text = whole["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    let entries = whole["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("entries");
    assert_eq!(spelled(entries), text);

    let mut streaming = request.clone();
    streaming["stream"] = json!(true);
    let events = post_stream(&url, &streaming).await;
    let streamed: Vec<Value> = events
        .iter()
        .filter_map(|e| e["choices"][0]["logprobs"]["content"].as_array())
        .flatten()
        .cloned()
        .collect();
    // The same tokens; log-probs equal up to float noise (the second request's prompt comes
    // from the prefix cache).
    assert_eq!(streamed.len(), entries.len());
    for (a, b) in streamed.iter().zip(entries) {
        assert_eq!((&a["token"], &a["bytes"]), (&b["token"], &b["bytes"]));
        let (x, y) = (a["logprob"].as_f64(), b["logprob"].as_f64());
        assert!((x.expect("logprob") - y.expect("logprob")).abs() < 1e-4);
    }
    assert_eq!(streamed_texts(&events, 1)[0], text);
}
