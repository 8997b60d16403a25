//! The Message Batches operations: the same batches, timeline, locks and
//! journal as the OpenAI side (see the parent module), reached by `msgbatch_`
//! ids. A create writes its requests as the batch's input content without a
//! File (no File object shows it; the journal keeps the content until the
//! batch ends, as it does for an input whose File was deleted).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::Value;

use super::{Batch, Emulator, StoredFile, is_message_batch, lock, new_id};
use crate::emulator::anthropic::batches::{self, ENDPOINT, ID_PREFIX, Input, View};
use crate::emulator::config::Profile;
use crate::emulator::error::ApiError;
use crate::emulator::journal::{BatchMeta, Event, Exact};
use crate::emulator::timeline::Outcome;
use crate::emulator::validate;

/// A Message Batch's window: it ends within 24 hours or what is left expires.
const WINDOW_SECONDS: f64 = 24.0 * 3600.0;

impl Emulator {
    /// `POST /v1/messages/batches`, its body already checked.
    pub fn create_message_batch(&self, input: Input) -> Result<View, ApiError> {
        let config = self.config();
        let created = self.now();
        let content = StoredFile {
            id: new_id("file-"),
            bytes: Bytes::from(input.jsonl),
            created_at: created as i64,
            expires_at: None,
            filename: "message_batch.jsonl".to_owned(),
            purpose: "batch".to_owned(),
            seq: 0,
        };
        self.write_content(&content)?;
        lock(&self.files).pin(&content.id);
        let mut batch = Batch::from_meta(BatchMeta {
            id: new_id(ID_PREFIX),
            endpoint: ENDPOINT.to_owned(),
            input_file_id: content.id.clone(),
            completion_window: "24h".to_owned(),
            metadata: Value::Null,
            output_ttl: None,
            created: Exact(created),
            deadline: Exact(created + config.expire_after_seconds.unwrap_or(WINDOW_SECONDS)),
            validating: Exact(self.next_validating_seconds(&config)),
            per_request: Exact(config.per_request_seconds),
            finalizing: Exact(config.finalizing_seconds),
            cancel: Exact(config.cancel_seconds),
            // The OpenAI rules: no Moonshot parameter checks on Claude bodies.
            profile: Profile::Openai,
            models: config.models.clone(),
            max_lines: input.requests as u64,
            token_limit: false,
        });
        batch.input = content.bytes;
        // The requests were checked at create, as Anthropic checks them:
        // the batch knows its requests from the start, so a cancel or an
        // expiry before `validating_seconds` is over still reports each one.
        let created_event = Event::BatchCreated {
            batch: batch.meta(),
        };
        let validated = self.validate(&mut batch);
        if let Err(e) = self.record(vec![created_event, validated]) {
            if lock(&self.files).unpin(&batch.input_file_id) {
                self.remove_content(&batch.input_file_id);
            }
            return Err(e);
        }
        let view = view(&batch);
        tracing::info!(id = %batch.id, requests = input.requests, "message batch created");
        let mut index = lock(&self.batches);
        index.order.push(batch.id.clone());
        index
            .by_id
            .insert(batch.id.clone(), Arc::new(Mutex::new(batch)));
        Ok(view)
    }

