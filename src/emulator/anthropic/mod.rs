//! The emulator's Anthropic profile: real-time `POST /v1/messages` (plain or
//! streamed), `POST /v1/messages/count_tokens`, the Message Batches routes
//! and Anthropic-shaped `/v1/models`, answering with Anthropic's error shape.
//!
//! One emulator serves both API families at once: the Anthropic paths
//! (`/v1/messages...`) do not collide with OpenAI's, and `/v1/models` answers
//! in Anthropic's shape when the call carries `anthropic-version`. The gate
//! (auth, latency, injected faults, counting) is the OpenAI side's, which
//! takes `x-api-key` (or `Authorization: Bearer`) on these calls. A Message
//! Batch is an ordinary emulator batch underneath (see [`batches`]), so it
//! moves with the same clock and timing knobs and survives a restart the
//! same way.

pub mod batches;
pub mod message;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::model::Answer;
use super::state::{Emulator, new_id};
use crate::anthropic::{error_body, from_openai, stream};

type Shared = Arc<Emulator>;
type Result<T> = std::result::Result<T, Error>;

/// Real-time bodies: generous, like the OpenAI side's.
const REALTIME_BODY_LIMIT: usize = 32 * 1024 * 1024;

/// An error of these routes: a status and a message, answered in Anthropic's
/// shape. Errors of the shared state (OpenAI-shaped) convert by status.
#[derive(Debug)]
pub struct Error {
    status: u16,
    message: String,
}

impl Error {
    pub fn new(status: u16, message: impl Into<String>) -> Error {
        Error {
            status,
            message: message.into(),
        }
    }
}

impl From<ApiError> for Error {
    fn from(e: ApiError) -> Error {
        Error::new(e.status.as_u16(), e.envelope.error.message)
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(status, &error_body(self.status, self.message))
    }
}

/// An OpenAI-shaped error (from the shared gate) answered in Anthropic's shape.
pub fn reshape(e: ApiError) -> Response {
    let status = e.status;
    json_response(status, &from_openai(status.as_u16(), &e.envelope))
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// The Anthropic routes, to merge under the shared gate.
pub fn routes() -> Router<Shared> {
    Router::new()
        .route(
            "/v1/messages",
            post(create_message).layer(DefaultBodyLimit::max(REALTIME_BODY_LIMIT)),
        )
        .route(
            "/v1/messages/count_tokens",
            post(count_tokens).layer(DefaultBodyLimit::max(REALTIME_BODY_LIMIT)),
        )
        .route(
            "/v1/messages/batches",
            post(create_batch)
                .get(list_batches)
                .layer(DefaultBodyLimit::max(batches::MAX_BYTES as usize)),
        )
        .route(
            "/v1/messages/batches/{id}",
            get(retrieve_batch).delete(delete_batch),
        )
        .route("/v1/messages/batches/{id}/cancel", post(cancel_batch))
        .route("/v1/messages/batches/{id}/results", get(batch_results))
}

/// Whether a call is of the Anthropic family: an Anthropic path, or any
/// call that carries `anthropic-version` (as every Anthropic SDK call does).
pub fn is_anthropic(path: &str, headers: &HeaderMap) -> bool {
    path == "/v1/messages"
        || path.starts_with("/v1/messages/")
        || headers.contains_key("anthropic-version")
}

/// The auth check of an Anthropic call: `x-api-key` (or a bearer token)
/// equal to the key, and an `anthropic-version`.
pub fn check_auth(headers: &HeaderMap, key: &str) -> Result<()> {
    let given = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        });
    match given {
        Some(k) if k == key => {}
        Some(_) => return Err(Error::new(401, "invalid x-api-key")),
        None => return Err(Error::new(401, "x-api-key header is required")),
    }
    if !headers.contains_key("anthropic-version") {
        return Err(Error::new(400, "anthropic-version: header is required"));
    }
    Ok(())
}

fn parse_object(body: std::result::Result<Bytes, BytesRejection>) -> Result<Map<String, Value>> {
    let body = body.map_err(|e| {
        let status = e.status().as_u16();
        let message = if status == 413 {
            "Request exceeds the maximum allowed number of bytes.".to_owned()
        } else {
            format!("Could not read the request body: {}", e.body_text())
        };
        Error::new(status, message)
    })?;
    match serde_json::from_slice(&body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Error::new(400, "The request body must be a JSON object.")),
        Err(e) => Err(Error::new(
            400,
            format!("Invalid JSON in the request body: {e}"),
        )),
    }
}

/// Runs `f` on the blocking pool (batch reads may execute lines and wait
/// for the journal's fsync).
async fn blocking<T: Send + 'static>(
    emulator: &Shared,
    f: impl FnOnce(&Emulator) -> std::result::Result<T, ApiError> + Send + 'static,
) -> Result<T> {
    let emulator = emulator.clone();
    tokio::task::spawn_blocking(move || f(&emulator))
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "emulator task failed");
            Err(ApiError::internal(
                "The emulator failed to handle the request.",
            ))
        })
        .map_err(Error::from)
}

fn path_id(id: std::result::Result<Path<String>, PathRejection>) -> Result<String> {
    id.map(|Path(id)| id)
        .map_err(|e| Error::new(400, format!("Invalid path: {}", e.body_text())))
}

/// `scheme://host` the caller used, for `results_url`.
fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    format!("http://{host}")
}

