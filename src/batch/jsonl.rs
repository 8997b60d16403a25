//! The JSONL input file, streamed from the store chunk by chunk so that a
//! 200 MB batch never sits in memory whole.

use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;

use crate::store::Store;

/// Lines gathered before a chunk is handed to the HTTP body.
const CHUNK_BYTES: usize = 256 * 1024;

/// A stream of the batch's input file: one line per member, in member (id)
/// order, so that line N of the file is the N-th member — which is how
/// validation errors (numbered by line) are mapped back to requests.
pub fn stream_batch(
    store: Arc<Store>,
    endpoint: crate::endpoint::Endpoint,
    members: Vec<u64>,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static {
    let members: Arc<[u64]> = members.into();
    futures::stream::unfold(0usize, move |next| {
        let (store, members) = (store.clone(), members.clone());
        async move {
            if next >= members.len() {
                return None;
            }
            // A task of its own: the HTTP body wants a `Sync` stream, and a
            // store read's future need not be (a pooled connection's is not).
            let read = tokio::spawn(async move {
                store
                    .input_lines(endpoint, members, next, CHUNK_BYTES)
                    .await
            });
            match read.await {
                Ok(Ok((bytes, next))) => Some((Ok(bytes), next)),
                Ok(Err(e)) => Some((Err(std::io::Error::other(e.to_string())), usize::MAX)),
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), usize::MAX)),
            }
        }
    })
}
