//! The emulator's state: the clock, the files, the batches and the counters,
//! and the operations the HTTP routes call. Everything here is synchronous;
//! the routes run the operations that may advance batches on the blocking pool.
//!
//! Batches advance lazily. Nothing runs in the background: whenever a batch is
//! read (get, list, cancel, stats) its state at the current clock time is
//! computed by [`timeline::Spec::eval`], and the work that state implies is
//! done at that moment: validation when validating ends, execution of the lines
//! that are due, and the output and error files when it reaches a terminal
//! status.
//!
//! Durability (optional, see [`super::journal`]): every operation that
//! changes something writes its event to the journal, and waits for the
//! fsync, before the change can be seen: an upload or delete with the files
//! lock held, a batch's steps with its lock held. A read that changes nothing
//! writes nothing. If a write fails the emulator stops serving `/v1/*` (500),
//! since what it holds in memory is then ahead of what it could recover.
//!
//! Locks: the index of batches, each batch, the files, the counters and the
//! config are separate `std` mutexes, held briefly and never across an await.
//! The order is batch → files → counters; nothing takes a batch while holding
//! another lock, so they cannot deadlock. The clock's offset and the
//! journal's file are locked last, the clock's `advancing` alone and first.
//! A poisoned lock is taken over rather than propagated: a test double must
//! keep answering.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rand::distr::{Alphanumeric, SampleString};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};

use super::config::{EmulatorConfig, Profile};
use super::error::ApiError;
use super::journal::{BatchMeta, Entry, Event, Exact, FileMeta, Journal, JournalError};
use super::model::{self, Answer, Usage};
use super::timeline::{Eval, Outcome, Spec, Status, Timing};
use super::validate::{self, GoodLine, LineError, Rules};

/// Files of purpose `batch` (and the outputs) expire 30 days after upload
/// unless `expires_after` says otherwise.
const FILE_TTL_SECONDS: i64 = 30 * 24 * 3600;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A random id with the provider's prefix, e.g. `batch_` + 24 characters.
pub fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        Alphanumeric.sample_string(&mut rand::rng(), 24)
    )
}

/// Real unix time plus an offset that only grows, so tests can move time
/// forward without sleeping. Measured from a monotonic instant so that a
/// system clock step cannot send batches backwards.
#[derive(Debug)]
struct Clock {
    start_unix: f64,
    start: Instant,
    offset: Mutex<f64>,
    /// Held across an advance and its journal write, so that concurrent
    /// advances are written in the order they add up.
    advancing: Mutex<()>,
}

impl Clock {
    fn new() -> Clock {
        Clock::resume(0.0, f64::NEG_INFINITY)
    }

    /// A clock with `offset`, moved further forward if needed so that it
    /// does not read earlier than `floor` (the last time a previous run
    /// wrote down): time never goes back across a restart, even if the
    /// system clock did.
    fn resume(offset: f64, floor: f64) -> Clock {
        let start_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        Clock {
            start_unix,
            start: Instant::now(),
            offset: Mutex::new(resumed_offset(start_unix, offset, floor)),
            advancing: Mutex::new(()),
        }
    }

    fn now(&self) -> f64 {
        self.start_unix + self.start.elapsed().as_secs_f64() + *lock(&self.offset)
    }
}

/// An uploaded or generated file. Cloning is cheap: the content is `Bytes`.
#[derive(Clone, Debug)]
pub struct StoredFile {
    pub id: String,
    pub bytes: Bytes,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub filename: String,
    pub purpose: String,
    seq: u64,
}

impl StoredFile {
    fn from_meta(meta: FileMeta, bytes: Bytes) -> StoredFile {
        StoredFile {
            id: meta.id,
            bytes,
            created_at: meta.created_at,
            expires_at: meta.expires_at,
            filename: meta.filename,
            purpose: meta.purpose,
            seq: 0,
        }
    }

    fn meta(&self) -> FileMeta {
        FileMeta {
            id: self.id.clone(),
            created_at: self.created_at,
            expires_at: self.expires_at,
            filename: self.filename.clone(),
            purpose: self.purpose.clone(),
        }
    }

    /// The File object.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "object": "file",
            "bytes": self.bytes.len(),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": null,
        })
    }
}

#[derive(Debug, Default)]
struct Files {
    by_id: HashMap<String, StoredFile>,
    /// Creation sequence → id, for listing in order.
    order: BTreeMap<u64, String>,
    next_seq: u64,
    /// Files of purpose `batch` present, for Moonshot's quota.
    batch_files: u64,
    /// Input file id → unfinished batches reading it. A durable emulator
    /// keeps such a content on disk after its File is deleted, until the
    /// last of them finishes.
    pins: HashMap<String, usize>,
}

impl Files {
    fn insert(&mut self, mut file: StoredFile) -> StoredFile {
        file.seq = self.next_seq;
        self.next_seq += 1;
        if file.purpose == "batch" {
            self.batch_files += 1;
        }
        self.order.insert(file.seq, file.id.clone());
        self.by_id.insert(file.id.clone(), file.clone());
        file
    }

    fn remove(&mut self, id: &str) -> Option<StoredFile> {
        let file = self.by_id.remove(id)?;
        self.order.remove(&file.seq);
        if file.purpose == "batch" {
            self.batch_files = self.batch_files.saturating_sub(1);
        }
        Some(file)
    }

    fn pin(&mut self, id: &str) {
        *self.pins.entry(id.to_owned()).or_default() += 1;
    }

    /// Drops a batch's hold on its input; true if nothing needs the content
    /// any more.
    fn unpin(&mut self, id: &str) -> bool {
        if let Some(n) = self.pins.get_mut(id) {
            *n -= 1;
            if *n == 0 {
                self.pins.remove(id);
            }
        }
        !self.pins.contains_key(id) && !self.by_id.contains_key(id)
    }
}

