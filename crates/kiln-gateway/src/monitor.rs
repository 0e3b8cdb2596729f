//! The gateway's monitoring: what each finished request adds to the trace store, the live
//! dashboard, the drift windows, the hallucination counters, the Prometheus metrics and the
//! OTLP export. The analysis itself is `kiln-monitor`'s; this module feeds it.
//!
//! Nothing here runs before the reply goes out. The request path only keeps what it already had
//! in hand (the prompt's text, any retrieved context in the messages, the request's sampling
//! parameters) in [`RequestSignals`]; the reply's text and confidence are read as the reply
//! passes ([`ReplySignals`]). [`Monitor::finish`] then runs in the accounting task: confidence
//! and grounding scores, drift features (kept as numbers and hashes, never as text), the live
//! series, the metrics, the span and the trace, which is queued to the store's batch writer.
//!
//! Drift is tested on a timer ([`spawn_drift_task`]) on the blocking pool, comparing the
//! reference window (a file given in the config, or the first `window` requests) with the last
//! `window` requests; a change of verdict is logged, counted, and POSTed to the webhook.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts,
    Registry,
};
use serde_json::{Value, json};

use kiln_monitor::confidence::{Confidence, StreamConfidence};
use kiln_monitor::drift::{DriftConfig, DriftReport, detect};
use kiln_monitor::features::{LengthUnit, Sample, SampleFeatures, read_samples};
use kiln_monitor::grounding::Context as GroundingContext;
use kiln_monitor::hallucination::{Calibration, HallucinationConfig, assess};
use kiln_monitor::live::{DriftPoint, Live, Observation};
use kiln_monitor::otlp::{
    GenAiCall, OtlpConfig, OtlpExporter, Span, SpanKind, evaluation_event, new_span_id,
    new_trace_id,
};
use kiln_monitor::store::{ContentRecord, Recorder, RequestRecord, Store};

use crate::config::{GatewayConfig, MonitorConfig};
use crate::metrics::LabelCap;
use crate::validate::Endpoint;

/// Everything the gateway's monitoring keeps. Shared by every request (behind the state's `Arc`).
pub struct Monitor {
    enabled: bool,
    recorder: Recorder,
    live: Live,
    drift: Option<Arc<DriftState>>,
    calibration: Calibration,
    hallucination: HallucinationConfig,
    infra: Vec<(String, f64)>,
    otlp: Option<OtlpExporter>,
    metrics: MonitorMetrics,
}

/// What a request brought that monitoring uses, taken on the request path from what was already
/// parsed.
#[derive(Debug, Default)]
pub struct RequestSignals {
    /// `chat` or `text_completion`.
    pub operation: &'static str,
    /// The user's text (chat: the user messages; completions: the prompt).
    pub prompt: String,
    /// Retrieved context found in the messages, for the grounding check.
    pub context: Option<String>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<i64>,
    pub n: Option<u64>,
    /// The caller's W3C trace context, so the span joins its trace.
    pub parent: Option<([u8; 16], [u8; 8])>,
}

/// What the reply brought: read from a whole reply, or gathered from a stream's events.
#[derive(Debug, Default)]
pub struct ReplySignals {
    /// The first choice's text.
    pub text: Option<String>,
    pub confidence: Option<Confidence>,
    pub finish_reasons: Vec<String>,
    pub response_id: Option<String>,
    pub response_model: Option<String>,
    /// Time to the first token: measured on streams, reported by kiln serve otherwise.
    pub ttft: Option<Duration>,
    /// The upstream's own queue time (kiln serve's `kiln.choices[].queue_ms`).
    pub queue_ms: Option<f64>,
}

impl RequestSignals {
    /// Reads the signals of a validated request body.
    pub fn of(endpoint: Endpoint, body: &Value, traceparent: Option<&str>) -> Self {
        let operation = match endpoint {
            Endpoint::Chat => "chat",
            Endpoint::Completion => "text_completion",
        };
        let prompt = match endpoint {
            Endpoint::Chat => user_text(body),
            Endpoint::Completion => match body.get("prompt") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(items)) => items
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("\n"),
                _ => String::new(),
            },
        };
        let number = |key: &str| body.get(key).and_then(Value::as_f64);
        let count = |key: &str| body.get(key).and_then(Value::as_u64);
        Self {
            operation,
            prompt,
            context: kiln_monitor::grounding::context_of(body),
            max_tokens: count("max_completion_tokens").or_else(|| count("max_tokens")),
            temperature: number("temperature"),
            top_p: number("top_p"),
            seed: body.get("seed").and_then(Value::as_i64),
            n: count("n"),
            parent: traceparent
                .and_then(kiln_monitor::otlp::parse_traceparent)
                .map(|(trace, span, _)| (trace, span)),
        }
    }
}

