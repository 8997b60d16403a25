//! The intake writer on PostgreSQL: the deferred calls arriving at a node
//! at once share one transaction, and one commit.
//!
//! As the embedded store's intake writer does (`store/embedded`), one task
//! takes every call waiting (up to [`MAX_JOBS`]), writes them all in one
//! transaction, commits, and only then answers each caller: a `202` still
//! means committed. While a round commits, the next calls queue up and go
//! in the next round, so commits (and WAL flushes) per call fall as the
//! load rises, and the queue's hot counter row is updated once per round
//! instead of once per call.
//!
//! A round runs its calls without savepoints: a savepoint per call costs two
//! more round trips each, and a transaction with more than 64 writing
//! subtransactions overflows PostgreSQL's per-backend subtransaction cache,
//! which slows every other session's snapshots. If one call fails, the round
//! is rolled back and run again with a savepoint per call, so the failing
//! call is undone alone and answered with its error while its neighbours
//! are stored.

use std::collections::BTreeMap;
use std::sync::Arc;

use dashmap::DashMap;
use deadpool_postgres::{Pool, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::PgError;
use super::intake_rows::accept_many_in;
use super::queues::{Admission, Moved, add_to_counters};
use super::requests::accept_in;
use super::store::{PgStore, to_i64};
use crate::store::{Intake, QueueKey, QueueLoad, RequestRecord, line_len, now_millis};

/// Calls written and committed together, at most.
const MAX_JOBS: usize = 512;

/// Queues whose latest size a node keeps, at most.
const MAX_LOADS: usize = 4_096;

pub(super) struct Job {
    rec: RequestRecord,
    body: Vec<u8>,
    done: oneshot::Sender<Result<Intake, PgError>>,
}

/// Where a node's intakes go: the writer's queue, started by the first
/// intake and shared by every clone of the store. The writer ends when the
/// last clone is dropped.
pub(super) type Queue = Arc<std::sync::OnceLock<mpsc::UnboundedSender<Job>>>;

/// Each queue's size as this node's latest intake round into it left it
/// (see [`PgStore::queue_load`]).
pub(super) type Loads = Arc<DashMap<QueueKey, QueueLoad>>;

/// Where a round reports what it moved, once committed.
#[derive(Clone)]
struct Sinks {
    loads: Loads,
    admission: Admission,
}

impl PgStore {
    /// Stores a new deferred request under an id from `ferry_ids` (the one
    /// in `rec` is replaced) and queues it, durably: it returns once the
    /// transaction holding it has committed. A (tenant, custom id) already
    /// stored, by this node or another, or earlier in the same round,
    /// answers `Existing` for the same body and `Conflict` for another;
    /// two nodes racing on one custom id store one request.
    pub async fn accept(&self, rec: RequestRecord, body: Vec<u8>) -> Result<Intake, PgError> {
        let queue = self
            .intake
            .get_or_init(|| start(self.pool.clone(), self.sinks()));
        let (done, answer) = oneshot::channel();
        queue
            .send(Job { rec, body, done })
            .map_err(|_| PgError::Writer("the intake writer has stopped"))?;
        answer
            .await
            .map_err(|_| PgError::Writer("the intake writer dropped a request"))?
    }

    /// One intake round over `calls`, as the writer runs it: their answers
    /// in their order. For tests that need several calls in one round.
    #[doc(hidden)]
    pub async fn accept_round(
        &self,
        calls: Vec<(RequestRecord, Vec<u8>)>,
    ) -> Vec<Result<Intake, PgError>> {
        write_round(&self.pool, &self.sinks(), calls).await
    }

    fn sinks(&self) -> Sinks {
        Sinks {
            loads: self.loads.clone(),
            admission: self.admission.clone(),
        }
    }

    /// The size of queue `qk` as this node's latest intake round into it
    /// left it (the cluster-wide counters, read back by the round's own
    /// update): what an intake's wake-up decision needs, without a read of
    /// its own. A later round may have replaced the entry before the
    /// caller looks; then `started` may be missed, and the flush loop finds
    /// the new queue on its next look, within a second.
    pub fn queue_load(&self, qk: &QueueKey) -> Option<QueueLoad> {
        self.loads.get(qk).map(|l| *l)
    }
}

/// Starts the writer task on the current runtime.
fn start(pool: Pool, sinks: Sinks) -> mpsc::UnboundedSender<Job> {
    let (queue, mut jobs) = mpsc::unbounded_channel::<Job>();
    tokio::spawn(async move {
        let mut round = Vec::with_capacity(MAX_JOBS);
        while jobs.recv_many(&mut round, MAX_JOBS).await > 0 {
            let (calls, answers): (Vec<_>, Vec<_>) = round
                .drain(..)
                .map(|Job { rec, body, done }| ((rec, body), done))
                .unzip();
            let results = write_round(&pool, &sinks, calls).await;
            for (done, result) in answers.into_iter().zip(results) {
                // A caller that hung up no longer wants the answer.
                let _ = done.send(result);
            }
        }
    });
    queue
}

/// How a pass over a round ended without committing.
enum Stop {
    /// A call failed: run the round again, each call isolated.
    CallFailed,
    /// The transaction itself failed: no call is stored.
    Round(PgError),
}

impl From<PgError> for Stop {
    fn from(e: PgError) -> Stop {
        Stop::Round(e)
    }
}

impl From<tokio_postgres::Error> for Stop {
    fn from(e: tokio_postgres::Error) -> Stop {
        Stop::Round(e.into())
    }
}

/// Writes `calls` in one transaction and commits; each call's answer, in
/// order. Nothing is answered `Ok` unless the commit succeeded.
async fn write_round(
    pool: &Pool,
    sinks: &Sinks,
    calls: Vec<(RequestRecord, Vec<u8>)>,
) -> Vec<Result<Intake, PgError>> {
    // Calls go in (tenant, custom id) order, stable so that the first of two
    // calls with one custom id is the one stored. Two nodes' rounds then
    // insert their custom ids in one order and, waiting on each other's
    // uncommitted inserts, can never wait in a cycle.
    let mut order: Vec<usize> = (0..calls.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&calls[a].0, &calls[b].0);
        (&a.tenant, &a.custom_id).cmp(&(&b.tenant, &b.custom_id))
    });
    let now_ms = now_millis();
    let outcome = match run_round(pool, &calls, &order, now_ms, false).await {
        Err(Stop::CallFailed) => run_round(pool, &calls, &order, now_ms, true).await,
        other => other,
    };
    match outcome {
        Ok((answers, moved)) => {
            let created = answers
                .iter()
                .filter(|a| matches!(a, Ok(Intake::Created(_))))
                .count();
            sinks.admission.adjust(created as i64);
            // Bounded however many models callers name: starting over
            // costs each queue at most one missed wake-up (a second).
            if sinks.loads.len() > MAX_LOADS {
                sinks.loads.clear();
            }
            for (qk, load) in moved {
                sinks.loads.insert(qk, load);
            }
            answers
        }
        Err(stop) => {
            let e = Arc::new(match stop {
                Stop::Round(e) => e,
                // Only the unisolated pass stops at a failed call.
                Stop::CallFailed => PgError::Writer("an intake failed outside a savepoint"),
            });
            tracing::error!(error = %e, requests = calls.len(), "an intake transaction failed; refusing its requests");
            calls
                .iter()
                .map(|_| Err(PgError::Round(e.clone())))
                .collect()
        }
    }
}

