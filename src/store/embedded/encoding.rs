//! How the store lays its data out in sled: keys (big-endian, so that
//! sled's order is numeric order), the small fixed-size values, and the
//! fixed parts of the JSONL line each request becomes.

use super::{RequestRecord, StoreError, corrupt, upstream_custom_id};
use crate::endpoint::Endpoint;

/// A queue: requests for one endpoint of one model of one upstream,
/// flushed together (an input file holds one endpoint and one model, as
/// the providers require).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueKey {
    pub upstream: String,
    pub endpoint: Endpoint,
    pub model: String,
}

/// Marks the endpoint segment of a non-chat queue key. Model names refuse
/// control characters at intake, so no model name starts with it.
const ENDPOINT_MARK: u8 = 0x01;

impl QueueKey {
    /// The queue a request belongs to.
    pub fn of(rec: &RequestRecord) -> QueueKey {
        QueueKey {
            upstream: rec.upstream.clone(),
            endpoint: rec.endpoint,
            model: rec.model.clone(),
        }
    }

    /// A chat completions queue (the only kind stores written before
    /// endpoints hold).
    pub fn chat(upstream: &str, model: &str) -> QueueKey {
        QueueKey {
            upstream: upstream.to_owned(),
            endpoint: Endpoint::ChatCompletions,
            model: model.to_owned(),
        }
    }

    /// `upstream\0model\0` for chat, the layout stores written before
    /// endpoints use, so their queued requests stay where they are;
    /// `upstream\0\x01<endpoint label>\0model\0` for every other endpoint.
    pub(super) fn prefix(&self) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.upstream.len() + self.model.len() + 16);
        k.extend_from_slice(self.upstream.as_bytes());
        k.push(0);
        if self.endpoint != Endpoint::ChatCompletions {
            k.push(ENDPOINT_MARK);
            k.extend_from_slice(self.endpoint.label().as_bytes());
            k.push(0);
        }
        k.extend_from_slice(self.model.as_bytes());
        k.push(0);
        k
    }

    pub(super) fn entry(&self, id: u64) -> Vec<u8> {
        let mut k = self.prefix();
        k.extend_from_slice(&id.to_be_bytes());
        k
    }

    /// The queue and request id of a queue key; `None` for a key no
    /// [`QueueKey::entry`] writes (an unknown endpoint segment, or the chat
    /// endpoint spelt as a segment).
    pub(super) fn parse_entry(key: &[u8]) -> Option<(QueueKey, u64)> {
        let (head, id) = key.split_at(key.len().checked_sub(8)?);
        let id = u64::from_be_bytes(id.try_into().ok()?);
        let head = head.strip_suffix(&[0])?;
        let sep = head.iter().position(|b| *b == 0)?;
        let upstream = String::from_utf8(head[..sep].to_vec()).ok()?;
        let rest = &head[sep + 1..];
        let (endpoint, model) = match rest.strip_prefix(&[ENDPOINT_MARK]) {
            None => (Endpoint::ChatCompletions, rest),
            Some(tagged) => {
                let end = tagged.iter().position(|b| *b == 0)?;
                let endpoint = Endpoint::from_label(std::str::from_utf8(&tagged[..end]).ok()?)?;
                if endpoint == Endpoint::ChatCompletions {
                    return None;
                }
                (endpoint, &tagged[end + 1..])
            }
        };
        Some((
            QueueKey {
                upstream,
                endpoint,
                model: String::from_utf8(model.to_vec()).ok()?,
            },
            id,
        ))
    }
}

/// A queue entry's value: when it was enqueued, its line's length, the
/// inputs it counts against a per-batch input cap, and its request's
/// deadline (unix seconds, 0 for none), from which the deadline index is
/// rebuilt at open.
pub(super) fn queue_value(
    enqueued_ms: u64,
    line_len: u64,
    inputs: u64,
    deadline_at: Option<u64>,
) -> [u8; 32] {
    let mut v = [0u8; 32];
    v[..8].copy_from_slice(&enqueued_ms.to_be_bytes());
    v[8..16].copy_from_slice(&line_len.to_be_bytes());
    v[16..24].copy_from_slice(&inputs.to_be_bytes());
    v[24..].copy_from_slice(&deadline_at.unwrap_or(0).to_be_bytes());
    v
}

/// The deadline of a queue entry's request; none for the shorter values of
/// stores written before deadlines.
pub(super) fn parse_queue_deadline(v: &[u8]) -> Option<u64> {
    v.get(24..32)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .filter(|d| *d != 0)
}

/// The inputs of a queue entry; one for the 16-byte values of stores
/// written before inputs were counted (all chat, one input each).
pub(super) fn parse_queue_inputs(v: &[u8]) -> u64 {
    v.get(16..24)
        .and_then(|b| b.try_into().ok())
        .map_or(1, u64::from_be_bytes)
}

pub(super) fn parse_queue_value(v: &[u8]) -> Option<(u64, u64)> {
    let a = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let b = u64::from_be_bytes(v.get(8..16)?.try_into().ok()?);
    Some((a, b))
}

pub(super) fn custom_id_key(tenant: &str, custom_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + custom_id.len() + 1);
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(custom_id.as_bytes());
    k
}

pub(super) fn member_key(batch: u64, id: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&batch.to_be_bytes());
    k[8..].copy_from_slice(&id.to_be_bytes());
    k
}

/// Key of the `terminal` index: when the request finished, then its id,
/// so that sled's order is oldest first.
pub(super) fn terminal_key(completed_at: u64, id: u64) -> [u8; 16] {
    member_key(completed_at, id)
}

/// The (completed-at, id) of a `terminal` key.
pub(super) fn parse_terminal_key(k: &[u8]) -> Result<(u64, u64), StoreError> {
    if k.len() != 16 {
        return Err(corrupt("terminal index key", "not 16 bytes"));
    }
    Ok((id_from(&k[..8])?, id_from(&k[8..])?))
}

/// The ids of one `members` entry: packed in the value, or, in stores
/// written before members were packed, the key's own id with an empty value.
pub(super) fn unpack_members(
    item: sled::Result<(sled::IVec, sled::IVec)>,
) -> Result<Vec<u64>, StoreError> {
    let (k, v) = item?;
    if v.is_empty() {
        return Ok(vec![id_from(
            k.get(8..16).ok_or_else(|| corrupt("member key", "short"))?,
        )?]);
    }
    if v.len() % 8 != 0 {
        return Err(corrupt("members", "length not a multiple of 8"));
    }
    v.chunks_exact(8).map(id_from).collect()
}

pub(super) fn encode_record(rec: &RequestRecord) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(rec).map_err(|e| corrupt("record", e))
}

pub(super) fn id_from(bytes: &[u8]) -> Result<u64, StoreError> {
    Ok(u64::from_be_bytes(
        bytes.try_into().map_err(|_| corrupt("id", "not 8 bytes"))?,
    ))
}

/// Bytes of the JSONL line for a request to `endpoint` whose body is
/// `body_len` long:
/// `{"custom_id":"ferry-<id>","method":"POST","url":"<endpoint>","body":<body>}\n`.
pub fn line_len(endpoint: Endpoint, id: u64, body_len: u64) -> u64 {
    (line_prefix(endpoint, id).len() + LINE_SUFFIX.len()) as u64 + body_len
}

pub fn line_prefix(endpoint: Endpoint, id: u64) -> String {
    format!(
        "{{\"custom_id\":\"{}\",\"method\":\"POST\",\"url\":\"{}\",\"body\":",
        upstream_custom_id(id),
        endpoint.path()
    )
}

pub const LINE_SUFFIX: &str = "}\n";
