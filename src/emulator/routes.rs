//! The HTTP surface: thin axum handlers over [`Emulator`], the gate every
//! `/v1/*` call passes (counting, latency, auth, injected faults) and the
//! `/_emulator/*` control routes (no auth, no faults).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::BytesMut;
use serde_json::{Map, Value, json};

use super::anthropic;
use super::error::ApiError;
use super::model::{self, Answer};
use super::realtime::Realtime;
use super::state::{Emulator, FileQuery, new_id};

type Shared = Arc<Emulator>;
type ApiResult = Result<Response, ApiError>;

/// Real-time bodies may be large (Ferry's passthrough tests post more than
/// 64 KiB); this is far above anything a chat call needs.
const REALTIME_BODY_LIMIT: usize = 32 * 1024 * 1024;
/// Control and batch-creation bodies are small.
const SMALL_BODY_LIMIT: usize = 1024 * 1024;

/// The whole router.
pub fn router(emulator: Shared) -> Router {
    let api = Router::new()
        .route(
            "/v1/files",
            post(upload_file)
                .get(list_files)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/files/{id}", get(retrieve_file).delete(delete_file))
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/batches", post(create_batch).get(list_batches))
        .route("/v1/batches/{id}", get(retrieve_batch))
        .route("/v1/batches/{id}/cancel", post(cancel_batch))
        .route(
            "/v1/chat/completions",
            post(chat_completions).layer(DefaultBodyLimit::max(REALTIME_BODY_LIMIT)),
        )
        .route(
            "/v1/embeddings",
            post(|s, b| other_endpoint(s, "/v1/embeddings", b))
                .layer(DefaultBodyLimit::max(REALTIME_BODY_LIMIT)),
        )
        .route(
            "/v1/completions",
            post(|s, b| other_endpoint(s, "/v1/completions", b))
                .layer(DefaultBodyLimit::max(REALTIME_BODY_LIMIT)),
        )
        .route(
            "/v1/moderations",
            post(|s, b| other_endpoint(s, "/v1/moderations", b))
                .layer(DefaultBodyLimit::max(REALTIME_BODY_LIMIT)),
        )
        .route(
            "/v1/responses",
            post(|s, b| other_endpoint(s, "/v1/responses", b))
                .layer(DefaultBodyLimit::max(REALTIME_BODY_LIMIT)),
        )
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(retrieve_model))
        .merge(super::anthropic::routes())
        .route_layer(middleware::from_fn_with_state(emulator.clone(), api_gate));
    let control = Router::new()
        .route("/_emulator/config", get(get_config).post(patch_config))
        .route("/_emulator/clock", get(get_clock).post(advance_clock))
        .route("/_emulator/stats", get(stats));
    api.merge(control)
        .layer(DefaultBodyLimit::max(SMALL_BODY_LIMIT))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(emulator)
}

/// Runs `f` on the blocking pool: batch reads may validate or execute many
/// lines, and a durable emulator's changes wait for an fsync, neither of
/// which may stall the async workers.
async fn blocking<T: Send + 'static>(
    emulator: &Shared,
    f: impl FnOnce(&Emulator) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let emulator = emulator.clone();
    tokio::task::spawn_blocking(move || f(&emulator))
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "emulator task failed");
            Err(ApiError::internal(
                "The emulator failed to handle the request.",
            ))
        })
}

fn json_response(value: Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// Parses a JSON body, answering the way the API does when it cannot.
fn parse_json(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let body = body.map_err(|e| {
        ApiError::new(
            e.status().as_u16(),
            format!("Could not read the request body: {}", e.body_text()),
            None,
            None,
        )
    })?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            format!(
                "We could not parse the JSON body of your request ({e}). The OpenAI API expects a JSON payload."
            ),
            None,
            None,
        )
    })
}

