//! Wiring: open the store, start the embedded emulator if configured, the
//! admin port and the pipeline on a worker runtime, then run the pingora
//! proxy until a signal, and shut down in order.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pingora::prelude::Server;
use pingora::server::ExecutionPhase;
use pingora::server::configuration::ServerConf;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::{Config, StorageSettings, UpstreamTarget};
use crate::delivery::waiters::Waiters;
use crate::metrics::Metrics;
use crate::proxy::FerryProxy;
use crate::store::Store;
use crate::upstream::BatchClient;
use crate::{App, PassthroughTarget, Upstream, announce, batch, emulator};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot open the store at {path}: {source}")]
    Store {
        path: String,
        source: crate::store::StoreError,
    },
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("upstream `{name}`: {message}")]
    Upstream { name: String, message: String },
    #[error("{0}")]
    Runtime(String),
}

/// Bytes of the read buffer each client connection gets (see `run`).
const CONNECTION_READ_BUFFER: usize = 4096;

/// Binds a std listener (non-blocking, for tokio).
fn bind(what: &'static str, addr: SocketAddr) -> Result<StdListener, ServerError> {
    let l = StdListener::bind(addr).map_err(|source| ServerError::Bind { what, addr, source })?;
    l.set_nonblocking(true)
        .map_err(|source| ServerError::Bind { what, addr, source })?;
    Ok(l)
}

