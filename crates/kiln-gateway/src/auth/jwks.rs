//! The identity provider's signing keys (a JWKS, RFC 7517), fetched from `auth.oauth2.jwks_url`
//! and cached.
//!
//! * Fetched lazily on the first token, with a short timeout: a dead identity provider makes
//!   requests fail with 503 quickly, never hang.
//! * Refetched when a token names a `kid` the cache lacks (the provider rotated its keys) — but
//!   at most once per [`JwksOptions::min_refetch_interval`] whatever the outcome, so tokens with
//!   made-up kids cannot make the gateway hammer the provider. Concurrent misses share one fetch.
//! * Refreshed in the background once older than [`JwksOptions::max_age`], so keys the provider
//!   removed stop being trusted; a failed refresh keeps the old keys.
//!
//! Only public signature keys are kept: `RSA`, `EC` on P-256/P-384 and `OKP` Ed25519. Symmetric
//! (`oct`) keys, keys whose `use` is not `sig`, and keys this build cannot verify with are
//! skipped, so an HMAC key can never end up verifying a token.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::Mutex;

use super::AuthError;

/// Timings of the JWKS cache.
#[derive(Debug, Clone, Copy)]
pub struct JwksOptions {
    /// At most one fetch per this interval, whether for an unknown `kid` or a refresh
    /// (default 10 s).
    pub min_refetch_interval: Duration,
    /// Cached keys older than this are refreshed in the background (default 5 min).
    pub max_age: Duration,
    /// Connect + read limit of one fetch (default 5 s).
    pub fetch_timeout: Duration,
}

impl Default for JwksOptions {
    fn default() -> Self {
        Self {
            min_refetch_interval: Duration::from_secs(10),
            max_age: Duration::from_secs(300),
            fetch_timeout: Duration::from_secs(5),
        }
    }
}

/// A JWKS larger than this is refused (real ones are a few KiB).
const MAX_JWKS_BYTES: usize = 1 << 20;

/// The family of a key, with the curve where it matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

/// One usable verification key.
pub(crate) struct VerifyKey {
    kid: Option<String>,
    kind: KeyKind,
    /// The JWK's own `alg`, when it names one.
    alg: Option<Algorithm>,
    pub(crate) key: DecodingKey,
}

impl VerifyKey {
    /// Whether this key may verify a token signed with `alg`: the key type (and curve) must be
    /// the algorithm's, and the JWK's own `alg`, if any, must be exactly `alg`.
    pub(crate) fn fits(&self, alg: Algorithm) -> bool {
        let kind_ok = match alg {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => self.kind == KeyKind::Rsa,
            Algorithm::ES256 => self.kind == KeyKind::P256,
            Algorithm::ES384 => self.kind == KeyKind::P384,
            Algorithm::EdDSA => self.kind == KeyKind::Ed25519,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => false,
        };
        kind_ok && self.alg.is_none_or(|a| a == alg)
    }
}

#[derive(Default)]
struct KeySet {
    keys: Vec<Arc<VerifyKey>>,
    fetched_at: Option<Instant>,
}

#[derive(Default)]
struct FetchState {
    last_attempt: Option<Instant>,
    /// The error of the last attempt, when it failed.
    last_error: Option<String>,
}

/// The cached JWKS of one `jwks_url`.
pub(crate) struct JwksCache {
    url: String,
    client: reqwest::Client,
    options: JwksOptions,
    keys: RwLock<Arc<KeySet>>,
    /// Held for the whole of a fetch, so concurrent misses wait for one fetch instead of
    /// starting their own.
    fetch: Mutex<FetchState>,
    refreshing: AtomicBool,
}

