//! The metrics exposition is well formed and conventionally named, and the
//! Grafana dashboard (`grafana/ferry.json`) charts only metrics Ferry
//! actually exports — and every one of them.
//!
//! The exposition parser is deliberately strict: the text format has few
//! rules, and a scraper that rejects a page rejects all of it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ferry::metrics::Metrics;
use serde_json::Value;

const DASHBOARD: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/ferry.json"));

/// The rows the dashboard is organised in, in order.
const ROWS: &[&str] = &[
    "Traffic",
    "Queues",
    "Batches",
    "Results & latency",
    "Deadlines",
    "Upstream",
    "Webhooks",
    "Savings",
    "Storage",
];

/// Base-name suffixes a histogram may end in: the unit of what it observes.
const HISTOGRAM_UNITS: &[&str] = &["_seconds", "_bytes", "_requests"];

// ---------------------------------------------------------------------------
// The exposition

/// A metric as the text format describes it: `# TYPE` and `# HELP` lines
/// plus its samples (full sample name, labels, value).
#[derive(Debug, Default)]
struct Family {
    kind: String,
    help: Option<String>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

/// Metric families by name.
type Exposition = BTreeMap<String, Family>;

/// Parses the Prometheus text exposition (version 0.0.4) strictly: only
/// `# HELP` and `# TYPE` comments, one TYPE and HELP per family before its
/// samples, every sample belonging to a typed family, families contiguous,
/// no duplicate series.
fn parse_exposition(text: &str) -> Result<Exposition, String> {
    let mut families = Exposition::new();
    let mut finished = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut series = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let at = |msg: String| format!("line {}: {msg}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        let family = if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.trim_start().splitn(3, ' ');
            let (word, name, rest) = (parts.next(), parts.next(), parts.next());
            let name = name.ok_or_else(|| at("comment without a metric name".into()))?;
            check_metric_name(name).map_err(at)?;
            let f = families.entry(name.to_owned()).or_default();
            match word {
                Some("HELP") => {
                    if f.help.is_some() {
                        return Err(at(format!("second HELP for {name}")));
                    }
                    f.help = Some(rest.unwrap_or_default().to_owned());
                }
                Some("TYPE") => {
                    if !f.kind.is_empty() {
                        return Err(at(format!("second TYPE for {name}")));
                    }
                    if !f.samples.is_empty() {
                        return Err(at(format!("TYPE for {name} after its samples")));
                    }
                    let kind = rest.unwrap_or_default();
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(at(format!("unknown type {kind:?}")));
                    }
                    f.kind = kind.to_owned();
                }
                _ => return Err(at("comment other than HELP or TYPE".into())),
            }
            name.to_owned()
        } else {
            let (name, labels, value) = parse_sample(line).map_err(at)?;
            let family = family_of(&families, &name).ok_or_else(|| {
                at(format!(
                    "sample {name} has no TYPE (histograms and summaries \
                     own _bucket/_sum/_count only)"
                ))
            })?;
            let key = format!("{name}{labels:?}");
            if !series.insert(key) {
                return Err(at("duplicate series".into()));
            }
            if let Some(f) = families.get_mut(&family) {
                f.samples.push((name, labels, value));
            }
            family
        };
        if current.as_deref() != Some(family.as_str()) {
            if finished.contains(&family) {
                return Err(at(format!("family {family} is split in two")));
            }
            if let Some(prev) = current.replace(family) {
                finished.insert(prev);
            }
        }
    }
    Ok(families)
}

/// The family a sample name belongs to: itself, or for histograms and
/// summaries the base name of a `_bucket`, `_sum` or `_count` sample.
fn family_of(families: &Exposition, sample: &str) -> Option<String> {
    if families.get(sample).is_some_and(|f| !f.kind.is_empty()) {
        return Some(sample.to_owned());
    }
    for (suffix, kinds) in [
        ("_bucket", &["histogram"][..]),
        ("_sum", &["histogram", "summary"][..]),
        ("_count", &["histogram", "summary"][..]),
    ] {
        if let Some(base) = sample.strip_suffix(suffix)
            && families
                .get(base)
                .is_some_and(|f| kinds.contains(&f.kind.as_str()))
        {
            return Some(base.to_owned());
        }
    }
    None
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    is_name_start(c) || c.is_ascii_digit()
}

