//! Between a full reply and its stream: replaying a cached reply as SSE, and assembling a
//! streamed reply into the full one so that it can be cached.
//!
//! The chunk shapes are OpenAI's: `chat.completion.chunk` with a `delta` per choice (the role
//! first, then content, then an empty delta carrying `finish_reason`), `text_completion` chunks
//! with `text`, and with `stream_options.include_usage` a last chunk with `choices: []` and the
//! `usage` (every other chunk then carries `usage: null`).

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// The SSE events (`data: …\n\n` each, the last `data: [DONE]\n\n`) a streaming client would
/// have received for the cached `chat.completion` or `text_completion` `body`.
pub fn as_sse_events(body: &Value, include_usage: bool) -> Vec<String> {
    let chat = is_chat(body);
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let choices = body
        .get("choices")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut chunks: Vec<Value> = Vec::new();
    for (position, choice) in choices.iter().enumerate() {
        let index = choice.get("index").cloned().unwrap_or(json!(position));
        let finish_reason = choice.get("finish_reason").cloned().unwrap_or(Value::Null);
        let logprobs = choice.get("logprobs").cloned().unwrap_or(Value::Null);
        if chat {
            chat_choice_chunks(&mut chunks, &index, choice, logprobs, finish_reason);
        } else {
            let text = choice.get("text").cloned().unwrap_or(json!(""));
            chunks.push(json!([{
                "index": index, "text": text, "logprobs": logprobs, "finish_reason": null
            }]));
            chunks.push(json!([{
                "index": index, "text": "", "logprobs": null, "finish_reason": finish_reason
            }]));
        }
    }
    let usage = body.get("usage").filter(|u| !u.is_null());
    let mut events: Vec<String> = chunks
        .into_iter()
        .map(|choices| {
            let mut chunk = chunk_header(body, object);
            chunk.insert("choices".into(), choices);
            if include_usage {
                chunk.insert("usage".into(), Value::Null);
            }
            event(&Value::Object(chunk))
        })
        .collect();
    if let (true, Some(usage)) = (include_usage, usage) {
        let mut chunk = chunk_header(body, object);
        chunk.insert("choices".into(), json!([]));
        chunk.insert("usage".into(), usage.clone());
        events.push(event(&Value::Object(chunk)));
    }
    events.push("data: [DONE]\n\n".to_string());
    events
}

