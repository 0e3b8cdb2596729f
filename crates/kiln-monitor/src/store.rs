//! What the gateway records about each request, and the per-tenant budgets built on it.
//!
//! One row per request in one table, [`TABLE`], in SQLite (a file next to the gateway, the
//! default) or PostgreSQL (one database for every replica, so each replica's budgets start from
//! the spend of all of them). A row holds ids, the tenant, the model and upstream, the status,
//! token counts, cost, timings and the guardrails' verdicts — never a prompt or a completion.
//! `no_train` is kept on every row so that a data export can leave out the tenants whose traffic
//! must never become training data. Content is kept only when `store.capture_content` is on, in
//! a second table ([`CONTENT_TABLE`]), after the PII scrubber, and
//! [`Store::exportable_content`] never returns the rows of `no_train` keys.
//!
//! Nothing here runs on the request path: [`Store::record`] is a single `INSERT` for the server
//! to run from a spawned task, and [`Recorder`] goes further, queueing records without waiting
//! and writing them in multi-row batches from one background task (5,000 records on two cores:
//! 0.05 s instead of 0.45 s of spawned `INSERT`s on SQLite, 0.2 s instead of 1.1 s on
//! PostgreSQL). Budgets must not query per request either: [`Budgets`]
//! loads a tenant's spend for the current period once, then adds each finished request's cost
//! in memory.
//!
//! Times are stored as microseconds since the Unix epoch (`at_us`, a 64-bit integer), the one
//! representation both databases index and compare the same way.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use tokio::sync::{mpsc, oneshot};

use crate::config::Budget;
use crate::cost::period_start;

/// The table every request is recorded in.
pub const TABLE: &str = "kiln_gateway_requests";

/// One finished (or refused) request. No prompt or completion text: only what metering,
/// budgets and audits need.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub request_id: String,
    /// When the request arrived.
    pub at: SystemTime,
    pub tenant: String,
    /// Which credential was used: an API key's id (never the key) or the token's subject.
    pub key_id: String,
    pub model: String,
    /// The upstream that answered; `None` when none was reached (refused, cache hit).
    pub upstream: Option<String>,
    /// The HTTP status returned to the client.
    pub status: u16,
    pub stream: bool,
    pub cache_hit: bool,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// USD; `None` when the model has no price.
    pub cost_usd: Option<f64>,
    /// The gateway's own time, upstream excluded.
    pub gateway_ms: f64,
    pub upstream_ms: Option<f64>,
    /// The tenant's traffic must never become training data.
    pub no_train: bool,
    /// The guardrails' verdicts (`input.pii:redact(EMAIL×2); …`): detectors, actions, kinds
    /// and scores, never the text.
    pub guard: Option<String>,
}

/// A request's content, kept only when `store.capture_content` is on and only after the PII
/// scrubber ran over it.
#[derive(Debug, Clone, PartialEq)]
pub struct ContentRecord {
    pub request_id: String,
    pub at: SystemTime,
    pub tenant: String,
    pub model: String,
    /// Requests of a `no_train` key: kept for audit, never exported.
    pub no_train: bool,
    /// The request's `messages` (as JSON) or `prompt`, as sent upstream, redacted.
    pub prompt: String,
    /// The reply's text as the client received it, redacted; `None` when there was none.
    pub completion: Option<String>,
}

/// The request store: a SQLite file or a PostgreSQL database. Cheap to clone (a pool handle).
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
}

#[derive(Debug, Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// How long to wait for a pooled connection before giving up on a query.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serializes schema creation across gateway replicas starting at once against one PostgreSQL
/// (concurrent `CREATE TABLE IF NOT EXISTS` can still fail there); the bytes spell "kilngw01".
const SCHEMA_LOCK: i64 = 0x6b69_6c6e_6777_3031;

