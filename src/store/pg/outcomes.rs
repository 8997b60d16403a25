//! A finished batch's outcomes applied to its members: results stored,
//! members finished or re-queued, webhooks owed written with the state that
//! owes them.

use std::collections::HashMap;

use super::PgError;
use super::outbox::write_deliveries;
use super::queues::{Moved, add_to_counters};
use super::store::{
    PgStore, REQUEST_COLUMN_COUNT, REQUEST_COLUMNS, REQUEST_FROM, SyncPayloadFn, json_opt_text,
    lane_from, request_from, to_i64, to_u64,
};

use crate::store::lifecycle::{self, Effect};
use crate::store::{
    Outcome, QueueKey, RequestRecord, RequestStatus, line_len, now_millis, now_secs,
};

impl PgStore {
    /// Applies the outcomes of a finished batch's members, in one
    /// transaction. Only members still pending in this batch change (see
    /// [`lifecycle::outcome_applies`]), so applying twice is harmless, also
    /// from two nodes at once: the members' rows are locked first, in id
    /// order. Returns the records that reached a terminal status.
    pub async fn apply_outcomes(
        &self,
        batch: u64,
        outcomes: Vec<(u64, Outcome)>,
        payload: &SyncPayloadFn<'_>,
    ) -> Result<Vec<RequestRecord>, PgError> {
        let batch_i = to_i64(batch, "batch id")?;
        let ids = outcomes
            .iter()
            .map(|(id, _)| to_i64(*id, "request id"))
            .collect::<Result<Vec<i64>, _>>()?;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // A member of this batch, or escalated into it (see
        // [`lifecycle::outcome_applies`]).
        let sql = format!(
            // `r.escalation` right after the record's columns.
            "SELECT {REQUEST_COLUMNS}, r.escalation FROM {REQUEST_FROM} \
             WHERE r.id = ANY($1) AND (r.batch = $2 OR r.escalation = $2) \
             ORDER BY r.id FOR UPDATE OF r"
        );
        let mut members: HashMap<u64, (RequestRecord, Option<u64>)> = HashMap::new();
        for row in tx.query(&sql, &[&ids, &batch_i]).await? {
            let rec = request_from(&row)?;
            let escalation = row
                .try_get::<_, Option<i64>>(REQUEST_COLUMN_COUNT)?
                .map(|e| to_u64(e, "escalation"))
                .transpose()?;
            members.insert(rec.id, (rec, escalation));
        }
        // What the status object shows of the batch that answers, read
        // once: an escalation's lane, or the job's upstream batch id.
        let answering = tx
            .query_opt(
                "SELECT upstream_batch_id, record ->> 'lane' FROM batches WHERE id = $1",
                &[&batch_i],
            )
            .await?;
        let (batch_id, lane) = match &answering {
            Some(row) => (row.try_get(0)?, lane_from(Some(batch_i), row.try_get(1)?)?),
            None => (None, None),
        };
        let now = now_secs();
        let now_ms = now_millis();
        let mut w = Writes::default();
        for (id, outcome) in outcomes {
            // An id given twice is applied once, as its first outcome.
            let Some((mut rec, escalation)) = members.remove(&id) else {
                continue;
            };
            if !lifecycle::outcome_applies(rec.status, rec.batch, escalation, batch, &outcome) {
                continue;
            }
            let id_i = to_i64(id, "request id")?;
            let (status, error, result) = match lifecycle::outcome_effect(outcome, rec.attempts) {
                Effect::Finish {
                    status,
                    error,
                    result,
                } => (status, error, result),
                Effect::Requeue { attempts } => {
                    lifecycle::checked_move(rec.status, RequestStatus::Queued)?;
                    w.requeue_ids.push(id_i);
                    w.requeue_attempts.push(
                        i32::try_from(attempts).map_err(|_| PgError::OutOfRange("attempts"))?,
                    );
                    // Age counts from acceptance: a re-queued request has
                    // waited already, so the time threshold sends it soon.
                    w.requeue_since
                        .push(to_i64(rec.created_at.saturating_mul(1000), "enqueue time")?);
                    w.requeue_len.push(to_i64(
                        line_len(rec.endpoint, id, rec.body_len),
                        "line length",
                    )?);
                    w.requeue_inputs.push(to_i64(rec.inputs, "inputs")?);
                    w.requeue_queue = Some(QueueKey::of(&rec));
                    continue;
                }
            };
            if let Some(r) = &result {
                w.result_ids.push(id_i);
                w.result_codes.push(i32::from(r.status_code));
                w.result_bodies.push(r.body.to_vec());
            }
            rec.status = lifecycle::checked_move(rec.status, status)?;
            if error.is_some() {
                rec.error = error;
            }
            rec.completed_at = Some(now);
            // The batch that answered: an escalation's, if it was first.
            rec.batch = Some(batch);
            rec.batch_id.clone_from(&batch_id);
            rec.lane = lane;
            w.deliveries.extend(lifecycle::delivery_for(
                &mut rec,
                result.as_ref(),
                payload,
                now_ms,
            ));
            w.done_ids.push(id_i);
            w.done_status.push(rec.status.as_str());
            w.done_error
                .push(json_opt_text(&rec.error, "request error")?);
            w.done_webhook
                .push(json_opt_text(&rec.webhook, "webhook state")?);
            w.done.push(rec);
        }
        w.write(&tx, to_i64(now, "now")?, batch_i).await?;
        tx.commit().await?;
        Ok(w.done)
    }
}

