//! Autoregressive generation: one prefill pass over the prompt, then one cached step per token.

use candle_core::{Result, Tensor};
use serde::Serialize;

use crate::sampling::{Sampler, SamplingParams};
use crate::transformer::CausalLm;

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops at any of these, unless `ignore_eos`.
    pub eos_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Reuse past keys and values (the default); without it every step recomputes the whole
    /// sequence, which exists to prove the cache changes nothing.
    pub use_kv_cache: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            sampling: SamplingParams::default(),
            eos_token_ids: Vec::new(),
            ignore_eos: false,
            use_kv_cache: true,
        }
    }
}

/// Why generation ended, in the OpenAI API's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An EOS token was produced (and is included in the output).
    Stop,
    /// `max_new_tokens` was reached.
    Length,
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// The new tokens only.
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
}

/// Generates from `prompt_ids`, calling `on_token` as each token is chosen (for streaming).
pub fn generate(
    model: &CausalLm,
    prompt_ids: &[u32],
    params: &GenerateParams,
    mut on_token: impl FnMut(u32),
) -> Result<Generation> {
    if prompt_ids.is_empty() {
        candle_core::bail!("the prompt encodes to no tokens; generation needs at least one");
    }
    let vocab = model.config().vocab_size;
    if let Some(&bad) = prompt_ids.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!(
            "prompt token id {bad} is outside the model's vocabulary ({vocab} entries)"
        );
    }
    let device = model.device();
    let mut sampler = Sampler::new(params.sampling.clone());
    let mut history = prompt_ids.to_vec();
    let mut generated = Vec::with_capacity(params.max_new_tokens);
    let mut cache = params.use_kv_cache.then(|| model.new_cache());

    let mut input = prompt_ids.to_vec();
    while generated.len() < params.max_new_tokens {
        let ids = Tensor::new(input.as_slice(), device)?.unsqueeze(0)?;
        let logits = model
            .forward_last(&ids, cache.as_mut())?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        let next = sampler.sample(&logits, &history);
        history.push(next);
        generated.push(next);
        on_token(next);
        if !params.ignore_eos && params.eos_token_ids.contains(&next) {
            return Ok(Generation {
                token_ids: generated,
                finish_reason: FinishReason::Stop,
            });
        }
        input = if cache.is_some() {
            vec![next]
        } else {
            history.clone()
        };
    }
    Ok(Generation {
        token_ids: generated,
        finish_reason: FinishReason::Length,
    })
}
