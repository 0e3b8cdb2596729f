//! What monitoring reads of a request and of its reply. On the way in, only the sampling
//! parameters and the trace context are read on the request path; the body is kept (a
//! reference-counted buffer, not a copy) and its texts — the prompt, any retrieved context — are
//! read at accounting. On the way out: the reply's text, confidence, finish reasons and timings
//! (from a whole reply, or event by event from a stream).

use std::time::Duration;

use axum::body::Bytes;

use kiln_monitor::confidence::{Confidence, StreamConfidence};
use serde_json::Value;

use crate::validate::Endpoint;

/// What a request brought that monitoring uses.
#[derive(Debug)]
pub struct RequestSignals {
    /// `chat` or `text_completion`.
    pub operation: &'static str,
    endpoint: Endpoint,
    /// The body as forwarded upstream (after the guardrails' rewrites).
    body: Bytes,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<i64>,
    pub n: Option<u64>,
    /// The caller's W3C trace context, so the span joins its trace.
    pub parent: Option<([u8; 16], [u8; 8])>,
}

/// What the reply brought: read from a whole reply, or gathered from a stream's events.
#[derive(Debug, Default)]
pub struct ReplySignals {
    /// The first choice's text.
    pub text: Option<String>,
    pub confidence: Option<Confidence>,
    pub finish_reasons: Vec<String>,
    pub response_id: Option<String>,
    pub response_model: Option<String>,
    /// Time to the first token: measured on streams, reported by kiln serve otherwise.
    pub ttft: Option<Duration>,
    /// The upstream's own queue time (kiln serve's `kiln.choices[].queue_ms`).
    pub queue_ms: Option<f64>,
}

impl RequestSignals {
    /// Reads the signals of a validated request: `body` is its parsed JSON, `bytes` the same
    /// body as forwarded, kept for [`RequestSignals::texts`].
    pub fn of(endpoint: Endpoint, body: &Value, bytes: Bytes, traceparent: Option<&str>) -> Self {
        let operation = match endpoint {
            Endpoint::Chat => "chat",
            Endpoint::Completion => "text_completion",
        };
        let number = |key: &str| body.get(key).and_then(Value::as_f64);
        let count = |key: &str| body.get(key).and_then(Value::as_u64);
        Self {
            operation,
            endpoint,
            body: bytes,
            max_tokens: count("max_completion_tokens").or_else(|| count("max_tokens")),
            temperature: number("temperature"),
            top_p: number("top_p"),
            seed: body.get("seed").and_then(Value::as_i64),
            n: count("n"),
            parent: traceparent
                .and_then(kiln_monitor::otlp::parse_traceparent)
                .map(|(trace, span, _)| (trace, span)),
        }
    }
}

/// The texts of a request, read at accounting.
#[derive(Debug, Default)]
pub struct RequestTexts {
    /// The user's text (chat: the user messages; completions: the prompt).
    pub prompt: String,
    /// Retrieved context found in the messages, for the grounding check.
    pub context: Option<String>,
}

impl RequestSignals {
    /// Parses the kept body again (off the request path) for the prompt and any context.
    pub fn texts(&self) -> RequestTexts {
        let Ok(body) = serde_json::from_slice::<Value>(&self.body) else {
            return RequestTexts::default();
        };
        let prompt = match self.endpoint {
            Endpoint::Chat => user_text(&body),
            Endpoint::Completion => match body.get("prompt") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(items)) => items
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("\n"),
                _ => String::new(),
            },
        };
        RequestTexts {
            prompt,
            context: kiln_monitor::grounding::context_of(&body),
        }
    }
}

/// The text of a chat request's user messages (string or text parts), one per line.
fn user_text(body: &Value) -> String {
    let mut out = String::new();
    for m in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if m.get("role").and_then(Value::as_str) != Some("user") {
            continue;
        }
        let mut push = |s: &str| {
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(s);
        };
        match m.get("content") {
            Some(Value::String(s)) => push(s),
            Some(Value::Array(parts)) => {
                for p in parts {
                    if let Some(s) = p.get("text").and_then(Value::as_str) {
                        push(s);
                    }
                }
            }
            _ => {}
        }
    }
    out
}

impl ReplySignals {
    /// Reads a whole (non-streamed) reply.
    pub fn of_reply(body: &Value) -> Self {
        let first = body.get("choices").and_then(|c| c.get(0));
        let text = first.and_then(|c| {
            c.get("message")
                .and_then(|m| m.get("content"))
                .or_else(|| c.get("text"))
                .and_then(Value::as_str)
                .map(str::to_string)
        });
        let finish_reasons = body
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("finish_reason").and_then(Value::as_str))
            .map(str::to_string)
            .collect();
        let kiln = kiln_stats(body);
        Self {
            text,
            confidence: kiln_monitor::confidence::from_reply(body, 0),
            finish_reasons,
            response_id: body.get("id").and_then(Value::as_str).map(str::to_string),
            response_model: body
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_string),
            ttft: kiln
                .and_then(|k| k.get("ttft_ms"))
                .and_then(Value::as_f64)
                .filter(|ms| ms.is_finite() && *ms >= 0.0)
                .map(|ms| Duration::from_secs_f64(ms / 1e3)),
            queue_ms: kiln.and_then(|k| k.get("queue_ms")).and_then(Value::as_f64),
        }
    }
}

/// kiln serve's per-choice statistics of the first choice, when the reply carries them.
fn kiln_stats(body: &Value) -> Option<&Value> {
    body.get("kiln")?.get("choices")?.get(0)
}

/// Gathers [`ReplySignals`] from a stream's events as they pass.
#[derive(Debug, Default)]
pub struct StreamSignals {
    text: String,
    confidence: StreamConfidence,
    finish_reasons: Vec<String>,
    response_id: Option<String>,
    response_model: Option<String>,
    queue_ms: Option<f64>,
    /// When the first content arrived, measured from the upstream request's start.
    pub first_token: Option<Duration>,
}

impl StreamSignals {
    /// One parsed `data:` event; `since_upstream` is the time since the upstream request began.
    pub fn push(&mut self, chunk: &Value, since_upstream: Duration) {
        self.confidence.push_chunk(chunk);
        if self.response_id.is_none() {
            self.response_id = chunk.get("id").and_then(Value::as_str).map(str::to_string);
            self.response_model = chunk
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_string);
        }
        if let Some(q) = kiln_stats(chunk)
            .and_then(|k| k.get("queue_ms"))
            .and_then(Value::as_f64)
        {
            self.queue_ms = Some(q);
        }
        for c in chunk
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(reason) = c.get("finish_reason").and_then(Value::as_str) {
                self.finish_reasons.push(reason.to_string());
            }
            let text = c
                .get("delta")
                .and_then(|d| d.get("content"))
                .or_else(|| c.get("text"))
                .and_then(Value::as_str);
            if let Some(t) = text.filter(|t| !t.is_empty()) {
                self.first_token.get_or_insert(since_upstream);
                if c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0 {
                    self.text.push_str(t);
                }
            }
        }
    }

    pub fn finish(self) -> ReplySignals {
        ReplySignals {
            text: Some(self.text),
            confidence: self.confidence.finish(),
            finish_reasons: self.finish_reasons,
            response_id: self.response_id,
            response_model: self.response_model,
            ttft: self.first_token,
            queue_ms: self.queue_ms,
        }
    }
}
