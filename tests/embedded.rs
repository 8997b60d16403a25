//! Ferry on its embedded default shape: the built-in emulator is the
//! upstream and lives in Ferry's process. A SIGKILL while a batch is live
//! upstream kills the emulator too; after the restart the batch must still
//! be there (on the emulator's new port) and every request must complete.
//! The standalone `ferry emulator` keeps its state only with `--data-dir`.

mod common;

use common::{Stack, UPSTREAM_KEY, chat, until_status};
use serde_json::{Value, json};

/// Batches stay `validating` until the test moves the emulator's clock, so
/// the kill lands while the batch is live upstream, every time.
const EMULATOR: &str = "validating_seconds = 3600";
/// Five requests flush at once; no upstream rate limit in the way.
const UPSTREAM: &str = "max_requests = 5\ncalls_per_second = 1000";

fn id(i: usize) -> String {
    format!("embedded-{i}")
}

fn prompt(i: usize) -> String {
    format!("question {i} before the crash")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_a_batch_live_upstream_loses_nothing() {
    let mut s = Stack::start_embedded(EMULATOR, UPSTREAM, "");
    for i in 0..5 {
        let r = s
            .defer(
                "alice-key",
                &chat("gpt-4o-mini", &prompt(i)),
                None,
                Some(&id(i)),
            )
            .await;
        assert_eq!(r.status(), 202);
    }
    let mut batch = None;
    for i in 0..5 {
        let st = until_status(&s, &id(i), "submitted").await;
        batch = Some(st["batch_id"].as_str().expect("batch id").to_owned());
    }
    let batch = batch.expect("a batch");
    let before = s.upstream_get(&format!("/v1/batches/{batch}")).await;
    assert_eq!(before["status"], "validating", "{before}");
    let clock = s
        .http
        .get(s.emu("/_emulator/clock"))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();

    tokio::task::block_in_place(|| s.restart_ferry());

    // The provider has not forgotten the batch it acknowledged, nor its
    // input file, nor what time it is.
    let after = s.upstream_get(&format!("/v1/batches/{batch}")).await;
    assert_eq!(after["status"], "validating", "after the restart: {after}");
    assert_eq!(after["created_at"], before["created_at"]);
    let input = s
        .upstream_get(&format!(
            "/v1/files/{}",
            before["input_file_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(input["purpose"], "batch", "{input}");
    let now = s
        .http
        .post(s.emu("/_emulator/clock"))
        .json(&json!({"advance_seconds": 3600}))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert!(
        now["now"].as_f64() >= clock["now"].as_f64(),
        "{clock} -> {now}"
    );

    for i in 0..5 {
        let (code, st) = s.status("alice-key", &id(i), 30).await;
        assert_eq!(code, 200);
        assert_eq!(st["status"], "completed", "{}: {st}", id(i));
        assert_eq!(
            st["result"]["body"]["choices"][0]["message"]["content"],
            format!("echo: {}", prompt(i)).as_str()
        );
        assert_eq!(
            st["batch_id"],
            batch.as_str(),
            "sent once, in the same batch"
        );
    }
    let stats = s.emulator_stats().await;
    assert_eq!(stats["batches"], 1, "{stats}");
    assert_eq!(stats["lines_submitted"], 5, "{stats}");
    assert_eq!(stats["executed_more_than_once"], 0, "{stats}");
    s.until_no_live_batches().await;
    let files = s.upstream_get("/v1/files?purpose=batch").await;
    assert_eq!(files["data"], json!([]), "input file left upstream");
}

/// Uploads a small file to the emulator at `addr`; its id.
async fn upload(http: &reqwest::Client, addr: std::net::SocketAddr) -> String {
    let part = reqwest::multipart::Part::bytes(b"kept".to_vec()).file_name("notes.txt");
    let form = reqwest::multipart::Form::new()
        .text("purpose", "user_data")
        .part("file", part);
    let file: Value = http
        .post(format!("http://{addr}/v1/files"))
        .bearer_auth(UPSTREAM_KEY)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    file["id"].as_str().expect("file id").to_owned()
}

/// The content of `id` at `addr`, or the status when there is none.
async fn content(
    http: &reqwest::Client,
    addr: std::net::SocketAddr,
    id: &str,
) -> Result<String, u16> {
    let r = http
        .get(format!("http://{addr}/v1/files/{id}/content"))
        .bearer_auth(UPSTREAM_KEY)
        .send()
        .await
        .unwrap();
    match r.status().as_u16() {
        200 => Ok(r.text().await.unwrap()),
        code => Err(code),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standalone_emulator_keeps_its_state_only_with_a_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let state = dir.path().join("emulator-state");
    let state = state.to_str().unwrap();
    for (args, kept) in [(vec!["--data-dir", state], true), (vec![], false)] {
        let mut emu = tokio::task::block_in_place(|| common::emulator(dir.path(), &args));
        let id = upload(&http, emu.addr("emulator")).await;
        emu.signal_and_wait("KILL");
        let emu = tokio::task::block_in_place(|| common::emulator(dir.path(), &args));
        let got = content(&http, emu.addr("emulator"), &id).await;
        if kept {
            assert_eq!(got, Ok("kept".to_owned()), "{args:?}");
        } else {
            assert_eq!(got, Err(404), "{args:?}");
        }
    }
}
