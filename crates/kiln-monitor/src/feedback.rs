//! Feedback on completions, kept beside the traces: what `POST /v1/feedback` and the labelling
//! page write, and what `kiln feedback export` and the labelling queue read.
//!
//! A feedback record points at one trace (the gateway's request id) and carries any of a thumb
//! (`up` / `down`), a score, a correction (a better reply, scrubbed before it is stored), the
//! index of the preferred choice among the `n` a request asked for, or, from the labelling page,
//! the request whose reply lost a side-by-side comparison (`compared_with`). `no_train` is
//! copied from the trace so that exports leave such rows out in the query itself.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::store::{
    CONTENT_COLUMNS, CONTENT_TABLE, ContentRecord, ContentRow, Pool, Store, TABLE,
    content_from_row, from_unix_micros, unix_micros,
};

/// The table feedback is kept in.
pub const FEEDBACK_TABLE: &str = "kiln_gateway_feedback";

pub(crate) const SQLITE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS kiln_gateway_feedback (
        id INTEGER PRIMARY KEY,
        feedback_id TEXT NOT NULL,
        at_us INTEGER NOT NULL,
        request_id TEXT NOT NULL,
        completion_id TEXT,
        tenant TEXT NOT NULL,
        key_id TEXT NOT NULL,
        source TEXT NOT NULL,
        thumbs TEXT,
        score REAL,
        correction TEXT,
        preferred_index INTEGER,
        compared_with TEXT,
        no_train BOOLEAN NOT NULL
    )";

pub(crate) const POSTGRES_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS kiln_gateway_feedback (
        id BIGSERIAL PRIMARY KEY,
        feedback_id TEXT NOT NULL,
        at_us BIGINT NOT NULL,
        request_id TEXT NOT NULL,
        completion_id TEXT,
        tenant TEXT NOT NULL,
        key_id TEXT NOT NULL,
        source TEXT NOT NULL,
        thumbs TEXT,
        score DOUBLE PRECISION,
        correction TEXT,
        preferred_index INTEGER,
        compared_with TEXT,
        no_train BOOLEAN NOT NULL
    )";

/// The same statement serves both databases.
pub(crate) const SQLITE_INDEX: &str = "CREATE INDEX IF NOT EXISTS kiln_gateway_feedback_request
        ON kiln_gateway_feedback (request_id)";

const FEEDBACK_COLUMNS: &str = "feedback_id, at_us, request_id, completion_id, tenant, key_id, \
    source, thumbs, score, correction, preferred_index, compared_with, no_train";

/// Content rows read per `IN (…)` query.
const IN_CHUNK: usize = 500;

/// A thumb on a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Thumbs {
    Up,
    Down,
}

impl Thumbs {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "up" => Some(Self::Up),
            "down" => Some(Self::Down),
            _ => None,
        }
    }
}

/// Where a feedback record came from.
pub const SOURCE_API: &str = "api";
/// A person on the dashboard's labelling page.
pub const SOURCE_LABEL: &str = "label";

/// One piece of feedback on one completion.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Feedback {
    pub feedback_id: String,
    #[serde(serialize_with = "serialize_time")]
    pub at: SystemTime,
    /// The trace (the gateway's request id) the feedback is about.
    pub request_id: String,
    /// The reply's own id, when the trace has one.
    pub completion_id: Option<String>,
    pub tenant: String,
    /// Who gave it: the caller's API key id or token subject, or `dashboard` for a labeller.
    pub key_id: String,
    /// [`SOURCE_API`] or [`SOURCE_LABEL`].
    pub source: String,
    pub thumbs: Option<Thumbs>,
    pub score: Option<f64>,
    /// A better reply, already scrubbed of personal data.
    pub correction: Option<String>,
    /// The preferred choice among the `n` the request asked for.
    pub preferred_index: Option<u32>,
    /// From a side-by-side comparison of two requests: the request whose reply lost.
    pub compared_with: Option<String>,
    /// Copied from the trace: the tenant's traffic must never become training data.
    pub no_train: bool,
}

fn serialize_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
    )
}

impl Feedback {
    /// A fresh id, `fb-` and 16 hex digits.
    pub fn new_id() -> String {
        format!("fb-{:016x}", rand::random::<u64>())
    }
}

/// A trace a client may give feedback on.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRef {
    pub request_id: String,
    pub completion_id: Option<String>,
    pub tenant: String,
    pub key_id: String,
    pub model: String,
    pub status: u16,
    pub no_train: bool,
}

