//! `kiln up`: a working local stack in one command — the inference service (`kiln serve`) and
//! the gateway (`kiln gateway`) in one process, with embedded defaults: in-memory rate limits
//! and response cache, traces, feedback and the model registry in SQLite, a generated dev API
//! key, the live dashboard.
//!
//! The inference service listens on loopback only (a free port unless `--serve-port`); the
//! gateway's OpenAI API is what `--host`/`--port` expose. Without `--model`, kiln up serves
//! what `kiln lifecycle` trained last: the lifecycle records it ([`LastModel`]) in
//! `$XDG_STATE_HOME/kiln/last-lifecycle.json` (default `~/.local/state/kiln/`).
//!
//! On SIGTERM or Ctrl-C the gateway drains first (readiness drops, then requests in flight
//! finish under `--shutdown-timeout`), then the inference service stops.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use kiln_gateway::config::{
    ApiKeyConfig, AuthConfig, GatewayConfig, MonitorConfig, StoreConfig, UpstreamConfig,
    ValidationConfig,
};
use kiln_gateway::server::Gateway;
use kiln_serve::server::{self, AdapterSpec, ServeOptions, Server};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::serve::{DrainArgs, resolve};

#[derive(Args, Debug)]
#[command(
    after_help = "Example (docs/deploy.md has the walkthrough):\n  kiln up --model testdata/hf/llama\n  curl localhost:8080/v1/chat/completions -H \"authorization: Bearer $KEY\" \\\n    -H 'content-type: application/json' \\\n    -d '{\"model\": \"llama\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 16}'"
)]
pub struct UpArgs {
    /// A model directory as transformers writes it, or a hub id in the local Hugging Face cache
    /// (default: the model `kiln lifecycle` produced last, with its adapters).
    #[arg(long, value_name = "M")]
    model: Option<String>,

    /// A PEFT LoRA adapter served beside the model as model NAME (repeatable).
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    adapters: Vec<AdapterSpec>,

    /// The name requests use for the model (default: the directory's name, or the hub id).
    #[arg(long, value_name = "NAME")]
    served_model_name: Option<String>,

    /// Where the gateway's OpenAI API listens (0.0.0.0: every interface; the dashboard then
    /// needs the API key).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,

    #[arg(long, default_value_t = 8080)]
    port: u16,

    /// The inference service's port, on 127.0.0.1 (default: any free port).
    #[arg(long, value_name = "P", default_value_t = 0)]
    serve_port: u16,

    /// The API key clients use (default: a new `sk-kiln-…` key, printed once at start-up).
    #[arg(long, value_name = "K", env = "KILN_API_KEY", hide_env_values = true)]
    api_key: Option<String>,

    /// Enable the inference service's admin API (adapter hot swap, for `kiln loop`) behind this
    /// key.
    #[arg(long, value_name = "K", env = "KILN_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,

    /// Where traces, feedback and the model registry are kept (SQLite or PostgreSQL URL).
    #[arg(long, value_name = "URL", default_value = "sqlite://kiln-up.db")]
    store: String,

    #[command(flatten)]
    drain: DrainArgs,
}

/// What `kiln lifecycle` leaves for `kiln up`: the model it trained and the adapters served
/// beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastModel {
    /// The lifecycle's output directory.
    pub out: PathBuf,
    pub model: PathBuf,
    pub served_model_name: String,
    pub adapters: Vec<LastAdapter>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastAdapter {
    pub name: String,
    pub path: PathBuf,
}

/// `$XDG_STATE_HOME/kiln/last-lifecycle.json`, or `~/.local/state/kiln/…` without it; `None`
/// when neither variable is set.
pub fn last_model_path() -> Option<PathBuf> {
    let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let state = match non_empty("XDG_STATE_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(non_empty("HOME")?).join(".local/state"),
    };
    Some(state.join("kiln/last-lifecycle.json"))
}

impl LastModel {
    /// Records this model as the one `kiln up` serves by default. Paths are made absolute, so
    /// kiln up finds them from any directory.
    pub fn record(&self) -> Result<Option<PathBuf>> {
        let Some(path) = last_model_path() else {
            return Ok(None);
        };
        let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let record = LastModel {
            out: absolute(&self.out),
            model: absolute(&self.model),
            served_model_name: self.served_model_name.clone(),
            adapters: self
                .adapters
                .iter()
                .map(|a| LastAdapter {
                    name: a.name.clone(),
                    path: absolute(&a.path),
                })
                .collect(),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(&record)?;
        std::fs::write(&path, text + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Some(path))
    }

    /// The recorded model, checked to still be on disk.
    fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let last: LastModel = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a kiln lifecycle record", path.display()))?;
        for dir in std::iter::once(&last.model).chain(last.adapters.iter().map(|a| &a.path)) {
            anyhow::ensure!(
                dir.is_dir(),
                "{}: {} is gone (rerun `kiln lifecycle`, or pass --model)",
                path.display(),
                dir.display()
            );
        }
        Ok(last)
    }
}

