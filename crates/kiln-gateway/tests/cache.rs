//! The response cache: which requests share a key, the three backends against real servers
//! (Redis at `REDIS_URL`, memcached at `MEMCACHED_URL`), failure as a fast miss, and the
//! SSE replay / assembly of cached replies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_gateway::cache::{
    CachedResponse, ResponseCache, as_sse_events, assemble_stream, cache_key,
};
use kiln_gateway::config::{CacheBackend, CacheConfig};
use serde_json::{Value, json};

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn memcached_url() -> String {
    std::env::var("MEMCACHED_URL").unwrap_or_else(|_| "memcache://127.0.0.1:11211".into())
}

fn config(
    backend: CacheBackend,
    url: Option<String>,
    ttl_s: u64,
    max_entries: usize,
) -> CacheConfig {
    CacheConfig {
        backend,
        url,
        ttl_s,
        max_entries,
        cache_sampled: false,
    }
}

/// A key no other test (or earlier run) uses.
fn fresh_key(label: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let tenant = format!("{label}-{}-{nanos}", std::process::id());
    cache_key(&tenant, &json!({"model": "m", "temperature": 0}), false).unwrap()
}

fn chat_request() -> Value {
    json!({
        "model": "llama-3-8b",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"}
        ],
        "temperature": 0,
        "max_tokens": 16,
        "stop": ["\n"],
    })
}

fn with(body: &Value, field: &str, value: Value) -> Value {
    let mut body = body.clone();
    body[field] = value;
    body
}

fn chat_reply() -> Value {
    json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "llama-3-8b",
        "system_fingerprint": "fp_1",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "Paris is the capital of France."},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}
    })
}

fn completion_reply() -> Value {
    json!({
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1_700_000_001,
        "model": "llama-3-8b",
        "choices": [
            {"index": 0, "text": " Paris.", "logprobs": null, "finish_reason": "length"},
            {"index": 1, "text": " Lyon?", "logprobs": null, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    })
}

/// The JSON payloads of `events`, checking the SSE framing and the closing `[DONE]`.
fn parse_events(events: &[String]) -> Vec<Value> {
    let (done, data) = events.split_last().expect("at least [DONE]");
    assert_eq!(done, "data: [DONE]\n\n");
    data.iter()
        .map(|e| {
            let payload = e
                .strip_prefix("data: ")
                .and_then(|e| e.strip_suffix("\n\n"))
                .unwrap_or_else(|| panic!("not one SSE data event: {e:?}"));
            assert!(!payload.contains('\n'), "one line per event: {payload}");
            serde_json::from_str(payload).unwrap()
        })
        .collect()
}

// ---- keys ----

#[test]
fn key_ignores_field_order_number_spelling_and_transport_fields() {
    let a = chat_request();
    let reordered: Value = serde_json::from_str(
        r#"{"stop": ["\n"], "max_tokens": 16, "temperature": 0.0,
            "messages": [{"content": "Be brief.", "role": "system"},
                         {"content": "Capital of France?", "role": "user"}],
            "model": "llama-3-8b"}"#,
    )
    .unwrap();
    let key = cache_key("acme", &a, false).unwrap();
    assert_eq!(key.len(), 64);
    assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(
        cache_key("acme", &reordered, false).as_deref(),
        Some(key.as_str())
    );
    let streamed = with(
        &with(&a, "stream", json!(true)),
        "stream_options",
        json!({"include_usage": true}),
    );
    assert_eq!(
        cache_key("acme", &streamed, false).as_deref(),
        Some(key.as_str())
    );
    assert_eq!(
        cache_key("acme", &with(&a, "user", json!("u-42")), false).as_deref(),
        Some(key.as_str())
    );
}

#[test]
fn key_changes_with_tenant_model_prompt_and_every_sampling_parameter() {
    let base = chat_request();
    let key = cache_key("acme", &base, false).unwrap();
    assert_ne!(cache_key("globex", &base, false).unwrap(), key, "tenant");
    let variants = [
        ("model", json!("llama-3-70b")),
        (
            "messages",
            json!([{"role": "user", "content": "Capital of Spain?"}]),
        ),
        ("temperature", json!(0.7)),
        ("seed", json!(7)),
        ("stop", json!(["."])),
        ("max_tokens", json!(17)),
        ("max_completion_tokens", json!(16)),
        ("top_p", json!(0.9)),
        ("top_k", json!(40)),
        ("min_p", json!(0.05)),
        ("n", json!(2)),
        ("presence_penalty", json!(0.5)),
        ("frequency_penalty", json!(0.5)),
        ("repetition_penalty", json!(1.1)),
        ("logprobs", json!(true)),
        ("top_logprobs", json!(3)),
        ("ignore_eos", json!(true)),
        ("response_format", json!({"type": "json_object"})),
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f"}}]),
        ),
    ];
    // Against a seeded base, so that the temperature-0.7 variant stays cacheable.
    let seeded = with(&base, "seed", json!(1));
    let seeded_key = cache_key("acme", &seeded, false).unwrap();
    assert_ne!(seeded_key, key, "seed");
    let mut seen = std::collections::HashSet::from([key, seeded_key]);
    for (field, value) in variants {
        let body = with(&seeded, field, value);
        let k = cache_key("acme", &body, false).unwrap_or_else(|| panic!("{field}: cacheable"));
        assert!(seen.insert(k), "changing `{field}` must change the key");
    }
    let completion = json!({"model": "m", "prompt": "Once", "temperature": 0});
    assert_ne!(
        cache_key("acme", &completion, false),
        cache_key("acme", &with(&completion, "prompt", json!("Twice")), false)
    );
}

