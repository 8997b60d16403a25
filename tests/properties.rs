//! Property tests over Ferry's pure functions at its edges: what callers send
//! (`Prefer`, bodies, custom ids, paths, queries, callback URLs), what the
//! upstream sends back (output lines, split across reads), and the bytes
//! Ferry writes itself (JSONL lines, webhook signatures).
//!
//! Each input-facing function must not panic on arbitrary input, and each
//! must agree with a simple oracle written here from the contract.

use std::net::IpAddr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http::Method;
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{Map, Value, json};

use ferry::batch::ingest::{LineError, LineSplitter, parse_line};
use ferry::delivery::webhooks::{AllowEntry, HostPattern, PortPattern, decode_secret, sign};
use ferry::endpoint::Endpoint;
use ferry::intake::{Prefer, parse_prefer, valid_custom_id, validate_body};
use ferry::proxy::routes::{Route, classify, query_wait};
use ferry::store::{
    LINE_SUFFIX, Outcome, line_len, line_prefix, parse_upstream_custom_id, upstream_custom_id,
};
use ferry::upstream::profile::{ProviderKind, ProviderProfile};

/// Modest case counts keep the whole file to a few seconds; no regression
/// files are written into the source tree.
fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

// ------------------------------------------------------------ strategies

/// Any JSON value, a few levels deep.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        // Short decimals: they survive a parse/print round trip exactly.
        (-100_000i64..100_000).prop_map(|n| json!(n as f64 / 100.0)),
        short_string().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(short_string(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Up to 16 arbitrary characters (cheaper to generate than `any::<String>()`).
fn short_string() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..16).prop_map(String::from_iter)
}

/// `[A-Za-z0-9_-]{1,64}`.
fn arb_custom_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,64}"
}

/// The oracle for custom ids, written from the contract's wording.
fn is_custom_id(s: &str) -> bool {
    let n = s.chars().count();
    (1..=64).contains(&n)
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Any path, and paths inside Ferry's own namespace.
fn arb_path() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        any::<String>().prop_map(|s| format!("/v1/{s}")),
        any::<String>().prop_map(|s| format!("/v1/ferry/{s}")),
        any::<String>().prop_map(|s| format!("/v1/ferry/requests/{s}")),
        "[A-Za-z0-9_/-]{0,80}".prop_map(|s| format!("/v1/ferry/requests/{s}")),
    ]
}

fn arb_method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::DELETE),
        Just(Method::PATCH),
        Just(Method::HEAD),
        Just(Method::OPTIONS),
        "[A-Z]{1,10}".prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap()),
    ]
}

/// A message with random unicode content, sometimes with extra fields.
fn arb_message() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            Just("system"),
            Just("user"),
            Just("assistant"),
            Just("developer")
        ],
        any::<String>(),
        prop::option::of(any::<String>()),
    )
        .prop_map(|(role, content, name)| {
            let mut m = json!({"role": role, "content": content});
            if let Some(n) = name {
                m["name"] = json!(n);
            }
            m
        })
}

/// Optional extra parameters of a chat completion, each sometimes present.
fn arb_extras() -> impl Strategy<Value = Map<String, Value>> {
    (
        prop::option::of((0i64..=200).prop_map(|t| json!(t as f64 / 100.0))),
        prop::option::of(1u32..100_000),
        prop::option::of(any::<String>()),
        prop::option::of(prop::collection::btree_map(
            "[a-z]{1,8}",
            any::<String>(),
            0..4,
        )),
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
        prop::option::of(prop::collection::vec(arb_json(), 0..3)),
    )
        .prop_map(
            |(temperature, max_tokens, user, metadata, stream, include_usage, tools)| {
                let mut m = Map::new();
                if let Some(t) = temperature {
                    m.insert("temperature".into(), t);
                }
                if let Some(n) = max_tokens {
                    m.insert("max_tokens".into(), json!(n));
                }
                if let Some(u) = user {
                    m.insert("user".into(), json!(u));
                }
                if let Some(md) = metadata {
                    m.insert("metadata".into(), json!(md));
                }
                if let Some(s) = stream {
                    m.insert("stream".into(), json!(s));
                }
                if let Some(u) = include_usage {
                    m.insert("stream_options".into(), json!({"include_usage": u}));
                }
                if let Some(t) = tools {
                    m.insert("x_extra".into(), Value::from(t));
                }
                m
            },
        )
}

