//! Calibration and evaluation text: a file the user names, or the synthetic world's corpus.
//!
//! Calibration windows are drawn as GPTQ's reference draws its C4 segments: the documents are
//! tokenized into one stream and `samples` windows of `seq_len` tokens are taken at random
//! offsets (seeded). The evaluation text is kept apart from every window.

use std::path::Path;

use candle_core::Result;
use kiln_core::Tokenizer;
use rand::{Rng, SeedableRng};

/// Documents of a calibration file: JSONL rows with a `"text"` field (`.jsonl`), or plain text
/// whose documents are separated by blank lines.
pub fn read_documents(path: &Path) -> Result<Vec<String>> {
    let content = std::fs::read_to_string(path)
        .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
    let docs: Vec<String> = if path.extension().is_some_and(|e| e == "jsonl") {
        content
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(n, line)| {
                let row: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                    candle_core::Error::msg(format!("{}:{}: {e}", path.display(), n + 1))
                })?;
                match row.get("text").and_then(|t| t.as_str()) {
                    Some(t) => Ok(t.to_string()),
                    None => candle_core::bail!(
                        "{}:{}: expected an object with a string field \"text\"",
                        path.display(),
                        n + 1
                    ),
                }
            })
            .collect::<Result<_>>()?
    } else {
        content
            .split("\n\n")
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(String::from)
            .collect()
    };
    if docs.is_empty() {
        candle_core::bail!("{}: no text in the calibration file", path.display());
    }
    Ok(docs)
}

/// The synthetic world's pre-training corpus (world `seed`): the default calibration data.
pub fn synthetic_documents(seed: u64) -> Result<Vec<String>> {
    let opts = kiln_data::SynthOptions {
        seed,
        corpus_docs: 1500,
        sft_examples: 1,
        preference_pairs: 1,
        eval_examples: 1,
    };
    kiln_data::generate(&opts)
        .map(|d| d.corpus)
        .map_err(|e| candle_core::Error::msg(format!("synthetic corpus: {e}")))
}

/// Calibration documents and a held-out evaluation text: the last tenth of the documents (at
/// least one) is held out.
pub fn split_documents(docs: &[String]) -> (Vec<String>, String) {
    let held = (docs.len() / 10).max(1).min(docs.len().saturating_sub(1));
    let (calib, eval) = docs.split_at(docs.len() - held);
    let calib = if calib.is_empty() { eval } else { calib };
    (calib.to_vec(), eval.join("\n\n"))
}

/// The documents as one token stream (each tokenized as the model's tokenizer does, BOS
/// included).
pub fn token_stream(tokenizer: &Tokenizer, docs: &[String]) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for doc in docs {
        ids.extend(
            tokenizer
                .encode(doc, true)
                .map_err(|e| candle_core::Error::msg(e.to_string()))?,
        );
    }
    Ok(ids)
}

/// `samples` windows of `seq_len` tokens at seeded random offsets in `stream` (the whole stream
/// once when it is shorter than a window).
pub fn windows(stream: &[u32], samples: usize, seq_len: usize, seed: u64) -> Result<Vec<Vec<u32>>> {
    if stream.len() < 2 {
        candle_core::bail!(
            "the calibration text has {} tokens; need more",
            stream.len()
        );
    }
    if samples == 0 || seq_len == 0 {
        candle_core::bail!("calibration needs at least one sample of at least one token");
    }
    if stream.len() <= seq_len {
        return Ok(vec![stream.to_vec()]);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    Ok((0..samples)
        .map(|_| {
            let start = rng.random_range(0..=stream.len() - seq_len);
            stream[start..start + seq_len].to_vec()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_seeded_and_in_range() -> Result<()> {
        let stream: Vec<u32> = (0..1000).collect();
        let a = windows(&stream, 8, 64, 0)?;
        assert_eq!(a, windows(&stream, 8, 64, 0)?);
        assert_ne!(a, windows(&stream, 8, 64, 1)?);
        assert!(
            a.iter()
                .all(|w| w.len() == 64 && w.windows(2).all(|p| p[1] == p[0] + 1))
        );
        assert_eq!(windows(&stream[..10], 8, 64, 0)?.len(), 1);
        assert!(windows(&stream[..1], 8, 64, 0).is_err());
        Ok(())
    }

    #[test]
    fn held_out_text_is_disjoint_from_calibration() {
        let docs: Vec<String> = (0..25).map(|i| format!("doc {i}")).collect();
        let (calib, eval) = split_documents(&docs);
        assert_eq!(calib.len(), 23);
        assert!(eval.contains("doc 24") && !eval.contains("doc 22"));
    }

    #[test]
    fn calibration_files_name_their_bad_lines() -> Result<()> {
        let dir = tempfile::tempdir().map_err(candle_core::Error::wrap)?;
        let path = dir.path().join("c.jsonl");
        std::fs::write(&path, "{\"text\":\"a\"}\n{\"txt\":\"b\"}\n")
            .map_err(candle_core::Error::wrap)?;
        let err = read_documents(&path).unwrap_err().to_string();
        assert!(
            err.contains("c.jsonl:2") && err.contains("\"text\""),
            "{err}"
        );
        let plain = dir.path().join("c.txt");
        std::fs::write(&plain, "one\n\ntwo\nlines\n\n\n").map_err(candle_core::Error::wrap)?;
        assert_eq!(read_documents(&plain)?, vec!["one", "two\nlines"]);
        Ok(())
    }
}
