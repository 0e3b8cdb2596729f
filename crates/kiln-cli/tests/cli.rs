//! The `kiln` binary end to end on the reference fixture: real files, real process, real output.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/hf")
}

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("kiln runs")
}

fn stdout_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "kiln failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(testdata().join("llama/expected.json")).unwrap())
        .unwrap()
}

fn model() -> String {
    testdata().join("llama").to_str().unwrap().to_string()
}

#[test]
fn generate_json_matches_transformers_greedy() {
    for case in expected()["greedy"].as_array().unwrap() {
        let out = kiln(&[
            "generate",
            "--model",
            &model(),
            "--prompt",
            case["prompt"].as_str().unwrap(),
            "--max-tokens",
            "16",
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
        ]);
        let v = stdout_json(&out);
        assert_eq!(v["prompt_token_ids"], case["prompt_ids"]);
        assert_eq!(v["token_ids"], case["new_ids"]);
        assert_eq!(v["text"], case["text"]);
        assert_eq!(v["finish_reason"], "length");
    }
}

#[test]
fn generate_stops_at_eos_and_sampling_is_seeded() {
    // Greedy from this prompt reaches EOS (id 3) as its 8th token.
    let args = [
        "generate",
        "--model",
        &model(),
        "--prompt",
        "The model learns",
        "--temperature",
        "0",
        "--json",
    ];
    let v = stdout_json(&kiln(&args));
    assert_eq!(v["finish_reason"], "stop");
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 8);
    assert_eq!(v["token_ids"][7], 3);

    let sample = |seed: &str| {
        stdout_json(&kiln(&[
            "generate",
            "--model",
            &model(),
            "--prompt",
            "A small cat",
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--top-k",
            "50",
            "--seed",
            seed,
            "--max-tokens",
            "12",
            "--ignore-eos",
            "--json",
        ]))["token_ids"]
            .clone()
    };
    assert_eq!(sample("5"), sample("5"));
    assert_ne!(sample("5"), sample("6"));
}

#[test]
fn generate_with_adapter_matches_peft() {
    let lora: Value = serde_json::from_str(
        &std::fs::read_to_string(testdata().join("llama-lora/expected.json")).unwrap(),
    )
    .unwrap();
    let case = &lora["greedy"][0];
    let out = kiln(&[
        "generate",
        "--model",
        &model(),
        "--adapter",
        testdata().join("llama-lora").to_str().unwrap(),
        "--prompt",
        case["prompt"].as_str().unwrap(),
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ]);
    assert_eq!(stdout_json(&out)["token_ids"], case["new_ids"]);
}

#[test]
fn streamed_text_equals_json_text() {
    let common = [
        "generate",
        "--model",
        &model(),
        "--prompt",
        "42 + 17 =",
        "--max-tokens",
        "16",
        "--temperature",
        "0",
        "--ignore-eos",
    ];
    let streamed = kiln(&common);
    assert!(streamed.status.success());
    let mut with_json = common.to_vec();
    with_json.push("--json");
    let v = stdout_json(&kiln(&with_json));
    let text = String::from_utf8(streamed.stdout).unwrap();
    assert_eq!(text.trim_end_matches('\n'), v["text"].as_str().unwrap());
    assert!(String::from_utf8_lossy(&streamed.stderr).contains("tokens/s"));
}

#[test]
fn eval_perplexity_matches_transformers() {
    let case = &expected()["perplexity"];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("text.txt");
    std::fs::write(&file, case["text"].as_str().unwrap()).unwrap();
    let v = stdout_json(&kiln(&[
        "eval",
        "perplexity",
        "--model",
        &model(),
        "--text-file",
        file.to_str().unwrap(),
        "--json",
    ]));
    let want = case["mean_nll"].as_f64().unwrap();
    assert!(
        ((v["mean_nll"].as_f64().unwrap() - want) / want).abs() < 1e-4,
        "{v}"
    );
    assert!(
        ((v["perplexity"].as_f64().unwrap() - case["ppl"].as_f64().unwrap()) / want).abs() < 1e-2,
        "{v}"
    );
    assert_eq!(v["tokens"], case["ids"].as_array().unwrap().len());
}

#[test]
fn info_describes_the_model() {
    let v = stdout_json(&kiln(&["info", "--model", &model(), "--json"]));
    assert_eq!(v["architecture"], "LlamaForCausalLM");
    assert_eq!(v["parameters"], 131_008);
    assert_eq!(v["dtype"], "f32");
    assert_eq!(v["context_length"], 512);
}

