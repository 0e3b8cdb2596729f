//! The guard classifier: a small decoder-only transformer with a `[num_labels, hidden]` score
//! head read at the last token, i.e. transformers' `LlamaForSequenceClassification` (and its
//! Mistral and Qwen2 twins). It is the reward model's code ([`SequenceClassifier`] in
//! kiln-model) with more than one output, so any checkpoint transformers can fine-tune as a
//! sequence classifier loads here, and what `kiln guard train` writes loads in transformers.
//!
//! Why a decoder and not a BERT-style encoder (what Meta's Prompt Guard uses): kiln has exactly
//! one transformer implementation, already fast on the CPU, already trained by kiln-train, and
//! a causal model read at its last token sees the whole text. Prompt Guard 2's recipe for long
//! inputs carries over: a text longer than the window is cut into windows, each is scored, and
//! per label the worst window wins (see [`GuardClassifier::classify`]).
//!
//! Inference is f32 on the CPU, one forward pass per window (no KV cache), on weights stored
//! transposed for the GEMM ([`SequenceClassifier::for_inference`]).

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device};
use kiln_core::{ModelDir, Tokenizer};
use kiln_model::reward::SequenceClassifier;

/// The longest window scored in one forward pass, in tokens (special tokens included); a
/// model whose `max_position_embeddings` is smaller uses that.
pub const WINDOW_TOKENS: usize = 512;

/// The label that means "nothing to flag": its probability is aggregated over windows by the
/// minimum, every other label's by the maximum.
pub const BENIGN: &str = "benign";

/// Windows scored per forward pass in [`GuardClassifier::classify_batch`] are capped at this
/// many tokens (rows × longest row), to bound the activations' memory.
const BATCH_TOKENS: usize = 8 * WINDOW_TOKENS;

/// Probabilities for one text, in the model's label order.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Scores {
    pub labels: Vec<(String, f32)>,
}

impl Scores {
    /// The probability of `label`; 0 when the model has no such label.
    pub fn get(&self, label: &str) -> f32 {
        self.labels
            .iter()
            .find(|(l, _)| l == label)
            .map_or(0.0, |(_, p)| *p)
    }

    /// The most probable label and its probability (the first of equals; `("", 0)` when there
    /// are no labels).
    pub fn top(&self) -> (&str, f32) {
        let mut best: Option<(&str, f32)> = None;
        for (label, p) in &self.labels {
            if best.is_none_or(|(_, b)| *p > b) {
                best = Some((label.as_str(), *p));
            }
        }
        best.unwrap_or(("", 0.0))
    }
}

/// A loaded guard classifier: the model laid out for inference and its tokenizer. `Send +
/// Sync`: share one behind an `Arc`; `classify` takes `&self`.
#[derive(Debug)]
pub struct GuardClassifier {
    model: SequenceClassifier,
    tokenizer: Tokenizer,
    labels: Vec<String>,
    /// What the tokenizer adds around a text (BOS, …), copied onto every window.
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    /// Content tokens per window (the window less `prefix` and `suffix`).
    stride: usize,
    dir: PathBuf,
}

