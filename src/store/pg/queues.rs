//! Queues: the counters the flush policy reads, entries in and out, and
//! claims that move a queue's oldest entries into a new batch.

use deadpool_postgres::Transaction;

use super::PgError;
use super::batches::put_batch_in;
use super::store::{PgStore, to_i64, to_u64};
use crate::store::lifecycle;
use crate::store::{BatchRecord, Lane, QueueKey, QueueStats};

/// Counts, bytes and the oldest entry of every queue with a counter row.
/// The oldest comes from the `queue_oldest` index, one probe per queue.
const STATS: &str = "SELECT c.upstream, c.model, c.count, c.bytes, \
     coalesce((SELECT min(q.enqueued_ms) FROM queue q \
               WHERE q.upstream = c.upstream AND q.endpoint = c.endpoint \
               AND q.model = c.model), 0), \
     c.endpoint, c.inputs \
     FROM queue_counters c";

impl PgStore {
    /// Every queue that ever had an entry (an emptied one reads as zeros),
    /// as the embedded store keeps them.
    pub async fn queue_stats(&self) -> Result<Vec<(QueueKey, QueueStats)>, PgError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("{STATS} ORDER BY c.upstream, c.endpoint, c.model"),
                &[],
            )
            .await?;
        rows.iter().map(stats_from).collect()
    }

    pub async fn queue_stats_for(&self, qk: &QueueKey) -> Result<Option<QueueStats>, PgError> {
        let client = self.client().await?;
        client
            .query_opt(
                &format!("{STATS} WHERE c.upstream = $1 AND c.endpoint = $2 AND c.model = $3"),
                &[&qk.upstream, &qk.endpoint.path(), &qk.model],
            )
            .await?
            .map(|row| stats_from(&row).map(|(_, s)| s))
            .transpose()
    }

    /// The cluster's queued total as intake checks `max_queued`: read from
    /// the database at most every [`ADMISSION_STALENESS`], and moved in
    /// between by this node's own intakes and claims. On one node it is
    /// exact; other nodes' changes show within that time. The limit guards
    /// against runaway growth; a round trip per call is not worth its
    /// exactness across nodes.
    pub async fn queued_for_admission(&self) -> Result<u64, PgError> {
        if let Some(total) = self.admission.fresh() {
            return Ok(total);
        }
        let total = self.queued_total().await?;
        self.admission.set(total);
        Ok(total)
    }

    pub async fn queued_total(&self) -> Result<u64, PgError> {
        let client = self.client().await?;
        let n: i64 = client
            .query_one(
                "SELECT coalesce(sum(count), 0)::bigint FROM queue_counters",
                &[],
            )
            .await?
            .try_get(0)?;
        to_u64(n, "queued total")
    }

    /// Moves the oldest entries of a queue (at most `max_requests` lines and
    /// `max_bytes` of JSONL, at least one line) into a new batch, `Claimed`,
    /// in one transaction. Entries another node is claiming (or a cancel
    /// holds) are skipped, not waited for: two claimers never share a
    /// request, and neither blocks the other.
    pub async fn claim_batch(
        &self,
        qk: &QueueKey,
        max_requests: usize,
        max_bytes: u64,
        reason: &str,
    ) -> Result<Option<BatchRecord>, PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let batch = claim_in(&tx, qk, max_requests, max_bytes, reason).await?;
        tx.commit().await?;
        self.admission
            .adjust(-batch.as_ref().map_or(0, |b| b.request_count as i64));
        Ok(batch)
    }

    /// [`claim_batch`](Self::claim_batch), but only while `token` is still
    /// the newest of lease `lease`: a node that lost its upstream claims
    /// nothing, so no batch is left claimed with no owner to drive it.
    pub async fn claim_batch_fenced(
        &self,
        qk: &QueueKey,
        max_requests: usize,
        max_bytes: u64,
        reason: &str,
        lease: &str,
        token: u64,
    ) -> Result<Option<BatchRecord>, PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if !super::leases::fence_in(&tx, lease, token).await? {
            return Ok(None);
        }
        let batch = claim_in(&tx, qk, max_requests, max_bytes, reason).await?;
        tx.commit().await?;
        self.admission
            .adjust(-batch.as_ref().map_or(0, |b| b.request_count as i64));
        Ok(batch)
    }

    /// Claims request `id` alone out of queue `qk` into a new batch sent on
    /// `lane` (an escalation for its deadline), while `token` is still the
    /// newest of lease `lease`: one transaction, so the request is in this
    /// batch or still queued, never also in a flush's. `None` when it is no
    /// longer queued (a flush, a cancel, another node took it) or the
    /// lease is lost.
    pub async fn claim_request_fenced(
        &self,
        qk: &QueueKey,
        id: u64,
        lane: Lane,
        reason: &str,
        lease: &str,
        token: u64,
    ) -> Result<Option<BatchRecord>, PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if !super::leases::fence_in(&tx, lease, token).await? {
            return Ok(None);
        }
        let batch =
            claim_picked(&tx, qk, Pick::One(to_i64(id, "request id")?), lane, reason).await?;
        tx.commit().await?;
        self.admission
            .adjust(-batch.as_ref().map_or(0, |b| b.request_count as i64));
        Ok(batch)
    }

    /// Requests of `upstream` still waiting in a queue whose deadline is at
    /// or before `before` (unix seconds), soonest first, at most `limit`:
    /// (queue, id, deadline) each.
    pub async fn due_by_deadline(
        &self,
        upstream: &str,
        before: u64,
        limit: usize,
    ) -> Result<Vec<(QueueKey, u64, u64)>, PgError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, endpoint, model, deadline_at FROM requests \
                 WHERE deadline_at IS NOT NULL AND deadline_at <= $1 \
                 AND status = 'queued' AND batch IS NULL AND upstream = $2 \
                 ORDER BY deadline_at, id LIMIT $3",
                &[
                    &to_i64(before, "deadline")?,
                    &upstream,
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                ],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let qk = QueueKey {
                    upstream: upstream.to_owned(),
                    endpoint: endpoint_from(row.try_get(1)?)?,
                    model: row.try_get(2)?,
                };
                Ok((
                    qk,
                    to_u64(row.try_get(0)?, "request id")?,
                    to_u64(row.try_get(3)?, "deadline_at")?,
                ))
            })
            .collect()
    }
}

