//! `kiln monitor …`: monitoring offline, over JSONL files and the gateway's trace store.
//!
//! - `drift --reference A.jsonl --current B.jsonl [--json]`: per-feature drift scores and a
//!   verdict ([`crate::monitor_drift`]).
//! - `traces --store URL --out F.jsonl`: the trace store as JSONL, the input `drift` and
//!   spreadsheets read.
//! - `cost --store URL [--infra MODEL=USD_PER_HOUR]`: cost per 1,000 tokens by model, tenant and
//!   UTC day, from the prices and from the instances' hourly cost over measured throughput.
//! - `calibrate --samples F.jsonl --out calibration.json`: fits the hallucination flag's
//!   confidence calibration on labelled replies.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use kiln_monitor::confidence::Confidence;
use kiln_monitor::cost::{CostReport, InfraPrice, rollup};
use kiln_monitor::hallucination::{Calibration, HallucinationConfig, calibration_report};
use kiln_monitor::store::{RequestRecord, Store};
use serde_json::{Value, json};

use crate::monitor_drift::{self, DriftArgs};

#[derive(Subcommand, Debug)]
pub enum MonitorCommand {
    /// Compare a reference window of traffic with the current one: PSI, Jensen–Shannon, KS.
    #[command(
        after_help = "Rows: {\"prompt\"}, {\"prompt\",\"completion\"}, {\"messages\"} or `kiln monitor traces` output.\nExample:\n  kiln monitor drift --reference last-week.jsonl --current today.jsonl --json"
    )]
    Drift(DriftArgs),
    /// Write the gateway's traces as JSONL.
    #[command(
        after_help = "Example:\n  kiln monitor traces --store sqlite://kiln-gateway.db --out traces.jsonl --since-hours 24"
    )]
    Traces(TracesArgs),
    /// Cost per 1,000 tokens by model, tenant and UTC day.
    #[command(
        after_help = "Example:\n  kiln monitor cost --store sqlite://kiln-gateway.db --infra llama=2.5 --since-hours 168"
    )]
    Cost(CostArgs),
    /// Fit the hallucination flag's calibration on labelled replies.
    #[command(
        after_help = "Rows: {\"mean_logprob\": -0.4, \"mean_entropy\": 0.9, \"min_logprob\": -3.1, \"wrong\": false}\n(mean_entropy and min_logprob optional). Example:\n  kiln monitor calibrate --samples labelled.jsonl --out calibration.json"
    )]
    Calibrate(CalibrateArgs),
}

#[derive(Args, Debug)]
pub struct TracesArgs {
    /// The trace store: `sqlite://PATH` or `postgres://…` (the gateway's `store.url`).
    #[arg(long, value_name = "URL")]
    store: String,
    #[arg(long, value_name = "FILE.jsonl")]
    out: PathBuf,
    /// Only requests of the last N hours (default: all).
    #[arg(long, value_name = "N")]
    since_hours: Option<f64>,
}

#[derive(Args, Debug)]
pub struct CostArgs {
    #[arg(long, value_name = "URL")]
    store: String,
    /// What a model's instances cost per hour, `MODEL=USD` (`*=USD` for every model); repeatable.
    #[arg(long, value_name = "MODEL=USD_PER_HOUR")]
    infra: Vec<String>,
    #[arg(long, value_name = "N")]
    since_hours: Option<f64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    /// JSONL rows of a reply's confidence and whether it was wrong.
    #[arg(long, value_name = "FILE.jsonl")]
    samples: PathBuf,
    /// Where to write the calibration (`monitor.hallucination.calibration` reads it).
    #[arg(long, value_name = "FILE.json")]
    out: PathBuf,
    /// The flag's threshold on the probability of a wrong answer, for the report.
    #[arg(long, default_value_t = 0.5)]
    max_p_wrong: f64,
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: MonitorCommand) -> Result<()> {
    match cmd {
        MonitorCommand::Drift(args) => monitor_drift::run(&args),
        MonitorCommand::Traces(args) => traces(&args),
        MonitorCommand::Cost(args) => cost(&args),
        MonitorCommand::Calibrate(args) => calibrate(&args),
    }
}

/// The traces of the last `since_hours` (all without it).
fn read_traces(store: &str, since_hours: Option<f64>) -> Result<Vec<RequestRecord>> {
    let since = match since_hours {
        Some(h) if h.is_finite() && h > 0.0 => SystemTime::now()
            .checked_sub(Duration::from_secs_f64(h * 3600.0))
            .unwrap_or(SystemTime::UNIX_EPOCH),
        Some(h) => anyhow::bail!("--since-hours: expected a number of hours > 0, got {h}"),
        None => SystemTime::UNIX_EPOCH,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let store = Store::connect(store).await?;
        let until = SystemTime::now() + Duration::from_secs(3600);
        let traces = store.traces(since, until, usize::MAX).await;
        store.close().await;
        traces
    })
}

