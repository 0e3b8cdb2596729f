//! What one request contributes to drift detection, computed once and kept instead of the
//! text.
//!
//! The gateway computes [`SampleFeatures`] per request off the request path and keeps only
//! these in its windows, so extraction is one pass over the characters of the prompt (and a
//! word count of the completion), with no regex and no allocation per word beyond a reused
//! buffer.
//!
//! **Length units.** Lengths from text are words (whitespace-split); lengths from a trace's
//! `prompt_tokens` / `completion_tokens` are tokens, and token counts win when both are
//! given. Each length carries its [`LengthUnit`], and [`crate::drift::detect`] refuses to
//! compare windows whose units differ.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Width of the hashed n-gram embedding.
pub const EMBEDDING_DIM: usize = 256;

/// Weight of a character trigram relative to a word unigram or bigram in the embedding.
const TRIGRAM_WEIGHT: f32 = 0.5;

/// What a length is counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LengthUnit {
    /// Whitespace-separated words of the text.
    Words,
    /// Tokens, as the model's tokenizer counted them.
    Tokens,
}

impl std::fmt::Display for LengthUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Words => "words",
            Self::Tokens => "tokens",
        })
    }
}

/// The features of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleFeatures {
    /// Words (whitespace-split) of the prompt, or its `prompt_tokens` when given.
    pub prompt_length: f64,
    pub prompt_length_unit: LengthUnit,
    /// The prompt's lowercased alphanumeric words, hashed (FNV-1a 64 folded to 32 bits) — not
    /// the text.
    pub words: Vec<u32>,
    /// Signed feature hashing of word unigrams, word bigrams and character trigrams (of each
    /// word padded with spaces) into [`EMBEDDING_DIM`] dimensions, L2-normalized (all zeros
    /// for a prompt without words).
    pub embedding: Vec<f32>,
    /// Words of the completion, or `completion_tokens` when given.
    pub output_length: Option<f64>,
    /// Unit of `output_length` (meaningful when it is `Some`).
    pub output_length_unit: LengthUnit,
    /// Mean token entropy of the completion, when known.
    pub output_entropy: Option<f64>,
}

/// One request as logged: text and/or token counts.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sample {
    pub prompt: Option<String>,
    pub completion: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub output_entropy: Option<f64>,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_from(FNV_OFFSET, bytes)
}

fn fnv1a_from(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// A stable 32-bit id of a (lowercased) word: FNV-1a 64 folded to 32 bits.
pub fn word_id(word: &str) -> u32 {
    fold(fnv1a(word.as_bytes()))
}

fn fold(h: u64) -> u32 {
    (h ^ (h >> 32)) as u32
}

/// Final avalanche (splitmix64) so that index and sign bits are independent.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn add_hashed(emb: &mut [f32], h: u64, w: f32) {
    let z = mix(h);
    let idx = (z % EMBEDDING_DIM as u64) as usize;
    let sign = if z >> 63 == 1 { -1.0 } else { 1.0 };
    emb[idx] += sign * w;
}

/// Whitespace-separated word count.
pub fn word_count(text: &str) -> usize {
    text.split_whitespace().count()
}

struct PromptScan {
    whitespace_words: usize,
    words: Vec<u32>,
    embedding: Vec<f32>,
}

/// One pass over the prompt: whitespace word count, alphanumeric words (lowercased, hashed),
/// and the hashed n-gram embedding.
fn scan_prompt(text: &str) -> PromptScan {
    let mut emb = vec![0.0f32; EMBEDDING_DIM];
    let mut words = Vec::new();
    let mut whitespace_words = 0;
    let mut in_ws_word = false;
    let mut buf = String::new();
    let mut prev: Option<u64> = None;
    let mut flush = |buf: &mut String, prev: &mut Option<u64>, emb: &mut [f32]| {
        if buf.is_empty() {
            return;
        }
        let h = fnv1a(buf.as_bytes());
        words.push(fold(h));
        add_hashed(emb, h, 1.0);
        if let Some(p) = *prev {
            // Bigram: continue hashing the previous word's hash with a separator and this one.
            add_hashed(emb, fnv1a_from(p ^ 0x20, buf.as_bytes()), 1.0);
        }
        *prev = Some(h);
        // Character trigrams of " word ".
        let chars: Vec<char> = std::iter::once(' ')
            .chain(buf.chars())
            .chain(std::iter::once(' '))
            .collect();
        let mut tmp = [0u8; 12];
        for win in chars.windows(3) {
            let mut n = 0;
            for c in win {
                n += c.encode_utf8(&mut tmp[n..]).len();
            }
            add_hashed(emb, fnv1a_from(0x9e37_79b9, &tmp[..n]), TRIGRAM_WEIGHT);
        }
        buf.clear();
    };
    for c in text.chars() {
        if c.is_whitespace() {
            in_ws_word = false;
        } else if !in_ws_word {
            in_ws_word = true;
            whitespace_words += 1;
        }
        if c.is_alphanumeric() {
            buf.extend(c.to_lowercase());
        } else {
            flush(&mut buf, &mut prev, &mut emb);
        }
    }
    flush(&mut buf, &mut prev, &mut emb);
    let norm = emb.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in &mut emb {
            *x /= norm;
        }
    }
    PromptScan {
        whitespace_words,
        words,
        embedding: emb,
    }
}

