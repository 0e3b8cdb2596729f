//! `config.json` → [`ModelConfig`].
//!
//! [`RawConfig`] mirrors the file with every drifting field optional; [`ModelConfig::from_raw`]
//! applies each architecture's transformers defaults and rejects what kiln cannot run, naming the
//! key. Both spellings of RoPE and dtype are read: `rope_theta` + `rope_scaling` + `torch_dtype`
//! (most published checkpoints) and transformers 5's `rope_parameters` + `dtype`.

use std::path::Path;

use candle_core::DType;
use serde::Deserialize;
use serde_json::Value;

use crate::{Error, Result};

/// The model families kiln implements. All share one decoder; they differ in biases and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM`: no biases unless `attention_bias` / `mlp_bias`.
    Llama,
    /// `MistralForCausalLM`: Llama with an optional sliding attention window.
    Mistral,
    /// `Qwen2ForCausalLM`: bias on the q/k/v projections, none on `o_proj`.
    Qwen2,
}

impl Architecture {
    pub const SUPPORTED: &'static str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM";

    pub fn from_hf_name(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" | "LlamaForSequenceClassification" | "LlamaModel" => {
                Some(Self::Llama)
            }
            "MistralForCausalLM" | "MistralForSequenceClassification" | "MistralModel" => {
                Some(Self::Mistral)
            }
            "Qwen2ForCausalLM" | "Qwen2ForSequenceClassification" | "Qwen2Model" => {
                Some(Self::Qwen2)
            }
            _ => None,
        }
    }

    fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "llama" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }

    /// The name transformers writes in `architectures`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// One token id or several (`eos_token_id` is a list in Llama 3 instruct checkpoints).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// `config.json` as found on disk.
#[derive(Debug, Clone, Deserialize)]
pub struct RawConfig {
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub rms_norm_eps: Option<f64>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<TokenIds>,
    #[serde(default)]
    pub torch_dtype: Option<String>,
    #[serde(default)]
    pub dtype: Option<String>,
    /// Mistral's window; Qwen2 uses it only with `use_sliding_window: true`. An explicit `null`
    /// (`Some(Value::Null)`: no window) differs from an absent key (`None`: the default window).
    #[serde(default, deserialize_with = "present")]
    pub sliding_window: Option<Value>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// Qwen2: layers from this index on use the window (when no `layer_types` is given).
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// transformers 5: `"full_attention"` or `"sliding_attention"` per layer.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
}

/// Keeps an explicit `null` as `Some(Value::Null)`, so it can be told apart from a missing key.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// How rotary position embeddings stretch beyond the trained context.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (transformers `rope_type: "linear"`).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// A validated decoder configuration: what the model code reads, with no guessing left.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on `o_proj`.
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// The attention window of the sliding layers (Mistral, Qwen2 with `use_sliding_window`).
    pub sliding_window: Option<usize>,
    /// Per layer: whether it attends within `sliding_window` only.
    pub sliding_layers: Vec<bool>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The dtype the weights were saved in.
    pub dtype: DType,
}