/// One trace as a JSON row: every field, times as RFC 3339-like UTC seconds and microseconds.
pub fn trace_json(t: &RequestRecord) -> Value {
    let at_ms =
        t.at.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
    json!({
        "request_id": t.request_id,
        "at_ms": at_ms,
        "day": kiln_monitor::cost::utc_day(t.at),
        "tenant": t.tenant,
        "key_id": t.key_id,
        "model": t.model,
        "operation": t.operation,
        "upstream": t.upstream,
        "status": t.status,
        "stream": t.stream,
        "cache_hit": t.cache_hit,
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens,
        "cost_usd": t.cost_usd,
        "gateway_ms": t.gateway_ms,
        "upstream_ms": t.upstream_ms,
        "total_ms": t.total_ms,
        "queue_ms": t.queue_ms,
        "ttft_ms": t.ttft_ms,
        "mean_logprob": t.mean_logprob,
        "mean_entropy": t.mean_entropy,
        "p_wrong": t.p_wrong,
        "grounding": t.grounding,
        "hallucination": t.hallucination,
        "guard": t.guard,
        "no_train": t.no_train,
    })
}

fn traces(args: &TracesArgs) -> Result<()> {
    let traces = read_traces(&args.store, args.since_hours)?;
    let file = std::fs::File::create(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for t in &traces {
        serde_json::to_writer(&mut out, &trace_json(t))?;
        out.write_all(b"\n")?;
    }
    out.flush()
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {} traces to {}", traces.len(), args.out.display());
    Ok(())
}

fn cost(args: &CostArgs) -> Result<()> {
    let prices: Vec<InfraPrice> = args
        .infra
        .iter()
        .map(|s| InfraPrice::parse(s).map_err(|e| anyhow::anyhow!("--infra {e}")))
        .collect::<Result<_>>()?;
    let traces = read_traces(&args.store, args.since_hours)?;
    let report = rollup(&traces, &prices);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", cost_table(&report));
    }
    Ok(())
}

/// The cost report as aligned text.
pub fn cost_table(r: &CostReport) -> String {
    let usd = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.6}"));
    let mut s = String::new();
    s.push_str(&format!(
        "{:<10}  {:<20}  {:>8}  {:>10}  {:>8}  {:>12}  {:>14}\n",
        "day", "model", "requests", "tokens", "hours", "tokens/hour", "infra $/1k tok"
    ));
    for m in &r.models {
        s.push_str(&format!(
            "{:<10}  {:<20}  {:>8}  {:>10}  {:>8.3}  {:>12.0}  {:>14}\n",
            m.day,
            m.model,
            m.requests,
            m.tokens,
            m.hours,
            m.tokens_per_hour,
            usd(m.infra_usd_per_1k_tokens)
        ));
    }
    s.push('\n');
    s.push_str(&format!(
        "{:<10}  {:<20}  {:<16}  {:>8}  {:>10}  {:>12}  {:>12}  {:>14}  {:>14}\n",
        "day",
        "model",
        "tenant",
        "requests",
        "tokens",
        "price $",
        "infra $",
        "price $/1k tok",
        "infra $/1k tok"
    ));
    for row in &r.rows {
        s.push_str(&format!(
            "{:<10}  {:<20}  {:<16}  {:>8}  {:>10}  {:>12.6}  {:>12}  {:>14}  {:>14}\n",
            row.day,
            row.model,
            row.tenant,
            row.requests,
            row.prompt_tokens + row.completion_tokens,
            row.price_usd,
            usd(row.infra_usd),
            usd(row.price_usd_per_1k_tokens),
            usd(row.infra_usd_per_1k_tokens)
        ));
    }
    s.push_str(&format!(
        "\ntotal: {} tokens, ${:.6} at prices ({} per 1k tokens), infrastructure {} ({} per 1k tokens)\n",
        r.tokens,
        r.price_usd,
        usd(r.price_usd_per_1k_tokens),
        usd(r.infra_usd),
        usd(r.infra_usd_per_1k_tokens)
    ));
    s
}

fn calibrate(args: &CalibrateArgs) -> Result<()> {
    let path = &args.samples;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut samples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let row: Value =
            serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let number = |key: &str| row.get(key).and_then(Value::as_f64);
        let mean_logprob = number("mean_logprob")
            .with_context(|| format!("{}: expected a number `mean_logprob`", at()))?;
        let wrong = row
            .get("wrong")
            .and_then(Value::as_bool)
            .with_context(|| format!("{}: expected `wrong`: true or false", at()))?;
        samples.push((
            Confidence {
                mean_logprob,
                mean_entropy: number("mean_entropy"),
                min_logprob: number("min_logprob"),
                tokens: None,
            },
            wrong,
        ));
    }
    let calibration = Calibration::fit(&samples).with_context(|| {
        format!(
            "{}: need at least 2 right and 2 wrong replies to calibrate",
            path.display()
        )
    })?;
    calibration.save(&args.out)?;
    let cfg = HallucinationConfig {
        max_p_wrong: args.max_p_wrong,
        ..HallucinationConfig::default()
    };
    let report = calibration_report(&samples, &calibration, &cfg);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        println!(
            "{} replies, {} wrong; AUROC of p_wrong {} (mean log-prob alone {}, mean entropy alone {}); \
             at p_wrong > {}: precision {:.3}, recall {:.3}; best threshold {}",
            report.n,
            report.wrong,
            f(report.auroc),
            f(report.auroc_mean_logprob),
            f(report.auroc_mean_entropy),
            args.max_p_wrong,
            report.precision,
            report.recall,
            f(report.best_threshold)
        );
        println!("wrote {}", args.out.display());
    }
    Ok(())
}
