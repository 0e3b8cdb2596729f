//! Rate limits against the real backends: the in-process one, and Redis (`REDIS_URL`, default
//! `redis://127.0.0.1:6379`) shared by two limiters standing in for two gateway replicas, with
//! Redis made unreachable, stopped and silent mid-test through a TCP proxy the test controls.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use futures_util::future::join_all;
use kiln_gateway::config::{FailurePolicy, LimitsBackend, LimitsConfig};
use kiln_gateway::limits::{Admission, LimitKey, Limited, LimiterTiming, RateHeaders, RateLimiter};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// An id no other test (or earlier run) uses.
fn unique(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("test:{name}:{}:{nanos}", std::process::id())
}

fn key(id: &str, rpm: Option<u64>, tpm: Option<u64>, max_concurrent: Option<u64>) -> LimitKey {
    LimitKey {
        id: id.to_string(),
        rpm,
        tpm,
        max_concurrent,
    }
}

fn memory_config() -> LimitsConfig {
    LimitsConfig::default()
}

fn redis_config(url: &str, policy: FailurePolicy) -> LimitsConfig {
    LimitsConfig {
        backend: LimitsBackend::Redis,
        redis_url: Some(url.to_string()),
        on_backend_error: policy,
    }
}

async fn redis_limiter(url: &str, policy: FailurePolicy) -> RateLimiter {
    RateLimiter::new(&redis_config(url, policy)).await.unwrap()
}