fn query(
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<HashMap<String, String>, ApiError> {
    q.map(|Query(q)| q).map_err(|e| {
        ApiError::bad_request(
            format!("Invalid query string: {}", e.body_text()),
            None,
            None,
        )
    })
}

/// The `{id}` of a path, or the API's 400 when it cannot be decoded.
fn path_id(id: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    id.map(|Path(id)| id)
        .map_err(|e| ApiError::bad_request(format!("Invalid path: {}", e.body_text()), None, None))
}

/// A `limit` query parameter within `1..=max`.
fn limit(q: &HashMap<String, String>, max: usize) -> Result<Option<usize>, ApiError> {
    let Some(raw) = q.get("limit") else {
        return Ok(None);
    };
    match raw.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(Some(n)),
        _ => Err(ApiError::bad_request(
            format!("Invalid 'limit': '{raw}'. It must be an integer between 1 and {max}."),
            Some("limit"),
            Some("invalid_value"),
        )),
    }
}

// ---- the gate --------------------------------------------------------------

/// Every `/v1/*` call: counted, delayed by `latency_ms`, checked for the key,
/// then possibly answered 500/503 by `error_rate` instead of being served (an
/// injected failure changes nothing).
async fn api_gate(State(emulator): State<Shared>, request: Request, next: Next) -> Response {
    emulator.count_api_call();
    let config = emulator.config();
    if config.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(config.latency_ms)).await;
    }
    let anthropic = anthropic::is_anthropic(request.uri().path(), request.headers());
    // Every refusal below in the caller's family's error shape.
    let answer = |e: ApiError| {
        if anthropic {
            anthropic::reshape(e)
        } else {
            e.into_response()
        }
    };
    if anthropic {
        if let Err(e) = anthropic::check_auth(request.headers(), &config.api_key) {
            return e.into_response();
        }
    } else if let Err(e) = check_bearer(request.headers(), &config.api_key) {
        return e.into_response();
    }
    if let Err(e) = emulator.available() {
        return answer(e);
    }
    if let Some(status) = emulator.roll_fault() {
        tracing::debug!(status, uri = %request.uri(), "injected fault");
        return answer(ApiError::new(
            status,
            "The server had an error while processing your request (injected by the emulator's error_rate). Sorry about that!",
            None,
            Some("server_error"),
        ));
    }
    next.run(request).await
}

/// The OpenAI family's auth: `Authorization: Bearer <key>`.
fn check_bearer(headers: &HeaderMap, key: &str) -> Result<(), ApiError> {
    let expected = format!("Bearer {key}");
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match auth {
        Some(given) if given == expected => Ok(()),
        Some(_) => Err(ApiError::new(
            401,
            "Incorrect API key provided. You can find your API key in the emulator's configuration.",
            None,
            Some("invalid_api_key"),
        )),
        None => Err(ApiError::new(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization \
             header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            None,
            Some("invalid_api_key"),
        )),
    }
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("Invalid URL ({method} {})", uri.path()), None)
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        405,
        format!("Method not allowed ({method} {}).", uri.path()),
        None,
        Some("method_not_allowed"),
    )
}

// ---- files -----------------------------------------------------------------

