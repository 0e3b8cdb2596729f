//! One choice's output as its tokens arrive: the text (decoded incrementally, cut at a stop
//! string, without the EOS that ended it), the log-probs, and the confidence statistics. The
//! same state serves streaming (text released in deltas, holding back what could still become a
//! stop string) and non-streaming responses (the whole text at the end).

use kiln_core::Tokenizer;
use kiln_core::tokenizer::IncrementalDecoder;

use super::types::{FinishReason, KilnChoiceStats};
use crate::engine::{SeqFinish, TokenOutput};

/// What every choice of a request shares.
#[derive(Debug, Clone, Copy)]
pub struct ChoiceRules<'a> {
    pub tokenizer: &'a Tokenizer,
    pub stop: &'a [String],
    /// Tokens that end generation and are left out of the text (empty with `ignore_eos`).
    pub eos_token_ids: &'a [u32],
    /// Keep each token's [`TokenOutput`] for the log-prob listing.
    pub keep_logprobs: bool,
}

impl ChoiceRules<'_> {
    fn longest_stop(&self) -> usize {
        self.stop.iter().map(String::len).max().unwrap_or(0)
    }
}

#[derive(Debug)]
pub struct Choice {
    pub index: usize,
    /// Every generated token, a terminating EOS included.
    ids: Vec<u32>,
    decoder: IncrementalDecoder,
    /// The text so far (final once [`Choice::finalize`] has run).
    text: String,
    /// Bytes of `text` released to the client.
    emitted: usize,
    /// No stop string starts before this byte of `text`.
    searched: usize,
    /// Where the first stop string begins, once one has appeared.
    stop_at: Option<usize>,
    /// The tokens of the text, for log-probs (when asked for).
    tokens: Vec<TokenOutput>,
    tokens_sent: usize,
    /// Characters of text the tokens sent so far span (completions' `text_offset`).
    pub text_offset: usize,
    sum_logprob: f64,
    sum_entropy: f64,
    finish: Option<FinishReason>,
    finished: Option<SeqFinish>,
    finalized: bool,
}

impl Choice {
    pub fn new(index: usize) -> Self {
        Self {
            index,
            ids: Vec::new(),
            decoder: IncrementalDecoder::new(false),
            text: String::new(),
            emitted: 0,
            searched: 0,
            stop_at: None,
            tokens: Vec::new(),
            tokens_sent: 0,
            text_offset: 0,
            sum_logprob: 0.0,
            sum_entropy: 0.0,
            finish: None,
            finished: None,
            finalized: false,
        }
    }

    /// Takes a generated token. Returns true when it completed a stop string: the choice is done
    /// and its sequence should be dropped (which aborts it in the engine).
    pub fn push(&mut self, rules: &ChoiceRules, token: TokenOutput) -> kiln_core::Result<bool> {
        self.sum_logprob += f64::from(token.logprob);
        self.sum_entropy += f64::from(token.entropy);
        self.ids.push(token.id);
        if rules.eos_token_ids.contains(&token.id) {
            // The engine ends the sequence here; the EOS is the end of the text, not part of it.
            return Ok(false);
        }
        if let Some(delta) = self.decoder.push(rules.tokenizer, token.id)? {
            self.text.push_str(&delta);
        }
        if rules.keep_logprobs {
            self.tokens.push(token);
        }
        if let Some(at) = self.find_stop(rules) {
            self.stop_at = Some(at);
            self.finish = Some(FinishReason::Stop);
            return Ok(true);
        }
        Ok(false)
    }

    /// The engine finished the sequence.
    pub fn finish(&mut self, finished: SeqFinish) {
        self.finish = Some(finished.reason.into());
        self.finished = Some(finished);
    }

