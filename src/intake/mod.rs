//! Deferred calls in: decide whether a call is deferred, validate its body,
//! assign its id, store it durably. Pure functions apart from [`accept`].

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::api_error::ErrorEnvelope;
use crate::config::{Mode, Tenant, UpstreamSettings};
use crate::endpoint::{DEFAULT_MODERATION_MODEL, Endpoint};
use crate::store::{Intake, RequestRecord, RequestStatus, Store, StoreError, now_secs};
use crate::upstream::profile::ProviderProfile;

/// Errors of the intake layer; [`IntakeError::status`] is the one mapping to HTTP.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
        code: &'static str,
    },
    #[error("request body is {size} bytes, over the limit of {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("the request body did not arrive within {0:?}")]
    Timeout(Duration),
    #[error("custom id `{0}` is already used with a different body")]
    Conflict(String),
    #[error("Ferry cannot store the request right now: {0}")]
    Unavailable(String),
    #[error("Ferry's queues are full ({0} requests waiting); retry later")]
    QueueFull(u64),
    #[error("Ferry is shutting down; retry in a moment or against another instance")]
    ShuttingDown,
    #[error("a request with this custom id is being stored right now; retry in a moment")]
    InProgress,
}

impl IntakeError {
    pub fn status(&self) -> u16 {
        match self {
            IntakeError::BadRequest { .. } => 400,
            IntakeError::TooLarge { .. } => 413,
            IntakeError::Timeout(_) => 408,
            IntakeError::Conflict(_) => 409,
            IntakeError::Unavailable(_)
            | IntakeError::QueueFull(_)
            | IntakeError::ShuttingDown
            | IntakeError::InProgress => 503,
        }
    }

    pub fn envelope(&self) -> ErrorEnvelope {
        let (param, code) = match self {
            IntakeError::BadRequest { param, code, .. } => (param.as_deref(), *code),
            IntakeError::TooLarge { .. } => (None, "request_too_large"),
            IntakeError::Timeout(_) => (None, "body_timeout"),
            IntakeError::Conflict(_) => (Some("X-Ferry-Custom-Id"), "custom_id_conflict"),
            IntakeError::Unavailable(_) => (None, "storage_unavailable"),
            IntakeError::QueueFull(_) => (None, "queue_full"),
            IntakeError::ShuttingDown => (None, "shutting_down"),
            IntakeError::InProgress => (Some("X-Ferry-Custom-Id"), "custom_id_in_progress"),
        };
        ErrorEnvelope::for_status(self.status(), self.to_string(), param, Some(code))
    }
}

impl From<StoreError> for IntakeError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Busy => IntakeError::InProgress,
            e => IntakeError::Unavailable(e.to_string()),
        }
    }
}

fn bad(message: impl Into<String>, param: Option<&str>, code: &'static str) -> IntakeError {
    IntakeError::BadRequest {
        message: message.into(),
        param: param.map(str::to_owned),
        code,
    }
}

/// What the caller asked for in `Prefer` (RFC 7240).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Prefer {
    pub respond_async: bool,
    /// `wait=N` in seconds.
    pub wait: Option<u64>,
}

/// Parses every `Prefer` header value: comma-separated preferences,
/// case-insensitive names, optionally quoted values, parameters after `;`
/// ignored.
pub fn parse_prefer<'a>(values: impl Iterator<Item = &'a str>) -> Prefer {
    let mut p = Prefer::default();
    for value in values {
        for pref in value.split(',') {
            let token = pref.split(';').next().unwrap_or("").trim();
            let (name, val) = match token.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                None => (token, None),
            };
            if name.eq_ignore_ascii_case("respond-async") {
                p.respond_async = true;
            } else if name.eq_ignore_ascii_case("wait")
                && let Some(n) = val.and_then(|v| v.parse().ok())
            {
                p.wait = Some(n);
            }
        }
    }
    p
}

/// How a call to a deferrable endpoint is to be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Passthrough,
    /// Deferred; hold the caller up to this long for the result.
    Deferred {
        wait: Duration,
    },
}