/// `POST /v1/files`: multipart `file` + `purpose` (+ `expires_after[...]`).
/// The file is read chunk by chunk and refused as soon as it passes the size
/// limit, so an oversized upload is never held whole.
async fn upload_file(
    State(emulator): State<Shared>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> ApiResult {
    let mut multipart = multipart.map_err(|e| {
        ApiError::bad_request(
            format!("The request must be multipart/form-data: {}", e.body_text()),
            None,
            None,
        )
    })?;
    let max = emulator.config().max_file_bytes();
    // Reserve what the request says it carries (within the limit) so a large
    // upload is not copied over and over as the buffer grows.
    let capacity = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |len| len.min(max.saturating_add(1)));
    let mut purpose = None;
    let mut file: Option<(String, Bytes)> = None;
    let mut anchor = None;
    let mut seconds = None;
    let read_error = |e: MultipartError| {
        ApiError::bad_request(format!("Could not read the upload: {e}"), None, None)
    };
    while let Some(mut field) = multipart.next_field().await.map_err(read_error)? {
        let name = field.name().unwrap_or_default().to_owned();
        match name.as_str() {
            "file" => {
                let filename = field.file_name().unwrap_or("file").to_owned();
                let mut content = BytesMut::with_capacity(usize::try_from(capacity).unwrap_or(0));
                while let Some(chunk) = field.chunk().await.map_err(read_error)? {
                    if (content.len() + chunk.len()) as u64 > max {
                        return Err(ApiError::new(
                            413,
                            format!("File is too large: the limit is {max} bytes."),
                            Some("file"),
                            Some("file_too_large"),
                        ));
                    }
                    content.extend_from_slice(&chunk);
                }
                file = Some((filename, content.freeze()));
            }
            "purpose" | "expires_after[anchor]" | "expires_after[seconds]" => {
                let text = field.text().await.map_err(read_error)?;
                match name.as_str() {
                    "purpose" => purpose = Some(text),
                    "expires_after[anchor]" => anchor = Some(text),
                    _ => seconds = Some(text),
                }
            }
            _ => {}
        }
    }
    let purpose = purpose.ok_or_else(|| ApiError::missing("purpose"))?;
    let (filename, content) = file.ok_or_else(|| ApiError::missing("file"))?;
    const PURPOSES: [&str; 6] = [
        "assistants",
        "batch",
        "fine-tune",
        "vision",
        "user_data",
        "evals",
    ];
    if !PURPOSES.contains(&purpose.as_str()) {
        return Err(ApiError::bad_request(
            format!(
                "Invalid value: '{purpose}'. Supported values are: {}.",
                PURPOSES.map(|p| format!("'{p}'")).join(", ")
            ),
            Some("purpose"),
            Some("invalid_value"),
        ));
    }
    if purpose == "batch" && !filename.ends_with(".jsonl") {
        return Err(ApiError::bad_request(
            format!("Invalid file format for Batch API: '{filename}'. Must be .jsonl"),
            Some("file"),
            Some("invalid_file_format"),
        ));
    }
    let expires = match (anchor, seconds) {
        (None, None) => None,
        (anchor, seconds) => {
            let seconds = seconds.as_deref().and_then(|s| s.parse::<i64>().ok());
            super::state::expires_after(
                Some(&json!({"anchor": anchor, "seconds": seconds})),
                "expires_after",
            )?
        }
    };
    let file = blocking(&emulator, move |e| {
        e.add_file(filename, purpose, content, expires)
    })
    .await?;
    Ok(json_response(file))
}

async fn list_files(
    State(emulator): State<Shared>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult {
    let q = query(q)?;
    let ascending = match q.get("order").map(String::as_str) {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                format!("Invalid value: '{other}'. Supported values are: 'asc' and 'desc'."),
                Some("order"),
                Some("invalid_value"),
            ));
        }
    };
    let fq = FileQuery {
        purpose: q.get("purpose").cloned(),
        limit: limit(&q, 10_000)?,
        after: q.get("after").cloned(),
        ascending,
    };
    Ok(json_response(emulator.list_files(&fq)))
}

async fn retrieve_file(
    State(emulator): State<Shared>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let id = path_id(id)?;
    Ok(json_response(emulator.file(&id)?.to_json()))
}

async fn delete_file(
    State(emulator): State<Shared>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let id = path_id(id)?;
    Ok(json_response(
        blocking(&emulator, move |e| e.delete_file(&id)).await?,
    ))
}

/// The raw bytes, sent from the stored `Bytes` without copying.
async fn file_content(
    State(emulator): State<Shared>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let id = path_id(id)?;
    let file = emulator.file(&id)?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from(file.bytes),
    )
        .into_response())
}

// ---- batches ---------------------------------------------------------------

async fn create_batch(
    State(emulator): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body = parse_json(body)?;
    let batch = blocking(&emulator, move |e| e.create_batch(&body)).await?;
    Ok(json_response(batch))
}

async fn retrieve_batch(
    State(emulator): State<Shared>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let id = path_id(id)?;
    let batch = blocking(&emulator, move |e| e.get_batch(&id)).await?;
    Ok(json_response(batch))
}