/// A well-formed chat completion body: random (non-empty) model name, 1 to
/// 5 messages, optional extras.
fn arb_chat_body() -> impl Strategy<Value = Value> {
    (
        any::<String>().prop_filter("model must not be empty", |m| !m.is_empty()),
        prop::collection::vec(arb_message(), 1..=5),
        arb_extras(),
    )
        .prop_map(|(model, messages, extras)| {
            let mut body = extras;
            body.insert("model".into(), json!(model));
            body.insert("messages".into(), Value::from(messages));
            Value::Object(body)
        })
}

/// How a JSON document may be written: compact, pretty, or with odd spacing.
fn arb_layout() -> impl Strategy<Value = u8> {
    0u8..3
}

fn write_json(v: &Value, layout: u8) -> Vec<u8> {
    match layout {
        0 => serde_json::to_vec(v).unwrap(),
        1 => serde_json::to_vec_pretty(v).unwrap(),
        _ => format!(" \r\n\t{}\n\n ", serde_json::to_string_pretty(v).unwrap()).into_bytes(),
    }
}

/// Splits `data` at the given cut points (taken modulo its length).
fn split_at_cuts(data: &[u8], cuts: &[usize]) -> Vec<Bytes> {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|c| {
            if data.is_empty() {
                0
            } else {
                c % (data.len() + 1)
            }
        })
        .collect();
    points.push(0);
    points.push(data.len());
    points.sort_unstable();
    points
        .windows(2)
        .map(|w| Bytes::copy_from_slice(&data[w[0]..w[1]]))
        .collect()
}

fn split_all(chunks: &[Bytes]) -> Vec<Bytes> {
    let mut s = LineSplitter::default();
    let mut lines = Vec::new();
    for c in chunks {
        lines.extend(s.push(c));
    }
    lines.extend(s.finish());
    lines
}

/// The oracle: split on `\n`, drop blank (whitespace-only) lines.
fn split_oracle(data: &[u8]) -> Vec<Bytes> {
    data.split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .map(Bytes::copy_from_slice)
        .collect()
}

fn profiles() -> [ProviderProfile; 3] {
    [
        ProviderProfile::for_kind(ProviderKind::Openai),
        ProviderProfile::for_kind(ProviderKind::Moonshot),
        ProviderProfile::for_kind(ProviderKind::Generic),
    ]
}

