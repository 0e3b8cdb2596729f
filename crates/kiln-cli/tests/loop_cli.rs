//! `kiln loop` and `kiln models list` through the binary, against a running `kiln serve` (the
//! fixture model with an adapter `prod`, admin endpoint on) and a real SQLite store seeded with
//! captured content and feedback.
//!
//! The candidate is trained with a learning rate too small to change a weight, so it answers
//! exactly as the serving adapter does: every held-out prompt is a tie, the win rate is exactly
//! 0.5, and the decision is set by the margin alone — refused with a margin, promoted (and
//! hot-swapped into the server) without one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::SystemTime;

use kiln_monitor::feedback::{Feedback, SOURCE_API};
use kiln_monitor::store::{ContentRecord, RequestRecord, Store};
use serde_json::Value;

const ADMIN_KEY: &str = "loop-test-admin";

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_ADMIN_KEY", ADMIN_KEY)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "kiln failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// `kiln loop --config CONFIG --json`: the round's report.
fn run_loop(config: &Path) -> Value {
    let out = ok(&kiln(&[
        "loop",
        "--config",
        config.to_str().unwrap(),
        "--json",
    ]));
    serde_json::from_str(&out).unwrap()
}

/// `kiln models list --registry sqlite://DIR/gw.db`.
fn models_list(dir: &Path, json: bool) -> String {
    let registry = format!("sqlite://{}", dir.join("gw.db").display());
    let mut args = vec!["models", "list", "--registry", registry.as_str()];
    if json {
        args.push("--json");
    }
    ok(&kiln(&args))
}

/// `kiln serve` on a free port, stopped when dropped.
struct Served {
    child: Child,
    url: String,
}

impl Served {
    fn start(adapter: &Path) -> Self {
        Self::start_with(adapter, &[])
    }

