//! Rate limits per key or tenant: requests per minute (RPM), tokens per minute (TPM) and
//! concurrent requests, enforced in-process ([`memory`]) or exactly across gateway replicas
//! through Redis ([`redis`]).
//!
//! # The window
//!
//! Both backends count with a **sliding-window counter** (the approximation Cloudflare
//! describes): time is cut into fixed 60 s windows, each limit keeps the count of the current
//! window and of the one before, and the usage "in the last minute" is estimated as
//!
//! ```text
//! previous × (time left in the current window / 60 s) + current
//! ```
//!
//! A request is admitted when that estimate plus its own cost stays within the limit. Unlike a
//! plain fixed window there is no burst of twice the limit across a window boundary, and unlike
//! a log of timestamps it costs two counters per limit. The comparison is done in exact integer
//! arithmetic (multiplied through by the window length) so both backends agree to the unit.
//!
//! # What is counted when
//!
//! * One request against RPM, at admission.
//! * The prompt's tokens against TPM, at admission ([`RateLimiter::acquire`]); the completion's
//!   tokens once the response is done ([`RateLimiter::record_completion`]), since they are not
//!   known before. TPM can therefore be overshot by the completions of requests that were in
//!   flight when the limit was reached — by at most one completion per concurrent request. The
//!   next requests then wait until the window has slid past the overshoot.
//! * A request whose prompt alone exceeds the TPM limit is refused (`Limited::Tokens`); waiting
//!   does not help it, and its `Retry-After` is the window length.
//! * A concurrent slot for as long as the [`Admission`] lives; dropping it gives the slot back.
//!
//! # When Redis is unreachable
//!
//! Every Redis call is bounded by short connect and response timeouts, so a dead or silent
//! Redis costs a request at most about half a second, and while it is known to be down the
//! limiter answers at once (one reconnect attempt at a time, at most every half second). The
//! configured [`FailurePolicy`](crate::config::FailurePolicy) decides the answer: `fail_open`
//! admits without limits, `fail_closed` refuses with 503. The incident is logged once when it
//! starts and once when Redis is back.

mod memory;
mod redis;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::config::{LimitsBackend, LimitsConfig};

/// What a caller is limited by (built by the server from the authenticated principal).
#[derive(Debug, Clone)]
pub struct LimitKey {
    /// Who is counted: `key:ab12…` for an API key, `jwt:tenant` for a token's tenant. Callers
    /// with the same id share their limits.
    pub id: String,
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens (prompt + completion) per minute.
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    pub max_concurrent: Option<u64>,
}

impl LimitKey {
    fn is_unlimited(&self) -> bool {
        self.rpm.is_none() && self.tpm.is_none() && self.max_concurrent.is_none()
    }
}

/// The `x-ratelimit-*` headers OpenAI sends, for the limits a key has.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateHeaders {
    pub limit_requests: Option<u64>,
    pub remaining_requests: Option<u64>,
    /// Seconds until the request count is back to zero if no more requests come.
    pub reset_requests_s: Option<f64>,
    pub limit_tokens: Option<u64>,
    pub remaining_tokens: Option<u64>,
    /// Seconds until the token count is back to zero if no more tokens are counted.
    pub reset_tokens_s: Option<f64>,
}

impl RateHeaders {
    /// Sets `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for the fields that are set.
    /// Resets are written as OpenAI does: `20ms`, `1s`, `12.5s`, `6m0s`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        let counts = [
            ("x-ratelimit-limit-requests", self.limit_requests),
            ("x-ratelimit-remaining-requests", self.remaining_requests),
            ("x-ratelimit-limit-tokens", self.limit_tokens),
            ("x-ratelimit-remaining-tokens", self.remaining_tokens),
        ];
        for (name, value) in counts {
            if let Some(v) = value {
                headers.insert(HeaderName::from_static(name), HeaderValue::from(v));
            }
        }
        let resets = [
            ("x-ratelimit-reset-requests", self.reset_requests_s),
            ("x-ratelimit-reset-tokens", self.reset_tokens_s),
        ];
        for (name, value) in resets {
            if let Some(s) = value
                && let Ok(v) = HeaderValue::from_str(&format_reset(s))
            {
                headers.insert(HeaderName::from_static(name), v);
            }
        }
    }
}

