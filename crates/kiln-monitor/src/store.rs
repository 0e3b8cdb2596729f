//! The trace store: one record per request, in SQLite (a file, the default) or PostgreSQL (one
//! database for every gateway replica), chosen by the gateway's `store.url`.
//!
//! A trace holds ids, the tenant, the model and upstream, the status, token counts, cost, the
//! latency split (the gateway's own time, the upstream's queue, the first token, the whole
//! request), the cache result, the guardrails' verdicts and the confidence signals of the reply
//! (mean token log-prob and entropy, the probability it is wrong, how much of it the request's
//! context supports) — never a prompt or a completion. `no_train` is kept on every row so that a
//! data export can leave out the tenants whose traffic must never become training data. Content
//! is kept only when `store.capture_content` is on, in a second table ([`CONTENT_TABLE`]), after
//! the PII scrubber, and [`Store::exportable_content`] never returns the rows of `no_train` keys.
//!
//! Nothing here runs on the request path: [`Recorder`] queues traces (and content) without
//! waiting and writes them in multi-row batches from one background task (5,000 records on two
//! cores: 0.05 s instead of 0.45 s of single `INSERT`s on SQLite, 0.2 s instead of 1.1 s on
//! PostgreSQL); when its bounded queue is full, records are dropped and counted.
//!
//! Times are stored as microseconds since the Unix epoch (`at_us`, a 64-bit integer), the one
//! representation both databases index and compare the same way. Tables made by earlier
//! versions gain the newer columns when a store connects.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use tokio::sync::{mpsc, oneshot};

/// The table every request is recorded in.
pub const TABLE: &str = "kiln_gateway_requests";

/// One finished (or refused) request: a trace. No prompt or completion text: only what
/// metering, budgets, audits and monitoring need.
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
    /// `chat` or `text_completion` (the GenAI operation name).
    pub operation: Option<String>,
    /// The whole request as the client saw it, to its last byte.
    pub total_ms: Option<f64>,
    /// Time the upstream kept the request waiting before it ran (kiln serve reports it).
    pub queue_ms: Option<f64>,
    /// Time to the first token: measured by the gateway on streams, reported by kiln serve.
    pub ttft_ms: Option<f64>,
    /// Mean log-prob and mean entropy (nats) of the reply's tokens.
    pub mean_logprob: Option<f64>,
    pub mean_entropy: Option<f64>,
    /// The calibrated probability that the reply is wrong, from its confidence.
    pub p_wrong: Option<f64>,
    /// The share of the reply's content that the request's context supports, when it had one.
    pub grounding: Option<f64>,
    /// The hallucination flag, when the reply was assessed.
    pub hallucination: Option<bool>,
    /// The reply's own `id` (`chatcmpl-…`, `cmpl-…`), what clients give feedback on.
    pub completion_id: Option<String>,
}

impl Default for RequestRecord {
    /// An empty record at the Unix epoch, for building one field by field.
    fn default() -> Self {
        Self {
            request_id: String::new(),
            at: UNIX_EPOCH,
            tenant: String::new(),
            key_id: String::new(),
            model: String::new(),
            upstream: None,
            status: 0,
            stream: false,
            cache_hit: false,
            prompt_tokens: 0,
            completion_tokens: 0,
            cost_usd: None,
            gateway_ms: 0.0,
            upstream_ms: None,
            no_train: false,
            guard: None,
            operation: None,
            total_ms: None,
            queue_ms: None,
            ttft_ms: None,
            mean_logprob: None,
            mean_entropy: None,
            p_wrong: None,
            grounding: None,
            hallucination: None,
            completion_id: None,
        }
    }
}

/// The columns added after the first release, with their SQLite and PostgreSQL types: tables
/// made before them gain them on connect.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("guard", "TEXT", "TEXT"),
    ("operation", "TEXT", "TEXT"),
    ("total_ms", "REAL", "DOUBLE PRECISION"),
    ("queue_ms", "REAL", "DOUBLE PRECISION"),
    ("ttft_ms", "REAL", "DOUBLE PRECISION"),
    ("mean_logprob", "REAL", "DOUBLE PRECISION"),
    ("mean_entropy", "REAL", "DOUBLE PRECISION"),
    ("p_wrong", "REAL", "DOUBLE PRECISION"),
    ("grounding", "REAL", "DOUBLE PRECISION"),
    ("hallucination", "BOOLEAN", "BOOLEAN"),
    ("completion_id", "TEXT", "TEXT"),
];

