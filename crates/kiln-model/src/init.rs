//! Fresh weights for a configuration, initialised as transformers' `_init_weights` does for
//! Llama: linear and embedding weights from N(0, `initializer_range`²), norms at one, biases at
//! zero. Seeded (ChaCha8 + Box–Muller), so a seed gives the same model everywhere.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use kiln_core::ModelConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What a parameter is, which decides its initialisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Weight,
    Bias,
    Norm,
}

/// Every parameter of the checkpoint layout, with its shape.
pub fn parameter_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, ParamKind)> {
    use ParamKind::*;
    let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (q, kv) = (cfg.num_heads * d, cfg.num_kv_heads * d);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
        Weight,
    )];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let mut linear = |name: &str, out_f: usize, in_f: usize, bias: bool| {
            out.push((format!("{p}.{name}.weight"), vec![out_f, in_f], Weight));
            if bias {
                out.push((format!("{p}.{name}.bias"), vec![out_f], Bias));
            }
        };
        linear("self_attn.q_proj", q, h, cfg.qkv_bias);
        linear("self_attn.k_proj", kv, h, cfg.qkv_bias);
        linear("self_attn.v_proj", kv, h, cfg.qkv_bias);
        linear("self_attn.o_proj", h, q, cfg.o_bias);
        linear("mlp.gate_proj", i, h, cfg.mlp_bias);
        linear("mlp.up_proj", i, h, cfg.mlp_bias);
        linear("mlp.down_proj", h, i, cfg.mlp_bias);
        out.push((format!("{p}.input_layernorm.weight"), vec![h], Norm));
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Norm,
        ));
    }
    out.push(("model.norm.weight".to_string(), vec![h], Norm));
    if !cfg.tie_word_embeddings {
        out.push((
            "lm_head.weight".to_string(),
            vec![cfg.vocab_size, h],
            Weight,
        ));
    }
    out
}

/// Freshly initialised weights, keyed by checkpoint name.
pub fn init_weights(
    cfg: &ModelConfig,
    initializer_range: f64,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut weights = HashMap::new();
    for (name, shape, kind) in parameter_shapes(cfg) {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = match kind {
            ParamKind::Weight => (0..n)
                .map(|_| (standard_normal(&mut rng) * initializer_range) as f32)
                .collect(),
            ParamKind::Bias => vec![0.0; n],
            ParamKind::Norm => vec![1.0; n],
        };
        let t = Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?;
        weights.insert(name, t);
    }
    Ok(weights)
}

fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    // Box–Muller; 1 - u keeps the logarithm's argument in (0, 1].
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::config::RawConfig;

    #[test]
    fn shapes_cover_every_parameter_once() {
        let raw: RawConfig = serde_json::from_str(
            r#"{"architectures": ["Qwen2ForCausalLM"], "vocab_size": 50, "hidden_size": 32,
            "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "tie_word_embeddings": true}"#,
        )
        .expect("parses");
        let cfg = ModelConfig::from_raw(raw, std::path::Path::new("config.json")).expect("valid");
        let total: usize = parameter_shapes(&cfg)
            .iter()
            .map(|(_, s, _)| s.iter().product::<usize>())
            .sum();
        assert_eq!(total, cfg.num_parameters());
    }
}
