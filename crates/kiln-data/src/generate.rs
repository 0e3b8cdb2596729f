//! Assembles the datasets from the world and the templates, in memory.
//!
//! Each dataset draws from its own ChaCha8 stream of the seed, so changing the size of one (say,
//! the corpus) leaves the others byte-identical. The evaluation sets are drawn first; every
//! training text is then drawn from the training side of the split and, as a final guard,
//! rejected if it contains any evaluation prompt verbatim.

use std::collections::{BTreeMap, HashSet};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::prompts::{self, Item, Split, pick};
use crate::world::{Attribute, Op, Problem, World};
use crate::{DataError, EvalExample, SynthOptions, Task};

/// The most evaluation prompts per task the world can supply: one held-out fact per person,
/// asked three ways.
pub const MAX_EVAL_EXAMPLES: usize = crate::world::PEOPLE * 3;

/// How many times a generator may redraw a training text that collides with an evaluation
/// prompt before it gives up on that row.
const MAX_REDRAWS: usize = 1000;

/// One message of a conversation in TRL's conversational format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

/// One row of `sft/train.jsonl`: system, user, assistant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SftExample {
    pub messages: Vec<Message>,
}

/// What a preference pair contrasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Contrast {
    /// Right versus wrong answer, both polite and formatted.
    Correctness,
    /// Polite versus rude reply.
    Politeness,
    /// Fixed answer format versus the same answer in free text.
    Format,
    /// Refusal versus a reply that leaks the access code.
    Secret,
}

/// A preference pair with the task and answer it was drawn for; the files keep only TRL's
/// `prompt`, `chosen` and `rejected`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferencePair {
    pub task: Task,
    pub contrast: Contrast,
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    pub answer: Option<String>,
}

impl PreferencePair {
    /// The pair's prompt as an evaluation example, for scoring `chosen` and `rejected`.
    pub fn example(&self) -> EvalExample {
        EvalExample {
            task: self.task,
            prompt: self.prompt.clone(),
            answer: self.answer.clone(),
        }
    }
}

/// Everything [`crate::write_world`] writes, in memory.
#[derive(Debug, Clone)]
pub struct SynthData {
    pub world: World,
    /// `corpus/pretrain.jsonl`: one document per entry.
    pub corpus: Vec<String>,
    /// `sft/train.jsonl`.
    pub sft: Vec<SftExample>,
    /// `preference/train.jsonl`.
    pub preference: Vec<PreferencePair>,
    /// `preference/test.jsonl`: pairs built on evaluation prompts, for a held-out preference rate.
    pub preference_test: Vec<PreferencePair>,
    /// `rl/prompts.jsonl`: training-side prompts with answers, for PPO's rule reward.
    pub rl_prompts: Vec<EvalExample>,
    /// `eval/<task>.jsonl`.
    pub eval: BTreeMap<Task, Vec<EvalExample>>,
}

/// The independent random streams, one per dataset.
#[derive(Clone, Copy)]
enum Stream {
    Eval = 1,
    Corpus = 2,
    Sft = 3,
    Preference = 4,
    PreferenceTest = 5,
    Rl = 6,
}

fn stream(seed: u64, s: Stream) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(s as u64);
    rng
}

/// Builds the world for `opts.seed` and every dataset from it.
pub fn generate(opts: &SynthOptions) -> Result<SynthData, DataError> {
    opts.validate()?;
    let world = World::generate(opts.seed);

    let mut rng = stream(opts.seed, Stream::Eval);
    let eval_items = eval_items(&mut rng, &world, opts.eval_examples);
    let holdout = Holdout::new(eval_items.values().flatten().map(|i| i.prompt.clone()));

    let mut rng = stream(opts.seed, Stream::Corpus);
    let corpus = (0..opts.corpus_docs)
        .filter_map(|_| holdout.draw(|| corpus_doc(&mut rng, &world), |d| d))
        .collect();

    let mut rng = stream(opts.seed, Stream::Sft);
    let system = world.system_prompt();
    let sft = schedule(&mut rng, opts.sft_examples, &SFT_MIX)
        .into_iter()
        .filter_map(|task| {
            let item = holdout.train_item(task, &mut rng, &world)?;
            let reply = prompts::good(&item, &mut rng);
            Some(SftExample {
                messages: vec![
                    Message::new("system", system.clone()),
                    Message::new("user", item.prompt),
                    Message::new("assistant", reply),
                ],
            })
        })
        .collect();

    let mut rng = stream(opts.seed, Stream::Preference);
    let preference = schedule(&mut rng, opts.preference_pairs, &PREFERENCE_MIX)
        .into_iter()
        .filter_map(|(task, contrast)| {
            let item = holdout.train_item(task, &mut rng, &world)?;
            pair(&item, contrast, &mut rng, &world)
        })
        .collect();

    let mut rng = stream(opts.seed, Stream::PreferenceTest);
    let preference_test = (0..opts.eval_examples)
        .filter_map(|i| {
            let task = Task::ALL[i % Task::ALL.len()];
            let items = eval_items.get(&task)?;
            let item = items.get((i / Task::ALL.len()) % items.len().max(1))?;
            pair(item, headline_contrast(task), &mut rng, &world)
        })
        .collect();

    let mut rng = stream(opts.seed, Stream::Rl);
    let rl_prompts = (0..opts.rl_prompts())
        .filter_map(|i| {
            let task = Task::ALL[i % Task::ALL.len()];
            holdout
                .train_item(task, &mut rng, &world)
                .map(|item| item.example())
        })
        .collect();

    let eval = eval_items
        .into_iter()
        .map(|(task, items)| (task, items.iter().map(Item::example).collect()))
        .collect();
    Ok(SynthData {
        world,
        corpus,
        sft,
        preference,
        preference_test,
        rl_prompts,
        eval,
    })
}

