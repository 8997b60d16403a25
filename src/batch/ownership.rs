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
//! Upstreams are spread over the cluster's members by rendezvous hashing:
//! each upstream has one node first in line for it among the members
//! present, and the others take it over only once its lease has stayed
//! expired for a further lease time. The node first in line marks a lease
//! held by another node as wanted, and the holder hands it over once its
//! drivers are between steps, so a node that joins gets its share without
//! waiting for anything to expire. A node shutting down hands over
//! everything it holds the same way.
//!
//! With sled there is one node: every lease is granted, with one token.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{Notify, watch};
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

/// The member first in line for `upstream`: the one whose hash with the
/// upstream's name is highest. When a member comes or goes, only the
/// upstreams it wins or won move. `None` without members.
pub fn first_in_line<'a>(upstream: &str, members: &'a [String]) -> Option<&'a str> {
    members
        .iter()
        .max_by_key(|m| {
            let mut h = Sha256::new();
            h.update(upstream.as_bytes());
            h.update([0]);
            h.update(m.as_bytes());
            let d = h.finalize();
            (
                u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]),
                *m,
            )
        })
        .map(String::as_str)
}

/// Whether the node `me` is first in line for `upstream`. A store without
/// members (sled), or members not yet known, puts every node first: the
/// lease alone then decides.
pub fn is_first(upstream: &str, me: Option<&str>, members: &[String]) -> bool {
    match (me, first_in_line(upstream, members)) {
        (Some(me), Some(first)) => me == first,
        _ => true,
    }
}

/// Whether the holder of an upstream's lease hands it over to the node
/// that asked for it: only to a member still present, and not when the
/// holder is itself first in line (the ask is then stale).
pub fn hands_over(
    me: Option<&str>,
    first: bool,
    wanted_by: Option<&str>,
    members: &[String],
) -> bool {
    !first && wanted_by.is_some_and(|w| me != Some(w) && members.iter().any(|m| m == w))
}

/// This node's hold on one upstream.
#[derive(Default)]
pub struct Ownership {
    /// The fencing token drivers and claims use; 0 when this node does not
    /// own the upstream (or is handing it over).
    token: AtomicU64,
    /// The token of the lease as held in the store; 0 when none. Differs
    /// from `token` while a hand-over waits for the drivers to stop.
    lease: AtomicU64,
    /// Batches with a driver running on this node.
    driving: std::sync::Mutex<HashSet<u64>>,
    /// Woken when the node stops owning the upstream, so drivers waiting
    /// between polls stop at once.
    released: Notify,
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

