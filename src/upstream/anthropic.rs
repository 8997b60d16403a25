//! The seam between Ferry's batch driver, written for OpenAI's files and
//! batches, and Anthropic's Message Batches (requests inline, results at a
//! URL): the client speaks Anthropic and hands the driver OpenAI's shapes.
//!
//! - The input file's JSONL lines (`{"custom_id","method","url","body"}`)
//!   become the create body `{"requests":[{"custom_id","params"},...]}`,
//!   converted chunk by chunk as the store streams them, never whole.
//! - A `message_batch` becomes a [`BatchObject`]: `in_progress` stays,
//!   `canceling` is `cancelling`, `ended` is `cancelled` after a cancel,
//!   `expired` when requests expired, else `completed`; an ended batch's
//!   "output file" is the batch id itself (its results).
//! - Each result line becomes an OpenAI output line, so ingestion matches
//!   and classifies them as it does OpenAI's: `succeeded` → status 200 and
//!   the `message`, `errored` → the error's status and body, `canceled` /
//!   `expired` → `batch_cancelled` / `batch_expired`.
//!
//! Anthropic batches carry no metadata, so a create that may have happened
//! before a crash is found by its requests' `custom_id`s: each is
//! `f<instance>-<ferry batch>-<request>` (at most 59 characters of
//! `[a-zA-Z0-9-]`), and a batch whose first result carries this instance's
//! and this batch's prefix is this batch. Another Ferry has another instance
//! id and another client's ids do not start with it.

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{BatchClient, BatchObject, UpstreamError};

pub mod time;

/// The `custom_id` prefix of the requests of one Ferry batch.
pub fn custom_id_prefix(instance: &str, batch: u64) -> String {
    format!("f{instance}-{batch}-")
}

/// One input line as a request of the create body; Ferry's own
/// `ferry-<request>` id becomes `<prefix><request>`.
pub fn request_item(line: &[u8], prefix: &str) -> Result<Vec<u8>, String> {
    #[derive(Deserialize)]
    struct Line<'a> {
        #[serde(borrow)]
        custom_id: &'a str,
        #[serde(borrow)]
        body: &'a serde_json::value::RawValue,
    }
    let line: Line = serde_json::from_slice(line).map_err(|e| format!("input line: {e}"))?;
    let request = line
        .custom_id
        .strip_prefix("ferry-")
        .ok_or_else(|| format!("input line: custom_id {:?} is not Ferry's", line.custom_id))?;
    let custom_id = format!("{prefix}{request}");
    let mut out = Vec::with_capacity(line.body.get().len() + custom_id.len() + 32);
    out.extend_from_slice(b"{\"custom_id\":");
    out.extend_from_slice(Value::String(custom_id).to_string().as_bytes());
    out.extend_from_slice(b",\"params\":");
    out.extend_from_slice(line.body.get().as_bytes());
    out.push(b'}');
    Ok(out)
}

/// The create body, streamed: `{"requests":[` + each line of `lines` as a
/// request + `]}`. `lines` yields whole lines (the store's chunks do).
pub fn requests_body<S>(
    lines: S,
    prefix: String,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
{
    let open = futures::stream::once(async { Ok(Bytes::from_static(b"{\"requests\":[")) });
    let items = lines.scan(true, move |first, chunk| {
        let out = chunk.and_then(|chunk| {
            let mut out = BytesMut::with_capacity(chunk.len() + 64);
            for line in chunk.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                if !std::mem::replace(first, false) {
                    out.extend_from_slice(b",");
                }
                let item = request_item(line, &prefix).map_err(std::io::Error::other)?;
                out.extend_from_slice(&item);
            }
            Ok(out.freeze())
        });
        futures::future::ready(Some(out))
    });
    let close = futures::stream::once(async { Ok(Bytes::from_static(b"]}")) });
    open.chain(items).chain(close)
}

