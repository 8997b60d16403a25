//! Anthropic's Messages API shapes, shared by the emulator's Anthropic
//! profile and Ferry's Anthropic routes: the error envelope every failed call
//! answers with, and the event stream of a finished `message`.
//!
//! `{"type": "error", "error": {"type": "invalid_request_error", "message": "..."}}`

pub mod stream;

use serde_json::{Value, json};

use crate::api_error::ErrorEnvelope;

/// The `anthropic-version` the official SDKs send, and the one Ferry sends
/// upstream unless configured otherwise.
pub const DEFAULT_VERSION: &str = "2023-06-01";

/// The error `type` Anthropic pairs with an HTTP status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    }
}

/// The error body for `status`.
pub fn error_body(status: u16, message: impl Into<String>) -> Value {
    json!({
        "type": "error",
        "error": {"type": error_type(status), "message": message.into()},
    })
}

/// The same error in Anthropic's shape: the status picks the `type`, the
/// message is kept.
pub fn from_openai(status: u16, envelope: &ErrorEnvelope) -> Value {
    error_body(status, envelope.error.message.clone())
}

/// Gives every `cache_control` breakpoint of a Messages body (in `system`,
/// `tools`, message content blocks, anywhere) the 1-hour TTL: a request in
/// a batch may run hours after its neighbours wrote the cache, long after
/// the default 5 minutes. A TTL already set to something else than `5m` is
/// kept. Returns how many breakpoints were changed.
pub fn cache_ttl_1h(body: &mut Value) -> usize {
    match body {
        Value::Object(map) => {
            let mut changed = 0;
            if let Some(Value::Object(cc)) = map.get_mut("cache_control") {
                let short = match cc.get("ttl") {
                    None | Some(Value::Null) => true,
                    Some(Value::String(t)) => t == "5m",
                    Some(_) => false,
                };
                if short {
                    cc.insert("ttl".into(), json!("1h"));
                    changed += 1;
                }
            }
            for (key, v) in map.iter_mut() {
                if key != "cache_control" {
                    changed += cache_ttl_1h(v);
                }
            }
            changed
        }
        Value::Array(items) => items.iter_mut().map(cache_ttl_1h).sum(),
        _ => 0,
    }
}

/// Whether `custom_id` is one Anthropic accepts: `^[a-zA-Z0-9_-]{1,64}$`.
pub fn valid_custom_id(custom_id: &str) -> bool {
    (1..=64).contains(&custom_id.len())
        && custom_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_anthropic_types() {
        assert_eq!(error_type(400), "invalid_request_error");
        assert_eq!(error_type(401), "authentication_error");
        assert_eq!(error_type(404), "not_found_error");
        assert_eq!(error_type(413), "request_too_large");
        assert_eq!(error_type(429), "rate_limit_error");
        assert_eq!(error_type(503), "api_error");
        assert_eq!(error_type(529), "overloaded_error");
        let body = error_body(409, "no");
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["message"], "no");
    }

    #[test]
    fn cache_breakpoints_get_the_hour_ttl() {
        let mut body = json!({
            "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "a", "cache_control": {"type": "ephemeral", "ttl": "5m"}},
                {"type": "text", "text": "b", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
                {"type": "text", "text": "c"},
            ]}],
        });
        assert_eq!(cache_ttl_1h(&mut body), 2);
        assert_eq!(body["system"][0]["cache_control"]["ttl"], "1h");
        assert_eq!(
            body["messages"][0]["content"][0]["cache_control"]["ttl"],
            "1h"
        );
        assert_eq!(body["messages"][0]["content"][2].get("cache_control"), None);
        assert_eq!(cache_ttl_1h(&mut body), 0, "a second pass changes nothing");
    }

    #[test]
    fn custom_ids_follow_the_regex() {
        assert!(valid_custom_id("a-B_9"));
        assert!(valid_custom_id(&"x".repeat(64)));
        assert!(!valid_custom_id(&"x".repeat(65)));
        assert!(!valid_custom_id(""));
        assert!(!valid_custom_id("a.b"));
        assert!(!valid_custom_id("é"));
    }
}
