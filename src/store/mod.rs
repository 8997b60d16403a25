//! The durable state, behind one async interface: [`Store`].
//!
//! Every write is durable when its call returns; nothing outside this
//! module commits, names a tree or a transaction, or blocks a runtime
//! thread on the disk. The embedded backend is sled (`embedded`: one node,
//! nothing to install); PostgreSQL (`pg`), the shared store of a cluster,
//! is being built behind the same interface.
//!
//! Files: `embedded` (the sled backend), `error` (the layer's one error
//! type), [`instance`] (the data_dir's instance id), [`records`] (the record
//! types and the request lifecycle), [`pg`] (PostgreSQL, under way).

mod embedded;
mod error;
pub mod instance;
pub mod lifecycle;
pub mod pg;
pub mod records;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub use embedded::SledStore;
pub use embedded::encoding::{CHAT_COMPLETIONS, LINE_SUFFIX, QueueKey, line_len, line_prefix};
pub use error::StoreError;
pub use records::*;

/// Builds a webhook's JSON body for a request that just became terminal;
/// the store calls it inside the write that makes the request terminal.
pub type Payload = fn(&RequestRecord, Option<&StoredResult>) -> String;

/// The store Ferry runs on.
pub struct Store {
    backend: Backend,
}

enum Backend {
    Sled(Arc<SledStore>),
}

impl Store {
    /// Opens (or creates) the embedded store in `path`; see
    /// [`SledStore::open`].
    pub fn open_sled(path: &std::path::Path, cache_bytes: u64) -> Result<Store, StoreError> {
        Ok(Store {
            backend: Backend::Sled(Arc::new(SledStore::open(path, cache_bytes)?)),
        })
    }

    /// The sled backend, for tests that inject its failures.
    #[cfg(test)]
    pub(crate) fn sled(&self) -> &Arc<SledStore> {
        match &self.backend {
            Backend::Sled(s) => s,
        }
    }

    /// Reports every durable flush's duration to `h`.
    pub fn observe_flushes(&self, h: prometheus::Histogram) {
        match &self.backend {
            Backend::Sled(s) => s.observe_flushes(h),
        }
    }

    /// Bytes the store takes on disk.
    pub async fn storage_size(&self) -> Result<u64, StoreError> {
        match &self.backend {
            // sled sums its files' sizes: disk work.
            Backend::Sled(s) => s.blocking(|s| Ok(s.size_on_disk())).await,
        }
    }

