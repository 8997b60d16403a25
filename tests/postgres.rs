//! PostgreSQL, against a real server: the URL of a throwaway one is in
//! `FERRY_TEST_PG_URL` (`.ci/run` starts it). Without it these tests fail;
//! they never skip. Each test works in a database of its own.

use ferry::store::pg::{self, PgError, migrate};
use tokio_postgres::NoTls;

/// A new, empty database on the test server; its config.
async fn fresh_database() -> tokio_postgres::Config {
    let url = std::env::var("FERRY_TEST_PG_URL").unwrap_or_else(|_| {
        panic!(
            "FERRY_TEST_PG_URL is not set: these tests need a PostgreSQL server. \
             `bash .ci/run` starts one; by hand: `bash .ci/postgres --keep` and export the URL it prints"
        )
    });
    let admin = pg::parse_url(&url).expect("FERRY_TEST_PG_URL");
    let (client, conn) = admin
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at FERRY_TEST_PG_URL: {e}"));
    tokio::spawn(conn);
    let name = format!("ferry_test_{}", rand::random::<u64>());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    let mut config = admin;
    config.dbname(&name);
    config
}

#[tokio::test]
async fn migrations_run_once_even_when_nodes_start_together() {
    let pool = pg::pool(fresh_database().await, 8).unwrap();
    // Four nodes starting at once: one applies the schema, the others wait
    // on the advisory lock and find it done.
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut client = pool.get().await.unwrap();
                migrate::migrate(&mut client).await
            })
        })
        .collect();
    let mut applied = Vec::new();
    for r in runs {
        applied.push(r.await.unwrap().unwrap().applied);
    }
    let known = migrate::known_version();
    let all: Vec<i32> = (1..=known).collect();
    assert_eq!(
        applied.iter().filter(|a| **a == all).count(),
        1,
        "{applied:?}"
    );
    assert_eq!(
        applied.iter().filter(|a| a.is_empty()).count(),
        3,
        "{applied:?}"
    );

    let client = pool.get().await.unwrap();
    let versions: Vec<i32> = client
        .query("SELECT version FROM ferry_schema ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, all);
    for table in [
        "requests",
        "bodies",
        "results",
        "queue",
        "queue_counters",
        "batches",
        "members",
        "outbox",
        "leases",
    ] {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = $1",
                &[&table],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "table {table}");
    }
    // Starting again is a no-op.
    let mut client = pool.get().await.unwrap();
    let again = migrate::migrate(&mut client).await.unwrap();
    assert_eq!((again.from, again.applied), (known, vec![]));
}

#[tokio::test]
async fn a_schema_newer_than_this_build_is_refused() {
    let pool = pg::pool(fresh_database().await, 2).unwrap();
    let mut client = pool.get().await.unwrap();
    // A newer build ran first and added a migration this one does not know.
    let mut newer: Vec<(i32, &str)> = migrate::MIGRATIONS.to_vec();
    let next = migrate::known_version() + 1;
    newer.push((next, "CREATE TABLE from_the_future (x int)"));
    migrate::migrate_with(&mut client, &newer).await.unwrap();
    let err = migrate::migrate(&mut client).await.unwrap_err();
    assert!(
        matches!(err, PgError::SchemaTooNew { found, known } if found == next && known == next - 1),
        "{err}"
    );
    assert!(
        err.to_string().contains("newer than this Ferry knows"),
        "{err}"
    );
}

#[tokio::test]
async fn a_bad_url_is_refused_without_echoing_it() {
    let err = pg::parse_url("postgres://user:s3cret@host:notaport/db").unwrap_err();
    assert!(!err.to_string().contains("s3cret"), "{err}");
}

// ------------------------------------------------------------ the store

use std::collections::HashSet;
use std::time::Duration;

use ferry::endpoint::Endpoint;
use ferry::store::pg::PgStore;
use ferry::store::{
    BatchRecord, BatchState, CancelOutcome, Grant, Intake, Outcome, QueueKey, QueueStats,
    RequestError, RequestRecord, RequestStatus, StoredResult, WebhookState, WebhookStatus,
    line_len,
};

/// A store on a fresh database, named `owner` in leases.
async fn store(owner: &str) -> (tokio_postgres::Config, PgStore) {
    let config = fresh_database().await;
    let s = PgStore::connect(config.clone(), 4)
        .await
        .expect("connect")
        .with_owner(owner);
    (config, s)
}

/// Another node on the same database.
async fn node(config: &tokio_postgres::Config, owner: &str) -> PgStore {
    PgStore::connect(config.clone(), 4)
        .await
        .expect("connect")
        .with_owner(owner)
}

/// A queued request of `tenant` for model `m` of upstream `u`, with a
/// 2-byte body (`{}`).
fn rec(tenant: &str, custom_id: &str, body_sha256: &str) -> RequestRecord {
    RequestRecord::queued(tenant, custom_id, "u", "m", body_sha256, 2, 1_700_000_000)
}

fn with_callback(r: RequestRecord) -> RequestRecord {
    RequestRecord {
        callback_url: Some("https://hooks.example/x".into()),
        ..r
    }
}

fn qk() -> QueueKey {
    QueueKey::chat("u", "m")
}

fn payload(r: &RequestRecord, res: Option<&StoredResult>) -> String {
    format!(
        r#"{{"id":{},"status":"{}","result":{}}}"#,
        r.id,
        r.status.as_str(),
        res.is_some()
    )
}

fn err(code: &str) -> RequestError {
    RequestError {
        code: code.into(),
        message: "m".into(),
    }
}

async fn created(s: &PgStore, r: RequestRecord) -> RequestRecord {
    match s.accept(r, b"{}".to_vec()).await.unwrap() {
        Intake::Created(r) => r,
        other => panic!("{other:?}"),
    }
}

/// Queues `n` requests of tenant `t` with custom ids `{prefix}0..`; their
/// ids in order.
async fn queue_n(s: &PgStore, prefix: &str, n: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(created(s, rec("t", &format!("{prefix}{i}"), "h")).await.id);
    }
    ids
}

async fn count(config: &tokio_postgres::Config, sql: &str) -> i64 {
    let (client, conn) = config.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn accept_is_idempotent_per_custom_id_and_refuses_another_body() {
    let (_, s) = store("a").await;
    let a = created(&s, rec("t1", "x", "h1")).await;
    assert!(a.id > 0);
    let Intake::Existing(b) = s
        .accept(rec("t1", "x", "h1"), b"{}".to_vec())
        .await
        .unwrap()
    else {
        panic!("same body: the earlier ticket")
    };
    assert_eq!(b, a);
    let Intake::Conflict(c) = s
        .accept(rec("t1", "x", "h2"), b"[]".to_vec())
        .await
        .unwrap()
    else {
        panic!("another body: a conflict")
    };
    assert_eq!(c.id, a.id);
    let other = created(&s, rec("t2", "x", "h2")).await;
    assert_ne!(other.id, a.id);

    assert_eq!(s.get(a.id).await.unwrap().unwrap(), a);
    assert_eq!(s.find("t1", "x").await.unwrap().unwrap(), a);
    assert!(s.find("t3", "x").await.unwrap().is_none());
    assert!(s.get(u64::from(u32::MAX)).await.unwrap().is_none());
    assert_eq!(s.body(a.id).await.unwrap().unwrap(), b"{}");
    assert!(s.result(a.id).await.unwrap().is_none());
    // The conflicting intake stored nothing: the first body stands.
    let stats = s.queue_stats_for(&qk()).await.unwrap().unwrap();
    assert_eq!(stats.count, 2);
    assert_eq!(
        stats.bytes,
        line_len(Endpoint::ChatCompletions, a.id, 2)
            + line_len(Endpoint::ChatCompletions, other.id, 2)
    );
    assert!(stats.oldest_ms > 0);
    assert_eq!(s.queued_total().await.unwrap(), 2);
}

#[tokio::test]
async fn two_nodes_accepting_one_custom_id_store_one_request() {
    let (config, a) = store("a").await;
    let b = node(&config, "b").await;
    let mut races = Vec::new();
    for i in 0..25 {
        for s in [a.clone(), b.clone()] {
            races.push(tokio::spawn(async move {
                s.accept(rec("t", &format!("race{i}"), "h"), b"{}".to_vec())
                    .await
            }));
        }
    }
    let mut ids_created = Vec::new();
    let mut existing = 0;
    for r in races {
        match r.await.unwrap().unwrap() {
            Intake::Created(r) => ids_created.push(r.id),
            Intake::Existing(_) => existing += 1,
            Intake::Conflict(r) => panic!("same body, conflict: {r:?}"),
        }
    }
    assert_eq!((ids_created.len(), existing), (25, 25));
    assert_eq!(count(&config, "SELECT count(*) FROM requests").await, 25);
    assert_eq!(count(&config, "SELECT count(*) FROM queue").await, 25);
    assert_eq!(count(&config, "SELECT count(*) FROM bodies").await, 25);
    assert_eq!(a.queued_total().await.unwrap(), 25);
    for id in ids_created {
        assert!(b.get(id).await.unwrap().is_some());
    }
}

#[tokio::test]
async fn cancel_wins_only_while_queued_and_unclaimed() {
    let (config, s) = store("a").await;
    let plain = created(&s, rec("t", "plain", "h")).await;
    let hooked = created(&s, with_callback(rec("t", "hooked", "h"))).await;
    let claimed = created(&s, rec("t", "claimed", "h")).await;
    let b = s
        .claim_batch(&qk(), 1, u64::MAX, "size")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.members(b.id).await.unwrap(), vec![plain.id]);

    // Claimed: too late, and nothing changed.
    let CancelOutcome::TooLate(r) = s.cancel("t", "plain", &payload).await.unwrap() else {
        panic!()
    };
    assert_eq!((r.status, r.batch), (RequestStatus::Queued, Some(b.id)));

    // Queued without a callback: cancelled, no webhook, body gone.
    let CancelOutcome::Cancelled(r) = s.cancel("t", "claimed", &payload).await.unwrap() else {
        panic!()
    };
    assert_eq!(r.status, RequestStatus::Cancelled);
    assert!(r.completed_at.is_some() && r.webhook.is_none());
    assert_eq!(s.get(claimed.id).await.unwrap().unwrap(), r);
    assert!(s.body(claimed.id).await.unwrap().is_none());
    assert_eq!(s.outbox_len().await.unwrap(), 0);

    // Queued with a callback: an outbox entry, its payload fixed now.
    let CancelOutcome::Cancelled(r) = s.cancel("t", "hooked", &payload).await.unwrap() else {
        panic!()
    };
    assert_eq!(r.webhook.as_ref().unwrap().status, WebhookStatus::Pending);
    assert_eq!(s.get(hooked.id).await.unwrap().unwrap(), r);
    assert_eq!(s.outbox_len().await.unwrap(), 1);
    let taken = s.take_due_deliveries(u64::MAX, 10).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].request, hooked.id);
    assert_eq!(taken[0].msg_id, format!("msg_ferry_{}", hooked.id));
    assert_eq!(
        taken[0].payload,
        format!(
            r#"{{"id":{},"status":"cancelled","result":false}}"#,
            hooked.id
        )
    );

    assert!(matches!(
        s.cancel("t", "hooked", &payload).await.unwrap(),
        CancelOutcome::AlreadyCancelled(_)
    ));
    assert!(matches!(
        s.cancel("other", "hooked", &payload).await.unwrap(),
        CancelOutcome::NotFound
    ));
    assert!(matches!(
        s.cancel("t", "never", &payload).await.unwrap(),
        CancelOutcome::NotFound
    ));
    // Both cancels left the queue; the claim took the third.
    assert_eq!(
        s.queue_stats().await.unwrap(),
        vec![(qk(), QueueStats::default())]
    );
    assert_eq!(count(&config, "SELECT count(*) FROM queue").await, 0);
}