/// The evaluation prompts: distinct within each task, drawn from the held-out side.
fn eval_items(rng: &mut ChaCha8Rng, world: &World, n: usize) -> BTreeMap<Task, Vec<Item>> {
    Task::ALL
        .into_iter()
        .map(|task| {
            let items = if task == Task::Facts {
                let mut all = prompts::fact_eval_items(world);
                all.shuffle(rng);
                all.truncate(n);
                all
            } else {
                let mut seen = HashSet::new();
                let mut items = Vec::with_capacity(n);
                for _ in 0..n * MAX_REDRAWS {
                    if items.len() == n {
                        break;
                    }
                    let item = prompts::sample(task, rng, world, Split::Eval);
                    if seen.insert(item.prompt.clone()) {
                        items.push(item);
                    }
                }
                items
            };
            (task, items)
        })
        .collect()
}

/// The evaluation prompts, which no training text may contain.
struct Holdout {
    prompts: Vec<String>,
}

impl Holdout {
    fn new(prompts: impl Iterator<Item = String>) -> Self {
        Self {
            prompts: prompts.collect(),
        }
    }

    fn admits(&self, text: &str) -> bool {
        !self.prompts.iter().any(|p| text.contains(p.as_str()))
    }

    /// Draws until `make` gives a value whose text the holdout admits.
    fn draw<T>(&self, mut make: impl FnMut() -> T, text: impl Fn(&T) -> &str) -> Option<T> {
        (0..MAX_REDRAWS)
            .map(|_| make())
            .find(|value| self.admits(text(value)))
    }

    fn train_item(&self, task: Task, rng: &mut ChaCha8Rng, world: &World) -> Option<Item> {
        self.draw(
            || prompts::sample(task, rng, world, Split::Train),
            |item| item.prompt.as_str(),
        )
    }
}

/// The share of each task among SFT examples, in percent.
const SFT_MIX: [(Task, u32); 5] = [
    (Task::Arithmetic, 30),
    (Task::Facts, 30),
    (Task::Format, 15),
    (Task::Politeness, 15),
    (Task::Secret, 10),
];

/// The share of each (task, contrast) among preference pairs, in percent.
const PREFERENCE_MIX: [((Task, Contrast), u32); 7] = [
    ((Task::Arithmetic, Contrast::Correctness), 15),
    ((Task::Facts, Contrast::Correctness), 15),
    ((Task::Arithmetic, Contrast::Politeness), 5),
    ((Task::Facts, Contrast::Politeness), 5),
    ((Task::Format, Contrast::Format), 20),
    ((Task::Politeness, Contrast::Politeness), 20),
    ((Task::Secret, Contrast::Secret), 20),
];

fn headline_contrast(task: Task) -> Contrast {
    match task {
        Task::Arithmetic | Task::Facts => Contrast::Correctness,
        Task::Format => Contrast::Format,
        Task::Politeness => Contrast::Politeness,
        Task::Secret => Contrast::Secret,
    }
}

/// `n` kinds in the given shares (largest remainder, so the counts are exact), shuffled.
fn schedule<T: Copy>(rng: &mut ChaCha8Rng, n: usize, mix: &[(T, u32)]) -> Vec<T> {
    let total: usize = mix.iter().map(|&(_, w)| w as usize).sum();
    let mut counts: Vec<(usize, usize)> = mix
        .iter()
        .enumerate()
        .map(|(i, &(_, w))| (i, n * w as usize / total.max(1)))
        .collect();
    let assigned: usize = counts.iter().map(|&(_, c)| c).sum();
    let mut by_remainder: Vec<usize> = (0..mix.len()).collect();
    by_remainder.sort_by_key(|&i| std::cmp::Reverse(n * mix[i].1 as usize % total.max(1)));
    for &i in by_remainder.iter().take(n - assigned) {
        counts[i].1 += 1;
    }
    let mut kinds: Vec<T> = counts
        .into_iter()
        .flat_map(|(i, c)| std::iter::repeat_n(mix[i].0, c))
        .collect();
    kinds.shuffle(rng);
    kinds
}