fn check_metric_name(name: &str) -> Result<(), String> {
    match name.chars().next() {
        Some(c) if is_name_start(c) && name.chars().all(is_name_char) => Ok(()),
        _ => Err(format!("bad metric name {name:?}")),
    }
}

/// `name{label="value",...} value [timestamp]`.
fn parse_sample(line: &str) -> Result<(String, BTreeMap<String, String>, f64), String> {
    let name_end = line
        .find(|c: char| !is_name_char(c))
        .ok_or("sample without a value")?;
    let name = &line[..name_end];
    check_metric_name(name)?;
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(body) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(body)?;
        labels = parsed;
        rest = after;
    }
    let rest = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let mut fields = rest.split(' ');
    let value = parse_value(fields.next().unwrap_or_default())?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields after the timestamp".into());
    }
    Ok((name.to_owned(), labels, value))
}

/// Parses labels after the `{`; returns them and the text after the `}`.
fn parse_labels(mut s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    loop {
        if let Some(after) = s.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = s.find('=').ok_or("label without '='")?;
        let name = &s[..eq];
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid || name.starts_with("__") {
            return Err(format!("bad label name {name:?}"));
        }
        let mut chars = s[eq + 1..].char_indices();
        if chars.next().map(|(_, c)| c) != Some('"') {
            return Err(format!("label {name} value is not quoted"));
        }
        let mut value = String::new();
        let end = loop {
            match chars.next() {
                None => return Err(format!("label {name} value is not closed")),
                Some((i, '"')) => break eq + 1 + i + 1,
                Some((_, '\\')) => match chars.next().map(|(_, c)| c) {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    other => return Err(format!("bad escape {other:?} in label {name}")),
                },
                Some((_, '\n')) => return Err(format!("raw newline in label {name}")),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} given twice"));
        }
        s = &s[end..];
        s = s.strip_prefix(',').unwrap_or(s);
    }
}

fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => v.parse().map_err(|_| format!("bad sample value {v:?}")),
    }
}

/// Prometheus naming conventions and histogram consistency, one message per
/// problem.
fn convention_problems(families: &Exposition) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, f) in families {
        if f.kind.is_empty() {
            problems.push(format!("{name}: HELP without TYPE"));
        }
        if f.help.as_deref().is_none_or(str::is_empty) {
            problems.push(format!("{name}: no HELP text"));
        }
        if !name.starts_with("ferry_") {
            problems.push(format!("{name}: not in the ferry_ namespace"));
        }
        if f.samples.is_empty() {
            problems.push(format!("{name}: no samples"));
        }
        match f.kind.as_str() {
            "counter" if !name.ends_with("_total") => {
                problems.push(format!("{name}: a counter must end in _total"));
            }
            "gauge" | "histogram" if name.ends_with("_total") => {
                problems.push(format!("{name}: only counters end in _total"));
            }
            _ => {}
        }
        if f.kind == "histogram" {
            if !HISTOGRAM_UNITS.iter().any(|u| name.ends_with(u)) {
                problems.push(format!(
                    "{name}: a histogram's name must end in a unit ({HISTOGRAM_UNITS:?})"
                ));
            }
            problems.extend(histogram_problems(name, f));
        }
    }
    problems
}

