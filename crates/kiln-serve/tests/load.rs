//! The server under load, over a real bound port: many concurrent streams, a client that hangs
//! up mid-stream, a full queue, and a graceful shutdown with a stream in flight.

mod common;

use std::time::{Duration, Instant};

use common::{
    get_text, metric, parse_sse, post, reference_greedy, reference_model, series, start,
    streamed_texts,
};
use futures_util::StreamExt;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_each_match_their_prompt_alone() {
    let server = start(|_| {});
    let loaded = reference_model(None);
    let prompts: Vec<String> = (0..32)
        .map(|i| format!("Prompt number {i} says {}", "la ".repeat(i % 5)))
        .collect();
    let expected: Vec<String> = prompts
        .iter()
        .map(|p| {
            let ids = loaded.tokenizer.encode(p, true).expect("encodes");
            reference_greedy(&loaded, &ids, 12).0
        })
        .collect();

    let url = format!("{}/v1/completions", server.url());
    let requests = prompts.iter().map(|prompt| {
        let url = url.clone();
        let body = json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": true});
        tokio::spawn(async move {
            let response = reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .expect("request sent");
            assert_eq!(response.status().as_u16(), 200);
            let events = parse_sse(&response.text().await.expect("body"));
            streamed_texts(&events, 1).remove(0)
        })
    });
    let texts = futures_util::future::join_all(requests).await;
    for (i, (text, expected)) in texts.into_iter().zip(&expected).enumerate() {
        assert_eq!(&text.expect("task"), expected, "prompt {i}");
    }
}

const HANG_UP_CHOICES: usize = 8;
const HANG_UP_TOKENS: usize = 480;

/// A request long enough to be cut short: 8 choices of 480 tokens past EOS.
fn long_request(stream: bool) -> Value {
    json!({"prompt": "Forever", "max_tokens": HANG_UP_TOKENS, "ignore_eos": true,
           "temperature": 0, "n": HANG_UP_CHOICES, "stream": stream})
}

/// Waits until every choice of [`long_request`] is counted as aborted (the engine notices a
/// dropped stream at its next step), then checks none ran to its limit and nothing runs.
async fn assert_all_aborted(server: &kiln_serve::server::ServerHandle) {
    let n = HANG_UP_CHOICES as f64;
    let deadline = Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let (_, metrics) = get_text(&format!("{}/metrics", server.url())).await;
        let aborted = series(
            &metrics,
            "kiln:request_success_total",
            &[r#"finished_reason="abort""#],
        )
        .unwrap_or(0.0);
        if aborted == n {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "{aborted} of {n} choices aborted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        series(
            &metrics,
            "kiln:request_success_total",
            &[r#"finished_reason="length""#]
        ),
        None,
        "no choice ran to its limit"
    );
    let generated = metric(&metrics, "kiln:generation_tokens_total", &[]);
    assert!(
        generated < (HANG_UP_CHOICES * HANG_UP_TOKENS) as f64,
        "generation stopped early: {generated} tokens"
    );
    assert_eq!(metric(&metrics, "kiln:num_requests_running", &[]), 0.0);
    assert_eq!(server.state().engine().stats().running, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_stream_frees_its_slots() {
    let server = start(|_| {});
    let response = reqwest::Client::new()
        .post(format!("{}/v1/completions", server.url()))
        .json(&long_request(true))
        .send()
        .await
        .expect("request sent");
    assert_eq!(response.status().as_u16(), 200);
    let mut body = response.bytes_stream();
    let first = body.next().await.expect("a first event").expect("bytes");
    assert!(first.starts_with(b"data: "));
    drop(body);
    assert_all_aborted(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_on_a_whole_response_frees_its_slots() {
    let server = start(|_| {});
    let engine = server.state().engine().clone();
    let request = reqwest::Client::new()
        .post(format!("{}/v1/completions", server.url()))
        .json(&long_request(false))
        .send();
    let waiting = tokio::spawn(request);
    // Hang up once the choices are generating.
    let deadline = Instant::now() + Duration::from_secs(5);
    while engine.stats().running == 0 {
        assert!(Instant::now() < deadline, "the request never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    waiting.abort();
    assert!(waiting.await.is_err_and(|e| e.is_cancelled()));
    assert_all_aborted(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let server = start(|o| {
        o.engine.max_num_seqs = 1;
        o.engine.max_queue = 1;
    });
    let url = format!("{}/v1/completions", server.url());
    let requests = (0..12).map(|i| {
        let url = url.clone();
        let body = json!({"prompt": format!("request {i}"), "max_tokens": 200,
                          "ignore_eos": true, "temperature": 0});
        tokio::spawn(async move {
            let response = reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .expect("request sent");
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().expect("ASCII").to_string());
            let body: Value = response.json().await.expect("JSON");
            (status, retry_after, body)
        })
    });
    let results: Vec<_> = futures_util::future::join_all(requests)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect();
    let refused: Vec<_> = results.iter().filter(|(s, ..)| *s == 429).collect();
    assert!(!refused.is_empty(), "some requests found the queue full");
    assert!(results.iter().any(|(s, ..)| *s == 200), "some were served");
    for (status, retry_after, body) in &results {
        match status {
            200 => assert_eq!(body["usage"]["completion_tokens"], 200),
            429 => {
                assert_eq!(retry_after.as_deref(), Some("1"));
                assert_eq!(body["error"]["type"], "rate_limit_exceeded");
                assert_eq!(body["error"]["code"], "rate_limit_exceeded");
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    let (_, metrics) = get_text(&format!("{}/metrics", server.url())).await;
    assert_eq!(
        metric(&metrics, "kiln:requests_rejected_total", &[]),
        refused.len() as f64
    );

    // A request the queue can never hold is a client error, not a retry-forever 429.
    let (status, body) = post(&url, &json!({"prompt": "a", "n": 2})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_stream_in_flight_finish() {
    let server = start(|_| {});
    let url = server.url();
    let (n, max_tokens) = (8, 480);
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .json(
            &json!({"prompt": "Forever", "max_tokens": max_tokens, "ignore_eos": true,
                      "temperature": 0, "n": n, "stream": true,
                      "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .expect("request sent");
    let mut body = response.bytes_stream();
    let mut text = String::from_utf8(body.next().await.expect("event").expect("bytes").to_vec())
        .expect("UTF-8");
    // The engine publishes its stats after each step, a moment after the tokens it sends.
    while server.state().engine().stats().running == 0 {
        let chunk = body
            .next()
            .await
            .expect("the stream is in flight")
            .expect("bytes");
        text.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
    }
    let stopping = tokio::task::spawn_blocking(move || server.shutdown());
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.expect("bytes")).expect("UTF-8"));
    }
    stopping.await.expect("task").expect("clean shutdown");
    let events = parse_sse(&text);
    let usage = &events.last().expect("events")["usage"];
    assert_eq!(
        usage["completion_tokens"],
        n * max_tokens,
        "every token arrived"
    );

    let refused = reqwest::Client::new()
        .get(format!("{url}/health"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(refused.is_err(), "no longer listening");
}
