//! What a node does with the other nodes' events (a shared store only):
//! wakes the callers it holds when another node stored their answers, its
//! flush loops when another node queued requests or asked for a flush, its
//! webhook worker when deliveries became due. After a reconnect or a
//! backlog overrun, events may have been missed: every held caller re-reads.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{broadcast, watch};

use crate::App;
use crate::store::ClusterEvent;

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