/// The text of a chat request's user messages (string or text parts), one per line.
fn user_text(body: &Value) -> String {
    let mut out = String::new();
    for m in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if m.get("role").and_then(Value::as_str) != Some("user") {
            continue;
        }
        let mut push = |s: &str| {
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(s);
        };
        match m.get("content") {
            Some(Value::String(s)) => push(s),
            Some(Value::Array(parts)) => {
                for p in parts {
                    if let Some(s) = p.get("text").and_then(Value::as_str) {
                        push(s);
                    }
                }
            }
            _ => {}
        }
    }
    out
}

impl ReplySignals {
    /// Reads a whole (non-streamed) reply.
    pub fn of_reply(body: &Value) -> Self {
        let first = body.get("choices").and_then(|c| c.get(0));
        let text = first.and_then(|c| {
            c.get("message")
                .and_then(|m| m.get("content"))
                .or_else(|| c.get("text"))
                .and_then(Value::as_str)
                .map(str::to_string)
        });
        let finish_reasons = body
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("finish_reason").and_then(Value::as_str))
            .map(str::to_string)
            .collect();
        let kiln = kiln_stats(body);
        Self {
            text,
            confidence: kiln_monitor::confidence::from_reply(body, 0),
            finish_reasons,
            response_id: body.get("id").and_then(Value::as_str).map(str::to_string),
            response_model: body
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_string),
            ttft: kiln
                .and_then(|k| k.get("ttft_ms"))
                .and_then(Value::as_f64)
                .filter(|ms| ms.is_finite() && *ms >= 0.0)
                .map(|ms| Duration::from_secs_f64(ms / 1e3)),
            queue_ms: kiln.and_then(|k| k.get("queue_ms")).and_then(Value::as_f64),
        }
    }
}

/// kiln serve's per-choice statistics of the first choice, when the reply carries them.
fn kiln_stats(body: &Value) -> Option<&Value> {
    body.get("kiln")?.get("choices")?.get(0)
}

/// Gathers [`ReplySignals`] from a stream's events as they pass.
#[derive(Debug, Default)]
pub struct StreamSignals {
    text: String,
    confidence: StreamConfidence,
    finish_reasons: Vec<String>,
    response_id: Option<String>,
    response_model: Option<String>,
    queue_ms: Option<f64>,
    /// When the first content arrived, measured from the upstream request's start.
    pub first_token: Option<Duration>,
}

impl StreamSignals {
    /// One parsed `data:` event; `since_upstream` is the time since the upstream request began.
    pub fn push(&mut self, chunk: &Value, since_upstream: Duration) {
        self.confidence.push_chunk(chunk);
        if self.response_id.is_none() {
            self.response_id = chunk.get("id").and_then(Value::as_str).map(str::to_string);
            self.response_model = chunk
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_string);
        }
        if let Some(q) = kiln_stats(chunk)
            .and_then(|k| k.get("queue_ms"))
            .and_then(Value::as_f64)
        {
            self.queue_ms = Some(q);
        }
        for c in chunk
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(reason) = c.get("finish_reason").and_then(Value::as_str) {
                self.finish_reasons.push(reason.to_string());
            }
            let text = c
                .get("delta")
                .and_then(|d| d.get("content"))
                .or_else(|| c.get("text"))
                .and_then(Value::as_str);
            if let Some(t) = text.filter(|t| !t.is_empty()) {
                self.first_token.get_or_insert(since_upstream);
                if c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0 {
                    self.text.push_str(t);
                }
            }
        }
    }

    pub fn finish(self) -> ReplySignals {
        ReplySignals {
            text: Some(self.text),
            confidence: self.confidence.finish(),
            finish_reasons: self.finish_reasons,
            response_id: self.response_id,
            response_model: self.response_model,
            ttft: self.first_token,
            queue_ms: self.queue_ms,
        }
    }
}

