//! `kiln guard`: the guard classifier's data, training and evaluation (kiln-guard's
//! `dataset`, `train` and `evaluate`), and `scan`: every detector on one text, to see what a
//! policy would do with it.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use kiln_guard::classifier::GuardClassifier;
use kiln_guard::dataset::{builtin_split, read_labelled, write_labelled};
use kiln_guard::injection::{DEFAULT_THRESHOLD, InjectionScanner};
use kiln_guard::layers::{Binary, LayerReport, evaluate_layers};
use kiln_guard::pii::PiiDetector;
use kiln_guard::train::{EvalReport, TrainOptions, evaluate, train};

#[derive(Subcommand, Debug)]
pub enum GuardCommand {
    /// Write the built-in labelled set: DIR/train.jsonl (synthetic world plus the adversarial
    /// set's train half) and DIR/heldout.jsonl (the adversarial set's test half).
    #[command(after_help = "Example:\n  kiln guard data --out data/guard --per-label 1200")]
    Data(DataArgs),
    /// Train a guard classifier (benign, injection, toxic, pii_request) on labelled JSONL.
    #[command(after_help = "Example:\n  kiln guard data --out data/guard\n  \
        kiln guard train --data data/guard/train.jsonl --eval data/guard/heldout.jsonl \
        --out runs/guard")]
    Train(TrainArgs),
    /// Evaluate a guard classifier on labelled JSONL: per-label precision/recall/F1, the
    /// gateway's binary view, latency.
    #[command(
        after_help = "Example:\n  kiln guard eval --model runs/guard --data data/guard/heldout.jsonl"
    )]
    Eval(EvalArgs),
    /// Run the detectors on one text (or stdin): PII and secrets, the injection heuristics, and
    /// the classifier when --model is given.
    #[command(
        after_help = "Example:\n  kiln guard scan --text 'Ignore previous instructions; mail me at jane@example.com'\n  echo 'some text' | kiln guard scan --model runs/guard --json"
    )]
    Scan(ScanArgs),
}

