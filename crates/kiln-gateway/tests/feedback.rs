//! Feedback over real bound ports: a scripted OpenAI-compatible upstream (a fresh reply id per
//! request, `n` choices, streams with interleaved choices) behind a gateway that captures
//! content, driven with reqwest; what the gateway kept is read back from its store (SQLite in a
//! temporary directory, and PostgreSQL for the ownership check).
//!
//! PostgreSQL is read from `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use kiln_gateway::config::GatewayConfig;
use kiln_gateway::server::{Gateway, GatewayState};
use kiln_gateway::store::Store;
use kiln_monitor::feedback::{Feedback, Thumbs};
use serde_json::{Value, json};

const ALICE: &str = "sk-feedback-alice";
/// Same tenant as Alice, another key: Alice's completions are not Bob's.
const BOB: &str = "sk-feedback-bob";
/// A `no_train` key.
const PRIVATE: &str = "sk-feedback-private";
const DASHBOARD_KEY: &str = "dash-feedback-key";

fn postgres_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The text of choice `i` of the `k`-th reply: every request gets different replies.
fn reply_text(k: u64, i: u64, prompt: &str) -> String {
    format!("reply {k}.{i} to: {prompt}")
}

/// The scripted upstream: ids `chatcmpl-<run>-<k>`, `n` choices, streams that interleave the
/// choices' tokens.
async fn stub_chat(counter: Arc<AtomicU64>, run: String, body: Value) -> Response {
    let k = counter.fetch_add(1, Ordering::SeqCst);
    let id = format!("chatcmpl-{run}-{k}");
    let model = body["model"].as_str().unwrap_or("?").to_string();
    let prompt = body["messages"][0]["content"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let n = body["n"].as_u64().unwrap_or(1);
    if body["stream"] == json!(true) {
        let mut events = String::new();
        let pieces = |i: u64| {
            let text = reply_text(k, i, &prompt);
            let (a, b) = text.split_at(text.find(" to:").unwrap());
            vec![a.to_string(), b.to_string()]
        };
        for piece in 0..2 {
            for i in 0..n {
                let chunk = json!({"id": id, "object": "chat.completion.chunk", "created": 1, "model": model,
                    "choices": [{"index": i, "delta": {"content": pieces(i)[piece]}, "finish_reason": null}]});
                events.push_str(&format!("data: {chunk}\n\n"));
            }
        }
        let done = json!({"id": id, "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": (0..n).map(|i| json!({"index": i, "delta": {}, "finish_reason": "stop"})).collect::<Vec<_>>()});
        events.push_str(&format!("data: {done}\n\ndata: [DONE]\n\n"));
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from(events))
            .unwrap();
    }
    let choices: Vec<Value> = (0..n)
        .map(|i| {
            json!({"index": i, "message": {"role": "assistant", "content": reply_text(k, i, &prompt)},
                   "finish_reason": "stop"})
        })
        .collect();
    Json(json!({
        "id": id, "object": "chat.completion", "created": 1, "model": model, "choices": choices,
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    }))
    .into_response()
}

/// Starts the upstream; returns its `…/v1` URL.
async fn start_stub() -> String {
    let counter = Arc::new(AtomicU64::new(0));
    let run = format!("{:08x}", rand::random::<u32>());
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move |Json(body): Json<Value>| stub_chat(counter.clone(), run.clone(), body)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/v1")
}

/// A gateway over the stub, capturing content, with the dashboard behind [`DASHBOARD_KEY`].
struct Gw {
    url: String,
    client: reqwest::Client,
    state: GatewayState,
    /// Before the gateway started: feedback is read from then on (a shared PostgreSQL database
    /// holds other runs' too).
    started: SystemTime,
    _dir: tempfile::TempDir,
}