/// The counters behind `GET /_emulator/stats`.
#[derive(Debug, Default)]
struct Counters {
    files_uploaded: u64,
    lines_submitted: u64,
    submitted_ids: HashSet<String>,
    /// custom_id → how many times a line with it was executed, over all batches.
    executions: HashMap<String, u32>,
    executed_lines: u64,
    realtime_requests: u64,
    /// Real-time chat answers (status 200) by the last message's text, then
    /// by tier (`flex` or `default`): lets a harness whose prompts are
    /// unique see how many times, and on which lanes, a request was sent
    /// outside a batch. In memory only: an embedded emulator restarted
    /// from its journal starts it afresh.
    realtime_answers: HashMap<String, BTreeMap<&'static str, u32>>,
    api_calls: u64,
}

/// The random generator behind `error_rate`, seeded by `seed` so runs repeat,
/// and which of 500/503 comes next.
#[derive(Debug)]
struct Faults {
    rng: StdRng,
    next_is_503: bool,
    /// Draws `flex_unavailable_rate`, apart from `rng` so that flex calls
    /// do not shift the sequence of `error_rate` faults.
    flex: StdRng,
    /// Batches created since start or the last `seed` change: the rank
    /// each turnaround draw is made for.
    batches_drawn: u64,
}

impl Faults {
    fn seeded(seed: u64) -> Faults {
        Faults {
            rng: StdRng::seed_from_u64(seed),
            next_is_503: false,
            flex: StdRng::seed_from_u64(seed ^ FLEX_STREAM),
            batches_drawn: 0,
        }
    }
}

/// Mixed into the seed of the flex generator (an arbitrary constant).
const FLEX_STREAM: u64 = 0x666c_6578;

/// One executed line, kept until the batch's files are written.
#[derive(Debug)]
struct Executed {
    ok: bool,
    line: String,
}

/// A batch: what it was created with, and what has been worked out so far.
#[derive(Debug)]
struct Batch {
    id: String,
    endpoint: String,
    input_file_id: String,
    completion_window: String,
    metadata: Value,
    output_ttl: Option<i64>,
    spec: Spec,
    rules: Rules,
    /// Fail at the end of validation with `token_limit_exceeded`.
    token_limit: bool,
    /// The input file, kept here so deleting the file does not change the batch.
    input: Bytes,
    // What has been observed so far.
    eval: Eval,
    model: Option<String>,
    /// The `errors.data` entries of a failed batch.
    errors: Option<Vec<Value>>,
    good: Vec<GoodLine>,
    executed: Vec<Executed>,
    completed: u64,
    failed: u64,
    usage: Usage,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    finished: bool,
}

#[derive(Debug, Default)]
struct BatchIndex {
    by_id: HashMap<String, Arc<Mutex<Batch>>>,
    /// Ids in creation order.
    order: Vec<String>,
}

/// The whole emulator.
#[derive(Debug)]
pub struct Emulator {
    config: Mutex<EmulatorConfig>,
    clock: Clock,
    files: Mutex<Files>,
    batches: Mutex<BatchIndex>,
    counters: Mutex<Counters>,
    faults: Mutex<Faults>,
    /// `None`: in memory only.
    journal: Option<Journal>,
    /// A journal write failed: `/v1/*` answers 500 from then on.
    broken: AtomicBool,
}

/// A parsed `GET /v1/files` query.
#[derive(Debug, Default)]
pub struct FileQuery {
    pub purpose: Option<String>,
    pub limit: Option<usize>,
    pub after: Option<String>,
    pub ascending: bool,
}

impl Emulator {
    pub fn new(config: EmulatorConfig) -> Emulator {
        let seed = config.seed;
        Emulator {
            config: Mutex::new(config),
            clock: Clock::new(),
            files: Mutex::default(),
            batches: Mutex::default(),
            counters: Mutex::default(),
            faults: Mutex::new(Faults::seeded(seed)),
            journal: None,
            broken: AtomicBool::new(false),
        }
    }

    /// A durable emulator: replays the journal under `dir` (creating it if
    /// needed) and writes every change to it from then on. `config` is the
    /// config of this run: knobs patched at run time are not kept, but every
    /// batch keeps the knobs it was created with.
    pub fn open(config: EmulatorConfig, dir: &Path) -> Result<Emulator, JournalError> {
        let (journal, entries) = Journal::open(dir)?;
        let path = journal.path().display().to_string();
        let mut replay = Replay::default();
        for (n, entry) in entries.into_iter().enumerate() {
            replay
                .apply(entry)
                .map_err(|message| JournalError::Corrupt {
                    path: path.clone(),
                    line: n + 1,
                    message,
                })?;
        }
        let Replay {
            offset,
            floor,
            mut files,
            counters,
            batches,
            positions: _,
            deleted,
        } = replay;
        // Contents: every File's, and the input of every unfinished batch
        // (whose File may have been deleted).
        let mut contents: HashMap<String, Bytes> = HashMap::new();
        let mut content = |id: &str| -> Result<Bytes, JournalError> {
            if let Some(b) = contents.get(id) {
                return Ok(b.clone());
            }
            let bytes = journal.read_content(id)?;
            contents.insert(id.to_owned(), bytes.clone());
            Ok(bytes)
        };
        for file in files.by_id.values_mut() {
            file.bytes = content(&file.id)?;
        }
        let mut index = BatchIndex::default();
        for (mut b, ran) in batches {
            if deleted.contains(&b.id) {
                continue;
            }
            if !b.finished {
                files.pin(&b.input_file_id);
                b.input = content(&b.input_file_id)?;
                if let Some(Outcome::Valid { .. }) = b.spec.outcome {
                    b.good = validate::check_file(&b.input, &b.rules).good;
                }
                // The lines that ran before, again (the answers are a pure
                // function of the input; only the ids are new, and nobody has
                // seen them: lines show only in the output file).
                run_lines(&mut b, ran);
            }
            index.order.push(b.id.clone());
            index.by_id.insert(b.id.clone(), Arc::new(Mutex::new(b)));
        }
        let keep: HashSet<String> = contents.into_keys().collect();
        journal.collect_garbage(&keep);
        let live = index.by_id.values().filter(|b| !lock(b).finished).count();
        tracing::info!(
            dir = %dir.display(),
            files = files.by_id.len(),
            batches = index.order.len(),
            live,
            offset_seconds = offset,
            "emulator state recovered"
        );
        let mut emulator = Emulator::new(config);
        emulator.clock = Clock::resume(offset, floor);
        emulator.files = Mutex::new(files);
        emulator.batches = Mutex::new(index);
        emulator.counters = Mutex::new(counters);
        emulator.journal = Some(journal);
        Ok(emulator)
    }

