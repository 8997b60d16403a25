//! Deadlines (issue #17) end to end, with the real binary in front of a
//! standalone emulator: `X-Ferry-Deadline`, the tenant's default, and the
//! lane each answer came by.

mod common;

use common::{Stack, chat, until_status};
use serde_json::Value;

/// A deferred call of alice's with `X-Ferry-Deadline: deadline`.
async fn defer_by(s: &Stack, deadline: &str, custom_id: &str) -> reqwest::Response {
    s.http
        .post(s.url("/v1/chat/completions"))
        .bearer_auth("alice-key")
        .header("prefer", "respond-async")
        .header("x-ferry-custom-id", custom_id)
        .header("x-ferry-deadline", deadline)
        .json(&chat("gpt-4o-mini", "by when?"))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_deadline_is_stored_shown_and_refused_when_malformed() {
    let s = Stack::start("", "");
    for bad in ["0", "-1", "soon", "1.5", "86401"] {
        let r = defer_by(&s, bad, "bad").await;
        assert_eq!(r.status(), 400, "{bad}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], "X-Ferry-Deadline", "{bad}");
        assert_eq!(e["error"]["code"], "invalid_deadline", "{bad}");
    }
    // Nothing was stored for the refused calls.
    assert_eq!(s.status("alice-key", "bad", 0).await.0, 404);

    let r = defer_by(&s, "600", "timed").await;
    assert_eq!(r.status(), 202);
    let ticket: Value = r.json().await.unwrap();
    let created = ticket["created_at"].as_u64().unwrap();
    assert_eq!(
        ticket["deadline_at"].as_u64(),
        Some(created + 600),
        "{ticket}"
    );
    assert!(ticket["lane"].is_null(), "no answer yet: {ticket}");

    let r = s
        .defer(
            "alice-key",
            &chat("gpt-4o-mini", "whenever"),
            None,
            Some("untimed"),
        )
        .await;
    let ticket: Value = r.json().await.unwrap();
    assert!(ticket["deadline_at"].is_null(), "{ticket}");

    s.flush().await;
    for id in ["timed", "untimed"] {
        let done = until_status(&s, id, "completed").await;
        assert_eq!(done["lane"], "batch", "{done}");
    }
}
