//! Deferred calls in (intake) and out again before they are sent (cancel).

use deadpool_postgres::Transaction;

use super::PgError;
use super::outbox::write_deliveries;
use super::queues::{Moved, add_to_counters, insert_entry};
use super::store::{
    PgStore, REQUEST_COLUMNS, REQUEST_FROM, SyncPayloadFn, json_opt_text, opt_to_i64, request_from,
    to_i64,
};
use crate::store::lifecycle::{self, CancelVerdict};
use crate::store::{
    CancelOutcome, Intake, QueueKey, RequestRecord, RequestStatus, line_len, now_millis, now_secs,
};

impl PgStore {
    /// Cancels a request that is still queued and not claimed by a flush.
    /// A cancel and a claim of one request never both win: the claim takes
    /// the queue row locked, skipping rows a cancel holds, and the cancel
    /// locks the queue row and then the request row, finding a claimed one
    /// already out of the queue and in its batch.
    pub async fn cancel(
        &self,
        tenant: &str,
        custom_id: &str,
        payload: &SyncPayloadFn<'_>,
    ) -> Result<CancelOutcome, PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let Some(found) = tx
            .query_opt(
                "SELECT id, upstream, model, endpoint FROM requests \
                 WHERE tenant = $1 AND custom_id = $2",
                &[&tenant, &custom_id],
            )
            .await?
        else {
            return Ok(CancelOutcome::NotFound);
        };
        let id: i64 = found.try_get(0)?;
        let qk = QueueKey {
            upstream: found.try_get(1)?,
            endpoint: super::queues::endpoint_from(found.try_get(3)?)?,
            model: found.try_get(2)?,
        };
        // Queue row first, then the request: the order a claim locks them
        // in, so the two never wait on each other in a cycle.
        let queued: Option<(i64, i64)> = tx
            .query_opt(
                "SELECT line_len, inputs FROM queue \
                 WHERE upstream = $1 AND endpoint = $2 AND model = $3 AND id = $4 FOR UPDATE",
                &[&qk.upstream, &qk.endpoint.path(), &qk.model, &id],
            )
            .await?
            .map(|row| Ok::<_, PgError>((row.try_get(0)?, row.try_get(1)?)))
            .transpose()?;
        let sql =
            format!("SELECT {REQUEST_COLUMNS} FROM {REQUEST_FROM} WHERE r.id = $1 FOR UPDATE OF r");
        let row = tx.query_one(&sql, &[&id]).await?;
        let mut rec = request_from(&row)?;
        match lifecycle::cancel_verdict(rec.status, rec.batch) {
            CancelVerdict::AlreadyCancelled => return Ok(CancelOutcome::AlreadyCancelled(rec)),
            CancelVerdict::TooLate => return Ok(CancelOutcome::TooLate(rec)),
            CancelVerdict::Cancel => {}
        }
        if let Some((len, inputs)) = queued {
            tx.execute(
                "DELETE FROM queue \
                 WHERE upstream = $1 AND endpoint = $2 AND model = $3 AND id = $4",
                &[&qk.upstream, &qk.endpoint.path(), &qk.model, &id],
            )
            .await?;
            let by = Moved {
                count: -1,
                bytes: -len,
                inputs: -inputs,
            };
            add_to_counters(&tx, &qk, by).await?;
        }
        rec.status = lifecycle::checked_move(rec.status, RequestStatus::Cancelled)?;
        rec.completed_at = Some(now_secs());
        let delivery = lifecycle::delivery_for(&mut rec, None, payload, now_millis());
        tx.execute(
            "UPDATE requests SET status = $2, completed_at = $3, webhook = $4::text::jsonb \
             WHERE id = $1",
            &[
                &id,
                &rec.status.as_str(),
                &opt_to_i64(rec.completed_at, "completed_at")?,
                &json_opt_text(&rec.webhook, "webhook state")?,
            ],
        )
        .await?;
        write_deliveries(&tx, delivery.as_slice()).await?;
        tx.execute("DELETE FROM bodies WHERE id = $1", &[&id])
            .await?;
        tx.commit().await?;
        Ok(CancelOutcome::Cancelled(rec))
    }
}

/// One intake inside `tx`: the request, its body and its queue entry, all
/// but the queue's counters, which the intake round moves once per queue
/// for all its intakes (see [`super::intake_writer`]). `now_ms` is the
/// queue entry's enqueue time.
pub(super) async fn accept_in(
    tx: &Transaction<'_>,
    mut rec: RequestRecord,
    body: &[u8],
    now_ms: u64,
) -> Result<Intake, PgError> {
    let next = tx.prepare_cached("SELECT nextval('ferry_ids')").await?;
    let id: i64 = tx.query_one(&next, &[]).await?.try_get(0)?;
    rec.id = super::store::to_u64(id, "request id")?;
    // ON CONFLICT DO NOTHING waits for a concurrent insert of the same
    // custom id to commit or roll back, so exactly one of two racing
    // intakes inserts; the other reads the winner's row below.
    let insert = tx
        .prepare_cached(
            "INSERT INTO requests (id, tenant, custom_id, upstream, model, body_sha256, \
             body_len, callback_url, stream, created_at, status, attempts, batch, \
             submitted_at, completed_at, error, webhook, endpoint, inputs, deadline_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
             $16::text::jsonb, $17::text::jsonb, $18, $19, $20) \
             ON CONFLICT (tenant, custom_id) DO NOTHING",
        )
        .await?;
    let attempts = i32::try_from(rec.attempts).map_err(|_| PgError::OutOfRange("attempts"))?;
    let inserted = tx
        .execute(
            &insert,
            &[
                &id,
                &rec.tenant,
                &rec.custom_id,
                &rec.upstream,
                &rec.model,
                &rec.body_sha256,
                &to_i64(rec.body_len, "body length")?,
                &rec.callback_url,
                &rec.stream,
                &to_i64(rec.created_at, "created_at")?,
                &rec.status.as_str(),
                &attempts,
                &opt_to_i64(rec.batch, "batch")?,
                &opt_to_i64(rec.submitted_at, "submitted_at")?,
                &opt_to_i64(rec.completed_at, "completed_at")?,
                &json_opt_text(&rec.error, "request error")?,
                &json_opt_text(&rec.webhook, "webhook state")?,
                &rec.endpoint.path(),
                &to_i64(rec.inputs, "inputs")?,
                &opt_to_i64(rec.deadline_at, "deadline_at")?,
            ],
        )
        .await?;
    if inserted == 0 {
        let sql = format!(
            "SELECT {REQUEST_COLUMNS} FROM {REQUEST_FROM} WHERE r.tenant = $1 AND r.custom_id = $2"
        );
        let earlier = tx
            .query_opt(&sql, &[&rec.tenant, &rec.custom_id])
            .await?
            .ok_or_else(|| {
                PgError::Corrupt("a custom id conflicted but its request is missing".into())
            })?;
        let earlier = request_from(&earlier)?;
        return Ok(if earlier.body_sha256 == rec.body_sha256 {
            Intake::Existing(earlier)
        } else {
            Intake::Conflict(earlier)
        });
    }
    let put_body = tx
        .prepare_cached("INSERT INTO bodies (id, body) VALUES ($1, $2)")
        .await?;
    tx.execute(&put_body, &[&id, &body]).await?;
    let qk = QueueKey::of(&rec);
    insert_entry(
        tx,
        &qk,
        id,
        now_ms,
        line_len(rec.endpoint, rec.id, rec.body_len),
        rec.inputs,
    )
    .await?;
    Ok(Intake::Created(rec))
}
