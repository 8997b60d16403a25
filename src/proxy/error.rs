//! The proxy's one error type: every error Ferry answers itself on the
//! public port, and the one place ([`ProxyError::into_reply`]) that turns
//! it into an HTTP status, headers and the OpenAI error envelope; on an
//! Anthropic call [`ErrorReply::write`] writes the same error in Anthropic's
//! shape (`{"type":"error","error":{"type","message"}}`), which is what the
//! caller's SDK parses.
//!
//! Handlers return `Result<_, ProxyError>`; the request filter answers the
//! error once, with [`answer`]. Messages are the `Display` text, so a
//! variant's wording sits next to its name.

use std::time::Duration;

use bytes::Bytes;
use pingora::ErrorType;
use pingora::proxy::Session;

use super::respond;
use crate::api_error::ErrorEnvelope;
use crate::intake::IntakeError;
use crate::limits::LimitKind;
use crate::store::{RequestError, RequestRecord, RequestStatus, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A path outside Ferry's routes and the OpenAI API's `/v1/...`.
    #[error("Unknown route. Ferry serves /v1/... and /healthz, /readyz.")]
    UnknownRoute,
    /// One of Ferry's own routes, with a method it does not serve.
    #[error("Method not allowed on this Ferry route; allowed: {allow}.")]
    MethodNotAllowed { allow: &'static str },
    /// No `Authorization: Bearer` (or, on Anthropic calls, `x-api-key`)
    /// key, or one no tenant holds.
    #[error(
        "Missing or unknown API key. Send your Ferry key as `Authorization: Bearer <key>` (or `x-api-key: <key>` on Anthropic calls)."
    )]
    InvalidApiKey,
    /// Passthrough of an API family no configured upstream speaks.
    #[error("No upstream of this Ferry serves the {0} API.")]
    NoUpstreamForFamily(&'static str),
    /// The tenant is over its rate for this kind of call.
    #[error(
        "Rate limit for {} calls reached; retry after {} s.",
        .kind.as_str(),
        .retry.as_secs()
    )]
    RateLimited { kind: LimitKind, retry: Duration },
    /// A tenant named one of Ferry's own upstream files or batches: they
    /// hold every tenant's prompts, so the answer says no more than the
    /// upstream would for an object that does not exist.
    #[error("No such object: {0}")]
    OwnObject(String),
    /// No request of this tenant has this custom id.
    #[error("No request with id `{0}`.")]
    RequestNotFound(String),
    /// The request is already in a batch or finished.
    #[error(
        "Request `{id}` is {} and can no longer be cancelled.",
        if .status.is_terminal() { .status.as_str() } else { "already in a batch" }
    )]
    CancelTooLate { id: String, status: RequestStatus },
    /// A finished request the upstream never answered (failed, expired or
    /// cancelled): its stored reason, in place of the upstream's answer.
    #[error("{}", .error.message)]
    Unanswered {
        status: RequestStatus,
        error: RequestError,
    },
    /// A deferred call refused at intake; intake's table gives status and code.
    #[error(transparent)]
    Intake(#[from] IntakeError),
    /// Passthrough: the upstream did not answer within the configured timeouts.
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    /// Passthrough: pingora could not read the caller's request; the
    /// status (a 4xx) is the one pingora chose.
    #[error("the request could not be read")]
    UnreadableRequest(u16),
    /// Passthrough: no connection to the upstream.
    #[error("the upstream could not be reached")]
    UpstreamUnreachable,
    /// An OpenAI batch event refused: unsigned or malformed (`400`), or
    /// signed with another secret or too old (`401`).
    #[error("{}", .0.message())]
    BatchEvent(crate::batch::events::Refusal),
    /// Writing to the caller failed: there is nobody left to answer, so the
    /// edge hands the failure back to pingora as it is.
    #[error("writing to the caller failed: {0}")]
    Downstream(Box<pingora::Error>),
}

/// What the edge writes for an error.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorReply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub envelope: ErrorEnvelope,
}

