//! The sled backend's unit tests, on real stores in temporary directories.

use std::sync::atomic::Ordering;

use super::*;
use crate::endpoint::Endpoint;

pub(super) fn store() -> (tempfile::TempDir, SledStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path(), 64 << 20).unwrap();
    (dir, s)
}

/// A database that outlives the stores built on it. "Reopen" tests build
/// a second store on the same handle: sled releases its file lock from a
/// background thread some time after the last handle drops (spacejam/sled
/// #1289), so dropping and reopening the directory in one process races.
/// Durability across real restarts is tested on the binary (crash.rs).
pub(super) fn sled_db() -> (tempfile::TempDir, sled::Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(dir.path(), 64 << 20).unwrap();
    (dir, db)
}

/// Queues `n` requests of tenant `t` with custom ids `{prefix}0..`;
/// returns their ids in order.
fn queue_n(s: &SledStore, prefix: &str, n: usize) -> Vec<u64> {
    (0..n)
        .map(|i| {
            match s
                .insert_request(rec("t", &format!("{prefix}{i}"), "h"), b"{}")
                .unwrap()
            {
                Intake::Created(r) => r.id,
                other => panic!("{other:?}"),
            }
        })
        .collect()
}

/// A batch record just claimed: 1 request of 10 bytes for `u`/`m`.
fn claimed(id: u64) -> BatchRecord {
    BatchRecord {
        id,
        upstream: "u".into(),
        endpoint: Default::default(),
        model: "m".into(),
        state: BatchState::Claimed,
        created_at: 0,
        request_count: 1,
        bytes: 10,
        reason: "size".into(),
        missing_since: None,
        lane: Lane::Batch,
    }
}

fn rec(tenant: &str, cid: &str, body_hash: &str) -> RequestRecord {
    RequestRecord::for_test(tenant, cid, body_hash)
}

pub(super) fn no_payload(_: &RequestRecord, _: Option<&StoredResult>) -> String {
    String::new()
}

pub(super) fn qk() -> QueueKey {
    QueueKey::chat("u", "m")
}

#[test]
fn custom_ids_are_idempotent_per_tenant() {
    let (_d, s) = store();
    let Intake::Created(a) = s.insert_request(rec("t1", "x", "h1"), b"{}").unwrap() else {
        panic!()
    };
    let Intake::Existing(b) = s.insert_request(rec("t1", "x", "h1"), b"{}").unwrap() else {
        panic!()
    };
    assert_eq!(a.id, b.id);
    assert!(matches!(
        s.insert_request(rec("t1", "x", "h2"), b"{}").unwrap(),
        Intake::Conflict(_)
    ));
    assert!(matches!(
        s.insert_request(rec("t2", "x", "h2"), b"{}").unwrap(),
        Intake::Created(_)
    ));
    assert_eq!(s.queue_stats()[0].1.count, 2);
    assert!(s.find("t3", "x").unwrap().is_none());
}

#[test]
fn an_intake_cut_short_by_a_crash_is_repaired() {
    let (_d, s) = store();
    // A claimed custom id whose record was never written: taken over.
    s.custom_ids
        .insert(custom_id_key("t", "lost"), &777u64.to_be_bytes())
        .unwrap();
    let Intake::Created(r) = s.insert_request(rec("t", "lost", "h"), b"{}").unwrap() else {
        panic!()
    };
    assert_eq!(s.find("t", "lost").unwrap().unwrap().id, r.id);
    // A record written without its queue entry: re-queued on retry.
    let Intake::Created(r) = s.insert_request(rec("t", "q", "h"), b"{}").unwrap() else {
        panic!()
    };
    let qk = qk();
    let v = s.queue.remove(qk.entry(r.id)).unwrap().unwrap();
    s.unaccount(&qk, r.id, &v);
    let before = s.queue_stats_for(&qk).unwrap().count;
    assert!(matches!(
        s.insert_request(rec("t", "q", "h"), b"{}").unwrap(),
        Intake::Existing(_)
    ));
    assert_eq!(s.queue_stats_for(&qk).unwrap().count, before + 1);
    assert!(s.queue.contains_key(qk.entry(r.id)).unwrap());
    // An id being stored right now by this process is busy, not lost.
    let _claim = InFlight::new(&s.in_flight, &custom_id_key("t", "busy")).unwrap();
    assert!(matches!(
        s.insert_request(rec("t", "busy", "h"), b"{}"),
        Err(StoreError::Busy)
    ));
}

