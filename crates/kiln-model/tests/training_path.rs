//! The forward pass is differentiable end to end: with `Var`-backed weights the model takes the
//! composed (differentiable) ops, every parameter receives a gradient, the gradient is the
//! loss's true slope, and the logits are those of the fused inference path. A LoRA pair attached
//! to a frozen model is trained the same way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::*;
use kiln_core::ModelConfig;
use kiln_model::{CausalLm, LinearWeight, LoraLayer};

/// A batch of two sequences of eight fixture token ids, `[2, 8]`.
fn batch() -> Tensor {
    let ids: [[u32; 8]; 2] = [
        [0, 407, 404, 385, 190, 6, 410, 254],
        [0, 138, 307, 12, 99, 200, 3, 41],
    ];
    Tensor::new(&ids, &Device::Cpu).expect("ids")
}

/// Mean next-token cross-entropy of `logits` (`[batch, seq, vocab]`) against `ids` shifted by one.
fn next_token_loss(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, s, v) = logits.dims3()?;
    let inputs = logits.narrow(1, 0, s - 1)?.reshape((b * (s - 1), v))?;
    let targets = ids.narrow(1, 1, s - 1)?.flatten_all()?;
    candle_nn::loss::cross_entropy(&inputs, &targets)
}

/// The loss of `model` on `ids` as a number.
fn loss_value(model: &CausalLm, ids: &Tensor) -> Result<f32> {
    next_token_loss(&model.forward(ids, None)?, ids)?.to_scalar::<f32>()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn abs_sum(t: &Tensor) -> Result<f32> {
    t.abs()?.sum_all()?.to_scalar::<f32>()
}

/// The fixture as trainable variables: built from a `VarMap`, then filled with the fixture's values.
fn trainable_fixture() -> Result<(VarMap, CausalLm)> {
    let cfg = ModelConfig::from_file(&llama_dir().join("config.json")).expect("fixture config");
    let mut varmap = VarMap::new();
    let model = CausalLm::load(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        &cfg,
    )?;
    varmap.load(llama_dir().join("model.safetensors"))?;
    Ok((varmap, model))
}

/// Checks a gradient against finite differences: moving every var by `eps` along the unit
/// gradient direction must change the loss at the rate |g| (the directional derivative).
fn assert_gradient_is_the_slope(
    vars: &[Var],
    grads: &[Tensor],
    loss: impl Fn() -> Result<f32>,
    eps: f64,
    what: &str,
) -> Result<()> {
    let mut sq = 0.0f64;
    for g in grads {
        sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
    }
    let norm = sq.sqrt();
    assert!(norm > 0.0, "{what}: zero gradient");
    let originals = vars
        .iter()
        .map(|v| v.as_tensor().copy())
        .collect::<Result<Vec<_>>>()?;
    let shift = |sign: f64| -> Result<f32> {
        for ((var, orig), g) in vars.iter().zip(&originals).zip(grads) {
            var.set(&(orig + (g * (sign * eps / norm))?)?)?;
        }
        loss()
    };
    let (up, down) = (shift(1.0)?, shift(-1.0)?);
    for (var, orig) in vars.iter().zip(&originals) {
        var.set(orig)?;
    }
    let slope = (f64::from(up) - f64::from(down)) / (2.0 * eps);
    let rel = (slope - norm).abs() / norm;
    assert!(
        rel < 2e-2,
        "{what}: finite-difference slope {slope} vs |grad| {norm} (rel. error {rel})"
    );
    Ok(())
}

#[test]
fn every_parameter_gets_a_gradient() {
    let (varmap, model) = trainable_fixture().unwrap();
    let n_file = read_tensors(&llama_dir().join("model.safetensors")).len();
    assert_eq!(
        varmap.all_vars().len(),
        n_file,
        "one variable per checkpoint tensor"
    );

    let ids = batch();
    let logits = model.forward(&ids, None).unwrap();
    assert_eq!(logits.dims(), [2, 8, 445]);
    let loss = next_token_loss(&logits, &ids).unwrap();
    let grads = model.backward(&loss).unwrap();

    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut missing = Vec::new();
    for name in names {
        let var = &data[name];
        match grads.get(var.as_tensor()) {
            Some(g) => {
                assert_eq!(g.dims(), var.dims(), "{name}: gradient shape");
                let s = abs_sum(g).unwrap();
                if !(s > 0.0 && s.is_finite()) {
                    missing.push(format!("{name} (|grad| sum {s})"));
                }
            }
            None => missing.push(format!("{name} (no gradient)")),
        }
    }
    assert!(
        missing.is_empty(),
        "parameters without a usable gradient: {missing:?}"
    );
}

/// Every parameter's gradient in `a` and `b` agrees to `rel` of its largest magnitude.
fn assert_same_gradients(varmap: &VarMap, a: &GradStore, b: &GradStore, rel: f32, what: &str) {
    let max_abs = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let (x, y) = (
            a.get(var.as_tensor()).expect("gradient"),
            b.get(var.as_tensor()).expect("gradient"),
        );
        let (diff, scale) = (max_abs(&(x - y).unwrap()), max_abs(y));
        assert!(
            diff <= rel * scale.max(1e-3),
            "{name}: {what} gradients differ by {diff} (scale {scale})"
        );
    }
}