/// Each histogram series has cumulative buckets ending in `le="+Inf"`,
/// whose count equals `_count`, and a `_sum`.
fn histogram_problems(name: &str, f: &Family) -> Vec<String> {
    /// One label set's samples.
    #[derive(Default)]
    struct Series {
        /// `(le, cumulative count)` in exposition order.
        buckets: Vec<(f64, f64)>,
        count: Option<f64>,
        has_sum: bool,
    }
    let mut problems = Vec::new();
    let mut series: BTreeMap<BTreeMap<String, String>, Series> = BTreeMap::new();
    for (sample, labels, value) in &f.samples {
        let mut labels = labels.clone();
        let le = labels.remove("le");
        let entry = series.entry(labels).or_default();
        match (sample.strip_prefix(name), le) {
            (Some("_bucket"), Some(le)) => match parse_value(&le) {
                Ok(le) => entry.buckets.push((le, *value)),
                Err(e) => problems.push(format!("{name}: {e}")),
            },
            (Some("_count"), None) => entry.count = Some(*value),
            (Some("_sum"), None) => entry.has_sum = true,
            _ => problems.push(format!("{name}: unexpected sample {sample}")),
        }
    }
    for (labels, s) in series {
        let ordered = s
            .buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1);
        if !ordered {
            problems.push(format!("{name}{labels:?}: buckets not cumulative"));
        }
        match s.buckets.last() {
            Some(&(le, n)) if le == f64::INFINITY && Some(n) == s.count => {}
            _ => problems.push(format!(
                "{name}{labels:?}: last bucket must be +Inf and equal _count"
            )),
        }
        if !s.has_sum {
            problems.push(format!("{name}{labels:?}: no _sum"));
        }
    }
    problems
}

/// Every metric with samples: labelled metrics appear only once a label
/// set has been used, so this touches each of them once.
fn touched_metrics() -> Metrics {
    let m = Metrics::new();
    m.http_requests
        .with_label_values(&["chat", "deferred", "202"])
        .inc();
    m.passthrough_duration.observe(0.01);
    m.intake_duration.observe(0.002);
    for g in [&m.queued_requests, &m.queued_bytes, &m.queue_oldest_age] {
        g.with_label_values(&["emu", "gpt-4o-mini"]).set(1);
    }
    m.flushes.with_label_values(&["emu", "max_wait"]).inc();
    m.batches.with_label_values(&["emu", "created"]).inc();
    m.live_batches.set(1);
    m.batch_size.observe(10.0);
    m.batch_duration.observe(120.0);
    m.requests_finished.with_label_values(&["completed"]).inc();
    m.lane_results.with_label_values(&["flex"]).inc();
    m.escalations.with_label_values(&["flex"]).inc();
    m.deadline_misses.with_label_values(&["standard"]).inc();
    m.spent_twice.with_label_values(&["batch"]).inc();
    m.spent_twice_usd.with_label_values(&["batch"]).inc_by(0.5);
    m.escalations_withheld
        .with_label_values(&["standard_cap"])
        .inc();
    m.flex_unavailable.inc();
    m.accept_to_result.observe(60.0);
    m.waiters.set(1);
    m.upstream_call("emu", "get_batch", "200", Duration::from_millis(3));
    m.upstream_retries.inc();
    m.tokens
        .with_label_values(&["gpt-4o-mini", "chat_completions", "prompt"])
        .inc();
    m.storage_size.set(4096);
    m.storage_flush_duration.observe(0.001);
    m.storage_free.set(1 << 30);
    m.storage_min_free.set(512 << 20);
    m.storage_low_space.with_label_values(&["intake"]).inc();
    m.storage_rows.with_label_values(&["request"]).set(3);
    m.storage_kind_bytes
        .with_label_values(&["request"])
        .set(900);
    m.upstream_backoff_seconds
        .with_label_values(&["emu"])
        .inc_by(0.5);
    m.webhook_deliveries.with_label_values(&["delivered"]).inc();
    m.webhook_outbox_depth.set(0);
    m.savings_usd
        .with_label_values(&["gpt-4o-mini", "chat_completions"])
        .inc_by(0.01);
    m.rate_limited.with_label_values(&["deferred"]).inc();
    m.retention_purged.with_label_values(&["request"]).inc();
    m.retention_slice_duration.observe(0.01);
    m.retention_oldest_terminal_age.set(86_400);
    m
}

