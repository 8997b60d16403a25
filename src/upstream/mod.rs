//! Ferry's client for an upstream's Files and Batches API, and the provider
//! profiles. Every call waits for the upstream's shared rate limiter and
//! classifies failures as transient (retried with backoff) or permanent.

pub mod anthropic;
pub mod profile;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use tracing::{debug, warn};

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot reach the upstream: {0}")]
    Transport(String),
    #[error("upstream answered {status}: {message}")]
    Status {
        status: u16,
        code: Option<String>,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("upstream sent something Ferry cannot read: {0}")]
    Protocol(String),
}

impl UpstreamError {
    /// Worth retrying unchanged: network trouble, 408, 409 lock contention
    /// is not included (it is an answer), 429 and 5xx.
    pub fn is_transient(&self) -> bool {
        match self {
            UpstreamError::Transport(_) => true,
            UpstreamError::Status { status, .. } => {
                *status == 408 || *status == 429 || *status >= 500
            }
            UpstreamError::Protocol(_) => false,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            UpstreamError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The parts of a Batch object Ferry uses. Providers differ in which keys
/// they send (Moonshot omits `errors`, `model`, ...), so all are optional.
#[derive(Debug, Clone, Deserialize)]
pub struct BatchObject {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub output_file_id: Option<String>,
    #[serde(default)]
    pub error_file_id: Option<String>,
    #[serde(default)]
    pub errors: Option<BatchErrors>,
    #[serde(default)]
    pub metadata: Option<HashMap<String, serde_json::Value>>,
    #[serde(default)]
    pub input_file_id: Option<String>,
    /// Unix seconds.
    #[serde(default)]
    pub created_at: Option<u64>,
}

impl BatchObject {
    /// An empty string has been seen instead of null: both mean "none".
    pub fn output_file(&self) -> Option<&str> {
        self.output_file_id.as_deref().filter(|s| !s.is_empty())
    }

    pub fn error_file(&self) -> Option<&str> {
        self.error_file_id.as_deref().filter(|s| !s.is_empty())
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self.status.as_str(),
            "completed" | "failed" | "expired" | "cancelled"
        )
    }

    pub fn metadata_str(&self, key: &str) -> Option<&str> {
        self.metadata.as_ref()?.get(key)?.as_str()
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct BatchErrors {
    #[serde(default)]
    pub data: Vec<BatchErrorEntry>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BatchErrorEntry {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub param: Option<String>,
    /// 1-based line number in the input file.
    #[serde(default)]
    pub line: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FileObject {
    pub id: String,
    #[serde(default)]
    pub filename: Option<String>,
    #[serde(default)]
    pub bytes: Option<u64>,
    #[serde(default)]
    pub purpose: Option<String>,
}

#[derive(Debug, Deserialize)]
struct FileList {
    data: Vec<FileObject>,
    #[serde(default)]
    has_more: bool,
}

#[derive(Debug, Deserialize)]
pub struct BatchList {
    pub data: Vec<BatchObject>,
    #[serde(default)]
    pub has_more: bool,
}

/// The `(code, message)` of Anthropic's error body
/// `{"type":"error","error":{"type","message"}}`: its `type` is the code.
fn anthropic_error(body: &[u8]) -> (Option<String>, String) {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let code = v
        .pointer("/error/type")
        .and_then(|t| t.as_str())
        .map(str::to_owned);
    let message = v
        .pointer("/error/message")
        .and_then(|m| m.as_str())
        .map_or_else(
            || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
            str::to_owned,
        );
    (code, message)
}

/// A client for one upstream.
pub struct BatchClient {
    pub name: String,
    base_url: String,
    api_key: String,
    http: reqwest::Client,
    /// `Some` for an Anthropic upstream (see [`BatchClient::for_anthropic`]).
    anthropic_version: Option<String>,
    calls: DefaultDirectRateLimiter,
    creations: DefaultDirectRateLimiter,
    metrics: Arc<Metrics>,
}

impl BatchClient {
    pub fn new(
        name: &str,
        base_url: &str,
        api_key: &str,
        calls_per_second: u32,
        batches_per_hour: u32,
        ca_pem: Option<&[u8]>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, UpstreamError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| UpstreamError::Protocol(format!("upstream CA file: {e}")))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| UpstreamError::Transport(e.to_string()))?;
        let per_sec = NonZeroU32::new(calls_per_second).unwrap_or(NonZeroU32::MIN);
        let per_hour = NonZeroU32::new(batches_per_hour).unwrap_or(NonZeroU32::MIN);
        Ok(BatchClient {
            name: name.to_owned(),
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key: api_key.to_owned(),
            http,
            calls: RateLimiter::direct(Quota::per_second(per_sec)),
            anthropic_version: None,
            creations: RateLimiter::direct(
                Quota::per_hour(per_hour)
                    .allow_burst(per_hour.min(NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN))),
            ),
            metrics,
        })
    }

    /// Speaks to an Anthropic upstream: the key goes in `x-api-key` with
    /// `anthropic-version`, and Anthropic's error shape is read.
    pub fn for_anthropic(mut self, version: &str) -> Self {
        self.anthropic_version = Some(version.to_owned());
        self
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// `req` with the upstream's key in the header its API family reads.
    fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.anthropic_version {
            Some(version) => req
                .header("x-api-key", &self.api_key)
                .header("anthropic-version", version),
            None => req.bearer_auth(&self.api_key),
        }
    }

    async fn send(
        &self,
        op: &'static str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.calls.until_ready().await;
        let started = std::time::Instant::now();
        let res = self.authorized(req).send().await;
        let res = match res {
            Ok(r) => r,
            Err(e) => {
                self.metrics
                    .upstream_call(&self.name, op, "transport_error", started.elapsed());
                return Err(UpstreamError::Transport(e.to_string()));
            }
        };
        let status = res.status().as_u16();
        self.metrics
            .upstream_call(&self.name, op, &status.to_string(), started.elapsed());
        if res.status().is_success() {
            return Ok(res);
        }
        let retry_after = res
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(retry_after);
        let body = res.bytes().await.unwrap_or_default();
        let (code, message) = match serde_json::from_slice::<crate::api_error::ErrorEnvelope>(&body)
        {
            Ok(env) => (env.error.code, env.error.message),
            Err(_) if self.anthropic_version.is_some() => anthropic_error(&body),
            Err(_) => (
                None,
                String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
            ),
        };
        Err(UpstreamError::Status {
            status,
            code,
            message,
            retry_after,
        })
    }

    async fn json<T: for<'de> Deserialize<'de>>(
        &self,
        op: &'static str,
        req: reqwest::RequestBuilder,
    ) -> Result<T, UpstreamError> {
        let res = self.send(op, req).await?;
        let body = res
            .bytes()
            .await
            .map_err(|e| UpstreamError::Transport(e.to_string()))?;
        serde_json::from_slice(&body).map_err(|e| UpstreamError::Protocol(format!("{op}: {e}")))
    }

    /// Uploads a JSONL input file from a stream of exactly `len` bytes.
    pub async fn upload_jsonl<S>(
        &self,
        filename: &str,
        len: u64,
        body: S,
    ) -> Result<String, UpstreamError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
    {
        let part =
            reqwest::multipart::Part::stream_with_length(reqwest::Body::wrap_stream(body), len)
                .file_name(filename.to_owned())
                .mime_str("application/jsonl")
                .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .part("file", part);
        let f: FileObject = self
            .json(
                "upload_file",
                self.http.post(self.url("/files")).multipart(form),
            )
            .await?;
        Ok(f.id)
    }

    pub async fn create_batch(
        &self,
        input_file_id: &str,
        endpoint: crate::endpoint::Endpoint,
        completion_window: &str,
        metadata: serde_json::Value,
    ) -> Result<BatchObject, UpstreamError> {
        self.creations.until_ready().await;
        let body = serde_json::json!({
            "input_file_id": input_file_id,
            "endpoint": endpoint.path(),
            "completion_window": completion_window,
            "metadata": metadata,
        });
        self.json(
            "create_batch",
            self.http.post(self.url("/batches")).json(&body),
        )
        .await
    }

    /// Sends `body` to the synchronous `endpoint` (a deadline's flex or
    /// standard lane) and returns the upstream's answer, status code and
    /// body verbatim, when it is one to keep: a success, or a refusal of the
    /// request itself (a 4xx other than 408 and 429), stored as a batch
    /// line's error answer would be. What is worth retrying (network
    /// trouble, 408, 429, 5xx) is an error, with the upstream's error code
    /// (`resource_unavailable` for a flex call refused for capacity).
    pub async fn respond(
        &self,
        op: &'static str,
        endpoint: crate::endpoint::Endpoint,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), UpstreamError> {
        let path = endpoint.path();
        let req = self
            .http
            .post(self.url(path.strip_prefix("/v1").unwrap_or(path)))
            .header(http::header::CONTENT_TYPE, "application/json")
            .timeout(timeout)
            .body(body);
        self.calls.until_ready().await;
        let started = std::time::Instant::now();
        let res = match self.authorized(req).send().await {
            Ok(r) => r,
            Err(e) => {
                self.metrics
                    .upstream_call(&self.name, op, "transport_error", started.elapsed());
                return Err(UpstreamError::Transport(e.to_string()));
            }
        };
        let status = res.status().as_u16();
        let retry_after = res
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(retry_after);
        let body = res
            .bytes()
            .await
            .map_err(|e| UpstreamError::Transport(e.to_string()));
        self.metrics
            .upstream_call(&self.name, op, &status.to_string(), started.elapsed());
        let body = body?;
        if status == 408 || status == 429 || status >= 500 {
            let env = serde_json::from_slice::<crate::api_error::ErrorEnvelope>(&body).ok();
            return Err(UpstreamError::Status {
                status,
                code: env.as_ref().and_then(|e| e.error.code.clone()),
                message: env.map_or_else(
                    || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
                    |e| e.error.message,
                ),
                retry_after,
            });
        }
        Ok((status, body))
    }

    pub async fn get_batch(&self, id: &str) -> Result<BatchObject, UpstreamError> {
        self.json(
            "get_batch",
            self.http.get(self.url(&format!("/batches/{id}"))),
        )
        .await
    }

    pub async fn list_batches(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<BatchList, UpstreamError> {
        let mut url = self.url(&format!("/batches?limit={limit}"));
        if let Some(a) = after {
            // Batch ids are [A-Za-z0-9_-]; anything else is not ours to send.
            if a.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                url.push_str("&after=");
                url.push_str(a);
            }
        }
        self.json("list_batches", self.http.get(url)).await
    }

    /// Every input file of purpose `batch` (paged with `after`).
    pub async fn list_batch_files(&self) -> Result<Vec<FileObject>, UpstreamError> {
        let mut out: Vec<FileObject> = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..100 {
            let mut url = self.url("/files?purpose=batch&limit=10000");
            if let Some(a) = &after {
                url.push_str("&after=");
                url.push_str(a);
            }
            let page: FileList = self.json("list_files", self.http.get(url)).await?;
            let more = page.has_more;
            after = page.data.last().map(|f| f.id.clone());
            out.extend(page.data);
            if !more || after.is_none() {
                break;
            }
        }
        Ok(out)
    }

    /// Streams a file's content.
    pub async fn file_content(&self, id: &str) -> Result<reqwest::Response, UpstreamError> {
        self.send(
            "download_file",
            self.http.get(self.url(&format!("/files/{id}/content"))),
        )
        .await
    }

    pub async fn delete_file(&self, id: &str) -> Result<(), UpstreamError> {
        // Anthropic's batches take their requests inline: Ferry made no file.
        if self.anthropic_version.is_some() {
            return Ok(());
        }
        match self
            .send(
                "delete_file",
                self.http.delete(self.url(&format!("/files/{id}"))),
            )
            .await
        {
            Ok(_) => Ok(()),
            // Already gone is what we wanted.
            Err(UpstreamError::Status { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The longest `Retry-After` Ferry honours: a larger (or hostile) value
/// would park a batch step for days.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// An upstream's `Retry-After` in seconds, capped at [`MAX_RETRY_AFTER`].
pub fn retry_after(value: &str) -> Option<Duration> {
    let secs = value.trim().parse::<u64>().ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// Capped exponential backoff with full jitter: attempt 0 waits up to
/// `base`, each further attempt doubles the ceiling up to `cap`.
pub fn backoff(attempt: u32, base: Duration, cap: Duration, unit_random: f64) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.min(20)).min(cap);
    ceiling.mul_f64(unit_random.clamp(0.0, 1.0)).max(base / 4)
}

/// Runs `op` until it succeeds, fails permanently, or `max_attempts` transient
/// failures have happened; waits per [`backoff`] (or `Retry-After`) between
/// tries. Returns early with the last error when `shutdown` fires.
pub async fn with_retry<T, F, Fut>(
    upstream: &str,
    what: &str,
    max_attempts: u32,
    metrics: &Metrics,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    mut op: F,
) -> Result<T, UpstreamError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, UpstreamError>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && attempt + 1 < max_attempts && !*shutdown.borrow() => {
                let wait = e.retry_after().unwrap_or_else(|| {
                    backoff(
                        attempt,
                        Duration::from_millis(500),
                        Duration::from_secs(60),
                        rand::random(),
                    )
                });
                metrics.upstream_retries.inc();
                metrics
                    .upstream_backoff_seconds
                    .with_label_values(&[upstream])
                    .inc_by(wait.as_secs_f64());
                warn!(what, attempt, error = %e, wait_ms = wait.as_millis() as u64, "upstream call failed, retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => return Err(e),
                }
                attempt += 1;
            }
            Err(e) => {
                debug!(what, error = %e, "upstream call failed");
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(500);
        let cap = Duration::from_secs(60);
        assert_eq!(backoff(0, base, cap, 1.0), base);
        assert_eq!(backoff(3, base, cap, 1.0), Duration::from_secs(4));
        assert_eq!(backoff(30, base, cap, 1.0), cap);
        assert!(backoff(3, base, cap, 0.0) >= base / 4);
    }

    #[test]
    fn retry_after_is_read_in_seconds_and_capped() {
        assert_eq!(retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(retry_after("99999999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after("soon"), None);
    }

    #[test]
    fn transient_errors_are_told_apart() {
        let s = |status| UpstreamError::Status {
            status,
            code: None,
            message: String::new(),
            retry_after: None,
        };
        assert!(s(429).is_transient());
        assert!(s(503).is_transient());
        assert!(!s(400).is_transient());
        assert!(!s(404).is_transient());
        assert!(UpstreamError::Transport("x".into()).is_transient());
    }

    #[test]
    fn empty_file_ids_mean_none() {
        let b: BatchObject = serde_json::from_str(
            r#"{"id":"batch_1","status":"completed","output_file_id":"","error_file_id":"file-2"}"#,
        )
        .unwrap();
        assert_eq!(b.output_file(), None);
        assert_eq!(b.error_file(), Some("file-2"));
        assert!(b.is_terminal());
    }

    #[tokio::test(start_paused = true)]
    async fn retry_stops_on_permanent_errors_and_retries_transient_ones() {
        let metrics = Metrics::new();
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let mut calls = 0;
        let r: Result<(), _> = with_retry("emu", "t", 5, &metrics, rx.clone(), || {
            calls += 1;
            async {
                Err(UpstreamError::Status {
                    status: 400,
                    code: None,
                    message: "bad".into(),
                    retry_after: None,
                })
            }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 1);
        let mut calls = 0;
        let r = with_retry("emu", "t", 5, &metrics, rx, || {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Err(UpstreamError::Transport("down".into()))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 3);
        assert_eq!(metrics.upstream_retries.get(), 2);
    }
}