// ------------------------------------------------------------ intake

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn parse_prefer_never_panics(values in prop::collection::vec(any::<String>(), 0..4)) {
        let p = parse_prefer(values.iter().map(String::as_str));
        // Without the token there is no deferral.
        if !values.iter().any(|v| v.to_ascii_lowercase().contains("respond-async")) {
            prop_assert!(!p.respond_async);
        }
    }

    /// `respond-async` and `wait=N` are found however they are written:
    /// any case, spacing, quoting, order, parameters, other preferences,
    /// and split over several header values.
    #[test]
    fn parse_prefer_finds_respond_async_and_wait(
        wait in any::<u64>(),
        upper in any::<bool>(),
        quoted in any::<bool>(),
        wait_first in any::<bool>(),
        separate_values in any::<bool>(),
        pad in "[ \t]{0,3}",
        others in prop::collection::vec("(return=minimal|handling=lenient|foo|x=\"y\")", 0..3),
        params in prop::option::of("[a-z]{1,5}=[a-z0-9]{1,5}"),
    ) {
        let ra = if upper { "Respond-Async" } else { "respond-async" };
        let w = if upper { "WAIT" } else { "wait" };
        let n = if quoted { format!("\"{wait}\"") } else { wait.to_string() };
        let mut wait_pref = format!("{w}{pad}={pad}{n}");
        if let Some(p) = &params {
            wait_pref = format!("{wait_pref}; {p}");
        }
        let mut prefs: Vec<String> = others.clone();
        if wait_first {
            prefs.insert(0, wait_pref);
            prefs.push(ra.to_owned());
        } else {
            prefs.insert(0, ra.to_owned());
            prefs.push(wait_pref);
        }
        let values: Vec<String> = if separate_values {
            prefs
        } else {
            vec![prefs.join(&format!("{pad},{pad}"))]
        };
        let p = parse_prefer(values.iter().map(String::as_str));
        prop_assert_eq!(p, Prefer { respond_async: true, wait: Some(wait) }, "{:?}", values);
    }

    /// An unusable `wait` is ignored, never misread.
    #[test]
    fn parse_prefer_ignores_unusable_waits(junk in "[a-zA-Z!#$%&'*.^_`|~-][^,;]*") {
        let value = format!("respond-async, wait={junk}");
        let p = parse_prefer(std::iter::once(value.as_str()));
        prop_assert!(p.respond_async);
        prop_assert_eq!(p.wait, None, "{}", value);
    }

    #[test]
    fn valid_custom_id_is_exactly_the_contract_charset(s in any::<String>()) {
        prop_assert_eq!(valid_custom_id(&s), is_custom_id(&s), "{:?}", s);
    }

    #[test]
    fn generated_custom_ids_are_valid(id in arb_custom_id(), extra in "[^A-Za-z0-9_-]") {
        prop_assert!(valid_custom_id(&id));
        // One foreign character anywhere spoils it.
        let at = id.len() / 2;
        let spoiled = format!("{}{extra}{}", &id[..at], &id[at..]);
        prop_assert!(!valid_custom_id(&spoiled), "{:?}", spoiled);
        let too_long = format!("{id}{}", "a".repeat(65 - id.len()));
        prop_assert!(!valid_custom_id(&too_long), "{:?}", too_long);
    }
}

proptest! {
    #![proptest_config(config(384))]

    /// Arbitrary bytes: no panic; an accepted body is a one-line JSON object
    /// without `stream`, a refused one is a 400 in the envelope.
    #[test]
    fn validate_body_never_panics_on_bytes(raw in prop::collection::vec(any::<u8>(), 0..256), waits in any::<bool>()) {
        for profile in &profiles() {
            check_any_body(&raw, profile, waits)?;
        }
    }

    /// Arbitrary JSON (objects with and without model/messages of any type).
    #[test]
    fn validate_body_never_panics_on_json(
        v in arb_json(),
        model in prop::option::of(arb_json()),
        messages in prop::option::of(arb_json()),
        stream in prop::option::of(arb_json()),
        waits in any::<bool>(),
    ) {
        let mut v = v;
        if let Value::Object(m) = &mut v {
            if let Some(x) = model { m.insert("model".into(), x); }
            if let Some(x) = messages { m.insert("messages".into(), x); }
            if let Some(x) = stream { m.insert("stream".into(), x); }
        }
        let raw = serde_json::to_vec(&v).unwrap();
        for profile in &profiles() {
            check_any_body(&raw, profile, waits)?;
        }
    }
}

