//! `kiln gateway --config FILE.yaml`: every key the gateway reads, with `${ENV}` interpolation
//! for secrets. Unknown keys are errors that name the key, so a typo never silently turns a
//! limit off.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}: line {line}: environment variable `{name}` is not set (referenced as ${{{name}}})", path.display())]
    MissingEnv {
        path: PathBuf,
        line: usize,
        name: String,
    },
    #[error("{}: `{key}`: {message}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The whole gateway configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address to listen on (`127.0.0.1:8080`).
    #[serde(default = "default_listen")]
    pub listen: String,
    pub upstreams: Vec<UpstreamConfig>,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    /// USD per million tokens, by model name.
    #[serde(default)]
    pub pricing: BTreeMap<String, Pricing>,
    /// Spending caps by tenant.
    #[serde(default)]
    pub budgets: BTreeMap<String, Budget>,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub validation: ValidationConfig,
    /// Prompt-injection defence, PII redaction and output checks ([`kiln_guard::policy`]).
    #[serde(default)]
    pub guardrails: kiln_guard::policy::GuardrailsConfig,
    /// Traces, drift, hallucination rate, cost per token, the dashboard and OTLP export.
    #[serde(default)]
    pub monitor: MonitorConfig,
}

/// The `monitor` section. Everything is on by default except the exports that need an address
/// (the drift webhook, OTLP).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorConfig {
    /// Off: no traces beyond the request record, no drift, no dashboard.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Serve the live dashboard at `/dashboard` (its data at `/dashboard/data`).
    #[serde(default = "yes")]
    pub dashboard: bool,
    /// When set, `/dashboard/data` needs `Authorization: Bearer <key>` (the page passes on
    /// `?key=` from its own URL). Without it the dashboard is as open as `/metrics`.
    #[serde(default)]
    pub dashboard_key: Option<String>,
    /// Traces queued for the store at most; past it they are dropped and counted
    /// (`kiln_monitor_traces_dropped_total`), never waited for.
    #[serde(default = "default_trace_buffer")]
    pub trace_buffer: usize,
    /// Width of the dashboard's time buckets, and how many it keeps.
    #[serde(default = "default_bucket_s")]
    pub bucket_s: u64,
    #[serde(default = "default_buckets")]
    pub buckets: usize,
    #[serde(default)]
    pub drift: DriftSettings,
    #[serde(default)]
    pub hallucination: HallucinationSettings,
    /// What the serving instances cost, for the infrastructure cost per token.
    #[serde(default)]
    pub infra: Vec<InfraCost>,
    /// OpenTelemetry spans with `gen_ai.*` attributes, over OTLP/HTTP (JSON).
    #[serde(default)]
    pub otlp: Option<OtlpSettings>,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dashboard: true,
            dashboard_key: None,
            trace_buffer: default_trace_buffer(),
            bucket_s: default_bucket_s(),
            buckets: default_buckets(),
            drift: DriftSettings::default(),
            hallucination: HallucinationSettings::default(),
            infra: Vec::new(),
            otlp: None,
        }
    }
}

fn yes() -> bool {
    true
}

fn default_trace_buffer() -> usize {
    10_000
}

fn default_bucket_s() -> u64 {
    10
}

fn default_buckets() -> usize {
    360
}

/// `monitor.drift`: a reference window of traffic against the current one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftSettings {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// A JSONL file of `{"prompt"}` / `{"prompt","completion"}` rows (or a trace export) to
    /// compare against. Without one, the first `window` requests after start-up are the
    /// reference.
    #[serde(default)]
    pub reference: Option<PathBuf>,
    /// Requests in the current (sliding) window, and in the reference when none is given.
    #[serde(default = "default_drift_window")]
    pub window: usize,
    /// Seconds between tests.
    #[serde(default = "default_drift_interval")]
    pub interval_s: u64,
    /// Share of drifted features that makes the traffic drifted (Evidently's `drift_share`).
    #[serde(default = "default_drift_share")]
    pub drift_share: f64,
    /// POSTed a JSON report when drift is detected and when it clears.
    #[serde(default)]
    pub webhook: Option<String>,
}

impl Default for DriftSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            reference: None,
            window: default_drift_window(),
            interval_s: default_drift_interval(),
            drift_share: default_drift_share(),
            webhook: None,
        }
    }
}

fn default_drift_window() -> usize {
    500
}

fn default_drift_interval() -> u64 {
    60
}

fn default_drift_share() -> f64 {
    0.5
}

