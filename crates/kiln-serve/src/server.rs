//! Starting and stopping the server, in three layers so each caller takes what it needs:
//!
//! - [`load`]: the model, its adapters and the engine, as an [`AppState`] (blocking; seconds for
//!   a real model).
//! - [`Server`]: a bound listener ([`Server::bind`], port 0 picks a free one and
//!   [`Server::local_addr`] tells which) served by [`Server::run`] until a shutdown future
//!   resolves; then it stops accepting, lets in-flight requests (streams included) finish, and
//!   stops the engine. [`serve_blocking`] does the same on a runtime of its own; `kiln serve`
//!   runs it with [`shutdown_signal`] (Ctrl-C or SIGTERM).
//! - [`ServerHandle`]: the same on a background thread with its own tokio runtime, for callers
//!   without one (the lifecycle command, tests): [`ServerHandle::start`] returns once the port
//!   is bound, [`ServerHandle::shutdown`] drains and joins.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::serve::ListenerExt;
use candle_core::{DType, Device};
use kiln_http::{Drained, ShutdownOptions};
use kiln_model::{CausalLm, LoadOptions, LoadedModel, LoraAdapter};
use tokio::sync::oneshot;

use crate::api::{self, ApiConfig, AppState};
use crate::engine::EngineConfig;
use crate::metrics::ServeMetrics;
use crate::start_engine;

/// A LoRA adapter served under its own model name.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    pub name: String,
    pub dir: PathBuf,
}

impl std::str::FromStr for AdapterSpec {
    type Err = String;

    /// `NAME=DIR`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some((name, dir)) if !name.is_empty() && !dir.is_empty() => Ok(Self {
                name: name.to_string(),
                dir: PathBuf::from(dir),
            }),
            _ => Err(format!("expected NAME=DIR, got `{s}`")),
        }
    }
}

/// What to serve and how.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// A model directory or a hub id in the local Hugging Face cache.
    pub model: String,
    pub adapters: Vec<AdapterSpec>,
    /// The name requests use for the base model; default: the directory's name, or the hub id.
    pub served_model_name: Option<String>,
    /// The engine's limits; its `max_model_len` is replaced by [`ServeOptions::max_model_len`].
    pub engine: EngineConfig,
    /// The longest sequence served; default (and at most): the model's `max_position_embeddings`.
    pub max_model_len: Option<usize>,
    pub api_key: Option<String>,
    /// Enables the admin API (`/admin/adapters`: swap adapters without a restart) behind
    /// `Authorization: Bearer <key>`; without it the admin routes answer 404.
    pub admin_key: Option<String>,
    pub max_body_bytes: usize,
}

impl ServeOptions {
    /// Defaults for everything but the model.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            adapters: Vec::new(),
            served_model_name: None,
            engine: EngineConfig::default(),
            max_model_len: None,
            api_key: None,
            admin_key: None,
            max_body_bytes: api::DEFAULT_MAX_BODY_BYTES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("loading model `{model}`: {source}")]
    Model {
        model: String,
        source: Box<kiln_core::Error>,
    },
    #[error("adapter `{name}` ({}): {message}", dir.display())]
    Adapter {
        name: String,
        dir: PathBuf,
        message: String,
    },
    #[error("{0}")]
    Config(String),
    #[error("starting the engine: {0:#}")]
    Engine(anyhow::Error),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server thread panicked")]
    Panicked,
}

/// The name a model is served under by default: a directory's last component, or the hub id.
pub fn default_model_name(spec: &str) -> String {
    let path = Path::new(spec);
    if path.is_dir() {
        let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        if let Some(name) = canonical.file_name().and_then(|n| n.to_str()) {
            return name.to_string();
        }
    }
    spec.to_string()
}

