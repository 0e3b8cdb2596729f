//! Preference data for DPO and reward modelling: TRL's preference format (`prompt`, `chosen`,
//! `rejected`, strings or message lists; or `chosen` + `rejected` with the prompt implicit in
//! both), read from JSON lines or Parquet and tokenized exactly as TRL 1.x does.
//!
//! Tokenization follows `DPOTrainer._prepare_dataset` (and `RewardTrainer`, whose sequences are
//! the same `prompt ⧺ completion`):
//! * an implicit prompt is extracted as `trl.extract_prompt` does: the longest common prefix of
//!   `chosen` and `rejected` (messages for conversations, characters for text, a trailing space
//!   left with the completion);
//! * standard text: EOS is appended to `chosen` and `rejected` unless they end with it. For DPO
//!   the prompt and each completion are tokenized separately without special tokens and
//!   concatenated (the semantics of the reference fixtures' `completion_logps`, computed with
//!   transformers; TRL 1.16 itself encodes `tokenizer(prompt + chosen)` with special tokens,
//!   which differs by the BOS token of tokenizers that add one). For reward modelling the whole
//!   `prompt + completion` is encoded with special tokens, as `RewardTrainer` does and as
//!   `kiln eval reward` scores text;
//! * conversations: `apply_chat_template(prompt, add_generation_prompt=True)` and
//!   `apply_chat_template(prompt + chosen)`, tokenized without special tokens;
//! * the completion starts where the tokenized prompt and both tokenized `prompt ⧺ completion`
//!   diverge (`common_prefix_length`), so `prompt_ids ⧺ chosen_ids` is exactly the tokenization
//!   of the whole text; rows where a merge crosses the boundary are counted in
//!   [`PreferenceDataset::prompt_mismatches`] (TRL warns once).
//!
//! Rows that cannot teach a preference are *invalid pairs*: an empty `chosen` or `rejected`, the
//! two identical, or a pair that does not fit `max_length` (DPO: the prompt alone fills it, as
//! TRL's `keep_start` filter has it; reward modelling: either whole sequence is longer, as
//! `RewardTrainer` filters). They are counted and skipped with their row and reason, or rejected
//! with [`InvalidPairs::Error`]. Malformed rows (a missing column, a wrong type) are always an
//! error naming the file and line.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_core::{Error, Result, Tokenizer};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::sft_data::{
    RowId, dataset_files, expected, for_each_row, invalid, parse_messages, strip_nulls, take,
};

/// What to do with a pair that cannot teach a preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InvalidPairs {
    /// Count it, report it, and train on the rest (the default).
    #[default]
    Skip,
    /// Stop before training, naming the row.
    Error,
}

/// The recipe the pairs are for, which decides how standard text is tokenized and which pairs
/// fit `max_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairRecipe {
    /// DPO: prompt and completion (EOS appended) tokenized separately without special tokens
    /// and concatenated; the prompt must leave room for a completion token (TRL's `keep_start`
    /// filter), and longer sequences are cut at `max_length` when batched.
    Dpo,
    /// Reward modelling: `tokenizer(prompt + completion + eos)` with special tokens, as
    /// `RewardTrainer` encodes it; both whole sequences must fit, as nothing may be cut from the
    /// end a reward is read at.
    Reward,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefDataOptions {
    pub max_length: usize,
    pub recipe: PairRecipe,
    pub on_invalid: InvalidPairs,
}

/// One tokenized preference pair.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    /// Where the row came from: `file:line`.
    pub row: String,
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
    /// The row's `margin` column (reward modelling), if any.
    pub margin: Option<f64>,
}

impl PreferencePair {
    /// `prompt ⧺ chosen`: the whole chosen sequence.
    pub fn chosen_sequence(&self) -> Vec<u32> {
        [self.prompt_ids.as_slice(), &self.chosen_ids].concat()
    }

    /// `prompt ⧺ rejected`: the whole rejected sequence.
    pub fn rejected_sequence(&self) -> Vec<u32> {
        [self.prompt_ids.as_slice(), &self.rejected_ids].concat()
    }
}

