//! Two Ferrys (two data_dirs) on one upstream key: each sweeps, adopts and
//! deletes only the upstream files and batches it made, although their
//! batch numbers and request ids are the same.

mod common;

use std::time::Duration;

use common::{Proc, Stack, chat, until_status};
use serde_json::{Value, json};

/// Waits until `p`'s log has a line containing `what`.
async fn until_logged(p: &Proc, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !p.logs().contains(what) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never logged {what:?}:\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `p` has run its start-up sweep of orphaned upstream files.
async fn until_swept(p: &Proc) {
    until_logged(p, "orphaned upstream input files swept").await;
}

async fn file_exists(s: &Stack, id: &str) -> bool {
    let r = s
        .http
        .get(s.emu(&format!("/v1/files/{id}")))
        .bearer_auth(common::UPSTREAM_KEY)
        .send()
        .await
        .unwrap();
    r.status() == 200
}

/// A deferred call to Ferry `p` as alice.
async fn defer(http: &reqwest::Client, p: &Proc, id: &str) {
    let r = http
        .post(format!("http://{}/v1/chat/completions", p.addr("proxy")))
        .bearer_auth("alice-key")
        .header("prefer", "respond-async")
        .header("x-ferry-custom-id", id)
        .json(&chat("gpt-4o-mini", id))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{id}");
}

/// The status object of alice's request `id` on Ferry `p`, held until it is
/// terminal (at most `wait` seconds).
async fn status(http: &reqwest::Client, p: &Proc, id: &str, wait: u64) -> Value {
    http.get(format!(
        "http://{}/v1/ferry/requests/{id}?wait={wait}",
        p.addr("proxy")
    ))
    .bearer_auth("alice-key")
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap()
}

fn answer(st: &Value) -> &Value {
    &st["result"]["body"]["choices"][0]["message"]["content"]
}

#[tokio::test]
async fn a_second_instance_leaves_the_first_ones_batch_and_files_alone() {
    // A: two requests become one batch, held `validating` upstream.
    let a = Stack::start("max_requests = 2", "");
    a.emulator_config(json!({"validating_seconds": 3600})).await;
    for id in ["a-1", "a-2"] {
        defer(&a.http, &a.ferry, id).await;
    }
    until_status(&a, "a-2", "submitted").await;
    let listed = a.upstream_get("/v1/batches").await;
    let a_batch = listed["data"][0].clone();
    let a_file = a_batch["input_file_id"].as_str().unwrap().to_owned();
    let a_instance = a_batch["metadata"]["ferry_instance"].clone();

    // B: its own data_dir on the same upstream and key. It starts as A's
    // batch validates: its start-up sweep must not take A's input file for
    // an orphan of its own.
    let b_dir = tempfile::tempdir().unwrap();
    let b_config = common::config(
        b_dir.path(),
        a.emulator
            .as_ref()
            .expect("a standalone emulator")
            .addr("emulator"),
        "max_requests = 2",
        "",
    );
    let b = common::ferry(b_dir.path(), &b_config);
    until_swept(&b).await;
    assert!(
        file_exists(&a, &a_file).await,
        "B deleted A's input file at start"
    );

    // B gets the same two request ids and batch number as A (fresh stores
    // count alike) and lines of the same length. It is killed between its
    // claim and its upload (the upstream is slowed down for that), so it
    // resumes with a claimed batch that must not adopt A's upload.
    a.emulator_config(json!({"latency_ms": 3000})).await;
    for id in ["b-1", "b-2"] {
        defer(&a.http, &b, id).await;
    }
    until_logged(&b, "queue flushed into a batch").await;
    drop(b);
    a.emulator_config(json!({"latency_ms": 0})).await;
    let b = common::ferry(b_dir.path(), &b_config);
    until_swept(&b).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let b_batch = loop {
        let listed = a.upstream_get("/v1/batches").await;
        let data = listed["data"].as_array().unwrap().clone();
        if data.len() >= 2 {
            assert_eq!(data.len(), 2, "{listed}");
            break data[0].clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "B made no batch");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_ne!(b_batch["id"], a_batch["id"], "B adopted A's batch");
    assert_ne!(
        b_batch["input_file_id"], a_batch["input_file_id"],
        "B's resumed upload adopted A's input file"
    );
    assert!(a_instance.is_string(), "{a_batch}");
    assert_ne!(b_batch["metadata"]["ferry_instance"], a_instance);
    assert_eq!(
        b_batch["metadata"]["ferry_batch_id"], a_batch["metadata"]["ferry_batch_id"],
        "the test means both instances to use the same batch number"
    );
    assert!(file_exists(&a, &a_file).await, "B deleted A's input file");

    // Both batches finish; each caller gets its own answer.
    let r = a
        .http
        .post(a.emu("/_emulator/clock"))
        .json(&json!({"advance_seconds": 3601}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    for id in ["a-1", "a-2"] {
        let st = status(&a.http, &a.ferry, id, 60).await;
        assert_eq!(st["status"], "completed", "{st}");
        assert_eq!(answer(&st), &json!(format!("echo: {id}")), "{st}");
    }
    for id in ["b-1", "b-2"] {
        let st = status(&a.http, &b, id, 60).await;
        assert_eq!(st["status"], "completed", "{st}");
        assert_eq!(answer(&st), &json!(format!("echo: {id}")), "{st}");
    }
}