const SQLITE_SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS kiln_gateway_requests (
        id INTEGER PRIMARY KEY,
        request_id TEXT NOT NULL,
        at_us INTEGER NOT NULL,
        tenant TEXT NOT NULL,
        key_id TEXT NOT NULL,
        model TEXT NOT NULL,
        upstream TEXT,
        status INTEGER NOT NULL,
        stream BOOLEAN NOT NULL,
        cache_hit BOOLEAN NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cost_usd REAL,
        gateway_ms REAL NOT NULL,
        upstream_ms REAL,
        no_train BOOLEAN NOT NULL,
        guard TEXT
    )",
    "CREATE INDEX IF NOT EXISTS kiln_gateway_requests_tenant_at
        ON kiln_gateway_requests (tenant, at_us)",
    CONTENT_SCHEMA,
];

const POSTGRES_SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS kiln_gateway_requests (
        id BIGSERIAL PRIMARY KEY,
        request_id TEXT NOT NULL,
        at_us BIGINT NOT NULL,
        tenant TEXT NOT NULL,
        key_id TEXT NOT NULL,
        model TEXT NOT NULL,
        upstream TEXT,
        status INTEGER NOT NULL,
        stream BOOLEAN NOT NULL,
        cache_hit BOOLEAN NOT NULL,
        prompt_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        cost_usd DOUBLE PRECISION,
        gateway_ms DOUBLE PRECISION NOT NULL,
        upstream_ms DOUBLE PRECISION,
        no_train BOOLEAN NOT NULL,
        guard TEXT
    )",
    "CREATE INDEX IF NOT EXISTS kiln_gateway_requests_tenant_at
        ON kiln_gateway_requests (tenant, at_us)",
    // Tables made before the guard verdicts were recorded.
    "ALTER TABLE kiln_gateway_requests ADD COLUMN IF NOT EXISTS guard TEXT",
    CONTENT_SCHEMA_PG,
];

/// Captured content (`store.capture_content`), already redacted; one row per request.
const CONTENT_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS kiln_gateway_content (
        request_id TEXT PRIMARY KEY,
        at_us INTEGER NOT NULL,
        tenant TEXT NOT NULL,
        model TEXT NOT NULL,
        no_train BOOLEAN NOT NULL,
        prompt TEXT NOT NULL,
        completion TEXT
    )";

const CONTENT_SCHEMA_PG: &str = "CREATE TABLE IF NOT EXISTS kiln_gateway_content (
        request_id TEXT PRIMARY KEY,
        at_us BIGINT NOT NULL,
        tenant TEXT NOT NULL,
        model TEXT NOT NULL,
        no_train BOOLEAN NOT NULL,
        prompt TEXT NOT NULL,
        completion TEXT
    )";

/// The table of captured content.
pub const CONTENT_TABLE: &str = "kiln_gateway_content";

/// The head of a multi-row INSERT (the builder appends `VALUES (…), (…)`).
const INSERT_INTO: &str = "INSERT INTO kiln_gateway_requests (request_id, at_us, tenant, \
    key_id, model, upstream, status, stream, cache_hit, prompt_tokens, completion_tokens, \
    cost_usd, gateway_ms, upstream_ms, no_train, guard) ";

const SQLITE_INSERT: &str = "INSERT INTO kiln_gateway_requests (request_id, at_us, tenant, \
    key_id, model, upstream, status, stream, cache_hit, prompt_tokens, completion_tokens, \
    cost_usd, gateway_ms, upstream_ms, no_train, guard) \
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

const POSTGRES_INSERT: &str = "INSERT INTO kiln_gateway_requests (request_id, at_us, tenant, \
    key_id, model, upstream, status, stream, cache_hit, prompt_tokens, completion_tokens, \
    cost_usd, gateway_ms, upstream_ms, no_train, guard) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)";

const SQLITE_SPEND: &str =
    "SELECT TOTAL(cost_usd) FROM kiln_gateway_requests WHERE tenant = ? AND at_us >= ?";

const POSTGRES_SPEND: &str = "SELECT COALESCE(SUM(cost_usd), 0)::DOUBLE PRECISION \
    FROM kiln_gateway_requests WHERE tenant = $1 AND at_us >= $2";

