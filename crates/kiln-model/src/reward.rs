//! Reward models: a decoder with a one-output `score` head read at the last token, exactly
//! transformers' `LlamaForSequenceClassification` (and its Mistral and Qwen2 twins,
//! `modeling_layers.GenericForSequenceClassification`) with `num_labels = 1`, the model TRL's
//! `RewardTrainer` trains (Ouyang et al. 2022, <https://arxiv.org/abs/2203.02155>, §3.5).
//!
//! The checkpoint layout is transformers': the decoder under `model.*`, `score.weight`
//! `[1, hidden]` (no bias), no `lm_head`, and a `config.json` with `architectures:
//! ["LlamaForSequenceClassification"]`, one label and `pad_token_id`. The backbone is the one
//! [`CausalLm`] kiln trains and serves, built without an LM head (a tied one, sharing the
//! embedding's storage, so it costs nothing and is never saved).
//!
//! Where the score is read follows transformers to the token: on the right-padded batch, the
//! rightmost position whose token is not `pad_token_id` (position 0 when every token is), so a
//! text that itself ends in pad tokens is scored before them, as transformers scores it. Without
//! a pad id (transformers then accepts only batches of one and reads the last position), each
//! row is read at its own last token. Right padding leaves every real position untouched under
//! causal attention, so no attention mask is needed and a batch scores what each row scores
//! alone.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use kiln_core::config::Architecture;
use kiln_core::{Error, ModelConfig, ModelDir, Result, SafetensorsWeights};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

use crate::save::{SavedModel, copy_side_files, torch_dtype_name, write_json, write_safetensors};
use crate::transformer::CausalLm;

/// The checkpoint key of the score head.
pub const SCORE_WEIGHT: &str = "score.weight";

/// transformers' default `initializer_range` (Llama, Mistral and Qwen2 configs).
pub const DEFAULT_INITIALIZER_RANGE: f64 = 0.02;

/// A sequence classifier with one output: a [`CausalLm`] backbone (without LM head) and the
/// `score` head `[1, hidden]`.
#[derive(Debug, Clone)]
pub struct RewardModel {
    /// Built with `tie_word_embeddings = true`: its unused LM head is the embedding.
    backbone: CausalLm,
    /// `[1, hidden]`, in the backbone's dtype; a variable's tensor when trained.
    score: Tensor,
    pad_token_id: Option<u32>,
}

