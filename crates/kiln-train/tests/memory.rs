//! Resident memory stays flat over a long training run: nothing a step allocates outlives it
//! (a buffer pool, a saved activation, a tensor whose graph reaches back to earlier steps).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{DType, Device, Var};
use candle_nn::{VarBuilder, VarMap};
use kiln_core::ModelConfig;
use kiln_core::config::RawConfig;
use kiln_model::CausalLm;
use kiln_train::grads::{GradAccumulator, clip_grad_norm};
use kiln_train::optim::{AdamW, AdamWConfig, NamedVar};
use kiln_train::pretrain::lm_loss;

/// The process's resident set in KiB (`VmRSS`), where `/proc` has it.
fn resident_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn model_config() -> ModelConfig {
    let raw: RawConfig = serde_json::from_str(
        r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 128,
        "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128}"#,
    )
    .unwrap();
    ModelConfig::from_raw(raw, std::path::Path::new("config.json")).unwrap()
}

/// The pretraining loop (fused layers, the fused LM-head loss, clipping, AdamW) over batches
/// whose sequence length changes from step to step, as SFT's do. Before the fused layers' pool
/// stopped adopting the attention output it had not lent, this grew by ~0.8 MB a step here
/// (~30 MB between steps 20 and 60); now the growth is noise.
#[test]
fn resident_memory_stays_flat_over_training_steps() {
    if resident_kib().is_none() {
        eprintln!("no /proc/self/status: skipped");
        return;
    }
    let cfg = model_config();
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    for (name, t) in kiln_model::init::init_weights(&cfg, 0.02, 0, DType::F32, &dev).unwrap() {
        let var = Var::from_tensor(&t).unwrap();
        varmap.data().lock().unwrap().insert(name, var);
    }
    let model = CausalLm::load(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg).unwrap();
    let mut params: Vec<NamedVar> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| NamedVar::new(n.clone(), v.clone()))
        .collect();
    params.sort_by(|a, b| a.name.cmp(&b.name));
    let mut opt = AdamW::new(params.clone(), AdamWConfig::default());

    // Every length occurs before step 20, so the pools have reached their size by then.
    let lengths = [65, 41, 58, 65, 24, 50];
    let (batch, steps, settled) = (8, 60, 20);
    let mut at_settled = 0;
    for step in 0..steps {
        let len = lengths[step % lengths.len()];
        let rows: Vec<Vec<u32>> = (0..batch)
            .map(|r| {
                (0..len)
                    .map(|i| ((step * 131 + r * 37 + i * 11) % 512) as u32)
                    .collect()
            })
            .collect();
        let loss = lm_loss(&model, &rows, batch * (len - 1)).unwrap();
        let mut acc = GradAccumulator::new();
        acc.add(&params, &model.backward(&loss).unwrap()).unwrap();
        let mut grads = acc.take(&params).unwrap();
        clip_grad_norm(&params, &mut grads, 1.0).unwrap();
        opt.step(&grads).unwrap();
        drop((loss, grads));
        if step + 1 == settled {
            at_settled = resident_kib().unwrap();
        }
    }
    let at_end = resident_kib().unwrap();
    let growth_kib = at_end.saturating_sub(at_settled);
    eprintln!("VmRSS {at_settled} KiB after {settled} steps, {at_end} KiB after {steps}");
    assert!(
        growth_kib < 8 * 1024,
        "resident memory grew by {growth_kib} KiB between steps {settled} and {steps} \
         ({at_settled} -> {at_end} KiB): something a step allocates outlives it"
    );
}