/// A pair left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedPair {
    pub row: String,
    pub reason: String,
}

/// A tokenized preference dataset and what loading it did.
#[derive(Debug, Clone)]
pub struct PreferenceDataset {
    pub pairs: Vec<PreferencePair>,
    pub conversational: bool,
    /// Rows read from the files.
    pub rows: usize,
    /// Invalid pairs left out (with [`InvalidPairs::Skip`]).
    pub skipped: Vec<SkippedPair>,
    /// Rows whose tokenized prompt is not a prefix of the tokenized whole text.
    pub prompt_mismatches: usize,
    pub files: Vec<PathBuf>,
}

impl PreferenceDataset {
    /// Holds out `eval_fraction` of the pairs (at least one when above 0 and at least one left
    /// for training when there are two or more), picked by a generator seeded with `seed`; both
    /// halves keep file order.
    pub fn split(self, eval_fraction: f64, seed: u64) -> (Self, Self) {
        let n = self.pairs.len();
        let fraction = eval_fraction.clamp(0.0, 1.0);
        let mut n_eval = (n as f64 * fraction).round() as usize;
        if n >= 2 {
            if fraction > 0.0 {
                n_eval = n_eval.max(1);
            }
            n_eval = n_eval.min(n - 1);
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let mut is_eval = vec![false; n];
        for &i in &order[..n_eval] {
            is_eval[i] = true;
        }
        let (eval, train): (Vec<_>, Vec<_>) =
            self.pairs.into_iter().zip(is_eval).partition(|(_, e)| *e);
        let with = |pairs: Vec<(PreferencePair, bool)>| Self {
            pairs: pairs.into_iter().map(|(p, _)| p).collect(),
            conversational: self.conversational,
            rows: self.rows,
            skipped: self.skipped.clone(),
            prompt_mismatches: self.prompt_mismatches,
            files: self.files.clone(),
        };
        (with(train), with(eval))
    }

    /// A one-line account of the skipped pairs by reason, or `None` when none was skipped.
    pub fn skipped_summary(&self) -> Option<String> {
        if self.skipped.is_empty() {
            return None;
        }
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for s in &self.skipped {
            let reason = s.reason.split(':').next().unwrap_or(&s.reason);
            match counts.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, n)) => *n += 1,
                None => counts.push((reason, 1)),
            }
        }
        let parts: Vec<String> = counts.iter().map(|(r, n)| format!("{n} {r}")).collect();
        Some(format!(
            "skipped {} of {} preference pairs ({}); first: {}: {}",
            self.skipped.len(),
            self.rows,
            parts.join(", "),
            self.skipped[0].row,
            self.skipped[0].reason
        ))
    }
}

/// A preference row before tokenization.
enum Pair {
    Text {
        prompt: String,
        chosen: String,
        rejected: String,
    },
    Messages {
        prompt: Vec<Value>,
        chosen: Vec<Value>,
        rejected: Vec<Value>,
    },
}

/// Why a pair is invalid, for [`SkippedPair::reason`] (the text before `:` is its kind).
#[derive(Clone)]
enum Invalid {
    Empty(&'static str),
    Identical,
    TooLong(String),
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty(key) => write!(f, "empty completion: `{key}` has no content"),
            Self::Identical => f.write_str("identical completions: `chosen` equals `rejected`"),
            Self::TooLong(msg) => write!(f, "too long: {msg}"),
        }
    }
}

/// One dataset holds one kind of rows: standard text or conversational. Remembers the first
/// row's kind and refuses a row of the other, naming both rows.
#[derive(Default)]
struct OneKind {
    first: Option<(bool, RowId)>,
}

impl OneKind {
    fn check(&mut self, id: &RowId, conversational: bool, what: &str) -> Result<()> {
        let name = |c: bool| {
            if c {
                "conversational"
            } else {
                "standard (text)"
            }
        };
        match &self.first {
            None => self.first = Some((conversational, id.clone())),
            Some((first, first_id)) if *first != conversational => {
                return Err(invalid(
                    id,
                    format!(
                        "row is {} {what}, but the dataset is {} (from {first_id}); one dataset holds one kind",
                        name(conversational),
                        name(*first)
                    ),
                ));
            }
            Some(_) => {}
        }
        Ok(())
    }
}

