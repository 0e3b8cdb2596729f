//! The lifecycle's `monitor` stage: a monitored `kiln gateway` in front of the served model.
//!
//! 1. **Calibration.** The world's checkable questions (arithmetic, facts, format) are asked
//!    through the gateway, greedily and sampled, and each reply is scored by the world's rules;
//!    the confidence kiln serve reports with it (mean token log-prob and entropy) is fitted to
//!    predict a wrong answer on one half and measured (AUROC) on the other.
//! 2. **Drift.** A second gateway, with that calibration, takes normal traffic (the world's
//!    prompts) until its reference window is full, then a current window of the same — which
//!    must not be called drift — then a window of shifted traffic (long essay and code requests
//!    on unrelated topics), which must be.
//! 3. **Cost.** The stored traces are rolled up into cost per 1,000 tokens, from the configured
//!    prices and from a notional instance price over the measured throughput.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use kiln_data::{Task, World, eval_file, read_eval};
use kiln_gateway::config::GatewayConfig;
use kiln_gateway::monitor::drift_summary;
use kiln_gateway::server::GatewayHandle;
use kiln_monitor::confidence::{Confidence, from_reply};
use kiln_monitor::cost::{CostReport, InfraPrice, rollup};
use kiln_monitor::drift::DriftReport;
use kiln_monitor::hallucination::{
    Calibration, CalibrationReport, HallucinationConfig, auroc, calibration_report,
};
use kiln_monitor::store::Store;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{Value, json};

const KEY: &str = "lifecycle-monitor-key";
/// A notional price for the machine serving the model: a 2-core CPU instance.
const INSTANCE_USD_PER_HOUR: f64 = 0.10;
/// Requests in flight at once.
const CONCURRENCY: usize = 8;

#[derive(Debug, Serialize)]
pub struct MonitorStageReport {
    pub calibration: CalibrationStage,
    pub drift: DriftStage,
    /// Replies of the normal traffic flagged as likely wrong, of those assessed.
    pub hallucination_flagged: usize,
    pub hallucination_assessed: usize,
    pub hallucination_rate: f64,
    pub cost: CostReport,
    /// Requests sent through the monitored gateway, and traces found in its store.
    pub requests: usize,
    pub traces: usize,
}

#[derive(Debug, Serialize)]
pub struct CalibrationStage {
    /// The flag's threshold on the probability of a wrong answer, chosen on the fitting half.
    pub max_p_wrong: f64,
    /// Replies scored, and how many were wrong.
    pub samples: usize,
    pub wrong: usize,
    /// Fitted on one half, measured on the other.
    pub fit_on: usize,
    pub heldout: CalibrationReport,
    /// AUROC of the fitted probability on the half it was fitted on, for comparison.
    pub train_auroc: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct DriftStage {
    pub window: usize,
    /// Normal traffic against the reference: should not drift.
    pub normal: DriftReport,
    /// Shifted traffic against the reference: should drift.
    pub shifted: DriftReport,
    /// Shifted traffic flagged and normal traffic not.
    pub caught: bool,
}

/// Runs the stage against `upstream` (a `kiln serve` URL) serving `model`.
pub fn monitor_stage(
    upstream: &str,
    model: &str,
    world: &World,
    data_dir: &Path,
    out: &Path,
    quick: bool,
    seed: u64,
) -> Result<MonitorStageReport> {
    std::fs::create_dir_all(out)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6d6f_6e69);
    let system = world.system_prompt();

