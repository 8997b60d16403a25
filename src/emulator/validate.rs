//! Input checks the way the Batch API does them: the synchronous ones made on
//! `POST /v1/batches` (window, metadata) and the per-line ones made while a
//! batch is `validating`, which fail it with every bad line listed.
//!
//! Lines are read with a streaming iterator over the file's bytes and parsed one
//! at a time, so a 50,000-line / 200 MB file never becomes one big tree of JSON
//! values; only each good line's `custom_id` and byte range are kept.

use std::collections::HashSet;
use std::ops::Range;

use serde_json::{Map, Value};

use super::config::Profile;

/// One entry of a failed batch's `errors.data`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineError {
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
    /// 1-based line number, or `None` for errors about the whole file.
    pub line: Option<u64>,
}

impl LineError {
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "code": self.code,
            "message": self.message,
            "param": self.param,
            "line": self.line,
        })
    }
}

/// Body parameters Moonshot refuses in batch lines.
pub const MOONSHOT_FORBIDDEN: [&str; 5] = [
    "temperature",
    "top_p",
    "n",
    "presence_penalty",
    "frequency_penalty",
];

/// Endpoints a batch may target under each profile.
pub fn allowed_endpoints(profile: Profile) -> &'static [&'static str] {
    match profile {
        Profile::Openai => &[
            "/v1/chat/completions",
            "/v1/embeddings",
            "/v1/completions",
            "/v1/moderations",
            "/v1/responses",
        ],
        Profile::Moonshot => &["/v1/chat/completions"],
    }
}

/// OpenAI's cap on the embedding inputs of one batch, summed over its
/// lines (each element of an `input` array counts).
pub const MAX_EMBEDDING_INPUTS: u64 = 50_000;

/// The embedding inputs of one line's body: the elements of an `input`
/// array, except that one array of token ids is one input.
fn embedding_inputs(body: &Value) -> u64 {
    match body.get("input") {
        Some(Value::Array(a)) if a.is_empty() || a.iter().all(Value::is_number) => 1,
        Some(Value::Array(a)) => a.len() as u64,
        _ => 1,
    }
}

/// What the line checks depend on, captured when the batch is created.
#[derive(Clone, Debug)]
pub struct Rules {
    pub profile: Profile,
    pub endpoint: String,
    /// Empty: any model.
    pub models: Vec<String>,
    pub max_lines: u64,
}

/// A line that passed every check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoodLine {
    pub custom_id: String,
    /// Where the line sits in the file, to parse its body again when it runs.
    pub range: Range<usize>,
}

/// The verdict on a whole input file.
#[derive(Debug, Default)]
pub struct Report {
    pub good: Vec<GoodLine>,
    pub errors: Vec<LineError>,
    /// The model of the batch (the first line's).
    pub model: Option<String>,
    /// Request lines in the file, good or bad.
    pub lines: u64,
    /// Every string `custom_id` seen, for the stats.
    pub custom_ids: Vec<String>,
}

/// The lines of a JSONL file with their byte ranges: split on `\n`, a trailing
/// `\r` dropped, and no empty last line after a final newline.
pub fn lines(content: &[u8]) -> impl Iterator<Item = (u64, Range<usize>)> + '_ {
    let mut start = 0usize;
    let mut number = 0u64;
    std::iter::from_fn(move || {
        if start >= content.len() {
            return None;
        }
        let end = content[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(content.len(), |p| start + p);
        let next = end + 1;
        let mut stop = end;
        if stop > start && content[stop - 1] == b'\r' {
            stop -= 1;
        }
        let range = start..stop;
        start = next;
        number += 1;
        Some((number, range))
    })
}

