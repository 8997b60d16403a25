//! Schema migrations, run by every node at start. Versioned and append-only:
//! migration N is applied once, in order, and recorded in `ferry_schema`.
//! Two nodes starting at once are serialised by a transaction-scoped
//! advisory lock, so each migration runs exactly once; a node that finds a
//! version newer than it knows refuses to start rather than misread rows
//! written by a newer build.

use super::PgError;

/// The advisory lock key migrations hold (an arbitrary constant: "ferrymig").
const MIGRATION_LOCK: i64 = 0x6665_7272_796d_6967;

/// (version, SQL). Never edit an applied migration: add the next one.
pub const MIGRATIONS: &[(i32, &str)] = &[(1, V1), (2, V2), (3, V3), (4, V4), (5, V5), (6, V6)];

/// The newest schema this build knows.
pub fn known_version() -> i32 {
    MIGRATIONS.last().map_or(0, |(v, _)| *v)
}

/// Layout 1. Bodies and results live apart from the request rows that each
/// batch step updates, so a state change rewrites a small row, not a prompt.
/// Queue thresholds are read from `queue_counters`, kept in step by the
/// same transactions that add and remove queue rows, never by counting.
///
/// Invariant kept by every transaction: a request has a `queue` row exactly
/// while it is `queued` with no batch. Ids of requests and batches come
/// from one sequence, as in the embedded store.
const V1: &str = r#"
CREATE SEQUENCE ferry_ids;

CREATE TABLE requests (
    id            bigint   PRIMARY KEY,
    tenant        text     NOT NULL,
    custom_id     text     NOT NULL,
    upstream      text     NOT NULL,
    model         text     NOT NULL,
    body_sha256   text     NOT NULL,
    body_len      bigint   NOT NULL,
    callback_url  text,
    stream        boolean  NOT NULL,
    created_at    bigint   NOT NULL,
    status        text     NOT NULL CHECK (status IN
                      ('queued', 'submitted', 'completed', 'failed', 'expired', 'cancelled')),
    attempts      integer  NOT NULL DEFAULT 0,
    batch         bigint,
    submitted_at  bigint,
    completed_at  bigint,
    error         jsonb,
    webhook       jsonb,
    UNIQUE (tenant, custom_id)
);
-- Members' states are read and moved per batch.
CREATE INDEX requests_batch ON requests (batch) WHERE batch IS NOT NULL;

CREATE TABLE bodies (
    id   bigint PRIMARY KEY,
    body bytea  NOT NULL
);

CREATE TABLE results (
    id          bigint   PRIMARY KEY,
    status_code integer  NOT NULL,
    body        bytea    NOT NULL
);

-- Claims take a queue's rows in id (arrival) order: the primary key's.
CREATE TABLE queue (
    upstream    text   NOT NULL,
    model       text   NOT NULL,
    id          bigint NOT NULL,
    enqueued_ms bigint NOT NULL,
    line_len    bigint NOT NULL,
    PRIMARY KEY (upstream, model, id)
);
-- A re-queued request keeps its acceptance time, so the oldest entry is
-- not always the first by id.
CREATE INDEX queue_oldest ON queue (upstream, model, enqueued_ms);

CREATE TABLE queue_counters (
    upstream text   NOT NULL,
    model    text   NOT NULL,
    count    bigint NOT NULL DEFAULT 0,
    bytes    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (upstream, model)
);

-- `upstream_batch_id`, `live` and `upstream_objects` are derived from the
-- record by every write, for reads that must not parse every record.
CREATE TABLE batches (
    id                bigint  PRIMARY KEY,
    upstream          text    NOT NULL,
    live              boolean NOT NULL,
    upstream_batch_id text,
    upstream_objects  text[]  NOT NULL DEFAULT '{}',
    record            jsonb   NOT NULL
);
CREATE INDEX batches_live ON batches (upstream) WHERE live;
CREATE INDEX batches_objects ON batches USING gin (upstream_objects);

CREATE TABLE members (
    batch bigint NOT NULL,
    id    bigint NOT NULL,
    PRIMARY KEY (batch, id)
);

-- A row is taken by one node at a time: `lease_until` (database clock)
-- bounds how long a node that died while sending keeps it.
CREATE TABLE outbox (
    id          bigint PRIMARY KEY,
    due_ms      bigint NOT NULL,
    delivery    jsonb  NOT NULL,
    lease_owner text,
    lease_until timestamptz
);
CREATE INDEX outbox_due ON outbox (due_ms);

-- Named leases with fencing tokens: the token grows by one each time the
-- lease changes hands, and writes guarded by a lease carry it.
CREATE TABLE leases (
    name       text        PRIMARY KEY,
    owner      text        NOT NULL,
    token      bigint      NOT NULL,
    expires_at timestamptz NOT NULL
);

-- The cluster's instance id, written once by the first node: every node
-- names its uploads and batches with it, so any node adopts, sweeps and
-- deletes what another made (a sled data_dir keeps its own in a file).
CREATE TABLE cluster (
    one         boolean PRIMARY KEY DEFAULT true CHECK (one),
    instance_id text    NOT NULL
);
"#;

/// Layout 2: the cluster's members, so upstreams are spread across nodes.
/// Each node writes its row on a timer; a row not seen for a lease time is a
/// node that is gone. `wanted_by` is the node an upstream's lease should
/// move to (its rendezvous choice), so that the holder hands it over once
/// its drivers are between steps instead of waiting for it to expire.
const V2: &str = r#"
CREATE TABLE nodes (
    name    text        PRIMARY KEY,
    seen_at timestamptz NOT NULL
);
ALTER TABLE leases ADD COLUMN wanted_by text;
"#;

