//! A finished batch's outcomes applied to its members in sled: results
//! stored, requests finished or sent back to their queue, webhooks owed.

use super::*;

impl SledStore {
    /// Applies the outcomes of a finished batch's members. Only members still
    /// `submitted` in this batch change, so applying twice is harmless.
    /// Returns the records that reached a terminal status.
    pub fn apply_outcomes(
        &self,
        batch: u64,
        outcomes: Vec<(u64, Outcome)>,
        payload: &PayloadFn<'_>,
    ) -> Result<Vec<RequestRecord>, StoreError> {
        #[cfg(test)]
        self.largest_outcome_write
            .fetch_max(outcomes.len(), std::sync::atomic::Ordering::SeqCst);
        let _g = self.queue_lock.lock().unwrap_or_else(|p| p.into_inner());
        let now = now_secs();
        let record = self.get_batch(batch)?;
        let lane = record.as_ref().map(|b| b.lane);
        let batch_id = record.and_then(|b| super::requests::upstream_batch_id(b.state));
        let mut reqs = sled::Batch::default();
        let mut states = sled::Batch::default();
        let mut results = sled::Batch::default();
        let mut queue = sled::Batch::default();
        let mut bodies = sled::Batch::default();
        let mut outbox = sled::Batch::default();
        let mut terminal = sled::Batch::default();
        let mut deliveries = Vec::new();
        let mut done = Vec::new();
        let mut requeued: Vec<(QueueKey, u64, u64, u64, u64, Option<u64>)> = Vec::new();
        for (id, outcome) in outcomes {
            let Some(state) = self.state(id)? else {
                continue;
            };
            if !lifecycle::outcome_applies(
                state.status,
                state.batch,
                state.escalation,
                batch,
                &outcome,
            ) {
                continue;
            }
            let Some(mut rec) = self.get_fixed(id)? else {
                continue;
            };
            rec.set_state(state);
            let (status, error, stored) = match lifecycle::outcome_effect(outcome, rec.attempts) {
                lifecycle::Effect::Finish {
                    status,
                    error,
                    result,
                } => (status, error, result),
                lifecycle::Effect::Requeue { attempts } => {
                    rec.attempts = attempts;
                    let qk = QueueKey::of(&rec);
                    let len = line_len(rec.endpoint, id, rec.body_len);
                    // Age counts from acceptance: a re-queued request has
                    // waited already, so the time threshold sends it soon.
                    let since = rec.created_at.saturating_mul(1000);
                    queue.insert(
                        qk.entry(id),
                        &queue_value(since, len, rec.inputs, rec.deadline_at),
                    );
                    requeued.push((qk, len, rec.inputs, since, id, rec.deadline_at));
                    rec.status = lifecycle::checked_move(rec.status, RequestStatus::Queued)?;
                    rec.batch = None;
                    rec.submitted_at = None;
                    states.insert(&id.to_be_bytes(), &rec.state().encode());
                    continue;
                }
            };
            if let Some(r) = &stored {
                results.insert(&id.to_be_bytes(), r.encode());
            }
            rec.status = lifecycle::checked_move(rec.status, status)?;
            if error.is_some() {
                rec.error = error;
            }
            rec.completed_at = Some(now);
            // The batch that answered: an escalation's, if it was first.
            rec.batch = Some(batch);
            terminal.insert(&encoding::terminal_key(now, id), &[]);
            rec.batch_id.clone_from(&batch_id);
            rec.lane = lane;
            let delivery =
                self.prepare_delivery(&mut rec, stored.as_ref(), payload, &mut outbox)?;
            // The JSON record changes only for an error or a webhook; the
            // common case (completed, no callback) writes the state alone.
            if rec.error.is_some() || delivery.is_some() {
                reqs.insert(&id.to_be_bytes(), encode_record(&rec)?);
            }
            deliveries.extend(delivery);
            states.insert(&id.to_be_bytes(), &rec.state().encode());
            // A finished request's body is no longer needed.
            bodies.remove(&id.to_be_bytes());
            done.push(rec);
        }
        // Results, webhooks, errors and the retention index before states:
        // a reader that sees `completed` finds its result, no terminal
        // request lacks its webhook, and none escapes the purge.
        self.results.apply_batch(results)?;
        self.terminal.apply_batch(terminal)?;
        self.outbox.apply_batch(outbox)?;
        self.queue.apply_batch(queue)?;
        self.requests.apply_batch(reqs)?;
        self.states.apply_batch(states)?;
        self.bodies.apply_batch(bodies)?;
        self.schedule(deliveries.into_iter());
        for (qk, len, inputs, since, id, deadline_at) in requeued {
            self.index_deadline(&qk, id, deadline_at);
            self.account(qk, len, inputs, since);
        }
        Ok(done)
    }
}
