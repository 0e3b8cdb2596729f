//! Mistral, Qwen2 and the config variants the Llama fixture does not exercise (tied embeddings,
//! linear RoPE scaling, a sliding window). There is no reference output for them, so these tests
//! check self-consistency on random weights: the KV cache against full recomputation, the window
//! against the receptive field it implies, biases and scalings against the same model without
//! them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, read_tensors, write_tensors};
use kiln_core::{ModelConfig, SafetensorsWeights};
use kiln_model::CausalLm;
use kiln_model::init::init_weights;
use serde_json::{Value, json};

const VOCAB: u32 = 97;
const SEQ: [u32; 12] = [5, 61, 17, 88, 2, 40, 73, 9, 96, 33, 58, 21];

/// A small config of `architecture` with `extra` keys merged in.
fn config_json(architecture: &str, extra: Value) -> Value {
    let mut c = json!({
        "architectures": [architecture],
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "torch_dtype": "float32",
    });
    let obj = c.as_object_mut().expect("object");
    for (k, v) in extra.as_object().expect("extra is an object") {
        obj.insert(k.clone(), v.clone());
    }
    c
}

/// A checkpoint on disk: `config.json` + `model.safetensors`.
struct Checkpoint {
    dir: tempfile::TempDir,
    cfg: ModelConfig,
}

impl Checkpoint {
    fn weights_path(&self) -> PathBuf {
        self.dir.path().join("model.safetensors")
    }

    fn tensors(&self) -> HashMap<String, Tensor> {
        read_tensors(&self.weights_path())
    }

    fn load(&self) -> kiln_core::Result<CausalLm> {
        load_model(&self.weights_path(), &self.cfg)
    }

    fn model(&self) -> CausalLm {
        self.load().expect("model loads")
    }