async fn list_batches(
    State(emulator): State<Shared>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult {
    let q = query(q)?;
    let limit = limit(&q, 100)?.unwrap_or(20);
    let after = q.get("after").cloned();
    let list = blocking(&emulator, move |e| e.list_batches(limit, after.as_deref())).await?;
    Ok(json_response(list))
}

async fn cancel_batch(
    State(emulator): State<Shared>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let id = path_id(id)?;
    let batch = blocking(&emulator, move |e| e.cancel_batch(&id)).await?;
    Ok(json_response(batch))
}

// ---- real time -------------------------------------------------------------

/// `POST /v1/chat/completions`, plain or streamed, with the deterministic
/// model; checked like the real endpoint checks (400 for a missing model or
/// messages, 404 for an unknown model).
async fn chat_completions(
    State(emulator): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    emulator.count_realtime();
    let body = match parse_json(body)? {
        Value::Object(body) => body,
        _ => {
            return Err(ApiError::bad_request(
                "The request body must be a JSON object.",
                None,
                None,
            ));
        }
    };
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => {
            return Err(ApiError::bad_request(
                "you must provide a model parameter",
                None,
                None,
            ));
        }
    };
    match body.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => {}
        Some(Value::Array(_)) => {
            return Err(ApiError::bad_request(
                "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
                Some("messages"),
                Some("empty_array"),
            ));
        }
        _ => return Err(ApiError::missing("messages")),
    }
    if !emulator.config().knows_model(&model) {
        return Err(ApiError::new(
            404,
            format!("The model `{model}` does not exist or you do not have access to it."),
            None,
            Some("model_not_found"),
        ));
    }
    let flex = flex_gate(&emulator, "/v1/chat/completions", &body, &model).await?;
    let id = new_id("chatcmpl-");
    let created = emulator.now() as i64;
    let (status, mut completion) = match model::chat_completion(&body, &id, created) {
        Answer::Ok { body, .. } => (200, body),
        Answer::Failed { status, body } => (status, body),
    };
    if flex && status == 200 {
        super::flex::mark(&mut completion);
    }
    if status == 200 {
        let prompt = body
            .get("messages")
            .and_then(Value::as_array)
            .and_then(|m| m.last())
            .and_then(|m| m.get("content"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        emulator.count_realtime_answer(prompt, if flex { "flex" } else { "default" });
    }
    if status != 200 {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Ok((status, json_response(completion)).into_response());
    }
    if body.get("stream") != Some(&Value::Bool(true)) {
        return Ok(json_response(completion));
    }
    let include_usage = body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(sse(stream_events(
        &body,
        &id,
        created,
        &model,
        include_usage,
    )))
}

/// `POST` to one of the other batchable endpoints, in real time (see
/// [`realtime`](super::realtime)).
async fn other_endpoint(
    State(emulator): State<Shared>,
    endpoint: &'static str,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    emulator.count_realtime();
    let Value::Object(body) = parse_json(body)? else {
        return Err(ApiError::bad_request(
            "The request body must be a JSON object.",
            None,
            None,
        ));
    };
    let prefix = match endpoint {
        "/v1/completions" => "cmpl-",
        "/v1/responses" => "resp_",
        _ => "",
    };
    let config = emulator.config();
    let knows = |m: &str| config.knows_model(m);
    let answer = super::realtime::answer(
        endpoint,
        &body,
        &knows,
        &new_id(prefix),
        emulator.now() as i64,
    )?;
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let flex = flex_gate(&emulator, endpoint, &body, model).await?;
    match answer {
        Realtime::Json(status, mut v) => {
            if flex && status == 200 {
                super::flex::mark(&mut v);
            }
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Ok((status, json_response(v)).into_response())
        }
        Realtime::Stream(frames) => Ok(sse_frames(frames)),
    }
}

/// A real-time call that may ask for flex: `Ok(true)` once it is to be
/// served on flex (after the flex latency), `Ok(false)` for the default
/// tier; `400` when the model or endpoint has no flex, `429`
/// `resource_unavailable` by `flex_unavailable_rate`.
async fn flex_gate(
    emulator: &Shared,
    endpoint: &str,
    body: &Map<String, Value>,
    model: &str,
) -> Result<bool, ApiError> {
    let config = emulator.config();
    if !super::flex::requested(endpoint, body, model, &config)? {
        return Ok(false);
    }
    if emulator.roll_flex_unavailable() {
        return Err(super::flex::unavailable());
    }
    if config.flex_latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(config.flex_latency_ms)).await;
    }
    Ok(true)
}