impl ProxyError {
    /// The one mapping to HTTP: status, headers and envelope; for
    /// [`ProxyError::Downstream`], the failure to hand back to pingora.
    pub fn into_reply(self) -> Result<ErrorReply, Box<pingora::Error>> {
        use ProxyError::*;
        let (status, param, code): (u16, Option<&str>, &str) = match self {
            UnknownRoute => (404, None, "unknown_route"),
            MethodNotAllowed { .. } => (405, None, "method_not_allowed"),
            InvalidApiKey => (401, None, "invalid_api_key"),
            NoUpstreamForFamily(_) => (404, None, "no_upstream"),
            RateLimited { .. } => (429, None, "rate_limit_exceeded"),
            OwnObject(_) => (404, None, "not_found"),
            RequestNotFound(_) => (404, Some("id"), "request_not_found"),
            CancelTooLate { .. } => (409, Some("id"), "cancel_too_late"),
            Unanswered { status, ref error } => {
                let http = match status {
                    RequestStatus::Expired => 504,
                    RequestStatus::Cancelled => 409,
                    _ => 502,
                };
                (http, None, error.code.as_str())
            }
            UpstreamTimeout => (504, None, "upstream_timeout"),
            UnreadableRequest(status) => (status, None, "bad_request"),
            UpstreamUnreachable => (502, None, "upstream_unreachable"),
            BatchEvent(r) if r.status() == 401 => (401, None, "invalid_signature"),
            BatchEvent(_) => (400, None, "invalid_event"),
            // Intake's errors keep their own table, pinned by intake's
            // unit tests; the edge takes it whole.
            Intake(ref e) => {
                return Ok(ErrorReply {
                    status: e.status(),
                    headers: Vec::new(),
                    envelope: e.envelope(),
                });
            }
            Downstream(broken) => return Err(broken),
        };
        let headers = match &self {
            MethodNotAllowed { allow } => vec![("allow", (*allow).to_owned())],
            RateLimited { retry, .. } => vec![("retry-after", retry.as_secs().to_string())],
            _ => Vec::new(),
        };
        let envelope = ErrorEnvelope::for_status(status, self.to_string(), param, Some(code));
        Ok(ErrorReply {
            status,
            headers,
            envelope,
        })
    }

    /// A terminal request whose answer is not stored: purged since its
    /// record was read (`still_stored` false: retention removed both, so it
    /// answers as unknown, like any purged request), or never answered.
    pub fn no_result(rec: &RequestRecord, still_stored: bool) -> Self {
        if still_stored {
            ProxyError::unanswered(rec)
        } else {
            ProxyError::RequestNotFound(rec.custom_id.clone())
        }
    }

    /// A terminal request the upstream never answered.
    pub fn unanswered(rec: &RequestRecord) -> Self {
        ProxyError::Unanswered {
            status: rec.status,
            error: why_unanswered(rec),
        }
    }

    /// The error to answer when passthrough fails, or `None` when the
    /// caller's side failed and there is nobody to answer.
    pub fn from_passthrough(e: &pingora::Error) -> Option<Self> {
        match e.etype() {
            ErrorType::ConnectTimedout
            | ErrorType::ReadTimedout
            | ErrorType::WriteTimedout
            | ErrorType::TLSHandshakeTimedout => Some(ProxyError::UpstreamTimeout),
            // A status of 0 is pingora's "nothing to answer".
            ErrorType::HTTPStatus(c) if *c < 500 => {
                (*c > 0).then_some(ProxyError::UnreadableRequest(*c))
            }
            _ => match e.esource() {
                pingora::ErrorSource::Downstream => None,
                _ => Some(ProxyError::UpstreamUnreachable),
            },
        }
    }
}

/// The stored reason a terminal request has no upstream answer, or one
/// named after its status when none was stored.
pub fn why_unanswered(rec: &RequestRecord) -> RequestError {
    rec.error.clone().unwrap_or_else(|| RequestError {
        code: rec.status.as_str().to_owned(),
        message: format!("the request is {}", rec.status.as_str()),
    })
}

