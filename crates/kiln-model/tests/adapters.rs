//! Adapters in and out: the PEFT fixture adapter loaded unmerged and merged, adapters saved by
//! kiln (LoRA, `modules_to_save`, `"all-linear"`) reloaded with identical outputs and PEFT's exact
//! key set, and merged models saved as model directories.
//!
//! With `KILN_SAVE_ADAPTER_TO=DIR` the tests also leave what they saved under DIR (`adapter/`,
//! `adapter_modules_to_save/`, `adapter_all_linear/`, `merged/`), each with kiln's logits in
//! `kiln_logits.json`, for `scripts/peft_check.py` to load with PEFT and transformers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use kiln_model::{
    CausalLm, Linear, LoadOptions, LoadedModel, LoraAdapter, LoraConfig, LoraLayer, TargetModules,
    save_model_dir,
};
use serde_json::Value;

const PEFT_TOL: f32 = 1e-4;
const MERGE_TOL: f32 = 1e-5;

/// The prompts `scripts/peft_check.py` scores (encoded with BOS, as `tokenizer(text)` does).
const CHECK_PROMPTS: [&str; 3] = [
    "The model learns",
    "A small cat sits near the window and",
    "42 + 17 =",
];

fn with_adapter(adapter: &Path, merge: bool) -> LoadedModel {
    let options = LoadOptions {
        adapter: Some(adapter.to_path_buf()),
        merge_adapter: merge,
        ..LoadOptions::default()
    };
    LoadedModel::load(llama_dir().to_str().unwrap(), &options).expect("model + adapter load")
}

fn load_error(adapter: &Path) -> String {
    let options = LoadOptions {
        adapter: Some(adapter.to_path_buf()),
        ..LoadOptions::default()
    };
    LoadedModel::load(llama_dir().to_str().unwrap(), &options)
        .expect_err("loading must fail")
        .to_string()
}

