//! Grounding: the share of a reply's content that the request's retrieved context supports.
//!
//! # Marking context in a request
//!
//! [`context_of`] looks for retrieved documents in a chat request (`messages`, each `content`
//! a string or a list of parts `[{"type": "text", "text": ...}]`) or a completions request
//! (`prompt`, a string or a list of strings). It recognises three conventions:
//!
//! 1. **Tool results**: the whole content of every message with role `tool` (or the legacy
//!    `function`) is context.
//! 2. **Tags**, in any message or prompt: the text inside `<context>…</context>`,
//!    `<documents>…</documents>` or `<document …>…</document>`. Tag names are case-insensitive
//!    and the opening tag may carry attributes (`<document id="3" source="wiki">`). An outer
//!    tag is taken whole (documents inside `<documents>` are not counted twice), markup inside
//!    is dropped, and a tag that is never closed runs to the end of the message.
//! 3. **Labelled blocks**: a line that starts with `Context:`, `Documents:`, `Sources:` or
//!    `Retrieved:` (any case, leading spaces allowed) opens a block holding the rest of that
//!    line and the lines after it, up to a line starting with `Question:` or `Query:`, or the
//!    end of the message.
//!
//! A request with none of these has no context, and [`context_of`] returns `None`: an
//! ordinary prompt is never taken for context.
//!
//! # The check
//!
//! [`ground`] (or [`Context::ground`], which tokenizes the context once for many replies) is
//! cheap and needs no model. The reply is split into sentences (at `.`, `!` or `?` before a
//! space, and at line breaks). A sentence's *content tokens* are its words lowercased, minus
//! English stopwords, lightly stemmed (plural `-s`/`-es`/`-ies`, `-ed`, `-ing`, a final `-e`),
//! plus its numbers, normalized (`1,000` → `1000`, `3.0` → `3`, `5%` → `5`). The context is
//! tokenized the same way. A sentence is **supported** when
//!
//! - at least [`MIN_SUPPORTED_SHARE`] (60%) of its content tokens occur in the context,
//! - every number in it occurs in the context, and
//! - every capitalized word that does not start the sentence (a name, most likely) occurs in
//!   the context.
//!
//! The score is the content tokens of supported sentences over all content tokens, in 0..=1.
//!
//! **Abstentions are not hallucinations.** A sentence that declines to answer ("I don't know",
//! "The context does not say", "There is not enough information") counts as supported unless
//! it slips in a number or a name the context lacks ("I'm not sure, but it was 1920"), so a
//! reply that only abstains scores 1.0, with its sentences counted as supported.
//!
//! This is lexical overlap: it catches invented numbers, names and facts that share no words
//! with the context, but not a paraphrase that reverses the meaning ("not" is a stopword) or a
//! correct answer phrased in words the context does not use.

use std::collections::HashSet;

use serde::Serialize;
use serde_json::Value;

/// The share of a sentence's content tokens that must occur in the context for the sentence
/// to be supported.
pub const MIN_SUPPORTED_SHARE: f64 = 0.6;

/// How much of a reply the context supports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Grounding {
    /// Content tokens in supported sentences over all content tokens, 0..=1.
    pub score: f64,
    /// Sentences with at least one content token.
    pub sentences: usize,
    /// Of those, the supported ones (abstentions included).
    pub supported: usize,
    /// Numbers in the reply (counted with repeats) that the context does not contain.
    pub unsupported_numbers: usize,
}

/// The retrieved context a request carries, joined by blank lines; `None` when it carries none.
/// See the module doc for the conventions.
pub fn context_of(request: &Value) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    if let Some(messages) = request.get("messages").and_then(Value::as_array) {
        for message in messages {
            let Some(text) = message.get("content").and_then(content_text) else {
                continue;
            };
            let role = message.get("role").and_then(Value::as_str).unwrap_or("");
            if role == "tool" || role == "function" {
                parts.push(text);
            } else {
                extract_marked(&text, &mut parts);
            }
        }
    }
    match request.get("prompt") {
        Some(Value::String(p)) => extract_marked(p, &mut parts),
        Some(Value::Array(ps)) => {
            for p in ps.iter().filter_map(Value::as_str) {
                extract_marked(p, &mut parts);
            }
        }
        _ => {}
    }
    let parts: Vec<String> = parts
        .into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    (!parts.is_empty()).then(|| parts.join("\n\n"))
}

