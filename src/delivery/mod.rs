//! Handing results back: long-poll waiters and the status object.

pub mod waiters;
pub mod webhooks;

use serde_json::{Value, json};

use crate::store::{RequestRecord, StoredResult, WebhookState, WebhookStatus};

/// The caller-facing status object (contract section 4).
pub fn status_object(rec: &RequestRecord, result: Option<&StoredResult>) -> Value {
    json!({
        "id": rec.custom_id,
        "object": "ferry.request",
        "status": rec.status.as_str(),
        "model": rec.model,
        "endpoint": rec.endpoint.path(),
        "created_at": rec.created_at,
        "submitted_at": rec.submitted_at,
        "completed_at": rec.completed_at,
        "batch_id": rec.batch_id,
        "deadline_at": rec.deadline_at,
        "lane": rec.answered_by().map(|l| l.as_str()),
        "result": result.map(|r| json!({"status_code": r.status_code, "body": r.body_value()})),
        "error": rec.error.as_ref().map(|e| json!({"code": e.code, "message": e.message})),
        "webhook": webhook_state(rec),
    })
}

/// The webhook's state: `null` without a callback URL; `pending` from
/// acceptance until the first delivery attempt records its own state.
fn webhook_state(rec: &RequestRecord) -> Option<WebhookState> {
    rec.webhook.clone().or_else(|| {
        rec.callback_url.as_ref().map(|_| WebhookState {
            status: WebhookStatus::Pending,
            attempts: 0,
            last_error: None,
        })
    })
}

/// A webhook's body: `{"type": "ferry.request.<status>", "data": <status object>}`.
pub fn webhook_payload(rec: &RequestRecord, result: Option<&StoredResult>) -> String {
    json!({
        "type": format!("ferry.request.{}", rec.status.as_str()),
        "data": status_object(rec, result),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{RequestError, RequestStatus};

    /// A finished request; also the waiters' tests' record.
    pub(super) fn record() -> RequestRecord {
        RequestRecord {
            id: 5,
            tenant: "t".into(),
            custom_id: "invoice-1".into(),
            endpoint: Default::default(),
            inputs: 1,
            model: "gpt-4o-mini".into(),
            upstream: "u".into(),
            body_sha256: String::new(),
            body_len: 0,
            status: RequestStatus::Failed,
            created_at: 10,
            submitted_at: Some(11),
            completed_at: Some(12),
            batch: Some(1),
            batch_id: Some("batch_1".into()),
            error: Some(RequestError {
                code: "invalid_request".into(),
                message: "bad".into(),
            }),
            callback_url: None,
            stream: false,
            attempts: 1,
            webhook: None,
            deadline_at: None,
            lane: Some(crate::store::Lane::Batch),
        }
    }

    #[test]
    fn status_object_has_every_key() {
        let v = status_object(&record(), None);
        for k in [
            "id",
            "object",
            "status",
            "model",
            "created_at",
            "submitted_at",
            "completed_at",
            "batch_id",
            "deadline_at",
            "lane",
            "result",
            "error",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
        assert_eq!(v["id"], "invoice-1");
        assert_eq!(v["status"], "failed");
        assert_eq!(v["error"]["code"], "invalid_request");
        assert!(v["result"].is_null());
        assert!(v["webhook"].is_null(), "no callback URL");
        assert!(v["deadline_at"].is_null(), "no deadline");
        assert_eq!(v["lane"], "batch", "failed by its batch");
    }

    #[test]
    fn the_lane_shows_once_the_request_is_answered() {
        use crate::store::Lane;
        let with = |status, lane| RequestRecord {
            status,
            lane,
            deadline_at: Some(99),
            ..record()
        };
        let v = status_object(&with(RequestStatus::Completed, Some(Lane::Flex)), None);
        assert_eq!(
            (&v["lane"], &v["deadline_at"]),
            (&json!("flex"), &json!(99))
        );
        // Claimed on a lane, not answered yet: no lane to show.
        for s in [RequestStatus::Queued, RequestStatus::Submitted] {
            assert!(status_object(&with(s, Some(Lane::Standard)), None)["lane"].is_null());
        }
        assert!(status_object(&with(RequestStatus::Cancelled, None), None)["lane"].is_null());
    }

    #[test]
    fn a_callback_is_pending_before_its_first_attempt() {
        let rec = RequestRecord {
            callback_url: Some("https://hooks.example/x".into()),
            ..record()
        };
        let v = status_object(&rec, None);
        assert_eq!(v["webhook"]["status"], "pending", "{v}");
        assert_eq!(v["webhook"]["attempts"], 0, "{v}");
    }
}
