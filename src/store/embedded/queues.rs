//! Queues in sled: the in-memory counts the flush policy reads (rebuilt
//! at open), and claims, which move a queue's oldest entries into a batch.

use super::*;

impl SledStore {
    /// Counts an entry that joined a queue (enqueued at `since_ms`).
    pub(super) fn account(&self, qk: QueueKey, len: u64, inputs: u64, since_ms: u64) {
        let mut s = self.queues.entry(qk).or_default();
        s.count += 1;
        s.bytes += len;
        s.inputs += inputs;
        if s.oldest_ms == 0 || since_ms < s.oldest_ms {
            s.oldest_ms = since_ms;
        }
    }

    /// Notes a queued request's deadline for the escalation scan.
    pub(super) fn index_deadline(&self, qk: &QueueKey, id: u64, deadline_at: Option<u64>) {
        if let Some(d) = deadline_at {
            self.deadlines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((d, id), qk.clone());
        }
    }

    /// Requests of `upstream` still in their queue whose deadline is at or
    /// before `before` (unix seconds), soonest first, at most `limit`:
    /// (queue, id, deadline) each. Index entries of requests that left their
    /// queue are dropped on the way (a re-queue indexes its request again).
    pub fn due_by_deadline(
        &self,
        upstream: &str,
        before: u64,
        limit: usize,
    ) -> Result<Vec<(QueueKey, u64, u64)>, StoreError> {
        let mut index = self.deadlines.lock().unwrap_or_else(|p| p.into_inner());
        let mut due = Vec::new();
        let mut gone = Vec::new();
        for (&(deadline, id), qk) in index.range(..=(before, u64::MAX)) {
            if due.len() >= limit {
                break;
            }
            if !self.queue.contains_key(qk.entry(id))? {
                gone.push((deadline, id));
            } else if qk.upstream == upstream {
                due.push((qk.clone(), id, deadline));
            }
        }
        for k in gone {
            index.remove(&k);
        }
        Ok(due)
    }

    /// Claims request `id` alone out of queue `qk` into a new batch sent on
    /// `lane` (an escalation for its deadline). Under the queue lock, as
    /// every claim: the request is in this batch or still queued, never also
    /// in a flush's. `None` when it is no longer in the queue.
    pub fn claim_request(
        &self,
        qk: &QueueKey,
        id: u64,
        lane: Lane,
        reason: &str,
    ) -> Result<Option<BatchRecord>, StoreError> {
        let _g = self.queue_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(v) = self.queue.get(qk.entry(id))? else {
            return Ok(None);
        };
        let (_, len) = parse_queue_value(&v).ok_or_else(|| corrupt("queue value", "bad"))?;
        let batch = BatchRecord {
            lane,
            ..BatchRecord::claimed(self.new_id()?, qk, 1, len, reason)
        };
        self.put_batch(&batch)?;
        self.members
            .insert(member_key(batch.id, id), id.to_be_bytes().to_vec())?;
        self.apply_claim(&batch, std::iter::once(id))?;
        Ok(Some(batch))
    }

