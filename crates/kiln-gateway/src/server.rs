//! The gateway's HTTP server: the routes, the per-request pipeline and the ways to run it.
//!
//! A proxied request goes through, in order: authentication ([`crate::auth`]) → validation
//! ([`crate::validate`]) → the model check (403 `model_not_allowed` for the caller, 404
//! `model_not_found` when no upstream serves it) → the tenant's budget ([`crate::store`], 429
//! `budget_exceeded`) → rate limits ([`crate::limits`], counting the prompt's tokens) → the
//! guardrails' input checks ([`crate::guard`], 400 `guardrail_violation`; they may rewrite the
//! body) → the response cache ([`crate::cache`]) → an upstream ([`crate::proxy`]) → the
//! guardrails' output checks, on whole replies and, event by event, on streams. Streams are
//! passed through chunk by chunk as they arrive (re-emitted by [`crate::guard::SseRewriter`]
//! when output checks are configured); a tap beside the stream reads the SSE events to learn the usage
//! (or count the content chunks) and, for a cacheable request, to assemble the reply for the
//! cache. The accounting — completion tokens for the TPM limit, cost, budget, metrics and the
//! request record — runs when the reply is done, a stream's when its last byte went out (or the
//! client left); the rate-limit concurrency slot is held until then.
//!
//! **Usage of streams.** When the client asked for `stream_options.include_usage`, the usage is
//! read from the final usage chunk. Otherwise the gateway does *not* add that option upstream
//! (it would add `"usage": null` to every chunk and change the bytes the client gets); the
//! completion tokens are estimated as the number of chunks carrying content, which is exact for
//! servers that send one token per chunk (kiln serve, vLLM) and an undercount for those that
//! batch tokens.
//!
//! **Completion ids and choices.** Every trace records the reply's own `id` (a whole reply's,
//! a cache hit's — the id of the reply it replays — or a stream's first event's), which clients
//! give feedback on ([`crate::feedback`]). With content capture on, a reply with two or more
//! choices keeps every choice's text (scrubbed): whole replies and cache hits from the JSON at
//! accounting, streams choice by choice by their `index` as the events pass — unless output
//! guardrails rewrite the stream, which then keeps the first choice only.
//!
//! Ways to run it, as in `kiln-serve`: [`build`] returns the router and state for a caller with
//! its own listener; [`Gateway`] is a bound listener run until a shutdown future resolves;
//! [`serve_blocking`] does that on a runtime of its own (`kiln gateway` passes
//! [`shutdown_signal`]); [`GatewayHandle`] runs it on a background thread for synchronous callers.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use futures_util::Stream;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::auth::{Authenticator, Principal};
use crate::cache::{CachedResponse, ResponseCache, as_sse_events, assemble_stream, cache_key};
use crate::config::GatewayConfig;
use crate::cost::request_cost;
use crate::error::ApiError;
use crate::guard::{
    Scrubber, SseRewriter, check_input, choice_texts, prompt_text, reply_id, reply_text,
    violation_error, violation_events,
};
use crate::limits::{Admission, LimitKey, Limited, RateLimiter};
use crate::metrics::GatewayMetrics;
use crate::monitor::{Finished, Monitor, ReplySignals, RequestSignals, StreamSignals};
use crate::proxy::{UpstreamBody, Upstreams, spawn_health_checker};
use crate::store::{Budgets, ContentRecord, RequestRecord, Store};
use crate::validate::{Endpoint, ValidRequest, Validator, too_large};
use kiln_guard::policy::{Guardrails, RequestGuard, Violation};
use kiln_http::{Drained, Readiness, ShutdownOptions};

/// The response header saying whether the cache answered: `hit`, `miss`, or `bypass`
/// (`Cache-Control: no-store`); absent for a request that cannot be cached.
pub const CACHE_HEADER: &str = "x-kiln-cache";
/// How often upstreams are health-checked by default.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// The longest shutdown waits for the last requests' accounting.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// A streamed reply is assembled for the cache only up to this many bytes of events.
const MAX_ASSEMBLED_BYTES: usize = 4 << 20;
/// Choices of a stream captured one by one (by `index`); events about higher indexes are not
/// captured.
const MAX_CAPTURED_CHOICES: usize = 128;

/// Knobs that are not part of the YAML config.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Time between health checks of the upstreams.
    pub health_interval: Duration,
    /// How a stop drains ([`Gateway::run`]).
    pub shutdown: ShutdownOptions,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            health_interval: DEFAULT_HEALTH_INTERVAL,
            shutdown: ShutdownOptions::default(),
        }
    }
}

/// Everything a request handler needs. Cheap to clone.
#[derive(Clone)]
pub struct GatewayState {
    inner: Arc<Inner>,
}

struct Inner {
    config: GatewayConfig,
    auth: Authenticator,
    limiter: RateLimiter,
    cache: ResponseCache,
    store: Store,
    budgets: Budgets,
    metrics: GatewayMetrics,
    monitor: Arc<Monitor>,
    upstreams: Arc<Upstreams>,
    validator: Validator,
    guardrails: Arc<Guardrails>,
    /// Scrubs captured content (when `store.capture_content`) and feedback corrections
    /// (always) before they are kept.
    scrubber: Scrubber,
    requests: AtomicU64,
    /// Requests past validation whose accounting (metrics, budget, trace) has not finished.
    unaccounted: Arc<AtomicU64>,
    /// False once a stop began: `GET /ready` answers 503 while requests drain.
    readiness: Readiness,
}

impl std::fmt::Debug for GatewayState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayState")
            .field("listen", &self.inner.config.listen)
            .field("upstreams", &self.inner.config.upstreams.len())
            .finish()
    }
}

impl GatewayState {
    /// Waits (up to `timeout`) until every answered request has been accounted, then until its
    /// trace is in the store and its span sent: for shutdown, tests and the lifecycle, which
    /// read what the gateway recorded.
    pub async fn settle(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.inner.unaccounted.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.inner.monitor.flush().await;
    }

    pub(crate) fn dashboard_on(&self) -> bool {
        let m = &self.inner.config.monitor;
        m.enabled && m.dashboard
    }

