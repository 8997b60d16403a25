//! Deadlines (issue #17): when a request still waiting in its queue must
//! leave it for a synchronous lane, and which lane. Pure functions over
//! plain data; the flush loop and the lane driver act on what they decide.
//!
//! A request's escalation time is its deadline minus the time the next lane
//! is expected to take, minus a margin. The expected time comes from a
//! [`LatencyEstimate`]: the configured priors today ([`LanePriors`]); the
//! latencies Ferry observes per upstream and model can stand in later
//! without changing the decision.

use std::time::Duration;

use crate::store::Lane;

/// How long a call on `lane` for `model` is expected to take.
pub trait LatencyEstimate {
    fn expected(&self, lane: Lane, model: &str) -> Duration;
}

/// The configured expectations of an upstream's synchronous lanes (its
/// `flex_latency_prior_secs` and `standard_latency_prior_secs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LanePriors {
    /// A batch's turnaround, for the flush policy (see
    /// [`super::policy::deadline_flush`]).
    pub batch: Duration,
    pub flex: Duration,
    pub standard: Duration,
}

impl LatencyEstimate for LanePriors {
    fn expected(&self, lane: Lane, _model: &str) -> Duration {
        match lane {
            Lane::Flex => self.flex,
            Lane::Standard => self.standard,
            Lane::Batch => self.batch,
        }
    }
}

/// The lane a queued request of `model` escalates to: flex, at batch
/// prices, where the upstream offers it for the model; else standard.
pub fn next_lane(model: &str, flex_models: &[String]) -> Lane {
    if flex_models.iter().any(|m| m == model) {
        Lane::Flex
    } else {
        Lane::Standard
    }
}

/// When (unix millis) a request due at `deadline_at` (unix seconds) must
/// leave its queue for `lane`: the deadline less the lane's expected time
/// and the margin; 0 (at once) when that is already past the epoch's start.
pub fn escalation_at_ms(
    deadline_at: u64,
    lane: Lane,
    model: &str,
    estimate: &dyn LatencyEstimate,
    margin: Duration,
) -> u64 {
    let lead = estimate.expected(lane, model).saturating_add(margin);
    deadline_at
        .saturating_mul(1000)
        .saturating_sub(u64::try_from(lead.as_millis()).unwrap_or(u64::MAX))
}

/// The furthest ahead of now a deadline can call for an escalation: the
/// slower lane's expected time plus the margin. The flush loop reads only
/// requests due within this horizon.
pub fn horizon(priors: &LanePriors, margin: Duration) -> Duration {
    priors.flex.max(priors.standard).saturating_add(margin)
}

/// How far ahead of now the flush loop reads deadlines: the escalation
/// horizon plus a batch's turnaround, so that it sees the queues a batch
/// started now could still answer in time.
pub fn scan_horizon(priors: &LanePriors, margin: Duration) -> Duration {
    horizon(priors, margin).saturating_add(priors.batch)
}

/// Whether a flex call refused for capacity (`resource_unavailable`) may
/// be tried again at `now_ms` after `retry_in`, or whether the request must
/// step up to standard now: flex is kept while standard, started after the
/// wait, would still be expected to answer before the deadline with the
/// margin to spare.
pub fn flex_retry_in_time(
    now_ms: u64,
    retry_in: Duration,
    deadline_at: u64,
    model: &str,
    estimate: &dyn LatencyEstimate,
    margin: Duration,
) -> bool {
    let retry_ms = u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX);
    now_ms.saturating_add(retry_ms)
        <= escalation_at_ms(deadline_at, Lane::Standard, model, estimate, margin)
}

/// What an answer on `lane` cost, given what it costs at real-time
/// (list) prices: standard is billed at list, batch and flex at the
/// upstream's batch discount (flex is billed at batch prices).
pub fn lane_cost(list: f64, lane: Lane, batch_discount: f64) -> f64 {
    match lane {
        Lane::Standard => list,
        Lane::Batch | Lane::Flex => list * (1.0 - batch_discount),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIORS: LanePriors = LanePriors {
        batch: Duration::from_secs(3600),
        flex: Duration::from_secs(600),
        standard: Duration::from_secs(60),
    };
    const MARGIN: Duration = Duration::from_secs(30);
    const DEADLINE: u64 = 1_700_003_600;

    #[test]
    fn flex_where_the_model_has_it_else_standard() {
        let flex = vec!["gpt-5-mini".to_owned()];
        assert_eq!(next_lane("gpt-5-mini", &flex), Lane::Flex);
        assert_eq!(next_lane("gpt-4o", &flex), Lane::Standard);
        assert_eq!(next_lane("gpt-5-mini", &[]), Lane::Standard);
    }

    #[test]
    fn escalation_leaves_the_next_lanes_time_and_the_margin() {
        let at = |lane| escalation_at_ms(DEADLINE, lane, "m", &PRIORS, MARGIN);
        assert_eq!(at(Lane::Flex), (DEADLINE - 630) * 1000);
        assert_eq!(at(Lane::Standard), (DEADLINE - 90) * 1000);
        // A deadline nearer than the lane's time escalates at once.
        assert_eq!(escalation_at_ms(5, Lane::Flex, "m", &PRIORS, MARGIN), 0);
        assert_eq!(horizon(&PRIORS, MARGIN), Duration::from_secs(630));
        assert_eq!(scan_horizon(&PRIORS, MARGIN), Duration::from_secs(4230));
    }

    #[test]
    fn the_estimate_is_a_seam_per_model() {
        struct Observed;
        impl LatencyEstimate for Observed {
            fn expected(&self, _: Lane, model: &str) -> Duration {
                Duration::from_secs(if model == "slow" { 300 } else { 10 })
            }
        }
        let at = |model| escalation_at_ms(DEADLINE, Lane::Flex, model, &Observed, MARGIN);
        assert_eq!(at("slow"), (DEADLINE - 330) * 1000);
        assert_eq!(at("fast"), (DEADLINE - 40) * 1000);
    }

    #[test]
    fn flex_and_batch_cost_the_batch_price_standard_the_list_price() {
        assert_eq!(lane_cost(2.0, Lane::Standard, 0.5), 2.0);
        assert_eq!(lane_cost(2.0, Lane::Flex, 0.5), 1.0);
        assert_eq!(lane_cost(2.0, Lane::Batch, 0.5), 1.0);
        assert_eq!(lane_cost(2.0, Lane::Batch, 0.0), 2.0);
    }

    #[test]
    fn flex_is_retried_only_while_standard_can_still_make_it() {
        let last_standard_ms = (DEADLINE - 90) * 1000;
        let retry = |now_ms, secs| {
            flex_retry_in_time(
                now_ms,
                Duration::from_secs(secs),
                DEADLINE,
                "m",
                &PRIORS,
                MARGIN,
            )
        };
        assert!(retry(last_standard_ms - 10_000, 10), "exactly in time");
        assert!(!retry(last_standard_ms - 10_000, 11), "a second late");
        assert!(retry(last_standard_ms, 0));
        assert!(!retry(last_standard_ms + 1, 0));
        assert!(!retry(u64::MAX, u64::MAX), "no overflow");
    }
}
