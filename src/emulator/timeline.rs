//! The batch state machine as a pure function of time.
//!
//! The emulator runs no background work: a batch's state is computed from its
//! creation time, the timing knobs captured when it was created, the outcome of
//! validation, the time a cancel was asked for (if any) and the emulator's
//! clock, whenever the batch is read. Tests move the clock instead of sleeping.
//!
//! ```text
//! created ──V──► validation ──(bad lines / token limit)──► failed
//!                    └──► in_progress ──n·P──► finalizing ──F──► completed
//!                              └──(deadline before n·P)──► expired
//! validating | in_progress | finalizing ──cancel at tc──► cancelling ──C──► cancelled
//! ```

/// The eight statuses of a batch, as the API spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 8] = [
        Status::Validating,
        Status::Failed,
        Status::InProgress,
        Status::Finalizing,
        Status::Completed,
        Status::Expired,
        Status::Cancelling,
        Status::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Validating => "validating",
            Status::Failed => "failed",
            Status::InProgress => "in_progress",
            Status::Finalizing => "finalizing",
            Status::Completed => "completed",
            Status::Expired => "expired",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
        }
    }

    /// No transition leaves a terminal status.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Failed | Status::Completed | Status::Expired | Status::Cancelled
        )
    }
}

/// The timing knobs, captured per batch at creation so that changing them at
/// run time does not rewrite the history of batches already running.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    pub validating: f64,
    pub per_request: f64,
    pub finalizing: f64,
    pub cancel: f64,
}

/// What validation decided, known once the clock passes the validating phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The batch fails at the end of validation.
    Invalid,
    /// The batch runs this many request lines.
    Valid { lines: usize },
}

/// Everything the state of a batch depends on, besides the clock.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spec {
    /// Clock time of creation (seconds, fractional).
    pub created: f64,
    pub timing: Timing,
    /// Clock time at which the batch expires if its lines are not all done.
    pub deadline: f64,
    /// `None` while validation has not been looked at (only allowed before
    /// [`Spec::validated_at`]).
    pub outcome: Option<Outcome>,
    /// Clock time at which a cancel was accepted.
    pub cancel_at: Option<f64>,
}

/// The state of a batch at one instant. Times are fractional clock seconds;
/// the Batch object shows their integer part.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Eval {
    pub status: Status,
    /// Request lines finished (in input order: line k finishes k·P after
    /// validation).
    pub done: usize,
    pub in_progress_at: Option<f64>,
    pub finalizing_at: Option<f64>,
    pub completed_at: Option<f64>,
    pub failed_at: Option<f64>,
    pub expired_at: Option<f64>,
    pub cancelling_at: Option<f64>,
    pub cancelled_at: Option<f64>,
}

impl Eval {
    fn new(status: Status) -> Eval {
        Eval {
            status,
            done: 0,
            in_progress_at: None,
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
        }
    }
}

impl Spec {
    /// When validation ends and its outcome shows.
    pub fn validated_at(&self) -> f64 {
        self.created + self.timing.validating
    }

    /// Whether evaluating at `t` needs the validation outcome: validation ends
    /// before `t` and before any cancel.
    pub fn needs_outcome(&self, t: f64) -> bool {
        let v = self.validated_at();
        t >= v && self.cancel_at.is_none_or(|c| c >= v)
    }

    /// Lines finished by `t` when `lines` run after validation ended.
    fn done_by(&self, lines: usize, t: f64) -> usize {
        let elapsed = t - self.validated_at();
        if elapsed < 0.0 {
            return 0;
        }
        if self.timing.per_request <= 0.0 {
            return lines;
        }
        let k = (elapsed / self.timing.per_request).floor();
        if k >= lines as f64 { lines } else { k as usize }
    }