/// Validates a whole input file against `rules`.
pub fn check_file(content: &[u8], rules: &Rules) -> Report {
    let mut report = Report::default();
    if content.iter().all(u8::is_ascii_whitespace) {
        report.errors.push(LineError {
            code: "empty_file",
            message: "The input file is empty. Provide a file with at least one request."
                .to_owned(),
            param: None,
            line: None,
        });
        return report;
    }
    let count = lines(content).count() as u64;
    report.lines = count;
    if count > rules.max_lines {
        report.errors.push(LineError {
            code: "too_many_tasks",
            message: format!(
                "The input file contains {count} requests, over the limit of {} requests per batch.",
                rules.max_lines
            ),
            param: None,
            line: None,
        });
        return report;
    }
    if rules.endpoint == "/v1/embeddings" {
        let inputs: u64 = lines(content)
            .filter_map(|(_, range)| serde_json::from_slice::<Value>(&content[range]).ok())
            .map(|line| embedding_inputs(&line["body"]))
            .sum();
        if inputs > MAX_EMBEDDING_INPUTS {
            report.errors.push(LineError {
                code: "too_many_inputs",
                message: format!(
                    "The input file contains {inputs} embedding inputs, over the limit of \
                     {MAX_EMBEDDING_INPUTS} embedding inputs per batch."
                ),
                param: None,
                line: None,
            });
            return report;
        }
    }
    let mut seen: HashSet<String> = HashSet::new();
    for (number, range) in lines(content) {
        let text = &content[range.clone()];
        let checked = check_line(text, rules);
        let custom_id = checked.custom_id;
        if let Some(id) = &custom_id {
            report.custom_ids.push(id.clone());
        }
        let fail = |code, message: String, param: Option<&str>| LineError {
            code,
            message,
            param: param.map(str::to_owned),
            line: Some(number),
        };
        if let Err((code, message, param)) = checked.verdict {
            report.errors.push(fail(code, message, param.as_deref()));
            if let Some(id) = custom_id {
                seen.insert(id);
            }
            continue;
        }
        // Per-line checks passed, so custom_id and model are strings.
        let (Some(id), Some(model)) = (custom_id, checked.model) else {
            continue;
        };
        if !seen.insert(id.clone()) {
            report.errors.push(fail(
                "duplicate_custom_id",
                format!(
                    "The custom_id '{id}' for this request is a duplicate of another request. \
                     The custom_id parameter must be unique for each request in a batch."
                ),
                Some("custom_id"),
            ));
            continue;
        }
        match &report.model {
            None => report.model = Some(model),
            Some(first) if *first != model => {
                report.errors.push(fail(
                    "model_mismatch",
                    format!(
                        "The provided model '{model}' does not match the model '{first}' of \
                         the other requests in this batch. All requests in a batch must use \
                         the same model."
                    ),
                    Some("body.model"),
                ));
                continue;
            }
            Some(_) => {}
        }
        report.good.push(GoodLine {
            custom_id: id,
            range,
        });
    }
    report
}

