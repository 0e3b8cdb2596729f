//! Shared helpers for the integration tests: the reference fixtures (computed by transformers,
//! PEFT and TRL; see testdata/hf/README.md) and temporary model directories derived from them.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use kiln_model::{LoadOptions, LoadedModel};
use serde_json::Value;

pub fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/hf")
}

pub fn llama_dir() -> PathBuf {
    testdata().join("llama")
}

pub fn lora_dir() -> PathBuf {
    testdata().join("llama-lora")
}

pub fn expected(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("expected.json parses")
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("float list")
        .iter()
        .map(|x| x.as_f64().expect("float") as f32)
        .collect()
}

pub fn load(dir: &Path) -> LoadedModel {
    LoadedModel::load(dir.to_str().expect("utf-8 path"), &LoadOptions::default())
        .expect("model loads")
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Copies every file of `src` into a fresh temporary directory.
pub fn copy_dir(src: &Path) -> tempfile::TempDir {
    let dst = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(src).expect("read dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dst.path().join(entry.file_name())).expect("copy");
    }
    dst
}

pub fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).expect("safetensors loads")
}

pub fn write_tensors(tensors: &HashMap<String, Tensor>, path: &Path) {
    candle_core::safetensors::save(tensors, path).expect("safetensors saves");
}

pub fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let mut v: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    edit(v.as_object_mut().expect("object"));
    std::fs::write(path, serde_json::to_string_pretty(&v).expect("json")).expect("write");
}

/// The fixture model with its weights converted to `dtype` on disk.
pub fn llama_in_dtype(dtype: DType, name: &str) -> tempfile::TempDir {
    let dir = copy_dir(&llama_dir());
    let file = dir.path().join("model.safetensors");
    let converted: HashMap<String, Tensor> = read_tensors(&file)
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(dtype).expect("convert")))
        .collect();
    write_tensors(&converted, &file);
    edit_json(&dir.path().join("config.json"), |c| {
        c.insert("torch_dtype".into(), Value::String(name.into()));
    });
    dir
}

/// Splits a model directory's `model.safetensors` into two shards with an index, as
/// `save_pretrained(max_shard_size=...)` does; returns the shard file names.
pub fn shard_fixture(dir: &Path) -> [String; 2] {
    let all = read_tensors(&dir.join("model.safetensors"));
    std::fs::remove_file(dir.join("model.safetensors")).expect("remove");
    let shard_names = [
        "model-00001-of-00002.safetensors".to_string(),
        "model-00002-of-00002.safetensors".to_string(),
    ];
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    let mut shards = [
        std::collections::HashMap::new(),
        std::collections::HashMap::new(),
    ];
    for (i, name) in names.into_iter().enumerate() {
        shards[i % 2].insert(name.clone(), all[name].clone());
        weight_map.insert(name.clone(), shard_names[i % 2].clone().into());
    }
    for (shard, file) in shards.iter().zip(&shard_names) {
        write_tensors(shard, &dir.join(file));
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string())
        .expect("write index");
    shard_names
}