// ---- real time -------------------------------------------------------------

async fn create_message(
    State(emulator): State<Shared>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    emulator.count_realtime();
    let body = parse_object(body)?;
    let config = emulator.config();
    message::check(&body, &|m| config.knows_model(m)).map_err(|(s, m)| Error::new(s, m))?;
    let message = match message::answer(&body, &new_id("msg_")) {
        Answer::Ok { body, .. } => body,
        Answer::Failed { status, body } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return Ok(json_response(status, &body));
        }
    };
    if body.get("stream") != Some(&Value::Bool(true)) {
        return Ok(json_response(StatusCode::OK, &message));
    }
    let frames = stream::events(&message)
        .into_iter()
        .map(|(name, data)| Ok::<_, Infallible>(stream::frame(name, &data)));
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(futures::stream::iter(frames)),
    )
        .into_response())
}

async fn count_tokens(
    State(emulator): State<Shared>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let body = parse_object(body)?;
    let config = emulator.config();
    // count_tokens takes no max_tokens.
    let mut checked = body.clone();
    checked.insert("max_tokens".into(), json!(1));
    message::check(&checked, &|m| config.knows_model(m)).map_err(|(s, m)| Error::new(s, m))?;
    Ok(json_response(StatusCode::OK, &message::count_tokens(&body)))
}

// ---- batches ---------------------------------------------------------------

async fn create_batch(
    State(emulator): State<Shared>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let config = emulator.config();
    let max_bytes = config.max_file_bytes.unwrap_or(batches::MAX_BYTES);
    if let Ok(b) = &body
        && b.len() as u64 > max_bytes
    {
        return Err(Error::new(
            413,
            format!("Request exceeds the maximum allowed number of bytes ({max_bytes})."),
        ));
    }
    let body = Value::Object(parse_object(body)?);
    let max_requests = config.max_lines.unwrap_or(batches::MAX_REQUESTS);
    let view = blocking(&emulator, move |e| {
        let config = e.config();
        let input = batches::parse_create(&body, max_requests, &|m| config.knows_model(m))
            .map_err(|(status, m)| ApiError::new(status, m, None, None))?;
        e.create_message_batch(input)
    })
    .await?;
    Ok(json_response(
        StatusCode::OK,
        &batches::render(&view, &base_url(&headers)),
    ))
}

async fn retrieve_batch(
    State(emulator): State<Shared>,
    headers: HeaderMap,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<Response> {
    let id = path_id(id)?;
    let view = blocking(&emulator, move |e| e.message_batch(&id)).await?;
    Ok(json_response(
        StatusCode::OK,
        &batches::render(&view, &base_url(&headers)),
    ))
}

async fn list_batches(
    State(emulator): State<Shared>,
    headers: HeaderMap,
    q: std::result::Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response> {
    let Query(q) =
        q.map_err(|e| Error::new(400, format!("Invalid query string: {}", e.body_text())))?;
    let limit = match q.get("limit") {
        None => 20,
        Some(raw) => match raw.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => return Err(Error::new(400, "limit: Input should be between 1 and 1000")),
        },
    };
    let before = q.get("before_id").cloned();
    let after = q.get("after_id").cloned();
    let (views, has_more) = blocking(&emulator, move |e| {
        e.list_message_batches(limit, before.as_deref(), after.as_deref())
    })
    .await?;
    let base = base_url(&headers);
    let data = views.iter().map(|v| batches::render(v, &base)).collect();
    Ok(json_response(
        StatusCode::OK,
        &batches::list_json(data, has_more),
    ))
}

async fn cancel_batch(
    State(emulator): State<Shared>,
    headers: HeaderMap,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<Response> {
    let id = path_id(id)?;
    let view = blocking(&emulator, move |e| e.cancel_message_batch(&id)).await?;
    Ok(json_response(
        StatusCode::OK,
        &batches::render(&view, &base_url(&headers)),
    ))
}

async fn delete_batch(
    State(emulator): State<Shared>,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<Response> {
    let id = path_id(id)?;
    let deleted = id.clone();
    blocking(&emulator, move |e| e.delete_message_batch(&id)).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"id": deleted, "type": "message_batch_deleted"}),
    ))
}

async fn batch_results(
    State(emulator): State<Shared>,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<Response> {
    let id = path_id(id)?;
    let shown = id.clone();
    let Some(jsonl) = blocking(&emulator, move |e| e.message_batch_results(&id)).await? else {
        return Err(Error::new(
            404,
            format!(
                "Batch {shown} has not ended yet: results are available once processing_status is 'ended'."
            ),
        ));
    };
    Ok((
        [(header::CONTENT_TYPE, "application/binary")],
        Body::from(jsonl),
    )
        .into_response())
}

// ---- models ----------------------------------------------------------------

/// `GET /v1/models` in Anthropic's shape: the known Claude models.
pub fn models_list(models: &[String]) -> Response {
    let data: Vec<Value> = models
        .iter()
        .filter(|m| m.starts_with("claude-"))
        .map(|m| model_json(m))
        .collect();
    json_response(StatusCode::OK, &batches::list_json(data, false))
}

/// One model in Anthropic's shape.
pub fn model_json(id: &str) -> Value {
    json!({
        "type": "model",
        "id": id,
        "display_name": id,
        "created_at": "2025-01-01T00:00:00Z",
    })
}
