//! OAuth 2.0 bearer JWTs (RFC 9068 access tokens) checked against the provider's JWKS.
//!
//! The order of checks, each failure a 401 `invalid_token` unless noted:
//! 1. the header is decoded by hand first, so `alg: none`, HMAC (`HS*`) and anything outside the
//!    asymmetric allow-list (RS256/384/512, PS256/384/512, ES256/384, EdDSA) is refused with a
//!    clear message before any key is looked at; a `crit` header (extensions we would not
//!    understand) is refused too. Header-supplied keys (`jwk`, `jku`, `x5u`, `x5c`) are ignored:
//!    keys come from `jwks_url` only;
//! 2. the key is found by `kid` in the cached JWKS (refetched, rate-limited, when unknown), and
//!    its own `kty`/`crv`/`alg` must fit the header `alg` — the RSA key of an `HS256` token can
//!    never become an HMAC secret;
//! 3. the signature, then `exp` and `nbf` (with `leeway_s`), `iss` and `aud` (all required);
//! 4. the tenant claim (`tenant_claim`, default `sub`), then `required_scopes` from `scope`
//!    (space-separated) and `scp` (string or array) — missing ones are a 403
//!    `insufficient_scope`.

use std::sync::Arc;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use super::jwks::{JwksCache, JwksOptions, truncate};
use super::{AuthError, Principal};
use crate::config::OAuth2Config;

/// The algorithms a token may use.
const ALLOWED: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// The position in [`ALLOWED`] and the algorithm named `name`, if it is allowed.
fn allowed(name: &str) -> Option<(usize, Algorithm)> {
    let alg = name.parse::<Algorithm>().ok()?;
    ALLOWED.iter().position(|a| *a == alg).map(|i| (i, alg))
}

/// Validates access tokens of one issuer.
pub(crate) struct JwtValidator {
    jwks: Arc<JwksCache>,
    /// One prepared `Validation` per allowed algorithm (same order as [`ALLOWED`]).
    validations: Vec<Validation>,
    required_scopes: Vec<String>,
    tenant_claim: String,
    rpm: Option<u64>,
    tpm: Option<u64>,
}

impl JwtValidator {
    pub(crate) fn new(cfg: &OAuth2Config, options: JwksOptions) -> anyhow::Result<Self> {
        if cfg.issuer.is_empty() {
            anyhow::bail!("auth.oauth2.issuer: must not be empty");
        }
        if cfg.audience.is_empty() {
            anyhow::bail!("auth.oauth2.audience: must not be empty");
        }
        if cfg.tenant_claim.is_empty() {
            anyhow::bail!("auth.oauth2.tenant_claim: must not be empty");
        }
        let validations = ALLOWED
            .iter()
            .map(|&alg| {
                let mut v = Validation::new(alg);
                v.leeway = cfg.leeway_s;
                v.validate_exp = true;
                v.validate_nbf = true;
                v.validate_aud = true;
                v.set_issuer(&[&cfg.issuer]);
                v.set_audience(&[&cfg.audience]);
                v.set_required_spec_claims(&["exp", "iss", "aud"]);
                v
            })
            .collect();
        Ok(Self {
            jwks: Arc::new(JwksCache::new(&cfg.jwks_url, options)?),
            validations,
            required_scopes: cfg.required_scopes.clone(),
            tenant_claim: cfg.tenant_claim.clone(),
            rpm: cfg.rpm,
            tpm: cfg.tpm,
        })
    }

    pub(crate) async fn refresh(&self) -> Result<usize, AuthError> {
        self.jwks.refresh().await
    }

    /// The principal of a valid access token.
    pub(crate) async fn validate(&self, token: &str) -> Result<Principal, AuthError> {
        let header = Header::decode(token)?;
        let (index, alg) = allowed(&header.alg).ok_or_else(|| {
            AuthError::InvalidToken(format!(
                "the token's algorithm `{}` is not allowed (only RS*, PS*, ES256, ES384 \
                     and EdDSA are)",
                truncate(&header.alg)
            ))
        })?;
        let validation = self
            .validations
            .get(index)
            .ok_or_else(|| AuthError::InvalidToken("unsupported algorithm".into()))?;
        let keys = self.jwks.keys_for(header.kid.as_deref(), alg).await?;

        let mut last = None;
        let mut claims = None;
        for key in &keys {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                // The wrong key of several (a token without `kid`): try the next one.
                Err(e)
                    if matches!(e.kind(), ErrorKind::InvalidSignature | ErrorKind::Crypto(_)) =>
                {
                    last = Some(e);
                }
                Err(e) => return Err(AuthError::InvalidToken(describe(e.kind()))),
            }
        }
        let claims = match (claims, last) {
            (Some(c), _) => c,
            (None, Some(e)) => return Err(AuthError::InvalidToken(describe(e.kind()))),
            (None, None) => {
                return Err(AuthError::InvalidToken("no key verifies the token".into()));
            }
        };
        self.principal(&claims)
    }

    fn principal(&self, claims: &Map<String, Value>) -> Result<Principal, AuthError> {
        let tenant = match claims.get(&self.tenant_claim) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => {
                return Err(AuthError::InvalidToken(format!(
                    "the token has no `{}` claim naming the tenant",
                    self.tenant_claim
                )));
            }
        };
        let scopes = scopes(claims);
        let missing: Vec<&str> = self
            .required_scopes
            .iter()
            .filter(|r| !scopes.iter().any(|s| s == *r))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(AuthError::InsufficientScope(self.required_scopes.join(" ")));
        }
        Ok(Principal {
            key_id: format!("jwt:{tenant}"),
            tenant,
            models: vec!["*".into()],
            rpm: self.rpm,
            tpm: self.tpm,
            max_concurrent: None,
            no_train: false,
            scopes,
        })
    }
}