impl ModelConfig {
    /// Reads and resolves `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: RawConfig = crate::read_json(path)?;
        Self::from_raw(raw, path)
    }

    /// Resolves a raw config; `path` is only used to name the file in errors.
    pub fn from_raw(raw: RawConfig, path: &Path) -> Result<Self> {
        let err = |key: &str, message: String| Error::config(path, key, message);
        let architecture = resolve_architecture(&raw, path)?;

        let hidden_act = raw.hidden_act.as_deref().unwrap_or("silu");
        if hidden_act != "silu" {
            return Err(err(
                "hidden_act",
                format!("`{hidden_act}` is not supported (kiln implements `silu`)"),
            ));
        }
        for (key, value) in [
            ("vocab_size", raw.vocab_size),
            ("hidden_size", raw.hidden_size),
            ("intermediate_size", raw.intermediate_size),
            ("num_hidden_layers", raw.num_hidden_layers),
            ("num_attention_heads", raw.num_attention_heads),
        ] {
            if value == 0 {
                return Err(err(key, "must be greater than 0".into()));
            }
        }
        let num_heads = raw.num_attention_heads;
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(num_heads);
        if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(err(
                "num_key_value_heads",
                format!("{num_kv_heads} must divide num_attention_heads ({num_heads})"),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if raw.hidden_size.is_multiple_of(num_heads) => raw.hidden_size / num_heads,
            None => {
                return Err(err(
                    "hidden_size",
                    format!(
                        "{} is not divisible by num_attention_heads ({num_heads}) and no head_dim is given",
                        raw.hidden_size
                    ),
                ));
            }
        };
        if head_dim % 2 != 0 {
            return Err(err(
                "head_dim",
                format!("{head_dim} must be even for rotary embeddings"),
            ));
        }

        let rope = resolve_rope(&raw, path)?;
        let dtype = resolve_dtype(&raw, path)?;

        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            _ => {
                let b = raw.attention_bias.unwrap_or(false);
                (b, b)
            }
        };
        let sliding_window = match architecture {
            Architecture::Llama => None,
            // MistralConfig defaults the window to 4096 when the key is absent.
            Architecture::Mistral => match &raw.sliding_window {
                None => Some(4096),
                Some(v) => window_value(v, path)?,
            },
            Architecture::Qwen2 if raw.use_sliding_window == Some(true) => {
                match &raw.sliding_window {
                    None => Some(4096),
                    Some(v) => window_value(v, path)?,
                }
            }
            Architecture::Qwen2 => None,
        };
        let sliding_layers = match (&raw.layer_types, sliding_window) {
            (_, None) => vec![false; raw.num_hidden_layers],
            (Some(types), Some(_)) => {
                if types.len() != raw.num_hidden_layers {
                    return Err(err(
                        "layer_types",
                        format!(
                            "has {} entries for {} layers",
                            types.len(),
                            raw.num_hidden_layers
                        ),
                    ));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "full_attention" => Ok(false),
                        "sliding_attention" => Ok(true),
                        other => Err(err(
                            "layer_types",
                            format!("unknown layer type `{other}` (expected full_attention or sliding_attention)"),
                        )),
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            (None, Some(_)) => match architecture {
                // Qwen2Config: layers from max_window_layers (default 28) on slide.
                Architecture::Qwen2 => {
                    let from = raw.max_window_layers.unwrap_or(28);
                    (0..raw.num_hidden_layers).map(|i| i >= from).collect()
                }
                _ => vec![true; raw.num_hidden_layers],
            },
        };

        let default_ctx = match architecture {
            Architecture::Llama => 2048,
            Architecture::Mistral => 4096 * 32,
            Architecture::Qwen2 => 32768,
        };

        Ok(Self {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(default_ctx),
            // All three configs default to 1e-6 in transformers.
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            sliding_window: sliding_layers
                .iter()
                .any(|&s| s)
                .then_some(sliding_window)
                .flatten(),
            sliding_layers,
            bos_token_id: raw
                .bos_token_id
                .as_ref()
                .and_then(|t| t.to_vec().first().copied()),
            eos_token_ids: raw
                .eos_token_id
                .as_ref()
                .map(TokenIds::to_vec)
                .unwrap_or_default(),
            pad_token_id: raw
                .pad_token_id
                .as_ref()
                .and_then(|t| t.to_vec().first().copied()),
            dtype,
        })
    }

    /// Number of parameters the weights hold (the LM head counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let mut attn = h * q + 2 * h * kv + q * h;
        if self.qkv_bias {
            attn += q + 2 * kv;
        }
        if self.o_bias {
            attn += h;
        }
        let mut mlp = 3 * h * i;
        if self.mlp_bias {
            mlp += 2 * i + h;
        }
        let layer = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_layers * layer + h + head
    }
}

impl ModelConfig {
    /// `config.json` as transformers 5 writes it (`rope_parameters`, `dtype`), so that
    /// `AutoModelForCausalLM.from_pretrained` and kiln both load the directory.
    pub fn to_hf_json(&self) -> Value {
        let model_type = match self.architecture {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
        };
        let mut rope = serde_json::Map::new();
        rope.insert("rope_theta".into(), self.rope.theta.into());
        match self.rope.scaling {
            RopeScaling::None => {
                rope.insert("rope_type".into(), "default".into());
            }
            RopeScaling::Linear { factor } => {
                rope.insert("rope_type".into(), "linear".into());
                rope.insert("factor".into(), factor.into());
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                rope.insert("rope_type".into(), "llama3".into());
                rope.insert("factor".into(), factor.into());
                rope.insert("low_freq_factor".into(), low_freq_factor.into());
                rope.insert("high_freq_factor".into(), high_freq_factor.into());
                rope.insert(
                    "original_max_position_embeddings".into(),
                    original_max_position_embeddings.into(),
                );
            }
        }
        let dtype = match self.dtype {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            _ => "float32",
        };
        let eos: Value = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => (*one).into(),
            many => many.to_vec().into(),
        };
        let mut out = serde_json::json!({
            "architectures": [self.architecture.hf_name()],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "dtype": dtype,
            "initializer_range": 0.02,
            "use_cache": true,
        });
        if let Some(obj) = out.as_object_mut() {
            match self.architecture {
                Architecture::Llama => {
                    obj.insert("attention_bias".into(), self.qkv_bias.into());
                    obj.insert("mlp_bias".into(), self.mlp_bias.into());
                }
                Architecture::Mistral => {
                    obj.insert("sliding_window".into(), self.sliding_window.into());
                }
                Architecture::Qwen2 => {
                    obj.insert(
                        "use_sliding_window".into(),
                        self.sliding_window.is_some().into(),
                    );
                    obj.insert("sliding_window".into(), self.sliding_window.into());
                }
            }
        }
        out
    }
}