impl JwksCache {
    pub(crate) fn new(url: &str, options: JwksOptions) -> anyhow::Result<Self> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            anyhow::bail!("auth.oauth2.jwks_url: expected an http:// or https:// URL, got `{url}`");
        }
        let client = reqwest::Client::builder()
            .timeout(options.fetch_timeout)
            .connect_timeout(options.fetch_timeout)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .map_err(|e| anyhow::anyhow!("auth.oauth2.jwks_url: HTTP client: {e}"))?;
        Ok(Self {
            url: url.to_string(),
            client,
            options,
            keys: RwLock::new(Arc::new(KeySet::default())),
            fetch: Mutex::new(FetchState::default()),
            refreshing: AtomicBool::new(false),
        })
    }

    fn snapshot(&self) -> Arc<KeySet> {
        match self.keys.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn store(&self, set: KeySet) {
        let set = Arc::new(set);
        match self.keys.write() {
            Ok(mut guard) => *guard = set,
            Err(poisoned) => *poisoned.into_inner() = set,
        }
    }

    /// The keys that may verify a token with header `kid` and `alg` (all fitting keys when the
    /// token has no `kid`), fetching the JWKS when none is cached (rate-limited).
    pub(crate) async fn keys_for(
        self: &Arc<Self>,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Vec<Arc<VerifyKey>>, AuthError> {
        let set = self.snapshot();
        let found = matching(&set, kid);
        if !found.is_empty() {
            if set
                .fetched_at
                .is_some_and(|t| t.elapsed() >= self.options.max_age)
            {
                self.spawn_refresh();
            }
            return fitting(found, alg, kid);
        }
        // A miss: the provider may have rotated its keys.
        let mut state = self.fetch.lock().await;
        // Someone else may have fetched while we waited for the lock.
        let set = self.snapshot();
        let found = matching(&set, kid);
        if !found.is_empty() {
            return fitting(found, alg, kid);
        }
        let may_fetch = state
            .last_attempt
            .is_none_or(|t| t.elapsed() >= self.options.min_refetch_interval);
        if may_fetch {
            self.fetch_into(&mut state).await;
        }
        let set = self.snapshot();
        if set.fetched_at.is_none() {
            let why = state
                .last_error
                .clone()
                .unwrap_or_else(|| "not fetched yet".into());
            return Err(AuthError::Unavailable(format!(
                "JWKS {} unavailable: {why}",
                self.url
            )));
        }
        let found = matching(&set, kid);
        if found.is_empty() {
            return Err(AuthError::InvalidToken(match kid {
                Some(kid) => format!("unknown signing key id (kid) `{}`", truncate(kid)),
                None => "the token names no kid and no published key fits its algorithm".into(),
            }));
        }
        fitting(found, alg, kid)
    }

    /// Fetches now, unless a fetch happened within the minimum interval. Returns how many keys
    /// are cached afterwards.
    pub(crate) async fn refresh(&self) -> Result<usize, AuthError> {
        let mut state = self.fetch.lock().await;
        let may_fetch = state
            .last_attempt
            .is_none_or(|t| t.elapsed() >= self.options.min_refetch_interval);
        if may_fetch {
            self.fetch_into(&mut state).await;
        }
        let set = self.snapshot();
        match (&state.last_error, set.fetched_at) {
            (Some(e), None) => Err(AuthError::Unavailable(format!(
                "JWKS {} unavailable: {e}",
                self.url
            ))),
            _ => Ok(set.keys.len()),
        }
    }

    /// A background refresh of stale keys; at most one at a time.
    fn spawn_refresh(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            // Errors are logged by `fetch_into`; the old keys stay in use.
            let _ = this.refresh().await;
            this.refreshing.store(false, Ordering::Release);
        });
    }

    /// One fetch; on success the cache is replaced, on failure it is kept and the error logged
    /// (once per incident: only when the previous attempt succeeded).
    async fn fetch_into(&self, state: &mut FetchState) {
        state.last_attempt = Some(Instant::now());
        match self.fetch_once().await {
            Ok((set, skipped)) => {
                if state.last_error.take().is_some() {
                    eprintln!("kiln gateway: auth: JWKS {} reachable again", self.url);
                }
                for why in skipped {
                    eprintln!(
                        "kiln gateway: auth: JWKS {}: skipped a key: {why}",
                        self.url
                    );
                }
                self.store(set);
            }
            Err(e) => {
                if state.last_error.is_none() {
                    eprintln!(
                        "kiln gateway: auth: fetching JWKS {} failed: {e} (keeping {} cached key(s))",
                        self.url,
                        self.snapshot().keys.len()
                    );
                }
                state.last_error = Some(e);
            }
        }
    }

    /// GETs and parses the JWKS; returns the usable keys and why the others were skipped.
    async fn fetch_once(&self) -> Result<(KeySet, Vec<String>), String> {
        let mut response = self
            .client
            .get(&self.url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| describe_reqwest(&e))?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
        {
            return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| describe_reqwest(&e))? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_JWKS_BYTES {
                return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
            }
        }
        let (keys, skipped) = parse_jwks(&body)?;
        Ok((
            KeySet {
                keys,
                fetched_at: Some(Instant::now()),
            },
            skipped,
        ))
    }
}

fn describe_reqwest(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        format!("timed out: {e}")
    } else if e.is_connect() {
        format!("cannot connect: {e}")
    } else {
        e.to_string()
    }
}

/// The keys of `set` with the token's `kid` (every key when the token has none).
fn matching(set: &KeySet, kid: Option<&str>) -> Vec<Arc<VerifyKey>> {
    set.keys
        .iter()
        .filter(|k| kid.is_none_or(|kid| k.kid.as_deref() == Some(kid)))
        .cloned()
        .collect()
}

