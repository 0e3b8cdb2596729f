//! One benchmark request: send it, read its server-sent events, time every content chunk.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::Endpoint;

/// What every request of a run shares.
pub(super) struct RequestSpec {
    pub client: reqwest::Client,
    /// The full route, `http://host:port/v1/completions`.
    pub url: String,
    pub model: String,
    pub endpoint: Endpoint,
    pub max_tokens: usize,
    pub api_key: Option<String>,
}

/// A request that streamed to `[DONE]`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RequestMetrics {
    /// Sending to the first chunk with generated text.
    pub ttft: Duration,
    /// Gaps between consecutive chunks with generated text.
    pub itls: Vec<Duration>,
    /// Sending to `data: [DONE]`.
    pub latency: Duration,
    /// `usage.completion_tokens`, else the number of chunks with generated text.
    pub output_tokens: usize,
    /// `usage.prompt_tokens`, when the server reported it.
    pub prompt_tokens: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum RequestOutcome {
    Done(RequestMetrics),
    /// `reason` groups failures in the report (`HTTP 429`, `transport`, `stream`); `message`
    /// says what happened to this one.
    Failed {
        reason: String,
        message: String,
    },
}

fn failed(reason: impl Into<String>, message: impl Into<String>) -> RequestOutcome {
    RequestOutcome::Failed {
        reason: reason.into(),
        message: message.into(),
    }
}

/// An error and its sources, `a: b: c` (reqwest's own message rarely says what went wrong).
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn with_auth(req: reqwest::RequestBuilder, api_key: Option<&str>) -> reqwest::RequestBuilder {
    match api_key {
        Some(key) => req.bearer_auth(key),
        None => req,
    }
}

/// The first model `GET /v1/models` lists.
pub(super) async fn first_model(
    client: &reqwest::Client,
    base: &str,
    api_key: Option<&str>,
) -> Result<String, String> {
    let resp = with_auth(client.get(format!("{base}/v1/models")), api_key)
        .send()
        .await
        .map_err(|e| error_chain(&e))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        return Err(format!("HTTP {}: {}", status.as_u16(), snippet(&body)));
    }
    let body: Value = resp.json().await.map_err(|e| error_chain(&e))?;
    body.pointer("/data/0/id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| format!("no model listed in {}", snippet(&body.to_string())))
}

/// The first 200 characters of a body, for an error message.
fn snippet(text: &str) -> String {
    const MAX: usize = 200;
    let text = text.trim();
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

fn body(spec: &RequestSpec, prompt: &str) -> Value {
    let mut body = json!({
        "model": spec.model,
        "max_tokens": spec.max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": true,
    });
    match spec.endpoint {
        Endpoint::Completions => body["prompt"] = json!(prompt),
        Endpoint::Chat => body["messages"] = json!([{"role": "user", "content": prompt}]),
    }
    body
}

/// Sends one request and reads its stream to the end. Never fails: what goes wrong is the
/// outcome.
pub(super) async fn send(spec: &RequestSpec, prompt: &str) -> RequestOutcome {
    let started = Instant::now();
    let req =
        with_auth(spec.client.post(&spec.url), spec.api_key.as_deref()).json(&body(spec, prompt));
    let mut resp = match req.send().await {
        Ok(resp) => resp,
        Err(e) => return failed("transport", error_chain(&e)),
    };
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        return failed(
            format!("HTTP {}", status.as_u16()),
            format!("HTTP {}: {}", status.as_u16(), snippet(&body)),
        );
    }
    let mut reader = StreamReader::new(spec.endpoint, started);
    loop {
        match resp.chunk().await {
            Ok(Some(bytes)) => {
                if let Some(outcome) = reader.push(&bytes, Instant::now()) {
                    return outcome;
                }
            }
            Ok(None) => return reader.finish(),
            Err(e) => return failed("transport", error_chain(&e)),
        }
    }
}

/// Splits a byte stream into server-sent events and keeps the timings.
pub(super) struct StreamReader {
    endpoint: Endpoint,
    started: Instant,
    /// Bytes of a line not yet ended.
    pending: Vec<u8>,
    first: Option<Instant>,
    last: Option<Instant>,
    itls: Vec<Duration>,
    content_chunks: usize,
    usage: Option<(Option<usize>, Option<usize>)>,
}

impl StreamReader {
    pub(super) fn new(endpoint: Endpoint, started: Instant) -> Self {
        Self {
            endpoint,
            started,
            pending: Vec::new(),
            first: None,
            last: None,
            itls: Vec::new(),
            content_chunks: 0,
            usage: None,
        }
    }

    /// Takes the bytes of one network read, arrived at `at`. `Some` once the request is over:
    /// `[DONE]` or a broken stream.
    pub(super) fn push(&mut self, bytes: &[u8], at: Instant) -> Option<RequestOutcome> {
        let mut buf = std::mem::take(&mut self.pending);
        buf.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(end) = buf[start..].iter().position(|&b| b == b'\n') {
            let line = &buf[start..start + end];
            start += end + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let outcome = match std::str::from_utf8(line) {
                Ok(line) => self.line(line, at),
                Err(_) => Some(failed("stream", "a stream line is not UTF-8")),
            };
            if outcome.is_some() {
                return outcome;
            }
        }
        buf.drain(..start);
        self.pending = buf;
        None
    }