    /// Uncounts request `id`'s entry (value `qval`) that left queue `qk`,
    /// and forgets its deadline: the escalation scan would drop the index
    /// entry only once the deadline came near, so a flushed request with a
    /// day's deadline would sit in memory for a day.
    pub(super) fn unaccount(&self, qk: &QueueKey, id: u64, qval: &[u8]) {
        let len = parse_queue_value(qval).map_or(0, |(_, l)| l);
        if let Some(mut s) = self.queues.get_mut(qk) {
            s.count = s.count.saturating_sub(1);
            s.bytes = s.bytes.saturating_sub(len);
            s.inputs = s.inputs.saturating_sub(parse_queue_inputs(qval));
        }
        if let Some(deadline) = encoding::parse_queue_deadline(qval) {
            self.deadlines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&(deadline, id));
        }
    }

    /// Recomputes the oldest entry of a queue after entries left it.
    pub(super) fn refresh_oldest(&self, qk: &QueueKey) -> Result<(), StoreError> {
        let first = self.queue_entries(qk).next().transpose()?;
        let oldest = first
            .and_then(|(_, v)| parse_queue_value(&v))
            .map_or(0, |(at, _)| at);
        if let Some(mut s) = self.queues.get_mut(qk) {
            s.oldest_ms = oldest;
            if s.count == 0 {
                s.bytes = 0;
                s.oldest_ms = 0;
                s.inputs = 0;
            }
        }
        Ok(())
    }

    /// The entries of one queue, oldest first, as (request id, value). The
    /// prefix scan alone is not enough: it also finds the entries of any
    /// queue whose key extends this one's (a model name containing NUL, as
    /// stores written before intake refused them may hold), so each key is
    /// parsed and checked.
    pub(super) fn queue_entries<'a>(
        &'a self,
        qk: &'a QueueKey,
    ) -> impl Iterator<Item = Result<(u64, sled::IVec), StoreError>> + 'a {
        self.queue
            .scan_prefix(qk.prefix())
            .filter_map(move |item| match item {
                Err(e) => Some(Err(e.into())),
                Ok((k, v)) => match QueueKey::parse_entry(&k) {
                    Some((key, id)) if key == *qk => Some(Ok((id, v))),
                    Some(_) => None,
                    None => Some(Err(corrupt("queue key", "bad"))),
                },
            })
    }

    pub fn queue_stats(&self) -> Vec<(QueueKey, QueueStats)> {
        self.queues
            .iter()
            .map(|e| (e.key().clone(), *e.value()))
            .collect()
    }

    pub fn queue_stats_for(&self, qk: &QueueKey) -> Option<QueueStats> {
        self.queues.get(qk).map(|s| *s)
    }

    /// Forgets the counts of `upstream`'s queues that are empty: one entry
    /// per model ever queued would otherwise stay for the process's life.
    /// Atomic per entry, so a queue that gains a request meanwhile keeps
    /// its count.
    pub fn prune_idle_queues(&self, upstream: &str) {
        self.queues
            .retain(|qk, s| qk.upstream != upstream || s.count > 0);
    }

    pub fn queued_total(&self) -> u64 {
        self.queues.iter().map(|e| e.value().count).sum()
    }

    /// Moves the oldest entries of a queue (at most `max_requests` lines and
    /// `max_bytes` of JSONL) into a new batch. The batch record is written
    /// first, then its members, then the queue entries leave: recovery
    /// finishes whatever a crash cut short ([`SledStore::recover_claims`]).
    pub fn claim_batch(
        &self,
        qk: &QueueKey,
        max_requests: usize,
        max_bytes: u64,
        reason: &str,
    ) -> Result<Option<BatchRecord>, StoreError> {
        let _g = self.queue_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut ids = Vec::new();
        let mut bytes = 0u64;
        let mut inputs = 0u64;
        let max_inputs = lifecycle::max_inputs(qk.endpoint);
        for item in self.queue_entries(qk) {
            let (id, v) = item?;
            let (_, len) = parse_queue_value(&v).ok_or_else(|| corrupt("queue value", "bad"))?;
            let n = parse_queue_inputs(&v);
            if !lifecycle::claim_takes(ids.len(), bytes, len, max_requests, max_bytes)
                || !lifecycle::inputs_fit(ids.len(), inputs, n, max_inputs)
            {
                break;
            }
            ids.push(id);
            bytes += len;
            inputs += n;
        }
        if ids.is_empty() {
            return Ok(None);
        }
        let batch = BatchRecord::claimed(self.new_id()?, qk, ids.len() as u64, bytes, reason);
        self.put_batch(&batch)?;
        // One key per slice of 1,000 members (the ids packed in its value),
        // not one per member: sled copies a leaf on every insert, and 50,000
        // single inserts were about a quarter of a flush's memory growth. A crash between
        // slices leaves a claim with part of its members, which recovery
        // finishes with the count and bytes recomputed.
        for slice in ids.chunks(WRITE_SLICE) {
            let packed: Vec<u8> = slice.iter().flat_map(|id| id.to_be_bytes()).collect();
            self.members
                .insert(member_key(batch.id, slice[0]), packed)?;
        }
        self.apply_claim(&batch, ids.iter().copied())?;
        Ok(Some(batch))
    }

    /// Takes claimed members out of the queue and points them at the batch.
    /// Idempotent, so recovery can run it again.
    pub(super) fn apply_claim(
        &self,
        batch: &BatchRecord,
        ids: impl Iterator<Item = u64>,
    ) -> Result<(), StoreError> {
        let qk = QueueKey {
            upstream: batch.upstream.clone(),
            endpoint: batch.endpoint,
            model: batch.model.clone(),
        };
        let mut queue = sled::Batch::default();
        let mut states = sled::Batch::default();
        for (n, id) in ids.enumerate() {
            // Applied in slices: sled copies whole leaves per batch, so one
            // 50,000-entry batch costs hundreds of MiB at its peak.
            if n > 0 && n % WRITE_SLICE == 0 {
                self.queue.apply_batch(std::mem::take(&mut queue))?;
                self.states.apply_batch(std::mem::take(&mut states))?;
            }
            let entry = qk.entry(id);
            if let Some(v) = self.queue.get(&entry)? {
                self.unaccount(&qk, id, &v);
                queue.remove(entry);
            }
            if let Some(mut state) = self.state(id)?
                && state.batch != Some(batch.id)
                && state.status == RequestStatus::Queued
            {
                state.batch = Some(batch.id);
                states.insert(&id.to_be_bytes(), &state.encode());
            }
        }
        self.queue.apply_batch(queue)?;
        self.states.apply_batch(states)?;
        self.refresh_oldest(&qk)
    }
}
