//! Raw request → [`ValidRequest`]: every range checked, the prompt tokenized and the token
//! budget settled, with one [`ValidationError`] variant per rule, each naming the field (`param`
//! in the error envelope) and the limit.

use kiln_core::Tokenizer;
use kiln_model::SamplingParams;
use serde_json::{Value, json};

use super::types::{
    ChatCompletionRequest, ChatMessage, CompletionRequest, MessageContent, Prompt, StopSpec,
};
use crate::engine::SeqRequest;

/// Choices per request at most (`n`).
pub const MAX_CHOICES: usize = 8;
/// Stop strings per request at most.
pub const MAX_STOP_STRINGS: usize = 8;
/// Alternatives per token at most (`top_logprobs`, completions' `logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 20;

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("`{field}` must be {rule}, got {value}.")]
    OutOfRange {
        field: String,
        rule: String,
        value: String,
    },
    #[error("`messages` must contain at least one message.")]
    EmptyMessages,
    #[error(
        "`{field}`: unknown role `{role}`; expected system, developer, user, assistant or tool."
    )]
    UnknownRole { field: String, role: String },
    #[error("`{field}` is required for a `{role}` message.")]
    MissingContent { field: String, role: String },
    #[error("`{field}`: content parts of type `{kind}` are not supported, only `text`.")]
    UnsupportedPart { field: String, kind: String },
    #[error("`{field}`: a `text` part needs a `text` string.")]
    MissingPartText { field: String },
    #[error("The model's chat template cannot render these messages: {0}")]
    ChatTemplate(String),
    #[error("`{field}` cannot be tokenized: {message}")]
    Tokenize {
        field: &'static str,
        message: String,
    },
    #[error("`{field}` must not be empty.")]
    EmptyPrompt { field: &'static str },
    #[error("`prompt` holds {0} prompts; this server takes one prompt per request.")]
    BatchedPrompt(usize),
    #[error("`{field}`: token id {id} is outside the vocabulary ({vocab_size} entries).")]
    TokenOutOfVocab {
        field: String,
        id: u32,
        vocab_size: usize,
    },
    #[error(
        "This model's maximum context length is {max_model_len} tokens. However, your request has {prompt_tokens} input tokens. Please reduce the length of the input {field}."
    )]
    PromptTooLong {
        field: &'static str,
        prompt_tokens: usize,
        max_model_len: usize,
    },
    #[error(
        "'{field}' is too large: {max_tokens}. This model's maximum context length is {max_model_len} tokens and your request has {prompt_tokens} input tokens ({max_tokens} > {max_model_len} - {prompt_tokens})."
    )]
    MaxTokensTooLarge {
        field: &'static str,
        max_tokens: i64,
        prompt_tokens: usize,
        max_model_len: usize,
    },
    #[error("`stop` may hold at most {MAX_STOP_STRINGS} strings, got {0}.")]
    TooManyStops(usize),
    #[error("`{field}` must not be an empty string.")]
    EmptyStop { field: String },
    #[error("`top_logprobs` needs `logprobs: true`.")]
    TopLogprobsWithoutLogprobs,
    #[error("`{field}` is not supported by this server: {detail}.")]
    Unsupported { field: &'static str, detail: String },
    #[error("Give exactly one of `prompt` and `messages`.")]
    PromptOrMessages,
}

impl ValidationError {
    /// The request field at fault, as a path.
    pub fn param(&self) -> Option<String> {
        Some(match self {
            Self::OutOfRange { field, .. }
            | Self::UnknownRole { field, .. }
            | Self::MissingContent { field, .. }
            | Self::UnsupportedPart { field, .. }
            | Self::MissingPartText { field }
            | Self::TokenOutOfVocab { field, .. }
            | Self::EmptyStop { field } => field.clone(),
            Self::EmptyMessages | Self::ChatTemplate(_) => "messages".into(),
            Self::Tokenize { field, .. }
            | Self::EmptyPrompt { field }
            | Self::PromptTooLong { field, .. }
            | Self::MaxTokensTooLarge { field, .. }
            | Self::Unsupported { field, .. } => (*field).into(),
            Self::BatchedPrompt(_) => "prompt".into(),
            Self::TooManyStops(_) => "stop".into(),
            Self::TopLogprobsWithoutLogprobs => "top_logprobs".into(),
            Self::PromptOrMessages => return None,
        })
    }

