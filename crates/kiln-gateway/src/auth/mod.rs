//! Who is calling: API keys and OAuth 2.0 bearer JWTs, turned into a [`Principal`] the rest of
//! the gateway (limits, routing, cost) works with.
//!
//! Both credentials travel as `Authorization: Bearer <token>`. A token shaped like a JWT (three
//! base64url parts) is validated as an OAuth 2.0 access token when `auth.oauth2` is configured;
//! everything else is an API key. Keeping one header for both means OpenAI SDKs work unchanged
//! (they only ever send `Bearer <api key>`).
//!
//! * API keys ([`api_key`]) are kept only as SHA-256 digests — a clear `key` in the config is
//!   hashed at load and dropped — and a presented key is compared against every digest in
//!   constant time, so neither the config in memory nor the response time gives a key away.
//! * JWTs ([`jwt`]) are checked against the identity provider's JWKS ([`jwks`]), which is fetched
//!   lazily, cached, refreshed in the background when old, and refetched when a token names an
//!   unknown `kid` — at most once per [`JwksOptions::min_refetch_interval`], so a flood of
//!   made-up kids cannot be turned against the identity provider. Only asymmetric algorithms are
//!   accepted, and the key's own `kty`/`alg` must agree with the token's `alg`, which closes the
//!   `alg: none` and HMAC-with-the-public-key holes.
//!
//! Errors follow RFC 6750: 401 with `WWW-Authenticate: Bearer error="invalid_token"`, 403 with
//! `error="insufficient_scope"`, and the OpenAI error envelope in the body
//! ([`AuthError::into_response`]).
//!
//! With neither API keys nor `auth.oauth2` configured the gateway is open: every request is the
//! [`Principal::anonymous`] tenant. [`Authenticator::is_open`] lets the server say so loudly.

pub mod api_key;
pub mod jwks;
pub mod jwt;

use std::sync::Arc;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::config::AuthConfig;

pub use jwks::JwksOptions;

/// An authenticated caller and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub tenant: String,
    /// Stable id for rate limits: "key:<first 16 hex of sha256(key)>" or "jwt:<tenant>".
    pub key_id: String,
    /// Models the caller may use; `"*"` is any.
    pub models: Vec<String>,
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens (prompt + completion) per minute.
    pub tpm: Option<u64>,
    pub max_concurrent: Option<u64>,
    /// The tenant's traffic must never become training data.
    pub no_train: bool,
    /// OAuth 2.0 scopes of the token (empty for API keys).
    pub scopes: Vec<String>,
}

impl Principal {
    /// Whether the caller may send requests for `model`.
    pub fn may_use(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == "*" || m == model)
    }

    /// The caller of a gateway configured without any credentials: any model, no limits.
    pub fn anonymous() -> Self {
        Self {
            tenant: "anonymous".into(),
            key_id: "anonymous".into(),
            models: vec!["*".into()],
            rpm: None,
            tpm: None,
            max_concurrent: None,
            no_train: false,
            scopes: Vec::new(),
        }
    }
}

/// The message of a rejected API key; [`AuthError::into_response`] reports it with the code
/// `invalid_api_key` (OpenAI's) instead of RFC 6750's `invalid_token`.
pub(crate) const INVALID_API_KEY: &str = "Incorrect API key provided";

/// Why a request was not authenticated. Map it to HTTP with [`AuthError::into_response`].
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer …` header (or a different scheme).
    #[error("missing credentials: send `Authorization: Bearer <API key or access token>`")]
    Missing,
    /// The token or key is wrong, expired, badly signed, …; the text says which (it is sent to
    /// the client, so it never contains the token or key itself).
    #[error("{0}")]
    InvalidToken(String),
    /// A valid token without every scope in `auth.oauth2.required_scopes`; holds those scopes,
    /// space-separated.
    #[error("the access token lacks the required scope(s): {0}")]
    InsufficientScope(String),
    /// The identity provider's keys could not be fetched and none are cached. The text (with
    /// the URL and the cause) is for logs; the client gets a generic message.
    #[error("authentication is temporarily unavailable: {0}")]
    Unavailable(String),
}

impl AuthError {
    /// 401, 401, 403, 503.
    pub fn status(&self) -> u16 {
        match self {
            Self::Missing | Self::InvalidToken(_) => 401,
            Self::InsufficientScope(_) => 403,
            Self::Unavailable(_) => 503,
        }
    }

    /// RFC 6750 `WWW-Authenticate` value, e.g. `Bearer error="invalid_token",
    /// error_description="..."`; `Bearer` alone for [`AuthError::Missing`] (and for
    /// [`AuthError::Unavailable`], where [`AuthError::into_response`] sends none).
    pub fn www_authenticate(&self) -> String {
        match self {
            Self::Missing | Self::Unavailable(_) => "Bearer".into(),
            Self::InvalidToken(why) => format!(
                "Bearer error=\"invalid_token\", error_description=\"{}\"",
                quoted_string_safe(why)
            ),
            Self::InsufficientScope(scopes) => format!(
                "Bearer error=\"insufficient_scope\", error_description=\"{}\", scope=\"{}\"",
                quoted_string_safe(&self.to_string()),
                quoted_string_safe(scopes)
            ),
        }
    }

    /// The OpenAI error `type` and `code` of the body.
    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            Self::Missing => ("authentication_error", "invalid_api_key"),
            Self::InvalidToken(why) if why == INVALID_API_KEY => {
                ("authentication_error", "invalid_api_key")
            }
            Self::InvalidToken(_) => ("authentication_error", "invalid_token"),
            Self::InsufficientScope(_) => ("permission_error", "insufficient_scope"),
            Self::Unavailable(_) => ("api_error", "auth_unavailable"),
        }
    }

    /// Status, `WWW-Authenticate` (not on 503, which gets `Retry-After` instead) and the OpenAI
    /// envelope `{"error":{"message","type","param","code"}}`.
    pub fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let (kind, code) = self.kind();
        let message = match &self {
            // The detail was logged (once per incident) where the fetch failed.
            Self::Unavailable(_) => {
                "authentication is temporarily unavailable (the identity provider's keys could \
                 not be fetched); retry shortly"
                    .to_string()
            }
            other => other.to_string(),
        };
        let body = serde_json::json!({
            "error": { "message": message, "type": kind, "param": null, "code": code }
        });
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if matches!(self, Self::Unavailable(_)) {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
        } else {
            let value = HeaderValue::from_str(&self.www_authenticate())
                .unwrap_or_else(|_| HeaderValue::from_static("Bearer"));
            headers.insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        AuthError::into_response(self)
    }
}

