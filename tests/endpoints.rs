//! Every endpoint a Batch API takes, deferred like chat, with the official
//! `openai` Python SDK as the client: held calls answered with the SDK's
//! own types, the Responses API's replayed event stream, the 202 ticket and
//! its lookup; chat and embeddings of one model flushed into one batch per
//! endpoint (on both stores); and the rule for an endpoint the upstream
//! cannot batch (400 when asked for, passthrough by a tenant's default).

mod common;

use common::{Backend, Stack};
use serde_json::{Value, json};

#[test]
fn the_openai_sdk_defers_every_endpoint() {
    // Queues flush 0.3 s after their first request.
    let s = Stack::start("max_wait_secs = 0.3", "");
    let out = common::run_python(
        "ferry_endpoints.py",
        &[
            ("FERRY_BASE_URL", s.url("/v1")),
            ("FERRY_KEY", "alice-key".to_owned()),
            ("FERRY_STEP", "held".to_owned()),
        ],
        "",
    );
    for step in [
        "embeddings held ok",
        "completions held ok",
        "completions stream replay ok",
        "moderations held ok",
        "responses held ok",
        "responses stream replay ok",
        "embeddings ticket and lookup ok",
    ] {
        assert!(out.contains(step), "missing `{step}` in:\n{out}");
    }
}

async fn chat_and_embeddings_of_one_model_make_one_batch_each(backend: Backend) {
    let s = Stack::start_on(backend, "", "");
    let out = common::run_python(
        "ferry_endpoints.py",
        &[
            ("FERRY_BASE_URL", s.url("/v1")),
            ("FERRY_KEY", "alice-key".to_owned()),
            ("FERRY_STEP", "mixed".to_owned()),
        ],
        "",
    );
    assert!(out.contains("queued"), "{out}");
    s.flush().await;
    for n in 0..3 {
        for kind in ["chat", "emb"] {
            let st = common::until_status(&s, &format!("mixed-{kind}-{n}"), "completed").await;
            let object = &st["result"]["body"]["object"];
            let want = if kind == "chat" {
                "chat.completion"
            } else {
                "list"
            };
            assert_eq!(object, want, "{st}");
        }
    }
    let batches = s.upstream_get("/v1/batches?limit=100").await;
    let mut seen: Vec<(String, u64)> = batches["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["endpoint"].as_str().unwrap().to_owned(),
                b["request_counts"]["total"].as_u64().unwrap(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("/v1/chat/completions".to_owned(), 3),
            ("/v1/embeddings".to_owned(), 3)
        ],
        "{batches}"
    );
    // Tokens are counted per endpoint; embeddings count no completion tokens.
    let metrics = s.metrics().await;
    let tokens = |endpoint: &str, kind: &str| -> f64 {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("ferry_tokens_total{")
                    && l.contains(&format!("endpoint=\"{endpoint}\""))
                    && l.contains(&format!("kind=\"{kind}\""))
                    && l.contains("model=\"gpt-4o-mini\"")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {endpoint} {kind} tokens in:\n{metrics}"))
    };
    assert_eq!(tokens("embeddings", "prompt"), 9.0, "3 requests of 3 words");
    assert_eq!(tokens("embeddings", "completion"), 0.0);
    assert!(tokens("chat_completions", "completion") > 0.0);
}

on_both_backends!(chat_and_embeddings_of_one_model_make_one_batch_each);

/// A Ferry whose upstream is a generic provider (which batches chat only).
fn generic_stack() -> Stack {
    let dir = tempfile::tempdir().expect("tempdir");
    let emulator = common::emulator(dir.path(), &[]);
    let cfg = common::config(dir.path(), emulator.addr("emulator"), "", "")
        .replace("kind = \"openai\"", "kind = \"generic\"");
    let ferry = common::ferry(dir.path(), &cfg);
    Stack {
        dir,
        emulator: Some(emulator),
        ferry,
        http: reqwest::Client::new(),
    }
}

#[tokio::test]
async fn an_endpoint_the_upstream_cannot_batch_is_refused_when_asked_and_passed_through_by_default()
{
    let s = generic_stack();
    let body = json!({"model": "text-embedding-3-small", "input": "x"});
    let asked = s
        .http
        .post(s.url("/v1/embeddings"))
        .bearer_auth("alice-key")
        .header("prefer", "respond-async")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(asked.status(), 400);
    let err: Value = asked.json().await.unwrap();
    assert_eq!(err["error"]["type"], "invalid_request_error", "{err}");
    assert_eq!(err["error"]["param"], Value::Null, "{err}");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("/v1/embeddings") && message.contains("`emu`"),
        "{message}"
    );
    // batchy defers by default: its embeddings call is answered in real time.
    let by_default = s
        .http
        .post(s.url("/v1/embeddings"))
        .bearer_auth("batchy-key")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(by_default.status(), 200);
    let v: Value = by_default.json().await.unwrap();
    assert_eq!(v["object"], "list", "{v}");
    assert_eq!(s.emulator_stats().await["realtime_requests"], 1);
    // Chat, which the upstream batches, is still deferred by the default.
    let chat = s
        .http
        .post(s.url("/v1/chat/completions"))
        .bearer_auth("batchy-key")
        .header("prefer", "wait=0")
        .json(&common::chat("gpt-4o-mini", "hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 202);
}

/// Two embeddings requests of 30,000 inputs each: OpenAI takes at most
/// 50,000 embedding inputs in one batch (the emulator fails a batch over
/// it). Their queue holds 60,000 inputs, so it is full: it flushes without
/// being asked, the first request alone; the second, 30,000 inputs, waits
/// for a flush of its own.
#[tokio::test]
async fn embeddings_over_fifty_thousand_inputs_go_in_two_batches() {
    let s = Stack::start("", "");
    for n in 0..2 {
        let inputs: Vec<String> = (0..30_000).map(|i| format!("w{i}")).collect();
        let r = s
            .http
            .post(s.url("/v1/embeddings"))
            .bearer_auth("alice-key")
            .header("prefer", "respond-async")
            .header("x-ferry-custom-id", format!("big-{n}"))
            .json(&json!({"model": "text-embedding-3-small", "input": inputs}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    }
    for n in 0..2 {
        if n == 1 {
            s.flush().await;
        }
        let st = common::until(&s, &format!("big-{n}"), "terminal", |st| {
            !matches!(st["status"].as_str(), Some("queued" | "submitted"))
        })
        .await;
        assert_eq!(st["status"], "completed", "{st}");
        assert_eq!(
            st["result"]["body"]["data"].as_array().map(Vec::len),
            Some(30_000)
        );
    }
    let batches = s.upstream_get("/v1/batches?limit=100").await;
    let statuses: Vec<&str> = batches["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["completed", "completed"], "{batches}");
}
