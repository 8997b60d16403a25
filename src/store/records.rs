//! The records Ferry keeps, and the request lifecycle written once.

use serde::{Deserialize, Serialize};

fn one() -> u64 {
    1
}

/// A deferred request's lifecycle (contract section 4):
/// `queued → submitted → completed | failed | expired`, or `queued → cancelled`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    #[default]
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

/// The way an answer was obtained, and so what it cost (issue #17): a
/// Batch API job, the flex tier of the synchronous endpoint (batch prices,
/// slower), or the ordinary synchronous call (full price).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lane {
    #[default]
    Batch,
    Flex,
    Standard,
}

impl Lane {
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Batch => "batch",
            Lane::Flex => "flex",
            Lane::Standard => "standard",
        }
    }

    /// The inverse of [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<Lane> {
        [Lane::Batch, Lane::Flex, Lane::Standard]
            .into_iter()
            .find(|l| l.as_str() == s)
    }

    pub fn is_batch(&self) -> bool {
        *self == Lane::Batch
    }
}

/// Why a request could not be answered (the status object's `error`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestError {
    pub code: String,
    pub message: String,
}

/// One deferred request. Its fixed fields are stored as JSON in the
/// `requests` tree under its internal id; the fields marked "state" change
/// as the request moves through batches and live apart, as a fixed-size
/// [`RequestState`] in `states`, so that claiming, submitting and finishing
/// a 50,000-request batch writes 29 bytes per member instead of rewriting
/// its JSON record. The body lives in `bodies`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Ferry's internal id; upstream `custom_id` is `ferry-<id>`.
    pub id: u64,
    pub tenant: String,
    /// The caller's id (given in `X-Ferry-Custom-Id` or assigned).
    pub custom_id: String,
    /// The endpoint the call was made to (its batch line's `url`). Records
    /// written before endpoints existed read as chat completions.
    #[serde(default)]
    pub endpoint: crate::endpoint::Endpoint,
    /// Inputs the body counts against a per-batch input cap (embeddings:
    /// each element of `input`); one for records written before.
    #[serde(default = "one")]
    pub inputs: u64,
    pub model: String,
    /// Name of the upstream the model routes to.
    pub upstream: String,
    /// SHA-256 (hex) of the body as received, for idempotent retries.
    pub body_sha256: String,
    /// Length of the stored body (what goes into the JSONL line).
    pub body_len: u64,
    /// State.
    #[serde(skip)]
    pub status: RequestStatus,
    pub created_at: u64,
    /// State.
    #[serde(skip)]
    pub submitted_at: Option<u64>,
    /// State.
    #[serde(skip)]
    pub completed_at: Option<u64>,
    /// State: Ferry's batch id once the request is claimed by a flush.
    #[serde(skip)]
    pub batch: Option<u64>,
    /// The upstream batch id once that batch is created (read from the
    /// batch record, not stored per request).
    #[serde(skip)]
    pub batch_id: Option<String>,
    pub error: Option<RequestError>,
    pub callback_url: Option<String>,
    /// The caller asked for `stream: true` (replayed as SSE).
    pub stream: bool,
    /// State: how many batches this request has been sent in.
    #[serde(skip)]
    pub attempts: u32,
    /// Webhook delivery, when the caller gave a callback URL and the request
    /// is terminal.
    #[serde(default)]
    pub webhook: Option<WebhookState>,
    /// Unix second by which the caller wants a terminal answer
    /// (`X-Ferry-Deadline` or the tenant's default); `None` as before
    /// deadlines existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_at: Option<u64>,
    /// The lane of the batch that holds or held the request (read from the
    /// batch record, like `batch_id`); the status object shows it once the
    /// request is answered.
    #[serde(skip)]
    pub lane: Option<Lane>,
}

impl RequestRecord {
    /// A request about to be queued: no id yet (the store gives it one), no
    /// callback, not streamed; set the rest with struct update syntax.
    pub fn queued(
        tenant: &str,
        custom_id: &str,
        upstream: &str,
        model: &str,
        body_sha256: &str,
        body_len: u64,
        created_at: u64,
    ) -> RequestRecord {
        RequestRecord {
            id: 0,
            tenant: tenant.into(),
            custom_id: custom_id.into(),
            endpoint: crate::endpoint::Endpoint::ChatCompletions,
            inputs: 1,
            model: model.into(),
            upstream: upstream.into(),
            body_sha256: body_sha256.into(),
            body_len,
            status: RequestStatus::Queued,
            created_at,
            submitted_at: None,
            completed_at: None,
            batch: None,
            batch_id: None,
            error: None,
            callback_url: None,
            stream: false,
            attempts: 0,
            webhook: None,
            deadline_at: None,
            lane: None,
        }
    }