    /// OpenAI's `code` where one applies.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            Self::PromptTooLong { .. } | Self::MaxTokensTooLarge { .. } => {
                Some("context_length_exceeded")
            }
            _ => None,
        }
    }
}

/// What validation needs to know about the server.
#[derive(Debug, Clone, Copy)]
pub struct Limits<'a> {
    pub tokenizer: &'a Tokenizer,
    pub max_model_len: usize,
    /// The model's vocabulary (token ids must be below it).
    pub vocab_size: usize,
    /// Choices per request at most: [`MAX_CHOICES`], or fewer when the engine's queue is
    /// shorter (a request the queue can never take would be refused with 429 forever).
    pub max_choices: usize,
}

/// A request ready for the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub prompt_ids: Vec<u32>,
    pub n: usize,
    pub max_tokens: usize,
    /// The first choice's sampling; choice `i` adds `i` to the seed.
    pub sampling: SamplingParams,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// `Some(k)`: report log-probs, with `k` alternatives per token.
    pub logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
}

impl ValidRequest {
    /// One engine sequence per choice.
    pub fn seq_requests(&self, adapter: Option<usize>, eos_token_ids: &[u32]) -> Vec<SeqRequest> {
        (0..self.n)
            .map(|i| SeqRequest {
                prompt_ids: self.prompt_ids.clone(),
                adapter,
                max_tokens: self.max_tokens,
                sampling: SamplingParams {
                    seed: self.sampling.seed.wrapping_add(i as u64),
                    ..self.sampling.clone()
                },
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
                stop_token_ids: if self.ignore_eos {
                    Vec::new()
                } else {
                    eos_token_ids.to_vec()
                },
                top_logprobs: self.logprobs,
            })
            .collect()
    }
}

/// The generation settings chat and text completions share, copied out of either request.
struct Common<'a> {
    max_tokens: Option<(&'static str, i64)>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<&'a StopSpec>,
    n: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    logprobs: Option<usize>,
    ignore_eos: bool,
    stream: bool,
    include_usage: bool,
    logit_bias: Option<&'a serde_json::Map<String, Value>>,
}

pub fn chat(req: &ChatCompletionRequest, limits: &Limits) -> Result<ValidRequest, ValidationError> {
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ValidationError::Unsupported {
            field: "tools",
            detail: "tool calling is not implemented".into(),
        });
    }
    if let Some(format) = &req.response_format
        && format.kind != "text"
    {
        return Err(ValidationError::Unsupported {
            field: "response_format",
            detail: format!("only `text`, not `{}`", format.kind),
        });
    }
    let logprobs = req.logprobs.unwrap_or(false);
    let top = req
        .top_logprobs
        .map(|k| range_usize("top_logprobs", k, 0, MAX_TOP_LOGPROBS))
        .transpose()?;
    if !logprobs && top.is_some_and(|k| k > 0) {
        return Err(ValidationError::TopLogprobsWithoutLogprobs);
    }
    let common = Common {
        max_tokens: req
            .max_completion_tokens
            .map(|v| ("max_completion_tokens", v))
            .or(req.max_tokens.map(|v| ("max_tokens", v))),
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        min_p: req.min_p,
        seed: req.seed,
        stop: req.stop.as_ref(),
        n: req.n,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        repetition_penalty: req.repetition_penalty,
        logprobs: logprobs.then_some(top.unwrap_or(0)),
        ignore_eos: req.ignore_eos.unwrap_or(false),
        stream: req.stream.unwrap_or(false),
        include_usage: include_usage(req.stream_options.as_ref()),
        logit_bias: req.logit_bias.as_ref(),
    };
    let partial = check_common(&common, limits)?;
    let prompt_ids = encode_messages(&req.messages, limits.tokenizer, true, false)?;
    finish(partial, prompt_ids, "messages", &common, limits)
}