/// `monitor.hallucination`: when a reply is flagged.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HallucinationSettings {
    /// A calibration written by `kiln monitor calibrate` (or the lifecycle); without one a
    /// documented default mapping from mean log-prob is used.
    #[serde(default)]
    pub calibration: Option<PathBuf>,
    /// Flag a reply whose probability of being wrong is above this.
    #[serde(default = "default_max_p_wrong")]
    pub max_p_wrong: f64,
    /// Flag a reply with context when less than this share of it is supported by the context.
    #[serde(default = "default_min_grounding")]
    pub min_grounding: f64,
}

impl Default for HallucinationSettings {
    fn default() -> Self {
        Self {
            calibration: None,
            max_p_wrong: default_max_p_wrong(),
            min_grounding: default_min_grounding(),
        }
    }
}

fn default_max_p_wrong() -> f64 {
    0.5
}

fn default_min_grounding() -> f64 {
    0.5
}

/// One serving instance's price: `{model: llama, cost_per_hour: 2.5}` (`model: "*"` for every
/// model without an entry of its own).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InfraCost {
    pub model: String,
    pub cost_per_hour: f64,
}

/// `monitor.otlp`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpSettings {
    /// The collector's traces endpoint, `http://HOST:4318/v1/traces`.
    pub endpoint: String,
    /// Sent with every export (an `authorization` header for a hosted collector).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

fn default_service_name() -> String {
    "kiln-gateway".into()
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// Base URL ending in `/v1` (`http://127.0.0.1:8000/v1`).
    pub url: String,
    /// Model names this upstream serves; `"*"` serves any.
    pub models: Vec<String>,
    /// Per-request timeout (to the end of the response).
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Sent upstream as `Authorization: Bearer …` (a hosted API's key).
    #[serde(default)]
    pub api_key: Option<String>,
}

fn default_timeout() -> f64 {
    60.0
}

impl UpstreamConfig {
    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == "*" || m == model)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    #[serde(default)]
    pub oauth2: Option<OAuth2Config>,
}

/// One API key and what its holder may do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The key in clear: for development only (prefer `key_sha256`).
    #[serde(default)]
    pub key: Option<String>,
    /// Lower-case hex SHA-256 of the key.
    #[serde(default)]
    pub key_sha256: Option<String>,
    pub tenant: String,
    /// Models the key may use; `"*"` (the default) is any.
    #[serde(default = "any_model")]
    pub models: Vec<String>,
    /// Requests per minute.
    #[serde(default)]
    pub rpm: Option<u64>,
    /// Tokens (prompt + completion) per minute.
    #[serde(default)]
    pub tpm: Option<u64>,
    #[serde(default)]
    pub max_concurrent: Option<u64>,
    /// The tenant's traffic must never become training data.
    #[serde(default)]
    pub no_train: bool,
}

fn any_model() -> Vec<String> {
    vec!["*".into()]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Config {
    pub jwks_url: String,
    pub issuer: String,
    pub audience: String,
    #[serde(default = "default_leeway")]
    pub leeway_s: u64,
    #[serde(default)]
    pub required_scopes: Vec<String>,
    /// Limits of every token holder (keyed by the token's tenant).
    #[serde(default)]
    pub rpm: Option<u64>,
    #[serde(default)]
    pub tpm: Option<u64>,
    /// The claim naming the tenant (default `sub`).
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
}

fn default_leeway() -> u64 {
    60
}

fn default_tenant_claim() -> String {
    "sub".into()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitsBackend {
    #[default]
    Memory,
    Redis,
}

/// What to do when the shared limits backend is unreachable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Serve without limits until the backend is back (logged once per incident).
    #[default]
    FailOpen,
    /// Refuse with 503 until the backend is back.
    FailClosed,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default)]
    pub backend: LimitsBackend,
    #[serde(default)]
    pub redis_url: Option<String>,
    #[serde(default)]
    pub on_backend_error: FailurePolicy,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheBackend {
    /// No response cache.
    None,
    #[default]
    Memory,
    Redis,
    Memcached,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    #[serde(default)]
    pub backend: CacheBackend,
    /// `redis://…` or `memcache://host:port`.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default = "default_ttl")]
    pub ttl_s: u64,
    /// Entries the in-memory cache keeps at most.
    #[serde(default = "default_max_entries")]
    pub max_entries: usize,
    /// Also cache requests that sample (temperature > 0 without a seed).
    #[serde(default)]
    pub cache_sampled: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            backend: CacheBackend::Memory,
            url: None,
            ttl_s: default_ttl(),
            max_entries: default_max_entries(),
            cache_sampled: false,
        }
    }
}