/// One pass: every call in `order`, each in a savepoint of its own when
/// `isolate`, then the queues' counters, then the commit.
async fn run_round(
    pool: &Pool,
    calls: &[(RequestRecord, Vec<u8>)],
    order: &[usize],
    now_ms: u64,
    isolate: bool,
) -> Result<(Vec<Result<Intake, PgError>>, Vec<(QueueKey, QueueLoad)>), Stop> {
    let mut client = pool.get().await.map_err(PgError::from)?;
    let mut tx = client.transaction().await?;
    let mut answers: Vec<Option<Result<Intake, PgError>>> = calls.iter().map(|_| None).collect();
    if isolate {
        for &i in order {
            let (rec, body) = &calls[i];
            answers[i] = Some(isolated(&mut tx, rec, body, now_ms).await?);
        }
    } else {
        // All at once; dropping the transaction on the way out rolls it back.
        let ordered: Vec<(&RequestRecord, &[u8])> = order
            .iter()
            .map(|&i| (&calls[i].0, calls[i].1.as_slice()))
            .collect();
        let written = accept_many_in(&tx, &ordered, now_ms)
            .await
            .map_err(|_| Stop::CallFailed)?;
        for (&i, answer) in order.iter().zip(written) {
            answers[i] = Some(Ok(answer));
        }
    }
    // Queue → what this round adds to it.
    let mut counted: BTreeMap<QueueKey, Moved> = BTreeMap::new();
    for answer in answers.iter().flatten() {
        if let Ok(Intake::Created(r)) = answer {
            let len = to_i64(line_len(r.endpoint, r.id, r.body_len), "line length")?;
            let c = counted.entry(QueueKey::of(r)).or_default();
            c.count += 1;
            c.bytes += len;
            c.inputs += to_i64(r.inputs, "inputs")?;
        }
    }
    // Counters last and in key order: the rows claims and cancels also
    // lock last, so no transaction holding one waits for another.
    let mut moved = Vec::with_capacity(counted.len());
    for (qk, by) in counted {
        let (count, bytes) = add_to_counters(&tx, &qk, by).await?;
        let started = count == by.count as u64;
        moved.push((
            qk,
            QueueLoad {
                count,
                bytes,
                started,
            },
        ));
    }
    tx.commit().await?;
    let answers = answers
        .into_iter()
        .map(|a| a.unwrap_or(Err(PgError::Writer("an intake was skipped"))))
        .collect();
    Ok((answers, moved))
}

/// One call in a savepoint of its own: undone alone if it fails. The outer
/// error is the transaction's (no savepoint to take or release).
async fn isolated(
    tx: &mut Transaction<'_>,
    rec: &RequestRecord,
    body: &[u8],
    now_ms: u64,
) -> Result<Result<Intake, PgError>, Stop> {
    let sp = tx.savepoint("intake").await?;
    let answer = accept_in(&sp, rec.clone(), body, now_ms).await;
    if answer.is_ok() {
        sp.commit().await?;
    } else {
        sp.rollback().await?;
    }
    Ok(answer)
}