    /// The dashboard's routes answer 404 while it is off, and 401 without its key
    /// (`monitor.dashboard_key`, as `Authorization: Bearer …`) when one is set.
    pub(crate) fn dashboard_access(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if !self.dashboard_on() {
            return Err(ApiError::not_found(
                "the dashboard is off (monitor.dashboard)",
            ));
        }
        if let Some(key) = &self.inner.config.monitor.dashboard_key {
            let given = authorization(headers)
                .and_then(|h| h.strip_prefix("Bearer "))
                .unwrap_or("");
            let ok: bool = subtle::ConstantTimeEq::ct_eq(given.as_bytes(), key.as_bytes()).into();
            if !ok {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_request_error",
                    "invalid_api_key",
                    "the dashboard needs its key (monitor.dashboard_key): open /dashboard?key=…",
                ));
            }
        }
        Ok(())
    }

    /// The caller of a client route, authenticated as for `/v1/chat/completions`.
    pub(crate) async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, Response> {
        self.inner
            .auth
            .authenticate(authorization(headers))
            .await
            .map_err(IntoResponse::into_response)
    }

    /// The largest request body accepted (`validation.max_body_bytes`).
    pub(crate) fn max_body_bytes(&self) -> usize {
        self.inner.validator.max_body_bytes()
    }

    /// The PII scrubber built from `guardrails` (custom patterns and allow-list included).
    pub(crate) fn scrubber(&self) -> &Scrubber {
        &self.inner.scrubber
    }

    /// Whether the gateway takes traffic (`GET /ready`); a stop sets it draining.
    pub fn readiness(&self) -> &Readiness {
        &self.inner.readiness
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.inner.config
    }

    pub fn metrics(&self) -> &GatewayMetrics {
        &self.inner.metrics
    }

    pub fn upstreams(&self) -> &Arc<Upstreams> {
        &self.inner.upstreams
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn monitor(&self) -> &Arc<Monitor> {
        &self.inner.monitor
    }

    pub fn guardrails(&self) -> &Arc<Guardrails> {
        &self.inner.guardrails
    }

    /// `name (url), …` of the upstreams.
    pub fn describe_upstreams(&self) -> String {
        self.inner
            .config
            .upstreams
            .iter()
            .map(|u| format!("{} {}", u.name, u.url))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Builds the router and its state with the default [`BuildOptions`]; starts the health checker
/// (so call it inside a tokio runtime).
pub async fn build(config: GatewayConfig) -> anyhow::Result<(Router, GatewayState)> {
    build_with(config, BuildOptions::default()).await
}

/// [`build`] with explicit options.
pub async fn build_with(
    config: GatewayConfig,
    options: BuildOptions,
) -> anyhow::Result<(Router, GatewayState)> {
    let auth = Authenticator::new(&config.auth)?;
    let limiter = RateLimiter::new(&config.limits).await?;
    let cache = ResponseCache::new(&config.cache).await?;
    let store = Store::connect(&config.store.url).await?;
    let budgets = Budgets::new(&config.budgets, store.clone());
    let validator = Validator::new(&config.validation)?;
    let guardrails = Arc::new(Guardrails::new(&config.guardrails)?);
    let scrubber = Scrubber::new(&config.guardrails)?;
    let upstreams = Arc::new(Upstreams::new(&config.upstreams)?);
    let metrics = GatewayMetrics::new();
    let monitor = Monitor::start(&config, store.clone(), metrics.registry())?;
    spawn_health_checker(&upstreams, options.health_interval);
    let state = GatewayState {
        inner: Arc::new(Inner {
            config,
            auth,
            limiter,
            cache,
            store,
            budgets,
            metrics,
            monitor,
            upstreams,
            validator,
            guardrails,
            scrubber,
            requests: AtomicU64::new(0),
            unaccounted: Arc::new(AtomicU64::new(0)),
            readiness: Readiness::new(),
        }),
    };
    Ok((router(state.clone()), state))
}

/// The gateway's routes over `state`.
pub fn router(state: GatewayState) -> Router {
    Router::new()
        .route(
            "/v1/chat/completions",
            post(|State(s): State<GatewayState>, req: Request| proxied(s, Endpoint::Chat, req)),
        )
        .route(
            "/v1/completions",
            post(|State(s): State<GatewayState>, req: Request| {
                proxied(s, Endpoint::Completion, req)
            }),
        )
        .route("/v1/models", get(list_models))
        .route("/health", get(health))
        .route("/live", get(live))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/dashboard", get(dashboard_page))
        .route("/dashboard/data", get(dashboard_data))
        .route("/v1/feedback", post(crate::feedback::post_feedback))
        .route(
            "/dashboard/label",
            get(crate::feedback::label_page).post(crate::feedback::post_label),
        )
        .route("/dashboard/label/next", get(crate::feedback::label_next))
        .fallback(|req: Request| async move {
            ApiError::not_found(format!(
                "no route {} {}; the gateway serves POST /v1/chat/completions, POST /v1/completions, POST /v1/feedback, GET /v1/models, GET /health, GET /live, GET /ready, GET /metrics, GET /dashboard and GET /dashboard/label",
                req.method(),
                req.uri().path()
            ))
        })
        .with_state(state)
}

async fn metrics(State(state): State<GatewayState>) -> Response {
    state.inner.monitor.refresh_gauges();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.inner.metrics.render(),
    )
        .into_response()
}

/// The live dashboard page (its assets are inside it).
async fn dashboard_page(State(state): State<GatewayState>) -> Response {
    if !state.dashboard_on() {
        return ApiError::not_found("the dashboard is off (monitor.dashboard)").into_response();
    }
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                kiln_monitor::dashboard::CONTENT_SECURITY_POLICY,
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        kiln_monitor::dashboard::PAGE,
    )
        .into_response()
}

/// The dashboard's data: the live window as JSON.
async fn dashboard_data(State(state): State<GatewayState>, headers: HeaderMap) -> Response {
    if let Err(e) = state.dashboard_access(&headers) {
        return e.into_response();
    }
    let monitor = state.inner.monitor.clone();
    let data = tokio::task::spawn_blocking(move || monitor.dashboard_data())
        .await
        .unwrap_or(Value::Null);
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(data)).into_response()
}

