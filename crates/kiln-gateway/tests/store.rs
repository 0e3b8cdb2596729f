//! The request store (SQLite in a temporary directory and a real PostgreSQL), cost arithmetic,
//! budget periods, budgets and the Prometheus exposition.
//!
//! PostgreSQL is read from `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`).
//! Every test uses tenant names unique to the run, so parallel runs share the table safely.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_gateway::config::{Budget, BudgetPeriod, Pricing};
use kiln_gateway::cost::{period_start, request_cost};
use kiln_gateway::metrics::GatewayMetrics;
use sqlx::Row;

use kiln_gateway::store::{
    Budgets, ContentRecord, RECORD_BATCH, Recorder, RequestRecord, Store, TABLE,
};

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A tenant name no other test, or other run, uses.
fn unique_tenant(what: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{what}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn record(tenant: &str, at: SystemTime, cost: Option<f64>) -> RequestRecord {
    RequestRecord {
        request_id: format!("req-{}", unique_tenant("r")),
        at,
        tenant: tenant.into(),
        key_id: "key-1".into(),
        model: "m".into(),
        upstream: Some("local".into()),
        status: 200,
        stream: false,
        cache_hit: false,
        prompt_tokens: 10,
        completion_tokens: 20,
        cost_usd: cost,
        gateway_ms: 0.4,
        upstream_ms: Some(12.0),
        no_train: false,
        guard: None,
        ..RequestRecord::default()
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

/// Spend sums only the tenant's own priced requests at or after `since`.
async fn spend_counts_only_the_tenant_since(store: &Store) {
    let me = unique_tenant("spend");
    let other = unique_tenant("other");
    let since = SystemTime::now() - Duration::from_secs(3600);
    store
        .record(&record(&me, since - Duration::from_secs(1), Some(100.0)))
        .await
        .unwrap();
    store.record(&record(&me, since, Some(1.25))).await.unwrap();
    store
        .record(&record(&me, since + Duration::from_secs(60), Some(0.5)))
        .await
        .unwrap();
    store
        .record(&record(&me, since + Duration::from_secs(61), None))
        .await
        .unwrap();
    store
        .record(&record(&other, since + Duration::from_secs(60), Some(7.0)))
        .await
        .unwrap();
    let spent = store.spend_since(&me, since).await.unwrap();
    assert!(close(spent, 1.75), "spent {spent}");
    let none = store
        .spend_since(&unique_tenant("nobody"), since)
        .await
        .unwrap();
    assert_eq!(none, 0.0);
}

#[tokio::test]
async fn sqlite_spend_counts_only_the_tenant_since() {
    let dir = tempfile::tempdir().unwrap();
    // A directory that does not exist yet is created with the file.
    let url = format!("sqlite://{}", dir.path().join("sub/gw.db").display());
    let store = Store::connect(&url).await.unwrap();
    spend_counts_only_the_tenant_since(&store).await;
    assert!(dir.path().join("sub/gw.db").exists());
}

#[tokio::test]
async fn postgres_spend_counts_only_the_tenant_since() {
    let store = Store::connect(&database_url()).await.unwrap();
    spend_counts_only_the_tenant_since(&store).await;
}

#[tokio::test]
async fn sqlite_schema_creation_is_idempotent_and_data_survives_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("gw.db").display());
    let tenant = unique_tenant("reconnect");
    let first = Store::connect(&url).await.unwrap();
    first
        .record(&record(&tenant, SystemTime::now(), Some(2.0)))
        .await
        .unwrap();
    first.close().await;
    let second = Store::connect(&url).await.unwrap();
    let spent = second.spend_since(&tenant, UNIX_EPOCH).await.unwrap();
    assert!(close(spent, 2.0), "spent {spent}");

    // WAL journal: the mode is persistent in the file.
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn postgres_schema_creation_is_idempotent_under_concurrent_connects() {
    let url = database_url();
    let connects = (0..4).map(|_| Store::connect(&url));
    for store in futures_util::future::join_all(connects).await {
        store.unwrap();
    }
    let again = Store::connect(&url).await.unwrap();
    let tenant = unique_tenant("pg-idem");
    again
        .record(&record(&tenant, SystemTime::now(), Some(0.25)))
        .await
        .unwrap();
    let spent = again.spend_since(&tenant, UNIX_EPOCH).await.unwrap();
    assert!(close(spent, 0.25), "spent {spent}");
}

/// Every field round-trips, `no_train` included (data export filters on it), and the table
/// has no column that could hold a prompt or a completion.
#[tokio::test]
async fn postgres_rows_keep_every_field_and_no_text() {
    let url = database_url();
    let store = Store::connect(&url).await.unwrap();
    let tenant = unique_tenant("fields");
    let at = UNIX_EPOCH + Duration::from_micros(1_764_000_000_123_456);
    let mut r = record(&tenant, at, None);
    r.no_train = true;
    r.stream = true;
    r.cache_hit = true;
    r.upstream = None;
    r.upstream_ms = None;
    r.status = 429;
    r.prompt_tokens = u64::MAX;
    r.guard = Some("input.pii:redact(EMAIL×2)".into());
    store.record(&r).await.unwrap();

    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let row = sqlx::query(&format!("SELECT * FROM {TABLE} WHERE tenant = $1"))
        .bind(&tenant)
        .fetch_one(&pool)
        .await
        .unwrap();
    let get_bool = |c: &str| row.get::<bool, _>(c);
    assert_eq!(row.get::<String, _>("request_id"), r.request_id);
    assert_eq!(row.get::<i64, _>("at_us"), 1_764_000_000_123_456);
    assert_eq!(row.get::<String, _>("key_id"), "key-1");
    assert_eq!(row.get::<String, _>("model"), "m");
    assert_eq!(row.get::<Option<String>, _>("upstream"), None);
    assert_eq!(row.get::<i32, _>("status"), 429);
    assert!(get_bool("stream") && get_bool("cache_hit") && get_bool("no_train"));
    assert_eq!(
        row.get::<i64, _>("prompt_tokens"),
        i64::MAX,
        "token counts saturate instead of failing"
    );
    assert_eq!(row.get::<i64, _>("completion_tokens"), 20);
    assert_eq!(row.get::<Option<f64>, _>("cost_usd"), None);
    assert_eq!(row.get::<f64, _>("gateway_ms"), 0.4);
    assert_eq!(row.get::<Option<f64>, _>("upstream_ms"), None);

    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::TEXT FROM information_schema.columns WHERE table_name = $1",
    )
    .bind(TABLE)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        row.get::<Option<String>, _>("guard").as_deref(),
        Some("input.pii:redact(EMAIL×2)")
    );
    assert_eq!(columns.len(), 27, "{columns:?}");
    for forbidden in ["prompt", "completion", "messages", "body", "content"] {
        assert!(!columns.iter().any(|c| c == forbidden), "{columns:?}");
    }
}

