//! `ferry emulator`'s flags. Each knob flag is optional and, when given,
//! overrides the value from `--config` (if any) and the defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::config::{EmulatorConfig, Profile};

/// `ferry emulator --listen 127.0.0.1:PORT --api-key KEY [--profile moonshot] [knobs...]`
#[derive(clap::Args, Debug, Clone)]
pub struct EmulatorArgs {
    /// Address to listen on; port 0 lets the OS choose (the chosen address is
    /// printed as a JSON `listening` line on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// A TOML (or `.json`) file with emulator knobs, the keys of
    /// `POST /_emulator/config`. Flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Keep files, batches, counters and the clock in this directory (created
    /// if missing) and recover them at start, so a restart loses nothing
    /// acknowledged. Without it, everything is in memory only. Knobs are not
    /// kept: each start takes them from the flags and `--config`.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The bearer token clients must send [default: emulator-key].
    #[arg(long, env = "FERRY_EMULATOR_API_KEY")]
    pub api_key: Option<String>,
    /// Provider to imitate: `openai` or `moonshot` [default: openai].
    #[arg(long)]
    pub profile: Option<Profile>,
    /// Comma-separated models requests may name; an empty value accepts any
    /// model.
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    pub models: Option<Vec<String>>,
    /// Seconds a batch stays `validating` [default: 0].
    #[arg(long, value_name = "SECONDS")]
    pub validating_seconds: Option<f64>,
    /// Seconds each request line takes while `in_progress` [default: 0].
    #[arg(long, value_name = "SECONDS")]
    pub per_request_seconds: Option<f64>,
    /// Seconds a batch stays `finalizing` [default: 0].
    #[arg(long, value_name = "SECONDS")]
    pub finalizing_seconds: Option<f64>,
    /// Seconds a batch stays `cancelling` [default: 0].
    #[arg(long, value_name = "SECONDS")]
    pub cancel_seconds: Option<f64>,
    /// Expire batches this many seconds after creation instead of at the end of
    /// their completion window.
    #[arg(long, value_name = "SECONDS")]
    pub expire_after_seconds: Option<f64>,
    /// Fail the next N created batches with `token_limit_exceeded` [default: 0].
    #[arg(long, value_name = "N")]
    pub fail_next_batches_token_limit: Option<u32>,
    /// Fraction (0..1) of `/v1/*` calls answered 500/503 [default: 0].
    #[arg(long, value_name = "FRACTION")]
    pub error_rate: Option<f64>,
    /// Milliseconds added to every `/v1/*` call [default: 0].
    #[arg(long, value_name = "MS")]
    pub latency_ms: Option<u64>,
    /// Seed of the fault generator [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Comma-separated models that take `service_tier: "flex"`
    /// [default: gpt-5,gpt-5-mini].
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub flex_models: Option<Vec<String>>,
    /// Milliseconds added to every flex answer [default: 0].
    #[arg(long, value_name = "MS")]
    pub flex_latency_ms: Option<u64>,
    /// Fraction (0..1) of flex calls refused 429 `resource_unavailable`
    /// [default: 0].
    #[arg(long, value_name = "FRACTION")]
    pub flex_unavailable_rate: Option<f64>,
    /// Median seconds of a log-normal draw of each batch's time in
    /// `validating`, in place of `--validating-seconds` [default: none].
    #[arg(long, value_name = "S")]
    pub turnaround_median_seconds: Option<f64>,
    /// Standard deviation of the log of those draws [default: 1].
    #[arg(long, value_name = "SIGMA")]
    pub turnaround_spread: Option<f64>,
    /// Most request lines per input file [default: 50000].
    #[arg(long, value_name = "N")]
    pub max_lines: Option<u64>,
    /// Largest input file in bytes [default: 200 MB openai, 100 MB moonshot].
    #[arg(long, value_name = "BYTES")]
    pub max_file_bytes: Option<u64>,
    /// Most files of purpose `batch` present at once [default: none openai,
    /// 1000 moonshot].
    #[arg(long, value_name = "N")]
    pub max_batch_files: Option<u64>,
}

impl EmulatorArgs {
    /// The flags over the defaults. `--config` is not read here (reading can
    /// fail); [`EmulatorArgs::load_config`] reads it and applies the flags on
    /// top.
    pub fn into_config(self) -> EmulatorConfig {
        self.apply(EmulatorConfig::default())
    }

