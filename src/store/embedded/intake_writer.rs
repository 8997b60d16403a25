//! The intake writer: one thread that stores deferred calls and makes them
//! durable, off the runtime threads that serve callers.
//!
//! Each deferred call is a job on a queue. The thread takes every job
//! waiting (up to [`MAX_JOBS`]), stores each, makes them all durable with
//! one group commit and only then answers each caller. While it is in an
//! fsync, the next calls queue up and go together in the next round, so the
//! fsyncs per call fall as the load rises. A caller costs one hand-off to
//! this thread and one wake-up back, where storing on the blocking pool and
//! then committing cost two of each; measured in the load harness
//! (README, Performance).

use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Weak};

use tokio::sync::oneshot;

use super::{
    Intake, QueueKey, RequestRecord, RequestStatus, SledStore, StoreError, line_len, queue_value,
};

/// Calls stored and made durable together, at most.
const MAX_JOBS: usize = 512;

pub(super) struct Job {
    rec: RequestRecord,
    body: Vec<u8>,
    done: oneshot::Sender<Result<Intake, StoreError>>,
}

pub(super) type Queue = Sender<Job>;

impl SledStore {
    /// Stores a new deferred request and queues it; returns once it is
    /// durable. On `Created` the request is on disk; if the durable flush
    /// fails the request is removed again and the caller gets the error, so
    /// Ferry holds nothing it did not promise. `Existing` (an idempotent
    /// retry) is also returned only once the earlier write is durable.
    pub async fn accept(
        self: &Arc<Self>,
        rec: RequestRecord,
        body: Vec<u8>,
    ) -> Result<Intake, StoreError> {
        let queue = self.intake.get_or_init(|| start(Arc::downgrade(self)));
        let (done, answer) = oneshot::channel();
        queue
            .send(Job { rec, body, done })
            .map_err(|_| StoreError::Task("the intake writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Task("the intake writer dropped a request".into()))?
    }

    /// One round of the writer: store each job, one commit for all, answer.
    fn write_round(&self, jobs: Vec<Job>) {
        // Marks where this round's ids start, written before any of its
        // requests: a crash in the middle of the round can leave one request
        // part-written, and the next start repairs exactly this range.
        let marked = self.new_id().and_then(|from| {
            self.db.insert(ROUND_KEY, &from.to_be_bytes())?;
            Ok(())
        });
        if let Err(e) = marked {
            for job in jobs {
                let _ = job.done.send(Err(StoreError::Flush(e.to_string())));
            }
            return;
        }
        let stored: Vec<_> = jobs
            .into_iter()
            .map(|Job { rec, body, done }| (done, self.insert_request(rec, &body)))
            .collect();
        let committed = self.commit_blocking();
        if let Err(e) = &committed {
            tracing::error!(error = %e, requests = stored.len(), "durable flush failed; refusing the requests");
        }
        for (done, result) in stored {
            let answer = match (result, &committed) {
                (Ok(intake), Ok(())) => Ok(intake),
                (Ok(Intake::Created(rec)), Err(e)) => {
                    if let Err(forget) = self.forget_request(&rec) {
                        tracing::error!(request = rec.id, error = %forget, "cannot remove a request that was not made durable");
                    }
                    Err(StoreError::Flush(e.to_string()))
                }
                (Ok(_), Err(e)) => Err(StoreError::Flush(e.to_string())),
                (Err(e), _) => Err(e),
            };
            // A caller that hung up no longer wants the answer.
            let _ = done.send(answer);
        }
    }
}

/// Key in sled's default tree: the first id of the last intake round.
const ROUND_KEY: &[u8] = b"intake_round_from";

impl SledStore {
    /// At open: finishes or undoes what a crash cut short in the last intake
    /// round (rounds before it were durable before it began). A request
    /// written up to its body but not its queue entry is whole, and is
    /// queued: it completes like any other, and its caller's retry finds
    /// it. One missing its state or body was never answered and is removed,
    /// freeing its custom id. This reads one round's requests, no more.
    pub(super) fn repair_intake_round(&self) -> Result<(), StoreError> {
        let Some(from) = self.db.get(ROUND_KEY)? else {
            return Ok(());
        };
        let from = super::id_from(&from)?;
        for item in self.requests.range(from.to_be_bytes()..) {
            let (key, _) = item?;
            let id = super::id_from(&key)?;
            let Some(rec) = self.get_fixed(id)? else {
                continue;
            };
            let whole = self.bodies.contains_key(&key)?;
            match self.state(id)? {
                Some(state) if state.status == RequestStatus::Queued && state.batch.is_none() => {
                    let entry = QueueKey::of(&rec).entry(id);
                    if !whole {
                        tracing::warn!(
                            request = id,
                            "removed a request a crash cut short before its body was stored"
                        );
                        self.forget_request(&rec)?;
                    } else if !self.queue.contains_key(&entry)? {
                        let len = line_len(rec.endpoint, id, rec.body_len);
                        let since = rec.created_at.saturating_mul(1000);
                        self.queue
                            .insert(entry, &queue_value(since, len, rec.inputs, rec.deadline_at))?;
                        tracing::warn!(
                            request = id,
                            "queued a request a crash cut short before its queue entry"
                        );
                    }
                }
                // Claimed or finished since: it was whole.
                Some(_) => {}
                None => {
                    tracing::warn!(
                        request = id,
                        "removed a request a crash cut short before its state was stored"
                    );
                    self.forget_request(&rec)?;
                }
            }
        }
        Ok(())
    }
}

/// Starts the writer thread; it ends when the store is dropped.
fn start(store: Weak<SledStore>) -> Queue {
    let (queue, jobs) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("ferry-intake".into())
        .spawn(move || run(&store, &jobs));
    if let Err(e) = spawned {
        // The jobs' receiver went with the closure: every intake then
        // answers 503 naming the cause.
        tracing::error!(error = %e, "cannot start the intake writer thread");
    }
    queue
}

fn run(store: &Weak<SledStore>, jobs: &Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut round = vec![first];
        while round.len() < MAX_JOBS {
            match jobs.try_recv() {
                Ok(job) => round.push(job),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let Some(store) = store.upgrade() else {
            return;
        };
        store.write_round(round);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    fn rec(custom_id: &str, body_sha256: &str) -> RequestRecord {
        RequestRecord::for_test("t", custom_id, body_sha256)
    }

    fn store() -> (tempfile::TempDir, Arc<SledStore>) {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(SledStore::open(dir.path(), 64 << 20).unwrap());
        (dir, s)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_intakes_are_each_answered_once_durable() {
        let (_d, s) = store();
        let calls: Vec<_> = (0..200)
            .map(|i| {
                let s = s.clone();
                // Every tenth is a retry of the one before it.
                let cid = format!("c{}", i - i % 10 / 9);
                tokio::spawn(async move { s.accept(rec(&cid, "h"), b"{}".to_vec()).await })
            })
            .collect();
        let mut created = 0;
        for c in calls {
            match c.await.unwrap().unwrap() {
                Intake::Created(_) => created += 1,
                Intake::Existing(_) => {}
                Intake::Conflict(r) => panic!("{r:?}"),
            }
        }
        assert_eq!(created, 180);
        assert_eq!(s.queued_total(), 180);
        // Everything answered was covered by a flush.
        assert!(s.flushed.load(Ordering::SeqCst) >= 1);
        assert!(s.find("t", "c0").unwrap().is_some());
    }

    #[test]
    fn the_next_start_repairs_a_round_a_crash_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open_db(dir.path(), 64 << 20).unwrap();
        let s = SledStore::from_db(db.clone()).unwrap();
        // An earlier, whole round, then the round the crash cut short.
        let Intake::Created(earlier) = s.insert_request(rec("earlier", "h"), b"{}").unwrap() else {
            panic!()
        };
        let from = s.new_id().unwrap();
        s.db.insert(ROUND_KEY, &from.to_be_bytes()).unwrap();
        let mut cut = Vec::new();
        for cid in ["no-queue-entry", "no-body", "no-state"] {
            let Intake::Created(r) = s.insert_request(rec(cid, "h"), b"{}").unwrap() else {
                panic!()
            };
            cut.push(r);
        }
        let key = |r: &RequestRecord| r.id.to_be_bytes();
        // Written up to its body; then up to its state; then its record only.
        s.queue
            .remove(QueueKey::of(&cut[0]).entry(cut[0].id))
            .unwrap();
        for r in &cut[1..] {
            s.queue.remove(QueueKey::of(r).entry(r.id)).unwrap();
            s.bodies.remove(key(r)).unwrap();
        }
        s.states.remove(key(&cut[2])).unwrap();
        drop(s);

        // The next start (a second store on the same database, as the
        // store's reopen tests do).
        let s = SledStore::from_db(db).unwrap();
        assert_eq!(s.queued_total(), 2, "the earlier request and the whole one");
        let queued = s
            .claim_batch(&QueueKey::of(&earlier), 10, 1 << 20, "size")
            .unwrap();
        let members: Vec<u64> = s.members(queued.unwrap().id).map(Result::unwrap).collect();
        assert_eq!(members, vec![earlier.id, cut[0].id]);
        for gone in ["no-body", "no-state"] {
            assert!(s.find("t", gone).unwrap().is_none(), "{gone} kept");
            assert!(
                s.custom_ids
                    .get(super::super::custom_id_key("t", gone))
                    .unwrap()
                    .is_none()
            );
        }
    }

    #[tokio::test]
    async fn a_flush_that_fails_keeps_nothing_and_says_so() {
        let (_d, s) = store();
        s.fail_commits.0.store(true, Ordering::SeqCst);
        let refused = s.accept(rec("x", "h"), b"{}".to_vec()).await;
        assert!(matches!(refused, Err(StoreError::Flush(_))), "{refused:?}");
        assert!(
            s.find("t", "x").unwrap().is_none(),
            "a refused request was kept"
        );
        assert_eq!(s.queued_total(), 0);
        // The disk is back: the same call is taken as new.
        s.fail_commits.0.store(false, Ordering::SeqCst);
        let taken = s.accept(rec("x", "h"), b"{}".to_vec()).await.unwrap();
        assert!(matches!(taken, Intake::Created(_)), "{taken:?}");
    }
}
