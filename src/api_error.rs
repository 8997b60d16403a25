//! The OpenAI error envelope, shared by everything that answers HTTP with an
//! error of its own: Ferry's proxy, its admin port and the Batch API emulator.
//!
//! `{"error": {"message": "...", "type": "...", "param": null, "code": "..."}}`

use serde::{Deserialize, Serialize};

/// The `type` values the OpenAI API uses, and so the ones clients branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    InvalidRequestError,
    AuthenticationError,
    RateLimitError,
    ServerError,
    /// Used by Ferry when the upstream could not be reached on passthrough.
    UpstreamError,
}

impl ErrorType {
    /// The `type` that goes with an HTTP status, as the OpenAI API pairs them.
    pub fn for_status(status: u16) -> Self {
        match status {
            401 | 403 => ErrorType::AuthenticationError,
            429 => ErrorType::RateLimitError,
            502 | 504 => ErrorType::UpstreamError,
            s if s >= 500 => ErrorType::ServerError,
            _ => ErrorType::InvalidRequestError,
        }
    }
}

/// The inner object of the envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorObject {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: ErrorType,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// `{"error": {...}}`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    pub error: ErrorObject,
}

impl ErrorEnvelope {
    pub fn new(
        kind: ErrorType,
        message: impl Into<String>,
        param: Option<&str>,
        code: Option<&str>,
    ) -> Self {
        ErrorEnvelope {
            error: ErrorObject {
                message: message.into(),
                kind,
                param: param.map(str::to_owned),
                code: code.map(str::to_owned),
            },
        }
    }

    /// The envelope for an HTTP status, with the `type` that status implies.
    pub fn for_status(
        status: u16,
        message: impl Into<String>,
        param: Option<&str>,
        code: Option<&str>,
    ) -> Self {
        Self::new(ErrorType::for_status(status), message, param, code)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising a struct of strings cannot fail.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{\"error\":{}}".to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_has_openai_shape() {
        let e = ErrorEnvelope::for_status(404, "No such request", Some("id"), Some("not_found"));
        let v: serde_json::Value = serde_json::from_slice(&e.to_bytes()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "id");
        assert_eq!(v["error"]["code"], "not_found");
        assert_eq!(v["error"]["message"], "No such request");
        let e = ErrorEnvelope::for_status(401, "bad key", None, None);
        let v: serde_json::Value = serde_json::from_slice(&e.to_bytes()).unwrap();
        assert_eq!(v["error"]["type"], "authentication_error");
        assert!(v["error"]["param"].is_null());
    }
}
