//! Monitoring for a language model in production.
//!
//! - [`store`]: the trace store — one record per request (tenant, model, upstream, tokens, the
//!   latency split, cost, cache, guard verdicts, confidence and grounding scores) in SQLite or
//!   PostgreSQL, written off the request path in batches.
//! - [`stats`], [`features`] and [`drift`]: a reference window of traffic against the current
//!   one — PSI, Jensen–Shannon, Kolmogorov–Smirnov and normed Wasserstein on prompt length,
//!   word distribution, a hashed n-gram embedding, output length and output entropy, with
//!   Evidently's defaults as thresholds.
//! - [`confidence`], [`grounding`] and [`hallucination`]: confidence from token log-probs and
//!   entropy, the share of a reply its retrieved context supports, and the flag built on both,
//!   with AUROC for calibration.
//! - [`cost`]: cost per token from prices and from what the instances cost per hour.
//! - [`live`] and [`dashboard`]: rolling time series and the page that draws them.
//! - [`feedback`] and [`registry`]: feedback on completions (thumbs, scores, corrections,
//!   preferred choices) kept beside the traces, and the rounds of the feedback loop.
//! - [`otlp`]: OpenTelemetry spans with `gen_ai.*` attributes, exported over OTLP/HTTP.

pub mod confidence;
pub mod cost;
pub mod dashboard;
pub mod drift;
pub mod features;
pub mod feedback;
pub mod grounding;
pub mod hallucination;
pub mod live;
pub mod otlp;
pub mod registry;
pub mod stats;
pub mod store;
