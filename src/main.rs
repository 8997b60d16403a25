//! The `ferry` command: parse the CLI, load the config, call the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferry::config::{Config, LogFormat};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "A reverse proxy that turns deferrable OpenAI chat completions into Batch API jobs"
)]
struct Cli {
    /// Config file (TOML). Without it Ferry runs on its embedded default:
    /// the built-in Batch API emulator as upstream, on 127.0.0.1:8080.
    #[arg(long, short, global = true, env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the config and exit.
    CheckConfig,
    /// Run the Batch API emulator standalone.
    Emulator(Box<ferry::emulator::EmulatorArgs>),
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

// jemalloc rather than glibc's allocator: with sled's, pingora's and tokio's
// threads all allocating, it doubled durable intake and cut ingestion CPU by
// a quarter (README, Performance).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = || match Config::load(cli.config.as_deref()) {
        Ok(c) => Ok(c),
        Err(e) => {
            eprintln!("ferry: {e}");
            Err(ExitCode::from(2))
        }
    };
    match cli.command {
        Some(Command::Emulator(args)) => {
            init_logs(LogFormat::Text);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("ferry: cannot start a runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(ferry::emulator::run_cli(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ferry emulator: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::CheckConfig) => match config() {
            Ok(_) => {
                eprintln!("ferry: config is valid");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Some(Command::Run) | None => {
            let config = match config() {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logs(config.server.log_format);
            // Lets jemalloc hand memory freed after a batch back to the OS
            // on its own thread, instead of only when the next allocation
            // happens to trigger a purge.
            if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
                tracing::warn!(error = %e, "cannot start the allocator's purge thread; freed memory is returned later");
            }
            match ferry::server::run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "Ferry cannot start");
                    eprintln!("ferry: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
