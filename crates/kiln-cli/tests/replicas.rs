//! kiln scales out by replicas: two `kiln serve` and two `kiln gateway` processes on loopback,
//! sharing one Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`) and one PostgreSQL
//! (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`), with a client that picks
//! a gateway round-robin the way a load balancer would. The test proves that
//!
//! 1. requests spread over both inference replicas (each serve's own `/metrics`) and both
//!    gateways (each gateway's own `/metrics`);
//! 2. one key's `rpm` is one limit across the gateways: `R + k` requests alternating gateways
//!    get exactly `R` answers and `k` refusals;
//! 3. the response cache is shared: a reply cached through one gateway is a hit through the other;
//! 4. every answer has exactly one trace in PostgreSQL (found by its completion id, matched by
//!    its `x-request-id`), and feedback sent through the second gateway on a completion the
//!    first one answered is accepted and kept exactly once;
//! 5. SIGKILLing one serve and then one gateway in the middle of a steady load loses no request:
//!    the gateways fail over to the surviving serve, the client retries a broken connection on
//!    the other gateway, and every request ends 200.
//!
//! A second test pins the failover that (5) relies on without depending on when the kill lands:
//! an upstream that reads a request and closes the connection before any reply header is
//! retried and failed over to the next upstream.
//!
//! Redis and PostgreSQL are shared with other tests: every key, tenant and prompt carries this
//! run's random tag, and every assertion is filtered by it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use kiln_monitor::feedback::Thumbs;
use kiln_monitor::store::{RequestRecord, Store};
use serde_json::{Value, json};