fn default_ttl() -> u64 {
    300
}

fn default_max_entries() -> usize {
    10_000
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pricing {
    pub input_per_million: f64,
    pub output_per_million: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriod {
    Day,
    Month,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub budget_usd: f64,
    pub period: BudgetPeriod,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://PATH` or `postgres://…`.
    #[serde(default = "default_store")]
    pub url: String,
    /// Keep each request's prompt and reply (after the PII scrubber) for audits and the next
    /// round's training data. Off by default: then no prompt or reply text is stored or logged
    /// anywhere.
    #[serde(default)]
    pub capture_content: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: default_store(),
            capture_content: false,
        }
    }
}

fn default_store() -> String {
    "sqlite://kiln-gateway.db".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    #[serde(default = "default_max_messages")]
    pub max_messages: usize,
    /// Prompt tokens a request may carry at most (counted with `tokenizer` when given, else
    /// estimated at 4 bytes a token).
    #[serde(default)]
    pub max_prompt_tokens: Option<usize>,
    /// A model directory whose `tokenizer.json` counts prompt tokens.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: default_max_body(),
            max_messages: default_max_messages(),
            max_prompt_tokens: None,
            tokenizer: None,
        }
    }
}

fn default_max_body() -> usize {
    1 << 20
}

fn default_max_messages() -> usize {
    256
}

impl GatewayConfig {
    /// Reads `path`, replacing every `${NAME}` with the environment variable `NAME`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses YAML `text` (named `path` in errors), with `${ENV}` interpolation.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::parse_with_env(text, path, |name| std::env::var(name).ok())
    }

    /// [`GatewayConfig::parse`] with `${NAME}` looked up in `env` instead of the process's
    /// environment: for checking a deployment's config against the variables it will get.
    pub fn parse_with_env(
        text: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let text = interpolate(text, path, env)?;
        let config: Self = serde_yaml_ng::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, message: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message: message.to_string(),
        };
        if self.upstreams.is_empty() {
            return Err(invalid(
                "upstreams".into(),
                "at least one upstream is needed",
            ));
        }
        for (i, u) in self.upstreams.iter().enumerate() {
            if !(u.url.starts_with("http://") || u.url.starts_with("https://")) {
                return Err(invalid(
                    format!("upstreams[{i}].url"),
                    "expected an http:// or https:// base URL ending in /v1",
                ));
            }
            if u.models.is_empty() {
                return Err(invalid(
                    format!("upstreams[{i}].models"),
                    "list the model names it serves, or \"*\"",
                ));
            }
            if !(u.timeout_s > 0.0 && u.timeout_s.is_finite()) {
                return Err(invalid(format!("upstreams[{i}].timeout_s"), "must be > 0"));
            }
        }
        for (i, k) in self.auth.api_keys.iter().enumerate() {
            match (&k.key, &k.key_sha256) {
                (Some(_), None) => {}
                (None, Some(h)) if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) => {}
                (None, Some(_)) => {
                    return Err(invalid(
                        format!("auth.api_keys[{i}].key_sha256"),
                        "expected 64 hex digits (sha256sum of the key)",
                    ));
                }
                _ => {
                    return Err(invalid(
                        format!("auth.api_keys[{i}]"),
                        "give exactly one of `key` and `key_sha256`",
                    ));
                }
            }
        }
        if self.limits.backend == LimitsBackend::Redis && self.limits.redis_url.is_none() {
            return Err(invalid(
                "limits.redis_url".into(),
                "the redis backend needs a URL (redis://127.0.0.1:6379)",
            ));
        }
        if matches!(
            self.cache.backend,
            CacheBackend::Redis | CacheBackend::Memcached
        ) && self.cache.url.is_none()
        {
            return Err(invalid(
                "cache.url".into(),
                "the redis and memcached backends need a URL",
            ));
        }
        for (model, p) in &self.pricing {
            if p.input_per_million < 0.0 || p.output_per_million < 0.0 {
                return Err(invalid(format!("pricing.{model}"), "prices must be >= 0"));
            }
        }
        self.validate_monitor(&invalid)
    }

    fn validate_monitor(
        &self,
        invalid: &dyn Fn(String, &str) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let m = &self.monitor;
        if m.bucket_s == 0 || m.buckets == 0 {
            return Err(invalid(
                "monitor.bucket_s".into(),
                "bucket_s and buckets must be >= 1",
            ));
        }
        if m.trace_buffer == 0 {
            return Err(invalid("monitor.trace_buffer".into(), "must be >= 1"));
        }
        if m.drift.window < 30 {
            return Err(invalid(
                "monitor.drift.window".into(),
                "must be >= 30 requests (drift tests need samples)",
            ));
        }
        if m.drift.interval_s == 0 {
            return Err(invalid("monitor.drift.interval_s".into(), "must be >= 1"));
        }
        if !(m.drift.drift_share > 0.0 && m.drift.drift_share <= 1.0) {
            return Err(invalid(
                "monitor.drift.drift_share".into(),
                "expected a share in (0, 1]",
            ));
        }
        if let Some(url) = &m.drift.webhook
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                "monitor.drift.webhook".into(),
                "expected an http:// or https:// URL",
            ));
        }
        let h = &m.hallucination;
        if !(0.0..=1.0).contains(&h.max_p_wrong) {
            return Err(invalid(
                "monitor.hallucination.max_p_wrong".into(),
                "expected a probability in [0, 1]",
            ));
        }
        if !(0.0..=1.0).contains(&h.min_grounding) {
            return Err(invalid(
                "monitor.hallucination.min_grounding".into(),
                "expected a share in [0, 1]",
            ));
        }
        for (i, c) in m.infra.iter().enumerate() {
            if !(c.cost_per_hour >= 0.0 && c.cost_per_hour.is_finite()) {
                return Err(invalid(
                    format!("monitor.infra[{i}].cost_per_hour"),
                    "expected USD per hour >= 0",
                ));
            }
        }
        if let Some(o) = &m.otlp
            && !(o.endpoint.starts_with("http://") || o.endpoint.starts_with("https://"))
        {
            return Err(invalid(
                "monitor.otlp.endpoint".into(),
                "expected an http:// or https:// URL such as http://collector:4318/v1/traces",
            ));
        }
        Ok(())
    }
}

