//! The SSE replay of a finished answer, per endpoint: what a streaming call
//! to that endpoint would have produced, rebuilt from the batch's one body.
//! Chat completions replay as `chat.completion.chunk`s
//! ([`respond::replay_chunks`]), completions as `text_completion` chunks,
//! both ending in `data: [DONE]`; the Responses API as its own typed event
//! stream (`event:`/`data:` pairs, each carrying `type` and
//! `sequence_number`, ending with `response.completed`).

use bytes::{Bytes, BytesMut};
use serde_json::{Value, json};

use super::respond;
use crate::endpoint::Endpoint;

/// The whole SSE body replaying a successful (`200`) answer of `endpoint`.
pub fn replay(endpoint: Endpoint, body: &Value) -> Bytes {
    let mut out = BytesMut::new();
    match endpoint {
        Endpoint::Messages => return crate::anthropic::stream::replay(body),
        Endpoint::Responses => {
            for (name, data) in response_events(body) {
                out.extend_from_slice(&named_event(name, &data));
            }
        }
        Endpoint::Completions => {
            for chunk in completion_chunks(body) {
                out.extend_from_slice(&respond::sse_event(&chunk));
            }
            out.extend_from_slice(respond::SSE_DONE);
        }
        _ => {
            for chunk in respond::replay_chunks(body) {
                out.extend_from_slice(&respond::sse_event(&chunk));
            }
            out.extend_from_slice(respond::SSE_DONE);
        }
    }
    out.freeze()
}

/// What a waiting stream of `endpoint` sends to stay alive: an SSE comment,
/// or on Anthropic's stream a `ping` event (its SDK reads only events).
pub fn keepalive(endpoint: Endpoint) -> Bytes {
    match endpoint {
        Endpoint::Messages => crate::anthropic::stream::ping(),
        _ => Bytes::from_static(respond::SSE_KEEPALIVE),
    }
}

/// The event that reports a failure once the stream's headers are gone:
/// an `error` event in the endpoint's own form.
pub fn error_event(endpoint: Endpoint, error: Value) -> Bytes {
    match endpoint {
        Endpoint::Messages => {
            // Anthropic's mid-stream `error` event; the message is the
            // error's, its type by Ferry's code.
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("the request failed");
            let mut body = crate::anthropic::error_body(500, message);
            if let Some(req) = error.get("ferry_request") {
                body["ferry_request"] = req.clone();
            }
            crate::anthropic::stream::error_frame(&body)
        }
        Endpoint::Responses => {
            let mut data = json!({
                "type": "error",
                "code": error.get("code").cloned().unwrap_or(Value::Null),
                "message": error.get("message").cloned().unwrap_or(Value::Null),
                "param": error.get("param").cloned().unwrap_or(Value::Null),
                "sequence_number": 0,
            });
            if let Some(req) = error.get("ferry_request") {
                data["ferry_request"] = req.clone();
            }
            named_event("error", &data)
        }
        _ => respond::sse_event(&json!({ "error": error })),
    }
}

