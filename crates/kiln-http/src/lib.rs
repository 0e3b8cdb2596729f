//! What kiln's HTTP services (`kiln serve`, `kiln gateway`, `kiln up`) share about their own
//! lifecycle: readiness, the stop signal, and graceful draining under a deadline.
//!
//! A stop (SIGTERM, Ctrl-C, or a handle's shutdown) goes in three steps, as an instance behind a
//! load balancer or in Kubernetes needs them:
//!
//! 1. **Readiness drops.** [`Readiness::is_ready`] turns false, so `GET /ready` answers 503 and
//!    the balancer (or the kubelet's readiness probe) takes the instance out of rotation. Every
//!    other route keeps being served, new connections included.
//! 2. **After `drain_delay`** — the time the balancer needs to notice — the listener closes and
//!    idle keep-alive connections are dropped.
//! 3. **Requests in flight finish**, streams included, or are cut off once `timeout` has passed
//!    since the listener closed: a stuck client cannot hold a deploy hostage.
//!
//! [`serve_until`] runs a server future through these steps; [`stop_signal`] is the usual stop.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;

/// Whether the instance should get traffic: true from start until a stop begins. Cheap to
/// clone; clones share the flag.
#[derive(Debug, Clone)]
pub struct Readiness(Arc<AtomicBool>);

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    /// Ready.
    pub fn new() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// From now on the instance is draining: not ready, for good.
    pub fn set_draining(&self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// How a stop drains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShutdownOptions {
    /// How long the instance keeps serving, not ready, before it stops accepting connections.
    pub drain_delay: Duration,
    /// How long requests in flight may take to finish once it stopped accepting.
    pub timeout: Duration,
}

/// Seconds requests in flight get to finish by default (`--shutdown-timeout`).
pub const DEFAULT_SHUTDOWN_TIMEOUT_S: f64 = 30.0;

impl Default for ShutdownOptions {
    fn default() -> Self {
        Self {
            drain_delay: Duration::ZERO,
            timeout: Duration::from_secs_f64(DEFAULT_SHUTDOWN_TIMEOUT_S),
        }
    }
}

impl ShutdownOptions {
    /// From the command line's seconds (`--drain-delay`, `--shutdown-timeout`), which must be
    /// finite and not negative.
    pub fn from_secs(drain_delay: f64, timeout: f64) -> Result<Self, String> {
        let secs = |flag: &str, s: f64| {
            Duration::try_from_secs_f64(s)
                .map_err(|_| format!("{flag}: expected seconds >= 0, got {s}"))
        };
        Ok(Self {
            drain_delay: secs("--drain-delay", drain_delay)?,
            timeout: secs("--shutdown-timeout", timeout)?,
        })
    }
}

/// How a server run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every request in flight finished (or the server stopped by itself).
    Completed,
    /// The deadline passed with requests still in flight; they were cut off.
    CutOff,
}

/// The future a server is handed to learn when to stop accepting (axum's
/// `with_graceful_shutdown` takes it).
pub type CloseSignal = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Runs the server that `serve` builds until `stop` resolves, then drains it (see the module
/// docs): readiness drops at once, the server's [`CloseSignal`] fires after the drain delay,
/// and the server future is dropped — cutting off what is still in flight — if it has not
/// finished `timeout` later.
pub async fn serve_until<F, E>(
    stop: impl Future<Output = ()>,
    readiness: &Readiness,
    options: ShutdownOptions,
    serve: impl FnOnce(CloseSignal) -> F,
) -> Result<Drained, E>
where
    F: Future<Output = Result<(), E>>,
{
    let (close_tx, close_rx) = oneshot::channel::<()>();
    let served = serve(Box::pin(async move {
        let _ = close_rx.await;
    }));
    let readiness = readiness.clone();
    let deadline = async move {
        stop.await;
        readiness.set_draining();
        if !options.drain_delay.is_zero() {
            tokio::time::sleep(options.drain_delay).await;
        }
        let _ = close_tx.send(());
        tokio::time::sleep(options.timeout).await;
    };
    tokio::select! {
        served = served => served.map(|()| Drained::Completed),
        () = deadline => Ok(Drained::CutOff),
    }
}

/// Resolves on Ctrl-C or SIGTERM (what `docker stop` and Kubernetes send).
pub async fn stop_signal() {
    let ctrl_c = async {
        // If the handler cannot be installed, Ctrl-C keeps its default (kill) behaviour.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    /// A stand-in server: serves until closed, then takes `finish` to let its last request end.
    async fn server(close: CloseSignal, finish: Duration) -> Result<(), ()> {
        close.await;
        tokio::time::sleep(finish).await;
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_drops_before_the_listener_closes() {
        let readiness = Readiness::new();
        let options = ShutdownOptions {
            drain_delay: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
        };
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let closed_at = Arc::new(std::sync::Mutex::new(None));
        let probe = readiness.clone();
        let closed = closed_at.clone();
        let run = tokio::spawn(async move {
            serve_until(
                async {
                    let _ = stop_rx.await;
                },
                &probe,
                options,
                |close| async move {
                    close.await;
                    *closed.lock().map_err(|_| ())? = Some(Instant::now());
                    Ok::<(), ()>(())
                },
            )
            .await
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(readiness.is_ready());
        let stopped = Instant::now();
        stop_tx.send(()).map_err(|_| "stop").expect("running");
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!readiness.is_ready(), "readiness drops at once");
        assert!(closed_at.lock().expect("lock").is_none(), "still accepting");
        let outcome = run.await.expect("joined");
        assert_eq!(outcome, Ok(Drained::Completed));
        let closed = closed_at.lock().expect("lock").expect("closed");
        assert_eq!(closed - stopped, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_finishing_in_time_complete_and_late_ones_are_cut_off() {
        let options = ShutdownOptions {
            drain_delay: Duration::ZERO,
            timeout: Duration::from_secs(10),
        };
        let quick = serve_until(async {}, &Readiness::new(), options, |close| {
            server(close, Duration::from_secs(9))
        })
        .await;
        assert_eq!(quick, Ok(Drained::Completed));
        let started = Instant::now();
        let slow = serve_until(async {}, &Readiness::new(), options, |close| {
            server(close, Duration::from_secs(3600))
        })
        .await;
        assert_eq!(slow, Ok(Drained::CutOff));
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[test]
    fn options_come_from_seconds() {
        let o = ShutdownOptions::from_secs(2.5, 30.0).expect("valid");
        assert_eq!(o.drain_delay, Duration::from_millis(2500));
        assert!(
            ShutdownOptions::from_secs(-1.0, 30.0)
                .unwrap_err()
                .contains("--drain-delay")
        );
        assert!(
            ShutdownOptions::from_secs(0.0, f64::NAN)
                .unwrap_err()
                .contains("--shutdown-timeout")
        );
    }
}
