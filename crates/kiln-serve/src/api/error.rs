//! The one place errors become HTTP: every failure is an [`ApiError`], written as OpenAI's
//! envelope `{"error": {"message", "type", "param", "code"}}` with the status that fits.
//! Client mistakes are 4xx; the only 5xx are the engine failing (500, details logged, not sent)
//! and the engine having stopped (503).

use axum::Json;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use super::types::{ErrorBody, ErrorResponse};
use super::validate::ValidationError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON, or a field has the wrong type.
    #[error("{message}")]
    BadJson {
        message: String,
        param: Option<String>,
    },
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error(
        "Incorrect API key provided. Send it as `Authorization: Bearer <key>` (the server's --api-key)."
    )]
    Unauthorized,
    #[error("The server is at capacity ({waiting} requests waiting); retry later.")]
    QueueFull { waiting: usize },
    #[error(
        "The admin API is off: start kiln serve with --admin-key K (or KILN_ADMIN_KEY) to manage adapters without a restart."
    )]
    AdminDisabled,
    #[error(
        "Incorrect admin key provided. Send it as `Authorization: Bearer <key>` (the server's --admin-key; the --api-key does not grant admin access)."
    )]
    AdminUnauthorized,
    /// An adapter the admin API cannot load; `param` is the request field at fault.
    #[error("{message}")]
    InvalidAdapter {
        param: &'static str,
        message: String,
    },
    #[error("The request body is larger than the server's limit.")]
    BodyTooLarge,
    #[error("Cannot read the request body: {0}")]
    Body(String),
    #[error("No route for {method} {path}.")]
    NotFound { method: String, path: String },
    #[error("Method {method} is not allowed for {path}.")]
    MethodNotAllowed { method: String, path: String },
    /// The engine refused a request the API layer let through (a check missing here).
    #[error("{0}")]
    EngineRefused(String),
    #[error("The server is shutting down.")]
    EngineStopped,
    /// The engine failed mid-generation; the detail is logged, not sent.
    #[error("The engine failed while generating this response; see the server log.")]
    Engine(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadJson { .. }
            | Self::Invalid(_)
            | Self::Body(_)
            | Self::EngineRefused(_)
            | Self::InvalidAdapter { .. } => StatusCode::BAD_REQUEST,
            Self::ModelNotFound(_) | Self::NotFound { .. } | Self::AdminDisabled => {
                StatusCode::NOT_FOUND
            }
            Self::Unauthorized | Self::AdminUnauthorized => StatusCode::UNAUTHORIZED,
            Self::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::EngineStopped => StatusCode::SERVICE_UNAVAILABLE,
            Self::Engine(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The envelope's body.
    pub fn body(&self) -> ErrorResponse {
        let (kind, code, param) = match self {
            Self::BadJson { param, .. } => ("invalid_request_error", None, param.clone()),
            Self::Invalid(e) => ("invalid_request_error", e.code(), e.param()),
            Self::ModelNotFound(_) => (
                "invalid_request_error",
                Some("model_not_found"),
                Some("model".into()),
            ),
            Self::Unauthorized | Self::AdminUnauthorized => {
                ("invalid_request_error", Some("invalid_api_key"), None)
            }
            Self::InvalidAdapter { param, .. } => {
                ("invalid_request_error", None, Some((*param).to_string()))
            }
            Self::AdminDisabled => ("invalid_request_error", None, None),
            Self::QueueFull { .. } => ("rate_limit_exceeded", Some("rate_limit_exceeded"), None),
            Self::BodyTooLarge | Self::Body(_) | Self::NotFound { .. } => {
                ("invalid_request_error", None, None)
            }
            Self::MethodNotAllowed { .. } => ("invalid_request_error", None, None),
            Self::EngineRefused(_) => ("invalid_request_error", None, None),
            Self::EngineStopped => ("service_unavailable", None, None),
            Self::Engine(_) => ("server_error", None, None),
        };
        ErrorResponse {
            error: ErrorBody {
                message: self.to_string(),
                kind: kind.into(),
                param,
                code: code.map(Into::into),
            },
        }
    }
}

impl ApiError {
    /// Server-side failures go to the log with their detail, which the client never sees.
    pub fn log(&self) {
        if let Self::Engine(detail) = self {
            eprintln!("kiln serve: engine failure: {detail}");
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let mut response = (self.status(), Json(self.body())).into_response();
        if matches!(self, Self::QueueFull { .. }) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// A JSON body whose errors name the field at fault: the body is parsed through
/// `serde_path_to_error`, so `{"temperature": "hot"}` is a 400 with `param: "temperature"`.
/// The content type is not checked (curl's default form type is read as JSON, as vLLM does).
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::BodyTooLarge
                } else {
                    ApiError::Body(e.body_text())
                }
            })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses `bytes` as a `T`, naming the field at fault on failure.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        json_error(&inner, &path)
    })?;
    de.end().map_err(|e| json_error(&e, "."))?;
    Ok(value)
}

