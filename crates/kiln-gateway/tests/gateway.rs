//! The gateway over real bound ports: a small OpenAI-compatible stub upstream (with a
//! configurable delay, pauses between stream chunks, and failure modes) behind a gateway built
//! from YAML, driven with reqwest; and one test through the real `kiln serve`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use kiln_gateway::config::GatewayConfig;
use kiln_gateway::server::{BuildOptions, Gateway, GatewayHandle};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// How the stub behaves; changed by tests while it runs.
#[derive(Default)]
struct StubControl {
    /// Chat requests received.
    hits: AtomicUsize,
    /// Answer this many requests with 503 first.
    fail_first: AtomicUsize,
    /// Wait before answering (ms).
    delay_ms: AtomicU64,
    /// Wait between stream chunks (ms).
    chunk_delay_ms: AtomicU64,
}

struct Stub {
    addr: SocketAddr,
    control: Arc<StubControl>,
    stop: Option<oneshot::Sender<()>>,
}

impl Stub {
    fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn hits(&self) -> usize {
        self.control.hits.load(Ordering::SeqCst)
    }

    /// Stops it gracefully (idle keep-alive connections are closed).
    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

const CHUNKS: usize = 5;

async fn stub_chat(control: Arc<StubControl>, body: Value) -> Response {
    control.hits.fetch_add(1, Ordering::SeqCst);
    let fail = control
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if fail {
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "busy").into_response();
    }
    let delay = control.delay_ms.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    let model = body["model"].as_str().unwrap_or("?").to_string();
    let prompt: String = body["messages"][0]["content"]
        .as_str()
        .unwrap_or("")
        .to_string();
    if body["stream"] == json!(true) {
        let usage = body["stream_options"]["include_usage"] == json!(true);
        let pause = Duration::from_millis(control.chunk_delay_ms.load(Ordering::SeqCst));
        let stream = futures_util::stream::unfold(0usize, move |i| {
            let model = model.clone();
            async move {
                if i > CHUNKS + 2 {
                    return None;
                }
                if i > 0 && i <= CHUNKS {
                    tokio::time::sleep(pause).await;
                }
                let event = if i < CHUNKS {
                    let chunk = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model,
                        "choices": [{"index": 0, "delta": {"content": format!("tok{i} ")}, "finish_reason": null}]});
                    format!("data: {chunk}\n\n")
                } else if i == CHUNKS {
                    let chunk = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model,
                        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
                    format!("data: {chunk}\n\n")
                } else if i == CHUNKS + 1 {
                    if usage {
                        let chunk = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model,
                            "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": CHUNKS, "total_tokens": 7 + CHUNKS}});
                        format!("data: {chunk}\n\n")
                    } else {
                        String::new()
                    }
                } else {
                    "data: [DONE]\n\n".to_string()
                };
                Some((Ok::<_, std::io::Error>(event), i + 1))
            }
        });
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(stream))
            .unwrap();
    }
    Json(json!({
        "id": "c1", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("echo: {prompt}")}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    }))
    .into_response()
}

async fn start_stub() -> Stub {
    let control = Arc::new(StubControl::default());
    let c = control.clone();
    let app = Router::new()
        .route(
            "/v1/models",
            get(|| async {
                Json(json!({"object": "list", "data": [{"id": "stub-model"}, {"id": "other-model"}]}))
            }),
        )
        .route(
            "/v1/chat/completions",
            post(move |Json(body): Json<Value>| stub_chat(c.clone(), body)),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Stub {
        addr,
        control,
        stop: Some(stop),
    }
}

/// An address nothing listens on.
async fn dead_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/v1")
}

const ALICE: &str = "sk-test-alice";
const BOB: &str = "sk-test-bob";