#[test]
fn claim_respects_limits_and_order_and_cancel_loses_race() {
    let (_d, s) = store();
    let ids = queue_n(&s, "c", 5);
    let b = s.claim_batch(&qk(), 3, 1_000_000, "size").unwrap().unwrap();
    let members: Vec<u64> = s.members(b.id).map(Result::unwrap).collect();
    assert_eq!(members, ids[..3]);
    assert_eq!(s.queue_stats()[0].1.count, 2);
    // Byte limit: one and a half lines' worth takes one line.
    let one = line_len(Endpoint::ChatCompletions, ids[3], 2);
    let b2 = s
        .claim_batch(&qk(), 10, one + one / 2, "bytes")
        .unwrap()
        .unwrap();
    assert_eq!(b2.request_count, 1);
    assert_eq!(b2.bytes, one);
    // Claimed: too late to cancel. Still queued: cancellable.
    assert!(matches!(
        s.cancel("t", "c0", &no_payload).unwrap(),
        CancelOutcome::TooLate(_)
    ));
    assert!(matches!(
        s.cancel("t", "c4", &no_payload).unwrap(),
        CancelOutcome::Cancelled(_)
    ));
    assert!(matches!(
        s.cancel("t", "c4", &no_payload).unwrap(),
        CancelOutcome::AlreadyCancelled(_)
    ));
    assert!(matches!(
        s.cancel("other", "c4", &no_payload).unwrap(),
        CancelOutcome::NotFound
    ));
    assert!(s.claim_batch(&qk(), 10, 1 << 20, "time").unwrap().is_none());
    assert_eq!(s.queue_stats()[0].1, QueueStats::default());
}

#[test]
fn a_model_name_extending_another_queues_key_stays_in_its_own_queue() {
    let (_d, s) = store();
    let Intake::Created(plain) = s.insert_request(rec("t", "plain", "h"), b"{}").unwrap() else {
        panic!()
    };
    // Refused at intake today; a store may still hold one.
    let sneaky = RequestRecord {
        model: "m\0x".into(),
        ..rec("t", "sneaky", "h")
    };
    let Intake::Created(sneaky) = s.insert_request(sneaky, b"{}").unwrap() else {
        panic!()
    };
    let b = s.claim_batch(&qk(), 10, 1 << 20, "size").unwrap().unwrap();
    let members: Vec<u64> = s.members(b.id).map(Result::unwrap).collect();
    assert_eq!(members, vec![plain.id]);
    let other = QueueKey::of(&sneaky);
    assert_eq!(s.queue_stats_for(&other).unwrap().count, 1);
    let b = s.claim_batch(&other, 10, 1 << 20, "size").unwrap().unwrap();
    let members: Vec<u64> = s.members(b.id).map(Result::unwrap).collect();
    assert_eq!(members, vec![sneaky.id]);
}

#[test]
fn members_are_packed_per_slice_and_read_in_order() {
    let (_d, s) = store();
    let n = WRITE_SLICE * 2 + WRITE_SLICE / 2;
    let ids = queue_n(&s, "p", n);
    let b = s.claim_batch(&qk(), n, u64::MAX, "size").unwrap().unwrap();
    assert_eq!(b.request_count, n as u64);
    assert_eq!(s.members.scan_prefix(b.id.to_be_bytes()).count(), 3);
    let members: Vec<u64> = s.members(b.id).map(Result::unwrap).collect();
    assert_eq!(members, ids);
    // A value that is not whole ids is reported, not misread.
    s.members
        .insert(member_key(b.id, u64::MAX), &[1u8, 2, 3][..])
        .unwrap();
    assert!(s.members(b.id).any(|m| m.is_err()));
}

#[test]
fn own_upstream_objects_follow_the_batch_and_survive_reopen() {
    let (_dir, db) = sled_db();
    let s = SledStore::from_db(db.clone()).unwrap();
    let mut b = claimed(7);
    let owned = |s: &SledStore| {
        ["file-in", "batch_1", "file-out"]
            .into_iter()
            .filter(|id| s.is_own_upstream_object(id))
            .collect::<Vec<_>>()
    };
    s.put_batch(&b).unwrap();
    assert!(owned(&s).is_empty());
    b.state = BatchState::Uploaded {
        file_id: "file-in".into(),
    };
    s.put_batch(&b).unwrap();
    assert_eq!(owned(&s), ["file-in"]);
    b.state = BatchState::Submitted {
        file_id: "file-in".into(),
        batch_id: "batch_1".into(),
    };
    s.put_batch(&b).unwrap();
    assert_eq!(owned(&s), ["file-in", "batch_1"]);
    drop(s);
    let s = SledStore::from_db(db.clone()).unwrap();
    assert_eq!(owned(&s), ["file-in", "batch_1"]);
    b.state = BatchState::Done {
        file_id: Some("file-in".into()),
        batch_id: Some("batch_1".into()),
        upstream_status: "completed".into(),
        cleanup: vec!["file-in".into(), "file-out".into()],
    };
    s.put_batch(&b).unwrap();
    assert_eq!(owned(&s), ["file-in", "file-out"]);
    // Deleted upstream: nothing left to guard.
    if let BatchState::Done { cleanup, .. } = &mut b.state {
        cleanup.clear();
    }
    s.put_batch(&b).unwrap();
    assert!(owned(&s).is_empty());
    assert!(owned(&SledStore::from_db(db).unwrap()).is_empty());
}

