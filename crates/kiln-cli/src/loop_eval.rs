//! The evaluation a round of `kiln loop` decides on: the candidate adapter against the serving
//! model on held-out prompts — a win rate judged by the synthetic world's rule checks or by a
//! reward model, the share of replies the gateway's output guardrails pass, and perplexity on a
//! held-out text — and the decision those numbers lead to.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kiln_data::{EvalExample, World};
use kiln_model::{GenerateParams, LoadOptions, LoadedModel, SamplingParams, generate};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// How replies are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Judge {
    /// The synthetic world's program checks (`kiln_data::rules`): prompts are
    /// `{"task","prompt","answer"}` rows, `eval.world` the world they belong to.
    #[default]
    Rules,
    /// A reward model (`kiln reward`'s output): the reply it scores higher wins.
    RewardModel,
}

/// `eval:` in loop.yaml.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSettings {
    /// Held-out prompts: a JSONL file, or a directory of them. Rows are `{"prompt": TEXT}`
    /// (other keys ignored); the rules judge needs `{"task","prompt","answer"}` rows.
    pub prompts: PathBuf,
    #[serde(default)]
    pub judge: Judge,
    /// The world the rules judge checks against (`world.json` of `kiln data synth`).
    #[serde(default)]
    pub world: Option<PathBuf>,
    /// The reward model directory, for `judge: reward_model`.
    #[serde(default)]
    pub reward_model: Option<PathBuf>,
    /// The system prompt the served model answers under (the gateway's immutable one).
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Held-out text for perplexity: plain text, or JSONL whose `text` fields are joined.
    #[serde(default)]
    pub perplexity_text: Option<PathBuf>,
    /// Tokens of `perplexity_text` scored at most.
    #[serde(default = "d_ppl_tokens")]
    pub perplexity_max_tokens: usize,
    /// A gateway config whose `guardrails` output checks give the guard pass rate (default:
    /// PII, leak and canary checks with kiln's defaults).
    #[serde(default)]
    pub gateway_config: Option<PathBuf>,
    /// Prompts used at most (the first ones).
    #[serde(default)]
    pub max_prompts: Option<usize>,
    #[serde(default = "d_max_new_tokens")]
    pub max_new_tokens: usize,
    /// The candidate is promoted only with a win rate of at least 0.5 + margin.
    #[serde(default = "d_margin")]
    pub margin: f64,
    /// The guard pass rate may fall by at most this much.
    #[serde(default)]
    pub max_guard_drop: f64,
    /// The candidate's perplexity may be at most this many times the serving model's.
    #[serde(default = "d_ppl_ratio")]
    pub max_perplexity_ratio: f64,
}

fn d_ppl_tokens() -> usize {
    4096
}
fn d_max_new_tokens() -> usize {
    48
}
fn d_margin() -> f64 {
    0.05
}
fn d_ppl_ratio() -> f64 {
    1.10
}

impl EvalSettings {
    /// Checks what can be checked before any model is loaded.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..0.5).contains(&self.margin) {
            bail!(
                "eval.margin: expected a number in [0, 0.5), got {}",
                self.margin
            );
        }
        if !(0.0..=1.0).contains(&self.max_guard_drop) {
            bail!(
                "eval.max_guard_drop: expected a share in [0, 1], got {}",
                self.max_guard_drop
            );
        }
        if self.max_perplexity_ratio.is_nan() || self.max_perplexity_ratio < 1.0 {
            bail!(
                "eval.max_perplexity_ratio: expected at least 1.0, got {}",
                self.max_perplexity_ratio
            );
        }
        if self.max_new_tokens == 0 {
            bail!("eval.max_new_tokens: expected at least 1");
        }
        match self.judge {
            Judge::Rules if self.world.is_none() => {
                bail!("eval.world: the rules judge needs the world the prompts belong to")
            }
            Judge::RewardModel if self.reward_model.is_none() => {
                bail!("eval.reward_model: judge reward_model needs a reward model directory")
            }
            _ => Ok(()),
        }
    }
}

/// One held-out prompt.
#[derive(Debug, Clone)]
struct Prompt {
    text: String,
    /// Set for the rules judge.
    example: Option<EvalExample>,
}

/// The candidate against the serving model.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub judge: Judge,
    pub prompts: usize,
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    /// Wins plus half the ties, over all prompts.
    pub win_rate: f64,
    /// Mean judge score (rule reward or reward-model score) of each model's replies.
    pub mean_score_serving: f64,
    pub mean_score_candidate: f64,
    /// Share of replies the output guardrails let through unblocked.
    pub guard_pass_serving: f64,
    pub guard_pass_candidate: f64,
    pub perplexity_serving: Option<f64>,
    pub perplexity_candidate: Option<f64>,
    /// A few replies side by side, for the report.
    pub samples: Vec<Value>,
}

