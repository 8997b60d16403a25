//! The request lifecycle's decisions as pure functions over plain data,
//! shared by every store backend (sled, PostgreSQL) so that each only
//! persists what was decided here. Nothing in this file reads or writes
//! storage.

use super::{
    BatchState, Delivery, Outcome, PayloadFn, RequestError, RequestRecord, RequestStatus,
    StoredResult, WebhookState, WebhookStatus,
};
use crate::endpoint::{Endpoint, OPENAI_EMBEDDING_INPUTS_PER_BATCH};

/// A status change the lifecycle does not allow: a bug, refused rather than
/// written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a request cannot go from {} to {}; refused (this is a bug in Ferry)", .from.as_str(), .to.as_str())]
pub struct IllegalMove {
    pub from: RequestStatus,
    pub to: RequestStatus,
}

/// Moves a request from `from` to `to` if the lifecycle allows it
/// ([`RequestStatus::can_become`]); staying put (a claimed request sent back
/// to its queue) is no move. Every status a store writes goes through here.
pub fn checked_move(from: RequestStatus, to: RequestStatus) -> Result<RequestStatus, IllegalMove> {
    if from == to || from.can_become(to) {
        Ok(to)
    } else {
        Err(IllegalMove { from, to })
    }
}

/// What one [`Outcome`] does to a member of a finished batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// The request ends with `status`. `error`, when set, replaces the
    /// record's error (a completed request keeps what it had); `result`,
    /// when set, is the answer to store.
    Finish {
        status: RequestStatus,
        error: Option<RequestError>,
        result: Option<StoredResult>,
    },
    /// Back to the queue (status `queued`, no batch, no `submitted_at`),
    /// with this many attempts counted. The record's error is left as is.
    Requeue { attempts: u32 },
}

/// Decides what `outcome` does to a member that has been sent in
/// `attempts` batches (this one included).
pub fn outcome_effect(outcome: Outcome, attempts: u32) -> Effect {
    let finish = |status, error| Effect::Finish {
        status,
        error: Some(error),
        result: None,
    };
    match outcome {
        Outcome::Completed(r) => Effect::Finish {
            status: RequestStatus::Completed,
            error: None,
            result: Some(r),
        },
        // Only ingestion knows the upstream's limit and turns `Cancelled`
        // into a counted `Retry`; one that got here anyway fails rather
        // than being re-sent without bound.
        Outcome::Failed(e) | Outcome::Cancelled(e) => finish(RequestStatus::Failed, e),
        Outcome::Expired(e) => finish(RequestStatus::Expired, e),
        Outcome::Retry {
            error,
            max_attempts,
        } if attempts >= max_attempts => finish(RequestStatus::Failed, error),
        Outcome::RetryOrExpire {
            error,
            max_attempts,
        } if attempts >= max_attempts => finish(RequestStatus::Expired, error),
        // Submission counted this batch; a requeue for the upstream's state
        // (its token budget was full) does not count against the request.
        Outcome::Requeue => Effect::Requeue {
            attempts: attempts.saturating_sub(1),
        },
        Outcome::Retry { .. } | Outcome::RetryOrExpire { .. } => Effect::Requeue { attempts },
    }
}

/// Whether `outcome`, from `batch`, may still change a request in `status`,
/// claimed by `in_batch` and, if it was escalated out of that submitted
/// batch for its deadline, also sent in the batch of one `escalation`:
/// only a member of that batch that is not yet terminal, so applying a
/// batch's outcomes twice changes nothing, and a request in two batches is
/// answered once, by the first answer stored. While the escalation is
/// pending, the Batch API job's failures, expiries and re-queues change
/// nothing: the escalation answers instead (it was sent because the job
/// would answer too late).
pub fn outcome_applies(
    status: RequestStatus,
    in_batch: Option<u64>,
    escalation: Option<u64>,
    batch: u64,
    outcome: &Outcome,
) -> bool {
    if status.is_terminal() {
        return false;
    }
    if escalation == Some(batch) {
        return true;
    }
    in_batch == Some(batch) && (escalation.is_none() || matches!(outcome, Outcome::Completed(_)))
}

