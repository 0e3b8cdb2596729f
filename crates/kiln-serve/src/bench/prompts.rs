//! Synthetic prompts: random common English words, one prompt per request, all different.
//!
//! vLLM's random dataset samples token ids, which needs the model's tokenizer on the client.
//! Words need none: a BPE tokenizer trained on English text has most of these as one token
//! with their leading space. When the server has `POST /tokenize`, it measures a probe prompt
//! to learn its tokens per word, sizes every prompt to `prompt_len` tokens from that, and then
//! counts each prompt's tokens exactly.

use std::collections::HashSet;

use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::BenchConfig;
use super::report::InputTokenSource;

/// `/tokenize` calls in flight at once while the prompts are measured.
const TOKENIZE_PARALLEL: usize = 16;
/// The probe prompt has at least this many words, so a BOS token barely moves the ratio.
const PROBE_WORDS: usize = 64;
/// Mixed into the seed for the probe, so it is not the first prompt sent.
const PROBE_SALT: u64 = 0x9e37_79b9_7f4a_7c15;

#[derive(Debug, Clone)]
pub(super) struct Prompt {
    pub text: String,
    /// Tokens in the prompt, as `/tokenize` counted them or estimated.
    pub tokens: usize,
    pub source: InputTokenSource,
}

#[rustfmt::skip]
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "was", "that", "for", "on", "as", "with", "by", "he",
    "it", "at", "from", "his", "an", "were", "are", "which", "this", "be", "or", "has", "had",
    "first", "one", "their", "its", "new", "after", "but", "who", "not", "they", "have", "her",
    "she", "two", "been", "other", "when", "there", "all", "during", "into", "school", "time",
    "may", "years", "more", "most", "only", "over", "city", "some", "world", "would", "where",
    "later", "up", "such", "used", "many", "can", "state", "about", "national", "out", "known",
    "university", "united", "then", "made", "also", "year", "war", "three", "him", "people", "both",
    "through", "part", "these", "under", "before", "each", "well", "company", "second", "long",
    "since", "between", "team", "family", "game", "while", "life", "area", "history", "church",
    "season", "music", "film", "early", "against", "house", "county", "work", "water", "north",
    "same", "name", "south", "end", "government", "river", "number", "four", "system", "did",
    "being", "several", "public", "best", "high", "could", "day", "general", "group", "around",
    "small", "large", "center", "back", "old", "great", "home", "place", "last", "way", "book",
    "five", "album", "series", "west", "east", "york", "local", "power", "own", "art", "point",
    "line", "body", "light", "road", "night", "field", "word", "story", "study", "child", "money",
    "market", "party", "court", "hand", "head", "order", "report", "land", "price", "table",
    "paper", "letter", "green", "garden", "winter", "summer", "spring", "morning", "evening",
    "island", "forest", "mountain", "village", "train", "ship", "bridge", "window", "door",
    "street", "kitchen", "stone", "glass", "bread", "apple", "horse", "bird", "fish", "tree",
    "flower", "sun", "moon", "star", "cloud", "rain", "snow", "wind", "fire", "earth", "sea",
    "lake", "hill", "valley", "king", "queen", "doctor", "teacher", "student", "friend", "mother",
    "father", "brother", "sister", "question", "answer", "reason", "result", "change", "problem",
    "idea", "information", "energy", "science", "nature", "language", "culture", "building",
    "machine", "computer", "model",
];

/// `n` words drawn uniformly, space-separated.
fn words(rng: &mut StdRng, n: usize) -> String {
    let mut text = String::with_capacity(n * 7);
    for i in 0..n {
        if i > 0 {
            text.push(' ');
        }
        text.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    text
}

/// `count` distinct prompts of `n_words` words each (distinct unless `n_words` is too small
/// for there to be that many texts).
fn distinct_texts(rng: &mut StdRng, count: usize, n_words: usize) -> Vec<String> {
    let mut seen = HashSet::with_capacity(count);
    let mut texts = Vec::with_capacity(count);
    while texts.len() < count {
        let mut text = words(rng, n_words);
        for _ in 0..8 {
            if !seen.contains(&text) {
                break;
            }
            text = words(rng, n_words);
        }
        seen.insert(text.clone());
        texts.push(text);
    }
    texts
}

/// The server's token count for `text`, or `None` when it has no `/tokenize` or it failed.
async fn tokenize(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    api_key: Option<&str>,
    text: &str,
) -> Option<usize> {
    let mut req = client
        .post(format!("{base}/tokenize"))
        .json(&json!({"model": model, "prompt": text}));
    if let Some(key) = api_key {
        req = req.bearer_auth(key);
    }
    let resp = req.send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let body: Value = resp.json().await.ok()?;
    let count = body
        .get("count")
        .and_then(Value::as_u64)
        .map(|n| n as usize);
    count.or_else(|| body.get("tokens").and_then(Value::as_array).map(Vec::len))
}

/// The prompts for `cfg.requests` requests, in sending order.
pub(super) async fn prepare(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    cfg: &BenchConfig,
) -> Vec<Prompt> {
    let api_key = cfg.api_key.as_deref();
    let probe_words = cfg.prompt_len.max(PROBE_WORDS);
    let probe = words(
        &mut StdRng::seed_from_u64(cfg.seed ^ PROBE_SALT),
        probe_words,
    );
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let tokens_per_word = match tokenize(client, base, model, api_key, &probe).await {
        Some(count) if count > 0 => count as f64 / probe_words as f64,
        // No tokenizer to ask: one token per word, and every count is an estimate.
        _ => {
            let texts = distinct_texts(&mut rng, cfg.requests, cfg.prompt_len);
            return texts
                .into_iter()
                .map(|text| Prompt {
                    text,
                    tokens: cfg.prompt_len,
                    source: InputTokenSource::Estimate,
                })
                .collect();
        }
    };
    let n_words = ((cfg.prompt_len as f64 / tokens_per_word).round() as usize).max(1);
    let estimate = (n_words as f64 * tokens_per_word).round() as usize;
    let texts = distinct_texts(&mut rng, cfg.requests, n_words);
    let counts: Vec<Option<usize>> = futures_util::stream::iter(&texts)
        .map(|text| tokenize(client, base, model, api_key, text))
        .buffered(TOKENIZE_PARALLEL)
        .collect()
        .await;
    texts
        .into_iter()
        .zip(counts)
        .map(|(text, count)| Prompt {
            text,
            tokens: count.unwrap_or(estimate),
            source: match count {
                Some(_) => InputTokenSource::Tokenize,
                None => InputTokenSource::Estimate,
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_list_has_no_repeats() {
        assert_eq!(WORDS.iter().collect::<HashSet<_>>().len(), WORDS.len());
    }

    #[test]
    fn prompts_are_seeded_and_distinct() {
        let a = distinct_texts(&mut StdRng::seed_from_u64(7), 200, 3);
        let b = distinct_texts(&mut StdRng::seed_from_u64(7), 200, 3);
        assert_eq!(a, b);
        assert_eq!(a.iter().collect::<HashSet<_>>().len(), 200);
        assert!(a.iter().all(|t| t.split(' ').count() == 3));
        let c = distinct_texts(&mut StdRng::seed_from_u64(8), 200, 3);
        assert_ne!(a, c);
    }
}
