//! Routing and upstream calls: which upstreams serve a model (round-robin among the healthy
//! ones), the call itself with retries and failover, and a background health checker.
//!
//! A call is retried, with exponential backoff ([`BACKOFF`]), on a connection error or a
//! 502/503/504 — always before any byte of the reply has reached the client, since the reply
//! is only handed to the server once its status is known and acceptable. A whole (not streamed)
//! reply is read within the retries as well, so an upstream that dies between its headers and
//! the end of its body is retried like one that never answered. After [`ATTEMPTS`]
//! tries the upstream is taken out of rotation and the next one serving the model is tried.
//! A timeout is not retried: the upstream may still be working on the request, and a retry
//! would double the wait the client already paid. Upstreams out of rotation are still tried
//! last, so a wrong health verdict costs latency, never availability.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::StatusCode;
use serde_json::Value;

use crate::config::UpstreamConfig;
use crate::error::ApiError;
use crate::metrics::GatewayMetrics;

/// Tries per upstream before failing over to the next one.
pub const ATTEMPTS: usize = 3;
/// The wait before the second and third try.
pub const BACKOFF: [Duration; 2] = [Duration::from_millis(50), Duration::from_millis(100)];
/// How long a health check (`GET {url}/models`) may take.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an upstream's model list is reused by `GET /v1/models`.
const MODELS_TTL: Duration = Duration::from_secs(10);

/// One upstream and what the gateway knows of it.
#[derive(Debug)]
pub struct Upstream {
    pub config: UpstreamConfig,
    healthy: AtomicBool,
    /// The upstream's own `/models` list and when it was fetched.
    models: Mutex<Option<(Instant, Vec<String>)>>,
}

impl Upstream {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn set_healthy(&self, healthy: bool, why: &str) {
        let was = self.healthy.swap(healthy, Ordering::Relaxed);
        if was != healthy {
            let verdict = if healthy {
                "back in rotation"
            } else {
                "out of rotation"
            };
            eprintln!(
                "kiln gateway: upstream `{}` ({}) {verdict}: {why}",
                self.config.name, self.config.url
            );
        }
    }

    fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.config.url.trim_end_matches('/'))
    }
}

/// A reply whose status is known and final (no more retries).
#[derive(Debug)]
pub struct UpstreamReply {
    /// The upstream's name.
    pub upstream: String,
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: UpstreamBody,
}

/// The body of an [`UpstreamReply`].
#[derive(Debug)]
pub enum UpstreamBody {
    /// Still to be read, as the reply streams in.
    Streaming(reqwest::Response),
    /// Read whole, within the retries: an upstream that broke off its reply was retried (and
    /// failed over) like one that never answered.
    Read(Bytes),
}

/// Why no upstream produced a reply.
#[derive(Debug, Clone, PartialEq)]
pub enum ProxyError {
    /// No reply within `upstream`'s `timeout_s`.
    Timeout { upstream: String, timeout_s: f64 },
    /// Every upstream serving the model failed; `last` says how.
    Unavailable { tried: Vec<String>, last: String },
}

impl ProxyError {
    /// 504 `upstream_timeout` or 502 `upstream_unavailable`, in the OpenAI envelope.
    pub fn to_api_error(&self) -> ApiError {
        match self {
            ProxyError::Timeout {
                upstream,
                timeout_s,
            } => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "api_error",
                "upstream_timeout",
                format!("upstream `{upstream}` did not answer within {timeout_s} s"),
            ),
            ProxyError::Unavailable { tried, last } => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "api_error",
                "upstream_unavailable",
                format!(
                    "no upstream could serve the request (tried {}; last error: {last})",
                    tried.join(", ")
                ),
            ),
        }
    }
}

/// The configured upstreams, a shared HTTP client and the round-robin cursor.
#[derive(Debug)]
pub struct Upstreams {
    list: Vec<Arc<Upstream>>,
    next: AtomicUsize,
    client: reqwest::Client,
}

