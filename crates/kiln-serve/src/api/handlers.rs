//! The endpoint handlers: each parses, validates, and hands over to the engine or answers
//! directly. Their `#[utoipa::path]` annotations are the OpenAPI spec ([`crate::openapi`]).

use axum::Json;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::{ApiError, ApiJson};
use super::generation::{Endpoint, Generation};
use super::types::{
    ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, CompletionChunk,
    CompletionRequest, CompletionResponse, DetokenizeRequest, DetokenizeResponse, ErrorResponse,
    ListObject, ModelCard, ModelList, ModelObject, TokenizeRequest, TokenizeResponse,
};
use super::validate::{self, ValidRequest, ValidationError};
use crate::engine::SubmitError;

/// Creates a chat completion: the messages rendered with the model's chat template, then
/// generated from. With `stream: true` the answer comes as `chat.completion.chunk` events.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The completion, or with `stream: true` server-sent events, each `data: <chunk>`, ending with `data: [DONE]`",
            content(
                (ChatCompletionResponse = "application/json"),
                (ChatCompletionChunk = "text/event-stream"),
            )),
        (status = 400, description = "Invalid request; `param` names the field", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 413, description = "Body too large", body = ErrorResponse),
        (status = 429, description = "Queue full; retry after the `Retry-After` seconds", body = ErrorResponse),
        (status = 500, description = "The engine failed", body = ErrorResponse),
    ),
    security((), ("bearer" = [])),
)]
pub async fn chat_completions(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let (model, adapter) = state.resolve_model(request.model.as_deref())?;
    let valid = validate::chat(&request, &state.limits())?;
    generate(state, Endpoint::Chat, model, adapter, valid).await
}

/// Creates a text completion of a prompt (encoded with the tokenizer's special tokens, as
/// `tokenizer(prompt)`). With `stream: true` the answer comes as `text_completion` events.
#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "openai",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion, or with `stream: true` server-sent events, each `data: <chunk>`, ending with `data: [DONE]`",
            content(
                (CompletionResponse = "application/json"),
                (CompletionChunk = "text/event-stream"),
            )),
        (status = 400, description = "Invalid request; `param` names the field", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 413, description = "Body too large", body = ErrorResponse),
        (status = 429, description = "Queue full; retry after the `Retry-After` seconds", body = ErrorResponse),
        (status = 500, description = "The engine failed", body = ErrorResponse),
    ),
    security((), ("bearer" = [])),
)]
pub async fn completions(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let (model, adapter) = state.resolve_model(request.model.as_deref())?;
    let valid = validate::completion(&request, &state.limits())?;
    generate(state, Endpoint::Completion, model, adapter, valid).await
}

/// Submits the choices together and answers as the request asked.
async fn generate(
    state: AppState,
    endpoint: Endpoint,
    model: String,
    adapter: Option<usize>,
    valid: ValidRequest,
) -> Result<Response, ApiError> {
    let sequences = valid.seq_requests(adapter, state.eos_token_ids());
    let streams = state.engine().submit(sequences).map_err(|e| match e {
        SubmitError::QueueFull { waiting } => {
            state.engine().metrics().requests_rejected.inc();
            ApiError::QueueFull { waiting }
        }
        SubmitError::Invalid(message) => ApiError::EngineRefused(message),
        SubmitError::Stopped => ApiError::EngineStopped,
    })?;
    let generation = Generation::new(state, endpoint, model, &valid, streams);
    if valid.stream {
        Ok(generation.into_sse())
    } else {
        generation.collect().await
    }
}

/// Lists the base model and every adapter.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    responses(
        (status = 200, body = ModelList),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
    ),
    security((), ("bearer" = [])),
)]
pub async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    let card = |id: &str, parent: Option<&str>| ModelCard {
        id: id.to_string(),
        object: ModelObject::Model,
        created: state.created(),
        owned_by: "kiln".into(),
        parent: parent.map(str::to_string),
        max_model_len: state.max_model_len(),
    };
    let base = state.model_name();
    let data = std::iter::once(card(base, None))
        .chain(state.adapter_names().iter().map(|a| card(a, Some(base))))
        .collect();
    Json(ModelList {
        object: ListObject::List,
        data,
    })
}

/// Encodes a prompt (special tokens added unless `add_special_tokens: false`) or messages
/// (rendered with the chat template; no special tokens added unless asked).
#[utoipa::path(
    post,
    path = "/tokenize",
    tag = "vllm",
    request_body = TokenizeRequest,
    responses(
        (status = 200, body = TokenizeResponse),
        (status = 400, description = "Invalid request", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
    ),
    security((), ("bearer" = [])),
)]
pub async fn tokenize(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    state.resolve_model(request.model.as_deref())?;
    let tokens = match (&request.prompt, &request.messages) {
        (Some(prompt), None) => state
            .tokenizer()
            .encode(prompt, request.add_special_tokens.unwrap_or(true))
            .map_err(|e| ValidationError::Tokenize {
                field: "prompt",
                message: e.to_string(),
            })?,
        (None, Some(messages)) => validate::encode_messages(
            messages,
            state.tokenizer(),
            request.add_generation_prompt.unwrap_or(true),
            request.add_special_tokens.unwrap_or(false),
        )?,
        _ => return Err(ValidationError::PromptOrMessages.into()),
    };
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: state.max_model_len(),
        tokens,
    }))
}

/// Decodes token ids to text, special tokens included.
#[utoipa::path(
    post,
    path = "/detokenize",
    tag = "vllm",
    request_body = DetokenizeRequest,
    responses(
        (status = 200, body = DetokenizeResponse),
        (status = 400, description = "Invalid request", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
    ),
    security((), ("bearer" = [])),
)]
pub async fn detokenize(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    state.resolve_model(request.model.as_deref())?;
    validate::check_vocab(&request.tokens, "tokens", state.vocab_size())?;
    let prompt = state
        .tokenizer()
        .decode(&request.tokens, false)
        .map_err(|e| ValidationError::Tokenize {
            field: "tokens",
            message: e.to_string(),
        })?;
    Ok(Json(DetokenizeResponse { prompt }))
}

/// 200 with an empty body while the server is up.
#[utoipa::path(get, path = "/health", tag = "ops", responses((status = 200, description = "Up")))]
pub async fn health() -> StatusCode {
    StatusCode::OK
}

/// Liveness: 200 while the process answers (a Kubernetes liveness probe).
#[utoipa::path(get, path = "/live", tag = "ops", responses((status = 200, description = "The process answers")))]
pub async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Readiness: 200 while the server takes traffic; 503 once a stop (SIGTERM) began and the
/// requests in flight drain, so load balancers and Kubernetes stop sending new ones.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "ops",
    responses(
        (status = 200, description = "Ready for traffic"),
        (status = 503, description = "Draining before shutdown"),
    ),
)]
pub async fn ready(State(state): State<AppState>) -> Response {
    if state.readiness().is_ready() {
        Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "draining"})),
        )
            .into_response()
    }
}

/// Prometheus metrics (`kiln:` prefix, vLLM's names).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain; version=0.0.4", body = String)),
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.engine().metrics().render(),
    )
        .into_response()
}

/// This API's OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "ops", responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json")))]
pub async fn openapi_json() -> Response {
    Json(crate::openapi::spec()).into_response()
}

pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}
