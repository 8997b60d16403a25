//! Deadlines: answered in time, and what it cost (issue #17, figure D). A
//! mixed workload of deferred calls with deadlines spread from about an
//! hour to a day, against an emulator whose batches take a drawn time, and
//! two references run beside it on stacks of their own: the same calls
//! without deadlines (all batch) and relayed in real time (all standard).
//!
//! ```sh
//! cargo bench --bench load -- --only deadlines
//! ```
//!
//! **Time is scaled down 1,440 ×** (a day is 60 s), every duration alike:
//! Ferry's deadlines (whole seconds, 2..60 s here: 48 min to 24 h), its
//! lane priors and margin, the poll interval and `max_wait_secs`, the
//! emulator's batch turnaround (log-normal, median 2.5 s = 1 h, spread 1:
//! half of batches between 1.3 s and 5 s, 32 min to 2 h; one in twenty over
//! 13 s, 5 h), its 24 h window (`expire_after_seconds = 60`) and the flex
//! latency (0.1 s, 2.4 min). Nothing here depends on the scale but the
//! whole-second deadlines: the shortest is 2 s (48 min).
//!
//! `FERRY_BENCH_DEADLINE_CALLS` calls (default 1,000) arrive evenly over
//! 10 s (4 h), one in two of a model with flex (`gpt-5-mini`), the other
//! without (`gpt-4o-mini`), each deadline drawn log-uniformly. A call is
//! held (`Prefer: respond-async, wait=300`) and is *answered in time* when
//! the caller has the result within its deadline of sending it, measured by
//! the caller (the status object's times are whole seconds, 24 min here).
//! The lane of each answer is its status object's `lane`.
//!
//! Cost: each answer's tokens (its `usage`) at the prices below (written
//! into Ferry's `[prices]` too, so its `ferry_spent_twice_usd_total` uses
//! the same table), priced by [`lane_cost`] (batch and flex at the 50 %
//! batch discount, standard at list), plus Ferry's money spent twice; over
//! the all-standard run's cost of the same calls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::batch::lanes::lane_cost;
use ferry::store::Lane;
use serde_json::Value;

use super::{
    Opts, Proc, Rows, TENANT_KEY, chat_body, emulator, ferry, ferry_config, http, metric_sum,
    metrics, scatter, workdir,
};

const FIGURE: &str = "D deadlines: answered in time, and what it cost";
/// Real seconds per scaled second: a day is 60 s.
const SCALE: f64 = 1440.0;
/// The deadlines' range in (scaled) seconds: 48 min to 24 h.
const DEADLINES: (f64, f64) = (2.0, 60.0);
/// The calls arrive evenly over this many seconds (4 h).
const ARRIVALS_SECS: f64 = 10.0;
/// OpenAI's batch discount, Ferry's default for an `openai` upstream.
const BATCH_DISCOUNT: f64 = 0.5;
/// Model, prompt and completion list prices in USD per million tokens
/// (OpenAI's list when written). The first has flex, the second not.
const MODELS: [(&str, f64, f64); 2] = [("gpt-5-mini", 0.25, 2.00), ("gpt-4o-mini", 0.15, 0.60)];

