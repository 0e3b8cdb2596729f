//! SFT data: every TRL format read from JSON lines and Parquet, with token-level checks of which
//! tokens carry loss, on the fixture tokenizer (byte-level BPE, ChatML template, BOS added by the
//! post-processor, EOS `<|im_end|>`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_core::Tokenizer;
use kiln_train::sft_data::{
    SftDataOptions, SftDataset, SftExample, SftFormat, load_sft_dataset, make_batch, pack, preview,
};
use parquet::basic::{Compression, ZstdLevel};
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use serde_json::{Value, json};

const FIXTURE: &str = "../../testdata/hf/llama";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE)
}

fn tok() -> Tokenizer {
    Tokenizer::from_dir(&fixture_dir()).unwrap()
}

fn write_jsonl(dir: &Path, name: &str, rows: &[Value]) -> PathBuf {
    let path = dir.join(name);
    let text: Vec<String> = rows.iter().map(Value::to_string).collect();
    std::fs::write(&path, text.join("\n") + "\n").unwrap();
    path
}

fn load(path: &Path, opts: &SftDataOptions) -> SftDataset {
    load_sft_dataset(path, &tok(), opts).unwrap()
}

fn load_rows(rows: &[Value], opts: &SftDataOptions) -> SftDataset {
    let dir = tempfile::tempdir().unwrap();
    load(&write_jsonl(dir.path(), "data.jsonl", rows), opts)
}

fn load_err(dir: &Path, name: &str, lines: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, lines).unwrap();
    load_sft_dataset(&path, &tok(), &SftDataOptions::default())
        .unwrap_err()
        .to_string()
}

/// The decoded runs of consecutive trained tokens.
fn trained_spans(e: &SftExample, tok: &Tokenizer) -> Vec<String> {
    let mut spans = Vec::new();
    let mut run = Vec::new();
    for (&id, &m) in e.input_ids.iter().zip(&e.loss_mask) {
        if m {
            run.push(id);
        } else if !run.is_empty() {
            spans.push(tok.decode(&run, false).unwrap());
            run.clear();
        }
    }
    if !run.is_empty() {
        spans.push(tok.decode(&run, false).unwrap());
    }
    spans
}

fn untrained_text(e: &SftExample, tok: &Tokenizer) -> String {
    let ids: Vec<u32> = e
        .input_ids
        .iter()
        .zip(&e.loss_mask)
        .filter(|(_, m)| !**m)
        .map(|(id, _)| *id)
        .collect();
    tok.decode(&ids, false).unwrap()
}

fn chat() -> Value {
    json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}
    ])
}

#[test]
fn text_trains_every_token_but_the_first_and_ends_with_eos() {
    let tok = tok();
    let ds = load_rows(
        &[
            json!({"text": "The quick brown fox.", "source": "ignored"}),
            json!({"text": "Already ends<|im_end|>"}),
        ],
        &SftDataOptions::default(),
    );
    assert_eq!(ds.format, SftFormat::Language);
    assert_eq!((ds.rows, ds.examples.len(), ds.dropped), (2, 2, 0));
    let eos = tok.eos_token_id().unwrap();
    let e = &ds.examples[0];
    assert_eq!(e.input_ids[0], tok.token_id("<|begin_of_text|>").unwrap());
    assert_eq!(*e.input_ids.last().unwrap(), eos);
    assert!(!e.loss_mask[0]);
    assert!(e.loss_mask[1..].iter().all(|&m| m));
    assert_eq!(trained_spans(e, &tok), ["The quick brown fox.<|im_end|>"]);
    // EOS is not doubled when the text already ends with it.
    let e = &ds.examples[1];
    assert_eq!(e.input_ids.iter().filter(|&&id| id == eos).count(), 1);
    assert_eq!(trained_spans(e, &tok), ["Already ends<|im_end|>"]);
}

