//! What monitoring costs per request, and what a drift test costs per run.
//!
//! `cargo bench -p kiln-monitor --bench monitor`:
//! - `features/1KB`: a request's drift features (words, hashed embedding, lengths) from a 1 KB
//!   prompt and a 60-word reply — the gateway computes these for every request;
//! - `grounding/2KB-context`: indexing a 2 KB context and grounding a 60-word reply in it;
//! - `confidence/256-token-logprobs`: mean log-prob and top-5 entropy from an OpenAI-style chat
//!   reply with 256 tokens of `logprobs`;
//! - `live/observe`: one observation into the dashboard's series;
//! - `drift/N+N`: a whole drift test over two windows of N requests (the timer's work, off the
//!   request path).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use kiln_monitor::drift::{DriftConfig, detect};
use kiln_monitor::features::SampleFeatures;
use kiln_monitor::grounding::Context;
use kiln_monitor::live::{Live, Observation};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

const WORDS: &[&str] = &[
    "the",
    "model",
    "serves",
    "requests",
    "from",
    "many",
    "tenants",
    "while",
    "gateway",
    "counts",
    "tokens",
    "cost",
    "latency",
    "cache",
    "prompt",
    "reply",
    "drift",
    "window",
    "reference",
    "current",
    "score",
    "threshold",
    "alice",
    "paris",
    "cat",
    "blue",
    "forty",
    "question",
    "answer",
    "context",
];

fn text(rng: &mut ChaCha8Rng, words: usize) -> String {
    (0..words)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

fn window(seed: u64, n: usize, extra: usize) -> Vec<SampleFeatures> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = 8 + extra + rng.random_range(0..12);
            let prompt = text(&mut rng, len);
            let reply_len = 10 + rng.random_range(0..30);
            let reply = text(&mut rng, reply_len);
            SampleFeatures::from_text(&prompt, Some(&reply), Some(rng.random_range(0.5..2.0)))
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let prompt = text(&mut rng, 170); // ≈ 1 KB
    let reply = text(&mut rng, 60);
    c.bench_function("features/1KB", |b| {
        b.iter(|| SampleFeatures::from_text(&prompt, Some(&reply), Some(1.2)))
    });

    let context = text(&mut rng, 340); // ≈ 2 KB
    c.bench_function("grounding/2KB-context", |b| {
        b.iter(|| Context::new(&context).ground(&reply))
    });

    let content: Vec<_> = (0..256)
        .map(|i| {
            let lp = -0.1 - (i % 7) as f64 * 0.3;
            json!({"token": "x", "logprob": lp, "bytes": [120],
                   "top_logprobs": (0..5).map(|k| json!({"token": "y", "logprob": lp - k as f64})).collect::<Vec<_>>()})
        })
        .collect();
    let body = json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                   "logprobs": {"content": content}, "finish_reason": "stop"}]});
    c.bench_function("confidence/256-token-logprobs", |b| {
        b.iter(|| kiln_monitor::confidence::from_reply(&body, 0))
    });

    let live = Live::new(Duration::from_secs(10), 360);
    let mut o = Observation {
        at: SystemTime::now(),
        tenant: "acme".into(),
        model: "llama".into(),
        status: 200,
        total_ms: 120.0,
        gateway_ms: 0.2,
        queue_ms: Some(1.0),
        ttft_ms: Some(30.0),
        prompt_tokens: 200,
        completion_tokens: 60,
        cost_usd: Some(0.0002),
        cache_hit: false,
        cache_lookup: true,
        guard_blocked: false,
        hallucination: Some(false),
        p_wrong: Some(0.2),
    };
    c.bench_function("live/observe", |b| {
        b.iter(|| {
            o.total_ms += 0.001;
            live.observe(&o)
        })
    });

    let mut group = c.benchmark_group("drift");
    group.sample_size(10);
    for n in [500, 5000] {
        let reference = window(1, n, 0);
        let shifted = window(2, n, 8);
        group.bench_function(format!("{n}+{n}"), |b| {
            b.iter(|| detect(&reference, &shifted, &DriftConfig::default()).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
