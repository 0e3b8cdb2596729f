//! Choosing the next token from logits: greedy at temperature 0, otherwise temperature, top-k,
//! top-p (nucleus) and min-p filtering, with a repetition penalty, in transformers' order
//! (penalty, temperature, top-k, top-p, min-p). Seeded with ChaCha8, so a seed gives the same
//! tokens on every machine and every release.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sampling settings, validated by [`SamplingParams::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the `k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 disables.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 disables.
    pub min_p: f32,
    /// CTRL's penalty (Keskar et al., 2019) on tokens already present; 1 disables.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every field against its range; the message names the field and the range.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// A seeded sampler; reuse one per sequence so its random stream continues across steps.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks a token. `logits` covers the vocabulary; `history` is every token so far (prompt
    /// and generated), for the repetition penalty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in history {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            for (l, _) in logits.iter_mut().zip(&seen).filter(|(_, s)| **s) {
                *l = if *l < 0.0 {
                    *l * p.repetition_penalty
                } else {
                    *l / p.repetition_penalty
                };
            }
        }
        if p.temperature == 0.0 {
            return argmax(&logits);
        }

        // Candidates sorted by logit, best first; filters shrink this list.
        let mut order: Vec<usize> = (0..logits.len())
            .filter(|&i| logits[i].is_finite())
            .collect();
        if order.is_empty() {
            return argmax(&logits);
        }
        order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if p.top_k > 0 && p.top_k < order.len() {
            order.truncate(p.top_k);
        }
        let max = logits[order[0]] / p.temperature;
        let mut probs: Vec<f32> = order
            .iter()
            .map(|&i| (logits[i] / p.temperature - max).exp())
            .collect();
        normalize(&mut probs);
        if p.top_p < 1.0 {
            // Keep the shortest prefix whose mass reaches top_p (at least one token).
            let mut mass = 0.0;
            let keep = probs
                .iter()
                .position(|&q| {
                    mass += q;
                    mass >= p.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            order.truncate(keep);
            probs.truncate(keep);
            normalize(&mut probs);
        }
        if p.min_p > 0.0 {
            let threshold = probs[0] * p.min_p;
            let keep = probs.iter().take_while(|&&q| q >= threshold).count().max(1);
            order.truncate(keep);
            probs.truncate(keep);
            normalize(&mut probs);
        }
        let u: f32 = self.rng.random();
        let mut acc = 0.0;
        for (&i, &q) in order.iter().zip(&probs) {
            acc += q;
            if u < acc {
                return i as u32;
            }
        }
        order[order.len() - 1] as u32
    }
}

fn normalize(probs: &mut [f32]) {
    let sum: f32 = probs.iter().sum();
    if sum > 0.0 {
        probs.iter_mut().for_each(|q| *q /= sum);
    }
}

/// Index of the largest logit; the first one on ties, as `torch.argmax` does.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(params: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(params);
        let mut c = vec![0; logits.len()];
        for _ in 0..n {
            c[s.sample(logits, &[]) as usize] += 1;
        }
        c
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 2.9, -1.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        // 3.0 / 2 = 1.5 < 2.9: the seen token loses its lead.
        assert_eq!(s.sample(&[0.1, 3.0, 2.9, -1.0], &[1]), 2);
    }

    #[test]
    fn top_k_and_top_p_and_min_p_cut_the_tail() {
        let logits = [2.0f32, 1.9, 0.0, -1.0];
        let c = counts(
            SamplingParams {
                top_k: 2,
                ..Default::default()
            },
            &logits,
            2000,
        );
        assert!(c[2] == 0 && c[3] == 0 && c[0] > 0 && c[1] > 0, "{c:?}");
        // p(0) ≈ 0.47, p(0)+p(1) ≈ 0.90: top_p 0.5 keeps two tokens.
        let c = counts(
            SamplingParams {
                top_p: 0.5,
                ..Default::default()
            },
            &logits,
            2000,
        );
        assert!(c[2] == 0 && c[3] == 0 && c[1] > 0, "{c:?}");
        let c = counts(
            SamplingParams {
                min_p: 0.5,
                ..Default::default()
            },
            &logits,
            2000,
        );
        assert!(c[2] == 0 && c[3] == 0, "{c:?}");
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let logits = [0.0f32, (3.0f32).ln()];
        let c = counts(SamplingParams::default(), &logits, 4000);
        let share = c[1] as f64 / 4000.0;
        assert!((share - 0.75).abs() < 0.03, "{share}");
        let a = counts(
            SamplingParams {
                seed: 7,
                ..Default::default()
            },
            &[0.0; 50],
            100,
        );
        let b = counts(
            SamplingParams {
                seed: 7,
                ..Default::default()
            },
            &[0.0; 50],
            100,
        );
        let d = counts(
            SamplingParams {
                seed: 8,
                ..Default::default()
            },
            &[0.0; 50],
            100,
        );
        assert_eq!(a, b);
        assert_ne!(a, d);
    }

    #[test]
    fn validation_names_the_field() {
        let e = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("top_p"));
    }
}
