//! Feedback, the labelling queue and the model registry in a real store: SQLite in a temporary
//! directory and PostgreSQL from `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`). PostgreSQL tables are shared between runs, so
//! every row here carries a tenant or served name unique to the run, and assertions filter by it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_monitor::feedback::{Feedback, SOURCE_API, SOURCE_LABEL, Thumbs};
use kiln_monitor::registry::{ModelRecord, PROMOTED, REJECTED};
use kiln_monitor::store::{ContentRecord, RequestRecord, Store};

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn unique(what: &str) -> String {
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

fn content(tenant: &str, id: &str, prompt: &str, reply: &str, no_train: bool) -> ContentRecord {
    ContentRecord {
        request_id: id.into(),
        at: SystemTime::now(),
        tenant: tenant.into(),
        model: "m".into(),
        no_train,
        prompt: prompt.into(),
        completion: Some(reply.into()),
        completion_id: Some(format!("chatcmpl-{id}")),
        choices: Vec::new(),
    }
}

fn feedback(tenant: &str, request_id: &str, no_train: bool) -> Feedback {
    Feedback {
        feedback_id: Feedback::new_id(),
        at: SystemTime::now(),
        request_id: request_id.into(),
        completion_id: Some(format!("chatcmpl-{request_id}")),
        tenant: tenant.into(),
        key_id: "key-1".into(),
        source: SOURCE_API.into(),
        thumbs: None,
        score: None,
        correction: None,
        preferred_index: None,
        compared_with: None,
        no_train,
    }
}

async fn feedback_round_trips_and_exports_leave_out_no_train(store: &Store) {
    let t = unique("fb");
    let since = SystemTime::now() - Duration::from_secs(1);
    let id = |s: &str| format!("{t}-{s}");
    store
        .record(&RequestRecord {
            request_id: id("a"),
            at: SystemTime::now(),
            tenant: t.clone(),
            key_id: "key-1".into(),
            model: "m".into(),
            status: 200,
            completion_id: Some(format!("chatcmpl-{}", id("a"))),
            ..RequestRecord::default()
        })
        .await
        .unwrap();
    // By the reply's id and by the gateway's request id.
    for lookup in [format!("chatcmpl-{}", id("a")), id("a")] {
        let found = store.find_completion(&lookup).await.unwrap();
        assert_eq!(found.len(), 1, "{lookup}");
        assert_eq!(found[0].request_id, id("a"));
        assert_eq!(found[0].key_id, "key-1");
        assert_eq!(found[0].status, 200);
    }
    assert!(store.find_completion(&id("nope")).await.unwrap().is_empty());

    let mut with_choices = content(&t, &id("a"), "[]", "first", false);
    with_choices.choices = vec!["first".into(), "second".into()];
    store.record_content(&with_choices).await.unwrap();
    store
        .record_content(&content(&t, &id("b"), "p", "b reply", false))
        .await
        .unwrap();
    store
        .record_content(&content(&t, &id("secret"), "p", "private", true))
        .await
        .unwrap();
    assert_eq!(
        store.content(&id("a")).await.unwrap().unwrap().choices,
        vec!["first".to_string(), "second".to_string()]
    );

    let mut up = feedback(&t, &id("a"), false);
    up.thumbs = Some(Thumbs::Up);
    up.score = Some(0.75);
    up.preferred_index = Some(1);
    up.correction = Some("better".into());
    store.record_feedback(&up).await.unwrap();
    let mut pair = feedback(&t, &id("b"), false);
    pair.source = SOURCE_LABEL.into();
    pair.compared_with = Some(id("a"));
    store.record_feedback(&pair).await.unwrap();
    let mut private = feedback(&t, &id("secret"), true);
    private.thumbs = Some(Thumbs::Down);
    store.record_feedback(&private).await.unwrap();
    // Feedback whose own flag is off but whose content is `no_train` is not exported either.
    let mut leaky = feedback(&t, &id("secret"), false);
    leaky.thumbs = Some(Thumbs::Up);
    store.record_feedback(&leaky).await.unwrap();

    let all: Vec<Feedback> = store
        .feedback(since, usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .filter(|f| f.tenant == t)
        .collect();
    assert_eq!(all.len(), 4);
    assert_eq!(all[0].thumbs, Some(Thumbs::Up));
    assert_eq!(all[0].score, Some(0.75));
    assert_eq!(all[0].preferred_index, Some(1));
    assert_eq!(all[0].correction.as_deref(), Some("better"));

    let export = store.feedback_for_export(since).await.unwrap();
    assert!(export.excluded_no_train >= 1);
    let mine: Vec<_> = export
        .items
        .iter()
        .filter(|i| i.feedback.tenant == t)
        .collect();
    assert_eq!(mine.len(), 3, "the no_train feedback is not read");
    assert!(mine.iter().all(|i| !i.feedback.no_train));
    assert_eq!(mine[0].content.as_ref().unwrap().choices.len(), 2);
    assert_eq!(
        mine[1].other.as_ref().unwrap().request_id,
        id("a"),
        "compared_with brings the other request's content"
    );
    assert!(
        mine[2].content.is_none(),
        "no_train content is never joined, even under feedback that lacks the flag"
    );
}

async fn the_label_queue_offers_unlabelled_pairs(store: &Store) {
    let t = unique("label");
    let id = |s: &str| format!("{t}-{s}");
    let mut two = content(&t, &id("two"), "q1", "x", false);
    two.choices = vec!["x".into(), "y".into()];
    store.record_content(&two).await.unwrap();
    let prompt = format!("[{{\"role\":\"user\",\"content\":\"{t}\"}}]");
    store
        .record_content(&content(&t, &id("p1"), &prompt, "one", false))
        .await
        .unwrap();
    store
        .record_content(&content(&t, &id("p2"), &prompt, "two", false))
        .await
        .unwrap();
    store
        .record_content(&content(&t, &id("p3"), &prompt, "two", true))
        .await
        .unwrap();
    let mine = |items: Vec<kiln_monitor::feedback::LabelItem>| -> Vec<_> {
        items.into_iter().filter(|i| i.tenant == t).collect()
    };
    let items = mine(store.label_queue(10_000).await.unwrap());
    assert_eq!(items.len(), 2, "{items:?}");
    let choices = items.iter().find(|i| i.a.request_id == id("two")).unwrap();
    assert_eq!((choices.a.index, choices.b.index), (Some(0), Some(1)));
    assert_eq!(
        (choices.a.text.as_str(), choices.b.text.as_str()),
        ("x", "y")
    );
    let pair = items.iter().find(|i| i.prompt == prompt).unwrap();
    let mut ids = [pair.a.request_id.clone(), pair.b.request_id.clone()];
    ids.sort();
    assert_eq!(ids, [id("p1"), id("p2")]);

    let mut labelled = feedback(&t, &id("two"), false);
    labelled.source = SOURCE_LABEL.into();
    labelled.preferred_index = Some(1);
    store.record_feedback(&labelled).await.unwrap();
    let items = mine(store.label_queue(10_000).await.unwrap());
    assert_eq!(items.len(), 1, "a labelled request leaves the queue");
}

async fn the_registry_keeps_rounds(store: &Store) {
    let name = unique("prod");
    let round = |adapter: &str, decision: &str| ModelRecord {
        round: 0,
        at: SystemTime::now(),
        served_name: name.clone(),
        base: "base".into(),
        adapter: adapter.into(),
        parent: None,
        data_snapshot: "ab".repeat(32),
        data_rows: 12,
        metrics: serde_json::json!({"win_rate": 0.6}),
        decision: decision.into(),
        reason: "because".into(),
    };
    let first = store.register_model(&round("a1", PROMOTED)).await.unwrap();
    let second = store.register_model(&round("a2", REJECTED)).await.unwrap();
    assert!(second > first);
    let mine: Vec<ModelRecord> = store
        .models()
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.served_name == name)
        .collect();
    assert_eq!(mine.len(), 2);
    assert_eq!(mine[0].round, first);
    assert_eq!(mine[0].metrics["win_rate"], 0.6);
    assert_eq!(mine[1].decision, REJECTED);
    let serving = store.serving_model(&name).await.unwrap().unwrap();
    assert_eq!(serving.adapter, "a1", "a rejected round does not serve");
}

#[tokio::test]
async fn sqlite_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(&format!("sqlite://{}", dir.path().join("s.db").display()))
        .await
        .unwrap();
    feedback_round_trips_and_exports_leave_out_no_train(&store).await;
    the_label_queue_offers_unlabelled_pairs(&store).await;
    the_registry_keeps_rounds(&store).await;
}

