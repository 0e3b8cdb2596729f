//! The gateway's Prometheus metrics, served at `/metrics`, in their own registry.
//!
//! Gateway overhead (the time the gateway itself spends on a request: auth, limits, validation,
//! cache, proxying) and upstream latency are separate histograms, so a slow model is never
//! mistaken for a slow gateway. Overhead buckets are fine-grained from 50 µs, since the target
//! is a p99 under 1 ms.
//!
//! Label values that come from callers (model names with a `"*"` upstream, tenants taken from
//! a JWT claim) are capped: past [`MAX_LABEL_VALUES`] distinct values of one label, new ones are
//! counted as `other`, so a client cannot grow the exposition without bound.

use std::collections::HashSet;
use std::sync::RwLock;

use prometheus::{
    CounterVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry,
};

/// Distinct values a caller-controlled label keeps before new ones become `other`.
pub const MAX_LABEL_VALUES: usize = 1000;

const OVERHEAD_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_15, 0.000_2, 0.000_3, 0.000_4, 0.000_5, 0.000_75, 0.001, 0.0015,
    0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

const UPSTREAM_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
];

/// Every metric the gateway exports.
pub struct GatewayMetrics {
    registry: Registry,
    requests: IntCounterVec,
    overhead: Histogram,
    upstream_latency: HistogramVec,
    tokens: IntCounterVec,
    cost: CounterVec,
    cache: IntCounterVec,
    rate_limited: IntCounterVec,
    upstream_errors: IntCounterVec,
    guardrails: IntCounterVec,
    feedback: IntCounterVec,
    models: LabelCap,
    tenants: LabelCap,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl GatewayMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        // The options below are constants: a failure here is a bug in this file, not input.
        macro_rules! register {
            ($metric:expr) => {{
                let m = $metric.expect("metric options are valid");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric names are unique");
                m
            }};
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        Self {
            requests: register!(counter(
                "kiln_gateway_requests_total",
                "Requests answered, by model, tenant and HTTP status.",
                &["model", "tenant", "status"]
            )),
            overhead: register!(Histogram::with_opts(
                HistogramOpts::new(
                    "kiln_gateway_overhead_seconds",
                    "Time the gateway itself spent on a request, upstream excluded."
                )
                .buckets(OVERHEAD_BUCKETS.to_vec())
            )),
            upstream_latency: register!(HistogramVec::new(
                HistogramOpts::new(
                    "kiln_gateway_upstream_latency_seconds",
                    "Time from sending a request upstream to the end of its response."
                )
                .buckets(UPSTREAM_BUCKETS.to_vec()),
                &["upstream"]
            )),
            tokens: register!(counter(
                "kiln_gateway_tokens_total",
                "Tokens by model, tenant and kind (prompt or completion).",
                &["model", "tenant", "kind"]
            )),
            cost: register!(CounterVec::new(
                Opts::new(
                    "kiln_gateway_cost_usd_total",
                    "Cost in USD of requests, from the configured pricing."
                ),
                &["model", "tenant"]
            )),
            cache: register!(counter(
                "kiln_gateway_cache_requests_total",
                "Response-cache lookups by result (hit or miss).",
                &["result"]
            )),
            rate_limited: register!(counter(
                "kiln_gateway_rate_limited_total",
                "Requests refused by a limit, by tenant and limit (rpm, tpm, concurrency, budget…).",
                &["tenant", "limit"]
            )),
            upstream_errors: register!(counter(
                "kiln_gateway_upstream_errors_total",
                "Failed upstream attempts by upstream and kind (connect, timeout, status…).",
                &["upstream", "kind"]
            )),
            guardrails: register!(counter(
                "kiln_gateway_guardrail_verdicts_total",
                "Guardrail detections by tenant, detector (input.pii, output.system_prompt_leak…) and action (block, redact, flag).",
                &["tenant", "detector", "action"]
            )),
            feedback: register!(counter(
                "kiln_gateway_feedback_total",
                "Feedback kept, by kind: thumbs_up, thumbs_down, score, correction, preferred (from POST /v1/feedback) and label (the dashboard's labelling page).",
                &["kind"]
            )),
            registry,
            models: LabelCap::default(),
            tenants: LabelCap::default(),
        }
    }