/// `0.02` → `20ms`, `1` → `1s`, `12.5` → `12.5s`, `360` → `6m0s`, `80.25` → `1m20.25s`.
pub(crate) fn format_reset(seconds: f64) -> String {
    let ms = if seconds.is_finite() && seconds > 0.0 {
        (seconds * 1000.0).round() as u64
    } else {
        0
    };
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = |ms: u64| {
        let whole = ms / 1000;
        let frac = ms % 1000;
        if frac == 0 {
            format!("{whole}s")
        } else {
            let digits = format!("{frac:03}");
            format!("{whole}.{}s", digits.trim_end_matches('0'))
        }
    };
    if ms < 60_000 {
        secs(ms)
    } else {
        format!("{}m{}", ms / 60_000, secs(ms % 60_000))
    }
}

/// Holds what an admitted request took: dropping it gives the concurrent slot back (for Redis
/// the release is spawned onto the runtime; if it cannot reach Redis the slot's lease expires).
#[derive(Debug)]
pub struct Admission {
    /// The headers to send with the response.
    pub headers: RateHeaders,
    #[allow(dead_code)] // held for its `Drop`
    slot: SlotGuard,
}

impl Admission {
    fn unlimited() -> Self {
        Self {
            headers: RateHeaders::default(),
            slot: SlotGuard(Slot::None),
        }
    }
}

/// A concurrent slot, released on drop.
struct SlotGuard(Slot);

enum Slot {
    None,
    Memory(Arc<memory::MemoryLimiter>, String),
    Redis(Arc<redis::RedisLimiter>, redis::SlotId),
}

impl fmt::Debug for SlotGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Slot::None => f.write_str("no slot"),
            Slot::Memory(_, id) => write!(f, "memory slot of {id}"),
            Slot::Redis(_, slot) => write!(f, "redis slot {slot:?}"),
        }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.0, Slot::None) {
            Slot::None => {}
            Slot::Memory(limiter, id) => limiter.release(&id),
            Slot::Redis(limiter, slot) => limiter.release(slot),
        }
    }
}

/// Why a request was refused.
#[derive(Debug)]
pub enum Limited {
    /// Over the requests-per-minute limit.
    Requests {
        retry_after_s: u64,
        headers: RateHeaders,
    },
    /// Over the tokens-per-minute limit.
    Tokens {
        retry_after_s: u64,
        headers: RateHeaders,
    },
    /// As many requests in flight as the key may have.
    Concurrency { retry_after_s: u64 },
    /// The shared backend is unreachable and the policy is `fail_closed`.
    BackendUnavailable,
}

impl fmt::Display for Limited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limited::Requests { headers, .. } => match headers.limit_requests {
                Some(l) => write!(f, "Rate limit reached for requests: limit {l} per minute"),
                None => f.write_str("Rate limit reached for requests"),
            },
            Limited::Tokens { headers, .. } => match headers.limit_tokens {
                Some(l) => write!(f, "Rate limit reached for tokens: limit {l} per minute"),
                None => f.write_str("Rate limit reached for tokens"),
            },
            Limited::Concurrency { .. } => {
                f.write_str("Rate limit reached: too many concurrent requests for this key")
            }
            Limited::BackendUnavailable => {
                f.write_str("Rate limiting is unavailable; try again shortly")
            }
        }
    }
}

impl std::error::Error for Limited {}

impl Limited {
    /// `Retry-After` in seconds (none for [`Limited::BackendUnavailable`]).
    pub fn retry_after_s(&self) -> Option<u64> {
        match self {
            Limited::Requests { retry_after_s, .. }
            | Limited::Tokens { retry_after_s, .. }
            | Limited::Concurrency { retry_after_s } => Some(*retry_after_s),
            Limited::BackendUnavailable => None,
        }
    }

    /// 429 with `Retry-After`, the `x-ratelimit-*` headers and OpenAI's error envelope
    /// (`type` and `code` both `rate_limit_exceeded`); 503 (`service_unavailable`) when the
    /// backend is down under `fail_closed`.
    pub fn into_response(self) -> Response {
        let message = self.to_string();
        let (status, kind, code) = match &self {
            Limited::BackendUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "rate_limit_backend_unavailable",
            ),
            _ => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                "rate_limit_exceeded",
            ),
        };
        let body = serde_json::json!({
            "error": { "message": message, "type": kind, "param": null, "code": code }
        });
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(s) = self.retry_after_s() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if let Limited::Requests { headers: h, .. } | Limited::Tokens { headers: h, .. } = &self {
            h.apply(headers);
        }
        response
    }
}

