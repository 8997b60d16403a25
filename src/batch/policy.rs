//! When a queue becomes a batch: pure decisions over queue stats and a time.

use std::time::Duration;

use crate::store::QueueStats;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushReason {
    /// `max_requests` reached.
    Size,
    /// `max_bytes` reached.
    Bytes,
    /// The oldest request has waited `max_wait`.
    Time,
    /// An operator asked (`POST /admin/flush`).
    Manual,
}

impl FlushReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FlushReason::Size => "size",
            FlushReason::Bytes => "bytes",
            FlushReason::Time => "time",
            FlushReason::Manual => "manual",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct FlushPolicy {
    pub max_requests: usize,
    pub max_bytes: u64,
    pub max_wait: Duration,
    /// A queue holding this many inputs fills a batch (see
    /// [`FlushPolicy::for_endpoint`]); `u64::MAX`: no input cap.
    pub max_inputs: u64,
}

impl FlushPolicy {
    /// The policy for a queue of `endpoint`: the upstream's thresholds and
    /// the endpoint's per-batch input cap, which makes a queue of a few
    /// large embeddings requests as full as one of `max_requests` lines.
    pub fn for_endpoint(self, endpoint: crate::endpoint::Endpoint) -> FlushPolicy {
        FlushPolicy {
            max_inputs: crate::store::lifecycle::max_inputs(endpoint),
            ..self
        }
    }
}

/// Whether a queue should be flushed now, and why.
pub fn flush_reason(stats: &QueueStats, policy: &FlushPolicy, now_ms: u64) -> Option<FlushReason> {
    if stats.count == 0 {
        return None;
    }
    if stats.count >= policy.max_requests as u64 || stats.inputs >= policy.max_inputs {
        return Some(FlushReason::Size);
    }
    if stats.bytes >= policy.max_bytes {
        return Some(FlushReason::Bytes);
    }
    if now_ms.saturating_sub(stats.oldest_ms) >= policy.max_wait.as_millis() as u64 {
        return Some(FlushReason::Time);
    }
    None
}

/// How long until a queue's time threshold fires (for sleeping exactly that long).
pub fn time_to_deadline(stats: &QueueStats, policy: &FlushPolicy, now_ms: u64) -> Option<Duration> {
    if stats.count == 0 {
        return None;
    }
    let due = stats
        .oldest_ms
        .saturating_add(policy.max_wait.as_millis() as u64);
    Some(Duration::from_millis(due.saturating_sub(now_ms)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: FlushPolicy = FlushPolicy {
        max_requests: 10,
        max_bytes: 1000,
        max_wait: Duration::from_secs(60),
        max_inputs: u64::MAX,
    };

    fn stats(count: u64, bytes: u64, oldest_ms: u64) -> QueueStats {
        QueueStats {
            count,
            bytes,
            oldest_ms,
            inputs: count,
        }
    }

    #[test]
    fn an_embeddings_queue_full_of_inputs_flushes_by_size() {
        let embeddings = P.for_endpoint(crate::endpoint::Endpoint::Embeddings);
        assert_eq!(embeddings.max_inputs, 50_000);
        let full = QueueStats {
            inputs: 50_000,
            ..stats(2, 10, 1000)
        };
        assert_eq!(
            flush_reason(&full, &embeddings, 1000),
            Some(FlushReason::Size)
        );
        let almost = QueueStats {
            inputs: 49_999,
            ..full
        };
        assert_eq!(flush_reason(&almost, &embeddings, 1000), None);
        // Chat counts lines only.
        let chat = P.for_endpoint(crate::endpoint::Endpoint::ChatCompletions);
        assert_eq!(flush_reason(&full, &chat, 1000), None);
    }

    #[test]
    fn each_threshold_fires_with_its_reason() {
        assert_eq!(flush_reason(&stats(0, 0, 0), &P, 1_000_000), None);
        assert_eq!(
            flush_reason(&stats(10, 10, 1000), &P, 1000),
            Some(FlushReason::Size)
        );
        assert_eq!(
            flush_reason(&stats(2, 1000, 1000), &P, 1000),
            Some(FlushReason::Bytes)
        );
        assert_eq!(flush_reason(&stats(2, 10, 1000), &P, 60_999), None);
        assert_eq!(
            flush_reason(&stats(2, 10, 1000), &P, 61_000),
            Some(FlushReason::Time)
        );
    }

    #[test]
    fn deadline_counts_down() {
        assert_eq!(
            time_to_deadline(&stats(1, 1, 1000), &P, 31_000),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            time_to_deadline(&stats(1, 1, 1000), &P, 99_000),
            Some(Duration::ZERO)
        );
        assert_eq!(time_to_deadline(&stats(0, 0, 0), &P, 0), None);
    }
}