/// The chunks of one chat choice: role, content (with the logprobs), tool calls, any other
/// message field (`refusal`, `reasoning_content`, …), then the finish.
fn chat_choice_chunks(
    chunks: &mut Vec<Value>,
    index: &Value,
    choice: &Value,
    logprobs: Value,
    finish_reason: Value,
) {
    let empty = Map::new();
    let message = choice
        .get("message")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let delta_chunk = |delta: Value, logprobs: Value, finish_reason: Value| json!([{ "index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason }]);
    let role = message.get("role").cloned().unwrap_or(json!("assistant"));
    let content = message.get("content").filter(|c| !c.is_null());
    let first_content = if content.is_some_and(Value::is_string) {
        json!("")
    } else {
        Value::Null
    };
    chunks.push(delta_chunk(
        json!({ "role": role, "content": first_content }),
        Value::Null,
        Value::Null,
    ));
    let mut logprobs = Some(logprobs).filter(|l| !l.is_null());
    if let Some(content) = content.filter(|c| c.as_str() != Some("")) {
        chunks.push(delta_chunk(
            json!({ "content": content }),
            logprobs.take().unwrap_or(Value::Null),
            Value::Null,
        ));
    }
    if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
        let calls: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(i, call)| {
                let mut call = call.as_object().cloned().unwrap_or_default();
                call.insert("index".into(), json!(i));
                Value::Object(call)
            })
            .collect();
        if !calls.is_empty() {
            chunks.push(delta_chunk(
                json!({ "tool_calls": calls }),
                Value::Null,
                Value::Null,
            ));
        }
    }
    for (field, value) in message {
        if matches!(field.as_str(), "role" | "content" | "tool_calls") || value.is_null() {
            continue;
        }
        chunks.push(delta_chunk(
            json!({ field.as_str(): value }),
            Value::Null,
            Value::Null,
        ));
    }
    chunks.push(delta_chunk(
        json!({}),
        logprobs.unwrap_or(Value::Null),
        finish_reason,
    ));
}

fn chunk_header(body: &Value, object: &str) -> Map<String, Value> {
    let mut chunk = Map::new();
    chunk.insert("id".into(), body.get("id").cloned().unwrap_or(json!("")));
    chunk.insert("object".into(), json!(object));
    chunk.insert(
        "created".into(),
        body.get("created").cloned().unwrap_or(json!(0)),
    );
    chunk.insert(
        "model".into(),
        body.get("model").cloned().unwrap_or(json!("")),
    );
    if let Some(fp) = body.get("system_fingerprint").filter(|v| !v.is_null()) {
        chunk.insert("system_fingerprint".into(), fp.clone());
    }
    chunk
}

fn event(chunk: &Value) -> String {
    format!("data: {chunk}\n\n")
}

fn is_chat(body: &Value) -> bool {
    match body.get("object").and_then(Value::as_str) {
        Some(o) => o.starts_with("chat.completion"),
        None => body
            .pointer("/choices/0")
            .is_some_and(|c| c.get("message").is_some() || c.get("delta").is_some()),
    }
}

/// The full reply assembled from the JSON payloads of a streamed one's `data:` events (without
/// the `[DONE]` marker), or `None` when the stream is not a complete reply: empty, carrying an
/// `error`, not a chunk stream, or with a choice that never received its `finish_reason`.
pub fn assemble_stream(chunks: &[Value]) -> Option<Value> {
    let first = chunks.first()?;
    let chat = is_chat(first)
        || chunks
            .iter()
            .any(|c| c.pointer("/choices/0/delta").is_some());
    let mut header = Map::new();
    let mut usage: Option<Value> = None;
    let mut choices: BTreeMap<u64, ChoiceParts> = BTreeMap::new();
    for chunk in chunks {
        let chunk = chunk.as_object()?;
        if chunk.get("error").is_some_and(|e| !e.is_null()) {
            return None;
        }
        for field in ["id", "created", "model", "system_fingerprint"] {
            if let Some(v) = chunk.get(field).filter(|v| !v.is_null()) {
                header.entry(field).or_insert_with(|| v.clone());
            }
        }
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
        }
        for (position, choice) in chunk.get("choices")?.as_array()?.iter().enumerate() {
            let index = choice
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(position as u64);
            choices.entry(index).or_default().absorb(choice, chat)?;
        }
    }
    if choices.is_empty() || choices.values().any(|c| c.finish_reason.is_null()) {
        return None;
    }
    let mut body = Map::new();
    body.insert("id".into(), header.remove("id").unwrap_or(json!("")));
    let object = if chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    body.insert("object".into(), json!(object));
    body.insert(
        "created".into(),
        header.remove("created").unwrap_or(json!(0)),
    );
    body.insert("model".into(), header.remove("model").unwrap_or(json!("")));
    if let Some(fp) = header.remove("system_fingerprint") {
        body.insert("system_fingerprint".into(), fp);
    }
    let choices: Vec<Value> = choices
        .into_iter()
        .map(|(index, parts)| parts.finish(index, chat))
        .collect();
    body.insert("choices".into(), Value::Array(choices));
    if let Some(usage) = usage {
        body.insert("usage".into(), usage);
    }
    Some(Value::Object(body))
}

/// What the chunks said about one choice so far.
#[derive(Default)]
struct ChoiceParts {
    role: Option<Value>,
    /// Message fields (`content`, `refusal`, …) or, for completions, `text`: strings
    /// concatenated, other values last-wins.
    fields: Map<String, Value>,
    tool_calls: BTreeMap<u64, Map<String, Value>>,
    logprobs: Option<Value>,
    finish_reason: Value,
}

