//! The one place the gateway's own errors become HTTP responses: OpenAI's error envelope,
//! `{"error": {"message", "type", "param", "code"}}`, with a stable machine-readable `code`
//! (`model_not_allowed`, `upstream_unavailable`, …) that clients and the docs' error table key on.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error the gateway answers itself (auth and rate-limit refusals come with their own
/// responses from [`crate::auth`] and [`crate::limits`], in the same envelope).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `rate_limit_error`, `api_error`, …
    pub kind: &'static str,
    /// The stable machine-readable code.
    pub code: &'static str,
    pub message: String,
    /// The request field at fault (`messages[2].content`), when there is one.
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code,
            message: message.into(),
            param: None,
        }
    }

    /// 400 `invalid_request_error` about `param`.
    pub fn invalid(
        code: &'static str,
        param: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                code,
                message,
            )
        }
    }

    /// The same error about another status.
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            message,
        )
    }

    /// The envelope's JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// An OpenAI error envelope response (for modules that build their own status and headers).
pub fn envelope(
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: impl Into<String>,
) -> Response {
    ApiError::new(status, kind, code, message).into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn envelope_names_the_field_and_code() {
        let e = ApiError::invalid("invalid_type", "messages[0].content", "expected a string");
        let body = e.body();
        assert_eq!(body["error"]["param"], "messages[0].content");
        assert_eq!(body["error"]["code"], "invalid_type");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(e.into_response().status(), StatusCode::BAD_REQUEST);
    }
}