    // 1. Calibration through a first gateway.
    let questions = checkable_questions(data_dir, if quick { 20 } else { 40 })?;
    let calibration_gateway = start(upstream, model, out, "calibrate", None, 100)?;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", calibration_gateway.url());
    let mut asks = Vec::new();
    for (task, example) in &questions {
        // Greedy, then two samples: different replies to one question, some right, some wrong.
        for variant in 0..3u64 {
            let temperature = if variant == 0 { 0.0 } else { 1.0 };
            let body = json!({
                "model": model,
                "messages": [{"role": "system", "content": system},
                             {"role": "user", "content": example.prompt}],
                "max_tokens": 24,
                "temperature": temperature,
                "seed": seed.wrapping_add(variant),
            });
            asks.push((*task, example.clone(), body));
        }
    }
    let replies = runtime.block_on(send_all(&client, &url, KEY, asks))?;
    let mut samples: Vec<(Confidence, bool)> = Vec::new();
    for ((task, example), reply) in replies {
        let Some(reply) = reply else { continue };
        let Some(confidence) = from_reply(&reply, 0) else {
            continue;
        };
        let text = reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default();
        let score = kiln_data::score(task, &example, text, world);
        samples.push((confidence, !kiln_data::rules::passes(task, &score)));
    }
    calibration_gateway.shutdown()?;
    anyhow::ensure!(
        samples.len() >= 20,
        "only {} replies carried kiln serve's confidence extension",
        samples.len()
    );
    // Alternate halves, so both see every task and variant.
    let (fit, heldout): (Vec<_>, Vec<_>) =
        samples.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let fit: Vec<(Confidence, bool)> = fit.into_iter().map(|(_, s)| *s).collect();
    let heldout: Vec<(Confidence, bool)> = heldout.into_iter().map(|(_, s)| *s).collect();
    let calibration = Calibration::fit(&fit).unwrap_or_default();
    let calibration_path = out.join("calibration.json");
    calibration.save(&calibration_path)?;
    // The flag's threshold: the one that best separates right from wrong on the fitting half
    // (Youden's J), not a fixed 0.5 — most of the small model's answers are wrong.
    let fitted = calibration_report(&fit, &calibration, &HallucinationConfig::default());
    let cfg = HallucinationConfig {
        max_p_wrong: fitted.best_threshold.unwrap_or(0.5),
        ..HallucinationConfig::default()
    };
    let train_scores: Vec<f64> = fit.iter().map(|(c, _)| calibration.p_wrong(c)).collect();
    let train_wrong: Vec<bool> = fit.iter().map(|(_, w)| *w).collect();
    let calibration_stage = CalibrationStage {
        max_p_wrong: cfg.max_p_wrong,
        samples: samples.len(),
        wrong: samples.iter().filter(|(_, w)| *w).count(),
        fit_on: fit.len(),
        heldout: calibration_report(&heldout, &calibration, &cfg),
        train_auroc: auroc(&train_scores, &train_wrong),
    };

    // 2. Drift (and the hallucination rate) through a monitored gateway with that calibration.
    let window = if quick { 100 } else { 200 };
    let gateway = start(
        upstream,
        model,
        out,
        "gateway",
        Some((&calibration_path, cfg.max_p_wrong)),
        window,
    )?;
    let url = format!("{}/v1/chat/completions", gateway.url());
    let pool: Vec<String> = Task::ALL
        .iter()
        .filter_map(|&task| read_eval(&data_dir.join(eval_file(task))).ok())
        .flatten()
        .map(|e| e.prompt)
        .collect();
    anyhow::ensure!(
        !pool.is_empty(),
        "no evaluation prompts in {}",
        data_dir.display()
    );
    let normal = |rng: &mut ChaCha8Rng| -> Vec<String> {
        (0..window)
            .filter_map(|_| pool.choose(rng).cloned())
            .collect()
    };
    let chat = |prompt: &str| {
        json!({
            "model": model,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": prompt}],
            "max_tokens": 16,
            "temperature": 0,
        })
    };
    let monitor = gateway.state().monitor().clone();
    let settle = || runtime.block_on(gateway.state().settle(Duration::from_secs(30)));
    let mut sent = 0;
    // The reference window, then a current window of the same traffic.
    let reference: Vec<Value> = normal(&mut rng).iter().map(|p| chat(p)).collect();
    sent += reference.len();
    runtime.block_on(send_bodies(&client, &url, reference))?;
    settle();
    let current: Vec<Value> = normal(&mut rng).iter().map(|p| chat(p)).collect();
    sent += current.len();
    runtime.block_on(send_bodies(&client, &url, current))?;
    settle();
    let normal_report = runtime
        .block_on(monitor.check_drift())
        .context("the drift windows did not fill")?;
    // Shifted traffic.
    monitor.reset_current_window();
    let shifted: Vec<Value> = (0..window)
        .map(|_| chat(&shifted_prompt(&mut rng)))
        .collect();
    sent += shifted.len();
    runtime.block_on(send_bodies(&client, &url, shifted))?;
    settle();
    let shifted_report = runtime
        .block_on(monitor.check_drift())
        .context("the drift window did not fill")?;
    let dashboard = monitor.dashboard_data();
    std::fs::write(
        out.join("dashboard.json"),
        serde_json::to_vec_pretty(&dashboard)?,
    )?;
    gateway.shutdown()?;

