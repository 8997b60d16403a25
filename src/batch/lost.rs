//! A submitted batch the upstream no longer knows. A `404` on Ferry's own
//! batch id means this key cannot see the batch any more: it was deleted, or
//! it belongs to another project or base_url (a rotated key, a changed
//! config). Polling it forever would hold its requests forever, so after
//! `lost_after_secs` of nothing but `404`s the batch is given up: its
//! members go back to their queue (counting an attempt), or fail with
//! `batch_lost` once `max_attempts` is spent.
//!
//! Re-sending is safe for the results: each line's `custom_id` is the Ferry
//! request's own id, and the lost batch's output is never read, so no answer
//! can be attributed to the wrong request. What it risks is running a
//! request twice, if the batch still runs where this key cannot see it;
//! `lost_after_secs` trades that risk against waiting (README, "Failure
//! handling").

use std::sync::Arc;
use std::time::Duration;

use tracing::error;

use super::{Ingest, StepError, advance, delete_upstream_files, member_ids};
use crate::App;
use crate::store::{BatchRecord, BatchState, Outcome, RequestError};

/// Whether a batch answered `404` since `missing_since` (unix millis, the
/// first of an unbroken run) is lost at `now`.
pub fn is_lost(missing_since: u64, now: u64, lost_after: Duration) -> bool {
    u128::from(now.saturating_sub(missing_since)) >= lost_after.as_millis()
}

/// Gives a lost batch up: members back to their queue or failed, the batch
/// recorded `done` with upstream status `lost`, its input file's delete
/// attempted. Outcomes are stored before `done`, so a crash in between
/// loses the batch again at the next start (re-applying is harmless).
pub(super) async fn lose_batch(
    app: &Arc<App>,
    up: &crate::Upstream,
    batch: &mut BatchRecord,
    file_id: &str,
    batch_id: &str,
) -> Result<(), StepError> {
    let missing_for = batch
        .missing_since
        .map(|t| crate::store::now_millis().saturating_sub(t) / 1000);
    error!(
        ferry_batch = batch.id, upstream = %batch.upstream, model = %batch.model, batch_id,
        missing_for_secs = missing_for, requests = batch.request_count,
        "the upstream no longer knows this batch (404 for lost_after_secs); it is lost, its requests are sent again"
    );
    let members = member_ids(app, batch.id).await?;
    let error = RequestError {
        code: "batch_lost".into(),
        message: "the upstream stopped knowing this request's batch (404 for lost_after_secs) \
                  and the request has been sent in max_attempts batches"
            .into(),
    };
    let mut ingest = Ingest::new(app, up, batch);
    for id in members {
        let outcome = Outcome::Retry {
            error: error.clone(),
            max_attempts: up.settings.max_attempts,
        };
        ingest.add(id, outcome).await?;
    }
    ingest.apply().await?;
    advance(app, batch, |b| {
        b.state = BatchState::Done {
            file_id: Some(file_id.to_owned()),
            batch_id: Some(batch_id.to_owned()),
            upstream_status: "lost".into(),
            cleanup: vec![file_id.to_owned()],
        };
    })
    .await?;
    app.metrics
        .batches
        .with_label_values(&[&batch.upstream, "lost"])
        .inc();
    delete_upstream_files(app, up, batch).await;
    // Re-queued members need a flush loop that knows about them.
    up.wake.notify_one();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_only_after_the_whole_bound() {
        let bound = Duration::from_secs(6 * 3600);
        let t = 1_700_000_000_000;
        assert!(!is_lost(t, t, bound));
        assert!(!is_lost(t, t + 6 * 3600 * 1000 - 1, bound));
        assert!(is_lost(t, t + 6 * 3600 * 1000, bound));
        // A clock that went back does not lose anything.
        assert!(!is_lost(t, t - 1000, bound));
    }
}