#[test]
fn hub_ids_resolve_through_hf_home() {
    let home = tempfile::tempdir().unwrap();
    let snap = home.path().join("hub/models--acme--tiny/snapshots/f00d");
    std::fs::create_dir_all(&snap).unwrap();
    for entry in std::fs::read_dir(testdata().join("llama")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), snap.join(entry.file_name())).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["info", "--model", "acme/tiny", "--json"])
        .env("HF_HOME", home.path())
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    assert_eq!(stdout_json(&out)["layers"], 2);
}

#[test]
fn user_mistakes_get_a_clear_error_and_no_panic() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["info".into(), "--model".into(), "nobody/nothing".into()],
            "not in the Hugging Face cache",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                dir.path().display().to_string(),
                "--prompt".into(),
                "x".into(),
            ],
            "config.json",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                model(),
                "--prompt".into(),
                "x".into(),
                "--top-p".into(),
                "1.5".into(),
            ],
            "top_p",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                model(),
                "--prompt".into(),
                "x".into(),
                "--dtype".into(),
                "int3".into(),
            ],
            "--dtype",
        ),
        (
            vec![
                "eval".into(),
                "perplexity".into(),
                "--model".into(),
                model(),
                "--text-file".into(),
                "/nonexistent.txt".into(),
            ],
            "/nonexistent.txt",
        ),
    ];
    for (args, needle) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(&args)
            .env("HF_HOME", dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(needle),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn chat_prompt_is_encoded_as_apply_chat_template() {
    // The fixture's rendered conversation ends with the user turn "And the cat?" and the
    // generation prompt; a single-message chat must encode to exactly that suffix.
    let chat = &expected()["chat"];
    let all: Vec<u64> = chat["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let user_turn = all.windows(2).rposition(|w| w == [2, 398]).unwrap();
    let want = &all[user_turn..];
    let v = stdout_json(&kiln(&[
        "generate",
        "--model",
        &model(),
        "--prompt",
        "And the cat?",
        "--chat",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "--json",
    ]));
    let got: Vec<u64> = v["prompt_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(got, want);
}

#[test]
fn half_precision_compute_runs() {
    for dtype in ["bf16", "f16"] {
        let v = stdout_json(&kiln(&[
            "generate",
            "--model",
            &model(),
            "--prompt",
            "The model learns",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "--ignore-eos",
            "--dtype",
            dtype,
            "--json",
        ]));
        assert_eq!(v["token_ids"].as_array().unwrap().len(), 8, "{dtype}");
    }
}

#[test]
fn lifecycle_quick_runs_every_stage_and_writes_a_report() {
    let out = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "lifecycle",
            "--quick",
            "--out",
            out.path().to_str().unwrap(),
        ])
        .env("XDG_STATE_HOME", state.path())
        .output()
        .expect("kiln runs");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap())
            .unwrap();
    let stages: Vec<&str> = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        [
            "synth", "pretrain", "sample", "sft", "reward", "dpo", "ppo", "quantize", "serve",
            "gateway", "guard", "monitor", "loop", "deploy"
        ]
    );
    // Deployment: a replica drained mid-load loses no request; a draining gateway drops
    // readiness, still serves, and lets its stream finish.
    let d = &report["deploy"];
    assert_eq!(d["lost"], 0, "{d}");
    assert!(
        d["per_replica"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n.as_u64().unwrap() > 0),
        "{d}"
    );
    assert_eq!(d["served_while_draining"], 200, "{d}");
    assert_eq!(d["stream_finished"], true, "{d}");
    // kiln up finds what the lifecycle trained.
    let last: Value = serde_json::from_str(
        &std::fs::read_to_string(state.path().join("kiln/last-lifecycle.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(last["served_model_name"], "sft", "{last}");
    assert!(
        Path::new(last["model"].as_str().unwrap())
            .join("config.json")
            .is_file(),
        "{last}"
    );
    let names: Vec<&str> = last["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(&names[..2], ["dpo", "ppo"], "{last}");
    // The loop: every feedback accepted, the no_train tenant's left out, no planted value
    // exported; the poisoned round is never promoted; each decision follows its numbers, and a
    // promotion put the candidate into the running server.
    let l = &report["loop"];
    assert_eq!(l["feedback"]["refused"], 0, "{l}");
    assert!(l["feedback"]["private"].as_u64().unwrap() > 0, "{l}");
    assert!(
        l["honest"]["excluded_no_train"].as_u64().unwrap() > 0,
        "{l}"
    );
    assert_eq!(l["planted_leaked"], false, "{l}");
    assert!(l["honest"]["pairs"].as_u64().unwrap() >= 8, "{l}");
    assert_ne!(l["poisoned"]["decision"], "promoted", "{l}");
    for round in [&l["honest"], &l["poisoned"]] {
        let promoted = round["decision"] == "promoted";
        assert!(promoted || round["decision"] == "rejected", "{round}");
        if promoted {
            assert!(round["win_rate"].as_f64().unwrap() >= 0.51, "{round}");
        }
    }
    if l["honest"]["decision"] == "promoted" {
        assert_eq!(l["prod_status"], 200, "{l}");
        assert!(
            l["serving_after"].as_str().unwrap().contains("candidate"),
            "{l}"
        );
    } else {
        assert_ne!(
            l["prod_status"], 200,
            "nothing serves `prod` before a promotion: {l}"
        );
    }
    // Quantization: 8 bits and Q8_0 stay within 1% of f32's perplexity; at 4 bits GPTQ and AWQ
    // move it less than round-to-nearest does; the chosen model served and answered.
    let quantize = &report["quantize"];
    let variants = quantize["variants"].as_array().unwrap();
    let drift = |method: &str, bits: u64| -> f64 {
        let v = variants
            .iter()
            .find(|v| v["method"] == method && v["bits"] == bits)
            .unwrap_or_else(|| panic!("no {method} {bits}-bit variant: {quantize}"));
        let (before, after) = (
            v["perplexity_before"].as_f64().unwrap(),
            v["perplexity_after"].as_f64().unwrap(),
        );
        (after / before - 1.0).abs()
    };
    assert!(
        drift("rtn", 8) < 0.01 && drift("gptq", 8) < 0.01,
        "{quantize}"
    );
    assert!(drift("gptq", 4) < drift("rtn", 4), "{quantize}");
    assert!(drift("awq", 4) < drift("rtn", 4), "{quantize}");
    let f32_ppl = variants[0]["perplexity_before"].as_f64().unwrap();
    let q8 = quantize["gguf"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["file"].as_str().unwrap().contains("q8_0"))
        .unwrap();
    assert!(
        (q8["perplexity"].as_f64().unwrap() / f32_ppl - 1.0).abs() < 0.01,
        "{quantize}"
    );
    assert!(quantize["chosen_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(
        !quantize["chosen_reply"].as_str().unwrap().is_empty(),
        "{quantize}"
    );
    // The gateway: the key is let through and its absence refused, the repeat comes from the
    // cache, and the burst runs into the key's rate limit.
    let gateway = &report["gateway"];
    assert_eq!(gateway["authenticated_status"], 200, "{gateway}");
    assert_eq!(gateway["no_key_status"], 401, "{gateway}");
    assert_eq!(gateway["wrong_key_status"], 401, "{gateway}");
    assert_eq!(gateway["first_cache"], "miss", "{gateway}");
    assert_eq!(gateway["repeat_cache"], "hit", "{gateway}");
    assert!(gateway["burst_429"].as_u64().unwrap() > 0, "{gateway}");
    assert!(gateway["burst_ok"].as_u64().unwrap() > 0, "{gateway}");
    assert!(gateway["cost_usd"].as_f64().unwrap() > 0.0, "{gateway}");
    // Guardrails: the trained classifier beats chance on the held-out set, most attacks are
    // stopped, benign prompts pass, and no planted value reached the stored content.
    let guard = &report["guard"];
    assert!(
        guard["classifier"]["macro_f1"].as_f64().unwrap() > 0.5,
        "{guard}"
    );
    let replay = &guard["replay"];
    let share = |a: &str, b: &str| replay[a].as_f64().unwrap() / replay[b].as_f64().unwrap();
    assert!(share("attacks_blocked", "attacks") > 0.8, "{replay}");
    // The classifier trains reproducibly on one machine, but its floating-point results differ
    // between CPUs (AVX2 or AVX-512 kernels): 37 of 40 benign prompts passed on one, 34 on
    // another.
    assert!(share("benign_passed", "benign") >= 0.8, "{replay}");
    assert_eq!(
        replay["pii_passed_redacted"], replay["pii_prompts"],
        "{replay}"
    );
    assert_eq!(replay["planted_values_stored"], 0, "{replay}");
    // Monitoring: shifted traffic is called drift and normal traffic is not; every request left
    // a trace; confidence was calibrated on scored replies; cost per token came out of both the
    // prices and the instance price.
    let monitor = &report["monitor"];
    assert_eq!(monitor["drift"]["normal"]["drift"], false, "{monitor}");
    assert_eq!(monitor["drift"]["shifted"]["drift"], true, "{monitor}");
    assert_eq!(monitor["drift"]["caught"], true, "{monitor}");
    assert_eq!(monitor["traces"], monitor["requests"], "{monitor}");
    let calibration = &monitor["calibration"];
    assert!(
        calibration["samples"].as_u64().unwrap() >= 100,
        "{calibration}"
    );
    assert!(calibration["heldout"]["auroc"].is_number(), "{calibration}");
    assert!(
        monitor["hallucination_assessed"].as_u64().unwrap() > 0,
        "{monitor}"
    );
    assert!(
        monitor["cost"]["price_usd_per_1k_tokens"].as_f64().unwrap() > 0.0,
        "{monitor}"
    );
    assert!(
        monitor["cost"]["infra_usd_per_1k_tokens"].as_f64().unwrap() > 0.0,
        "{monitor}"
    );
    // Serving: every question reached every model (base and both adapters) over HTTP and came
    // back, and the benchmark produced tokens at both concurrencies.
    let serve = &report["serve"];
    assert_eq!(
        serve["models"],
        serde_json::json!(["sft", "dpo", "ppo"]),
        "{serve}"
    );
    let samples = serve["samples"].as_array().unwrap();
    assert_eq!(
        samples.len(),
        serve["chat_requests"].as_u64().unwrap() as usize
    );
    assert_eq!(samples.len() % 3, 0);
    assert!(
        samples
            .iter()
            .all(|s| s["completion_tokens"].as_u64().unwrap() > 0),
        "{serve}"
    );
    assert!(
        serve["bench_tokens_per_s_1"].as_f64().unwrap() > 0.0,
        "{serve}"
    );
    assert!(
        serve["bench_tokens_per_s_n"].as_f64().unwrap() > 0.0,
        "{serve}"
    );
    // Alignment: the reward model ranks held-out pairs above chance, DPO raises the held-out
    // preference accuracy from 0 (policy = reference), and PPO reports its reward before and after.
    let reward = &report["reward"];
    assert!(
        reward["held_out_accuracy"].as_f64().unwrap() > 0.5,
        "{reward}"
    );
    let dpo = &report["dpo"];
    assert_eq!(dpo["held_out_accuracy_before"].as_f64(), Some(0.0), "{dpo}");
    assert!(dpo["held_out_accuracy"].as_f64().unwrap() > 0.6, "{dpo}");
    assert!(dpo["win_rate"].as_f64().unwrap() >= 0.0);
    let ppo = &report["ppo"];
    assert!(ppo["mean_reward_before"].is_number() && ppo["mean_reward_after"].is_number());
    for plot in [
        "reward/loss_curve.png",
        "reward/accuracy.png",
        "dpo/loss_curve.png",
        "dpo/rewards.png",
        "ppo/loss_curve.png",
        "ppo/reward_curve.png",
    ] {
        assert!(out.path().join(plot).is_file(), "{plot}");
    }
    assert!(out.path().join("reward/model.safetensors").is_file());
    assert!(out.path().join("dpo/adapter_model.safetensors").is_file());
    // SFT teaches the answer format the pre-trained model never saw, and the adapter is PEFT's.
    let format = report["sft_tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["task"] == "format")
        .unwrap();
    let (before, after) = (
        format["before"].as_f64().unwrap(),
        format["after"].as_f64().unwrap(),
    );
    assert!(
        after >= before + 0.5,
        "format pass rate {before} -> {after}"
    );
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "loss_curve.png",
    ] {
        assert!(out.path().join("sft").join(f).is_file(), "sft/{f}");
    }
    let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(
        md.contains("| pretrain |")
            && md.contains("loss_curve.png")
            && md.contains("Supervised fine-tuning (LoRA)")
            && md.contains("## Quantization")
            && md.contains("## Serving")
            && md.contains("## Gateway"),
        "{md}"
    );
    assert!(out.path().join("model/loss_curve.png").is_file());
    // The pre-trained model is a model directory every command takes.
    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("model/train_results.json")).unwrap(),
    )
    .unwrap();
    let ppl = summary["eval_perplexity"].as_f64().unwrap();
    assert!(
        ppl < 20.0,
        "held-out perplexity {ppl} (a uniform guess over the vocabulary is ~700)"
    );
    let v = stdout_json(&kiln(&[
        "generate",
        "--model",
        out.path().join("model").to_str().unwrap(),
        "--prompt",
        "Anna lives in",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "--json",
    ]));
    assert!(!v["token_ids"].as_array().unwrap().is_empty());
}

#[test]
fn data_synth_writes_the_world() {
    let out = tempfile::tempdir().unwrap();
    let v = stdout_json(&kiln(&[
        "data",
        "synth",
        "--out",
        out.path().to_str().unwrap(),
        "--quick",
        "--seed",
        "3",
        "--json",
    ]));
    assert_eq!(v["seed"], 3);
    for f in [
        "corpus/pretrain.jsonl",
        "sft/train.jsonl",
        "preference/train.jsonl",
        "eval/facts.jsonl",
        "world.json",
    ] {
        assert!(out.path().join(f).is_file(), "{f}");
    }
}

#[test]
fn merge_writes_a_model_that_generates_like_the_adapter() {
    let lora: Value = serde_json::from_str(
        &std::fs::read_to_string(testdata().join("llama-lora/expected.json")).unwrap(),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("merged");
    let out = out_dir.to_str().unwrap();
    let adapter = testdata().join("llama-lora");
    let merge = [
        "merge",
        "--model",
        &model(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out,
    ];
    let run = kiln(&merge);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "kiln merge failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("merged 4 LoRA modules") && stdout.contains(out),
        "{stdout}"
    );
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(out_dir.join(file).is_file(), "{file} missing");
    }

    // The merged model alone generates what base + adapter generates under PEFT.
    for case in lora["greedy"].as_array().unwrap() {
        let v = stdout_json(&kiln(&[
            "generate",
            "--model",
            out,
            "--prompt",
            case["prompt"].as_str().unwrap(),
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
        ]));
        assert_eq!(v["prompt_token_ids"], case["prompt_ids"]);
        assert_eq!(v["token_ids"], case["new_ids"]);
    }

    // Merging into the same directory again is refused, naming the file, with no panic.
    let again = kiln(&merge);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success());
    assert!(
        stderr.contains("model.safetensors") && stderr.contains("already exists"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `kiln sft` through the binary: a conversational dataset, `--set` overrides, the JSON summary,
/// and an adapter `kiln generate` takes; a misspelt key fails naming it, with no panic.
#[test]
fn sft_trains_an_adapter_generate_uses() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("chats.jsonl");
    let rows: Vec<String> = (0..24)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("What is {i} plus one?")},
                {"role": "assistant", "content": format!("It is {}.", i + 1)},
            ]})
            .to_string()
        })
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let out_dir = dir.path().join("out");
    let config = dir.path().join("sft.yaml");
    std::fs::write(
        &config,
        format!(
            "model_id: {}\ndataset_path: {}\npeft_config:\n  r: 4\n  lora_alpha: 8\n  \
             target_modules: [\"q_proj\", \"v_proj\"]\ntraining_args:\n  output_dir: {}\n  \
             per_device_train_batch_size: 4\n  max_steps: 100\n  optim: paged_adamw_8bit\n",
            model(),
            data.display(),
            out_dir.display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let v = stdout_json(&kiln(&[
        "sft",
        "--config",
        config,
        "--set",
        "training_args.max_steps=4",
        "--set",
        "training_args.learning_rate=1e-3",
        "--json",
    ]));
    assert_eq!(v["steps"], 4);
    assert_eq!(v["method"], "lora");
    assert_eq!(v["optimizer"], "paged_adamw_8bit");
    assert!(v["optimizer_state_bytes"].as_u64().unwrap() > 0);
    // Rank 4 on q_proj (64 -> 64) and v_proj (64 -> 32, two KV heads) of two layers.
    assert_eq!(v["trainable_parameters"], 2 * 4 * ((64 + 64) + (64 + 32)));
    let g = stdout_json(&kiln(&[
        "generate",
        "--model",
        &model(),
        "--adapter",
        out_dir.to_str().unwrap(),
        "--prompt",
        "What is",
        "--max-tokens",
        "3",
        "--temperature",
        "0",
        "--json",
    ]));
    assert!(!g["token_ids"].as_array().unwrap().is_empty());

    let bad = kiln(&[
        "sft",
        "--config",
        config,
        "--set",
        "training_args.learning_rte=1e-3",
    ]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        stderr.contains("learning_rte") && !stderr.contains("panicked"),
        "{stderr}"
    );
}
