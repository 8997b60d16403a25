//! The crash harness: the real `ferry` binary under load in front of the
//! emulator, killed with SIGKILL at random moments and restarted on the same
//! data dir, many times. The load mixes both API families through the same
//! Ferry: two in three calls are OpenAI chat completions (Batch API batches
//! upstream), one in three Claude `/v1/messages` calls (Message Batches, on a
//! second, `kind = "anthropic"`, upstream on the same emulator). It runs on three shapes, one test each: a standalone
//! emulator that outlives every kill; Ferry's embedded default, where the
//! emulator lives in Ferry's process, dies with it and comes back from its
//! own state under `<data_dir>/emulator` (on a new port each time); and a
//! standalone emulator with Ferry on PostgreSQL. Each kill aims, in turn, at intake, a
//! flush (upload, create), polling and result ingestion: it falls at a
//! random time, waits for that phase to be going on (read from Ferry's JSON
//! log, or the clients' calls in flight), then a random instant more. At the
//! end, against Ferry's status routes and the emulator's stats:
//!
//! 1. every request that got a `202` is `completed` with its own answer
//!    (the emulator answers `echo: <prompt>`, and every prompt is unique;
//!    a chat answer's `choices[0].message.content`, a Claude answer's
//!    `content[0].text`);
//! 2. nothing ran upstream twice, and
//! 3. nothing was sent in two batches: no faults are injected, so nothing is
//!    legitimately sent again (lines submitted == distinct requests, and
//!    that is exactly the number of requests Ferry holds), per family.
//!    Both count by Ferry's request, not by custom id: a chat line's custom
//!    id is the request, but a Claude one's carries Ferry's batch number
//!    (`f<instance>-<batch>-<request>`), so the emulator's stats, which count
//!    by custom id, would not see a Claude request sent in two batches. The
//!    harness reads every Message Batch's results and counts those by the
//!    last segment; the chat lines are the rest of the emulator's counts;
//! 4. every batch finishes (`ferry_live_batches` drops to 0) and no
//!    `purpose=batch` input file is left upstream;
//! 5. one chat request in four carries `X-Ferry-Deadline` (1 or 2 s, a
//!    third upstream, see [`RUSH_MODELS`]): it is answered on a lane its
//!    policy allows, with that lane's answer, and is in at most one batch
//!    (one answered in real time may have left its queue before any);
//!    by the emulator's `realtime_answers_by_prompt` (standalone and
//!    PostgreSQL shapes), only such a request is sent in real time, only
//!    on its model's lane, at most once plus once per kill.
//!
//! A call cut off by a kill may have been stored without its `202` reaching
//! the client: such a request is not counted as accepted, but if Ferry has it
//! it must complete like any other, and it must not break 2 or 3. Half the
//! failed calls are retried with the same custom id (an idempotent retry).
//!
//! Size and seed come from the environment: `FERRY_CRASH_CYCLES` (kills,
//! default 4), `FERRY_CRASH_REQUESTS` (requests per kill, default 150),
//! `FERRY_CRASH_RATE` (requests per second, default 100; the run lasts about
//! cycles × requests / rate), `FERRY_CRASH_SEED` (default random, printed;
//! it fixes the kill schedule, not the timing of everything else),
//! `FERRY_CRASH_KEEP=1` (keep the temp dir with every log; it is always kept
//! on failure). They apply to every shape; the tests run one after the
//! other. A long run of one shape (about 17 minutes):
//!
//! ```sh
//! FERRY_CRASH_CYCLES=500 FERRY_CRASH_REQUESTS=400 FERRY_CRASH_RATE=200 \
//!     cargo test --release --test crash -- --nocapture embedded
//! ```

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use common::{Backend, Stack, chat};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::MissedTickBehavior;

/// Requests alternate between two tenants and two models of each API family
/// (four queues, so batches of all overlap); every third request is a Claude
/// call (`/v1/messages`, a Message Batch upstream), the rest chat calls.
const KEYS: [&str; 2] = ["alice-key", "bob-key"];
const MODELS: [&str; 2] = ["gpt-4o-mini", "gpt-4o"];
const CLAUDE_MODELS: [&str; 2] = ["claude-haiku-4-5", "claude-sonnet-4-6"];
/// Concurrent client tasks.
const CLIENTS: usize = 8;
/// A client whose call failed (Ferry down) sends the same call again, with
/// the same custom id, with this probability; else it gives the id up.
const RETRY_PROBABILITY: f64 = 0.5;
/// Tries of one call before a client gives its id up.
const MAX_TRIES: u32 = 400;
/// How long the batches Ferry created may take to hand their files back
/// once every request is finished (deleting files, recording `done`).
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);

/// Small batches, flushed often, polled often; no upstream rate limit in the
/// way (the defaults of 10 calls/s and 2,000 batches/h would throttle it).
const UPSTREAM_EXTRA: &str = r#"
max_requests = 25
max_wait_secs = 0.2
calls_per_second = 1000
batches_per_hour = 1000000
"#;

/// One chat request in four carries `X-Ferry-Deadline` of 1 or 2 s and
/// names one of these models, routed to a third upstream, `rush`, on the
/// same emulator: the first has flex (here and in the emulator), the
/// second only standard. Their queues wait up to a second, and escalation
/// comes 0.9 s (the priors, then the learned latency of a few
/// milliseconds, plus the margin) before the deadline: a 1 s request
/// escalates about 0.1-0.2 s after acceptance, mostly from its queue; a 2 s
/// one about 1.1-1.2 s after, while its batch (flushed within the second,
/// living ~0.4 s) is submitted, or after the batch answered it.
const RUSH_MODELS: [&str; 2] = ["gpt-4.1-mini", "gpt-4.1-nano"];
const RUSH_EXTRA: &str = r#"
poll_interval_secs = 0.05
max_requests = 25
max_wait_secs = 1.0
calls_per_second = 1000
batches_per_hour = 1000000
flex_models = ["gpt-4.1-mini"]
flex_latency_prior_secs = 0.1
standard_latency_prior_secs = 0.1
escalation_margin_secs = 0.8
"#;

