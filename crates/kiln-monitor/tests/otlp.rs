//! OTLP/HTTP JSON export against a real HTTP receiver (axum on 127.0.0.1:0) that records every
//! POST, and W3C `traceparent` parsing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use kiln_monitor::otlp::{
    AttrValue, GenAiCall, OtlpConfig, OtlpError, OtlpExporter, Span, SpanKind, encode,
    evaluation_event, new_span_id, new_trace_id, parse_traceparent, traceparent,
};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

/// A safety net so a broken exporter fails the test instead of hanging it; never the thing tested.
const PATIENCE: Duration = Duration::from_secs(20);

struct Recorded {
    headers: HeaderMap,
    body: Value,
}

struct Receiver {
    requests: Mutex<Vec<Recorded>>,
    /// Scripted answers, used in order; `200 {}` once they run out.
    answers: Mutex<VecDeque<(u16, &'static str)>>,
    /// While `false`, every request waits before it is answered.
    open: watch::Sender<bool>,
    arrived: mpsc::UnboundedSender<()>,
}

impl Receiver {
    fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    fn bodies(&self) -> Vec<Value> {
        let requests = self.requests.lock().unwrap();
        requests.iter().map(|r| r.body.clone()).collect()
    }

    fn release(&self) {
        self.open.send_replace(true);
    }
}

struct Collector {
    endpoint: String,
    rx: Arc<Receiver>,
    arrivals: mpsc::UnboundedReceiver<()>,
}

impl Collector {
    async fn next_arrival(&mut self) {
        tokio::time::timeout(PATIENCE, self.arrivals.recv())
            .await
            .expect("no request reached the receiver")
            .unwrap();
    }
}

async fn record(
    State(rx): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let body = serde_json::from_slice(&body).expect("request body is not JSON");
    rx.requests.lock().unwrap().push(Recorded { headers, body });
    let _ = rx.arrived.send(());
    let mut open = rx.open.subscribe();
    open.wait_for(|open| *open).await.unwrap();
    let (code, answer) = rx
        .answers
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or((200, "{}"));
    (StatusCode::from_u16(code).unwrap(), answer)
}

async fn collector(open: bool, answers: &[(u16, &'static str)]) -> Collector {
    let (arrived, arrivals) = mpsc::unbounded_channel();
    let rx = Arc::new(Receiver {
        requests: Mutex::new(Vec::new()),
        answers: Mutex::new(answers.iter().copied().collect()),
        open: watch::Sender::new(open),
        arrived,
    });
    let app = Router::new()
        .route("/v1/traces", post(record))
        .with_state(Arc::clone(&rx));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Collector {
        endpoint: format!("http://{addr}/v1/traces"),
        rx,
        arrivals,
    }
}

fn config(endpoint: &str) -> OtlpConfig {
    OtlpConfig {
        // Long enough that only `batch` and `flush` decide when a request goes, unless a test
        // is about the interval.
        flush_interval: Duration::from_secs(600),
        ..OtlpConfig::new(endpoint, "kiln-gateway-test")
    }
}

fn at(nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

fn plain_span(name: &str) -> Span {
    Span {
        trace_id: new_trace_id(),
        span_id: new_span_id(),
        parent_span_id: None,
        name: name.to_owned(),
        kind: SpanKind::Server,
        start: at(1_000),
        end: at(2_000),
        attributes: vec![("n".into(), AttrValue::from(name))],
        events: Vec::new(),
        error: None,
    }
}

fn spans_of(body: &Value) -> &Vec<Value> {
    body["resourceSpans"][0]["scopeSpans"][0]["spans"]
        .as_array()
        .expect("no spans array")
}

fn attr<'a>(attrs: &'a Value, key: &str) -> &'a Value {
    let found = attrs.as_array().unwrap().iter().find(|kv| kv["key"] == key);
    &found.unwrap_or_else(|| panic!("no attribute {key}"))["value"]
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[tokio::test]
async fn exported_span_arrives_as_otlp_json_with_gen_ai_attributes() {
    let c = collector(true, &[]).await;
    let exporter = OtlpExporter::spawn(config(&c.endpoint)).unwrap();

    let call = GenAiCall {
        operation: "chat".into(),
        provider: "vllm".into(),
        request_model: "llama-3".into(),
        response_model: Some("llama-3-8b-instruct".into()),
        response_id: Some("chatcmpl-42".into()),
        finish_reasons: vec!["stop".into()],
        input_tokens: Some(12),
        output_tokens: Some(34),
        max_tokens: Some(256),
        temperature: Some(0.7),
        top_p: Some(0.9),
        seed: Some(-5),
        choice_count: Some(2),
        server_address: Some("llm-a.internal".into()),
        server_port: Some(8000),
        error_type: Some("upstream_timeout".into()),
    };
    let trace_id = new_trace_id();
    let parent = new_span_id();
    let mut span = Span::gen_ai(
        &call,
        trace_id,
        Some(parent),
        at(1_700_000_000_000_000_001),
        at(1_700_000_000_500_000_002),
    );
    span.events.push(evaluation_event(
        "faithfulness",
        Some(0.25),
        Some("unfaithful"),
        at(1_700_000_000_400_000_000),
    ));
    assert!(exporter.export(span.clone()));
    exporter.flush().await;

    assert_eq!((exporter.exported(), exporter.dropped()), (1, 0));
    let requests = c.rx.requests.lock().unwrap();
    assert_eq!(requests.len(), 1);
    let content_types: Vec<_> = requests[0].headers.get_all("content-type").iter().collect();
    assert_eq!(content_types, ["application/json"]);
    let body = &requests[0].body;

    let resource = &body["resourceSpans"][0]["resource"]["attributes"];
    assert_eq!(
        attr(resource, "service.name")["stringValue"],
        "kiln-gateway-test"
    );
    assert_eq!(attr(resource, "telemetry.sdk.name")["stringValue"], "kiln");
    assert_eq!(
        attr(resource, "telemetry.sdk.language")["stringValue"],
        "rust"
    );
    assert_eq!(
        body["resourceSpans"][0]["scopeSpans"][0]["scope"]["name"],
        "kiln-gateway"
    );

    let spans = spans_of(body);
    assert_eq!(spans.len(), 1);
    let s = &spans[0];
    let trace_hex = s["traceId"].as_str().unwrap();
    assert!(is_lower_hex(trace_hex, 32), "{trace_hex}");
    assert!(is_lower_hex(s["spanId"].as_str().unwrap(), 16));
    assert!(is_lower_hex(s["parentSpanId"].as_str().unwrap(), 16));
    // The hex in the body is the id we set, so the span joins the caller's trace.
    let (tid, pid, _) = parse_traceparent(&format!(
        "00-{trace_hex}-{}-01",
        s["parentSpanId"].as_str().unwrap()
    ))
    .unwrap();
    assert_eq!((tid, pid), (trace_id, parent));
    assert_eq!(s["name"], "chat llama-3");
    assert_eq!(s["kind"], 3);
    assert_eq!(s["startTimeUnixNano"], "1700000000000000001");
    assert_eq!(s["endTimeUnixNano"], "1700000000500000002");

    let a = &s["attributes"];
    for (key, want) in [
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.provider.name", "vllm"),
        ("gen_ai.request.model", "llama-3"),
        ("gen_ai.response.model", "llama-3-8b-instruct"),
        ("gen_ai.response.id", "chatcmpl-42"),
        ("server.address", "llm-a.internal"),
        ("error.type", "upstream_timeout"),
    ] {
        assert_eq!(
            attr(a, key),
            &serde_json::json!({ "stringValue": want }),
            "{key}"
        );
    }
    for (key, want) in [
        ("gen_ai.usage.input_tokens", "12"),
        ("gen_ai.usage.output_tokens", "34"),
        ("gen_ai.request.max_tokens", "256"),
        ("gen_ai.request.seed", "-5"),
        ("gen_ai.request.choice.count", "2"),
        ("server.port", "8000"),
    ] {
        // int64 travels as a decimal string in OTLP/JSON.
        assert_eq!(
            attr(a, key),
            &serde_json::json!({ "intValue": want }),
            "{key}"
        );
    }
    assert_eq!(attr(a, "gen_ai.request.temperature")["doubleValue"], 0.7);
    assert_eq!(attr(a, "gen_ai.request.top_p")["doubleValue"], 0.9);
    assert_eq!(
        attr(a, "gen_ai.response.finish_reasons"),
        &serde_json::json!({ "arrayValue": { "values": [{ "stringValue": "stop" }] } })
    );
    assert_eq!(a.as_array().unwrap().len(), call.attributes().len());

    let events = s["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["name"], "gen_ai.evaluation.result");
    assert_eq!(events[0]["timeUnixNano"], "1700000000400000000");
    let ea = &events[0]["attributes"];
    assert_eq!(
        attr(ea, "gen_ai.evaluation.name")["stringValue"],
        "faithfulness"
    );
    assert_eq!(
        attr(ea, "gen_ai.evaluation.score.value")["doubleValue"],
        0.25
    );
    assert_eq!(
        attr(ea, "gen_ai.evaluation.score.label")["stringValue"],
        "unfaithful"
    );

    assert_eq!(
        s["status"],
        serde_json::json!({ "code": 2, "message": "upstream_timeout" })
    );
    // The request body is exactly what `encode` makes.
    assert_eq!(body, &encode(&[span], "kiln-gateway-test"));
}

#[tokio::test]
async fn custom_headers_are_sent_with_every_request() {
    let c = collector(true, &[]).await;
    let mut cfg = config(&c.endpoint);
    cfg.headers = vec![
        ("Authorization".into(), "Bearer s3cret".into()),
        ("x-tenant".into(), "acme".into()),
    ];
    let exporter = OtlpExporter::spawn(cfg).unwrap();
    for round in 0..2 {
        assert!(exporter.export(plain_span(&format!("r{round}"))));
        exporter.flush().await;
    }
    let requests = c.rx.requests.lock().unwrap();
    assert_eq!(requests.len(), 2);
    for r in requests.iter() {
        assert_eq!(r.headers["authorization"], "Bearer s3cret");
        assert_eq!(r.headers["x-tenant"], "acme");
    }
}

#[tokio::test]
async fn spans_are_batched_into_ceil_n_over_batch_requests() {
    for (n, batch) in [(10usize, 4usize), (8, 4), (1, 512), (7, 1)] {
        let c = collector(true, &[]).await;
        let mut cfg = config(&c.endpoint);
        cfg.batch = batch;
        let exporter = OtlpExporter::spawn(cfg).unwrap();
        for i in 0..n {
            assert!(exporter.export(plain_span(&format!("s{i}"))));
        }
        exporter.flush().await;

        let bodies = c.rx.bodies();
        assert_eq!(bodies.len(), n.div_ceil(batch), "n={n} batch={batch}");
        let sizes: Vec<usize> = bodies.iter().map(|b| spans_of(b).len()).collect();
        assert!(sizes.iter().all(|&s| s <= batch), "{sizes:?}");
        // Every span arrives once, in the order it was exported.
        let names: Vec<String> = bodies
            .iter()
            .flat_map(|b| {
                spans_of(b)
                    .iter()
                    .map(|s| s["name"].as_str().unwrap().to_owned())
            })
            .collect();
        let want: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
        assert_eq!(names, want);
        assert_eq!(exporter.exported(), n as u64);
    }
}

#[tokio::test]
async fn flush_interval_sends_a_partial_batch_without_flush() {
    let mut c = collector(true, &[]).await;
    let mut cfg = config(&c.endpoint);
    cfg.flush_interval = Duration::from_millis(20);
    let exporter = OtlpExporter::spawn(cfg).unwrap();
    for i in 0..3 {
        assert!(exporter.export(plain_span(&format!("t{i}"))));
    }
    c.next_arrival().await;
    let bodies = c.rx.bodies();
    assert_eq!(spans_of(&bodies[0]).len(), 3);
}

#[tokio::test]
async fn last_handle_dropped_sends_what_is_queued() {
    let mut c = collector(true, &[]).await;
    let exporter = OtlpExporter::spawn(config(&c.endpoint)).unwrap();
    let clone = exporter.clone();
    assert!(clone.export(plain_span("left-over")));
    drop(exporter);
    drop(clone);
    c.next_arrival().await;
    assert_eq!(spans_of(&c.rx.bodies()[0])[0]["name"], "left-over");
}

/// A collector that stops answering must not slow the gateway: spans beyond the queue are
/// dropped at once and counted, and the queue drains once the collector answers again.
#[tokio::test]
async fn full_queue_drops_and_counts_without_blocking() {
    let mut c = collector(false, &[]).await;
    let mut cfg = config(&c.endpoint);
    cfg.capacity = 4;
    cfg.batch = 1;
    let exporter = OtlpExporter::spawn(cfg).unwrap();

    assert!(exporter.export(plain_span("first")));
    // The task now waits on the stalled POST of "first" and reads nothing from the queue.
    c.next_arrival().await;
    let accepted: Vec<bool> = (0..10)
        .map(|i| exporter.export(plain_span(&format!("q{i}"))))
        .collect();
    assert_eq!(accepted, [[true; 4].as_slice(), &[false; 6]].concat());
    assert_eq!(exporter.dropped(), 6);
    assert_eq!(exporter.exported(), 0);

    c.rx.release();
    exporter.flush().await;
    assert_eq!((exporter.exported(), exporter.dropped()), (5, 6));
    assert_eq!(c.rx.count(), 5);
}

#[tokio::test]
async fn http_500_counts_as_dropped_is_not_retried_and_export_goes_on() {
    let c = collector(true, &[(500, "boom")]).await;
    let exporter = OtlpExporter::spawn(config(&c.endpoint)).unwrap();

    assert!(exporter.export(plain_span("lost-1")));
    assert!(exporter.export(plain_span("lost-2")));
    exporter.flush().await;
    assert_eq!((exporter.exported(), exporter.dropped()), (0, 2));
    // OTLP/HTTP: 500 is not a retryable status.
    assert_eq!(c.rx.count(), 1);

    assert!(exporter.export(plain_span("kept")));
    exporter.flush().await;
    assert_eq!((exporter.exported(), exporter.dropped()), (1, 2));
    let bodies = c.rx.bodies();
    assert_eq!(bodies.len(), 2);
    assert_eq!(spans_of(&bodies[1])[0]["name"], "kept");
}

#[tokio::test]
async fn http_503_is_retried_once() {
    // One 503 then success: delivered by the retry.
    let c = collector(true, &[(503, "busy")]).await;
    let exporter = OtlpExporter::spawn(config(&c.endpoint)).unwrap();
    assert!(exporter.export(plain_span("again")));
    exporter.flush().await;
    assert_eq!((exporter.exported(), exporter.dropped()), (1, 0));
    assert_eq!(c.rx.count(), 2);
    let bodies = c.rx.bodies();
    assert_eq!(bodies[0], bodies[1]);

    // Two 503s: one retry only, then dropped.
    let c = collector(true, &[(503, "busy"), (429, "slow down"), (503, "x")]).await;
    let exporter = OtlpExporter::spawn(config(&c.endpoint)).unwrap();
    assert!(exporter.export(plain_span("gone")));
    exporter.flush().await;
    assert_eq!((exporter.exported(), exporter.dropped()), (0, 1));
    assert_eq!(c.rx.count(), 2);
}

#[tokio::test]
async fn partial_success_counts_rejected_spans_as_dropped() {
    let answer = r#"{"partialSuccess":{"rejectedSpans":"2","errorMessage":"too old"}}"#;
    let c = collector(true, &[(200, answer)]).await;
    let exporter = OtlpExporter::spawn(config(&c.endpoint)).unwrap();
    for i in 0..5 {
        assert!(exporter.export(plain_span(&format!("p{i}"))));
    }
    exporter.flush().await;
    assert_eq!((exporter.exported(), exporter.dropped()), (3, 2));
}

#[tokio::test]
async fn unreachable_collector_counts_as_dropped() {
    // A port that was just free: nothing listens there.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let exporter = OtlpExporter::spawn(config(&format!("http://{addr}/v1/traces"))).unwrap();
    assert!(exporter.export(plain_span("nowhere")));
    exporter.flush().await;
    assert_eq!((exporter.exported(), exporter.dropped()), (0, 1));
}

#[tokio::test]
async fn bad_endpoint_is_refused_with_an_error_naming_it() {
    for endpoint in [
        "",
        "collector:4318/v1/traces",
        "not a url",
        "ftp://collector/v1/traces",
        "http://",
        "unix:/var/run/otel.sock",
    ] {
        let err = OtlpExporter::spawn(config(endpoint)).unwrap_err();
        assert!(
            matches!(err, OtlpError::Endpoint { .. }),
            "{endpoint:?}: {err}"
        );
        let message = err.to_string();
        assert!(
            message.contains(&format!("{endpoint:?}")),
            "{endpoint:?}: {message}"
        );
    }
}

#[tokio::test]
async fn bad_settings_are_refused() {
    let mut cfg = config("http://127.0.0.1:4318/v1/traces");
    cfg.headers = vec![("bad header".into(), "x".into())];
    let err = OtlpExporter::spawn(cfg).unwrap_err();
    assert!(err.to_string().contains("\"bad header\""), "{err}");

    let mut cfg = config("http://127.0.0.1:4318/v1/traces");
    cfg.headers = vec![("authorization".into(), "line\nbreak".into())];
    assert!(matches!(
        OtlpExporter::spawn(cfg).unwrap_err(),
        OtlpError::Header { .. }
    ));

    let mut cfg = config("http://127.0.0.1:4318/v1/traces");
    cfg.capacity = 0;
    let err = OtlpExporter::spawn(cfg).unwrap_err();
    assert!(err.to_string().contains("capacity"), "{err}");

    let mut cfg = config("http://127.0.0.1:4318/v1/traces");
    cfg.batch = 0;
    assert!(OtlpExporter::spawn(cfg).is_err());
}

#[test]
fn spawn_outside_a_runtime_is_an_error_not_a_panic() {
    let err = OtlpExporter::spawn(config("http://127.0.0.1:4318/v1/traces")).unwrap_err();
    assert!(matches!(err, OtlpError::NoRuntime), "{err}");
}

#[test]
fn traceparent_round_trips() {
    for _ in 0..100 {
        let (t, s) = (new_trace_id(), new_span_id());
        let header = traceparent(&t, &s);
        assert_eq!(header.len(), 55);
        assert_eq!(parse_traceparent(&header), Some((t, s, true)));
    }
    let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (t, s, sampled) = parse_traceparent(header).unwrap();
    assert_eq!(traceparent(&t, &s), header);
    assert!(sampled);
}

#[test]
fn traceparent_table() {
    const T: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const S: &str = "00f067aa0ba902b7";
    let ok = |flags: &str| format!("00-{T}-{S}-{flags}");
    let cases: Vec<(String, Option<bool>)> = vec![
        (ok("01"), Some(true)),
        (ok("00"), Some(false)),
        // Only the sampled bit matters; other flags are ignored.
        (ok("03"), Some(true)),
        (ok("02"), Some(false)),
        (format!("  {}\t", ok("01")), Some(true)),
        // A later version is read by its version-00 prefix, extra fields after a dash.
        (format!("cc-{T}-{S}-01"), Some(true)),
        (format!("cc-{T}-{S}-01-what-the-future-holds"), Some(true)),
        (format!("cc-{T}-{S}-01x"), None),
        // Version 00 is exactly 55 characters.
        (format!("00-{T}-{S}-01-extra"), None),
        (format!("ff-{T}-{S}-01"), None),
        (format!("0-{T}-{S}-01"), None),
        (format!("00-{}-{S}-01", "0".repeat(32)), None),
        (format!("00-{T}-{}-01", "0".repeat(16)), None),
        (format!("00-{}-{S}-01", T.to_uppercase()), None),
        (format!("00-{T}-{}-01", S.to_uppercase()), None),
        (format!("00-{T}-{S}-0A"), None),
        (format!("00-{}-{S}-01", &T[1..]), None),
        (format!("00-{T}1-{S}-01"), None),
        (format!("00-{T}-{}-01", &S[1..]), None),
        (format!("00-{T}-{S}-1"), None),
        (format!("00_{T}_{S}_01"), None),
        (format!("00-{}g-{S}-01", &T[1..]), None),
        (String::new(), None),
    ];
    for (header, want) in cases {
        let got = parse_traceparent(&header);
        assert_eq!(got.map(|(_, _, sampled)| sampled), want, "{header:?}");
        if let Some((t, s, _)) = got {
            assert_eq!(
                (
                    traceparent(&t, &s)[3..35].to_owned(),
                    traceparent(&t, &s)[36..52].to_owned()
                ),
                (T.to_owned(), S.to_owned())
            );
        }
    }
}

#[test]
fn new_ids_are_random_and_never_zero() {
    let traces: std::collections::HashSet<[u8; 16]> = (0..1000).map(|_| new_trace_id()).collect();
    let spans: std::collections::HashSet<[u8; 8]> = (0..1000).map(|_| new_span_id()).collect();
    assert_eq!((traces.len(), spans.len()), (1000, 1000));
    assert!(!traces.contains(&[0; 16]) && !spans.contains(&[0; 8]));
}

#[test]
fn gen_ai_span_name_and_omitted_attributes() {
    let call = GenAiCall {
        operation: "text_completion".into(),
        request_model: "qwen2".into(),
        ..GenAiCall::default()
    };
    assert_eq!(call.span_name(), "text_completion qwen2");
    let keys: Vec<String> = call.attributes().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["gen_ai.operation.name", "gen_ai.request.model"]);

    let unknown_model = GenAiCall {
        operation: "chat".into(),
        ..GenAiCall::default()
    };
    assert_eq!(unknown_model.span_name(), "chat");

    let span = Span::gen_ai(&call, new_trace_id(), None, at(1), at(2));
    assert_eq!(span.kind, SpanKind::Client);
    assert!(span.error.is_none());

    let event = evaluation_event("toxicity", None, Some("clean"), at(5));
    let keys: Vec<&str> = event.attributes.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        ["gen_ai.evaluation.name", "gen_ai.evaluation.score.label"]
    );
}
