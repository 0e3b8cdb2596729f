//! The lifecycle's `deploy` stage: the aligned models as they run in production — two
//! inference replicas behind the gateway — and what operations need of them:
//!
//! 1. **Replicas.** A steady load through the gateway spreads over both replicas; mid-load one
//!    replica is stopped as SIGTERM stops it (readiness drops, it drains, its listener closes).
//!    The gateway's retry and failover must carry every request: none may be lost.
//! 2. **A draining gateway.** The gateway is stopped with a stream in flight: `/ready` must
//!    answer 503 at once, a request sent during the drain delay must still be served, and the
//!    stream must finish.
//!
//! Everything runs in process on loopback ports, with nothing installed; the replica test against
//! a shared Redis and PostgreSQL is `crates/kiln-cli/tests/replicas.rs`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kiln_gateway::config::GatewayConfig;
use kiln_gateway::server::{BuildOptions, GatewayHandle};
use kiln_http::ShutdownOptions;
use kiln_serve::server::ServerHandle;
use serde::Serialize;
use serde_json::json;

const KEY: &str = "lifecycle-deploy-key";
/// Requests in flight at once during the load.
const CONCURRENCY: usize = 8;

#[derive(Debug, Serialize)]
pub struct DeployStageReport {
    pub replicas: usize,
    /// Chat requests sent through the gateway (a third of the planned number before the stop,
    /// those sent while the replica drained, a third after it was gone), and how many got a 200.
    pub requests: usize,
    pub answered: usize,
    pub lost: usize,
    /// Requests answered when the first replica was told to stop.
    pub stopped_after: usize,
    /// Requests each replica answered (its own `kiln:request_success_total`).
    pub per_replica: Vec<u64>,
    /// Upstream errors the gateway absorbed by retrying and failing over
    /// (`kiln_gateway_upstream_errors_total`).
    pub upstream_errors_absorbed: u64,
    /// From the gateway's stop to `/ready` answering 503.
    pub ready_503_after_ms: f64,
    /// Status of a request sent while the gateway drained (its drain delay).
    pub served_while_draining: u16,
    /// Whether the stream in flight at the stop ended with `data: [DONE]`.
    pub stream_finished: bool,
    /// From the gateway's stop to its exit.
    pub drain_s: f64,
}