fn check_any_body(raw: &[u8], profile: &ProviderProfile, waits: bool) -> Result<(), TestCaseError> {
    match validate_body(raw, &|_| profile, waits) {
        Ok(v) => {
            prop_assert!(!v.model.is_empty());
            prop_assert!(!v.line_body.contains(&b'\n'));
            let line: Value = serde_json::from_slice(&v.line_body)
                .map_err(|e| TestCaseError::fail(format!("line_body is not JSON: {e}")))?;
            let obj = line
                .as_object()
                .ok_or_else(|| TestCaseError::fail("line_body is not an object"))?;
            prop_assert!(!obj.contains_key("stream") && !obj.contains_key("stream_options"));
            prop_assert_eq!(&obj["model"], &json!(v.model));
            prop_assert!(waits || !v.stream);
            prop_assert_eq!(v.sha256.len(), 64);
        }
        Err(e) => {
            prop_assert_eq!(e.status(), 400);
            let env = serde_json::to_value(e.envelope()).unwrap();
            prop_assert_eq!(&env["error"]["type"], "invalid_request_error");
            prop_assert!(env["error"]["code"].is_string());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    /// Every well-formed body is accepted, and what goes upstream is the
    /// body itself minus `stream`/`stream_options`, on one line.
    #[test]
    fn validate_body_accepts_well_formed_bodies(body in arb_chat_body(), layout in arb_layout()) {
        let raw = write_json(&body, layout);
        let openai = ProviderProfile::for_kind(ProviderKind::Openai);
        let wants_stream = body.get("stream") == Some(&json!(true));
        // Waiting, every such body is accepted.
        let v = validate_body(&raw, &|_| &openai, true)
            .map_err(|e| TestCaseError::fail(format!("refused: {e} ({})", String::from_utf8_lossy(&raw))))?;
        prop_assert_eq!(&v.model, body["model"].as_str().unwrap());
        prop_assert_eq!(v.stream, wants_stream);
        prop_assert!(!v.line_body.contains(&b'\n'), "line_body has a newline");
        prop_assert!(std::str::from_utf8(&v.line_body).is_ok());
        let line: Value = serde_json::from_slice(&v.line_body).unwrap();
        let mut expected = body.clone();
        let m = expected.as_object_mut().unwrap();
        m.remove("stream");
        m.remove("stream_options");
        prop_assert_eq!(&line, &expected);
        // The hash is of the bytes as sent (so a retry is recognised).
        let digest = <sha2::Sha256 as sha2::Digest>::digest(&raw);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        prop_assert_eq!(&v.sha256, &hex);
        // Not waiting, only `stream: true` is refused, and with param stream.
        match validate_body(&raw, &|_| &openai, false) {
            Ok(v2) => {
                prop_assert!(!wants_stream);
                prop_assert_eq!(v2.line_body, v.line_body);
            }
            Err(e) => {
                prop_assert!(wants_stream, "refused without stream: {}", e);
                let env = serde_json::to_value(e.envelope()).unwrap();
                prop_assert_eq!(&env["error"]["param"], "stream");
            }
        }
        // Moonshot refuses exactly its forbidden parameters.
        let moonshot = ProviderProfile::for_kind(ProviderKind::Moonshot);
        let forbidden = moonshot.forbidden_params.iter().any(|p| body.get(p.as_str()).is_some());
        match validate_body(&raw, &|_| &moonshot, true) {
            Ok(_) => prop_assert!(!forbidden),
            Err(e) => {
                prop_assert!(forbidden, "moonshot refused: {}", e);
                let env = serde_json::to_value(e.envelope()).unwrap();
                prop_assert_eq!(&env["error"]["code"], "unsupported_parameter");
            }
        }
    }

    /// The profile is asked about the body's own model.
    #[test]
    fn validate_body_routes_by_the_bodys_model(body in arb_chat_body()) {
        let raw = serde_json::to_vec(&body).unwrap();
        let openai = ProviderProfile::for_kind(ProviderKind::Openai);
        let asked = std::cell::RefCell::new(Vec::new());
        let profile_for = |m: &str| {
            asked.borrow_mut().push(m.to_owned());
            &openai
        };
        let _ = validate_body(&raw, &profile_for, true);
        prop_assert_eq!(asked.into_inner(), vec![body["model"].as_str().unwrap().to_owned()]);
    }
}

// ------------------------------------------------------------ routes

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn classify_never_panics(method in arb_method(), path in arb_path()) {
        let route = classify(&method, &path);
        // Ferry's own namespace is never passed through upstream, and ids it
        // hands on are always valid custom ids.
        if path.starts_with("/v1/ferry/") {
            prop_assert!(route != Route::OtherV1 && !matches!(route, Route::Deferrable(_)));
        }
        match &route {
            Route::Lookup { id, .. } | Route::Cancel { id } => prop_assert!(valid_custom_id(id)),
            Route::OtherV1 => prop_assert!(path.starts_with("/v1/")),
            Route::NotFound => prop_assert!(!path.starts_with("/v1/") || path.starts_with("/v1/ferry/")),
            _ => {}
        }
        let _ = route.label();
    }

    #[test]
    fn classify_ferry_routes(method in arb_method(), id in arb_custom_id()) {
        let one = classify(&method, &format!("/v1/ferry/requests/{id}"));
        let expected = match method {
            Method::GET => Route::Lookup { id: id.clone(), result: false },
            Method::DELETE => Route::Cancel { id: id.clone() },
            _ => Route::MethodNotAllowed { allow: "GET, DELETE" },
        };
        prop_assert_eq!(one, expected);
        let result = classify(&method, &format!("/v1/ferry/requests/{id}/result"));
        let expected = if method == Method::GET {
            Route::Lookup { id: id.clone(), result: true }
        } else {
            Route::MethodNotAllowed { allow: "GET" }
        };
        prop_assert_eq!(result, expected);
    }

    /// Ids Ferry cannot have are unknown routes, whatever the method.
    #[test]
    fn classify_refuses_bad_ids(method in arb_method(), id in any::<String>().prop_filter("invalid", |s| !is_custom_id(s) && !s.contains('/'))) {
        prop_assert_eq!(classify(&method, &format!("/v1/ferry/requests/{id}")), Route::NotFound);
        prop_assert_eq!(classify(&method, &format!("/v1/ferry/requests/{id}/result")), Route::NotFound);
    }

    #[test]
    fn query_wait_never_panics(q in prop::option::of(any::<String>())) {
        let _ = query_wait(q.as_deref());
    }

    #[test]
    fn query_wait_finds_wait_among_other_parameters(
        wait in any::<u64>(),
        before in prop::collection::vec(("[a-vx-z][a-z_]{0,6}", "[A-Za-z0-9%._-]{0,8}"), 0..4),
        after in prop::collection::vec(("[a-z_]{1,7}", "[A-Za-z0-9%._=-]{0,8}"), 0..4),
    ) {
        let mut parts: Vec<String> = before.iter().map(|(k, v)| format!("{k}={v}")).collect();
        parts.push(format!("wait={wait}"));
        parts.extend(after.iter().map(|(k, v)| format!("{k}={v}")));
        let q = parts.join("&");
        prop_assert_eq!(query_wait(Some(&q)), Some(wait), "{}", q);
    }
}

// ------------------------------------------------------------ webhooks

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn allow_entry_parse_never_panics(s in any::<String>(), scheme in prop_oneof![Just(""), Just("http://"), Just("https://")]) {
        let _ = AllowEntry::parse(&s);
        let _ = AllowEntry::parse(&format!("{scheme}{s}"));
    }

    #[test]
    fn allow_entry_parses_what_it_should(
        https in any::<bool>(),
        labels in prop::collection::vec("[a-zA-Z0-9-]{1,10}", 1..4),
        wildcard in 0u8..3,
        port in prop::option::of(prop_oneof![any::<u16>().prop_map(Some), Just(None)]),
        slash in any::<bool>(),
    ) {
        let domain = labels.join(".");
        let host = match wildcard {
            0 => domain.clone(),
            1 => format!("*.{domain}"),
            _ => "*".to_owned(),
        };
        let port_text = match port {
            None => String::new(),
            Some(Some(p)) => format!(":{p}"),
            Some(None) => ":*".to_owned(),
        };
        let s = format!(
            "{}://{host}{port_text}{}",
            if https { "https" } else { "http" },
            if slash { "/" } else { "" }
        );
        let e = AllowEntry::parse(&s).map_err(TestCaseError::fail)?;
        prop_assert_eq!(e.https, https);
        let lower = domain.to_ascii_lowercase();
        let expected_host = match wildcard {
            0 => HostPattern::Exact(lower),
            1 => HostPattern::Suffix(lower),
            _ => HostPattern::Any,
        };
        prop_assert_eq!(e.host, expected_host);
        let expected_port = match port {
            None => PortPattern::Default,
            Some(Some(p)) => PortPattern::Exact(p),
            Some(None) => PortPattern::Any,
        };
        prop_assert_eq!(e.port, expected_port);
        // A path or credentials are refused.
        let with_path = format!("{}/x", s.trim_end_matches('/'));
        prop_assert!(AllowEntry::parse(&with_path).is_err());
        let with_user = s.replacen("://", "://user@", 1);
        prop_assert!(AllowEntry::parse(&with_user).is_err());
    }

    /// The callback check runs on the caller's header: no panic, and an
    /// empty allow-list refuses everything.
    #[test]
    fn check_callback_never_panics(url in any::<String>(), entries in prop::collection::vec(any::<String>(), 0..3)) {
        let mut allow: Vec<AllowEntry> = entries.iter().filter_map(|e| AllowEntry::parse(e).ok()).collect();
        allow.push(AllowEntry::parse("https://*").unwrap());
        allow.push(AllowEntry::parse("http://127.0.0.1:*").unwrap());
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let public: IpAddr = "93.184.216.34".parse().unwrap();
        let fake = move |_: String, _: u16| std::future::ready(Ok(vec![public]));
        let _ = rt.block_on(ferry::delivery::webhooks::check_callback(&url, &allow, fake));
        let none = rt.block_on(ferry::delivery::webhooks::check_callback(&url, &[], fake));
        prop_assert!(none.is_err());
    }

    #[test]
    fn decode_secret_never_panics(s in any::<String>()) {
        let _ = decode_secret(&s);
        let _ = decode_secret(&format!("whsec_{s}"));
    }

    #[test]
    fn decode_secret_inverts_base64(key in prop::collection::vec(any::<u8>(), 0..64), junk in "[^w].*") {
        let secret = format!("whsec_{}", B64.encode(&key));
        prop_assert_eq!(decode_secret(&secret), Ok(key.clone()));
        prop_assert!(decode_secret(&junk).is_err());
    }

    /// `v1,<base64 of a 32-byte HMAC-SHA256>`, deterministic, and it changes
    /// with every signed part.
    #[test]
    fn sign_is_a_standard_webhooks_signature(
        key in prop::collection::vec(any::<u8>(), 0..100),
        id in any::<String>(),
        ts in any::<u64>(),
        body in any::<String>(),
    ) {
        let sig = sign(&key, &id, ts, &body);
        let b64 = sig.strip_prefix("v1,").ok_or_else(|| TestCaseError::fail(sig.clone()))?;
        prop_assert_eq!(B64.decode(b64).map(|m| m.len()), Ok(32));
        prop_assert_eq!(&sign(&key, &id, ts, &body), &sig);
        prop_assert_ne!(&sign(&key, &id, ts.wrapping_add(1), &body), &sig);
        prop_assert_ne!(&sign(&key, &id, ts, &format!("{body} ")), &sig);
        prop_assert_ne!(&sign(&key, &format!("{id}x"), ts, &body), &sig);
        // The signed content is `{id}.{ts}.{body}`, per the specification.
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{id}.{ts}.{body}").as_bytes());
        prop_assert_eq!(B64.encode(mac.finalize().into_bytes()), b64);
    }
}

