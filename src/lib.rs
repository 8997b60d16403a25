//! Ferry: a reverse proxy that turns deferrable OpenAI-style calls (chat
//! completions, embeddings, completions, moderations, responses) into Batch
//! API jobs and hands each caller its own answer back.
//!
//! One deferred request travels: [`proxy`] (classify, authenticate) →
//! [`intake`] (validate, store durably, `202`) → [`store`] (durable on return; sled embedded) →
//! [`batch`] (flush into a JSONL file, create, poll, ingest) → [`upstream`]
//! (the Batch API client) → back through [`delivery`] (wake held callers).

pub mod admin;
pub mod announce;
pub mod anthropic;
pub mod api_error;
pub mod batch;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod emulator;
pub mod endpoint;
pub mod intake;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod retention;
pub mod server;
pub mod store;
pub mod upstream;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use config::{Config, UpstreamSettings};
use delivery::waiters::Waiters;
use metrics::Metrics;
use store::{
    QueueKey, QueueStats, RequestRecord, RequestStatus, Store, StoredResult, now_millis, now_secs,
};
use upstream::BatchClient;

/// Where passthrough traffic for an upstream goes.
#[derive(Debug, Clone)]
pub struct PassthroughTarget {
    /// `host:port` to connect to.
    pub addr: String,
    pub tls: bool,
    /// Host name for SNI and the `Host` header.
    pub host: String,
    /// Path prefix that replaces the caller's `/v1` (e.g. `/v1`, `/openai/v1`).
    pub base_path: String,
}

impl PassthroughTarget {
    /// Splits a base URL such as `https://api.openai.com/v1`.
    pub fn parse(base_url: &str) -> Option<PassthroughTarget> {
        let (tls, rest) = if let Some(r) = base_url.strip_prefix("https://") {
            (true, r)
        } else {
            (false, base_url.strip_prefix("http://")?)
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return None;
        }
        let (host, addr) = if authority.starts_with('[') {
            // [::1]:8080
            let end = authority.find(']')?;
            let host = &authority[1..end];
            let port =
                authority[end + 1..]
                    .strip_prefix(':')
                    .unwrap_or(if tls { "443" } else { "80" });
            (host.to_owned(), format!("[{host}]:{port}"))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), format!("{h}:{p}")),
                None => (
                    authority.to_owned(),
                    format!("{authority}:{}", if tls { 443 } else { 80 }),
                ),
            }
        };
        Some(PassthroughTarget {
            addr,
            tls,
            host,
            base_path: path.trim_end_matches('/').to_owned(),
        })
    }
}

/// One configured upstream with its live parts.
pub struct Upstream {
    pub settings: UpstreamSettings,
    pub client: BatchClient,
    pub passthrough: PassthroughTarget,
    /// The passthrough host's addresses, resolved off the request path (at
    /// start and then every 30 s) so no request waits for DNS.
    pub passthrough_addrs: std::sync::RwLock<Arc<Vec<std::net::SocketAddr>>>,
    next_addr: std::sync::atomic::AtomicUsize,
    /// The key Ferry sends upstream on passthrough (`Bearer ...`).
    pub auth_header: String,
    /// The bare key, for `x-api-key` (Anthropic upstreams).
    pub api_key: String,
    /// Wakes this upstream's flush loop (new queue, threshold crossed, re-queue).
    pub wake: tokio::sync::Notify,
    pub manual_flush: AtomicBool,
    /// Unix millis before which no new batch is flushed (token budget full).
    paused_until: AtomicU64,
    /// Whether this node owns the upstream's batches (one node at a time
    /// does; with sled, always this one).
    pub ownership: batch::ownership::Ownership,
    /// How long its flex and standard calls take, learned per model from
    /// the priors on: what escalation times are computed from.
    pub latencies: batch::latency::Observed,
    /// The drivers polling a submitted batch on this node, by upstream
    /// batch id, for OpenAI's batch events to wake (see [`batch::events`]).
    pub polling: dashmap::DashMap<String, Arc<tokio::sync::Notify>>,
}