/// Deferred when `Prefer: respond-async` is sent or the tenant defers by
/// default; the wait is the caller's `wait=N`, else the tenant's default,
/// clamped to `max_wait`. `batched_everywhere` says whether every
/// configured upstream batches the endpoint: a tenant's default applies
/// only then, so a call the caller never asked to defer is passed through
/// rather than refused when its upstream could not batch it (the body,
/// which names the model and so the upstream, is not read for that). A
/// caller that asks explicitly is answered at intake instead (see
/// [`check_endpoint_batched`]).
pub fn disposition(
    prefer: Prefer,
    tenant: &Tenant,
    max_wait: Duration,
    batched_everywhere: bool,
) -> Disposition {
    let by_default = tenant.default_mode == Mode::Defer && batched_everywhere;
    if !prefer.respond_async && !by_default {
        return Disposition::Passthrough;
    }
    let wait = prefer
        .wait
        .map(Duration::from_secs)
        .unwrap_or(tenant.default_wait)
        .min(max_wait);
    Disposition::Deferred { wait }
}

/// The longest deadline Ferry takes, in seconds: a Batch API job's window
/// (24 hours). A later deadline promises nothing a batch does not already,
/// so it is refused rather than silently treated as none.
pub const MAX_DEADLINE_SECS: u64 = 24 * 60 * 60;

/// The deadline of a deferred call, in seconds after acceptance: the
/// `X-Ferry-Deadline` header (a positive integer of decimal digits, at most
/// [`MAX_DEADLINE_SECS`]), else the tenant's default, else none. A header
/// that is there but not such a number is refused, never ignored.
pub fn deadline_secs(
    header: Option<&str>,
    tenant_default: Option<u64>,
) -> Result<Option<u64>, IntakeError> {
    let Some(v) = header else {
        return Ok(tenant_default);
    };
    let refused = || {
        bad(
            format!(
                "X-Ferry-Deadline must be a whole number of seconds from 1 to {MAX_DEADLINE_SECS}"
            ),
            Some("X-Ferry-Deadline"),
            "invalid_deadline",
        )
    };
    let v = v.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(refused());
    }
    match v.parse::<u64>() {
        Ok(n) if (1..=MAX_DEADLINE_SECS).contains(&n) => Ok(Some(n)),
        _ => Err(refused()),
    }
}

/// The longest model name Ferry takes; real ones are far shorter.
pub const MAX_MODEL_BYTES: usize = 256;

/// A body that passed validation, in the form that goes upstream.
#[derive(Debug)]
pub struct ValidBody {
    pub endpoint: Endpoint,
    pub model: String,
    /// The caller asked to stream; the line itself never streams.
    pub stream: bool,
    /// Compact JSON without `stream`/`stream_options`, one line.
    pub line_body: Vec<u8>,
    pub sha256: String,
    /// Inputs the body counts against a per-batch input cap
    /// ([`Endpoint::inputs`]).
    pub inputs: u64,
}

/// Validates a deferred chat completion body (see [`validate_endpoint_body`]).
pub fn validate_body<'a>(
    raw: &[u8],
    profile_for: &dyn Fn(&str) -> &'a ProviderProfile,
    waits: bool,
) -> Result<ValidBody, IntakeError> {
    validate_endpoint_body(Endpoint::ChatCompletions, raw, profile_for, waits)
}

