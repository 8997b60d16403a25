//! Requests escalated for their deadline out of a submitted Batch API job
//! (issue #17): each is also sent alone, on a synchronous lane, in a batch
//! of one, and stays a member of its job. Its state names both (`batch`,
//! `escalation`); the first answer stored wins (see
//! [`lifecycle::outcome_applies`]).

use super::*;

impl SledStore {
    /// The members of `batch` still waiting on it, not yet escalated, that
    /// have a deadline: (id, deadline) each, in member order.
    pub fn pending_deadlines(&self, batch: u64) -> Result<Vec<(u64, u64)>, StoreError> {
        let mut due = Vec::new();
        for id in self.members(batch) {
            let id = id?;
            let Some(state) = self.state(id)? else {
                continue;
            };
            if state.status != RequestStatus::Submitted
                || state.batch != Some(batch)
                || state.escalation.is_some()
            {
                continue;
            }
            if let Some(deadline) = self.get_fixed(id)?.and_then(|r| r.deadline_at) {
                due.push((id, deadline));
            }
        }
        Ok(due)
    }

    /// Sends request `id`, a member of the submitted `batch`, also on
    /// `lane`: a new batch of one, whose id the request's state records as
    /// its escalation. `None` when the request is no longer waiting on
    /// `batch` or was escalated already (a request is escalated once).
    ///
    /// The batch of one and its member are written before the request's
    /// state names it: a crash between the two leaves a batch whose member
    /// does not know it, which its driver finishes without a call (see
    /// `batch::escalate`). Durable once the caller commits.
    pub fn escalate_submitted(
        &self,
        batch: u64,
        id: u64,
        lane: Lane,
        reason: &str,
    ) -> Result<Option<BatchRecord>, StoreError> {
        let _g = self.queue_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut state) = self.state(id)? else {
            return Ok(None);
        };
        if state.status != RequestStatus::Submitted
            || state.batch != Some(batch)
            || state.escalation.is_some()
        {
            return Ok(None);
        }
        let Some(rec) = self.get_fixed(id)? else {
            return Ok(None);
        };
        let qk = QueueKey::of(&rec);
        let len = line_len(rec.endpoint, id, rec.body_len);
        let one = BatchRecord {
            lane,
            ..BatchRecord::claimed(self.new_id()?, &qk, 1, len, reason)
        };
        self.put_batch(&one)?;
        self.members
            .insert(member_key(one.id, id), id.to_be_bytes().to_vec())?;
        state.escalation = Some(one.id);
        self.states.insert(id.to_be_bytes(), &state.encode())?;
        Ok(Some(one))
    }

    /// Whether `id`'s state names `batch` as the batch it is in or as its
    /// escalation: false for a batch of one a crash cut short before the
    /// request's state named it.
    pub fn holds(&self, batch: u64, id: u64) -> Result<bool, StoreError> {
        Ok(self
            .state(id)?
            .is_some_and(|s| s.batch == Some(batch) || s.escalation == Some(batch)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{no_payload, qk};
    use super::*;

    fn answer(text: &'static str) -> Outcome {
        Outcome::Completed(StoredResult {
            status_code: 200,
            body: bytes::Bytes::from_static(text.as_bytes()),
        })
    }

    /// A submitted batch of three: `a` (deadline 100), `b` (deadline 200)
    /// and `c` (none).
    fn submitted(s: &SledStore) -> (BatchRecord, Vec<u64>) {
        let mut ids = Vec::new();
        for (cid, deadline_at) in [("a", Some(100)), ("b", Some(200)), ("c", None)] {
            let r = RequestRecord {
                deadline_at,
                ..RequestRecord::for_test("t", cid, "h")
            };
            let Intake::Created(r) = s.insert_request(r, b"{}").unwrap() else {
                panic!()
            };
            ids.push(r.id);
        }
        let mut b = s.claim_batch(&qk(), 10, u64::MAX, "size").unwrap().unwrap();
        s.mark_submitted(&mut b, "file-1", "batch_1").unwrap();
        (b, ids)
    }

    #[test]
    fn a_request_in_a_submitted_batch_escalates_once_and_the_first_answer_wins() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path(), 64 << 20).unwrap();
        let (job, ids) = submitted(&s);
        assert_eq!(
            s.pending_deadlines(job.id).unwrap(),
            vec![(ids[0], 100), (ids[1], 200)]
        );
        let one = s
            .escalate_submitted(job.id, ids[0], Lane::Flex, "deadline")
            .unwrap()
            .unwrap();
        assert_eq!(
            (one.lane, one.request_count, one.state.clone()),
            (Lane::Flex, 1, BatchState::Claimed)
        );
        assert_eq!(
            s.members(one.id).map(Result::unwrap).collect::<Vec<_>>(),
            vec![ids[0]]
        );
        // Still in its job, and escalated once only.
        let a = s.get(ids[0]).unwrap().unwrap();
        assert_eq!(
            (a.status, a.batch),
            (RequestStatus::Submitted, Some(job.id))
        );
        assert!(s.holds(one.id, ids[0]).unwrap() && s.holds(job.id, ids[0]).unwrap());
        assert!(!s.holds(one.id, ids[1]).unwrap());
        assert!(
            s.escalate_submitted(job.id, ids[0], Lane::Standard, "deadline")
                .unwrap()
                .is_none()
        );
        assert_eq!(s.pending_deadlines(job.id).unwrap(), vec![(ids[1], 200)]);
        // A claim's recovery leaves the submitted request as it is.
        s.recover_claims().unwrap();
        assert_eq!(
            s.get(ids[0]).unwrap().unwrap().status,
            RequestStatus::Submitted
        );

        // The job's failures leave an escalated request to its escalation.
        let expired = Outcome::Expired(RequestError {
            code: "batch_expired".into(),
            message: "m".into(),
        });
        let done = s
            .apply_outcomes(job.id, vec![(ids[0], expired)], &no_payload)
            .unwrap();
        assert!(done.is_empty());
        // The escalation answers first: its answer and lane are the request's.
        s.apply_submitted(one.id).unwrap();
        let done = s
            .apply_outcomes(one.id, vec![(ids[0], answer("flex"))], &no_payload)
            .unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].answered_by(), Some(Lane::Flex));
        // The job's line comes later: discarded; the other members apply.
        let done = s
            .apply_outcomes(
                job.id,
                vec![
                    (ids[0], answer("batch")),
                    (ids[1], answer("batch")),
                    (ids[2], answer("batch")),
                ],
                &no_payload,
            )
            .unwrap();
        assert_eq!(
            done.iter().map(|r| r.id).collect::<Vec<_>>(),
            ids[1..].to_vec()
        );
        let a = s.get(ids[0]).unwrap().unwrap();
        assert_eq!((a.answered_by(), a.batch), (Some(Lane::Flex), Some(one.id)));
        assert!(a.batch_id.is_none(), "no Batch API job answered it");
        assert_eq!(&s.result(ids[0]).unwrap().unwrap().body[..], b"flex");
        assert!(crate::store::lifecycle::spent_twice(
            a.status,
            a.batch,
            job.id,
            &answer("batch")
        ));
    }

    #[test]
    fn the_job_may_answer_first_and_the_escalation_is_then_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path(), 64 << 20).unwrap();
        let (job, ids) = submitted(&s);
        let one = s
            .escalate_submitted(job.id, ids[1], Lane::Standard, "deadline")
            .unwrap()
            .unwrap();
        let done = s
            .apply_outcomes(job.id, vec![(ids[1], answer("batch"))], &no_payload)
            .unwrap();
        assert_eq!(done[0].answered_by(), Some(Lane::Batch));
        let done = s
            .apply_outcomes(one.id, vec![(ids[1], answer("standard"))], &no_payload)
            .unwrap();
        assert!(done.is_empty(), "answered once");
        let b = s.get(ids[1]).unwrap().unwrap();
        assert_eq!(
            (b.answered_by(), b.batch),
            (Some(Lane::Batch), Some(job.id))
        );
        assert_eq!(&s.result(ids[1]).unwrap().unwrap().body[..], b"batch");
        // A request no longer waiting on its job is not escalated.
        assert!(
            s.escalate_submitted(job.id, ids[1], Lane::Flex, "deadline")
                .unwrap()
                .is_none()
        );
    }
}