/// The `data:` payloads of a streamed completion: a role chunk, one chunk per
/// word of content, a chunk with `finish_reason: stop`, the usage chunk if
/// asked for, then `[DONE]`.
fn stream_events(
    body: &Map<String, Value>,
    id: &str,
    created: i64,
    model: &str,
    include_usage: bool,
) -> Vec<String> {
    let (content, usage) = model::chat_reply(body);
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": model::FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        c.to_string()
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": "", "refusal": null}),
        Value::Null,
    )];
    for piece in model::stream_pieces(&content) {
        events.push(chunk(json!({"content": piece}), Value::Null));
    }
    events.push(chunk(json!({}), json!("stop")));
    if include_usage {
        events.push(
            json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": model::FINGERPRINT,
                "choices": [],
                "usage": usage.to_chat_json(),
            })
            .to_string(),
        );
    }
    events.push("[DONE]".to_owned());
    events
}

fn sse(events: Vec<String>) -> Response {
    sse_frames(
        events
            .into_iter()
            .map(|e| format!("data: {e}\n\n"))
            .collect(),
    )
}

/// An SSE response of whole frames.
fn sse_frames(frames: Vec<String>) -> Response {
    let frames = frames
        .into_iter()
        .map(|f| Ok::<_, Infallible>(Bytes::from(f)));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(futures::stream::iter(frames)),
    )
        .into_response()
}

fn model_json(id: &str) -> Value {
    let owned_by = if id.starts_with("kimi") {
        "moonshot"
    } else {
        "openai"
    };
    json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": owned_by})
}

async fn list_models(State(emulator): State<Shared>, headers: HeaderMap) -> ApiResult {
    if headers.contains_key("anthropic-version") {
        return Ok(anthropic::models_list(&emulator.config().models));
    }
    let data: Vec<Value> = emulator
        .config()
        .models
        .iter()
        .map(|m| model_json(m))
        .collect();
    Ok(json_response(json!({"object": "list", "data": data})))
}

async fn retrieve_model(
    State(emulator): State<Shared>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let id = path_id(id)?;
    if headers.contains_key("anthropic-version") {
        return Ok(if emulator.config().knows_model(&id) {
            json_response(anthropic::model_json(&id))
        } else {
            anthropic::Error::new(404, format!("model: {id}")).into_response()
        });
    }
    if emulator.config().knows_model(&id) {
        Ok(json_response(model_json(&id)))
    } else {
        Err(ApiError::new(
            404,
            format!("The model `{id}` does not exist or you do not have access to it."),
            Some("model"),
            Some("model_not_found"),
        ))
    }
}

// ---- control ---------------------------------------------------------------

async fn get_config(State(emulator): State<Shared>) -> ApiResult {
    let config =
        serde_json::to_value(emulator.config()).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(json_response(config))
}

/// `POST /_emulator/config`: any subset of the keys, merged into the live config.
async fn patch_config(
    State(emulator): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let patch = parse_json(body)?;
    let merged = emulator
        .patch_config(&patch)
        .map_err(|m| ApiError::bad_request(m, None, Some("invalid_config")))?;
    let merged = serde_json::to_value(merged).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(json_response(merged))
}

async fn get_clock(State(emulator): State<Shared>) -> ApiResult {
    Ok(json_response(emulator.clock_json()))
}

/// `POST /_emulator/clock {"advance_seconds": N}`.
async fn advance_clock(
    State(emulator): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body = parse_json(body)?;
    let Some(seconds) = body.get("advance_seconds").and_then(Value::as_f64) else {
        return Err(ApiError::bad_request(
            "Expected {\"advance_seconds\": <number>}.",
            Some("advance_seconds"),
            Some("missing_required_parameter"),
        ));
    };
    let clock = blocking(&emulator, move |e| e.advance_clock(seconds)).await?;
    Ok(json_response(clock))
}

async fn stats(State(emulator): State<Shared>) -> ApiResult {
    let stats = blocking(&emulator, |e| e.stats()).await?;
    Ok(json_response(stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_events_rebuild_the_content() {
        let body = match json!({"model": "m", "messages": [{"role": "user", "content": "a b c"}]}) {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let events = stream_events(&body, "chatcmpl-x", 1, "m", true);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let mut content = String::new();
        for e in &events[..events.len() - 1] {
            let v: Value = serde_json::from_str(e).unwrap();
            if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
                content.push_str(c);
            }
        }
        assert_eq!(content, "echo: a b c");
        let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], 4);
    }
}