/// The parts of a `message_batch` Ferry reads.
#[derive(Debug, Clone, Deserialize)]
pub struct MessageBatch {
    pub id: String,
    pub processing_status: String,
    #[serde(default)]
    pub request_counts: RequestCounts,
    #[serde(default)]
    pub cancel_initiated_at: Option<String>,
    #[serde(default)]
    pub results_url: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    pub created_at: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RequestCounts {
    #[serde(default)]
    pub processing: u64,
    #[serde(default)]
    pub succeeded: u64,
    #[serde(default)]
    pub errored: u64,
    #[serde(default)]
    pub canceled: u64,
    #[serde(default)]
    pub expired: u64,
}

impl MessageBatch {
    /// `created_at` as unix seconds, if it reads as RFC 3339.
    pub fn created_secs(&self) -> Option<u64> {
        self.created_at.as_deref().and_then(time::unix_secs)
    }
}

impl RequestCounts {
    pub fn total(&self) -> u64 {
        self.processing + self.succeeded + self.errored + self.canceled + self.expired
    }
}

/// The batch as the driver reads batches (see the module's doc).
pub fn batch_object(b: &MessageBatch) -> BatchObject {
    let ended = b.processing_status == "ended";
    let status = match b.processing_status.as_str() {
        "canceling" => "cancelling",
        "ended" if b.cancel_initiated_at.is_some() => "cancelled",
        "ended" if b.request_counts.expired > 0 => "expired",
        "ended" => "completed",
        _ => "in_progress",
    };
    BatchObject {
        id: b.id.clone(),
        status: status.to_owned(),
        output_file_id: ended.then(|| b.id.clone()),
        error_file_id: None,
        errors: None,
        metadata: None,
        input_file_id: None,
        created_at: b.created_secs(),
    }
}

/// The HTTP status Anthropic answers with an error `type`.
pub fn status_of(error_type: &str) -> u16 {
    match error_type {
        "authentication_error" => 401,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "api_error" => 500,
        "overloaded_error" => 529,
        _ => 400,
    }
}

/// A result line as an OpenAI output line with Ferry's own `custom_id`
/// (`ferry-<request>`), or `None` when its id does not carry `prefix`.
pub fn output_line(result: &Value, prefix: &str) -> Option<Value> {
    let request = result.get("custom_id")?.as_str()?.strip_prefix(prefix)?;
    let custom_id = format!("ferry-{request}");
    let r = result.get("result").unwrap_or(&Value::Null);
    let line = match r.get("type").and_then(Value::as_str) {
        Some("succeeded") => json!({"custom_id": custom_id, "error": null,
            "response": {"status_code": 200, "body": r.get("message").cloned().unwrap_or(Value::Null)}}),
        Some("errored") => {
            let body = r.get("error").cloned().unwrap_or(Value::Null);
            let status = body
                .pointer("/error/type")
                .and_then(Value::as_str)
                .map_or(500, status_of);
            json!({"custom_id": custom_id, "error": null,
                "response": {"status_code": status, "body": body}})
        }
        Some("canceled") => json!({"custom_id": custom_id, "response": null,
            "error": {"code": "batch_cancelled", "message": "The request was canceled with its batch."}}),
        Some("expired") => json!({"custom_id": custom_id, "response": null,
            "error": {"code": "batch_expired", "message": "The batch ended before this request was processed."}}),
        _ => json!({"custom_id": custom_id, "response": null,
            "error": {"code": "server_error", "message": "The upstream sent a result of an unknown type."}}),
    };
    Some(line)
}

/// The results stream (JSONL, chunks cut anywhere, the last line with or
/// without its newline) as OpenAI output lines of this batch, one per line.
pub fn output_lines<S>(
    results: S,
    prefix: String,
) -> impl Stream<Item = Result<Bytes, UpstreamError>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, UpstreamError>> + Send + 'static,
{
    // `None` marks the end, where a last line without a newline is flushed.
    let marked = results
        .map(Some)
        .chain(futures::stream::once(futures::future::ready(None)));
    marked.scan(BytesMut::new(), move |partial, chunk| {
        let mut out = BytesMut::new();
        let result = match chunk {
            Some(Err(e)) => Err(e),
            Some(Ok(chunk)) => {
                partial.extend_from_slice(&chunk);
                while let Some(end) = partial.iter().position(|b| *b == b'\n') {
                    let line = partial.split_to(end + 1);
                    convert(&line[..end], &prefix, &mut out);
                }
                Ok(out.freeze())
            }
            None => {
                let rest = std::mem::take(partial);
                convert(&rest, &prefix, &mut out);
                Ok(out.freeze())
            }
        };
        futures::future::ready(Some(result))
    })
}

/// The `custom_id` of a result line, if it is one.
fn first_custom_id(line: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Line {
        custom_id: String,
    }
    serde_json::from_slice::<Line>(line)
        .ok()
        .map(|l| l.custom_id)
}

fn convert(line: &[u8], prefix: &str, out: &mut BytesMut) {
    let Ok(v) = serde_json::from_slice::<Value>(line) else {
        return;
    };
    if let Some(l) = output_line(&v, prefix) {
        out.extend_from_slice(l.to_string().as_bytes());
        out.extend_from_slice(b"\n");
    }
}

impl BatchClient {
    /// `POST /v1/messages/batches` with the requests streamed from `lines`.
    pub async fn create_message_batch<S>(
        &self,
        lines: S,
        prefix: String,
    ) -> Result<BatchObject, UpstreamError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
    {
        self.creations.until_ready().await;
        let body = reqwest::Body::wrap_stream(SyncStream::new(requests_body(lines, prefix)));
        let b: MessageBatch = self
            .json(
                "create_batch",
                self.http
                    .post(self.url("/messages/batches"))
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(body),
            )
            .await?;
        Ok(batch_object(&b))
    }

