//! The admin port: `/metrics` and operator routes, never on the public port.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::App;
use crate::metrics::gauge_value;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .route("/admin/flush", post(flush))
        .with_state(app)
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    if let Ok(size) = app.store.storage_size().await {
        app.metrics.storage_size.set(size as i64);
    }
    if let Some((free, min_free)) = app.store.free_space() {
        app.metrics.storage_free.set(gauge_value(free));
        app.metrics.storage_min_free.set(gauge_value(min_free));
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

async fn readyz(State(app): State<Arc<App>>) -> impl IntoResponse {
    if app.ready.load(Ordering::SeqCst) && !app.is_shutting_down() {
        (StatusCode::OK, Json(serde_json::json!({"status": "ready"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "not_ready"})),
        )
    }
}

/// Flushes every non-empty queue now, whatever its thresholds.
async fn flush(State(app): State<Arc<App>>) -> impl IntoResponse {
    let mut names = Vec::new();
    for up in &app.upstreams {
        up.manual_flush.store(true, Ordering::SeqCst);
        up.wake.notify_one();
        names.push(up.settings.name.clone());
    }
    // The upstreams' owners may be other nodes.
    app.store
        .publish(crate::store::ClusterEvent::Flush(None))
        .await;
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"flushing": names})),
    )
}
