//! `kiln feedback export` through the binary, on a real SQLite store (and PostgreSQL, read from
//! `DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`) seeded with every kind of
//! feedback, and the files it writes read back with kiln's own DPO, SFT and KTO readers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_core::Tokenizer;
use kiln_monitor::feedback::{Feedback, SOURCE_API, SOURCE_LABEL, Thumbs};
use kiln_monitor::store::{ContentRecord, Store};
use kiln_train::pref_data::{
    InvalidPairs, PairRecipe, PrefDataOptions, load_preference_dataset, read_unpaired_preferences,
};
use kiln_train::sft_data::{SftDataOptions, SftFormat, load_sft_dataset};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Planted in the content and feedback of a `no_train` key: must never be exported.
const NO_TRAIN_MARKER: &str = "NOTRAIN-7f3a9c-MARKER";
/// Planted unscrubbed in captured content and a correction: must never be exported.
const EMAIL: &str = "jane.doe@example.com";
const PHONE: &str = "+1 415-555-0132";
/// Matched only by the custom pattern of the gateway config in `custom_patterns_apply`.
const EMPLOYEE_ID: &str = "EMP-482913";

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("kiln runs")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "kiln failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/hf/llama"))
        .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn chat(user: &str) -> String {
    json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": user},
    ])
    .to_string()
}

/// Seeds a store; `tag` makes every prompt unique to the caller (PostgreSQL is shared).
struct Seeder {
    store: Store,
    tenant: String,
    tag: String,
}

impl Seeder {
    async fn content(&self, id: &str, prompt: &str, replies: &[&str], no_train: bool) {
        let id = format!("{}-{id}", self.tag);
        self.store
            .record_content(&ContentRecord {
                request_id: id.clone(),
                at: SystemTime::now(),
                tenant: self.tenant.clone(),
                model: "llama".into(),
                no_train,
                prompt: prompt.into(),
                completion: replies.first().map(|r| r.to_string()),
                completion_id: Some(format!("cmpl-{id}")),
                choices: if replies.len() > 1 {
                    replies.iter().map(|r| r.to_string()).collect()
                } else {
                    Vec::new()
                },
            })
            .await
            .unwrap();
    }