impl SampleFeatures {
    /// Features of a request given as text; lengths are in words.
    pub fn from_text(prompt: &str, completion: Option<&str>, output_entropy: Option<f64>) -> Self {
        let scan = scan_prompt(prompt);
        Self {
            prompt_length: scan.whitespace_words as f64,
            prompt_length_unit: LengthUnit::Words,
            words: scan.words,
            embedding: scan.embedding,
            output_length: completion.map(|c| word_count(c) as f64),
            output_length_unit: LengthUnit::Words,
            output_entropy,
        }
    }

    /// Features of a logged sample. Token counts, when given, are the lengths (unit
    /// [`LengthUnit::Tokens`]); otherwise the words of the text. `None` when the sample has
    /// neither a prompt nor `prompt_tokens`. A sample with only token counts has no words and
    /// a zero embedding.
    pub fn from_sample(s: &Sample) -> Option<Self> {
        let mut f = match (&s.prompt, s.prompt_tokens) {
            (Some(p), _) => Self::from_text(p, s.completion.as_deref(), s.output_entropy),
            (None, Some(_)) => Self {
                prompt_length: 0.0,
                prompt_length_unit: LengthUnit::Tokens,
                words: Vec::new(),
                embedding: vec![0.0; EMBEDDING_DIM],
                output_length: s.completion.as_deref().map(|c| word_count(c) as f64),
                output_length_unit: LengthUnit::Words,
                output_entropy: s.output_entropy,
            },
            (None, None) => return None,
        };
        if let Some(t) = s.prompt_tokens {
            f.prompt_length = t as f64;
            f.prompt_length_unit = LengthUnit::Tokens;
        }
        if let Some(t) = s.completion_tokens {
            f.output_length = Some(t as f64);
            f.output_length_unit = LengthUnit::Tokens;
        }
        Some(f)
    }

    /// Whether the prompt contributed text (words and an embedding).
    pub fn has_text(&self) -> bool {
        self.embedding.iter().any(|x| *x != 0.0) || !self.words.is_empty()
    }
}

/// Why a file of samples could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SampleFileError {
    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    Row {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Reads a JSONL file of traffic, one [`Sample`] per row; blank lines are skipped.
///
/// A row is `{"prompt"}`, `{"prompt", "completion"}`, `{"messages": [...]}` (TRL's
/// conversational format: the prompt is the user messages joined with newlines, the completion
/// the last message when it is the assistant's), or a trace export (`kiln monitor traces`)
/// carrying numeric `prompt_tokens`, `completion_tokens` and `mean_entropy` (alias
/// `output_entropy`), with or without text. `prompt` and `completion` may be a string or a
/// messages array. A row with none of `prompt`, `messages` and `prompt_tokens` is an error.
pub fn read_samples(path: &Path) -> Result<Vec<Sample>, SampleFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| SampleFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let error = |message: String| SampleFileError::Row {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let row: Value =
            serde_json::from_str(line).map_err(|e| error(format!("not valid JSON: {e}")))?;
        let sample = sample_from_row(&row).map_err(error)?;
        if sample.prompt.is_none() && sample.prompt_tokens.is_none() {
            return Err(error(
                "expected `prompt`, `messages` or `prompt_tokens`".into(),
            ));
        }
        out.push(sample);
    }
    Ok(out)
}

/// The text of a message's `content`: a string, or a list of `{"type": "text", "text": ...}`.
fn content_text(content: &Value) -> Result<String, String> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => Ok(parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n")),
        _ => Err("expected `content` to be a string or a list of text parts".into()),
    }
}

/// `(role, text)` of each message of a messages array.
fn messages(v: &Value, field: &str) -> Result<Vec<(String, String)>, String> {
    let arr = v
        .as_array()
        .ok_or_else(|| format!("expected `{field}` to be a string or a messages array"))?;
    arr.iter()
        .map(|m| {
            let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
                format!("expected each message of `{field}` to have a string `role`")
            })?;
            Ok((
                role.to_string(),
                content_text(m.get("content").unwrap_or(&Value::Null))?,
            ))
        })
        .collect()
}

