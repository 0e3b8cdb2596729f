//! The lifecycle's `quantize` stage: the aligned model (SFT with the DPO adapter merged) at 8
//! and 4 bits with RTN, GPTQ and AWQ, calibrated on the world's corpus (`kiln quantize`'s
//! default data) and measured on a held-out tenth of it; the 4-bit variant closest to full
//! precision is then served by `kiln serve` and benchmarked against the f32 model, and the
//! aligned model is exported to GGUF (whose perplexity is measured on the same text).
//!
//! The 8-bit variants use groups of 32 inputs; the 4-bit ones one group per output row. The
//! lifecycle's model is 96–128 wide, so 4-bit groups of 32 are almost lossless for every method
//! and the perplexity differences drown in noise (measured: within ±2%, in no stable order);
//! per row, 4 bits over 96 inputs is as coarse as the papers' settings, and the methods
//! separate.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use kiln_model::quant::gguf::{GgufType, export_gguf};
use kiln_quant::{Method, QuantSpec, QuantizeDirOptions, QuantizeReport};
use kiln_serve::bench::{BenchConfig, Endpoint, run_bench_blocking};
use kiln_serve::server::{ServeOptions, ServerHandle};
use serde::Serialize;

/// Input features per group of the 8-bit variants: the lifecycle's models are narrow (96–128
/// wide), so 32, where published checkpoints use 128 on rows of thousands.
pub const GROUP_SIZE: usize = 32;

#[derive(Debug, Serialize)]
pub struct QuantizeStageReport {
    pub variants: Vec<QuantizeReport>,
    /// The 4-bit variant served (the one whose perplexity moved least).
    pub chosen: String,
    /// `kiln bench serve` output tokens/s at concurrency 1: full precision, then the chosen one.
    pub f32_tokens_per_s: f64,
    pub chosen_tokens_per_s: f64,
    /// A held-out question, and the chosen model's reply to it through the chat API.
    pub question: String,
    pub chosen_reply: String,
    pub gguf: Vec<GgufLine>,
}

#[derive(Debug, Serialize)]
pub struct GgufLine {
    pub file: String,
    /// On the quantized variants' held-out text.
    pub perplexity: f64,
    pub bytes: u64,
    pub bits_per_weight: f64,
}

/// The variants, in the order of the report's table.
const VARIANTS: [(Method, u8); 5] = [
    (Method::Rtn, 8),
    (Method::Gptq, 8),
    (Method::Rtn, 4),
    (Method::Gptq, 4),
    (Method::Awq, 4),
];