    /// One line of the event stream. Comments (`: ping`), blank lines and fields other than
    /// `data` carry nothing to time.
    fn line(&mut self, line: &str, at: Instant) -> Option<RequestOutcome> {
        let data = line.strip_prefix("data:")?;
        let data = data.strip_prefix(' ').unwrap_or(data);
        if data.trim() == "[DONE]" {
            return Some(self.done(at));
        }
        let chunk: Value = match serde_json::from_str(data) {
            Ok(v) => v,
            Err(e) => {
                return Some(failed(
                    "stream",
                    format!("unparsable event ({e}): {}", snippet(data)),
                ));
            }
        };
        if let Some(err) = chunk.get("error") {
            let message = err
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| err.to_string(), str::to_string);
            return Some(failed(
                "stream",
                format!("error event: {}", snippet(&message)),
            ));
        }
        if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
            let count = |k| usage.get(k).and_then(Value::as_u64).map(|n| n as usize);
            self.usage = Some((count("completion_tokens"), count("prompt_tokens")));
        }
        if self.has_content(&chunk) {
            match self.last {
                None => self.first = Some(at),
                Some(prev) => self.itls.push(at.saturating_duration_since(prev)),
            }
            self.last = Some(at);
            self.content_chunks += 1;
        }
        None
    }

    /// Whether the chunk carries generated text: `choices[0].text` for completions,
    /// `choices[0].delta.content` (or `reasoning_content`) for chat. The chat stream's opening
    /// role-only chunk and the final chunk with only a `finish_reason` do not count.
    fn has_content(&self, chunk: &Value) -> bool {
        let Some(choice) = chunk.pointer("/choices/0") else {
            return false;
        };
        let non_empty =
            |v: Option<&Value>| v.and_then(Value::as_str).is_some_and(|s| !s.is_empty());
        match self.endpoint {
            Endpoint::Completions => non_empty(choice.get("text")),
            Endpoint::Chat => {
                let delta = choice.get("delta");
                non_empty(delta.and_then(|d| d.get("content")))
                    || non_empty(delta.and_then(|d| d.get("reasoning_content")))
            }
        }
    }

    fn done(&self, at: Instant) -> RequestOutcome {
        let Some(first) = self.first else {
            return failed("stream", "the stream ended without any generated text");
        };
        let (completion, prompt) = self.usage.unwrap_or((None, None));
        RequestOutcome::Done(RequestMetrics {
            ttft: first.saturating_duration_since(self.started),
            itls: self.itls.clone(),
            latency: at.saturating_duration_since(self.started),
            output_tokens: completion.unwrap_or(self.content_chunks),
            prompt_tokens: prompt,
        })
    }

    /// The body ended without `[DONE]`.
    pub(super) fn finish(&mut self) -> RequestOutcome {
        failed(
            "stream",
            format!(
                "the stream ended before `data: [DONE]` ({} chunks with text)",
                self.content_chunks
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn events_split_across_reads_are_timed_when_complete() {
        let t0 = Instant::now();
        let mut r = StreamReader::new(Endpoint::Completions, t0);
        assert_eq!(
            r.push(b": ping\n\ndata: {\"choices\":[{\"te", t0 + ms(5)),
            None
        );
        assert_eq!(r.push(b"xt\":\"a\"}]}\r\n\r\n", t0 + ms(20)), None);
        assert_eq!(
            r.push(b"data: {\"choices\":[{\"text\":\"\"}]}\n\n", t0 + ms(22)),
            None
        );
        let tail = b"data:{\"choices\":[{\"text\":\"b\"}]}\n\ndata: {\"choices\":[],\"usage\":\
            {\"prompt_tokens\":7,\"completion_tokens\":2}}\n\n";
        assert_eq!(r.push(tail, t0 + ms(27)), None);
        let out = r.push(b"data: [DONE]\n\n", t0 + ms(30));
        assert_eq!(
            out,
            Some(RequestOutcome::Done(RequestMetrics {
                ttft: ms(20),
                itls: vec![ms(7)],
                latency: ms(30),
                output_tokens: 2,
                prompt_tokens: Some(7),
            }))
        );
    }

    #[test]
    fn chat_role_chunk_does_not_count_as_the_first_token() {
        let t0 = Instant::now();
        let mut r = StreamReader::new(Endpoint::Chat, t0);
        let role =
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
        assert_eq!(r.push(role, t0 + ms(1)), None);
        let text = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
        assert_eq!(r.push(text, t0 + ms(15)), None);
        assert_eq!(r.push(text, t0 + ms(18)), None);
        // No usage chunk: the output count falls back to the chunks with text.
        match r.push(b"data: [DONE]\n\n", t0 + ms(19)) {
            Some(RequestOutcome::Done(m)) => {
                assert_eq!(m.ttft, ms(15));
                assert_eq!(m.itls, vec![ms(3)]);
                assert_eq!(m.output_tokens, 2);
                assert_eq!(m.prompt_tokens, None);
            }
            other => panic!("expected a finished request, got {other:?}"),
        }
    }

    #[test]
    fn broken_streams_are_failures() {
        let t0 = Instant::now();
        let mut r = StreamReader::new(Endpoint::Completions, t0);
        assert!(matches!(
            r.push(b"data: {not json}\n", t0),
            Some(RequestOutcome::Failed { reason, .. }) if reason == "stream"
        ));
        let mut r = StreamReader::new(Endpoint::Completions, t0);
        let err = b"data: {\"error\":{\"message\":\"engine died\"}}\n";
        assert!(matches!(
            r.push(err, t0),
            Some(RequestOutcome::Failed { message, .. }) if message.contains("engine died")
        ));
        let mut r = StreamReader::new(Endpoint::Completions, t0);
        assert!(matches!(
            r.push(b"data: [DONE]\n", t0),
            Some(RequestOutcome::Failed { message, .. }) if message.contains("without any generated text")
        ));
        let mut r = StreamReader::new(Endpoint::Completions, t0);
        assert_eq!(
            r.push(b"data: {\"choices\":[{\"text\":\"a\"}]}\n", t0),
            None
        );
        assert!(matches!(r.finish(), RequestOutcome::Failed { reason, .. } if reason == "stream"));
    }
}
