//! Message Batches on top of the emulator's one batch machinery: a create's
//! inline requests become the JSONL input of an ordinary batch (endpoint
//! `/v1/messages`, id `msgbatch_...`), so the timeline, the clock and fault
//! knobs, cancel and the journal are the OpenAI side's, unchanged. This file
//! holds the pure translations both ways: the create body into that input,
//! the batch's state into a `message_batch`, its output and error lines into
//! result lines.

use std::collections::HashSet;

use serde_json::{Value, json};

use super::message::{self, Refusal};
use crate::anthropic::valid_custom_id;
use crate::emulator::timeline::Status;

/// Prefix of a Message Batch id; the emulator's OpenAI routes do not show
/// batches with it, and the Anthropic routes show only those.
pub const ID_PREFIX: &str = "msgbatch_";
/// The endpoint the internal batch runs its lines against.
pub const ENDPOINT: &str = "/v1/messages";
/// Anthropic's limits on one batch.
pub const MAX_REQUESTS: u64 = 100_000;
pub const MAX_BYTES: u64 = 256 * 1024 * 1024;

/// The requests of a create, as the JSONL input of the internal batch.
#[derive(Debug)]
pub struct Input {
    pub jsonl: Vec<u8>,
    pub requests: usize,
}

/// Checks a create body the way the API does at once (400 for the whole
/// batch on the first bad request) and writes its input file.
pub fn parse_create(
    body: &Value,
    max_requests: u64,
    knows: &dyn Fn(&str) -> bool,
) -> Result<Input, Refusal> {
    let requests = match body.get("requests") {
        Some(Value::Array(r)) if !r.is_empty() => r,
        Some(Value::Array(_)) => {
            return Err((400, "requests: List should have at least 1 item".to_owned()));
        }
        _ => return Err((400, "requests: Field required".to_owned())),
    };
    if requests.len() as u64 > max_requests {
        return Err((
            400,
            format!(
                "requests: a batch holds at most {max_requests} requests, got {}",
                requests.len()
            ),
        ));
    }
    let mut seen = HashSet::with_capacity(requests.len());
    let mut jsonl = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        let custom_id = request
            .get("custom_id")
            .and_then(Value::as_str)
            .ok_or_else(|| (400, format!("requests.{i}.custom_id: Field required")))?;
        if !valid_custom_id(custom_id) {
            return Err((
                400,
                format!(
                    "requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
                ),
            ));
        }
        if !seen.insert(custom_id) {
            return Err((
                400,
                format!(
                    "Duplicate custom_id '{custom_id}': custom_id must be unique within a batch."
                ),
            ));
        }
        let Some(Value::Object(params)) = request.get("params") else {
            return Err((400, format!("requests.{i}.params: Field required")));
        };
        if params.get("stream") == Some(&Value::Bool(true)) {
            return Err((
                400,
                format!("requests.{i}.params.stream: streaming is not supported in batches"),
            ));
        }
        message::check(params, knows)
            .map_err(|(status, m)| (status, format!("requests.{i}.params.{m}")))?;
        let line =
            json!({"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": params});
        jsonl.extend_from_slice(line.to_string().as_bytes());
        jsonl.push(b'\n');
    }
    Ok(Input {
        jsonl,
        requests: requests.len(),
    })
}

/// What the Anthropic routes need of a batch, read under its lock.
#[derive(Clone, Debug, PartialEq)]
pub struct View {
    pub id: String,
    pub status: Status,
    pub created: f64,
    pub deadline: f64,
    pub cancel_at: Option<f64>,
    /// When it reached its terminal status.
    pub ended_at: Option<f64>,
    pub requests: u64,
    pub succeeded: u64,
    pub errored: u64,
}

/// `processing_status` of a batch status.
pub fn processing_status(status: Status) -> &'static str {
    match status {
        Status::Cancelling => "canceling",
        s if s.is_terminal() => "ended",
        _ => "in_progress",
    }
}

/// The `message_batch` object; `base` is the scheme and authority the caller
/// reached the emulator at, for `results_url`.
pub fn render(v: &View, base: &str) -> Value {
    let ended = v.status.is_terminal();
    let unfinished = v.requests.saturating_sub(v.succeeded + v.errored);
    let (processing, canceled, expired) = match v.status {
        Status::Cancelled => (0, unfinished, 0),
        Status::Expired => (0, 0, unfinished),
        _ if ended => (0, 0, 0),
        _ => (unfinished, 0, 0),
    };
    json!({
        "id": v.id,
        "type": "message_batch",
        "processing_status": processing_status(v.status),
        "request_counts": {
            "processing": processing,
            "succeeded": v.succeeded,
            "errored": v.errored,
            "canceled": canceled,
            "expired": expired,
        },
        "created_at": rfc3339(v.created),
        "expires_at": rfc3339(v.deadline),
        "ended_at": v.ended_at.map(rfc3339),
        "cancel_initiated_at": v.cancel_at.map(rfc3339),
        "archived_at": null,
        "results_url": ended.then(|| format!("{base}/v1/messages/batches/{}/results", v.id)),
    })
}

/// A list page, newest first.
pub fn list_json(data: Vec<Value>, has_more: bool) -> Value {
    let id = |v: Option<&Value>| v.and_then(|v| v.get("id")).cloned().unwrap_or(Value::Null);
    json!({
        "first_id": id(data.first()),
        "last_id": id(data.last()),
        "has_more": has_more,
        "data": data,
    })
}

