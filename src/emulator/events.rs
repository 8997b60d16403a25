//! Optional push of OpenAI's batch events: with `events_url` set, each
//! batch that has ended (as of the emulator's clock) is announced once with
//! a `batch.<status>` event, signed with `events_secret` (Standard
//! Webhooks), as OpenAI does for an account's webhook endpoint. Batches
//! advance lazily, so a ticker looks at them; a push that fails is not
//! retried (OpenAI retries, but nothing may depend on an event arriving).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::state::Emulator;
use crate::delivery::webhooks::{decode_secret, sign};

/// How often the ticker looks at the batches.
const TICK: Duration = Duration::from_millis(100);

/// The event type for a batch in `status`, if it has ended.
pub fn event_type(status: &str) -> Option<&'static str> {
    match status {
        "completed" => Some("batch.completed"),
        "failed" => Some("batch.failed"),
        "expired" => Some("batch.expired"),
        "cancelled" => Some("batch.cancelled"),
        _ => None,
    }
}

/// Pushes events for ended batches until the task is dropped.
pub async fn push_events(state: Arc<Emulator>) {
    let http = reqwest::Client::new();
    let mut announced: HashSet<String> = HashSet::new();
    loop {
        tokio::time::sleep(TICK).await;
        let config = state.config();
        let (Some(url), Some(secret)) = (config.events_url, config.events_secret) else {
            continue;
        };
        let Ok(key) = decode_secret(&secret) else {
            continue;
        };
        let s = state.clone();
        let Ok(Ok(list)) = tokio::task::spawn_blocking(move || s.list_batches(100, None)).await
        else {
            continue;
        };
        let batches = list["data"].as_array().cloned().unwrap_or_default();
        for b in batches {
            let (Some(id), Some(kind)) =
                (b["id"].as_str(), b["status"].as_str().and_then(event_type))
            else {
                continue;
            };
            if !announced.insert(id.to_owned()) {
                continue;
            }
            let msg_id = super::state::new_id("evt");
            let ts = crate::store::now_secs();
            let body: Value = json!({
                "id": msg_id, "object": "event", "type": kind,
                "created_at": ts, "data": {"id": id},
            });
            let body = body.to_string();
            let sent = http
                .post(&url)
                .header("content-type", "application/json")
                .header("webhook-id", &msg_id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", sign(&key, &msg_id, ts, &body))
                .body(body)
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            match sent {
                Ok(r) => tracing::info!(
                    batch = id,
                    event = kind,
                    status = r.status().as_u16(),
                    "batch event pushed"
                ),
                Err(e) => {
                    tracing::warn!(batch = id, event = kind, error = %e, "batch event push failed; not retried")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ended_batches_have_an_event() {
        assert_eq!(event_type("completed"), Some("batch.completed"));
        assert_eq!(event_type("cancelled"), Some("batch.cancelled"));
        assert_eq!(event_type("in_progress"), None);
        assert_eq!(event_type("cancelling"), None);
    }
}