fn named_event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// A finished `text_completion` as the chunks a streaming call sends: per
/// choice its whole text, then its `finish_reason`; then usage, if any.
pub fn completion_chunks(completion: &Value) -> Vec<Value> {
    let chunk = |choices: Value| {
        json!({
            "id": completion["id"], "object": "text_completion",
            "created": completion["created"], "model": completion["model"],
            "choices": choices,
        })
    };
    let mut out = Vec::new();
    let empty = Vec::new();
    for (i, choice) in completion["choices"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .enumerate()
    {
        let index = choice.get("index").cloned().unwrap_or(json!(i));
        out.push(chunk(json!([{
            "index": index, "text": choice.get("text").cloned().unwrap_or(json!("")),
            "logprobs": null, "finish_reason": null,
        }])));
        out.push(chunk(json!([{
            "index": index, "text": "", "logprobs": null,
            "finish_reason": choice.get("finish_reason").cloned().unwrap_or(json!("stop")),
        }])));
    }
    if let Some(usage) = completion.get("usage").filter(|u| !u.is_null()) {
        let mut c = chunk(json!([]));
        c["usage"] = usage.clone();
        out.push(c);
    }
    out
}

/// A finished `response` object as the Responses API's event stream:
/// `response.created`, `response.in_progress`, then per output item its
/// `output_item.added`, per text part `content_part.added`,
/// `output_text.delta` (the whole text), `output_text.done`,
/// `content_part.done`, then `output_item.done`; last `response.completed`.
/// Each data object carries its `type` and a `sequence_number` from 0.
pub fn response_events(response: &Value) -> Vec<(&'static str, Value)> {
    let mut events: Vec<(&'static str, Value)> = Vec::new();
    let mut push = |name: &'static str, mut data: Value| {
        data["type"] = json!(name);
        data["sequence_number"] = json!(events.len());
        events.push((name, data));
    };
    let mut pending = response.clone();
    pending["status"] = json!("in_progress");
    pending["output"] = json!([]);
    pending["usage"] = Value::Null;
    push("response.created", json!({ "response": pending }));
    push("response.in_progress", json!({ "response": pending }));
    let empty = Vec::new();
    let output = response["output"].as_array().unwrap_or(&empty);
    for (oi, item) in output.iter().enumerate() {
        let is_message = item["type"] == "message";
        let mut added = item.clone();
        if is_message {
            added["status"] = json!("in_progress");
            added["content"] = json!([]);
        }
        push(
            "response.output_item.added",
            json!({ "output_index": oi, "item": added }),
        );
        let parts = if is_message {
            item["content"].as_array().unwrap_or(&empty)
        } else {
            &empty
        };
        for (ci, part) in parts.iter().enumerate() {
            let at = json!({ "item_id": item["id"], "output_index": oi, "content_index": ci });
            let with = |extra: Value| {
                let mut v = at.clone();
                if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
                    v.extend(extra.clone());
                }
                v
            };
            let mut started = part.clone();
            if part["type"] == "output_text" {
                started["text"] = json!("");
            }
            push(
                "response.content_part.added",
                with(json!({ "part": started })),
            );
            if part["type"] == "output_text" {
                let text = part.get("text").cloned().unwrap_or(json!(""));
                push(
                    "response.output_text.delta",
                    with(json!({ "delta": text, "logprobs": [] })),
                );
                push(
                    "response.output_text.done",
                    with(json!({ "text": text, "logprobs": [] })),
                );
            }
            push("response.content_part.done", with(json!({ "part": part })));
        }
        push(
            "response.output_item.done",
            json!({ "output_index": oi, "item": item }),
        );
    }
    push("response.completed", json!({ "response": response }));
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response() -> Value {
        json!({
            "id": "resp_1", "object": "response", "created_at": 5, "status": "completed",
            "model": "m",
            "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": "echo: hi", "annotations": []}]}],
            "usage": {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}
        })
    }

    #[test]
    fn a_response_replays_as_its_event_stream() {
        let events = response_events(&response());
        let names: Vec<&str> = events.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (i, (name, data)) in events.iter().enumerate() {
            assert_eq!(data["type"], *name);
            assert_eq!(data["sequence_number"], i);
        }
        assert_eq!(events[0].1["response"]["status"], "in_progress");
        assert_eq!(events[2].1["item"]["content"], json!([]));
        assert_eq!(events[3].1["part"]["text"], "");
        assert_eq!(events[4].1["delta"], "echo: hi");
        assert_eq!(events[4].1["item_id"], "msg_1");
        assert_eq!(events[7].1["item"]["content"][0]["text"], "echo: hi");
        assert_eq!(events[8].1["response"], response());
        let sse = String::from_utf8(replay(Endpoint::Responses, &response()).to_vec()).unwrap();
        assert!(sse.starts_with("event: response.created\ndata: {"));
        assert!(!sse.contains("[DONE]"));
    }

    #[test]
    fn a_text_completion_replays_as_chunks() {
        let c = json!({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"text": "hi", "index": 0, "finish_reason": "length", "logprobs": null}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}});
        let chunks = completion_chunks(&c);
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[0]["choices"][0]["text"], "hi");
        assert_eq!(chunks[1]["choices"][0]["finish_reason"], "length");
        assert_eq!(chunks[2]["usage"]["total_tokens"], 2);
        let sse = String::from_utf8(replay(Endpoint::Completions, &c).to_vec()).unwrap();
        assert!(sse.ends_with("data: [DONE]\n\n"));
    }
}