/// Whether `outcome`, from `batch`, for a request now in `status` and
/// last held by `in_batch` was an answer paid for and thrown away: the
/// request was already answered by another of the batches it was sent in
/// (a deadline's escalation, or the job it escalated out of).
pub fn spent_twice(
    status: RequestStatus,
    in_batch: Option<u64>,
    batch: u64,
    outcome: &Outcome,
) -> bool {
    status.is_terminal() && in_batch != Some(batch) && matches!(outcome, Outcome::Completed(_))
}

/// What a cancel does to a request in `status`, claimed by `batch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelVerdict {
    Cancel,
    AlreadyCancelled,
    /// Claimed by a flush, submitted or finished: nothing changes.
    TooLate,
}

/// Only a request still queued and not claimed by a flush can be cancelled.
pub fn cancel_verdict(status: RequestStatus, batch: Option<u64>) -> CancelVerdict {
    if status == RequestStatus::Cancelled {
        CancelVerdict::AlreadyCancelled
    } else if status != RequestStatus::Queued || batch.is_some() {
        CancelVerdict::TooLate
    } else {
        CancelVerdict::Cancel
    }
}

/// Whether a claim that has taken `taken` lines of `bytes` JSONL so far
/// takes the next line of `len` bytes. The first line is always taken, so a
/// line longer than `max_bytes` still leaves the queue (alone).
pub fn claim_takes(
    taken: usize,
    bytes: u64,
    len: u64,
    max_requests: usize,
    max_bytes: u64,
) -> bool {
    taken < max_requests && (taken == 0 || bytes.saturating_add(len) <= max_bytes)
}

/// The most inputs one batch of `endpoint` may hold, summed over its
/// lines: OpenAI takes at most 50,000 embedding inputs per batch (each
/// element of an `input` array counts). Applied to every upstream that
/// batches embeddings; other endpoints count lines only.
pub fn max_inputs(endpoint: Endpoint) -> u64 {
    match endpoint {
        Endpoint::Embeddings => OPENAI_EMBEDDING_INPUTS_PER_BATCH,
        _ => u64::MAX,
    }
}

/// Whether a claim that has taken `taken` lines of `so_far` inputs takes
/// the next line of `inputs` more. The first line is always taken, as with
/// bytes: a request over the cap alone leaves the queue alone (and fails
/// upstream on its own, never taking others down with it).
pub fn inputs_fit(taken: usize, so_far: u64, inputs: u64, max_inputs: u64) -> bool {
    taken == 0 || so_far.saturating_add(inputs) <= max_inputs
}

/// For a request that just became terminal: when it has a callback URL,
/// marks its webhook pending and returns the delivery owed, its payload
/// fixed now (at `now_ms`, due at once).
pub fn delivery_for(
    rec: &mut RequestRecord,
    result: Option<&StoredResult>,
    payload: &PayloadFn<'_>,
    now_ms: u64,
) -> Option<Delivery> {
    let url = rec.callback_url.clone()?;
    rec.webhook = Some(WebhookState {
        status: WebhookStatus::Pending,
        attempts: 0,
        last_error: None,
    });
    Some(Delivery {
        request: rec.id,
        tenant: rec.tenant.clone(),
        url,
        msg_id: format!("msg_ferry_{}", rec.id),
        payload: payload(rec, result),
        first_ms: now_ms,
        due_ms: now_ms,
        attempts: 0,
    })
}

/// How long finished work is kept ([`crate::config`]'s `[retention]`),
/// in the plain terms both backends purge by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Seconds a terminal request (record, result, status) stays answerable
    /// after it finished.
    pub terminal_secs: u64,
    /// Requests, or batches, one purge slice removes at most.
    pub slice_rows: usize,
}

impl Retention {
    /// Requests that finished before this unix second (strictly) are due
    /// for purging at `now`: one finished exactly `terminal_secs` ago stays
    /// for that second, one finished a second earlier goes.
    pub fn record_cutoff(&self, now: u64) -> u64 {
        now.saturating_sub(self.terminal_secs)
    }
}

