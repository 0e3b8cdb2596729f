//! The Memcached backend: `get` / `set` of the text protocol over a small pool of connections.
//!
//! The protocol (memcached's `doc/protocol.txt`) needs two commands here, so it is spoken
//! directly rather than through a client crate:
//!
//! ```text
//! get <key>\r\n                            → VALUE <key> <flags> <bytes>\r\n<data>\r\nEND\r\n | END\r\n
//! set <key> <flags> <exptime> <bytes>\r\n<data>\r\n  → STORED\r\n
//! ```
//!
//! A connection that errs or times out mid-exchange is dropped, never returned to the pool, so a
//! half-read reply cannot be mistaken for the next one.

use std::io;
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::TcpStream;

use super::{Backoff, CONNECT_TIMEOUT, CacheError, NAMESPACE};

/// Idle connections kept for reuse.
const POOL_SIZE: usize = 32;
/// memcached reads an expiry beyond 30 days as a Unix time; longer TTLs are capped to it.
const MAX_RELATIVE_EXPIRY_S: u64 = 30 * 24 * 3600;
/// The largest value accepted from the server (memcached's default item limit is 1 MiB).
const MAX_VALUE_BYTES: usize = 64 << 20;
/// The longest protocol line accepted from the server.
const MAX_LINE_BYTES: usize = 4096;

pub(super) struct MemcachedCache {
    /// `host:port`.
    addr: String,
    idle: Mutex<Vec<Conn>>,
    backoff: Backoff,
}

impl MemcachedCache {
    /// `url` is `memcache://host[:port]` or `memcached://host[:port]` (port 11211 by default).
    pub(super) fn new(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("memcache://")
            .or_else(|| url.strip_prefix("memcached://"))
            .ok_or_else(|| {
                anyhow::anyhow!("cache.url: `{url}` is not a Memcached URL (memcache://host:port)")
            })?;
        let host_port = rest.split('/').next().unwrap_or_default();
        if host_port.is_empty() {
            anyhow::bail!("cache.url: `{url}` names no host (memcache://host:port)");
        }
        let has_port = match host_port.rfind(':') {
            Some(colon) => {
                !host_port.ends_with(']') && host_port[colon + 1..].parse::<u16>().is_ok()
            }
            None => false,
        };
        let addr = if has_port {
            host_port.to_string()
        } else {
            format!("{host_port}:11211")
        };
        Ok(Self {
            addr,
            idle: Mutex::new(Vec::new()),
            backoff: Backoff::new(),
        })
    }

    pub(super) fn addr(&self) -> &str {
        &self.addr
    }

    pub(super) fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// Opens one connection and parks it in the pool (start-up check).
    pub(super) async fn warm_up(&self) -> Result<(), CacheError> {
        let conn = self.checkout().await?;
        self.checkin(conn);
        Ok(())
    }

    pub(super) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        self.check_key(key)?;
        let mut conn = self.checkout().await?;
        let value = conn
            .get(&format!("{NAMESPACE}{key}"))
            .await
            .map_err(|e| self.error(format!("get: {e}")))?;
        self.checkin(conn);
        Ok(value)
    }

    pub(super) async fn put(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), CacheError> {
        self.check_key(key)?;
        let mut conn = self.checkout().await?;
        let exptime = ttl.as_secs().clamp(1, MAX_RELATIVE_EXPIRY_S);
        let stored = conn
            .set(&format!("{NAMESPACE}{key}"), value, exptime)
            .await
            .map_err(|e| self.error(format!("set: {e}")))?;
        self.checkin(conn);
        stored.map_err(|reply| CacheError::Rejected {
            key: key.to_string(),
            message: format!("memcached answered `{reply}` to {} bytes", value.len()),
        })
    }

    async fn checkout(&self) -> Result<Conn, CacheError> {
        if let Some(conn) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(conn);
        }
        if !self.backoff.may_try() {
            return Err(CacheError::Backoff {
                backend: "memcached",
                addr: self.addr.clone(),
            });
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr)).await {
            Ok(Ok(stream)) => {
                // Requests are small and answered one at a time: no Nagle delay.
                let _ = stream.set_nodelay(true);
                self.backoff.succeeded();
                Ok(Conn {
                    stream,
                    buf: Vec::with_capacity(4096),
                })
            }
            Ok(Err(e)) => {
                self.backoff.failed();
                Err(self.error(format!("cannot connect: {e}")))
            }
            Err(_) => {
                self.backoff.failed();
                Err(self.error(format!("cannot connect within {CONNECT_TIMEOUT:?}")))
            }
        }
    }

    fn checkin(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < POOL_SIZE {
            idle.push(conn);
        }
    }

    /// memcached keys are at most 250 bytes, without spaces or control characters.
    fn check_key(&self, key: &str) -> Result<(), CacheError> {
        if NAMESPACE.len() + key.len() <= 250 && key.bytes().all(|b| b.is_ascii_graphic()) {
            Ok(())
        } else {
            Err(CacheError::Rejected {
                key: key.to_string(),
                message: "not a valid memcached key".into(),
            })
        }
    }

    fn error(&self, message: String) -> CacheError {
        CacheError::Backend {
            backend: "memcached",
            addr: self.addr.clone(),
            message,
        }
    }
}

