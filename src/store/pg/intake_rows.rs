//! A round's intakes written as sets: the requests, their bodies and their
//! queue entries each go in one statement over arrays, so a round of 300
//! calls costs the database the same few round trips as a round of one
//! (a call at a time, it was four round trips per call, one after another,
//! while every other call of the round waited).
//!
//! The answers are the ones [`super::requests::accept_in`] gives call by
//! call; that function stays the path of a round rerun with a savepoint
//! per call, after one of its calls failed.

use std::collections::HashMap;

use deadpool_postgres::Transaction;
use tokio_postgres::types::ToSql;

use super::PgError;
use super::store::{
    REQUEST_COLUMNS, REQUEST_FROM, json_opt_text, opt_to_i64, request_from, to_i64, to_u64,
};
use crate::store::{Intake, QueueKey, RequestRecord, line_len};

/// Inserts every request not already stored under its (tenant, custom id).
/// Rows are numbered from `ferry_ids` in the order given; of two rows with
/// one custom id, the first is inserted and the second skipped, as is a
/// row whose custom id another transaction holds (waited for, as
/// `ON CONFLICT` does).
const INSERT_REQUESTS: &str = "INSERT INTO requests (id, tenant, custom_id, upstream, model, \
     body_sha256, body_len, callback_url, stream, created_at, status, attempts, batch, \
     submitted_at, completed_at, error, webhook, endpoint, inputs, deadline_at) \
     SELECT nextval('ferry_ids'), t, c, u, m, h, bl, cb, st, ca, s, a, b, sa, co, \
            e::jsonb, w::jsonb, ep, n, dl \
     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], \
                 $7::text[], $8::bool[], $9::bigint[], $10::text[], $11::int4[], \
                 $12::bigint[], $13::bigint[], $14::bigint[], $15::text[], $16::text[], \
                 $17::text[], $18::bigint[], $19::bigint[]) \
          AS x(t, c, u, m, h, bl, cb, st, ca, s, a, b, sa, co, e, w, ep, n, dl) \
     ON CONFLICT (tenant, custom_id) DO NOTHING \
     RETURNING id, tenant, custom_id";

const INSERT_BODIES: &str =
    "INSERT INTO bodies (id, body) SELECT * FROM unnest($1::bigint[], $2::bytea[])";

const INSERT_QUEUE: &str = "INSERT INTO queue (upstream, endpoint, model, id, enqueued_ms, \
     line_len, inputs) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], \
     $5::bigint[], $6::bigint[], $7::bigint[])";

/// What a call's answer waits on once the requests are inserted.
enum Pending {
    /// Inserted now, under this record.
    Created(Box<RequestRecord>),
    /// Its custom id went to an earlier call of this round (the index).
    Earlier(usize),
    /// Its custom id was stored before this round: read it.
    Stored,
}

/// The intakes `calls`, in the order given, inside `tx`: each one's answer
/// in that order. Queue counters are the caller's (one update per queue per
/// round). `now_ms` is the queue entries' enqueue time.
pub(super) async fn accept_many_in(
    tx: &Transaction<'_>,
    calls: &[(&RequestRecord, &[u8])],
    now_ms: u64,
) -> Result<Vec<Intake>, PgError> {
    let inserted = insert_requests(tx, calls).await?;
    let mut ids: HashMap<(&str, &str), i64> = HashMap::with_capacity(inserted.len());
    for (id, tenant, custom_id) in &inserted {
        ids.insert((tenant.as_str(), custom_id.as_str()), *id);
    }
    let mut first_of: HashMap<(&str, &str), usize> = HashMap::new();
    let mut pending = Vec::with_capacity(calls.len());
    let mut to_read: Vec<(&str, &str)> = Vec::new();
    for (i, (rec, _)) in calls.iter().enumerate() {
        let key = (rec.tenant.as_str(), rec.custom_id.as_str());
        if let Some(&j) = first_of.get(&key) {
            pending.push(Pending::Earlier(j));
            continue;
        }
        first_of.insert(key, i);
        match ids.remove(&key) {
            Some(id) => pending.push(Pending::Created(Box::new(RequestRecord {
                id: to_u64(id, "request id")?,
                ..(*rec).clone()
            }))),
            None => {
                to_read.push(key);
                pending.push(Pending::Stored);
            }
        }
    }
    insert_bodies_and_entries(tx, calls, &pending, now_ms).await?;
    let mut stored = read_stored(tx, &to_read).await?;
    let mut answers: Vec<Intake> = Vec::with_capacity(calls.len());
    for (i, p) in pending.into_iter().enumerate() {
        let (rec, _) = calls[i];
        let answer = match p {
            Pending::Created(r) => Intake::Created(*r),
            Pending::Stored => {
                let earlier = stored
                    .remove(&(rec.tenant.clone(), rec.custom_id.clone()))
                    .ok_or_else(|| {
                        PgError::Corrupt("a custom id conflicted but its request is missing".into())
                    })?;
                same_or_conflict(rec, earlier)
            }
            Pending::Earlier(j) => {
                let earlier = match &answers[j] {
                    Intake::Created(r) | Intake::Existing(r) | Intake::Conflict(r) => r.clone(),
                };
                same_or_conflict(rec, earlier)
            }
        };
        answers.push(answer);
    }
    Ok(answers)
}

/// A call whose custom id is taken by `earlier`: the same request again if
/// the bodies match, a conflict if not.
fn same_or_conflict(rec: &RequestRecord, earlier: RequestRecord) -> Intake {
    if earlier.body_sha256 == rec.body_sha256 {
        Intake::Existing(earlier)
    } else {
        Intake::Conflict(earlier)
    }
}

