//! Deadlines (issue #17) end to end, with the real binary in front of a
//! standalone emulator: `X-Ferry-Deadline`, the tenant's default, and the
//! lane each answer came by.

mod common;

use common::{Backend, Stack, chat, until, until_status};
use serde_json::{Value, json};

/// A deferred call of alice's with `X-Ferry-Deadline: deadline`.
async fn defer_by(s: &Stack, deadline: &str, custom_id: &str) -> reqwest::Response {
    defer_model(s, "gpt-4o-mini", deadline, custom_id, "respond-async").await
}

/// A deferred call of alice's for `model` with `X-Ferry-Deadline` and
/// `Prefer: prefer`.
async fn defer_model(
    s: &Stack,
    model: &str,
    deadline: &str,
    custom_id: &str,
    prefer: &str,
) -> reqwest::Response {
    defer_as(s, "alice-key", model, deadline, custom_id, prefer).await
}

/// [`defer_model`] as the tenant of `key`.
async fn defer_as(
    s: &Stack,
    key: &str,
    model: &str,
    deadline: &str,
    custom_id: &str,
    prefer: &str,
) -> reqwest::Response {
    s.http
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("prefer", prefer)
        .header("x-ferry-custom-id", custom_id)
        .header("x-ferry-deadline", deadline)
        .json(&chat(model, "by when?"))
        .send()
        .await
        .unwrap()
}

/// The upstream table's lines: `gpt-4o-mini` has flex, expected to take
/// 5 s, and no margin, so a deadline under 5 s escalates at once while one
/// of an hour waits for its batch.
const FLEX_UPSTREAM: &str = r#"
flex_models = ["gpt-4o-mini"]
flex_latency_prior_secs = 5
standard_latency_prior_secs = 2
escalation_margin_secs = 0
"#;

/// A stack on `backend` whose emulator serves flex for `gpt-4o-mini`.
async fn flex_stack(backend: Backend) -> Stack {
    let s = Stack::start_on(backend, FLEX_UPSTREAM, "");
    s.emulator_config(json!({"flex_models": ["gpt-4o-mini"]}))
        .await;
    s
}

#[tokio::test]
async fn a_deadline_is_stored_shown_and_refused_when_malformed() {
    let s = Stack::start("", "");
    for bad in ["0", "-1", "soon", "1.5", "86401"] {
        let r = defer_by(&s, bad, "bad").await;
        assert_eq!(r.status(), 400, "{bad}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], "X-Ferry-Deadline", "{bad}");
        assert_eq!(e["error"]["code"], "invalid_deadline", "{bad}");
    }
    // Nothing was stored for the refused calls.
    assert_eq!(s.status("alice-key", "bad", 0).await.0, 404);

    let r = defer_by(&s, "600", "timed").await;
    assert_eq!(r.status(), 202);
    let ticket: Value = r.json().await.unwrap();
    let created = ticket["created_at"].as_u64().unwrap();
    assert_eq!(
        ticket["deadline_at"].as_u64(),
        Some(created + 600),
        "{ticket}"
    );
    assert!(ticket["lane"].is_null(), "no answer yet: {ticket}");

    let r = s
        .defer(
            "alice-key",
            &chat("gpt-4o-mini", "whenever"),
            None,
            Some("untimed"),
        )
        .await;
    let ticket: Value = r.json().await.unwrap();
    assert!(ticket["deadline_at"].is_null(), "{ticket}");

    s.flush().await;
    for id in ["timed", "untimed"] {
        let done = until_status(&s, id, "completed").await;
        assert_eq!(done["lane"], "batch", "{done}");
    }
}

async fn a_deadline_sends_a_queued_request_on_flex_to_its_held_caller(backend: Backend) {
    let s = flex_stack(backend).await;
    // An hour away: it waits for a batch (none is flushed in this test).
    assert_eq!(defer_by(&s, "3600", "later").await.status(), 202);
    let r = defer_model(&s, "gpt-4o-mini", "3", "soon", "respond-async, wait=30").await;
    assert_eq!(r.status(), 200, "the held caller gets the flex answer");
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["object"], "chat.completion", "{answer}");
    assert_eq!(answer["service_tier"], "flex", "{answer}");
    let (_, st) = s.status("alice-key", "soon", 0).await;
    assert_eq!(st["status"], "completed", "{st}");
    assert_eq!(st["lane"], "flex", "{st}");
    assert!(st["batch_id"].is_null(), "no Batch API job: {st}");
    assert_eq!(st["result"]["body"]["service_tier"], "flex", "{st}");
    let (_, later) = s.status("alice-key", "later", 0).await;
    assert_eq!(later["status"], "queued", "{later}");
    let stats = s.emulator_stats().await;
    assert_eq!(stats["lines_submitted"], 0, "{stats}");
    assert_eq!(stats["realtime_requests"], 1, "{stats}");
    let metrics = s.metrics().await;
    for line in [
        r#"ferry_lane_results_total{lane="flex"} 1"#,
        r#"ferry_lane_results_total{lane="batch"} 0"#,
        r#"ferry_escalations_total{lane="flex"} 1"#,
        r#"ferry_escalations_total{lane="standard"} 0"#,
        r#"ferry_deadline_misses_total{lane="flex"} 0"#,
    ] {
        assert!(metrics.contains(line), "{line}");
    }
}

