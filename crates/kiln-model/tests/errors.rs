//! Broken model directories, checkpoints and adapters: each must fail with an error (never a
//! panic) whose message names the file, key or tensor at fault and, for shapes, what was expected
//! versus what was found. Every case breaks a temporary copy of the fixture in one way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use common::*;
use kiln_model::{LoadOptions, LoadedModel};

/// The message of the error `LoadedModel::load` must return.
fn load_error(dir: &Path, options: &LoadOptions) -> String {
    match LoadedModel::load(dir.to_str().expect("utf-8 path"), options) {
        Ok(_) => panic!("loading {} should have failed", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn base_load_error(dir: &Path) -> String {
    load_error(dir, &LoadOptions::default())
}

/// Loads the intact fixture with the adapter at `adapter` and returns the error.
fn adapter_load_error(adapter: &Path) -> String {
    let options = LoadOptions {
        adapter: Some(adapter.to_path_buf()),
        ..LoadOptions::default()
    };
    load_error(&llama_dir(), &options)
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for part in parts {
        assert!(msg.contains(part), "error message lacks {part:?}: {msg}");
    }
}

/// Rewrites the fixture copy's `model.safetensors` through `edit`.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
    let file = dir.join("model.safetensors");
    let mut tensors = read_tensors(&file);
    edit(&mut tensors);
    write_tensors(&tensors, &file);
}

#[test]
fn intact_fixture_copy_loads() {
    // The baseline every case below breaks: a plain copy must load, or the other tests prove nothing.
    let dir = copy_dir(&llama_dir());
    let m = load(dir.path());
    assert_eq!(m.config.num_layers, 2);
}

#[test]
fn missing_config_json_is_named() {
    let dir = copy_dir(&llama_dir());
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let msg = base_load_error(dir.path());
    assert_mentions(&msg, &["config.json", "missing"]);
}

#[test]
fn broken_config_json_names_the_file() {
    let dir = copy_dir(&llama_dir());
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"],"#,
    )
    .unwrap();
    let msg = base_load_error(dir.path());
    let path = dir.path().join("config.json");
    assert_mentions(&msg, &[path.to_str().unwrap(), "invalid JSON"]);
}

#[test]
fn unknown_architecture_names_the_key_and_the_value() {
    let dir = copy_dir(&llama_dir());
    edit_json(&dir.path().join("config.json"), |c| {
        c.insert(
            "architectures".into(),
            serde_json::json!(["GPT2LMHeadModel"]),
        );
    });
    let msg = base_load_error(dir.path());
    assert_mentions(
        &msg,
        &[
            "config.json",
            "`architectures`",
            "GPT2LMHeadModel",
            "LlamaForCausalLM",
        ],
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_dir(&llama_dir());
    edit_weights(dir.path(), |t| {
        t.remove("model.layers.1.mlp.up_proj.weight")
            .expect("fixture has the tensor");
    });
    let msg = base_load_error(dir.path());
    assert_mentions(
        &msg,
        &[
            "model.layers.1.mlp.up_proj.weight",
            "not found",
            "model.safetensors",
        ],
    );
}

#[test]
fn misshaped_tensor_names_expected_and_found_shapes() {
    let dir = copy_dir(&llama_dir());
    edit_weights(dir.path(), |t| {
        let name = "model.layers.0.self_attn.q_proj.weight";
        let narrowed = t[name].narrow(1, 0, 32).unwrap().contiguous().unwrap();
        t.insert(name.to_string(), narrowed);
    });
    let msg = base_load_error(dir.path());
    assert_mentions(
        &msg,
        &[
            "model.layers.0.self_attn.q_proj.weight",
            "model.safetensors",
            "[64, 64]",
            "[64, 32]",
        ],
    );
    // Expected first, found second: a message with the two swapped would mislead.
    assert!(msg.find("[64, 64]") < msg.find("[64, 32]"), "{msg}");
}

#[test]
fn missing_tokenizer_json_is_named() {
    let dir = copy_dir(&llama_dir());
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let msg = base_load_error(dir.path());
    assert_mentions(&msg, &["tokenizer.json", "missing"]);
}

#[test]
fn no_weights_at_all_says_what_was_looked_for() {
    let dir = copy_dir(&llama_dir());
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let msg = base_load_error(dir.path());
    assert_mentions(
        &msg,
        &[
            dir.path().to_str().unwrap(),
            "model.safetensors",
            "model.safetensors.index.json",
        ],
    );
    assert!(
        !msg.contains("pytorch_model.bin"),
        "no .bin there, so no .bin hint: {msg}"
    );

    // A PyTorch pickle is present but never read: the message says how to fix it.
    std::fs::write(dir.path().join("pytorch_model.bin"), b"not read").unwrap();
    let msg = base_load_error(dir.path());
    assert_mentions(&msg, &["pytorch_model.bin", "safetensors"]);
}

#[test]
fn weights_file_that_is_not_safetensors_is_named() {
    let dir = copy_dir(&llama_dir());
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"definitely not a safetensors header",
    )
    .unwrap();
    let msg = base_load_error(dir.path());
    assert_mentions(&msg, &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn sharded_index_naming_a_missing_shard_names_the_shard_and_the_index() {
    let dir = copy_dir(&llama_dir());
    let [_, second] = shard_fixture(dir.path());
    std::fs::remove_file(dir.path().join(&second)).unwrap();
    let msg = base_load_error(dir.path());
    assert_mentions(&msg, &["model.safetensors.index.json", &second, "missing"]);
}

#[test]
fn tensor_missing_from_every_shard_is_named() {
    let dir = copy_dir(&llama_dir());
    let [first, second] = shard_fixture(dir.path());
    let name = "model.norm.weight";
    for shard in [&first, &second] {
        let path = dir.path().join(shard);
        let mut tensors = read_tensors(&path);
        tensors.remove(name);
        write_tensors(&tensors, &path);
    }
    let msg = base_load_error(dir.path());
    assert_mentions(&msg, &[name, "not found", "2 shards"]);
}

/// A copy of the fixture adapter, with its config edited by `edit`.
fn adapter_copy(
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> tempfile::TempDir {
    let dir = copy_dir(&lora_dir());
    edit_json(&dir.path().join("adapter_config.json"), edit);
    dir
}

#[test]
fn intact_adapter_copy_loads() {
    let dir = adapter_copy(|_| {});
    let options = LoadOptions {
        adapter: Some(dir.path().to_path_buf()),
        ..LoadOptions::default()
    };
    let m = LoadedModel::load(llama_dir().to_str().unwrap(), &options).expect("adapter copy loads");
    assert_eq!(m.adapter.expect("adapter kept").modules.len(), 4);
}

#[test]
fn adapter_targeting_a_module_the_model_lacks_names_it() {
    let dir = adapter_copy(|c| {
        c.insert(
            "target_modules".into(),
            serde_json::json!(["q_proj", "nonexistent_proj"]),
        );
    });
    let msg = adapter_load_error(dir.path());
    assert_mentions(
        &msg,
        &[
            dir.path().to_str().unwrap(),
            "target_modules",
            "nonexistent_proj",
        ],
    );
    // And it lists what the model does have, so the typo is easy to spot.
    assert_mentions(&msg, &["q_proj", "down_proj"]);
}

#[test]
fn adapter_weight_with_wrong_shape_names_the_tensor_and_both_shapes() {
    let dir = copy_dir(&lora_dir());
    let file = dir.path().join("adapter_model.safetensors");
    let name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    let mut tensors = read_tensors(&file);
    let b = tensors[name]
        .narrow(0, 0, 32)
        .unwrap()
        .contiguous()
        .unwrap();
    assert_eq!(b.dims(), [32, 4]);
    tensors.insert(name.to_string(), b);
    write_tensors(&tensors, &file);
    let msg = adapter_load_error(dir.path());
    assert_mentions(
        &msg,
        &[name, "adapter_model.safetensors", "[64, 4]", "[32, 4]"],
    );
    assert!(
        msg.find("[64, 4]") < msg.find("[32, 4]"),
        "expected shape first: {msg}"
    );
}

#[test]
fn adapter_dir_without_weights_says_which_file_is_missing() {
    let dir = copy_dir(&lora_dir());
    std::fs::remove_file(dir.path().join("adapter_model.safetensors")).unwrap();
    let msg = adapter_load_error(dir.path());
    assert_mentions(
        &msg,
        &[
            dir.path().to_str().unwrap(),
            "missing adapter_model.safetensors",
        ],
    );
    assert!(!msg.contains("adapter_model.bin"), "{msg}");

    std::fs::write(dir.path().join("adapter_model.bin"), b"not read").unwrap();
    let msg = adapter_load_error(dir.path());
    assert_mentions(&msg, &["adapter_model.bin", "safe_serialization"]);
}

#[test]
fn adapter_dir_without_config_is_named() {
    let dir = copy_dir(&lora_dir());
    std::fs::remove_file(dir.path().join("adapter_config.json")).unwrap();
    let msg = adapter_load_error(dir.path());
    assert_mentions(&msg, &[dir.path().to_str().unwrap(), "adapter_config.json"]);
}

#[test]
fn nonexistent_model_path_is_named() {
    let parent = tempfile::tempdir().unwrap();
    let absent: PathBuf = parent.path().join("no-such-model");
    let msg = base_load_error(&absent);
    assert_mentions(&msg, &[absent.to_str().unwrap(), "no such directory"]);
}

#[test]
fn model_path_that_is_a_file_is_rejected() {
    let dir = copy_dir(&llama_dir());
    let file = dir.path().join("config.json");
    let msg = base_load_error(&file);
    assert_mentions(&msg, &[file.to_str().unwrap(), "is a file"]);
}

#[test]
fn hub_id_not_in_the_cache_says_where_it_looked_and_that_kiln_does_not_download() {
    let cache = tempfile::tempdir().unwrap();
    let err =
        kiln_core::ModelDir::from_hf_cache("nobody/nothing", cache.path()).expect_err("not cached");
    let msg = err.to_string();
    let looked = cache.path().join("models--nobody--nothing");
    assert_mentions(
        &msg,
        &[
            "nobody/nothing",
            looked.to_str().unwrap(),
            "does not download",
        ],
    );

    // A cached repo without the requested revision is reported as such.
    std::fs::create_dir_all(cache.path().join("models--nobody--nothing/snapshots/abc")).unwrap();
    let err = kiln_core::ModelDir::from_hf_cache("nobody/nothing@v2", cache.path())
        .expect_err("no revision");
    assert_mentions(&err.to_string(), &["revision `v2`", "snapshots"]);
}

#[test]
fn token_id_outside_the_vocabulary_is_an_error() {
    let m = load(&llama_dir());
    let ids = Tensor::new(&[[1u32, 445]], m.model.device()).unwrap();
    let err = m
        .model
        .forward(&ids, None)
        .expect_err("id 445 is past the vocabulary of 445");
    assert!(err.to_string().contains("445"), "{err}");
}

#[test]
fn empty_input_is_an_error_not_a_panic() {
    // `forward_last` computes `seq_len - 1`, which would underflow on an empty sequence; today an
    // earlier op (the RoPE kernel) rejects the empty input first. Either way: an Err, not a panic.
    let m = load(&llama_dir());
    let ids = Tensor::zeros((1, 0), candle_core::DType::U32, m.model.device()).unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        m.model.forward_last(&ids, None)
    }));
    match result {
        Ok(r) => assert!(r.is_err(), "an empty sequence has no last position"),
        Err(_) => {
            panic!("forward_last panicked on an empty sequence instead of returning an error")
        }
    }
}
