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
use prometheus::Registry;
use serde_json::{Value, json};

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

mod metrics;
mod signals;

use metrics::MonitorMetrics;
pub use signals::{ReplySignals, RequestSignals, RequestTexts, StreamSignals};

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

    /// Whether finished requests become OTLP spans.
    pub fn exports_spans(&self) -> bool {
        self.enabled && self.otlp.is_some()
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
            mut reply,
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
            && let Some(reply) = &mut reply
        {
            record.queue_ms = reply.queue_ms.filter(|q| q.is_finite() && *q >= 0.0);
            record.ttft_ms = reply.ttft.map(|t| t.as_secs_f64() * 1e3);
            if let Some(c) = &reply.confidence {
                record.mean_logprob = Some(c.mean_logprob);
                record.mean_entropy = c.mean_entropy;
            }
            // The request's texts, parsed here rather than on the request path.
            let texts = request.as_ref().map(RequestSignals::texts);
            let grounding = match (&texts, &reply.text) {
                (
                    Some(RequestTexts {
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
            if let (Some(drift), Some(texts)) = (&self.drift, texts) {
                // Lengths in the reference's unit: words, or tokens for a trace export.
                let tokens = drift.token_lengths;
                // The texts are not needed after this: moved, not copied.
                let sample = Sample {
                    prompt: Some(texts.prompt),
                    completion: reply.text.take(),
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
