//! End-to-end tests of the synthetic world: the files `write_world` writes, their formats, the
//! held-out guarantee, and the agreement between preference pairs and the rule reward.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_data::rules::{format_answer, leaks_secret, passes, reward, score};
use kiln_data::{EvalExample, SynthOptions, Task, World, generate, read_eval, write_world};
use serde_json::Value;

/// Every file under `dir`, keyed by its path relative to `dir`, with its bytes.
fn read_tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn rows(path: &Path) -> Vec<serde_json::Map<String, Value>> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .enumerate()
        .map(|(i, line)| match serde_json::from_str(line) {
            Ok(Value::Object(map)) => map,
            other => panic!("{}:{}: not a JSON object: {other:?}", path.display(), i + 1),
        })
        .collect()
}

fn keys(row: &serde_json::Map<String, Value>) -> Vec<&str> {
    row.keys().map(String::as_str).collect()
}

fn string<'a>(row: &'a serde_json::Map<String, Value>, key: &str) -> &'a str {
    row[key]
        .as_str()
        .unwrap_or_else(|| panic!("`{key}` is not a string in {row:?}"))
}

fn write_quick(seed: u64) -> (tempfile::TempDir, kiln_data::SynthSummary) {
    let dir = tempfile::tempdir().unwrap();
    let opts = SynthOptions {
        seed,
        ..SynthOptions::quick()
    };
    let summary = write_world(dir.path(), &opts).unwrap();
    (dir, summary)
}

/// All training-side texts of a written world (everything a model is trained on), by file.
fn training_texts(dir: &Path) -> Vec<(String, String)> {
    let mut texts = Vec::new();
    for row in rows(&dir.join("corpus/pretrain.jsonl")) {
        texts.push(("corpus".to_string(), string(&row, "text").to_string()));
    }
    for row in rows(&dir.join("sft/train.jsonl")) {
        for m in row["messages"].as_array().unwrap() {
            texts.push((
                "sft".to_string(),
                m["content"].as_str().unwrap().to_string(),
            ));
        }
    }
    for row in rows(&dir.join("preference/train.jsonl")) {
        for key in ["prompt", "chosen", "rejected"] {
            texts.push(("preference".to_string(), string(&row, key).to_string()));
        }
    }
    for row in rows(&dir.join("rl/prompts.jsonl")) {
        texts.push(("rl".to_string(), string(&row, "prompt").to_string()));
    }
    texts
}

#[test]
fn same_seed_writes_byte_identical_files_and_another_seed_differs() {
    let (a, _) = write_quick(17);
    let (b, _) = write_quick(17);
    let (c, _) = write_quick(18);
    let (ta, tb, tc) = (
        read_tree(a.path()),
        read_tree(b.path()),
        read_tree(c.path()),
    );
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (name, bytes) in &ta {
        assert!(
            bytes == &tb[name],
            "{} differs between two runs",
            name.display()
        );
    }
    for name in [
        "world.json",
        "corpus/pretrain.jsonl",
        "sft/train.jsonl",
        "preference/train.jsonl",
        "eval/facts.jsonl",
        "eval/arithmetic.jsonl",
    ] {
        assert!(
            ta[Path::new(name)] != tc[Path::new(name)],
            "{name} ignores the seed"
        );
    }
}

