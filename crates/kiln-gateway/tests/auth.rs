//! Authentication against a real JWKS server on a bound port: every JWT failure mode, key
//! rotation, the refetch rate limit, API keys, and an unreachable identity provider.
//!
//! The keys under `tests/fixtures/auth/` are test-only (see the README there).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use kiln_gateway::auth::{AuthError, Authenticator, JwksOptions, Principal};
use kiln_gateway::config::{ApiKeyConfig, AuthConfig, OAuth2Config};
use serde_json::{Value, json};

const RSA1_KEY: &str = include_str!("fixtures/auth/rsa1.key.pem");
const RSA1_PUB: &str = include_str!("fixtures/auth/rsa1.pub.pem");
const RSA2_KEY: &str = include_str!("fixtures/auth/rsa2.key.pem");
const EC1_KEY: &str = include_str!("fixtures/auth/ec1.key.pem");
const ED1_KEY: &str = include_str!("fixtures/auth/ed1.key.pem");

const ISSUER: &str = "https://idp.test/";
const AUDIENCE: &str = "kiln-gateway";

fn jwk(name: &str) -> Value {
    let text = match name {
        "rsa1" => include_str!("fixtures/auth/rsa1.jwk.json"),
        "rsa2" => include_str!("fixtures/auth/rsa2.jwk.json"),
        "ec1" => include_str!("fixtures/auth/ec1.jwk.json"),
        "ed1" => include_str!("fixtures/auth/ed1.jwk.json"),
        other => panic!("no fixture {other}"),
    };
    serde_json::from_str(text).unwrap()
}

/// A stand-in identity provider: serves `GET /jwks`, counts fetches, and can be switched to a
/// different key set or to failing with 500 while running.
#[derive(Clone)]
struct Idp {
    jwks: Arc<Mutex<Value>>,
    hits: Arc<AtomicUsize>,
    failing: Arc<AtomicBool>,
    url: String,
}

