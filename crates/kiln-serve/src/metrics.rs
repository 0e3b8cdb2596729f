//! Prometheus metrics in vLLM's style and names, with a `kiln:` prefix and a `model_name` label
//! on every series, so dashboards built for vLLM need only the prefix changed.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric the server exports, registered in its own registry.
#[derive(Debug)]
pub struct ServeMetrics {
    registry: Registry,
    pub num_requests_running: IntGauge,
    pub num_requests_waiting: IntGauge,
    /// Fraction of KV-cache blocks in use, 0–1.
    pub kv_cache_usage_perc: Gauge,
    /// Prompt tokens looked up in the prefix cache, and those found.
    pub prefix_cache_queries: IntCounter,
    pub prefix_cache_hits: IntCounter,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    /// Finished requests by `finished_reason`: `stop`, `length` or `abort`.
    pub request_success: IntCounterVec,
    /// Sequences whose KV blocks were taken back to make room, to be recomputed later.
    pub num_preemptions: IntCounter,
    /// Requests refused because the queue was full.
    pub requests_rejected: IntCounter,
    /// Adapters given new weights in place through `POST /admin/adapters`.
    pub adapter_swaps: IntCounter,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_request_latency: Histogram,
    pub request_queue_time: Histogram,
    pub request_prompt_tokens: Histogram,
    pub request_generation_tokens: Histogram,
    /// Sequences in each forward pass.
    pub batch_size: Histogram,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

impl ServeMetrics {
    pub fn new(model_name: &str) -> Self {
        let registry = Registry::new();
        let label = |opts: Opts| opts.const_label("model_name", model_name);
        let hlabel = |opts: HistogramOpts| opts.const_label("model_name", model_name);
        macro_rules! register {
            ($metric:expr) => {{
                let m = $metric.expect("metric options are valid");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric names are unique");
                m
            }};
        }
        let gauge = |name: &str, help: &str| IntGauge::with_opts(label(Opts::new(name, help)));
        let counter = |name: &str, help: &str| IntCounter::with_opts(label(Opts::new(name, help)));
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            Histogram::with_opts(hlabel(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            ))
        };
        Self {
            num_requests_running: register!(gauge(
                "kiln:num_requests_running",
                "Sequences in the running batch."
            )),
            num_requests_waiting: register!(gauge(
                "kiln:num_requests_waiting",
                "Sequences waiting for a slot."
            )),
            kv_cache_usage_perc: register!(Gauge::with_opts(label(Opts::new(
                "kiln:kv_cache_usage_perc",
                "Fraction of KV-cache blocks in use (1 = full)."
            )))),
            prefix_cache_queries: register!(counter(
                "kiln:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache."
            )),
            prefix_cache_hits: register!(counter(
                "kiln:prefix_cache_hits",
                "Prompt tokens whose KV came from the prefix cache."
            )),
            prompt_tokens: register!(counter(
                "kiln:prompt_tokens_total",
                "Prompt tokens processed."
            )),
            generation_tokens: register!(counter(
                "kiln:generation_tokens_total",
                "Tokens generated."
            )),
            request_success: register!(IntCounterVec::new(
                label(Opts::new(
                    "kiln:request_success_total",
                    "Finished sequences by finish reason."
                )),
                &["finished_reason"]
            )),
            num_preemptions: register!(counter(
                "kiln:num_preemptions_total",
                "Sequences preempted (KV blocks freed, recomputed later)."
            )),
            requests_rejected: register!(counter(
                "kiln:requests_rejected_total",
                "Requests refused with 429 because the queue was full."
            )),
            adapter_swaps: register!(counter(
                "kiln:adapter_swaps_total",
                "Adapters replaced without a restart (POST /admin/adapters on a served name)."
            )),
            time_to_first_token: register!(histogram(
                "kiln:time_to_first_token_seconds",
                "From arrival to the first generated token.",
                LATENCY_BUCKETS
            )),
            inter_token_latency: register!(histogram(
                "kiln:inter_token_latency_seconds",
                "Between consecutive tokens of a sequence.",
                LATENCY_BUCKETS
            )),
            e2e_request_latency: register!(histogram(
                "kiln:e2e_request_latency_seconds",
                "From arrival to the last token.",
                LATENCY_BUCKETS
            )),
            request_queue_time: register!(histogram(
                "kiln:request_queue_time_seconds",
                "From arrival to admission into the running batch.",
                LATENCY_BUCKETS
            )),
            request_prompt_tokens: register!(histogram(
                "kiln:request_prompt_tokens",
                "Prompt length of finished sequences.",
                TOKEN_BUCKETS
            )),
            request_generation_tokens: register!(histogram(
                "kiln:request_generation_tokens",
                "Generated length of finished sequences.",
                TOKEN_BUCKETS
            )),
            batch_size: register!(histogram(
                "kiln:batch_size",
                "Sequences in each forward pass.",
                BATCH_BUCKETS
            )),
            registry,
        }
    }

    /// Every metric in Prometheus' text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for metrics this registry built.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
