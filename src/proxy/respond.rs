//! Writing Ferry's own answers on the proxy port, and the SSE replay of a
//! finished completion. Errors are written by [`super::error`].

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use serde_json::{Value, json};

pub type Result<T> = pingora::Result<T>;

/// Writes a complete response with a JSON body.
pub async fn json(
    session: &mut Session,
    status: u16,
    extra: &[(&str, String)],
    body: Bytes,
) -> Result<()> {
    let mut h = ResponseHeader::build(status, Some(4 + extra.len()))?;
    h.insert_header("content-type", "application/json")?;
    h.insert_header("content-length", body.len().to_string())?;
    for (k, v) in extra {
        h.insert_header(k.to_string(), v.as_str())?;
    }
    session.write_response_header(Box::new(h), false).await?;
    session.write_response_body(Some(body), true).await
}

pub async fn value(
    session: &mut Session,
    status: u16,
    extra: &[(&str, String)],
    v: &Value,
) -> Result<()> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    json(session, status, extra, Bytes::from(body)).await
}

/// Starts an SSE response (the first keep-alive is due, or the replay is ready).
pub async fn sse_start(session: &mut Session) -> Result<()> {
    let mut h = ResponseHeader::build(200, Some(4))?;
    h.insert_header("content-type", "text/event-stream")?;
    h.insert_header("cache-control", "no-cache")?;
    session.write_response_header(Box::new(h), false).await
}

pub fn sse_event(data: &Value) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

pub const SSE_KEEPALIVE: &[u8] = b": ferry: waiting for the batch result\n\n";
pub const SSE_DONE: &[u8] = b"data: [DONE]\n\n";

/// Turns a finished `chat.completion` into the `chat.completion.chunk`
/// events a streaming call would have produced: per choice a chunk with the
/// role and the whole content (and tool calls), then one with its
/// `finish_reason`; then, if the completion has `usage`, a usage chunk with
/// no choices (as OpenAI sends with `include_usage`). `data: [DONE]` is not
/// included.
pub fn replay_chunks(completion: &Value) -> Vec<Value> {
    let id = completion["id"].clone();
    let created = completion["created"].clone();
    let model = completion["model"].clone();
    let fingerprint = completion
        .get("system_fingerprint")
        .cloned()
        .unwrap_or(Value::Null);
    let chunk = |choices: Value| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": fingerprint, "choices": choices,
        })
    };
    let mut out = Vec::new();
    let empty = Vec::new();
    let choices = completion["choices"].as_array().unwrap_or(&empty);
    for (i, choice) in choices.iter().enumerate() {
        let index = choice.get("index").cloned().unwrap_or(json!(i));
        let msg = &choice["message"];
        let mut delta = json!({
            "role": msg.get("role").cloned().unwrap_or(json!("assistant")),
            "content": msg.get("content").cloned().unwrap_or(Value::Null),
        });
        if let Some(refusal) = msg.get("refusal").filter(|r| !r.is_null()) {
            delta["refusal"] = refusal.clone();
        }
        if let Some(calls) = msg.get("tool_calls").and_then(Value::as_array) {
            let calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(n, c)| {
                    let mut c = c.clone();
                    c["index"] = json!(n);
                    c
                })
                .collect();
            delta["tool_calls"] = Value::Array(calls);
        }
        out.push(chunk(
            json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": null}]),
        ));
        out.push(chunk(json!([{
            "index": index, "delta": {}, "logprobs": null,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_produces_well_formed_chunks() {
        let completion = json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "echo: hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
        });
        let chunks = replay_chunks(&completion);
        assert_eq!(chunks.len(), 3);
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == "chatcmpl-1")
        );
        assert_eq!(chunks[0]["choices"][0]["delta"]["content"], "echo: hi");
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(chunks[1]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[2]["usage"]["total_tokens"], 3);
        assert_eq!(chunks[2]["choices"], json!([]));
        let content: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(content, "echo: hi");
    }

    #[test]
    fn tool_calls_get_indices() {
        let completion = json!({
            "id": "c", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                "finish_reason": "tool_calls"}]
        });
        let chunks = replay_chunks(&completion);
        assert_eq!(
            chunks[0]["choices"][0]["delta"]["tool_calls"][0]["index"],
            0
        );
        assert_eq!(chunks[1]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(chunks.len(), 2);
    }
}
