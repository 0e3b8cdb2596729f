//! Model directory → GGUF file.

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::quantized::QTensor;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{DType, Device, Tensor};
use kiln_core::{Architecture, Error, ModelConfig, Result, RopeScaling};
use rayon::prelude::*;

use super::{
    ExportProgress, ExportReport, GgufType, Role, TypeFallback, ggml_type_name, rope_permutation,
    tensor_type, vocab,
};
use crate::{LoadOptions, LoadedModel};

/// Loads `model_dir_or_spec` (a model directory or a cached hub id) and writes it to `out` as a
/// GGUF of type `ty`. `progress` is called after each tensor is quantized (from worker threads).
pub fn export_gguf(
    model_dir_or_spec: &str,
    ty: GgufType,
    out: &Path,
    progress: &(dyn Fn(ExportProgress<'_>) + Sync),
) -> Result<ExportReport> {
    let loaded = LoadedModel::load(model_dir_or_spec, &LoadOptions::default())?;
    export_loaded(&loaded, ty, out, progress)
}

/// [`export_gguf`] for a model already loaded (its LoRA adapter, if any, merged).
pub fn export_loaded(
    loaded: &LoadedModel,
    ty: GgufType,
    out: &Path,
    progress: &(dyn Fn(ExportProgress<'_>) + Sync),
) -> Result<ExportReport> {
    let model = &loaded.model;
    let cfg = &loaded.config;
    if model.has_adapters() {
        return Err(Error::InvalidInput(format!(
            "{}: the model carries an unmerged LoRA adapter; merge it (kiln merge) before \
             exporting to GGUF",
            out.display()
        )));
    }
    let arch = match cfg.architecture {
        Architecture::Llama | Architecture::Mistral => "llama",
        Architecture::Qwen2 => "qwen2",
    };

    let tensors = collect_tensors(loaded, arch == "llama")?;
    let total = tensors.len();
    let done = AtomicUsize::new(0);
    let quantized: Vec<(String, QTensor, Option<TypeFallback>)> = tensors
        .into_par_iter()
        .map(|(name, tensor, role)| {
            let cols = tensor.dims().last().copied().unwrap_or(1);
            let (used, wanted) = tensor_type(ty, role, cfg.num_layers, cols);
            let qt = QTensor::quantize(&tensor, used).map_err(|e| {
                Error::InvalidInput(format!(
                    "quantizing tensor `{name}` {:?} to {}: {e}",
                    tensor.dims(),
                    ggml_type_name(used)
                ))
            })?;
            let fallback = wanted.map(|wanted| TypeFallback {
                tensor: name.clone(),
                wanted,
                used,
            });
            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
            progress(ExportProgress {
                done: n,
                total,
                tensor: &name,
            });
            Ok((name, qt, fallback))
        })
        .collect::<Result<_>>()?;

    let metadata = metadata(loaded, arch, ty)?;
    let meta_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        quantized.iter().map(|(n, t, _)| (n.as_str(), t)).collect();

    // Written beside the target and renamed into place, so that a failed export never leaves a
    // truncated file under the requested name.
    let file_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::InvalidInput(format!("{}: not a file path", out.display())))?;
    let partial = out.with_file_name(format!("{file_name}.partial"));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let file = std::fs::File::create(&partial).map_err(io(&partial))?;
    let mut writer = BufWriter::new(file);
    let written = gguf_file::write(&mut writer, &meta_refs, &tensor_refs)
        .map_err(|e| Error::InvalidInput(format!("{}: writing GGUF: {e}", partial.display())))
        .and_then(|()| {
            writer
                .into_inner()
                .map_err(|e| Error::Io {
                    path: partial.clone(),
                    source: e.into_error(),
                })?
                .sync_all()
                .map_err(io(&partial))
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, out).map_err(io(out))?;
    let file_bytes = std::fs::metadata(out).map_err(io(out))?.len();

    let mut tensors_by_type = BTreeMap::new();
    let (mut elements, mut tensor_bytes) = (0u64, 0u64);
    let mut fallbacks = Vec::new();
    for (_, qt, fallback) in quantized {
        *tensors_by_type
            .entry(ggml_type_name(qt.dtype()))
            .or_insert(0) += 1;
        elements += qt.shape().elem_count() as u64;
        tensor_bytes += qt.storage_size_in_bytes() as u64;
        fallbacks.extend(fallback);
    }
    Ok(ExportReport {
        path: out.to_path_buf(),
        architecture: arch,
        file_type: ty,
        tensors_by_type,
        fallbacks,
        elements,
        tensor_bytes,
        file_bytes,
    })
}

/// Every tensor under its GGUF name, in llama.cpp's order, as f32 in the GGUF layout (q/k rows
/// permuted for the `llama` RoPE when `permute_qk`).
fn collect_tensors(loaded: &LoadedModel, permute_qk: bool) -> Result<Vec<(String, Tensor, Role)>> {
    let model = &loaded.model;
    let cfg = &loaded.config;
    let f32 =
        |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?) };
    let permute = |t: Tensor, n_head: usize| -> Result<Tensor> {
        let rows = t.dims().first().copied().unwrap_or(0);
        let from: Vec<u32> = rope_permutation(rows, n_head)
            .into_iter()
            .map(|r| r as u32)
            .collect();
        let idx = Tensor::from_vec(from, rows, &Device::Cpu)?;
        Ok(t.index_select(&idx, 0)?)
    };
    let embed_role = if cfg.tie_word_embeddings {
        Role::Output
    } else {
        Role::Embedding
    };
    let mut out = vec![(
        "token_embd.weight".to_string(),
        f32(&model.embed_tokens)?,
        embed_role,
    )];
    if let RopeScaling::Llama3 { .. } = cfg.rope.scaling {
        out.push((
            "rope_freqs.weight".into(),
            Tensor::new(llama3_rope_factors(cfg).as_slice(), &Device::Cpu)?,
            Role::Vector,
        ));
    }
    for (i, layer) in model.layers.iter().enumerate() {
        let blk = |n: &str| format!("blk.{i}.{n}");
        out.push((
            blk("attn_norm.weight"),
            f32(&layer.input_layernorm.weight)?,
            Role::Vector,
        ));
        let (a, m) = (&layer.self_attn, &layer.mlp);
        let linears = [
            ("attn_q", &a.q_proj, Some(cfg.num_heads), Role::Matrix),
            ("attn_k", &a.k_proj, Some(cfg.num_kv_heads), Role::Matrix),
            (
                "attn_v",
                &a.v_proj,
                None,
                Role::MoreBitsCandidate { layer: i },
            ),
            ("attn_output", &a.o_proj, None, Role::Matrix),
            ("ffn_gate", &m.gate_proj, None, Role::Matrix),
            ("ffn_up", &m.up_proj, None, Role::Matrix),
            (
                "ffn_down",
                &m.down_proj,
                None,
                Role::MoreBitsCandidate { layer: i },
            ),
        ];
        for (name, linear, heads, role) in linears {
            let heads = heads.filter(|_| permute_qk);
            let mut w = linear.dense_weight()?;
            let mut b = linear.bias().map(f32).transpose()?;
            if let Some(n) = heads {
                w = permute(w, n)?;
                b = b.map(|b| permute(b, n)).transpose()?;
            }
            out.push((blk(&format!("{name}.weight")), w, role));
            if let Some(b) = b {
                out.push((blk(&format!("{name}.bias")), b, Role::Vector));
            }
            if name == "attn_output" {
                out.push((
                    blk("ffn_norm.weight"),
                    f32(&layer.post_attention_layernorm.weight)?,
                    Role::Vector,
                ));
            }
        }
    }
    out.push((
        "output_norm.weight".into(),
        f32(&model.norm.weight)?,
        Role::Vector,
    ));
    if !cfg.tie_word_embeddings {
        out.push((
            "output.weight".into(),
            model.lm_head.dense_weight()?,
            Role::Output,
        ));
        if let Some(b) = model.lm_head.bias() {
            out.push(("output.bias".into(), f32(b)?, Role::Vector));
        }
    }
    Ok(out)
}

/// Llama 3.1's RoPE frequency divisors, as llama.cpp's converter stores them in
/// `rope_freqs.weight` (one per rotated pair).
fn llama3_rope_factors(cfg: &ModelConfig) -> Vec<f32> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = cfg.rope.scaling
    else {
        return Vec::new();
    };
    let dim = cfg.head_dim as f64;
    let old = original_max_position_embeddings as f64;
    let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
    (0..cfg.head_dim / 2)
        .map(|i| {
            let freq = 1.0 / cfg.rope.theta.powf(2.0 * i as f64 / dim);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth =
                    (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

fn metadata(loaded: &LoadedModel, arch: &str, ty: GgufType) -> Result<Vec<(String, Value)>> {
    let cfg = &loaded.config;
    let u32_of = |what: &str, v: usize| -> Result<Value> {
        u32::try_from(v)
            .map(Value::U32)
            .map_err(|_| Error::InvalidInput(format!("{what} = {v} does not fit GGUF's u32 field")))
    };
    let name = loaded
        .dir
        .root()
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(name)),
        ("general.file_type".into(), Value::U32(ty.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        // candle's writer pads to 32 bytes; saying so keeps readers from assuming otherwise.
        ("general.alignment".into(), Value::U32(32)),
    ];
    let a = |key: &str| format!("{arch}.{key}");
    for (key, value) in [
        ("context_length", cfg.max_position_embeddings),
        ("embedding_length", cfg.hidden_size),
        ("block_count", cfg.num_layers),
        ("feed_forward_length", cfg.intermediate_size),
        ("attention.head_count", cfg.num_heads),
        ("attention.head_count_kv", cfg.num_kv_heads),
        ("attention.key_length", cfg.head_dim),
        ("attention.value_length", cfg.head_dim),
        ("rope.dimension_count", cfg.head_dim),
        ("vocab_size", cfg.vocab_size),
    ] {
        md.push((a(key), u32_of(key, value)?));
    }
    md.push((
        a("attention.layer_norm_rms_epsilon"),
        Value::F32(cfg.rms_norm_eps as f32),
    ));
    md.push((a("rope.freq_base"), Value::F32(cfg.rope.theta as f32)));
    match cfg.rope.scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            md.push((a("rope.scaling.type"), Value::String("linear".into())));
            md.push((a("rope.scaling.factor"), Value::F32(factor as f32)));
        }
        // llama.cpp applies Llama 3 scaling through `rope_freqs.weight` and has no scaling type
        // for it (an unknown `rope.scaling.type` aborts its loader); kiln keeps the parameters
        // under its own keys to rebuild the config exactly.
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            md.push((
                "kiln.rope.scaling.type".into(),
                Value::String("llama3".into()),
            ));
            md.push(("kiln.rope.scaling.factor".into(), Value::F32(factor as f32)));
            md.push((
                "kiln.rope.scaling.low_freq_factor".into(),
                Value::F32(low_freq_factor as f32),
            ));
            md.push((
                "kiln.rope.scaling.high_freq_factor".into(),
                Value::F32(high_freq_factor as f32),
            ));
            md.push((
                "kiln.rope.scaling.original_context_length".into(),
                u32_of(
                    "original_max_position_embeddings",
                    original_max_position_embeddings,
                )?,
            ));
        }
    }
    if let Some(window) = cfg.sliding_window {
        md.push((
            a("attention.sliding_window"),
            u32_of("sliding_window", window)?,
        ));
        if !cfg.sliding_layers.iter().all(|&s| s) {
            md.push((
                "kiln.attention.sliding_layers".into(),
                Value::Array(cfg.sliding_layers.iter().map(|&s| Value::Bool(s)).collect()),
            ));
        }
    }
    md.extend(vocab::tokenizer_metadata(
        loaded.dir.root(),
        &loaded.tokenizer,
        cfg,
    )?);
    Ok(md)
}
