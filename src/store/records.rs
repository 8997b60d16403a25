//! The records Ferry keeps, and the request lifecycle written once.

use serde::{Deserialize, Serialize};

/// A deferred request's lifecycle (contract section 4):
/// `queued → submitted → completed | failed | expired`, or `queued → cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    Queued,
    Submitted,
    Completed,
    Failed,
    Expired,
    Cancelled,
}

impl RequestStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RequestStatus::Completed
                | RequestStatus::Failed
                | RequestStatus::Expired
                | RequestStatus::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Queued => "queued",
            RequestStatus::Submitted => "submitted",
            RequestStatus::Completed => "completed",
            RequestStatus::Failed => "failed",
            RequestStatus::Expired => "expired",
            RequestStatus::Cancelled => "cancelled",
        }
    }

    /// The transitions the lifecycle allows; everything else is a bug the
    /// store refuses to write. `submitted → queued` is a re-queue after an
    /// expired, cancelled or partly failed batch.
    pub fn can_become(self, next: RequestStatus) -> bool {
        use RequestStatus::*;
        matches!(
            (self, next),
            (Queued, Submitted | Cancelled | Failed)
                | (Submitted, Completed | Failed | Expired | Queued)
        )
    }
}

/// Why a request could not be answered (the status object's `error`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestError {
    pub code: String,
    pub message: String,
}

/// One deferred request. Stored as JSON in the `requests` tree under its
/// internal id; its body lives apart in `bodies` so that status updates do
/// not rewrite it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Ferry's internal id; upstream `custom_id` is `ferry-<id>`.
    pub id: u64,
    pub tenant: String,
    /// The caller's id (given in `X-Ferry-Custom-Id` or assigned).
    pub custom_id: String,
    pub model: String,
    /// Name of the upstream the model routes to.
    pub upstream: String,
    /// SHA-256 (hex) of the body as received, for idempotent retries.
    pub body_sha256: String,
    /// Length of the stored body (what goes into the JSONL line).
    pub body_len: u64,
    pub status: RequestStatus,
    pub created_at: u64,
    pub submitted_at: Option<u64>,
    pub completed_at: Option<u64>,
    /// Ferry's batch id once the request is claimed by a flush.
    pub batch: Option<u64>,
    /// The upstream batch id once that batch is created.
    pub batch_id: Option<String>,
    pub error: Option<RequestError>,
    pub callback_url: Option<String>,
    /// The caller asked for `stream: true` (replayed as SSE).
    pub stream: bool,
    /// How many batches this request has been sent in.
    pub attempts: u32,
    /// Webhook delivery, when the caller gave a callback URL and the request
    /// is terminal.
    #[serde(default)]
    pub webhook: Option<WebhookState>,
}

impl RequestRecord {
    pub fn upstream_custom_id(&self) -> String {
        upstream_custom_id(self.id)
    }
}

pub fn upstream_custom_id(id: u64) -> String {
    format!("ferry-{id}")
}

/// The inverse of [`upstream_custom_id`], exactly: digits only, no sign or
/// leading zero, so each id has one spelling.
pub fn parse_upstream_custom_id(s: &str) -> Option<u64> {
    let digits = s.strip_prefix("ferry-")?;
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookStatus {
    Pending,
    Delivered,
    /// Retried until `webhooks.max_age_secs` without a 2xx.
    Dead,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookState {
    pub status: WebhookStatus,
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// One webhook waiting in the outbox, keyed by its request id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub request: u64,
    pub tenant: String,
    pub url: String,
    /// `webhook-id`: the same on every try.
    pub msg_id: String,
    /// The JSON body, fixed when the request became terminal.
    pub payload: String,
    pub first_ms: u64,
    pub due_ms: u64,
    pub attempts: u32,
}

/// The upstream's answer for one request: status code and body verbatim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredResult {
    pub status_code: u16,
    pub body: serde_json::Value,
}

/// A batch's lifecycle inside Ferry. Each step is recorded before the next
/// upstream call, so recovery knows what may already have happened upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum BatchState {
    /// Members chosen; nothing sent upstream yet (an upload may have started).
    Claimed,
    /// Input file uploaded; the batch may or may not have been created.
    Uploaded { file_id: String },
    /// The upstream batch exists.
    Submitted { file_id: String, batch_id: String },
    /// Results stored and members terminal or re-queued.
    Done {
        file_id: Option<String>,
        batch_id: Option<String>,
        upstream_status: String,
        /// Upstream files (input, output, error) not yet deleted; emptied as
        /// deletes succeed, and retried at the next start.
        #[serde(default)]
        cleanup: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub id: u64,
    pub upstream: String,
    pub model: String,
    pub state: BatchState,
    pub created_at: u64,
    pub request_count: u64,
    pub bytes: u64,
    /// Why it was flushed (size, bytes, time, manual, shutdown).
    pub reason: String,
}

impl BatchRecord {
    pub fn is_live(&self) -> bool {
        !matches!(self.state, BatchState::Done { .. })
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_allows_only_forward_moves() {
        use RequestStatus::*;
        assert!(Queued.can_become(Submitted));
        assert!(Queued.can_become(Cancelled));
        assert!(Submitted.can_become(Completed));
        assert!(Submitted.can_become(Queued));
        assert!(!Submitted.can_become(Cancelled));
        for t in [Completed, Failed, Expired, Cancelled] {
            assert!(t.is_terminal());
            for n in [Queued, Submitted, Completed, Failed, Expired, Cancelled] {
                assert!(!t.can_become(n), "{t:?} -> {n:?}");
            }
        }
    }

    #[test]
    fn upstream_ids_round_trip() {
        assert_eq!(parse_upstream_custom_id(&upstream_custom_id(42)), Some(42));
        assert_eq!(parse_upstream_custom_id("r-2"), None);
        assert_eq!(parse_upstream_custom_id("ferry-x"), None);
        assert_eq!(parse_upstream_custom_id("ferry-+5"), None);
        assert_eq!(parse_upstream_custom_id("ferry-05"), None);
        assert_eq!(parse_upstream_custom_id("ferry-0"), Some(0));
    }
}
