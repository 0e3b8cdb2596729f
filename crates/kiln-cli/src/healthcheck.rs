//! `kiln healthcheck [--url URL]`: exit 0 when the URL answers 2xx within the timeout, 1
//! otherwise. The container image's HEALTHCHECK runs it, so the image needs no curl.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args, Debug)]
#[command(
    after_help = "Example (the Dockerfile's HEALTHCHECK; compose and Kubernetes probe /ready and /live):\n  kiln healthcheck --url http://127.0.0.1:8000/ready"
)]
pub struct HealthcheckArgs {
    /// What to GET: /live (the process answers) or /ready (it takes traffic) of kiln serve
    /// (port 8000), kiln gateway or kiln up (port 8080).
    #[arg(
        long,
        value_name = "URL",
        env = "KILN_HEALTHCHECK_URL",
        default_value = "http://127.0.0.1:8080/live"
    )]
    url: String,

    /// The longest wait for the answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 3.0)]
    timeout: f64,
}

pub fn run(args: HealthcheckArgs) -> Result<()> {
    let timeout = Duration::try_from_secs_f64(args.timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .with_context(|| format!("--timeout: expected seconds > 0, got {}", args.timeout))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let status = runtime.block_on(async {
        let client = reqwest::Client::builder().timeout(timeout).build()?;
        client.get(&args.url).send().await.map(|r| r.status())
    });
    match status {
        Ok(status) if status.is_success() => {
            println!("kiln healthcheck: {} {status}", args.url);
            Ok(())
        }
        Ok(status) => anyhow::bail!("{} answered {status}", args.url),
        Err(e) => anyhow::bail!("{}: {e}", args.url),
    }
}