#[test]
fn prompt_completion_trains_the_completion_and_eos_only() {
    let tok = tok();
    let row = json!({"prompt": "What is 2+2?", "completion": " 4, of course."});
    let ds = load_rows(std::slice::from_ref(&row), &SftDataOptions::default());
    assert_eq!(
        ds.format,
        SftFormat::PromptCompletion {
            conversational: false
        }
    );
    assert_eq!(ds.prompt_mismatches, 0);
    let e = &ds.examples[0];
    assert_eq!(trained_spans(e, &tok), [" 4, of course.<|im_end|>"]);
    assert_eq!(untrained_text(e, &tok), "<|begin_of_text|>What is 2+2?");
    // The prompt tokens are exactly tokenizer(prompt), untrained.
    let prompt_ids = tok.encode("What is 2+2?", true).unwrap();
    assert_eq!(&e.input_ids[..prompt_ids.len()], &prompt_ids[..]);
    assert!(e.loss_mask[..prompt_ids.len()].iter().all(|&m| !m));
    assert_eq!(
        preview(e, &tok).unwrap(),
        "<|begin_of_text|>What is 2+2?[[ 4, of course.<|im_end|>]]"
    );

    let all = SftDataOptions {
        completion_only_loss: false,
        ..SftDataOptions::default()
    };
    let e = &load_rows(&[row], &all).examples[0];
    assert_eq!(
        trained_spans(e, &tok),
        ["What is 2+2? 4, of course.<|im_end|>"]
    );
}

#[test]
fn conversation_trains_each_assistant_reply_and_its_end_of_turn_only() {
    let tok = tok();
    let ds = load_rows(
        &[json!({"messages": chat(), "id": 7})],
        &SftDataOptions::default(),
    );
    assert_eq!(ds.format, SftFormat::Conversational);
    let e = &ds.examples[0];
    assert_eq!(
        trained_spans(e, &tok),
        ["Hello. How can I help?<|im_end|>", "Paris.<|im_end|>"]
    );
    // The whole rendering, tokenized without special tokens (no BOS: the template has none).
    let rendered = tok.apply_chat_template(&chat(), false).unwrap();
    assert_eq!(tok.decode(&e.input_ids, false).unwrap(), rendered);
    assert_eq!(e.input_ids, tok.encode(&rendered, false).unwrap());
    // `<|im_end|>` after each reply is trained, the newline after it and every header are not.
    let im_end = tok.token_id("<|im_end|>").unwrap();
    let trained_ends: Vec<usize> = (0..e.len())
        .filter(|&i| e.input_ids[i] == im_end && e.loss_mask[i])
        .collect();
    assert_eq!(trained_ends.len(), 2);
    assert!(trained_ends.iter().all(|&i| !e.loss_mask[i + 1]));
    assert!(untrained_text(e, &tok).ends_with("<|im_start|>assistant\n\n"));

    let all = SftDataOptions {
        assistant_only_loss: false,
        ..SftDataOptions::default()
    };
    let e = &load_rows(&[json!({"messages": chat()})], &all).examples[0];
    assert!(!e.loss_mask[0] && e.loss_mask[1..].iter().all(|&m| m));
}

#[test]
fn sharegpt_conversations_read_as_messages() {
    let turns = json!([
        {"from": "system", "value": "You are terse."},
        {"from": "human", "value": "Hi!"},
        {"from": "gpt", "value": "Hello. How can I help?"},
        {"from": "human", "value": "Capital of France?"},
        {"from": "gpt", "value": "Paris."}
    ]);
    let sharegpt = load_rows(
        &[json!({"conversations": turns})],
        &SftDataOptions::default(),
    );
    let messages = load_rows(&[json!({"messages": chat()})], &SftDataOptions::default());
    assert_eq!(sharegpt.format, SftFormat::Conversational);
    assert_eq!(sharegpt.examples, messages.examples);
}

