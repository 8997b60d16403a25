//! The durable state, behind one async interface: [`Store`].
//!
//! Every write is durable when its call returns; nothing outside this
//! module commits, names a tree or a transaction, or blocks a runtime
//! thread on the disk. Two backends: sled (`embedded`: one node, nothing to
//! install) and PostgreSQL ([`pg`]: the shared store of a cluster).
//!
//! Beside the data, the coordination a cluster needs: named leases (sled:
//! always granted, there is one node) and events between nodes
//! ([`ClusterEvent`]; sled: none, everything happens in one process).
//!
//! Files: [`census`] (rows and bytes by kind), `embedded` (the sled
//! backend), `error` (the layer's one error type), [`instance`] (the
//! data_dir's instance id), [`lifecycle`] (the request decisions both
//! backends make), [`records`] (the record types), [`space`] (the free
//! space the embedded store keeps), [`pg`] (PostgreSQL).

pub mod census;
mod embedded;
mod error;
pub mod instance;
pub mod lifecycle;
pub mod pg;
pub mod records;
pub mod space;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::broadcast;

pub use embedded::SledStore;
pub use embedded::encoding::{LINE_SUFFIX, QueueKey, line_len, line_prefix};
pub use error::StoreError;
pub use pg::events::Event as ClusterEvent;
pub use records::*;

/// Builds a webhook's JSON body for a request that just became terminal;
/// the store calls it inside the write that makes the request terminal.
pub type Payload = fn(&RequestRecord, Option<&StoredResult>) -> String;

/// The store Ferry runs on.
pub struct Store {
    backend: Backend,
    /// The free space the embedded store keeps on its filesystem (see
    /// [`space`]); none for PostgreSQL, whose disk is the server's.
    space: Option<space::SpaceGuard>,
}

enum Backend {
    Sled(Arc<SledStore>),
    Postgres(Box<Shared>),
}

/// The PostgreSQL backend and what a node keeps beside it.
struct Shared {
    db: pg::PgStore,
    /// Events heard from every node (this one included).
    events: broadcast::Sender<ClusterEvent>,
    /// Wakes this node's webhook worker.
    outbox_wake: tokio::sync::Notify,
    /// `data_dir`, locked for the process's life: the node's name is its.
    _dir_lock: std::fs::File,
    /// Observes each write transaction's duration, once metrics are attached.
    write_histogram: std::sync::OnceLock<prometheus::Histogram>,
}

impl Shared {
    /// Runs one write (one transaction, durable when it returns), timed as
    /// sled's group commits are.
    async fn write<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, pg::PgError>>,
    ) -> Result<T, StoreError> {
        let started = std::time::Instant::now();
        let out = f.await?;
        if let Some(h) = self.write_histogram.get() {
            h.observe(started.elapsed().as_secs_f64());
        }
        Ok(out)
    }
}

impl Store {
    /// Opens (or creates) the embedded store in `path`; see
    /// [`SledStore::open`].
    pub fn open_sled(path: &std::path::Path, cache_bytes: u64) -> Result<Store, StoreError> {
        Ok(Store {
            backend: Backend::Sled(Arc::new(SledStore::open(path, cache_bytes)?)),
            space: None,
        })
    }

    /// Keeps the free space `guard` watches: below it, intake and then the
    /// store's growth wait (see [`space`]). Only the embedded store writes
    /// to data_dir, so only it is guarded.
    pub fn with_space_guard(mut self, guard: space::SpaceGuard) -> Store {
        if matches!(self.backend, Backend::Sled(_)) {
            self.space = Some(guard);
        }
        self
    }

    /// `Ok` when the store has room for `need` (see [`space`]).
    pub fn room_for(&self, need: space::Need) -> Result<(), StoreError> {
        self.space.as_ref().map_or(Ok(()), |g| g.check(need))
    }

    /// The free bytes under data_dir and the reserve kept, when guarded.
    pub fn free_space(&self) -> Option<(u64, u64)> {
        self.space.as_ref().map(|g| (g.free_bytes(), g.min_free()))
    }

