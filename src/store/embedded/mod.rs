//! The durable state, in sled.
//!
//! Trees (keys are big-endian so that sled's order is numeric order):
//! - `requests`: id → [`RequestRecord`]'s fixed fields (JSON)
//! - `states`: id → [`RequestState`] (29 bytes), what changes per batch
//! - `bodies`: id → the request body as it goes into the JSONL line
//! - `custom_ids`: tenant `\0` custom_id → id
//! - `queue`: upstream `\0` model `\0` id → enqueued-at millis, line length
//! - `batches`: batch id → [`BatchRecord`] (JSON)
//! - `members`: batch id, first request id of a slice → the slice's request
//!   ids, 8 bytes each (an empty value: the key's id alone, as stores
//!   written before packing have it)
//! - `results`: id → [`StoredResult`] (status code, then the body verbatim)
//! - `outbox`: id → [`Delivery`] (JSON), webhooks not yet delivered
//!
//! The default tree holds `ferry_format`, the layout version above.
//!
//! Writes go to sled's page cache; [`SledStore::commit`] makes them durable with
//! one fsync for every caller waiting at that moment (group commit). The
//! store facade ([`crate::store::Store`]) commits before it returns, so
//! nothing outside `store` commits.
//!
//! Files: `encoding` (keys and values, the JSONL line's fixed parts),
//! `durability` (the group commit and the blocking pool), `intake_writer`
//! (deferred calls in, durable on return), `outbox` (webhook deliveries);
//! this file holds requests, queues, claims, batches and outcomes.

mod durability;
pub(crate) mod encoding;
mod intake_writer;
mod outbox;

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use dashmap::DashMap;

use super::error::corrupt;
use super::*;

use encoding::{
    custom_id_key, encode_record, id_from, member_key, parse_queue_value, queue_value,
    unpack_members,
};

/// Marks a custom id as being stored by this process for as long as it lives.
struct InFlight<'a> {
    set: &'a dashmap::DashSet<Vec<u8>>,
    key: Vec<u8>,
}

impl<'a> InFlight<'a> {
    fn new(set: &'a dashmap::DashSet<Vec<u8>>, key: &[u8]) -> Result<Self, StoreError> {
        if !set.insert(key.to_vec()) {
            return Err(StoreError::Busy);
        }
        Ok(InFlight {
            set,
            key: key.to_vec(),
        })
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.set.remove(&self.key);
    }
}

pub struct SledStore {
    /// Held for the store's life so a second Ferry on the same data dir is
    /// refused with a plain reason (sled's own lock error names only its
    /// file). `None` for a store built on an already open database.
    _dir_lock: Option<std::fs::File>,
    db: sled::Db,
    requests: sled::Tree,
    states: sled::Tree,
    bodies: sled::Tree,
    custom_ids: sled::Tree,
    queue: sled::Tree,
    batches: sled::Tree,
    members: sled::Tree,
    results: sled::Tree,
    outbox: sled::Tree,
    /// (due millis, request id) of every durable outbox entry not being
    /// sent now.
    outbox_due: Mutex<BTreeSet<(u64, u64)>>,
    /// Outbox entries written but maybe not yet durable, each with the
    /// write ticket ([`SledStore::commit`]'s counter) taken after its write. The
    /// commit that covers a ticket moves the entry to `outbox_due`: a
    /// webhook is never sent for a state a crash could still undo.
    outbox_unflushed: Mutex<Vec<(u64, (u64, u64))>>,
    outbox_wake: tokio::sync::Notify,
    queues: DashMap<QueueKey, QueueStats>,
    /// Serialises claims, cancels and re-queues, which move entries out of and
    /// into the queue tree, so a request is never both cancelled and claimed.
    queue_lock: Mutex<()>,
    /// Group commit: writes bump `written`; a flush records how far it got in
    /// `flushed`; callers whose write is already covered skip the fsync.
    written: AtomicU64,
    flushed: AtomicU64,
    flush_lock: tokio::sync::Mutex<()>,
    /// Observes each durable flush's duration, once metrics are attached.
    flush_histogram: std::sync::OnceLock<prometheus::Histogram>,
    /// Custom ids being stored right now by this process: a second intake of
    /// the same id must not mistake a claim in progress for a crashed one.
    in_flight: dashmap::DashSet<Vec<u8>>,
    /// Per Ferry batch, its upstream files and batch that may still exist
    /// (`BatchRecord::upstream_objects`), kept in step by `put_batch`. The
    /// proxy refuses tenants access to these: they hold every tenant's
    /// prompts and answers, and deleting one would lose results.
    upstream_objects: Mutex<HashMap<u64, Vec<String>>>,
    /// The intake writer's queue, started with the first intake
    /// ([`SledStore::accept`]).
    intake: std::sync::OnceLock<intake_writer::Queue>,
    /// Tests only: while set, [`SledStore::commit`] fails (a full disk, an I/O
    /// error), counting each failure.
    #[cfg(test)]
    pub(crate) fail_commits: (std::sync::atomic::AtomicBool, AtomicU64),
    /// Tests only: the most outcomes one `apply_outcomes` call was given.
    #[cfg(test)]
    pub(crate) largest_outcome_write: std::sync::atomic::AtomicUsize,
}

