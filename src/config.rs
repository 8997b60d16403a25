//! Configuration: TOML deserialised into plain `Raw*` structs that reject
//! unknown keys, then validated once into [`Config`], whose values are typed
//! and resolved. Nothing after start-up reads the raw form.
//!
//! Every key is documented in README.md ("Configuration reference"); the
//! defaults stated there are the ones written here.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use std::num::NonZeroU32;

use crate::delivery::webhooks::{AllowEntry, WebhookSettings, decode_secret};
use crate::emulator::EmulatorConfig;
use crate::upstream::profile::{ProviderKind, ProviderProfile};

/// The embedded default configuration: the built-in emulator as upstream and
/// one demo tenant, so that `cargo run --release` works with no API key.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config/ferry.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config is not valid TOML or has an unknown/mistyped key: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------- raw form

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    /// Present when some upstream uses `emulator = true`; knobs of the
    /// embedded Batch API emulator.
    #[serde(default)]
    emulator: Option<EmulatorConfig>,
    upstreams: Vec<RawUpstream>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    default_upstream: Option<String>,
    tenants: Vec<RawTenant>,
    #[serde(default)]
    webhooks: RawWebhooks,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    retention: RawRetention,
    /// Real-time prices per model, for the savings estimate.
    #[serde(default)]
    prices: HashMap<String, Price>,
}

/// `[storage]`: where Ferry keeps its state.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStorage {
    kind: String,
    url_env: Option<String>,
    pool_size: usize,
    lease_secs: f64,
}

impl Default for RawStorage {
    fn default() -> Self {
        RawStorage {
            kind: "sled".into(),
            url_env: None,
            pool_size: 16,
            lease_secs: 15.0,
        }
    }
}

/// `[retention]`: how long finished work is kept.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRetention {
    terminal_secs: u64,
    slice_rows: usize,
    interval_secs: f64,
    census_secs: f64,
}

impl Default for RawRetention {
    fn default() -> Self {
        RawRetention {
            terminal_secs: 30 * 86_400,
            slice_rows: 500,
            interval_secs: 60.0,
            census_secs: 3600.0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawWebhooks {
    max_age_secs: f64,
    retry_base_secs: f64,
    retry_cap_secs: f64,
    timeout_secs: f64,
    concurrency: usize,
    per_host_concurrency: usize,
}

impl Default for RawWebhooks {
    fn default() -> Self {
        RawWebhooks {
            max_age_secs: 86400.0,
            retry_base_secs: 5.0,
            retry_cap_secs: 3600.0,
            timeout_secs: 10.0,
            concurrency: 64,
            per_host_concurrency: 4,
        }
    }
}

/// An upstream's batch events route: a path outside Ferry's and the
/// API's namespaces, and a secret, both or neither. `Err` names the key.
fn batch_events(
    path: Option<String>,
    secret: Option<String>,
    secret_env: Option<String>,
    anthropic: bool,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<BatchEventsSettings>, (&'static str, String)> {
    let secret = match (secret, secret_env) {
        (Some(s), None) => Some(s),
        (None, Some(name)) => Some(env(&name).ok_or_else(|| {
            (
                "batch_events_secret_env",
                format!("environment variable `{name}` is not set"),
            )
        })?),
        (None, None) => None,
        (Some(_), Some(_)) => {
            return Err((
                "batch_events_secret",
                "give batch_events_secret or batch_events_secret_env, not both".into(),
            ));
        }
    };
    let (path, secret) = match (path, secret) {
        (None, None) => return Ok(None),
        (Some(p), Some(s)) => (p, s),
        (Some(_), None) => {
            return Err((
                "batch_events_secret",
                "batch_events_path needs a secret".into(),
            ));
        }
        (None, Some(_)) => {
            return Err((
                "batch_events_path",
                "a batch events secret needs a path".into(),
            ));
        }
    };
    if anthropic {
        return Err((
            "batch_events_path",
            "batch events are OpenAI's; an Anthropic upstream has none".into(),
        ));
    }
    if !path.starts_with('/')
        || path == "/v1"
        || path.starts_with("/v1/")
        || path == "/healthz"
        || path == "/readyz"
    {
        return Err((
            "batch_events_path",
            "must start with `/` and lie outside `/v1/`, `/healthz` and `/readyz`".into(),
        ));
    }
    let key = decode_secret(&secret).map_err(|m| ("batch_events_secret", m))?;
    Ok(Some(BatchEventsSettings { path, key }))
}

/// A tenant's `lanes`: known names, no repeats, `batch` among them (a
/// deferred call always starts in a batch).
fn tenant_lanes(names: &[String]) -> Result<crate::batch::lanes::TenantLanes, String> {
    let mut seen = Vec::new();
    for n in names {
        let lane = crate::store::Lane::parse(n)
            .ok_or_else(|| format!("unknown lane `{n}` (batch, flex, standard)"))?;
        if seen.contains(&lane) {
            return Err(format!("lane `{n}` given twice"));
        }
        seen.push(lane);
    }
    if !seen.contains(&crate::store::Lane::Batch) {
        return Err("must include `batch`: a deferred call starts in a batch".into());
    }
    Ok(crate::batch::lanes::TenantLanes {
        flex: seen.contains(&crate::store::Lane::Flex),
        standard: seen.contains(&crate::store::Lane::Standard),
    })
}

/// Real-time list prices of a model in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub prompt_per_mtok: f64,
    pub completion_per_mtok: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: String,
    admin_listen: String,
    data_dir: String,
    threads: usize,
    max_body_bytes: u64,
    max_wait_secs: u64,
    upstream_connect_timeout_secs: u64,
    upstream_read_timeout_secs: u64,
    shutdown_grace_secs: u64,
    sse_keepalive_secs: f64,
    body_read_timeout_secs: f64,
    max_queued: u64,
    upstream_ca_file: Option<String>,
    cache_mb: u64,
    min_free_mb: u64,
    log_format: String,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9090".into(),
            data_dir: "data/ferry".into(),
            threads: 2,
            max_body_bytes: 16 * 1024 * 1024,
            max_wait_secs: 900,
            upstream_connect_timeout_secs: 10,
            upstream_read_timeout_secs: 600,
            shutdown_grace_secs: 10,
            sse_keepalive_secs: 10.0,
            body_read_timeout_secs: 30.0,
            max_queued: 5_000_000,
            upstream_ca_file: None,
            cache_mb: 64,
            min_free_mb: 512,
            log_format: "text".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    kind: ProviderKind,
    base_url: Option<String>,
    #[serde(default)]
    emulator: bool,
    api_key_env: Option<String>,
    completion_window: Option<String>,
    max_requests: Option<usize>,
    max_bytes: Option<u64>,
    max_wait_secs: Option<f64>,
    poll_interval_secs: Option<f64>,
    calls_per_second: Option<u32>,
    batches_per_hour: Option<u32>,
    forbidden_params: Option<Vec<String>>,
    batch_discount: Option<f64>,
    max_attempts: Option<u32>,
    expired_policy: Option<ExpiredPolicy>,
    token_limit_backoff_secs: Option<f64>,
    models: Option<Vec<String>>,
    lost_after_secs: Option<f64>,
    anthropic_version: Option<String>,
    cache_ttl_1h: Option<bool>,
    #[serde(default)]
    flex_models: Vec<String>,
    flex_latency_prior_secs: Option<f64>,
    batch_latency_prior_secs: Option<f64>,
    standard_latency_prior_secs: Option<f64>,
    escalation_margin_secs: Option<f64>,
    /// A path on the proxy port where OpenAI's batch events for this
    /// upstream's account arrive; off by default.
    batch_events_path: Option<String>,
    /// The `whsec_...` secret the events are signed with, or the
    /// environment variable holding it.
    batch_events_secret: Option<String>,
    batch_events_secret_env: Option<String>,
}

/// Why [`openai_only_key`]s are refused on an Anthropic upstream.
const OPENAI_ONLY: &str = "is only for OpenAI-shaped upstreams: Anthropic has no flex tier \
     and its Message Batches fail no batch for an enqueued-token limit";

/// The first key set on `u` that only an OpenAI-shaped upstream uses: the
/// flex lane (`service_tier: "flex"`, which Anthropic's Messages API does
/// not have) and the pause after `token_limit_exceeded` (an OpenAI batch
/// failure with no Message Batches counterpart). Set on an Anthropic
/// upstream they would promise something that never happens.
fn openai_only_key(u: &RawUpstream) -> Option<&'static str> {
    [
        ("flex_models", !u.flex_models.is_empty()),
        (
            "flex_latency_prior_secs",
            u.flex_latency_prior_secs.is_some(),
        ),
        (
            "token_limit_backoff_secs",
            u.token_limit_backoff_secs.is_some(),
        ),
    ]
    .into_iter()
    .find_map(|(name, set)| set.then_some(name))
}

/// What becomes of requests a batch did not finish before its window ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpiredPolicy {
    /// Send them again in a new batch, up to `max_attempts` batches in all.
    Requeue,
    /// Mark them `expired` at once.
    Fail,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    model: Option<String>,
    prefix: Option<String>,
    upstream: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    name: String,
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    key_envs: Vec<String>,
    #[serde(default)]
    key_sha256: Vec<String>,
    #[serde(default)]
    default_mode: Mode,
    #[serde(default)]
    default_wait_secs: u64,
    /// The deadline of a deferred call without `X-Ferry-Deadline`; none by
    /// default.
    default_deadline_secs: Option<u64>,
    /// The lanes the tenant's requests may take, of `batch`, `flex`,
    /// `standard`; all three by default. `batch` is required.
    lanes: Option<Vec<String>>,
    /// At most this many standard-lane calls per hour; no cap by default.
    max_standard_per_hour: Option<u32>,
    /// `scheme://host[:port]` entries; host may be `*` or `*.domain`, port `*`.
    #[serde(default)]
    callback_allow: Vec<String>,
    webhook_secret: Option<String>,
    webhook_secret_env: Option<String>,
    intake_rps: Option<u32>,
    intake_burst: Option<u32>,
    passthrough_rps: Option<u32>,
    passthrough_burst: Option<u32>,
}

// ------------------------------------------------------------ validated form

/// Whether a tenant's calls are deferred when they carry no `Prefer` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Passthrough,
    Defer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Public proxy address; port 0 lets the OS choose (announced on stdout).
    pub listen: SocketAddr,
    /// Metrics and admin routes.
    pub admin_listen: SocketAddr,
    /// The sled database directory.
    pub data_dir: PathBuf,
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// Largest deferred request body accepted (413 above it).
    pub max_body_bytes: u64,
    /// The most any caller may ask to be held (`wait=N`, `?wait=S`).
    pub max_wait: Duration,
    pub upstream_connect_timeout: Duration,
    pub upstream_read_timeout: Duration,
    /// How long SIGTERM waits for held connections before exiting.
    pub shutdown_grace: Duration,
    /// How often a waiting SSE replay sends a keep-alive comment.
    pub sse_keepalive: Duration,
    /// Deadline for a deferred call's whole body (408 after it).
    pub body_read_timeout: Duration,
    /// Queued requests (all queues) above which deferred intake answers 503.
    pub max_queued: u64,
    /// PEM file of the CA(s) that sign the upstreams' TLS certificates, for
    /// private CAs. Passthrough then trusts only these; the Batch API client
    /// trusts them in addition to the system roots.
    pub upstream_ca_file: Option<PathBuf>,
    /// sled's page cache in bytes, as sled counts them (on-disk size; small
    /// entries take about twice that in memory).
    pub cache_bytes: u64,
    /// Free space the embedded store keeps on data_dir's filesystem: below
    /// it deferred intake answers 503; below half, claims and result
    /// ingestion wait too (0: no reserve).
    pub min_free_bytes: u64,
    pub log_format: LogFormat,
}