#[test]
fn conversational_prompt_completion_trains_the_completion_turn() {
    let tok = tok();
    let msgs = chat();
    let prompt = &msgs.as_array().unwrap()[..4];
    let completion = &msgs.as_array().unwrap()[4..];
    let row = json!({"prompt": prompt, "completion": completion});
    let ds = load_rows(std::slice::from_ref(&row), &SftDataOptions::default());
    assert_eq!(
        ds.format,
        SftFormat::PromptCompletion {
            conversational: true
        }
    );
    let e = &ds.examples[0];
    // The earlier assistant turn belongs to the prompt: not trained.
    assert_eq!(trained_spans(e, &tok), ["Paris.<|im_end|>"]);
    assert_eq!(
        tok.decode(&e.input_ids, false).unwrap(),
        tok.apply_chat_template(&msgs, false).unwrap()
    );

    // Without completion-only loss, every assistant turn trains.
    let opts = SftDataOptions {
        completion_only_loss: false,
        ..SftDataOptions::default()
    };
    let e = &load_rows(std::slice::from_ref(&row), &opts).examples[0];
    assert_eq!(
        trained_spans(e, &tok),
        ["Hello. How can I help?<|im_end|>", "Paris.<|im_end|>"]
    );
    // Without assistant-only loss, the whole completion trains, as TRL's completion mask does
    // (the newline after `<|im_end|>` included).
    let opts = SftDataOptions {
        assistant_only_loss: false,
        ..SftDataOptions::default()
    };
    let e = &load_rows(&[row], &opts).examples[0];
    assert_eq!(trained_spans(e, &tok), ["Paris.<|im_end|>\n"]);
}

