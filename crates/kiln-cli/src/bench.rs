//! `kiln bench …`: measurements of a running system.

use std::io::{IsTerminal, Write};

use anyhow::{Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use kiln_serve::bench::{BenchConfig, Endpoint, run_bench_blocking_with_progress};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Load-test an OpenAI-compatible server: TTFT, TPOT, ITL, end-to-end latency and
    /// throughput, as `vllm bench serve` measures them.
    #[command(
        after_help = "Example (with `kiln serve --model testdata/hf/llama` listening on port 8000):\n  kiln bench serve --url http://127.0.0.1:8000 --concurrency 8 --requests 64 --prompt-len 128 --max-tokens 64"
    )]
    Serve(ServeArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EndpointArg {
    /// POST /v1/completions with a prompt string.
    Completions,
    /// POST /v1/chat/completions with the prompt as one user message.
    Chat,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The server's base URL, e.g. http://127.0.0.1:8000.
    #[arg(long, value_name = "U")]
    url: String,

    /// Requests in flight at most.
    #[arg(long, value_name = "C")]
    concurrency: usize,

    /// Requests to send in all.
    #[arg(long, value_name = "N")]
    requests: usize,

    /// Prompt length to aim for, in the server's tokens (measured with its /tokenize when it
    /// has one).
    #[arg(long, value_name = "L", default_value_t = 256)]
    prompt_len: usize,

    /// Tokens every request generates (sent with ignore_eos, so all of them).
    #[arg(long, value_name = "M", default_value_t = 128)]
    max_tokens: usize,

    /// The model name to send (default: the first one GET /v1/models lists).
    #[arg(long)]
    model: Option<String>,

    #[arg(long, value_enum, default_value_t = EndpointArg::Completions)]
    endpoint: EndpointArg,

    /// Seed of the synthetic prompts.
    #[arg(long, value_name = "S", default_value_t = 0)]
    seed: u64,

    /// Sent as `Authorization: Bearer K`.
    #[arg(long, value_name = "K", env = "OPENAI_API_KEY", hide_env_values = true)]
    api_key: Option<String>,

    /// The server whose POST /tokenize measures the prompts (default: --url). Benchmarking
    /// through a gateway (no /tokenize), pass the inference server's URL, so the prompts match
    /// a direct run's.
    #[arg(long, value_name = "U")]
    tokenize_url: Option<String>,

    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Serve(args) => serve(args),
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let cfg = BenchConfig {
        url: args.url,
        concurrency: args.concurrency,
        requests: args.requests,
        prompt_len: args.prompt_len,
        max_tokens: args.max_tokens,
        model: args.model,
        endpoint: match args.endpoint {
            EndpointArg::Completions => Endpoint::Completions,
            EndpointArg::Chat => Endpoint::Chat,
        },
        seed: args.seed,
        api_key: args.api_key,
        tokenize_url: args.tokenize_url,
    };
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(cfg.requests as u64).with_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} requests [{elapsed_precise}<{eta_precise}]",
            )?,
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    let report = run_bench_blocking_with_progress(&cfg, |done, _| bar.set_position(done as u64));
    bar.finish_and_clear();
    let report = report?;

    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
    } else {
        writeln!(out, "{report}")?;
    }
    if report.successful_requests == 0 {
        let first = report.errors.first().map_or("", String::as_str);
        bail!(
            "all {} requests failed; the first: {first}",
            report.failed_requests
        );
    }
    Ok(())
}