pub fn completion(
    req: &CompletionRequest,
    limits: &Limits,
) -> Result<ValidRequest, ValidationError> {
    if req.echo == Some(true) {
        return Err(ValidationError::Unsupported {
            field: "echo",
            detail: "the prompt is not echoed".into(),
        });
    }
    if req.suffix.is_some() {
        return Err(ValidationError::Unsupported {
            field: "suffix",
            detail: "insertion is not implemented".into(),
        });
    }
    if let Some(best_of) = req.best_of
        && best_of != req.n.unwrap_or(1)
    {
        return Err(ValidationError::Unsupported {
            field: "best_of",
            detail: "it must equal `n`".into(),
        });
    }
    let common = Common {
        max_tokens: req.max_tokens.map(|v| ("max_tokens", v)),
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        min_p: req.min_p,
        seed: req.seed,
        stop: req.stop.as_ref(),
        n: req.n,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        repetition_penalty: req.repetition_penalty,
        logprobs: req
            .logprobs
            .map(|k| range_usize("logprobs", k, 0, MAX_TOP_LOGPROBS))
            .transpose()?,
        ignore_eos: req.ignore_eos.unwrap_or(false),
        stream: req.stream.unwrap_or(false),
        include_usage: include_usage(req.stream_options.as_ref()),
        logit_bias: req.logit_bias.as_ref(),
    };
    let partial = check_common(&common, limits)?;
    let prompt_ids = encode_prompt(&req.prompt, limits)?;
    finish(partial, prompt_ids, "prompt", &common, limits)
}

fn include_usage(options: Option<&super::types::StreamOptions>) -> bool {
    options.and_then(|o| o.include_usage).unwrap_or(false)
}

/// Everything but the prompt and the token budget.
struct Checked {
    n: usize,
    sampling: SamplingParams,
    presence_penalty: f32,
    frequency_penalty: f32,
    stop: Vec<String>,
}

fn check_common(c: &Common, limits: &Limits) -> Result<Checked, ValidationError> {
    if c.logit_bias.is_some_and(|b| !b.is_empty()) {
        return Err(ValidationError::Unsupported {
            field: "logit_bias",
            detail: "biasing logits is not implemented".into(),
        });
    }
    let n = match c.n {
        Some(n) => range_usize("n", n, 1, limits.max_choices)?,
        None => 1,
    };
    let temperature = range_f32(
        "temperature",
        c.temperature,
        1.0,
        0.0..=2.0,
        "between 0 and 2",
    )?;
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(out_of_range("top_p", "in (0, 1]", top_p));
    }
    let top_k = match c.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
        k => return Err(out_of_range("top_k", "-1, 0 or a positive integer", k)),
    };
    let min_p = range_f32("min_p", c.min_p, 0.0, 0.0..=1.0, "between 0 and 1")?;
    let presence_penalty = range_f32(
        "presence_penalty",
        c.presence_penalty,
        0.0,
        -2.0..=2.0,
        "between -2 and 2",
    )?;
    let frequency_penalty = range_f32(
        "frequency_penalty",
        c.frequency_penalty,
        0.0,
        -2.0..=2.0,
        "between -2 and 2",
    )?;
    let repetition_penalty = c.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
        return Err(out_of_range(
            "repetition_penalty",
            "greater than 0",
            repetition_penalty,
        ));
    }
    let stop = match c.stop {
        None => Vec::new(),
        Some(StopSpec::One(s)) if s.is_empty() => {
            return Err(ValidationError::EmptyStop {
                field: "stop".into(),
            });
        }
        Some(StopSpec::One(s)) => vec![s.clone()],
        Some(StopSpec::Many(v)) => {
            if v.len() > MAX_STOP_STRINGS {
                return Err(ValidationError::TooManyStops(v.len()));
            }
            if let Some(i) = v.iter().position(String::is_empty) {
                return Err(ValidationError::EmptyStop {
                    field: format!("stop[{i}]"),
                });
            }
            v.clone()
        }
    };
    // A negative seed is taken as its two's-complement bits, so every i64 is a valid seed.
    let seed = c.seed.map_or_else(rand::random::<u64>, |s| s as u64);
    Ok(Checked {
        n,
        sampling: SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            seed,
        },
        presence_penalty,
        frequency_penalty,
        stop,
    })
}