#[tokio::test]
async fn claims_take_the_oldest_within_their_limits_and_keep_counters() {
    let (_, s) = store("a").await;
    assert!(
        s.claim_batch(&qk(), 10, 1 << 20, "size")
            .await
            .unwrap()
            .is_none()
    );
    let ids = queue_n(&s, "c", 5).await;
    let one = line_len(Endpoint::ChatCompletions, ids[0], 2);
    let b = s
        .claim_batch(&qk(), 3, u64::MAX, "size")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.members(b.id).await.unwrap(), ids[..3]);
    assert_eq!(
        (b.request_count, b.bytes, b.state.clone()),
        (3, 3 * one, BatchState::Claimed)
    );
    assert_eq!(s.get_batch(b.id).await.unwrap().unwrap(), b);
    for id in &ids[..3] {
        let r = s.get(*id).await.unwrap().unwrap();
        assert_eq!(
            (r.status, r.batch, r.batch_id),
            (RequestStatus::Queued, Some(b.id), None)
        );
    }
    let stats = s.queue_stats_for(&qk()).await.unwrap().unwrap();
    assert_eq!((stats.count, stats.bytes), (2, 2 * one));
    // A byte limit of one and a half lines takes one line; a limit below
    // one line still takes one.
    let b2 = s
        .claim_batch(&qk(), 10, one + one / 2, "bytes")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((b2.request_count, b2.bytes), (1, one));
    let b3 = s.claim_batch(&qk(), 10, 1, "bytes").await.unwrap().unwrap();
    assert_eq!(s.members(b3.id).await.unwrap(), vec![ids[4]]);
    assert_eq!(
        s.queue_stats_for(&qk()).await.unwrap().unwrap(),
        QueueStats::default()
    );
    assert_eq!(s.queued_total().await.unwrap(), 0);
    assert!(
        s.queue_stats_for(&QueueKey::chat("u", "other"))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(s.recover_claims().await.unwrap(), 3);
    assert_eq!(s.live_batches().await.unwrap().len(), 3);
}

#[tokio::test]
async fn two_nodes_claiming_at_once_never_share_a_request() {
    let (config, a) = store("a").await;
    let b = node(&config, "b").await;
    let ids = queue_n(&a, "c", 500).await;
    let claimer = |s: PgStore| {
        tokio::spawn(async move {
            let mut batches = Vec::new();
            while let Some(batch) = s.claim_batch(&qk(), 7, u64::MAX, "size").await.unwrap() {
                let members = s.members(batch.id).await.unwrap();
                assert_eq!(members.len() as u64, batch.request_count);
                batches.push((batch.id, members));
            }
            batches
        })
    };
    let (ta, tb) = (claimer(a.clone()), claimer(b.clone()));
    let (ba, bb) = (ta.await.unwrap(), tb.await.unwrap());
    assert!(
        !ba.is_empty() && !bb.is_empty(),
        "both claimed: {} {}",
        ba.len(),
        bb.len()
    );
    let mut seen = HashSet::new();
    for (batch, members) in ba.iter().chain(&bb) {
        for id in members {
            assert!(seen.insert(*id), "request {id} in two batches");
            assert_eq!(a.get(*id).await.unwrap().unwrap().batch, Some(*batch));
        }
    }
    assert_eq!(seen, ids.into_iter().collect::<HashSet<_>>());
    assert_eq!(a.queued_total().await.unwrap(), 0);
    assert_eq!(
        a.queue_stats().await.unwrap(),
        vec![(qk(), QueueStats::default())]
    );
}

/// Claims every queued request of `u`/`m` and submits the batch.
/// Records `b` as submitted, as the owner of its upstream does (taking the
/// upstream's lease first).
async fn mark_submitted(s: &PgStore, b: &mut BatchRecord, file_id: &str, batch_id: &str) {
    let lease = format!("upstream/{}", b.upstream);
    let token = s
        .acquire_lease(&lease, Duration::from_secs(60), true)
        .await
        .unwrap()
        .expect("the upstream's lease")
        .token;
    let fence = (lease.as_str(), token);
    assert!(
        s.mark_submitted_fenced(b, file_id, batch_id, fence)
            .await
            .unwrap()
    );
}

async fn submitted_batch(s: &PgStore) -> (BatchRecord, Vec<u64>) {
    let mut b = s
        .claim_batch(&qk(), 100, u64::MAX, "size")
        .await
        .unwrap()
        .unwrap();
    mark_submitted(s, &mut b, "file-in", "batch_up").await;
    let ids = s.members(b.id).await.unwrap();
    (b, ids)
}