impl RewardModel {
    /// Loads a reward model directory (a sequence classifier with one label, as `kiln reward`
    /// or transformers wrote it) in `dtype` on `device`. Errors name the file and tensor when
    /// `score.weight` is missing or misshaped, and the config key when it declares more than
    /// one label.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let (model_dir, config, weights) = open(dir)?;
        check_one_label(&model_dir)?;
        if !weights.contains(SCORE_WEIGHT) {
            return Err(Error::InvalidInput(format!(
                "{}: tensor `{SCORE_WEIGHT}` not found: {} is not a reward model (a sequence \
                 classifier with a `score` head, e.g. LlamaForSequenceClassification); train one \
                 from a causal LM with `kiln reward`",
                files_of(&weights),
                dir.display()
            )));
        }
        let score = load_score(&weights, &config, dtype, device)?;
        let backbone = load_backbone(weights, &config, dtype, device)?;
        Self::from_parts(backbone, score, config.pad_token_id)
    }

    /// Loads what a reward-model run starts from: a reward model directory (its head is kept,
    /// and the second value is `false`), or a causal LM (its LM head is not read; a fresh head
    /// is drawn from N(0, `initializer_range`²) with `seed`, and the second value is `true`).
    pub fn load_or_init(
        dir: &Path,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<(Self, bool)> {
        let (model_dir, config, weights) = open(dir)?;
        if weights.contains(SCORE_WEIGHT) {
            return Self::load(dir, dtype, device).map(|m| (m, false));
        }
        let range = initializer_range(&model_dir.file("config.json"))?;
        let backbone = load_backbone(weights, &config, dtype, device)?;
        let score = init_head(config.hidden_size, range, seed, dtype, device)?;
        Ok((
            Self::from_parts(backbone, score, config.pad_token_id)?,
            true,
        ))
    }

    /// A reward model on `lm`'s decoder with a fresh head drawn from
    /// N(0, `initializer_range`²) (transformers' `_init_weights` for a linear layer), seeded.
    /// The LM head is dropped; the pad id is `lm`'s config's (see
    /// [`RewardModel::with_pad_token_id`]). Attached LoRA updates would be lost: merge them
    /// first (an error otherwise).
    pub fn from_causal_lm(lm: CausalLm, initializer_range: f64, seed: u64) -> Result<Self> {
        if lm.has_adapters() {
            return Err(Error::InvalidInput(
                "RewardModel::from_causal_lm: the model carries LoRA adapters; merge them first"
                    .into(),
            ));
        }
        let (dtype, device) = (lm.dtype(), lm.device().clone());
        let pad = lm.config().pad_token_id;
        let score = init_head(
            lm.config().hidden_size,
            initializer_range,
            seed,
            dtype,
            &device,
        )?;
        let backbone = rebuild(&lm, |_| false)?.0;
        Self::from_parts(backbone, score, pad)
    }

    /// A reward model from a decoder and a `[1, hidden]` head. A backbone with an untied LM
    /// head is rebuilt without it (no weight is copied).
    pub fn from_parts(
        backbone: CausalLm,
        score: Tensor,
        pad_token_id: Option<u32>,
    ) -> Result<Self> {
        let hidden = backbone.config().hidden_size;
        if score.dims() != [1, hidden] {
            return Err(Error::InvalidInput(format!(
                "reward head `{SCORE_WEIGHT}`: expected shape [1, {hidden}], found {:?}",
                score.dims()
            )));
        }
        let backbone = if backbone.config().tie_word_embeddings {
            backbone
        } else {
            rebuild(&backbone, |_| false)?.0
        };
        let score = score.to_dtype(backbone.dtype())?;
        Ok(Self {
            backbone,
            score,
            pad_token_id,
        })
    }

    /// The id rows are padded with and the score position is found by; `None` reads each row
    /// at its last token.
    pub fn with_pad_token_id(mut self, pad_token_id: Option<u32>) -> Self {
        self.pad_token_id = pad_token_id;
        self
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token_id
    }

    /// The decoder (its config has `tie_word_embeddings = true`: it has no LM head of its own).
    pub fn backbone(&self) -> &CausalLm {
        &self.backbone
    }

    /// The decoder, to attach trainable LoRA adapters to
    /// ([`crate::lora_train::attach_trainable_lora`]).
    pub fn backbone_mut(&mut self) -> &mut CausalLm {
        &mut self.backbone
    }

    /// The head, `[1, hidden]`.
    pub fn score_weight(&self) -> &Tensor {
        &self.score
    }

    pub fn device(&self) -> &Device {
        self.backbone.device()
    }

    pub fn dtype(&self) -> DType {
        self.backbone.dtype()
    }

    /// Parameters as a checkpoint stores them: the decoder and the head.
    pub fn num_parameters(&self) -> usize {
        self.backbone.num_parameters() + self.score.elem_count()
    }

    /// Makes the weights `train` selects (by checkpoint name: `model.layers.0.mlp.up_proj.weight`,
    /// …, `score.weight`) trainable variables and returns them, sorted by name: every name for
    /// full fine-tuning; `score.weight` (and any `modules_to_save`) in a LoRA run. Call before
    /// attaching adapters (an error when some are attached: they would be dropped).
    pub fn make_trainable(&mut self, train: impl Fn(&str) -> bool) -> Result<Vec<(String, Var)>> {
        if self.backbone.has_adapters() {
            return Err(Error::InvalidInput(
                "RewardModel::make_trainable: call it before attaching LoRA adapters".into(),
            ));
        }
        let (backbone, mut vars) = rebuild(&self.backbone, &train)?;
        self.backbone = backbone;
        if train(SCORE_WEIGHT) {
            let var = Var::from_tensor(&self.score)?;
            self.score = var.as_tensor().clone();
            vars.push((SCORE_WEIGHT.to_string(), var));
        }
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(vars)
    }

    /// Folds attached LoRA updates into the decoder's weights (before saving a merged model).
    pub fn merge_lora(&mut self) -> Result<()> {
        Ok(self.backbone.merge_lora()?)
    }

    /// The same model on the same storage with no variable in it (see [`CausalLm::detached`]):
    /// for evaluation during training.
    pub fn detached(&self) -> Self {
        Self {
            backbone: self.backbone.detached(),
            score: self.score.detach(),
            pad_token_id: self.pad_token_id,
        }
    }

    /// Gradients of `loss`; use this rather than `loss.backward()` (see [`CausalLm::backward`]).
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        Ok(self.backbone.backward(loss)?)
    }

    /// The scores of `rows` (token ids, of any lengths), `[rows]` f32, differentiable: the rows
    /// run as one right-padded batch and each is read where transformers reads it (see the
    /// module docs). An empty row is an error; no rows give an empty tensor.
    pub fn scores(&self, rows: &[Vec<u32>]) -> Result<Tensor> {
        let device = self.device();
        if rows.is_empty() {
            return Ok(Tensor::zeros(0, DType::F32, device)?);
        }
        if let Some(i) = rows.iter().position(Vec::is_empty) {
            return Err(Error::InvalidInput(format!(
                "reward model: row {i} has no tokens to score"
            )));
        }
        let (b, t) = (rows.len(), rows.iter().map(Vec::len).max().unwrap_or(1));
        let fill = self.pad_token_id.unwrap_or(0);
        let mut ids = Vec::with_capacity(b * t);
        let mut at = Vec::with_capacity(b);
        for (i, row) in rows.iter().enumerate() {
            ids.extend_from_slice(row);
            ids.resize((i + 1) * t, fill);
            let last = match self.pad_token_id {
                Some(pad) => row.iter().rposition(|&id| id != pad).unwrap_or(0),
                None => row.len() - 1,
            };
            at.push((i * t + last) as u32);
        }
        let ids = Tensor::from_vec(ids, (b, t), device)?;
        let hidden = self.backbone.forward_hidden(&ids, None)?;
        let h = hidden.dim(2)?;
        let last = hidden
            .reshape((b * t, h))?
            .index_select(&Tensor::new(at.as_slice(), device)?, 0)?;
        Ok(last
            .matmul(&self.score.t()?)?
            .squeeze(1)?
            .to_dtype(DType::F32)?)
    }

    /// [`RewardModel::scores`] on a detached view, as plain numbers: for inference.
    pub fn score_rows(&self, rows: &[Vec<u32>]) -> Result<Vec<f32>> {
        Ok(self.detached().scores(rows)?.to_vec1()?)
    }

    /// The weights under transformers' names: the decoder's `model.*` (dense: merge LoRA
    /// first) and `score.weight`; no `lm_head`.
    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.backbone.state_dict()?;
        out.push((SCORE_WEIGHT.to_string(), self.score.clone()));
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Writes a model directory transformers' `AutoModelForSequenceClassification` and
    /// [`RewardModel::load`] read: `model.safetensors` (in the source config's dtype), the
    /// tokenizer and other side files of `source_dir`, and `source_dir`'s `config.json` with
    /// `architectures: [<Llama|Mistral|Qwen2>ForSequenceClassification]`, one label
    /// (`id2label`/`label2id`) and `pad_token_id`. Attached LoRA updates are not included:
    /// [`RewardModel::merge_lora`] first. An `out` already holding a model is refused.
    pub fn save(&self, source_dir: &Path, out: &Path) -> Result<SavedModel> {
        for existing in ["model.safetensors", "model.safetensors.index.json"] {
            let path = out.join(existing);
            if path.exists() {
                return Err(Error::InvalidInput(format!(
                    "{}: already exists; refusing to overwrite a saved model (choose a new output directory or remove it)",
                    path.display()
                )));
            }
        }
        let source_config = source_dir.join("config.json");
        let mut config: Value = kiln_core::read_json(&source_config)?;
        let cfg = self.backbone.config();
        let dtype = cfg.dtype;
        let Some(fields) = config.as_object_mut() else {
            return Err(Error::config(
                &source_config,
                "config.json",
                "expected a JSON object",
            ));
        };
        fields.insert(
            "architectures".into(),
            json!([sequence_classifier_name(cfg.architecture)]),
        );
        fields.insert("id2label".into(), json!({"0": "LABEL_0"}));
        fields.insert("label2id".into(), json!({"LABEL_0": 0}));
        if fields.contains_key("num_labels") {
            fields.insert("num_labels".into(), json!(1));
        }
        fields.insert(
            "pad_token_id".into(),
            self.pad_token_id.map_or(Value::Null, Value::from),
        );
        let dtype_name = torch_dtype_name(dtype)?;
        fields.insert("torch_dtype".into(), dtype_name.into());
        if fields.contains_key("dtype") {
            fields.insert("dtype".into(), dtype_name.into());
        }

        std::fs::create_dir_all(out).map_err(crate::save::io_err(out))?;
        let tensors = self
            .state_dict()?
            .into_iter()
            .map(|(name, t)| Ok((name, t.to_dtype(dtype)?)))
            .collect::<Result<Vec<_>>>()?;
        let n_tensors = tensors.len();
        let weights = out.join("model.safetensors");
        write_safetensors(&weights, tensors)?;
        let copied = copy_side_files(source_dir, out)?;
        // Last: a crash leaves a directory without config.json, which fails to load.
        write_json(&out.join("config.json"), &config)?;
        let weights_bytes = std::fs::metadata(&weights)
            .map_err(crate::save::io_err(&weights))?
            .len();
        Ok(SavedModel {
            dir: out.to_path_buf(),
            weights_bytes,
            tensors: n_tensors,
            copied,
        })
    }
}