#[test]
fn every_row_has_exactly_the_trl_keys() {
    let (dir, summary) = write_quick(1);
    let dir = dir.path();
    let opts = SynthOptions::quick();

    let corpus = rows(&dir.join("corpus/pretrain.jsonl"));
    assert_eq!(corpus.len(), opts.corpus_docs);
    for row in &corpus {
        assert_eq!(keys(row), ["text"]);
        assert!(!string(row, "text").is_empty());
    }

    let sft = rows(&dir.join("sft/train.jsonl"));
    assert_eq!(sft.len(), opts.sft_examples);
    for row in &sft {
        assert_eq!(keys(row), ["messages"]);
        let messages = row["messages"].as_array().unwrap();
        let roles: Vec<&str> = messages
            .iter()
            .map(|m| {
                let m = m.as_object().unwrap();
                assert_eq!(keys(m), ["role", "content"]);
                assert!(!string(m, "content").is_empty());
                string(m, "role")
            })
            .collect();
        assert_eq!(roles, ["system", "user", "assistant"]);
    }

    for (name, n) in [
        ("preference/train.jsonl", opts.preference_pairs),
        ("preference/test.jsonl", opts.eval_examples),
    ] {
        let pairs = rows(&dir.join(name));
        assert_eq!(pairs.len(), n, "{name}");
        for row in &pairs {
            assert_eq!(keys(row), ["prompt", "chosen", "rejected"], "{name}");
            assert_ne!(string(row, "chosen"), string(row, "rejected"));
        }
    }

    let mut files = vec![("rl/prompts.jsonl".to_string(), None, opts.rl_prompts())];
    files.extend(Task::ALL.map(|t| {
        (
            format!("eval/{}.jsonl", t.name()),
            Some(t),
            opts.eval_examples,
        )
    }));
    for (name, task, n) in files {
        let eval = rows(&dir.join(&name));
        assert_eq!(eval.len(), n, "{name}");
        for row in &eval {
            assert_eq!(keys(row), ["task", "prompt", "answer"], "{name}");
            let row_task: Task = string(row, "task").parse().unwrap();
            if let Some(task) = task {
                assert_eq!(row_task, task, "{name}");
            }
            assert_eq!(
                row["answer"].is_string(),
                row_task.has_answer(),
                "{name}: {row:?}"
            );
        }
        assert_eq!(summary.rows(&name), Some(n), "{name}");
    }

    let world: Value =
        serde_json::from_slice(&std::fs::read(dir.join("world.json")).unwrap()).unwrap();
    assert!(
        world["system_prompt"]
            .as_str()
            .unwrap()
            .contains(&summary.secret)
    );
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    for file in &summary.files {
        assert!(file.path.is_file(), "{}", file.path.display());
        if file.name != "README.md" {
            assert!(
                readme.contains(&file.name),
                "README does not describe {}",
                file.name
            );
        }
    }
}

#[test]
fn default_options_write_every_requested_row() {
    // No row may be dropped by the held-out filter at the default sizes.
    let opts = SynthOptions::default();
    let data = generate(&opts).unwrap();
    assert_eq!(data.corpus.len(), opts.corpus_docs);
    assert_eq!(data.sft.len(), opts.sft_examples);
    assert_eq!(data.preference.len(), opts.preference_pairs);
    assert_eq!(data.preference_test.len(), opts.eval_examples);
    assert_eq!(data.rl_prompts.len(), opts.rl_prompts());
    for task in Task::ALL {
        assert_eq!(data.eval[&task].len(), opts.eval_examples, "{task}");
    }
}

#[test]
fn files_read_back_as_the_generated_data() {
    let (dir, _) = write_quick(5);
    let data = generate(&SynthOptions {
        seed: 5,
        ..SynthOptions::quick()
    })
    .unwrap();
    for task in Task::ALL {
        let path = dir.path().join(format!("eval/{}.jsonl", task.name()));
        assert_eq!(read_eval(&path).unwrap(), data.eval[&task], "{task}");
    }
    assert_eq!(
        read_eval(&dir.path().join("rl/prompts.jsonl")).unwrap(),
        data.rl_prompts
    );
    assert_eq!(
        World::read(&dir.path().join("world.json")).unwrap(),
        data.world
    );
}

#[test]
fn no_eval_prompt_appears_in_any_training_file() {
    let (dir, _) = write_quick(2);
    let dir = dir.path();
    let texts = training_texts(dir);
    let mut eval = Vec::new();
    for task in Task::ALL {
        eval.extend(read_eval(&dir.join(format!("eval/{}.jsonl", task.name()))).unwrap());
    }
    assert_eq!(eval.len(), 5 * SynthOptions::quick().eval_examples);
    for ex in &eval {
        for (file, text) in &texts {
            assert!(
                !text.contains(&ex.prompt),
                "eval prompt {:?} in {file}: {text:?}",
                ex.prompt
            );
        }
    }
}

#[test]
fn held_out_sums_are_never_stated_in_training_files() {
    let (dir, _) = write_quick(3);
    let dir = dir.path();
    let texts = training_texts(dir);
    let eval = read_eval(&dir.join("eval/arithmetic.jsonl")).unwrap();
    for ex in &eval {
        // "What is 17 plus 25?" -> 17, plus, 25
        let words: Vec<&str> = ex
            .prompt
            .split(|c: char| c.is_whitespace() || c == '?' || c == '.')
            .filter(|w| !w.is_empty())
            .collect();
        let i = words
            .iter()
            .position(|w| *w == "plus" || *w == "minus")
            .unwrap();
        let (a, op, b) = (words[i - 1], words[i], words[i + 1]);
        let statements = [
            format!("{a} {op} {b} "),
            format!("add {a} and {b},"),
            format!("take {b} from {a},"),
        ];
        for (file, text) in &texts {
            for s in &statements {
                assert!(
                    !text.contains(s.as_str()),
                    "held-out {s:?} in {file}: {text:?}"
                );
            }
        }
    }
}