    /// The address to bind.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Reads `--config` (if given), applies the flags on top and validates the
    /// result; the error names the file or the key.
    pub fn load_config(self) -> Result<EmulatorConfig, String> {
        let base = match &self.config {
            None => EmulatorConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                let is_json = path
                    .extension()
                    .is_some_and(|x| x.eq_ignore_ascii_case("json"));
                if is_json {
                    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
                } else {
                    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
                }
            }
        };
        let config = self.apply(base);
        config.validate()?;
        Ok(config)
    }

    fn apply(self, mut c: EmulatorConfig) -> EmulatorConfig {
        if let Some(v) = self.api_key {
            c.api_key = v;
        }
        if let Some(v) = self.profile {
            c.profile = v;
        }
        if let Some(v) = self.models {
            c.models = v
                .into_iter()
                .map(|m| m.trim().to_owned())
                .filter(|m| !m.is_empty())
                .collect();
        }
        if let Some(v) = self.validating_seconds {
            c.validating_seconds = v;
        }
        if let Some(v) = self.per_request_seconds {
            c.per_request_seconds = v;
        }
        if let Some(v) = self.finalizing_seconds {
            c.finalizing_seconds = v;
        }
        if let Some(v) = self.cancel_seconds {
            c.cancel_seconds = v;
        }
        if let Some(v) = self.expire_after_seconds {
            c.expire_after_seconds = Some(v);
        }
        if let Some(v) = self.fail_next_batches_token_limit {
            c.fail_next_batches_token_limit = v;
        }
        if let Some(v) = self.error_rate {
            c.error_rate = v;
        }
        if let Some(v) = self.latency_ms {
            c.latency_ms = v;
        }
        if let Some(v) = self.seed {
            c.seed = v;
        }
        if let Some(v) = self.flex_models {
            c.flex_models = v
                .into_iter()
                .map(|m| m.trim().to_owned())
                .filter(|m| !m.is_empty())
                .collect();
        }
        if let Some(v) = self.flex_latency_ms {
            c.flex_latency_ms = v;
        }
        if let Some(v) = self.flex_unavailable_rate {
            c.flex_unavailable_rate = v;
        }
        if let Some(v) = self.turnaround_median_seconds {
            c.turnaround_median_seconds = Some(v);
        }
        if let Some(v) = self.turnaround_spread {
            c.turnaround_spread = v;
        }
        if let Some(v) = self.max_lines {
            c.max_lines = Some(v);
        }
        if let Some(v) = self.max_file_bytes {
            c.max_file_bytes = Some(v);
        }
        if let Some(v) = self.max_batch_files {
            c.max_batch_files = Some(v);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: EmulatorArgs,
    }

    #[test]
    fn flags_override_defaults() {
        let cli = Cli::try_parse_from([
            "x",
            "--listen",
            "127.0.0.1:9999",
            "--api-key",
            "k",
            "--profile",
            "moonshot",
            "--per-request-seconds",
            "1.5",
            "--models",
            "a,b",
            "--expire-after-seconds",
            "60",
        ])
        .unwrap();
        assert_eq!(cli.args.listen().port(), 9999);
        let c = cli.args.into_config();
        assert_eq!(c.api_key, "k");
        assert_eq!(c.profile, Profile::Moonshot);
        assert_eq!(c.per_request_seconds, 1.5);
        assert_eq!(c.models, vec!["a", "b"]);
        assert_eq!(c.expire_after_seconds, Some(60.0));
        assert_eq!(c.validating_seconds, 0.0);
    }

    #[test]
    fn data_dir_is_optional() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.args.data_dir, None);
        let cli = Cli::try_parse_from(["x", "--data-dir", "/tmp/emu"]).unwrap();
        assert_eq!(cli.args.data_dir, Some(PathBuf::from("/tmp/emu")));
    }

    #[test]
    fn defaults_and_empty_models() {
        let cli = Cli::try_parse_from(["x", "--models", ""]).unwrap();
        assert_eq!(cli.args.listen().port(), 0);
        let c = cli.args.into_config();
        assert!(c.models.is_empty());
        assert_eq!(c.api_key, "emulator-key");
        assert!(Cli::try_parse_from(["x", "--profile", "azure"]).is_err());
    }

    #[test]
    fn config_file_under_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("emu.toml");
        std::fs::write(&path, "profile = \"moonshot\"\nlatency_ms = 7\nseed = 3\n").unwrap();
        let cli =
            Cli::try_parse_from(["x", "--config", path.to_str().unwrap(), "--seed", "9"]).unwrap();
        let c = cli.args.load_config().unwrap();
        assert_eq!((c.profile, c.latency_ms, c.seed), (Profile::Moonshot, 7, 9));
        std::fs::write(&path, "latncy_ms = 7\n").unwrap();
        let cli = Cli::try_parse_from(["x", "--config", path.to_str().unwrap()]).unwrap();
        assert!(cli.args.load_config().unwrap_err().contains("latncy_ms"));
    }
}