fn join_roles(msgs: &[(String, String)], roles: &[&str]) -> String {
    msgs.iter()
        .filter(|(r, _)| roles.contains(&r.as_str()))
        .map(|(_, t)| t.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

fn text_field(row: &Value, field: &str, roles: &[&str]) -> Result<Option<String>, String> {
    match row.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Ok(Some(join_roles(&messages(v, field)?, roles))),
    }
}

fn count_field(row: &Value, field: &str) -> Result<Option<u64>, String> {
    match row.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("expected `{field}` to be a non-negative integer, got {v}")),
    }
}

/// A [`Sample`] from one JSONL row (see [`read_samples`]); the message says what was expected.
pub fn sample_from_row(row: &Value) -> Result<Sample, String> {
    if !row.is_object() {
        return Err("expected a JSON object".into());
    }
    let mut prompt = text_field(row, "prompt", &["user"])?;
    let mut completion = text_field(row, "completion", &["assistant"])?;
    if let Some(v) = row.get("messages").filter(|v| !v.is_null()) {
        let mut msgs = messages(v, "messages")?;
        if completion.is_none() && msgs.last().is_some_and(|(r, _)| r == "assistant") {
            completion = msgs.pop().map(|(_, t)| t);
        }
        if prompt.is_none() {
            prompt = Some(join_roles(&msgs, &["user"]));
        }
    }
    let output_entropy = match row
        .get("mean_entropy")
        .or_else(|| row.get("output_entropy"))
    {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_f64()
                .ok_or_else(|| format!("expected `mean_entropy` to be a number, got {v}"))?,
        ),
    };
    Ok(Sample {
        prompt,
        completion,
        prompt_tokens: count_field(row, "prompt_tokens")?,
        completion_tokens: count_field(row, "completion_tokens")?,
        output_entropy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_lowercased_alphanumeric_and_hashed() {
        let f = SampleFeatures::from_text("Hello, WORLD! hello-world", Some("a b c"), None);
        assert_eq!(f.prompt_length, 3.0);
        assert_eq!(
            f.words,
            vec![
                word_id("hello"),
                word_id("world"),
                word_id("hello"),
                word_id("world")
            ]
        );
        assert_eq!(f.output_length, Some(3.0));
        let norm: f32 = f.embedding.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-5);
    }

    #[test]
    fn empty_prompt_has_zero_embedding() {
        let f = SampleFeatures::from_text("  ", None, None);
        assert_eq!(f.prompt_length, 0.0);
        assert!(f.embedding.iter().all(|x| *x == 0.0));
    }

    #[test]
    fn token_counts_win_over_words() {
        let s = Sample {
            prompt: Some("one two".into()),
            completion: Some("x".into()),
            prompt_tokens: Some(7),
            completion_tokens: Some(9),
            output_entropy: Some(1.5),
        };
        let f = SampleFeatures::from_sample(&s).unwrap_or_else(|| panic!("features"));
        assert_eq!(f.prompt_length, 7.0);
        assert_eq!(f.prompt_length_unit, LengthUnit::Tokens);
        assert_eq!(f.output_length, Some(9.0));
        assert_eq!(f.output_length_unit, LengthUnit::Tokens);
        assert_eq!(f.words.len(), 2);
        assert!(SampleFeatures::from_sample(&Sample::default()).is_none());
    }

    fn row(s: &str) -> Result<Sample, String> {
        sample_from_row(&serde_json::from_str(s).map_err(|e| e.to_string())?)
    }

    #[test]
    fn conversational_rows_split_prompt_and_completion() {
        let s = row(r#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi there"},{"role":"assistant","content":"hello"}]}"#).unwrap_or_default();
        assert_eq!(
            s.prompt.as_deref(),
            Some("hi there"),
            "system messages are not the prompt"
        );
        assert_eq!(s.completion.as_deref(), Some("hello"));
    }

    #[test]
    fn trace_rows_carry_counts_and_entropy() {
        let s = row(r#"{"prompt_tokens":12,"completion_tokens":30,"mean_entropy":1.25}"#)
            .unwrap_or_default();
        assert_eq!((s.prompt_tokens, s.completion_tokens), (Some(12), Some(30)));
        assert_eq!(s.output_entropy, Some(1.25));
    }

    #[test]
    fn bad_rows_say_what_was_expected() {
        assert!(row("[1]").is_err_and(|e| e.contains("JSON object")));
        assert!(row(r#"{"prompt":3}"#).is_err_and(|e| e.contains("`prompt`")));
        assert!(row(r#"{"prompt_tokens":-1}"#).is_err_and(|e| e.contains("non-negative")));
    }
}
