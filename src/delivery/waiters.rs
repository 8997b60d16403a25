//! Callers held until a request is terminal. One slot per request that
//! someone waits on; the result ingester fills it with the terminal record
//! (and the answer) and wakes it after they are durable. A held caller costs
//! one small map entry and a parked future — no polling loop, no thread —
//! and a wake-up that carries the record costs the caller no store read.
//!
//! A caller registers after it has read its request, so a notification in
//! between would be missed. The last [`RECENT`] notified ids are kept in
//! order: a caller that took a [`Mark`] before its read learns from them
//! whether its request finished since, and reads the store again only when
//! they cannot tell (more notifications than that since its mark).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Notify;

use crate::store::{RequestRecord, StoredResult};

/// A request that reached a terminal status, as stored: what a woken
/// caller answers with.
#[derive(Debug)]
pub struct Finished {
    pub record: RequestRecord,
    /// The upstream's answer; `Some` exactly when `record` is `completed`.
    pub result: Option<StoredResult>,
}

/// How a wait ended.
#[derive(Debug)]
pub enum Wake {
    /// The request finished; here it is, as stored.
    Finished(Arc<Finished>),
    /// Woken without the record (another node's event, a resync), or found
    /// done by the caller's own check: re-read the store.
    Woken,
    /// The timeout passed first.
    TimedOut,
}

impl Wake {
    /// Whether the wait ended before its timeout.
    pub fn is_woken(&self) -> bool {
        !matches!(self, Wake::TimedOut)
    }
}

#[derive(Default)]
struct Slot {
    notify: Notify,
    finished: OnceLock<Arc<Finished>>,
}

/// How many of the latest notified ids are kept for late registrations:
/// 32 KiB, and more than a batch's answers land between a caller's read
/// and its registration (microseconds) on any load seen.
pub const RECENT: usize = 4096;

/// Where the notifications stood when a caller took it; see [`Waiters::mark`].
#[derive(Debug, Clone, Copy)]
pub struct Mark(u64);

/// The latest notified ids, oldest first; the last has sequence
/// number `next - 1`.
#[derive(Default)]
struct Recent {
    ids: VecDeque<u64>,
    next: u64,
}

impl Recent {
    fn push(&mut self, id: u64) {
        if self.ids.len() == RECENT {
            self.ids.pop_front();
        }
        self.ids.push_back(id);
        self.next += 1;
    }

    /// Whether `id` was notified since `mark`; `None` when notifications
    /// since then are no longer all kept.
    fn since(&self, mark: Mark, id: u64) -> Option<bool> {
        let oldest = self.next - self.ids.len() as u64;
        let skip = mark.0.checked_sub(oldest)?;
        Some(self.ids.iter().skip(skip as usize).any(|&x| x == id))
    }

    /// Forgets every id: any earlier mark can no longer be answered.
    fn forget(&mut self) {
        self.ids.clear();
        self.next += 1;
    }
}

#[derive(Default)]
pub struct Waiters {
    map: DashMap<u64, Arc<Slot>>,
    recent: Mutex<Recent>,
}

impl Waiters {
    pub fn new() -> Self {
        Self::default()
    }