/// Reads, checks and tokenizes a preference dataset (see the module docs for the rules).
pub fn load_preference_dataset(
    path: &Path,
    tokenizer: &Tokenizer,
    opts: &PrefDataOptions,
) -> Result<PreferenceDataset> {
    if opts.max_length < 2 {
        return Err(Error::InvalidInput(format!(
            "max_length {} is too short: a preference sequence needs at least 2 tokens",
            opts.max_length
        )));
    }
    let files = dataset_files(path)?;
    let mut rows: Vec<(RowId, Parsed)> = Vec::new();
    let mut kind = OneKind::default();
    for file in &files {
        let file: Arc<Path> = Arc::from(file.as_path());
        for_each_row(&file, &mut |id, value| {
            let parsed = parse_row(&id, value)?;
            if let Ok((pair, _)) = &parsed {
                kind.check(
                    &id,
                    matches!(pair, Pair::Messages { .. }),
                    "preference data",
                )?;
            }
            rows.push((id, parsed));
            Ok(())
        })?;
    }
    if rows.is_empty() {
        return Err(Error::InvalidInput(format!(
            "dataset_path {}: no rows",
            path.display()
        )));
    }
    let conversational = kind.first.as_ref().is_some_and(|(c, _)| *c);
    let encoder = PairEncoder::new(tokenizer, conversational, opts.recipe)?;
    let encoded: Vec<Result<(std::result::Result<PreferencePair, Invalid>, bool)>> = rows
        .par_iter()
        .map(|(id, parsed)| match parsed {
            Err(why) => Ok((Err(why.clone()), false)),
            Ok((pair, margin)) => {
                let (pair, mismatch) = encoder.encode(id, pair, *margin)?;
                Ok((fits(pair, opts), mismatch))
            }
        })
        .collect();
    let mut pairs = Vec::with_capacity(rows.len());
    let mut skipped = Vec::new();
    let mut prompt_mismatches = 0;
    for ((id, _), result) in rows.iter().zip(encoded) {
        let (pair, mismatch) = result?;
        prompt_mismatches += usize::from(mismatch);
        match pair {
            Ok(pair) => pairs.push(pair),
            Err(why) if opts.on_invalid == InvalidPairs::Error => {
                return Err(invalid(
                    id,
                    format!("{why} (set on_invalid_pair: skip to leave such pairs out)"),
                ));
            }
            Err(why) => skipped.push(SkippedPair {
                row: id.to_string(),
                reason: why.to_string(),
            }),
        }
    }
    if pairs.is_empty() {
        return Err(Error::InvalidInput(format!(
            "dataset_path {}: none of the {} rows is a usable preference pair (first: {}: {})",
            path.display(),
            rows.len(),
            skipped.first().map_or("", |s| s.row.as_str()),
            skipped.first().map_or("", |s| s.reason.as_str()),
        )));
    }
    Ok(PreferenceDataset {
        pairs,
        conversational,
        rows: rows.len(),
        skipped,
        prompt_mismatches,
        files,
    })
}

/// The pair if it fits `max_length` under the options' rule.
fn fits(
    pair: PreferencePair,
    opts: &PrefDataOptions,
) -> std::result::Result<PreferencePair, Invalid> {
    let max = opts.max_length;
    let prompt = pair.prompt_ids.len();
    match opts.recipe {
        PairRecipe::Dpo if prompt >= max => Err(Invalid::TooLong(format!(
            "the prompt is {prompt} tokens, and max_length {max} leaves no room for a completion"
        ))),
        PairRecipe::Reward => {
            let longest = prompt + pair.chosen_ids.len().max(pair.rejected_ids.len());
            if longest > max {
                Err(Invalid::TooLong(format!(
                    "{longest} tokens with the prompt, above max_length {max}"
                )))
            } else {
                Ok(pair)
            }
        }
        PairRecipe::Dpo => Ok(pair),
    }
}

