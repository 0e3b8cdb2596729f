//! The OpenAI-compatible HTTP API: `/v1/chat/completions`, `/v1/completions`, `/v1/models`,
//! vLLM's `/tokenize` and `/detokenize`, `/health`, `/metrics` and `/openapi.json`.
//!
//! A request goes through three typed stages, each failure an [`ApiError`] mapped to HTTP in one
//! place ([`error`]): the JSON body ([`types`], parsed so a wrong type names its field), the
//! validated request ([`validate::ValidRequest`]: ranges checked, prompt tokenized, token budget
//! settled), and the engine's event streams turned into a response or a server-sent event
//! stream ([`generation`]). Handlers hold no mutable state but one: which adapter slot each
//! adapter name points to, changed only by the admin API ([`admin`]) one swap at a time. The
//! engine owns everything else that changes.

pub mod admin;
pub mod choice;
pub mod error;
pub mod generation;
pub mod handlers;
pub mod token_text;
pub mod types;
pub mod validate;

use std::sync::{Arc, PoisonError, RwLock};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kiln_core::Tokenizer;
use kiln_model::CausalLm;

use crate::engine::EngineHandle;
use crate::server::AdapterSpec;
pub use error::ApiError;
use token_text::TokenSpelling;
use validate::{Limits, MAX_CHOICES};

/// Request bodies larger than this are refused with 413, unless configured otherwise.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;

/// Everything the API needs: the engine and what it serves.
#[derive(Debug)]
pub struct ApiConfig {
    pub engine: EngineHandle,
    pub tokenizer: Tokenizer,
    /// The name requests use for the base model.
    pub model_name: String,
    /// The adapters the engine was started with, in its slot order (`SeqRequest::adapter`).
    pub adapters: Vec<AdapterSpec>,
    /// The base model (weights shared, no adapter attached), which adapters loaded through the
    /// admin API attach to.
    pub base_model: CausalLm,
    /// When set, `/admin/*` is served behind `Authorization: Bearer <key>`; otherwise it
    /// answers 404.
    pub admin_key: Option<String>,
    /// Tokens that end generation (unless a request sets `ignore_eos`).
    pub eos_token_ids: Vec<u32>,
    /// The model's vocabulary size (prompt token ids must be below it).
    pub vocab_size: usize,
    /// When set, every `/v1/*`, `/tokenize` and `/detokenize` request needs
    /// `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
}

/// The shared, read-only state every handler gets: cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ApiConfig,
    /// What each adapter name serves now, in listing order.
    adapters: RwLock<Vec<ServedAdapter>>,
    /// Held through a whole swap, so swaps never interleave.
    swap_lock: tokio::sync::Mutex<()>,
    spelling: TokenSpelling,
    /// Server start, Unix seconds (the models' `created`).
    created: u64,
    /// False once a stop began: `GET /ready` answers 503 while requests drain.
    readiness: kiln_http::Readiness,
}

