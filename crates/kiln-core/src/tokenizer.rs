//! `tokenizer.json` through the `tokenizers` crate, plus what `tokenizer_config.json` adds: the
//! special tokens by role and the chat template (inline, or in `chat_template.jinja`, which wins
//! as it does in transformers 5).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::chat::ChatTemplate;
use crate::{Error, Result};

const SPECIAL_TOKEN_KEYS: [&str; 6] = [
    "bos_token",
    "eos_token",
    "pad_token",
    "unk_token",
    "sep_token",
    "cls_token",
];

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    special_tokens: BTreeMap<String, String>,
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("special_tokens", &self.special_tokens)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` from a model
    /// directory; only the first is required.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        if !json.is_file() {
            return Err(Error::Tokenizer {
                path: json,
                message: "missing; kiln reads the fast-tokenizer file tokenizer.json".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&json).map_err(|e| Error::Tokenizer {
            path: json.clone(),
            message: format!("cannot be loaded: {e}"),
        })?;

        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.is_file() {
            crate::read_json(&config_path)?
        } else {
            Value::Null
        };
        let mut special_tokens = BTreeMap::new();
        for key in SPECIAL_TOKEN_KEYS {
            if let Some(text) = config.get(key).and_then(token_text) {
                special_tokens.insert(key.to_string(), text);
            }
        }

        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(|source| Error::Io {
                path: jinja.clone(),
                source,
            })?)
        } else {
            inline_template(&config, &config_path)?
        };
        let chat_template = source
            .map(|s| ChatTemplate::new(&s, special_tokens.clone()))
            .transpose()?;

        Ok(Self {
            inner,
            path: json,
            special_tokens,
            chat_template,
        })
    }

    /// A tokenizer from the text of a `tokenizer.json`, with the special tokens by role
    /// (`"bos_token"` → `"<s>"`) and the chat template given directly rather than read from
    /// `tokenizer_config.json`: for containers that carry a tokenizer inside them (a GGUF file's
    /// `tokenizer.huggingface.json` and `tokenizer.chat_template`). `origin` names the container
    /// in errors.
    pub fn from_json_str(
        json: &str,
        origin: &Path,
        special_tokens: BTreeMap<String, String>,
        chat_template: Option<&str>,
    ) -> Result<Self> {
        let inner: tokenizers::Tokenizer = json.parse().map_err(|e| Error::Tokenizer {
            path: origin.to_path_buf(),
            message: format!("the embedded tokenizer.json cannot be loaded: {e}"),
        })?;
        let chat_template = chat_template
            .map(|s| ChatTemplate::new(s, special_tokens.clone()))
            .transpose()?;
        Ok(Self {
            inner,
            path: origin.to_path_buf(),
            special_tokens,
            chat_template,
        })
    }

    /// The chat template's source as [`Tokenizer::from_dir`] finds it in a model directory
    /// (`chat_template.jinja`, else `chat_template` in `tokenizer_config.json`), or `None`.
    pub fn chat_template_source(dir: &Path) -> Result<Option<String>> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            return std::fs::read_to_string(&jinja)
                .map(Some)
                .map_err(|source| Error::Io {
                    path: jinja.clone(),
                    source,
                });
        }
        let config_path = dir.join("tokenizer_config.json");
        if !config_path.is_file() {
            return Ok(None);
        }
        let config: Value = crate::read_json(&config_path)?;
        inline_template(&config, &config_path)
    }

    /// Encodes as `tokenizer(text)` does: with `add_special_tokens` the post-processor adds BOS
    /// (or whatever the checkpoint's template says).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| self.error(format!("cannot encode text: {e}")))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.error(format!("cannot decode ids: {e}")))
    }

    /// The id of a token given as text (`"<|im_end|>"`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of a special token by role (`"eos_token"`).
    pub fn special_token(&self, role: &str) -> Option<&str> {
        self.special_tokens.get(role).map(String::as_str)
    }

    /// The id of the tokenizer's own EOS token.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.special_token("eos_token")
            .and_then(|t| self.token_id(t))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Renders messages with the checkpoint's chat template.
    pub fn apply_chat_template<M: Serialize>(
        &self,
        messages: &M,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            Error::ChatTemplate(format!(
                "{} has no chat template (neither `chat_template` in tokenizer_config.json nor chat_template.jinja)",
                self.path.parent().unwrap_or(Path::new(".")).display()
            ))
        })?;
        template.render(messages, add_generation_prompt)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    fn error(&self, message: String) -> Error {
        Error::Tokenizer {
            path: self.path.clone(),
            message,
        }
    }
}

/// A special token is a string or an `AddedToken` object `{"content": ...}`.
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of `{"name", "template"}` of which `default` is used.
fn inline_template(config: &Value, path: &Path) -> Result<Option<String>> {
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(items)) => {
            let named = |name: &str| {
                items.iter().find_map(|item| {
                    (item.get("name")?.as_str()? == name)
                        .then(|| item.get("template")?.as_str().map(str::to_string))
                        .flatten()
                })
            };
            named("default").map(Some).ok_or_else(|| {
                Error::config(
                    path,
                    "chat_template",
                    "a list of templates without one named `default`",
                )
            })
        }
        Some(other) => Err(Error::config(
            path,
            "chat_template",
            format!("expected a string or a list of named templates, found {other}"),
        )),
    }
}

/// Turns a growing list of token ids into text deltas without splitting multi-byte characters
/// (byte-level BPE emits UTF-8 a byte at a time): a delta is released only once the tokens
/// decode to complete characters.
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    pub fn new(skip_special_tokens: bool) -> Self {
        Self {
            skip_special_tokens,
            ..Self::default()
        }
    }

    /// Adds a token; returns the new text it completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let skip = self.skip_special_tokens;
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], skip)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], skip)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(delta))
        } else {
            Ok(None)
        }
    }
}