/// The OpenAI upstream's lines, then a second upstream, Anthropic, on the
/// same emulator (`claude`: `emulator = true`, or its `base_url`), with the
/// same batch settings, and a third, OpenAI, for the requests with a
/// deadline (`rush`: its target), routed by model.
fn upstreams(claude: &str, rush: &str) -> String {
    let [flex, standard] = RUSH_MODELS;
    format!(
        "{UPSTREAM_EXTRA}\n[[upstreams]]\nname = \"claude\"\nkind = \"anthropic\"\n{claude}\npoll_interval_secs = 0.05\n{UPSTREAM_EXTRA}\n\
         [[upstreams]]\nname = \"rush\"\nkind = \"openai\"\n{rush}\n{RUSH_EXTRA}\n\
         [[routes]]\nmodel = \"{flex}\"\nupstream = \"rush\"\n\n[[routes]]\nmodel = \"{standard}\"\nupstream = \"rush\"\n"
    )
}
/// JSON logs, so the harness can tell what a killed Ferry was doing.
const SERVER_EXTRA: &str = r#"log_format = "json""#;
/// Batches that live long enough (~0.5 s) for kills to land in every phase,
/// and upstream calls slow enough for uploads and result downloads to be cut
/// off. The embedded emulator takes them from Ferry's config at every start
/// (knobs are not kept across restarts); the standalone one is patched once.
const EMULATOR_KNOBS: &str = r#"
validating_seconds = 0.2
per_request_seconds = 0.004
finalizing_seconds = 0.15
latency_ms = 2
flex_models = ["gpt-4.1-mini"]
"#;

/// Where the emulator runs, and the store.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// `ferry emulator` in its own process, never killed; sled.
    Standalone,
    /// In Ferry's process (`emulator = true`), killed with it; sled.
    Embedded,
    /// `ferry emulator` in its own process; Ferry on PostgreSQL (a fresh
    /// database on the server in `FERRY_TEST_PG_URL`).
    Postgres,
}

/// Both shapes kill and restart processes at moments chosen by timing, on
/// machines with few cores: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The size of the run, from the environment.
struct Knobs {
    cycles: usize,
    per_cycle: u64,
    rate: f64,
    seed: u64,
    keep: bool,
}

impl Knobs {
    fn from_env() -> Knobs {
        Knobs {
            cycles: env_or("FERRY_CRASH_CYCLES", 4),
            per_cycle: env_or("FERRY_CRASH_REQUESTS", 150),
            rate: env_or("FERRY_CRASH_RATE", 100.0),
            seed: env_or("FERRY_CRASH_SEED", rand::random::<u64>()),
            keep: std::env::var("FERRY_CRASH_KEEP").is_ok_and(|v| v == "1"),
        }
    }
}

fn env_or<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a valid value")),
        Err(_) => default,
    }
}

/// Which API a request is sent with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Family {
    /// `POST /v1/chat/completions`, a Batch API batch upstream.
    OpenAi,
    /// `POST /v1/messages`, a Message Batch upstream.
    Anthropic,
}

/// Request number `n` of the run: its custom id, tenant, API, model and
/// prompt.
#[derive(Clone, Copy)]
struct Req(u64);

impl Req {
    fn id(self) -> String {
        format!("crash-{}", self.0)
    }

    fn key(self) -> &'static str {
        KEYS[(self.0 % 2) as usize]
    }

    fn family(self) -> Family {
        if self.0 % 3 == 2 {
            Family::Anthropic
        } else {
            Family::OpenAi
        }
    }

    /// `X-Ferry-Deadline`, in seconds, of one chat request in four.
    fn deadline(self) -> Option<u64> {
        (self.family() == Family::OpenAi && (self.0 / 3).is_multiple_of(4))
            .then_some(1 + self.0 / 12 % 2)
    }

    /// Whether its model has flex (only requests with a deadline name it).
    fn flex(self) -> bool {
        self.deadline().is_some() && self.model() == RUSH_MODELS[0]
    }

    fn model(self) -> &'static str {
        if self.deadline().is_some() {
            return RUSH_MODELS[(self.0 % 2) as usize];
        }
        let models = match self.family() {
            Family::OpenAi => MODELS,
            Family::Anthropic => CLAUDE_MODELS,
        };
        models[(self.0 / 2 % 2) as usize]
    }

    /// The call, as each family's SDK sends it.
    fn call(self, http: &reqwest::Client, proxy: &str, seed: u64) -> reqwest::RequestBuilder {
        let prompt = self.prompt(seed);
        let call = match self.family() {
            Family::OpenAi => http
                .post(format!("{proxy}/v1/chat/completions"))
                .bearer_auth(self.key())
                .json(&chat(self.model(), &prompt)),
            Family::Anthropic => http
                .post(format!("{proxy}/v1/messages"))
                .header("x-api-key", self.key())
                .header("anthropic-version", "2023-06-01")
                .json(&serde_json::json!({
                    "model": self.model(),
                    "max_tokens": 64,
                    "messages": [{"role": "user", "content": prompt}],
                })),
        };
        let call = match self.deadline() {
            Some(secs) => call.header("x-ferry-deadline", secs.to_string()),
            None => call,
        };
        call.header("prefer", "respond-async")
            .header("x-ferry-custom-id", self.id())
    }

    /// The answer text in a completed request's result body.
    fn answer(self, body: &Value) -> &Value {
        match self.family() {
            Family::OpenAi => &body["choices"][0]["message"]["content"],
            Family::Anthropic => &body["content"][0]["text"],
        }
    }

    fn prompt(self, seed: u64) -> String {
        format!("crash run {seed}, request {}", self.0)
    }

    /// The request whose prompt this is.
    fn of_prompt(prompt: &str, seed: u64) -> Option<Req> {
        let n = prompt.strip_prefix(&format!("crash run {seed}, request "))?;
        n.parse().ok().map(Req)
    }
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    /// Got a `202`.
    accepted: Vec<u64>,
    /// Given up without a `202` (Ferry was down): stored or not, unknown.
    unacked: Vec<u64>,
    /// Accepted on a try after a failed one (an idempotent retry).
    accepted_on_retry: u64,
    /// Answers that should never happen (e.g. `409` on a retry).
    unexpected: Vec<String>,
    /// How long each `202` took.
    latencies: Vec<Duration>,
}

