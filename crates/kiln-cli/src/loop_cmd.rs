//! `kiln loop --config loop.yaml`: one round of the feedback loop.
//!
//! 1. **Export** the feedback the gateway kept since `since` as DPO pairs (`kiln feedback
//!    export`'s rules: corrections and preferred replies chosen, originals and down-voted
//!    rejected, `no_train` never read, PII scrubbed again).
//! 2. **Train** a candidate with LoRA DPO from the serving model: the adapter serving now is
//!    trained further (its reference is the base with the adapter off, as PEFT does), or a fresh
//!    adapter when the base serves alone.
//! 3. **Evaluate** the candidate against the serving model on held-out prompts ([`loop_eval`]):
//!    win rate by rule checks or a reward model, guard pass rate, perplexity.
//! 4. **Decide**: promote only when the candidate wins by `eval.margin` and passes the guard and
//!    perplexity gates. Promotion loads the adapter into the running `kiln serve` through its
//!    admin endpoint (`POST /admin/adapters`: requests in flight finish on the old adapter),
//!    then checks it answers; a failed check puts the previous adapter back (rolled back).
//! 5. **Record** the round in the model registry (`kiln models list`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use clap::Args;
use kiln_monitor::registry::{self, ModelRecord};
use kiln_monitor::store::Store;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use serde_yaml_ng::{Mapping, Value as Yaml};

use crate::feedback::{ExportFormat, ExportOptions, ExportSummary};
use crate::loop_eval::{EvalSettings, Evaluation, decide};

#[derive(Args, Debug)]
#[command(after_help = "Example (see docs/feedback.md for loop.yaml):\n  \
    KILN_ADMIN_KEY=… kiln loop --config loop.yaml\n  \
    kiln models list --registry sqlite://kiln-gateway.db")]
pub struct LoopArgs {
    /// loop.yaml: store, model, served_name, serve, export, dpo, eval.
    #[arg(long, value_name = "FILE.yaml")]
    config: PathBuf,

    /// Override a config key, e.g. --set eval.margin=0.1 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,

    /// Evaluate and decide, but neither swap the adapter nor record the round.
    #[arg(long)]
    dry_run: bool,

    /// Print the round's report as JSON.
    #[arg(long)]
    json: bool,
}

/// loop.yaml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopConfig {
    /// The gateway's store (`store.url`), where the feedback and captured content are.
    pub store: String,
    /// Where rounds are recorded (default: the store).
    #[serde(default)]
    pub registry: Option<String>,
    /// Feedback from this far back (`7d`, `24h`, an RFC 3339 time); default: all of it.
    #[serde(default)]
    pub since: Option<String>,
    /// Where each round's data, adapter and report go (`OUT/round-<UTC time>/`).
    #[serde(default = "d_out")]
    pub out: PathBuf,
    /// The base model `kiln serve` runs (a directory or hub id).
    pub model: String,
    /// The adapter name requests use (`"model": NAME`), swapped on promotion.
    pub served_name: String,
    /// The adapter serving now, when no `serve.url` tells it (default: the registry's last
    /// promoted adapter for `served_name`; none: the base alone).
    #[serde(default)]
    pub serving_adapter: Option<PathBuf>,
    /// The running `kiln serve` to promote into; without it a promotion is only recorded.
    #[serde(default)]
    pub serve: Option<ServeTarget>,
    #[serde(default)]
    pub export: ExportSettings,
    /// `kiln dpo`'s YAML (`peft_config`, `training_args`); `model_id`, `dataset_path`,
    /// `adapter_path` and `training_args.output_dir` are set by the loop.
    #[serde(default)]
    pub dpo: Mapping,
    pub eval: EvalSettings,
}

impl LoopConfig {
    /// Checks what can be checked before anything is read or trained.
    pub fn validate(&self) -> Result<()> {
        if self.served_name.trim().is_empty() {
            bail!("served_name: expected the adapter name requests use");
        }
        for key in ["model_id", "dataset_path", "adapter_path"] {
            if self.dpo.contains_key(key) {
                bail!("dpo.{key}: set by kiln loop; remove it from loop.yaml");
            }
        }
        self.eval.validate()
    }
}

fn d_out() -> PathBuf {
    PathBuf::from("runs/loop")
}