#[tokio::test]
async fn outcomes_finish_or_requeue_members_once() {
    let (config, s) = store("a").await;
    for (i, cid) in [
        "done",
        "failed",
        "expired",
        "cancelled",
        "requeue",
        "retry",
        "retry_out",
        "expire_out",
    ]
    .iter()
    .enumerate()
    {
        let r = rec("t", cid, "h");
        created(&s, if i < 2 { with_callback(r) } else { r }).await;
    }
    let (b, ids) = submitted_batch(&s).await;
    for id in &ids {
        let r = s.get(*id).await.unwrap().unwrap();
        assert_eq!((r.status, r.attempts), (RequestStatus::Submitted, 1));
        assert_eq!(r.batch_id.as_deref(), Some("batch_up"));
        assert!(r.submitted_at.is_some());
    }
    // Applying submission again counts nothing twice.
    s.apply_submitted(b.id).await.unwrap();
    assert_eq!(s.get(ids[0]).await.unwrap().unwrap().attempts, 1);

    let result = StoredResult {
        status_code: 200,
        body: bytes::Bytes::from_static(br#"{"ok": true}"#),
    };
    let outcomes = vec![
        (ids[0], Outcome::Completed(result.clone())),
        (ids[1], Outcome::Failed(err("bad"))),
        (ids[2], Outcome::Expired(err("late"))),
        (ids[3], Outcome::Cancelled(err("gone"))),
        (ids[4], Outcome::Requeue),
        (
            ids[5],
            Outcome::Retry {
                error: err("r"),
                max_attempts: 3,
            },
        ),
        (
            ids[6],
            Outcome::Retry {
                error: err("r1"),
                max_attempts: 1,
            },
        ),
        (
            ids[7],
            Outcome::RetryOrExpire {
                error: err("x1"),
                max_attempts: 1,
            },
        ),
    ];
    let done = s
        .apply_outcomes(b.id, outcomes.clone(), &payload)
        .await
        .unwrap();
    let statuses: Vec<_> = done.iter().map(|r| (r.id, r.status)).collect();
    use RequestStatus::*;
    assert_eq!(
        statuses,
        vec![
            (ids[0], Completed),
            (ids[1], Failed),
            (ids[2], Expired),
            (ids[3], Failed),
            (ids[6], Failed),
            (ids[7], Expired)
        ]
    );
    for r in &done {
        assert_eq!(
            &s.get(r.id).await.unwrap().unwrap(),
            r,
            "read back as returned"
        );
        assert!(r.completed_at.is_some());
        assert_eq!(r.batch_id.as_deref(), Some("batch_up"));
        assert!(
            s.body(r.id).await.unwrap().is_none(),
            "a finished body is dropped"
        );
    }
    assert_eq!(s.result(ids[0]).await.unwrap().unwrap(), result);
    // One query gives the record and, only when completed, its answer.
    for (r, cid) in done.iter().zip(["done", "failed"]) {
        let (rec, answer) = s.find_answered("t", cid).await.unwrap().unwrap();
        assert_eq!(&rec, r);
        let expected = (r.status == Completed).then(|| result.clone());
        assert_eq!(answer, expected);
    }
    assert!(s.find_answered("t", "nobody").await.unwrap().is_none());
    assert!(done[0].error.is_none());
    let codes: Vec<_> = done[1..]
        .iter()
        .map(|r| r.error.clone().unwrap().code)
        .collect();
    assert_eq!(codes, ["bad", "late", "gone", "r1", "x1"]);
    // Re-queued: the requeue gave its attempt back, the retry kept it.
    for (id, attempts) in [(ids[4], 0), (ids[5], 1)] {
        let r = s.get(id).await.unwrap().unwrap();
        assert_eq!(
            (r.status, r.batch, r.submitted_at, r.attempts),
            (Queued, None, None, attempts)
        );
        assert!(r.error.is_none());
        assert!(s.body(id).await.unwrap().is_some());
    }
    let stats = s.queue_stats_for(&qk()).await.unwrap().unwrap();
    assert_eq!(stats.count, 2);
    assert_eq!(
        stats.bytes,
        line_len(Endpoint::ChatCompletions, ids[4], 2)
            + line_len(Endpoint::ChatCompletions, ids[5], 2)
    );
    // Re-queued at acceptance time, so the time threshold sends them soon.
    assert_eq!(stats.oldest_ms, 1_700_000_000_000);
    // Webhooks for the two with callbacks, written with their state.
    assert_eq!(s.outbox_len().await.unwrap(), 2);
    let sent = s.take_due_deliveries(u64::MAX, 10).await.unwrap();
    let mut by_request: Vec<_> = sent
        .iter()
        .map(|d| (d.request, d.payload.clone()))
        .collect();
    by_request.sort();
    assert_eq!(
        by_request,
        vec![
            (
                ids[0],
                format!(r#"{{"id":{},"status":"completed","result":true}}"#, ids[0])
            ),
            (
                ids[1],
                format!(r#"{{"id":{},"status":"failed","result":false}}"#, ids[1])
            ),
        ]
    );

    // Applying again changes nothing.
    let again = s.apply_outcomes(b.id, outcomes, &payload).await.unwrap();
    assert!(again.is_empty());
    assert_eq!(s.queue_stats_for(&qk()).await.unwrap().unwrap().count, 2);
    assert_eq!(s.get(ids[0]).await.unwrap().unwrap().status, Completed);
    assert_eq!(count(&config, "SELECT count(*) FROM outbox").await, 2);

    // The re-queued go out in the next batch; the retry is counted there,
    // and at its limit fails.
    let (b2, ids2) = submitted_batch(&s).await;
    assert_eq!(ids2, vec![ids[4], ids[5]]);
    let done = s
        .apply_outcomes(
            b2.id,
            vec![(
                ids[5],
                Outcome::Retry {
                    error: err("r"),
                    max_attempts: 2,
                },
            )],
            &payload,
        )
        .await
        .unwrap();
    assert_eq!(
        (done.len(), done[0].status, done[0].attempts),
        (1, Failed, 2)
    );
    // An outcome naming another batch's member changes nothing.
    let other = s
        .apply_outcomes(b.id, vec![(ids[4], Outcome::Failed(err("no")))], &payload)
        .await
        .unwrap();
    assert!(other.is_empty());
    assert_eq!(s.get(ids[4]).await.unwrap().unwrap().status, Submitted);
}

#[tokio::test]
async fn batch_records_track_their_upstream_objects_across_nodes() {
    let (config, s) = store("a").await;
    let other = node(&config, "b").await;
    created(&s, rec("t", "c", "h")).await;
    let mut b = s
        .claim_batch(&qk(), 10, u64::MAX, "size")
        .await
        .unwrap()
        .unwrap();
    let owned = |s: PgStore| async move {
        let mut v = Vec::new();
        for id in ["file-in", "batch_1", "file-out"] {
            if s.is_own_upstream_object(id).await {
                v.push(id);
            }
        }
        v
    };
    assert!(owned(other.clone()).await.is_empty());
    b.state = BatchState::Uploaded {
        file_id: "file-in".into(),
    };
    s.put_batch(&b).await.unwrap();
    assert_eq!(owned(other.clone()).await, ["file-in"]);
    mark_submitted(&s, &mut b, "file-in", "batch_1").await;
    assert_eq!(owned(other.clone()).await, ["file-in", "batch_1"]);
    assert_eq!(s.recover_claims().await.unwrap(), 0);
    assert_eq!(other.live_batches().await.unwrap(), vec![b.clone()]);
    assert!(other.batches_owing_cleanup("u").await.unwrap().is_empty());
    b.state = BatchState::Done {
        file_id: Some("file-in".into()),
        batch_id: Some("batch_1".into()),
        upstream_status: "completed".into(),
        cleanup: vec!["file-in".into(), "file-out".into()],
    };
    s.put_batch(&b).await.unwrap();
    assert_eq!(owned(other.clone()).await, ["file-in", "file-out"]);
    assert!(other.live_batches().await.unwrap().is_empty());
    assert_eq!(
        other.batches_owing_cleanup("u").await.unwrap(),
        vec![b.clone()]
    );
    assert!(other.batches_owing_cleanup("v").await.unwrap().is_empty());
    // A done batch still names its upstream batch to its members.
    let member = s.find("t", "c").await.unwrap().unwrap();
    assert_eq!(member.batch_id.as_deref(), Some("batch_1"));
    if let BatchState::Done { cleanup, .. } = &mut b.state {
        cleanup.clear();
    }
    s.put_batch(&b).await.unwrap();
    assert!(owned(other.clone()).await.is_empty());
    assert!(other.batches_owing_cleanup("u").await.unwrap().is_empty());
    assert!(s.get_batch(b.id + 1_000).await.unwrap().is_none());
}

/// Cancels `n` queued requests with callbacks (custom ids `{prefix}0..`):
/// `n` deliveries owed.
async fn owe_deliveries(s: &PgStore, prefix: &str, n: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    for i in 0..n {
        let r = created(s, with_callback(rec("t", &format!("{prefix}{i}"), "h"))).await;
        let CancelOutcome::Cancelled(_) = s.cancel("t", &r.custom_id, &payload).await.unwrap()
        else {
            panic!()
        };
        ids.push(r.id);
    }
    ids
}

#[tokio::test]
async fn two_nodes_never_take_one_delivery_and_a_lapsed_lease_is_retaken() {
    let (config, a) = store("a").await;
    let b = node(&config, "b").await;
    let ids = owe_deliveries(&a, "w", 20).await;
    assert_eq!(a.outbox_len().await.unwrap(), 20);
    let due = a.next_delivery_due().await.unwrap().unwrap();
    // Not yet due: nothing is taken.
    assert!(
        a.take_due_deliveries(due - 1, 100)
            .await
            .unwrap()
            .is_empty()
    );
    let (ta, tb) = tokio::join!(
        a.take_due_deliveries(u64::MAX, 15),
        b.take_due_deliveries(u64::MAX, 15)
    );
    let (ta, tb) = (ta.unwrap(), tb.unwrap());
    let mut all: Vec<u64> = ta.iter().chain(&tb).map(|d| d.request).collect();
    assert_eq!(all.len(), 20, "{} + {}", ta.len(), tb.len());
    all.sort_unstable();
    assert_eq!(all, ids);
    // All held: nothing left to take for anyone.
    assert!(
        a.take_due_deliveries(u64::MAX, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        b.take_due_deliveries(u64::MAX, 100)
            .await
            .unwrap()
            .is_empty()
    );

    // A failed try, due again later: back in the schedule with its state.
    let mut d = ta[0].clone();
    d.attempts = 1;
    d.due_ms = 5;
    let state = WebhookState {
        status: WebhookStatus::Pending,
        attempts: 1,
        last_error: Some("503".into()),
    };
    a.retry_delivery(&d, state.clone()).await.unwrap();
    assert_eq!(
        a.get(d.request).await.unwrap().unwrap().webhook,
        Some(state)
    );
    assert!(b.take_due_deliveries(4, 10).await.unwrap().is_empty());
    let again = b.take_due_deliveries(5, 10).await.unwrap();
    assert_eq!(again, vec![d.clone()]);
    // `a` no longer holds it: its late retry changes nothing.
    a.retry_delivery(
        &ta[0],
        WebhookState {
            attempts: 9,
            ..state_of(&a, d.request).await
        },
    )
    .await
    .unwrap();
    assert_eq!(state_of(&a, d.request).await.attempts, 1);
    b.finish_delivery(&again[0], WebhookStatus::Delivered, None)
        .await
        .unwrap();
    assert_eq!(
        state_of(&a, d.request).await.status,
        WebhookStatus::Delivered
    );
    assert_eq!(a.outbox_len().await.unwrap(), 19);

    // A node whose leases last no time at all (standing in for one that
    // died mid-send): what it takes is free again at once.
    let lapsing = node(&config, "c").await.with_delivery_lease(Duration::ZERO);
    for d in ta.iter().skip(1).chain(&tb) {
        b.finish_delivery(d, WebhookStatus::Delivered, None)
            .await
            .unwrap();
    }
    assert_eq!(a.outbox_len().await.unwrap(), 0);
    let more = owe_deliveries(&a, "late", 3).await;
    let taken = lapsing.take_due_deliveries(u64::MAX, 10).await.unwrap();
    assert_eq!(taken.iter().map(|d| d.request).collect::<Vec<_>>(), more);
    let retaken = a.take_due_deliveries(u64::MAX, 10).await.unwrap();
    assert_eq!(retaken, taken);
    // Held by `a` now (60 s): not due until its lease runs out.
    let next = a.next_delivery_due().await.unwrap().unwrap();
    assert!(next > d.first_ms + 50_000, "{next}");
}

/// A lease granted under `token`, with nobody asking for it.
fn grant(token: u64) -> Option<Grant> {
    Some(Grant {
        token,
        wanted_by: None,
    })
}

async fn state_of(s: &PgStore, id: u64) -> WebhookState {
    s.get(id).await.unwrap().unwrap().webhook.unwrap()
}

#[tokio::test]
async fn leases_are_held_by_one_node_and_fence_a_stale_holder() {
    let (config, a) = store("a").await;
    let b = node(&config, "b").await;
    let long = Duration::from_secs(60);
    assert_eq!(
        a.acquire_lease("driver", long, true).await.unwrap(),
        grant(1)
    );
    assert_eq!(b.acquire_lease("driver", long, false).await.unwrap(), None);
    // The holder renews: same token.
    assert_eq!(
        a.acquire_lease("driver", long, true).await.unwrap(),
        grant(1)
    );
    // Other names are independent.
    assert_eq!(
        b.acquire_lease("other", long, true).await.unwrap(),
        grant(1)
    );

    // `a` renews with no time left (standing in for its lease running
    // out): `b` takes it over with a higher token.
    assert_eq!(
        a.acquire_lease("driver", Duration::ZERO, true)
            .await
            .unwrap(),
        grant(1)
    );
    assert_eq!(
        b.acquire_lease("driver", long, true).await.unwrap(),
        grant(2)
    );
    assert_eq!(a.acquire_lease("driver", long, false).await.unwrap(), None);

    // A batch write under the stale token is refused; under the new one
    // it lands.
    created(&a, rec("t", "c", "h")).await;
    let claimed = a
        .claim_batch(&qk(), 10, u64::MAX, "size")
        .await
        .unwrap()
        .unwrap();
    let mut stale = claimed.clone();
    stale.state = BatchState::Uploaded {
        file_id: "file-stale".into(),
    };
    assert!(!a.put_batch_fenced(&stale, "driver", 1).await.unwrap());
    assert_eq!(a.get_batch(claimed.id).await.unwrap().unwrap(), claimed);
    let mut fresh = claimed.clone();
    fresh.state = BatchState::Uploaded {
        file_id: "file-new".into(),
    };
    assert!(b.put_batch_fenced(&fresh, "driver", 2).await.unwrap());
    assert_eq!(a.get_batch(claimed.id).await.unwrap().unwrap(), fresh);
    assert!(!b.put_batch_fenced(&fresh, "nobody", 1).await.unwrap());
    // Recording the upstream batch is fenced the same way: the stale
    // holder writes nothing, its members stay queued.
    let mut late = fresh.clone();
    let fence = ("driver", 1);
    assert!(
        !a.mark_submitted_fenced(&mut late, "file-new", "batch_stale", fence)
            .await
            .unwrap()
    );
    assert_eq!(a.get_batch(claimed.id).await.unwrap().unwrap(), fresh);
    let member = a.members(claimed.id).await.unwrap()[0];
    assert_eq!(
        a.get(member).await.unwrap().unwrap().status,
        RequestStatus::Queued
    );
    let mut current = fresh.clone();
    let fence = ("driver", 2);
    assert!(
        b.mark_submitted_fenced(&mut current, "file-new", "batch_new", fence)
            .await
            .unwrap()
    );
    assert_eq!(
        a.get(member).await.unwrap().unwrap().status,
        RequestStatus::Submitted
    );
    assert_eq!(
        count(&config, "SELECT token FROM leases WHERE name = 'driver'").await,
        2
    );
}

#[tokio::test]
async fn a_claim_under_a_stale_token_takes_nothing() {
    let (config, a) = store("a").await;
    let b = node(&config, "b").await;
    let long = Duration::from_secs(60);
    queue_n(&a, "c", 3).await;
    assert_eq!(
        a.acquire_lease("up", Duration::ZERO, true).await.unwrap(),
        grant(1)
    );
    assert_eq!(b.acquire_lease("up", long, true).await.unwrap(), grant(2));
    // `a` lost the lease between its last renewal and its claim.
    assert_eq!(
        a.claim_batch_fenced(&qk(), 10, u64::MAX, "size", "up", 1)
            .await
            .unwrap(),
        None
    );
    assert_eq!(a.queue_stats().await.unwrap()[0].1.count, 3);
    let batch = b
        .claim_batch_fenced(&qk(), 10, u64::MAX, "size", "up", 2)
        .await
        .unwrap()
        .expect("the owner claims");
    assert_eq!(batch.request_count, 3);
}

#[tokio::test]
async fn a_lease_goes_to_the_node_first_in_line_and_is_handed_over_on_request() {
    let (config, a) = store("a").await;
    let b = node(&config, "b").await;
    let c = node(&config, "c").await;
    let long = Duration::from_secs(60);
    // A free lease goes to whoever asks, first in line or not.
    assert_eq!(a.acquire_lease("up", long, false).await.unwrap(), grant(1));
    // `b` is first in line: it does not get a held lease, but asks for it,
    // and the holder learns so at its next renewal.
    assert_eq!(b.acquire_lease("up", long, true).await.unwrap(), None);
    assert_eq!(
        a.acquire_lease("up", long, false).await.unwrap(),
        Some(Grant {
            token: 1,
            wanted_by: Some("b".into()),
        })
    );
    // `a` hands it over: released, it waits for `b`; `c`, not first in
    // line, does not take a lease that has only just expired.
    a.release_lease("up", 1).await.unwrap();
    assert_eq!(c.acquire_lease("up", long, false).await.unwrap(), None);
    assert_eq!(b.acquire_lease("up", long, true).await.unwrap(), grant(2));
    // A release under a stale token does nothing.
    a.release_lease("up", 1).await.unwrap();
    assert_eq!(a.acquire_lease("up", long, true).await.unwrap(), None);
    assert_eq!(
        b.acquire_lease("up", long, true).await.unwrap(),
        Some(Grant {
            token: 2,
            wanted_by: Some("a".into()),
        })
    );

    // `b` dies (its lease runs out). `c`, not first in line, waits a
    // further lease time before taking over; a zero lease time stands in
    // for that time having passed.
    assert_eq!(
        b.acquire_lease("up", Duration::ZERO, true).await.unwrap(),
        Some(Grant {
            token: 2,
            wanted_by: Some("a".into()),
        })
    );
    assert_eq!(c.acquire_lease("up", long, false).await.unwrap(), None);
    assert_eq!(
        c.acquire_lease("up", Duration::ZERO, false).await.unwrap(),
        grant(3)
    );
}

#[tokio::test]
async fn members_are_the_nodes_seen_within_a_lease_time() {
    let (config, a) = store("a").await;
    let b = node(&config, "b").await;
    let long = Duration::from_secs(60);
    assert_eq!(a.heartbeat(long).await.unwrap(), vec!["a".to_string()]);
    assert_eq!(
        b.heartbeat(long).await.unwrap(),
        vec!["a".to_string(), "b".to_string()]
    );
    // Seen within no time at all: nobody counts as present.
    assert!(b.heartbeat(Duration::ZERO).await.unwrap().is_empty());
    b.leave().await.unwrap();
    assert_eq!(a.heartbeat(long).await.unwrap(), vec!["a".to_string()]);
}

#[tokio::test]
async fn a_cancel_and_a_claim_racing_never_both_win() {
    let (config, a) = store("a").await;
    let b = node(&config, "b").await;
    let ids = queue_n(&a, "c", 200).await;
    let claimer = tokio::spawn(async move {
        let mut claimed = HashSet::new();
        while let Some(batch) = b.claim_batch(&qk(), 3, u64::MAX, "size").await.unwrap() {
            claimed.extend(b.members(batch.id).await.unwrap());
        }
        claimed
    });
    let canceller = {
        let a = a.clone();
        tokio::spawn(async move {
            let mut cancelled = HashSet::new();
            // From the newest back, so the two meet in the middle.
            for i in (0..200).rev() {
                match a.cancel("t", &format!("c{i}"), &payload).await.unwrap() {
                    CancelOutcome::Cancelled(r) => {
                        cancelled.insert(r.id);
                    }
                    CancelOutcome::TooLate(r) => assert!(r.batch.is_some(), "{r:?}"),
                    other => panic!("{other:?}"),
                }
            }
            cancelled
        })
    };
    let (claimed, cancelled) = (claimer.await.unwrap(), canceller.await.unwrap());
    assert!(claimed.is_disjoint(&cancelled));
    assert_eq!(claimed.len() + cancelled.len(), 200);
    for id in ids {
        let r = a.get(id).await.unwrap().unwrap();
        if cancelled.contains(&id) {
            assert_eq!((r.status, r.batch), (RequestStatus::Cancelled, None));
        } else {
            assert_eq!(r.status, RequestStatus::Queued);
            assert!(r.batch.is_some());
        }
    }
    assert_eq!(
        a.queue_stats().await.unwrap(),
        vec![(qk(), QueueStats::default())]
    );
}

// ------------------------------------------------------------ intake rounds

/// `rec` for model `model`.
fn rec_for(model: &str, custom_id: &str, body_sha256: &str) -> RequestRecord {
    RequestRecord {
        model: model.into(),
        ..rec("t", custom_id, body_sha256)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_intakes_are_each_stored_once_with_their_counters() {
    let (config, s) = store("a").await;
    // 500 calls from 64 tasks, over two queues: they share rounds.
    let tasks: Vec<_> = (0..64)
        .map(|t| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                for i in (t..500).step_by(64) {
                    let model = if i % 2 == 0 { "m" } else { "m2" };
                    let r = s
                        .accept(rec_for(model, &format!("c{i}"), "h"), b"{}".to_vec())
                        .await
                        .unwrap();
                    got.push((i, r));
                }
                got
            })
        })
        .collect();
    let mut ids = std::collections::BTreeMap::new();
    let mut bytes = [0u64; 2];
    for t in tasks {
        for (i, r) in t.await.unwrap() {
            let Intake::Created(r) = r else {
                panic!("c{i}: {r:?}")
            };
            assert_eq!(r.custom_id, format!("c{i}"));
            bytes[i % 2] += line_len(Endpoint::ChatCompletions, r.id, 2);
            assert!(ids.insert(r.id, i).is_none(), "id {} given twice", r.id);
        }
    }
    assert_eq!(ids.len(), 500);
    assert_eq!(count(&config, "SELECT count(*) FROM requests").await, 500);
    assert_eq!(count(&config, "SELECT count(*) FROM bodies").await, 500);
    assert_eq!(count(&config, "SELECT count(*) FROM queue").await, 500);
    for (model, bytes) in [("m", bytes[0]), ("m2", bytes[1])] {
        let qk = QueueKey::chat("u", model);
        let stats = s.queue_stats_for(&qk).await.unwrap().unwrap();
        assert_eq!((stats.count, stats.bytes), (250, bytes), "{model}");
    }
    assert_eq!(s.queued_total().await.unwrap(), 500);
    for (id, i) in ids.into_iter().step_by(50) {
        assert_eq!(s.get(id).await.unwrap().unwrap().custom_id, format!("c{i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_custom_id_sent_at_once_is_stored_once() {
    let (config, s) = store("a").await;
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.accept(rec("t", "same", "h"), b"{}".to_vec()).await })
        })
        .collect();
    let mut created = 0;
    let mut ids = std::collections::BTreeSet::new();
    for c in calls {
        match c.await.unwrap().unwrap() {
            Intake::Created(r) => {
                created += 1;
                ids.insert(r.id);
            }
            Intake::Existing(r) => drop(ids.insert(r.id)),
            Intake::Conflict(r) => panic!("same body, conflict: {r:?}"),
        }
    }
    assert_eq!((created, ids.len()), (1, 1));
    assert_eq!(count(&config, "SELECT count(*) FROM requests").await, 1);
    assert_eq!(s.queued_total().await.unwrap(), 1);

    // Within one round, by construction: the first is stored, the rest
    // find it (uncommitted, in the same transaction).
    let round = s
        .accept_round(
            (0..20)
                .map(|_| (rec("t", "one-round", "h"), b"{}".to_vec()))
                .collect(),
        )
        .await;
    let Ok(Intake::Created(first)) = &round[0] else {
        panic!("{:?}", round[0])
    };
    for r in &round[1..] {
        let Ok(Intake::Existing(r)) = r else {
            panic!("{r:?}")
        };
        assert_eq!(r, first);
    }
    assert_eq!(count(&config, "SELECT count(*) FROM requests").await, 2);
    assert_eq!(s.queued_total().await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_custom_id_with_two_bodies_at_once_keeps_the_first_stored() {
    let (config, s) = store("a").await;
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let s = s.clone();
            let sha = if i % 2 == 0 { "h1" } else { "h2" };
            tokio::spawn(async move { (sha, s.accept(rec("t", "two", sha), b"{}".to_vec()).await) })
        })
        .collect();
    let mut answers = Vec::new();
    for c in calls {
        let (sha, r) = c.await.unwrap();
        answers.push((sha, r.unwrap()));
    }
    let stored = s.find("t", "two").await.unwrap().unwrap();
    assert_eq!(count(&config, "SELECT count(*) FROM requests").await, 1);
    let created: Vec<_> = answers
        .iter()
        .filter(|(_, a)| matches!(a, Intake::Created(_)))
        .collect();
    assert_eq!(created.len(), 1);
    for (sha, a) in &answers {
        match a {
            Intake::Created(r) => assert_eq!(r, &stored),
            // The same body as the one stored: its ticket; another: refused.
            Intake::Existing(r) => {
                assert_eq!((*sha, r), (stored.body_sha256.as_str(), &stored));
            }
            Intake::Conflict(r) => {
                assert_ne!(*sha, stored.body_sha256);
                assert_eq!(r, &stored);
            }
        }
    }

    // Within one round: the first body wins, in arrival order.
    let round = s
        .accept_round(vec![
            (rec("t", "r", "h2"), b"[]".to_vec()),
            (rec("t", "r", "h1"), b"{}".to_vec()),
            (rec("t", "r", "h2"), b"[]".to_vec()),
        ])
        .await;
    let Ok(Intake::Created(first)) = &round[0] else {
        panic!("{round:?}")
    };
    assert_eq!(first.body_sha256, "h2");
    assert!(
        matches!(&round[1], Ok(Intake::Conflict(r)) if r == first),
        "{round:?}"
    );
    assert!(
        matches!(&round[2], Ok(Intake::Existing(r)) if r == first),
        "{round:?}"
    );
    assert_eq!(s.body(first.id).await.unwrap().unwrap(), b"[]");
    assert_eq!(s.queued_total().await.unwrap(), 2);
}

#[tokio::test]
async fn a_failing_intake_fails_alone_in_its_round() {
    let (config, s) = store("a").await;
    // PostgreSQL text cannot hold a NUL: that call's insert fails and
    // aborts the round's first pass.
    let round = s
        .accept_round(vec![
            (rec("t", "before", "h"), b"{}".to_vec()),
            (rec("t", "bad\0id", "h"), b"{}".to_vec()),
            (rec("t", "after", "h"), b"{}".to_vec()),
            (rec("t", "before", "h"), b"{}".to_vec()),
        ])
        .await;
    let Ok(Intake::Created(before)) = &round[0] else {
        panic!("{round:?}")
    };
    assert!(matches!(&round[1], Err(PgError::Query(_))), "{round:?}");
    assert!(matches!(&round[2], Ok(Intake::Created(_))), "{round:?}");
    assert!(
        matches!(&round[3], Ok(Intake::Existing(r)) if r == before),
        "{round:?}"
    );
    assert_eq!(count(&config, "SELECT count(*) FROM requests").await, 2);
    assert_eq!(count(&config, "SELECT count(*) FROM queue").await, 2);
    assert_eq!(s.queued_total().await.unwrap(), 2);

    // The same through the writer, beside calls that go in its rounds.
    let calls: Vec<_> = (0..32)
        .map(|i| {
            let s = s.clone();
            let cid = if i == 7 {
                "bad\0".to_string()
            } else {
                format!("w{i}")
            };
            tokio::spawn(async move { s.accept(rec("t", &cid, "h"), b"{}".to_vec()).await })
        })
        .collect();
    for (i, c) in calls.into_iter().enumerate() {
        let r = c.await.unwrap();
        if i == 7 {
            assert!(r.is_err(), "{r:?}");
        } else {
            assert!(matches!(r, Ok(Intake::Created(_))), "w{i}: {r:?}");
        }
    }
    assert_eq!(s.queued_total().await.unwrap(), 33);
}

#[tokio::test]
async fn a_round_whose_commit_fails_stores_nothing_and_says_so_to_every_call() {
    let (config, s) = store("a").await;
    // A deferred constraint trigger runs at commit: a request with this
    // custom id makes the commit itself fail.
    let (client, conn) = config.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(
            "CREATE FUNCTION refuse_doomed() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.custom_id = 'doomed' THEN RAISE EXCEPTION 'refused at commit'; END IF; \
             RETURN NULL; END $$; \
             CREATE CONSTRAINT TRIGGER refuse_doomed AFTER INSERT ON requests \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_doomed();",
        )
        .await
        .unwrap();
    let round = s
        .accept_round(vec![
            (rec("t", "a", "h"), b"{}".to_vec()),
            (rec("t", "doomed", "h"), b"{}".to_vec()),
            (rec("t", "b", "h"), b"{}".to_vec()),
        ])
        .await;
    for r in &round {
        assert!(matches!(r, Err(PgError::Round(_))), "{round:?}");
    }
    assert_eq!(count(&config, "SELECT count(*) FROM requests").await, 0);
    assert_eq!(count(&config, "SELECT count(*) FROM queue").await, 0);
    assert_eq!(s.queued_total().await.unwrap(), 0);
    // The same calls without the doomed one are taken as new.
    let round = s
        .accept_round(vec![
            (rec("t", "a", "h"), b"{}".to_vec()),
            (rec("t", "b", "h"), b"{}".to_vec()),
        ])
        .await;
    assert!(
        round.iter().all(|r| matches!(r, Ok(Intake::Created(_)))),
        "{round:?}"
    );
    assert_eq!(s.queued_total().await.unwrap(), 2);
}

// ------------------------------------------------------------ retention

use ferry::store::PurgeReport;
use ferry::store::lifecycle::Retention;

fn retention(terminal_secs: u64, slice_rows: usize) -> Retention {
    Retention {
        terminal_secs,
        slice_rows,
    }
}

/// Queues `records`, sends them in one batch, completes each and marks the
/// batch done; returns it, their ids and when they finished.
async fn finish(s: &PgStore, records: Vec<RequestRecord>) -> (BatchRecord, Vec<u64>, u64) {
    for r in records {
        created(s, r).await;
    }
    let (mut b, ids) = submitted_batch(s).await;
    let result = StoredResult {
        status_code: 200,
        body: bytes::Bytes::from_static(br#"{"ok":true}"#),
    };
    let outcomes = ids
        .iter()
        .map(|id| (*id, Outcome::Completed(result.clone())))
        .collect();
    s.apply_outcomes(b.id, outcomes, &payload).await.unwrap();
    b.state = BatchState::Done {
        file_id: Some("file-in".into()),
        batch_id: Some("batch_up".into()),
        upstream_status: "completed".into(),
        cleanup: Vec::new(),
    };
    s.put_batch(&b).await.unwrap();
    let at = s.get(ids[0]).await.unwrap().unwrap().completed_at.unwrap();
    (b, ids, at)
}

async fn finish_n(s: &PgStore, prefix: &str, n: usize) -> (BatchRecord, Vec<u64>, u64) {
    let records = (0..n)
        .map(|i| rec("t", &format!("{prefix}{i}"), "h"))
        .collect();
    finish(s, records).await
}

/// Whether request `id` is there whole (row, custom id, result), or gone
/// whole; panics on anything in between.
async fn whole(s: &PgStore, id: u64, custom_id: &str) -> bool {
    let found = s.find("t", custom_id).await.unwrap().map(|r| r.id);
    let rec = s.get(id).await.unwrap();
    let result = s.result(id).await.unwrap();
    match (found, rec, result) {
        (Some(f), Some(r), Some(_)) if f == id && r.status.is_terminal() => true,
        (None, None, None) => false,
        other => panic!("request {id} is half-purged: {other:?}"),
    }
}

#[tokio::test]
async fn purge_keeps_a_request_up_to_its_limit_and_takes_it_one_second_past() {
    let (config, s) = store("a").await;
    let (b, ids, at) = finish_n(&s, "c", 1).await;
    let p = retention(100, 10);
    for now in [at + 99, at + 100] {
        let r = s.purge_slice(&p, now).await.unwrap();
        assert_eq!(r, PurgeReport::default(), "{now}");
        assert!(whole(&s, ids[0], "c0").await);
    }
    let r = s.purge_slice(&p, at + 101).await.unwrap();
    assert_eq!((r.requests, r.results, r.batches), (1, 1, 1));
    assert!(!whole(&s, ids[0], "c0").await);
    assert!(s.get_batch(b.id).await.unwrap().is_none());
    assert_eq!(count(&config, "SELECT count(*) FROM members").await, 0);
    assert_eq!(s.oldest_terminal().await.unwrap(), None);
}

#[tokio::test]
async fn a_purge_slice_that_fails_midway_rolls_back_whole() {
    let (config, s) = store("a").await;
    let (_, ids, at) = finish_n(&s, "c", 10).await;
    // The slice's delete of one request fails, after its results and
    // bodies went in the same transaction.
    let (client, conn) = config.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$; \
             CREATE TRIGGER refuse BEFORE DELETE ON requests FOR EACH ROW \
             WHEN (OLD.custom_id = 'c2') EXECUTE FUNCTION refuse();",
        )
        .await
        .unwrap();
    let p = retention(100, 4);
    assert!(s.purge_slice(&p, at + 1000).await.is_err());
    for (i, id) in ids.iter().enumerate() {
        assert!(whole(&s, *id, &format!("c{i}")).await, "request {i}");
    }
    client
        .batch_execute("DROP TRIGGER refuse ON requests")
        .await
        .unwrap();
    let mut purged = Vec::new();
    for _ in 0..3 {
        let r = s.purge_slice(&p, at + 1000).await.unwrap();
        purged.push((r.requests, r.batches));
    }
    assert_eq!(purged, vec![(4, 0), (4, 0), (2, 1)]);
    for (i, id) in ids.iter().enumerate() {
        assert!(!whole(&s, *id, &format!("c{i}")).await, "request {i}");
    }
}

#[tokio::test]
async fn a_purged_custom_id_is_taken_anew() {
    let (_, s) = store("a").await;
    let (_, ids, at) = finish_n(&s, "c", 1).await;
    s.purge_slice(&retention(100, 10), at + 101).await.unwrap();
    let again = s.accept(rec("t", "c0", "other"), b"{}".to_vec()).await;
    let Ok(Intake::Created(r)) = again else {
        panic!("{again:?}")
    };
    assert_ne!(r.id, ids[0]);
    assert_eq!(s.find("t", "c0").await.unwrap().unwrap().id, r.id);
}

#[tokio::test]
async fn the_body_goes_long_before_the_record() {
    let (_, s) = store("a").await;
    let (_, ids, at) = finish_n(&s, "c", 1).await;
    s.purge_slice(&retention(100, 10), at + 11).await.unwrap();
    let r = s.get(ids[0]).await.unwrap().unwrap();
    assert_eq!(r.status, RequestStatus::Completed);
    assert_eq!(s.result(ids[0]).await.unwrap().unwrap().status_code, 200);
    assert!(s.body(ids[0]).await.unwrap().is_none());
}

#[tokio::test]
async fn a_request_owed_a_webhook_is_kept_until_it_is_delivered() {
    let (_, s) = store("a").await;
    let (b, ids, at) = finish(&s, vec![with_callback(rec("t", "hooked", "h"))]).await;
    let p = retention(100, 10);
    let r = s.purge_slice(&p, at + 1000).await.unwrap();
    assert_eq!((r.requests, r.batches), (0, 0));
    assert!(whole(&s, ids[0], "hooked").await);
    let taken = s.take_due_deliveries(u64::MAX, 10).await.unwrap();
    assert_eq!(taken.len(), 1);
    s.finish_delivery(&taken[0], WebhookStatus::Delivered, None)
        .await
        .unwrap();
    let r = s.purge_slice(&p, at + 1000).await.unwrap();
    assert_eq!((r.requests, r.batches), (1, 1));
    assert!(s.get_batch(b.id).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_purging_at_once_take_disjoint_slices() {
    let (config, a) = store("a").await;
    let b = node(&config, "b").await;
    let (_, ids, at) = finish_n(&a, "c", 40).await;
    let p = retention(100, 3);
    let purge = |s: PgStore| {
        tokio::spawn(async move {
            let mut purged = 0;
            loop {
                let r = s.purge_slice(&p, at + 101).await.unwrap();
                purged += r.requests;
                if r.requests == 0 && !r.more {
                    return purged;
                }
            }
        })
    };
    let (x, y) = (purge(a.clone()), purge(b));
    let total = x.await.unwrap() + y.await.unwrap();
    assert_eq!(total, ids.len() as u64, "each request purged once");
    assert_eq!(count(&config, "SELECT count(*) FROM requests").await, 0);
    assert_eq!(count(&config, "SELECT count(*) FROM results").await, 0);
    // The batch goes with its last member, on whichever node comes next.
    a.purge_slice(&p, at + 101).await.unwrap();
    assert_eq!(count(&config, "SELECT count(*) FROM batches").await, 0);
}

#[tokio::test]
async fn start_up_and_recovery_never_read_finished_batches() {
    let (config, s) = store("a").await;
    let (done, _, _) = finish_n(&s, "c", 2).await;
    created(&s, rec("t", "live", "h")).await;
    let live = s
        .claim_batch(&qk(), 1, u64::MAX, "size")
        .await
        .unwrap()
        .unwrap();
    // A finished batch's record made unreadable: whoever reads it fails.
    let (client, conn) = config.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .execute(
            "UPDATE batches SET record = '{}' WHERE id = $1",
            &[&(done.id as i64)],
        )
        .await
        .unwrap();
    assert_eq!(s.live_batches().await.unwrap(), vec![live]);
    assert_eq!(s.recover_claims().await.unwrap(), 1);
    assert!(s.batches_owing_cleanup("u").await.unwrap().is_empty());
    assert!(
        s.get_batch(done.id).await.is_err(),
        "the record is unreadable"
    );
}

#[tokio::test]
async fn the_census_reports_each_kinds_rows_and_bytes() {
    use ferry::store::census::Kind;
    let (_config, s) = store("n1").await;
    queue_n(&s, "c", 3).await;
    // PostgreSQL's statistics reach other sessions within about a second.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let census = s.census().await.unwrap();
        let of = |k: Kind| census.iter().find(|(kind, _)| *kind == k).unwrap().1;
        assert_eq!(census.len(), 7);
        assert!(of(Kind::Request).bytes > 0 && of(Kind::Result).bytes > 0);
        if of(Kind::Request).rows == 3 && of(Kind::Body).rows == 3 && of(Kind::Queue).rows == 3 {
            assert_eq!(of(Kind::Result).rows, 0);
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{census:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

// ------------------------------------------------------------ endpoints

fn embeddings_qk() -> QueueKey {
    QueueKey {
        endpoint: Endpoint::Embeddings,
        ..qk()
    }
}

fn embeddings_rec(custom_id: &str) -> RequestRecord {
    RequestRecord {
        endpoint: Endpoint::Embeddings,
        ..rec("t", custom_id, "h")
    }
}

#[tokio::test]
async fn each_endpoint_queues_claims_cancels_and_requeues_apart() {
    let (_, s) = store("a").await;
    let chat = queue_n(&s, "c", 2).await;
    // One through the single intake, two in one round of the writer.
    let e0 = created(&s, embeddings_rec("e0")).await;
    let round = s
        .accept_round(vec![
            (embeddings_rec("e1"), b"{}".to_vec()),
            (embeddings_rec("e2"), b"{}".to_vec()),
        ])
        .await;
    let mut emb = vec![e0.id];
    for r in round {
        let Intake::Created(r) = r.unwrap() else {
            panic!()
        };
        assert_eq!(r.endpoint, Endpoint::Embeddings);
        emb.push(r.id);
    }
    assert_eq!(
        s.get(e0.id).await.unwrap().unwrap().endpoint,
        Endpoint::Embeddings
    );
    let stats: Vec<(QueueKey, u64)> = s
        .queue_stats()
        .await
        .unwrap()
        .into_iter()
        .map(|(k, st)| (k, st.count))
        .collect();
    assert_eq!(stats, vec![(qk(), 2), (embeddings_qk(), 3)]);
    // A cancel takes the request out of its own queue.
    let CancelOutcome::Cancelled(_) = s.cancel("t", "e2", &payload).await.unwrap() else {
        panic!()
    };
    let e = s.queue_stats_for(&embeddings_qk()).await.unwrap().unwrap();
    assert_eq!(e.inputs, 2, "one input each, the cancelled one gone");
    assert_eq!(
        (e.count, e.bytes),
        (
            2,
            line_len(Endpoint::Embeddings, emb[0], 2) + line_len(Endpoint::Embeddings, emb[1], 2)
        )
    );
    let mut b = s
        .claim_batch(&embeddings_qk(), 100, u64::MAX, "size")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.endpoint, Endpoint::Embeddings);
    assert_eq!(s.members(b.id).await.unwrap(), emb[..2]);
    let (lines, _) = s
        .input_lines(b.endpoint, &emb[..2], 0, 1 << 20)
        .await
        .unwrap();
    assert_eq!(lines.len() as u64, b.bytes);
    for line in lines.split(|c| *c == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(line).unwrap();
        assert_eq!(v["url"], "/v1/embeddings");
    }
    assert_eq!(s.queue_stats_for(&qk()).await.unwrap().unwrap().count, 2);
    // Re-queued members go back to their own queue.
    mark_submitted(&s, &mut b, "file-e", "batch_e").await;
    s.apply_outcomes(b.id, vec![(emb[0], Outcome::Requeue)], &payload)
        .await
        .unwrap();
    assert_eq!(
        s.queue_stats_for(&embeddings_qk())
            .await
            .unwrap()
            .unwrap()
            .count,
        1
    );
    let c = s
        .claim_batch(&qk(), 100, u64::MAX, "size")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.endpoint, Endpoint::ChatCompletions);
    assert_eq!(s.members(c.id).await.unwrap(), chat);
}

/// A database written before endpoints existed (schema 3, chat rows
/// queued): after the upgrade its requests read as chat and flush.
#[tokio::test]
async fn a_database_written_before_endpoints_reads_and_flushes() {
    let config = fresh_database().await;
    let (mut client, conn) = config.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    migrate::migrate_with(&mut client, &migrate::MIGRATIONS[..3])
        .await
        .unwrap();
    let id: i64 = client
        .query_one("SELECT nextval('ferry_ids')", &[])
        .await
        .unwrap()
        .get(0);
    let len = line_len(Endpoint::ChatCompletions, id as u64, 2) as i64;
    client
        .execute(
            "INSERT INTO requests (id, tenant, custom_id, upstream, model, body_sha256, \
             body_len, stream, created_at, status) \
             VALUES ($1, 't', 'old', 'u', 'm', 'h', 2, false, 1700000000, 'queued')",
            &[&id],
        )
        .await
        .unwrap();
    client
        .execute("INSERT INTO bodies (id, body) VALUES ($1, '{}')", &[&id])
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO queue (upstream, model, id, enqueued_ms, line_len) \
             VALUES ('u', 'm', $1, 1700000000000, $2)",
            &[&id, &len],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO queue_counters (upstream, model, count, bytes) VALUES ('u', 'm', 1, $1)",
            &[&len],
        )
        .await
        .unwrap();
    let s = PgStore::connect(config.clone(), 2).await.expect("connect");
    let r = s.find("t", "old").await.unwrap().unwrap();
    assert_eq!(r.endpoint, Endpoint::ChatCompletions);
    let stats = s.queue_stats_for(&qk()).await.unwrap().unwrap();
    assert_eq!((stats.count, stats.bytes, stats.inputs), (1, len as u64, 1));
    // New requests of the same queue join the old one's queue.
    created(&s, rec("t", "new", "h")).await;
    let b = s
        .claim_batch(&qk(), 100, u64::MAX, "size")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (b.endpoint, b.request_count),
        (Endpoint::ChatCompletions, 2)
    );
    let members = s.members(b.id).await.unwrap();
    assert_eq!(members[0], id as u64);
    let (lines, _) = s
        .input_lines(b.endpoint, &members, 0, 1 << 20)
        .await
        .unwrap();
    assert_eq!(lines.len() as u64, b.bytes);
    let first: serde_json::Value =
        serde_json::from_slice(lines.split(|c| *c == b'\n').next().unwrap()).unwrap();
    assert_eq!(first["url"], "/v1/chat/completions");
}

#[tokio::test]
async fn an_embeddings_claim_stops_at_the_input_cap() {
    let (_, s) = store("a").await;
    let mut ids = Vec::new();
    for (i, inputs) in [30_000u64, 20_000, 1].into_iter().enumerate() {
        let r = RequestRecord {
            inputs,
            ..embeddings_rec(&format!("e{i}"))
        };
        ids.push(created(&s, r).await.id);
    }
    assert_eq!(s.get(ids[0]).await.unwrap().unwrap().inputs, 30_000);
    let inputs = |s: PgStore| async move {
        s.queue_stats_for(&embeddings_qk())
            .await
            .unwrap()
            .unwrap()
            .inputs
    };
    assert_eq!(inputs(s.clone()).await, 50_001);
    let b = s
        .claim_batch(&embeddings_qk(), 100, u64::MAX, "size")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.members(b.id).await.unwrap(), ids[..2]);
    assert_eq!(inputs(s.clone()).await, 1);
    let b = s
        .claim_batch(&embeddings_qk(), 100, u64::MAX, "size")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.members(b.id).await.unwrap(), ids[2..]);
}

use ferry::store::Lane;

#[tokio::test]
async fn a_deadline_is_kept_and_an_answer_reads_back_with_its_lane() {
    let (_config, s) = store("a").await;
    let due = created(
        &s,
        RequestRecord {
            deadline_at: Some(1_700_000_600),
            ..rec("t", "due", "h")
        },
    )
    .await;
    let none = created(&s, rec("t", "none", "h")).await;
    let read = s.get(due.id).await.unwrap().unwrap();
    assert_eq!(read.deadline_at, Some(1_700_000_600));
    assert_eq!(
        (read.lane, read.answered_by()),
        (None, None),
        "not claimed yet"
    );
    assert_eq!(s.get(none.id).await.unwrap().unwrap().deadline_at, None);

    // One answered by a flex call (a batch of one on that lane), one by a
    // Batch API job.
    let mut b = s
        .claim_batch(&qk(), 1, u64::MAX, "deadline")
        .await
        .unwrap()
        .unwrap();
    b.lane = Lane::Flex;
    s.put_batch(&b).await.unwrap();
    s.apply_submitted(b.id).await.unwrap();
    let ok = StoredResult {
        status_code: 200,
        body: bytes::Bytes::from_static(br#"{"ok": true}"#),
    };
    let done = s
        .apply_outcomes(
            b.id,
            vec![(due.id, Outcome::Completed(ok.clone()))],
            &payload,
        )
        .await
        .unwrap();
    assert_eq!(
        done[0].answered_by(),
        Some(Lane::Flex),
        "as the webhook sees it"
    );
    let (plain, _) = submitted_batch(&s).await;
    s.apply_outcomes(plain.id, vec![(none.id, Outcome::Completed(ok))], &payload)
        .await
        .unwrap();
    let by = |id| {
        let s = &s;
        async move { s.get(id).await.unwrap().unwrap().answered_by() }
    };
    assert_eq!(by(due.id).await, Some(Lane::Flex));
    assert_eq!(by(none.id).await, Some(Lane::Batch));
}

#[tokio::test]
async fn a_database_written_before_deadlines_reads_without_them() {
    let config = fresh_database().await;
    let (mut client, conn) = config.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    migrate::migrate_with(&mut client, &migrate::MIGRATIONS[..4])
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO requests (id, tenant, custom_id, upstream, model, body_sha256, \
             body_len, stream, created_at, status) \
             VALUES (nextval('ferry_ids'), 't', 'old', 'u', 'm', 'h', 2, false, 1700000000, 'queued')",
            &[],
        )
        .await
        .unwrap();
    let s = PgStore::connect(config.clone(), 2).await.expect("connect");
    let r = s.find("t", "old").await.unwrap().unwrap();
    assert_eq!((r.deadline_at, r.lane), (None, None));
    let with = created(
        &s,
        RequestRecord {
            deadline_at: Some(1_700_000_060),
            ..rec("t", "new", "h")
        },
    )
    .await;
    assert_eq!(
        s.get(with.id).await.unwrap().unwrap().deadline_at,
        Some(1_700_000_060)
    );
}

#[tokio::test]
async fn a_request_due_by_its_deadline_is_claimed_alone_and_never_also_flushed() {
    let (_config, s) = store("a").await;
    let mut ids = Vec::new();
    for (cid, deadline_at) in [("a", Some(100)), ("b", Some(200)), ("c", None)] {
        let r = RequestRecord {
            deadline_at,
            ..rec("t", cid, "h")
        };
        ids.push(created(&s, r).await.id);
    }
    let due = |before| {
        let s = &s;
        async move {
            s.due_by_deadline("u", before, 10)
                .await
                .unwrap()
                .into_iter()
                .map(|(key, id, d)| {
                    assert_eq!(key, qk());
                    (id, d)
                })
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(due(150).await, vec![(ids[0], 100)]);
    assert_eq!(due(1000).await, vec![(ids[0], 100), (ids[1], 200)]);
    assert!(
        s.due_by_deadline("other", 1000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.due_by_deadline("u", 1000, 1).await.unwrap().len(), 1);

    let lease = "upstream/u";
    let token = s
        .acquire_lease(lease, Duration::from_secs(60), true)
        .await
        .unwrap()
        .unwrap()
        .token;
    let b = s
        .claim_request_fenced(&qk(), ids[0], Lane::Flex, "deadline", lease, token)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (b.lane, b.request_count, b.state.clone()),
        (Lane::Flex, 1, BatchState::Claimed)
    );
    assert_eq!(s.get_batch(b.id).await.unwrap().unwrap().lane, Lane::Flex);
    assert_eq!(s.members(b.id).await.unwrap(), vec![ids[0]]);
    let a = s.get(ids[0]).await.unwrap().unwrap();
    assert_eq!((a.status, a.batch), (RequestStatus::Queued, Some(b.id)));
    assert_eq!(s.queue_stats_for(&qk()).await.unwrap().unwrap().count, 2);
    assert_eq!(
        due(1000).await,
        vec![(ids[1], 200)],
        "claimed: no longer due"
    );
    let again = s
        .claim_request_fenced(&qk(), ids[0], Lane::Standard, "deadline", lease, token)
        .await
        .unwrap();
    assert!(again.is_none());
    // A stale token claims nothing.
    let stale = s
        .claim_request_fenced(&qk(), ids[1], Lane::Flex, "deadline", lease, token + 1)
        .await
        .unwrap();
    assert!(stale.is_none());
    // A flush takes only what is still queued.
    let mut flushed = s
        .claim_batch(&qk(), 10, u64::MAX, "size")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.members(flushed.id).await.unwrap(), ids[1..]);
    assert!(due(1000).await.is_empty());
    // Sent back to its queue, a request is due again.
    mark_submitted(&s, &mut flushed, "file-1", "batch_1").await;
    s.apply_outcomes(flushed.id, vec![(ids[1], Outcome::Requeue)], &payload)
        .await
        .unwrap();
    assert_eq!(due(1000).await, vec![(ids[1], 200)]);
    s.cancel("t", "b", &payload).await.unwrap();
    assert!(due(1000).await.is_empty());
}

/// A completed answer whose body is `text`.
fn answer(text: &'static str) -> Outcome {
    Outcome::Completed(StoredResult {
        status_code: 200,
        body: bytes::Bytes::from_static(text.as_bytes()),
    })
}

/// A submitted batch of three: `a` (deadline 100), `b` (deadline 200) and
/// `c` (none); the batch, its members, and the upstream's lease.
async fn submitted_with_deadlines(s: &PgStore) -> (BatchRecord, Vec<u64>, (String, u64)) {
    for (cid, deadline_at) in [("a", Some(100)), ("b", Some(200)), ("c", None)] {
        let r = RequestRecord {
            deadline_at,
            ..rec("t", cid, "h")
        };
        created(s, r).await;
    }
    let (job, ids) = submitted_batch(s).await;
    let lease = "upstream/u".to_owned();
    let token = s
        .acquire_lease(&lease, Duration::from_secs(60), true)
        .await
        .unwrap()
        .unwrap()
        .token;
    (job, ids, (lease, token))
}

#[tokio::test]
async fn a_request_in_a_submitted_batch_escalates_once_and_the_first_answer_wins() {
    let (_config, s) = store("a").await;
    let (job, ids, (lease, token)) = submitted_with_deadlines(&s).await;
    let fence = (lease.as_str(), token);
    assert_eq!(
        s.pending_deadlines(job.id).await.unwrap(),
        vec![(ids[0], 100), (ids[1], 200)]
    );
    // A stale token escalates nothing.
    let stale = s
        .escalate_submitted_fenced(job.id, ids[0], Lane::Flex, "deadline", (&lease, token + 1))
        .await
        .unwrap();
    assert!(stale.is_none());
    let one = s
        .escalate_submitted_fenced(job.id, ids[0], Lane::Flex, "deadline", fence)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (one.lane, one.request_count, one.state.clone()),
        (Lane::Flex, 1, BatchState::Claimed)
    );
    assert_eq!(s.members(one.id).await.unwrap(), vec![ids[0]]);
    // Still in its job, and escalated once only.
    let a = s.get(ids[0]).await.unwrap().unwrap();
    assert_eq!(
        (a.status, a.batch),
        (RequestStatus::Submitted, Some(job.id))
    );
    assert!(s.holds(one.id, ids[0]).await.unwrap() && s.holds(job.id, ids[0]).await.unwrap());
    assert!(!s.holds(one.id, ids[1]).await.unwrap());
    let again = s
        .escalate_submitted_fenced(job.id, ids[0], Lane::Standard, "deadline", fence)
        .await
        .unwrap();
    assert!(again.is_none());
    assert_eq!(
        s.pending_deadlines(job.id).await.unwrap(),
        vec![(ids[1], 200)]
    );

    // The job's failures leave an escalated request to its escalation.
    let done = s
        .apply_outcomes(
            job.id,
            vec![(ids[0], Outcome::Expired(err("batch_expired")))],
            &payload,
        )
        .await
        .unwrap();
    assert!(done.is_empty());
    // The escalation answers first: its answer and lane are the request's.
    s.apply_submitted(one.id).await.unwrap();
    let done = s
        .apply_outcomes(one.id, vec![(ids[0], answer("flex"))], &payload)
        .await
        .unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].answered_by(), Some(Lane::Flex));
    // The job's line comes later: discarded; the other members apply.
    let done = s
        .apply_outcomes(
            job.id,
            vec![
                (ids[0], answer("batch")),
                (ids[1], answer("batch")),
                (ids[2], answer("batch")),
            ],
            &payload,
        )
        .await
        .unwrap();
    assert_eq!(
        done.iter().map(|r| r.id).collect::<Vec<_>>(),
        ids[1..].to_vec()
    );
    let a = s.get(ids[0]).await.unwrap().unwrap();
    assert_eq!((a.answered_by(), a.batch), (Some(Lane::Flex), Some(one.id)));
    assert!(a.batch_id.is_none(), "no Batch API job answered it");
    assert_eq!(&s.result(ids[0]).await.unwrap().unwrap().body[..], b"flex");
}

