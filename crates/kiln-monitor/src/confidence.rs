//! Confidence of one reply, from the token log-probs the upstream returned.
//!
//! Two sources, in order of preference:
//!
//! 1. kiln's own extension (`kiln serve`): `"kiln": {"choices": [{"index", "mean_logprob",
//!    "mean_entropy"}]}` on a completion, or on a stream's chunk that finishes the choice. Its
//!    entropy is the exact entropy of the full next-token distribution.
//! 2. OpenAI-style `logprobs`, as OpenAI and vLLM return them when asked: the chat format
//!    (`choices[i].logprobs.content = [{"token", "logprob", "top_logprobs": [{"token",
//!    "logprob"}]}]`) and the legacy completions format (`choices[i].logprobs = {"tokens",
//!    "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`). A stream carries
//!    the same per chunk, and [`StreamConfidence`] adds them up.
//!
//! When both are present the extension gives the mean log-prob and mean entropy, and the
//! `logprobs` still give the minimum log-prob and the token count, which the extension lacks.
//!
//! Entropy from `top_logprobs` sees only the top k outcomes. With `p_i = exp(lp_i)` and the
//! tail mass `r = max(0, 1 − Σ p_i)`, the entropy is taken as `−Σ p_i ln p_i − r ln r`: the
//! tail counted as a single outcome. Splitting the tail into the many tokens it really holds can
//! only raise the entropy, so this is a **lower bound** of the true entropy, tight when the top k
//! hold nearly all the mass. Values that are not finite numbers are skipped, and odd JSON gives
//! `None`, never a panic.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Token-level confidence of one reply.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Confidence {
    /// Mean log-prob (natural log) of the generated tokens.
    pub mean_logprob: f64,
    /// Mean entropy, in nats, of the next-token distributions; `None` when the source gave no
    /// top-k alternatives. From `top_logprobs` it is a lower bound (see the module doc).
    pub mean_entropy: Option<f64>,
    /// The lowest token log-prob; `None` when only the kiln extension was available.
    pub min_logprob: Option<f64>,
    /// How many tokens the means cover; `None` when only the kiln extension was available.
    pub tokens: Option<usize>,
}

/// Confidence of choice `choice` of a non-streaming completion body: kiln's extension first,
/// else `logprobs` in the chat or the legacy completions format; `None` when neither is there.
pub fn from_reply(body: &Value, choice: usize) -> Option<Confidence> {
    let mut acc = Accumulator::default();
    if let Some(c) = find_choice(body, choice) {
        acc.add_logprobs(c.get("logprobs"));
    }
    let kiln = kiln_entry(body, choice);
    combine(kiln, &acc)
}

/// Confidence of the first choice (index 0) of a stream, fed one parsed chunk at a time.
///
/// A kiln extension entry for choice 0 (on the chunk that finishes it) wins over the
/// accumulated `logprobs`; the `logprobs` still give the minimum and the token count.
#[derive(Debug, Default)]
pub struct StreamConfidence {
    acc: Accumulator,
    kiln: Option<KilnEntry>,
}

impl StreamConfidence {
    /// Takes in one chunk (`chat.completion.chunk` or a streamed `text_completion`).
    pub fn push_chunk(&mut self, chunk: &Value) {
        if let Some(c) = find_choice(chunk, 0) {
            self.acc.add_logprobs(c.get("logprobs"));
        }
        if let Some(k) = kiln_entry(chunk, 0) {
            self.kiln = Some(k);
        }
    }

    /// The confidence so far; `None` when no chunk carried a usable signal.
    pub fn finish(&self) -> Option<Confidence> {
        combine(self.kiln, &self.acc)
    }
}

/// The kiln extension's numbers for one choice.
#[derive(Debug, Clone, Copy)]
struct KilnEntry {
    mean_logprob: f64,
    mean_entropy: Option<f64>,
}

fn combine(kiln: Option<KilnEntry>, acc: &Accumulator) -> Option<Confidence> {
    let from_logprobs = acc.confidence();
    match kiln {
        Some(k) => Some(Confidence {
            mean_logprob: k.mean_logprob,
            mean_entropy: k
                .mean_entropy
                .or(from_logprobs.and_then(|c| c.mean_entropy)),
            min_logprob: from_logprobs.and_then(|c| c.min_logprob),
            tokens: from_logprobs.and_then(|c| c.tokens),
        }),
        None => from_logprobs,
    }
}

fn finite(v: &Value) -> Option<f64> {
    v.as_f64().filter(|x| x.is_finite())
}

/// `choices[j]` whose `index` is `choice` (by position when `index` is missing).
fn find_choice(body: &Value, choice: usize) -> Option<&Value> {
    let choices = body.get("choices")?.as_array()?;
    choices
        .iter()
        .find(|c| c.get("index").and_then(Value::as_u64) == Some(choice as u64))
        .or_else(|| {
            choices
                .get(choice)
                .filter(|c| c.get("index").is_none_or(Value::is_null))
        })
}

/// The kiln extension entry for `choice`, when it has a finite mean log-prob.
fn kiln_entry(body: &Value, choice: usize) -> Option<KilnEntry> {
    let entry = find_choice(body.get("kiln")?, choice)?;
    let mean_logprob = finite(entry.get("mean_logprob")?)?;
    let mean_entropy = entry
        .get("mean_entropy")
        .and_then(finite)
        .filter(|h| *h >= 0.0);
    Some(KilnEntry {
        mean_logprob,
        mean_entropy,
    })
}

