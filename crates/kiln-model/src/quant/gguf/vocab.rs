//! The tokenizer in a GGUF file, both ways.
//!
//! llama.cpp does not read `tokenizer.json`: it rebuilds the tokenizer from `tokenizer.ggml.*`
//! (the token strings in id order, their types, the BPE merges, the special ids) plus a
//! pre-tokenizer *name* (`tokenizer.ggml.pre`) that selects one of its built-in split regexes.
//! kiln writes those, and also the whole `tokenizer.json` as `tokenizer.huggingface.json` (a key
//! gguf-py defines), from which its own import is exact. A file without that key (one
//! llama.cpp's converter wrote) gets a byte-level BPE `tokenizer.json` rebuilt from the
//! `tokenizer.ggml.*` keys (see [`rebuild_tokenizer_json`] for what that approximates).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use kiln_core::{Error, ModelConfig, Result, Tokenizer};
use serde_json::{Value as Json, json};

/// llama.cpp's `llama_token_type`.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// Llama 3's split regex (llama.cpp `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex (llama.cpp `qwen2`): Llama 3's with single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.*` metadata of a model directory's byte-level BPE tokenizer.
pub(super) fn tokenizer_metadata(
    dir: &Path,
    tokenizer: &Tokenizer,
    cfg: &ModelConfig,
) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    let tj: Json = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.clone(),
        source,
    })?;
    let unsupported = |what: String| Error::Tokenizer {
        path: path.clone(),
        message: format!(
            "{what}; GGUF export supports byte-level BPE tokenizers (tokenizer.ggml.model \
             `gpt2`) only"
        ),
    };
    let model = &tj["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(unsupported(format!("model type is {}", model["type"])));
    }
    if !has_type(&tj["pre_tokenizer"], "ByteLevel") {
        return Err(unsupported(
            "the pre-tokenizer is not byte-level (a SentencePiece-style tokenizer?)".into(),
        ));
    }

    // Token strings in id order: the BPE vocabulary plus the added tokens, padded to the
    // embedding's row count as llama.cpp's converter pads (`[PADn]`, type UNUSED).
    let n = cfg.vocab_size;
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; n];
    let mut place = |id: u64, text: &str, ty: i32| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| Error::Tokenizer {
            path: path.clone(),
            message: format!(
                "token `{text}` has id {id}, beyond the model's vocab_size ({n}); GGUF needs one \
                 embedding row per token"
            ),
        })?;
        *slot = Some((text.to_string(), ty));
        Ok(())
    };
    if let Some(vocab) = model["vocab"].as_object() {
        for (text, id) in vocab {
            if let Some(id) = id.as_u64() {
                place(id, text, NORMAL)?;
            }
        }
    }
    for added in tj["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(text)) = (added["id"].as_u64(), added["content"].as_str()) else {
            continue;
        };
        let ty = if added["special"].as_bool() == Some(true) {
            CONTROL
        } else {
            USER_DEFINED
        };
        place(id, text, ty)?;
    }
    let (texts, types): (Vec<Value>, Vec<Value>) = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| match t {
            Some((text, ty)) => (Value::String(text), Value::I32(ty)),
            None => (Value::String(format!("[PAD{id}]")), Value::I32(UNUSED)),
        })
        .unzip();

    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(a), Json::String(b)] => Some(format!("{a} {b}")),
                _ => None,
            },
            _ => None,
        })
        .map(Value::String)
        .collect();

    let id_of = |role: &str| {
        tokenizer
            .special_token(role)
            .and_then(|t| tokenizer.token_id(t))
    };
    let bos = id_of("bos_token").or(cfg.bos_token_id);
    let eos = id_of("eos_token").or(cfg.eos_token_ids.first().copied());
    let pad = id_of("pad_token").or(cfg.pad_token_id);
    let (add_bos, add_eos) = template_adds(&tj["post_processor"]);

    let mut out = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String(pre_name(&tj["pre_tokenizer"]).into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(texts)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
    ];
    for (key, id) in [("bos", bos), ("eos", eos), ("padding", pad)] {
        if let Some(id) = id {
            out.push((format!("tokenizer.ggml.{key}_token_id"), Value::U32(id)));
        }
    }
    if let Some(unk) = id_of("unk_token") {
        out.push(("tokenizer.ggml.unknown_token_id".into(), Value::U32(unk)));
    }
    out.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    out.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(add_eos)));
    if let Some(template) = Tokenizer::chat_template_source(dir)? {
        out.push(("tokenizer.chat_template".into(), Value::String(template)));
    }
    out.push(("tokenizer.huggingface.json".into(), Value::String(text)));
    Ok(out)
}

