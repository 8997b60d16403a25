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
use crate::store::BatchRecord;

/// `ttl` as the float milliseconds the SQL below multiplies an interval by.
fn ttl_ms(ttl: Duration) -> f64 {
    ttl.as_millis() as f64
}

impl PgStore {
    /// Takes the lease `name` for this node for `ttl`, and returns its
    /// fencing token; `None` while another node holds it. A free name
    /// starts at token 1; an expired lease of another node is taken over
    /// with its token plus one; this node's own lease is renewed with its
    /// token unchanged. A `ttl` of zero takes a lease that is already
    /// expired, which tests use to stand in for time passing.
    pub async fn acquire_lease(&self, name: &str, ttl: Duration) -> Result<Option<u64>, PgError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "INSERT INTO leases AS l (name, owner, token, expires_at) \
                 VALUES ($1, $2, 1, now() + $3::float8 * interval '1 millisecond') \
                 ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, \
                     expires_at = EXCLUDED.expires_at, \
                     token = CASE WHEN l.owner = EXCLUDED.owner THEN l.token \
                                  ELSE l.token + 1 END \
                 WHERE l.owner = EXCLUDED.owner OR l.expires_at <= now() \
                 RETURNING token",
                &[&name, &self.owner, &ttl_ms(ttl)],
            )
            .await?;
        row.map(|r| to_u64(r.try_get(0)?, "lease token"))
            .transpose()
    }

    /// Extends this node's lease `name` held under `token` by `ttl` from
    /// now. False once another node has taken it over (a newer token): the
    /// holder must stop the work the lease guards. A lease that ran out but
    /// that nobody took over is still this node's to renew, as its token is
    /// still the newest.
    pub async fn renew_lease(
        &self,
        name: &str,
        token: u64,
        ttl: Duration,
    ) -> Result<bool, PgError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE leases SET expires_at = now() + $4::float8 * interval '1 millisecond' \
                 WHERE name = $1 AND owner = $2 AND token = $3",
                &[
                    &name,
                    &self.owner,
                    &super::store::to_i64(token, "lease token")?,
                    &ttl_ms(ttl),
                ],
            )
            .await?;
        Ok(n == 1)
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
