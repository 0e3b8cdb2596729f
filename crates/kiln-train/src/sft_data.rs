//! Supervised fine-tuning data: TRL's dataset formats read from JSON lines or Parquet, tokenized
//! the way TRL's `SFTTrainer` tokenizes them, with a per-token loss mask.
//!
//! The formats are those of TRL's `docs/source/dataset_formats.md`, recognised per row from its
//! keys: language modeling (`text`, or conversational `messages`), prompt-completion (`prompt` +
//! `completion`, strings or message lists) and preference (`prompt` + `chosen` + `rejected`, or
//! the implicit-prompt `chosen` + `rejected`), of which SFT trains on the chosen answer. One
//! dataset holds one format. A `.json` file holds JSON lines, or one JSON array of rows (items
//! counted from 0). Every row is checked before any is tokenized, and the first bad one
//! is reported by file and line (`data.jsonl:3`) or Parquet row (`data.parquet: row 2`, counted
//! from 0 as `datasets` indexes), so a run never starts on data it would choke on later.
//!
//! Tokenization follows TRL 1.x (`SFTTrainer._prepare_dataset`):
//! * standard text gets the EOS token's text appended unless it already ends with it, then is
//!   tokenized as `tokenizer(text)` (with the special tokens the post-processor adds, e.g. BOS);
//! * standard prompt-completion: the mask is 0 on the first `len(tokenizer(prompt))` tokens of
//!   `tokenizer(prompt + completion + eos)` and 1 on the rest, counted by tokens as TRL counts
//!   them (a merge across the boundary shifts it; such rows are counted in
//!   [`SftDataset::prompt_mismatches`], where TRL logs a warning);
//! * conversations are rendered with the checkpoint's chat template and the text is tokenized
//!   without special tokens, as `apply_chat_template(tokenize=True)` does.
//!
//! TRL finds assistant tokens with `{% generation %}` markers that few templates carry; kiln
//! finds them for any template by rendering prefixes: for assistant message `i`, the rendering of
//! `messages[..i]` with the generation prompt is the text before the reply and the rendering of
//! `messages[..=i]` the text through it, and the reply's span is the difference, trailing
//! whitespace excluded. That span holds the reply and the end-of-turn token the template puts
//! after it (`<|im_end|>` in ChatML), which is trained so the model learns to stop. A template
//! that renders earlier turns differently once later ones follow (one that drops past reasoning)
//! cannot be split this way and is reported.
//!
//! Truncation keeps the start (`truncation_mode="keep_start"`, TRL's default); an example left
//! with no trained token is dropped and counted. Packing follows TRL's `packing_strategy=
//! "wrapped"`: the examples are concatenated and cut into rows of `max_length` tokens, so an
//! example may continue into the next row; loss masks travel with their tokens, and there is no
//! per-document attention mask, so packed examples attend to the examples before them in a row.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_core::{Error, Result, Tokenizer};
use parquet::file::reader::SerializedFileReader;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde_json::{Map, Value};

/// What `kiln sft` asks of its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftDataOptions {
    /// Longest example (or packed row) in tokens; longer examples are truncated at the end.
    pub max_length: usize,
    /// Concatenate examples into rows of exactly `max_length` tokens (TRL's "wrapped" packing).
    pub packing: bool,
    /// Prompt-completion and preference data: train on the completion only.
    pub completion_only_loss: bool,
    /// Conversations: train on the assistant turns only.
    pub assistant_only_loss: bool,
}

impl Default for SftDataOptions {
    fn default() -> Self {
        Self {
            max_length: 1024,
            packing: false,
            completion_only_loss: true,
            assistant_only_loss: true,
        }
    }
}

/// One training sequence. `loss_mask[i]` says token `i` is a target, predicted from the tokens
/// before it, so `loss_mask[0]` is always false.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SftExample {
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
}

impl SftExample {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Tokens that carry loss.
    pub fn trained_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m).count()
    }
}

/// The dataset type, in TRL's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SftFormat {
    /// `{"text"}`: loss on every token.
    Language,
    /// `{"messages"}` (or ShareGPT `{"conversations"}`): rendered with the chat template.
    Conversational,
    /// `{"prompt", "completion"}`, strings or message lists.
    PromptCompletion { conversational: bool },
    /// `{"prompt", "chosen", "rejected"}`, or `{"chosen", "rejected"}` with the prompt implicit
    /// in `chosen`: SFT on the chosen answer, `rejected` unused.
    Preference {
        conversational: bool,
        implicit_prompt: bool,
    },
}

