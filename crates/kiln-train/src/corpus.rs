//! Pre-training text: documents streamed from text or JSONL files, a byte-level BPE tokenizer
//! trained on them, and the token stream packed into fixed-length blocks on disk.
//!
//! Nothing here holds the corpus in memory: documents are read line by line, tokenized in
//! chunks, and appended to a flat file of little-endian `u32` ids; training reads blocks back by
//! offset, in an order shuffled per epoch by a seeded generator, so a run resumes exactly.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use kiln_core::{Error, Result};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

/// Special tokens of tokenizers kiln trains, in id order.
pub const SPECIAL_TOKENS: [&str; 5] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|im_start|>",
    "<|im_end|>",
    "<pad>",
];
pub const BOS_ID: u32 = 0;
pub const END_OF_TEXT_ID: u32 = 1;
pub const IM_END_ID: u32 = 3;
pub const PAD_ID: u32 = 4;

/// Text read to learn the tokenizer's merges at most.
const TOKENIZER_SAMPLE_BYTES: usize = 64 << 20;

/// The ChatML template written with every tokenizer kiln trains.
pub const CHATML_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// The corpus files: `path` itself, or every `.txt`/`.jsonl` file below it, sorted.
pub fn corpus_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        return Err(Error::InvalidInput(format!(
            "dataset_path {}: no such file or directory",
            path.display()
        )));
    }
    let mut files = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("txt" | "jsonl")
            ) {
                files.push(p);
            }
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::InvalidInput(format!(
            "dataset_path {}: no .txt or .jsonl files",
            path.display()
        )));
    }
    Ok(files)
}

/// Calls `f` with every document of the corpus: each `{"text"}` row of a JSONL file, each
/// blank-line-separated paragraph of a text file. A row that is not JSON, has no string `text`,
/// or a file that is not UTF-8 is an error naming the file and line. `f` may stop the walk by
/// returning `ControlFlow::Break`. Returns the number of documents passed to `f`.
pub fn for_each_document(
    files: &[PathBuf],
    mut f: impl FnMut(&str) -> Result<ControlFlow<()>>,
) -> Result<usize> {
    let mut count = 0;
    for path in files {
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let jsonl = path.extension().and_then(|e| e.to_str()) == Some("jsonl");
        let mut paragraph = String::new();
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let at = || format!("{}:{}", path.display(), i + 1);
            let line = line.map_err(|e| {
                Error::InvalidInput(format!("{}: {e} (the corpus must be UTF-8 text)", at()))
            })?;
            if jsonl {
                if line.trim().is_empty() {
                    continue;
                }
                let row: serde_json::Value = serde_json::from_str(&line)
                    .map_err(|e| Error::InvalidInput(format!("{}: invalid JSON: {e}", at())))?;
                let text = row.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "{}: expected an object with a string `text`",
                        at()
                    ))
                })?;
                if !text.trim().is_empty() {
                    count += 1;
                    if f(text)?.is_break() {
                        return Ok(count);
                    }
                }
            } else if line.trim().is_empty() {
                if !paragraph.trim().is_empty() {
                    count += 1;
                    if f(&paragraph)?.is_break() {
                        return Ok(count);
                    }
                }
                paragraph.clear();
            } else {
                if !paragraph.is_empty() {
                    paragraph.push('\n');
                }
                paragraph.push_str(&line);
            }
        }
        if !paragraph.trim().is_empty() {
            count += 1;
            if f(&paragraph)?.is_break() {
                return Ok(count);
            }
        }
    }
    Ok(count)
}