/// What the numbers decide.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub promote: bool,
    pub reason: String,
}

/// Promote only if the candidate wins by the margin, keeps the guard pass rate and does not
/// lose more perplexity than allowed; the reason names the first gate that failed, or every
/// figure that passed.
pub fn decide(e: &Evaluation, s: &EvalSettings) -> Verdict {
    let needed = 0.5 + s.margin;
    if e.prompts == 0 {
        return Verdict {
            promote: false,
            reason: "no held-out prompts were evaluated".into(),
        };
    }
    if e.win_rate < needed {
        return Verdict {
            promote: false,
            reason: format!(
                "win rate {:.1}% is below the {:.1}% needed (0.5 + margin {})",
                100.0 * e.win_rate,
                100.0 * needed,
                s.margin
            ),
        };
    }
    let floor = e.guard_pass_serving - s.max_guard_drop;
    if e.guard_pass_candidate + 1e-9 < floor {
        return Verdict {
            promote: false,
            reason: format!(
                "guard pass rate {:.1}% fell below the serving model's {:.1}% (max drop {})",
                100.0 * e.guard_pass_candidate,
                100.0 * e.guard_pass_serving,
                s.max_guard_drop
            ),
        };
    }
    if let (Some(serving), Some(candidate)) = (e.perplexity_serving, e.perplexity_candidate)
        && (candidate.is_nan() || candidate > serving * s.max_perplexity_ratio)
    {
        return Verdict {
            promote: false,
            reason: format!(
                "perplexity {candidate:.3} is more than {} × the serving model's {serving:.3}",
                s.max_perplexity_ratio
            ),
        };
    }
    Verdict {
        promote: true,
        reason: format!(
            "win rate {:.1}% ≥ {:.1}%, guard pass {:.1}% (serving {:.1}%){}",
            100.0 * e.win_rate,
            100.0 * needed,
            100.0 * e.guard_pass_candidate,
            100.0 * e.guard_pass_serving,
            match (e.perplexity_serving, e.perplexity_candidate) {
                (Some(a), Some(b)) => format!(", perplexity {a:.3} → {b:.3}"),
                _ => String::new(),
            }
        ),
    }
}

/// Evaluates `candidate` (an adapter on `base`) against the serving model (`base` with
/// `serving`, or alone).
pub fn evaluate(
    base: &str,
    serving: Option<&Path>,
    candidate: &Path,
    s: &EvalSettings,
) -> Result<Evaluation> {
    let prompts = read_prompts(s)?;
    let world = match (&s.judge, &s.world) {
        (Judge::Rules, Some(path)) => {
            Some(World::read(path).with_context(|| format!("eval.world {}", path.display()))?)
        }
        _ => None,
    };
    let guard = guardrails(s)?;
    let ppl_text = perplexity_text(s)?;
    // Both sides share the base's tokenizer: the text is encoded once.
    let mut ppl_ids: Option<Vec<u32>> = None;

    let mut sides = Vec::new();
    for adapter in [serving, Some(candidate)] {
        let m = load(base, adapter)?;
        let replies = replies(&m, &prompts, s)?;
        let perplexity = match &ppl_text {
            Some(text) => {
                let ids = match &ppl_ids {
                    Some(ids) => ids,
                    None => {
                        // Far more characters than the tokens kept need: the rest is not encoded.
                        let budget = s.perplexity_max_tokens.saturating_mul(32);
                        let end = text
                            .char_indices()
                            .nth(budget)
                            .map_or(text.len(), |(i, _)| i);
                        let mut ids = m.tokenizer.encode(&text[..end], true)?;
                        ids.truncate(s.perplexity_max_tokens);
                        ppl_ids.insert(ids)
                    }
                };
                let window = m.config.max_position_embeddings;
                let r = kiln_model::perplexity_with_progress(
                    &m.model,
                    ids,
                    window,
                    (window / 2).max(1),
                    |_, _| {},
                )
                .context("eval.perplexity_text: scoring")?;
                Some(r.perplexity)
            }
            None => None,
        };
        drop(m);
        let guard_pass = guard_pass_rate(&guard, &replies);
        sides.push((replies, perplexity, guard_pass));
    }
    let (candidate_side, serving_side) = match (sides.pop(), sides.pop()) {
        (Some(c), Some(s)) => (c, s),
        _ => bail!("evaluation produced no replies"),
    };

    let scores = |replies: &[String]| -> Result<Vec<f64>> {
        match s.judge {
            Judge::Rules => {
                let world = world.as_ref().context("eval.world is required")?;
                Ok(prompts
                    .iter()
                    .zip(replies)
                    .map(|(p, reply)| match &p.example {
                        Some(ex) => f64::from(kiln_data::rules::reward(&kiln_data::score(
                            ex.task, ex, reply, world,
                        ))),
                        None => 0.0,
                    })
                    .collect())
            }
            Judge::RewardModel => {
                let dir = s.reward_model.as_ref().context("eval.reward_model")?;
                reward_scores(dir, &prompts, replies, s.system_prompt.as_deref())
            }
        }
    };
    let serving_scores = scores(&serving_side.0)?;
    let candidate_scores = scores(&candidate_side.0)?;
    let (mut wins, mut ties, mut losses) = (0, 0, 0);
    for (c, v) in candidate_scores.iter().zip(&serving_scores) {
        match c.partial_cmp(v) {
            Some(std::cmp::Ordering::Greater) => wins += 1,
            Some(std::cmp::Ordering::Less) => losses += 1,
            _ => ties += 1,
        }
    }
    let n = prompts.len();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let samples = prompts
        .iter()
        .zip(serving_side.0.iter().zip(&candidate_side.0))
        .take(3)
        .map(|(p, (a, b))| json!({"prompt": p.text, "serving": a, "candidate": b}))
        .collect();
    Ok(Evaluation {
        judge: s.judge,
        prompts: n,
        wins,
        ties,
        losses,
        win_rate: (wins as f64 + 0.5 * ties as f64) / n.max(1) as f64,
        mean_score_serving: mean(&serving_scores),
        mean_score_candidate: mean(&candidate_scores),
        guard_pass_serving: serving_side.2,
        guard_pass_candidate: candidate_side.2,
        perplexity_serving: serving_side.1,
        perplexity_candidate: candidate_side.1,
        samples,
    })
}

