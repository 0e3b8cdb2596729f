//! The engine thread: continuous batching over the paged KV cache.
//!
//! Each step the scheduler spends a token budget (`max_batch_tokens`): first one token for every
//! running sequence that is decoding, then prompt tokens for sequences still prefilling — a long
//! prompt is prefilled in chunks across steps, so it never stalls the decodes around it — and
//! finally admits waiting sequences while slots (`max_num_seqs`), budget and KV blocks last. All of
//! it runs as one forward pass ([`CausalLm::forward_paged`]). When blocks run out mid-decode, the
//! most recently admitted sequence is preempted: its blocks are freed and it returns to the
//! front of the queue to be recomputed later (vLLM's recompute preemption). A sequence whose
//! event stream has been dropped (the client went away, or found its stop string) is removed at
//! the start of the next step.
//!
//! Adapters sit in slots that are never reused. Retiring a slot (a hot swap) lets its sequences
//! finish on it, sends later arrivals to its replacement, and drops its weights when its last
//! sequence leaves.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kiln_model::{CausalLm, FinishReason, PagedKvCache, PagedSeq, Sampler};
use tokio::sync::mpsc::UnboundedSender;

use crate::blocks::BlockManager;
use crate::engine::{
    Command, EngineConfig, EngineHandle, EngineStats, SeqEvent, SeqFinish, SeqRequest, Shared,
    Submitted, TokenOutput,
};
use crate::metrics::ServeMetrics;

/// Starts the engine thread over `model` (the base, with no adapter attached) and `adapters`
/// (the base with each LoRA adapter attached, sharing the base weights); `SeqRequest::adapter`
/// indexes `adapters`, which take slots `0..adapters.len()` (more are added with
/// [`EngineHandle::add_adapter`]).
pub fn start_engine(
    model: CausalLm,
    adapters: Vec<CausalLm>,
    config: EngineConfig,
    metrics: Arc<ServeMetrics>,
) -> anyhow::Result<EngineHandle> {
    let blocks_needed = config.max_model_len.div_ceil(config.block_size.max(1));
    anyhow::ensure!(
        config.block_size > 0,
        "the KV block size must be at least 1"
    );
    anyhow::ensure!(
        config.num_blocks >= blocks_needed,
        "a KV cache of {} blocks of {} positions cannot hold one sequence of the model's {} positions: give at least {blocks_needed} blocks",
        config.num_blocks,
        config.block_size,
        config.max_model_len
    );
    anyhow::ensure!(
        config.max_num_seqs > 0 && config.max_batch_tokens >= config.max_num_seqs,
        "max_batch_tokens ({}) must be at least max_num_seqs ({}, at least 1): every running sequence needs a token of each step's budget",
        config.max_batch_tokens,
        config.max_num_seqs
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let shared = Arc::new(Shared {
        config: config.clone(),
        metrics,
        stats: std::sync::Mutex::new(EngineStats {
            kv_blocks_total: config.num_blocks,
            adapters_loaded: adapters.len(),
            ..EngineStats::default()
        }),
        waiting: Default::default(),
        vocab_size: model.config().vocab_size,
    });
    let cache = PagedKvCache::new(&model, config.num_blocks, config.block_size);
    let mut engine = Engine {
        blocks: BlockManager::new(config.num_blocks, config.block_size),
        cache,
        model,
        adapters: adapters.into_iter().map(Some).collect(),
        replaced_by: HashMap::new(),
        retiring: Vec::new(),
        shared: shared.clone(),
        waiting: VecDeque::new(),
        running: Vec::new(),
    };
    std::thread::Builder::new()
        .name("kiln-engine".into())
        .spawn(move || engine.run(rx))?;
    Ok(EngineHandle {
        commands: tx,
        shared,
    })
}

/// A sequence inside the engine.
struct Seq {
    request: SeqRequest,
    events: UnboundedSender<SeqEvent>,
    sampler: Sampler,
    /// Prompt, then every generated token.
    tokens: Vec<u32>,
    /// Positions whose keys and values are in the cache.
    computed: usize,
    blocks: Vec<u32>,
    /// Blocks registered in the prefix cache so far (a prefix of `blocks`).
    registered: usize,
    /// Occurrences of each generated token, for the presence and frequency penalties.
    counts: HashMap<u32, u32>,
    cached_prompt_tokens: usize,
    arrived: Instant,
    /// Whether it has been counted out of the submission queue.
    admitted: bool,
    /// When it was first admitted to the running batch (its queue time ends there).
    admitted_at: Option<Instant>,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.request.prompt_ids.len()
    }

    fn salt(&self) -> u64 {
        self.request.adapter.map_or(0, |a| a as u64 + 1)
    }
}

