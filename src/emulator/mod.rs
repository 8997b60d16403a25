//! The Batch API emulator: Ferry's stand-in upstream for tests and the offline
//! demo, faithful enough to OpenAI's (and Moonshot/Kimi's) Files and Batches
//! APIs that code which works against it works against them.
//!
//! It serves `/v1/files`, `/v1/batches`, real-time `/v1/chat/completions` and
//! `/v1/models` with a deterministic model (see [`model`]), plus control routes
//! under `/_emulator/` (config, clock, stats) that need no key. The same
//! process also serves Anthropic's Messages API and Message Batches (see
//! `anthropic`): the paths do not collide, and a call carrying
//! `anthropic-version` is answered in Anthropic's shapes.
//!
//! Time is lazy: no background task advances batches. A batch's state is a
//! pure function of its creation time, the timing knobs captured at creation
//! and the emulator's clock (real time plus an offset that
//! `POST /_emulator/clock` moves forward), worked out whenever the batch is
//! read. With the default zero delays a batch is `validating` in the answer to
//! its creation and terminal on its first read.
//!
//! State lives in memory, and optionally also on disk ([`journal`]): the
//! standalone `ferry emulator` keeps it only in memory unless given
//! `--data-dir`; the one embedded in Ferry keeps it under
//! `<data_dir>/emulator`, so a batch Ferry submitted survives a crash of the
//! process that holds both, as it would at a real provider.
//!
//! Layout: [`config`] (knobs), [`cli`] (flags), [`timeline`] (the state
//! function of time), [`validate`] (input checks), [`model`] (answers),
//! [`journal`] (durability), `state` (files, batches, counters) and `routes`
//! (HTTP).

mod anthropic;
mod cli;
pub mod config;
mod error;
mod events;
mod flex;
pub mod journal;
pub mod model;
mod realtime;
mod routes;
mod state;
pub mod timeline;
pub mod validate;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

pub use cli::EmulatorArgs;
pub use config::{EmulatorConfig, Profile};

/// Why an emulator could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid emulator config: {0}")]
    Config(String),
    #[error("cannot open the emulator's state: {0}")]
    Journal(#[from] journal::JournalError),
}

/// An emulator ready to serve: its config checked and, when durable, its
/// state recovered.
pub struct Service {
    state: Arc<state::Emulator>,
}

impl Service {
    /// Checks `config`. With `data_dir`, the state is kept there (created if
    /// missing, recovered if present: files, batches, counters and clock);
    /// without, in memory only. Opening reads every stored file's content, so
    /// it blocks.
    pub fn new(config: EmulatorConfig, data_dir: Option<&Path>) -> Result<Service, OpenError> {
        config.validate().map_err(OpenError::Config)?;
        let state = match data_dir {
            Some(dir) => state::Emulator::open(config, dir)?,
            None => state::Emulator::new(config),
        };
        Ok(Service {
            state: Arc::new(state),
        })
    }

    /// The axum router, for embedding it in another server or driving it
    /// without a socket.
    pub fn router(&self) -> axum::Router {
        routes::router(self.state.clone())
    }

    /// Serves on an already-bound listener until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let addr = listener.local_addr()?;
        let profile = self.state.config().profile;
        tracing::info!(%addr, %profile, "emulator serving");
        // Pushes batch events while `events_url` is set; ends with the server.
        let pusher = tokio::spawn(events::push_events(self.state.clone()));
        let served = axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await;
        pusher.abort();
        served
    }
}

fn invalid_input(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
}

/// The emulator's axum router, in memory, for embedding it in another server
/// or driving it without a socket.
pub fn router(config: EmulatorConfig) -> axum::Router {
    routes::router(Arc::new(state::Emulator::new(config)))
}

/// Runs an in-memory emulator on an already-bound listener until `shutdown`
/// resolves. Fails at once if the config is invalid.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: EmulatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    Service::new(config, None)
        .map_err(invalid_input)?
        .serve(listener, shutdown)
        .await
}

/// For `ferry emulator`: opens the state (`--data-dir`, or memory), binds
/// `args.listen()`, announces the address on stdout, and serves until ctrl-c
/// or SIGTERM.
pub async fn run_cli(args: EmulatorArgs) -> std::io::Result<()> {
    let listen = args.listen();
    let data_dir = args.data_dir.clone();
    let config = args.load_config().map_err(invalid_input)?;
    let service = tokio::task::spawn_blocking(move || Service::new(config, data_dir.as_deref()))
        .await
        .map_err(std::io::Error::other)?
        .map_err(invalid_input)?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    crate::announce::listening("emulator", addr);
    service.serve(listener, shutdown_signal()).await
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
