//! What a node does with the other nodes' events (a shared store only):
//! wakes the callers it holds when another node stored their answers, its
//! flush loops when another node queued requests or asked for a flush, its
//! webhook worker when deliveries became due. After a reconnect or a
//! backlog overrun, events may have been missed: every held caller re-reads.
//!
//! And the node's membership: it writes its presence on a timer, keeps the
//! list of nodes present (upstreams are spread over them), and leaves the
//! list as soon as it starts shutting down.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{broadcast, watch};

use crate::App;
use crate::store::ClusterEvent;

/// Records this node as present and refreshes `app.members`. A failure
/// keeps the last list: the leases still decide who owns what.
pub async fn heartbeat(app: &App) {
    match app.store.heartbeat(app.config.storage.lease()).await {
        Ok(members) => {
            *app.members.write().unwrap_or_else(|p| p.into_inner()) = members;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot record this node among the cluster's members; will retry")
        }
    }
}

/// Keeps this node among the members until it starts shutting down, then
/// leaves, so the others take its upstreams over as it hands them on.
pub async fn keep_membership(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let every = crate::batch::ownership::renew_every(app.config.storage.lease());
    loop {
        let leaving = app.release_waiters.notified();
        if app.is_shutting_down() {
            break;
        }
        heartbeat(&app).await;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = leaving => break,
            _ = shutdown.changed() => break,
        }
    }
    match app.store.leave().await {
        Ok(()) => tracing::info!("left the cluster's members"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot leave the cluster's members; the others notice in a lease time")
        }
    }
}

/// Follows `events` until shutdown.
pub async fn follow(
    app: Arc<App>,
    mut events: broadcast::Receiver<ClusterEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            _ = shutdown.changed() => return,
        };
        match event {
            Ok(event) => apply(&app, event),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "fell behind the cluster's events; held callers re-read"
                );
                apply(&app, ClusterEvent::Resync);
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

fn apply(app: &App, event: ClusterEvent) {
    match event {
        ClusterEvent::Terminal(ids) => {
            for id in ids {
                app.waiters.notify(id);
            }
            // A terminal request may owe a webhook.
            app.store.wake_outbox();
        }
        ClusterEvent::Queued(name) => {
            if let Some(up) = app.upstream_named(&name) {
                up.wake.notify_one();
            }
        }
        ClusterEvent::Flush(name) => {
            for up in app
                .upstreams
                .iter()
                .filter(|u| name.as_ref().is_none_or(|n| *n == u.settings.name))
            {
                up.manual_flush.store(true, Ordering::SeqCst);
                up.wake.notify_one();
            }
        }
        ClusterEvent::Outbox => app.store.wake_outbox(),
        ClusterEvent::Resync => {
            app.waiters.notify_all();
            app.store.wake_outbox();
        }
    }
}