    pub fn is_done(&self) -> bool {
        self.finish.is_some()
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Settles the final text once the choice is done: the generated ids decoded in one go (as
    /// `kiln generate` decodes them, so the text matches it exactly; this also recovers bytes
    /// the incremental decoder was still holding), cut at the first stop string. Streams keep
    /// what they already sent when the two disagree.
    pub fn finalize(&mut self, rules: &ChoiceRules) -> kiln_core::Result<()> {
        if self.finalized {
            return Ok(());
        }
        self.finalized = true;
        let ids = match self.ids.split_last() {
            Some((last, rest)) if rules.eos_token_ids.contains(last) => rest,
            _ => &self.ids[..],
        };
        let mut full = rules.tokenizer.decode(ids, false)?;
        if let Some(at) = first_stop(&full, 0, rules.stop) {
            full.truncate(at);
        }
        if let Some(at) = self.stop_at.take() {
            self.text.truncate(at.max(self.emitted));
        }
        if full.starts_with(&self.text[..self.emitted]) {
            self.text = full;
        }
        Ok(())
    }

    /// The text not yet released that can be released now: everything once the choice is
    /// finalized, otherwise all but a tail that could be the start of a stop string.
    pub fn take_delta(&mut self, rules: &ChoiceRules) -> String {
        let end = if self.finalized {
            self.text.len()
        } else if let Some(at) = self.stop_at {
            at
        } else {
            self.text.len() - self.held_back(rules)
        };
        let end = end.max(self.emitted);
        let delta = self.text[self.emitted..end].to_string();
        self.emitted = end;
        delta
    }

    /// The log-prob entries not yet sent.
    pub fn take_tokens(&mut self) -> &[TokenOutput] {
        let from = self.tokens_sent;
        self.tokens_sent = self.tokens.len();
        &self.tokens[from..]
    }

    /// The whole text (final after [`Choice::finalize`]).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Generated tokens, an EOS and tokens past a stop string included.
    pub fn completion_tokens(&self) -> usize {
        self.ids.len()
    }

    pub fn cached_prompt_tokens(&self) -> usize {
        self.finished.as_ref().map_or(0, |f| f.cached_prompt_tokens)
    }

    pub fn stats(&self) -> KilnChoiceStats {
        let n = self.ids.len();
        let mean = |sum: f64| (n > 0).then(|| (sum / n as f64) as f32);
        KilnChoiceStats {
            index: self.index,
            mean_logprob: mean(self.sum_logprob),
            mean_entropy: mean(self.sum_entropy),
            queue_ms: self
                .finished
                .as_ref()
                .map(|f| f.queue_time.as_secs_f64() * 1e3),
            ttft_ms: self
                .finished
                .as_ref()
                .and_then(|f| f.time_to_first_token)
                .map(|t| t.as_secs_f64() * 1e3),
        }
    }

    fn find_stop(&mut self, rules: &ChoiceRules) -> Option<usize> {
        if rules.stop.is_empty() {
            return None;
        }
        let found = first_stop(&self.text, self.searched, rules.stop);
        // A stop string not found yet can only start in its own length's reach of the end.
        let reach = rules.longest_stop().saturating_sub(1);
        self.searched = floor_char_boundary(&self.text, self.text.len().saturating_sub(reach));
        found
    }

    /// Bytes at the end of the unreleased text that are the start of some stop string.
    fn held_back(&self, rules: &ChoiceRules) -> usize {
        let unreleased = self.text.len() - self.emitted;
        let longest = rules.longest_stop().saturating_sub(1).min(unreleased);
        (1..=longest)
            .rev()
            .find(|&k| {
                let start = self.text.len() - k;
                self.text.is_char_boundary(start)
                    && rules
                        .stop
                        .iter()
                        .any(|s| s.starts_with(&self.text[start..]))
            })
            .unwrap_or(0)
    }
}

/// Where the earliest of `stops` begins in `text`, looking from byte `from` on.
fn first_stop(text: &str, from: usize, stops: &[String]) -> Option<usize> {
    let from = floor_char_boundary(text, from);
    stops
        .iter()
        .filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i))
        .min()
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/hf/llama");
        Tokenizer::from_dir(&dir).expect("fixture tokenizer")
    }

    fn token(id: u32) -> TokenOutput {
        TokenOutput {
            id,
            logprob: -1.0,
            entropy: 2.0,
            top_logprobs: vec![],
        }
    }

    /// Feeds `text`'s tokens one by one and collects the released deltas.
    fn stream(text: &str, stop: &[&str]) -> (Vec<String>, bool, String) {
        let tok = tokenizer();
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let rules = ChoiceRules {
            tokenizer: &tok,
            stop: &stop,
            eos_token_ids: &[3],
            keep_logprobs: false,
        };
        let mut choice = Choice::new(0);
        let mut deltas = Vec::new();
        let mut stopped = false;
        for id in tok.encode(text, false).expect("encodes") {
            stopped = choice.push(&rules, token(id)).expect("decodes");
            deltas.push(choice.take_delta(&rules));
            if stopped {
                break;
            }
        }
        choice.finalize(&rules).expect("decodes");
        deltas.push(choice.take_delta(&rules));
        let joined = deltas.concat();
        assert_eq!(joined, choice.text(), "the deltas add up to the text");
        (deltas, stopped, joined)
    }

    #[test]
    fn stop_string_is_cut_and_never_streamed() {
        let (deltas, stopped, text) = stream("the cat sat on the mat", &["on the"]);
        assert!(stopped);
        assert_eq!(text, "the cat sat ");
        assert!(deltas.iter().all(|d| !d.contains("on")), "{deltas:?}");
    }

    #[test]
    fn text_that_only_looked_like_a_stop_is_released() {
        let (_, stopped, text) = stream("the cat sat on a mat", &["on the"]);
        assert!(!stopped);
        assert_eq!(text, "the cat sat on a mat");
    }

    #[test]
    fn eos_is_not_text_but_counts() {
        let tok = tokenizer();
        let rules = ChoiceRules {
            tokenizer: &tok,
            stop: &[],
            eos_token_ids: &[3],
            keep_logprobs: true,
        };
        let mut choice = Choice::new(0);
        for id in tok
            .encode("hello", false)
            .expect("encodes")
            .into_iter()
            .chain([3])
        {
            choice.push(&rules, token(id)).expect("decodes");
        }
        choice.finalize(&rules).expect("decodes");
        assert_eq!(choice.text(), "hello");
        assert_eq!(choice.completion_tokens(), choice.take_tokens().len() + 1);
        assert_eq!(choice.stats().mean_logprob, Some(-1.0));
    }
}
