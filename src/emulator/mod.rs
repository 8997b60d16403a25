//! The Batch API emulator: Ferry's stand-in upstream for tests and the offline
//! demo, faithful enough to OpenAI's (and Moonshot/Kimi's) Files and Batches
//! APIs that code which works against it works against them.
//!
//! It serves `/v1/files`, `/v1/batches`, real-time `/v1/chat/completions` and
//! `/v1/models` with a deterministic model (see [`model`]), plus control routes
//! under `/_emulator/` (config, clock, stats) that need no key.
//!
//! Time is lazy: no background task advances batches. A batch's state is a
//! pure function of its creation time, the timing knobs captured at creation
//! and the emulator's clock (real time plus an offset that
//! `POST /_emulator/clock` moves forward), worked out whenever the batch is
//! read. With the default zero delays a batch is `validating` in the answer to
//! its creation and terminal on its first read.
//!
//! Layout: [`config`] (knobs), [`cli`] (flags), [`timeline`] (the state
//! function of time), [`validate`] (input checks), [`model`] (answers),
//! `state` (files, batches, counters) and `routes` (HTTP).

mod cli;
pub mod config;
mod error;
pub mod model;
mod routes;
mod state;
pub mod timeline;
pub mod validate;

use std::future::Future;
use std::sync::Arc;

pub use cli::EmulatorArgs;
pub use config::{EmulatorConfig, Profile};

/// The emulator's axum router, for embedding it in another server or driving
/// it without a socket.
pub fn router(config: EmulatorConfig) -> axum::Router {
    routes::router(Arc::new(state::Emulator::new(config)))
}

/// Runs the emulator on an already-bound listener until `shutdown` resolves.
/// Fails at once if the config is invalid.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: EmulatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    config
        .validate()
        .map_err(|m| std::io::Error::new(std::io::ErrorKind::InvalidInput, m))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, profile = %config.profile, "emulator serving");
    axum::serve(listener, router(config))
        .with_graceful_shutdown(shutdown)
        .await
}

/// For `ferry emulator`: binds `args.listen()`, announces the address on
/// stdout, and serves until ctrl-c or SIGTERM.
pub async fn run_cli(args: EmulatorArgs) -> std::io::Result<()> {
    let listen = args.listen();
    let config = args
        .load_config()
        .map_err(|m| std::io::Error::new(std::io::ErrorKind::InvalidInput, m))?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    crate::announce::listening("emulator", addr);
    serve(listener, config, shutdown_signal()).await
}

/// Resolves on ctrl-c or (on Unix) SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("emulator shutting down");
}
