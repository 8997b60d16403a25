//! The endpoints a Batch API takes, and what Ferry needs to know of each:
//! its path (a batch line's `url`, a batch's `endpoint`), the body field it
//! cannot do without, and how many inputs a body counts for a per-batch
//! input cap (see `../shared/batch-apis.md`, "the other batchable
//! endpoints").

use serde::{Deserialize, Serialize};

/// One batchable endpoint. Stored in request and batch records as its path;
/// records written before endpoints existed read as chat completions.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub enum Endpoint {
    #[default]
    #[serde(rename = "/v1/chat/completions")]
    ChatCompletions,
    #[serde(rename = "/v1/embeddings")]
    Embeddings,
    #[serde(rename = "/v1/completions")]
    Completions,
    #[serde(rename = "/v1/moderations")]
    Moderations,
    #[serde(rename = "/v1/responses")]
    Responses,
    /// Anthropic's Messages API, batched as Message Batches on `kind =
    /// "anthropic"` upstreams.
    #[serde(rename = "/v1/messages")]
    Messages,
}

/// The model a moderation without `model` is queued (and batched) under:
/// the upstream's own default, so that the batch line, which is sent
/// unchanged, and the queue agree on what the upstream will run.
pub const DEFAULT_MODERATION_MODEL: &str = "omni-moderation-latest";

/// OpenAI's cap on the embedding inputs of one batch, summed over its lines.
pub const OPENAI_EMBEDDING_INPUTS_PER_BATCH: u64 = 50_000;

impl Endpoint {
    pub const ALL: [Endpoint; 6] = [
        Endpoint::ChatCompletions,
        Endpoint::Embeddings,
        Endpoint::Completions,
        Endpoint::Moderations,
        Endpoint::Responses,
        Endpoint::Messages,
    ];

    /// The endpoints of OpenAI's Batch API.
    pub const OPENAI: [Endpoint; 5] = [
        Endpoint::ChatCompletions,
        Endpoint::Embeddings,
        Endpoint::Completions,
        Endpoint::Moderations,
        Endpoint::Responses,
    ];

    /// Anthropic's API family rather than OpenAI's.
    pub fn is_anthropic(self) -> bool {
        self == Endpoint::Messages
    }

    /// The path callers post to, a batch line's `url` and a batch's `endpoint`.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Moderations => "/v1/moderations",
            Endpoint::Responses => "/v1/responses",
            Endpoint::Messages => "/v1/messages",
        }
    }

    pub fn from_path(path: &str) -> Option<Endpoint> {
        Endpoint::ALL.into_iter().find(|e| e.path() == path)
    }

    /// A short name: metric labels, route labels, the sled queue key's
    /// endpoint segment. Bounded (six values).
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Completions => "completions",
            Endpoint::Moderations => "moderations",
            Endpoint::Responses => "responses",
            Endpoint::Messages => "messages",
        }
    }

    pub fn from_label(label: &str) -> Option<Endpoint> {
        Endpoint::ALL.into_iter().find(|e| e.label() == label)
    }

    /// The body field the endpoint cannot do without (besides `model`).
    pub fn required_field(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions | Endpoint::Messages => "messages",
            Endpoint::Completions => "prompt",
            Endpoint::Embeddings | Endpoint::Moderations | Endpoint::Responses => "input",
        }
    }

    /// Whether a body may leave out `model` (the upstream then picks one).
    pub fn model_optional(self) -> bool {
        self == Endpoint::Moderations
    }

    /// Whether the endpoint streams in real time (so a held call may ask
    /// for `stream: true` and get a replay).
    pub fn streams(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions
                | Endpoint::Completions
                | Endpoint::Responses
                | Endpoint::Messages
        )
    }

    /// How many inputs a body counts for a per-batch input cap: for
    /// embeddings, each element of an `input` array (a list of strings or
    /// of token arrays); a string or one token array is one. Every other
    /// endpoint counts one per request.
    pub fn inputs(self, body: &serde_json::Value) -> u64 {
        if self != Endpoint::Embeddings {
            return 1;
        }
        match body.get("input") {
            Some(serde_json::Value::Array(items)) => {
                let one_token_array = !items.is_empty() && items.iter().all(|i| i.is_number());
                if one_token_array {
                    1
                } else {
                    (items.len() as u64).max(1)
                }
            }
            _ => 1,
        }
    }

    /// The (prompt, completion) tokens of a result's `usage`: the Responses
    /// API names them `input_tokens`/`output_tokens`; embeddings are priced
    /// on input tokens only, so they never count completion tokens.
    pub fn usage_tokens(self, usage: &serde_json::Value) -> (u64, u64) {
        let n = |key: &str| usage[key].as_u64().unwrap_or(0);
        match self {
            Endpoint::Responses | Endpoint::Messages => (n("input_tokens"), n("output_tokens")),
            Endpoint::Embeddings => (n("prompt_tokens"), 0),
            _ => (n("prompt_tokens"), n("completion_tokens")),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_and_labels_round_trip() {
        for e in Endpoint::ALL {
            assert_eq!(Endpoint::from_path(e.path()), Some(e));
            assert_eq!(Endpoint::from_label(e.label()), Some(e));
            let s = serde_json::to_string(&e).unwrap();
            assert_eq!(s, format!("\"{}\"", e.path()));
            assert_eq!(serde_json::from_str::<Endpoint>(&s).unwrap(), e);
        }
        assert_eq!(Endpoint::from_path("/v1/files"), None);
        assert_eq!(Endpoint::default(), Endpoint::ChatCompletions);
    }

    #[test]
    fn usage_is_read_in_each_endpoint_s_names() {
        let chat = json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7});
        assert_eq!(Endpoint::ChatCompletions.usage_tokens(&chat), (3, 4));
        assert_eq!(Endpoint::Completions.usage_tokens(&chat), (3, 4));
        let emb = json!({"prompt_tokens": 5, "total_tokens": 5});
        assert_eq!(Endpoint::Embeddings.usage_tokens(&emb), (5, 0));
        // Even a provider that reports completion tokens for embeddings
        // is not counted (nor priced) for them.
        assert_eq!(Endpoint::Embeddings.usage_tokens(&chat), (3, 0));
        let resp = json!({"input_tokens": 2, "output_tokens": 6, "total_tokens": 8});
        assert_eq!(Endpoint::Responses.usage_tokens(&resp), (2, 6));
        assert_eq!(Endpoint::Moderations.usage_tokens(&json!(null)), (0, 0));
    }

    #[test]
    fn embedding_inputs_count_each_array_element() {
        let e = Endpoint::Embeddings;
        assert_eq!(e.inputs(&json!({"input": "one"})), 1);
        assert_eq!(e.inputs(&json!({"input": ["a", "b", "c"]})), 3);
        // One tokenized input is one; a list of token arrays is one each.
        assert_eq!(e.inputs(&json!({"input": [1, 2, 3]})), 1);
        assert_eq!(e.inputs(&json!({"input": [[1, 2], [3], [4]]})), 3);
        assert_eq!(e.inputs(&json!({"input": []})), 1);
        assert_eq!(e.inputs(&json!({})), 1);
        for other in [
            Endpoint::ChatCompletions,
            Endpoint::Completions,
            Endpoint::Moderations,
            Endpoint::Responses,
        ] {
            assert_eq!(other.inputs(&json!({"input": ["a", "b"]})), 1);
        }
    }
}
