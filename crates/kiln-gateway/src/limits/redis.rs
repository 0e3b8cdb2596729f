//! The shared backend: every replica counts in the same Redis keys, so a limit holds for the
//! whole deployment, not per replica.
//!
//! Keys, hash-tagged by the caller's id so that one id's keys share a Redis Cluster slot and one
//! script can touch them all:
//!
//! * `kiln:rl:{ID}:req` — hash of request counts by window index,
//! * `kiln:rl:{ID}:tok` — hash of token counts by window index,
//! * `kiln:rl:{ID}:conc` — sorted set of concurrent slots scored by lease expiry (ms).
//!
//! [`ACQUIRE`] checks all three limits and, only if every one has room, counts the request, its
//! prompt tokens and takes a slot, atomically, with Redis's clock so replicas' clocks need not
//! agree. Concurrency is a sorted set of leases rather than a bare counter: a replica that
//! crashes with requests in flight cannot give their slots back, and its leases simply expire
//! while everyone else's are renewed by their replica's heartbeat (every third of a lease).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError, Script};

use super::{
    Admission, CONCURRENCY_RETRY_S, LimitKey, Limited, RateHeaders, Slot, SlotGuard, WindowCounts,
    headers_for,
};
use crate::config::FailurePolicy;

/// Time to open a connection (TCP and handshake).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// Time for one command's reply.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(300);
/// While Redis is down, how often one request may try to reconnect (the others answer at once).
const RECONNECT_EVERY: Duration = Duration::from_millis(500);

/// KEYS: requests hash, tokens hash, concurrency zset.
/// ARGV: window ms, rpm, tpm, prompt tokens, max concurrent (-1 = no such limit), slot member,
/// lease ms.
/// Returns {verdict (0 admitted, 1 requests, 2 tokens, 3 concurrency), ms into the window,
/// requests prev, requests curr, tokens prev, tokens curr} — counts after this request if
/// admitted.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local w = tonumber(ARGV[1])
local rpm = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local maxc = tonumber(ARGV[5])
local idx = math.floor(now / w)
local e = now - idx * w
local cur = tostring(idx)
local function counts(key)
  local v = redis.call('HMGET', key, tostring(idx - 1), cur)
  return tonumber(v[1]) or 0, tonumber(v[2]) or 0
end
local rp, rc, tp, tc = 0, 0, 0, 0
if rpm >= 0 then rp, rc = counts(KEYS[1]) end
if tpm >= 0 then tp, tc = counts(KEYS[2]) end
if rpm >= 0 and rp * (w - e) + (rc + 1) * w > rpm * w then
  return {1, e, rp, rc, tp, tc}
end
if tpm >= 0 and tp * (w - e) + (tc + cost) * w > tpm * w then
  return {2, e, rp, rc, tp, tc}
end
if maxc >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= maxc then
    return {3, e, rp, rc, tp, tc}
  end
  local lease = tonumber(ARGV[7])
  redis.call('ZADD', KEYS[3], now + lease, ARGV[6])
  redis.call('PEXPIRE', KEYS[3], 2 * lease)
end
local function bump(key, by)
  local n = redis.call('HINCRBY', key, cur, by)
  redis.call('HDEL', key, tostring(idx - 2))
  redis.call('PEXPIRE', key, 2 * w)
  return n
end
if rpm >= 0 then rc = bump(KEYS[1], 1) end
if tpm >= 0 and cost > 0 then tc = bump(KEYS[2], cost) end
return {0, e, rp, rc, tp, tc}
";

/// KEYS: tokens hash. ARGV: window ms, tokens.
const COMPLETE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local w = tonumber(ARGV[1])
local idx = math.floor(now / w)
redis.call('HINCRBY', KEYS[1], tostring(idx), ARGV[2])
redis.call('HDEL', KEYS[1], tostring(idx - 2))
redis.call('PEXPIRE', KEYS[1], 2 * w)
return 1
";

/// KEYS: concurrency zset. ARGV: lease ms, then the members to renew (those still present).
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[i])
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], 2 * lease)
end
return 1
";

/// One concurrent slot: the sorted set and this slot's member in it.
pub(crate) struct SlotId {
    key: String,
    member: String,
}

impl fmt::Debug for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} in {}", self.member, self.key)
    }
}

/// `kiln:rl:{ID}:` with any braces in the id replaced, so the hash tag is the whole id.
fn prefix(id: &str) -> String {
    let id: String = id
        .chars()
        .map(|c| if c == '{' || c == '}' { '_' } else { c })
        .collect();
    format!("kiln:rl:{{{id}}}:")
}

/// Why Redis could not answer.
enum Failure {
    /// Known to be down and not yet due for another connection attempt.
    Down,
    Error(String),
}