    /// Take before reading a request that may then be waited on: its
    /// [`Waiters::wait`] tells from it whether the request was notified
    /// in between.
    pub fn mark(&self) -> Mark {
        Mark(self.recent().next)
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        // The ring is consistent after every statement: a panic elsewhere
        // while holding it leaves nothing half-done.
        self.recent.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes everyone waiting on `id`, to re-read it. Call after the new
    /// state is stored.
    pub fn notify(&self, id: u64) {
        self.wake(id, None);
    }

    /// Wakes everyone waiting on `finished`'s request with it. Call after
    /// it is stored.
    pub fn finish(&self, finished: Finished) {
        self.wake(finished.record.id, Some(finished));
    }

    fn wake(&self, id: u64, finished: Option<Finished>) {
        // Kept before the slot is taken: a caller registering after that
        // finds the id here.
        self.recent().push(id);
        if let Some((_, slot)) = self.map.remove(&id) {
            if let Some(f) = finished {
                // A slot is removed from the map before it is filled, so
                // no other wake-up can have filled it.
                let _ = slot.finished.set(Arc::new(f));
            }
            slot.notify.notify_waiters();
        }
    }

    /// Waits until `id` is notified or `timeout` passes. `since` is the
    /// mark taken before the caller last read the request: a notification
    /// after it is never missed. `is_done` (a store read) is awaited, after
    /// registering, only when the kept notifications cannot tell.
    pub async fn wait(
        &self,
        id: u64,
        timeout: Duration,
        since: Mark,
        is_done: impl std::future::Future<Output = bool>,
    ) -> Wake {
        let entry = Registered {
            waiters: self,
            id,
            slot: self.map.entry(id).or_default().clone(),
        };
        let notified = entry.slot.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let notified_since = self.recent().since(since, id);
        let done = match notified_since {
            Some(notified) => notified,
            None => is_done.await,
        };
        if !done && tokio::time::timeout(timeout, notified).await.is_err() {
            return Wake::TimedOut;
        }
        match entry.slot.finished.get() {
            Some(f) => Wake::Finished(f.clone()),
            None => Wake::Woken,
        }
    }

    /// Wakes every waiter, to re-read its request (events from other nodes
    /// may have been missed).
    pub fn notify_all(&self) {
        // Requests may have finished unannounced: no mark taken before can
        // rely on the kept ids.
        self.recent().forget();
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
    slot: Arc<Slot>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        // Only our own entry (a notify may have replaced it with a newer
        // waiter's), and only when ours and the map's are the last holds.
        self.waiters.map.remove_if(&self.id, |_, n| {
            Arc::ptr_eq(n, &self.slot) && Arc::strong_count(n) <= 2
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wakes_on_notify_and_times_out_otherwise() {
        let w = Arc::new(Waiters::new());
        let (w2, mark) = (w.clone(), w.mark());
        let waiter = tokio::spawn(async move {
            w2.wait(7, Duration::from_secs(30), mark, async { false })
                .await
        });
        // With paused time, a sleep returns only once every other task is idle,
        // i.e. every waiter is registered.
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(w.len(), 1);
        w.notify(7);
        assert!(waiter.await.unwrap().is_woken());
        assert!(w.is_empty());
        // Nobody notifies: the (paused) clock runs out.
        assert!(matches!(
            w.wait(8, Duration::from_secs(5), w.mark(), async { false })
                .await,
            Wake::TimedOut
        ));
        assert!(w.is_empty());
    }

    /// A request notified between the caller's read (its mark) and its
    /// registration is found without a store read, however many others were
    /// notified meanwhile; only past [`RECENT`] of them does the caller's own
    /// check decide.
    #[tokio::test(start_paused = true)]
    async fn a_notification_before_registering_is_not_missed() {
        let w = Waiters::new();
        let never = || async { panic!("read the store although the kept ids could tell") };
        let mark = w.mark();
        w.notify(9);
        for other in 100..100 + RECENT as u64 - 1 {
            w.notify(other);
        }
        assert!(matches!(
            w.wait(9, Duration::from_secs(5), mark, never()).await,
            Wake::Woken
        ));
        // Not notified since the mark: waits, and times out.
        assert!(matches!(
            w.wait(10, Duration::from_secs(5), mark, never()).await,
            Wake::TimedOut
        ));
        // One more and the notification of 9 is no longer kept: the
        // caller's check is asked, and its answer holds.
        w.notify(100_000);
        assert!(matches!(
            w.wait(9, Duration::from_secs(5), mark, async { true })
                .await,
            Wake::Woken
        ));
        assert!(matches!(
            w.wait(9, Duration::from_secs(5), mark, async { false })
                .await,
            Wake::TimedOut
        ));
        // A resync forgets every kept id: marks taken before it ask.
        let mark = w.mark();
        w.notify(11);
        w.notify_all();
        assert!(matches!(
            w.wait(11, Duration::from_secs(5), mark, async { false })
                .await,
            Wake::TimedOut
        ));
        // Marks taken after it are answered again.
        let mark = w.mark();
        w.notify(11);
        assert!(matches!(
            w.wait(11, Duration::from_secs(5), mark, never()).await,
            Wake::Woken
        ));
        assert!(w.is_empty());
    }

    /// The delivery tests' record, as request `id` with `status`.
    fn record(id: u64, status: crate::store::RequestStatus) -> RequestRecord {
        RequestRecord {
            id,
            status,
            ..crate::delivery::tests::record()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn finish_hands_every_waiter_the_record_and_answer() {
        use crate::store::RequestStatus;
        let w = Arc::new(Waiters::new());
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let w = w.clone();
            let mark = w.mark();
            tasks.push(tokio::spawn(async move {
                w.wait(5, Duration::from_secs(60), mark, async { false })
                    .await
            }));
        }
        // With paused time, a sleep returns only once every other task is idle,
        // i.e. both waiters are registered.
        tokio::time::sleep(Duration::from_millis(1)).await;
        w.finish(Finished {
            record: record(5, RequestStatus::Completed),
            result: Some(StoredResult {
                status_code: 200,
                body: bytes::Bytes::from_static(b"{\"ok\":1}"),
            }),
        });
        for t in tasks {
            let Wake::Finished(f) = t.await.unwrap() else {
                panic!("woken without the record");
            };
            assert_eq!(f.record.id, 5);
            assert_eq!(f.record.status, RequestStatus::Completed);
            let r = f.result.as_ref().expect("the answer");
            assert_eq!((r.status_code, &r.body[..]), (200, &b"{\"ok\":1}"[..]));
        }
        assert!(w.is_empty());
        // Nobody waits: finishing changes nothing and keeps no entry.
        w.finish(Finished {
            record: record(6, RequestStatus::Failed),
            result: None,
        });
        assert!(w.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_abandoned_midway_leaves_no_entry() {
        let w = Arc::new(Waiters::new());
        let (a, b, mark) = (w.clone(), w.clone(), w.mark());
        let first = tokio::spawn(async move {
            a.wait(3, Duration::from_secs(60), mark, async { false })
                .await
        });
        let second = tokio::spawn(async move {
            b.wait(3, Duration::from_secs(60), mark, async { false })
                .await
        });
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
            let (w, mark) = (w.clone(), w.mark());
            tasks.push(tokio::spawn(async move {
                w.wait(1, Duration::from_secs(60), mark, async { false })
                    .await
            }));
        }
        // With paused time, a sleep returns only once every other task is idle,
        // i.e. every waiter is registered.
        tokio::time::sleep(Duration::from_millis(1)).await;
        w.notify(1);
        for t in tasks {
            assert!(t.await.unwrap().is_woken());
        }
    }
}
