//! The monitoring metrics, registered in the gateway's registry beside its own.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts,
    Registry,
};

use kiln_monitor::drift::DriftReport;
use kiln_monitor::hallucination::Assessment;
use kiln_monitor::store::RequestRecord;

use crate::metrics::LabelCap;

/// The monitoring metrics, registered in the gateway's registry.
pub(super) struct MonitorMetrics {
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
    pub(super) drift_alerts: IntCounter,
    pub(super) traces_dropped: IntCounter,
    pub(super) spans_dropped: IntCounter,
    pub(super) infra_cost_per_1k: GaugeVec,
    pub(super) price_cost_per_1k: GaugeVec,
    /// Model names come from callers when an upstream serves `"*"`: capped.
    pub(super) models: LabelCap,
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
    pub(super) fn new(registry: &Registry) -> anyhow::Result<Self> {
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

    pub(super) fn observe(&self, r: &RequestRecord) {
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

    pub(super) fn assessed(&self, model: &str, a: &Assessment) {
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

    pub(super) fn drift(&self, report: &DriftReport) {
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