/// Whether a pre-tokenizer (or one inside a `Sequence`) has this `type`.
fn has_type(node: &Json, ty: &str) -> bool {
    node["type"].as_str() == Some(ty)
        || node["pretokenizers"]
            .as_array()
            .is_some_and(|items| items.iter().any(|n| has_type(n, ty)))
}

/// llama.cpp's name for the split a pre-tokenizer performs: a `Split` with Llama 3's or Qwen2's
/// regex, or a lone regex-using `ByteLevel` (GPT-2's regex); anything else is `default`.
fn pre_name(pre: &Json) -> &'static str {
    let mut patterns = Vec::new();
    collect_split_patterns(pre, &mut patterns);
    match patterns.as_slice() {
        [p] if p == LLAMA3_SPLIT => "llama-bpe",
        [p] if p == QWEN2_SPLIT => "qwen2",
        [] if pre["type"].as_str() == Some("ByteLevel")
            && pre["use_regex"].as_bool() != Some(false) =>
        {
            "gpt-2"
        }
        _ => "default",
    }
}

fn collect_split_patterns(node: &Json, out: &mut Vec<String>) {
    if node["type"].as_str() == Some("Split")
        && let Some(p) = node["pattern"]["Regex"].as_str()
    {
        out.push(p.to_string());
    }
    for n in node["pretokenizers"].as_array().into_iter().flatten() {
        collect_split_patterns(n, out);
    }
}

/// Whether the post-processor's single-sequence template starts (BOS) and ends (EOS) with a
/// special token.
fn template_adds(post: &Json) -> (bool, bool) {
    if post["type"].as_str() == Some("Sequence") {
        return post["processors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(template_adds)
            .fold((false, false), |(a, b), (c, d)| (a || c, b || d));
    }
    if post["type"].as_str() != Some("TemplateProcessing") {
        return (false, false);
    }
    let single = post["single"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let special = |p: Option<&Json>| p.is_some_and(|p| p.get("SpecialToken").is_some());
    (special(single.first()), special(single.last()))
}

fn meta_str<'a>(md: &'a HashMap<String, Value>, key: &str) -> Option<&'a str> {
    match md.get(key) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    }
}

fn meta_id(md: &HashMap<String, Value>, key: &str) -> Option<u32> {
    md.get(key).and_then(|v| v.to_u32().ok())
}

/// The special tokens by role (`bos_token` → its text) that the GGUF names by id.
pub(super) fn special_tokens(md: &HashMap<String, Value>) -> BTreeMap<String, String> {
    let tokens = match md.get("tokenizer.ggml.tokens") {
        Some(Value::Array(t)) => t.as_slice(),
        _ => &[],
    };
    let mut out = BTreeMap::new();
    for (role, key) in [
        ("bos_token", "bos"),
        ("eos_token", "eos"),
        ("pad_token", "padding"),
        ("unk_token", "unknown"),
    ] {
        let text = meta_id(md, &format!("tokenizer.ggml.{key}_token_id"))
            .and_then(|id| tokens.get(id as usize))
            .and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                _ => None,
            });
        if let Some(text) = text {
            out.insert(role.to_string(), text);
        }
    }
    out
}