impl SftFormat {
    pub fn is_conversational(self) -> bool {
        match self {
            Self::Language => false,
            Self::Conversational => true,
            Self::PromptCompletion { conversational } | Self::Preference { conversational, .. } => {
                conversational
            }
        }
    }
}

impl fmt::Display for SftFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let conv = if self.is_conversational() {
            "conversational "
        } else {
            ""
        };
        match self {
            Self::Language => f.write_str("language modeling (`text`)"),
            Self::Conversational => f.write_str("conversational language modeling (`messages`)"),
            Self::PromptCompletion { .. } => {
                write!(f, "{conv}prompt-completion (`prompt`, `completion`)")
            }
            Self::Preference {
                implicit_prompt: false,
                ..
            } => write!(f, "{conv}preference (`prompt`, `chosen`, `rejected`)"),
            Self::Preference {
                implicit_prompt: true,
                ..
            } => write!(f, "{conv}implicit-prompt preference (`chosen`, `rejected`)"),
        }
    }
}

/// A tokenized SFT dataset and what loading it did.
#[derive(Debug, Clone)]
pub struct SftDataset {
    pub format: SftFormat,
    /// Training sequences, in file and row order (packed rows when packing).
    pub examples: Vec<SftExample>,
    /// Rows read from the files.
    pub rows: usize,
    /// Examples dropped because no trained token was left (after truncation).
    pub dropped: usize,
    /// Examples cut to `max_length` (never with packing, which wraps instead).
    pub truncated: usize,
    /// Standard prompt-completion rows whose `tokenizer(prompt)` is not a prefix of
    /// `tokenizer(prompt + completion)` (TRL warns about these and masks by count all the same).
    pub prompt_mismatches: usize,
    pub files: Vec<PathBuf>,
}

impl SftDataset {
    /// Tokens that carry loss, over all examples.
    pub fn trained_tokens(&self) -> usize {
        self.examples.iter().map(SftExample::trained_tokens).sum()
    }

    /// Total tokens, over all examples.
    pub fn tokens(&self) -> usize {
        self.examples.iter().map(SftExample::len).sum()
    }

    /// Holds out `eval_fraction` of the examples, picked by a generator seeded with `seed`, so
    /// the same data and seed always give the same split. Both halves keep the original order
    /// and the statistics of the whole dataset. Any fraction above 0 holds out at least one
    /// example and any below 1 keeps at least one for training, when there are two or more.
    /// Split a packed dataset and an example wrapped over two rows may land on both sides: for
    /// a clean held-out set, load without packing, split, then [`pack`] each half.
    pub fn split(self, eval_fraction: f64, seed: u64) -> (SftDataset, SftDataset) {
        let n = self.examples.len();
        // NaN holds out nothing: it fails both comparisons below and rounds to 0.
        let fraction = eval_fraction.clamp(0.0, 1.0);
        let mut n_eval = (n as f64 * fraction).round() as usize;
        if n >= 2 {
            if fraction > 0.0 {
                n_eval = n_eval.max(1);
            }
            if fraction < 1.0 {
                n_eval = n_eval.min(n - 1);
            }
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let mut is_eval = vec![false; n];
        for &i in &order[..n_eval] {
            is_eval[i] = true;
        }
        let (eval, train): (Vec<_>, Vec<_>) = self
            .examples
            .into_iter()
            .zip(is_eval)
            .partition(|(_, e)| *e);
        let with = |examples: Vec<(SftExample, bool)>| SftDataset {
            format: self.format,
            examples: examples.into_iter().map(|(e, _)| e).collect(),
            rows: self.rows,
            dropped: self.dropped,
            truncated: self.truncated,
            prompt_mismatches: self.prompt_mismatches,
            files: self.files.clone(),
        };
        (with(train), with(eval))
    }
}

/// The data files of `path`: the file itself, or the `.jsonl`, `.json` and `.parquet` files
/// directly in the directory, sorted by name.
pub fn dataset_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return match file_kind(path) {
            Some(_) => Ok(vec![path.to_path_buf()]),
            None => Err(Error::InvalidInput(format!(
                "dataset_path {}: unsupported file type; expected .jsonl, .json (JSON lines) or .parquet",
                path.display()
            ))),
        };
    }
    if !path.is_dir() {
        return Err(Error::InvalidInput(format!(
            "dataset_path {}: no such file or directory",
            path.display()
        )));
    }
    let entries = std::fs::read_dir(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && file_kind(p).is_some())
        .collect();
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    if files.is_empty() {
        return Err(Error::InvalidInput(format!(
            "dataset_path {}: no .jsonl, .json or .parquet files in the directory",
            path.display()
        )));
    }
    Ok(files)
}

