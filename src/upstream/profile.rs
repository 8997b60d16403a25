//! What Ferry knows about each provider's Batch API: limits, completion
//! windows and the body parameters its batch lines refuse
//! (see `../shared/batch-apis.md`).

use serde::Deserialize;

use crate::endpoint::Endpoint;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Openai,
    Moonshot,
    /// Any other OpenAI-shaped provider (Groq, Gemini's compatibility layer,
    /// ...): OpenAI's paths, tolerant of missing keys, limits as configured.
    Generic,
    /// Anthropic's Messages API and Message Batches (requests inline, no
    /// files): `x-api-key` and `anthropic-version` instead of a bearer key.
    Anthropic,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Moonshot => "moonshot",
            ProviderKind::Generic => "generic",
            ProviderKind::Anthropic => "anthropic",
        }
    }

    /// Anthropic's API family rather than OpenAI's.
    pub fn is_anthropic(self) -> bool {
        self == ProviderKind::Anthropic
    }
}

#[derive(Debug, Clone)]
pub struct ProviderProfile {
    pub kind: ProviderKind,
    /// Most lines in one input file.
    pub max_lines: usize,
    /// Largest input file.
    pub max_file_bytes: u64,
    pub default_window: &'static str,
    /// Body parameters the provider's batch lines refuse; a deferred call
    /// setting one is answered 400 at intake rather than failing hours later.
    pub forbidden_params: Vec<String>,
    /// Batch creations per hour the provider allows.
    pub batches_per_hour: u32,
    /// The endpoints its Batch API takes.
    pub batch_endpoints: &'static [Endpoint],
    /// Anthropic: deferred calls' `cache_control` breakpoints get the 1-hour
    /// TTL (`cache_ttl_1h`, off by default).
    pub cache_ttl_1h: bool,
}

const MB: u64 = 1024 * 1024;

/// Anthropic's "256 MB" per Message Batch create body, read as decimal
/// megabytes: the smaller of the two readings holds under either, and a
/// create refused for its size (`413 request_too_large`) fails every
/// request in it.
pub const ANTHROPIC_MAX_BATCH_BYTES: u64 = 256_000_000;

impl ProviderProfile {
    pub fn for_kind(kind: ProviderKind) -> Self {
        match kind {
            ProviderKind::Openai => ProviderProfile {
                kind,
                max_lines: 50_000,
                max_file_bytes: 200 * MB,
                default_window: "24h",
                forbidden_params: Vec::new(),
                batches_per_hour: 2_000,
                batch_endpoints: &Endpoint::OPENAI,
                cache_ttl_1h: false,
            },
            ProviderKind::Moonshot => ProviderProfile {
                kind,
                max_lines: 50_000,
                max_file_bytes: 100 * MB,
                default_window: "24h",
                forbidden_params: [
                    "temperature",
                    "top_p",
                    "n",
                    "presence_penalty",
                    "frequency_penalty",
                ]
                .map(String::from)
                .to_vec(),
                batches_per_hour: 2_000,
                batch_endpoints: &[Endpoint::ChatCompletions],
                cache_ttl_1h: false,
            },
            ProviderKind::Anthropic => ProviderProfile {
                kind,
                max_lines: 100_000,
                max_file_bytes: ANTHROPIC_MAX_BATCH_BYTES,
                default_window: "24h",
                forbidden_params: Vec::new(),
                batches_per_hour: 2_000,
                batch_endpoints: &[Endpoint::Messages],
                cache_ttl_1h: false,
            },
            ProviderKind::Generic => ProviderProfile {
                kind,
                max_lines: 50_000,
                max_file_bytes: 100 * MB,
                default_window: "24h",
                forbidden_params: Vec::new(),
                batches_per_hour: 1_000,
                // What OpenAI-shaped providers batch besides OpenAI varies;
                // chat completions is the one they all take.
                batch_endpoints: &[Endpoint::ChatCompletions],
                cache_ttl_1h: false,
            },
        }
    }

