//! The JSONL input file, streamed from the store chunk by chunk so that a
//! 200 MB batch never sits in memory whole.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::Stream;

use crate::store::{LINE_SUFFIX, Store, line_prefix};

/// Lines gathered before a chunk is handed to the HTTP body.
const CHUNK_BYTES: usize = 256 * 1024;

/// A stream of the batch's input file: one line per member, in member (id)
/// order, so that line N of the file is the N-th member — which is how
/// validation errors (numbered by line) are mapped back to requests.
pub fn stream_batch(
    store: Arc<Store>,
    members: Vec<u64>,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static {
    let members: Arc<[u64]> = members.into();
    futures::stream::unfold(0usize, move |next| {
        let (store, members) = (store.clone(), members.clone());
        async move {
            if next >= members.len() {
                return None;
            }
            // Reading a chunk's bodies is disk work: off the runtime threads.
            let chunk = tokio::task::spawn_blocking(move || chunk(&store, &members, next))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            match chunk {
                Ok((bytes, next)) => Some((Ok(bytes), next)),
                Err(e) => Some((Err(e), usize::MAX)),
            }
        }
    })
}

/// The lines of members from `next` on, up to about [`CHUNK_BYTES`];
/// returns them and the index of the first member not taken.
fn chunk(
    store: &Store,
    members: &[u64],
    mut next: usize,
) -> Result<(Bytes, usize), std::io::Error> {
    let mut buf = BytesMut::with_capacity(CHUNK_BYTES + 4096);
    while next < members.len() && buf.len() < CHUNK_BYTES {
        let id = members[next];
        next += 1;
        let body = store
            .body(id)
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .ok_or_else(|| std::io::Error::other(format!("body of request {id} is missing")))?;
        buf.extend_from_slice(line_prefix(id).as_bytes());
        buf.extend_from_slice(&body);
        buf.extend_from_slice(LINE_SUFFIX.as_bytes());
    }
    Ok((buf.freeze(), next))
}
