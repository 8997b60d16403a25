//! The real-time answers of the endpoints besides chat (`/v1/embeddings`,
//! `/v1/completions`, `/v1/moderations`, `/v1/responses`): what Ferry's
//! passthrough reaches. Checked as the real endpoints check (400 for a
//! missing model or input, 404 for an unknown model) and answered by the
//! deterministic model ([`model::answer`]), streamed where the real
//! endpoint streams: completions as `text_completion` chunks and
//! `data: [DONE]`, responses as the Responses API's typed events.

use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::model::{self, Answer};

/// The answer to a real-time call of `endpoint`: a status and a JSON body,
/// or, for a streamed call, the SSE frames.
pub enum Realtime {
    Json(u16, Value),
    Stream(Vec<String>),
}

/// Checks and answers one real-time call; `knows_model` is the emulator's
/// model list, `id` and `created` name the answer.
pub fn answer(
    endpoint: &str,
    body: &Map<String, Value>,
    knows_model: &dyn Fn(&str) -> bool,
    id: &str,
    created: i64,
) -> Result<Realtime, ApiError> {
    let mut body = body.clone();
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        None if endpoint == "/v1/moderations" => {
            body.insert("model".into(), json!("omni-moderation-latest"));
            "omni-moderation-latest".to_owned()
        }
        _ => {
            return Err(ApiError::bad_request(
                "you must provide a model parameter",
                None,
                None,
            ));
        }
    };
    let field = if endpoint == "/v1/completions" {
        "prompt"
    } else {
        "input"
    };
    match body.get(field) {
        None | Some(Value::Null) => return Err(ApiError::missing(field)),
        Some(Value::String(_) | Value::Array(_)) => {}
        Some(_) => {
            return Err(ApiError::bad_request(
                format!("Invalid type for '{field}': expected a string or an array."),
                Some(field),
                Some("invalid_type"),
            ));
        }
    }
    if !knows_model(&model) && endpoint != "/v1/moderations" {
        return Err(ApiError::new(
            404,
            format!("The model `{model}` does not exist or you do not have access to it."),
            None,
            Some("model_not_found"),
        ));
    }
    let stream = body.get("stream") == Some(&Value::Bool(true));
    if stream && matches!(endpoint, "/v1/embeddings" | "/v1/moderations") {
        return Err(ApiError::bad_request(
            "Unrecognized request argument supplied: stream",
            Some("stream"),
            None,
        ));
    }
    let (status, out) = match model::answer(endpoint, &body, id, created) {
        Answer::Ok { body, .. } => (200, body),
        Answer::Failed { status, body } => (status, body),
    };
    if status != 200 || !stream {
        return Ok(Realtime::Json(status, out));
    }
    Ok(Realtime::Stream(if endpoint == "/v1/responses" {
        response_frames(&out)
    } else {
        completion_frames(&out)
    }))
}