/// A finished request as the accounting saw it.
pub struct Finished {
    pub record: RequestRecord,
    pub content: Option<ContentRecord>,
    pub request: Option<RequestSignals>,
    pub reply: Option<ReplySignals>,
    pub cache_lookup: bool,
    pub guard_blocked: bool,
    pub upstream_address: Option<(String, Option<u16>)>,
}

impl Monitor {
    /// Starts the trace writer, the drift task and the OTLP exporter (inside a tokio runtime).
    pub fn start(
        config: &GatewayConfig,
        store: Store,
        registry: &Registry,
    ) -> anyhow::Result<Arc<Self>> {
        let cfg = &config.monitor;
        let calibration = match &cfg.hallucination.calibration {
            Some(path) => Calibration::load(path).with_context(|| {
                format!(
                    "monitor.hallucination.calibration: reading {}",
                    path.display()
                )
            })?,
            None => Calibration::default(),
        };
        let drift = if cfg.enabled && cfg.drift.enabled {
            Some(Arc::new(DriftState::new(cfg)?))
        } else {
            None
        };
        let otlp = match (&cfg.otlp, cfg.enabled) {
            (Some(o), true) => Some(
                OtlpExporter::spawn(OtlpConfig {
                    headers: o
                        .headers
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    ..OtlpConfig::new(o.endpoint.clone(), o.service_name.clone())
                })
                .context("monitor.otlp")?,
            ),
            _ => None,
        };
        let live = Live::new(Duration::from_secs(cfg.bucket_s), cfg.buckets);
        let infra: Vec<(String, f64)> = cfg
            .infra
            .iter()
            .map(|c| (c.model.clone(), c.cost_per_hour))
            .collect();
        let total_infra: f64 = infra.iter().map(|(_, c)| c).sum();
        live.set_infra_cost_per_hour((total_infra > 0.0).then_some(total_infra));
        let monitor = Arc::new(Self {
            enabled: cfg.enabled,
            recorder: Recorder::spawn(store, cfg.trace_buffer),
            live,
            drift,
            calibration,
            hallucination: HallucinationConfig {
                max_p_wrong: cfg.hallucination.max_p_wrong,
                min_grounding: cfg.hallucination.min_grounding,
            },
            infra,
            otlp,
            metrics: MonitorMetrics::new(registry)?,
        });
        if let Some(d) = &monitor.drift {
            spawn_drift_task(monitor.clone(), d.clone(), cfg);
        }
        Ok(monitor)
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    pub fn live(&self) -> &Live {
        &self.live
    }

    /// Waits until every trace queued so far is in the store (and every span sent).
    pub async fn flush(&self) {
        self.recorder.flush().await;
        if let Some(o) = &self.otlp {
            o.flush().await;
        }
    }

    /// The last drift report, when a test has run.
    pub fn last_drift(&self) -> Option<DriftReport> {
        let d = self.drift.as_ref()?;
        d.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Tests drift now (as the timer does) and publishes the result; `None` when drift is off
    /// or the current window has too few requests yet.
    pub async fn check_drift(&self) -> Option<DriftReport> {
        let drift = self.drift.as_ref()?;
        let (reference, current) = drift.windows()?;
        let config = drift.config.clone();
        let report = tokio::task::spawn_blocking(move || detect(&reference, &current, &config))
            .await
            .ok()?;
        match report {
            Ok(report) => {
                self.drift_tested(drift, &report, &reqwest::Client::new())
                    .await;
                Some(report)
            }
            Err(e) => {
                eprintln!("kiln gateway: drift not tested: {e}");
                None
            }
        }
    }

    /// Requests in the drift windows so far: (reference, current).
    pub fn drift_window_sizes(&self) -> (usize, usize) {
        self.drift.as_ref().map_or((0, 0), |d| {
            let r = d.reference.lock().unwrap_or_else(|e| e.into_inner()).len();
            let c = d.current.lock().unwrap_or_else(|e| e.into_inner()).len();
            (r, c)
        })
    }

    /// Empties the current window: the next test sees only what arrives from now on.
    pub fn reset_current_window(&self) {
        if let Some(d) = &self.drift {
            d.current.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    /// Scores a finished request, feeds every consumer, and queues its trace.
    pub fn finish(&self, done: Finished) {
        let Finished {
            mut record,
            content,
            request,
            reply,
            cache_lookup,
            guard_blocked,
            upstream_address,
        } = done;
        if self.enabled
            && let Some(req) = &request
        {
            record.operation = Some(req.operation.to_string());
        }
        let answered = record.status < 400;
        if self.enabled
            && answered
            && let Some(reply) = &reply
        {
            record.queue_ms = reply.queue_ms.filter(|q| q.is_finite() && *q >= 0.0);
            record.ttft_ms = reply.ttft.map(|t| t.as_secs_f64() * 1e3);
            if let Some(c) = &reply.confidence {
                record.mean_logprob = Some(c.mean_logprob);
                record.mean_entropy = c.mean_entropy;
            }
            let grounding = match (&request, &reply.text) {
                (
                    Some(RequestSignals {
                        context: Some(ctx), ..
                    }),
                    Some(text),
                ) => GroundingContext::new(ctx).ground(text),
                _ => None,
            };
            let assessment = assess(
                reply.confidence.as_ref(),
                grounding.as_ref(),
                &self.calibration,
                &self.hallucination,
            );
            if let Some(a) = &assessment {
                record.p_wrong = a.p_wrong;
                record.grounding = a.grounding;
                record.hallucination = Some(a.flagged);
                self.metrics.assessed(&record.model, a);
            }
            if let (Some(drift), Some(req)) = (&self.drift, &request) {
                // Lengths in the reference's unit: words, or tokens for a trace export.
                let tokens = drift.token_lengths;
                let sample = Sample {
                    prompt: Some(req.prompt.clone()),
                    completion: reply.text.clone(),
                    prompt_tokens: tokens.then_some(record.prompt_tokens),
                    completion_tokens: tokens.then_some(record.completion_tokens),
                    output_entropy: reply.confidence.and_then(|c| c.mean_entropy),
                };
                if let Some(features) = SampleFeatures::from_sample(&sample) {
                    drift.push(features);
                }
            }
        }
        if self.enabled {
            self.metrics.observe(&record);
            self.live.observe(&Observation {
                at: record.at,
                tenant: record.tenant.clone(),
                model: record.model.clone(),
                status: record.status,
                total_ms: record.total_ms.unwrap_or(record.gateway_ms),
                gateway_ms: record.gateway_ms,
                queue_ms: record.queue_ms,
                ttft_ms: record.ttft_ms,
                prompt_tokens: record.prompt_tokens,
                completion_tokens: record.completion_tokens,
                cost_usd: record.cost_usd,
                cache_hit: record.cache_hit,
                cache_lookup,
                guard_blocked,
                hallucination: record.hallucination,
                p_wrong: record.p_wrong,
            });
            if let Some(otlp) = &self.otlp {
                let span = self.span(&record, request.as_ref(), reply.as_ref(), upstream_address);
                if !otlp.export(span) {
                    self.metrics.spans_dropped.inc();
                }
            }
        }
        self.recorder.record(record);
        if let Some(c) = content {
            self.recorder.record_content(c);
        }
    }

    /// The request's span: a CLIENT span for the model call, with the GenAI attributes.
    fn span(
        &self,
        r: &RequestRecord,
        request: Option<&RequestSignals>,
        reply: Option<&ReplySignals>,
        upstream: Option<(String, Option<u16>)>,
    ) -> Span {
        let (server_address, server_port) = match upstream {
            Some((host, port)) => (Some(host), port),
            None => (None, None),
        };
        let call = GenAiCall {
            operation: request.map_or("chat", |q| q.operation).to_string(),
            provider: "kiln".to_string(),
            request_model: r.model.clone(),
            response_model: reply.and_then(|p| p.response_model.clone()),
            response_id: reply.and_then(|p| p.response_id.clone()),
            finish_reasons: reply.map(|p| p.finish_reasons.clone()).unwrap_or_default(),
            input_tokens: Some(r.prompt_tokens),
            output_tokens: Some(r.completion_tokens),
            max_tokens: request.and_then(|q| q.max_tokens),
            temperature: request.and_then(|q| q.temperature),
            top_p: request.and_then(|q| q.top_p),
            seed: request.and_then(|q| q.seed),
            choice_count: request.and_then(|q| q.n),
            server_address,
            server_port,
            error_type: (r.status >= 400).then(|| r.status.to_string()),
        };
        let end = r.at + Duration::from_secs_f64(r.total_ms.unwrap_or(r.gateway_ms).max(0.0) / 1e3);
        let mut attributes = call.attributes();
        attributes.push(("kiln.tenant".into(), r.tenant.clone().into()));
        attributes.push(("kiln.request_id".into(), r.request_id.clone().into()));
        attributes.push(("kiln.cache_hit".into(), r.cache_hit.into()));
        if let Some(g) = &r.guard {
            attributes.push(("kiln.guardrails".into(), g.clone().into()));
        }
        let mut events = Vec::new();
        if let Some(p) = r.p_wrong {
            let label = r.hallucination.map(|h| if h { "flagged" } else { "ok" });
            events.push(evaluation_event(
                "kiln.confidence",
                Some(1.0 - p),
                label,
                end,
            ));
        }
        if let Some(g) = r.grounding {
            events.push(evaluation_event("kiln.grounding", Some(g), None, end));
        }
        let (trace_id, parent_span_id) = match request.and_then(|q| q.parent) {
            Some((trace, span)) => (trace, Some(span)),
            None => (new_trace_id(), None),
        };
        Span {
            trace_id,
            span_id: new_span_id(),
            parent_span_id,
            name: call.span_name(),
            kind: SpanKind::Client,
            start: r.at,
            end,
            attributes,
            events,
            error: (r.status >= 400).then(|| format!("HTTP {}", r.status)),
        }
    }

    /// The dashboard's data.
    pub fn dashboard_data(&self) -> Value {
        serde_json::to_value(self.live.snapshot(SystemTime::now())).unwrap_or(Value::Null)
    }

    /// Refreshes the gauges computed from the live window (infrastructure cost per token, drops)
    /// before `/metrics` renders.
    pub fn refresh_gauges(&self) {
        self.metrics.traces_dropped.inc_by(
            self.recorder
                .dropped()
                .saturating_sub(self.metrics.traces_dropped.get()),
        );
        let snapshot = self.live.snapshot(SystemTime::now());
        let window_hours = snapshot.window_s / 3600.0;
        for m in &snapshot.models {
            let tokens = m.tokens as f64;
            if tokens <= 0.0 {
                continue;
            }
            let label = self.metrics.models.get(&m.name);
            if let Some(per_hour) = self.infra_cost_per_hour(&m.name) {
                self.metrics
                    .infra_cost_per_1k
                    .with_label_values(&[label])
                    .set(per_hour * window_hours / tokens * 1000.0);
            }
            if m.cost_usd > 0.0 {
                self.metrics
                    .price_cost_per_1k
                    .with_label_values(&[label])
                    .set(m.cost_usd / tokens * 1000.0);
            }
        }
    }

    fn infra_cost_per_hour(&self, model: &str) -> Option<f64> {
        self.infra
            .iter()
            .find(|(m, _)| m == model)
            .or_else(|| self.infra.iter().find(|(m, _)| m == "*"))
            .map(|(_, c)| *c)
    }
}

/// The reference and current windows of drift features.
struct DriftState {
    config: DriftConfig,
    window: usize,
    /// From the config's file; else filled by the first `window` requests.
    reference: Mutex<Vec<SampleFeatures>>,
    reference_fixed: bool,
    /// The reference measures lengths in tokens (a trace export): so do the live samples.
    token_lengths: bool,
    current: Mutex<VecDeque<SampleFeatures>>,
    last: Mutex<Option<DriftReport>>,
    alerting: AtomicBool,
    webhook: Option<String>,
}

impl DriftState {
    fn new(cfg: &MonitorConfig) -> anyhow::Result<Self> {
        let reference = match &cfg.drift.reference {
            Some(path) => {
                let samples = read_samples(path).with_context(|| {
                    format!("monitor.drift.reference: reading {}", path.display())
                })?;
                let features: Vec<SampleFeatures> = samples
                    .iter()
                    .filter_map(SampleFeatures::from_sample)
                    .collect();
                if features.len() < 30 {
                    anyhow::bail!(
                        "monitor.drift.reference: {} has {} usable rows; drift tests need at least 30",
                        path.display(),
                        features.len()
                    );
                }
                features
            }
            None => Vec::new(),
        };
        let config = DriftConfig {
            drift_share: cfg.drift.drift_share,
            ..DriftConfig::default()
        };
        Ok(Self {
            config,
            window: cfg.drift.window,
            reference_fixed: !reference.is_empty(),
            token_lengths: reference
                .first()
                .is_some_and(|f| f.prompt_length_unit == LengthUnit::Tokens),
            reference: Mutex::new(reference),
            current: Mutex::new(VecDeque::with_capacity(cfg.drift.window)),
            last: Mutex::new(None),
            alerting: AtomicBool::new(false),
            webhook: cfg.drift.webhook.clone(),
        })
    }

    fn push(&self, f: SampleFeatures) {
        if !self.reference_fixed {
            let mut reference = self.reference.lock().unwrap_or_else(|e| e.into_inner());
            if reference.len() < self.window {
                reference.push(f);
                return;
            }
        }
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.len() == self.window {
            current.pop_front();
        }
        current.push_back(f);
    }

    /// Both windows, when the current one has enough samples to test.
    fn windows(&self) -> Option<(Vec<SampleFeatures>, Vec<SampleFeatures>)> {
        let current: Vec<SampleFeatures> = {
            let c = self.current.lock().unwrap_or_else(|e| e.into_inner());
            if c.len() < MIN_CURRENT.min(self.window) {
                return None;
            }
            c.iter().cloned().collect()
        };
        let reference = self
            .reference
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Some((reference, current))
    }
}

/// Requests the current window needs before drift is tested.
const MIN_CURRENT: usize = 30;

/// Tests drift every `interval_s` on the blocking pool.
fn spawn_drift_task(monitor: Arc<Monitor>, drift: Arc<DriftState>, cfg: &MonitorConfig) {
    let interval = Duration::from_secs(cfg.drift.interval_s);
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some((reference, current)) = drift.windows() else {
                continue;
            };
            let config = drift.config.clone();
            match tokio::task::spawn_blocking(move || detect(&reference, &current, &config)).await {
                Ok(Ok(report)) => monitor.drift_tested(&drift, &report, &client).await,
                Ok(Err(e)) => eprintln!("kiln gateway: drift not tested: {e}"),
                Err(_) => {}
            }
        }
    });
}

impl Monitor {
    /// Publishes a drift test's result: gauges, the dashboard, and on a change of verdict a log
    /// line, a counter and the webhook.
    async fn drift_tested(
        &self,
        drift: &DriftState,
        report: &DriftReport,
        client: &reqwest::Client,
    ) {
        self.metrics.drift(report);
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.live.set_drift(DriftPoint {
            at_ms,
            drift: report.drift,
            share: report.share,
            scores: report
                .features
                .iter()
                .map(|f| (f.feature.clone(), f.score))
                .collect(),
            thresholds: report
                .features
                .iter()
                .map(|f| (f.feature.clone(), f.threshold))
                .collect(),
            drifted: report
                .features
                .iter()
                .filter(|f| f.drift)
                .map(|f| f.feature.clone())
                .collect(),
        });
        *drift.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(report.clone());
        let was = drift.alerting.swap(report.drift, Ordering::Relaxed);
        if was == report.drift {
            return;
        }
        let summary = drift_summary(report);
        let event = if report.drift {
            self.metrics.drift_alerts.inc();
            eprintln!("kiln gateway: DRIFT detected: {summary}");
            "drift_detected"
        } else {
            eprintln!("kiln gateway: drift cleared: {summary}");
            "drift_cleared"
        };
        if let Some(url) = &drift.webhook {
            let body = json!({"event": event, "summary": summary, "report": report});
            let sent = client
                .post(url)
                .timeout(Duration::from_secs(10))
                .json(&body)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => eprintln!("kiln gateway: drift webhook answered {}", r.status()),
                Err(e) => eprintln!("kiln gateway: drift webhook: {e}"),
            }
        }
    }
}

