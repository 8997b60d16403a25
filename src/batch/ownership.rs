//! Which node flushes an upstream's queues and drives its batches.
//!
//! One node at a time owns each upstream, through a lease in the store
//! named after it, renewed by the upstream's flush loop. The owner claims
//! batches, drives them through the upstream's Batch API and sweeps its
//! orphaned files; the other nodes only take calls in and answer callers.
//! A node that takes an upstream over (at start, or when the owner stopped
//! renewing) resumes every live batch of it, adopting the uploads and
//! batches the old owner made, exactly as a restart does. Each lease
//! change gives a new fencing token; a driver stops at its next step once
//! its token is no longer the upstream's, and its batch writes carry the
//! token so that a late write of a stalled old owner is refused.
//!
//! With sled there is one node: every lease is granted, with one token.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::App;
use crate::store::BatchState;

/// How often a lease of `ttl` (`storage.lease_secs`: how soon another node
/// takes over an upstream whose owner died) is renewed: two renewals may
/// fail before it lapses.
pub fn renew_every(ttl: Duration) -> Duration {
    ttl / 3
}

/// The lease that owns the upstream `name`.
pub fn lease_name(upstream: &str) -> String {
    format!("upstream/{upstream}")
}

/// This node's hold on one upstream.
#[derive(Default)]
pub struct Ownership {
    /// The fencing token of the lease this node holds; 0 when it holds none.
    token: AtomicU64,
    /// Batches with a driver running on this node.
    driving: std::sync::Mutex<HashSet<u64>>,
}

impl Ownership {
    /// The token this node holds the upstream with, if it does.
    pub fn token(&self) -> Option<u64> {
        match self.token.load(Ordering::SeqCst) {
            0 => None,
            t => Some(t),
        }
    }

    /// Whether this node still holds the upstream with `token`.
    pub fn holds(&self, token: u64) -> bool {
        self.token.load(Ordering::SeqCst) == token
    }

    /// Records a driver for `batch`; false if one runs already.
    pub(super) fn start_driving(&self, batch: u64) -> bool {
        self.driving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(batch)
    }

    pub(super) fn stop_driving(&self, batch: u64) {
        self.driving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&batch);
    }
}

/// What a renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// This node owns the upstream, as it did before.
    Kept(u64),
    /// This node owns the upstream from now on: resume its batches.
    Gained(u64),
    /// Another node owns it (or the store cannot say).
    No,
}

/// The change a renewal's answer makes, given the token held before (0:
/// none). Pure, so the transitions are tested on their own.
pub fn transition(before: u64, answer: Option<u64>) -> Held {
    match answer {
        Some(t) if t == before => Held::Kept(t),
        Some(t) => Held::Gained(t),
        None => Held::No,
    }
}

/// Takes or renews the upstream's lease, and on gaining it resumes the
/// upstream's live batches and sweeps its orphaned files. Returns the
/// token this node now holds the upstream with, if any.
pub async fn renew(
    app: &Arc<App>,
    upstream: usize,
    shutdown: &watch::Receiver<bool>,
) -> Option<u64> {
    let up = &app.upstreams[upstream];
    let name = lease_name(&up.settings.name);
    let answer = match app
        .store
        .acquire_lease(&name, app.config.storage.lease())
        .await
    {
        Ok(a) => a,
        Err(e) => {
            // Not knowing is not owning: the drivers stop at their next
            // step, and the next renewal that succeeds resumes them.
            warn!(upstream = %up.settings.name, error = %e, "cannot renew the upstream's lease; not flushing or driving it meanwhile");
            None
        }
    };
    let before = up
        .ownership
        .token
        .swap(answer.unwrap_or(0), Ordering::SeqCst);
    match transition(before, answer) {
        Held::Kept(t) => Some(t),
        Held::Gained(t) => {
            if app.store.is_shared() {
                info!(upstream = %up.settings.name, token = t, "this node now owns the upstream: resuming its batches");
            }
            resume(app, upstream, shutdown).await;
            tokio::spawn(super::sweep_orphan_files(app.clone(), upstream));
            Some(t)
        }
        Held::No => {
            if before != 0 {
                warn!(upstream = %up.settings.name, "this node no longer owns the upstream; its drivers stop");
            }
            None
        }
    }
}

/// Starts a driver for every live batch of the upstream that has none on
/// this node: a restart's recovery, and a takeover's.
async fn resume(app: &Arc<App>, upstream: usize, shutdown: &watch::Receiver<bool>) {
    let up = &app.upstreams[upstream];
    let live = match app.store.live_batches().await {
        Ok(l) => l,
        Err(e) => {
            // The next gain retries: give the lease back by forgetting it.
            up.ownership.token.store(0, Ordering::SeqCst);
            return warn!(upstream = %up.settings.name, error = %e, "cannot list live batches; will retry");
        }
    };
    for b in live.into_iter().filter(|b| b.upstream == up.settings.name) {
        if matches!(b.state, BatchState::Submitted { .. })
            && let Err(e) = app.store.apply_submitted(b.id).await
        {
            up.ownership.token.store(0, Ordering::SeqCst);
            return warn!(ferry_batch = b.id, error = %e, "cannot mark a resumed batch's members submitted; will retry");
        }
        info!(ferry_batch = b.id, state = ?b.state, "resuming a batch");
        super::spawn_driver(app.clone(), b, true, shutdown.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewal_keeps_gains_or_loses_the_upstream() {
        assert_eq!(transition(0, Some(1)), Held::Gained(1));
        assert_eq!(transition(1, Some(1)), Held::Kept(1));
        // Another node held it meanwhile: a new token, so resume again.
        assert_eq!(transition(1, Some(3)), Held::Gained(3));
        assert_eq!(transition(3, None), Held::No);
        assert_eq!(transition(0, None), Held::No);
    }
}
