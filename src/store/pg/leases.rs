//! Named leases for work one node of the cluster does at a time, with
//! fencing tokens. Expiry is judged by the database clock (`now()`), the
//! one clock every node shares. The token grows by one each time the lease
//! changes hands, so a write guarded by a token (see
//! [`PgStore::put_batch_fenced`]) is refused once a newer holder exists,
//! however late the old holder's write arrives.

use std::time::Duration;

use super::PgError;
use super::batches::put_batch_in;
use super::store::{PgStore, to_u64};
use crate::store::{BatchRecord, Grant};

/// `ttl` as the float milliseconds the SQL below multiplies an interval by.
fn ttl_ms(ttl: Duration) -> f64 {
    ttl.as_millis() as f64
}

impl PgStore {
    /// Takes the lease `name` for this node for `ttl`, or renews it, and
    /// returns its grant; `None` while another node holds it. A free name
    /// starts at token 1; this node's own lease is renewed with its token
    /// unchanged; an expired lease of another node is taken over with its
    /// token plus one. A node that is not `first` in line for the lease
    /// takes over only a lease expired for a further `ttl`, which leaves the
    /// node first in line the time to take it. A `first` node that finds the
    /// lease held marks itself as wanting it, so the holder hands it over.
    /// A `ttl` of zero takes a lease that is already expired, which tests
    /// use to stand in for time passing.
    pub async fn acquire_lease(
        &self,
        name: &str,
        ttl: Duration,
        first: bool,
    ) -> Result<Option<Grant>, PgError> {
        let grace = if first { 0.0 } else { ttl_ms(ttl) };
        let client = self.client().await?;
        let row = client
            .query_opt(
                "INSERT INTO leases AS l (name, owner, token, expires_at) \
                 VALUES ($1, $2, 1, now() + $3::float8 * interval '1 millisecond') \
                 ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, \
                     expires_at = EXCLUDED.expires_at, \
                     token = CASE WHEN l.owner = EXCLUDED.owner THEN l.token \
                                  ELSE l.token + 1 END, \
                     wanted_by = CASE WHEN l.owner = EXCLUDED.owner THEN l.wanted_by END \
                 WHERE l.owner = EXCLUDED.owner \
                    OR l.expires_at <= now() - $4::float8 * interval '1 millisecond' \
                 RETURNING token, wanted_by",
                &[&name, &self.owner, &ttl_ms(ttl), &grace],
            )
            .await?;
        let Some(row) = row else {
            if first {
                client
                    .execute(
                        "UPDATE leases SET wanted_by = $2 \
                         WHERE name = $1 AND owner <> $2 AND wanted_by IS DISTINCT FROM $2",
                        &[&name, &self.owner],
                    )
                    .await?;
            }
            return Ok(None);
        };
        Ok(Some(Grant {
            token: to_u64(row.try_get(0)?, "lease token")?,
            wanted_by: row.try_get(1)?,
        }))
    }

    /// Gives up this node's lease `name` held under `token`: it expires now,
    /// so the node first in line takes it at its next renewal. Nothing
    /// happens if another node holds it already.
    pub async fn release_lease(&self, name: &str, token: u64) -> Result<(), PgError> {
        self.client()
            .await?
            .execute(
                "UPDATE leases SET expires_at = now() \
                 WHERE name = $1 AND owner = $2 AND token = $3",
                &[
                    &name,
                    &self.owner,
                    &super::store::to_i64(token, "lease token")?,
                ],
            )
            .await?;
        Ok(())
    }

    /// [`put_batch`](Self::put_batch), but only while `token` is still the
    /// newest of lease `lease`: a node that lost the lease (paused, cut
    /// off) writes nothing. Returns whether the record was written.
    pub async fn put_batch_fenced(
        &self,
        b: &BatchRecord,
        lease: &str,
        token: u64,
    ) -> Result<bool, PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if !fence_in(&tx, lease, token).await? {
            return Ok(false);
        }
        put_batch_in(&tx, b).await?;
        tx.commit().await?;
        Ok(true)
    }
}

/// Whether `token` is still the newest of lease `lease`, inside `tx`. The
/// lease row stays locked (shared) until `tx` ends, so a takeover cannot
/// slip between this check and the transaction's writes.
pub(super) async fn fence_in(
    tx: &tokio_postgres::Transaction<'_>,
    lease: &str,
    token: u64,
) -> Result<bool, PgError> {
    Ok(tx
        .query_opt(
            "SELECT 1 FROM leases WHERE name = $1 AND token = $2 FOR SHARE",
            &[&lease, &super::store::to_i64(token, "lease token")?],
        )
        .await?
        .is_some())
}