async fn health(State(state): State<GatewayState>) -> Response {
    let upstreams: Vec<Value> = state
        .inner
        .upstreams
        .all()
        .iter()
        .map(|u| json!({"name": u.config.name, "url": u.config.url, "healthy": u.is_healthy()}))
        .collect();
    let any = state.inner.upstreams.all().iter().any(|u| u.is_healthy());
    let status = if any {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body =
        json!({"status": if any { "ok" } else { "no healthy upstream" }, "upstreams": upstreams});
    (status, axum::Json(body)).into_response()
}

/// Liveness: 200 while the process answers, whatever its upstreams do (a Kubernetes liveness
/// probe must not restart a gateway for an upstream's outage).
async fn live() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

/// Readiness: 200 while the gateway should get traffic; 503 `draining` once a stop began, and
/// 503 `no healthy upstream` while every upstream is out of rotation.
async fn ready(State(state): State<GatewayState>) -> Response {
    let status = if !state.inner.readiness.is_ready() {
        "draining"
    } else if !state.inner.upstreams.all().iter().any(|u| u.is_healthy()) {
        "no healthy upstream"
    } else {
        return axum::Json(json!({"status": "ready"})).into_response();
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(json!({"status": status})),
    )
        .into_response()
}

async fn list_models(State(state): State<GatewayState>, headers: HeaderMap) -> Response {
    let principal = match state.inner.auth.authenticate(authorization(&headers)).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let data: Vec<Value> = state
        .inner
        .upstreams
        .models()
        .await
        .into_iter()
        .filter(|(model, _)| principal.may_use(model))
        .map(|(model, upstream)| {
            json!({"id": model, "object": "model", "created": 0, "owned_by": upstream})
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// What is known of a request by the time it is accounted.
struct RequestContext {
    state: GatewayState,
    request_id: String,
    started: Instant,
    principal: Principal,
    limit_key: LimitKey,
    model: String,
    stream: bool,
    prompt_tokens: u64,
    /// The request's guardrails: the output checks and the verdicts for the record.
    guard: Option<RequestGuard>,
    /// The prompt to keep, when content is captured; scrubbed at accounting, off the request
    /// path.
    captured_prompt: Option<String>,
    /// What monitoring reads of the request; `None` with monitoring off.
    signals: Option<RequestSignals>,
    /// Counts the request as unaccounted until the context is consumed by `account` (or
    /// dropped).
    _unaccounted: Unaccounted,
}

/// One request in [`Inner::unaccounted`], for as long as it lives.
struct Unaccounted(Arc<AtomicU64>);

impl Unaccounted {
    fn new(counter: &Arc<AtomicU64>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter.clone())
    }
}

impl Drop for Unaccounted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a reply ended, for [`RequestContext::account`].
struct Outcome {
    status: u16,
    upstream: Option<String>,
    cache_hit: bool,
    /// Prompt and completion tokens from the reply's usage, when it had one.
    usage: Option<(u64, u64)>,
    completion_estimate: u64,
    upstream_time: Option<Duration>,
    /// Time spent in the gateway itself.
    overhead: Duration,
    /// The reply's text as the client got it, when content is captured.
    completion: Option<String>,
    /// What monitoring reads of the reply; `None` with monitoring off or without a reply.
    reply: Option<ReplySignals>,
    /// The response cache was consulted.
    cache_lookup: bool,
    /// The reply's own `id`, when it had one.
    completion_id: Option<String>,
    /// Every choice's text (unscrubbed) when the reply had several and content is captured.
    choices: Vec<String>,
    /// A whole reply as the client got it, read at accounting for `completion_id` and
    /// `choices`.
    reply_body: Option<Value>,
}

impl Outcome {
    /// A reply with no body worth reading (refusals, failures).
    fn bare(status: u16, cache_hit: bool, cache_lookup: bool, overhead: Duration) -> Self {
        Self {
            status,
            upstream: None,
            cache_hit,
            usage: None,
            completion_estimate: 0,
            upstream_time: None,
            overhead,
            completion: None,
            reply: None,
            cache_lookup,
            completion_id: None,
            choices: Vec::new(),
            reply_body: None,
        }
    }
}

impl RequestContext {
    /// Completion tokens for the TPM window, cost, budget, metrics and the stored record.
    async fn account(self, mut outcome: Outcome) {
        let inner = &self.state.inner;
        if let Some(body) = outcome.reply_body.take() {
            outcome.completion_id = outcome.completion_id.or_else(|| reply_id(&body));
            if self.captured_prompt.is_some() {
                outcome.choices = choice_texts(&body);
            }
        }
        let (prompt, completion) = outcome
            .usage
            .unwrap_or((self.prompt_tokens, outcome.completion_estimate));
        let tenant = &self.principal.tenant;
        // A cached reply costs no upstream work: it is neither charged nor counted as
        // completion tokens.
        let cost = if outcome.cache_hit || outcome.status >= 400 {
            None
        } else {
            request_cost(&inner.config.pricing, &self.model, prompt, completion)
        };
        if !outcome.cache_hit && outcome.status < 400 {
            inner
                .limiter
                .record_completion(&self.limit_key, completion)
                .await;
            inner
                .metrics
                .add_tokens(&self.model, tenant, prompt, completion);
        }
        if let Some(usd) = cost {
            inner.budgets.add(tenant, usd).await;
            inner.metrics.add_cost(&self.model, tenant, usd);
        }
        inner
            .metrics
            .observe_request(&self.model, tenant, outcome.status);
        inner
            .metrics
            .observe_overhead(outcome.overhead.as_secs_f64());
        if let (Some(upstream), Some(t)) = (&outcome.upstream, outcome.upstream_time) {
            inner.metrics.observe_upstream(upstream, t.as_secs_f64());
        }
        let guard = self.guard.as_ref().and_then(RequestGuard::summary);
        if let Some(g) = &self.guard {
            for v in g.verdicts() {
                inner
                    .metrics
                    .guardrail(tenant, v.detector, v.action.as_str());
            }
        }
        if let Some(summary) = &guard {
            // Kinds, rules and scores only: never the text.
            eprintln!(
                "kiln gateway: request {} (tenant `{tenant}`): guardrails {summary}",
                self.request_id
            );
        }
        let at = {
            let now = SystemTime::now();
            now.checked_sub(self.started.elapsed()).unwrap_or(now)
        };
        let scrubber = &inner.scrubber;
        let content = self.captured_prompt.map(|prompt| ContentRecord {
            request_id: self.request_id.clone(),
            at,
            tenant: tenant.clone(),
            model: self.model.clone(),
            no_train: self.principal.no_train,
            prompt: scrubber.scrub(&prompt),
            completion: outcome.completion.as_deref().map(|c| scrubber.scrub(c)),
            completion_id: outcome.completion_id.clone(),
            choices: if outcome.choices.len() >= 2 {
                outcome.choices.iter().map(|c| scrubber.scrub(c)).collect()
            } else {
                Vec::new()
            },
        });
        let guard_blocked = outcome.status == 400
            && self
                .guard
                .as_ref()
                .is_some_and(|g| g.verdicts().iter().any(|v| v.action.as_str() == "block"));
        // Only spans carry the upstream's address: no URL parsing without them.
        let upstream_address = outcome
            .upstream
            .as_deref()
            .filter(|_| inner.monitor.exports_spans())
            .and_then(|name| inner.upstreams.address(name));
        let record = RequestRecord {
            request_id: self.request_id,
            at,
            tenant: tenant.clone(),
            key_id: self.principal.key_id.clone(),
            model: self.model,
            upstream: outcome.upstream,
            status: outcome.status,
            stream: self.stream,
            cache_hit: outcome.cache_hit,
            prompt_tokens: prompt,
            completion_tokens: if outcome.usage.is_some() || !outcome.cache_hit {
                completion
            } else {
                0
            },
            cost_usd: cost,
            gateway_ms: outcome.overhead.as_secs_f64() * 1e3,
            upstream_ms: outcome.upstream_time.map(|t| t.as_secs_f64() * 1e3),
            no_train: self.principal.no_train,
            guard,
            total_ms: Some(self.started.elapsed().as_secs_f64() * 1e3),
            completion_id: outcome.completion_id,
            ..RequestRecord::default()
        };
        inner.monitor.finish(Finished {
            record,
            content,
            request: self.signals,
            reply: outcome.reply,
            cache_lookup: outcome.cache_lookup,
            guard_blocked,
            upstream_address,
        });
    }
}

/// A refusal before any upstream work: counted in the metrics, then answered.
fn refuse(state: &GatewayState, model: &str, tenant: &str, response: Response) -> Response {
    state
        .inner
        .metrics
        .observe_request(model, tenant, response.status().as_u16());
    response
}

/// The whole pipeline of a proxied request (see the module docs).
async fn proxied(state: GatewayState, endpoint: Endpoint, request: Request) -> Response {
    let started = Instant::now();
    let inner = &state.inner;
    let n = inner.requests.fetch_add(1, Ordering::Relaxed);
    let request_id = format!("kgw-{:08x}{n:08x}", rand::random::<u32>());
    let (parts, body) = request.into_parts();
    let headers = parts.headers;

    let principal = match inner.auth.authenticate(authorization(&headers)).await {
        Ok(p) => p,
        Err(e) => return refuse(&state, "-", "-", e.into_response()),
    };
    let tenant = principal.tenant.clone();

    let max = inner.validator.max_body_bytes();
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > max) {
        return refuse(&state, "-", &tenant, too_large(max).into_response());
    }
    let bytes = match axum::body::to_bytes(body, max).await {
        Ok(b) => b,
        Err(_) => return refuse(&state, "-", &tenant, too_large(max).into_response()),
    };
    let valid = match inner.validator.validate(endpoint, &bytes) {
        Ok(v) => v,
        Err(e) => return refuse(&state, "-", &tenant, e.into_response()),
    };
    let model = valid.model.clone();
    if !principal.may_use(&model) {
        let e = ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "model_not_allowed",
            format!("this key may not use model `{model}`"),
        );
        return refuse(&state, &model, &tenant, e.into_response());
    }
    if !inner.upstreams.serves(&model) {
        let mut e = ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("no upstream serves model `{model}`"),
        );
        e.param = Some("model".into());
        return refuse(&state, &model, &tenant, e.into_response());
    }
    if let Err((spent, budget)) = inner.budgets.check(&tenant).await {
        inner.metrics.rate_limited(&tenant, "budget");
        let e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            "budget_exceeded",
            format!(
                "tenant `{tenant}` has spent ${spent:.4} of its ${budget:.2} budget for this period"
            ),
        );
        return refuse(&state, &model, &tenant, e.into_response());
    }
    let limit_key = LimitKey {
        id: principal.key_id.clone(),
        rpm: principal.rpm,
        tpm: principal.tpm,
        max_concurrent: principal.max_concurrent,
    };
    let admission = match inner.limiter.acquire(&limit_key, valid.prompt_tokens).await {
        Ok(a) => a,
        Err(limited) => {
            let which = match &limited {
                Limited::Requests { .. } => "rpm",
                Limited::Tokens { .. } => "tpm",
                Limited::Concurrency { .. } => "concurrency",
                Limited::BackendUnavailable => "backend_unavailable",
            };
            inner.metrics.rate_limited(&tenant, which);
            return refuse(&state, &model, &tenant, limited.into_response());
        }
    };

    let mut valid = valid;
    let mut bytes = bytes;
    let mut guard = None;
    let mut refusal = None;
    if inner.guardrails.is_enabled() {
        let body = std::mem::take(&mut valid.body);
        let (checked, body, result) =
            check_input(inner.guardrails.request(&tenant), valid.endpoint, body).await;
        valid.body = body;
        guard = checked;
        match result {
            // The body is forwarded as rewritten (system prompt, redactions); a JSON value
            // always serializes.
            Ok(true) => bytes = Bytes::from(serde_json::to_vec(&valid.body).unwrap_or_default()),
            Ok(false) => {}
            Err(v) => refusal = Some(v),
        }
    }
    // Content is kept for answered requests only: a refused one's text is what the gateway
    // declined to pass on.
    let captured_prompt = (inner.config.store.capture_content && refusal.is_none()).then(|| {
        let skip_system =
            valid.endpoint == Endpoint::Chat && inner.guardrails.system_prompt().is_some();
        prompt_text(valid.endpoint, &valid.body, skip_system)
    });
    let signals = inner.monitor.is_enabled().then(|| {
        let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
        RequestSignals::of(valid.endpoint, &valid.body, bytes.clone(), traceparent)
    });
    let ctx = RequestContext {
        state: state.clone(),
        request_id,
        started,
        principal,
        limit_key,
        model,
        stream: valid.stream,
        prompt_tokens: valid.prompt_tokens,
        guard,
        captured_prompt,
        signals,
        _unaccounted: Unaccounted::new(&inner.unaccounted),
    };
    if let Some(v) = refusal {
        return refuse_violation(ctx, &v, false, admission);
    }
    forward(ctx, valid, bytes, &headers, admission).await
}