/// A feedback record with the content it is about, for an export.
#[derive(Debug, Clone)]
pub struct FeedbackItem {
    pub feedback: Feedback,
    /// The request's captured content; `None` when content was not captured.
    pub content: Option<ContentRecord>,
    /// The content of `compared_with`, when the feedback has one.
    pub other: Option<ContentRecord>,
}

/// What an export reads: the feedback that may become training data, and how much was left out.
#[derive(Debug, Clone, Default)]
pub struct FeedbackExport {
    pub items: Vec<FeedbackItem>,
    /// Feedback of `no_train` keys in the same period, left out by the query.
    pub excluded_no_train: u64,
}

/// One reply on the labelling page.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelReply {
    pub request_id: String,
    pub completion_id: Option<String>,
    /// The choice's index, when both replies are choices of one request.
    pub index: Option<u32>,
    pub model: String,
    pub text: String,
}

/// Two replies to one prompt for a person to compare.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelItem {
    pub tenant: String,
    /// The prompt as captured: a chat request's messages as JSON, or a completion prompt.
    pub prompt: String,
    pub a: LabelReply,
    pub b: LabelReply,
}

type FeedbackRow = (
    String,
    i64,
    String,
    Option<String>,
    String,
    String,
    String,
    Option<String>,
    Option<f64>,
    Option<String>,
    Option<i32>,
    Option<String>,
    bool,
);

fn feedback_from_row(row: FeedbackRow) -> Feedback {
    let (
        feedback_id,
        at_us,
        request_id,
        completion_id,
        tenant,
        key_id,
        source,
        thumbs,
        score,
        correction,
        preferred_index,
        compared_with,
        no_train,
    ) = row;
    Feedback {
        feedback_id,
        at: from_unix_micros(at_us),
        request_id,
        completion_id,
        tenant,
        key_id,
        source,
        thumbs: thumbs.as_deref().and_then(Thumbs::parse),
        score,
        correction,
        preferred_index: preferred_index.and_then(|i| u32::try_from(i).ok()),
        compared_with,
        no_train,
    }
}

/// Runs `$sql` (with `$binds` bound in order) on either pool with `fetch_all`, as
/// `Result<Vec<$row>, sqlx::Error>`.
macro_rules! fetch_all {
    ($store:expr, $row:ty, $sql:expr $(, $bind:expr)*) => {
        match &$store.pool {
            Pool::Sqlite(pool) => {
                sqlx::query_as::<_, $row>($sql)$(.bind($bind))*.fetch_all(pool).await
            }
            Pool::Postgres(pool) => {
                sqlx::query_as::<_, $row>($sql)$(.bind($bind))*.fetch_all(pool).await
            }
        }
    };
}

impl Store {
    /// The traces whose reply id or gateway request id is `id`, newest first (a cached reply
    /// carries the id of the reply it repeats, so one id may name several traces).
    pub async fn find_completion(&self, id: &str) -> Result<Vec<CompletionRef>, anyhow::Error> {
        type Row = (String, Option<String>, String, String, String, i32, bool);
        let select = format!(
            "SELECT request_id, completion_id, tenant, key_id, model, status, no_train FROM {TABLE} \
             WHERE completion_id = {} OR request_id = {} ORDER BY at_us DESC LIMIT 50",
            self.placeholder(1),
            self.placeholder(2)
        );
        let rows = fetch_all!(self, Row, &select, id, id)
            .with_context(|| format!("looking up completion `{id}` in {TABLE}"))?;
        Ok(rows
            .into_iter()
            .map(
                |(request_id, completion_id, tenant, key_id, model, status, no_train)| {
                    CompletionRef {
                        request_id,
                        completion_id,
                        tenant,
                        key_id,
                        model,
                        status: u16::try_from(status).unwrap_or(0),
                        no_train,
                    }
                },
            )
            .collect())
    }

    /// The captured content of one request, if any was kept.
    pub async fn content(&self, request_id: &str) -> Result<Option<ContentRecord>, anyhow::Error> {
        Ok(self
            .contents(&[request_id.to_string()])
            .await?
            .remove(request_id))
    }