/// A trace with every monitoring field set reads back as written, and a NaN is stored as NULL.
async fn traces_read_back_every_field(store: &Store) {
    let tenant = unique_tenant("trace");
    let at = UNIX_EPOCH + Duration::from_micros(1_764_000_000_654_321);
    let mut r = record(&tenant, at, Some(0.002));
    r.operation = Some("chat".into());
    r.total_ms = Some(120.5);
    r.queue_ms = Some(3.25);
    r.ttft_ms = Some(40.0);
    r.mean_logprob = Some(-0.75);
    r.mean_entropy = Some(1.5);
    r.p_wrong = Some(0.3);
    r.grounding = Some(f64::NAN);
    r.hallucination = Some(true);
    r.guard = Some("output.pii:redact(EMAIL)".into());
    store.record(&r).await.unwrap();
    let later = record(&tenant, at + Duration::from_secs(10), None);
    store.record(&later).await.unwrap();
    let traces = store
        .traces(at, at + Duration::from_secs(5), 100)
        .await
        .unwrap();
    let t = traces
        .iter()
        .find(|t| t.tenant == tenant)
        .expect("the trace in the window");
    assert_eq!(t.request_id, r.request_id);
    assert_eq!(t.at, at);
    assert_eq!(t.operation.as_deref(), Some("chat"));
    assert_eq!(t.total_ms, Some(120.5));
    assert_eq!(t.queue_ms, Some(3.25));
    assert_eq!(t.ttft_ms, Some(40.0));
    assert_eq!(t.mean_logprob, Some(-0.75));
    assert_eq!(t.mean_entropy, Some(1.5));
    assert_eq!(t.p_wrong, Some(0.3));
    assert_eq!(t.grounding, None, "NaN is stored as NULL");
    assert_eq!(t.hallucination, Some(true));
    assert_eq!(t.cost_usd, Some(0.002));
    assert_eq!(t.guard.as_deref(), Some("output.pii:redact(EMAIL)"));
    assert!(
        !traces.iter().any(|t| t.request_id == later.request_id),
        "the window's end is exclusive of later traces"
    );
}