/// Reads the PEFT adapter in `dir` and attaches it to a copy of `base` (sharing the base
/// weights), as `load` does for each `--adapter` and `POST /admin/adapters` for each swap.
/// Refuses adapters with `modules_to_save`, which replace base weights. Blocking; the error
/// says why the adapter cannot be served.
pub fn attach_adapter(base: &CausalLm, dir: &Path) -> Result<CausalLm, String> {
    let adapter = LoraAdapter::load(dir, DType::F32, &Device::Cpu).map_err(|e| e.to_string())?;
    if !adapter.saved_modules.is_empty() {
        let names: Vec<&str> = adapter.saved_modules.keys().map(String::as_str).collect();
        return Err(format!(
            "it replaces whole base weights (modules_to_save: {}), which cannot be switched per request; merge it with `kiln merge` and serve the result as its own model",
            names.join(", ")
        ));
    }
    let mut model = base.clone();
    adapter.apply(&mut model).map_err(|e| e.to_string())?;
    Ok(model)
}

/// Loads the model and its adapters (each the base with the adapter attached beside the shared
/// weights, so one engine serves them all per request) and starts the engine. Blocking.
pub fn load(options: &ServeOptions) -> Result<AppState, ServeError> {
    let model_error = |source| ServeError::Model {
        model: options.model.clone(),
        source: Box::new(source),
    };
    let load_options = LoadOptions {
        device: Device::Cpu,
        dtype: Some(DType::F32),
        adapter: None,
        merge_adapter: false,
    };
    let mut loaded = LoadedModel::load(&options.model, &load_options).map_err(model_error)?;
    // Before the adapters clone it, so they share the one transposed copy.
    loaded
        .model
        .store_weights_transposed()
        .map_err(|e| model_error(e.into()))?;
    let model_name = options
        .served_model_name
        .clone()
        .unwrap_or_else(|| default_model_name(&options.model));

    let context = loaded.config.max_position_embeddings;
    let max_model_len = options.max_model_len.unwrap_or(context);
    if max_model_len == 0 || max_model_len > context {
        return Err(ServeError::Config(format!(
            "max_model_len {max_model_len} must be between 1 and the model's max_position_embeddings ({context})"
        )));
    }

    let mut adapter_names: Vec<String> = Vec::new();
    let mut adapters = Vec::with_capacity(options.adapters.len());
    for spec in &options.adapters {
        let adapter_error = |message: String| ServeError::Adapter {
            name: spec.name.clone(),
            dir: spec.dir.clone(),
            message,
        };
        if spec.name == model_name || adapter_names.contains(&spec.name) {
            return Err(adapter_error(
                "the name is already taken (by the base model or another adapter)".into(),
            ));
        }
        adapters.push(attach_adapter(&loaded.model, &spec.dir).map_err(adapter_error)?);
        adapter_names.push(spec.name.clone());
    }

    let eos_token_ids = loaded.eos_token_ids();
    let vocab_size = loaded.config.vocab_size;
    let engine_config = EngineConfig {
        max_model_len,
        ..options.engine.clone()
    };
    let metrics = Arc::new(ServeMetrics::new(&model_name));
    let base_model = loaded.model.clone();
    let engine =
        start_engine(loaded.model, adapters, engine_config, metrics).map_err(ServeError::Engine)?;
    Ok(AppState::new(ApiConfig {
        engine,
        tokenizer: loaded.tokenizer,
        model_name,
        adapters: options.adapters.clone(),
        base_model,
        admin_key: options.admin_key.clone(),
        eos_token_ids,
        vocab_size,
        api_key: options.api_key.clone(),
        max_body_bytes: options.max_body_bytes,
    }))
}

/// A bound server, not yet serving.
#[derive(Debug)]
pub struct Server {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    state: AppState,
    shutdown: ShutdownOptions,
}

