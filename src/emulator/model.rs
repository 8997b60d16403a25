//! The emulator's deterministic "model", so tests can predict every answer.
//!
//! - The assistant's content is `echo: ` followed by the text of the last user
//!   message.
//! - `usage` counts whitespace-separated words: prompt = the text of every
//!   message, completion = the content.
//! - `model` is the requested model and `finish_reason` is `stop`.
//! - A user message containing `[emulator:status=NNN]` (NNN from 400 to 599)
//!   makes the request fail with HTTP status NNN and an OpenAI error body.
//!
//! The other batch endpoints of the OpenAI profile get small answers of their
//! own shape built on the same rule (`/v1/completions` echoes the prompt,
//! `/v1/responses` the input; `/v1/embeddings` returns one vector per input,
//! derived from its text, of the requested `dimensions` (default 8), as
//! floats or, with `encoding_format: "base64"`, little-endian f32s in
//! base64; `/v1/moderations` returns one result per input, flagged for
//! `violence` when the text contains "attack").

use serde_json::{Map, Value, json};

use crate::api_error::ErrorEnvelope;

/// The `system_fingerprint` every answer carries.
pub const FINGERPRINT: &str = "fp_emulator";

/// Word counts of one answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt + self.completion
    }

    /// The chat-completions `usage` object.
    pub fn to_chat_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.total(),
        })
    }
}

/// A computed answer: a successful body with its usage, or an HTTP failure.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    Ok { body: Value, usage: Usage },
    Failed { status: u16, body: Value },
}

impl Answer {
    pub fn status(&self) -> u16 {
        match self {
            Answer::Ok { .. } => 200,
            Answer::Failed { status, .. } => *status,
        }
    }
}

/// The text of a message's `content`: a string, or the `text` of its parts.
pub fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| match p {
                Value::String(s) => Some(s.as_str()),
                other => other.get("text").and_then(Value::as_str),
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// The status a `[emulator:status=NNN]` marker asks for, if any (400..=599).
pub fn injected_status(text: &str) -> Option<u16> {
    const MARK: &str = "[emulator:status=";
    let mut rest = text;
    while let Some(at) = rest.find(MARK) {
        let after = &rest[at + MARK.len()..];
        if let Some(end) = after.find(']')
            && let Ok(status) = after[..end].parse::<u16>()
            && (400..=599).contains(&status)
        {
            return Some(status);
        }
        rest = after;
    }
    None
}

/// The error body of an injected failure, with the code the OpenAI API uses
/// for that status.
pub fn injected_error(status: u16) -> Value {
    let code = match status {
        400 => Some("invalid_request"),
        401 => Some("invalid_api_key"),
        404 => Some("not_found"),
        429 => Some("rate_limit_exceeded"),
        s if s >= 500 => Some("server_error"),
        _ => None,
    };
    let envelope = ErrorEnvelope::for_status(
        status,
        format!(
            "The emulator failed this request with status {status}, as [emulator:status={status}] asked."
        ),
        None,
        code,
    );
    serde_json::to_value(envelope).unwrap_or(Value::Null)
}

/// The messages of a chat body (an empty slice when absent).
fn messages(body: &Map<String, Value>) -> &[Value] {
    body.get("messages")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn model_of(body: &Map<String, Value>) -> &str {
    body.get("model").and_then(Value::as_str).unwrap_or("")
}

/// The status a chat body's user messages inject, if any.
pub fn chat_injected_status(body: &Map<String, Value>) -> Option<u16> {
    messages(body)
        .iter()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .find_map(|m| injected_status(&content_text(m.get("content"))))
}

/// The assistant content and usage for a chat body.
pub fn chat_reply(body: &Map<String, Value>) -> (String, Usage) {
    let msgs = messages(body);
    let last_user = msgs
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| content_text(m.get("content")))
        .unwrap_or_default();
    let content = format!("echo: {last_user}");
    let prompt = msgs
        .iter()
        .map(|m| words(&content_text(m.get("content"))))
        .sum();
    let usage = Usage {
        prompt,
        completion: words(&content),
    };
    (content, usage)
}

/// Answers a `/v1/chat/completions` body.
pub fn chat_completion(body: &Map<String, Value>, id: &str, created: i64) -> Answer {
    if let Some(status) = chat_injected_status(body) {
        return Answer::Failed {
            status,
            body: injected_error(status),
        };
    }
    let (content, usage) = chat_reply(body);
    let body = json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model_of(body),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": null, "annotations": []},
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": usage.to_chat_json(),
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
    });
    Answer::Ok { body, usage }
}