#[tokio::test]
async fn sqlite_traces_read_back_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("traces.db").display());
    traces_read_back_every_field(&Store::connect(&url).await.unwrap()).await;
}

#[tokio::test]
async fn postgres_traces_read_back_every_field() {
    traces_read_back_every_field(&Store::connect(&database_url()).await.unwrap()).await;
}

/// Captured content round-trips, and the export query never returns a `no_train` row.
async fn content_export_leaves_out_no_train(store: &Store) {
    let tenant = unique_tenant("content");
    let at = SystemTime::now();
    for (i, no_train) in [false, true, false].into_iter().enumerate() {
        store
            .record_content(&ContentRecord {
                request_id: format!("{tenant}-{i}"),
                at: at + Duration::from_millis(i as u64),
                tenant: tenant.clone(),
                model: "m".into(),
                no_train,
                prompt: format!("[{{\"role\":\"user\",\"content\":\"question {i}\"}}]"),
                completion: (i != 2).then(|| format!("answer {i}")),
                completion_id: Some(format!("chatcmpl-{tenant}-{i}")),
                choices: if i == 0 {
                    vec!["answer 0".into(), "another answer".into()]
                } else {
                    Vec::new()
                },
            })
            .await
            .unwrap();
    }
    let rows: Vec<ContentRecord> = store
        .exportable_content(at - Duration::from_secs(1))
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.tenant == tenant)
        .collect();
    let ids: Vec<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(ids, [format!("{tenant}-0"), format!("{tenant}-2")]);
    assert_eq!(rows[0].completion.as_deref(), Some("answer 0"));
    assert_eq!(rows[1].completion, None);
    assert!(rows.iter().all(|r| !r.no_train));
}

#[tokio::test]
async fn sqlite_content_export_leaves_out_no_train() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(&format!("sqlite://{}", dir.path().join("g.db").display()))
        .await
        .unwrap();
    content_export_leaves_out_no_train(&store).await;
}

#[tokio::test]
async fn postgres_content_export_leaves_out_no_train() {
    let store = Store::connect(&database_url()).await.unwrap();
    content_export_leaves_out_no_train(&store).await;
}

/// A table made before the `guard` column existed gains it on connect, rows kept.
#[tokio::test]
async fn an_old_sqlite_table_gains_the_newer_columns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let url = format!("sqlite://{}", path.display());
    {
        let pool = sqlx::SqlitePool::connect(&format!("{url}?mode=rwc"))
            .await
            .unwrap();
        sqlx::query(
            "CREATE TABLE kiln_gateway_requests (id INTEGER PRIMARY KEY, request_id TEXT NOT NULL, \
             at_us INTEGER NOT NULL, tenant TEXT NOT NULL, key_id TEXT NOT NULL, model TEXT NOT NULL, \
             upstream TEXT, status INTEGER NOT NULL, stream BOOLEAN NOT NULL, cache_hit BOOLEAN NOT NULL, \
             prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, cost_usd REAL, \
             gateway_ms REAL NOT NULL, upstream_ms REAL, no_train BOOLEAN NOT NULL)",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }
    let store = Store::connect(&url).await.unwrap();
    let mut r = record("old", SystemTime::now(), Some(0.5));
    r.guard = Some("input.injection:flag(score 0.60: x)".into());
    r.mean_logprob = Some(-1.0);
    r.hallucination = Some(false);
    store.record(&r).await.unwrap();
    let traces = store
        .traces(UNIX_EPOCH, SystemTime::now() + Duration::from_secs(1), 10)
        .await
        .unwrap();
    assert_eq!(traces[0].mean_logprob, Some(-1.0));
    assert_eq!(traces[0].hallucination, Some(false));
    assert!(close(
        store.spend_since("old", UNIX_EPOCH).await.unwrap(),
        0.5
    ));
}