/// One connection and the bytes read from it but not yet consumed.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn get(&mut self, key: &str) -> io::Result<Option<Vec<u8>>> {
        self.write_all(format!("get {key}\r\n").as_bytes()).await?;
        let line = self.read_line().await?;
        if line == "END" {
            return Ok(None);
        }
        // VALUE <key> <flags> <bytes> [<cas>]
        let fields: Vec<&str> = line.split(' ').collect();
        let len = match fields.as_slice() {
            ["VALUE", k, _flags, bytes, ..] if *k == key => bytes.parse::<usize>().ok(),
            _ => None,
        };
        let Some(len) = len.filter(|&n| n <= MAX_VALUE_BYTES) else {
            return Err(protocol_error(&line));
        };
        let mut data = self.read_exact(len + 2).await?;
        if !data.ends_with(b"\r\n") {
            return Err(protocol_error("a value not followed by \\r\\n"));
        }
        data.truncate(len);
        let end = self.read_line().await?;
        if end != "END" {
            return Err(protocol_error(&end));
        }
        Ok(Some(data))
    }

    /// `Ok(Err(reply))` when the server refused this item (too large, out of memory) but the
    /// connection is still in step.
    async fn set(
        &mut self,
        key: &str,
        value: &[u8],
        exptime: u64,
    ) -> io::Result<Result<(), String>> {
        let mut request = format!("set {key} 0 {exptime} {}\r\n", value.len()).into_bytes();
        request.extend_from_slice(value);
        request.extend_from_slice(b"\r\n");
        self.write_all(&request).await?;
        let line = self.read_line().await?;
        if line == "STORED" {
            Ok(Ok(()))
        } else if line == "NOT_STORED" || line.starts_with("SERVER_ERROR ") {
            // memcached reads (and drops) the whole value before it answers these.
            Ok(Err(line))
        } else {
            Err(protocol_error(&line))
        }
    }

    async fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            self.stream.writable().await?;
            match self.stream.try_write(bytes) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads more bytes into `buf`; an orderly close is an error (a reply was expected).
    async fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 8192];
        loop {
            self.stream.readable().await?;
            match self.stream.try_read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// One `\r\n`-terminated line, without the terminator.
    async fn read_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..at]).into_owned();
                self.buf.drain(..at + 2);
                return Ok(line);
            }
            if self.buf.len() > MAX_LINE_BYTES {
                return Err(protocol_error("a reply line longer than 4 KiB"));
            }
            self.fill().await?;
        }
    }

    async fn read_exact(&mut self, len: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < len {
            self.fill().await?;
        }
        let rest = self.buf.split_off(len);
        Ok(std::mem::replace(&mut self.buf, rest))
    }
}

fn protocol_error(reply: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "unexpected reply `{}`",
            reply.chars().take(200).collect::<String>()
        ),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn urls_name_host_and_port() {
        assert_eq!(
            MemcachedCache::new("memcache://127.0.0.1:11311")
                .unwrap()
                .addr,
            "127.0.0.1:11311"
        );
        assert_eq!(
            MemcachedCache::new("memcached://cache/").unwrap().addr,
            "cache:11211"
        );
        let err = MemcachedCache::new("redis://x").err().unwrap().to_string();
        assert!(err.contains("cache.url"), "{err}");
    }
}