#[test]
fn only_deterministic_requests_have_a_key_unless_sampling_is_cached() {
    let base = chat_request();
    let no_temperature = {
        let mut b = base.clone();
        b.as_object_mut().unwrap().remove("temperature");
        b
    };
    let sampled = with(&base, "temperature", json!(0.7));
    assert_eq!(
        cache_key("acme", &no_temperature, false),
        None,
        "absent temperature is 1"
    );
    assert_eq!(
        cache_key("acme", &with(&base, "temperature", Value::Null), false),
        None
    );
    assert_eq!(cache_key("acme", &sampled, false), None);
    assert!(cache_key("acme", &with(&sampled, "seed", json!(1234)), false).is_some());
    assert!(cache_key("acme", &with(&no_temperature, "seed", json!(0)), false).is_some());
    assert_eq!(
        cache_key("acme", &with(&sampled, "seed", Value::Null), false),
        None,
        "a null seed is no seed"
    );
    assert!(
        cache_key("acme", &sampled, true).is_some(),
        "cache_sampled widens"
    );
    assert!(cache_key("acme", &no_temperature, true).is_some());
    assert_eq!(
        cache_key("acme", &json!([1, 2]), true),
        None,
        "not an object"
    );
}

// ---- backends ----

async fn round_trip_and_expiry(cache: &ResponseCache, label: &str, wait: Duration) {
    let key = fresh_key(label);
    let value = CachedResponse { body: chat_reply() };
    assert_eq!(cache.get(&key).await, None, "{label}: nothing stored yet");
    cache.put(&key, &value).await;
    assert_eq!(
        cache.get(&key).await,
        Some(value.clone()),
        "{label}: round trip"
    );
    assert!(!cache.is_degraded(), "{label}");
    let other = fresh_key(&format!("{label}-other"));
    assert_eq!(cache.get(&other).await, None, "{label}: another key misses");
    tokio::time::sleep(wait).await;
    assert_eq!(
        cache.get(&key).await,
        None,
        "{label}: expired after ttl_s = 1"
    );
}

#[tokio::test]
async fn memory_backend_round_trips_expires_and_evicts_the_least_recently_used() {
    let cache = ResponseCache::new(&config(CacheBackend::Memory, None, 1, 100))
        .await
        .unwrap();
    round_trip_and_expiry(&cache, "memory", Duration::from_millis(1100)).await;

    let small = ResponseCache::new(&config(CacheBackend::Memory, None, 60, 3))
        .await
        .unwrap();
    let keys: Vec<String> = (0..5).map(|i| fresh_key(&format!("evict{i}"))).collect();
    let reply = |i: usize| CachedResponse {
        body: json!({"n": i}),
    };
    for (i, key) in keys.iter().enumerate().take(3) {
        small.put(key, &reply(i)).await;
    }
    assert!(small.get(&keys[0]).await.is_some(), "touch keys[0]");
    small.put(&keys[3], &reply(3)).await;
    small.put(&keys[4], &reply(4)).await;
    assert_eq!(
        small.get(&keys[1]).await,
        None,
        "least recently used goes first"
    );
    assert_eq!(small.get(&keys[2]).await, None);
    assert_eq!(small.get(&keys[0]).await, Some(reply(0)));
    assert_eq!(small.get(&keys[3]).await, Some(reply(3)));
    assert_eq!(small.get(&keys[4]).await, Some(reply(4)));
}