/// Validates a deferred body for `endpoint` against the contract and the
/// provider's batch rules; errors name the offending field.
/// `profile_for` gives the profile of the upstream the model routes to.
/// A moderation without `model` is queued, and sent, as
/// [`DEFAULT_MODERATION_MODEL`], the model the upstream would pick.
pub fn validate_endpoint_body<'a>(
    endpoint: Endpoint,
    raw: &[u8],
    profile_for: &dyn Fn(&str) -> &'a ProviderProfile,
    waits: bool,
) -> Result<ValidBody, IntakeError> {
    let sha256 = hex(&Sha256::digest(raw));
    let mut v: serde_json::Value = serde_json::from_slice(raw).map_err(|e| {
        bad(
            format!("request body is not valid JSON: {e}"),
            None,
            "invalid_json",
        )
    })?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| bad("request body must be a JSON object", None, "invalid_json"))?;
    let model = match obj.get("model") {
        Some(serde_json::Value::String(m)) if m.len() > MAX_MODEL_BYTES => {
            return Err(bad(
                format!("`model` must be at most {MAX_MODEL_BYTES} bytes"),
                Some("model"),
                "invalid_value",
            ));
        }
        // A model names a queue and a metric label: a control character
        // (NUL above all) could make one queue's key a prefix of another's.
        Some(serde_json::Value::String(m)) if m.chars().any(char::is_control) => {
            return Err(bad(
                "`model` must not contain control characters",
                Some("model"),
                "invalid_value",
            ));
        }
        Some(serde_json::Value::String(m)) if !m.is_empty() => m.clone(),
        None if endpoint.model_optional() => {
            obj.insert("model".into(), DEFAULT_MODERATION_MODEL.into());
            DEFAULT_MODERATION_MODEL.to_owned()
        }
        Some(_) => {
            return Err(bad(
                "`model` must be a non-empty string",
                Some("model"),
                "invalid_type",
            ));
        }
        None => {
            return Err(bad(
                "you must provide a model parameter",
                Some("model"),
                "missing_required_parameter",
            ));
        }
    };
    let profile = profile_for(&model);
    check_required_field(endpoint, obj)?;
    // An endpoint the upstream cannot batch is refused by the caller of
    // this function, naming the upstream; its parameters are moot.
    let forbidden: &[String] = if profile.batches(endpoint) {
        &profile.forbidden_params
    } else {
        &[]
    };
    for p in forbidden {
        if obj.contains_key(p.as_str()) {
            return Err(bad(
                format!(
                    "`{p}` is not accepted by this upstream's Batch API ({}); remove it or call without deferral",
                    profile.kind.as_str()
                ),
                Some(p.as_str()),
                "unsupported_parameter",
            ));
        }
    }
    let stream = match obj.get("stream") {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Bool(b)) => *b,
        Some(_) => {
            return Err(bad(
                "`stream` must be a boolean",
                Some("stream"),
                "invalid_type",
            ));
        }
    };
    if stream && !endpoint.streams() {
        return Err(bad(
            format!("`stream` is not supported on {endpoint}"),
            Some("stream"),
            "unsupported_parameter",
        ));
    }
    if stream && !waits {
        return Err(bad(
            "`stream: true` cannot be deferred without a wait: the Batch API does not stream. \
             Send `Prefer: respond-async, wait=N` to have the finished answer replayed as SSE, or drop `stream`",
            Some("stream"),
            "stream_requires_wait",
        ));
    }
    obj.remove("stream");
    obj.remove("stream_options");
    if endpoint.is_anthropic() && profile.cache_ttl_1h {
        crate::anthropic::cache_ttl_1h(&mut v);
    }
    let inputs = endpoint.inputs(&v);
    let line_body = serde_json::to_vec(&v).map_err(|e| bad(e.to_string(), None, "invalid_json"))?;
    Ok(ValidBody {
        endpoint,
        model,
        stream,
        line_body,
        sha256,
        inputs,
    })
}

/// The field `endpoint` cannot do without: `messages` (a non-empty array
/// of objects), `input` (a non-empty string or array; for moderations and
/// responses also an object list), `prompt` (a string or array).
fn check_required_field(
    endpoint: Endpoint,
    obj: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), IntakeError> {
    use serde_json::Value;
    // Anthropic refuses a whole batch for one request without `max_tokens`:
    // refused here, it cannot cost the other callers' requests.
    let max_tokens = obj.get("max_tokens").and_then(Value::as_u64);
    if endpoint == Endpoint::Messages && max_tokens.is_none_or(|n| n == 0) {
        return Err(bad(
            "`max_tokens` must be an integer of at least 1",
            Some("max_tokens"),
            "missing_required_parameter",
        ));
    }
    let field = endpoint.required_field();
    let Some(value) = obj.get(field) else {
        return Err(bad(
            format!("missing required parameter: `{field}`"),
            Some(field),
            "missing_required_parameter",
        ));
    };
    match (endpoint, value) {
        (Endpoint::ChatCompletions | Endpoint::Messages, Value::Array(a)) if a.is_empty() => Err(
            bad("`messages` must not be empty", Some(field), "invalid_value"),
        ),
        (Endpoint::ChatCompletions | Endpoint::Messages, Value::Array(a))
            if a.iter().any(|m| !m.is_object()) =>
        {
            Err(bad(
                "each of `messages` must be an object",
                Some(field),
                "invalid_type",
            ))
        }
        (Endpoint::ChatCompletions | Endpoint::Messages, Value::Array(_)) => Ok(()),
        (Endpoint::ChatCompletions | Endpoint::Messages, _) => Err(bad(
            "`messages` must be an array",
            Some(field),
            "invalid_type",
        )),
        (_, Value::String(s)) if s.is_empty() && endpoint == Endpoint::Embeddings => Err(bad(
            "`input` must not be empty",
            Some(field),
            "invalid_value",
        )),
        (_, Value::Array(a)) if a.is_empty() && endpoint != Endpoint::Completions => Err(bad(
            format!("`{field}` must not be empty"),
            Some(field),
            "invalid_value",
        )),
        (_, Value::String(_) | Value::Array(_)) => Ok(()),
        _ => Err(bad(
            format!("`{field}` must be a string or an array"),
            Some(field),
            "invalid_type",
        )),
    }
}