/// A message's content as text: a string, or the `text` of its text parts joined by newlines.
fn content_text(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => {
            let texts: Vec<&str> = parts
                .iter()
                .filter(|p| p.get("type").and_then(Value::as_str).unwrap_or("text") == "text")
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect();
            (!texts.is_empty()).then(|| texts.join("\n"))
        }
        _ => None,
    }
}

const TAGS: [&str; 3] = ["context", "documents", "document"];
const BLOCK_LABELS: [&str; 4] = ["context:", "documents:", "sources:", "retrieved:"];
const BLOCK_ENDS: [&str; 2] = ["question:", "query:"];

/// Appends the tagged spans and the labelled blocks of `text` to `out`.
fn extract_marked(text: &str, out: &mut Vec<String>) {
    extract_tagged(text, out);
    extract_blocks(text, out);
}

/// The position of the next opening tag among [`TAGS`] at or after `from`, with the tag name
/// and the position just past the opening tag's `>`.
fn next_open_tag(lower: &str, from: usize) -> Option<(usize, &'static str, usize)> {
    let bytes = lower.as_bytes();
    let mut i = from;
    while let Some(off) = lower.get(i..)?.find('<') {
        let start = i + off;
        let rest = &lower[start + 1..];
        for tag in TAGS {
            if let Some(after) = rest.strip_prefix(tag) {
                let next = after.as_bytes().first().copied();
                if matches!(next, Some(b'>') | Some(b' ' | b'\t' | b'\n' | b'\r' | b'/')) {
                    let name_end = start + 1 + tag.len();
                    let close = lower[name_end..].find('>').map(|o| name_end + o + 1)?;
                    // A self-closing tag holds nothing.
                    if bytes.get(close.wrapping_sub(2)) == Some(&b'/') {
                        break;
                    }
                    return Some((start, tag, close));
                }
            }
        }
        i = start + 1;
    }
    None
}

fn extract_tagged(text: &str, out: &mut Vec<String>) {
    // ASCII lowercasing keeps byte offsets, so positions in `lower` index `text`.
    let lower = text.to_ascii_lowercase();
    let mut from = 0;
    while let Some((_, tag, body_start)) = next_open_tag(&lower, from) {
        let closing = format!("</{tag}>");
        let (body_end, next) = match lower[body_start..].find(&closing) {
            Some(o) => (body_start + o, body_start + o + closing.len()),
            None => (text.len(), text.len()),
        };
        out.push(strip_markup(&text[body_start..body_end]));
        from = next;
    }
}