/// `3 of 5 features drifted (prompt_words js=0.31 ≥ 0.1, …)`.
pub fn drift_summary(report: &DriftReport) -> String {
    let drifted: Vec<String> = report
        .features
        .iter()
        .filter(|f| f.drift)
        .map(|f| {
            format!(
                "{} {}={:.3} (threshold {:.3})",
                f.feature, f.test, f.score, f.threshold
            )
        })
        .collect();
    format!(
        "{} of {} features drifted{}",
        report.drifted,
        report.features.len(),
        if drifted.is_empty() {
            String::new()
        } else {
            format!(": {}", drifted.join(", "))
        }
    )
}

/// The monitoring metrics, registered in the gateway's registry.
struct MonitorMetrics {
    duration: HistogramVec,
    ttft: HistogramVec,
    queue: HistogramVec,
    token_usage: HistogramVec,
    operation_duration: HistogramVec,
    assessed: IntCounterVec,
    hallucinations: IntCounterVec,
    p_wrong: Histogram,
    grounding: Histogram,
    drift_score: GaugeVec,
    drift_threshold: GaugeVec,
    feature_drift: GaugeVec,
    drift: Gauge,
    drift_share: Gauge,
    drift_alerts: IntCounter,
    traces_dropped: IntCounter,
    spans_dropped: IntCounter,
    infra_cost_per_1k: GaugeVec,
    price_cost_per_1k: GaugeVec,
    /// Model names come from callers when an upstream serves `"*"`: capped.
    models: LabelCap,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
];

