//! From queue to batch and back: the flush loop of each upstream, and one
//! driver task per batch that walks it through its recorded states
//! (claimed → uploaded → submitted → done). Each state is stored, durably,
//! before the upstream call that follows it and before the driver acts on
//! it, so a restart (or a failed write) resumes from the last state on disk.

pub mod adopt;
#[cfg(test)]
mod driver_tests;
pub mod escalate;
pub mod events;
pub mod ingest;
pub mod jsonl;
pub mod lanes;
pub mod latency;
pub mod lost;
pub mod ownership;
pub mod policy;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::App;
use crate::store::space::Need;
use crate::store::{BatchRecord, BatchState, Outcome, QueueKey, RequestError, now_millis};
use crate::upstream::{BatchObject, UpstreamError, with_retry};
use policy::{
    FlushPolicy, FlushReason, deadline_flush, flush_at_ms, flush_reason, time_to_deadline,
};

/// Upstream calls are retried this many times before a step is tried anew
/// from the top of the driver loop (which waits and retries forever: a
/// claimed request is never dropped because the upstream is down).
const STEP_ATTEMPTS: u32 = 8;
/// Applied outcomes are written in slices of this many.
const OUTCOME_CHUNK: usize = 2_000;

/// The longest the flush loop sleeps without looking at its queues.
const MAX_IDLE: Duration = Duration::from_secs(1);
/// How often a finished batch waiting for room looks again.
const ROOM_RECHECK: Duration = Duration::from_millis(500);