/// The load: clients share the address of the Ferry now running and take
/// request numbers in order.
struct Load {
    http: reqwest::Client,
    proxy: RwLock<String>,
    seed: u64,
    total: u64,
    next: AtomicU64,
    in_flight: AtomicUsize,
    /// Told whenever a call starts.
    sending: Notify,
    tally: Mutex<Tally>,
}

enum Sent {
    Accepted(Duration),
    Failed,
    Unexpected(String),
}

impl Load {
    async fn send(&self, req: Req) -> Sent {
        let call = req.call(&self.http, &self.proxy.read().unwrap(), self.seed);
        let started = Instant::now();
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.sending.notify_waiters();
        let res = call.send().await;
        let sent = match res {
            Err(_) => Sent::Failed,
            // The 202 is sent only once the request is durable: it counts
            // even if the body is then cut off.
            Ok(r) if r.status() == 202 => match r.json::<Value>().await {
                Ok(ticket) if ticket["id"] != req.id().as_str() => {
                    Sent::Unexpected(format!("{}: ticket for another id: {ticket}", req.id()))
                }
                _ => Sent::Accepted(started.elapsed()),
            },
            // Storage unavailable: not accepted, try again.
            Ok(r) if r.status() == 503 => Sent::Failed,
            Ok(r) => Sent::Unexpected(format!(
                "{}: {} {}",
                req.id(),
                r.status(),
                r.text().await.unwrap_or_default()
            )),
        };
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        sent
    }
}

/// One client: sends requests `pace` apart until all are taken.
async fn client(load: Arc<Load>, mut rng: StdRng, pace: Duration) {
    let mut tick = tokio::time::interval(pace);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let n = load.next.fetch_add(1, Ordering::SeqCst);
        if n >= load.total {
            return;
        }
        tick.tick().await;
        let mut tries = 0;
        loop {
            tries += 1;
            match load.send(Req(n)).await {
                Sent::Accepted(took) => {
                    let mut t = load.tally.lock().unwrap();
                    t.latencies.push(took);
                    t.accepted.push(n);
                    t.accepted_on_retry += u64::from(tries > 1);
                    break;
                }
                Sent::Failed if tries < MAX_TRIES && rng.random_bool(RETRY_PROBABILITY) => {
                    // Ferry is down or restarting: pace the retries.
                    let ms = rng.random_range(10..40);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                Sent::Failed => {
                    load.tally.lock().unwrap().unacked.push(n);
                    break;
                }
                Sent::Unexpected(what) => {
                    load.tally.lock().unwrap().unexpected.push(what);
                    break;
                }
            }
        }
    }
}

/// Where a batch is, by the last line Ferry logged about it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Claimed or uploaded, not yet created upstream.
    Flush,
    /// Created upstream, not yet finished there.
    Polling,
    /// Finished upstream: results being taken in, files being deleted.
    Ingestion,
}

/// Follows the (JSON) log of a running Ferry: which batch is in which
/// phase, and whether recovery has finished.
struct LogTail {
    file: std::fs::File,
    pending: Vec<u8>,
    batches: HashMap<u64, Phase>,
    recovered: bool,
    /// The last warning or error logged about each batch.
    complaints: HashMap<u64, String>,
}

impl LogTail {
    fn open(path: &Path) -> LogTail {
        LogTail {
            file: std::fs::File::open(path).expect("ferry log"),
            pending: Vec::new(),
            batches: HashMap::new(),
            recovered: false,
            complaints: HashMap::new(),
        }
    }

    /// Reads what was logged since the last call.
    fn update(&mut self) {
        use std::io::Read;
        let _ = self.file.read_to_end(&mut self.pending);
        let Some(end) = self.pending.iter().rposition(|b| *b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = self.pending.drain(..=end).collect();
        for line in complete.split(|b| *b == b'\n') {
            self.line(line);
        }
    }

    fn line(&mut self, line: &[u8]) {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            return;
        };
        let fields = &v["fields"];
        let message = fields["message"].as_str().unwrap_or_default();
        if message == "recovery finished" {
            self.recovered = true;
        }
        let Some(batch) = fields["ferry_batch"].as_u64() else {
            return;
        };
        if matches!(v["level"].as_str(), Some("WARN" | "ERROR")) {
            let error = fields["error"].as_str().unwrap_or_default();
            self.complaints.insert(batch, format!("{message}: {error}"));
        }
        let phase = match message {
            "resuming a batch" => {
                let state = fields["state"].as_str().unwrap_or_default();
                if state.starts_with("Submitted") {
                    Some(Phase::Polling)
                } else {
                    Some(Phase::Flush)
                }
            }
            "queue flushed into a batch"
            | "input file uploaded"
            | "found the file uploaded before the restart" => Some(Phase::Flush),
            "batch created upstream" => Some(Phase::Polling),
            "batch finished upstream" => Some(Phase::Ingestion),
            "batch done" | "upstream refused the batch; failing its requests" => None,
            _ => return,
        };
        match phase {
            Some(p) => self.batches.insert(batch, p),
            None => self.batches.remove(&batch),
        };
    }

    fn count(&self, phase: Phase) -> usize {
        self.batches.values().filter(|p| **p == phase).count()
    }
}

/// What a kill aims at: from the kill's random time, the harness waits
/// (up to `AIM_PATIENCE`) for that to be going on, then a random moment
/// more (up to `jitter`, so that kills spread over the phase), and kills.
/// Kills take the aims in turn, from a random start.
#[derive(Clone, Copy, Debug)]
enum Aim {
    Intake,
    Flush,
    Polling,
    Ingestion,
}

