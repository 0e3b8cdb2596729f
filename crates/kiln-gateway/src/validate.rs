//! Input validation before anything reaches an upstream: body size, UTF-8, JSON syntax, the
//! OpenAI request shape (each type error names its field, `messages[2].content`), message count
//! and prompt tokens. The request is parsed twice on purpose: once as a [`Value`], which is what
//! is forwarded (unchanged, so fields this gateway does not know still reach the upstream) and
//! hashed for the cache, and once into the typed structs below through `serde_path_to_error`,
//! which only checks the shape and yields the path of the first mismatch.

use std::path::Path;

use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::Value;

use crate::config::ValidationConfig;
use crate::error::ApiError;

/// Which OpenAI endpoint a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    Chat,
    /// `POST /v1/completions`
    Completion,
}

impl Endpoint {
    /// The path below the upstream's `/v1` base.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Completion => "/completions",
        }
    }
}

/// A request that passed validation.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub endpoint: Endpoint,
    pub model: String,
    pub stream: bool,
    /// The client asked for the final usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// Prompt tokens: counted with the configured tokenizer, else estimated at 4 bytes a token.
    pub prompt_tokens: u64,
    /// The body as sent, forwarded unchanged.
    pub body: Value,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)] // Fields exist to check their types.
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
#[allow(dead_code)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
    name: Option<String>,
}

/// The sampling fields both endpoints share, type-checked (unknown fields are the upstream's
/// business and pass).
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct Sampling {
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    n: Option<u64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logprobs: Option<Value>,
    top_logprobs: Option<u64>,
    user: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: Prompt,
}

const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// Counts prompt tokens: with a model's tokenizer when configured, else bytes / 4.
#[derive(Debug)]
pub struct Validator {
    config: ValidationConfig,
    tokenizer: Option<kiln_core::Tokenizer>,
}

impl Validator {
    /// Loads `validation.tokenizer` when set (errors name the directory).
    pub fn new(config: &ValidationConfig) -> anyhow::Result<Self> {
        let tokenizer = match &config.tokenizer {
            Some(dir) => Some(load_tokenizer(dir)?),
            None => None,
        };
        Ok(Self {
            config: config.clone(),
            tokenizer,
        })
    }

    pub fn max_body_bytes(&self) -> usize {
        self.config.max_body_bytes
    }

    /// Tokens in `text` (see [`Validator`]).
    pub fn count_tokens(&self, text: &str) -> u64 {
        match &self.tokenizer {
            Some(t) => match t.encode(text, false) {
                Ok(ids) => ids.len() as u64,
                Err(_) => estimate_tokens(text),
            },
            None => estimate_tokens(text),
        }
    }

    /// Validates a request body for `endpoint`.
    pub fn validate(&self, endpoint: Endpoint, bytes: &[u8]) -> Result<ValidRequest, ApiError> {
        if bytes.len() > self.config.max_body_bytes {
            return Err(too_large(self.config.max_body_bytes));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| {
            ApiError::invalid(
                "invalid_utf8",
                "body",
                format!(
                    "the request body is not valid UTF-8 (at byte {})",
                    e.valid_up_to()
                ),
            )
        })?;
        let body: Value = serde_json::from_str(text).map_err(|e| {
            ApiError::invalid(
                "invalid_json",
                "body",
                format!(
                    "the request body is not valid JSON: {e} (line {}, column {})",
                    e.line(),
                    e.column()
                )
                .replace(&format!(" at line {} column {}", e.line(), e.column()), ""),
            )
        })?;
        if !body.is_object() {
            return Err(ApiError::invalid(
                "invalid_type",
                "body",
                "the request body must be a JSON object",
            ));
        }
        // Read on its own rather than `#[serde(flatten)]`ed, which would lose the field's path.
        let sampling: Sampling = typed(&body)?;
        let (model, prompt_text, prompt_ids, messages) = match endpoint {
            Endpoint::Chat => {
                let req: ChatRequest = typed(&body)?;
                let mut text = String::new();
                for (i, m) in req.messages.iter().enumerate() {
                    if !ROLES.contains(&m.role.as_str()) {
                        return Err(ApiError::invalid(
                            "invalid_value",
                            format!("messages[{i}].role"),
                            format!(
                                "`{}` is not a role; expected one of {}",
                                m.role,
                                ROLES.join(", ")
                            ),
                        ));
                    }
                    match &m.content {
                        Some(Content::Text(s)) => text.push_str(s),
                        Some(Content::Parts(parts)) => {
                            for p in parts {
                                if let Some(s) = &p.text {
                                    text.push_str(s);
                                }
                            }
                        }
                        None => {}
                    }
                    text.push('\n');
                }
                let count = req.messages.len();
                (req.model, text, 0u64, Some(count))
            }
            Endpoint::Completion => {
                let req: CompletionRequest = typed(&body)?;
                let (text, ids) = match req.prompt {
                    Prompt::Text(s) => (s, 0),
                    Prompt::Texts(v) => (v.join("\n"), 0),
                    Prompt::Tokens(ids) => (String::new(), ids.len() as u64),
                    Prompt::TokenLists(lists) => {
                        (String::new(), lists.iter().map(|l| l.len() as u64).sum())
                    }
                };
                (req.model, text, ids, None)
            }
        };
        if model.is_empty() {
            return Err(ApiError::invalid(
                "invalid_value",
                "model",
                "`model` must not be empty",
            ));
        }
        if let Some(count) = messages {
            if count == 0 {
                return Err(ApiError::invalid(
                    "invalid_value",
                    "messages",
                    "`messages` must hold at least one message",
                ));
            }
            if count > self.config.max_messages {
                return Err(ApiError::invalid(
                    "too_many_messages",
                    "messages",
                    format!(
                        "{count} messages; this gateway accepts at most {}",
                        self.config.max_messages
                    ),
                ));
            }
        }
        let prompt_tokens = prompt_ids + self.count_tokens(&prompt_text);
        if let Some(max) = self.config.max_prompt_tokens
            && prompt_tokens > max as u64
        {
            let param = match endpoint {
                Endpoint::Chat => "messages",
                Endpoint::Completion => "prompt",
            };
            return Err(ApiError::invalid(
                "context_length_exceeded",
                param,
                format!(
                    "the prompt has {prompt_tokens} tokens{}; this gateway accepts at most {max}",
                    if self.tokenizer.is_some() {
                        ""
                    } else {
                        " (estimated at 4 bytes a token)"
                    }
                ),
            ));
        }
        let stream = sampling.stream.unwrap_or(false);
        let include_usage = stream
            && sampling
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false);
        Ok(ValidRequest {
            endpoint,
            model,
            stream,
            include_usage,
            prompt_tokens,
            body,
        })
    }
}