    /// The lane that produced the request's answer: that of the batch that
    /// finished it, once it is terminal (a cancelled request has none).
    pub fn answered_by(&self) -> Option<Lane> {
        match self.status {
            RequestStatus::Completed | RequestStatus::Failed | RequestStatus::Expired => self.lane,
            _ => None,
        }
    }

    /// Tests only: a queued request of `tenant` for model `m` of upstream
    /// `u`, with a 2-byte body (`{}`).
    #[cfg(test)]
    pub(crate) fn for_test(tenant: &str, custom_id: &str, body_sha256: &str) -> RequestRecord {
        RequestRecord::queued(tenant, custom_id, "u", "m", body_sha256, 2, 1)
    }

    pub fn upstream_custom_id(&self) -> String {
        upstream_custom_id(self.id)
    }

    pub fn state(&self) -> RequestState {
        RequestState {
            status: self.status,
            attempts: self.attempts,
            batch: self.batch,
            submitted_at: self.submitted_at,
            completed_at: self.completed_at,
            escalation: None,
        }
    }

    pub fn set_state(&mut self, s: RequestState) {
        self.status = s.status;
        self.attempts = s.attempts;
        self.batch = s.batch;
        self.submitted_at = s.submitted_at;
        self.completed_at = s.completed_at;
    }
}

/// The part of a request that changes while it moves through batches,
/// stored in the `states` tree as [`RequestState::LEN`] bytes:
/// status (1), attempts (4), batch (8), submitted_at (8), completed_at (8),
/// big-endian, 0 for "none" (ids and unix times are never 0); then, only
/// for a request escalated out of a submitted batch, the escalation's batch
/// (8), so every other state keeps the layout it had.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestState {
    pub status: RequestStatus,
    pub attempts: u32,
    pub batch: Option<u64>,
    pub submitted_at: Option<u64>,
    pub completed_at: Option<u64>,
    /// The batch of one that sends the request on a synchronous lane while
    /// it is still in `batch`, a submitted Batch API job (issue #17): the
    /// first of the two to answer wins. `None` for every other request.
    pub escalation: Option<u64>,
}

impl RequestState {
    pub const LEN: usize = 29;
    /// With an escalation.
    pub const ESCALATED_LEN: usize = Self::LEN + 8;

    /// The stored status byte is the status's index here; append only.
    const STATUSES: [RequestStatus; 6] = [
        RequestStatus::Queued,
        RequestStatus::Submitted,
        RequestStatus::Completed,
        RequestStatus::Failed,
        RequestStatus::Expired,
        RequestStatus::Cancelled,
    ];

    pub fn encode(&self) -> StateBytes {
        let mut v = [0u8; Self::ESCALATED_LEN];
        v[0] = Self::STATUSES
            .iter()
            .position(|s| *s == self.status)
            .unwrap_or(0) as u8;
        v[1..5].copy_from_slice(&self.attempts.to_be_bytes());
        v[5..13].copy_from_slice(&self.batch.unwrap_or(0).to_be_bytes());
        v[13..21].copy_from_slice(&self.submitted_at.unwrap_or(0).to_be_bytes());
        v[21..29].copy_from_slice(&self.completed_at.unwrap_or(0).to_be_bytes());
        let len = match self.escalation {
            Some(e) => {
                v[29..37].copy_from_slice(&e.to_be_bytes());
                Self::ESCALATED_LEN
            }
            None => Self::LEN,
        };
        StateBytes { bytes: v, len }
    }

    pub fn decode(v: &[u8]) -> Option<RequestState> {
        if v.len() != Self::LEN && v.len() != Self::ESCALATED_LEN {
            return None;
        }
        let u64_at = |at: usize| {
            let n = u64::from_be_bytes(v[at..at + 8].try_into().ok()?);
            Some((n != 0).then_some(n))
        };
        Some(RequestState {
            status: *Self::STATUSES.get(usize::from(v[0]))?,
            attempts: u32::from_be_bytes(v[1..5].try_into().ok()?),
            batch: u64_at(5)?,
            submitted_at: u64_at(13)?,
            completed_at: u64_at(21)?,
            escalation: if v.len() == Self::ESCALATED_LEN {
                u64_at(29)?
            } else {
                None
            },
        })
    }
}

/// An encoded [`RequestState`]: [`RequestState::LEN`] bytes, or
/// [`RequestState::ESCALATED_LEN`] with an escalation.
#[derive(Debug, Clone, Copy)]
pub struct StateBytes {
    bytes: [u8; RequestState::ESCALATED_LEN],
    len: usize,
}

