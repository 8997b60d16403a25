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
//! - `terminal`: completed-at (unix seconds), id → nothing: every terminal
//!   request, oldest first, for the retention purge
//! - `open_batches`: batch id → nothing, for batches live or owing the
//!   upstream a file delete: what start-up and recovery read, so their cost
//!   does not grow with history
//! - `done_batches`: batch id → nothing, finished batches not yet purged
//!
//! The default tree holds `ferry_format`, the layout version above, and
//! the retention indexes' markers (see `retention`).
//!
//! Writes go to sled's page cache; [`SledStore::commit`] makes them durable with
//! one fsync for every caller waiting at that moment (group commit). The
//! store facade ([`crate::store::Store`]) commits before it returns, so
//! nothing outside `store` commits.
//!
//! Files: `census` (rows and bytes per tree), `encoding` (keys and
//! values, the JSONL line's fixed parts),
//! `durability` (the group commit and the blocking pool), `intake_writer`
//! (deferred calls in, durable on return), `escalations` (requests also
//! sent on a synchronous lane out of a submitted batch), `requests` (intake's writes,
//! reads, cancel), `queues` (the in-memory counts, claims), `batches`
//! (records, members, recovery, submission), `outcomes` (a finished
//! batch's results applied), `outbox` (webhook deliveries), `retention`
//! (the indexes of finished work, and purging it), `tests`; this
//! file holds the store itself: opening, the layout check, ids.

mod batches;
mod census;
mod durability;
pub(crate) mod encoding;
mod escalations;
mod intake_writer;
mod outbox;
mod outcomes;
mod queues;
mod requests;
mod retention;

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use dashmap::DashMap;

use super::error::corrupt;
use super::*;

use encoding::{
    custom_id_key, encode_record, id_from, member_key, parse_queue_inputs, parse_queue_value,
    queue_value, unpack_members,
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
    terminal: sled::Tree,
    open_batches: sled::Tree,
    done_batches: sled::Tree,
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
    /// (deadline, request id) → queue of every queued request with a
    /// deadline, rebuilt at open from the queue entries. An entry whose
    /// request left its queue (claimed, cancelled) is dropped when the
    /// escalation scan finds it gone.
    deadlines: Mutex<std::collections::BTreeMap<(u64, u64), QueueKey>>,
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
    /// Tests only: a purge slice fails (its transaction aborts) when it
    /// reaches this many requests, as a crash in the middle of it would.
    #[cfg(test)]
    pub(crate) fail_purge_at: std::sync::atomic::AtomicUsize,
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
            terminal: db.open_tree("terminal")?,
            open_batches: db.open_tree("open_batches")?,
            done_batches: db.open_tree("done_batches")?,
            outbox_due: Mutex::new(BTreeSet::new()),
            outbox_unflushed: Mutex::new(Vec::new()),
            outbox_wake: tokio::sync::Notify::new(),
            db,
            queues: DashMap::new(),
            deadlines: Mutex::new(std::collections::BTreeMap::new()),
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
            #[cfg(test)]
            fail_purge_at: std::sync::atomic::AtomicUsize::new(usize::MAX),
        };
        store.check_format()?;
        store.repair_intake_round()?;
        store.ensure_batch_index()?;
        for b in store.open_batch_records() {
            store.track_upstream_objects(&b?);
        }
        for item in store.queue.iter() {
            let (k, v) = item?;
            let (qk, id) = QueueKey::parse_entry(&k).ok_or_else(|| corrupt("queue key", "bad"))?;
            let (at, len) = parse_queue_value(&v).ok_or_else(|| corrupt("queue value", "bad"))?;
            store.index_deadline(&qk, id, encoding::parse_queue_deadline(&v));
            store.account(qk, len, parse_queue_inputs(&v), at);
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
                // Nothing to index: the indexes start complete.
                self.mark_indexes_complete()?;
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
mod tests;