fn resolve_architecture(raw: &RawConfig, path: &Path) -> Result<Architecture> {
    if let Some(first) = raw.architectures.as_ref().and_then(|names| names.first()) {
        return Architecture::from_hf_name(first).ok_or_else(|| {
            Error::config(
                path,
                "architectures",
                format!(
                    "unsupported architecture `{first}`; kiln supports {}",
                    Architecture::SUPPORTED
                ),
            )
        });
    }
    match raw.model_type.as_deref() {
        Some(t) => Architecture::from_model_type(t).ok_or_else(|| {
            Error::config(
                path,
                "model_type",
                format!(
                    "unsupported model type `{t}`; kiln supports {}",
                    Architecture::SUPPORTED
                ),
            )
        }),
        None => Err(Error::config(
            path,
            "architectures",
            "missing (and no `model_type` either)",
        )),
    }
}

fn window_value(v: &Value, path: &Path) -> Result<Option<usize>> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => n.as_u64().map(|w| Some(w as usize)).ok_or_else(|| {
            Error::config(
                path,
                "sliding_window",
                format!("expected a positive integer, found {n}"),
            )
        }),
        other => Err(Error::config(
            path,
            "sliding_window",
            format!("expected an integer or null, found {other}"),
        )),
    }
}

fn resolve_dtype(raw: &RawConfig, path: &Path) -> Result<DType> {
    let (key, name) = match (&raw.dtype, &raw.torch_dtype) {
        (Some(d), _) => ("dtype", d.as_str()),
        (None, Some(d)) => ("torch_dtype", d.as_str()),
        (None, None) => return Ok(DType::F32),
    };
    parse_dtype(name).ok_or_else(|| {
        Error::config(
            path,
            key,
            format!("unsupported dtype `{name}` (expected float32, float16 or bfloat16)"),
        )
    })
}

/// Parses a transformers dtype name (`float16`, `torch.bfloat16`, `bf16`, ...).
pub fn parse_dtype(name: &str) -> Option<DType> {
    match name.trim_start_matches("torch.") {
        "float32" | "float" | "f32" | "fp32" => Some(DType::F32),
        "float16" | "half" | "f16" | "fp16" => Some(DType::F16),
        "bfloat16" | "bf16" => Some(DType::BF16),
        _ => None,
    }
}

fn resolve_rope(raw: &RawConfig, path: &Path) -> Result<RopeConfig> {
    // transformers 5 folds theta and scaling into one `rope_parameters` object.
    let (key, params) = match (&raw.rope_parameters, &raw.rope_scaling) {
        (Some(p @ Value::Object(_)), _) => ("rope_parameters", Some(p)),
        (Some(Value::Null) | None, Some(s @ Value::Object(_))) => ("rope_scaling", Some(s)),
        (Some(Value::Null) | None, Some(Value::Null) | None) => ("rope_scaling", None),
        (Some(other), _) => {
            return Err(Error::config(
                path,
                "rope_parameters",
                format!("expected an object, found {other}"),
            ));
        }
        (_, Some(other)) => {
            return Err(Error::config(
                path,
                "rope_scaling",
                format!("expected an object or null, found {other}"),
            ));
        }
    };
    let num = |obj: &Value, field: &str| -> Result<Option<f64>> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                Error::config(
                    path,
                    &format!("{key}.{field}"),
                    format!("expected a number, found {v}"),
                )
            }),
        }
    };
    let theta = match params {
        Some(p) => num(p, "rope_theta")?,
        None => None,
    }
    .or(raw.rope_theta)
    .unwrap_or(10_000.0);

    let Some(p) = params else {
        return Ok(RopeConfig {
            theta,
            scaling: RopeScaling::None,
        });
    };
    let rope_type = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let required = |field: &str| -> Result<f64> {
        num(p, field)?.ok_or_else(|| {
            Error::config(
                path,
                &format!("{key}.{field}"),
                format!("required for rope_type `{rope_type}`"),
            )
        })
    };
    let scaling = match rope_type {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: required("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: required("factor")?,
            low_freq_factor: required("low_freq_factor")?,
            high_freq_factor: required("high_freq_factor")?,
            original_max_position_embeddings: required("original_max_position_embeddings")?
                as usize,
        },
        other => {
            return Err(Error::config(
                path,
                &format!("{key}.rope_type"),
                format!("`{other}` is not supported (kiln implements default, linear and llama3)"),
            ));
        }
    };
    Ok(RopeConfig { theta, scaling })
}

/// `generation_config.json`: the sampling defaults a checkpoint ships with.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationConfig {
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub do_sample: Option<bool>,
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
}

