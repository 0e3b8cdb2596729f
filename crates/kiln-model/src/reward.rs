//! Sequence classifiers: a decoder with a `score` head `[num_labels, hidden]` read at the last
//! token, exactly transformers' `LlamaForSequenceClassification` (and its Mistral and Qwen2
//! twins, `modeling_layers.GenericForSequenceClassification`). With `num_labels = 1` it is the
//! reward model TRL's `RewardTrainer` trains (Ouyang et al. 2022,
//! <https://arxiv.org/abs/2203.02155>, §3.5): [`RewardModel`]; with more, a classifier such as
//! a guardrail's (Meta's Prompt Guard is one): [`SequenceClassifier`]. One implementation serves
//! both: [`RewardModel`] is a [`SequenceClassifier`] that insists on one label and returns one
//! score per row.
//!
//! The checkpoint layout is transformers': the decoder under `model.*`, `score.weight`
//! `[num_labels, hidden]` (no bias), no `lm_head`, and a `config.json` with `architectures:
//! ["LlamaForSequenceClassification"]`, the labels (`id2label`/`label2id`, `num_labels`) and
//! `pad_token_id`. The backbone is the one [`CausalLm`] kiln trains and serves, built without an
//! LM head (a tied one, sharing the embedding's storage, so it costs nothing and is never saved).
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
use serde_json::{Map, Value, json};

use crate::save::{SavedModel, copy_side_files, torch_dtype_name, write_json, write_safetensors};
use crate::transformer::CausalLm;

/// The checkpoint key of the score head.
pub const SCORE_WEIGHT: &str = "score.weight";

/// transformers' default `initializer_range` (Llama, Mistral and Qwen2 configs).
pub const DEFAULT_INITIALIZER_RANGE: f64 = 0.02;

/// A sequence classifier: a [`CausalLm`] backbone (without LM head) and the `score` head
/// `[num_labels, hidden]`, with the label names (`id2label`, in id order).
#[derive(Debug, Clone)]
pub struct SequenceClassifier {
    /// Built with `tie_word_embeddings = true`: its unused LM head is the embedding.
    backbone: CausalLm,
    /// `[num_labels, hidden]`, in the backbone's dtype; a variable's tensor when trained.
    score: Tensor,
    pad_token_id: Option<u32>,
    labels: Vec<String>,
}