impl Idp {
    async fn start(keys: &[&str]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        let idp = Idp {
            jwks: Arc::new(Mutex::new(Value::Null)),
            hits: Arc::new(AtomicUsize::new(0)),
            failing: Arc::new(AtomicBool::new(false)),
            url,
        };
        idp.publish(keys);
        let app = Router::new()
            .route("/jwks", get(serve_jwks))
            .with_state(idp.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        idp
    }

    fn publish(&self, keys: &[&str]) {
        let keys: Vec<Value> = keys.iter().map(|k| jwk(k)).collect();
        *self.jwks.lock().unwrap() = json!({ "keys": keys });
    }

    fn publish_raw(&self, doc: Value) {
        *self.jwks.lock().unwrap() = doc;
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn serve_jwks(State(idp): State<Idp>) -> Response {
    idp.hits.fetch_add(1, Ordering::SeqCst);
    if idp.failing.load(Ordering::SeqCst) {
        return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "down").into_response();
    }
    let doc = idp.jwks.lock().unwrap().clone();
    axum::Json(doc).into_response()
}

fn oauth_config(jwks_url: &str) -> AuthConfig {
    AuthConfig {
        api_keys: Vec::new(),
        oauth2: Some(OAuth2Config {
            jwks_url: jwks_url.to_string(),
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            leeway_s: 5,
            required_scopes: vec!["chat".into()],
            rpm: Some(60),
            tpm: Some(10_000),
            tenant_claim: "sub".into(),
        }),
    }
}

/// Short timings so the tests need not sleep for the production 10 s.
fn fast() -> JwksOptions {
    JwksOptions {
        min_refetch_interval: Duration::from_millis(1000),
        max_age: Duration::from_secs(300),
        fetch_timeout: Duration::from_secs(1),
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims() -> Value {
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "acme",
        "iat": now(), "nbf": now() - 10, "exp": now() + 600,
        "scope": "chat models:read",
    })
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(EC1_KEY.as_bytes()).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(ED1_KEY.as_bytes()).unwrap(),
        _ if kid == Some("rsa-2") => EncodingKey::from_rsa_pem(RSA2_KEY.as_bytes()).unwrap(),
        _ => EncodingKey::from_rsa_pem(RSA1_KEY.as_bytes()).unwrap(),
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

fn b64url(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let mut n = 0u32;
        for (i, b) in chunk.iter().enumerate() {
            n |= u32::from(*b) << (16 - 8 * i);
        }
        for i in 0..=chunk.len() {
            out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn auth(a: &Authenticator, token: &str) -> Result<Principal, AuthError> {
    a.authenticate(Some(&bearer(token))).await
}

/// Asserts a 401 `invalid_token` whose description mentions `needle`.
fn assert_invalid(result: Result<Principal, AuthError>, needle: &str, case: &str) {
    let err = result.expect_err(case);
    assert_eq!(err.status(), 401, "{case}: {err}");
    let www = err.www_authenticate();
    assert!(
        www.starts_with("Bearer error=\"invalid_token\", error_description=\""),
        "{case}: {www}"
    );
    assert!(
        err.to_string().contains(needle),
        "{case}: expected `{needle}` in `{err}`"
    );
}

#[tokio::test]
async fn rs256_es256_and_eddsa_tokens_are_accepted_with_tenant_and_scopes() {
    let idp = Idp::start(&["rsa1", "ec1", "ed1"]).await;
    let a = Authenticator::with_jwks_options(&oauth_config(&idp.url), fast()).unwrap();

    let p = auth(&a, &sign(Algorithm::RS256, Some("rsa-1"), &claims()))
        .await
        .unwrap();
    assert_eq!(p.tenant, "acme");
    assert_eq!(p.key_id, "jwt:acme");
    assert_eq!(p.scopes, ["chat", "models:read"]);
    assert_eq!((p.rpm, p.tpm), (Some(60), Some(10_000)));
    assert!(p.may_use("any-model"));

    // `scp` as an array, another tenant.
    let c = with(without(claims(), "scope"), "scp", json!(["chat", "x"]));
    let c = with(c, "sub", json!("globex"));
    let p = auth(&a, &sign(Algorithm::ES256, Some("ec-1"), &c))
        .await
        .unwrap();
    assert_eq!(p.tenant, "globex");
    assert_eq!(p.scopes, ["chat", "x"]);

    // `scp` as a space-separated string; `aud` as an array containing ours.
    let c = with(without(claims(), "scope"), "scp", json!("chat"));
    let c = with(c, "aud", json!(["other-api", AUDIENCE]));
    let p = auth(&a, &sign(Algorithm::EdDSA, Some("ed-1"), &c))
        .await
        .unwrap();
    assert_eq!(p.scopes, ["chat"]);

    // Expired 2 s ago is still inside the 5 s leeway.
    let c = with(claims(), "exp", json!(now() - 2));
    auth(&a, &sign(Algorithm::RS256, Some("rsa-1"), &c))
        .await
        .unwrap();

    // One fetch served all of it.
    assert_eq!(idp.hits(), 1);
}

#[tokio::test]
async fn custom_tenant_claim_and_a_token_without_kid() {
    let idp = Idp::start(&["rsa1"]).await;
    let mut cfg = oauth_config(&idp.url);
    cfg.oauth2.as_mut().unwrap().tenant_claim = "org_id".into();
    let a = Authenticator::with_jwks_options(&cfg, fast()).unwrap();
    let c = with(claims(), "org_id", json!("initech"));
    let p = auth(&a, &sign(Algorithm::RS256, None, &c)).await.unwrap();
    assert_eq!(p.tenant, "initech");
    assert_invalid(
        auth(&a, &sign(Algorithm::RS256, None, &claims())).await,
        "org_id",
        "no tenant claim",
    );
}

#[tokio::test]
async fn every_jwt_failure_mode_is_a_401_invalid_token() {
    let idp = Idp::start(&["rsa1", "ec1"]).await;
    let a = Authenticator::with_jwks_options(&oauth_config(&idp.url), fast()).unwrap();
    let rs = |c: &Value| sign(Algorithm::RS256, Some("rsa-1"), c);

    let valid = rs(&claims());
    let mut parts: Vec<String> = valid.split('.').map(str::to_string).collect();
    let tampered_claims = with(claims(), "sub", json!("someone-else"));
    parts[1] = b64url(tampered_claims.to_string().as_bytes());
    let tampered = parts.join(".");

    let none_header = b64url(br#"{"alg":"none","typ":"JWT","kid":"rsa-1"}"#);
    let none_payload = b64url(claims().to_string().as_bytes());
    let alg_none = format!("{none_header}.{none_payload}.");
    let alg_none_with_sig = format!("{none_header}.{none_payload}.{}", parts[2]);

    // The classic confusion: HS256 with the RSA public key (PEM) as the HMAC secret.
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = Some("rsa-1".into());
    let hs256_with_public_key = jsonwebtoken::encode(
        &hs_header,
        &claims(),
        &EncodingKey::from_secret(RSA1_PUB.as_bytes()),
    )
    .unwrap();

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            rs(&with(claims(), "exp", json!(now() - 100))),
            "expired",
        ),
        (
            "not yet valid",
            rs(&with(claims(), "nbf", json!(now() + 100))),
            "not valid yet",
        ),
        (
            "wrong issuer",
            rs(&with(claims(), "iss", json!("https://evil.test/"))),
            "issuer",
        ),
        (
            "wrong audience",
            rs(&with(claims(), "aud", json!("another-api"))),
            "audience",
        ),
        ("no exp", rs(&without(claims(), "exp")), "`exp`"),
        ("no aud", rs(&without(claims(), "aud")), "`aud`"),
        ("tampered payload", tampered, "signature"),
        ("alg none", alg_none, "`none` is not allowed"),
        (
            "alg none with a signature",
            alg_none_with_sig,
            "`none` is not allowed",
        ),
        (
            "HS256 signed with the public key",
            hs256_with_public_key,
            "`HS256` is not allowed",
        ),
        (
            // rsa-1's JWK says alg RS256: the same key may not verify RS384.
            "alg differs from the JWK's alg",
            sign(Algorithm::RS384, Some("rsa-1"), &claims()),
            "not a RS384 key",
        ),
        (
            // An ES256 token pointing at an RSA key.
            "kty differs from the header alg",
            sign(Algorithm::ES256, Some("rsa-1"), &claims()),
            "not a ES256 key",
        ),
        (
            "kid not in the JWKS",
            sign(Algorithm::RS256, Some("rsa-2"), &claims()),
            "unknown signing key id",
        ),
        ("garbage", "eyJhbGciOi.eyJz.c2ln".into(), "malformed"),
    ];
    for (case, token, needle) in cases {
        assert_invalid(auth(&a, &token).await, needle, case);
    }
    // The control: the untouched token is fine.
    auth(&a, &valid).await.unwrap();

    // A token signed with rsa-2's private key but claiming rsa-1's kid fails on the signature.
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    let forged = jsonwebtoken::encode(
        &header,
        &claims(),
        &EncodingKey::from_rsa_pem(RSA2_KEY.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_invalid(auth(&a, &forged).await, "signature", "wrong key under kid");
}

#[tokio::test]
async fn an_hmac_key_in_the_jwks_is_never_used() {
    let idp = Idp::start(&[]).await;
    // "secret" base64url-encoded, published as a symmetric key next to a real one.
    idp.publish_raw(json!({"keys": [
        {"kty": "oct", "kid": "hmac", "alg": "HS256", "k": "c2VjcmV0"},
        jwk("rsa1"),
    ]}));
    let a = Authenticator::with_jwks_options(&oauth_config(&idp.url), fast()).unwrap();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("hmac".into());
    let token =
        jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(b"secret")).unwrap();
    assert_invalid(auth(&a, &token).await, "`HS256` is not allowed", "oct key");
    auth(&a, &sign(Algorithm::RS256, Some("rsa-1"), &claims()))
        .await
        .unwrap();
}

#[tokio::test]
async fn missing_scope_is_403_insufficient_scope() {
    let idp = Idp::start(&["rsa1"]).await;
    let a = Authenticator::with_jwks_options(&oauth_config(&idp.url), fast()).unwrap();
    for c in [
        with(claims(), "scope", json!("models:read")),
        without(claims(), "scope"),
        with(without(claims(), "scope"), "scp", json!(["chatty"])),
    ] {
        let err = auth(&a, &sign(Algorithm::RS256, Some("rsa-1"), &c))
            .await
            .unwrap_err();
        assert_eq!(err.status(), 403, "{err}");
        let www = err.www_authenticate();
        assert!(
            www.starts_with("Bearer error=\"insufficient_scope\""),
            "{www}"
        );
        assert!(www.contains("scope=\"chat\""), "{www}");
    }
}

#[tokio::test]
async fn unknown_kid_refetches_the_jwks_once_then_rate_limits() {
    let idp = Idp::start(&["rsa1"]).await;
    let a = Authenticator::with_jwks_options(&oauth_config(&idp.url), fast()).unwrap();
    let unknown: Vec<String> = (0..50)
        .map(|n| sign(Algorithm::RS256, Some(&format!("nope-{n}")), &claims()))
        .collect();
    auth(&a, &sign(Algorithm::RS256, Some("rsa-1"), &claims()))
        .await
        .unwrap();
    assert_eq!(idp.hits(), 1);

    // Right after a fetch an unknown kid is refused without asking the IdP again.
    assert_invalid(auth(&a, &unknown[0]).await, "nope-0", "unknown kid");
    assert_eq!(idp.hits(), 1);

    // Once the interval (1 s here) has passed, one unknown kid triggers exactly one refetch …
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_invalid(
        auth(&a, &unknown[1]).await,
        "unknown signing key id",
        "unknown kid",
    );
    assert_eq!(idp.hits(), 2);
    // … and a burst of made-up kids right after causes none.
    let burst: Vec<_> = unknown[2..]
        .iter()
        .map(|t| {
            let (a, t) = (a.clone(), t.clone());
            tokio::spawn(async move { auth(&a, &t).await })
        })
        .collect();
    for h in burst {
        assert_eq!(h.await.unwrap().unwrap_err().status(), 401);
    }
    assert_eq!(idp.hits(), 2);
}

#[tokio::test]
async fn with_default_timings_a_new_kid_within_10_s_of_a_fetch_is_not_refetched() {
    let idp = Idp::start(&["rsa1"]).await;
    let a = Authenticator::new(&oauth_config(&idp.url)).unwrap();
    auth(&a, &sign(Algorithm::RS256, Some("rsa-1"), &claims()))
        .await
        .unwrap();
    idp.publish(&["rsa1", "rsa2"]);
    for _ in 0..5 {
        assert_invalid(
            auth(&a, &sign(Algorithm::RS256, Some("rsa-2"), &claims())).await,
            "rsa-2",
            "rate limited",
        );
    }
    assert_eq!(idp.hits(), 1);
}

#[tokio::test]
async fn keys_rotate_in_the_jwks_without_a_restart() {
    let idp = Idp::start(&["rsa1"]).await;
    let a = Authenticator::with_jwks_options(&oauth_config(&idp.url), fast()).unwrap();
    auth(&a, &sign(Algorithm::RS256, Some("rsa-1"), &claims()))
        .await
        .unwrap();

    // The IdP rotates: rsa-2 replaces rsa-1.
    idp.publish(&["rsa2"]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let p = auth(&a, &sign(Algorithm::RS256, Some("rsa-2"), &claims()))
        .await
        .unwrap();
    assert_eq!(p.tenant, "acme");
    assert_eq!(idp.hits(), 2);
    // The retired key is no longer trusted.
    assert_invalid(
        auth(&a, &sign(Algorithm::RS256, Some("rsa-1"), &claims())).await,
        "rsa-1",
        "retired key",
    );
}

#[tokio::test]
async fn stale_keys_are_refreshed_in_the_background() {
    let idp = Idp::start(&["rsa1", "rsa2"]).await;
    let options = JwksOptions {
        max_age: Duration::from_millis(300),
        min_refetch_interval: Duration::from_millis(200),
        ..fast()
    };
    let a = Authenticator::with_jwks_options(&oauth_config(&idp.url), options).unwrap();
    let t1 = sign(Algorithm::RS256, Some("rsa-1"), &claims());
    auth(&a, &t1).await.unwrap();
    // rsa-1 is revoked at the IdP; once the cache is stale the next request (still served
    // from the old keys) starts a refresh, after which rsa-1 is refused.
    idp.publish(&["rsa2"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    auth(&a, &t1).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while idp.hits() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(idp.hits(), 2);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_invalid(auth(&a, &t1).await, "rsa-1", "revoked key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_share_one_fetch() {
    let idp = Idp::start(&["rsa1"]).await;
    let a = Authenticator::with_jwks_options(&oauth_config(&idp.url), fast()).unwrap();
    let token = sign(Algorithm::RS256, Some("rsa-1"), &claims());
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (a, t) = (a.clone(), token.clone());
            tokio::spawn(async move { auth(&a, &t).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().tenant, "acme");
    }
    assert_eq!(idp.hits(), 1);
}

#[tokio::test]
async fn jwks_server_down_is_a_quick_503_not_a_hang() {
    // Nothing listens on this port any more: connections are refused.
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/jwks", l.local_addr().unwrap())
    };
    let a = Authenticator::with_jwks_options(&oauth_config(&refused), fast()).unwrap();
    let token = sign(Algorithm::RS256, Some("rsa-1"), &claims());
    for _ in 0..3 {
        let started = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(5), auth(&a, &token))
            .await
            .expect("must not hang")
            .unwrap_err();
        assert_eq!(err.status(), 503, "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    assert_eq!(a.refresh_jwks().await.unwrap_err().status(), 503);

    // A server that accepts the connection and never answers: the fetch timeout (1 s) bounds it.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", silent.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = silent.accept().await {
            held.push(sock);
        }
    });
    let a = Authenticator::with_jwks_options(&oauth_config(&url), fast()).unwrap();
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), auth(&a, &token))
        .await
        .expect("must not hang")
        .unwrap_err();
    assert_eq!(err.status(), 503, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let response = err.into_response();
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("retry-after").is_some());
}

#[tokio::test]
async fn cached_keys_keep_working_while_the_jwks_server_fails() {
    let idp = Idp::start(&["rsa1"]).await;
    let a = Authenticator::with_jwks_options(&oauth_config(&idp.url), fast()).unwrap();
    let token = sign(Algorithm::RS256, Some("rsa-1"), &claims());
    auth(&a, &token).await.unwrap();
    idp.failing.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // An unknown kid triggers a (failing) refetch: still a 401, not a 503, as keys are cached.
    assert_invalid(
        auth(&a, &sign(Algorithm::RS256, Some("rsa-2"), &claims())).await,
        "rsa-2",
        "unknown kid while the IdP fails",
    );
    assert_eq!(idp.hits(), 2);
    auth(&a, &token).await.unwrap();
}

fn key_config(key: Option<&str>, sha: Option<&str>, tenant: &str) -> ApiKeyConfig {
    ApiKeyConfig {
        key: key.map(str::to_string),
        key_sha256: sha.map(str::to_string),
        tenant: tenant.into(),
        models: vec!["small".into()],
        rpm: Some(10),
        tpm: Some(1000),
        max_concurrent: Some(2),
        no_train: true,
    }
}

#[tokio::test]
async fn api_keys_in_clear_and_hashed_form() {
    // sha256("sk-hashed-key") in hex, as `printf %s sk-hashed-key | sha256sum` prints it.
    let digest = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(b"sk-hashed-key");
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let cfg = AuthConfig {
        api_keys: vec![
            key_config(Some("sk-clear-key"), None, "alpha"),
            key_config(None, Some(&digest), "beta"),
        ],
        oauth2: None,
    };
    let a = Authenticator::new(&cfg).unwrap();
    assert!(!a.is_open());

    let p = auth(&a, "sk-clear-key").await.unwrap();
    assert_eq!(p.tenant, "alpha");
    assert!(p.key_id.starts_with("key:") && p.key_id.len() == 4 + 16);
    assert!(p.may_use("small") && !p.may_use("large"));
    assert_eq!(
        (p.rpm, p.tpm, p.max_concurrent, p.no_train),
        (Some(10), Some(1000), Some(2), true)
    );
    let p = auth(&a, "sk-hashed-key").await.unwrap();
    assert_eq!(p.tenant, "beta");
    assert_eq!(p.key_id, format!("key:{}", &digest[..16]));

    for wrong in ["sk-clear-kez", "sk-clear-key2", "sk", &digest] {
        let err = auth(&a, wrong).await.unwrap_err();
        assert_eq!(err.status(), 401, "{wrong}");
        assert!(
            err.www_authenticate()
                .starts_with("Bearer error=\"invalid_token\"")
        );
        assert!(
            !err.to_string().contains(wrong.trim()),
            "the key leaked: {err}"
        );
    }

    for header in [
        None,
        Some(""),
        Some("Basic c2stY2xlYXIta2V5Og=="),
        Some("Bearer  "),
    ] {
        let err = a.authenticate(header).await.unwrap_err();
        assert!(matches!(err, AuthError::Missing), "{header:?}: {err}");
        assert_eq!(err.status(), 401);
        assert_eq!(err.www_authenticate(), "Bearer");
    }
    // Scheme names are case-insensitive.
    a.authenticate(Some("bearer sk-clear-key")).await.unwrap();
}

#[tokio::test]
async fn jwt_shaped_tokens_are_api_keys_without_oauth2() {
    let cfg = AuthConfig {
        api_keys: vec![key_config(Some("aaa.bbb.ccc"), None, "dotted")],
        oauth2: None,
    };
    let a = Authenticator::new(&cfg).unwrap();
    assert_eq!(auth(&a, "aaa.bbb.ccc").await.unwrap().tenant, "dotted");
    // A real JWT is just a wrong API key here.
    let err = auth(&a, &sign(Algorithm::RS256, Some("rsa-1"), &claims()))
        .await
        .unwrap_err();
    assert_eq!(err.status(), 401);
}

#[tokio::test]
async fn api_keys_and_jwts_together() {
    let idp = Idp::start(&["rsa1"]).await;
    let mut cfg = oauth_config(&idp.url);
    cfg.api_keys = vec![key_config(Some("sk-both"), None, "keyed")];
    let a = Authenticator::with_jwks_options(&cfg, fast()).unwrap();
    assert_eq!(auth(&a, "sk-both").await.unwrap().tenant, "keyed");
    let p = auth(&a, &sign(Algorithm::RS256, Some("rsa-1"), &claims()))
        .await
        .unwrap();
    assert_eq!(p.tenant, "acme");
    // API key lookups never touch the IdP.
    auth(&a, "sk-wrong").await.unwrap_err();
    assert_eq!(idp.hits(), 1);
}

#[tokio::test]
async fn an_empty_auth_section_is_open() {
    let a = Authenticator::new(&AuthConfig::default()).unwrap();
    assert!(a.is_open());
    assert_eq!(a.authenticate(None).await.unwrap(), Principal::anonymous());
}

#[tokio::test]
async fn error_responses_carry_www_authenticate_and_the_openai_envelope() {
    async fn parts(e: AuthError) -> (u16, Option<String>, Value) {
        let r = e.into_response();
        let status = r.status().as_u16();
        let www = r
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string());
        let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        (status, www, serde_json::from_slice(&body).unwrap())
    }
    let (s, www, body) = parts(AuthError::Missing).await;
    assert_eq!((s, www.as_deref()), (401, Some("Bearer")));
    assert_eq!(body["error"]["type"], "authentication_error");
    assert!(body["error"]["param"].is_null());

    let idp = Idp::start(&["rsa1"]).await;
    let a = Authenticator::with_jwks_options(&oauth_config(&idp.url), fast()).unwrap();
    let err = auth(
        &a,
        &sign(
            Algorithm::RS256,
            Some("rsa-1"),
            &with(claims(), "exp", json!(1)),
        ),
    )
    .await
    .unwrap_err();
    let (s, www, body) = parts(err).await;
    assert_eq!(s, 401);
    assert!(www.unwrap().contains("error=\"invalid_token\""));
    assert_eq!(body["error"]["code"], "invalid_token");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired")
    );

    let err = auth(
        &a,
        &sign(Algorithm::RS256, Some("rsa-1"), &without(claims(), "scope")),
    )
    .await
    .unwrap_err();
    let (s, www, body) = parts(err).await;
    assert_eq!(s, 403);
    assert!(www.unwrap().contains("error=\"insufficient_scope\""));
    assert_eq!(body["error"]["type"], "permission_error");
    assert_eq!(body["error"]["code"], "insufficient_scope");

    let cfg = AuthConfig {
        api_keys: vec![key_config(Some("sk-right"), None, "t")],
        oauth2: None,
    };
    let err = auth(&Authenticator::new(&cfg).unwrap(), "sk-wrong")
        .await
        .unwrap_err();
    let (s, _, body) = parts(err).await;
    assert_eq!(s, 401);
    assert_eq!(body["error"]["code"], "invalid_api_key");

    let (s, www, body) = parts(AuthError::Unavailable("jwks down: secret detail".into())).await;
    assert_eq!((s, www), (503, None));
    assert!(
        !body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("secret detail")
    );
}

#[test]
fn bad_configs_are_refused_naming_the_key() {
    let mut cfg = oauth_config("ftp://idp/jwks");
    let err = Authenticator::new(&cfg).unwrap_err();
    assert!(err.to_string().contains("auth.oauth2.jwks_url"), "{err}");
    cfg = oauth_config("http://127.0.0.1:1/jwks");
    cfg.oauth2.as_mut().unwrap().audience = String::new();
    let err = Authenticator::new(&cfg).unwrap_err();
    assert!(err.to_string().contains("auth.oauth2.audience"), "{err}");
}