/// The requests' rows; (id, tenant, custom id) of those inserted.
async fn insert_requests(
    tx: &Transaction<'_>,
    calls: &[(&RequestRecord, &[u8])],
) -> Result<Vec<(i64, String, String)>, PgError> {
    let n = calls.len();
    let mut tenant = Vec::with_capacity(n);
    let mut custom_id = Vec::with_capacity(n);
    let mut upstream = Vec::with_capacity(n);
    let mut model = Vec::with_capacity(n);
    let mut sha = Vec::with_capacity(n);
    let mut body_len = Vec::with_capacity(n);
    let mut callback = Vec::with_capacity(n);
    let mut stream = Vec::with_capacity(n);
    let mut created_at = Vec::with_capacity(n);
    let mut status = Vec::with_capacity(n);
    let mut attempts = Vec::with_capacity(n);
    let mut batch = Vec::with_capacity(n);
    let mut submitted_at = Vec::with_capacity(n);
    let mut completed_at = Vec::with_capacity(n);
    let mut error = Vec::with_capacity(n);
    let mut webhook = Vec::with_capacity(n);
    let mut endpoint = Vec::with_capacity(n);
    let mut inputs = Vec::with_capacity(n);
    let mut deadline_at = Vec::with_capacity(n);
    for (rec, _) in calls {
        tenant.push(rec.tenant.as_str());
        custom_id.push(rec.custom_id.as_str());
        upstream.push(rec.upstream.as_str());
        model.push(rec.model.as_str());
        sha.push(rec.body_sha256.as_str());
        body_len.push(to_i64(rec.body_len, "body length")?);
        callback.push(rec.callback_url.as_deref());
        stream.push(rec.stream);
        created_at.push(to_i64(rec.created_at, "created_at")?);
        status.push(rec.status.as_str());
        attempts.push(i32::try_from(rec.attempts).map_err(|_| PgError::OutOfRange("attempts"))?);
        batch.push(opt_to_i64(rec.batch, "batch")?);
        submitted_at.push(opt_to_i64(rec.submitted_at, "submitted_at")?);
        completed_at.push(opt_to_i64(rec.completed_at, "completed_at")?);
        error.push(json_opt_text(&rec.error, "request error")?);
        webhook.push(json_opt_text(&rec.webhook, "webhook state")?);
        endpoint.push(rec.endpoint.path());
        inputs.push(to_i64(rec.inputs, "inputs")?);
        deadline_at.push(opt_to_i64(rec.deadline_at, "deadline_at")?);
    }
    let insert = tx.prepare_cached(INSERT_REQUESTS).await?;
    tx.query(
        &insert,
        &[
            &tenant,
            &custom_id,
            &upstream,
            &model,
            &sha,
            &body_len,
            &callback,
            &stream,
            &created_at,
            &status,
            &attempts,
            &batch,
            &submitted_at,
            &completed_at,
            &error,
            &webhook,
            &endpoint,
            &inputs,
            &deadline_at,
        ],
    )
    .await?
    .iter()
    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
    .collect()
}

/// The bodies and queue entries of the calls inserted now.
async fn insert_bodies_and_entries(
    tx: &Transaction<'_>,
    calls: &[(&RequestRecord, &[u8])],
    pending: &[Pending],
    now_ms: u64,
) -> Result<(), PgError> {
    let enqueued = to_i64(now_ms, "enqueue time")?;
    let mut ids = Vec::new();
    let mut bodies: Vec<&[u8]> = Vec::new();
    let mut upstreams = Vec::new();
    let mut endpoints = Vec::new();
    let mut models = Vec::new();
    let mut lens = Vec::new();
    let mut inputs = Vec::new();
    for (p, (_, body)) in pending.iter().zip(calls) {
        let Pending::Created(r) = p else { continue };
        let qk = QueueKey::of(r);
        ids.push(to_i64(r.id, "request id")?);
        bodies.push(*body);
        upstreams.push(qk.upstream);
        endpoints.push(qk.endpoint.path());
        models.push(qk.model);
        lens.push(to_i64(
            line_len(r.endpoint, r.id, r.body_len),
            "line length",
        )?);
        inputs.push(to_i64(r.inputs, "inputs")?);
    }
    if ids.is_empty() {
        return Ok(());
    }
    let enqueued = vec![enqueued; ids.len()];
    let put_bodies = tx.prepare_cached(INSERT_BODIES).await?;
    let put_entries = tx.prepare_cached(INSERT_QUEUE).await?;
    // Both statements go out at once on the connection (pipelined).
    let body_params: [&(dyn ToSql + Sync); 2] = [&ids, &bodies];
    let entry_params: [&(dyn ToSql + Sync); 7] = [
        &upstreams, &endpoints, &models, &ids, &enqueued, &lens, &inputs,
    ];
    let (b, q) = tokio::join!(
        tx.execute(&put_bodies, &body_params),
        tx.execute(&put_entries, &entry_params),
    );
    b?;
    q?;
    Ok(())
}

/// The stored requests under `keys` (tenant, custom id).
async fn read_stored(
    tx: &Transaction<'_>,
    keys: &[(&str, &str)],
) -> Result<HashMap<(String, String), RequestRecord>, PgError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let (tenants, custom_ids): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
    let sql = format!(
        "SELECT {REQUEST_COLUMNS} FROM {REQUEST_FROM} \
         WHERE (r.tenant, r.custom_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))"
    );
    let mut found = HashMap::with_capacity(keys.len());
    for row in tx.query(&sql, &[&tenants, &custom_ids]).await? {
        let rec = request_from(&row)?;
        found.insert((rec.tenant.clone(), rec.custom_id.clone()), rec);
    }
    Ok(found)
}