/// A parsed row: the pair and its `margin`, or why it is invalid.
type Parsed = std::result::Result<(Pair, Option<f64>), Invalid>;

/// Parses one row; an invalid pair is `Ok(Err(..))`, a malformed row an error.
fn parse_row(id: &RowId, value: Value) -> Result<Parsed> {
    let Value::Object(mut row) = value else {
        return Err(expected(id, "the row", "a JSON object", &value));
    };
    strip_nulls(&mut row);
    if row
        .get("tools")
        .is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(invalid(
            id,
            "`tools` is not supported yet; remove the column to train without it",
        ));
    }
    let margin = match row.remove("margin") {
        None => None,
        Some(Value::Number(n)) => n.as_f64(),
        Some(other) => return Err(expected(id, "`margin`", "a number", &other)),
    };
    let chosen = take(id, &mut row, "chosen")?;
    let rejected = take(id, &mut row, "rejected")?;
    let prompt = row.remove("prompt");
    let pair = match (prompt, chosen, rejected) {
        (None, Value::String(c), Value::String(r)) => text_pair(None, c, r),
        (Some(Value::String(p)), Value::String(c), Value::String(r)) => text_pair(Some(p), c, r),
        (prompt @ (None | Some(Value::Array(_))), c @ Value::Array(_), r @ Value::Array(_)) => {
            let chosen = parse_messages(id, "chosen", c)?;
            let rejected = parse_messages(id, "rejected", r)?;
            let prompt = match prompt {
                Some(p) => parse_messages(id, "prompt", p)?,
                None => Vec::new(),
            };
            message_pair(prompt, chosen, rejected)
        }
        (Some(p), c, r) => {
            let kind = if p.is_array() {
                "a list of messages (like `prompt`)"
            } else {
                "a string (like `prompt`)"
            };
            if c.is_array() != p.is_array() {
                return Err(expected(id, "`chosen`", kind, &c));
            }
            if !p.is_array() && !p.is_string() {
                return Err(expected(
                    id,
                    "`prompt`",
                    "a string or a list of messages",
                    &p,
                ));
            }
            return Err(expected(id, "`rejected`", kind, &r));
        }
        (None, c, r) => {
            if !c.is_array() && !c.is_string() {
                return Err(expected(
                    id,
                    "`chosen`",
                    "a string or a list of messages",
                    &c,
                ));
            }
            let kind = if c.is_array() {
                "a list of messages (like `chosen`)"
            } else {
                "a string (like `chosen`)"
            };
            return Err(expected(id, "`rejected`", kind, &r));
        }
    };
    Ok(pair.map(|p| (p, margin)))
}

fn text_pair(
    prompt: Option<String>,
    chosen: String,
    rejected: String,
) -> std::result::Result<Pair, Invalid> {
    let (prompt, chosen, rejected) = match prompt {
        Some(p) => (p, chosen, rejected),
        None => {
            // `trl.extract_prompt`: the longest common prefix, a space before the split kept
            // with the completions.
            let mut idx = chosen
                .char_indices()
                .zip(rejected.chars())
                .find(|((_, a), b)| a != b)
                .map_or(chosen.len().min(rejected.len()), |((i, _), _)| i);
            if idx > 0 && chosen[..idx].ends_with(' ') {
                idx -= 1;
            }
            (
                chosen[..idx].to_string(),
                chosen[idx..].to_string(),
                rejected[idx..].to_string(),
            )
        }
    };
    if chosen.trim().is_empty() {
        return Err(Invalid::Empty("chosen"));
    }
    if rejected.trim().is_empty() {
        return Err(Invalid::Empty("rejected"));
    }
    if chosen == rejected {
        return Err(Invalid::Identical);
    }
    Ok(Pair::Text {
        prompt,
        chosen,
        rejected,
    })
}