    /// The captured content of `request_ids` (those that have some), by request id.
    async fn contents(
        &self,
        request_ids: &[String],
    ) -> Result<HashMap<String, ContentRecord>, anyhow::Error> {
        let mut found = HashMap::new();
        for chunk in request_ids.chunks(IN_CHUNK) {
            let marks: Vec<String> = (1..=chunk.len()).map(|i| self.placeholder(i)).collect();
            let select = format!(
                "SELECT {CONTENT_COLUMNS} FROM {CONTENT_TABLE} WHERE request_id IN ({})",
                marks.join(", ")
            );
            let rows: Vec<ContentRow> = match &self.pool {
                Pool::Sqlite(pool) => {
                    let mut q = sqlx::query_as::<_, ContentRow>(&select);
                    for id in chunk {
                        q = q.bind(id);
                    }
                    q.fetch_all(pool).await
                }
                Pool::Postgres(pool) => {
                    let mut q = sqlx::query_as::<_, ContentRow>(&select);
                    for id in chunk {
                        q = q.bind(id);
                    }
                    q.fetch_all(pool).await
                }
            }
            .with_context(|| format!("reading {CONTENT_TABLE}"))?;
            for row in rows {
                let c = content_from_row(row);
                found.insert(c.request_id.clone(), c);
            }
        }
        Ok(found)
    }

    /// Keeps one feedback record.
    pub async fn record_feedback(&self, f: &Feedback) -> Result<(), anyhow::Error> {
        let marks: Vec<String> = (1..=13).map(|i| self.placeholder(i)).collect();
        let insert = format!(
            "INSERT INTO {FEEDBACK_TABLE} ({FEEDBACK_COLUMNS}) VALUES ({})",
            marks.join(", ")
        );
        macro_rules! bind_feedback {
            ($q:expr) => {
                $q.bind(f.feedback_id.as_str())
                    .bind(unix_micros(f.at))
                    .bind(f.request_id.as_str())
                    .bind(f.completion_id.as_deref())
                    .bind(f.tenant.as_str())
                    .bind(f.key_id.as_str())
                    .bind(f.source.as_str())
                    .bind(f.thumbs.map(Thumbs::as_str))
                    .bind(f.score.filter(|s| s.is_finite()))
                    .bind(f.correction.as_deref())
                    .bind(
                        f.preferred_index
                            .map(|i| i32::try_from(i).unwrap_or(i32::MAX)),
                    )
                    .bind(f.compared_with.as_deref())
                    .bind(f.no_train)
            };
        }
        let done = match &self.pool {
            Pool::Sqlite(pool) => bind_feedback!(sqlx::query(&insert))
                .execute(pool)
                .await
                .map(drop),
            Pool::Postgres(pool) => bind_feedback!(sqlx::query(&insert))
                .execute(pool)
                .await
                .map(drop),
        };
        done.with_context(|| {
            format!(
                "keeping feedback on request {} in {FEEDBACK_TABLE}",
                f.request_id
            )
        })
    }

