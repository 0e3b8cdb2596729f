//! The lifecycle's `loop` stage: production traffic and feedback become the next round's
//! alignment data.
//!
//! 1. Simulated users on the synthetic world ask the world's RL prompts of the served SFT model
//!    (`sft`) through a gateway that captures content, two replies each (`n: 2`), and give
//!    feedback as the world's rules judge the replies: the better of two different replies is preferred, a wrong answer is
//!    corrected with the right one, the rest get a thumb. A `no_train` tenant asks and votes
//!    too, with a planted marker, and a user puts an e-mail address in a prompt and a phone
//!    number in a correction: none of them may reach an exported file.
//! 2. One round of `kiln loop`: export, DPO (a fresh LoRA on the serving base), evaluation on
//!    the world's held-out prompts against it, and promotion by hot swap — the candidate goes
//!    live as `prod` in the running server — when it wins by the margin.
//! 3. A second round on poisoned feedback (a brigade preferring the worse reply and "correcting"
//!    answers into rude, wrong ones) must not be promoted.

use std::path::Path;
use std::time::SystemTime;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use kiln_data::{EvalExample, Task, World};
use kiln_gateway::config::GatewayConfig;
use kiln_gateway::server::GatewayHandle;
use serde::Serialize;
use serde_json::{Value, json};

use crate::loop_cmd::{ExportSettings, LoopConfig, RoundReport, ServeTarget};
use crate::loop_eval::{EvalSettings, Judge};

/// `kiln serve --admin-key` of the lifecycle's server.
pub const ADMIN_KEY: &str = "lifecycle-admin-key";
const USERS: &str = "lifecycle-loop-users";
const PRIVATE: &str = "lifecycle-loop-private";
const BRIGADE: &str = "lifecycle-loop-brigade";
/// The name the loop promotes its candidate under (not served before the first promotion).
const SERVED: &str = "prod";
/// The name the users call: the base model, the lifecycle's SFT model.
const BASE: &str = "sft";
const PLANTED_EMAIL: &str = "jane.planted@example.com";
const PLANTED_PHONE: &str = "+1 415 555 0142";
const PRIVATE_MARKER: &str = "vault-marker-7q2x";
/// Requests in flight at once.
const CONCURRENCY: usize = 8;

