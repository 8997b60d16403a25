//! Retention in sled: the indexes of finished work (terminal requests by
//! completion time, open and finished batches), and the purge that removes
//! what is past its time in small slices, oldest first.
//!
//! A slice reads and decides first, then removes its requests in sled
//! transactions of [`TX_ROWS`] over every tree a request lives in, so a
//! crash in the middle leaves each request whole or gone, never half of it;
//! the facade commits after it, and the next slice carries on from the
//! index. Batch records go in one more transaction per slice, once
//! finished, cleaned up upstream, and left without members.
//!
//! Stores written before these indexes existed get them once: the batch
//! indexes at the first open (one pass over the batch records), the
//! terminal index in the background, a slice per purge pass, from a cursor
//! kept in the default tree.

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use super::encoding::{parse_terminal_key, terminal_key};
use super::*;

/// Default-tree key: present once `open_batches` and `done_batches` name
/// every batch they should.
const BATCH_INDEX_KEY: &[u8] = b"batch_index";
/// Default-tree key: [`INDEX_COMPLETE`] once the `terminal` index names
/// every terminal request; else the next request id the backfill looks at
/// (absent: from the start).
const TERMINAL_BACKFILL_KEY: &[u8] = b"terminal_backfill";
const INDEX_COMPLETE: &[u8] = b"complete";

/// Requests one purge transaction removes: it holds sled's store-wide write
/// lock while it runs.
const TX_ROWS: usize = 50;

/// Finished batches one slice looks at, at most, besides those it purges:
/// batches skipped (still owing an upstream delete) are re-read each slice.
const BATCH_LOOKS: usize = 64;

/// A request the purge removes, or a stale index entry it drops.
struct Plan {
    /// Its `terminal` key (completed-at, then id).
    index: [u8; 16],
    /// Whether the request goes (else the entry is stale, and goes alone).
    due: bool,
    /// Its custom id's key, when its record is there to name it.
    custom_id: Option<Vec<u8>>,
}

impl SledStore {
    /// For a new, empty store: every index is complete from the start.
    pub(super) fn mark_indexes_complete(&self) -> Result<(), StoreError> {
        self.db.insert(BATCH_INDEX_KEY, INDEX_COMPLETE)?;
        self.db.insert(TERMINAL_BACKFILL_KEY, INDEX_COMPLETE)?;
        Ok(())
    }

    /// Builds the batch indexes of a store written before they existed: one
    /// pass over its batch records, once; every later start reads the
    /// indexes alone.
    pub(super) fn ensure_batch_index(&self) -> Result<(), StoreError> {
        if self.db.contains_key(BATCH_INDEX_KEY)? {
            return Ok(());
        }
        let mut n = 0u64;
        for item in self.batches.iter() {
            let (k, v) = item?;
            let b: BatchRecord = serde_json::from_slice(&v).map_err(|e| corrupt("batch", e))?;
            if super::batches::is_open(&b) {
                self.open_batches.insert(&k, &[])?;
            }
            if !b.is_live() {
                self.done_batches.insert(&k, &[])?;
            }
            n += 1;
        }
        self.db.insert(BATCH_INDEX_KEY, INDEX_COMPLETE)?;
        tracing::info!(
            batches = n,
            "indexed the batch records once (a store from an earlier build)"
        );
        Ok(())
    }

    /// When the oldest terminal request still kept finished (unix seconds).
    pub fn oldest_terminal(&self) -> Result<Option<u64>, StoreError> {
        self.terminal
            .first()?
            .map(|(k, _)| parse_terminal_key(&k).map(|(at, _)| at))
            .transpose()
    }

    /// One purge slice at `now`: at most `policy.slice_rows` requests past
    /// `terminal_secs`, oldest first, then the batch records left without
    /// members. Not durable until the caller commits.
    pub fn purge_slice(
        &self,
        policy: &lifecycle::Retention,
        now: u64,
    ) -> Result<PurgeReport, StoreError> {
        let rows = policy.slice_rows.max(1);
        let backfilling = self.backfill_terminal_index(rows)?;
        let mut report = self.purge_requests(policy.record_cutoff(now), rows)?;
        let batches = self.purge_batches(rows)?;
        report.batches = batches.0;
        report.more |= batches.1 || backfilling;
        Ok(report)
    }