    /// Whether no driver runs on this node.
    fn idle(&self) -> bool {
        self.driving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Resolves once the node stops owning the upstream.
    pub(super) async fn released(&self) {
        self.released.notified().await
    }

    /// Sets the drivers' token, and wakes waiting drivers if it changed.
    pub(super) fn set_token(&self, token: u64) -> u64 {
        let before = self.token.swap(token, Ordering::SeqCst);
        if before != token {
            self.released.notify_waiters();
        }
        before
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
/// upstream's live batches and sweeps its orphaned files; hands the lease
/// over when the node first in line asked for it, or when this node is
/// shutting down. Returns the token this node now holds the upstream with,
/// if any.
pub async fn renew(
    app: &Arc<App>,
    upstream: usize,
    shutdown: &watch::Receiver<bool>,
) -> Option<u64> {
    let up = &app.upstreams[upstream];
    let upstream_name = &up.settings.name;
    let name = lease_name(upstream_name);
    let ttl = app.config.storage.lease();
    if app.store.is_shared() && app.is_shutting_down() {
        return hand_over(app, upstream, false).await;
    }
    let members = app
        .members
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let me = app.store.node_name();
    let first = is_first(upstream_name, me, &members);
    let grant = match app.store.acquire_lease(&name, ttl, first).await {
        Ok(g) => g,
        Err(e) => {
            // Not knowing is not owning: the drivers stop at their next
            // step, and the next renewal that succeeds resumes them.
            warn!(upstream = %upstream_name, error = %e, "cannot renew the upstream's lease; not flushing or driving it meanwhile");
            up.ownership.set_token(0);
            return None;
        }
    };
    up.ownership
        .lease
        .store(grant.as_ref().map_or(0, |g| g.token), Ordering::SeqCst);
    if let Some(g) = &grant
        && hands_over(me, first, g.wanted_by.as_deref(), &members)
    {
        info!(upstream = %upstream_name, to = g.wanted_by.as_deref().unwrap_or(""), "handing the upstream over to the node first in line for it");
        // The acquire just now renewed the lease.
        return hand_over(app, upstream, true).await;
    }
    let answer = grant.map(|g| g.token);
    let before = up.ownership.set_token(answer.unwrap_or(0));
    match transition(before, answer) {
        Held::Kept(t) => Some(t),
        Held::Gained(t) => {
            if app.store.is_shared() {
                info!(upstream = %upstream_name, token = t, first_in_line = first, "this node now owns the upstream: resuming its batches");
            }
            resume(app, upstream, shutdown).await;
            tokio::spawn(super::sweep_orphan_files(app.clone(), upstream));
            Some(t)
        }
        Held::No => {
            if before != 0 {
                warn!(upstream = %upstream_name, "this node no longer owns the upstream; its drivers stop");
            }
            None
        }
    }
}

/// Gives the upstream up: the drivers stop at their next step, and once
/// none runs the lease is released for the node first in line to take at
/// once. Until then the lease is kept renewed, so no other node resumes a
/// batch whose driver here is still in the middle of an upstream call
/// (`renewed`: the caller has just renewed it).
async fn hand_over(app: &Arc<App>, upstream: usize, renewed: bool) -> Option<u64> {
    let up = &app.upstreams[upstream];
    let name = lease_name(&up.settings.name);
    up.ownership.set_token(0);
    let held = up.ownership.lease.load(Ordering::SeqCst);
    if held == 0 {
        return None;
    }
    if !up.ownership.idle() {
        if renewed {
            return None;
        }
        // Renewing under our own name keeps the token; not first in line,
        // so a lease that lapsed meanwhile is not taken back.
        match app
            .store
            .acquire_lease(&name, app.config.storage.lease(), false)
            .await
        {
            Ok(Some(g)) if g.token == held => {}
            Ok(_) => up.ownership.lease.store(0, Ordering::SeqCst),
            Err(e) => {
                warn!(upstream = %up.settings.name, error = %e, "cannot renew the lease being handed over")
            }
        }
        return None;
    }
    match app.store.release_lease(&name, held).await {
        Ok(()) => {
            up.ownership.lease.store(0, Ordering::SeqCst);
            info!(upstream = %up.settings.name, "handed the upstream over");
        }
        Err(e) => {
            warn!(upstream = %up.settings.name, error = %e, "cannot release the upstream's lease; it expires instead")
        }
    }
    None
}

/// Starts a driver for every live batch of the upstream that has none on
/// this node: a restart's recovery, and a takeover's.
async fn resume(app: &Arc<App>, upstream: usize, shutdown: &watch::Receiver<bool>) {
    let up = &app.upstreams[upstream];
    let live = match app.store.live_batches().await {
        Ok(l) => l,
        Err(e) => {
            // The next gain retries: give the lease back by forgetting it.
            up.ownership.set_token(0);
            return warn!(upstream = %up.settings.name, error = %e, "cannot list live batches; will retry");
        }
    };
    for b in live.into_iter().filter(|b| b.upstream == up.settings.name) {
        if matches!(b.state, BatchState::Submitted { .. })
            && let Err(e) = app.store.apply_submitted(b.id).await
        {
            up.ownership.set_token(0);
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

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn upstreams_are_spread_over_the_members_and_only_a_leaver_s_move() {
        let three = names(&["node-a", "node-b", "node-c"]);
        let two = names(&["node-a", "node-c"]);
        let upstreams: Vec<String> = (0..300).map(|i| format!("upstream-{i}")).collect();
        let mut share = std::collections::HashMap::new();
        for u in &upstreams {
            let first = first_in_line(u, &three).unwrap();
            *share.entry(first).or_insert(0) += 1;
            // The order members are listed in does not matter.
            let reversed: Vec<String> = three.iter().rev().cloned().collect();
            assert_eq!(first_in_line(u, &reversed), Some(first));
            // `node-b` leaves: only its upstreams move.
            let after = first_in_line(u, &two).unwrap();
            if first != "node-b" {
                assert_eq!(after, first, "{u}");
            }
        }
        for m in &three {
            let n = share.get(m.as_str()).copied().unwrap_or(0);
            assert!((60..=140).contains(&n), "{m} is first for {n} of 300");
        }
    }

    #[test]
    fn without_members_every_node_is_first() {
        assert!(is_first("emu", None, &names(&["node-a"])));
        assert!(is_first("emu", Some("node-a"), &[]));
        let one = names(&["node-a"]);
        assert!(is_first("emu", Some("node-a"), &one));
        assert!(!is_first("emu", Some("node-b"), &one));
    }

    #[test]
    fn a_lease_is_handed_only_to_a_present_node_that_asked() {
        let members = names(&["a", "b"]);
        assert!(hands_over(Some("a"), false, Some("b"), &members));
        // First in line itself: the ask is stale.
        assert!(!hands_over(Some("a"), true, Some("b"), &members));
        // The asker is gone, or nobody asked, or it asked itself.
        assert!(!hands_over(Some("a"), false, Some("c"), &members));
        assert!(!hands_over(Some("a"), false, None, &members));
        assert!(!hands_over(Some("a"), false, Some("a"), &members));
    }
}
