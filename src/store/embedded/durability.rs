//! Durability: the group commit (one fsync for every writer waiting at
//! that moment) and the blocking pool that store work runs on.

use std::sync::atomic::Ordering;

use super::{SledStore, StoreError};

impl SledStore {
    /// Makes every write made before this call durable. Concurrent callers
    /// share one fsync: whoever holds the lock flushes for all writes made so
    /// far, and those whose writes it covered return without flushing again.
    pub async fn commit(&self) -> Result<(), StoreError> {
        if let Some(refused) = self.injected_commit_failure() {
            return refused;
        }
        let mine = self.written.fetch_add(1, Ordering::SeqCst) + 1;
        let _guard = self.flush_lock.lock().await;
        if self.flushed.load(Ordering::SeqCst) >= mine {
            return Ok(());
        }
        let upto = self.written.load(Ordering::SeqCst);
        let db = self.db.clone();
        let started = std::time::Instant::now();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Flush(e.to_string()))??;
        self.flushed_up_to(upto, started);
        Ok(())
    }

    /// [`commit`](Self::commit) for a thread outside the runtime (the
    /// intake writer): the same group commit, waiting in place.
    pub(super) fn commit_blocking(&self) -> Result<(), StoreError> {
        if let Some(refused) = self.injected_commit_failure() {
            return refused;
        }
        let mine = self.written.fetch_add(1, Ordering::SeqCst) + 1;
        let _guard = self.flush_lock.blocking_lock();
        if self.flushed.load(Ordering::SeqCst) >= mine {
            return Ok(());
        }
        let upto = self.written.load(Ordering::SeqCst);
        let started = std::time::Instant::now();
        self.db.flush()?;
        self.flushed_up_to(upto, started);
        Ok(())
    }

    /// Records a durable flush that covered every write ticket up to `upto`.
    fn flushed_up_to(&self, upto: u64, started: std::time::Instant) {
        if let Some(h) = self.flush_histogram.get() {
            h.observe(started.elapsed().as_secs_f64());
        }
        self.flushed.fetch_max(upto, Ordering::SeqCst);
        self.release_flushed_deliveries(upto);
    }

    /// Tests only: a commit refused as by a full disk.
    fn injected_commit_failure(&self) -> Option<Result<(), StoreError>> {
        #[cfg(test)]
        if self.fail_commits.0.load(Ordering::SeqCst) {
            self.fail_commits.1.fetch_add(1, Ordering::SeqCst);
            return Some(Err(StoreError::Flush("injected by a test".into())));
        }
        None
    }

    /// Runs store work on tokio's blocking pool. sled's calls block — a
    /// page-cache miss reads the disk, a claim or an ingested slice writes
    /// thousands of keys — and a runtime thread that blocks stalls every
    /// caller scheduled on it.
    pub async fn blocking<T, F>(self: &std::sync::Arc<Self>, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&SledStore) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Reports every durable flush's duration to `h`.
    pub fn observe_flushes(&self, h: prometheus::Histogram) {
        let _ = self.flush_histogram.set(h);
    }

    /// Synchronous flush, for shutdown.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}