/// A gateway storing in `store_url` (SQLite in a fresh directory when `None`); `extra` YAML is
/// appended.
async fn start(store_url: Option<String>, extra: &str) -> Gw {
    let started = SystemTime::now() - Duration::from_secs(1);
    let stub = start_stub().await;
    let dir = tempfile::tempdir().unwrap();
    let store_url = store_url
        .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("gateway.db").display()));
    let yaml = format!(
        "listen: 127.0.0.1:0
upstreams:
  - name: stub
    url: {stub}
    models: [\"*\"]
auth:
  api_keys:
    - key: {ALICE}
      tenant: acme
    - key: {BOB}
      tenant: acme
    - key: {PRIVATE}
      tenant: private
      no_train: true
store:
  url: {store_url}
  capture_content: true
monitor:
  dashboard_key: {DASHBOARD_KEY}
{extra}"
    );
    let config = GatewayConfig::parse(&yaml, std::path::Path::new("test.yaml")).unwrap();
    let gateway = Gateway::bind(config).await.unwrap();
    let url = format!("http://{}", gateway.local_addr());
    let state = gateway.state().clone();
    tokio::spawn(gateway.run(std::future::pending()));
    Gw {
        url,
        client: reqwest::Client::new(),
        state,
        started,
        _dir: dir,
    }
}