/// The fused decoder-layer op and the layer composed of separately differentiable ops give the
/// same loss and the same gradient for every parameter.
#[test]
fn fused_layers_match_the_composed_layers() {
    let (varmap, mut model) = trainable_fixture().unwrap();
    let ids = batch();
    let loss = next_token_loss(&model.forward(&ids, None).unwrap(), &ids).unwrap();
    let fused = model.backward(&loss).unwrap();
    model.set_fused_layers(false);
    let loss_ref = next_token_loss(&model.forward(&ids, None).unwrap(), &ids).unwrap();
    let composed = model.backward(&loss_ref).unwrap();
    let (a, b) = (
        loss.to_scalar::<f32>().unwrap(),
        loss_ref.to_scalar::<f32>().unwrap(),
    );
    assert!((a - b).abs() < 1e-5, "loss {a} vs {b}");
    assert_same_gradients(&varmap, &fused, &composed, 1e-4, "fused and composed");
}

/// Weight gradients of a backward pass that went around `CausalLm::backward` are dropped at the
/// next forward pass, not added to the next step's.
#[test]
fn a_bypassed_backward_leaves_nothing_for_the_next_step() {
    let (varmap, model) = trainable_fixture().unwrap();
    let ids = batch();
    let loss = |m: &CausalLm| next_token_loss(&m.forward(&ids, None).unwrap(), &ids).unwrap();
    let clean = model.backward(&loss(&model)).unwrap();
    let _bypassed = loss(&model).backward().unwrap();
    let after = model.backward(&loss(&model)).unwrap();
    assert_same_gradients(&varmap, &after, &clean, 1e-6, "next step's and clean");
}

/// A detached view computes the same logits without a graph and follows in-place updates of the
/// trained variables.
#[test]
fn a_detached_view_follows_the_variables_without_a_graph() {
    let (varmap, model) = trainable_fixture().unwrap();
    let view = model.detached();
    let ids = batch();
    let (trained, viewed) = (
        model.forward(&ids, None).unwrap(),
        view.forward(&ids, None).unwrap(),
    );
    assert!(trained.track_op() && !viewed.track_op());
    let diff = (&trained - &viewed)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    let norm = varmap.data().lock().unwrap()["model.norm.weight"].clone();
    norm.set(&(norm.as_tensor() * 2.0).unwrap()).unwrap();
    let after = view.forward(&ids, None).unwrap();
    let moved = (&after - &viewed)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(
        moved.to_scalar::<f32>().unwrap() > 1e-3,
        "the view saw the update"
    );
}

/// `token_nll` (LM head and cross-entropy fused) equals the cross-entropy of `forward`'s logits,
/// in value and in every parameter's gradient.
#[test]
fn token_nll_matches_the_logits_cross_entropy() {
    let (varmap, model) = trainable_fixture().unwrap();
    let ids = batch();
    let (b, s) = ids.dims2().unwrap();
    let inputs = ids.narrow(1, 0, s - 1).unwrap();
    let targets = ids.narrow(1, 1, s - 1).unwrap().flatten_all().unwrap();
    let fused = model.token_nll(&inputs, &targets).unwrap();
    let logits = model.forward(&inputs, None).unwrap();
    let composed =
        kiln_model::ops::cross_entropy_rows(&logits.reshape((b * (s - 1), ())).unwrap(), &targets)
            .unwrap();
    let diff = (&fused - &composed).unwrap().abs().unwrap();
    assert!(diff.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5);
    let gf = model.backward(&fused.sum_all().unwrap()).unwrap();
    let gc = model.backward(&composed.sum_all().unwrap()).unwrap();
    assert_same_gradients(&varmap, &gf, &gc, 1e-5, "fused and composed loss");
}

