//! The in-process backend: one map of counters behind a mutex held for a few arithmetic
//! operations per request. Limits are per gateway process; run the Redis backend to share them
//! between replicas.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::{
    Admission, CONCURRENCY_RETRY_S, LimitKey, Limited, Slot, SlotGuard, WindowCounts, headers_for,
};

/// The counts of one limit in window `index` (`curr`) and the one before (`prev`).
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    index: u64,
    prev: u64,
    curr: u64,
}

impl Window {
    /// Moves the window forward to `now`.
    fn roll(&mut self, now: u64) {
        if now == self.index {
            return;
        }
        self.prev = if now == self.index + 1 { self.curr } else { 0 };
        self.curr = 0;
        self.index = now;
    }

    fn counts(&self, elapsed_ms: u64, window_ms: u64) -> WindowCounts {
        WindowCounts {
            prev: self.prev,
            curr: self.curr,
            elapsed_ms,
            window_ms,
        }
    }
}

#[derive(Debug, Default)]
struct Entry {
    requests: Window,
    tokens: Window,
    in_flight: u64,
}

impl Entry {
    fn is_stale(&self, now: u64) -> bool {
        self.in_flight == 0 && self.requests.index + 1 < now && self.tokens.index + 1 < now
    }
}

pub(super) struct MemoryLimiter {
    start: Instant,
    window_ms: u64,
    entries: Mutex<HashMap<String, Entry>>,
    /// The window in which idle entries were last swept out.
    swept: AtomicU64,
}

impl MemoryLimiter {
    pub(super) fn new(window_ms: u64) -> Self {
        Self {
            start: Instant::now(),
            window_ms,
            entries: Mutex::new(HashMap::new()),
            swept: AtomicU64::new(0),
        }
    }

    /// The current window's index and how far into it we are.
    fn now(&self) -> (u64, u64) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        (ms / self.window_ms, ms % self.window_ms)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // A panic elsewhere cannot leave the counters half-updated in a way that matters.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn acquire(
        self: &Arc<Self>,
        key: &LimitKey,
        prompt_tokens: u64,
    ) -> Result<Admission, Limited> {
        let (now, elapsed) = self.now();
        let mut entries = self.lock();
        if self.swept.swap(now, Ordering::Relaxed) != now {
            entries.retain(|_, e| !e.is_stale(now));
        }
        let entry = entries.entry(key.id.clone()).or_default();
        entry.requests.roll(now);
        entry.tokens.roll(now);
        let requests = entry.requests.counts(elapsed, self.window_ms);
        let tokens = entry.tokens.counts(elapsed, self.window_ms);
        let refused = |requests, tokens| headers_for(key, Some(requests), Some(tokens));
        if let Some(limit) = key.rpm
            && !requests.fits(1, limit)
        {
            return Err(Limited::Requests {
                retry_after_s: requests.retry_after_s(1, limit),
                headers: refused(requests, tokens),
            });
        }
        if let Some(limit) = key.tpm
            && !tokens.fits(prompt_tokens, limit)
        {
            return Err(Limited::Tokens {
                retry_after_s: tokens.retry_after_s(prompt_tokens, limit),
                headers: refused(requests, tokens),
            });
        }
        if let Some(max) = key.max_concurrent
            && entry.in_flight >= max
        {
            return Err(Limited::Concurrency {
                retry_after_s: CONCURRENCY_RETRY_S,
            });
        }
        entry.requests.curr += 1;
        entry.tokens.curr = entry.tokens.curr.saturating_add(prompt_tokens);
        let slot = if key.max_concurrent.is_some() {
            entry.in_flight += 1;
            Slot::Memory(Arc::clone(self), key.id.clone())
        } else {
            Slot::None
        };
        let headers = headers_for(
            key,
            Some(entry.requests.counts(elapsed, self.window_ms)),
            Some(entry.tokens.counts(elapsed, self.window_ms)),
        );
        Ok(Admission {
            headers,
            slot: SlotGuard(slot),
        })
    }

    pub(super) fn record_completion(&self, key: &LimitKey, completion_tokens: u64) {
        let (now, _) = self.now();
        let mut entries = self.lock();
        let entry = entries.entry(key.id.clone()).or_default();
        entry.tokens.roll(now);
        entry.tokens.curr = entry.tokens.curr.saturating_add(completion_tokens);
    }

    pub(super) fn release(&self, id: &str) {
        if let Some(entry) = self.lock().get_mut(id) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
        }
    }
}