fn message_pair(
    prompt: Vec<Value>,
    chosen: Vec<Value>,
    rejected: Vec<Value>,
) -> std::result::Result<Pair, Invalid> {
    let (prompt, chosen, rejected) = if prompt.is_empty() {
        let shared = chosen
            .iter()
            .zip(&rejected)
            .take_while(|(a, b)| a == b)
            .count();
        (
            chosen[..shared].to_vec(),
            chosen[shared..].to_vec(),
            rejected[shared..].to_vec(),
        )
    } else {
        (prompt, chosen, rejected)
    };
    let empty = |m: &[Value]| {
        m.iter().all(|m| {
            m.get("content")
                .and_then(Value::as_str)
                .is_none_or(|c| c.trim().is_empty())
        })
    };
    if empty(&chosen) {
        return Err(Invalid::Empty("chosen"));
    }
    if empty(&rejected) {
        return Err(Invalid::Empty("rejected"));
    }
    if chosen == rejected {
        return Err(Invalid::Identical);
    }
    Ok(Pair::Messages {
        prompt,
        chosen,
        rejected,
    })
}

struct PairEncoder<'a> {
    tokenizer: &'a Tokenizer,
    eos: String,
    recipe: PairRecipe,
}

impl<'a> PairEncoder<'a> {
    fn new(tokenizer: &'a Tokenizer, conversational: bool, recipe: PairRecipe) -> Result<Self> {
        let eos = tokenizer.special_token("eos_token").map(str::to_string);
        let eos = match eos {
            Some(eos) => eos,
            None if conversational => String::new(),
            None => {
                return Err(Error::InvalidInput(
                    "the tokenizer has no `eos_token` (tokenizer_config.json); preference training on standard text appends it to every completion".into(),
                ));
            }
        };
        if conversational && tokenizer.chat_template().is_none() {
            return Err(Error::InvalidInput(
                "the dataset is conversational, but the tokenizer has no chat template to render it with".into(),
            ));
        }
        Ok(Self {
            tokenizer,
            eos,
            recipe,
        })
    }