/// Where an upstream's API lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTarget {
    /// `base_url`, e.g. `https://api.openai.com/v1`.
    Url(String),
    /// The built-in emulator started beside Ferry; resolved at start.
    Emulator,
}

#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub name: String,
    pub profile: ProviderProfile,
    pub target: UpstreamTarget,
    /// Name of the environment variable holding the upstream key (absent for the emulator).
    pub api_key_env: Option<String>,
    pub completion_window: String,
    /// Flush thresholds; never above the profile's limits.
    pub max_requests: usize,
    pub max_bytes: u64,
    pub max_wait: Duration,
    pub poll_interval: Duration,
    /// Upstream API calls per second (polls, downloads, uploads), shared.
    pub calls_per_second: u32,
    /// Batch creations per hour.
    pub batches_per_hour: u32,
    /// Fraction of the real-time price the Batch API saves (0.5 = half price).
    pub batch_discount: f64,
    /// Batches one request may be sent in before Ferry gives up on it.
    pub max_attempts: u32,
    pub expired_policy: ExpiredPolicy,
    /// Pause of this upstream's flushes after `token_limit_exceeded`.
    pub token_limit_backoff: Duration,
    /// The models deferred calls may name (`models`); `None` takes any.
    /// Each model is its own queue and metric series, so a gateway open to
    /// untrusted tenants should list them.
    pub models: Option<Vec<String>>,
    /// How long a submitted batch may be answered `404` (every poll, without
    /// a success between) before it is given up as lost and its requests are
    /// sent again. At least [`LOST_AFTER_MIN_POLLS`] poll intervals.
    pub lost_after: Duration,
    /// `kind = "anthropic"` only: the `anthropic-version` Ferry sends
    /// upstream (default `2023-06-01`) when the caller sent none.
    pub anthropic_version: Option<String>,
    /// Models whose synchronous calls take `service_tier: "flex"`: a
    /// request of one of them escalated for its deadline goes flex first.
    pub flex_models: Vec<String>,
    /// What the synchronous lanes are expected to take, until observed
    /// latencies replace them (see [`crate::batch::lanes`]).
    pub lane_priors: crate::batch::lanes::LanePriors,
    /// Time kept in hand beyond a lane's expected time when escalating.
    pub escalation_margin: Duration,
    /// Where OpenAI's batch events arrive, and the key they are signed
    /// with (see [`crate::batch::events`]); `None`: not received.
    pub batch_events: Option<BatchEventsSettings>,
}

/// The route that receives an upstream's batch events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchEventsSettings {
    /// A path on the proxy port, outside `/v1/`.
    pub path: String,
    /// The decoded `whsec_` secret.
    pub key: Vec<u8>,
}

impl UpstreamSettings {
    /// Whether deferred calls for `model` are taken.
    pub fn serves_model(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == model))
    }
}

/// `lost_after_secs` must span at least this many poll intervals, so one
/// upstream hiccup answering `404` for a few polls cannot lose a batch.
pub const LOST_AFTER_MIN_POLLS: u32 = 10;

