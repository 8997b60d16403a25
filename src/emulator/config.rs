//! The emulator's knobs: one serde struct, shared by the CLI, a config file
//! section and the run-time `POST /_emulator/config` endpoint.
//!
//! Every key is optional (`#[serde(default)]`) and unknown keys are refused
//! (`deny_unknown_fields`), so a typo in a test's knob fails loudly instead of
//! silently leaving the default in place.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which provider the emulator imitates. The two differ in limits, accepted
/// completion windows and endpoints, and in the shape of the Batch object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// OpenAI: `24h` window only, 50,000 lines and 200 MB per file, Batch
    /// objects with `errors`, `expired_at`, `model` and `usage`.
    Openai,
    /// Moonshot/Kimi: windows `12h`..`7d`, only `/v1/chat/completions`,
    /// 100 MB files, at most 1,000 batch files, a slimmer Batch object, and no
    /// sampling parameters (`temperature`, `top_p`, ...) in batch lines.
    Moonshot,
}

impl std::str::FromStr for Profile {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "openai" => Ok(Profile::Openai),
            "moonshot" | "kimi" => Ok(Profile::Moonshot),
            other => Err(format!(
                "unknown profile `{other}`: expected `openai` or `moonshot`"
            )),
        }
    }
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Profile::Openai => "openai",
            Profile::Moonshot => "moonshot",
        })
    }
}

/// Largest number of request lines in one input file (OpenAI's limit; Moonshot
/// publishes none, so the same number applies).
pub const DEFAULT_MAX_LINES: u64 = 50_000;
/// OpenAI's input file size limit (200 MB).
pub const OPENAI_MAX_FILE_BYTES: u64 = 200 * 1024 * 1024;
/// Moonshot's input file size limit (100 MB).
pub const MOONSHOT_MAX_FILE_BYTES: u64 = 100 * 1024 * 1024;
/// Moonshot's quota of `purpose=batch` files present at once.
pub const MOONSHOT_MAX_BATCH_FILES: u64 = 1_000;

/// The models the emulator knows unless told otherwise: the common OpenAI
/// batch models, the two Kimi models Moonshot serves in batches, and the
/// current Claude models the official `anthropic` SDK lists (one list: an
/// emulator serves both API families at once).
pub fn default_models() -> Vec<String> {
    [
        "gpt-4o-mini",
        "gpt-4o",
        "gpt-4.1-mini",
        "gpt-4.1-nano",
        "gpt-4.1",
        "gpt-5-mini",
        "gpt-5",
        "text-embedding-3-small",
        "omni-moderation-latest",
        "kimi-k2.6",
        "kimi-k2.5",
        "claude-haiku-4-5",
        "claude-sonnet-4-5",
        "claude-sonnet-4-6",
        "claude-opus-4-5",
        "claude-opus-4-6",
        "claude-opus-4-7",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

/// All knobs. `Default` is the OpenAI profile with zero delays and no faults,
/// so a batch is `validating` in the answer to its creation and terminal on its
/// first read.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmulatorConfig {
    /// The bearer token every `/v1/*` call must carry. Default `emulator-key`.
    pub api_key: String,
    /// Which provider to imitate. Default `openai`.
    pub profile: Profile,
    /// Models that requests may name; an unknown one gets `model_not_found`.
    /// An empty list accepts any model. Default: see [`default_models`].
    pub models: Vec<String>,
    /// Seconds a batch stays `validating`. Default 0.
    pub validating_seconds: f64,
    /// Seconds each request line takes while `in_progress` (lines run one after
    /// another, so `request_counts.completed` rises by one per period).
    /// 0 executes every line at once. Default 0.
    pub per_request_seconds: f64,
    /// Seconds a batch stays `finalizing`. Default 0.
    pub finalizing_seconds: f64,
    /// Median of a log-normal distribution each batch's time in
    /// `validating` is drawn from, in place of `validating_seconds`, so
    /// that turnarounds vary as real ones do (the lines and `finalizing`
    /// still add their time). Drawn from `seed` and the batch's rank since
    /// start or the last `seed` change, so a run repeats. `null` (default):
    /// every batch takes `validating_seconds`.
    pub turnaround_median_seconds: Option<f64>,
    /// Spread of that distribution: the standard deviation of the log of the
    /// drawn seconds (0: every batch at the median; 1: a quarter of batches
    /// take under half the median, a quarter over twice it). Default 1.
    pub turnaround_spread: f64,
    /// Seconds a batch stays `cancelling` before it is `cancelled`. Default 0.
    pub cancel_seconds: f64,
    /// Expire every batch this many seconds after creation instead of at the
    /// end of its completion window (which is at least 12 h). `null` (default)
    /// keeps the window.
    pub expire_after_seconds: Option<f64>,
    /// Fail the next N created batches with `token_limit_exceeded`; counts down
    /// as batches are created. Default 0.
    pub fail_next_batches_token_limit: u32,
    /// Fraction (0..=1) of `/v1/*` calls answered with 500 or 503 (alternately)
    /// instead of being served. Default 0.
    pub error_rate: f64,
    /// Milliseconds added to every `/v1/*` call. Default 0.
    pub latency_ms: u64,
    /// Seed of the random generator that picks which calls fail, so a run with
    /// faults repeats. Default 0.
    pub seed: u64,
    /// Override of the profile's largest number of lines per input file.
    /// `null` (default) = 50,000.
    pub max_lines: Option<u64>,
    /// Override of the profile's largest input file, in bytes.
    /// `null` (default) = 200 MB (openai) or 100 MB (moonshot).
    pub max_file_bytes: Option<u64>,
    /// Override of the quota of `purpose=batch` files present at once.
    /// `null` (default) = none (openai) or 1,000 (moonshot).
    pub max_batch_files: Option<u64>,
    /// Models whose real-time chat and responses calls take
    /// `"service_tier": "flex"`; flex on any other is refused with 400.
    /// Default: `gpt-5`, `gpt-5-mini` (OpenAI's list changes; tests set it).
    pub flex_models: Vec<String>,
    /// Milliseconds added to every flex answer (flex is slower). Default 0.
    pub flex_latency_ms: u64,
    /// Fraction (0..=1) of flex calls refused with 429 `resource_unavailable`,
    /// drawn from the generator `seed` seeds. Default 0.
    pub flex_unavailable_rate: f64,
    /// Where to push OpenAI's batch events (`batch.completed`, `.failed`,
    /// `.expired`, `.cancelled`) as each batch ends; `null` (default): none.
    pub events_url: Option<String>,
    /// The `whsec_...` secret the events are signed with (Standard
    /// Webhooks); required with `events_url`.
    pub events_secret: Option<String>,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            api_key: "emulator-key".to_owned(),
            profile: Profile::Openai,
            models: default_models(),
            validating_seconds: 0.0,
            per_request_seconds: 0.0,
            finalizing_seconds: 0.0,
            turnaround_median_seconds: None,
            turnaround_spread: 1.0,
            cancel_seconds: 0.0,
            expire_after_seconds: None,
            fail_next_batches_token_limit: 0,
            error_rate: 0.0,
            latency_ms: 0,
            seed: 0,
            max_lines: None,
            max_file_bytes: None,
            max_batch_files: None,
            flex_models: vec!["gpt-5".to_owned(), "gpt-5-mini".to_owned()],
            flex_latency_ms: 0,
            flex_unavailable_rate: 0.0,
            events_url: None,
            events_secret: None,
        }
    }
}