/// A text completion streamed: one chunk per word piece, a final chunk
/// with the finish reason, then `[DONE]`.
fn completion_frames(c: &Value) -> Vec<String> {
    let chunk = |text: &str, finish: Value| {
        let v = json!({"id": c["id"], "object": "text_completion", "created": c["created"],
            "model": c["model"],
            "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}]});
        format!("data: {v}\n\n")
    };
    let text = c["choices"][0]["text"].as_str().unwrap_or_default();
    let mut frames: Vec<String> = model::stream_pieces(text)
        .into_iter()
        .map(|p| chunk(p, Value::Null))
        .collect();
    frames.push(chunk("", json!("stop")));
    frames.push("data: [DONE]\n\n".to_owned());
    frames
}

/// A response streamed as the Responses API streams it: created, in
/// progress, the message item and its text part opened, one delta per word
/// piece, everything closed again, then completed; each event's data
/// carrying its `type` and `sequence_number`.
fn response_frames(r: &Value) -> Vec<String> {
    let mut frames = Vec::new();
    let mut event = |kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(frames.len());
        frames.push(format!("event: {kind}\ndata: {data}\n\n"));
    };
    let mut pending = r.clone();
    pending["status"] = json!("in_progress");
    pending["output"] = json!([]);
    pending["usage"] = Value::Null;
    event("response.created", json!({"response": pending}));
    event("response.in_progress", json!({"response": pending}));
    let item = &r["output"][0];
    let part = &item["content"][0];
    let text = part["text"].as_str().unwrap_or_default();
    let at = |extra: Value| {
        let mut v = json!({"item_id": item["id"], "output_index": 0, "content_index": 0});
        if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
            v.extend(extra.clone());
        }
        v
    };
    let mut opened = item.clone();
    opened["status"] = json!("in_progress");
    opened["content"] = json!([]);
    event(
        "response.output_item.added",
        json!({"output_index": 0, "item": opened}),
    );
    event(
        "response.content_part.added",
        at(json!({"part": {"type": "output_text", "text": "", "annotations": []}})),
    );
    for piece in model::stream_pieces(text) {
        event(
            "response.output_text.delta",
            at(json!({"delta": piece, "logprobs": []})),
        );
    }
    event(
        "response.output_text.done",
        at(json!({"text": text, "logprobs": []})),
    );
    event("response.content_part.done", at(json!({"part": part})));
    event(
        "response.output_item.done",
        json!({"output_index": 0, "item": item}),
    );
    event("response.completed", json!({"response": r}));
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(endpoint: &str, body: Value) -> Result<Realtime, ApiError> {
        let Value::Object(body) = body else { panic!() };
        answer(endpoint, &body, &|m| m != "unknown", "x1", 5)
    }

    fn json_of(r: Result<Realtime, ApiError>) -> (u16, Value) {
        match r {
            Ok(Realtime::Json(s, v)) => (s, v),
            Ok(Realtime::Stream(_)) => panic!("streamed"),
            Err(e) => (e.status.as_u16(), json!(e.envelope)),
        }
    }

    #[test]
    fn each_endpoint_answers_with_its_shape_or_refuses() {
        let (s, v) = json_of(call(
            "/v1/embeddings",
            json!({"model": "e", "input": ["a", "b"]}),
        ));
        assert_eq!((s, v["object"].as_str()), (200, Some("list")));
        assert_eq!(v["data"].as_array().unwrap().len(), 2);
        let (s, v) = json_of(call("/v1/moderations", json!({"input": "attack"})));
        assert_eq!(
            (s, v["model"].as_str()),
            (200, Some("omni-moderation-latest"))
        );
        assert_eq!(v["results"][0]["flagged"], true);
        let (s, v) = json_of(call(
            "/v1/completions",
            json!({"model": "c", "prompt": "hi"}),
        ));
        assert_eq!(
            (s, v["choices"][0]["text"].as_str()),
            (200, Some("echo: hi"))
        );
        let (s, v) = json_of(call("/v1/responses", json!({"model": "r", "input": "hi"})));
        assert_eq!((s, v["object"].as_str()), (200, Some("response")));
        assert_eq!(
            json_of(call("/v1/embeddings", json!({"model": "e"}))).0,
            400
        );
        assert_eq!(
            json_of(call("/v1/completions", json!({"model": "c", "input": "x"}))).0,
            400
        );
        assert_eq!(
            json_of(call("/v1/embeddings", json!({"input": "x"}))).0,
            400
        );
        assert_eq!(
            json_of(call(
                "/v1/embeddings",
                json!({"model": "unknown", "input": "x"})
            ))
            .0,
            404
        );
        assert_eq!(
            json_of(call(
                "/v1/embeddings",
                json!({"model": "e", "input": "x", "stream": true})
            ))
            .0,
            400
        );
    }

    #[test]
    fn responses_and_completions_stream() {
        let Ok(Realtime::Stream(frames)) = call(
            "/v1/responses",
            json!({"model": "r", "input": "one two", "stream": true}),
        ) else {
            panic!()
        };
        assert!(frames[0].starts_with("event: response.created\n"));
        assert!(
            frames
                .last()
                .unwrap()
                .starts_with("event: response.completed\n")
        );
        let deltas: String = frames
            .iter()
            .filter(|f| f.starts_with("event: response.output_text.delta"))
            .map(|f| {
                let data: Value = serde_json::from_str(f.split_once("data: ").unwrap().1).unwrap();
                data["delta"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(deltas, "echo: one two");
        let Ok(Realtime::Stream(frames)) = call(
            "/v1/completions",
            json!({"model": "c", "prompt": "hi", "stream": true}),
        ) else {
            panic!()
        };
        assert_eq!(frames.last().unwrap(), "data: [DONE]\n\n");
    }
}