#[test]
fn gradient_matches_finite_differences() {
    let (varmap, model) = trainable_fixture().unwrap();
    let ids = batch();
    let logits = model.forward(&ids, None).unwrap();
    let grads = model
        .backward(&next_token_loss(&logits, &ids).unwrap())
        .unwrap();
    let vars = varmap.all_vars();
    let g: Vec<Tensor> = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).expect("gradient").clone())
        .collect();
    assert_gradient_is_the_slope(
        &vars,
        &g,
        || loss_value(&model, &ids),
        1e-2,
        "all parameters",
    )
    .unwrap();
}

#[test]
fn var_backed_logits_equal_fused_inference_logits() {
    let (_varmap, trainable) = trainable_fixture().unwrap();
    let inference = load(&llama_dir()).model;
    let ids = batch();
    let composed = trainable.forward(&ids, None).unwrap();
    let fused = inference.forward(&ids, None).unwrap();
    // The two really took different paths: only the first records a graph.
    assert!(composed.track_op() && !fused.track_op());
    let diff = max_abs_diff(
        &composed.flatten_all().unwrap().to_vec1().unwrap(),
        &fused.flatten_all().unwrap().to_vec1().unwrap(),
    );
    assert!(
        diff < 1e-4,
        "max |Δlogit| between training and inference paths = {diff}"
    );
}

/// Deterministic, non-zero `[rows, cols]` values of magnitude about `scale`.
fn filled(rows: usize, cols: usize, scale: f32, salt: f32) -> Tensor {
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| scale * (0.61 * i as f32 + salt).sin())
        .collect();
    Tensor::from_vec(values, (rows, cols), &Device::Cpu).expect("tensor")
}

#[test]
fn lora_on_a_frozen_model_trains_a_and_b_only() {
    let mut model = load(&llama_dir()).model;
    let target = "model.layers.0.self_attn.q_proj";
    // B starts non-zero (unlike PEFT's init) so that A's gradient is not zero too.
    let a = Var::from_tensor(&filled(4, 64, 0.1, 0.3)).unwrap();
    let b = Var::from_tensor(&filled(64, 4, 0.1, 1.7)).unwrap();
    let mut base_weight = None;
    for (name, linear) in model.linears_mut() {
        if name == target {
            linear
                .set_lora(LoraLayer::new(
                    a.as_tensor().clone(),
                    b.as_tensor().clone(),
                    2.0,
                ))
                .unwrap();
            if let LinearWeight::Dense(w) = linear.weight() {
                base_weight = Some(w.clone());
            }
        }
    }
    let base_weight = base_weight.expect("q_proj of layer 0 exists and is dense");

    let ids = batch();
    let logits = model.forward(&ids, None).unwrap();
    let grads = model
        .backward(&next_token_loss(&logits, &ids).unwrap())
        .unwrap();
    for (which, var) in [("A", &a), ("B", &b)] {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("lora {which} has no gradient"));
        assert_eq!(g.dims(), var.dims());
        assert!(abs_sum(g).unwrap() > 0.0, "lora {which}: zero gradient");
    }
    assert!(
        grads.get(&base_weight).is_none(),
        "the frozen base weight must not get a gradient"
    );

    let vars = [a.clone(), b.clone()];
    let g: Vec<Tensor> = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).expect("gradient").clone())
        .collect();
    assert_gradient_is_the_slope(&vars, &g, || loss_value(&model, &ids), 1e-2, "LoRA A and B")
        .unwrap();
}