/// Answers a guardrail violation (400 `guardrail_violation`) and accounts the request.
fn refuse_violation(
    ctx: RequestContext,
    violation: &Violation,
    cache_hit: bool,
    admission: Admission,
) -> Response {
    let mut response = violation_error(violation).into_response();
    if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-request-id"), v);
    }
    let overhead = ctx.started.elapsed();
    tokio::spawn(ctx.account(Outcome::bare(400, cache_hit, cache_hit, overhead)));
    drop(admission);
    response
}

/// The cache, then the upstream.
async fn forward(
    mut ctx: RequestContext,
    valid: ValidRequest,
    bytes: Bytes,
    headers: &HeaderMap,
    admission: Admission,
) -> Response {
    let inner = ctx.state.inner.clone();
    let cache_control = headers
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let no_store = cache_control.contains("no-store");
    let no_cache = cache_control.contains("no-cache");
    let key = if inner.cache.is_enabled() {
        cache_key(
            &ctx.principal.tenant,
            &valid.body,
            inner.config.cache.cache_sampled,
        )
    } else {
        None
    };
    let cache_state = match (&key, no_store) {
        (None, _) => None,
        (Some(_), true) => Some("bypass"),
        (Some(_), false) => Some("miss"),
    };
    let key = key.filter(|_| !no_store);
    let cache_lookup = key.is_some();

    let mut extra = HeaderMap::new();
    admission.headers.apply(&mut extra);
    if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
        extra.insert(HeaderName::from_static("x-request-id"), v);
    }

    if let (Some(k), false) = (&key, no_cache) {
        if let Some(hit) = inner.cache.get(k).await {
            inner.metrics.cache(true);
            extra.insert(
                HeaderName::from_static(CACHE_HEADER),
                HeaderValue::from_static("hit"),
            );
            let usage = usage_of(&hit.body);
            let mut body = hit.body;
            // The cache holds the upstream's reply: the output checks run on every answer.
            if let Some(guard) = ctx.guard.as_mut()
                && let Err(v) = guard.check_reply(&mut body)
            {
                return refuse_violation(ctx, &v, true, admission);
            }
            let completion = ctx.captured_prompt.as_ref().and_then(|_| reply_text(&body));
            let completion_id = reply_id(&body);
            let choices = match ctx.captured_prompt {
                Some(_) => choice_texts(&body),
                None => Vec::new(),
            };
            let reply = ctx.signals.as_ref().map(|_| ReplySignals::of_reply(&body));
            let mut response = if valid.stream {
                let events = as_sse_events(&body, valid.include_usage).concat();
                sse_response(StatusCode::OK, Body::from(events))
            } else {
                (StatusCode::OK, axum::Json(body)).into_response()
            };
            response.headers_mut().extend(extra);
            let overhead = ctx.started.elapsed();
            tokio::spawn(ctx.account(Outcome {
                status: 200,
                upstream: None,
                cache_hit: true,
                usage,
                completion_estimate: 0,
                upstream_time: None,
                overhead,
                completion,
                reply,
                cache_lookup: true,
                completion_id,
                choices,
                reply_body: None,
            }));
            drop(admission);
            return response;
        }
        inner.metrics.cache(false);
    } else if key.is_some() {
        inner.metrics.cache(false);
    }
    if let Some(c) = cache_state {
        extra.insert(
            HeaderName::from_static(CACHE_HEADER),
            HeaderValue::from_static(c),
        );
    }

    let before_upstream = ctx.started.elapsed();
    let upstream_start = Instant::now();
    let reply = match inner
        .upstreams
        .send(
            &ctx.model,
            valid.endpoint.path(),
            bytes,
            !valid.stream,
            &inner.metrics,
        )
        .await
    {
        Ok(r) => r,
        Err(e) => {
            let upstream_time = upstream_start.elapsed();
            let mut response = e.to_api_error().into_response();
            response.headers_mut().extend(extra);
            let status = response.status().as_u16();
            let overhead = ctx.started.elapsed().saturating_sub(upstream_time);
            tokio::spawn(ctx.account(Outcome::bare(status, false, cache_lookup, overhead)));
            return response;
        }
    };
    let status = reply.status;
    let upstream_headers = reply.headers;
    let is_sse = upstream_headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));

    let streaming = valid.stream && status.is_success() && is_sse;
    let body = match reply.body {
        UpstreamBody::Streaming(upstream_response) if streaming => {
            let rewriter = ctx
                .guard
                .as_ref()
                .filter(|g| g.policy().checks_output())
                .map(|_| SseRewriter::default());
            let capture = ctx.captured_prompt.as_ref().map(|_| String::new());
            let signals = ctx.signals.as_ref().map(|_| StreamSignals::default());
            let tap = Tap {
                ctx: Some(ctx),
                admission: Some(admission),
                upstream: reply.upstream,
                upstream_start,
                overhead: before_upstream,
                status: status.as_u16(),
                pending: Vec::new(),
                chunks: key.as_ref().map(|_| Vec::new()),
                assembled_bytes: 0,
                cache_key: key,
                usage: None,
                content_chunks: 0,
                rewriter,
                capture,
                choice_texts: Vec::new(),
                completion_id: None,
                signals,
                cache_lookup,
            };
            let stream = TappedStream {
                inner: Box::pin(upstream_response.bytes_stream()),
                tap,
                done: false,
            };
            let mut response = sse_response(status, Body::from_stream(stream));
            copy_headers(&upstream_headers, response.headers_mut());
            response.headers_mut().extend(extra);
            return response;
        }
        body => body,
    };

    // A whole reply: read it, then answer.
    let upstream_name = reply.upstream;
    let read = match body {
        UpstreamBody::Read(bytes) => Ok(bytes),
        UpstreamBody::Streaming(response) => response.bytes().await,
    };
    let upstream_time = upstream_start.elapsed();
    let body = match read {
        Ok(b) => b,
        Err(e) => {
            let e = if e.is_timeout() {
                inner.metrics.upstream_error(&upstream_name, "timeout");
                ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "api_error",
                    "upstream_timeout",
                    format!("upstream `{upstream_name}` did not finish its reply in time"),
                )
            } else {
                inner.metrics.upstream_error(&upstream_name, "body");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    "upstream_unavailable",
                    format!("upstream `{upstream_name}` broke off its reply"),
                )
            };
            let mut response = e.into_response();
            response.headers_mut().extend(extra);
            let status = response.status().as_u16();
            let overhead = ctx.started.elapsed().saturating_sub(upstream_time);
            tokio::spawn(ctx.account(Outcome {
                status,
                upstream: Some(upstream_name),
                cache_hit: false,
                usage: None,
                completion_estimate: 0,
                upstream_time: Some(upstream_time),
                overhead,
                completion: None,
                reply: None,
                cache_lookup,
                completion_id: None,
                choices: Vec::new(),
                reply_body: None,
            }));
            return response;
        }
    };
    let json: Option<Value> = if status.is_success() {
        serde_json::from_slice(&body).ok()
    } else {
        None
    };
    let usage = json.as_ref().and_then(usage_of);
    if let (Some(k), Some(v)) = (&key, &json)
        && v.get("choices").is_some()
    {
        let cache = inner.cache.clone();
        let k = k.clone();
        let entry = CachedResponse { body: v.clone() };
        tokio::spawn(async move { cache.put(&k, &entry).await });
    }
    let mut body = body;
    let mut checked = json;
    if status.is_success()
        && let Some(guard) = ctx.guard.as_mut()
        && guard.policy().checks_output()
    {
        let Some(reply) = checked.as_mut() else {
            // A reply the output checks cannot read is not passed on unchecked.
            let e = ApiError::new(
                StatusCode::BAD_GATEWAY,
                "api_error",
                "upstream_invalid_reply",
                format!(
                    "upstream `{upstream_name}` sent a reply that is not JSON; the output checks cannot read it"
                ),
            );
            let mut response = e.into_response();
            response.headers_mut().extend(extra);
            let overhead = ctx.started.elapsed().saturating_sub(upstream_time);
            tokio::spawn(ctx.account(Outcome {
                status: 502,
                upstream: Some(upstream_name),
                cache_hit: false,
                usage,
                completion_estimate: 0,
                upstream_time: Some(upstream_time),
                overhead,
                completion: None,
                reply: None,
                cache_lookup,
                completion_id: None,
                choices: Vec::new(),
                reply_body: None,
            }));
            return response;
        };
        if let Err(v) = guard.check_reply(reply) {
            return refuse_violation(ctx, &v, false, admission);
        }
        body = Bytes::from(serde_json::to_vec(reply).unwrap_or_default());
    }
    let completion = match (&ctx.captured_prompt, &checked) {
        (Some(_), Some(reply)) => reply_text(reply),
        _ => None,
    };
    let reply = match (&ctx.signals, &checked) {
        (Some(_), Some(body)) => Some(ReplySignals::of_reply(body)),
        _ => None,
    };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    copy_headers(&upstream_headers, response.headers_mut());
    response.headers_mut().extend(extra);
    let overhead = ctx.started.elapsed().saturating_sub(upstream_time);
    tokio::spawn(ctx.account(Outcome {
        status: status.as_u16(),
        upstream: Some(upstream_name),
        cache_hit: false,
        usage,
        completion_estimate: 0,
        upstream_time: Some(upstream_time),
        overhead,
        completion,
        reply,
        cache_lookup,
        completion_id: None,
        choices: Vec::new(),
        // Its id and choices are read at accounting, off the request path.
        reply_body: checked,
    }));
    drop(admission);
    response
}

