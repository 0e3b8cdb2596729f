//! `kiln bench serve`: a load generator for any OpenAI-compatible server, measuring what vLLM's
//! `vllm bench serve` measures (TTFT, TPOT, ITL, end-to-end latency, throughput) with the same
//! definitions, so a kiln figure and a vLLM figure for the same setup can be set side by side.
//!
//! The client is closed-loop: `concurrency` workers each send a request, read its stream to the
//! end and send the next, until `requests` have been sent. Every request streams
//! (`"stream": true`), asks for the usage chunk and sets `ignore_eos`, so each one decodes exactly
//! `max_tokens` tokens and the load does not depend on what the model happens to say. Prompts
//! are random common English words, different for every request so a prefix cache cannot
//! short-circuit prefill, and sized to about `prompt_len` tokens with the server's own
//! tokenizer when it exposes `POST /tokenize`.
//!
//! Times are taken when a network chunk reaches the client, so they include the transport, as
//! the numbers a user of the server would see. A request that fails (a non-200 answer, a
//! transport error, a stream that breaks off or cannot be parsed) is counted and its reason
//! kept; it never stops the run. Only what makes the run itself impossible (a bad config, no
//! model to name) is an error.
//!
//! See `docs/bench-serve.md` for each metric's exact definition.

mod prompts;
mod report;
mod request;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;

pub use report::{BenchReport, BenchSetup, InputTokenSource, Summary, percentile};

use prompts::Prompt;
use request::{RequestOutcome, RequestSpec};

/// Distinct error messages kept verbatim in the report; the rest are only counted by reason.
const ERRORS_KEPT: usize = 5;

/// Which OpenAI route the load goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// `POST /v1/completions` with a `prompt` string.
    #[default]
    Completions,
    /// `POST /v1/chat/completions` with the prompt as one user message (the server's chat
    /// template adds its tokens to the prompt).
    Chat,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Endpoint::Completions => "completions",
            Endpoint::Chat => "chat",
        })
    }
}

/// One benchmark run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The server's base URL (`http://127.0.0.1:8000`); a trailing `/` or `/v1` is dropped.
    pub url: String,
    /// Requests in flight at most.
    pub concurrency: usize,
    /// Requests sent in all.
    pub requests: usize,
    /// Prompt length to aim for, in the server's tokens.
    pub prompt_len: usize,
    /// Tokens every request generates (`max_tokens` with `ignore_eos`).
    pub max_tokens: usize,
    /// The `model` field of every request; `None` asks `GET /v1/models` and takes the first.
    pub model: Option<String>,
    pub endpoint: Endpoint,
    /// Seeds the prompts: the same seed against the same server sends the same texts.
    pub seed: u64,
    /// Sent as `Authorization: Bearer …` when set.
    pub api_key: Option<String>,
    /// The server whose `POST /tokenize` measures the prompts (default: `url`). Through a
    /// gateway, which has no `/tokenize`, pass the inference server's URL: the prompts are then
    /// the ones a direct run sends, and the two runs compare.
    pub tokenize_url: Option<String>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8000".into(),
            concurrency: 8,
            requests: 64,
            prompt_len: 256,
            max_tokens: 128,
            model: None,
            endpoint: Endpoint::Completions,
            seed: 0,
            api_key: None,
            tokenize_url: None,
        }
    }
}