/// transformers' sequence-classifier class for an architecture.
pub fn sequence_classifier_name(architecture: Architecture) -> &'static str {
    match architecture {
        Architecture::Llama => "LlamaForSequenceClassification",
        Architecture::Mistral => "MistralForSequenceClassification",
        Architecture::Qwen2 => "Qwen2ForSequenceClassification",
    }
}

/// `config.json`'s `initializer_range`, or transformers' default 0.02.
pub fn initializer_range(config_json: &Path) -> Result<f64> {
    let raw: Value = kiln_core::read_json(config_json)?;
    match raw.get("initializer_range") {
        None | Some(Value::Null) => Ok(DEFAULT_INITIALIZER_RANGE),
        Some(v) => v
            .as_f64()
            .filter(|r| r.is_finite() && *r >= 0.0)
            .ok_or_else(|| {
                Error::config(
                    config_json,
                    "initializer_range",
                    format!("expected a non-negative number, found {v}"),
                )
            }),
    }
}

fn open(dir: &Path) -> Result<(ModelDir, ModelConfig, SafetensorsWeights)> {
    let model_dir = ModelDir::resolve(&dir.to_string_lossy())?;
    let config = model_dir.config()?;
    let weights = SafetensorsWeights::open(&model_dir.weight_files()?)?;
    Ok((model_dir, config, weights))
}

