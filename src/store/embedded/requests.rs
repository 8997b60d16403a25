//! Requests in sled: intake's writes (the custom id claimed first), the
//! reads that assemble a record from its fixed fields and its state, and
//! cancel.

use super::*;

impl SledStore {
    /// Stores a new deferred request and queues it, not yet durably: intake
    /// goes through [`SledStore::accept`], which runs this on the intake thread
    /// and commits before answering.
    ///
    /// The custom id is claimed first with one compare-and-swap, then the
    /// record, the body and, last, the queue entry are written with plain
    /// inserts. (A sled transaction over the four trees would be simpler, but
    /// in sled 0.34 each one rolls the log buffer with a synchronous
    /// writeback, twice per request, which defeats the group commit.) Each
    /// step leaves something recovery understands: a claimed id whose record
    /// or body is missing was never acknowledged and is taken over by the
    /// next intake of that id; a queued record without its queue entry is
    /// re-queued when its caller retries.
    pub fn insert_request(
        &self,
        mut rec: RequestRecord,
        body: &[u8],
    ) -> Result<Intake, StoreError> {
        rec.id = self.new_id()?;
        let id = rec.id.to_be_bytes();
        let cid = custom_id_key(&rec.tenant, &rec.custom_id);
        let _claim = InFlight::new(&self.in_flight, &cid)?;
        let mut expected: Option<sled::IVec> = None;
        loop {
            match self
                .custom_ids
                .compare_and_swap(&cid, expected.as_ref(), Some(&id[..]))?
            {
                Ok(()) => break,
                Err(cas) => {
                    let Some(current) = cas.current else {
                        expected = None;
                        continue;
                    };
                    let old_id = id_from(&current)?;
                    match self.get(old_id)? {
                        Some(old)
                            if self.bodies.contains_key(old_id.to_be_bytes())?
                                || old.status != RequestStatus::Queued =>
                        {
                            if old.body_sha256 != rec.body_sha256 {
                                return Ok(Intake::Conflict(old));
                            }
                            self.requeue_if_lost(&old)?;
                            return Ok(Intake::Existing(old));
                        }
                        // Claimed by an intake a crash cut short: take it over.
                        _ => expected = Some(current),
                    }
                }
            }
        }
        let rec_bytes = encode_record(&rec)?;
        self.requests.insert(id, rec_bytes)?;
        self.states.insert(id, &rec.state().encode())?;
        self.bodies.insert(id, body)?;
        let qk = QueueKey::of(&rec);
        let len = line_len(rec.endpoint, rec.id, rec.body_len);
        let now = now_millis();
        self.queue.insert(
            qk.entry(rec.id),
            &queue_value(now, len, rec.inputs, rec.deadline_at),
        )?;
        self.index_deadline(&qk, rec.id, rec.deadline_at);
        self.account(qk, len, rec.inputs, now);
        Ok(Intake::Created(rec))
    }

    /// A queued, unclaimed request whose queue entry a crash kept from being
    /// written gets it now (on its caller's retry).
    pub(super) fn requeue_if_lost(&self, rec: &RequestRecord) -> Result<(), StoreError> {
        if rec.status != RequestStatus::Queued || rec.batch.is_some() {
            return Ok(());
        }
        let _g = self.queue_lock.lock().unwrap_or_else(|p| p.into_inner());
        let qk = QueueKey::of(rec);
        let entry = qk.entry(rec.id);
        // Re-read under the lock: a claim may have taken it meanwhile.
        let still_unclaimed = self
            .get(rec.id)?
            .is_some_and(|r| r.batch.is_none() && r.status == RequestStatus::Queued);
        if still_unclaimed && !self.queue.contains_key(&entry)? {
            let len = line_len(rec.endpoint, rec.id, rec.body_len);
            let since = rec.created_at.saturating_mul(1000);
            self.queue
                .insert(entry, &queue_value(since, len, rec.inputs, rec.deadline_at))?;
            self.index_deadline(&qk, rec.id, rec.deadline_at);
            self.account(qk, len, rec.inputs, since);
            tracing::warn!(
                request = rec.id,
                "re-queued a request whose queue entry was lost in a crash"
            );
        }
        Ok(())
    }

    /// Removes a request that was stored but could not be made durable, so
    /// that Ferry holds nothing for a caller that was answered 503.
    pub fn forget_request(&self, rec: &RequestRecord) -> Result<(), StoreError> {
        let _g = self.queue_lock.lock().unwrap_or_else(|p| p.into_inner());
        let id = rec.id.to_be_bytes();
        let qk = QueueKey::of(rec);
        if let Some(v) = self.queue.remove(qk.entry(rec.id))? {
            self.unaccount(&qk, rec.id, &v);
        }
        // Only if the custom id still names this request: it must not free
        // the id of another request that holds it.
        let _ = self.custom_ids.compare_and_swap(
            custom_id_key(&rec.tenant, &rec.custom_id),
            Some(&id[..]),
            None as Option<&[u8]>,
        )?;
        self.requests.remove(id)?;
        self.states.remove(id)?;
        self.bodies.remove(id)?;
        Ok(())
    }

    /// A request with its current state. A request missing either part was
    /// cut short by a crash before it was acknowledged, and reads as absent.
    pub fn get(&self, id: u64) -> Result<Option<RequestRecord>, StoreError> {
        let Some(mut rec) = self.get_with_state(id)? else {
            return Ok(None);
        };
        if let Some(b) = rec.batch
            && let Some(batch) = self.get_batch(b)?
        {
            rec.lane = Some(batch.lane);
            rec.batch_id = upstream_batch_id(batch.state);
        }
        Ok(Some(rec))
    }