pub(crate) struct RedisLimiter {
    client: Client,
    addr: String,
    policy: FailurePolicy,
    window_ms: u64,
    lease: Duration,
    conn: Mutex<Option<MultiplexedConnection>>,
    /// Held by the one task trying to (re)connect.
    connecting: tokio::sync::Mutex<()>,
    /// When the next connection attempt is allowed.
    retry_at: Mutex<Instant>,
    /// False during an incident (so it is logged once).
    healthy: AtomicBool,
    /// Slots this replica holds, by sorted set, renewed by the heartbeat.
    live: Mutex<HashMap<String, HashSet<String>>>,
    /// Tells this replica's slot members apart from other replicas'.
    replica: u64,
    next_slot: AtomicU64,
    acquire_script: Script,
    complete_script: Script,
    renew_script: Script,
}

impl RedisLimiter {
    pub(super) async fn connect(
        url: &str,
        policy: FailurePolicy,
        window_ms: u64,
        lease: Duration,
    ) -> Result<Arc<Self>, anyhow::Error> {
        let client = Client::open(url)
            .map_err(|e| anyhow::anyhow!("`limits.redis_url`: not a usable Redis URL: {e}"))?;
        let addr = client.get_connection_info().addr.to_string();
        let limiter = Arc::new(Self {
            client,
            addr,
            policy,
            window_ms,
            lease,
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            retry_at: Mutex::new(Instant::now()),
            healthy: AtomicBool::new(true),
            live: Mutex::new(HashMap::new()),
            replica: rand::random(),
            next_slot: AtomicU64::new(0),
            acquire_script: Script::new(ACQUIRE),
            complete_script: Script::new(COMPLETE),
            renew_script: Script::new(RENEW),
        });
        // Connect now so the first requests need not; if Redis is down the policy applies.
        match limiter.connection().await {
            Ok(_) => {}
            Err(Failure::Error(e)) => limiter.failed(&e),
            Err(Failure::Down) => {}
        }
        tokio::spawn(heartbeat(Arc::downgrade(&limiter), lease / 3));
        Ok(limiter)
    }

    pub(super) fn addr(&self) -> &str {
        &self.addr
    }