/// The embedded `tokenizer.json`, or one rebuilt from `tokenizer.ggml.*`.
///
/// The rebuild is exact for the vocabulary, the merges, the added tokens and the BOS the
/// post-processor adds. What it approximates: the pre-tokenizer comes from the `pre` name
/// (`llama-bpe` and `qwen2` get their split regexes, everything else GPT-2's byte-level regex),
/// there is no normalizer, and BPE options that llama.cpp does not record (`ignore_merges`,
/// dropout) take their defaults except `ignore_merges` for `llama-bpe`, which Llama 3 sets.
pub(super) fn tokenizer_json(md: &HashMap<String, Value>, path: &Path) -> Result<String> {
    if let Some(json) = meta_str(md, "tokenizer.huggingface.json") {
        return Ok(json.to_string());
    }
    rebuild_tokenizer_json(md, path)
}

fn rebuild_tokenizer_json(md: &HashMap<String, Value>, path: &Path) -> Result<String> {
    let err = |key: &str, message: String| Error::config(path, key, message);
    let model = meta_str(md, "tokenizer.ggml.model").ok_or_else(|| {
        err(
            "tokenizer.ggml.model",
            "missing: the file has no tokenizer".into(),
        )
    })?;
    if model != "gpt2" {
        return Err(err(
            "tokenizer.ggml.model",
            format!(
                "`{model}`: without `tokenizer.huggingface.json` kiln rebuilds byte-level BPE \
                 (`gpt2`) tokenizers only"
            ),
        ));
    }
    let tokens = match md.get("tokenizer.ggml.tokens") {
        Some(Value::Array(t)) => t,
        _ => {
            return Err(err(
                "tokenizer.ggml.tokens",
                "missing or not an array".into(),
            ));
        }
    };
    let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
        Some(Value::Array(t)) => t.iter().map(|v| v.to_i32().unwrap_or(NORMAL)).collect(),
        _ => vec![NORMAL; tokens.len()],
    };
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        let Value::String(text) = token else {
            return Err(err(
                "tokenizer.ggml.tokens",
                format!("entry {id} is not a string"),
            ));
        };
        // Added tokens are in the BPE vocabulary too, as transformers saves them: `tokenizers`
        // keeps an added token's id only when the model's vocabulary has it.
        match types.get(id).copied().unwrap_or(NORMAL) {
            UNUSED => continue,
            CONTROL | USER_DEFINED => added.push(json!({
                "id": id, "content": text, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false,
                "special": types.get(id) == Some(&CONTROL),
            })),
            _ => {}
        }
        vocab.insert(text.clone(), json!(id));
    }
    let merges: Vec<Json> = match md.get("tokenizer.ggml.merges") {
        Some(Value::Array(m)) => m
            .iter()
            .filter_map(|v| match v {
                Value::String(s) => Some(Json::String(s.clone())),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let pre = meta_str(md, "tokenizer.ggml.pre").unwrap_or("default");
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |regex: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]})
    };
    let pre_tokenizer = match pre {
        "llama-bpe" | "llama3" => split(LLAMA3_SPLIT),
        "qwen2" => split(QWEN2_SPLIT),
        _ => byte_level(true),
    };
    let add_bos = matches!(
        md.get("tokenizer.ggml.add_bos_token"),
        Some(Value::Bool(true))
    );
    let bos =
        meta_id(md, "tokenizer.ggml.bos_token_id").and_then(|id| match tokens.get(id as usize) {
            Some(Value::String(s)) => Some((id, s.clone())),
            _ => None,
        });
    let post_processor = match (add_bos, bos) {
        (true, Some((id, text))) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {text.clone(): {"id": text, "ids": [id], "tokens": [text]}},
        }),
        _ => byte_level(true),
    };
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": matches!(pre, "llama-bpe" | "llama3"),
            "vocab": vocab, "merges": merges,
        },
    });
    Ok(tj.to_string())
}