/// The fields of `$r` (a `&RequestRecord`) as column values, in [`INSERT_INTO`]'s order:
/// `$bind` is `.bind` on a query or `.push_bind` on a query builder's row.
macro_rules! record_values {
    ($target:expr, $bind:ident, $r:expr) => {{
        let r: &RequestRecord = $r;
        $target
            .$bind(r.request_id.as_str())
            .$bind(unix_micros(r.at))
            .$bind(r.tenant.as_str())
            .$bind(r.key_id.as_str())
            .$bind(r.model.as_str())
            .$bind(r.upstream.as_deref())
            .$bind(i32::from(r.status))
            .$bind(r.stream)
            .$bind(r.cache_hit)
            // Token counts beyond i64 cannot happen; saturate rather than fail the write.
            .$bind(i64::try_from(r.prompt_tokens).unwrap_or(i64::MAX))
            .$bind(i64::try_from(r.completion_tokens).unwrap_or(i64::MAX))
            .$bind(r.cost_usd.filter(|c| c.is_finite()))
            .$bind(r.gateway_ms)
            .$bind(r.upstream_ms)
            .$bind(r.no_train)
            .$bind(r.guard.as_deref())
    }};
}

macro_rules! bind_record {
    ($query:expr, $r:expr) => {
        record_values!($query, bind, $r)
    };
}

macro_rules! push_record {
    ($row:expr, $r:expr) => {
        record_values!($row, push_bind, $r)
    };
}

impl Store {
    /// Opens `sqlite://PATH` (the file, and its directory, created if missing; WAL journal) or
    /// `postgres://…` / `postgresql://…`, and creates the table and its index if missing.
    /// Connecting twice, or from several replicas at once, is harmless.
    pub async fn connect(url: &str) -> Result<Self, anyhow::Error> {
        let shown = redact(url);
        let pool = if url.starts_with("sqlite:") {
            Pool::Sqlite(
                connect_sqlite(url)
                    .await
                    .with_context(|| format!("store `{shown}`"))?,
            )
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect(url)
                .await
                .with_context(|| format!("store `{shown}`: cannot connect to PostgreSQL"))?;
            Pool::Postgres(pool)
        } else {
            anyhow::bail!("store `{shown}`: expected a sqlite://PATH or postgres://… URL");
        };
        let store = Self { pool };
        store
            .create_schema()
            .await
            .with_context(|| format!("store `{shown}`: creating table {TABLE}"))?;
        Ok(store)
    }

