//! Callers held until a request is terminal. One `Notify` per request that
//! someone waits on; the result ingester wakes it after the result is
//! durable. A held caller costs one small map entry and a parked future — no
//! polling loop, no thread.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Notify;

#[derive(Default)]
pub struct Waiters {
    map: DashMap<u64, Arc<Notify>>,
}

impl Waiters {
    pub fn new() -> Self {
        Self::default()
    }

    /// Wakes everyone waiting on `id`. Call after the new state is stored.
    pub fn notify(&self, id: u64) {
        if let Some((_, n)) = self.map.remove(&id) {
            n.notify_waiters();
        }
    }

    /// Waits until `id` is notified or `timeout` passes. `is_done` is awaited
    /// after registering, so a notification between the caller's own check
    /// and this call is never missed. Returns whether it was woken (or done).
    pub async fn wait(
        &self,
        id: u64,
        timeout: Duration,
        is_done: impl std::future::Future<Output = bool>,
    ) -> bool {
        let entry = Registered {
            waiters: self,
            id,
            notify: self.map.entry(id).or_default().clone(),
        };
        let notified = entry.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        is_done.await || tokio::time::timeout(timeout, notified).await.is_ok()
    }

    /// Wakes every waiter, to re-read its request (events from other nodes
    /// may have been missed).
    pub fn notify_all(&self) {
        let ids: Vec<u64> = self.map.iter().map(|e| *e.key()).collect();
        for id in ids {
            self.notify(id);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// One waiter's hold on its map entry. Dropped when the wait ends in any
/// way, a caller that hung up (its future dropped mid-wait) included: the
/// entry goes once nobody else holds it.
struct Registered<'a> {
    waiters: &'a Waiters,
    id: u64,
    notify: Arc<Notify>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        // Only our own entry (a notify may have replaced it with a newer
        // waiter's), and only when ours and the map's are the last holds.
        self.waiters.map.remove_if(&self.id, |_, n| {
            Arc::ptr_eq(n, &self.notify) && Arc::strong_count(n) <= 2
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wakes_on_notify_and_times_out_otherwise() {
        let w = Arc::new(Waiters::new());
        let w2 = w.clone();
        let waiter =
            tokio::spawn(async move { w2.wait(7, Duration::from_secs(30), async { false }).await });
        // With paused time, a sleep returns only once every other task is idle,
        // i.e. every waiter is registered.
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(w.len(), 1);
        w.notify(7);
        assert!(waiter.await.unwrap());
        assert!(w.is_empty());
        // Nobody notifies: the (paused) clock runs out.
        assert!(!w.wait(8, Duration::from_secs(5), async { false }).await);
        assert!(w.is_empty());
        // Already done: returns at once.
        assert!(w.wait(9, Duration::from_secs(5), async { true }).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_abandoned_midway_leaves_no_entry() {
        let w = Arc::new(Waiters::new());
        let (a, b) = (w.clone(), w.clone());
        let first =
            tokio::spawn(async move { a.wait(3, Duration::from_secs(60), async { false }).await });
        let second =
            tokio::spawn(async move { b.wait(3, Duration::from_secs(60), async { false }).await });
        // With paused time, a sleep returns only once every other task is idle,
        // i.e. both waiters are registered.
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(w.len(), 1);
        // One caller hangs up: the other still waits on the entry.
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        assert_eq!(w.len(), 1);
        second.abort();
        assert!(second.await.unwrap_err().is_cancelled());
        assert!(w.is_empty(), "an abandoned wait kept its entry");
    }

    #[tokio::test(start_paused = true)]
    async fn many_waiters_on_one_request_all_wake() {
        let w = Arc::new(Waiters::new());
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let w = w.clone();
            tasks.push(tokio::spawn(async move {
                w.wait(1, Duration::from_secs(60), async { false }).await
            }));
        }
        // With paused time, a sleep returns only once every other task is idle,
        // i.e. every waiter is registered.
        tokio::time::sleep(Duration::from_millis(1)).await;
        w.notify(1);
        for t in tasks {
            assert!(t.await.unwrap());
        }
    }
}
