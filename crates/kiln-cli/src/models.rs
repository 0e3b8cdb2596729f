//! `kiln models list`: the model registry — every round of `kiln loop`, with its data, its
//! evaluation and the decision.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use kiln_monitor::registry::{ModelRecord, PROMOTED, ROLLED_BACK};
use kiln_monitor::store::Store;

#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// Every round of the feedback loop, oldest first; `*` marks what serves now.
    #[command(after_help = "Example:\n  kiln models list --registry sqlite://kiln-gateway.db")]
    List(ListArgs),
    /// Put a recorded round's adapter into the running `kiln serve` (hot swap), check it, and
    /// record it as the one serving.
    #[command(
        after_help = "Example:\n  KILN_ADMIN_KEY=… kiln models promote 3 --registry sqlite://kiln-gateway.db --serve http://127.0.0.1:8000"
    )]
    Promote(PromoteArgs),
    /// Put back the adapter that served before the current one (hot swap), check it, and
    /// record it as the one serving.
    #[command(
        after_help = "Example:\n  KILN_ADMIN_KEY=… kiln models rollback --served-name prod --registry sqlite://kiln-gateway.db --serve http://127.0.0.1:8000"
    )]
    Rollback(RollbackArgs),
}

/// Where a manual promotion goes.
#[derive(Args, Debug)]
pub struct Target {
    /// The registry (loop.yaml's `registry`, or its `store`).
    #[arg(long, value_name = "URL")]
    registry: String,

    /// The running `kiln serve`, e.g. http://127.0.0.1:8000.
    #[arg(long, value_name = "URL")]
    serve: String,

    /// The environment variable holding kiln serve's --admin-key.
    #[arg(long, default_value = "KILN_ADMIN_KEY", value_name = "VAR")]
    admin_key_env: String,

    /// The environment variable holding kiln serve's --api-key, if it has one (for the check
    /// request after the swap).
    #[arg(long, value_name = "VAR")]
    api_key_env: Option<String>,

    /// Print the new registry row as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct PromoteArgs {
    /// The round whose candidate adapter to serve (`kiln models list`'s first column).
    round: i64,
    #[command(flatten)]
    target: Target,
}

#[derive(Args, Debug)]
pub struct RollbackArgs {
    /// The served name to roll back.
    #[arg(long, value_name = "NAME")]
    served_name: String,
    #[command(flatten)]
    target: Target,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// The registry: loop.yaml's `registry` (default there: its `store`), sqlite://PATH or
    /// postgres://….
    #[arg(long, value_name = "URL")]
    registry: String,

    /// Only the rounds of this served name.
    #[arg(long, value_name = "NAME")]
    served_name: Option<String>,

    /// Print the rounds as a JSON array.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: ModelsCommand) -> Result<()> {
    match cmd {
        ModelsCommand::List(args) => list(args),
        ModelsCommand::Promote(args) => {
            let reason = format!("manual: kiln models promote {}", args.round);
            swap_to(&args.target, reason, |models| {
                let m = models
                    .iter()
                    .find(|m| m.round == args.round)
                    .with_context(|| {
                        format!("round {}: no such round in the registry", args.round)
                    })?;
                Ok((m.served_name.clone(), m.adapter.clone(), m.base.clone()))
            })
        }
        ModelsCommand::Rollback(args) => {
            let name = args.served_name.clone();
            swap_to(&args.target, String::new(), |models| {
                let current = models
                    .iter()
                    .rev()
                    .find(|m| m.served_name == name && m.decision == PROMOTED)
                    .with_context(|| {
                        format!("--served-name {name}: no promoted round to roll back")
                    })?;
                let previous = current.parent.clone().with_context(|| {
                    format!(
                        "round {} replaced no adapter (the base served `{name}` alone before it); kiln serve cannot unload a name: restart it without `{name}`",
                        current.round
                    )
                })?;
                Ok((name.clone(), previous, current.base.clone()))
            })
        }
    }
}