/// Drops `<tag …>` and `</tag>` markup, keeping the text between.
fn strip_markup(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(lt) = rest.find('<') {
        out.push_str(&rest[..lt]);
        let after = &rest[lt + 1..];
        let is_tag = after
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '/');
        match after.find('>') {
            Some(gt) if is_tag => {
                out.push('\n');
                rest = &after[gt + 1..];
            }
            _ => {
                out.push('<');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn strip_label<'a>(line: &'a str, labels: &[&str]) -> Option<&'a str> {
    let trimmed = line.trim_start();
    labels.iter().find_map(|label| {
        let head = trimmed.get(..label.len())?;
        head.eq_ignore_ascii_case(label)
            .then(|| &trimmed[label.len()..])
    })
}

fn extract_blocks(text: &str, out: &mut Vec<String>) {
    let mut block: Option<String> = None;
    for line in text.lines() {
        if strip_label(line, &BLOCK_ENDS).is_some() {
            if let Some(b) = block.take() {
                out.push(b);
            }
            continue;
        }
        if let Some(rest) = strip_label(line, &BLOCK_LABELS) {
            let b = block.get_or_insert_with(String::new);
            b.push_str(rest);
            b.push('\n');
        } else if let Some(b) = block.as_mut() {
            b.push_str(line);
            b.push('\n');
        }
    }
    if let Some(b) = block {
        out.push(b);
    }
}

/// The grounding of `reply` in `context`; `None` when the reply has no content words.
pub fn ground(reply: &str, context: &str) -> Option<Grounding> {
    Context::new(context).ground(reply)
}

/// A context tokenized once, to check several replies (the choices of one request) against it.
#[derive(Debug, Clone, Default)]
pub struct Context {
    tokens: HashSet<String>,
}

impl Context {
    /// Tokenizes `text` as the module doc describes.
    pub fn new(text: &str) -> Self {
        let tokens = words(text)
            .into_iter()
            .filter_map(|w| content_token(&w))
            .map(|t| t.text)
            .collect();
        Self { tokens }
    }

    /// Whether the context holds no content tokens at all.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The grounding of `reply` in this context; `None` when the reply has no content words.
    pub fn ground(&self, reply: &str) -> Option<Grounding> {
        let mut total = 0usize;
        let mut supported_tokens = 0usize;
        let mut sentences = 0usize;
        let mut supported = 0usize;
        let mut unsupported_numbers = 0usize;
        for sentence in split_sentences(reply) {
            let words = words(sentence);
            let tokens: Vec<(ContentToken, bool)> = words
                .iter()
                .enumerate()
                .filter_map(|(i, w)| content_token(w).map(|t| (t, i > 0 && is_capitalized(w))))
                .collect();
            if tokens.is_empty() {
                continue;
            }
            sentences += 1;
            total += tokens.len();
            let found = |t: &ContentToken| self.tokens.contains(&t.text);
            let missing_numbers = tokens
                .iter()
                .filter(|(t, _)| t.is_number && !found(t))
                .count();
            unsupported_numbers += missing_numbers;
            let hits = tokens.iter().filter(|(t, _)| found(t)).count();
            let names_ok = tokens.iter().all(|(t, name)| !name || found(t));
            // An abstention is excused the share of tokens, not an invented number or name
            // ("I'm not sure, but it was 1920").
            let ok = missing_numbers == 0
                && names_ok
                && (is_abstention(sentence)
                    || hits as f64 >= MIN_SUPPORTED_SHARE * tokens.len() as f64);
            if ok {
                supported += 1;
                supported_tokens += tokens.len();
            }
        }
        (total > 0).then(|| Grounding {
            score: supported_tokens as f64 / total as f64,
            sentences,
            supported,
            unsupported_numbers,
        })
    }
}

/// Sentences: split at line breaks and at `.`, `!`, `?` followed by whitespace or the end.
fn split_sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let next = chars.peek().map(|&(_, n)| n);
        let end = match c {
            '\n' | '\r' => true,
            '.' | '!' | '?' => next.is_none_or(char::is_whitespace),
            _ => false,
        };
        if end {
            let piece = &text[start..i + c.len_utf8()];
            if !piece.trim().is_empty() {
                out.push(piece);
            }
            start = i + c.len_utf8();
        }
    }
    if !text[start..].trim().is_empty() {
        out.push(&text[start..]);
    }
    out
}

/// Words as written: runs of alphanumerics; a number keeps a decimal point followed by a digit
/// and a thousands comma followed by exactly three digits.
fn words(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_alphanumeric() {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() {
            let c = chars[i];
            if c.is_alphanumeric() {
                i += 1;
                continue;
            }
            let numeric_so_far = chars[start..i]
                .iter()
                .all(|c| c.is_ascii_digit() || *c == '.' || *c == ',');
            let digit_at = |k: usize| chars.get(k).is_some_and(char::is_ascii_digit);
            if numeric_so_far && c == '.' && digit_at(i + 1) && !chars[start..i].contains(&'.') {
                i += 1;
                continue;
            }
            if numeric_so_far
                && c == ','
                && (1..=3).all(|k| digit_at(i + k))
                && !digit_at(i + 4)
                && !chars[start..i].contains(&'.')
            {
                i += 1;
                continue;
            }
            break;
        }
        out.push(chars[start..i].iter().collect());
    }
    out
}