impl AppState {
    pub fn new(config: ApiConfig) -> Self {
        let spelling = TokenSpelling::detect(&config.tokenizer);
        let created = unix_now();
        let adapters = config
            .adapters
            .iter()
            .enumerate()
            .map(|(slot, spec)| ServedAdapter {
                name: spec.name.clone(),
                path: spec.dir.to_string_lossy().into_owned(),
                slot,
                loaded_at: created,
                swaps: 0,
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                config,
                adapters: RwLock::new(adapters),
                swap_lock: tokio::sync::Mutex::new(()),
                spelling,
                created,
                readiness: kiln_http::Readiness::new(),
            }),
        }
    }

    /// Whether the server takes traffic (`GET /ready`); a stop sets it draining.
    pub fn readiness(&self) -> &kiln_http::Readiness {
        &self.inner.readiness
    }

    pub fn engine(&self) -> &EngineHandle {
        &self.inner.config.engine
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.config.tokenizer
    }

    pub fn model_name(&self) -> &str {
        &self.inner.config.model_name
    }

    /// The adapters' names as served now (hot swaps included), in listing order.
    pub fn adapter_names(&self) -> Vec<String> {
        self.served_adapters().into_iter().map(|a| a.name).collect()
    }

    /// A snapshot of the adapters served now.
    pub(crate) fn served_adapters(&self) -> Vec<ServedAdapter> {
        self.inner
            .adapters
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.inner.config.eos_token_ids
    }

    pub fn max_model_len(&self) -> usize {
        self.engine().config().max_model_len
    }

    pub(crate) fn spelling(&self) -> TokenSpelling {
        self.inner.spelling
    }

    pub(crate) fn created(&self) -> u64 {
        self.inner.created
    }

    pub(crate) fn limits(&self) -> Limits<'_> {
        Limits {
            tokenizer: self.tokenizer(),
            max_model_len: self.max_model_len(),
            vocab_size: self.inner.config.vocab_size,
            max_choices: MAX_CHOICES.min(self.engine().config().max_queue.max(1)),
        }
    }

    pub(crate) fn vocab_size(&self) -> usize {
        self.inner.config.vocab_size
    }

    /// The model a request names: the base (by its served name, or when absent) or an adapter.
    /// Returns the name to echo back and the adapter slot (`SeqRequest::adapter`) the name
    /// serves now.
    pub fn resolve_model(&self, name: Option<&str>) -> Result<(String, Option<usize>), ApiError> {
        match name {
            None => Ok((self.model_name().to_string(), None)),
            Some(n) if n == self.model_name() => Ok((n.to_string(), None)),
            Some(n) => self
                .inner
                .adapters
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .find(|a| a.name == n)
                .map(|a| (n.to_string(), Some(a.slot)))
                .ok_or_else(|| ApiError::ModelNotFound(n.to_string())),
        }
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        match &self.inner.config.api_key {
            None => true,
            Some(key) => bearer_matches(headers, key),
        }
    }
}

/// An adapter name and what it serves now.
#[derive(Debug, Clone)]
pub(crate) struct ServedAdapter {
    pub name: String,
    /// The directory, as given at startup or to the admin API.
    pub path: String,
    /// The engine slot holding its weights.
    pub slot: usize,
    /// When its weights were loaded, Unix seconds.
    pub loaded_at: u64,
    /// How many times the name has been given new weights.
    pub swaps: u64,
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether `headers` carry `Authorization: Bearer <key>`.
fn bearer_matches(headers: &HeaderMap, key: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), key.as_bytes()))
}

/// Compares without stopping at the first difference, so response times do not leak the key.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_api_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state.authorized(request.headers()) {
        next.run(request).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

async fn require_admin_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    match &state.inner.config.admin_key {
        None => ApiError::AdminDisabled.into_response(),
        Some(key) if bearer_matches(request.headers(), key) => next.run(request).await,
        Some(_) => ApiError::AdminUnauthorized.into_response(),
    }
}

/// The whole API. `/health`, `/metrics` and `/openapi.json` stay open when an API key is set;
/// `/admin/*` needs the admin key (not the API key) and answers 404 without one configured;
/// unknown paths and methods get the error envelope (404, 405).
pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/models", get(handlers::list_models))
        .route("/tokenize", post(handlers::tokenize))
        .route("/detokenize", post(handlers::detokenize))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let admin_routes = Router::new()
        .route(
            "/admin/adapters",
            get(admin::list_adapters).post(admin::load_adapter),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_admin_key,
        ));
    let max_body = state.inner.config.max_body_bytes;
    Router::new()
        .merge(protected)
        .merge(admin_routes)
        .route("/health", get(handlers::health))
        .route("/live", get(handlers::live))
        .route("/ready", get(handlers::ready))
        .route("/metrics", get(handlers::metrics))
        .route("/openapi.json", get(handlers::openapi_json))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}
