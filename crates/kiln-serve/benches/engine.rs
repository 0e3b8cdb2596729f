//! Aggregate decode throughput of the engine as concurrency grows, against single-stream
//! generation, on a ~26M-parameter Llama with random weights (the model of kiln-model's decode
//! bench).
//!
//! `cargo bench -p kiln-serve --bench engine` keeps C sequences in flight (a new one is submitted
//! as each finishes) until 4·C have finished, each a distinct 32-token prompt and 64 generated
//! tokens (greedy, EOS ignored), and prints output tokens/s per concurrency. The HTTP layer is
//! left out here; `kiln bench serve` measures the same through the API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use kiln_core::ModelConfig;
use kiln_core::config::RawConfig;
use kiln_model::{CausalLm, GenerateParams, PagedKvCache, PagedSeq, SamplingParams, generate};
use kiln_serve::{EngineConfig, SeqEvent, SeqRequest, ServeMetrics, start_engine};

const PROMPT: usize = 32;
const NEW_TOKENS: usize = 64;

fn model() -> CausalLm {
    let raw: RawConfig = serde_json::from_value(serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1408,
        "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0
    }))
    .unwrap();
    let cfg = ModelConfig::from_raw(raw, std::path::Path::new("bench")).unwrap();
    let weights = kiln_model::init::init_weights(&cfg, 0.02, 0, DType::F32, &Device::Cpu).unwrap();
    CausalLm::load(
        VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
        &cfg,
    )
    .unwrap()
}

fn prompt(i: usize) -> Vec<u32> {
    (0..PROMPT)
        .map(|j| ((i * 7919 + j * 97 + 13) % 8192) as u32)
        .collect()
}

fn request(i: usize) -> SeqRequest {
    SeqRequest {
        prompt_ids: prompt(i),
        adapter: None,
        max_tokens: NEW_TOKENS,
        sampling: SamplingParams::greedy(),
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        stop_token_ids: Vec::new(),
        top_logprobs: None,
    }
}

/// Output tokens/s with `concurrency` sequences in flight.
fn engine_throughput(model: &CausalLm, concurrency: usize) -> f64 {
    let config = EngineConfig {
        max_num_seqs: concurrency,
        ..EngineConfig::default()
    };
    let engine = start_engine(
        model.clone(),
        Vec::new(),
        config,
        Arc::new(ServeMetrics::new("bench")),
    )
    .unwrap();
    let total = 4 * concurrency;
    let start = Instant::now();
    let tokens: usize = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..concurrency)
            .map(|w| {
                let engine = engine.clone();
                scope.spawn(move || {
                    let mut tokens = 0;
                    for i in (w..total).step_by(concurrency) {
                        let mut stream = engine.submit(vec![request(i)]).unwrap().remove(0);
                        while let Some(event) = stream.blocking_recv() {
                            match event {
                                SeqEvent::Token(_) => tokens += 1,
                                SeqEvent::Finished(_) => break,
                                SeqEvent::Failed(e) => panic!("{e}"),
                            }
                        }
                    }
                    tokens
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    engine.shutdown();
    tokens as f64 / start.elapsed().as_secs_f64()
}

/// Milliseconds of one forward pass of `rows` sequences decoding one token each.
fn decode_step_ms(model: &CausalLm, rows: usize) -> f64 {
    let block = 16;
    let blocks_per_seq = (PROMPT + 1).div_ceil(block);
    let mut cache = PagedKvCache::new(model, rows * blocks_per_seq, block);
    let tables: Vec<Vec<u32>> = (0..rows)
        .map(|r| ((r * blocks_per_seq) as u32..((r + 1) * blocks_per_seq) as u32).collect())
        .collect();
    let prompts: Vec<Vec<u32>> = (0..rows).map(prompt).collect();
    let prefill: Vec<PagedSeq> = (0..rows)
        .map(|r| PagedSeq {
            tokens: &prompts[r],
            start: 0,
            block_table: &tables[r],
            adapter: None,
        })
        .collect();
    model.forward_paged(&prefill, &mut cache, &[]).unwrap();
    let next = [7u32];
    let step: Vec<PagedSeq> = (0..rows)
        .map(|r| PagedSeq {
            tokens: &next,
            start: PROMPT,
            block_table: &tables[r],
            adapter: None,
        })
        .collect();
    let iters = 20;
    let start = Instant::now();
    for _ in 0..iters {
        model.forward_paged(&step, &mut cache, &[]).unwrap();
    }
    start.elapsed().as_secs_f64() * 1e3 / iters as f64
}

fn main() {
    let threads = kiln_core::init_cpu_threads();
    let mut model = model();
    if std::env::var("KILN_BENCH_UNTRANSPOSED").is_err() {
        model.store_weights_transposed().unwrap();
    }
    println!(
        "setup: Llama {} parameters, f32 CPU, {threads} threads; prompt {PROMPT} tokens, {NEW_TOKENS} new tokens per request",
        model.num_parameters()
    );
    // Single-stream generation without the engine, the baseline for concurrency 1.
    let params = GenerateParams {
        max_new_tokens: NEW_TOKENS,
        sampling: SamplingParams::greedy(),
        ..GenerateParams::default()
    };
    let start = Instant::now();
    let runs = 4;
    for i in 0..runs {
        generate(&model, &prompt(i), &params, |_| {}).unwrap();
    }
    let alone = (runs * NEW_TOKENS) as f64 / start.elapsed().as_secs_f64();
    println!("generate (no engine), 1 stream: {alone:8.1} output tokens/s");
    // The cost of one decode step by batch size: what continuous batching amortizes.
    for b in [1, 4, 16, 32] {
        println!(
            "forward_paged, {b:2} decode rows at position {PROMPT}: {:6.2} ms/step",
            decode_step_ms(&model, b)
        );
    }
    let mut one = None;
    for c in [1, 4, 16, 32] {
        let rate = engine_throughput(&model, c);
        let base = *one.get_or_insert(rate);
        println!(
            "engine, concurrency {c:2}:         {rate:8.1} output tokens/s ({:.1}x concurrency 1)",
            rate / base
        );
    }
}
