//! Running one accepted request: its `n` engine streams merged fairly, each event applied to its
//! [`Choice`], and the result written either as one JSON body or as server-sent events.
//!
//! A [`Generation`] owns the engine streams, so dropping it aborts every sequence still running:
//! a stream's body is dropped when the client disconnects, and a choice's stream is dropped as
//! soon as it hits a stop string.

use std::convert::Infallible;
use std::task::Poll;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::AppState;
use super::choice::{Choice, ChoiceRules};
use super::error::ApiError;
use super::token_text::TokenSpelling;
use super::types::{
    AssistantRole, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionChunkObject,
    ChatCompletionObject, ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatResponseMessage,
    ChatTokenLogprob, CompletionChoice, CompletionChunk, CompletionChunkChoice, CompletionLogprobs,
    CompletionResponse, KilnExtension, PromptTokensDetails, TextCompletionObject, TopLogprob,
    Usage,
};
use super::validate::ValidRequest;
use crate::engine::{SeqEvent, SeqStream, TokenOutput};

/// Which API the request came through; decides the response shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// What the choices share, apart from the choices themselves (so both can be borrowed at once).
struct Shared {
    state: AppState,
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
    stop: Vec<String>,
    /// Empty with `ignore_eos`.
    eos_token_ids: Vec<u32>,
    logprobs: bool,
    include_usage: bool,
}

impl Shared {
    fn rules(&self) -> ChoiceRules<'_> {
        ChoiceRules {
            tokenizer: self.state.tokenizer(),
            stop: &self.stop,
            eos_token_ids: &self.eos_token_ids,
            keep_logprobs: self.logprobs,
        }
    }

    fn spelling(&self) -> TokenSpelling {
        self.state.spelling()
    }
}

/// Where a stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Chat streams open each choice with a role chunk.
    Start,
    Running,
    Usage,
    Done,
    Closed,
}

pub struct Generation {
    shared: Shared,
    choices: Vec<Choice>,
    /// One per choice; `None` once the choice is done (dropping it aborts the sequence).
    streams: Vec<Option<SeqStream>>,
    /// Polling starts here, after the choice served last, so choices interleave fairly.
    next_start: usize,
    phase: Phase,
}

impl Generation {
    pub fn new(
        state: AppState,
        endpoint: Endpoint,
        model: String,
        request: &ValidRequest,
        streams: Vec<SeqStream>,
    ) -> Self {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        let eos_token_ids = if request.ignore_eos {
            Vec::new()
        } else {
            state.eos_token_ids().to_vec()
        };
        Self {
            shared: Shared {
                state,
                endpoint,
                id: format!("{prefix}-{:032x}", rand::random::<u128>()),
                created: unix_now(),
                model,
                prompt_tokens: request.prompt_ids.len(),
                stop: request.stop.clone(),
                eos_token_ids,
                logprobs: request.logprobs.is_some(),
                include_usage: request.include_usage,
            },
            choices: (0..streams.len()).map(Choice::new).collect(),
            streams: streams.into_iter().map(Some).collect(),
            next_start: 0,
            phase: Phase::Start,
        }
    }