    /// Connects to PostgreSQL and brings its schema up to date. The node
    /// locks `data_dir` and is named in leases by its instance id, so a node
    /// restarted on its data_dir takes its own leases back at once (and
    /// first frees the webhook deliveries it held when it stopped).
    pub async fn connect_postgres(
        config: tokio_postgres::Config,
        pool_size: usize,
        data_dir: &std::path::Path,
    ) -> Result<Store, StoreError> {
        let dir_lock = instance::lock_data_dir(data_dir)?;
        let node = format!("node-{}", instance::load_or_create(data_dir)?);
        let db = pg::PgStore::connect(config, pool_size)
            .await?
            .with_owner(&node);
        let freed = db.release_own_deliveries().await?;
        tracing::info!(node = %node, freed_deliveries = freed, "connected to PostgreSQL");
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        Ok(Store {
            backend: Backend::Postgres(Box::new(Shared {
                db,
                events,
                outbox_wake: tokio::sync::Notify::new(),
                _dir_lock: dir_lock,
                write_histogram: std::sync::OnceLock::new(),
            })),
            space: None,
        })
    }

    /// Whether other nodes share this store (leases and events matter).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// The sled backend, for tests that inject its failures.
    #[cfg(test)]
    pub(crate) fn sled(&self) -> &Arc<SledStore> {
        match &self.backend {
            Backend::Sled(s) => s,
            Backend::Postgres(_) => panic!("not a sled store"),
        }
    }

    /// The name every upstream file and batch is made under: the
    /// data_dir's for sled, the cluster's (written once by the first node)
    /// for PostgreSQL, so any node adopts and sweeps what another made.
    pub async fn instance_id(&self, data_dir: &std::path::Path) -> Result<String, StoreError> {
        match &self.backend {
            Backend::Sled(_) => instance::load_or_create(data_dir),
            Backend::Postgres(p) => Ok(p.db.instance_id(&instance::new_id()).await?),
        }
    }

    // ---------------------------------------------------------- coordination

    /// Takes or renews the lease `name` for `ttl`; its grant, or `None`
    /// while another node holds it. A node not `first` in line waits a
    /// further `ttl` before taking over an expired lease (see
    /// [`pg::PgStore::acquire_lease`]). With sled there is one node: it
    /// always holds every lease.
    pub async fn acquire_lease(
        &self,
        name: &str,
        ttl: Duration,
        first: bool,
    ) -> Result<Option<Grant>, StoreError> {
        match &self.backend {
            Backend::Sled(_) => Ok(Some(Grant {
                token: 1,
                wanted_by: None,
            })),
            Backend::Postgres(p) => Ok(p.db.acquire_lease(name, ttl, first).await?),
        }
    }