/// Whether a request is due for purging under `cutoff`
/// ([`Retention::record_cutoff`]): terminal, finished before the cutoff,
/// and owing no webhook (an outbox entry still to deliver or retry keeps
/// its request, whatever its age).
pub fn request_purgeable(
    status: RequestStatus,
    completed_at: Option<u64>,
    cutoff: u64,
    webhook_owed: bool,
) -> bool {
    status.is_terminal() && completed_at.is_some_and(|at| at < cutoff) && !webhook_owed
}

/// What the purge does with a batch record, taken oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchVerdict {
    /// Finished, no upstream file left to delete, no member left: it goes.
    Purge,
    /// Not this batch, but look at younger ones: it is not finished yet or
    /// still owes the upstream a file delete.
    Skip,
    /// A member of it is still kept: younger batches' members finished
    /// later, so stop here until the next slice.
    Stop,
}

/// Decides a batch's fate from its state and whether some request still
/// kept names it as its batch (a member re-queued into another batch does
/// not hold this one).
pub fn batch_verdict(state: &BatchState, members_kept: bool) -> BatchVerdict {
    match state {
        BatchState::Done { cleanup, .. } if cleanup.is_empty() => {
            if members_kept {
                BatchVerdict::Stop
            } else {
                BatchVerdict::Purge
            }
        }
        _ => BatchVerdict::Skip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_a_store_writes_is_a_move_the_lifecycle_allows() {
        use RequestStatus::*;
        assert_eq!(checked_move(Queued, Submitted), Ok(Submitted));
        assert_eq!(checked_move(Submitted, Queued), Ok(Queued));
        // A claimed request sent back before it was submitted stays queued.
        assert_eq!(checked_move(Queued, Queued), Ok(Queued));
        let refused = checked_move(Completed, Queued).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "a request cannot go from completed to queued; refused (this is a bug in Ferry)"
        );
        assert!(checked_move(Submitted, Cancelled).is_err());
        assert!(checked_move(Cancelled, Completed).is_err());
    }

    fn err(code: &str) -> RequestError {
        RequestError {
            code: code.into(),
            message: "m".into(),
        }
    }

    fn failed(status: RequestStatus, code: &str) -> Effect {
        Effect::Finish {
            status,
            error: Some(err(code)),
            result: None,
        }
    }

    #[test]
    fn each_outcome_has_its_effect() {
        use RequestStatus::*;
        let r = StoredResult {
            status_code: 200,
            body: bytes::Bytes::from_static(b"{}"),
        };
        assert_eq!(
            outcome_effect(Outcome::Completed(r.clone()), 1),
            Effect::Finish {
                status: Completed,
                error: None,
                result: Some(r)
            }
        );
        assert_eq!(
            outcome_effect(Outcome::Failed(err("f")), 1),
            failed(Failed, "f")
        );
        assert_eq!(
            outcome_effect(Outcome::Cancelled(err("c")), 1),
            failed(Failed, "c")
        );
        assert_eq!(
            outcome_effect(Outcome::Expired(err("e")), 1),
            failed(Expired, "e")
        );
        // A requeue gives its attempt back, and never below zero.
        assert_eq!(
            outcome_effect(Outcome::Requeue, 2),
            Effect::Requeue { attempts: 1 }
        );
        assert_eq!(
            outcome_effect(Outcome::Requeue, 0),
            Effect::Requeue { attempts: 0 }
        );
    }

    #[test]
    fn retries_count_until_attempts_run_out() {
        use RequestStatus::*;
        let retry = |max_attempts| Outcome::Retry {
            error: err("r"),
            max_attempts,
        };
        let or_expire = |max_attempts| Outcome::RetryOrExpire {
            error: err("x"),
            max_attempts,
        };
        assert_eq!(outcome_effect(retry(3), 2), Effect::Requeue { attempts: 2 });
        assert_eq!(outcome_effect(retry(3), 3), failed(Failed, "r"));
        assert_eq!(outcome_effect(retry(3), 4), failed(Failed, "r"));
        assert_eq!(
            outcome_effect(or_expire(3), 2),
            Effect::Requeue { attempts: 2 }
        );
        assert_eq!(outcome_effect(or_expire(3), 3), failed(Expired, "x"));
    }

    #[test]
    fn outcomes_apply_only_to_pending_members_of_their_batch() {
        use RequestStatus::*;
        let o = Outcome::Requeue;
        assert!(outcome_applies(Submitted, Some(7), None, 7, &o));
        assert!(outcome_applies(Queued, Some(7), None, 7, &o));
        assert!(!outcome_applies(Submitted, Some(8), None, 7, &o));
        assert!(!outcome_applies(Queued, None, None, 7, &o));
        for t in [Completed, Failed, Expired, Cancelled] {
            assert!(!outcome_applies(t, Some(7), None, 7, &o));
            assert!(!outcome_applies(t, Some(7), Some(9), 9, &o));
        }
    }

    #[test]
    fn an_escalated_request_takes_the_first_answer_of_either_batch() {
        use RequestStatus::*;
        let answer = Outcome::Completed(StoredResult {
            status_code: 200,
            body: bytes::Bytes::from_static(b"{}"),
        });
        // The escalation's outcome, whatever it is, applies.
        assert!(outcome_applies(Submitted, Some(7), Some(9), 9, &answer));
        assert!(outcome_applies(
            Submitted,
            Some(7),
            Some(9),
            9,
            &Outcome::Failed(err("f"))
        ));
        // The job's answer applies too: the first stored wins.
        assert!(outcome_applies(Submitted, Some(7), Some(9), 7, &answer));
        // Its failures and re-queues leave the request to the escalation.
        for o in [
            Outcome::Requeue,
            Outcome::Expired(err("x")),
            Outcome::Failed(err("f")),
            Outcome::Retry {
                error: err("r"),
                max_attempts: 3,
            },
        ] {
            assert!(
                !outcome_applies(Submitted, Some(7), Some(9), 7, &o),
                "{o:?}"
            );
        }
        // A third batch changes nothing.
        assert!(!outcome_applies(Submitted, Some(7), Some(9), 8, &answer));
    }

    #[test]
    fn an_answer_thrown_away_is_money_spent_twice() {
        use RequestStatus::*;
        let answer = Outcome::Completed(StoredResult {
            status_code: 200,
            body: bytes::Bytes::from_static(b"{}"),
        });
        // Answered by the escalation (9): the job's (7) line was paid for.
        assert!(spent_twice(Completed, Some(9), 7, &answer));
        // The other way round.
        assert!(spent_twice(Completed, Some(7), 9, &answer));
        // Applied again after a crash: its own answer, not a second one.
        assert!(!spent_twice(Completed, Some(7), 7, &answer));
        // Not answered yet, or nothing paid for.
        assert!(!spent_twice(Submitted, Some(7), 9, &answer));
        assert!(!spent_twice(
            Completed,
            Some(9),
            7,
            &Outcome::Expired(err("x"))
        ));
    }

    #[test]
    fn only_a_queued_unclaimed_request_is_cancelled() {
        use RequestStatus::*;
        assert_eq!(cancel_verdict(Queued, None), CancelVerdict::Cancel);
        assert_eq!(cancel_verdict(Queued, Some(1)), CancelVerdict::TooLate);
        assert_eq!(
            cancel_verdict(Cancelled, None),
            CancelVerdict::AlreadyCancelled
        );
        for s in [Submitted, Completed, Failed, Expired] {
            assert_eq!(cancel_verdict(s, Some(1)), CancelVerdict::TooLate);
        }
    }

    #[test]
    fn a_claim_stops_at_either_limit_but_takes_at_least_one() {
        assert!(claim_takes(0, 0, 500, 10, 100));
        assert!(!claim_takes(1, 500, 501, 10, 1000));
        assert!(claim_takes(1, 50, 50, 10, 100));
        assert!(!claim_takes(1, 50, 51, 10, 100));
        assert!(!claim_takes(10, 0, 1, 10, 100));
        assert!(!claim_takes(0, 0, 1, 0, 100));
        assert!(claim_takes(1, u64::MAX, 1, 10, u64::MAX));
    }

    #[test]
    fn embeddings_batches_stop_at_fifty_thousand_inputs() {
        let cap = max_inputs(Endpoint::Embeddings);
        assert_eq!(cap, 50_000);
        assert_eq!(max_inputs(Endpoint::ChatCompletions), u64::MAX);
        assert!(inputs_fit(0, 0, 60_000, cap), "the first line always goes");
        assert!(inputs_fit(1, 30_000, 20_000, cap));
        assert!(!inputs_fit(1, 30_000, 20_001, cap));
        assert!(!inputs_fit(1, 60_000, 1, cap));
        assert!(inputs_fit(49_999, 49_999, 1, cap));
        assert!(!inputs_fit(50_000, 50_000, 1, cap));
    }

    #[test]
    fn a_delivery_is_owed_only_with_a_callback() {
        let mut rec = RequestRecord::for_test("t", "c", "h");
        rec.id = 42;
        let payload =
            |r: &RequestRecord, res: Option<&StoredResult>| format!("{}:{}", r.id, res.is_some());
        assert!(delivery_for(&mut rec, None, &payload, 5).is_none());
        assert!(rec.webhook.is_none());
        rec.callback_url = Some("https://hooks.example/x".into());
        let d = delivery_for(&mut rec, None, &payload, 5).unwrap();
        assert_eq!(
            (d.request, d.msg_id.as_str(), d.payload.as_str()),
            (42, "msg_ferry_42", "42:false")
        );
        assert_eq!((d.first_ms, d.due_ms, d.attempts), (5, 5, 0));
        assert_eq!(rec.webhook.map(|w| w.status), Some(WebhookStatus::Pending));
    }

    #[test]
    fn a_request_goes_one_second_past_its_limit_and_not_before() {
        use RequestStatus::*;
        let r = Retention {
            terminal_secs: 100,
            slice_rows: 10,
        };
        let now = 1_000_000;
        let cutoff = r.record_cutoff(now);
        // Finished 99 s ago (a second younger than the limit) stays; 100 s
        // ago (exactly the limit) stays; 101 s ago goes.
        assert!(!request_purgeable(Completed, Some(now - 99), cutoff, false));
        assert!(!request_purgeable(
            Completed,
            Some(now - 100),
            cutoff,
            false
        ));
        assert!(request_purgeable(Completed, Some(now - 101), cutoff, false));
        for t in [Failed, Expired, Cancelled] {
            assert!(
                request_purgeable(t, Some(now - 101), cutoff, false),
                "{t:?}"
            );
        }
        // Never a live one, nor one still owed a webhook.
        assert!(!request_purgeable(Queued, Some(1), cutoff, false));
        assert!(!request_purgeable(Submitted, None, cutoff, false));
        assert!(!request_purgeable(Completed, None, cutoff, false));
        assert!(!request_purgeable(Completed, Some(1), cutoff, true));
        // A clock before the epoch's first limit purges nothing.
        assert_eq!(r.record_cutoff(5), 0);
        assert!(!request_purgeable(
            Completed,
            Some(0),
            r.record_cutoff(5),
            false
        ));
    }

    #[test]
    fn a_batch_goes_once_finished_cleaned_up_and_empty() {
        let done = |cleanup: Vec<String>| BatchState::Done {
            file_id: None,
            batch_id: None,
            upstream_status: "completed".into(),
            cleanup,
        };
        assert_eq!(batch_verdict(&done(vec![]), false), BatchVerdict::Purge);
        assert_eq!(batch_verdict(&done(vec![]), true), BatchVerdict::Stop);
        assert_eq!(
            batch_verdict(&done(vec!["file-1".into()]), false),
            BatchVerdict::Skip
        );
        assert_eq!(
            batch_verdict(&BatchState::Claimed, false),
            BatchVerdict::Skip
        );
    }
}
