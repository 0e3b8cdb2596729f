//! GGUF file → [`LoadedModel`].

use std::collections::HashMap;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::QTensor;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use kiln_core::config::RawConfig;
use kiln_core::{Error, GenerationConfig, ModelConfig, ModelDir, Result, Tokenizer};
use serde_json::{Value as Json, json};

use super::blocks::{is_packable, to_codes};
use super::{f32_as_written, gguf_module, invert, rope_permutation, vocab};
use crate::{CausalLm, Linear, LoadOptions, LoadedModel, LoraAdapter};

/// Loads a GGUF file as a model: the config from the `{arch}.*` metadata, the tokenizer from
/// `tokenizer.huggingface.json` (or rebuilt from `tokenizer.ggml.*`), the weights from the
/// tensors (packed where their type converts exactly, dense otherwise).
pub fn load_gguf(path: &Path, options: &LoadOptions) -> Result<LoadedModel> {
    let (content, mut reader) = open(path)?;
    let md = &content.metadata;
    let arch = match md.get("general.architecture") {
        Some(Value::String(a)) => a.clone(),
        Some(other) => {
            return Err(Error::config(
                path,
                "general.architecture",
                format!("expected a string, found {other:?}"),
            ));
        }
        None => {
            return Err(Error::config(
                path,
                "general.architecture",
                "missing; every GGUF model names its architecture",
            ));
        }
    };
    if arch != "llama" && arch != "qwen2" {
        return Err(Error::config(
            path,
            "general.architecture",
            format!(
                "`{arch}` is not supported; kiln loads `llama` (Llama, Mistral) and `qwen2` models"
            ),
        ));
    }
    let config = model_config(&content, &arch, path)?;
    let device = &options.device;
    let dtype = options.dtype.unwrap_or(match device {
        Device::Cpu => DType::F32,
        _ => config.dtype,
    });
    let permute_qk = arch == "llama";

    // Vectors and the embedding go to a VarBuilder under their Hugging Face names; matrices stay
    // quantized until the linear loader below converts them.
    let mut dense = HashMap::new();
    let mut matrices: HashMap<String, QTensor> = HashMap::new();
    for name in content.tensor_infos.keys() {
        let Some((hf_module, suffix)) = hf_name(name) else {
            continue;
        };
        let qt = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(|e| invalid(path, format!("tensor `{name}`: {e}")))?;
        let is_linear = suffix == "weight"
            && qt.shape().rank() == 2
            && !matches!(hf_module.as_str(), "model.embed_tokens");
        if is_linear {
            matrices.insert(hf_module, qt);
            continue;
        }
        let mut t = qt.dequantize(&Device::Cpu)?;
        if let Some(n_head) = qk_heads(&hf_module, &config).filter(|_| permute_qk) {
            t = unpermute_rows(&t, n_head)?;
        }
        dense.insert(
            format!("{hf_module}.{suffix}"),
            t.to_dtype(dtype)?.to_device(device)?,
        );
    }
    let vb = VarBuilder::from_tensors(dense, dtype, device);

    let loader = |vb: VarBuilder, in_f: usize, out_f: usize, bias: bool| {
        let module = vb.prefix();
        let gguf = gguf_module(&module).unwrap_or_else(|| module.clone());
        let qt = matrices.get(&module).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: tensor `{gguf}.weight` not found",
                path.display()
            ))
        })?;
        if qt.shape().dims() != [out_f, in_f] {
            candle_core::bail!(
                "{}: tensor `{gguf}.weight`: expected shape [{out_f}, {in_f}], found {:?}",
                path.display(),
                qt.shape().dims()
            );
        }
        let heads = qk_heads(&module, &config).filter(|_| permute_qk);
        let bias = if bias {
            Some(vb.get(out_f, "bias")?)
        } else {
            None
        };
        if is_packable(qt.dtype()) {
            let data = qt.data()?;
            let mut codes = to_codes(qt.dtype(), &data, out_f, in_f).map_err(|m| {
                candle_core::Error::Msg(format!("{}: tensor `{gguf}.weight`: {m}", path.display()))
            })?;
            if let Some(n_head) = heads {
                codes = codes.gather_rows(&invert(&rope_permutation(out_f, n_head)));
            }
            Ok(Linear::from_packed(codes.into_packed()?, bias))
        } else {
            let mut w = qt.dequantize(&Device::Cpu)?;
            if let Some(n_head) = heads {
                w = unpermute_rows(&w, n_head)?;
            }
            Linear::new(w.to_dtype(dtype)?.to_device(device)?, bias)
        }
    };
    let mut model = CausalLm::load_with_linears(vb, &config, &loader)?;

    let adapter = match &options.adapter {
        Some(dir) => {
            let adapter = LoraAdapter::load(dir, dtype, device)?;
            if !adapter.saved_modules.is_empty() {
                return Err(Error::Adapter {
                    path: dir.clone(),
                    message: format!(
                        "has modules_to_save weights ({}), which cannot replace tensors of a \
                         GGUF base model",
                        adapter
                            .saved_modules
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
            adapter.apply(&mut model)?;
            if options.merge_adapter {
                model.merge_lora()?;
            }
            Some(adapter)
        }
        None => None,
    };

    let json = vocab::tokenizer_json(md, path)?;
    let chat_template = match md.get("tokenizer.chat_template") {
        Some(Value::String(t)) => Some(t.as_str()),
        _ => None,
    };
    let tokenizer =
        Tokenizer::from_json_str(&json, path, vocab::special_tokens(md), chat_template)?;

    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_string_lossy().into_owned(),
        _ => ".".to_string(),
    };
    Ok(LoadedModel {
        dir: ModelDir::resolve(&parent)?,
        config,
        generation_config: GenerationConfig::default(),
        model,
        tokenizer,
        adapter,
    })
}

fn invalid(path: &Path, message: String) -> Error {
    Error::InvalidInput(format!("{}: {message}", path.display()))
}

/// Opens and parses the header, telling "not a GGUF" apart from "a damaged GGUF".
fn open(path: &Path) -> Result<(Content, BufReader<std::fs::File>)> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(io)?;
    if n < 4 || &magic != b"GGUF" {
        return Err(invalid(
            path,
            format!(
                "not a GGUF file: it starts with {:?}, expected the magic \"GGUF\"",
                String::from_utf8_lossy(&magic[..n])
            ),
        ));
    }
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| {
        invalid(
            path,
            format!("cannot read the GGUF header (truncated or corrupt file?): {e}"),
        )
    })?;
    Ok((content, reader))
}

