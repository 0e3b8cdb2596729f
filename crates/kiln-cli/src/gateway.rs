//! `kiln gateway --config FILE.yaml`: the API gateway in front of OpenAI-compatible upstreams
//! (authentication, rate limits, validation, a response cache, cost metering), until Ctrl-C or
//! SIGTERM (which let requests in flight, streams included, finish first).
//!
//! `kiln gateway export --config FILE.yaml --out traffic.jsonl` writes the content the gateway
//! captured (`store.capture_content`), scrubbed of PII once more and without the requests of
//! `no_train` keys: the seed of the next round's training data.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use kiln_gateway::config::GatewayConfig;
use kiln_gateway::guard::{Scrubber, export_content};
use kiln_gateway::server;
use kiln_gateway::store::Store;

#[derive(Args, Debug)]
#[command(
    after_help = "Example (docs/gateway.md has the walkthrough and every config key):\n  kiln serve --model testdata/hf/llama --port 8000 &\n  kiln gateway --config docs/examples/gateway.yaml\n  curl localhost:8080/v1/chat/completions -H 'authorization: Bearer sk-dev-alice' \\\n    -H 'content-type: application/json' \\\n    -d '{\"model\": \"llama\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 8, \"temperature\": 0}'"
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct GatewayArgs {
    #[command(subcommand)]
    command: Option<GatewayCommand>,

    /// The gateway's YAML config; `${NAME}` is replaced by the environment variable NAME.
    #[arg(long, value_name = "FILE.yaml", required = true)]
    config: Option<PathBuf>,

    /// Listen here instead of the config's `listen` (HOST:PORT).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,

    #[command(flatten)]
    drain: crate::serve::DrainArgs,
}

#[derive(Subcommand, Debug)]
enum GatewayCommand {
    /// Write the captured content (scrubbed again; `no_train` keys left out) as JSONL.
    #[command(
        after_help = "Example:\n  kiln gateway export --config gateway.yaml --out traffic.jsonl --since-hours 24"
    )]
    Export(ExportArgs),
}

#[derive(Args, Debug)]
struct ExportArgs {
    /// The gateway's YAML config (its `store.url` is read).
    #[arg(long, value_name = "FILE.yaml")]
    config: PathBuf,
    /// The JSONL file to write: {request_id, at, tenant, model, messages | prompt, completion}.
    #[arg(long, value_name = "FILE.jsonl")]
    out: PathBuf,
    /// Only requests of the last N hours (default: all).
    #[arg(long, value_name = "N")]
    since_hours: Option<f64>,
}

pub fn run(args: GatewayArgs) -> Result<()> {
    if let Some(GatewayCommand::Export(export)) = args.command {
        return run_export(export);
    }
    let Some(path) = args.config else {
        anyhow::bail!("kiln gateway: --config FILE.yaml is required");
    };
    // The error names the file and key already; its `source` would only repeat the I/O error.
    let mut config = GatewayConfig::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    let drain = args.drain.options()?;
    let shutdown = async {
        server::shutdown_signal().await;
        eprintln!(
            "kiln gateway: stopping: not ready (GET /ready → 503); draining the requests in flight"
        );
    };
    server::serve_blocking(
        config,
        drain,
        |gateway| {
            println!("kiln gateway: {}", gateway.describe());
            // Scripts wait for this line; make sure it is out even when stdout is a pipe.
            let _ = std::io::stdout().flush();
        },
        shutdown,
    )
    .with_context(|| format!("kiln gateway --config {}", path.display()))?;
    eprintln!("kiln gateway: stopped");
    Ok(())
}

fn run_export(args: ExportArgs) -> Result<()> {
    let config = GatewayConfig::load(&args.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let since = match args.since_hours {
        Some(h) if h.is_finite() && h > 0.0 => std::time::SystemTime::now()
            .checked_sub(std::time::Duration::from_secs_f64(h * 3600.0))
            .unwrap_or(std::time::UNIX_EPOCH),
        Some(h) => anyhow::bail!("--since-hours: expected a positive number of hours, got {h}"),
        None => std::time::UNIX_EPOCH,
    };
    let scrubber = Scrubber::new(&config.guardrails)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let rows = runtime.block_on(async {
        let store = Store::connect(&config.store.url).await?;
        let rows = export_content(&store, since, &scrubber).await;
        store.close().await;
        rows
    })?;
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&args.out)
            .with_context(|| format!("creating {}", args.out.display()))?,
    );
    for row in &rows {
        serde_json::to_writer(&mut out, row)?;
        out.write_all(b"\n")?;
    }
    out.flush()
        .with_context(|| format!("writing {}", args.out.display()))?;
    if !config.store.capture_content && rows.is_empty() {
        eprintln!(
            "kiln gateway export: no content: `store.capture_content` is off in {}",
            args.config.display()
        );
    }
    println!(
        "kiln gateway export: {} requests → {} (PII scrubbed, no_train keys excluded)",
        rows.len(),
        args.out.display()
    );
    Ok(())
}