#[tokio::test]
async fn redis_backend_round_trips_and_expires_in_a_real_redis() {
    let cache = ResponseCache::new(&config(CacheBackend::Redis, Some(redis_url()), 1, 0))
        .await
        .unwrap();
    round_trip_and_expiry(&cache, "redis", Duration::from_millis(2100)).await;

    // Stored where other replicas (and operators) can find it.
    let key = fresh_key("redis-ns");
    cache
        .put(&key, &CachedResponse { body: chat_reply() })
        .await;
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("kiln:cache:{key}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(ttl, 1);
    // A second gateway replica sees the entry.
    let replica = ResponseCache::new(&config(CacheBackend::Redis, Some(redis_url()), 1, 0))
        .await
        .unwrap();
    assert!(replica.get(&key).await.is_some());
}

#[tokio::test]
async fn memcached_backend_round_trips_and_expires_in_a_real_memcached() {
    let cache = ResponseCache::new(&config(
        CacheBackend::Memcached,
        Some(memcached_url()),
        1,
        0,
    ))
    .await
    .unwrap();
    assert!(
        !cache.is_degraded(),
        "memcached must run at {} (see .ci/run)",
        memcached_url()
    );
    // memcached expires on whole-second boundaries: 1 s can take up to 2 s.
    round_trip_and_expiry(&cache, "memcached", Duration::from_millis(2200)).await;

    // Many concurrent lookups share the connection pool without mixing up replies.
    let long = ResponseCache::new(&config(
        CacheBackend::Memcached,
        Some(memcached_url()),
        60,
        0,
    ))
    .await
    .unwrap();
    let keys: Vec<String> = (0..40).map(|i| fresh_key(&format!("mc-par{i}"))).collect();
    let big = "x".repeat(100_000);
    for (i, key) in keys.iter().enumerate() {
        long.put(
            key,
            &CachedResponse {
                body: json!({"i": i, "pad": big}),
            },
        )
        .await;
    }
    let lookups = keys.iter().enumerate().map(|(i, key)| {
        let long = long.clone();
        let key = key.clone();
        tokio::spawn(async move { (i, long.get(&key).await) })
    });
    for task in lookups {
        let (i, got) = task.await.unwrap();
        assert_eq!(got.unwrap().body["i"], json!(i));
    }
}

#[tokio::test]
async fn an_entry_memcached_refuses_is_a_miss_not_an_outage() {
    let cache = ResponseCache::new(&config(
        CacheBackend::Memcached,
        Some(memcached_url()),
        60,
        0,
    ))
    .await
    .unwrap();
    // Over memcached's default 1 MiB item limit.
    let huge = CachedResponse {
        body: json!({"pad": "x".repeat(2 << 20)}),
    };
    let key = fresh_key("mc-huge");
    cache.put(&key, &huge).await;
    assert_eq!(cache.get(&key).await, None);
    assert!(!cache.is_degraded(), "one refused entry is not an outage");
    // The same connection pool keeps working at once (no back-off).
    let small = fresh_key("mc-small");
    cache.put(&small, &CachedResponse { body: json!(2) }).await;
    assert_eq!(
        cache.get(&small).await,
        Some(CachedResponse { body: json!(2) })
    );
}

#[tokio::test]
async fn memcache_and_memcached_urls_are_both_accepted() {
    let alt = memcached_url().replacen("memcache://", "memcached://", 1);
    let cache = ResponseCache::new(&config(CacheBackend::Memcached, Some(alt), 60, 0))
        .await
        .unwrap();
    let key = fresh_key("mc-alt");
    cache.put(&key, &CachedResponse { body: json!(1) }).await;
    assert_eq!(
        cache.get(&key).await,
        Some(CachedResponse { body: json!(1) })
    );
    assert!(
        ResponseCache::new(&config(
            CacheBackend::Memcached,
            Some("http://x".into()),
            60,
            0
        ))
        .await
        .is_err()
    );
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A server that accepts connections and never answers.
fn silent_server() -> (std::thread::JoinHandle<()>, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().take(16) {
            held.push(stream);
        }
    });
    (handle, port)
}

async fn misses_fast(cfg: CacheConfig, label: &str) {
    let cache = ResponseCache::new(&cfg).await.unwrap();
    let key = fresh_key(label);
    for _ in 0..3 {
        let started = Instant::now();
        cache.put(&key, &CachedResponse { body: json!(1) }).await;
        assert_eq!(cache.get(&key).await, None, "{label}");
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "{label}: put + get took {took:?}"
        );
    }
    assert!(cache.is_degraded(), "{label}: the failure is noticed");
}

