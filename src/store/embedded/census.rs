//! The sled side of the census ([`crate::store::census`]): one tree, one
//! bounded chunk at a time.

use super::*;
use crate::store::census::{KINDS, Kind, Tally};

/// Entries a census reads per blocking call.
const CHUNK: usize = 10_000;

impl SledStore {
    /// Rows and bytes of each kind, a chunk per blocking call, so intake
    /// and lookups go between chunks.
    pub async fn census(self: &Arc<Self>) -> Result<Vec<(Kind, Tally)>, StoreError> {
        let mut out = Vec::new();
        for kind in KINDS {
            let mut total = Tally::default();
            let mut after = None;
            loop {
                let (tally, next) = self
                    .blocking(move |s| s.census_chunk(kind, after, CHUNK))
                    .await?;
                total.add(tally);
                match next {
                    Some(k) => after = Some(k),
                    None => break,
                }
            }
            out.push((kind, total));
        }
        Ok(out)
    }

    /// Counts up to `max` entries of `kind`'s tree after the key `after`
    /// (from the start: `None`); returns them and the key to go on after,
    /// or `None` at the tree's end.
    pub fn census_chunk(
        &self,
        kind: Kind,
        after: Option<Vec<u8>>,
        max: usize,
    ) -> Result<(Tally, Option<Vec<u8>>), StoreError> {
        let tree = match kind {
            Kind::Request => &self.requests,
            Kind::Body => &self.bodies,
            Kind::Result => &self.results,
            Kind::Batch => &self.batches,
            Kind::Member => &self.members,
            Kind::Webhook => &self.outbox,
            Kind::Queue => &self.queue,
        };
        let range = match &after {
            Some(k) => tree.range::<&[u8], _>((
                std::ops::Bound::Excluded(k.as_slice()),
                std::ops::Bound::Unbounded,
            )),
            None => tree.iter(),
        };
        let mut tally = Tally::default();
        let (mut entries, mut last) = (0, None);
        for item in range.take(max) {
            let (k, v) = item?;
            tally.rows += match kind {
                // A members entry packs a slice of a batch's request ids.
                Kind::Member if !v.is_empty() => (v.len() / 8) as u64,
                _ => 1,
            };
            tally.bytes += (k.len() + v.len()) as u64;
            entries += 1;
            last = Some(k);
        }
        // A chunk cut at its size may have more after it.
        let next = if entries == max {
            last.map(|k| k.to_vec())
        } else {
            None
        };
        Ok((tally, next))
    }
}
