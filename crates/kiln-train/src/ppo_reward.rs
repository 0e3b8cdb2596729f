//! What PPO learns from: the prompts, the reward that scores their rollouts, and the arithmetic
//! that turns scores into per-token advantages (the KL penalty, GAE, whitening). The trainer
//! ([`crate::ppo`]) owns the models and the loop.
//!
//! # Rewards
//!
//! TRL's `PPOTrainer` takes the reward as an `nn.Module` (a sequence classifier), and the
//! most-asked-for change to it is to let the reward be *any* function: a unit test, a regex, a
//! lookup of the right answer, a remote judge (trl#2576, #1977, #2273). So kiln's trainer sees
//! only the [`RewardFn`] trait: a batch of rollouts in, one score per rollout out. Each rollout
//! carries its dataset row with every key, so a rule can check the row's own answer. The
//! built-in ones:
//!
//! - [`WorldRule`] — the synthetic world's program checks ([`kiln_data::rules`]): correct answer,
//!   answer format, politeness, not leaking the secret, in [-1, 1];
//! - [`RegexReward`] — 1 when the reply matches a regular expression, else 0;
//! - [`ExactMatch`] — 1 when the reply, trimmed, is one of a list of strings, else 0;
//! - [`ModelReward`] — a reward model (`LlamaForSequenceClassification`, as `kiln reward` or
//!   transformers writes it) scoring the prompt and response tokens.
//!
//! In the config the first three are `training_args.reward` (`{rule: world, world_path: FILE}`,
//! `{regex: PATTERN}`, `{exact: [STRING, …]}`) and the last is TRL's
//! `training_args.reward_model_path`; exactly one of the two keys is given ([`RewardSpec`]).
//! A program can pass its own `RewardFn` to [`crate::ppo::ppo_with_reward`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use kiln_core::{Error, Result, Tokenizer};
use kiln_data::{EvalExample, World};
use kiln_model::reward::RewardModel;
use regex::Regex;
use serde_json::{Value, json};

use crate::sft_data::{dataset_files, for_each_row};

// ---------------------------------------------------------------------------------------------
// Rewards.

/// One finished rollout, as a reward sees it.
#[derive(Debug, Clone, Copy)]
pub struct Rollout<'a> {
    /// The dataset row the prompt came from, with any extra keys (`task`, `answer`, …).
    pub row: &'a Value,
    /// The prompt as the policy saw it (chat template applied for conversations).
    pub prompt_ids: &'a [u32],
    /// The response up to and including the first EOS token (TRL's EOS-truncated response).
    pub response_ids: &'a [u32],
    /// The response decoded without special tokens.
    pub reply: &'a str,
}

/// A reward: one score per rollout. Higher is better; the scale is the reward's own (PPO's
/// value head learns it, and the advantages are whitened).
pub trait RewardFn {
    /// A short description for logs and `train_results.json` (`rule: world`, `regex: ^A`, …).
    fn name(&self) -> String;