/// The columns the content table gained after its first release.
const ADDED_CONTENT_COLUMNS: &[(&str, &str, &str)] = &[
    ("completion_id", "TEXT", "TEXT"),
    ("choices", "TEXT", "TEXT"),
];

/// Indexes on columns added by a migration: created after the columns exist.
const ADDED_INDEXES: &[&str] = &[
    "CREATE INDEX IF NOT EXISTS kiln_gateway_requests_completion
        ON kiln_gateway_requests (completion_id)",
    "CREATE INDEX IF NOT EXISTS kiln_gateway_requests_request
        ON kiln_gateway_requests (request_id)",
];

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
    /// The reply's own `id`, as in the trace.
    pub completion_id: Option<String>,
    /// Every choice's text, redacted, when the request asked for several (`n` > 1); empty
    /// otherwise (the one reply is `completion`).
    pub choices: Vec<String>,
}

/// The request store: a SQLite file or a PostgreSQL database. Cheap to clone (a pool handle).
#[derive(Debug, Clone)]
pub struct Store {
    pub(crate) pool: Pool,
}

#[derive(Debug, Clone)]
pub(crate) enum Pool {
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
        no_train BOOLEAN NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS kiln_gateway_requests_tenant_at
        ON kiln_gateway_requests (tenant, at_us)",
    CONTENT_SCHEMA,
    crate::feedback::SQLITE_SCHEMA,
    crate::feedback::SQLITE_INDEX,
    crate::registry::SQLITE_SCHEMA,
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
        no_train BOOLEAN NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS kiln_gateway_requests_tenant_at
        ON kiln_gateway_requests (tenant, at_us)",
    CONTENT_SCHEMA_PG,
    crate::feedback::POSTGRES_SCHEMA,
    crate::feedback::SQLITE_INDEX,
    crate::registry::POSTGRES_SCHEMA,
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

/// The columns a [`ContentRow`] is read from, in its order.
pub(crate) const CONTENT_COLUMNS: &str =
    "request_id, at_us, tenant, model, no_train, prompt, completion, completion_id, choices";

/// A row of `SELECT CONTENT_COLUMNS`.
pub(crate) type ContentRow = (
    String,
    i64,
    String,
    String,
    bool,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// A [`ContentRecord`] from its row; a `choices` column that is not a JSON list of strings
/// reads as none.
pub(crate) fn content_from_row(row: ContentRow) -> ContentRecord {
    let (request_id, at_us, tenant, model, no_train, prompt, completion, completion_id, choices) =
        row;
    ContentRecord {
        request_id,
        at: from_unix_micros(at_us),
        tenant,
        model,
        no_train,
        prompt,
        completion,
        completion_id,
        choices: choices
            .and_then(|c| serde_json::from_str(&c).ok())
            .unwrap_or_default(),
    }
}

/// The head of a multi-row INSERT (the builder appends `VALUES (…), (…)`).
const INSERT_INTO: &str = "INSERT INTO kiln_gateway_requests (request_id, at_us, tenant, \
    key_id, model, upstream, status, stream, cache_hit, prompt_tokens, completion_tokens, \
    cost_usd, gateway_ms, upstream_ms, no_train, guard, operation, total_ms, queue_ms, ttft_ms, \
    mean_logprob, mean_entropy, p_wrong, grounding, hallucination, completion_id) ";

const SQLITE_INSERT: &str = "INSERT INTO kiln_gateway_requests (request_id, at_us, tenant, \
    key_id, model, upstream, status, stream, cache_hit, prompt_tokens, completion_tokens, \
    cost_usd, gateway_ms, upstream_ms, no_train, guard, operation, total_ms, queue_ms, ttft_ms, \
    mean_logprob, mean_entropy, p_wrong, grounding, hallucination, completion_id) \
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

const POSTGRES_INSERT: &str = "INSERT INTO kiln_gateway_requests (request_id, at_us, tenant, \
    key_id, model, upstream, status, stream, cache_hit, prompt_tokens, completion_tokens, \
    cost_usd, gateway_ms, upstream_ms, no_train, guard, operation, total_ms, queue_ms, ttft_ms, \
    mean_logprob, mean_entropy, p_wrong, grounding, hallucination, completion_id) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
    $17, $18, $19, $20, $21, $22, $23, $24, $25, $26)";

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
            .$bind(r.operation.as_deref())
            .$bind(finite(r.total_ms))
            .$bind(finite(r.queue_ms))
            .$bind(finite(r.ttft_ms))
            .$bind(finite(r.mean_logprob))
            .$bind(finite(r.mean_entropy))
            .$bind(finite(r.p_wrong))
            .$bind(finite(r.grounding))
            .$bind(r.hallucination)
            .$bind(r.completion_id.as_deref())
    }};
}