struct Engine {
    model: CausalLm,
    /// Adapter slots; `None` once a retired adapter's last sequence is done.
    adapters: Vec<Option<CausalLm>>,
    /// Retired slot → the slot that replaced it.
    replaced_by: HashMap<usize, usize>,
    /// Retired slots whose weights are still held for the sequences on them.
    retiring: Vec<usize>,
    cache: PagedKvCache,
    blocks: BlockManager,
    shared: Arc<Shared>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
}

impl Engine {
    fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    fn metrics(&self) -> &ServeMetrics {
        &self.shared.metrics
    }

    fn run(&mut self, rx: std::sync::mpsc::Receiver<Command>) {
        let mut stopping = false;
        loop {
            // Block for work when idle; otherwise take whatever arrived since the last step.
            if self.running.is_empty() && self.waiting.is_empty() {
                if stopping {
                    return;
                }
                match rx.recv() {
                    Ok(cmd) => stopping |= self.handle(cmd),
                    Err(_) => return,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                stopping |= self.handle(cmd);
            }
            self.drop_abandoned();
            self.step();
            self.free_retired();
            self.publish_stats();
        }
    }

    /// Takes a command; true when it asks the engine to stop.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(seqs) => {
                for s in seqs {
                    self.enqueue(s);
                }
                false
            }
            Command::AddAdapter { model, reply } => {
                self.adapters.push(Some(*model));
                // The caller may have gone away; the slot stays valid either way.
                let _ = reply.send(self.adapters.len() - 1);
                false
            }
            Command::RetireAdapter { slot, replaced_by } => {
                self.retire(slot, replaced_by);
                false
            }
            Command::Shutdown => true,
        }
    }

    fn retire(&mut self, slot: usize, replaced_by: usize) {
        let known = |s: usize| s < self.adapters.len();
        if !known(slot) || !known(replaced_by) || replaced_by <= slot {
            eprintln!(
                "kiln serve: ignoring the retirement of adapter slot {slot} for {replaced_by}: not a later slot"
            );
            return;
        }
        self.replaced_by.insert(slot, replaced_by);
        if self.adapters[slot].is_some() && !self.retiring.contains(&slot) {
            self.retiring.push(slot);
        }
        self.free_retired();
    }

    /// The slot a sequence asking for `slot` runs on: `slot`, or the last of its replacements.
    /// Replacements are always later slots, so the walk ends.
    fn current_slot(&self, mut slot: usize) -> usize {
        while let Some(&next) = self.replaced_by.get(&slot) {
            slot = next;
        }
        slot
    }

    /// Drops the weights of retired adapters no sequence uses any more.
    fn free_retired(&mut self) {
        if self.retiring.is_empty() {
            return;
        }
        let (running, waiting) = (&self.running, &self.waiting);
        let in_use = |slot: usize| {
            running
                .iter()
                .chain(waiting)
                .any(|s| s.request.adapter == Some(slot))
        };
        let (kept, freed): (Vec<usize>, Vec<usize>) =
            self.retiring.iter().partition(|&&slot| in_use(slot));
        self.retiring = kept;
        for slot in freed {
            if let Some(adapter) = self.adapters.get_mut(slot) {
                *adapter = None;
            }
        }
    }

    fn enqueue(&mut self, s: Submitted) {
        let Submitted {
            mut request,
            events,
            arrived,
        } = s;
        if let Some(slot) = request.adapter {
            let slot = self.current_slot(slot);
            if !matches!(self.adapters.get(slot), Some(Some(_))) {
                self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                let _ = events.send(SeqEvent::Failed(format!(
                    "no adapter is loaded in slot {slot}"
                )));
                return;
            }
            request.adapter = Some(slot);
        }
        self.waiting.push_back(Seq {
            sampler: Sampler::new(request.sampling.clone()),
            tokens: request.prompt_ids.clone(),
            request,
            events,
            computed: 0,
            blocks: Vec::new(),
            registered: 0,
            counts: HashMap::new(),
            cached_prompt_tokens: 0,
            arrived,
            admitted: false,
            admitted_at: None,
            first_token_at: None,
            last_token_at: None,
        });
    }

    /// Removes sequences nobody listens to any more.
    fn drop_abandoned(&mut self) {
        let mut abandoned = Vec::new();
        self.running.retain_mut(|s| {
            let gone = s.events.is_closed();
            if gone {
                abandoned.push(std::mem::take(&mut s.blocks));
            }
            !gone
        });
        let before = self.waiting.len();
        let mut unqueued = 0;
        self.waiting.retain(|s| {
            let gone = s.events.is_closed();
            if gone && !s.admitted {
                unqueued += 1;
            }
            !gone
        });
        self.shared.waiting.fetch_sub(unqueued, Ordering::SeqCst);
        let aborted = abandoned.len() + before - self.waiting.len();
        for blocks in abandoned {
            self.blocks.release(&blocks);
        }
        if aborted > 0 {
            self.metrics()
                .request_success
                .with_label_values(&["abort"])
                .inc_by(aborted as u64);
        }
    }

    /// Blocks so that `s` holds positions `0..len`; false when the pool is exhausted.
    fn grow(blocks: &mut BlockManager, s: &mut Seq, len: usize) -> bool {
        while s.blocks.len() * blocks.block_size() < len {
            match blocks.allocate() {
                Some(b) => s.blocks.push(b),
                None => return false,
            }
        }
        true
    }

    /// Frees a running sequence's blocks and puts it back at the front of the queue.
    fn preempt(&mut self, index: usize) {
        self.metrics().num_preemptions.inc();
        let mut s = self.running.remove(index);
        self.blocks.release(&s.blocks);
        s.blocks.clear();
        s.registered = 0;
        s.computed = 0;
        self.waiting.push_front(s);
    }

    /// Chooses this step's work: `(index into running, tokens to compute)`.
    fn schedule(&mut self) -> Vec<(usize, usize)> {
        let mut budget = self.config().max_batch_tokens;
        let mut work: Vec<(usize, usize)> = Vec::new();
        // Running sequences, oldest first: decodes take one token, prefills what budget is left.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let s = &self.running[i];
            let n = (s.tokens.len() - s.computed).min(budget);
            let target = s.computed + n;
            if Self::grow(&mut self.blocks, &mut self.running[i], target) {
                work.push((i, n));
                budget -= n;
                i += 1;
                continue;
            }
            // Out of blocks: recompute the newest sequence later, unless it is this one and
            // the only one (it cannot be: the pool holds a whole context).
            let victim = self.running.len() - 1;
            if victim == i && work.is_empty() {
                let s = self.running.remove(i);
                let _ = s.events.send(SeqEvent::Failed(
                    "the KV cache cannot hold this sequence".into(),
                ));
                self.blocks.release(&s.blocks);
                continue;
            }
            self.preempt(victim);
            if victim == i {
                break;
            }
        }
        // Admit waiting sequences while slots, budget and blocks last.
        while budget > 0 && self.running.len() < self.config().max_num_seqs {
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            if s.blocks.is_empty() && self.config().prefix_caching {
                self.reuse_prefix(&mut s);
            }
            let n = (s.tokens.len() - s.computed).min(budget);
            let target = s.computed + n;
            if !Self::grow(&mut self.blocks, &mut s, target) {
                self.blocks.release(&s.blocks);
                s.blocks.clear();
                s.computed = 0;
                s.registered = 0;
                self.waiting.push_front(s);
                break;
            }
            if !s.admitted {
                s.admitted = true;
                s.admitted_at = Some(Instant::now());
                self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                self.metrics()
                    .request_queue_time
                    .observe(s.arrived.elapsed().as_secs_f64());
            }
            budget -= n;
            self.running.push(s);
            work.push((self.running.len() - 1, n));
        }
        work
    }

    /// Starts `s` from the longest cached run of its prompt's full blocks. At least the last
    /// prompt token is always computed, since its logits choose the first new token.
    fn reuse_prefix(&mut self, s: &mut Seq) {
        let prompt = &s.tokens[..s.request.prompt_ids.len()];
        let hashes = self.blocks.block_hashes(prompt, s.salt());
        let usable = (prompt.len() - 1) / self.blocks.block_size();
        let hits = self.blocks.take_cached(&hashes[..usable.min(hashes.len())]);
        let metrics = self.metrics();
        metrics.prefix_cache_queries.inc_by(prompt.len() as u64);
        let cached = hits.len() * self.blocks.block_size();
        metrics.prefix_cache_hits.inc_by(cached as u64);
        if s.generated() == 0 {
            s.cached_prompt_tokens = cached;
        }
        s.registered = hits.len();
        s.computed = cached;
        s.blocks = hits;
    }

    fn step(&mut self) {
        let work = self.schedule();
        if work.is_empty() {
            return;
        }
        // Group rows by adapter so each adapter's update is one matmul.
        let mut order: Vec<(usize, usize)> = work;
        order.sort_by_key(|&(i, _)| (self.running[i].request.adapter, i));
        let batch: Vec<PagedSeq> = order
            .iter()
            .map(|&(i, n)| {
                let s = &self.running[i];
                PagedSeq {
                    tokens: &s.tokens[s.computed..s.computed + n],
                    start: s.computed,
                    block_table: &s.blocks,
                    adapter: s.request.adapter,
                }
            })
            .collect();
        self.metrics().batch_size.observe(batch.len() as f64);
        // The forward pass takes only the adapters this step uses, numbered in slot order.
        let mut slots: Vec<usize> = batch.iter().filter_map(|p| p.adapter).collect();
        slots.dedup();
        let adapters: Vec<&CausalLm> = slots
            .iter()
            .filter_map(|&slot| self.adapters.get(slot).and_then(Option::as_ref))
            .collect();
        let result = if adapters.len() == slots.len() {
            let batch: Vec<PagedSeq> = batch
                .into_iter()
                .map(|p| PagedSeq {
                    adapter: p.adapter.and_then(|slot| slots.binary_search(&slot).ok()),
                    ..p
                })
                .collect();
            self.model
                .forward_paged(&batch, &mut self.cache, &adapters)
                .and_then(|l| l.to_vec2::<f32>())
        } else {
            // Unreachable: a slot is freed only once no sequence is on it.
            Err(candle_core::Error::Msg(
                "a sequence's adapter slot has been freed".into(),
            ))
        };
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                self.fail(&order, &format!("forward pass failed: {e}"));
                return;
            }
        };
        let prompt_tokens: usize = order
            .iter()
            .map(|&(i, n)| {
                let s = &self.running[i];
                let prompt_len = s.request.prompt_ids.len();
                (s.computed + n)
                    .min(prompt_len)
                    .saturating_sub(s.computed.min(prompt_len))
            })
            .sum();
        self.metrics().prompt_tokens.inc_by(prompt_tokens as u64);

        let mut finished = Vec::new();
        for (&(i, n), logits) in order.iter().zip(logits) {
            let s = &mut self.running[i];
            s.computed += n;
            self.register_full_blocks(i);
            let s = &mut self.running[i];
            if s.computed < s.tokens.len() {
                continue; // mid-prefill: no token yet
            }
            let token = choose(s, &logits);
            let now = Instant::now();
            let metrics = &self.shared.metrics;
            match s.last_token_at {
                None => {
                    s.first_token_at = Some(now);
                    metrics
                        .time_to_first_token
                        .observe((now - s.arrived).as_secs_f64())
                }
                Some(t) => metrics.inter_token_latency.observe((now - t).as_secs_f64()),
            }
            metrics.generation_tokens.inc();
            s.last_token_at = Some(now);
            *s.counts.entry(token.id).or_default() += 1;
            s.tokens.push(token.id);
            let stop = s.request.stop_token_ids.contains(&token.id);
            let _ = s.events.send(SeqEvent::Token(token));
            if stop {
                finished.push((i, FinishReason::Stop));
            } else if s.generated() >= s.request.max_tokens {
                finished.push((i, FinishReason::Length));
            }
        }
        finished.sort_by_key(|&(i, _)| std::cmp::Reverse(i));
        for (i, reason) in finished {
            let s = self.running.remove(i);
            self.finish(s, reason);
        }
    }

    /// Names the sequence's newly completed blocks in the prefix cache.
    fn register_full_blocks(&mut self, i: usize) {
        if !self.config().prefix_caching {
            return;
        }
        let bs = self.blocks.block_size();
        let s = &mut self.running[i];
        let full = s.computed / bs;
        if full <= s.registered {
            return;
        }
        let hashes = self.blocks.block_hashes(&s.tokens[..full * bs], s.salt());
        for (b, h) in s.blocks[s.registered..full]
            .iter()
            .zip(&hashes[s.registered..])
        {
            self.blocks.register(*b, *h);
        }
        s.registered = full;
    }

    fn finish(&mut self, s: Seq, reason: FinishReason) {
        self.blocks.release(&s.blocks);
        let m = self.metrics();
        let label = match reason {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        };
        m.request_success.with_label_values(&[label]).inc();
        m.e2e_request_latency
            .observe(s.arrived.elapsed().as_secs_f64());
        m.request_prompt_tokens
            .observe(s.request.prompt_ids.len() as f64);
        m.request_generation_tokens.observe(s.generated() as f64);
        let _ = s.events.send(SeqEvent::Finished(SeqFinish {
            reason,
            prompt_tokens: s.request.prompt_ids.len(),
            completion_tokens: s.generated(),
            cached_prompt_tokens: s.cached_prompt_tokens,
            queue_time: s
                .admitted_at
                .map_or(Duration::ZERO, |t| t.duration_since(s.arrived)),
            time_to_first_token: s.first_token_at.map(|t| t.duration_since(s.arrived)),
        }));
    }

    fn fail(&mut self, work: &[(usize, usize)], message: &str) {
        let mut failed: Vec<usize> = work.iter().map(|&(i, _)| i).collect();
        failed.sort_unstable_by(|a, b| b.cmp(a));
        for i in failed {
            let s = self.running.remove(i);
            self.blocks.release(&s.blocks);
            let _ = s.events.send(SeqEvent::Failed(message.to_string()));
        }
    }

    fn publish_stats(&self) {
        let stats = EngineStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_blocks_used: self.blocks.num_used(),
            kv_blocks_total: self.blocks.num_blocks(),
            adapters_loaded: self.adapters.iter().flatten().count(),
        };
        let m = self.metrics();
        m.num_requests_running.set(stats.running as i64);
        m.num_requests_waiting.set(stats.waiting as i64);
        m.kv_cache_usage_perc
            .set(stats.kv_blocks_used as f64 / stats.kv_blocks_total.max(1) as f64);
        if let Ok(mut shared) = self.shared.stats.lock() {
            *shared = stats;
        }
    }
}