impl SledStore {
    /// Opens (or creates) the database and rebuilds the in-memory queue stats.
    /// `cache_bytes` is sled's page cache, counted in on-disk bytes; in
    /// memory it takes up to about twice that (see README, Performance).
    pub fn open(path: &std::path::Path, cache_bytes: u64) -> Result<SledStore, StoreError> {
        let dir_lock = super::instance::lock_data_dir(path)?;
        let mut store = SledStore::from_db(open_db(path, cache_bytes)?)?;
        store._dir_lock = Some(dir_lock);
        Ok(store)
    }

    /// Builds the store on an open database: checks its layout, rebuilds the
    /// queue stats and the outbox schedule from disk.
    fn from_db(db: sled::Db) -> Result<SledStore, StoreError> {
        let store = SledStore {
            _dir_lock: None,
            requests: db.open_tree("requests")?,
            states: db.open_tree("states")?,
            bodies: db.open_tree("bodies")?,
            custom_ids: db.open_tree("custom_ids")?,
            queue: db.open_tree("queue")?,
            batches: db.open_tree("batches")?,
            members: db.open_tree("members")?,
            results: db.open_tree("results")?,
            outbox: db.open_tree("outbox")?,
            outbox_due: Mutex::new(BTreeSet::new()),
            outbox_unflushed: Mutex::new(Vec::new()),
            outbox_wake: tokio::sync::Notify::new(),
            db,
            queues: DashMap::new(),
            queue_lock: Mutex::new(()),
            written: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            flush_lock: tokio::sync::Mutex::new(()),
            flush_histogram: std::sync::OnceLock::new(),
            in_flight: dashmap::DashSet::new(),
            upstream_objects: Mutex::new(HashMap::new()),
            intake: std::sync::OnceLock::new(),
            #[cfg(test)]
            fail_commits: Default::default(),
            #[cfg(test)]
            largest_outcome_write: Default::default(),
        };
        store.check_format()?;
        store.repair_intake_round()?;
        for item in store.batches.iter() {
            let (_, v) = item?;
            let b: BatchRecord = serde_json::from_slice(&v).map_err(|e| corrupt("batch", e))?;
            store.track_upstream_objects(&b);
        }
        for item in store.queue.iter() {
            let (k, v) = item?;
            let (qk, _) = QueueKey::parse_entry(&k).ok_or_else(|| corrupt("queue key", "bad"))?;
            let (at, len) = parse_queue_value(&v).ok_or_else(|| corrupt("queue value", "bad"))?;
            store.account(qk, len, at);
        }
        {
            let mut due = store.lock_outbox();
            for item in store.outbox.iter() {
                let (_, v) = item?;
                let d: Delivery = serde_json::from_slice(&v).map_err(|e| corrupt("delivery", e))?;
                due.insert((d.due_ms, d.request));
            }
        }
        Ok(store)
    }

    /// Refuses a data_dir laid out by another build instead of misreading
    /// it; an empty one is stamped with this build's layout.
    fn check_format(&self) -> Result<(), StoreError> {
        match self.db.get(FORMAT_KEY)? {
            Some(v) if v == FORMAT => Ok(()),
            Some(v) => Err(corrupt(
                "data_dir",
                format!(
                    "it is in store format {}, this build reads format {}",
                    String::from_utf8_lossy(&v),
                    String::from_utf8_lossy(FORMAT)
                ),
            )),
            None if self.requests.is_empty() && self.batches.is_empty() => {
                self.db.insert(FORMAT_KEY, FORMAT)?;
                Ok(())
            }
            None => Err(corrupt(
                "data_dir",
                "it was written by an earlier Ferry build (store format 1); \
                 let that build drain it, or start with an empty data_dir",
            )),
        }
    }

    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    pub fn new_id(&self) -> Result<u64, StoreError> {
        // sled's ids are unique across restarts (it persists a high-water mark).
        Ok(self.db.generate_id()? + 1)
    }