impl EmulatorConfig {
    /// Checks the values serde cannot: ranges and finiteness. The message names
    /// the key.
    pub fn validate(&self) -> Result<(), String> {
        let durations = [
            ("validating_seconds", Some(self.validating_seconds)),
            ("per_request_seconds", Some(self.per_request_seconds)),
            ("finalizing_seconds", Some(self.finalizing_seconds)),
            ("cancel_seconds", Some(self.cancel_seconds)),
            ("expire_after_seconds", self.expire_after_seconds),
            ("turnaround_median_seconds", self.turnaround_median_seconds),
            ("turnaround_spread", Some(self.turnaround_spread)),
        ];
        for (key, value) in durations {
            if let Some(v) = value
                && !(v.is_finite() && v >= 0.0)
            {
                return Err(format!(
                    "`{key}` must be a finite number of seconds >= 0, got {v}"
                ));
            }
        }
        if !(self.flex_unavailable_rate.is_finite()
            && (0.0..=1.0).contains(&self.flex_unavailable_rate))
        {
            return Err(format!(
                "`flex_unavailable_rate` must be between 0 and 1, got {}",
                self.flex_unavailable_rate
            ));
        }
        match (&self.events_url, &self.events_secret) {
            (None, _) => {}
            (Some(_), None) => return Err("`events_url` needs `events_secret`".into()),
            (Some(_), Some(secret)) => {
                crate::delivery::webhooks::decode_secret(secret)
                    .map_err(|m| format!("`events_secret`: {m}"))?;
            }
        }
        if !(self.error_rate.is_finite() && (0.0..=1.0).contains(&self.error_rate)) {
            return Err(format!(
                "`error_rate` must be between 0 and 1, got {}",
                self.error_rate
            ));
        }
        if self.api_key.is_empty() {
            return Err("`api_key` must not be empty".to_owned());
        }
        if self.max_lines == Some(0) {
            return Err("`max_lines` must be at least 1".to_owned());
        }
        Ok(())
    }

    /// Largest number of request lines per input file.
    pub fn max_lines(&self) -> u64 {
        self.max_lines.unwrap_or(DEFAULT_MAX_LINES)
    }