    /// Makes everything durable, for shutdown, once the runtime has stopped.
    pub fn close(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.flush_blocking(),
        }
    }

    // ------------------------------------------------------------ requests

    /// Stores a new deferred request and queues it; returns once it is
    /// durable (also for `Existing`, an idempotent retry).
    pub async fn accept(&self, rec: RequestRecord, body: Vec<u8>) -> Result<Intake, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.accept(rec, body).await,
        }
    }

    pub async fn get(&self, id: u64) -> Result<Option<RequestRecord>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.blocking(move |s| s.get(id)).await,
        }
    }

    pub async fn find(
        &self,
        tenant: &str,
        custom_id: &str,
    ) -> Result<Option<RequestRecord>, StoreError> {
        let (tenant, custom_id) = (tenant.to_owned(), custom_id.to_owned());
        match &self.backend {
            Backend::Sled(s) => s.blocking(move |s| s.find(&tenant, &custom_id)).await,
        }
    }

    /// The upstream's stored answer to a completed request.
    pub async fn result(&self, id: u64) -> Result<Option<StoredResult>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.blocking(move |s| s.result(id)).await,
        }
    }

    /// Cancels a request that is still queued and not claimed by a flush;
    /// a cancel is durable when this returns.
    pub async fn cancel(
        &self,
        tenant: &str,
        custom_id: &str,
        payload: Payload,
    ) -> Result<CancelOutcome, StoreError> {
        let (tenant, custom_id) = (tenant.to_owned(), custom_id.to_owned());
        match &self.backend {
            Backend::Sled(s) => {
                let outcome = s
                    .blocking(move |s| s.cancel(&tenant, &custom_id, &payload))
                    .await?;
                if matches!(outcome, CancelOutcome::Cancelled(_)) {
                    s.commit().await?;
                }
                Ok(outcome)
            }
        }
    }

    // -------------------------------------------------------------- queues

    pub async fn queue_stats(&self) -> Result<Vec<(QueueKey, QueueStats)>, StoreError> {
        match &self.backend {
            // Kept in memory: no disk work.
            Backend::Sled(s) => Ok(s.queue_stats()),
        }
    }

    pub async fn queue_stats_for(&self, qk: &QueueKey) -> Result<Option<QueueStats>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => Ok(s.queue_stats_for(qk)),
        }
    }

    /// Requests queued in every queue, for `max_queued`.
    pub async fn queued_total(&self) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Sled(s) => Ok(s.queued_total()),
        }
    }

    // ------------------------------------------------------------- batches

    /// Moves the oldest entries of a queue (at most `max_requests` lines and
    /// `max_bytes` of JSONL) into a new batch, and returns it once it is
    /// durable. A claim cannot be taken back once written, so a failed
    /// commit is retried, with backoff, until it succeeds: no upstream call
    /// may follow a claim that a crash would undo. Dropping the future (at
    /// shutdown) leaves the claim to recovery at the next start.
    pub async fn claim_batch(
        &self,
        qk: &QueueKey,
        max_requests: usize,
        max_bytes: u64,
        reason: &'static str,
    ) -> Result<Option<BatchRecord>, StoreError> {
        let key = qk.clone();
        match &self.backend {
            Backend::Sled(s) => {
                let claimed = s
                    .blocking(move |s| s.claim_batch(&key, max_requests, max_bytes, reason))
                    .await?;
                if let Some(b) = &claimed {
                    commit_until_durable(s, b.id).await;
                }
                Ok(claimed)
            }
        }
    }

    /// Stores a batch's record, durably.
    pub async fn put_batch(&self, b: &BatchRecord) -> Result<(), StoreError> {
        let record = b.clone();
        match &self.backend {
            Backend::Sled(s) => {
                s.blocking(move |s| s.put_batch(&record)).await?;
                s.commit().await
            }
        }
    }

    pub async fn get_batch(&self, id: u64) -> Result<Option<BatchRecord>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.blocking(move |s| s.get_batch(id)).await,
        }
    }

    /// Batches not yet finished, for recovery.
    pub async fn live_batches(&self) -> Result<Vec<BatchRecord>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.blocking(|s| s.live_batches()).await,
        }
    }

    /// Finished batches of `upstream` whose upstream files are not deleted yet.
    pub async fn batches_owing_cleanup(
        &self,
        upstream: &str,
    ) -> Result<Vec<BatchRecord>, StoreError> {
        let upstream = upstream.to_owned();
        match &self.backend {
            Backend::Sled(s) => {
                s.blocking(move |s| s.batches_owing_cleanup(&upstream))
                    .await
            }
        }
    }

    /// A batch's member ids, in member (line) order.
    pub async fn members(&self, batch: u64) -> Result<Vec<u64>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.blocking(move |s| s.members(batch).collect()).await,
        }
    }

    /// The input file's lines for `members[next..]`, about `max_bytes` of
    /// them; returns them and the index of the first member not taken.
    pub async fn input_lines(
        &self,
        members: Arc<[u64]>,
        next: usize,
        max_bytes: usize,
    ) -> Result<(Bytes, usize), StoreError> {
        match &self.backend {
            Backend::Sled(s) => {
                s.blocking(move |s| s.input_lines(&members, next, max_bytes))
                    .await
            }
        }
    }

    /// Finishes claims a crash cut short; returns how many it finished.
    pub async fn recover_claims(&self) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::Sled(s) => {
                let n = s.blocking(|s| s.recover_claims()).await?;
                s.commit().await?;
                Ok(n)
            }
        }
    }

    /// Records the upstream batch and moves every member to `submitted`;
    /// returns the record as stored, durably.
    pub async fn mark_submitted(
        &self,
        batch: &BatchRecord,
        file_id: &str,
        upstream_batch: &str,
    ) -> Result<BatchRecord, StoreError> {
        let (mut next, file, created) =
            (batch.clone(), file_id.to_owned(), upstream_batch.to_owned());
        match &self.backend {
            Backend::Sled(s) => {
                let next = s
                    .blocking(move |s| s.mark_submitted(&mut next, &file, &created).map(|()| next))
                    .await?;
                s.commit().await?;
                Ok(next)
            }
        }
    }

    /// Moves the members of a batch recorded as submitted to `submitted`
    /// (recovery: idempotent).
    pub async fn apply_submitted(&self, batch: u64) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(s) => {
                s.blocking(move |s| s.apply_submitted(batch)).await?;
                s.commit().await
            }
        }
    }

    /// Applies the outcomes of a finished batch's members, durably; only
    /// members still `submitted` in this batch change, so applying twice is
    /// harmless. Returns the records that reached a terminal status.
    pub async fn apply_outcomes(
        &self,
        batch: u64,
        outcomes: Vec<(u64, Outcome)>,
        payload: Payload,
    ) -> Result<Vec<RequestRecord>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => {
                let done = s
                    .blocking(move |s| s.apply_outcomes(batch, outcomes, &payload))
                    .await?;
                s.commit().await?;
                Ok(done)
            }
        }
    }

    /// Whether `id` names an upstream file or batch of one of Ferry's own
    /// batches (tenants may not touch them).
    pub async fn is_own_upstream_object(&self, id: &str) -> bool {
        match &self.backend {
            // Kept in memory: no disk work.
            Backend::Sled(s) => s.is_own_upstream_object(id),
        }
    }

    // -------------------------------------------------------------- outbox

    /// Webhook deliveries not yet finished.
    pub async fn outbox_len(&self) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.blocking(|s| Ok(s.outbox_len())).await,
        }
    }

    /// When the next delivery is due (unix millis), if any is scheduled.
    pub async fn next_delivery_due(&self) -> Result<Option<u64>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => Ok(s.next_delivery_due()),
        }
    }

    /// Takes up to `max` deliveries due by `now`; each must come back
    /// through `reschedule_delivery`, `retry_delivery` or `finish_delivery`.
    /// Only durable entries are taken: a webhook is never sent for a state a
    /// crash could still undo.
    pub async fn take_due_deliveries(
        &self,
        now: u64,
        max: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => {
                // Entries are released by the commit that makes them durable,
                // and their writers commit: this only hurries a straggler.
                if s.has_unflushed_deliveries() {
                    s.commit().await?;
                }
                s.blocking(move |s| Ok(s.take_due_deliveries(now, max)))
                    .await
            }
        }
    }

    /// Puts a taken delivery back without a try (its receiver is busy).
    pub async fn reschedule_delivery(&self, d: &Delivery, due_ms: u64) {
        match &self.backend {
            Backend::Sled(s) => s.reschedule_delivery(d, due_ms),
        }
    }

    /// Records a failed try, durably, and schedules the next at `d.due_ms`.
    pub async fn retry_delivery(&self, d: Delivery, state: WebhookState) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(s) => {
                s.blocking(move |s| s.retry_delivery(&d, state)).await?;
                s.commit().await
            }
        }
    }

    /// Ends a delivery, durably: delivered, or dead after its retries.
    pub async fn finish_delivery(
        &self,
        d: Delivery,
        status: WebhookStatus,
        last_error: Option<String>,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(s) => {
                s.blocking(move |s| s.finish_delivery(&d, status, last_error))
                    .await?;
                s.commit().await
            }
        }
    }

    /// Wakes the delivery worker (a slot freed, an entry became due).
    pub fn wake_outbox(&self) {
        match &self.backend {
            Backend::Sled(s) => s.wake_outbox(),
        }
    }

    /// Resolves when the outbox may have something new to send.
    pub async fn outbox_notified(&self) {
        match &self.backend {
            Backend::Sled(s) => s.outbox_notified().await,
        }
    }
}

/// Retries the group commit, with backoff, until the claim of `batch` is on
/// disk (a full disk, an I/O error: the operator frees space, Ferry goes on).
async fn commit_until_durable(s: &SledStore, batch: u64) {
    let mut failures = 0u32;
    while let Err(e) = s.commit().await {
        let wait = crate::upstream::backoff(
            failures,
            Duration::from_millis(100),
            Duration::from_secs(30),
            rand::random(),
        );
        failures += 1;
        tracing::error!(
            ferry_batch = batch, error = %e, retry_in_ms = wait.as_millis() as u64,
            "cannot make a claimed batch durable; it waits until it is"
        );
        tokio::time::sleep(wait).await;
    }
}
