//! Anthropic upstreams through Ferry, seen from the upstream's side: a
//! recording upstream answers every call with the path and headers it
//! received, so the tests can see which upstream a call reached, that a
//! caller's key never arrived there and that a caller's own batch names its
//! results at Ferry; and deferred Claude calls on the emulator whose
//! Message Batches are canceled or expire (the official SDK's view is in
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
    // Behind a proxy that also rewrote `Host`: the caller's host, as the
    // first `X-Forwarded-Host` names it.
    let seen: Value = call(reqwest::Method::GET, "/v1/messages/batches/msgbatch_1")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "api.example.com, lb.internal")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        seen["results_url"], "https://api.example.com/v1/messages/batches/msgbatch_1/results",
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

/// Ferry on a standalone emulator with two Anthropic upstreams after the
/// OpenAI one: `claude` (Haiku; `max_attempts = 2`, expired lines
/// re-queued) and `claude-strict` (Sonnet, routed there; expired lines
/// `expired` at once). One request per batch, flushed at once.
fn claude_stack() -> common::Stack {
    common::Stack::start_on_with(
        common::Backend::Sled,
        &|emulator| {
            let table = |name: &str, extra: &str| {
                format!(
                    "\n[[upstreams]]\nname = \"{name}\"\nkind = \"anthropic\"\nbase_url = \"http://{emulator}\"\n\
                     api_key_env = \"FERRY_TEST_UPSTREAM_KEY\"\npoll_interval_secs = 0.05\nmax_requests = 1\n\
                     max_wait_secs = 0.05\nmax_attempts = 2\n{extra}\n"
                )
            };
            format!(
                "{}{}\n[[routes]]\nmodel = \"claude-sonnet-4-6\"\nupstream = \"claude-strict\"\n",
                table("claude", "expired_policy = \"requeue\""),
                table("claude-strict", "expired_policy = \"fail\""),
            )
        },
        "",
    )
}

/// A deferred Claude call (`202`), named `id`.
async fn defer_claude(s: &common::Stack, model: &str, id: &str) {
    let r = s
        .http
        .post(s.url("/v1/messages"))
        .header("x-api-key", "alice-key")
        .header("anthropic-version", "2023-06-01")
        .header("prefer", "respond-async")
        .header("x-ferry-custom-id", id)
        .json(&json!({"model": model, "max_tokens": 16,
            "messages": [{"role": "user", "content": id}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
}

/// Cancels a Message Batch behind Ferry's back, on the upstream's own route.
async fn cancel_message_batch(s: &common::Stack, id: &Value) {
    let id = id.as_str().expect("a batch id");
    let r = s
        .http
        .post(s.emu(&format!("/v1/messages/batches/{id}/cancel")))
        .header("x-api-key", UPSTREAM_KEY)
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canceled_lines_are_sent_again_then_fail_once_max_attempts_are_spent() {
    let s = tokio::task::block_in_place(claude_stack);
    // Nothing finishes on its own: only the cancels end these batches.
    s.emulator_config(json!({"per_request_seconds": 1000.0}))
        .await;
    defer_claude(&s, "claude-haiku-4-5", "x").await;
    let first = common::until_status(&s, "x", "submitted").await["batch_id"].clone();
    assert!(
        first.as_str().is_some_and(|b| b.starts_with("msgbatch_")),
        "{first}"
    );
    cancel_message_batch(&s, &first).await;
    // Its `canceled` line re-queues it, counting the attempt, and it goes
    // in a second Message Batch.
    let second = common::until(&s, "x", "submitted in another batch", |st| {
        st["status"] == "submitted" && st["batch_id"] != first
    })
    .await["batch_id"]
        .clone();
    cancel_message_batch(&s, &second).await;
    // The second attempt was the last (`max_attempts = 2`): it fails.
    let st = common::until_status(&s, "x", "failed").await;
    assert_eq!(st["error"]["code"], "batch_cancelled", "{st}");
    assert_eq!(st["batch_id"], second, "{st}");
    let stats = s.emulator_stats().await;
    assert_eq!(stats["batches_by_status"]["cancelled"], 2, "{stats}");
    assert_eq!(stats["executed_lines"], 0, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lines_follow_expired_policy_and_max_attempts() {
    let s = tokio::task::block_in_place(claude_stack);
    // Every Message Batch ends at once with its requests `expired`.
    s.emulator_config(json!({"per_request_seconds": 3600.0, "expire_after_seconds": 0.0}))
        .await;
    // `requeue`: sent again, then `expired` once both attempts are spent.
    defer_claude(&s, "claude-haiku-4-5", "late").await;
    let (_, st) = s.status("alice-key", "late", 60).await;
    assert_eq!(st["status"], "expired", "{st}");
    assert_eq!(st["error"]["code"], "batch_expired", "{st}");
    assert_eq!(s.emulator_stats().await["batches_by_status"]["expired"], 2);
    // `fail`: `expired` after its one batch.
    defer_claude(&s, "claude-sonnet-4-6", "strict").await;
    let (_, st) = s.status("alice-key", "strict", 60).await;
    assert_eq!(st["status"], "expired", "{st}");
    assert_eq!(st["error"]["code"], "batch_expired", "{st}");
    let stats = s.emulator_stats().await;
    assert_eq!(stats["batches_by_status"]["expired"], 3, "{stats}");
    assert_eq!(stats["executed_lines"], 0, "{stats}");
}