/// Which entries of a queue a claim takes.
#[derive(Clone, Copy)]
enum Pick {
    /// The oldest, within these limits.
    Oldest { max_requests: usize, max_bytes: u64 },
    /// This request alone.
    One(i64),
}

/// The claim of a flush, inside `tx`.
async fn claim_in(
    tx: &Transaction<'_>,
    qk: &QueueKey,
    max_requests: usize,
    max_bytes: u64,
    reason: &str,
) -> Result<Option<BatchRecord>, PgError> {
    let pick = Pick::Oldest {
        max_requests,
        max_bytes,
    };
    claim_picked(tx, qk, pick, Lane::Batch, reason).await
}

/// A claim, inside `tx`: the picked entries leave the queue for a new
/// batch on `lane`.
async fn claim_picked(
    tx: &Transaction<'_>,
    qk: &QueueKey,
    pick: Pick,
    lane: Lane,
    reason: &str,
) -> Result<Option<BatchRecord>, PgError> {
    let (max_requests, max_bytes) = match pick {
        Pick::Oldest {
            max_requests,
            max_bytes,
        } => (max_requests, max_bytes),
        Pick::One(_) => (1, u64::MAX),
    };
    if max_requests == 0 {
        return Ok(None);
    }
    let limit = i64::try_from(max_requests).unwrap_or(i64::MAX);
    let (upstream, endpoint, model) = (&qk.upstream, qk.endpoint.path(), &qk.model);
    let rows = match pick {
        Pick::Oldest { .. } => {
            tx.query(
                "SELECT id, line_len, inputs FROM queue \
                 WHERE upstream = $1 AND endpoint = $2 AND model = $3 \
                 ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED",
                &[upstream, &endpoint, model, &limit],
            )
            .await?
        }
        // One primary-key probe, however long the queue.
        Pick::One(id) => {
            tx.query(
                "SELECT id, line_len, inputs FROM queue \
                 WHERE upstream = $1 AND endpoint = $2 AND model = $3 AND id = $4 \
                 FOR UPDATE SKIP LOCKED",
                &[upstream, &endpoint, model, &id],
            )
            .await?
        }
    };
    let mut ids: Vec<i64> = Vec::new();
    let mut bytes = 0u64;
    let mut inputs = 0u64;
    let max_inputs = lifecycle::max_inputs(qk.endpoint);
    for row in &rows {
        let len = to_u64(row.try_get(1)?, "line length")?;
        let n = to_u64(row.try_get(2)?, "inputs")?;
        if !lifecycle::claim_takes(ids.len(), bytes, len, max_requests, max_bytes)
            || !lifecycle::inputs_fit(ids.len(), inputs, n, max_inputs)
        {
            break;
        }
        ids.push(row.try_get(0)?);
        bytes += len;
        inputs += n;
    }
    if ids.is_empty() {
        return Ok(None);
    }
    let batch_id: i64 = tx
        .query_one("SELECT nextval('ferry_ids')", &[])
        .await?
        .try_get(0)?;
    let batch = BatchRecord {
        lane,
        ..BatchRecord::claimed(
            to_u64(batch_id, "batch id")?,
            qk,
            ids.len() as u64,
            bytes,
            reason,
        )
    };
    put_batch_in(tx, &batch).await?;
    tx.execute(
        "INSERT INTO members (batch, id) SELECT $1, unnest($2::bigint[])",
        &[&batch_id, &ids],
    )
    .await?;
    tx.execute(
        "DELETE FROM queue WHERE upstream = $1 AND endpoint = $2 AND model = $3 \
         AND id = ANY($4)",
        &[&qk.upstream, &qk.endpoint.path(), &qk.model, &ids],
    )
    .await?;
    tx.execute(
        "UPDATE requests SET batch = $1 \
         WHERE id = ANY($2) AND status = 'queued' AND batch IS NULL",
        &[&batch_id, &ids],
    )
    .await?;
    add_to_counters(
        tx,
        qk,
        Moved {
            count: -(ids.len() as i64),
            bytes: -to_i64(bytes, "claimed bytes")?,
            inputs: -to_i64(inputs, "claimed inputs")?,
        },
    )
    .await?;
    Ok(Some(batch))
}