    async fn create_schema(&self) -> Result<(), sqlx::Error> {
        match &self.pool {
            Pool::Sqlite(pool) => {
                for statement in SQLITE_SCHEMA {
                    sqlx::query(statement).execute(pool).await?;
                }
                // Tables made before the guard verdicts were recorded (SQLite has no
                // `ADD COLUMN IF NOT EXISTS`).
                let columns: Vec<String> = sqlx::query_scalar(
                    "SELECT name FROM pragma_table_info('kiln_gateway_requests')",
                )
                .fetch_all(pool)
                .await?;
                if !columns.iter().any(|c| c == "guard") {
                    sqlx::query("ALTER TABLE kiln_gateway_requests ADD COLUMN guard TEXT")
                        .execute(pool)
                        .await?;
                }
            }
            Pool::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(SCHEMA_LOCK)
                    .execute(&mut *tx)
                    .await?;
                for statement in POSTGRES_SCHEMA {
                    sqlx::query(statement).execute(&mut *tx).await?;
                }
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Records one request: a single `INSERT`.
    pub async fn record(&self, r: &RequestRecord) -> Result<(), anyhow::Error> {
        let done = match &self.pool {
            Pool::Sqlite(pool) => bind_record!(sqlx::query(SQLITE_INSERT), r)
                .execute(pool)
                .await
                .map(drop),
            Pool::Postgres(pool) => bind_record!(sqlx::query(POSTGRES_INSERT), r)
                .execute(pool)
                .await
                .map(drop),
        };
        done.with_context(|| {
            format!(
                "recording request {} of tenant `{}` in {TABLE}",
                r.request_id, r.tenant
            )
        })
    }

    /// Records up to [`RECORD_BATCH`] requests per multi-row `INSERT` (what [`Recorder`]
    /// writes with): one statement and one commit for the lot.
    pub async fn record_batch(&self, records: &[RequestRecord]) -> Result<(), anyhow::Error> {
        for chunk in records.chunks(RECORD_BATCH) {
            // The statement's text varies with the row count: not worth a prepared-statement
            // cache entry each.
            let done = match &self.pool {
                Pool::Sqlite(pool) => {
                    let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(INSERT_INTO);
                    q.push_values(chunk, |mut row, r| {
                        push_record!(row, r);
                    });
                    q.build().persistent(false).execute(pool).await.map(drop)
                }
                Pool::Postgres(pool) => {
                    let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(INSERT_INTO);
                    q.push_values(chunk, |mut row, r| {
                        push_record!(row, r);
                    });
                    q.build().persistent(false).execute(pool).await.map(drop)
                }
            };
            done.with_context(|| format!("recording {} requests in {TABLE}", chunk.len()))?;
        }
        Ok(())
    }

    /// Keeps a request's (redacted) content.
    pub async fn record_content(&self, c: &ContentRecord) -> Result<(), anyhow::Error> {
        const SQLITE: &str = "INSERT OR REPLACE INTO kiln_gateway_content \
            (request_id, at_us, tenant, model, no_train, prompt, completion) \
            VALUES (?, ?, ?, ?, ?, ?, ?)";
        const POSTGRES: &str = "INSERT INTO kiln_gateway_content \
            (request_id, at_us, tenant, model, no_train, prompt, completion) \
            VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (request_id) DO UPDATE \
            SET prompt = EXCLUDED.prompt, completion = EXCLUDED.completion";
        macro_rules! bind_content {
            ($q:expr) => {
                $q.bind(c.request_id.as_str())
                    .bind(unix_micros(c.at))
                    .bind(c.tenant.as_str())
                    .bind(c.model.as_str())
                    .bind(c.no_train)
                    .bind(c.prompt.as_str())
                    .bind(c.completion.as_deref())
            };
        }
        let done = match &self.pool {
            Pool::Sqlite(pool) => bind_content!(sqlx::query(SQLITE))
                .execute(pool)
                .await
                .map(drop),
            Pool::Postgres(pool) => bind_content!(sqlx::query(POSTGRES))
                .execute(pool)
                .await
                .map(drop),
        };
        done.with_context(|| {
            format!(
                "keeping the content of request {} in {CONTENT_TABLE}",
                c.request_id
            )
        })
    }

    /// The captured content that may become training data: rows of `no_train` keys are left
    /// out, here in the query, so no export can reach them. Oldest first, from `since`.
    pub async fn exportable_content(
        &self,
        since: SystemTime,
    ) -> Result<Vec<ContentRecord>, anyhow::Error> {
        type Row = (String, i64, String, String, bool, String, Option<String>);
        const SQLITE: &str = "SELECT request_id, at_us, tenant, model, no_train, prompt, completion \
            FROM kiln_gateway_content WHERE no_train = 0 AND at_us >= ? ORDER BY at_us";
        const POSTGRES: &str = "SELECT request_id, at_us, tenant, model, no_train, prompt, completion \
            FROM kiln_gateway_content WHERE NOT no_train AND at_us >= $1 ORDER BY at_us";
        let since_us = unix_micros(since);
        let rows: Result<Vec<Row>, sqlx::Error> = match &self.pool {
            Pool::Sqlite(pool) => sqlx::query_as(SQLITE).bind(since_us).fetch_all(pool).await,
            Pool::Postgres(pool) => {
                sqlx::query_as(POSTGRES)
                    .bind(since_us)
                    .fetch_all(pool)
                    .await
            }
        };
        let rows = rows.with_context(|| format!("reading {CONTENT_TABLE}"))?;
        Ok(rows
            .into_iter()
            .map(
                |(request_id, at_us, tenant, model, no_train, prompt, completion)| ContentRecord {
                    request_id,
                    at: UNIX_EPOCH + Duration::from_micros(u64::try_from(at_us).unwrap_or(0)),
                    tenant,
                    model,
                    no_train,
                    prompt,
                    completion,
                },
            )
            .collect())
    }

    /// Total cost in USD of `tenant`'s requests that arrived at or after `since` (requests
    /// without a price count nothing).
    pub async fn spend_since(&self, tenant: &str, since: SystemTime) -> Result<f64, anyhow::Error> {
        let since_us = unix_micros(since);
        let spent = match &self.pool {
            Pool::Sqlite(pool) => {
                sqlx::query_scalar::<_, f64>(SQLITE_SPEND)
                    .bind(tenant)
                    .bind(since_us)
                    .fetch_one(pool)
                    .await
            }
            Pool::Postgres(pool) => {
                sqlx::query_scalar::<_, f64>(POSTGRES_SPEND)
                    .bind(tenant)
                    .bind(since_us)
                    .fetch_one(pool)
                    .await
            }
        };
        spent.with_context(|| format!("summing the spend of tenant `{tenant}` from {TABLE}"))
    }

    /// Closes the pool, waiting for queries in flight (and checkpointing SQLite's WAL).
    pub async fn close(&self) {
        match &self.pool {
            Pool::Sqlite(pool) => pool.close().await,
            Pool::Postgres(pool) => pool.close().await,
        }
    }
}

/// Records requests off the request path: [`Recorder::record`] queues a record without
/// waiting, and one background task writes whatever has queued up, up to [`RECORD_BATCH`] rows
/// in one transaction. At thousands of requests a second that is a commit every few
/// milliseconds instead of one per request. When the queue is full (the store is slower than
/// the traffic) records are dropped and counted, never waited for.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Queued>,
    dropped: Arc<AtomicU64>,
}

/// Rows written in one transaction at most.
pub const RECORD_BATCH: usize = 256;

enum Queued {
    Record(Box<RequestRecord>),
    Flush(oneshot::Sender<()>),
}

impl Recorder {
    /// Starts the writer task (on the current Tokio runtime) with room for `capacity` queued
    /// records.
    pub fn spawn(store: Store, capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        tokio::spawn(write_batches(store, rx, dropped.clone()));
        Self { tx, dropped }
    }

