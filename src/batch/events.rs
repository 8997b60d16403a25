//! OpenAI's batch events (issue #17): `batch.completed`, `batch.failed`,
//! `batch.expired` and `batch.cancelled`, pushed to a route of Ferry's own
//! and signed with Standard Webhooks, make the batch's driver poll it at
//! once, so the poll interval can be long without delaying results.
//! Nothing depends on an event arriving: polling stays the safety net.
//! Pure decisions; the proxy reads the request and answers.

use crate::delivery::webhooks::sign;

/// The event types that end a batch upstream.
pub const BATCH_EVENTS: [&str; 4] = [
    "batch.completed",
    "batch.failed",
    "batch.expired",
    "batch.cancelled",
];

/// How far an event's `webhook-timestamp` may be from now (seconds), as
/// Standard Webhooks recommends, so a captured event cannot be replayed
/// later.
pub const TOLERANCE_SECS: u64 = 300;

/// Why an event is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A header or the body is missing or unreadable: `400`.
    Malformed(&'static str),
    /// No signature matches, or the timestamp is too far from now: `401`.
    Unauthorized(&'static str),
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Refusal::Malformed(_) => 400,
            Refusal::Unauthorized(_) => 401,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refusal::Malformed(m) | Refusal::Unauthorized(m) => m,
        }
    }
}

/// Checks a Standard Webhooks signature: `signatures` is the
/// `webhook-signature` header (space-separated `v1,<base64>` entries), one
/// of which must be Ferry's own signature of `id`, `timestamp` and `body`
/// with `key` ([`sign`], the code that signs Ferry's webhooks), compared in
/// constant time; `timestamp` must be within [`TOLERANCE_SECS`] of `now`.
pub fn verify(
    key: &[u8],
    id: Option<&str>,
    timestamp: Option<&str>,
    signatures: Option<&str>,
    body: &[u8],
    now: u64,
) -> Result<(), Refusal> {
    let (Some(id), Some(timestamp), Some(signatures)) = (id, timestamp, signatures) else {
        return Err(Refusal::Malformed(
            "webhook-id, webhook-timestamp and webhook-signature are required",
        ));
    };
    let ts: u64 = timestamp
        .parse()
        .map_err(|_| Refusal::Malformed("webhook-timestamp must be unix seconds"))?;
    let body =
        std::str::from_utf8(body).map_err(|_| Refusal::Malformed("the body must be UTF-8"))?;
    if ts.abs_diff(now) > TOLERANCE_SECS {
        return Err(Refusal::Unauthorized(
            "webhook-timestamp is too far from now",
        ));
    }
    let expected = sign(key, id, ts, body);
    if signatures
        .split(' ')
        .any(|s| constant_time_eq(s.as_bytes(), expected.as_bytes()))
    {
        Ok(())
    } else {
        Err(Refusal::Unauthorized("no valid signature"))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The upstream batch a verified event says has ended (its `data.id`), or
/// `None` for any other event type (acknowledged and ignored).
pub fn ended_batch(body: &[u8]) -> Result<Option<String>, Refusal> {
    #[derive(serde::Deserialize)]
    struct Event {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        data: serde_json::Value,
    }
    let event: Event =
        serde_json::from_slice(body).map_err(|_| Refusal::Malformed("the body is not an event"))?;
    if !BATCH_EVENTS.contains(&event.kind.as_str()) {
        return Ok(None);
    }
    match event.data.get("id").and_then(|v| v.as_str()) {
        Some(id) if !id.is_empty() => Ok(Some(id.to_owned())),
        _ => Err(Refusal::Malformed(
            "a batch event must name its batch in data.id",
        )),
    }
}

/// A driver polling an upstream batch, woken when an event says it ended:
/// registered under the upstream batch id for as long as it lives.
pub struct Poked<'a> {
    up: &'a crate::Upstream,
    batch_id: String,
    pub notify: std::sync::Arc<tokio::sync::Notify>,
}

impl<'a> Poked<'a> {
    pub fn register(up: &'a crate::Upstream, batch_id: &str) -> Poked<'a> {
        let notify = up.polling.entry(batch_id.to_owned()).or_default().clone();
        Poked {
            up,
            batch_id: batch_id.to_owned(),
            notify,
        }
    }
}

impl Drop for Poked<'_> {
    fn drop(&mut self) {
        self.up.polling.remove(&self.batch_id);
    }
}

/// Wakes the driver polling `batch_id` of `up` on this node, if any (a
/// wake with no driver waiting is kept for its next wait). Returns whether
/// one was registered.
pub fn poke(up: &crate::Upstream, batch_id: &str) -> bool {
    match up.polling.get(batch_id) {
        Some(n) => {
            n.notify_one();
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef";
    const BODY: &str = r#"{"id":"evt_1","type":"batch.completed","data":{"id":"batch_9"}}"#;
    const NOW: u64 = 1_700_000_000;

    fn check(ts: u64, sigs: &str) -> Result<(), Refusal> {
        let ts = ts.to_string();
        verify(
            KEY,
            Some("msg_1"),
            Some(&ts),
            Some(sigs),
            BODY.as_bytes(),
            NOW,
        )
    }

    #[test]
    fn a_signed_event_passes_and_anything_else_is_refused() {
        let good = sign(KEY, "msg_1", NOW, BODY);
        assert_eq!(check(NOW, &good), Ok(()));
        // One of several (a secret being rotated) is enough.
        assert_eq!(check(NOW, &format!("v1,bm90IGl0 {good}")), Ok(()));
        assert_eq!(check(NOW + 10, &good).map_err(Refusal::status), Err(401));
        let late = sign(KEY, "msg_1", NOW - TOLERANCE_SECS - 1, BODY);
        assert_eq!(
            check(NOW - TOLERANCE_SECS - 1, &late).map_err(Refusal::status),
            Err(401),
            "too old to be fresh"
        );
        let other = sign(b"another key", "msg_1", NOW, BODY);
        assert_eq!(check(NOW, &other).map_err(Refusal::status), Err(401));
        let missing = verify(KEY, Some("msg_1"), None, Some(&good), BODY.as_bytes(), NOW);
        assert_eq!(missing.map_err(Refusal::status), Err(400));
        let bad_ts = verify(KEY, Some("msg_1"), Some("soon"), Some(&good), b"{}", NOW);
        assert_eq!(bad_ts.map_err(Refusal::status), Err(400));
    }

    #[test]
    fn only_the_batch_end_events_name_a_batch_to_poll() {
        assert_eq!(ended_batch(BODY.as_bytes()), Ok(Some("batch_9".into())));
        for kind in BATCH_EVENTS {
            let body = format!(r#"{{"type":"{kind}","data":{{"id":"b"}}}}"#);
            assert_eq!(ended_batch(body.as_bytes()), Ok(Some("b".into())));
        }
        let other = br#"{"type":"response.completed","data":{"id":"resp_1"}}"#;
        assert_eq!(ended_batch(other), Ok(None));
        assert!(ended_batch(br#"{"type":"batch.failed","data":{}}"#).is_err());
        assert!(ended_batch(b"not json").is_err());
    }
}
