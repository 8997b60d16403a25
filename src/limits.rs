//! Per-tenant rate limits: how many calls a tenant may make per second on
//! each path (deferred intake, passthrough), with a burst allowance.
//!
//! Each `(tenant, kind)` pair with a configured [`Rate`] gets its own direct
//! (un-keyed) GCRA limiter from `governor`. The tenants come from config and
//! are fixed for the life of the process, so memory is bounded by the config
//! and a keyed limiter — whose key set grows with traffic and needs
//! `retain_recent()` trimming — is not needed. A tenant or kind without a
//! rate is unlimited.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// Requests per second with a burst; both > 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Sustained rate: one call is replenished every `1 / per_second` s.
    pub per_second: NonZeroU32,
    /// Calls allowed at once after an idle period (the bucket's size).
    pub burst: NonZeroU32,
}

impl Rate {
    /// `None` when either number is zero (config validation names the key).
    pub fn new(per_second: u32, burst: u32) -> Option<Rate> {
        Some(Rate {
            per_second: NonZeroU32::new(per_second)?,
            burst: NonZeroU32::new(burst)?,
        })
    }

    fn quota(self) -> Quota {
        Quota::per_second(self.per_second).allow_burst(self.burst)
    }
}

/// Which of a tenant's limits a call counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// `POST /v1/chat/completions` deferred into a batch (intake).
    Deferred,
    /// Anything forwarded straight to the upstream.
    Passthrough,
}

impl LimitKind {
    /// The `kind` label of `ferry_rate_limited_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Deferred => "deferred",
            LimitKind::Passthrough => "passthrough",
        }
    }
}

type Limiter<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// One tenant's limiters; `None` means unlimited.
struct TenantLimiters<C: Clock> {
    deferred: Option<Limiter<C>>,
    passthrough: Option<Limiter<C>>,
}

/// One limiter per `(tenant, kind)` for the tenants in config.
///
/// The tenant set is fixed at start, so memory is bounded by the config
/// (no keyed limiter, nothing to trim). The clock is a type parameter so
/// tests can drive time with governor's `FakeRelativeClock`.
pub struct TenantLimits<C: Clock = DefaultClock> {
    tenants: HashMap<String, TenantLimiters<C>>,
    clock: C,
}

impl TenantLimits {
    /// Limits on the real clock. Each item is `(tenant, deferred, passthrough)`;
    /// a later entry for the same tenant replaces an earlier one (config
    /// refuses duplicate tenant names before this is reached).
    pub fn new(
        limits: impl IntoIterator<Item = (String, Option<Rate>, Option<Rate>)>,
    ) -> TenantLimits {
        TenantLimits::with_clock(limits, DefaultClock::default())
    }
}

impl<C: Clock + Clone> TenantLimits<C> {
    /// Limits on a given clock. Every limiter gets a clone of `clock`;
    /// governor's clocks are cheap handles whose clones share one time.
    pub fn with_clock(
        limits: impl IntoIterator<Item = (String, Option<Rate>, Option<Rate>)>,
        clock: C,
    ) -> TenantLimits<C> {
        let limiter = |rate: Option<Rate>| {
            rate.map(|r| RateLimiter::direct_with_clock(r.quota(), clock.clone()))
        };
        let tenants = limits
            .into_iter()
            .map(|(tenant, deferred, passthrough)| {
                let l = TenantLimiters {
                    deferred: limiter(deferred),
                    passthrough: limiter(passthrough),
                };
                (tenant, l)
            })
            .collect();
        TenantLimits { tenants, clock }
    }

    /// Takes one cell from the tenant's limiter for `kind`.
    ///
    /// `Ok(())` if the call may proceed, always for a kind without a rate or
    /// a tenant not given to the constructor. `Err(retry_after)` otherwise: the time until a cell is
    /// available, rounded up to whole seconds and at least 1 s, ready for
    /// the `Retry-After` header.
    pub fn check(&self, tenant: &str, kind: LimitKind) -> Result<(), Duration> {
        let Some(t) = self.tenants.get(tenant) else {
            return Ok(());
        };
        let limiter = match kind {
            LimitKind::Deferred => &t.deferred,
            LimitKind::Passthrough => &t.passthrough,
        };
        let Some(limiter) = limiter else {
            return Ok(());
        };
        limiter
            .check()
            .map_err(|not_until| retry_after(not_until.wait_time_from(self.clock.now())))
    }
}