/// `serve:` in loop.yaml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeTarget {
    /// `kiln serve`'s base URL, e.g. `http://127.0.0.1:8000`.
    pub url: String,
    /// The environment variable holding the admin key (`kiln serve --admin-key`).
    #[serde(default = "d_admin_env")]
    pub admin_key_env: String,
    /// The environment variable holding the API key, when `kiln serve` has `--api-key`.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// The admin key itself, for callers that hold it (the lifecycle); never read from YAML.
    #[serde(skip)]
    pub admin_key: Option<String>,
}

fn d_admin_env() -> String {
    "KILN_ADMIN_KEY".into()
}

/// `export:` in loop.yaml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSettings {
    /// Fewer pairs than this: no round (nothing is trained or recorded).
    #[serde(default = "d_min_pairs")]
    pub min_pairs: usize,
    #[serde(default = "d_threshold")]
    pub score_threshold: f64,
    /// A gateway config whose PII patterns the export's scrubber also applies.
    #[serde(default)]
    pub gateway_config: Option<PathBuf>,
}

impl Default for ExportSettings {
    fn default() -> Self {
        Self {
            min_pairs: d_min_pairs(),
            score_threshold: d_threshold(),
            gateway_config: None,
        }
    }
}

fn d_min_pairs() -> usize {
    8
}
fn d_threshold() -> f64 {
    0.5
}

/// What a round did: the report written to `round.json` and printed.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    /// The registry's round number; `None` when nothing was recorded.
    pub round: Option<i64>,
    pub dir: PathBuf,
    pub served_name: String,
    pub base: String,
    /// The adapter serving when the round started (`None`: the base alone).
    pub parent: Option<String>,
    pub candidate: Option<String>,
    pub export: ExportSummary,
    pub dpo: Option<Value>,
    pub evaluation: Option<Evaluation>,
    /// `promoted`, `rejected`, `rolled_back`, or `skipped` (too little data; not recorded).
    pub decision: String,
    pub reason: String,
    /// The admin endpoint's answer to the swap (and to the rollback).
    pub swap: Option<Value>,
    pub wall_seconds: f64,
}

/// The decision of a round without enough data.
pub const SKIPPED: &str = "skipped";

pub fn run(args: LoopArgs) -> Result<()> {
    let cfg: LoopConfig = kiln_train::yaml::load(&args.config, &args.overrides)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let report = run_round(&cfg, args.dry_run)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &RoundReport) {
    println!(
        "round {} · {} · {}",
        r.round.map_or("-".to_string(), |n| n.to_string()),
        r.served_name,
        r.decision.to_uppercase()
    );
    println!("  {}", r.reason);
    println!(
        "  data: {} pairs from {} feedback records (sha256 {})",
        r.export.rows,
        r.export.feedback,
        &r.export.sha256[..r.export.sha256.len().min(12)]
    );
    if let Some(e) = &r.evaluation {
        println!(
            "  eval on {} prompts: win rate {:.1}% ({}W {}T {}L), score {:.3} → {:.3}, guard pass {:.1}% → {:.1}%{}",
            e.prompts,
            100.0 * e.win_rate,
            e.wins,
            e.ties,
            e.losses,
            e.mean_score_serving,
            e.mean_score_candidate,
            100.0 * e.guard_pass_serving,
            100.0 * e.guard_pass_candidate,
            match (e.perplexity_serving, e.perplexity_candidate) {
                (Some(a), Some(b)) => format!(", perplexity {a:.3} → {b:.3}"),
                _ => String::new(),
            }
        );
    }
    println!(
        "  serving before: {}",
        r.parent.as_deref().unwrap_or("(the base model)")
    );
    if let Some(c) = &r.candidate {
        println!("  candidate: {c}");
    }
    println!("  report: {}", r.dir.join("round.json").display());
}

