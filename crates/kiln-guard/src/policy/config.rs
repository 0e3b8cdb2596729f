//! The `guardrails` section of the gateway's YAML, as written: every key, its default, and the
//! per-tenant override's shape. [`super::Guardrails::new`] resolves it (compiling detectors,
//! loading the classifier, merging overrides) and names the key of any mistake.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::redact::RedactMode;

/// What a detector does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Refuse the request (or cut the reply).
    Block,
    /// Rewrite the offending text (PII detectors only).
    Redact,
    /// Let it pass, recorded.
    Flag,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Block => "block",
            Action::Redact => "redact",
            Action::Flag => "flag",
        }
    }
}

/// What happens to `system`/`developer` messages a client sends when the gateway owns the
/// system prompt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientSystemMessages {
    /// 400 `guardrail_violation` / `prompt_injection`.
    Reject,
    /// Kept, as `user` messages after the configured system prompt.
    #[default]
    Demote,
    /// Kept as they are, after the configured system prompt.
    Allow,
}

/// `guardrails:` in the gateway's YAML.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardrailsConfig {
    /// The system prompt every chat request starts with; clients cannot replace it.
    #[serde(default)]
    pub system_prompt: Option<String>,
    #[serde(default)]
    pub client_system_messages: ClientSystemMessages,
    /// Plant a canary token in the system prompt (default on when there is one).
    #[serde(default = "yes")]
    pub canary: bool,
    /// The canary itself, for replicas that must send the same system prompt (so they share
    /// the response cache and the upstream's prefix cache); pass it as `${KILN_CANARY}`.
    /// Random per start when absent.
    #[serde(default)]
    pub canary_token: Option<String>,
    /// Put the caller's own values back where input redaction left placeholders
    /// (`<EMAIL_1>`) in the reply.
    #[serde(default)]
    pub restore_pii: bool,
    /// A guard classifier directory (`kiln guard train --out`, or a transformers
    /// `LlamaForSequenceClassification`), used by the `classifier` detectors.
    #[serde(default)]
    pub classifier_model: Option<PathBuf>,
    #[serde(default)]
    pub input: InputConfig,
    #[serde(default)]
    pub output: OutputConfig,
    /// Per-tenant overrides of `client_system_messages`, `restore_pii`, `input` and `output`.
    #[serde(default)]
    pub tenants: BTreeMap<String, Value>,
}

impl Default for GuardrailsConfig {
    fn default() -> Self {
        Self {
            system_prompt: None,
            client_system_messages: ClientSystemMessages::default(),
            canary: true,
            canary_token: None,
            restore_pii: false,
            classifier_model: None,
            input: InputConfig::default(),
            output: OutputConfig::default(),
            tenants: BTreeMap::new(),
        }
    }
}

fn yes() -> bool {
    true
}

/// `guardrails.input`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    #[serde(default)]
    pub pii: Option<PiiConfig>,
    #[serde(default)]
    pub injection: Option<InjectionConfig>,
    #[serde(default)]
    pub classifier: Option<ClassifierConfig>,
}

/// `guardrails.output`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    #[serde(default)]
    pub pii: Option<PiiConfig>,
    #[serde(default)]
    pub system_prompt_leak: Option<LeakConfig>,
    #[serde(default)]
    pub classifier: Option<ClassifierConfig>,
}

/// A PII detector's policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PiiConfig {
    pub action: Action,
    /// How `redact` rewrites a value: `replace` (typed placeholder, the default), `mask`, `hash`.
    #[serde(default)]
    pub mode: RedactMode,
    /// Built-in entities (`email`, `phone`, `credit_card`, `iban`, `us_ssn`, `ip_address`,
    /// `secret`); all of them when absent.
    #[serde(default)]
    pub entities: Option<Vec<String>>,
    /// Extra patterns: `{name, regex}`.
    #[serde(default)]
    pub custom: Vec<PatternConfig>,
    /// Values never reported (a public support address).
    #[serde(default)]
    pub allow: Vec<String>,
}

/// A custom PII pattern.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternConfig {
    pub name: String,
    pub regex: String,
}

/// The injection heuristics' policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectionConfig {
    pub action: Action,
    /// Score (0–1) from which the heuristics fire.
    #[serde(default = "default_threshold")]
    pub threshold: f32,
}

/// The guard classifier's policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    pub action: Action,
    /// Probability from which a label fires.
    #[serde(default = "default_threshold")]
    pub threshold: f32,
    /// Labels that fire; all but `benign` when absent.
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    /// Per-label thresholds overriding `threshold` (`{injection: 0.99, toxic: 0.9}`).
    #[serde(default)]
    pub thresholds: BTreeMap<String, f32>,
}

/// The system-prompt leak check's policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeakConfig {
    pub action: Action,
    /// A verbatim run of this many consecutive words of the system prompt is a leak.
    #[serde(default = "default_min_words")]
    pub min_words: usize,
}

fn default_threshold() -> f32 {
    0.5
}

fn default_min_words() -> usize {
    8
}

/// The part of [`GuardrailsConfig`] a tenant may override.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TenantConfig {
    #[serde(default)]
    pub(crate) client_system_messages: ClientSystemMessages,
    #[serde(default)]
    pub(crate) restore_pii: bool,
    #[serde(default)]
    pub(crate) input: InputConfig,
    #[serde(default)]
    pub(crate) output: OutputConfig,
}