impl std::ops::Deref for StateBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl From<&StateBytes> for sled::IVec {
    fn from(s: &StateBytes) -> sled::IVec {
        sled::IVec::from(&**s)
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
/// The body is kept as the JSON text of the output line, never as a parsed
/// tree: it is stored, and answered on `/result`, without re-serialising.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResult {
    pub status_code: u16,
    /// Valid JSON text (checked when the output line was parsed).
    pub body: bytes::Bytes,
}

impl StoredResult {
    /// The body as a JSON tree, for the status object, webhooks and the SSE
    /// replay.
    pub fn body_value(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// Stored form: the status code (2 bytes, big-endian), then the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(2 + self.body.len());
        v.extend_from_slice(&self.status_code.to_be_bytes());
        v.extend_from_slice(&self.body);
        v
    }

    pub fn decode(v: &[u8]) -> Option<StoredResult> {
        let code = v.get(..2)?;
        Some(StoredResult {
            status_code: u16::from_be_bytes([code[0], code[1]]),
            body: bytes::Bytes::copy_from_slice(&v[2..]),
        })
    }
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
    /// The endpoint of every line (the batch's `endpoint` upstream).
    /// Batches written before endpoints existed read as chat completions.
    #[serde(default)]
    pub endpoint: crate::endpoint::Endpoint,
    pub model: String,
    pub state: BatchState,
    pub created_at: u64,
    pub request_count: u64,
    pub bytes: u64,
    /// Why it was flushed (size, bytes, time, manual, shutdown).
    pub reason: String,
    /// Unix millis of the first of the `404`s in a row the upstream has
    /// answered for this submitted batch; `None` once a poll succeeds.
    /// Stored, so the bound on a lost batch survives restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_since: Option<u64>,
    /// How the members are sent: a Batch API job, or (a batch of one
    /// request escalated for its deadline) a synchronous call on flex or
    /// standard. Recorded before each call, so a restart resumes on the
    /// lane last chosen and never on a dearer one than recorded.
    #[serde(default, skip_serializing_if = "Lane::is_batch")]
    pub lane: Lane,
}

impl BatchRecord {
    /// A batch just claimed from queue `qk` (its id from the store).
    pub fn claimed(
        id: u64,
        qk: &super::QueueKey,
        request_count: u64,
        bytes: u64,
        reason: &str,
    ) -> Self {
        BatchRecord {
            id,
            upstream: qk.upstream.clone(),
            endpoint: qk.endpoint,
            model: qk.model.clone(),
            state: BatchState::Claimed,
            created_at: now_secs(),
            request_count,
            bytes,
            reason: reason.to_owned(),
            missing_since: None,
            lane: Lane::Batch,
        }
    }

    pub fn is_live(&self) -> bool {
        !matches!(self.state, BatchState::Done { .. })
    }

    /// The upstream files and batch of this batch that may still exist
    /// upstream and hold its members' prompts or answers. A finished batch's
    /// are the files it still owes a delete (output and error included).
    pub fn upstream_objects(&self) -> Vec<String> {
        match &self.state {
            BatchState::Claimed => Vec::new(),
            BatchState::Uploaded { file_id } => vec![file_id.clone()],
            BatchState::Submitted { file_id, batch_id } => vec![file_id.clone(), batch_id.clone()],
            BatchState::Done { cleanup, .. } => cleanup.clone(),
        }
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

/// A lease as taken or renewed: its fencing token, and the node that asked
/// for it to be handed over, if one did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub token: u64,
    pub wanted_by: Option<String>,
}

/// What the flush policy looks at, kept in memory and rebuilt at open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub count: u64,
    /// Sum of JSONL line lengths.
    pub bytes: u64,
    /// Enqueue time of the oldest entry (unix millis), 0 when empty.
    pub oldest_ms: u64,
    /// Inputs counted against a per-batch input cap (embeddings), summed.
    pub inputs: u64,
}

/// A queue's size as an intake into it left it: what deciding to wake the
/// flush loop needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueLoad {
    pub count: u64,
    pub bytes: u64,
    /// The queue was empty before: its time threshold starts now.
    pub started: bool,
}

/// The result of storing a deferred request.
#[derive(Debug)]
pub enum Intake {
    /// Stored under a new id.
    Created(RequestRecord),
    /// The same tenant and custom id with the same body: the earlier ticket.
    Existing(RequestRecord),
    /// The same tenant and custom id with a different body.
    Conflict(RequestRecord),
}

/// The result of `DELETE /v1/ferry/requests/{id}`.
#[derive(Debug)]
pub enum CancelOutcome {
    Cancelled(RequestRecord),
    /// Cancelled by an earlier call: nothing changed.
    AlreadyCancelled(RequestRecord),
    /// Already in a batch or finished: nothing changed.
    TooLate(RequestRecord),
    NotFound,
}

