//! The gateway's side of the guardrails ([`kiln_guard::policy`]): the refusal envelope, the
//! input check run off the async workers when it calls the classifier, the rewriting of a
//! streamed reply through the output checks, and the scrubber content passes before it is kept.
//!
//! A streamed reply that the output checks watch is no longer passed through byte for byte:
//! [`SseRewriter`] reads each `data:` event, hands every choice's content delta to
//! [`RequestGuard::stream_push`] and re-emits the event with what may be released, so text is
//! held back (a few words at most) until the detectors have seen it whole. Events without
//! content (the role, the usage chunk) pass as they are. A violation ends the stream with an
//! error event in OpenAI's envelope and `[DONE]`.

use axum::http::StatusCode;
use kiln_guard::pii::{CustomPattern, PiiDetector, PiiOptions};
use kiln_guard::policy::{self, GuardrailsConfig, RequestGuard, Violation};
use kiln_guard::redact::{RedactMode, Vault};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::validate::Endpoint;

/// The 400 a guardrail refusal gets: `type: guardrail_violation`, `code` the category, and a
/// message that never quotes the offending text.
pub fn violation_error(v: &Violation) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "guardrail_violation",
        v.code.as_str(),
        v.message.clone(),
    )
}

/// The events that end a stream cut by a violation.
pub fn violation_events(v: &Violation) -> Vec<u8> {
    let body = violation_error(v).body();
    format!("data: {body}\n\ndata: [DONE]\n\n").into_bytes()
}

fn guard_endpoint(endpoint: Endpoint) -> policy::Endpoint {
    match endpoint {
        Endpoint::Chat => policy::Endpoint::Chat,
        Endpoint::Completion => policy::Endpoint::Completion,
    }
}

/// Runs the input checks on `body`; with a classifier in the policy (milliseconds of CPU) on
/// the blocking pool, so the async workers keep serving. The guard comes back for the output
/// checks (`None` only if the blocking task itself failed, which refuses the request).
pub async fn check_input(
    mut guard: RequestGuard,
    endpoint: Endpoint,
    mut body: Value,
) -> (Option<RequestGuard>, Value, Result<bool, Violation>) {
    let endpoint = guard_endpoint(endpoint);
    if !guard.policy().uses_classifier() {
        let result = guard.check_input(endpoint, &mut body);
        return (Some(guard), body, result);
    }
    match tokio::task::spawn_blocking(move || {
        let result = guard.check_input(endpoint, &mut body);
        (guard, body, result)
    })
    .await
    {
        Ok((guard, body, result)) => (Some(guard), body, result),
        // Nothing in the checks panics on input; a join error means the runtime is going
        // down. Refuse rather than forward unchecked.
        Err(e) => (
            None,
            Value::Null,
            Err(Violation {
                code: policy::ViolationCode::PromptInjection,
                detector: "input",
                message: format!("the input checks did not finish: {e}"),
            }),
        ),
    }
}

/// The scrubber captured content goes through: every built-in detector, plus the custom
/// patterns and allow-list of `guardrails.input.pii`, replacing values with placeholders.
#[derive(Debug)]
pub struct Scrubber {
    detector: PiiDetector,
}

impl Scrubber {
    pub fn new(config: &GuardrailsConfig) -> anyhow::Result<Self> {
        let mut options = PiiOptions::default();
        if let Some(pii) = &config.input.pii {
            options.custom = pii
                .custom
                .iter()
                .map(|p| CustomPattern {
                    name: p.name.clone(),
                    regex: p.regex.clone(),
                })
                .collect();
            options.allow = pii.allow.clone();
        }
        let detector = PiiDetector::new(&options)
            .map_err(|e| anyhow::anyhow!("`guardrails.input.pii`: {e}"))?;
        Ok(Self { detector })
    }

    /// `text` with every PII value replaced by a typed placeholder.
    pub fn scrub(&self, text: &str) -> String {
        self.detector
            .redact(text, RedactMode::Replace, &mut Vault::new())
            .0
    }
}

