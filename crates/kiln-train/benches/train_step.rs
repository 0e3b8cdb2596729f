//! Pre-training step throughput and MFU for the project's reference configuration.
//!
//! `cargo bench -p kiln-train --bench train_step` prints tokens/s of a full optimizer step
//! (forward, backward, clipping, AdamW) for a Llama with vocab 2048, hidden 256, MLP 688,
//! 4 layers, 8 heads, sequence 256, batch 8 — the configuration PyTorch eager was measured on
//! (`train_step_peer.py` beside this file) — and the model FLOPs utilisation against the
//! machine's f32 matmul rate measured in the same run.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln_core::ModelConfig;
use kiln_core::config::RawConfig;
use kiln_model::CausalLm;
use kiln_train::pretrain::lm_loss;
use kiln_train::{AdamW, AdamWConfig, NamedVar, clip_grad_norm};

/// As in the `kiln` binary: mimalloc, told never to purge, keeps large tensor buffers instead
/// of returning them to the kernel.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[allow(unsafe_code)]
fn keep_freed_memory() {
    // SAFETY: sets a process-wide allocator option by value (15 is `mi_option_purge_delay`)
    // before the benchmark starts any thread.
    unsafe { libmimalloc_sys::mi_option_set(15, -1) }
}

const SEQ: usize = 256;
const BATCH: usize = 8;

fn config() -> ModelConfig {
    let raw: RawConfig = serde_json::from_value(serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 2048, "hidden_size": 256,
        "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 8, "max_position_embeddings": SEQ, "rms_norm_eps": 1e-5
    }))
    .expect("config");
    ModelConfig::from_raw(raw, std::path::Path::new("bench")).expect("valid")
}

/// Model FLOPs of one training step: 6 per parameter-token for the matmuls (forward and the
/// two backward products) plus the attention score and value products.
fn step_flops(cfg: &ModelConfig) -> f64 {
    let tokens = (BATCH * SEQ) as f64;
    let params = cfg.num_parameters() as f64 - (cfg.vocab_size * cfg.hidden_size) as f64; // embedding lookup is free
    let attention = 2.0 * 2.0 * cfg.num_layers as f64 * SEQ as f64 * cfg.hidden_size as f64; // per token, causal avg ~ half, fwd
    tokens * (6.0 * params + 3.0 * attention)
}

fn matmul_gflops() -> f64 {
    let n = 1024;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu).expect("a");
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu).expect("b");
    let _ = a.matmul(&b).expect("warm-up");
    let best = (0..20)
        .map(|_| {
            let start = Instant::now();
            let _ = a.matmul(&b).expect("matmul");
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    2.0 * (n * n * n) as f64 / best / 1e9
}

fn bench(c: &mut Criterion) {
    keep_freed_memory();
    kiln_core::init_cpu_threads();
    let cfg = config();
    let device = Device::Cpu;
    let varmap = VarMap::new();
    {
        let init =
            kiln_model::init::init_weights(&cfg, 0.02, 0, DType::F32, &device).expect("init");
        let mut data = varmap.data().lock().expect("lock");
        for (name, t) in init {
            data.insert(name, Var::from_tensor(&t).expect("var"));
        }
    }
    let model =
        CausalLm::load(VarBuilder::from_varmap(&varmap, DType::F32, &device), &cfg).expect("model");
    let params: Vec<NamedVar> = varmap
        .data()
        .lock()
        .expect("lock")
        .iter()
        .map(|(n, v)| NamedVar::new(n.clone(), v.clone()))
        .collect();
    let mut opt = AdamW::new(params.clone(), AdamWConfig::default());
    let rows: Vec<Vec<u32>> = (0..BATCH)
        .map(|r| {
            (0..=SEQ as u32)
                .map(|i| (i * 131 + r as u32 * 17) % 2048)
                .collect()
        })
        .collect();
    // One optimizer step, timed by phase.
    let mut step = || -> [f64; 4] {
        let t0 = Instant::now();
        let loss = lm_loss(&model, &rows, BATCH * SEQ).expect("loss");
        let _ = loss.to_scalar::<f32>().expect("loss value");
        let t1 = Instant::now();
        let mut grads = model.backward(&loss).expect("backward");
        let t2 = Instant::now();
        clip_grad_norm(&params, &mut grads, 1.0).expect("clip");
        let t3 = Instant::now();
        opt.step(&grads).expect("step");
        let t4 = Instant::now();
        [t1 - t0, t2 - t1, t3 - t2, t4 - t3].map(|d| d.as_secs_f64())
    };

    let peak = matmul_gflops();
    let flops = step_flops(&cfg);
    step();
    // Shared machines are noisy: report the median and the best of a dozen steps, and the best
    // time of each phase, the figures least disturbed by other load.
    let runs: Vec<[f64; 4]> = (0..12).map(|_| step()).collect();
    let mut totals: Vec<f64> = runs.iter().map(|r| r.iter().sum()).collect();
    totals.sort_by(f64::total_cmp);
    let (best, median) = (totals[0], totals[totals.len() / 2]);
    let phase = |i: usize| runs.iter().map(|r| r[i]).fold(f64::INFINITY, f64::min) * 1e3;
    eprintln!(
        "setup: Llama {} params, batch {BATCH} x seq {SEQ}, f32 CPU, {} threads\n\
         step median {:.0} ms = {:.0} tokens/s, best {:.0} ms = {:.0} tokens/s \
         (best phases: forward {:.0} ms, backward {:.0} ms, clip {:.0} ms, AdamW {:.0} ms)\n\
         model {:.1} GFLOP/s at the median = MFU {:.0}% of the {peak:.0} GFLOP/s this machine's \
         f32 matmul reaches (1024^3)",
        cfg.num_parameters(),
        candle_core::utils::get_num_threads(),
        median * 1e3,
        (BATCH * SEQ) as f64 / median,
        best * 1e3,
        (BATCH * SEQ) as f64 / best,
        phase(0),
        phase(1),
        phase(2),
        phase(3),
        flops / median / 1e9,
        100.0 * flops / median / 1e9 / peak,
    );

    let mut group = c.benchmark_group("pretrain_step");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements((BATCH * SEQ) as u64));
    group.bench_function("hidden256_4layers_seq256_batch8", |b| b.iter(&mut step));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