    /// Queues `r` for writing; `false` (and counted in [`Recorder::dropped`]) when the queue is
    /// full or the writer is gone.
    pub fn record(&self, r: RequestRecord) -> bool {
        match self.tx.try_send(Queued::Record(Box::new(r))) {
            Ok(()) => true,
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Records lost so far: dropped from a full queue or refused by the store.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits until every record queued before this call has been written (or failed): for
    /// graceful shutdown and tests.
    pub async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Queued::Flush(ack)).await.is_ok() {
            // An error means the writer stopped: nothing more will be written either way.
            let _ = done.await;
        }
    }
}

async fn write_batches(store: Store, mut rx: mpsc::Receiver<Queued>, dropped: Arc<AtomicU64>) {
    let mut batch = Vec::with_capacity(RECORD_BATCH);
    let mut acks = Vec::new();
    let mut failing = false;
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(queued) = next.take() {
            match queued {
                Queued::Record(r) => batch.push(*r),
                Queued::Flush(ack) => acks.push(ack),
            }
            if batch.len() < RECORD_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            match store.record_batch(&batch).await {
                Ok(()) if failing => {
                    eprintln!("kiln gateway: the request store accepts records again");
                    failing = false;
                }
                Ok(()) => {}
                Err(e) => {
                    dropped.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    if !failing {
                        eprintln!(
                            "kiln gateway: request records are being lost (counted, not retried) \
                             until the store accepts them again: {e:#}"
                        );
                        failing = true;
                    }
                }
            }
            batch.clear();
        }
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
    }
}

