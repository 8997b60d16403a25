//! [`PgStore`]: the handle every store operation hangs off, its plain
//! reads, and the conversions between rows and records.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_postgres::Row;

use super::{PgError, migrate};
use crate::store::{Lane, RequestError, RequestRecord, RequestStatus, StoredResult, WebhookState};

/// Builds a webhook's JSON body for a request that just became terminal.
/// The embedded store's `PayloadFn`, plus `Sync`: the PostgreSQL methods
/// hold it across awaits, and their futures must stay `Send`.
pub type SyncPayloadFn<'a> = dyn Fn(&RequestRecord, Option<&StoredResult>) -> String + Sync + 'a;

/// How long a node keeps a webhook delivery it took before another node
/// may take it again, unless set with [`PgStore::with_delivery_lease`].
const DEFAULT_DELIVERY_LEASE: Duration = Duration::from_secs(60);

/// The store on PostgreSQL, shared by the nodes of a cluster. Cheap to
/// clone (the pool is shared). Every write is one transaction, committed
/// (with `synchronous_commit` as the server has it, on by default) before
/// the method returns.
#[derive(Clone)]
pub struct PgStore {
    pub(super) pool: Pool,
    /// Where the pool connects, for connections of their own (the event
    /// listener's).
    config: tokio_postgres::Config,
    /// This node's name in leases: outbox rows it took, named leases.
    pub(super) owner: String,
    pub(super) delivery_lease: Duration,
    /// The intake writer's queue, shared by the clones.
    pub(super) intake: super::intake_writer::Queue,
    /// Queue sizes as the intake writer's rounds left them.
    pub(super) loads: super::intake_writer::Loads,
    /// The queued total intake checks `max_queued` against, and when it was
    /// read (see [`PgStore::queued_for_admission`]); shared by the clones.
    pub(super) admission: super::queues::Admission,
}

/// The request columns every read selects, in the order [`request_from`]
/// reads them; `r` is `requests`, `b` the batch it is in (a left join).
pub(super) const REQUEST_COLUMNS: &str = "r.id, r.tenant, r.custom_id, r.upstream, r.model, \
     r.body_sha256, r.body_len, r.callback_url, r.stream, r.created_at, r.status, r.attempts, \
     r.batch, r.submitted_at, r.completed_at, r.error::text, r.webhook::text, b.upstream_batch_id, r.endpoint, \
     r.inputs, r.deadline_at, b.record ->> 'lane'";

/// How many [`REQUEST_COLUMNS`] there are: a column a query reads after
/// them has this index.
pub(super) const REQUEST_COLUMN_COUNT: usize = 22;

/// `FROM` for [`REQUEST_COLUMNS`].
pub(super) const REQUEST_FROM: &str = "requests r LEFT JOIN batches b ON b.id = r.batch";

impl PgStore {
    /// Builds the pool and brings the schema up to date (see
    /// [`migrate::migrate`]). The node's owner name is random; set a stable
    /// one with [`PgStore::with_owner`].
    pub async fn connect(
        config: tokio_postgres::Config,
        pool_size: usize,
    ) -> Result<PgStore, PgError> {
        let config = super::with_connect_timeout(config);
        let pool = super::pool(config.clone(), pool_size)?;
        let mut client = pool.get().await?;
        migrate::migrate(&mut client).await?;
        drop(client);
        Ok(PgStore {
            pool,
            config,
            owner: format!("ferry-{:016x}", rand::random::<u64>()),
            delivery_lease: DEFAULT_DELIVERY_LEASE,
            intake: Default::default(),
            loads: Default::default(),
            admission: Default::default(),
        })
    }

    /// Names this node in the leases it takes (outbox rows, named leases).
    /// Two nodes must never share a name.
    pub fn with_owner(mut self, owner: impl Into<String>) -> PgStore {
        self.owner = owner.into();
        self
    }