fn last_logits(model: &CausalLm, prompt: &[u32]) -> Vec<f32> {
    let ids = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .forward_last(&ids, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Logits of every position for `prompt`, `[seq][vocab]`.
fn all_logits(model: &CausalLm, prompt: &[u32]) -> Vec<Vec<f32>> {
    let ids = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .forward(&ids, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn fixture_prompts() -> Vec<Vec<u32>> {
    expected(&lora_dir())["last_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| ids(&c["prompt_ids"]))
        .collect()
}

/// Largest difference of the last-position logits of two models over the fixture prompts.
fn max_logit_diff(a: &CausalLm, b: &CausalLm) -> f32 {
    fixture_prompts()
        .iter()
        .map(|p| max_abs_diff(&last_logits(a, p), &last_logits(b, p)))
        .fold(0.0, f32::max)
}

/// `name → shape` of a safetensors file.
fn shapes(path: &Path) -> BTreeMap<String, Vec<usize>> {
    read_tensors(path)
        .into_iter()
        .map(|(k, t)| (k, t.dims().to_vec()))
        .collect()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Where to leave a saved artefact for the PEFT peer check, when asked to.
fn peer_check_dir(name: &str) -> Option<PathBuf> {
    let root = PathBuf::from(std::env::var_os("KILN_SAVE_ADAPTER_TO")?);
    let dir = root.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&root).unwrap();
    Some(dir)
}

/// Writes kiln's logits for [`CHECK_PROMPTS`] beside a saved artefact, in the JSON shape
/// `scripts/peft_check.py` prints.
fn write_kiln_logits(m: &LoadedModel, dir: &Path) {
    let prompts: Vec<Value> = CHECK_PROMPTS
        .iter()
        .map(|text| {
            let ids = m.tokenizer.encode(text, true).unwrap();
            serde_json::json!({"text": text, "ids": ids, "logits": all_logits(&m.model, &ids)})
        })
        .collect();
    let out = serde_json::json!({ "prompts": prompts });
    std::fs::write(dir.join("kiln_logits.json"), out.to_string()).unwrap();
}

#[test]
fn peft_fixture_adapter_matches_peft_unmerged_and_merged() {
    let unmerged = with_adapter(&lora_dir(), false);
    let merged = with_adapter(&lora_dir(), true);
    let base = load(&llama_dir());
    for case in expected(&lora_dir())["last_logits"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let want = floats(&case["logits"]);
        let got_unmerged = last_logits(&unmerged.model, &prompt);
        let got_merged = last_logits(&merged.model, &prompt);
        let d = max_abs_diff(&got_unmerged, &want);
        assert!(d < PEFT_TOL, "unmerged vs PEFT: max |Δlogit| = {d}");
        let d = max_abs_diff(&got_merged, &want);
        assert!(d < PEFT_TOL, "merged vs PEFT: max |Δlogit| = {d}");
        let d = max_abs_diff(&got_merged, &got_unmerged);
        assert!(d < MERGE_TOL, "merged vs unmerged: max |Δlogit| = {d}");
        // The adapter does change the model, by far more than the tolerances.
        assert!(max_abs_diff(&last_logits(&base.model, &prompt), &want) > 1e-2);
    }
}

#[test]
fn adapter_saved_by_kiln_has_peft_keys_and_reloads_identically() {
    let m = with_adapter(&lora_dir(), false);
    let loaded = m.adapter.as_ref().unwrap();
    let adapter = LoraAdapter::from_model(&m.model, loaded.config.clone()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("adapter");
    adapter.save(&out).unwrap();

    // Exactly the fixture's keys and shapes: nothing missing, nothing unexpected.
    assert_eq!(
        shapes(&out.join("adapter_model.safetensors")),
        shapes(&lora_dir().join("adapter_model.safetensors"))
    );
    // The tensors themselves are the fixture's, bit for bit (f32 in, f32 out).
    let ours = read_tensors(&out.join("adapter_model.safetensors"));
    for (name, theirs) in read_tensors(&lora_dir().join("adapter_model.safetensors")) {
        let a: Vec<f32> = ours[&name].flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = theirs.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b, "{name}");
    }
    // The config has what PEFT needs to rebuild the same LoRA model.
    let config = read_json(&out.join("adapter_config.json"));
    for (key, want) in [
        ("peft_type", serde_json::json!("LORA")),
        ("task_type", serde_json::json!("CAUSAL_LM")),
        ("r", serde_json::json!(4)),
        ("lora_alpha", serde_json::json!(8)),
        ("target_modules", serde_json::json!(["q_proj", "v_proj"])),
        ("bias", serde_json::json!("none")),
        ("use_rslora", serde_json::json!(false)),
        ("use_dora", serde_json::json!(false)),
        ("fan_in_fan_out", serde_json::json!(false)),
        ("inference_mode", serde_json::json!(true)),
        ("modules_to_save", Value::Null),
        ("layers_to_transform", Value::Null),
        ("layers_pattern", Value::Null),
        ("revision", Value::Null),
        ("rank_pattern", serde_json::json!({})),
        ("alpha_pattern", serde_json::json!({})),
    ] {
        assert_eq!(config[key], want, "adapter_config.json `{key}`");
    }
    for key in [
        "base_model_name_or_path",
        "lora_dropout",
        "init_lora_weights",
        "peft_version",
    ] {
        assert!(
            config.get(key).is_some(),
            "adapter_config.json lacks `{key}`"
        );
    }
    assert!(out.join("README.md").is_file());
    // No temporary file is left behind.
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");

    let reloaded = with_adapter(&out, false);
    let d = max_logit_diff(&m.model, &reloaded.model);
    assert!(d <= 1e-6, "reloaded vs original: max |Δlogit| = {d}");

    // Saving over an existing adapter replaces it.
    adapter.save(&out).unwrap();
    assert!(max_logit_diff(&m.model, &with_adapter(&out, false).model) <= 1e-6);

    if let Some(dir) = peer_check_dir("adapter") {
        adapter.save(&dir).unwrap();
        write_kiln_logits(&m, &dir);
    }
}

#[test]
fn modules_to_save_round_trip_through_save_and_load() {
    let mut m = with_adapter(&lora_dir(), false);
    let prompts = fixture_prompts();
    let before: Vec<Vec<f32>> = prompts.iter().map(|p| last_logits(&m.model, p)).collect();
    // "Train" the LM head: a deterministic change of every weight.
    for (path, linear) in m.model.linears_mut() {
        if path == "lm_head" {
            let w = match linear.weight() {
                kiln_model::LinearWeight::Dense(w) => w.clone(),
                _ => unreachable!(),
            };
            let n = w.elem_count();
            let bump = Tensor::arange(0f32, n as f32, &Device::Cpu)
                .unwrap()
                .affine(1.0 / n as f64, -0.5)
                .unwrap()
                .reshape(w.shape())
                .unwrap();
            let lora = linear.lora().cloned();
            *linear = Linear::new((w + bump).unwrap(), None).unwrap();
            if let Some(l) = lora {
                linear.set_lora(l).unwrap();
            }
        }
    }
    let changed: Vec<Vec<f32>> = prompts.iter().map(|p| last_logits(&m.model, p)).collect();
    assert!(
        max_abs_diff(&before[0], &changed[0]) > 1e-2,
        "the head changed"
    );

    let mut config = m.adapter.as_ref().unwrap().config.clone();
    config.modules_to_save = vec!["lm_head".into()];
    let adapter = LoraAdapter::from_model(&m.model, config).unwrap();
    assert_eq!(
        adapter.saved_modules.keys().collect::<Vec<_>>(),
        ["lm_head.weight"]
    );
    let tmp = tempfile::tempdir().unwrap();
    adapter.save(tmp.path()).unwrap();
    let saved = shapes(&tmp.path().join("adapter_model.safetensors"));
    assert_eq!(saved["base_model.model.lm_head.weight"], [445, 64]);
    assert!(!saved.keys().any(|k| k.contains("modules_to_save")));
    assert_eq!(
        read_json(&tmp.path().join("adapter_config.json"))["modules_to_save"],
        serde_json::json!(["lm_head"])
    );

    // Unmerged, the reloaded model computes exactly what was saved; merged, within rounding
    // (these logits are ~10x the fixture's, and so is the rounding of the merged weights).
    for (merge, tol) in [(false, 1e-6), (true, PEFT_TOL)] {
        let reloaded = with_adapter(tmp.path(), merge);
        for (p, want) in prompts.iter().zip(&changed) {
            let d = max_abs_diff(&last_logits(&reloaded.model, p), want);
            assert!(d <= tol, "merge={merge}: max |Δlogit| = {d}");
        }
    }
    if let Some(dir) = peer_check_dir("adapter_modules_to_save") {
        adapter.save(&dir).unwrap();
        write_kiln_logits(&with_adapter(&dir, false), &dir);
    }
}

#[test]
fn all_linear_adapter_is_saved_with_the_module_paths_peft_writes() {
    let mut m = load(&llama_dir());
    let config = LoraConfig::new(2, 4.0, TargetModules::AllLinear);
    for (i, (path, linear)) in m.model.linears_mut().into_iter().enumerate() {
        if !config.targets(&path) {
            continue;
        }
        let (in_f, out_f) = (linear.in_features(), linear.out_features());
        let a = Tensor::randn(0f32, 0.3, (2, in_f), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 0.3, (out_f, 2), &Device::Cpu)
            .unwrap()
            .affine(1.0 + i as f64 / 10.0, 0.0)
            .unwrap();
        linear
            .set_lora(LoraLayer::new(a, b, config.scale_for(&path)))
            .unwrap();
    }
    let adapter = LoraAdapter::from_model(&m.model, config).unwrap();
    let TargetModules::Names(names) = &adapter.config.target_modules else {
        panic!(
            "all-linear not resolved: {:?}",
            adapter.config.target_modules
        );
    };
    assert_eq!(names.len(), 14);
    assert!(names.contains(&"model.layers.1.mlp.down_proj".to_string()));
    assert!(!names.iter().any(|n| n.contains("lm_head")));

    let tmp = tempfile::tempdir().unwrap();
    adapter.save(tmp.path()).unwrap();
    assert_eq!(
        shapes(&tmp.path().join("adapter_model.safetensors")).len(),
        28
    );
    let reloaded = with_adapter(tmp.path(), false);
    let d = max_logit_diff(&m.model, &reloaded.model);
    assert!(d <= 1e-6, "max |Δlogit| = {d}");
    if let Some(dir) = peer_check_dir("adapter_all_linear") {
        adapter.save(&dir).unwrap();
        write_kiln_logits(&m, &dir);
    }
}

#[test]
fn merged_model_dir_reloads_and_matches_the_unmerged_adapter() {
    let unmerged = with_adapter(&lora_dir(), false);
    let merged = with_adapter(&lora_dir(), true);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let saved = save_model_dir(&merged.model, &llama_dir(), &out, DType::F32).unwrap();
    assert_eq!(saved.tensors, 2 + 2 * 2 + 2 * 7 + 1);
    for file in [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        assert!(out.join(file).is_file(), "{file} not written");
    }
    assert_eq!(
        read_json(&out.join("config.json"))["torch_dtype"],
        "float32"
    );
    // The saved weights are the base's names and shapes, nothing more.
    assert_eq!(
        shapes(&out.join("model.safetensors")),
        shapes(&llama_dir().join("model.safetensors"))
    );

    let reloaded = load(&out);
    let d = max_logit_diff(&reloaded.model, &unmerged.model);
    assert!(d < MERGE_TOL, "merged dir vs unmerged adapter: {d}");
    let want = floats(&expected(&lora_dir())["last_logits"][0]["logits"]);
    let d = max_abs_diff(&last_logits(&reloaded.model, &fixture_prompts()[0]), &want);
    assert!(d < PEFT_TOL, "merged dir vs PEFT: {d}");

    // A second save into the same directory is refused and names the file.
    let err = save_model_dir(&merged.model, &llama_dir(), &out, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("already exists"),
        "{err}"
    );

    // In bf16: the config says so and the weights are stored so.
    let out16 = tmp.path().join("merged-bf16");
    save_model_dir(&merged.model, &llama_dir(), &out16, DType::BF16).unwrap();
    assert_eq!(
        read_json(&out16.join("config.json"))["torch_dtype"],
        "bfloat16"
    );
    assert!(
        read_tensors(&out16.join("model.safetensors"))
            .values()
            .all(|t| t.dtype() == DType::BF16)
    );

    if let Some(dir) = peer_check_dir("merged") {
        save_model_dir(&merged.model, &llama_dir(), &dir, DType::F32).unwrap();
        write_kiln_logits(&unmerged, &dir);
    }
}

#[test]
fn adapter_tensor_that_is_neither_lora_nor_a_saved_module_is_named() {
    let dir = copy_dir(&lora_dir());
    let file = dir.path().join("adapter_model.safetensors");
    let mut tensors = read_tensors(&file);
    let stray = "base_model.model.model.norm.weight";
    tensors.insert(
        stray.into(),
        Tensor::ones(64, DType::F32, &Device::Cpu).unwrap(),
    );
    write_tensors(&tensors, &file);
    let msg = load_error(dir.path());
    assert!(
        msg.contains(stray) && msg.contains("modules_to_save") && msg.contains("lists none"),
        "{msg}"
    );

    // Listed in modules_to_save, the same tensor is accepted and replaces the base's norm.
    edit_json(&dir.path().join("adapter_config.json"), |c| {
        c.insert("modules_to_save".into(), serde_json::json!(["norm"]));
    });
    let m = with_adapter(dir.path(), false);
    assert_eq!(
        m.adapter
            .as_ref()
            .unwrap()
            .saved_modules
            .keys()
            .collect::<Vec<_>>(),
        ["model.norm.weight"]
    );
    assert!(max_logit_diff(&m.model, &with_adapter(&lora_dir(), false).model) > 1e-3);
}

#[test]
fn saved_module_the_base_lacks_or_misshaped_is_named() {
    let dir = copy_dir(&lora_dir());
    let file = dir.path().join("adapter_model.safetensors");
    edit_json(&dir.path().join("adapter_config.json"), |c| {
        c.insert("modules_to_save".into(), serde_json::json!(["lm_head"]));
    });
    let mut tensors = read_tensors(&file);
    let name = "base_model.model.lm_head.weight";
    tensors.insert(
        name.into(),
        Tensor::zeros((400, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    write_tensors(&tensors, &file);
    let msg = load_error(dir.path());
    assert!(
        msg.contains(name) && msg.contains("[445, 64]") && msg.contains("[400, 64]"),
        "{msg}"
    );

    tensors.remove(name);
    tensors.insert(
        "base_model.model.lm_head.bias".into(),
        Tensor::zeros(445, DType::F32, &Device::Cpu).unwrap(),
    );
    write_tensors(&tensors, &file);
    let msg = load_error(dir.path());
    assert!(
        msg.contains("lm_head.bias") && msg.contains("do not have"),
        "{msg}"
    );
}

#[test]
fn adapter_taken_from_a_model_must_match_its_config() {
    let m = with_adapter(&lora_dir(), false);
    let config = m.adapter.as_ref().unwrap().config.clone();
    let check = |edit: &dyn Fn(&mut LoraConfig), words: &[&str]| {
        let mut c = config.clone();
        edit(&mut c);
        let msg = LoraAdapter::from_model(&m.model, c)
            .unwrap_err()
            .to_string();
        for w in words {
            assert!(msg.contains(w), "`{w}` not in: {msg}");
        }
    };
    check(
        &|c| c.target_modules = TargetModules::Names(vec!["q_proj".into()]),
        &["model.layers.0.self_attn.v_proj", "does not match"],
    );
    check(
        &|c| {
            c.target_modules =
                TargetModules::Names(vec!["q_proj".into(), "v_proj".into(), "k_proj".into()])
        },
        &["model.layers.0.self_attn.k_proj", "no LoRA update"],
    );
    check(&|c| c.r = 8, &["rank-4", "rank 8"]);
    check(&|c| c.lora_alpha = 16.0, &["scale 2", "gives it 4"]);
    check(
        &|c| c.modules_to_save = vec!["no_such_module".into()],
        &["modules_to_save", "no_such_module"],
    );
    let base = load(&llama_dir());
    let msg = LoraAdapter::from_model(&base.model, config)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("no LoRA update"), "{msg}");
}

/// The first element's address of a CPU f32 tensor's storage.
fn storage_address(t: &Tensor) -> usize {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            cpu.as_slice::<f32>().unwrap()[layout.start_offset()..].as_ptr() as usize
        }
        _ => unreachable!("the tests run on the CPU"),
    }
}

/// DPO's and PPO's reference in a LoRA run is the base with the adapter removed: it must compute
/// the base model's outputs and hold no second copy of any weight.
#[test]
fn without_adapters_is_the_base_on_the_same_storage() {
    let with = with_adapter(&lora_dir(), false);
    let base = LoadedModel::load(llama_dir().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let reference = with.model.without_adapters();
    assert!(with.model.has_adapters());
    assert!(!reference.has_adapters());

    let ids = Tensor::new(&[[1u32, 57, 90, 12, 200]], &Device::Cpu).unwrap();
    let want = base.model.forward(&ids, None).unwrap();
    let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = flat(want);
    let got = flat(reference.forward(&ids, None).unwrap());
    assert!(max_abs_diff(&got, &want) < 1e-6);
    let adapted = flat(with.model.forward(&ids, None).unwrap());
    assert!(
        max_abs_diff(&adapted, &want) > 1e-4,
        "the adapter changes the outputs"
    );

    let policy = with.model.state_dict().unwrap();
    let frozen = reference.state_dict().unwrap();
    assert_eq!(policy.len(), frozen.len());
    for ((name, a), (_, b)) in policy.iter().zip(&frozen) {
        assert_eq!(
            storage_address(a),
            storage_address(b),
            "{name} is copied, not shared"
        );
    }
}