#[test]
fn a_requeue_gives_its_attempt_back_and_a_retry_keeps_it() {
    let (_d, s) = store();
    queue_n(&s, "c", 2);
    let retry = |max_attempts| Outcome::Retry {
        error: RequestError {
            code: "missing_result".into(),
            message: "m".into(),
        },
        max_attempts,
    };
    for round in 1..=2 {
        let mut b = s.claim_batch(&qk(), 10, 1 << 20, "size").unwrap().unwrap();
        s.mark_submitted(&mut b, "file", "batch").unwrap();
        let ids: Vec<u64> = s.members(b.id).map(Result::unwrap).collect();
        assert_eq!(s.get(ids[0]).unwrap().unwrap().attempts, round);
        assert_eq!(s.get(ids[1]).unwrap().unwrap().attempts, 1);
        let done = s
            .apply_outcomes(
                b.id,
                vec![(ids[0], retry(3)), (ids[1], Outcome::Requeue)],
                &no_payload,
            )
            .unwrap();
        assert!(done.is_empty());
        // The token-limit requeue did not count; the retry did.
        assert_eq!(s.get(ids[1]).unwrap().unwrap().attempts, 0);
        assert_eq!(s.get(ids[0]).unwrap().unwrap().attempts, round);
    }
    // At its limit, a retry fails the request.
    let mut b = s.claim_batch(&qk(), 10, 1 << 20, "size").unwrap().unwrap();
    s.mark_submitted(&mut b, "file", "batch").unwrap();
    let ids: Vec<u64> = s.members(b.id).map(Result::unwrap).collect();
    let done = s
        .apply_outcomes(b.id, vec![(ids[0], retry(3))], &no_payload)
        .unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].status, RequestStatus::Failed);
    assert_eq!(done[0].attempts, 3);
}

