//! A finished `message` as the event stream `POST /v1/messages` with
//! `stream: true` sends: `message_start` (the message with empty `content`
//! and `stop_reason: null`), then per content block `content_block_start`,
//! its deltas and `content_block_stop`, then `message_delta` (the stop reason
//! and output tokens) and `message_stop`; a `ping` after the first block
//! starts, as Anthropic sends one.

use bytes::{Bytes, BytesMut};
use serde_json::{Value, json};

/// The `(event, data)` pairs of the stream of `message`. Text is sent one
/// word (with its leading space) per `text_delta`, so a client sees several
/// deltas; a `tool_use` block's input as one `input_json_delta`; any other
/// block whole in its `content_block_start`.
pub fn events(message: &Value) -> Vec<(&'static str, Value)> {
    let mut start = message.clone();
    start["content"] = json!([]);
    start["stop_reason"] = Value::Null;
    start["stop_sequence"] = Value::Null;
    if let Some(usage) = start.get_mut("usage").and_then(Value::as_object_mut) {
        usage.insert("output_tokens".into(), json!(0));
    }
    let mut out = vec![(
        "message_start",
        json!({"type": "message_start", "message": start}),
    )];
    let empty = Vec::new();
    let blocks = message["content"].as_array().unwrap_or(&empty);
    for (index, block) in blocks.iter().enumerate() {
        let (first, deltas) = match block["type"].as_str() {
            Some("text") => {
                let text = block["text"].as_str().unwrap_or_default();
                let deltas = pieces(text)
                    .into_iter()
                    .map(|p| json!({"type": "text_delta", "text": p}))
                    .collect();
                (json!({"type": "text", "text": ""}), deltas)
            }
            Some("tool_use") => {
                let mut first = block.clone();
                first["input"] = json!({});
                let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
                let delta = json!({"type": "input_json_delta", "partial_json": input.to_string()});
                (first, vec![delta])
            }
            _ => (block.clone(), Vec::new()),
        };
        out.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": first}),
        ));
        if index == 0 {
            out.push(("ping", json!({"type": "ping"})));
        }
        for delta in deltas {
            out.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": delta}),
            ));
        }
        out.push((
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
    }
    out.push((
        "message_delta",
        json!({
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]},
            "usage": {"output_tokens": message["usage"]["output_tokens"]},
        }),
    ));
    out.push(("message_stop", json!({"type": "message_stop"})));
    out
}

/// One SSE frame: `event: <name>` / `data: <json>`.
pub fn frame(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// The whole stream of `message`, as one body.
pub fn replay(message: &Value) -> Bytes {
    let mut out = BytesMut::new();
    for (name, data) in events(message) {
        out.extend_from_slice(&frame(name, &data));
    }
    out.freeze()
}

/// A `ping` frame, sent while a held stream waits for its answer.
pub fn ping() -> Bytes {
    frame("ping", &json!({"type": "ping"}))
}

/// An `error` frame, for a failure after the stream's headers are gone.
pub fn error_frame(error_body: &Value) -> Bytes {
    frame("error", error_body)
}

/// `text` cut before each space, so the pieces concatenate back to it.
fn pieces(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if c == ' ' && i > start {
            out.push(&text[start..i]);
            start = i;
        }
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> Value {
        json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
            "content": [{"type": "text", "text": "echo: a b"}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 2, "output_tokens": 3},
        })
    }

    #[test]
    fn the_stream_rebuilds_the_message() {
        let events = events(&message());
        let names: Vec<&str> = events.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let text: String = events
            .iter()
            .filter_map(|(_, d)| d["delta"]["text"].as_str())
            .collect();
        assert_eq!(text, "echo: a b");
        assert_eq!(events[0].1["message"]["content"], json!([]));
        assert_eq!(events[0].1["message"]["usage"]["input_tokens"], 2);
        assert_eq!(events[7].1["delta"]["stop_reason"], "end_turn");
        assert_eq!(events[7].1["usage"]["output_tokens"], 3);
        for (name, data) in &events {
            assert_eq!(data["type"], *name);
        }
    }

    #[test]
    fn tool_use_input_goes_as_one_json_delta() {
        let mut m = message();
        m["content"] = json!([{"type": "tool_use", "id": "t1", "name": "f", "input": {"x": 1}}]);
        let events = events(&m);
        assert_eq!(events[1].1["content_block"]["input"], json!({}));
        assert_eq!(events[3].1["delta"]["partial_json"], "{\"x\":1}");
    }

    #[test]
    fn frames_are_event_and_data_pairs() {
        let body = String::from_utf8(replay(&message()).to_vec()).unwrap();
        assert!(body.starts_with("event: message_start\ndata: {"));
        assert!(body.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    }
}