/// Runs Ferry until SIGTERM/SIGINT/SIGQUIT. Blocks the calling thread.
pub fn run(config: Config) -> Result<(), ServerError> {
    let data_dir = config.server.data_dir.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ferry-worker")
        .enable_all()
        .build()
        .map_err(|e| ServerError::Runtime(e.to_string()))?;
    let opening = std::time::Instant::now();
    let store = Arc::new(rt.block_on(open_store(&config))?);
    let store_open_ms = opening.elapsed().as_millis() as u64;
    // Before any upload: every file and batch is named with it.
    let instance_id = rt
        .block_on(store.instance_id(&data_dir))
        .map_err(|source| ServerError::Store {
            path: data_dir.display().to_string(),
            source,
        })?;
    info!(instance = %instance_id, took_ms = store_open_ms, "store opened");
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::new());
    store.observe_flushes(metrics.storage_flush_duration.clone());
    store.observe_low_space(metrics.storage_low_space.clone());
    metrics.zero_known_series(
        &config
            .upstreams
            .iter()
            .map(|u| u.name.as_str())
            .collect::<Vec<_>>(),
        &config.known_models(),
        &config.prices.keys().cloned().collect::<Vec<_>>(),
    );

    // The embedded emulator, when some upstream uses it. Its state lives
    // beside the store (sled keeps its own files at the top of data_dir), so
    // the batches Ferry submitted to it survive a crash of this process.
    let emulator_url = match &config.emulator {
        Some(cfg) => {
            let replaying = std::time::Instant::now();
            let service = emulator::Service::new(cfg.clone(), Some(&data_dir.join("emulator")))
                .map_err(|e| ServerError::Runtime(format!("the embedded emulator: {e}")))?;
            let l = bind(
                "the embedded emulator",
                SocketAddr::from(([127, 0, 0, 1], 0)),
            )?;
            let addr = l
                .local_addr()
                .map_err(|e| ServerError::Runtime(e.to_string()))?;
            let mut rx = shutdown_rx.clone();
            rt.spawn(async move {
                let listener = match tokio::net::TcpListener::from_std(l) {
                    Ok(l) => l,
                    Err(e) => return error!(error = %e, "embedded emulator cannot listen"),
                };
                let stop = async move {
                    let _ = rx.changed().await;
                };
                if let Err(e) = service.serve(listener, stop).await {
                    error!(error = %e, "embedded emulator stopped");
                }
            });
            // Its journal is replayed at start and grows with every batch
            // line it ran: the part of a restart that grows with history.
            info!(%addr, took_ms = replaying.elapsed().as_millis() as u64, "embedded Batch API emulator started");
            announce::listening("emulator", addr);
            Some(format!("http://{addr}/v1"))
        }
        None => None,
    };

    let ca_pem =
        match &config.server.upstream_ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                ServerError::Runtime(format!("cannot read {}: {e}", path.display()))
            })?),
            None => None,
        };
    let mut upstreams = Vec::new();
    for s in &config.upstreams {
        let (base_url, key) = match &s.target {
            UpstreamTarget::Url(u) => {
                let env = s.api_key_env.as_deref().unwrap_or_default();
                let key = std::env::var(env).map_err(|_| ServerError::Upstream {
                    name: s.name.clone(),
                    message: format!("environment variable `{env}` is not set"),
                })?;
                (u.clone(), key)
            }
            UpstreamTarget::Emulator => (
                emulator_url.clone().unwrap_or_default(),
                config
                    .emulator
                    .as_ref()
                    .map(|e| e.api_key.clone())
                    .unwrap_or_default(),
            ),
        };
        // An Anthropic base URL names the host (`https://api.anthropic.com`);
        // its paths start with `/v1`, which the embedded emulator's URL
        // already has.
        let base_url = match (&s.target, s.profile.kind.is_anthropic()) {
            (UpstreamTarget::Url(_), true) => format!("{base_url}/v1"),
            _ => base_url,
        };
        let passthrough =
            PassthroughTarget::parse(&base_url).ok_or_else(|| ServerError::Upstream {
                name: s.name.clone(),
                message: format!("cannot parse base_url `{base_url}`"),
            })?;
        let client = BatchClient::new(
            &s.name,
            &base_url,
            &key,
            s.calls_per_second,
            s.batches_per_hour,
            ca_pem.as_deref(),
            metrics.clone(),
        )
        .map_err(|e| ServerError::Upstream {
            name: s.name.clone(),
            message: e.to_string(),
        })?;
        let client = match &s.anthropic_version {
            Some(version) => client.for_anthropic(version),
            None => client,
        };
        let up = Upstream::new(s.clone(), client, passthrough, &key);
        if let Ok(addrs) = std::net::ToSocketAddrs::to_socket_addrs(up.passthrough.addr.as_str()) {
            up.set_passthrough_addrs(addrs.collect());
        } else {
            warn!(upstream = %s.name, host = %up.passthrough.addr, "cannot resolve the passthrough host yet; will retry");
        }
        upstreams.push(up);
    }

    let rate = |r: Option<crate::config::RateSetting>| {
        r.map(|r| crate::limits::Rate {
            per_second: r.per_second,
            burst: r.burst,
        })
    };
    let limits = crate::limits::TenantLimits::new(config.tenants.iter().map(|t| {
        (
            t.name.clone(),
            rate(t.deferred_rate),
            rate(t.passthrough_rate),
        )
    }));
    let webhook_http = crate::delivery::webhooks::client(&config).map_err(|e| {
        ServerError::Runtime(format!(
            "cannot build the webhook client (Ferry does not deliver webhooks without its redirect and internal-address guards): {e}"
        ))
    })?;
    let app = Arc::new(App {
        model_labels: crate::metrics::ModelLabels::new(
            config.known_models(),
            crate::metrics::MAX_MODEL_LABELS,
        ),
        limits,
        store,
        instance_id,
        waiters: Waiters::new(),
        metrics,
        upstreams,
        ready: AtomicBool::new(false),
        shutting_down: AtomicBool::new(false),
        release_waiters: tokio::sync::Notify::new(),
        members: Default::default(),
        standard_budgets: Default::default(),
        config,
    });

    // Admin port.
    let admin = bind("the admin port", app.config.server.admin_listen)?;
    let admin_addr = admin
        .local_addr()
        .map_err(|e| ServerError::Runtime(e.to_string()))?;
    {
        let app = app.clone();
        let mut rx = shutdown_rx.clone();
        rt.spawn(async move {
            let listener = match tokio::net::TcpListener::from_std(admin) {
                Ok(l) => l,
                Err(e) => return error!(error = %e, "admin port cannot listen"),
            };
            let serve = axum::serve(listener, crate::admin::router(app)).with_graceful_shutdown(
                async move {
                    let _ = rx.changed().await;
                },
            );
            if let Err(e) = serve.await {
                error!(error = %e, "admin port stopped");
            }
        });
    }
    announce::listening("admin", admin_addr);

    // Recovery, then the pipeline.
    {
        let app = app.clone();
        let rx = shutdown_rx.clone();
        rt.spawn(async move {
            let recovered = recover(&app).await;
            let queued = app.store.queued_total().await.unwrap_or(0);
            match recovered {
                Ok(n) => info!(live_batches = n, queued, "recovery finished"),
                Err(e) => return error!(error = %e, "recovery failed; Ferry stays not-ready"),
            }
            if app.store.is_shared() {
                // Members known before the first renewal, so each upstream
                // goes to the node first in line for it from the start.
                crate::cluster::heartbeat(&app).await;
                tokio::spawn(crate::cluster::keep_membership(app.clone(), rx.clone()));
            }
            for i in 0..app.upstreams.len() {
                tokio::spawn(batch::run_flusher(app.clone(), i, rx.clone()));
            }
            tokio::spawn(crate::delivery::webhooks::run(
                app.clone(),
                webhook_http,
                rx.clone(),
            ));
            tokio::spawn(refresh_dns(app.clone(), rx.clone()));
            tokio::spawn(crate::retention::run(app.clone(), rx.clone()));
            tokio::spawn(crate::retention::census_loop(app.clone(), rx.clone()));
            if let Some(events) = app.store.subscribe() {
                tokio::spawn(crate::cluster::follow(app.clone(), events, rx.clone()));
                let (app, rx) = (app.clone(), rx.clone());
                tokio::spawn(async move { app.store.listen(rx).await });
            }
            app.ready.store(true, Ordering::SeqCst);
        });
    }

    // The proxy. Port 0 asks the OS for a free port first (pingora binds by
    // address), and the line announcing it is printed once it accepts.
    let mut listen = app.config.server.listen;
    if listen.port() == 0 {
        let probe = bind("the proxy port", listen)?;
        listen = probe
            .local_addr()
            .map_err(|e| ServerError::Runtime(e.to_string()))?;
    }
    let conf = ServerConf {
        threads: app.config.server.threads,
        grace_period_seconds: Some(app.config.server.shutdown_grace.as_secs()),
        graceful_shutdown_timeout_seconds: Some(5),
        pid_file: data_dir.join("ferry.pid").display().to_string(),
        ca_file: app
            .config
            .server
            .upstream_ca_file
            .as_ref()
            .map(|p| p.display().to_string()),
        // Every timeout of a second or more on tokio's timer wheel. pingora's
        // own "fast" timers need a clock thread that, once started, wakes
        // every 10 ms for the life of the process whether or not a timer is
        // due: 15 % of Ferry's CPU over the end-to-end held run (README,
        // Performance, figure E). Ferry's timeouts are all whole seconds.
        fast_timeout_to_tokio_threshold_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy =
        pingora::proxy::http_proxy_service(&server.configuration, FerryProxy { app: app.clone() });
    // A 4 KiB read buffer per connection instead of pingora's 64 KiB: held
    // long-polls are mostly idle connections, and larger reads (bodies)
    // bypass the buffer anyway. Measured: about 10 % less memory per held
    // caller (README, Performance).
    proxy.add_listener(
        pingora::listeners::ListenerConfig::tcp(listen.to_string()).l4_buffer(
            pingora::listeners::L4BufferSettings::new(
                CONNECTION_READ_BUFFER,
                pingora::listeners::DEFAULT_L4_WRITE_BUFFER_SIZE,
            ),
        ),
    );
    server.add_service(proxy);

    let mut phases = server.watch_execution_phase();
    {
        let app = app.clone();
        rt.spawn(async move {
            while let Ok(phase) = phases.recv().await {
                if matches!(
                    phase,
                    ExecutionPhase::GracefulTerminate | ExecutionPhase::ShutdownStarted
                ) && !app.shutting_down.swap(true, Ordering::SeqCst)
                {
                    info!(
                        ?phase,
                        "shutting down: deferred intake closed, held callers get their tickets"
                    );
                    app.release_waiters.notify_waiters();
                    // With a shared store the flush loops hand their
                    // upstreams over now.
                    for up in &app.upstreams {
                        up.wake.notify_one();
                    }
                }
            }
        });
    }
    rt.spawn_blocking(move || announce_when_accepting(listen));

    info!(%listen, admin = %admin_addr, "Ferry starting");
    server.run(pingora::server::RunArgs {
        shutdown_signal: Box::new(Signals),
    });

    // Pingora has stopped serving: stop the pipeline and make storage durable.
    app.shutting_down.store(true, Ordering::SeqCst);
    let _ = shutdown_tx.send(true);
    rt.shutdown_timeout(Duration::from_secs(5));
    match app.store.close() {
        Ok(()) => info!("storage flushed; Ferry stopped"),
        Err(e) => error!(error = %e, "final storage flush failed"),
    }
    Ok(())
}

