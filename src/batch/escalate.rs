//! The synchronous lanes of a request escalated for its deadline (issue
//! #17): a batch of one request whose record names its lane, flex or
//! standard. Flex is the upstream's ordinary endpoint with `service_tier:
//! "flex"` (batch prices, slower, refused now and then with `429`
//! `resource_unavailable`); standard is the same call at full price.
//!
//! Crash safety, as for every batch: the claim (with its lane) is durable
//! before any call; the member is `submitted` before the first; a step up
//! from flex to standard is recorded before the standard call, so a restart
//! resumes on the lane last recorded and never goes back to a cheaper one
//! or on to a third. The answer is stored as the batch's outcome, which
//! applies once: a request is never answered twice. A call cut short by a
//! crash or shutdown is sent again on the same lane at the next start.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::{StepError, advance, lanes, member_ids};
use crate::App;
use crate::store::{
    BatchRecord, BatchState, Lane, Outcome, QueueKey, RequestError, RequestRecord, StoredResult,
    lifecycle, now_millis, now_secs,
};

/// How long a flex call may take: OpenAI asks clients to allow up to 15
/// minutes.
pub const FLEX_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// The body sent on `lane`: the stored body, with `service_tier: "flex"` on
/// flex (and the caller's own tier, if any, replaced: the lane decides what
/// the call costs). `None` when the stored body is not a JSON object.
pub fn lane_body(stored: &[u8], lane: Lane) -> Option<Vec<u8>> {
    if lane != Lane::Flex {
        return (!stored.is_empty()).then(|| stored.to_vec());
    }
    let mut v: serde_json::Value = serde_json::from_slice(stored).ok()?;
    v.as_object_mut()?
        .insert("service_tier".into(), serde_json::Value::from("flex"));
    serde_json::to_vec(&v).ok()
}

/// The lane a request of `tenant` due to step up onto `next` goes on now,
/// or why it stays where it is: the tenant's `lanes`, then its standard
/// budget (taken here when standard is chosen).
pub(super) fn lane_for(
    app: &App,
    tenant: &str,
    next: Lane,
    now_ms: u64,
) -> Result<Lane, lanes::Withheld> {
    let t = app.config.tenants.iter().find(|t| t.name == tenant);
    let allowed = t.map(|t| t.lanes).unwrap_or_default();
    let cap = t.and_then(|t| t.max_standard_per_hour);
    let wants_standard = lanes::choose_lane(next, allowed, true) == Ok(Lane::Standard);
    let room = !wants_standard || {
        let mut budgets = app
            .standard_budgets
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        budgets
            .entry(tenant.to_owned())
            .or_default()
            .try_take(now_ms, cap)
    };
    let chosen = lanes::choose_lane(next, allowed, room);
    if let Err(why) = chosen {
        app.metrics
            .escalations_withheld
            .with_label_values(&[why.as_str()])
            .inc();
    }
    chosen
}

/// When a request of `tenant` held back for `why` is looked at again
/// (unix millis): at the end of the tenant's standard window for its cap;
/// never for its lanes.
pub(super) fn recheck_at_ms(app: &App, tenant: &str, why: lanes::Withheld) -> u64 {
    match why {
        lanes::Withheld::Lanes => u64::MAX,
        lanes::Withheld::StandardCap => app
            .standard_budgets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .map_or(0, |b| b.window_end_ms()),
    }
}

/// Requests held back by their tenant's lanes or standard cap, by id,
/// with when to look at each again (unix millis): kept by the flush loop
/// across passes, so they are not read again each pass, and forgotten
/// once they leave the scan (flushed, cancelled).
pub(super) type Withheld = HashMap<u64, u64>;

/// Requests looked at per pass of the flush loop (soonest deadline first);
/// more wait for the next pass, a second later at most.
const SCAN_LIMIT: usize = 1_000;

/// A queued request with a deadline, as the flush loop sees it.
#[derive(Debug, Clone)]
pub struct Due {
    pub queue: QueueKey,
    pub id: u64,
    /// The lane it escalates to, and when (unix millis).
    pub lane: Lane,
    pub escalate_at_ms: u64,
}

