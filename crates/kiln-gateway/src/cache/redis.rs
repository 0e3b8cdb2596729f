//! The Redis backend: `GET` / `SET … EX` on `kiln:cache:<key>`, shared by every gateway replica.

use std::sync::RwLock;
use std::time::Duration;

use anyhow::Context as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Backoff, CONNECT_TIMEOUT, CacheError, NAMESPACE, OP_TIMEOUT};

/// A lazily connected [`ConnectionManager`] (which then reconnects by itself). Lookups never
/// wait for a connection attempt another lookup is making: they miss instead. After a failed
/// command, lookups miss without asking Redis until the back-off has passed, so an outage costs
/// one slow lookup a second rather than every lookup.
pub(super) struct RedisCache {
    client: redis::Client,
    addr: String,
    conn: RwLock<Option<ConnectionManager>>,
    connecting: tokio::sync::Mutex<()>,
    backoff: Backoff,
}

impl RedisCache {
    pub(super) fn new(url: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).with_context(|| {
            format!("cache.url: `{url}` is not a Redis URL (redis://host:port)")
        })?;
        Ok(Self {
            client,
            addr: super::redact(url),
            conn: RwLock::new(None),
            connecting: tokio::sync::Mutex::new(()),
            backoff: Backoff::new(),
        })
    }

    pub(super) fn addr(&self) -> &str {
        &self.addr
    }

    pub(super) fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// The shared connection, made now if there is none (and no attempt is under way or failed
    /// within the back-off window).
    pub(super) async fn connect(&self) -> Result<ConnectionManager, CacheError> {
        if let Some(conn) = self.conn.read().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(conn);
        }
        let Ok(_guard) = self.connecting.try_lock() else {
            // Another lookup is connecting: miss now rather than wait for it.
            return Err(self.backing_off());
        };
        if let Some(conn) = self.conn.read().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(conn);
        }
        if !self.backoff.may_try() {
            return Err(self.backing_off());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(OP_TIMEOUT)
            // One attempt per try: our own back-off spaces the tries out.
            .set_number_of_retries(0);
        let made = tokio::time::timeout(
            CONNECT_TIMEOUT * 2,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await;
        match made {
            Ok(Ok(conn)) => {
                self.backoff.succeeded();
                *self.conn.write().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
                Ok(conn)
            }
            Ok(Err(e)) => {
                self.backoff.failed();
                Err(self.error(format!("cannot connect: {e}")))
            }
            Err(_) => {
                self.backoff.failed();
                Err(self.error(format!("cannot connect within {:?}", CONNECT_TIMEOUT * 2)))
            }
        }
    }

    pub(super) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let mut get = redis::cmd("GET");
        get.arg(format!("{NAMESPACE}{key}"));
        self.run(&get, "GET").await
    }

    pub(super) async fn put(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), CacheError> {
        let mut set = redis::cmd("SET");
        set.arg(format!("{NAMESPACE}{key}"))
            .arg(value)
            .arg("EX")
            .arg(ttl.as_secs().max(1));
        self.run(&set, "SET").await
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        name: &str,
    ) -> Result<T, CacheError> {
        if !self.backoff.may_try() {
            return Err(self.backing_off());
        }
        let mut conn = self.connect().await?;
        match cmd.query_async::<T>(&mut conn).await {
            Ok(value) => Ok(value),
            // The connection manager answers the first command after an outage with the
            // outage's error while it reconnects; the reconnect it started may be done already.
            Err(e) if e.is_io_error() => cmd
                .query_async::<T>(&mut conn)
                .await
                .map_err(|e| self.error(format!("{name}: {e}"))),
            Err(e) => Err(self.error(format!("{name}: {e}"))),
        }
    }

    fn error(&self, message: String) -> CacheError {
        CacheError::Backend {
            backend: "redis",
            addr: self.addr.clone(),
            message,
        }
    }

    fn backing_off(&self) -> CacheError {
        CacheError::Backoff {
            backend: "redis",
            addr: self.addr.clone(),
        }
    }
}