impl IntoResponse for Limited {
    fn into_response(self) -> Response {
        Limited::into_response(self)
    }
}

/// Window and lease lengths. The defaults are what RPM and TPM mean; shorter ones are for tests.
#[derive(Debug, Clone, Copy)]
pub struct LimiterTiming {
    /// The counting window: 60 s.
    pub window: Duration,
    /// Redis only: how long a concurrent slot outlives the replica holding it. Live slots are
    /// renewed every third of this; a crashed replica's slots expire after it. 60 s.
    pub slot_lease: Duration,
}

impl Default for LimiterTiming {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            slot_lease: Duration::from_secs(60),
        }
    }
}

/// The rate limiter the server shares between requests (cheap to clone).
#[derive(Clone)]
pub struct RateLimiter {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Memory(Arc<memory::MemoryLimiter>),
    Redis(Arc<redis::RedisLimiter>),
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.backend {
            Backend::Memory(_) => f.write_str("RateLimiter(memory)"),
            Backend::Redis(r) => write!(f, "RateLimiter(redis {})", r.addr()),
        }
    }
}

impl RateLimiter {
    /// The limiter `limits` configures. With Redis, an unreachable server at start is not an
    /// error (the failure policy applies until it is back); a malformed `redis_url` is.
    pub async fn new(cfg: &LimitsConfig) -> Result<Self, anyhow::Error> {
        Self::with_timing(cfg, LimiterTiming::default()).await
    }

    /// [`RateLimiter::new`] with other window and lease lengths.
    pub async fn with_timing(
        cfg: &LimitsConfig,
        timing: LimiterTiming,
    ) -> Result<Self, anyhow::Error> {
        let window_ms = u64::try_from(timing.window.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let backend = match cfg.backend {
            LimitsBackend::Memory => {
                Backend::Memory(Arc::new(memory::MemoryLimiter::new(window_ms)))
            }
            LimitsBackend::Redis => {
                let url = cfg.redis_url.as_deref().ok_or_else(|| {
                    anyhow::anyhow!(
                        "`limits.redis_url`: the redis backend needs a URL (redis://127.0.0.1:6379)"
                    )
                })?;
                let lease = timing.slot_lease.max(Duration::from_millis(300));
                Backend::Redis(
                    redis::RedisLimiter::connect(url, cfg.on_backend_error, window_ms, lease)
                        .await?,
                )
            }
        };
        Ok(Self { backend })
    }

    /// Counts one request and `prompt_tokens` against the key's per-minute windows, and takes a
    /// concurrent slot. Nothing is counted when the request is refused.
    pub async fn acquire(&self, key: &LimitKey, prompt_tokens: u64) -> Result<Admission, Limited> {
        if key.is_unlimited() {
            return Ok(Admission::unlimited());
        }
        match &self.backend {
            Backend::Memory(m) => m.acquire(key, prompt_tokens),
            Backend::Redis(r) => r.acquire(key, prompt_tokens).await,
        }
    }

    /// Adds the completion's tokens once the response is done (only when the key has a TPM limit).
    pub async fn record_completion(&self, key: &LimitKey, completion_tokens: u64) {
        if key.tpm.is_none() || completion_tokens == 0 {
            return;
        }
        match &self.backend {
            Backend::Memory(m) => m.record_completion(key, completion_tokens),
            Backend::Redis(r) => r.record_completion(key, completion_tokens).await,
        }
    }
}

/// One limit's counts at one instant: `prev` in the window before, `curr` in this one, which
/// began `elapsed_ms` ago.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WindowCounts {
    prev: u64,
    curr: u64,
    elapsed_ms: u64,
    window_ms: u64,
}

impl WindowCounts {
    /// Usage × window length: the estimate, exact in integers.
    fn scaled_usage(&self) -> u128 {
        let left = u128::from(self.window_ms.saturating_sub(self.elapsed_ms));
        u128::from(self.prev) * left + u128::from(self.curr) * u128::from(self.window_ms)
    }

    /// Whether `cost` more fits within `limit`.
    fn fits(&self, cost: u64, limit: u64) -> bool {
        let w = u128::from(self.window_ms);
        self.scaled_usage() + u128::from(cost) * w <= u128::from(limit) * w
    }