#[tokio::test]
async fn the_job_may_answer_first_and_the_escalation_is_then_discarded() {
    let (_config, s) = store("a").await;
    let (job, ids, (lease, token)) = submitted_with_deadlines(&s).await;
    let fence = (lease.as_str(), token);
    let one = s
        .escalate_submitted_fenced(job.id, ids[1], Lane::Standard, "deadline", fence)
        .await
        .unwrap()
        .unwrap();
    let done = s
        .apply_outcomes(job.id, vec![(ids[1], answer("batch"))], &payload)
        .await
        .unwrap();
    assert_eq!(done[0].answered_by(), Some(Lane::Batch));
    let done = s
        .apply_outcomes(one.id, vec![(ids[1], answer("standard"))], &payload)
        .await
        .unwrap();
    assert!(done.is_empty(), "answered once");
    let b = s.get(ids[1]).await.unwrap().unwrap();
    assert_eq!(
        (b.answered_by(), b.batch),
        (Some(Lane::Batch), Some(job.id))
    );
    assert_eq!(&s.result(ids[1]).await.unwrap().unwrap().body[..], b"batch");
    // A request no longer waiting on its job is not escalated.
    let late = s
        .escalate_submitted_fenced(job.id, ids[1], Lane::Flex, "deadline", fence)
        .await
        .unwrap();
    assert!(late.is_none());
}