    /// The state at clock time `t` ignoring any cancel.
    fn run(&self, t: f64) -> Eval {
        let v = self.validated_at();
        if t < v {
            return Eval::new(Status::Validating);
        }
        let lines = match self.outcome {
            // Callers provide the outcome once it is due; without one the batch
            // can only be shown as still validating.
            None => return Eval::new(Status::Validating),
            Some(Outcome::Invalid) => {
                let mut e = Eval::new(Status::Failed);
                e.failed_at = Some(v);
                return e;
            }
            Some(Outcome::Valid { lines }) => lines,
        };
        let processed = v + lines as f64 * self.timing.per_request;
        // Validation always runs to its end; expiry only cuts processing short.
        let deadline = self.deadline.max(v);
        let mut e = Eval::new(Status::InProgress);
        e.in_progress_at = Some(v);
        if deadline < processed && t >= deadline {
            e.status = Status::Expired;
            e.done = self.done_by(lines, deadline);
            e.expired_at = Some(deadline);
            return e;
        }
        if t < processed {
            e.done = self.done_by(lines, t);
            return e;
        }
        e.done = lines;
        e.status = Status::Finalizing;
        e.finalizing_at = Some(processed);
        let completed = processed + self.timing.finalizing;
        if t >= completed {
            e.status = Status::Completed;
            e.completed_at = Some(completed);
        }
        e
    }

    /// The state at clock time `t`.
    pub fn eval(&self, t: f64) -> Eval {
        let Some(tc) = self.cancel_at else {
            return self.run(t);
        };
        if t < tc {
            return self.run(t);
        }
        // Work stops when the cancel arrives; what was finished by then is kept.
        let mut e = self.run(tc);
        e.status = Status::Cancelling;
        e.cancelling_at = Some(tc);
        let cancelled = tc + self.timing.cancel;
        if t >= cancelled {
            e.status = Status::Cancelled;
            e.cancelled_at = Some(cancelled);
        }
        e
    }
}

/// Mixed into the seed of the turnaround draws (an arbitrary constant), so
/// they do not follow the fault generators' sequences.
const TURNAROUND_STREAM: u64 = 0x7475_726e;

