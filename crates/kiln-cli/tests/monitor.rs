//! `kiln monitor drift | traces | cost | calibrate` through the binary, on files and a real
//! SQLite trace store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, UNIX_EPOCH};

use kiln_monitor::store::{RequestRecord, Store};
use serde_json::{Value, json};

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

fn write_rows(path: &Path, rows: impl Iterator<Item = Value>) {
    let text: String = rows.map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn question(i: usize) -> Value {
    let names = ["Alice", "Bruno", "Chen", "Dara", "Emil", "Fatima"];
    let what = ["town", "pet", "age", "favourite colour"];
    json!({
        "prompt": format!("What is {}'s {}?", names[i % 6], what[(i / 6 + i) % 4]),
        "completion": format!("The answer is: {}", ["Paris", "cat", "41", "blue"][i % 4]),
    })
}

fn essay(i: usize) -> Value {
    json!({
        "messages": [
            {"role": "user", "content": format!(
                "Write a detailed essay of about {} words on the economics of container shipping, its history, and the controversies among experts, with headings and sources.",
                300 + 100 * (i % 5))},
            {"role": "assistant", "content": "Container shipping began in 1956 when Malcolm McLean loaded fifty-eight boxes onto a converted tanker, and within two decades it had reshaped ports, labour and trade routes across the world."}
        ]
    })
}

#[test]
fn drift_is_flagged_on_shifted_traffic_and_not_on_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a.jsonl"),
        dir.path().join("b.jsonl"),
        dir.path().join("c.jsonl"),
    );
    write_rows(&a, (0..120).map(question));
    write_rows(&b, (120..240).map(question));
    write_rows(&c, (0..120).map(essay));
    let s = |p: &Path| p.to_str().unwrap().to_string();

    let same: Value = serde_json::from_str(&ok(&kiln(&[
        "monitor",
        "drift",
        "--reference",
        &s(&a),
        "--current",
        &s(&b),
        "--json",
    ])))
    .unwrap();
    assert_eq!(same["drift"], false, "{same:#}");

    let shifted: Value = serde_json::from_str(&ok(&kiln(&[
        "monitor",
        "drift",
        "--reference",
        &s(&a),
        "--current",
        &s(&c),
        "--json",
    ])))
    .unwrap();
    assert_eq!(shifted["drift"], true, "{shifted:#}");
    let features = shifted["features"].as_array().unwrap();
    let drifted = |name: &str| {
        features
            .iter()
            .find(|f| f["feature"] == name)
            .unwrap_or_else(|| panic!("no {name} in {features:?}"))["drift"]
            .as_bool()
            .unwrap()
    };
    for name in [
        "prompt_length",
        "prompt_words",
        "prompt_embedding",
        "output_length",
    ] {
        assert!(drifted(name), "{name} should drift: {shifted:#}");
    }

    // The table names the verdict on its last line.
    let table = ok(&kiln(&[
        "monitor",
        "drift",
        "--reference",
        &s(&a),
        "--current",
        &s(&c),
    ]));
    assert!(
        table.lines().last().unwrap().starts_with("drift: true"),
        "{table}"
    );

    // A bad row names its file and line.
    std::fs::write(&b, "{\"prompt\": \"fine\"}\n\n{\"prompt\": 3}\n").unwrap();
    let out = kiln(&[
        "monitor",
        "drift",
        "--reference",
        &s(&a),
        "--current",
        &s(&b),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:3", b.display())), "{err}");
}

#[test]
fn traces_and_cost_read_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("gw.db").display());
    let day = UNIX_EPOCH + Duration::from_secs(86_400 * 20_400);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = Store::connect(&url).await.unwrap();
        for (i, tenant) in ["a", "a", "b"].iter().enumerate() {
            store
                .record(&RequestRecord {
                    request_id: format!("r{i}"),
                    at: day + Duration::from_secs(1800 * i as u64),
                    tenant: (*tenant).into(),
                    model: "llama".into(),
                    status: 200,
                    prompt_tokens: 1500,
                    completion_tokens: 500,
                    cost_usd: Some(0.002),
                    total_ms: Some(0.0),
                    mean_logprob: Some(-0.5),
                    hallucination: Some(i == 2),
                    ..RequestRecord::default()
                })
                .await
                .unwrap();
        }
        store.close().await;
    });
    let out = dir.path().join("traces.jsonl");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    ok(&kiln(&[
        "monitor",
        "traces",
        "--store",
        &url,
        "--out",
        &s(&out),
    ]));
    let rows: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[2]["hallucination"], true);
    assert_eq!(rows[0]["mean_logprob"], -0.5);

    // One hour of serving, 6,000 tokens: at $3/hour, $0.50 per 1k tokens; tenant a has 4,000.
    let report: Value = serde_json::from_str(&ok(&kiln(&[
        "monitor", "cost", "--store", &url, "--infra", "llama=3", "--json",
    ])))
    .unwrap();
    let m = &report["models"][0];
    assert_eq!(m["tokens"], 6000);
    assert!((m["hours"].as_f64().unwrap() - 1.0).abs() < 1e-9, "{m}");
    assert!((m["infra_usd_per_1k_tokens"].as_f64().unwrap() - 0.5).abs() < 1e-9);
    let a = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["tenant"] == "a")
        .unwrap();
    assert!((a["infra_usd"].as_f64().unwrap() - 2.0).abs() < 1e-9, "{a}");
    assert!((a["price_usd_per_1k_tokens"].as_f64().unwrap() - 0.001).abs() < 1e-12);
    let table = ok(&kiln(&[
        "monitor", "cost", "--store", &url, "--infra", "*=3",
    ]));
    assert!(table.contains("0.500000"), "{table}");
    let bad = kiln(&["monitor", "cost", "--store", &url, "--infra", "llama"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("MODEL=USD_PER_HOUR"));
}

#[test]
fn calibrate_fits_and_reports_auroc() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("labelled.jsonl");
    // Wrong answers come with lower log-probs, with overlap.
    write_rows(
        &samples,
        (0..200).map(|i| {
            let wrong = i % 3 == 0;
            let noise = ((i * 37) % 17) as f64 / 17.0;
            let lp = if wrong {
                -1.6 + noise
            } else {
                -0.4 - 0.8 * noise
            };
            json!({"mean_logprob": lp, "mean_entropy": -lp * 1.2, "wrong": wrong})
        }),
    );
    let out = dir.path().join("calibration.json");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let report: Value = serde_json::from_str(&ok(&kiln(&[
        "monitor",
        "calibrate",
        "--samples",
        &s(&samples),
        "--out",
        &s(&out),
        "--json",
    ])))
    .unwrap();
    assert_eq!(report["n"], 200);
    assert!(report["auroc"].as_f64().unwrap() > 0.8, "{report}");
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert!(saved["weights"].is_array());

    std::fs::write(&samples, "{\"mean_logprob\": -1.0}\n").unwrap();
    let bad = kiln(&[
        "monitor",
        "calibrate",
        "--samples",
        &s(&samples),
        "--out",
        &s(&out),
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains(&format!("{}:1", samples.display())), "{err}");
    assert!(err.contains("wrong"), "{err}");
}