/// The columns [`Store::traces`] reads, in the order `trace_from_row!` expects.
const TRACE_COLUMNS: &str = "request_id, at_us, tenant, key_id, model, upstream, status, stream, \
    cache_hit, prompt_tokens, completion_tokens, cost_usd, gateway_ms, upstream_ms, no_train, \
    guard, operation, total_ms, queue_ms, ttft_ms, mean_logprob, mean_entropy, p_wrong, \
    grounding, hallucination, completion_id";

/// A [`RequestRecord`] from a row of `SELECT TRACE_COLUMNS`, as `Result<_, sqlx::Error>`.
macro_rules! trace_from_row {
    ($row:expr) => {{
        use sqlx::Row;
        let row = $row;
        let at_us: i64 = row.try_get("at_us")?;
        let count = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok::<_, sqlx::Error>(RequestRecord {
            request_id: row.try_get("request_id")?,
            at: from_unix_micros(at_us),
            tenant: row.try_get("tenant")?,
            key_id: row.try_get("key_id")?,
            model: row.try_get("model")?,
            upstream: row.try_get("upstream")?,
            status: u16::try_from(row.try_get::<i32, _>("status")?).unwrap_or(0),
            stream: row.try_get("stream")?,
            cache_hit: row.try_get("cache_hit")?,
            prompt_tokens: count(row.try_get("prompt_tokens")?),
            completion_tokens: count(row.try_get("completion_tokens")?),
            cost_usd: row.try_get("cost_usd")?,
            gateway_ms: row.try_get("gateway_ms")?,
            upstream_ms: row.try_get("upstream_ms")?,
            no_train: row.try_get("no_train")?,
            guard: row.try_get("guard")?,
            operation: row.try_get("operation")?,
            total_ms: row.try_get("total_ms")?,
            queue_ms: row.try_get("queue_ms")?,
            ttft_ms: row.try_get("ttft_ms")?,
            mean_logprob: row.try_get("mean_logprob")?,
            mean_entropy: row.try_get("mean_entropy")?,
            p_wrong: row.try_get("p_wrong")?,
            grounding: row.try_get("grounding")?,
            hallucination: row.try_get("hallucination")?,
            completion_id: row.try_get("completion_id")?,
        })
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
                // SQLite has no `ADD COLUMN IF NOT EXISTS`.
                let columns: Vec<String> = sqlx::query_scalar(
                    "SELECT name FROM pragma_table_info('kiln_gateway_requests')",
                )
                .fetch_all(pool)
                .await?;
                for (name, sqlite_type, _) in ADDED_COLUMNS {
                    if !columns.iter().any(|c| c == name) {
                        let add = format!(
                            "ALTER TABLE kiln_gateway_requests ADD COLUMN {name} {sqlite_type}"
                        );
                        sqlx::query(&add).execute(pool).await?;
                    }
                }
                let columns: Vec<String> = sqlx::query_scalar(
                    "SELECT name FROM pragma_table_info('kiln_gateway_content')",
                )
                .fetch_all(pool)
                .await?;
                for (name, sqlite_type, _) in ADDED_CONTENT_COLUMNS {
                    if !columns.iter().any(|c| c == name) {
                        let add = format!(
                            "ALTER TABLE kiln_gateway_content ADD COLUMN {name} {sqlite_type}"
                        );
                        sqlx::query(&add).execute(pool).await?;
                    }
                }
                for index in ADDED_INDEXES {
                    sqlx::query(index).execute(pool).await?;
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
                for (name, _, pg_type) in ADDED_COLUMNS {
                    let add = format!(
                        "ALTER TABLE kiln_gateway_requests ADD COLUMN IF NOT EXISTS {name} {pg_type}"
                    );
                    sqlx::query(&add).execute(&mut *tx).await?;
                }
                for (name, _, pg_type) in ADDED_CONTENT_COLUMNS {
                    let add = format!(
                        "ALTER TABLE kiln_gateway_content ADD COLUMN IF NOT EXISTS {name} {pg_type}"
                    );
                    sqlx::query(&add).execute(&mut *tx).await?;
                }
                for index in ADDED_INDEXES {
                    sqlx::query(index).execute(&mut *tx).await?;
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
            (request_id, at_us, tenant, model, no_train, prompt, completion, completion_id, \
            choices) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)";
        const POSTGRES: &str = "INSERT INTO kiln_gateway_content \
            (request_id, at_us, tenant, model, no_train, prompt, completion, completion_id, \
            choices) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (request_id) \
            DO UPDATE SET prompt = EXCLUDED.prompt, completion = EXCLUDED.completion, \
            completion_id = EXCLUDED.completion_id, choices = EXCLUDED.choices";
        let choices =
            (!c.choices.is_empty()).then(|| serde_json::to_string(&c.choices).unwrap_or_default());
        macro_rules! bind_content {
            ($q:expr) => {
                $q.bind(c.request_id.as_str())
                    .bind(unix_micros(c.at))
                    .bind(c.tenant.as_str())
                    .bind(c.model.as_str())
                    .bind(c.no_train)
                    .bind(c.prompt.as_str())
                    .bind(c.completion.as_deref())
                    .bind(c.completion_id.as_deref())
                    .bind(choices.as_deref())
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
        let select = format!(
            "SELECT {CONTENT_COLUMNS} FROM {CONTENT_TABLE} \
             WHERE NOT no_train AND at_us >= {} ORDER BY at_us",
            self.placeholder(1)
        );
        let since_us = unix_micros(since);
        let rows: Result<Vec<ContentRow>, sqlx::Error> = match &self.pool {
            Pool::Sqlite(pool) => sqlx::query_as(&select).bind(since_us).fetch_all(pool).await,
            Pool::Postgres(pool) => sqlx::query_as(&select).bind(since_us).fetch_all(pool).await,
        };
        let rows = rows.with_context(|| format!("reading {CONTENT_TABLE}"))?;
        Ok(rows.into_iter().map(content_from_row).collect())
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

    /// The traces of requests that arrived in `[since, until)`, oldest first, at most `limit`.
    pub async fn traces(
        &self,
        since: SystemTime,
        until: SystemTime,
        limit: usize,
    ) -> Result<Vec<RequestRecord>, anyhow::Error> {
        let (since_us, until_us) = (unix_micros(since), unix_micros(until));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let select = format!(
            "SELECT {TRACE_COLUMNS} FROM {TABLE} WHERE at_us >= {} AND at_us < {} \
             ORDER BY at_us LIMIT {}",
            self.placeholder(1),
            self.placeholder(2),
            self.placeholder(3)
        );
        let rows = match &self.pool {
            Pool::Sqlite(pool) => sqlx::query(&select)
                .bind(since_us)
                .bind(until_us)
                .bind(limit)
                .fetch_all(pool)
                .await
                .and_then(|rows| rows.iter().map(|r| trace_from_row!(r)).collect()),
            Pool::Postgres(pool) => sqlx::query(&select)
                .bind(since_us)
                .bind(until_us)
                .bind(limit)
                .fetch_all(pool)
                .await
                .and_then(|rows| rows.iter().map(|r| trace_from_row!(r)).collect()),
        };
        rows.with_context(|| format!("reading traces from {TABLE}"))
    }

    /// The `n`-th bind placeholder of this store's SQL dialect.
    pub(crate) fn placeholder(&self, n: usize) -> String {
        match self.pool {
            Pool::Sqlite(_) => "?".to_string(),
            Pool::Postgres(_) => format!("${n}"),
        }
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
    Content(Box<ContentRecord>),
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

    /// Queues a request's (already scrubbed) content; `false` (and counted) like
    /// [`Recorder::record`].
    pub fn record_content(&self, c: ContentRecord) -> bool {
        match self.tx.try_send(Queued::Content(Box::new(c))) {
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
    let mut contents = Vec::new();
    let mut acks = Vec::new();
    let mut failing = false;
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(queued) = next.take() {
            match queued {
                Queued::Record(r) => batch.push(*r),
                Queued::Content(c) => contents.push(*c),
                Queued::Flush(ack) => acks.push(ack),
            }
            if batch.len() < RECORD_BATCH && contents.len() < RECORD_BATCH {
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
        for c in contents.drain(..) {
            if let Err(e) = store.record_content(&c).await {
                dropped.fetch_add(1, Ordering::Relaxed);
                eprintln!("kiln gateway: {e:#}");
            }
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

/// The time `us` microseconds after the Unix epoch (before it when negative).
pub(crate) fn from_unix_micros(us: i64) -> SystemTime {
    if us >= 0 {
        UNIX_EPOCH + Duration::from_micros(us.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_micros(us.unsigned_abs())
    }
}

/// `v` when it is a finite number: NaN and infinities are stored as NULL.
fn finite(v: Option<f64>) -> Option<f64> {
    v.filter(|x| x.is_finite())
}

/// Microseconds since the Unix epoch, negative before it, saturating at the i64 range.
pub(crate) fn unix_micros(t: SystemTime) -> i64 {
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
