//! PostgreSQL, the shared store of a Ferry cluster: several nodes on one
//! database, each stateless apart from what it holds in memory.
//!
//! Files: `migrate` (the versioned schema), `store` ([`PgStore`], reads
//! and row decoding), `requests` (one intake's rows, and cancel),
//! `intake_writer` (intakes grouped into shared transactions), `intake_rows`
//! (a round's intakes written as sets), `queues` (queue
//! counters and claims), `batches` (batch records and their members'
//! steps), `escalations` (requests also sent on a synchronous lane out
//! of a submitted batch), `outcomes` (a finished batch's results), `outbox` (webhook
//! deliveries, leased per node), `leases` (named leases with fencing
//! tokens), `nodes` (the cluster's members), `retention` (purging finished
//! work in bounded slices), [`events`] (LISTEN/NOTIFY between nodes). The decisions
//! themselves are shared with the embedded store, in [`super::lifecycle`];
//! the store operations mirror the embedded store's method by method, each
//! one transaction (intakes arriving together share one), durable on return.

mod batches;
mod escalations;
pub mod events;
mod intake_rows;
mod intake_writer;
mod leases;
pub mod migrate;
mod nodes;
mod outbox;
mod outcomes;
mod queues;
mod requests;
mod retention;
mod store;

pub use store::{PgStore, SyncPayloadFn};

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

/// Errors of the PostgreSQL layer.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("bad PostgreSQL connection URL: {0}")]
    Url(String),
    #[error("PostgreSQL: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("cannot get a PostgreSQL connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("the PostgreSQL connection closed")]
    Closed,
    #[error("cannot build the PostgreSQL pool: {0}")]
    Build(String),
    #[error(
        "the database is at schema version {found}, newer than this Ferry knows ({known}): \
         upgrade this node, or point it at another database"
    )]
    SchemaTooNew { found: i32, known: i32 },
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Lifecycle(#[from] super::lifecycle::IllegalMove),
    #[error("{0} is out of PostgreSQL's range")]
    OutOfRange(&'static str),
    #[error("{0}")]
    Writer(&'static str),
    /// The shared transaction of an intake round failed: every call in it
    /// gets this one error.
    #[error("{0}")]
    Round(std::sync::Arc<PgError>),
}

/// Parses a connection URL (`postgres://user@host:port/db?...`).
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, PgError> {
    url.parse().map_err(|e: tokio_postgres::Error| {
        // The URL may carry a password: name the problem, never the URL.
        PgError::Url(e.to_string())
    })
}

/// How long making a connection may take, unless the URL sets
/// `connect_timeout`: an unreachable database must fail calls, not hang them.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a call waits for a pooled connection when all are busy.
const WAIT_TIMEOUT: Duration = Duration::from_secs(10);

/// `config` with [`CONNECT_TIMEOUT`] unless it sets its own.
pub fn with_connect_timeout(mut config: tokio_postgres::Config) -> tokio_postgres::Config {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config
}

/// A pool of at most `size` connections. Connections are made lazily, so
/// this does not touch the network; the first query does.
pub fn pool(config: tokio_postgres::Config, size: usize) -> Result<Pool, PgError> {
    let config = with_connect_timeout(config);
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            // A connection a query left broken is noticed by the next
            // query's error; a check before every checkout would cost a
            // round trip per call.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(WAIT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| PgError::Build(e.to_string()))
}