/// One line of the internal batch's output or error file as a result line:
/// a `200` answer `succeeded`, another status `errored` with the answer's
/// error body, `batch_cancelled` / `batch_expired` `canceled` / `expired`.
pub fn result_line(line: &Value) -> Value {
    let custom_id = line.get("custom_id").cloned().unwrap_or(Value::Null);
    let result = match (line.get("response"), line.get("error")) {
        (Some(r), _) if r.is_object() => {
            let body = r.get("body").cloned().unwrap_or(Value::Null);
            if r.get("status_code").and_then(Value::as_u64) == Some(200) {
                json!({"type": "succeeded", "message": body})
            } else {
                json!({"type": "errored", "error": body})
            }
        }
        (_, Some(e)) if e.get("code").and_then(Value::as_str) == Some("batch_cancelled") => {
            json!({"type": "canceled"})
        }
        (_, Some(e)) if e.get("code").and_then(Value::as_str) == Some("batch_expired") => {
            json!({"type": "expired"})
        }
        _ => {
            json!({"type": "errored", "error": crate::anthropic::error_body(500, "The request failed.")})
        }
    };
    json!({"custom_id": custom_id, "result": result})
}

/// `secs` (unix, fractional) as RFC 3339 in UTC with whole seconds, e.g.
/// `2026-11-30T01:03:37Z`.
pub fn rfc3339(secs: f64) -> String {
    let secs = secs.floor() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn knows(m: &str) -> bool {
        m == "claude-haiku-4-5"
    }

    fn request(id: &str) -> Value {
        json!({"custom_id": id, "params": {"model": "claude-haiku-4-5", "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}]}})
    }

    #[test]
    fn a_good_create_becomes_jsonl() {
        let input = parse_create(
            &json!({"requests": [request("a"), request("b")]}),
            10,
            &knows,
        )
        .unwrap();
        assert_eq!(input.requests, 2);
        let text = String::from_utf8(input.jsonl).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[1]["custom_id"], "b");
        assert_eq!(lines[1]["url"], ENDPOINT);
        assert_eq!(lines[0]["body"]["max_tokens"], 8);
    }

    #[test]
    fn bad_creates_are_refused_whole() {
        let refused = |body: Value| parse_create(&body, 2, &knows).unwrap_err().0;
        assert_eq!(refused(json!({})), 400);
        assert_eq!(refused(json!({"requests": []})), 400);
        assert_eq!(
            refused(json!({"requests": [request("a"), request("a")]})),
            400
        );
        assert_eq!(refused(json!({"requests": [request("a.b")]})), 400);
        assert_eq!(
            refused(json!({"requests": [request("a"), request("b"), request("c")]})),
            400
        );
        let mut streamed = request("a");
        streamed["params"]["stream"] = json!(true);
        assert_eq!(refused(json!({"requests": [streamed]})), 400);
        let mut no_max = request("a");
        no_max["params"]
            .as_object_mut()
            .unwrap()
            .remove("max_tokens");
        assert_eq!(refused(json!({"requests": [no_max]})), 400);
        let mut unknown = request("a");
        unknown["params"]["model"] = json!("claude-nope");
        assert_eq!(refused(json!({"requests": [unknown]})), 404);
    }

    #[test]
    fn renders_counts_per_status() {
        let mut v = View {
            id: "msgbatch_1".into(),
            status: Status::InProgress,
            created: 0.0,
            deadline: 86_400.0,
            cancel_at: None,
            ended_at: None,
            requests: 5,
            succeeded: 1,
            errored: 1,
        };
        let b = render(&v, "http://h");
        assert_eq!(b["processing_status"], "in_progress");
        assert_eq!(b["request_counts"]["processing"], 3);
        assert_eq!(b["results_url"], Value::Null);
        assert_eq!(b["created_at"], "1970-01-01T00:00:00Z");
        assert_eq!(b["expires_at"], "1970-01-02T00:00:00Z");
        v.status = Status::Cancelled;
        v.ended_at = Some(10.0);
        let b = render(&v, "http://h");
        assert_eq!(b["processing_status"], "ended");
        assert_eq!(b["request_counts"]["canceled"], 3);
        assert_eq!(
            b["results_url"],
            "http://h/v1/messages/batches/msgbatch_1/results"
        );
        v.status = Status::Cancelling;
        assert_eq!(render(&v, "http://h")["processing_status"], "canceling");
    }

    #[test]
    fn result_lines_per_outcome() {
        let ok = json!({"custom_id": "a", "response": {"status_code": 200, "body": {"type": "message"}}, "error": null});
        assert_eq!(result_line(&ok)["result"]["type"], "succeeded");
        assert_eq!(result_line(&ok)["result"]["message"]["type"], "message");
        let failed = json!({"custom_id": "b", "response": {"status_code": 429, "body": {"type": "error"}}, "error": null});
        assert_eq!(result_line(&failed)["result"]["type"], "errored");
        let cut = |code: &str| json!({"custom_id": "c", "response": null, "error": {"code": code, "message": ""}});
        assert_eq!(
            result_line(&cut("batch_cancelled"))["result"]["type"],
            "canceled"
        );
        assert_eq!(
            result_line(&cut("batch_expired"))["result"]["type"],
            "expired"
        );
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(1_764_464_617.9), "2025-11-30T01:03:37Z");
        assert_eq!(rfc3339(951_782_400.0), "2000-02-29T00:00:00Z");
    }
}