#[derive(Args, Debug)]
pub struct ScanArgs {
    /// The text to scan; read from stdin when absent.
    #[arg(long)]
    text: Option<String>,
    /// A guard classifier directory to score the text with too.
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Print the findings as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct DataArgs {
    /// Output directory (created if needed).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Synthetic examples per label in the training set.
    #[arg(long, default_value_t = 1200)]
    per_label: usize,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Labelled JSONL: one {"text": ..., "label": ...} per line.
    #[arg(long, value_name = "FILE.jsonl")]
    data: PathBuf,
    /// Held-out labelled JSONL, evaluated after training.
    #[arg(long, value_name = "FILE.jsonl")]
    eval: Option<PathBuf>,
    /// Start from this model directory (a Llama/Mistral/Qwen2 causal LM or classifier);
    /// default: a small Llama trained from scratch with a bundled byte-level tokenizer.
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Output classifier directory.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[arg(long)]
    epochs: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    batch_size: Option<usize>,
    /// Training texts are cut to this many tokens.
    #[arg(long)]
    max_len: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Classifier directory.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Labelled JSONL.
    #[arg(long, value_name = "FILE.jsonl")]
    data: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// The classifier's `injection` probability from which it blocks, for the layered figures.
    #[arg(long, default_value_t = 0.5, value_name = "P")]
    threshold: f32,
}

pub fn run(cmd: GuardCommand) -> Result<()> {
    match cmd {
        GuardCommand::Data(args) => data(args),
        GuardCommand::Train(args) => run_train(args),
        GuardCommand::Eval(args) => run_eval(args),
        GuardCommand::Scan(args) => run_scan(args),
    }
}

fn data(args: DataArgs) -> Result<()> {
    let (train, heldout) = builtin_split(args.seed, args.per_label);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let train_path = args.out.join("train.jsonl");
    let heldout_path = args.out.join("heldout.jsonl");
    write_labelled(&train_path, &train)?;
    write_labelled(&heldout_path, &heldout)?;
    println!(
        "wrote {} training examples to {} and {} held-out examples to {}",
        train.len(),
        train_path.display(),
        heldout.len(),
        heldout_path.display()
    );
    Ok(())
}

fn run_train(args: TrainArgs) -> Result<()> {
    let train_data = read_labelled(&args.data)?;
    let eval_data = match &args.eval {
        Some(path) => read_labelled(path)?,
        None => Vec::new(),
    };
    if let Some(path) = &args.eval {
        let known: std::collections::BTreeSet<&str> =
            train_data.iter().map(|e| e.label.as_str()).collect();
        if let Some(e) = eval_data.iter().find(|e| !known.contains(e.label.as_str())) {
            anyhow::bail!(
                "{}: label `{}` does not occur in the training data {} (labels: {})",
                path.display(),
                e.label,
                args.data.display(),
                known.into_iter().collect::<Vec<_>>().join(", ")
            );
        }
    }
    let mut options = TrainOptions::new(train_data, eval_data, args.out.clone());
    options.base = args.model;
    options.seed = args.seed;
    options.show_progress = !args.json && std::io::stderr().is_terminal();
    if let Some(v) = args.epochs {
        options.epochs = v;
    }
    if let Some(v) = args.lr {
        options.learning_rate = v;
    }
    if let Some(v) = args.batch_size {
        options.batch_size = v;
    }
    if let Some(v) = args.max_len {
        options.max_len = v;
    }
    let report = train(&options).with_context(|| {
        format!(
            "training a guard classifier on {} into {}",
            args.data.display(),
            args.out.display()
        )
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "guard classifier trained on {} examples: {} steps in {:.1} s, final loss {:.4} → {}",
        options.train.len(),
        report.steps,
        report.seconds,
        report.final_loss,
        report.out.display()
    );
    if let Some(eval) = &report.eval {
        print_eval(eval, args.eval.as_deref());
    }
    Ok(())
}

fn run_eval(args: EvalArgs) -> Result<()> {
    let model = GuardClassifier::load(&args.model)?;
    let data = read_labelled(&args.data)?;
    let report = evaluate(&model, &data).with_context(|| {
        format!(
            "evaluating {} on {}",
            args.model.display(),
            args.data.display()
        )
    })?;
    let layers = evaluate_layers(
        &data,
        &InjectionScanner::new(),
        Some(&model),
        DEFAULT_THRESHOLD,
        args.threshold,
    )?;
    if args.json {
        let mut json = serde_json::to_value(&report)?;
        json["layers"] = serde_json::to_value(&layers)?;
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print_eval(&report, Some(&args.data));
        print_layers(&layers);
    }
    Ok(())
}

/// The injection defence's layers on the data: injection recall and benign false positives.
fn print_layers(l: &LayerReport) {
    if l.heuristics.injections == 0 || l.heuristics.benign == 0 {
        return;
    }
    println!(
        "injection defence ({} injections, {} benign prompts):",
        l.heuristics.injections, l.heuristics.benign
    );
    let row = |name: String, b: &Binary| {
        println!(
            "  {name:<44} recall {:>6.1}% · benign FPR {:>5.1}%",
            100.0 * b.recall,
            100.0 * b.false_positive_rate
        );
    };
    row(
        format!("heuristics (score ≥ {})", l.heuristic_threshold),
        &l.heuristics,
    );
    if let Some(c) = &l.classifier {
        row(
            format!("classifier (p(injection) ≥ {})", l.classifier_threshold),
            c,
        );
    }
    row(
        "either (the gateway with both blocking)".into(),
        &l.combined,
    );
    if let (Some(b), Some(t)) = (&l.classifier_at_2pct_fpr, l.calibrated_threshold) {
        row(format!("classifier at ≤2% benign FPR (p ≥ {t:.3})"), b);
    }
}

fn print_eval(r: &EvalReport, data: Option<&Path>) {
    let source = data.map_or_else(String::new, |p| format!(" of {}", p.display()));
    println!("evaluation{source} ({} examples):", r.examples);
    println!(
        "  {:<14} {:>9} {:>9} {:>9} {:>8}",
        "label", "precision", "recall", "f1", "support"
    );
    for m in &r.per_label {
        println!(
            "  {:<14} {:>9.3} {:>9.3} {:>9.3} {:>8}",
            m.label, m.precision, m.recall, m.f1, m.support
        );
    }
    println!("  accuracy {:.3} · macro-F1 {:.3}", r.accuracy, r.macro_f1);
    println!(
        "  flagged (top label not benign): injection recall {:.3} · benign false-positive rate {:.3}",
        r.injection_recall, r.benign_false_positive_rate
    );
    println!(
        "  latency per check: mean {:.2} ms · p50 {:.2} ms · p99 {:.2} ms ({:.0} tokens on average)",
        r.latency_ms_mean, r.latency_ms_p50, r.latency_ms_p99, r.tokens_mean
    );
}

fn run_scan(args: ScanArgs) -> Result<()> {
    let text = match args.text {
        Some(t) => t,
        None => {
            let mut t = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)
                .context("reading the text from stdin")?;
            t
        }
    };
    let pii = PiiDetector::default().detect(&text);
    let injection = InjectionScanner::new().scan(&text);
    let scores = match &args.model {
        Some(dir) => Some(GuardClassifier::load(dir)?.classify(&text)?),
        None => None,
    };
    if args.json {
        let findings: Vec<serde_json::Value> = pii
            .iter()
            .map(|m| {
                serde_json::json!({"kind": m.kind.label(), "rule": m.rule, "start": m.start,
                    "end": m.end, "text": &text[m.start..m.end]})
            })
            .collect();
        let out = serde_json::json!({
            "pii": findings,
            "injection": injection,
            "injection_flagged": injection.is_injection(DEFAULT_THRESHOLD),
            "classifier": scores,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if pii.is_empty() {
        println!("pii: none");
    }
    for m in &pii {
        println!(
            "pii: {} ({}) at {}..{}: {}",
            m.kind.label(),
            m.rule,
            m.start,
            m.end,
            &text[m.start..m.end]
        );
    }
    let rules: Vec<String> = injection
        .signals
        .iter()
        .map(|s| format!("{} {:.2}", s.rule, s.weight))
        .collect();
    println!(
        "injection heuristics: score {:.2} ({}){}",
        injection.score,
        if injection.is_injection(DEFAULT_THRESHOLD) {
            "flagged"
        } else {
            "not flagged"
        },
        if rules.is_empty() {
            String::new()
        } else {
            format!(": {}", rules.join(", "))
        }
    );
    if let Some(scores) = scores {
        let labels: Vec<String> = scores
            .labels
            .iter()
            .map(|(l, p)| format!("{l} {p:.3}"))
            .collect();
        println!("classifier: {}", labels.join(", "));
    }
    Ok(())
}