#[tokio::test]
async fn bad_store_urls_are_named_without_their_password() {
    let err = Store::connect("mysql://u:hunter2@h/db").await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("sqlite://PATH") && !msg.contains("hunter2"),
        "{msg}"
    );

    // Nothing listens on port 1: refused at once, never a hang.
    let started = std::time::Instant::now();
    let err = Store::connect("postgres://u:hunter2@127.0.0.1:1/db")
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("127.0.0.1:1") && !msg.contains("hunter2"),
        "{msg}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test]
async fn in_memory_sqlite_keeps_its_rows_across_queries() {
    let store = Store::connect("sqlite::memory:").await.unwrap();
    spend_counts_only_the_tenant_since(&store).await;
}

/// The batching writer writes everything queued, across several batches, and a flush waits
/// for it; on both databases.
async fn recorder_writes_in_batches(store: Store) {
    let tenant = unique_tenant("recorder");
    let recorder = Recorder::spawn(store.clone(), 10_000);
    let n = RECORD_BATCH * 3 + 7;
    for _ in 0..n {
        assert!(recorder.record(record(&tenant, SystemTime::now(), Some(0.5))));
    }
    recorder.flush().await;
    assert_eq!(recorder.dropped(), 0);
    let spent = store.spend_since(&tenant, UNIX_EPOCH).await.unwrap();
    assert!(close(spent, 0.5 * n as f64), "spent {spent} of {n} records");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_recorder_writes_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("gw.db").display());
    recorder_writes_in_batches(Store::connect(&url).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_recorder_writes_in_batches() {
    recorder_writes_in_batches(Store::connect(&database_url()).await.unwrap()).await;
}

/// A full queue drops (and counts) instead of making the request wait; a store that refuses
/// the rows counts them too.
#[tokio::test]
async fn recorder_drops_and_counts_when_full_or_failing() {
    let store = Store::connect("sqlite::memory:").await.unwrap();
    let tenant = unique_tenant("full");
    // On this single-threaded runtime the writer cannot run before the test yields.
    let recorder = Recorder::spawn(store.clone(), 2);
    let accepted: Vec<bool> = (0..5)
        .map(|_| recorder.record(record(&tenant, SystemTime::now(), Some(1.0))))
        .collect();
    assert_eq!(accepted, [true, true, false, false, false]);
    assert_eq!(recorder.dropped(), 3);
    recorder.flush().await;
    let spent = store.spend_since(&tenant, UNIX_EPOCH).await.unwrap();
    assert!(close(spent, 2.0), "spent {spent}");

    store.close().await;
    assert!(recorder.record(record(&tenant, SystemTime::now(), Some(1.0))));
    recorder.flush().await;
    assert_eq!(recorder.dropped(), 4);
}

#[test]
fn cost_is_priced_per_million_tokens() {
    let mut pricing = BTreeMap::new();
    pricing.insert(
        "m".to_string(),
        Pricing {
            input_per_million: 0.5,
            output_per_million: 1.5,
        },
    );
    let cost = request_cost(&pricing, "m", 1_000_000, 2_000_000).unwrap();
    assert!(close(cost, 3.5), "{cost}");
    let small = request_cost(&pricing, "m", 1000, 10).unwrap();
    assert!(close(small, 0.0005 + 0.000_015), "{small}");
    assert_eq!(request_cost(&pricing, "m", 0, 0), Some(0.0));
    assert_eq!(request_cost(&pricing, "unknown", 1_000_000, 0), None);
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

#[test]
fn periods_start_at_utc_midnight_and_the_first_of_the_month() {
    // 2024-02-29T23:59:59Z (a leap day) and one second later.
    let leap_day_end = at(1_709_251_199);
    assert_eq!(
        period_start(BudgetPeriod::Day, leap_day_end),
        at(1_709_164_800)
    );
    assert_eq!(
        period_start(BudgetPeriod::Month, leap_day_end),
        at(1_706_745_600)
    ); // 2024-02-01
    let march = at(1_709_251_200);
    assert_eq!(period_start(BudgetPeriod::Day, march), march);
    assert_eq!(period_start(BudgetPeriod::Month, march), march);
    // Mid-day with sub-second precision: 2026-11-30T15:08:39.5Z.
    let now = at(1_796_051_319) + Duration::from_millis(500);
    assert_eq!(period_start(BudgetPeriod::Day, now), at(1_795_996_800));
    assert_eq!(period_start(BudgetPeriod::Month, now), at(1_793_491_200)); // 2026-11-01
    // Year boundary: 2026-12-31T12:00:00Z → 2026-12-01, and 2027-01-01T00:00:00Z is its own start.
    assert_eq!(
        period_start(BudgetPeriod::Month, at(1_798_718_400)),
        at(1_796_083_200)
    );
    assert_eq!(
        period_start(BudgetPeriod::Month, at(1_798_761_600)),
        at(1_798_761_600)
    );
    assert_eq!(period_start(BudgetPeriod::Day, UNIX_EPOCH), UNIX_EPOCH);
}

/// Budgets read the store once, at first use, then count in memory.
async fn budget_loads_then_counts_in_memory(store: Store) {
    let tenant = unique_tenant("budget");
    let unbudgeted = unique_tenant("free");
    let mut cfg = BTreeMap::new();
    cfg.insert(
        tenant.clone(),
        Budget {
            budget_usd: 10.0,
            period: BudgetPeriod::Day,
        },
    );
    // Spend earlier today (or, just after midnight, this instant) counts; last month does not.
    let today = period_start(BudgetPeriod::Day, SystemTime::now());
    store
        .record(&record(&tenant, today, Some(6.0)))
        .await
        .unwrap();
    store
        .record(&record(&tenant, today - Duration::from_secs(1), Some(50.0)))
        .await
        .unwrap();

    let budgets = Budgets::new(&cfg, store.clone());
    assert_eq!(budgets.check(&tenant).await, Ok(()));
    // Loaded: spend written to the store behind its back is not re-read this period...
    store
        .record(&record(&tenant, SystemTime::now(), Some(100.0)))
        .await
        .unwrap();
    assert_eq!(budgets.check(&tenant).await, Ok(()));
    // ...while add() counts in memory and crosses the budget.
    budgets.add(&tenant, 3.0).await;
    assert_eq!(budgets.check(&tenant).await, Ok(()));
    budgets.add(&tenant, 1.5).await;
    let (spent, budget) = budgets.check(&tenant).await.unwrap_err();
    assert!(
        close(spent, 10.5) && close(budget, 10.0),
        "{spent} / {budget}"
    );
    // Nonsense costs are ignored; tenants without a budget always pass.
    budgets.add(&tenant, f64::NAN).await;
    budgets.add(&tenant, -100.0).await;
    let (spent, _) = budgets.check(&tenant).await.unwrap_err();
    assert!(close(spent, 10.5), "{spent}");
    budgets.add(&unbudgeted, 1e9).await;
    assert_eq!(budgets.check(&unbudgeted).await, Ok(()));

    // A fresh Budgets (a restarted gateway) loads everything the store holds for the period.
    let restarted = Budgets::new(&cfg, store);
    let (spent, _) = restarted.check(&tenant).await.unwrap_err();
    assert!(close(spent, 106.0), "{spent}");
}

#[tokio::test]
async fn sqlite_budget_loads_then_counts_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("gw.db").display());
    budget_loads_then_counts_in_memory(Store::connect(&url).await.unwrap()).await;
}

