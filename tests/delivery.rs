//! Delivery and tenancy: signed webhooks (verified with the official
//! `standardwebhooks` package), retries, restarts, SSRF refusals, dead
//! letters, idempotent custom ids.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use common::{Backend, Stack, chat};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const SECRET: &str = "whsec_ZmVycnktdGVzdC13ZWJob29rLXNlY3JldA==";

/// What a receiver saw.
#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    body: String,
    answered: u16,
}

/// A webhook receiver on 127.0.0.1:0 that fails the first `fail_first`
/// deliveries with 500 and reports every delivery on a channel.
struct Receiver {
    url: String,
    fail_first: Arc<AtomicUsize>,
    rx: mpsc::UnboundedReceiver<Received>,
}

async fn receiver(fail_first: usize) -> Receiver {
    let fail = Arc::new(AtomicUsize::new(fail_first));
    let (tx, rx) = mpsc::unbounded_channel();
    let f = fail.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let f = f.clone();
            let tx = tx.clone();
            async move {
                let failing = f
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                let code = if failing {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::OK
                };
                let _ = tx.send(Received {
                    headers,
                    body,
                    answered: code.as_u16(),
                });
                code
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Receiver {
        url: format!("http://127.0.0.1:{}/hook", addr.port()),
        fail_first: fail,
        rx,
    }
}

impl Receiver {
    async fn next(&mut self) -> Received {
        tokio::time::timeout(Duration::from_secs(60), self.rx.recv())
            .await
            .expect("no webhook within 60 s")
            .expect("receiver closed")
    }
}

const WEBHOOK_TENANT: &str = r#"
[[tenants]]
name = "hooked"
keys = ["hooked-key"]
callback_allow = ["http://127.0.0.1:*", "https://*"]
webhook_secret = "whsec_ZmVycnktdGVzdC13ZWJob29rLXNlY3JldA=="
"#;

fn stack(backend: Backend, extra_server: &str, webhooks: &str) -> Stack {
    // Tenants and [webhooks] go after the upstream table.
    Stack::start_on(
        backend,
        &format!("{WEBHOOK_TENANT}\n[webhooks]\n{webhooks}"),
        extra_server,
    )
}

async fn defer_with_callback(s: &Stack, key: &str, id: &str, url: &str) -> reqwest::Response {
    s.http
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("prefer", "respond-async")
        .header("x-ferry-custom-id", id)
        .header("x-ferry-callback-url", url)
        .json(&chat("gpt-4o-mini", &format!("hook {id}")))
        .send()
        .await
        .unwrap()
}

/// Waits until the status object satisfies `pred` (the store is written
/// just after the receiver answers, so this closes that small window).
async fn eventually_status(s: &Stack, key: &str, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, st) = s.status(key, id, 0).await;
        if pred(&st) {
            return st;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached: {st}"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn verify_with_official_library(r: &Received) -> String {
    let headers: serde_json::Map<String, Value> =
        ["webhook-id", "webhook-timestamp", "webhook-signature"]
            .iter()
            .map(|h| ((*h).to_owned(), json!(r.headers[*h].to_str().unwrap())))
            .collect();
    let input = json!({"secret": SECRET, "headers": headers, "body": r.body}).to_string();
    common::run_python("verify_webhook.py", &[], &input)
}

async fn webhook_is_signed_per_standard_webhooks_and_verifies(backend: Backend) {
    let s = stack(backend, "", "retry_base_secs = 0.05");
    let mut rcv = receiver(0).await;
    let r = defer_with_callback(&s, "hooked-key", "wh-1", &rcv.url).await;
    assert_eq!(r.status(), 202);
    s.flush().await;
    let got = rcv.next().await;
    assert_eq!(got.headers["content-type"], "application/json");
    assert!(
        got.headers["webhook-id"]
            .to_str()
            .unwrap()
            .starts_with("msg_")
    );
    assert!(
        got.headers["webhook-signature"]
            .to_str()
            .unwrap()
            .starts_with("v1,")
    );
    let payload: Value = serde_json::from_str(&got.body).unwrap();
    assert_eq!(payload["type"], "ferry.request.completed");
    assert_eq!(payload["data"]["id"], "wh-1");
    assert_eq!(payload["data"]["object"], "ferry.request");
    assert_eq!(
        payload["data"]["result"]["body"]["choices"][0]["message"]["content"],
        "echo: hook wh-1"
    );
    let out = verify_with_official_library(&got);
    assert!(
        out.contains("ferry.request.completed") && out.contains("tampered body refused"),
        "{out}"
    );
    let st = eventually_status(&s, "hooked-key", "wh-1", |st| {
        st["webhook"]["status"] == "delivered"
    })
    .await;
    assert_eq!(st["webhook"]["attempts"], 1);

    // Cancelling a queued request with a callback sends `ferry.request.cancelled`.
    defer_with_callback(&s, "hooked-key", "wh-2", &rcv.url).await;
    let r = s
        .http
        .delete(s.url("/v1/ferry/requests/wh-2"))
        .bearer_auth("hooked-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = rcv.next().await;
    let payload: Value = serde_json::from_str(&got.body).unwrap();
    assert_eq!(payload["type"], "ferry.request.cancelled");
    assert_eq!(payload["data"]["id"], "wh-2");
}

async fn failed_deliveries_are_retried_with_the_same_id(backend: Backend) {
    let s = stack(backend, "", "retry_base_secs = 0.05\nretry_cap_secs = 0.2");
    let mut rcv = receiver(2).await;
    defer_with_callback(&s, "hooked-key", "wh-r", &rcv.url).await;
    s.flush().await;
    let tries = [rcv.next().await, rcv.next().await, rcv.next().await];
    assert_eq!(
        tries.iter().map(|t| t.answered).collect::<Vec<_>>(),
        vec![500, 500, 200]
    );
    let ids: Vec<&str> = tries
        .iter()
        .map(|t| t.headers["webhook-id"].to_str().unwrap())
        .collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    assert!(tries.iter().all(|t| t.body == tries[0].body));
    // Each try is signed afresh; the last one verifies.
    verify_with_official_library(&tries[2]);
    let st = eventually_status(&s, "hooked-key", "wh-r", |st| {
        st["webhook"]["status"] == "delivered"
    })
    .await;
    assert_eq!(st["webhook"]["attempts"], 3);
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("ferry_webhook_deliveries_total{outcome=\"retry\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ferry_webhook_deliveries_total{outcome=\"delivered\"} 1"),
        "{metrics}"
    );
}

async fn a_pending_webhook_is_delivered_after_a_restart(backend: Backend) {
    let mut s = stack(backend, "", "retry_base_secs = 0.2\nretry_cap_secs = 0.5");
    // The receiver refuses for as long as we like.
    let mut rcv = receiver(usize::MAX).await;
    defer_with_callback(&s, "hooked-key", "wh-restart", &rcv.url).await;
    s.flush().await;
    let first = rcv.next().await;
    assert_eq!(first.answered, 500);
    // Kill Ferry while the delivery is pending, then let the receiver accept.
    s.restart_ferry();
    rcv.fail_first.store(0, Ordering::SeqCst);
    let got = loop {
        let r = rcv.next().await;
        if r.answered == 200 {
            break r;
        }
    };
    assert_eq!(got.headers["webhook-id"], first.headers["webhook-id"]);
    verify_with_official_library(&got);
    eventually_status(&s, "hooked-key", "wh-restart", |st| {
        st["webhook"]["status"] == "delivered"
    })
    .await;
}

async fn undeliverable_webhooks_end_dead(backend: Backend) {
    let s = stack(
        backend,
        "",
        "retry_base_secs = 0.05\nretry_cap_secs = 0.1\nmax_age_secs = 0.3",
    );
    let rcv = receiver(usize::MAX).await;
    defer_with_callback(&s, "hooked-key", "wh-dead", &rcv.url).await;
    s.flush().await;
    let st = eventually_status(&s, "hooked-key", "wh-dead", |st| {
        st["webhook"]["status"] == "dead"
    })
    .await;
    assert!(st["webhook"]["attempts"].as_u64().unwrap() >= 1);
    assert!(
        st["webhook"]["last_error"]
            .as_str()
            .unwrap()
            .contains("500")
    );
    // The request itself is still completed and readable.
    assert_eq!(st["status"], "completed");
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("ferry_webhook_deliveries_total{outcome=\"dead\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn callback_urls_outside_the_allow_list_or_internal_are_refused() {
    let s = stack(Backend::Sled, "", "");
    let cases = [
        // alice has no allow-list at all.
        ("alice-key", "https://hooks.example.com/x", "allow-list"),
        // Only the exact 127.0.0.1 entry allows loopback; `https://*` does not.
        ("hooked-key", "https://127.0.0.1/x", "loopback"),
        ("hooked-key", "https://localhost/x", "loopback"),
        (
            "hooked-key",
            "https://169.254.169.254/latest/meta-data",
            "loopback",
        ),
        ("hooked-key", "https://[::1]/x", "loopback"),
        ("hooked-key", "ftp://127.0.0.1/x", "http"),
        ("hooked-key", "http://10.0.0.1/x", "allow-list"),
        ("hooked-key", "https://user:pw@example.com/x", "credentials"),
    ];
    for (key, url, why) in cases {
        let r = defer_with_callback(&s, key, "ssrf", url).await;
        assert_eq!(r.status(), 400, "{url}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], "X-Ferry-Callback-Url", "{url}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(why),
            "{url}: {e}"
        );
    }
    // None of them was stored.
    let (code, _) = s.status("hooked-key", "ssrf", 0).await;
    assert_eq!(code, 404);
}

async fn custom_ids_are_idempotent_and_conflicts_are_409(backend: Backend) {
    let s = Stack::start_on(backend, "", "");
    let body = chat("gpt-4o-mini", "once only");
    let a = s.defer("alice-key", &body, None, Some("idem-1")).await;
    let b = s.defer("alice-key", &body, None, Some("idem-1")).await;
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (202, 202));
    let (a, b): (Value, Value) = (a.json().await.unwrap(), b.json().await.unwrap());
    assert_eq!(a["created_at"], b["created_at"]);
    let c = s
        .defer(
            "alice-key",
            &chat("gpt-4o-mini", "something else"),
            None,
            Some("idem-1"),
        )
        .await;
    assert_eq!(c.status(), 409);
    let e: Value = c.json().await.unwrap();
    assert_eq!(e["error"]["code"], "custom_id_conflict");
    let (st, _) = tokio::join!(s.status("alice-key", "idem-1", 60), s.flush());
    assert_eq!(st.1["status"], "completed");
    // A retry after completion still gets the same ticket, now finished.
    let again = s.defer("alice-key", &body, None, Some("idem-1")).await;
    assert_eq!(again.status(), 202);
    let t: Value = again.json().await.unwrap();
    assert_eq!(t["status"], "completed");
    assert_eq!(
        t["result"]["body"]["choices"][0]["message"]["content"],
        "echo: once only"
    );
    let stats = s.emulator_stats().await;
    assert_eq!(stats["lines_submitted"], 1, "{stats}");
}

async fn streaming_replay_sends_keepalives_then_chunks_then_done(backend: Backend) {
    let s = Stack::start_on(backend, "max_wait_secs = 0.5", "sse_keepalive_secs = 0.05");
    let mut body = chat("gpt-4o-mini", "replay me");
    body["stream"] = json!(true);
    let r = s.defer("alice-key", &body, Some(60), Some("sse-1")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    let keepalives = text.lines().filter(|l| l.starts_with(": ")).count();
    assert!(keepalives >= 1, "{text}");
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "echo: replay me");
    // The line sent upstream had no `stream`: the batch accepted it.
    let (_, st) = s.status("alice-key", "sse-1", 0).await;
    assert_eq!(st["status"], "completed");
}

on_both_backends!(
    webhook_is_signed_per_standard_webhooks_and_verifies,
    failed_deliveries_are_retried_with_the_same_id,
    a_pending_webhook_is_delivered_after_a_restart,
    undeliverable_webhooks_end_dead,
    custom_ids_are_idempotent_and_conflicts_are_409,
    streaming_replay_sends_keepalives_then_chunks_then_done,
);