/// Runs the flush loop of one upstream until shutdown.
pub async fn run_flusher(app: Arc<App>, upstream: usize, mut shutdown: watch::Receiver<bool>) {
    let up = &app.upstreams[upstream];
    let policy = FlushPolicy {
        max_requests: up.settings.max_requests,
        max_bytes: up.settings.max_bytes,
        max_wait: up.settings.max_wait,
        max_inputs: u64::MAX,
    };
    let renew_every = ownership::renew_every(app.config.storage.lease());
    let mut renewed: Option<(Instant, Option<u64>)> = None;
    let mut withheld = escalate::Withheld::new();
    loop {
        let mut sleep = MAX_IDLE.min(renew_every);
        // A node shutting down hands its upstreams over as soon as their
        // drivers stop: look each time it is woken.
        let leaving = app.store.is_shared() && app.is_shutting_down();
        let token = match renewed {
            Some((at, token)) if at.elapsed() < renew_every && !leaving => token,
            _ => {
                let token = ownership::renew(&app, upstream, &shutdown).await;
                renewed = Some((Instant::now(), token));
                token
            }
        };
        let Some(token) = token else {
            // Another node flushes this upstream; look again at renewal
            // (or, handing it over, when a driver stops).
            tokio::select! {
                _ = tokio::time::sleep(renew_every) => {}
                _ = up.wake.notified(), if leaving => {}
                _ = shutdown.changed() => return,
            }
            continue;
        };
        let manual = up
            .manual_flush
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        let queues = match app.store.queue_stats().await {
            Ok(q) => q,
            Err(e) => {
                warn!(upstream = %up.settings.name, error = %e, "cannot read the queues; will retry");
                Vec::new()
            }
        };
        app.publish_queue_metrics(&up.settings.name, &queues);
        // Published at zero just now: empty queues' counts may go.
        app.store.prune_idle_queues(&up.settings.name);
        let due = escalate::scan(&app, up, now_millis(), &withheld).await;
        let earliest = escalate::earliest_by_queue(&due);
        for (qk, stats) in queues {
            if qk.upstream != up.settings.name {
                continue;
            }
            if up.flushes_paused() && !manual {
                continue;
            }
            let now = now_millis();
            let policy = policy.for_endpoint(qk.endpoint);
            let for_deadline = earliest.get(&qk).is_some_and(|at| {
                deadline_flush(
                    now,
                    *at,
                    flush_at_ms(&stats, &policy),
                    up.settings.lane_priors.batch,
                )
            });
            let reason = flush_reason(&stats, &policy, now)
                .or((manual && stats.count > 0).then_some(FlushReason::Manual))
                .or(for_deadline.then_some(FlushReason::Deadline));
            match reason {
                Some(reason) => flush_queue(&app, &qk, &policy, reason, token, &shutdown).await,
                None => {
                    if let Some(d) = time_to_deadline(&stats, &policy, now) {
                        sleep = sleep.min(d);
                    }
                }
            }
        }
        if let Some(d) =
            escalate::escalate_due(&app, up, due, &mut withheld, token, &shutdown).await
        {
            sleep = sleep.min(d);
        }
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = up.wake.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Claims batches from a queue while its threshold holds, and starts a
/// driver for each.
async fn flush_queue(
    app: &Arc<App>,
    qk: &QueueKey,
    policy: &FlushPolicy,
    mut reason: FlushReason,
    token: u64,
    shutdown: &watch::Receiver<bool>,
) {
    let mut shutdown = shutdown.clone();
    let Some(up) = app.upstream_named(&qk.upstream) else {
        return;
    };
    let lease = ownership::lease_name(&qk.upstream);
    loop {
        if !up.ownership.holds(token) {
            return;
        }
        // The claim returns once it is durable: no upstream call for a claim
        // that is not on disk, or after a crash its members would be queued
        // again and sent twice. At shutdown it is left to recovery.
        let claimed = tokio::select! {
            claimed = app.store.claim_batch(qk, policy.max_requests, policy.max_bytes, reason.as_str(), (&lease, token)) => claimed,
            _ = shutdown.changed() => return,
        };
        let batch = match claimed {
            Ok(Some(b)) => b,
            Ok(None) => return,
            // The space guard has said so once; the queue waits, intact.
            Err(e @ crate::store::StoreError::LowSpace { .. }) => {
                return tracing::debug!(upstream = %qk.upstream, model = %qk.model, error = %e, "no room to claim a batch");
            }
            Err(e) => {
                error!(upstream = %qk.upstream, model = %qk.model, error = %e, "cannot claim a batch");
                return;
            }
        };
        if *shutdown.borrow() {
            return;
        }
        info!(
            ferry_batch = batch.id, upstream = %batch.upstream, model = %batch.model,
            requests = batch.request_count, bytes = batch.bytes, reason = reason.as_str(),
            "queue flushed into a batch"
        );
        app.metrics
            .flushes
            .with_label_values(&[&qk.upstream, reason.as_str()])
            .inc();
        app.metrics.batch_size.observe(batch.request_count as f64);
        spawn_driver(app.clone(), batch, false, shutdown.clone());
        // Keep going while what is left still meets a threshold (a queue of
        // 120,000 at 50,000 per batch becomes three batches).
        match app
            .store
            .queue_stats_for(qk)
            .await
            .ok()
            .flatten()
            .and_then(|s| flush_reason(&s, policy, now_millis()))
        {
            Some(r) => reason = r,
            None => return,
        }
    }
}

/// Moves `batch` on by `change`: the changed record is stored and made
/// durable first, and only then becomes the driver's record. A failed write
/// leaves the driver on the last durable state, which it retries from
/// (looking upstream before acting), so no upstream call ever follows a
/// state that is not on disk.
async fn advance(
    app: &App,
    batch: &mut BatchRecord,
    change: impl FnOnce(&mut BatchRecord),
) -> Result<(), StepError> {
    let mut next = batch.clone();
    change(&mut next);
    let (lease, token) = fence(app, &next.upstream)?;
    if !app.store.put_batch_fenced(&next, &lease, token).await? {
        return Err(StepError::NotOwner);
    }
    *batch = next;
    Ok(())
}

/// The lease and token a write to a batch of `upstream` must carry: this
/// node's, while it owns the upstream.
fn fence(app: &App, upstream: &str) -> Result<(String, u64), StepError> {
    let token = app
        .upstream_named(upstream)
        .and_then(|up| up.ownership.token())
        .ok_or(StepError::NotOwner)?;
    Ok((ownership::lease_name(upstream), token))
}

/// A batch's member ids, in member (line) order.
async fn member_ids(app: &App, batch: u64) -> Result<Vec<u64>, crate::store::StoreError> {
    app.store.members(batch).await
}

/// Starts a driver for `batch`, unless one runs on this node already or
/// this node does not own the batch's upstream.
pub fn spawn_driver(
    app: Arc<App>,
    batch: BatchRecord,
    resumed: bool,
    shutdown: watch::Receiver<bool>,
) {
    let Some(up) = app.upstream_named(&batch.upstream) else {
        return error!(ferry_batch = batch.id, upstream = %batch.upstream, "batch names an upstream that is no longer configured; leaving it");
    };
    let Some(token) = up.ownership.token() else {
        return;
    };
    if !up.ownership.start_driving(batch.id) {
        return;
    }
    app.metrics.live_batches.inc();
    tokio::spawn(async move {
        let (id, upstream) = (batch.id, batch.upstream.clone());
        drive(&app, batch, resumed, token, shutdown.clone()).await;
        app.metrics.live_batches.dec();
        tracing::debug!(ferry_batch = id, "batch driver stopped");
        let Some(up) = app.upstream_named(&upstream) else {
            return;
        };
        up.ownership.stop_driving(id);
        if app.is_shutting_down() {
            // A hand-over waits for the drivers: tell it this one stopped.
            up.wake.notify_one();
        }
        if !*shutdown.borrow() && up.ownership.token().is_some_and(|t| t != token) {
            // The node lost the upstream and won it back while this driver
            // ran: the resume at that gain skipped the batch (it had a
            // driver), so it carries on from its stored state.
            match app.store.get_batch(id).await {
                Ok(Some(b)) if !matches!(b.state, BatchState::Done { .. }) => {
                    spawn_driver(app.clone(), b, true, shutdown);
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(ferry_batch = id, error = %e, "cannot reload a batch to resume it; the next takeover does")
                }
            }
        }
    });
}

/// Walks one batch to `done`. Returns early on shutdown; the recorded state
/// lets the next start carry on.
async fn drive(
    app: &Arc<App>,
    mut batch: BatchRecord,
    mut resumed: bool,
    token: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(up) = app.upstream_named(&batch.upstream) else {
        return;
    };
    let mut failures = 0u32;
    loop {
        if *shutdown.borrow() {
            return;
        }
        if !up.ownership.holds(token) {
            // The node that owns the upstream now resumes the batch from
            // its last stored state.
            return info!(
                ferry_batch = batch.id,
                "this node no longer owns the batch's upstream; leaving the batch to its owner"
            );
        }
        let step = match batch.state.clone() {
            // A request escalated for its deadline: a synchronous call.
            BatchState::Claimed if !batch.lane.is_batch() => {
                escalate::send(app, up, &mut batch, &mut shutdown).await
            }
            BatchState::Claimed => upload(app, up, &mut batch, resumed, &shutdown).await,
            BatchState::Uploaded { file_id } => {
                create(app, up, &mut batch, &file_id, resumed).await
            }
            BatchState::Submitted { file_id, batch_id } => {
                poll_and_ingest(
                    app,
                    up,
                    &mut batch,
                    &file_id,
                    &batch_id,
                    resumed,
                    &mut shutdown,
                )
                .await
            }
            BatchState::Done { .. } => return,
        };
        match step {
            Ok(()) => failures = 0,
            Err(StepError::NotOwner) => {
                return info!(
                    ferry_batch = batch.id,
                    "another node owns the batch's upstream now; leaving the batch to it"
                );
            }
            Err(e) => {
                failures += 1;
                let wait = crate::upstream::backoff(
                    failures,
                    Duration::from_secs(1),
                    Duration::from_secs(300),
                    rand::random(),
                );
                warn!(ferry_batch = batch.id, error = %e, retry_in_ms = wait.as_millis() as u64, "batch step failed; will retry");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
        // After a failed step Ferry cannot know what the upstream did (a
        // create that timed out may have succeeded): check before acting.
        resumed = failures > 0;
    }
}

#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The batch's upstream is another node's now: its write was refused.
    #[error("this node no longer owns the batch's upstream")]
    NotOwner,
}

async fn upload(
    app: &Arc<App>,
    up: &crate::Upstream,
    batch: &mut BatchRecord,
    resumed: bool,
    shutdown: &watch::Receiver<bool>,
) -> Result<(), StepError> {
    if up.settings.profile.kind.is_anthropic() {
        return create_inline(app, up, batch, resumed).await;
    }
    // Named with this instance's id: a resumed upload adopts or deletes only
    // files this data_dir made (another Ferry on the same key has its own
    // batch numbers, the same as ours).
    let filename = crate::store::instance::upload_filename(&app.instance_id, batch.id);
    if resumed {
        // An upload cut short by a crash may have completed upstream: use
        // that file rather than leave it orphaned.
        let files = up.client.list_batch_files().await?;
        let mut adopted = None;
        for f in files
            .iter()
            .filter(|f| f.filename.as_deref() == Some(filename.as_str()))
        {
            if adopted.is_none() && f.bytes == Some(batch.bytes) {
                adopted = Some(f.id.clone());
            } else if let Err(e) = up.client.delete_file(&f.id).await {
                warn!(ferry_batch = batch.id, file_id = %f.id, error = %e, "cannot delete a stale upload");
            }
        }
        if let Some(file_id) = adopted {
            info!(ferry_batch = batch.id, file_id = %file_id, "found the file uploaded before the restart");
            advance(app, batch, |b| b.state = BatchState::Uploaded { file_id }).await?;
            return Ok(());
        }
    }
    let members = member_ids(app, batch.id).await?;
    let started = Instant::now();
    let res = with_retry(
        &up.settings.name,
        "upload_file",
        STEP_ATTEMPTS,
        &app.metrics,
        shutdown.clone(),
        || {
            let stream = jsonl::stream_batch(app.store.clone(), batch.endpoint, members.clone());
            up.client.upload_jsonl(&filename, batch.bytes, stream)
        },
    )
    .await;
    let file_id = match res {
        Ok(f) => f,
        Err(e) if !e.is_transient() => {
            // The upstream refuses the file itself: no retry will help.
            fail_all(app, up, batch, "upload_refused", &e.to_string()).await?;
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    info!(ferry_batch = batch.id, upstream = %batch.upstream, model = %batch.model, file_id = %file_id, bytes = batch.bytes, took_ms = started.elapsed().as_millis() as u64, "input file uploaded");
    advance(app, batch, |b| b.state = BatchState::Uploaded { file_id }).await?;
    Ok(())
}

/// Deletes a finished batch's upstream files (Moonshot allows only 1,000
/// batch files per organisation) and records which deletes are still owed.
/// A failed delete is only logged; the results are already safe.
pub async fn delete_upstream_files(app: &Arc<App>, up: &crate::Upstream, batch: &mut BatchRecord) {
    let BatchState::Done { cleanup, .. } = &mut batch.state else {
        return;
    };
    let mut owed = Vec::new();
    for f in cleanup.drain(..) {
        if let Err(e) = up.client.delete_file(&f).await {
            warn!(ferry_batch = batch.id, file_id = %f, error = %e, "could not delete an upstream file; will retry at the next start");
            owed.push(f);
        }
    }
    *cleanup = owed;
    if let Err(e) = app.store.put_batch(batch).await {
        warn!(ferry_batch = batch.id, error = %e, "cannot record the file cleanup");
    }
}

/// Deletes input files this instance uploaded that no live batch uses
/// (uploads cut short by a crash, or files whose delete failed). Run once at
/// start. Files of other instances, and the unnamed `ferry-batch-<n>.jsonl`
/// of builds before instance ids, are left alone: they may be another live
/// Ferry's.
pub async fn sweep_orphan_files(app: Arc<App>, upstream: usize) {
    let up = &app.upstreams[upstream];
    // Anthropic's batches take their requests inline: no files to sweep.
    if up.settings.profile.kind.is_anthropic() {
        return;
    }
    // Deletes a finished batch still owes (a crash or an upstream error cut
    // them short), output and error files included.
    match app.store.batches_owing_cleanup(&up.settings.name).await {
        Ok(batches) => {
            for mut b in batches {
                delete_upstream_files(&app, up, &mut b).await;
            }
        }
        Err(e) => warn!(error = %e, "cannot list batches owing file deletes"),
    }
    let files = match up.client.list_batch_files().await {
        Ok(f) => f,
        Err(e) => {
            return warn!(upstream = %up.settings.name, error = %e, "cannot list upstream files to sweep orphans");
        }
    };
    let mut deleted = 0;
    for f in files {
        let Some(id) = f
            .filename
            .as_deref()
            .and_then(|n| crate::store::instance::own_upload(n, &app.instance_id))
        else {
            continue;
        };
        let live = matches!(
            app.store.get_batch(id).await,
            Ok(Some(b)) if b.is_live()
        );
        if live {
            continue;
        }
        match up.client.delete_file(&f.id).await {
            Ok(()) => deleted += 1,
            Err(e) => warn!(file_id = %f.id, error = %e, "cannot delete an orphaned upload"),
        }
    }
    info!(upstream = %up.settings.name, deleted, "orphaned upstream input files swept");
}

/// Anthropic: the requests go inline in the create, so a claimed batch is
/// created at once (after looking for one a cut-short create may have
/// made) and recorded as submitted, its "file" the batch itself. The claim
/// is on disk before this runs, as an upload's is.
async fn create_inline(
    app: &Arc<App>,
    up: &crate::Upstream,
    batch: &mut BatchRecord,
    resumed: bool,
) -> Result<(), StepError> {
    let prefix = crate::upstream::anthropic::custom_id_prefix(&app.instance_id, batch.id);
    let existing = if resumed {
        match adopt::find_created_inline(up, batch, &prefix).await? {
            adopt::Inline::Found(b) => Some(b),
            adopt::Inline::NotCreated => None,
            adopt::Inline::Undecided(id) => {
                return Err(UpstreamError::Protocol(format!(
                    "batch {id} may be this batch's create; waiting until it ends to tell"
                ))
                .into());
            }
        }
    } else {
        None
    };
    let created = match existing {
        Some(b) => {
            info!(ferry_batch = batch.id, batch_id = %b.id, "found the message batch created before the restart or failed try");
            b
        }
        None => {
            let members = member_ids(app, batch.id).await?;
            let lines = jsonl::stream_batch(app.store.clone(), batch.endpoint, members);
            // One try per step: a retry goes through the scan first.
            match up.client.create_message_batch(lines, prefix).await {
                Ok(b) => b,
                Err(e) if !e.is_transient() => {
                    fail_all(app, up, batch, "batch_refused", &e.to_string()).await?;
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    // The batch is its own "file": its id is what the results are read by.
    record_created(app, batch, &created.id, &created.id).await
}

/// The upstream's batch, in the driver's shape whichever API it speaks.
async fn fetch_batch(up: &crate::Upstream, id: &str) -> Result<BatchObject, UpstreamError> {
    if up.settings.profile.kind.is_anthropic() {
        let b = up.client.get_message_batch(id).await?;
        return Ok(crate::upstream::anthropic::batch_object(&b));
    }
    up.client.get_batch(id).await
}

async fn create(
    app: &Arc<App>,
    up: &crate::Upstream,
    batch: &mut BatchRecord,
    file_id: &str,
    resumed: bool,
) -> Result<(), StepError> {
    // After a restart or a failed try the batch may exist already: creating
    // it again would pay for every request twice.
    let existing = if resumed {
        adopt::find_created(up, &app.instance_id, batch, file_id).await?
    } else {
        None
    };
    let created = match existing {
        Some(b) => {
            info!(ferry_batch = batch.id, batch_id = %b.id, "found the batch created before the restart or failed try");
            b
        }
        None => {
            let metadata = serde_json::json!({
                "ferry_batch_id": batch.id.to_string(),
                "ferry_instance": app.instance_id,
                "ferry_model": batch.model.chars().take(500).collect::<String>(),
                "created_by": "ferry",
            });
            // One try per step: a retry goes through `find_created` first.
            match up
                .client
                .create_batch(
                    file_id,
                    batch.endpoint,
                    &up.settings.completion_window,
                    metadata,
                )
                .await
            {
                Ok(b) => b,
                Err(e) if !e.is_transient() => {
                    fail_all(app, up, batch, "batch_refused", &e.to_string()).await?;
                    let _ = up.client.delete_file(file_id).await;
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    record_created(app, batch, file_id, &created.id).await
}

/// Records `batch` submitted as upstream batch `batch_id` (fenced: only
/// while this node owns the upstream), counts and logs it; the same for
/// both batch APIs, so the crash harness reads one log line for both.
async fn record_created(
    app: &Arc<App>,
    batch: &mut BatchRecord,
    file_id: &str,
    batch_id: &str,
) -> Result<(), StepError> {
    let (lease, token) = fence(app, &batch.upstream)?;
    *batch = app
        .store
        .mark_submitted_fenced(batch, file_id, batch_id, &lease, token)
        .await?
        .ok_or(StepError::NotOwner)?;
    app.metrics
        .batches
        .with_label_values(&[&batch.upstream, "created"])
        .inc();
    info!(
        ferry_batch = batch.id, batch_id = %batch_id, upstream = %batch.upstream, model = %batch.model,
        requests = batch.request_count, "batch created upstream"
    );
    Ok(())
}

async fn poll_and_ingest(
    app: &Arc<App>,
    up: &crate::Upstream,
    batch: &mut BatchRecord,
    file_id: &str,
    batch_id: &str,
    resumed: bool,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), StepError> {
    let submitted = Instant::now();
    let mut first = true;
    // Members whose deadlines come before the batch answers are sent on a
    // synchronous lane too, at their escalation times, between polls.
    let mut watch = escalate::Watch::load(app, up, batch).await?;
    // An event saying the batch ended upstream cuts the wait short.
    let poked = events::Poked::register(up, batch_id);
    let obj = loop {
        watch.escalate_due(app, batch, shutdown).await?;
        if !(first && resumed) {
            let interval = up.settings.poll_interval;
            // ±20 % jitter keeps many batches from polling in lock-step.
            let wait = interval.mul_f64(0.8 + 0.4 * rand::random::<f64>());
            let wait = if first {
                wait.min(Duration::from_secs(1))
            } else {
                wait
            };
            let poll_at = tokio::time::Instant::now() + wait;
            loop {
                let wake = watch.next_at_ms().map_or(poll_at, |at| {
                    let until = Duration::from_millis(at.saturating_sub(now_millis()));
                    poll_at.min(tokio::time::Instant::now() + until)
                });
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => {}
                    _ = poked.notify.notified() => {
                        info!(ferry_batch = batch.id, batch_id, "batch event received; polling now");
                        break;
                    }
                    _ = up.ownership.released() => return Err(StepError::NotOwner),
                    _ = shutdown.changed() => return Ok(()),
                }
                watch.escalate_due(app, batch, shutdown).await?;
                if tokio::time::Instant::now() >= poll_at {
                    break;
                }
            }
        }
        first = false;
        let polled = with_retry(
            &up.settings.name,
            "get_batch",
            STEP_ATTEMPTS,
            &app.metrics,
            shutdown.clone(),
            || fetch_batch(up, batch_id),
        )
        .await;
        let obj = match polled {
            Ok(obj) => obj,
            Err(UpstreamError::Status { status: 404, .. }) => {
                let now = now_millis();
                let Some(since) = batch.missing_since else {
                    warn!(ferry_batch = batch.id, upstream = %batch.upstream, model = %batch.model, batch_id, lost_after_secs = up.settings.lost_after.as_secs_f64(), "the upstream answers 404 for this batch; it is lost if that lasts");
                    advance(app, batch, |b| b.missing_since = Some(now)).await?;
                    continue;
                };
                if lost::is_lost(since, now, up.settings.lost_after) {
                    return lost::lose_batch(app, up, batch, file_id, batch_id).await;
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if batch.missing_since.is_some() {
            info!(
                ferry_batch = batch.id,
                batch_id, "the upstream knows this batch again"
            );
            advance(app, batch, |b| b.missing_since = None).await?;
        }
        if obj.is_terminal() {
            break obj;
        }
    };
    info!(ferry_batch = batch.id, upstream = %batch.upstream, model = %batch.model, batch_id, status = %obj.status, "batch finished upstream");
    // The results stay upstream until there is room to store them: nothing
    // is downloaded only to be refused.
    if !wait_for_room(app, shutdown).await {
        return Ok(());
    }
    let finished = ingest_batch(app, up, batch, &obj, shutdown).await?;
    app.metrics
        .batches
        .with_label_values(&[&batch.upstream, obj.status.as_str()])
        .inc();
    app.metrics
        .batch_duration
        .observe(submitted.elapsed().as_secs_f64());
    // Done is recorded before the upstream files are deleted: once the
    // output file is gone, ingesting again would be impossible, so a crash
    // must not find this batch still `submitted`.
    // Anthropic keeps no files of Ferry's: nothing to delete.
    let cleanup: Vec<String> = if up.settings.profile.kind.is_anthropic() {
        Vec::new()
    } else {
        [Some(file_id), obj.output_file(), obj.error_file()]
            .into_iter()
            .flatten()
            .map(str::to_owned)
            .collect()
    };
    advance(app, batch, |b| {
        b.state = BatchState::Done {
            file_id: Some(file_id.to_owned()),
            batch_id: Some(batch_id.to_owned()),
            upstream_status: obj.status.clone(),
            cleanup,
        };
    })
    .await?;
    delete_upstream_files(app, up, batch).await;
    info!(
        ferry_batch = batch.id,
        upstream = %batch.upstream,
        model = %batch.model,
        batch_id,
        terminal = finished,
        "batch done"
    );
    Ok(())
}

/// Waits until the store has room for a batch's results (see
/// [`crate::store::space`]); false at shutdown.
async fn wait_for_room(app: &Arc<App>, shutdown: &mut watch::Receiver<bool>) -> bool {
    while app.store.room_for(Need::Growth).is_err() {
        tokio::select! {
            _ = tokio::time::sleep(ROOM_RECHECK) => {}
            _ = shutdown.changed() => return false,
        }
    }
    true
}

/// Applies outcomes in slices as they arrive: each slice is stored, made
/// durable, and its callers woken before the next is read, so memory stays
/// at one slice and the first callers are answered while the file still
/// streams in. Re-applying after a crash is harmless (see
/// [`Store::apply_outcomes`](crate::store::Store::apply_outcomes)).
struct Ingest<'a> {
    app: &'a Arc<App>,
    up: &'a crate::Upstream,
    batch: u64,
    /// The batch's endpoint and model, for the cost of an answer discarded.
    endpoint: crate::endpoint::Endpoint,
    model: String,
    /// `Some(max_attempts)` when expired lines are sent again.
    requeue_expired: Option<u32>,
    /// Cancelled members are sent again up to this many batches.
    max_attempts: u32,
    pending: Vec<(u64, Outcome)>,
    seen: std::collections::HashSet<u64>,
    finished: usize,
}

impl<'a> Ingest<'a> {
    fn new(app: &'a Arc<App>, up: &'a crate::Upstream, batch: &BatchRecord) -> Self {
        let requeue_expired = (up.settings.expired_policy == crate::config::ExpiredPolicy::Requeue)
            .then_some(up.settings.max_attempts);
        Ingest {
            app,
            up,
            batch: batch.id,
            endpoint: batch.endpoint,
            model: batch.model.clone(),
            requeue_expired,
            max_attempts: up.settings.max_attempts,
            pending: Vec::new(),
            seen: std::collections::HashSet::new(),
            finished: 0,
        }
    }

    /// Adds an outcome, and stores the pending slice once it is full, so
    /// no single write covers a whole 50,000-member batch.
    async fn add(&mut self, id: u64, outcome: Outcome) -> Result<(), StepError> {
        self.push(id, outcome);
        if self.pending.len() >= OUTCOME_CHUNK {
            self.apply().await?;
        }
        Ok(())
    }

    /// Adds an outcome without storing anything (the caller applies).
    fn push(&mut self, id: u64, outcome: Outcome) {
        let outcome = match (outcome, self.requeue_expired) {
            (Outcome::Expired(error), Some(max_attempts)) => Outcome::RetryOrExpire {
                error,
                max_attempts,
            },
            (Outcome::Cancelled(error), _) => Outcome::Retry {
                error,
                max_attempts: self.max_attempts,
            },
            (o, _) => o,
        };
        self.seen.insert(id);
        self.pending.push((id, outcome));
    }

    async fn apply(&mut self) -> Result<(), StepError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let (slice, batch) = (std::mem::take(&mut self.pending), self.batch);
        // Answers: their tokens and savings count only if stored (once per
        // request); one may find its request answered already, by the
        // escalation of a member whose deadline came first.
        let mut answers: HashMap<u64, Outcome> = slice
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Completed(_)))
            .cloned()
            .collect();
        let done = self
            .app
            .store
            .apply_outcomes(batch, slice, crate::delivery::webhook_payload)
            .await?;
        for rec in &done {
            let answer = match answers.remove(&rec.id) {
                Some(Outcome::Completed(r)) => Some(r),
                _ => None,
            };
            self.app.on_terminal(rec, answer.as_ref());
            if let Some(r) = answer {
                self.app.count_tokens(
                    self.up,
                    self.endpoint,
                    &self.model,
                    crate::store::Lane::Batch,
                    &r.body,
                );
            }
        }
        self.finished += done.len();
        // What is left was not stored.
        for (id, answer) in &answers {
            self.count_if_spent_twice(*id, answer).await?;
        }
        Ok(())
    }

    /// Counts `answer` as money spent twice if its request was answered
    /// by another lane first (see [`crate::store::lifecycle::spent_twice`]).
    async fn count_if_spent_twice(&self, id: u64, answer: &Outcome) -> Result<(), StepError> {
        let Some(rec) = self.app.store.get(id).await? else {
            return Ok(());
        };
        if !crate::store::lifecycle::spent_twice(rec.status, rec.batch, self.batch, answer) {
            return Ok(());
        }
        if let Outcome::Completed(r) = answer {
            info!(
                ferry_batch = self.batch,
                request = id,
                answered_by = ?rec.lane.map(|l| l.as_str()),
                "batch line for a request already answered on another lane; discarded"
            );
            self.app.count_spent_twice(
                self.up,
                self.endpoint,
                &self.model,
                crate::store::Lane::Batch,
                &r.body,
            );
        }
        Ok(())
    }
}

/// Stores what became of every member; returns how many became terminal.
async fn ingest_batch(
    app: &Arc<App>,
    up: &crate::Upstream,
    batch: &BatchRecord,
    obj: &BatchObject,
    shutdown: &watch::Receiver<bool>,
) -> Result<usize, StepError> {
    let members = member_ids(app, batch.id).await?;
    let mut ingest = Ingest::new(app, up, batch);
    if obj.status == "failed" {
        let mut outcomes = HashMap::with_capacity(members.len());
        failed_batch_outcomes(obj, &members, up.settings.max_attempts, &mut outcomes);
        if outcomes.values().all(|o| matches!(o, Outcome::Requeue)) {
            // The token budget is full: give the upstream a pause before this
            // upstream's queues are flushed again.
            warn!(
                ferry_batch = batch.id,
                pause_secs = up.settings.token_limit_backoff.as_secs_f64(),
                "token limit reached upstream; pausing flushes"
            );
            up.pause_flushes(up.settings.token_limit_backoff);
        }
        for (id, o) in outcomes {
            ingest.add(id, o).await?;
        }
    } else {
        let member_set: std::collections::HashSet<u64> = members.iter().copied().collect();
        for file in [obj.output_file(), obj.error_file()].into_iter().flatten() {
            let read =
                read_result_file(app, up, file, batch, &member_set, &mut ingest, shutdown).await;
            match read {
                // The file is gone (deleted upstream, or expired): members
                // already finished stay so; the rest count as missing below
                // rather than leave the batch stuck forever.
                Err(StepError::Upstream(UpstreamError::Status { status: 404, .. })) => {
                    warn!(
                        ferry_batch = batch.id,
                        file_id = file,
                        "result file no longer exists upstream"
                    );
                }
                other => other?,
            }
        }
        let missing = match obj.status.as_str() {
            "expired" => Outcome::Expired(RequestError {
                code: "batch_expired".into(),
                message: "This request could not be executed before the completion window expired."
                    .into(),
            }),
            "cancelled" => Outcome::Cancelled(RequestError {
                code: "batch_cancelled".into(),
                message: "the upstream batch was cancelled before this request ran".into(),
            }),
            _ => Outcome::Retry {
                error: RequestError {
                    code: "missing_result".into(),
                    message: "the upstream batch finished without a result line for this request"
                        .into(),
                },
                max_attempts: up.settings.max_attempts,
            },
        };
        let absent: Vec<u64> = members
            .iter()
            .copied()
            .filter(|id| !ingest.seen.contains(id))
            .collect();
        if !absent.is_empty() {
            warn!(ferry_batch = batch.id, absent = absent.len(), status = %obj.status, "members without a result line");
        }
        for id in absent {
            ingest.add(id, missing.clone()).await?;
        }
    }
    ingest.apply().await?;
    // Re-queued members need a flush loop that knows about them.
    up.wake.notify_one();
    Ok(ingest.finished)
}

/// A batch that failed validation: lines named in `errors` fail with their
/// error; the rest are sent again (they were not at fault). Errors that name
/// no line (`token_limit_exceeded`, a missing file) re-queue everyone.
fn failed_batch_outcomes(
    obj: &BatchObject,
    members: &[u64],
    max_attempts: u32,
    outcomes: &mut HashMap<u64, Outcome>,
) {
    let errors = obj
        .errors
        .as_ref()
        .map(|e| e.data.as_slice())
        .unwrap_or_default();
    for e in errors {
        let Some(line) = e.line else { continue };
        let Some(id) = usize::try_from(line)
            .ok()
            .and_then(|l| l.checked_sub(1))
            .and_then(|i| members.get(i))
        else {
            continue;
        };
        let mut message = e
            .message
            .clone()
            .unwrap_or_else(|| "the upstream refused this request".into());
        if let Some(p) = &e.param {
            message = format!("{message} (param: {p})");
        }
        outcomes.insert(
            *id,
            Outcome::Failed(RequestError {
                code: e.code.clone().unwrap_or_else(|| "invalid_request".into()),
                message,
            }),
        );
    }
    let first = errors.first();
    let token_limit = first.and_then(|e| e.code.as_deref()) == Some("token_limit_exceeded");
    // The token budget is the upstream's state, not the requests' fault: send
    // them again without counting. Anything else (a file-level error, or a
    // provider such as Moonshot that sends no `errors`) counts as an attempt,
    // so a batch that can never pass ends with its requests failed.
    let rest = if token_limit {
        Outcome::Requeue
    } else {
        Outcome::Retry {
            error: RequestError {
                code: first
                    .and_then(|e| e.code.clone())
                    .unwrap_or_else(|| "batch_failed".into()),
                message: first.and_then(|e| e.message.clone()).unwrap_or_else(|| {
                    "the upstream batch failed validation and gave no reason".into()
                }),
            },
            max_attempts,
        }
    };
    for id in members {
        outcomes.entry(*id).or_insert_with(|| rest.clone());
    }
}

async fn read_result_file(
    app: &Arc<App>,
    up: &crate::Upstream,
    file_id: &str,
    batch: &BatchRecord,
    members: &std::collections::HashSet<u64>,
    ingest: &mut Ingest<'_>,
    shutdown: &watch::Receiver<bool>,
) -> Result<(), StepError> {
    let mut stream: std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<bytes::Bytes, UpstreamError>> + Send>,
    > = if up.settings.profile.kind.is_anthropic() {
        let prefix = crate::upstream::anthropic::custom_id_prefix(&app.instance_id, batch.id);
        Box::pin(
            with_retry(
                &up.settings.name,
                "download_file",
                STEP_ATTEMPTS,
                &app.metrics,
                shutdown.clone(),
                || up.client.message_batch_results(file_id, prefix.clone()),
            )
            .await?,
        )
    } else {
        let res = with_retry(
            &up.settings.name,
            "download_file",
            STEP_ATTEMPTS,
            &app.metrics,
            shutdown.clone(),
            || up.client.file_content(file_id),
        )
        .await?;
        Box::pin(
            res.bytes_stream()
                .map(|c| c.map_err(|e| UpstreamError::Transport(e.to_string()))),
        )
    };
    let mut reader = ingest::ResultReader::new(members);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        reader.push(&chunk, &mut |id, outcome| ingest.push(id, outcome));
        if ingest.pending.len() >= OUTCOME_CHUNK {
            ingest.apply().await?;
        }
    }
    let bad_lines = reader.finish(&mut |id, outcome| ingest.push(id, outcome));
    if bad_lines > 0 {
        warn!(
            file_id,
            bad_lines, "result file had lines Ferry could not use"
        );
    }
    Ok(())
}

/// Fails every member of a batch the upstream refused outright.
async fn fail_all(
    app: &Arc<App>,
    up: &crate::Upstream,
    batch: &mut BatchRecord,
    code: &str,
    message: &str,
) -> Result<(), StepError> {
    error!(
        ferry_batch = batch.id,
        code, message, "upstream refused the batch; failing its requests"
    );
    let err = RequestError {
        code: code.to_owned(),
        message: message.to_owned(),
    };
    // Stored (and its callers woken) a slice at a time.
    let mut ingest = Ingest::new(app, up, batch);
    for id in member_ids(app, batch.id).await? {
        ingest.add(id, Outcome::Failed(err.clone())).await?;
    }
    ingest.apply().await?;
    advance(app, batch, |b| {
        b.state = BatchState::Done {
            file_id: None,
            batch_id: None,
            upstream_status: "refused".into(),
            cleanup: Vec::new(),
        };
    })
    .await?;
    app.metrics
        .batches
        .with_label_values(&[&batch.upstream, "refused"])
        .inc();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{BatchErrorEntry, BatchErrors};

    fn failed(errors: Vec<BatchErrorEntry>) -> BatchObject {
        BatchObject {
            id: "batch_1".into(),
            status: "failed".into(),
            output_file_id: None,
            error_file_id: None,
            errors: Some(BatchErrors { data: errors }),
            metadata: None,
            input_file_id: None,
            created_at: None,
        }
    }

    fn entry(code: &str, line: Option<u64>) -> BatchErrorEntry {
        BatchErrorEntry {
            code: Some(code.into()),
            message: Some("m".into()),
            param: None,
            line,
        }
    }

    #[test]
    fn a_bad_line_fails_alone_and_its_neighbours_retry() {
        let mut o = HashMap::new();
        failed_batch_outcomes(
            &failed(vec![entry("invalid_request", Some(2))]),
            &[10, 11, 12],
            3,
            &mut o,
        );
        assert!(matches!(&o[&11], Outcome::Failed(e) if e.code == "invalid_request"));
        assert!(matches!(o[&10], Outcome::Retry { .. }));
        assert!(matches!(o[&12], Outcome::Retry { .. }));
    }

    #[test]
    fn token_limit_requeues_everyone() {
        let mut o = HashMap::new();
        failed_batch_outcomes(
            &failed(vec![entry("token_limit_exceeded", None)]),
            &[1, 2],
            3,
            &mut o,
        );
        assert!(o.values().all(|x| matches!(x, Outcome::Requeue)));
        // No reason given (Moonshot has no `errors`): a counted retry.
        let mut o = HashMap::new();
        failed_batch_outcomes(&failed(vec![]), &[1], 3, &mut o);
        assert!(matches!(o[&1], Outcome::Retry { .. }));
    }

    #[test]
    fn line_numbers_out_of_range_are_ignored() {
        let mut o = HashMap::new();
        failed_batch_outcomes(
            &failed(vec![entry("x", Some(0)), entry("x", Some(9))]),
            &[1],
            3,
            &mut o,
        );
        assert!(matches!(o[&1], Outcome::Retry { .. }));
    }
}