/// What stops a benchmark from running at all. Failed requests are not errors: they are
/// counted in the [`BenchReport`].
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bench config: `{field}` {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("building the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("finding the model to benchmark at {url}: {reason} (pass --model to skip this)")]
    Models { url: String, reason: String },
    #[error("starting the tokio runtime for the benchmark")]
    Runtime(#[source] std::io::Error),
    #[error("a benchmark worker panicked: {0}")]
    Worker(String),
}

/// `url` without a trailing `/` or `/v1`.
fn base_of(url: &str) -> &str {
    let url = url.trim_end_matches('/');
    url.strip_suffix("/v1").unwrap_or(url)
}

impl BenchConfig {
    fn validate(&self) -> Result<(), BenchError> {
        let invalid = |field, reason: &str| {
            Err(BenchError::InvalidConfig {
                field,
                reason: reason.to_string(),
            })
        };
        if self.concurrency == 0 {
            return invalid("concurrency", "must be at least 1");
        }
        if self.requests == 0 {
            return invalid("requests", "must be at least 1");
        }
        if self.prompt_len == 0 {
            return invalid("prompt_len", "must be at least 1");
        }
        if self.max_tokens == 0 {
            return invalid("max_tokens", "must be at least 1");
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return invalid("url", "must start with http:// or https://");
        }
        if let Some(url) = &self.tokenize_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return invalid("tokenize_url", "must start with http:// or https://");
        }
        Ok(())
    }

    /// `http(s)://host:port`, without a trailing `/` or `/v1`.
    fn base_url(&self) -> &str {
        base_of(&self.url)
    }

    /// Where the prompts are measured: [`BenchConfig::tokenize_url`], else the server's.
    fn tokenize_base(&self) -> &str {
        base_of(self.tokenize_url.as_deref().unwrap_or(&self.url))
    }
}

/// Runs the benchmark: prepares the prompts, sends `cfg.requests` requests with at most
/// `cfg.concurrency` in flight, and summarises them. `on_progress(done, total)` is called after
/// each request finishes, on the caller's task.
pub async fn run_bench(
    cfg: &BenchConfig,
    mut on_progress: impl FnMut(usize, usize),
) -> Result<BenchReport, BenchError> {
    cfg.validate()?;
    let base = cfg.base_url().to_string();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(cfg.concurrency)
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(BenchError::Client)?;
    let model = match &cfg.model {
        Some(m) => m.clone(),
        None => request::first_model(&client, &base, cfg.api_key.as_deref())
            .await
            .map_err(|reason| BenchError::Models {
                url: format!("{base}/v1/models"),
                reason,
            })?,
    };
    let prompts = prompts::prepare(&client, cfg.tokenize_base(), &model, cfg).await;
    let prompt_source = prompts
        .first()
        .map_or(InputTokenSource::Estimate, |p| p.source);

    let spec = Arc::new(RequestSpec {
        client,
        url: format!("{base}{}", cfg.endpoint.path()),
        model: model.clone(),
        endpoint: cfg.endpoint,
        max_tokens: cfg.max_tokens,
        api_key: cfg.api_key.clone(),
    });
    let outcomes = drive(spec, Arc::new(prompts), cfg, &mut on_progress).await?;

    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    let mut errors = Vec::new();
    let mut done = Vec::new();
    for (prompt, outcome) in outcomes.results {
        match outcome {
            RequestOutcome::Done(m) => done.push((prompt, m)),
            RequestOutcome::Failed { reason, message } => {
                *failures.entry(reason).or_default() += 1;
                if errors.len() < ERRORS_KEPT && !errors.contains(&message) {
                    errors.push(message);
                }
            }
        }
    }
    let setup = BenchSetup {
        url: base,
        model,
        endpoint: cfg.endpoint,
        concurrency: cfg.concurrency,
        requests: cfg.requests,
        prompt_len: cfg.prompt_len,
        max_tokens: cfg.max_tokens,
        seed: cfg.seed,
    };
    Ok(report::summarise(
        setup,
        &done,
        failures,
        errors,
        outcomes.duration,
        outcomes.peak_in_flight,
        prompt_source,
    ))
}

/// [`run_bench`] for code that is not async: builds a tokio runtime, runs, drops it.
pub fn run_bench_blocking(cfg: &BenchConfig) -> Result<BenchReport, BenchError> {
    run_bench_blocking_with_progress(cfg, |_, _| {})
}

/// [`run_bench_blocking`] with a progress callback, called on the calling thread.
pub fn run_bench_blocking_with_progress(
    cfg: &BenchConfig,
    on_progress: impl FnMut(usize, usize),
) -> Result<BenchReport, BenchError> {
    let workers = cfg.concurrency.clamp(1, 4);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)?;
    runtime.block_on(run_bench(cfg, on_progress))
}

struct Outcomes {
    /// In request order: the prompt each request sent and how it went.
    results: Vec<(Prompt, RequestOutcome)>,
    /// From the first request sent to the last one finished.
    duration: Duration,
    peak_in_flight: usize,
}

/// `concurrency` workers take request indices off a shared counter until all are sent; results
/// come back over a channel so progress is reported on the caller's task.
async fn drive(
    spec: Arc<RequestSpec>,
    prompts: Arc<Vec<Prompt>>,
    cfg: &BenchConfig,
    on_progress: &mut impl FnMut(usize, usize),
) -> Result<Outcomes, BenchError> {
    let total = prompts.len();
    let next = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..cfg.concurrency.min(total) {
        let (spec, prompts, tx) = (spec.clone(), prompts.clone(), tx.clone());
        let (next, in_flight, peak) = (next.clone(), in_flight.clone(), peak.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(prompt) = prompts.get(i) else { break };
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                let outcome = request::send(&spec, &prompt.text).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                if tx.send((i, outcome)).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);

    let mut outcomes: Vec<Option<RequestOutcome>> = (0..total).map(|_| None).collect();
    let mut done = 0;
    while let Some((i, outcome)) = rx.recv().await {
        outcomes[i] = Some(outcome);
        done += 1;
        on_progress(done, total);
    }
    let duration = started.elapsed();
    while let Some(joined) = workers.join_next().await {
        if let Err(e) = joined {
            return Err(BenchError::Worker(e.to_string()));
        }
    }
    let results = prompts
        .iter()
        .cloned()
        .zip(outcomes)
        .map(|(p, o)| {
            let o = o.unwrap_or_else(|| RequestOutcome::Failed {
                reason: "not sent".into(),
                message: "the request was never sent".into(),
            });
            (p, o)
        })
        .collect();
    Ok(Outcomes {
        results,
        duration,
        peak_in_flight: peak.load(Ordering::SeqCst),
    })
}
