//! `kiln serve`: the OpenAI-compatible HTTP API over a model and its LoRA adapters, with
//! continuous batching and a paged KV cache, until Ctrl-C or SIGTERM (which drain requests in
//! flight first).

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};

use anyhow::{Context, Result};
use clap::Args;
use kiln_serve::EngineConfig;
use kiln_serve::server::{self, AdapterSpec, ServeOptions};

#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  kiln serve --model testdata/hf/llama --adapter lora=testdata/hf/llama-lora --port 8000\n  curl localhost:8000/v1/completions -H 'content-type: application/json' \\\n    -d '{\"model\": \"lora\", \"prompt\": \"The model learns\", \"max_tokens\": 16, \"temperature\": 0}'"
)]
pub struct ServeArgs {
    /// A model directory as transformers writes it, or a hub id (ORG/NAME[@REVISION]) already in
    /// the local Hugging Face cache ($HF_HOME/hub).
    #[arg(long, value_name = "M")]
    model: String,

    /// A PEFT LoRA adapter served beside the base model as model NAME (repeatable); requests
    /// pick it with `"model": "NAME"`.
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    adapters: Vec<AdapterSpec>,

    /// The name requests use for the base model (default: the directory's name, or the hub id).
    #[arg(long, value_name = "NAME")]
    served_model_name: Option<String>,

    #[arg(long, default_value = "127.0.0.1")]
    host: String,

    #[arg(long, default_value_t = 8000)]
    port: u16,

    /// Sequences decoded together at most.
    #[arg(long, default_value_t = EngineConfig::default().max_num_seqs)]
    max_num_seqs: usize,

    /// Tokens in one forward pass at most (decodes and prefill chunks together).
    #[arg(long, default_value_t = EngineConfig::default().max_batch_tokens)]
    max_batch_tokens: usize,

    /// Sequences waiting for a slot at most; past it, requests get 429.
    #[arg(long, default_value_t = EngineConfig::default().max_queue)]
    max_queue: usize,

    /// KV-cache blocks (the cache's memory budget).
    #[arg(long, default_value_t = EngineConfig::default().num_blocks)]
    kv_cache_blocks: usize,

    /// Positions per KV-cache block.
    #[arg(long, default_value_t = EngineConfig::default().block_size)]
    block_size: usize,

    /// The longest sequence (prompt and completion) served (default and most: the model's
    /// max_position_embeddings).
    #[arg(long, value_name = "N")]
    max_model_len: Option<usize>,

    /// Recompute every prompt instead of reusing the KV blocks of prefixes seen before.
    #[arg(long)]
    no_prefix_caching: bool,

    /// Require `Authorization: Bearer K` on the API (/health and /metrics stay open).
    #[arg(long, value_name = "K", env = "KILN_API_KEY", hide_env_values = true)]
    api_key: Option<String>,

    /// Enable the admin API behind `Authorization: Bearer K`: POST /admin/adapters
    /// {"name", "path"} loads an adapter under a name (replacing what it served, requests in
    /// flight finishing on the old weights); GET /admin/adapters lists them. Off without it.
    #[arg(long, value_name = "K", env = "KILN_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,

    #[command(flatten)]
    drain: DrainArgs,
}

/// How SIGTERM (or Ctrl-C) drains a server: `kiln serve`, `kiln gateway` and `kiln up` take
/// these.
#[derive(Args, Debug, Clone, Copy)]
pub struct DrainArgs {
    /// On SIGTERM, keep serving this long with GET /ready answering 503, so load balancers take
    /// the instance out of rotation before it stops accepting connections.
    #[arg(long, value_name = "SECONDS", default_value_t = 0.0)]
    pub drain_delay: f64,

    /// Then give requests in flight (streams included) this long to finish before cutting them
    /// off.
    #[arg(long, value_name = "SECONDS", default_value_t = kiln_http::DEFAULT_SHUTDOWN_TIMEOUT_S)]
    pub shutdown_timeout: f64,
}

impl DrainArgs {
    pub fn options(&self) -> Result<kiln_http::ShutdownOptions> {
        kiln_http::ShutdownOptions::from_secs(self.drain_delay, self.shutdown_timeout)
            .map_err(anyhow::Error::msg)
    }
}

pub fn run(args: ServeArgs) -> Result<()> {
    let addr = resolve(&args.host, args.port)?;
    let drain = args.drain.options()?;
    let options = ServeOptions {
        adapters: args.adapters,
        served_model_name: args.served_model_name,
        engine: EngineConfig {
            max_num_seqs: args.max_num_seqs,
            max_batch_tokens: args.max_batch_tokens,
            max_queue: args.max_queue,
            block_size: args.block_size,
            num_blocks: args.kv_cache_blocks,
            max_model_len: 0,
            prefix_caching: !args.no_prefix_caching,
        },
        max_model_len: args.max_model_len,
        api_key: args.api_key,
        admin_key: args.admin_key,
        ..ServeOptions::new(args.model)
    };
    let state = server::load(&options).context("starting kiln serve")?;
    let shutdown = async {
        server::shutdown_signal().await;
        eprintln!(
            "kiln serve: stopping: not ready (GET /ready → 503); draining the requests in flight"
        );
    };
    server::serve_blocking(
        state,
        addr,
        drain,
        |server| {
            // Scripts wait for this line: flush it now, stdout may be a pipe.
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "kiln serve: {}", server.describe());
            let _ = stdout.flush();
        },
        shutdown,
    )?;
    eprintln!("kiln serve: stopped");
    Ok(())
}

/// `HOST:PORT` as a socket address; a name is resolved (`localhost`), an IPv6 literal may come
/// without brackets.
pub(crate) fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    let spec = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    spec.to_socket_addrs()
        .with_context(|| format!("--host {host}: cannot resolve"))?
        .next()
        .with_context(|| format!("--host {host}: resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_resolve() {
        assert_eq!(
            resolve("127.0.0.1", 8000).expect("resolves"),
            "127.0.0.1:8000".parse().expect("address")
        );
        assert_eq!(
            resolve("::1", 9).expect("resolves"),
            "[::1]:9".parse().expect("address")
        );
    }
}