/// Replaces `${NAME}` with `lookup(NAME)`, except on comment lines; `$${` is a literal `${`.
fn interpolate(
    text: &str,
    path: &Path,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    for (n, line) in text.split_inclusive('\n').enumerate() {
        // A comment line is copied as it is: a commented-out `${KEY}` needs no variable.
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("${") {
            if rest[..at].ends_with('$') {
                out.push_str(&rest[..at - 1]);
                out.push_str("${");
                rest = &rest[at + 2..];
                continue;
            }
            out.push_str(&rest[..at]);
            let Some(end) = rest[at..].find('}') else {
                out.push_str(&rest[at..]);
                rest = "";
                break;
            };
            let name = &rest[at + 2..at + end];
            let value = lookup(name).ok_or_else(|| ConfigError::MissingEnv {
                path: path.to_path_buf(),
                line: n + 1,
                name: name.to_string(),
            })?;
            out.push_str(&value);
            rest = &rest[at + end + 1..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str =
        "upstreams:\n  - name: local\n    url: http://127.0.0.1:8000/v1\n    models: [\"*\"]\n";

    #[test]
    fn env_references_are_replaced_and_missing_ones_named() {
        let lookup = |n: &str| (n == "KEY").then(|| "s3cret".to_string());
        let p = Path::new("g.yaml");
        assert_eq!(
            interpolate("a: ${KEY}\nb: $${KEY}\n  # c: ${UNSET}\n", p, lookup).unwrap(),
            "a: s3cret\nb: ${KEY}\n  # c: ${UNSET}\n"
        );
        let err = interpolate("a: 1\nb: ${NOPE}\n", p, lookup).unwrap_err();
        assert!(
            err.to_string().contains("line 2") && err.to_string().contains("NOPE"),
            "{err}"
        );
    }

    #[test]
    fn defaults_and_errors_name_the_key() {
        let c = GatewayConfig::parse(MINIMAL, Path::new("g.yaml")).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080");
        assert_eq!(c.cache.backend, CacheBackend::Memory);
        let typo = format!("{MINIMAL}limitz: {{}}\n");
        let err = GatewayConfig::parse(&typo, Path::new("g.yaml")).unwrap_err();
        assert!(err.to_string().contains("limitz"), "{err}");
        let both = format!("{MINIMAL}auth:\n  api_keys:\n    - tenant: t\n");
        let err = GatewayConfig::parse(&both, Path::new("g.yaml")).unwrap_err();
        assert!(err.to_string().contains("auth.api_keys[0]"), "{err}");
    }
}