    /// `GET /v1/messages/batches/{id}`.
    pub async fn get_message_batch(&self, id: &str) -> Result<MessageBatch, UpstreamError> {
        self.json(
            "get_batch",
            self.http.get(self.url(&format!("/messages/batches/{id}"))),
        )
        .await
    }

    /// `GET /v1/messages/batches?limit=&after_id=`, newest first.
    pub async fn list_message_batches(
        &self,
        after_id: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<MessageBatch>, bool), UpstreamError> {
        #[derive(Deserialize)]
        struct Page {
            data: Vec<MessageBatch>,
            #[serde(default)]
            has_more: bool,
        }
        let mut url = self.url(&format!("/messages/batches?limit={limit}"));
        if let Some(a) = after_id {
            url.push_str("&after_id=");
            url.push_str(a);
        }
        let page: Page = self.json("list_batches", self.http.get(url)).await?;
        Ok((page.data, page.has_more))
    }

    /// The `custom_id` of an ended batch's first result line (`None` for a
    /// batch without results), reading no further than that line: every
    /// request of a batch Ferry made carries the same prefix, so the first
    /// tells whose the batch is.
    pub async fn first_result_custom_id(&self, id: &str) -> Result<Option<String>, UpstreamError> {
        let res = self
            .send(
                "download_file",
                self.http
                    .get(self.url(&format!("/messages/batches/{id}/results"))),
            )
            .await?;
        let mut chunks = Box::pin(res.bytes_stream());
        let mut line = BytesMut::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| UpstreamError::Transport(e.to_string()))?;
            match chunk.iter().position(|b| *b == b'\n') {
                Some(end) => {
                    line.extend_from_slice(&chunk[..end]);
                    break;
                }
                None => line.extend_from_slice(&chunk),
            }
        }
        Ok(first_custom_id(&line))
    }

    /// The results of an ended batch as OpenAI output lines of the Ferry
    /// batch `prefix` names (see [`output_lines`]).
    pub async fn message_batch_results(
        &self,
        id: &str,
        prefix: String,
    ) -> Result<impl Stream<Item = Result<Bytes, UpstreamError>> + Send + 'static, UpstreamError>
    {
        let res = self
            .send(
                "download_file",
                self.http
                    .get(self.url(&format!("/messages/batches/{id}/results"))),
            )
            .await?;
        let chunks = res
            .bytes_stream()
            .map(|c| c.map_err(|e| UpstreamError::Transport(e.to_string())));
        Ok(output_lines(chunks, prefix))
    }
}

/// A `Send` stream made `Sync` for reqwest's body (it is only ever polled
/// from one place; the mutex is never contended).
struct SyncStream<S> {
    inner: std::sync::Mutex<std::pin::Pin<Box<S>>>,
}

impl<S> SyncStream<S> {
    fn new(s: S) -> Self {
        SyncStream {
            inner: std::sync::Mutex::new(Box::pin(s)),
        }
    }
}

impl<S: Stream> Stream for SyncStream<S> {
    type Item = S::Item;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.as_mut().poll_next(cx)
    }
}

#[cfg(test)]
mod tests;