/// A reward model has one label: `num_labels` and `id2label`, when given, must say so.
fn check_one_label(dir: &ModelDir) -> Result<()> {
    let path = dir.file("config.json");
    let raw: Value = kiln_core::read_json(&path)?;
    let labels = match (raw.get("num_labels"), raw.get("id2label")) {
        (Some(n), _) if !n.is_null() => Some(("num_labels", n.as_u64())),
        (_, Some(Value::Object(m))) => Some(("id2label", Some(m.len() as u64))),
        _ => None,
    };
    match labels {
        Some((key, n)) if n != Some(1) => Err(Error::config(
            &path,
            key,
            format!(
                "declares {} labels; a reward model is a sequence classifier with num_labels = 1",
                n.map_or_else(|| "a non-integer number of".to_string(), |n| n.to_string())
            ),
        )),
        _ => Ok(()),
    }
}

fn files_of(weights: &SafetensorsWeights) -> String {
    let names = weights.names();
    let mut files: Vec<String> = names
        .iter()
        .filter_map(|n| weights.file_of(n))
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    files.dedup();
    files.join(", ")
}

fn load_score(
    weights: &SafetensorsWeights,
    config: &ModelConfig,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let found = weights.shape_of(SCORE_WEIGHT).unwrap_or_default();
    let expected = [1, config.hidden_size];
    if found != expected {
        let file = weights
            .file_of(SCORE_WEIGHT)
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        return Err(Error::InvalidInput(format!(
            "{file}: tensor `{SCORE_WEIGHT}`: expected shape {expected:?} (one label, hidden size {}), found {found:?}",
            config.hidden_size
        )));
    }
    weights.load(SCORE_WEIGHT, dtype, device)
}