    // 3. What the store kept: the hallucination rate of the normal traffic and the cost.
    let db = format!("sqlite://{}", out.join("gateway.db").display());
    let traces = runtime.block_on(async {
        let store = Store::connect(&db).await?;
        let t = store
            .traces(
                SystemTime::UNIX_EPOCH,
                SystemTime::now() + Duration::from_secs(60),
                usize::MAX,
            )
            .await;
        store.close().await;
        t
    })?;
    // The first 2 × window traces are the normal traffic.
    let normal_traces = &traces[..traces.len().min(2 * window)];
    let assessed = normal_traces
        .iter()
        .filter(|t| t.hallucination.is_some())
        .count();
    let flagged = normal_traces
        .iter()
        .filter(|t| t.hallucination == Some(true))
        .count();
    let cost = rollup(
        &traces,
        &[InfraPrice {
            model: "*".into(),
            cost_per_hour: INSTANCE_USD_PER_HOUR,
        }],
    );
    let caught = shifted_report.drift && !normal_report.drift;
    Ok(MonitorStageReport {
        calibration: calibration_stage,
        drift: DriftStage {
            window,
            normal: normal_report,
            shifted: shifted_report,
            caught,
        },
        hallucination_flagged: flagged,
        hallucination_assessed: assessed,
        hallucination_rate: if assessed > 0 {
            flagged as f64 / assessed as f64
        } else {
            0.0
        },
        cost,
        requests: sent,
        traces: traces.len(),
    })
}

/// A monitored gateway in front of `upstream`, its files in `out/NAME*`.
fn start(
    upstream: &str,
    model: &str,
    out: &Path,
    name: &str,
    calibration: Option<(&Path, f64)>,
    window: usize,
) -> Result<GatewayHandle> {
    let calibration = calibration
        .map(|(p, max)| format!("    calibration: {}\n    max_p_wrong: {max}\n", p.display()))
        .unwrap_or_default();
    let yaml = format!(
        "listen: 127.0.0.1:0\n\
         upstreams:\n  - name: kiln-serve\n    url: {upstream}/v1\n    models: [\"*\"]\n    timeout_s: 120\n\
         auth:\n  api_keys:\n    - key: {KEY}\n      tenant: lifecycle\n\
         limits:\n  backend: memory\n\
         cache:\n  backend: none\n\
         pricing:\n  {model}:\n    input_per_million: 0.5\n    output_per_million: 1.5\n\
         store:\n  url: sqlite://{db}\n\
         monitor:\n  drift:\n    window: {window}\n    interval_s: 3600\n  hallucination:\n{calibration}\
         \x20 infra:\n    - model: \"*\"\n      cost_per_hour: {INSTANCE_USD_PER_HOUR}\n",
        db = out.join(format!("{name}.db")).display(),
    );
    let path = out.join(format!("{name}.yaml"));
    std::fs::write(&path, &yaml)?;
    let config = GatewayConfig::load(&path)?;
    GatewayHandle::start(config)
        .with_context(|| format!("starting the gateway of {}", path.display()))
}