    async fn feedback(&self, id: &str, key: &str, set: impl FnOnce(&mut Feedback)) {
        let mut f = Feedback {
            feedback_id: Feedback::new_id(),
            at: SystemTime::now(),
            request_id: format!("{}-{id}", self.tag),
            completion_id: None,
            tenant: self.tenant.clone(),
            key_id: key.into(),
            source: SOURCE_API.into(),
            thumbs: None,
            score: None,
            correction: None,
            preferred_index: None,
            compared_with: None,
            no_train: false,
        };
        set(&mut f);
        if let Some(other) = &mut f.compared_with {
            *other = format!("{}-{other}", self.tag);
        }
        self.store.record_feedback(&f).await.unwrap();
        // Distinct times, so "the latest vote wins" is well defined.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    /// Every signal kind; see the expected counts in `export_all_formats`.
    async fn seed(&self) {
        let t = &self.tag;
        // A correction, on a prompt carrying planted PII; the same correction again from another
        // key (a duplicate row).
        let pii_prompt = chat(&format!(
            "[{t}] I am Jane, mail {EMAIL} or call {PHONE}. What is the capital of France?"
        ));
        self.content("c1", &pii_prompt, &["Lyon, I think."], false)
            .await;
        let correction = format!("Paris. I will also write to {EMAIL}.");
        for key in ["k1", "k2"] {
            let c = correction.clone();
            self.feedback("c1", key, |f| f.correction = Some(c)).await;
        }
        // n = 2 and the second choice preferred.
        let sky = chat(&format!("[{t}] Why is the sky blue?"));
        self.content(
            "c2",
            &sky,
            &["Because.", "Rayleigh scattering of sunlight."],
            false,
        )
        .await;
        self.feedback("c2", "k1", |f| f.preferred_index = Some(1))
            .await;
        // A side-by-side comparison from the labelling page.
        let hi = chat(&format!("[{t}] Say hi."));
        self.content("c3a", &hi, &["Hello! How can I help?"], false)
            .await;
        self.content("c3b", &hi, &["Go away."], false).await;
        self.feedback("c3a", "dashboard", |f| {
            f.source = SOURCE_LABEL.into();
            f.compared_with = Some("c3b".into());
        })
        .await;
        // Thumbs up and down on one prompt; k1 first voted down on c4a, then changed its mind.
        let prime = chat(&format!("[{t}] Name a prime number."));
        self.content("c4a", &prime, &["7"], false).await;
        self.content("c4b", &prime, &["8"], false).await;
        self.feedback("c4a", "k1", |f| f.thumbs = Some(Thumbs::Down))
            .await;
        self.feedback("c4a", "k1", |f| f.thumbs = Some(Thumbs::Up))
            .await;
        self.feedback("c4b", "k2", |f| f.thumbs = Some(Thumbs::Down))
            .await;
        // Scores on one prompt.
        let translate = chat(&format!("[{t}] Translate 'chat' from French."));
        self.content("c5a", &translate, &["cat"], false).await;
        self.content("c5b", &translate, &["chat"], false).await;
        self.feedback("c5a", "k1", |f| f.score = Some(0.9)).await;
        self.feedback("c5b", "k1", |f| f.score = Some(0.2)).await;
        // A completion request: the minority (standard) kind.
        self.content(
            "t1",
            &format!("[{t}] Once upon a time"),
            &[" nothing."],
            false,
        )
        .await;
        self.feedback("t1", "k1", |f| {
            f.correction = Some(" there lived a kind dragon.".into());
        })
        .await;
        // A no_train key's request and feedback.
        let secret = chat(&format!("[{t}] {NO_TRAIN_MARKER} what is our revenue?"));
        self.content("nt", &secret, &[&format!("{NO_TRAIN_MARKER} 12M")], true)
            .await;
        self.feedback("nt", "k3", |f| {
            f.no_train = true;
            f.correction = Some(format!("{NO_TRAIN_MARKER} 13M"));
        })
        .await;
        // Feedback on a request whose content was not captured.
        self.feedback("gone", "k1", |f| f.thumbs = Some(Thumbs::Up))
            .await;
    }
}

fn seeded_sqlite(dir: &Path) -> String {
    let url = format!("sqlite://{}", dir.join("store.db").display());
    runtime().block_on(async {
        let seeder = Seeder {
            store: Store::connect(&url).await.unwrap(),
            tenant: "acme".into(),
            tag: "t".into(),
        };
        seeder.seed().await;
        seeder.store.close().await;
    });
    url
}

fn export(url: &str, format: &str, out: &Path, extra: &[&str]) -> Value {
    let mut args = vec![
        "feedback",
        "export",
        "--store",
        url,
        "--format",
        format,
        "--out",
        out.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&ok(&kiln(&args))).unwrap()
}

fn assert_clean(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    for planted in [NO_TRAIN_MARKER, EMAIL, PHONE, "415-555-0132"] {
        assert!(
            !text.contains(planted),
            "{planted} exported in {}",
            path.display()
        );
    }
}

fn count(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

#[test]
fn export_all_formats() {
    let dir = tempfile::tempdir().unwrap();
    let url = seeded_sqlite(dir.path());
    let tok = tokenizer();

    // DPO: correction, preferred choice, comparison, thumbs up vs down, high vs low score.
    let dpo_path = dir.path().join("out/dpo/feedback.jsonl");
    let dpo = export(&url, "dpo", &dpo_path, &[]);
    assert_eq!(dpo["format"], "dpo");
    assert_eq!(dpo["kind"], "conversational");
    assert_eq!(dpo["feedback"], 11, "{dpo:#}");
    assert_eq!(dpo["rows"], 5, "{dpo:#}");
    assert_eq!(dpo["balance"], json!({"pairs": 5}));
    assert_eq!(
        dpo["by_signal"],
        json!({"compared_with": 1, "correction": 1, "preferred_index": 1, "score": 1, "thumbs": 1})
    );
    let dropped = &dpo["dropped"];
    assert_eq!(count(dropped, "duplicate"), 1, "{dropped:#}");
    assert_eq!(count(dropped, "other prompt kind"), 1, "{dropped:#}");
    assert_eq!(
        count(dropped, "no captured content (store.capture_content off?)"),
        1
    );
    assert_eq!(
        count(dropped, "thumbs replaced by a later vote of the same key"),
        1
    );
    assert_eq!(dpo["excluded_no_train"], 1);
    assert_eq!(dpo["rescrubbed"], 1);
    let bytes = std::fs::read(&dpo_path).unwrap();
    assert_eq!(
        dpo["sha256"].as_str().unwrap(),
        format!("{:x}", Sha256::digest(&bytes))
    );
    assert_clean(&dpo_path);
    let opts = PrefDataOptions {
        max_length: 512,
        recipe: PairRecipe::Dpo,
        on_invalid: InvalidPairs::Error,
    };
    let pairs = load_preference_dataset(&dpo_path, &tok, &opts).unwrap();
    assert_eq!(pairs.pairs.len(), 5);
    assert!(pairs.conversational);
    let rows: Vec<Value> = String::from_utf8(bytes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let texts = |key: &str| -> Vec<String> {
        rows.iter()
            .map(|r| r[key][0]["content"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        texts("chosen")[1..],
        [
            "Rayleigh scattering of sunlight.",
            "Hello! How can I help?",
            "7",
            "cat"
        ]
    );
    assert_eq!(
        texts("rejected"),
        ["Lyon, I think.", "Because.", "Go away.", "8", "chat"]
    );
    assert!(texts("chosen")[0].starts_with("Paris. I will also write to <"));

    // KTO: every signal as labelled replies.
    let kto_path = dir.path().join("kto.jsonl");
    let kto = export(&url, "kto", &kto_path, &[]);
    assert_eq!(kto["balance"], json!({"desirable": 5, "undesirable": 5}));
    assert_eq!(count(&kto["dropped"], "duplicate"), 2);
    assert_eq!(count(&kto["dropped"], "other prompt kind"), 2);
    assert_eq!(kto["rescrubbed"], 2);
    assert_clean(&kto_path);
    let unpaired = read_unpaired_preferences(&kto_path).unwrap();
    assert_eq!(unpaired.len(), 10);
    assert_eq!(unpaired.iter().filter(|r| r.label).count(), 5);
    assert!(unpaired.iter().all(|r| r.is_conversational()));

    // SFT: the corrected, preferred and approved replies.
    let sft_path = dir.path().join("sft.jsonl");
    let sft = export(&url, "sft", &sft_path, &[]);
    assert_eq!(sft["rows"], 5);
    assert_eq!(sft["balance"], json!({"examples": 5}));
    assert_eq!(
        count(&sft["dropped"], "thumbs down (SFT keeps approved replies)"),
        1
    );
    assert_eq!(
        count(
            &sft["dropped"],
            "score below --score-threshold (SFT keeps approved replies)"
        ),
        1
    );
    assert_clean(&sft_path);
    let examples = load_sft_dataset(&sft_path, &tok, &SftDataOptions::default()).unwrap();
    assert_eq!(examples.examples.len(), 5);
    assert_eq!(
        examples.format,
        SftFormat::PromptCompletion {
            conversational: true
        }
    );

    // Above 0.9, no score is approved.
    let strict = export(
        &url,
        "sft",
        &dir.path().join("strict.jsonl"),
        &["--score-threshold", "0.95"],
    );
    assert_eq!(strict["rows"], 4);
}

#[test]
fn the_human_summary_and_a_since_filter() {
    let dir = tempfile::tempdir().unwrap();
    let url = seeded_sqlite(dir.path());
    let out = dir.path().join("dpo.jsonl");
    let run = kiln(&[
        "feedback",
        "export",
        "--store",
        &url,
        "--format",
        "kto",
        "--out",
        out.to_str().unwrap(),
        "--since",
        "1h",
    ]);
    assert!(ok(&run).is_empty(), "no --json: nothing on stdout");
    let stderr = String::from_utf8_lossy(&run.stderr);
    for part in [
        "5 desirable / 5 undesirable",
        "2 duplicate",
        "no_train feedback excluded: 1",
        "sha256",
    ] {
        assert!(stderr.contains(part), "{part}: {stderr}");
    }
    // Nothing since a date to come: an empty file, exit 0.
    let future = export(&url, "dpo", &out, &["--since", "2999-01-01"]);
    assert_eq!(
        (future["rows"].as_u64(), future["feedback"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(future["kind"], "empty");
    assert_eq!(std::fs::read(&out).unwrap(), b"");
    assert_eq!(
        future["sha256"],
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}

#[test]
fn custom_patterns_of_the_gateway_config_apply() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    runtime().block_on(async {
        let seeder = Seeder {
            store: Store::connect(&url).await.unwrap(),
            tenant: "acme".into(),
            tag: "x".into(),
        };
        let prompt = chat(&format!("Look up employee {EMPLOYEE_ID}."));
        seeder.content("e1", &prompt, &["Not found."], false).await;
        seeder
            .feedback("e1", "k1", |f| {
                f.correction = Some(format!("{EMPLOYEE_ID} works in sales."));
            })
            .await;
        seeder.store.close().await;
    });
    let gateway = dir.path().join("gateway.yaml");
    std::fs::write(
        &gateway,
        r#"
upstreams:
  - name: local
    url: http://127.0.0.1:9/v1
    models: ["*"]
guardrails:
  input:
    pii:
      action: redact
      custom:
        - name: employee_id
          regex: 'EMP-\d{6}'
"#,
    )
    .unwrap();
    let plain = dir.path().join("plain.jsonl");
    let summary = export(&url, "sft", &plain, &[]);
    assert_eq!(summary["rescrubbed"], 0);
    assert!(
        std::fs::read_to_string(&plain)
            .unwrap()
            .contains(EMPLOYEE_ID)
    );
    let scrubbed = dir.path().join("scrubbed.jsonl");
    let summary = export(
        &url,
        "sft",
        &scrubbed,
        &["--gateway-config", gateway.to_str().unwrap()],
    );
    assert_eq!(
        (summary["rows"].as_u64(), summary["rescrubbed"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(
        !std::fs::read_to_string(&scrubbed)
            .unwrap()
            .contains(EMPLOYEE_ID)
    );
}

#[test]
fn bad_arguments_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.jsonl");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let fail = |args: &[&str]| {
        let mut all = vec!["feedback", "export", "--out", out.to_str().unwrap()];
        all.extend_from_slice(args);
        let run = kiln(&all);
        assert!(!run.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&run.stderr).into_owned()
    };
    let e = fail(&["--store", &url, "--format", "dpo", "--since", "yesterday"]);
    assert!(e.contains("--since") && e.contains("24h"), "{e}");
    let e = fail(&["--store", "mysql://db/x", "--format", "dpo"]);
    assert!(e.contains("sqlite://PATH or postgres://"), "{e}");
    let e = fail(&["--store", &url, "--format", "ppo"]);
    assert!(e.contains("--format"), "{e}");
    let e = fail(&[
        "--store",
        &url,
        "--format",
        "kto",
        "--score-threshold",
        "NaN",
    ]);
    assert!(e.contains("--score-threshold"), "{e}");
    let e = fail(&[
        "--store",
        &url,
        "--format",
        "kto",
        "--gateway-config",
        "/nonexistent/gateway.yaml",
    ]);
    assert!(e.contains("--gateway-config"), "{e}");
    assert!(!out.exists(), "no file is written on an error");
}

#[test]
fn help_has_an_example() {
    let help = ok(&kiln(&["feedback", "export", "--help"]));
    assert!(help.contains("kiln feedback export --store"), "{help}");
}

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// PostgreSQL is shared with other tests and runs: the export is limited to feedback since the
/// seeding began, and the assertions to rows carrying this run's tag.
#[test]
fn export_from_postgres() {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let tag = format!("fbx{nanos:x}");
    let since = rfc3339(SystemTime::now() - Duration::from_secs(1));
    let url = database_url();
    runtime().block_on(async {
        let seeder = Seeder {
            store: Store::connect(&url).await.unwrap(),
            tenant: tag.clone(),
            tag: tag.clone(),
        };
        seeder.seed().await;
        seeder.store.close().await;
    });
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("kto.jsonl");
    let summary = export(&url, "kto", &out, &["--since", &since]);
    assert_clean(&out);
    let mine: Vec<_> = read_unpaired_preferences(&out)
        .unwrap()
        .into_iter()
        .filter(|r| r.prompt.to_string().contains(&tag))
        .collect();
    assert_eq!(mine.len(), 10, "{summary:#}");
    assert_eq!(mine.iter().filter(|r| r.label).count(), 5);
    assert!(count(&summary, "excluded_no_train") >= 1);
    assert!(count(&summary, "rescrubbed") >= 2);
}

/// `t` as `YYYY-MM-DDTHH:MM:SSZ` (whole seconds).
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let (y, m, d) = kiln_monitor::cost::civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}