    /// The registry every metric is in, for others to add theirs (monitoring).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// `model`, or `other` once the model label has too many values.
    pub fn model_label<'a>(&self, model: &'a str) -> &'a str {
        self.models.get(model)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        match prometheus::TextEncoder::new().encode_to_string(&self.registry.gather()) {
            Ok(text) => text,
            Err(e) => {
                eprintln!("kiln gateway: cannot render metrics: {e}");
                String::new()
            }
        }
    }

    pub fn observe_request(&self, model: &str, tenant: &str, status: u16) {
        let status = status_label(status);
        self.requests
            .with_label_values(&[self.models.get(model), self.tenants.get(tenant), &status])
            .inc();
    }

    /// The gateway's own time on a request, upstream excluded.
    pub fn observe_overhead(&self, seconds: f64) {
        if seconds.is_finite() && seconds >= 0.0 {
            self.overhead.observe(seconds);
        }
    }

    pub fn observe_upstream(&self, upstream: &str, seconds: f64) {
        if seconds.is_finite() && seconds >= 0.0 {
            self.upstream_latency
                .with_label_values(&[upstream])
                .observe(seconds);
        }
    }

    pub fn add_tokens(&self, model: &str, tenant: &str, prompt: u64, completion: u64) {
        let (model, tenant) = (self.models.get(model), self.tenants.get(tenant));
        if prompt > 0 {
            self.tokens
                .with_label_values(&[model, tenant, "prompt"])
                .inc_by(prompt);
        }
        if completion > 0 {
            self.tokens
                .with_label_values(&[model, tenant, "completion"])
                .inc_by(completion);
        }
    }

    pub fn add_cost(&self, model: &str, tenant: &str, usd: f64) {
        if usd.is_finite() && usd > 0.0 {
            self.cost
                .with_label_values(&[self.models.get(model), self.tenants.get(tenant)])
                .inc_by(usd);
        }
    }

    pub fn cache(&self, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.cache.with_label_values(&[result]).inc();
    }

    /// A request refused by limit `which` (`rpm`, `tpm`, `concurrency`, `budget`, …).
    pub fn rate_limited(&self, tenant: &str, which: &str) {
        self.rate_limited
            .with_label_values(&[self.tenants.get(tenant), which])
            .inc();
    }

    /// A guardrail detection: `detector` fired and `action` was taken.
    pub fn guardrail(&self, tenant: &str, detector: &str, action: &str) {
        self.guardrails
            .with_label_values(&[self.tenants.get(tenant), detector, action])
            .inc();
    }

    /// One signal of a feedback record kept: `thumbs_up`, `thumbs_down`, `score`, `correction`,
    /// `preferred` or `label` (a fixed set: no caller-controlled values).
    pub fn feedback(&self, kind: &'static str) {
        self.feedback.with_label_values(&[kind]).inc();
    }

    /// A failed upstream attempt of kind `kind` (`connect`, `timeout`, `status_503`, …).
    pub fn upstream_error(&self, upstream: &str, kind: &str) {
        self.upstream_errors
            .with_label_values(&[upstream, kind])
            .inc();
    }
}

/// Common statuses without an allocation.
fn status_label(status: u16) -> std::borrow::Cow<'static, str> {
    let s = match status {
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        413 => "413",
        422 => "422",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        other => return other.to_string().into(),
    };
    s.into()
}

/// The distinct values one label has taken, up to [`MAX_LABEL_VALUES`].
#[derive(Default)]
pub(crate) struct LabelCap {
    seen: RwLock<HashSet<String>>,
}

impl LabelCap {
    /// `value`, or `other` once the label has [`MAX_LABEL_VALUES`] other values.
    pub(crate) fn get<'a>(&self, value: &'a str) -> &'a str {
        {
            let seen = self.seen.read().unwrap_or_else(|e| e.into_inner());
            if seen.contains(value) {
                return value;
            }
            if seen.len() >= MAX_LABEL_VALUES {
                return "other";
            }
        }
        let mut seen = self.seen.write().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= MAX_LABEL_VALUES && !seen.contains(value) {
            return "other";
        }
        seen.insert(value.to_string());
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_controlled_labels_are_capped() {
        let m = GatewayMetrics::new();
        for i in 0..MAX_LABEL_VALUES + 5 {
            m.observe_request(&format!("model-{i}"), "t", 200);
        }
        let text = m.render();
        assert!(text.contains("model=\"model-0\""));
        assert!(!text.contains(&format!("model=\"model-{}\"", MAX_LABEL_VALUES)));
        assert!(text.contains(
            "kiln_gateway_requests_total{model=\"other\",status=\"200\",tenant=\"t\"} 5"
        ));
    }
}