/// Reads, checks and tokenizes an SFT dataset (see the module docs for the rules).
pub fn load_sft_dataset(
    path: &Path,
    tokenizer: &Tokenizer,
    opts: &SftDataOptions,
) -> Result<SftDataset> {
    if opts.max_length < 2 {
        return Err(Error::InvalidInput(format!(
            "max_length {} is too short: a training sequence needs at least 2 tokens",
            opts.max_length
        )));
    }
    let files = dataset_files(path)?;

    // Read and check every row before tokenizing any.
    let mut records: Vec<(RowId, Record)> = Vec::new();
    let mut format: Option<(SftFormat, RowId)> = None;
    for file in &files {
        let file_name: Arc<Path> = Arc::from(file.as_path());
        for_each_row(&file_name, &mut |id, value| {
            let (row_format, record) = parse_row(&id, value)?;
            match &format {
                None => format = Some((row_format, id.clone())),
                Some((first, first_id)) if *first != row_format => {
                    return Err(Error::InvalidInput(format!(
                        "{id}: row is {row_format}, but the dataset is {first} (from {first_id}); one dataset holds one format"
                    )));
                }
                Some(_) => {}
            }
            records.push((id, record));
            Ok(())
        })?;
    }
    let Some((format, _)) = format else {
        return Err(Error::InvalidInput(format!(
            "dataset_path {}: no rows",
            path.display()
        )));
    };

    let encoder = Encoder::new(tokenizer, opts, format)?;
    let encoded: Vec<Result<(SftExample, bool)>> = records
        .par_iter()
        .map(|(id, record)| encoder.encode(id, record))
        .collect();
    let rows = records.len();
    let mut examples = Vec::with_capacity(rows);
    let (mut dropped, mut truncated, mut prompt_mismatches) = (0, 0, 0);
    for result in encoded {
        let (mut example, mismatch) = result?;
        prompt_mismatches += usize::from(mismatch);
        if !opts.packing && example.len() > opts.max_length {
            example.input_ids.truncate(opts.max_length);
            example.loss_mask.truncate(opts.max_length);
            truncated += 1;
        }
        if example.trained_tokens() == 0 {
            dropped += 1;
        } else {
            examples.push(example);
        }
    }
    if examples.is_empty() {
        return Err(Error::InvalidInput(format!(
            "dataset_path {}: none of the {rows} rows has a token to train on{}",
            path.display(),
            if format == SftFormat::Conversational && opts.assistant_only_loss {
                " (assistant_only_loss trains on assistant messages only)"
            } else {
                ""
            }
        )));
    }
    if opts.packing {
        examples = pack(&examples, opts.max_length);
    }
    Ok(SftDataset {
        format,
        examples,
        rows,
        dropped,
        truncated,
        prompt_mismatches,
        files,
    })
}

/// TRL's "wrapped" packing: all examples concatenated and cut into rows of `max_length` tokens;
/// the last row may be shorter. Loss masks travel with their tokens, except at the first position
/// of a row, which nothing precedes. Packed examples attend to earlier ones in their row (there
/// is no per-document attention mask), as in TRL without padding-free attention.
pub fn pack(examples: &[SftExample], max_length: usize) -> Vec<SftExample> {
    let max_length = max_length.max(1);
    let ids: Vec<u32> = examples
        .iter()
        .flat_map(|e| e.input_ids.iter().copied())
        .collect();
    let mask: Vec<bool> = examples
        .iter()
        .flat_map(|e| e.loss_mask.iter().copied())
        .collect();
    ids.chunks(max_length)
        .zip(mask.chunks(max_length))
        .map(|(ids, mask)| {
            let mut loss_mask = mask.to_vec();
            loss_mask[0] = false;
            SftExample {
                input_ids: ids.to_vec(),
                loss_mask,
            }
        })
        .collect()
}

