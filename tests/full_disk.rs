//! A full disk, for real: Ferry's data_dir is a small tmpfs mounted by the
//! test (it needs root, as CI has), filled first by Ferry's own intake and
//! then by a file beside it. Intake answers `503 storage_unavailable` with
//! nothing half-kept, lookups keep working, a flush and a batch's results
//! wait for room, and everything resumes by itself when space returns,
//! without a restart: nothing accepted is lost, nothing runs twice.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Stack, chat, until_status};
use ferry::store::space::available_bytes;
use serde_json::{Value, json};

const MIB: u64 = 1024 * 1024;
/// The tmpfs and the reserve Ferry keeps on it (`server.min_free_mb`).
const DISK_MB: u64 = 64;
const MIN_FREE_MB: u64 = 16;

/// A tmpfs mounted for the test's life.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, mb: u64) -> Tmpfs {
        std::fs::create_dir_all(at).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a {mb} MiB tmpfs as Ferry's data_dir and needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }

    fn free(&self) -> u64 {
        available_bytes(&self.0).expect("statvfs")
    }

    /// Grows or shrinks the filler file beside Ferry's store so that
    /// `free` bytes are left.
    fn leave_free(&self, free: u64) {
        let filler = self.0.join("filler");
        let now = std::fs::metadata(&filler).map_or(0, |m| m.len());
        let target = (now + self.free()).checked_sub(free).expect("room to fill");
        if target < now {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&filler)
                .unwrap();
            f.set_len(target).unwrap();
        } else {
            // Written, not sparse: tmpfs counts only pages that hold data.
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&filler)
                .unwrap();
            let chunk = vec![1u8; MIB as usize];
            let mut left = target - now;
            while left > 0 {
                let n = left.min(MIB);
                f.write_all(&chunk[..n as usize]).unwrap();
                left -= n;
            }
            f.sync_all().unwrap();
        }
        let off = self.free().abs_diff(free);
        assert!(off < MIB, "free {} instead of {free}", self.free());
    }

    fn remove_filler(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: Ferry may still be exiting when a failed test unwinds.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn prompt(i: usize) -> String {
    // 32 KiB bodies fill the reserve in a few dozen calls.
    format!("question {i} {}", "x".repeat(32 * 1024))
}

/// `ferry_storage_low_space_refusals_total{need}`.
async fn refusals(s: &Stack, need: &str) -> f64 {
    let m = s.metrics().await;
    let prefix = format!("ferry_storage_low_space_refusals_total{{need=\"{need}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in\n{m}"))
}