    /// How long a taken webhook delivery stays this node's before another
    /// node may take it (default 60 s): longer than one send may take.
    pub fn with_delivery_lease(mut self, lease: Duration) -> PgStore {
        self.delivery_lease = lease;
        self
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Where this store connects.
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// Tells every listening node of `event` (see [`super::events`]).
    pub async fn publish(&self, event: &super::events::Event) -> Result<(), PgError> {
        let client = self.client().await?;
        super::events::publish(&client, event).await
    }

    pub(super) async fn client(&self) -> Result<deadpool_postgres::Object, PgError> {
        Ok(self.pool.get().await?)
    }

    // ------------------------------------------------------------ reads

    /// A request with its current state and its batch's upstream id.
    pub async fn get(&self, id: u64) -> Result<Option<RequestRecord>, PgError> {
        let client = self.client().await?;
        let sql = format!("SELECT {REQUEST_COLUMNS} FROM {REQUEST_FROM} WHERE r.id = $1");
        client
            .query_opt(&sql, &[&to_i64(id, "request id")?])
            .await?
            .map(|row| request_from(&row))
            .transpose()
    }

    pub async fn find(
        &self,
        tenant: &str,
        custom_id: &str,
    ) -> Result<Option<RequestRecord>, PgError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT {REQUEST_COLUMNS} FROM {REQUEST_FROM} WHERE r.tenant = $1 AND r.custom_id = $2"
        );
        client
            .query_opt(&sql, &[&tenant, &custom_id])
            .await?
            .map(|row| request_from(&row))
            .transpose()
    }

    /// [`PgStore::find`] and, when the request is completed, its answer:
    /// one query.
    pub async fn find_answered(
        &self,
        tenant: &str,
        custom_id: &str,
    ) -> Result<Option<(RequestRecord, Option<StoredResult>)>, PgError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT {REQUEST_COLUMNS}, res.status_code, res.body FROM {REQUEST_FROM} \
             LEFT JOIN results res ON res.id = r.id \
             WHERE r.tenant = $1 AND r.custom_id = $2"
        );
        let Some(row) = client.query_opt(&sql, &[&tenant, &custom_id]).await? else {
            return Ok(None);
        };
        let rec = request_from(&row)?;
        let answer = match rec.status {
            RequestStatus::Completed => result_from(&row, REQUEST_COLUMN_COUNT)?,
            _ => None,
        };
        Ok(Some((rec, answer)))
    }

    /// The body as it goes into the JSONL line; gone once the request is
    /// terminal.
    pub async fn body(&self, id: u64) -> Result<Option<Vec<u8>>, PgError> {
        let client = self.client().await?;
        Ok(client
            .query_opt(
                "SELECT body FROM bodies WHERE id = $1",
                &[&to_i64(id, "request id")?],
            )
            .await?
            .map(|row| row.try_get(0))
            .transpose()?)
    }

    /// The input file's lines of `members[next..]`, about `max_bytes` of
    /// them, read a slice of bodies per query; returns them and the index
    /// of the first member not taken.
    pub async fn input_lines(
        &self,
        endpoint: crate::endpoint::Endpoint,
        members: &[u64],
        mut next: usize,
        max_bytes: usize,
    ) -> Result<(bytes::Bytes, usize), PgError> {
        /// Bodies per query: ~256 kB at a typical 1 kB prompt.
        const SLICE: usize = 256;
        let client = self.client().await?;
        let mut buf = bytes::BytesMut::with_capacity(max_bytes + 4096);
        while next < members.len() && buf.len() < max_bytes {
            let ids = &members[next..(next + SLICE).min(members.len())];
            let keys = ids
                .iter()
                .map(|id| to_i64(*id, "request id"))
                .collect::<Result<Vec<i64>, _>>()?;
            let rows = client
                .query("SELECT id, body FROM bodies WHERE id = ANY($1)", &[&keys])
                .await?;
            let mut bodies = std::collections::HashMap::with_capacity(rows.len());
            for row in rows {
                let id: i64 = row.try_get(0)?;
                let body: &[u8] = row.try_get(1)?;
                bodies.insert(id, bytes::Bytes::copy_from_slice(body));
            }
            for (id, key) in ids.iter().zip(&keys) {
                if buf.len() >= max_bytes {
                    break;
                }
                let body = bodies
                    .get(key)
                    .ok_or_else(|| PgError::Corrupt(format!("body of request {id} is missing")))?;
                buf.extend_from_slice(crate::store::line_prefix(endpoint, *id).as_bytes());
                buf.extend_from_slice(body);
                buf.extend_from_slice(crate::store::LINE_SUFFIX.as_bytes());
                next += 1;
            }
        }
        Ok((buf.freeze(), next))
    }

    /// Bytes the database takes on disk.
    pub async fn storage_size(&self) -> Result<u64, PgError> {
        let client = self.client().await?;
        let size: i64 = client
            .query_one("SELECT pg_database_size(current_database())", &[])
            .await?
            .try_get(0)?;
        to_u64(size, "database size")
    }

    /// Rows (the statistics' live-row estimate) and bytes on disk (with
    /// indexes and TOAST) of each kind's table.
    pub async fn census(
        &self,
    ) -> Result<Vec<(crate::store::census::Kind, crate::store::census::Tally)>, PgError> {
        use crate::store::census::{KINDS, Tally};
        let client = self.client().await?;
        let tables: Vec<&str> = KINDS.iter().map(|k| k.table()).collect();
        let rows = client
            .query(
                "SELECT relname::text, n_live_tup, pg_total_relation_size(relid) \
                 FROM pg_stat_user_tables \
                 WHERE schemaname = current_schema() AND relname = ANY($1)",
                &[&tables],
            )
            .await?;
        let mut out = Vec::new();
        for kind in KINDS {
            let mut tally = Tally::default();
            if let Some(r) = rows
                .iter()
                .find(|r| r.try_get::<_, &str>(0).ok() == Some(kind.table()))
            {
                tally.rows = to_u64(r.try_get(1)?, "live rows")?;
                tally.bytes = to_u64(r.try_get(2)?, "table size")?;
            }
            out.push((kind, tally));
        }
        Ok(out)
    }

    /// The cluster's instance id: `candidate` if this node is the first to
    /// ask, else the one the first node wrote.
    pub async fn instance_id(&self, candidate: &str) -> Result<String, PgError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO cluster (instance_id) VALUES ($1) ON CONFLICT DO NOTHING",
                &[&candidate],
            )
            .await?;
        Ok(client
            .query_one("SELECT instance_id FROM cluster", &[])
            .await?
            .try_get(0)?)
    }

    pub async fn result(&self, id: u64) -> Result<Option<StoredResult>, PgError> {
        let client = self.client().await?;
        match client
            .query_opt(
                "SELECT status_code, body FROM results WHERE id = $1",
                &[&to_i64(id, "request id")?],
            )
            .await?
        {
            Some(row) => result_from(&row, 0),
            None => Ok(None),
        }
    }
}