/// A padded batch with next-token targets, flattened row-major as `[batch * seq_len]`.
#[derive(Debug, Clone, PartialEq)]
pub struct SftBatch {
    /// `[batch][seq_len]` inputs (each example without its last token), padded right with the
    /// pad id.
    pub input_ids: Vec<Vec<u32>>,
    /// `[batch * seq_len]`: `targets[b][i] = example_b.input_ids[i + 1]`, pad id past the end.
    pub targets: Vec<u32>,
    /// `[batch * seq_len]`: 1.0 where the target is trained, else 0.0 (always 0.0 on padding).
    pub weights: Vec<f32>,
    /// Number of 1.0 weights.
    pub trained_tokens: usize,
    /// Longest example of the batch minus one.
    pub seq_len: usize,
}

/// Pads and shifts `examples` into one batch: inputs are `ids[..n-1]`, targets `ids[1..]` and
/// weights `loss_mask[1..]`, all padded right to the longest example minus one.
pub fn make_batch(examples: &[&SftExample], pad_id: u32) -> SftBatch {
    let seq_len = examples
        .iter()
        .map(|e| e.len().saturating_sub(1))
        .max()
        .unwrap_or(0);
    let b = examples.len();
    let mut input_ids = Vec::with_capacity(b);
    let mut targets = vec![pad_id; b * seq_len];
    let mut weights = vec![0.0f32; b * seq_len];
    let mut trained_tokens = 0;
    for (row, e) in examples.iter().enumerate() {
        let n = e.len().saturating_sub(1);
        let mut inputs = e.input_ids[..n].to_vec();
        inputs.resize(seq_len, pad_id);
        input_ids.push(inputs);
        let base = row * seq_len;
        for i in 0..n {
            targets[base + i] = e.input_ids[i + 1];
            if e.loss_mask[i + 1] {
                weights[base + i] = 1.0;
                trained_tokens += 1;
            }
        }
    }
    SftBatch {
        input_ids,
        targets,
        weights,
        trained_tokens,
        seq_len,
    }
}

/// The example's text with the trained spans in `[[...]]`, to show users which tokens carry
/// loss. Each run of equally-masked tokens is decoded on its own (special tokens shown).
pub fn preview(example: &SftExample, tokenizer: &Tokenizer) -> Result<String> {
    let mut out = String::new();
    let mut start = 0;
    while start < example.len() {
        let trained = example.loss_mask[start];
        let end = (start..example.len())
            .find(|&i| example.loss_mask[i] != trained)
            .unwrap_or(example.len());
        let text = tokenizer.decode(&example.input_ids[start..end], false)?;
        if trained {
            out.push_str("[[");
            out.push_str(&text);
            out.push_str("]]");
        } else {
            out.push_str(&text);
        }
        start = end;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Reading

#[derive(Clone, Copy)]
enum FileKind {
    JsonLines,
    Parquet,
}

fn file_kind(path: &Path) -> Option<FileKind> {
    match path.extension()?.to_str()? {
        "jsonl" | "json" => Some(FileKind::JsonLines),
        "parquet" => Some(FileKind::Parquet),
        _ => None,
    }
}

/// Where a row came from, for error messages.
#[derive(Debug, Clone)]
pub(crate) struct RowId {
    file: Arc<Path>,
    pos: RowPos,
}

#[derive(Debug, Clone, Copy)]
enum RowPos {
    /// 1-based line of a JSON-lines file.
    Line(usize),
    /// 0-based row of a Parquet file.
    Row(usize),
    /// 0-based item of a `.json` file holding one JSON array.
    Item(usize),
}

impl fmt::Display for RowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        match self.pos {
            RowPos::Line(n) => write!(f, "{file}:{n}"),
            RowPos::Row(n) => write!(f, "{file}: row {n}"),
            RowPos::Item(n) => write!(f, "{file}: item {n}"),
        }
    }
}

pub(crate) fn invalid(id: &RowId, message: impl fmt::Display) -> Error {
    Error::InvalidInput(format!("{id}: {message}"))
}

pub(crate) type RowSink<'a> = dyn FnMut(RowId, Value) -> Result<()> + 'a;