impl Upstream {
    pub fn new(
        settings: UpstreamSettings,
        client: BatchClient,
        passthrough: PassthroughTarget,
        api_key: &str,
    ) -> Upstream {
        Upstream {
            latencies: batch::latency::Observed::new(settings.lane_priors),
            polling: dashmap::DashMap::new(),
            settings,
            client,
            passthrough,
            passthrough_addrs: std::sync::RwLock::new(Arc::new(Vec::new())),
            next_addr: std::sync::atomic::AtomicUsize::new(0),
            auth_header: format!("Bearer {api_key}"),
            api_key: api_key.to_owned(),
            wake: tokio::sync::Notify::new(),
            manual_flush: AtomicBool::new(false),
            paused_until: AtomicU64::new(0),
            ownership: Default::default(),
        }
    }

    /// The next passthrough address (round robin over the resolved ones).
    pub fn passthrough_addr(&self) -> Option<std::net::SocketAddr> {
        let addrs = self
            .passthrough_addrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if addrs.is_empty() {
            return None;
        }
        Some(addrs[self.next_addr.fetch_add(1, Ordering::Relaxed) % addrs.len()])
    }

    pub fn set_passthrough_addrs(&self, addrs: Vec<std::net::SocketAddr>) {
        *self
            .passthrough_addrs
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(addrs);
    }

    /// Resolves the passthrough host again, keeping the old addresses if
    /// the lookup fails.
    pub async fn refresh_passthrough_addrs(&self) {
        match tokio::net::lookup_host(self.passthrough.addr.as_str()).await {
            Ok(addrs) => {
                let addrs: Vec<_> = addrs.collect();
                if !addrs.is_empty() {
                    self.set_passthrough_addrs(addrs);
                }
            }
            Err(e) => {
                tracing::warn!(upstream = %self.settings.name, host = %self.passthrough.addr, error = %e, "cannot resolve the passthrough host; keeping the last addresses")
            }
        }
    }

