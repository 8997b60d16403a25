//! The retention purge, in the background: slices of finished work past
//! `[retention]` removed one after another while some are due, then a
//! pause of `retention.interval_secs`. Each slice is bounded
//! (`retention.slice_rows`), so intake and lookups never wait long behind
//! it; each is durable, and whole, when the store returns, so a crash
//! loses at most the slice in flight and the next start carries on.
//! Several nodes on one PostgreSQL may purge at once (see the store).
//! Beside it, the census of what the store holds, by kind of data.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::App;
use crate::metrics::gauge_value;
use crate::store::{PurgeReport, now_secs};

/// The pause between two full slices: the disk (sled's group commit, the
/// database) goes to intake in between.
const BETWEEN_SLICES: Duration = Duration::from_millis(20);

/// Runs until `shutdown`; a slice in flight is finished first (the store
/// call is not cancelled midway by the shutdown, only the wait after it).
pub async fn run(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let settings = app.config.retention;
    let policy = settings.policy();
    loop {
        let pause = match purge_once(&app, policy).await {
            Some(report) if report.more => BETWEEN_SLICES,
            _ => settings.interval,
        };
        publish_oldest(&app).await;
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One slice, timed and counted; `None` if it failed (logged: the next
/// pass tries again, and nothing was half-removed).
async fn purge_once(app: &App, policy: crate::store::lifecycle::Retention) -> Option<PurgeReport> {
    let started = Instant::now();
    let outcome = app.store.purge_slice(policy, now_secs()).await;
    app.metrics
        .retention_slice_duration
        .observe(started.elapsed().as_secs_f64());
    match outcome {
        Ok(report) => {
            for (kind, rows) in report.by_kind() {
                app.metrics
                    .retention_purged
                    .with_label_values(&[kind])
                    .inc_by(rows);
            }
            if report.requests + report.batches > 0 {
                tracing::debug!(
                    requests = report.requests,
                    batches = report.batches,
                    took_ms = started.elapsed().as_millis() as u64,
                    "purged finished work past its retention"
                );
            }
            Some(report)
        }
        Err(e) => {
            tracing::warn!(error = %e, "a retention purge slice failed; retrying at the next pass");
            None
        }
    }
}

/// Counts what the store holds, by kind, every `retention.census_secs`,
/// into `ferry_storage_rows` and `ferry_storage_kind_bytes`. On sled it
/// walks every tree in bounded chunks, a cost that follows what retention
/// keeps (hence the long default period).
pub async fn census_loop(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let started = Instant::now();
        match app.store.census().await {
            Ok(census) => {
                for (kind, tally) in census {
                    let label = [kind.as_str()];
                    let m = &app.metrics;
                    m.storage_rows
                        .with_label_values(&label)
                        .set(gauge_value(tally.rows));
                    m.storage_kind_bytes
                        .with_label_values(&label)
                        .set(gauge_value(tally.bytes));
                }
                tracing::debug!(
                    took_ms = started.elapsed().as_millis() as u64,
                    "store census taken"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot count what the store holds; retrying at the next census")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(app.config.retention.census) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn publish_oldest(app: &App) {
    match app.store.oldest_terminal().await {
        Ok(oldest) => {
            let age = oldest.map_or(0, |at| now_secs().saturating_sub(at));
            app.metrics
                .retention_oldest_terminal_age
                .set(gauge_value(age));
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the oldest terminal request's age"),
    }
}