/// Swaps the served name to the adapter `pick` chooses from the registry (`(served_name,
/// adapter, base)`), checks it, and records the swap as a promoted round (or a rolled-back one
/// when the check fails and the previous adapter is put back).
fn swap_to(
    target: &Target,
    reason: String,
    pick: impl FnOnce(&[ModelRecord]) -> Result<(String, String, String)>,
) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let serve = crate::loop_cmd::ServeTarget {
        url: target.serve.clone(),
        admin_key_env: target.admin_key_env.clone(),
        api_key_env: target.api_key_env.clone(),
        admin_key: None,
    };
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(600))
        .build()
        .context("building the HTTP client")?;
    let admin = crate::loop_cmd::Admin::new(&serve, client)?;
    let record = runtime.block_on(async {
        let store = Store::connect(&target.registry).await?;
        let models = store.models().await?;
        let (served_name, adapter, base) = pick(&models)?;
        let before = admin.serving(&served_name).await?;
        let reason = if reason.is_empty() {
            format!(
                "manual: kiln models rollback from {}",
                before
                    .as_deref()
                    .map_or("nothing".into(), |p| p.display().to_string())
            )
        } else {
            reason
        };
        let promotion = admin
            .promote(
                &served_name,
                std::path::Path::new(&adapter),
                before.as_deref(),
            )
            .await;
        let (decision, reason) = match promotion.rolled_back {
            Some(why) => (ROLLED_BACK, format!("{reason}: {why}")),
            None => (PROMOTED, reason),
        };
        let mut record = ModelRecord {
            round: 0,
            at: std::time::SystemTime::now(),
            served_name,
            base,
            adapter,
            parent: before.map(|p| p.display().to_string()),
            data_snapshot: String::new(),
            data_rows: 0,
            metrics: serde_json::json!({"swap": promotion.answers}),
            decision: decision.to_string(),
            reason,
        };
        record.round = store.register_model(&record).await?;
        store.close().await;
        anyhow::Ok(record)
    })?;
    if target.json {
        println!("{}", serde_json::to_string_pretty(&record)?);
    } else {
        println!(
            "round {} · {} · {}: {}\n  {}",
            record.round,
            record.served_name,
            record.decision.to_uppercase(),
            record.adapter,
            record.reason
        );
    }
    anyhow::ensure!(
        record.decision == PROMOTED,
        "the swap did not hold: {}",
        record.reason
    );
    Ok(())
}

fn list(args: ListArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut models = runtime.block_on(async {
        let store = Store::connect(&args.registry).await?;
        let models = store.models().await;
        store.close().await;
        models
    })?;
    if let Some(name) = &args.served_name {
        models.retain(|m| &m.served_name == name);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&models)?);
        return Ok(());
    }
    print!("{}", table(&models));
    Ok(())
}

/// The registry as a table; `*` marks each served name's current (last promoted) round.
fn table(models: &[ModelRecord]) -> String {
    use std::fmt::Write as _;
    if models.is_empty() {
        return "no rounds recorded yet (kiln loop writes them)\n".into();
    }
    let serving: Vec<i64> = {
        let mut last = std::collections::BTreeMap::new();
        for m in models.iter().filter(|m| m.decision == PROMOTED) {
            last.insert(m.served_name.as_str(), m.round);
        }
        last.into_values().collect()
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>5}  {:<20} {:<10} {:<11} {:>7} {:>12} {:>12} {:>6} {:<12} adapter",
        "round", "at (UTC)", "served", "decision", "win", "guard", "perplexity", "pairs", "data"
    );
    for m in models {
        let metric = |k: &str| m.metrics.get(k).and_then(serde_json::Value::as_f64);
        let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.0}%", 100.0 * v));
        let pair = |a: Option<f64>, b: Option<f64>, f: &dyn Fn(Option<f64>) -> String| {
            if a.is_none() && b.is_none() {
                "-".to_string()
            } else {
                format!("{}→{}", f(a), f(b))
            }
        };
        let ppl = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
        let _ = writeln!(
            out,
            "{:>4}{} {:<20} {:<10} {:<11} {:>7} {:>12} {:>12} {:>6} {:<12} {}",
            m.round,
            if serving.contains(&m.round) { "*" } else { " " },
            kiln_monitor::cost::utc_time(m.at),
            m.served_name,
            m.decision,
            pct(metric("win_rate")),
            pair(
                metric("guard_pass_serving"),
                metric("guard_pass_candidate"),
                &pct
            ),
            pair(
                metric("perplexity_serving"),
                metric("perplexity_candidate"),
                &ppl
            ),
            m.data_rows,
            &m.data_snapshot[..m.data_snapshot.len().min(12)],
            m.adapter
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(round: i64, decision: &str) -> ModelRecord {
        ModelRecord {
            round,
            at: std::time::UNIX_EPOCH + std::time::Duration::from_secs(86_400 + 3_661),
            served_name: "prod".into(),
            base: "base".into(),
            adapter: format!("runs/loop/round-{round}/candidate"),
            parent: None,
            data_snapshot: "0123456789abcdef".into(),
            data_rows: 40,
            metrics: serde_json::json!({"win_rate": 0.625, "guard_pass_serving": 1.0,
                "guard_pass_candidate": 0.95, "perplexity_serving": 5.0,
                "perplexity_candidate": 5.1}),
            decision: decision.into(),
            reason: String::new(),
        }
    }

    #[test]
    fn the_table_marks_what_serves_now() {
        let t = table(&[record(1, "promoted"), record(2, "rejected")]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[1].starts_with("   1*"), "{t}");
        assert!(lines[1].contains("1970-01-02 01:01:01"), "{t}");
        assert!(lines[1].contains("62%") || lines[1].contains("63%"), "{t}");
        assert!(lines[1].contains("100%→95%"), "{t}");
        assert!(lines[1].contains("5.00→5.10"), "{t}");
        assert!(lines[2].starts_with("   2 "), "{t}");
        assert!(lines[2].contains("rejected"), "{t}");
    }
}