pub fn quantize_stage(
    aligned: &Path,
    corpus: &Path,
    out: &Path,
    question: &str,
    quick: bool,
) -> Result<QuantizeStageReport> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut variants = Vec::new();
    for (method, bits) in VARIANTS {
        let name = format!("{}-{bits}bit", method.name());
        let spec = QuantSpec {
            bits,
            group_size: (bits == 8).then_some(GROUP_SIZE),
            sym: false,
        };
        let mut opts =
            QuantizeDirOptions::new(&aligned.to_string_lossy(), &out.join(&name), method, spec);
        opts.calibration = Some(corpus.to_path_buf());
        (opts.samples, opts.seq_len) = if quick { (32, 128) } else { (128, 256) };
        opts.max_eval_tokens = if quick { 4096 } else { 16384 };
        opts.act_order = method == Method::Gptq;
        let report =
            kiln_quant::quantize_dir(&opts).with_context(|| format!("quantizing {name}"))?;
        eprintln!(
            "        {}",
            crate::quantize::summary(&report)
                .lines()
                .next()
                .unwrap_or("")
        );
        variants.push(report);
    }
    let chosen = variants
        .iter()
        .filter(|r| r.bits == 4)
        .min_by(|a, b| {
            let drift = |r: &QuantizeReport| r.perplexity_change().map_or(f64::INFINITY, f64::abs);
            drift(a).total_cmp(&drift(b))
        })
        .map(|r| r.out.clone())
        .context("no 4-bit variant")?;

    let bench = |model: &Path| -> Result<(f64, String)> {
        let options = ServeOptions::new(model.to_string_lossy());
        let server = ServerHandle::start(&options, SocketAddr::from(([127, 0, 0, 1], 0)))
            .with_context(|| format!("serving {}", model.display()))?;
        let result = run_bench_blocking(&BenchConfig {
            url: server.url(),
            concurrency: 1,
            requests: if quick { 3 } else { 6 },
            prompt_len: 48,
            max_tokens: if quick { 24 } else { 48 },
            model: None,
            endpoint: Endpoint::Completions,
            seed: 0,
            api_key: None,
            tokenize_url: None,
        })
        .context("kiln bench serve")?;
        anyhow::ensure!(
            result.failed_requests == 0,
            "kiln bench serve on {}: {:?}",
            model.display(),
            result.errors
        );
        let reply = chat(&server.url(), question)?;
        server.shutdown()?;
        Ok((result.output_token_throughput, reply))
    };
    let (f32_tokens_per_s, _) = bench(aligned)?;
    let (chosen_tokens_per_s, chosen_reply) = bench(&chosen)?;

    // The GGUF files' perplexity on the variants' held-out text.
    let eval_ids = {
        let tokenizer = kiln_core::Tokenizer::from_dir(aligned)?;
        let docs = kiln_quant::calib::read_documents(corpus)?;
        let (_, held_out) = kiln_quant::calib::split_documents(&docs);
        let mut ids = tokenizer.encode(&held_out, true)?;
        ids.truncate(variants[0].eval_tokens);
        ids
    };
    let seq_len = variants[0].seq_len;
    let mut gguf = Vec::new();
    for ty in [GgufType::Q8_0, GgufType::Q4KM] {
        let file = out.join(format!("aligned-{}.gguf", ty.name()));
        let report = export_gguf(&aligned.to_string_lossy(), ty, &file, &|_| {})
            .with_context(|| format!("exporting {}", file.display()))?;
        let loaded = kiln_model::LoadedModel::load(&file.to_string_lossy(), &Default::default())?;
        let perplexity = kiln_quant::run::perplexity(&loaded.model, &eval_ids, seq_len)?;
        gguf.push(GgufLine {
            perplexity,
            file: file
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes: report.file_bytes,
            bits_per_weight: report.bits_per_weight(),
        });
    }
    Ok(QuantizeStageReport {
        chosen: chosen
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        variants,
        f32_tokens_per_s,
        chosen_tokens_per_s,
        question: question.to_string(),
        chosen_reply,
        gguf,
    })
}

/// A one-line summary for the stage's progress line.
pub fn headline(r: &QuantizeStageReport) -> String {
    let ppl = |name: &str| {
        r.variants
            .iter()
            .find(|v| format!("{}-{}bit", v.method, v.bits) == name)
            .and_then(|v| Some((v.perplexity_before?, v.perplexity_after?)))
    };
    let cell = |name: &str| match ppl(name) {
        Some((_, after)) => format!("{after:.3}"),
        None => "-".into(),
    };
    let base = ppl("rtn-8bit").map_or("-".into(), |(b, _)| format!("{b:.3}"));
    let gguf: Vec<String> = r
        .gguf
        .iter()
        .map(|g| format!("{} {:.3}", g.file, g.perplexity))
        .collect();
    format!(
        "perplexity f32 {base} | 8-bit rtn {} gptq {} | 4-bit rtn {} gptq {} awq {} | {}; serving {}: {:.0} tokens/s vs f32 {:.0}",
        cell("rtn-8bit"),
        cell("gptq-8bit"),
        cell("rtn-4bit"),
        cell("gptq-4bit"),
        cell("awq-4bit"),
        gguf.join(", "),
        r.chosen,
        r.chosen_tokens_per_s,
        r.f32_tokens_per_s
    )
}

/// A greedy, non-streamed chat completion: the reply's text.
fn chat(url: &str, question: &str) -> Result<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let body = serde_json::json!({
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 24,
            "temperature": 0,
        });
        let reply: serde_json::Value = reqwest::Client::new()
            .post(format!("{url}/v1/chat/completions"))
            .json(&body)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    })
}