/// What became of one member of a finished batch.
#[derive(Debug, Clone)]
pub enum Outcome {
    Completed(StoredResult),
    Failed(RequestError),
    Expired(RequestError),
    /// Its batch was cancelled upstream (Ferry never cancels one: an
    /// operator or the provider did). Ingestion turns this into a counted
    /// `Retry` with the upstream's `max_attempts`, so a batch cancelled over
    /// and over ends with its requests failed instead of re-sent forever.
    Cancelled(RequestError),
    /// Back to the queue, and the batch is not counted against
    /// `max_attempts`: it was refused for the upstream's state, not the
    /// request's (the token budget was full).
    Requeue,
    /// Back to the queue unless the request has already been sent in
    /// `max_attempts` batches; then failed with this error.
    Retry {
        error: RequestError,
        max_attempts: u32,
    },
    /// Like `Retry`, but the request ends `expired` when attempts run out.
    RetryOrExpire {
        error: RequestError,
        max_attempts: u32,
    },
}

/// What one purge slice removed, and whether more is due at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeReport {
    /// Terminal requests removed whole (record, state, custom id).
    pub requests: u64,
    /// Stored results removed with them.
    pub results: u64,
    /// Request bodies removed (most go when their request finishes).
    pub bodies: u64,
    /// Finished batch records removed, with their member lists.
    pub batches: u64,
    /// A full slice was removed: the caller may run the next one now.
    pub more: bool,
}

impl PurgeReport {
    /// (kind, rows) for each kind, as the metrics label them.
    pub fn by_kind(&self) -> [(&'static str, u64); 4] {
        [
            ("request", self.requests),
            ("result", self.results),
            ("body", self.bodies),
            ("batch", self.batches),
        ]
    }
}

/// Builds a webhook's JSON body for a request that just became terminal.
pub type PayloadFn<'a> = dyn Fn(&RequestRecord, Option<&StoredResult>) -> String + 'a;

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
    fn states_and_results_round_trip() {
        use RequestStatus::*;
        for status in [Queued, Submitted, Completed, Failed, Expired, Cancelled] {
            let s = RequestState {
                status,
                attempts: 3,
                batch: Some(u64::MAX),
                submitted_at: Some(1_700_000_000),
                completed_at: None,
                escalation: None,
            };
            assert_eq!(s.encode().len(), RequestState::LEN, "the layout it had");
            assert_eq!(RequestState::decode(&s.encode()), Some(s));
            let escalated = RequestState {
                escalation: Some(42),
                ..s
            };
            assert_eq!(escalated.encode().len(), RequestState::ESCALATED_LEN);
            assert_eq!(RequestState::decode(&escalated.encode()), Some(escalated));
        }
        assert_eq!(
            RequestState::decode(&RequestState::default().encode()),
            Some(RequestState::default())
        );
        assert_eq!(RequestState::decode(&[9; RequestState::LEN]), None);
        assert_eq!(RequestState::decode(&[0; 5]), None);
        let r = StoredResult {
            status_code: 429,
            body: bytes::Bytes::from_static(br#"{"error":{"message":"slow"}}"#),
        };
        assert_eq!(StoredResult::decode(&r.encode()), Some(r.clone()));
        assert_eq!(r.body_value()["error"]["message"], "slow");
        assert_eq!(StoredResult::decode(&[1]), None);
    }

    #[test]
    fn records_written_before_deadlines_read_without_one() {
        let mut rec = RequestRecord::for_test("t", "c", "h");
        let old = serde_json::to_value(&rec).unwrap();
        assert!(old.get("deadline_at").is_none(), "absent, not null");
        assert!(old.get("lane").is_none(), "the lane lives with the batch");
        let read: RequestRecord = serde_json::from_value(old).unwrap();
        assert_eq!(read.deadline_at, None);
        rec.deadline_at = Some(1_700_000_600);
        let read: RequestRecord =
            serde_json::from_slice(&serde_json::to_vec(&rec).unwrap()).unwrap();
        assert_eq!(read.deadline_at, Some(1_700_000_600));

        let qk = super::super::QueueKey::chat("u", "m");
        let mut b = BatchRecord::claimed(1, &qk, 1, 2, "size");
        let old = serde_json::to_value(&b).unwrap();
        assert!(old.get("lane").is_none(), "a Batch API job reads as before");
        assert_eq!(
            serde_json::from_value::<BatchRecord>(old).unwrap().lane,
            Lane::Batch
        );
        b.lane = Lane::Standard;
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(v["lane"], "standard");
        assert_eq!(serde_json::from_value::<BatchRecord>(v).unwrap(), b);
        for l in [Lane::Batch, Lane::Flex, Lane::Standard] {
            assert_eq!(Lane::parse(l.as_str()), Some(l));
        }
        assert_eq!(Lane::parse("turbo"), None);
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