/// Settles the token budget against the context length.
fn finish(
    c: Checked,
    prompt_ids: Vec<u32>,
    prompt_field: &'static str,
    common: &Common,
    limits: &Limits,
) -> Result<ValidRequest, ValidationError> {
    let prompt_tokens = prompt_ids.len();
    if prompt_tokens >= limits.max_model_len {
        return Err(ValidationError::PromptTooLong {
            field: prompt_field,
            prompt_tokens,
            max_model_len: limits.max_model_len,
        });
    }
    let room = limits.max_model_len - prompt_tokens;
    let max_tokens = match common.max_tokens {
        None => room,
        Some((field, v)) if v < 1 => return Err(out_of_range(field, "at least 1", v)),
        Some((field, v)) => match usize::try_from(v) {
            Ok(v) if v <= room => v,
            _ => {
                return Err(ValidationError::MaxTokensTooLarge {
                    field,
                    max_tokens: v,
                    prompt_tokens,
                    max_model_len: limits.max_model_len,
                });
            }
        },
    };
    Ok(ValidRequest {
        prompt_ids,
        n: c.n,
        max_tokens,
        sampling: c.sampling,
        presence_penalty: c.presence_penalty,
        frequency_penalty: c.frequency_penalty,
        stop: c.stop,
        ignore_eos: common.ignore_eos,
        logprobs: common.logprobs,
        stream: common.stream,
        include_usage: common.include_usage,
    })
}

/// Renders `messages` with the chat template and encodes the text; chat completions add no
/// special tokens (the template writes them), as transformers' `apply_chat_template(tokenize=True)`
/// does.
pub fn encode_messages(
    messages: &[ChatMessage],
    tokenizer: &Tokenizer,
    add_generation_prompt: bool,
    add_special_tokens: bool,
) -> Result<Vec<u32>, ValidationError> {
    let rendered = template_messages(messages)?;
    let text = tokenizer
        .apply_chat_template(&rendered, add_generation_prompt)
        .map_err(|e| ValidationError::ChatTemplate(e.to_string()))?;
    let ids =
        tokenizer
            .encode(&text, add_special_tokens)
            .map_err(|e| ValidationError::Tokenize {
                field: "messages",
                message: e.to_string(),
            })?;
    if ids.is_empty() {
        return Err(ValidationError::EmptyPrompt { field: "messages" });
    }
    Ok(ids)
}

/// The messages as the template sees them: roles checked, content flattened to one string
/// (text parts joined with newlines, as vLLM joins them).
fn template_messages(messages: &[ChatMessage]) -> Result<Vec<Value>, ValidationError> {
    if messages.is_empty() {
        return Err(ValidationError::EmptyMessages);
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ValidationError::UnknownRole {
                    field: format!("messages[{i}].role"),
                    role: m.role.clone(),
                });
            }
            let content = match &m.content {
                Some(MessageContent::Text(s)) => s.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut texts = Vec::with_capacity(parts.len());
                    for (j, part) in parts.iter().enumerate() {
                        if part.kind != "text" {
                            return Err(ValidationError::UnsupportedPart {
                                field: format!("messages[{i}].content[{j}].type"),
                                kind: part.kind.clone(),
                            });
                        }
                        let text = part.text.as_deref().ok_or_else(|| {
                            ValidationError::MissingPartText {
                                field: format!("messages[{i}].content[{j}].text"),
                            }
                        })?;
                        texts.push(text);
                    }
                    texts.join("\n")
                }
                None if m.role == "assistant" => String::new(),
                None => {
                    return Err(ValidationError::MissingContent {
                        field: format!("messages[{i}].content"),
                        role: m.role.clone(),
                    });
                }
            };
            let mut message = json!({"role": m.role, "content": content});
            if let Some(name) = &m.name {
                message["name"] = Value::String(name.clone());
            }
            Ok(message)
        })
        .collect()
}