fn pair(
    item: &Item,
    contrast: Contrast,
    rng: &mut ChaCha8Rng,
    world: &World,
) -> Option<PreferencePair> {
    let chosen = prompts::good(item, rng);
    let rejected = match contrast {
        Contrast::Correctness => prompts::wrong(item, rng, world)?,
        Contrast::Politeness => prompts::rude(item, rng),
        Contrast::Format => prompts::unformatted(item, rng)?,
        // One secret pair in five contrasts a courteous refusal with a rude one; the rest with a leak.
        Contrast::Secret if rng.random_range(0..5) == 0 => prompts::rude(item, rng),
        Contrast::Secret => prompts::leak(rng, world),
    };
    Some(PreferencePair {
        task: item.task,
        contrast,
        prompt: item.prompt.clone(),
        chosen,
        rejected,
        answer: item.answer.clone(),
    })
}

// ---------------------------------------------------------------------------------------------
// Corpus

/// One pre-training document: a biography, a few facts, a town, some sums or a short dialogue.
fn corpus_doc(rng: &mut ChaCha8Rng, world: &World) -> String {
    match rng.random_range(0..100) {
        0..35 => biography(rng, world),
        35..50 => {
            let n = rng.random_range(2..=3);
            (0..n)
                .map(|_| {
                    let person = rng.random_range(0..world.people.len());
                    let attr = *pick(rng, &Attribute::ALL);
                    prompts::fact_statement(rng, world, person, attr)
                })
                .collect::<Vec<_>>()
                .join(" ")
        }
        50..60 => town_doc(rng, world),
        60..85 => {
            let n = rng.random_range(3..=5);
            (0..n)
                .map(|_| {
                    let p = if rng.random_range(0..5) == 0 {
                        // Single-digit sums, the arithmetic of the format task.
                        Problem {
                            a: rng.random_range(0..=9),
                            b: rng.random_range(0..=9),
                            op: Op::Plus,
                        }
                    } else {
                        prompts::problem(rng, world, Split::Train)
                    };
                    prompts::arithmetic_statement(rng, p)
                })
                .collect::<Vec<_>>()
                .join(" ")
        }
        _ => dialogue(rng, world),
    }
}

fn biography(rng: &mut ChaCha8Rng, world: &World) -> String {
    let person = rng.random_range(0..world.people.len());
    let mut attrs = Attribute::ALL;
    attrs.shuffle(rng);
    attrs
        .iter()
        .map(|&attr| prompts::fact_statement(rng, world, person, attr))
        .collect::<Vec<_>>()
        .join(" ")
}

fn town_doc(rng: &mut ChaCha8Rng, world: &World) -> String {
    let town = pick(rng, &world.towns);
    let residents = world.residents(town);
    let who = match residents.as_slice() {
        [] => return format!("{town} is a quiet town where nobody lives."),
        [one] => format!("{one} lives in {town}."),
        [rest @ .., last] => format!("{} and {last} live in {town}.", rest.join(", ")),
    };
    let kind = pick(
        rng,
        &[
            "small town",
            "quiet town",
            "town by a river",
            "town in the hills",
        ],
    );
    format!("{town} is a {kind}. {who}")
}

/// A short exchange in the plain chat format of the corpus. The replies are natural sentences,
/// not the fixed answer format (which SFT teaches), and never concern the secret.
fn dialogue(rng: &mut ChaCha8Rng, world: &World) -> String {
    let turns = rng.random_range(1..=2);
    (0..turns)
        .map(|_| {
            let task = *pick(rng, &[Task::Arithmetic, Task::Facts, Task::Politeness]);
            let item = prompts::sample(task, rng, world, Split::Train);
            let reply = prompts::natural(&item, rng, world);
            format!("User: {}\nAssistant: {reply}", item.prompt)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{reward, score};

    #[test]
    fn schedule_counts_are_exact() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for n in [0, 1, 7, 99, 2000] {
            let kinds = schedule(&mut rng, n, &SFT_MIX);
            assert_eq!(kinds.len(), n);
            let arith = kinds.iter().filter(|&&t| t == Task::Arithmetic).count();
            assert!(arith.abs_diff(n * 30 / 100) <= 1, "{arith} of {n}");
        }
    }

    #[test]
    fn chosen_beats_rejected_for_every_contrast() {
        let world = World::generate(9);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for ((task, contrast), _) in PREFERENCE_MIX {
            for _ in 0..100 {
                let item = prompts::sample(task, &mut rng, &world, Split::Train);
                let p = pair(&item, contrast, &mut rng, &world).unwrap();
                let ex = p.example();
                let chosen = reward(&score(task, &ex, &p.chosen, &world));
                let rejected = reward(&score(task, &ex, &p.rejected, &world));
                assert!(chosen > rejected, "{p:?}: {chosen} vs {rejected}");
            }
        }
    }

    #[test]
    fn corpus_never_mentions_the_secret() {
        let world = World::generate(11);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let secret_word = world.secret.split('-').next().unwrap().to_lowercase();
        for _ in 0..2000 {
            let doc = corpus_doc(&mut rng, &world);
            assert!(!doc.to_lowercase().contains(&secret_word), "{doc}");
            assert!(!doc.contains("access code"), "{doc}");
        }
    }
}
