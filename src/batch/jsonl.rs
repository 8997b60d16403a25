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
    futures::stream::unfold(
        (store, members, 0usize),
        |(store, members, mut next)| async move {
            if next >= members.len() {
                return None;
            }
            let mut buf = BytesMut::with_capacity(CHUNK_BYTES + 4096);
            while next < members.len() && buf.len() < CHUNK_BYTES {
                let id = members[next];
                next += 1;
                match store.body(id) {
                    Ok(Some(body)) => {
                        buf.extend_from_slice(line_prefix(id).as_bytes());
                        buf.extend_from_slice(&body);
                        buf.extend_from_slice(LINE_SUFFIX.as_bytes());
                    }
                    Ok(None) => {
                        let e = std::io::Error::other(format!("body of request {id} is missing"));
                        return Some((Err(e), (store, members, usize::MAX)));
                    }
                    Err(e) => {
                        return Some((
                            Err(std::io::Error::other(e.to_string())),
                            (store, members, usize::MAX),
                        ));
                    }
                }
            }
            Some((Ok(buf.freeze()), (store, members, next)))
        },
    )
}