/// A fresh all-linear adapter (rank 4, dropout 0.1) on the frozen fixture, with B moved off
/// zero so that A's gradient is not zero either.
fn frozen_with_trainable_lora() -> (CausalLm, Vec<kiln_model::lora_train::LoraVar>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adapter_config.json");
    std::fs::write(
        &path,
        r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
            "target_modules": "all-linear"}"#,
    )
    .unwrap();
    let config = kiln_model::LoraConfig::from_file(&path).unwrap();
    let mut model = load(&llama_dir()).model;
    let vars = kiln_model::lora_train::attach_trainable_lora(&mut model, &config, 3).unwrap();
    for (i, v) in vars.iter().enumerate() {
        if v.name.ends_with("lora_B.weight") {
            let (rows, cols) = v.var.dims2().unwrap();
            v.var.set(&filled(rows, cols, 0.05, i as f32)).unwrap();
        }
    }
    (model, vars)
}

/// With adapters on every linear and dropout on, the fused layer op and the composed layers
/// give the same loss and the same adapter gradients (the same masks are drawn on both paths),
/// and no frozen weight gets a gradient.
#[test]
fn lora_trains_the_same_through_fused_and_composed_layers() {
    let ids = batch();
    let (fused_model, fused_vars) = frozen_with_trainable_lora();
    let (mut composed_model, composed_vars) = frozen_with_trainable_lora();
    composed_model.set_fused_layers(false);
    assert_eq!(
        fused_vars.len(),
        2 * 7 * 2,
        "A and B on 7 linears of 2 layers"
    );
    for _ in 0..2 {
        // Twice: the second pass draws new dropout masks, on both paths alike.
        let loss = next_token_loss(&fused_model.forward(&ids, None).unwrap(), &ids).unwrap();
        let fused = fused_model.backward(&loss).unwrap();
        let loss_ref = next_token_loss(&composed_model.forward(&ids, None).unwrap(), &ids).unwrap();
        let composed = composed_model.backward(&loss_ref).unwrap();
        let (a, b) = (
            loss.to_scalar::<f32>().unwrap(),
            loss_ref.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-5, "loss {a} vs {b}");
        for (name, weight) in fused_model.state_dict().unwrap() {
            assert!(fused.get(&weight).is_none(), "frozen {name} got a gradient");
        }
        for (fv, cv) in fused_vars.iter().zip(&composed_vars) {
            let x = fused.get(fv.var.as_tensor()).expect("fused gradient");
            let y = composed.get(cv.var.as_tensor()).expect("composed gradient");
            let scale = y
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let diff = max_diff(x, y);
            assert!(scale > 0.0, "{}: zero gradient", fv.name);
            assert!(
                diff <= 1e-4 * scale.max(1e-3),
                "{}: fused and composed gradients differ by {diff} (scale {scale})",
                fv.name
            );
        }
    }
}

/// Without dropout, a fresh PEFT-initialised adapter leaves the model's output unchanged (B is
/// zero) and A is uniform on ±1/√in.
#[test]
fn fresh_adapters_start_as_the_identity() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adapter_config.json");
    std::fs::write(
        &path,
        r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}"#,
    )
    .unwrap();
    let config = kiln_model::LoraConfig::from_file(&path).unwrap();
    let base = load(&llama_dir()).model;
    let mut adapted = base.clone();
    let vars = kiln_model::lora_train::attach_trainable_lora(&mut adapted, &config, 0).unwrap();
    assert_eq!(vars.len(), 2 * 2 * 2);
    let ids = batch();
    let (x, y) = (
        base.forward(&ids, None).unwrap(),
        adapted.detached().forward(&ids, None).unwrap(),
    );
    assert_eq!(max_diff(&x, &y), 0.0, "B = 0 adds exactly nothing");
    for v in &vars {
        let values: Vec<f32> = v.var.flatten_all().unwrap().to_vec1().unwrap();
        if v.name.ends_with("lora_A.weight") {
            let bound = 1.0 / 64f32.sqrt();
            assert!(values.iter().all(|x| x.abs() <= bound));
            assert!(values.iter().any(|x| x.abs() > 0.5 * bound));
        } else {
            assert!(values.iter().all(|&x| x == 0.0));
        }
    }
    let err = {
        std::fs::write(
            &path,
            r#"{"peft_type": "LORA", "r": 8, "target_modules": ["q_prj"]}"#,
        )
        .unwrap();
        let config = kiln_model::LoraConfig::from_file(&path).unwrap();
        let mut m = base.clone();
        kiln_model::lora_train::attach_trainable_lora(&mut m, &config, 0)
            .unwrap_err()
            .to_string()
    };
    assert!(err.contains("`q_prj`") && err.contains("q_proj"), "{err}");
}