/// Requests per minute of the rate-limited key.
const RPM: usize = 4;
/// Requests past the limit.
const OVER: usize = 3;
/// Concurrent clients of the load phase, and requests each sends.
const CLIENTS: usize = 8;
const PER_CLIENT: usize = 12;
/// How long traces may take to be settled into PostgreSQL.
const SETTLE: Duration = Duration::from_secs(20);

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A `kiln` process on a free port, killed when dropped (a failing assertion included). Its
/// stderr goes to `LOG_DIR/NAME.log`, quoted by [`Proc::log`] in failure messages.
struct Proc {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Proc {
    /// Starts `kiln ARGS` and waits for `… listening on http://ADDR …` on its stdout.
    fn start(name: &str, log_dir: &Path, args: &[&str]) -> Self {
        let log = log_dir.join(format!("{name}.log"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let Some(at) = line.find("http://") else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{name} printed {line:?} instead of its address; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        let addr = line[at + "http://".len()..]
            .chars()
            .take_while(|c| !c.is_whitespace())
            .collect();
        Self { child, addr, log }
    }

    fn serve(name: &str, log_dir: &Path) -> Self {
        let model = testdata().join("hf/llama");
        Self::start(
            name,
            log_dir,
            &[
                "serve",
                "--model",
                model.to_str().unwrap(),
                "--served-model-name",
                "llama",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
            ],
        )
    }

    fn gateway(name: &str, log_dir: &Path, config: &Path) -> Self {
        let config = config.to_str().unwrap();
        Self::start(
            name,
            log_dir,
            &["gateway", "--config", config, "--listen", "127.0.0.1:0"],
        )
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGKILL, and reap it.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The sum of every sample of `metric` whose labels contain all of `labels` (`k="v"` each).
fn metric_sum(text: &str, metric: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metrics(client: &reqwest::Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// One chat completion's answer as the client saw it.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    /// Which gateway (index) answered.
    gateway: usize,
    request_id: String,
    /// The reply's `id`, for a 200.
    completion_id: Option<String>,
    cache: Option<String>,
    body: Value,
    /// Connection errors retried on the other gateway before this answer.
    retries: usize,
}

/// The client: gateways picked round-robin, like a load balancer; a connection error (or a
/// reply cut off before its body was read) is retried on the next gateway.
struct Client {
    http: reqwest::Client,
    gateways: Vec<String>,
    next: AtomicUsize,
}

impl Client {
    /// `POST /v1/chat/completions` through the next gateway in turn.
    async fn chat(&self, key: &str, body: &Value) -> Answer {
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        self.chat_from(first, key, body).await
    }

    /// The same through gateway `first` (then the others, on connection errors).
    async fn chat_from(&self, first: usize, key: &str, body: &Value) -> Answer {
        let mut errors = Vec::new();
        for retries in 0..4 {
            let gateway = (first + retries) % self.gateways.len();
            let url = format!("{}/v1/chat/completions", self.gateways[gateway]);
            let sent = self.http.post(url).bearer_auth(key).json(body).send().await;
            let response = match sent {
                Ok(r) => r,
                Err(e) => {
                    errors.push(format!("gateway {gateway}: {e}"));
                    continue;
                }
            };
            let status = response.status().as_u16();
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(String::from)
            };
            let request_id = header("x-request-id").unwrap_or_default();
            let cache = header("x-kiln-cache");
            let body: Value = match response.bytes().await {
                Ok(b) => serde_json::from_slice(&b).unwrap_or(Value::Null),
                Err(e) => {
                    errors.push(format!("gateway {gateway}, reading the reply: {e}"));
                    continue;
                }
            };
            let completion_id = (status == 200)
                .then(|| body["id"].as_str().map(String::from))
                .flatten();
            return Answer {
                status,
                gateway,
                request_id,
                completion_id,
                cache,
                body,
                retries,
            };
        }
        panic!("no gateway answered: {errors:?}");
    }

    /// `POST /v1/feedback` through gateway `gateway`.
    async fn feedback(&self, gateway: usize, key: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/feedback", self.gateways[gateway]))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }
}

/// A short non-streamed chat request; `temperature` 0 makes it cacheable.
fn chat_body(prompt: &str, temperature: f64) -> Value {
    json!({
        "model": "llama",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 4,
        "temperature": temperature,
    })
}

/// The gateway config: both serves as upstreams of `llama`, the run's keys, and the shared
/// Redis (limits, cache) and PostgreSQL (traces, content, feedback).
fn gateway_config(serves: &[&Proc], tag: &str) -> String {
    let upstreams: String = serves
        .iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                "  - name: serve-{i}\n    url: http://{}/v1\n    models: [llama]\n    timeout_s: 60\n",
                s.addr
            )
        })
        .collect();
    format!(
        "upstreams:
{upstreams}auth:
  api_keys:
    - key: sk-{tag}-a
      tenant: {tag}
    - key: sk-{tag}-rpm
      tenant: {tag}
      rpm: {RPM}
    - key: sk-{tag}-load
      tenant: {tag}
limits:
  backend: redis
  redis_url: {redis}
  on_backend_error: fail_closed
cache:
  backend: redis
  url: {redis}
store:
  url: {db}
  capture_content: true
",
        redis = redis_url(),
        db = database_url(),
    )
}

/// This run's traces (tenant `tag`, arrived since `since`), once every completion id in
/// `expected` has as many traces as it appears there; panics after [`SETTLE`] naming the ids
/// still missing some.
async fn settled_traces(
    store: &Store,
    tag: &str,
    since: SystemTime,
    expected: &[String],
) -> Vec<RequestRecord> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let mine: Vec<RequestRecord> = store
            .traces(since, SystemTime::now() + Duration::from_secs(60), 100_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|t| t.tenant == tag)
            .collect();
        let missing: Vec<&String> = expected
            .iter()
            .filter(|id| {
                let want = expected.iter().filter(|e| e == id).count();
                let have = mine
                    .iter()
                    .filter(|t| t.completion_id.as_ref() == Some(*id))
                    .count();
                have < want
            })
            .collect();
        if missing.is_empty() {
            return mine;
        }
        assert!(
            Instant::now() < deadline,
            "no trace after {SETTLE:?} for {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How many traces carry each completion id.
fn traces_by_completion(traces: &[RequestRecord]) -> HashMap<&str, Vec<&RequestRecord>> {
    let mut by_id: HashMap<&str, Vec<&RequestRecord>> = HashMap::new();
    for t in traces {
        if let Some(id) = &t.completion_id {
            by_id.entry(id.as_str()).or_default().push(t);
        }
    }
    by_id
}

#[test]
fn replicas_share_limits_cache_and_store_and_survive_losing_one_of_each() {
    let tag = format!("rep{:016x}", rand::random::<u64>());
    let (key_a, key_rpm, key_load) = (
        format!("sk-{tag}-a"),
        format!("sk-{tag}-rpm"),
        format!("sk-{tag}-load"),
    );
    let since = SystemTime::now() - Duration::from_secs(1);
    let dir = tempfile::tempdir().unwrap();
    let mut serves = [
        Proc::serve("serve-0", dir.path()),
        Proc::serve("serve-1", dir.path()),
    ];
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, gateway_config(&[&serves[0], &serves[1]], &tag)).unwrap();
    let mut gateways = [
        Proc::gateway("gateway-0", dir.path(), &config),
        Proc::gateway("gateway-1", dir.path(), &config),
    ];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = Client {
            http: reqwest::Client::new(),
            gateways: gateways.iter().map(Proc::url).collect(),
            next: AtomicUsize::new(0),
        };
        let store = Store::connect(&database_url()).await.unwrap();

        // 1. Spread: 8 requests alternate gateways, and each gateway alternates serves.
        let mut answered = Vec::new();
        for i in 0..8 {
            let a = client
                .chat(&key_a, &chat_body(&format!("[{tag}] spread {i}"), 0.0))
                .await;
            assert_eq!(a.status, 200, "{}", a.body);
            answered.push(a);
        }
        for (i, s) in serves.iter().enumerate() {
            let m = metrics(&client.http, &s.url()).await;
            let served = metric_sum(&m, "kiln:request_success_total", &[]);
            assert!(served > 0.0, "serve {i} served nothing:\n{m}");
        }
        for (i, base) in client.gateways.iter().enumerate() {
            let m = metrics(&client.http, base).await;
            let tenant = format!("tenant=\"{tag}\"");
            let n = metric_sum(
                &m,
                "kiln_gateway_requests_total",
                &[&tenant, "status=\"200\""],
            );
            assert_eq!(n, 4.0, "gateway {i} did not answer its half:\n{m}");
        }

        // 2. One limit: RPM + OVER requests alternating gateways, one after another.
        let mut statuses = Vec::new();
        for i in 0..RPM + OVER {
            let a = client
                .chat_from(i, &key_rpm, &chat_body(&format!("[{tag}] rpm {i}"), 0.9))
                .await;
            if a.status == 429 {
                assert_eq!(a.body["error"]["code"], "rate_limit_exceeded", "{}", a.body);
            }
            statuses.push((a.gateway, a.status));
            if a.status == 200 {
                answered.push(a);
            }
        }
        let expected: Vec<(usize, u16)> = (0..RPM + OVER)
            .map(|i| (i % 2, if i < RPM { 200 } else { 429 }))
            .collect();
        assert_eq!(statuses, expected, "(gateway, status) of each request");

        // 3. One cache: gateway 0 answers a cacheable request until its entry is in Redis (the
        // entry is written off the request path, so the first repeats may still miss, each
        // storing its own reply); then gateway 1's first look is a hit replaying one of them.
        let cacheable = chat_body(&format!("[{tag}] cache me"), 0.0);
        let mut misses = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let cached_by_0 = loop {
            let a = client.chat_from(0, &key_a, &cacheable).await;
            assert_eq!(a.status, 200, "{}", a.body);
            if a.cache.as_deref() == Some("hit") {
                break a;
            }
            assert_eq!(a.cache.as_deref(), Some("miss"), "{a:?}");
            misses.push(a);
            assert!(Instant::now() < deadline, "gateway 0 never hit: {misses:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            !misses.is_empty(),
            "the first look was a hit: {cached_by_0:?}"
        );
        let hit = client.chat_from(1, &key_a, &cacheable).await;
        assert_eq!(
            (hit.status, hit.gateway, hit.cache.as_deref()),
            (200, 1, Some("hit")),
            "{}",
            hit.body
        );
        let source = misses
            .iter()
            .find(|m| m.completion_id == hit.completion_id)
            .unwrap_or_else(|| panic!("the hit {hit:?} replays none of {misses:?}"));
        assert_eq!(hit.body["choices"], source.body["choices"]);
        answered.extend(misses);
        answered.extend([cached_by_0, hit]);

        // 4. Traces land once: every answer has exactly one trace, found by its completion id
        // and matched by its `x-request-id` (a hit's trace carries the id of the reply it
        // replays); feedback through gateway 1 on a completion gateway 0 answered.
        let ids: Vec<String> = answered
            .iter()
            .map(|a| a.completion_id.clone().unwrap())
            .collect();
        let traces = settled_traces(&store, &tag, since, &ids).await;
        let by_id = traces_by_completion(&traces);
        for a in &answered {
            let id = a.completion_id.as_deref().unwrap();
            let mine: Vec<_> = by_id[id]
                .iter()
                .filter(|t| t.request_id == a.request_id)
                .collect();
            assert_eq!(mine.len(), 1, "{a:?}: {:#?}", by_id[id]);
            let hit = a.cache.as_deref() == Some("hit");
            assert_eq!((mine[0].status, mine[0].cache_hit), (200, hit), "{a:?}");
            let answers = answered
                .iter()
                .filter(|b| b.completion_id == a.completion_id)
                .count();
            assert_eq!(by_id[id].len(), answers, "{id}: {:#?}", by_id[id]);
        }
        let upstreams: Vec<Option<&str>> = traces
            .iter()
            .filter(|t| !t.cache_hit)
            .map(|t| t.upstream.as_deref())
            .collect();
        for serve in ["serve-0", "serve-1"] {
            assert!(upstreams.contains(&Some(serve)), "{upstreams:?}");
        }

        let rated = &answered[0];
        assert_eq!(rated.gateway, 0);
        let rated_id = rated.completion_id.clone().unwrap();
        let (status, reply) = client
            .feedback(
                1,
                &key_a,
                &json!({"completion_id": rated_id, "thumbs": "up", "score": 0.75}),
            )
            .await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["completion_id"], rated_id.as_str());
        assert_eq!(reply["request_id"], rated.request_id.as_str());
        let kept: Vec<_> = store
            .feedback(since, 100_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|f| f.tenant == tag)
            .collect();
        assert_eq!(kept.len(), 1, "{kept:#?}");
        assert_eq!(kept[0].feedback_id, reply["id"].as_str().unwrap());
        assert_eq!(kept[0].request_id, rated.request_id);
        assert_eq!(kept[0].completion_id.as_deref(), Some(rated_id.as_str()));
        assert_eq!(
            (kept[0].thumbs, kept[0].score),
            (Some(Thumbs::Up), Some(0.75))
        );

        let m = metrics(&client.http, &serves[1].url()).await;
        let served_before = metric_sum(&m, "kiln:request_success_total", &[]);

        // 5. Steady load through both gateways; serve 0, then gateway 0, SIGKILLed midway.
        let done = AtomicUsize::new(0);
        let load = (0..CLIENTS).map(|c| {
            let (client, done, key, tag) = (&client, &done, &key_load, &tag);
            async move {
                let mut answers = Vec::new();
                for i in 0..PER_CLIENT {
                    let prompt = format!("[{tag}] load {c}.{i}");
                    answers.push(client.chat(key, &chat_body(&prompt, 0.8)).await);
                    done.fetch_add(1, Ordering::Relaxed);
                }
                answers
            }
        });
        let total = CLIENTS * PER_CLIENT;
        let killer = async {
            let (serve, gateway) = (&mut serves[0], &mut gateways[0]);
            while done.load(Ordering::Relaxed) < total / 4 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            serve.kill();
            let at_serve_kill = done.load(Ordering::Relaxed);
            while done.load(Ordering::Relaxed) < total / 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            gateway.kill();
            (at_serve_kill, done.load(Ordering::Relaxed))
        };
        let (answers, (at_serve_kill, at_gateway_kill)) =
            futures_util::future::join(futures_util::future::join_all(load), killer).await;
        let answers: Vec<Answer> = answers.into_iter().flatten().collect();
        assert!(
            at_serve_kill < total && at_gateway_kill < total,
            "the kills came after the load ({at_serve_kill}, {at_gateway_kill} of {total} done)"
        );
        let failed: Vec<&Answer> = answers.iter().filter(|a| a.status != 200).collect();
        assert!(
            failed.is_empty(),
            "{} of {total} requests failed: {failed:#?}\ngateway 1 log:\n{}",
            failed.len(),
            gateways[1].log()
        );
        let retried = answers.iter().filter(|a| a.retries > 0).count();
        assert!(retried > 0, "no request met the dead gateway");
        assert!(answers.iter().all(|a| a.retries == 0 || a.gateway == 1));

        // The survivors' view: serve 1 served what came after serve 0's death (but for the
        // requests serve 0 had answered before it, still on their way to a client), and
        // gateway 1 traced its answers once.
        let m = metrics(&client.http, &serves[1].url()).await;
        let served = metric_sum(&m, "kiln:request_success_total", &[]) - served_before;
        let after_kill = (total - at_serve_kill).saturating_sub(CLIENTS);
        assert!(
            served >= after_kill as f64,
            "serve 1 served {served} of the load, {after_kill} of it after serve 0 died"
        );
        let m = metrics(&client.http, &client.gateways[1]).await;
        let errors = metric_sum(
            &m,
            "kiln_gateway_upstream_errors_total",
            &["upstream=\"serve-0\""],
        );
        let survivors: Vec<String> = answers
            .iter()
            .filter(|a| a.gateway == 1)
            .filter_map(|a| a.completion_id.clone())
            .collect();
        let traces = settled_traces(&store, &tag, since, &survivors).await;
        let by_id = traces_by_completion(&traces);
        for id in &survivors {
            assert_eq!(
                by_id[id.as_str()].len(),
                1,
                "{id}: {:#?}",
                by_id[id.as_str()]
            );
        }
        store.close().await;
        eprintln!(
            "load: {total} requests, serve 0 killed after {at_serve_kill}, gateway 0 after \
             {at_gateway_kill}; {retried} retried on gateway 1; gateway 1 saw {errors} failed \
             attempts on serve 0"
        );
    });
}

/// An upstream that answers `GET /v1/models` (so it stays in rotation) but reads every other
/// request and closes the connection before any byte of a reply — or, `after_headers`, after a
/// 200's headers and the start of its body: the ways a server dies in the middle of a request.
/// Counts the requests it dropped.
fn dying_upstream(after_headers: bool) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dropped = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&dropped);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let count = Arc::clone(&count);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                if seen.starts_with(b"GET") {
                    let body = r#"{"object":"list","data":[{"id":"llama","object":"model"}]}"#;
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                } else {
                    count.fetch_add(1, Ordering::Relaxed);
                    if after_headers {
                        let _ = write!(
                            stream,
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                             content-length: 400\r\n\r\n{{\"id\": \"chatcmpl-cut"
                        );
                    }
                }
            });
        }
    });
    (addr, dropped)
}