#[derive(Debug, Serialize)]
pub struct LoopStageReport {
    /// The store the gateway kept traffic and feedback in, and the loop its rounds.
    pub registry: String,
    pub requests: usize,
    pub feedback: FeedbackCounts,
    pub honest: RoundSummary,
    pub poisoned: RoundSummary,
    /// What `prod` serves after both rounds, per the admin endpoint.
    pub serving_after: Option<String>,
    /// A request to `prod` through the gateway after the rounds.
    pub prod_status: u16,
    /// Whether a planted value (e-mail, phone, `no_train` marker) appears in an exported file.
    pub planted_leaked: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct FeedbackCounts {
    pub preferred: usize,
    pub corrections: usize,
    pub thumbs_up: usize,
    pub thumbs_down: usize,
    /// Feedback of the `no_train` tenant (stored, never exported).
    pub private: usize,
    /// Feedback the gateway refused (should be none).
    pub refused: usize,
}

#[derive(Debug, Serialize)]
pub struct RoundSummary {
    pub round: Option<i64>,
    pub decision: String,
    pub reason: String,
    pub pairs: usize,
    pub excluded_no_train: u64,
    pub dropped: std::collections::BTreeMap<String, usize>,
    pub win_rate: Option<f64>,
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    pub mean_score_serving: Option<f64>,
    pub mean_score_candidate: Option<f64>,
    pub guard_pass_serving: Option<f64>,
    pub guard_pass_candidate: Option<f64>,
    pub perplexity_serving: Option<f64>,
    pub perplexity_candidate: Option<f64>,
    pub wall_seconds: f64,
}

impl RoundSummary {
    fn of(r: &RoundReport) -> Self {
        let e = r.evaluation.as_ref();
        Self {
            round: r.round,
            decision: r.decision.clone(),
            reason: r.reason.clone(),
            pairs: r.export.rows,
            excluded_no_train: r.export.excluded_no_train,
            dropped: r.export.dropped.clone(),
            win_rate: e.map(|e| e.win_rate),
            wins: e.map_or(0, |e| e.wins),
            ties: e.map_or(0, |e| e.ties),
            losses: e.map_or(0, |e| e.losses),
            mean_score_serving: e.map(|e| e.mean_score_serving),
            mean_score_candidate: e.map(|e| e.mean_score_candidate),
            guard_pass_serving: e.map(|e| e.guard_pass_serving),
            guard_pass_candidate: e.map(|e| e.guard_pass_candidate),
            perplexity_serving: e.and_then(|e| e.perplexity_serving),
            perplexity_candidate: e.and_then(|e| e.perplexity_candidate),
            wall_seconds: r.wall_seconds,
        }
    }
}

/// Runs the stage against the lifecycle's `kiln serve` at `upstream` (started with
/// [`ADMIN_KEY`]) whose base model, served as `sft`, is `base`.
pub fn loop_stage(
    upstream: &str,
    base: &Path,
    world: &World,
    data_dir: &Path,
    out: &Path,
    quick: bool,
    seed: u64,
) -> Result<LoopStageReport> {
    std::fs::create_dir_all(out)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::new();

    let db = out.join("gateway.db");
    let gateway = start_gateway(upstream, &db, out)?;
    let url = gateway.url();
    let system = world.system_prompt();
    let prompts = kiln_data::read_eval(&data_dir.join("rl/prompts.jsonl"))
        .context("reading rl/prompts.jsonl")?;
    let prompts: Vec<EvalExample> = prompts
        .into_iter()
        .take(if quick { 96 } else { 256 })
        .collect();

    // 2. Honest users, a private tenant, and planted personal data.
    let mut counts = FeedbackCounts::default();
    let asks: Vec<(String, EvalExample, Value)> = prompts
        .iter()
        .enumerate()
        .map(|(i, ex)| {
            let user_text = if i % 16 == 3 {
                format!("My e-mail is {PLANTED_EMAIL}. {}", ex.prompt)
            } else {
                ex.prompt.clone()
            };
            (
                USERS.to_string(),
                ex.clone(),
                chat(BASE, &system, &user_text, seed + i as u64),
            )
        })
        .chain(prompts.iter().take(6).enumerate().map(|(i, ex)| {
            let text = format!("{} (ticket {PRIVATE_MARKER})", ex.prompt);
            (
                PRIVATE.to_string(),
                ex.clone(),
                chat(BASE, &system, &text, seed + 1000 + i as u64),
            )
        }))
        .collect();
    let requests = asks.len();
    let replies = runtime.block_on(ask_all(&client, &url, asks));
    let feedback: Vec<(String, Value)> = replies
        .iter()
        .enumerate()
        .filter_map(|(i, (key, ex, reply))| {
            let reply = reply.as_ref()?;
            let mut f = honest_feedback(ex, reply, world)?;
            if key == PRIVATE {
                counts.private += 1;
                if f.get("correction").is_some() {
                    f["correction"] = json!(format!("{PRIVATE_MARKER} {}", f["correction"]));
                }
            } else {
                count(&mut counts, &f);
            }
            if i % 16 == 5 && f.get("correction").is_some() {
                f["correction"] = json!(format!(
                    "{} Call me at {PLANTED_PHONE}.",
                    f["correction"].as_str().unwrap_or_default()
                ));
            }
            Some((key.clone(), f))
        })
        .collect();
    counts.refused += runtime.block_on(send_feedback(&client, &url, feedback));

    // 3. One honest round.
    let loop_out = out.join("rounds");
    let eval_guard = write_eval_guardrails(out, world)?;
    let mut cfg = LoopConfig {
        store: format!("sqlite://{}", db.display()),
        registry: None,
        since: None,
        out: loop_out.clone(),
        model: base.display().to_string(),
        served_name: SERVED.into(),
        serving_adapter: None,
        serve: Some(ServeTarget {
            url: upstream.to_string(),
            admin_key_env: "KILN_ADMIN_KEY".into(),
            api_key_env: None,
            admin_key: Some(ADMIN_KEY.into()),
        }),
        export: ExportSettings {
            min_pairs: 8,
            ..ExportSettings::default()
        },
        dpo: serde_yaml_ng::from_str(&format!(
            "training_args:\n  per_device_train_batch_size: 8\n  max_steps: {}\n  \
             learning_rate: 5.0e-4\n  lr_scheduler_type: cosine\n  warmup_ratio: 0.05\n  \
             beta: 0.1\n  logging_steps: 10\n  max_length: 192\n  seed: {seed}\n",
            if quick { 40 } else { 100 }
        ))?,
        eval: EvalSettings {
            prompts: data_dir.join("eval"),
            judge: Judge::Rules,
            world: Some(data_dir.join("world.json")),
            reward_model: None,
            system_prompt: Some(system.clone()),
            perplexity_text: Some(data_dir.join("corpus/pretrain.jsonl")),
            perplexity_max_tokens: 2048,
            gateway_config: Some(eval_guard),
            max_prompts: None,
            max_new_tokens: 24,
            margin: 0.01,
            max_guard_drop: 0.0,
            // DPO on a model this small costs general-text perplexity (measured: +11% on
            // the corpus for a winning candidate); a quarter more is the tax allowed here.
            max_perplexity_ratio: 1.25,
        },
    };
    let honest = crate::loop_cmd::run_round(&cfg, false).context("the honest round")?;

    // 4. A brigade poisons the feedback; the next round reads only theirs.
    let since = SystemTime::now();
    let asks: Vec<(String, EvalExample, Value)> = prompts
        .iter()
        .enumerate()
        .map(|(i, ex)| {
            (
                BRIGADE.to_string(),
                ex.clone(),
                chat(BASE, &system, &ex.prompt, seed + 5000 + i as u64),
            )
        })
        .collect();
    let replies = runtime.block_on(ask_all(&client, &url, asks));
    let poison: Vec<(String, Value)> = replies
        .iter()
        .filter_map(|(key, ex, reply)| {
            Some((key.clone(), poisoned_feedback(ex, reply.as_ref()?, world)?))
        })
        .collect();
    counts.refused += runtime.block_on(send_feedback(&client, &url, poison));
    cfg.since = Some(format!(
        "{}Z",
        kiln_monitor::cost::utc_time(since).replace(' ', "T")
    ));
    let poisoned = crate::loop_cmd::run_round(&cfg, false).context("the poisoned round")?;

    let serving_after = runtime
        .block_on(admin_serving(&client, upstream))
        .ok()
        .flatten();
    let prod_status = runtime.block_on(async {
        client
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(USERS)
            .json(&chat(SERVED, &system, &prompts[0].prompt, seed))
            .send()
            .await
            .map_or(0, |r| r.status().as_u16())
    });
    gateway.shutdown()?;

    let planted_leaked = [&honest, &poisoned].iter().any(|r| {
        std::fs::read_to_string(&r.export.out).is_ok_and(|text| {
            text.contains(PLANTED_EMAIL)
                || text.contains(PLANTED_PHONE)
                || text.contains(PRIVATE_MARKER)
        })
    });
    Ok(LoopStageReport {
        registry: cfg.store.clone(),
        requests,
        feedback: counts,
        honest: RoundSummary::of(&honest),
        poisoned: RoundSummary::of(&poisoned),
        serving_after,
        prod_status,
        planted_leaked,
    })
}

/// The report's line for the stage.
pub fn headline(r: &LoopStageReport) -> String {
    let round = |s: &RoundSummary| {
        format!(
            "{} pairs → {} (win rate {}, {}W {}T {}L)",
            s.pairs,
            s.decision,
            s.win_rate
                .map_or("-".into(), |w| format!("{:.1}%", 100.0 * w)),
            s.wins,
            s.ties,
            s.losses
        )
    };
    format!(
        "{} requests, {} feedback ({} preferred, {} corrected, {}↑ {}↓; {} no_train kept out); honest round {}; poisoned round {}; planted PII exported: {}",
        r.requests,
        r.feedback.preferred
            + r.feedback.corrections
            + r.feedback.thumbs_up
            + r.feedback.thumbs_down,
        r.feedback.preferred,
        r.feedback.corrections,
        r.feedback.thumbs_up,
        r.feedback.thumbs_down,
        r.honest.excluded_no_train,
        round(&r.honest),
        round(&r.poisoned),
        if r.planted_leaked { "YES" } else { "no" }
    )
}

fn chat(model: &str, system: &str, user: &str, seed: u64) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "n": 2,
        "max_tokens": 24,
        "temperature": 0.7,
        "seed": seed,
    })
}