/// Runs one round (see the module docs).
pub fn run_round(cfg: &LoopConfig, dry_run: bool) -> Result<RoundReport> {
    let started = std::time::Instant::now();
    cfg.validate()?;
    let since = cfg
        .since
        .as_deref()
        .map(crate::feedback::parse_since)
        .transpose()
        .context("since")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let registry_url = cfg.registry.as_deref().unwrap_or(&cfg.store);
    let registry = runtime
        .block_on(Store::connect(registry_url))
        .context("registry")?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .context("building the HTTP client")?;
    let admin = cfg
        .serve
        .as_ref()
        .map(|s| Admin::new(s, client.clone()))
        .transpose()?;

    // Which adapter serves now: the server knows best, then the config, then the registry.
    let parent: Option<PathBuf> = match &admin {
        Some(admin) => runtime.block_on(admin.serving(&cfg.served_name))?,
        None => match &cfg.serving_adapter {
            Some(p) => Some(p.clone()),
            None => runtime
                .block_on(registry.serving_model(&cfg.served_name))?
                .map(|m| PathBuf::from(m.adapter)),
        },
    };

    let dir = round_dir(&cfg.out, SystemTime::now());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    // 1. Export.
    let scrubber_config = match &cfg.export.gateway_config {
        Some(path) => {
            kiln_gateway::config::GatewayConfig::load(path)
                .with_context(|| format!("export.gateway_config {}", path.display()))?
                .guardrails
        }
        None => Default::default(),
    };
    let export = crate::feedback::export(&ExportOptions {
        store: cfg.store.clone(),
        since,
        format: ExportFormat::Dpo,
        out: dir.join("feedback.jsonl"),
        score_threshold: cfg.export.score_threshold,
        scrubber_config,
    })
    .context("exporting feedback")?;
    let mut report = RoundReport {
        round: None,
        dir: dir.clone(),
        served_name: cfg.served_name.clone(),
        base: cfg.model.clone(),
        parent: parent.as_ref().map(|p| p.display().to_string()),
        candidate: None,
        export,
        dpo: None,
        evaluation: None,
        decision: SKIPPED.into(),
        reason: String::new(),
        swap: None,
        wall_seconds: 0.0,
    };
    if report.export.rows < cfg.export.min_pairs {
        report.reason = format!(
            "{} preference pairs exported, fewer than export.min_pairs ({}): nothing trained",
            report.export.rows, cfg.export.min_pairs
        );
        return finish(report, started);
    }

    // 2. DPO from the serving model.
    let dpo_cfg = dpo_config(cfg, parent.as_deref(), &dir)?;
    let summary = kiln_train::dpo::dpo(
        &dpo_cfg,
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
    )
    .context("training the candidate (DPO)")?;
    let candidate = summary.saved.clone();
    report.candidate = Some(candidate.display().to_string());
    report.dpo = Some(json!({
        "steps": summary.steps,
        "train_pairs": summary.train_pairs,
        "final_loss": summary.final_loss,
        "reference": summary.reference,
        "seconds_per_step": summary.seconds_per_step,
        "train_metrics": summary.train_metrics,
    }));

    // 3–4. Evaluate and decide.
    let evaluation =
        crate::loop_eval::evaluate(&cfg.model, parent.as_deref(), &candidate, &cfg.eval)
            .context("evaluating the candidate")?;
    let verdict = decide(&evaluation, &cfg.eval);
    report.evaluation = Some(evaluation);
    report.reason = verdict.reason.clone();
    report.decision = if verdict.promote {
        registry::PROMOTED.into()
    } else {
        registry::REJECTED.into()
    };
    if dry_run {
        report.reason = format!("dry run, nothing swapped or recorded: {}", report.reason);
        return finish(report, started);
    }
    if verdict.promote {
        match &admin {
            Some(admin) => {
                let candidate_abs = absolute(&candidate)?;
                let outcome = runtime.block_on(admin.promote(
                    &cfg.served_name,
                    &candidate_abs,
                    parent.as_deref(),
                ));
                report.swap = Some(outcome.answers);
                if let Some(why) = outcome.rolled_back {
                    report.decision = registry::ROLLED_BACK.into();
                    report.reason = why;
                }
            }
            None => {
                report.reason.push_str(
                    "; no serve.url in loop.yaml: recorded as promoted, not loaded anywhere",
                );
            }
        }
    }

    // 5. The registry.
    let record = ModelRecord {
        round: 0,
        at: SystemTime::now(),
        served_name: cfg.served_name.clone(),
        base: cfg.model.clone(),
        adapter: absolute(&candidate)?.display().to_string(),
        parent: parent
            .as_deref()
            .map(|p| absolute(p).map(|p| p.display().to_string()))
            .transpose()?,
        data_snapshot: report.export.sha256.clone(),
        data_rows: report.export.rows as u64,
        metrics: serde_json::to_value(&report.evaluation).unwrap_or(Value::Null),
        decision: report.decision.clone(),
        reason: report.reason.clone(),
    };
    report.round = Some(
        runtime
            .block_on(registry.register_model(&record))
            .context("recording the round")?,
    );
    runtime.block_on(registry.close());
    finish(report, started)
}