/// How old the database's part of the admission total may be.
pub const ADMISSION_STALENESS: std::time::Duration = std::time::Duration::from_millis(100);

/// The queued total intake checks `max_queued` against, and when it was
/// read from the database (see [`PgStore::queued_for_admission`]); shared
/// by a store's clones and its intake writer.
#[derive(Clone, Default)]
pub(super) struct Admission(std::sync::Arc<std::sync::Mutex<Option<(std::time::Instant, u64)>>>);

impl Admission {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(std::time::Instant, u64)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The total, if read within [`ADMISSION_STALENESS`].
    fn fresh(&self) -> Option<u64> {
        match *self.lock() {
            Some((at, total)) if at.elapsed() < ADMISSION_STALENESS => Some(total),
            _ => None,
        }
    }

    /// The total as just read from the database.
    fn set(&self, total: u64) {
        *self.lock() = Some((std::time::Instant::now(), total));
    }

    /// Moves the total by a change this node committed.
    pub(super) fn adjust(&self, by: i64) {
        if let Some((_, total)) = self.lock().as_mut() {
            *total = total.saturating_add_signed(by);
        }
    }
}

fn stats_from(row: &tokio_postgres::Row) -> Result<(QueueKey, QueueStats), PgError> {
    Ok((
        QueueKey {
            upstream: row.try_get(0)?,
            endpoint: endpoint_from(row.try_get(5)?)?,
            model: row.try_get(1)?,
        },
        QueueStats {
            count: to_u64(row.try_get(2)?, "queue count")?,
            bytes: to_u64(row.try_get(3)?, "queue bytes")?,
            oldest_ms: to_u64(row.try_get(4)?, "queue oldest")?,
            inputs: to_u64(row.try_get(6)?, "queue inputs")?,
        },
    ))
}

/// Adds a queue entry for request `id` inside `tx`, uncounted: the caller
/// moves the queue's counters with [`add_to_counters`], last.
pub(super) async fn insert_entry(
    tx: &Transaction<'_>,
    qk: &QueueKey,
    id: i64,
    enqueued_ms: u64,
    line_len: u64,
    inputs: u64,
) -> Result<(), PgError> {
    let line_len = to_i64(line_len, "line length")?;
    let insert = tx
        .prepare_cached(
            "INSERT INTO queue (upstream, endpoint, model, id, enqueued_ms, line_len, inputs) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .await?;
    tx.execute(
        &insert,
        &[
            &qk.upstream,
            &qk.endpoint.path(),
            &qk.model,
            &id,
            &to_i64(enqueued_ms, "enqueue time")?,
            &line_len,
            &to_i64(inputs, "inputs")?,
        ],
    )
    .await?;
    Ok(())
}

/// How much a change moves a queue's counters (negative: entries left).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Moved {
    pub count: i64,
    pub bytes: i64,
    pub inputs: i64,
}

/// Moves a queue's counters by `by`, creating its row the
/// first time, and returns them as moved. Always the last row a
/// transaction locks, after the queue and request rows, so that
/// transactions never wait on each other in a cycle.
pub(super) async fn add_to_counters(
    tx: &Transaction<'_>,
    qk: &QueueKey,
    by: Moved,
) -> Result<(u64, u64), PgError> {
    let upsert = tx
        .prepare_cached(
            "INSERT INTO queue_counters AS c (upstream, endpoint, model, count, bytes, inputs) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (upstream, endpoint, model) DO UPDATE \
             SET count = c.count + EXCLUDED.count, bytes = c.bytes + EXCLUDED.bytes, \
                 inputs = c.inputs + EXCLUDED.inputs \
             RETURNING count, bytes",
        )
        .await?;
    let row = tx
        .query_one(
            &upsert,
            &[
                &qk.upstream,
                &qk.endpoint.path(),
                &qk.model,
                &by.count,
                &by.bytes,
                &by.inputs,
            ],
        )
        .await?;
    Ok((
        to_u64(row.try_get(0)?, "queue count")?,
        to_u64(row.try_get(1)?, "queue bytes")?,
    ))
}

/// An endpoint column's value (a path this build knows).
pub(super) fn endpoint_from(path: &str) -> Result<crate::endpoint::Endpoint, PgError> {
    crate::endpoint::Endpoint::from_path(path)
        .ok_or_else(|| PgError::Corrupt(format!("unknown endpoint {path:?}")))
}