    /// The same config with the weights rewritten by `edit`.
    fn with_weights(&self, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> Checkpoint {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::copy(
            self.dir.path().join("config.json"),
            dir.path().join("config.json"),
        )
        .expect("copy");
        let mut tensors = self.tensors();
        edit(&mut tensors);
        write_tensors(&tensors, &dir.path().join("model.safetensors"));
        Checkpoint {
            dir,
            cfg: self.cfg.clone(),
        }
    }
}

fn load_model(weights: &Path, cfg: &ModelConfig) -> kiln_core::Result<CausalLm> {
    let vb = SafetensorsWeights::open(&[weights.to_path_buf()])?
        .into_var_builder(DType::F32, &Device::Cpu);
    Ok(CausalLm::load(vb, cfg)?)
}

/// Writes `config` and seeded random weights (see `init_weights`), edited by `edit`.
fn checkpoint(
    config: &Value,
    seed: u64,
    edit: impl FnOnce(&mut HashMap<String, Tensor>),
) -> Checkpoint {
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = dir.path().join("config.json");
    std::fs::write(
        &config_path,
        serde_json::to_string_pretty(config).expect("json"),
    )
    .expect("write config");
    let cfg = ModelConfig::from_file(&config_path).expect("config resolves");
    let mut tensors = init_weights(&cfg, 0.2, seed, DType::F32, &Device::Cpu).expect("init");
    edit(&mut tensors);
    write_tensors(&tensors, &dir.path().join("model.safetensors"));
    Checkpoint { dir, cfg }
}

/// Deterministic, non-zero values of `len` elements (distinct per `salt`).
fn nonzero_values(len: usize, salt: usize) -> Tensor {
    let values: Vec<f32> = (0..len)
        .map(|i| {
            let x = (i * 7 + salt * 13) as f32;
            let sign = if (i + salt).is_multiple_of(2) {
                1.0
            } else {
                -1.0
            };
            sign * (0.05 + 0.3 * (0.37 * x).sin().abs())
        })
        .collect();
    Tensor::from_vec(values, len, &Device::Cpu).expect("tensor")
}

/// Replaces every bias with non-zero values (init_weights leaves them at zero).
fn randomize_biases(tensors: &mut HashMap<String, Tensor>) {
    let mut names: Vec<String> = tensors
        .keys()
        .filter(|k| k.ends_with(".bias"))
        .cloned()
        .collect();
    names.sort();
    assert!(!names.is_empty(), "the checkpoint has biases to randomize");
    for (salt, name) in names.into_iter().enumerate() {
        let len = tensors[&name].elem_count();
        tensors.insert(name, nonzero_values(len, salt));
    }
}

fn qwen2(extra: Value) -> Checkpoint {
    checkpoint(
        &config_json("Qwen2ForCausalLM", extra),
        11,
        randomize_biases,
    )
}

fn mistral(extra: Value) -> Checkpoint {
    checkpoint(&config_json("MistralForCausalLM", extra), 12, |_| {})
}

fn input(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .expect("ids")
        .unsqueeze(0)
        .expect("batch")
}

/// Logits of every position, `[seq][vocab]`.
fn all_logits(model: &CausalLm, ids: &[u32]) -> Vec<Vec<f32>> {
    model
        .forward(&input(ids), None)
        .expect("forward")
        .squeeze(0)
        .expect("squeeze")
        .to_vec2()
        .expect("to_vec2")
}

fn last_logits(model: &CausalLm, ids: &[u32]) -> Vec<f32> {
    model
        .forward_last(&input(ids), None)
        .expect("forward_last")
        .squeeze(0)
        .expect("squeeze")
        .to_vec1()
        .expect("to_vec1")
}

/// Feeds `seq` through the KV cache in chunks of `chunks` (the rest one token at a time) and
/// checks the last logits after each chunk against a full forward pass of the prefix.
fn assert_cached_decode_equals_recompute(
    model: &CausalLm,
    seq: &[u32],
    chunks: &[usize],
    what: &str,
) {
    let mut cache = model.new_cache();
    let mut sizes = chunks.to_vec();
    let fed: usize = sizes.iter().sum();
    sizes.extend(std::iter::repeat_n(1, seq.len() - fed));
    let mut end = 0;
    for size in sizes {
        let start = end;
        end += size;
        let cached: Vec<f32> = model
            .forward_last(&input(&seq[start..end]), Some(&mut cache))
            .expect("cached forward")
            .squeeze(0)
            .expect("squeeze")
            .to_vec1()
            .expect("to_vec1");
        let full = last_logits(model, &seq[..end]);
        let diff = max_abs_diff(&cached, &full);
        assert!(
            diff < 1e-4,
            "{what}: after {end} tokens, max |Δlogit| = {diff}"
        );
        assert_eq!(cache.len(), end, "{what}");
    }
}

// --- Qwen2: q/k/v biases ---------------------------------------------------------------------

#[test]
fn qwen2_loads_qkv_biases_and_no_o_proj_bias() {
    let ckpt = qwen2(json!({}));
    let saved = ckpt.tensors();
    assert!(!saved.contains_key("model.layers.0.self_attn.o_proj.bias"));
    let mut model = ckpt.model();
    let mut seen = 0;
    for (path, linear) in model.linears_mut() {
        let name = path.rsplit('.').next().expect("module name");
        match name {
            "q_proj" | "k_proj" | "v_proj" => {
                let bias = linear
                    .bias()
                    .unwrap_or_else(|| panic!("{path} has no bias"));
                let want = &saved[&format!("{path}.bias")];
                let diff = max_abs_diff(&bias.to_vec1().unwrap(), &want.to_vec1().unwrap());
                assert_eq!(diff, 0.0, "{path}.bias is the checkpoint's");
                seen += 1;
            }
            _ => assert!(linear.bias().is_none(), "{path} must have no bias in Qwen2"),
        }
    }
    assert_eq!(seen, 6, "three biased projections in each of two layers");
}

#[test]
fn qwen2_biases_change_the_logits() {
    let ckpt = qwen2(json!({}));
    let with_bias = all_logits(&ckpt.model(), &SEQ).concat();
    let zeroed = ckpt.with_weights(|t| {
        for (name, tensor) in t.iter_mut() {
            if name.ends_with(".bias") {
                *tensor = tensor.zeros_like().unwrap();
            }
        }
    });
    let without = all_logits(&zeroed.model(), &SEQ).concat();
    let diff = max_abs_diff(&with_bias, &without);
    assert!(diff > 1e-2, "biases had no effect: max |Δlogit| = {diff}");

    // Each of q, k and v's bias is used on its own (a loaded-but-ignored one would leave the logits alone).
    for which in ["q_proj", "k_proj", "v_proj"] {
        let name = format!("model.layers.0.self_attn.{which}.bias");
        let one_zeroed = ckpt.with_weights(|t| {
            let zero = t[&name].zeros_like().unwrap();
            t.insert(name.clone(), zero);
        });
        let diff = max_abs_diff(&with_bias, &all_logits(&one_zeroed.model(), &SEQ).concat());
        assert!(diff > 1e-4, "{name} had no effect: max |Δlogit| = {diff}");
    }
}

#[test]
fn qwen2_checkpoint_without_a_q_bias_fails_naming_it() {
    let name = "model.layers.0.self_attn.q_proj.bias";
    let ckpt = qwen2(json!({})).with_weights(|t| {
        t.remove(name).expect("present");
    });
    let err = ckpt
        .load()
        .expect_err("a Qwen2 checkpoint needs its q bias");
    let msg = err.to_string();
    assert!(msg.contains(name) && msg.contains("not found"), "{msg}");
}

// --- KV cache --------------------------------------------------------------------------------

#[test]
fn kv_cache_decode_equals_full_recompute_for_qwen2_and_mistral() {
    let cases = [
        ("qwen2", qwen2(json!({}))),
        (
            "mistral, no window",
            mistral(json!({"sliding_window": null})),
        ),
        // MistralConfig's default window (4096) is far longer than the sequence.
        ("mistral, default window", mistral(json!({}))),
    ];
    for (what, ckpt) in &cases {
        let model = ckpt.model();
        assert_cached_decode_equals_recompute(&model, &SEQ, &[3], what);
        // A multi-token chunk after the prefill: the causal mask with an offset.
        assert_cached_decode_equals_recompute(&model, &SEQ, &[3, 4], what);
    }
}

// --- Mistral's sliding window ----------------------------------------------------------------

#[test]
fn sliding_window_cached_decode_equals_full_recompute() {
    let model = mistral(json!({"sliding_window": 4})).model();
    assert_eq!(model.config().sliding_window, Some(4));
    assert_cached_decode_equals_recompute(&model, &SEQ, &[3], "window 4, prefill 3");
    // Prefill longer than the window, then a chunk that straddles it.
    assert_cached_decode_equals_recompute(&model, &SEQ, &[6, 3], "window 4, prefill 6 + chunk 3");
}

#[test]
fn sliding_window_bounds_the_receptive_field() {
    // Window 4: position p attends to p-3..=p. Two layers reach back 2·3 = 6 positions, so the
    // last of 10 tokens (position 9) depends on tokens 3..=9 and on nothing before.
    let seq = &SEQ[..10];
    let changed = |i: usize| {
        let mut s = seq.to_vec();
        s[i] = (s[i] + 1) % VOCAB;
        s
    };
    let windowed = mistral(json!({"sliding_window": 4})).model();
    let base = last_logits(&windowed, seq);
    for i in [0, 1, 2] {
        let diff = max_abs_diff(&base, &last_logits(&windowed, &changed(i)));
        assert!(
            diff < 1e-6,
            "window 4: token {i} is out of reach but moved the logits by {diff}"
        );
    }
    let diff = max_abs_diff(&base, &last_logits(&windowed, &changed(3)));
    assert!(
        diff > 1e-4,
        "window 4: token 3 is within reach yet changed nothing ({diff})"
    );

    // The same weights without a window: token 0 does reach the last position.
    let unwindowed = mistral(json!({"sliding_window": null})).model();
    let base = last_logits(&unwindowed, seq);
    let diff = max_abs_diff(&base, &last_logits(&unwindowed, &changed(0)));
    assert!(diff > 1e-4, "no window: token 0 should matter ({diff})");
}

// --- Tied embeddings -------------------------------------------------------------------------

#[test]
fn tied_embeddings_load_without_lm_head_and_project_onto_the_embedding() {
    let ckpt = qwen2(json!({"tie_word_embeddings": true}));
    let saved = ckpt.tensors();
    assert!(
        !saved.contains_key("lm_head.weight"),
        "init_weights writes no LM head when tied"
    );
    let mut model = ckpt.model();
    let ids = input(&SEQ[..7]);
    let logits = model.forward(&ids, None).unwrap();
    assert_eq!(logits.dims(), [1, 7, VOCAB as usize]);

    let hidden = model
        .forward_hidden(&ids, None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let embed = &saved["model.embed_tokens.weight"];
    let want = hidden.matmul(&embed.t().unwrap()).unwrap();
    let diff = max_abs_diff(
        &logits
            .squeeze(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap(),
        &want.flatten_all().unwrap().to_vec1().unwrap(),
    );
    assert!(diff < 1e-4, "logits are not hidden · embedᵀ: {diff}");
    assert!(
        model
            .linears_mut()
            .iter()
            .all(|(name, _)| name != "lm_head"),
        "a tied head is the embedding, not a separate linear layer"
    );
}

// --- RoPE scaling ----------------------------------------------------------------------------

#[test]
fn linear_rope_scaling_changes_every_position_but_the_first() {
    let llama =
        |extra: Value| checkpoint(&config_json("LlamaForCausalLM", extra), 13, |_| {}).model();
    let seq = &SEQ[..8];
    let plain = all_logits(&llama(json!({"rope_scaling": null})), seq);
    let scaled = all_logits(
        &llama(json!({"rope_scaling": {"rope_type": "linear", "factor": 2.0}})),
        seq,
    );
    // Position 0 sees only itself at angle 0: no rotation to scale.
    let diff = max_abs_diff(&plain[0], &scaled[0]);
    assert!(diff < 1e-6, "position 0 changed by {diff}");
    for p in 1..seq.len() {
        let diff = max_abs_diff(&plain[p], &scaled[p]);
        assert!(
            diff > 1e-4,
            "position {p} unchanged by a 2x scaling ({diff})"
        );
    }
    // And a factor of one is no scaling at all.
    let unit = all_logits(
        &llama(json!({"rope_scaling": {"rope_type": "linear", "factor": 1.0}})),
        seq,
    );
    let diff = max_abs_diff(&plain.concat(), &unit.concat());
    assert!(diff < 1e-6, "factor 1.0 changed the logits by {diff}");
}