#[test]
fn outcomes_apply_once_and_requeue_returns_to_queue() {
    let (_d, s) = store();
    queue_n(&s, "c", 3);
    let mut b = s.claim_batch(&qk(), 10, 1 << 20, "size").unwrap().unwrap();
    s.mark_submitted(&mut b, "file-1", "batch_1").unwrap();
    let ids: Vec<u64> = s.members(b.id).map(Result::unwrap).collect();
    assert_eq!(
        s.get(ids[0]).unwrap().unwrap().status,
        RequestStatus::Submitted
    );
    let res = StoredResult {
        status_code: 200,
        body: bytes::Bytes::from_static(br#"{"ok": true}"#),
    };
    let done = s
        .apply_outcomes(
            b.id,
            vec![
                (ids[0], Outcome::Completed(res.clone())),
                (ids[1], Outcome::Requeue),
                (
                    ids[2],
                    Outcome::Expired(RequestError {
                        code: "batch_expired".into(),
                        message: "late".into(),
                    }),
                ),
            ],
            &no_payload,
        )
        .unwrap();
    assert_eq!(done.len(), 2);
    assert_eq!(s.result(ids[0]).unwrap().unwrap(), res);
    // One read gives the record and, only when completed, its answer.
    let (rec, answer) = s.find_answered("t", "c0").unwrap().unwrap();
    assert_eq!(
        (rec, answer),
        (s.get(ids[0]).unwrap().unwrap(), Some(res.clone()))
    );
    let (rec, answer) = s.find_answered("t", "c2").unwrap().unwrap();
    assert_eq!((rec.status, answer), (RequestStatus::Expired, None));
    assert!(s.find_answered("t", "nobody").unwrap().is_none());
    assert_eq!(
        s.get(ids[1]).unwrap().unwrap().status,
        RequestStatus::Queued
    );
    assert_eq!(
        s.get(ids[2]).unwrap().unwrap().status,
        RequestStatus::Expired
    );
    assert_eq!(s.queue_stats()[0].1.count, 1);
    // Applying again changes nothing.
    let again = s
        .apply_outcomes(
            b.id,
            vec![(
                ids[0],
                Outcome::Failed(RequestError {
                    code: "x".into(),
                    message: "y".into(),
                }),
            )],
            &no_payload,
        )
        .unwrap();
    assert!(again.is_empty());
    assert_eq!(
        s.get(ids[0]).unwrap().unwrap().status,
        RequestStatus::Completed
    );
}

#[test]
fn batch_steps_write_states_not_records() {
    let (_d, s) = store();
    queue_n(&s, "c", 3);
    let id = s.find("t", "c0").unwrap().unwrap().id;
    let json_before = s.requests.get(id.to_be_bytes()).unwrap().unwrap();
    let mut b = s.claim_batch(&qk(), 10, 1 << 20, "size").unwrap().unwrap();
    s.mark_submitted(&mut b, "file-1", "batch_9").unwrap();
    // The JSON record is byte for byte what intake wrote...
    assert_eq!(
        s.requests.get(id.to_be_bytes()).unwrap().unwrap(),
        json_before
    );
    // ...and the request reads as submitted, with the batch's upstream id.
    let r = s.get(id).unwrap().unwrap();
    assert_eq!(r.status, RequestStatus::Submitted);
    assert_eq!((r.batch, r.attempts), (Some(b.id), 1));
    assert_eq!(r.batch_id.as_deref(), Some("batch_9"));
    assert!(r.submitted_at.is_some());
    // A state without its record (or the reverse) reads as absent.
    s.requests.remove(id.to_be_bytes()).unwrap();
    assert!(s.get(id).unwrap().is_none());
}

#[test]
fn a_data_dir_of_another_layout_is_refused() {
    let (_dir, db) = sled_db();
    let s = SledStore::from_db(db.clone()).unwrap();
    s.insert_request(rec("t", "x", "h"), b"{}").unwrap();
    drop(s);
    // As an earlier build left it: records, no layout stamp.
    db.remove(FORMAT_KEY).unwrap();
    let err = SledStore::from_db(db.clone()).err().unwrap();
    assert!(err.to_string().contains("store format 1"), "{err}");
    db.insert(FORMAT_KEY, b"7").unwrap();
    let err = SledStore::from_db(db).err().unwrap();
    assert!(err.to_string().contains("store format 7"), "{err}");
}

#[test]
fn a_second_store_on_one_data_dir_is_refused_by_name() {
    let (dir, s) = store();
    let err = SledStore::open(dir.path(), 64 << 20).err().unwrap();
    assert!(matches!(err, StoreError::InUse), "{err}");
    assert!(err.to_string().contains("second Ferry"), "{err}");
    // The first store is untouched by the refused open.
    s.insert_request(rec("t", "x", "h"), b"{}").unwrap();
    assert!(s.find("t", "x").unwrap().is_some());
}

#[test]
fn queue_stats_and_claims_survive_reopen() {
    let (_dir, db) = sled_db();
    {
        let s = SledStore::from_db(db.clone()).unwrap();
        queue_n(&s, "c", 4);
        // A claim whose batch record was written but whose queue
        // entries were not yet removed (as if the process died).
        let b = claimed(999);
        s.put_batch(&b).unwrap();
        let first = s.find("t", "c0").unwrap().unwrap().id;
        // One member as stores before packed members wrote it.
        s.members.insert(member_key(999, first), &[]).unwrap();
    }
    let s = SledStore::from_db(db).unwrap();
    assert_eq!(s.queue_stats()[0].1.count, 4);
    assert_eq!(s.recover_claims().unwrap(), 1);
    assert_eq!(s.queue_stats()[0].1.count, 3);
    let first = s.find("t", "c0").unwrap().unwrap();
    assert_eq!(first.batch, Some(999));
    // The claim was recorded as 1 request of 10 bytes; it is recounted
    // from the members it really has, so the upload's length is right.
    let b = s.get_batch(999).unwrap().unwrap();
    assert_eq!(
        (b.request_count, b.bytes),
        (1, line_len(Endpoint::ChatCompletions, first.id, 2))
    );
}

#[tokio::test]
async fn group_commit_serves_concurrent_callers() {
    let (_d, s) = store();
    let s = std::sync::Arc::new(s);
    let mut tasks = Vec::new();
    for i in 0..32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.insert_request(rec("t", &format!("g{i}"), "h"), b"{}")
                .unwrap();
            s.commit().await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(s.flushed.load(Ordering::SeqCst), 32);
}

#[tokio::test]
async fn a_webhook_is_scheduled_only_once_its_state_is_durable() {
    let (_d, s) = store();
    let with_callback = |cid: &str| RequestRecord {
        callback_url: Some("https://hooks.example/x".into()),
        ..rec("t", cid, "h")
    };
    // A cancel and a finished batch member, each with a callback.
    let Intake::Created(cancelled) = s.insert_request(with_callback("c"), b"{}").unwrap() else {
        panic!()
    };
    let Intake::Created(done) = s.insert_request(with_callback("d"), b"{}").unwrap() else {
        panic!()
    };
    s.commit().await.unwrap();
    assert!(matches!(
        s.cancel("t", "c", &no_payload).unwrap(),
        CancelOutcome::Cancelled(_)
    ));
    let b = s.claim_batch(&qk(), 10, 1 << 20, "size").unwrap().unwrap();
    let mut b2 = b.clone();
    s.mark_submitted(&mut b2, "file-1", "batch_1").unwrap();
    let result = StoredResult {
        status_code: 200,
        body: bytes::Bytes::from_static(b"{}"),
    };
    s.apply_outcomes(
        b.id,
        vec![(done.id, Outcome::Completed(result))],
        &no_payload,
    )
    .unwrap();
    // Written, not yet durable: nothing may be sent.
    assert!(s.take_due_deliveries(u64::MAX, 10).is_empty());
    assert!(s.next_delivery_due().is_none());
    assert!(s.has_unflushed_deliveries());
    s.commit().await.unwrap();
    let mut sent: Vec<u64> = s
        .take_due_deliveries(u64::MAX, 10)
        .iter()
        .map(|d| d.request)
        .collect();
    sent.sort_unstable();
    assert_eq!(sent, vec![cancelled.id, done.id]);
    assert!(!s.has_unflushed_deliveries());
}

#[test]
fn line_len_matches_the_line() {
    for endpoint in Endpoint::ALL {
        let line = format!(
            "{}{}{}",
            line_prefix(endpoint, 77),
            "{\"a\":1}",
            LINE_SUFFIX
        );
        assert_eq!(line.len() as u64, line_len(endpoint, 77, 7));
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(v["custom_id"], "ferry-77");
        assert_eq!(v["url"], endpoint.path());
    }
}

#[test]
fn empty_queues_are_forgotten_but_busy_ones_kept() {
    let (_d, s) = store();
    queue_n(&s, "a", 2);
    s.claim_batch(&qk(), 10, u64::MAX, "size").unwrap().unwrap();
    let other = RequestRecord::queued("t", "b0", "u", "m2", "h", 2, 1);
    s.insert_request(other, b"{}").unwrap();
    assert_eq!(s.queue_stats().len(), 2);
    s.prune_idle_queues("elsewhere");
    assert_eq!(s.queue_stats().len(), 2, "another upstream's prune");
    s.prune_idle_queues("u");
    let left: Vec<String> = s.queue_stats().into_iter().map(|(k, _)| k.model).collect();
    assert_eq!(left, vec!["m2".to_owned()]);
    assert_eq!(s.queue_stats_for(&qk()), None);
    // A request queued again counts from scratch.
    queue_n(&s, "c", 1);
    assert_eq!(s.queue_stats_for(&qk()).map(|q| q.count), Some(1));
}

#[tokio::test]
async fn low_space_closes_intake_then_growth_and_both_resume_by_themselves() {
    use crate::store::space::{Need, SpaceGuard};
    let dir = tempfile::tempdir().unwrap();
    let free = Arc::new(AtomicU64::new(1 << 30));
    let probe = {
        let free = free.clone();
        Box::new(move |_: &std::path::Path| Ok(free.load(Ordering::SeqCst)))
    };
    let store = crate::store::Store::open_sled(dir.path(), 64 << 20)
        .unwrap()
        .with_space_guard(SpaceGuard::with_probe(dir.path(), 1_000, probe));
    let set_free = |bytes: u64| {
        free.store(bytes, Ordering::SeqCst);
        store.space.as_ref().unwrap().forget_reading();
    };
    let created = |i: Intake| match i {
        Intake::Created(r) => r.id,
        other => panic!("{other:?}"),
    };
    let a = created(
        store
            .accept(rec("t", "a", "h"), b"{}".to_vec())
            .await
            .unwrap(),
    );

    // Under the reserve: a new call is refused whole, work on accepted ones goes on.
    set_free(600);
    let refused = store.accept(rec("t", "b", "h"), b"{}".to_vec()).await;
    assert!(
        matches!(
            refused,
            Err(StoreError::LowSpace {
                free: 600,
                min_free: 1_000,
                ..
            })
        ),
        "{refused:?}"
    );
    assert!(store.find("t", "b").await.unwrap().is_none());
    let b = store
        .claim_batch(&qk(), 10, 1 << 20, "size", ("lease", 1))
        .await
        .unwrap()
        .expect("a claim");
    let b = store
        .mark_submitted_fenced(&b, "file-1", "batch_1", "lease", 1)
        .await
        .unwrap()
        .expect("submitted");

    // Under half of it: claims and results wait, lookups and purges do not.
    set_free(400);
    assert!(store.room_for(Need::Growth).is_err());
    let result = StoredResult {
        status_code: 200,
        body: bytes::Bytes::from_static(b"{}"),
    };
    let outcome = || vec![(a, Outcome::Completed(result.clone()))];
    assert!(matches!(
        store.apply_outcomes(b.id, outcome(), no_payload).await,
        Err(StoreError::LowSpace { .. })
    ));
    assert!(matches!(
        store
            .claim_batch(&qk(), 10, 1 << 20, "size", ("lease", 1))
            .await,
        Err(StoreError::LowSpace { .. })
    ));
    let rec_a = store.get(a).await.unwrap().unwrap();
    assert_eq!(rec_a.status, RequestStatus::Submitted);
    let policy = crate::store::lifecycle::Retention {
        terminal_secs: 0,
        slice_rows: 10,
    };
    assert!(store.purge_slice(policy, now_secs() + 10).await.is_ok());

    // Space returns: everything goes on, nothing was lost on the way.
    set_free(5_000);
    created(
        store
            .accept(rec("t", "b", "h"), b"{}".to_vec())
            .await
            .unwrap(),
    );
    let done = store
        .apply_outcomes(b.id, outcome(), no_payload)
        .await
        .unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(store.result(a).await.unwrap().unwrap(), result);
}

#[tokio::test]
async fn the_census_counts_every_kind_in_bounded_chunks() {
    use crate::store::census::{Kind, Tally};
    let (_d, s) = store();
    let ids = queue_n(&s, "c", 3);
    let (first, next) = s.census_chunk(Kind::Request, None, 2).unwrap();
    assert_eq!(first.rows, 2);
    let (rest, end) = s.census_chunk(Kind::Request, next, 2).unwrap();
    assert_eq!((rest.rows, end), (1, None));
    let b = s.claim_batch(&qk(), 10, 1 << 20, "size").unwrap().unwrap();
    let s = Arc::new(s);
    let store = crate::store::Store {
        backend: crate::store::Backend::Sled(s.clone()),
        space: None,
    };
    let census = store.census().await.unwrap();
    let of = |k: Kind| census.iter().find(|(kind, _)| *kind == k).unwrap().1;
    assert_eq!(of(Kind::Request).rows, 3);
    assert_eq!(of(Kind::Body).rows, 3);
    // One packed members entry holds the three ids.
    assert_eq!(of(Kind::Member).rows, 3);
    assert_eq!(of(Kind::Batch).rows, 1);
    assert_eq!(of(Kind::Queue), Tally::default());
    assert_eq!(of(Kind::Result), Tally::default());
    let request_bytes: u64 = ids
        .iter()
        .map(|id| (8 + s.requests.get(id.to_be_bytes()).unwrap().unwrap().len()) as u64)
        .sum();
    assert_eq!(of(Kind::Request).bytes, request_bytes);
    assert_eq!(b.request_count, 3);
}

#[test]
fn queue_keys_keep_chat_in_the_old_layout_and_parse_strictly() {
    let mut old = b"u\0m\0".to_vec();
    old.extend_from_slice(&5u64.to_be_bytes());
    assert_eq!(QueueKey::chat("u", "m").entry(5), old);
    assert_eq!(
        QueueKey::parse_entry(&old),
        Some((QueueKey::chat("u", "m"), 5))
    );
    for endpoint in Endpoint::ALL {
        let qk = QueueKey {
            upstream: "u".into(),
            endpoint,
            model: "m".into(),
        };
        assert_eq!(QueueKey::parse_entry(&qk.entry(9)), Some((qk, 9)));
    }
    // A segment no entry is written with is not a queue key.
    for head in [
        &b"u\0\x01chat_completions\0m\0"[..],
        b"u\0\x01bogus\0m\0",
        b"u\0\x01embeddings",
    ] {
        let mut k = head.to_vec();
        k.extend_from_slice(&1u64.to_be_bytes());
        assert_eq!(QueueKey::parse_entry(&k), None, "{head:?}");
    }
}

#[test]
fn each_endpoint_queues_and_flushes_apart() {
    let (_d, s) = store();
    let chat = queue_n(&s, "c", 2);
    let embeddings = QueueKey {
        endpoint: Endpoint::Embeddings,
        ..qk()
    };
    let emb = RequestRecord {
        endpoint: Endpoint::Embeddings,
        ..rec("t", "e0", "h")
    };
    let Intake::Created(emb) = s.insert_request(emb, b"{}").unwrap() else {
        panic!()
    };
    let mut queues: Vec<(QueueKey, u64)> = s
        .queue_stats()
        .into_iter()
        .map(|(k, st)| (k, st.count))
        .collect();
    queues.sort();
    assert_eq!(queues, vec![(qk(), 2), (embeddings.clone(), 1)]);
    let b = s
        .claim_batch(&embeddings, 10, u64::MAX, "size")
        .unwrap()
        .unwrap();
    assert_eq!(b.endpoint, Endpoint::Embeddings);
    assert_eq!(
        (b.request_count, b.bytes),
        (1, line_len(Endpoint::Embeddings, emb.id, 2))
    );
    let (lines, _) = s.input_lines(b.endpoint, &[emb.id], 0, 1 << 20).unwrap();
    let v: serde_json::Value = serde_json::from_slice(lines.trim_ascii_end()).unwrap();
    assert_eq!(v["url"], "/v1/embeddings");
    assert_eq!(lines.len() as u64, b.bytes);
    // The chat queue is untouched.
    assert_eq!(s.queue_stats_for(&qk()).map(|q| q.count), Some(2));
    let c = s.claim_batch(&qk(), 10, u64::MAX, "size").unwrap().unwrap();
    assert_eq!(c.endpoint, Endpoint::ChatCompletions);
    let members: Vec<u64> = s.members(c.id).map(Result::unwrap).collect();
    assert_eq!(members, chat);
}

/// A data_dir written before endpoints existed: records without the field,
/// chat queue keys in the one layout there was. It reads as chat and
/// flushes after the upgrade.
#[test]
fn a_store_written_before_endpoints_reads_and_flushes() {
    let (_dir, db) = sled_db();
    let id = {
        let s = SledStore::from_db(db.clone()).unwrap();
        let Intake::Created(r) = s.insert_request(rec("t", "old", "h"), b"{}").unwrap() else {
            panic!()
        };
        let mut old: serde_json::Value =
            serde_json::from_slice(&s.requests.get(r.id.to_be_bytes()).unwrap().unwrap()).unwrap();
        old.as_object_mut().unwrap().remove("endpoint").unwrap();
        s.requests
            .insert(r.id.to_be_bytes(), serde_json::to_vec(&old).unwrap())
            .unwrap();
        let mut key = b"u\0m\0".to_vec();
        key.extend_from_slice(&r.id.to_be_bytes());
        assert!(s.queue.contains_key(&key).unwrap());
        r.id
    };
    let s = SledStore::from_db(db).unwrap();
    assert_eq!(
        s.get(id).unwrap().unwrap().endpoint,
        Endpoint::ChatCompletions
    );
    assert_eq!(s.queue_stats_for(&qk()).map(|q| q.count), Some(1));
    let b = s.claim_batch(&qk(), 10, u64::MAX, "size").unwrap().unwrap();
    let (lines, _) = s.input_lines(b.endpoint, &[id], 0, 1 << 20).unwrap();
    let v: serde_json::Value = serde_json::from_slice(lines.trim_ascii_end()).unwrap();
    assert_eq!(v["url"], "/v1/chat/completions");
    assert_eq!(lines.len() as u64, b.bytes);
    // A batch record written before endpoints reads as chat too.
    let mut old = serde_json::to_value(&b).unwrap();
    old.as_object_mut().unwrap().remove("endpoint").unwrap();
    let back: BatchRecord = serde_json::from_value(old).unwrap();
    assert_eq!(back.endpoint, Endpoint::ChatCompletions);
}

#[test]
fn an_embeddings_claim_stops_at_the_input_cap() {
    let (_d, s) = store();
    let embeddings = QueueKey {
        endpoint: Endpoint::Embeddings,
        ..qk()
    };
    let mut ids = Vec::new();
    for (i, inputs) in [30_000u64, 20_000, 1, 5].into_iter().enumerate() {
        let r = RequestRecord {
            endpoint: Endpoint::Embeddings,
            inputs,
            ..rec("t", &format!("e{i}"), "h")
        };
        let Intake::Created(r) = s.insert_request(r, b"{}").unwrap() else {
            panic!()
        };
        ids.push(r.id);
    }
    assert_eq!(s.queue_stats_for(&embeddings).unwrap().inputs, 50_006);
    let b = s
        .claim_batch(&embeddings, 100, u64::MAX, "size")
        .unwrap()
        .unwrap();
    let members: Vec<u64> = s.members(b.id).map(Result::unwrap).collect();
    assert_eq!(members, ids[..2], "30,000 + 20,000 fill the batch");
    assert_eq!(s.queue_stats_for(&embeddings).unwrap().inputs, 6);
    let b = s
        .claim_batch(&embeddings, 100, u64::MAX, "size")
        .unwrap()
        .unwrap();
    let members: Vec<u64> = s.members(b.id).map(Result::unwrap).collect();
    assert_eq!(members, ids[2..]);
    // A queue value written before inputs were counted is one input.
    assert_eq!(parse_queue_inputs(&queue_value(1, 2, 7, None)), 7);
    assert_eq!(parse_queue_inputs(&queue_value(1, 2, 7, None)[..16]), 1);
    // One written before deadlines has none.
    let v = queue_value(1, 2, 7, Some(99));
    assert_eq!(encoding::parse_queue_deadline(&v), Some(99));
    assert_eq!(encoding::parse_queue_deadline(&v[..24]), None);
    assert_eq!(
        encoding::parse_queue_deadline(&queue_value(1, 2, 7, None)),
        None
    );
}

#[test]
fn a_deadline_is_kept_and_an_answer_reads_back_with_its_lane() {
    let dir = tempfile::tempdir().unwrap();
    let ids = {
        let s = SledStore::open(dir.path(), 64 << 20).unwrap();
        let mut ids = Vec::new();
        for (cid, deadline_at) in [("due", Some(1_700_000_600)), ("none", None)] {
            let r = RequestRecord {
                deadline_at,
                ..rec("t", cid, "h")
            };
            let Intake::Created(r) = s.insert_request(r, b"{}").unwrap() else {
                panic!()
            };
            ids.push(r.id);
        }
        s.flush_blocking().unwrap();
        ids
    };
    let s = SledStore::open(dir.path(), 64 << 20).unwrap();
    let due = s.get(ids[0]).unwrap().unwrap();
    assert_eq!(due.deadline_at, Some(1_700_000_600));
    assert_eq!(
        (due.lane, due.answered_by()),
        (None, None),
        "not claimed yet"
    );
    assert_eq!(s.get(ids[1]).unwrap().unwrap().deadline_at, None);

    // One answered by a flex call (a batch of one on that lane), one by a
    // Batch API job.
    let mut b = s
        .claim_batch(&qk(), 1, 1 << 20, "deadline")
        .unwrap()
        .unwrap();
    b.lane = Lane::Flex;
    s.put_batch(&b).unwrap();
    s.apply_submitted(b.id).unwrap();
    let ok = StoredResult {
        status_code: 200,
        body: bytes::Bytes::from_static(br#"{"ok": true}"#),
    };
    let done = s
        .apply_outcomes(
            b.id,
            vec![(ids[0], Outcome::Completed(ok.clone()))],
            &no_payload,
        )
        .unwrap();
    assert_eq!(
        done[0].answered_by(),
        Some(Lane::Flex),
        "as the webhook sees it"
    );
    let mut plain = s.claim_batch(&qk(), 1, 1 << 20, "size").unwrap().unwrap();
    s.mark_submitted(&mut plain, "file-1", "batch_1").unwrap();
    s.apply_outcomes(
        plain.id,
        vec![(ids[1], Outcome::Completed(ok))],
        &no_payload,
    )
    .unwrap();
    assert_eq!(
        s.get(ids[0]).unwrap().unwrap().answered_by(),
        Some(Lane::Flex)
    );
    assert_eq!(
        s.get(ids[1]).unwrap().unwrap().answered_by(),
        Some(Lane::Batch)
    );
}

#[test]
fn a_request_due_by_its_deadline_is_claimed_alone_and_never_also_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let ids = {
        let s = SledStore::open(dir.path(), 64 << 20).unwrap();
        let mut ids = Vec::new();
        for (cid, deadline_at) in [("a", Some(100)), ("b", Some(200)), ("c", None)] {
            let r = RequestRecord {
                deadline_at,
                ..rec("t", cid, "h")
            };
            let Intake::Created(r) = s.insert_request(r, b"{}").unwrap() else {
                panic!()
            };
            ids.push(r.id);
        }
        s.flush_blocking().unwrap();
        ids
    };
    // The index is rebuilt from the queue entries at open.
    let s = SledStore::open(dir.path(), 64 << 20).unwrap();
    let due = |before| -> Vec<(u64, u64)> {
        s.due_by_deadline("u", before, 10)
            .unwrap()
            .into_iter()
            .map(|(key, id, d)| {
                assert_eq!(key, qk());
                (id, d)
            })
            .collect()
    };
    assert_eq!(due(150), vec![(ids[0], 100)]);
    assert_eq!(due(1000), vec![(ids[0], 100), (ids[1], 200)]);
    assert!(s.due_by_deadline("other", 1000, 10).unwrap().is_empty());
    assert_eq!(s.due_by_deadline("u", 1000, 1).unwrap().len(), 1);

    let b = s
        .claim_request(&qk(), ids[0], Lane::Flex, "deadline")
        .unwrap()
        .unwrap();
    assert_eq!(
        (b.lane, b.request_count, b.state.clone()),
        (Lane::Flex, 1, BatchState::Claimed)
    );
    assert_eq!(
        s.members(b.id).map(Result::unwrap).collect::<Vec<_>>(),
        vec![ids[0]]
    );
    let a = s.get(ids[0]).unwrap().unwrap();
    assert_eq!((a.status, a.batch), (RequestStatus::Queued, Some(b.id)));
    assert_eq!(s.queue_stats_for(&qk()).unwrap().count, 2);
    assert_eq!(due(1000), vec![(ids[1], 200)], "claimed: no longer due");
    assert!(
        s.claim_request(&qk(), ids[0], Lane::Standard, "deadline")
            .unwrap()
            .is_none()
    );
    // A flush takes only what is still queued.
    let mut flushed = s.claim_batch(&qk(), 10, 1 << 20, "size").unwrap().unwrap();
    let members: Vec<u64> = s.members(flushed.id).map(Result::unwrap).collect();
    assert_eq!(members, ids[1..]);
    assert!(
        s.claim_request(&qk(), ids[1], Lane::Flex, "deadline")
            .unwrap()
            .is_none()
    );
    assert!(due(1000).is_empty());
    // Sent back to its queue, a request is due again.
    s.mark_submitted(&mut flushed, "file-1", "batch_1").unwrap();
    s.apply_outcomes(flushed.id, vec![(ids[1], Outcome::Requeue)], &no_payload)
        .unwrap();
    assert_eq!(due(1000), vec![(ids[1], 200)]);
    // A cancelled one is not.
    s.cancel("t", "b", &no_payload).unwrap();
    assert!(due(1000).is_empty());
}

#[test]
fn a_request_that_leaves_its_queue_leaves_the_deadline_index() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path(), 64 << 20).unwrap();
    // A day ahead: the escalation scan would not reach it for a day.
    let far = now_secs() + 86_400;
    let r = RequestRecord {
        deadline_at: Some(far),
        ..rec("t", "due-tomorrow", "h")
    };
    let Intake::Created(r) = s.insert_request(r, b"{}").unwrap() else {
        panic!()
    };
    let indexed = |s: &SledStore| s.deadlines.lock().unwrap().len();
    assert_eq!(indexed(&s), 1);
    let b = s
        .claim_batch(&QueueKey::of(&r), 10, u64::MAX, "size")
        .unwrap()
        .unwrap();
    assert_eq!(b.request_count, 1);
    assert_eq!(
        indexed(&s),
        0,
        "a flushed request is forgotten by the index"
    );
}