    /// Adds up to `rows` terminal requests of a store written before the
    /// `terminal` index to it; returns whether some are left to look at.
    fn backfill_terminal_index(&self, rows: usize) -> Result<bool, StoreError> {
        let from = match self.db.get(TERMINAL_BACKFILL_KEY)? {
            Some(v) if v == INDEX_COMPLETE => return Ok(false),
            Some(v) => id_from(&v)?,
            None => 0,
        };
        let mut index = sled::Batch::default();
        let mut next = None;
        for (n, item) in self.states.range(from.to_be_bytes()..).enumerate() {
            let (k, v) = item?;
            let id = id_from(&k)?;
            if n == rows {
                next = Some(id);
                break;
            }
            let state = RequestState::decode(&v).ok_or_else(|| corrupt("state", "unreadable"))?;
            if let (true, Some(at)) = (state.status.is_terminal(), state.completed_at) {
                index.insert(&terminal_key(at, id), &[]);
            }
        }
        self.terminal.apply_batch(index)?;
        match next {
            Some(id) => {
                self.db.insert(TERMINAL_BACKFILL_KEY, &id.to_be_bytes())?;
                Ok(true)
            }
            None => {
                self.db.insert(TERMINAL_BACKFILL_KEY, INDEX_COMPLETE)?;
                tracing::info!("indexed the terminal requests of an earlier build's store");
                Ok(false)
            }
        }
    }

    /// Removes up to `rows` terminal requests that finished before `cutoff`
    /// and owe no webhook, each whole or not at all.
    ///
    /// Everything is read and decided first; the transactions then only
    /// delete, [`TX_ROWS`] requests each: a sled transaction holds the
    /// store-wide write lock that every insert and read waits on, so it
    /// must stay short. A terminal request never changes again (its webhook
    /// state aside, and one owed a webhook is not taken), so what was read
    /// still holds; the custom id alone is checked inside, as a new intake
    /// may take it over meanwhile.
    fn purge_requests(&self, cutoff: u64, rows: usize) -> Result<PurgeReport, StoreError> {
        let mut plans = Vec::new();
        let mut owed = 0usize;
        for item in self.terminal.range(..terminal_key(cutoff, 0)) {
            let (k, _) = item?;
            let (at, id) = parse_terminal_key(&k)?;
            if self.outbox.contains_key(id.to_be_bytes())? {
                // Kept until its webhook is delivered or given up; looked
                // past, but counted, so a long run of them bounds the slice.
                owed += 1;
                if owed >= rows {
                    break;
                }
                continue;
            }
            plans.push(self.plan_purge(at, id, cutoff)?);
            if plans.len() == rows {
                break;
            }
        }
        // Only a full slice says more is due: a run of owed webhooks at the
        // head waits for the next pass, not a busy loop.
        let mut report = PurgeReport {
            more: plans.len() == rows,
            ..PurgeReport::default()
        };
        let trees = (
            &self.terminal,
            &self.states,
            &self.requests,
            &self.results,
            &self.bodies,
            &self.custom_ids,
        );
        for (chunk_no, chunk) in plans.chunks(TX_ROWS).enumerate() {
            let done = trees
                .transaction(
                    |(terminal, states, requests, results, bodies, custom_ids)| {
                        let mut done = PurgeReport::default();
                        for (n, plan) in chunk.iter().enumerate() {
                            if self.injected_purge_failure(chunk_no * TX_ROWS + n) {
                                return Err(ConflictableTransactionError::Abort(
                                    StoreError::Flush("purge failure injected by a test".into()),
                                ));
                            }
                            terminal.remove(&plan.index[..])?;
                            if !plan.due {
                                continue;
                            }
                            let key = &plan.index[8..];
                            // Freed only if it still names this request.
                            if let Some(cid) = &plan.custom_id
                                && custom_ids.get(cid)?.is_some_and(|v| v.as_ref() == key)
                            {
                                custom_ids.remove(cid.as_slice())?;
                            }
                            states.remove(key)?;
                            requests.remove(key)?;
                            if results.remove(key)?.is_some() {
                                done.results += 1;
                            }
                            if bodies.remove(key)?.is_some() {
                                done.bodies += 1;
                            }
                            done.requests += 1;
                        }
                        Ok(done)
                    },
                )
                .map_err(|e| match e {
                    TransactionError::Abort(e) => e,
                    TransactionError::Storage(e) => StoreError::Sled(e),
                })?;
            report.requests += done.requests;
            report.results += done.results;
            report.bodies += done.bodies;
        }
        Ok(report)
    }