#[tokio::test]
async fn postgres_store() {
    let store = Store::connect(&database_url()).await.unwrap();
    feedback_round_trips_and_exports_leave_out_no_train(&store).await;
    the_label_queue_offers_unlabelled_pairs(&store).await;
    the_registry_keeps_rounds(&store).await;
}

#[tokio::test]
async fn older_sqlite_tables_gain_the_new_columns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let url = format!("sqlite://{}", path.display());
    {
        let pool = sqlx::SqlitePool::connect(&format!("{url}?mode=rwc"))
            .await
            .unwrap();
        sqlx::query(
            "CREATE TABLE kiln_gateway_content (request_id TEXT PRIMARY KEY, at_us INTEGER NOT NULL, \
             tenant TEXT NOT NULL, model TEXT NOT NULL, no_train BOOLEAN NOT NULL, \
             prompt TEXT NOT NULL, completion TEXT)",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query("INSERT INTO kiln_gateway_content VALUES ('old', 0, 't', 'm', 0, 'p', 'c')")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }
    let store = Store::connect(&url).await.unwrap();
    let old = store.content("old").await.unwrap().unwrap();
    assert_eq!(old.completion.as_deref(), Some("c"));
    assert_eq!(old.completion_id, None);
    assert!(old.choices.is_empty());
    let mut new = content("t", "new", "p", "c", false);
    new.choices = vec!["a".into(), "b".into()];
    store.record_content(&new).await.unwrap();
    assert_eq!(
        store.content("new").await.unwrap().unwrap().choices.len(),
        2
    );
}