#[derive(Debug, Clone)]
pub enum RouteMatch {
    Exact(String),
    Prefix(String),
}

#[derive(Debug, Clone)]
pub struct Route {
    pub matcher: RouteMatch,
    pub upstream: usize,
}

/// Requests per second and burst of a tenant's rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSetting {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

#[derive(Debug)]
pub struct Tenant {
    pub name: String,
    pub default_mode: Mode,
    pub default_wait: Duration,
    pub callback_allow: Vec<AllowEntry>,
    /// The decoded `whsec_` secret webhooks are signed with.
    pub webhook_key: Option<Vec<u8>>,
    pub deferred_rate: Option<RateSetting>,
    pub passthrough_rate: Option<RateSetting>,
    /// Seconds after acceptance a deferred call without `X-Ferry-Deadline`
    /// is due; `None`: no deadline.
    pub default_deadline: Option<u64>,
    /// The synchronous lanes a request of the tenant may step up to for
    /// its deadline (batch is always allowed).
    pub lanes: crate::batch::lanes::TenantLanes,
    /// At most this many standard-lane calls per hour (this node's count);
    /// `None`: no cap.
    pub max_standard_per_hour: Option<NonZeroU32>,
}

/// Where Ferry keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageSettings {
    /// sled in `server.data_dir`: one node, nothing to install.
    Sled,
    /// PostgreSQL, shared by the nodes of a cluster. The URL is read from
    /// the environment variable `url_env` at start, never from the file
    /// (it may hold a password). `lease` is how long a node owns an
    /// upstream without renewing: how soon another node takes over from one
    /// that died.
    Postgres {
        url_env: String,
        pool_size: usize,
        lease: Duration,
    },
}

impl StorageSettings {
    /// How long an upstream's lease lasts unless renewed (one node: moot).
    pub fn lease(&self) -> Duration {
        match self {
            StorageSettings::Sled => Duration::from_secs(15),
            StorageSettings::Postgres { lease, .. } => *lease,
        }
    }
}

/// How long finished work is kept, and how the purge paces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionSettings {
    /// How long a terminal request (completed, failed, expired, cancelled)
    /// stays answerable — status, result, webhook state — after it
    /// finished; then it is purged and answers `404`, and its custom id is
    /// free again. Default 30 days.
    pub terminal: Duration,
    /// Requests (or batch records) one purge slice removes at most: the
    /// bound on how long one slice holds the store. Default 500.
    pub slice_rows: usize,
    /// The pause between purge passes once nothing more is due. Default 60 s.
    pub interval: Duration,
    /// How often the rows and bytes of each kind of data are counted (a
    /// walk of every sled tree; one statistics query on PostgreSQL).
    /// Default 3600 s.
    pub census: Duration,
}

impl RetentionSettings {
    /// The store's view of these settings.
    pub fn policy(&self) -> crate::store::lifecycle::Retention {
        crate::store::lifecycle::Retention {
            terminal_secs: self.terminal.as_secs(),
            slice_rows: self.slice_rows,
        }
    }
}

#[derive(Debug)]
pub struct Config {
    pub server: ServerSettings,
    pub storage: StorageSettings,
    pub retention: RetentionSettings,
    pub emulator: Option<EmulatorConfig>,
    pub upstreams: Vec<UpstreamSettings>,
    pub routes: Vec<Route>,
    /// Where OpenAI-shaped passthrough goes, and deferred calls no route
    /// matches. OpenAI-shaped unless every upstream is Anthropic.
    pub default_upstream: usize,
    /// Where Anthropic passthrough goes: the first `kind = "anthropic"`
    /// upstream, if any.
    pub anthropic_upstream: Option<usize>,
    pub tenants: Vec<Arc<Tenant>>,
    /// SHA-256 of each caller key → tenant. Keys are kept only as hashes.
    pub keys: HashMap<[u8; 32], Arc<Tenant>>,
    pub webhooks: WebhookSettings,
    pub prices: HashMap<String, Price>,
}

/// SHA-256 of a caller key, the form in which keys are held and compared.
pub fn key_hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl Config {
    /// Loads a config file, or the embedded default when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            None => Config::parse(EMBEDDED_DEFAULT),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                Config::parse(&text)
            }
        }
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text)?;
        raw.validate(&|name| std::env::var(name).ok())
    }

    /// Like [`Config::parse`] with a custom environment, for tests.
    pub fn parse_with_env(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text)?;
        raw.validate(env)
    }

    /// Every model name the config itself names: upstream `models` lists,
    /// the price table and exact routes.
    pub fn known_models(&self) -> Vec<String> {
        let listed = self
            .upstreams
            .iter()
            .flat_map(|u| u.models.iter().flatten());
        let routed = self.routes.iter().filter_map(|r| match &r.matcher {
            RouteMatch::Exact(m) => Some(m),
            RouteMatch::Prefix(_) => None,
        });
        listed
            .chain(routed)
            .chain(self.prices.keys())
            .cloned()
            .collect()
    }

    /// The upstream a model is routed to: exact names first, then the longest
    /// matching prefix, then the default.
    pub fn upstream_for_model(&self, model: &str) -> usize {
        let mut best: Option<(usize, usize)> = None;
        for r in &self.routes {
            match &r.matcher {
                RouteMatch::Exact(m) if m == model => return r.upstream,
                RouteMatch::Prefix(p)
                    if model.starts_with(p.as_str())
                        && best.is_none_or(|(len, _)| p.len() > len) =>
                {
                    best = Some((p.len(), r.upstream));
                }
                _ => {}
            }
        }
        best.map_or(self.default_upstream, |(_, u)| u)
    }

    /// The upstream a deferred call to `endpoint` for `model` goes to: the
    /// routes and default as for any model, except that a Claude call the
    /// routes do not send to an Anthropic upstream goes to the Anthropic one.
    pub fn upstream_for(&self, endpoint: crate::endpoint::Endpoint, model: &str) -> usize {
        let u = self.upstream_for_model(model);
        let anthropic = self.upstreams[u].profile.kind.is_anthropic();
        match (endpoint.is_anthropic(), anthropic, self.anthropic_upstream) {
            (true, false, Some(a)) => a,
            _ => u,
        }
    }

    /// The upstream passthrough of an API family goes to: for Anthropic
    /// calls the Anthropic upstream, for OpenAI-shaped ones the default
    /// unless it is Anthropic (a config with only Anthropic upstreams).
    pub fn passthrough_upstream(&self, anthropic: bool) -> Option<usize> {
        if anthropic {
            return self.anthropic_upstream;
        }
        let default = self.upstreams.get(self.default_upstream)?;
        (!default.profile.kind.is_anthropic()).then_some(self.default_upstream)
    }

    pub fn tenant_for_key(&self, key: &str) -> Option<&Arc<Tenant>> {
        self.keys.get(&key_hash(key))
    }
}

fn parse_addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse()
        .map_err(|_| invalid(key, format!("`{s}` is not an address like 127.0.0.1:8080")))
}

