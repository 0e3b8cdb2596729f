//! LoRA fine-tuning step time against full fine-tuning of the same model.
//!
//! `cargo bench -p kiln-train --bench sft_step` times complete optimizer steps (forward,
//! backward, clipping, optimizer) of the `train_step` reference Llama (vocab 2048, hidden 256,
//! MLP 688, 4 layers, 8 heads; batch 8 × sequence 256, f32 CPU) trained four ways: in full with
//! AdamW and with 8-bit AdamW, and with rank-16 LoRA adapters on every linear layer and on
//! `q_proj`/`v_proj` only (frozen base). It prints the median and best of a dozen steps, the
//! trainable parameters and the optimizer-state bytes of each.

use std::time::Instant;

use candle_core::{DType, Device, Var};
use candle_nn::VarBuilder;
use kiln_core::ModelConfig;
use kiln_core::config::RawConfig;
use kiln_model::lora_train::attach_trainable_lora;
use kiln_model::{CausalLm, LoraConfig, TargetModules};
use kiln_train::pretrain::lm_loss;
use kiln_train::{AdamWConfig, NamedVar, Optimizer, clip_grad_norm};

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

/// The model with every weight trainable (full) or frozen with fresh adapters on `targets`.
fn model(cfg: &ModelConfig, lora: Option<TargetModules>) -> (CausalLm, Vec<NamedVar>) {
    let device = Device::Cpu;
    let init = kiln_model::init::init_weights(cfg, 0.02, 0, DType::F32, &device).expect("init");
    let mut params = Vec::new();
    let tensors = init
        .into_iter()
        .map(|(name, t)| {
            if lora.is_some() {
                return (name, t);
            }
            let var = Var::from_tensor(&t).expect("var");
            params.push(NamedVar::new(name.clone(), var.clone()));
            (name, var.as_tensor().clone())
        })
        .collect();
    let mut model =
        CausalLm::load(VarBuilder::from_tensors(tensors, DType::F32, &device), cfg).expect("model");
    if let Some(targets) = lora {
        let config = LoraConfig::new(16, 32.0, targets);
        for v in attach_trainable_lora(&mut model, &config, 0).expect("adapters") {
            params.push(NamedVar::new(v.name, v.var));
        }
    }
    (model, params)
}

struct Row {
    name: &'static str,
    trainable: usize,
    median: f64,
    best: f64,
    state_bytes: usize,
}

fn run(name: &'static str, optim: &str, cfg: &ModelConfig, lora: Option<TargetModules>) -> Row {
    let (model, params) = model(cfg, lora);
    let mut opt =
        Optimizer::from_name(optim, params.clone(), AdamWConfig::default()).expect("optimizer");
    let rows: Vec<Vec<u32>> = (0..BATCH)
        .map(|r| {
            (0..=SEQ as u32)
                .map(|i| (i * 131 + r as u32 * 17) % 2048)
                .collect()
        })
        .collect();
    let mut step = || -> f64 {
        let t = Instant::now();
        let loss = lm_loss(&model, &rows, BATCH * SEQ).expect("loss");
        let mut grads = model.backward(&loss).expect("backward");
        clip_grad_norm(&params, &mut grads, 1.0).expect("clip");
        opt.step(&grads).expect("step");
        t.elapsed().as_secs_f64()
    };
    step();
    let mut times: Vec<f64> = (0..12).map(|_| step()).collect();
    times.sort_by(f64::total_cmp);
    Row {
        name,
        trainable: params.iter().map(|p| p.var.elem_count()).sum(),
        median: times[times.len() / 2],
        best: times[0],
        state_bytes: opt.state_bytes(),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this without it: skip then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    keep_freed_memory();
    kiln_core::init_cpu_threads();
    let cfg = config();
    let qv = || TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]);
    let rows = [
        run("full, adamw_torch", "adamw_torch", &cfg, None),
        run("full, adamw_8bit", "adamw_8bit", &cfg, None),
        run(
            "LoRA r16 all-linear, adamw_torch",
            "adamw_torch",
            &cfg,
            Some(TargetModules::AllLinear),
        ),
        run(
            "LoRA r16 q_proj+v_proj, adamw_torch",
            "adamw_torch",
            &cfg,
            Some(qv()),
        ),
    ];
    eprintln!(
        "Llama {} params, batch {BATCH} x seq {SEQ}, f32 CPU, {} threads",
        cfg.num_parameters(),
        candle_core::utils::get_num_threads()
    );
    eprintln!("| method | trainable params | step median | step best | optimizer state |");
    eprintln!("|---|---|---|---|---|");
    for r in &rows {
        eprintln!(
            "| {} | {} | {:.0} ms | {:.0} ms | {:.2} MiB |",
            r.name,
            r.trainable,
            r.median * 1e3,
            r.best * 1e3,
            r.state_bytes as f64 / (1024.0 * 1024.0)
        );
    }
}