/// Layout 3: what the retention purge and start-up read by, so neither
/// walks the history. Terminal requests oldest first (only they have a
/// `completed_at`); finished batches oldest first; finished batches still
/// owing the upstream a file delete, read at every start.
const V3: &str = r#"
CREATE INDEX requests_completed ON requests (completed_at, id) WHERE completed_at IS NOT NULL;
CREATE INDEX batches_done ON batches (id) WHERE NOT live;
CREATE INDEX batches_owing_cleanup ON batches (upstream)
    WHERE NOT live AND cardinality(upstream_objects) > 0;
"#;

/// Layout 4: the endpoint of each request, and queues keyed by (upstream,
/// endpoint, model), since an input file holds one endpoint; the inputs a
/// request counts against a per-batch input cap (embeddings). Rows written
/// before are chat completions, the only endpoint there was, of one input.
const V4: &str = r#"
ALTER TABLE requests ADD COLUMN endpoint text NOT NULL DEFAULT '/v1/chat/completions';
ALTER TABLE requests ADD COLUMN inputs bigint NOT NULL DEFAULT 1;

ALTER TABLE queue ADD COLUMN endpoint text NOT NULL DEFAULT '/v1/chat/completions';
ALTER TABLE queue ADD COLUMN inputs bigint NOT NULL DEFAULT 1;
ALTER TABLE queue DROP CONSTRAINT queue_pkey;
ALTER TABLE queue ADD PRIMARY KEY (upstream, endpoint, model, id);
DROP INDEX queue_oldest;
CREATE INDEX queue_oldest ON queue (upstream, endpoint, model, enqueued_ms);

ALTER TABLE queue_counters ADD COLUMN endpoint text NOT NULL DEFAULT '/v1/chat/completions';
ALTER TABLE queue_counters ADD COLUMN inputs bigint NOT NULL DEFAULT 0;
UPDATE queue_counters SET inputs = count;
ALTER TABLE queue_counters DROP CONSTRAINT queue_counters_pkey;
ALTER TABLE queue_counters ADD PRIMARY KEY (upstream, endpoint, model);
"#;

/// Layout 5: each request's deadline (issue #17; rows written before have
/// none), and the index the escalation scan reads: requests still waiting
/// in a queue, by deadline. A batch's lane lives in its JSON record.
const V5: &str = r#"
ALTER TABLE requests ADD COLUMN deadline_at bigint;
CREATE INDEX requests_deadline ON requests (deadline_at, id)
    WHERE deadline_at IS NOT NULL AND status = 'queued' AND batch IS NULL;
"#;

/// Layout 6: a request escalated for its deadline out of a submitted
/// Batch API job is also sent alone on a synchronous lane (issue #17); it
/// stays in `batch` and names that batch of one here. `NULL` for every
/// other request.
const V6: &str = r#"
ALTER TABLE requests ADD COLUMN escalation bigint;
"#;

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// The version found before (0: an empty database).
    pub from: i32,
    /// The versions applied now, in order.
    pub applied: Vec<i32>,
}

/// Brings the database to [`known_version`], or refuses one that is newer.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<Migrated, PgError> {
    migrate_with(client, MIGRATIONS).await
}

/// [`migrate`] with a given list, so tests can stand in a newer build.
pub async fn migrate_with(
    client: &mut tokio_postgres::Client,
    migrations: &[(i32, &str)],
) -> Result<Migrated, PgError> {
    let known = migrations.last().map_or(0, |(v, _)| *v);
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS ferry_schema (
             version    integer     PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let from: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM ferry_schema", &[])
        .await?
        .get(0);
    let todo = pending(from, known, migrations)?;
    for (version, sql) in &todo {
        tx.batch_execute(sql).await?;
        tx.execute("INSERT INTO ferry_schema (version) VALUES ($1)", &[version])
            .await?;
        tracing::info!(version, "applied a schema migration");
    }
    tx.commit().await?;
    Ok(Migrated {
        from,
        applied: todo.iter().map(|(v, _)| *v).collect(),
    })
}

/// The migrations to apply to a database at `found`, or the refusal of a
/// database newer than this build.
fn pending<'a>(
    found: i32,
    known: i32,
    migrations: &'a [(i32, &'a str)],
) -> Result<Vec<(i32, &'a str)>, PgError> {
    if found > known {
        return Err(PgError::SchemaTooNew { found, known });
    }
    Ok(migrations
        .iter()
        .filter(|(v, _)| *v > found)
        .map(|(v, s)| (*v, *s))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_from_one_without_gaps() {
        for (i, (v, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*v as usize, i + 1);
        }
    }

    #[test]
    fn pending_applies_what_is_missing_and_refuses_the_future() {
        let m: &[(i32, &str)] = &[(1, "a"), (2, "b"), (3, "c")];
        assert_eq!(pending(0, 3, m).unwrap().len(), 3);
        assert_eq!(pending(2, 3, m).unwrap(), vec![(3, "c")]);
        assert!(pending(3, 3, m).unwrap().is_empty());
        assert!(matches!(
            pending(4, 3, m),
            Err(PgError::SchemaTooNew { found: 4, known: 3 })
        ));
    }
}