const AIMS: [Aim; 4] = [Aim::Intake, Aim::Flush, Aim::Polling, Aim::Ingestion];
const AIM_PATIENCE: Duration = Duration::from_secs(1);

impl Aim {
    fn reached(self, tail: &LogTail, in_flight: usize) -> bool {
        match self {
            Aim::Intake => in_flight > 0,
            Aim::Flush => tail.count(Phase::Flush) > 0,
            Aim::Polling => tail.count(Phase::Polling) > 0,
            Aim::Ingestion => tail.count(Phase::Ingestion) > 0,
        }
    }

    /// About how long the phase lasts here (the emulator adds 2 ms to each
    /// call): an intake call a few milliseconds (the group commit's fsync),
    /// an upload and a create a few, a download, three deletes and the
    /// commits between them several. Polling lasts long enough as it is.
    fn jitter(self) -> Duration {
        Duration::from_micros(match self {
            Aim::Intake => 3_000,
            Aim::Flush => 5_000,
            Aim::Polling => 0,
            Aim::Ingestion => 10_000,
        })
    }
}

/// Busy-waits `d` (sub-millisecond precision, unlike the timer).
fn spin(d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// What a killed Ferry was doing.
struct Activity {
    /// Intake calls in flight (client side) at the kill.
    intake: usize,
    flush: usize,
    polling: usize,
    ingestion: usize,
    /// Recovery had not finished.
    starting: bool,
}

impl Activity {
    fn of(tail: &LogTail, intake: usize) -> Activity {
        Activity {
            intake,
            flush: tail.count(Phase::Flush),
            polling: tail.count(Phase::Polling),
            ingestion: tail.count(Phase::Ingestion),
            starting: !tail.recovered,
        }
    }
}

/// `ferry_live_batches` from the admin port's metrics.
async fn live_batches(s: &Stack) -> Option<u64> {
    let text = s
        .http
        .get(s.admin("/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("ferry_live_batches "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Ferry's log lines about requests with a deadline, by what they say.
const ESCALATED_FROM_QUEUE: &str = "request escalated for its deadline";
const ESCALATED_FROM_BATCH: &str =
    "request in a submitted batch escalated for its deadline; the first answer wins";
const DISCARDED: [&str; 2] = [
    "batch line for a request already answered on another lane; discarded",
    "escalated request already answered by its batch; this answer is discarded",
];

/// The distinct requests (Ferry's ids) each message of `messages` was
/// logged for, over every Ferry run in `dir`.
fn logged_requests(dir: &Path, messages: &[&str]) -> HashMap<String, HashSet<u64>> {
    let mut out: HashMap<String, HashSet<u64>> = HashMap::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("ferry-") && name.ends_with(".log")) {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let fields = &v["fields"];
            let message = fields["message"].as_str().unwrap_or_default();
            if let (true, Some(request)) = (messages.contains(&message), fields["request"].as_u64())
            {
                out.entry(message.to_owned()).or_default().insert(request);
            }
        }
    }
    out
}

/// What is wrong, if anything, with the lane a completed request was
/// answered on: a request without a deadline only by a batch; one with a
/// deadline by a batch or the one lane its model steps up to (flex if it
/// has flex, else standard: flex is never refused here, so never left for
/// standard), and the answer must be that lane's.
fn lane_problem(req: Req, st: &Value) -> Option<String> {
    let lane = st["lane"].as_str().unwrap_or("none");
    let allowed: &[&str] = match (req.deadline(), req.flex()) {
        (None, _) => &["batch"],
        (Some(_), true) => &["batch", "flex"],
        (Some(_), false) => &["batch", "standard"],
    };
    if !allowed.contains(&lane) {
        return Some(format!(
            "{} (deadline {:?}, {}) answered on lane {lane}, not one of {allowed:?}",
            req.id(),
            req.deadline(),
            req.model()
        ));
    }
    let flex_answer = st["result"]["body"]["service_tier"] == "flex";
    (flex_answer != (lane == "flex")).then(|| {
        format!(
            "{} answered on lane {lane} with another lane's answer: {st}",
            req.id()
        )
    })
}

/// The emulator's real-time chat answers, checked per request: only a
/// request with a deadline, only on its model's lane (`flex`, or
/// `default`: standard), and at most once plus once per kill (a call whose
/// answer a kill cut off is sent again when its escalation resumes).
#[derive(Debug, Default, PartialEq)]
struct Realtime {
    /// Answers, over every request.
    answers: u64,
    /// Answers beyond one per request.
    again: u64,
    /// Requests with at least one answer.
    requests: HashSet<u64>,
    problems: Vec<String>,
}

fn realtime_books(by_prompt: &Value, seed: u64, kills: u64) -> Realtime {
    let mut books = Realtime::default();
    for (prompt, tiers) in by_prompt.as_object().into_iter().flatten() {
        let Some(req) = Req::of_prompt(prompt, seed) else {
            books
                .problems
                .push(format!("real-time answer for an unknown prompt {prompt:?}"));
            continue;
        };
        let want = if req.flex() { "flex" } else { "default" };
        let mut n = 0;
        for (tier, count) in tiers.as_object().into_iter().flatten() {
            let count = count.as_u64().unwrap_or(0);
            n += count;
            if req.deadline().is_none() || tier != want {
                books.problems.push(format!(
                    "{} (deadline {:?}, {}) answered {count}× in real time on tier {tier}: a lane the policy does not allow",
                    req.id(),
                    req.deadline(),
                    req.model()
                ));
            }
        }
        if n > 1 + kills {
            books.problems.push(format!(
                "{} answered {n}× in real time, over {kills} kills",
                req.id()
            ));
        }
        books.answers += n;
        books.again += n.saturating_sub(1);
        if n > 0 {
            books.requests.insert(req.0);
        }
    }
    books
}

#[test]
fn a_request_sent_on_a_lane_the_policy_does_not_allow_is_reported() {
    let seed = 5;
    // Request 0: deadline, flex model; 1: deadline, standard model; 2: Claude;
    // 3: chat without a deadline.
    assert_eq!((Req(0).deadline(), Req(0).flex()), (Some(1), true));
    assert_eq!((Req(1).deadline(), Req(1).flex()), (Some(1), false));
    assert_eq!(Req(3).deadline(), None);
    assert_eq!(
        Req::of_prompt(&Req(13).prompt(seed), seed).map(|r| r.0),
        Some(13)
    );
    let p = |n: u64| Req(n).prompt(seed);
    let fine = serde_json::json!({ p(0): {"flex": 2}, p(1): {"default": 1} });
    let books = realtime_books(&fine, seed, 1);
    assert_eq!((books.answers, books.again), (3, 1));
    assert!(books.problems.is_empty(), "{:?}", books.problems);
    assert_eq!(
        realtime_books(&fine, seed, 0).problems.len(),
        1,
        "twice with no kill"
    );
    let wrong =
        serde_json::json!({ p(0): {"default": 1}, p(1): {"flex": 1}, p(3): {"default": 1} });
    assert_eq!(realtime_books(&wrong, seed, 1).problems.len(), 3);

    let st = |lane: &str, tier: &str| serde_json::json!({"lane": lane, "result": {"body": {"service_tier": tier}}});
    assert_eq!(lane_problem(Req(0), &st("flex", "flex")), None);
    assert_eq!(lane_problem(Req(0), &st("batch", "default")), None);
    assert!(lane_problem(Req(0), &st("standard", "default")).is_some());
    assert!(lane_problem(Req(0), &st("flex", "default")).is_some());
    assert_eq!(lane_problem(Req(1), &st("standard", "default")), None);
    assert!(lane_problem(Req(3), &st("standard", "default")).is_some());
}

/// Warnings and errors of every Ferry run in `dir`, for a failure message.
fn ferry_complaints(dir: &Path, max: usize) -> Vec<String> {
    let mut logs: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("ferry-") && n.ends_with(".log"))
        })
        .collect();
    logs.sort();
    let mut out = Vec::new();
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        for line in text.lines() {
            if line.contains("\"level\":\"INFO\"") || line.contains("\"level\":\"DEBUG\"") {
                continue;
            }
            let name = log.file_name().unwrap_or_default().to_string_lossy();
            out.push(format!("{name}: {line}"));
            if out.len() == max {
                return out;
            }
        }
    }
    out
}