pub(crate) fn for_each_row(file: &Arc<Path>, f: &mut RowSink<'_>) -> Result<()> {
    let io = |source| Error::Io {
        path: file.to_path_buf(),
        source,
    };
    match file_kind(file) {
        Some(FileKind::Parquet) => read_parquet(file, f),
        _ => {
            let mut reader = BufReader::new(File::open(file).map_err(io)?);
            // A `.json` file may hold one JSON array instead of JSON lines.
            let is_json = file.extension().is_some_and(|e| e == "json");
            let starts_with_array = is_json
                && reader
                    .fill_buf()
                    .map_err(io)?
                    .iter()
                    .find(|b| !b.is_ascii_whitespace())
                    == Some(&b'[');
            if starts_with_array {
                let items: Vec<Value> =
                    serde_json::from_reader(reader).map_err(|source| Error::Json {
                        path: file.to_path_buf(),
                        source,
                    })?;
                for (i, item) in items.into_iter().enumerate() {
                    f(
                        RowId {
                            file: file.clone(),
                            pos: RowPos::Item(i),
                        },
                        item,
                    )?;
                }
                return Ok(());
            }
            for (i, line) in reader.lines().enumerate() {
                let id = RowId {
                    file: file.clone(),
                    pos: RowPos::Line(i + 1),
                };
                let line = line.map_err(|e| invalid(&id, format!("{e} (expected UTF-8)")))?;
                let line = if i == 0 {
                    line.trim_start_matches('\u{feff}')
                } else {
                    &line
                };
                if line.trim().is_empty() {
                    continue;
                }
                let value: Value = serde_json::from_str(line)
                    .map_err(|e| invalid(&id, format!("invalid JSON: {e}")))?;
                f(id, value)?;
            }
            Ok(())
        }
    }
}

fn read_parquet(file: &Arc<Path>, f: &mut RowSink<'_>) -> Result<()> {
    let handle = File::open(file).map_err(|source| Error::Io {
        path: file.to_path_buf(),
        source,
    })?;
    let reader = SerializedFileReader::new(handle).map_err(|e| {
        Error::InvalidInput(format!("{}: cannot read as Parquet: {e}", file.display()))
    })?;
    for (i, row) in reader.into_iter().enumerate() {
        let id = RowId {
            file: file.clone(),
            pos: RowPos::Row(i),
        };
        let row = row.map_err(|e| invalid(&id, format!("cannot read the row: {e}")))?;
        f(id, row.to_json_value())?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Rows

/// A row reduced to what SFT trains on.
enum Record {
    Text(String),
    Messages(Vec<Value>),
    PromptCompletion {
        prompt: String,
        completion: String,
    },
    ConvPromptCompletion {
        prompt: Vec<Value>,
        completion: Vec<Value>,
    },
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    }
}

/// "FILE:LINE: expected `what` to be KIND, found TYPE".
pub(crate) fn expected(id: &RowId, what: impl fmt::Display, kind: &str, found: &Value) -> Error {
    invalid(
        id,
        format!("expected {what} to be {kind}, found {}", type_name(found)),
    )
}

/// Nulls mean "absent", as TRL's `remove_none_values` has it: Parquet and Arrow fill the missing
/// fields of nested structs with them.
pub(crate) fn strip_nulls(map: &mut Map<String, Value>) {
    map.retain(|_, v| !v.is_null());
}

pub(crate) fn take(id: &RowId, row: &mut Map<String, Value>, key: &str) -> Result<Value> {
    row.remove(key)
        .ok_or_else(|| invalid(id, format!("missing `{key}`")))
}

/// A non-empty string; `like` says which column's kind it must match, for the message.
fn non_empty_string(id: &RowId, key: &str, value: Value, like: &str) -> Result<String> {
    match value {
        Value::String(s) if s.is_empty() => Err(invalid(id, format!("`{key}` is empty"))),
        Value::String(s) => Ok(s),
        other => Err(expected(
            id,
            format!("`{key}`"),
            &format!("a string{like}"),
            &other,
        )),
    }
}

/// A list of `{"role", "content", ...}` objects; `key` names the column for errors.
pub(crate) fn parse_messages(id: &RowId, key: &str, value: Value) -> Result<Vec<Value>> {
    let Value::Array(items) = value else {
        return Err(expected(
            id,
            format!("`{key}`"),
            "a list of messages",
            &value,
        ));
    };
    if items.is_empty() {
        return Err(invalid(id, format!("`{key}` is an empty list")));
    }
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let Value::Object(mut m) = item else {
            return Err(expected(
                id,
                format!("`{key}[{i}]`"),
                "a message object",
                &item,
            ));
        };
        strip_nulls(&mut m);
        match m.get("role") {
            Some(Value::String(_)) => {}
            Some(other) => {
                return Err(expected(
                    id,
                    format!("`{key}[{i}].role`"),
                    "a string",
                    other,
                ));
            }
            None => return Err(invalid(id, format!("`{key}[{i}]` has no `role`"))),
        }
        if let Some(c) = m.get("content").filter(|c| !c.is_string() && !c.is_array()) {
            let kind = "a string or a list of parts";
            return Err(expected(id, format!("`{key}[{i}].content`"), kind, c));
        }
        messages.push(Value::Object(m));
    }
    Ok(messages)
}