#[test]
fn preference_trains_the_chosen_answer_only() {
    let tok = tok();
    let ds = load_rows(
        &[json!({"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " Rome."})],
        &SftDataOptions::default(),
    );
    assert_eq!(
        ds.format,
        SftFormat::Preference {
            conversational: false,
            implicit_prompt: false
        }
    );
    let e = &ds.examples[0];
    assert_eq!(trained_spans(e, &tok), [" Paris.<|im_end|>"]);
    assert!(!tok.decode(&e.input_ids, false).unwrap().contains("Rome"));

    // Conversational, explicit prompt.
    let ds = load_rows(
        &[json!({
            "prompt": [{"role": "user", "content": "Capital of France?"}],
            "chosen": [{"role": "assistant", "content": "Paris."}],
            "rejected": [{"role": "assistant", "content": "Rome."}]
        })],
        &SftDataOptions::default(),
    );
    assert!(ds.format.is_conversational());
    let e = &ds.examples[0];
    assert_eq!(trained_spans(e, &tok), ["Paris.<|im_end|>"]);
    assert!(!tok.decode(&e.input_ids, false).unwrap().contains("Rome"));

    // Implicit prompt: `chosen` is the whole text, or the whole conversation.
    let ds = load_rows(
        &[json!({"chosen": "Q: 2+2? A: 4.", "rejected": "Q: 2+2? A: 5."})],
        &SftDataOptions::default(),
    );
    assert_eq!(
        ds.format,
        SftFormat::Preference {
            conversational: false,
            implicit_prompt: true
        }
    );
    assert_eq!(
        trained_spans(&ds.examples[0], &tok),
        ["Q: 2+2? A: 4.<|im_end|>"]
    );
    let ds = load_rows(
        &[json!({"chosen": chat(), "rejected": chat()})],
        &SftDataOptions::default(),
    );
    assert_eq!(
        trained_spans(&ds.examples[0], &tok),
        ["Hello. How can I help?<|im_end|>", "Paris.<|im_end|>"]
    );
}

/// A template per model family (Llama 3 headers and `<|eot_id|>`, Mistral `[INST]` with the
/// reply followed by the EOS text, Qwen2 ChatML with a default system prompt): the assistant
/// spans are found from prefix renderings alone.
#[test]
fn assistant_spans_follow_any_template() {
    let cases = [
        ("llama3", "<|eot_id|>"),
        ("mistral", "<|im_end|>"),
        ("qwen2", "<|im_end|>"),
    ];
    let messages = json!([
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}
    ]);
    for (name, end) in cases {
        let model = tempfile::tempdir().unwrap();
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(fixture_dir().join(f), model.path().join(f)).unwrap();
        }
        let templates = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/chat_templates");
        std::fs::copy(
            templates.join(format!("{name}.jinja")),
            model.path().join("chat_template.jinja"),
        )
        .unwrap();
        let tok = Tokenizer::from_dir(model.path()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = write_jsonl(dir.path(), "d.jsonl", &[json!({"messages": messages})]);
        let ds = load_sft_dataset(&path, &tok, &SftDataOptions::default()).unwrap();
        let e = &ds.examples[0];
        assert_eq!(
            trained_spans(e, &tok),
            [
                format!("Hello. How can I help?{end}"),
                format!("Paris.{end}")
            ],
            "template {name}"
        );
        assert_eq!(
            tok.decode(&e.input_ids, false).unwrap(),
            tok.apply_chat_template(&messages, false).unwrap(),
            "template {name}"
        );
    }
}

#[test]
fn a_template_that_rewrites_earlier_turns_is_reported() {
    let model = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture_dir().join(f), model.path().join(f)).unwrap();
    }
    // Prints the number of messages first, so no prefix rendering is a prefix of the whole.
    std::fs::write(
        model.path().join("chat_template.jinja"),
        "{{ messages|length }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    .unwrap();
    let tok = Tokenizer::from_dir(model.path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write_jsonl(dir.path(), "d.jsonl", &[json!({"messages": chat()})]);
    let err = load_sft_dataset(&path, &tok, &SftDataOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("d.jsonl:1: cannot locate assistant message 2"),
        "{err}"
    );
    // Training on every token needs no spans.
    let all = SftDataOptions {
        assistant_only_loss: false,
        ..SftDataOptions::default()
    };
    assert_eq!(
        load_sft_dataset(&path, &tok, &all).unwrap().examples.len(),
        1
    );
}

#[test]
fn malformed_rows_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pc = |p: &str, c: &str| json!({"prompt": p, "completion": c}).to_string();
    let good = format!("{}\n\n", pc("a", "b")); // a row and a blank line

    let err = load_err(d, "bad.jsonl", &format!("{good}{{\"prompt\": \"x\",\n"));
    assert!(err.contains("bad.jsonl:3: invalid JSON:"), "{err}");

    let err = load_err(
        d,
        "type.jsonl",
        &format!("{good}{{\"prompt\": \"x\", \"completion\": 5}}\n"),
    );
    assert!(
        err.contains(
            "type.jsonl:3: expected `completion` to be a string (like `prompt`), found number"
        ),
        "{err}"
    );

    let err = load_err(
        d,
        "missing.jsonl",
        "{\"prompt\": \"x\", \"chosen\": \"y\"}\n",
    );
    assert!(err.contains("missing.jsonl:1: missing `rejected`"), "{err}");

    let err = load_err(d, "null.jsonl", "{\"text\": null, \"other\": 1}\n");
    assert!(
        err.contains("null.jsonl:1: no SFT columns: expected `text`"),
        "{err}"
    );
    assert!(err.contains("found `other`"), "{err}");

    let err = load_err(d, "empty.jsonl", &format!("{good}{}\n", pc("x", "")));
    assert!(
        err.contains("empty.jsonl:3: `completion` is empty"),
        "{err}"
    );

    let err = load_err(
        d,
        "mixed.jsonl",
        &format!("{good}{}\n", json!({"text": "plain"})),
    );
    assert!(
        err.contains("mixed.jsonl:3: row is language modeling (`text`), but the dataset is prompt-completion (`prompt`, `completion`) (from ")
            && err.contains("mixed.jsonl:1)"),
        "{err}"
    );

    // Standard prompt with a conversational completion.
    let err = load_err(
        d,
        "kinds.jsonl",
        &format!(
            "{}\n",
            json!({"prompt": [{"role": "user", "content": "q"}], "completion": "a"})
        ),
    );
    assert!(
        err.contains("kinds.jsonl:1: expected `completion` to be a list of messages (like `prompt`), found string"),
        "{err}"
    );

    let err = load_err(
        d,
        "role.jsonl",
        &format!("{}\n", json!({"messages": [{"content": "hi"}]})),
    );
    assert!(
        err.contains("role.jsonl:1: `messages[0]` has no `role`"),
        "{err}"
    );

    // The last row is checked too: the whole dataset is validated before anything returns.
    let mut many = good.repeat(50);
    many.push_str("[1, 2]\n");
    let err = load_err(d, "late.jsonl", &many);
    assert!(
        err.contains("late.jsonl:101: expected the row to be a JSON object, found list"),
        "{err}"
    );

    // Only a `.json` file may hold one array; in JSON lines `[` starts a (bad) row.
    let err = load_err(d, "array.jsonl", "[{\"text\": \"a\"}]\n");
    assert!(
        err.contains("array.jsonl:1: expected the row to be a JSON object, found list"),
        "{err}"
    );

    let err = load_err(d, "prompt_only.jsonl", "{\"prompt\": \"x\"}\n");
    assert!(
        err.contains("prompt_only.jsonl:1: missing `completion`"),
        "{err}"
    );
}

#[test]
fn a_directory_reads_its_data_files_in_name_order() {
    let tok = tok();
    let dir = tempfile::tempdir().unwrap();
    write_jsonl(dir.path(), "b.jsonl", &[json!({"text": "from b"})]);
    write_jsonl(
        dir.path(),
        "a.json",
        &[json!({"text": "from a, 1"}), json!({"text": "from a, 2"})],
    );
    std::fs::write(dir.path().join("notes.txt"), "not data").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    write_jsonl(
        &dir.path().join("sub"),
        "c.jsonl",
        &[json!({"text": "nested"})],
    );
    let ds = load(dir.path(), &SftDataOptions::default());
    let names: Vec<&str> = ds
        .files
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(names, ["a.json", "b.jsonl"]);
    let texts: Vec<String> = ds
        .examples
        .iter()
        .map(|e| tok.decode(&e.input_ids, true).unwrap())
        .collect();
    assert_eq!(texts, ["from a, 1", "from a, 2", "from b"]);

    let empty = tempfile::tempdir().unwrap();
    std::fs::write(empty.path().join("notes.txt"), "x").unwrap();
    let err = load_sft_dataset(empty.path(), &tok, &SftDataOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no .jsonl, .json or .parquet files"), "{err}");
}

#[test]
fn a_json_file_may_hold_one_array() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.json");
    let rows = json!([{"text": "one"}, {"text": "two"}, {"text": 3}]);
    std::fs::write(&path, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    let err = load_sft_dataset(&path, &tok(), &SftDataOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data.json: item 2: expected `text` to be a string, found number"),
        "{err}"
    );
}

/// A Parquet file of optional UTF-8 string columns; `None` is a null.
fn write_string_parquet(path: &Path, columns: &[(&str, Vec<Option<&str>>)]) {
    let fields: String = columns
        .iter()
        .map(|(name, _)| format!("OPTIONAL BYTE_ARRAY {name} (UTF8);"))
        .collect();
    let schema = Arc::new(parse_message_type(&format!("message schema {{ {fields} }}")).unwrap());
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let mut writer = SerializedFileWriter::new(File::create(path).unwrap(), schema, props).unwrap();
    let mut group = writer.next_row_group().unwrap();
    for (_, cells) in columns {
        let values: Vec<ByteArray> = cells.iter().flatten().map(|s| (*s).into()).collect();
        let defs: Vec<i16> = cells.iter().map(|c| i16::from(c.is_some())).collect();
        let mut column = group.next_column().unwrap().unwrap();
        column
            .typed::<ByteArrayType>()
            .write_batch(&values, Some(&defs), None)
            .unwrap();
        column.close().unwrap();
    }
    group.close().unwrap();
    writer.close().unwrap();
}

/// A Parquet file shaped as `datasets` writes a `messages` column (a list of structs, every
/// level optional), plus a string `source` column, zstd-compressed.
fn write_messages_parquet(path: &Path, rows: &[Value]) {
    let schema = "message schema {
        OPTIONAL group messages (LIST) {
            REPEATED group list {
                OPTIONAL group element {
                    OPTIONAL BYTE_ARRAY role (UTF8);
                    OPTIONAL BYTE_ARRAY content (UTF8);
                }
            }
        }
        REQUIRED BYTE_ARRAY source (UTF8);
    }";
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let mut writer = SerializedFileWriter::new(
        File::create(path).unwrap(),
        Arc::new(parse_message_type(schema).unwrap()),
        Arc::new(props),
    )
    .unwrap();
    let mut group = writer.next_row_group().unwrap();
    for field in ["role", "content"] {
        let (mut values, mut defs, mut reps) = (Vec::new(), Vec::new(), Vec::new());
        for row in rows {
            for (j, m) in row.as_array().unwrap().iter().enumerate() {
                values.push(ByteArray::from(m[field].as_str().unwrap()));
                defs.push(4); // messages, list, element and the field all present
                reps.push(i16::from(j > 0));
            }
        }
        let mut column = group.next_column().unwrap().unwrap();
        column
            .typed::<ByteArrayType>()
            .write_batch(&values, Some(&defs), Some(&reps))
            .unwrap();
        column.close().unwrap();
    }
    let sources: Vec<ByteArray> = rows.iter().map(|_| ByteArray::from("synthetic")).collect();
    let mut column = group.next_column().unwrap().unwrap();
    column
        .typed::<ByteArrayType>()
        .write_batch(&sources, None, None)
        .unwrap();
    column.close().unwrap();
    group.close().unwrap();
    writer.close().unwrap();
}

#[test]
fn parquet_reads_like_the_same_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let prompts = ["What is 2+2?", "Name a colour.", "Say hi."];
    let completions = [" 4.", " Blue.", " Hi!"];
    write_string_parquet(
        &d.join("pc.parquet"),
        &[
            ("prompt", prompts.iter().map(|s| Some(*s)).collect()),
            ("completion", completions.iter().map(|s| Some(*s)).collect()),
        ],
    );
    let jsonl: Vec<Value> = prompts
        .iter()
        .zip(completions)
        .map(|(p, c)| json!({"prompt": p, "completion": c}))
        .collect();
    let opts = SftDataOptions::default();
    let from_parquet = load(&d.join("pc.parquet"), &opts);
    let from_jsonl = load(&write_jsonl(d, "pc.jsonl", &jsonl), &opts);
    assert_eq!(from_parquet.rows, 3);
    assert_eq!(from_parquet.format, from_jsonl.format);
    assert_eq!(from_parquet.examples, from_jsonl.examples);

    let short = json!([
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."}
    ]);
    let conversations = [chat(), short];
    write_messages_parquet(&d.join("chat.parquet"), &conversations);
    let rows: Vec<Value> = conversations
        .iter()
        .map(|m| json!({"messages": m}))
        .collect();
    let from_parquet = load(&d.join("chat.parquet"), &opts);
    let from_jsonl = load(&write_jsonl(d, "chat.jsonl", &rows), &opts);
    assert_eq!(from_parquet.format, SftFormat::Conversational);
    assert_eq!(from_parquet.examples.len(), 2);
    assert_eq!(from_parquet.examples, from_jsonl.examples);
}

