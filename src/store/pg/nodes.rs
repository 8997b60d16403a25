//! The cluster's members: each node writes its row on a timer, and a row
//! not written for a lease time is a node that is gone. Upstreams are spread
//! over the members that are there (see `batch::ownership`).

use std::time::Duration;

use super::PgError;
use super::store::PgStore;

/// Rows of nodes gone this long are deleted, so the table does not grow
/// with every node that ever ran.
const FORGET_AFTER_SECS: f64 = 86_400.0;

impl PgStore {
    /// Records this node as present, and returns the names of the nodes
    /// present within `ttl` (this one included), sorted.
    pub async fn heartbeat(&self, ttl: Duration) -> Result<Vec<String>, PgError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO nodes (name, seen_at) VALUES ($1, now()) \
                 ON CONFLICT (name) DO UPDATE SET seen_at = now()",
                &[&self.owner],
            )
            .await?;
        client
            .execute(
                "DELETE FROM nodes WHERE seen_at < now() - $1::float8 * interval '1 second'",
                &[&FORGET_AFTER_SECS],
            )
            .await?;
        let rows = client
            .query(
                "SELECT name FROM nodes \
                 WHERE seen_at > now() - $1::float8 * interval '1 millisecond' ORDER BY name",
                &[&(ttl.as_millis() as f64)],
            )
            .await?;
        rows.iter()
            .map(|r| r.try_get(0).map_err(PgError::from))
            .collect()
    }

    /// Removes this node from the members, at shutdown, so the others stop
    /// counting on it at once rather than after a lease time.
    pub async fn leave(&self) -> Result<(), PgError> {
        self.client()
            .await?
            .execute("DELETE FROM nodes WHERE name = $1", &[&self.owner])
            .await?;
        Ok(())
    }
}
