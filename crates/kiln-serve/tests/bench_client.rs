//! `kiln bench serve`'s client against a fake OpenAI-compatible server whose timings are known:
//! it waits `first_delay` before the first token and `token_delay` before each later one.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use kiln_serve::bench::{
    BenchConfig, BenchError, BenchReport, Endpoint, InputTokenSource, run_bench, run_bench_blocking,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const FIRST_DELAY: Duration = Duration::from_millis(20);
const TOKEN_DELAY: Duration = Duration::from_millis(5);

/// What the fake does to the request with a given arrival index.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    None,
    Status(u16),
    /// Two tokens, then the body ends without `[DONE]`.
    Truncate,
}

#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
    models_calls: AtomicUsize,
    tokenize_calls: AtomicUsize,
    /// (path, body) of every generation request.
    bodies: Mutex<Vec<(String, Value)>>,
}

#[derive(Clone)]
struct Fake {
    tokenize: bool,
    usage: bool,
    fault: fn(usize) -> Fault,
    api_key: Option<&'static str>,
    seen: Arc<Seen>,
}

impl Default for Fake {
    fn default() -> Self {
        Self {
            tokenize: true,
            usage: true,
            fault: |_| Fault::None,
            api_key: None,
            seen: Arc::default(),
        }
    }
}

/// The fake tokenizer: two tokens a word and a BOS.
fn fake_token_count(text: &str) -> usize {
    2 * text.split_whitespace().count() + 1
}

impl Fake {
    fn authorized(&self, headers: &HeaderMap) -> bool {
        self.api_key.is_none_or(|key| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                == Some(&format!("Bearer {key}"))
        })
    }
}

/// Decrements the in-flight count when the response's last byte is written.
struct InFlight(Arc<Seen>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn models(State(fake): State<Fake>, headers: HeaderMap) -> Response {
    fake.seen.models_calls.fetch_add(1, Ordering::SeqCst);
    if !fake.authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    Json(json!({"object": "list", "data": [{"id": "fake-model", "object": "model"}]}))
        .into_response()
}

async fn tokenize(State(fake): State<Fake>, Json(body): Json<Value>) -> Response {
    fake.seen.tokenize_calls.fetch_add(1, Ordering::SeqCst);
    if !fake.tokenize {
        return StatusCode::NOT_FOUND.into_response();
    }
    let count = fake_token_count(body["prompt"].as_str().unwrap_or_default());
    Json(json!({"count": count, "max_model_len": 4096, "tokens": []})).into_response()
}

async fn generate(
    State(fake): State<Fake>,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if !fake.authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let seen = fake.seen.clone();
    let index = seen.requests.fetch_add(1, Ordering::SeqCst);
    seen.bodies
        .lock()
        .expect("a request handler panicked")
        .push((uri.path().to_string(), body.clone()));
    let fault = (fake.fault)(index);
    if let Fault::Status(code) = fault {
        let code = StatusCode::from_u16(code).expect("a valid status code");
        let error = json!({"error": {"message": format!("fake {code}"), "type": "fake"}});
        return (code, Json(error)).into_response();
    }
    let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    seen.peak.fetch_max(now, Ordering::SeqCst);
    let guard = InFlight(seen);

    let chat = uri.path().ends_with("/chat/completions");
    let prompt = if chat {
        body["messages"][0]["content"].as_str().unwrap_or_default()
    } else {
        body["prompt"].as_str().unwrap_or_default()
    };
    let prompt_tokens = fake_token_count(prompt);
    let max_tokens = body["max_tokens"].as_u64().expect("max_tokens") as usize;
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    let usage = fake.usage;
    tokio::spawn(async move {
        let _guard = guard;
        let event = |v: Value| Ok(Bytes::from(format!("data: {v}\n\n")));
        let text = |t: &str| {
            if chat {
                json!({"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": null}]})
            } else {
                json!({"choices": [{"index": 0, "text": t, "finish_reason": null}]})
            }
        };
        if chat {
            let role =
                json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]});
            let _ = tx.send(event(role)).await;
        }
        for i in 0..max_tokens {
            if fault == Fault::Truncate && i == 2 {
                return;
            }
            tokio::time::sleep(if i == 0 { FIRST_DELAY } else { TOKEN_DELAY }).await;
            let _ = tx.send(event(text(" tok"))).await;
        }
        let mut last = text("");
        last["choices"][0]["finish_reason"] = json!("length");
        let _ = tx.send(event(last)).await;
        if usage {
            let usage = json!({"choices": [], "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": max_tokens,
                "total_tokens": prompt_tokens + max_tokens,
            }});
            let _ = tx.send(event(usage)).await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .expect("a valid response")
}

