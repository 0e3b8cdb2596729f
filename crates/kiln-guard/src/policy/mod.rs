//! The `guardrails` section of the gateway's configuration, resolved once into [`Guardrails`],
//! and the checks it runs on each request ([`RequestGuard`]).
//!
//! **Layers, in order.** On the way in: the configured system prompt is put first (with a
//! [`Canary`] planted in it) and client `system`/`developer` messages are rejected, demoted to
//! `user` or allowed, per `client_system_messages`; then, per detector, the injection heuristics
//! ([`crate::injection`], on the text as sent, so an encoded payload is decoded before anything
//! can mistake it for a secret), PII ([`crate::pii`]) and the classifier
//! ([`crate::classifier`], on the text as it will go upstream, placeholders included).
//! On the way out, before any byte reaches the client: a system-prompt leak (the canary, or a
//! verbatim run of the prompt's words), the classifier, then PII. Each detector has an `action`:
//! `block` refuses with a [`Violation`] (the gateway answers 400 `guardrail_violation` with the
//! category as `code`, never echoing the text), `redact` (PII only) rewrites the text, `flag`
//! lets it pass and records a [`Verdict`].
//!
//! **Per-tenant overrides.** `guardrails.tenants.NAME` holds any of `client_system_messages`,
//! `restore_pii`, `input` and `output`, merged key by key over the global ones, so
//! `tenants: {acme: {input: {pii: {action: block}}}}` changes only the action of acme's input
//! PII detector and keeps its entities and mode. Every tenant's policy is resolved and checked at
//! start-up; a mistake is an error naming its key (`guardrails.tenants.acme.input.pii.action`).
//!
//! **Streams.** [`RequestGuard::stream_push`] takes each content delta of a streamed reply and
//! returns what may be released now. It holds back the unfinished last word and, when PII is
//! redacted or placeholders restored, the last [`PII_HOLDBACK`] bytes, so a card number or an
//! e-mail split across chunks is seen whole before any of it goes out; a leaked canary is held
//! back by [`LEAK_HOLDBACK`]. A violation cuts the stream: the gateway sends a final error event.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

mod config;

use config::TenantConfig;
pub use config::{
    Action, ClassifierConfig, ClientSystemMessages, GuardrailsConfig, InjectionConfig, InputConfig,
    LeakConfig, OutputConfig, PatternConfig, PiiConfig,
};

use crate::canary::{Canary, Leak, LeakDetector};
use crate::classifier::{GuardClassifier, Scores};
use crate::injection::{InjectionScanner, InjectionVerdict};
use crate::pii::{CustomPattern, PiiDetector, PiiKind, PiiMatch, PiiOptions};
use crate::redact::{RedactMode, Vault, redact};

/// Bytes of a streamed reply held back while output PII is redacted or placeholders restored:
/// longer than any multi-word value the detectors know (an IBAN in groups of four is 42).
pub const PII_HOLDBACK: usize = 64;
/// Bytes held back while only a system-prompt leak is checked: a whole canary token.
pub const LEAK_HOLDBACK: usize = 40;
/// New bytes of a streamed reply after which the output classifier looks again.
const STREAM_CLASSIFY_EVERY: usize = 256;
/// The classifier reads at most this many trailing bytes of a streamed reply at each look.
const STREAM_CLASSIFY_WINDOW: usize = 2048;