#[test]
fn parquet_errors_name_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.parquet");
    write_string_parquet(
        &path,
        &[
            ("prompt", vec![Some("a"), Some("b"), Some("c")]),
            ("completion", vec![Some("x"), None, Some("z")]),
        ],
    );
    let err = load_sft_dataset(&path, &tok(), &SftDataOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data.parquet: row 1: missing `completion`"),
        "{err}"
    );
}

#[test]
fn truncation_keeps_the_start_and_drops_examples_left_untrained() {
    let tok = tok();
    let long_prompt = "word ".repeat(40);
    let rows = [
        json!({"prompt": "Short?", "completion": " Yes."}),
        json!({"prompt": long_prompt, "completion": " lost"}),
        json!({"prompt": "Q?", "completion": " a long answer that will not fit at all"}),
    ];
    let full = load_rows(&rows, &SftDataOptions::default());
    let opts = SftDataOptions {
        max_length: 12,
        ..SftDataOptions::default()
    };
    let ds = load_rows(&rows, &opts);
    assert_eq!((ds.rows, ds.dropped, ds.truncated), (3, 1, 2));
    assert_eq!(ds.examples.len(), 2);
    assert_eq!(ds.examples[0], full.examples[0]);
    let cut = &ds.examples[1];
    assert_eq!(cut.len(), 12);
    assert_eq!(cut.input_ids[..], full.examples[2].input_ids[..12]);
    assert_eq!(cut.loss_mask[..], full.examples[2].loss_mask[..12]);
    assert!(cut.trained_tokens() > 0);
    assert!(!cut.input_ids.contains(&tok.eos_token_id().unwrap()));
}

