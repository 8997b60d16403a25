//! The webhook outbox, shared by the nodes: a delivery is written in the
//! transaction that makes its request terminal (its payload fixed then),
//! and a node sends it only while it holds the row's lease, so two nodes
//! never send one delivery at once. A node that dies while sending loses
//! the lease when it runs out (database clock), and another node takes the
//! delivery again: webhooks are sent at least once.

use deadpool_postgres::Transaction;

use super::PgError;
use super::store::{PgStore, from_json, json_opt_text, json_text, to_i64, to_u64};
use crate::store::{Delivery, WebhookState, WebhookStatus};

impl PgStore {
    /// Takes up to `max` deliveries due by `now_ms` (this node's clock, as
    /// `due_ms` is written) that no node holds, leasing each to this node
    /// for the delivery lease. Each must come back through
    /// [`reschedule_delivery`](Self::reschedule_delivery),
    /// [`retry_delivery`](Self::retry_delivery) or
    /// [`finish_delivery`](Self::finish_delivery); one that does not is
    /// taken again once its lease has run out. Oldest due first.
    pub async fn take_due_deliveries(
        &self,
        now_ms: u64,
        max: usize,
    ) -> Result<Vec<Delivery>, PgError> {
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        // A bound past bigint's range (`u64::MAX`: "whatever is due") is
        // every time there is.
        let now_ms = i64::try_from(now_ms).unwrap_or(i64::MAX);
        let client = self.client().await?;
        let rows = client
            .query(
                "UPDATE outbox o SET lease_owner = $3, \
                     lease_until = now() + $4::float8 * interval '1 millisecond' \
                 FROM (SELECT id FROM outbox \
                       WHERE due_ms <= $1 AND (lease_until IS NULL OR lease_until <= now()) \
                       ORDER BY due_ms, id LIMIT $2 FOR UPDATE SKIP LOCKED) t \
                 WHERE o.id = t.id RETURNING o.delivery::text",
                &[
                    &now_ms,
                    &limit,
                    &self.owner,
                    &(self.delivery_lease.as_millis() as f64),
                ],
            )
            .await?;
        let mut taken = rows
            .iter()
            .map(|row| from_json::<Delivery>(row.try_get(0)?, "delivery"))
            .collect::<Result<Vec<_>, _>>()?;
        taken.sort_by_key(|d| (d.due_ms, d.request));
        Ok(taken)
    }

    /// Frees every delivery this node's name holds: at start, when nothing
    /// is being sent yet, so a node restarted on its data_dir does not wait
    /// out the leases of its previous run. Returns how many it freed.
    pub async fn release_own_deliveries(&self) -> Result<u64, PgError> {
        let client = self.client().await?;
        Ok(client
            .execute(
                "UPDATE outbox SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
                &[&self.owner],
            )
            .await?)
    }

    /// Gives a taken delivery back without a try (its receiver is busy),
    /// due at `due_ms`. Nothing changes if this node no longer holds it.
    pub async fn reschedule_delivery(&self, d: &Delivery, due_ms: u64) -> Result<(), PgError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE outbox SET due_ms = $2, lease_owner = NULL, lease_until = NULL \
                 WHERE id = $1 AND lease_owner = $3",
                &[
                    &to_i64(d.request, "request id")?,
                    &to_i64(due_ms, "due time")?,
                    &self.owner,
                ],
            )
            .await?;
        Ok(())
    }

    /// Records a failed try and gives the delivery back, due at `d.due_ms`.
    /// If this node's lease ran out and another node took the delivery,
    /// that node's tries count, not this one's: nothing changes.
    pub async fn retry_delivery(&self, d: &Delivery, state: WebhookState) -> Result<(), PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let id = to_i64(d.request, "request id")?;
        let held = tx
            .execute(
                "UPDATE outbox SET delivery = $2::text::jsonb, due_ms = $3, \
                     lease_owner = NULL, lease_until = NULL \
                 WHERE id = $1 AND lease_owner = $4",
                &[
                    &id,
                    &json_text(d, "delivery")?,
                    &to_i64(d.due_ms, "due time")?,
                    &self.owner,
                ],
            )
            .await?;
        if held == 1 {
            set_webhook_state(&tx, id, &state).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Ends a delivery: delivered, or dead after its retries ran out. A
    /// delivery that reached its receiver is done whoever holds it now.
    pub async fn finish_delivery(
        &self,
        d: &Delivery,
        status: WebhookStatus,
        last_error: Option<String>,
    ) -> Result<(), PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let id = to_i64(d.request, "request id")?;
        let state = WebhookState {
            status,
            attempts: d.attempts,
            last_error,
        };
        set_webhook_state(&tx, id, &state).await?;
        tx.execute("DELETE FROM outbox WHERE id = $1", &[&id])
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// When the next delivery falls due (this node's clock, millis): the
    /// earliest `due_ms`, or for one a node holds, when its lease runs out.
    pub async fn next_delivery_due(&self) -> Result<Option<u64>, PgError> {
        let client = self.client().await?;
        let due: Option<i64> = client
            .query_one(
                "SELECT min(greatest(due_ms, \
                     coalesce((extract(epoch FROM lease_until) * 1000)::bigint, 0))) \
                 FROM outbox",
                &[],
            )
            .await?
            .try_get(0)?;
        due.map(|d| to_u64(d, "due time")).transpose()
    }

    pub async fn outbox_len(&self) -> Result<usize, PgError> {
        let client = self.client().await?;
        let n: i64 = client
            .query_one("SELECT count(*) FROM outbox", &[])
            .await?
            .try_get(0)?;
        usize::try_from(n).map_err(|_| PgError::Corrupt(format!("outbox length {n}")))
    }
}

/// Adds deliveries just owed, inside the transaction that made their
/// requests terminal. A request becomes terminal once; a row already there
/// is replaced, as the embedded store's insert does.
pub(super) async fn write_deliveries(
    tx: &Transaction<'_>,
    deliveries: &[Delivery],
) -> Result<(), PgError> {
    if deliveries.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(deliveries.len());
    let mut due = Vec::with_capacity(deliveries.len());
    let mut json = Vec::with_capacity(deliveries.len());
    for d in deliveries {
        ids.push(to_i64(d.request, "request id")?);
        due.push(to_i64(d.due_ms, "due time")?);
        json.push(json_text(d, "delivery")?);
    }
    tx.execute(
        "INSERT INTO outbox (id, due_ms, delivery) \
         SELECT u.id, u.due_ms, u.delivery::jsonb \
         FROM unnest($1::bigint[], $2::bigint[], $3::text[]) AS u(id, due_ms, delivery) \
         ON CONFLICT (id) DO UPDATE SET due_ms = EXCLUDED.due_ms, \
             delivery = EXCLUDED.delivery, lease_owner = NULL, lease_until = NULL",
        &[&ids, &due, &json],
    )
    .await?;
    Ok(())
}

async fn set_webhook_state(
    tx: &Transaction<'_>,
    id: i64,
    state: &WebhookState,
) -> Result<(), PgError> {
    tx.execute(
        "UPDATE requests SET webhook = $2::text::jsonb WHERE id = $1",
        &[&id, &json_opt_text(&Some(state), "webhook state")?],
    )
    .await?;
    Ok(())
}
