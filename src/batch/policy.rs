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
    /// A request's escalation time is near: a batch started now is still
    /// expected back before it, one started at the time threshold is not.
    Deadline,
}

impl FlushReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FlushReason::Size => "size",
            FlushReason::Bytes => "bytes",
            FlushReason::Time => "time",
            FlushReason::Manual => "manual",
            FlushReason::Deadline => "deadline",
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

/// Whether a queue whose earliest escalation time is `escalate_at_ms` is
/// flushed now for it, before its thresholds (which would flush it at
/// `flush_at_ms`): only when a batch started now is expected back
/// (`batch_expected`) by the escalation time, and one started at the
/// threshold is not. A deadline no batch can make is left to escalation,
/// and one the usual flush makes anyway changes nothing.
pub fn deadline_flush(
    now_ms: u64,
    escalate_at_ms: u64,
    flush_at_ms: u64,
    batch_expected: Duration,
) -> bool {
    let t = u64::try_from(batch_expected.as_millis()).unwrap_or(u64::MAX);
    now_ms.saturating_add(t) <= escalate_at_ms && flush_at_ms.saturating_add(t) > escalate_at_ms
}

/// When a queue's time threshold flushes it (unix millis).
pub fn flush_at_ms(stats: &QueueStats, policy: &FlushPolicy) -> u64 {
    stats
        .oldest_ms
        .saturating_add(u64::try_from(policy.max_wait.as_millis()).unwrap_or(u64::MAX))
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

    #[test]
    fn a_near_deadline_flushes_only_while_a_batch_can_still_make_it() {
        let hour = Duration::from_secs(3600);
        let now = 1_000_000_000;
        let h = 3_600_000;
        // Escalation in 2 h, the time threshold in 1 h 30: the usual flush
        // would be back too late, a batch now in time: flush now.
        assert!(deadline_flush(now, now + 2 * h, now + 3 * h / 2, hour));
        // Exactly in time still counts.
        assert!(deadline_flush(now, now + h, now + h / 2, hour));
        // No batch can make it any more: escalation's, not a flush's.
        assert!(!deadline_flush(now, now + h - 1, now + h / 2, hour));
        // The usual flush makes it anyway: nothing to hurry.
        assert!(!deadline_flush(now, now + 3 * h, now + h, hour));
        assert!(
            !deadline_flush(u64::MAX, u64::MAX, u64::MAX, hour),
            "no overflow"
        );
        let stats = QueueStats {
            count: 1,
            bytes: 1,
            oldest_ms: now,
            inputs: 1,
        };
        assert_eq!(flush_at_ms(&stats, &P), now + 60_000);
        assert_eq!(FlushReason::Deadline.as_str(), "deadline");
    }
}
