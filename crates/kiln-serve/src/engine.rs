//! The engine: one thread owns the model, the paged KV cache and the scheduler, and runs one
//! batched forward pass per step over every running sequence. Requests join and leave the batch
//! between steps (continuous batching).
//!
//! The HTTP side talks to it through an [`EngineHandle`]: [`EngineHandle::submit`] queues
//! sequences and hands back one event stream per sequence. Dropping a stream aborts its sequence:
//! the engine frees its slot and KV blocks at the next step.
//!
//! Adapters live in numbered slots. [`EngineHandle::add_adapter`] loads one into a new slot and
//! [`EngineHandle::retire_adapter`] marks an old slot as replaced: sequences already on it finish
//! there, a sequence that arrives for it afterwards runs on its replacement, and its weights are
//! dropped once its last sequence is done. Slot numbers are never reused, so the prefix cache
//! (salted by slot) never hands one adapter's keys and values to another.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_model::{FinishReason, SamplingParams};
use tokio::sync::mpsc;

use crate::metrics::ServeMetrics;

/// How much the engine may take on.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded together at most (`--max-num-seqs`).
    pub max_num_seqs: usize,
    /// Tokens in one forward pass at most, decodes and prefill chunks together
    /// (`--max-batch-tokens`); a longer prompt is prefilled in chunks.
    pub max_batch_tokens: usize,
    /// Sequences waiting for a slot at most (`--max-queue`); past it, submissions are refused.
    pub max_queue: usize,
    /// Positions per KV-cache block.
    pub block_size: usize,
    /// KV-cache blocks (the memory budget: `2 · layers · kv_heads · head_dim · 4 bytes` per
    /// position).
    pub num_blocks: usize,
    /// The longest sequence (prompt and completion) a request may ask for.
    pub max_model_len: usize,
    /// Reuse the KV blocks of prompt prefixes already computed (the system prompt every request
    /// repeats).
    pub prefix_caching: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 64,
            max_batch_tokens: 2048,
            max_queue: 256,
            block_size: 16,
            num_blocks: 4096,
            max_model_len: 2048,
            prefix_caching: true,
        }
    }
}

/// One sequence to generate.
#[derive(Debug, Clone)]
pub struct SeqRequest {
    pub prompt_ids: Vec<u32>,
    /// The adapter slot: an index into the adapters the engine was started with, or a slot
    /// [`EngineHandle::add_adapter`] returned; `None` is the base model. A retired slot is
    /// followed to its replacement.
    pub adapter: Option<usize>,
    /// New tokens at most (at least 1).
    pub max_tokens: usize,
    /// Temperature, top-k, top-p, min-p, repetition penalty and seed.
    pub sampling: SamplingParams,
    /// OpenAI's penalties on tokens already generated, in [-2, 2]: `presence` once per token
    /// present, `frequency` per occurrence.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Generation ends after any of these (the EOS ids; empty with `ignore_eos`). The stop token
    /// is reported like any other token.
    pub stop_token_ids: Vec<u32>,
    /// How many alternatives to report with each token's log-prob; `None` computes no top list
    /// (the chosen token's log-prob and the entropy are always reported).
    pub top_logprobs: Option<usize>,
}

/// A generated token and how confident the model was in it (log-probs of the model's own
/// distribution, before penalties, temperature and filtering).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenOutput {
    pub id: u32,
    pub logprob: f32,
    /// Entropy of the distribution the token was drawn from, in nats.
    pub entropy: f32,
    /// The most likely tokens and their log-probs, best first (`top_logprobs` of them).
    pub top_logprobs: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SeqFinish {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_prompt_tokens: usize,
    /// From submission to admission into the running batch.
    pub queue_time: Duration,
    /// From submission to the first generated token.
    pub time_to_first_token: Option<Duration>,
}

/// What a sequence's stream carries: tokens as they are chosen, then exactly one `Finished` or
/// `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    Token(TokenOutput),
    Finished(SeqFinish),
    Failed(String),
}

pub type SeqStream = mpsc::UnboundedReceiver<SeqEvent>;

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum SubmitError {
    /// The waiting queue is full: try again later.
    #[error("the server is at capacity ({waiting} requests waiting); retry later")]
    QueueFull { waiting: usize },
    /// A request the engine can never serve (the API layer checks these first, with field names).
    #[error("{0}")]
    Invalid(String),
    #[error("the engine has stopped")]
    Stopped,
}

/// A snapshot of the engine's load.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    /// Adapters whose weights the engine holds, retired ones still finishing included.
    pub adapters_loaded: usize,
}

/// A submitted sequence on its way to the engine thread.
pub(crate) struct Submitted {
    pub request: SeqRequest,
    pub events: mpsc::UnboundedSender<SeqEvent>,
    pub arrived: Instant,
}