    fn message_batch_entry(&self, id: &str) -> Result<Arc<Mutex<Batch>>, ApiError> {
        let index = lock(&self.batches);
        let found = index.by_id.get(id).filter(|_| is_message_batch(id));
        found
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("No message batch with id '{id}'."), None))
    }

    /// The batch brought up to the clock's time.
    pub fn message_batch(&self, id: &str) -> Result<View, ApiError> {
        let batch = self.message_batch_entry(id)?;
        let now = self.now();
        let mut b = lock(&batch);
        self.observe(&mut b, now)?;
        Ok(view(&b))
    }

    /// Newest first. `after_id` pages toward older batches (what follows the
    /// cursor in this order), `before_id` toward newer ones (the `limit`
    /// batches just before it); an unknown cursor gives an empty page.
    pub fn list_message_batches(
        &self,
        limit: usize,
        before_id: Option<&str>,
        after_id: Option<&str>,
    ) -> Result<(Vec<View>, bool), ApiError> {
        let (page, has_more) = {
            let index = lock(&self.batches);
            let newest_first: Vec<&String> = index
                .order
                .iter()
                .rev()
                .filter(|id| is_message_batch(id))
                .collect();
            let range = match (before_id, after_id) {
                (Some(before), _) => match newest_first.iter().position(|id| *id == before) {
                    Some(at) => (at.saturating_sub(limit)..at, at > limit),
                    None => (0..0, false),
                },
                (None, Some(after)) => match newest_first.iter().position(|id| *id == after) {
                    Some(at) => {
                        let end = (at + 1 + limit).min(newest_first.len());
                        (at + 1..end, end < newest_first.len())
                    }
                    None => (0..0, false),
                },
                (None, None) => {
                    let end = limit.min(newest_first.len());
                    (0..end, end < newest_first.len())
                }
            };
            let (range, has_more) = range;
            let page: Vec<Arc<Mutex<Batch>>> = newest_first[range]
                .iter()
                .filter_map(|id| index.by_id.get(*id).cloned())
                .collect();
            (page, has_more)
        };
        let now = self.now();
        let views = page
            .iter()
            .map(|batch| {
                let mut b = lock(batch);
                self.observe(&mut b, now)?;
                Ok(view(&b))
            })
            .collect::<Result<_, ApiError>>()?;
        Ok((views, has_more))
    }

    /// Cancels an unfinished batch; one already `canceling` is returned as
    /// it is, an ended one is refused.
    pub fn cancel_message_batch(&self, id: &str) -> Result<View, ApiError> {
        let batch = self.message_batch_entry(id)?;
        let now = self.now();
        let mut b = lock(&batch);
        self.observe(&mut b, now)?;
        let status = b.eval.status;
        if status == crate::emulator::timeline::Status::Cancelling {
            return Ok(view(&b));
        }
        if status.is_terminal() {
            return Err(ApiError::bad_request(
                format!("Batch {id} has ended and can no longer be canceled."),
                None,
                None,
            ));
        }
        self.record(vec![Event::Cancelled {
            batch: b.id.clone(),
            at: Exact(now),
        }])?;
        b.spec.cancel_at = Some(now);
        b.eval.status = crate::emulator::timeline::Status::Cancelling;
        b.eval.cancelling_at = Some(now);
        tracing::info!(id = %b.id, "message batch canceling");
        Ok(view(&b))
    }

    /// Deletes an ended batch and its results; an unfinished one is refused.
    pub fn delete_message_batch(&self, id: &str) -> Result<(), ApiError> {
        let batch = self.message_batch_entry(id)?;
        let now = self.now();
        let mut b = lock(&batch);
        self.observe(&mut b, now)?;
        if !b.finished {
            return Err(ApiError::bad_request(
                format!(
                    "Batch {id} cannot be deleted while it is still processing; cancel it first."
                ),
                None,
                None,
            ));
        }
        let files: Vec<String> = b
            .output_file_id
            .iter()
            .chain(&b.error_file_id)
            .cloned()
            .collect();
        self.record(vec![Event::BatchDeleted {
            batch: b.id.clone(),
            files: files.clone(),
        }])?;
        {
            let mut f = lock(&self.files);
            for file in &files {
                f.remove(file);
            }
        }
        for file in &files {
            self.remove_content(file);
        }
        let mut index = lock(&self.batches);
        index.by_id.remove(&b.id);
        index.order.retain(|other| *other != b.id);
        tracing::info!(id = %b.id, "message batch deleted");
        Ok(())
    }

    /// The result lines of an ended batch as JSONL, or `None` while it is
    /// still processing.
    pub fn message_batch_results(&self, id: &str) -> Result<Option<Vec<u8>>, ApiError> {
        let batch = self.message_batch_entry(id)?;
        let now = self.now();
        let (output, error) = {
            let mut b = lock(&batch);
            self.observe(&mut b, now)?;
            if !b.finished {
                return Ok(None);
            }
            (b.output_file_id.clone(), b.error_file_id.clone())
        };
        let mut out = Vec::new();
        for file in output.iter().chain(&error) {
            let content = self.file(file)?.bytes;
            for (_, range) in validate::lines(&content) {
                let Some(text) = content.get(range) else {
                    continue;
                };
                let Ok(line) = serde_json::from_slice::<Value>(text) else {
                    continue;
                };
                out.extend_from_slice(batches::result_line(&line).to_string().as_bytes());
                out.push(b'\n');
            }
        }
        Ok(Some(out))
    }
}

/// What the routes show of a batch.
fn view(b: &Batch) -> View {
    let e = &b.eval;
    let requests = match b.spec.outcome {
        Some(Outcome::Valid { lines }) => lines as u64,
        _ => validate::lines(&b.input).count() as u64,
    };
    View {
        id: b.id.clone(),
        status: e.status,
        created: b.spec.created,
        deadline: b.spec.deadline,
        cancel_at: e.cancelling_at,
        ended_at: e
            .completed_at
            .or(e.failed_at)
            .or(e.expired_at)
            .or(e.cancelled_at),
        requests,
        succeeded: b.completed,
        errored: b.failed,
    }
}