#[tokio::test]
async fn unreachable_or_silent_backends_are_fast_misses() {
    let refused = closed_port();
    misses_fast(
        config(
            CacheBackend::Redis,
            Some(format!("redis://127.0.0.1:{refused}")),
            60,
            0,
        ),
        "redis refused",
    )
    .await;
    misses_fast(
        config(
            CacheBackend::Memcached,
            Some(format!("memcache://127.0.0.1:{refused}")),
            60,
            0,
        ),
        "memcached refused",
    )
    .await;
    let (_server, silent) = silent_server();
    misses_fast(
        config(
            CacheBackend::Redis,
            Some(format!("redis://127.0.0.1:{silent}")),
            60,
            0,
        ),
        "redis silent",
    )
    .await;
    misses_fast(
        config(
            CacheBackend::Memcached,
            Some(format!("memcache://127.0.0.1:{silent}")),
            60,
            0,
        ),
        "memcached silent",
    )
    .await;
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_memcached(port: u16) -> KillOnDrop {
    let user = Command::new("id").arg("-un").output().unwrap();
    let user = String::from_utf8(user.stdout).unwrap();
    let child = Command::new("memcached")
        .args([
            "-l",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "0",
            "-u",
            user.trim(),
        ])
        .spawn()
        .expect("memcached is installed (see .ci/run)");
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "memcached did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    KillOnDrop(child)
}

#[tokio::test]
async fn a_memcached_that_dies_mid_run_turns_into_misses_and_back() {
    let port = closed_port();
    let server = start_memcached(port);
    let cache = ResponseCache::new(&config(
        CacheBackend::Memcached,
        Some(format!("memcache://127.0.0.1:{port}")),
        60,
        0,
    ))
    .await
    .unwrap();
    let key = fresh_key("mc-dies");
    let value = CachedResponse { body: chat_reply() };
    cache.put(&key, &value).await;
    assert_eq!(cache.get(&key).await, Some(value.clone()));

    drop(server);
    let started = Instant::now();
    assert_eq!(cache.get(&key).await, None);
    assert_eq!(cache.get(&key).await, None);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(cache.is_degraded());

    // Back (empty, as a restarted memcached is): after the reconnect back-off, it works again.
    let _server = start_memcached(port);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(cache.get(&key).await, None);
    cache.put(&key, &value).await;
    assert_eq!(cache.get(&key).await, Some(value));
    assert!(!cache.is_degraded());
}

/// `host:port` of `REDIS_URL` (`redis://[user:pass@]host:port[/db]`).
fn redis_host_port() -> String {
    let url = redis_url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('/').next().unwrap().to_string()
}

/// A TCP proxy to `target` on `port` (0: any), standing in for the Redis server so that a
/// test can take "Redis" away and bring it back without touching the shared one.
async fn start_proxy(port: u16, target: String) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        // Dropped with the task (on abort): every proxied connection closes with it.
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            connections.spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (port, task)
}