fn sse_response(status: StatusCode, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The upstream's headers worth passing on (not hop-by-hop ones, not its length: the body may
/// be re-framed).
fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        let skip = matches!(
            name.as_str(),
            "connection"
                | "keep-alive"
                | "transfer-encoding"
                | "content-length"
                | "date"
                | "server"
                | "www-authenticate"
        );
        if !skip {
            to.insert(name.clone(), value.clone());
        }
    }
}

/// `(prompt_tokens, completion_tokens)` of a reply or chunk's `usage`.
fn usage_of(body: &Value) -> Option<(u64, u64)> {
    let usage = body.get("usage")?;
    Some((
        usage.get("prompt_tokens")?.as_u64()?,
        usage.get("completion_tokens")?.as_u64()?,
    ))
}

/// Reads the SSE events of a stream as they pass, and accounts the request when the stream is
/// done or dropped.
struct Tap {
    ctx: Option<RequestContext>,
    /// Held (the concurrency slot) until the stream ends.
    admission: Option<Admission>,
    upstream: String,
    upstream_start: Instant,
    overhead: Duration,
    status: u16,
    /// The bytes of an incomplete line.
    pending: Vec<u8>,
    /// The chunks so far, for the cache (`None`: not cacheable, or too long).
    chunks: Option<Vec<Value>>,
    assembled_bytes: usize,
    cache_key: Option<String>,
    usage: Option<(u64, u64)>,
    content_chunks: u64,
    /// Rewrites the events through the output guardrails, when the policy checks replies.
    rewriter: Option<SseRewriter>,
    /// The first choice's text as sent to the client, when content is captured.
    capture: Option<String>,
    /// Every choice's text by `index`, when content is captured and no rewriter runs.
    choice_texts: Vec<String>,
    /// The `id` of the first event that had one.
    completion_id: Option<String>,
    /// What monitoring reads of the events, when it is on.
    signals: Option<StreamSignals>,
    cache_lookup: bool,
}