async fn flex_refused_for_capacity_steps_up_to_standard_and_no_flex_model_goes_straight_there(
    backend: Backend,
) {
    let s = flex_stack(backend).await;
    s.emulator_config(json!({"flex_unavailable_rate": 1.0}))
        .await;
    // Every flex call is refused, and a retry would no longer leave
    // standard its 2 s before the 1 s deadline.
    let r = defer_model(&s, "gpt-4o-mini", "1", "refused", "respond-async, wait=30").await;
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["service_tier"], "default", "{answer}");
    let (_, st) = s.status("alice-key", "refused", 0).await;
    assert_eq!(
        (&st["status"], &st["lane"]),
        (&json!("completed"), &json!("standard")),
        "{st}"
    );

    // gpt-4o has no flex: standard at once.
    let r = defer_model(&s, "gpt-4o", "1", "plain", "respond-async, wait=30").await;
    assert_eq!(r.status(), 200);
    let (_, st) = s.status("alice-key", "plain", 0).await;
    assert_eq!(st["lane"], "standard", "{st}");
    let stats = s.emulator_stats().await;
    // One refused flex call and two standard ones; nothing batched.
    assert_eq!(stats["realtime_requests"], 3, "{stats}");
    assert_eq!(stats["lines_submitted"], 0, "{stats}");
    let metrics = s.metrics().await;
    for line in [
        "ferry_flex_unavailable_total 1",
        r#"ferry_escalations_total{lane="flex"} 1"#,
        r#"ferry_escalations_total{lane="standard"} 2"#,
        r#"ferry_lane_results_total{lane="standard"} 2"#,
    ] {
        assert!(metrics.contains(line), "{line}");
    }
}

async fn a_flex_call_cut_short_by_a_crash_is_resumed_on_flex_and_answered_once(backend: Backend) {
    let mut s = flex_stack(backend).await;
    // The flex call hangs until Ferry is killed.
    s.emulator_config(json!({"flex_latency_ms": 60_000})).await;
    assert_eq!(defer_by(&s, "3", "cut").await.status(), 202);
    let st = until_status(&s, "cut", "submitted").await;
    assert!(st["lane"].is_null(), "not answered yet: {st}");
    // The call in flight keeps hanging; the next one is answered at once.
    s.emulator_config(json!({"flex_latency_ms": 0})).await;
    s.restart_ferry();
    let (_, st) = s.status("alice-key", "cut", 30).await;
    assert_eq!(
        (&st["status"], &st["lane"]),
        (&json!("completed"), &json!("flex")),
        "{st}"
    );
    assert_eq!(st["result"]["body"]["service_tier"], "flex", "{st}");
    // Sent twice on flex (the first call's answer never came), never on
    // standard, never in a batch.
    let stats = s.emulator_stats().await;
    assert_eq!(stats["lines_submitted"], 0, "{stats}");
    let done = until(&s, "cut", "completed", |st| st["status"] == "completed").await;
    assert_eq!(done["completed_at"], st["completed_at"], "answered once");
}