#[test]
fn an_upstream_dying_before_its_reply_headers_is_failed_over() {
    upstream_dying_mid_request_is_failed_over(false);
}

#[test]
fn an_upstream_dying_after_its_reply_headers_is_failed_over() {
    upstream_dying_mid_request_is_failed_over(true);
}

fn upstream_dying_mid_request_is_failed_over(after_headers: bool) {
    let dir = tempfile::tempdir().unwrap();
    let serve = Proc::serve("serve", dir.path());
    let (dying, dropped) = dying_upstream(after_headers);
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "upstreams:
  - name: dying
    url: http://{dying}/v1
    models: [llama]
  - name: serve
    url: http://{}/v1
    models: [llama]
cache:
  backend: none
store:
  url: sqlite://{}
",
            serve.addr,
            dir.path().join("gateway.db").display()
        ),
    )
    .unwrap();
    let gateway = Proc::gateway("gateway", dir.path(), &config);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let http = reqwest::Client::new();
        // Round-robin puts the dying upstream first for one of any two requests.
        for i in 0..2 {
            let r = http
                .post(format!("{}/v1/chat/completions", gateway.url()))
                .json(&chat_body(&format!("failover {i}"), 0.0))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap();
            assert_eq!(status, 200, "{body}\n{}", gateway.log());
            assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
        }
    });
    assert!(
        dropped.load(Ordering::Relaxed) > 0,
        "no request reached the dying upstream"
    );
}