    /// Scores a batch of rollouts, in order.
    fn score(&self, rollouts: &[Rollout<'_>]) -> Result<Vec<f32>>;

    /// Checks a dataset row before training starts, so a row the reward cannot score fails at
    /// load time, naming `source` (the file and line), rather than in the middle of a run.
    fn check_row(&self, _row: &Value, _source: &str) -> Result<()> {
        Ok(())
    }

    /// The system message a synthetic-world row (a string prompt with a `task` key) is rendered
    /// under, when the reward knows one (the world's, which holds the secret the rules guard).
    fn system_prompt(&self) -> Option<String> {
        None
    }
}

/// The synthetic world's rule reward: [`kiln_data::rules::score`] of the reply under the row's
/// task, turned into [-1, 1] by [`kiln_data::rules::reward`]. Rows are `rl/prompts.jsonl`'s
/// (`{"task", "prompt", "answer"}`).
#[derive(Debug, Clone)]
pub struct WorldRule {
    pub world: World,
}

impl WorldRule {
    fn example(row: &Value) -> std::result::Result<EvalExample, String> {
        serde_json::from_value(row.clone()).map_err(|e| {
            format!(
                "the `rule: world` reward needs the synthetic world's row keys `task`, `prompt` \
                 (a string) and `answer`: {e}"
            )
        })
    }
}

impl RewardFn for WorldRule {
    fn name(&self) -> String {
        "rule: world".into()
    }

    fn score(&self, rollouts: &[Rollout<'_>]) -> Result<Vec<f32>> {
        rollouts
            .iter()
            .map(|r| {
                let example = Self::example(r.row).map_err(Error::InvalidInput)?;
                let score = kiln_data::rules::score(example.task, &example, r.reply, &self.world);
                Ok(kiln_data::rules::reward(&score))
            })
            .collect()
    }

    fn system_prompt(&self) -> Option<String> {
        Some(self.world.system_prompt())
    }

    fn check_row(&self, row: &Value, source: &str) -> Result<()> {
        let example =
            Self::example(row).map_err(|e| Error::InvalidInput(format!("{source}: {e}")))?;
        if example.task.has_answer() && example.answer.is_none() {
            return Err(Error::InvalidInput(format!(
                "{source}: task `{}` needs an `answer` for the `rule: world` reward to check replies against",
                example.task
            )));
        }
        Ok(())
    }
}

/// 1 when the reply matches the regular expression anywhere (`Regex::is_match`; anchor it with
/// `^…$` to match the whole reply), else 0.
#[derive(Debug, Clone)]
pub struct RegexReward {
    pub regex: Regex,
}

impl RewardFn for RegexReward {
    fn name(&self) -> String {
        format!("regex: {}", self.regex.as_str())
    }

    fn score(&self, rollouts: &[Rollout<'_>]) -> Result<Vec<f32>> {
        Ok(rollouts
            .iter()
            .map(|r| f32::from(u8::from(self.regex.is_match(r.reply))))
            .collect())
    }
}

/// 1 when the reply, with surrounding whitespace trimmed, equals one of `answers` exactly, else 0.
#[derive(Debug, Clone)]
pub struct ExactMatch {
    pub answers: Vec<String>,
}

impl RewardFn for ExactMatch {
    fn name(&self) -> String {
        format!("exact: {} strings", self.answers.len())
    }

    fn score(&self, rollouts: &[Rollout<'_>]) -> Result<Vec<f32>> {
        Ok(rollouts
            .iter()
            .map(|r| {
                let reply = r.reply.trim();
                f32::from(u8::from(self.answers.iter().any(|a| a == reply)))
            })
            .collect())
    }
}

/// A reward model's score of the prompt and the EOS-truncated response tokens, read at the
/// last token as transformers reads it (TRL's `get_reward`). The reward model must share the
/// policy's tokenizer, as TRL requires.
#[derive(Debug, Clone)]
pub struct ModelReward {
    pub model: RewardModel,
    pub path: PathBuf,
}

impl ModelReward {
    pub fn load(path: &Path) -> Result<Self> {
        let model = RewardModel::load(path, DType::F32, &Device::Cpu).map_err(|e| {
            Error::InvalidInput(format!(
                "training_args.reward_model_path {}: {e}",
                path.display()
            ))
        })?;
        Ok(Self {
            model,
            path: path.to_path_buf(),
        })
    }
}

impl RewardFn for ModelReward {
    fn name(&self) -> String {
        format!("reward model {}", self.path.display())
    }

    fn score(&self, rollouts: &[Rollout<'_>]) -> Result<Vec<f32>> {
        let rows: Vec<Vec<u32>> = rollouts
            .iter()
            .map(|r| [r.prompt_ids, r.response_ids].concat())
            .collect();
        self.model.score_rows(&rows)
    }
}

/// The reward a config asks for, checked (see the module docs for the keys).
#[derive(Debug, Clone, PartialEq)]
pub enum RewardSpec {
    /// `reward: {rule: world, world_path: FILE}`.
    World { world_path: PathBuf },
    /// `reward: {regex: PATTERN}`.
    Regex(String),
    /// `reward: {exact: [STRING, …]}`.
    Exact(Vec<String>),
    /// `reward_model_path: DIR`.
    Model(PathBuf),
}

const REWARD_KEYS: &str = "rule (with world_path), regex, exact";

impl RewardSpec {
    /// Reads `training_args.reward` and `training_args.reward_model_path`; errors name the key.
    pub fn from_args(reward: Option<&Value>, reward_model_path: Option<&Path>) -> Result<Self> {
        let bad =
            |key: &str, msg: String| Error::InvalidInput(format!("training_args.{key}: {msg}"));
        let map = match (reward, reward_model_path) {
            (None, None) => {
                return Err(bad(
                    "reward",
                    "PPO needs a reward: give `reward` (a rule: {rule: world, world_path: FILE}, \
                     {regex: PATTERN} or {exact: [STRING, …]}) or `reward_model_path` (a reward \
                     model directory)"
                        .into(),
                ));
            }
            (Some(_), Some(_)) => {
                return Err(bad(
                    "reward",
                    "give either `reward` (a rule) or `reward_model_path` (a reward model), not both"
                        .into(),
                ));
            }
            (None, Some(p)) => return Ok(Self::Model(p.to_path_buf())),
            (Some(Value::Object(map)), None) => map,
            (Some(other), None) => {
                return Err(bad(
                    "reward",
                    format!("expected a mapping with one of {REWARD_KEYS}, found {other}"),
                ));
            }
        };
        if let Some(k) = map
            .keys()
            .find(|k| !["rule", "world_path", "regex", "exact"].contains(&k.as_str()))
        {
            return Err(bad(
                &format!("reward.{k}"),
                format!("unknown key (expected one of {REWARD_KEYS})"),
            ));
        }
        let kinds: Vec<&str> = ["rule", "regex", "exact"]
            .into_iter()
            .filter(|k| map.contains_key(*k))
            .collect();
        if kinds.len() != 1 {
            return Err(bad(
                "reward",
                format!(
                    "give exactly one of rule, regex, exact (found {})",
                    if kinds.is_empty() {
                        "none".to_string()
                    } else {
                        kinds.join(", ")
                    }
                ),
            ));
        }
        if kinds[0] != "rule" && map.contains_key("world_path") {
            return Err(bad(
                "reward.world_path",
                "only the `rule: world` reward reads a world".into(),
            ));
        }
        match (kinds[0], &map[kinds[0]]) {
            ("rule", Value::String(r)) if r == "world" => match map.get("world_path") {
                Some(Value::String(p)) if !p.is_empty() => Ok(Self::World {
                    world_path: PathBuf::from(p),
                }),
                Some(other) => Err(bad(
                    "reward.world_path",
                    format!("expected the path of the world's world.json, found {other}"),
                )),
                None => Err(bad(
                    "reward.world_path",
                    "the `rule: world` reward needs world_path (the world.json `kiln data synth` wrote)"
                        .into(),
                )),
            },
            ("rule", other) => Err(bad(
                "reward.rule",
                format!("unknown rule {other} (the built-in rule is `world`)"),
            )),
            ("regex", Value::String(p)) => {
                Regex::new(p).map_err(|e| bad("reward.regex", format!("invalid pattern: {e}")))?;
                Ok(Self::Regex(p.clone()))
            }
            ("regex", other) => Err(bad(
                "reward.regex",
                format!("expected a pattern string, found {other}"),
            )),
            (_, Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        bad("reward.exact", format!("expected strings, found {v}"))
                    })
                })
                .collect::<Result<Vec<_>>>()
                .map(Self::Exact),
            (_, other) => Err(bad(
                "reward.exact",
                format!("expected a non-empty list of strings, found {other}"),
            )),
        }
    }

    /// Builds the reward, reading its files (the world, the reward model).
    pub fn build(&self) -> Result<Box<dyn RewardFn>> {
        Ok(match self {
            Self::World { world_path } => Box::new(WorldRule {
                world: World::read(world_path).map_err(|e| {
                    Error::InvalidInput(format!("training_args.reward.world_path: {e}"))
                })?,
            }),
            Self::Regex(p) => Box::new(RegexReward {
                regex: Regex::new(p)
                    .map_err(|e| Error::InvalidInput(format!("training_args.reward.regex: {e}")))?,
            }),
            Self::Exact(answers) => Box::new(ExactMatch {
                answers: answers.clone(),
            }),
            Self::Model(path) => Box::new(ModelReward::load(path)?),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Prompts.

/// One prompt of the dataset, tokenized as the policy sees it.
#[derive(Debug, Clone)]
pub struct PpoPrompt {
    /// `file:line`, for messages.
    pub source: String,
    /// The row as read (a reward may use its other keys).
    pub row: Value,
    pub ids: Vec<u32>,
}

/// Reads prompt-only rows (`{"prompt": str | messages, …}`) from a file or directory. A string
/// prompt is text, encoded with the tokenizer's special tokens as TRL does; a list of messages
/// is rendered with the chat template and the generation prompt. A string prompt in a row that
/// also has a `task` key is a synthetic-world row (`rl/prompts.jsonl`): it is a user message,
/// rendered as a conversation after `system` when there is one (the world's system prompt), as
/// the lifecycle's evaluation renders it. Each row must satisfy `reward.check_row`.
pub fn load_prompts(
    path: &Path,
    tokenizer: &Tokenizer,
    system: Option<&str>,
    reward: &dyn RewardFn,
) -> Result<Vec<PpoPrompt>> {
    let mut prompts = Vec::new();
    for file in dataset_files(path)? {
        let file: Arc<Path> = Arc::from(file.as_path());
        for_each_row(&file, &mut |id, row| {
            let source = id.to_string();
            let bad = |msg: String| Error::InvalidInput(format!("{source}: {msg}"));
            let text = match row.get("prompt") {
                Some(Value::String(s)) if row.get("task").is_some() => {
                    let mut messages = Vec::new();
                    if let Some(system) = system {
                        messages.push(json!({"role": "system", "content": system}));
                    }
                    messages.push(json!({"role": "user", "content": s}));
                    Some(tokenizer.apply_chat_template(&messages, true))
                }
                Some(Value::String(_)) => None,
                Some(messages @ Value::Array(_)) => {
                    Some(tokenizer.apply_chat_template(messages, true))
                }
                Some(other) => {
                    return Err(bad(format!(
                        "`prompt` must be a string or a list of messages, found {other}"
                    )));
                }
                None => {
                    return Err(bad(
                        "no `prompt` key (PPO reads prompt-only rows: {\"prompt\": …})".into(),
                    ));
                }
            };
            let ids = match (text, row.get("prompt")) {
                (Some(rendered), _) => {
                    let rendered = rendered.map_err(|e| bad(format!("chat template: {e}")))?;
                    tokenizer.encode(&rendered, false)?
                }
                (None, Some(Value::String(s))) => tokenizer.encode(s, true)?,
                (None, _) => Vec::new(),
            };
            if ids.is_empty() {
                return Err(bad("the prompt encodes to no tokens".into()));
            }
            reward.check_row(&row, &source)?;
            prompts.push(PpoPrompt { source, row, ids });
            Ok(())
        })?;
    }
    if prompts.is_empty() {
        return Err(Error::InvalidInput(format!(
            "dataset_path {}: no prompts",
            path.display()
        )));
    }
    Ok(prompts)
}

// ---------------------------------------------------------------------------------------------
// From scores to advantages: the KL penalty, GAE and whitening, on plain numbers.

/// How the KL penalty is estimated per token (Schulman, <http://joschu.net/blog/kl-approx.html>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KlEstimator {
    /// `logπ − logπref`: unbiased, can be negative per token.
    K1,
    /// `(r − 1) − log r` with `r = πref/π`: unbiased, never negative, lower variance.
    K3,
}

/// The per-token KL estimate from the policy's and the reference's log-probabilities.
pub fn kl_estimate(logprob: f32, ref_logprob: f32, estimator: KlEstimator) -> f32 {
    let logr = f64::from(ref_logprob) - f64::from(logprob);
    (match estimator {
        KlEstimator::K1 => -logr,
        KlEstimator::K3 => logr.exp_m1() - logr,
    }) as f32
}

/// Per-token rewards of one response: `−kl_coef · kl_t`, and `score` added at the last token.
pub fn token_rewards(kl: &[f32], score: f32, kl_coef: f64) -> Vec<f32> {
    let mut rewards: Vec<f32> = kl
        .iter()
        .map(|k| (-kl_coef * f64::from(*k)) as f32)
        .collect();
    if let Some(last) = rewards.last_mut() {
        *last += score;
    }
    rewards
}

/// Generalised advantage estimation (Schulman et al. 2016) over one response: advantages and
/// returns (`A + V`). The episode ends after the last token, whose next value is 0.
pub fn gae(rewards: &[f32], values: &[f32], gamma: f64, lam: f64) -> (Vec<f32>, Vec<f32>) {
    let n = rewards.len().min(values.len());
    let mut advantages = vec![0f32; n];
    let mut last = 0f64;
    for t in (0..n).rev() {
        let next = if t + 1 < n {
            f64::from(values[t + 1])
        } else {
            0.0
        };
        let delta = f64::from(rewards[t]) + gamma * next - f64::from(values[t]);
        last = delta + gamma * lam * last;
        advantages[t] = last as f32;
    }
    let returns = advantages.iter().zip(values).map(|(a, v)| a + v).collect();
    (advantages, returns)
}

/// TRL's `masked_whiten`: `(x − mean) / sqrt(var + 1e-8)` over the entries where `mask` is
/// true, with the unbiased (Bessel-corrected) variance; the mean is added back when not
/// `shift_mean`. Entries outside the mask come back as 0.
pub fn masked_whiten(values: &[f32], mask: &[bool], shift_mean: bool) -> Vec<f32> {
    let kept = || {
        values
            .iter()
            .zip(mask)
            .filter(|(_, m)| **m)
            .map(|(v, _)| f64::from(*v))
    };
    let n = kept().count();
    if n == 0 {
        return vec![0.0; values.len()];
    }
    let mean = kept().sum::<f64>() / n as f64;
    let mut var = kept().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
    if n > 1 {
        var *= n as f64 / (n - 1) as f64;
    }
    let scale = 1.0 / (var + 1e-8).sqrt();
    values
        .iter()
        .zip(mask)
        .map(|(v, m)| {
            if !m {
                return 0.0;
            }
            let w = (f64::from(*v) - mean) * scale;
            (if shift_mean { w } else { w + mean }) as f32
        })
        .collect()
}

/// [`masked_whiten`] over every token of ragged rows.
pub(crate) fn whiten_ragged(rows: &[Vec<f32>], shift_mean: bool) -> Vec<Vec<f32>> {
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let white = masked_whiten(&flat, &vec![true; flat.len()], shift_mean);
    let mut at = 0;
    rows.iter()
        .map(|r| {
            let row = white[at..at + r.len()].to_vec();
            at += r.len();
            row
        })
        .collect()
}
