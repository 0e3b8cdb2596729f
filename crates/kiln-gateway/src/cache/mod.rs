//! The response cache: exact-match replies for deterministic requests.
//!
//! A request is cacheable when its output is a function of its input: temperature 0 or a fixed
//! `seed` (or anything, when `cache.cache_sampled` widens it). The key ([`cache_key`]) is a
//! SHA-256 of the tenant and the canonicalized request body without the fields that only change
//! the transport (`stream`, `stream_options`, `user`, …), so a streaming and a non-streaming
//! request share an entry: the cache always stores the full non-streaming reply, and
//! [`as_sse_events`] replays it as a stream; [`assemble_stream`] turns a streamed miss back into
//! that full reply so it can be stored.
//!
//! The cache is an optimisation, never a dependency: a backend that is down, slow or returns
//! garbage is a miss (each operation is bounded by [`OP_TIMEOUT`]), logged once per incident, and
//! the request goes upstream as if there were no cache.
//!
//! Backends: in-process (bounded LRU with TTL, the default), Redis (`SET … EX`, keys
//! `kiln:cache:<key>`) and Memcached (the text protocol, same key names).

mod key;
mod memcached;
mod memory;
mod redis;
mod sse;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::config::{CacheBackend, CacheConfig};

pub use key::cache_key;
pub use sse::{as_sse_events, assemble_stream};

/// The longest a cache lookup or store may take before it counts as a miss.
pub const OP_TIMEOUT: Duration = Duration::from_millis(250);
/// The longest a connection attempt to a remote backend may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
/// After a failed connection attempt, lookups miss at once for this long before the next try.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);
/// Prefix of every key in the shared (Redis, Memcached) backends.
const NAMESPACE: &str = "kiln:cache:";

/// One cached reply.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CachedResponse {
    /// The full non-streaming OpenAI response JSON (`chat.completion` or `text_completion`).
    pub body: serde_json::Value,
}

/// Why a backend operation failed; never reaches a client (a failure is a miss).
#[derive(Debug, thiserror::Error)]
pub(crate) enum CacheError {
    #[error("{backend} at {addr}: {message}")]
    Backend {
        backend: &'static str,
        addr: String,
        message: String,
    },
    #[error("{backend} at {addr}: no answer within {OP_TIMEOUT:?}")]
    Timeout { backend: &'static str, addr: String },
    #[error(
        "{backend} at {addr}: skipped while connecting, or within {RECONNECT_AFTER:?} of a failure"
    )]
    Backoff { backend: &'static str, addr: String },
    #[error("entry {key}: not a cached response: {message}")]
    Corrupt { key: String, message: String },
    /// The backend is fine but would not take this entry (memcached's item size limit).
    #[error("entry {key}: not stored: {message}")]
    Rejected { key: String, message: String },
}

/// The response cache, cheap to clone (the clones share the backend).
#[derive(Clone)]
pub struct ResponseCache {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    ttl: Duration,
    /// Set while the backend is failing, so an outage is logged once, and its end once.
    degraded: AtomicBool,
    /// Set once a single entry failed (too large to store, unreadable), so that is logged once.
    entry_error_logged: AtomicBool,
}

enum Backend {
    None,
    Memory(memory::MemoryCache),
    Redis(redis::RedisCache),
    Memcached(memcached::MemcachedCache),
}

impl ResponseCache {
    /// Builds the cache `cfg` describes. Fails only on a malformed `cache.url`; a remote backend
    /// that cannot be reached now is logged and retried later, the gateway serves meanwhile.
    pub async fn new(cfg: &CacheConfig) -> Result<Self, anyhow::Error> {
        let url = || {
            cfg.url
                .as_deref()
                .context("cache.url: the redis and memcached backends need a URL")
        };
        let backend = match cfg.backend {
            CacheBackend::None => Backend::None,
            CacheBackend::Memory => Backend::Memory(memory::MemoryCache::new(cfg.max_entries)),
            CacheBackend::Redis => Backend::Redis(redis::RedisCache::new(url()?)?),
            CacheBackend::Memcached => Backend::Memcached(memcached::MemcachedCache::new(url()?)?),
        };
        let cache = Self {
            inner: Arc::new(Inner {
                backend,
                ttl: Duration::from_secs(cfg.ttl_s),
                degraded: AtomicBool::new(false),
                entry_error_logged: AtomicBool::new(false),
            }),
        };
        // Connect now so an unreachable backend is reported at start-up, not at first use.
        let probe = match &cache.inner.backend {
            Backend::Redis(r) => Some(r.connect().await.map(|_| ())),
            Backend::Memcached(m) => Some(m.warm_up().await),
            Backend::None | Backend::Memory(_) => None,
        };
        if let Some(result) = probe {
            cache.record(result);
        }
        Ok(cache)
    }

    /// A cache that stores nothing and never hits.
    pub fn disabled() -> Self {
        Self {
            inner: Arc::new(Inner {
                backend: Backend::None,
                ttl: Duration::ZERO,
                degraded: AtomicBool::new(false),
                entry_error_logged: AtomicBool::new(false),
            }),
        }
    }