/// `OUT/round-YYYYMMDDTHHMMSSZ`, with `-2`, `-3`, … when rounds start within one second.
fn round_dir(out: &Path, now: SystemTime) -> PathBuf {
    let stamp: String = kiln_monitor::cost::utc_time(now)
        .chars()
        .filter_map(|c| match c {
            '-' | ':' => None,
            ' ' => Some('T'),
            c => Some(c),
        })
        .collect();
    let stamp = format!("round-{stamp}Z");
    let mut dir = out.join(&stamp);
    let mut n = 2;
    while dir.exists() {
        dir = out.join(format!("{stamp}-{n}"));
        n += 1;
    }
    dir
}

fn finish(mut report: RoundReport, started: std::time::Instant) -> Result<RoundReport> {
    report.wall_seconds = started.elapsed().as_secs_f64();
    let path = report.dir.join("round.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(report)
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

/// The DPO config of a round: loop.yaml's `dpo` mapping with the loop's keys set, written to
/// `DIR/dpo.yaml` (so the round can be rerun by hand with `kiln dpo`).
fn dpo_config(
    cfg: &LoopConfig,
    parent: Option<&Path>,
    dir: &Path,
) -> Result<kiln_train::dpo::DpoConfig> {
    let mut doc = cfg.dpo.clone();
    let key = |k: &str| Yaml::String(k.to_string());
    let path = |p: &Path| Yaml::String(p.display().to_string());
    doc.insert(key("model_id"), Yaml::String(cfg.model.clone()));
    doc.insert(key("dataset_path"), path(&dir.join("feedback.jsonl")));
    match parent {
        Some(adapter) => {
            // The serving adapter is trained further: its own config takes peft_config's place.
            doc.remove("peft_config");
            doc.insert(key("adapter_path"), path(adapter));
        }
        None if !doc.contains_key("peft_config") => {
            let peft: Yaml =
                serde_yaml_ng::from_str("{r: 16, lora_alpha: 32, target_modules: all-linear}")
                    .context("the default peft_config")?;
            doc.insert(key("peft_config"), peft);
        }
        None => {}
    }
    let args = doc
        .entry(key("training_args"))
        .or_insert_with(|| Yaml::Mapping(Mapping::new()));
    let Yaml::Mapping(args) = args else {
        bail!("dpo.training_args: expected a mapping");
    };
    args.insert(key("output_dir"), path(&dir.join("candidate")));
    let file = dir.join("dpo.yaml");
    std::fs::write(&file, serde_yaml_ng::to_string(&Yaml::Mapping(doc))?)
        .with_context(|| format!("writing {}", file.display()))?;
    kiln_train::dpo::DpoConfig::load(&file, &[]).with_context(|| format!("dpo: {}", file.display()))
}

/// The admin side of a running `kiln serve`.
pub(crate) struct Admin {
    url: String,
    admin_key: String,
    api_key: Option<String>,
    client: reqwest::Client,
}

/// What a promotion did.
pub(crate) struct Promotion {
    /// The admin endpoint's answers (the swap, the check, the rollback).
    pub answers: Value,
    /// Why it was rolled back, when it was.
    pub rolled_back: Option<String>,
}

impl Admin {
    pub(crate) fn new(target: &ServeTarget, client: reqwest::Client) -> Result<Self> {
        let admin_key = match &target.admin_key {
            Some(key) => key.clone(),
            None => std::env::var(&target.admin_key_env).with_context(|| {
                format!(
                    "serve.admin_key_env: the environment variable `{}` (kiln serve's --admin-key) is not set",
                    target.admin_key_env
                )
            })?,
        };
        let api_key = match &target.api_key_env {
            Some(var) => Some(std::env::var(var).with_context(|| {
                format!("serve.api_key_env: the environment variable `{var}` is not set")
            })?),
            None => None,
        };
        Ok(Self {
            url: target.url.trim_end_matches('/').to_string(),
            admin_key,
            api_key,
            client,
        })
    }

    /// The adapter `name` serves now (`None`: no adapter of that name).
    pub(crate) async fn serving(&self, name: &str) -> Result<Option<PathBuf>> {
        let url = format!("{}/admin/adapters", self.url);
        let response = self
            .client
            .get(&url)
            .bearer_auth(&self.admin_key)
            .send()
            .await
            .with_context(|| format!("serve.url: GET {url}"))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("GET {url}: {status}: {}", error_message(&body));
        }
        Ok(body
            .get("data")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|a| a.get("name").and_then(Value::as_str) == Some(name))
            .and_then(|a| a.get("path").and_then(Value::as_str))
            .map(PathBuf::from))
    }

    async fn swap(&self, name: &str, path: &Path) -> Result<Value> {
        let url = format!("{}/admin/adapters", self.url);
        let response = self
            .client
            .post(&url)
            .bearer_auth(&self.admin_key)
            .json(&json!({"name": name, "path": path.display().to_string()}))
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("POST {url}: {status}: {}", error_message(&body));
        }
        Ok(body)
    }

    /// After a swap: the name serves `path`, and a request to it is answered.
    async fn check(&self, name: &str, path: &Path) -> Result<()> {
        let serving = self.serving(name).await?;
        if serving.as_deref() != Some(path) {
            bail!(
                "after the swap `{name}` serves {}, not {}",
                serving.map_or("nothing".into(), |p| p.display().to_string()),
                path.display()
            );
        }
        let url = format!("{}/v1/chat/completions", self.url);
        let mut request = self.client.post(&url).json(&json!({
            "model": name,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 4,
            "temperature": 0,
        }));
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() || body.pointer("/choices/0").is_none() {
            bail!(
                "a request to `{name}` after the swap got {status}: {}",
                error_message(&body)
            );
        }
        Ok(())
    }

    /// Swaps `name` to `candidate`, checks it, and puts `previous` back if the check fails.
    pub(crate) async fn promote(
        &self,
        name: &str,
        candidate: &Path,
        previous: Option<&Path>,
    ) -> Promotion {
        let swapped = match self.swap(name, candidate).await {
            Ok(answer) => answer,
            Err(e) => {
                return Promotion {
                    answers: json!({"swap_error": format!("{e:#}")}),
                    rolled_back: Some(format!(
                        "the swap failed, `{name}` serves what it served before: {e:#}"
                    )),
                };
            }
        };
        let Err(e) = self.check(name, candidate).await else {
            return Promotion {
                answers: json!({"swap": swapped}),
                rolled_back: None,
            };
        };
        let Some(previous) = previous else {
            return Promotion {
                answers: json!({"swap": swapped, "check_error": format!("{e:#}")}),
                rolled_back: Some(format!(
                    "the check after the swap failed ({e:#}); `{name}` had no adapter before, so there is none to restore: restart kiln serve without it"
                )),
            };
        };
        let restored = self.swap(name, previous).await;
        Promotion {
            answers: json!({
                "swap": swapped,
                "check_error": format!("{e:#}"),
                "rollback": restored.as_ref().map_or_else(|e| json!(format!("{e:#}")), Clone::clone),
            }),
            rolled_back: Some(match restored {
                Ok(_) => format!(
                    "the check after the swap failed ({e:#}); {} restored",
                    previous.display()
                ),
                Err(r) => format!(
                    "the check after the swap failed ({e:#}) and restoring {} failed too ({r:#})",
                    previous.display()
                ),
            }),
        }
    }
}

fn error_message(body: &Value) -> String {
    body.pointer("/error/message")
        .and_then(Value::as_str)
        .map_or_else(|| body.to_string(), str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_in_one_second_get_their_own_directories() {
        let out = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(86_400 * 365 + 3_723);
        let first = round_dir(out.path(), at);
        assert!(first.ends_with("round-19710101T010203Z"), "{first:?}");
        std::fs::create_dir_all(&first).unwrap_or_else(|e| panic!("{e}"));
        let second = round_dir(out.path(), at);
        assert!(second.ends_with("round-19710101T010203Z-2"), "{second:?}");
    }
}
