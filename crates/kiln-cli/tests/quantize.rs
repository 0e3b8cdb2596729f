//! `kiln quantize` end to end: the binary quantizes the tiny Llama fixture, and every other
//! command (eval, generate, export) runs on what it wrote.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model() -> String {
    repo_root()
        .join("testdata/hf/llama")
        .to_str()
        .unwrap()
        .to_string()
}

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("kiln runs")
}

fn succeed(out: &Output) -> String {
    assert!(
        out.status.success(),
        "kiln failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn fail(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "kiln should have failed; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A small fixed calibration file: documents separated by blank lines.
fn calibration(dir: &Path) -> String {
    let words = [
        "the", "model", "learns", "to", "predict", "next", "token", "from", "a", "small", "world",
        "river", "flows", "into", "sea", "birds", "sing", "over", "green", "hills",
    ];
    let docs: Vec<String> = (0..40)
        .map(|d| {
            let line: Vec<&str> = (0..40)
                .map(|i| words[(d * 7 + i * i * 3) % words.len()])
                .collect();
            format!("{}.", line.join(" "))
        })
        .collect();
    let path = dir.join("calibration.txt");
    std::fs::write(&path, docs.join("\n\n")).unwrap();
    path.to_str().unwrap().to_string()
}

/// `kiln quantize --json` with small calibration; returns the parsed report.
fn quantize(dir: &Path, out: &Path, extra: &[&str]) -> Value {
    let calib = calibration(dir);
    let model = model();
    let mut args = vec![
        "quantize",
        "--model",
        &model,
        "--calibration",
        &calib,
        "--samples",
        "4",
        "--seq-len",
        "64",
        "--group-size",
        "32",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let stdout = succeed(&kiln(&args));
    serde_json::from_str(&stdout).expect("stdout is the JSON report")
}

#[test]
fn quantize_json_then_eval_and_generate_on_the_output() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("gptq");
    let report = quantize(tmp.path(), &out, &["--method", "gptq", "--bits", "4"]);
    assert_eq!(report["method"], "gptq");
    assert_eq!(report["bits"], 4);
    assert_eq!(report["group_size"], 32);
    assert_eq!(report["format"], "gptq");
    assert_eq!(report["samples"], 4);
    assert_eq!(report["seq_len"], 64);
    let bpw = report["bits_per_weight"].as_f64().unwrap();
    assert!((4.0..=6.0).contains(&bpw), "{bpw}");
    assert!(report["quantized_bytes"].as_u64().unwrap() < report["source_bytes"].as_u64().unwrap());
    for key in ["perplexity_before", "perplexity_after"] {
        let p = report[key].as_f64().unwrap();
        assert!(p.is_finite() && p > 1.0, "{key} {p}");
    }
    assert_eq!(report["layers"].as_array().unwrap().len(), 14);
    assert!(report["layers"][0]["gptq_loss"].is_number());
    // The report on disk is the one printed.
    let on_disk: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("quantize_report.json")).unwrap())
            .unwrap();
    assert_eq!(on_disk["bits_per_weight"], report["bits_per_weight"]);

    let readme = repo_root().join("README.md");
    let eval = succeed(&kiln(&[
        "eval",
        "perplexity",
        "--model",
        out.to_str().unwrap(),
        "--text-file",
        readme.to_str().unwrap(),
        "--json",
    ]));
    let eval: Value = serde_json::from_str(&eval).unwrap();
    let ppl = eval["perplexity"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0, "{ppl}");

    let gen_out = kiln(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "--json",
    ]);
    let generated: Value = serde_json::from_str(&succeed(&gen_out)).unwrap();
    let n = generated["token_ids"].as_array().unwrap().len();
    assert!((1..=4).contains(&n), "{generated}");
}

#[test]
fn awq_writes_the_awq_layout_and_it_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("awq");
    let report = quantize(
        tmp.path(),
        &out,
        &["--method", "awq", "--bits", "4", "--no-eval"],
    );
    assert_eq!(report["method"], "awq");
    assert_eq!(report["format"], "awq");
    assert!(report["perplexity_before"].is_null());
    assert_eq!(report["awq_alphas"].as_array().unwrap().len(), 2);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization_config"]["quant_method"], "awq");
    succeed(&kiln(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-tokens",
        "4",
    ]));
}

#[test]
fn bad_bits_and_methods_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let base = [
        "quantize",
        "--model",
        &model(),
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from);
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        fail(&kiln(&args))
    };
    let err = run(&["--method", "gptq", "--bits", "3"]);
    assert!(err.contains("`3`") && err.contains("4 or 8 bits"), "{err}");
    let err = run(&["--method", "foo", "--bits", "4"]);
    assert!(
        err.contains("`foo`") && err.contains("rtn, gptq or awq"),
        "{err}"
    );
    let err = run(&["--method", "rtn", "--bits", "4", "--group-size", "0"]);
    assert!(err.contains("--group-size 0"), "{err}");
    let err = run(&["--method", "rtn", "--bits", "4", "--format", "exl2"]);
    assert!(
        err.contains("`exl2`") && err.contains("gptq or awq"),
        "{err}"
    );
    let err = run(&["--method", "awq", "--bits", "4", "--act-order"]);
    assert!(err.contains("act-order"), "{err}");
    let err = run(&["--method", "awq", "--bits", "8", "--format", "awq"]);
    assert!(err.contains("4-bit"), "{err}");
    assert!(!out.join("config.json").exists());
}

#[test]
fn a_quantized_dir_exports_to_gguf_and_the_gguf_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("gptq8");
    quantize(
        tmp.path(),
        &out,
        &["--method", "rtn", "--bits", "8", "--no-eval"],
    );
    let gguf = tmp.path().join("x.gguf");
    succeed(&kiln(&[
        "export",
        "gguf",
        "--model",
        out.to_str().unwrap(),
        "--type",
        "q8_0",
        "--out",
        gguf.to_str().unwrap(),
    ]));
    assert!(std::fs::metadata(&gguf).unwrap().len() > 0);
    let generated = succeed(&kiln(&[
        "generate",
        "--model",
        gguf.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "--json",
    ]));
    let generated: Value = serde_json::from_str(&generated).unwrap();
    assert!(!generated["token_ids"].as_array().unwrap().is_empty());
}