// ------------------------------------------------------------ store lines and ingest

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn upstream_custom_ids_round_trip(id in any::<u64>()) {
        let cid = upstream_custom_id(id);
        prop_assert!(cid.starts_with("ferry-"));
        prop_assert_eq!(parse_upstream_custom_id(&cid), Some(id));
    }

    #[test]
    fn parse_upstream_custom_id_never_panics(s in any::<String>()) {
        if let Some(id) = parse_upstream_custom_id(&s) {
            prop_assert!(s.starts_with("ferry-"));
            prop_assert_eq!(parse_upstream_custom_id(&upstream_custom_id(id)), Some(id));
        }
        prop_assert_eq!(parse_upstream_custom_id(&format!("x{s}")), None);
    }

    /// `line_len` predicts the exact length of the JSONL line, and the line
    /// is one valid Batch API request line carrying the body unchanged.
    #[test]
    fn line_len_is_the_length_of_the_line(
        id in any::<u64>(),
        body in arb_chat_body(),
        endpoint in proptest::sample::select(Endpoint::ALL.to_vec()),
    ) {
        let body = serde_json::to_vec(&body).unwrap();
        let mut line = line_prefix(endpoint, id).into_bytes();
        line.extend_from_slice(&body);
        line.extend_from_slice(LINE_SUFFIX.as_bytes());
        prop_assert_eq!(line_len(endpoint, id, body.len() as u64), line.len() as u64);
        prop_assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        prop_assert_eq!(line.last(), Some(&b'\n'));
        let v: Value = serde_json::from_slice(&line).unwrap();
        prop_assert_eq!(&v["custom_id"], &json!(upstream_custom_id(id)));
        prop_assert_eq!(&v["method"], "POST");
        prop_assert_eq!(&v["url"], endpoint.path());
        let sent: Value = serde_json::from_slice(&body).unwrap();
        prop_assert_eq!(&v["body"], &sent);
    }

    #[test]
    fn parse_line_never_panics(line in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = parse_line(&line);
    }

    #[test]
    fn parse_line_never_panics_on_json(
        v in arb_json(),
        cid in prop::option::of(arb_json()),
        response in prop::option::of(arb_json()),
        error in prop::option::of(arb_json()),
    ) {
        let mut v = v;
        if let Value::Object(m) = &mut v {
            if let Some(x) = cid { m.insert("custom_id".into(), x); }
            if let Some(x) = response { m.insert("response".into(), x); }
            if let Some(x) = error { m.insert("error".into(), x); }
        }
        let _ = parse_line(&serde_json::to_vec(&v).unwrap());
    }

    /// An output line answers the request its custom_id names, with the
    /// upstream's status code and body verbatim (4xx/5xx included).
    #[test]
    fn parse_line_reads_output_lines(id in any::<u64>(), status in any::<u16>(), body in arb_json(), extra in any::<bool>()) {
        let mut line = json!({
            "custom_id": upstream_custom_id(id),
            "response": {"status_code": status, "body": body.clone()},
        });
        if extra {
            line["id"] = json!("batch_req_1");
            line["error"] = Value::Null;
            line["response"]["request_id"] = json!("req_1");
        }
        let (got, outcome) = parse_line(&serde_json::to_vec(&line).unwrap())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got, id);
        match outcome {
            Outcome::Completed(r) => {
                prop_assert_eq!(r.status_code, status);
                // Verbatim: the very bytes of the line's body, not a re-serialisation.
                prop_assert_eq!(&r.body[..], &serde_json::to_vec(&body).unwrap()[..]);
                prop_assert_eq!(r.body_value(), body);
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }

    /// An error-file line: expired, cancelled or failed.
    #[test]
    fn parse_line_reads_error_lines(id in any::<u64>(), code in prop_oneof![Just("batch_expired".to_owned()), Just("batch_cancelled".to_owned()), "[a-z_]{1,20}"], message in prop::option::of(any::<String>())) {
        let line = json!({
            "custom_id": upstream_custom_id(id),
            "response": null,
            "error": {"code": code, "message": message},
        });
        let (got, outcome) = parse_line(&serde_json::to_vec(&line).unwrap())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got, id);
        match (code.as_str(), outcome) {
            ("batch_expired", Outcome::Expired(e)) => prop_assert_eq!(e.code, code.clone()),
            ("batch_cancelled", Outcome::Cancelled(e)) => prop_assert_eq!(e.code, code.clone()),
            (_, Outcome::Failed(e)) if code != "batch_expired" && code != "batch_cancelled" => {
                prop_assert_eq!(e.code, code.clone());
                if let Some(m) = message {
                    prop_assert_eq!(e.message, m);
                }
            }
            (c, o) => prop_assert!(false, "{} gave {:?}", c, o),
        }
    }

    /// Lines not of Ferry's making are reported, not misattributed.
    #[test]
    fn parse_line_refuses_foreign_ids(cid in any::<String>().prop_filter("foreign", |s| !s.starts_with("ferry-"))) {
        let line = json!({"custom_id": cid, "response": {"status_code": 200, "body": {}}});
        let got = parse_line(&serde_json::to_vec(&line).unwrap());
        prop_assert!(
            matches!(&got, Err(LineError::ForeignCustomId(c)) if *c == cid),
            "{:?}",
            got
        );
    }
}