/// ShareGPT `{"from", "value"}` turns, converted as TRL's `maybe_convert_to_chatml` does.
fn parse_sharegpt(id: &RowId, value: Value) -> Result<Vec<Value>> {
    let Value::Array(items) = value else {
        return Err(expected(id, "`conversations`", "a list of turns", &value));
    };
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let kind = "an object with a string `from` and a `value`";
        let Value::Object(mut turn) = item else {
            return Err(expected(id, format!("`conversations[{i}]`"), kind, &item));
        };
        let (Some(Value::String(from)), Some(value)) = (turn.remove("from"), turn.remove("value"))
        else {
            return Err(invalid(
                id,
                format!("`conversations[{i}]`: expected {kind}"),
            ));
        };
        let role = match from.as_str() {
            "human" => "user",
            "gpt" => "assistant",
            other => other,
        };
        turn.insert("role".into(), Value::String(role.into()));
        turn.insert("content".into(), value);
        messages.push(Value::Object(turn));
    }
    parse_messages(id, "conversations", Value::Array(messages))
}

/// A prompt and its completion (or chosen answer), standard or conversational alike.
fn parse_pair(id: &RowId, row: &mut Map<String, Value>, target: &str) -> Result<(bool, Record)> {
    let prompt = take(id, row, "prompt")?;
    let completion = take(id, row, target)?;
    match prompt {
        Value::String(prompt) => {
            let completion = non_empty_string(id, target, completion, " (like `prompt`)")?;
            Ok((false, Record::PromptCompletion { prompt, completion }))
        }
        Value::Array(_) if !completion.is_array() => {
            let kind = "a list of messages (like `prompt`)";
            Err(expected(id, format!("`{target}`"), kind, &completion))
        }
        Value::Array(_) => Ok((
            true,
            Record::ConvPromptCompletion {
                prompt: parse_messages(id, "prompt", prompt)?,
                completion: parse_messages(id, target, completion)?,
            },
        )),
        other => Err(expected(
            id,
            "`prompt`",
            "a string or a list of messages",
            &other,
        )),
    }
}

/// `rejected` is not trained on but must be there and of the same kind as `chosen`.
fn check_rejected(id: &RowId, row: &Map<String, Value>, conversational: bool) -> Result<()> {
    match row.get("rejected") {
        None => Err(invalid(id, "missing `rejected`")),
        Some(Value::String(_)) if !conversational => Ok(()),
        Some(Value::Array(_)) if conversational => Ok(()),
        Some(other) => {
            let kind = if conversational {
                "a list of messages (like `chosen`)"
            } else {
                "a string (like `chosen`)"
            };
            Err(expected(id, "`rejected`", kind, other))
        }
    }
}