/// Two replicas of `base` (served as `base_name`, with `adapters`) behind a gateway, in `out`.
pub fn deploy_stage(
    base: &Path,
    base_name: &str,
    adapters: &[(&str, &Path)],
    model: &str,
    out: &Path,
    quick: bool,
) -> Result<DeployStageReport> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let options = crate::lifecycle_serve::serve_options(base, base_name, adapters);
    let replica_drain = ShutdownOptions {
        drain_delay: Duration::from_millis(200),
        timeout: Duration::from_secs(30),
    };
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let state = kiln_serve::server::load(&options).context("loading a replica")?;
        replicas.push(
            ServerHandle::spawn_with(state, loopback, replica_drain)
                .context("starting a replica")?,
        );
    }
    let metrics: Vec<_> = replicas
        .iter()
        .map(|r| r.state().engine().metrics().clone())
        .collect();
    let upstreams: String = replicas
        .iter()
        .enumerate()
        .map(|(i, r)| {
            format!(
                "  - name: replica-{}\n    url: {}/v1\n    models: [\"*\"]\n",
                i + 1,
                r.url()
            )
        })
        .collect();
    let yaml = format!(
        "listen: 127.0.0.1:0\n\
         upstreams:\n{upstreams}\
         auth:\n  api_keys:\n    - key: {KEY}\n      tenant: lifecycle\n\
         cache:\n  backend: none\n\
         store:\n  url: sqlite://{}\n",
        out.join("gateway.db").display()
    );
    let config_path = out.join("gateway.yaml");
    std::fs::write(&config_path, &yaml)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let config = GatewayConfig::load(&config_path)?;
    let gateway = GatewayHandle::start_with(
        config,
        BuildOptions {
            health_interval: Duration::from_millis(500),
            shutdown: ShutdownOptions {
                drain_delay: Duration::from_millis(500),
                timeout: Duration::from_secs(30),
            },
        },
    )
    .context("starting kiln gateway")?;
    let url = gateway.url();
    // Planned: a third before the stop, some during it, a third after.
    let requests = if quick { 48 } else { 96 };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::new();
    let chat = |max_tokens: usize, stream: bool| {
        client
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&json!({
                "model": model,
                "messages": [{"role": "user", "content": "Where does Ada live?"}],
                "max_tokens": max_tokens,
                "temperature": 0.7,
                "stream": stream,
            }))
    };

    // 1. A steady load. After a third of the planned requests the first replica is stopped
    //    (readiness drops, it drains, its listener closes); the load goes on through the stop
    //    and for another third once the replica is gone, all of which the survivor must take.
    let third = requests / 3;
    let sent = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    // Requests sent after the first replica was gone; usize::MAX while it still runs.
    let after_stop = Arc::new(AtomicUsize::new(usize::MAX));
    let first = replicas.remove(0);
    let stopped_after = runtime.block_on(async {
        let workers: Vec<_> = (0..CONCURRENCY)
            .map(|_| {
                let (sent, answered, after_stop) =
                    (sent.clone(), answered.clone(), after_stop.clone());
                let request = chat(16, false);
                tokio::spawn(async move {
                    loop {
                        let after = after_stop.load(Ordering::Relaxed);
                        if after != usize::MAX
                            && after_stop.fetch_add(1, Ordering::Relaxed) >= third
                        {
                            break;
                        }
                        let Some(request) = request.try_clone() else {
                            break;
                        };
                        sent.fetch_add(1, Ordering::Relaxed);
                        if let Ok(r) = request.send().await
                            && r.status().is_success()
                            && r.bytes().await.is_ok()
                        {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        // (A gateway that answers nothing still ends the stage, with everything counted lost.)
        while answered.load(Ordering::Relaxed) < third
            && sent.load(Ordering::Relaxed) < 4 * requests
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let stopped_after = answered.load(Ordering::Relaxed);
        let stopped = tokio::task::spawn_blocking(move || first.shutdown()).await;
        after_stop.store(0, Ordering::Relaxed);
        for w in workers {
            let _ = w.await;
        }
        let stopped =
            stopped.map_err(|_| anyhow::anyhow!("stopping the first replica panicked"))?;
        stopped.context("stopping the first replica")?;
        Ok::<_, anyhow::Error>(stopped_after)
    })?;
    let requests = sent.load(Ordering::Relaxed);
    let answered = answered.load(Ordering::Relaxed);
    let per_replica: Vec<u64> = metrics
        .iter()
        .map(|m| counter_sum(&m.render(), "kiln:request_success_total"))
        .collect();
    let upstream_errors_absorbed = counter_sum(
        &gateway.state().metrics().render(),
        "kiln_gateway_upstream_errors_total",
    );

    // 2. The gateway stops with a stream in flight.
    let drain = runtime.block_on(async {
        let mut stream = chat(32, true).send().await?.error_for_status()?;
        let mut body =
            String::from_utf8_lossy(&stream.chunk().await?.unwrap_or_default()).into_owned();
        let stopped = Instant::now();
        let stopping = std::thread::spawn(move || gateway.shutdown());
        let mut ready = 200;
        while ready == 200 && stopped.elapsed() < Duration::from_secs(5) {
            ready = client
                .get(format!("{url}/ready"))
                .send()
                .await?
                .status()
                .as_u16();
        }
        let ready_503_after_ms = stopped.elapsed().as_secs_f64() * 1e3;
        let served_while_draining = chat(4, false).send().await?.status().as_u16();
        while let Some(chunk) = stream.chunk().await? {
            body.push_str(&String::from_utf8_lossy(&chunk));
        }
        let stopping = tokio::task::spawn_blocking(move || stopping.join()).await?;
        stopping
            .map_err(|_| anyhow::anyhow!("the gateway's thread panicked"))?
            .context("stopping the gateway")?;
        anyhow::ensure!(
            ready == 503,
            "/ready answered {ready} while the gateway drained"
        );
        Ok::<_, anyhow::Error>((
            ready_503_after_ms,
            served_while_draining,
            body.trim_end().ends_with("data: [DONE]"),
            stopped.elapsed().as_secs_f64(),
        ))
    })?;
    for replica in replicas {
        replica.shutdown().context("stopping a replica")?;
    }
    let (ready_503_after_ms, served_while_draining, stream_finished, drain_s) = drain;
    Ok(DeployStageReport {
        replicas: 2,
        requests,
        answered,
        lost: requests - answered,
        stopped_after,
        per_replica,
        upstream_errors_absorbed,
        ready_503_after_ms,
        served_while_draining,
        stream_finished,
        drain_s,
    })
}

/// The sum of a counter's samples over all its labels, in Prometheus text.
fn counter_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// `31 + 17`: what each replica answered.
fn per_replica(r: &DeployStageReport) -> String {
    r.per_replica
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(" + ")
}

pub fn headline(r: &DeployStageReport) -> String {
    format!(
        "{} replicas behind the gateway, one drained mid-load after {} answers: {}/{} answered, {} lost ({} per replica, {} upstream errors absorbed); gateway stop: /ready 503 after {:.1} ms, a request while draining {}, stream in flight {}, drained in {:.1} s",
        r.replicas,
        r.stopped_after,
        r.answered,
        r.requests,
        r.lost,
        per_replica(r),
        r.upstream_errors_absorbed,
        r.ready_503_after_ms,
        r.served_while_draining,
        if r.stream_finished {
            "finished"
        } else {
            "CUT OFF"
        },
        r.drain_s
    )
}

/// The report's `deploy` section.
pub fn markdown(r: &DeployStageReport) -> String {
    format!(
        "\n## Deploy\n\n\
         Two `kiln serve` replicas of the SFT model (adapters `dpo`, `ppo`) behind one `kiln gateway`, \
         {} chat requests at {CONCURRENCY} in flight; the first replica was stopped as SIGTERM stops it \
         after {} answers.\n\n\
         | answered | lost | per replica | upstream errors absorbed by retry and failover |\n\
         |---|---|---|---|\n\
         | {}/{} | {} | {} | {} |\n\n\
         Then the gateway was stopped with a stream in flight: `/ready` answered 503 after {:.1} ms, \
         a request sent while it drained got {}, the stream {}, and it exited {:.1} s after the stop. \
         `docs/deploy.md` takes the same services to Docker Compose and Kubernetes.\n",
        r.requests,
        r.stopped_after,
        r.answered,
        r.requests,
        r.lost,
        per_replica(r),
        r.upstream_errors_absorbed,
        r.ready_503_after_ms,
        r.served_while_draining,
        if r.stream_finished {
            "finished"
        } else {
            "was cut off"
        },
        r.drain_s
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn counters_sum_over_labels_and_only_the_named_one() {
        let text = "# HELP kiln:request_success_total x\n\
                    kiln:request_success_total{finished_reason=\"stop\"} 3\n\
                    kiln:request_success_total{finished_reason=\"length\"} 4\n\
                    kiln:request_success_total_other 100\n";
        assert_eq!(counter_sum(text, "kiln:request_success_total"), 7);
        assert_eq!(counter_sum(text, "missing"), 0);
    }
}