#[test]
fn conversations_without_an_assistant_turn_are_dropped_or_refused() {
    let rows = [
        json!({"messages": chat()}),
        json!({"messages": [{"role": "user", "content": "anyone?"}]}),
    ];
    let ds = load_rows(&rows, &SftDataOptions::default());
    assert_eq!((ds.rows, ds.examples.len(), ds.dropped), (2, 1, 1));

    let dir = tempfile::tempdir().unwrap();
    let path = write_jsonl(dir.path(), "d.jsonl", &rows[1..]);
    let err = load_sft_dataset(&path, &tok(), &SftDataOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("none of the 1 rows has a token to train on"),
        "{err}"
    );
}

#[test]
fn packing_fills_rows_of_max_length_and_keeps_the_masks() {
    let rows: Vec<Value> = (0..12)
        .map(|i| json!({"prompt": format!("Question {i}?"), "completion": format!(" Answer {i}.")}))
        .collect();
    let unpacked = load_rows(&rows, &SftDataOptions::default());
    let opts = SftDataOptions {
        max_length: 16,
        packing: true,
        ..SftDataOptions::default()
    };
    let packed = load_rows(&rows, &opts);
    assert_eq!(packed.truncated, 0);
    let n = packed.examples.len();
    assert!(n > 2);
    assert!(packed.examples[..n - 1].iter().all(|e| e.len() == 16));
    assert!((1..=16).contains(&packed.examples[n - 1].len()));

    let cat = |examples: &[SftExample]| -> (Vec<u32>, Vec<bool>) {
        (
            examples.iter().flat_map(|e| e.input_ids.clone()).collect(),
            examples.iter().flat_map(|e| e.loss_mask.clone()).collect(),
        )
    };
    let (ids, mask) = cat(&unpacked.examples);
    let (packed_ids, packed_mask) = cat(&packed.examples);
    assert_eq!(packed_ids, ids);
    // Masks travel with their tokens, except the first position of each row, which no token
    // precedes.
    for (i, (&p, &u)) in packed_mask.iter().zip(&mask).enumerate() {
        assert_eq!(p, u && i % 16 != 0, "position {i}");
    }
    assert_eq!(pack(&unpacked.examples, 16), packed.examples);
}