fn is_capitalized(word: &str) -> bool {
    word.chars().next().is_some_and(char::is_uppercase) && word != "I"
}

#[derive(Debug, Clone, PartialEq)]
struct ContentToken {
    text: String,
    is_number: bool,
}

/// The content token of a word: a normalized number, or a stemmed non-stopword of two or more
/// letters; `None` for anything else.
fn content_token(word: &str) -> Option<ContentToken> {
    if word
        .chars()
        .all(|c| c.is_ascii_digit() || c == '.' || c == ',')
    {
        return Some(ContentToken {
            text: normalize_number(word),
            is_number: true,
        });
    }
    let lower = word.to_lowercase();
    if lower.chars().count() < 2 || STOPWORDS.contains(&lower.as_str()) {
        return None;
    }
    Some(ContentToken {
        text: stem(&lower),
        is_number: false,
    })
}

/// `1,000` → `1000`, `3.0` → `3`, `3.50` → `3.5`.
fn normalize_number(word: &str) -> String {
    let mut s: String = word.chars().filter(|c| *c != ',').collect();
    if s.contains('.') {
        while s.ends_with('0') {
            s.pop();
        }
        if s.ends_with('.') {
            s.pop();
        }
    }
    if s.is_empty() { "0".to_string() } else { s }
}

/// A light suffix stripper, the same on both sides: it needs to be consistent, not correct.
fn stem(word: &str) -> String {
    let mut w = word.to_string();
    let len = w.chars().count();
    if len > 4 && w.ends_with("ies") {
        w.truncate(w.len() - 3);
        w.push('y');
    } else if len > 4
        && ["sses", "ches", "shes", "xes", "zes"]
            .iter()
            .any(|s| w.ends_with(s))
    {
        w.truncate(w.len() - 2);
    } else if len > 3 && w.ends_with('s') && !["ss", "us", "is"].iter().any(|s| w.ends_with(s)) {
        w.pop();
    } else if len > 5 && w.ends_with("ing") {
        w.truncate(w.len() - 3);
        undouble(&mut w);
    } else if len > 4 && w.ends_with("ed") {
        w.truncate(w.len() - 2);
        undouble(&mut w);
    }
    if w.chars().count() > 3 && w.ends_with('e') {
        w.pop();
    }
    w
}

/// `stopp` → `stop`, keeping `ll`, `ss` and `zz` (`called`, `passed`).
fn undouble(w: &mut String) {
    let b = w.as_bytes();
    if b.len() >= 3 {
        let (x, y) = (b[b.len() - 2], b[b.len() - 1]);
        if x == y && x.is_ascii_alphabetic() && !b"aeioulsz".contains(&x) {
            w.pop();
        }
    }
}

/// Phrases that mark a sentence as declining to answer.
const ABSTENTIONS: [&str; 29] = [
    "i don't know",
    "i do not know",
    "i dont know",
    "i'm not sure",
    "i am not sure",
    "not certain",
    "cannot answer",
    "can't answer",
    "unable to answer",
    "unable to determine",
    "cannot determine",
    "can't determine",
    "does not say",
    "doesn't say",
    "does not mention",
    "doesn't mention",
    "does not contain",
    "doesn't contain",
    "does not provide",
    "doesn't provide",
    "does not specify",
    "doesn't specify",
    "no information",
    "not enough information",
    "insufficient information",
    "not mentioned",
    "not specified",
    "not stated",
    "no answer",
];

fn is_abstention(sentence: &str) -> bool {
    let s = sentence
        .to_lowercase()
        .replace(['\u{2019}', '\u{2018}'], "'");
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    ABSTENTIONS.iter().any(|p| s.contains(p))
        || [
            "i cannot find",
            "i can't find",
            "i could not find",
            "i couldn't find",
        ]
        .iter()
        .any(|p| s.contains(p))
}