/// The Hugging Face module and parameter (`weight`/`bias`) of a GGUF tensor name, for the
/// tensors kiln's decoder has; `None` for others (`rope_freqs.weight`).
fn hf_name(gguf: &str) -> Option<(String, &str)> {
    let (module, suffix) = gguf.rsplit_once('.')?;
    let hf = match module {
        "token_embd" => "model.embed_tokens".to_string(),
        "output_norm" => "model.norm".to_string(),
        "output" => "lm_head".to_string(),
        _ => {
            let rest = module.strip_prefix("blk.")?;
            let (layer, name) = rest.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            let hf = match name {
                "attn_norm" => "input_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                _ => return None,
            };
            format!("model.layers.{layer}.{hf}")
        }
    };
    matches!(suffix, "weight" | "bias").then_some((hf, suffix))
}

/// The head count of a q or k projection (whose rows the `llama` GGUF layout permutes).
fn qk_heads(hf_module: &str, cfg: &ModelConfig) -> Option<usize> {
    if hf_module.ends_with("self_attn.q_proj") {
        Some(cfg.num_heads)
    } else if hf_module.ends_with("self_attn.k_proj") {
        Some(cfg.num_kv_heads)
    } else {
        None
    }
}

fn unpermute_rows(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let rows = t.dims().first().copied().unwrap_or(0);
    let from: Vec<u32> = invert(&rope_permutation(rows, n_head))
        .into_iter()
        .map(|r| r as u32)
        .collect();
    t.index_select(&Tensor::from_vec(from, rows, t.device())?, 0)
}

/// Reads a metadata value as an integer, naming the key when it is not one.
fn meta_u64(md: &HashMap<String, Value>, key: &str, path: &Path) -> Result<Option<u64>> {
    let v = match md.get(key) {
        None => return Ok(None),
        Some(v) => v,
    };
    let n = match v {
        Value::U8(x) => Some(u64::from(*x)),
        Value::U16(x) => Some(u64::from(*x)),
        Value::U32(x) => Some(u64::from(*x)),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    };
    n.map(Some).ok_or_else(|| {
        Error::config(
            path,
            key,
            format!("expected a non-negative integer, found {v:?}"),
        )
    })
}

fn meta_f64(md: &HashMap<String, Value>, key: &str, path: &Path) -> Result<Option<f64>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::F32(x)) => Ok(Some(f32_as_written(*x))),
        Some(Value::F64(x)) => Ok(Some(*x)),
        Some(_) => meta_u64(md, key, path).map(|v| v.map(|v| v as f64)),
    }
}