/// 413 for a body over `max` bytes.
pub fn too_large(max: usize) -> ApiError {
    ApiError::invalid(
        "request_too_large",
        "body",
        format!("the request body is larger than {max} bytes (validation.max_body_bytes)"),
    )
    .with_status(StatusCode::PAYLOAD_TOO_LARGE)
}

/// Bytes / 4, at least 1 for a non-empty text.
pub fn estimate_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
}

fn load_tokenizer(dir: &Path) -> anyhow::Result<kiln_core::Tokenizer> {
    kiln_core::Tokenizer::from_dir(dir)
        .map_err(|e| anyhow::anyhow!("validation.tokenizer ({}): {e}", dir.display()))
}

/// Deserializes `body` into `T`, naming the field of the first mismatch.
fn typed<T: serde::de::DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e: serde_path_to_error::Error<_>| {
        let path = e.path().to_string();
        let inner: &serde_json::Error = e.inner();
        let message = inner.to_string();
        // `missing field `x`` is reported at the parent; name the field itself.
        let param = match message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
        {
            Some(field) if path == "." => field.to_string(),
            Some(field) => format!("{path}.{field}"),
            None => path.clone(),
        };
        let code = if message.starts_with("missing field") {
            "missing_field"
        } else {
            "invalid_type"
        };
        let message = message.replace(
            "data did not match any variant of untagged enum",
            "unexpected type for",
        );
        ApiError::invalid(code, param.clone(), format!("`{param}`: {message}"))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn validator(max_prompt_tokens: Option<usize>) -> Validator {
        Validator::new(&ValidationConfig {
            max_body_bytes: 1000,
            max_messages: 2,
            max_prompt_tokens,
            tokenizer: None,
        })
        .unwrap()
    }

    fn err(body: &str) -> ApiError {
        validator(Some(10))
            .validate(Endpoint::Chat, body.as_bytes())
            .unwrap_err()
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": 5}]}"#,
                "messages[0].content",
                "invalid_type",
            ),
            (r#"{"model": 1, "messages": []}"#, "model", "invalid_type"),
            (r#"{"messages": []}"#, "model", "missing_field"),
            (
                r#"{"model": "m", "messages": [{"content": "x"}]}"#,
                "messages[0].role",
                "missing_field",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}"#,
                "temperature",
                "invalid_type",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}"#,
                "messages[0].role",
                "invalid_value",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "user", "content": "c"}]}"#,
                "messages",
                "too_many_messages",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "this prompt is far longer than ten tokens at four bytes each"}]}"#,
                "messages",
                "context_length_exceeded",
            ),
            (r#"{"model": "m", "#, "body", "invalid_json"),
        ];
        for (body, param, code) in cases {
            let e = err(body);
            assert_eq!(
                (e.param.as_deref(), e.code),
                (Some(param), code),
                "{body}: {e}"
            );
        }
    }

    #[test]
    fn size_and_utf8() {
        let v = validator(None);
        let big = format!(r#"{{"model": "m", "prompt": "{}"}}"#, "x".repeat(2000));
        assert_eq!(
            v.validate(Endpoint::Completion, big.as_bytes())
                .unwrap_err()
                .status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let e = v
            .validate(Endpoint::Completion, b"{\"model\": \"\xff\"}")
            .unwrap_err();
        assert_eq!(e.code, "invalid_utf8");
    }

    #[test]
    fn valid_request_keeps_the_body() {
        let body = r#"{"model": "m", "prompt": "abcdefgh", "stream": true, "stream_options": {"include_usage": true}, "extra": 1}"#;
        let r = validator(None)
            .validate(Endpoint::Completion, body.as_bytes())
            .unwrap();
        assert_eq!(r.model, "m");
        assert!(r.stream && r.include_usage);
        assert_eq!(r.prompt_tokens, 2);
        assert_eq!(r.body["extra"], 1);
    }
}
