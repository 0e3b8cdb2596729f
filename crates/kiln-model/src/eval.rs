//! Perplexity with transformers' `labels=input_ids` semantics: the mean negative log-likelihood
//! of every token after the first, each predicted from all tokens before it. Texts longer than
//! the context are scored with overlapping windows (the strided method of the transformers
//! perplexity guide): each window re-reads `window - stride` tokens of context and scores only
//! the tokens no earlier window scored, so every token is scored exactly once.

use candle_core::{D, Result, Tensor};
use serde::Serialize;

use crate::transformer::CausalLm;

/// Positions projected onto the vocabulary at once: bounds the logits buffer for long windows.
const LOGITS_CHUNK: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Perplexity {
    pub mean_nll: f64,
    pub perplexity: f64,
    /// Tokens in the text (BOS included when the tokenizer adds it).
    pub tokens: usize,
    /// Tokens scored: all but the first.
    pub predicted_tokens: usize,
}

/// Scores `ids` in windows of at most `window` tokens advancing by `stride`.
pub fn perplexity(
    model: &CausalLm,
    ids: &[u32],
    window: usize,
    stride: usize,
) -> Result<Perplexity> {
    perplexity_with_progress(model, ids, window, stride, |_, _| {})
}

/// [`perplexity`], calling `progress(scored, total)` after each window with the number of
/// tokens scored so far and the number to score.
pub fn perplexity_with_progress(
    model: &CausalLm,
    ids: &[u32],
    window: usize,
    stride: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    if ids.len() < 2 {
        candle_core::bail!(
            "perplexity needs at least 2 tokens, the text has {}",
            ids.len()
        );
    }
    if window < 2 || stride == 0 || stride > window {
        candle_core::bail!(
            "invalid window {window} / stride {stride}: need 2 <= window and 0 < stride <= window"
        );
    }
    let device = model.device();
    let mut total_nll = 0.0f64;
    let mut scored_until = 1; // the first token is never predicted
    let mut begin = 0;
    loop {
        let end = (begin + window).min(ids.len());
        let input = Tensor::new(&ids[begin..end], device)?.unsqueeze(0)?;
        let hidden = model.forward_hidden(&input, None)?.squeeze(0)?;
        // Position p (absolute) is predicted by the hidden state at p - 1.
        let first_target = scored_until.max(begin + 1);
        let mut p = first_target;
        while p < end {
            let n = LOGITS_CHUNK.min(end - p);
            let logits = model.project(&hidden.narrow(0, p - 1 - begin, n)?)?;
            let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let targets = Tensor::new(&ids[p..p + n], device)?.unsqueeze(1)?;
            let picked = log_probs
                .gather(&targets, 1)?
                .squeeze(1)?
                .to_vec1::<f32>()?;
            total_nll -= picked.iter().map(|&x| f64::from(x)).sum::<f64>();
            p += n;
        }
        scored_until = end;
        progress(end - 1, ids.len() - 1);
        if end == ids.len() {
            break;
        }
        begin += stride;
    }
    let predicted = ids.len() - 1;
    let mean_nll = total_nll / predicted as f64;
    Ok(Perplexity {
        mean_nll,
        perplexity: mean_nll.exp(),
        tokens: ids.len(),
        predicted_tokens: predicted,
    })
}