/// Seconds drawn for the batch of rank `rank` from a log-normal
/// distribution with this `median` and `spread` (the standard deviation of
/// the log), given `seed`: the same arguments always draw the same seconds.
pub fn drawn_turnaround(median: f64, spread: f64, seed: u64, rank: u64) -> f64 {
    use rand::{Rng, SeedableRng};
    let mixed = (seed ^ TURNAROUND_STREAM).wrapping_add(rank.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut rng = rand::rngs::StdRng::seed_from_u64(mixed);
    // Box-Muller: a standard normal from two uniforms, the first in (0, 1].
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    median * (spread * z).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turnaround_draws_repeat_and_spread_around_the_median() {
        let draws: Vec<f64> = (0..2000)
            .map(|r| drawn_turnaround(600.0, 1.0, 42, r))
            .collect();
        let again: Vec<f64> = (0..2000)
            .map(|r| drawn_turnaround(600.0, 1.0, 42, r))
            .collect();
        assert_eq!(draws, again, "seed and rank decide the draw");
        assert_ne!(
            draws[..10],
            (0..10)
                .map(|r| drawn_turnaround(600.0, 1.0, 43, r))
                .collect::<Vec<_>>()[..]
        );
        let mut sorted = draws.clone();
        sorted.sort_by(f64::total_cmp);
        let q = |p: f64| sorted[(p * sorted.len() as f64) as usize];
        // Log-normal with sigma 1: quartiles at median · e^(∓0.674).
        assert!((540.0..660.0).contains(&q(0.5)), "median {}", q(0.5));
        assert!((260.0..360.0).contains(&q(0.25)), "q1 {}", q(0.25));
        assert!((1000.0..1380.0).contains(&q(0.75)), "q3 {}", q(0.75));
        assert!(sorted[0] > 0.0);
        // No spread: every batch at the median.
        assert_eq!(drawn_turnaround(600.0, 0.0, 7, 5), 600.0);
    }

    fn spec(v: f64, p: f64, f: f64, c: f64, outcome: Outcome) -> Spec {
        Spec {
            created: 100.0,
            timing: Timing {
                validating: v,
                per_request: p,
                finalizing: f,
                cancel: c,
            },
            deadline: 100.0 + 86_400.0,
            outcome: Some(outcome),
            cancel_at: None,
        }
    }

    #[test]
    fn zero_delays_complete_at_creation() {
        let s = spec(0.0, 0.0, 0.0, 0.0, Outcome::Valid { lines: 5 });
        let e = s.eval(100.0);
        assert_eq!(e.status, Status::Completed);
        assert_eq!(e.done, 5);
        assert_eq!(e.in_progress_at, Some(100.0));
        assert_eq!(e.finalizing_at, Some(100.0));
        assert_eq!(e.completed_at, Some(100.0));
    }

    #[test]
    fn walks_through_every_phase() {
        let s = spec(10.0, 5.0, 20.0, 0.0, Outcome::Valid { lines: 4 });
        assert_eq!(s.eval(105.0).status, Status::Validating);
        assert!(!s.needs_outcome(105.0));
        assert!(s.needs_outcome(110.0));
        let e = s.eval(110.0);
        assert_eq!((e.status, e.done), (Status::InProgress, 0));
        assert_eq!(s.eval(114.9).done, 0);
        assert_eq!(s.eval(115.0).done, 1);
        assert_eq!(s.eval(126.0).done, 3);
        let e = s.eval(130.0);
        assert_eq!((e.status, e.done), (Status::Finalizing, 4));
        assert_eq!(e.finalizing_at, Some(130.0));
        let e = s.eval(150.0);
        assert_eq!(e.status, Status::Completed);
        assert_eq!(e.completed_at, Some(150.0));
        assert_eq!(e.in_progress_at, Some(110.0));
    }

    #[test]
    fn invalid_fails_at_end_of_validation() {
        let s = spec(3.0, 1.0, 1.0, 0.0, Outcome::Invalid);
        assert_eq!(s.eval(102.0).status, Status::Validating);
        let e = s.eval(103.0);
        assert_eq!(e.status, Status::Failed);
        assert_eq!(e.failed_at, Some(103.0));
        assert_eq!(e.in_progress_at, None);
    }

    #[test]
    fn expiry_keeps_finished_lines() {
        let mut s = spec(0.0, 10.0, 0.0, 0.0, Outcome::Valid { lines: 10 });
        s.deadline = 135.0;
        assert_eq!(s.eval(134.0).status, Status::InProgress);
        let e = s.eval(1000.0);
        assert_eq!(e.status, Status::Expired);
        assert_eq!(e.done, 3);
        assert_eq!(e.expired_at, Some(135.0));
        // A deadline after the last line does not expire the batch.
        s.deadline = 200.0;
        assert_eq!(s.eval(1000.0).status, Status::Completed);
        // A deadline inside validation takes effect when validation ends.
        let mut s = spec(50.0, 10.0, 0.0, 0.0, Outcome::Valid { lines: 2 });
        s.deadline = 110.0;
        let e = s.eval(1000.0);
        assert_eq!(
            (e.status, e.done, e.expired_at),
            (Status::Expired, 0, Some(150.0))
        );
    }

    #[test]
    fn cancel_freezes_work_then_cancels() {
        let mut s = spec(0.0, 10.0, 0.0, 30.0, Outcome::Valid { lines: 10 });
        s.cancel_at = Some(125.0);
        assert_eq!(s.eval(120.0).status, Status::InProgress);
        let e = s.eval(140.0);
        assert_eq!((e.status, e.done), (Status::Cancelling, 2));
        assert_eq!(e.cancelling_at, Some(125.0));
        let e = s.eval(155.0);
        assert_eq!((e.status, e.done), (Status::Cancelled, 2));
        assert_eq!(e.cancelled_at, Some(155.0));
    }

    #[test]
    fn cancel_during_validation_needs_no_outcome() {
        let mut s = spec(60.0, 1.0, 0.0, 0.0, Outcome::Invalid);
        s.outcome = None;
        s.cancel_at = Some(110.0);
        assert!(!s.needs_outcome(500.0));
        let e = s.eval(500.0);
        assert_eq!((e.status, e.done), (Status::Cancelled, 0));
        assert_eq!(e.in_progress_at, None);
    }
}
