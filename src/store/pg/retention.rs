//! Retention on PostgreSQL: terminal requests past their time, and the
//! finished batch records they leave without members, deleted in bounded
//! slices, oldest first.
//!
//! Each slice is one transaction for its requests (rows, results, bodies:
//! all gone or none) and one for its batches. Rows are taken with
//! `FOR UPDATE SKIP LOCKED`, so several nodes purging at once take
//! disjoint slices and never wait on each other.

use super::PgError;
use super::store::{PgStore, from_json, status_from, to_i64, to_u64};
use crate::store::lifecycle::{self, BatchVerdict, Retention};
use crate::store::{BatchRecord, PurgeReport};

/// Finished batches one slice reads beyond its row bound: batches skipped
/// (still owing an upstream delete) are read again each slice.
const BATCH_LOOKS: usize = 64;

impl PgStore {
    /// One purge slice at `now`: at most `policy.slice_rows` requests past
    /// `terminal_secs`, oldest first, then batch records left without
    /// members. Committed when it returns.
    pub async fn purge_slice(&self, policy: &Retention, now: u64) -> Result<PurgeReport, PgError> {
        let rows = policy.slice_rows.max(1);
        let mut report = self.purge_requests(policy.record_cutoff(now), rows).await?;
        let (batches, more) = self.purge_batches(rows).await?;
        report.batches = batches;
        report.more |= more;
        Ok(report)
    }

    async fn purge_requests(&self, cutoff: u64, rows: usize) -> Result<PurgeReport, PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // A request still owed a webhook keeps its row (and so its outbox
        // entry) until the delivery is finished, whatever its age.
        let found = tx
            .query(
                "SELECT id, status, completed_at FROM requests r \
                 WHERE completed_at < $1 \
                   AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.id = r.id) \
                 ORDER BY completed_at, id LIMIT $2 \
                 FOR UPDATE SKIP LOCKED",
                &[
                    &to_i64(cutoff, "retention cutoff")?,
                    &to_i64(rows as u64, "slice rows")?,
                ],
            )
            .await?;
        let mut ids = Vec::with_capacity(found.len());
        for row in &found {
            let completed_at: Option<i64> = row.try_get(2)?;
            let completed_at = completed_at
                .map(|at| to_u64(at, "completed_at"))
                .transpose()?;
            if lifecycle::request_purgeable(
                status_from(row.try_get(1)?)?,
                completed_at,
                cutoff,
                false,
            ) {
                ids.push(row.try_get::<_, i64>(0)?);
            }
        }
        if ids.is_empty() {
            return Ok(PurgeReport::default());
        }
        let results = tx
            .execute("DELETE FROM results WHERE id = ANY($1)", &[&ids])
            .await?;
        let bodies = tx
            .execute("DELETE FROM bodies WHERE id = ANY($1)", &[&ids])
            .await?;
        let requests = tx
            .execute("DELETE FROM requests WHERE id = ANY($1)", &[&ids])
            .await?;
        tx.commit().await?;
        Ok(PurgeReport {
            requests,
            results,
            bodies,
            batches: 0,
            more: found.len() == rows,
        })
    }

    /// Deletes finished batch records, oldest first, that no kept request
    /// names any more, with their member rows; stops at the first one a
    /// request still names. Returns how many went and whether it filled
    /// its slice.
    async fn purge_batches(&self, rows: usize) -> Result<(u64, bool), PgError> {
        let limit = rows + BATCH_LOOKS;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let found = tx
            .query(
                "SELECT b.id, b.record::text, \
                        EXISTS (SELECT 1 FROM requests r WHERE r.batch = b.id) \
                 FROM batches b WHERE NOT b.live \
                 ORDER BY b.id LIMIT $1 \
                 FOR UPDATE OF b SKIP LOCKED",
                &[&to_i64(limit as u64, "slice rows")?],
            )
            .await?;
        let mut doomed: Vec<i64> = Vec::new();
        for row in &found {
            let b: BatchRecord = from_json(row.try_get(1)?, "batch")?;
            match lifecycle::batch_verdict(&b.state, row.try_get(2)?) {
                BatchVerdict::Purge => doomed.push(row.try_get(0)?),
                BatchVerdict::Skip => {}
                BatchVerdict::Stop => break,
            }
            if doomed.len() == rows {
                break;
            }
        }
        if doomed.is_empty() {
            return Ok((0, false));
        }
        tx.execute("DELETE FROM members WHERE batch = ANY($1)", &[&doomed])
            .await?;
        let n = tx
            .execute("DELETE FROM batches WHERE id = ANY($1)", &[&doomed])
            .await?;
        tx.commit().await?;
        // Only a full slice says more is due: batches skipped (owing an
        // upstream delete) are no reason to come back at once.
        Ok((n, doomed.len() == rows))
    }

    /// When the oldest terminal request still kept finished (unix seconds).
    pub async fn oldest_terminal(&self) -> Result<Option<u64>, PgError> {
        let client = self.client().await?;
        let oldest: Option<i64> = client
            .query_one(
                "SELECT min(completed_at) FROM requests WHERE completed_at IS NOT NULL",
                &[],
            )
            .await?
            .try_get(0)?;
        oldest.map(|at| to_u64(at, "completed_at")).transpose()
    }
}