#[tokio::test]
async fn a_near_deadline_flushes_its_queue_while_a_batch_can_still_make_it() {
    // A batch is expected back in 2 s; standard takes 1 s, so a request due
    // in 10 s escalates at 9 s: a batch now makes it, the hour-long time
    // threshold would not.
    let s = Stack::start(
        "batch_latency_prior_secs = 2\nstandard_latency_prior_secs = 1\nescalation_margin_secs = 0",
        "",
    );
    let r = defer_model(&s, "gpt-4o-mini", "10", "hurried", "respond-async, wait=30").await;
    assert_eq!(r.status(), 200);
    let (_, st) = s.status("alice-key", "hurried", 0).await;
    assert_eq!(
        (&st["status"], &st["lane"]),
        (&json!("completed"), &json!("batch")),
        "{st}"
    );
    assert!(st["batch_id"].is_string(), "{st}");
    assert!(
        s.metrics()
            .await
            .contains(r#"ferry_flushes_total{reason="deadline",upstream="emu"} 1"#),
        "flushed for the deadline"
    );
    let stats = s.emulator_stats().await;
    assert_eq!(stats["realtime_requests"], 0, "{stats}");
}

/// A price for `gpt-4o-mini`, so discarded answers have a cost: a dollar
/// a token (list), half that in a batch or on flex.
const PRICED: &str = r#"
[prices."gpt-4o-mini"]
prompt_per_mtok = 1000000.0
completion_per_mtok = 1000000.0
"#;

/// Waits until the metrics show `line` (counters move after the answer a
/// caller sees, so this polls the admin port briefly).
async fn until_metric(s: &Stack, line: &str) -> String {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let m = s.metrics().await;
        if m.lines().any(|l| l == line) {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saw {line}:\n{m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The value of the series `name` in `metrics`.
fn series(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name}"))
}

/// A stack whose emulator serves flex for `gpt-4o-mini` and holds every
/// batch `validating` for an hour of its clock.
async fn held_batch_stack(backend: Backend) -> Stack {
    let s = Stack::start_on(backend, &format!("{FLEX_UPSTREAM}{PRICED}"), "");
    s.emulator_config(json!({"flex_models": ["gpt-4o-mini"], "validating_seconds": 3600}))
        .await;
    s
}

/// Defers `custom_id` with a 7 s deadline, held for its answer, and
/// flushes it into a batch as soon as it is queued: flex (5 s, no margin)
/// is due 2 s after acceptance, while the batch is held upstream.
async fn defer_held_into_a_batch(s: &Stack, custom_id: &str) -> reqwest::Response {
    let held = defer_model(s, "gpt-4o-mini", "7", custom_id, "respond-async, wait=30");
    let flush = async {
        until_status(s, custom_id, "queued").await;
        s.flush().await;
    };
    tokio::join!(held, flush).0
}

async fn a_request_in_a_held_batch_is_answered_on_flex_and_its_batch_line_discarded(
    backend: Backend,
) {
    let s = held_batch_stack(backend).await;
    let r = defer_held_into_a_batch(&s, "held").await;
    assert_eq!(r.status(), 200, "the held caller gets the flex answer");
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["service_tier"], "flex", "{answer}");
    let (_, st) = s.status("alice-key", "held", 0).await;
    assert_eq!(
        (&st["status"], &st["lane"]),
        (&json!("completed"), &json!("flex")),
        "{st}"
    );
    assert!(
        st["batch_id"].is_null(),
        "answered by no Batch API job: {st}"
    );

    // The batch finishes after all: its line for the request is paid for
    // and thrown away.
    let r = s
        .http
        .post(s.emu("/_emulator/clock"))
        .json(&json!({"advance_seconds": 4000}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    s.until_no_live_batches().await;
    let metrics = until_metric(&s, r#"ferry_spent_twice_total{lane="batch"} 1"#).await;
    for line in [
        r#"ferry_spent_twice_total{lane="flex"} 0"#,
        r#"ferry_escalations_total{lane="flex"} 1"#,
        r#"ferry_lane_results_total{lane="flex"} 1"#,
        r#"ferry_lane_results_total{lane="batch"} 0"#,
        r#"ferry_deadline_misses_total{lane="flex"} 0"#,
    ] {
        assert!(metrics.contains(line), "{line}");
    }
    assert!(
        series(&metrics, r#"ferry_spent_twice_usd_total{lane="batch"}"#) > 0.0,
        "the discarded line has a cost"
    );
    let (_, after) = s.status("alice-key", "held", 0).await;
    assert_eq!(after["lane"], "flex", "{after}");
    assert_eq!(after["completed_at"], st["completed_at"], "answered once");
    assert_eq!(after["result"]["body"]["service_tier"], "flex", "{after}");
    let stats = s.emulator_stats().await;
    assert_eq!(stats["lines_submitted"], 1, "{stats}");
    assert_eq!(stats["realtime_requests"], 1, "{stats}");
}

async fn a_batch_that_answers_during_the_flex_call_wins_and_the_flex_answer_is_discarded(
    backend: Backend,
) {
    let s = held_batch_stack(backend).await;
    s.emulator_config(json!({"flex_latency_ms": 8000})).await;
    let held = defer_held_into_a_batch(&s, "raced");
    let release = async {
        // Once the flex call is under way, the batch finishes.
        until_metric(&s, r#"ferry_escalations_total{lane="flex"} 1"#).await;
        let r = s
            .http
            .post(s.emu("/_emulator/clock"))
            .json(&json!({"advance_seconds": 4000}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    };
    let (r, ()) = tokio::join!(held, release);
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(
        answer["service_tier"], "default",
        "the batch's answer: {answer}"
    );
    let metrics = until_metric(&s, r#"ferry_spent_twice_total{lane="flex"} 1"#).await;
    for line in [
        r#"ferry_spent_twice_total{lane="batch"} 0"#,
        r#"ferry_lane_results_total{lane="batch"} 1"#,
        r#"ferry_lane_results_total{lane="flex"} 0"#,
    ] {
        assert!(metrics.contains(line), "{line}");
    }
    let (_, st) = s.status("alice-key", "raced", 0).await;
    assert_eq!(
        (&st["status"], &st["lane"]),
        (&json!("completed"), &json!("batch")),
        "{st}"
    );
    assert!(st["batch_id"].is_string(), "{st}");
}

/// The tokens an answer's `usage` counts.
fn used(answer: &Value) -> f64 {
    let usage = &answer["usage"];
    let tokens = usage["prompt_tokens"].as_f64().unwrap_or(0.0)
        + usage["completion_tokens"].as_f64().unwrap_or(0.0);
    assert!(tokens > 0.0, "{answer}");
    tokens
}

/// The sum of every `ferry_tokens_total` series of `model`.
fn tokens_of(metrics: &str, model: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("ferry_tokens_total{") && l.contains(&format!("model=\"{model}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The sum of every `ferry_estimated_savings_usd_total` series of `model`.
fn savings_of(metrics: &str, model: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("ferry_estimated_savings_usd_total{")
                && l.contains(&format!("model=\"{model}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn savings_count_the_kept_answer_once_and_nothing_for_standard() {
    // Both models priced at a dollar a token; gpt-4o-mini has flex,
    // gpt-4o only standard (2 s, no margin). Every batch is held upstream.
    let s = Stack::start_on(
        Backend::Sled,
        &format!(
            "{FLEX_UPSTREAM}{PRICED}\n[prices.\"gpt-4o\"]\nprompt_per_mtok = 1000000.0\ncompletion_per_mtok = 1000000.0\n"
        ),
        "",
    );
    s.emulator_config(json!({"flex_models": ["gpt-4o-mini"], "validating_seconds": 3600}))
        .await;
    // gpt-4o, due in 4 s: flushed into a held batch, then on standard at 2 s.
    let held = defer_model(&s, "gpt-4o", "4", "std", "respond-async, wait=30");
    let flush = async {
        until_status(&s, "std", "queued").await;
        s.flush().await;
    };
    let r = tokio::join!(held, flush).0;
    assert_eq!(r.status(), 200);
    let standard_tokens = used(&r.json().await.unwrap());
    let (_, st) = s.status("alice-key", "std", 0).await;
    assert_eq!(st["lane"], "standard", "{st}");
    // gpt-4o-mini, due in 7 s: flushed into a held batch, then on flex.
    let r = defer_held_into_a_batch(&s, "flex").await;
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["service_tier"], "flex", "{answer}");
    let tokens = used(&answer);
    until_metric(&s, r#"ferry_lane_results_total{lane="flex"} 1"#).await;
    // The kept answers count at once: the flex one saved half its list
    // price, the standard one nothing.
    let before = s.metrics().await;
    assert_eq!(tokens_of(&before, "gpt-4o-mini"), tokens, "flex tokens");
    assert_eq!(
        savings_of(&before, "gpt-4o-mini"),
        tokens * 0.5,
        "flex saving"
    );
    assert_eq!(
        tokens_of(&before, "gpt-4o"),
        standard_tokens,
        "standard tokens"
    );
    assert_eq!(savings_of(&before, "gpt-4o"), 0.0, "standard saves nothing");

    // Both batches finish: their lines are discarded, counted as spent
    // twice and not as tokens or savings.
    let r = s
        .http
        .post(s.emu("/_emulator/clock"))
        .json(&json!({"advance_seconds": 4000}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    s.until_no_live_batches().await;
    let after = until_metric(&s, r#"ferry_spent_twice_total{lane="batch"} 2"#).await;
    assert_eq!(tokens_of(&after, "gpt-4o-mini"), tokens, "tokens once");
    assert_eq!(tokens_of(&after, "gpt-4o"), standard_tokens, "tokens once");
    assert_eq!(savings_of(&after, "gpt-4o-mini"), tokens * 0.5);
    assert_eq!(savings_of(&after, "gpt-4o"), 0.0);
}

async fn an_escalation_out_of_a_batch_cut_short_by_a_crash_resumes_and_is_not_repeated(
    backend: Backend,
) {
    let mut s = held_batch_stack(backend).await;
    // The flex call hangs until Ferry is killed.
    s.emulator_config(json!({"flex_latency_ms": 60_000})).await;
    let r = defer_model(&s, "gpt-4o-mini", "7", "cut", "respond-async").await;
    assert_eq!(r.status(), 202);
    until_status(&s, "cut", "queued").await;
    s.flush().await;
    until_metric(&s, r#"ferry_escalations_total{lane="flex"} 1"#).await;
    s.emulator_config(json!({"flex_latency_ms": 0})).await;
    s.restart_ferry();
    let (_, st) = s.status("alice-key", "cut", 30).await;
    assert_eq!(
        (&st["status"], &st["lane"]),
        (&json!("completed"), &json!("flex")),
        "{st}"
    );
    // Resumed on flex from what was recorded: not escalated again.
    let metrics = s.metrics().await;
    for line in [
        r#"ferry_escalations_total{lane="flex"} 0"#,
        r#"ferry_escalations_total{lane="standard"} 0"#,
    ] {
        assert!(metrics.contains(line), "{line}");
    }
    let r = s
        .http
        .post(s.emu("/_emulator/clock"))
        .json(&json!({"advance_seconds": 4000}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    s.until_no_live_batches().await;
    until_metric(&s, r#"ferry_spent_twice_total{lane="batch"} 1"#).await;
    let (_, after) = s.status("alice-key", "cut", 0).await;
    assert_eq!(after["completed_at"], st["completed_at"], "answered once");
    assert_eq!(after["lane"], "flex", "{after}");
    // The resumed flex call, and the one cut short if the emulator counted
    // it before Ferry died (documented: a call cut short may be paid
    // twice); one batch line.
    let stats = s.emulator_stats().await;
    let calls = stats["realtime_requests"].as_u64().unwrap();
    assert!((1..=2).contains(&calls), "{stats}");
    assert_eq!(stats["lines_submitted"], 1, "{stats}");
}

/// Two more tenants: one that never pays full price, one allowed a
/// single standard call an hour.
const LANE_TENANTS: &str = r#"
[[tenants]]
name = "nightly"
keys = ["nightly-key"]
lanes = ["batch", "flex"]

[[tenants]]
name = "capped"
keys = ["capped-key"]
max_standard_per_hour = 1
"#;

#[tokio::test]
async fn a_tenants_lanes_and_standard_cap_keep_requests_on_cheaper_lanes() {
    let s = Stack::start(&format!("{FLEX_UPSTREAM}{LANE_TENANTS}"), "");
    s.emulator_config(json!({"flex_models": ["gpt-4o-mini"]}))
        .await;
    // gpt-4o has no flex and nightly takes no standard: it stays queued.
    let r = defer_as(&s, "nightly-key", "gpt-4o", "1", "n", "respond-async").await;
    assert_eq!(r.status(), 202);
    until_metric(&s, r#"ferry_escalations_withheld_total{reason="lanes"} 1"#).await;
    // Its flex model still goes flex.
    let r = defer_as(
        &s,
        "nightly-key",
        "gpt-4o-mini",
        "1",
        "nf",
        "respond-async, wait=30",
    )
    .await;
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["service_tier"], "flex", "{answer}");

    // capped: one standard call this hour, then none.
    let r = defer_as(
        &s,
        "capped-key",
        "gpt-4o",
        "1",
        "c1",
        "respond-async, wait=30",
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = defer_as(&s, "capped-key", "gpt-4o", "1", "c2", "respond-async").await;
    assert_eq!(r.status(), 202);
    until_metric(
        &s,
        r#"ferry_escalations_withheld_total{reason="standard_cap"} 1"#,
    )
    .await;
    for (key, id) in [("nightly-key", "n"), ("capped-key", "c2")] {
        let (_, st) = s.status(key, id, 0).await;
        assert_eq!(st["status"], "queued", "{id}: {st}");
    }
    let (_, c1) = s.status("capped-key", "c1", 0).await;
    assert_eq!(c1["lane"], "standard", "{c1}");
    let stats = s.emulator_stats().await;
    assert_eq!(
        stats["realtime_requests"], 2,
        "one flex, one standard: {stats}"
    );
    let metrics = s.metrics().await;
    for line in [
        r#"ferry_escalations_total{lane="standard"} 1"#,
        r#"ferry_escalations_total{lane="flex"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line}");
    }
    // A flush still answers them, by batch (late: counted as misses).
    s.flush().await;
    for (key, id) in [("nightly-key", "n"), ("capped-key", "c2")] {
        let (_, st) = s.status(key, id, 30).await;
        assert_eq!(
            (&st["status"], &st["lane"]),
            (&json!("completed"), &json!("batch")),
            "{id}: {st}"
        );
    }
}

/// The secret OpenAI signs this test's batch events with.
const EVENTS_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Posts a batch event to Ferry's events route, signed with `secret`
/// (Standard Webhooks, as OpenAI signs them); `None` posts it unsigned.
async fn post_event(s: &Stack, body: &Value, secret: Option<&str>) -> reqwest::Response {
    let body = body.to_string();
    let mut req = s
        .http
        .post(s.url("/openai/events"))
        .header("content-type", "application/json");
    if let Some(secret) = secret {
        let key = ferry::delivery::webhooks::decode_secret(secret).unwrap();
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let signature = ferry::delivery::webhooks::sign(&key, "msg_1", ts, &body);
        req = req
            .header("webhook-id", "msg_1")
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature);
    }
    req.body(body).send().await.unwrap()
}

/// A stack polling its batches hourly, that takes batch events on
/// `/openai/events`, with `evt` submitted in a batch the emulator holds
/// `validating` and polled once already (the first poll comes within a
/// second); returns the stack and the upstream batch id.
async fn events_stack() -> (Stack, String) {
    let s = Stack::start(
        &format!(
            "poll_interval_secs = 3600\nlost_after_secs = 36000\n\
             batch_events_path = \"/openai/events\"\n\
             batch_events_secret = \"{EVENTS_SECRET}\""
        ),
        "",
    );
    s.emulator_config(json!({"validating_seconds": 3600})).await;
    let r = s
        .defer("alice-key", &chat("gpt-4o-mini", "hi"), None, Some("evt"))
        .await;
    assert_eq!(r.status(), 202);
    s.flush().await;
    let st = until_status(&s, "evt", "submitted").await;
    let batch_id = st["batch_id"].as_str().unwrap().to_owned();
    let calls = |stats: &Value| stats["api_calls"].as_u64().unwrap();
    let before = calls(&s.emulator_stats().await);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while calls(&s.emulator_stats().await) <= before {
        assert!(tokio::time::Instant::now() < deadline, "never polled");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    (s, batch_id)
}

/// Ends every batch the emulator holds: its clock moves past them.
async fn end_batches(s: &Stack) {
    let r = s
        .http
        .post(s.emu("/_emulator/clock"))
        .json(&json!({"advance_seconds": 4000}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
}

#[tokio::test]
async fn a_batch_event_makes_the_driver_poll_at_once() {
    // An hour between polls: only the event can bring the result in time.
    let (s, batch_id) = events_stack().await;
    end_batches(&s).await;
    let event = json!({"id": "evt_1", "object": "event", "type": "batch.completed",
                       "created_at": 1, "data": {"id": batch_id}});
    // Unsigned, or signed with another secret: refused, nothing polled.
    let refused =
        |code: &'static str| move |body: Value| assert_eq!(body["error"]["code"], code, "{body}");
    let r = post_event(&s, &event, None).await;
    assert_eq!(r.status(), 400);
    refused("invalid_event")(r.json().await.unwrap());
    let other = "whsec_dGhpcyBpcyBub3QgdGhlIHNlY3JldA==";
    let r = post_event(&s, &event, Some(other)).await;
    assert_eq!(r.status(), 401);
    refused("invalid_signature")(r.json().await.unwrap());
    let (_, st) = s.status("alice-key", "evt", 0).await;
    assert_eq!(st["status"], "submitted", "{st}");
    // Signed: the driver polls now and the result arrives.
    let r = post_event(&s, &event, Some(EVENTS_SECRET)).await;
    assert_eq!(r.status(), 200);
    let (_, st) = s.status("alice-key", "evt", 20).await;
    assert_eq!(st["status"], "completed", "{st}");
}

#[tokio::test]
async fn the_emulator_pushes_signed_batch_events_and_ferry_polls_at_once() {
    // The emulator announces the end of the batch to Ferry's route itself.
    let (s, _) = events_stack().await;
    s.emulator_config(json!({
        "events_url": s.url("/openai/events"),
        "events_secret": EVENTS_SECRET,
    }))
    .await;
    end_batches(&s).await;
    let (_, st) = s.status("alice-key", "evt", 20).await;
    assert_eq!(st["status"], "completed", "{st}");
}

on_both_backends!(
    a_request_in_a_held_batch_is_answered_on_flex_and_its_batch_line_discarded,
    an_escalation_out_of_a_batch_cut_short_by_a_crash_resumes_and_is_not_repeated,
    a_batch_that_answers_during_the_flex_call_wins_and_the_flex_answer_is_discarded,
    a_deadline_sends_a_queued_request_on_flex_to_its_held_caller,
    flex_refused_for_capacity_steps_up_to_standard_and_no_flex_model_goes_straight_there,
    a_flex_call_cut_short_by_a_crash_is_resumed_on_flex_and_answered_once,
);