/// What one family's requests did upstream, counted by Ferry's request.
#[derive(Debug, Default, PartialEq, Eq)]
struct Books {
    /// Lines submitted, over every batch.
    lines: u64,
    /// Distinct requests among them.
    requests: u64,
    /// Requests executed more than once.
    twice: u64,
}

impl Books {
    /// Lines beyond one per request: a request sent in two batches (or
    /// twice in one).
    fn in_two_batches(&self) -> u64 {
        self.lines.saturating_sub(self.requests)
    }
}

/// The Message Batches' result lines counted two ways: by `custom_id`, as
/// the emulator's stats count every line, and by Ferry's request. A Claude
/// request's custom id is `f<instance>-<ferry batch>-<request>`: the same
/// request sent again in another Ferry batch has another custom id, so only
/// the request (the last segment) shows it was sent, or ran, twice.
#[derive(Debug, Default)]
struct ClaudeBooks {
    by_custom_id: Books,
    by_request: Books,
}

fn claude_books(results: &[Value]) -> ClaudeBooks {
    let mut by_custom_id: HashMap<&str, u32> = HashMap::new();
    let mut by_request: HashMap<&str, u32> = HashMap::new();
    let mut lines = 0;
    for line in results {
        let custom_id = line["custom_id"].as_str().unwrap_or_default();
        let request = custom_id.rsplit('-').next().unwrap_or_default();
        lines += 1;
        let ran = u32::from(line["result"]["type"] == "succeeded");
        *by_custom_id.entry(custom_id).or_default() += ran;
        *by_request.entry(request).or_default() += ran;
    }
    let books = |runs: &HashMap<&str, u32>| Books {
        lines,
        requests: runs.len() as u64,
        twice: runs.values().filter(|&&n| n > 1).count() as u64,
    };
    ClaudeBooks {
        by_custom_id: books(&by_custom_id),
        by_request: books(&by_request),
    }
}

/// The chat requests' books: the emulator's stats count every line of both
/// families by custom id; an OpenAI line's custom id is Ferry's request
/// (`ferry-<request>`), the same in every batch, so what is left once the
/// Claude lines (by custom id) are taken out counts by request.
fn openai_books(stats: &Value, claude_by_custom_id: &Books) -> Books {
    let num = |k: &str| stats[k].as_u64().unwrap_or(u64::MAX);
    Books {
        lines: num("lines_submitted").saturating_sub(claude_by_custom_id.lines),
        requests: num("distinct_custom_ids").saturating_sub(claude_by_custom_id.requests),
        twice: num("executed_more_than_once").saturating_sub(claude_by_custom_id.twice),
    }
}