#[test]
fn make_batch_pads_right_and_shifts_targets() {
    let a = SftExample {
        input_ids: vec![1, 2, 3, 4],
        loss_mask: vec![false, false, true, true],
    };
    let b = SftExample {
        input_ids: vec![5, 6],
        loss_mask: vec![false, true],
    };
    let batch = make_batch(&[&a, &b], 9);
    assert_eq!(batch.seq_len, 3);
    assert_eq!(batch.input_ids, vec![vec![1, 2, 3], vec![5, 9, 9]]);
    assert_eq!(batch.targets, vec![2, 3, 4, 6, 9, 9]);
    assert_eq!(batch.weights, vec![0.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
    assert_eq!(batch.trained_tokens, 3);
}

#[test]
fn split_is_deterministic_and_disjoint() {
    let rows: Vec<Value> = (0..20)
        .map(|i| json!({"text": format!("document number {i}")}))
        .collect();
    let ds = load_rows(&rows, &SftDataOptions::default());
    let (train, eval) = ds.clone().split(0.2, 7);
    assert_eq!((train.examples.len(), eval.examples.len()), (16, 4));
    let (train2, eval2) = ds.clone().split(0.2, 7);
    assert_eq!(
        (train.examples.clone(), eval.examples.clone()),
        (train2.examples, eval2.examples)
    );
    let (_, eval3) = ds.clone().split(0.2, 8);
    assert_ne!(eval.examples, eval3.examples);
    let mut all: Vec<SftExample> = train.examples.into_iter().chain(eval.examples).collect();
    let mut original = ds.examples.clone();
    all.sort_by(|x, y| x.input_ids.cmp(&y.input_ids));
    original.sort_by(|x, y| x.input_ids.cmp(&y.input_ids));
    assert_eq!(all, original);
    // A tiny fraction still holds out one example; zero holds out none.
    assert_eq!(ds.clone().split(0.001, 1).1.examples.len(), 1);
    assert_eq!(ds.split(0.0, 1).1.examples.len(), 0);
}
