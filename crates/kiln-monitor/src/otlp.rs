//! OpenTelemetry spans for model calls, exported over OTLP/HTTP with the JSON encoding.
//!
//! The gateway finishes one [`Span`] per request, with the GenAI semantic-convention attributes
//! ([`GenAiCall::attributes`]) and evaluation results as `gen_ai.evaluation.result` events
//! ([`evaluation_event`]), and hands it to an [`OtlpExporter`]. The exporter never makes the
//! request path wait: [`OtlpExporter::export`] is a `try_send` into a bounded queue, and one
//! background task batches the spans and POSTs them as an `ExportTraceServiceRequest` to a
//! collector (`http://collector:4318/v1/traces`).
//!
//! Why a hand-written encoder rather than the `opentelemetry` SDK crates: we only export spans
//! that are already finished, the SDK (with its protobuf and gRPC stack) is large and slow to build,
//! and OTLP/JSON is small enough to write exactly. The rules that differ from a plain protobuf JSON
//! mapping, all from the OTLP specification (`opentelemetry-proto/docs/specification.md`,
//! "JSON Protobuf Encoding"):
//!
//! - `traceId`, `spanId` and `parentSpanId` are lowercase hex strings, not base64;
//! - keys are lowerCamelCase, enums (`kind`, `status.code`) are integers;
//! - 64-bit integers (`startTimeUnixNano`, `intValue`) are decimal strings;
//! - fields at their default value are left out (no `parentSpanId` for a root span, no `status`
//!   when it is unset, no `events` when there are none).
//!
//! Delivery follows the OTLP/HTTP rules: a request answered 429, 502, 503 or 504, or one that did
//! not reach the collector, is retried once; any other non-2xx answer is final. Spans in a request
//! that failed are counted in [`OtlpExporter::dropped`], as are the ones a 2xx answer reports in
//! `partialSuccess.rejectedSpans`. A failure is logged once per streak of failures, not per batch.
//!
//! GenAI semantic conventions (status: Development):
//! <https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/>.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// The instrumentation scope name on every exported span.
pub const SCOPE_NAME: &str = "kiln-gateway";

/// The name of the span event that carries one evaluation result.
pub const EVALUATION_EVENT: &str = "gen_ai.evaluation.result";

/// How long the exporter waits before its one retry of a failed request.
const RETRY_DELAY: Duration = Duration::from_millis(200);

/// Where and how to export.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    /// The full OTLP/HTTP traces URL, e.g. `http://collector:4318/v1/traces`.
    pub endpoint: String,
    /// Extra request headers, e.g. `("authorization", "Bearer …")`.
    pub headers: Vec<(String, String)>,
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// How many spans may wait in the queue; beyond that [`OtlpExporter::export`] drops.
    pub capacity: usize,
    /// The most spans in one request.
    pub batch: usize,
    /// The longest a span waits for its batch to fill before it is sent anyway.
    pub flush_interval: Duration,
    /// The limit on one request, connection included.
    pub timeout: Duration,
}