/// Every result line of every Message Batch on the emulator, once each has
/// ended (a bounded wait: Ferry's own batches have, but a create Ferry lost
/// track of would still be running).
async fn message_batch_results(s: &Stack) -> Result<Vec<Value>, String> {
    let get = |path: String| {
        s.http
            .get(s.emu(&path))
            .header("x-api-key", common::UPSTREAM_KEY)
            .header("anthropic-version", "2023-06-01")
            .send()
    };
    let deadline = Instant::now() + SETTLE_DEADLINE;
    let ids = loop {
        let mut ids = Vec::new();
        let mut running = 0;
        let mut after: Option<String> = None;
        loop {
            let path = match &after {
                Some(a) => format!("/v1/messages/batches?limit=1000&after_id={a}"),
                None => "/v1/messages/batches?limit=1000".to_owned(),
            };
            let page: Value = get(path)
                .await
                .map_err(|e| format!("listing message batches: {e}"))?
                .json()
                .await
                .map_err(|e| format!("listing message batches: {e}"))?;
            for b in page["data"].as_array().into_iter().flatten() {
                running += usize::from(b["processing_status"] != "ended");
                ids.push(b["id"].as_str().unwrap_or_default().to_owned());
            }
            if page["has_more"] != true {
                break;
            }
            after = page["last_id"].as_str().map(str::to_owned);
        }
        if running == 0 {
            break ids;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{running} message batches upstream still not ended {} s after every request finished",
                SETTLE_DEADLINE.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut lines = Vec::new();
    for id in ids {
        let text = get(format!("/v1/messages/batches/{id}/results"))
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| format!("results of {id}: {e}"))?
            .text()
            .await
            .map_err(|e| format!("results of {id}: {e}"))?;
        for line in text.lines().filter(|l| !l.is_empty()) {
            lines.push(serde_json::from_str(line).map_err(|e| format!("results of {id}: {e}"))?);
        }
    }
    Ok(lines)
}

#[test]
fn a_claude_request_in_two_batches_counts_as_twice() {
    let line = |custom_id: &str, ran: &str| serde_json::json!({"custom_id": custom_id, "result": {"type": ran}});
    // Request 7 sent in Ferry batches 3 and 9 (two custom ids) and run in
    // both; request 8 sent once; request 9 sent twice, run once.
    let books = claude_books(&[
        line("fab12-3-7", "succeeded"),
        line("fab12-9-7", "succeeded"),
        line("fab12-3-8", "succeeded"),
        line("fab12-3-9", "expired"),
        line("fab12-9-9", "succeeded"),
    ]);
    assert_eq!(
        books.by_request,
        Books {
            lines: 5,
            requests: 3,
            twice: 1
        }
    );
    assert_eq!(books.by_request.in_two_batches(), 2);
    // By custom id, as the emulator counts, nothing shows.
    assert_eq!(books.by_custom_id.twice, 0);
    assert_eq!(books.by_custom_id.in_two_batches(), 0);
    // The chat lines are what the emulator counted beyond the Claude ones.
    let stats = serde_json::json!({"lines_submitted": 9, "distinct_custom_ids": 8,
        "executed_more_than_once": 1});
    assert_eq!(
        openai_books(&stats, &books.by_custom_id),
        Books {
            lines: 4,
            requests: 3,
            twice: 1
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_random_moments_loses_nothing_and_runs_nothing_twice() {
    let _one = ONE_AT_A_TIME.lock().await;
    crash_harness(Shape::Standalone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_with_the_embedded_emulator_loses_nothing_and_runs_nothing_twice() {
    let _one = ONE_AT_A_TIME.lock().await;
    crash_harness(Shape::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_on_postgres_loses_nothing_and_runs_nothing_twice() {
    let _one = ONE_AT_A_TIME.lock().await;
    crash_harness(Shape::Postgres).await;
}

async fn crash_harness(shape: Shape) {
    let knobs = Knobs::from_env();
    let total = knobs.per_cycle * knobs.cycles as u64;
    eprintln!(
        "crash harness ({shape:?}): seed {} (FERRY_CRASH_SEED={} repeats the kill schedule), {} cycles of {} requests at {}/s",
        knobs.seed, knobs.seed, knobs.cycles, knobs.per_cycle, knobs.rate
    );
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(knobs.seed);
    let mut s = match shape {
        Shape::Standalone | Shape::Postgres => {
            let backend = match shape {
                Shape::Postgres => Backend::Postgres,
                _ => Backend::Sled,
            };
            let s = Stack::start_on_with(
                backend,
                &|emulator| {
                    let key = "api_key_env = \"FERRY_TEST_UPSTREAM_KEY\"";
                    upstreams(
                        &format!("base_url = \"http://{emulator}\"\n{key}"),
                        &format!("base_url = \"http://{emulator}/v1\"\n{key}"),
                    )
                },
                SERVER_EXTRA,
            );
            let knobs: Value = toml::from_str(EMULATOR_KNOBS).expect("knobs");
            s.emulator_config(knobs).await;
            s
        }
        Shape::Embedded => Stack::start_embedded(
            EMULATOR_KNOBS,
            &upstreams("emulator = true", "emulator = true"),
            SERVER_EXTRA,
        ),
    };

    let load = Arc::new(Load {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client"),
        proxy: RwLock::new(s.url("")),
        seed: knobs.seed,
        total,
        next: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
        sending: Notify::new(),
        tally: Mutex::default(),
    });
    let pace = Duration::from_secs_f64(CLIENTS as f64 / knobs.rate);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let rng = StdRng::seed_from_u64(knobs.seed.wrapping_add(1 + c as u64));
            tokio::spawn(client(load.clone(), rng, pace))
        })
        .collect();
    let load_started = Instant::now();

    // The kills fall at random moments over the time the load takes at its
    // pace (so the load runs through all of them), each put off until what
    // it aims at is going on.
    let span = total as f64 / knobs.rate;
    let mut schedule: Vec<f64> = (0..knobs.cycles)
        .map(|_| rng.random_range(0.0..span))
        .collect();
    schedule.sort_by(f64::total_cmp);
    let first_aim = rng.random_range(0..AIMS.len());
    let mut kills: Vec<Activity> = Vec::new();
    let mut since = load_started;
    for (k, at) in schedule.into_iter().enumerate() {
        let mut tail = LogTail::open(&s.ferry.log);
        let aim = AIMS[(first_aim + k) % AIMS.len()];
        tokio::time::sleep_until((load_started + Duration::from_secs_f64(at)).into()).await;
        // Choosing the moment by what is going on is the point here. Intake
        // calls are short: the clients announce each one. Batch phases are
        // read from the log, in 1 ms steps.
        let patience = Instant::now() + AIM_PATIENCE;
        loop {
            let sending = load.sending.notified();
            tail.update();
            if aim.reached(&tail, load.in_flight.load(Ordering::SeqCst))
                || Instant::now() >= patience
            {
                break;
            }
            if matches!(aim, Aim::Intake) {
                let _ = tokio::time::timeout_at(patience.into(), sending).await;
            } else {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let jitter = aim.jitter().mul_f64(rng.random::<f64>());
        tokio::task::block_in_place(|| spin(jitter));
        let intake = load.in_flight.load(Ordering::SeqCst);
        let lived = since.elapsed().as_secs_f64();
        let cycle = k + 1;
        let down = Instant::now();
        tokio::task::block_in_place(|| s.restart_ferry());
        let down = down.elapsed().as_secs_f64() * 1000.0;
        *load.proxy.write().unwrap() = s.url("");
        since = Instant::now();
        // Whatever it logged up to the kill.
        tail.update();
        let a = Activity::of(&tail, intake);
        eprintln!(
            "kill {cycle} after {lived:.2} s, aiming at {aim:?}: {} intake calls in flight, batches {} flushing, {} polling, {} ingesting{}; back in {down:.0} ms",
            a.intake,
            a.flush,
            a.polling,
            a.ingestion,
            if a.starting { ", still recovering" } else { "" }
        );
        kills.push(a);
    }

    // Ferry is up for good: the rest of the load, then a flush of anything
    // left in the queues.
    for c in clients {
        c.await.expect("client task");
    }
    s.flush().await;
    let mut tally = std::mem::take(&mut *load.tally.lock().unwrap());
    tally.latencies.sort();
    let percentile = |p: f64| {
        let l = &tally.latencies;
        l.get(((l.len() as f64 - 1.0) * p) as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let sent = load.next.load(Ordering::SeqCst).min(total);

    // 1. Every accepted request completes with its own answer. Each lookup
    // is a long-poll that returns as soon as the request is terminal. Ids
    // given up on are looked up too: unknown is fine, stored must complete.
    let lookups: Vec<(u64, bool, u16, Value)> = futures::stream::iter(
        tally
            .accepted
            .iter()
            .map(|&n| (n, true))
            .chain(tally.unacked.iter().map(|&n| (n, false))),
    )
    .map(|(n, acked)| {
        let s = &s;
        async move {
            let req = Req(n);
            let (code, st) = s.status(req.key(), &req.id(), 60).await;
            (n, acked, code, st)
        }
    })
    .buffer_unordered(64)
    .collect()
    .await;
    let mut problems: Vec<String> = tally
        .unexpected
        .iter()
        .map(|u| format!("unexpected answer at intake: {u}"))
        .collect();
    let mut lost = Vec::new();
    let mut stored_unacked = Vec::new();
    // The lane each completed request with a deadline was answered on.
    let mut lanes: BTreeMap<String, u64> = BTreeMap::new();
    let mut real_time_lanes: HashSet<u64> = HashSet::new();
    let mut wrong_lanes = Vec::new();
    for (n, acked, code, st) in &lookups {
        let req = Req(*n);
        if *code == 404 && !acked {
            continue;
        }
        if !acked {
            stored_unacked.push(*n);
        }
        let want = format!("echo: {}", req.prompt(knobs.seed));
        let got = req.answer(&st["result"]["body"]);
        if st["status"] == "completed" {
            if let Some(problem) = lane_problem(req, st) {
                wrong_lanes.push(problem);
            }
            if req.deadline().is_some() {
                let lane = st["lane"].as_str().unwrap_or("none");
                *lanes.entry(lane.to_owned()).or_default() += 1;
                if lane != "batch" {
                    real_time_lanes.insert(*n);
                }
            }
        }
        if *code != 200 || st["status"] != "completed" || got != want.as_str() {
            let what = if *acked {
                "accepted"
            } else {
                "stored without a 202"
            };
            lost.push((
                *n,
                format!("{} ({what}), want {want:?}: {code} {st}", req.id()),
            ));
        }
    }
    if !lost.is_empty() {
        problems.push(format!(
            "{} requests not completed with their answer:\n  {}",
            lost.len(),
            lost.iter()
                .take(20)
                .map(|(_, l)| l.as_str())
                .collect::<Vec<_>>()
                .join("\n  ")
        ));
    }

    if !wrong_lanes.is_empty() {
        problems.push(format!(
            "{} requests answered on a lane the policy does not allow:\n  {}",
            wrong_lanes.len(),
            wrong_lanes
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  ")
        ));
    }

    // 4. No input file left upstream. A batch deletes its files after its
    // results are stored (and after the long-polls above returned), so wait
    // for Ferry's last batch to finish first: there is no route to long-poll
    // that, hence a bounded poll of the gauge.
    let settle = Instant::now();
    let mut live = live_batches(&s).await;
    while live != Some(0) && settle.elapsed() < SETTLE_DEADLINE {
        tokio::time::sleep(Duration::from_millis(20)).await;
        live = live_batches(&s).await;
    }
    let stuck = live.unwrap_or(u64::MAX);
    if stuck != 0 {
        let mut tail = LogTail::open(&s.ferry.log);
        tail.update();
        let mut which: Vec<String> = tail
            .batches
            .iter()
            .map(|(b, phase)| {
                let last = tail.complaints.get(b).map_or("", String::as_str);
                format!("ferry_batch {b} ({phase:?}; last complaint: {last})")
            })
            .collect();
        which.sort();
        problems.push(format!(
            "{live:?} batches still live in Ferry {} s after every request finished:\n  {}",
            SETTLE_DEADLINE.as_secs(),
            which.join("\n  ")
        ));
    }
    let files = s.upstream_get("/v1/files?purpose=batch").await;
    let leftover = files["data"].as_array().map_or(0, Vec::len);
    if leftover != 0 {
        problems.push(format!("{leftover} input files left upstream: {files}"));
    }

    // 2 and 3, per family, from the emulator's books (after the settling
    // above, so that every batch upstream has ended). No fault is injected,
    // so every stored request is sent in exactly one batch, once: the
    // distinct requests upstream are exactly the requests Ferry holds.
    let stats = s.emulator_stats().await;
    let claude = match message_batch_results(&s).await {
        Ok(lines) => claude_books(&lines),
        Err(e) => {
            problems.push(e);
            ClaudeBooks::default()
        }
    };
    let books = [
        (Family::OpenAi, openai_books(&stats, &claude.by_custom_id)),
        (Family::Anthropic, claude.by_request),
    ];
    let family_of = |n: &u64| Req(*n).family();
    for (family, b) in &books {
        let accepted = tally
            .accepted
            .iter()
            .filter(|n| family_of(n) == *family)
            .count() as u64;
        let unacked = stored_unacked
            .iter()
            .filter(|n| family_of(n) == *family)
            .count() as u64;
        let held = accepted + unacked;
        // A request with a deadline answered in real time may have left its
        // queue before any batch: in no batch, or in one.
        let may_skip_batches = real_time_lanes
            .iter()
            .filter(|n| family_of(n) == *family)
            .count() as u64;
        if b.twice != 0 {
            problems.push(format!(
                "{family:?}: {} requests executed upstream more than once",
                b.twice
            ));
        }
        if b.in_two_batches() != 0 {
            problems.push(format!(
                "{family:?}: {} lines submitted for {} distinct requests: requests sent in two batches",
                b.lines, b.requests
            ));
        }
        if b.requests > held || b.requests + may_skip_batches < held {
            problems.push(format!(
                "{family:?}: {} distinct requests upstream in batches, but Ferry holds {held} requests ({accepted} accepted, {unacked} stored without a 202; {may_skip_batches} answered in real time, which may have left their queue before a batch)",
                b.requests
            ));
        }
    }
    if stats["batches_by_status"]["failed"] != 0 {
        problems.push("a batch failed upstream, with no fault injected".into());
    }

    // Real-time answers per request, from the emulator's counts: those of an
    // embedded emulator die with it at every kill, so only the standalone
    // one's span the run.
    let realtime = match shape {
        Shape::Embedded => None,
        Shape::Standalone | Shape::Postgres => {
            let books = realtime_books(
                &stats["realtime_answers_by_prompt"],
                knobs.seed,
                kills.len() as u64,
            );
            problems.extend(books.problems.iter().take(20).cloned());
            let unseen: Vec<u64> = real_time_lanes
                .difference(&books.requests)
                .copied()
                .collect();
            if !unseen.is_empty() {
                problems.push(format!(
                    "{} requests answered in real time by their status, with no real-time answer upstream: {:?}",
                    unseen.len(),
                    unseen.iter().take(20).collect::<Vec<_>>()
                ));
            }
            Some(books)
        }
    };
    let logged = logged_requests(
        s.dir.path(),
        &[
            ESCALATED_FROM_QUEUE,
            ESCALATED_FROM_BATCH,
            DISCARDED[0],
            DISCARDED[1],
        ],
    );
    let logged_count = |m: &str| logged.get(m).map_or(0, HashSet::len);
    let with_deadline = lookups
        .iter()
        .filter(|(n, acked, code, _)| Req(*n).deadline().is_some() && (*acked || *code != 404))
        .count();

    let kinds = |f: fn(&Activity) -> bool| kills.iter().filter(|a| f(a)).count();
    eprintln!(
        "intake answers (202): median {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(0.5),
        percentile(0.99),
        percentile(1.0)
    );
    eprintln!(
        "kills landed during: intake {}, flush {}, polling {}, ingestion {}, recovery {}; {} accepted on an idempotent retry, {} given up ({} of them stored anyway)",
        kinds(|a| a.intake > 0),
        kinds(|a| a.flush > 0),
        kinds(|a| a.polling > 0),
        kinds(|a| a.ingestion > 0),
        kinds(|a| a.starting),
        tally.accepted_on_retry,
        tally.unacked.len(),
        stored_unacked.len(),
    );
    for (family, b) in &books {
        eprintln!(
            "crash harness ({shape:?}, {family:?}): {} accepted, {} lost, {} executed twice, {} in two batches",
            tally
                .accepted
                .iter()
                .filter(|n| family_of(n) == *family)
                .count(),
            lost.iter().filter(|(n, _)| family_of(n) == *family).count(),
            b.twice,
            b.in_two_batches()
        );
    }
    eprintln!(
        "crash harness ({shape:?}, deadlines): {with_deadline} held with a deadline, answered on lanes {lanes:?}; escalated (as logged) {} from the queue, {} from a batch; {} answers discarded (spent twice); real-time answers upstream: {}",
        logged_count(ESCALATED_FROM_QUEUE),
        logged_count(ESCALATED_FROM_BATCH),
        DISCARDED.iter().map(|m| logged_count(m)).sum::<usize>(),
        realtime.as_ref().map_or_else(
            || "not counted (the embedded emulator's counts die with it)".to_owned(),
            |r| format!("{}, {} of them sent again after a kill", r.answers, r.again)
        ),
    );
    eprintln!(
        "crash harness ({shape:?}): {} SIGKILLs over {sent} requests ({} accepted): {} lost, {} executed twice, {} in two batches, {stuck} batches stuck, {leftover} input files left ({:.1} s, seed {})",
        kills.len(),
        tally.accepted.len(),
        lost.len(),
        books.iter().map(|(_, b)| b.twice).sum::<u64>(),
        books.iter().map(|(_, b)| b.in_two_batches()).sum::<u64>(),
        started.elapsed().as_secs_f64(),
        knobs.seed
    );

    if problems.is_empty() {
        if knobs.keep {
            eprintln!("logs kept in {}", s.dir.keep().display());
        }
        return;
    }
    let dir = s.dir.keep();
    panic!(
        "crash harness ({shape:?}) failed (seed {}, FERRY_CRASH_SEED={} to repeat the schedule):\n- {}\nemulator stats: {stats}\nlogs kept in {}\nFerry's warnings and errors:\n{}",
        knobs.seed,
        knobs.seed,
        problems.join("\n- "),
        dir.display(),
        ferry_complaints(&dir, 40).join("\n")
    );
}