impl Tap {
    fn observe(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        let Some(last_newline) = self.pending.iter().rposition(|&b| b == b'\n') else {
            if self.pending.len() > MAX_ASSEMBLED_BYTES {
                // Not SSE as we know it: stop reading along.
                self.pending.clear();
                self.chunks = None;
            }
            return;
        };
        let complete: Vec<u8> = self.pending.drain(..=last_newline).collect();
        for line in complete.split(|&b| b == b'\n') {
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            let data = data.trim_ascii();
            if data == b"[DONE]" || data.is_empty() {
                continue;
            }
            let Ok(chunk) = serde_json::from_slice::<Value>(data) else {
                continue;
            };
            if let Some(u) = usage_of(&chunk) {
                self.usage = Some(u);
            }
            if let Some(signals) = self.signals.as_mut() {
                signals.push(&chunk, self.upstream_start.elapsed());
            }
            let has_content =
                chunk
                    .get("choices")
                    .and_then(Value::as_array)
                    .is_some_and(|choices| {
                        choices.iter().any(|c| {
                            let text = c
                                .get("delta")
                                .and_then(|d| d.get("content"))
                                .or_else(|| c.get("text"));
                            text.and_then(Value::as_str).is_some_and(|s| !s.is_empty())
                        })
                    });
            if has_content {
                self.content_chunks += 1;
            }
            if self.completion_id.is_none() {
                self.completion_id = reply_id(&chunk);
            }
            // Unrewritten streams are captured as they pass, choice by choice (the rewriter
            // captures what it releases, of the first choice only).
            if self.rewriter.is_none()
                && let Some(capture) = self.capture.as_mut()
                && let Some(choices) = chunk.get("choices").and_then(Value::as_array)
            {
                for (position, c) in choices.iter().enumerate() {
                    let Some(text) = c
                        .get("delta")
                        .and_then(|d| d.get("content"))
                        .or_else(|| c.get("text"))
                        .and_then(Value::as_str)
                    else {
                        continue;
                    };
                    let index = c
                        .get("index")
                        .and_then(Value::as_u64)
                        .and_then(|i| usize::try_from(i).ok())
                        .unwrap_or(position);
                    if index == 0 {
                        capture.push_str(text);
                    }
                    if index < MAX_CAPTURED_CHOICES {
                        if self.choice_texts.len() <= index {
                            self.choice_texts.resize(index + 1, String::new());
                        }
                        self.choice_texts[index].push_str(text);
                    }
                }
            }
            self.assembled_bytes += data.len();
            if self.assembled_bytes > MAX_ASSEMBLED_BYTES {
                self.chunks = None;
            }
            if let Some(chunks) = &mut self.chunks {
                chunks.push(chunk);
            }
        }
    }