    /// The cached reply for `key`, or `None` on a miss — including when the backend fails.
    pub async fn get(&self, key: &str) -> Option<CachedResponse> {
        let result = match &self.inner.backend {
            Backend::None => return None,
            Backend::Memory(m) => return m.get(key, Instant::now()),
            Backend::Redis(r) => self.bounded(r.get(key), r.addr(), r.backoff()).await,
            Backend::Memcached(m) => self.bounded(m.get(key), m.addr(), m.backoff()).await,
        };
        let text = self.record(result)??;
        match serde_json::from_slice::<CachedResponse>(&text) {
            Ok(value) => Some(value),
            Err(e) => {
                self.record::<()>(Err(CacheError::Corrupt {
                    key: key.to_string(),
                    message: e.to_string(),
                }));
                None
            }
        }
    }

    /// Stores `value` under `key` for `cache.ttl_s` seconds (a `ttl_s` of 0 stores nothing).
    /// A backend failure is logged (once per incident) and otherwise ignored.
    pub async fn put(&self, key: &str, value: &CachedResponse) {
        if self.inner.ttl.is_zero() {
            return;
        }
        let ttl = self.inner.ttl;
        let encode = || serde_json::to_vec(value).unwrap_or_default();
        let result = match &self.inner.backend {
            Backend::None => return,
            Backend::Memory(m) => return m.put(key, value.clone(), Instant::now() + ttl),
            Backend::Redis(r) => {
                self.bounded(r.put(key, &encode(), ttl), r.addr(), r.backoff())
                    .await
            }
            Backend::Memcached(m) => {
                self.bounded(m.put(key, &encode(), ttl), m.addr(), m.backoff())
                    .await
            }
        };
        self.record(result);
    }

    /// Whether the backend's last operation failed (the cache is then missing on every lookup).
    pub fn is_degraded(&self) -> bool {
        self.inner.degraded.load(Ordering::Relaxed)
    }

    /// Whether this cache can ever hit (false for `cache.backend: none`).
    pub fn is_enabled(&self) -> bool {
        !matches!(self.inner.backend, Backend::None)
    }

    /// Runs a remote operation within [`OP_TIMEOUT`]; a failure of the backend (not of one
    /// entry, nor the back-off refusing) starts the back-off.
    async fn bounded<T>(
        &self,
        op: impl Future<Output = Result<T, CacheError>>,
        addr: &str,
        backoff: &Backoff,
    ) -> Result<T, CacheError> {
        let backend = match &self.inner.backend {
            Backend::Redis(_) => "redis",
            _ => "memcached",
        };
        let result = tokio::time::timeout(OP_TIMEOUT, op)
            .await
            .unwrap_or_else(|_| {
                Err(CacheError::Timeout {
                    backend,
                    addr: addr.to_string(),
                })
            });
        if let Err(CacheError::Backend { .. } | CacheError::Timeout { .. }) = &result {
            backoff.failed();
        }
        result
    }

    /// Logs the first failure of an incident and the first success after it. A failure of one
    /// entry (too large, unreadable) is no incident: it is logged the first time only.
    fn record<T>(&self, result: Result<T, CacheError>) -> Option<T> {
        match result {
            Err(e @ (CacheError::Corrupt { .. } | CacheError::Rejected { .. })) => {
                if !self.inner.entry_error_logged.swap(true, Ordering::Relaxed) {
                    eprintln!(
                        "kiln gateway: response cache: {e} (treated as a miss; \
                         further such entries are not logged)"
                    );
                }
                None
            }
            Ok(value) => {
                if self.inner.degraded.swap(false, Ordering::Relaxed) {
                    eprintln!("kiln gateway: response cache is back");
                }
                Some(value)
            }
            Err(e) => {
                if !self.inner.degraded.swap(true, Ordering::Relaxed) {
                    eprintln!(
                        "kiln gateway: response cache unavailable, serving without it \
                         (logged once until it recovers): {e}"
                    );
                }
                None
            }
        }
    }
}

/// `url` without its user-info (a password has no place in a log line).
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Refuses connection attempts for [`RECONNECT_AFTER`] after a failed one, so an unreachable
/// backend costs a lookup nothing instead of a connect timeout.
struct Backoff {
    until: std::sync::Mutex<Option<Instant>>,
}

impl Backoff {
    fn new() -> Self {
        Self {
            until: std::sync::Mutex::new(None),
        }
    }

    fn may_try(&self) -> bool {
        let until = *self.until.lock().unwrap_or_else(|e| e.into_inner());
        until.is_none_or(|t| Instant::now() >= t)
    }

    fn failed(&self) {
        *self.until.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Instant::now() + RECONNECT_AFTER);
    }

    fn succeeded(&self) {
        *self.until.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn passwords_stay_out_of_log_lines() {
        assert_eq!(
            redact("redis://:hunter2@cache:6379/0"),
            "redis://***@cache:6379/0"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[tokio::test]
    async fn a_zero_ttl_stores_nothing() {
        let cfg = CacheConfig {
            ttl_s: 0,
            ..CacheConfig::default()
        };
        let cache = ResponseCache::new(&cfg).await.unwrap();
        let value = CachedResponse {
            body: serde_json::json!(1),
        };
        cache.put("k", &value).await;
        assert_eq!(cache.get("k").await, None);
    }
}