/// The config, as the `config.json` the metadata describes, resolved by kiln's config code.
fn model_config(content: &Content, arch: &str, path: &Path) -> Result<ModelConfig> {
    let md = &content.metadata;
    let key = |k: &str| format!("{arch}.{k}");
    let required = |k: &str| -> Result<u64> {
        meta_u64(md, &key(k), path)?.ok_or_else(|| {
            Error::config(path, &key(k), "missing; kiln needs it to build the model")
        })
    };
    let embd = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| Error::MissingTensor {
            name: "token_embd.weight".into(),
            location: path.display().to_string(),
        })?;
    let vocab_size = embd.shape.dims().first().copied().unwrap_or(0);
    let has = |name: &str| content.tensor_infos.contains_key(name);
    let window = meta_u64(md, &key("attention.sliding_window"), path)?;
    let sliding_layers: Option<Vec<bool>> = match md.get("kiln.attention.sliding_layers") {
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .map(|v| matches!(v, Value::Bool(true)))
                .collect(),
        ),
        _ => None,
    };
    let hf_arch = match (arch, window) {
        ("qwen2", _) => "Qwen2ForCausalLM",
        (_, Some(_)) => "MistralForCausalLM",
        _ => "LlamaForCausalLM",
    };
    let token = |k: &str| meta_u64(md, &format!("tokenizer.ggml.{k}_token_id"), path);

    let mut cfg = json!({
        "architectures": [hf_arch],
        "vocab_size": vocab_size,
        "hidden_size": required("embedding_length")?,
        "intermediate_size": required("feed_forward_length")?,
        "num_hidden_layers": required("block_count")?,
        "num_attention_heads": required("attention.head_count")?,
        "num_key_value_heads": meta_u64(md, &key("attention.head_count_kv"), path)?,
        "head_dim": meta_u64(md, &key("attention.key_length"), path)?,
        "max_position_embeddings": meta_u64(md, &key("context_length"), path)?,
        "rms_norm_eps": meta_f64(md, &key("attention.layer_norm_rms_epsilon"), path)?,
        "rope_theta": meta_f64(md, &key("rope.freq_base"), path)?,
        "rope_scaling": rope_scaling(content, arch, path)?,
        "tie_word_embeddings": !has("output.weight"),
        "attention_bias": has("blk.0.attn_q.bias"),
        "mlp_bias": has("blk.0.ffn_gate.bias"),
        "bos_token_id": token("bos")?,
        "eos_token_id": token("eos")?,
        "pad_token_id": token("padding")?,
        "torch_dtype": "float32",
    });
    if let (Some(obj), Some(w)) = (cfg.as_object_mut(), window) {
        obj.insert("sliding_window".into(), w.into());
        obj.insert("use_sliding_window".into(), true.into());
        match sliding_layers {
            Some(layers) => {
                let types: Vec<&str> = layers
                    .iter()
                    .map(|&s| {
                        if s {
                            "sliding_attention"
                        } else {
                            "full_attention"
                        }
                    })
                    .collect();
                obj.insert("layer_types".into(), types.into());
            }
            None => {
                obj.insert("max_window_layers".into(), 0.into());
            }
        }
    }
    let raw: RawConfig = serde_json::from_value(cfg).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    ModelConfig::from_raw(raw, path)
}

/// `rope_scaling` for the config: linear from `{arch}.rope.scaling.*`, Llama 3 from kiln's own
/// keys (llama.cpp stores only the resulting `rope_freqs.weight`, which kiln cannot invert).
fn rope_scaling(content: &Content, arch: &str, path: &Path) -> Result<Json> {
    let md = &content.metadata;
    let text = |k: &str| match md.get(k) {
        Some(Value::String(s)) => Some(s.as_str()),
        _ => None,
    };
    if text("kiln.rope.scaling.type") == Some("llama3") {
        let num = |k: &str| {
            let k = format!("kiln.rope.scaling.{k}");
            meta_f64(md, &k, path)?.ok_or_else(|| Error::config(path, &k, "missing"))
        };
        return Ok(json!({
            "rope_type": "llama3",
            "factor": num("factor")?,
            "low_freq_factor": num("low_freq_factor")?,
            "high_freq_factor": num("high_freq_factor")?,
            "original_max_position_embeddings": num("original_context_length")?,
        }));
    }
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(Error::config(
            path,
            "rope_freqs.weight",
            "per-frequency RoPE factors (Llama 3.1-style scaling) without kiln's \
             `kiln.rope.scaling.*` keys: kiln cannot recover the scaling parameters",
        ));
    }
    let type_key = format!("{arch}.rope.scaling.type");
    let factor_key = format!("{arch}.rope.scaling.factor");
    match text(&type_key) {
        Some("none") => Ok(Json::Null),
        // llama.cpp reads a missing type as "linear", which a factor of 1 leaves a no-op.
        None if meta_f64(md, &factor_key, path)?.is_none_or(|f| f == 1.0) => Ok(Json::Null),
        None | Some("linear") => {
            let factor = meta_f64(md, &factor_key, path)?.ok_or_else(|| {
                Error::config(path, &factor_key, "missing for linear RoPE scaling")
            })?;
            Ok(json!({"rope_type": "linear", "factor": factor}))
        }
        Some(other) => Err(Error::config(
            path,
            &type_key,
            format!("`{other}` is not supported (kiln implements none, linear and llama3)"),
        )),
    }
}