    /// Gives up the lease `name` held under `token`, for the node first in
    /// line to take at once.
    pub async fn release_lease(&self, name: &str, token: u64) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(_) => Ok(()),
            Backend::Postgres(p) => Ok(p.db.release_lease(name, token).await?),
        }
    }

    /// This node's name among the cluster's members; `None` with sled.
    pub fn node_name(&self) -> Option<&str> {
        match &self.backend {
            Backend::Sled(_) => None,
            Backend::Postgres(p) => Some(p.db.owner()),
        }
    }

    /// Records this node as present and returns the members present within
    /// `ttl`, sorted; empty with sled (one node, no members to share with).
    pub async fn heartbeat(&self, ttl: Duration) -> Result<Vec<String>, StoreError> {
        match &self.backend {
            Backend::Sled(_) => Ok(Vec::new()),
            Backend::Postgres(p) => Ok(p.db.heartbeat(ttl).await?),
        }
    }

    /// Leaves the cluster's members, at shutdown.
    pub async fn leave(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(_) => Ok(()),
            Backend::Postgres(p) => Ok(p.db.leave().await?),
        }
    }

    /// Events from the other nodes; `None` with sled (one process).
    pub fn subscribe(&self) -> Option<broadcast::Receiver<ClusterEvent>> {
        match &self.backend {
            Backend::Sled(_) => None,
            Backend::Postgres(p) => Some(p.events.subscribe()),
        }
    }

    /// Tells every node (this one included) of `event`; with sled, nothing
    /// to do. A lost event only delays: the listeners re-read on reconnect
    /// and on their timers, so a failure is logged, not returned.
    pub async fn publish(&self, event: ClusterEvent) {
        if let Backend::Postgres(p) = &self.backend
            && let Err(e) = p.db.publish(&event).await
        {
            tracing::warn!(error = %e, ?event, "cannot tell the other nodes; they find out on their timers");
        }
    }

    /// Listens for other nodes' events until `shutdown` (PostgreSQL only;
    /// returns at once with sled).
    pub async fn listen(&self, shutdown: tokio::sync::watch::Receiver<bool>) {
        if let Backend::Postgres(p) = &self.backend {
            pg::events::listen(p.db.config().clone(), p.events.clone(), shutdown).await;
        }
    }

    /// Reports every durable flush's duration to `h`.
    pub fn observe_flushes(&self, h: prometheus::Histogram) {
        match &self.backend {
            Backend::Sled(s) => s.observe_flushes(h),
            Backend::Postgres(p) => drop(p.write_histogram.set(h)),
        }
    }

    /// Counts each write refused for want of space in `c`, by need.
    pub fn observe_low_space(&self, c: prometheus::IntCounterVec) {
        if let Some(g) = &self.space {
            g.observe(c);
        }
    }

    /// Bytes the store takes on disk.
    pub async fn storage_size(&self) -> Result<u64, StoreError> {
        match &self.backend {
            // sled sums its files' sizes: disk work.
            Backend::Sled(s) => s.blocking(|s| Ok(s.size_on_disk())).await,
            Backend::Postgres(p) => Ok(p.db.storage_size().await?),
        }
    }

    /// Rows and bytes of each kind of data. On sled it walks every tree, a
    /// chunk per blocking call (intake and lookups go between chunks); call
    /// it rarely.
    pub async fn census(&self) -> Result<Vec<(census::Kind, census::Tally)>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.census().await,
            Backend::Postgres(p) => Ok(p.db.census().await?),
        }
    }

    /// Makes everything durable, for shutdown, once the runtime has stopped.
    pub fn close(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.flush_blocking(),
            // Every write committed before it returned.
            Backend::Postgres(_) => Ok(()),
        }
    }

    // ------------------------------------------------------------ requests

    /// Stores a new deferred request and queues it; returns once it is
    /// durable (also for `Existing`, an idempotent retry).
    pub async fn accept(&self, rec: RequestRecord, body: Vec<u8>) -> Result<Intake, StoreError> {
        self.room_for(space::Need::Intake)?;
        match &self.backend {
            Backend::Sled(s) => s.accept(rec, body).await,
            Backend::Postgres(p) => p.write(p.db.accept(rec, body)).await,
        }
    }

    pub async fn get(&self, id: u64) -> Result<Option<RequestRecord>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.blocking(move |s| s.get(id)).await,
            Backend::Postgres(p) => Ok(p.db.get(id).await?),
        }
    }

    pub async fn find(
        &self,
        tenant: &str,
        custom_id: &str,
    ) -> Result<Option<RequestRecord>, StoreError> {
        let (tenant, custom_id) = (tenant.to_owned(), custom_id.to_owned());
        match &self.backend {
            Backend::Sled(s) => s.blocking(move |s| s.find(&tenant, &custom_id)).await,
            Backend::Postgres(p) => Ok(p.db.find(&tenant, &custom_id).await?),
        }
    }

    /// [`Store::find`] and, when the request is completed, the upstream's
    /// stored answer: one trip to the store instead of two.
    pub async fn find_answered(
        &self,
        tenant: &str,
        custom_id: &str,
    ) -> Result<Option<(RequestRecord, Option<StoredResult>)>, StoreError> {
        let (tenant, custom_id) = (tenant.to_owned(), custom_id.to_owned());
        match &self.backend {
            Backend::Sled(s) => {
                s.blocking(move |s| s.find_answered(&tenant, &custom_id))
                    .await
            }
            Backend::Postgres(p) => Ok(p.db.find_answered(&tenant, &custom_id).await?),
        }
    }

    /// The upstream's stored answer to a completed request.
    pub async fn result(&self, id: u64) -> Result<Option<StoredResult>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.blocking(move |s| s.result(id)).await,
            Backend::Postgres(p) => Ok(p.db.result(id).await?),
        }
    }

    /// Cancels a request that is still queued and not claimed by a flush;
    /// a cancel is durable when this returns.
    pub async fn cancel(
        &self,
        tenant: &str,
        custom_id: &str,
        payload: Payload,
    ) -> Result<CancelOutcome, StoreError> {
        let (tenant, custom_id) = (tenant.to_owned(), custom_id.to_owned());
        match &self.backend {
            Backend::Sled(s) => {
                let outcome = s
                    .blocking(move |s| s.cancel(&tenant, &custom_id, &payload))
                    .await?;
                if matches!(outcome, CancelOutcome::Cancelled(_)) {
                    s.commit().await?;
                }
                Ok(outcome)
            }
            Backend::Postgres(p) => {
                let outcome = p.write(p.db.cancel(&tenant, &custom_id, &payload)).await?;
                if let CancelOutcome::Cancelled(rec) = &outcome {
                    self.publish(ClusterEvent::Terminal(vec![rec.id])).await;
                }
                Ok(outcome)
            }
        }
    }

    // -------------------------------------------------------------- queues

    pub async fn queue_stats(&self) -> Result<Vec<(QueueKey, QueueStats)>, StoreError> {
        match &self.backend {
            // Kept in memory: no disk work.
            Backend::Sled(s) => Ok(s.queue_stats()),
            Backend::Postgres(p) => Ok(p.db.queue_stats().await?),
        }
    }

    pub async fn queue_stats_for(&self, qk: &QueueKey) -> Result<Option<QueueStats>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => Ok(s.queue_stats_for(qk)),
            Backend::Postgres(p) => Ok(p.db.queue_stats_for(qk).await?),
        }
    }

    /// The size of queue `qk` right after an intake into it, for the
    /// decision to wake the flush loop: from memory on both backends (with
    /// PostgreSQL, as this node's latest intake round left the
    /// cluster-wide counters; see [`pg::PgStore::queue_load`]).
    pub fn queue_load(&self, qk: &QueueKey) -> Option<QueueLoad> {
        match &self.backend {
            Backend::Sled(s) => s.queue_stats_for(qk).map(|st| QueueLoad {
                count: st.count,
                bytes: st.bytes,
                started: st.count == 1,
            }),
            Backend::Postgres(p) => p.db.queue_load(qk),
        }
    }

    /// Requests queued in every queue, as intake checks `max_queued`: with
    /// sled the exact count, from memory; with PostgreSQL without a round
    /// trip per call (see [`pg::PgStore::queued_for_admission`]).
    pub async fn queued_for_admission(&self) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Sled(s) => Ok(s.queued_total()),
            Backend::Postgres(p) => Ok(p.db.queued_for_admission().await?),
        }
    }

    /// Forgets the in-memory counts of `upstream`'s empty queues (sled; on
    /// PostgreSQL the counts are rows, and the intake rounds' sizes are
    /// bounded on their own). Call after their metrics were published at
    /// zero.
    pub fn prune_idle_queues(&self, upstream: &str) {
        if let Backend::Sled(s) = &self.backend {
            s.prune_idle_queues(upstream);
        }
    }

    /// Requests queued in every queue, for `max_queued`.
    pub async fn queued_total(&self) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Sled(s) => Ok(s.queued_total()),
            Backend::Postgres(p) => Ok(p.db.queued_total().await?),
        }
    }

    // ------------------------------------------------------------- batches

    /// Moves the oldest entries of a queue (at most `max_requests` lines and
    /// `max_bytes` of JSONL) into a new batch, and returns it once it is
    /// durable. A claim cannot be taken back once written, so a failed
    /// commit is retried, with backoff, until it succeeds: no upstream call
    /// may follow a claim that a crash would undo. Dropping the future (at
    /// shutdown) leaves the claim to recovery at the next start. Nothing is
    /// claimed once `token` is no longer the newest of lease `lease` (with
    /// sled, one node holds every lease).
    pub async fn claim_batch(
        &self,
        qk: &QueueKey,
        max_requests: usize,
        max_bytes: u64,
        reason: &'static str,
        (lease, token): (&str, u64),
    ) -> Result<Option<BatchRecord>, StoreError> {
        self.room_for(space::Need::Growth)?;
        let key = qk.clone();
        match &self.backend {
            Backend::Sled(s) => {
                let claimed = s
                    .blocking(move |s| s.claim_batch(&key, max_requests, max_bytes, reason))
                    .await?;
                if let Some(b) = &claimed {
                    commit_until_durable(s, b.id).await;
                }
                Ok(claimed)
            }
            // One transaction: committed, or not claimed at all.
            Backend::Postgres(p) => {
                p.write(p.db.claim_batch_fenced(qk, max_requests, max_bytes, reason, lease, token))
                    .await
            }
        }
    }

    /// Claims request `id` alone out of queue `qk` into a new batch sent on
    /// `lane`: an escalation for its deadline. Atomic on both backends (a
    /// claim of one request), so it is never also flushed into a batch;
    /// durable when it returns, as [`claim_batch`](Self::claim_batch).
    /// `None` when the request is no longer queued.
    pub async fn claim_request(
        &self,
        qk: &QueueKey,
        id: u64,
        lane: Lane,
        (lease, token): (&str, u64),
    ) -> Result<Option<BatchRecord>, StoreError> {
        self.room_for(space::Need::Growth)?;
        let key = qk.clone();
        match &self.backend {
            Backend::Sled(s) => {
                let claimed = s
                    .blocking(move |s| s.claim_request(&key, id, lane, "deadline"))
                    .await?;
                if let Some(b) = &claimed {
                    commit_until_durable(s, b.id).await;
                }
                Ok(claimed)
            }
            Backend::Postgres(p) => {
                p.write(p.db.claim_request_fenced(qk, id, lane, "deadline", lease, token))
                    .await
            }
        }
    }

    /// The members of the submitted `batch` still waiting on it, not yet
    /// escalated, that have a deadline: (id, deadline) each.
    pub async fn pending_deadlines(&self, batch: u64) -> Result<Vec<(u64, u64)>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.blocking(move |s| s.pending_deadlines(batch)).await,
            Backend::Postgres(p) => Ok(p.db.pending_deadlines(batch).await?),
        }
    }

    /// Sends request `id`, still waiting on the submitted `batch`, also on
    /// `lane`, in a new batch of one: an escalation for its deadline. The
    /// request stays in `batch`; whichever answers first is stored (see
    /// [`lifecycle::outcome_applies`]). Durable when it returns, before any
    /// call on the lane. `None` when the request is no longer waiting on
    /// `batch`, was escalated already, or (PostgreSQL) `token` is no longer
    /// the newest of lease `lease`.
    pub async fn escalate_submitted(
        &self,
        batch: u64,
        id: u64,
        lane: Lane,
        (lease, token): (&str, u64),
    ) -> Result<Option<BatchRecord>, StoreError> {
        self.room_for(space::Need::Growth)?;
        match &self.backend {
            Backend::Sled(s) => {
                let one = s
                    .blocking(move |s| s.escalate_submitted(batch, id, lane, "deadline"))
                    .await?;
                if let Some(b) = &one {
                    commit_until_durable(s, b.id).await;
                }
                Ok(one)
            }
            Backend::Postgres(p) => {
                p.write(p.db.escalate_submitted_fenced(batch, id, lane, "deadline", (lease, token)))
                    .await
            }
        }
    }

    /// Whether request `id` is in `batch` or escalated into it: false for a
    /// batch of one whose escalation a crash cut short.
    pub async fn holds(&self, batch: u64, id: u64) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.blocking(move |s| s.holds(batch, id)).await,
            Backend::Postgres(p) => Ok(p.db.holds(batch, id).await?),
        }
    }

    /// Requests of `upstream` still queued whose deadline is at or before
    /// `before` (unix seconds), soonest first, at most `limit`: (queue, id,
    /// deadline) each.
    pub async fn due_by_deadline(
        &self,
        upstream: &str,
        before: u64,
        limit: usize,
    ) -> Result<Vec<(QueueKey, u64, u64)>, StoreError> {
        let upstream = upstream.to_owned();
        match &self.backend {
            Backend::Sled(s) => {
                s.blocking(move |s| s.due_by_deadline(&upstream, before, limit))
                    .await
            }
            Backend::Postgres(p) => Ok(p.db.due_by_deadline(&upstream, before, limit).await?),
        }
    }

    /// A request's body as stored (what its batch line carries).
    pub async fn body(&self, id: u64) -> Result<Option<Bytes>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => {
                s.blocking(move |s| Ok(s.body(id)?.map(|b| Bytes::copy_from_slice(&b))))
                    .await
            }
            Backend::Postgres(p) => Ok(p.db.body(id).await?.map(Bytes::from)),
        }
    }

    /// [`put_batch`](Self::put_batch) while `token` is still the newest of
    /// lease `lease`; returns whether it was written (false: another node
    /// owns the batch's upstream now).
    pub async fn put_batch_fenced(
        &self,
        b: &BatchRecord,
        lease: &str,
        token: u64,
    ) -> Result<bool, StoreError> {
        match &self.backend {
            // One node: every lease is its own.
            Backend::Sled(_) => self.put_batch(b).await.map(|()| true),
            Backend::Postgres(p) => p.write(p.db.put_batch_fenced(b, lease, token)).await,
        }
    }

    /// Stores a batch's record, durably.
    pub async fn put_batch(&self, b: &BatchRecord) -> Result<(), StoreError> {
        let record = b.clone();
        match &self.backend {
            Backend::Sled(s) => {
                s.blocking(move |s| s.put_batch(&record)).await?;
                s.commit().await
            }
            Backend::Postgres(p) => p.write(p.db.put_batch(&record)).await,
        }
    }

    pub async fn get_batch(&self, id: u64) -> Result<Option<BatchRecord>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.blocking(move |s| s.get_batch(id)).await,
            Backend::Postgres(p) => Ok(p.db.get_batch(id).await?),
        }
    }

    /// Batches not yet finished, for recovery.
    pub async fn live_batches(&self) -> Result<Vec<BatchRecord>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.blocking(|s| s.live_batches()).await,
            Backend::Postgres(p) => Ok(p.db.live_batches().await?),
        }
    }

    /// Finished batches of `upstream` whose upstream files are not deleted yet.
    pub async fn batches_owing_cleanup(
        &self,
        upstream: &str,
    ) -> Result<Vec<BatchRecord>, StoreError> {
        let upstream = upstream.to_owned();
        match &self.backend {
            Backend::Sled(s) => {
                s.blocking(move |s| s.batches_owing_cleanup(&upstream))
                    .await
            }
            Backend::Postgres(p) => Ok(p.db.batches_owing_cleanup(&upstream).await?),
        }
    }

    /// A batch's member ids, in member (line) order.
    pub async fn members(&self, batch: u64) -> Result<Vec<u64>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.blocking(move |s| s.members(batch).collect()).await,
            Backend::Postgres(p) => Ok(p.db.members(batch).await?),
        }
    }

    /// The input file's lines for `members[next..]`, about `max_bytes` of
    /// them; returns them and the index of the first member not taken.
    pub async fn input_lines(
        &self,
        endpoint: crate::endpoint::Endpoint,
        members: Arc<[u64]>,
        next: usize,
        max_bytes: usize,
    ) -> Result<(Bytes, usize), StoreError> {
        match &self.backend {
            Backend::Sled(s) => {
                s.blocking(move |s| s.input_lines(endpoint, &members, next, max_bytes))
                    .await
            }
            Backend::Postgres(p) => Ok(p
                .db
                .input_lines(endpoint, &members, next, max_bytes)
                .await?),
        }
    }

    /// Finishes claims a crash cut short; returns how many it finished.
    pub async fn recover_claims(&self) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::Sled(s) => {
                let n = s.blocking(|s| s.recover_claims()).await?;
                s.commit().await?;
                Ok(n)
            }
            Backend::Postgres(p) => Ok(p.db.recover_claims().await?),
        }
    }

    /// Records the upstream batch and moves every member to `submitted`,
    /// while `token` is still the newest of lease `lease`; returns the
    /// record as stored, durably, or `None` if another node owns the
    /// batch's upstream now.
    pub async fn mark_submitted_fenced(
        &self,
        batch: &BatchRecord,
        file_id: &str,
        upstream_batch: &str,
        lease: &str,
        token: u64,
    ) -> Result<Option<BatchRecord>, StoreError> {
        let mut next = batch.clone();
        match &self.backend {
            // One node: every lease is its own.
            Backend::Sled(s) => {
                let (file, created) = (file_id.to_owned(), upstream_batch.to_owned());
                let next = s
                    .blocking(move |s| s.mark_submitted(&mut next, &file, &created).map(|()| next))
                    .await?;
                s.commit().await?;
                Ok(Some(next))
            }
            Backend::Postgres(p) => {
                let written = p
                    .write(p.db.mark_submitted_fenced(
                        &mut next,
                        file_id,
                        upstream_batch,
                        (lease, token),
                    ))
                    .await?;
                Ok(written.then_some(next))
            }
        }
    }

    /// Moves the members of a batch recorded as submitted to `submitted`
    /// (recovery: idempotent).
    pub async fn apply_submitted(&self, batch: u64) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(s) => {
                s.blocking(move |s| s.apply_submitted(batch)).await?;
                s.commit().await
            }
            Backend::Postgres(p) => p.write(p.db.apply_submitted(batch)).await,
        }
    }

    /// Applies the outcomes of a finished batch's members, durably; only
    /// members still `submitted` in this batch change, so applying twice is
    /// harmless. Returns the records that reached a terminal status.
    pub async fn apply_outcomes(
        &self,
        batch: u64,
        outcomes: Vec<(u64, Outcome)>,
        payload: Payload,
    ) -> Result<Vec<RequestRecord>, StoreError> {
        self.room_for(space::Need::Growth)?;
        match &self.backend {
            Backend::Sled(s) => {
                let done = s
                    .blocking(move |s| s.apply_outcomes(batch, outcomes, &payload))
                    .await?;
                s.commit().await?;
                Ok(done)
            }
            Backend::Postgres(p) => {
                let done = p
                    .write(p.db.apply_outcomes(batch, outcomes, &payload))
                    .await?;
                // One notification per stored slice, after its commit.
                if !done.is_empty() {
                    let ids = done.iter().map(|r| r.id).collect();
                    self.publish(ClusterEvent::Terminal(ids)).await;
                }
                Ok(done)
            }
        }
    }

    /// Whether `id` names an upstream file or batch of one of Ferry's own
    /// batches (tenants may not touch them).
    pub async fn is_own_upstream_object(&self, id: &str) -> bool {
        match &self.backend {
            // Kept in memory: no disk work.
            Backend::Sled(s) => s.is_own_upstream_object(id),
            // Every node's batches: one query.
            Backend::Postgres(p) => p.db.is_own_upstream_object(id).await,
        }
    }

    // ----------------------------------------------------------- retention

    /// Purges one slice of what is past `policy` at `now` (unix seconds):
    /// at most `slice_rows` terminal requests, oldest first, each whole or
    /// not at all, then finished batch records left without members.
    /// Durable when it returns; safe to run on several nodes at once.
    pub async fn purge_slice(
        &self,
        policy: lifecycle::Retention,
        now: u64,
    ) -> Result<PurgeReport, StoreError> {
        match &self.backend {
            Backend::Sled(s) => {
                let report = s.blocking(move |s| s.purge_slice(&policy, now)).await?;
                // Always: a slice whose commit failed is made durable by
                // the next, even when that one finds nothing more to do.
                s.commit().await?;
                Ok(report)
            }
            Backend::Postgres(p) => p.write(p.db.purge_slice(&policy, now)).await,
        }
    }

    /// When the oldest terminal request still kept finished (unix seconds).
    pub async fn oldest_terminal(&self) -> Result<Option<u64>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.blocking(|s| s.oldest_terminal()).await,
            Backend::Postgres(p) => Ok(p.db.oldest_terminal().await?),
        }
    }

    // -------------------------------------------------------------- outbox

    /// Webhook deliveries not yet finished.
    pub async fn outbox_len(&self) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.blocking(|s| Ok(s.outbox_len())).await,
            Backend::Postgres(p) => Ok(p.db.outbox_len().await?),
        }
    }

    /// When the next delivery is due (unix millis), if any is scheduled.
    pub async fn next_delivery_due(&self) -> Result<Option<u64>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => Ok(s.next_delivery_due()),
            Backend::Postgres(p) => Ok(p.db.next_delivery_due().await?),
        }
    }

    /// Takes up to `max` deliveries due by `now`; each must come back
    /// through `reschedule_delivery`, `retry_delivery` or `finish_delivery`.
    /// Only durable entries are taken: a webhook is never sent for a state a
    /// crash could still undo.
    pub async fn take_due_deliveries(
        &self,
        now: u64,
        max: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => {
                // Entries are released by the commit that makes them durable,
                // and their writers commit: this only hurries a straggler.
                if s.has_unflushed_deliveries() {
                    s.commit().await?;
                }
                s.blocking(move |s| Ok(s.take_due_deliveries(now, max)))
                    .await
            }
            // Leased per row: two nodes never send one delivery at once.
            Backend::Postgres(p) => Ok(p.db.take_due_deliveries(now, max).await?),
        }
    }

    /// Puts a taken delivery back without a try (its receiver is busy).
    pub async fn reschedule_delivery(&self, d: &Delivery, due_ms: u64) {
        match &self.backend {
            Backend::Sled(s) => s.reschedule_delivery(d, due_ms),
            Backend::Postgres(p) => {
                if let Err(e) = p.db.reschedule_delivery(d, due_ms).await {
                    // Its lease runs out and any node takes it again.
                    tracing::warn!(request = d.request, error = %e, "cannot reschedule a webhook delivery");
                }
            }
        }
    }

    /// Records a failed try, durably, and schedules the next at `d.due_ms`.
    pub async fn retry_delivery(&self, d: Delivery, state: WebhookState) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(s) => {
                s.blocking(move |s| s.retry_delivery(&d, state)).await?;
                s.commit().await
            }
            Backend::Postgres(p) => p.write(p.db.retry_delivery(&d, state)).await,
        }
    }

    /// Ends a delivery, durably: delivered, or dead after its retries.
    pub async fn finish_delivery(
        &self,
        d: Delivery,
        status: WebhookStatus,
        last_error: Option<String>,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(s) => {
                s.blocking(move |s| s.finish_delivery(&d, status, last_error))
                    .await?;
                s.commit().await
            }
            Backend::Postgres(p) => p.write(p.db.finish_delivery(&d, status, last_error)).await,
        }
    }

    /// Wakes the delivery worker (a slot freed, an entry became due).
    pub fn wake_outbox(&self) {
        match &self.backend {
            Backend::Sled(s) => s.wake_outbox(),
            Backend::Postgres(p) => p.outbox_wake.notify_one(),
        }
    }

    /// Resolves when the outbox may have something new to send.
    pub async fn outbox_notified(&self) {
        match &self.backend {
            Backend::Sled(s) => s.outbox_notified().await,
            Backend::Postgres(p) => p.outbox_wake.notified().await,
        }
    }
}

/// Events a node may fall behind on before the oldest are dropped (a
/// receiver that lags re-reads everything, as after a reconnect).
const EVENT_BACKLOG: usize = 1024;

/// Retries the group commit, with backoff, until the claim of `batch` is on
/// disk (a full disk, an I/O error: the operator frees space, Ferry goes on).
async fn commit_until_durable(s: &SledStore, batch: u64) {
    let mut failures = 0u32;
    while let Err(e) = s.commit().await {
        let wait = crate::upstream::backoff(
            failures,
            Duration::from_millis(100),
            Duration::from_secs(30),
            rand::random(),
        );
        failures += 1;
        tracing::error!(
            ferry_batch = batch, error = %e, retry_in_ms = wait.as_millis() as u64,
            "cannot make a claimed batch durable; it waits until it is"
        );
        tokio::time::sleep(wait).await;
    }
}