/// A mistake in the `guardrails` section, naming its key.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("`{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("`guardrails.classifier_model` ({path}): {message}")]
    Classifier { path: PathBuf, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The category a refusal reports as `error.code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationCode {
    PromptInjection,
    Pii,
    Toxicity,
    SystemPromptLeak,
}

impl ViolationCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ViolationCode::PromptInjection => "prompt_injection",
            ViolationCode::Pii => "pii",
            ViolationCode::Toxicity => "toxicity",
            ViolationCode::SystemPromptLeak => "system_prompt_leak",
        }
    }

    /// The code of a classifier label that fired.
    fn of_label(label: &str) -> Self {
        match label {
            "toxic" | "toxicity" => ViolationCode::Toxicity,
            "pii_request" | "pii" => ViolationCode::Pii,
            _ => ViolationCode::PromptInjection,
        }
    }
}

/// A refusal: which detector, which category, and a message that never quotes the text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Violation {
    pub code: ViolationCode,
    /// `input.pii`, `input.injection`, `input.classifier`, `input.system_message`,
    /// `output.pii`, `output.system_prompt_leak`, `output.classifier`.
    pub detector: &'static str,
    pub message: String,
}

/// What a detector found and what was done, recorded with the request. `detail` names kinds,
/// rules and scores, never the text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub detector: &'static str,
    pub action: Action,
    pub detail: String,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}({})",
            self.detector,
            self.action.as_str(),
            self.detail
        )
    }
}

/// A resolved PII rule.
#[derive(Debug)]
struct PiiRule {
    action: Action,
    mode: RedactMode,
    detector: PiiDetector,
}

#[derive(Debug)]
struct InjectionRule {
    action: Action,
    threshold: f32,
}

#[derive(Debug)]
struct ClassifierRule {
    action: Action,
    /// Each label that fires, with its threshold.
    labels: Vec<(String, f32)>,
}

impl ClassifierRule {
    /// The most probable of the labels at or over the threshold, and all of them with their
    /// probabilities (`injection 0.97, toxic 0.61`); `None` when none is.
    fn fired(&self, scores: &Scores) -> Option<(String, String)> {
        let fired: Vec<(&String, f32)> = self
            .labels
            .iter()
            .map(|(l, threshold)| (l, scores.get(l), *threshold))
            .filter(|(_, p, threshold)| p >= threshold)
            .map(|(l, p, _)| (l, p))
            .collect();
        let (label, _) = fired.iter().max_by(|a, b| a.1.total_cmp(&b.1))?;
        let detail = fired
            .iter()
            .map(|(l, p)| format!("{l} {p:.2}"))
            .collect::<Vec<_>>()
            .join(", ");
        Some(((*label).clone(), detail))
    }
}

#[derive(Debug)]
struct LeakRule {
    action: Action,
    detector: LeakDetector,
}

/// One tenant's resolved policy.
#[derive(Debug)]
pub struct Policy {
    client_system_messages: ClientSystemMessages,
    restore_pii: bool,
    input_pii: Option<PiiRule>,
    input_injection: Option<InjectionRule>,
    input_classifier: Option<ClassifierRule>,
    output_pii: Option<PiiRule>,
    output_leak: Option<LeakRule>,
    output_classifier: Option<ClassifierRule>,
}

impl Policy {
    /// Whether any check runs on replies.
    pub fn checks_output(&self) -> bool {
        self.output_pii.is_some()
            || self.output_leak.is_some()
            || self.output_classifier.is_some()
            || self.restore_pii
    }

    /// Whether the input checks call the classifier (milliseconds: run them off the async
    /// workers).
    pub fn uses_classifier(&self) -> bool {
        self.input_classifier.is_some() || self.output_classifier.is_some()
    }

    /// Bytes of a streamed reply held back before release.
    fn holdback(&self) -> usize {
        if self.output_pii.is_some() || self.restore_pii {
            PII_HOLDBACK
        } else if self.output_leak.is_some() {
            LEAK_HOLDBACK
        } else {
            0
        }
    }
}

/// The guardrails of a gateway: resolved policies, the loaded classifier, the system prompt.
#[derive(Debug)]
pub struct Guardrails {
    /// The system prompt as sent upstream (canary included).
    system_prompt: Option<String>,
    canary: Option<Canary>,
    default: Arc<Policy>,
    tenants: HashMap<String, Arc<Policy>>,
    classifier: Option<Arc<GuardClassifier>>,
    scanner: InjectionScanner,
    enabled: bool,
}

impl Guardrails {
    /// Resolves `config`: compiles the detectors, loads the classifier, checks every tenant's
    /// override.
    pub fn new(config: &GuardrailsConfig) -> Result<Self, PolicyError> {
        let canary = match (&config.system_prompt, config.canary, &config.canary_token) {
            (Some(_), true, Some(token)) => {
                if token.trim().len() < 16 {
                    return Err(invalid(
                        "guardrails.canary_token",
                        "too short to be unguessable: use 16 characters or more",
                    ));
                }
                Some(Canary::from_token(token.trim()))
            }
            (Some(_), true, None) => Some(Canary::generate()),
            _ => None,
        };
        Self::with_canary(config, canary)
    }

    /// [`Guardrails::new`] with a given canary (tests, replicas sharing one).
    pub fn with_canary(
        config: &GuardrailsConfig,
        canary: Option<Canary>,
    ) -> Result<Self, PolicyError> {
        if let Some(p) = &config.system_prompt
            && p.trim().is_empty()
        {
            return Err(invalid(
                "guardrails.system_prompt",
                "is empty; remove the key or give the prompt",
            ));
        }
        let canary = canary.filter(|_| config.system_prompt.is_some());
        let classifier = match &config.classifier_model {
            Some(path) => Some(Arc::new(GuardClassifier::load(path).map_err(|e| {
                PolicyError::Classifier {
                    path: path.clone(),
                    message: format!("{e:#}"),
                }
            })?)),
            None => None,
        };
        let labels: Vec<String> = classifier
            .as_ref()
            .map(|c| c.labels().to_vec())
            .unwrap_or_default();
        let context = Context {
            system_prompt: config.system_prompt.as_deref(),
            canary: canary.as_ref(),
            labels: classifier.as_ref().map(|_| labels.as_slice()),
        };
        let base = TenantConfig {
            client_system_messages: config.client_system_messages,
            restore_pii: config.restore_pii,
            input: config.input.clone(),
            output: config.output.clone(),
        };
        let default = Arc::new(resolve(&base, "guardrails", &context)?);
        let base_value = serde_json::to_value(&base)
            .map_err(|e| invalid("guardrails", format!("cannot be re-read: {e}")))?;
        let mut tenants = HashMap::new();
        for (tenant, overrides) in &config.tenants {
            let key = format!("guardrails.tenants.{tenant}");
            let overrides = match overrides {
                Value::Object(_) => overrides,
                Value::Null => &Value::Object(Default::default()),
                _ => {
                    return Err(invalid(
                        key,
                        "expected a mapping of client_system_messages, restore_pii, input, output",
                    ));
                }
            };
            let mut merged = base_value.clone();
            merge(&mut merged, overrides);
            let tenant_config: TenantConfig =
                serde_path_to_error::deserialize(merged).map_err(|e| {
                    let path = e.path().to_string();
                    let key = if path == "." {
                        key.clone()
                    } else {
                        format!("{key}.{path}")
                    };
                    invalid(key, e.into_inner().to_string())
                })?;
            tenants.insert(
                tenant.clone(),
                Arc::new(resolve(&tenant_config, &key, &context)?),
            );
        }
        let enabled = config.system_prompt.is_some()
            || std::iter::once(&default).chain(tenants.values()).any(|p| {
                p.input_pii.is_some()
                    || p.input_injection.is_some()
                    || p.input_classifier.is_some()
                    || p.checks_output()
            });
        let system_prompt = config.system_prompt.as_ref().map(|p| match &canary {
            Some(c) => c.embed(p),
            None => p.clone(),
        });
        Ok(Self {
            system_prompt,
            canary,
            default,
            tenants,
            classifier,
            scanner: InjectionScanner::new(),
            enabled,
        })
    }

    /// Whether anything is configured (a gateway without guardrails skips them entirely).
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The tenant's policy (the global one when it has no override).
    pub fn policy(&self, tenant: &str) -> &Arc<Policy> {
        self.tenants.get(tenant).unwrap_or(&self.default)
    }

    /// The system prompt as sent upstream, canary included.
    pub fn system_prompt(&self) -> Option<&str> {
        self.system_prompt.as_deref()
    }

    pub fn canary(&self) -> Option<&Canary> {
        self.canary.as_ref()
    }

    pub fn classifier(&self) -> Option<&Arc<GuardClassifier>> {
        self.classifier.as_ref()
    }

    /// The checks of one request by `tenant`.
    pub fn request(self: &Arc<Self>, tenant: &str) -> RequestGuard {
        RequestGuard {
            guardrails: Arc::clone(self),
            policy: Arc::clone(self.policy(tenant)),
            vault: Vault::new(),
            restorable: Vault::new(),
            verdicts: Vec::new(),
            windows: Vec::new(),
        }
    }
}

/// What resolving a policy needs besides its own keys.
struct Context<'a> {
    system_prompt: Option<&'a str>,
    canary: Option<&'a Canary>,
    /// The classifier's labels, when one is loaded.
    labels: Option<&'a [String]>,
}

fn resolve(config: &TenantConfig, key: &str, context: &Context<'_>) -> Result<Policy, PolicyError> {
    let pii = |c: &Option<PiiConfig>, key: String| -> Result<Option<PiiRule>, PolicyError> {
        let Some(c) = c else { return Ok(None) };
        if c.mode == RedactMode::Block {
            return Err(invalid(
                format!("{key}.mode"),
                "expected replace, mask or hash (to refuse, set `action: block`)",
            ));
        }
        let options = PiiOptions {
            entities: c
                .entities
                .clone()
                .unwrap_or_else(|| PiiOptions::default().entities),
            custom: c
                .custom
                .iter()
                .map(|p| CustomPattern {
                    name: p.name.clone(),
                    regex: p.regex.clone(),
                })
                .collect(),
            allow: c.allow.clone(),
        };
        let detector = PiiDetector::new(&options).map_err(|e| invalid(key, e.to_string()))?;
        Ok(Some(PiiRule {
            action: c.action,
            mode: c.mode,
            detector,
        }))
    };
    let no_redact = |action: Action, key: String| -> Result<(), PolicyError> {
        if action == Action::Redact {
            Err(invalid(
                key,
                "`redact` applies to PII only; expected block or flag",
            ))
        } else {
            Ok(())
        }
    };
    let classifier = |c: &Option<ClassifierConfig>,
                      key: String|
     -> Result<Option<ClassifierRule>, PolicyError> {
        let Some(c) = c else { return Ok(None) };
        no_redact(c.action, format!("{key}.action"))?;
        check_threshold(c.threshold, format!("{key}.threshold"))?;
        let Some(known) = context.labels else {
            return Err(invalid(
                key,
                "needs a classifier: set `guardrails.classifier_model` to a model directory (kiln guard train --out DIR)",
            ));
        };
        let labels = match &c.labels {
            Some(labels) => {
                for l in labels {
                    if !known.contains(l) {
                        return Err(invalid(
                            format!("{key}.labels"),
                            format!(
                                "the classifier has no label `{l}`; its labels are {}",
                                known.join(", ")
                            ),
                        ));
                    }
                }
                labels.clone()
            }
            None => known.iter().filter(|l| *l != "benign").cloned().collect(),
        };
        for (l, t) in &c.thresholds {
            check_threshold(*t, format!("{key}.thresholds.{l}"))?;
            if !labels.contains(l) {
                return Err(invalid(
                    format!("{key}.thresholds.{l}"),
                    format!(
                        "`{l}` is not among the labels that fire ({})",
                        labels.join(", ")
                    ),
                ));
            }
        }
        let labels = labels
            .into_iter()
            .map(|l| {
                let t = c.thresholds.get(&l).copied().unwrap_or(c.threshold);
                (l, t)
            })
            .collect();
        Ok(Some(ClassifierRule {
            action: c.action,
            labels,
        }))
    };
    let input_injection = match &config.input.injection {
        Some(c) => {
            no_redact(c.action, format!("{key}.input.injection.action"))?;
            check_threshold(c.threshold, format!("{key}.input.injection.threshold"))?;
            Some(InjectionRule {
                action: c.action,
                threshold: c.threshold,
            })
        }
        None => None,
    };
    let output_leak = match &config.output.system_prompt_leak {
        Some(c) => {
            let k = format!("{key}.output.system_prompt_leak");
            no_redact(c.action, format!("{k}.action"))?;
            let Some(prompt) = context.system_prompt else {
                return Err(invalid(
                    k,
                    "needs `guardrails.system_prompt`: there is no prompt to leak",
                ));
            };
            if c.min_words < 3 {
                return Err(invalid(format!("{k}.min_words"), "must be at least 3"));
            }
            Some(LeakRule {
                action: c.action,
                detector: LeakDetector::new(prompt, context.canary.cloned(), c.min_words),
            })
        }
        None => None,
    };
    Ok(Policy {
        client_system_messages: config.client_system_messages,
        restore_pii: config.restore_pii,
        input_pii: pii(&config.input.pii, format!("{key}.input.pii"))?,
        input_injection,
        input_classifier: classifier(&config.input.classifier, format!("{key}.input.classifier"))?,
        output_pii: pii(&config.output.pii, format!("{key}.output.pii"))?,
        output_leak,
        output_classifier: classifier(
            &config.output.classifier,
            format!("{key}.output.classifier"),
        )?,
    })
}

fn check_threshold(t: f32, key: String) -> Result<(), PolicyError> {
    if (0.0..=1.0).contains(&t) {
        Ok(())
    } else {
        Err(invalid(key, format!("expected a value in [0, 1], got {t}")))
    }
}

/// Merges `overrides` into `base`, mapping by mapping; any other value replaces.
fn merge(base: &mut Value, overrides: &Value) {
    match (base, overrides) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// Which OpenAI endpoint a body is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `messages`
    Chat,
    /// `prompt`
    Completion,
}

/// The text of one streamed choice: what arrived and how much of it was released.
#[derive(Debug, Default, Clone)]
struct Window {
    text: String,
    released: usize,
    classified: usize,
}

/// The guardrails applied to one request: the tenant's policy, the request's placeholder
/// vault and the verdicts so far.
#[derive(Debug)]
pub struct RequestGuard {
    guardrails: Arc<Guardrails>,
    policy: Arc<Policy>,
    vault: Vault,
    /// The placeholders input redaction issued: the only ones restored in the reply (those
    /// output redaction adds stay).
    restorable: Vault,
    verdicts: Vec<Verdict>,
    windows: Vec<Window>,
}

impl RequestGuard {
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// What the detectors found so far.
    pub fn verdicts(&self) -> &[Verdict] {
        &self.verdicts
    }

    /// The verdicts as one line (`input.pii:redact(EMAIL×2); …`), or `None` when there are
    /// none.
    pub fn summary(&self) -> Option<String> {
        (!self.verdicts.is_empty()).then(|| {
            self.verdicts
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        })
    }

    fn note(&mut self, detector: &'static str, action: Action, detail: String) {
        let v = Verdict {
            detector,
            action,
            detail,
        };
        if !self.verdicts.contains(&v) {
            self.verdicts.push(v);
        }
    }

    /// Checks and rewrites a request body in place (`messages` or `prompt`): the system
    /// prompt, then each input detector. Returns whether the body changed.
    pub fn check_input(&mut self, endpoint: Endpoint, body: &mut Value) -> Result<bool, Violation> {
        let mut changed = false;
        if endpoint == Endpoint::Chat {
            changed |= self.place_system_prompt(body)?;
        } else if let Some(system) = self.guardrails.system_prompt.clone() {
            changed |= prefix_prompt(body, &system);
        }
        // The texts a client wrote (the configured system prompt excluded).
        let skip_first = endpoint == Endpoint::Chat && self.guardrails.system_prompt.is_some();
        let texts = client_texts(endpoint, body, skip_first);
        let joined = texts
            .iter()
            .map(|(_, t)| t.as_str())
            .collect::<Vec<_>>()
            .join("\n");

        if let Some(rule) = &self.policy.input_injection {
            let verdict = self.guardrails.scanner.scan(&joined);
            if verdict.is_injection(rule.threshold) {
                let (action, detail) = (rule.action, injection_detail(&verdict));
                self.note("input.injection", action, detail);
                if action == Action::Block {
                    return Err(Violation {
                        code: ViolationCode::PromptInjection,
                        detector: "input.injection",
                        message: "the request was refused by the gateway's prompt-injection check"
                            .into(),
                    });
                }
            }
        }
        if let Some(rule) = &self.policy.input_pii {
            let mut found: Vec<PiiMatch> = Vec::new();
            let mut rewritten = Vec::new();
            for (at, text) in &texts {
                let matches = rule.detector.detect(text);
                if matches.is_empty() {
                    continue;
                }
                if rule.action == Action::Redact {
                    let redacted = redact(text, &matches, rule.mode, &mut self.vault);
                    rewritten.push((at.clone(), redacted));
                }
                found.extend(matches);
            }
            if !found.is_empty() {
                let action = rule.action;
                self.note("input.pii", action, pii_detail(&found));
                match action {
                    Action::Block => {
                        return Err(Violation {
                            code: ViolationCode::Pii,
                            detector: "input.pii",
                            message: format!(
                                "the request carries personal data or secrets ({}); remove them and retry",
                                kinds(&found)
                            ),
                        });
                    }
                    Action::Redact => {
                        for (at, text) in rewritten {
                            set_text(body, &at, text);
                        }
                        self.restorable = self.vault.clone();
                        changed = true;
                    }
                    Action::Flag => {}
                }
            }
        }
        // The classifier reads the text as it goes upstream: a caller's own card number,
        // replaced by a placeholder, is not a request for someone else's data.
        if let Some(rule) = &self.policy.input_classifier
            && let Some(classifier) = &self.guardrails.classifier
        {
            let joined = client_texts(endpoint, body, skip_first)
                .iter()
                .map(|(_, t)| t.as_str())
                .collect::<Vec<_>>()
                .join("\n");
            let scores = classifier.classify(&joined).map_err(|e| Violation {
                code: ViolationCode::PromptInjection,
                detector: "input.classifier",
                message: format!("the guard classifier failed: {e}"),
            })?;
            let action = rule.action;
            if let Some((label, detail)) = rule.fired(&scores) {
                self.note("input.classifier", action, detail);
                if action == Action::Block {
                    return Err(Violation {
                        code: ViolationCode::of_label(&label),
                        detector: "input.classifier",
                        message: format!(
                            "the request was refused by the gateway's guard classifier ({label})"
                        ),
                    });
                }
            }
        }
        Ok(changed)
    }

    /// Puts the configured system prompt first and applies `client_system_messages`.
    fn place_system_prompt(&mut self, body: &mut Value) -> Result<bool, Violation> {
        let Some(system) = self.guardrails.system_prompt.clone() else {
            return Ok(false);
        };
        let Some(messages) = body.get_mut("messages").and_then(Value::as_array_mut) else {
            return Ok(false);
        };
        let is_system = |m: &Value| {
            matches!(
                m.get("role").and_then(Value::as_str),
                Some("system" | "developer")
            )
        };
        let clients = messages.iter().filter(|m| is_system(m)).count();
        if clients > 0 {
            match self.policy.client_system_messages {
                ClientSystemMessages::Reject => {
                    self.note(
                        "input.system_message",
                        Action::Block,
                        format!("{clients} client system message(s)"),
                    );
                    return Err(Violation {
                        code: ViolationCode::PromptInjection,
                        detector: "input.system_message",
                        message: "this gateway sets the system prompt; requests may not carry `system` or `developer` messages".into(),
                    });
                }
                ClientSystemMessages::Demote => {
                    for m in messages.iter_mut().filter(|m| is_system(m)) {
                        m["role"] = Value::from("user");
                    }
                    self.note(
                        "input.system_message",
                        Action::Flag,
                        format!("{clients} demoted to user"),
                    );
                }
                ClientSystemMessages::Allow => {}
            }
        }
        messages.insert(0, serde_json::json!({"role": "system", "content": system}));
        Ok(true)
    }

    /// Checks one whole reply text; returns it rewritten (redacted, placeholders restored).
    pub fn check_output_text(&mut self, text: &str) -> Result<String, Violation> {
        self.check_leak(text)?;
        self.check_output_classifier(text)?;
        let out = match &self.policy.output_pii {
            Some(_) => {
                let matches = self.output_pii_matches(text)?;
                self.apply_output_pii(text, &matches)
            }
            None => text.to_string(),
        };
        Ok(self.restore(out))
    }

    /// Checks and rewrites a whole (non-streamed) reply in place: every choice's
    /// `message.content` (chat) or `text` (completion).
    pub fn check_reply(&mut self, body: &mut Value) -> Result<(), Violation> {
        if !self.policy.checks_output() {
            return Ok(());
        }
        let Some(choices) = body.get_mut("choices").and_then(Value::as_array_mut) else {
            return Ok(());
        };
        for choice in choices {
            let slot = if choice.get("message").is_some() {
                choice.get_mut("message").and_then(|m| m.get_mut("content"))
            } else {
                choice.get_mut("text")
            };
            let Some(slot) = slot else { continue };
            let Some(text) = slot.as_str() else { continue };
            let checked = self.check_output_text(text)?;
            *slot = Value::from(checked);
        }
        Ok(())
    }

    /// Takes the next content delta of streamed choice `choice`; returns the text that may be
    /// released now (possibly empty).
    pub fn stream_push(&mut self, choice: usize, delta: &str) -> Result<String, Violation> {
        if self.windows.len() <= choice {
            self.windows.resize_with(choice + 1, Window::default);
        }
        self.windows[choice].text.push_str(delta);
        self.release(choice, false)
    }

    /// The rest of streamed choice `choice`, at its end.
    pub fn stream_finish(&mut self, choice: usize) -> Result<String, Violation> {
        if self.windows.len() <= choice {
            return Ok(String::new());
        }
        self.release(choice, true)
    }

    /// Checks the unreleased tail of a streamed choice and releases what is safe.
    fn release(&mut self, choice: usize, done: bool) -> Result<String, Violation> {
        let holdback = self.policy.holdback();
        let window = self.windows[choice].clone();
        let text = window.text.as_str();
        let from = window.released;
        // The leak check reads back far enough to see a whole run of words across the
        // boundary.
        if self.policy.output_leak.is_some() {
            let look = floor_boundary(text, from.saturating_sub(1024));
            self.check_leak(&text[look..])?;
        }
        if self.policy.output_classifier.is_some()
            && (done || text.len() - window.classified >= STREAM_CLASSIFY_EVERY)
        {
            let look = floor_boundary(text, text.len().saturating_sub(STREAM_CLASSIFY_WINDOW));
            self.check_output_classifier(&text[look..])?;
            self.windows[choice].classified = text.len();
        }
        let mut boundary = if done {
            text.len()
        } else {
            // Whole words only, and not the last `holdback` bytes.
            let limit = floor_boundary(text, text.len().saturating_sub(holdback));
            match text[from..limit].rfind(char::is_whitespace) {
                Some(at) => from + at + text[from + at..].chars().next().map_or(1, char::len_utf8),
                None => from,
            }
        };
        let pending = &text[from..];
        let matches = match &self.policy.output_pii {
            Some(_) => self.output_pii_matches(pending)?,
            None => Vec::new(),
        };
        if !done {
            // A value reaching past the boundary may be incomplete: hold it all back.
            for m in &matches {
                if from + m.end > boundary && from + m.start < boundary {
                    boundary = from + m.start;
                }
            }
            // So may a placeholder being restored.
            if self.policy.restore_pii
                && let Some(open) = text[from..boundary].rfind('<')
                && !text[from + open..boundary].contains('>')
            {
                boundary = from + open;
            }
        }
        let inside: Vec<PiiMatch> = matches
            .into_iter()
            .filter(|m| from + m.end <= boundary)
            .collect();
        let segment = &text[from..boundary];
        let out = self.apply_output_pii(segment, &inside);
        self.windows[choice].released = boundary;
        Ok(self.restore(out))
    }

    fn check_leak(&mut self, text: &str) -> Result<(), Violation> {
        let Some(rule) = &self.policy.output_leak else {
            return Ok(());
        };
        let Some(leak) = rule.detector.check(text) else {
            return Ok(());
        };
        let action = rule.action;
        let detail = match leak {
            Leak::Canary => "canary token".to_string(),
            Leak::Verbatim => "verbatim system prompt".to_string(),
        };
        self.note("output.system_prompt_leak", action, detail);
        if action == Action::Block {
            return Err(Violation {
                code: ViolationCode::SystemPromptLeak,
                detector: "output.system_prompt_leak",
                message: "the reply was withheld: it revealed the gateway's system prompt".into(),
            });
        }
        Ok(())
    }

    fn check_output_classifier(&mut self, text: &str) -> Result<(), Violation> {
        let (Some(rule), Some(classifier)) =
            (&self.policy.output_classifier, &self.guardrails.classifier)
        else {
            return Ok(());
        };
        let scores = classifier.classify(text).map_err(|e| Violation {
            code: ViolationCode::Toxicity,
            detector: "output.classifier",
            message: format!("the guard classifier failed: {e}"),
        })?;
        let Some((label, detail)) = rule.fired(&scores) else {
            return Ok(());
        };
        let action = rule.action;
        self.note("output.classifier", action, detail);
        if action == Action::Block {
            return Err(Violation {
                code: ViolationCode::of_label(&label),
                detector: "output.classifier",
                message: format!(
                    "the reply was withheld by the gateway's guard classifier ({label})"
                ),
            });
        }
        Ok(())
    }

    /// Output PII matches in `text`, refusing when the action is `block`. The values the
    /// caller sent (and that input redaction replaced) are not the reply's leak: placeholders
    /// are never matches.
    fn output_pii_matches(&mut self, text: &str) -> Result<Vec<PiiMatch>, Violation> {
        let Some(rule) = &self.policy.output_pii else {
            return Ok(Vec::new());
        };
        let matches = rule.detector.detect(text);
        if matches.is_empty() {
            return Ok(matches);
        }
        let action = rule.action;
        self.note("output.pii", action, pii_detail(&matches));
        if action == Action::Block {
            return Err(Violation {
                code: ViolationCode::Pii,
                detector: "output.pii",
                message: format!(
                    "the reply was withheld: it contained personal data or secrets ({})",
                    kinds(&matches)
                ),
            });
        }
        Ok(matches)
    }

    fn apply_output_pii(&mut self, text: &str, matches: &[PiiMatch]) -> String {
        match &self.policy.output_pii {
            Some(rule) if rule.action == Action::Redact && !matches.is_empty() => {
                redact(text, matches, rule.mode, &mut self.vault)
            }
            _ => text.to_string(),
        }
    }

    fn restore(&self, text: String) -> String {
        if self.policy.restore_pii && !self.restorable.is_empty() {
            self.restorable.restore(&text)
        } else {
            text
        }
    }
}

/// The largest char boundary of `text` at or below `at`.
fn floor_boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// Where a client text sits in a body: `messages[i].content`, `messages[i].content[j].text`,
/// `prompt`, `prompt[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TextAt {
    Message(usize),
    Part(usize, usize),
    Prompt,
    PromptItem(usize),
}

fn client_texts(endpoint: Endpoint, body: &Value, skip_first: bool) -> Vec<(TextAt, String)> {
    let mut out = Vec::new();
    match endpoint {
        Endpoint::Chat => {
            let Some(messages) = body.get("messages").and_then(Value::as_array) else {
                return out;
            };
            for (i, m) in messages.iter().enumerate().skip(usize::from(skip_first)) {
                match m.get("content") {
                    Some(Value::String(s)) => out.push((TextAt::Message(i), s.clone())),
                    Some(Value::Array(parts)) => {
                        for (j, p) in parts.iter().enumerate() {
                            if let Some(s) = p.get("text").and_then(Value::as_str) {
                                out.push((TextAt::Part(i, j), s.to_string()));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Endpoint::Completion => match body.get("prompt") {
            Some(Value::String(s)) => out.push((TextAt::Prompt, s.clone())),
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    if let Some(s) = item.as_str() {
                        out.push((TextAt::PromptItem(i), s.to_string()));
                    }
                }
            }
            _ => {}
        },
    }
    out
}

fn set_text(body: &mut Value, at: &TextAt, text: String) {
    let slot = match at {
        TextAt::Message(i) => body
            .get_mut("messages")
            .and_then(|m| m.get_mut(*i))
            .and_then(|m| m.get_mut("content")),
        TextAt::Part(i, j) => body
            .get_mut("messages")
            .and_then(|m| m.get_mut(*i))
            .and_then(|m| m.get_mut("content"))
            .and_then(|c| c.get_mut(*j))
            .and_then(|p| p.get_mut("text")),
        TextAt::Prompt => body.get_mut("prompt"),
        TextAt::PromptItem(i) => body.get_mut("prompt").and_then(|p| p.get_mut(*i)),
    };
    if let Some(slot) = slot {
        *slot = Value::from(text);
    }
}

/// Prepends the system prompt to a completion request's text prompt(s).
fn prefix_prompt(body: &mut Value, system: &str) -> bool {
    match body.get_mut("prompt") {
        Some(Value::String(s)) => {
            *s = format!("{system}\n\n{s}");
            true
        }
        Some(Value::Array(items)) => {
            let mut changed = false;
            for item in items {
                if let Value::String(s) = item {
                    *s = format!("{system}\n\n{s}");
                    changed = true;
                }
            }
            changed
        }
        _ => false,
    }
}

/// `EMAIL×2, CREDIT_CARD` — kinds and counts, never values.
fn pii_detail(matches: &[PiiMatch]) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for m in matches {
        *counts.entry(m.kind.label()).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(k, n)| if n == 1 { k } else { format!("{k}×{n}") })
        .collect::<Vec<_>>()
        .join(", ")
}

fn kinds(matches: &[PiiMatch]) -> String {
    let mut kinds: Vec<String> = matches.iter().map(|m| m.kind.label()).collect();
    kinds.sort();
    kinds.dedup();
    kinds.join(", ")
}

fn injection_detail(verdict: &InjectionVerdict) -> String {
    let mut rules: Vec<&str> = verdict.signals.iter().map(|s| s.rule).collect();
    rules.sort_unstable();
    rules.dedup();
    format!("score {:.2}: {}", verdict.score, rules.join(", "))
}

/// The label of a PII kind (re-exported for the gateway's metrics).
pub fn pii_label(kind: &PiiKind) -> String {
    kind.label()
}