#[tokio::test]
async fn a_redis_that_goes_away_mid_run_turns_into_misses_and_back() {
    let (port, proxy) = start_proxy(0, redis_host_port()).await;
    let url = redis_url().replacen(&redis_host_port(), &format!("127.0.0.1:{port}"), 1);
    let cache = ResponseCache::new(&config(CacheBackend::Redis, Some(url), 60, 0))
        .await
        .unwrap();
    let key = fresh_key("redis-dies");
    let value = CachedResponse { body: chat_reply() };
    cache.put(&key, &value).await;
    assert_eq!(cache.get(&key).await, Some(value.clone()));

    proxy.abort();
    let _ = proxy.await;
    let started = Instant::now();
    for _ in 0..5 {
        assert_eq!(cache.get(&key).await, None);
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert!(cache.is_degraded());

    // Back: after the reconnect back-off, the entry (still in Redis) is found again.
    let (_, proxy) = start_proxy(port, redis_host_port()).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(cache.get(&key).await, Some(value));
    assert!(!cache.is_degraded());
    proxy.abort();
}

#[tokio::test]
async fn backend_none_never_hits() {
    let cache = ResponseCache::new(&config(CacheBackend::None, None, 60, 100))
        .await
        .unwrap();
    assert!(!cache.is_enabled());
    let key = fresh_key("none");
    cache.put(&key, &CachedResponse { body: json!(1) }).await;
    assert_eq!(cache.get(&key).await, None);
    assert!(
        ResponseCache::new(&config(CacheBackend::Redis, None, 60, 0))
            .await
            .is_err(),
        "redis without cache.url"
    );
}

// ---- streaming ----

#[test]
fn a_cached_chat_reply_replays_as_a_chat_stream() {
    let reply = chat_reply();
    for include_usage in [false, true] {
        let chunks = parse_events(&as_sse_events(&reply, include_usage));
        let mut text = String::new();
        let mut finish = Vec::new();
        for c in &chunks {
            assert_eq!(c["object"], "chat.completion.chunk");
            assert_eq!(c["id"], "chatcmpl-1");
            assert_eq!(c["model"], "llama-3-8b");
            for choice in c["choices"].as_array().unwrap() {
                if let Some(t) = choice["delta"]["content"].as_str() {
                    text.push_str(t);
                }
                if !choice["finish_reason"].is_null() {
                    finish.push(choice["finish_reason"].clone());
                }
            }
        }
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(text, "Paris is the capital of France.");
        assert_eq!(finish, vec![json!("stop")]);
        let last = chunks.last().unwrap();
        if include_usage {
            assert_eq!(last["choices"], json!([]));
            assert_eq!(last["usage"], reply["usage"]);
            assert!(
                chunks[..chunks.len() - 1]
                    .iter()
                    .all(|c| c["usage"].is_null())
            );
        } else {
            assert!(chunks.iter().all(|c| c.get("usage").is_none()));
            assert_eq!(last["choices"][0]["finish_reason"], "stop");
        }
    }
}

#[test]
fn a_cached_completion_replays_as_a_completion_stream() {
    let reply = completion_reply();
    let chunks = parse_events(&as_sse_events(&reply, true));
    let mut texts = [String::new(), String::new()];
    let mut finish = [Value::Null, Value::Null];
    for c in &chunks {
        assert_eq!(c["object"], "text_completion");
        for choice in c["choices"].as_array().unwrap() {
            let i = choice["index"].as_u64().unwrap() as usize;
            texts[i].push_str(choice["text"].as_str().unwrap());
            if !choice["finish_reason"].is_null() {
                finish[i] = choice["finish_reason"].clone();
            }
        }
    }
    assert_eq!(texts, [" Paris.", " Lyon?"]);
    assert_eq!(finish, [json!("length"), json!("stop")]);
    assert_eq!(chunks.last().unwrap()["usage"]["total_tokens"], 7);
}

fn payloads(body: &Value, include_usage: bool) -> Vec<Value> {
    parse_events(&as_sse_events(body, include_usage))
}

#[test]
fn assembling_a_replayed_stream_gives_back_the_cached_reply() {
    let chat = chat_reply();
    assert_eq!(assemble_stream(&payloads(&chat, true)), Some(chat.clone()));
    let mut no_usage = chat.clone();
    no_usage.as_object_mut().unwrap().remove("usage");
    assert_eq!(assemble_stream(&payloads(&chat, false)), Some(no_usage));

    let completion = completion_reply();
    assert_eq!(
        assemble_stream(&payloads(&completion, true)),
        Some(completion)
    );

    // Tool calls, an empty content, logprobs and two choices.
    let rich = json!({
        "id": "chatcmpl-2", "object": "chat.completion", "created": 5, "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]},
             "logprobs": null, "finish_reason": "tool_calls"},
            {"index": 1, "message": {"role": "assistant", "content": "Hi", "refusal": "no"},
             "logprobs": {"content": [{"token": "Hi", "logprob": -0.1, "top_logprobs": []}]},
             "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    });
    assert_eq!(assemble_stream(&payloads(&rich, true)), Some(rich));
}

#[test]
fn a_stream_split_like_an_upstream_splits_it_assembles() {
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
    };
    let chunks = vec![
        chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        chunk(json!({"content": "Hel"}), Value::Null),
        chunk(json!({"content": "lo"}), Value::Null),
        chunk(
            json!({"tool_calls": [{"index": 0, "id": "t", "type": "function",
                                   "function": {"name": "f", "arguments": "{\"a\""}}]}),
            Value::Null,
        ),
        chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}),
            Value::Null,
        ),
        chunk(json!({}), json!("stop")),
    ];
    let body = assemble_stream(&chunks).unwrap();
    assert_eq!(body["object"], "chat.completion");
    let message = &body["choices"][0]["message"];
    assert_eq!(message["content"], "Hello");
    assert_eq!(
        message["tool_calls"][0]["function"]["arguments"],
        "{\"a\":1}"
    );
    assert_eq!(message["tool_calls"][0]["id"], "t");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(body.get("usage").is_none());
}

#[test]
fn incomplete_or_failed_streams_are_not_assembled() {
    let full = payloads(&chat_reply(), true);
    assert_eq!(assemble_stream(&[]), None);
    // Cut before the finish chunk.
    assert_eq!(assemble_stream(&full[..2]), None);
    let mut failed = full.clone();
    failed.push(json!({"error": {"message": "upstream died", "type": "server_error"}}));
    assert_eq!(assemble_stream(&failed), None);
    assert_eq!(assemble_stream(&[json!("not a chunk")]), None);
}