#[tokio::test]
async fn postgres_budget_loads_then_counts_in_memory() {
    let store = Store::connect(&database_url()).await.unwrap();
    budget_loads_then_counts_in_memory(store).await;
}

#[tokio::test]
async fn a_burst_of_first_checks_all_see_the_stored_spend() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("gw.db").display());
    let store = Store::connect(&url).await.unwrap();
    let tenant = unique_tenant("burst");
    store
        .record(&record(&tenant, SystemTime::now(), Some(5.0)))
        .await
        .unwrap();
    let mut cfg = BTreeMap::new();
    cfg.insert(
        tenant.clone(),
        Budget {
            budget_usd: 5.0,
            period: BudgetPeriod::Month,
        },
    );
    let budgets = Budgets::new(&cfg, store);
    let checks = (0..32).map(|_| budgets.check(&tenant));
    for verdict in futures_util::future::join_all(checks).await {
        assert_eq!(verdict, Err((5.0, 5.0)));
    }
}

#[tokio::test]
async fn an_unreadable_store_lets_traffic_through() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("gw.db").display());
    let store = Store::connect(&url).await.unwrap();
    let tenant = unique_tenant("down");
    let mut cfg = BTreeMap::new();
    cfg.insert(
        tenant.clone(),
        Budget {
            budget_usd: 0.0,
            period: BudgetPeriod::Day,
        },
    );
    let budgets = Budgets::new(&cfg, store.clone());
    store.close().await;
    // A zero budget would refuse everything; with the store gone the check fails open.
    assert_eq!(budgets.check(&tenant).await, Ok(()));
    assert!(
        store
            .record(&record(&tenant, SystemTime::now(), None))
            .await
            .is_err()
    );
}

