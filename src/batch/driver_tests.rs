//! The batch driver's steps against the in-process emulator: durable
//! before the next upstream call (with a store whose commits are made to
//! fail), and adopting a created batch however many came after it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use super::policy::{FlushPolicy, FlushReason};
use super::{OUTCOME_CHUNK, create, flush_queue, ingest_batch, poll_and_ingest, upload};
use crate::config::Config;
use crate::store::{
    BatchRecord, BatchState, Intake, Lane, QueueKey, RequestRecord, RequestStatus, Store,
};
use crate::upstream::BatchClient;
use crate::{App, PassthroughTarget, Upstream};

const KEY: &str = "emulator-key";
/// The upstream's lease: with sled, one node holds it under token 1.
const LEASE: &str = "upstream/emu";

struct Harness {
    _dir: tempfile::TempDir,
    app: Arc<App>,
    shutdown: watch::Receiver<bool>,
    _stop: watch::Sender<bool>,
}

/// An App with one upstream: the emulator, serving in this runtime, with
/// batches that stay `validating` (nothing here needs them to finish).
async fn harness() -> Harness {
    harness_of("openai").await.0
}

/// [`harness`] with an upstream of `kind`; also the emulator's address.
async fn harness_of(kind: &str) -> (Harness, std::net::SocketAddr) {
    let emu = crate::emulator::EmulatorConfig {
        validating_seconds: 3600.0,
        ..Default::default()
    };
    harness_with(kind, emu, "").await
}

/// [`harness_of`] with the emulator's knobs `emu` and `upstream_extra`
/// lines in the upstream's table.
async fn harness_with(
    kind: &str,
    emu: crate::emulator::EmulatorConfig,
    upstream_extra: &str,
) -> (Harness, std::net::SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(crate::emulator::serve(
        listener,
        emu,
        std::future::pending(),
    ));
    let dir = tempfile::tempdir().unwrap();
    let base = format!("http://{addr}/v1");
    let text = format!(
        r#"
        [server]
        data_dir = "{}"
        [[upstreams]]
        name = "emu"
        kind = "{kind}"
        base_url = "{base}"
        api_key_env = "KEY"
        poll_interval_secs = 0.05
        {upstream_extra}
        [[tenants]]
        name = "t"
        keys = ["k"]
        "#,
        dir.path().join("data").display()
    );
    let config = Config::parse_with_env(&text, &|_| Some(KEY.into())).unwrap();
    let store = Arc::new(Store::open_sled(&config.server.data_dir, 64 << 20).unwrap());
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let settings = config.upstreams[0].clone();
    let client = BatchClient::new(
        &settings.name,
        &base,
        KEY,
        1000,
        2000,
        None,
        metrics.clone(),
    )
    .unwrap();
    let client = match &settings.anthropic_version {
        Some(v) => client.for_anthropic(v),
        None => client,
    };
    let up = Upstream::new(
        settings,
        client,
        PassthroughTarget::parse(&base).unwrap(),
        KEY,
    );
    let (stop, shutdown) = watch::channel(false);
    let app = Arc::new(App {
        config,
        store,
        instance_id: "00112233aabbccdd".into(),
        waiters: crate::delivery::waiters::Waiters::new(),
        metrics,
        upstreams: vec![up],
        limits: crate::limits::TenantLimits::new([]),
        model_labels: crate::metrics::ModelLabels::new([], crate::metrics::MAX_MODEL_LABELS),
        ready: AtomicBool::new(true),
        shutting_down: AtomicBool::new(false),
        release_waiters: tokio::sync::Notify::new(),
        members: Default::default(),
        standard_budgets: Default::default(),
    });
    // One node on sled: it owns the upstream, as its flush loop finds.
    let owned = crate::batch::ownership::renew(&app, 0, &shutdown).await;
    assert_eq!(owned, Some(1));
    let h = Harness {
        _dir: dir,
        app,
        shutdown,
        _stop: stop,
    };
    (h, addr)
}

fn queue() -> QueueKey {
    QueueKey::chat("emu", "gpt-4o-mini")
}

