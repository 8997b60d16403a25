//! A submitted batch the upstream stops knowing (`404`, as after a changed
//! key or base_url): after `lost_after_secs` of `404`s it is lost, and its
//! requests are sent again, or fail with `batch_lost` once `max_attempts`
//! is spent. The upstream "forgets" by a restart of the standalone emulator
//! (it keeps everything in memory) on the same port.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Stack, chat, until_status};
use serde_json::json;

/// A batch of r-1 and r-2 held `validating`, then the emulator restarted
/// empty on the same address.
async fn lose_the_batch(s: &mut Stack) {
    s.emulator_config(json!({"validating_seconds": 3600})).await;
    for id in ["r-1", "r-2"] {
        let r = s
            .defer("alice-key", &chat("gpt-4o-mini", id), None, Some(id))
            .await;
        assert_eq!(r.status(), 202);
    }
    until_status(s, "r-2", "submitted").await;
    let emulator = s.emulator.as_mut().expect("a standalone emulator");
    let addr = emulator.addr("emulator");
    let _ = emulator.child.kill();
    let _ = emulator.child.wait();
    let mut cmd = Command::new(common::BIN);
    cmd.args([
        "emulator",
        "--listen",
        &addr.to_string(),
        "--api-key",
        common::UPSTREAM_KEY,
    ]);
    s.emulator = Some(common::spawn(
        cmd,
        &["emulator"],
        s.dir.path().join("emulator-2.log"),
        Duration::from_secs(60),
    ));
}

fn lost_count(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"ferry_batches_total{event="lost",upstream="emu"} "#))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_batch_the_upstream_forgot_is_lost_and_its_requests_sent_again() {
    let mut s = Stack::start("max_requests = 2\nlost_after_secs = 1", "");
    lose_the_batch(&mut s).await;
    // Re-queued (one attempt of three spent), flushed again by size, and
    // answered by the new upstream.
    for id in ["r-1", "r-2"] {
        let (_, st) = s.status("alice-key", id, 60).await;
        assert_eq!(st["status"], "completed", "{st}");
        assert_eq!(
            st["result"]["body"]["choices"][0]["message"]["content"],
            format!("echo: {id}")
        );
    }
    assert_eq!(lost_count(&s.metrics().await), 1);
    let logs = s.ferry.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("ERROR") && l.contains("it is lost")),
        "{logs}"
    );
    s.until_no_live_batches().await;
}

#[tokio::test]
async fn a_lost_batch_fails_requests_that_spent_their_attempts() {
    let mut s = Stack::start(
        "max_requests = 2\nlost_after_secs = 1\nmax_attempts = 1",
        "",
    );
    lose_the_batch(&mut s).await;
    for id in ["r-1", "r-2"] {
        let (_, st) = s.status("alice-key", id, 60).await;
        assert_eq!(st["status"], "failed", "{st}");
        assert_eq!(st["error"]["code"], "batch_lost", "{st}");
    }
    assert_eq!(lost_count(&s.metrics().await), 1);
    s.until_no_live_batches().await;
    // Nothing was sent to the new upstream.
    let listed = s.upstream_get("/v1/batches").await;
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(0), "{listed}");
}