/// What one `apply_outcomes` writes, gathered per column so that each
/// table takes one statement however many members the call has.
#[derive(Default)]
struct Writes {
    requeue_ids: Vec<i64>,
    requeue_attempts: Vec<i32>,
    requeue_since: Vec<i64>,
    requeue_len: Vec<i64>,
    requeue_inputs: Vec<i64>,
    /// A batch's members all share one queue.
    requeue_queue: Option<QueueKey>,
    result_ids: Vec<i64>,
    result_codes: Vec<i32>,
    result_bodies: Vec<Vec<u8>>,
    done_ids: Vec<i64>,
    done_status: Vec<&'static str>,
    done_error: Vec<Option<String>>,
    done_webhook: Vec<Option<String>>,
    deliveries: Vec<crate::store::Delivery>,
    done: Vec<RequestRecord>,
}

impl Writes {
    async fn write(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        now: i64,
        batch: i64,
    ) -> Result<(), PgError> {
        if !self.result_ids.is_empty() {
            tx.execute(
                "INSERT INTO results (id, status_code, body) \
                 SELECT * FROM unnest($1::bigint[], $2::integer[], $3::bytea[]) \
                 ON CONFLICT (id) DO UPDATE \
                 SET status_code = EXCLUDED.status_code, body = EXCLUDED.body",
                &[&self.result_ids, &self.result_codes, &self.result_bodies],
            )
            .await?;
        }
        if !self.done_ids.is_empty() {
            // A terminal request's error and webhook change only when the
            // decision set them; its body is no longer needed.
            tx.execute(
                "UPDATE requests r SET status = u.status, completed_at = $2, batch = $6, \
                 error = coalesce(u.error::jsonb, r.error), \
                 webhook = coalesce(u.webhook::jsonb, r.webhook) \
                 FROM unnest($1::bigint[], $3::text[], $4::text[], $5::text[]) \
                     AS u(id, status, error, webhook) \
                 WHERE r.id = u.id",
                &[
                    &self.done_ids,
                    &now,
                    &self.done_status,
                    &self.done_error,
                    &self.done_webhook,
                    &batch,
                ],
            )
            .await?;
            write_deliveries(tx, &self.deliveries).await?;
            tx.execute("DELETE FROM bodies WHERE id = ANY($1)", &[&self.done_ids])
                .await?;
        }
        if let Some(qk) = &self.requeue_queue {
            tx.execute(
                "UPDATE requests r SET status = $3, batch = NULL, submitted_at = NULL, \
                 attempts = u.attempts \
                 FROM unnest($1::bigint[], $2::integer[]) AS u(id, attempts) WHERE r.id = u.id",
                &[
                    &self.requeue_ids,
                    &self.requeue_attempts,
                    &RequestStatus::Queued.as_str(),
                ],
            )
            .await?;
            tx.execute(
                "INSERT INTO queue (upstream, endpoint, model, id, enqueued_ms, line_len, inputs) \
                 SELECT $1, $2, $3, * \
                 FROM unnest($4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[])",
                &[
                    &qk.upstream,
                    &qk.endpoint.path(),
                    &qk.model,
                    &self.requeue_ids,
                    &self.requeue_since,
                    &self.requeue_len,
                    &self.requeue_inputs,
                ],
            )
            .await?;
            let by = Moved {
                count: self.requeue_ids.len() as i64,
                bytes: self.requeue_len.iter().sum(),
                inputs: self.requeue_inputs.iter().sum(),
            };
            add_to_counters(tx, qk, by).await?;
        }
        Ok(())
    }
}