/// The evaluation examples whose answers the world's rules check.
fn checkable_questions(
    data_dir: &Path,
    per_task: usize,
) -> Result<Vec<(Task, kiln_data::EvalExample)>> {
    let mut out = Vec::new();
    for task in [Task::Arithmetic, Task::Facts, Task::Format] {
        let path = data_dir.join(eval_file(task));
        let examples = read_eval(&path).with_context(|| format!("reading {}", path.display()))?;
        out.extend(examples.into_iter().take(per_task).map(|e| (task, e)));
    }
    Ok(out)
}

/// Sends every body (`CONCURRENCY` at once); the parsed reply of each, `None` when it failed.
async fn send_all<T>(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    asks: Vec<(Task, T, Value)>,
) -> Result<Vec<((Task, T), Option<Value>)>> {
    let replies = futures_util::stream::iter(asks.into_iter().map(|(task, tag, body)| {
        let request = client.post(url).bearer_auth(key).json(&body).send();
        async move {
            let reply = match request.await {
                Ok(r) if r.status().is_success() => r.json::<Value>().await.ok(),
                _ => None,
            };
            ((task, tag), reply)
        }
    }))
    .buffered(CONCURRENCY)
    .collect::<Vec<_>>()
    .await;
    Ok(replies)
}

/// Sends every body, in order of submission (`CONCURRENCY` at once), and checks they were
/// answered.
async fn send_bodies(client: &reqwest::Client, url: &str, bodies: Vec<Value>) -> Result<()> {
    let n = bodies.len();
    let asks = bodies.into_iter().map(|b| (Task::Facts, (), b)).collect();
    let replies = send_all(client, url, KEY, asks).await?;
    let failed = replies.iter().filter(|(_, r)| r.is_none()).count();
    anyhow::ensure!(
        failed == 0,
        "{failed} of {n} requests through the gateway failed"
    );
    Ok(())
}

/// A request unlike the world's: long essay, code and translation requests on unrelated topics.
fn shifted_prompt(rng: &mut ChaCha8Rng) -> String {
    const TOPICS: &[&str] = &[
        "the history of the printing press",
        "photosynthesis in desert plants",
        "the economics of container shipping",
        "medieval castle architecture",
        "how compilers optimize loops",
        "the migration of arctic terns",
        "the causes of the French Revolution",
        "quantum entanglement for beginners",
        "sourdough fermentation chemistry",
        "volcanic activity in Iceland",
        "the design of suspension bridges",
        "jazz improvisation techniques",
    ];
    const TEMPLATES: &[&str] = &[
        "Write a detailed essay of about {n} words on {t}, covering its origins, the key ideas involved, the main controversies among experts, and why it still matters today. Use headings and cite sources.",
        "Explain {t} to a graduate student in {n} words, with equations where relevant, a worked example, and a list of common misconceptions, followed by three exam questions with model answers.",
        "Write a Python module that simulates {t}: define the classes, include type hints and docstrings, add unit tests with pytest, and explain the design choices in a long comment at the top (about {n} words).",
        "Translate the following into German, then summarize it in French: an overview of {t}, its consequences for modern society, and the open research questions that remain, in roughly {n} words.",
    ];
    let t = TOPICS.choose(rng).copied().unwrap_or("history");
    let template = TEMPLATES.choose(rng).copied().unwrap_or(TEMPLATES[0]);
    let n = rng.random_range(3..12) * 100;
    template.replace("{t}", t).replace("{n}", &n.to_string())
}

