//! Deadlines (issue #17): when a request still waiting in its queue must
//! leave it for a synchronous lane, and which lane. Pure functions over
//! plain data; the flush loop and the lane driver act on what they decide.
//!
//! A request's escalation time is its deadline minus the time the next lane
//! is expected to take, minus a margin. The expected time comes from a
//! [`LatencyEstimate`]: the configured priors ([`LanePriors`]), or the
//! latencies Ferry observed per upstream and model, falling back to them
//! ([`super::latency::Observed`]).

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

/// The synchronous lanes a tenant allows (its `lanes`; batch always): a
/// nightly-jobs tenant may refuse standard, better expired than expensive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantLanes {
    pub flex: bool,
    pub standard: bool,
}

impl Default for TenantLanes {
    fn default() -> Self {
        TenantLanes {
            flex: true,
            standard: true,
        }
    }
}

/// Why a request due to escalate stays where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withheld {
    /// The tenant allows no lane the request could step onto.
    Lanes,
    /// The tenant's standard calls this hour are used up.
    StandardCap,
}

impl Withheld {
    pub fn as_str(self) -> &'static str {
        match self {
            Withheld::Lanes => "lanes",
            Withheld::StandardCap => "standard_cap",
        }
    }
}

/// The lane a request due to escalate onto `next` (see [`next_lane`]) is
/// sent on, given what its tenant allows and whether its standard budget
/// has room (`standard_room`): flex where the model has it and the tenant
/// takes it, else standard; or why it stays on the lane it is on (and may
/// miss its deadline).
pub fn choose_lane(
    next: Lane,
    allowed: TenantLanes,
    standard_room: bool,
) -> Result<Lane, Withheld> {
    if next == Lane::Flex && allowed.flex {
        return Ok(Lane::Flex);
    }
    if next == Lane::Batch || !allowed.standard {
        return Err(Withheld::Lanes);
    }
    if standard_room {
        Ok(Lane::Standard)
    } else {
        Err(Withheld::StandardCap)
    }
}

/// One tenant's standard calls in the current hour: a fixed window that
/// starts with the first call after the last one ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StandardBudget {
    /// Unix millis the window began; its count.
    pub since_ms: u64,
    pub used: u32,
}

/// The length of a standard budget's window.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(3600);

impl StandardBudget {
    /// Takes one standard call at `now_ms` if `cap` (none: unbounded)
    /// leaves room in this hour's window.
    pub fn try_take(&mut self, now_ms: u64, cap: Option<std::num::NonZeroU32>) -> bool {
        let Some(cap) = cap else {
            return true;
        };
        if now_ms >= self.window_end_ms() {
            *self = StandardBudget {
                since_ms: now_ms,
                used: 0,
            };
        }
        if self.used >= cap.get() {
            return false;
        }
        self.used += 1;
        true
    }

    /// When the current window ends and the budget is whole again.
    pub fn window_end_ms(&self) -> u64 {
        self.since_ms
            .saturating_add(BUDGET_WINDOW.as_millis() as u64)
    }
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
    fn a_tenants_lanes_and_budget_decide_the_step_up() {
        let all = TenantLanes::default();
        let no_standard = TenantLanes {
            standard: false,
            ..all
        };
        let no_flex = TenantLanes { flex: false, ..all };
        assert_eq!(choose_lane(Lane::Flex, all, false), Ok(Lane::Flex));
        assert_eq!(choose_lane(Lane::Standard, all, true), Ok(Lane::Standard));
        assert_eq!(
            choose_lane(Lane::Standard, all, false),
            Err(Withheld::StandardCap)
        );
        // Better expired than expensive.
        assert_eq!(
            choose_lane(Lane::Standard, no_standard, true),
            Err(Withheld::Lanes)
        );
        assert_eq!(choose_lane(Lane::Flex, no_standard, true), Ok(Lane::Flex));
        // A tenant without flex goes standard, budget allowing.
        assert_eq!(choose_lane(Lane::Flex, no_flex, true), Ok(Lane::Standard));
        assert_eq!(
            choose_lane(Lane::Flex, no_flex, false),
            Err(Withheld::StandardCap)
        );
        let batch_only = TenantLanes {
            flex: false,
            standard: false,
        };
        assert_eq!(
            choose_lane(Lane::Flex, batch_only, true),
            Err(Withheld::Lanes)
        );
    }

    #[test]
    fn the_standard_budget_is_a_number_of_calls_per_hour() {
        let cap = std::num::NonZeroU32::new(2);
        let mut b = StandardBudget::default();
        let t = 1_700_000_000_000;
        assert!(b.try_take(t, cap));
        assert!(b.try_take(t + 1, cap));
        assert!(!b.try_take(t + 2, cap), "used up");
        assert_eq!(b.window_end_ms(), t + 3_600_000);
        assert!(!b.try_take(t + 3_599_999, cap));
        assert!(b.try_take(t + 3_600_000, cap), "a new hour");
        assert_eq!(b.used, 1);
        // No cap: always room, nothing counted.
        let mut free = StandardBudget::default();
        assert!((0..1000).all(|i| free.try_take(t + i, None)));
        assert_eq!(free.used, 0);
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