    /// The next event of any running choice; `None` once every choice is done.
    async fn next_event(&mut self) -> Option<(usize, SeqEvent)> {
        let n = self.streams.len();
        let start = self.next_start;
        let streams = &mut self.streams;
        let next = std::future::poll_fn(|cx| {
            let mut running = false;
            for k in 0..n {
                let i = (start + k) % n;
                let Some(rx) = streams[i].as_mut() else {
                    continue;
                };
                running = true;
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(event)) => return Poll::Ready(Some((i, event))),
                    Poll::Ready(None) => {
                        let lost = "the engine dropped the sequence without finishing it";
                        return Poll::Ready(Some((i, SeqEvent::Failed(lost.into()))));
                    }
                    Poll::Pending => {}
                }
            }
            if running {
                Poll::Pending
            } else {
                Poll::Ready(None)
            }
        })
        .await;
        if let Some((i, _)) = &next {
            self.next_start = i + 1;
        }
        next
    }

    /// Applies one event to its choice; a finished choice's stream is dropped.
    fn apply(&mut self, i: usize, event: SeqEvent) -> Result<(), ApiError> {
        let rules = self.shared.rules();
        let choice = &mut self.choices[i];
        let decode_failed = |e: kiln_core::Error| ApiError::Engine(format!("decoding: {e}"));
        match event {
            SeqEvent::Token(token) => {
                if choice.push(&rules, token).map_err(decode_failed)? {
                    self.streams[i] = None;
                    choice.finalize(&rules).map_err(decode_failed)?;
                }
            }
            SeqEvent::Finished(finish) => {
                self.streams[i] = None;
                choice.finish(finish);
                choice.finalize(&rules).map_err(decode_failed)?;
            }
            SeqEvent::Failed(message) => return Err(ApiError::Engine(message)),
        }
        Ok(())
    }

    fn usage(&self) -> Usage {
        let completion_tokens = self.choices.iter().map(Choice::completion_tokens).sum();
        Usage {
            prompt_tokens: self.shared.prompt_tokens,
            completion_tokens,
            total_tokens: self.shared.prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: self
                    .choices
                    .iter()
                    .map(Choice::cached_prompt_tokens)
                    .max()
                    .unwrap_or(0),
            },
        }
    }

    /// Waits for every choice and writes the whole response.
    pub async fn collect(mut self) -> Result<Response, ApiError> {
        while let Some((i, event)) = self.next_event().await {
            self.apply(i, event)?;
        }
        let kiln = KilnExtension {
            choices: self.choices.iter().map(Choice::stats).collect(),
        };
        let usage = self.usage();
        let s = &self.shared;
        let rules = s.rules();
        let finish = |c: &Choice| {
            c.finish_reason()
                .unwrap_or(super::types::FinishReason::Stop)
        };
        let response = match s.endpoint {
            Endpoint::Chat => {
                let choices = self
                    .choices
                    .iter_mut()
                    .map(|c| {
                        let tokens = c.take_tokens().to_vec();
                        ChatChoice {
                            index: c.index,
                            message: ChatResponseMessage {
                                role: AssistantRole::Assistant,
                                content: c.take_delta(&rules),
                            },
                            logprobs: s
                                .logprobs
                                .then(|| chat_logprobs(s.spelling(), &s.state, &tokens)),
                            finish_reason: finish(c),
                        }
                    })
                    .collect();
                axum::Json(ChatCompletionResponse {
                    id: s.id.clone(),
                    object: ChatCompletionObject::ChatCompletion,
                    created: s.created,
                    model: s.model.clone(),
                    choices,
                    usage,
                    kiln,
                })
                .into_response()
            }
            Endpoint::Completion => {
                let choices = self
                    .choices
                    .iter_mut()
                    .map(|c| {
                        let tokens = c.take_tokens().to_vec();
                        let logprobs = s.logprobs.then(|| {
                            completion_logprobs(s.spelling(), &s.state, &tokens, &mut c.text_offset)
                        });
                        CompletionChoice {
                            index: c.index,
                            text: c.take_delta(&rules),
                            logprobs,
                            finish_reason: finish(c),
                        }
                    })
                    .collect();
                axum::Json(CompletionResponse {
                    id: s.id.clone(),
                    object: TextCompletionObject::TextCompletion,
                    created: s.created,
                    model: s.model.clone(),
                    choices,
                    usage,
                    kiln,
                })
                .into_response()
            }
        };
        Ok(response)
    }

    /// The response as server-sent events: `data: {chunk}` per event, then `data: [DONE]`.
    pub fn into_sse(self) -> Response {
        let events = futures_util::stream::unfold(self, |mut generation| async move {
            let frame = generation.next_frame().await?;
            Some((Ok::<_, Infallible>(Bytes::from(frame)), generation))
        });
        (
            [
                (header::CONTENT_TYPE, "text/event-stream"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            Body::from_stream(events),
        )
            .into_response()
    }

    /// The next piece of the event stream (one or more events), or `None` at its end.
    async fn next_frame(&mut self) -> Option<String> {
        loop {
            match self.phase {
                Phase::Start => {
                    self.phase = Phase::Running;
                    if self.shared.endpoint == Endpoint::Chat {
                        let opening: Vec<String> = (0..self.choices.len())
                            .map(|index| {
                                let delta = ChatDelta {
                                    role: Some(AssistantRole::Assistant),
                                    content: Some(String::new()),
                                };
                                self.chat_chunk(index, delta, None, None, false)
                            })
                            .collect();
                        return Some(opening.concat());
                    }
                }
                Phase::Running => match self.next_event().await {
                    Some((i, event)) => match self.apply(i, event) {
                        Ok(()) => {
                            let frame = self.frames_for(i);
                            if !frame.is_empty() {
                                return Some(frame);
                            }
                        }
                        Err(e) => {
                            // The status line is long gone: report the failure in-band.
                            e.log();
                            let body = e.body();
                            self.streams.iter_mut().for_each(|s| *s = None);
                            self.phase = Phase::Done;
                            return Some(sse(&body));
                        }
                    },
                    None => {
                        self.phase = if self.shared.include_usage {
                            Phase::Usage
                        } else {
                            Phase::Done
                        };
                    }
                },
                Phase::Usage => {
                    self.phase = Phase::Done;
                    return Some(self.usage_chunk());
                }
                Phase::Done => {
                    self.phase = Phase::Closed;
                    return Some("data: [DONE]\n\n".into());
                }
                Phase::Closed => return None,
            }
        }
    }

    /// The events choice `i` has ready: new text (with its tokens' log-probs), and once it is
    /// done, the closing chunk with its finish reason and confidence statistics.
    fn frames_for(&mut self, i: usize) -> String {
        let rules = self.shared.rules();
        let choice = &mut self.choices[i];
        let delta = choice.take_delta(&rules);
        let done = choice.is_done();
        let mut out = String::new();
        if !delta.is_empty() || (done && self.shared.logprobs) {
            let tokens = choice.take_tokens().to_vec();
            let has_tokens = !tokens.is_empty();
            if !delta.is_empty() || has_tokens {
                out += &self.text_chunk(i, delta, &tokens);
            }
        }
        if done {
            out += &self.closing_chunk(i);
        }
        out
    }

    fn text_chunk(&mut self, i: usize, text: String, tokens: &[TokenOutput]) -> String {
        let s = &self.shared;
        match s.endpoint {
            Endpoint::Chat => {
                let logprobs = s
                    .logprobs
                    .then(|| chat_logprobs(s.spelling(), &s.state, tokens));
                let delta = ChatDelta {
                    role: None,
                    content: Some(text),
                };
                self.chat_chunk(i, delta, logprobs, None, false)
            }
            Endpoint::Completion => {
                let offset = &mut self.choices[i].text_offset;
                let logprobs = s
                    .logprobs
                    .then(|| completion_logprobs(s.spelling(), &s.state, tokens, offset));
                self.completion_chunk(i, text, logprobs, false)
            }
        }
    }

    fn closing_chunk(&self, i: usize) -> String {
        match self.shared.endpoint {
            Endpoint::Chat => self.chat_chunk(i, ChatDelta::default(), None, None, true),
            Endpoint::Completion => self.completion_chunk(i, String::new(), None, true),
        }
    }

    fn chat_chunk(
        &self,
        i: usize,
        delta: ChatDelta,
        logprobs: Option<ChatLogprobs>,
        usage: Option<Usage>,
        closing: bool,
    ) -> String {
        let s = &self.shared;
        sse(&ChatCompletionChunk {
            id: s.id.clone(),
            object: ChatCompletionChunkObject::ChatCompletionChunk,
            created: s.created,
            model: s.model.clone(),
            choices: vec![ChatChunkChoice {
                index: i,
                delta,
                logprobs,
                finish_reason: if closing {
                    self.choices[i].finish_reason()
                } else {
                    None
                },
            }],
            usage: s.include_usage.then_some(usage),
            kiln: closing.then(|| self.kiln_for(i)),
        })
    }

    fn completion_chunk(
        &self,
        i: usize,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        closing: bool,
    ) -> String {
        let s = &self.shared;
        sse(&CompletionChunk {
            id: s.id.clone(),
            object: TextCompletionObject::TextCompletion,
            created: s.created,
            model: s.model.clone(),
            choices: vec![CompletionChunkChoice {
                index: i,
                text,
                logprobs,
                finish_reason: if closing {
                    self.choices[i].finish_reason()
                } else {
                    None
                },
            }],
            usage: s.include_usage.then_some(None),
            kiln: closing.then(|| self.kiln_for(i)),
        })
    }

    fn kiln_for(&self, i: usize) -> KilnExtension {
        KilnExtension {
            choices: vec![self.choices[i].stats()],
        }
    }

    fn usage_chunk(&self) -> String {
        let s = &self.shared;
        let usage = Some(Some(self.usage()));
        match s.endpoint {
            Endpoint::Chat => sse(&ChatCompletionChunk {
                id: s.id.clone(),
                object: ChatCompletionChunkObject::ChatCompletionChunk,
                created: s.created,
                model: s.model.clone(),
                choices: vec![],
                usage,
                kiln: None,
            }),
            Endpoint::Completion => sse(&CompletionChunk {
                id: s.id.clone(),
                object: TextCompletionObject::TextCompletion,
                created: s.created,
                model: s.model.clone(),
                choices: vec![],
                usage,
                kiln: None,
            }),
        }
    }
}

/// One server-sent event.
fn sse(value: &impl Serialize) -> String {
    // Serializing these plain structs cannot fail.
    format!(
        "data: {}\n\n",
        serde_json::to_string(value).unwrap_or_default()
    )
}

fn chat_logprobs(
    spelling: TokenSpelling,
    state: &AppState,
    tokens: &[TokenOutput],
) -> ChatLogprobs {
    let tok = state.tokenizer();
    ChatLogprobs {
        content: tokens
            .iter()
            .map(|t| {
                let (token, bytes) = spelling.text(tok, t.id);
                ChatTokenLogprob {
                    token,
                    logprob: t.logprob,
                    bytes,
                    top_logprobs: t
                        .top_logprobs
                        .iter()
                        .map(|&(id, logprob)| {
                            let (token, bytes) = spelling.text(tok, id);
                            TopLogprob {
                                token,
                                logprob,
                                bytes,
                            }
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}

/// The legacy layout; `offset` carries the running character offset across stream chunks.
fn completion_logprobs(
    spelling: TokenSpelling,
    state: &AppState,
    tokens: &[TokenOutput],
    offset: &mut usize,
) -> CompletionLogprobs {
    let tok = state.tokenizer();
    let mut out = CompletionLogprobs::default();
    for t in tokens {
        let (token, _) = spelling.text(tok, t.id);
        let mut top = serde_json::Map::new();
        for &(id, logprob) in &t.top_logprobs {
            top.insert(spelling.text(tok, id).0, logprob.into());
        }
        // OpenAI always lists the chosen token too.
        top.entry(token.clone()).or_insert(t.logprob.into());
        out.text_offset.push(*offset);
        *offset += token.chars().count();
        out.tokens.push(token);
        out.token_logprobs.push(t.logprob);
        out.top_logprobs.push(top);
    }
    out
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
