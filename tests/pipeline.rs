//! End-to-end tests of Ferry's core: passthrough and the deferred pipeline,
//! with the real binary in front of a standalone emulator process.

mod common;

use std::io::Read;

use common::{Backend, Stack, chat, until_status};
use futures::StreamExt;
use serde_json::{Value, json};

#[tokio::test]
async fn passthrough_replaces_the_key_and_answers_unchanged() {
    let s = Stack::start("", "");
    // The emulator accepts only its own key: success proves the swap.
    let r = s
        .http
        .get(s.url("/v1/models"))
        .bearer_auth("alice-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let models: Value = r.json().await.unwrap();
    assert_eq!(models["object"], "list");

    let r = s
        .chat_call("alice-key", &chat("gpt-4o-mini", "hello there"))
        .await;
    assert_eq!(r.status(), 200);
    let c: Value = r.json().await.unwrap();
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(c["choices"][0]["message"]["content"], "echo: hello there");

    // The upstream's own errors pass through verbatim.
    let r = s.chat_call("alice-key", &chat("no-such-model", "x")).await;
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "model_not_found");
    // Nothing of this went through the batch path.
    assert_eq!(s.emulator_stats().await["lines_submitted"], 0);
}

#[tokio::test]
async fn missing_or_unknown_keys_are_401_in_the_envelope() {
    let s = Stack::start("", "");
    for key in [None, Some("nope")] {
        let mut req = s
            .http
            .post(s.url("/v1/chat/completions"))
            .json(&chat("gpt-4o-mini", "x"));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401);
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["type"], "authentication_error");
        assert_eq!(e["error"]["code"], "invalid_api_key");
    }
    let r = s.http.get(s.url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = s.http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn passthrough_streams_sse_and_carries_large_bodies_intact() {
    let s = Stack::start("", "");
    let mut body = chat("gpt-4o-mini", "stream me");
    body["stream"] = json!(true);
    let r = s.chat_call("alice-key", &body).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut text = String::new();
    let mut stream = r.bytes_stream();
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let content: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(content, "echo: stream me");

    // 200 KiB of text, well over 64 KiB, comes back whole.
    let big: String = (0..200 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let r = s.chat_call("alice-key", &chat("gpt-4o-mini", &big)).await;
    assert_eq!(r.status(), 200);
    let c: Value = r.json().await.unwrap();
    assert_eq!(
        c["choices"][0]["message"]["content"].as_str().unwrap(),
        format!("echo: {big}")
    );
}

#[tokio::test]
async fn unreachable_upstream_is_502_and_a_silent_one_504() {
    let dir = tempfile::tempdir().unwrap();
    // A port with nobody listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = common::config(dir.path(), closed, "", "");
    let ferry = common::ferry(dir.path(), &cfg);
    let http = reqwest::Client::new();
    let r = http
        .get(format!("http://{}/v1/models", ferry.addr("proxy")))
        .bearer_auth("alice-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "upstream_unreachable");

    // A server that accepts and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent.incoming() {
            let Ok(mut c) = conn else { break };
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            // Keep the connection open and silent.
            held.push(c);
        }
    });
    let dir2 = tempfile::tempdir().unwrap();
    let cfg = common::config(
        dir2.path(),
        silent_addr,
        "",
        "upstream_read_timeout_secs = 1",
    );
    let ferry = common::ferry(dir2.path(), &cfg);
    let r = http
        .get(format!("http://{}/v1/models", ferry.addr("proxy")))
        .bearer_auth("alice-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "upstream_timeout");
}

async fn deferred_call_gets_a_ticket_then_its_result_by_long_poll(backend: Backend) {
    let s = Stack::start_on(backend, "", "");
    let r = s
        .defer(
            "alice-key",
            &chat("gpt-4o-mini", "hello batch"),
            None,
            Some("invoice-7731"),
        )
        .await;
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    assert_eq!(r.headers()["location"], "/v1/ferry/requests/invoice-7731");
    assert_eq!(r.headers()["preference-applied"], "respond-async");
    let ticket: Value = r.json().await.unwrap();
    assert_eq!(ticket["id"], "invoice-7731");
    assert_eq!(ticket["object"], "ferry.request");
    assert_eq!(ticket["status"], "queued");
    assert_eq!(ticket["model"], "gpt-4o-mini");
    assert!(ticket["result"].is_null());

    // Nothing flushes on its own here (max_wait is an hour); the long-poll
    // below is woken by the result, which the manual flush brings.
    let (pending, _) = tokio::join!(s.status("alice-key", "invoice-7731", 60), async {
        s.flush().await;
    });
    let (code, st) = pending;
    assert_eq!(code, 200);
    assert_eq!(st["status"], "completed", "{st}");
    assert!(st["batch_id"].as_str().unwrap().starts_with("batch_"));
    assert!(st["submitted_at"].as_u64().is_some() && st["completed_at"].as_u64().is_some());
    assert_eq!(st["result"]["status_code"], 200);
    assert_eq!(
        st["result"]["body"]["choices"][0]["message"]["content"],
        "echo: hello batch"
    );

    // The result route answers with the upstream's response verbatim.
    let r = s
        .http
        .get(s.url("/v1/ferry/requests/invoice-7731/result"))
        .bearer_auth("alice-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body, st["result"]["body"]);

    let stats = s.emulator_stats().await;
    assert_eq!(stats["lines_submitted"], 1);
    // The input and output files are deleted once the batch is done.
    s.until_no_live_batches().await;
    let files = s.upstream_get("/v1/files").await;
    assert_eq!(files["data"].as_array().unwrap().len(), 0, "{files}");
}

async fn wait_returns_the_chat_completion_itself(backend: Backend) {
    // Flush by time after 0.2 s: the held call comes back with the answer.
    let s = Stack::start_on(backend, "max_wait_secs = 0.2", "");
    let r = s
        .defer("alice-key", &chat("gpt-4o-mini", "hold me"), Some(60), None)
        .await;
    assert_eq!(r.status(), 200);
    let c: Value = r.json().await.unwrap();
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(c["choices"][0]["message"]["content"], "echo: hold me");

    // The tenant default (defer, wait 30 s) applies with no Prefer header.
    let r = s
        .chat_call("batchy-key", &chat("gpt-4o-mini", "by default"))
        .await;
    assert_eq!(r.status(), 200);
    let c: Value = r.json().await.unwrap();
    assert_eq!(c["choices"][0]["message"]["content"], "echo: by default");
    assert_eq!(s.emulator_stats().await["lines_submitted"], 2);
    assert_eq!(s.emulator_stats().await["realtime_requests"], 0);
}

async fn flush_by_size_puts_exactly_max_requests_in_a_batch(backend: Backend) {
    let s = Stack::start_on(backend, "max_requests = 3", "");
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = s
            .defer(
                "alice-key",
                &chat("gpt-4o-mini", &format!("n{i}")),
                None,
                None,
            )
            .await;
        assert_eq!(r.status(), 202);
        ids.push(
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    for (i, id) in ids.iter().enumerate() {
        let (_, st) = s.status("alice-key", id, 60).await;
        assert_eq!(st["status"], "completed");
        assert_eq!(
            st["result"]["body"]["choices"][0]["message"]["content"],
            format!("echo: n{i}")
        );
    }
    let stats = s.emulator_stats().await;
    assert_eq!(stats["lines_submitted"], 3);
    assert_eq!(stats["batches_by_status"]["completed"], 1, "{stats}");
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("ferry_flushes_total{reason=\"size\",upstream=\"emu\"} 1"),
        "{metrics}"
    );
}

async fn flush_by_bytes_and_two_models_make_separate_batches(backend: Backend) {
    // Each line is ~160 bytes: 1,024 bytes is reached at the 7th request.
    let s = Stack::start_on(backend, "max_bytes = 1024", "");
    let mut ids = Vec::new();
    for i in 0..7 {
        let r = s
            .defer(
                "alice-key",
                &chat("gpt-4o-mini", &format!("bytes {i}")),
                None,
                None,
            )
            .await;
        ids.push(
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let (_, st) = s.status("alice-key", &ids[0], 60).await;
    assert_eq!(st["status"], "completed");
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("ferry_flushes_total{reason=\"bytes\",upstream=\"emu\"} 1"),
        "{metrics}"
    );

    // Two models queued together flush into two batches.
    let a = s
        .defer("alice-key", &chat("gpt-4o", "model a"), None, Some("ma"))
        .await;
    let b = s
        .defer(
            "alice-key",
            &chat("gpt-4.1-mini", "model b"),
            None,
            Some("mb"),
        )
        .await;
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (202, 202));
    let (st_a, _) = tokio::join!(s.status("alice-key", "ma", 60), s.flush());
    let (_, st_b) = s.status("alice-key", "mb", 60).await;
    assert_eq!(st_a.1["status"], "completed");
    assert_eq!(st_b["status"], "completed");
    assert_ne!(st_a.1["batch_id"], st_b["batch_id"]);
    assert_eq!(st_b["result"]["body"]["model"], "gpt-4.1-mini");
}

async fn per_request_upstream_errors_are_results(backend: Backend) {
    let s = Stack::start_on(backend, "max_requests = 2", "");
    s.defer(
        "alice-key",
        &chat("gpt-4o-mini", "fine"),
        None,
        Some("ok-1"),
    )
    .await;
    s.defer(
        "alice-key",
        &chat("gpt-4o-mini", "slow down [emulator:status=429]"),
        None,
        Some("bad-1"),
    )
    .await;
    let (_, st) = s.status("alice-key", "bad-1", 60).await;
    assert_eq!(st["status"], "completed", "{st}");
    assert_eq!(st["result"]["status_code"], 429);
    let r = s
        .http
        .get(s.url("/v1/ferry/requests/bad-1/result"))
        .bearer_auth("alice-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"]["message"].is_string());
    let (_, ok) = s.status("alice-key", "ok-1", 60).await;
    assert_eq!(ok["result"]["status_code"], 200);
}

async fn expired_batch_lines_become_expired_requests(backend: Backend) {
    let s = Stack::start_on(backend, "max_requests = 2", "");
    // Lines take an hour each and the batch expires at once.
    s.emulator_config(json!({"per_request_seconds": 3600.0, "expire_after_seconds": 0.0}))
        .await;
    s.defer(
        "alice-key",
        &chat("gpt-4o-mini", "late 1"),
        None,
        Some("late-1"),
    )
    .await;
    s.defer(
        "alice-key",
        &chat("gpt-4o-mini", "late 2"),
        None,
        Some("late-2"),
    )
    .await;
    let (_, st) = s.status("alice-key", "late-1", 60).await;
    assert_eq!(st["status"], "expired", "{st}");
    assert_eq!(st["error"]["code"], "batch_expired");
    let r = s
        .http
        .get(s.url("/v1/ferry/requests/late-2/result?wait=60"))
        .bearer_auth("alice-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(s.emulator_stats().await["executed_lines"], 0);
}

async fn a_line_refused_by_validation_fails_alone(backend: Backend) {
    // The emulator does not know this model: its line fails validation
    // (model_not_found), and the batch with it.
    let s = Stack::start_on(backend, "max_requests = 1", "");
    let r = s
        .defer(
            "alice-key",
            &chat("gpt-unknown", "who am i"),
            None,
            Some("unk"),
        )
        .await;
    assert_eq!(r.status(), 202);
    let (_, st) = s.status("alice-key", "unk", 60).await;
    assert_eq!(st["status"], "failed", "{st}");
    assert_eq!(st["error"]["code"], "model_not_found");
    let r = s
        .http
        .get(s.url("/v1/ferry/requests/unk/result"))
        .bearer_auth("alice-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "model_not_found");
}

async fn tenants_see_only_their_own_requests(backend: Backend) {
    let s = Stack::start_on(backend, "", "");
    assert_eq!(
        s.defer(
            "alice-key",
            &chat("gpt-4o-mini", "mine"),
            None,
            Some("shared-id")
        )
        .await
        .status(),
        202
    );
    let (code, body) = s.status("bob-key", "shared-id", 0).await;
    assert_eq!(code, 404);
    assert_eq!(body["error"]["code"], "request_not_found");
    let r = s
        .http
        .delete(s.url("/v1/ferry/requests/shared-id"))
        .bearer_auth("bob-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Bob may use the same custom id for his own request.
    assert_eq!(
        s.defer(
            "bob-key",
            &chat("gpt-4o-mini", "his"),
            None,
            Some("shared-id")
        )
        .await
        .status(),
        202
    );
    let (code, st) = s.status("alice-key", "shared-id", 0).await;
    assert_eq!(code, 200);
    assert_eq!(st["status"], "queued");
}

async fn no_tenant_reaches_ferrys_own_batch_files_through_passthrough(backend: Backend) {
    let s = Stack::start_on(backend, "max_requests = 1", "");
    // The batch stays in progress while the tenants try its files.
    s.emulator_config(json!({"per_request_seconds": 1000.0}))
        .await;
    s.defer(
        "alice-key",
        &chat("gpt-4o-mini", "alice's secret"),
        None,
        Some("s1"),
    )
    .await;
    let batch_id = common::until_status(&s, "s1", "submitted").await["batch_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let batch = s.upstream_get(&format!("/v1/batches/{batch_id}")).await;
    let file_id = batch["input_file_id"].as_str().unwrap().to_owned();
    let escaped = format!("%{:02X}{}", file_id.as_bytes()[0], &file_id[1..]);
    for key in ["bob-key", "alice-key"] {
        for (method, path) in [
            ("GET", format!("/v1/files/{file_id}/content")),
            ("GET", format!("/v1/files/{escaped}/content")),
            ("GET", format!("/v1//files/{file_id}/content")),
            ("GET", format!("/v1/files%2F{file_id}/content")),
            ("DELETE", format!("/v1//files//{file_id}")),
            ("GET", format!("/v1/files/{file_id}")),
            ("DELETE", format!("/v1/files/{file_id}")),
            ("GET", format!("/v1/batches/{batch_id}")),
            ("POST", format!("/v1/batches/{batch_id}/cancel")),
        ] {
            let r = s
                .http
                .request(method.parse().unwrap(), s.url(&path))
                .bearer_auth(key)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 404, "{key} {method} {path}");
            let e: Value = r.json().await.unwrap();
            assert_eq!(e["error"]["code"], "not_found", "{key} {method} {path}");
        }
    }
    // The batch is untouched upstream.
    let batch = s.upstream_get(&format!("/v1/batches/{batch_id}")).await;
    assert_eq!(batch["status"], "in_progress", "{batch}");
    // A tenant's own files still pass through both ways.
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"bob's line\n".to_vec()).file_name("bob.jsonl"),
        );
    let r = s
        .http
        .post(s.url("/v1/files"))
        .bearer_auth("bob-key")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let own: Value = r.json().await.unwrap();
    let r = s
        .http
        .get(s.url(&format!(
            "/v1/files/{}/content",
            own["id"].as_str().unwrap()
        )))
        .bearer_auth("bob-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), &b"bob's line\n"[..]);
}

#[tokio::test]
async fn bad_deferred_calls_are_refused_with_the_field_named() {
    let s = Stack::start("", "max_body_bytes = 2048");
    let cases = [
        (
            json!({"messages": [{"role": "user", "content": "x"}]}),
            400,
            Some("model"),
        ),
        (json!({"model": "gpt-4o-mini"}), 400, Some("messages")),
        (
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stream": true}),
            400,
            Some("stream"),
        ),
        (chat("gpt-4o-mini", &"x".repeat(4096)), 413, None),
    ];
    for (body, code, param) in cases {
        let r = s.defer("alice-key", &body, None, None).await;
        assert_eq!(r.status().as_u16(), code, "{body}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"].as_str(), param, "{e}");
    }
    let r = s
        .http
        .post(s.url("/v1/chat/completions"))
        .bearer_auth("alice-key")
        .header("prefer", "respond-async")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = s
        .defer(
            "alice-key",
            &chat("gpt-4o-mini", "x"),
            None,
            Some("bad id!"),
        )
        .await;
    assert_eq!(r.status(), 400);
    // Nothing was stored, and the server is still up.
    assert_eq!(
        s.http.get(s.url("/healthz")).send().await.unwrap().status(),
        200
    );
    let metrics = s.metrics().await;
    assert!(!metrics.contains("ferry_queued_requests{"), "{metrics}");
}

async fn accepted_requests_survive_a_crash_and_finish_after_restart(backend: Backend) {
    let mut s = Stack::start_on(backend, "", "");
    for i in 0..5 {
        let r = s
            .defer(
                "alice-key",
                &chat("gpt-4o-mini", &format!("durable {i}")),
                None,
                Some(&format!("d{i}")),
            )
            .await;
        assert_eq!(r.status(), 202);
    }
    // SIGKILL: no chance to flush anything that was not already durable.
    s.restart_ferry();
    let ready = s.http.get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let (st0, _) = tokio::join!(s.status("alice-key", "d0", 60), s.flush());
    assert_eq!(st0.1["status"], "completed");
    for i in 1..5 {
        let (_, st) = s.status("alice-key", &format!("d{i}"), 60).await;
        assert_eq!(
            st["result"]["body"]["choices"][0]["message"]["content"],
            format!("echo: durable {i}")
        );
    }
    let stats = s.emulator_stats().await;
    assert_eq!(stats["lines_submitted"], 5);
    assert_eq!(stats["executed_more_than_once"], 0);
}

async fn cancel_before_submission_and_409_after(backend: Backend) {
    let s = Stack::start_on(backend, "", "");
    s.defer(
        "alice-key",
        &chat("gpt-4o-mini", "never mind"),
        None,
        Some("c1"),
    )
    .await;
    let r = s
        .http
        .delete(s.url("/v1/ferry/requests/c1"))
        .bearer_auth("alice-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let st: Value = r.json().await.unwrap();
    assert_eq!(st["status"], "cancelled");
    s.defer(
        "alice-key",
        &chat("gpt-4o-mini", "keep me"),
        None,
        Some("c2"),
    )
    .await;
    let (st, _) = tokio::join!(s.status("alice-key", "c2", 60), s.flush());
    assert_eq!(st.1["status"], "completed");
    let r = s
        .http
        .delete(s.url("/v1/ferry/requests/c2"))
        .bearer_auth("alice-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    // The cancelled one never reached the upstream.
    assert_eq!(s.emulator_stats().await["lines_submitted"], 1);
}

async fn rate_limits_answer_429_with_retry_after_and_full_queues_503(backend: Backend) {
    let limited = r#"
[[tenants]]
name = "limited"
keys = ["limited-key"]
intake_rps = 1
intake_burst = 2
passthrough_rps = 1
passthrough_burst = 1
"#;
    let s = Stack::start_on(backend, limited, "max_queued = 3");
    let codes: Vec<u16> = futures::future::join_all((0..3).map(|i| {
        let body = chat("gpt-4o-mini", &format!("r{i}"));
        let s = &s;
        async move {
            s.defer("limited-key", &body, None, None)
                .await
                .status()
                .as_u16()
        }
    }))
    .await;
    let mut sorted = codes.clone();
    sorted.sort();
    assert_eq!(sorted, vec![202, 202, 429], "{codes:?}");
    let r = s
        .defer("limited-key", &chat("gpt-4o-mini", "again"), None, None)
        .await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "rate_limit_error");
    // Passthrough has its own budget: one call, then 429.
    let p1 = s
        .http
        .get(s.url("/v1/models"))
        .bearer_auth("limited-key")
        .send()
        .await
        .unwrap();
    let p2 = s
        .http
        .get(s.url("/v1/models"))
        .bearer_auth("limited-key")
        .send()
        .await
        .unwrap();
    assert_eq!((p1.status().as_u16(), p2.status().as_u16()), (200, 429));
    // Other tenants are not limited; the queue cap (3) is what stops alice.
    assert_eq!(
        s.defer("alice-key", &chat("gpt-4o-mini", "a"), None, None)
            .await
            .status(),
        202
    );
    let full = s
        .defer("alice-key", &chat("gpt-4o-mini", "b"), None, None)
        .await;
    assert_eq!(full.status(), 503);
    let e: Value = full.json().await.unwrap();
    assert_eq!(e["error"]["code"], "queue_full");
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("ferry_rate_limited_total{kind=\"deferred\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ferry_rate_limited_total{kind=\"passthrough\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn known_series_start_at_zero_and_model_labels_are_capped() {
    let s = Stack::start("", "");
    let metrics = s.metrics().await;
    // Panels on these used to say "No data" until their first event.
    for line in [
        r#"ferry_rate_limited_total{kind="deferred"} 0"#,
        r#"ferry_rate_limited_total{kind="passthrough"} 0"#,
        r#"ferry_upstream_backoff_seconds_total{upstream="emu"} 0"#,
        r#"ferry_webhook_deliveries_total{outcome="dead"} 0"#,
        r#"ferry_batches_total{event="lost",upstream="emu"} 0"#,
        r#"ferry_requests_finished_total{status="expired"} 0"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing:\n{metrics}"
        );
    }

    // More distinct models than the cap (no `models` list here): the
    // series past the cap fold into `other`.
    let cap = ferry::metrics::MAX_MODEL_LABELS;
    let extra = 5;
    for i in 0..cap + extra {
        let r = s
            .defer("alice-key", &chat(&format!("m-{i:03}"), "x"), None, None)
            .await;
        assert_eq!(r.status(), 202);
    }
    let other = r#"ferry_queued_requests{model="other",upstream="emu"}"#;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let metrics = loop {
        let m = s.metrics().await;
        if m.lines().any(|l| l == format!("{other} {extra}")) {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {other} {extra} in:\n{m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let models: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("ferry_queued_requests{"))
        .filter_map(|l| l.split("model=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(models.len(), cap + 1, "{models:?}");
}

/// A finished request is purged once `retention.terminal_secs` has passed:
/// it answers `404` like one that never existed, and its custom id makes a
/// new request (another body included), not a `409`.
async fn a_purged_request_answers_404_and_its_custom_id_is_taken_anew(backend: Backend) {
    let s = Stack::start_on(
        backend,
        "",
        "[retention]\nterminal_secs = 1\ninterval_secs = 0.1",
    );
    let r = s
        .defer(
            "alice-key",
            &chat("gpt-4o-mini", "first"),
            None,
            Some("kept-a-second"),
        )
        .await;
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    s.flush().await;
    until_status(&s, "kept-a-second", "completed").await;

    // The purge runs every 0.1 s; the request is due a second after it
    // finished.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (code, st) = s.status("alice-key", "kept-a-second", 0).await;
        if code == 404 {
            assert_eq!(st["error"]["code"], "request_not_found", "{st}");
            break;
        }
        assert_eq!(st["status"], "completed", "{st}");
        assert!(std::time::Instant::now() < deadline, "never purged: {st}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let result = s
        .get("alice-key", "/v1/ferry/requests/kept-a-second/result")
        .await;
    assert_eq!(result.status(), 404);
    // Counted once the slice has returned, a moment after its rows are
    // gone (PostgreSQL's commit is visible to lookups first).
    loop {
        let metrics = s.metrics().await;
        if metrics.lines().any(|l| {
            l.starts_with("ferry_retention_purged_rows_total{kind=\"request\"} ")
                && !l.ends_with(" 0")
        }) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let r = s
        .defer(
            "alice-key",
            &chat("gpt-4o-mini", "second"),
            None,
            Some("kept-a-second"),
        )
        .await;
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    let ticket: Value = r.json().await.unwrap();
    assert_eq!(ticket["status"], "queued", "{ticket}");
}

on_both_backends!(
    deferred_call_gets_a_ticket_then_its_result_by_long_poll,
    a_purged_request_answers_404_and_its_custom_id_is_taken_anew,
    wait_returns_the_chat_completion_itself,
    flush_by_size_puts_exactly_max_requests_in_a_batch,
    flush_by_bytes_and_two_models_make_separate_batches,
    per_request_upstream_errors_are_results,
    expired_batch_lines_become_expired_requests,
    a_line_refused_by_validation_fails_alone,
    tenants_see_only_their_own_requests,
    no_tenant_reaches_ferrys_own_batch_files_through_passthrough,
    accepted_requests_survive_a_crash_and_finish_after_restart,
    cancel_before_submission_and_409_after,
    rate_limits_answer_429_with_retry_after_and_full_queues_503,
);
