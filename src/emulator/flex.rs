//! OpenAI's flex tier on the real-time routes (chat completions and
//! responses): `"service_tier": "flex"` is taken for the models in
//! `flex_models` and refused with `400` for others, answered more slowly
//! (`flex_latency_ms`), refused now and then with `429`
//! `resource_unavailable` (`flex_unavailable_rate`, drawn from the seeded
//! generator so a run repeats), and the answer says `"service_tier": "flex"`.

use serde_json::{Map, Value};

use super::config::EmulatorConfig;
use super::error::ApiError;

/// The endpoints that take a service tier.
const TIERED: [&str; 2] = ["/v1/chat/completions", "/v1/responses"];

/// Whether the call to `endpoint` for `model` asks for flex, and may have
/// it: `Ok(true)` for flex, `Ok(false)` for any other tier (or none), `400`
/// for flex on a model or endpoint without it and for a tier that is not a
/// string.
pub fn requested(
    endpoint: &str,
    body: &Map<String, Value>,
    model: &str,
    config: &EmulatorConfig,
) -> Result<bool, ApiError> {
    match body.get("service_tier") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::String(t)) if t == "flex" => {
            if TIERED.contains(&endpoint) && config.flex_models.iter().any(|m| m == model) {
                Ok(true)
            } else {
                Err(ApiError::bad_request(
                    format!(
                        "The flex service tier is not available for model `{model}` on {endpoint}."
                    ),
                    Some("service_tier"),
                    Some("invalid_value"),
                ))
            }
        }
        Some(Value::String(_)) => Ok(false),
        Some(_) => Err(ApiError::bad_request(
            "Invalid type for 'service_tier': expected a string.",
            Some("service_tier"),
            Some("invalid_type"),
        )),
    }
}

/// The refusal of a flex call when capacity is short (not billed).
pub fn unavailable() -> ApiError {
    ApiError::new(
        429,
        "Resource unavailable: flex processing capacity is short right now (injected by the \
         emulator's flex_unavailable_rate). Retry later or use the default service tier.",
        None,
        Some("resource_unavailable"),
    )
}

/// Marks an answer as served on flex.
pub fn mark(answer: &mut Value) {
    if let Some(o) = answer.as_object_mut() {
        o.insert("service_tier".into(), Value::from("flex"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn flex_is_taken_only_for_its_models_and_endpoints() {
        let config = EmulatorConfig {
            flex_models: vec!["gpt-5-mini".into()],
            ..EmulatorConfig::default()
        };
        let flex = body(json!({"service_tier": "flex"}));
        let chat = "/v1/chat/completions";
        assert!(requested(chat, &flex, "gpt-5-mini", &config).unwrap());
        assert!(requested("/v1/responses", &flex, "gpt-5-mini", &config).unwrap());
        for (endpoint, model) in [(chat, "gpt-4o"), ("/v1/embeddings", "gpt-5-mini")] {
            let e = requested(endpoint, &flex, model, &config).unwrap_err();
            assert_eq!(e.status.as_u16(), 400);
            assert_eq!(e.envelope.error.param.as_deref(), Some("service_tier"));
        }
        for other in [
            json!({}),
            json!({"service_tier": "auto"}),
            json!({"service_tier": null}),
        ] {
            assert!(!requested(chat, &body(other), "gpt-4o", &config).unwrap());
        }
        assert!(
            requested(
                chat,
                &body(json!({"service_tier": 1})),
                "gpt-5-mini",
                &config
            )
            .is_err()
        );
        assert_eq!(unavailable().status.as_u16(), 429);
        assert_eq!(
            unavailable().envelope.error.code.as_deref(),
            Some("resource_unavailable")
        );
        let mut a = json!({"service_tier": "default"});
        mark(&mut a);
        assert_eq!(a["service_tier"], "flex");
    }
}
