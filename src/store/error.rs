//! The store layer's one error type, whichever backend holds the data.
//! It is mapped to HTTP once, at the proxy's edge.

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error(transparent)]
    Postgres(#[from] super::pg::PgError),
    #[error(transparent)]
    Lifecycle(#[from] super::lifecycle::IllegalMove),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("durable flush failed: {0}")]
    Flush(String),
    #[error(
        "data_dir has {free} bytes free, under the {min_free} Ferry keeps free \
         (server.min_free_mb): {waiting} wait until space returns"
    )]
    LowSpace {
        free: u64,
        min_free: u64,
        waiting: &'static str,
    },
    #[error("another request with this custom id is being stored; retry")]
    Busy,
    #[error("it is locked by another process: is a second Ferry running on this data_dir?")]
    InUse,
    #[error("a storage task did not finish: {0}")]
    Task(String),
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: String,
        source: std::io::Error,
    },
}

pub(crate) fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}
