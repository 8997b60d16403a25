//! Learned latencies (issue #17): how long flex and standard calls have
//! recently taken per model, behind the [`LatencyEstimate`] seam. A high
//! percentile of a window of recent calls stands in for the configured
//! prior once enough calls were seen; before that, and for the batch lane
//! (whose turnaround Ferry does not learn), the prior. Memory only: a
//! restart starts from the priors again.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use super::lanes::{LanePriors, LatencyEstimate};
use crate::store::Lane;

/// Recent calls kept per lane and model.
pub const WINDOW: usize = 50;
/// Calls seen before the learned figure replaces the prior.
pub const MIN_SAMPLES: usize = 5;
/// The percentile taken: most calls are faster, a slow tail is allowed for.
pub const PERCENTILE: f64 = 0.9;
/// Models learned per upstream at most (model names come from requests);
/// others keep the prior.
pub const MAX_MODELS: usize = 1_000;

/// The `q` quantile (0..=1) of `samples` by the nearest-rank method; `None`
/// for no samples.
pub fn percentile(samples: &[Duration], q: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.saturating_sub(1)).copied()
}

/// What to expect of a lane with `samples` recent calls: their high
/// percentile once there are `min_samples` of them, else `prior`.
pub fn expected_from(samples: &[Duration], prior: Duration, min_samples: usize) -> Duration {
    if samples.len() < min_samples {
        return prior;
    }
    percentile(samples, PERCENTILE).unwrap_or(prior)
}

/// One upstream's priors and the calls seen on its synchronous lanes.
#[derive(Debug)]
pub struct Observed {
    priors: LanePriors,
    seen: Mutex<HashMap<(&'static str, String), VecDeque<Duration>>>,
}

impl Observed {
    pub fn new(priors: LanePriors) -> Observed {
        Observed {
            priors,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Records that a call on `lane` for `model` took `took` (flex and
    /// standard only; a batch's turnaround keeps its prior).
    pub fn record(&self, lane: Lane, model: &str, took: Duration) {
        if lane.is_batch() {
            return;
        }
        let mut seen = self.lock();
        let key = (lane.as_str(), model.to_owned());
        if !seen.contains_key(&key) && seen.len() >= MAX_MODELS {
            return;
        }
        let window = seen.entry(key).or_default();
        if window.len() == WINDOW {
            window.pop_front();
        }
        window.push_back(took);
    }

    /// The longest any model is expected to take on each lane (learned or
    /// prior, whichever is longer): how far ahead the flush loop must read
    /// deadlines.
    pub fn longest(&self) -> LanePriors {
        let seen = self.lock();
        let mut longest = self.priors;
        for ((lane, _), window) in seen.iter() {
            let samples: Vec<Duration> = window.iter().copied().collect();
            let learned = expected_from(&samples, Duration::ZERO, MIN_SAMPLES);
            match Lane::parse(lane) {
                Some(Lane::Flex) => longest.flex = longest.flex.max(learned),
                Some(Lane::Standard) => longest.standard = longest.standard.max(learned),
                _ => {}
            }
        }
        longest
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(&'static str, String), VecDeque<Duration>>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LatencyEstimate for Observed {
    fn expected(&self, lane: Lane, model: &str) -> Duration {
        let prior = self.priors.expected(lane, model);
        if lane.is_batch() {
            return prior;
        }
        let seen = self.lock();
        match seen.get(&(lane.as_str(), model.to_owned())) {
            Some(window) => {
                let samples: Vec<Duration> = window.iter().copied().collect();
                expected_from(&samples, prior, MIN_SAMPLES)
            }
            None => prior,
        }
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

    fn secs(n: &[u64]) -> Vec<Duration> {
        n.iter().map(|s| Duration::from_secs(*s)).collect()
    }

    #[test]
    fn the_percentile_is_by_nearest_rank() {
        assert_eq!(percentile(&[], 0.9), None);
        let ten = secs(&[10, 1, 9, 2, 8, 3, 7, 4, 6, 5]);
        assert_eq!(percentile(&ten, 0.9), Some(Duration::from_secs(9)));
        assert_eq!(percentile(&ten, 1.0), Some(Duration::from_secs(10)));
        assert_eq!(percentile(&ten, 0.0), Some(Duration::from_secs(1)));
        assert_eq!(percentile(&secs(&[7]), 0.9), Some(Duration::from_secs(7)));
    }

    #[test]
    fn too_few_calls_keep_the_prior() {
        let prior = Duration::from_secs(60);
        assert_eq!(expected_from(&secs(&[1, 2, 3, 4]), prior, 5), prior);
        assert_eq!(
            expected_from(&secs(&[1, 2, 3, 4, 5]), prior, 5),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn learned_latencies_replace_the_prior_per_lane_and_model() {
        let o = Observed::new(PRIORS);
        for s in 1..=4 {
            o.record(Lane::Flex, "m", Duration::from_secs(s));
        }
        assert_eq!(o.expected(Lane::Flex, "m"), PRIORS.flex, "too few yet");
        o.record(Lane::Flex, "m", Duration::from_secs(5));
        assert_eq!(o.expected(Lane::Flex, "m"), Duration::from_secs(5));
        // Other models and lanes keep their priors.
        assert_eq!(o.expected(Lane::Flex, "other"), PRIORS.flex);
        assert_eq!(o.expected(Lane::Standard, "m"), PRIORS.standard);
        // Batch turnaround is not learned.
        o.record(Lane::Batch, "m", Duration::from_secs(1));
        assert_eq!(o.expected(Lane::Batch, "m"), PRIORS.batch);
    }

    #[test]
    fn the_window_forgets_old_calls() {
        let o = Observed::new(PRIORS);
        for _ in 0..WINDOW {
            o.record(Lane::Standard, "m", Duration::from_secs(100));
        }
        assert_eq!(o.expected(Lane::Standard, "m"), Duration::from_secs(100));
        for _ in 0..WINDOW {
            o.record(Lane::Standard, "m", Duration::from_secs(2));
        }
        assert_eq!(o.expected(Lane::Standard, "m"), Duration::from_secs(2));
    }

    #[test]
    fn the_horizon_covers_the_slowest_model_learned() {
        let o = Observed::new(PRIORS);
        assert_eq!(o.longest(), PRIORS);
        for _ in 0..MIN_SAMPLES {
            o.record(Lane::Flex, "slow", Duration::from_secs(900));
            o.record(Lane::Standard, "fast", Duration::from_secs(1));
        }
        let longest = o.longest();
        assert_eq!(longest.flex, Duration::from_secs(900));
        assert_eq!(longest.standard, PRIORS.standard, "the prior is longer");
        assert_eq!(longest.batch, PRIORS.batch);
    }

    #[test]
    fn models_beyond_the_bound_keep_their_prior() {
        let o = Observed::new(PRIORS);
        for i in 0..MAX_MODELS {
            o.record(Lane::Flex, &format!("m{i}"), Duration::from_secs(1));
        }
        for _ in 0..MIN_SAMPLES {
            o.record(Lane::Flex, "late", Duration::from_secs(1));
        }
        assert_eq!(o.expected(Lane::Flex, "late"), PRIORS.flex);
    }
}