/// The queued requests of `up` whose deadlines fall within the flush
/// loop's horizon ([`lanes::scan_horizon`]), soonest deadline first, with
/// their escalation times. Empty when the store cannot be read (the next
/// pass tries again).
pub(super) async fn scan(
    app: &App,
    up: &crate::Upstream,
    now_ms: u64,
    withheld: &Withheld,
) -> Vec<Due> {
    let settings = &up.settings;
    let horizon = lanes::scan_horizon(&up.latencies.longest(), settings.escalation_margin);
    let before = (now_ms / 1000).saturating_add(horizon.as_secs() + 1);
    let due = match app
        .store
        // Those held back stay due: read past them.
        .due_by_deadline(&settings.name, before, SCAN_LIMIT + withheld.len())
        .await
    {
        Ok(due) => due,
        Err(e) => {
            warn!(upstream = %settings.name, error = %e, "cannot read the requests due by their deadlines; will retry");
            return Vec::new();
        }
    };
    due.into_iter()
        .map(|(queue, id, deadline)| {
            let lane = lanes::next_lane(&queue.model, &settings.flex_models);
            let escalate_at_ms = lanes::escalation_at_ms(
                deadline,
                lane,
                &queue.model,
                &up.latencies,
                settings.escalation_margin,
            );
            Due {
                queue,
                id,
                lane,
                escalate_at_ms,
            }
        })
        .collect()
}

/// The earliest escalation time of each queue in `due`.
pub(super) fn earliest_by_queue(due: &[Due]) -> HashMap<QueueKey, u64> {
    let mut earliest: HashMap<QueueKey, u64> = HashMap::new();
    for d in due {
        let at = earliest.entry(d.queue.clone()).or_insert(u64::MAX);
        *at = (*at).min(d.escalate_at_ms);
    }
    earliest
}

/// Takes every request in `due` whose escalation time has come out of its
/// queue, alone, onto its next lane, and starts its driver. Returns how
/// long until the next escalation time among the others, if any.
pub(super) async fn escalate_due(
    app: &Arc<App>,
    up: &crate::Upstream,
    due: Vec<Due>,
    withheld: &mut Withheld,
    token: u64,
    shutdown: &watch::Receiver<bool>,
) -> Option<Duration> {
    let now_ms = now_millis();
    let lease = super::ownership::lease_name(&up.settings.name);
    let mut next: Option<Duration> = None;
    let seen: std::collections::HashSet<u64> = due.iter().map(|d| d.id).collect();
    withheld.retain(|id, _| seen.contains(id));
    for Due {
        queue: qk,
        id,
        lane,
        escalate_at_ms: at,
    } in due
    {
        let at = at.max(withheld.get(&id).copied().unwrap_or(0));
        if at > now_ms {
            if at != u64::MAX {
                let wait = Duration::from_millis(at - now_ms);
                next = Some(next.map_or(wait, |n| n.min(wait)));
            }
            continue;
        }
        if !up.ownership.holds(token) || *shutdown.borrow() {
            return None;
        }
        let tenant = match app.store.get(id).await {
            Ok(Some(rec)) => rec.tenant,
            // Gone meanwhile.
            Ok(None) => continue,
            Err(e) => {
                warn!(request = id, error = %e, "cannot read a request due for its deadline; will retry");
                continue;
            }
        };
        let lane = match lane_for(app, &tenant, lane, now_ms) {
            Ok(lane) => lane,
            Err(why) => {
                info!(request = id, tenant = %tenant, reason = why.as_str(), "request due for its deadline stays in its queue");
                withheld.insert(id, recheck_at_ms(app, &tenant, why));
                continue;
            }
        };
        withheld.remove(&id);
        match app
            .store
            .claim_request(&qk, id, lane, (&lease, token))
            .await
        {
            Ok(Some(batch)) => {
                app.metrics
                    .escalations
                    .with_label_values(&[lane.as_str()])
                    .inc();
                info!(
                    ferry_batch = batch.id, request = id, upstream = %qk.upstream, model = %qk.model,
                    lane = lane.as_str(), "request escalated for its deadline"
                );
                super::spawn_driver(app.clone(), batch, false, shutdown.clone());
            }
            // Flushed, cancelled or taken meanwhile.
            Ok(None) => {}
            Err(e) => {
                warn!(request = id, error = %e, "cannot escalate a request for its deadline; will retry");
            }
        }
    }
    next
}

/// The members of a submitted Batch API job that escalate for their
/// deadlines while the job runs, soonest first: read once when its driver
/// starts polling (a restart reads them again, so nothing is lost), then
/// taken as their times come. A member escalates once; the store refuses
/// a second escalation, or one of a member no longer waiting on the job.
#[derive(Debug, Default)]
pub(super) struct Watch {
    /// (escalation time in unix millis, request id, lane), soonest last.
    due: Vec<(u64, u64, Lane)>,
}