/// The model to serve: `--model`, else the lifecycle's last one.
fn serve_options(args: &UpArgs) -> Result<(ServeOptions, String)> {
    let (model, mut adapters, name, source) = match &args.model {
        Some(model) => (model.clone(), Vec::new(), None, model.clone()),
        None => {
            let recorded = last_model_path().filter(|p| p.is_file());
            let Some(path) = recorded else {
                anyhow::bail!(
                    "no model to serve: pass --model DIR (a Hugging Face model directory) or \
                     --model ORG/NAME (a hub id in the local cache), or run `kiln lifecycle \
                     --quick` first (about two minutes on 2 cores): kiln up then serves the \
                     model it trained"
                );
            };
            let last = LastModel::load(&path)?;
            let adapters = last
                .adapters
                .iter()
                .map(|a| AdapterSpec {
                    name: a.name.clone(),
                    dir: a.path.clone(),
                })
                .collect();
            let source = format!(
                "{}, trained by kiln lifecycle ({})",
                last.model.display(),
                path.display()
            );
            (
                last.model.to_string_lossy().into_owned(),
                adapters,
                Some(last.served_model_name),
                source,
            )
        }
    };
    for extra in &args.adapters {
        adapters.retain(|a: &AdapterSpec| a.name != extra.name);
        adapters.push(extra.clone());
    }
    let options = ServeOptions {
        adapters,
        served_model_name: args.served_model_name.clone().or(name),
        admin_key: args.admin_key.clone(),
        ..ServeOptions::new(model)
    };
    Ok((options, source))
}

/// A new dev key: `sk-kiln-` and 32 hex digits from the OS's randomness.
fn generate_api_key() -> String {
    let bytes: [u8; 16] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("sk-kiln-{hex}")
}

/// The gateway's configuration: kiln gateway's defaults (in-memory limits and cache, the
/// monitor and dashboard on) with one upstream, one key and the store.
fn gateway_config(
    args: &UpArgs,
    listen: SocketAddr,
    serve_url: &str,
    api_key: &str,
    tokenizer: Option<PathBuf>,
) -> GatewayConfig {
    let key_sha256: String = Sha256::digest(api_key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    GatewayConfig {
        listen: listen.to_string(),
        upstreams: vec![UpstreamConfig {
            name: "kiln-serve".into(),
            url: format!("{serve_url}/v1"),
            models: vec!["*".into()],
            timeout_s: 600.0,
            api_key: None,
        }],
        auth: AuthConfig {
            api_keys: vec![ApiKeyConfig {
                key: None,
                key_sha256: Some(key_sha256),
                tenant: "dev".into(),
                models: vec!["*".into()],
                rpm: None,
                tpm: None,
                max_concurrent: None,
                no_train: false,
            }],
            oauth2: None,
        },
        limits: Default::default(),
        cache: Default::default(),
        pricing: Default::default(),
        budgets: Default::default(),
        store: StoreConfig {
            url: args.store.clone(),
            // Prompts and replies (PII scrubbed) stay on this machine; the label page and
            // `kiln feedback export` need them.
            capture_content: true,
        },
        validation: ValidationConfig {
            tokenizer,
            ..Default::default()
        },
        guardrails: Default::default(),
        monitor: MonitorConfig {
            // Off loopback, the dashboard's data needs the API key.
            dashboard_key: (!listen.ip().is_loopback()).then(|| api_key.to_string()),
            ..Default::default()
        },
    }
}

pub fn run(args: UpArgs) -> Result<()> {
    let drain = args.drain.options()?;
    let listen = resolve(&args.host, args.port)?;
    let serve_addr = SocketAddr::from(([127, 0, 0, 1], args.serve_port));
    let (options, source) = serve_options(&args)?;
    eprintln!("kiln up: loading {source}");
    let state = server::load(&options).context("kiln up: loading the model")?;
    let tokenizer = kiln_core::ModelDir::resolve(&options.model)
        .ok()
        .map(|dir| dir.root().to_path_buf());
    let (api_key, generated) = match &args.api_key {
        Some(key) => (key.clone(), false),
        None => (generate_api_key(), true),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kiln-up-worker")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let served_name = state.model_name().to_string();
        let adapter_names = state.adapter_names();
        let server = Server::bind(state, serve_addr)
            .await
            .context("kiln up: the inference service (--serve-port)")?;
        let serve_url = format!("http://{}", server.local_addr());
        let config = gateway_config(&args, listen, &serve_url, &api_key, tokenizer);
        let gateway = match Gateway::bind(config).await {
            Ok(gateway) => gateway.with_shutdown(drain),
            // The gateway's errors name the key at fault (`listen`, `store.url`, …).
            Err(e) if e.to_string().starts_with("listen:") => anyhow::bail!(
                "kiln up: --host/--port: {e:#} (is another kiln up running? pick another --port)"
            ),
            Err(e) => anyhow::bail!("kiln up: {e:#}"),
        };
        print_banner(&Banner {
            listen: gateway.local_addr(),
            serve_url: &serve_url,
            model: &served_name,
            adapters: &adapter_names,
            api_key: &api_key,
            generated,
            store: &args.store,
        });
        let (stop_serve, serve_stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(server.run(async {
            let _ = serve_stopped.await;
        }));
        let gateway_result = gateway
            .run(async {
                kiln_http::stop_signal().await;
                eprintln!(
                    "kiln up: stopping: not ready (GET /ready → 503); draining the requests in flight"
                );
            })
            .await;
        // The gateway has drained, so the inference service has nothing left to finish.
        let _ = stop_serve.send(());
        let serve_result = serving.await.context("the inference service panicked")?;
        gateway_result?;
        serve_result.context("the inference service")?;
        eprintln!("kiln up: stopped");
        Ok(())
    })
}

struct Banner<'a> {
    listen: SocketAddr,
    serve_url: &'a str,
    model: &'a str,
    adapters: &'a [String],
    api_key: &'a str,
    generated: bool,
    store: &'a str,
}