impl OtlpConfig {
    /// A configuration with the default queue (10,000 spans), batch (512), flush interval (2 s)
    /// and timeout (10 s), and no extra headers.
    pub fn new(endpoint: impl Into<String>, service_name: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            headers: Vec::new(),
            service_name: service_name.into(),
            capacity: 10_000,
            batch: 512,
            flush_interval: Duration::from_secs(2),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Why an exporter could not be started.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("OTLP endpoint {endpoint:?} is not a valid http(s) URL: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("OTLP header {name:?} is invalid: {reason}")]
    Header { name: String, reason: String },
    #[error("OTLP exporter setting `{field}` must be greater than zero")]
    Zero { field: &'static str },
    #[error("OTLP exporter must be spawned from within a tokio runtime")]
    NoRuntime,
    #[error("OTLP exporter could not build its HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// An attribute value; the OTLP `AnyValue` kinds the gateway needs.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    StrArray(Vec<String>),
}

impl From<&str> for AttrValue {
    fn from(v: &str) -> Self {
        Self::Str(v.to_owned())
    }
}

impl From<String> for AttrValue {
    fn from(v: String) -> Self {
        Self::Str(v)
    }
}

impl From<i64> for AttrValue {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}

impl From<u16> for AttrValue {
    fn from(v: u16) -> Self {
        Self::Int(i64::from(v))
    }
}

/// Saturates at `i64::MAX`, the largest OTLP integer.
impl From<u64> for AttrValue {
    fn from(v: u64) -> Self {
        Self::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

impl From<f64> for AttrValue {
    fn from(v: f64) -> Self {
        Self::Float(v)
    }
}

impl From<bool> for AttrValue {
    fn from(v: bool) -> Self {
        Self::Bool(v)
    }
}

impl From<Vec<String>> for AttrValue {
    fn from(v: Vec<String>) -> Self {
        Self::StrArray(v)
    }
}

/// OTLP `Span.SpanKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Unspecified = 0,
    Internal = 1,
    Server = 2,
    /// The kind of a GenAI inference span: the call to the model.
    Client = 3,
    Producer = 4,
    Consumer = 5,
}

/// A timestamped event inside a span.
#[derive(Debug, Clone)]
pub struct SpanEvent {
    pub name: String,
    pub at: SystemTime,
    pub attributes: Vec<(String, AttrValue)>,
}

/// One finished span.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub name: String,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(String, AttrValue)>,
    pub events: Vec<SpanEvent>,
    /// The status message; `Some` sets `STATUS_CODE_ERROR`, `None` leaves the status unset.
    pub error: Option<String>,
}

impl Span {
    /// The CLIENT span of one model call: named and attributed from `call`, with a fresh span id,
    /// and in error when `call.error_type` is set (the error type is the status message).
    pub fn gen_ai(
        call: &GenAiCall,
        trace_id: [u8; 16],
        parent_span_id: Option<[u8; 8]>,
        start: SystemTime,
        end: SystemTime,
    ) -> Self {
        Self {
            trace_id,
            span_id: new_span_id(),
            parent_span_id,
            name: call.span_name(),
            kind: SpanKind::Client,
            start,
            end,
            attributes: call.attributes(),
            events: Vec::new(),
            error: call.error_type.clone(),
        }
    }
}

/// A random trace id, never all zeros (the W3C invalid id).
pub fn new_trace_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    while id == [0u8; 16] {
        rand::rng().fill_bytes(&mut id);
    }
    id
}

/// A random span id, never all zeros (the W3C invalid id).
pub fn new_span_id() -> [u8; 8] {
    let mut id = [0u8; 8];
    while id == [0u8; 8] {
        rand::rng().fill_bytes(&mut id);
    }
    id
}

/// Parses a W3C Trace Context `traceparent` header into (trace id, parent span id, sampled).
///
/// Accepts `00-<32 hex>-<16 hex>-<2 hex>` exactly, in lowercase hex; rejects version `ff`, an
/// all-zero trace or span id, uppercase hex and wrong lengths. A later version is read by its
/// version-00 prefix, as the specification asks, provided anything after it starts with `-`.
pub fn parse_traceparent(header: &str) -> Option<([u8; 16], [u8; 8], bool)> {
    let h = header.trim_matches([' ', '\t']).as_bytes();
    if h.len() < 55 {
        return None;
    }
    let version = parse_hex::<1>(&h[0..2])?[0];
    match version {
        0xff => return None,
        0x00 if h.len() != 55 => return None,
        _ if h.len() > 55 && h[55] != b'-' => return None,
        _ => {}
    }
    if h[2] != b'-' || h[35] != b'-' || h[52] != b'-' {
        return None;
    }
    let trace_id = parse_hex::<16>(&h[3..35])?;
    let span_id = parse_hex::<8>(&h[36..52])?;
    let flags = parse_hex::<1>(&h[53..55])?[0];
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some((trace_id, span_id, flags & 0x01 == 0x01))
}

/// Formats a version-00 `traceparent` header; the sampled flag is always set, since every span
/// the gateway makes is exported.
pub fn traceparent(trace_id: &[u8; 16], span_id: &[u8; 8]) -> String {
    format!("00-{}-{}-01", hex(trace_id), hex(span_id))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// Lowercase hex only: W3C Trace Context defines its fields as `HEXDIGLC`.
fn parse_hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// The GenAI attributes of one model call.
#[derive(Debug, Clone, Default)]
pub struct GenAiCall {
    /// `gen_ai.operation.name`: `chat` or `text_completion`.
    pub operation: String,
    /// `gen_ai.provider.name`, e.g. `openai` or `vllm`.
    pub provider: String,
    pub request_model: String,
    pub response_model: Option<String>,
    pub response_id: Option<String>,
    pub finish_reasons: Vec<String>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<i64>,
    pub choice_count: Option<u64>,
    pub server_address: Option<String>,
    pub server_port: Option<u16>,
    /// `error.type`: set only when the call failed.
    pub error_type: Option<String>,
}

impl GenAiCall {
    /// The span attributes, leaving out what is unknown (empty strings, `None`, no finish reasons).
    pub fn attributes(&self) -> Vec<(String, AttrValue)> {
        fn push(out: &mut Vec<(String, AttrValue)>, key: &str, value: impl Into<AttrValue>) {
            out.push((key.to_owned(), value.into()));
        }
        let mut out = Vec::with_capacity(16);
        for (key, value) in [
            ("gen_ai.operation.name", &self.operation),
            ("gen_ai.provider.name", &self.provider),
            ("gen_ai.request.model", &self.request_model),
        ] {
            if !value.is_empty() {
                push(&mut out, key, value.as_str());
            }
        }
        if let Some(v) = &self.response_model {
            push(&mut out, "gen_ai.response.model", v.as_str());
        }
        if let Some(v) = &self.response_id {
            push(&mut out, "gen_ai.response.id", v.as_str());
        }
        if !self.finish_reasons.is_empty() {
            push(
                &mut out,
                "gen_ai.response.finish_reasons",
                self.finish_reasons.clone(),
            );
        }
        if let Some(v) = self.input_tokens {
            push(&mut out, "gen_ai.usage.input_tokens", v);
        }
        if let Some(v) = self.output_tokens {
            push(&mut out, "gen_ai.usage.output_tokens", v);
        }
        if let Some(v) = self.max_tokens {
            push(&mut out, "gen_ai.request.max_tokens", v);
        }
        if let Some(v) = self.temperature {
            push(&mut out, "gen_ai.request.temperature", v);
        }
        if let Some(v) = self.top_p {
            push(&mut out, "gen_ai.request.top_p", v);
        }
        if let Some(v) = self.seed {
            push(&mut out, "gen_ai.request.seed", v);
        }
        if let Some(v) = self.choice_count {
            push(&mut out, "gen_ai.request.choice.count", v);
        }
        if let Some(v) = &self.server_address {
            push(&mut out, "server.address", v.as_str());
        }
        if let Some(v) = self.server_port {
            push(&mut out, "server.port", v);
        }
        if let Some(v) = &self.error_type {
            push(&mut out, "error.type", v.as_str());
        }
        out
    }

    /// `"{gen_ai.operation.name} {gen_ai.request.model}"`, or the operation alone when the model
    /// is unknown, as the conventions say.
    pub fn span_name(&self) -> String {
        if self.request_model.is_empty() {
            self.operation.clone()
        } else {
            format!("{} {}", self.operation, self.request_model)
        }
    }
}

/// A `gen_ai.evaluation.result` event: the evaluator's name, and the score and label it gave,
/// each left out when absent.
pub fn evaluation_event(
    name: &str,
    score: Option<f64>,
    label: Option<&str>,
    at: SystemTime,
) -> SpanEvent {
    let mut attributes = vec![("gen_ai.evaluation.name".to_owned(), AttrValue::from(name))];
    if let Some(score) = score {
        attributes.push(("gen_ai.evaluation.score.value".to_owned(), score.into()));
    }
    if let Some(label) = label {
        attributes.push(("gen_ai.evaluation.score.label".to_owned(), label.into()));
    }
    SpanEvent {
        name: EVALUATION_EVENT.to_owned(),
        at,
        attributes,
    }
}

/// The OTLP/JSON `ExportTraceServiceRequest` for `spans`: one resource (the service), one scope
/// (`kiln-gateway`).
pub fn encode(spans: &[Span], service_name: &str) -> Value {
    let resource = [
        ("service.name", AttrValue::from(service_name)),
        ("telemetry.sdk.name", "kiln".into()),
        ("telemetry.sdk.language", "rust".into()),
        ("telemetry.sdk.version", env!("CARGO_PKG_VERSION").into()),
    ];
    json!({
        "resourceSpans": [{
            "resource": {
                "attributes": resource
                    .iter()
                    .map(|(k, v)| key_value(k, v))
                    .collect::<Vec<_>>(),
            },
            "scopeSpans": [{
                "scope": { "name": SCOPE_NAME, "version": env!("CARGO_PKG_VERSION") },
                "spans": spans.iter().map(encode_span).collect::<Vec<_>>(),
            }],
        }],
    })
}

fn encode_span(span: &Span) -> Value {
    let mut m = Map::new();
    m.insert("traceId".into(), hex(&span.trace_id).into());
    m.insert("spanId".into(), hex(&span.span_id).into());
    if let Some(parent) = &span.parent_span_id {
        m.insert("parentSpanId".into(), hex(parent).into());
    }
    m.insert("name".into(), span.name.clone().into());
    m.insert("kind".into(), (span.kind as i32).into());
    m.insert("startTimeUnixNano".into(), unix_nanos(span.start).into());
    m.insert("endTimeUnixNano".into(), unix_nanos(span.end).into());
    m.insert("attributes".into(), attributes(&span.attributes));
    if !span.events.is_empty() {
        let events = span
            .events
            .iter()
            .map(|e| {
                json!({
                    "timeUnixNano": unix_nanos(e.at),
                    "name": e.name,
                    "attributes": attributes(&e.attributes),
                })
            })
            .collect::<Vec<_>>();
        m.insert("events".into(), events.into());
    }
    if let Some(message) = &span.error {
        // STATUS_CODE_ERROR
        m.insert("status".into(), json!({ "code": 2, "message": message }));
    }
    Value::Object(m)
}

fn attributes(attrs: &[(String, AttrValue)]) -> Value {
    Value::Array(attrs.iter().map(|(k, v)| key_value(k, v)).collect())
}

fn key_value(key: &str, value: &AttrValue) -> Value {
    json!({ "key": key, "value": any_value(value) })
}

fn any_value(value: &AttrValue) -> Value {
    match value {
        AttrValue::Str(s) => json!({ "stringValue": s }),
        AttrValue::Int(i) => json!({ "intValue": i.to_string() }),
        AttrValue::Float(f) => json!({ "doubleValue": double(*f) }),
        AttrValue::Bool(b) => json!({ "boolValue": b }),
        AttrValue::StrArray(items) => {
            let values = items
                .iter()
                .map(|s| json!({ "stringValue": s }))
                .collect::<Vec<_>>();
            json!({ "arrayValue": { "values": values } })
        }
    }
}

/// A JSON number, or the proto3 JSON strings for the values JSON numbers cannot hold.
fn double(f: f64) -> Value {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        f.into()
    }
}

/// Nanoseconds since the Unix epoch as a decimal string (a `fixed64` in OTLP/JSON); 0 before it.
fn unix_nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        .to_string()
}

enum Msg {
    Span(Box<Span>),
    Flush(oneshot::Sender<()>),
}

#[derive(Debug, Default)]
struct Counters {
    dropped: AtomicU64,
    exported: AtomicU64,
}

/// A handle on the export queue; clones share the queue and the counters. The background task
/// sends what is left and stops once every handle is dropped.
#[derive(Debug, Clone)]
pub struct OtlpExporter {
    tx: mpsc::Sender<Msg>,
    counters: Arc<Counters>,
}

impl OtlpExporter {
    /// Validates `cfg` and starts the background task on the current tokio runtime.
    pub fn spawn(cfg: OtlpConfig) -> Result<Self, OtlpError> {
        let endpoint_err = |reason: String| OtlpError::Endpoint {
            endpoint: cfg.endpoint.clone(),
            reason,
        };
        let url = reqwest::Url::parse(&cfg.endpoint).map_err(|e| endpoint_err(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(endpoint_err(format!(
                "scheme {:?} is not http or https",
                url.scheme()
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(endpoint_err("no host".to_owned()));
        }
        for (field, value) in [("capacity", cfg.capacity), ("batch", cfg.batch)] {
            if value == 0 {
                return Err(OtlpError::Zero { field });
            }
        }
        for (field, value) in [
            ("flush_interval", cfg.flush_interval),
            ("timeout", cfg.timeout),
        ] {
            if value.is_zero() {
                return Err(OtlpError::Zero { field });
            }
        }
        let mut headers = HeaderMap::new();
        for (name, value) in &cfg.headers {
            let header_err = |reason: String| OtlpError::Header {
                name: name.clone(),
                reason,
            };
            let n =
                HeaderName::from_bytes(name.as_bytes()).map_err(|e| header_err(e.to_string()))?;
            let mut v = HeaderValue::from_str(value).map_err(|e| header_err(e.to_string()))?;
            v.set_sensitive(true);
            headers.append(n, v);
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| OtlpError::NoRuntime)?;
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(cfg.timeout)
            .build()?;

        let (tx, rx) = mpsc::channel(cfg.capacity);
        let counters = Arc::new(Counters::default());
        let task = Task {
            client,
            url,
            service_name: cfg.service_name,
            batch: cfg.batch,
            flush_interval: cfg.flush_interval,
            counters: Arc::clone(&counters),
            failing: false,
        };
        runtime.spawn(task.run(rx));
        Ok(Self { tx, counters })
    }

    /// Queues `span` without waiting. `false` (and one more [`dropped`](Self::dropped)) when the
    /// queue is full or the background task is gone.
    pub fn export(&self, span: Span) -> bool {
        let sent = self.tx.try_send(Msg::Span(Box::new(span))).is_ok();
        if !sent {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    /// Spans dropped: refused by a full queue, in a request that failed, or rejected by the
    /// collector in a partial success.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// Spans the collector accepted.
    pub fn exported(&self) -> u64 {
        self.counters.exported.load(Ordering::Relaxed)
    }

    /// Waits until every span queued before this call has been sent, or its request has failed.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_ok() {
            // An error means the task is gone, so nothing is left to wait for.
            let _ = wait.await;
        }
    }
}

/// The background task: owns the batch and the HTTP client.
struct Task {
    client: reqwest::Client,
    url: reqwest::Url,
    service_name: String,
    batch: usize,
    flush_interval: Duration,
    counters: Arc<Counters>,
    /// Whether the last request failed; a failure is logged only when this turns true.
    failing: bool,
}

impl Task {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut pending: Vec<Span> = Vec::new();
        // When the oldest pending span has waited `flush_interval`.
        let mut deadline: Option<Instant> = None;
        loop {
            let msg = match deadline {
                Some(at) => tokio::select! {
                    msg = rx.recv() => msg,
                    () = tokio::time::sleep_until(at) => {
                        self.send(std::mem::take(&mut pending)).await;
                        deadline = None;
                        continue;
                    }
                },
                None => rx.recv().await,
            };
            match msg {
                Some(Msg::Span(span)) => {
                    if pending.is_empty() {
                        deadline = Some(Instant::now() + self.flush_interval);
                    }
                    pending.push(*span);
                    if pending.len() >= self.batch {
                        self.send(std::mem::take(&mut pending)).await;
                        deadline = None;
                    }
                }
                Some(Msg::Flush(done)) => {
                    self.send(std::mem::take(&mut pending)).await;
                    deadline = None;
                    let _ = done.send(());
                }
                None => {
                    self.send(std::mem::take(&mut pending)).await;
                    return;
                }
            }
        }
    }

    /// POSTs one batch, retrying once when the OTLP/HTTP rules allow, and counts the outcome.
    async fn send(&mut self, spans: Vec<Span>) {
        if spans.is_empty() {
            return;
        }
        let n = u64::try_from(spans.len()).unwrap_or(u64::MAX);
        let body = encode(&spans, &self.service_name);
        drop(spans);
        let mut outcome = self.post(&body).await;
        if let Err(failure) = &outcome
            && failure.retryable
        {
            tokio::time::sleep(RETRY_DELAY).await;
            outcome = self.post(&body).await;
        }
        match outcome {
            Ok(rejected) => {
                let rejected = rejected.min(n);
                self.counters
                    .exported
                    .fetch_add(n - rejected, Ordering::Relaxed);
                self.counters.dropped.fetch_add(rejected, Ordering::Relaxed);
                if self.failing {
                    eprintln!("otlp: export to {} works again", self.url);
                }
                self.failing = false;
            }
            Err(failure) => {
                self.counters.dropped.fetch_add(n, Ordering::Relaxed);
                if !self.failing {
                    eprintln!(
                        "otlp: export to {} failed, {n} spans dropped (further failures not logged until one succeeds): {}",
                        self.url, failure.reason
                    );
                }
                self.failing = true;
            }
        }
    }

    /// One request; `Ok` carries the number of spans the collector reported as rejected.
    async fn post(&self, body: &Value) -> Result<u64, Failure> {
        let response = self
            .client
            .post(self.url.clone())
            // Sets `content-type: application/json`, over any configured header of that name.
            .json(body)
            .send()
            .await
            .map_err(|e| Failure {
                retryable: true,
                reason: error_chain(&e),
            })?;
        let status = response.status();
        // Read the body to the end so the connection can be reused.
        let answer = response.bytes().await.unwrap_or_default();
        if status.is_success() {
            Ok(rejected_spans(&answer))
        } else {
            Err(Failure {
                retryable: matches!(status.as_u16(), 429 | 502 | 503 | 504),
                reason: format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&answer[..answer.len().min(200)])
                ),
            })
        }
    }
}

struct Failure {
    retryable: bool,
    reason: String,
}

/// `partialSuccess.rejectedSpans` of an `ExportTraceServiceResponse`, 0 when absent or unreadable.
fn rejected_spans(answer: &[u8]) -> u64 {
    let Ok(v) = serde_json::from_slice::<Value>(answer) else {
        return 0;
    };
    match v.pointer("/partialSuccess/rejectedSpans") {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
        _ => 0,
    }
}

/// The error and its sources: reqwest's top-level message alone rarely names the cause.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn encode_matches_hand_written_otlp_json() {
        let t0 = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let call = GenAiCall {
            operation: "chat".into(),
            provider: "vllm".into(),
            request_model: "llama-3".into(),
            response_model: Some("llama-3-8b".into()),
            finish_reasons: vec!["stop".into(), "length".into()],
            input_tokens: Some(12),
            temperature: Some(0.5),
            server_port: Some(8000),
            error_type: Some("timeout".into()),
            ..GenAiCall::default()
        };
        let mut attributes = call.attributes();
        attributes.push(("kiln.cached".into(), true.into()));
        let span = Span {
            trace_id: [
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
                0x47, 0x36,
            ],
            span_id: [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7],
            parent_span_id: Some([1, 2, 3, 4, 5, 6, 7, 8]),
            name: call.span_name(),
            kind: SpanKind::Client,
            start: t0,
            end: t0 + Duration::from_millis(250),
            attributes,
            events: vec![evaluation_event(
                "relevance",
                Some(0.75),
                Some("relevant"),
                t0 + Duration::from_millis(200),
            )],
            error: Some("upstream timed out".into()),
        };
        let version = env!("CARGO_PKG_VERSION");
        let expected = json!({
          "resourceSpans": [{
            "resource": { "attributes": [
              { "key": "service.name", "value": { "stringValue": "gateway" } },
              { "key": "telemetry.sdk.name", "value": { "stringValue": "kiln" } },
              { "key": "telemetry.sdk.language", "value": { "stringValue": "rust" } },
              { "key": "telemetry.sdk.version", "value": { "stringValue": version } }
            ]},
            "scopeSpans": [{
              "scope": { "name": "kiln-gateway", "version": version },
              "spans": [{
                "traceId": "4bf92f3577b34da6a3ce929d0e0e4736",
                "spanId": "00f067aa0ba902b7",
                "parentSpanId": "0102030405060708",
                "name": "chat llama-3",
                "kind": 3,
                "startTimeUnixNano": "1700000000123456789",
                "endTimeUnixNano": "1700000000373456789",
                "attributes": [
                  { "key": "gen_ai.operation.name", "value": { "stringValue": "chat" } },
                  { "key": "gen_ai.provider.name", "value": { "stringValue": "vllm" } },
                  { "key": "gen_ai.request.model", "value": { "stringValue": "llama-3" } },
                  { "key": "gen_ai.response.model", "value": { "stringValue": "llama-3-8b" } },
                  { "key": "gen_ai.response.finish_reasons", "value": { "arrayValue": { "values": [
                    { "stringValue": "stop" }, { "stringValue": "length" }
                  ]}}},
                  { "key": "gen_ai.usage.input_tokens", "value": { "intValue": "12" } },
                  { "key": "gen_ai.request.temperature", "value": { "doubleValue": 0.5 } },
                  { "key": "server.port", "value": { "intValue": "8000" } },
                  { "key": "error.type", "value": { "stringValue": "timeout" } },
                  { "key": "kiln.cached", "value": { "boolValue": true } }
                ],
                "events": [{
                  "timeUnixNano": "1700000000323456789",
                  "name": "gen_ai.evaluation.result",
                  "attributes": [
                    { "key": "gen_ai.evaluation.name", "value": { "stringValue": "relevance" } },
                    { "key": "gen_ai.evaluation.score.value", "value": { "doubleValue": 0.75 } },
                    { "key": "gen_ai.evaluation.score.label", "value": { "stringValue": "relevant" } }
                  ]
                }],
                "status": { "code": 2, "message": "upstream timed out" }
              }]
            }]
          }]
        });
        let got = encode(&[span], "gateway");
        assert_eq!(got, expected);
        // Attribute order is part of the output, and `Value` equality ignores key order only.
        assert_eq!(
            serde_json::to_string(&got).unwrap(),
            serde_json::to_string(&expected).unwrap()
        );
    }