impl Server {
    /// Binds `addr` (port 0: any free port).
    pub async fn bind(state: AppState, addr: SocketAddr) -> Result<Self, ServeError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServeError::Bind { addr, source })?;
        Ok(Self {
            listener,
            addr,
            state,
            shutdown: ShutdownOptions::default(),
        })
    }

    /// How a stop drains (default: no delay, 30 s for requests in flight).
    pub fn with_shutdown(mut self, shutdown: ShutdownOptions) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// `listening on http://ADDR (model NAME, adapters [A, B])`: what `kiln serve` prints once
    /// bound (scripts wait for it).
    pub fn describe(&self) -> String {
        format!(
            "listening on http://{} (model {}, adapters [{}])",
            self.addr,
            self.state.model_name(),
            self.state.adapter_names().join(", ")
        )
    }

    /// Serves until `shutdown` resolves, then drains ([`kiln_http`]): `/ready` answers 503 at
    /// once, the listener closes after the drain delay, requests in flight (streams included)
    /// finish or are cut off at the deadline, and the engine stops.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let engine = self.state.engine().clone();
        let readiness = self.state.readiness().clone();
        let app = api::router(self.state);
        // Each token goes out as its own small write: without TCP_NODELAY, Nagle's algorithm
        // holds it until the previous one is acknowledged, and delayed ACKs make that up to
        // 40 ms (measured: TTFT p50 46 ms with it, 2.6 ms without).
        let listener = self.listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let served = kiln_http::serve_until(shutdown, &readiness, self.shutdown, |close| {
            axum::serve(listener, app)
                .with_graceful_shutdown(close)
                .into_future()
        })
        .await;
        engine.shutdown();
        if served.as_ref().is_ok_and(|d| *d == Drained::CutOff) {
            eprintln!(
                "kiln serve: requests still in flight after the {:.0} s shutdown timeout were cut off",
                self.shutdown.timeout.as_secs_f64()
            );
        }
        served.map(|_| ()).map_err(ServeError::Io)
    }
}

/// Serves `state` on `addr` on a tokio runtime of its own until `shutdown` resolves, then
/// drains as `drain` says (see [`Server::run`]), for callers without a runtime; `on_bound` runs
/// once the port is bound. `kiln serve` passes [`shutdown_signal`].
pub fn serve_blocking(
    state: AppState,
    addr: SocketAddr,
    drain: ShutdownOptions,
    on_bound: impl FnOnce(&Server),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kiln-serve-worker")
        .build()?;
    runtime.block_on(async move {
        let server = Server::bind(state, addr).await?.with_shutdown(drain);
        on_bound(&server);
        server.run(shutdown).await
    })
}

/// Resolves on Ctrl-C or SIGTERM.
pub use kiln_http::stop_signal as shutdown_signal;

/// A server running on its own thread and tokio runtime, for synchronous callers.
///
/// Dropping the handle asks the server to shut down (gracefully) without waiting for it;
/// [`ServerHandle::shutdown`] waits.
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    state: AppState,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), ServeError>>>,
}

impl ServerHandle {
    /// [`load`]s `options` and serves on `addr`; returns once the port is bound.
    pub fn start(options: &ServeOptions, addr: SocketAddr) -> Result<Self, ServeError> {
        Self::spawn(load(options)?, addr)
    }

    /// Serves an already loaded state on `addr`; returns once the port is bound. Safe to call
    /// from inside another tokio runtime (the server gets its own, on its own thread).
    pub fn spawn(state: AppState, addr: SocketAddr) -> Result<Self, ServeError> {
        Self::spawn_with(state, addr, ShutdownOptions::default())
    }

    /// [`ServerHandle::spawn`], draining as `drain` says when shut down.
    pub fn spawn_with(
        state: AppState,
        addr: SocketAddr,
        drain: ShutdownOptions,
    ) -> Result<Self, ServeError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread_state = state.clone();
        let thread = std::thread::Builder::new()
            .name("kiln-serve".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .thread_name("kiln-serve-worker")
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(ServeError::Io(e)));
                        return Ok(());
                    }
                };
                runtime.block_on(async move {
                    let server = match Server::bind(thread_state, addr).await {
                        Ok(server) => server.with_shutdown(drain),
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return Ok(());
                        }
                    };
                    let _ = ready_tx.send(Ok(server.local_addr()));
                    // A dropped handle (sender gone) stops the server as a signal does.
                    server
                        .run(async {
                            let _ = stop_rx.await;
                        })
                        .await
                })
            })?;
        let addr = match ready_rx.recv() {
            Ok(ready) => ready?,
            Err(_) => return Err(ServeError::Panicked),
        };
        Ok(Self {
            addr,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Stops accepting connections, waits for in-flight requests, stops the engine and joins
    /// the server thread.
    pub fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(thread) => thread.join().map_err(|_| ServeError::Panicked)?,
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