/// The YAML of a gateway on port 0 over `upstreams` (already YAML list items), with Alice (any
/// model) and Bob (`stub-model` only), `extra` appended.
fn config(dir: &Path, upstreams: &str, extra: &str) -> GatewayConfig {
    let yaml = format!(
        "listen: 127.0.0.1:0
upstreams:
{upstreams}
auth:
  api_keys:
    - key: {ALICE}
      tenant: alice
    - key_sha256: {bob_hash}
      tenant: bob
      models: [stub-model]
store:
  url: sqlite://{db}
{extra}",
        bob_hash = sha256_hex(BOB),
        db = dir.join("gateway.db").display(),
    );
    GatewayConfig::parse(&yaml, Path::new("test.yaml")).unwrap()
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn upstream(name: &str, url: &str, models: &str, timeout_s: f64) -> String {
    format!("  - name: {name}\n    url: {url}\n    models: {models}\n    timeout_s: {timeout_s}\n")
}

struct Running {
    url: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn start_gateway_with(upstreams: &str, extra: &str, health_interval: Duration) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), upstreams, extra);
    let gateway = Gateway::bind_with(
        cfg,
        BuildOptions {
            health_interval,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let url = format!("http://{}", gateway.local_addr());
    tokio::spawn(gateway.run(std::future::pending()));
    Running {
        url,
        client: reqwest::Client::new(),
        _dir: dir,
    }
}

async fn start_gateway(stub: &Stub, extra: &str) -> Running {
    start_gateway_with(
        &upstream("stub", &stub.url(), "[\"*\"]", 5.0),
        extra,
        Duration::from_secs(30),
    )
    .await
}

fn chat(model: &str, content: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0})
}

impl Running {
    async fn post(&self, key: Option<&str>, body: &Value) -> reqwest::Response {
        self.post_with(key, body, &[]).await
    }

    async fn post_with(
        &self,
        key: Option<&str>,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut req = self
            .client
            .post(format!("{}/v1/chat/completions", self.url))
            .json(body);
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }

    async fn post_raw(&self, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/chat/completions", self.url))
            .bearer_auth(ALICE)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
    }

    async fn get(&self, path: &str, key: Option<&str>) -> reqwest::Response {
        let mut req = self.client.get(format!("{}{path}", self.url));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        req.send().await.unwrap()
    }
}