impl Upstreams {
    pub fn new(configs: &[UpstreamConfig]) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| anyhow::anyhow!("building the upstream HTTP client: {e}"))?;
        let list = configs
            .iter()
            .map(|c| {
                Arc::new(Upstream {
                    config: c.clone(),
                    healthy: AtomicBool::new(true),
                    models: Mutex::new(None),
                })
            })
            .collect();
        Ok(Self {
            list,
            next: AtomicUsize::new(0),
            client,
        })
    }

    /// The host and port of upstream `name`, for traces (`server.address`, `server.port`).
    pub fn address(&self, name: &str) -> Option<(String, Option<u16>)> {
        let u = self.all().iter().find(|u| u.config.name == name)?;
        let url = reqwest::Url::parse(&u.config.url).ok()?;
        Some((url.host_str()?.to_string(), url.port_or_known_default()))
    }

    pub fn all(&self) -> &[Arc<Upstream>] {
        &self.list
    }

    /// Whether any upstream is configured to serve `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.list.iter().any(|u| u.config.serves(model))
    }

    /// The upstreams to try for `model`, in order: the healthy ones rotated round-robin, then
    /// the ones out of rotation.
    fn order(&self, model: &str) -> Vec<Arc<Upstream>> {
        let serving: Vec<&Arc<Upstream>> = self
            .list
            .iter()
            .filter(|u| u.config.serves(model))
            .collect();
        if serving.is_empty() {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = serving.len();
        let rotated = (0..n).map(|i| serving[(start + i) % n]);
        let (healthy, sick): (Vec<_>, Vec<_>) = rotated.partition(|u| u.is_healthy());
        healthy.into_iter().chain(sick).cloned().collect()
    }

    /// POSTs `body` to `path` (`/chat/completions`) of an upstream serving `model`, with
    /// retries and failover (see the module docs). With `read_whole` the reply's body is read
    /// within the retries — nothing has reached the client yet, so an upstream dying after its
    /// headers is retried too; without it the body is left to stream.
    pub async fn send(
        &self,
        model: &str,
        path: &str,
        body: Bytes,
        read_whole: bool,
        metrics: &GatewayMetrics,
    ) -> Result<UpstreamReply, ProxyError> {
        let order = self.order(model);
        let mut tried = Vec::new();
        let mut last = String::from("no upstream serves the model");
        for upstream in order {
            let name = upstream.config.name.clone();
            tried.push(name.clone());
            let timeout = Duration::from_secs_f64(upstream.config.timeout_s);
            for attempt in 0..ATTEMPTS {
                if attempt > 0 {
                    tokio::time::sleep(BACKOFF[(attempt - 1).min(BACKOFF.len() - 1)]).await;
                }
                let mut request = self
                    .client
                    .post(upstream.endpoint(path))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .timeout(timeout)
                    .body(body.clone());
                if let Some(key) = &upstream.config.api_key {
                    request = request.bearer_auth(key);
                }
                match request.send().await {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        if matches!(status, 502..=504) {
                            metrics.upstream_error(&name, &format!("status_{status}"));
                            last = format!("`{name}` answered {status}");
                            continue;
                        }
                        let (status, headers) = (response.status(), response.headers().clone());
                        let body = if read_whole {
                            match response.bytes().await {
                                Ok(bytes) => UpstreamBody::Read(bytes),
                                Err(e) if e.is_timeout() => {
                                    metrics.upstream_error(&name, "timeout");
                                    return Err(ProxyError::Timeout {
                                        upstream: name,
                                        timeout_s: upstream.config.timeout_s,
                                    });
                                }
                                Err(e) => {
                                    metrics.upstream_error(&name, "body");
                                    last =
                                        format!("`{name}` broke off its reply: {}", describe(&e));
                                    continue;
                                }
                            }
                        } else {
                            UpstreamBody::Streaming(response)
                        };
                        upstream.set_healthy(true, "it answered a request");
                        return Ok(UpstreamReply {
                            upstream: name,
                            status,
                            headers,
                            body,
                        });
                    }
                    Err(e) if e.is_timeout() => {
                        metrics.upstream_error(&name, "timeout");
                        return Err(ProxyError::Timeout {
                            upstream: name,
                            timeout_s: upstream.config.timeout_s,
                        });
                    }
                    Err(e) => {
                        metrics.upstream_error(&name, "connect");
                        last = format!("`{name}`: {}", describe(&e));
                    }
                }
            }
            upstream.set_healthy(false, &last);
        }
        Err(ProxyError::Unavailable { tried, last })
    }

    /// Checks every upstream once (`GET {url}/models`): a reply below 500 means it is up (and a
    /// 2xx one refreshes its model list); no reply, or a 5xx, takes it out of rotation.
    pub async fn check_health(&self) {
        let checks = self.list.iter().map(|u| self.check_one(u));
        futures_util::future::join_all(checks).await;
    }

    async fn check_one(&self, upstream: &Upstream) {
        match self.fetch_models(upstream).await {
            Ok(models) => {
                if let Some(models) = models
                    && let Ok(mut cached) = upstream.models.lock()
                {
                    *cached = Some((Instant::now(), models));
                }
                upstream.set_healthy(true, "its health check passed");
            }
            Err(why) => upstream.set_healthy(false, &why),
        }
    }

    /// `Ok(Some(ids))` from a 2xx `/models`, `Ok(None)` from another reply below 500.
    async fn fetch_models(&self, upstream: &Upstream) -> Result<Option<Vec<String>>, String> {
        let mut request = self
            .client
            .get(upstream.endpoint("/models"))
            .timeout(HEALTH_TIMEOUT);
        if let Some(key) = &upstream.config.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| describe(&e))?;
        let status = response.status();
        if status.is_server_error() {
            return Err(format!("GET /models answered {}", status.as_u16()));
        }
        if !status.is_success() {
            return Ok(None);
        }
        let body: Value = response.json().await.map_err(|e| describe(&e))?;
        let ids = body
            .get("data")
            .and_then(Value::as_array)
            .map(|data| {
                data.iter()
                    .filter_map(|m| m.get("id").and_then(Value::as_str).map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Some(ids))
    }

    /// Every model name the upstreams serve: the configured names, and for a `"*"` upstream the
    /// ids its own `/models` lists (fetched at most every [`MODELS_TTL`]). Pairs of (model,
    /// upstream name), the first upstream per model.
    pub async fn models(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut push = |model: String, upstream: &str| {
            if !out.iter().any(|(m, _)| *m == model) {
                out.push((model, upstream.to_string()));
            }
        };
        for upstream in &self.list {
            let name = &upstream.config.name;
            for model in &upstream.config.models {
                if model != "*" {
                    push(model.clone(), name);
                }
            }
            if !upstream.config.models.iter().any(|m| m == "*") {
                continue;
            }
            let fresh = upstream
                .models
                .lock()
                .ok()
                .and_then(|c| c.clone())
                .filter(|(at, _)| at.elapsed() < MODELS_TTL)
                .map(|(_, ids)| ids);
            let ids = match fresh {
                Some(ids) => ids,
                None => match self.fetch_models(upstream).await {
                    Ok(Some(ids)) => {
                        if let Ok(mut cached) = upstream.models.lock() {
                            *cached = Some((Instant::now(), ids.clone()));
                        }
                        ids
                    }
                    _ => Vec::new(),
                },
            };
            for id in ids {
                push(id, name);
            }
        }
        out
    }
}

/// Runs [`Upstreams::check_health`] every `interval` until the upstreams are dropped.
pub fn spawn_health_checker(
    upstreams: &Arc<Upstreams>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    let weak: Weak<Upstreams> = Arc::downgrade(upstreams);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let Some(upstreams) = weak.upgrade() else {
                return;
            };
            upstreams.check_health().await;
        }
    })
}

/// A reqwest error with its causes (`error sending request: connection refused`).
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