    fn remaining(&self, limit: u64) -> u64 {
        let w = u128::from(self.window_ms);
        let room = (u128::from(limit) * w).saturating_sub(self.scaled_usage()) / w;
        u64::try_from(room).unwrap_or(u64::MAX)
    }

    /// Seconds until nothing is counted any more, if nothing more comes.
    fn reset_s(&self) -> f64 {
        let left = self.window_ms.saturating_sub(self.elapsed_ms) as f64;
        let ms = if self.curr > 0 {
            left + self.window_ms as f64
        } else if self.prev > 0 {
            left
        } else {
            0.0
        };
        ms / 1000.0
    }

    /// Seconds until `cost` fits within `limit` if nothing more comes, rounded up, at least 1
    /// (the window length when it never fits).
    fn retry_after_s(&self, cost: u64, limit: u64) -> u64 {
        let w = self.window_ms as f64;
        let e = self.elapsed_ms as f64;
        let (p, c, k, l) = (
            self.prev as f64,
            self.curr as f64,
            cost as f64,
            limit as f64,
        );
        let wait_ms = if cost > limit {
            w
        } else if c + k <= l {
            // Fits in this window once enough of the previous one has slid out.
            if p > 0.0 {
                ((w - e) - (l - c - k) * w / p).max(0.0)
            } else {
                0.0
            }
        } else {
            // In the next window this one is "previous" and slides out in turn (c > 0 here).
            (w - e) + (w - (l - k) * w / c).max(0.0)
        };
        ((wait_ms / 1000.0).ceil() as u64).max(1)
    }
}

/// The headers for `key` given its RPM and TPM counts (after counting this request, if admitted).
fn headers_for(
    key: &LimitKey,
    requests: Option<WindowCounts>,
    tokens: Option<WindowCounts>,
) -> RateHeaders {
    let mut h = RateHeaders::default();
    if let (Some(limit), Some(c)) = (key.rpm, requests) {
        h.limit_requests = Some(limit);
        h.remaining_requests = Some(c.remaining(limit));
        h.reset_requests_s = Some(c.reset_s());
    }
    if let (Some(limit), Some(c)) = (key.tpm, tokens) {
        h.limit_tokens = Some(limit);
        h.remaining_tokens = Some(c.remaining(limit));
        h.reset_tokens_s = Some(c.reset_s());
    }
    h
}

/// How long a refused-for-concurrency caller is told to wait.
const CONCURRENCY_RETRY_S: u64 = 1;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn resets_are_written_like_openai() {
        assert_eq!(format_reset(0.0), "0s");
        assert_eq!(format_reset(0.02), "20ms");
        assert_eq!(format_reset(1.0), "1s");
        assert_eq!(format_reset(12.5), "12.5s");
        assert_eq!(format_reset(360.0), "6m0s");
        assert_eq!(format_reset(80.25), "1m20.25s");
        assert_eq!(format_reset(f64::NAN), "0s");
    }

    #[test]
    fn sliding_window_weighs_the_previous_window_by_what_is_left() {
        let c = WindowCounts {
            prev: 10,
            curr: 0,
            elapsed_ms: 6_000,
            window_ms: 60_000,
        };
        // 10 × 0.9 = 9 used: exactly one more fits.
        assert!(c.fits(1, 10));
        assert!(!c.fits(2, 10));
        assert_eq!(c.remaining(10), 1);
        let full = WindowCounts {
            prev: 10,
            curr: 0,
            elapsed_ms: 100,
            window_ms: 60_000,
        };
        assert!(!full.fits(1, 10));
        // 10 × (59.9 - t)/60 ≤ 9 → t ≥ 5.9 s.
        assert_eq!(full.retry_after_s(1, 10), 6);
    }

    #[test]
    fn retry_after_spans_into_the_next_window_when_this_one_is_full() {
        let c = WindowCounts {
            prev: 0,
            curr: 3,
            elapsed_ms: 10_000,
            window_ms: 60_000,
        };
        // 50 s to the end of this window, then 3 × (60 - t)/60 ≤ 2 → t ≥ 20 s.
        assert_eq!(c.retry_after_s(1, 3), 70);
        assert_eq!(
            c.retry_after_s(5, 3),
            60,
            "a request larger than the limit never fits"
        );
        assert_eq!(c.reset_s(), 110.0);
    }
}
