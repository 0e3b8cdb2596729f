//! The lifecycle's `gateway` stage: `kiln gateway` in front of the served models, showing what
//! it is for — an authenticated request answered, an unauthenticated one refused, a repeated
//! deterministic request answered from the cache, and a burst cut off by the key's rate limit.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use kiln_gateway::config::GatewayConfig;
use kiln_gateway::server::GatewayHandle;
use serde::Serialize;

const KEY: &str = "lifecycle-demo-key";
/// The demo key's requests per minute: the burst sends more.
pub const RPM: usize = 6;
const BURST: usize = 10;

#[derive(Debug, Serialize)]
pub struct GatewayReport {
    /// Status and reply of a request with the key.
    pub authenticated_status: u16,
    pub authenticated_reply: String,
    /// Status of the same request without a key, and with a wrong one.
    pub no_key_status: u16,
    pub wrong_key_status: u16,
    /// `x-kiln-cache` of the first and the repeated request, and their latencies.
    pub first_cache: String,
    pub repeat_cache: String,
    pub first_ms: f64,
    pub repeat_ms: f64,
    /// The burst: requests sent, answered, refused with 429.
    pub burst: usize,
    pub burst_ok: usize,
    pub burst_429: usize,
    pub retry_after: Option<String>,
    /// What the gateway metered (from its /metrics): total cost in USD.
    pub cost_usd: f64,
}

/// Puts a gateway in front of `upstream` (a `kiln serve` URL) serving `model`, and runs the demo.
pub fn gateway_stage(upstream: &str, model: &str, out: &Path) -> Result<GatewayReport> {
    std::fs::create_dir_all(out)?;
    let yaml = format!(
        "listen: 127.0.0.1:0\n\
         upstreams:\n  - name: kiln-serve\n    url: {upstream}/v1\n    models: [\"*\"]\n    timeout_s: 60\n\
         auth:\n  api_keys:\n    - key: {KEY}\n      tenant: lifecycle\n      rpm: {RPM}\n\
         limits:\n  backend: memory\n\
         cache:\n  backend: memory\n  ttl_s: 600\n\
         pricing:\n  {model}:\n    input_per_million: 0.5\n    output_per_million: 1.5\n\
         store:\n  url: sqlite://{}\n",
        out.join("gateway.db").display()
    );
    let config_path = out.join("gateway.yaml");
    std::fs::write(&config_path, &yaml)?;
    let config = GatewayConfig::load(&config_path)?;
    let gateway = GatewayHandle::start(config).context("starting kiln gateway")?;
    let url = format!("{}/v1/chat/completions", gateway.url());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(async {
        let client = reqwest::Client::new();
        let body = serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": "What is 2 plus 3?"}],
            "max_tokens": 16,
            "temperature": 0,
        });
        let send = |key: Option<&'static str>, body: serde_json::Value| {
            let mut r = client.post(&url).json(&body);
            if let Some(k) = key {
                r = r.bearer_auth(k);
            }
            r.send()
        };
        let t = Instant::now();
        let first = send(Some(KEY), body.clone()).await?;
        let first_ms = t.elapsed().as_secs_f64() * 1e3;
        let authenticated_status = first.status().as_u16();
        let first_cache = cache_header(&first);
        let reply: serde_json::Value = first.json().await?;
        let authenticated_reply = reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let no_key_status = send(None, body.clone()).await?.status().as_u16();
        let wrong_key_status = send(Some("not-the-key"), body.clone())
            .await?
            .status()
            .as_u16();
        let t = Instant::now();
        let repeat = send(Some(KEY), body.clone()).await?;
        let repeat_ms = t.elapsed().as_secs_f64() * 1e3;
        let repeat_cache = cache_header(&repeat);

        let mut burst_ok = 0;
        let mut burst_429 = 0;
        let mut retry_after = None;
        for i in 0..BURST {
            let mut b = body.clone();
            b["messages"][0]["content"] = format!("What is {i} plus 3?").into();
            let r = send(Some(KEY), b).await?;
            match r.status().as_u16() {
                200 => burst_ok += 1,
                429 => {
                    burst_429 += 1;
                    retry_after = r
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                }
                s => anyhow::bail!("burst request {i}: unexpected status {s}"),
            }
        }
        let metrics = client
            .get(format!("{}/metrics", gateway.url()))
            .send()
            .await?
            .text()
            .await?;
        let cost_usd = crate::lifecycle_guard::metric(&metrics, "kiln_gateway_cost_usd_total", &[]);
        anyhow::Ok(GatewayReport {
            authenticated_status,
            authenticated_reply,
            no_key_status,
            wrong_key_status,
            first_cache,
            repeat_cache,
            first_ms,
            repeat_ms,
            burst: BURST,
            burst_ok,
            burst_429,
            retry_after,
            cost_usd,
        })
    })?;
    gateway.shutdown().context("stopping kiln gateway")?;
    Ok(report)
}

fn cache_header(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-kiln-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string()
}