/// The client's part of a body as text for capture: `messages` (as JSON, without the
/// gateway's own system prompt) or `prompt`.
pub fn prompt_text(endpoint: Endpoint, body: &Value, skip_system: bool) -> String {
    match endpoint {
        Endpoint::Chat => {
            let messages: Vec<&Value> = body
                .get("messages")
                .and_then(Value::as_array)
                .map(|m| m.iter().skip(usize::from(skip_system)).collect())
                .unwrap_or_default();
            serde_json::to_string(&messages).unwrap_or_default()
        }
        Endpoint::Completion => match body.get("prompt") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        },
    }
}

/// The text of the first choice of a whole reply.
pub fn reply_text(body: &Value) -> Option<String> {
    choice_text(body.get("choices")?.get(0)?)
}

/// A whole reply's (or a stream chunk's) own `id`: `chatcmpl-…`, `cmpl-…`.
pub fn reply_id(body: &Value) -> Option<String> {
    body.get("id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
        .map(str::to_string)
}

/// The text of every choice of a whole reply, in order, when it has two or more (a choice
/// without text counts as empty); empty otherwise.
pub fn choice_texts(body: &Value) -> Vec<String> {
    match body.get("choices").and_then(Value::as_array) {
        Some(choices) if choices.len() >= 2 => choices
            .iter()
            .map(|c| choice_text(c).unwrap_or_default())
            .collect(),
        _ => Vec::new(),
    }
}

/// The text of one choice: a chat `message.content` or a completion's `text`.
fn choice_text(choice: &Value) -> Option<String> {
    choice
        .get("message")
        .and_then(|m| m.get("content"))
        .or_else(|| choice.get("text"))
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// Rewrites a streamed reply's events through the output checks (see the module docs).
#[derive(Debug, Default)]
pub struct SseRewriter {
    /// Bytes of an incomplete line.
    pending: Vec<u8>,
    /// The last content chunk, as a template for a chunk carrying held-back text at the end.
    template: Option<Value>,
    /// Choices seen, and whether each has finished.
    choices: Vec<bool>,
    /// The stream was cut or finished: nothing more goes out.
    closed: bool,
}

impl SseRewriter {
    /// Takes upstream bytes; returns the bytes to send on.
    pub fn feed(
        &mut self,
        bytes: &[u8],
        guard: &mut RequestGuard,
        capture: &mut Option<String>,
    ) -> Result<Vec<u8>, Violation> {
        if self.closed {
            return Ok(Vec::new());
        }
        self.pending.extend_from_slice(bytes);
        let Some(last_newline) = self.pending.iter().rposition(|&b| b == b'\n') else {
            return Ok(Vec::new());
        };
        let complete: Vec<u8> = self.pending.drain(..=last_newline).collect();
        let mut out = Vec::new();
        for line in complete.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            self.line(line, guard, capture, &mut out)?;
        }
        Ok(out)
    }

    /// At the end of the upstream's stream: whatever is still held back.
    pub fn finish(
        &mut self,
        guard: &mut RequestGuard,
        capture: &mut Option<String>,
    ) -> Result<Vec<u8>, Violation> {
        let mut out = Vec::new();
        if !self.closed {
            let rest = std::mem::take(&mut self.pending);
            if !rest.is_empty() {
                self.line(rest.trim_ascii_end(), guard, capture, &mut out)?;
            }
            self.flush(guard, capture, &mut out)?;
            self.closed = true;
        }
        Ok(out)
    }

    fn line(
        &mut self,
        line: &[u8],
        guard: &mut RequestGuard,
        capture: &mut Option<String>,
        out: &mut Vec<u8>,
    ) -> Result<(), Violation> {
        if line.is_empty() {
            return Ok(());
        }
        let Some(data) = line.strip_prefix(b"data:") else {
            // Comments and other fields pass as they are.
            out.extend_from_slice(line);
            out.extend_from_slice(b"\n\n");
            return Ok(());
        };
        let data = data.trim_ascii();
        if data == b"[DONE]" {
            self.flush(guard, capture, out)?;
            out.extend_from_slice(b"data: [DONE]\n\n");
            self.closed = true;
            return Ok(());
        }
        let Ok(mut chunk) = serde_json::from_slice::<Value>(data) else {
            // Data the checks cannot read does not go out unchecked.
            return Ok(());
        };
        if let Some(choices) = chunk.get_mut("choices").and_then(Value::as_array_mut) {
            for (position, choice) in choices.iter_mut().enumerate() {
                let index = choice
                    .get("index")
                    .and_then(Value::as_u64)
                    .and_then(|i| usize::try_from(i).ok())
                    .unwrap_or(position);
                if self.choices.len() <= index {
                    self.choices.resize(index + 1, false);
                }
                let delta = content_of(choice).unwrap_or_default();
                let mut released = guard.stream_push(index, &delta)?;
                let finished = choice.get("finish_reason").is_some_and(|f| !f.is_null());
                if finished && !self.choices[index] {
                    released.push_str(&guard.stream_finish(index)?);
                    self.choices[index] = true;
                }
                if index == 0
                    && let Some(c) = capture.as_mut()
                {
                    c.push_str(&released);
                }
                set_content(choice, released);
            }
            if !choices.is_empty() {
                self.template = Some(chunk.clone());
            }
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(chunk.to_string().as_bytes());
        out.extend_from_slice(b"\n\n");
        Ok(())
    }

    /// Releases what every unfinished choice still holds, as one extra chunk each.
    fn flush(
        &mut self,
        guard: &mut RequestGuard,
        capture: &mut Option<String>,
        out: &mut Vec<u8>,
    ) -> Result<(), Violation> {
        for index in 0..self.choices.len() {
            if self.choices[index] {
                continue;
            }
            self.choices[index] = true;
            let rest = guard.stream_finish(index)?;
            if rest.is_empty() {
                continue;
            }
            if index == 0
                && let Some(c) = capture.as_mut()
            {
                c.push_str(&rest);
            }
            let mut chunk = self.template.clone().unwrap_or_else(|| json!({}));
            let chat = chunk
                .get("choices")
                .and_then(|c| c.get(0))
                .is_some_and(|c| c.get("delta").is_some());
            let choice = if chat {
                json!({"index": index, "delta": {"content": rest}, "finish_reason": null})
            } else {
                json!({"index": index, "text": rest, "finish_reason": null})
            };
            chunk["choices"] = json!([choice]);
            if let Some(map) = chunk.as_object_mut() {
                map.remove("usage");
            }
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(chunk.to_string().as_bytes());
            out.extend_from_slice(b"\n\n");
        }
        Ok(())
    }
}

/// A streamed choice's content delta (`delta.content`, or a completion's `text`).
fn content_of(choice: &Value) -> Option<String> {
    choice
        .get("delta")
        .and_then(|d| d.get("content"))
        .or_else(|| choice.get("text"))
        .and_then(Value::as_str)
        .map(str::to_string)
}

fn set_content(choice: &mut Value, text: String) {
    if let Some(delta) = choice.get_mut("delta") {
        if delta.get("content").is_some_and(Value::is_string) || !text.is_empty() {
            delta["content"] = Value::from(text);
        }
    } else if choice.get("text").is_some() || !text.is_empty() {
        choice["text"] = Value::from(text);
    }
}

/// One captured request as `kiln gateway export` writes it: the seed of the next round's
/// training data.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ExportRow {
    pub request_id: String,
    /// Seconds since the Unix epoch.
    pub at: f64,
    pub tenant: String,
    pub model: String,
    /// Chat requests: the client's `messages`; completions: `null`.
    pub messages: Option<Value>,
    /// Completions: the prompt; chat requests: `null`.
    pub prompt: Option<String>,
    pub completion: Option<String>,
}

/// The captured content that may become training data, scrubbed once more: the rows of
/// `no_train` keys never leave the store ([`crate::store::Store::exportable_content`] leaves
/// them out), and every text passes the PII scrubber again, so a value captured before a
/// detector existed, or under a looser policy, is not exported.
pub async fn export_content(
    store: &crate::store::Store,
    since: std::time::SystemTime,
    scrubber: &Scrubber,
) -> anyhow::Result<Vec<ExportRow>> {
    let rows = store.exportable_content(since).await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let prompt = scrubber.scrub(&r.prompt);
            let messages = serde_json::from_str::<Value>(&prompt)
                .ok()
                .filter(Value::is_array);
            ExportRow {
                request_id: r.request_id,
                at: r
                    .at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64()),
                tenant: r.tenant,
                model: r.model,
                prompt: messages.is_none().then_some(prompt),
                messages,
                completion: r.completion.map(|c| scrubber.scrub(&c)),
            }
        })
        .collect())
}