/// The text of an `input` / `prompt` value: a string, the strings of an array,
/// or the content of input messages.
fn input_text(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => s.clone(),
                other => content_text(other.get("content")),
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// Answers a line of any batch endpoint; `endpoint` is the batch's.
pub fn answer(endpoint: &str, body: &Map<String, Value>, id: &str, created: i64) -> Answer {
    let model = model_of(body);
    match endpoint {
        "/v1/messages" => super::anthropic::message::answer(body, id),
        "/v1/embeddings" | "/v1/moderations" => per_input(endpoint, body, id, model),
        "/v1/completions" | "/v1/responses" => {
            let key = if endpoint == "/v1/completions" {
                "prompt"
            } else {
                "input"
            };
            let text = input_text(body.get(key));
            if let Some(status) = injected_status(&text) {
                return Answer::Failed {
                    status,
                    body: injected_error(status),
                };
            }
            let content = format!("echo: {text}");
            let usage = Usage {
                prompt: words(&text),
                completion: words(&content),
            };
            let body = match endpoint {
                "/v1/completions" => json!({
                    "id": id, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"text": content, "index": 0, "logprobs": null, "finish_reason": "stop"}],
                    "usage": usage.to_chat_json(),
                }),
                _ => json!({
                    "id": id, "object": "response", "created_at": created, "status": "completed",
                    "model": model, "error": null, "incomplete_details": null,
                    "output": [{"type": "message", "id": format!("msg_{id}"), "status": "completed",
                                "role": "assistant",
                                "content": [{"type": "output_text", "text": content, "annotations": []}]}],
                    "usage": {"input_tokens": usage.prompt, "output_tokens": usage.completion,
                              "total_tokens": usage.total(),
                              "input_tokens_details": {"cached_tokens": 0},
                              "output_tokens_details": {"reasoning_tokens": 0}},
                }),
            };
            Answer::Ok { body, usage }
        }
        _ => chat_completion(body, id, created),
    }
}

/// The inputs of an embeddings or moderations body, each as text: the
/// elements of an `input` array (anything not a string as its JSON), or the
/// one string or token array.
pub fn inputs(body: &Map<String, Value>) -> Vec<String> {
    match body.get("input") {
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_number) => {
            vec![Value::Array(items.clone()).to_string()]
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => vec![String::new()],
    }
}

/// The per-input endpoints: one embedding or one moderation result per input.
fn per_input(endpoint: &str, body: &Map<String, Value>, id: &str, model: &str) -> Answer {
    let items = inputs(body);
    if let Some(status) = items.iter().find_map(|t| injected_status(t)) {
        return Answer::Failed {
            status,
            body: injected_error(status),
        };
    }
    let usage = Usage {
        prompt: items.iter().map(|t| words(t)).sum(),
        completion: 0,
    };
    let body = if endpoint == "/v1/embeddings" {
        let dimensions = body
            .get("dimensions")
            .and_then(Value::as_u64)
            .unwrap_or(8)
            .clamp(1, 4096) as usize;
        let base64 = body.get("encoding_format") == Some(&json!("base64"));
        let data: Vec<Value> = items
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let v = embedding(t, dimensions);
                let encoded = if base64 {
                    use base64::Engine;
                    let bytes: Vec<u8> = v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(v)
                };
                json!({"object": "embedding", "index": i, "embedding": encoded})
            })
            .collect();
        json!({
            "object": "list", "model": model, "data": data,
            "usage": {"prompt_tokens": usage.prompt, "total_tokens": usage.prompt},
        })
    } else {
        let results: Vec<Value> = items.iter().map(|t| moderation(t)).collect();
        json!({"id": format!("modr-{id}"), "model": model, "results": results})
    };
    Answer::Ok { body, usage }
}

/// The moderation categories, as the API names them.
const CATEGORIES: [&str; 13] = [
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
];

/// One moderation result: `violence` flagged when the text says "attack".
fn moderation(text: &str) -> Value {
    let violent = text.to_lowercase().contains("attack");
    let mut categories = Map::new();
    let mut scores = Map::new();
    let mut applied = Map::new();
    for c in CATEGORIES {
        let hit = violent && c == "violence";
        categories.insert(c.into(), json!(hit));
        scores.insert(c.into(), json!(if hit { 0.9 } else { 0.001 }));
        applied.insert(c.into(), json!(["text"]));
    }
    json!({
        "flagged": violent, "categories": categories, "category_scores": scores,
        "category_applied_input_types": applied,
    })
}

/// `dimensions` numbers in [-1, 1) derived from the text's bytes (FNV-1a),
/// so the same input always embeds the same way.
fn embedding(text: &str, dimensions: usize) -> Vec<f64> {
    (0u64..dimensions as u64)
        .map(|i| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ i;
            for b in text.bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            (h % 2000) as f64 / 1000.0 - 1.0
        })
        .collect()
}

