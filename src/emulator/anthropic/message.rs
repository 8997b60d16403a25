//! The deterministic model behind `POST /v1/messages` and the Message
//! Batches, on the same rule as the OpenAI side (see [`model`]): the text is
//! `echo: ` and the last user message, usage counts words, and
//! `[emulator:status=NNN]` in a user message fails the request with NNN and
//! Anthropic's error body. Plus the checks the API makes on a body.

use serde_json::{Map, Value, json};

use crate::anthropic::error_body;
use crate::emulator::model::{self, Answer, Usage};

/// A refused body: the status and message of the error.
pub type Refusal = (u16, String);

/// The checks of a `/v1/messages` body (real time, or `params` of a batch
/// request): `model` a known one, `max_tokens` a positive integer,
/// `messages` a non-empty array. `knows` says whether a model exists.
pub fn check(body: &Map<String, Value>, knows: &dyn Fn(&str) -> bool) -> Result<(), Refusal> {
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m,
        _ => return Err((400, "model: Field required".to_owned())),
    };
    match body.get("max_tokens") {
        Some(v) if v.as_u64().is_some_and(|n| n >= 1) => {}
        Some(_) => {
            return Err((
                400,
                "max_tokens: Input should be a valid integer greater than or equal to 1".to_owned(),
            ));
        }
        None => return Err((400, "max_tokens: Field required".to_owned())),
    }
    match body.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => {}
        Some(Value::Array(_)) => {
            return Err((400, "messages: at least one message is required".to_owned()));
        }
        _ => return Err((400, "messages: Field required".to_owned())),
    }
    if !knows(model) {
        return Err((404, format!("model: {model}")));
    }
    Ok(())
}

/// Answers a checked body with a `message` (or the injected failure).
pub fn answer(body: &Map<String, Value>, id: &str) -> Answer {
    if let Some(status) = model::chat_injected_status(body) {
        return Answer::Failed {
            status,
            body: error_body(
                status,
                format!(
                    "The emulator failed this request with status {status}, as [emulator:status={status}] asked."
                ),
            ),
        };
    }
    let (text, usage) = model::chat_reply(body);
    Answer::Ok {
        body: message(body, id, &text, usage),
        usage,
    }
}

fn message(body: &Map<String, Value>, id: &str, text: &str, usage: Usage) -> Value {
    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": body.get("model").and_then(Value::as_str).unwrap_or_default(),
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {
            "input_tokens": usage.prompt,
            "output_tokens": usage.completion,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    })
}

/// `POST /v1/messages/count_tokens`: the prompt's word count.
pub fn count_tokens(body: &Map<String, Value>) -> Value {
    let (_, usage) = model::chat_reply(body);
    json!({"input_tokens": usage.prompt})
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
    fn checks_like_the_api() {
        let knows = |m: &str| m.starts_with("claude-");
        let ok = json!({"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(check(&body(ok.clone()), &knows), Ok(()));
        let mut no_max = ok.clone();
        no_max.as_object_mut().unwrap().remove("max_tokens");
        assert_eq!(check(&body(no_max), &knows).unwrap_err().0, 400);
        let mut unknown = ok.clone();
        unknown["model"] = json!("gpt-4o");
        assert_eq!(check(&body(unknown), &knows).unwrap_err().0, 404);
        let mut empty = ok;
        empty["messages"] = json!([]);
        assert_eq!(check(&body(empty), &knows).unwrap_err().0, 400);
    }

    #[test]
    fn answers_a_message_or_the_injected_error() {
        let b = body(json!({"model": "claude-haiku-4-5", "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a b"}]}]}));
        let Answer::Ok { body: m, usage } = answer(&b, "msg_1") else {
            panic!("expected a message")
        };
        assert_eq!(m["content"][0]["text"], "echo: a b");
        assert_eq!(m["usage"]["output_tokens"], 3);
        assert_eq!(usage.prompt, 2);
        let bad = body(json!({"model": "claude-haiku-4-5", "max_tokens": 5,
            "messages": [{"role": "user", "content": "[emulator:status=529]"}]}));
        let Answer::Failed { status, body } = answer(&bad, "msg_2") else {
            panic!("expected a failure")
        };
        assert_eq!(status, 529);
        assert_eq!(body["error"]["type"], "overloaded_error");
    }
}