    pub fn pause_flushes(&self, d: Duration) {
        self.paused_until
            .store(now_millis() + d.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn flushes_paused(&self) -> bool {
        now_millis() < self.paused_until.load(Ordering::SeqCst)
    }
}

/// Everything the proxy hooks and the background tasks share.
pub struct App {
    pub config: Config,
    pub store: Arc<Store>,
    /// This data_dir's id (`store::instance`), in every upstream file name
    /// and batch's metadata: what Ferry may sweep, adopt and delete upstream.
    pub instance_id: String,
    pub waiters: Waiters,
    pub metrics: Arc<Metrics>,
    pub upstreams: Vec<Upstream>,
    /// Per-tenant rate limits (429 with `Retry-After`).
    pub limits: limits::TenantLimits,
    /// Model names as metric labels, capped.
    pub model_labels: metrics::ModelLabels,
    /// Recovery has finished; `/readyz` answers 200.
    pub ready: AtomicBool,
    /// SIGTERM received: deferred intake answers 503, held callers get their ticket.
    pub shutting_down: AtomicBool,
    /// Tells held callers to give up waiting (shutdown).
    pub release_waiters: tokio::sync::Notify,
    /// The cluster's members as last seen (empty with sled): upstreams are
    /// spread over them.
    pub members: std::sync::RwLock<Vec<String>>,
    /// Each tenant's standard-lane calls this hour, for its
    /// `max_standard_per_hour` (this node's count).
    pub standard_budgets:
        std::sync::Mutex<std::collections::HashMap<String, batch::lanes::StandardBudget>>,
}

impl App {
    pub fn upstream_named(&self, name: &str) -> Option<&Upstream> {
        self.upstreams.iter().find(|u| u.settings.name == name)
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Called after a request is stored: wakes the flush loop when the
    /// request starts a queue (its time threshold begins) or crosses the
    /// size or byte threshold.
    pub async fn after_enqueue(&self, upstream: &Upstream, rec: &RequestRecord) {
        let qk = QueueKey::of(rec);
        let Some(load) = self.store.queue_load(&qk) else {
            return;
        };
        let s = &upstream.settings;
        // A deadline within the flush loop's horizon may call for a flush or
        // an escalation before its next pass. The horizon reads every
        // learned latency: only for a request that has a deadline.
        let near = rec.deadline_at.is_some_and(|d| {
            let horizon =
                batch::lanes::scan_horizon(&upstream.latencies.longest(), s.escalation_margin);
            d.saturating_sub(now_secs()) <= horizon.as_secs()
        });
        if load.started || near || load.count >= s.max_requests as u64 || load.bytes >= s.max_bytes
        {
            upstream.wake.notify_one();
            // Another node may own the upstream's flush loop.
            if self.store.is_shared() {
                self.store
                    .publish(store::ClusterEvent::Queued(upstream.settings.name.clone()))
                    .await;
            }
        }
    }

    /// A request reached a terminal status and it is durable: wake its
    /// waiters and count it. `answer` is the upstream's answer stored with
    /// it, when the caller has it at hand: waiters then get the record and
    /// answer with no store read.
    pub fn on_terminal(&self, rec: &RequestRecord, answer: Option<&StoredResult>) {
        match (rec.status, answer) {
            // Without the answer at hand, they read it from the store.
            (RequestStatus::Completed, None) => self.waiters.notify(rec.id),
            (status, answer) => self.waiters.finish(delivery::waiters::Finished {
                record: rec.clone(),
                // Only a completed request has an answer.
                result: answer
                    .filter(|_| status == RequestStatus::Completed)
                    .cloned(),
            }),
        }
        self.metrics
            .requests_finished
            .with_label_values(&[rec.status.as_str()])
            .inc();
        if let Some(lane) = rec.answered_by() {
            self.metrics
                .lane_results
                .with_label_values(&[lane.as_str()])
                .inc();
            // Answered in the second after the deadline still counts as
            // in time: deadlines are whole seconds.
            if rec.deadline_at.is_some_and(|d| now_secs() > d) {
                self.metrics
                    .deadline_misses
                    .with_label_values(&[lane.as_str()])
                    .inc();
            }
        }
        self.metrics
            .accept_to_result
            .observe(now_secs().saturating_sub(rec.created_at) as f64);
    }

    /// Adds the `usage` of the answer kept for a request, on `lane`, to the
    /// token counters and, when the model has a price in config, its saving
    /// versus real time (none on `standard`, which is real time). Called
    /// once per request, for the stored answer only: an answer discarded
    /// because another lane answered first is counted in
    /// `ferry_spent_twice_*` instead ([`App::count_spent_twice`]). `model`
    /// is the queue's (config-routed) model, which keeps label values
    /// bounded.
    pub fn count_tokens(
        &self,
        upstream: &Upstream,
        endpoint: endpoint::Endpoint,
        model: &str,
        lane: store::Lane,
        body: &[u8],
    ) {
        let Some((prompt, completion)) = answer_usage(endpoint, body) else {
            return;
        };
        let model = self.model_labels.label(model);
        let label = endpoint.label();
        self.metrics
            .tokens
            .with_label_values(&[model, label, "prompt"])
            .inc_by(prompt);
        self.metrics
            .tokens
            .with_label_values(&[model, label, "completion"])
            .inc_by(completion);
        if let Some(list) = self.list_usd(model, prompt, completion) {
            let paid = batch::lanes::lane_cost(list, lane, upstream.settings.batch_discount);
            self.metrics
                .savings_usd
                .with_label_values(&[model, label])
                .inc_by(list - paid);
        }
    }

    /// Counts an answer paid for and thrown away, on `lane`, for a request
    /// already answered on another (see [`store::lifecycle::spent_twice`]),
    /// with its estimated cost when the model has a price in config.
    pub fn count_spent_twice(
        &self,
        upstream: &Upstream,
        endpoint: endpoint::Endpoint,
        model: &str,
        lane: store::Lane,
        body: &[u8],
    ) {
        self.metrics
            .spent_twice
            .with_label_values(&[lane.as_str()])
            .inc();
        let Some((prompt, completion)) = answer_usage(endpoint, body) else {
            return;
        };
        if let Some(list) = self.list_usd(self.model_labels.label(model), prompt, completion) {
            self.metrics
                .spent_twice_usd
                .with_label_values(&[lane.as_str()])
                .inc_by(batch::lanes::lane_cost(
                    list,
                    lane,
                    upstream.settings.batch_discount,
                ));
        }
    }

    /// The real-time list price of `prompt` and `completion` tokens of
    /// the model labelled `model`, when config prices it.
    fn list_usd(&self, model: &str, prompt: u64, completion: u64) -> Option<f64> {
        let p = self.config.prices.get(model)?;
        Some((prompt as f64 * p.prompt_per_mtok + completion as f64 * p.completion_per_mtok) / 1e6)
    }

    /// Publishes the queue gauges of one upstream. Models folded into
    /// one label by the cap share a series: theirs are summed.
    pub fn publish_queue_metrics(&self, upstream: &str, queues: &[(QueueKey, QueueStats)]) {
        let mut by_label: std::collections::HashMap<&str, QueueStats> =
            std::collections::HashMap::new();
        for (qk, s) in queues.iter().filter(|(qk, _)| qk.upstream == upstream) {
            let sum = by_label
                .entry(self.model_labels.label(&qk.model))
                .or_default();
            sum.count += s.count;
            sum.bytes += s.bytes;
            if s.count > 0 && (sum.oldest_ms == 0 || s.oldest_ms < sum.oldest_ms) {
                sum.oldest_ms = s.oldest_ms;
            }
        }
        for (model, s) in by_label {
            let labels = [upstream, model];
            self.metrics
                .queued_requests
                .with_label_values(&labels)
                .set(s.count as i64);
            self.metrics
                .queued_bytes
                .with_label_values(&labels)
                .set(s.bytes as i64);
            let age = if s.count == 0 {
                0
            } else {
                now_millis().saturating_sub(s.oldest_ms) / 1000
            };
            self.metrics
                .queue_oldest_age
                .with_label_values(&labels)
                .set(age as i64);
        }
    }
}

/// An answer's (prompt, completion) tokens, from its `usage`; `None` when
/// the body has none. Only `usage` is read; the rest is skipped, not built.
fn answer_usage(endpoint: endpoint::Endpoint, body: &[u8]) -> Option<(u64, u64)> {
    #[derive(serde::Deserialize)]
    struct Usage {
        #[serde(default)]
        usage: serde_json::Value,
    }
    let Usage { usage } = serde_json::from_slice(body).ok()?;
    (!usage.is_null()).then(|| endpoint.usage_tokens(&usage))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_split_into_targets() {
        let t = PassthroughTarget::parse("https://api.openai.com/v1").unwrap();
        assert_eq!(
            (
                t.addr.as_str(),
                t.tls,
                t.host.as_str(),
                t.base_path.as_str()
            ),
            ("api.openai.com:443", true, "api.openai.com", "/v1")
        );
        let t = PassthroughTarget::parse("http://127.0.0.1:9000/openai/v1/").unwrap();
        assert_eq!(
            (t.addr.as_str(), t.tls, t.base_path.as_str()),
            ("127.0.0.1:9000", false, "/openai/v1")
        );
        let t = PassthroughTarget::parse("http://[::1]:81/v1").unwrap();
        assert_eq!(t.addr, "[::1]:81");
        assert!(PassthroughTarget::parse("ftp://x").is_none());
        assert!(PassthroughTarget::parse("http:///v1").is_none());
    }
}
