//! Single-stream decode speed of a ~26M-parameter Llama with random weights.
//!
//! `cargo bench -p kiln-model --bench decode` prints, per variant, the time for 64 decode steps
//! after a 32-token prefill (tokens/s in criterion's throughput line), plus a 128-token prefill.
//! Setup: vocab 8192, hidden 512, MLP 1408, 6 layers, 8 heads / 4 KV heads (GQA), f32 on CPU.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln_core::ModelConfig;
use kiln_core::config::RawConfig;
use kiln_model::CausalLm;
use kiln_model::sampling::argmax;

const PROMPT: usize = 32;
const DECODE: usize = 64;

fn config() -> ModelConfig {
    let raw: RawConfig = serde_json::from_value(serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1408,
        "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0
    }))
    .expect("bench config");
    ModelConfig::from_raw(raw, std::path::Path::new("bench")).expect("valid bench config")
}

fn model(cfg: &ModelConfig) -> CausalLm {
    let weights =
        kiln_model::init::init_weights(cfg, 0.02, 0, DType::F32, &Device::Cpu).expect("init");
    CausalLm::load(
        VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
        cfg,
    )
    .expect("load")
}

/// Times `DECODE` greedy steps after an untimed prefill.
fn decode_steps(model: &CausalLm, iters: u64) -> Duration {
    let dev = Device::Cpu;
    let prompt: Vec<u32> = (0..PROMPT as u32).map(|i| (i * 97 + 13) % 8192).collect();
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let mut cache = model.new_cache();
        let ids = Tensor::new(prompt.as_slice(), &dev)
            .and_then(|t| t.unsqueeze(0))
            .expect("ids");
        let logits = model.forward_last(&ids, Some(&mut cache)).expect("prefill");
        let mut next = argmax(&logits.squeeze(0).and_then(|l| l.to_vec1()).expect("logits"));
        let start = Instant::now();
        for _ in 0..DECODE {
            let ids = Tensor::new(&[next], &dev)
                .and_then(|t| t.unsqueeze(0))
                .expect("ids");
            let logits = model.forward_last(&ids, Some(&mut cache)).expect("decode");
            next = argmax(&logits.squeeze(0).and_then(|l| l.to_vec1()).expect("logits"));
        }
        total += start.elapsed();
    }
    total
}

fn bench(c: &mut Criterion) {
    kiln_core::init_cpu_threads();
    let cfg = config();
    let dense = model(&cfg);
    let mut q8 = dense.clone();
    q8.quantize(GgmlDType::Q8_0).expect("quantize");
    eprintln!(
        "setup: Llama {} parameters (vocab {}, hidden {}, mlp {}, {} layers, {} heads / {} KV), \
         f32 CPU, {} threads, prompt {PROMPT}, {DECODE} decode steps per iteration",
        cfg.num_parameters(),
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
        candle_core::utils::get_num_threads(),
    );

    let mut group = c.benchmark_group("decode_25m");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(DECODE as u64));
    group.bench_function("f32", |b| {
        b.iter_custom(|iters| decode_steps(&dense, iters))
    });
    group.bench_function("q8_0_linears", |b| {
        b.iter_custom(|iters| decode_steps(&q8, iters))
    });
    group.finish();

    let mut group = c.benchmark_group("prefill_25m");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(128));
    let ids = Tensor::new(&(0..128u32).collect::<Vec<_>>()[..], &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("ids");
    group.bench_function("f32_128_tokens", |b| {
        b.iter(|| {
            dense
                .forward_last(&ids, Some(&mut dense.new_cache()))
                .expect("prefill")
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
