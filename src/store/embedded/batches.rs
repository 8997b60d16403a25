//! Batches in sled: their records and the upstream objects they name,
//! their members (packed per slice), recovery of claims a crash cut short,
//! and moving members to `submitted`.

use super::*;

impl SledStore {
    /// Writes a batch record and keeps the batch indexes in step: entries
    /// are added before the record and removed after it, so a crash between
    /// leaves an index naming too much (read past), never too little.
    pub fn put_batch(&self, b: &BatchRecord) -> Result<(), StoreError> {
        let v = serde_json::to_vec(b).map_err(|e| corrupt("batch", e))?;
        let key = b.id.to_be_bytes();
        let open = is_open(b);
        if open {
            self.open_batches.insert(key, &[])?;
        }
        if !b.is_live() {
            self.done_batches.insert(key, &[])?;
        }
        self.batches.insert(key, v)?;
        if !open {
            self.open_batches.remove(key)?;
        }
        self.track_upstream_objects(b);
        Ok(())
    }

    /// The records the `open_batches` index names, in id order, that are
    /// still open (an entry a crash left behind is read past).
    pub(super) fn open_batch_records(
        &self,
    ) -> impl Iterator<Item = Result<BatchRecord, StoreError>> + '_ {
        self.open_batches.iter().filter_map(move |item| {
            let read = || -> Result<Option<BatchRecord>, StoreError> {
                let (k, _) = item?;
                Ok(self.get_batch(id_from(&k)?)?.filter(is_open))
            };
            read().transpose()
        })
    }

    pub(super) fn track_upstream_objects(&self, b: &BatchRecord) {
        let ids = b.upstream_objects();
        let mut map = self
            .upstream_objects
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if ids.is_empty() {
            map.remove(&b.id);
        } else {
            map.insert(b.id, ids);
        }
    }

    /// Whether `id` is one of Ferry's own upstream files or batches that may
    /// still exist upstream. Linear in the live batches, which are few; asked
    /// only of passthrough calls that name a file or batch.
    pub fn is_own_upstream_object(&self, id: &str) -> bool {
        self.upstream_objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|ids| ids.iter().any(|x| x == id))
    }

    pub fn get_batch(&self, id: u64) -> Result<Option<BatchRecord>, StoreError> {
        self.batches
            .get(id.to_be_bytes())?
            .map(|v| serde_json::from_slice(&v).map_err(|e| corrupt("batch", e)))
            .transpose()
    }

    /// Batches not yet finished, read through the `open_batches` index.
    pub fn live_batches(&self) -> Result<Vec<BatchRecord>, StoreError> {
        let mut out = Vec::new();
        for b in self.open_batch_records() {
            let b = b?;
            if b.is_live() {
                out.push(b);
            }
        }
        Ok(out)
    }

    /// Finished batches of an upstream whose upstream files are not all deleted.
    pub fn batches_owing_cleanup(&self, upstream: &str) -> Result<Vec<BatchRecord>, StoreError> {
        let mut out = Vec::new();
        for b in self.open_batch_records() {
            let b = b?;
            if b.upstream == upstream
                && matches!(&b.state, BatchState::Done { cleanup, .. } if !cleanup.is_empty())
            {
                out.push(b);
            }
        }
        Ok(out)
    }

    /// Member ids of a batch, in id (arrival) order.
    pub fn members(&self, batch: u64) -> impl Iterator<Item = Result<u64, StoreError>> + '_ {
        self.members
            .scan_prefix(batch.to_be_bytes())
            .flat_map(|item| match unpack_members(item) {
                Ok(ids) => ids.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(e) => vec![Err(e)],
            })
    }

    /// Finishes claims that a crash cut short, and drops batch records that
    /// never got members.
    pub fn recover_claims(&self) -> Result<usize, StoreError> {
        let _g = self.queue_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for b in self.live_batches()? {
            let ids: Vec<u64> = self.members(b.id).collect::<Result<_, _>>()?;
            if ids.is_empty() && b.state == BatchState::Claimed {
                self.batches.remove(b.id.to_be_bytes())?;
                self.open_batches.remove(b.id.to_be_bytes())?;
                continue;
            }
            if b.state == BatchState::Claimed {
                self.recount_claim(&b, &ids)?;
                self.apply_claim(&b, ids.into_iter())?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// A claim a crash cut short may have only some of its members: its
    /// count and bytes (the upload's declared length) must match them.
    pub(super) fn recount_claim(&self, b: &BatchRecord, ids: &[u64]) -> Result<(), StoreError> {
        let mut bytes = 0;
        for id in ids {
            if let Some(rec) = self.get_fixed(*id)? {
                bytes += line_len(rec.endpoint, *id, rec.body_len);
            }
        }
        if (b.request_count, b.bytes) != (ids.len() as u64, bytes) {
            tracing::warn!(
                ferry_batch = b.id,
                members = ids.len(),
                claimed = b.request_count,
                "a claim cut short by a crash kept part of its members"
            );
            self.put_batch(&BatchRecord {
                request_count: ids.len() as u64,
                bytes,
                ..b.clone()
            })?;
        }
        Ok(())
    }

    /// Records the upstream batch and moves every member to `submitted`.
    pub fn mark_submitted(
        &self,
        batch: &mut BatchRecord,
        file_id: &str,
        batch_id: &str,
    ) -> Result<(), StoreError> {
        batch.state = BatchState::Submitted {
            file_id: file_id.to_owned(),
            batch_id: batch_id.to_owned(),
        };
        self.put_batch(batch)?;
        self.apply_submitted(batch.id)
    }

    /// Idempotent: recovery runs it again for batches recorded as submitted.
    /// The upstream batch id is not written per member: reads take it from
    /// the batch record, which is written first.
    pub fn apply_submitted(&self, batch: u64) -> Result<(), StoreError> {
        let now = now_secs();
        let mut states = sled::Batch::default();
        for (n, id) in self.members(batch).enumerate() {
            let id = id?;
            if n > 0 && n % WRITE_SLICE == 0 {
                self.states.apply_batch(std::mem::take(&mut states))?;
            }
            let Some(mut state) = self.state(id)? else {
                continue;
            };
            if state.status == RequestStatus::Queued && state.batch == Some(batch) {
                state.status = lifecycle::checked_move(state.status, RequestStatus::Submitted)?;
                state.submitted_at = Some(now);
                state.attempts += 1;
                states.insert(&id.to_be_bytes(), &state.encode());
            }
        }
        self.states.apply_batch(states)?;
        Ok(())
    }
}

/// Whether a batch belongs in the `open_batches` index: live, or finished
/// but still owing the upstream a file delete.
pub(super) fn is_open(b: &BatchRecord) -> bool {
    b.is_live() || !b.upstream_objects().is_empty()
}
