//! `kiln gateway --config FILE.yaml`: the API gateway in front of OpenAI-compatible upstreams
//! (authentication, rate limits, validation, a response cache, cost metering), until Ctrl-C or
//! SIGTERM (which let requests in flight, streams included, finish first).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use kiln_gateway::config::GatewayConfig;
use kiln_gateway::server;

#[derive(Args, Debug)]
#[command(
    after_help = "Example (docs/gateway.md has the walkthrough and every config key):\n  kiln serve --model testdata/hf/llama --port 8000 &\n  kiln gateway --config docs/examples/gateway.yaml\n  curl localhost:8080/v1/chat/completions -H 'authorization: Bearer sk-dev-alice' \\\n    -H 'content-type: application/json' \\\n    -d '{\"model\": \"llama\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 8, \"temperature\": 0}'"
)]
pub struct GatewayArgs {
    /// The gateway's YAML config; `${NAME}` is replaced by the environment variable NAME.
    #[arg(long, value_name = "FILE.yaml")]
    config: PathBuf,

    /// Listen here instead of the config's `listen` (HOST:PORT).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
}

pub fn run(args: GatewayArgs) -> Result<()> {
    // The error names the file and key already; its `source` would only repeat the I/O error.
    let mut config = GatewayConfig::load(&args.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    server::serve_blocking(
        config,
        |gateway| {
            println!("kiln gateway: {}", gateway.describe());
            // Scripts wait for this line; make sure it is out even when stdout is a pipe.
            let _ = std::io::stdout().flush();
        },
        server::shutdown_signal(),
    )
    .with_context(|| format!("kiln gateway --config {}", args.config.display()))
}