    /// Accounts the request (once), caching the assembled reply of a complete stream.
    fn finish(&mut self, complete: bool) {
        let Some(ctx) = self.ctx.take() else {
            return;
        };
        let upstream_time = self.upstream_start.elapsed();
        let chunks = self.chunks.take();
        let key = self.cache_key.take();
        let outcome = Outcome {
            status: self.status,
            upstream: Some(std::mem::take(&mut self.upstream)),
            cache_hit: false,
            usage: self.usage,
            completion_estimate: self.content_chunks,
            upstream_time: Some(upstream_time),
            overhead: self.overhead,
            completion: self.capture.take(),
            reply: self.signals.take().map(StreamSignals::finish),
            cache_lookup: self.cache_lookup,
            completion_id: self.completion_id.take(),
            choices: if self.choice_texts.len() >= 2 {
                std::mem::take(&mut self.choice_texts)
            } else {
                Vec::new()
            },
            reply_body: None,
        };
        let cache = ctx.state.inner.cache.clone();
        let admission = self.admission.take();
        let work = async move {
            if let (true, Some(k), Some(chunks)) = (complete, key, chunks)
                && let Some(body) = assemble_stream(&chunks)
            {
                cache.put(&k, &CachedResponse { body }).await;
            }
            ctx.account(outcome).await;
            drop(admission);
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(work);
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        // The client left (or the stream failed) before the end.
        self.finish(false);
    }
}

/// The upstream's byte stream, passed on unchanged, chunk by chunk.
struct TappedStream {
    inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    tap: Tap,
    /// The stream ended (or was cut by a guardrail): nothing more goes out.
    done: bool,
}

impl Stream for TappedStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            match this.inner.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(bytes))) => {
                    this.tap.observe(&bytes);
                    let tap = &mut this.tap;
                    let (Some(rewriter), Some(guard)) = (
                        tap.rewriter.as_mut(),
                        tap.ctx.as_mut().and_then(|c| c.guard.as_mut()),
                    ) else {
                        return Poll::Ready(Some(Ok(bytes)));
                    };
                    match rewriter.feed(&bytes, guard, &mut tap.capture) {
                        // Held back until the checks have seen more: read on.
                        Ok(out) if out.is_empty() => continue,
                        Ok(out) => return Poll::Ready(Some(Ok(Bytes::from(out)))),
                        Err(v) => {
                            this.done = true;
                            this.tap.status = 400;
                            this.tap.finish(false);
                            return Poll::Ready(Some(Ok(Bytes::from(violation_events(&v)))));
                        }
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let kind = if e.is_timeout() { "timeout" } else { "body" };
                    if let Some(ctx) = &this.tap.ctx {
                        ctx.state
                            .inner
                            .metrics
                            .upstream_error(&this.tap.upstream, kind);
                    }
                    this.tap.status = if e.is_timeout() { 504 } else { 502 };
                    this.tap.finish(false);
                    this.done = true;
                    return Poll::Ready(Some(Err(std::io::Error::other(format!(
                        "upstream `{}`: {e}",
                        this.tap.upstream
                    )))));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    let tap = &mut this.tap;
                    let mut rest = Vec::new();
                    let mut complete = true;
                    if let (Some(rewriter), Some(guard)) = (
                        tap.rewriter.as_mut(),
                        tap.ctx.as_mut().and_then(|c| c.guard.as_mut()),
                    ) {
                        match rewriter.finish(guard, &mut tap.capture) {
                            Ok(out) => rest = out,
                            Err(v) => {
                                rest = violation_events(&v);
                                tap.status = 400;
                                complete = false;
                            }
                        }
                    }
                    tap.finish(complete);
                    return if rest.is_empty() {
                        Poll::Ready(None)
                    } else {
                        Poll::Ready(Some(Ok(Bytes::from(rest))))
                    };
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A bound gateway, not yet serving.
pub struct Gateway {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    router: Router,
    state: GatewayState,
    shutdown: ShutdownOptions,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("addr", &self.addr).finish()
    }
}

impl Gateway {
    /// Builds the gateway and binds `config.listen`.
    pub async fn bind(config: GatewayConfig) -> anyhow::Result<Self> {
        Self::bind_with(config, BuildOptions::default()).await
    }