/// The scopes of `scope` (space-separated) and `scp` (space-separated string or array), once
/// each, in order.
fn scopes(claims: &Map<String, Value>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |s: &str| {
        if !s.is_empty() && !out.iter().any(|o| o == s) {
            out.push(s.to_string());
        }
    };
    for name in ["scope", "scp"] {
        match claims.get(name) {
            Some(Value::String(s)) => s.split_whitespace().for_each(&mut add),
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .for_each(|s| s.split_whitespace().for_each(&mut add)),
            _ => {}
        }
    }
    out
}

/// A client-safe description of a jsonwebtoken failure.
fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired (exp)".into(),
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        ErrorKind::InvalidIssuer => "the token's issuer (iss) is not the expected one".into(),
        ErrorKind::InvalidAudience => "the token's audience (aud) is not this gateway".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("the token has no `{c}` claim"),
        ErrorKind::InvalidSignature | ErrorKind::Crypto(_) => {
            "the token's signature is invalid".into()
        }
        ErrorKind::InvalidAlgorithm => "the token's algorithm does not match its key".into(),
        ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_)
        | ErrorKind::InvalidToken => "the token is malformed".into(),
        _ => "the token is invalid".into(),
    }
}

/// Whether `token` has the shape of a compact JWS: three dot-separated base64url parts (the
/// signature may be empty, as in `alg: none` tokens, which are then rejected as JWTs).
pub(crate) fn looks_like_jwt(token: &str) -> bool {
    let b64url = |s: &str| {
        s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    };
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s), None) => {
            !h.is_empty() && !p.is_empty() && b64url(h) && b64url(p) && b64url(s)
        }
        _ => false,
    }
}

/// The JOSE header fields we look at, decoded without trusting anything yet.
struct Header {
    alg: String,
    kid: Option<String>,
}

impl Header {
    fn decode(token: &str) -> Result<Self, AuthError> {
        let malformed = || AuthError::InvalidToken("the token's header is malformed".into());
        let encoded = token.split('.').next().ok_or_else(malformed)?;
        let bytes = b64url_decode(encoded).ok_or_else(malformed)?;
        let value: Map<String, Value> = serde_json::from_slice(&bytes).map_err(|_| malformed())?;
        let alg = match value.get("alg") {
            Some(Value::String(a)) => a.clone(),
            _ => {
                return Err(AuthError::InvalidToken(
                    "the token's header has no `alg`".into(),
                ));
            }
        };
        if value.contains_key("crit") {
            return Err(AuthError::InvalidToken(
                "the token's header has critical extensions (crit), which are not supported".into(),
            ));
        }
        let kid = match value.get("kid") {
            None | Some(Value::Null) => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => {
                return Err(AuthError::InvalidToken(
                    "the token's `kid` is not a string".into(),
                ));
            }
        };
        Ok(Self { alg, kid })
    }
}

/// Base64url without padding (RFC 7515 §2); `None` on any other character.
fn b64url_decode(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        } as u32)
    }
    let text = text.trim_end_matches('=');
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.as_bytes().chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn base64url_decodes_all_lengths() {
        assert_eq!(b64url_decode("").unwrap(), b"");
        assert_eq!(b64url_decode("YQ").unwrap(), b"a");
        assert_eq!(b64url_decode("YWI").unwrap(), b"ab");
        assert_eq!(b64url_decode("YWJj").unwrap(), b"abc");
        assert_eq!(b64url_decode("_-8").unwrap(), [0xff, 0xef]);
        assert!(b64url_decode("YWJ+").is_none());
        assert!(b64url_decode("Y").is_none());
    }

    #[test]
    fn jwt_shape_is_three_base64url_parts() {
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(looks_like_jwt("eyJh.eyJz."));
        assert!(!looks_like_jwt("sk-live-abc"));
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a.b.c.d"));
        assert!(!looks_like_jwt(".b.c"));
        assert!(!looks_like_jwt("a+b.c.d"));
    }

    #[test]
    fn scopes_come_from_scope_and_scp() {
        let claims: Map<String, Value> = serde_json::from_value(serde_json::json!({
            "scope": "a b  a", "scp": ["c", "b d"]
        }))
        .unwrap();
        assert_eq!(scopes(&claims), ["a", "b", "c", "d"]);
        let claims: Map<String, Value> =
            serde_json::from_value(serde_json::json!({"scp": "x y"})).unwrap();
        assert_eq!(scopes(&claims), ["x", "y"]);
    }

    #[test]
    fn alg_none_and_hmac_are_refused_from_the_header() {
        // {"alg":"none"} and {"alg":"HS256","kid":"k"}
        for token in [
            "eyJhbGciOiJub25lIn0.e30.",
            "eyJhbGciOiJIUzI1NiIsImtpZCI6ImsifQ.e30.c2ln",
        ] {
            let h = Header::decode(token).unwrap();
            assert!(allowed(&h.alg).is_none(), "{}", h.alg);
        }
        for name in ["RS256", "PS512", "ES384", "EdDSA"] {
            assert!(allowed(name).is_some(), "{name}");
        }
    }
}