fn load(base: &str, adapter: Option<&Path>) -> Result<LoadedModel> {
    let options = LoadOptions {
        adapter: adapter.map(Path::to_path_buf),
        merge_adapter: true,
        ..LoadOptions::default()
    };
    LoadedModel::load(base, &options).with_context(|| match adapter {
        Some(a) => format!("loading `{base}` with adapter {}", a.display()),
        None => format!("loading `{base}`"),
    })
}

/// The prompts of `eval.prompts` (a file, or every `.jsonl` in a directory, by name).
fn read_prompts(s: &EvalSettings) -> Result<Vec<Prompt>> {
    let files: Vec<PathBuf> = if s.prompts.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&s.prompts)
            .with_context(|| format!("eval.prompts {}", s.prompts.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect();
        files.sort();
        files
    } else {
        vec![s.prompts.clone()]
    };
    let mut prompts = Vec::new();
    for file in &files {
        if s.judge == Judge::Rules {
            for example in kiln_data::read_eval(file)
                .with_context(|| format!("eval.prompts: reading {}", file.display()))?
            {
                prompts.push(Prompt {
                    text: example.prompt.clone(),
                    example: Some(example),
                });
            }
            continue;
        }
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("eval.prompts: reading {}", file.display()))?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let row: Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a JSON object", file.display(), i + 1))?;
            let Some(prompt) = row.get("prompt").and_then(Value::as_str) else {
                bail!("{}:{}: expected a `prompt` string", file.display(), i + 1);
            };
            prompts.push(Prompt {
                text: prompt.to_string(),
                example: None,
            });
        }
    }
    if let Some(max) = s.max_prompts {
        prompts.truncate(max);
    }
    if prompts.is_empty() {
        bail!("eval.prompts {}: no prompts", s.prompts.display());
    }
    Ok(prompts)
}

fn messages(system: Option<&str>, prompt: &str) -> Vec<Value> {
    let mut m = Vec::new();
    if let Some(system) = system {
        m.push(json!({"role": "system", "content": system}));
    }
    m.push(json!({"role": "user", "content": prompt}));
    m
}