// ---------------------------------------------------------------------------
// The dashboard

/// Every panel, rows' nested panels included.
fn all_panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
        for p in panels.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// Every PromQL expression: panel targets and template-variable queries,
/// each with where it came from.
fn queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in all_panels(dashboard) {
        let title = p["title"].as_str().unwrap_or("?");
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default();
            out.push((
                format!("panel {title:?} target {}", t["refId"]),
                expr.to_owned(),
            ));
        }
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] == "query" {
            let q = &v["query"];
            let expr = q["query"].as_str().or(q.as_str()).unwrap_or_default();
            out.push((format!("variable {}", v["name"]), expr.to_owned()));
        }
    }
    out
}

/// Identifiers starting `ferry_` in a PromQL expression, outside string
/// literals (label values such as `"ferry_x"` are not metric names).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut code = String::with_capacity(expr.len());
    let mut quote = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            None if matches!(c, '"' | '\'' | '`') => quote = Some(c),
            None => {
                code.push(c);
                continue;
            }
            Some(_) if escaped => escaped = false,
            Some(q) if c == '\\' && q != '`' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
        }
        code.push(' ');
    }
    let mut names = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("ferry_") {
        let preceded = rest[..i].chars().next_back().is_some_and(is_name_char);
        let len = rest[i..]
            .find(|c: char| !is_name_char(c))
            .unwrap_or(rest.len() - i);
        if !preceded {
            names.insert(rest[i..i + len].to_owned());
        }
        rest = &rest[i + len..];
    }
    names
}

/// A histogram's or summary's series name back to its family name.
fn family_name(metric: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| metric.strip_suffix(s))
        .unwrap_or(metric)
}