/// Queues `n` chat completions and commits them.
async fn enqueue(app: &App, n: usize) {
    for i in 0..n {
        let body =
            format!(r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"m{i}"}}]}}"#);
        let rec = RequestRecord {
            model: "gpt-4o-mini".into(),
            upstream: "emu".into(),
            body_len: body.len() as u64,
            created_at: crate::store::now_secs(),
            ..RequestRecord::for_test("t", &format!("c{i}"), &format!("h{i}"))
        };
        let stored = app.store.accept(rec, body.into_bytes()).await.unwrap();
        assert!(matches!(stored, Intake::Created(_)));
    }
}

async fn claim(app: &App) -> BatchRecord {
    enqueue(app, 2).await;
    app.store
        .claim_batch(&queue(), 100, 1 << 20, "manual", (LEASE, 1))
        .await
        .unwrap()
        .unwrap()
}

fn fail_commits(app: &App, on: bool) {
    app.store.sled().fail_commits.0.store(on, Ordering::SeqCst);
}

fn failed_commits(app: &App) -> u64 {
    app.store.sled().fail_commits.1.load(Ordering::SeqCst)
}

#[tokio::test]
async fn a_step_whose_record_is_not_durable_leaves_the_driver_on_the_last_durable_state() {
    let h = harness().await;
    let app = &h.app;
    let up = &app.upstreams[0];
    let mut batch = claim(app).await;

    // The upload succeeds upstream but `uploaded` cannot be made durable.
    fail_commits(app, true);
    let step = upload(app, up, &mut batch, false, &h.shutdown).await;
    assert!(step.is_err(), "the step must report the failed commit");
    assert_eq!(
        batch.state,
        BatchState::Claimed,
        "the driver must not act on an `uploaded` that is not on disk"
    );
    // Retried from `claimed` (resumed: look first), the upload is adopted.
    fail_commits(app, false);
    upload(app, up, &mut batch, true, &h.shutdown)
        .await
        .unwrap();
    let BatchState::Uploaded { file_id } = batch.state.clone() else {
        panic!("{:?}", batch.state);
    };
    assert_eq!(up.client.list_batch_files().await.unwrap().len(), 1);

    // The batch is created upstream but `submitted` cannot be made durable.
    fail_commits(app, true);
    let step = create(app, up, &mut batch, &file_id, false).await;
    assert!(step.is_err());
    assert_eq!(
        batch.state,
        BatchState::Uploaded {
            file_id: file_id.clone()
        },
        "the driver must not act on a `submitted` that is not on disk"
    );
    fail_commits(app, false);
    create(app, up, &mut batch, &file_id, true).await.unwrap();
    assert!(matches!(batch.state, BatchState::Submitted { .. }));
    let listed = up.client.list_batches(None, 100).await.unwrap();
    assert_eq!(listed.data.len(), 1, "created once, then adopted");
    assert_eq!(app.store.get_batch(batch.id).await.unwrap(), Some(batch));
}

/// Polls `done` every 10 ms until it holds; fails after 10 s.
async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// This node lost the upstream and won it back (a newer token) while a
/// driver ran: the resume at that gain skipped the batch, which had a
/// driver. The old driver stops at once and the batch carries on under a
/// new one, rather than being left with none until the next takeover.
#[tokio::test]
async fn a_driver_that_outlived_its_token_leaves_its_batch_to_a_new_one() {
    let h = harness().await;
    let app = &h.app;
    let polls = || {
        app.metrics
            .upstream_calls
            .with_label_values(&["emu", "get_batch", "200"])
            .get()
    };
    let batch = claim(app).await;
    super::spawn_driver(app.clone(), batch, false, h.shutdown.clone());
    wait_until("the batch is polled", || polls() >= 2).await;

    app.upstreams[0].ownership.set_token(7);
    let seen = polls();
    wait_until("a new driver polls the batch", || polls() >= seen + 3).await;
    assert_eq!(app.metrics.live_batches.get(), 1, "one driver, not two");
}