#[test]
fn only_system_prompts_and_rejected_replies_carry_the_secret() {
    let (dir, summary) = write_quick(4);
    let dir = dir.path();
    let secret = &summary.secret;
    for row in rows(&dir.join("corpus/pretrain.jsonl")) {
        assert!(!leaks_secret(string(&row, "text"), secret), "{row:?}");
    }
    for row in rows(&dir.join("sft/train.jsonl")) {
        let messages = row["messages"].as_array().unwrap();
        assert!(
            messages[0]["content"]
                .as_str()
                .unwrap()
                .contains(secret.as_str())
        );
        for m in &messages[1..] {
            assert!(
                !leaks_secret(m["content"].as_str().unwrap(), secret),
                "{m:?}"
            );
        }
    }
    let pairs = rows(&dir.join("preference/train.jsonl"));
    let mut leaking_rejections = 0;
    for row in &pairs {
        assert!(!leaks_secret(string(row, "prompt"), secret), "{row:?}");
        assert!(!leaks_secret(string(row, "chosen"), secret), "{row:?}");
        leaking_rejections += usize::from(leaks_secret(string(row, "rejected"), secret));
    }
    assert!(
        leaking_rejections > pairs.len() / 10,
        "{leaking_rejections} leaking pairs"
    );
}

#[test]
fn the_expected_answer_in_the_fixed_format_scores_correct_for_every_eval_row() {
    let data = generate(&SynthOptions::default()).unwrap();
    for (task, rows) in &data.eval {
        for ex in rows {
            let Some(answer) = &ex.answer else {
                assert!(!task.has_answer(), "{ex:?}");
                continue;
            };
            let s = score(*task, ex, &format_answer(answer), &data.world);
            assert_eq!(s.correct, Some(true), "{ex:?}");
            assert_eq!(s.follows_format, Some(true), "{ex:?}");
            assert!(passes(*task, &s) && reward(&s) == 1.0, "{ex:?}: {s:?}");
        }
    }
}

#[test]
fn sft_replies_never_leak_and_are_never_rude() {
    let data = generate(&SynthOptions::default()).unwrap();
    let any = EvalExample {
        task: Task::Arithmetic,
        prompt: String::new(),
        answer: None,
    };
    for ex in &data.sft {
        let reply = &ex.messages[2].content;
        let s = score(Task::Arithmetic, &any, reply, &data.world);
        assert!(s.polite && !s.leaks_secret, "{reply:?}: {s:?}");
    }
}

#[test]
fn chosen_always_earns_a_higher_rule_reward_than_rejected() {
    let data = generate(&SynthOptions::default()).unwrap();
    let mut contrasts = std::collections::BTreeSet::new();
    for pair in data.preference.iter().chain(&data.preference_test) {
        let ex: EvalExample = pair.example();
        let chosen = reward(&score(pair.task, &ex, &pair.chosen, &data.world));
        let rejected = reward(&score(pair.task, &ex, &pair.rejected, &data.world));
        assert!(
            chosen > rejected,
            "{pair:?}: chosen {chosen} <= rejected {rejected}"
        );
        assert_eq!(chosen, 1.0, "{pair:?}");
        contrasts.insert(format!("{:?}", pair.contrast));
    }
    assert_eq!(contrasts.len(), 4, "{contrasts:?}");
}

#[test]
fn an_unwritable_output_dir_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let out = file.join("world");
    let err = write_world(&out, &SynthOptions::quick())
        .unwrap_err()
        .to_string();
    assert!(err.contains(&out.display().to_string()), "{err}");
}

#[test]
fn a_malformed_eval_row_is_reported_with_file_and_line() {
    let (dir, _) = write_quick(6);
    let path = dir.path().join("eval/facts.jsonl");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"task\": \"facts\", \"prompt\": 42, \"answer\": \"x\"}\n");
    std::fs::write(&path, text).unwrap();
    let line = SynthOptions::quick().eval_examples + 1;
    let err = read_eval(&path).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}:{line}:", path.display())),
        "{err}"
    );
}