fn parse_row(id: &RowId, value: Value) -> Result<(SftFormat, Record)> {
    let Value::Object(mut row) = value else {
        return Err(expected(id, "the row", "a JSON object", &value));
    };
    strip_nulls(&mut row);
    for key in ["tools", "chat_template_kwargs"] {
        let empty = match row.get(key) {
            None => true,
            Some(Value::Array(a)) => a.is_empty(),
            Some(Value::Object(o)) => o.is_empty(),
            Some(_) => false,
        };
        if !empty {
            let message =
                format!("`{key}` is not supported yet; remove the column to train without it");
            return Err(invalid(id, message));
        }
    }
    let [prompt, chosen, rejected, completion, text] =
        ["prompt", "chosen", "rejected", "completion", "text"].map(|k| row.contains_key(k));
    if prompt && (chosen || rejected) {
        let (conversational, record) = parse_pair(id, &mut row, "chosen")?;
        check_rejected(id, &row, conversational)?;
        let format = SftFormat::Preference {
            conversational,
            implicit_prompt: false,
        };
        return Ok((format, record));
    }
    if prompt {
        if !completion {
            return Err(invalid(
                id,
                "missing `completion` (a `prompt` alone is prompt-only data, for GRPO or RLOO: SFT has no target in it)",
            ));
        }
        if row.get("label").is_some_and(Value::is_boolean) {
            return Err(invalid(
                id,
                "unpaired preference data (`prompt`, `completion`, `label`) is for KTO; SFT would train on the undesirable completions too",
            ));
        }
        let (conversational, record) = parse_pair(id, &mut row, "completion")?;
        return Ok((SftFormat::PromptCompletion { conversational }, record));
    }
    if chosen || rejected {
        let (conversational, record) = match take(id, &mut row, "chosen")? {
            chosen @ Value::Array(_) => (
                true,
                Record::Messages(parse_messages(id, "chosen", chosen)?),
            ),
            chosen => {
                let like = " or a list of messages";
                (
                    false,
                    Record::Text(non_empty_string(id, "chosen", chosen, like)?),
                )
            }
        };
        check_rejected(id, &row, conversational)?;
        let format = SftFormat::Preference {
            conversational,
            implicit_prompt: true,
        };
        return Ok((format, record));
    }
    if let Some(messages) = row.remove("messages") {
        let messages = parse_messages(id, "messages", messages)?;
        return Ok((SftFormat::Conversational, Record::Messages(messages)));
    }
    if let Some(turns) = row.remove("conversations") {
        let messages = parse_sharegpt(id, turns)?;
        return Ok((SftFormat::Conversational, Record::Messages(messages)));
    }
    if text {
        let text = non_empty_string(id, "text", take(id, &mut row, "text")?, "")?;
        return Ok((SftFormat::Language, Record::Text(text)));
    }
    if completion {
        return Err(invalid(id, "`completion` without `prompt`"));
    }
    let keys: Vec<String> = row.keys().map(|k| format!("`{k}`")).collect();
    Err(invalid(
        id,
        format!(
            "no SFT columns: expected `text`, `messages`, `prompt` + `completion`, or `prompt` + `chosen` + `rejected`; found {}",
            if keys.is_empty() {
                "none".to_string()
            } else {
                keys.join(", ")
            }
        ),
    ))
}

// ---------------------------------------------------------------------------------------------
// Tokenization

struct Encoder<'a> {
    tokenizer: &'a Tokenizer,
    opts: &'a SftDataOptions,
    /// The EOS token's text, appended to standard text and completions.
    eos: String,
}

impl<'a> Encoder<'a> {
    fn new(tokenizer: &'a Tokenizer, opts: &'a SftDataOptions, format: SftFormat) -> Result<Self> {
        let eos = tokenizer.special_token("eos_token").map(str::to_string);
        let eos = match eos {
            Some(eos) => eos,
            None if format.is_conversational() => String::new(),
            None => {
                return Err(Error::InvalidInput(
                    "the tokenizer has no `eos_token` (tokenizer_config.json); SFT on standard text appends it to every example".into(),
                ));
            }
        };
        if format.is_conversational() && tokenizer.chat_template().is_none() {
            return Err(Error::InvalidInput(format!(
                "the dataset is {format}, but the tokenizer has no chat template to render it with"
            )));
        }
        Ok(Self {
            tokenizer,
            opts,
            eos,
        })
    }

