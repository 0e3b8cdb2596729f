//! The in-process backend: a bounded LRU map with a deadline per entry.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Instant;

use super::CachedResponse;

/// At most `max_entries` replies; the least recently used goes first when full, an expired one
/// goes when it is next looked up (or when it reaches the cold end). `max_entries` 0 stores
/// nothing.
pub(super) struct MemoryCache {
    max_entries: usize,
    state: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    entries: HashMap<String, Entry>,
    /// Use stamp → key, oldest first.
    order: BTreeMap<u64, String>,
    clock: u64,
}

struct Entry {
    value: CachedResponse,
    expires: Instant,
    used: u64,
}

impl Lru {
    fn stamp(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn remove(&mut self, key: &str) {
        if let Some(old) = self.entries.remove(key) {
            self.order.remove(&old.used);
        }
    }
}

impl MemoryCache {
    pub(super) fn new(max_entries: usize) -> Self {
        Self {
            max_entries,
            state: Mutex::new(Lru::default()),
        }
    }

    pub(super) fn get(&self, key: &str, now: Instant) -> Option<CachedResponse> {
        let mut lru = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let expired = now >= lru.entries.get(key)?.expires;
        if expired {
            lru.remove(key);
            return None;
        }
        let used = lru.stamp();
        let entry = lru.entries.get_mut(key)?;
        let previous = std::mem::replace(&mut entry.used, used);
        let value = entry.value.clone();
        if let Some(k) = lru.order.remove(&previous) {
            lru.order.insert(used, k);
        }
        Some(value)
    }

    pub(super) fn put(&self, key: &str, value: CachedResponse, expires: Instant) {
        if self.max_entries == 0 {
            return;
        }
        let mut lru = self.state.lock().unwrap_or_else(|e| e.into_inner());
        lru.remove(key);
        let used = lru.stamp();
        lru.entries.insert(
            key.to_string(),
            Entry {
                value,
                expires,
                used,
            },
        );
        lru.order.insert(used, key.to_string());
        while lru.entries.len() > self.max_entries {
            let Some((_, oldest)) = lru.order.pop_first() else {
                break;
            };
            lru.entries.remove(&oldest);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::time::Duration;

    fn reply(n: u64) -> CachedResponse {
        CachedResponse {
            body: serde_json::json!({ "n": n }),
        }
    }

    #[test]
    fn a_lookup_protects_an_entry_from_eviction() {
        let cache = MemoryCache::new(2);
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        cache.put("a", reply(1), later);
        cache.put("b", reply(2), later);
        assert_eq!(cache.get("a", now), Some(reply(1)));
        cache.put("c", reply(3), later);
        assert_eq!(cache.get("b", now), None, "b was the least recently used");
        assert_eq!(cache.get("a", now), Some(reply(1)));
        assert_eq!(cache.get("c", now), Some(reply(3)));
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn overwriting_keeps_one_entry_and_expired_ones_are_dropped() {
        let cache = MemoryCache::new(4);
        let now = Instant::now();
        cache.put("a", reply(1), now + Duration::from_secs(1));
        cache.put("a", reply(2), now + Duration::from_secs(1));
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get("a", now), Some(reply(2)));
        assert_eq!(cache.get("a", now + Duration::from_secs(2)), None);
        assert_eq!(cache.len(), 0);
    }
}