    /// Whether the provider's Batch API takes `endpoint`.
    pub fn batches(&self, endpoint: Endpoint) -> bool {
        self.batch_endpoints.contains(&endpoint)
    }

    /// Checks a `completion_window` against what the provider accepts.
    pub fn check_window(&self, window: &str) -> Result<(), String> {
        match self.kind {
            ProviderKind::Openai | ProviderKind::Anthropic => {
                if window == "24h" {
                    Ok(())
                } else {
                    Err(format!(
                        "{} accepts only \"24h\", not \"{window}\"",
                        self.kind.as_str()
                    ))
                }
            }
            ProviderKind::Moonshot => match window_seconds(window) {
                Some(s) if (12 * 3600..=7 * 86400).contains(&s) => Ok(()),
                _ => Err(format!(
                    "Moonshot accepts a duration from 12h to 7d such as \"24h\" or \"3d\", not \"{window}\""
                )),
            },
            ProviderKind::Generic => match window_seconds(window) {
                Some(s) if s > 0 => Ok(()),
                _ => Err(format!("`{window}` is not a duration such as \"24h\"")),
            },
        }
    }
}

/// `"24h"` → 86400, `"3d"` → 259200, `"90m"` → 5400.
pub fn window_seconds(w: &str) -> Option<u64> {
    let (num, unit) = w.split_at(w.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_each_provider() {
        let o = ProviderProfile::for_kind(ProviderKind::Openai);
        assert!(o.check_window("24h").is_ok());
        assert!(o.check_window("1d").is_err());
        let m = ProviderProfile::for_kind(ProviderKind::Moonshot);
        for ok in ["12h", "1d", "3d", "7d", "24h"] {
            assert!(m.check_window(ok).is_ok(), "{ok}");
        }
        for bad in ["11h", "8d", "", "d", "12x"] {
            assert!(m.check_window(bad).is_err(), "{bad}");
        }
        assert_eq!(window_seconds("90m"), Some(5400));
        assert_eq!(window_seconds("h"), None);
    }

    #[test]
    fn openai_batches_every_endpoint_moonshot_only_chat() {
        let o = ProviderProfile::for_kind(ProviderKind::Openai);
        assert!(Endpoint::OPENAI.iter().all(|e| o.batches(*e)));
        assert!(!o.batches(Endpoint::Messages));
        for kind in [ProviderKind::Moonshot, ProviderKind::Generic] {
            let p = ProviderProfile::for_kind(kind);
            assert!(p.batches(Endpoint::ChatCompletions));
            assert!(!p.batches(Endpoint::Embeddings), "{kind:?}");
        }
    }

    #[test]
    fn an_anthropic_batch_stays_under_256_mb_however_mb_is_read() {
        let a = ProviderProfile::for_kind(ProviderKind::Anthropic);
        assert!(a.max_file_bytes <= 256_000_000, "{}", a.max_file_bytes);
        let config = |max_bytes: u64| {
            format!(
                "[[upstreams]]\nname = \"claude\"\nkind = \"anthropic\"\nemulator = true\n\
                 max_bytes = {max_bytes}\n[[tenants]]\nname = \"t\"\nkeys = [\"k\"]\n"
            )
        };
        let parse =
            |max_bytes| crate::config::Config::parse_with_env(&config(max_bytes), &|_| None);
        let err = parse(256 * MB).unwrap_err().to_string();
        assert!(err.contains("upstreams[0].max_bytes"), "{err}");
        assert_eq!(
            parse(256_000_000).unwrap().upstreams[0].max_bytes,
            256_000_000
        );
    }

    #[test]
    fn moonshot_forbids_sampling_params() {
        let m = ProviderProfile::for_kind(ProviderKind::Moonshot);
        assert!(m.forbidden_params.iter().any(|p| p == "temperature"));
        assert_eq!(m.max_file_bytes, 100 * MB);
        assert!(
            ProviderProfile::for_kind(ProviderKind::Openai)
                .forbidden_params
                .is_empty()
        );
    }
}