/// The emulator of every case: the same draws for the same batch ranks.
fn emulator_args() -> Vec<String> {
    let day = 86_400.0 / SCALE;
    [
        "--turnaround-median-seconds",
        &(3_600.0 / SCALE).to_string(),
        "--turnaround-spread",
        "1",
        "--seed",
        "17",
        "--expire-after-seconds",
        &day.to_string(),
        "--flex-models",
        MODELS[0].0,
        "--flex-latency-ms",
        &((144.0 / SCALE * 1000.0) as u64).to_string(),
        "--flex-unavailable-rate",
        "0.05",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The upstream keys, every duration divided by [`SCALE`]: a batch is
/// expected in 1 h, flex in 10 min, standard in 1 min, 30 s of margin; a
/// queue waits at most 24 min; a batch is polled every 6 min.
fn upstream() -> String {
    let s = |secs: f64| secs / SCALE;
    format!(
        "max_requests = 1000\nmax_wait_secs = {}\npoll_interval_secs = {}\ncalls_per_second = 1000\n\
         flex_models = [\"{}\"]\nbatch_latency_prior_secs = {}\nflex_latency_prior_secs = {}\n\
         standard_latency_prior_secs = {}\nescalation_margin_secs = {}\n",
        s(1_440.0),
        s(360.0),
        MODELS[0].0,
        s(3_600.0),
        s(600.0),
        s(60.0),
        s(30.0),
    )
}

fn prices() -> String {
    MODELS
        .iter()
        .map(|(m, p, c)| {
            format!("\n[prices.\"{m}\"]\nprompt_per_mtok = {p}\ncompletion_per_mtok = {c}\n")
        })
        .collect()
}

/// One call of the workload.
#[derive(Clone, Copy)]
struct Call {
    model: usize,
    /// Seconds after the start at which it is sent.
    at: f64,
    /// Its deadline in whole seconds.
    deadline: u64,
}

fn workload(n: u64) -> Vec<Call> {
    let (lo, hi) = DEADLINES;
    (0..n)
        .map(|i| {
            let u = scatter(i, 10_007) as f64 / 10_007.0;
            Call {
                model: (scatter(i ^ 0x5bd1, 2)) as usize,
                at: ARRIVALS_SECS * i as f64 / n as f64,
                deadline: (lo * (hi / lo).powf(u)).round() as u64,
            }
        })
        .collect()
}

/// How the calls are sent.
#[derive(Clone, Copy, PartialEq)]
enum Case {
    /// Deferred with `X-Ferry-Deadline`.
    Deadlines,
    /// Deferred without a deadline.
    AllBatch,
    /// Relayed in real time.
    AllStandard,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Deadlines => "with deadlines",
            Case::AllBatch => "all batch (no deadline)",
            Case::AllStandard => "all standard (passthrough)",
        }
    }
}

/// What one call came back with.
struct Answer {
    /// Seconds from sending to the answer, `None` if none came (or not 200).
    secs: Option<f64>,
    /// Its cost at list price (USD), from its `usage`.
    list: f64,
    lane: Option<Lane>,
}

/// What a case's stack measured.
struct Run {
    answers: Vec<Answer>,
    spent_twice: f64,
    spent_twice_usd: f64,
    misses: f64,
}

impl Run {
    fn cost(&self) -> f64 {
        let answered: f64 = self
            .answers
            .iter()
            .map(|a| lane_cost(a.list, a.lane.unwrap_or(Lane::Batch), BATCH_DISCOUNT))
            .sum();
        answered + self.spent_twice_usd
    }
}