/// Greedy replies to every prompt, rendered with the chat template as the server does.
fn replies(m: &LoadedModel, prompts: &[Prompt], s: &EvalSettings) -> Result<Vec<String>> {
    let params = GenerateParams {
        max_new_tokens: s.max_new_tokens,
        sampling: SamplingParams::greedy(),
        eos_token_ids: m.eos_token_ids(),
        ..GenerateParams::default()
    };
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new(prompts.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut out = Vec::with_capacity(prompts.len());
    for p in prompts {
        let text = m.tokenizer.apply_chat_template(
            &Value::Array(messages(s.system_prompt.as_deref(), &p.text)),
            true,
        )?;
        let ids = m.tokenizer.encode(&text, false)?;
        let generation = generate(&m.model, &ids, &params, |_| {})?;
        out.push(m.tokenizer.decode(&generation.token_ids, true)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
}

fn reward_scores(
    dir: &Path,
    prompts: &[Prompt],
    replies: &[String],
    system: Option<&str>,
) -> Result<Vec<f64>> {
    let model = kiln_model::reward::RewardModel::load(
        dir,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .with_context(|| format!("eval.reward_model {}", dir.display()))?;
    let root = kiln_core::ModelDir::resolve(&dir.to_string_lossy())?;
    let tokenizer = kiln_core::Tokenizer::from_dir(root.root())?;
    let mut scores = Vec::with_capacity(replies.len());
    for (p, reply) in prompts.iter().zip(replies) {
        let mut m = messages(system, &p.text);
        m.push(json!({"role": "assistant", "content": reply}));
        let text = tokenizer.apply_chat_template(&Value::Array(m), false)?;
        let ids = tokenizer.encode(&text, false)?;
        let got = model.score_rows(&[ids])?;
        scores.push(f64::from(got.first().copied().unwrap_or(0.0)));
    }
    Ok(scores)
}

fn guardrails(s: &EvalSettings) -> Result<std::sync::Arc<kiln_guard::policy::Guardrails>> {
    let config = match &s.gateway_config {
        Some(path) => {
            kiln_gateway::config::GatewayConfig::load(path)
                .with_context(|| format!("eval.gateway_config {}", path.display()))?
                .guardrails
        }
        None => kiln_guard::policy::GuardrailsConfig::default(),
    };
    Ok(std::sync::Arc::new(
        kiln_guard::policy::Guardrails::new(&config).context("eval.gateway_config: guardrails")?,
    ))
}

/// Share of `replies` the output checks let through (a redaction passes; a block does not).
fn guard_pass_rate(
    guard: &std::sync::Arc<kiln_guard::policy::Guardrails>,
    replies: &[String],
) -> f64 {
    let passed = replies
        .iter()
        .filter(|r| guard.request("loop").check_output_text(r).is_ok())
        .count();
    passed as f64 / replies.len().max(1) as f64
}

fn perplexity_text(s: &EvalSettings) -> Result<Option<String>> {
    let Some(path) = &s.perplexity_text else {
        return Ok(None);
    };
    let raw = std::fs::read_to_string(path)
        .with_context(|| format!("eval.perplexity_text {}", path.display()))?;
    if path.extension().is_some_and(|x| x == "jsonl") {
        let mut texts = Vec::new();
        for (i, line) in raw.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let row: Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
            match row.get("text").and_then(Value::as_str) {
                Some(t) => texts.push(t.to_string()),
                None => bail!("{}:{}: expected a `text` string", path.display(), i + 1),
            }
        }
        Ok(Some(texts.join("\n\n")))
    } else {
        Ok(Some(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> EvalSettings {
        serde_yaml_ng::from_str("prompts: p.jsonl\nworld: w.json\n")
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn evaluation(win_rate: f64, guard: (f64, f64), ppl: (f64, f64)) -> Evaluation {
        Evaluation {
            judge: Judge::Rules,
            prompts: 20,
            wins: 0,
            ties: 0,
            losses: 0,
            win_rate,
            mean_score_serving: 0.0,
            mean_score_candidate: 0.0,
            guard_pass_serving: guard.0,
            guard_pass_candidate: guard.1,
            perplexity_serving: Some(ppl.0),
            perplexity_candidate: Some(ppl.1),
            samples: Vec::new(),
        }
    }

    #[test]
    fn a_worse_candidate_is_not_promoted() {
        let s = settings();
        let v = decide(&evaluation(0.30, (1.0, 1.0), (5.0, 5.0)), &s);
        assert!(!v.promote);
        assert!(v.reason.contains("win rate 30.0%"), "{}", v.reason);
        // A tie is not a win either.
        assert!(!decide(&evaluation(0.50, (1.0, 1.0), (5.0, 5.0)), &s).promote);
    }

    #[test]
    fn each_gate_can_refuse_a_winner() {
        let s = settings();
        assert!(decide(&evaluation(0.70, (1.0, 1.0), (5.0, 5.2)), &s).promote);
        let guard = decide(&evaluation(0.70, (0.95, 0.80), (5.0, 5.0)), &s);
        assert!(
            !guard.promote && guard.reason.contains("guard"),
            "{guard:?}"
        );
        let ppl = decide(&evaluation(0.70, (1.0, 1.0), (5.0, 6.0)), &s);
        assert!(!ppl.promote && ppl.reason.contains("perplexity"), "{ppl:?}");
        let nan = decide(&evaluation(0.70, (1.0, 1.0), (5.0, f64::NAN)), &s);
        assert!(!nan.promote, "a NaN perplexity never passes");
    }

    #[test]
    fn settings_are_checked_by_key() {
        let mut s = settings();
        s.margin = 0.7;
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("eval.margin")
        );
        let s: EvalSettings = serde_yaml_ng::from_str("prompts: p.jsonl\n").unwrap();
        assert!(s.validate().unwrap_err().to_string().contains("eval.world"));
        let s: EvalSettings =
            serde_yaml_ng::from_str("prompts: p.jsonl\njudge: reward_model\n").unwrap();
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("eval.reward_model")
        );
    }
}