    /// [`Gateway::bind`] with explicit options.
    pub async fn bind_with(config: GatewayConfig, options: BuildOptions) -> anyhow::Result<Self> {
        let listen = config.listen.clone();
        let shutdown = options.shutdown;
        let (router, state) = build_with(config, options).await?;
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .map_err(|e| anyhow::anyhow!("listen: binding {listen}: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| anyhow::anyhow!("listen: {listen}: {e}"))?;
        Ok(Self {
            listener,
            addr,
            router,
            state,
            shutdown,
        })
    }

    /// How a stop drains (default: no delay, 30 s for requests in flight).
    pub fn with_shutdown(mut self, shutdown: ShutdownOptions) -> Self {
        self.shutdown = shutdown;
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn state(&self) -> &GatewayState {
        &self.state
    }

    /// `listening on http://ADDR (upstreams NAME URL, …)`: what `kiln gateway` prints once
    /// bound (scripts wait for it).
    pub fn describe(&self) -> String {
        format!(
            "listening on http://{} (upstreams {})",
            self.addr,
            self.state.describe_upstreams()
        )
    }

    /// Serves until `shutdown` resolves, then drains ([`kiln_http`]): `/ready` answers 503 at
    /// once, the listener closes after the drain delay, and requests in flight (streams
    /// included) finish or are cut off at the deadline; then the last traces are written.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        // Streamed tokens go out as small writes: without TCP_NODELAY, Nagle's algorithm and
        // delayed ACKs hold each one up to 40 ms.
        let listener = self.listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let router = self.router;
        let drained = kiln_http::serve_until(
            shutdown,
            &self.state.inner.readiness,
            self.shutdown,
            |close| {
                axum::serve(listener, router)
                    .with_graceful_shutdown(close)
                    .into_future()
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("serving: {e}"))?;
        if drained == Drained::CutOff {
            eprintln!(
                "kiln gateway: requests still in flight after the {:.0} s shutdown timeout were cut off",
                self.shutdown.timeout.as_secs_f64()
            );
        }
        // The last requests' accounting tasks may still be queueing their traces.
        self.state.settle(SETTLE_TIMEOUT).await;
        self.state.inner.store.close().await;
        Ok(())
    }
}

/// Builds, binds and serves `config` on a tokio runtime of its own until `shutdown` resolves,
/// then drains as `drain` says; `on_bound` runs once the port is bound. `kiln gateway` passes
/// [`shutdown_signal`].
pub fn serve_blocking(
    config: GatewayConfig,
    drain: ShutdownOptions,
    on_bound: impl FnOnce(&Gateway),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kiln-gateway-worker")
        .build()?;
    runtime.block_on(async move {
        let gateway = Gateway::bind(config).await?.with_shutdown(drain);
        on_bound(&gateway);
        gateway.run(shutdown).await
    })
}

/// Resolves on Ctrl-C or SIGTERM.
pub use kiln_http::stop_signal as shutdown_signal;

/// A gateway running on its own thread and tokio runtime, for synchronous callers (the
/// lifecycle command, tests). Dropping the handle asks it to shut down without waiting;
/// [`GatewayHandle::shutdown`] waits.
#[derive(Debug)]
pub struct GatewayHandle {
    addr: SocketAddr,
    state: GatewayState,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl GatewayHandle {
    /// Builds and serves `config` on `config.listen`; returns once the port is bound. Safe to
    /// call from inside another tokio runtime.
    pub fn start(config: GatewayConfig) -> anyhow::Result<Self> {
        Self::start_with(config, BuildOptions::default())
    }

    /// [`GatewayHandle::start`] with explicit options.
    pub fn start_with(config: GatewayConfig, options: BuildOptions) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("kiln-gateway".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .thread_name("kiln-gateway-worker")
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("starting a runtime: {e}")));
                        return Ok(());
                    }
                };
                runtime.block_on(async move {
                    let gateway = match Gateway::bind_with(config, options).await {
                        Ok(g) => g,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return Ok(());
                        }
                    };
                    let _ = ready_tx.send(Ok((gateway.local_addr(), gateway.state().clone())));
                    gateway
                        .run(async {
                            let _ = stop_rx.await;
                        })
                        .await
                })
            })?;
        let (addr, state) = match ready_rx.recv() {
            Ok(ready) => ready?,
            Err(_) => anyhow::bail!("the gateway thread panicked while starting"),
        };
        Ok(Self {
            addr,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn state(&self) -> &GatewayState {
        &self.state
    }

    /// Stops accepting, waits for in-flight requests and joins the thread.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| anyhow::anyhow!("the gateway thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for GatewayHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