/// What a user needs to start: the URLs, the key (once) and a request to paste. The last line,
/// `kiln up: listening on http://ADDR …`, is what scripts wait for.
fn print_banner(b: &Banner) {
    // A wildcard address is not one to connect to; loopback reaches it from this machine.
    let mut shown = b.listen;
    if shown.ip().is_unspecified() {
        shown.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let base = format!("http://{shown}");
    let models = std::iter::once(b.model.to_string())
        .chain(b.adapters.iter().cloned())
        .collect::<Vec<_>>()
        .join(", ");
    let key_line = if b.generated {
        format!(
            "{} (generated; shown once — keep it, or choose one with --api-key / KILN_API_KEY)",
            b.api_key
        )
    } else {
        "from --api-key / KILN_API_KEY".to_string()
    };
    let dashboard = if b.listen.ip().is_loopback() {
        format!("{base}/dashboard")
    } else {
        format!("{base}/dashboard?key=<API key>")
    };
    let key_shown = if b.generated {
        b.api_key
    } else {
        "$KILN_API_KEY"
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "kiln up: models     {models}\n\
         kiln up: API        {base}/v1 (OpenAI-compatible, through the gateway)\n\
         kiln up: API key    {key_line}\n\
         kiln up: dashboard  {dashboard}\n\
         kiln up: feedback   POST {base}/v1/feedback; label replies at {base}/dashboard/label\n\
         kiln up: store      {} (traces, captured content with PII scrubbed, feedback)\n\
         kiln up: inference  {} (kiln serve, loopback only)\n\
         kiln up: try\n  \
           curl {base}/v1/chat/completions -H \"authorization: Bearer {key_shown}\" \\\n    \
           -H 'content-type: application/json' \\\n    \
           -d '{{\"model\": \"{}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], \"max_tokens\": 16}}'\n\
         kiln up: listening on http://{} (Ctrl-C or SIGTERM drains and stops)",
        b.store, b.serve_url, b.model, b.listen
    );
    let _ = out.flush();
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_fresh_and_well_formed() {
        let a = generate_api_key();
        let b = generate_api_key();
        assert_ne!(a, b);
        assert_eq!(a.len(), "sk-kiln-".len() + 32);
        assert!(a.starts_with("sk-kiln-"));
        assert!(a[8..].chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn a_recorded_model_whose_files_are_gone_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last-lifecycle.json");
        let last = LastModel {
            out: dir.path().to_path_buf(),
            model: dir.path().join("sft_merged"),
            served_model_name: "sft".into(),
            adapters: vec![],
        };
        std::fs::write(&path, serde_json::to_string(&last).unwrap()).unwrap();
        let err = LastModel::load(&path).unwrap_err().to_string();
        assert!(err.contains("sft_merged is gone"), "{err}");
        std::fs::create_dir(dir.path().join("sft_merged")).unwrap();
        assert_eq!(LastModel::load(&path).unwrap(), last);
        std::fs::write(&path, "{}").unwrap();
        let err = format!("{:#}", LastModel::load(&path).unwrap_err());
        assert!(err.contains("not a kiln lifecycle record"), "{err}");
    }
}
