//! A caller's own Message Batches through Ferry: the upstream names each
//! ended batch's `results_url` at its own address, where the caller's Ferry
//! key is refused (and where a caller behind Ferry may not even reach). The
//! passthrough answer of a batch route has that URL rewritten to the same
//! path on Ferry, as the caller addressed Ferry (its `Host`, or the first
//! `X-Forwarded-Host` when a proxy in front of Ferry rewrote `Host`, and
//! the first `X-Forwarded-Proto` when that proxy ends TLS), so the SDK's
//! `batches.results(id)` comes back through Ferry, which passes it on with
//! its own key. Everything else in the answer is left byte for byte.
//!
//! The forwarded headers are taken from any caller, as `Host` is: they
//! only shape the answer to the very call that carries them, so a caller
//! that sets them points its own SDK somewhere, which it could do with
//! `Host` alone; nothing is stored or shown to anyone else.

use serde_json::Value;

/// The headers of a call that say where its caller reached Ferry.
#[derive(Debug, Clone, Copy, Default)]
pub struct Seen<'a> {
    /// `Host` (or the request target's authority).
    pub host: Option<&'a str>,
    /// `X-Forwarded-Host`: the `Host` the caller sent to a proxy in front
    /// of Ferry that rewrote it; one value per proxy, the caller's first.
    pub forwarded_host: Option<&'a str>,
    /// `X-Forwarded-Proto`: `https` when such a proxy ends TLS.
    pub forwarded_proto: Option<&'a str>,
}

impl Seen<'_> {
    /// `scheme://host[:port]` of Ferry as the caller addressed it: the
    /// first forwarded host when it is a usable one, else `Host`; `None`
    /// when neither is.
    pub fn origin(&self) -> Option<String> {
        let usable = |h: &&str| !h.is_empty() && !h.contains(['/', ' ', '"', '\\', '@', '?', '#']);
        let host = self
            .forwarded_host
            .map(first_value)
            .filter(usable)
            .or_else(|| self.host.filter(usable))?;
        let scheme = match self.forwarded_proto.map(first_value) {
            Some(p) if p.eq_ignore_ascii_case("https") => "https",
            _ => "http",
        };
        Some(format!("{scheme}://{host}"))
    }
}

/// The first of a header's comma-separated values, trimmed: proxies each
/// append theirs, so the first is what the caller sent.
fn first_value(v: &str) -> &str {
    v.split(',').next().unwrap_or_default().trim()
}

/// The rewrite one passthrough call needs: the path prefix the upstream's
/// URLs carry, and Ferry's origin as the caller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    /// The upstream's base path (`/v1` for Anthropic, whose base URL names
    /// the host only); a `results_url` outside it is not the upstream's
    /// route and is left alone.
    pub upstream_base_path: String,
    /// `scheme://host[:port]` of Ferry.
    pub ferry_origin: String,
}

impl Rewrite {
    /// The rewrite for a passthrough call to `path`, if its answer is a
    /// `message_batch` or a list of them (create, retrieve, list, cancel);
    /// never for the results themselves, which are streamed as they come.
    pub fn for_call(path: &str, seen: &Seen<'_>, upstream_base_path: &str) -> Option<Rewrite> {
        let rest = path.strip_prefix("/v1/messages/batches")?;
        let carries = match rest.strip_prefix('/') {
            None => rest.is_empty(),
            Some(id) => match id.split_once('/') {
                None => !id.is_empty(),
                Some((id, "cancel")) => !id.is_empty(),
                Some(_) => false,
            },
        };
        let ferry_origin = seen.origin()?;
        carries.then(|| Rewrite {
            upstream_base_path: upstream_base_path.to_owned(),
            ferry_origin,
        })
    }

    /// Ferry's URL for an upstream `results_url`, or `None` when its path
    /// is not under the upstream's base path.
    fn url(&self, upstream: &str) -> Option<String> {
        let after_scheme = upstream.split_once("://")?.1;
        let path = &after_scheme[after_scheme.find('/')?..];
        let rest = path.strip_prefix(self.upstream_base_path.as_str())?;
        rest.starts_with('/')
            .then(|| format!("{}/v1{rest}", self.ferry_origin))
    }