pub async fn deadlines(o: &Opts, rows: &mut Rows) {
    let n: u64 = std::env::var("FERRY_BENCH_DEADLINE_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    eprintln!("== {FIGURE}: {n} calls, time scaled {SCALE} × (a day is 60 s)");
    let calls = Arc::new(workload(n));
    let (with, batch, standard) = tokio::join!(
        run(o, Case::Deadlines, calls.clone()),
        run(o, Case::AllBatch, calls.clone()),
        run(o, Case::AllStandard, calls.clone()),
    );
    let reference = standard.cost();
    for (case, r) in [
        (Case::Deadlines, &with),
        (Case::AllBatch, &batch),
        (Case::AllStandard, &standard),
    ] {
        let in_time = r
            .answers
            .iter()
            .zip(calls.iter())
            .filter(|(a, c)| a.secs.is_some_and(|s| s <= c.deadline as f64))
            .count();
        let unanswered = r.answers.iter().filter(|a| a.secs.is_none()).count();
        if unanswered > 0 {
            eprintln!("  !! {}: {unanswered} calls not answered 200", case.name());
        }
        let name = case.name();
        rows.add(
            FIGURE,
            format!("{name}: answered by the deadline"),
            in_time as f64 / n as f64 * 100.0,
            "%",
        );
        rows.add(
            FIGURE,
            format!("{name}: cost relative to all standard"),
            r.cost() / reference * 100.0,
            "%",
        );
        // In unscaled minutes: how late the latest answer past its deadline was.
        let late = r
            .answers
            .iter()
            .zip(calls.iter())
            .filter_map(|(a, c)| Some(a.secs? - c.deadline as f64))
            .fold(0.0_f64, f64::max);
        rows.add(
            FIGURE,
            format!("{name}: latest answer past its deadline (unscaled)"),
            late * SCALE / 60.0,
            "min",
        );
        if case != Case::AllStandard {
            for lane in [Lane::Batch, Lane::Flex, Lane::Standard] {
                let k = r.answers.iter().filter(|a| a.lane == Some(lane)).count();
                rows.add(
                    FIGURE,
                    format!("{name}: answered on {}", lane.as_str()),
                    k as f64 / n as f64 * 100.0,
                    "%",
                );
            }
        }
    }
    rows.add(
        FIGURE,
        "with deadlines: answers spent twice (paid, discarded)",
        with.spent_twice,
        "",
    );
    rows.add(
        FIGURE,
        "with deadlines: money spent twice, relative to all standard",
        with.spent_twice_usd / reference * 100.0,
        "%",
    );
    rows.add(
        FIGURE,
        "with deadlines: Ferry's deadline misses (ferry_deadline_misses_total)",
        with.misses,
        "",
    );
}

/// Starts a stack of its own for `case`, sends the calls on their schedule
/// and collects the answers, their lanes and Ferry's spent-twice metrics.
async fn run(o: &Opts, case: Case, calls: Arc<Vec<Call>>) -> Run {
    let dir = workdir();
    let args = emulator_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _emu: Proc = emulator(o, dir.path(), &args);
    let mut cfg = ferry_config(
        &dir.path().join("data"),
        _emu.addr("emulator"),
        "",
        &upstream(),
    );
    cfg.push_str(&prices());
    let fer = ferry(o, dir.path(), &cfg);
    let addr = fer.addr("proxy");
    let client = http();
    let start = Instant::now();
    let tasks: Vec<_> = calls
        .iter()
        .enumerate()
        .map(|(i, call)| {
            let client = client.clone();
            let call = *call;
            tokio::spawn(async move {
                let due = start + Duration::from_secs_f64(call.at);
                tokio::time::sleep_until(due.into()).await;
                let (model, prompt, completion) = MODELS[call.model];
                let mut req = client
                    .post(format!("http://{addr}/v1/chat/completions"))
                    .header("authorization", format!("Bearer {TENANT_KEY}"))
                    .header("content-type", "application/json")
                    .body(chat_body(model, 300));
                if case != Case::AllStandard {
                    req = req
                        .header("prefer", "respond-async, wait=300")
                        .header("x-ferry-custom-id", format!("d{i}"));
                }
                if case == Case::Deadlines {
                    req = req.header("x-ferry-deadline", call.deadline.to_string());
                }
                let sent = Instant::now();
                let answer = match req.send().await {
                    Ok(r) if r.status() == 200 => r.json::<Value>().await.ok(),
                    _ => None,
                };
                let secs = answer.as_ref().map(|_| sent.elapsed().as_secs_f64());
                let usage = answer.as_ref().map(|a| &a["usage"]);
                let tokens = |k: &str| usage.and_then(|u| u[k].as_f64()).unwrap_or(0.0);
                let list = (tokens("prompt_tokens") * prompt
                    + tokens("completion_tokens") * completion)
                    / 1e6;
                (secs, list)
            })
        })
        .collect();
    let mut answers = Vec::with_capacity(calls.len());
    for (i, t) in tasks.into_iter().enumerate() {
        let (secs, list) = t.await.unwrap_or((None, 0.0));
        let lane = match case {
            Case::AllStandard => Some(Lane::Standard),
            _ => lane_of(&client, addr, i).await,
        };
        answers.push(Answer { secs, list, lane });
    }
    let m = metrics(fer.addr("admin")).await;
    eprintln!(
        "  {}: {:.1} s, Ferry pid {}",
        case.name(),
        start.elapsed().as_secs_f64(),
        fer.pid()
    );
    Run {
        answers,
        spent_twice: metric_sum(&m, "ferry_spent_twice_total", ""),
        spent_twice_usd: metric_sum(&m, "ferry_spent_twice_usd_total", ""),
        misses: metric_sum(&m, "ferry_deadline_misses_total", ""),
    }
}

/// The lane in call `i`'s status object.
async fn lane_of(client: &reqwest::Client, addr: std::net::SocketAddr, i: usize) -> Option<Lane> {
    let status: Value = client
        .get(format!("http://{addr}/v1/ferry/requests/d{i}"))
        .header("authorization", format!("Bearer {TENANT_KEY}"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Lane::parse(status["lane"].as_str()?)
}