proptest! {
    #![proptest_config(config(384))]

    /// However the stream is cut into reads, the same lines come out, and
    /// they are the lines of the whole minus blank ones.
    #[test]
    fn line_splitter_is_independent_of_chunking(
        lines in prop::collection::vec(
            prop_oneof![
                "[ -~]{0,40}",
                Just(String::new()),
                Just(" \t\r".to_owned()),
                any::<String>().prop_map(|s| s.replace('\n', "")),
            ],
            0..20,
        ),
        trailing_newline in any::<bool>(),
        crlf in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let sep = if crlf { "\r\n" } else { "\n" };
        let mut data = lines.join(sep).into_bytes();
        if trailing_newline {
            data.extend_from_slice(sep.as_bytes());
        }
        let expected = split_oracle(&data);
        prop_assert_eq!(split_all(&[Bytes::from(data.clone())]), expected.clone());
        prop_assert_eq!(split_all(&split_at_cuts(&data, &cuts)), expected.clone());
        // One byte at a time.
        let bytewise: Vec<Bytes> = data.iter().map(|b| Bytes::copy_from_slice(&[*b])).collect();
        prop_assert_eq!(split_all(&bytewise), expected);
    }

    #[test]
    fn line_splitter_on_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..400), cuts in prop::collection::vec(any::<usize>(), 0..12)) {
        let expected = split_oracle(&data);
        prop_assert_eq!(split_all(&split_at_cuts(&data, &cuts)), expected);
    }

    /// Output lines split anywhere still parse to every member, in order.
    #[test]
    fn output_files_survive_any_chunking(
        members in prop::collection::vec((any::<u64>(), 100u16..600, arb_json()), 1..8),
        cuts in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        let mut file = Vec::new();
        for (id, status, body) in &members {
            let line = json!({"id": "batch_req", "custom_id": upstream_custom_id(*id),
                              "response": {"status_code": status, "body": body}, "error": null});
            serde_json::to_writer(&mut file, &line).unwrap();
            file.push(b'\n');
        }
        let got: Vec<(u64, u16)> = split_all(&split_at_cuts(&file, &cuts))
            .iter()
            .map(|l| match parse_line(l) {
                Ok((id, Outcome::Completed(r))) => (id, r.status_code),
                other => panic!("{other:?}"),
            })
            .collect();
        let want: Vec<(u64, u16)> = members.iter().map(|(id, s, _)| (*id, *s)).collect();
        prop_assert_eq!(got, want);
    }
}