    /// Largest upload of `purpose=batch`, in bytes.
    pub fn max_file_bytes(&self) -> u64 {
        self.max_file_bytes.unwrap_or(match self.profile {
            Profile::Openai => OPENAI_MAX_FILE_BYTES,
            Profile::Moonshot => MOONSHOT_MAX_FILE_BYTES,
        })
    }

    /// How many `purpose=batch` files may exist at once, if limited.
    pub fn max_batch_files(&self) -> Option<u64> {
        self.max_batch_files.or(match self.profile {
            Profile::Openai => None,
            Profile::Moonshot => Some(MOONSHOT_MAX_BATCH_FILES),
        })
    }

    /// Seconds the batch of rank `rank` (0 for the first created since start
    /// or the last `seed` change) stays `validating`: `validating_seconds`,
    /// or a draw when `turnaround_median_seconds` is set.
    pub fn validating_seconds_for(&self, rank: u64) -> f64 {
        match self.turnaround_median_seconds {
            None => self.validating_seconds,
            Some(median) => {
                super::timeline::drawn_turnaround(median, self.turnaround_spread, self.seed, rank)
            }
        }
    }

    /// Whether `model` may be used: any model when the list is empty.
    pub fn knows_model(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }

    /// Merges a partial JSON object (any subset of the keys) into a copy of this
    /// config and returns the result, validated. Unknown keys and wrong types
    /// are refused with a message naming them.
    pub fn merged(&self, patch: &Value) -> Result<EmulatorConfig, String> {
        let Value::Object(patch) = patch else {
            return Err("the config patch must be a JSON object".to_owned());
        };
        let mut current = serde_json::to_value(self).map_err(|e| e.to_string())?;
        let Value::Object(fields) = &mut current else {
            return Err("the config is not a JSON object".to_owned());
        };
        for (key, value) in patch {
            fields.insert(key.clone(), value.clone());
        }
        let merged: EmulatorConfig =
            serde_json::from_value(current).map_err(|e| format!("invalid config: {e}"))?;
        merged.validate()?;
        Ok(merged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn default_is_openai_without_delays_or_faults() {
        let c = EmulatorConfig::default();
        assert_eq!(c.profile, Profile::Openai);
        assert_eq!(c.api_key, "emulator-key");
        assert_eq!(c.validating_seconds, 0.0);
        assert_eq!(c.error_rate, 0.0);
        assert_eq!(c.max_lines(), 50_000);
        assert_eq!(c.max_file_bytes(), 200 * 1024 * 1024);
        assert_eq!(c.max_batch_files(), None);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn moonshot_limits() {
        let c = EmulatorConfig {
            profile: Profile::Moonshot,
            ..Default::default()
        };
        assert_eq!(c.max_file_bytes(), 100 * 1024 * 1024);
        assert_eq!(c.max_batch_files(), Some(1_000));
    }

    #[test]
    fn merge_takes_a_subset_and_refuses_unknown_keys() {
        let c = EmulatorConfig::default();
        let m = c
            .merged(&json!({"profile": "moonshot", "latency_ms": 5}))
            .unwrap();
        assert_eq!(m.profile, Profile::Moonshot);
        assert_eq!(m.latency_ms, 5);
        assert_eq!(m.api_key, c.api_key);
        let err = c.merged(&json!({"latency": 5})).unwrap_err();
        assert!(err.contains("latency"), "{err}");
        assert!(c.merged(&json!({"error_rate": 2.0})).is_err());
        assert!(c.merged(&json!({"validating_seconds": -1})).is_err());
        assert!(c.merged(&json!([1])).is_err());
    }

    #[test]
    fn turnaround_draws_replace_validating_seconds_only_when_asked() {
        let c = EmulatorConfig {
            validating_seconds: 7.0,
            ..Default::default()
        };
        assert_eq!(c.validating_seconds_for(0), 7.0);
        assert_eq!(c.validating_seconds_for(9), 7.0);
        let m = c
            .merged(&json!({"turnaround_median_seconds": 60, "turnaround_spread": 0.5, "seed": 3}))
            .unwrap();
        let drawn: Vec<f64> = (0..4).map(|r| m.validating_seconds_for(r)).collect();
        assert!(drawn.iter().all(|s| *s > 0.0 && *s != 7.0), "{drawn:?}");
        assert_ne!(drawn[0], drawn[1]);
        assert_eq!(
            drawn[2],
            m.validating_seconds_for(2),
            "a rank draws the same"
        );
        assert!(c.merged(&json!({"turnaround_median_seconds": -1})).is_err());
        assert!(c.merged(&json!({"turnaround_spread": "wide"})).is_err());
    }

    #[test]
    fn deserializes_from_toml_section() {
        let c: EmulatorConfig =
            toml::from_str("profile = \"moonshot\"\nper_request_seconds = 2.5\nmodels = []\n")
                .unwrap();
        assert_eq!(c.profile, Profile::Moonshot);
        assert_eq!(c.per_request_seconds, 2.5);
        assert!(c.knows_model("anything"));
    }
}
