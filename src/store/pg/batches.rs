//! Batch records, their members, and the members' steps that follow the
//! batch's (claimed → submitted).

use deadpool_postgres::Transaction;

use super::PgError;
use super::store::{PgStore, from_json, json_text, to_i64, to_u64};
use crate::store::{BatchRecord, BatchState, now_secs};

/// Writes (or overwrites) a batch row. Each column beside `record` is
/// derived from it here, the one place batches are written.
const PUT_BATCH: &str = "INSERT INTO batches \
     (id, upstream, live, upstream_batch_id, upstream_objects, record) \
     VALUES ($1, $2, $3, $4, $5, $6::text::jsonb) \
     ON CONFLICT (id) DO UPDATE SET upstream = EXCLUDED.upstream, live = EXCLUDED.live, \
     upstream_batch_id = EXCLUDED.upstream_batch_id, \
     upstream_objects = EXCLUDED.upstream_objects, record = EXCLUDED.record";

impl PgStore {
    pub async fn put_batch(&self, b: &BatchRecord) -> Result<(), PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        put_batch_in(&tx, b).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn get_batch(&self, id: u64) -> Result<Option<BatchRecord>, PgError> {
        let client = self.client().await?;
        client
            .query_opt(
                "SELECT record::text FROM batches WHERE id = $1",
                &[&to_i64(id, "batch id")?],
            )
            .await?
            .map(|row| batch_from(&row))
            .transpose()
    }

    /// Every node's batches not yet done, in id order.
    pub async fn live_batches(&self) -> Result<Vec<BatchRecord>, PgError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT record::text FROM batches WHERE live ORDER BY id",
                &[],
            )
            .await?;
        rows.iter().map(batch_from).collect()
    }

    /// Finished batches of an upstream whose upstream files are not all
    /// deleted (a done batch's upstream objects are its `cleanup`).
    pub async fn batches_owing_cleanup(&self, upstream: &str) -> Result<Vec<BatchRecord>, PgError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT record::text FROM batches WHERE upstream = $1 AND NOT live \
                 AND cardinality(upstream_objects) > 0 ORDER BY id",
                &[&upstream],
            )
            .await?;
        rows.iter().map(batch_from).collect()
    }

    /// Member ids of a batch, in id (arrival) order.
    pub async fn members(&self, batch: u64) -> Result<Vec<u64>, PgError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id FROM members WHERE batch = $1 ORDER BY id",
                &[&to_i64(batch, "batch id")?],
            )
            .await?;
        rows.iter()
            .map(|row| to_u64(row.try_get(0)?, "member id"))
            .collect()
    }

    /// Records the upstream batch and moves every member to `submitted`,
    /// in one transaction, while `fence` (a lease and its token) is still
    /// the newest; returns whether it was written.
    pub async fn mark_submitted_fenced(
        &self,
        batch: &mut BatchRecord,
        file_id: &str,
        batch_id: &str,
        (lease, token): (&str, u64),
    ) -> Result<bool, PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if !super::leases::fence_in(&tx, lease, token).await? {
            return Ok(false);
        }
        batch.state = BatchState::Submitted {
            file_id: file_id.to_owned(),
            batch_id: batch_id.to_owned(),
        };
        put_batch_in(&tx, batch).await?;
        apply_submitted_in(&tx, batch.id).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Moves the batch's members still `queued` in it to `submitted`,
    /// counting the attempt. Idempotent: recovery may run it again.
    pub async fn apply_submitted(&self, batch: u64) -> Result<(), PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        apply_submitted_in(&tx, batch).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The embedded store finishes here claims a crash cut short; on
    /// PostgreSQL a claim is one transaction, so none is ever half-written
    /// and nothing is repaired. Returns, as the embedded store does, the
    /// number of batches still `Claimed` (every node's: their drivers
    /// resume them).
    pub async fn recover_claims(&self) -> Result<usize, PgError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT record::text FROM batches WHERE live", &[])
            .await?;
        let mut n = 0;
        for row in &rows {
            if batch_from(row)?.state == BatchState::Claimed {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Whether `id` is one of the cluster's own upstream files or batches
    /// that may still exist upstream (any node's). The proxy refuses
    /// tenants access to these, so a database error answers `true`: refusing
    /// a passthrough call is safe, exposing every tenant's prompts is not.
    pub async fn is_own_upstream_object(&self, id: &str) -> bool {
        let asked = async {
            let client = self.client().await?;
            let row = client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM batches WHERE upstream_objects @> ARRAY[$1])",
                    &[&id],
                )
                .await?;
            Ok::<bool, PgError>(row.try_get(0)?)
        };
        asked.await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot tell whether an upstream object is Ferry's; refusing it");
            true
        })
    }
}

/// Writes `b` inside `tx`.
pub(super) async fn put_batch_in(tx: &Transaction<'_>, b: &BatchRecord) -> Result<(), PgError> {
    let params = BatchRow::of(b)?;
    tx.execute(
        PUT_BATCH,
        &[
            &params.id,
            &b.upstream,
            &b.is_live(),
            &params.upstream_batch_id,
            &params.objects,
            &params.record,
        ],
    )
    .await?;
    Ok(())
}

/// The values of a batch row that are not the record's own fields.
struct BatchRow {
    id: i64,
    upstream_batch_id: Option<String>,
    objects: Vec<String>,
    record: String,
}

impl BatchRow {
    fn of(b: &BatchRecord) -> Result<BatchRow, PgError> {
        Ok(BatchRow {
            id: to_i64(b.id, "batch id")?,
            upstream_batch_id: upstream_batch_id(&b.state),
            objects: b.upstream_objects(),
            record: json_text(b, "batch")?,
        })
    }
}

/// The upstream's id for a batch, once it exists (what requests' reads
/// show as `batch_id`).
fn upstream_batch_id(state: &BatchState) -> Option<String> {
    match state {
        BatchState::Submitted { batch_id, .. } => Some(batch_id.clone()),
        BatchState::Done { batch_id, .. } => batch_id.clone(),
        BatchState::Claimed | BatchState::Uploaded { .. } => None,
    }
}

fn batch_from(row: &tokio_postgres::Row) -> Result<BatchRecord, PgError> {
    from_json(row.try_get(0)?, "batch")
}

async fn apply_submitted_in(tx: &Transaction<'_>, batch: u64) -> Result<(), PgError> {
    tx.execute(
        "UPDATE requests SET status = 'submitted', submitted_at = $2, attempts = attempts + 1 \
         WHERE batch = $1 AND status = 'queued'",
        &[&to_i64(batch, "batch id")?, &to_i64(now_secs(), "now")?],
    )
    .await?;
    Ok(())
}