/// Everything wrong with a dashboard against an exposition.
fn dashboard_problems(dashboard: &Value, families: &Exposition) -> Vec<String> {
    let mut problems = Vec::new();
    let mut charted = BTreeSet::new();
    for (place, expr) in queries(dashboard) {
        let names = metric_names(&expr);
        if names.is_empty() {
            problems.push(format!("{place}: no ferry_ metric in {expr:?}"));
        }
        for name in names {
            let family = family_name(&name);
            match families.get(family) {
                None => problems.push(format!("{place}: {name} is not exported")),
                // `_bucket` only exists on histograms, `_sum`/`_count` on
                // histograms and summaries.
                Some(f)
                    if name != family && !["histogram", "summary"].contains(&f.kind.as_str()) =>
                {
                    problems.push(format!("{place}: {name} but {family} is a {}", f.kind));
                }
                Some(_) => {
                    charted.insert(family.to_owned());
                }
            }
        }
    }
    for name in families.keys().filter(|n| !charted.contains(*n)) {
        problems.push(format!("{name} is exported but no panel charts it"));
    }
    let rows: Vec<&str> = all_panels(dashboard)
        .into_iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    for row in ROWS {
        if !rows.contains(row) {
            problems.push(format!("no row {row:?}"));
        }
    }
    problems
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn exposition_is_well_formed_and_conventionally_named() {
    let text = touched_metrics().render();
    let families = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(families.len() >= 25, "only {} families", families.len());
    let problems = convention_problems(&families);
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn dashboard_charts_exactly_the_exported_metrics() {
    let families = parse_exposition(&touched_metrics().render()).unwrap();
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("grafana/ferry.json is JSON");
    let problems = dashboard_problems(&dashboard, &families);
    assert!(
        problems.is_empty(),
        "grafana/ferry.json against src/metrics.rs (a new labelled metric must \
         also be touched in touched_metrics()):\n{problems:#?}"
    );
}

#[test]
fn dashboard_is_importable() {
    let d: Value = serde_json::from_str(DASHBOARD).unwrap();
    assert_eq!(d["uid"], "ferry");
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let vars = d["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no template variable {name}"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["upstream", "model"] {
        let def = var(name)["definition"].as_str().unwrap_or_default();
        assert!(def.starts_with("label_values("), "{name}: {def}");
    }
    // Every query goes to the chosen datasource, so no import-time mapping
    // (`__inputs`) is needed.
    let mut ids = BTreeSet::new();
    for p in all_panels(&d) {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id");
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no targets", p["title"]);
        for t in targets.iter().chain([p]) {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        }
    }
}

#[test]
fn the_checks_catch_mistakes() {
    let families = parse_exposition(&touched_metrics().render()).unwrap();

    // A misspelled metric in the dashboard.
    let typo = DASHBOARD.replacen("ferry_queued_bytes", "ferry_queue_bytes", 1);
    let problems = dashboard_problems(&serde_json::from_str(&typo).unwrap(), &families);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("ferry_queue_bytes is not exported")),
        "{problems:#?}"
    );
    // `_bucket` on a counter, and a missing row.
    let wrong = DASHBOARD
        .replacen("ferry_waiters", "ferry_waiters_bucket", 1)
        .replacen("\"title\": \"Storage\"", "\"title\": \"Disk\"", 1);
    let problems = dashboard_problems(&serde_json::from_str(&wrong).unwrap(), &families);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("ferry_waiters is a gauge")),
        "{problems:#?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("no row \"Storage\"")),
        "{problems:#?}"
    );

    // Malformed or unconventional expositions.
    let typed = "# HELP ferry_x_total X.\n# TYPE ferry_x_total counter\n";
    for (bad, why) in [
        ("ferry_x_total 1\n", "no TYPE"),
        (
            &format!("{typed}ferry_x_total 1\nferry_x_total 2\n"),
            "duplicate series",
        ),
        (
            &format!("{typed}ferry_x_total{{a=\"1\" 1\n"),
            "unclosed labels",
        ),
        (
            &format!("{typed}ferry_x_total{{a=1}} 1\n"),
            "unquoted label",
        ),
        (&format!("{typed}ferry_x_total one\n"), "bad value"),
        (
            &format!("{typed}# TYPE ferry_x_total gauge\n"),
            "second TYPE",
        ),
        ("# random comment here\n", "stray comment"),
    ] {
        assert!(parse_exposition(bad).is_err(), "{why} accepted: {bad:?}");
    }
    let split = format!(
        "{typed}ferry_x_total{{a=\"1\"}} 1\n# TYPE ferry_y gauge\nferry_y 1\nferry_x_total{{a=\"2\"}} 1\n"
    );
    assert!(parse_exposition(&split).is_err(), "split family accepted");

    let unconventional = "# HELP ferry_x X.\n# TYPE ferry_x counter\nferry_x 1\n\
        # HELP ferry_lat L.\n# TYPE ferry_lat histogram\n\
        ferry_lat_bucket{le=\"1\"} 2\nferry_lat_bucket{le=\"+Inf\"} 1\nferry_lat_sum 1\nferry_lat_count 1\n";
    let problems = convention_problems(&parse_exposition(unconventional).unwrap());
    for expected in [
        "must end in _total",
        "must end in a unit",
        "buckets not cumulative",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{expected}: {problems:#?}"
        );
    }
}

#[test]
fn metric_names_are_found_in_promql() {
    let names = metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(ferry_a_seconds_bucket{x=\"ferry_\\\"not\"}[5m]))) \
         / my_ferry_b + ferry_c{y='ferry_no'} + ferry_d",
    );
    let expected: BTreeSet<String> = ["ferry_a_seconds_bucket", "ferry_c", "ferry_d"]
        .map(String::from)
        .into();
    assert_eq!(names, expected);
    assert_eq!(family_name("ferry_a_seconds_bucket"), "ferry_a_seconds");
    assert_eq!(
        family_name("ferry_http_requests_total"),
        "ferry_http_requests_total"
    );
}
