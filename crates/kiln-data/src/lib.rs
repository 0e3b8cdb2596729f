//! kiln's built-in synthetic world: the data `kiln lifecycle` trains and evaluates on when the
//! user brings none (`kiln data synth --out DIR [--seed S]`).
//!
//! # Why a synthetic world
//!
//! The lifecycle has to show, on two CPU cores in minutes, with a model of a few million
//! parameters, that each stage does what it claims: SFT raises task accuracy, DPO raises the
//! preference rate, PPO raises a rule reward. Real data cannot show that at this scale; a tiny model
//! learns nothing measurable from it. So the world is deliberately *small and regular*: forty
//! people, each with a home town, a favourite colour, a pet and an age; two-digit sums; a few
//! dozen sentence templates. A tiny model can memorise all of it, and every reply can be checked
//! by a program ([`rules`]) instead of by a judge model.
//!
//! # Design
//!
//! - **One seed, one world.** [`World::generate`] and every dataset draw from ChaCha8 streams of
//!   the seed (one stream per dataset, so resizing one leaves the others unchanged); the same
//!   seed gives byte-identical files on every platform.
//! - **Held out by construction, checked by rule.** Each person has one attribute that is never
//!   asked about in training data (it is only *stated* in the corpus), and a seeded hash holds
//!   out one two-digit problem in five from every training file. The evaluation sets draw only
//!   from the held-out side; every training text is additionally rejected if it contains an
//!   evaluation prompt verbatim.
//! - **One answer format.** The assistant answers `Answer: <value>.` ([`rules::format_answer`]);
//!   the corpus dialogues answer in plain sentences, so the format is something SFT teaches and
//!   the format task can measure.
//! - **TRL's formats.** `{"text"}` for the corpus, `{"messages"}` for SFT,
//!   `{"prompt","chosen","rejected"}` for preference pairs, so the files also work with TRL.
//! - **A secret in the system prompt.** [`World::system_prompt`] tells the assistant an access
//!   code and never to reveal it; the secret task and the preference pairs measure and train
//!   that. The corpus never mentions it. Stages that render `eval`, `preference` or `rl` prompts
//!   as conversations put the system prompt first.

pub mod error;
mod generate;
mod io;
mod prompts;
pub mod rules;
mod task;
pub mod world;

pub use error::DataError;
pub use generate::{
    Contrast, MAX_EVAL_EXAMPLES, Message, PreferencePair, SftExample, SynthData, generate,
};
pub use io::{SynthSummary, WrittenFile, eval_file, read_eval, write_world};
pub use rules::{RuleScore, reward, score};
pub use task::{EvalExample, Task};
pub use world::{Attribute, Person, World};

use serde::{Deserialize, Serialize};

/// How much of each dataset to write. [`Default`] is sized for a lifecycle of about ten minutes
/// on two CPU cores; [`SynthOptions::quick`] is about five times smaller, for tests and smoke runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynthOptions {
    pub seed: u64,
    /// Documents in `corpus/pretrain.jsonl`.
    pub corpus_docs: usize,
    /// Conversations in `sft/train.jsonl`.
    pub sft_examples: usize,
    /// Pairs in `preference/train.jsonl`; `rl/prompts.jsonl` gets half as many prompts.
    pub preference_pairs: usize,
    /// Rows in each `eval/<task>.jsonl` and in `preference/test.jsonl`; at most
    /// [`MAX_EVAL_EXAMPLES`].
    pub eval_examples: usize,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            corpus_docs: 6000,
            sft_examples: 2000,
            preference_pairs: 1000,
            eval_examples: 100,
        }
    }
}

impl SynthOptions {
    /// The default size, or [`SynthOptions::quick`] when `quick`, with `seed`.
    pub fn sized(quick: bool, seed: u64) -> Self {
        let base = if quick {
            Self::quick()
        } else {
            Self::default()
        };
        Self { seed, ..base }
    }

    /// About five times smaller than the default.
    pub fn quick() -> Self {
        Self {
            seed: 0,
            corpus_docs: 1200,
            sft_examples: 400,
            preference_pairs: 200,
            eval_examples: 20,
        }
    }

    /// The number of prompts in `rl/prompts.jsonl`.
    pub fn rl_prompts(&self) -> usize {
        self.preference_pairs / 2
    }

    /// Checks the options against what the world can supply.
    pub fn validate(&self) -> Result<(), DataError> {
        if self.eval_examples > MAX_EVAL_EXAMPLES {
            return Err(DataError::InvalidOptions {
                field: "eval_examples",
                message: format!(
                    "{} exceeds the {MAX_EVAL_EXAMPLES} held-out fact questions the world has",
                    self.eval_examples
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_is_about_five_times_smaller_than_default() {
        let (d, q) = (SynthOptions::default(), SynthOptions::quick());
        for (big, small) in [
            (d.corpus_docs, q.corpus_docs),
            (d.sft_examples, q.sft_examples),
            (d.preference_pairs, q.preference_pairs),
            (d.eval_examples, q.eval_examples),
        ] {
            assert_eq!(big, small * 5);
        }
        assert!(d.validate().is_ok() && q.validate().is_ok());
    }

    #[test]
    fn too_many_eval_examples_is_rejected_with_the_field_and_limit() {
        let opts = SynthOptions {
            eval_examples: MAX_EVAL_EXAMPLES + 1,
            ..SynthOptions::quick()
        };
        let err = generate(&opts).unwrap_err().to_string();
        assert!(
            err.contains("eval_examples") && err.contains("120"),
            "{err}"
        );
    }
}