/// Trains a byte-level BPE tokenizer (Llama 3 / GPT-2 style: no unknown tokens, every byte
/// representable) on the corpus `files`, with kiln's special tokens at ids 0–4 and a
/// post-processor that prepends BOS.
pub fn train_tokenizer(files: &[PathBuf], vocab_size: usize) -> Result<Tokenizer> {
    // BPE merges are learned from a bounded sample (the corpus's first 64 MiB of text), so
    // tokenizer training never needs the whole corpus in memory.
    let mut docs = Vec::new();
    let mut sampled = 0usize;
    for_each_document(files, |d| {
        sampled += d.len();
        docs.push(d.to_string());
        Ok(if sampled >= TOKENIZER_SAMPLE_BYTES {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        })
    })?;
    if docs.is_empty() {
        return Err(Error::InvalidInput("the corpus holds no text".into()));
    }
    train_tokenizer_on(docs, vocab_size)
}

/// [`train_tokenizer`] on texts in memory (the guard classifier learns its vocabulary from its
/// training examples this way).
pub fn train_tokenizer_on(texts: Vec<String>, vocab_size: usize) -> Result<Tokenizer> {
    let min_vocab = 256 + SPECIAL_TOKENS.len();
    if vocab_size < min_vocab {
        return Err(Error::InvalidInput(format!(
            "vocab_size {vocab_size} is below {min_vocab} (256 bytes + {} special tokens)",
            SPECIAL_TOKENS.len()
        )));
    }
    let tok_err =
        |e: tokenizers::Error| Error::InvalidInput(format!("tokenizer training failed: {e}"));
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(*t, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<tokenizers::NormalizerWrapper>)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(None::<TemplateProcessing>)
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(tok_err)?;
    tokenizer
        .train(&mut trainer, texts.into_iter())
        .map_err(tok_err)?;
    let bos = TemplateProcessing::builder()
        .try_single(format!("{} $A", SPECIAL_TOKENS[0]))
        .and_then(|b| b.try_pair(format!("{0} $A {0} $B", SPECIAL_TOKENS[0])))
        .map_err(|e| Error::InvalidInput(format!("tokenizer template: {e}")))?
        .special_tokens(vec![(SPECIAL_TOKENS[0], BOS_ID)])
        .build()
        .map_err(|e| Error::InvalidInput(format!("tokenizer template: {e}")))?;
    tokenizer.with_post_processor(Some(bos));
    let tokenizer: Tokenizer = tokenizer.into();
    for (id, token) in SPECIAL_TOKENS.iter().enumerate() {
        if tokenizer.token_to_id(token) != Some(id as u32) {
            return Err(Error::InvalidInput(format!(
                "special token {token} did not get id {id}"
            )));
        }
    }
    Ok(tokenizer)
}

/// Writes `tokenizer_config.json` and `chat_template.jinja` beside a tokenizer kiln trained.
pub fn write_tokenizer_files(tokenizer: &Tokenizer, dir: &Path) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let json_path = dir.join("tokenizer.json");
    tokenizer
        .save(&json_path, true)
        .map_err(|e| Error::InvalidInput(format!("{}: {e}", json_path.display())))?;
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[3],
        "pad_token": SPECIAL_TOKENS[4],
        "model_max_length": 1_000_000_000_000_000_000u64,
        "chat_template": CHATML_TEMPLATE,
    });
    let config_path = dir.join("tokenizer_config.json");
    std::fs::write(
        &config_path,
        serde_json::to_string_pretty(&config).unwrap_or_default(),
    )
    .map_err(io(&config_path))?;
    let jinja = dir.join("chat_template.jinja");
    std::fs::write(&jinja, CHATML_TEMPLATE).map_err(io(&jinja))?;
    Ok(())
}

/// Counts written by [`tokenize_corpus`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TokenizedCorpus {
    pub documents: usize,
    pub train_tokens: u64,
    pub eval_tokens: u64,
}