fn secs(key: &str, v: f64) -> Result<Duration, ConfigError> {
    if !v.is_finite() || v < 0.0 {
        return Err(invalid(key, "must be a non-negative number of seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

impl RawConfig {
    fn validate(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let s = self.server;
        let log_format = match s.log_format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "server.log_format",
                    format!("`{other}` is not one of text, json"),
                ));
            }
        };
        if s.threads == 0 {
            return Err(invalid("server.threads", "must be at least 1"));
        }
        if s.max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes", "must be at least 1"));
        }
        let server = ServerSettings {
            listen: parse_addr("server.listen", &s.listen)?,
            admin_listen: parse_addr("server.admin_listen", &s.admin_listen)?,
            data_dir: PathBuf::from(s.data_dir),
            threads: s.threads,
            max_body_bytes: s.max_body_bytes,
            max_wait: Duration::from_secs(s.max_wait_secs),
            upstream_connect_timeout: Duration::from_secs(s.upstream_connect_timeout_secs.max(1)),
            upstream_read_timeout: Duration::from_secs(s.upstream_read_timeout_secs.max(1)),
            shutdown_grace: Duration::from_secs(s.shutdown_grace_secs),
            body_read_timeout: secs("server.body_read_timeout_secs", s.body_read_timeout_secs)?
                .max(Duration::from_millis(10)),
            max_queued: s.max_queued,
            cache_bytes: s.cache_mb.max(8) * 1024 * 1024,
            min_free_bytes: s.min_free_mb.saturating_mul(1024 * 1024),
            upstream_ca_file: match s.upstream_ca_file {
                Some(f) if !Path::new(&f).is_file() => {
                    return Err(invalid(
                        "server.upstream_ca_file",
                        format!("`{f}` is not a readable file"),
                    ));
                }
                f => f.map(PathBuf::from),
            },
            sse_keepalive: secs("server.sse_keepalive_secs", s.sse_keepalive_secs)?
                .max(Duration::from_millis(10)),
            log_format,
        };

        if self.upstreams.is_empty() {
            return Err(invalid("upstreams", "at least one [[upstreams]] is needed"));
        }
        let mut upstreams = Vec::new();
        let mut by_name = BTreeMap::new();
        for (i, u) in self.upstreams.into_iter().enumerate() {
            let key = |k: &str| format!("upstreams[{i}].{k}");
            if u.name.is_empty()
                || !u
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(invalid(key("name"), "must be non-empty [A-Za-z0-9_-]"));
            }
            if by_name.insert(u.name.clone(), i).is_some() {
                return Err(invalid(key("name"), format!("`{}` is used twice", u.name)));
            }
            let mut profile = ProviderProfile::for_kind(u.kind);
            if profile.kind.is_anthropic()
                && let Some(name) = openai_only_key(&u)
            {
                return Err(invalid(key(name), OPENAI_ONLY));
            }
            if let Some(f) = u.forbidden_params {
                profile.forbidden_params = f;
            }
            let target = match (u.emulator, u.base_url) {
                (true, None) => UpstreamTarget::Emulator,
                (true, Some(_)) => {
                    return Err(invalid(
                        key("base_url"),
                        "give either base_url or emulator = true, not both",
                    ));
                }
                (false, Some(url)) => {
                    let url = url.trim_end_matches('/').to_owned();
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(invalid(
                            key("base_url"),
                            "must start with http:// or https://",
                        ));
                    }
                    UpstreamTarget::Url(url)
                }
                (false, None) => {
                    return Err(invalid(key("base_url"), "is required (or emulator = true)"));
                }
            };
            if target != UpstreamTarget::Emulator {
                match &u.api_key_env {
                    None => {
                        return Err(invalid(
                            key("api_key_env"),
                            "is required for a real upstream",
                        ));
                    }
                    Some(name) if env(name).is_none() => {
                        return Err(invalid(
                            key("api_key_env"),
                            format!("environment variable `{name}` is not set"),
                        ));
                    }
                    Some(_) => {}
                }
            }
            let completion_window = u
                .completion_window
                .unwrap_or_else(|| profile.default_window.to_owned());
            profile
                .check_window(&completion_window)
                .map_err(|m| invalid(key("completion_window"), m))?;
            let max_requests = u.max_requests.unwrap_or(profile.max_lines);
            if max_requests == 0 || max_requests > profile.max_lines {
                return Err(invalid(
                    key("max_requests"),
                    format!(
                        "must be 1..={} for a {} upstream",
                        profile.max_lines,
                        profile.kind.as_str()
                    ),
                ));
            }
            let max_bytes = u.max_bytes.unwrap_or(profile.max_file_bytes);
            if max_bytes < 1024 || max_bytes > profile.max_file_bytes {
                return Err(invalid(
                    key("max_bytes"),
                    format!(
                        "must be 1024..={} for a {} upstream",
                        profile.max_file_bytes,
                        profile.kind.as_str()
                    ),
                ));
            }
            let calls_per_second = u.calls_per_second.unwrap_or(10);
            let batches_per_hour = u.batches_per_hour.unwrap_or(profile.batches_per_hour);
            if calls_per_second == 0 {
                return Err(invalid(key("calls_per_second"), "must be at least 1"));
            }
            if batches_per_hour == 0 {
                return Err(invalid(key("batches_per_hour"), "must be at least 1"));
            }
            let batch_discount = u.batch_discount.unwrap_or(match profile.kind {
                ProviderKind::Moonshot => 0.4,
                _ => 0.5,
            });
            if !(0.0..=1.0).contains(&batch_discount) {
                return Err(invalid(key("batch_discount"), "must be between 0 and 1"));
            }
            let max_attempts = u.max_attempts.unwrap_or(3);
            if max_attempts == 0 {
                return Err(invalid(key("max_attempts"), "must be at least 1"));
            }
            if let Some(models) = &u.models {
                if models.is_empty() {
                    return Err(invalid(
                        key("models"),
                        "must name at least one model (leave it out to take any)",
                    ));
                }
                if let Some(bad) = models.iter().find(|m| {
                    m.is_empty()
                        || m.len() > crate::intake::MAX_MODEL_BYTES
                        || m.chars().any(char::is_control)
                }) {
                    return Err(invalid(
                        key("models"),
                        format!(
                            "{bad:?} is not a model name (1-{} bytes, no control characters)",
                            crate::intake::MAX_MODEL_BYTES
                        ),
                    ));
                }
            }
            let poll_interval = secs(
                &key("poll_interval_secs"),
                u.poll_interval_secs.unwrap_or(30.0),
            )?
            .max(Duration::from_millis(50));
            let lost_after = secs(
                &key("lost_after_secs"),
                u.lost_after_secs.unwrap_or(6.0 * 3600.0),
            )?;
            if lost_after < poll_interval * LOST_AFTER_MIN_POLLS {
                return Err(invalid(
                    key("lost_after_secs"),
                    format!(
                        "must be at least {LOST_AFTER_MIN_POLLS} poll intervals ({} s)",
                        (poll_interval * LOST_AFTER_MIN_POLLS).as_secs_f64()
                    ),
                ));
            }
            match (profile.kind.is_anthropic(), u.cache_ttl_1h) {
                (_, None) => {}
                (true, Some(on)) => profile.cache_ttl_1h = on,
                (false, Some(_)) => {
                    return Err(invalid(
                        key("cache_ttl_1h"),
                        "is only for kind = \"anthropic\"",
                    ));
                }
            }
            let anthropic_version = match (profile.kind.is_anthropic(), u.anthropic_version) {
                (true, v) => {
                    Some(v.unwrap_or_else(|| crate::anthropic::DEFAULT_VERSION.to_owned()))
                }
                (false, None) => None,
                (false, Some(_)) => {
                    return Err(invalid(
                        key("anthropic_version"),
                        "is only for kind = \"anthropic\"",
                    ));
                }
            };
            upstreams.push(UpstreamSettings {
                anthropic_version,
                batch_discount,
                max_attempts,
                expired_policy: u.expired_policy.unwrap_or(ExpiredPolicy::Requeue),
                token_limit_backoff: secs(
                    &key("token_limit_backoff_secs"),
                    u.token_limit_backoff_secs.unwrap_or(60.0),
                )?,
                models: u.models,
                name: u.name,
                profile,
                target,
                api_key_env: u.api_key_env,
                completion_window,
                max_requests,
                max_bytes,
                max_wait: secs(&key("max_wait_secs"), u.max_wait_secs.unwrap_or(60.0))?,
                poll_interval,
                lost_after,
                calls_per_second,
                batches_per_hour,
                flex_models: u.flex_models,
                lane_priors: crate::batch::lanes::LanePriors {
                    batch: secs(
                        &key("batch_latency_prior_secs"),
                        u.batch_latency_prior_secs.unwrap_or(3600.0),
                    )?,
                    flex: secs(
                        &key("flex_latency_prior_secs"),
                        u.flex_latency_prior_secs.unwrap_or(600.0),
                    )?,
                    standard: secs(
                        &key("standard_latency_prior_secs"),
                        u.standard_latency_prior_secs.unwrap_or(60.0),
                    )?,
                },
                escalation_margin: secs(
                    &key("escalation_margin_secs"),
                    u.escalation_margin_secs.unwrap_or(30.0),
                )?,
                batch_events: batch_events(
                    u.batch_events_path,
                    u.batch_events_secret,
                    u.batch_events_secret_env,
                    u.kind.is_anthropic(),
                    env,
                )
                .map_err(|(k, m)| invalid(key(k), m))?,
            });
            if let Some(e) = &upstreams.last().and_then(|u| u.batch_events.clone())
                && upstreams
                    .iter()
                    .rev()
                    .skip(1)
                    .any(|u| u.batch_events.as_ref().is_some_and(|o| o.path == e.path))
            {
                return Err(invalid(
                    key("batch_events_path"),
                    "already used by another upstream",
                ));
            }
        }
        let uses_emulator = upstreams
            .iter()
            .any(|u| u.target == UpstreamTarget::Emulator);
        let emulator = match (uses_emulator, self.emulator) {
            (true, e) => Some(e.unwrap_or_default()),
            (false, Some(_)) => {
                return Err(invalid(
                    "emulator",
                    "is set but no upstream has emulator = true",
                ));
            }
            (false, None) => None,
        };

        let lookup = |key: String, name: &str| {
            by_name
                .get(name)
                .copied()
                .ok_or_else(|| invalid(key, format!("no upstream is named `{name}`")))
        };
        let mut routes = Vec::new();
        for (i, r) in self.routes.into_iter().enumerate() {
            let matcher = match (r.model, r.prefix) {
                (Some(m), None) => RouteMatch::Exact(m),
                (None, Some(p)) => RouteMatch::Prefix(p),
                _ => {
                    return Err(invalid(
                        format!("routes[{i}]"),
                        "give exactly one of model, prefix",
                    ));
                }
            };
            routes.push(Route {
                matcher,
                upstream: lookup(format!("routes[{i}].upstream"), &r.upstream)?,
            });
        }
        // Passthrough goes per API family: OpenAI-shaped calls to the
        // default (never an Anthropic upstream), Anthropic calls to the
        // first Anthropic upstream.
        let default_upstream = match self.default_upstream {
            Some(name) => {
                let i = lookup("default_upstream".into(), &name)?;
                if upstreams[i].profile.kind.is_anthropic() {
                    return Err(invalid(
                        "default_upstream",
                        "must be OpenAI-shaped; Anthropic calls go to the first kind = \"anthropic\" upstream",
                    ));
                }
                i
            }
            None => upstreams
                .iter()
                .position(|u| !u.profile.kind.is_anthropic())
                .unwrap_or(0),
        };
        let anthropic_upstream = upstreams.iter().position(|u| u.profile.kind.is_anthropic());

        if self.tenants.is_empty() {
            return Err(invalid("tenants", "at least one [[tenants]] is needed"));
        }
        let mut tenants = Vec::new();
        let mut keys = HashMap::new();
        for (i, t) in self.tenants.into_iter().enumerate() {
            let key = |k: &str| format!("tenants[{i}].{k}");
            if t.name.is_empty() || tenants.iter().any(|x: &Arc<Tenant>| x.name == t.name) {
                return Err(invalid(key("name"), "must be non-empty and unique"));
            }
            let callback_allow = t
                .callback_allow
                .iter()
                .map(|e| AllowEntry::parse(e))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|m| invalid(key("callback_allow"), m))?;
            let secret = match (t.webhook_secret, t.webhook_secret_env) {
                (Some(s), None) => Some(s),
                (None, Some(name)) => Some(env(&name).ok_or_else(|| {
                    invalid(
                        key("webhook_secret_env"),
                        format!("environment variable `{name}` is not set"),
                    )
                })?),
                (None, None) => None,
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        key("webhook_secret"),
                        "give webhook_secret or webhook_secret_env, not both",
                    ));
                }
            };
            let webhook_key = secret
                .map(|s| decode_secret(&s))
                .transpose()
                .map_err(|m| invalid(key("webhook_secret"), m))?;
            if !callback_allow.is_empty() && webhook_key.is_none() {
                return Err(invalid(
                    key("webhook_secret"),
                    "a tenant with a callback_allow list needs a webhook secret",
                ));
            }
            let rate = |rps: Option<u32>,
                        burst: Option<u32>,
                        k: &str|
             -> Result<Option<RateSetting>, ConfigError> {
                match (rps, burst) {
                    (None, None) => Ok(None),
                    (None, Some(_)) => Err(invalid(key(k), "a burst needs a rate")),
                    (Some(r), b) => {
                        let per_second = NonZeroU32::new(r)
                            .ok_or_else(|| invalid(key(k), "must be at least 1"))?;
                        let burst = NonZeroU32::new(b.unwrap_or(r))
                            .ok_or_else(|| invalid(key(k), "burst must be at least 1"))?;
                        Ok(Some(RateSetting { per_second, burst }))
                    }
                }
            };
            if let Some(d) = t.default_deadline_secs
                && !(1..=crate::intake::MAX_DEADLINE_SECS).contains(&d)
            {
                return Err(invalid(
                    key("default_deadline_secs"),
                    format!(
                        "must be from 1 to {} (a batch's 24-hour window)",
                        crate::intake::MAX_DEADLINE_SECS
                    ),
                ));
            }
            let lanes = match &t.lanes {
                None => crate::batch::lanes::TenantLanes::default(),
                Some(names) => tenant_lanes(names).map_err(|m| invalid(key("lanes"), m))?,
            };
            let max_standard_per_hour = t
                .max_standard_per_hour
                .map(|n| {
                    NonZeroU32::new(n)
                        .ok_or_else(|| invalid(key("max_standard_per_hour"), "must be at least 1"))
                })
                .transpose()?;
            let tenant = Arc::new(Tenant {
                name: t.name,
                default_mode: t.default_mode,
                default_wait: Duration::from_secs(t.default_wait_secs).min(server.max_wait),
                callback_allow,
                webhook_key,
                deferred_rate: rate(t.intake_rps, t.intake_burst, "intake_rps")?,
                passthrough_rate: rate(t.passthrough_rps, t.passthrough_burst, "passthrough_rps")?,
                default_deadline: t.default_deadline_secs,
                lanes,
                max_standard_per_hour,
            });
            let mut hashes = Vec::new();
            for k in t.keys {
                hashes.push(key_hash(&k));
            }
            for name in t.key_envs {
                let v = env(&name).ok_or_else(|| {
                    invalid(
                        key("key_envs"),
                        format!("environment variable `{name}` is not set"),
                    )
                })?;
                hashes.push(key_hash(&v));
            }
            for h in t.key_sha256 {
                hashes.push(parse_sha256(&h).ok_or_else(|| {
                    invalid(key("key_sha256"), format!("`{h}` is not 64 hex digits"))
                })?);
            }
            if hashes.is_empty() {
                return Err(invalid(key("keys"), "a tenant needs at least one key"));
            }
            for h in hashes {
                if keys.insert(h, tenant.clone()).is_some() {
                    return Err(invalid(key("keys"), "a key is given to two tenants"));
                }
            }
            tenants.push(tenant);
        }

        let w = self.webhooks;
        let webhooks = WebhookSettings {
            max_age: secs("webhooks.max_age_secs", w.max_age_secs)?,
            retry_base: secs("webhooks.retry_base_secs", w.retry_base_secs)?
                .max(Duration::from_millis(10)),
            retry_cap: secs("webhooks.retry_cap_secs", w.retry_cap_secs)?,
            timeout: secs("webhooks.timeout_secs", w.timeout_secs)?.max(Duration::from_millis(100)),
            concurrency: w.concurrency.max(1),
            per_host: w.per_host_concurrency.max(1),
        };
        for (model, p) in &self.prices {
            if !(p.prompt_per_mtok >= 0.0 && p.completion_per_mtok >= 0.0) {
                return Err(invalid(
                    format!("prices.{model}"),
                    "prices must be non-negative numbers",
                ));
            }
        }
        let st = self.storage;
        let storage = match (st.kind.as_str(), st.url_env) {
            ("sled", None) => StorageSettings::Sled,
            ("sled", Some(_)) => {
                return Err(invalid(
                    "storage.url_env",
                    "is for kind = \"postgres\"; sled keeps its data in server.data_dir",
                ));
            }
            ("postgres", Some(url_env)) if !url_env.is_empty() => {
                if !(1..=1000).contains(&st.pool_size) {
                    return Err(invalid("storage.pool_size", "must be 1 to 1000"));
                }
                let lease = secs("storage.lease_secs", st.lease_secs)?;
                if lease < Duration::from_millis(300) {
                    return Err(invalid("storage.lease_secs", "must be at least 0.3"));
                }
                StorageSettings::Postgres {
                    url_env,
                    pool_size: st.pool_size,
                    lease,
                }
            }
            ("postgres", _) => {
                return Err(invalid(
                    "storage.url_env",
                    "kind = \"postgres\" needs the name of the environment variable \
                     holding the connection URL (the URL itself never goes in the file)",
                ));
            }
            (other, _) => {
                return Err(invalid(
                    "storage.kind",
                    format!("`{other}` is not one of sled, postgres"),
                ));
            }
        };
        let r = self.retention;
        if r.terminal_secs == 0 {
            return Err(invalid(
                "retention.terminal_secs",
                "must be at least 1 (a finished request must be answerable for a while)",
            ));
        }
        if !(1..=100_000).contains(&r.slice_rows) {
            return Err(invalid("retention.slice_rows", "must be 1 to 100000"));
        }
        let interval = secs("retention.interval_secs", r.interval_secs)?;
        if interval < Duration::from_millis(100) {
            return Err(invalid("retention.interval_secs", "must be at least 0.1"));
        }
        let census = secs("retention.census_secs", r.census_secs)?;
        if census < Duration::from_secs(1) {
            return Err(invalid("retention.census_secs", "must be at least 1"));
        }
        let retention = RetentionSettings {
            terminal: Duration::from_secs(r.terminal_secs),
            slice_rows: r.slice_rows,
            interval,
            census,
        };
        Ok(Config {
            storage,
            retention,
            webhooks,
            prices: self.prices,
            server,
            emulator,
            upstreams,
            routes,
            default_upstream,
            anthropic_upstream,
            tenants,
            keys,
        })
    }
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    const MIN: &str = r#"
        [[upstreams]]
        name = "emu"
        kind = "openai"
        emulator = true
        [[tenants]]
        name = "t"
        keys = ["k1"]
    "#;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::parse_with_env(EMBEDDED_DEFAULT, &no_env).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.server.admin_listen, "127.0.0.1:9090".parse().unwrap());
        assert!(c.tenant_for_key("ferry-demo-key").is_some());
        assert!(c.emulator.is_some());
        let demo = c.tenant_for_key("ferry-demo-key").unwrap();
        assert!(demo.webhook_key.is_some() && !demo.callback_allow.is_empty());
        assert!(c.prices.contains_key("gpt-4o-mini"));
        // Claude through the embedded emulator's Anthropic profile.
        let claude = c.passthrough_upstream(true).map(|i| &c.upstreams[i]);
        assert!(claude.is_some_and(|u| u.target == UpstreamTarget::Emulator));
        assert_eq!(c.passthrough_upstream(false), Some(0));
    }

    #[test]
    fn example_configs_are_valid_and_need_their_env() {
        let any_env = |_: &str| Some("whsec_c2VjcmV0".to_owned());
        for (name, text) in [
            ("openai", include_str!("../config/openai.example.toml")),
            ("moonshot", include_str!("../config/moonshot.example.toml")),
            ("cluster", include_str!("../config/cluster.example.toml")),
            (
                "anthropic",
                include_str!("../config/anthropic.example.toml"),
            ),
        ] {
            let c =
                Config::parse_with_env(text, &any_env).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                matches!(c.upstreams[0].target, UpstreamTarget::Url(_)),
                "{name}"
            );
            let err = Config::parse_with_env(text, &no_env)
                .unwrap_err()
                .to_string();
            assert!(err.contains("environment variable"), "{name}: {err}");
        }
    }

    #[test]
    fn retention_has_defaults_and_refuses_bad_values_by_key() {
        let c = Config::parse_with_env(MIN, &no_env).unwrap();
        assert_eq!(c.retention.terminal, Duration::from_secs(30 * 86_400));
        assert_eq!(c.retention.slice_rows, 500);
        assert_eq!(c.retention.interval, Duration::from_secs(60));
        assert_eq!(c.retention.census, Duration::from_secs(3600));
        let with = |r: &str| format!("{MIN}\n[retention]\n{r}");
        let c = Config::parse_with_env(
            &with("terminal_secs = 3600\nslice_rows = 50\ninterval_secs = 0.5"),
            &no_env,
        )
        .unwrap();
        assert_eq!(
            c.retention.policy(),
            crate::store::lifecycle::Retention {
                terminal_secs: 3600,
                slice_rows: 50
            }
        );
        for (bad, key) in [
            ("terminal_secs = 0", "retention.terminal_secs"),
            // The body goes when its request finishes: no key bounds it.
            ("body_secs = 60", "body_secs"),
            ("slice_rows = 0", "retention.slice_rows"),
            ("interval_secs = -1", "retention.interval_secs"),
            ("interval_secs = 0.01", "retention.interval_secs"),
            ("census_secs = 0.5", "retention.census_secs"),
            ("keep_secs = 1", "keep_secs"),
        ] {
            let err = Config::parse_with_env(&with(bad), &no_env)
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn deadlines_have_defaults_and_refuse_bad_values_by_key() {
        let c = Config::parse_with_env(MIN, &no_env).unwrap();
        let u = &c.upstreams[0];
        assert!(u.flex_models.is_empty());
        assert_eq!(u.lane_priors.batch, Duration::from_secs(3600));
        assert_eq!(u.lane_priors.flex, Duration::from_secs(600));
        assert_eq!(u.lane_priors.standard, Duration::from_secs(60));
        assert_eq!(u.escalation_margin, Duration::from_secs(30));
        assert_eq!(c.tenant_for_key("k1").unwrap().default_deadline, None);
        let set = MIN
            .replace(
                "emulator = true",
                "emulator = true\nflex_models = [\"gpt-5-mini\"]\nflex_latency_prior_secs = 120\n\
                 standard_latency_prior_secs = 20\nescalation_margin_secs = 5",
            )
            .replace(
                "keys = [\"k1\"]",
                "keys = [\"k1\"]\ndefault_deadline_secs = 3600",
            );
        let c = Config::parse_with_env(&set, &no_env).unwrap();
        let u = &c.upstreams[0];
        assert_eq!(u.flex_models, vec!["gpt-5-mini".to_owned()]);
        assert_eq!(u.lane_priors.flex, Duration::from_secs(120));
        assert_eq!(u.lane_priors.standard, Duration::from_secs(20));
        assert_eq!(u.escalation_margin, Duration::from_secs(5));
        assert_eq!(c.tenant_for_key("k1").unwrap().default_deadline, Some(3600));
        for (from, to, key) in [
            (
                "keys = [\"k1\"]",
                "keys = [\"k1\"]\ndefault_deadline_secs = 0",
                "default_deadline_secs",
            ),
            (
                "keys = [\"k1\"]",
                "keys = [\"k1\"]\ndefault_deadline_secs = 86401",
                "default_deadline_secs",
            ),
            (
                "emulator = true",
                "emulator = true\nflex_latency_prior_secs = -1",
                "flex_latency_prior_secs",
            ),
        ] {
            let err = Config::parse_with_env(&MIN.replace(from, to), &no_env)
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{to}: {err}");
        }
    }

    #[test]
    fn a_tenant_chooses_its_lanes_and_caps_standard() {
        let c = Config::parse_with_env(MIN, &no_env).unwrap();
        let t = c.tenant_for_key("k1").unwrap();
        assert_eq!(t.lanes, crate::batch::lanes::TenantLanes::default());
        assert_eq!(t.max_standard_per_hour, None);
        let nightly = MIN.replace(
            "keys = [\"k1\"]",
            "keys = [\"k1\"]\nlanes = [\"batch\", \"flex\"]\nmax_standard_per_hour = 10",
        );
        let c = Config::parse_with_env(&nightly, &no_env).unwrap();
        let t = c.tenant_for_key("k1").unwrap();
        assert_eq!(
            t.lanes,
            crate::batch::lanes::TenantLanes {
                flex: true,
                standard: false
            }
        );
        assert_eq!(t.max_standard_per_hour, NonZeroU32::new(10));
        for bad in [
            "lanes = [\"flex\"]",
            "lanes = [\"batch\", \"turbo\"]",
            "lanes = [\"batch\", \"batch\"]",
            "max_standard_per_hour = 0",
        ] {
            let err = Config::parse_with_env(
                &MIN.replace("keys = [\"k1\"]", &format!("keys = [\"k1\"]\n{bad}")),
                &no_env,
            )
            .unwrap_err()
            .to_string();
            let key = bad.split(' ').next().unwrap();
            assert!(err.contains(&format!("tenants[0].{key}")), "{bad}: {err}");
        }
    }

    #[test]
    fn batch_events_need_a_path_outside_v1_and_a_secret() {
        let c = Config::parse_with_env(MIN, &no_env).unwrap();
        assert_eq!(c.upstreams[0].batch_events, None, "off by default");
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let with =
            |lines: &str| MIN.replace("emulator = true", &format!("emulator = true\n{lines}"));
        let on = with(&format!(
            "batch_events_path = \"/openai/events\"\nbatch_events_secret = \"{secret}\""
        ));
        let c = Config::parse_with_env(&on, &no_env).unwrap();
        let e = c.upstreams[0].batch_events.as_ref().unwrap();
        assert_eq!(e.path, "/openai/events");
        assert_eq!(e.key, decode_secret(secret).unwrap());
        for (bad, key) in [
            (
                "batch_events_path = \"/e\"".to_owned(),
                "batch_events_secret",
            ),
            (
                format!("batch_events_secret = \"{secret}\""),
                "batch_events_path",
            ),
            (
                format!("batch_events_path = \"/v1/events\"\nbatch_events_secret = \"{secret}\""),
                "batch_events_path",
            ),
            (
                "batch_events_path = \"/e\"\nbatch_events_secret = \"nope\"".to_owned(),
                "batch_events_secret",
            ),
            (
                "batch_events_path = \"/e\"\nbatch_events_secret_env = \"UNSET\"".to_owned(),
                "batch_events_secret_env",
            ),
        ] {
            let err = Config::parse_with_env(&with(&bad), &no_env)
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("upstreams[0].{key}")), "{bad}: {err}");
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse_with_env(MIN, &no_env).unwrap();
        let u = &c.upstreams[0];
        assert_eq!(u.max_requests, 50_000);
        assert_eq!(u.max_bytes, 200 * 1024 * 1024);
        assert_eq!(u.completion_window, "24h");
        assert_eq!(c.tenant_for_key("k1").unwrap().name, "t");
        assert!(c.tenant_for_key("k2").is_none());
    }

    #[test]
    fn storage_is_sled_unless_postgres_is_named_with_its_url_variable() {
        let with = |storage: &str| format!("{MIN}\n[storage]\n{storage}");
        assert_eq!(
            Config::parse_with_env(MIN, &no_env).unwrap().storage,
            StorageSettings::Sled
        );
        let c = Config::parse_with_env(
            &with("kind = \"postgres\"\nurl_env = \"FERRY_DATABASE_URL\""),
            &no_env,
        )
        .unwrap();
        assert_eq!(
            c.storage,
            StorageSettings::Postgres {
                url_env: "FERRY_DATABASE_URL".into(),
                pool_size: 16,
                lease: Duration::from_secs(15),
            }
        );
        for (bad, names) in [
            ("kind = \"postgres\"", "storage.url_env"),
            ("kind = \"sled\"\nurl_env = \"X\"", "storage.url_env"),
            (
                "kind = \"postgres\"\nurl_env = \"X\"\npool_size = 0",
                "storage.pool_size",
            ),
            ("kind = \"mysql\"", "storage.kind"),
            (
                "kind = \"postgres\"\nurl_env = \"X\"\nlease_secs = 0.1",
                "storage.lease_secs",
            ),
            ("url = \"postgres://x\"", "url"),
        ] {
            let err = Config::parse_with_env(&with(bad), &no_env)
                .unwrap_err()
                .to_string();
            assert!(err.contains(names), "{bad}: {err}");
        }
    }

    #[test]
    fn unknown_key_is_refused_by_name() {
        let err = Config::parse_with_env(&format!("{MIN}\n[server]\nlisten_addr = \"x\""), &no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_addr"), "{err}");
    }

    #[test]
    fn a_models_list_is_checked_and_names_what_is_served() {
        let with = |models: &str| {
            MIN.replace(
                "emulator = true",
                &format!("emulator = true\nmodels = {models}"),
            )
        };
        let c = Config::parse_with_env(&with(r#"["gpt-4o-mini"]"#), &no_env).unwrap();
        let u = &c.upstreams[0];
        assert!(u.serves_model("gpt-4o-mini"));
        assert!(!u.serves_model("gpt-4o"));
        assert!(c.known_models().contains(&"gpt-4o-mini".to_owned()));
        assert!(Config::parse_with_env(MIN, &no_env).unwrap().upstreams[0].serves_model("any"));
        for bad in ["[]", r#"[""]"#, r#"["a\u0000b"]"#] {
            let err = Config::parse_with_env(&with(bad), &no_env)
                .unwrap_err()
                .to_string();
            assert!(err.contains("upstreams[0].models"), "{bad}: {err}");
        }
    }

    #[test]
    fn passthrough_goes_per_api_family() {
        let claude = |extra: &str| {
            MIN.replace(
                "[[tenants]]",
                &format!(
                    "[[upstreams]]\nname = \"claude\"\nkind = \"anthropic\"\nemulator = true\n{extra}\n[[tenants]]"
                ),
            )
        };
        let c = Config::parse_with_env(&claude(""), &no_env).unwrap();
        assert_eq!(c.passthrough_upstream(false), Some(0));
        assert_eq!(c.passthrough_upstream(true), Some(1));
        assert_eq!(
            c.upstreams[1].anthropic_version.as_deref(),
            Some(crate::anthropic::DEFAULT_VERSION)
        );
        assert_eq!(c.upstreams[0].anthropic_version, None);
        // Anthropic first: OpenAI-shaped calls still go to the OpenAI one.
        let only = MIN.replace("kind = \"openai\"", "kind = \"anthropic\"");
        let c = Config::parse_with_env(&only, &no_env).unwrap();
        assert_eq!(c.passthrough_upstream(true), Some(0));
        assert_eq!(c.passthrough_upstream(false), None);
        assert_eq!(
            Config::parse_with_env(MIN, &no_env)
                .unwrap()
                .passthrough_upstream(true),
            None
        );
        let bad = [
            (
                format!("default_upstream = \"claude\"\n{}", claude("")),
                "must be OpenAI-shaped",
            ),
            (
                MIN.replace(
                    "emulator = true",
                    "emulator = true\nanthropic_version = \"x\"",
                ),
                "upstreams[0].anthropic_version",
            ),
            (
                claude("completion_window = \"48h\""),
                "upstreams[1].completion_window",
            ),
        ];
        for (text, key) in bad {
            let err = Config::parse_with_env(&text, &no_env)
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn openai_only_keys_are_refused_on_an_anthropic_upstream() {
        let claude = |extra: &str| {
            MIN.replace(
                "[[tenants]]",
                &format!(
                    "[[upstreams]]\nname = \"claude\"\nkind = \"anthropic\"\nemulator = true\n{extra}\n[[tenants]]"
                ),
            )
        };
        for (extra, name) in [
            ("flex_models = [\"claude-haiku-4-5\"]", "flex_models"),
            ("flex_latency_prior_secs = 60", "flex_latency_prior_secs"),
            ("token_limit_backoff_secs = 10", "token_limit_backoff_secs"),
        ] {
            let err = Config::parse_with_env(&claude(extra), &no_env)
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("upstreams[1].{name}")), "{err}");
            assert!(err.contains("Anthropic has no flex tier"), "{err}");
            // The same keys stay fine on the OpenAI upstream.
            let openai = MIN.replace("emulator = true", &format!("emulator = true\n{extra}"));
            assert!(Config::parse_with_env(&openai, &no_env).is_ok(), "{extra}");
        }
        // An empty flex list is no flex lane: accepted.
        assert!(Config::parse_with_env(&claude("flex_models = []"), &no_env).is_ok());
    }

    #[test]
    fn limits_above_the_provider_are_refused() {
        let text = MIN.replace("emulator = true", "emulator = true\nmax_requests = 60000");
        let err = Config::parse_with_env(&text, &no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("upstreams[0].max_requests"), "{err}");
        let text = MIN.replace(
            "kind = \"openai\"",
            "kind = \"moonshot\"\nmax_bytes = 150000000",
        );
        let err = Config::parse_with_env(&text, &no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("upstreams[0].max_bytes"), "{err}");
    }

    #[test]
    fn bad_window_and_missing_env_name_the_key() {
        let text = MIN.replace(
            "emulator = true",
            "emulator = true\ncompletion_window = \"12h\"",
        );
        let err = Config::parse_with_env(&text, &no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("completion_window"), "{err}");
        let text = MIN.replace(
            "emulator = true",
            "base_url = \"https://api.openai.com/v1\"\napi_key_env = \"NOPE_KEY\"",
        );
        let err = Config::parse_with_env(&text, &no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("NOPE_KEY"), "{err}");
        let c = Config::parse_with_env(&text, &|_| Some("sk".into())).unwrap();
        assert_eq!(
            c.upstreams[0].target,
            UpstreamTarget::Url("https://api.openai.com/v1".into())
        );
    }

    #[test]
    fn lost_after_must_span_ten_polls() {
        let c = Config::parse_with_env(MIN, &no_env).unwrap();
        assert_eq!(c.upstreams[0].lost_after, Duration::from_secs(6 * 3600));
        let text = MIN.replace(
            "emulator = true",
            "emulator = true\npoll_interval_secs = 30\nlost_after_secs = 299",
        );
        let err = Config::parse_with_env(&text, &no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("upstreams[0].lost_after_secs"), "{err}");
        let text = text.replace("= 299", "= 300");
        let c = Config::parse_with_env(&text, &no_env).unwrap();
        assert_eq!(c.upstreams[0].lost_after, Duration::from_secs(300));
    }

    #[test]
    fn routes_prefer_exact_then_longest_prefix() {
        let text = format!(
            "{MIN}
            [[upstreams]]
            name = \"b\"
            kind = \"moonshot\"
            emulator = true
            [[upstreams]]
            name = \"c\"
            kind = \"generic\"
            emulator = true
            [[routes]]
            prefix = \"kimi-\"
            upstream = \"b\"
            [[routes]]
            prefix = \"kimi-k2\"
            upstream = \"c\"
            [[routes]]
            model = \"kimi-x\"
            upstream = \"emu\"
            "
        );
        let c = Config::parse_with_env(&text, &no_env).unwrap();
        assert_eq!(c.upstream_for_model("kimi-k2.6"), 2);
        assert_eq!(c.upstream_for_model("kimi-a"), 1);
        assert_eq!(c.upstream_for_model("kimi-x"), 0);
        assert_eq!(c.upstream_for_model("gpt-4o"), 0);
    }

    #[test]
    fn hashed_keys_work_and_bad_hashes_are_named() {
        let h: String = key_hash("secret")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let text = MIN.replace("keys = [\"k1\"]", &format!("key_sha256 = [\"{h}\"]"));
        let c = Config::parse_with_env(&text, &no_env).unwrap();
        assert!(c.tenant_for_key("secret").is_some());
        let text = MIN.replace("keys = [\"k1\"]", "key_sha256 = [\"zz\"]");
        let err = Config::parse_with_env(&text, &no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tenants[0].key_sha256"), "{err}");
    }
}
