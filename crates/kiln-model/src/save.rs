//! Writing models and adapters as the Hugging Face ecosystem reads them.
//!
//! A model directory is what `save_pretrained` writes: `config.json`, `model.safetensors` (with
//! `{"format": "pt"}` metadata, which transformers checks), `generation_config.json` and the
//! tokenizer files, so `AutoModelForCausalLM.from_pretrained(dir)` and `kiln --model dir` both
//! load it. Every file is written to a temporary name and renamed into place, and `config.json`
//! comes last: a crash leaves either a complete directory or one that fails to load with a clear
//! error, never a half-written checkpoint that loads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use kiln_core::{Error, Result};
use serde_json::Value;

use crate::transformer::CausalLm;

/// The files besides config and weights that a model directory may hold and a saved copy needs:
/// generation defaults and every tokenizer format transformers reads.
pub const MODEL_SIDE_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
];

/// Copies every [`MODEL_SIDE_FILES`] entry `base_dir` has into `out` (atomically, file by file)
/// and returns their names: what a saved model or adapter directory needs to serve alone.
pub fn copy_side_files(base_dir: &Path, out: &Path) -> Result<Vec<String>> {
    let mut copied = Vec::new();
    for name in MODEL_SIDE_FILES {
        let src = base_dir.join(name);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(io_err(&src))?;
            write_atomic(&out.join(name), &bytes)?;
            copied.push((*name).to_string());
        }
    }
    Ok(copied)
}

/// What [`save_model_dir`] wrote.
#[derive(Debug, Clone)]
pub struct SavedModel {
    pub dir: PathBuf,
    /// Size of `model.safetensors` in bytes.
    pub weights_bytes: u64,
    pub tensors: usize,
    /// The side files copied from the base directory.
    pub copied: Vec<String>,
}

/// Saves `model`'s dense weights (merge any LoRA first: see [`CausalLm::state_dict`]) as a
/// complete model directory `out`, in `dtype`. `config.json` and the side files
/// ([`MODEL_SIDE_FILES`]) are copied from `base_dir`, with the config's `torch_dtype` (and
/// `dtype`, when present) set to `dtype`.
///
/// `out` is created if needed; an `out` that already holds a `model.safetensors` (or a sharded
/// index) is refused rather than overwritten.
pub fn save_model_dir(
    model: &CausalLm,
    base_dir: &Path,
    out: &Path,
    dtype: DType,
) -> Result<SavedModel> {
    for existing in ["model.safetensors", "model.safetensors.index.json"] {
        let path = out.join(existing);
        if path.exists() {
            return Err(Error::InvalidInput(format!(
                "{}: already exists; refusing to overwrite a saved model (choose a new output directory or remove it)",
                path.display()
            )));
        }
    }
    let base_config = base_dir.join("config.json");
    let mut config: Value = kiln_core::read_json(&base_config)?;
    let Some(fields) = config.as_object_mut() else {
        return Err(Error::config(
            &base_config,
            "config.json",
            "expected a JSON object",
        ));
    };
    let dtype_name = torch_dtype_name(dtype)?;
    fields.insert("torch_dtype".into(), Value::String(dtype_name.into()));
    if fields.contains_key("dtype") {
        fields.insert("dtype".into(), Value::String(dtype_name.into()));
    }

    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let tensors = model
        .state_dict()?
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_dtype(dtype)?)))
        .collect::<Result<Vec<_>>>()?;
    let n_tensors = tensors.len();
    let weights = out.join("model.safetensors");
    write_safetensors(&weights, tensors)?;

    let copied = copy_side_files(base_dir, out)?;
    write_json(&out.join("config.json"), &config)?;
    let weights_bytes = std::fs::metadata(&weights).map_err(io_err(&weights))?.len();
    Ok(SavedModel {
        dir: out.to_path_buf(),
        weights_bytes,
        tensors: n_tensors,
        copied,
    })
}

/// transformers' name of a dtype (`config.json`'s `torch_dtype`).
pub fn torch_dtype_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        other => {
            return Err(Error::InvalidInput(format!(
                "cannot save weights as {other:?}: expected f32, f16 or bf16"
            )));
        }
    })
}

/// Writes `tensors` as one safetensors file with transformers' `{"format": "pt"}` metadata,
/// contiguous and on the CPU, through a temporary file renamed into place.
pub fn write_safetensors(path: &Path, tensors: Vec<(String, Tensor)>) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    let mut cpu = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        if !seen.insert(name.clone()) {
            return Err(Error::InvalidInput(format!(
                "{}: tensor `{name}` listed twice",
                path.display()
            )));
        }
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        cpu.push((name, t));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let tmp = temp_path(path);
    safetensors::serialize_to_file(cpu, Some(metadata), &tmp).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::InvalidInput(format!("{}: writing safetensors: {e}", path.display()))
    })?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Pretty-printed JSON with a trailing newline, written atomically.
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    if let Err(e) = std::fs::write(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(path)(e));
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// `dir/.name.tmp-PID`: hidden, in the same directory (so the rename is atomic), and distinct
/// per process.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

pub(crate) fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}