/// The decoder of a checkpoint, without its LM head (none is read).
fn load_backbone(
    weights: SafetensorsWeights,
    config: &ModelConfig,
    dtype: DType,
    device: &Device,
) -> Result<CausalLm> {
    let mut tied = config.clone();
    tied.tie_word_embeddings = true;
    Ok(CausalLm::load(
        weights.into_var_builder(dtype, device),
        &tied,
    )?)
}

/// `model` rebuilt without an LM head, with the weights `train` selects as fresh variables
/// (returned by name); the rest share `model`'s storage.
fn rebuild(
    model: &CausalLm,
    train: impl Fn(&str) -> bool,
) -> Result<(CausalLm, Vec<(String, Var)>)> {
    let mut config = model.config().clone();
    config.tie_word_embeddings = true;
    let mut tensors = HashMap::new();
    let mut vars = Vec::new();
    for (name, t) in model.state_dict()? {
        if name == "lm_head.weight" {
            continue;
        }
        let t = if train(&name) {
            let var = Var::from_tensor(&t)?;
            let t = var.as_tensor().clone();
            vars.push((name.clone(), var));
            t
        } else {
            t
        };
        tensors.insert(name, t);
    }
    let vb = VarBuilder::from_tensors(tensors, model.dtype(), model.device());
    Ok((CausalLm::load(vb, &config)?, vars))
}

/// A `[1, hidden]` head from N(0, `std`²): ChaCha8 + Box–Muller, as [`crate::init`] draws.
fn init_head(hidden: usize, std: f64, seed: u64, dtype: DType, device: &Device) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let values: Vec<f32> = (0..hidden)
        .map(|_| {
            let u1: f64 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect();
    Ok(Tensor::from_vec(values, (1, hidden), device)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_heads_are_seeded_and_scaled() {
        let a = init_head(4096, 0.02, 7, DType::F32, &Device::Cpu).expect("head");
        let b = init_head(4096, 0.02, 7, DType::F32, &Device::Cpu).expect("head");
        let c = init_head(4096, 0.02, 8, DType::F32, &Device::Cpu).expect("head");
        let (va, vb, vc): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            a.flatten_all().and_then(|t| t.to_vec1()).expect("values"),
            b.flatten_all().and_then(|t| t.to_vec1()).expect("values"),
            c.flatten_all().and_then(|t| t.to_vec1()).expect("values"),
        );
        assert_eq!(va, vb);
        assert_ne!(va, vc);
        let n = va.len() as f64;
        let mean = va.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let std = (va
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        assert!(mean.abs() < 0.002, "mean {mean}");
        assert!((std - 0.02).abs() < 0.002, "std {std}");
    }
}