/// Waits until Ferry has refused `need` more than `before` times.
async fn until_refused(s: &Stack, need: &str, before: f64) -> f64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = refusals(s, need).await;
        if now > before {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{need} never refused; Ferry's log:\n{}",
            s.ferry.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until Ferry's reading of the free space (it reads at most every
/// 100 ms) is within a MiB of `free`.
async fn until_ferry_sees(s: &Stack, free: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = s.metrics().await;
        let seen = m
            .lines()
            .find_map(|l| l.strip_prefix("ferry_storage_free_bytes "))
            .and_then(|v| v.parse::<u64>().ok());
        if seen.is_some_and(|seen| seen.abs_diff(free) < MIB) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Ferry sees {seen:?} bytes free, not {free}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn status_of(s: &Stack, id: &str) -> (u16, Value) {
    s.status("alice-key", id, 0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_new_calls_holds_the_rest_and_recovers_by_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = Tmpfs::mount(&dir.path().join("data"), DISK_MB);
    let emulator = common::emulator(dir.path(), &[]);
    let cfg = common::config(
        dir.path(),
        emulator.addr("emulator"),
        "max_requests = 10000\ncalls_per_second = 1000",
        &format!("min_free_mb = {MIN_FREE_MB}"),
    );
    let ferry = common::ferry(dir.path(), &cfg);
    let s = Stack {
        dir,
        emulator: Some(emulator),
        ferry,
        // A store that met the disk full may never answer: fail, not hang.
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap(),
    };
    // Batches stay live upstream until the test moves the emulator's clock.
    s.emulator_config(json!({"validating_seconds": 3600})).await;

    // 1. Ferry fills the disk itself: 202s until the reserve is reached,
    //    then 503 storage_unavailable for each new call.
    disk.leave_free((MIN_FREE_MB + 4) * MIB);
    let mut accepted = Vec::new();
    let refused = loop {
        let i = accepted.len();
        let id = format!("fill-{i}");
        let r = s
            .defer(
                "alice-key",
                &chat("gpt-4o-mini", &prompt(i)),
                None,
                Some(&id),
            )
            .await;
        match r.status().as_u16() {
            202 => accepted.push(id),
            503 => break (id, r.json::<Value>().await.unwrap()),
            other => panic!("{id}: {other} {}", r.text().await.unwrap()),
        }
        assert!(accepted.len() < 2_000, "the disk never filled");
    };
    assert!(accepted.len() >= 10, "only {} accepted", accepted.len());
    let (refused_id, body) = refused;
    assert_eq!(body["error"]["code"], "storage_unavailable", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("min_free_mb")),
        "{body}"
    );
    // Nothing of the refused call was kept; its custom id is still free.
    assert_eq!(status_of(&s, &refused_id).await.0, 404);

    // 2. Under half the reserve: a flush waits, the queue stays whole, and
    //    lookups go on.
    disk.leave_free(MIN_FREE_MB / 4 * MIB);
    until_ferry_sees(&s, disk.free()).await;
    let before = refusals(&s, "growth").await;
    s.flush().await;
    until_refused(&s, "growth", before).await;
    for id in &accepted {
        let (code, st) = status_of(&s, id).await;
        assert_eq!(
            (code, st["status"].as_str()),
            (200, Some("queued")),
            "{id}: {st}"
        );
    }
    assert_eq!(s.emulator_stats().await["batches"], 0);

    // 3. Room for work, not for intake: the flush goes through while new
    //    calls are still refused.
    disk.leave_free((MIN_FREE_MB * 3 / 4) * MIB);
    until_ferry_sees(&s, disk.free()).await;
    s.flush().await;
    for id in &accepted {
        until_status(&s, id, "submitted").await;
    }
    let r = s
        .defer(
            "alice-key",
            &chat("gpt-4o-mini", "late"),
            None,
            Some("late"),
        )
        .await;
    assert_eq!(r.status(), 503);

    // 4. Under half again while the batch finishes upstream: its results
    //    wait there, the requests stay submitted.
    disk.leave_free(MIN_FREE_MB / 4 * MIB);
    until_ferry_sees(&s, disk.free()).await;
    let before = refusals(&s, "growth").await;
    let r = s
        .http
        .post(s.emu("/_emulator/clock"))
        .json(&json!({"advance_seconds": 3600}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    until_refused(&s, "growth", before).await;
    let batches = s.upstream_get("/v1/batches").await;
    assert_eq!(batches["data"][0]["status"], "completed", "{batches}");
    for id in &accepted {
        let (_, st) = status_of(&s, id).await;
        assert_eq!(st["status"], "submitted", "{id}: {st}");
    }

    // 5. Space returns: without a restart, every accepted call completes
    //    with its own answer, once, and intake takes calls again.
    disk.remove_filler();
    for (i, id) in accepted.iter().enumerate() {
        let (code, st) = s.status("alice-key", id, 30).await;
        assert_eq!(code, 200, "{id}: {st}");
        assert_eq!(st["status"], "completed", "{id}: {st}");
        let content = &st["result"]["body"]["choices"][0]["message"]["content"];
        assert_eq!(content, format!("echo: {}", prompt(i)).as_str(), "{id}");
    }
    let r = s
        .defer(
            "alice-key",
            &chat("gpt-4o-mini", "after"),
            None,
            Some(&refused_id),
        )
        .await;
    assert_eq!(r.status(), 202);
    let stats = s.emulator_stats().await;
    assert_eq!(stats["batches"], 1, "{stats}");
    assert_eq!(stats["lines_submitted"], accepted.len(), "{stats}");
    assert_eq!(stats["executed_more_than_once"], 0, "{stats}");
    // The embedded store was never refused a write it had begun.
    assert!(
        !s.ferry.logs().contains("No space left on device"),
        "sled met the full disk:\n{}",
        s.ferry.logs()
    );
}