impl GuardClassifier {
    /// A classifier directory as `kiln guard train` writes it or transformers saves a
    /// `LlamaForSequenceClassification` (Mistral/Qwen2 twins too): `config.json` with the
    /// labels (`id2label`, `num_labels`), `model.safetensors` with the decoder under `model.*`
    /// and `score.weight [num_labels, hidden]`, and `tokenizer.json`. Errors name the file and
    /// the key or tensor at fault.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let what = || format!("loading guard classifier {}", dir.display());
        let model = SequenceClassifier::load(dir, DType::F32, &Device::Cpu).with_context(what)?;
        let model_dir = ModelDir::resolve(&dir.to_string_lossy()).with_context(what)?;
        let tokenizer = Tokenizer::from_dir(model_dir.root()).with_context(what)?;
        let window = WINDOW_TOKENS.min(model.backbone().config().max_position_embeddings);
        Self::new(model, tokenizer, window, dir).with_context(what)
    }

    /// A classifier from a model and its tokenizer, scoring windows of `window` tokens.
    pub fn new(
        model: SequenceClassifier,
        tokenizer: Tokenizer,
        window: usize,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let (prefix, suffix) = special_tokens_around(&tokenizer)?;
        let specials = prefix.len() + suffix.len();
        if window <= specials {
            anyhow::bail!(
                "a window of {window} tokens leaves no room for text besides the tokenizer's {specials} special tokens"
            );
        }
        let labels = model.labels().to_vec();
        Ok(Self {
            model: model.for_inference()?,
            tokenizer,
            labels,
            prefix,
            suffix,
            stride: window - specials,
            dir: dir.to_path_buf(),
        })
    }

    /// The labels, in the model's order (`id2label`).
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The directory the classifier was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The model underneath (detached, weights laid out for inference).
    pub fn model(&self) -> &SequenceClassifier {
        &self.model
    }

    /// The windows `text` is scored as: its tokens (no chat template) cut into runs of at most
    /// the window less the special tokens, each wrapped in the tokenizer's special tokens (BOS
    /// where its post-processor adds one). An empty text is one window of special tokens only
    /// (or of the pad token, for a tokenizer that adds none).
    pub fn windows(&self, text: &str) -> anyhow::Result<Vec<Vec<u32>>> {
        let ids = self.tokenizer.encode(text, false)?;
        let wrap = |chunk: &[u32]| {
            let mut row = Vec::with_capacity(self.prefix.len() + chunk.len() + self.suffix.len());
            row.extend_from_slice(&self.prefix);
            row.extend_from_slice(chunk);
            row.extend_from_slice(&self.suffix);
            if row.is_empty() {
                row.push(self.model.pad_token_id().unwrap_or(0));
            }
            row
        };
        if ids.is_empty() {
            return Ok(vec![wrap(&[])]);
        }
        Ok(ids.chunks(self.stride).map(wrap).collect())
    }

    /// Probabilities for one text (softmax over the labels). A text longer than one window
    /// (512 tokens) is split into windows ([`GuardClassifier::windows`]) and scored per window;
    /// then, as Prompt Guard 2 recommends, every label other than `benign` takes its **maximum**
    /// over the windows (one injected paragraph flags the whole text), and `benign` takes its
    /// **minimum** (the least benign window). The values of a multi-window text therefore need
    /// not sum to 1; those of a one-window text are that window's softmax.
    pub fn classify(&self, text: &str) -> anyhow::Result<Scores> {
        let mut out = self.classify_batch(&[text])?;
        out.pop().context("classify: no scores came back")
    }

    /// [`GuardClassifier::classify`] for several texts: their windows run together, sorted by
    /// length into right-padded batches, so short texts are not padded to long ones.
    pub fn classify_batch(&self, texts: &[&str]) -> anyhow::Result<Vec<Scores>> {
        let mut windows: Vec<(usize, Vec<u32>)> = Vec::new();
        for (i, text) in texts.iter().enumerate() {
            windows.extend(self.windows(text)?.into_iter().map(|w| (i, w)));
        }
        windows.sort_by_key(|(_, w)| w.len());
        let n = self.labels.len();
        let benign = self.labels.iter().position(|l| l == BENIGN);
        let mut probs: Vec<Option<Vec<f32>>> = vec![None; texts.len()];
        let mut start = 0;
        while start < windows.len() {
            // Sorted by length: the last row of a batch is its longest.
            let mut end = start + 1;
            while end < windows.len() && (end + 1 - start) * windows[end].1.len() <= BATCH_TOKENS {
                end += 1;
            }
            let batch = &windows[start..end];
            let rows: Vec<Vec<u32>> = batch.iter().map(|(_, w)| w.clone()).collect();
            let logits = self.model.scores(&rows)?.to_vec2::<f32>()?;
            for ((text, _), logits) in batch.iter().zip(logits) {
                let p = softmax(&logits);
                probs[*text] = Some(match probs[*text].take() {
                    None => p,
                    Some(acc) => acc
                        .iter()
                        .zip(&p)
                        .enumerate()
                        .map(|(j, (&a, &b))| {
                            if Some(j) == benign {
                                a.min(b)
                            } else {
                                a.max(b)
                            }
                        })
                        .collect(),
                });
            }
            start = end;
        }
        probs
            .into_iter()
            .map(|p| {
                let p = p.context("classify: a text produced no window")?;
                debug_assert_eq!(p.len(), n);
                Ok(Scores {
                    labels: self.labels.iter().cloned().zip(p).collect(),
                })
            })
            .collect()
    }
}

/// The ids the tokenizer's post-processor puts before and after a text (`[BOS]`, `[]` for
/// Llama 3), found by encoding a probe with and without special tokens.
fn special_tokens_around(tokenizer: &Tokenizer) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
    let probe = "probe text";
    let plain = tokenizer.encode(probe, false)?;
    let full = tokenizer.encode(probe, true)?;
    let at = full
        .windows(plain.len().max(1))
        .position(|w| w == plain.as_slice());
    match at {
        Some(at) if !plain.is_empty() => {
            Ok((full[..at].to_vec(), full[at + plain.len()..].to_vec()))
        }
        _ => Ok((Vec::new(), Vec::new())),
    }
}

/// Softmax of logits, in f64 for the sum.
fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f64> = logits.iter().map(|&z| f64::from(z - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|&e| (e / sum) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn the_classifier_can_be_shared_across_threads() {
        assert_send_sync::<GuardClassifier>();
    }

    #[test]
    fn scores_pick_the_top_label_and_default_to_zero() {
        let s = Scores {
            labels: vec![
                ("benign".into(), 0.2),
                ("injection".into(), 0.7),
                ("toxic".into(), 0.1),
            ],
        };
        assert_eq!(s.top(), ("injection", 0.7));
        assert_eq!(s.get("toxic"), 0.1);
        assert_eq!(s.get("pii_request"), 0.0);
        assert_eq!(Scores { labels: vec![] }.top(), ("", 0.0));
    }

    #[test]
    fn softmax_is_a_distribution_that_survives_large_logits() {
        let p = softmax(&[1000.0, 1000.0, -1000.0]);
        assert!((p[0] - 0.5).abs() < 1e-6 && (p[1] - 0.5).abs() < 1e-6 && p[2] == 0.0);
    }
}