/// Pingora's signals, except that `SIGQUIT` (pingora's hot upgrade, which
/// hands the listening socket to a new process) shuts down like `SIGTERM`:
/// the store has one writer, so a new process could not open it before this
/// one exits, and pingora would spend 5 s offering sockets to nobody.
struct Signals;

#[async_trait::async_trait]
impl pingora::server::ShutdownSignalWatch for Signals {
    async fn recv(&self) -> pingora::server::ShutdownSignal {
        use pingora::server::ShutdownSignal;
        use tokio::signal::unix::{SignalKind, signal};
        let wait = |kind: SignalKind, name: &'static str| async move {
            match signal(kind) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(e) => {
                    error!(error = %e, signal = name, "cannot watch this signal; it is ignored");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            _ = wait(SignalKind::terminate(), "SIGTERM") => ShutdownSignal::GracefulTerminate,
            _ = wait(SignalKind::quit(), "SIGQUIT") => {
                warn!("SIGQUIT: Ferry has no hot upgrade (its store has one writer); shutting down gracefully as on SIGTERM");
                ShutdownSignal::GracefulTerminate
            }
            _ = wait(SignalKind::interrupt(), "SIGINT") => ShutdownSignal::FastShutdown,
        }
    }
}

/// Re-resolves every passthrough host every 30 s.
async fn refresh_dns(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    loop {
        for up in &app.upstreams {
            up.refresh_passthrough_addrs().await;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Announces the proxy address once a connection to it succeeds.
fn announce_when_accepting(addr: SocketAddr) {
    for _ in 0..3000 {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            announce::listening("proxy", addr);
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    warn!(%addr, "the proxy port never accepted a connection");
}

/// Finishes what a previous run left in the store: claims cut short. Each
/// upstream's live batches are resumed by its flush loop once it holds the
/// upstream (at once with sled; see `batch::ownership`). Returns how many
/// live batches there are.
async fn recover(app: &Arc<App>) -> Result<usize, crate::store::StoreError> {
    app.store.recover_claims().await?;
    let live = app.store.live_batches().await?;
    for b in live
        .iter()
        .filter(|b| app.upstream_named(&b.upstream).is_none())
    {
        error!(ferry_batch = b.id, upstream = %b.upstream, "batch names an upstream that is no longer configured; leaving it");
    }
    Ok(live.len())
}

/// Opens the store the config names: sled in `data_dir`, or PostgreSQL at
/// the URL in `url_env` (read here, never logged: it may hold a password).
async fn open_store(config: &Config) -> Result<Store, ServerError> {
    let data_dir = &config.server.data_dir;
    match &config.storage {
        StorageSettings::Sled => {
            let store =
                Store::open_sled(data_dir, config.server.cache_bytes).map_err(|source| {
                    ServerError::Store {
                        path: data_dir.display().to_string(),
                        source,
                    }
                })?;
            Ok(store.with_space_guard(crate::store::space::SpaceGuard::new(
                data_dir,
                config.server.min_free_bytes,
            )))
        }
        StorageSettings::Postgres {
            url_env, pool_size, ..
        } => {
            let failed = |source| ServerError::Store {
                path: format!("the PostgreSQL database at ${url_env}"),
                source,
            };
            let url = std::env::var(url_env).map_err(|_| {
                ServerError::Runtime(format!(
                    "storage.url_env: environment variable `{url_env}` is not set"
                ))
            })?;
            let pg = crate::store::pg::parse_url(&url)
                .map_err(|e| failed(crate::store::StoreError::from(e)))?;
            Store::connect_postgres(pg, *pool_size, data_dir)
                .await
                .map_err(failed)
        }
    }
}