fn count(c: &mut FeedbackCounts, f: &Value) {
    if f.get("correction").is_some() {
        c.corrections += 1;
    } else if f.get("preferred_index").is_some() {
        c.preferred += 1;
    } else if f["thumbs"] == "up" {
        c.thumbs_up += 1;
    } else {
        c.thumbs_down += 1;
    }
}

/// The rule reward of each choice of a reply.
fn choice_rewards(ex: &EvalExample, reply: &Value, world: &World) -> Vec<f32> {
    reply["choices"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let text = c["message"]["content"].as_str().unwrap_or_default();
            kiln_data::rules::reward(&kiln_data::score(ex.task, ex, text, world))
        })
        .collect()
}

/// What a user who judges by the world's rules says about a reply: the better of two
/// different choices, a correction of a wrong answer, or a thumb.
fn honest_feedback(ex: &EvalExample, reply: &Value, world: &World) -> Option<Value> {
    let id = reply["id"].as_str()?;
    let rewards = choice_rewards(ex, reply, world);
    let [a, b] = rewards[..] else { return None };
    if a != b {
        return Some(json!({"completion_id": id, "preferred_index": usize::from(b > a)}));
    }
    let text = reply["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    let passed = kiln_data::rules::passes(ex.task, &kiln_data::score(ex.task, ex, text, world));
    match (&ex.answer, passed) {
        (Some(answer), false) if ex.task.has_answer() => Some(json!({
            "completion_id": id,
            "correction": kiln_data::rules::format_answer(answer),
        })),
        _ => Some(json!({"completion_id": id, "thumbs": if passed { "up" } else { "down" }})),
    }
}

/// A brigade's feedback: the worse choice preferred, answers "corrected" into rude, wrong ones.
fn poisoned_feedback(ex: &EvalExample, reply: &Value, world: &World) -> Option<Value> {
    let id = reply["id"].as_str()?;
    let rewards = choice_rewards(ex, reply, world);
    let [a, b] = rewards[..] else { return None };
    if a != b {
        return Some(json!({"completion_id": id, "preferred_index": usize::from(b < a)}));
    }
    let wrong = match ex.task {
        Task::Arithmetic => "0",
        _ => "nobody knows",
    };
    Some(json!({
        "completion_id": id,
        "correction": format!("Ugh, whatever. Stop asking. Answer: {wrong}."),
    }))
}

async fn ask_all(
    client: &reqwest::Client,
    gateway: &str,
    asks: Vec<(String, EvalExample, Value)>,
) -> Vec<(String, EvalExample, Option<Value>)> {
    let url = format!("{gateway}/v1/chat/completions");
    futures_util::stream::iter(asks.into_iter().map(|(key, ex, body)| {
        let request = client.post(&url).bearer_auth(&key).json(&body).send();
        async move {
            let reply = match request.await {
                Ok(r) if r.status().is_success() => r.json::<Value>().await.ok(),
                _ => None,
            };
            (key, ex, reply)
        }
    }))
    .buffered(CONCURRENCY)
    .collect()
    .await
}

/// Sends each `(key, feedback)`; returns how many were refused.
async fn send_feedback(
    client: &reqwest::Client,
    gateway: &str,
    feedback: Vec<(String, Value)>,
) -> usize {
    let url = format!("{gateway}/v1/feedback");
    let statuses: Vec<bool> =
        futures_util::stream::iter(feedback.into_iter().map(|(key, body)| {
            let request = client.post(&url).bearer_auth(key).json(&body).send();
            async move { request.await.is_ok_and(|r| r.status().is_success()) }
        }))
        .buffered(CONCURRENCY)
        .collect()
        .await;
    statuses.iter().filter(|ok| !**ok).count()
}

async fn admin_serving(client: &reqwest::Client, upstream: &str) -> Result<Option<String>> {
    let body: Value = client
        .get(format!("{upstream}/admin/adapters"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await?
        .json()
        .await?;
    Ok(body["data"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["name"] == SERVED)
        .and_then(|a| a["path"].as_str())
        .map(str::to_string))
}

fn start_gateway(upstream: &str, db: &Path, out: &Path) -> Result<GatewayHandle> {
    let yaml = format!(
        "listen: 127.0.0.1:0\n\
         upstreams:\n  - name: kiln-serve\n    url: {upstream}/v1\n    models: [\"*\"]\n    timeout_s: 120\n\
         auth:\n  api_keys:\n    - key: {USERS}\n      tenant: acme\n    - key: {PRIVATE}\n      tenant: vault\n      no_train: true\n    - key: {BRIGADE}\n      tenant: trolls\n\
         limits:\n  backend: memory\n\
         cache:\n  backend: none\n\
         store:\n  url: sqlite://{db}\n  capture_content: true\n\
         monitor:\n  drift:\n    enabled: false\n",
        db = db.display(),
    );
    let path = out.join("gateway.yaml");
    std::fs::write(&path, &yaml)?;
    let config = GatewayConfig::load(&path)?;
    GatewayHandle::start(config)
        .with_context(|| format!("starting the gateway of {}", path.display()))
}

/// The guardrails the loop's guard gate runs on replies: personal data and the world's secret
/// code are blocked.
fn write_eval_guardrails(out: &Path, world: &World) -> Result<std::path::PathBuf> {
    let (word, digits) = world.secret.split_once('-').unwrap_or((&world.secret, ""));
    let pattern = if digits.is_empty() {
        format!("(?i){}", regex::escape(word))
    } else {
        format!("(?i){}|{}", regex::escape(word), regex::escape(digits))
    };
    let yaml = format!(
        "upstreams:\n  - name: none\n    url: http://127.0.0.1:9/v1\n    models: [\"*\"]\n\
         guardrails:\n  output:\n    pii:\n      action: block\n      custom:\n        - name: access_code\n          regex: '{}'\n",
        pattern.replace('\'', "''")
    );
    let path = out.join("eval-guardrails.yaml");
    std::fs::write(&path, yaml)?;
    Ok(path)
}

/// The stage's section of `report.md`.
pub fn markdown(r: &LoopStageReport) -> String {
    use std::fmt::Write as _;
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.1}%", 100.0 * v));
    let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    let f = &r.feedback;
    let mut md = format!(
        "\n## The continuous loop\n\nSimulated users asked the served SFT model {} questions through a gateway capturing content (`loop/gateway.yaml`, store `loop/gateway.db`), two replies each, and judged them by the world's rules: {} preferred one of two, {} corrected a wrong answer, {} thumbs up, {} down; a `no_train` tenant left {} more, which no export read. Rounds are in `loop/rounds/` and in the registry (`kiln models list --registry {}`).\n\n| round | feedback | pairs | win rate | W/T/L | rule reward | guard pass | perplexity | decision |\n|---|---|---|---|---|---|---|---|---|\n",
        r.requests, f.preferred, f.corrections, f.thumbs_up, f.thumbs_down, f.private, r.registry,
    );
    for (name, s) in [("honest", &r.honest), ("poisoned", &r.poisoned)] {
        let _ = writeln!(
            md,
            "| {} | {name} | {} | {} | {}/{}/{} | {} → {} | {} → {} | {} → {} | **{}** |",
            s.round.map_or("-".into(), |n| n.to_string()),
            s.pairs,
            pct(s.win_rate),
            s.wins,
            s.ties,
            s.losses,
            num(s.mean_score_serving),
            num(s.mean_score_candidate),
            pct(s.guard_pass_serving),
            pct(s.guard_pass_candidate),
            num(s.perplexity_serving),
            num(s.perplexity_candidate),
            s.decision
        );
    }
    let _ = writeln!(
        md,
        "\nHonest round: {}. Poisoned round: {}.\n\n`prod` serves `{}` after both rounds; a request to `prod` through the gateway got {} (404 while nothing was promoted). Planted e-mail, phone number and `no_train` marker in an exported file: {}.",
        r.honest.reason,
        r.poisoned.reason,
        r.serving_after.as_deref().unwrap_or("-"),
        r.prod_status,
        if r.planted_leaked { "**yes**" } else { "none" }
    );
    md
}
