//! The gateway's overhead: latency through `kiln gateway` against latency straight to the same
//! upstream, at 1, 64 and 256 concurrent connections, with authentication (an API key), rate
//! limits (memory backend) and the response cache (memory backend, every request a miss that is
//! then stored) all on.
//!
//! `cargo bench -p kiln-gateway --bench overhead` starts a stub OpenAI upstream that answers every
//! chat completion at once with a fixed body, the gateway in front of it, and a closed-loop client
//! (C workers, each sending its next request when the last one is answered). All three share the
//! machine's cores, so the figures include the client's cost; the overhead column is the
//! gateway's own time per request as its `kiln_gateway_overhead_seconds` histogram records it
//! (mean), beside the client-side difference of the medians.
//!
//! `KILN_BENCH_GUARDRAILS=1` turns the guardrails on as well: a system prompt with a canary,
//! PII redaction in and out, the injection heuristics, the system-prompt leak check (no
//! classifier), so the difference of the two runs is what they cost a request.
//!
//! Monitoring is on, as it is by default: traces with the latency split and the reply's
//! confidence, drift features, the dashboard's series and the monitoring metrics.
//! `KILN_BENCH_MONITOR=0` turns it off (`monitor.enabled: false`), so the difference of the two
//! runs is what monitoring costs a request.
//!
//! `KILN_BENCH_PEER=URL` also loads another proxy already running in front of the stub (for
//! LiteLLM: point its `api_base` at the port printed as `stub:`; `KILN_BENCH_STUB_PORT` fixes it;
//! `KILN_BENCH_PEER_KEY` is the bearer token sent to it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use kiln_gateway::config::GatewayConfig;
use kiln_gateway::server::GatewayHandle;

const KEY: &str = "bench-key";

fn stub_response() -> serde_json::Value {
    serde_json::json!({
        "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": "stub",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                     "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}
    })
}

/// Starts the stub upstream on its own runtime; returns its address.
fn start_stub(port: u16) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let body = Arc::new(stub_response());
            let app = Router::new().route(
                "/v1/chat/completions",
                post(move || {
                    let body = body.clone();
                    async move { axum::Json((*body).clone()) }
                }),
            );
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

struct Run {
    p50_ms: f64,
    p99_ms: f64,
    rps: f64,
    errors: usize,
}

/// `total` chat completions to `url` with `concurrency` in flight; each prompt differs.
fn load(url: &str, concurrency: usize, total: usize, key: Option<&str>) -> Run {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(concurrency)
            .build()
            .unwrap();
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                let (client, next) = (client.clone(), next.clone());
                let url = format!("{url}/v1/chat/completions");
                let key = key.map(str::to_string);
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut errors = 0;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= total {
                            return (latencies, errors);
                        }
                        let body = serde_json::json!({
                            "model": "stub", "temperature": 0, "max_tokens": 8,
                            "messages": [{"role": "user", "content": format!("What is the capital of country {i}?")}],
                        });
                        let mut request = client.post(&url).json(&body);
                        if let Some(k) = &key {
                            request = request.bearer_auth(k);
                        }
                        let t = Instant::now();
                        match request.send().await {
                            Ok(r) if r.status().is_success() => {
                                let _ = r.bytes().await;
                                latencies.push(t.elapsed());
                            }
                            _ => errors += 1,
                        }
                    }
                })
            })
            .collect();
        let mut all: Vec<Duration> = Vec::with_capacity(total);
        let mut errors = 0;
        for w in workers {
            let (l, e) = w.await.unwrap();
            all.extend(l);
            errors += e;
        }
        let wall = started.elapsed().as_secs_f64();
        all.sort_unstable();
        let pct = |p: f64| {
            all.get(((all.len() as f64 - 1.0) * p).round() as usize)
                .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
        };
        Run {
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            rps: all.len() as f64 / wall,
            errors,
        }
    })
}

/// The sum of every series of metric `name` in Prometheus text.
fn metric_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

const GUARDRAILS: &str = "guardrails:
  system_prompt: You are a helpful assistant for a geography quiz. Answer briefly.
  input:
    pii: {action: redact}
    injection: {action: block}
  output:
    pii: {action: redact}
    system_prompt_leak: {action: block}
