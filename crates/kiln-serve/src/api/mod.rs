//! The OpenAI-compatible HTTP API: `/v1/chat/completions`, `/v1/completions`, `/v1/models`,
//! vLLM's `/tokenize` and `/detokenize`, `/health`, `/metrics` and `/openapi.json`.
//!
//! A request goes through three typed stages, each failure an [`ApiError`] mapped to HTTP in one
//! place ([`error`]): the JSON body ([`types`], parsed so a wrong type names its field), the
//! validated request ([`validate::ValidRequest`]: ranges checked, prompt tokenized, token budget
//! settled), and the engine's event streams turned into a response or a server-sent event
//! stream ([`generation`]). Handlers hold no mutable state: the engine owns everything that
//! changes.

pub mod choice;
pub mod error;
pub mod generation;
pub mod handlers;
pub mod token_text;
pub mod types;
pub mod validate;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kiln_core::Tokenizer;

use crate::engine::EngineHandle;
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
    /// The names of the adapters, in the engine's adapter order (`SeqRequest::adapter`).
    pub adapter_names: Vec<String>,
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
    spelling: TokenSpelling,
    /// Server start, Unix seconds (the models' `created`).
    created: u64,
}

impl AppState {
    pub fn new(config: ApiConfig) -> Self {
        let spelling = TokenSpelling::detect(&config.tokenizer);
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            inner: Arc::new(Inner {
                config,
                spelling,
                created,
            }),
        }
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

    pub fn adapter_names(&self) -> &[String] {
        &self.inner.config.adapter_names
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
    /// Returns the name to echo back and the adapter index.
    pub fn resolve_model(&self, name: Option<&str>) -> Result<(String, Option<usize>), ApiError> {
        match name {
            None => Ok((self.model_name().to_string(), None)),
            Some(n) if n == self.model_name() => Ok((n.to_string(), None)),
            Some(n) => self
                .adapter_names()
                .iter()
                .position(|a| a == n)
                .map(|i| (n.to_string(), Some(i)))
                .ok_or_else(|| ApiError::ModelNotFound(n.to_string())),
        }
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(key) = &self.inner.config.api_key else {
            return true;
        };
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), key.as_bytes()))
    }
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

/// The whole API. `/health`, `/metrics` and `/openapi.json` stay open when an API key is set;
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
    let max_body = state.inner.config.max_body_bytes;
    Router::new()
        .merge(protected)
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        .route("/openapi.json", get(handlers::openapi_json))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}