async fn connect_sqlite(url: &str) -> Result<SqlitePool, anyhow::Error> {
    let options = SqliteConnectOptions::from_str(url)
        .context("not a valid sqlite URL (expected sqlite://PATH)")?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // With WAL, NORMAL loses at most the last transactions on power loss, never corrupts,
        // and skips an fsync per INSERT.
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(ACQUIRE_TIMEOUT);
    let in_memory = url.contains(":memory:") || url.contains("mode=memory");
    if !in_memory
        && let Some(dir) = options.get_filename().parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating directory {}", dir.display()))?;
    }
    let mut pool = SqlitePoolOptions::new().acquire_timeout(ACQUIRE_TIMEOUT);
    if in_memory {
        // An in-memory database lives as long as a connection to it: keep exactly one, forever.
        pool = pool
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None);
    } else {
        pool = pool.max_connections(4);
    }
    pool.connect_with(options)
        .await
        .with_context(|| format!("opening {}", options_path(url)))
}

fn options_path(url: &str) -> &str {
    let rest = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    rest.split('?').next().unwrap_or(rest)
}

/// Microseconds since the Unix epoch, negative before it, saturating at the i64 range.
fn unix_micros(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_micros())
            .map(|us| -us)
            .unwrap_or(i64::MIN),
    }
}

/// `url` with any password and query string replaced, for error messages and logs.
fn redact(url: &str) -> String {
    let (url, had_query) = match url.split_once('?') {
        Some((base, _)) => (base, true),
        None => (url, false),
    };
    let mut shown = match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    let user = userinfo.split(':').next().unwrap_or_default();
                    let hidden = if userinfo.contains(':') { ":***" } else { "" };
                    format!("{scheme}://{user}{hidden}@{host}{path}")
                }
                None => format!("{scheme}://{rest}"),
            }
        }
        None => url.to_string(),
    };
    if had_query {
        shown.push_str("?…");
    }
    shown
}

/// How long a tenant's budget goes unchecked after the store failed to load its spend, before
/// the next request tries again.
const LOAD_RETRY: Duration = Duration::from_secs(10);

/// The longest a request waits for its tenant's spend to load before it is let through.
const LOAD_TIMEOUT: Duration = Duration::from_secs(3);

/// Per-tenant spending caps.
///
/// Each tenant's spend for the current period is loaded from the store the first time the tenant
/// is checked in that period, then kept in memory and increased by [`Budgets::add`] as requests
/// finish, so [`Budgets::check`] costs a mutex and no query. A new period (the next UTC day or
/// month) reloads from the store. With several replicas, each replica counts its own requests on
/// top of what the store held at its load: a cap is exact per replica and approximate across
/// them until the next period's reload.
///
/// If the store cannot be read the budget is not enforced (logged once per incident) and loading
/// is retried after a few seconds: a store outage never refuses paying traffic.
#[derive(Clone)]
pub struct Budgets {
    inner: Arc<BudgetsInner>,
}

struct BudgetsInner {
    store: Store,
    /// Every budgeted tenant, fixed at construction: lookups need no lock on the map.
    tenants: HashMap<String, Slot>,
}

struct Slot {
    budget: Budget,
    spend: Mutex<Spend>,
    /// Held while the spend is loaded, so that a burst of first requests makes one query.
    loading: tokio::sync::Mutex<()>,
}

#[derive(Clone, Copy)]
enum Spend {
    Unknown,
    Loaded {
        period: SystemTime,
        spent: f64,
    },
    Failed {
        period: SystemTime,
        retry_at: Instant,
    },
}

enum Fast {
    Verdict(Result<(), (f64, f64)>),
    Load { failing: bool },
}

impl Budgets {
    pub fn new(cfg: &std::collections::BTreeMap<String, Budget>, store: Store) -> Self {
        let tenants = cfg
            .iter()
            .map(|(tenant, budget)| {
                let slot = Slot {
                    budget: *budget,
                    spend: Mutex::new(Spend::Unknown),
                    loading: tokio::sync::Mutex::new(()),
                };
                (tenant.clone(), slot)
            })
            .collect();
        Self {
            inner: Arc::new(BudgetsInner { store, tenants }),
        }
    }

