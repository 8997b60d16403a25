//! Every metric Ferry exports, in one place. Labels are bounded sets
//! (routes, upstream names, model names from config-routed traffic, status
//! codes); never custom ids or keys.

use std::time::Duration;

use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::store::census;
use crate::store::space::Need;

/// A count as a gauge's value, saturating rather than wrapping.
pub fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub struct Metrics {
    pub registry: Registry,
    pub http_requests: IntCounterVec,
    pub passthrough_duration: Histogram,
    pub intake_duration: Histogram,
    pub queued_requests: IntGaugeVec,
    pub queued_bytes: IntGaugeVec,
    pub queue_oldest_age: IntGaugeVec,
    pub flushes: IntCounterVec,
    pub batches: IntCounterVec,
    pub live_batches: IntGauge,
    pub batch_size: Histogram,
    pub batch_duration: Histogram,
    pub requests_finished: IntCounterVec,
    pub accept_to_result: Histogram,
    pub waiters: IntGauge,
    pub upstream_calls: IntCounterVec,
    pub upstream_call_duration: HistogramVec,
    pub upstream_retries: IntCounter,
    pub tokens: IntCounterVec,
    pub storage_size: IntGauge,
    pub storage_free: IntGauge,
    pub storage_min_free: IntGauge,
    pub storage_low_space: IntCounterVec,
    pub storage_rows: IntGaugeVec,
    pub storage_kind_bytes: IntGaugeVec,
    pub storage_flush_duration: Histogram,
    pub upstream_backoff_seconds: CounterVec,
    pub webhook_deliveries: IntCounterVec,
    pub webhook_outbox_depth: IntGauge,
    pub savings_usd: CounterVec,
    pub rate_limited: IntCounterVec,
    pub retention_purged: IntCounterVec,
    pub retention_slice_duration: Histogram,
    pub retention_oldest_terminal_age: IntGauge,
    /// Deadlines (issue #17): answers by the lane that produced them, steps
    /// onto a synchronous lane, answers after their deadline, flex calls
    /// refused for capacity.
    pub lane_results: IntCounterVec,
    pub escalations: IntCounterVec,
    pub deadline_misses: IntCounterVec,
    /// Answers paid for and thrown away: a request escalated out of a
    /// submitted batch was answered by the other lane first.
    pub spent_twice: IntCounterVec,
    pub spent_twice_usd: CounterVec,
    /// Escalations a tenant's lanes or standard cap held back.
    pub escalations_withheld: IntCounterVec,
    pub flex_unavailable: IntCounter,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Metric definitions are constants; a failure here is a programming error
    // caught by the unit test below on every build.
    r.unwrap_or_else(|e| panic!("invalid metric definition: {e}"))
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| must(registry.register(c));
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(name, help), labels));
            reg(Box::new(c.clone()));
            c
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = must(IntGaugeVec::new(Opts::new(name, help), labels));
            reg(Box::new(g.clone()));
            g
        };
        let hist = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = must(Histogram::with_opts(
                HistogramOpts::new(name, help).buckets(buckets),
            ));
            reg(Box::new(h.clone()));
            h
        };
        let latency = || {
            vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ]
        };
        let long = || {
            vec![
                1.0,
                10.0,
                60.0,
                300.0,
                900.0,
                1800.0,
                3600.0,
                3.0 * 3600.0,
                6.0 * 3600.0,
                12.0 * 3600.0,
                24.0 * 3600.0,
                72.0 * 3600.0,
            ]
        };
        let upstream_call_duration = must(HistogramVec::new(
            HistogramOpts::new(
                "ferry_upstream_call_duration_seconds",
                "Duration of Batch API calls to the upstream.",
            )
            .buckets(latency()),
            &["upstream", "operation"],
        ));
        reg(Box::new(upstream_call_duration.clone()));
        let upstream_retries = must(IntCounter::new(
            "ferry_upstream_retries_total",
            "Upstream API calls retried after a transient failure.",
        ));
        reg(Box::new(upstream_retries.clone()));
        let live_batches = must(IntGauge::new(
            "ferry_live_batches",
            "Batches not yet finished (claimed, uploaded or submitted).",
        ));
        reg(Box::new(live_batches.clone()));
        let waiters = must(IntGauge::new(
            "ferry_waiters",
            "Callers currently held for a result (wait=N and ?wait=S).",
        ));
        reg(Box::new(waiters.clone()));
        let storage_size = must(IntGauge::new(
            "ferry_storage_size_bytes",
            "Size of the store on disk (the sled database, or the PostgreSQL database).",
        ));
        reg(Box::new(storage_size.clone()));
        let storage_free = must(IntGauge::new(
            "ferry_storage_free_bytes",
            "Free bytes on data_dir's filesystem (embedded store only).",
        ));
        reg(Box::new(storage_free.clone()));
        let storage_min_free = must(IntGauge::new(
            "ferry_storage_min_free_bytes",
            "Free bytes the embedded store keeps (server.min_free_mb): below it deferred intake \
             answers 503, below half claims and result ingestion wait.",
        ));
        reg(Box::new(storage_min_free.clone()));
        let float_counter = |name: &str, help: &str, labels: &[&str]| {
            let c = must(CounterVec::new(Opts::new(name, help), labels));
            reg(Box::new(c.clone()));
            c
        };
        let webhook_outbox_depth = must(IntGauge::new(
            "ferry_webhook_outbox_depth",
            "Webhook deliveries waiting in the durable outbox.",
        ));
        reg(Box::new(webhook_outbox_depth.clone()));
        let retention_oldest_terminal_age = must(IntGauge::new(
            "ferry_retention_oldest_terminal_age_seconds",
            "Age of the oldest terminal request still kept (0 when none is).",
        ));
        reg(Box::new(retention_oldest_terminal_age.clone()));
        Metrics {
            retention_purged: counter_vec(
                "ferry_retention_purged_rows_total",
                "Rows the retention purge removed, by kind (request, result, body, batch).",
                &["kind"],
            ),
            retention_slice_duration: hist(
                "ferry_retention_slice_duration_seconds",
                "Duration of one retention purge slice.",
                latency(),
            ),
            retention_oldest_terminal_age,
            upstream_backoff_seconds: float_counter(
                "ferry_upstream_backoff_seconds_total",
                "Seconds spent waiting before retrying upstream calls.",
                &["upstream"],
            ),
            webhook_deliveries: counter_vec(
                "ferry_webhook_deliveries_total",
                "Webhook delivery attempts by outcome (delivered, retry, dead).",
                &["outcome"],
            ),
            webhook_outbox_depth,
            savings_usd: float_counter(
                "ferry_estimated_savings_usd_total",
                "Estimated saving of batch results versus real-time prices, from the price table in config, by model and endpoint (embeddings priced on input tokens only).",
                &["model", "endpoint"],
            ),
            rate_limited: counter_vec(
                "ferry_rate_limited_total",
                "Calls answered 429 by Ferry's own rate limits, by kind (deferred, passthrough).",
                &["kind"],
            ),
            http_requests: counter_vec(
                "ferry_http_requests_total",
                "Requests answered on the proxy port, by route, mode and status code.",
                &["route", "mode", "code"],
            ),
            passthrough_duration: hist(
                "ferry_passthrough_duration_seconds",
                "Time to serve a passthrough call, first byte in to last byte out.",
                latency(),
            ),
            intake_duration: hist(
                "ferry_intake_duration_seconds",
                "Time from a deferred call's arrival to its 202 (durable).",
                latency(),
            ),
            queued_requests: gauge_vec(
                "ferry_queued_requests",
                "Requests waiting in a queue.",
                &["upstream", "model"],
            ),
            queued_bytes: gauge_vec(
                "ferry_queued_bytes",
                "JSONL bytes waiting in a queue.",
                &["upstream", "model"],
            ),
            queue_oldest_age: gauge_vec(
                "ferry_queue_oldest_age_seconds",
                "Age of the oldest queued request.",
                &["upstream", "model"],
            ),
            flushes: counter_vec(
                "ferry_flushes_total",
                "Queues flushed into a batch, by reason.",
                &["upstream", "reason"],
            ),
            batches: counter_vec(
                "ferry_batches_total",
                "Batch lifecycle events (created, completed, failed, expired, cancelled, refused, lost).",
                &["upstream", "event"],
            ),
            live_batches,
            batch_size: hist(
                "ferry_batch_size_requests",
                "Requests per batch.",
                vec![1.0, 10.0, 100.0, 1000.0, 5000.0, 10000.0, 25000.0, 50000.0],
            ),
            batch_duration: hist(
                "ferry_batch_duration_seconds",
                "Time from batch creation upstream to its results stored.",
                long(),
            ),
            lane_results: counter_vec(
                "ferry_lane_results_total",
                "Deferred requests answered, by the lane that answered (batch, flex, standard).",
                &["lane"],
            ),
            escalations: counter_vec(
                "ferry_escalations_total",
                "Requests stepped up for their deadline onto a lane: out of their queue onto flex or standard, or from flex onto standard.",
                &["lane"],
            ),
            deadline_misses: counter_vec(
                "ferry_deadline_misses_total",
                "Requests with a deadline answered after it, by the lane that answered.",
                &["lane"],
            ),
            spent_twice: counter_vec(
                "ferry_spent_twice_total",
                "Answers paid for and discarded because the request was already answered on another lane (an escalation out of a submitted batch), by the lane of the discarded answer.",
                &["lane"],
            ),
            spent_twice_usd: float_counter(
                "ferry_spent_twice_usd_total",
                "Estimated cost of the discarded answers counted in ferry_spent_twice_total, from the price table in config (batch and flex at the batch discount), by lane.",
                &["lane"],
            ),
            escalations_withheld: counter_vec(
                "ferry_escalations_withheld_total",
                "Requests due to step up for their deadline that stayed on a cheaper lane, by reason: lanes (the tenant's lanes allow none) or standard_cap (its standard calls this hour are used up).",
                &["reason"],
            ),
            flex_unavailable: {
                let c = must(IntCounter::new(
                    "ferry_flex_unavailable_total",
                    "Flex calls the upstream refused for capacity (429, retried or stepped up).",
                ));
                reg(Box::new(c.clone()));
                c
            },
            requests_finished: counter_vec(
                "ferry_requests_finished_total",
                "Deferred requests reaching a terminal status.",
                &["status"],
            ),
            accept_to_result: hist(
                "ferry_accept_to_result_seconds",
                "Time from a deferred call's 202 to its terminal status.",
                long(),
            ),
            waiters,
            upstream_calls: counter_vec(
                "ferry_upstream_calls_total",
                "Batch API calls to the upstream, by operation and outcome (HTTP status or transport_error).",
                &["upstream", "operation", "outcome"],
            ),
            upstream_call_duration,
            upstream_retries,
            tokens: counter_vec(
                "ferry_tokens_total",
                "Tokens reported in batch results, by model, endpoint and kind (prompt, completion; the Responses API's input and output tokens count as these).",
                &["model", "endpoint", "kind"],
            ),
            storage_size,
            storage_free,
            storage_min_free,
            storage_rows: gauge_vec(
                "ferry_storage_rows",
                "Rows the store holds, by kind of data, as of the last census (sled: counted \
                 every retention.census_secs; PostgreSQL: the statistics' live-row estimate).",
                &["kind"],
            ),
            storage_kind_bytes: gauge_vec(
                "ferry_storage_kind_bytes",
                "Bytes the store holds, by kind of data, as of the last census (sled: keys and \
                 values; PostgreSQL: the table on disk with its indexes).",
                &["kind"],
            ),
            storage_low_space: counter_vec(
                "ferry_storage_low_space_refusals_total",
                "Store writes refused for want of free space on data_dir, by need: intake (a new \
                 deferred call, answered 503) or growth (a claim or a batch's results, retried).",
                &["need"],
            ),
            storage_flush_duration: hist(
                "ferry_storage_flush_duration_seconds",
                "Duration of durable writes: sled's group commits, or PostgreSQL's write transactions.",
                latency(),
            ),
            registry,
        }
    }

    /// Creates at zero every series whose labels are known before any
    /// traffic (from the config and the fixed label sets), so a dashboard
    /// panel on a healthy gateway shows 0 rather than "No data", and a
    /// `rate()` sees the series start from 0.
    pub fn zero_known_series(&self, upstreams: &[&str], models: &[String], priced: &[String]) {
        for kind in ["deferred", "passthrough"] {
            self.rate_limited.with_label_values(&[kind]);
        }
        for outcome in ["delivered", "retry", "dead"] {
            self.webhook_deliveries.with_label_values(&[outcome]);
        }
        for status in ["completed", "failed", "expired", "cancelled"] {
            self.requests_finished.with_label_values(&[status]);
        }
        for lane in ["batch", "flex", "standard"] {
            self.lane_results.with_label_values(&[lane]);
            self.deadline_misses.with_label_values(&[lane]);
            self.spent_twice.with_label_values(&[lane]);
            self.spent_twice_usd.with_label_values(&[lane]);
            if lane != "batch" {
                self.escalations.with_label_values(&[lane]);
            }
        }
        for reason in ["lanes", "standard_cap"] {
            self.escalations_withheld.with_label_values(&[reason]);
        }
        for kind in PURGED_KINDS {
            self.retention_purged.with_label_values(&[*kind]);
        }
        for kind in census::KINDS {
            self.storage_rows.with_label_values(&[kind.as_str()]);
            self.storage_kind_bytes.with_label_values(&[kind.as_str()]);
        }
        for need in [Need::Intake, Need::Growth] {
            self.storage_low_space.with_label_values(&[need.as_str()]);
        }
        for up in upstreams {
            self.upstream_backoff_seconds.with_label_values(&[*up]);
            for event in BATCH_EVENTS {
                self.batches.with_label_values(&[*up, *event]);
            }
            for reason in ["size", "bytes", "time", "manual", "deadline"] {
                self.flushes.with_label_values(&[*up, reason]);
            }
        }
        for endpoint in crate::endpoint::Endpoint::ALL.map(|e| e.label()) {
            for model in models {
                for kind in ["prompt", "completion"] {
                    self.tokens
                        .with_label_values(&[model.as_str(), endpoint, kind]);
                }
            }
            for model in priced {
                self.savings_usd
                    .with_label_values(&[model.as_str(), endpoint]);
            }
        }
    }

    pub fn upstream_call(&self, upstream: &str, op: &str, outcome: &str, took: Duration) {
        self.upstream_calls
            .with_label_values(&[upstream, op, outcome])
            .inc();
        self.upstream_call_duration
            .with_label_values(&[upstream, op])
            .observe(took.as_secs_f64());
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Every `event` of `ferry_batches_total`: `created`, then the upstream's
/// terminal statuses, `refused` (the upstream would not take the file or
/// batch) and `lost` (the upstream no longer knows the batch).
pub const BATCH_EVENTS: &[&str] = &[
    "created",
    "completed",
    "failed",
    "expired",
    "cancelled",
    "refused",
    "lost",
];

/// Every `kind` of `ferry_retention_purged_rows_total`.
pub const PURGED_KINDS: &[&str] = &["request", "result", "body", "batch"];

/// The label value a model's metric series carries when the model is
/// past the cap.
pub const OTHER_MODEL: &str = "other";

/// Model names outside the config that get a metric series of their own.
pub const MAX_MODEL_LABELS: usize = 100;

/// Model names as metric label values. Names the config knows (upstream
/// `models` lists, price tables, routes) are always their own series; any
/// other name a caller sends gets its own series only while fewer than
/// `cap` such names have been seen, and folds into [`OTHER_MODEL`] after,
/// so a tenant sending random model names cannot grow `/metrics` without
/// bound.
pub struct ModelLabels {
    known: std::collections::HashSet<String>,
    seen: dashmap::DashSet<String>,
    cap: usize,
}

impl ModelLabels {
    pub fn new(known: impl IntoIterator<Item = String>, cap: usize) -> ModelLabels {
        ModelLabels {
            known: known.into_iter().collect(),
            seen: dashmap::DashSet::new(),
            cap,
        }
    }

    /// The label value for `model`.
    pub fn label<'a>(&self, model: &'a str) -> &'a str {
        if self.known.contains(model) || self.seen.contains(model) {
            return model;
        }
        // Two callers may both pass the check at the cap and end one over:
        // the bound is `cap` plus the concurrency, which is enough.
        if self.seen.len() < self.cap {
            self.seen.insert(model.to_owned());
            return model;
        }
        OTHER_MODEL
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_labels_fold_past_the_cap_but_never_known_names() {
        let l = ModelLabels::new(["gpt-4o".to_owned()], 2);
        assert_eq!(l.label("a"), "a");
        assert_eq!(l.label("b"), "b");
        assert_eq!(l.label("c"), OTHER_MODEL);
        assert_eq!(l.label("a"), "a", "a name seen before keeps its series");
        assert_eq!(l.label("gpt-4o"), "gpt-4o", "configured names never fold");
    }

    #[test]
    fn metrics_register_and_render() {
        let m = Metrics::new();
        m.http_requests
            .with_label_values(&["chat", "deferred", "202"])
            .inc();
        m.upstream_call("emu", "get_batch", "200", Duration::from_millis(3));
        let text = m.render();
        assert!(text.contains(
            "ferry_http_requests_total{code=\"202\",mode=\"deferred\",route=\"chat\"} 1"
        ));
        assert!(text.contains("ferry_upstream_call_duration_seconds_bucket"));
    }
}