/// The result in `row`'s columns `at` (status code) and `at + 1` (body);
/// `None` when they are null (a left join that found none).
fn result_from(row: &tokio_postgres::Row, at: usize) -> Result<Option<StoredResult>, PgError> {
    let (Some(code), Some(body)) = (
        row.try_get::<_, Option<i32>>(at)?,
        row.try_get::<_, Option<Vec<u8>>>(at + 1)?,
    ) else {
        return Ok(None);
    };
    Ok(Some(StoredResult {
        status_code: u16::try_from(code)
            .map_err(|_| PgError::Corrupt(format!("result status code {code}")))?,
        body: body.into(),
    }))
}

// ------------------------------------------------------------ conversions

/// Ids, lengths and unix times are `u64` in Ferry and `bigint` here; none
/// comes near 2^63, but a value that did is refused, not wrapped.
pub(super) fn to_i64(v: u64, what: &'static str) -> Result<i64, PgError> {
    i64::try_from(v).map_err(|_| PgError::OutOfRange(what))
}

pub(super) fn to_u64(v: i64, what: &str) -> Result<u64, PgError> {
    u64::try_from(v).map_err(|_| PgError::Corrupt(format!("{what} is {v}")))
}

pub(super) fn opt_to_i64(v: Option<u64>, what: &'static str) -> Result<Option<i64>, PgError> {
    v.map(|v| to_i64(v, what)).transpose()
}

fn opt_to_u64(v: Option<i64>, what: &str) -> Result<Option<u64>, PgError> {
    v.map(|v| to_u64(v, what)).transpose()
}