/// Running sums over tokens.
#[derive(Debug, Default, Clone)]
struct Accumulator {
    sum_logprob: f64,
    tokens: usize,
    min_logprob: Option<f64>,
    sum_entropy: f64,
    entropy_tokens: usize,
}

impl Accumulator {
    fn add_token(&mut self, logprob: Option<f64>, entropy: Option<f64>) {
        if let Some(lp) = logprob {
            self.sum_logprob += lp;
            self.tokens += 1;
            self.min_logprob = Some(self.min_logprob.map_or(lp, |m| m.min(lp)));
        }
        if let Some(h) = entropy {
            self.sum_entropy += h;
            self.entropy_tokens += 1;
        }
    }

    /// Adds a choice's `logprobs` object in either format; anything else is ignored.
    fn add_logprobs(&mut self, logprobs: Option<&Value>) {
        let Some(lp) = logprobs else { return };
        // A refusal's tokens come in `refusal` instead of `content`.
        let chat_tokens = lp
            .get("content")
            .and_then(Value::as_array)
            .or_else(|| lp.get("refusal").and_then(Value::as_array));
        if let Some(content) = chat_tokens {
            for token in content {
                let logprob = token.get("logprob").and_then(finite);
                let entropy = token
                    .get("top_logprobs")
                    .and_then(Value::as_array)
                    .and_then(|top| {
                        topk_entropy(top.iter().filter_map(|t| t.get("logprob").and_then(finite)))
                    });
                self.add_token(logprob, entropy);
            }
        } else if let Some(token_logprobs) = lp.get("token_logprobs").and_then(Value::as_array) {
            let top = lp.get("top_logprobs").and_then(Value::as_array);
            for (i, v) in token_logprobs.iter().enumerate() {
                let entropy = top
                    .and_then(|t| t.get(i))
                    .and_then(Value::as_object)
                    .and_then(|m| topk_entropy(m.values().filter_map(finite)));
                self.add_token(finite(v), entropy);
            }
        }
    }

    fn confidence(&self) -> Option<Confidence> {
        if self.tokens == 0 {
            return None;
        }
        let mean_entropy =
            (self.entropy_tokens > 0).then(|| self.sum_entropy / self.entropy_tokens as f64);
        Some(Confidence {
            mean_logprob: self.sum_logprob / self.tokens as f64,
            mean_entropy,
            min_logprob: self.min_logprob,
            tokens: Some(self.tokens),
        })
    }
}

/// Entropy (nats) of the top-k log-probs with the remaining mass as one outcome: a lower bound
/// of the true entropy. `None` when no finite log-prob is given.
pub fn topk_entropy(logprobs: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut seen = false;
    let mut mass = 0.0;
    let mut entropy = 0.0;
    for lp in logprobs.into_iter().filter(|lp| lp.is_finite()) {
        seen = true;
        let p = lp.min(0.0).exp();
        mass += p;
        if p > 0.0 {
            entropy -= p * p.ln();
        }
    }
    if !seen {
        return None;
    }
    let tail = (1.0 - mass).max(0.0);
    if tail > 0.0 {
        entropy -= tail * tail.ln();
    }
    Some(entropy.max(0.0))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn entropy_of_a_certain_token_is_zero() {
        assert_eq!(topk_entropy([0.0]), Some(0.0));
    }

    #[test]
    fn entropy_counts_the_tail_as_one_outcome() {
        let h = topk_entropy([0.5f64.ln(), 0.25f64.ln()]).unwrap();
        // p = 0.5, 0.25, tail 0.25: H = 0.5 ln 2 + 2 · 0.25 ln 4 = 1.5 ln 2.
        assert!((h - 1.5 * 2f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn entropy_skips_non_finite_and_empty() {
        assert_eq!(topk_entropy([]), None);
        assert_eq!(topk_entropy([f64::NEG_INFINITY, f64::NAN]), None);
    }

    #[test]
    fn kiln_null_mean_falls_back_to_logprobs() {
        let body = json!({
            "choices": [{"index": 0, "logprobs": {"content": [{"token": "a", "logprob": -1.0}]}}],
            "kiln": {"choices": [{"index": 0, "mean_logprob": null, "mean_entropy": null}]}
        });
        let c = from_reply(&body, 0).unwrap();
        assert_eq!(c.mean_logprob, -1.0);
        assert_eq!(c.tokens, Some(1));
        assert_eq!(c.mean_entropy, None);
    }

    #[test]
    fn refusal_tokens_count() {
        let body = json!({"choices": [{"index": 0, "logprobs": {"content": null,
            "refusal": [{"token": "No", "logprob": -0.5, "top_logprobs": []}]}}]});
        assert_eq!(from_reply(&body, 0).map(|c| c.mean_logprob), Some(-0.5));
    }

    #[test]
    fn odd_json_gives_none() {
        for body in [
            json!(null),
            json!([]),
            json!({"choices": 3}),
            json!({"choices": [{"index": "x", "logprobs": 7}]}),
            json!({"kiln": {"choices": [{"index": 0, "mean_logprob": "NaN"}]}}),
            json!({"choices": [{"index": 0, "logprobs": {"content": [{"logprob": null}]}}]}),
        ] {
            assert_eq!(from_reply(&body, 0), None, "{body}");
        }
    }
}
