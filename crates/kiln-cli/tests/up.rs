#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `kiln up` and graceful operations, through the real binary over real ports:
//!
//! - `kiln up --model …` is a working stack: the generated key is printed once and opens the
//!   API, a missing or wrong key is refused, the dashboard and probes answer, traces land in
//!   the SQLite store;
//! - without `--model` it serves what `kiln lifecycle` recorded (adapters included), and says how
//!   to get a model when nothing is recorded;
//! - SIGTERM drains: readiness drops to 503 first while other requests are still served during
//!   `--drain-delay`, a stream in flight finishes, and the process exits 0 — for `kiln up`,
//!   `kiln serve` and `kiln gateway`;
//! - configuration errors stop start-up with a message that names the flag, file or key.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

fn model() -> String {
    testdata().join("hf/llama").to_string_lossy().into_owned()
}

/// A running kiln process: its stdout up to the `listening on http://ADDR` line, the address.
struct Running {
    child: Child,
    stdout: BufReader<ChildStdout>,
    banner: String,
    url: String,
}

impl Running {
    // The child is waited for on every path: here when it exits early, else by `wait` or Drop.
    #[allow(clippy::zombie_processes)]
    fn start(args: &[&str], env: &[(&str, &Path)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command
            .args(args)
            .env_remove("KILN_API_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut banner = String::new();
        loop {
            let mut line = String::new();
            if stdout.read_line(&mut line).unwrap() == 0 {
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                let _ = child.wait();
                panic!("kiln {args:?} exited before listening:\n{banner}\n{err}");
            }
            banner.push_str(&line);
            if let Some(at) = line.find("listening on http://") {
                let url: String = line[at + "listening on ".len()..]
                    .chars()
                    .take_while(|c| !c.is_whitespace())
                    .collect();
                return Self {
                    child,
                    stdout,
                    banner,
                    url,
                };
            }
        }
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the exit (at most a minute) and returns the status and what went to stderr.
    fn wait(mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                self.child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                let mut rest = String::new();
                let _ = self.stdout.read_to_string(&mut rest);
                return (status, err);
            }
            assert!(
                Instant::now() < deadline,
                "still running a minute after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn get(url: &str) -> (u16, Value) {
    runtime().block_on(async {
        let r = reqwest::get(url).await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    })
}

fn chat(url: &str, key: Option<&str>, model: &str, content: &str) -> (u16, Value) {
    runtime().block_on(async {
        let mut request = reqwest::Client::new()
            .post(format!("{url}/v1/chat/completions"))
            .json(&json!({
                "model": model,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": 8,
                "temperature": 0
            }));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let r = request.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    })
}

/// The value after `label` on the banner line that has it.
fn banner_value<'a>(banner: &'a str, label: &str) -> &'a str {
    let line = banner
        .lines()
        .find(|l| l.starts_with(&format!("kiln up: {label}")))
        .unwrap_or_else(|| panic!("no `{label}` line in\n{banner}"));
    line[format!("kiln up: {label}").len()..]
        .split_whitespace()
        .next()
        .unwrap()
}

fn kiln(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command.args(args).env_remove("KILN_API_KEY");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

fn failure(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure, got {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn kiln_up_is_a_working_stack_that_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("up.db");
    let store = format!("sqlite://{}", db.display());
    let up = Running::start(
        &[
            "up",
            "--model",
            &model(),
            "--port",
            "0",
            "--store",
            &store,
            "--drain-delay",
            "1",
        ],
        &[("XDG_STATE_HOME", dir.path())],
    );
    let key = banner_value(&up.banner, "API key").to_string();
    assert!(key.starts_with("sk-kiln-") && key.len() == 40, "{key}");
    assert_eq!(
        up.banner.matches(&key).count(),
        2,
        "the key and the curl example:\n{}",
        up.banner
    );
    assert_eq!(
        banner_value(&up.banner, "dashboard"),
        format!("{}/dashboard", up.url)
    );

    let (status, reply) = chat(&up.url, Some(&key), "llama", "Hello there");
    assert_eq!(status, 200, "{reply}");
    let completion_id = reply["id"].as_str().unwrap().to_string();
    assert_eq!(chat(&up.url, None, "llama", "Hello").0, 401);
    assert_eq!(
        chat(&up.url, Some("sk-kiln-wrong"), "llama", "Hello").0,
        401
    );
    assert_eq!(chat(&up.url, Some(&key), "nope", "Hello").0, 404);
    assert_eq!(get(&format!("{}/live", up.url)).0, 200);
    assert_eq!(get(&format!("{}/ready", up.url)).1["status"], "ready");
    let (status, page) = get(&format!("{}/dashboard", up.url));
    assert_eq!(status, 200);
    assert!(page.as_str().unwrap().contains("<html"));

    // Feedback on the reply is accepted: the trace is in the store.
    let feedback = runtime().block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = reqwest::Client::new()
                .post(format!("{}/v1/feedback", up.url))
                .bearer_auth(&key)
                .json(&json!({"completion_id": completion_id, "thumbs": "up"}))
                .send()
                .await
                .unwrap();
            // The trace is written just after the reply; until then the id is unknown.
            if r.status() != 404 || Instant::now() > deadline {
                return r.status().as_u16();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert_eq!(feedback, 200);

    // SIGTERM with a stream in flight: readiness drops, the stream finishes, the process exits 0.
    let (ready_after, other_request, stream_done) = runtime().block_on(async {
        let client = reqwest::Client::new();
        let mut stream = client
            .post(format!("{}/v1/chat/completions", up.url))
            .bearer_auth(&key)
            .json(&json!({
                "model": "llama",
                "messages": [{"role": "user", "content": "Tell me a long story"}],
                "max_tokens": 64,
                "temperature": 0,
                "stream": true
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(stream.status(), 200);
        let mut body = String::from_utf8(stream.chunk().await.unwrap().unwrap().to_vec()).unwrap();
        up.sigterm();
        // Readiness drops at once; during the drain delay other requests are still served.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut ready = 200;
        while ready == 200 && Instant::now() < deadline {
            ready = client
                .get(format!("{}/ready", up.url))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16();
        }
        let other = client
            .get(format!("{}/v1/models", up.url))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        while let Some(chunk) = stream.chunk().await.unwrap() {
            body.push_str(&String::from_utf8_lossy(&chunk));
        }
        (ready, other, body.trim_end().ends_with("data: [DONE]"))
    });
    assert_eq!(ready_after, 503);
    assert_eq!(other_request, 200, "served during the drain delay");
    assert!(stream_done, "the stream in flight finished");
    let (status, err) = up.wait();
    assert!(status.success(), "{err}");
    assert!(
        err.contains("draining") && err.contains("kiln up: stopped"),
        "{err}"
    );
    assert!(db.is_file());
}

#[test]
fn kiln_up_serves_what_the_lifecycle_recorded() {
    let state = tempfile::tempdir().unwrap();
    let record = state.path().join("kiln/last-lifecycle.json");
    std::fs::create_dir_all(record.parent().unwrap()).unwrap();
    std::fs::write(
        &record,
        serde_json::to_string(&json!({
            "out": testdata(),
            "model": testdata().join("hf/llama"),
            "served_model_name": "sft",
            "adapters": [{"name": "dpo", "path": testdata().join("hf/llama-lora")}]
        }))
        .unwrap(),
    )
    .unwrap();
    let store = format!("sqlite://{}", state.path().join("up.db").display());
    let up = Running::start(
        &["up", "--port", "0", "--store", &store],
        &[("XDG_STATE_HOME", state.path())],
    );
    assert!(
        up.banner.contains("kiln up: models     sft, dpo"),
        "{}",
        up.banner
    );
    let key = banner_value(&up.banner, "API key").to_string();
    assert_eq!(chat(&up.url, Some(&key), "dpo", "Hello").0, 200);
    assert_eq!(chat(&up.url, Some(&key), "sft", "Hello").0, 200);

    // With nothing recorded, kiln up says how to get a model.
    let empty = tempfile::tempdir().unwrap();
    let err = failure(&kiln(&["up"], &[("XDG_STATE_HOME", empty.path())]));
    assert!(
        err.contains("--model") && err.contains("kiln lifecycle --quick"),
        "{err}"
    );
    // A record whose model is gone is named, with the way out.
    std::fs::write(
        &record,
        serde_json::to_string(&json!({
            "out": "/nonexistent", "model": "/nonexistent/sft_merged",
            "served_model_name": "sft", "adapters": []
        }))
        .unwrap(),
    )
    .unwrap();
    let err = failure(&kiln(&["up"], &[("XDG_STATE_HOME", state.path())]));
    assert!(err.contains("/nonexistent/sft_merged is gone"), "{err}");
}

#[test]
fn configuration_errors_stop_start_up_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("XDG_STATE_HOME", dir.path())];
    let err = failure(&kiln(&["up", "--model", "/nonexistent/model"], &env));
    assert!(err.contains("/nonexistent/model"), "{err}");
    let err = failure(&kiln(
        &["up", "--model", &model(), "--drain-delay=-1"],
        &env,
    ));
    assert!(err.contains("--drain-delay"), "{err}");
    let err = failure(&kiln(
        &["serve", "--model", &model(), "--shutdown-timeout", "nan"],
        &env,
    ));
    assert!(err.contains("--shutdown-timeout"), "{err}");

    // The port is taken: the error says which flag to change.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let store = format!("sqlite://{}", dir.path().join("up.db").display());
    let err = failure(&kiln(
        &[
            "up",
            "--model",
            &model(),
            "--port",
            &port,
            "--store",
            &store,
        ],
        &env,
    ));
    assert!(err.contains("--port") && err.contains(&port), "{err}");
    let err = failure(&kiln(
        &[
            "up",
            "--model",
            &model(),
            "--port",
            "0",
            "--store",
            "mysql://x",
        ],
        &env,
    ));
    assert!(err.contains("mysql://x"), "{err}");

    // A gateway config with a misspelt key names the file and the key.
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        "upstreams:\n  - name: a\n    url: http://127.0.0.1:9/v1\n    models: ['*']\nlimits:\n  backnd: redis\n",
    )
    .unwrap();
    let err = failure(&kiln(
        &["gateway", "--config", config.to_str().unwrap()],
        &env,
    ));
    assert!(
        err.contains("gateway.yaml") && err.contains("backnd"),
        "{err}"
    );
}

/// `kiln serve` and `kiln gateway` on their own: SIGTERM drops readiness first, keeps serving
/// through the drain delay, then exits 0.
#[test]
fn serve_and_gateway_drain_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Running::start(
        &[
            "serve",
            "--model",
            &model(),
            "--port",
            "0",
            "--drain-delay",
            "1",
        ],
        &[],
    );
    assert_eq!(get(&format!("{}/ready", serve.url)).1["status"], "ready");
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nupstreams:\n  - name: serve\n    url: {}/v1\n    models: ['*']\nstore:\n  url: sqlite://{}\n",
            serve.url,
            dir.path().join("gw.db").display()
        ),
    )
    .unwrap();
    let gateway = Running::start(
        &[
            "gateway",
            "--config",
            config.to_str().unwrap(),
            "--drain-delay",
            "1",
        ],
        &[],
    );
    assert_eq!(get(&format!("{}/ready", gateway.url)).1["status"], "ready");
    assert_eq!(chat(&gateway.url, None, "llama", "Hello").0, 200);

    for running in [gateway, serve] {
        running.sigterm();
        let deadline = Instant::now() + Duration::from_secs(5);
        let (mut status, mut body) = get(&format!("{}/ready", running.url));
        while status == 200 && Instant::now() < deadline {
            (status, body) = get(&format!("{}/ready", running.url));
        }
        assert_eq!((status, body["status"].as_str()), (503, Some("draining")));
        assert_eq!(
            get(&format!("{}/live", running.url)).0,
            200,
            "alive while draining"
        );
        let (exit, err) = running.wait();
        assert!(exit.success(), "{err}");
        assert!(err.contains("draining"), "{err}");
    }
}