impl GenerationConfig {
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        let raw: RawConfig = serde_json::from_str(json).expect("raw config parses");
        ModelConfig::from_raw(raw, Path::new("config.json"))
    }

    const BASE: &str = r#""vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2"#;

    #[test]
    fn old_and_new_rope_spellings_agree() {
        let old = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_theta": 500000.0,
            "rope_scaling": {{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
            "torch_dtype": "bfloat16"}}"#
        ))
        .expect("old spelling");
        let new = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_parameters":
            {{"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
            "dtype": "bfloat16"}}"#
        ))
        .expect("new spelling");
        assert_eq!(old, new);
        assert_eq!(new.rope.theta, 500000.0);
        assert_eq!(new.dtype, DType::BF16);
        assert!(matches!(new.rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn linear_scaling_with_legacy_type_key() {
        let c = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_scaling": {{"type": "linear", "factor": 2.0}}}}"#
        ))
        .expect("parses");
        assert_eq!(c.rope.scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(c.rope.theta, 10_000.0);
    }

    #[test]
    fn qwen2_has_qkv_bias_and_mistral_a_window() {
        let q = parse(&format!(
            r#"{{"architectures": ["Qwen2ForCausalLM"], {BASE}}}"#
        ))
        .expect("qwen2");
        assert!(q.qkv_bias && !q.o_bias && q.sliding_window.is_none());
        let m = parse(&format!(
            r#"{{"architectures": ["MistralForCausalLM"], {BASE}, "sliding_window": 256}}"#
        ))
        .expect("mistral");
        assert_eq!(m.sliding_window, Some(256));
        let m = parse(&format!(
            r#"{{"architectures": ["MistralForCausalLM"], {BASE}, "sliding_window": null}}"#
        ))
        .expect("mistral");
        assert_eq!(m.sliding_window, None);
        assert_eq!(m.sliding_layers, vec![false, false]);
    }

    #[test]
    fn qwen2_window_applies_from_max_window_layers_or_layer_types() {
        let q = parse(&format!(
            r#"{{"architectures": ["Qwen2ForCausalLM"], {BASE}, "use_sliding_window": true,
            "sliding_window": 64, "max_window_layers": 1}}"#
        ))
        .expect("qwen2");
        assert_eq!(
            (q.sliding_window, q.sliding_layers),
            (Some(64), vec![false, true])
        );
        let q = parse(&format!(
            r#"{{"architectures": ["Qwen2ForCausalLM"], {BASE}, "use_sliding_window": true,
            "sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"]}}"#
        ))
        .expect("qwen2");
        assert_eq!(q.sliding_layers, vec![true, false]);
        let e = parse(&format!(
            r#"{{"architectures": ["MistralForCausalLM"], {BASE}, "sliding_window": 8,
            "layer_types": ["sliding_attention"]}}"#
        ))
        .unwrap_err();
        assert!(e.to_string().contains("layer_types"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse(&format!(
            r#"{{"architectures": ["GPT2LMHeadModel"], {BASE}}}"#
        ))
        .unwrap_err();
        assert!(
            e.to_string().contains("`architectures`") && e.to_string().contains("GPT2LMHeadModel"),
            "{e}"
        );
        let e = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_scaling": {{"rope_type": "yarn", "factor": 4.0}}}}"#
        ))
        .unwrap_err();
        assert!(
            e.to_string().contains("rope_scaling.rope_type") && e.to_string().contains("yarn"),
            "{e}"
        );
        let e = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_scaling": {{"rope_type": "linear"}}}}"#
        ))
        .unwrap_err();
        assert!(e.to_string().contains("rope_scaling.factor"), "{e}");
        let e = parse(r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3}"#)
        .unwrap_err();
        assert!(e.to_string().contains("num_key_value_heads"), "{e}");
    }

    #[test]
    fn written_config_reads_back_identically() {
        for arch in ["LlamaForCausalLM", "MistralForCausalLM"] {
            let c = parse(&format!(
                r#"{{"architectures": ["{arch}"], {BASE}, "rope_scaling": {{"rope_type": "llama3", "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
                "eos_token_id": [3, 7], "bos_token_id": 1, "sliding_window": 16, "torch_dtype": "bfloat16"}}"#
            ))
            .expect("parses");
            let raw: RawConfig = serde_json::from_value(c.to_hf_json()).expect("raw");
            assert_eq!(
                ModelConfig::from_raw(raw, Path::new("config.json")).expect("valid"),
                c
            );
        }
    }

    #[test]
    fn eos_may_be_a_list() {
        let c = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "eos_token_id": [7, 9], "bos_token_id": 1}}"#
        ))
        .expect("parses");
        assert_eq!(c.eos_token_ids, vec![7, 9]);
        assert_eq!(c.bos_token_id, Some(1));
    }
}
