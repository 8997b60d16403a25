//! The one error type of the emulator's HTTP layer: a status and the OpenAI
//! error envelope, which is what every failed call answers with.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::api_error::ErrorEnvelope;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub envelope: ErrorEnvelope,
}

impl ApiError {
    /// An error with the `type` its status implies.
    pub fn new(
        status: u16,
        message: impl Into<String>,
        param: Option<&str>,
        code: Option<&str>,
    ) -> Self {
        ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            envelope: ErrorEnvelope::for_status(status, message, param, code),
        }
    }

    /// 400 `invalid_request_error`.
    pub fn bad_request(
        message: impl Into<String>,
        param: Option<&str>,
        code: Option<&str>,
    ) -> Self {
        Self::new(400, message, param, code)
    }

    /// 400 for a missing parameter, worded as the OpenAI API words it.
    pub fn missing(param: &str) -> Self {
        Self::bad_request(
            format!("Missing required parameter: '{param}'."),
            Some(param),
            Some("missing_required_parameter"),
        )
    }

    /// 404 `invalid_request_error`.
    pub fn not_found(message: impl Into<String>, param: Option<&str>) -> Self {
        Self::new(404, message, param, None)
    }

    /// 500 for the emulator's own trouble (never for bad input).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, message, None, Some("server_error"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            self.envelope.to_bytes(),
        )
            .into_response()
    }
}
