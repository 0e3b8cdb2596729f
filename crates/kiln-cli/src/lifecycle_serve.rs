//! The lifecycle's `serve` stage: the aligned models behind `kiln serve`'s HTTP API, in process on
//! a loopback port, asked the world's held-out questions over streaming chat completions by a
//! real HTTP client, then loaded with `kiln bench serve` at concurrency 1 and 8.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use kiln_serve::bench::{BenchConfig, Endpoint, run_bench_blocking};
use kiln_serve::server::{AdapterSpec, ServeOptions, ServerHandle};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct ServeReport {
    /// The models served: the base, then its adapters.
    pub models: Vec<String>,
    /// Chat requests sent at once, spread over the models (after one unmeasured burst of the same
    /// requests that opens the client's connections).
    pub chat_requests: usize,
    pub ttft_ms_mean: f64,
    pub ttft_ms_max: f64,
    pub completion_tokens: usize,
    /// Completion tokens of the burst over its wall time.
    pub burst_tokens_per_s: f64,
    pub samples: Vec<ServedReply>,
    /// `kiln bench serve` output tokens/s at concurrency 1 and at `bench_concurrency`.
    pub bench_concurrency: usize,
    pub bench_tokens_per_s_1: f64,
    pub bench_tokens_per_s_n: f64,
    pub bench_ttft_ms_p50_n: f64,
    pub bench_tpot_ms_p50_n: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServedReply {
    pub model: String,
    pub question: String,
    pub reply: String,
    pub ttft_ms: f64,
    pub completion_tokens: usize,
}

/// One streamed chat completion, timed.
struct Timed {
    reply: String,
    ttft: Duration,
    completion_tokens: usize,
}

/// `base` served as `base_name`, with `adapters` (name, directory) beside it.
pub fn serve_options(base: &Path, base_name: &str, adapters: &[(&str, &Path)]) -> ServeOptions {
    let mut options = ServeOptions::new(base.to_string_lossy());
    options.served_model_name = Some(base_name.to_string());
    options.adapters = adapters
        .iter()
        .map(|(name, dir)| AdapterSpec {
            name: name.to_string(),
            dir: dir.to_path_buf(),
        })
        .collect();
    options
}

/// Serves `base` (as `base_name`) with `adapters`, sends `questions` (each with `system`) to every
/// model at once, then benchmarks the last adapter. The server keeps running for the next stage;
/// the caller shuts it down.
pub fn serve_stage(
    base: &Path,
    base_name: &str,
    adapters: &[(&str, &Path)],
    system: &str,
    questions: &[String],
    quick: bool,
) -> Result<(ServeReport, ServerHandle)> {
    let mut options = serve_options(base, base_name, adapters);
    options.admin_key = Some(crate::lifecycle_loop::ADMIN_KEY.to_string());
    let server = ServerHandle::start(&options, SocketAddr::from(([127, 0, 0, 1], 0)))
        .context("starting kiln serve")?;
    let url = server.url();
    let mut models = vec![base_name.to_string()];
    models.extend(adapters.iter().map(|(n, _)| n.to_string()));

    // Every question to every model, all in flight at once: one batch mixing three weights.
    let jobs: Vec<(String, String)> = models
        .iter()
        .flat_map(|m| questions.iter().map(move |q| (m.clone(), q.clone())))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::new();
    let send_all = || {
        runtime.block_on(async {
            let tasks = jobs.iter().map(|(model, q)| {
                let body = serde_json::json!({
                    "model": model,
                    "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
                    "max_tokens": 24,
                    "temperature": 0,
                    "stream": true,
                    "stream_options": {"include_usage": true},
                });
                chat(&client, &url, body)
            });
            futures_util::future::join_all(tasks).await
        })
    };
    // A first burst opens the client's connections (measured: ~50 ms of a cold TTFT is the
    // client connecting) and warms the engine; the second is the one reported.
    send_all();
    let started = Instant::now();
    let results: Vec<Result<Timed>> = send_all();
    let burst = started.elapsed();
    let mut samples = Vec::new();
    for ((model, question), r) in jobs.iter().zip(results) {
        let t = r.with_context(|| format!("chat request to `{model}`"))?;
        samples.push(ServedReply {
            model: model.clone(),
            question: question.clone(),
            reply: t.reply,
            ttft_ms: t.ttft.as_secs_f64() * 1e3,
            completion_tokens: t.completion_tokens,
        });
    }
    let completion_tokens: usize = samples.iter().map(|s| s.completion_tokens).sum();
    let ttfts: Vec<f64> = samples.iter().map(|s| s.ttft_ms).collect();

    let concurrency = 8;
    let bench = |c: usize| {
        run_bench_blocking(&BenchConfig {
            url: url.clone(),
            concurrency: c,
            requests: if quick { 2 * c } else { 4 * c },
            prompt_len: 48,
            max_tokens: if quick { 16 } else { 32 },
            model: models.last().cloned(),
            endpoint: Endpoint::Completions,
            seed: 0,
            api_key: None,
            tokenize_url: None,
        })
        .with_context(|| format!("kiln bench serve at concurrency {c}"))
    };
    let one = bench(1)?;
    let many = bench(concurrency)?;
    for r in [&one, &many] {
        anyhow::ensure!(
            r.failed_requests == 0,
            "kiln bench serve: {} of {} requests failed: {:?}",
            r.failed_requests,
            r.setup.requests,
            r.errors
        );
    }
    let report = ServeReport {
        models,
        chat_requests: samples.len(),
        ttft_ms_mean: ttfts.iter().sum::<f64>() / ttfts.len().max(1) as f64,
        ttft_ms_max: ttfts.iter().copied().fold(0.0, f64::max),
        completion_tokens,
        burst_tokens_per_s: completion_tokens as f64 / burst.as_secs_f64(),
        samples,
        bench_concurrency: concurrency,
        bench_tokens_per_s_1: one.output_token_throughput,
        bench_tokens_per_s_n: many.output_token_throughput,
        bench_ttft_ms_p50_n: many.ttft_ms.p50,
        bench_tpot_ms_p50_n: many.tpot_ms.p50,
    };
    Ok((report, server))
}

/// A streaming chat completion: the reply, the time to its first content, its token count.
async fn chat(client: &reqwest::Client, url: &str, body: serde_json::Value) -> Result<Timed> {
    let sent = Instant::now();
    let response = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await?;
    let status = response.status();
    if !status.is_success() {
        anyhow::bail!(
            "HTTP {status}: {}",
            response.text().await.unwrap_or_default()
        );
    }
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let mut reply = String::new();
    let mut ttft = None;
    let mut completion_tokens = 0;
    while let Some(bytes) = stream.next().await {
        buffer.push_str(&String::from_utf8_lossy(&bytes?));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                return Ok(Timed {
                    reply,
                    ttft: ttft.unwrap_or_else(|| sent.elapsed()),
                    completion_tokens,
                });
            }
            let chunk: serde_json::Value = serde_json::from_str(data)?;
            if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str()
                && !text.is_empty()
            {
                ttft.get_or_insert_with(|| sent.elapsed());
                reply.push_str(text);
            }
            if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
                completion_tokens = n as usize;
            }
        }
    }
    anyhow::bail!("the stream ended without [DONE]")
}
