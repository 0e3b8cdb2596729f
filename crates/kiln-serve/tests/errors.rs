//! Every client mistake gets a 4xx in OpenAI's error envelope naming the field at fault, over a
//! real bound port: malformed and mistyped bodies, out-of-range values, context overflow,
//! unknown models, paths and methods, oversized bodies, and the API key.

mod common;

use common::{post, start};
use serde_json::{Value, json};

/// The envelope, whatever the status: `{"error": {"message", "type", "param", "code"}}`.
fn assert_envelope(body: &Value) -> &Value {
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    let keys: Vec<&str> = error
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["message", "type", "param", "code"], "{body}");
    error
}

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_name_the_field() {
    let server = start(|_| {});
    let long = "word ".repeat(600);
    let cases: Vec<(&str, Value, u16, Option<&str>)> = vec![
        // Wrong types, reported by the JSON layer with the field's path.
        (
            COMPLETIONS,
            json!({"prompt": "a", "temperature": "hot"}),
            400,
            Some("temperature"),
        ),
        (
            COMPLETIONS,
            json!({"prompt": "a", "max_tokens": 1.5}),
            400,
            Some("max_tokens"),
        ),
        (COMPLETIONS, json!({"prompt": 5}), 400, Some("prompt")),
        (COMPLETIONS, json!({"max_tokens": 5}), 400, Some("prompt")),
        (CHAT, json!({"messages": "hi"}), 400, Some("messages")),
        (
            CHAT,
            json!({"messages": [{"role": 1, "content": "x"}]}),
            400,
            Some("messages[0].role"),
        ),
        (
            CHAT,
            json!({"messages": user("x"), "stream": "yes"}),
            400,
            Some("stream"),
        ),
        // Ranges.
        (
            COMPLETIONS,
            json!({"prompt": "a", "max_tokens": 0}),
            400,
            Some("max_tokens"),
        ),
        (
            COMPLETIONS,
            json!({"prompt": "a", "max_tokens": -1}),
            400,
            Some("max_tokens"),
        ),
        (
            COMPLETIONS,
            json!({"prompt": "a", "max_tokens": 1_000_000_000_000i64}),
            400,
            Some("max_tokens"),
        ),
        (
            COMPLETIONS,
            json!({"prompt": "a", "temperature": -1}),
            400,
            Some("temperature"),
        ),
        (
            COMPLETIONS,
            json!({"prompt": "a", "temperature": 2.01}),
            400,
            Some("temperature"),
        ),
        (
            COMPLETIONS,
            json!({"prompt": "a", "top_p": 0}),
            400,
            Some("top_p"),
        ),
        (
            COMPLETIONS,
            json!({"prompt": "a", "top_p": 1.01}),
            400,
            Some("top_p"),
        ),
        (COMPLETIONS, json!({"prompt": "a", "n": 0}), 400, Some("n")),
        (COMPLETIONS, json!({"prompt": "a", "n": 9}), 400, Some("n")),
        (
            COMPLETIONS,
            json!({"prompt": "a", "presence_penalty": -2.5}),
            400,
            Some("presence_penalty"),
        ),
        (
            COMPLETIONS,
            json!({"prompt": "a", "frequency_penalty": 3}),
            400,
            Some("frequency_penalty"),
        ),
        (
            COMPLETIONS,
            json!({"prompt": "a", "logprobs": 21}),
            400,
            Some("logprobs"),
        ),
        (
            COMPLETIONS,
            json!({"prompt": [1, 2, 99999]}),
            400,
            Some("prompt[2]"),
        ),
        (
            CHAT,
            json!({"messages": user("x"), "top_logprobs": 21, "logprobs": true}),
            400,
            Some("top_logprobs"),
        ),
        (CHAT, json!({"messages": []}), 400, Some("messages")),
        (
            CHAT,
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            400,
            Some("messages[0].role"),
        ),
        (
            CHAT,
            json!({"messages": user("x"), "stop": ["a","b","c","d","e","f","g","h","i"]}),
            400,
            Some("stop"),
        ),
        // The context.
        (COMPLETIONS, json!({"prompt": long}), 400, Some("prompt")),
        (
            CHAT,
            json!({"messages": user(&long)}),
            400,
            Some("messages"),
        ),
        (
            COMPLETIONS,
            json!({"prompt": "a", "max_tokens": 600}),
            400,
            Some("max_tokens"),
        ),
        (
            CHAT,
            json!({"messages": user("x"), "max_completion_tokens": 600}),
            400,
            Some("max_completion_tokens"),
        ),
        // Unknown model.
        (
            COMPLETIONS,
            json!({"model": "gpt-4", "prompt": "a"}),
            404,
            Some("model"),
        ),
        (
            CHAT,
            json!({"model": "gpt-4", "messages": user("x")}),
            404,
            Some("model"),
        ),
        (
            "/tokenize",
            json!({"model": "gpt-4", "prompt": "a"}),
            404,
            Some("model"),
        ),
        // vLLM's helpers.
        ("/tokenize", json!({}), 400, None),
        (
            "/detokenize",
            json!({"tokens": [1, 100000]}),
            400,
            Some("tokens[1]"),
        ),
    ];
    for (path, body, status, param) in cases {
        let (got, response) = post(&format!("{}{path}", server.url()), &body).await;
        assert_eq!(got, status, "{path} {body}: {response}");
        let error = assert_envelope(&response);
        assert_eq!(error["param"].as_str(), param, "{path} {body}: {response}");
    }

    // The context errors use vLLM's wording.
    let (_, response) = post(
        &format!("{}{COMPLETIONS}", server.url()),
        &json!({"prompt": "a", "max_tokens": 600}),
    )
    .await;
    let message = response["error"]["message"].as_str().expect("message");
    assert!(
        message.starts_with(
            "'max_tokens' is too large: 600. This model's maximum context length is 512 tokens"
        ),
        "{message}"
    );
    assert_eq!(response["error"]["code"], "context_length_exceeded");
    let (_, response) = post(
        &format!("{}{COMPLETIONS}", server.url()),
        &json!({"model": "gpt-4", "prompt": "a"}),
    )
    .await;
    assert_eq!(response["error"]["code"], "model_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_paths_and_methods_get_the_envelope() {
    let server = start(|o| o.max_body_bytes = 1024);
    let client = reqwest::Client::new();
    let send = |request: reqwest::RequestBuilder| async move {
        let response = request.send().await.expect("request sent");
        let status = response.status().as_u16();
        let body: Value = serde_json::from_str(&response.text().await.expect("body"))
            .expect("the error body is JSON");
        (status, body)
    };

    let (status, body) = send(
        client
            .post(format!("{}{COMPLETIONS}", server.url()))
            .header("content-type", "application/json")
            .body(r#"{"prompt": "a",,}"#),
    )
    .await;
    assert_eq!(status, 400);
    let error = assert_envelope(&body);
    assert_eq!(error["type"], "invalid_request_error");
    assert_eq!(error["param"], Value::Null);
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .contains("not valid JSON")
    );

    let (status, body) = send(
        client
            .post(format!("{}{COMPLETIONS}", server.url()))
            .body("x".repeat(4096)),
    )
    .await;
    assert_eq!(status, 413);
    assert_envelope(&body);

    let (status, body) = send(client.get(format!("{}/v1/nothing", server.url()))).await;
    assert_eq!(status, 404);
    assert_envelope(&body);

    let (status, body) = send(client.get(format!("{}{COMPLETIONS}", server.url()))).await;
    assert_eq!(status, 405);
    assert_envelope(&body);

    let (status, body) = send(client.delete(format!("{}/health", server.url()))).await;
    assert_eq!(status, 405);
    assert_envelope(&body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_guards_the_api_but_not_health_or_metrics() {
    let server = start(|o| o.api_key = Some("sesame".into()));
    let client = reqwest::Client::new();
    let completions = format!("{}{COMPLETIONS}", server.url());
    let request = json!({"prompt": "a", "max_tokens": 2});

    for auth in [
        None,
        Some("Bearer wrong"),
        Some("sesame"),
        Some("Bearer sesame2"),
    ] {
        let mut builder = client.post(&completions).json(&request);
        if let Some(auth) = auth {
            builder = builder.header("authorization", auth);
        }
        let response = builder.send().await.expect("request sent");
        assert_eq!(response.status().as_u16(), 401, "{auth:?}");
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(assert_envelope(&body)["code"], "invalid_api_key");
    }
    let models = client
        .get(format!("{}/v1/models", server.url()))
        .send()
        .await
        .expect("request sent");
    assert_eq!(models.status().as_u16(), 401);

    let ok = client
        .post(&completions)
        .bearer_auth("sesame")
        .json(&request)
        .send()
        .await
        .expect("request sent");
    assert_eq!(ok.status().as_u16(), 200);

    for open in ["/health", "/metrics", "/openapi.json"] {
        let response = client
            .get(format!("{}{open}", server.url()))
            .send()
            .await
            .expect("request sent");
        assert_eq!(response.status().as_u16(), 200, "{open}");
    }
}