async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    (status, body["error"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_need_a_valid_key() {
    let stub = start_stub().await;
    let gw = start_gateway(&stub, "").await;
    let missing = gw.post(None, &chat("stub-model", "hi")).await;
    assert_eq!(missing.status(), 401);
    assert!(missing.headers().contains_key("www-authenticate"));
    let wrong = gw.post(Some("sk-wrong"), &chat("stub-model", "hi")).await;
    assert_eq!(wrong.status(), 401);
    assert_eq!(stub.hits(), 0, "refused requests never reach the upstream");

    let ok = gw.post(Some(ALICE), &chat("stub-model", "hi")).await;
    assert_eq!(ok.status(), 200);
    let body: Value = ok.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "echo: hi");
    // Bob's key is configured by its hash.
    let ok = gw.post(Some(BOB), &chat("stub-model", "hello")).await;
    assert_eq!(ok.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_outside_the_key_or_the_upstreams_are_refused() {
    let stub = start_stub().await;
    let gw = start_gateway_with(
        &upstream("stub", &stub.url(), "[stub-model, other-model]", 5.0),
        "",
        Duration::from_secs(30),
    )
    .await;
    let (status, error) = error_of(gw.post(Some(BOB), &chat("other-model", "hi")).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (403, Some("model_not_allowed"))
    );
    let (status, error) = error_of(gw.post(Some(ALICE), &chat("no-such-model", "hi")).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (404, Some("model_not_found"))
    );
    assert_eq!(error["param"], "model");
    assert_eq!(stub.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_list_is_filtered_by_the_key() {
    let stub = start_stub().await;
    let gw = start_gateway(&stub, "").await;
    let ids = |body: Value| -> Vec<String> {
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let all = gw.get("/v1/models", Some(ALICE)).await;
    assert_eq!(all.status(), 200);
    assert_eq!(
        ids(all.json().await.unwrap()),
        ["stub-model", "other-model"]
    );
    let bob = gw.get("/v1/models", Some(BOB)).await.json().await.unwrap();
    assert_eq!(ids(bob), ["stub-model"]);
    assert_eq!(gw.get("/v1/models", None).await.status(), 401);
    let (status, error) = error_of(gw.get("/v1/nothing", Some(ALICE)).await).await;
    assert_eq!((status, error["code"].as_str()), (404, Some("not_found")));
}

/// Reads a streamed reply, noting when each network chunk arrived.
async fn read_stream(response: reqwest::Response) -> (String, Vec<Duration>) {
    let start = Instant::now();
    let mut text = String::new();
    let mut arrivals = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        arrivals.push(start.elapsed());
    }
    (text, arrivals)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_pass_through_as_they_arrive() {
    let stub = start_stub().await;
    stub.control.chunk_delay_ms.store(150, Ordering::SeqCst);
    let gw = start_gateway(&stub, "").await;
    let mut body = chat("stub-model", "stream please");
    body["stream"] = json!(true);
    body["temperature"] = json!(0.7); // not cacheable
    let response = gw.post(Some(ALICE), &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    assert!(!response.headers().contains_key("x-kiln-cache"));
    let (text, arrivals) = read_stream(response).await;
    // The stub pauses 150 ms before each of its chunks: the first must arrive long before the
    // last, i.e. nothing is buffered.
    let first = arrivals[0];
    let last = *arrivals.last().unwrap();
    assert!(arrivals.len() >= 3, "{arrivals:?}");
    assert!(
        last.saturating_sub(first) >= Duration::from_millis(500),
        "first {first:?}, last {last:?}"
    );
    for i in 0..CHUNKS {
        assert!(text.contains(&format!("tok{i} ")), "{text}");
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_is_retried_then_succeeds() {
    let stub = start_stub().await;
    stub.control.fail_first.store(2, Ordering::SeqCst);
    let gw = start_gateway(&stub, "").await;
    let response = gw.post(Some(ALICE), &chat("stub-model", "retry")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(stub.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_to_the_next_upstream_and_reports_unavailable() {
    let stub = start_stub().await;
    let dead = dead_url().await;
    let upstreams = format!(
        "{}{}",
        upstream("dead", &dead, "[\"*\"]", 5.0),
        upstream("stub", &stub.url(), "[\"*\"]", 5.0)
    );
    let gw = start_gateway_with(&upstreams, "", Duration::from_secs(30)).await;
    for i in 0..3 {
        let response = gw
            .post(Some(ALICE), &chat("stub-model", &format!("failover {i}")))
            .await;
        assert_eq!(response.status(), 200);
    }
    assert_eq!(stub.hits(), 3);
    // Out of rotation, by the first health check or by the failed attempts.
    let health: Value = gw.get("/health", None).await.json().await.unwrap();
    assert_eq!(health["upstreams"][0]["healthy"], false, "{health}");
    assert_eq!(health["upstreams"][1]["healthy"], true, "{health}");

    // Only dead upstreams: 502 upstream_unavailable.
    let gw = start_gateway_with(
        &upstream("dead", &dead, "[\"*\"]", 5.0),
        "",
        Duration::from_secs(30),
    )
    .await;
    let (status, error) = error_of(gw.post(Some(ALICE), &chat("stub-model", "x")).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (502, Some("upstream_unavailable"))
    );
    // Tried anyway, out of rotation or not, with retries.
    let metrics = gw.get("/metrics", None).await.text().await.unwrap();
    let connect_errors = metrics
        .lines()
        .find(|l| l.starts_with("kiln_gateway_upstream_errors_total") && l.contains("connect"))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(connect_errors.ends_with(" 3"), "{connect_errors}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_take_a_dead_upstream_out_of_rotation() {
    let mut first = start_stub().await;
    let second = start_stub().await;
    let upstreams = format!(
        "{}{}",
        upstream("first", &first.url(), "[\"*\"]", 5.0),
        upstream("second", &second.url(), "[\"*\"]", 5.0)
    );
    let gw = start_gateway_with(&upstreams, "", Duration::from_millis(100)).await;
    let healthy = |body: &Value, i: usize| body["upstreams"][i]["healthy"].as_bool().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let health: Value = gw.get("/health", None).await.json().await.unwrap();
    assert!(healthy(&health, 0) && healthy(&health, 1), "{health}");

    first.stop();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let health: Value = gw.get("/health", None).await.json().await.unwrap();
        if !healthy(&health, 0) {
            assert!(healthy(&health, 1), "{health}");
            break;
        }
        assert!(Instant::now() < deadline, "still healthy: {health}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every request now goes to the second upstream, without retries against the first.
    for i in 0..4 {
        let started = Instant::now();
        let response = gw
            .post(Some(ALICE), &chat("stub-model", &format!("rotation {i}")))
            .await;
        assert_eq!(response.status(), 200);
        assert!(started.elapsed() < Duration::from_millis(100));
    }
    assert_eq!(second.hits(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_times_out_with_504() {
    let stub = start_stub().await;
    stub.control.delay_ms.store(2_000, Ordering::SeqCst);
    let gw = start_gateway_with(
        &upstream("slow", &stub.url(), "[\"*\"]", 0.3),
        "",
        Duration::from_secs(30),
    )
    .await;
    let started = Instant::now();
    let (status, error) = error_of(gw.post(Some(ALICE), &chat("stub-model", "x")).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (504, Some("upstream_timeout"))
    );
    assert!(started.elapsed() < Duration::from_millis(1_500));
    assert_eq!(stub.hits(), 1, "a timeout is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_refused_naming_the_field() {
    let stub = start_stub().await;
    let gw = start_gateway(
        &stub,
        "validation:\n  max_body_bytes: 2000\n  max_messages: 2\n  max_prompt_tokens: 50\n",
    )
    .await;
    let (status, error) = error_of(gw.post_raw("{\"model\": \"stub-model\", ").await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("invalid_json"))
    );

    let wrong_type = json!({"model": "stub-model", "messages": [{"role": "user", "content": 42}]});
    let (status, error) = error_of(gw.post(Some(ALICE), &wrong_type).await).await;
    assert_eq!(status, 400);
    assert_eq!(error["param"], "messages[0].content");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("messages[0].content")
    );

    let wrong_type = json!({"model": "stub-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"});
    let (_, error) = error_of(gw.post(Some(ALICE), &wrong_type).await).await;
    assert_eq!(error["param"], "max_tokens");

    let msg = json!({"role": "user", "content": "x"});
    let many = json!({"model": "stub-model", "messages": [msg, msg, msg]});
    let (status, error) = error_of(gw.post(Some(ALICE), &many).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("too_many_messages"))
    );

    let long = chat("stub-model", &"word ".repeat(60));
    let (status, error) = error_of(gw.post(Some(ALICE), &long).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("context_length_exceeded"))
    );
    assert_eq!(error["param"], "messages");

    let huge = chat("stub-model", &"x".repeat(5_000));
    let (status, error) = error_of(gw.post(Some(ALICE), &huge).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (413, Some("request_too_large"))
    );

    let (status, error) = error_of(gw.post_raw(vec![b'{', 0xff, b'}']).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("invalid_utf8"))
    );
    assert_eq!(stub.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deterministic_requests_are_cached_and_replayed_as_streams() {
    let stub = start_stub().await;
    let gw = start_gateway(&stub, "").await;
    let body = chat("stub-model", "cache me");
    let first = gw.post(Some(ALICE), &body).await;
    assert_eq!(first.headers()["x-kiln-cache"], "miss");
    let first: Value = first.json().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = gw.post(Some(ALICE), &body).await;
    assert_eq!(second.headers()["x-kiln-cache"], "hit");
    assert_eq!(second.json::<Value>().await.unwrap(), first);
    assert_eq!(stub.hits(), 1, "the hit did not reach the upstream");

    // Other tenants have their own entries.
    let bob = gw.post(Some(BOB), &body).await;
    assert_eq!(bob.headers()["x-kiln-cache"], "miss");
    assert_eq!(stub.hits(), 2);

    // The same request streamed is replayed from the cache as SSE.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let hit = gw.post(Some(ALICE), &streamed).await;
    assert_eq!(hit.headers()["x-kiln-cache"], "hit");
    assert_eq!(hit.headers()["content-type"], "text/event-stream");
    let (text, _) = read_stream(hit).await;
    assert!(text.contains("echo: cache me"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(stub.hits(), 2);

    // A streamed miss is assembled and cached too.
    let mut fresh = chat("stub-model", "stream then cache");
    fresh["stream"] = json!(true);
    let miss = gw.post(Some(ALICE), &fresh).await;
    assert_eq!(miss.headers()["x-kiln-cache"], "miss");
    let _ = read_stream(miss).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    fresh["stream"] = json!(false);
    let hit = gw.post(Some(ALICE), &fresh).await;
    assert_eq!(hit.headers()["x-kiln-cache"], "hit");
    let hit: Value = hit.json().await.unwrap();
    assert_eq!(
        hit["choices"][0]["message"]["content"],
        "tok0 tok1 tok2 tok3 tok4 "
    );
    assert_eq!(stub.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_control_no_store_and_no_cache_are_honoured() {
    let stub = start_stub().await;
    let gw = start_gateway(&stub, "").await;
    let body = chat("stub-model", "private");
    for _ in 0..2 {
        let r = gw
            .post_with(Some(ALICE), &body, &[("cache-control", "no-store")])
            .await;
        assert_eq!(r.headers()["x-kiln-cache"], "bypass");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(stub.hits(), 2);
    // Nothing was stored: a plain request misses.
    let r = gw.post(Some(ALICE), &body).await;
    assert_eq!(r.headers()["x-kiln-cache"], "miss");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // no-cache skips the lookup (and stores).
    let r = gw
        .post_with(Some(ALICE), &body, &[("cache-control", "no-cache")])
        .await;
    assert_eq!(r.headers()["x-kiln-cache"], "miss");
    assert_eq!(stub.hits(), 4);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = gw.post(Some(ALICE), &body).await;
    assert_eq!(r.headers()["x-kiln-cache"], "hit");
    assert_eq!(stub.hits(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_rpm_limit_gets_429_with_headers() {
    let stub = start_stub().await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listen: 127.0.0.1:0
upstreams:
{}auth:
  api_keys:
    - key: sk-limited
      tenant: limited
      rpm: 3
cache:
  backend: none
store:
  url: sqlite://{}
",
        upstream("stub", &stub.url(), "[\"*\"]", 5.0),
        dir.path().join("g.db").display()
    );
    let cfg = GatewayConfig::parse(&yaml, Path::new("t.yaml")).unwrap();
    let gateway = Gateway::bind(cfg).await.unwrap();
    let url = format!("http://{}", gateway.local_addr());
    tokio::spawn(gateway.run(std::future::pending()));
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    let mut refused = None;
    for i in 0..5 {
        let r = client
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth("sk-limited")
            .json(&chat("stub-model", &format!("burst {i}")))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 200 {
            assert_eq!(r.headers()["x-ratelimit-limit-requests"], "3");
        } else if refused.is_none() {
            refused = Some(r);
        }
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    let refused = refused.unwrap();
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // A sliding window: the wait may reach into the next minute.
    assert!(
        (1..=120).contains(&retry_after),
        "Retry-After: {retry_after}"
    );
    assert_eq!(refused.headers()["x-ratelimit-remaining-requests"], "0");
    assert!(refused.headers().contains_key("x-ratelimit-reset-requests"));
    let (_, error) = error_of(refused).await;
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert_eq!(stub.hits(), 3);
    let metrics = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("kiln_gateway_rate_limited_total"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spending_the_budget_gets_429_budget_exceeded_and_metrics_show_cost() {
    let stub = start_stub().await;
    // The stub reports 10 prompt and 5 completion tokens: $0.10 + $0.10 a request.
    let gw = start_gateway(
        &stub,
        "cache:\n  backend: none
pricing:
  stub-model:
    input_per_million: 10000
    output_per_million: 20000
budgets:
  alice:
    budget_usd: 0.3
    period: day
",
    )
    .await;
    let mut statuses = Vec::new();
    for i in 0..3 {
        let r = gw
            .post(Some(ALICE), &chat("stub-model", &format!("spend {i}")))
            .await;
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            let (_, error) = error_of(r).await;
            assert_eq!(error["code"], "budget_exceeded");
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(statuses, [200, 200, 429]);
    // Bob has no budget.
    assert_eq!(
        gw.post(Some(BOB), &chat("stub-model", "free"))
            .await
            .status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(150)).await;

    let metrics = gw.get("/metrics", None).await.text().await.unwrap();
    for needle in [
        "kiln_gateway_requests_total",
        "model=\"stub-model\"",
        "tenant=\"alice\"",
        "kiln_gateway_tokens_total",
        "kiln_gateway_cost_usd_total",
        "kiln_gateway_overhead_seconds_bucket",
        "kiln_gateway_upstream_latency_seconds_bucket",
    ] {
        assert!(metrics.contains(needle), "{needle} missing:\n{metrics}");
    }
    let cost_line = metrics
        .lines()
        .find(|l| l.starts_with("kiln_gateway_cost_usd_total") && l.contains("alice"))
        .unwrap();
    let cost: f64 = cost_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((cost - 0.4).abs() < 1e-9, "{cost_line}");
}

/// `text` with the values of the per-request keys (`id`, `created`, and kiln serve's
/// `queue_ms` / `ttft_ms`) replaced by `_`, the rest byte for byte.
fn masked_values(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'scan: while !rest.is_empty() {
        for key in ["\"id\":", "\"created\":", "\"queue_ms\":", "\"ttft_ms\":"] {
            if let Some(after) = rest.strip_prefix(key) {
                out.push_str(key);
                out.push('_');
                let end = after.find([',', '}']).unwrap_or(after.len());
                rest = &after[end..];
                continue 'scan;
            }
        }
        let c = rest.chars().next().unwrap();
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The `data:` payloads of an SSE text with the per-request `id`, `created` and timings
/// removed.
fn normalized_events(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|data| {
            let mut v: Value = serde_json::from_str(data).unwrap_or(Value::String(data.into()));
            if let Some(o) = v.as_object_mut() {
                o.remove("id");
                o.remove("created");
                if let Some(choices) = o
                    .get_mut("kiln")
                    .and_then(|k| k.get_mut("choices"))
                    .and_then(Value::as_array_mut)
                {
                    for c in choices.iter_mut().filter_map(Value::as_object_mut) {
                        c.remove("queue_ms");
                        c.remove("ttft_ms");
                    }
                }
            }
            v
        })
        .collect()
}

#[test]
fn a_kiln_serve_stream_passes_through_unchanged() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/hf/llama");
    let options = kiln_serve::server::ServeOptions::new(model.to_string_lossy());
    let serve =
        kiln_serve::server::ServerHandle::start(&options, "127.0.0.1:0".parse().unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &upstream("kiln", &format!("{}/v1", serve.url()), "[llama]", 60.0),
        "",
    );
    let gateway = GatewayHandle::start(cfg).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let body = json!({"model": "llama", "prompt": "The model learns", "max_tokens": 8,
            "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
        let direct = client
            .post(format!("{}/v1/completions", serve.url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(direct.status(), 200);
        let (direct, _) = read_stream(direct).await;
        let via = client
            .post(format!("{}/v1/completions", gateway.url()))
            .bearer_auth(ALICE)
            .header("cache-control", "no-store")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(via.status(), 200);
        assert_eq!(via.headers()["content-type"], "text/event-stream");
        let (via, _) = read_stream(via).await;
        assert!(direct.ends_with("data: [DONE]\n\n"), "{direct}");
        assert_eq!(normalized_events(&via), normalized_events(&direct));
        // Byte for byte, apart from the id, the timestamp and kiln serve's timings.
        assert_eq!(masked_values(&via), masked_values(&direct));

        tokio::time::sleep(Duration::from_millis(200)).await;
        let metrics = client
            .get(format!("{}/metrics", gateway.url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(metrics.contains("kiln_gateway_tokens_total"), "{metrics}");
    });
    gateway.shutdown().unwrap();
    serve.shutdown().unwrap();
}

#[test]
fn the_documented_example_config_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/examples/gateway.yaml");
    let cfg = GatewayConfig::load(&path).unwrap();
    assert_eq!(cfg.listen, "127.0.0.1:8080");
    assert_eq!(cfg.upstreams[0].url, "http://127.0.0.1:8000/v1");
    assert_eq!(cfg.auth.api_keys.len(), 3);
    assert_eq!(
        cfg.auth.api_keys[1].key_sha256.as_deref(),
        Some(sha256_hex("sk-dev-carol").as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_tokens_are_counted_with_the_configured_tokenizer() {
    let stub = start_stub().await;
    let tokenizer = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/hf/llama");
    let gw = start_gateway(
        &stub,
        &format!(
            "validation:\n  max_prompt_tokens: 20\n  tokenizer: {}\n",
            tokenizer.display()
        ),
    )
    .await;
    // 60 bytes: 15 tokens at 4 bytes a token, but more with a real tokenizer (one per char
    // for this tiny vocabulary, or close).
    let text = "zq xv kj ".repeat(7);
    let (status, error) = error_of(gw.post(Some(ALICE), &chat("stub-model", &text)).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("context_length_exceeded"))
    );
    assert!(
        !error["message"].as_str().unwrap().contains("estimated"),
        "{error}"
    );
    assert_eq!(
        gw.post(Some(ALICE), &chat("stub-model", "hi"))
            .await
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_holds_its_concurrency_slot_until_it_ends() {
    let stub = start_stub().await;
    stub.control.chunk_delay_ms.store(100, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listen: 127.0.0.1:0
upstreams:
{}auth:
  api_keys:
    - key: sk-one-at-a-time
      tenant: solo
      max_concurrent: 1
store:
  url: sqlite://{}
",
        upstream("stub", &stub.url(), "[\"*\"]", 5.0),
        dir.path().join("g.db").display()
    );
    let cfg = GatewayConfig::parse(&yaml, Path::new("t.yaml")).unwrap();
    let gateway = Gateway::bind(cfg).await.unwrap();
    let url = format!("http://{}/v1/chat/completions", gateway.local_addr());
    tokio::spawn(gateway.run(std::future::pending()));
    let client = reqwest::Client::new();
    let send = |content: &str, stream: bool| {
        let mut body = chat("stub-model", content);
        body["stream"] = json!(stream);
        client
            .post(&url)
            .bearer_auth("sk-one-at-a-time")
            .json(&body)
            .send()
    };
    let streaming = send("long stream", true).await.unwrap();
    assert_eq!(streaming.status(), 200);
    // Headers are in, the stream is still running: no second slot.
    let refused = send("meanwhile", false).await.unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let _ = read_stream(streaming).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(send("afterwards", false).await.unwrap().status(), 200);
}