/// English function words, plus the fillers of polite refusals.
const STOPWORDS: &[&str] = &[
    "a",
    "about",
    "above",
    "after",
    "again",
    "against",
    "all",
    "also",
    "am",
    "an",
    "and",
    "any",
    "are",
    "aren",
    "as",
    "at",
    "be",
    "because",
    "been",
    "before",
    "being",
    "below",
    "between",
    "both",
    "but",
    "by",
    "can",
    "could",
    "couldn",
    "did",
    "didn",
    "do",
    "does",
    "doesn",
    "doing",
    "don",
    "down",
    "during",
    "each",
    "either",
    "else",
    "ever",
    "few",
    "for",
    "from",
    "further",
    "had",
    "hadn",
    "has",
    "hasn",
    "have",
    "haven",
    "having",
    "he",
    "her",
    "here",
    "hers",
    "herself",
    "him",
    "himself",
    "his",
    "how",
    "however",
    "i",
    "if",
    "in",
    "into",
    "is",
    "isn",
    "it",
    "its",
    "itself",
    "just",
    "let",
    "ll",
    "may",
    "me",
    "might",
    "more",
    "most",
    "much",
    "must",
    "my",
    "myself",
    "neither",
    "no",
    "nor",
    "not",
    "now",
    "of",
    "off",
    "on",
    "once",
    "only",
    "or",
    "other",
    "our",
    "ours",
    "ourselves",
    "out",
    "over",
    "own",
    "per",
    "same",
    "shall",
    "she",
    "should",
    "shouldn",
    "so",
    "some",
    "such",
    "than",
    "that",
    "the",
    "their",
    "theirs",
    "them",
    "themselves",
    "then",
    "there",
    "these",
    "they",
    "this",
    "those",
    "through",
    "thus",
    "to",
    "too",
    "under",
    "until",
    "up",
    "upon",
    "us",
    "very",
    "was",
    "wasn",
    "we",
    "were",
    "weren",
    "what",
    "when",
    "where",
    "whether",
    "which",
    "while",
    "who",
    "whom",
    "whose",
    "why",
    "will",
    "with",
    "within",
    "without",
    "won",
    "would",
    "wouldn",
    "yes",
    "yet",
    "you",
    "your",
    "yours",
    "yourself",
    "yourselves",
    "ve",
    "re",
    "according",
    "based",
    "answer",
    "sorry",
    "unfortunately",
    "apologize",
    "certainly",
    "sure",
    "well",
    "indeed",
    "actually",
    "answer",
    "say",
    "says",
    "said",
    "context",
    "document",
    "documents",
    "text",
    "provided",
    "given",
    "information",
];

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn numbers_normalize() {
        assert_eq!(
            words("1,000 and 3.0, then 3.50. Also 1,2 and 12,3456"),
            [
                "1,000", "and", "3.0", "then", "3.50", "Also", "1", "2", "and", "12", "3456"
            ]
        );
        assert_eq!(normalize_number("1,000"), "1000");
        assert_eq!(normalize_number("3.0"), "3");
        assert_eq!(normalize_number("3.50"), "3.5");
        assert_eq!(normalize_number("300"), "300");
    }

    #[test]
    fn stems_agree_across_forms() {
        for (a, b) in [
            ("founded", "found"),
            ("bases", "based"),
            ("making", "make"),
            ("stopped", "stop"),
            ("cities", "city"),
            ("boxes", "box"),
            ("rivers", "river"),
        ] {
            assert_eq!(stem(a), stem(b), "{a} vs {b}");
        }
    }

    #[test]
    fn sentences_split_but_decimals_do_not() {
        assert_eq!(
            split_sentences("It is 3.5 m. Really?\nYes"),
            ["It is 3.5 m.", " Really?", "\n", "Yes"]
                .into_iter()
                .filter(|s| !s.trim().is_empty())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn strip_markup_keeps_text() {
        assert_eq!(
            strip_markup("<document id=1>a</document> b < c").trim(),
            "a\n b < c"
        );
    }
}