    /// `Err((spent, budget))` when `tenant` has spent its whole budget for the current period;
    /// `Ok` for a tenant without a budget.
    pub async fn check(&self, tenant: &str) -> Result<(), (f64, f64)> {
        let Some(slot) = self.inner.tenants.get(tenant) else {
            return Ok(());
        };
        let period = period_start(slot.budget.period, SystemTime::now());
        if let Fast::Verdict(v) = slot.fast(period) {
            return v;
        }
        let _loading = slot.loading.lock().await;
        // Another request may have loaded it while this one waited.
        let failing = match slot.fast(period) {
            Fast::Verdict(v) => return v,
            Fast::Load { failing } => failing,
        };
        let loaded =
            tokio::time::timeout(LOAD_TIMEOUT, self.inner.store.spend_since(tenant, period)).await;
        let spent = match loaded {
            Ok(Ok(spent)) => spent,
            Ok(Err(e)) => return slot.failed(tenant, period, failing, &format!("{e:#}")),
            Err(_) => {
                let why = format!("the store did not answer in {LOAD_TIMEOUT:?}");
                return slot.failed(tenant, period, failing, &why);
            }
        };
        if failing {
            eprintln!("kiln gateway: budget of tenant `{tenant}` is enforced again");
        }
        // Requests that finished while the query ran are in the store, or will be: start from
        // the store's figure.
        *slot.lock() = Spend::Loaded { period, spent };
        slot.verdict(spent)
    }

    /// Adds a finished request's cost to `tenant`'s spend in the current period.
    pub async fn add(&self, tenant: &str, cost_usd: f64) {
        let Some(slot) = self.inner.tenants.get(tenant) else {
            return;
        };
        if !(cost_usd.is_finite() && cost_usd > 0.0) {
            return;
        }
        let period = period_start(slot.budget.period, SystemTime::now());
        // Not loaded for this period: the next load reads this request from the store.
        if let Spend::Loaded { period: p, spent } = &mut *slot.lock()
            && *p == period
        {
            *spent += cost_usd;
        }
    }
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Spend> {
        // The guarded value is plain data, always consistent: a panic elsewhere cannot poison it
        // in a way that matters.
        self.spend.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fast(&self, period: SystemTime) -> Fast {
        match *self.lock() {
            Spend::Loaded { period: p, spent } if p == period => Fast::Verdict(self.verdict(spent)),
            Spend::Failed {
                period: p,
                retry_at,
            } if p == period && Instant::now() < retry_at => Fast::Verdict(Ok(())),
            Spend::Failed { .. } => Fast::Load { failing: true },
            _ => Fast::Load { failing: false },
        }
    }

    fn verdict(&self, spent: f64) -> Result<(), (f64, f64)> {
        if spent >= self.budget.budget_usd {
            Err((spent, self.budget.budget_usd))
        } else {
            Ok(())
        }
    }

    fn failed(
        &self,
        tenant: &str,
        period: SystemTime,
        already_failing: bool,
        why: &str,
    ) -> Result<(), (f64, f64)> {
        if !already_failing {
            eprintln!(
                "kiln gateway: budget of tenant `{tenant}` not enforced until the store answers \
                 (retrying every {}s): {why}",
                LOAD_RETRY.as_secs()
            );
        }
        *self.lock() = Spend::Failed {
            period,
            retry_at: Instant::now() + LOAD_RETRY,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_messages_hide_passwords() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/gw?sslmode=require"),
            "postgres://app:***@db:5432/gw?…"
        );
        assert_eq!(
            redact("postgres://postgres@127.0.0.1/test"),
            "postgres://postgres@127.0.0.1/test"
        );
        assert_eq!(redact("sqlite://gw.db"), "sqlite://gw.db");
    }

    #[test]
    fn micros_are_signed_around_the_epoch() {
        assert_eq!(unix_micros(UNIX_EPOCH + Duration::from_millis(3)), 3_000);
        assert_eq!(unix_micros(UNIX_EPOCH - Duration::from_micros(7)), -7);
    }
}