pub(super) fn status_from(s: &str) -> Result<RequestStatus, PgError> {
    use RequestStatus::*;
    [Queued, Submitted, Completed, Failed, Expired, Cancelled]
        .into_iter()
        .find(|st| st.as_str() == s)
        .ok_or_else(|| PgError::Corrupt(format!("request status {s:?}")))
}

/// JSON text for a `jsonb` column (written as `$n::text::jsonb`: the driver
/// sends it as text, without its optional serde feature).
pub(super) fn json_text<T: serde::Serialize>(v: &T, what: &str) -> Result<String, PgError> {
    serde_json::to_string(v).map_err(|e| PgError::Corrupt(format!("{what}: {e}")))
}

pub(super) fn json_opt_text<T: serde::Serialize>(
    v: &Option<T>,
    what: &str,
) -> Result<Option<String>, PgError> {
    v.as_ref().map(|v| json_text(v, what)).transpose()
}

pub(super) fn from_json<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<T, PgError> {
    serde_json::from_str(s).map_err(|e| PgError::Corrupt(format!("{what}: {e}")))
}

/// A row of [`REQUEST_COLUMNS`] as a record.
pub(super) fn request_from(row: &Row) -> Result<RequestRecord, PgError> {
    let error: Option<String> = row.try_get(15)?;
    let webhook: Option<String> = row.try_get(16)?;
    let attempts: i32 = row.try_get(11)?;
    Ok(RequestRecord {
        id: to_u64(row.try_get(0)?, "request id")?,
        tenant: row.try_get(1)?,
        custom_id: row.try_get(2)?,
        endpoint: super::queues::endpoint_from(row.try_get(18)?)?,
        inputs: to_u64(row.try_get(19)?, "inputs")?,
        upstream: row.try_get(3)?,
        model: row.try_get(4)?,
        body_sha256: row.try_get(5)?,
        body_len: to_u64(row.try_get(6)?, "body length")?,
        callback_url: row.try_get(7)?,
        stream: row.try_get(8)?,
        created_at: to_u64(row.try_get(9)?, "created_at")?,
        status: status_from(row.try_get(10)?)?,
        attempts: u32::try_from(attempts)
            .map_err(|_| PgError::Corrupt(format!("attempts is {attempts}")))?,
        batch: opt_to_u64(row.try_get(12)?, "batch")?,
        submitted_at: opt_to_u64(row.try_get(13)?, "submitted_at")?,
        completed_at: opt_to_u64(row.try_get(14)?, "completed_at")?,
        error: error
            .map(|e| from_json::<RequestError>(&e, "request error"))
            .transpose()?,
        webhook: webhook
            .map(|w| from_json::<WebhookState>(&w, "webhook state"))
            .transpose()?,
        batch_id: row.try_get(17)?,
        deadline_at: opt_to_u64(row.try_get(20)?, "deadline_at")?,
        // A batch record without a lane is a Batch API job.
        lane: lane_from(row.try_get::<_, Option<i64>>(12)?, row.try_get(21)?)?,
    })
}

/// The lane of a request's batch, from the batch record's `lane` (absent:
/// a Batch API job); none without a batch.
pub(super) fn lane_from(batch: Option<i64>, lane: Option<String>) -> Result<Option<Lane>, PgError> {
    match (batch, lane) {
        (None, _) => Ok(None),
        (Some(_), None) => Ok(Some(Lane::Batch)),
        (Some(_), Some(l)) => Lane::parse(&l)
            .map(Some)
            .ok_or_else(|| PgError::Corrupt(format!("batch lane {l:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_column_count_counts_the_request_columns() {
        assert_eq!(REQUEST_COLUMNS.split(',').count(), REQUEST_COLUMN_COUNT);
    }

    #[test]
    fn statuses_round_trip_through_their_names() {
        use RequestStatus::*;
        for s in [Queued, Submitted, Completed, Failed, Expired, Cancelled] {
            assert_eq!(status_from(s.as_str()).unwrap(), s);
        }
        assert!(status_from("done").is_err());
    }

    #[test]
    fn values_beyond_bigint_are_refused_not_wrapped() {
        assert!(matches!(
            to_i64(u64::MAX, "x"),
            Err(PgError::OutOfRange("x"))
        ));
        assert_eq!(to_i64(7, "x").unwrap(), 7);
        assert!(to_u64(-1, "x").is_err());
    }
}
