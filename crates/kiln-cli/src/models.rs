//! `kiln models list`: the model registry — every round of `kiln loop`, with its data, its
//! evaluation and the decision.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use kiln_monitor::registry::{ModelRecord, PROMOTED};
use kiln_monitor::store::Store;

#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// Every round of the feedback loop, oldest first; `*` marks what serves now.
    #[command(after_help = "Example:\n  kiln models list --registry sqlite://kiln-gateway.db")]
    List(ListArgs),
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
    }
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