/// `text` with every character RFC 6750 forbids inside `error_description` (outside
/// `%x20-21 / %x23-5B / %x5D-7E`: quotes, backslashes, control and non-ASCII characters)
/// replaced, so the header value is always valid.
fn quoted_string_safe(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '"' => '\'',
            '\\' => '/',
            ' '..='~' => c,
            _ => '?',
        })
        .collect()
}

/// Checks `Authorization` headers. Cheap to clone (an `Arc` inside); `Send + Sync`.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    api_keys: api_key::ApiKeys,
    oauth2: Option<jwt::JwtValidator>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("api_keys", &self.inner.api_keys.len())
            .field("oauth2", &self.inner.oauth2.is_some())
            .finish()
    }
}

impl Authenticator {
    /// Hashes the API keys and prepares the JWT validator (the JWKS itself is fetched on the
    /// first token, or by [`Authenticator::refresh_jwks`]). Errors name the config key.
    pub fn new(cfg: &AuthConfig) -> Result<Self, anyhow::Error> {
        Self::with_jwks_options(cfg, JwksOptions::default())
    }

    /// [`Authenticator::new`] with non-default JWKS cache timings (tests use short ones).
    pub fn with_jwks_options(
        cfg: &AuthConfig,
        options: JwksOptions,
    ) -> Result<Self, anyhow::Error> {
        let api_keys = api_key::ApiKeys::new(&cfg.api_keys)?;
        let oauth2 = cfg
            .oauth2
            .as_ref()
            .map(|o| jwt::JwtValidator::new(o, options))
            .transpose()?;
        Ok(Self {
            inner: Arc::new(Inner { api_keys, oauth2 }),
        })
    }

    /// True when no credentials are configured and every request is anonymous.
    pub fn is_open(&self) -> bool {
        self.inner.api_keys.len() == 0 && self.inner.oauth2.is_none()
    }

    /// Fetches the JWKS now (for a fail-fast check at startup); returns how many usable keys it
    /// holds. `Ok(0)` when OAuth 2.0 is not configured.
    pub async fn refresh_jwks(&self) -> Result<usize, AuthError> {
        match &self.inner.oauth2 {
            Some(v) => v.refresh().await,
            None => Ok(0),
        }
    }

    /// `authorization` is the raw `Authorization` header value (Bearer only).
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        if self.is_open() {
            return Ok(Principal::anonymous());
        }
        let token = bearer_token(authorization).ok_or(AuthError::Missing)?;
        match &self.inner.oauth2 {
            Some(validator) if jwt::looks_like_jwt(token) => validator.validate(token).await,
            _ => self
                .inner
                .api_keys
                .lookup(token)
                .cloned()
                .ok_or_else(|| AuthError::InvalidToken(INVALID_API_KEY.into())),
        }
    }
}

/// The token of `Bearer <token>` (scheme case-insensitive, RFC 7235); `None` for no header,
/// another scheme or an empty token.
fn bearer_token(authorization: Option<&str>) -> Option<&str> {
    let value = authorization?.trim();
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_other_schemes_are_missing() {
        assert_eq!(bearer_token(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(Some("bearer   abc ")), Some("abc"));
        assert_eq!(bearer_token(Some("Basic dXNlcjpwdw==")), None);
        assert_eq!(bearer_token(Some("Bearer ")), None);
        assert_eq!(bearer_token(Some("Bearer")), None);
        assert_eq!(bearer_token(None), None);
    }

    #[test]
    fn www_authenticate_values_follow_rfc_6750() {
        assert_eq!(AuthError::Missing.www_authenticate(), "Bearer");
        let e = AuthError::InvalidToken("bad \"sig\" \\ é".into());
        assert_eq!(
            e.www_authenticate(),
            "Bearer error=\"invalid_token\", error_description=\"bad 'sig' / ?\""
        );
        let e = AuthError::InsufficientScope("chat:write".into());
        assert_eq!(e.status(), 403);
        assert!(
            e.www_authenticate()
                .starts_with("Bearer error=\"insufficient_scope\"")
        );
        assert!(e.www_authenticate().ends_with("scope=\"chat:write\""));
        assert_eq!(AuthError::Unavailable("x".into()).status(), 503);
    }

    #[test]
    fn may_use_honours_the_wildcard() {
        let mut p = Principal::anonymous();
        assert!(p.may_use("anything"));
        p.models = vec!["a".into()];
        assert!(p.may_use("a") && !p.may_use("b"));
    }
}