    /// The tokenized pair, and whether the prompt's tokens are not a prefix of the whole.
    fn encode(
        &self,
        id: &RowId,
        pair: &Pair,
        margin: Option<f64>,
    ) -> Result<(PreferencePair, bool)> {
        let at = |e: Error| invalid(id, e);
        let (prompt_ids, chosen_all, rejected_all) = match pair {
            Pair::Text {
                prompt,
                chosen,
                rejected,
            } => {
                let with_eos = |t: &str| {
                    if t.ends_with(&self.eos) {
                        t.to_string()
                    } else {
                        format!("{t}{}", self.eos)
                    }
                };
                match self.recipe {
                    // DPO: prompt and completion tokenized separately, without special tokens,
                    // and concatenated.
                    PairRecipe::Dpo => {
                        let prompt_ids = self.tokenizer.encode(prompt, false).map_err(at)?;
                        let completion = |c: &str| -> Result<Vec<u32>> {
                            let ids = self.tokenizer.encode(&with_eos(c), false).map_err(at)?;
                            Ok([prompt_ids.as_slice(), &ids].concat())
                        };
                        let (c, r) = (completion(chosen)?, completion(rejected)?);
                        (prompt_ids, c, r)
                    }
                    // Reward modelling: `tokenizer(prompt + completion)`, special tokens added.
                    PairRecipe::Reward => {
                        let whole = |c: &str| {
                            self.tokenizer
                                .encode(&format!("{prompt}{}", with_eos(c)), true)
                        };
                        (
                            self.tokenizer.encode(prompt, true).map_err(at)?,
                            whole(chosen).map_err(at)?,
                            whole(rejected).map_err(at)?,
                        )
                    }
                }
            }
            Pair::Messages {
                prompt,
                chosen,
                rejected,
            } => {
                let render = |messages: &[Value], generation_prompt: bool| -> Result<Vec<u32>> {
                    let text = self
                        .tokenizer
                        .apply_chat_template(&messages, generation_prompt)
                        .map_err(at)?;
                    self.tokenizer.encode(&text, false).map_err(at)
                };
                let whole = |completion: &[Value]| {
                    let messages: Vec<Value> = prompt.iter().chain(completion).cloned().collect();
                    render(&messages, false)
                };
                let prompt_ids = if prompt.is_empty() {
                    Vec::new()
                } else {
                    render(prompt, true)?
                };
                (prompt_ids, whole(chosen)?, whole(rejected)?)
            }
        };
        let shared = |ids: &[u32]| {
            prompt_ids
                .iter()
                .zip(ids)
                .take_while(|(a, b)| a == b)
                .count()
        };
        let prompt_len = shared(&chosen_all).min(shared(&rejected_all));
        let mismatch = prompt_len < prompt_ids.len();
        Ok((
            PreferencePair {
                row: id.to_string(),
                prompt_ids: prompt_ids[..prompt_len].to_vec(),
                chosen_ids: chosen_all[prompt_len..].to_vec(),
                rejected_ids: rejected_all[prompt_len..].to_vec(),
                margin,
            },
            mismatch,
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Unpaired preference data

/// One row of TRL's unpaired preference format (`{"prompt", "completion", "label"}`), the data
/// KTO trains on: a completion judged desirable (`label: true`) or not, with no partner.
#[derive(Debug, Clone, PartialEq)]
pub struct UnpairedRow {
    /// A string (standard) or a list of messages (conversational).
    pub prompt: Value,
    /// Of the same kind as `prompt`: a string, or a list of (assistant) messages.
    pub completion: Value,
    /// Whether the completion is desirable.
    pub label: bool,
}

impl UnpairedRow {
    /// Whether the row is conversational (message lists) rather than standard text.
    pub fn is_conversational(&self) -> bool {
        self.prompt.is_array()
    }
}

/// Reads unpaired preference data (JSON lines, a `.json` array or Parquet; a file or a directory
/// of them), checking every row: a missing `prompt`, `completion` or `label`, or a value of the
/// wrong type, is an error naming the file, line and key, as are an empty completion and a row
/// whose kind (standard or conversational) differs from the first row's. Nothing is tokenized.
pub fn read_unpaired_preferences(path: &Path) -> Result<Vec<UnpairedRow>> {
    let files = dataset_files(path)?;
    let mut rows = Vec::new();
    let mut kind = OneKind::default();
    for file in &files {
        let file: Arc<Path> = Arc::from(file.as_path());
        for_each_row(&file, &mut |id, value| {
            let row = parse_unpaired_row(&id, value)?;
            kind.check(&id, row.is_conversational(), "unpaired preference data")?;
            rows.push(row);
            Ok(())
        })?;
    }
    if rows.is_empty() {
        return Err(Error::InvalidInput(format!(
            "dataset_path {}: no rows",
            path.display()
        )));
    }
    Ok(rows)
}

fn parse_unpaired_row(id: &RowId, value: Value) -> Result<UnpairedRow> {
    let Value::Object(mut row) = value else {
        return Err(expected(id, "the row", "a JSON object", &value));
    };
    strip_nulls(&mut row);
    if row.contains_key("chosen") || row.contains_key("rejected") {
        return Err(invalid(
            id,
            "paired preference data (`chosen`, `rejected`), not unpaired (`prompt`, `completion`, `label`); `kiln dpo` reads it",
        ));
    }
    let prompt = take(id, &mut row, "prompt")?;
    let completion = take(id, &mut row, "completion")?;
    let label = match take(id, &mut row, "label")? {
        Value::Bool(b) => b,
        other => return Err(expected(id, "`label`", "a boolean", &other)),
    };
    let (prompt, completion) = match prompt {
        Value::String(p) => match completion {
            Value::String(c) if c.trim().is_empty() => {
                return Err(invalid(id, "`completion` is empty"));
            }
            Value::String(c) => (Value::String(p), Value::String(c)),
            other => {
                return Err(expected(
                    id,
                    "`completion`",
                    "a string (like `prompt`)",
                    &other,
                ));
            }
        },
        p @ Value::Array(_) => {
            if !completion.is_array() {
                let kind = "a list of messages (like `prompt`)";
                return Err(expected(id, "`completion`", kind, &completion));
            }
            (
                Value::Array(parse_messages(id, "prompt", p)?),
                Value::Array(parse_messages(id, "completion", completion)?),
            )
        }
        other => {
            return Err(expected(
                id,
                "`prompt`",
                "a string or a list of messages",
                &other,
            ));
        }
    };
    Ok(UnpairedRow {
        prompt,
        completion,
        label,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> (tempfile::TempDir, Result<Vec<UnpairedRow>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kto.jsonl");
        std::fs::write(&path, text).unwrap();
        let rows = read_unpaired_preferences(&path);
        (dir, rows)
    }

    fn err(text: &str) -> String {
        read(text).1.unwrap_err().to_string()
    }

    #[test]
    fn unpaired_rows_of_both_kinds_are_read_with_their_labels() {
        let (_dir, rows) = read(concat!(
            r#"{"prompt": "2+2=", "completion": " 4", "label": true}"#,
            "\n\n",
            r#"{"prompt": "2+2=", "completion": " 5", "label": false, "extra": 1}"#,
            "\n"
        ));
        let rows = rows.unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].completion, Value::String(" 4".into()));
        assert!(rows[0].label && !rows[1].label);
        assert!(!rows[0].is_conversational());

        let (_dir, rows) = read(concat!(
            r#"{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "hello"}], "label": false}"#,
            "\n"
        ));
        let rows = rows.unwrap();
        assert!(rows[0].is_conversational() && !rows[0].label);
    }

    #[test]
    fn a_missing_key_or_a_wrong_type_names_the_line_and_the_key() {
        let ok = r#"{"prompt": "a", "completion": "b", "label": true}"#;
        let e = err(&format!(
            "{ok}\n{}\n",
            r#"{"prompt": "a", "completion": "b"}"#
        ));
        assert!(
            e.contains("kto.jsonl:2") && e.contains("missing `label`"),
            "{e}"
        );
        let e = err(r#"{"prompt": "a", "label": true}"#);
        assert!(
            e.contains("kto.jsonl:1") && e.contains("missing `completion`"),
            "{e}"
        );
        let e = err(r#"{"prompt": "a", "completion": "b", "label": "yes"}"#);
        assert!(e.contains("`label`") && e.contains("a boolean"), "{e}");
        let e = err(r#"{"prompt": 3, "completion": "b", "label": true}"#);
        assert!(e.contains("`prompt`"), "{e}");
        let e = err(r#"{"prompt": "a", "completion": ["b"], "label": true}"#);
        assert!(e.contains("`completion`") && e.contains("a string"), "{e}");
        let e = err(
            r#"{"prompt": [{"role": "user", "content": "a"}], "completion": "b", "label": true}"#,
        );
        assert!(
            e.contains("`completion`") && e.contains("list of messages"),
            "{e}"
        );
        let e = err(r#"{"prompt": [{"content": "a"}], "completion": [], "label": true}"#);
        assert!(e.contains("kto.jsonl:1"), "{e}");
        let e = err(r#"{"prompt": "a", "completion": "  ", "label": true}"#);
        assert!(e.contains("`completion` is empty"), "{e}");
        let e = err(r#"{"prompt": "a", "chosen": "b", "rejected": "c"}"#);
        assert!(e.contains("paired preference data"), "{e}");
        let e = err("not json\n");
        assert!(
            e.contains("kto.jsonl:1") && e.contains("invalid JSON"),
            "{e}"
        );
        assert!(err("\n").contains("no rows"));
    }

    #[test]
    fn one_file_holds_one_kind() {
        let e = err(concat!(
            r#"{"prompt": "a", "completion": "b", "label": true}"#,
            "\n",
            r#"{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}], "label": true}"#,
            "\n"
        ));
        assert!(
            e.contains("kto.jsonl:2") && e.contains("one dataset holds one kind"),
            "{e}"
        );
    }
}