    /// `body` with every `results_url` (of a batch, or of each batch of a
    /// list's `data`) pointing at Ferry; `None` when nothing changes (not
    /// JSON, no such URL).
    pub fn apply(&self, body: &[u8]) -> Option<Vec<u8>> {
        let v: Value = serde_json::from_slice(body).ok()?;
        let batches: Vec<&Value> = match v.get("data").and_then(Value::as_array) {
            Some(list) => list.iter().collect(),
            None => vec![&v],
        };
        let mut text = String::from_utf8(body.to_vec()).ok()?;
        let mut changed = false;
        for b in batches {
            let Some(old) = b.get("results_url").and_then(Value::as_str) else {
                continue;
            };
            let Some(new) = self.url(old) else {
                continue;
            };
            // The URL as it stands in the body, quotes and escapes included:
            // the same JSON string, written back in its place.
            let (Ok(old), Ok(new)) = (serde_json::to_string(old), serde_json::to_string(&new))
            else {
                continue;
            };
            if text.contains(&old) {
                text = text.replace(&old, &new);
                changed = true;
            }
        }
        changed.then(|| text.into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(h: &str) -> Seen<'_> {
        Seen {
            host: Some(h),
            ..Seen::default()
        }
    }

    fn rewrite() -> Rewrite {
        Rewrite::for_call(
            "/v1/messages/batches/msgbatch_1",
            &host("ferry:8080"),
            "/v1",
        )
        .unwrap()
    }

    #[test]
    fn only_batch_objects_are_rewritten() {
        let r = |path: &str| Rewrite::for_call(path, &host("ferry:8080"), "/v1").is_some();
        assert!(r("/v1/messages/batches"));
        assert!(r("/v1/messages/batches/msgbatch_1"));
        assert!(r("/v1/messages/batches/msgbatch_1/cancel"));
        assert!(!r("/v1/messages/batches/msgbatch_1/results"));
        assert!(!r("/v1/messages/batches/"));
        assert!(!r("/v1/messages"));
        assert!(!r("/v1/messages/batchesx"));
        assert!(!r("/v1/batches/batch_1"));
        // No usable Host: nothing to point at.
        let none = Seen::default();
        assert!(Rewrite::for_call("/v1/messages/batches", &none, "/v1").is_none());
        assert!(Rewrite::for_call("/v1/messages/batches", &host("a/b"), "/v1").is_none());
    }

    #[test]
    fn the_origin_is_the_callers_view_of_ferry() {
        let r = |proto| {
            Seen {
                forwarded_proto: proto,
                ..host("ferry.example")
            }
            .origin()
            .unwrap()
        };
        assert_eq!(r(None), "http://ferry.example");
        assert_eq!(r(Some("https")), "https://ferry.example");
        assert_eq!(r(Some(" HTTPS ")), "https://ferry.example");
        assert_eq!(r(Some("gopher")), "http://ferry.example");
        // Two proxies: the first value is the caller's.
        assert_eq!(r(Some("https, http")), "https://ferry.example");
        assert_eq!(r(Some("http, https")), "http://ferry.example");
    }

    #[test]
    fn a_proxy_that_rewrote_host_is_seen_through() {
        let r = |forwarded| {
            Seen {
                forwarded_host: forwarded,
                forwarded_proto: Some("https"),
                ..host("ferry-internal:8080")
            }
            .origin()
        };
        assert_eq!(
            r(Some("api.example.com")).as_deref(),
            Some("https://api.example.com")
        );
        assert_eq!(
            r(Some(" api.example.com:8443 , ferry-lb")).as_deref(),
            Some("https://api.example.com:8443")
        );
        // None, or nothing usable: the `Host` Ferry was reached at.
        for unusable in [
            None,
            Some(""),
            Some(" , x"),
            Some("evil.example/x"),
            Some("u@evil"),
        ] {
            assert_eq!(
                r(unusable).as_deref(),
                Some("https://ferry-internal:8080"),
                "{unusable:?}"
            );
        }
        // A forwarded host needs no `Host` beside it.
        let only = Seen {
            forwarded_host: Some("api.example.com"),
            ..Seen::default()
        };
        assert_eq!(only.origin().as_deref(), Some("http://api.example.com"));
    }

    #[test]
    fn a_batch_and_a_list_point_at_ferry() {
        let one = br#"{"id":"msgbatch_1","type":"message_batch","processing_status":"ended","results_url":"https://api.anthropic.com/v1/messages/batches/msgbatch_1/results"}"#;
        let out = rewrite().apply(one).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"id":"msgbatch_1","type":"message_batch","processing_status":"ended","results_url":"http://ferry:8080/v1/messages/batches/msgbatch_1/results"}"#
        );
        let list = br#"{"data":[{"id":"a","results_url":null},{"id":"b","results_url":"http://127.0.0.1/v1/messages/batches/b/results"}],"has_more":false}"#;
        let out: Value = serde_json::from_slice(&rewrite().apply(list).unwrap()).unwrap();
        assert_eq!(out["data"][0]["results_url"], Value::Null);
        assert_eq!(
            out["data"][1]["results_url"],
            "http://ferry:8080/v1/messages/batches/b/results"
        );
        assert_eq!(out["has_more"], false);
    }

    #[test]
    fn what_is_not_the_upstreams_url_is_left_alone() {
        // Not ended yet, not JSON, a URL outside the upstream's base path.
        assert!(rewrite().apply(br#"{"results_url":null}"#).is_none());
        assert!(rewrite().apply(b"not json").is_none());
        assert!(
            rewrite()
                .apply(br#"{"results_url":"https://elsewhere.example/files/1"}"#)
                .is_none()
        );
        // A base path of its own (`http://host/anthropic/v1`).
        let r = Rewrite {
            upstream_base_path: "/anthropic/v1".into(),
            ferry_origin: "http://ferry".into(),
        };
        let out = r
            .apply(br#"{"results_url":"http://up/anthropic/v1/messages/batches/x/results"}"#)
            .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"results_url":"http://ferry/v1/messages/batches/x/results"}"#
        );
    }
}