#[tokio::test]
async fn no_driver_starts_for_a_claim_that_is_not_durable() {
    let h = harness().await;
    let app = h.app.clone();
    enqueue(&app, 2).await;
    fail_commits(&app, true);
    let policy = FlushPolicy {
        max_requests: 100,
        max_bytes: 1 << 20,
        max_wait: Duration::from_secs(3600),
        max_inputs: u64::MAX,
    };
    let flusher = {
        let app = app.clone();
        let shutdown = h.shutdown.clone();
        tokio::spawn(async move {
            flush_queue(&app, &queue(), &policy, FlushReason::Manual, 1, &shutdown).await;
        })
    };
    // The claim's commit fails again and again: no driver meanwhile.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while failed_commits(&app) < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "commits never retried"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        app.metrics.live_batches.get(),
        0,
        "a driver started for a claim that is not on disk"
    );
    fail_commits(&app, false);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while app.metrics.live_batches.get() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "no driver once durable"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    flusher.await.unwrap();
}

/// Creates `n` batches on the emulator that are not Ferry's (no metadata,
/// another input file), straight through its API.
async fn foreign_batches(app: &App, n: usize) {
    let up = &app.upstreams[0];
    let line = r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}]}}"#;
    let body = format!("{line}\n");
    let len = body.len() as u64;
    let stream = futures::stream::once(async move { Ok(bytes::Bytes::from(body)) });
    let file = up
        .client
        .upload_jsonl("someone-else.jsonl", len, stream)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/batches", base_url(up));
    for _ in 0..n {
        let r = http
            .post(&url)
            .bearer_auth(KEY)
            .json(&serde_json::json!({
                "input_file_id": file, "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }
}

fn base_url(up: &Upstream) -> String {
    match &up.settings.target {
        crate::config::UpstreamTarget::Url(u) => u.clone(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_created_batch_is_found_behind_more_than_a_thousand_newer_ones() {
    let h = harness().await;
    let app = &h.app;
    let up = &app.upstreams[0];
    let mut batch = claim(app).await;
    upload(app, up, &mut batch, false, &h.shutdown)
        .await
        .unwrap();
    let uploaded = batch.clone();
    let BatchState::Uploaded { file_id } = uploaded.state.clone() else {
        panic!("{:?}", batch.state);
    };
    create(app, up, &mut batch, &file_id, false).await.unwrap();
    let BatchState::Submitted { batch_id, .. } = batch.state.clone() else {
        panic!("{:?}", batch.state);
    };
    // The account goes on making batches (1,050 more) while Ferry is down,
    // and Ferry comes back with only `uploaded` on record (the crash fell
    // between the create and its record).
    foreign_batches(app, 1_050).await;
    let mut batch = uploaded;
    create(app, up, &mut batch, &file_id, true).await.unwrap();
    assert_eq!(
        batch.state,
        BatchState::Submitted {
            file_id,
            batch_id: batch_id.clone()
        },
        "the batch created before must be adopted, not created again"
    );
    let newest = up.client.list_batches(None, 1).await.unwrap();
    assert_ne!(newest.data[0].id, batch_id);
    assert!(
        newest.data[0].metadata_str("ferry_batch_id").is_none(),
        "a second batch was created: {:?}",
        newest.data[0]
    );
}

#[tokio::test]
async fn a_run_of_404s_is_stored_and_counts_from_its_first_after_a_restart() {
    let h = harness().await;
    let app = h.app.clone();
    let batch = claim(&app).await;
    // A batch this upstream does not know (as after a changed key).
    let batch = app
        .store
        .mark_submitted_fenced(&batch, "file-gone", "batch_gone", "upstream/emu", 1)
        .await
        .unwrap()
        .unwrap();
    let poller = {
        let (app, mut batch, mut shutdown) = (app.clone(), batch.clone(), h.shutdown.clone());
        tokio::spawn(async move {
            let up = &app.upstreams[0];
            let _ = poll_and_ingest(
                &app,
                up,
                &mut batch,
                "file-gone",
                "batch_gone",
                true,
                &mut shutdown,
            )
            .await;
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let stored = loop {
        let b = app.store.get_batch(batch.id).await.unwrap().unwrap();
        if b.missing_since.is_some() {
            break b;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the first 404 was not stored"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    poller.abort();
    assert!(
        matches!(stored.state, BatchState::Submitted { .. }),
        "lost before lost_after_secs (6 h here): {stored:?}"
    );
    assert_eq!(
        app.metrics
            .batches
            .with_label_values(&["emu", "lost"])
            .get(),
        0
    );

    // A restart reads the record back: the run began 6 h ago, so the next
    // 404 loses the batch at once.
    let mut batch = stored;
    let lost_after = app.upstreams[0].settings.lost_after.as_millis() as u64;
    batch.missing_since = batch.missing_since.map(|t| t - lost_after);
    app.store.put_batch(&batch).await.unwrap();
    let mut shutdown = h.shutdown.clone();
    let up = &app.upstreams[0];
    let step = poll_and_ingest(
        &app,
        up,
        &mut batch,
        "file-gone",
        "batch_gone",
        true,
        &mut shutdown,
    );
    tokio::time::timeout(Duration::from_secs(20), step)
        .await
        .expect("the batch was not lost")
        .unwrap();
    assert!(
        matches!(&batch.state, BatchState::Done { upstream_status, .. } if upstream_status == "lost"),
        "{batch:?}"
    );
    assert_eq!(
        app.store.get_batch(batch.id).await.unwrap().as_ref(),
        Some(&batch)
    );
    assert_eq!(
        app.metrics
            .batches
            .with_label_values(&["emu", "lost"])
            .get(),
        1
    );
    // Both members are queued again, one attempt spent.
    assert_eq!(
        app.store
            .queue_stats_for(&queue())
            .await
            .unwrap()
            .map(|s| s.count),
        Some(2)
    );
    for id in app.store.members(batch.id).await.unwrap() {
        let rec = app.store.get(id).await.unwrap().unwrap();
        assert_eq!((rec.status, rec.attempts), (RequestStatus::Queued, 1));
    }
}

#[tokio::test]
async fn a_whole_batch_of_outcomes_is_written_in_slices() {
    let h = harness().await;
    let app = &h.app;
    let up = &app.upstreams[0];
    let n = OUTCOME_CHUNK + OUTCOME_CHUNK / 4;
    enqueue(app, n).await;
    let mut batch = app
        .store
        .claim_batch(&queue(), n, 1 << 30, "manual", (LEASE, 1))
        .await
        .unwrap()
        .unwrap();
    batch = app
        .store
        .mark_submitted_fenced(&batch, "file-x", "batch_x", "upstream/emu", 1)
        .await
        .unwrap()
        .unwrap();
    let obj = |status: &str| -> crate::upstream::BatchObject {
        serde_json::from_value(serde_json::json!({"id": "batch_x", "status": status})).unwrap()
    };
    // A batch that failed with no reason given: every member is retried.
    let finished = ingest_batch(app, up, &batch, &obj("failed"), &h.shutdown)
        .await
        .unwrap();
    assert_eq!(finished, 0);
    assert_eq!(
        app.store.queued_total().await.unwrap(),
        n as u64,
        "all re-queued"
    );
    let largest = || {
        app.store
            .sled()
            .largest_outcome_write
            .load(Ordering::SeqCst)
    };
    assert!(
        largest() <= OUTCOME_CHUNK,
        "one write of {} outcomes",
        largest()
    );

    // A completed batch with no result lines: every member is absent.
    let mut batch = app
        .store
        .claim_batch(&queue(), n, 1 << 30, "manual", (LEASE, 1))
        .await
        .unwrap()
        .unwrap();
    batch = app
        .store
        .mark_submitted_fenced(&batch, "file-y", "batch_y", "upstream/emu", 1)
        .await
        .unwrap()
        .unwrap();
    app.store
        .sled()
        .largest_outcome_write
        .store(0, Ordering::SeqCst);
    ingest_batch(app, up, &batch, &obj("completed"), &h.shutdown)
        .await
        .unwrap();
    assert_eq!(
        app.store.queued_total().await.unwrap(),
        n as u64,
        "all re-queued again"
    );
    assert!(
        largest() <= OUTCOME_CHUNK,
        "one write of {} outcomes",
        largest()
    );
}

/// Anthropic: a create whose `submitted` was not made durable is found
/// again by its custom-id prefix rather than made twice; while a batch of
/// the same size is still running it cannot be told apart, so the step
/// waits instead of creating another.
#[tokio::test]
async fn a_cut_short_message_batch_create_is_found_not_made_again() {
    let (h, emulator) = harness_of("anthropic").await;
    let app = &h.app;
    let up = &app.upstreams[0];
    let key = QueueKey {
        upstream: "emu".into(),
        endpoint: crate::endpoint::Endpoint::Messages,
        model: "claude-haiku-4-5".into(),
    };
    for i in 0..2 {
        let body = format!(
            r#"{{"model":"claude-haiku-4-5","max_tokens":8,"messages":[{{"role":"user","content":"m{i}"}}]}}"#
        );
        let rec = RequestRecord {
            model: "claude-haiku-4-5".into(),
            upstream: "emu".into(),
            endpoint: crate::endpoint::Endpoint::Messages,
            body_len: body.len() as u64,
            created_at: crate::store::now_secs(),
            ..RequestRecord::for_test("t", &format!("c{i}"), &format!("h{i}"))
        };
        let stored = app.store.accept(rec, body.into_bytes()).await.unwrap();
        assert!(matches!(stored, Intake::Created(_)));
    }
    let mut batch = app
        .store
        .claim_batch(&key, 100, 1 << 20, "manual", (LEASE, 1))
        .await
        .unwrap()
        .unwrap();
    let count = || async {
        up.client
            .list_message_batches(None, 100)
            .await
            .unwrap()
            .0
            .len()
    };

    // Created upstream, but `submitted` cannot be made durable.
    fail_commits(app, true);
    assert!(
        upload(app, up, &mut batch, false, &h.shutdown)
            .await
            .is_err()
    );
    assert_eq!(batch.state, BatchState::Claimed);
    fail_commits(app, false);
    // Still running: it may be ours, and cannot be told yet.
    assert!(
        upload(app, up, &mut batch, true, &h.shutdown)
            .await
            .is_err()
    );
    assert_eq!(batch.state, BatchState::Claimed);
    assert_eq!(
        count().await,
        1,
        "a second batch was created while the first was undecided"
    );
    // Once it ended, its results name this instance and batch: adopted.
    reqwest::Client::new()
        .post(format!("http://{emulator}/_emulator/clock"))
        .json(&serde_json::json!({"advance_seconds": 4000}))
        .send()
        .await
        .unwrap();
    upload(app, up, &mut batch, true, &h.shutdown)
        .await
        .unwrap();
    let BatchState::Submitted { batch_id, .. } = &batch.state else {
        panic!("{:?}", batch.state);
    };
    assert!(batch_id.starts_with("msgbatch_"));
    assert_eq!(count().await, 1, "created once, then adopted");
}

fn claude_queue() -> QueueKey {
    QueueKey {
        upstream: "emu".into(),
        endpoint: crate::endpoint::Endpoint::Messages,
        model: "claude-haiku-4-5".into(),
    }
}

/// Queues `n` Claude messages (bodies of one length, `pad` in each) and
/// commits them.
async fn enqueue_claude(app: &App, n: usize, pad: &str) {
    for i in 0..n {
        let body = claude_body(i, pad);
        let rec = RequestRecord {
            model: "claude-haiku-4-5".into(),
            upstream: "emu".into(),
            endpoint: crate::endpoint::Endpoint::Messages,
            body_len: body.len() as u64,
            created_at: crate::store::now_secs(),
            ..RequestRecord::for_test("t", &format!("c{i}"), &format!("h{i}"))
        };
        let stored = app.store.accept(rec, body.into_bytes()).await.unwrap();
        assert!(matches!(stored, Intake::Created(_)));
    }
}

fn claude_body(i: usize, pad: &str) -> String {
    format!(
        r#"{{"model":"claude-haiku-4-5","max_tokens":8,"messages":[{{"role":"user","content":"m{i:03}{pad}"}}]}}"#
    )
}

/// Anthropic: a queue past the upstream's `max_bytes` (the emulator
/// refusing a create body over the same size with `413`) flushes the
/// requests that fit by the queue's byte count, and that create body fits.
#[tokio::test]
async fn a_queue_at_max_bytes_flushes_a_create_body_that_fits() {
    const LIMIT: u64 = 2048;
    let emu = crate::emulator::EmulatorConfig {
        validating_seconds: 3600.0,
        max_file_bytes: Some(LIMIT),
        ..Default::default()
    };
    let (h, _) = harness_with("anthropic", emu, &format!("max_bytes = {LIMIT}")).await;
    let app = &h.app;
    let up = &app.upstreams[0];
    assert_eq!(up.settings.max_bytes, LIMIT);
    let pad = "x".repeat(380);
    enqueue_claude(app, 8, &pad).await;
    let queued = app
        .store
        .queue_stats_for(&claude_queue())
        .await
        .unwrap()
        .unwrap();
    assert!(queued.bytes > LIMIT, "{queued:?}");
    let per_request = queued.bytes / queued.count;

    // All eight in one create are refused for their size...
    let lines: String = (0..8)
        .map(|i| {
            let id = i as u64 + 1;
            let prefix = crate::store::line_prefix(crate::endpoint::Endpoint::Messages, id);
            format!(
                "{prefix}{}{}",
                claude_body(i, &pad),
                crate::store::LINE_SUFFIX
            )
        })
        .collect();
    let lines = futures::stream::iter([Ok(bytes::Bytes::from(lines))]);
    let prefix = crate::upstream::anthropic::custom_id_prefix(&app.instance_id, 99);
    let refused = up.client.create_message_batch(lines, prefix).await;
    assert!(
        matches!(
            refused,
            Err(crate::upstream::UpstreamError::Status { status: 413, .. })
        ),
        "{refused:?}"
    );

    // ...while a flush takes what the count lets in, right up to the limit.
    let mut batch = app
        .store
        .claim_batch(
            &claude_queue(),
            100,
            up.settings.max_bytes,
            "manual",
            (LEASE, 1),
        )
        .await
        .unwrap()
        .unwrap();
    let counted = batch.request_count * per_request;
    assert!(
        counted <= LIMIT && counted + per_request > LIMIT,
        "{} requests of {per_request} bytes",
        batch.request_count
    );
    upload(app, up, &mut batch, false, &h.shutdown)
        .await
        .unwrap();
    assert!(
        matches!(batch.state, BatchState::Submitted { .. }),
        "{:?}",
        batch.state
    );
}

/// Creates `n` Message Batches of `size` requests each on the emulator at
/// `emulator` that are not Ferry's (another client's custom ids), straight
/// through its API.
async fn foreign_message_batches(emulator: std::net::SocketAddr, n: usize, size: usize) {
    let requests: Vec<serde_json::Value> = (0..size)
        .map(|i| {
            serde_json::json!({"custom_id": format!("other-{i}"), "params": {
                "model": "claude-haiku-4-5", "max_tokens": 8,
                "messages": [{"role": "user", "content": "x"}]}})
        })
        .collect();
    let body = serde_json::json!({ "requests": requests });
    let http = reqwest::Client::new();
    for _ in 0..n {
        let r = http
            .post(format!("http://{emulator}/v1/messages/batches"))
            .header("x-api-key", KEY)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }
}

/// Anthropic, on a busy key: more Message Batches of the same size were
/// created after Ferry's than one page (or the 500 once scanned) holds; the
/// resumed create still finds its own rather than paying twice.
#[tokio::test]
async fn a_message_batch_is_found_behind_more_than_a_page_of_newer_ones() {
    let (h, emulator) = harness_of("anthropic").await;
    let app = &h.app;
    let up = &app.upstreams[0];
    enqueue_claude(app, 2, "").await;
    let claimed = app
        .store
        .claim_batch(&claude_queue(), 100, 1 << 20, "manual", (LEASE, 1))
        .await
        .unwrap()
        .unwrap();
    let mut batch = claimed.clone();
    upload(app, up, &mut batch, false, &h.shutdown)
        .await
        .unwrap();
    let BatchState::Submitted { batch_id, .. } = batch.state.clone() else {
        panic!("{:?}", batch.state);
    };
    // The key goes on making batches of the same size (1,050 more) while
    // Ferry is down; all of them end. Ferry comes back with only the claim
    // on record (the crash fell between the create and its record).
    foreign_message_batches(emulator, 1_050, 2).await;
    reqwest::Client::new()
        .post(format!("http://{emulator}/_emulator/clock"))
        .json(&serde_json::json!({"advance_seconds": 4000}))
        .send()
        .await
        .unwrap();
    let mut batch = claimed;
    upload(app, up, &mut batch, true, &h.shutdown)
        .await
        .unwrap();
    let BatchState::Submitted {
        batch_id: adopted, ..
    } = &batch.state
    else {
        panic!("{:?}", batch.state);
    };
    assert_eq!(
        adopted, &batch_id,
        "the message batch created before must be adopted, not created again"
    );
    let (newest, _) = up.client.list_message_batches(None, 1).await.unwrap();
    let first = up
        .client
        .first_result_custom_id(&newest[0].id)
        .await
        .unwrap();
    assert!(
        first.as_deref().is_some_and(|id| id.starts_with("other-")),
        "a second batch was created: {:?} (first result {first:?})",
        newest[0]
    );
}

// ---- the synchronous lanes of a request escalated for its deadline ----

/// The emulator's real-time calls so far, by its stats.
async fn realtime_calls(app: &App) -> u64 {
    let url = format!(
        "http://{}/_emulator/stats",
        app.upstreams[0].passthrough.addr
    );
    let stats: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    stats["realtime_requests"].as_u64().unwrap()
}

/// An emulator serving flex for `gpt-4o-mini`, refusing a share of it.
fn flex_emulator(unavailable: f64) -> crate::emulator::EmulatorConfig {
    crate::emulator::EmulatorConfig {
        flex_models: vec!["gpt-4o-mini".into()],
        flex_unavailable_rate: unavailable,
        ..Default::default()
    }
}

/// The upstream's lines: flex for `gpt-4o-mini`, standard expected to take
/// a minute.
const FLEX_UPSTREAM: &str = r#"flex_models = ["gpt-4o-mini"]
        standard_latency_prior_secs = 60
        escalation_margin_secs = 0"#;

/// One request due `in_secs` from now, claimed alone onto `lane`.
async fn escalated(app: &App, in_secs: u64, lane: Lane) -> BatchRecord {
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"soon"}]}"#;
    let now = crate::store::now_secs();
    let rec = RequestRecord {
        model: "gpt-4o-mini".into(),
        upstream: "emu".into(),
        body_len: body.len() as u64,
        created_at: now,
        deadline_at: Some(now + in_secs),
        ..RequestRecord::for_test("t", "soon", "h")
    };
    let Intake::Created(rec) = app.store.accept(rec, body.into()).await.unwrap() else {
        panic!()
    };
    app.store
        .claim_request(&queue(), rec.id, lane, (LEASE, 1))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn flex_refused_without_time_to_retry_steps_up_recorded_before_the_standard_call() {
    let h = harness_with("openai", flex_emulator(1.0), FLEX_UPSTREAM)
        .await
        .0;
    let (app, up) = (&h.app, &h.app.upstreams[0]);
    // Due in 30 s: standard's minute is already too long to retry flex.
    let mut batch = escalated(app, 30, Lane::Flex).await;
    let mut shutdown = h.shutdown.clone();
    super::escalate::send(app, up, &mut batch, &mut shutdown)
        .await
        .unwrap();
    let stored = app.store.get_batch(batch.id).await.unwrap().unwrap();
    assert_eq!(stored.lane, Lane::Standard, "the step up is on disk");
    assert!(!stored.is_live());
    let id = app.store.members(batch.id).await.unwrap()[0];
    let rec = app.store.get(id).await.unwrap().unwrap();
    assert_eq!(rec.status, RequestStatus::Completed);
    assert_eq!(rec.answered_by(), Some(Lane::Standard));
    let answer = app.store.result(id).await.unwrap().unwrap();
    assert_eq!(answer.body_value()["service_tier"], "default");
    assert_eq!(
        realtime_calls(app).await,
        2,
        "one refused flex call, one standard"
    );

    // Resumed as if a crash came before the batch was marked done: the
    // stored answer stands and nothing is sent again.
    let mut again = BatchRecord {
        state: BatchState::Claimed,
        ..stored
    };
    app.store.put_batch(&again).await.unwrap();
    super::escalate::send(app, up, &mut again, &mut shutdown)
        .await
        .unwrap();
    assert_eq!(realtime_calls(app).await, 2);
    let after = app.store.get(id).await.unwrap().unwrap();
    assert_eq!(after.completed_at, rec.completed_at, "answered once");
    assert!(
        !app.store
            .get_batch(batch.id)
            .await
            .unwrap()
            .unwrap()
            .is_live()
    );
}

#[tokio::test]
async fn a_batch_recorded_on_standard_never_goes_back_to_flex() {
    // Flex would be served now; the record says standard.
    let h = harness_with("openai", flex_emulator(0.0), FLEX_UPSTREAM)
        .await
        .0;
    let (app, up) = (&h.app, &h.app.upstreams[0]);
    let mut batch = escalated(app, 3600, Lane::Standard).await;
    let mut shutdown = h.shutdown.clone();
    super::escalate::send(app, up, &mut batch, &mut shutdown)
        .await
        .unwrap();
    let id = app.store.members(batch.id).await.unwrap()[0];
    let answer = app.store.result(id).await.unwrap().unwrap();
    assert_eq!(answer.body_value()["service_tier"], "default");
    assert_eq!(realtime_calls(app).await, 1);
}

#[tokio::test]
async fn flex_refused_with_time_to_spare_is_retried_on_flex() {
    // Half the flex calls refused: seed 1 refuses the first two. A day to
    // the deadline leaves time for every retry.
    let emu = crate::emulator::EmulatorConfig {
        seed: 1,
        ..flex_emulator(0.5)
    };
    let h = harness_with("openai", emu, FLEX_UPSTREAM).await.0;
    let (app, up) = (&h.app, &h.app.upstreams[0]);
    let mut batch = escalated(app, 86_400, Lane::Flex).await;
    let mut shutdown = h.shutdown.clone();
    super::escalate::send(app, up, &mut batch, &mut shutdown)
        .await
        .unwrap();
    assert_eq!(batch.lane, Lane::Flex);
    assert_eq!(realtime_calls(app).await, 3, "two refusals retried on flex");
    let id = app.store.members(batch.id).await.unwrap()[0];
    let answer = app.store.result(id).await.unwrap().unwrap();
    assert_eq!(answer.body_value()["service_tier"], "flex");
}

#[tokio::test]
async fn a_step_up_is_on_disk_before_the_standard_call() {
    // Every call fails (500/503): flex cannot be retried in time, and the
    // standard call that follows fails too, leaving the batch unfinished.
    let emu = crate::emulator::EmulatorConfig {
        error_rate: 1.0,
        ..flex_emulator(0.0)
    };
    let h = harness_with("openai", emu, FLEX_UPSTREAM).await.0;
    let (app, up) = (&h.app, &h.app.upstreams[0]);
    let mut batch = escalated(app, 30, Lane::Flex).await;
    let mut shutdown = h.shutdown.clone();
    let step = super::escalate::send(app, up, &mut batch, &mut shutdown).await;
    assert!(step.is_err(), "the standard call failed");
    let stored = app.store.get_batch(batch.id).await.unwrap().unwrap();
    assert_eq!(
        (stored.lane, stored.state),
        (Lane::Standard, BatchState::Claimed),
        "the step up was recorded before the standard call, the batch not finished"
    );
    let id = app.store.members(batch.id).await.unwrap()[0];
    let rec = app.store.get(id).await.unwrap().unwrap();
    assert_eq!(
        (rec.status, rec.answered_by()),
        (RequestStatus::Submitted, None)
    );
}