/// Serves `fake` on a free port of the current runtime; returns its base URL.
async fn serve(fake: Fake) -> String {
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/v1/completions", post(generate))
        .route("/v1/chat/completions", post(generate))
        .with_state(fake);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding a port");
    let addr = listener.local_addr().expect("a bound address");
    // Without TCP_NODELAY, Nagle holds each token's small write until the previous one is
    // acknowledged, and the client sees tokens in bunches.
    let listener = listener.tap_io(|tcp| tcp.set_nodelay(true).expect("setting TCP_NODELAY"));
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serving") });
    format!("http://{addr}")
}

fn config(url: String, concurrency: usize, requests: usize) -> BenchConfig {
    BenchConfig {
        url,
        concurrency,
        requests,
        prompt_len: 32,
        max_tokens: 8,
        model: None,
        endpoint: Endpoint::Completions,
        seed: 1,
        api_key: None,
        tokenize_url: None,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The latency figures of a run against the fake with its default delays.
fn assert_fake_timings(r: &BenchReport, max_tokens: usize) {
    let first = ms(FIRST_DELAY);
    let per_token = ms(TOKEN_DELAY);
    assert!(r.ttft_ms.p50 >= first, "TTFT {:?}", r.ttft_ms);
    assert!(r.ttft_ms.mean >= first, "TTFT {:?}", r.ttft_ms);
    assert!(
        (4.0..=50.0).contains(&r.tpot_ms.mean) && (4.0..=50.0).contains(&r.tpot_ms.p50),
        "TPOT {:?}",
        r.tpot_ms
    );
    assert!((4.0..=50.0).contains(&r.itl_ms.mean), "ITL {:?}", r.itl_ms);
    let e2el_floor = first + per_token * (max_tokens - 1) as f64;
    assert!(r.e2el_ms.p50 >= e2el_floor, "E2EL {:?}", r.e2el_ms);
    assert!(r.ttft_ms.p99 >= r.ttft_ms.p50 && r.e2el_ms.p99 >= r.e2el_ms.p50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_under_load_report_the_fakes_delays() {
    let fake = Fake::default();
    let seen = fake.seen.clone();
    let url = serve(fake).await;
    let cfg = config(url.clone(), 4, 16);
    let mut progress = Vec::new();
    let r = run_bench(&cfg, |done, total| progress.push((done, total)))
        .await
        .unwrap();

    assert_eq!((r.successful_requests, r.failed_requests), (16, 0));
    assert!(r.failures.is_empty() && r.errors.is_empty());
    assert_eq!(r.total_output_tokens, 16 * 8);
    // 32 tokens at two a word is 16 words, which the fake counts as 33 with its BOS.
    assert_eq!(r.input_tokens_source, InputTokenSource::Usage);
    assert_eq!(r.total_input_tokens, 16 * 33);
    assert_fake_timings(&r, 8);

    let server_peak = seen.peak.load(Ordering::SeqCst);
    assert!(r.peak_concurrent_requests <= 4 && server_peak <= 4);
    assert!(
        server_peak >= 2,
        "requests never overlapped (server peak {server_peak})"
    );

    // Four waves of about 55 ms each: the throughputs follow from the duration.
    assert!(
        r.duration_s >= 4.0 * 0.055 * 0.9,
        "duration {}",
        r.duration_s
    );
    assert!((r.request_throughput - 16.0 / r.duration_s).abs() < 1e-9);
    assert!((r.output_token_throughput - 128.0 / r.duration_s).abs() < 1e-9);
    assert!((r.total_token_throughput - (128.0 + 528.0) / r.duration_s).abs() < 1e-9);
    assert_eq!(progress, (1..=16).map(|d| (d, 16)).collect::<Vec<_>>());

    let bodies = seen.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 16);
    let mut prompts = HashSet::new();
    for (path, body) in &bodies {
        assert_eq!(path, "/v1/completions");
        assert_eq!(body["model"], "fake-model");
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["ignore_eos"], true);
        assert_eq!(body["max_tokens"], 8);
        assert_eq!(body["temperature"], 0);
        let prompt = body["prompt"].as_str().unwrap();
        assert_eq!(prompt.split(' ').count(), 16, "{prompt}");
        prompts.insert(prompt.to_string());
    }
    assert_eq!(prompts.len(), 16, "prompts repeat");
    assert_eq!(seen.models_calls.load(Ordering::SeqCst), 1);

    let json = serde_json::to_value(&r).unwrap();
    for key in ["ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"] {
        for stat in ["mean", "p50", "p99"] {
            assert!(json[key][stat].is_f64(), "{key}.{stat} in {json}");
        }
    }
    assert_eq!(json["setup"]["model"], "fake-model");
    assert_eq!(json["peak_concurrent_requests"], r.peak_concurrent_requests);
    let table = r.to_string();
    assert!(
        table.contains("Successful requests:                     16"),
        "{table}"
    );
    assert!(table.contains("Median TPOT (ms):"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_times_the_first_content_not_the_role_chunk() {
    let fake = Fake::default();
    let seen = fake.seen.clone();
    let cfg = BenchConfig {
        endpoint: Endpoint::Chat,
        ..config(serve(fake).await, 2, 4)
    };
    let r = run_bench(&cfg, |_, _| {}).await.unwrap();
    assert_eq!((r.successful_requests, r.failed_requests), (4, 0));
    assert_eq!(r.total_output_tokens, 32);
    // The role chunk comes at once; the first text only after FIRST_DELAY.
    assert_fake_timings(&r, 8);
    for (path, body) in seen.bodies.lock().unwrap().iter() {
        assert_eq!(path, "/v1/chat/completions");
        assert_eq!(body["messages"][0]["role"], "user");
        assert!(body.get("prompt").is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_and_broken_requests_are_counted_not_fatal() {
    let fake = Fake {
        fault: |i| match i % 5 {
            1 => Fault::Status(429),
            3 => Fault::Status(500),
            4 => Fault::Truncate,
            _ => Fault::None,
        },
        ..Fake::default()
    };
    let r = run_bench(&config(serve(fake).await, 3, 10), |_, _| {})
        .await
        .unwrap();
    assert_eq!((r.successful_requests, r.failed_requests), (4, 6));
    let failures: Vec<(&str, usize)> = r.failures.iter().map(|(k, &v)| (k.as_str(), v)).collect();
    assert_eq!(
        failures,
        vec![("HTTP 429", 2), ("HTTP 500", 2), ("stream", 2)]
    );
    // One message per kind: the same failure is not repeated.
    assert_eq!(r.errors.len(), 3, "{:?}", r.errors);
    for needle in ["fake 429", "fake 500", "before `data: [DONE]`"] {
        assert!(
            r.errors.iter().any(|e| e.contains(needle)),
            "{:?}",
            r.errors
        );
    }
    // Only successful requests count towards tokens and latencies.
    assert_eq!(r.total_output_tokens, 4 * 8);
    assert_eq!(r.total_input_tokens, 4 * 33);
    assert_fake_timings(&r, 8);
    assert!(r.to_string().contains("HTTP 429:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_usage_tokens_come_from_tokenize_or_an_estimate() {
    let fake = Fake {
        usage: false,
        ..Fake::default()
    };
    let seen = fake.seen.clone();
    let cfg = BenchConfig {
        model: Some("given".into()),
        ..config(serve(fake).await, 2, 4)
    };
    let r = run_bench(&cfg, |_, _| {}).await.unwrap();
    assert_eq!(r.input_tokens_source, InputTokenSource::Tokenize);
    assert_eq!(r.total_input_tokens, 4 * 33);
    // The output count falls back to the chunks with text.
    assert_eq!(r.total_output_tokens, 4 * 8);
    assert_eq!(seen.models_calls.load(Ordering::SeqCst), 0);
    assert!(
        seen.bodies
            .lock()
            .unwrap()
            .iter()
            .all(|(_, b)| b["model"] == "given")
    );
    // A probe and one call per prompt.
    assert_eq!(seen.tokenize_calls.load(Ordering::SeqCst), 5);

    let fake = Fake {
        usage: false,
        tokenize: false,
        ..Fake::default()
    };
    let seen = fake.seen.clone();
    let r = run_bench(&config(serve(fake).await, 2, 4), |_, _| {})
        .await
        .unwrap();
    assert_eq!(r.input_tokens_source, InputTokenSource::Estimate);
    assert_eq!(r.total_input_tokens, 4 * 32);
    assert_eq!(r.total_output_tokens, 4 * 8);
    for (_, body) in seen.bodies.lock().unwrap().iter() {
        assert_eq!(body["prompt"].as_str().unwrap().split(' ').count(), 32);
    }
}

/// Through a gateway (no `/tokenize`), `tokenize_url` names the inference server that measures
/// the prompts: the gateway then gets the prompts a direct run sends.
#[tokio::test]
async fn prompts_are_measured_where_tokenize_url_says() {
    let gateway = Fake {
        usage: false,
        tokenize: false,
        ..Fake::default()
    };
    let sent = gateway.seen.clone();
    let server = Fake::default();
    let measured = server.seen.clone();
    let server_url = serve(server).await;
    let direct_prompts = |seen: &Seen| -> Vec<Value> {
        seen.bodies
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| b["prompt"].clone())
            .collect()
    };
    let cfg = BenchConfig {
        tokenize_url: Some(format!("{server_url}/v1")),
        ..config(serve(gateway).await, 2, 4)
    };
    let r = run_bench(&cfg, |_, _| {}).await.unwrap();
    assert_eq!(r.input_tokens_source, InputTokenSource::Tokenize, "{r}");
    assert_eq!(r.total_input_tokens, 4 * 33);
    assert_eq!(measured.tokenize_calls.load(Ordering::SeqCst), 5);
    // The same prompts as a run straight against the server.
    let direct = Fake::default();
    let seen_direct = direct.seen.clone();
    run_bench(&config(serve(direct).await, 2, 4), |_, _| {})
        .await
        .unwrap();
    let mut through = direct_prompts(&sent);
    let mut straight = direct_prompts(&seen_direct);
    through.sort_by_key(Value::to_string);
    straight.sort_by_key(Value::to_string);
    assert_eq!(through, straight);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_sent_as_a_bearer_token() {
    let fake = Fake {
        api_key: Some("sk-test"),
        ..Fake::default()
    };
    let url = serve(fake).await;
    let with_key = BenchConfig {
        api_key: Some("sk-test".into()),
        ..config(url.clone(), 2, 2)
    };
    let r = run_bench(&with_key, |_, _| {}).await.unwrap();
    assert_eq!(r.successful_requests, 2);

    let err = run_bench(&config(url.clone(), 2, 2), |_, _| {})
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BenchError::Models { reason, .. } if reason.contains("401")),
        "{err}"
    );
    let named = BenchConfig {
        model: Some("fake-model".into()),
        ..config(url, 2, 2)
    };
    let r = run_bench(&named, |_, _| {}).await.unwrap();
    assert_eq!(r.failures.get("HTTP 401"), Some(&2));
}

#[tokio::test]
async fn an_unreachable_server_fails_requests_not_the_run() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let err = run_bench(&config(url.clone(), 2, 3), |_, _| {})
        .await
        .unwrap_err();
    assert!(matches!(err, BenchError::Models { .. }), "{err}");
    let cfg = BenchConfig {
        model: Some("m".into()),
        ..config(url, 2, 3)
    };
    let r = run_bench(&cfg, |_, _| {}).await.unwrap();
    assert_eq!((r.successful_requests, r.failed_requests), (0, 3));
    assert_eq!(r.failures.get("transport"), Some(&3));
    assert_eq!(r.total_output_tokens, 0);
    assert_eq!(r.ttft_ms.p50, 0.0);
}

#[tokio::test]
async fn invalid_configs_are_refused() {
    for (cfg, field) in [
        (config("http://127.0.0.1:1".into(), 0, 1), "concurrency"),
        (config("http://127.0.0.1:1".into(), 1, 0), "requests"),
        (config("ftp://127.0.0.1:1".into(), 1, 1), "url"),
    ] {
        let err = run_bench(&cfg, |_, _| {}).await.unwrap_err();
        assert!(
            matches!(err, BenchError::InvalidConfig { field: f, .. } if f == field),
            "{err}"
        );
    }
}

#[test]
fn blocking_helper_runs_from_plain_code() {
    let server = tokio::runtime::Runtime::new().unwrap();
    let url = server.block_on(serve(Fake::default()));
    // A trailing `/v1/` is the same server.
    let r = run_bench_blocking(&config(format!("{url}/v1/"), 2, 3)).unwrap();
    assert_eq!((r.successful_requests, r.total_output_tokens), (3, 24));
    assert_eq!(r.setup.url, url);
}

/// The benchmark against kiln's own server over the fixture model: its stream, usage chunk and
/// `/tokenize` are read as intended.
#[test]
fn kiln_serve_is_benchmarked_end_to_end() {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/hf/llama");
    let options = kiln_serve::server::ServeOptions::new(model.to_string_lossy());
    let addr = "127.0.0.1:0".parse().expect("an address");
    let server =
        kiln_serve::server::ServerHandle::start(&options, addr).expect("the server starts");
    for endpoint in [Endpoint::Completions, Endpoint::Chat] {
        let cfg = BenchConfig {
            endpoint,
            ..config(server.url(), 4, 8)
        };
        let r = run_bench_blocking(&cfg).expect("the benchmark runs");
        assert_eq!((r.successful_requests, r.failed_requests), (8, 0), "{r}");
        assert_eq!(r.total_output_tokens, 8 * 8, "{r}");
        assert_eq!(r.input_tokens_source, InputTokenSource::Usage);
        // Completions prompts are sized by /tokenize to about 32 tokens (BOS included); chat
        // adds the template's tokens.
        let per_prompt = r.total_input_tokens as f64 / 8.0;
        assert!(
            (28.0..=80.0).contains(&per_prompt),
            "{per_prompt} input tokens a prompt\n{r}"
        );
        assert!(r.ttft_ms.p50 > 0.0 && r.e2el_ms.p50 >= r.ttft_ms.p50, "{r}");
        assert!(r.peak_concurrent_requests <= 4);
    }
    server.shutdown().expect("the server shuts down");
}