    /// Writes `events` to the journal and waits until they are durable.
    /// Nothing to do in memory, or with no events.
    fn record(&self, events: Vec<Event>) -> Result<(), ApiError> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        if events.is_empty() {
            return Ok(());
        }
        self.available()?;
        let at = Exact(self.now());
        let (api_calls, realtime_requests) = {
            let c = lock(&self.counters);
            (c.api_calls, c.realtime_requests)
        };
        let entries: Vec<Entry> = events
            .into_iter()
            .map(|event| Entry {
                at,
                api_calls,
                realtime_requests,
                event,
            })
            .collect();
        journal.append(&entries).map_err(|e| {
            self.broken.store(true, Ordering::SeqCst);
            tracing::error!(path = %journal.path().display(), error = %e, "emulator journal write failed; answering 500 from now on");
            broken_error()
        })
    }

    /// Writes a File's content before the event that names it.
    fn write_content(&self, file: &StoredFile) -> Result<(), ApiError> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        self.available()?;
        journal.write_content(&file.id, &file.bytes).map_err(|e| {
            self.broken.store(true, Ordering::SeqCst);
            tracing::error!(id = %file.id, error = %e, "emulator cannot store a file's content; answering 500 from now on");
            broken_error()
        })
    }

    fn remove_content(&self, id: &str) {
        if let Some(journal) = &self.journal {
            journal.remove_content(id);
        }
    }

    /// Err once a journal write has failed.
    pub fn available(&self) -> Result<(), ApiError> {
        if self.broken.load(Ordering::SeqCst) {
            Err(broken_error())
        } else {
            Ok(())
        }
    }

    pub fn config(&self) -> EmulatorConfig {
        lock(&self.config).clone()
    }

    /// Merges a partial config into the live one. A new `seed` restarts the
    /// fault generator so the sequence of failures repeats from there.
    pub fn patch_config(&self, patch: &Value) -> Result<EmulatorConfig, String> {
        let merged = {
            let mut config = lock(&self.config);
            let merged = config.merged(patch)?;
            *config = merged.clone();
            merged
        };
        if patch.get("seed").is_some() {
            *lock(&self.faults) = Faults::seeded(merged.seed);
        }
        tracing::info!(config = ?merged, "emulator config changed");
        Ok(merged)
    }

    /// Seconds a batch created now stays `validating` (drawn when
    /// `turnaround_median_seconds` is set; each call is the next batch).
    fn next_validating_seconds(&self, config: &EmulatorConfig) -> f64 {
        let mut faults = lock(&self.faults);
        let rank = faults.batches_drawn;
        faults.batches_drawn += 1;
        config.validating_seconds_for(rank)
    }

    /// The clock, in fractional unix seconds.
    pub fn now(&self) -> f64 {
        self.clock.now()
    }

    pub fn clock_json(&self) -> Value {
        json!({"now": self.now(), "offset_seconds": *lock(&self.clock.offset)})
    }

    /// Moves the clock forward (durably, before answering).
    pub fn advance_clock(&self, seconds: f64) -> Result<Value, ApiError> {
        if !(seconds.is_finite() && seconds >= 0.0) {
            return Err(ApiError::bad_request(
                format!(
                    "`advance_seconds` must be a finite number >= 0 (time does not run backwards), got {seconds}"
                ),
                Some("advance_seconds"),
                Some("invalid_value"),
            ));
        }
        let _advancing = lock(&self.clock.advancing);
        let offset = *lock(&self.clock.offset) + seconds;
        self.record(vec![Event::Clock {
            offset: Exact(offset),
        }])?;
        *lock(&self.clock.offset) = offset;
        tracing::debug!(seconds, "emulator clock advanced");
        Ok(self.clock_json())
    }

    // ---- counters and faults ----------------------------------------------

    pub fn count_api_call(&self) {
        lock(&self.counters).api_calls += 1;
    }

    pub fn count_realtime(&self) {
        lock(&self.counters).realtime_requests += 1;
    }

    /// Counts a real-time chat answer of `prompt` on `tier`.
    pub fn count_realtime_answer(&self, prompt: &str, tier: &'static str) {
        *lock(&self.counters)
            .realtime_answers
            .entry(prompt.to_owned())
            .or_default()
            .entry(tier)
            .or_default() += 1;
    }

    /// Whether this flex call is refused for want of capacity, by
    /// `flex_unavailable_rate`.
    pub fn roll_flex_unavailable(&self) -> bool {
        let rate = lock(&self.config).flex_unavailable_rate;
        rate > 0.0 && lock(&self.faults).flex.random::<f64>() < rate
    }

    /// Whether this call is to fail by `error_rate`, and with which status.
    pub fn roll_fault(&self) -> Option<u16> {
        let rate = lock(&self.config).error_rate;
        if rate <= 0.0 {
            return None;
        }
        let mut faults = lock(&self.faults);
        if faults.rng.random::<f64>() >= rate {
            return None;
        }
        let status = if faults.next_is_503 { 503 } else { 500 };
        faults.next_is_503 = !faults.next_is_503;
        Some(status)
    }

    /// The stats object. Every batch is brought up to date first, so the
    /// numbers are those of the current clock time.
    pub fn stats(&self) -> Result<Value, ApiError> {
        let now = self.now();
        let all: Vec<Arc<Mutex<Batch>>> = {
            let index = lock(&self.batches);
            index
                .order
                .iter()
                .filter_map(|id| index.by_id.get(id).cloned())
                .collect()
        };
        let mut by_status: BTreeMap<&'static str, u64> =
            Status::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        for batch in &all {
            let mut b = lock(batch);
            self.observe(&mut b, now)?;
            *by_status.entry(b.eval.status.as_str()).or_default() += 1;
        }
        let files = lock(&self.files);
        let files_present = files.by_id.len();
        drop(files);
        let c = lock(&self.counters);
        Ok(json!({
            "files_uploaded": c.files_uploaded,
            "files_present": files_present,
            "batches": all.len(),
            "batches_by_status": by_status,
            "lines_submitted": c.lines_submitted,
            "distinct_custom_ids": c.submitted_ids.len(),
            "executed_lines": c.executed_lines,
            "executed_more_than_once": c.executions.values().filter(|&&n| n > 1).count(),
            "realtime_requests": c.realtime_requests,
            "realtime_answers_by_prompt": c.realtime_answers,
            "api_calls": c.api_calls,
        }))
    }

    // ---- files ------------------------------------------------------------

    /// Stores an upload and answers its File object. Checks the `batch`
    /// quota; the caller checked purpose, name and size.
    pub fn add_file(
        &self,
        filename: String,
        purpose: String,
        bytes: Bytes,
        ttl: Option<i64>,
    ) -> Result<Value, ApiError> {
        let quota = lock(&self.config).max_batch_files();
        let over_quota = |files: &Files| -> Result<(), ApiError> {
            match quota {
                Some(quota) if purpose == "batch" && files.batch_files >= quota => {
                    Err(ApiError::bad_request(
                        format!(
                            "Too many batch files: at most {quota} files of purpose 'batch' may exist at once. \
                             Delete input files of finished batches and try again."
                        ),
                        Some("file"),
                        Some("file_quota_exceeded"),
                    ))
                }
                _ => Ok(()),
            }
        };
        over_quota(&lock(&self.files))?;
        let created_at = self.now() as i64;
        let ttl = ttl.or((purpose == "batch").then_some(FILE_TTL_SECONDS));
        let file = StoredFile {
            id: new_id("file-"),
            bytes,
            created_at,
            expires_at: ttl.map(|t| created_at + t),
            filename,
            purpose: purpose.clone(),
            seq: 0,
        };
        // The content goes to disk outside the lock (it may be large); the
        // event, small, under it, so the quota holds.
        self.write_content(&file)?;
        let mut files = lock(&self.files);
        if let Err(e) = over_quota(&files) {
            drop(files);
            self.remove_content(&file.id);
            return Err(e);
        }
        self.record(vec![Event::FileAdded { file: file.meta() }])?;
        let file = files.insert(file);
        drop(files);
        lock(&self.counters).files_uploaded += 1;
        tracing::debug!(id = %file.id, bytes = file.bytes.len(), purpose = %file.purpose, "file stored");
        Ok(file.to_json())
    }

    pub fn file(&self, id: &str) -> Result<StoredFile, ApiError> {
        lock(&self.files)
            .by_id
            .get(id)
            .cloned()
            .ok_or_else(|| no_such_file(id, "id"))
    }

    pub fn delete_file(&self, id: &str) -> Result<Value, ApiError> {
        let mut files = lock(&self.files);
        if !files.by_id.contains_key(id) {
            return Err(no_such_file(id, "id"));
        }
        self.record(vec![Event::FileDeleted { id: id.to_owned() }])?;
        files.remove(id);
        // An unfinished batch still reads it: its finish removes the content.
        let unused = !files.pins.contains_key(id);
        drop(files);
        if unused {
            self.remove_content(id);
        }
        Ok(json!({"id": id, "object": "file", "deleted": true}))
    }

    pub fn list_files(&self, q: &FileQuery) -> Value {
        let profile = lock(&self.config).profile;
        let limit = q.limit.unwrap_or(10_000);
        let files = lock(&self.files);
        let ordered: Box<dyn Iterator<Item = &String>> = if q.ascending {
            Box::new(files.order.values())
        } else {
            Box::new(files.order.values().rev())
        };
        let mut matching = ordered
            .filter_map(|id| files.by_id.get(id))
            .filter(|f| q.purpose.as_ref().is_none_or(|p| *p == f.purpose));
        if let Some(after) = &q.after {
            // Skip up to and including the cursor; an unknown cursor gives an
            // empty page.
            if !matching.by_ref().any(|f| f.id == *after) {
                return list_json(profile, Vec::new(), false);
            }
        }
        let page: Vec<&StoredFile> = matching.by_ref().take(limit).collect();
        let has_more = matching.next().is_some();
        list_json(
            profile,
            page.into_iter().map(StoredFile::to_json).collect(),
            has_more,
        )
    }

    // ---- batches ----------------------------------------------------------

    /// `POST /v1/batches`: the checks the API makes at once, then a new batch
    /// in `validating`.
    pub fn create_batch(&self, body: &Value) -> Result<Value, ApiError> {
        let Value::Object(body) = body else {
            return Err(ApiError::bad_request(
                "The request body must be a JSON object.",
                None,
                None,
            ));
        };
        let config = self.config();
        let field = |name: &str| -> Result<String, ApiError> {
            match body.get(name) {
                None | Some(Value::Null) => Err(ApiError::missing(name)),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(ApiError::bad_request(
                    format!("Invalid type for '{name}': expected a string, but got {other}."),
                    Some(name),
                    Some("invalid_type"),
                )),
            }
        };
        let input_file_id = field("input_file_id")?;
        let endpoint = field("endpoint")?;
        let completion_window = field("completion_window")?;
        let allowed = validate::allowed_endpoints(config.profile);
        if !allowed.contains(&endpoint.as_str()) {
            return Err(ApiError::bad_request(
                format!(
                    "Invalid value: '{endpoint}'. Supported values are: {}.",
                    allowed
                        .iter()
                        .map(|e| format!("'{e}'"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Some("endpoint"),
                Some("invalid_value"),
            ));
        }
        let window = validate::parse_window(config.profile, &completion_window).map_err(|m| {
            ApiError::bad_request(m, Some("completion_window"), Some("invalid_value"))
        })?;
        let metadata = body.get("metadata").cloned().unwrap_or(Value::Null);
        validate::check_metadata(&metadata)
            .map_err(|m| ApiError::bad_request(m, Some("metadata"), Some("invalid_value")))?;
        let output_ttl = expires_after(body.get("output_expires_after"), "output_expires_after")?;
        let input = {
            let mut files = lock(&self.files);
            let file = files
                .by_id
                .get(&input_file_id)
                .ok_or_else(|| no_such_file(&input_file_id, "input_file_id"))?;
            if file.purpose != "batch" {
                return Err(ApiError::bad_request(
                    format!(
                        "The input file {input_file_id} has purpose '{}'; batches need a file uploaded with purpose 'batch'.",
                        file.purpose
                    ),
                    Some("input_file_id"),
                    Some("invalid_value"),
                ));
            }
            let bytes = file.bytes.clone();
            // Held until the batch finishes, so a durable emulator keeps the
            // content if the File is deleted meanwhile.
            files.pin(&input_file_id);
            bytes
        };
        // Decide the token-limit fault now, so "the next N batches" means the
        // next N created, whatever order they are read in.
        let token_limit = {
            let mut live = lock(&self.config);
            if live.fail_next_batches_token_limit > 0 {
                live.fail_next_batches_token_limit -= 1;
                true
            } else {
                false
            }
        };
        let created = self.now();
        let deadline = created + config.expire_after_seconds.unwrap_or(window);
        let mut batch = Batch::from_meta(BatchMeta {
            id: new_id("batch_"),
            endpoint,
            input_file_id,
            completion_window,
            metadata,
            output_ttl,
            created: Exact(created),
            deadline: Exact(deadline),
            validating: Exact(self.next_validating_seconds(&config)),
            per_request: Exact(config.per_request_seconds),
            finalizing: Exact(config.finalizing_seconds),
            cancel: Exact(config.cancel_seconds),
            profile: config.profile,
            models: config.models.clone(),
            max_lines: config.max_lines(),
            token_limit,
        });
        batch.input = input;
        if let Err(e) = self.record(vec![Event::BatchCreated {
            batch: batch.meta(),
        }]) {
            lock(&self.files).unpin(&batch.input_file_id);
            return Err(e);
        }
        let rendered = render(&batch, config.profile);
        tracing::info!(id = %batch.id, endpoint = %batch.endpoint, token_limit, "batch created");
        let mut index = lock(&self.batches);
        index.order.push(batch.id.clone());
        index
            .by_id
            .insert(batch.id.clone(), Arc::new(Mutex::new(batch)));
        Ok(rendered)
    }

    fn batch(&self, id: &str) -> Result<Arc<Mutex<Batch>>, ApiError> {
        let index = lock(&self.batches);
        let found = index.by_id.get(id).filter(|_| !is_message_batch(id));
        found.cloned().ok_or_else(|| {
            ApiError::not_found(format!("No batch found with id '{id}'."), Some("batch_id"))
        })
    }

    pub fn get_batch(&self, id: &str) -> Result<Value, ApiError> {
        let batch = self.batch(id)?;
        let now = self.now();
        let profile = lock(&self.config).profile;
        let mut b = lock(&batch);
        self.observe(&mut b, now)?;
        Ok(render(&b, profile))
    }

    /// `GET /v1/batches`: newest first, `limit` items after the `after` cursor.
    pub fn list_batches(&self, limit: usize, after: Option<&str>) -> Result<Value, ApiError> {
        let profile = lock(&self.config).profile;
        let (page, has_more) = {
            let index = lock(&self.batches);
            let mut newest_first = index.order.iter().rev().filter(|id| !is_message_batch(id));
            if let Some(after) = after
                && !newest_first.by_ref().any(|id| id == after)
            {
                return Ok(list_json(profile, Vec::new(), false));
            }
            let page: Vec<Arc<Mutex<Batch>>> = newest_first
                .by_ref()
                .take(limit)
                .filter_map(|id| index.by_id.get(id).cloned())
                .collect();
            (page, newest_first.next().is_some())
        };
        let now = self.now();
        let data = page
            .iter()
            .map(|batch| {
                let mut b = lock(batch);
                self.observe(&mut b, now)?;
                Ok(render(&b, profile))
            })
            .collect::<Result<_, ApiError>>()?;
        Ok(list_json(profile, data, has_more))
    }

    /// `POST /v1/batches/{id}/cancel`.
    pub fn cancel_batch(&self, id: &str) -> Result<Value, ApiError> {
        let batch = self.batch(id)?;
        let now = self.now();
        let profile = lock(&self.config).profile;
        let mut b = lock(&batch);
        self.observe(&mut b, now)?;
        let status = b.eval.status;
        let refuse = |code: u16| {
            ApiError::new(
                code,
                format!("Cannot cancel a batch with status '{}'.", status.as_str()),
                None,
                None,
            )
        };
        match (status, profile) {
            (Status::Validating | Status::InProgress | Status::Finalizing, _) => {}
            (Status::Cancelling | Status::Cancelled, Profile::Openai) => {
                return Ok(render(&b, profile));
            }
            (_, Profile::Moonshot) => return Err(refuse(400)),
            (_, Profile::Openai) => return Err(refuse(409)),
        }
        // Work stops now; what ran so far stays. The answer shows `cancelling`
        // even when `cancel_seconds` is 0: the next read shows `cancelled`.
        self.record(vec![Event::Cancelled {
            batch: b.id.clone(),
            at: Exact(now),
        }])?;
        b.spec.cancel_at = Some(now);
        b.eval.status = Status::Cancelling;
        b.eval.cancelling_at = Some(now);
        tracing::info!(id = %b.id, "batch cancelling");
        Ok(render(&b, profile))
    }

    /// Brings a batch to its state at clock time `now`, doing the work due,
    /// and records what it did before anyone can see it.
    fn observe(&self, b: &mut Batch, now: f64) -> Result<(), ApiError> {
        if b.finished {
            return Ok(());
        }
        let mut events = Vec::new();
        if b.spec.outcome.is_none() && b.spec.needs_outcome(now) {
            events.push(self.validate(b));
        }
        let eval = b.spec.eval(now);
        if eval.done > b.executed.len() {
            events.push(self.execute(b, eval.done));
        }
        b.eval = eval;
        if eval.status.is_terminal() {
            self.finish(b, events)
        } else {
            self.record(events)
        }
    }

    /// The end of `validating`: check every line, decide the outcome.
    fn validate(&self, b: &mut Batch) -> Event {
        let report = validate::check_file(&b.input, &b.rules);
        {
            let mut c = lock(&self.counters);
            c.lines_submitted += report.lines;
            c.submitted_ids.extend(report.custom_ids.iter().cloned());
        }
        b.model = report.model;
        let outcome = if !report.errors.is_empty() {
            b.errors = Some(report.errors.iter().map(LineError::to_json).collect());
            Outcome::Invalid
        } else if b.token_limit {
            let model = b.model.as_deref().unwrap_or("the model");
            let error = LineError {
                code: "token_limit_exceeded",
                message: format!(
                    "Enqueued token limit reached for {model} in organization org-emulator. \
                     Please try again once some in_progress batches have been completed."
                ),
                param: None,
                line: None,
            };
            b.errors = Some(vec![error.to_json()]);
            Outcome::Invalid
        } else {
            b.good = report.good;
            Outcome::Valid {
                lines: b.good.len(),
            }
        };
        if outcome == Outcome::Invalid {
            b.input = Bytes::new();
        }
        tracing::debug!(id = %b.id, ?outcome, "batch validated");
        b.spec.outcome = Some(outcome);
        Event::Validated {
            batch: b.id.clone(),
            lines: report.lines,
            custom_ids: report.custom_ids,
            model: b.model.clone(),
            errors: b.errors.clone(),
            valid_lines: match outcome {
                Outcome::Valid { lines } => Some(lines),
                Outcome::Invalid => None,
            },
        }
    }

    /// Runs good lines up to index `upto` (exclusive), in input order, and
    /// counts the executions.
    fn execute(&self, b: &mut Batch, upto: usize) -> Event {
        let ids = run_lines(b, upto);
        let mut c = lock(&self.counters);
        c.count_executions(&ids);
        Event::Executed {
            batch: b.id.clone(),
            upto: b.executed.len(),
            custom_ids: ids,
        }
    }

    /// The end of a batch: write the output and error files (each only if it
    /// has a line) and let go of the input. `events` (the steps that led
    /// here) are recorded with the end, after the files' contents are on disk
    /// and before the files can be seen.
    ///
    /// Lines are written in the reverse of the order they ran, so a client
    /// cannot rely on output order matching input order (the real API makes
    /// no such promise either); lines cut off by expiry or cancel come last in
    /// the error file, also reversed.
    fn finish(&self, b: &mut Batch, mut events: Vec<Event>) -> Result<(), ApiError> {
        b.finished = true;
        let cut_off = match b.eval.status {
            Status::Expired => Some((
                "batch_expired",
                "This request could not be executed before the completion window expired.",
            )),
            Status::Cancelled => Some((
                "batch_cancelled",
                "This request was not executed because the batch was cancelled.",
            )),
            _ => None,
        };
        // Sized up front: outputs of large batches are hundreds of megabytes.
        let size = |ok: bool| -> usize {
            b.executed
                .iter()
                .filter(|e| e.ok == ok)
                .map(|e| e.line.len() + 1)
                .sum()
        };
        let mut output = Vec::with_capacity(size(true));
        let mut errors = Vec::with_capacity(size(false));
        for e in b.executed.iter().rev() {
            let file = if e.ok { &mut output } else { &mut errors };
            file.extend_from_slice(e.line.as_bytes());
            file.push(b'\n');
        }
        if let Some((code, message)) = cut_off {
            for good in b.good[b.executed.len().min(b.good.len())..].iter().rev() {
                let line = json!({
                    "id": new_id("batch_req_"),
                    "custom_id": good.custom_id,
                    "response": null,
                    "error": {"code": code, "message": message},
                });
                errors.extend_from_slice(line.to_string().as_bytes());
                errors.push(b'\n');
            }
        }
        let created_at = self.now() as i64;
        let ttl = b.output_ttl.unwrap_or(FILE_TTL_SECONDS);
        let file = |content: Vec<u8>, kind: &str| {
            (!content.is_empty()).then(|| StoredFile {
                id: new_id("file-"),
                bytes: Bytes::from(content),
                created_at,
                expires_at: Some(created_at + ttl),
                filename: format!("{}_{kind}.jsonl", b.id),
                purpose: "batch_output".to_owned(),
                seq: 0,
            })
        };
        let output = file(output, "output");
        let error = file(errors, "error");
        for f in output.iter().chain(&error) {
            self.write_content(f)?;
        }
        events.push(Event::Finished {
            batch: b.id.clone(),
            completed: b.completed,
            failed: b.failed,
            prompt_tokens: b.usage.prompt,
            completion_tokens: b.usage.completion,
            output: output.as_ref().map(StoredFile::meta),
            error: error.as_ref().map(StoredFile::meta),
        });
        self.record(events)?;
        b.output_file_id = output.as_ref().map(|f| f.id.clone());
        b.error_file_id = error.as_ref().map(|f| f.id.clone());
        let mut files = lock(&self.files);
        for f in output.into_iter().chain(error) {
            files.insert(f);
        }
        let unused = files.unpin(&b.input_file_id);
        drop(files);
        if unused {
            self.remove_content(&b.input_file_id);
        }
        b.executed = Vec::new();
        b.good = Vec::new();
        b.input = Bytes::new();
        tracing::info!(
            id = %b.id,
            status = b.eval.status.as_str(),
            completed = b.completed,
            failed = b.failed,
            "batch finished"
        );
        Ok(())
    }
}

/// The answers of good lines up to index `upto` (exclusive) not run yet, in
/// input order, kept in the batch until its files are written; returns their
/// custom ids. A pure function of the input apart from the response ids, so
/// a durable emulator runs them again on replay.
fn run_lines(b: &mut Batch, upto: usize) -> Vec<String> {
    let start = b.executed.len();
    let mut ids = Vec::with_capacity(upto.saturating_sub(start));
    for i in start..upto {
        let Some(good) = b.good.get(i) else { break };
        // Each line finishes one `per_request` period after the previous.
        let finished = b.spec.validated_at() + (i + 1) as f64 * b.spec.timing.per_request;
        let body = b
            .input
            .get(good.range.clone())
            .and_then(|text| serde_json::from_slice::<Value>(text).ok())
            .and_then(|mut line| match line.get_mut("body").map(Value::take) {
                Some(Value::Object(body)) => Some(body),
                _ => None,
            })
            .unwrap_or_default();
        let answer = model::answer(
            &b.endpoint,
            &body,
            &response_id(&b.endpoint),
            finished as i64,
        );
        let status = answer.status();
        let (ok, response_body) = match answer {
            Answer::Ok { body, usage } => {
                b.usage.prompt += usage.prompt;
                b.usage.completion += usage.completion;
                (true, body)
            }
            Answer::Failed { body, .. } => (false, body),
        };
        if ok {
            b.completed += 1;
        } else {
            b.failed += 1;
        }
        let line = json!({
            "id": new_id("batch_req_"),
            "custom_id": good.custom_id,
            "response": {
                "status_code": status,
                "request_id": new_id("req_"),
                "body": response_body,
            },
            "error": null,
        });
        b.executed.push(Executed {
            ok,
            line: line.to_string(),
        });
        ids.push(good.custom_id.clone());
    }
    ids
}

impl Counters {
    fn count_executions(&mut self, ids: &[String]) {
        self.executed_lines += ids.len() as u64;
        for id in ids {
            *self.executions.entry(id.clone()).or_default() += 1;
        }
    }
}

/// The clock offset after a restart: the one written down, moved forward if
/// the system clock now reads so early that time would otherwise go back
/// behind `floor`, the last time the previous run wrote down.
/// A batch created by the Anthropic routes, which the OpenAI ones do not show.
fn is_message_batch(id: &str) -> bool {
    id.starts_with(super::anthropic::batches::ID_PREFIX)
}

fn resumed_offset(real_now: f64, offset: f64, floor: f64) -> f64 {
    if real_now + offset < floor {
        floor - real_now
    } else {
        offset
    }
}

fn broken_error() -> ApiError {
    ApiError::internal(
        "The emulator could not write its state to disk and stopped serving; see its log.",
    )
}

/// The state rebuilt from the journal's events, in order.
#[derive(Default)]
struct Replay {
    offset: f64,
    floor: f64,
    files: Files,
    counters: Counters,
    /// Every batch in creation order, and how many of its good lines had run.
    batches: Vec<(Batch, usize)>,
    /// Batch id → its place in `batches`.
    positions: HashMap<String, usize>,
    /// Message Batches deleted (only ended ones can be).
    deleted: HashSet<String>,
}

impl Replay {
    fn batch(&mut self, id: &str) -> Result<&mut (Batch, usize), String> {
        self.positions
            .get(id)
            .and_then(|&i| self.batches.get_mut(i))
            .ok_or_else(|| format!("an event about batch {id}, which was never created"))
    }

    fn apply(&mut self, entry: Entry) -> Result<(), String> {
        self.floor = self.floor.max(entry.at.0);
        let c = &mut self.counters;
        c.api_calls = c.api_calls.max(entry.api_calls);
        c.realtime_requests = c.realtime_requests.max(entry.realtime_requests);
        match entry.event {
            Event::Format { .. } => {}
            Event::FileAdded { file } => {
                self.files.insert(StoredFile::from_meta(file, Bytes::new()));
                self.counters.files_uploaded += 1;
            }
            Event::FileDeleted { id } => {
                self.files.remove(&id);
            }
            Event::BatchCreated { batch } => {
                self.positions.insert(batch.id.clone(), self.batches.len());
                self.batches.push((Batch::from_meta(batch), 0));
            }
            Event::Validated {
                batch,
                lines,
                custom_ids,
                model,
                errors,
                valid_lines,
            } => {
                self.counters.lines_submitted += lines;
                self.counters.submitted_ids.extend(custom_ids);
                let (b, _) = self.batch(&batch)?;
                b.model = model;
                b.errors = errors;
                b.spec.outcome = Some(match valid_lines {
                    Some(lines) => Outcome::Valid { lines },
                    None => Outcome::Invalid,
                });
            }
            Event::Executed {
                batch,
                upto,
                custom_ids,
            } => {
                self.counters.count_executions(&custom_ids);
                self.batch(&batch)?.1 = upto;
            }
            Event::Cancelled { batch, at } => self.batch(&batch)?.0.spec.cancel_at = Some(at.0),
            Event::Finished {
                batch,
                completed,
                failed,
                prompt_tokens,
                completion_tokens,
                output,
                error,
            } => {
                let (b, _) = self.batch(&batch)?;
                b.finished = true;
                b.completed = completed;
                b.failed = failed;
                b.usage = Usage {
                    prompt: prompt_tokens,
                    completion: completion_tokens,
                };
                // A terminal status does not change with time.
                b.eval = b.spec.eval(f64::INFINITY);
                b.output_file_id = output.as_ref().map(|f| f.id.clone());
                b.error_file_id = error.as_ref().map(|f| f.id.clone());
                for f in output.into_iter().chain(error) {
                    self.files.insert(StoredFile::from_meta(f, Bytes::new()));
                }
            }
            Event::BatchDeleted { batch, files } => {
                self.batch(&batch)?;
                for id in files {
                    self.files.remove(&id);
                }
                self.deleted.insert(batch);
            }
            Event::Clock { offset } => self.offset = self.offset.max(offset.0),
        }
        Ok(())
    }
}

/// The `id` of a response body, with the prefix of its endpoint.
fn response_id(endpoint: &str) -> String {
    match endpoint {
        "/v1/completions" => new_id("cmpl-"),
        "/v1/responses" => new_id("resp_"),
        "/v1/messages" => new_id("msg_"),
        _ => new_id("chatcmpl-"),
    }
}

fn no_such_file(id: &str, param: &str) -> ApiError {
    ApiError::not_found(format!("No such File object: {id}"), Some(param))
}

/// Parses `expires_after` / `output_expires_after` (`{anchor: created_at,
/// seconds: 3600..=2592000}`) into seconds.
pub fn expires_after(value: Option<&Value>, name: &str) -> Result<Option<i64>, ApiError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let bad = |m: &str| ApiError::bad_request(m.to_owned(), Some(name), Some("invalid_value"));
    if value.get("anchor").and_then(Value::as_str) != Some("created_at") {
        return Err(bad(&format!("'{name}.anchor' must be 'created_at'.")));
    }
    match value.get("seconds").and_then(Value::as_i64) {
        Some(s) if (3600..=2_592_000).contains(&s) => Ok(Some(s)),
        _ => Err(bad(&format!(
            "'{name}.seconds' must be an integer between 3600 and 2592000."
        ))),
    }
}

/// A list page: `first_id`/`last_id` only under the OpenAI profile.
fn list_json(profile: Profile, data: Vec<Value>, has_more: bool) -> Value {
    let mut list = Map::new();
    list.insert("object".into(), json!("list"));
    if profile == Profile::Openai {
        let id = |v: Option<&Value>| v.and_then(|v| v.get("id")).cloned().unwrap_or(Value::Null);
        list.insert("first_id".into(), id(data.first()));
        list.insert("last_id".into(), id(data.last()));
    }
    list.insert("data".into(), Value::Array(data));
    list.insert("has_more".into(), json!(has_more));
    Value::Object(list)
}

/// The Batch object. Every key is always present (unset ones `null`); the
/// Moonshot profile leaves out `errors`, `expired_at`, `usage` and `model`.
fn render(b: &Batch, profile: Profile) -> Value {
    let e = &b.eval;
    let at = |t: Option<f64>| t.map(|t| t.floor() as i64);
    let total = b.good_total();
    let mut o = Map::new();
    o.insert("id".into(), json!(b.id));
    o.insert("object".into(), json!("batch"));
    o.insert("endpoint".into(), json!(b.endpoint));
    if profile == Profile::Openai {
        o.insert("model".into(), json!(b.model));
        let errors = b
            .errors
            .as_ref()
            .map(|errs| json!({"object": "list", "data": errs}));
        o.insert("errors".into(), errors.unwrap_or(Value::Null));
    }
    o.insert("input_file_id".into(), json!(b.input_file_id));
    o.insert("completion_window".into(), json!(b.completion_window));
    o.insert("status".into(), json!(e.status.as_str()));
    o.insert("output_file_id".into(), json!(b.output_file_id));
    o.insert("error_file_id".into(), json!(b.error_file_id));
    o.insert("created_at".into(), json!(b.spec.created.floor() as i64));
    o.insert("in_progress_at".into(), json!(at(e.in_progress_at)));
    o.insert("expires_at".into(), json!(b.spec.deadline.floor() as i64));
    o.insert("finalizing_at".into(), json!(at(e.finalizing_at)));
    o.insert("completed_at".into(), json!(at(e.completed_at)));
    o.insert("failed_at".into(), json!(at(e.failed_at)));
    if profile == Profile::Openai {
        o.insert("expired_at".into(), json!(at(e.expired_at)));
    }
    o.insert("cancelling_at".into(), json!(at(e.cancelling_at)));
    o.insert("cancelled_at".into(), json!(at(e.cancelled_at)));
    o.insert(
        "request_counts".into(),
        json!({"total": total, "completed": b.completed, "failed": b.failed}),
    );
    if profile == Profile::Openai {
        let usage = (b.completed > 0).then(|| {
            json!({
                "input_tokens": b.usage.prompt,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": b.usage.completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": b.usage.total(),
            })
        });
        o.insert("usage".into(), usage.unwrap_or(Value::Null));
    }
    o.insert("metadata".into(), b.metadata.clone());
    Value::Object(o)
}

impl Batch {
    /// A batch as created, before anything was observed (its input is
    /// set by the caller: the upload's bytes, or at replay the file's).
    fn from_meta(m: BatchMeta) -> Batch {
        let spec = Spec {
            created: m.created.0,
            timing: Timing {
                validating: m.validating.0,
                per_request: m.per_request.0,
                finalizing: m.finalizing.0,
                cancel: m.cancel.0,
            },
            deadline: m.deadline.0,
            outcome: None,
            cancel_at: None,
        };
        Batch {
            id: m.id,
            endpoint: m.endpoint.clone(),
            input_file_id: m.input_file_id,
            completion_window: m.completion_window,
            metadata: m.metadata,
            output_ttl: m.output_ttl,
            spec,
            rules: Rules {
                profile: m.profile,
                endpoint: m.endpoint,
                models: m.models,
                max_lines: m.max_lines,
            },
            token_limit: m.token_limit,
            input: Bytes::new(),
            eval: spec.eval(f64::NEG_INFINITY),
            model: None,
            errors: None,
            good: Vec::new(),
            executed: Vec::new(),
            completed: 0,
            failed: 0,
            usage: Usage::default(),
            output_file_id: None,
            error_file_id: None,
            finished: false,
        }
    }

    /// What the journal keeps of a new batch.
    fn meta(&self) -> BatchMeta {
        let s = &self.spec;
        BatchMeta {
            id: self.id.clone(),
            endpoint: self.endpoint.clone(),
            input_file_id: self.input_file_id.clone(),
            completion_window: self.completion_window.clone(),
            metadata: self.metadata.clone(),
            output_ttl: self.output_ttl,
            created: Exact(s.created),
            deadline: Exact(s.deadline),
            validating: Exact(s.timing.validating),
            per_request: Exact(s.timing.per_request),
            finalizing: Exact(s.timing.finalizing),
            cancel: Exact(s.timing.cancel),
            profile: self.rules.profile,
            models: self.rules.models.clone(),
            max_lines: self.rules.max_lines,
            token_limit: self.token_limit,
        }
    }

    /// Request lines that passed validation (0 before validation ends or when
    /// it failed).
    fn good_total(&self) -> u64 {
        match self.spec.outcome {
            Some(Outcome::Valid { lines }) => lines as u64,
            _ => 0,
        }
    }
}

mod anthropic;
#[cfg(test)]
mod tests;