    /// What to do with the request a `terminal` entry names: purge it
    /// (freeing its custom id), or drop the entry alone when the request is
    /// not terminal at that time (a crash kept its state from being
    /// written; the outcome, applied again, indexes it anew).
    fn plan_purge(&self, at: u64, id: u64, cutoff: u64) -> Result<Plan, StoreError> {
        let due = self.state(id)?.is_some_and(|s| {
            s.completed_at == Some(at)
                && lifecycle::request_purgeable(s.status, s.completed_at, cutoff, false)
        });
        let custom_id = match due {
            true => self
                .get_fixed(id)?
                .map(|rec| custom_id_key(&rec.tenant, &rec.custom_id)),
            false => None,
        };
        Ok(Plan {
            index: terminal_key(at, id),
            due,
            custom_id,
        })
    }

    /// Removes finished batch records, oldest first, whose members are all
    /// purged (or moved on to other batches), with their member lists; stops
    /// at the first one still holding a member. Returns how many went and
    /// whether it filled its slice.
    fn purge_batches(&self, rows: usize) -> Result<(u64, bool), StoreError> {
        let mut doomed = Vec::new();
        let mut looked = 0;
        for item in self.done_batches.iter() {
            let (k, _) = item?;
            let id = id_from(&k)?;
            looked += 1;
            if doomed.len() == rows {
                return self.remove_batches(&doomed).map(|n| (n, true));
            }
            if looked > BATCH_LOOKS + rows {
                break;
            }
            let Some(b) = self.get_batch(id)? else {
                // Purged by a slice whose index removal a crash undid.
                self.done_batches.remove(&k)?;
                continue;
            };
            let held = !b.is_live() && self.members_kept(id)?;
            match lifecycle::batch_verdict(&b.state, held) {
                lifecycle::BatchVerdict::Purge => doomed.push(id),
                lifecycle::BatchVerdict::Skip => {}
                lifecycle::BatchVerdict::Stop => break,
            }
        }
        self.remove_batches(&doomed).map(|n| (n, false))
    }

    /// Tests only: whether purging the slice's `n`th request fails, as a
    /// crash there would (its transaction aborts).
    #[cfg_attr(not(test), expect(unused_variables))]
    fn injected_purge_failure(&self, n: usize) -> bool {
        #[cfg(test)]
        if n == self.fail_purge_at.load(std::sync::atomic::Ordering::SeqCst) {
            return true;
        }
        false
    }