/// Refuses a deferred call to an endpoint its upstream does not batch
/// (asked for explicitly: a tenant's default passes such calls through,
/// see [`disposition`]).
pub fn check_endpoint_batched(
    upstream: &UpstreamSettings,
    endpoint: Endpoint,
) -> Result<(), IntakeError> {
    if upstream.profile.batches(endpoint) {
        return Ok(());
    }
    Err(bad(
        format!(
            "{endpoint} cannot be deferred: upstream `{}` ({}) does not take it in batches; \
             call it without `Prefer: respond-async` to have it answered in real time",
            upstream.name,
            upstream.profile.kind.as_str()
        ),
        None,
        "endpoint_not_batchable",
    ))
}

/// Refuses a deferred call for a model its upstream's `models` list does
/// not name, before anything is stored.
pub fn check_model_served(upstream: &UpstreamSettings, model: &str) -> Result<(), IntakeError> {
    if upstream.serves_model(model) {
        return Ok(());
    }
    Err(bad(
        format!(
            "The model `{model}` does not exist or is not served for deferred calls by this gateway"
        ),
        Some("model"),
        "model_not_found",
    ))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `X-Ferry-Custom-Id`: `[A-Za-z0-9_-]{1,64}`.
pub fn valid_custom_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A fresh id for callers that gave none: `req_` and 24 random characters.
pub fn assign_custom_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let tail: String = (0..24)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("req_{tail}")
}

/// Everything needed to store one deferred call.
pub struct NewRequest<'a> {
    pub tenant: &'a str,
    pub custom_id: Option<String>,
    pub upstream: &'a str,
    pub body: ValidBody,
    pub callback_url: Option<String>,
    /// Seconds after acceptance the caller wants a terminal answer by.
    pub deadline_secs: Option<u64>,
}

/// A stored request, and whether this call created it (else it is the
/// earlier ticket of an idempotent retry).
#[derive(Debug)]
pub struct Accepted {
    pub rec: RequestRecord,
    pub created: bool,
}

