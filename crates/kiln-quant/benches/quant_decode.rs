//! Whole-model decode and prefill speed, f32 against 4- and 8-bit weights.
//!
//! `cargo bench -p kiln-quant --bench quant_decode` times 64 greedy decode steps after a
//! 32-token prompt, and a 128-token prefill, on a ~100M-parameter Llama with random weights
//! (vocab 8192, hidden 1024, MLP 2816, 8 layers, 16 heads / 8 KV heads), f32 on CPU, with every
//! decoder linear layer dense or RTN-quantized (asymmetric, groups of 128) into kiln's packed
//! form. The LM head and embedding stay f32, as `kiln quantize` leaves them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln_core::ModelConfig;
use kiln_core::config::RawConfig;
use kiln_model::CausalLm;
use kiln_model::quant::PackedWeight;
use kiln_quant::{QuantSpec, rtn_quantize};

const PROMPT: usize = 32;
const DECODE: usize = 64;

fn config() -> ModelConfig {
    let raw: RawConfig = serde_json::from_value(serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 8192, "hidden_size": 1024, "intermediate_size": 2816,
        "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 8,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0
    }))
    .expect("bench config");
    ModelConfig::from_raw(raw, std::path::Path::new("bench")).expect("valid bench config")
}

fn quantized(dense: &CausalLm, bits: u8) -> CausalLm {
    let mut model = dense.clone();
    let spec = QuantSpec {
        bits,
        group_size: Some(128),
        sym: false,
    };
    for (name, linear) in model.linears_mut() {
        if name == "lm_head" {
            continue;
        }
        let w = linear.dense_weight().unwrap();
        let (o, i) = w.dims2().unwrap();
        let m = rtn_quantize(&w.flatten_all().unwrap().to_vec1().unwrap(), o, i, &spec);
        linear
            .set_packed(PackedWeight::from_quantized(&m).unwrap())
            .unwrap();
    }
    model
}

/// Times `DECODE` greedy steps after an untimed prefill.
fn decode_steps(model: &CausalLm, iters: u64) -> Duration {
    let dev = Device::Cpu;
    let prompt: Vec<u32> = (0..PROMPT as u32).map(|i| (i * 97 + 13) % 8192).collect();
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let mut cache = model.new_cache();
        let ids = Tensor::new(prompt.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward_last(&ids, Some(&mut cache)).unwrap();
        let mut next = kiln_model::sampling::argmax(&logits.squeeze(0).unwrap().to_vec1().unwrap());
        let start = Instant::now();
        for _ in 0..DECODE {
            let ids = Tensor::new(&[next], &dev).unwrap().unsqueeze(0).unwrap();
            let logits = model.forward_last(&ids, Some(&mut cache)).unwrap();
            next = kiln_model::sampling::argmax(&logits.squeeze(0).unwrap().to_vec1().unwrap());
        }
        total += start.elapsed();
    }
    total
}

fn bench(c: &mut Criterion) {
    kiln_core::init_cpu_threads();
    let cfg = config();
    let weights =
        kiln_model::init::init_weights(&cfg, 0.02, 0, DType::F32, &Device::Cpu).expect("init");
    let mut dense = CausalLm::load(
        VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    dense.store_weights_transposed().unwrap();
    let int4 = quantized(&dense, 4);
    let int8 = quantized(&dense, 8);
    eprintln!(
        "setup: Llama {} parameters, f32 CPU, {} threads",
        cfg.num_parameters(),
        candle_core::utils::get_num_threads()
    );
    let models = [("f32", &dense), ("int4_g128", &int4), ("int8_g128", &int8)];

    let mut group = c.benchmark_group("quant_decode_100m");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(DECODE as u64));
    for (name, model) in models {
        group.bench_function(name, |b| b.iter_custom(|iters| decode_steps(model, iters)));
    }
    group.finish();

    let mut group = c.benchmark_group("quant_prefill_100m");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(128));
    let ids = Tensor::new(&(0..128u32).collect::<Vec<_>>()[..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    for (name, model) in models {
        group.bench_function(name, |b| {
            b.iter(|| {
                model
                    .forward_last(&ids, Some(&mut model.new_cache()))
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
