//! Upstream failure modes, each provoked with the emulator's faults and
//! clock: transient errors, token limits, a bad line among good ones,
//! expiry (kept lines, re-queue policy), a batch cancelled upstream,
//! graceful shutdown, and a second Ferry started on a data dir in use.

mod common;

use common::{Backend, Stack, chat, until, until_status};
use serde_json::{Value, json};

async fn cancel_upstream(s: &Stack, batch_id: &str) {
    let r = s
        .http
        .post(s.emu(&format!("/v1/batches/{batch_id}/cancel")))
        .bearer_auth(common::UPSTREAM_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

async fn advance_clock(s: &Stack, seconds: f64) {
    let r = s
        .http
        .post(s.emu("/_emulator/clock"))
        .json(&json!({"advance_seconds": seconds}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
}

async fn transient_upstream_errors_are_retried_without_duplicates(backend: Backend) {
    let s = Stack::start_on(backend, "max_requests = 5", "");
    // A third of all Batch API calls fail with 500/503 (seeded, so it repeats).
    s.emulator_config(json!({"error_rate": 0.34, "seed": 7}))
        .await;
    let ids: Vec<String> = (0..10).map(|i| format!("flaky-{i}")).collect();
    for id in &ids {
        assert_eq!(
            s.defer("alice-key", &chat("gpt-4o-mini", id), None, Some(id))
                .await
                .status(),
            202
        );
    }
    for id in &ids {
        let (_, st) = s.status("alice-key", id, 60).await;
        assert_eq!(st["status"], "completed", "{st}");
        assert_eq!(
            st["result"]["body"]["choices"][0]["message"]["content"],
            format!("echo: {id}")
        );
    }
    let stats = s.emulator_stats().await;
    assert_eq!(stats["executed_more_than_once"], 0, "{stats}");
    assert_eq!(
        stats["lines_submitted"], stats["distinct_custom_ids"],
        "{stats}"
    );
    let m = s.metrics().await;
    let retries: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("ferry_upstream_retries_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(retries > 0.0, "no retries counted:\n{m}");
    let backoff: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("ferry_upstream_backoff_seconds_total{upstream=\"emu\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(backoff > 0.0, "no backoff counted:\n{m}");
    // Durable flushes were timed.
    let flushes: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("ferry_storage_flush_duration_seconds_count "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(flushes > 0, "no flushes timed:\n{m}");
}

async fn token_limit_pauses_and_resubmits_without_failing_anything(backend: Backend) {
    let s = Stack::start_on(
        backend,
        "max_requests = 2\ntoken_limit_backoff_secs = 0.2",
        "",
    );
    s.emulator_config(json!({"fail_next_batches_token_limit": 1}))
        .await;
    s.defer("alice-key", &chat("gpt-4o-mini", "t1"), None, Some("t1"))
        .await;
    s.defer("alice-key", &chat("gpt-4o-mini", "t2"), None, Some("t2"))
        .await;
    for id in ["t1", "t2"] {
        let (_, st) = s.status("alice-key", id, 60).await;
        assert_eq!(st["status"], "completed", "{st}");
    }
    let stats = s.emulator_stats().await;
    assert_eq!(stats["batches_by_status"]["failed"], 1, "{stats}");
    assert_eq!(stats["batches_by_status"]["completed"], 1, "{stats}");
    assert_eq!(stats["executed_more_than_once"], 0);
}

async fn a_bad_line_fails_alone_and_its_neighbours_are_sent_again(backend: Backend) {
    // Only the size threshold forms the first batch, so all three are in it
    // however slow the machine; the neighbours are flushed again by hand.
    let s = Stack::start_on(backend, "max_requests = 3", "");
    s.defer(
        "alice-key",
        &chat("gpt-4o-mini", "good one"),
        None,
        Some("n1"),
    )
    .await;
    s.defer(
        "alice-key",
        &chat("gpt-4o-mini", "bad [emulator:invalid]"),
        None,
        Some("n2"),
    )
    .await;
    s.defer(
        "alice-key",
        &chat("gpt-4o-mini", "good two"),
        None,
        Some("n3"),
    )
    .await;
    let (_, bad) = s.status("alice-key", "n2", 60).await;
    assert_eq!(bad["status"], "failed", "{bad}");
    assert_eq!(bad["error"]["code"], "invalid_request");
    assert!(
        bad["error"]["message"]
            .as_str()
            .unwrap()
            .contains("body.messages"),
        "{bad}"
    );
    until_status(&s, "n1", "queued").await;
    until_status(&s, "n3", "queued").await;
    s.flush().await;
    for id in ["n1", "n3"] {
        let (_, st) = s.status("alice-key", id, 60).await;
        assert_eq!(st["status"], "completed", "{st}");
    }
    let stats = s.emulator_stats().await;
    assert_eq!(stats["batches_by_status"]["failed"], 1, "{stats}");
    assert_eq!(stats["batches_by_status"]["completed"], 1, "{stats}");
}

async fn expired_lines_are_requeued_up_to_max_attempts_then_expired(backend: Backend) {
    let s = Stack::start_on(
        backend,
        "max_requests = 1\nmax_wait_secs = 0.05\nmax_attempts = 2\nexpired_policy = \"requeue\"",
        "",
    );
    // Every batch expires at once with nothing done.
    s.emulator_config(json!({"per_request_seconds": 3600.0, "expire_after_seconds": 0.0}))
        .await;
    s.defer(
        "alice-key",
        &chat("gpt-4o-mini", "always late"),
        None,
        Some("late"),
    )
    .await;
    let (_, st) = s.status("alice-key", "late", 60).await;
    assert_eq!(st["status"], "expired", "{st}");
    assert_eq!(st["error"]["code"], "batch_expired");
    let stats = s.emulator_stats().await;
    assert_eq!(stats["batches_by_status"]["expired"], 2, "{stats}");
    assert_eq!(stats["executed_lines"], 0);
}

async fn an_expired_batch_keeps_its_finished_lines(backend: Backend) {
    let s = Stack::start_on(backend, "max_requests = 4\nexpired_policy = \"fail\"", "");
    // Lines take 10 s each (emulator time) and the batch expires at 25 s:
    // the first two lines finish, the other two do not.
    s.emulator_config(json!({"per_request_seconds": 10.0, "expire_after_seconds": 25.0}))
        .await;
    for i in 0..4 {
        s.defer(
            "alice-key",
            &chat("gpt-4o-mini", &format!("e{i}")),
            None,
            Some(&format!("e{i}")),
        )
        .await;
    }
    until_status(&s, "e0", "submitted").await;
    advance_clock(&s, 26.0).await;
    let mut statuses = Vec::new();
    for i in 0..4 {
        let (_, st) = s.status("alice-key", &format!("e{i}"), 60).await;
        statuses.push(st["status"].as_str().unwrap().to_owned());
        if st["status"] == "completed" {
            assert_eq!(
                st["result"]["body"]["choices"][0]["message"]["content"],
                format!("echo: e{i}")
            );
        }
    }
    // Lines run in input order, which is Ferry's arrival order.
    assert_eq!(statuses, ["completed", "completed", "expired", "expired"]);
    assert_eq!(s.emulator_stats().await["executed_lines"], 2);
}

async fn a_batch_cancelled_upstream_keeps_finished_lines_and_requeues_the_rest(backend: Backend) {
    // Only the size threshold forms the first batch, so all three are in it.
    let s = Stack::start_on(backend, "max_requests = 3", "");
    s.emulator_config(json!({"per_request_seconds": 10.0}))
        .await;
    for i in 0..3 {
        s.defer(
            "alice-key",
            &chat("gpt-4o-mini", &format!("c{i}")),
            None,
            Some(&format!("c{i}")),
        )
        .await;
    }
    let st = until_status(&s, "c0", "submitted").await;
    let batch_id = st["batch_id"].as_str().unwrap().to_owned();
    advance_clock(&s, 15.0).await;
    // Someone cancels the batch behind Ferry's back; later batches run at once.
    s.emulator_config(json!({"per_request_seconds": 0.0})).await;
    cancel_upstream(&s, &batch_id).await;
    // Once Ferry has seen the cancel, the unfinished two are queued again.
    until_status(&s, "c1", "queued").await;
    until_status(&s, "c2", "queued").await;
    s.flush().await;
    for i in 0..3 {
        let (_, st) = s.status("alice-key", &format!("c{i}"), 60).await;
        assert_eq!(st["status"], "completed", "{st}");
        assert_eq!(
            st["result"]["body"]["choices"][0]["message"]["content"],
            format!("echo: c{i}")
        );
        if i == 0 {
            assert_eq!(
                st["batch_id"],
                batch_id.as_str(),
                "the finished line was kept"
            );
        } else {
            assert_ne!(
                st["batch_id"],
                batch_id.as_str(),
                "unfinished lines went into a new batch"
            );
        }
    }
    let stats = s.emulator_stats().await;
    assert_eq!(stats["batches_by_status"]["cancelled"], 1, "{stats}");
    assert_eq!(stats["executed_more_than_once"], 0, "{stats}");
}

async fn a_request_whose_batches_keep_being_cancelled_fails_after_max_attempts(backend: Backend) {
    let s = Stack::start_on(backend, "max_requests = 1\nmax_attempts = 2", "");
    // Nothing finishes on its own: only the cancels end these batches.
    s.emulator_config(json!({"per_request_seconds": 1000.0}))
        .await;
    s.defer("alice-key", &chat("gpt-4o-mini", "x"), None, Some("x"))
        .await;
    let first = until_status(&s, "x", "submitted").await["batch_id"].clone();
    cancel_upstream(&s, first.as_str().unwrap()).await;
    // Re-queued, counted, and sent in a second batch at once (size 1).
    let second = until(&s, "x", "submitted in another batch", |st| {
        st["status"] == "submitted" && st["batch_id"] != first
    })
    .await["batch_id"]
        .clone();
    cancel_upstream(&s, second.as_str().unwrap()).await;
    let st = until_status(&s, "x", "failed").await;
    assert_eq!(st["error"]["code"], "batch_cancelled", "{st}");
    assert_eq!(st["batch_id"], second, "{st}");
    let stats = s.emulator_stats().await;
    assert_eq!(stats["batches_by_status"]["cancelled"], 2, "{stats}");
}

#[tokio::test]
async fn sigterm_hands_held_callers_their_ticket_and_refuses_new_intake() {
    graceful_shutdown_on("TERM").await;
}

/// SIGQUIT is pingora's hot upgrade; Ferry has none (one writer per store)
/// and shuts down exactly as on SIGTERM instead of offering its socket.
#[tokio::test]
async fn sigquit_shuts_down_as_gracefully_as_sigterm() {
    let logs = graceful_shutdown_on("QUIT").await;
    assert!(logs.contains("Ferry has no hot upgrade"), "{logs}");
    assert!(!logs.contains("Unable to send listener sockets"), "{logs}");
}

/// Signals Ferry while a caller is held; returns the stopped Ferry's logs.
async fn graceful_shutdown_on(signal: &str) -> String {
    let mut s = Stack::start("", "shutdown_grace_secs = 1");
    let held = {
        let http = s.http.clone();
        let url = s.url("/v1/chat/completions");
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth("alice-key")
                .header("prefer", "respond-async, wait=600")
                .header("x-ferry-custom-id", "held-1")
                .json(&chat("gpt-4o-mini", "held"))
                .send()
                .await
                .unwrap()
        })
    };
    until_status(&s, "held-1", "queued").await;
    let pid = s.ferry.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap()
            .success()
    );
    let r = held.await.unwrap();
    assert_eq!(
        r.status(),
        202,
        "the held caller gets its ticket at shutdown"
    );
    assert_eq!(r.headers()["location"], "/v1/ferry/requests/held-1");
    // During the grace period pingora stops accepting connections; a call
    // that still reaches Ferry on an open connection is refused with 503.
    let late = s
        .http
        .post(s.url("/v1/chat/completions"))
        .bearer_auth("alice-key")
        .header("prefer", "respond-async")
        .json(&chat("gpt-4o-mini", "late"))
        .send()
        .await;
    if let Ok(r) = late {
        assert_eq!(
            r.status(),
            503,
            "a deferred call was accepted during shutdown"
        );
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "shutting_down", "{e}");
    }
    // ...and the process exits cleanly, storage flushed.
    let status = s.ferry.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        s.ferry.logs().contains("storage flushed"),
        "{}",
        s.ferry.logs()
    );
    let logs = s.ferry.logs();
    // The accepted request is not lost.
    s.restart_ferry();
    let (st, _) = tokio::join!(s.status("alice-key", "held-1", 60), s.flush());
    assert_eq!(st.1["status"], "completed");
    logs
}

#[tokio::test]
async fn a_second_ferry_on_the_same_data_dir_is_refused_and_the_first_serves_on() {
    let s = Stack::start("", "");
    let r = s
        .defer(
            "alice-key",
            &chat("gpt-4o-mini", "before"),
            None,
            Some("first"),
        )
        .await;
    assert_eq!(r.status(), 202);
    let out = std::process::Command::new(common::BIN)
        .arg("--config")
        .arg(s.dir.path().join("ferry.toml"))
        .env("FERRY_TEST_UPSTREAM_KEY", common::UPSTREAM_KEY)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is a second Ferry running on this data_dir?"),
        "{stderr}"
    );
    // The refused start changed nothing for the running one.
    let (st, _) = tokio::join!(s.status("alice-key", "first", 60), s.flush());
    assert_eq!(st.1["status"], "completed", "{}", st.1);
}

on_both_backends!(
    transient_upstream_errors_are_retried_without_duplicates,
    token_limit_pauses_and_resubmits_without_failing_anything,
    a_bad_line_fails_alone_and_its_neighbours_are_sent_again,
    expired_lines_are_requeued_up_to_max_attempts_then_expired,
    an_expired_batch_keeps_its_finished_lines,
    a_batch_cancelled_upstream_keeps_finished_lines_and_requeues_the_rest,
    a_request_whose_batches_keep_being_cancelled_fails_after_max_attempts,
);