    // ------------------------------------------------------------ requests

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
        let len = line_len(rec.id, rec.body_len);
        let now = now_millis();
        self.queue
            .insert(qk.entry(rec.id), &queue_value(now, len))?;
        self.account(qk, len, now);
        Ok(Intake::Created(rec))
    }

    /// A queued, unclaimed request whose queue entry a crash kept from being
    /// written gets it now (on its caller's retry).
    fn requeue_if_lost(&self, rec: &RequestRecord) -> Result<(), StoreError> {
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
            let len = line_len(rec.id, rec.body_len);
            let since = rec.created_at.saturating_mul(1000);
            self.queue.insert(entry, &queue_value(since, len))?;
            self.account(qk, len, since);
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
            self.unaccount(&qk, &v);
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

    /// Counts an entry that joined a queue (enqueued at `since_ms`).
    fn account(&self, qk: QueueKey, len: u64, since_ms: u64) {
        let mut s = self.queues.entry(qk).or_default();
        s.count += 1;
        s.bytes += len;
        if s.oldest_ms == 0 || since_ms < s.oldest_ms {
            s.oldest_ms = since_ms;
        }
    }

    fn unaccount(&self, qk: &QueueKey, qval: &[u8]) {
        let len = parse_queue_value(qval).map_or(0, |(_, l)| l);
        if let Some(mut s) = self.queues.get_mut(qk) {
            s.count = s.count.saturating_sub(1);
            s.bytes = s.bytes.saturating_sub(len);
        }
    }

    /// Recomputes the oldest entry of a queue after entries left it.
    fn refresh_oldest(&self, qk: &QueueKey) -> Result<(), StoreError> {
        let first = self.queue_entries(qk).next().transpose()?;
        let oldest = first
            .and_then(|(_, v)| parse_queue_value(&v))
            .map_or(0, |(at, _)| at);
        if let Some(mut s) = self.queues.get_mut(qk) {
            s.oldest_ms = oldest;
            if s.count == 0 {
                s.bytes = 0;
                s.oldest_ms = 0;
            }
        }
        Ok(())
    }

    /// The entries of one queue, oldest first, as (request id, value). The
    /// prefix scan alone is not enough: it also finds the entries of any
    /// queue whose key extends this one's (a model name containing NUL, as
    /// stores written before intake refused them may hold), so each key is
    /// parsed and checked.
    fn queue_entries<'a>(
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

    /// A request with its current state. A request missing either part was
    /// cut short by a crash before it was acknowledged, and reads as absent.
    pub fn get(&self, id: u64) -> Result<Option<RequestRecord>, StoreError> {
        let Some(mut rec) = self.get_with_state(id)? else {
            return Ok(None);
        };
        if let Some(b) = rec.batch {
            rec.batch_id = self.upstream_batch_id(b)?;
        }
        Ok(Some(rec))
    }

    /// Like [`get`](Self::get) without `batch_id`, for code that handles a
    /// whole batch and knows it.
    fn get_with_state(&self, id: u64) -> Result<Option<RequestRecord>, StoreError> {
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
    fn get_fixed(&self, id: u64) -> Result<Option<RequestRecord>, StoreError> {
        self.requests
            .get(id.to_be_bytes())?
            .map(|v| serde_json::from_slice(&v).map_err(|e| corrupt("record", e)))
            .transpose()
    }

    fn state(&self, id: u64) -> Result<Option<RequestState>, StoreError> {
        self.states
            .get(id.to_be_bytes())?
            .map(|v| RequestState::decode(&v).ok_or_else(|| corrupt("state", "unreadable")))
            .transpose()
    }

    /// The upstream's id for one of Ferry's batches, once it exists.
    fn upstream_batch_id(&self, batch: u64) -> Result<Option<String>, StoreError> {
        Ok(self.get_batch(batch)?.and_then(|b| match b.state {
            BatchState::Submitted { batch_id, .. } => Some(batch_id),
            BatchState::Done { batch_id, .. } => batch_id,
            BatchState::Claimed | BatchState::Uploaded { .. } => None,
        }))
    }

    pub fn find(&self, tenant: &str, custom_id: &str) -> Result<Option<RequestRecord>, StoreError> {
        match self.custom_ids.get(custom_id_key(tenant, custom_id))? {
            Some(id) => self.get(id_from(&id)?),
            None => Ok(None),
        }
    }

    pub fn body(&self, id: u64) -> Result<Option<sled::IVec>, StoreError> {
        Ok(self.bodies.get(id.to_be_bytes())?)
    }

    /// The input file's lines of members from `next` on, up to about
    /// `max_bytes`; returns them and the index of the first member not taken.
    pub fn input_lines(
        &self,
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
            buf.extend_from_slice(line_prefix(id).as_bytes());
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
    fn put_record(&self, rec: &RequestRecord) -> Result<(), StoreError> {
        let v = encode_record(rec)?;
        self.requests.insert(rec.id.to_be_bytes(), v)?;
        Ok(())
    }

    fn put_state(&self, rec: &RequestRecord) -> Result<(), StoreError> {
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
            self.unaccount(&qk, &v);
        }
        rec.status = lifecycle::checked_move(rec.status, RequestStatus::Cancelled)?;
        rec.completed_at = Some(now_secs());
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

    // -------------------------------------------------------------- queues

    pub fn queue_stats(&self) -> Vec<(QueueKey, QueueStats)> {
        self.queues
            .iter()
            .map(|e| (e.key().clone(), *e.value()))
            .collect()
    }

    pub fn queue_stats_for(&self, qk: &QueueKey) -> Option<QueueStats> {
        self.queues.get(qk).map(|s| *s)
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
        for item in self.queue_entries(qk) {
            let (id, v) = item?;
            let (_, len) = parse_queue_value(&v).ok_or_else(|| corrupt("queue value", "bad"))?;
            if !lifecycle::claim_takes(ids.len(), bytes, len, max_requests, max_bytes) {
                break;
            }
            ids.push(id);
            bytes += len;
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
    fn apply_claim(
        &self,
        batch: &BatchRecord,
        ids: impl Iterator<Item = u64>,
    ) -> Result<(), StoreError> {
        let qk = QueueKey {
            upstream: batch.upstream.clone(),
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
                self.unaccount(&qk, &v);
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

    // ------------------------------------------------------------- batches

    pub fn put_batch(&self, b: &BatchRecord) -> Result<(), StoreError> {
        let v = serde_json::to_vec(b).map_err(|e| corrupt("batch", e))?;
        self.batches.insert(b.id.to_be_bytes(), v)?;
        self.track_upstream_objects(b);
        Ok(())
    }

    fn track_upstream_objects(&self, b: &BatchRecord) {
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

    pub fn live_batches(&self) -> Result<Vec<BatchRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.batches.iter() {
            let (_, v) = item?;
            let b: BatchRecord = serde_json::from_slice(&v).map_err(|e| corrupt("batch", e))?;
            if b.is_live() {
                out.push(b);
            }
        }
        Ok(out)
    }

    /// Finished batches of an upstream whose upstream files are not all deleted.
    pub fn batches_owing_cleanup(&self, upstream: &str) -> Result<Vec<BatchRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.batches.iter() {
            let (_, v) = item?;
            let b: BatchRecord = serde_json::from_slice(&v).map_err(|e| corrupt("batch", e))?;
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
    fn recount_claim(&self, b: &BatchRecord, ids: &[u64]) -> Result<(), StoreError> {
        let mut bytes = 0;
        for id in ids {
            if let Some(rec) = self.get_fixed(*id)? {
                bytes += line_len(*id, rec.body_len);
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
        let batch_id = self.upstream_batch_id(batch)?;
        let mut reqs = sled::Batch::default();
        let mut states = sled::Batch::default();
        let mut results = sled::Batch::default();
        let mut queue = sled::Batch::default();
        let mut bodies = sled::Batch::default();
        let mut outbox = sled::Batch::default();
        let mut deliveries = Vec::new();
        let mut done = Vec::new();
        let mut requeued: Vec<(QueueKey, u64, u64)> = Vec::new();
        for (id, outcome) in outcomes {
            let Some(mut rec) = self.get_with_state(id)? else {
                continue;
            };
            if !lifecycle::outcome_applies(rec.status, rec.batch, batch) {
                continue;
            }
            let (status, error, stored) = match lifecycle::outcome_effect(outcome, rec.attempts) {
                lifecycle::Effect::Finish {
                    status,
                    error,
                    result,
                } => (status, error, result),
                lifecycle::Effect::Requeue { attempts } => {
                    rec.attempts = attempts;
                    let qk = QueueKey::of(&rec);
                    let len = line_len(id, rec.body_len);
                    // Age counts from acceptance: a re-queued request has
                    // waited already, so the time threshold sends it soon.
                    let since = rec.created_at.saturating_mul(1000);
                    queue.insert(qk.entry(id), &queue_value(since, len));
                    requeued.push((qk, len, since));
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
            rec.batch_id.clone_from(&batch_id);
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
        // Results, webhooks and errors before states: a reader that sees
        // `completed` finds its result, and no terminal request lacks its
        // webhook.
        self.results.apply_batch(results)?;
        self.outbox.apply_batch(outbox)?;
        self.queue.apply_batch(queue)?;
        self.requests.apply_batch(reqs)?;
        self.states.apply_batch(states)?;
        self.bodies.apply_batch(bodies)?;
        self.schedule(deliveries.into_iter());
        for (qk, len, since) in requeued {
            self.account(qk, len, since);
        }
        Ok(done)
    }
}

/// The store layout this build reads and writes (see the module docs).
const FORMAT_KEY: &[u8] = b"ferry_format";
const FORMAT: &[u8] = b"2";

/// Entries per sled write batch when a whole batch's members are updated,
/// and members per packed `members` value.
const WRITE_SLICE: usize = 1_000;

fn open_db(path: &std::path::Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    Ok(sled::Config::new()
        .path(path)
        .cache_capacity(cache_bytes)
        .mode(sled::Mode::HighThroughput)
        .open()?)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    fn store() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path(), 64 << 20).unwrap();
        (dir, s)
    }

    /// A database that outlives the stores built on it. "Reopen" tests build
    /// a second store on the same handle: sled releases its file lock from a
    /// background thread some time after the last handle drops (spacejam/sled
    /// #1289), so dropping and reopening the directory in one process races.
    /// Durability across real restarts is tested on the binary (crash.rs).
    fn sled_db() -> (tempfile::TempDir, sled::Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path(), 64 << 20).unwrap();
        (dir, db)
    }

    /// Queues `n` requests of tenant `t` with custom ids `{prefix}0..`;
    /// returns their ids in order.
    fn queue_n(s: &SledStore, prefix: &str, n: usize) -> Vec<u64> {
        (0..n)
            .map(|i| {
                match s
                    .insert_request(rec("t", &format!("{prefix}{i}"), "h"), b"{}")
                    .unwrap()
                {
                    Intake::Created(r) => r.id,
                    other => panic!("{other:?}"),
                }
            })
            .collect()
    }

    /// A batch record just claimed: 1 request of 10 bytes for `u`/`m`.
    fn claimed(id: u64) -> BatchRecord {
        BatchRecord {
            id,
            upstream: "u".into(),
            model: "m".into(),
            state: BatchState::Claimed,
            created_at: 0,
            request_count: 1,
            bytes: 10,
            reason: "size".into(),
            missing_since: None,
        }
    }

    fn rec(tenant: &str, cid: &str, body_hash: &str) -> RequestRecord {
        RequestRecord::for_test(tenant, cid, body_hash)
    }

    fn no_payload(_: &RequestRecord, _: Option<&StoredResult>) -> String {
        String::new()
    }

    fn qk() -> QueueKey {
        QueueKey {
            upstream: "u".into(),
            model: "m".into(),
        }
    }

    #[test]
    fn custom_ids_are_idempotent_per_tenant() {
        let (_d, s) = store();
        let Intake::Created(a) = s.insert_request(rec("t1", "x", "h1"), b"{}").unwrap() else {
            panic!()
        };
        let Intake::Existing(b) = s.insert_request(rec("t1", "x", "h1"), b"{}").unwrap() else {
            panic!()
        };
        assert_eq!(a.id, b.id);
        assert!(matches!(
            s.insert_request(rec("t1", "x", "h2"), b"{}").unwrap(),
            Intake::Conflict(_)
        ));
        assert!(matches!(
            s.insert_request(rec("t2", "x", "h2"), b"{}").unwrap(),
            Intake::Created(_)
        ));
        assert_eq!(s.queue_stats()[0].1.count, 2);
        assert!(s.find("t3", "x").unwrap().is_none());
    }

    #[test]
    fn an_intake_cut_short_by_a_crash_is_repaired() {
        let (_d, s) = store();
        // A claimed custom id whose record was never written: taken over.
        s.custom_ids
            .insert(custom_id_key("t", "lost"), &777u64.to_be_bytes())
            .unwrap();
        let Intake::Created(r) = s.insert_request(rec("t", "lost", "h"), b"{}").unwrap() else {
            panic!()
        };
        assert_eq!(s.find("t", "lost").unwrap().unwrap().id, r.id);
        // A record written without its queue entry: re-queued on retry.
        let Intake::Created(r) = s.insert_request(rec("t", "q", "h"), b"{}").unwrap() else {
            panic!()
        };
        let qk = qk();
        let v = s.queue.remove(qk.entry(r.id)).unwrap().unwrap();
        s.unaccount(&qk, &v);
        let before = s.queue_stats_for(&qk).unwrap().count;
        assert!(matches!(
            s.insert_request(rec("t", "q", "h"), b"{}").unwrap(),
            Intake::Existing(_)
        ));
        assert_eq!(s.queue_stats_for(&qk).unwrap().count, before + 1);
        assert!(s.queue.contains_key(qk.entry(r.id)).unwrap());
        // An id being stored right now by this process is busy, not lost.
        let _claim = InFlight::new(&s.in_flight, &custom_id_key("t", "busy")).unwrap();
        assert!(matches!(
            s.insert_request(rec("t", "busy", "h"), b"{}"),
            Err(StoreError::Busy)
        ));
    }

    #[test]
    fn claim_respects_limits_and_order_and_cancel_loses_race() {
        let (_d, s) = store();
        let ids = queue_n(&s, "c", 5);
        let b = s.claim_batch(&qk(), 3, 1_000_000, "size").unwrap().unwrap();
        let members: Vec<u64> = s.members(b.id).map(Result::unwrap).collect();
        assert_eq!(members, ids[..3]);
        assert_eq!(s.queue_stats()[0].1.count, 2);
        // Byte limit: one and a half lines' worth takes one line.
        let one = line_len(ids[3], 2);
        let b2 = s
            .claim_batch(&qk(), 10, one + one / 2, "bytes")
            .unwrap()
            .unwrap();
        assert_eq!(b2.request_count, 1);
        assert_eq!(b2.bytes, one);
        // Claimed: too late to cancel. Still queued: cancellable.
        assert!(matches!(
            s.cancel("t", "c0", &no_payload).unwrap(),
            CancelOutcome::TooLate(_)
        ));
        assert!(matches!(
            s.cancel("t", "c4", &no_payload).unwrap(),
            CancelOutcome::Cancelled(_)
        ));
        assert!(matches!(
            s.cancel("t", "c4", &no_payload).unwrap(),
            CancelOutcome::AlreadyCancelled(_)
        ));
        assert!(matches!(
            s.cancel("other", "c4", &no_payload).unwrap(),
            CancelOutcome::NotFound
        ));
        assert!(s.claim_batch(&qk(), 10, 1 << 20, "time").unwrap().is_none());
        assert_eq!(s.queue_stats()[0].1, QueueStats::default());
    }

    #[test]
    fn a_model_name_extending_another_queues_key_stays_in_its_own_queue() {
        let (_d, s) = store();
        let Intake::Created(plain) = s.insert_request(rec("t", "plain", "h"), b"{}").unwrap()
        else {
            panic!()
        };
        // Refused at intake today; a store may still hold one.
        let sneaky = RequestRecord {
            model: "m\0x".into(),
            ..rec("t", "sneaky", "h")
        };
        let Intake::Created(sneaky) = s.insert_request(sneaky, b"{}").unwrap() else {
            panic!()
        };
        let b = s.claim_batch(&qk(), 10, 1 << 20, "size").unwrap().unwrap();
        let members: Vec<u64> = s.members(b.id).map(Result::unwrap).collect();
        assert_eq!(members, vec![plain.id]);
        let other = QueueKey::of(&sneaky);
        assert_eq!(s.queue_stats_for(&other).unwrap().count, 1);
        let b = s.claim_batch(&other, 10, 1 << 20, "size").unwrap().unwrap();
        let members: Vec<u64> = s.members(b.id).map(Result::unwrap).collect();
        assert_eq!(members, vec![sneaky.id]);
    }

    #[test]
    fn members_are_packed_per_slice_and_read_in_order() {
        let (_d, s) = store();
        let n = WRITE_SLICE * 2 + WRITE_SLICE / 2;
        let ids = queue_n(&s, "p", n);
        let b = s.claim_batch(&qk(), n, u64::MAX, "size").unwrap().unwrap();
        assert_eq!(b.request_count, n as u64);
        assert_eq!(s.members.scan_prefix(b.id.to_be_bytes()).count(), 3);
        let members: Vec<u64> = s.members(b.id).map(Result::unwrap).collect();
        assert_eq!(members, ids);
        // A value that is not whole ids is reported, not misread.
        s.members
            .insert(member_key(b.id, u64::MAX), &[1u8, 2, 3][..])
            .unwrap();
        assert!(s.members(b.id).any(|m| m.is_err()));
    }

    #[test]
    fn own_upstream_objects_follow_the_batch_and_survive_reopen() {
        let (_dir, db) = sled_db();
        let s = SledStore::from_db(db.clone()).unwrap();
        let mut b = claimed(7);
        let owned = |s: &SledStore| {
            ["file-in", "batch_1", "file-out"]
                .into_iter()
                .filter(|id| s.is_own_upstream_object(id))
                .collect::<Vec<_>>()
        };
        s.put_batch(&b).unwrap();
        assert!(owned(&s).is_empty());
        b.state = BatchState::Uploaded {
            file_id: "file-in".into(),
        };
        s.put_batch(&b).unwrap();
        assert_eq!(owned(&s), ["file-in"]);
        b.state = BatchState::Submitted {
            file_id: "file-in".into(),
            batch_id: "batch_1".into(),
        };
        s.put_batch(&b).unwrap();
        assert_eq!(owned(&s), ["file-in", "batch_1"]);
        drop(s);
        let s = SledStore::from_db(db.clone()).unwrap();
        assert_eq!(owned(&s), ["file-in", "batch_1"]);
        b.state = BatchState::Done {
            file_id: Some("file-in".into()),
            batch_id: Some("batch_1".into()),
            upstream_status: "completed".into(),
            cleanup: vec!["file-in".into(), "file-out".into()],
        };
        s.put_batch(&b).unwrap();
        assert_eq!(owned(&s), ["file-in", "file-out"]);
        // Deleted upstream: nothing left to guard.
        if let BatchState::Done { cleanup, .. } = &mut b.state {
            cleanup.clear();
        }
        s.put_batch(&b).unwrap();
        assert!(owned(&s).is_empty());
        assert!(owned(&SledStore::from_db(db).unwrap()).is_empty());
    }

    #[test]
    fn a_requeue_gives_its_attempt_back_and_a_retry_keeps_it() {
        let (_d, s) = store();
        queue_n(&s, "c", 2);
        let retry = |max_attempts| Outcome::Retry {
            error: RequestError {
                code: "missing_result".into(),
                message: "m".into(),
            },
            max_attempts,
        };
        for round in 1..=2 {
            let mut b = s.claim_batch(&qk(), 10, 1 << 20, "size").unwrap().unwrap();
            s.mark_submitted(&mut b, "file", "batch").unwrap();
            let ids: Vec<u64> = s.members(b.id).map(Result::unwrap).collect();
            assert_eq!(s.get(ids[0]).unwrap().unwrap().attempts, round);
            assert_eq!(s.get(ids[1]).unwrap().unwrap().attempts, 1);
            let done = s
                .apply_outcomes(
                    b.id,
                    vec![(ids[0], retry(3)), (ids[1], Outcome::Requeue)],
                    &no_payload,
                )
                .unwrap();
            assert!(done.is_empty());
            // The token-limit requeue did not count; the retry did.
            assert_eq!(s.get(ids[1]).unwrap().unwrap().attempts, 0);
            assert_eq!(s.get(ids[0]).unwrap().unwrap().attempts, round);
        }
        // At its limit, a retry fails the request.
        let mut b = s.claim_batch(&qk(), 10, 1 << 20, "size").unwrap().unwrap();
        s.mark_submitted(&mut b, "file", "batch").unwrap();
        let ids: Vec<u64> = s.members(b.id).map(Result::unwrap).collect();
        let done = s
            .apply_outcomes(b.id, vec![(ids[0], retry(3))], &no_payload)
            .unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].status, RequestStatus::Failed);
        assert_eq!(done[0].attempts, 3);
    }

    #[test]
    fn outcomes_apply_once_and_requeue_returns_to_queue() {
        let (_d, s) = store();
        queue_n(&s, "c", 3);
        let mut b = s.claim_batch(&qk(), 10, 1 << 20, "size").unwrap().unwrap();
        s.mark_submitted(&mut b, "file-1", "batch_1").unwrap();
        let ids: Vec<u64> = s.members(b.id).map(Result::unwrap).collect();
        assert_eq!(
            s.get(ids[0]).unwrap().unwrap().status,
            RequestStatus::Submitted
        );
        let res = StoredResult {
            status_code: 200,
            body: bytes::Bytes::from_static(br#"{"ok": true}"#),
        };
        let done = s
            .apply_outcomes(
                b.id,
                vec![
                    (ids[0], Outcome::Completed(res.clone())),
                    (ids[1], Outcome::Requeue),
                    (
                        ids[2],
                        Outcome::Expired(RequestError {
                            code: "batch_expired".into(),
                            message: "late".into(),
                        }),
                    ),
                ],
                &no_payload,
            )
            .unwrap();
        assert_eq!(done.len(), 2);
        assert_eq!(s.result(ids[0]).unwrap().unwrap(), res);
        assert_eq!(
            s.get(ids[1]).unwrap().unwrap().status,
            RequestStatus::Queued
        );
        assert_eq!(
            s.get(ids[2]).unwrap().unwrap().status,
            RequestStatus::Expired
        );
        assert_eq!(s.queue_stats()[0].1.count, 1);
        // Applying again changes nothing.
        let again = s
            .apply_outcomes(
                b.id,
                vec![(
                    ids[0],
                    Outcome::Failed(RequestError {
                        code: "x".into(),
                        message: "y".into(),
                    }),
                )],
                &no_payload,
            )
            .unwrap();
        assert!(again.is_empty());
        assert_eq!(
            s.get(ids[0]).unwrap().unwrap().status,
            RequestStatus::Completed
        );
    }

    #[test]
    fn batch_steps_write_states_not_records() {
        let (_d, s) = store();
        queue_n(&s, "c", 3);
        let id = s.find("t", "c0").unwrap().unwrap().id;
        let json_before = s.requests.get(id.to_be_bytes()).unwrap().unwrap();
        let mut b = s.claim_batch(&qk(), 10, 1 << 20, "size").unwrap().unwrap();
        s.mark_submitted(&mut b, "file-1", "batch_9").unwrap();
        // The JSON record is byte for byte what intake wrote...
        assert_eq!(
            s.requests.get(id.to_be_bytes()).unwrap().unwrap(),
            json_before
        );
        // ...and the request reads as submitted, with the batch's upstream id.
        let r = s.get(id).unwrap().unwrap();
        assert_eq!(r.status, RequestStatus::Submitted);
        assert_eq!((r.batch, r.attempts), (Some(b.id), 1));
        assert_eq!(r.batch_id.as_deref(), Some("batch_9"));
        assert!(r.submitted_at.is_some());
        // A state without its record (or the reverse) reads as absent.
        s.requests.remove(id.to_be_bytes()).unwrap();
        assert!(s.get(id).unwrap().is_none());
    }

    #[test]
    fn a_data_dir_of_another_layout_is_refused() {
        let (_dir, db) = sled_db();
        let s = SledStore::from_db(db.clone()).unwrap();
        s.insert_request(rec("t", "x", "h"), b"{}").unwrap();
        drop(s);
        // As an earlier build left it: records, no layout stamp.
        db.remove(FORMAT_KEY).unwrap();
        let err = SledStore::from_db(db.clone()).err().unwrap();
        assert!(err.to_string().contains("store format 1"), "{err}");
        db.insert(FORMAT_KEY, b"7").unwrap();
        let err = SledStore::from_db(db).err().unwrap();
        assert!(err.to_string().contains("store format 7"), "{err}");
    }

    #[test]
    fn a_second_store_on_one_data_dir_is_refused_by_name() {
        let (dir, s) = store();
        let err = SledStore::open(dir.path(), 64 << 20).err().unwrap();
        assert!(matches!(err, StoreError::InUse), "{err}");
        assert!(err.to_string().contains("second Ferry"), "{err}");
        // The first store is untouched by the refused open.
        s.insert_request(rec("t", "x", "h"), b"{}").unwrap();
        assert!(s.find("t", "x").unwrap().is_some());
    }

    #[test]
    fn queue_stats_and_claims_survive_reopen() {
        let (_dir, db) = sled_db();
        {
            let s = SledStore::from_db(db.clone()).unwrap();
            queue_n(&s, "c", 4);
            // A claim whose batch record was written but whose queue
            // entries were not yet removed (as if the process died).
            let b = claimed(999);
            s.put_batch(&b).unwrap();
            let first = s.find("t", "c0").unwrap().unwrap().id;
            // One member as stores before packed members wrote it.
            s.members.insert(member_key(999, first), &[]).unwrap();
        }
        let s = SledStore::from_db(db).unwrap();
        assert_eq!(s.queue_stats()[0].1.count, 4);
        assert_eq!(s.recover_claims().unwrap(), 1);
        assert_eq!(s.queue_stats()[0].1.count, 3);
        let first = s.find("t", "c0").unwrap().unwrap();
        assert_eq!(first.batch, Some(999));
        // The claim was recorded as 1 request of 10 bytes; it is recounted
        // from the members it really has, so the upload's length is right.
        let b = s.get_batch(999).unwrap().unwrap();
        assert_eq!((b.request_count, b.bytes), (1, line_len(first.id, 2)));
    }

    #[tokio::test]
    async fn group_commit_serves_concurrent_callers() {
        let (_d, s) = store();
        let s = std::sync::Arc::new(s);
        let mut tasks = Vec::new();
        for i in 0..32 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.insert_request(rec("t", &format!("g{i}"), "h"), b"{}")
                    .unwrap();
                s.commit().await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(s.flushed.load(Ordering::SeqCst), 32);
    }

    #[tokio::test]
    async fn a_webhook_is_scheduled_only_once_its_state_is_durable() {
        let (_d, s) = store();
        let with_callback = |cid: &str| RequestRecord {
            callback_url: Some("https://hooks.example/x".into()),
            ..rec("t", cid, "h")
        };
        // A cancel and a finished batch member, each with a callback.
        let Intake::Created(cancelled) = s.insert_request(with_callback("c"), b"{}").unwrap()
        else {
            panic!()
        };
        let Intake::Created(done) = s.insert_request(with_callback("d"), b"{}").unwrap() else {
            panic!()
        };
        s.commit().await.unwrap();
        assert!(matches!(
            s.cancel("t", "c", &no_payload).unwrap(),
            CancelOutcome::Cancelled(_)
        ));
        let b = s.claim_batch(&qk(), 10, 1 << 20, "size").unwrap().unwrap();
        let mut b2 = b.clone();
        s.mark_submitted(&mut b2, "file-1", "batch_1").unwrap();
        let result = StoredResult {
            status_code: 200,
            body: bytes::Bytes::from_static(b"{}"),
        };
        s.apply_outcomes(
            b.id,
            vec![(done.id, Outcome::Completed(result))],
            &no_payload,
        )
        .unwrap();
        // Written, not yet durable: nothing may be sent.
        assert!(s.take_due_deliveries(u64::MAX, 10).is_empty());
        assert!(s.next_delivery_due().is_none());
        assert!(s.has_unflushed_deliveries());
        s.commit().await.unwrap();
        let mut sent: Vec<u64> = s
            .take_due_deliveries(u64::MAX, 10)
            .iter()
            .map(|d| d.request)
            .collect();
        sent.sort_unstable();
        assert_eq!(sent, vec![cancelled.id, done.id]);
        assert!(!s.has_unflushed_deliveries());
    }

    #[test]
    fn line_len_matches_the_line() {
        let line = format!("{}{}{}", line_prefix(77), "{\"a\":1}", LINE_SUFFIX);
        assert_eq!(line.len() as u64, line_len(77, 7));
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(v["custom_id"], "ferry-77");
    }
}