/// `Retry-After` carries whole seconds: round up, and never say 0 (a client
/// retrying at once would only be refused again).
fn retry_after(wait: Duration) -> Duration {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    Duration::from_secs(secs.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn rate(per_second: u32, burst: u32) -> Option<Rate> {
        Some(Rate::new(per_second, burst).unwrap())
    }

    /// `acme` limited on both kinds, `free` limited on deferred only.
    fn limits(clock: &FakeRelativeClock) -> TenantLimits<FakeRelativeClock> {
        TenantLimits::with_clock(
            [
                ("acme".to_owned(), rate(1, 3), rate(10, 2)),
                ("free".to_owned(), rate(1, 1), None),
            ],
            clock.clone(),
        )
    }

    fn drain(l: &TenantLimits<FakeRelativeClock>, tenant: &str, kind: LimitKind, n: u32) {
        for i in 0..n {
            assert_eq!(l.check(tenant, kind), Ok(()), "{tenant} call {i}");
        }
    }

    #[test]
    fn burst_is_allowed_then_refused_with_retry_after() {
        let clock = FakeRelativeClock::default();
        let l = limits(&clock);
        drain(&l, "acme", LimitKind::Deferred, 3);
        assert_eq!(
            l.check("acme", LimitKind::Deferred),
            Err(Duration::from_secs(1))
        );
        // Part of the wait has passed: 0.7 s left still reads as 1 s.
        clock.advance(Duration::from_millis(300));
        assert_eq!(
            l.check("acme", LimitKind::Deferred),
            Err(Duration::from_secs(1))
        );
    }

    #[test]
    fn cells_refill_as_the_clock_advances() {
        let clock = FakeRelativeClock::default();
        let l = limits(&clock);
        drain(&l, "acme", LimitKind::Deferred, 3);
        assert!(l.check("acme", LimitKind::Deferred).is_err());
        clock.advance(Duration::from_secs(1));
        drain(&l, "acme", LimitKind::Deferred, 1);
        assert!(l.check("acme", LimitKind::Deferred).is_err());
        // Idle long enough and the whole burst is back, not more.
        clock.advance(Duration::from_secs(10));
        drain(&l, "acme", LimitKind::Deferred, 3);
        assert!(l.check("acme", LimitKind::Deferred).is_err());
    }

    #[test]
    fn faster_rates_refill_sooner() {
        let clock = FakeRelativeClock::default();
        let l = limits(&clock);
        drain(&l, "acme", LimitKind::Passthrough, 2);
        assert_eq!(
            l.check("acme", LimitKind::Passthrough),
            Err(Duration::from_secs(1))
        );
        // 10/s: one cell every 100 ms.
        clock.advance(Duration::from_millis(100));
        drain(&l, "acme", LimitKind::Passthrough, 1);
        assert!(l.check("acme", LimitKind::Passthrough).is_err());
    }

    #[test]
    fn tenants_are_independent() {
        let clock = FakeRelativeClock::default();
        let l = limits(&clock);
        drain(&l, "free", LimitKind::Deferred, 1);
        assert!(l.check("free", LimitKind::Deferred).is_err());
        drain(&l, "acme", LimitKind::Deferred, 3);
        assert!(l.check("acme", LimitKind::Deferred).is_err());
    }

    #[test]
    fn kinds_are_independent() {
        let clock = FakeRelativeClock::default();
        let l = limits(&clock);
        drain(&l, "acme", LimitKind::Deferred, 3);
        assert!(l.check("acme", LimitKind::Deferred).is_err());
        drain(&l, "acme", LimitKind::Passthrough, 2);
        assert!(l.check("acme", LimitKind::Passthrough).is_err());
    }

    #[test]
    fn missing_rates_and_unknown_tenants_are_unlimited() {
        let clock = FakeRelativeClock::default();
        let l = limits(&clock);
        drain(&l, "free", LimitKind::Passthrough, 1000);
        drain(&l, "nobody", LimitKind::Deferred, 1000);
        let real = TenantLimits::new([("acme".to_owned(), None, None)]);
        assert_eq!(real.check("acme", LimitKind::Deferred), Ok(()));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after(Duration::ZERO), Duration::from_secs(1));
        assert_eq!(retry_after(Duration::from_nanos(1)), Duration::from_secs(1));
        assert_eq!(retry_after(Duration::from_secs(2)), Duration::from_secs(2));
        assert_eq!(
            retry_after(Duration::from_millis(2001)),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn limits_can_be_shared_across_proxy_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<TenantLimits>();
        shared::<TenantLimits<FakeRelativeClock>>();
    }

    #[test]
    fn rates_need_both_numbers() {
        assert!(Rate::new(0, 5).is_none());
        assert!(Rate::new(5, 0).is_none());
        assert_eq!(LimitKind::Deferred.as_str(), "deferred");
        assert_eq!(LimitKind::Passthrough.as_str(), "passthrough");
    }
}