    fn start_with(adapter: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("serve")
            .args(extra)
            .args([
                "--model",
                testdata().join("hf/llama").to_str().unwrap(),
                "--adapter",
                &format!("prod={}", adapter.display()),
                "--port",
                "0",
                "--admin-key",
                ADMIN_KEY,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let at = line
            .find("http://")
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        let addr: String = line[at..]
            .chars()
            .take_while(|c| !c.is_whitespace())
            .collect();
        Self { child, url: addr }
    }

    /// The adapter `prod` serves, per the admin endpoint.
    fn prod(&self) -> String {
        let out = Command::new("curl")
            .args([
                "-sf",
                "-H",
                &format!("Authorization: Bearer {ADMIN_KEY}"),
                &format!("{}/admin/adapters", self.url),
            ])
            .output()
            .unwrap();
        let body: Value = serde_json::from_slice(&out.stdout).unwrap();
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == "prod")
            .unwrap()["path"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A store with `pairs` chat requests of two choices each, the second preferred.
fn seed_store(db: &Path, pairs: usize) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = Store::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        for i in 0..pairs {
            let request_id = format!("kgw-{i:04}");
            let completion_id = format!("chatcmpl-{i:04}");
            store
                .record(&RequestRecord {
                    request_id: request_id.clone(),
                    at: SystemTime::now(),
                    tenant: "acme".into(),
                    key_id: "k1".into(),
                    model: "prod".into(),
                    status: 200,
                    completion_id: Some(completion_id.clone()),
                    ..RequestRecord::default()
                })
                .await
                .unwrap();
            store
                .record_content(&ContentRecord {
                    request_id: request_id.clone(),
                    at: SystemTime::now(),
                    tenant: "acme".into(),
                    model: "prod".into(),
                    no_train: false,
                    prompt: format!(
                        "[{{\"role\":\"user\",\"content\":\"What is {i} plus {i}?\"}}]"
                    ),
                    completion: Some(format!("It is {}.", i + 1)),
                    completion_id: Some(completion_id.clone()),
                    choices: vec![format!("It is {}.", i + 1), format!("Answer: {}.", 2 * i)],
                })
                .await
                .unwrap();
            store
                .record_feedback(&Feedback {
                    feedback_id: Feedback::new_id(),
                    at: SystemTime::now(),
                    request_id,
                    completion_id: Some(completion_id),
                    tenant: "acme".into(),
                    key_id: "k1".into(),
                    source: SOURCE_API.into(),
                    thumbs: None,
                    score: None,
                    correction: None,
                    preferred_index: Some(1),
                    compared_with: None,
                    no_train: false,
                })
                .await
                .unwrap();
        }
        store.close().await;
    });
}

/// A working directory with a world (for the rules judge), a store and loop.yaml.
struct Setup {
    dir: tempfile::TempDir,
    adapter: PathBuf,
}

impl Setup {
    fn new(pairs: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        kiln_data::write_world(&dir.path().join("world"), &kiln_data::SynthOptions::quick())
            .unwrap();
        seed_store(&dir.path().join("gw.db"), pairs);
        // The serving adapter, copied: the loop trains a copy of it further.
        let adapter = dir.path().join("prod-adapter");
        std::fs::create_dir_all(&adapter).unwrap();
        for f in std::fs::read_dir(testdata().join("hf/llama-lora")).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, adapter.join(f.file_name().unwrap())).unwrap();
        }
        Self { dir, adapter }
    }

    fn config(&self, serve_url: &str, margin: f64) -> PathBuf {
        let d = self.dir.path();
        let yaml = format!(
            "store: sqlite://{db}\n\
             out: {out}\n\
             model: {model}\n\
             served_name: prod\n\
             serve:\n  url: {serve_url}\n\
             export:\n  min_pairs: 8\n\
             dpo:\n  training_args:\n    max_steps: 2\n    per_device_train_batch_size: 4\n    learning_rate: 1.0e-30\n    max_length: 64\n    logging_steps: 1\n\
             eval:\n  prompts: {world}/eval/facts.jsonl\n  world: {world}/world.json\n  max_prompts: 4\n  max_new_tokens: 4\n  margin: {margin}\n",
            db = d.join("gw.db").display(),
            out = d.join("rounds").display(),
            model = testdata().join("hf/llama").display(),
            world = d.join("world").display(),
        );
        let path = d.join(format!("loop-{margin}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        path
    }
}

#[test]
fn a_candidate_that_does_not_win_by_the_margin_is_refused_and_one_that_does_is_swapped_in() {
    let setup = Setup::new(12);
    let served = Served::start(&setup.adapter);
    let before = served.prod();

    // Ties everywhere: a 0.5 win rate does not clear a 0.2 margin.
    let config = setup.config(&served.url, 0.2);
    let round = run_loop(&config);
    assert_eq!(round["decision"], "rejected", "{round:#}");
    assert_eq!(round["export"]["rows"], 12);
    assert_eq!(round["evaluation"]["win_rate"], 0.5);
    assert_eq!(round["evaluation"]["ties"], 4);
    assert!(
        round["reason"]
            .as_str()
            .unwrap()
            .contains("below the 70.0%"),
        "{round:#}"
    );
    assert_eq!(round["round"], 1);
    assert_eq!(served.prod(), before, "a refused candidate is not loaded");
    assert_eq!(
        round["parent"].as_str().unwrap(),
        before,
        "the loop asked the server what serves"
    );

    // No margin: the candidate is promoted and hot-swapped into the running server.
    let config = setup.config(&served.url, 0.0);
    let round = run_loop(&config);
    assert_eq!(round["decision"], "promoted", "{round:#}");
    let candidate = round["candidate"].as_str().unwrap();
    let now = served.prod();
    assert_eq!(
        std::path::absolute(candidate).unwrap(),
        PathBuf::from(&now),
        "prod serves the candidate"
    );
    assert_eq!(round["swap"]["swap"]["replaced"], true, "{round:#}");
    let report: Value = serde_json::from_slice(
        &std::fs::read(Path::new(round["dir"].as_str().unwrap()).join("round.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["decision"], "promoted");

    // The registry has both rounds, the promoted one marked as serving.
    let table = models_list(setup.dir.path(), false);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[1].contains("rejected") && !lines[1].starts_with("   1*"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("   2*") && lines[2].contains("promoted"),
        "{table}"
    );
    let json: Value = serde_json::from_str(&models_list(setup.dir.path(), true)).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
    assert_eq!(json[1]["parent"].as_str().unwrap(), before);
    assert_eq!(json[1]["data_rows"], 12);
    assert_eq!(json[1]["data_snapshot"].as_str().unwrap().len(), 64);
    assert_eq!(json[1]["metrics"]["win_rate"], 0.5);

    // By hand: roll back to what served before, then promote round 2 again.
    let registry = format!("sqlite://{}", setup.dir.path().join("gw.db").display());
    let manual = |args: &[&str]| {
        let mut all = vec!["models"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--registry", &registry, "--serve", &served.url]);
        kiln(&all)
    };
    let out = ok(&manual(&["rollback", "--served-name", "prod"]));
    assert!(out.contains("PROMOTED"), "{out}");
    assert_eq!(served.prod(), before, "the previous adapter serves again");
    ok(&manual(&["promote", "2"]));
    assert_eq!(PathBuf::from(served.prod()), PathBuf::from(&now));
    let table = models_list(setup.dir.path(), false);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 5, "{table}");
    assert!(
        lines[3].starts_with("   3 ") && lines[3].contains("prod-adapter"),
        "{table}"
    );
    assert!(
        lines[4].starts_with("   4*") && lines[4].contains("candidate"),
        "{table}"
    );
    let missing = manual(&["promote", "99"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("round 99: no such round"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    drop(served);
}

#[test]
fn a_promotion_that_fails_its_check_is_rolled_back() {
    // The server wants an API key the loop was not given: the swap succeeds, the request that
    // checks it is refused, and the previous adapter is put back.
    let setup = Setup::new(10);
    let served = Served::start_with(&setup.adapter, &["--api-key", "user-key"]);
    let before = served.prod();
    let config = setup.config(&served.url, 0.0);
    let round = run_loop(&config);
    assert_eq!(round["decision"], "rolled_back", "{round:#}");
    let reason = round["reason"].as_str().unwrap();
    assert!(
        reason.contains("401") && reason.contains("restored"),
        "{reason}"
    );
    assert_eq!(round["swap"]["swap"]["replaced"], true, "{round:#}");
    assert_eq!(served.prod(), before, "the previous adapter serves again");
    let table = models_list(setup.dir.path(), false);
    assert!(
        table.contains("rolled_back") && !table.contains('*'),
        "{table}"
    );
}

#[test]
fn too_little_feedback_trains_nothing_and_records_nothing() {
    let setup = Setup::new(3);
    let served = Served::start(&setup.adapter);
    let config = setup.config(&served.url, 0.0);
    let round = run_loop(&config);
    assert_eq!(round["decision"], "skipped", "{round:#}");
    assert!(round["reason"].as_str().unwrap().contains("min_pairs"));
    assert!(round["round"].is_null());
    let table = models_list(setup.dir.path(), false);
    assert!(table.contains("no rounds recorded"), "{table}");
}

#[test]
fn config_mistakes_are_named() {
    let setup = Setup::new(0);
    let d = setup.dir.path();
    let write = |name: &str, yaml: &str| {
        let p = d.join(name);
        std::fs::write(&p, yaml).unwrap();
        p
    };
    let base = format!(
        "store: sqlite://{}\nmodel: m\nserved_name: prod\neval:\n  prompts: p.jsonl\n  world: w.json\n",
        d.join("gw.db").display()
    );
    let cases = [
        (format!("{base}colour: blue\n"), "colour"),
        (format!("{base}dpo:\n  model_id: x\n"), "dpo.model_id"),
        (base.replace("  world: w.json\n", ""), "eval.world"),
        (format!("{base}since: yesterday\n"), "since"),
        (
            format!("{base}serve:\n  url: http://127.0.0.1:9\n  admin_key_env: KILN_NO_SUCH_VAR\n"),
            "KILN_NO_SUCH_VAR",
        ),
    ];
    for (i, (yaml, expected)) in cases.iter().enumerate() {
        let path = write(&format!("bad-{i}.yaml"), yaml);
        let out = kiln(&["loop", "--config", path.to_str().unwrap()]);
        assert!(!out.status.success(), "case {i} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(expected),
            "case {i}: expected `{expected}` in {err}"
        );
    }
}

#[test]
fn models_list_on_an_empty_registry_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let registry = format!("sqlite://{}", dir.path().join("empty.db").display());
    let table = ok(&kiln(&["models", "list", "--registry", &registry]));
    assert!(table.contains("no rounds recorded"), "{table}");
}