    /// Feedback given at or after `since`, oldest first, at most `limit` records (`no_train`
    /// ones included: for audits and tests, never for an export).
    pub async fn feedback(
        &self,
        since: SystemTime,
        limit: usize,
    ) -> Result<Vec<Feedback>, anyhow::Error> {
        let select = format!(
            "SELECT {FEEDBACK_COLUMNS} FROM {FEEDBACK_TABLE} WHERE at_us >= {} \
             ORDER BY at_us, id LIMIT {}",
            self.placeholder(1),
            self.placeholder(2)
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = fetch_all!(self, FeedbackRow, &select, unix_micros(since), limit)
            .with_context(|| format!("reading {FEEDBACK_TABLE}"))?;
        Ok(rows.into_iter().map(feedback_from_row).collect())
    }

    /// The feedback given at or after `since` that may become training data, oldest first,
    /// each with the content it is about. Rows of `no_train` keys are left out here, in the
    /// queries (the feedback's own flag and its content's), so no export can reach them.
    pub async fn feedback_for_export(
        &self,
        since: SystemTime,
    ) -> Result<FeedbackExport, anyhow::Error> {
        let since_us = unix_micros(since);
        let select = format!(
            "SELECT {FEEDBACK_COLUMNS} FROM {FEEDBACK_TABLE} WHERE NOT no_train AND at_us >= {} \
             ORDER BY at_us, id",
            self.placeholder(1)
        );
        let rows = fetch_all!(self, FeedbackRow, &select, since_us)
            .with_context(|| format!("reading {FEEDBACK_TABLE}"))?;
        let count = format!(
            "SELECT COUNT(*) FROM {FEEDBACK_TABLE} WHERE no_train AND at_us >= {}",
            self.placeholder(1)
        );
        let excluded: Vec<(i64,)> = fetch_all!(self, (i64,), &count, since_us)
            .with_context(|| format!("counting {FEEDBACK_TABLE}"))?;
        let feedback: Vec<Feedback> = rows.into_iter().map(feedback_from_row).collect();
        let mut ids: Vec<String> = feedback
            .iter()
            .flat_map(|f| std::iter::once(f.request_id.clone()).chain(f.compared_with.clone()))
            .collect();
        ids.sort();
        ids.dedup();
        let mut contents = self.contents(&ids).await?;
        contents.retain(|_, c| !c.no_train);
        let items = feedback
            .into_iter()
            .map(|f| FeedbackItem {
                content: contents.get(&f.request_id).cloned(),
                other: f
                    .compared_with
                    .as_ref()
                    .and_then(|id| contents.get(id).cloned()),
                feedback: f,
            })
            .collect();
        Ok(FeedbackExport {
            items,
            excluded_no_train: excluded
                .first()
                .map_or(0, |(n,)| u64::try_from(*n).unwrap_or(0)),
        })
    }

    /// Up to `limit` comparisons for the labelling page, newest first: two choices of one
    /// request (`n` ≥ 2), or the replies of two requests with the same prompt that differ.
    /// Requests already labelled, and those of `no_train` keys, are not offered.
    pub async fn label_queue(&self, limit: usize) -> Result<Vec<LabelItem>, anyhow::Error> {
        /// Recent content rows looked at for candidates.
        const WINDOW: i64 = 5000;
        let labelled_sql = format!(
            "SELECT request_id, compared_with FROM {FEEDBACK_TABLE} WHERE source = {}",
            self.placeholder(1)
        );
        let labelled_rows: Vec<(String, Option<String>)> =
            fetch_all!(self, (String, Option<String>), &labelled_sql, SOURCE_LABEL)
                .with_context(|| format!("reading {FEEDBACK_TABLE}"))?;
        let labelled: HashSet<String> = labelled_rows
            .into_iter()
            .flat_map(|(a, b)| std::iter::once(a).chain(b))
            .collect();
        let select = format!(
            "SELECT {CONTENT_COLUMNS} FROM {CONTENT_TABLE} \
             WHERE NOT no_train AND completion IS NOT NULL ORDER BY at_us DESC LIMIT {}",
            self.placeholder(1)
        );
        let rows = fetch_all!(self, ContentRow, &select, WINDOW)
            .with_context(|| format!("reading {CONTENT_TABLE}"))?;
        let reply = |c: &ContentRecord, index: Option<u32>, text: &str| LabelReply {
            request_id: c.request_id.clone(),
            completion_id: c.completion_id.clone(),
            index,
            model: c.model.clone(),
            text: text.to_string(),
        };
        let mut items = Vec::new();
        // The first unlabelled reply seen for each prompt, waiting for a different one.
        let mut waiting: HashMap<(String, String), ContentRecord> = HashMap::new();
        for c in rows.into_iter().map(content_from_row) {
            if items.len() >= limit {
                break;
            }
            if labelled.contains(&c.request_id) {
                continue;
            }
            if let [first, second, ..] = c.choices.as_slice() {
                if first != second {
                    items.push(LabelItem {
                        tenant: c.tenant.clone(),
                        prompt: c.prompt.clone(),
                        a: reply(&c, Some(0), first),
                        b: reply(&c, Some(1), second),
                    });
                }
                continue;
            }
            let Some(text) = c.completion.clone() else {
                continue;
            };
            let key = (c.tenant.clone(), c.prompt.clone());
            match waiting
                .get(&key)
                .map(|e| e.completion.as_deref() != Some(text.as_str()))
            {
                None => {
                    waiting.insert(key, c);
                }
                Some(false) => {}
                Some(true) => {
                    if let Some(earlier) = waiting.remove(&key) {
                        let earlier_text = earlier.completion.clone().unwrap_or_default();
                        items.push(LabelItem {
                            tenant: c.tenant.clone(),
                            prompt: c.prompt.clone(),
                            a: reply(&earlier, None, &earlier_text),
                            b: reply(&c, None, &text),
                        });
                    }
                }
            }
        }
        Ok(items)
    }
}
