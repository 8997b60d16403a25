//! The webhook outbox: deliveries written with a request's terminal state,
//! handed to the sender only once the commit that made them durable has
//! run, and taken, retried and finished by the delivery worker.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use super::{
    Delivery, PayloadFn, RequestRecord, SledStore, StoreError, StoredResult, WebhookState,
    WebhookStatus, corrupt, now_millis,
};

impl SledStore {
    pub(super) fn lock_outbox(&self) -> std::sync::MutexGuard<'_, BTreeSet<(u64, u64)>> {
        self.outbox_due.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands the outbox entries that the flush up to ticket `upto` made
    /// durable to the delivery schedule.
    pub(super) fn release_flushed_deliveries(&self, upto: u64) {
        let released: Vec<(u64, u64)> = {
            let mut pending = self
                .outbox_unflushed
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if pending.is_empty() {
                return;
            }
            let (done, rest) = std::mem::take(&mut *pending)
                .into_iter()
                .partition(|(ticket, _)| *ticket <= upto);
            *pending = rest;
            done.into_iter().map(|(_, d)| d).collect()
        };
        if released.is_empty() {
            return;
        }
        self.lock_outbox().extend(released);
        self.outbox_wake.notify_one();
    }

    /// Whether some outbox entry waits for a commit before it may be sent.
    pub fn has_unflushed_deliveries(&self) -> bool {
        !self
            .outbox_unflushed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    // -------------------------------------------------------------- outbox

    /// For a request that just became terminal and has a callback URL: marks
    /// its webhook pending and adds the delivery to `outbox`.
    pub(super) fn prepare_delivery(
        &self,
        rec: &mut RequestRecord,
        result: Option<&StoredResult>,
        payload: &PayloadFn<'_>,
        outbox: &mut sled::Batch,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let now = now_millis();
        let Some(d) = super::lifecycle::delivery_for(rec, result, payload, now) else {
            return Ok(None);
        };
        outbox.insert(
            &rec.id.to_be_bytes(),
            serde_json::to_vec(&d).map_err(|e| corrupt("delivery", e))?,
        );
        Ok(Some((now, rec.id)))
    }

    /// Schedules deliveries just written to the outbox, for after the next
    /// commit: the ticket is taken after their write, so the flush that
    /// covers it covers them.
    pub(super) fn schedule(&self, due: impl Iterator<Item = (u64, u64)>) {
        let mut pending = self
            .outbox_unflushed
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let ticket = self.written.fetch_add(1, Ordering::SeqCst) + 1;
        pending.extend(due.map(|d| (ticket, d)));
    }

    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    pub fn wake_outbox(&self) {
        self.outbox_wake.notify_one();
    }

    pub async fn outbox_notified(&self) {
        self.outbox_wake.notified().await
    }

    pub fn next_delivery_due(&self) -> Option<u64> {
        self.lock_outbox().first().map(|(due, _)| *due)
    }

    /// Takes up to `max` deliveries due by `now` out of the schedule; each
    /// must come back through `reschedule`, `retry` or `finish`.
    pub fn take_due_deliveries(&self, now: u64, max: usize) -> Vec<Delivery> {
        let mut taken = Vec::new();
        let mut idx = self.lock_outbox();
        while taken.len() < max {
            let Some(&(due, id)) = idx.first() else { break };
            if due > now {
                break;
            }
            idx.remove(&(due, id));
            match self.outbox.get(id.to_be_bytes()) {
                Ok(Some(v)) => match serde_json::from_slice::<Delivery>(&v) {
                    Ok(d) => taken.push(d),
                    Err(e) => {
                        tracing::error!(request = id, error = %e, "unreadable outbox entry; skipped")
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(request = id, error = %e, "cannot read the outbox");
                    idx.insert((now + 1000, id));
                    break;
                }
            }
        }
        taken
    }

    /// Puts a taken delivery back in the schedule without a try (its
    /// receiver is busy).
    pub fn reschedule_delivery(&self, d: &Delivery, due_ms: u64) {
        self.lock_outbox().insert((due_ms, d.request));
        self.outbox_wake.notify_one();
    }

    /// Records a failed try and schedules the next one at `d.due_ms`.
    pub fn retry_delivery(&self, d: &Delivery, state: WebhookState) -> Result<(), StoreError> {
        self.outbox.insert(
            d.request.to_be_bytes(),
            serde_json::to_vec(d).map_err(|e| corrupt("delivery", e))?,
        )?;
        self.set_webhook_state(d.request, state)?;
        self.reschedule_delivery(d, d.due_ms);
        Ok(())
    }

    /// Ends a delivery: delivered, or dead after its retries ran out.
    pub fn finish_delivery(
        &self,
        d: &Delivery,
        status: WebhookStatus,
        last_error: Option<String>,
    ) -> Result<(), StoreError> {
        self.set_webhook_state(
            d.request,
            WebhookState {
                status,
                attempts: d.attempts,
                last_error,
            },
        )?;
        self.outbox.remove(d.request.to_be_bytes())?;
        Ok(())
    }

    fn set_webhook_state(&self, id: u64, state: WebhookState) -> Result<(), StoreError> {
        if let Some(mut rec) = self.get_fixed(id)? {
            rec.webhook = Some(state);
            self.put_record(&rec)?;
        }
        Ok(())
    }
}