impl SequenceClassifier {
    /// Loads a sequence-classifier directory (as kiln or transformers wrote it, any number of
    /// labels) in `dtype` on `device`. The labels are `config.json`'s `id2label` (checked
    /// against `num_labels` and `label2id` when given), else `LABEL_0`, … for each row of
    /// `score.weight`. Errors name the file and tensor when `score.weight` is missing or
    /// misshaped, and the config key when the labels disagree.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let (model_dir, config, weights) = open(dir)?;
        require_score(&weights, dir, false)?;
        let declared = config_labels(&model_dir.file("config.json"))?;
        let rows = weights
            .shape_of(SCORE_WEIGHT)
            .and_then(|s| s.first().copied())
            .unwrap_or(0);
        let labels = declared.unwrap_or_else(|| default_labels(rows.max(1)));
        let score = load_score(&weights, &config, labels.len(), dtype, device)?;
        let backbone = load_backbone(weights, &config, dtype, device)?;
        Self::from_parts(backbone, score, config.pad_token_id, labels)
    }

    /// Loads what a classifier run starts from: a classifier directory with exactly `labels`
    /// (its head is kept, and the second value is `false`), or any other checkpoint of the
    /// three architectures, a causal LM or a classifier with other labels (its decoder is kept,
    /// a fresh head is drawn from N(0, `initializer_range`²) with `seed`, and the second value
    /// is `true`).
    pub fn load_or_init(
        dir: &Path,
        labels: &[String],
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<(Self, bool)> {
        let (model_dir, config, weights) = open(dir)?;
        let config_json = model_dir.file("config.json");
        if weights.contains(SCORE_WEIGHT) && config_labels(&config_json)?.as_deref() == Some(labels)
        {
            return Self::load(dir, dtype, device).map(|m| (m, false));
        }
        let range = initializer_range(&config_json)?;
        let backbone = load_backbone(weights, &config, dtype, device)?;
        let score = init_head(labels.len(), config.hidden_size, range, seed, dtype, device)?;
        Ok((
            Self::from_parts(backbone, score, config.pad_token_id, labels.to_vec())?,
            true,
        ))
    }

    /// A classifier on `lm`'s decoder with a fresh `[labels, hidden]` head drawn from
    /// N(0, `initializer_range`²) (transformers' `_init_weights` for a linear layer), seeded.
    /// The LM head is dropped; the pad id is `lm`'s config's. Attached LoRA updates would be
    /// lost: merge them first (an error otherwise).
    pub fn from_causal_lm(
        lm: CausalLm,
        labels: Vec<String>,
        initializer_range: f64,
        seed: u64,
    ) -> Result<Self> {
        if lm.has_adapters() {
            return Err(Error::InvalidInput(
                "from_causal_lm: the model carries LoRA adapters; merge them first".into(),
            ));
        }
        let (dtype, device) = (lm.dtype(), lm.device().clone());
        let pad = lm.config().pad_token_id;
        let score = init_head(
            labels.len(),
            lm.config().hidden_size,
            initializer_range,
            seed,
            dtype,
            &device,
        )?;
        let backbone = rebuild(&lm, |_| false)?.0;
        Self::from_parts(backbone, score, pad, labels)
    }

    /// A classifier from a decoder, a `[labels, hidden]` head and the label names. A backbone
    /// with an untied LM head is rebuilt without it (no weight is copied).
    pub fn from_parts(
        backbone: CausalLm,
        score: Tensor,
        pad_token_id: Option<u32>,
        labels: Vec<String>,
    ) -> Result<Self> {
        let hidden = backbone.config().hidden_size;
        let n = labels.len();
        if n == 0 {
            return Err(Error::InvalidInput(
                "sequence classifier: at least one label is needed".into(),
            ));
        }
        if score.dims() != [n, hidden] {
            return Err(Error::InvalidInput(format!(
                "classifier head `{SCORE_WEIGHT}`: expected shape [{n}, {hidden}] ({n} labels), found {:?}",
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
            labels,
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

    /// The label names, in id order (`id2label`).
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    pub fn num_labels(&self) -> usize {
        self.labels.len()
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

    /// The head, `[num_labels, hidden]`.
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
    /// …, `score.weight`) trainable variables and returns them, sorted by name. Call before
    /// attaching adapters (an error when some are attached: they would be dropped).
    pub fn make_trainable(&mut self, train: impl Fn(&str) -> bool) -> Result<Vec<(String, Var)>> {
        if self.backbone.has_adapters() {
            return Err(Error::InvalidInput(
                "make_trainable: call it before attaching LoRA adapters".into(),
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
            labels: self.labels.clone(),
        }
    }

    /// A detached copy laid out for inference: every dense decoder weight stored transposed
    /// ([`CausalLm::store_weights_transposed`]), which spares the GEMM a packing pass per call.
    /// Not for a model being trained.
    pub fn for_inference(&self) -> Result<Self> {
        let mut model = self.detached();
        model.backbone.store_weights_transposed()?;
        model.score = model.score.t()?.contiguous()?.t()?;
        Ok(model)
    }

    /// Gradients of `loss`; use this rather than `loss.backward()` (see [`CausalLm::backward`]).
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        Ok(self.backbone.backward(loss)?)
    }

    /// The logits of `rows` (token ids, of any lengths), `[rows, num_labels]` f32,
    /// differentiable: the rows run as one right-padded batch and each is read where
    /// transformers reads it (see the module docs). An empty row is an error; no rows give an
    /// empty `[0, num_labels]` tensor.
    pub fn scores(&self, rows: &[Vec<u32>]) -> Result<Tensor> {
        let device = self.device();
        let n = self.labels.len();
        if rows.is_empty() {
            return Ok(Tensor::zeros((0, n), DType::F32, device)?);
        }
        if let Some(i) = rows.iter().position(Vec::is_empty) {
            return Err(Error::InvalidInput(format!(
                "sequence classifier: row {i} has no tokens to score"
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
        Ok(last.matmul(&self.score.t()?)?.to_dtype(DType::F32)?)
    }

    /// [`SequenceClassifier::scores`] on a detached view, as plain numbers (one vector of
    /// `num_labels` logits per row): for inference.
    pub fn logits_rows(&self, rows: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        Ok(self.detached().scores(rows)?.to_vec2()?)
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
    /// [`SequenceClassifier::load`] read: `model.safetensors` (in the source config's dtype),
    /// the tokenizer and other side files of `source_dir`, and `source_dir`'s `config.json` with
    /// `architectures: [<Llama|Mistral|Qwen2>ForSequenceClassification]`, the labels
    /// (`num_labels`, `id2label`, `label2id`) and `pad_token_id`. Attached LoRA updates are not
    /// included: [`SequenceClassifier::merge_lora`] first. An `out` already holding a model is
    /// refused.
    pub fn save(&self, source_dir: &Path, out: &Path) -> Result<SavedModel> {
        let source_config = source_dir.join("config.json");
        let config: Value = kiln_core::read_json(&source_config)?;
        self.write_dir(config, &source_config, Some(source_dir), out, true)
    }

    /// [`SequenceClassifier::save`] with the base `config.json` given as a value (e.g.
    /// [`ModelConfig::to_hf_json`] of a model built from scratch) and the side files (tokenizer)
    /// copied from `side_files_from` when given; write any other files into `out` yourself.
    pub fn save_with_config(
        &self,
        config: Value,
        side_files_from: Option<&Path>,
        out: &Path,
    ) -> Result<SavedModel> {
        self.write_dir(config, &out.join("config.json"), side_files_from, out, true)
    }

    fn write_dir(
        &self,
        mut config: Value,
        config_path: &Path,
        side_files_from: Option<&Path>,
        out: &Path,
        always_num_labels: bool,
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
        let cfg = self.backbone.config();
        let dtype = cfg.dtype;
        let Some(fields) = config.as_object_mut() else {
            return Err(Error::config(
                config_path,
                "config.json",
                "expected a JSON object",
            ));
        };
        fields.insert(
            "architectures".into(),
            json!([sequence_classifier_name(cfg.architecture)]),
        );
        let id2label: Map<String, Value> = self
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), Value::from(l.as_str())))
            .collect();
        let label2id: Map<String, Value> = self
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), Value::from(i)))
            .collect();
        fields.insert("id2label".into(), Value::Object(id2label));
        fields.insert("label2id".into(), Value::Object(label2id));
        if always_num_labels || fields.contains_key("num_labels") {
            fields.insert("num_labels".into(), json!(self.labels.len()));
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
        let copied = match side_files_from {
            Some(dir) => copy_side_files(dir, out)?,
            None => Vec::new(),
        };
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

/// A sequence classifier with one output: the reward model. A [`SequenceClassifier`] whose
/// loading refuses any other number of labels and whose scores are one number per row.
#[derive(Debug, Clone)]
pub struct RewardModel {
    inner: SequenceClassifier,
}

impl RewardModel {
    /// Loads a reward model directory (a sequence classifier with one label, as `kiln reward`
    /// or transformers wrote it) in `dtype` on `device`. Errors name the file and tensor when
    /// `score.weight` is missing or misshaped, and the config key when it declares more than
    /// one label.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let (model_dir, config, weights) = open(dir)?;
        check_one_label(&model_dir)?;
        require_score(&weights, dir, true)?;
        let score = load_score(&weights, &config, 1, dtype, device)?;
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
        let score = init_head(1, config.hidden_size, range, seed, dtype, device)?;
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
        SequenceClassifier::from_causal_lm(lm, default_labels(1), initializer_range, seed)
            .map(|inner| Self { inner })
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
        SequenceClassifier::from_parts(backbone, score, pad_token_id, default_labels(1))
            .map(|inner| Self { inner })
    }

    /// The one-label classifier underneath.
    pub fn classifier(&self) -> &SequenceClassifier {
        &self.inner
    }

    /// The id rows are padded with and the score position is found by; `None` reads each row
    /// at its last token.
    pub fn with_pad_token_id(self, pad_token_id: Option<u32>) -> Self {
        Self {
            inner: self.inner.with_pad_token_id(pad_token_id),
        }
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        self.inner.pad_token_id()
    }

    /// The decoder (its config has `tie_word_embeddings = true`: it has no LM head of its own).
    pub fn backbone(&self) -> &CausalLm {
        self.inner.backbone()
    }

    /// The decoder, to attach trainable LoRA adapters to
    /// ([`crate::lora_train::attach_trainable_lora`]).
    pub fn backbone_mut(&mut self) -> &mut CausalLm {
        self.inner.backbone_mut()
    }

    /// The head, `[1, hidden]`.
    pub fn score_weight(&self) -> &Tensor {
        self.inner.score_weight()
    }

    pub fn device(&self) -> &Device {
        self.inner.device()
    }

    pub fn dtype(&self) -> DType {
        self.inner.dtype()
    }

    /// Parameters as a checkpoint stores them: the decoder and the head.
    pub fn num_parameters(&self) -> usize {
        self.inner.num_parameters()
    }

    /// Makes the weights `train` selects (by checkpoint name: `model.layers.0.mlp.up_proj.weight`,
    /// …, `score.weight`) trainable variables and returns them, sorted by name: every name for
    /// full fine-tuning; `score.weight` (and any `modules_to_save`) in a LoRA run. Call before
    /// attaching adapters (an error when some are attached: they would be dropped).
    pub fn make_trainable(&mut self, train: impl Fn(&str) -> bool) -> Result<Vec<(String, Var)>> {
        if self.inner.backbone.has_adapters() {
            return Err(Error::InvalidInput(
                "RewardModel::make_trainable: call it before attaching LoRA adapters".into(),
            ));
        }
        self.inner.make_trainable(train)
    }

    /// Folds attached LoRA updates into the decoder's weights (before saving a merged model).
    pub fn merge_lora(&mut self) -> Result<()> {
        self.inner.merge_lora()
    }

    /// The same model on the same storage with no variable in it (see [`CausalLm::detached`]):
    /// for evaluation during training.
    pub fn detached(&self) -> Self {
        Self {
            inner: self.inner.detached(),
        }
    }

    /// Gradients of `loss`; use this rather than `loss.backward()` (see [`CausalLm::backward`]).
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        self.inner.backward(loss)
    }

    /// The scores of `rows` (token ids, of any lengths), `[rows]` f32, differentiable: the rows
    /// run as one right-padded batch and each is read where transformers reads it (see the
    /// module docs). An empty row is an error; no rows give an empty tensor.
    pub fn scores(&self, rows: &[Vec<u32>]) -> Result<Tensor> {
        if rows.is_empty() {
            return Ok(Tensor::zeros(0, DType::F32, self.device())?);
        }
        if let Some(i) = rows.iter().position(Vec::is_empty) {
            return Err(Error::InvalidInput(format!(
                "reward model: row {i} has no tokens to score"
            )));
        }
        Ok(self.inner.scores(rows)?.squeeze(1)?)
    }

    /// [`RewardModel::scores`] on a detached view, as plain numbers: for inference.
    pub fn score_rows(&self, rows: &[Vec<u32>]) -> Result<Vec<f32>> {
        Ok(self.detached().scores(rows)?.to_vec1()?)
    }

    /// The weights under transformers' names: the decoder's `model.*` (dense: merge LoRA
    /// first) and `score.weight`; no `lm_head`.
    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        self.inner.state_dict()
    }

    /// Writes a model directory transformers' `AutoModelForSequenceClassification` and
    /// [`RewardModel::load`] read: `model.safetensors` (in the source config's dtype), the
    /// tokenizer and other side files of `source_dir`, and `source_dir`'s `config.json` with
    /// `architectures: [<Llama|Mistral|Qwen2>ForSequenceClassification]`, one label
    /// (`id2label`/`label2id`) and `pad_token_id`. Attached LoRA updates are not included:
    /// [`RewardModel::merge_lora`] first. An `out` already holding a model is refused.
    pub fn save(&self, source_dir: &Path, out: &Path) -> Result<SavedModel> {
        let source_config = source_dir.join("config.json");
        let config: Value = kiln_core::read_json(&source_config)?;
        self.inner
            .write_dir(config, &source_config, Some(source_dir), out, false)
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

/// `score.weight` must be there: otherwise the directory is not a sequence classifier.
/// `reward` picks the hint of the message: how to train a reward model, or what a classifier is.
fn require_score(weights: &SafetensorsWeights, dir: &Path, reward: bool) -> Result<()> {
    if weights.contains(SCORE_WEIGHT) {
        return Ok(());
    }
    let hint = if reward {
        "is not a reward model (a sequence classifier with a `score` head, e.g. \
         LlamaForSequenceClassification); train one from a causal LM with `kiln reward`"
    } else {
        "is not a sequence classifier (a decoder with a `score` head, e.g. \
         LlamaForSequenceClassification); a causal LM needs a classification head trained first"
    };
    Err(Error::InvalidInput(format!(
        "{}: tensor `{SCORE_WEIGHT}` not found: {} {hint}",
        files_of(weights),
        dir.display()
    )))
}

/// transformers' names for labels nobody named: `LABEL_0`, `LABEL_1`, ….
pub fn default_labels(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("LABEL_{i}")).collect()
}

/// The labels `config.json` declares, in id order: `id2label` (its keys must be `0..n`),
/// checked against `num_labels` and `label2id` when present; `LABEL_i` names from `num_labels`
/// alone; `None` when neither key is there. Errors name the file and key.
pub fn config_labels(config_json: &Path) -> Result<Option<Vec<String>>> {
    let raw: Value = kiln_core::read_json(config_json)?;
    let err = |key: &str, message: String| Error::config(config_json, key, message);
    let num_labels = match raw.get("num_labels") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|&n| n >= 1)
                .ok_or_else(|| err("num_labels", format!("expected an integer ≥ 1, found {v}")))?
                as usize,
        ),
    };
    let labels = match raw.get("id2label") {
        None | Some(Value::Null) => num_labels.map(default_labels),
        Some(Value::Object(map)) => {
            let mut labels: Vec<Option<String>> = vec![None; map.len()];
            for (key, name) in map {
                let id = key
                    .parse::<usize>()
                    .ok()
                    .filter(|&i| i < map.len())
                    .ok_or_else(|| {
                        err(
                            "id2label",
                            format!(
                                "key `{key}` is not a label id in 0..{} (ids must be 0, 1, …)",
                                map.len()
                            ),
                        )
                    })?;
                let name = name.as_str().ok_or_else(|| {
                    err(
                        "id2label",
                        format!("label {key}: expected a string, found {name}"),
                    )
                })?;
                labels[id] = Some(name.to_string());
            }
            let labels: Vec<String> = labels.into_iter().flatten().collect();
            if labels.len() != map.len() {
                return Err(err("id2label", "label ids repeat".into()));
            }
            if let Some(n) = num_labels
                && n != labels.len()
            {
                return Err(err(
                    "num_labels",
                    format!("{n} disagrees with id2label's {} labels", labels.len()),
                ));
            }
            Some(labels)
        }
        Some(other) => {
            return Err(err(
                "id2label",
                format!("expected an object of id → label, found {other}"),
            ));
        }
    };
    if let (Some(labels), Some(Value::Object(label2id))) = (&labels, raw.get("label2id")) {
        for (name, id) in label2id {
            let ok = id
                .as_u64()
                .and_then(|i| labels.get(i as usize))
                .is_some_and(|l| l == name);
            if !ok {
                return Err(err(
                    "label2id",
                    format!("`{name}` → {id} disagrees with id2label ({labels:?})"),
                ));
            }
        }
    }
    Ok(labels)
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
    num_labels: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let found = weights.shape_of(SCORE_WEIGHT).unwrap_or_default();
    let expected = [num_labels, config.hidden_size];
    if found != expected {
        let file = weights
            .file_of(SCORE_WEIGHT)
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let labels = if num_labels == 1 {
            "one label".to_string()
        } else {
            format!("{num_labels} labels")
        };
        return Err(Error::InvalidInput(format!(
            "{file}: tensor `{SCORE_WEIGHT}`: expected shape {expected:?} ({labels}, hidden size {}), found {found:?}",
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

/// A `[rows, hidden]` head from N(0, `std`²): ChaCha8 + Box–Muller, as [`crate::init`] draws.
fn init_head(
    rows: usize,
    hidden: usize,
    std: f64,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let values: Vec<f32> = (0..rows * hidden)
        .map(|_| {
            let u1: f64 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect();
    Ok(Tensor::from_vec(values, (rows, hidden), device)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_heads_are_seeded_and_scaled() {
        let a = init_head(1, 4096, 0.02, 7, DType::F32, &Device::Cpu).expect("head");
        let b = init_head(1, 4096, 0.02, 7, DType::F32, &Device::Cpu).expect("head");
        let c = init_head(1, 4096, 0.02, 8, DType::F32, &Device::Cpu).expect("head");
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