/// `found` narrowed to keys that fit `alg`; an error naming the mismatch when none does.
fn fitting(
    found: Vec<Arc<VerifyKey>>,
    alg: Algorithm,
    kid: Option<&str>,
) -> Result<Vec<Arc<VerifyKey>>, AuthError> {
    let fit: Vec<_> = found.into_iter().filter(|k| k.fits(alg)).collect();
    if fit.is_empty() {
        return Err(AuthError::InvalidToken(match kid {
            Some(kid) => format!(
                "the key `{}` is not a {alg:?} key (its kty/crv/alg differ)",
                truncate(kid)
            ),
            None => format!("no published key is a {alg:?} key"),
        }));
    }
    Ok(fit)
}

/// A client-supplied string cut short for messages.
pub(crate) fn truncate(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

/// Parses a JWKS document, keeping the usable signature keys.
fn parse_jwks(body: &[u8]) -> Result<(Vec<Arc<VerifyKey>>, Vec<String>), String> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let doc: Document =
        serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, value) in doc.keys.into_iter().enumerate() {
        let kid = value
            .get("kid")
            .and_then(|k| k.as_str())
            .map(str::to_string);
        let name = match &kid {
            Some(kid) => format!("keys[{i}] (kid `{}`)", truncate(kid)),
            None => format!("keys[{i}]"),
        };
        // Keys of other types (oct, unknown kty/alg) fail to parse or are refused below; either
        // way they are skipped rather than failing the whole set.
        match serde_json::from_value::<Jwk>(value) {
            Ok(jwk) => match verify_key(&jwk, kid) {
                Ok(key) => keys.push(Arc::new(key)),
                Err(why) => skipped.push(format!("{name}: {why}")),
            },
            Err(e) => skipped.push(format!("{name}: unsupported or malformed JWK: {e}")),
        }
    }
    Ok((keys, skipped))
}

fn verify_key(jwk: &Jwk, kid: Option<String>) -> Result<VerifyKey, String> {
    if let Some(usage) = &jwk.common.public_key_use
        && *usage != PublicKeyUse::Signature
    {
        return Err("`use` is not `sig`".into());
    }
    let kind = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => KeyKind::Rsa,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => KeyKind::P256,
            EllipticCurve::P384 => KeyKind::P384,
            ref other => return Err(format!("EC curve {other:?} is not supported")),
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            KeyKind::Ed25519
        }
        AlgorithmParameters::OctetKeyPair(p) => {
            return Err(format!("OKP curve {:?} is not supported", p.curve));
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric (`oct`) keys are never trusted".into());
        }
    };
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(a) => Some(
            a.to_string()
                .parse::<Algorithm>()
                .map_err(|_| format!("`alg` {a} is not a signature algorithm"))?,
        ),
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("bad key material: {e}"))?;
    let key = VerifyKey {
        kid,
        kind,
        alg,
        key,
    };
    if let Some(a) = alg
        && !key.fits(a)
    {
        return Err(format!("`alg` {a:?} does not match the key type"));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn oct_and_encryption_keys_are_skipped_and_the_rest_kept() {
        let doc = serde_json::json!({"keys": [
            {"kty": "oct", "kid": "h", "alg": "HS256", "k": "c2VjcmV0"},
            {"kty": "EC", "kid": "e", "use": "enc", "crv": "P-256",
             "x": "7rpljztvkPf-zAc1GjebVkWPJ7L-m93F8__SzESd18k",
             "y": "56nsdrn06YyeVRKZmsEtkD-r9gkIJk60FAcBtUStaAQ"},
            {"kty": "EC", "kid": "s", "alg": "ES256", "crv": "P-256",
             "x": "7rpljztvkPf-zAc1GjebVkWPJ7L-m93F8__SzESd18k",
             "y": "56nsdrn06YyeVRKZmsEtkD-r9gkIJk60FAcBtUStaAQ"},
            {"kty": "EC", "kid": "m", "alg": "RS256", "crv": "P-256",
             "x": "7rpljztvkPf-zAc1GjebVkWPJ7L-m93F8__SzESd18k",
             "y": "56nsdrn06YyeVRKZmsEtkD-r9gkIJk60FAcBtUStaAQ"},
            {"kty": "weird", "kid": "w"}
        ]});
        let (keys, skipped) = parse_jwks(doc.to_string().as_bytes()).unwrap();
        assert_eq!(keys.len(), 1, "{skipped:?}");
        assert_eq!(keys[0].kid.as_deref(), Some("s"));
        assert!(keys[0].fits(Algorithm::ES256));
        assert!(!keys[0].fits(Algorithm::ES384) && !keys[0].fits(Algorithm::HS256));
        assert_eq!(skipped.len(), 4, "{skipped:?}");
        assert!(parse_jwks(b"{\"nokeys\": 1}").is_err());
    }

    #[test]
    fn truncate_keeps_short_strings() {
        assert_eq!(truncate("abc"), "abc");
        assert_eq!(truncate(&"x".repeat(100)).chars().count(), 65);
    }
}