impl ChoiceParts {
    fn absorb(&mut self, choice: &Value, chat: bool) -> Option<()> {
        let no_delta = Map::new();
        if chat {
            let delta = match choice.get("delta") {
                Some(Value::Object(d)) => d,
                Some(Value::Null) | None => &no_delta,
                Some(_) => return None,
            };
            for (field, value) in delta {
                match field.as_str() {
                    "role" if !value.is_null() => self.role = Some(value.clone()),
                    "tool_calls" => {
                        for (position, call) in value.as_array()?.iter().enumerate() {
                            self.absorb_tool_call(call, position)?;
                        }
                    }
                    _ => append(&mut self.fields, field, value),
                }
            }
        } else if let Some(text) = choice.get("text") {
            append(&mut self.fields, "text", text);
        }
        if let Some(lp) = choice.get("logprobs").filter(|l| !l.is_null()) {
            merge_logprobs(&mut self.logprobs, lp);
        }
        if let Some(reason) = choice.get("finish_reason").filter(|r| !r.is_null()) {
            self.finish_reason = reason.clone();
        }
        Some(())
    }

    /// A tool call arrives as its `id`, `type` and `function.name` first, then pieces of
    /// `function.arguments`, all under the same `index`.
    fn absorb_tool_call(&mut self, call: &Value, position: usize) -> Option<()> {
        let call = call.as_object()?;
        let index = call
            .get("index")
            .and_then(Value::as_u64)
            .unwrap_or(position as u64);
        let acc = self.tool_calls.entry(index).or_default();
        for (field, value) in call {
            match field.as_str() {
                "index" => {}
                "function" => {
                    let function = acc
                        .entry("function")
                        .or_insert_with(|| json!({}))
                        .as_object_mut()?;
                    for (k, v) in value.as_object()? {
                        append(function, k, v);
                    }
                }
                _ => append(acc, field, value),
            }
        }
        Some(())
    }

    fn finish(self, index: u64, chat: bool) -> Value {
        let mut choice = Map::new();
        choice.insert("index".into(), json!(index));
        if chat {
            let mut message = Map::new();
            message.insert("role".into(), self.role.unwrap_or(json!("assistant")));
            message.insert("content".into(), Value::Null);
            message.extend(self.fields);
            if !self.tool_calls.is_empty() {
                let calls: Vec<Value> = self.tool_calls.into_values().map(Value::Object).collect();
                message.insert("tool_calls".into(), Value::Array(calls));
            }
            choice.insert("message".into(), Value::Object(message));
        } else {
            let text = self.fields.get("text").cloned().unwrap_or(json!(""));
            choice.insert("text".into(), text);
        }
        choice.insert("logprobs".into(), self.logprobs.unwrap_or(Value::Null));
        choice.insert("finish_reason".into(), self.finish_reason);
        Value::Object(choice)
    }
}

/// Strings are concatenated onto what came before; a null adds nothing; anything else replaces.
fn append(into: &mut Map<String, Value>, field: &str, value: &Value) {
    match (into.get_mut(field), value) {
        (_, Value::Null) => {}
        (Some(Value::String(have)), Value::String(more)) => have.push_str(more),
        _ => {
            into.insert(field.to_string(), value.clone());
        }
    }
}

/// Logprobs arrive per chunk (`{"content": [...]}` for chat, `{"tokens": [...], …}` for
/// completions): arrays are concatenated field by field.
fn merge_logprobs(acc: &mut Option<Value>, more: &Value) {
    let (Some(Value::Object(have)), Value::Object(more)) = (acc.as_mut(), more) else {
        *acc = Some(more.clone());
        return;
    };
    for (field, value) in more {
        match (have.get_mut(field), value) {
            (Some(Value::Array(items)), Value::Array(new)) => items.extend(new.iter().cloned()),
            (Some(_), Value::Null) => {}
            _ => {
                have.insert(field.clone(), value.clone());
            }
        }
    }
}