/// The pieces a streamed answer is cut into: the content split after each
/// run of whitespace, so that concatenating them gives the content back.
pub fn stream_pieces(content: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut in_space = false;
    for (i, c) in content.char_indices() {
        if c.is_whitespace() {
            in_space = true;
        } else if in_space {
            pieces.push(&content[start..i]);
            start = i;
            in_space = false;
        }
    }
    if start < content.len() || pieces.is_empty() {
        pieces.push(&content[start..]);
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn echoes_last_user_message_and_counts_words() {
        let b = body(json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "an answer"},
                {"role": "user", "content": [{"type": "text", "text": "hello there"}, {"type": "text", "text": "world"}]}
            ]
        }));
        let Answer::Ok { body: out, usage } = chat_completion(&b, "chatcmpl-1", 7) else {
            panic!("expected success")
        };
        assert_eq!(
            out["choices"][0]["message"]["content"],
            "echo: hello there world"
        );
        assert_eq!(out["model"], "gpt-4o-mini");
        assert_eq!(out["choices"][0]["finish_reason"], "stop");
        assert_eq!(out["created"], 7);
        // 2 + 2 + 2 + 3 prompt words; "echo:" + 3 completion words.
        assert_eq!(
            usage,
            Usage {
                prompt: 9,
                completion: 4
            }
        );
        assert_eq!(out["usage"]["total_tokens"], 13);
    }

    #[test]
    fn status_marker_fails_the_request() {
        let b = body(
            json!({"model": "m", "messages": [{"role": "user", "content": "x [emulator:status=429] y"}]}),
        );
        let a = chat_completion(&b, "id", 0);
        assert_eq!(a.status(), 429);
        let Answer::Failed { body: err, .. } = a else {
            panic!()
        };
        assert_eq!(err["error"]["type"], "rate_limit_error");
        assert_eq!(injected_status("[emulator:status=200]"), None);
        assert_eq!(
            injected_status("[emulator:status=abc] [emulator:status=503]"),
            Some(503)
        );
        assert_eq!(injected_status("[emulator:status=500"), None);
        // Only user messages inject.
        let b = body(
            json!({"model": "m", "messages": [{"role": "system", "content": "[emulator:status=500]"}]}),
        );
        assert_eq!(chat_completion(&b, "id", 0).status(), 200);
    }

    #[test]
    fn other_endpoints() {
        let b = body(json!({"model": "m", "prompt": "say it"}));
        let Answer::Ok { body: out, .. } = answer("/v1/completions", &b, "cmpl-1", 0) else {
            panic!()
        };
        assert_eq!(out["choices"][0]["text"], "echo: say it");
        let b = body(json!({"model": "m", "input": "abc"}));
        let Answer::Ok { body: e1, .. } = answer("/v1/embeddings", &b, "x", 0) else {
            panic!()
        };
        let Answer::Ok { body: e2, .. } = answer("/v1/embeddings", &b, "y", 0) else {
            panic!()
        };
        assert_eq!(e1["data"][0]["embedding"], e2["data"][0]["embedding"]);
        assert_eq!(e1["data"][0]["embedding"].as_array().unwrap().len(), 8);
        let b = body(json!({"model": "m", "input": ["a", "b", "c"], "dimensions": 3}));
        let Answer::Ok { body: e3, .. } = answer("/v1/embeddings", &b, "z", 0) else {
            panic!()
        };
        assert_eq!(e3["data"].as_array().unwrap().len(), 3);
        assert_eq!(e3["data"][2]["index"], 2);
        assert_eq!(e3["data"][0]["embedding"].as_array().unwrap().len(), 3);
        let b = body(json!({"model": "m", "input": "abc", "encoding_format": "base64"}));
        let Answer::Ok { body: e4, .. } = answer("/v1/embeddings", &b, "w", 0) else {
            panic!()
        };
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(e4["data"][0]["embedding"].as_str().unwrap())
            .unwrap();
        assert_eq!(raw.len(), 8 * 4);
        let b = body(json!({"model": "m", "input": ["plan an attack", "hello"]}));
        let Answer::Ok { body: m, .. } = answer("/v1/moderations", &b, "1", 0) else {
            panic!()
        };
        assert_eq!(m["results"][0]["flagged"], true);
        assert_eq!(m["results"][0]["categories"]["violence"], true);
        assert_eq!(m["results"][1]["flagged"], false);
        let b = body(json!({"model": "m", "input": "abc"}));
        let Answer::Ok { body: r, .. } = answer("/v1/responses", &b, "resp_1", 0) else {
            panic!()
        };
        assert_eq!(r["output"][0]["content"][0]["text"], "echo: abc");
    }

    #[test]
    fn stream_pieces_rebuild_the_content() {
        for s in ["echo: hello  big world ", "echo: ", "", "a"] {
            assert_eq!(stream_pieces(s).concat(), s);
        }
        assert_eq!(stream_pieces("echo: a b"), vec!["echo: ", "a ", "b"]);
    }
}