type Verdict = Result<(), (&'static str, String, Option<String>)>;

/// The result of the checks that need only the line itself.
struct Checked {
    custom_id: Option<String>,
    model: Option<String>,
    verdict: Verdict,
}

fn missing(param: &str) -> (&'static str, String, Option<String>) {
    (
        "missing_required_parameter",
        format!("Missing required parameter: '{param}'."),
        Some(param.to_owned()),
    )
}

fn invalid(message: String, param: &str) -> (&'static str, String, Option<String>) {
    ("invalid_request", message, Some(param.to_owned()))
}

fn check_line(text: &[u8], rules: &Rules) -> Checked {
    let mut checked = Checked {
        custom_id: None,
        model: None,
        verdict: Ok(()),
    };
    let object = match serde_json::from_slice::<Value>(text) {
        Ok(Value::Object(o)) => o,
        _ => {
            checked.verdict = Err((
                "invalid_json_line",
                "This line is not parseable as valid JSON.".to_owned(),
                None,
            ));
            return checked;
        }
    };
    checked.custom_id = object
        .get("custom_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    checked.model = object
        .get("body")
        .and_then(|b| b.get("model"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    checked.verdict = check_request(&object, rules);
    checked
}

fn check_request(object: &Map<String, Value>, rules: &Rules) -> Verdict {
    match object.get("custom_id") {
        Some(Value::String(_)) => {}
        Some(Value::Null) | None => return Err(missing("custom_id")),
        Some(_) => {
            return Err(invalid(
                "'custom_id' must be a string.".to_owned(),
                "custom_id",
            ));
        }
    }
    match object.get("method") {
        Some(Value::Null) | None => return Err(missing("method")),
        Some(Value::String(m)) if m == "POST" => {}
        Some(other) => {
            return Err(invalid(
                format!("Invalid method {other}: only 'POST' is supported."),
                "method",
            ));
        }
    }
    match object.get("url") {
        Some(Value::Null) | None => return Err(missing("url")),
        Some(Value::String(u)) if *u == rules.endpoint => {}
        Some(_) => {
            return Err((
                "invalid_url",
                format!(
                    "The URL provided for this request does not match the batch endpoint '{}'.",
                    rules.endpoint
                ),
                Some("url".to_owned()),
            ));
        }
    }
    let body = match object.get("body") {
        Some(Value::Object(b)) => b,
        Some(Value::Null) | None => return Err(missing("body")),
        Some(_) => {
            return Err(invalid("'body' must be a JSON object.".to_owned(), "body"));
        }
    };
    check_body(body, &rules.endpoint, rules.profile, &rules.models)?;
    // A test hook like `[emulator:status=NNN]`, one step earlier: the line
    // fails validation, so a batch fails with this one line named in
    // `errors` while its neighbours are fine.
    if Value::Object(body.clone())
        .to_string()
        .contains(INVALID_MARK)
    {
        return Err(invalid(
            format!("The emulator refused this line at validation, as {INVALID_MARK} asked."),
            "body.messages",
        ));
    }
    Ok(())
}

/// Marks a batch line as invalid (see [`check_request`]).
pub const INVALID_MARK: &str = "[emulator:invalid]";

/// The checks on a request body shared by batch lines and real-time calls:
/// streaming, model, the endpoint's required input, Moonshot's forbidden
/// parameters and the model list.
pub fn check_body(
    body: &Map<String, Value>,
    endpoint: &str,
    profile: Profile,
    models: &[String],
) -> Verdict {
    if body.get("stream") == Some(&Value::Bool(true)) {
        return Err((
            "streaming_unsupported",
            "Streaming is not supported in batch requests: remove 'stream' or set it to false."
                .to_owned(),
            Some("body.stream".to_owned()),
        ));
    }
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m,
        _ => {
            return Err(invalid(
                "You must provide a model parameter ('body.model').".to_owned(),
                "body.model",
            ));
        }
    };
    let required = match endpoint {
        "/v1/chat/completions" => Some("messages"),
        "/v1/embeddings" | "/v1/responses" | "/v1/moderations" => Some("input"),
        "/v1/completions" => Some("prompt"),
        _ => None,
    };
    if let Some(field) = required {
        let present = match body.get(field) {
            None | Some(Value::Null) => false,
            Some(Value::Array(a)) => field != "messages" || !a.is_empty(),
            Some(_) => field != "messages",
        };
        if !present {
            return Err(invalid(
                format!("Missing required parameter: 'body.{field}'."),
                &format!("body.{field}"),
            ));
        }
    }
    if profile == Profile::Moonshot
        && let Some(p) = MOONSHOT_FORBIDDEN.iter().find(|p| body.contains_key(**p))
    {
        return Err(invalid(
            format!("The parameter '{p}' is not supported in batch requests; remove it."),
            &format!("body.{p}"),
        ));
    }
    if !models.is_empty() && !models.iter().any(|m| m == model) {
        return Err((
            "model_not_found",
            format!("The provided model '{model}' is not supported by the Batch API."),
            Some("body.model".to_owned()),
        ));
    }
    Ok(())
}

/// Parses a `completion_window` into seconds under a profile: OpenAI takes only
/// `24h`; Moonshot takes a whole number of hours (`h`) or days (`d`) from 12 h
/// to 7 d.
pub fn parse_window(profile: Profile, window: &str) -> Result<f64, String> {
    match profile {
        Profile::Openai => {
            if window == "24h" {
                Ok(86_400.0)
            } else {
                Err(format!(
                    "Invalid value: '{window}'. Supported values are: '24h'."
                ))
            }
        }
        Profile::Moonshot => {
            let bad = || {
                format!(
                    "Invalid completion_window '{window}': use a duration such as '12h', '1d' \
                     or '3d', at least 12h and at most 7d."
                )
            };
            let Some(unit) = window.chars().last() else {
                return Err(bad());
            };
            let digits = &window[..window.len() - unit.len_utf8()];
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let n: u64 = digits.parse().map_err(|_| bad())?;
            let hours = match unit {
                'h' => n,
                'd' => n.checked_mul(24).ok_or_else(bad)?,
                _ => return Err(bad()),
            };
            if (12..=168).contains(&hours) {
                Ok(hours as f64 * 3600.0)
            } else {
                Err(bad())
            }
        }
    }
}

/// Checks batch `metadata`: an object of at most 16 string pairs, keys up to
/// 64 characters, values up to 512.
pub fn check_metadata(metadata: &Value) -> Result<(), String> {
    let map = match metadata {
        Value::Null => return Ok(()),
        Value::Object(m) => m,
        _ => return Err("'metadata' must be an object of string keys and values.".to_owned()),
    };
    if map.len() > 16 {
        return Err(format!(
            "'metadata' has {} pairs; at most 16 are allowed.",
            map.len()
        ));
    }
    for (k, v) in map {
        if k.chars().count() > 64 {
            return Err(format!(
                "Metadata key '{k}' is longer than the maximum of 64 characters."
            ));
        }
        match v {
            Value::String(s) if s.chars().count() <= 512 => {}
            Value::String(_) => {
                return Err(format!(
                    "The value of metadata key '{k}' is longer than the maximum of 512 characters."
                ));
            }
            _ => return Err(format!("The value of metadata key '{k}' must be a string.")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(profile: Profile) -> Rules {
        Rules {
            profile,
            endpoint: "/v1/chat/completions".to_owned(),
            models: vec!["gpt-4o-mini".to_owned(), "gpt-4o".to_owned()],
            max_lines: 5,
        }
    }

    fn line(custom_id: &str, model: &str) -> String {
        json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
               "body": {"model": model, "messages": [{"role": "user", "content": "hi"}]}})
        .to_string()
    }

    fn codes(report: &Report) -> Vec<(&'static str, Option<String>, Option<u64>)> {
        report
            .errors
            .iter()
            .map(|e| (e.code, e.param.clone(), e.line))
            .collect()
    }

    #[test]
    fn lines_splits_without_trailing_empty_line() {
        let text = b"a\r\nbb\n\nc";
        let got: Vec<_> = lines(text).map(|(n, r)| (n, &text[r])).collect();
        assert_eq!(
            got,
            vec![
                (1, &b"a"[..]),
                (2, &b"bb"[..]),
                (3, &b""[..]),
                (4, &b"c"[..])
            ]
        );
        assert_eq!(lines(b"x\n").count(), 1);
    }

    #[test]
    fn good_file_passes() {
        let text = format!("{}\n{}\n", line("a", "gpt-4o"), line("b", "gpt-4o"));
        let r = check_file(text.as_bytes(), &rules(Profile::Openai));
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.good.len(), 2);
        assert_eq!(r.model.as_deref(), Some("gpt-4o"));
        assert_eq!(
            &text.as_bytes()[r.good[1].range.clone()],
            line("b", "gpt-4o").as_bytes()
        );
    }

    #[test]
    fn an_embeddings_file_over_fifty_thousand_inputs_fails_whole() {
        let line = |id: &str, n: usize| {
            json!({"custom_id": id, "method": "POST", "url": "/v1/embeddings",
                   "body": {"model": "gpt-4o", "input": vec!["x"; n]}})
            .to_string()
        };
        let mut r = rules(Profile::Openai);
        r.endpoint = "/v1/embeddings".into();
        let ok = [line("a", 30_000), line("b", 20_000)].join("\n");
        let report = check_file(ok.as_bytes(), &r);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let over = [line("a", 30_000), line("b", 20_001)].join("\n");
        let report = check_file(over.as_bytes(), &r);
        assert_eq!(codes(&report).len(), 1);
        assert_eq!(report.errors[0].code, "too_many_inputs");
        assert!(report.good.is_empty());
    }

    #[test]
    fn every_line_code_in_line_order() {
        let lines = [
            "not json".to_owned(),
            json!({"method": "POST", "url": "/v1/chat/completions", "body": {}}).to_string(),
            json!({"custom_id": "m", "url": "/v1/chat/completions", "body": {}}).to_string(),
            json!({"custom_id": "u", "method": "POST", "body": {}}).to_string(),
            json!({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions"}).to_string(),
            json!({"custom_id": "w", "method": "POST", "url": "/v1/embeddings", "body": {}})
                .to_string(),
            json!({"custom_id": "s", "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "gpt-4o", "messages": [], "stream": true}})
            .to_string(),
            json!({"custom_id": "nm", "method": "POST", "url": "/v1/chat/completions",
                   "body": {"messages": [{"role": "user", "content": "x"}]}})
            .to_string(),
            json!({"custom_id": "nmsg", "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "gpt-4o"}})
            .to_string(),
            line("unknown-model", "gpt-9"),
            line("first", "gpt-4o"),
            line("first", "gpt-4o"),
            line("other-model", "gpt-4o-mini"),
        ];
        let mut r = rules(Profile::Openai);
        r.max_lines = 100;
        let report = check_file(lines.join("\n").as_bytes(), &r);
        let s = |x: &str| Some(x.to_owned());
        assert_eq!(
            codes(&report),
            vec![
                ("invalid_json_line", None, Some(1)),
                ("missing_required_parameter", s("custom_id"), Some(2)),
                ("missing_required_parameter", s("method"), Some(3)),
                ("missing_required_parameter", s("url"), Some(4)),
                ("missing_required_parameter", s("body"), Some(5)),
                ("invalid_url", s("url"), Some(6)),
                ("streaming_unsupported", s("body.stream"), Some(7)),
                ("invalid_request", s("body.model"), Some(8)),
                ("invalid_request", s("body.messages"), Some(9)),
                ("model_not_found", s("body.model"), Some(10)),
                ("duplicate_custom_id", s("custom_id"), Some(12)),
                ("model_mismatch", s("body.model"), Some(13)),
            ]
        );
        assert_eq!(report.good.len(), 1);
        assert_eq!(report.lines, 13);
    }

    #[test]
    fn file_level_codes() {
        let r = check_file(b"", &rules(Profile::Openai));
        assert_eq!(codes(&r), vec![("empty_file", None, None)]);
        let r = check_file(b"\n  \n", &rules(Profile::Openai));
        assert_eq!(codes(&r), vec![("empty_file", None, None)]);
        let many: Vec<String> = (0..6).map(|i| line(&i.to_string(), "gpt-4o")).collect();
        let r = check_file(many.join("\n").as_bytes(), &rules(Profile::Openai));
        assert_eq!(codes(&r), vec![("too_many_tasks", None, None)]);
    }

    #[test]
    fn the_invalid_marker_fails_only_its_line() {
        let bad = format!(
            "{{\"custom_id\":\"b\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"x {INVALID_MARK}\"}}]}}}}"
        );
        let file = format!(
            "{}\n{bad}\n{}\n",
            line("a", "gpt-4o-mini"),
            line("c", "gpt-4o-mini")
        );
        let report = check_file(file.as_bytes(), &rules(Profile::Openai));
        assert_eq!(
            codes(&report),
            vec![("invalid_request", Some("body.messages".to_owned()), Some(2))]
        );
    }

    #[test]
    fn moonshot_refuses_sampling_parameters() {
        let mut r = rules(Profile::Moonshot);
        r.models = vec![];
        for p in MOONSHOT_FORBIDDEN {
            let mut body =
                json!({"model": "kimi-k2.6", "messages": [{"role": "user", "content": "x"}]});
            body[p] = json!(1);
            let l = json!({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body});
            let report = check_file(l.to_string().as_bytes(), &r);
            assert_eq!(
                codes(&report),
                vec![("invalid_request", Some(format!("body.{p}")), Some(1))]
            );
        }
        // The same line is fine under the OpenAI profile.
        let l = json!({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "kimi-k2.6", "temperature": 0.2, "messages": [{"role": "user", "content": "x"}]}});
        let mut r = rules(Profile::Openai);
        r.models = vec![];
        assert!(check_file(l.to_string().as_bytes(), &r).errors.is_empty());
    }

    #[test]
    fn windows() {
        assert_eq!(parse_window(Profile::Openai, "24h"), Ok(86_400.0));
        assert!(parse_window(Profile::Openai, "1d").is_err());
        assert!(parse_window(Profile::Openai, "48h").is_err());
        assert_eq!(parse_window(Profile::Moonshot, "12h"), Ok(43_200.0));
        assert_eq!(parse_window(Profile::Moonshot, "1d"), Ok(86_400.0));
        assert_eq!(parse_window(Profile::Moonshot, "7d"), Ok(604_800.0));
        assert_eq!(parse_window(Profile::Moonshot, "168h"), Ok(604_800.0));
        for bad in [
            "11h",
            "8d",
            "0d",
            "d",
            "",
            "1w",
            "-1d",
            "1.5d",
            "99999999999999999999d",
        ] {
            assert!(parse_window(Profile::Moonshot, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn metadata_limits() {
        assert!(check_metadata(&json!({"a": "b"})).is_ok());
        assert!(check_metadata(&Value::Null).is_ok());
        let many: Map<String, Value> = (0..17).map(|i| (i.to_string(), json!("v"))).collect();
        assert!(check_metadata(&Value::Object(many)).is_err());
        assert!(check_metadata(&json!({"k".repeat(65): "v"})).is_err());
        assert!(check_metadata(&json!({"k": "v".repeat(513)})).is_err());
        assert!(check_metadata(&json!({"k": 1})).is_err());
        assert!(check_metadata(&json!([1])).is_err());
    }
}