fn json_error(e: &serde_json::Error, path: &str) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => ApiError::BadJson {
            message: format!("The request body is not valid JSON: {e}"),
            param: None,
        },
        Category::Data => {
            // serde reports a missing field at its parent's path; name the field itself.
            let message = e.to_string();
            let missing = message
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split('`').next());
            let param = match (path, missing) {
                (".", Some(field)) => Some(field.to_string()),
                (_, Some(field)) => Some(format!("{path}.{field}")),
                (".", None) => None,
                (_, None) => Some(path.to_string()),
            };
            let message = match &param {
                Some(p) => format!("Invalid value for `{p}`: {}", strip_position(&message)),
                None => format!("Invalid request body: {}", strip_position(&message)),
            };
            ApiError::BadJson { message, param }
        }
    }
}

/// serde_json appends " at line L column C"; the field path says more.
fn strip_position(message: &str) -> &str {
    match message.rfind(" at line ") {
        Some(i) => &message[..i],
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::CompletionRequest;

    fn param_of(body: &str) -> Option<String> {
        match parse_json::<CompletionRequest>(body.as_bytes()) {
            Err(ApiError::BadJson { param, .. }) => param,
            other => panic!("expected a JSON error, got {other:?}"),
        }
    }

    #[test]
    fn wrong_type_names_the_field() {
        assert_eq!(
            param_of(r#"{"prompt": "x", "temperature": "hot"}"#).as_deref(),
            Some("temperature")
        );
        assert_eq!(
            param_of(r#"{"prompt": "x", "stop": [1]}"#).as_deref(),
            Some("stop")
        );
    }

    #[test]
    fn missing_field_is_named() {
        assert_eq!(param_of(r#"{"model": "m"}"#).as_deref(), Some("prompt"));
    }

    #[test]
    fn statuses_and_types_follow_openai() {
        let cases = [
            (
                ApiError::ModelNotFound("x".into()),
                404,
                "invalid_request_error",
            ),
            (ApiError::Unauthorized, 401, "invalid_request_error"),
            (
                ApiError::QueueFull { waiting: 3 },
                429,
                "rate_limit_exceeded",
            ),
            (ApiError::BodyTooLarge, 413, "invalid_request_error"),
            (ApiError::EngineStopped, 503, "service_unavailable"),
            (
                ApiError::Engine("secret detail".into()),
                500,
                "server_error",
            ),
        ];
        for (error, status, kind) in cases {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
            assert_eq!(error.body().error.kind, kind, "{error:?}");
        }
    }

    #[test]
    fn engine_failures_do_not_reach_the_client() {
        let body = ApiError::Engine("tensor shape mismatch in layer 3".into()).body();
        assert!(
            !body.error.message.contains("layer 3"),
            "{}",
            body.error.message
        );
    }

    #[test]
    fn syntax_error_has_no_param() {
        assert_eq!(param_of(r#"{"prompt": "#), None);
        assert_eq!(param_of(r#"{"prompt": "x"} trailing"#), None);
    }
}