/// Picks the next token of `s` from its raw `logits`, and reports the model's confidence in it.
fn choose(s: &mut Seq, logits: &[f32]) -> TokenOutput {
    let r = &s.request;
    let id = if r.presence_penalty != 0.0 || r.frequency_penalty != 0.0 {
        let mut penalized = logits.to_vec();
        for (&t, &c) in &s.counts {
            if let Some(l) = penalized.get_mut(t as usize) {
                *l -= r.presence_penalty + r.frequency_penalty * c as f32;
            }
        }
        s.sampler.sample(&penalized, &s.tokens)
    } else {
        s.sampler.sample(logits, &s.tokens)
    };
    confidence(logits, id, r.top_logprobs)
}

/// The log-prob of `id` under `softmax(logits)`, the distribution's entropy, and its `top` most
/// likely tokens.
pub(crate) fn confidence(logits: &[f32], id: u32, top: Option<usize>) -> TokenOutput {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_z = f64::from(max) + sum.ln();
    let entropy: f64 = logits
        .iter()
        .map(|&l| {
            let lp = f64::from(l) - log_z;
            if lp.is_finite() { -lp.exp() * lp } else { 0.0 }
        })
        .sum();
    let logprob = |t: u32| (f64::from(logits[t as usize]) - log_z) as f32;
    let top_logprobs = match top {
        Some(k) if k > 0 => {
            let mut order: Vec<u32> = (0..logits.len() as u32).collect();
            let k = k.min(order.len());
            order.select_nth_unstable_by(k - 1, |&a, &b| {
                logits[b as usize].total_cmp(&logits[a as usize])
            });
            order.truncate(k);
            order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
            order.into_iter().map(|t| (t, logprob(t))).collect()
        }
        _ => Vec::new(),
    };
    TokenOutput {
        id,
        logprob: logprob(id),
        entropy: entropy as f32,
        top_logprobs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confidence_is_the_log_softmax_and_its_entropy() {
        let logits = [1.0f32, 2.0, 3.0, 0.5];
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        let p: Vec<f32> = logits.iter().map(|l| l.exp() / z).collect();
        let out = confidence(&logits, 1, Some(2));
        assert!((out.logprob - p[1].ln()).abs() < 1e-6);
        let h: f32 = p.iter().map(|q| -q * q.ln()).sum();
        assert!((out.entropy - h).abs() < 1e-5);
        assert_eq!(
            out.top_logprobs.iter().map(|t| t.0).collect::<Vec<_>>(),
            [2, 1]
        );
        assert!((out.top_logprobs[0].1 - p[2].ln()).abs() < 1e-6);
    }
}

/// The engine against one-sequence generation on the fixture model: whatever the batch, the
/// chunking, the preemptions and the prefix cache do, every sequence gets the tokens it gets
/// alone.
#[cfg(test)]
mod engine_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use kiln_model::{
        CausalLm, FinishReason, GenerateParams, LoadOptions, LoadedModel, SamplingParams, generate,
    };

    use super::start_engine;
    use crate::engine::{EngineConfig, EngineHandle, SeqEvent, SeqFinish, SeqRequest, SeqStream};
    use crate::metrics::ServeMetrics;

    fn fixture() -> LoadedModel {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/hf/llama");
        LoadedModel::load(dir, &LoadOptions::default()).unwrap()
    }

    fn engine(model: &CausalLm, config: EngineConfig) -> EngineHandle {
        start_engine(
            model.clone(),
            vec![],
            config,
            Arc::new(ServeMetrics::new("test")),
        )
        .unwrap()
    }

    fn prompt(seed: u32, len: usize) -> Vec<u32> {
        (0..len as u32)
            .map(|i| 5 + (seed * 37 + i * 11) % 400)
            .collect()
    }

    fn request(prompt_ids: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> SeqRequest {
        SeqRequest {
            prompt_ids,
            adapter: None,
            max_tokens,
            sampling,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            stop_token_ids: vec![3],
            top_logprobs: None,
        }
    }

    fn collect(mut stream: SeqStream) -> (Vec<u32>, SeqFinish) {
        let mut ids = Vec::new();
        loop {
            match stream.blocking_recv().expect("stream ends with Finished") {
                SeqEvent::Token(t) => ids.push(t.id),
                SeqEvent::Finished(f) => return (ids, f),
                SeqEvent::Failed(e) => panic!("sequence failed: {e}"),
            }
        }
    }

    fn alone(model: &CausalLm, r: &SeqRequest) -> Vec<u32> {
        let params = GenerateParams {
            max_new_tokens: r.max_tokens,
            sampling: r.sampling.clone(),
            eos_token_ids: r.stop_token_ids.clone(),
            ..GenerateParams::default()
        };
        generate(model, &r.prompt_ids, &params, |_| {})
            .unwrap()
            .token_ids
    }

    #[test]
    fn batched_chunked_and_preempted_sequences_match_generation_alone() {
        let loaded = fixture();
        let model = &loaded.model;
        // A tight budget: prompts prefill in chunks beside decodes, and 12 sequences of up to
        // 60 positions cannot all keep their blocks in 40 blocks of 4, so some are preempted.
        let config = EngineConfig {
            max_num_seqs: 12,
            max_batch_tokens: 24,
            block_size: 4,
            num_blocks: 40,
            max_model_len: 64,
            ..EngineConfig::default()
        };
        let handle = engine(model, config);
        let requests: Vec<SeqRequest> = (0..12)
            .map(|i| {
                let sampling = if i % 3 == 0 {
                    SamplingParams {
                        temperature: 0.9,
                        top_k: 40,
                        seed: i as u64,
                        ..SamplingParams::default()
                    }
                } else {
                    SamplingParams::greedy()
                };
                let mut r = request(prompt(i, 5 + 3 * i as usize), 24, sampling);
                r.stop_token_ids.clear();
                r
            })
            .collect();
        let streams = handle.submit(requests.clone()).unwrap();
        for (r, stream) in requests.iter().zip(streams) {
            let (ids, finish) = collect(stream);
            assert_eq!(
                ids,
                alone(model, r),
                "prompt of {} tokens",
                r.prompt_ids.len()
            );
            assert_eq!(finish.reason, FinishReason::Length);
            assert_eq!(finish.completion_tokens, 24);
        }
        let m = handle.metrics().render();
        assert!(
            m.contains("kiln:generation_tokens_total{model_name=\"test\"} 288"),
            "{m}"
        );
        let preemptions = handle.metrics().num_preemptions.get();
        assert!(
            preemptions > 0,
            "the test meant to exercise preemption: {m}"
        );
    }

    /// The fixture with its LoRA adapter attached, the adapter's B matrices scaled by `scale`.
    fn with_adapter(base: &CausalLm, scale: f64) -> CausalLm {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/hf/llama-lora");
        let mut adapter = kiln_model::LoraAdapter::load(
            std::path::Path::new(dir),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        for (_, b) in adapter.modules.values_mut() {
            *b = (&*b * scale).unwrap();
        }
        let mut model = base.clone();
        adapter.apply(&mut model).unwrap();
        model
    }

    fn wait_for(handle: &EngineHandle, what: &str, done: impl Fn(&EngineHandle) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(handle) {
            assert!(Instant::now() < deadline, "{what}: {:?}", handle.stats());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_retired_adapter_finishes_its_sequences_and_later_ones_go_to_its_replacement() {
        let loaded = fixture();
        let old = with_adapter(&loaded.model, 1.0);
        let new = with_adapter(&loaded.model, 8.0);
        let handle = start_engine(
            loaded.model.clone(),
            vec![old.clone()],
            EngineConfig::default(),
            Arc::new(ServeMetrics::new("test")),
        )
        .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut on_old = request(prompt(3, 12), 40, SamplingParams::greedy());
        on_old.stop_token_ids.clear();
        on_old.adapter = Some(0);
        let expected_old = alone(&old, &on_old);
        let expected_new = alone(&new, &on_old);
        assert_ne!(expected_old, expected_new, "the two adapters must differ");

        // Running on slot 0 before the swap.
        let mut running = handle.submit(vec![on_old.clone()]).unwrap().remove(0);
        let first = match running.blocking_recv() {
            Some(SeqEvent::Token(t)) => t.id,
            other => panic!("expected a token, got {other:?}"),
        };
        let slot = runtime.block_on(handle.add_adapter(new.clone())).unwrap();
        assert_eq!(slot, 1, "slots are numbered on from the startup adapters");
        assert!(
            handle.retire_adapter(1, 0).is_err(),
            "only a later slot replaces"
        );
        handle.retire_adapter(0, slot).unwrap();
        // Resolved to slot 0 before the swap, submitted after it: runs on the replacement.
        let late = handle.submit(vec![on_old.clone()]).unwrap().remove(0);

        let (rest, _) = collect(running);
        let mut ids = vec![first];
        ids.extend(rest);
        assert_eq!(
            ids, expected_old,
            "a sequence running at the swap keeps its weights"
        );
        assert_eq!(collect(late).0, expected_new);
        // Slot 0's last sequence is done: its weights go.
        wait_for(&handle, "the retired adapter is dropped", |h| {
            h.stats().adapters_loaded == 1
        });
        // A freed slot still redirects, and the prefix cache (salted by slot) serves the
        // replacement nothing of the old adapter's.
        let (ids, _) = collect(handle.submit(vec![on_old.clone()]).unwrap().remove(0));
        assert_eq!(ids, expected_new);
        // A slot never loaded fails its sequence alone.
        let mut unknown = on_old.clone();
        unknown.adapter = Some(7);
        let mut stream = handle.submit(vec![unknown]).unwrap().remove(0);
        assert!(matches!(stream.blocking_recv(), Some(SeqEvent::Failed(_))));
        wait_for(&handle, "the queue is empty", |h| {
            h.shared.waiting.load(Ordering::SeqCst) == 0
        });
    }

    #[test]
    fn a_repeated_prompt_reuses_its_cached_blocks() {
        let loaded = fixture();
        let handle = engine(&loaded.model, EngineConfig::default());
        let r = request(prompt(7, 40), 8, SamplingParams::greedy());
        let (first, f1) = collect(handle.submit(vec![r.clone()]).unwrap().remove(0));
        let (second, f2) = collect(handle.submit(vec![r.clone()]).unwrap().remove(0));
        assert_eq!(f1.cached_prompt_tokens, 0);
        // 40 tokens are two full blocks of 16 and 8 more.
        assert_eq!(f2.cached_prompt_tokens, 32);
        assert_eq!(first, second);
        assert_eq!(first, alone(&loaded.model, &r));
    }

    #[test]
    fn a_dropped_stream_frees_its_slot_and_a_full_queue_refuses() {
        let loaded = fixture();
        let config = EngineConfig {
            max_num_seqs: 1,
            max_queue: 2,
            ..EngineConfig::default()
        };
        let handle = engine(&loaded.model, config);
        let mut long = request(prompt(1, 8), 400, SamplingParams::greedy());
        long.stop_token_ids.clear();
        let mut running = handle.submit(vec![long.clone()]).unwrap().remove(0);
        assert!(matches!(running.blocking_recv(), Some(SeqEvent::Token(_))));
        let queued = handle.submit(vec![long.clone(), long.clone()]).unwrap();
        let refused = handle.submit(vec![long.clone()]).unwrap_err();
        assert!(
            matches!(refused, crate::SubmitError::QueueFull { .. }),
            "{refused}"
        );
        drop(running);
        drop(queued);
        let deadline = Instant::now() + Duration::from_secs(5);
        // The stats snapshot can read 0 before the scheduler has even received the queued
        // sequences; the submission counter is what a new request is checked against.
        while handle.stats().running + handle.stats().waiting > 0
            || handle.shared.waiting.load(Ordering::SeqCst) > 0
        {
            assert!(
                Instant::now() < deadline,
                "still busy: {:?}",
                handle.stats()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(handle.stats().kv_blocks_used, 0);
        // The queue has room again.
        let (ids, _) = collect(
            handle
                .submit(vec![request(prompt(2, 4), 3, SamplingParams::greedy())])
                .unwrap()
                .remove(0),
        );
        assert_eq!(ids.len(), 3);
        let m = handle.metrics().render();
        assert!(
            m.contains(
                "kiln:request_success_total{finished_reason=\"abort\",model_name=\"test\"} 3"
            ),
            "{m}"
        );
    }
}