/// The stage's line in the lifecycle's table.
pub fn headline(r: &MonitorStageReport) -> String {
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    let usd = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("${}", significant(v)));
    format!(
        "kiln gateway monitoring: confidence predicts a wrong answer with AUROC {} on {} held-out replies ({} wrong); hallucination rate {:.1}% ({} of {}); drift on normal traffic {} (share {:.2}), on shifted traffic {} ({}); cost per 1k tokens {} at prices, {} infrastructure; {} traces for {} requests",
        f(r.calibration.heldout.auroc),
        r.calibration.heldout.n,
        r.calibration.heldout.wrong,
        100.0 * r.hallucination_rate,
        r.hallucination_flagged,
        r.hallucination_assessed,
        r.drift.normal.drift,
        r.drift.normal.share,
        r.drift.shifted.drift,
        drift_summary(&r.drift.shifted),
        usd(r.cost.price_usd_per_1k_tokens),
        usd(r.cost.infra_usd_per_1k_tokens),
        r.traces,
        r.requests
    )
}

/// `v` with three significant digits (`0.000731`, `1.25`).
fn significant(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let decimals = (2 - v.abs().log10().floor() as i32).clamp(0, 12) as usize;
    format!("{v:.decimals$}")
}

/// The report's "Monitoring" section.
pub fn markdown(r: &MonitorStageReport) -> String {
    use std::fmt::Write as _;
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    let c = &r.calibration;
    let mut md = format!(
        "\n## Monitoring\n\nA monitored `kiln gateway` in front of the served model (`monitor/gateway.yaml`; traces in `monitor/gateway.db`, the dashboard's last data in `monitor/dashboard.json`).\n\n**Confidence calibration.** {} replies to the world's checkable questions (greedy and sampled), {} of them wrong by the world's rules. Fitted on {} (`monitor/calibration.json`), measured on the other {}: AUROC of the probability of a wrong answer {} (mean log-prob alone {}, mean entropy alone {}; {} on the fitting half); flagging at p > {:.3} (the fitting half's best threshold): precision {:.3}, recall {:.3}.\n\n**Hallucination rate** of the normal traffic: {:.1}% ({} of {} replies flagged).\n\n**Drift** (windows of {} requests; Evidently's default tests):\n\n| window | drift | share | features drifted |\n|---|---|---|---|\n",
        c.samples,
        c.wrong,
        c.fit_on,
        c.heldout.n,
        f(c.heldout.auroc),
        f(c.heldout.auroc_mean_logprob),
        f(c.heldout.auroc_mean_entropy),
        f(c.train_auroc),
        c.max_p_wrong,
        c.heldout.precision,
        c.heldout.recall,
        100.0 * r.hallucination_rate,
        r.hallucination_flagged,
        r.hallucination_assessed,
        r.drift.window,
    );
    for (name, d) in [("normal", &r.drift.normal), ("shifted", &r.drift.shifted)] {
        let _ = writeln!(
            md,
            "| {name} | {} | {:.2} | {} |",
            d.drift,
            d.share,
            drift_summary(d)
        );
    }
    md.push_str(
        "\n| feature | test | normal score | shifted score | threshold |\n|---|---|---|---|---|\n",
    );
    for (n, s) in r
        .drift
        .normal
        .features
        .iter()
        .zip(&r.drift.shifted.features)
    {
        let _ = writeln!(
            md,
            "| {} | {} | {:.4} | {:.4} | {:.3} |",
            n.feature, n.test, n.score, s.score, n.threshold
        );
    }
    let usd = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("${}", significant(v)));
    let _ = writeln!(
        md,
        "\n**Cost** over {} tokens: {} per 1k tokens at the configured prices, {} per 1k tokens for a ${INSTANCE_USD_PER_HOUR}/hour instance at the measured throughput ({:.0} tokens/hour). {} traces stored for {} requests.",
        r.cost.tokens,
        usd(r.cost.price_usd_per_1k_tokens),
        usd(r.cost.infra_usd_per_1k_tokens),
        r.cost.models.first().map_or(0.0, |m| m.tokens_per_hour),
        r.traces,
        r.requests
    );
    md
}