#[test]
fn metrics_render_every_series_with_its_labels() {
    let m = GatewayMetrics::new();
    m.observe_request("llama", "acme", 200);
    m.observe_request("llama", "acme", 429);
    m.observe_request("llama", "acme", 429);
    m.observe_overhead(0.000_3);
    m.observe_upstream("local", 0.2);
    m.add_tokens("llama", "acme", 12, 34);
    m.add_cost("llama", "acme", 0.25);
    m.cache(true);
    m.cache(false);
    m.cache(false);
    m.rate_limited("acme", "rpm");
    m.upstream_error("local", "connect");
    let text = m.render();
    for line in [
        r#"kiln_gateway_requests_total{model="llama",status="200",tenant="acme"} 1"#,
        r#"kiln_gateway_requests_total{model="llama",status="429",tenant="acme"} 2"#,
        r#"kiln_gateway_overhead_seconds_bucket{le="0.00005"} 0"#,
        r#"kiln_gateway_overhead_seconds_bucket{le="0.0003"} 1"#,
        r#"kiln_gateway_overhead_seconds_count 1"#,
        r#"kiln_gateway_upstream_latency_seconds_count{upstream="local"} 1"#,
        r#"kiln_gateway_tokens_total{kind="prompt",model="llama",tenant="acme"} 12"#,
        r#"kiln_gateway_tokens_total{kind="completion",model="llama",tenant="acme"} 34"#,
        r#"kiln_gateway_cost_usd_total{model="llama",tenant="acme"} 0.25"#,
        r#"kiln_gateway_cache_requests_total{result="hit"} 1"#,
        r#"kiln_gateway_cache_requests_total{result="miss"} 2"#,
        r#"kiln_gateway_rate_limited_total{limit="rpm",tenant="acme"} 1"#,
        r#"kiln_gateway_upstream_errors_total{kind="connect",upstream="local"} 1"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in\n{text}"
        );
    }
    // Nothing negative or non-finite reaches a counter.
    m.add_cost("llama", "acme", -1.0);
    m.add_cost("llama", "acme", f64::INFINITY);
    m.observe_overhead(f64::NAN);
    let text = m.render();
    assert!(text.contains(r#"kiln_gateway_cost_usd_total{model="llama",tenant="acme"} 0.25"#));
    assert!(text.contains("kiln_gateway_overhead_seconds_count 1"));
}