/// Storage trouble while answering Ferry's own routes reads to the caller
/// as it does at intake (`storage_unavailable`, `custom_id_in_progress`).
impl From<StoreError> for ProxyError {
    fn from(e: StoreError) -> Self {
        ProxyError::Intake(IntakeError::from(e))
    }
}

impl From<Box<pingora::Error>> for ProxyError {
    fn from(e: Box<pingora::Error>) -> Self {
        ProxyError::Downstream(e)
    }
}

impl ErrorReply {
    /// The body: the OpenAI envelope, or on an Anthropic call the same
    /// error in Anthropic's shape.
    pub fn body(&self, anthropic: bool) -> Bytes {
        if anthropic {
            Bytes::from(crate::anthropic::from_openai(self.status, &self.envelope).to_string())
        } else {
            Bytes::from(self.envelope.to_bytes())
        }
    }

    /// Writes the reply as a complete JSON response.
    pub async fn write(&self, session: &mut Session, anthropic: bool) -> pingora::Result<()> {
        respond::json(session, self.status, &self.headers, self.body(anthropic)).await
    }
}

/// The edge: answers `e` in the caller's API family's error shape, or hands
/// a broken connection back to pingora.
pub async fn answer(session: &mut Session, e: ProxyError, anthropic: bool) -> pingora::Result<()> {
    e.into_reply()?.write(session, anthropic).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(status: RequestStatus, error: Option<(&str, &str)>) -> RequestRecord {
        let mut r = RequestRecord::for_test("t", "c", "h");
        r.status = status;
        r.error = error.map(|(code, message)| RequestError {
            code: code.into(),
            message: message.into(),
        });
        r
    }

    #[test]
    fn a_result_purged_after_its_record_was_read_answers_as_unknown() {
        let r = rec(RequestStatus::Completed, None);
        assert!(matches!(
            ProxyError::no_result(&r, false),
            ProxyError::RequestNotFound(id) if id == "c"
        ));
        assert!(matches!(
            ProxyError::no_result(&r, true),
            ProxyError::Unanswered { .. }
        ));
    }

    /// One row of the caller-facing contract.
    struct Row {
        status: u16,
        kind: &'static str,
        param: Option<&'static str>,
        code: &'static str,
        headers: &'static [(&'static str, &'static str)],
    }

    const fn row(
        status: u16,
        kind: &'static str,
        param: Option<&'static str>,
        code: &'static str,
    ) -> Row {
        Row {
            status,
            kind,
            param,
            code,
            headers: &[],
        }
    }

    /// Every variant's status, `type`, `param`, `code` and headers: the
    /// caller-facing contract, in one table.
    #[test]
    fn every_variant_maps_to_its_status_and_code() {
        use ProxyError::*;
        let invalid = "invalid_request_error";
        let table = [
            (UnknownRoute, row(404, invalid, None, "unknown_route")),
            (
                MethodNotAllowed { allow: "GET, POST" },
                Row {
                    headers: &[("allow", "GET, POST")],
                    ..row(405, invalid, None, "method_not_allowed")
                },
            ),
            (
                InvalidApiKey,
                row(401, "authentication_error", None, "invalid_api_key"),
            ),
            (
                RateLimited {
                    kind: LimitKind::Deferred,
                    retry: Duration::from_secs(7),
                },
                Row {
                    headers: &[("retry-after", "7")],
                    ..row(429, "rate_limit_error", None, "rate_limit_exceeded")
                },
            ),
            (
                OwnObject("file-x".into()),
                row(404, invalid, None, "not_found"),
            ),
            (
                RequestNotFound("r".into()),
                row(404, invalid, Some("id"), "request_not_found"),
            ),
            (
                CancelTooLate {
                    id: "r".into(),
                    status: RequestStatus::Submitted,
                },
                row(409, invalid, Some("id"), "cancel_too_late"),
            ),
            (
                ProxyError::unanswered(&rec(RequestStatus::Failed, Some(("boom", "it broke")))),
                row(502, "upstream_error", None, "boom"),
            ),
            (
                ProxyError::unanswered(&rec(RequestStatus::Expired, None)),
                row(504, "upstream_error", None, "expired"),
            ),
            (
                ProxyError::unanswered(&rec(RequestStatus::Cancelled, None)),
                row(409, invalid, None, "cancelled"),
            ),
            (
                Intake(IntakeError::QueueFull(3)),
                row(503, "server_error", None, "queue_full"),
            ),
            (
                Intake(IntakeError::Conflict("c".into())),
                row(
                    409,
                    invalid,
                    Some("X-Ferry-Custom-Id"),
                    "custom_id_conflict",
                ),
            ),
            (
                ProxyError::from(StoreError::Busy),
                row(
                    503,
                    "server_error",
                    Some("X-Ferry-Custom-Id"),
                    "custom_id_in_progress",
                ),
            ),
            (
                UpstreamTimeout,
                row(504, "upstream_error", None, "upstream_timeout"),
            ),
            (
                UnreadableRequest(400),
                row(400, invalid, None, "bad_request"),
            ),
            (
                UpstreamUnreachable,
                row(502, "upstream_error", None, "upstream_unreachable"),
            ),
        ];
        for (e, want) in table {
            let name = format!("{e:?}");
            let r = e.into_reply().expect(&name);
            let v: serde_json::Value = serde_json::from_slice(&r.envelope.to_bytes()).unwrap();
            assert_eq!(r.status, want.status, "{name}");
            assert_eq!(v["error"]["type"], want.kind, "{name}");
            assert_eq!(v["error"]["param"].as_str(), want.param, "{name}");
            assert_eq!(v["error"]["code"], want.code, "{name}");
            let headers: Vec<(&str, &str)> =
                r.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            assert_eq!(headers, want.headers, "{name}");
        }
        let broken = pingora::Error::new(ErrorType::WriteError);
        assert!(Downstream(broken).into_reply().is_err());
    }

    #[test]
    fn messages_are_worded_as_callers_see_them() {
        let msg = |e: ProxyError| e.into_reply().unwrap().envelope.error.message;
        assert_eq!(
            msg(ProxyError::RateLimited {
                kind: LimitKind::Passthrough,
                retry: Duration::from_secs(2)
            }),
            "Rate limit for passthrough calls reached; retry after 2 s."
        );
        assert_eq!(
            msg(ProxyError::MethodNotAllowed { allow: "GET" }),
            "Method not allowed on this Ferry route; allowed: GET."
        );
        assert_eq!(
            msg(ProxyError::CancelTooLate {
                id: "a".into(),
                status: RequestStatus::Submitted
            }),
            "Request `a` is already in a batch and can no longer be cancelled."
        );
        assert_eq!(
            msg(ProxyError::CancelTooLate {
                id: "a".into(),
                status: RequestStatus::Completed
            }),
            "Request `a` is completed and can no longer be cancelled."
        );
        assert_eq!(
            msg(ProxyError::unanswered(&rec(RequestStatus::Expired, None))),
            "the request is expired"
        );
        assert_eq!(
            msg(ProxyError::OwnObject("batch_1".into())),
            "No such object: batch_1"
        );
        assert_eq!(
            msg(ProxyError::RequestNotFound("r".into())),
            "No request with id `r`."
        );
    }

    #[test]
    fn passthrough_failures_map_by_type_and_side() {
        let timeout = pingora::Error::new(ErrorType::ReadTimedout);
        assert!(matches!(
            ProxyError::from_passthrough(&timeout),
            Some(ProxyError::UpstreamTimeout)
        ));
        let bad = pingora::Error::new(ErrorType::HTTPStatus(400));
        assert!(matches!(
            ProxyError::from_passthrough(&bad),
            Some(ProxyError::UnreadableRequest(400))
        ));
        let down = pingora::Error::new_down(ErrorType::WriteError);
        assert!(ProxyError::from_passthrough(&down).is_none());
        let up = pingora::Error::new_up(ErrorType::ConnectRefused);
        assert!(matches!(
            ProxyError::from_passthrough(&up),
            Some(ProxyError::UpstreamUnreachable)
        ));
    }
}