/// `gen_ai.client.token.usage`'s buckets: 1, 4, 16, …, 4^13.
fn token_buckets() -> Vec<f64> {
    (0..14).map(|i| 4f64.powi(i)).collect()
}

/// `gen_ai.client.operation.duration`'s buckets, in seconds.
const OPERATION_BUCKETS: &[f64] = &[
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];

const SHARE_BUCKETS: &[f64] = &[0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0];

impl MonitorMetrics {
    fn new(registry: &Registry) -> anyhow::Result<Self> {
        fn reg<M: prometheus::core::Collector + Clone + 'static>(
            registry: &Registry,
            m: Result<M, prometheus::Error>,
        ) -> anyhow::Result<M> {
            let m = m?;
            registry.register(Box::new(m.clone()))?;
            Ok(m)
        }
        let hist = |name: &str, help: &str, buckets: &[f64], labels: &[&str]| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
        };
        Ok(Self {
            duration: reg(
                registry,
                hist(
                    "kiln_gateway_request_duration_seconds",
                    "Whole requests as the client saw them, to the last byte.",
                    LATENCY_BUCKETS,
                    &["model"],
                ),
            )?,
            ttft: reg(
                registry,
                hist(
                    "kiln_gateway_time_to_first_token_seconds",
                    "Time to the first token: measured on streams, reported by kiln serve otherwise.",
                    LATENCY_BUCKETS,
                    &["model"],
                ),
            )?,
            queue: reg(
                registry,
                hist(
                    "kiln_gateway_upstream_queue_seconds",
                    "Time requests waited in the upstream's queue (as kiln serve reports it).",
                    LATENCY_BUCKETS,
                    &["model"],
                ),
            )?,
            token_usage: reg(
                registry,
                hist(
                    "gen_ai_client_token_usage",
                    "Tokens per request (OpenTelemetry gen_ai.client.token.usage).",
                    &token_buckets(),
                    &[
                        "gen_ai_operation_name",
                        "gen_ai_request_model",
                        "gen_ai_token_type",
                    ],
                ),
            )?,
            operation_duration: reg(
                registry,
                hist(
                    "gen_ai_client_operation_duration_seconds",
                    "Request duration (OpenTelemetry gen_ai.client.operation.duration).",
                    OPERATION_BUCKETS,
                    &["gen_ai_operation_name", "gen_ai_request_model"],
                ),
            )?,
            assessed: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "kiln_monitor_assessed_total",
                        "Replies scored for hallucination (confidence and/or grounding).",
                    ),
                    &["model"],
                ),
            )?,
            hallucinations: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "kiln_monitor_hallucinations_total",
                        "Replies flagged as likely hallucinated, by reason (low_confidence, ungrounded).",
                    ),
                    &["model", "reason"],
                ),
            )?,
            p_wrong: reg(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "kiln_monitor_p_wrong",
                        "Calibrated probability that a reply is wrong, from its token confidence.",
                    )
                    .buckets(SHARE_BUCKETS.to_vec()),
                ),
            )?,
            grounding: reg(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "kiln_monitor_grounding",
                        "Share of a reply's content supported by the request's context.",
                    )
                    .buckets(SHARE_BUCKETS.to_vec()),
                ),
            )?,
            drift_score: reg(
                registry,
                GaugeVec::new(
                    Opts::new(
                        "kiln_monitor_drift_score",
                        "The deciding drift statistic of each feature at the last test.",
                    ),
                    &["feature", "test"],
                ),
            )?,
            drift_threshold: reg(
                registry,
                GaugeVec::new(
                    Opts::new(
                        "kiln_monitor_drift_threshold",
                        "The threshold each feature's drift score is compared with.",
                    ),
                    &["feature"],
                ),
            )?,
            feature_drift: reg(
                registry,
                GaugeVec::new(
                    Opts::new(
                        "kiln_monitor_feature_drift",
                        "1 when the feature drifted at the last test.",
                    ),
                    &["feature"],
                ),
            )?,
            drift: reg(
                registry,
                Gauge::new(
                    "kiln_monitor_drift",
                    "1 when the share of drifted features reached drift_share at the last test.",
                ),
            )?,
            drift_share: reg(
                registry,
                Gauge::new(
                    "kiln_monitor_drift_share",
                    "Share of features drifted at the last test.",
                ),
            )?,
            drift_alerts: reg(
                registry,
                IntCounter::new(
                    "kiln_monitor_drift_alerts_total",
                    "Times the drift verdict turned to drifted.",
                ),
            )?,
            traces_dropped: reg(
                registry,
                IntCounter::new(
                    "kiln_monitor_traces_dropped_total",
                    "Traces lost: queue full or refused by the store.",
                ),
            )?,
            spans_dropped: reg(
                registry,
                IntCounter::new(
                    "kiln_monitor_otlp_spans_dropped_total",
                    "Spans not queued for OTLP export because its queue was full.",
                ),
            )?,
            infra_cost_per_1k: reg(
                registry,
                GaugeVec::new(
                    Opts::new(
                        "kiln_monitor_infra_cost_per_1k_tokens_usd",
                        "Instance cost per hour over the dashboard window, per 1,000 tokens served.",
                    ),
                    &["model"],
                ),
            )?,
            price_cost_per_1k: reg(
                registry,
                GaugeVec::new(
                    Opts::new(
                        "kiln_monitor_cost_per_1k_tokens_usd",
                        "Cost per 1,000 tokens from the configured prices, over the dashboard window.",
                    ),
                    &["model"],
                ),
            )?,
            models: LabelCap::default(),
        })
    }

    fn observe(&self, r: &RequestRecord) {
        let model = self.models.get(&r.model);
        if let Some(ms) = r.total_ms {
            self.duration.with_label_values(&[model]).observe(ms / 1e3);
        }
        if let Some(ms) = r.ttft_ms {
            self.ttft.with_label_values(&[model]).observe(ms / 1e3);
        }
        if let Some(ms) = r.queue_ms {
            self.queue.with_label_values(&[model]).observe(ms / 1e3);
        }
        if r.status < 400 {
            let op = r.operation.as_deref().unwrap_or("chat");
            self.token_usage
                .with_label_values(&[op, model, "input"])
                .observe(r.prompt_tokens as f64);
            self.token_usage
                .with_label_values(&[op, model, "output"])
                .observe(r.completion_tokens as f64);
            if let Some(ms) = r.total_ms {
                self.operation_duration
                    .with_label_values(&[op, model])
                    .observe(ms / 1e3);
            }
        }
    }

    fn assessed(&self, model: &str, a: &kiln_monitor::hallucination::Assessment) {
        let model = self.models.get(model);
        self.assessed.with_label_values(&[model]).inc();
        if let Some(p) = a.p_wrong {
            self.p_wrong.observe(p);
        }
        if let Some(g) = a.grounding {
            self.grounding.observe(g);
        }
        if a.flagged {
            for reason in &a.reasons {
                self.hallucinations
                    .with_label_values(&[model, reason])
                    .inc();
            }
        }
    }

    fn drift(&self, report: &DriftReport) {
        for f in &report.features {
            self.drift_score
                .with_label_values(&[&f.feature, &f.test])
                .set(f.score);
            self.drift_threshold
                .with_label_values(&[&f.feature])
                .set(f.threshold);
            self.feature_drift
                .with_label_values(&[&f.feature])
                .set(if f.drift { 1.0 } else { 0.0 });
        }
        self.drift.set(if report.drift { 1.0 } else { 0.0 });
        self.drift_share.set(report.share);
    }
}