impl Watch {
    /// The members of `batch` to watch: none for an escalation's own batch
    /// of one, which is already on a synchronous lane.
    pub(super) async fn load(
        app: &App,
        up: &crate::Upstream,
        batch: &BatchRecord,
    ) -> Result<Watch, StepError> {
        if !batch.lane.is_batch() {
            return Ok(Watch::default());
        }
        let settings = &up.settings;
        let lane = lanes::next_lane(&batch.model, &settings.flex_models);
        let mut due: Vec<(u64, u64, Lane)> = app
            .store
            .pending_deadlines(batch.id)
            .await?
            .into_iter()
            .map(|(id, deadline)| {
                let at = lanes::escalation_at_ms(
                    deadline,
                    lane,
                    &batch.model,
                    &up.latencies,
                    settings.escalation_margin,
                );
                (at, id, lane)
            })
            .collect();
        due.sort_unstable_by_key(|&(at, id, _)| std::cmp::Reverse((at, id)));
        Ok(Watch { due })
    }

    /// When the next member escalates (unix millis).
    pub(super) fn next_at_ms(&self) -> Option<u64> {
        self.due.last().map(|(at, _, _)| *at)
    }

    /// Escalates every member whose time has come, each in a batch of one
    /// recorded before its driver starts, while the job stays submitted.
    pub(super) async fn escalate_due(
        &mut self,
        app: &Arc<App>,
        batch: &BatchRecord,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<(), StepError> {
        let now_ms = now_millis();
        while let Some(&(at, id, lane)) = self.due.last() {
            if at > now_ms {
                break;
            }
            self.due.pop();
            let Some(rec) = app.store.get(id).await? else {
                continue;
            };
            let lane = match lane_for(app, &rec.tenant, lane, now_ms) {
                Ok(lane) => lane,
                Err(why) => {
                    info!(ferry_batch = batch.id, request = id, tenant = %rec.tenant, reason = why.as_str(), "request due for its deadline stays in its batch alone");
                    let again = recheck_at_ms(app, &rec.tenant, why);
                    if again != u64::MAX {
                        self.due.push((again, id, lane));
                        self.due
                            .sort_unstable_by_key(|&(at, id, _)| std::cmp::Reverse((at, id)));
                    }
                    continue;
                }
            };
            let (lease, token) = super::fence(app, &batch.upstream)?;
            if let Some(one) = app
                .store
                .escalate_submitted(batch.id, id, lane, (&lease, token))
                .await?
            {
                app.metrics
                    .escalations
                    .with_label_values(&[lane.as_str()])
                    .inc();
                info!(
                    ferry_batch = one.id, from_batch = batch.id, request = id,
                    upstream = %batch.upstream, model = %batch.model, lane = lane.as_str(),
                    "request in a submitted batch escalated for its deadline; the first answer wins"
                );
                super::spawn_driver(app.clone(), one, false, shutdown.clone());
            }
        }
        Ok(())
    }
}

/// Sends the one member of `batch` on its lane until it is answered, then
/// stores the answer and finishes the batch.
pub(super) async fn send(
    app: &Arc<App>,
    up: &crate::Upstream,
    batch: &mut BatchRecord,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), StepError> {
    let members = member_ids(app, batch.id).await?;
    let Some(rec) = (match members.first() {
        Some(id) => app.store.get(*id).await?,
        None => None,
    }) else {
        // A claim a crash cut short before its member was written.
        return finish(app, batch).await;
    };
    if rec.status.is_terminal() {
        // Answered before a crash, the batch not yet marked done; or, for
        // a request escalated out of a submitted batch, by that batch.
        return finish(app, batch).await;
    }
    if !app.store.holds(batch.id, rec.id).await? {
        // An escalation out of a submitted batch that a crash cut short
        // before the request named it: never sent, and now never will be.
        return finish(app, batch).await;
    }
    // Sent upstream from here on, for the status object and for recovery.
    app.store.apply_submitted(batch.id).await?;
    let stored = app.store.body(rec.id).await?.unwrap_or_default();
    let deadline = rec.deadline_at.unwrap_or(0);
    let margin = up.settings.escalation_margin;
    let mut refusals = 0u32;
    // The step up to standard was refused (the tenant's lanes or cap).
    let mut standard_refused = false;
    loop {
        let lane = batch.lane;
        let Some(body) = lane_body(&stored, lane) else {
            let error = RequestError {
                code: "body_unreadable".into(),
                message: "Ferry could not read the stored request body".into(),
            };
            return answer(app, up, batch, &rec, Outcome::Failed(error)).await;
        };
        let (op, timeout) = match lane {
            Lane::Flex => ("respond_flex", FLEX_TIMEOUT),
            _ => ("respond_standard", app.config.server.upstream_read_timeout),
        };
        let started = std::time::Instant::now();
        let called = tokio::select! {
            r = up.client.respond(op, rec.endpoint, body, timeout) => r,
            // Left to the next start, which sends it again on this lane.
            _ = shutdown.changed() => return Ok(()),
        };
        match called {
            Ok((status, answer_body)) => {
                up.latencies.record(lane, &rec.model, started.elapsed());
                let outcome =
                    if serde_json::from_slice::<serde::de::IgnoredAny>(&answer_body).is_ok() {
                        Outcome::Completed(StoredResult {
                            status_code: status,
                            body: answer_body,
                        })
                    } else {
                        Outcome::Failed(RequestError {
                            code: "upstream_invalid_answer".into(),
                            message: format!(
                                "the upstream answered {status} with a body that is not JSON"
                            ),
                        })
                    };
                return answer(app, up, batch, &rec, outcome).await;
            }
            Err(e) if lane == Lane::Flex && e.is_transient() => {
                if matches!(&e, crate::upstream::UpstreamError::Status { status: 429, code: Some(c), .. } if c == "resource_unavailable")
                {
                    app.metrics.flex_unavailable.inc();
                }
                let wait = e.retry_after().unwrap_or_else(|| {
                    crate::upstream::backoff(
                        refusals,
                        Duration::from_secs(1),
                        Duration::from_secs(60),
                        rand::random(),
                    )
                });
                refusals += 1;
                let priors = &up.latencies;
                let in_time = lanes::flex_retry_in_time(
                    now_millis(),
                    wait,
                    deadline,
                    &rec.model,
                    priors,
                    margin,
                );
                // Standard only if the tenant takes it and has room for it
                // this hour (asked once); else flex is tried until it
                // answers, late if need be (counted as a miss).
                if !in_time && !standard_refused {
                    standard_refused =
                        lane_for(app, &rec.tenant, Lane::Standard, now_millis()).is_err();
                }
                if in_time || standard_refused {
                    warn!(ferry_batch = batch.id, error = %e, retry_in_ms = wait.as_millis() as u64, "flex call refused; will retry on flex");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => continue,
                        _ = shutdown.changed() => return Ok(()),
                    }
                }
                info!(ferry_batch = batch.id, error = %e, "flex can no longer make the deadline; stepping up to standard");
                advance(app, batch, |b| b.lane = Lane::Standard).await?;
                app.metrics
                    .escalations
                    .with_label_values(&[Lane::Standard.as_str()])
                    .inc();
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Stores the member's outcome (once: an outcome applies only to a member
/// still pending in this batch), tells its waiters, and finishes the batch.
async fn answer(
    app: &Arc<App>,
    up: &crate::Upstream,
    batch: &mut BatchRecord,
    rec: &RequestRecord,
    outcome: Outcome,
) -> Result<(), StepError> {
    let kept = outcome.clone();
    let done = app
        .store
        .apply_outcomes(
            batch.id,
            vec![(rec.id, outcome)],
            crate::delivery::webhook_payload,
        )
        .await?;
    if done.is_empty()
        && let Outcome::Completed(r) = &kept
        && let Some(now) = app.store.get(rec.id).await?
        && lifecycle::spent_twice(now.status, now.batch, batch.id, &kept)
    {
        // Answered meanwhile by the batch it was escalated out of.
        info!(
            ferry_batch = batch.id,
            request = rec.id,
            lane = batch.lane.as_str(),
            "escalated request already answered by its batch; this answer is discarded"
        );
        app.count_spent_twice(up, rec.endpoint, &rec.model, batch.lane, &r.body);
    }
    let answer = match &kept {
        Outcome::Completed(r) => Some(r),
        _ => None,
    };
    for rec in &done {
        app.on_terminal(rec, answer);
        if let Some(r) = answer {
            app.count_tokens(up, rec.endpoint, &rec.model, batch.lane, &r.body);
        }
        let late = rec.deadline_at.is_some_and(|d| now_secs() > d);
        info!(
            ferry_batch = batch.id,
            request = rec.id,
            lane = batch.lane.as_str(),
            late,
            "escalated request answered"
        );
    }
    finish(app, batch).await
}

async fn finish(app: &Arc<App>, batch: &mut BatchRecord) -> Result<(), StepError> {
    let lane = batch.lane;
    advance(app, batch, |b| {
        b.state = BatchState::Done {
            file_id: None,
            batch_id: None,
            upstream_status: lane.as_str().to_owned(),
            cleanup: Vec::new(),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flex_marks_the_body_and_the_others_send_it_as_stored() {
        let stored = br#"{"model":"m","service_tier":"priority","messages":[]}"#;
        let flex: serde_json::Value =
            serde_json::from_slice(&lane_body(stored, Lane::Flex).unwrap()).unwrap();
        assert_eq!(flex["service_tier"], "flex");
        assert_eq!(flex["model"], "m");
        assert_eq!(lane_body(stored, Lane::Standard).unwrap(), stored.to_vec());
        assert_eq!(lane_body(b"[1]", Lane::Flex), None);
        assert_eq!(lane_body(b"not json", Lane::Flex), None);
        assert_eq!(lane_body(b"", Lane::Standard), None, "no body stored");
    }
}