    /// Like [`get`](Self::get) without `batch_id`, for code that handles a
    /// whole batch and knows it.
    pub(super) fn get_with_state(&self, id: u64) -> Result<Option<RequestRecord>, StoreError> {
        let Some(state) = self.state(id)? else {
            return Ok(None);
        };
        let Some(mut rec) = self.get_fixed(id)? else {
            return Ok(None);
        };
        rec.set_state(state);
        Ok(Some(rec))
    }

    /// The record's fixed fields only; its state fields are defaults.
    pub(super) fn get_fixed(&self, id: u64) -> Result<Option<RequestRecord>, StoreError> {
        self.requests
            .get(id.to_be_bytes())?
            .map(|v| serde_json::from_slice(&v).map_err(|e| corrupt("record", e)))
            .transpose()
    }

    pub(super) fn state(&self, id: u64) -> Result<Option<RequestState>, StoreError> {
        self.states
            .get(id.to_be_bytes())?
            .map(|v| RequestState::decode(&v).ok_or_else(|| corrupt("state", "unreadable")))
            .transpose()
    }

    pub fn find(&self, tenant: &str, custom_id: &str) -> Result<Option<RequestRecord>, StoreError> {
        match self.custom_ids.get(custom_id_key(tenant, custom_id))? {
            Some(id) => self.get(id_from(&id)?),
            None => Ok(None),
        }
    }

    /// [`SledStore::find`] and, when the request is completed, its answer.
    pub fn find_answered(
        &self,
        tenant: &str,
        custom_id: &str,
    ) -> Result<Option<(RequestRecord, Option<StoredResult>)>, StoreError> {
        let Some(rec) = self.find(tenant, custom_id)? else {
            return Ok(None);
        };
        let answer = match rec.status {
            RequestStatus::Completed => self.result(rec.id)?,
            _ => None,
        };
        Ok(Some((rec, answer)))
    }

    pub fn body(&self, id: u64) -> Result<Option<sled::IVec>, StoreError> {
        Ok(self.bodies.get(id.to_be_bytes())?)
    }

    /// The input file's lines of members from `next` on, up to about
    /// `max_bytes`; returns them and the index of the first member not taken.
    pub fn input_lines(
        &self,
        endpoint: crate::endpoint::Endpoint,
        members: &[u64],
        mut next: usize,
        max_bytes: usize,
    ) -> Result<(bytes::Bytes, usize), StoreError> {
        let mut buf = bytes::BytesMut::with_capacity(max_bytes + 4096);
        while next < members.len() && buf.len() < max_bytes {
            let id = members[next];
            next += 1;
            let body = self.body(id)?.ok_or_else(|| {
                corrupt("batch input", format!("body of request {id} is missing"))
            })?;
            buf.extend_from_slice(line_prefix(endpoint, id).as_bytes());
            buf.extend_from_slice(&body);
            buf.extend_from_slice(LINE_SUFFIX.as_bytes());
        }
        Ok((buf.freeze(), next))
    }

    pub fn result(&self, id: u64) -> Result<Option<StoredResult>, StoreError> {
        self.results
            .get(id.to_be_bytes())?
            .map(|v| StoredResult::decode(&v).ok_or_else(|| corrupt("result", "too short")))
            .transpose()
    }

    /// Writes the record's fixed fields (not its state).
    pub(super) fn put_record(&self, rec: &RequestRecord) -> Result<(), StoreError> {
        let v = encode_record(rec)?;
        self.requests.insert(rec.id.to_be_bytes(), v)?;
        Ok(())
    }

    pub(super) fn put_state(&self, rec: &RequestRecord) -> Result<(), StoreError> {
        self.states
            .insert(rec.id.to_be_bytes(), &rec.state().encode())?;
        Ok(())
    }

    /// Cancels a request that is still queued and not claimed by a flush.
    pub fn cancel(
        &self,
        tenant: &str,
        custom_id: &str,
        payload: &PayloadFn<'_>,
    ) -> Result<CancelOutcome, StoreError> {
        let _g = self.queue_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut rec) = self.find(tenant, custom_id)? else {
            return Ok(CancelOutcome::NotFound);
        };
        match lifecycle::cancel_verdict(rec.status, rec.batch) {
            lifecycle::CancelVerdict::AlreadyCancelled => {
                return Ok(CancelOutcome::AlreadyCancelled(rec));
            }
            lifecycle::CancelVerdict::TooLate => return Ok(CancelOutcome::TooLate(rec)),
            lifecycle::CancelVerdict::Cancel => {}
        }
        let qk = QueueKey::of(&rec);
        if let Some(v) = self.queue.remove(qk.entry(rec.id))? {
            self.unaccount(&qk, rec.id, &v);
        }
        rec.status = lifecycle::checked_move(rec.status, RequestStatus::Cancelled)?;
        let now = now_secs();
        rec.completed_at = Some(now);
        // Indexed before its state says terminal: none escapes the purge.
        self.terminal
            .insert(encoding::terminal_key(now, rec.id), &[])?;
        let mut outbox = sled::Batch::default();
        let delivery = self.prepare_delivery(&mut rec, None, payload, &mut outbox)?;
        self.outbox.apply_batch(outbox)?;
        if delivery.is_some() {
            self.put_record(&rec)?;
        }
        self.put_state(&rec)?;
        self.schedule(delivery.into_iter());
        self.bodies.remove(rec.id.to_be_bytes())?;
        self.refresh_oldest(&qk)?;
        Ok(CancelOutcome::Cancelled(rec))
    }
}

/// The upstream's id of a batch in `state`, once it exists.
pub(super) fn upstream_batch_id(state: BatchState) -> Option<String> {
    match state {
        BatchState::Submitted { batch_id, .. } => Some(batch_id),
        BatchState::Done { batch_id, .. } => batch_id,
        BatchState::Claimed | BatchState::Uploaded { .. } => None,
    }
}