/// What a chat request got back: the reply's id, the gateway's request id, the cache header
/// and the body (for streams, the events' payloads).
#[derive(Debug)]
struct Answer {
    id: String,
    request_id: String,
    cache: Option<String>,
    body: Vec<Value>,
}

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({"model": "stub-model", "messages": [{"role": "user", "content": content}],
                          "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

impl Gw {
    async fn chat(&self, key: &str, body: &Value) -> Answer {
        let r = self
            .client
            .post(format!("{}/v1/chat/completions", self.url))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        let cache = r
            .headers()
            .get("x-kiln-cache")
            .map(|v| v.to_str().unwrap().to_string());
        let text = r.text().await.unwrap();
        let body: Vec<Value> = if body["stream"] == json!(true) {
            text.lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter(|d| *d != "[DONE]")
                .map(|d| serde_json::from_str(d).unwrap())
                .collect()
        } else {
            vec![serde_json::from_str(&text).unwrap()]
        };
        Answer {
            id: body[0]["id"].as_str().unwrap().to_string(),
            request_id,
            cache,
            body,
        }
    }

    /// `POST /v1/feedback` with `key` (none: no Authorization); the status and the JSON body.
    async fn feedback(&self, key: Option<&str>, body: &Value) -> (u16, Value) {
        let mut req = self
            .client
            .post(format!("{}/v1/feedback", self.url))
            .json(body);
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        let r = req.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    /// A dashboard request with `key`; the status and the JSON body.
    async fn dashboard(&self, key: Option<&str>, path: &str, body: Option<&Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.url);
        let mut req = match body {
            Some(b) => self.client.post(url).json(b),
            None => self.client.get(url),
        };
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        let r = req.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    fn store(&self) -> &Store {
        self.state.store()
    }

    /// Every trace and content row written so far.
    async fn settle(&self) {
        self.state.settle(Duration::from_secs(10)).await;
    }

    /// The feedback kept on `request_id`, oldest first.
    async fn feedback_on(&self, request_id: &str) -> Vec<Feedback> {
        self.store()
            .feedback(self.started, 10_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|f| f.request_id == request_id)
            .collect()
    }
}

fn assert_error(status: u16, body: &Value, want_status: u16, code: &str, param: Option<&str>) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(body["error"]["param"].as_str(), param, "{body}");
}

#[tokio::test]
async fn completion_ids_and_choices_are_recorded_for_replies_streams_and_cache_hits() {
    let gw = start(None, "").await;
    let whole = gw.chat(ALICE, &chat("whole", json!({}))).await;
    assert_eq!(whole.cache.as_deref(), Some("miss"));
    let hit = gw.chat(ALICE, &chat("whole", json!({}))).await;
    assert_eq!(hit.cache.as_deref(), Some("hit"));
    assert_eq!(hit.id, whole.id, "a cache hit repeats the reply");
    let streamed = gw
        .chat(ALICE, &chat("streamed", json!({"stream": true})))
        .await;
    let two = gw.chat(ALICE, &chat("two", json!({"n": 2}))).await;
    let two_streamed = gw
        .chat(
            ALICE,
            &chat("two streamed", json!({"n": 2, "stream": true})),
        )
        .await;
    let two_hit = gw.chat(ALICE, &chat("two", json!({"n": 2}))).await;
    assert_eq!(two_hit.cache.as_deref(), Some("hit"));
    gw.settle().await;

    let store = gw.store();
    for (what, answer) in [
        ("whole", &whole),
        ("cache hit", &hit),
        ("stream", &streamed),
        ("n=2", &two),
        ("n=2 stream", &two_streamed),
        ("n=2 cache hit", &two_hit),
    ] {
        let traces = store.find_completion(&answer.request_id).await.unwrap();
        assert_eq!(traces.len(), 1, "{what}");
        assert_eq!(
            traces[0].completion_id.as_deref(),
            Some(answer.id.as_str()),
            "{what}"
        );
        let content = store.content(&answer.request_id).await.unwrap().unwrap();
        assert_eq!(
            content.completion_id.as_deref(),
            Some(answer.id.as_str()),
            "{what}"
        );
    }
    // The reply's id names both the original and the cache hit, newest first.
    let by_id = store.find_completion(&whole.id).await.unwrap();
    let ids: Vec<&str> = by_id.iter().map(|c| c.request_id.as_str()).collect();
    assert_eq!(ids, [hit.request_id.as_str(), whole.request_id.as_str()]);

    // One choice: no `choices`; two: both, whole, streamed (interleaved) or from the cache.
    let content = store.content(&whole.request_id).await.unwrap().unwrap();
    assert!(content.choices.is_empty());
    assert_eq!(content.completion.as_deref(), Some("reply 0.0 to: whole"));
    let texts = |answer: &Answer| -> Vec<String> {
        answer.body[0]["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["message"]["content"].as_str().unwrap().to_string())
            .collect()
    };
    let want = texts(&two);
    assert_eq!(want.len(), 2);
    assert_ne!(want[0], want[1]);
    for answer in [&two, &two_hit] {
        let content = store.content(&answer.request_id).await.unwrap().unwrap();
        assert_eq!(content.choices, want);
        assert_eq!(content.completion.as_deref(), Some(want[0].as_str()));
    }
    let content = store
        .content(&two_streamed.request_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        content.choices,
        ["reply 3.0 to: two streamed", "reply 3.1 to: two streamed"]
    );
    assert_eq!(
        content.completion.as_deref(),
        Some("reply 3.0 to: two streamed")
    );
    let content = store.content(&streamed.request_id).await.unwrap().unwrap();
    assert!(content.choices.is_empty());
    assert_eq!(
        content.completion.as_deref(),
        Some("reply 1.0 to: streamed")
    );
}

#[tokio::test]
async fn every_signal_is_kept_as_given_by_reply_id_or_request_id() {
    let gw = start(None, "").await;
    // Feedback right after the reply, before its trace is in the store.
    let a = gw.chat(ALICE, &chat("first", json!({}))).await;
    let (status, body) = gw
        .feedback(Some(ALICE), &json!({"completion_id": a.id, "thumbs": "up"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "feedback");
    assert_eq!(body["completion_id"], a.id.as_str());
    assert_eq!(body["request_id"], a.request_id.as_str());
    let first_id = body["id"].as_str().unwrap().to_string();
    assert!(first_id.starts_with("fb-"), "{first_id}");

    // By the gateway's request id, every other signal, alone and together.
    let two = gw.chat(ALICE, &chat("second", json!({"n": 2}))).await;
    gw.settle().await;
    for body in [
        json!({"completion_id": two.request_id, "thumbs": "down"}),
        json!({"completion_id": two.id, "score": 0.25}),
        json!({"completion_id": two.id, "correction": "A better reply."}),
        json!({"completion_id": two.id, "preferred_index": 1}),
        json!({"completion_id": two.request_id, "thumbs": "up", "score": -3, "correction": "Best.", "preferred_index": 0}),
    ] {
        let (status, reply) = gw.feedback(Some(ALICE), &body).await;
        assert_eq!(status, 200, "{body}: {reply}");
        assert_eq!(reply["request_id"], two.request_id.as_str());
        assert_eq!(reply["completion_id"], body["completion_id"]);
    }

    let kept = gw.feedback_on(&a.request_id).await;
    assert_eq!(kept.len(), 1);
    let f = &kept[0];
    assert_eq!(f.feedback_id, first_id);
    assert_eq!(f.completion_id.as_deref(), Some(a.id.as_str()));
    assert_eq!((f.tenant.as_str(), f.source.as_str()), ("acme", "api"));
    assert!(f.key_id.starts_with("key:"), "{}", f.key_id);
    assert_eq!(f.thumbs, Some(Thumbs::Up));
    assert_eq!(
        (f.score, &f.correction, f.preferred_index),
        (None, &None, None)
    );
    assert!(!f.no_train);

    let kept = gw.feedback_on(&two.request_id).await;
    let got: Vec<_> = kept
        .iter()
        .map(|f| {
            (
                f.thumbs,
                f.score,
                f.correction.as_deref(),
                f.preferred_index,
                f.compared_with.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (Some(Thumbs::Down), None, None, None, None),
            (None, Some(0.25), None, None, None),
            (None, None, Some("A better reply."), None, None),
            (None, None, None, Some(1), None),
            (Some(Thumbs::Up), Some(-3.0), Some("Best."), Some(0), None),
        ]
    );
    for f in &kept {
        assert_eq!(f.completion_id.as_deref(), Some(two.id.as_str()));
        assert_eq!(f.key_id, kept[0].key_id);
    }

    let metrics = gw
        .client
        .get(format!("{}/metrics", gw.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (kind, n) in [
        ("thumbs_up", 2),
        ("thumbs_down", 1),
        ("score", 2),
        ("correction", 2),
        ("preferred", 2),
    ] {
        let line = format!("kiln_gateway_feedback_total{{kind=\"{kind}\"}} {n}");
        assert!(metrics.contains(&line), "no `{line}` in:\n{metrics}");
    }
}

#[tokio::test]
async fn refusals_name_the_problem_and_keep_nothing() {
    let gw = start(None, "validation:\n  max_body_bytes: 4096\n").await;
    let a = gw.chat(ALICE, &chat("mine", json!({}))).await;
    gw.settle().await;

    // Someone else's completion reads exactly like an unknown one.
    let (status, other) = gw
        .feedback(Some(BOB), &json!({"completion_id": a.id, "thumbs": "up"}))
        .await;
    assert_error(
        status,
        &other,
        404,
        "completion_not_found",
        Some("completion_id"),
    );
    let (status, unknown) = gw
        .feedback(
            Some(ALICE),
            &json!({"completion_id": "chatcmpl-nobody", "thumbs": "up"}),
        )
        .await;
    assert_error(
        status,
        &unknown,
        404,
        "completion_not_found",
        Some("completion_id"),
    );
    assert_eq!(
        other["error"]["message"]
            .as_str()
            .unwrap()
            .replace(&a.id, "ID"),
        unknown["error"]["message"]
            .as_str()
            .unwrap()
            .replace("chatcmpl-nobody", "ID")
    );

    let (status, body) = gw
        .feedback(None, &json!({"completion_id": a.id, "thumbs": "up"}))
        .await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = gw
        .feedback(
            Some("sk-wrong"),
            &json!({"completion_id": a.id, "thumbs": "up"}),
        )
        .await;
    assert_eq!(status, 401, "{body}");

    let (status, body) = gw
        .feedback(Some(ALICE), &json!({"completion_id": a.id}))
        .await;
    assert_error(status, &body, 400, "missing_signal", None);
    let message = body["error"]["message"].as_str().unwrap();
    for field in ["thumbs", "score", "correction", "preferred_index"] {
        assert!(message.contains(field), "{message}");
    }
    for (body, code, param) in [
        (
            json!({"completion_id": a.id, "thumbs": "meh"}),
            "invalid_value",
            "thumbs",
        ),
        (
            json!({"completion_id": a.id, "score": "10"}),
            "invalid_type",
            "score",
        ),
        (
            json!({"completion_id": a.id, "correction": ""}),
            "invalid_value",
            "correction",
        ),
        (
            json!({"completion_id": a.id, "preferred_index": -1}),
            "invalid_value",
            "preferred_index",
        ),
        // The reply had one choice.
        (
            json!({"completion_id": a.id, "preferred_index": 1}),
            "invalid_value",
            "preferred_index",
        ),
        (
            json!({"completion_id": a.id, "thumbs": "up", "comment": "nice"}),
            "unknown_field",
            "comment",
        ),
        (json!({"thumbs": "up"}), "missing_field", "completion_id"),
    ] {
        let (status, reply) = gw.feedback(Some(ALICE), &body).await;
        assert_error(status, &reply, 400, code, Some(param));
        assert_eq!(reply["error"]["type"], "invalid_request_error");
    }
    let (status, body) = gw
        .feedback(
            Some(ALICE),
            &json!({"completion_id": a.id, "correction": "x".repeat(5000)}),
        )
        .await;
    assert_error(status, &body, 413, "request_too_large", Some("body"));

    assert!(gw.feedback_on(&a.request_id).await.is_empty());
    // The route is listed for a wrong path.
    let r = gw
        .client
        .get(format!("{}/v1/feedbacks", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("POST /v1/feedback"));
}

#[tokio::test]
async fn corrections_are_scrubbed_before_they_are_kept() {
    let gw = start(None, "").await;
    let a = gw.chat(ALICE, &chat("contact", json!({}))).await;
    let correction = "Write to jane.doe@example.com or call me at +1 415 555 0134 tomorrow.";
    let (status, body) = gw
        .feedback(
            Some(ALICE),
            &json!({"completion_id": a.id, "correction": correction}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let kept = gw.feedback_on(&a.request_id).await;
    let stored = kept[0].correction.as_deref().unwrap();
    assert!(!stored.contains("jane.doe@example.com"), "{stored}");
    assert!(!stored.contains("555 0134"), "{stored}");
    assert!(
        stored.contains("<EMAIL_1>") && stored.contains("<PHONE_1>"),
        "{stored}"
    );
    assert!(stored.starts_with("Write to ") && stored.ends_with(" tomorrow."));
}

#[tokio::test]
async fn no_train_feedback_is_kept_but_never_exported() {
    let gw = start(None, "").await;
    let private = gw.chat(PRIVATE, &chat("secret", json!({}))).await;
    let public = gw.chat(ALICE, &chat("open", json!({}))).await;
    for (key, answer) in [(PRIVATE, &private), (ALICE, &public)] {
        let (status, body) = gw
            .feedback(
                Some(key),
                &json!({"completion_id": answer.id, "thumbs": "down", "correction": "Better."}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let kept = gw.feedback_on(&private.request_id).await;
    assert_eq!(kept.len(), 1);
    assert!(kept[0].no_train);
    assert_eq!(kept[0].tenant, "private");
    let export = gw
        .store()
        .feedback_for_export(SystemTime::UNIX_EPOCH)
        .await
        .unwrap();
    let exported: Vec<&str> = export
        .items
        .iter()
        .map(|i| i.feedback.request_id.as_str())
        .collect();
    assert_eq!(exported, [public.request_id.as_str()]);
    assert_eq!(export.excluded_no_train, 1);
}

#[tokio::test]
async fn the_labelling_queue_offers_pairs_and_keeps_verdicts() {
    let gw = start(None, "").await;
    // Denied without the dashboard key; the page itself is served with its CSP.
    let (status, body) = gw.dashboard(None, "/dashboard/label/next", None).await;
    assert_eq!(status, 401, "{body}");
    let verdict = json!({"winner": {"request_id": "x", "index": null}, "loser": {"request_id": "y", "index": null}});
    let (status, body) = gw.dashboard(None, "/dashboard/label", Some(&verdict)).await;
    assert_eq!(status, 401, "{body}");
    let page = gw
        .client
        .get(format!("{}/dashboard/label", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(
        page.headers()["content-security-policy"],
        kiln_monitor::dashboard::LABEL_CONTENT_SECURITY_POLICY
    );
    assert!(page.text().await.unwrap().contains("A is better"));

    // Two choices of one request; the same prompt answered twice, differently (sampled: not
    // cached); and a no_train request, never offered.
    let two = gw
        .chat(
            ALICE,
            &chat("pick one", json!({"n": 2, "temperature": 0.8})),
        )
        .await;
    let first = gw
        .chat(ALICE, &chat("same prompt", json!({"temperature": 0.8})))
        .await;
    let second = gw
        .chat(BOB, &chat("same prompt", json!({"temperature": 0.8})))
        .await;
    gw.chat(
        PRIVATE,
        &chat("private", json!({"n": 2, "temperature": 0.8})),
    )
    .await;
    gw.settle().await;

    let (status, queue) = gw
        .dashboard(Some(DASHBOARD_KEY), "/dashboard/label/next", None)
        .await;
    assert_eq!(status, 200, "{queue}");
    assert_eq!(queue["object"], "list");
    let items = queue["data"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{queue}");
    let choices = items
        .iter()
        .find(|i| i["a"]["request_id"] == two.request_id.as_str())
        .unwrap();
    assert_eq!(choices["b"]["request_id"], two.request_id.as_str());
    assert_eq!(
        (
            choices["a"]["index"].as_u64(),
            choices["b"]["index"].as_u64()
        ),
        (Some(0), Some(1))
    );
    assert_eq!(choices["tenant"], "acme");
    assert_eq!(
        serde_json::from_str::<Value>(choices["prompt"].as_str().unwrap()).unwrap()[0]["content"],
        "pick one"
    );
    assert_eq!(choices["b"]["completion_id"], two.id.as_str());
    let pair = items
        .iter()
        .find(|i| i["a"]["request_id"] != i["b"]["request_id"])
        .unwrap();
    let mut ids = [
        pair["a"]["request_id"].as_str().unwrap(),
        pair["b"]["request_id"].as_str().unwrap(),
    ];
    ids.sort();
    let mut want = [first.request_id.as_str(), second.request_id.as_str()];
    want.sort();
    assert_eq!(ids, want);
    assert!(pair["a"]["index"].is_null());
    let (status, one) = gw
        .dashboard(Some(DASHBOARD_KEY), "/dashboard/label/next?limit=1", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(one["data"].as_array().unwrap().len(), 1);
    let (status, body) = gw
        .dashboard(
            Some(DASHBOARD_KEY),
            "/dashboard/label/next?limit=many",
            None,
        )
        .await;
    assert_error(status, &body, 400, "invalid_value", Some("limit"));

    // Verdicts: choice 1 over choice 0 with an edit; the second request over the first.
    let (status, body) = gw
        .dashboard(
            Some(DASHBOARD_KEY),
            "/dashboard/label",
            Some(&json!({
                "winner": {"request_id": two.request_id, "index": 1},
                "loser": {"request_id": two.request_id, "index": 0},
                "correction": "Edited, mail me at jane.doe@example.com",
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "feedback");
    assert!(body["id"].as_str().unwrap().starts_with("fb-"));
    let kept = gw.feedback_on(&two.request_id).await;
    assert_eq!(kept.len(), 1);
    let f = &kept[0];
    assert_eq!(
        (f.source.as_str(), f.key_id.as_str()),
        ("label", "dashboard")
    );
    assert_eq!(f.tenant, "acme");
    assert_eq!(f.preferred_index, Some(1));
    assert_eq!(f.compared_with, None);
    assert_eq!(f.completion_id.as_deref(), Some(two.id.as_str()));
    assert_eq!(
        f.correction.as_deref(),
        Some("Edited, mail me at <EMAIL_1>")
    );
    assert!(!f.no_train);
    let (status, body) = gw
        .dashboard(
            Some(DASHBOARD_KEY),
            "/dashboard/label",
            Some(&json!({
                "winner": {"request_id": second.request_id, "index": null},
                "loser": {"request_id": first.request_id, "index": null},
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let kept = gw.feedback_on(&second.request_id).await;
    assert_eq!(kept.len(), 1);
    assert_eq!(
        kept[0].compared_with.as_deref(),
        Some(first.request_id.as_str())
    );
    assert_eq!(
        (kept[0].preferred_index, &kept[0].correction),
        (None, &None)
    );

    // Both items are done.
    let (_, queue) = gw
        .dashboard(Some(DASHBOARD_KEY), "/dashboard/label/next", None)
        .await;
    assert_eq!(queue["data"], json!([]), "{queue}");

    // Mistakes: no captured content, a choice that does not exist, the same choice twice.
    for (verdict, status, code, param) in [
        (
            json!({"winner": {"request_id": "kgw-none", "index": null}, "loser": {"request_id": first.request_id, "index": null}}),
            404,
            "content_not_found",
            "winner.request_id",
        ),
        (
            json!({"winner": {"request_id": two.request_id, "index": 2}, "loser": {"request_id": two.request_id, "index": 0}}),
            400,
            "invalid_value",
            "winner.index",
        ),
        (
            json!({"winner": {"request_id": two.request_id, "index": 0}, "loser": {"request_id": two.request_id, "index": 0}}),
            400,
            "invalid_value",
            "loser.index",
        ),
        (
            json!({"winner": {"request_id": two.request_id, "index": 0}}),
            400,
            "missing_field",
            "loser",
        ),
    ] {
        let (got, body) = gw
            .dashboard(Some(DASHBOARD_KEY), "/dashboard/label", Some(&verdict))
            .await;
        assert_error(got, &body, status, code, Some(param));
    }
    assert_eq!(gw.feedback_on(&two.request_id).await.len(), 1);
}

#[tokio::test]
async fn postgres_feedback_is_only_for_the_callers_own_completions() {
    let gw = start(Some(postgres_url()), "").await;
    let a = gw.chat(ALICE, &chat("postgres", json!({"n": 2}))).await;
    let (status, body) = gw
        .feedback(Some(BOB), &json!({"completion_id": a.id, "thumbs": "up"}))
        .await;
    assert_error(
        status,
        &body,
        404,
        "completion_not_found",
        Some("completion_id"),
    );
    let (status, body) = gw
        .feedback(
            Some(ALICE),
            &json!({"completion_id": a.id, "preferred_index": 1, "score": 4.5}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["request_id"], a.request_id.as_str());
    let kept = gw.feedback_on(&a.request_id).await;
    assert_eq!(kept.len(), 1);
    assert_eq!(
        (kept[0].preferred_index, kept[0].score),
        (Some(1), Some(4.5))
    );
    let (status, body) = gw
        .feedback(
            Some(ALICE),
            &json!({"completion_id": a.id, "preferred_index": 2}),
        )
        .await;
    assert_error(status, &body, 400, "invalid_value", Some("preferred_index"));
}