";

fn main() {
    let port = std::env::var("KILN_BENCH_STUB_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let stub = start_stub(port);
    let dir = tempfile::tempdir().unwrap();
    let guardrails = std::env::var("KILN_BENCH_GUARDRAILS").is_ok_and(|v| v == "1");
    let monitor = !std::env::var("KILN_BENCH_MONITOR").is_ok_and(|v| v == "0");
    let yaml = format!(
        "listen: 127.0.0.1:0\n\
         upstreams:\n  - name: stub\n    url: http://{stub}/v1\n    models: [\"*\"]\n\
         auth:\n  api_keys:\n    - key: {KEY}\n      tenant: bench\n      rpm: 100000000\n      tpm: 100000000000\n\
         limits:\n  backend: memory\n\
         cache:\n  backend: memory\n  ttl_s: 60\n  max_entries: 100000\n\
         pricing:\n  stub:\n    input_per_million: 0.5\n    output_per_million: 1.5\n\
         store:\n  url: sqlite://{}\n\
         monitor:\n  enabled: {monitor}\n{}",
        dir.path().join("gateway.db").display(),
        if guardrails { GUARDRAILS } else { "" }
    );
    let config = GatewayConfig::parse(&yaml, std::path::Path::new("bench.yaml")).unwrap();
    let gateway = GatewayHandle::start(config).unwrap();
    let gw_url = gateway.url();
    let stub_url = format!("http://{stub}");
    let peer = std::env::var("KILN_BENCH_PEER").ok();
    println!(
        "setup: stub: {stub}; gateway {gw_url} with API-key auth, memory rate limits, memory cache (every request a miss, then stored), sqlite store, monitoring {}{}; {} CPU threads shared by client, gateway and stub",
        if monitor { "on" } else { "off" },
        if guardrails {
            ", guardrails (PII in and out, injection heuristics, leak check)"
        } else {
            ""
        },
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    // Warm both paths (connections, caches, the store).
    load(&stub_url, 8, 400, None);
    load(&gw_url, 8, 400, Some(KEY));
    println!(
        "{:>11} | {:>22} | {:>22} | {:>10} | {:>22}",
        "concurrency",
        "direct p50 / p99 ms",
        "gateway p50 / p99 ms",
        "gateway rps",
        "overhead mean / Δp50 ms"
    );
    let metrics_url = format!("{gw_url}/metrics");
    let metrics = || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            reqwest::get(&metrics_url)
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        })
    };
    for (concurrency, total) in [(1usize, 2000usize), (64, 8000), (256, 8000)] {
        let direct = load(&stub_url, concurrency, total, None);
        let before = metrics();
        let via = load(&gw_url, concurrency, total, Some(KEY));
        let after = metrics();
        // The mean over this run alone: difference of sums over difference of counts.
        let overhead = {
            let delta = |n: &str| metric_sum(&after, n) - metric_sum(&before, n);
            let count = delta("kiln_gateway_overhead_seconds_count");
            if count > 0.0 {
                delta("kiln_gateway_overhead_seconds_sum") / count * 1e3
            } else {
                f64::NAN
            }
        };
        println!(
            "{concurrency:>11} | {:>10.3} / {:>9.3} | {:>10.3} / {:>9.3} | {:>10.0} | {:>10.3} / {:>9.3}{}",
            direct.p50_ms,
            direct.p99_ms,
            via.p50_ms,
            via.p99_ms,
            via.rps,
            overhead,
            via.p50_ms - direct.p50_ms,
            if via.errors + direct.errors > 0 {
                format!("  ({} errors)", via.errors + direct.errors)
            } else {
                String::new()
            }
        );
        if let Some(peer) = &peer {
            let peer_key = std::env::var("KILN_BENCH_PEER_KEY").unwrap_or_else(|_| KEY.into());
            let p = load(peer, concurrency, total, Some(&peer_key));
            println!(
                "{:>11} | peer {peer}: p50 {:.3} ms, p99 {:.3} ms, {:.0} rps, {} errors",
                "", p.p50_ms, p.p99_ms, p.rps, p.errors
            );
        }
    }
    gateway.shutdown().unwrap();
}