    /// The open connection, or a new one if none is open and an attempt is due.
    async fn connection(&self) -> Result<MultiplexedConnection, Failure> {
        if let Some(c) = lock(&self.conn).as_ref() {
            return Ok(c.clone());
        }
        // One connection attempt at a time; the others answer by the policy meanwhile.
        let Ok(_attempt) = self.connecting.try_lock() else {
            return Err(Failure::Down);
        };
        if let Some(c) = lock(&self.conn).as_ref() {
            return Ok(c.clone());
        }
        if Instant::now() < *lock(&self.retry_at) {
            return Err(Failure::Down);
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT);
        let attempt = self
            .client
            .get_multiplexed_async_connection_with_config(&config);
        let result = match tokio::time::timeout(CONNECT_TIMEOUT + RESPONSE_TIMEOUT, attempt).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(Failure::Error(e.to_string())),
            Err(_) => Err(Failure::Error("timed out connecting".into())),
        };
        match &result {
            Ok(c) => *lock(&self.conn) = Some(c.clone()),
            Err(_) => *lock(&self.retry_at) = Instant::now() + RECONNECT_EVERY,
        }
        result
    }

    /// Runs `invocation` with a bounded wait; forgets the connection if it looks broken.
    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, Failure> {
        let mut conn = self.connection().await?;
        let result =
            tokio::time::timeout(RESPONSE_TIMEOUT, invocation.invoke_async(&mut conn)).await;
        match result {
            Ok(Ok(v)) => {
                self.recovered();
                Ok(v)
            }
            Ok(Err(e)) => {
                if is_connection_error(&e) {
                    self.forget_connection();
                }
                Err(Failure::Error(e.to_string()))
            }
            Err(_) => {
                self.forget_connection();
                Err(Failure::Error(
                    "no reply within the response timeout".into(),
                ))
            }
        }
    }

    fn forget_connection(&self) {
        *lock(&self.conn) = None;
    }

    /// Logs the start of an incident (once).
    fn failed(&self, error: &str) {
        if self.healthy.swap(false, Ordering::AcqRel) {
            let what = match self.policy {
                FailurePolicy::FailOpen => "admitting requests without limits (fail_open)",
                FailurePolicy::FailClosed => "refusing requests with 503 (fail_closed)",
            };
            eprintln!(
                "kiln gateway: rate-limit backend redis at {} is unreachable ({error}); {what} until it is back",
                self.addr
            );
        }
    }

    /// Logs the end of an incident (once).
    fn recovered(&self) {
        if !self.healthy.swap(true, Ordering::AcqRel) {
            eprintln!(
                "kiln gateway: rate-limit backend redis at {} is reachable again; limits are enforced",
                self.addr
            );
        }
    }

    /// The answer when Redis could not decide.
    fn by_policy(&self, failure: Failure) -> Result<Admission, Limited> {
        if let Failure::Error(e) = failure {
            self.failed(&e);
        }
        match self.policy {
            FailurePolicy::FailOpen => Ok(Admission::unlimited()),
            FailurePolicy::FailClosed => Err(Limited::BackendUnavailable),
        }
    }

    pub(super) async fn acquire(
        self: &Arc<Self>,
        key: &LimitKey,
        prompt_tokens: u64,
    ) -> Result<Admission, Limited> {
        let prefix = prefix(&key.id);
        let slot = key.max_concurrent.map(|_| SlotId {
            key: format!("{prefix}conc"),
            member: format!(
                "{:016x}:{}",
                self.replica,
                self.next_slot.fetch_add(1, Ordering::Relaxed)
            ),
        });
        let limit = |l: Option<u64>| l.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX));
        let mut invocation = self.acquire_script.prepare_invoke();
        invocation
            .key(format!("{prefix}req"))
            .key(format!("{prefix}tok"))
            .key(format!("{prefix}conc"))
            .arg(self.window_ms)
            .arg(limit(key.rpm))
            .arg(limit(key.tpm))
            .arg(prompt_tokens)
            .arg(limit(key.max_concurrent))
            .arg(slot.as_ref().map_or("", |s| s.member.as_str()))
            .arg(u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX));
        let reply: Vec<u64> = match self.run(&invocation).await {
            Ok(r) => r,
            Err(f) => return self.by_policy(f),
        };
        let [verdict, elapsed_ms, rp, rc, tp, tc] = reply[..] else {
            return self.by_policy(Failure::Error(format!(
                "the acquire script answered {} values, not 6",
                reply.len()
            )));
        };
        let window = |prev, curr| WindowCounts {
            prev,
            curr,
            elapsed_ms,
            window_ms: self.window_ms,
        };
        let (requests, tokens) = (window(rp, rc), window(tp, tc));
        let headers: RateHeaders = headers_for(key, Some(requests), Some(tokens));
        match (verdict, key.rpm, key.tpm) {
            (1, Some(limit), _) => Err(Limited::Requests {
                retry_after_s: requests.retry_after_s(1, limit),
                headers,
            }),
            (2, _, Some(limit)) => Err(Limited::Tokens {
                retry_after_s: tokens.retry_after_s(prompt_tokens, limit),
                headers,
            }),
            (3, ..) => Err(Limited::Concurrency {
                retry_after_s: CONCURRENCY_RETRY_S,
            }),
            (0, ..) => {
                let slot = match slot {
                    Some(s) => {
                        lock(&self.live)
                            .entry(s.key.clone())
                            .or_default()
                            .insert(s.member.clone());
                        Slot::Redis(Arc::clone(self), s)
                    }
                    None => Slot::None,
                };
                Ok(Admission {
                    headers,
                    slot: SlotGuard(slot),
                })
            }
            _ => self.by_policy(Failure::Error(format!(
                "the acquire script answered verdict {verdict}"
            ))),
        }
    }

    pub(super) async fn record_completion(&self, key: &LimitKey, completion_tokens: u64) {
        let mut invocation = self.complete_script.prepare_invoke();
        invocation
            .key(format!("{}tok", prefix(&key.id)))
            .arg(self.window_ms)
            .arg(completion_tokens);
        if let Err(Failure::Error(e)) = self.run::<i64>(&invocation).await {
            self.failed(&e);
        }
    }

    /// Gives a slot back: at once from this replica's heartbeat, and in Redis by a spawned
    /// `ZREM` (if that fails, the lease runs out).
    pub(super) fn release(self: Arc<Self>, slot: SlotId) {
        {
            let mut live = lock(&self.live);
            if let Some(members) = live.get_mut(&slot.key) {
                members.remove(&slot.member);
                if members.is_empty() {
                    live.remove(&slot.key);
                }
            }
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let Ok(mut conn) = self.connection().await else {
                return;
            };
            let mut cmd = redis::cmd("ZREM");
            cmd.arg(&slot.key).arg(&slot.member);
            match tokio::time::timeout(RESPONSE_TIMEOUT, cmd.query_async::<i64>(&mut conn)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) if is_connection_error(&e) => self.forget_connection(),
                Ok(Err(_)) => {}
                Err(_) => self.forget_connection(),
            }
        });
    }

    /// Renews the leases of every slot this replica holds.
    async fn renew(&self) {
        let live: Vec<(String, Vec<String>)> = lock(&self.live)
            .iter()
            .map(|(k, m)| (k.clone(), m.iter().cloned().collect()))
            .collect();
        let lease_ms = u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX);
        for (key, members) in live {
            let mut invocation = self.renew_script.prepare_invoke();
            invocation.key(key).arg(lease_ms);
            for m in members {
                invocation.arg(m);
            }
            if let Err(Failure::Error(e)) = self.run::<i64>(&invocation).await {
                self.failed(&e);
                return;
            }
        }
    }
}

/// Renews this replica's leases until the limiter is dropped.
async fn heartbeat(limiter: Weak<RedisLimiter>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(limiter) = limiter.upgrade() else {
            return;
        };
        limiter.renew().await;
    }
}

fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