pub(crate) enum Command {
    Submit(Vec<Submitted>),
    /// Loads an adapter model into a new slot and answers with the slot.
    AddAdapter {
        model: Box<kiln_model::CausalLm>,
        reply: tokio::sync::oneshot::Sender<usize>,
    },
    /// `slot` serves no new sequences (they go to `replaced_by`); its weights go once its last
    /// sequence is done.
    RetireAdapter {
        slot: usize,
        replaced_by: usize,
    },
    Shutdown,
}

/// The cheap, cloneable door to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    pub(crate) commands: std::sync::mpsc::Sender<Command>,
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// State the engine thread and the handles share.
pub(crate) struct Shared {
    pub config: EngineConfig,
    pub metrics: Arc<ServeMetrics>,
    pub stats: std::sync::Mutex<EngineStats>,
    /// Sequences submitted and not yet admitted to the running batch (queue bound).
    pub waiting: std::sync::atomic::AtomicUsize,
    pub vocab_size: usize,
}

impl EngineHandle {
    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    pub fn metrics(&self) -> &Arc<ServeMetrics> {
        &self.shared.metrics
    }

    pub fn stats(&self) -> EngineStats {
        self.shared.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// Queues `requests` together (the `n` choices of one API request are admitted or refused as
    /// one) and returns one event stream per sequence, in order.
    pub fn submit(&self, requests: Vec<SeqRequest>) -> Result<Vec<SeqStream>, SubmitError> {
        use std::sync::atomic::Ordering;
        let cfg = &self.shared.config;
        for r in &requests {
            self.check(r)?;
        }
        let n = requests.len();
        let waiting = self.shared.waiting.fetch_add(n, Ordering::SeqCst);
        if waiting + n > cfg.max_queue {
            self.shared.waiting.fetch_sub(n, Ordering::SeqCst);
            return Err(SubmitError::QueueFull { waiting });
        }
        let arrived = Instant::now();
        let mut streams = Vec::with_capacity(n);
        let mut submitted = Vec::with_capacity(n);
        for request in requests {
            let (tx, rx) = mpsc::unbounded_channel();
            streams.push(rx);
            submitted.push(Submitted {
                request,
                events: tx,
                arrived,
            });
        }
        if self.commands.send(Command::Submit(submitted)).is_err() {
            self.shared.waiting.fetch_sub(n, Ordering::SeqCst);
            return Err(SubmitError::Stopped);
        }
        Ok(streams)
    }

    fn check(&self, r: &SeqRequest) -> Result<(), SubmitError> {
        let cfg = &self.shared.config;
        let invalid = |m: String| Err(SubmitError::Invalid(m));
        if r.prompt_ids.is_empty() {
            return invalid("the prompt encodes to no tokens".into());
        }
        if r.max_tokens == 0 {
            return invalid("max_tokens must be at least 1".into());
        }
        let total = r.prompt_ids.len() + r.max_tokens;
        if total > cfg.max_model_len {
            return invalid(format!(
                "This model's maximum context length is {} tokens. However, you requested {} output tokens and your prompt contains {} input tokens, for a total of {total} tokens.",
                cfg.max_model_len,
                r.max_tokens,
                r.prompt_ids.len()
            ));
        }
        if let Some(&bad) = r
            .prompt_ids
            .iter()
            .find(|&&t| t as usize >= self.shared.vocab_size)
        {
            return invalid(format!(
                "prompt token id {bad} is outside the vocabulary ({} entries)",
                self.shared.vocab_size
            ));
        }
        Ok(())
    }

    /// Hands `model` (the base model with an adapter attached, sharing the base weights) to the
    /// engine and returns its new slot, for [`SeqRequest::adapter`]. Slots are never reused.
    pub async fn add_adapter(&self, model: kiln_model::CausalLm) -> Result<usize, SubmitError> {
        let (reply, slot) = tokio::sync::oneshot::channel();
        self.commands
            .send(Command::AddAdapter {
                model: Box::new(model),
                reply,
            })
            .map_err(|_| SubmitError::Stopped)?;
        slot.await.map_err(|_| SubmitError::Stopped)
    }

    /// Retires adapter `slot` in favour of `replaced_by` (a slot added after it): sequences
    /// already submitted for `slot` finish on it, sequences that reach the engine afterwards run
    /// on `replaced_by`, and `slot`'s weights are dropped once its last sequence is done.
    pub fn retire_adapter(&self, slot: usize, replaced_by: usize) -> Result<(), SubmitError> {
        if replaced_by <= slot {
            return Err(SubmitError::Invalid(format!(
                "adapter slot {slot} can only be replaced by a slot added after it, not {replaced_by}"
            )));
        }
        self.commands
            .send(Command::RetireAdapter { slot, replaced_by })
            .map_err(|_| SubmitError::Stopped)
    }

    /// Stops the engine thread once the requests it holds are done: call after the HTTP server
    /// has drained.
    pub fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
    }
}
