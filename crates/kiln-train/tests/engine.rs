//! The training engine against PyTorch and transformers (testdata/train/reference.json, made by
//! testdata/hf/tools/make_train_fixtures.py), and on the reference Llama: accumulation equals a
//! big batch, the zero-gradient guard fires, and a resumed run continues exactly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use kiln_core::ModelConfig;
use kiln_model::CausalLm;
use kiln_train::{
    AdamW, AdamWConfig, Checkpoint, GradAccumulator, LrSchedule, NamedVar, Optimizer, ScheduleKind,
    TrainerState, clip_grad_norm, ensure_all_have_gradients,
};
use serde_json::Value;

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(testdata().join("train/reference.json")).unwrap())
        .unwrap()
}

fn tensor(v: &Value) -> Tensor {
    let rows: Vec<Vec<f32>> = match v.as_array().unwrap().first() {
        Some(Value::Array(_)) => serde_json::from_value(v.clone()).unwrap(),
        _ => vec![serde_json::from_value(v.clone()).unwrap()],
    };
    let (r, c) = (rows.len(), rows[0].len());
    let t = Tensor::from_vec(rows.concat(), (r, c), &Device::Cpu).unwrap();
    if matches!(v.as_array().unwrap().first(), Some(Value::Array(_))) {
        t
    } else {
        t.squeeze(0).unwrap()
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn adamw_matches_torch() {
    let r = &reference()["adamw"];
    for case in r["cases"].as_array().unwrap() {
        let w = Var::from_tensor(&tensor(&r["w0"])).unwrap();
        let b = Var::from_tensor(&tensor(&r["b0"])).unwrap();
        let config = AdamWConfig {
            lr: case["lr"].as_f64().unwrap(),
            beta1: case["betas"][0].as_f64().unwrap(),
            beta2: case["betas"][1].as_f64().unwrap(),
            eps: case["eps"].as_f64().unwrap(),
            weight_decay: case["weight_decay"].as_f64().unwrap(),
        };
        // torch applies weight decay to both tensors here: mark both as decayed.
        let params = vec![
            NamedVar {
                name: "w".into(),
                var: w.clone(),
                decay: true,
            },
            NamedVar {
                name: "b".into(),
                var: b.clone(),
                decay: true,
            },
        ];
        let mut opt = AdamW::new(params, config);
        for (g, want) in r["grads"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["steps"].as_array().unwrap())
        {
            let mut grads = GradStore::default();
            grads.insert(w.as_tensor(), tensor(&g["w"]));
            grads.insert(b.as_tensor(), tensor(&g["b"]));
            opt.step(&grads).unwrap();
            assert!(
                max_diff(w.as_tensor(), &tensor(&want["w"])) < 1e-6,
                "{config:?}"
            );
            assert!(
                max_diff(b.as_tensor(), &tensor(&want["b"])) < 1e-6,
                "{config:?}"
            );
        }
    }
}

#[test]
fn schedules_match_transformers() {
    let r = &reference()["schedules"];
    let total = r["total_steps"].as_u64().unwrap();
    for (key, lrs) in r["lrs"].as_object().unwrap() {
        let (name, warmup) = key.split_once('/').unwrap();
        let schedule = LrSchedule {
            kind: name.parse::<ScheduleKind>().unwrap(),
            base_lr: 1.0,
            warmup_steps: warmup.parse().unwrap(),
            total_steps: total,
        };
        for (step, want) in lrs.as_array().unwrap().iter().enumerate() {
            let got = schedule.lr(step as u64);
            assert!(
                (got - want.as_f64().unwrap()).abs() < 1e-12,
                "{key} step {step}: {got} vs {want}"
            );
        }
    }
    assert!(
        "cosine_with_restarts"
            .parse::<ScheduleKind>()
            .unwrap_err()
            .contains("lr_scheduler_type")
    );
}

#[test]
fn clipping_matches_torch() {
    for case in reference()["clip"].as_array().unwrap() {
        let a = Var::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        let c = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let params = vec![NamedVar::new("a", a.clone()), NamedVar::new("c", c.clone())];
        let mut grads = GradStore::default();
        grads.insert(
            a.as_tensor(),
            Tensor::new(&[[0.3f32, -1.2], [2.0, 0.5]], &Device::Cpu).unwrap(),
        );
        grads.insert(
            c.as_tensor(),
            Tensor::new(&[0.7f32, -0.1, 1.5], &Device::Cpu).unwrap(),
        );
        let norm = clip_grad_norm(&params, &mut grads, case["max_norm"].as_f64().unwrap()).unwrap();
        assert!((norm - case["norm"].as_f64().unwrap()).abs() < 1e-5);
        assert!(max_diff(grads.get(a.as_tensor()).unwrap(), &tensor(&case["a"])) < 1e-6);
        assert!(max_diff(grads.get(c.as_tensor()).unwrap(), &tensor(&case["c"])) < 1e-6);
    }
}

/// `max_grad_norm: 0` turns clipping off, as in the HF Trainer (it never reaches torch's
/// `clip_grad_norm_`, which would zero every gradient).
#[test]
fn a_zero_max_norm_turns_clipping_off() {
    let a = Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
    let params = vec![NamedVar::new("a", a.clone())];
    let mut grads = GradStore::default();
    let g = Tensor::new(&[3.0f32, -4.0], &Device::Cpu).unwrap();
    grads.insert(a.as_tensor(), g.clone());
    let norm = clip_grad_norm(&params, &mut grads, 0.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-6);
    assert_eq!(max_diff(grads.get(a.as_tensor()).unwrap(), &g), 0.0);
}

/// The reference Llama with every weight a trainable variable.
fn trainable_llama() -> (CausalLm, Vec<NamedVar>) {
    let dir = testdata().join("hf/llama");
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let mut varmap = VarMap::new();
    let model = CausalLm::load(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    varmap.load(dir.join("model.safetensors")).unwrap();
    let mut params: Vec<NamedVar> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(name, var)| NamedVar::new(name.clone(), var.clone()))
        .collect();
    params.sort_by(|a, b| a.name.cmp(&b.name));
    (model, params)
}

/// Next-token NLL summed over a batch `[b, s]`, divided by `normalizer` tokens.
fn nll(model: &CausalLm, ids: &[Vec<u32>], normalizer: usize) -> Tensor {
    let input = Tensor::new(ids.to_vec(), &Device::Cpu).unwrap();
    let (b, s) = input.dims2().unwrap();
    let logits = model
        .forward(&input.narrow(1, 0, s - 1).unwrap(), None)
        .unwrap();
    let targets = input.narrow(1, 1, s - 1).unwrap().flatten_all().unwrap();
    let lp = candle_nn::ops::log_softmax(&logits.reshape((b * (s - 1), ())).unwrap(), D::Minus1)
        .unwrap();
    let picked = lp.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap();
    (picked.sum_all().unwrap().neg().unwrap() / normalizer as f64).unwrap()
}

fn batch() -> Vec<Vec<u32>> {
    (0..4u32)
        .map(|r| (0..9u32).map(|i| (r * 37 + i * 11 + 5) % 445).collect())
        .collect()
}

#[test]
fn accumulating_four_micro_batches_equals_one_batch_of_four() {
    let (model, params) = trainable_llama();
    let rows = batch();
    let tokens = rows.len() * (rows[0].len() - 1);
    let big = model.backward(&nll(&model, &rows, tokens)).unwrap();
    let mut acc = GradAccumulator::new();
    for row in &rows {
        acc.add(
            &params,
            &model
                .backward(&nll(&model, std::slice::from_ref(row), tokens))
                .unwrap(),
        )
        .unwrap();
    }
    assert_eq!(acc.micro_batches(), 4);
    let summed = acc.take(&params).unwrap();
    for p in &params {
        let (a, b) = (
            big.get(p.var.as_tensor()).unwrap(),
            summed.get(p.var.as_tensor()).unwrap(),
        );
        assert!(max_diff(a, b) < 1e-5, "{}: {}", p.name, max_diff(a, b));
    }
}

#[test]
fn zero_gradient_guard_names_the_cut_parameter() {
    let (model, mut params) = trainable_llama();
    let grads = model.backward(&nll(&model, &batch(), 32)).unwrap();
    ensure_all_have_gradients(&params, &grads).unwrap();
    params.push(NamedVar::new(
        "orphan.weight",
        Var::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
    ));
    let err = ensure_all_have_gradients(&params, &grads)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("orphan.weight") && err.contains("1 of 22"),
        "{err}"
    );
}

/// `steps` optimizer steps on the fixed batch from `start`, returning the losses.
fn train(
    model: &CausalLm,
    params: &[NamedVar],
    opt: &mut Optimizer,
    schedule: &LrSchedule,
    steps: u64,
) -> Vec<f32> {
    let rows = batch();
    let mut losses = Vec::new();
    for _ in 0..steps {
        opt.set_lr(schedule.lr(opt.step_count()));
        let mut acc = GradAccumulator::new();
        let mut total = 0.0;
        for pair in rows.chunks(2) {
            let loss = nll(model, pair, 32);
            total += loss.to_scalar::<f32>().unwrap();
            acc.add(params, &model.backward(&loss).unwrap()).unwrap();
        }
        let mut grads = acc.take(params).unwrap();
        clip_grad_norm(params, &mut grads, 1.0).unwrap();
        opt.step(&grads).unwrap();
        losses.push(total);
    }
    losses
}

#[test]
fn resumed_run_logs_the_same_losses_as_the_uninterrupted_one() {
    let schedule = LrSchedule {
        kind: ScheduleKind::Cosine,
        base_lr: 3e-3,
        warmup_steps: 2,
        total_steps: 6,
    };
    let config = AdamWConfig {
        weight_decay: 0.1,
        ..AdamWConfig::default()
    };

    let (model, params) = trainable_llama();
    let mut opt = Optimizer::AdamW(AdamW::new(params.clone(), config));
    let straight = train(&model, &params, &mut opt, &schedule, 6);
    assert!(
        straight[5] < straight[0],
        "training lowers the loss: {straight:?}"
    );

    let out = tempfile::tempdir().unwrap();
    let (model, params) = trainable_llama();
    let mut opt = Optimizer::AdamW(AdamW::new(params.clone(), config));
    let mut first = train(&model, &params, &mut opt, &schedule, 3);
    let state = TrainerState {
        global_step: 3,
        data_position: 6,
        seed: 7,
        extra: Value::Null,
    };
    Checkpoint::save(out.path(), &params, &opt, &state).unwrap();
    drop((model, params, opt));

    // A fresh process: the model from the original weights, then the checkpoint.
    let (model, params) = trainable_llama();
    let mut opt = Optimizer::AdamW(AdamW::new(params.clone(), config));
    let ckpt = Checkpoint::latest(out.path()).unwrap().unwrap();
    assert_eq!(ckpt.restore(&params, &mut opt).unwrap(), state);
    first.extend(train(&model, &params, &mut opt, &schedule, 3));
    assert_eq!(first, straight, "resumed losses differ");
}

#[test]
fn interrupted_checkpoint_writes_are_never_picked_up() {
    let (_, params) = trainable_llama();
    let opt = Optimizer::AdamW(AdamW::new(params.clone(), AdamWConfig::default()));
    let out = tempfile::tempdir().unwrap();
    let state = TrainerState::default();
    Checkpoint::save(out.path(), &params, &opt, &state).unwrap();
    // A crash mid-write leaves a temporary directory, possibly with a newer step.
    let torn = out.path().join(".checkpoint-9.tmp-1");
    std::fs::create_dir(&torn).unwrap();
    std::fs::write(torn.join("model.safetensors"), b"partial").unwrap();
    // And a directory named like a checkpoint but without its state file.
    std::fs::create_dir(out.path().join("checkpoint-8")).unwrap();
    let latest = Checkpoint::latest(out.path()).unwrap().unwrap();
    assert!(
        latest.dir.ends_with("checkpoint-0"),
        "{}",
        latest.dir.display()
    );
    // Saving the same step again replaces it whole.
    Checkpoint::save(out.path(), &params, &opt, &state).unwrap();
    assert!(
        Checkpoint::latest(out.path())
            .unwrap()
            .unwrap()
            .dir
            .ends_with("checkpoint-0")
    );
}