/// Tokenizes every document (`BOS text <|end_of_text|>`) into `train_path` or, for about
/// `eval_percent` of documents chosen deterministically, `eval_path`.
pub fn tokenize_corpus(
    tokenizer: &Tokenizer,
    files: &[PathBuf],
    eval_percent: f64,
    train_path: &Path,
    eval_path: &Path,
) -> Result<TokenizedCorpus> {
    let create = |p: &Path| {
        File::create(p)
            .map(BufWriter::new)
            .map_err(|source| Error::Io {
                path: p.to_path_buf(),
                source,
            })
    };
    let (mut train, mut eval) = (create(train_path)?, create(eval_path)?);
    let mut counts = TokenizedCorpus::default();
    // Every `period`-th document is held out (at least one when there are two or more).
    let period = if eval_percent > 0.0 {
        (100.0 / eval_percent).round().max(2.0) as usize
    } else {
        usize::MAX
    };
    let mut batch: Vec<String> = Vec::new();
    let mut flush = |batch: &mut Vec<String>, counts: &mut TokenizedCorpus| -> Result<()> {
        let encodings = tokenizer
            .encode_batch(std::mem::take(batch), true)
            .map_err(|e| Error::InvalidInput(format!("tokenizing the corpus: {e}")))?;
        for enc in encodings {
            let held_out = counts.documents % period == period / 2;
            let (out, n, path) = if held_out {
                (&mut eval, &mut counts.eval_tokens, eval_path)
            } else {
                (&mut train, &mut counts.train_tokens, train_path)
            };
            for &id in enc.get_ids().iter().chain(std::iter::once(&END_OF_TEXT_ID)) {
                out.write_all(&id.to_le_bytes())
                    .map_err(|source| Error::Io {
                        path: path.to_path_buf(),
                        source,
                    })?;
                *n += 1;
            }
            counts.documents += 1;
        }
        Ok(())
    };
    for_each_document(files, |doc| {
        batch.push(doc.to_string());
        if batch.len() == 256 {
            flush(&mut batch, &mut counts)?;
        }
        Ok(ControlFlow::Continue(()))
    })?;
    flush(&mut batch, &mut counts)?;
    for (w, p) in [(&mut train, train_path), (&mut eval, eval_path)] {
        w.flush().map_err(|source| Error::Io {
            path: p.to_path_buf(),
            source,
        })?;
    }
    if counts.documents == 0 {
        return Err(Error::InvalidInput("the corpus holds no text".into()));
    }
    Ok(counts)
}

/// Fixed-length blocks of a token file, read by index.
#[derive(Debug)]
pub struct TokenBlocks {
    path: PathBuf,
    file: File,
    block_len: usize,
    blocks: usize,
    order: EpochOrder,
}

impl TokenBlocks {
    pub fn open(path: &Path, block_len: usize) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let tokens = file
            .metadata()
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len()
            / 4;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            block_len,
            blocks: (tokens / block_len as u64) as usize,
            order: EpochOrder::default(),
        })
    }

    pub fn len(&self) -> usize {
        self.blocks
    }

    pub fn is_empty(&self) -> bool {
        self.blocks == 0
    }

    pub fn block(&mut self, index: usize) -> Result<Vec<u32>> {
        let mut bytes = vec![0u8; self.block_len * 4];
        self.file
            .seek(SeekFrom::Start((index * self.block_len * 4) as u64))
            .and_then(|_| self.file.read_exact(&mut bytes))
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// The block index at position `position` of the seeded, per-epoch shuffled stream.
    pub fn shuffled_index(&mut self, seed: u64, position: u64) -> usize {
        self.order.index(self.blocks, seed, position)
    }
}

/// A stream of `n` items in an order shuffled anew each epoch from the seed: position `p` is
/// item `order(epoch = p / n)[p % n]`. A function of `(seed, position)` alone, so a run that
/// resumes at a position continues the same stream. The order of the epoch last asked for is
/// kept.
#[derive(Debug, Default)]
pub struct EpochOrder {
    order: Option<(u64, Vec<usize>)>,
}

impl EpochOrder {
    pub fn index(&mut self, n: usize, seed: u64, position: u64) -> usize {
        let epoch = position / n as u64;
        if self
            .order
            .as_ref()
            .is_none_or(|(e, order)| *e != epoch || order.len() != n)
        {
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(
                seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ));
            self.order = Some((epoch, order));
        }
        self.order
            .as_ref()
            .map_or(0, |(_, order)| order[(position % n as u64) as usize])
    }
}
