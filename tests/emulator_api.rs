//! The Batch API emulator over real HTTP: each test starts
//! `ferry::emulator::serve` on 127.0.0.1:0 and drives it with reqwest. Time
//! moves through `POST /_emulator/clock`, never by sleeping.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use ferry::emulator::{EmulatorConfig, Profile};
use reqwest::StatusCode;
use serde_json::{Value, json};

const KEY: &str = "test-key";

struct Emu {
    base: String,
    http: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(config: EmulatorConfig) -> Emu {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = EmulatorConfig {
        api_key: KEY.to_owned(),
        ..config
    };
    tokio::spawn(async move {
        ferry::emulator::serve(listener, config, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Emu {
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
        _stop: stop,
    }
}

async fn openai() -> Emu {
    start(EmulatorConfig::default()).await
}

async fn moonshot() -> Emu {
    start(EmulatorConfig {
        profile: Profile::Moonshot,
        ..Default::default()
    })
    .await
}

/// A chat-completions batch line.
fn line(custom_id: &str, model: &str, text: &str) -> Value {
    json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": model, "messages": [{"role": "user", "content": text}]}})
}

fn jsonl(lines: &[Value]) -> Vec<u8> {
    let mut out = String::new();
    for l in lines {
        out.push_str(&l.to_string());
        out.push('\n');
    }
    out.into_bytes()
}

/// `n` good lines `r-0..r-{n-1}` for `gpt-4o-mini`, the text of each `hello i`.
fn good_lines(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| line(&format!("r-{i}"), "gpt-4o-mini", &format!("hello {i}")))
        .collect()
}

async fn decode(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, value)
}

impl Emu {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        decode(
            self.http
                .get(self.url(path))
                .bearer_auth(KEY)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        decode(
            self.http
                .post(self.url(path))
                .bearer_auth(KEY)
                .json(&body)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    async fn delete(&self, path: &str) -> (StatusCode, Value) {
        decode(
            self.http
                .delete(self.url(path))
                .bearer_auth(KEY)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    async fn upload_as(
        &self,
        filename: &str,
        purpose: &str,
        content: Vec<u8>,
    ) -> (StatusCode, Value) {
        let part = reqwest::multipart::Part::bytes(content).file_name(filename.to_owned());
        let form = reqwest::multipart::Form::new()
            .text("purpose", purpose.to_owned())
            .part("file", part);
        decode(
            self.http
                .post(self.url("/v1/files"))
                .bearer_auth(KEY)
                .multipart(form)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// Uploads a batch file and returns its id.
    async fn upload(&self, content: Vec<u8>) -> String {
        let (status, file) = self.upload_as("input.jsonl", "batch", content).await;
        assert_eq!(status, 200, "{file}");
        file["id"].as_str().unwrap().to_owned()
    }

    async fn create(&self, file_id: &str, window: &str) -> (StatusCode, Value) {
        self.post(
            "/v1/batches",
            json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": window}),
        )
        .await
    }

    /// Uploads `lines` and creates a batch over them; returns the batch.
    async fn batch_of(&self, lines: &[Value]) -> Value {
        let file = self.upload(jsonl(lines)).await;
        let window = if self.profile().await == "moonshot" {
            "1d"
        } else {
            "24h"
        };
        let (status, batch) = self.create(&file, window).await;
        assert_eq!(status, 200, "{batch}");
        assert_eq!(batch["status"], "validating");
        batch
    }

    async fn profile(&self) -> String {
        let (_, c) = decode(
            self.http
                .get(self.url("/_emulator/config"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        c["profile"].as_str().unwrap().to_owned()
    }

    async fn batch(&self, id: &str) -> Value {
        let (status, batch) = self.get(&format!("/v1/batches/{id}")).await;
        assert_eq!(status, 200, "{batch}");
        batch
    }

    async fn content(&self, file_id: &str) -> String {
        let resp = self
            .http
            .get(self.url(&format!("/v1/files/{file_id}/content")))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap()
    }

    /// The lines of an output or error file, parsed.
    async fn results(&self, file_id: &Value) -> Vec<Value> {
        let id = file_id
            .as_str()
            .unwrap_or_else(|| panic!("no file id: {file_id}"));
        self.content(id)
            .await
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    async fn advance(&self, seconds: f64) {
        let resp = self
            .http
            .post(self.url("/_emulator/clock"))
            .json(&json!({"advance_seconds": seconds}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }

    async fn configure(&self, patch: Value) -> Value {
        let (status, config) = decode(
            self.http
                .post(self.url("/_emulator/config"))
                .json(&patch)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200, "{config}");
        config
    }

    async fn stats(&self) -> Value {
        decode(
            self.http
                .get(self.url("/_emulator/stats"))
                .send()
                .await
                .unwrap(),
        )
        .await
        .1
    }
}

fn ids(results: &[Value]) -> Vec<String> {
    results
        .iter()
        .map(|r| r["custom_id"].as_str().unwrap().to_owned())
        .collect()
}

fn assert_error(status: StatusCode, body: &Value, expect: u16, kind: &str) {
    assert_eq!(status.as_u16(), expect, "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    for key in ["param", "code"] {
        assert!(
            body["error"].get(key).is_some(),
            "missing error.{key}: {body}"
        );
    }
}

const OPENAI_BATCH_KEYS: [&str; 22] = [
    "id",
    "object",
    "endpoint",
    "model",
    "errors",
    "input_file_id",
    "completion_window",
    "status",
    "output_file_id",
    "error_file_id",
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
    "request_counts",
    "usage",
    "metadata",
];

fn keys(v: &Value) -> HashSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

// ---- the happy path and the batch object -----------------------------------

#[tokio::test]
async fn zero_delays_complete_on_first_read_with_every_key() {
    let emu = openai().await;
    let created = emu.batch_of(&good_lines(3)).await;
    let expected: HashSet<String> = OPENAI_BATCH_KEYS.iter().map(|k| k.to_string()).collect();
    assert_eq!(keys(&created), expected);
    assert_eq!(created["object"], "batch");
    assert!(created["id"].as_str().unwrap().starts_with("batch_"));
    assert!(created["output_file_id"].is_null());
    assert!(created["in_progress_at"].is_null());
    assert_eq!(
        created["request_counts"],
        json!({"total": 0, "completed": 0, "failed": 0})
    );
    assert_eq!(
        created["expires_at"].as_i64().unwrap() - created["created_at"].as_i64().unwrap(),
        86_400
    );

    let done = emu.batch(created["id"].as_str().unwrap()).await;
    assert_eq!(keys(&done), expected);
    assert_eq!(done["status"], "completed");
    assert_eq!(done["model"], "gpt-4o-mini");
    assert!(done["errors"].is_null());
    assert!(done["error_file_id"].is_null());
    assert_eq!(
        done["request_counts"],
        json!({"total": 3, "completed": 3, "failed": 0})
    );
    let created_at = done["created_at"].as_i64().unwrap();
    for key in ["in_progress_at", "finalizing_at", "completed_at"] {
        assert_eq!(done[key].as_i64(), Some(created_at), "{key}");
    }
    // "hello i" is 2 words; "echo: hello i" is 3.
    assert_eq!(done["usage"]["input_tokens"], 6);
    assert_eq!(done["usage"]["output_tokens"], 9);
    assert_eq!(done["usage"]["total_tokens"], 15);

    let out = emu.results(&done["output_file_id"]).await;
    assert_eq!(out.len(), 3);
    for r in &out {
        let i = r["custom_id"].as_str().unwrap().trim_start_matches("r-");
        assert!(r["id"].as_str().unwrap().starts_with("batch_req_"));
        assert!(r["error"].is_null());
        assert_eq!(r["response"]["status_code"], 200);
        assert!(
            r["response"]["request_id"]
                .as_str()
                .unwrap()
                .starts_with("req_")
        );
        let body = &r["response"]["body"];
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["model"], "gpt-4o-mini");
        assert_eq!(
            body["choices"][0]["message"]["content"],
            format!("echo: hello {i}")
        );
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5})
        );
    }
    // Every custom_id is there, but not in input order.
    let got = ids(&out);
    assert_ne!(got, vec!["r-0", "r-1", "r-2"]);
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(sorted, vec!["r-0", "r-1", "r-2"]);

    // The output file is a `batch_output` File object.
    let (status, file) = emu
        .get(&format!(
            "/v1/files/{}",
            done["output_file_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, 200);
    assert_eq!(file["purpose"], "batch_output");
    assert_eq!(file["status"], "processed");
}

#[tokio::test]
async fn clock_walks_a_batch_through_every_phase() {
    let emu = start(EmulatorConfig {
        validating_seconds: 10.0,
        per_request_seconds: 10.0,
        finalizing_seconds: 10.0,
        ..Default::default()
    })
    .await;
    let batch = emu.batch_of(&good_lines(3)).await;
    let id = batch["id"].as_str().unwrap();
    let created_at = batch["created_at"].as_i64().unwrap();

    let b = emu.batch(id).await;
    assert_eq!(b["status"], "validating");
    assert!(b["model"].is_null());

    emu.advance(10.0).await;
    let b = emu.batch(id).await;
    assert_eq!(b["status"], "in_progress");
    assert_eq!(b["in_progress_at"].as_i64(), Some(created_at + 10));
    assert_eq!(
        b["request_counts"],
        json!({"total": 3, "completed": 0, "failed": 0})
    );
    assert!(b["output_file_id"].is_null());

    for done in 1..=2 {
        emu.advance(10.0).await;
        let b = emu.batch(id).await;
        assert_eq!(b["status"], "in_progress");
        assert_eq!(b["request_counts"]["completed"], done, "{b}");
        assert!(b["output_file_id"].is_null());
        assert!(b["finalizing_at"].is_null());
    }

    emu.advance(10.0).await;
    let b = emu.batch(id).await;
    assert_eq!(b["status"], "finalizing");
    assert_eq!(b["finalizing_at"].as_i64(), Some(created_at + 40));
    assert_eq!(b["request_counts"]["completed"], 3);
    assert!(b["output_file_id"].is_null());
    assert!(b["completed_at"].is_null());

    emu.advance(10.0).await;
    let b = emu.batch(id).await;
    assert_eq!(b["status"], "completed");
    assert_eq!(b["completed_at"].as_i64(), Some(created_at + 50));
    assert!(b["output_file_id"].is_string());
    assert!(b["error_file_id"].is_null());
    // The response bodies carry the time each line finished.
    let out = emu.results(&b["output_file_id"]).await;
    let mut created: Vec<i64> = out
        .iter()
        .map(|r| r["response"]["body"]["created"].as_i64().unwrap())
        .collect();
    created.sort();
    assert_eq!(
        created,
        vec![created_at + 20, created_at + 30, created_at + 40]
    );
}

#[tokio::test]
async fn turnaround_draws_decide_each_batch_time_in_validating_and_repeat() {
    let emu = start(EmulatorConfig {
        validating_seconds: 5.0,
        turnaround_median_seconds: Some(100.0),
        turnaround_spread: 1.0,
        seed: 9,
        ..Default::default()
    })
    .await;
    let drawn: Vec<f64> = (0..3)
        .map(|rank| ferry::emulator::timeline::drawn_turnaround(100.0, 1.0, 9, rank))
        .collect();
    let mut batches = Vec::new();
    for _ in 0..3 {
        batches.push(emu.batch_of(&good_lines(2)).await);
    }
    // After a `seed` change the ranks start again: the same draw as the first.
    emu.configure(json!({"seed": 9})).await;
    batches.push(emu.batch_of(&good_lines(2)).await);
    let expected = [drawn[0], drawn[1], drawn[2], drawn[0]];

    let shortest = drawn.iter().copied().fold(f64::INFINITY, f64::min);
    emu.advance(shortest - 1.5).await;
    for b in &batches {
        let b = emu.batch(b["id"].as_str().unwrap()).await;
        assert_eq!(b["status"], "validating", "{b}");
    }
    emu.advance(drawn.iter().copied().fold(0.0, f64::max)).await;
    for (b, want) in batches.iter().zip(expected) {
        let b = emu.batch(b["id"].as_str().unwrap()).await;
        assert_eq!(b["status"], "completed", "{b}");
        let took =
            (b["in_progress_at"].as_i64().unwrap() - b["created_at"].as_i64().unwrap()) as f64;
        assert!(
            (took - want).abs() <= 1.0,
            "validating took {took} s, drawn {want}"
        );
    }
}

#[tokio::test]
async fn failed_validation_lists_every_bad_line_in_order() {
    let emu = openai().await;
    let chat = |custom_id: &str, body: Value| json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body});
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let lines = [
        line("ok-1", "gpt-4o-mini", "fine"),
        json!({"method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-4o-mini", "messages": msgs}}),
        json!({"custom_id": "no-method", "url": "/v1/chat/completions", "body": {}}),
        json!({"custom_id": "no-url", "method": "POST", "body": {}}),
        json!({"custom_id": "no-body", "method": "POST", "url": "/v1/chat/completions"}),
        json!({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {}}),
        chat(
            "stream",
            json!({"model": "gpt-4o-mini", "messages": msgs, "stream": true}),
        ),
        chat("no-model", json!({"messages": msgs})),
        chat("no-messages", json!({"model": "gpt-4o-mini"})),
        chat(
            "unknown-model",
            json!({"model": "gpt-nope", "messages": msgs}),
        ),
        line("ok-1", "gpt-4o-mini", "again"),
        line("other-model", "gpt-4o", "x"),
    ];
    let mut content = jsonl(&lines);
    // An invalid JSON line in the middle (line 13) and a good one after it.
    content.extend_from_slice(b"{not json\n");
    content.extend_from_slice(&jsonl(&[line("ok-2", "gpt-4o-mini", "fine")]));
    let file = emu.upload(content).await;
    let (_, batch) = emu.create(&file, "24h").await;
    let b = emu.batch(batch["id"].as_str().unwrap()).await;
    assert_eq!(b["status"], "failed");
    assert!(b["failed_at"].is_i64());
    assert!(b["in_progress_at"].is_null());
    assert!(b["output_file_id"].is_null());
    assert!(b["error_file_id"].is_null());
    assert_eq!(
        b["request_counts"],
        json!({"total": 0, "completed": 0, "failed": 0})
    );
    assert_eq!(b["errors"]["object"], "list");
    let got: Vec<(String, Value, i64)> = b["errors"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
            (
                e["code"].as_str().unwrap().to_owned(),
                e["param"].clone(),
                e["line"].as_i64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, Value, i64)> = [
        ("missing_required_parameter", json!("custom_id"), 2),
        ("missing_required_parameter", json!("method"), 3),
        ("missing_required_parameter", json!("url"), 4),
        ("missing_required_parameter", json!("body"), 5),
        ("invalid_url", json!("url"), 6),
        ("streaming_unsupported", json!("body.stream"), 7),
        ("invalid_request", json!("body.model"), 8),
        ("invalid_request", json!("body.messages"), 9),
        ("model_not_found", json!("body.model"), 10),
        ("duplicate_custom_id", json!("custom_id"), 11),
        ("model_mismatch", json!("body.model"), 12),
        ("invalid_json_line", Value::Null, 13),
    ]
    .into_iter()
    .map(|(c, p, l)| (c.to_owned(), p, l))
    .collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn empty_file_and_too_many_tasks() {
    let emu = start(EmulatorConfig {
        max_lines: Some(3),
        ..Default::default()
    })
    .await;
    for (content, code) in [
        (Vec::new(), "empty_file"),
        (jsonl(&good_lines(4)), "too_many_tasks"),
    ] {
        let file = emu.upload(content).await;
        let (_, batch) = emu.create(&file, "24h").await;
        let b = emu.batch(batch["id"].as_str().unwrap()).await;
        assert_eq!(b["status"], "failed");
        let errors = b["errors"]["data"].as_array().unwrap();
        assert_eq!(errors.len(), 1, "{b}");
        assert_eq!(errors[0]["code"], code);
        assert!(errors[0]["line"].is_null());
    }
    // Exactly at the limit is fine.
    let b = emu.batch_of(&good_lines(3)).await;
    assert_eq!(
        emu.batch(b["id"].as_str().unwrap()).await["status"],
        "completed"
    );
}

#[tokio::test]
async fn per_request_failures_go_to_the_error_file() {
    let emu = openai().await;
    let lines = [
        line("ok", "gpt-4o-mini", "fine"),
        line("boom", "gpt-4o-mini", "please [emulator:status=500]"),
        line("slow", "gpt-4o-mini", "[emulator:status=429] later"),
    ];
    let batch = emu.batch_of(&lines).await;
    let b = emu.batch(batch["id"].as_str().unwrap()).await;
    assert_eq!(b["status"], "completed");
    assert_eq!(
        b["request_counts"],
        json!({"total": 3, "completed": 1, "failed": 2})
    );
    assert_eq!(ids(&emu.results(&b["output_file_id"]).await), vec!["ok"]);
    let errors = emu.results(&b["error_file_id"]).await;
    let mut by_id: Vec<(String, i64, String)> = errors
        .iter()
        .map(|e| {
            assert!(e["error"].is_null(), "{e}");
            (
                e["custom_id"].as_str().unwrap().to_owned(),
                e["response"]["status_code"].as_i64().unwrap(),
                e["response"]["body"]["error"]["type"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect();
    by_id.sort();
    assert_eq!(
        by_id,
        vec![
            ("boom".to_owned(), 500, "server_error".to_owned()),
            ("slow".to_owned(), 429, "rate_limit_error".to_owned())
        ]
    );

    // All failed: no output file at all.
    let batch = emu
        .batch_of(&[line("a", "gpt-4o-mini", "[emulator:status=400]")])
        .await;
    let b = emu.batch(batch["id"].as_str().unwrap()).await;
    assert_eq!(b["status"], "completed");
    assert!(b["output_file_id"].is_null());
    assert!(b["error_file_id"].is_string());
    assert!(b["usage"].is_null());
}

#[tokio::test]
async fn expiry_keeps_finished_lines_and_expires_the_rest() {
    let emu = start(EmulatorConfig {
        per_request_seconds: 10.0,
        expire_after_seconds: Some(25.0),
        ..Default::default()
    })
    .await;
    let batch = emu.batch_of(&good_lines(5)).await;
    let id = batch["id"].as_str().unwrap();
    let created_at = batch["created_at"].as_i64().unwrap();
    assert_eq!(batch["expires_at"].as_i64(), Some(created_at + 25));
    emu.advance(15.0).await;
    assert_eq!(emu.batch(id).await["status"], "in_progress");
    emu.advance(100.0).await;
    let b = emu.batch(id).await;
    assert_eq!(b["status"], "expired");
    assert_eq!(b["expired_at"].as_i64(), Some(created_at + 25));
    assert_eq!(
        b["request_counts"],
        json!({"total": 5, "completed": 2, "failed": 0})
    );
    let out = emu.results(&b["output_file_id"]).await;
    let mut kept = ids(&out);
    kept.sort();
    assert_eq!(kept, vec!["r-0", "r-1"]);
    let errors = emu.results(&b["error_file_id"]).await;
    let mut expired = ids(&errors);
    expired.sort();
    assert_eq!(expired, vec!["r-2", "r-3", "r-4"]);
    for e in &errors {
        assert!(e["response"].is_null());
        assert_eq!(e["error"]["code"], "batch_expired");
        assert_eq!(
            e["error"]["message"],
            "This request could not be executed before the completion window expired."
        );
    }
    // Expired is terminal: cancel is a conflict.
    let (status, body) = emu
        .post(&format!("/v1/batches/{id}/cancel"), json!({}))
        .await;
    assert_error(status, &body, 409, "invalid_request_error");
}

#[tokio::test]
async fn cancel_keeps_partial_output_and_is_idempotent() {
    let emu = start(EmulatorConfig {
        per_request_seconds: 10.0,
        cancel_seconds: 60.0,
        ..Default::default()
    })
    .await;
    let batch = emu.batch_of(&good_lines(5)).await;
    let id = batch["id"].as_str().unwrap();
    emu.advance(25.0).await;
    assert_eq!(emu.batch(id).await["request_counts"]["completed"], 2);

    let (status, c) = emu
        .post(&format!("/v1/batches/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["status"], "cancelling");
    assert!(c["cancelling_at"].is_i64());
    assert!(c["cancelled_at"].is_null());

    // No more lines run while cancelling.
    emu.advance(30.0).await;
    let b = emu.batch(id).await;
    assert_eq!(b["status"], "cancelling");
    assert_eq!(b["request_counts"]["completed"], 2);
    assert!(b["output_file_id"].is_null());
    // Cancelling again answers the batch unchanged.
    let (status, again) = emu
        .post(&format!("/v1/batches/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(again["status"], "cancelling");
    assert_eq!(again["cancelling_at"], c["cancelling_at"]);

    emu.advance(30.0).await;
    let b = emu.batch(id).await;
    assert_eq!(b["status"], "cancelled");
    assert_eq!(
        b["cancelled_at"].as_i64().unwrap() - b["cancelling_at"].as_i64().unwrap(),
        60
    );
    let mut kept = ids(&emu.results(&b["output_file_id"]).await);
    kept.sort();
    assert_eq!(kept, vec!["r-0", "r-1"]);
    let errors = emu.results(&b["error_file_id"]).await;
    assert_eq!(errors.len(), 3);
    assert!(
        errors
            .iter()
            .all(|e| e["error"]["code"] == "batch_cancelled" && e["response"].is_null())
    );

    let (status, again) = emu
        .post(&format!("/v1/batches/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(again, b);
}

#[tokio::test]
async fn cancel_while_validating_and_cancel_of_completed() {
    let emu = start(EmulatorConfig {
        validating_seconds: 100.0,
        ..Default::default()
    })
    .await;
    let batch = emu.batch_of(&good_lines(2)).await;
    let id = batch["id"].as_str().unwrap();
    let (status, c) = emu
        .post(&format!("/v1/batches/{id}/cancel"), json!({}))
        .await;
    assert_eq!(
        (status.as_u16(), c["status"].as_str()),
        (200, Some("cancelling"))
    );
    let b = emu.batch(id).await;
    assert_eq!(b["status"], "cancelled");
    assert!(b["in_progress_at"].is_null());
    assert!(b["output_file_id"].is_null());
    assert!(b["error_file_id"].is_null());

    emu.configure(json!({"validating_seconds": 0})).await;
    let batch = emu.batch_of(&good_lines(2)).await;
    let id = batch["id"].as_str().unwrap();
    assert_eq!(emu.batch(id).await["status"], "completed");
    let (status, body) = emu
        .post(&format!("/v1/batches/{id}/cancel"), json!({}))
        .await;
    assert_error(status, &body, 409, "invalid_request_error");
    let (status, body) = emu.post("/v1/batches/batch_nope/cancel", json!({})).await;
    assert_error(status, &body, 404, "invalid_request_error");
}

// ---- lists -------------------------------------------------------------------

#[tokio::test]
async fn batch_list_pages_newest_first() {
    let emu = openai().await;
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(
            emu.batch_of(&good_lines(1)).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();

    let (status, page) = emu.get("/v1/batches?limit=2").await;
    assert_eq!(status, 200);
    assert_eq!(page["object"], "list");
    let page_ids = |p: &Value| -> Vec<String> {
        p["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(page_ids(&page), newest_first[0..2]);
    assert_eq!(page["first_id"], newest_first[0].as_str());
    assert_eq!(page["last_id"], newest_first[1].as_str());
    assert_eq!(page["has_more"], true);
    // Listed batches are brought up to date too.
    assert_eq!(page["data"][0]["status"], "completed");

    let (_, page2) = emu
        .get(&format!("/v1/batches?limit=2&after={}", newest_first[1]))
        .await;
    assert_eq!(page_ids(&page2), newest_first[2..4]);
    assert_eq!(page2["has_more"], true);
    let (_, page3) = emu
        .get(&format!("/v1/batches?limit=2&after={}", newest_first[3]))
        .await;
    assert_eq!(page_ids(&page3), newest_first[4..5]);
    assert_eq!(page3["has_more"], false);

    let (_, all) = emu.get("/v1/batches").await;
    assert_eq!(page_ids(&all), newest_first);
    assert_eq!(all["has_more"], false);

    for bad in ["0", "101", "x"] {
        let (status, body) = emu.get(&format!("/v1/batches?limit={bad}")).await;
        assert_error(status, &body, 400, "invalid_request_error");
        assert_eq!(body["error"]["param"], "limit");
    }
}

#[tokio::test]
async fn file_list_retrieve_delete() {
    let emu = openai().await;
    let a = emu.upload(jsonl(&good_lines(1))).await;
    let (status, other) = emu
        .upload_as("notes.txt", "user_data", b"hello".to_vec())
        .await;
    assert_eq!(status, 200, "{other}");
    let b = emu.upload(jsonl(&good_lines(2))).await;

    let (_, list) = emu.get("/v1/files").await;
    let listed: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        vec![b.as_str(), other["id"].as_str().unwrap(), a.as_str()]
    );
    let (_, batch_only) = emu.get("/v1/files?purpose=batch&limit=1").await;
    assert_eq!(batch_only["data"][0]["id"], b.as_str());
    assert_eq!(batch_only["has_more"], true);
    let (_, next) = emu
        .get(&format!("/v1/files?purpose=batch&limit=1&after={b}"))
        .await;
    assert_eq!(next["data"][0]["id"], a.as_str());
    assert_eq!(next["has_more"], false);
    let (_, asc) = emu.get("/v1/files?order=asc").await;
    assert_eq!(asc["data"][0]["id"], a.as_str());

    let (status, file) = emu.get(&format!("/v1/files/{a}")).await;
    assert_eq!(status, 200);
    let expected: HashSet<String> = [
        "id",
        "object",
        "bytes",
        "created_at",
        "expires_at",
        "filename",
        "purpose",
        "status",
        "status_details",
    ]
    .iter()
    .map(|k| k.to_string())
    .collect();
    assert_eq!(keys(&file), expected);
    assert_eq!(file["object"], "file");
    assert_eq!(file["filename"], "input.jsonl");
    assert_eq!(
        file["bytes"].as_u64(),
        Some(jsonl(&good_lines(1)).len() as u64)
    );
    assert_eq!(
        file["expires_at"].as_i64().unwrap() - file["created_at"].as_i64().unwrap(),
        30 * 24 * 3600
    );
    assert_eq!(emu.content(&a).await.into_bytes(), jsonl(&good_lines(1)));

    // A batch keeps its input even if the file is deleted right after.
    let (_, batch) = emu.create(&a, "24h").await;
    let (status, deleted) = emu.delete(&format!("/v1/files/{a}")).await;
    assert_eq!(status, 200);
    assert_eq!(deleted, json!({"id": a, "object": "file", "deleted": true}));
    assert_eq!(
        emu.batch(batch["id"].as_str().unwrap()).await["status"],
        "completed"
    );
    for path in [format!("/v1/files/{a}"), format!("/v1/files/{a}/content")] {
        let (status, body) = emu.get(&path).await;
        assert_error(status, &body, 404, "invalid_request_error");
    }
    let (status, body) = emu.delete(&format!("/v1/files/{a}")).await;
    assert_error(status, &body, 404, "invalid_request_error");
}

// ---- synchronous checks ---------------------------------------------------------

#[tokio::test]
async fn upload_checks() {
    let emu = start(EmulatorConfig {
        max_file_bytes: Some(1000),
        ..Default::default()
    })
    .await;
    let (status, body) = emu.upload_as("input.csv", "batch", b"{}".to_vec()).await;
    assert_error(status, &body, 400, "invalid_request_error");
    let (status, body) = emu
        .upload_as("input.jsonl", "batch_output", b"{}".to_vec())
        .await;
    assert_error(status, &body, 400, "invalid_request_error");
    assert_eq!(body["error"]["param"], "purpose");
    let (status, body) = emu
        .upload_as("input.jsonl", "batch", vec![b' '; 1001])
        .await;
    assert_error(status, &body, 413, "invalid_request_error");
    let (status, _) = emu
        .upload_as("input.jsonl", "batch", vec![b' '; 1000])
        .await;
    assert_eq!(status, 200);
    // No purpose.
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(b"{}".to_vec()).file_name("a.jsonl"),
    );
    let resp = emu
        .http
        .post(emu.url("/v1/files"))
        .bearer_auth(KEY)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let (status, body) = decode(resp).await;
    assert_error(status, &body, 400, "invalid_request_error");
    assert_eq!(body["error"]["param"], "purpose");
    // Not multipart at all.
    let (status, body) = emu.post("/v1/files", json!({"purpose": "batch"})).await;
    assert_error(status, &body, 400, "invalid_request_error");
}

#[tokio::test]
async fn create_batch_checks() {
    let emu = openai().await;
    let file = emu.upload(jsonl(&good_lines(1))).await;
    let (_, notes) = emu
        .upload_as("notes.jsonl", "user_data", b"{}".to_vec())
        .await;
    let notes = notes["id"].as_str().unwrap();
    let base = json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    let with = |key: &str, value: Value| {
        let mut b = base.clone();
        if value.is_null() {
            b.as_object_mut().unwrap().remove(key);
        } else {
            b[key] = value;
        }
        b
    };
    let metadata: serde_json::Map<String, Value> =
        (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    let cases = [
        (with("input_file_id", Value::Null), 400, "input_file_id"),
        (with("endpoint", Value::Null), 400, "endpoint"),
        (
            with("completion_window", Value::Null),
            400,
            "completion_window",
        ),
        (
            with("input_file_id", json!("file-nope")),
            404,
            "input_file_id",
        ),
        (with("input_file_id", json!(notes)), 400, "input_file_id"),
        (
            with("endpoint", json!("/v1/images/generations")),
            400,
            "endpoint",
        ),
        (
            with("completion_window", json!("48h")),
            400,
            "completion_window",
        ),
        (
            with("completion_window", json!("1d")),
            400,
            "completion_window",
        ),
        (with("metadata", Value::Object(metadata)), 400, "metadata"),
        (
            with("metadata", json!({"k": "v".repeat(513)})),
            400,
            "metadata",
        ),
    ];
    for (body, status, param) in cases {
        let (got, err) = emu.post("/v1/batches", body.clone()).await;
        assert_error(got, &err, status, "invalid_request_error");
        assert_eq!(err["error"]["param"], param, "{body} → {err}");
    }
    let resp = emu
        .http
        .post(emu.url("/v1/batches"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let (status, err) = decode(resp).await;
    assert_error(status, &err, 400, "invalid_request_error");
    // Metadata comes back as given; other OpenAI endpoints are accepted.
    let (status, b) = emu
        .post("/v1/batches", with("metadata", json!({"job": "nightly"})))
        .await;
    assert_eq!(status, 200);
    assert_eq!(b["metadata"], json!({"job": "nightly"}));
    let emb = json!({"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                     "body": {"model": "text-embedding-3-small", "input": "abc"}});
    let file = emu.upload(jsonl(&[emb])).await;
    let (status, b) = emu
        .post("/v1/batches", json!({"input_file_id": file, "endpoint": "/v1/embeddings", "completion_window": "24h"}))
        .await;
    assert_eq!(status, 200, "{b}");
    let b = emu.batch(b["id"].as_str().unwrap()).await;
    assert_eq!(b["status"], "completed");
    let out = emu.results(&b["output_file_id"]).await;
    assert_eq!(out[0]["response"]["body"]["object"], "list");
}

// ---- auth and routing ------------------------------------------------------------

#[tokio::test]
async fn auth_and_unknown_routes() {
    let emu = openai().await;
    let resp = emu.http.get(emu.url("/v1/batches")).send().await.unwrap();
    let (status, body) = decode(resp).await;
    assert_error(status, &body, 401, "authentication_error");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let resp = emu
        .http
        .get(emu.url("/v1/models"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    let (status, body) = decode(resp).await;
    assert_error(status, &body, 401, "authentication_error");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    // Control routes need no key.
    let resp = emu
        .http
        .get(emu.url("/_emulator/stats"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let (status, body) = emu.get("/v1/batches/batch_nope").await;
    assert_error(status, &body, 404, "invalid_request_error");
    let (status, body) = emu.get("/v1/nothing/here").await;
    assert_error(status, &body, 404, "invalid_request_error");
    let (status, body) = emu.delete("/v1/batches").await;
    assert_error(status, &body, 405, "invalid_request_error");
    let (status, body) = emu.get("/v1/models/gpt-nope").await;
    assert_error(status, &body, 404, "invalid_request_error");
    let (status, models) = emu.get("/v1/models").await;
    assert_eq!(status, 200);
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "kimi-k2.6")
    );
}

// ---- profiles --------------------------------------------------------------------

#[tokio::test]
async fn moonshot_profile_differences() {
    let emu = moonshot().await;
    let file = emu.upload(jsonl(&[line("a", "kimi-k2.6", "hi")])).await;
    for window in ["12h", "24h", "1d", "3d", "7d", "168h"] {
        let (status, b) = emu.create(&file, window).await;
        assert_eq!(status, 200, "{window}: {b}");
        assert_eq!(b["completion_window"], window);
    }
    for window in ["11h", "8d", "1w", "forever"] {
        let (status, b) = emu.create(&file, window).await;
        assert_error(status, &b, 400, "invalid_request_error");
        assert_eq!(b["error"]["param"], "completion_window");
    }
    let (status, b) = emu
        .post(
            "/v1/batches",
            json!({"input_file_id": file, "endpoint": "/v1/embeddings", "completion_window": "1d"}),
        )
        .await;
    assert_error(status, &b, 400, "invalid_request_error");
    assert_eq!(b["error"]["param"], "endpoint");

    let (_, created) = emu.create(&file, "3d").await;
    let id = created["id"].as_str().unwrap();
    assert_eq!(
        created["expires_at"].as_i64().unwrap() - created["created_at"].as_i64().unwrap(),
        3 * 86_400
    );
    let b = emu.batch(id).await;
    assert_eq!(b["status"], "completed");
    let expected: HashSet<String> = OPENAI_BATCH_KEYS
        .iter()
        .filter(|k| !["errors", "expired_at", "usage", "model"].contains(k))
        .map(|k| k.to_string())
        .collect();
    assert_eq!(keys(&b), expected);
    let out = emu.results(&b["output_file_id"]).await;
    assert_eq!(
        out[0]["response"]["body"]["choices"][0]["message"]["content"],
        "echo: hi"
    );

    // Cancel of a finished batch is a 400 here, not a 409.
    let (status, body) = emu
        .post(&format!("/v1/batches/{id}/cancel"), json!({}))
        .await;
    assert_error(status, &body, 400, "invalid_request_error");

    let (_, list) = emu.get("/v1/batches?limit=2").await;
    assert_eq!(
        keys(&list),
        ["object", "data", "has_more"]
            .iter()
            .map(|k| k.to_string())
            .collect()
    );
    assert_eq!(list["has_more"], true);

    // Sampling parameters fail the batch.
    for p in [
        "temperature",
        "top_p",
        "n",
        "presence_penalty",
        "frequency_penalty",
    ] {
        let mut l = line("a", "kimi-k2.6", "hi");
        l["body"][p] = json!(1);
        let file = emu.upload(jsonl(&[l])).await;
        let (_, b) = emu.create(&file, "1d").await;
        let b = emu.batch(b["id"].as_str().unwrap()).await;
        assert_eq!(b["status"], "failed", "{p}");
        assert!(b.get("errors").is_none());
    }
}

#[tokio::test]
async fn moonshot_cancel_of_cancelled_is_400() {
    let emu = start(EmulatorConfig {
        profile: Profile::Moonshot,
        validating_seconds: 50.0,
        ..Default::default()
    })
    .await;
    let b = emu.batch_of(&[line("a", "kimi-k2.5", "hi")]).await;
    let path = format!("/v1/batches/{}/cancel", b["id"].as_str().unwrap());
    let (status, c) = emu.post(&path, json!({})).await;
    assert_eq!(
        (status.as_u16(), c["status"].as_str()),
        (200, Some("cancelling"))
    );
    let (status, body) = emu.post(&path, json!({})).await;
    assert_error(status, &body, 400, "invalid_request_error");
}

#[tokio::test]
async fn moonshot_batch_file_quota() {
    // The real default: 1,000 batch files at once.
    let emu = moonshot().await;
    let content = jsonl(&[line("a", "kimi-k2.6", "hi")]);
    let mut ids = Vec::new();
    for _ in 0..1000 {
        ids.push(emu.upload(content.clone()).await);
    }
    let (status, body) = emu.upload_as("x.jsonl", "batch", content.clone()).await;
    assert_error(status, &body, 400, "invalid_request_error");
    assert!(body["error"]["message"].as_str().unwrap().contains("1000"));
    // Other purposes do not count; deleting frees a place.
    let (status, _) = emu.upload_as("x.txt", "user_data", b"x".to_vec()).await;
    assert_eq!(status, 200);
    assert_eq!(emu.delete(&format!("/v1/files/{}", ids[0])).await.0, 200);
    // Output files (purpose batch_output) do not count either.
    let (_, b) = emu.create(&ids[1], "1d").await;
    let b = emu.batch(b["id"].as_str().unwrap()).await;
    assert!(b["output_file_id"].is_string());
    let (status, _) = emu.upload_as("x.jsonl", "batch", content.clone()).await;
    assert_eq!(status, 200);
    let (status, body) = emu.upload_as("x.jsonl", "batch", content).await;
    assert_error(status, &body, 400, "invalid_request_error");
}

#[tokio::test]
async fn openai_has_no_file_quota() {
    let emu = start(EmulatorConfig {
        max_batch_files: Some(2),
        ..Default::default()
    })
    .await;
    emu.upload(b"{}".to_vec()).await;
    emu.upload(b"{}".to_vec()).await;
    let (status, body) = emu.upload_as("x.jsonl", "batch", b"{}".to_vec()).await;
    assert_error(status, &body, 400, "invalid_request_error");
    emu.configure(json!({"max_batch_files": null})).await;
    for _ in 0..3 {
        emu.upload(b"{}".to_vec()).await;
    }
}

// ---- faults ----------------------------------------------------------------------

#[tokio::test]
async fn token_limit_fault_fails_the_next_batches() {
    let emu = start(EmulatorConfig {
        fail_next_batches_token_limit: 2,
        ..Default::default()
    })
    .await;
    for _ in 0..2 {
        let b = emu.batch_of(&good_lines(2)).await;
        let b = emu.batch(b["id"].as_str().unwrap()).await;
        assert_eq!(b["status"], "failed");
        let errors = b["errors"]["data"].as_array().unwrap();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0]["code"], "token_limit_exceeded");
        assert!(errors[0]["line"].is_null());
        assert!(b["output_file_id"].is_null());
    }
    assert_eq!(
        emu.configure(json!({})).await["fail_next_batches_token_limit"],
        0
    );
    let b = emu.batch_of(&good_lines(2)).await;
    assert_eq!(
        emu.batch(b["id"].as_str().unwrap()).await["status"],
        "completed"
    );
}

#[tokio::test]
async fn error_rate_answers_5xx_repeatably() {
    let emu = start(EmulatorConfig {
        error_rate: 1.0,
        ..Default::default()
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let (status, body) = emu.get("/v1/models").await;
        assert_eq!(body["error"]["type"], "server_error");
        statuses.push(status.as_u16());
    }
    assert_eq!(statuses, vec![500, 503, 500, 503]);
    // An injected failure creates nothing.
    let (status, _) = emu.upload_as("a.jsonl", "batch", b"{}".to_vec()).await;
    assert!(status.is_server_error());
    // Control routes are never faulted.
    assert_eq!(emu.stats().await["files_uploaded"], 0);

    emu.configure(json!({"error_rate": 0.5, "seed": 42})).await;
    let mut first = Vec::new();
    for _ in 0..20 {
        first.push(emu.get("/v1/models").await.0.as_u16());
    }
    emu.configure(json!({"seed": 42})).await;
    let mut second = Vec::new();
    for _ in 0..20 {
        second.push(emu.get("/v1/models").await.0.as_u16());
    }
    assert_eq!(first, second);
    assert!(
        first.contains(&200) && first.iter().any(|s| *s >= 500),
        "{first:?}"
    );
    emu.configure(json!({"error_rate": 0})).await;
    assert_eq!(emu.get("/v1/models").await.0, 200);
}

#[tokio::test]
async fn latency_delays_calls_and_changes_nothing_else() {
    let emu = openai().await;
    let fast = emu.batch_of(&good_lines(2)).await;
    let fast = emu.batch(fast["id"].as_str().unwrap()).await;
    emu.configure(json!({"latency_ms": 150})).await;
    let started = Instant::now();
    let slow = emu.batch_of(&good_lines(2)).await;
    let slow = emu.batch(slow["id"].as_str().unwrap()).await;
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(slow["status"], fast["status"]);
    assert_eq!(slow["request_counts"], fast["request_counts"]);
    assert_eq!(slow["usage"], fast["usage"]);
    // The control routes are not delayed.
    let started = Instant::now();
    emu.stats().await;
    assert!(started.elapsed() < Duration::from_millis(150));
}

#[tokio::test]
async fn config_endpoint_merges_and_refuses_bad_keys() {
    let emu = openai().await;
    let c = emu.configure(json!({"per_request_seconds": 2.5})).await;
    assert_eq!(c["per_request_seconds"], 2.5);
    assert_eq!(c["profile"], "openai");
    for bad in [
        json!({"per_request_second": 1}),
        json!({"error_rate": 3}),
        json!({"profile": "azure"}),
    ] {
        let resp = emu
            .http
            .post(emu.url("/_emulator/config"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        let (status, body) = decode(resp).await;
        assert_error(status, &body, 400, "invalid_request_error");
    }
    let resp = emu
        .http
        .post(emu.url("/_emulator/clock"))
        .json(&json!({"advance_seconds": -5}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

// ---- stats -----------------------------------------------------------------------

#[tokio::test]
async fn stats_count_duplicate_executions() {
    let emu = openai().await;
    let b1 = emu.batch_of(&good_lines(3)).await;
    emu.batch(b1["id"].as_str().unwrap()).await;
    let s = emu.stats().await;
    assert_eq!(s["files_uploaded"], 1);
    assert_eq!(s["lines_submitted"], 3);
    assert_eq!(s["distinct_custom_ids"], 3);
    assert_eq!(s["executed_lines"], 3);
    assert_eq!(s["executed_more_than_once"], 0);
    assert_eq!(s["batches_by_status"]["completed"], 1);

    // The same two custom_ids again, in a second batch: a duplicate submission.
    let b2 = emu.batch_of(&good_lines(2)).await;
    let s = emu.stats().await;
    assert_eq!(s["lines_submitted"], 5);
    assert_eq!(s["distinct_custom_ids"], 3);
    assert_eq!(s["executed_lines"], 5);
    assert_eq!(s["executed_more_than_once"], 2);
    assert_eq!(s["batches_by_status"]["completed"], 2);
    assert_eq!(
        emu.batch(b2["id"].as_str().unwrap()).await["status"],
        "completed"
    );

    // Expired and cancelled lines are not executions.
    emu.configure(json!({"per_request_seconds": 10, "expire_after_seconds": 15}))
        .await;
    emu.batch_of(&[
        line("late-1", "gpt-4o-mini", "x"),
        line("late-2", "gpt-4o-mini", "y"),
    ])
    .await;
    emu.advance(100.0).await;
    let s = emu.stats().await;
    assert_eq!(s["batches_by_status"]["expired"], 1);
    assert_eq!(s["executed_lines"], 6);
    assert_eq!(s["distinct_custom_ids"], 5);
    assert!(s["api_calls"].as_u64().unwrap() > 5);
}

// ---- real time -------------------------------------------------------------------

#[tokio::test]
async fn realtime_chat_plain_streaming_and_injected() {
    let emu = openai().await;
    let body = json!({"model": "gpt-4o", "messages": [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "how are you"}
    ]});
    let (status, c) = emu.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{c}");
    assert!(c["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(c["model"], "gpt-4o");
    assert_eq!(
        c["choices"][0]["message"],
        json!({"role": "assistant", "content": "echo: how are you", "refusal": null, "annotations": []})
    );
    assert_eq!(c["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        c["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9})
    );

    let mut stream = body.clone();
    stream["stream"] = json!(true);
    stream["stream_options"] = json!({"include_usage": true});
    let resp = emu
        .http
        .post(emu.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&stream)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = resp.text().await.unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap())
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "echo: how are you");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let finish: Vec<&Value> = chunks
        .iter()
        .filter(|c| c["choices"][0]["finish_reason"] == "stop")
        .collect();
    assert_eq!(finish.len(), 1);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["total_tokens"], 9);

    let (status, err) = emu
        .post(
            "/v1/chat/completions",
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "[emulator:status=503]"}]}),
        )
        .await;
    assert_error(status, &err, 503, "server_error");
    let (status, err) = emu
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_error(status, &err, 400, "invalid_request_error");
    let (status, err) = emu
        .post("/v1/chat/completions", json!({"model": "gpt-4o"}))
        .await;
    assert_error(status, &err, 400, "invalid_request_error");
    assert_eq!(err["error"]["param"], "messages");
    let (status, err) = emu
        .post(
            "/v1/chat/completions",
            json!({"model": "gpt-nope", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_error(status, &err, 404, "invalid_request_error");
    assert_eq!(err["error"]["code"], "model_not_found");

    // Large bodies (2 MB, well over 64 KiB and the 1 MiB control limit) are fine.
    let big = "word ".repeat(400_000);
    let (status, c) = emu
        .post(
            "/v1/chat/completions",
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": big}]}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(c["usage"]["completion_tokens"], 400_001);
    assert_eq!(emu.stats().await["realtime_requests"], 7);
}

// ---- scale -----------------------------------------------------------------------

#[tokio::test]
async fn fifty_thousand_lines_round_trip() {
    let emu = openai().await;
    let n = 50_000;
    let mut content = Vec::with_capacity(n * 150);
    for i in 0..n {
        content.extend_from_slice(
            format!(
                "{{\"custom_id\":\"c{i}\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"n {i}\"}}]}}}}\n"
            )
            .as_bytes(),
        );
    }
    let started = Instant::now();
    let file = emu.upload(content).await;
    let (status, batch) = emu.create(&file, "24h").await;
    assert_eq!(status, 200);
    let b = emu.batch(batch["id"].as_str().unwrap()).await;
    assert_eq!(b["status"], "completed");
    assert_eq!(b["request_counts"]["completed"], n);
    let out = emu.content(b["output_file_id"].as_str().unwrap()).await;
    let mut seen = vec![false; n];
    let mut count = 0;
    for l in out.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        let i: usize = v["custom_id"].as_str().unwrap()[1..].parse().unwrap();
        assert_eq!(
            v["response"]["body"]["choices"][0]["message"]["content"],
            format!("echo: n {i}")
        );
        seen[i] = true;
        count += 1;
    }
    assert_eq!(count, n);
    assert!(seen.iter().all(|s| *s));
    eprintln!("50,000-line round trip took {:?}", started.elapsed());
}

#[tokio::test]
async fn flex_is_slower_sometimes_unavailable_and_says_so() {
    let emu = start(EmulatorConfig {
        flex_models: vec!["gpt-4o-mini".into()],
        ..Default::default()
    })
    .await;
    let call = |model: &'static str, endpoint: &'static str| {
        let input = if endpoint == "/v1/responses" {
            json!({"model": model, "input": "hi", "service_tier": "flex"})
        } else {
            json!({"model": model, "service_tier": "flex",
                   "messages": [{"role": "user", "content": "hi"}]})
        };
        emu.post(endpoint, input)
    };
    let (status, c) = call("gpt-4o-mini", "/v1/chat/completions").await;
    assert_eq!(
        (status, &c["service_tier"]),
        (StatusCode::OK, &json!("flex")),
        "{c}"
    );
    assert_eq!(c["object"], "chat.completion");
    let (status, r) = call("gpt-4o-mini", "/v1/responses").await;
    assert_eq!(
        (status, &r["service_tier"]),
        (StatusCode::OK, &json!("flex")),
        "{r}"
    );
    // Without flex the answer is on the default tier.
    let (_, plain) = emu
        .post(
            "/v1/chat/completions",
            json!({"model": "gpt-4o-mini",
               "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(plain["service_tier"], "default");
    // A model without flex refuses it.
    let (status, e) = call("gpt-4o", "/v1/chat/completions").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["param"], "service_tier");

    emu.configure(json!({"flex_latency_ms": 150})).await;
    let started = Instant::now();
    assert_eq!(
        call("gpt-4o-mini", "/v1/chat/completions").await.0,
        StatusCode::OK
    );
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );

    emu.configure(json!({"flex_latency_ms": 0, "flex_unavailable_rate": 0.5, "seed": 7}))
        .await;
    let mut first = Vec::new();
    for _ in 0..20 {
        let (status, body) = call("gpt-4o-mini", "/v1/chat/completions").await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(body["error"]["code"], "resource_unavailable", "{body}");
        }
        first.push(status.as_u16());
    }
    emu.configure(json!({"seed": 7})).await;
    let mut second = Vec::new();
    for _ in 0..20 {
        second.push(call("gpt-4o-mini", "/v1/chat/completions").await.0.as_u16());
    }
    assert_eq!(first, second, "the same seed refuses the same calls");
    assert!(first.contains(&200) && first.contains(&429), "{first:?}");
    // Calls on the default tier are never refused for flex capacity.
    let (status, _) = emu
        .post(
            "/v1/chat/completions",
            json!({"model": "gpt-4o-mini",
               "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let resp = emu
        .http
        .post(emu.url("/_emulator/config"))
        .json(&json!({"flex_unavailable_rate": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}