    /// Whether some request still kept names `batch` as its batch.
    fn members_kept(&self, batch: u64) -> Result<bool, StoreError> {
        for id in self.members(batch) {
            if self.state(id?)?.is_some_and(|s| s.batch == Some(batch)) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Removes batch records, their member lists and index entries, in one
    /// transaction.
    fn remove_batches(&self, ids: &[u64]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut member_keys = Vec::new();
        for id in ids {
            for item in self.members.scan_prefix(id.to_be_bytes()) {
                member_keys.push(item?.0);
            }
        }
        let trees = (
            &self.batches,
            &self.members,
            &self.done_batches,
            &self.open_batches,
        );
        trees
            .transaction(|(batches, members, done, open)| {
                for id in ids {
                    let key = id.to_be_bytes();
                    batches.remove(&key[..])?;
                    done.remove(&key[..])?;
                    open.remove(&key[..])?;
                }
                for k in &member_keys {
                    members.remove(k.clone())?;
                }
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => StoreError::Sled(e),
            })?;
        Ok(ids.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::super::tests::{no_payload, qk, sled_db, store};
    use super::*;

    fn policy(terminal_secs: u64, slice_rows: usize) -> lifecycle::Retention {
        lifecycle::Retention {
            terminal_secs,
            slice_rows,
        }
    }

    /// Queues `records`, sends them in one batch, completes each and marks
    /// the batch done; returns it, their ids and when they finished.
    fn finish(s: &SledStore, records: Vec<RequestRecord>) -> (BatchRecord, Vec<u64>, u64) {
        let ids: Vec<u64> = records
            .into_iter()
            .map(|r| match s.insert_request(r, b"{}").unwrap() {
                Intake::Created(r) => r.id,
                other => panic!("{other:?}"),
            })
            .collect();
        let mut b = s
            .claim_batch(&qk(), ids.len(), u64::MAX, "size")
            .unwrap()
            .unwrap();
        s.mark_submitted(&mut b, "file", "batch").unwrap();
        let result = StoredResult {
            status_code: 200,
            body: bytes::Bytes::from_static(br#"{"ok":true}"#),
        };
        let outcomes = ids
            .iter()
            .map(|id| (*id, Outcome::Completed(result.clone())))
            .collect();
        s.apply_outcomes(b.id, outcomes, &no_payload).unwrap();
        b.state = BatchState::Done {
            file_id: Some("file".into()),
            batch_id: Some("batch".into()),
            upstream_status: "completed".into(),
            cleanup: Vec::new(),
        };
        s.put_batch(&b).unwrap();
        let at = s.get(ids[0]).unwrap().unwrap().completed_at.unwrap();
        (b, ids, at)
    }

    fn finish_n(s: &SledStore, prefix: &str, n: usize) -> (BatchRecord, Vec<u64>, u64) {
        let records = (0..n)
            .map(|i| RequestRecord::for_test("t", &format!("{prefix}{i}"), "h"))
            .collect();
        finish(s, records)
    }

    /// Whether request `id` is there whole: record, state, custom id, result.
    fn whole(s: &SledStore, id: u64, custom_id: &str) -> bool {
        let found = s.find("t", custom_id).unwrap().map(|r| r.id);
        let rec = s.get(id).unwrap();
        let result = s.result(id).unwrap();
        let index = s.terminal.iter().any(|e| {
            let (k, _) = e.unwrap();
            parse_terminal_key(&k).unwrap().1 == id
        });
        match (found, rec, result, index) {
            (Some(f), Some(r), Some(_), true) if f == id && r.status.is_terminal() => true,
            (None, None, None, false) => false,
            other => panic!("request {id} is half-purged: {other:?}"),
        }
    }

    #[test]
    fn a_request_stays_up_to_its_limit_and_goes_one_second_past_it() {
        let (_d, s) = store();
        let (b, ids, at) = finish_n(&s, "c", 1);
        let p = policy(100, 10);
        for now in [at + 99, at + 100] {
            assert_eq!(
                s.purge_slice(&p, now).unwrap(),
                PurgeReport::default(),
                "{now}"
            );
            assert!(whole(&s, ids[0], "c0"));
            assert!(s.get_batch(b.id).unwrap().is_some());
        }
        let report = s.purge_slice(&p, at + 101).unwrap();
        assert_eq!((report.requests, report.results), (1, 1));
        assert_eq!(report.batches, 1, "its batch has no member left");
        assert!(!whole(&s, ids[0], "c0"));
        assert!(s.get_batch(b.id).unwrap().is_none());
        assert_eq!(s.members(b.id).count(), 0);
        assert!(s.done_batches.is_empty() && s.open_batches.is_empty());
        assert_eq!(s.oldest_terminal().unwrap(), None);
    }

    #[test]
    fn a_slice_cut_short_leaves_every_request_whole_and_the_next_carries_on() {
        let (_d, s) = store();
        let (b, ids, at) = finish_n(&s, "c", 10);
        let p = policy(100, 4);
        let now = at + 1000;
        // The slice fails on its third request, as a crash there would.
        s.fail_purge_at.store(2, Ordering::SeqCst);
        assert!(s.purge_slice(&p, now).is_err());
        for (i, id) in ids.iter().enumerate() {
            assert!(whole(&s, *id, &format!("c{i}")), "request {i}");
        }
        s.fail_purge_at.store(usize::MAX, Ordering::SeqCst);
        // Oldest first (one finishing second: in id order), a slice at a time.
        let mut purged = Vec::new();
        for expect in [(4, true), (4, true), (2, false)] {
            let r = s.purge_slice(&p, now).unwrap();
            assert_eq!((r.requests as usize, r.more), expect);
            purged.push(
                ids.iter()
                    .filter(|id| s.get(**id).unwrap().is_none())
                    .count(),
            );
        }
        assert_eq!(purged, vec![4, 8, 10]);
        assert!(!whole(&s, ids[0], "c0") && !whole(&s, ids[9], "c9"));
        assert!(s.get_batch(b.id).unwrap().is_none());
    }

    #[tokio::test]
    async fn a_purge_that_cannot_be_made_durable_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open_sled(dir.path(), 64 << 20).unwrap();
        let (_, _, at) = finish_n(store.sled(), "c", 2);
        store.sled().fail_commits.0.store(true, Ordering::SeqCst);
        let p = policy(100, 10);
        assert!(store.purge_slice(p, at + 101).await.is_err());
        store.sled().fail_commits.0.store(false, Ordering::SeqCst);
        // Removed in memory already: the next slice finds nothing more due,
        // and its commit makes the first one durable.
        let r = store.purge_slice(p, at + 101).await.unwrap();
        assert_eq!(r.requests, 0);
        assert!(store.sled().fail_commits.1.load(Ordering::SeqCst) >= 1);
        assert_eq!(store.oldest_terminal().await.unwrap(), None);
    }

    #[test]
    fn a_purged_custom_id_is_taken_anew() {
        let (_d, s) = store();
        let (_, ids, at) = finish_n(&s, "c", 1);
        s.purge_slice(&policy(100, 10), at + 101).unwrap();
        // Another body under the same custom id: a new request, no conflict.
        let again = s
            .insert_request(RequestRecord::for_test("t", "c0", "other"), b"{}")
            .unwrap();
        let Intake::Created(r) = again else {
            panic!("{again:?}")
        };
        assert_ne!(r.id, ids[0]);
        assert_eq!(s.find("t", "c0").unwrap().unwrap().id, r.id);
    }

    #[test]
    fn the_body_goes_long_before_the_record() {
        let (_d, s) = store();
        let (_, ids, at) = finish_n(&s, "c", 1);
        s.purge_slice(&policy(100, 10), at + 11).unwrap();
        let rec = s.get(ids[0]).unwrap().unwrap();
        assert_eq!(rec.status, RequestStatus::Completed);
        assert_eq!(s.result(ids[0]).unwrap().unwrap().status_code, 200);
        assert!(s.body(ids[0]).unwrap().is_none());
    }

    #[test]
    fn a_request_owed_a_webhook_is_kept_until_it_is_delivered() {
        let (_d, s) = store();
        let mut r = RequestRecord::for_test("t", "hooked", "h");
        r.callback_url = Some("https://hooks.example/x".into());
        let (b, ids, at) = finish(&s, vec![r]);
        let p = policy(100, 10);
        let report = s.purge_slice(&p, at + 1000).unwrap();
        assert_eq!((report.requests, report.batches), (0, 0));
        assert!(whole(&s, ids[0], "hooked"));
        let d: Delivery =
            serde_json::from_slice(&s.outbox.get(ids[0].to_be_bytes()).unwrap().unwrap()).unwrap();
        s.finish_delivery(&d, WebhookStatus::Delivered, None)
            .unwrap();
        let report = s.purge_slice(&p, at + 1000).unwrap();
        assert_eq!((report.requests, report.batches), (1, 1));
        assert!(s.get_batch(b.id).unwrap().is_none());
    }

    #[test]
    fn a_batch_owing_an_upstream_delete_is_kept_and_younger_ones_go() {
        let (_d, s) = store();
        let (mut owing, _, _) = finish_n(&s, "a", 2);
        owing.state = BatchState::Done {
            file_id: Some("file".into()),
            batch_id: Some("batch".into()),
            upstream_status: "completed".into(),
            cleanup: vec!["file-out".into()],
        };
        s.put_batch(&owing).unwrap();
        let (younger, _, at) = finish_n(&s, "b", 2);
        let r = s.purge_slice(&policy(100, 10), at + 101).unwrap();
        assert_eq!((r.requests, r.batches), (4, 1));
        assert!(s.get_batch(younger.id).unwrap().is_none());
        assert_eq!(s.batches_owing_cleanup("u").unwrap(), vec![owing]);
    }

    #[test]
    fn start_up_and_recovery_never_read_finished_batches() {
        let (_dir, db) = sled_db();
        let s = SledStore::from_db(db.clone()).unwrap();
        let (done, _, _) = finish_n(&s, "c", 2);
        s.insert_request(RequestRecord::for_test("t", "live", "h"), b"{}")
            .unwrap();
        let live = s.claim_batch(&qk(), 1, u64::MAX, "size").unwrap().unwrap();
        // A finished batch's record made unreadable: whoever reads it fails.
        s.batches
            .insert(done.id.to_be_bytes(), &b"not json"[..])
            .unwrap();
        drop(s);

        let s = SledStore::from_db(db).unwrap();
        assert_eq!(s.live_batches().unwrap(), vec![live]);
        assert_eq!(s.recover_claims().unwrap(), 1);
        assert!(s.batches_owing_cleanup("u").unwrap().is_empty());
        assert!(s.get_batch(done.id).is_err(), "the record is unreadable");
    }

    #[test]
    fn a_store_from_an_earlier_build_is_indexed_once_then_purged() {
        let (_dir, db) = sled_db();
        let s = SledStore::from_db(db.clone()).unwrap();
        let (done, _, at) = finish_n(&s, "c", 5);
        s.insert_request(RequestRecord::for_test("t", "live", "h"), b"{}")
            .unwrap();
        let live = s.claim_batch(&qk(), 1, u64::MAX, "size").unwrap().unwrap();
        // What an earlier build left: no indexes, no markers.
        for t in [&s.terminal, &s.open_batches, &s.done_batches] {
            t.clear().unwrap();
        }
        s.db.remove(BATCH_INDEX_KEY).unwrap();
        s.db.remove(TERMINAL_BACKFILL_KEY).unwrap();
        drop(s);

        let s = SledStore::from_db(db).unwrap();
        assert_eq!(s.live_batches().unwrap(), vec![live.clone()]);
        let p = policy(100, 2);
        let mut purged = 0;
        for _ in 0..10 {
            let r = s.purge_slice(&p, at + 101).unwrap();
            purged += r.requests;
            if !r.more {
                break;
            }
        }
        assert_eq!(purged, 5);
        assert!(s.get_batch(done.id).unwrap().is_none());
        assert_eq!(s.live_batches().unwrap(), vec![live]);
        assert!(s.find("t", "live").unwrap().is_some());
        assert_eq!(
            s.db.get(TERMINAL_BACKFILL_KEY).unwrap().as_deref(),
            Some(INDEX_COMPLETE)
        );
    }
}