/// A completions prompt as token ids: text is encoded as `tokenizer(prompt)` encodes it
/// (special tokens added); ids are checked against the vocabulary.
fn encode_prompt(prompt: &Prompt, limits: &Limits) -> Result<Vec<u32>, ValidationError> {
    let (ids, field) = match prompt {
        Prompt::Text(text) => (encode_text(text, limits.tokenizer)?, "prompt"),
        Prompt::Texts(texts) => match texts.as_slice() {
            [] => return Err(ValidationError::EmptyPrompt { field: "prompt" }),
            [text] => (encode_text(text, limits.tokenizer)?, "prompt[0]"),
            more => return Err(ValidationError::BatchedPrompt(more.len())),
        },
        Prompt::Tokens(ids) => (ids.clone(), "prompt"),
        Prompt::TokenBatches(batches) => match batches.as_slice() {
            [] => return Err(ValidationError::EmptyPrompt { field: "prompt" }),
            [ids] => (ids.clone(), "prompt[0]"),
            more => return Err(ValidationError::BatchedPrompt(more.len())),
        },
    };
    if ids.is_empty() {
        return Err(ValidationError::EmptyPrompt { field: "prompt" });
    }
    check_vocab(&ids, field, limits.vocab_size)?;
    Ok(ids)
}

fn encode_text(text: &str, tokenizer: &Tokenizer) -> Result<Vec<u32>, ValidationError> {
    tokenizer
        .encode(text, true)
        .map_err(|e| ValidationError::Tokenize {
            field: "prompt",
            message: e.to_string(),
        })
}

/// Every id below `vocab_size`; the error names the position (`prompt[3]`).
pub fn check_vocab(ids: &[u32], field: &str, vocab_size: usize) -> Result<(), ValidationError> {
    match ids.iter().position(|&id| id as usize >= vocab_size) {
        Some(i) => Err(ValidationError::TokenOutOfVocab {
            field: format!("{field}[{i}]"),
            id: ids[i],
            vocab_size,
        }),
        None => Ok(()),
    }
}

fn out_of_range(field: &str, rule: &str, value: impl std::fmt::Display) -> ValidationError {
    ValidationError::OutOfRange {
        field: field.into(),
        rule: rule.into(),
        value: value.to_string(),
    }
}

fn range_usize(field: &str, v: i64, lo: usize, hi: usize) -> Result<usize, ValidationError> {
    match usize::try_from(v) {
        Ok(u) if (lo..=hi).contains(&u) => Ok(u),
        _ => Err(out_of_range(field, &format!("between {lo} and {hi}"), v)),
    }
}