/// Stores the request and makes it durable. On `Created` the request is on
/// disk; if the flush fails the request is removed again and the caller gets
/// `Unavailable` (503), so Ferry holds nothing it did not promise.
pub async fn accept(store: &Arc<Store>, req: NewRequest<'_>) -> Result<Accepted, IntakeError> {
    let custom_id = req.custom_id.unwrap_or_else(assign_custom_id);
    let created_at = now_secs();
    let rec = RequestRecord {
        id: 0,
        tenant: req.tenant.to_owned(),
        custom_id: custom_id.clone(),
        endpoint: req.body.endpoint,
        inputs: req.body.inputs,
        model: req.body.model.clone(),
        upstream: req.upstream.to_owned(),
        body_sha256: req.body.sha256.clone(),
        body_len: req.body.line_body.len() as u64,
        status: RequestStatus::Queued,
        created_at,
        submitted_at: None,
        completed_at: None,
        batch: None,
        batch_id: None,
        error: None,
        callback_url: req.callback_url,
        stream: req.body.stream,
        attempts: 0,
        webhook: None,
        deadline_at: req.deadline_secs.map(|d| created_at.saturating_add(d)),
        lane: None,
    };
    match store.accept(rec, req.body.line_body).await? {
        Intake::Created(rec) => Ok(Accepted { rec, created: true }),
        Intake::Existing(rec) => Ok(Accepted {
            rec,
            created: false,
        }),
        Intake::Conflict(_) => Err(IntakeError::Conflict(custom_id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::profile::ProviderKind;
    use serde_json::json;

    fn tenant(mode: Mode, wait: u64) -> Tenant {
        Tenant {
            name: "t".into(),
            default_mode: mode,
            default_wait: Duration::from_secs(wait),
            callback_allow: Vec::new(),
            webhook_key: None,
            deferred_rate: None,
            passthrough_rate: None,
            default_deadline: None,
            lanes: Default::default(),
            max_standard_per_hour: None,
        }
    }

    #[test]
    fn a_deadline_is_whole_seconds_within_a_batch_window() {
        assert_eq!(deadline_secs(None, None).unwrap(), None);
        assert_eq!(deadline_secs(None, Some(600)).unwrap(), Some(600));
        // The header wins over the tenant's default.
        assert_eq!(deadline_secs(Some("30"), Some(600)).unwrap(), Some(30));
        assert_eq!(deadline_secs(Some(" 86400 "), None).unwrap(), Some(86_400));
        for v in [
            "0",
            "-5",
            "+5",
            "1.5",
            "1e3",
            "",
            "soon",
            "86401",
            "99999999999999999999999",
        ] {
            let e = deadline_secs(Some(v), Some(600)).unwrap_err();
            assert_eq!(e.status(), 400, "{v:?}");
            let env = serde_json::to_value(e.envelope()).unwrap();
            assert_eq!(env["error"]["param"], "X-Ferry-Deadline", "{v:?}");
            assert_eq!(env["error"]["code"], "invalid_deadline", "{v:?}");
        }
    }

    #[test]
    fn prefer_parsing_follows_rfc7240() {
        assert_eq!(
            parse_prefer(["respond-async, wait=10"].into_iter()),
            Prefer {
                respond_async: true,
                wait: Some(10)
            }
        );
        assert_eq!(
            parse_prefer(["Respond-Async", "wait=\"5\"; x=y"].into_iter()),
            Prefer {
                respond_async: true,
                wait: Some(5)
            }
        );
        assert_eq!(
            parse_prefer(["return=minimal"].into_iter()),
            Prefer::default()
        );
        assert_eq!(
            parse_prefer(["wait=abc, respond-async"].into_iter()).wait,
            None
        );
    }

    #[test]
    fn disposition_uses_header_then_tenant_default_and_clamps() {
        let max = Duration::from_secs(60);
        let p = Prefer {
            respond_async: false,
            wait: None,
        };
        assert_eq!(
            disposition(p, &tenant(Mode::Passthrough, 0), max, true),
            Disposition::Passthrough
        );
        assert_eq!(
            disposition(p, &tenant(Mode::Defer, 30), max, true),
            Disposition::Deferred {
                wait: Duration::from_secs(30)
            }
        );
        let p = Prefer {
            respond_async: true,
            wait: Some(600),
        };
        assert_eq!(
            disposition(p, &tenant(Mode::Passthrough, 0), max, true),
            Disposition::Deferred { wait: max }
        );
    }

    #[test]
    fn a_default_defers_only_endpoints_every_upstream_batches() {
        let max = Duration::from_secs(60);
        let by_default = Prefer::default();
        assert_eq!(
            disposition(by_default, &tenant(Mode::Defer, 30), max, false),
            Disposition::Passthrough
        );
        // Asked for explicitly, it is deferred (and refused at intake if the
        // model's upstream cannot batch it).
        let asked = Prefer {
            respond_async: true,
            wait: None,
        };
        assert_eq!(
            disposition(asked, &tenant(Mode::Defer, 30), max, false),
            Disposition::Deferred {
                wait: Duration::from_secs(30)
            }
        );
    }

    #[test]
    fn each_endpoint_requires_its_own_field() {
        let openai = ProviderProfile::for_kind(ProviderKind::Openai);
        let check = |endpoint: Endpoint, body: serde_json::Value, waits: bool| {
            validate_endpoint_body(endpoint, body.to_string().as_bytes(), &|_| &openai, waits)
        };
        let refused: &[(Endpoint, serde_json::Value, &str, &str)] = &[
            (
                Endpoint::Embeddings,
                json!({"model": "e"}),
                "input",
                "missing_required_parameter",
            ),
            (
                Endpoint::Embeddings,
                json!({"model": "e", "input": ""}),
                "input",
                "invalid_value",
            ),
            (
                Endpoint::Embeddings,
                json!({"model": "e", "input": []}),
                "input",
                "invalid_value",
            ),
            (
                Endpoint::Embeddings,
                json!({"model": "e", "input": 5}),
                "input",
                "invalid_type",
            ),
            (
                Endpoint::Embeddings,
                json!({"input": "x"}),
                "model",
                "missing_required_parameter",
            ),
            (
                Endpoint::Embeddings,
                json!({"model": "e", "input": "x", "stream": true}),
                "stream",
                "unsupported_parameter",
            ),
            (
                Endpoint::Completions,
                json!({"model": "c"}),
                "prompt",
                "missing_required_parameter",
            ),
            (
                Endpoint::Completions,
                json!({"model": "c", "prompt": {}}),
                "prompt",
                "invalid_type",
            ),
            (
                Endpoint::Responses,
                json!({"model": "r"}),
                "input",
                "missing_required_parameter",
            ),
            (
                Endpoint::Responses,
                json!({"model": "r", "messages": []}),
                "input",
                "missing_required_parameter",
            ),
            (
                Endpoint::Moderations,
                json!({"model": "o"}),
                "input",
                "missing_required_parameter",
            ),
            (
                Endpoint::Responses,
                json!({"model": "r", "input": "x", "stream": true}),
                "stream",
                "stream_requires_wait",
            ),
        ];
        for (endpoint, body, param, code) in refused {
            let e = check(*endpoint, body.clone(), false).unwrap_err();
            let env = e.envelope();
            assert_eq!(e.status(), 400, "{endpoint} {body}");
            assert_eq!(
                env.error.param.as_deref(),
                Some(*param),
                "{endpoint} {body}"
            );
            assert_eq!(env.error.code.as_deref(), Some(*code), "{endpoint} {body}");
        }
        let v = check(
            Endpoint::Embeddings,
            json!({"model": "e", "input": ["a", "b"]}),
            false,
        )
        .unwrap();
        assert_eq!(
            (v.endpoint, v.model.as_str(), v.inputs),
            (Endpoint::Embeddings, "e", 2)
        );
        let v = check(
            Endpoint::Completions,
            json!({"model": "c", "prompt": "p"}),
            false,
        )
        .unwrap();
        assert_eq!(v.inputs, 1);
        let v = check(
            Endpoint::Responses,
            json!({"model": "r", "input": "x", "stream": true}),
            true,
        )
        .unwrap();
        assert!(v.stream);
        // A model-less moderation goes to (and names) the default model.
        let v = check(Endpoint::Moderations, json!({"input": "x"}), false).unwrap();
        assert_eq!(v.model, DEFAULT_MODERATION_MODEL);
        let line: serde_json::Value = serde_json::from_slice(&v.line_body).unwrap();
        assert_eq!(line["model"], DEFAULT_MODERATION_MODEL);
    }

    #[test]
    fn claude_bodies_need_max_tokens_and_may_get_the_hour_cache_ttl() {
        let mut anthropic = ProviderProfile::for_kind(ProviderKind::Anthropic);
        let body = json!({"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}]}]});
        let line = |profile: &ProviderProfile, body: &serde_json::Value| {
            let v = validate_endpoint_body(
                Endpoint::Messages,
                body.to_string().as_bytes(),
                &|_| profile,
                false,
            )
            .unwrap();
            serde_json::from_slice::<serde_json::Value>(&v.line_body).unwrap()
        };
        let ttl =
            |l: serde_json::Value| l["messages"][0]["content"][0]["cache_control"]["ttl"].clone();
        assert_eq!(
            ttl(line(&anthropic, &body)),
            serde_json::Value::Null,
            "off by default"
        );
        anthropic.cache_ttl_1h = true;
        assert_eq!(ttl(line(&anthropic, &body)), "1h");
        let mut no_max = body.clone();
        no_max.as_object_mut().unwrap().remove("max_tokens");
        let err = validate_endpoint_body(
            Endpoint::Messages,
            no_max.to_string().as_bytes(),
            &|_| &anthropic,
            false,
        )
        .unwrap_err();
        assert!(
            matches!(&err, IntakeError::BadRequest { param: Some(p), .. } if p == "max_tokens"),
            "{err}"
        );
    }

    #[test]
    fn validation_names_the_field() {
        let openai = ProviderProfile::for_kind(ProviderKind::Openai);
        let moonshot = ProviderProfile::for_kind(ProviderKind::Moonshot);
        let cases: &[(&str, Option<&str>, &str)] = &[
            ("not json", None, "invalid_json"),
            ("[1]", None, "invalid_json"),
            (
                r#"{"messages":[{"role":"user","content":"x"}]}"#,
                Some("model"),
                "missing_required_parameter",
            ),
            (
                r#"{"model":5,"messages":[]}"#,
                Some("model"),
                "invalid_type",
            ),
            (
                r#"{"model":"m"}"#,
                Some("messages"),
                "missing_required_parameter",
            ),
            (
                r#"{"model":"m","messages":[]}"#,
                Some("messages"),
                "invalid_value",
            ),
            (
                r#"{"model":"m","messages":"hi"}"#,
                Some("messages"),
                "invalid_type",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true}"#,
                Some("stream"),
                "stream_requires_wait",
            ),
        ];
        for (body, param, code) in cases {
            let e = validate_body(body.as_bytes(), &|_| &openai, false).unwrap_err();
            let env = e.envelope();
            assert_eq!(e.status(), 400, "{body}");
            assert_eq!(env.error.param.as_deref(), *param, "{body}");
            assert_eq!(env.error.code.as_deref(), Some(*code), "{body}");
        }
        let t =
            r#"{"model":"kimi-k2.6","messages":[{"role":"user","content":"x"}],"temperature":0.2}"#;
        assert!(validate_body(t.as_bytes(), &|_| &openai, false).is_ok());
        let e = validate_body(t.as_bytes(), &|_| &moonshot, false).unwrap_err();
        assert!(e.to_string().contains("temperature"));
    }

    #[test]
    fn model_names_with_control_characters_or_too_long_are_refused() {
        let openai = ProviderProfile::for_kind(ProviderKind::Openai);
        let body = |model: &str| {
            serde_json::json!({"model": model, "messages": [{"role": "user", "content": "x"}]})
                .to_string()
        };
        let long = "m".repeat(MAX_MODEL_BYTES + 1);
        for model in [
            "gpt-4o-mini\u{0}x",
            "gpt-4o\nmini",
            "a\u{7f}",
            long.as_str(),
        ] {
            let e = validate_body(body(model).as_bytes(), &|_| &openai, false).unwrap_err();
            assert_eq!(e.status(), 400, "{model:?}");
            let env = e.envelope();
            assert_eq!(env.error.param.as_deref(), Some("model"), "{model:?}");
            assert_eq!(
                env.error.code.as_deref(),
                Some("invalid_value"),
                "{model:?}"
            );
        }
        let longest = "m".repeat(MAX_MODEL_BYTES);
        for model in [
            "gpt-4o-mini",
            "ft:gpt-4o:org:x:1",
            "моделька",
            longest.as_str(),
        ] {
            assert!(validate_body(body(model).as_bytes(), &|_| &openai, false).is_ok());
        }
    }

    #[test]
    fn unavailable_kinds_each_name_their_cause() {
        for (e, code) in [
            (IntakeError::from(StoreError::Busy), "custom_id_in_progress"),
            (
                IntakeError::from(StoreError::Flush("disk".into())),
                "storage_unavailable",
            ),
            (IntakeError::ShuttingDown, "shutting_down"),
            (IntakeError::QueueFull(3), "queue_full"),
        ] {
            assert_eq!(e.status(), 503, "{e}");
            assert_eq!(e.envelope().error.code.as_deref(), Some(code), "{e}");
        }
    }

    #[test]
    fn streaming_with_wait_is_stored_without_stream() {
        let openai = ProviderProfile::for_kind(ProviderKind::Openai);
        let body = "{\n \"model\": \"m\",\n \"messages\": [{\"role\":\"user\",\"content\":\"x\"}],\n \"stream\": true,\n \"stream_options\": {\"include_usage\": true}\n}";
        let v = validate_body(body.as_bytes(), &|_| &openai, true).unwrap();
        assert!(v.stream);
        assert_eq!(v.model, "m");
        let line = String::from_utf8(v.line_body).unwrap();
        assert!(!line.contains('\n'));
        assert!(!line.contains("stream"));
        assert_eq!(v.sha256.len(), 64);
    }

    #[test]
    fn custom_ids() {
        assert!(valid_custom_id("invoice-7731"));
        assert!(valid_custom_id(&"a".repeat(64)));
        assert!(!valid_custom_id(&"a".repeat(65)));
        assert!(!valid_custom_id(""));
        assert!(!valid_custom_id("a b"));
        assert!(!valid_custom_id("ü"));
        let id = assign_custom_id();
        assert!(valid_custom_id(&id) && id.starts_with("req_") && id.len() == 28);
    }
}
