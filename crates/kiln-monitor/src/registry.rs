//! The model registry: one row per round of the feedback loop — the base model, the candidate
//! adapter, the adapter it would replace, a hash of the data it was trained on, its evaluation
//! against the serving model, and the decision (promoted, rejected or rolled back) with its
//! reason. `kiln models list` reads it; `kiln loop` writes it and reads which adapter serves.

use std::time::SystemTime;

use anyhow::Context;
use serde::Serialize;

use crate::store::{Pool, Store, from_unix_micros, unix_micros};

/// The registry's table.
pub const REGISTRY_TABLE: &str = "kiln_model_registry";

pub(crate) const SQLITE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS kiln_model_registry (
        round INTEGER PRIMARY KEY,
        at_us INTEGER NOT NULL,
        served_name TEXT NOT NULL,
        base TEXT NOT NULL,
        adapter TEXT NOT NULL,
        parent TEXT,
        data_snapshot TEXT NOT NULL,
        data_rows BIGINT NOT NULL,
        metrics TEXT NOT NULL,
        decision TEXT NOT NULL,
        reason TEXT NOT NULL
    )";

pub(crate) const POSTGRES_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS kiln_model_registry (
        round BIGSERIAL PRIMARY KEY,
        at_us BIGINT NOT NULL,
        served_name TEXT NOT NULL,
        base TEXT NOT NULL,
        adapter TEXT NOT NULL,
        parent TEXT,
        data_snapshot TEXT NOT NULL,
        data_rows BIGINT NOT NULL,
        metrics TEXT NOT NULL,
        decision TEXT NOT NULL,
        reason TEXT NOT NULL
    )";

const COLUMNS: &str = "at_us, served_name, base, adapter, parent, data_snapshot, data_rows, metrics, decision, reason";

/// The candidate won and now serves.
pub const PROMOTED: &str = "promoted";
/// The candidate did not win by the margin (or failed a gate): the serving model stays.
pub const REJECTED: &str = "rejected";
/// The candidate was promoted, failed its check after the swap, and the previous adapter was
/// put back.
pub const ROLLED_BACK: &str = "rolled_back";

/// One round of the loop.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelRecord {
    /// Assigned by the registry (1, 2, …); ignored by [`Store::register_model`].
    pub round: i64,
    #[serde(serialize_with = "serialize_time")]
    pub at: SystemTime,
    /// The name the model is served under (the adapter name swapped on `kiln serve`).
    pub served_name: String,
    /// The base model directory (or hub id).
    pub base: String,
    /// The candidate adapter's directory.
    pub adapter: String,
    /// The adapter serving when the round started; `None`: the base model alone.
    pub parent: Option<String>,
    /// SHA-256 of the exported training data, hex.
    pub data_snapshot: String,
    pub data_rows: u64,
    /// The evaluation: win rate, guard pass rates, perplexities, margins (JSON object).
    pub metrics: serde_json::Value,
    /// [`PROMOTED`], [`REJECTED`] or [`ROLLED_BACK`].
    pub decision: String,
    pub reason: String,
}

fn serialize_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
    )
}

type Row = (
    i64,
    i64,
    String,
    String,
    String,
    Option<String>,
    String,
    i64,
    String,
    String,
    String,
);

impl Store {
    /// Records a round; returns its number.
    pub async fn register_model(&self, r: &ModelRecord) -> Result<i64, anyhow::Error> {
        let marks: Vec<String> = (1..=10).map(|i| self.placeholder(i)).collect();
        let insert = format!(
            "INSERT INTO {REGISTRY_TABLE} ({COLUMNS}) VALUES ({}) RETURNING round",
            marks.join(", ")
        );
        let metrics = r.metrics.to_string();
        macro_rules! bind_model {
            ($q:expr) => {
                $q.bind(unix_micros(r.at))
                    .bind(r.served_name.as_str())
                    .bind(r.base.as_str())
                    .bind(r.adapter.as_str())
                    .bind(r.parent.as_deref())
                    .bind(r.data_snapshot.as_str())
                    .bind(i64::try_from(r.data_rows).unwrap_or(i64::MAX))
                    .bind(metrics.as_str())
                    .bind(r.decision.as_str())
                    .bind(r.reason.as_str())
            };
        }
        let round = match &self.pool {
            Pool::Sqlite(pool) => {
                bind_model!(sqlx::query_scalar::<_, i64>(&insert))
                    .fetch_one(pool)
                    .await
            }
            Pool::Postgres(pool) => {
                bind_model!(sqlx::query_scalar::<_, i64>(&insert))
                    .fetch_one(pool)
                    .await
            }
        };
        round.with_context(|| format!("recording a round in {REGISTRY_TABLE}"))
    }

    /// Every round, oldest first.
    pub async fn models(&self) -> Result<Vec<ModelRecord>, anyhow::Error> {
        let select = format!("SELECT round, {COLUMNS} FROM {REGISTRY_TABLE} ORDER BY round");
        let rows: Result<Vec<Row>, sqlx::Error> = match &self.pool {
            Pool::Sqlite(pool) => sqlx::query_as(&select).fetch_all(pool).await,
            Pool::Postgres(pool) => sqlx::query_as(&select).fetch_all(pool).await,
        };
        let rows = rows.with_context(|| format!("reading {REGISTRY_TABLE}"))?;
        Ok(rows
            .into_iter()
            .map(
                |(
                    round,
                    at_us,
                    served_name,
                    base,
                    adapter,
                    parent,
                    data_snapshot,
                    data_rows,
                    metrics,
                    decision,
                    reason,
                )| ModelRecord {
                    round,
                    at: from_unix_micros(at_us),
                    served_name,
                    base,
                    adapter,
                    parent,
                    data_snapshot,
                    data_rows: u64::try_from(data_rows).unwrap_or(0),
                    metrics: serde_json::from_str(&metrics).unwrap_or(serde_json::Value::Null),
                    decision,
                    reason,
                },
            )
            .collect())
    }

    /// The last promoted round for `served_name`: the adapter that serves under it now.
    pub async fn serving_model(
        &self,
        served_name: &str,
    ) -> Result<Option<ModelRecord>, anyhow::Error> {
        Ok(self
            .models()
            .await?
            .into_iter()
            .rev()
            .find(|m| m.served_name == served_name && m.decision == PROMOTED))
    }
}