    /// The example, and whether a standard prompt's tokens are not a prefix of the full ones.
    fn encode(&self, id: &RowId, record: &Record) -> Result<(SftExample, bool)> {
        let at = |e: Error| invalid(id, e);
        let mut mismatch = false;
        let mut example = match record {
            Record::Text(text) => {
                let input_ids = self
                    .tokenizer
                    .encode(&self.with_eos(text), true)
                    .map_err(at)?;
                SftExample {
                    loss_mask: vec![true; input_ids.len()],
                    input_ids,
                }
            }
            Record::PromptCompletion { prompt, completion } => {
                let prompt_ids = self.tokenizer.encode(prompt, true).map_err(at)?;
                let full = format!("{prompt}{}", self.with_eos(completion));
                let input_ids = self.tokenizer.encode(&full, true).map_err(at)?;
                mismatch = !input_ids.starts_with(&prompt_ids);
                let loss_mask = (0..input_ids.len())
                    .map(|i| !self.opts.completion_only_loss || i >= prompt_ids.len())
                    .collect();
                SftExample {
                    input_ids,
                    loss_mask,
                }
            }
            Record::Messages(messages) => {
                let full = self.render(id, messages, false)?;
                let mut filters = Vec::new();
                if self.opts.assistant_only_loss {
                    filters.push(self.assistant_spans(id, messages, &full)?);
                }
                self.encode_spans(id, &full, &filters)?
            }
            Record::ConvPromptCompletion { prompt, completion } => {
                let prompt_text = self.render(id, prompt, true)?;
                let messages: Vec<Value> = prompt.iter().chain(completion).cloned().collect();
                let full = self.render(id, &messages, false)?;
                if !full.starts_with(&prompt_text) {
                    return Err(invalid(
                        id,
                        "the chat template renders the prompt (with the generation prompt) \
                         differently from the start of prompt + completion, so the completion \
                         cannot be located",
                    ));
                }
                let mut filters = Vec::new();
                if self.opts.completion_only_loss {
                    filters.push(std::iter::once(prompt_text.len()..full.len()).collect());
                }
                if self.opts.assistant_only_loss {
                    filters.push(self.assistant_spans(id, &messages, &full)?);
                }
                self.encode_spans(id, &full, &filters)?
            }
        };
        if let Some(first) = example.loss_mask.first_mut() {
            *first = false;
        }
        Ok((example, mismatch))
    }

    fn with_eos(&self, text: &str) -> String {
        if text.ends_with(&self.eos) {
            text.to_string()
        } else {
            format!("{text}{}", self.eos)
        }
    }

    fn render(
        &self,
        id: &RowId,
        messages: &[Value],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.tokenizer
            .apply_chat_template(&messages, add_generation_prompt)
            .map_err(|e| invalid(id, e))
    }

    /// Byte ranges of `full` (the rendering of `messages`) that hold the assistant replies and
    /// the end-of-turn text after each, trailing whitespace excluded.
    fn assistant_spans(
        &self,
        id: &RowId,
        messages: &[Value],
        full: &str,
    ) -> Result<Vec<Range<usize>>> {
        let mut spans = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            if message.get("role").and_then(Value::as_str) != Some("assistant") {
                continue;
            }
            let before = self.render(id, &messages[..i], true)?;
            let through = self.render(id, &messages[..=i], false)?;
            if !through.starts_with(&before) || !full.starts_with(&through) {
                return Err(invalid(
                    id,
                    format!(
                        "cannot locate assistant message {i}: the chat template renders the \
                         conversation before it (with the generation prompt) or up to it \
                         differently from the start of the whole conversation; set \
                         assistant_only_loss: false to train on every token"
                    ),
                ));
            }
            let end = through.trim_end().len().max(before.len());
            if end > before.len() {
                spans.push(before.len()..end);
            }
        }
        Ok(spans)
    }

    /// Tokenizes a rendered conversation (no special tokens added, as `apply_chat_template`
    /// does) and trains the tokens that overlap one of the byte spans of every filter; with no
    /// filter, every token.
    fn encode_spans(
        &self,
        id: &RowId,
        text: &str,
        filters: &[Vec<Range<usize>>],
    ) -> Result<SftExample> {
        let encoding = self
            .tokenizer
            .inner()
            .encode(text, false)
            .map_err(|e| invalid(id, format!("cannot encode the rendered chat: {e}")))?;
        let overlaps = |&(start, end): &(usize, usize), spans: &[Range<usize>]| {
            start < end && spans.iter().any(|s| start < s.end && end > s.start)
        };
        let loss_mask = encoding
            .get_offsets()
            .iter()
            .map(|offsets| filters.iter().all(|spans| overlaps(offsets, spans)))
            .collect();
        Ok(SftExample {
            input_ids: encoding.get_ids().to_vec(),
            loss_mask,
        })
    }
}