    #[test]
    fn root_span_without_error_leaves_defaults_out() {
        let span = Span {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: None,
            name: "chat".into(),
            kind: SpanKind::Server,
            start: UNIX_EPOCH,
            end: UNIX_EPOCH,
            attributes: vec![],
            events: vec![],
            error: None,
        };
        let got = encode(&[span], "s");
        let s = &got["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        let keys: Vec<&str> = s.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "traceId",
                "spanId",
                "name",
                "kind",
                "startTimeUnixNano",
                "endTimeUnixNano",
                "attributes"
            ]
        );
        assert_eq!(s["kind"], 2);
        assert_eq!(s["startTimeUnixNano"], "0");
    }

    #[test]
    fn non_finite_doubles_use_proto3_json_strings() {
        assert_eq!(
            any_value(&AttrValue::Float(f64::NAN)),
            json!({"doubleValue": "NaN"})
        );
        assert_eq!(
            any_value(&AttrValue::Float(f64::NEG_INFINITY)),
            json!({"doubleValue": "-Infinity"})
        );
        assert_eq!(any_value(&AttrValue::Int(-7)), json!({"intValue": "-7"}));
        assert_eq!(AttrValue::from(u64::MAX), AttrValue::Int(i64::MAX));
    }

    #[test]
    fn partial_success_rejected_spans_read_as_string_or_number() {
        assert_eq!(
            rejected_spans(br#"{"partialSuccess":{"rejectedSpans":"3"}}"#),
            3
        );
        assert_eq!(
            rejected_spans(br#"{"partialSuccess":{"rejectedSpans":4}}"#),
            4
        );
        assert_eq!(rejected_spans(b"{}"), 0);
        assert_eq!(rejected_spans(b""), 0);
    }
}
