//! Anthropic upstreams through Ferry, seen from the upstream's side: a
//! recording upstream answers every call with the path and headers it
//! received, so the tests can see which upstream a call reached and that a
//! caller's key never arrived there (the official SDK's view is in
//! tests/anthropic_sdk.rs).

mod common;

use std::net::SocketAddr;

use axum::Router;
use axum::http::{HeaderMap, Uri};
use serde_json::{Value, json};

use common::{TENANTS, UPSTREAM_KEY};

/// Answers anything with `{"path", "headers"}`, and, as a Message Batch
/// (and a list of one) would, a `results_url` at the upstream's address.
async fn recorder() -> SocketAddr {
    async fn echo(uri: Uri, headers: HeaderMap) -> axum::Json<Value> {
        let host = headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("?")
            .to_owned();
        let headers: serde_json::Map<String, Value> = headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), json!(v.to_str().unwrap_or("?"))))
            .collect();
        let results_url = format!("http://{host}/v1/messages/batches/msgbatch_1/results");
        axum::Json(json!({"path": uri.path(), "headers": headers,
            "results_url": results_url,
            "data": [{"id": "msgbatch_1", "results_url": results_url}]}))
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, Router::new().fallback(echo))
            .await
            .unwrap();
    });
    addr
}

/// Ferry with an OpenAI upstream at `/openai/v1` and an Anthropic one at
/// the root of the same recorder.
fn ferry(dir: &std::path::Path, upstream: SocketAddr) -> common::Proc {
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
data_dir = "{data}"
threads = 1
shutdown_grace_secs = 0

[[upstreams]]
name = "gpt"
kind = "openai"
base_url = "http://{upstream}/openai/v1"
api_key_env = "FERRY_TEST_UPSTREAM_KEY"

[[upstreams]]
name = "claude"
kind = "anthropic"
base_url = "http://{upstream}"
api_key_env = "FERRY_TEST_UPSTREAM_KEY"
anthropic_version = "2023-06-01"
{TENANTS}
"#,
        data = dir.join("data").display()
    );
    common::ferry(dir, &config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_goes_per_api_family_and_swaps_the_key() {
    let upstream = recorder().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = tokio::task::block_in_place(|| ferry(dir.path(), upstream));
    let url = |p: &str| format!("http://{}{p}", proxy.addr("proxy"));
    let http = reqwest::Client::new();
    let body = json!({"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]});

    // The SDK's way (x-api-key) and the bearer way both reach the Anthropic
    // upstream with Ferry's key in x-api-key and nothing of the caller's.
    for (name, value) in [
        ("x-api-key", "alice-key"),
        ("authorization", "Bearer alice-key"),
    ] {
        let seen: Value = http
            .post(url("/v1/messages"))
            .header(name, value)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(seen["path"], "/v1/messages", "{seen}");
        let h = &seen["headers"];
        assert_eq!(h["x-api-key"], UPSTREAM_KEY, "{seen}");
        assert_eq!(h["anthropic-version"], "2023-06-01", "{seen}");
        assert!(h.get("authorization").is_none(), "{seen}");
        assert!(
            !seen.to_string().contains("alice-key"),
            "the caller's key went upstream: {seen}"
        );
    }
    // Without anthropic-version Ferry sends the configured one.
    let seen: Value = http
        .post(url("/v1/messages/count_tokens"))
        .header("x-api-key", "alice-key")
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen["headers"]["anthropic-version"], "2023-06-01", "{seen}");

    // `/v1/models` goes by the family the caller speaks.
    let anthropic: Value = http
        .get(url("/v1/models"))
        .header("x-api-key", "alice-key")
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(anthropic["path"], "/v1/models", "{anthropic}");
    assert_eq!(anthropic["headers"]["x-api-key"], UPSTREAM_KEY);
    let openai: Value = http
        .get(url("/v1/models"))
        .bearer_auth("alice-key")
        .header("x-api-key", "alice-key")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(openai["path"], "/openai/v1/models", "{openai}");
    assert_eq!(
        openai["headers"]["authorization"],
        format!("Bearer {UPSTREAM_KEY}")
    );
    assert!(!openai.to_string().contains("alice-key"), "{openai}");

    // Ferry's own errors on Anthropic calls are in Anthropic's shape, on
    // OpenAI calls in OpenAI's.
    let refused = http
        .post(url("/v1/messages"))
        .header("x-api-key", "nobody")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let refused: Value = refused.json().await.unwrap();
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(
        refused["error"]["type"], "authentication_error",
        "{refused}"
    );
    let refused: Value = http
        .get(url("/v1/models"))
        .bearer_auth("nobody")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(refused["error"]["code"], "invalid_api_key", "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_own_message_batch_names_its_results_at_ferry() {
    let upstream = recorder().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = tokio::task::block_in_place(|| ferry(dir.path(), upstream));
    let url = |p: &str| format!("http://{}{p}", proxy.addr("proxy"));
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str| {
        http.request(method, url(path))
            .header("x-api-key", "alice-key")
            .header("anthropic-version", "2023-06-01")
    };
    let at_ferry = url("/v1/messages/batches/msgbatch_1/results");

    // Retrieve, cancel and list: each batch's results_url is Ferry's, so
    // the SDK's `batches.results(id)` comes back through Ferry.
    for (method, path) in [
        (reqwest::Method::GET, "/v1/messages/batches/msgbatch_1"),
        (
            reqwest::Method::POST,
            "/v1/messages/batches/msgbatch_1/cancel",
        ),
        (reqwest::Method::GET, "/v1/messages/batches"),
    ] {
        let seen: Value = call(method, path)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(seen["path"], path, "{seen}");
        assert_eq!(seen["results_url"], at_ferry.as_str(), "{path}: {seen}");
        assert_eq!(seen["data"][0]["results_url"], at_ferry.as_str(), "{seen}");
        // Asked uncompressed, so that it can be rewritten.
        assert_eq!(seen["headers"]["accept-encoding"], "identity", "{seen}");
    }
    // Behind a proxy that ends TLS, the URL is https.
    let seen: Value = call(reqwest::Method::GET, "/v1/messages/batches/msgbatch_1")
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        seen["results_url"],
        at_ferry.replacen("http://", "https://", 1),
        "{seen}"
    );
    // The results themselves, and other routes, go on untouched.
    let upstream_url = format!(
        "http://{}/v1/messages/batches/msgbatch_1/results",
        upstream.ip()
    );
    for (method, path) in [
        (
            reqwest::Method::GET,
            "/v1/messages/batches/msgbatch_1/results",
        ),
        (reqwest::Method::GET, "/v1/models"),
    ] {
        let seen: Value = call(method, path)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(seen["results_url"], upstream_url.as_str(), "{path}: {seen}");
    }
}