/// Runs `f`, failing the test if it takes longer than `limit`.
async fn within<T>(limit: Duration, what: &str, f: impl std::future::Future<Output = T>) -> T {
    let start = Instant::now();
    let out = tokio::time::timeout(limit * 5, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: hung"));
    let took = start.elapsed();
    assert!(took <= limit, "{what}: took {took:?}, more than {limit:?}");
    out
}

// ---------------------------------------------------------------- memory backend

#[tokio::test]
async fn memory_rpm_admits_the_limit_then_refuses_with_headers() {
    let limiter = RateLimiter::new(&memory_config()).await.unwrap();
    let k = key(&unique("mem-rpm"), Some(5), None, None);
    for i in 0..5u64 {
        let a = limiter.acquire(&k, 0).await.unwrap();
        assert_eq!(a.headers.limit_requests, Some(5));
        assert_eq!(a.headers.remaining_requests, Some(4 - i));
        assert!(a.headers.reset_requests_s.unwrap() > 0.0);
        assert_eq!(
            a.headers.limit_tokens, None,
            "no TPM limit, no token headers"
        );
    }
    match limiter.acquire(&k, 0).await {
        Err(Limited::Requests {
            retry_after_s,
            headers,
        }) => {
            assert!(retry_after_s >= 1, "retry after {retry_after_s}");
            assert_eq!(headers.limit_requests, Some(5));
            assert_eq!(headers.remaining_requests, Some(0));
        }
        other => panic!("expected Requests, got {other:?}"),
    }
    // Another key is not affected.
    let other = key(&unique("mem-rpm-other"), Some(5), None, None);
    assert!(limiter.acquire(&other, 0).await.is_ok());
}

#[tokio::test]
async fn memory_tpm_counts_prompt_then_completion_tokens() {
    let limiter = RateLimiter::new(&memory_config()).await.unwrap();
    let k = key(&unique("mem-tpm"), None, Some(100), None);
    let a = limiter.acquire(&k, 60).await.unwrap();
    assert_eq!(a.headers.limit_tokens, Some(100));
    assert_eq!(a.headers.remaining_tokens, Some(40));
    limiter.record_completion(&k, 30).await;
    match limiter.acquire(&k, 20).await {
        Err(Limited::Tokens {
            retry_after_s,
            headers,
        }) => {
            assert!(retry_after_s >= 1);
            assert_eq!(headers.remaining_tokens, Some(10));
        }
        other => panic!("60 + 30 + 20 > 100 must be refused, got {other:?}"),
    }
    let a = limiter.acquire(&k, 10).await.unwrap();
    assert_eq!(a.headers.remaining_tokens, Some(0));

    // A prompt larger than the whole limit never fits; it is told to wait a full window.
    let fresh = key(&unique("mem-tpm-huge"), None, Some(100), None);
    match limiter.acquire(&fresh, 101).await {
        Err(Limited::Tokens { retry_after_s, .. }) => assert_eq!(retry_after_s, 60),
        other => panic!("expected Tokens, got {other:?}"),
    }
}

#[tokio::test]
async fn memory_concurrency_slot_is_released_on_drop_and_refusals_count_nothing() {
    let limiter = RateLimiter::new(&memory_config()).await.unwrap();
    let k = key(&unique("mem-conc"), Some(3), None, Some(2));
    let a = limiter.acquire(&k, 0).await.unwrap();
    let b = limiter.acquire(&k, 0).await.unwrap();
    for _ in 0..3 {
        match limiter.acquire(&k, 0).await {
            Err(Limited::Concurrency { retry_after_s }) => assert!(retry_after_s >= 1),
            other => panic!("expected Concurrency, got {other:?}"),
        }
    }
    drop(a);
    // The refusals above were not counted against RPM: this is the third request.
    let c = limiter.acquire(&k, 0).await.unwrap();
    assert_eq!(c.headers.remaining_requests, Some(0));
    drop((b, c));
    assert!(matches!(
        limiter.acquire(&k, 0).await,
        Err(Limited::Requests { .. })
    ));
}

#[tokio::test]
async fn memory_window_slides_and_admits_again_after_retry_after() {
    let timing = LimiterTiming {
        window: Duration::from_secs(1),
        ..LimiterTiming::default()
    };
    let limiter = RateLimiter::with_timing(&memory_config(), timing)
        .await
        .unwrap();
    let k = key(&unique("mem-slide"), Some(2), None, None);
    limiter.acquire(&k, 0).await.unwrap();
    limiter.acquire(&k, 0).await.unwrap();
    let retry = match limiter.acquire(&k, 0).await {
        Err(Limited::Requests { retry_after_s, .. }) => retry_after_s,
        other => panic!("expected Requests, got {other:?}"),
    };
    assert!(
        (1..=2).contains(&retry),
        "retry after {retry} with a 1 s window"
    );
    tokio::time::sleep(Duration::from_secs(retry)).await;
    limiter
        .acquire(&k, 0)
        .await
        .expect("admitted after Retry-After");
}

#[tokio::test]
async fn a_key_without_limits_is_admitted_without_headers() {
    let limiter = RateLimiter::new(&memory_config()).await.unwrap();
    let k = key(&unique("unlimited"), None, None, None);
    for _ in 0..100 {
        let a = limiter.acquire(&k, 1_000_000).await.unwrap();
        assert_eq!(a.headers, RateHeaders::default());
    }
}

#[tokio::test]
async fn the_redis_backend_without_a_url_is_an_error_naming_the_key() {
    let cfg = LimitsConfig {
        backend: LimitsBackend::Redis,
        redis_url: None,
        on_backend_error: FailurePolicy::FailOpen,
    };
    let err = RateLimiter::new(&cfg).await.unwrap_err().to_string();
    assert!(err.contains("limits.redis_url"), "{err}");
    let cfg = redis_config("notredis://x", FailurePolicy::FailOpen);
    let err = RateLimiter::new(&cfg).await.unwrap_err().to_string();
    assert!(err.contains("limits.redis_url"), "{err}");
}

// ---------------------------------------------------------------- redis backend

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sharing_redis_enforce_one_rpm_limit() {
    let a = redis_limiter(&redis_url(), FailurePolicy::FailClosed).await;
    let b = redis_limiter(&redis_url(), FailurePolicy::FailClosed).await;
    let k = key(&unique("redis-rpm"), Some(10), None, None);
    let calls = (0..12).map(|i| {
        let limiter = if i % 2 == 0 { a.clone() } else { b.clone() };
        let k = k.clone();
        tokio::spawn(async move { limiter.acquire(&k, 0).await })
    });
    let results: Vec<Result<Admission, Limited>> = join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let admitted = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(admitted, 10, "{results:?}");
    for r in &results {
        if let Err(e) = r {
            assert!(
                matches!(e, Limited::Requests { retry_after_s, headers }
                    if *retry_after_s >= 1 && headers.remaining_requests == Some(0)),
                "{e:?}"
            );
        }
    }
    let mut remaining: Vec<u64> = results
        .iter()
        .filter_map(|r| r.as_ref().ok()?.headers.remaining_requests)
        .collect();
    remaining.sort_unstable();
    assert_eq!(
        remaining,
        (0..10).collect::<Vec<_>>(),
        "each admission saw its own count"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_token_counts_including_completions() {
    let a = redis_limiter(&redis_url(), FailurePolicy::FailClosed).await;
    let b = redis_limiter(&redis_url(), FailurePolicy::FailClosed).await;
    let k = key(&unique("redis-tpm"), None, Some(100), None);
    let first = a.acquire(&k, 50).await.unwrap();
    assert_eq!(first.headers.remaining_tokens, Some(50));
    b.record_completion(&k, 40).await;
    match a.acquire(&k, 20).await {
        Err(Limited::Tokens { headers, .. }) => assert_eq!(headers.remaining_tokens, Some(10)),
        other => panic!("50 + 40 + 20 > 100 must be refused, got {other:?}"),
    }
    let last = b.acquire(&k, 10).await.unwrap();
    assert_eq!(last.headers.remaining_tokens, Some(0));
}

/// Acquires until admitted (a release is spawned, so it lands shortly after the drop).
async fn acquire_soon(limiter: &RateLimiter, k: &LimitKey) -> Admission {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match limiter.acquire(k, 0).await {
            Ok(a) => return a,
            Err(e) if Instant::now() > deadline => panic!("still refused: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_concurrent_slots_and_release_them_on_drop() {
    let a = redis_limiter(&redis_url(), FailurePolicy::FailClosed).await;
    let b = redis_limiter(&redis_url(), FailurePolicy::FailClosed).await;
    let k = key(&unique("redis-conc"), None, None, Some(2));
    let held_a = a.acquire(&k, 0).await.unwrap();
    let held_b = b.acquire(&k, 0).await.unwrap();
    for limiter in [&a, &b] {
        assert!(matches!(
            limiter.acquire(&k, 0).await,
            Err(Limited::Concurrency { retry_after_s: 1 })
        ));
    }
    drop(held_a);
    let again = acquire_soon(&b, &k).await;
    assert!(matches!(
        a.acquire(&k, 0).await,
        Err(Limited::Concurrency { .. })
    ));
    drop((held_b, again));
    let _one = acquire_soon(&a, &k).await;
    let _two = acquire_soon(&a, &k).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_of_a_crashed_replica_expire_with_their_lease() {
    let id = unique("redis-crashed");
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let zset = format!("kiln:rl:{{{id}}}:conc");
    // A replica that crashed long ago, and one alive with a lease far in the future.
    let _: () = redis::cmd("ZADD")
        .arg(&zset)
        .arg(1)
        .arg("crashed:1")
        .arg(9_999_999_999_999u64)
        .arg("alive:1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let limiter = redis_limiter(&redis_url(), FailurePolicy::FailClosed).await;
    let k = key(&id, None, None, Some(2));
    let _held = limiter
        .acquire(&k, 0)
        .await
        .expect("the expired slot is not counted");
    assert!(matches!(
        limiter.acquire(&k, 0).await,
        Err(Limited::Concurrency { .. })
    ));
    let _: () = redis::cmd("DEL")
        .arg(&zset)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_slots_outlast_their_lease_through_the_heartbeat() {
    let timing = LimiterTiming {
        slot_lease: Duration::from_millis(600),
        ..LimiterTiming::default()
    };
    let cfg = redis_config(&redis_url(), FailurePolicy::FailClosed);
    let a = RateLimiter::with_timing(&cfg, timing).await.unwrap();
    let b = RateLimiter::with_timing(&cfg, timing).await.unwrap();
    let k = key(&unique("redis-heartbeat"), None, None, Some(1));
    let held = a.acquire(&k, 0).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        matches!(b.acquire(&k, 0).await, Err(Limited::Concurrency { .. })),
        "a slot held for 2.5 leases is still counted"
    );
    drop(held);
    let _ = acquire_soon(&b, &k).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_with_fail_open_admits_quickly() {
    let limiter = within(Duration::from_secs(1), "new", async {
        redis_limiter("redis://127.0.0.1:1", FailurePolicy::FailOpen).await
    })
    .await;
    let k = key(&unique("down-open"), Some(1), Some(10), Some(1));
    let mut held = Vec::new();
    for i in 0..5 {
        let a = within(Duration::from_secs(1), "acquire", limiter.acquire(&k, 100))
            .await
            .unwrap_or_else(|e| panic!("request {i} refused under fail_open: {e:?}"));
        assert_eq!(a.headers, RateHeaders::default());
        held.push(a);
    }
    within(
        Duration::from_secs(1),
        "record_completion",
        limiter.record_completion(&k, 10),
    )
    .await;
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_with_fail_closed_refuses_quickly_with_503() {
    let limiter = within(Duration::from_secs(1), "new", async {
        redis_limiter("redis://127.0.0.1:1", FailurePolicy::FailClosed).await
    })
    .await;
    let k = key(&unique("down-closed"), Some(100), None, None);
    for _ in 0..5 {
        let r = within(Duration::from_secs(1), "acquire", limiter.acquire(&k, 0)).await;
        match r {
            Err(e @ Limited::BackendUnavailable) => {
                assert_eq!(e.into_response().status(), StatusCode::SERVICE_UNAVAILABLE)
            }
            other => panic!("expected BackendUnavailable, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------- Redis stopped mid-test

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forwards to Redis.
    Up,
    /// Closes every connection (Redis stopped).
    Down,
    /// Keeps connections open but never answers (Redis hung, or a network black hole).
    Silent,
}

/// A TCP proxy in front of Redis whose mode the test switches.
struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start() -> Self {
        let info = redis::Client::open(redis_url()).unwrap();
        let target = info.get_connection_info().addr.to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, rx) = watch::channel(Mode::Up);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serve(client, target.clone(), rx.clone()));
            }
        });
        Self { addr, mode, task }
    }

    /// `REDIS_URL` with the proxy's address in place of Redis's.
    fn url(&self) -> String {
        let info = redis::Client::open(redis_url()).unwrap();
        let target = info.get_connection_info().addr.to_string();
        redis_url().replacen(&target, &self.addr.to_string(), 1)
    }

    fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.set(Mode::Down);
    }
}

async fn serve(mut client: TcpStream, target: String, mut mode: watch::Receiver<Mode>) {
    if *mode.borrow_and_update() == Mode::Up {
        let Ok(mut upstream) = TcpStream::connect(&target).await else {
            return;
        };
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => return,
            _ = mode.wait_for(|m| *m != Mode::Up) => {}
        }
    }
    if *mode.borrow() == Mode::Silent {
        // Swallow whatever the client sends until the mode changes.
        let mut buf = [0u8; 4096];
        tokio::select! {
            _ = async { while matches!(client.read(&mut buf).await, Ok(n) if n > 0) {} } => {}
            _ = mode.wait_for(|m| *m != Mode::Silent) => {}
        }
    }
    // Down (or leaving Silent): the connection is closed.
}

/// Acquires until the backend answers again (the limiter retries its connection at most every
/// half second), returning that answer.
async fn until_backend_answers(limiter: &RateLimiter, k: &LimitKey) -> Result<Admission, Limited> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match limiter.acquire(k, 0).await {
            Err(Limited::BackendUnavailable) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => return other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_test_keeps_answering_by_policy_and_recovers() {
    let proxy = Proxy::start().await;
    let closed = redis_limiter(&proxy.url(), FailurePolicy::FailClosed).await;
    let open = redis_limiter(&proxy.url(), FailurePolicy::FailOpen).await;
    let k = key(&unique("proxy-down"), Some(5), None, None);
    for i in 0..3u64 {
        let a = closed.acquire(&k, 0).await.unwrap();
        assert_eq!(a.headers.remaining_requests, Some(4 - i));
    }

    proxy.set(Mode::Down);
    for _ in 0..10 {
        let r = within(Duration::from_secs(1), "fail_closed", closed.acquire(&k, 0)).await;
        assert!(matches!(r, Err(Limited::BackendUnavailable)), "{r:?}");
        let r = within(Duration::from_secs(1), "fail_open", open.acquire(&k, 0)).await;
        assert_eq!(r.unwrap().headers, RateHeaders::default());
        within(
            Duration::from_secs(1),
            "completion",
            closed.record_completion(&k, 5),
        )
        .await;
    }

    proxy.set(Mode::Up);
    // Redis kept its counts: two more requests fit, whichever replica asks.
    let fourth = until_backend_answers(&closed, &k).await.unwrap();
    assert_eq!(fourth.headers.remaining_requests, Some(1));
    let fifth = until_backend_answers(&open, &k).await.unwrap();
    assert_eq!(fifth.headers.remaining_requests, Some(0));
    assert!(matches!(
        closed.acquire(&k, 0).await,
        Err(Limited::Requests { .. })
    ));
    assert!(matches!(
        open.acquire(&k, 0).await,
        Err(Limited::Requests { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_that_stops_answering_does_not_hang_requests() {
    let proxy = Proxy::start().await;
    let closed = redis_limiter(&proxy.url(), FailurePolicy::FailClosed).await;
    let k = key(&unique("proxy-silent"), Some(100), Some(1000), Some(10));
    let held = closed.acquire(&k, 1).await.unwrap();

    // Silent on the open connection, and on every new one.
    proxy.set(Mode::Silent);
    for _ in 0..5 {
        let r = within(
            Duration::from_secs(1),
            "silent redis",
            closed.acquire(&k, 1),
        )
        .await;
        assert!(matches!(r, Err(Limited::BackendUnavailable)), "{r:?}");
    }
    within(
        Duration::from_secs(1),
        "completion on silent redis",
        closed.record_completion(&k, 1),
    )
    .await;
    // The release of a slot while Redis is silent must not block the dropping task either.
    within(Duration::from_millis(50), "drop", async { drop(held) }).await;

    proxy.set(Mode::Up);
    let a = until_backend_answers(&closed, &k).await.unwrap();
    assert_eq!(a.headers.limit_requests, Some(100));
}

// ---------------------------------------------------------------- rendering

#[tokio::test]
async fn refusals_render_as_429_with_openai_headers_and_envelope() {
    let headers = RateHeaders {
        limit_requests: Some(10),
        remaining_requests: Some(0),
        reset_requests_s: Some(6.5),
        limit_tokens: Some(1000),
        remaining_tokens: Some(250),
        reset_tokens_s: Some(0.02),
    };
    let response = Limited::Requests {
        retry_after_s: 7,
        headers,
    }
    .into_response();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let h = response.headers();
    let get = |name: &str| h.get(name).map(|v| v.to_str().unwrap().to_string());
    assert_eq!(get("retry-after").as_deref(), Some("7"));
    assert_eq!(get("x-ratelimit-limit-requests").as_deref(), Some("10"));
    assert_eq!(get("x-ratelimit-remaining-requests").as_deref(), Some("0"));
    assert_eq!(get("x-ratelimit-reset-requests").as_deref(), Some("6.5s"));
    assert_eq!(get("x-ratelimit-limit-tokens").as_deref(), Some("1000"));
    assert_eq!(get("x-ratelimit-remaining-tokens").as_deref(), Some("250"));
    assert_eq!(get("x-ratelimit-reset-tokens").as_deref(), Some("20ms"));
    let body = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_exceeded");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("requests") && message.contains("10"),
        "{message}"
    );

    // Only the headers of the limits a key has.
    let mut map = axum::http::HeaderMap::new();
    RateHeaders {
        limit_tokens: Some(5),
        remaining_tokens: Some(5),
        reset_tokens_s: Some(360.0),
        ..RateHeaders::default()
    }
    .apply(&mut map);
    assert_eq!(map.len(), 3);
    assert_eq!(map["x-ratelimit-reset-tokens"], "6m0s");
    assert!(map.get("x-ratelimit-limit-requests").is_none());

    let response = Limited::Concurrency { retry_after_s: 1 }.into_response();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "1");

    let response = Limited::BackendUnavailable.into_response();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().get("retry-after").is_none());
    let body = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_backend_unavailable");
}
