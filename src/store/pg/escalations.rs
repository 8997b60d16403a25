//! Requests escalated for their deadline out of a submitted Batch API job
//! (issue #17), as the embedded store's `escalations`: each is also sent
//! alone on a synchronous lane, in a batch of one, and stays a member of
//! its job. Its row names both (`batch`, `escalation`); the first answer
//! stored wins (see [`lifecycle::outcome_applies`](crate::store::lifecycle::outcome_applies)).

use super::PgError;
use super::batches::put_batch_in;
use super::store::{PgStore, to_i64, to_u64};
use crate::store::{BatchRecord, Lane, QueueKey, line_len};

impl PgStore {
    /// The members of `batch` still waiting on it, not yet escalated, that
    /// have a deadline: (id, deadline) each, in id order.
    pub async fn pending_deadlines(&self, batch: u64) -> Result<Vec<(u64, u64)>, PgError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, deadline_at FROM requests \
                 WHERE batch = $1 AND status = 'submitted' AND escalation IS NULL \
                 AND deadline_at IS NOT NULL ORDER BY id",
                &[&to_i64(batch, "batch id")?],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    to_u64(row.try_get(0)?, "request id")?,
                    to_u64(row.try_get(1)?, "deadline_at")?,
                ))
            })
            .collect()
    }

    /// Sends request `id`, a member of the submitted `batch`, also on
    /// `lane`: a new batch of one, named in the request's row as its
    /// escalation, in one transaction while `fence` is still the newest.
    /// `None` when the request is no longer waiting on `batch`, was
    /// escalated already (a request is escalated once), or another node
    /// owns the upstream now.
    pub async fn escalate_submitted_fenced(
        &self,
        batch: u64,
        id: u64,
        lane: Lane,
        reason: &str,
        (lease, token): (&str, u64),
    ) -> Result<Option<BatchRecord>, PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if !super::leases::fence_in(&tx, lease, token).await? {
            return Ok(None);
        }
        let id_i = to_i64(id, "request id")?;
        let Some(row) = tx
            .query_opt(
                "SELECT upstream, endpoint, model, body_len FROM requests \
                 WHERE id = $1 AND batch = $2 AND status = 'submitted' \
                 AND escalation IS NULL FOR UPDATE",
                &[&id_i, &to_i64(batch, "batch id")?],
            )
            .await?
        else {
            return Ok(None);
        };
        let endpoint = super::queues::endpoint_from(row.try_get(1)?)?;
        let qk = QueueKey {
            upstream: row.try_get(0)?,
            endpoint,
            model: row.try_get(2)?,
        };
        let len = line_len(endpoint, id, to_u64(row.try_get(3)?, "body length")?);
        let one_i: i64 = tx
            .query_one("SELECT nextval('ferry_ids')", &[])
            .await?
            .try_get(0)?;
        let one = BatchRecord {
            lane,
            ..BatchRecord::claimed(to_u64(one_i, "batch id")?, &qk, 1, len, reason)
        };
        put_batch_in(&tx, &one).await?;
        tx.execute(
            "INSERT INTO members (batch, id) VALUES ($1, $2)",
            &[&one_i, &id_i],
        )
        .await?;
        tx.execute(
            "UPDATE requests SET escalation = $1 WHERE id = $2",
            &[&one_i, &id_i],
        )
        .await?;
        tx.commit().await?;
        Ok(Some(one))
    }

    /// Whether `id` is in `batch` or escalated into it.
    pub async fn holds(&self, batch: u64, id: u64) -> Result<bool, PgError> {
        let client = self.client().await?;
        let batch = to_i64(batch, "batch id")?;
        let row = client
            .query_opt(
                "SELECT 1 FROM requests WHERE id = $1 AND (batch = $2 OR escalation = $2)",
                &[&to_i64(id, "request id")?, &batch],
            )
            .await?;
        Ok(row.is_some())
    }
}