fn range_f32(
    field: &str,
    v: Option<f32>,
    default: f32,
    range: std::ops::RangeInclusive<f32>,
    rule: &str,
) -> Result<f32, ValidationError> {
    let v = v.unwrap_or(default);
    if range.contains(&v) {
        Ok(v)
    } else {
        Err(out_of_range(field, rule, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::error::parse_json;

    fn tokenizer() -> Tokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/hf/llama");
        Tokenizer::from_dir(&dir).expect("fixture tokenizer")
    }

    fn limits(tok: &Tokenizer) -> Limits<'_> {
        Limits {
            tokenizer: tok,
            max_model_len: 64,
            vocab_size: 445,
            max_choices: MAX_CHOICES,
        }
    }

    fn completion_err(body: &str) -> ValidationError {
        let tok = tokenizer();
        let req: CompletionRequest = parse_json(body.as_bytes()).expect("parses");
        completion(&req, &limits(&tok)).expect_err("invalid")
    }

    fn chat_err(body: &str) -> ValidationError {
        let tok = tokenizer();
        let req: ChatCompletionRequest = parse_json(body.as_bytes()).expect("parses");
        chat(&req, &limits(&tok)).expect_err("invalid")
    }

    /// Each rule names its field; table of (request, expected param).
    #[test]
    fn completion_rules_name_their_field() {
        let cases = [
            (r#"{"prompt": "a", "max_tokens": 0}"#, "max_tokens"),
            (r#"{"prompt": "a", "max_tokens": -5}"#, "max_tokens"),
            (r#"{"prompt": "a", "max_tokens": 100000}"#, "max_tokens"),
            (r#"{"prompt": "a", "temperature": -0.1}"#, "temperature"),
            (r#"{"prompt": "a", "temperature": 2.5}"#, "temperature"),
            (r#"{"prompt": "a", "top_p": 0}"#, "top_p"),
            (r#"{"prompt": "a", "top_p": 1.5}"#, "top_p"),
            (r#"{"prompt": "a", "top_k": -2}"#, "top_k"),
            (r#"{"prompt": "a", "min_p": 2}"#, "min_p"),
            (r#"{"prompt": "a", "n": 0}"#, "n"),
            (r#"{"prompt": "a", "n": 9}"#, "n"),
            (
                r#"{"prompt": "a", "presence_penalty": 2.1}"#,
                "presence_penalty",
            ),
            (
                r#"{"prompt": "a", "frequency_penalty": -3}"#,
                "frequency_penalty",
            ),
            (
                r#"{"prompt": "a", "repetition_penalty": 0}"#,
                "repetition_penalty",
            ),
            (r#"{"prompt": "a", "logprobs": 21}"#, "logprobs"),
            (r#"{"prompt": "a", "stop": ""}"#, "stop"),
            (r#"{"prompt": "a", "stop": ["x", ""]}"#, "stop[1]"),
            (
                r#"{"prompt": "a", "stop": ["1","2","3","4","5","6","7","8","9"]}"#,
                "stop",
            ),
            (r#"{"prompt": []}"#, "prompt"),
            (r#"{"prompt": ["a", "b"]}"#, "prompt"),
            (r#"{"prompt": [1, 2, 445]}"#, "prompt[2]"),
            (r#"{"prompt": "a", "echo": true}"#, "echo"),
        ];
        for (body, param) in cases {
            assert_eq!(
                completion_err(body).param().as_deref(),
                Some(param),
                "{body}"
            );
        }
    }

    #[test]
    fn chat_rules_name_their_field() {
        let cases = [
            (r#"{"messages": []}"#, "messages"),
            (
                r#"{"messages": [{"role": "wizard", "content": "x"}]}"#,
                "messages[0].role",
            ),
            (r#"{"messages": [{"role": "user"}]}"#, "messages[0].content"),
            (
                r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
                "messages[0].content[0].type",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21, "logprobs": true}"#,
                "top_logprobs",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}"#,
                "top_logprobs",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}"#,
                "max_completion_tokens",
            ),
        ];
        for (body, param) in cases {
            assert_eq!(chat_err(body).param().as_deref(), Some(param), "{body}");
        }
    }

    #[test]
    fn prompt_filling_the_context_is_refused_with_vllm_wording() {
        let long = "word ".repeat(100);
        let e = completion_err(&format!(r#"{{"prompt": "{long}"}}"#));
        assert!(matches!(e, ValidationError::PromptTooLong { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("This model's maximum context length is 64 tokens.")
        );
        assert_eq!(e.code(), Some("context_length_exceeded"));
    }

    #[test]
    fn defaults_fill_the_rest_of_the_context() {
        let tok = tokenizer();
        let req: CompletionRequest =
            parse_json(br#"{"prompt": [0, 5, 6], "seed": 7, "n": 2}"#).expect("parses");
        let v = completion(&req, &limits(&tok)).expect("valid");
        assert_eq!(v.max_tokens, 61);
        assert_eq!(v.sampling.temperature, 1.0);
        let seqs = v.seq_requests(None, &[3]);
        assert_eq!(
            seqs.iter().map(|s| s.sampling.seed).collect::<Vec<_>>(),
            [7, 8]
        );
        assert_eq!(seqs[0].stop_token_ids, [3]);
    }
}
