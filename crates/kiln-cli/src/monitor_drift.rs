//! `kiln monitor drift`: compare a reference window of traffic with the current one.
//!
//! Both files are JSONL. A row is one of: `{"prompt": ...}`, `{"prompt": ..., "completion":
//! ...}`, `{"messages": [...]}` (TRL conversational: the prompt is the system/user contents
//! joined with newlines, the completion the last message when it is the assistant's), or a
//! trace export carrying `prompt`/`completion` optionally plus numeric `prompt_tokens`,
//! `completion_tokens` and `mean_entropy`. `prompt` and `completion` may be a string or a
//! messages array. Drift is a result, not an error: the exit code is 0 either way.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use kiln_monitor::drift::{DriftConfig, DriftReport, detect};
use kiln_monitor::features::{SampleFeatures, read_samples};

#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  kiln monitor drift --reference last_week.jsonl --current today.jsonl"
)]
pub struct DriftArgs {
    /// JSONL of the reference window.
    #[arg(long, value_name = "FILE")]
    pub reference: PathBuf,
    /// JSONL of the current window.
    #[arg(long, value_name = "FILE")]
    pub current: PathBuf,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// The dataset drifts when at least this share of features drifts.
    #[arg(long, default_value_t = 0.5, value_name = "SHARE")]
    pub drift_share: f64,
}

pub fn run(args: &DriftArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.drift_share) {
        bail!("--drift-share must be in [0, 1], got {}", args.drift_share);
    }
    let reference = read_window(&args.reference)?;
    let current = read_window(&args.current)?;
    let cfg = DriftConfig {
        drift_share: args.drift_share,
        ..DriftConfig::default()
    };
    let report = detect(&reference, &current, &cfg).with_context(|| {
        format!(
            "comparing {} with {}",
            args.reference.display(),
            args.current.display()
        )
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn read_window(path: &Path) -> Result<Vec<SampleFeatures>> {
    Ok(read_samples(path)?
        .iter()
        .filter_map(SampleFeatures::from_sample)
        .collect())
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.prec$}"))
}

fn print_table(r: &DriftReport) {
    println!(
        "{:<18} {:<22} {:>9} {:>9} {:>6} {:>8} {:>8} {:>9}",
        "feature", "test", "score", "threshold", "drift", "psi", "js", "ks p"
    );
    for f in &r.features {
        let drift = if !f.evaluated {
            "n/a"
        } else if f.drift {
            "yes"
        } else {
            "no"
        };
        println!(
            "{:<18} {:<22} {:>9.4} {:>9.4} {:>6} {:>8} {:>8} {:>9}",
            f.feature,
            f.test,
            f.score,
            f.threshold,
            drift,
            opt(f.psi, 4),
            opt(f.js, 4),
            f.ks_p_value
                .map_or_else(|| "-".into(), |p| format!("{p:.3e}")),
        );
        if let Some(note) = &f.note {
            println!("  {}: {note}", f.feature);
        }
    }
    println!(
        "drift: {} ({} of {} features drifted, share ≥ {})",
        r.drift, r.drifted, r.evaluated, r.drift_share
    );
}
