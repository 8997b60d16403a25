//! The pingora service: classify each call, answer Ferry's own routes,
//! take deferred calls in, and pass everything else through unchanged.
//! Hooks stay short; each calls one function.

pub mod error;
pub mod replay;
pub mod respond;
pub mod results_url;
pub mod routes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::ErrorType;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use serde_json::Value;
use tracing::{debug, warn};

use crate::App;
use crate::config::Tenant;
use crate::delivery::status_object;
use crate::delivery::waiters::{Mark, Wake};
use crate::endpoint::Endpoint;
use crate::intake::{self, Disposition, IntakeError, NewRequest};
use crate::limits::LimitKind;
use crate::store::{CancelOutcome, RequestRecord, RequestStatus, StoredResult};
use error::ProxyError;
use routes::{Route, classify, object_id_candidates, query_wait};

pub struct FerryProxy {
    pub app: Arc<App>,
}

/// Per-request state shared across hooks.
pub struct Ctx {
    route: &'static str,
    mode: &'static str,
    started: Instant,
    /// The call is of Anthropic's API family (see [`routes::is_anthropic`]):
    /// its errors take Anthropic's shape and its passthrough goes to the
    /// Anthropic upstream.
    anthropic: bool,
    /// The upstream passthrough goes to.
    upstream: usize,
    /// A caller's own Message Batch route: its answer's `results_url`s are
    /// pointed at Ferry (see [`results_url`]).
    results_url: Option<results_url::Rewrite>,
    /// That answer, gathered whole to be rewritten (set once its head
    /// shows a plain JSON body).
    results_body: Option<BytesMut>,
}

/// The largest batch answer gathered for the `results_url` rewrite (a list
/// of 1,000 batches is well under it); a larger one goes on as it is.
const RESULTS_URL_MAX_BODY: usize = 8 << 20;

#[async_trait]
impl ProxyHttp for FerryProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            route: "unknown",
            mode: "ferry",
            started: Instant::now(),
            anthropic: false,
            upstream: self.app.config.default_upstream,
            results_url: None,
            results_body: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<bool> {
        match handle(&self.app, session, ctx).await {
            Ok(answered) => Ok(answered),
            Err(e) => error::answer(session, e, ctx.anthropic).await.map(|_| true),
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Ctx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let up = &self.app.upstreams[ctx.upstream];
        let t = &up.passthrough;
        let Some(addr) = up.passthrough_addr() else {
            return Err(pingora::Error::explain(
                ErrorType::ConnectNoRoute,
                format!("no address resolved for {}", t.addr),
            ));
        };
        let mut peer = HttpPeer::new(addr, t.tls, t.host.clone());
        let s = &self.app.config.server;
        peer.options.connection_timeout = Some(s.upstream_connect_timeout);
        peer.options.total_connection_timeout = Some(s.upstream_connect_timeout);
        peer.options.read_timeout = Some(s.upstream_read_timeout);
        peer.options.write_timeout = Some(s.upstream_read_timeout);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        let up = &self.app.upstreams[ctx.upstream];
        let path = session.req_header().uri.path();
        let rest = path.strip_prefix("/v1").unwrap_or(path);
        let mut target = format!("{}{}", up.passthrough.base_path, rest);
        if let Some(q) = session.req_header().uri.query() {
            target.push('?');
            target.push_str(q);
        }
        let uri = target.parse::<http::Uri>().map_err(|e| {
            pingora::Error::because(ErrorType::InvalidHTTPHeader, "rewriting the path", e)
        })?;
        req.set_uri(uri);
        req.insert_header("host", up.passthrough.host.as_str())?;
        // The caller's Ferry key never reaches the upstream, in whichever
        // header it came: Ferry's own key goes in the header the upstream's
        // family reads, and the other one is dropped.
        match &up.settings.anthropic_version {
            Some(version) => {
                req.remove_header("authorization");
                req.insert_header("x-api-key", up.api_key.as_str())?;
                if req.headers.get("anthropic-version").is_none() {
                    req.insert_header("anthropic-version", version.as_str())?;
                }
            }
            None => {
                req.remove_header("x-api-key");
                req.insert_header("authorization", up.auth_header.as_str())?;
            }
        }
        req.remove_header("x-ferry-custom-id");
        req.remove_header("x-ferry-callback-url");
        req.remove_header("x-ferry-deadline");
        if ctx.results_url.is_some() {
            // A compressed answer could not be rewritten.
            req.insert_header("accept-encoding", "identity")?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        if ctx.results_url.is_none() {
            return Ok(());
        }
        let header = |name: &str| resp.headers.get(name).and_then(|v| v.to_str().ok());
        let plain_json = resp.status.is_success()
            && header("content-type").is_some_and(|t| t.contains("json"))
            && header("content-encoding").is_none_or(|e| e.eq_ignore_ascii_case("identity"));
        if plain_json {
            resp.remove_header("content-length");
            resp.insert_header("transfer-encoding", "chunked")?;
            ctx.results_body = Some(BytesMut::new());
        } else {
            ctx.results_url = None;
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> pingora::Result<Option<Duration>> {
        let (Some(rewrite), Some(gathered)) = (&ctx.results_url, &mut ctx.results_body) else {
            return Ok(None);
        };
        if let Some(chunk) = body.take() {
            gathered.extend_from_slice(&chunk);
        }
        if end_of_stream || gathered.len() > RESULTS_URL_MAX_BODY {
            let whole = std::mem::take(gathered).freeze();
            *body = Some(if end_of_stream {
                rewrite.apply(&whole).map_or(whole, Bytes::from)
            } else {
                whole
            });
            ctx.results_body = None;
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &pingora::Error,
        ctx: &mut Ctx,
    ) -> FailToProxy {
        // Never `Downstream`: a failure on the caller's side has no answer.
        let Some(reply) = ProxyError::from_passthrough(e).and_then(|a| a.into_reply().ok()) else {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        warn!(error = %e, status = reply.status, "passthrough failed");
        if let Err(we) = reply.write(session, ctx.anthropic).await {
            debug!(error = %we, "could not write the error response");
        }
        FailToProxy {
            error_code: reply.status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&pingora::Error>, ctx: &mut Ctx) {
        let code = session.response_written().map_or(0, |h| h.status.as_u16());
        let m = &self.app.metrics;
        m.http_requests
            .with_label_values(&[ctx.route, ctx.mode, &code.to_string()])
            .inc();
        if ctx.mode == "passthrough" {
            m.passthrough_duration
                .observe(ctx.started.elapsed().as_secs_f64());
        }
    }
}

fn bearer(req: &RequestHeader) -> Option<&str> {
    let v = req
        .headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, key) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(key.trim())
}

fn header<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a str> {
    req.headers.get(name).and_then(|v| v.to_str().ok())
}

/// A Ferry header's value: `Ok(None)` when absent, `Err` when present but
/// not visible ASCII (which must be refused, not mistaken for absence).
fn ferry_header<'a>(req: &'a RequestHeader, name: &str) -> Result<Option<&'a str>, ()> {
    match req.headers.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| ()),
    }
}

/// The request filter: answers Ferry's routes and deferred calls
/// (returns `true`), or lets passthrough go on (`false`). Errors are
/// answered by the caller, [`FerryProxy::request_filter`].
async fn handle(app: &Arc<App>, session: &mut Session, ctx: &mut Ctx) -> Result<bool, ProxyError> {
    let req = session.req_header();
    if let Some(upstream) = batch_events_route(app, req) {
        ctx.route = "batch_events";
        ctx.mode = "batch_events";
        batch_events(app, session, upstream).await?;
        return Ok(true);
    }
    let route = classify(&req.method, req.uri.path());
    ctx.route = route.label();
    ctx.anthropic = match &route {
        Route::Deferrable(endpoint) => endpoint.is_anthropic(),
        _ => routes::is_anthropic(
            req.uri.path(),
            req.headers.contains_key("anthropic-version"),
        ),
    };
    match route {
        Route::Healthz => {
            respond::value(session, 200, &[], &serde_json::json!({"status": "ok"})).await?;
            return Ok(true);
        }
        Route::Readyz => {
            let ready =
                app.ready.load(std::sync::atomic::Ordering::SeqCst) && !app.is_shutting_down();
            let (code, status) = if ready {
                (200, "ready")
            } else {
                (503, "not_ready")
            };
            respond::value(session, code, &[], &serde_json::json!({"status": status})).await?;
            return Ok(true);
        }
        Route::NotFound => return Err(ProxyError::UnknownRoute),
        Route::MethodNotAllowed { allow } => return Err(ProxyError::MethodNotAllowed { allow }),
        _ => {}
    }
    // Either header carries a Ferry key (Ferry's own routes are reached from
    // both SDKs); the family's own header is read first.
    let key = if ctx.anthropic {
        header(req, "x-api-key").or_else(|| bearer(req))
    } else {
        bearer(req).or_else(|| header(req, "x-api-key"))
    };
    let tenant = key
        .and_then(|k| app.config.tenant_for_key(k))
        .cloned()
        .ok_or(ProxyError::InvalidApiKey)?;
    match route {
        Route::Deferrable(endpoint) => {
            let prefer = intake::parse_prefer(
                req.headers
                    .get_all("prefer")
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
            );
            // Over the upstreams of the endpoint's API family.
            let batched_everywhere = app
                .upstreams
                .iter()
                .filter(|u| u.settings.profile.kind.is_anthropic() == endpoint.is_anthropic())
                .all(|u| u.settings.profile.batches(endpoint));
            match intake::disposition(
                prefer,
                &tenant,
                app.config.server.max_wait,
                batched_everywhere,
            ) {
                Disposition::Passthrough => {
                    ctx.mode = "passthrough";
                    passthrough(app, &tenant, ctx)
                }
                Disposition::Deferred { wait } => {
                    ctx.mode = "deferred";
                    check_rate(app, &tenant, LimitKind::Deferred)?;
                    deferred(app, session, &tenant, endpoint, wait).await?;
                    Ok(true)
                }
            }
        }
        Route::Lookup { id, result } => {
            ctx.mode = "lookup";
            let wait = query_wait(req.uri.query())
                .map(Duration::from_secs)
                .unwrap_or_default()
                .min(app.config.server.max_wait);
            lookup(app, session, &tenant, &id, result, wait).await?;
            Ok(true)
        }
        Route::Cancel { id } => {
            ctx.mode = "lookup";
            cancel(app, session, &tenant, &id).await?;
            Ok(true)
        }
        _ => {
            ctx.mode = "passthrough";
            if let Some(id) = own_object_named(app, req.uri.path()).await {
                // Ferry's batch files hold every tenant's prompts and
                // answers, and a delete or cancel would lose results: no
                // tenant reaches them, and none learns more than "not found".
                warn!(tenant = %tenant.name, object = %id, "a tenant asked for one of Ferry's own upstream objects; refused");
                return Err(ProxyError::OwnObject(id));
            }
            let go_on = passthrough(app, &tenant, ctx)?;
            if ctx.anthropic {
                let seen = results_url::Seen {
                    host: header(req, "host").or_else(|| req.uri.authority().map(|a| a.as_str())),
                    forwarded_host: header(req, "x-forwarded-host"),
                    forwarded_proto: header(req, "x-forwarded-proto"),
                };
                ctx.results_url = results_url::Rewrite::for_call(
                    req.uri.path(),
                    &seen,
                    &app.upstreams[ctx.upstream].passthrough.base_path,
                );
            }
            Ok(go_on)
        }
    }
}

/// The upstream whose batch events route `req` is a `POST` to, if any.
fn batch_events_route(app: &App, req: &RequestHeader) -> Option<usize> {
    if req.method != http::Method::POST {
        return None;
    }
    let path = req.uri.path();
    app.upstreams.iter().position(|u| {
        u.settings
            .batch_events
            .as_ref()
            .is_some_and(|e| e.path == path)
    })
}

/// The largest batch event taken (OpenAI's are a few hundred bytes).
const MAX_EVENT_BYTES: u64 = 64 * 1024;

/// Receives one of OpenAI's batch events for `upstream`: refused `400`
/// or `401` unless signed with its secret; a batch's end wakes the driver
/// polling it on this node (see [`crate::batch::events`]).
async fn batch_events(
    app: &Arc<App>,
    session: &mut Session,
    upstream: usize,
) -> Result<(), ProxyError> {
    let up = &app.upstreams[upstream];
    let Some(settings) = &up.settings.batch_events else {
        return Err(ProxyError::UnknownRoute);
    };
    let req = session.req_header();
    let [id, ts, sigs] = ["webhook-id", "webhook-timestamp", "webhook-signature"]
        .map(|h| header(req, h).map(str::to_owned));
    let body = read_body(
        session,
        MAX_EVENT_BYTES,
        app.config.server.body_read_timeout,
    )
    .await?;
    let verdict = crate::batch::events::verify(
        &settings.key,
        id.as_deref(),
        ts.as_deref(),
        sigs.as_deref(),
        &body,
        crate::store::now_secs(),
    )
    .and_then(|()| crate::batch::events::ended_batch(&body));
    match verdict {
        Ok(ended) => {
            if let Some(batch_id) = ended {
                let polling = crate::batch::events::poke(up, &batch_id);
                tracing::info!(upstream = %up.settings.name, batch_id, polling, "batch event received");
            }
            respond::value(session, 200, &[], &serde_json::json!({"received": true})).await?;
        }
        Err(refusal) => {
            warn!(upstream = %up.settings.name, reason = refusal.message(), "batch event refused");
            return Err(ProxyError::BatchEvent(refusal));
        }
    }
    Ok(())
}

/// Lets a passthrough call go on (`false`) to its API family's upstream,
/// unless no upstream speaks that family or the tenant is over its
/// passthrough rate.
fn passthrough(app: &App, tenant: &Tenant, ctx: &mut Ctx) -> Result<bool, ProxyError> {
    ctx.upstream =
        app.config
            .passthrough_upstream(ctx.anthropic)
            .ok_or(ProxyError::NoUpstreamForFamily(if ctx.anthropic {
                "Anthropic"
            } else {
                "OpenAI"
            }))?;
    check_rate(app, tenant, LimitKind::Passthrough)?;
    Ok(false)
}

/// Takes one call of `kind` from the tenant's rate, counting refusals.
fn check_rate(app: &App, tenant: &Tenant, kind: LimitKind) -> Result<(), ProxyError> {
    app.limits.check(&tenant.name, kind).map_err(|retry| {
        app.metrics
            .rate_limited
            .with_label_values(&[kind.as_str()])
            .inc();
        ProxyError::RateLimited { kind, retry }
    })
}

/// Reads the whole body, refusing it as soon as it passes `limit`.
/// A body that trickles in slower than this whole-body deadline is refused
/// with 408, so slow clients cannot hold intake slots open.
async fn read_body(
    session: &mut Session,
    limit: u64,
    deadline: Duration,
) -> Result<Bytes, IntakeError> {
    let declared =
        header(session.req_header(), "content-length").and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > limit) {
        session.set_keepalive(None);
        return Err(IntakeError::TooLarge { size: n, limit });
    }
    let mut buf = BytesMut::new();
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let chunk = match tokio::time::timeout_at(until, session.read_request_body()).await {
            Ok(Ok(c)) => c,
            // A malformed or cut-short body is the client's error, not the
            // upstream's: answer 400 and close.
            Ok(Err(e)) => {
                session.set_keepalive(None);
                return Err(IntakeError::BadRequest {
                    message: format!("the request body could not be read: {}", e.etype().as_str()),
                    param: None,
                    code: "invalid_body",
                });
            }
            Err(_) => {
                session.set_keepalive(None);
                return Err(IntakeError::Timeout(deadline));
            }
        };
        let Some(chunk) = chunk else { break };
        if (buf.len() + chunk.len()) as u64 > limit {
            session.set_keepalive(None);
            return Err(IntakeError::TooLarge {
                size: (buf.len() + chunk.len()) as u64,
                limit,
            });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// A deferred call: validate, store durably, then hold or answer `202`.
async fn deferred(
    app: &Arc<App>,
    session: &mut Session,
    tenant: &Tenant,
    endpoint: Endpoint,
    wait: Duration,
) -> Result<(), ProxyError> {
    let started = Instant::now();
    if app.is_shutting_down() {
        return Err(IntakeError::ShuttingDown.into());
    }
    let queued = app.store.queued_for_admission().await?;
    if queued >= app.config.server.max_queued {
        return Err(IntakeError::QueueFull(queued).into());
    }
    let req = session.req_header();
    let custom_id = match ferry_header(req, "x-ferry-custom-id") {
        Ok(Some(id)) if intake::valid_custom_id(id) => Some(id.to_owned()),
        Ok(Some(_)) | Err(()) => {
            return Err(IntakeError::BadRequest {
                message: "X-Ferry-Custom-Id must be 1-64 characters of A-Z, a-z, 0-9, _ and -"
                    .into(),
                param: Some("X-Ferry-Custom-Id".into()),
                code: "invalid_custom_id",
            }
            .into());
        }
        Ok(None) => None,
    };
    let callback = match ferry_header(req, "x-ferry-callback-url") {
        Ok(None) => Ok(None),
        Ok(Some(url)) => {
            let url = url.to_owned();
            crate::delivery::webhooks::check_callback(
                &url,
                &tenant.callback_allow,
                crate::delivery::webhooks::system_resolve,
            )
            .await
            .map(|_| Some(url))
        }
        Err(()) => Err("X-Ferry-Callback-Url must be a plain ASCII URL".to_owned()),
    };
    let callback_url = callback.map_err(|message| IntakeError::BadRequest {
        message,
        param: Some("X-Ferry-Callback-Url".into()),
        code: "callback_not_allowed",
    })?;
    // A value that is not ASCII is refused like any other malformed one.
    let deadline_header =
        ferry_header(session.req_header(), "x-ferry-deadline").unwrap_or(Some(""));
    let deadline = intake::deadline_secs(deadline_header, tenant.default_deadline)?;
    let body = read_body(
        session,
        app.config.server.max_body_bytes,
        app.config.server.body_read_timeout,
    )
    .await?;
    let profile_for = |model: &str| {
        &app.upstreams[app.config.upstream_for(endpoint, model)]
            .settings
            .profile
    };
    let valid = intake::validate_endpoint_body(endpoint, &body, &profile_for, !wait.is_zero())?;
    let up = &app.upstreams[app.config.upstream_for(endpoint, &valid.model)];
    intake::check_endpoint_batched(&up.settings, endpoint)?;
    intake::check_model_served(&up.settings, &valid.model)?;
    let new = NewRequest {
        tenant: &tenant.name,
        custom_id,
        upstream: &up.settings.name,
        body: valid,
        callback_url,
        deadline_secs: deadline,
    };
    // Before the intake, which reads the request (an idempotent retry may
    // find it finished) or writes it: see [`hold`].
    let mark = app.waiters.mark();
    let accepted = intake::accept(&app.store, new).await?;
    if accepted.created {
        app.after_enqueue(up, &accepted.rec).await;
    }
    let rec = accepted.rec;
    app.metrics
        .intake_duration
        .observe(started.elapsed().as_secs_f64());
    if rec.stream && !wait.is_zero() {
        return stream_replay(app, session, Held::unread(rec, mark), wait).await;
    }
    if wait.is_zero() {
        // The ticket, also for an idempotent retry of a finished request
        // (its status object then carries the result).
        let result = stored_result(app, &rec).await;
        let ticket = status_object(&rec, result.as_ref());
        respond::value(session, 202, &ticket_headers(&rec), &ticket).await?;
        return Ok(());
    }
    let held = hold(app, Held::unread(rec, mark), wait).await;
    answer_result_or_ticket(app, session, held).await
}

/// A request as a held caller last saw it: the record, the waiters' mark
/// taken before it was read, and its answer when a wake-up carried it
/// (else it is read when needed).
struct Held {
    rec: RequestRecord,
    mark: Mark,
    answer: Option<StoredResult>,
}

impl Held {
    /// A record read after `mark` was taken, with no answer at hand.
    fn unread(rec: RequestRecord, mark: Mark) -> Self {
        Held {
            rec,
            mark,
            answer: None,
        }
    }
}

/// Holds the caller until the request is terminal, `wait` passes, or Ferry
/// shuts down; returns the latest record, with its answer when the
/// wake-up carried them (a store read fewer each). A notification since
/// `seen.mark` is never missed.
async fn hold(app: &Arc<App>, seen: Held, wait: Duration) -> Held {
    if wait.is_zero() || seen.rec.status.is_terminal() || app.is_shutting_down() {
        return seen;
    }
    let (rec, mut mark) = (&seen.rec, seen.mark);
    app.metrics.waiters.inc();
    let deadline = tokio::time::Instant::now() + wait;
    let latest = loop {
        let is_done = async {
            current(app, rec.id)
                .await
                .is_some_and(|r| r.status.is_terminal())
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        // With a shared store the answer may come from another node, whose
        // notification can be lost: re-read now and then besides.
        let slice = if app.store.is_shared() {
            left.min(SHARED_RECHECK)
        } else {
            left
        };
        let released = tokio::select! {
            wake = app.waiters.wait(rec.id, slice, mark, is_done) => {
                if let Wake::Finished(f) = wake {
                    break Held {
                        rec: f.record.clone(),
                        mark,
                        answer: f.result.clone(),
                    };
                }
                false
            }
            _ = app.release_waiters.notified() => true,
        };
        mark = app.waiters.mark();
        let now = current(app, rec.id).await;
        let done = now.as_ref().is_some_and(|r| r.status.is_terminal());
        // A wake-up that finds the request unfinished (a re-read asked for
        // by the cluster) goes back to waiting for what is left.
        if done || released || app.is_shutting_down() || tokio::time::Instant::now() >= deadline {
            break Held::unread(now.unwrap_or_else(|| rec.clone()), mark);
        }
    };
    app.metrics.waiters.dec();
    latest
}

/// How often a held caller re-reads its request when other nodes may
/// store its answer: the most a lost notification delays it.
const SHARED_RECHECK: Duration = Duration::from_secs(5);

/// The first spelling of an object id in `path` that names one of Ferry's
/// own upstream files or batches.
async fn own_object_named(app: &App, path: &str) -> Option<String> {
    for id in object_id_candidates(path) {
        if app.store.is_own_upstream_object(&id).await {
            return Some(id);
        }
    }
    None
}

/// The request as stored now (`None` if it cannot be read).
async fn current(app: &App, id: u64) -> Option<RequestRecord> {
    app.store.get(id).await.ok().flatten()
}

/// The upstream's stored answer; only `completed` requests have one, so
/// the common case (a fresh ticket) costs no read.
async fn stored_result(app: &App, rec: &RequestRecord) -> Option<StoredResult> {
    if rec.status != RequestStatus::Completed {
        return None;
    }
    app.store.result(rec.id).await.ok().flatten()
}

/// A held request's answer: the one its wake-up carried, else as stored.
async fn held_result(app: &App, held: &Held) -> Option<StoredResult> {
    match &held.answer {
        Some(a) => Some(a.clone()),
        None => stored_result(app, &held.rec).await,
    }
}

fn ticket_headers(rec: &RequestRecord) -> [(&'static str, String); 2] {
    [
        ("location", format!("/v1/ferry/requests/{}", rec.custom_id)),
        ("preference-applied", "respond-async".to_owned()),
    ]
}

/// The upstream's own answer if the request is finished, else the ticket.
async fn answer_result_or_ticket(
    app: &Arc<App>,
    session: &mut Session,
    held: Held,
) -> Result<(), ProxyError> {
    if held.rec.status.is_terminal() {
        return answer_result(app, session, held).await;
    }
    respond::value(
        session,
        202,
        &ticket_headers(&held.rec),
        &status_object(&held.rec, None),
    )
    .await?;
    Ok(())
}

/// A terminal request's answer: the upstream's status code and body
/// verbatim; for requests the upstream never answered,
/// [`ProxyError::Unanswered`].
async fn answer_result(
    app: &Arc<App>,
    session: &mut Session,
    held: Held,
) -> Result<(), ProxyError> {
    let Some(r) = held_result(app, &held).await else {
        // The purge may have removed the request and its result since its
        // record was read: then it answers 404 like any purged request.
        let still_stored = !matches!(app.store.get(held.rec.id).await, Ok(None));
        return Err(ProxyError::no_result(&held.rec, still_stored));
    };
    respond::json(session, r.status_code, &[], r.body).await?;
    Ok(())
}

/// `stream: true` with a wait: SSE keep-alives while the batch runs, then
/// the finished completion replayed as chunks. Headers are sent only when the
/// first keep-alive is due, so a result (or an error) that is ready sooner
/// is answered with its real status code.
async fn stream_replay(
    app: &Arc<App>,
    session: &mut Session,
    mut held: Held,
    wait: Duration,
) -> Result<(), ProxyError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut started = false;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        // Keep-alive comments stop clients and middleboxes timing the stream out.
        held = hold(app, held, left.min(app.config.server.sse_keepalive)).await;
        if held.rec.status.is_terminal() || left.is_zero() || app.is_shutting_down() {
            break;
        }
        if !started {
            respond::sse_start(session).await?;
            started = true;
        }
        session
            .write_response_body(Some(replay::keepalive(held.rec.endpoint)), false)
            .await?;
    }
    let result = held_result(app, &held).await;
    match (started, held.rec.status.is_terminal(), result) {
        (false, false, _) => answer_result_or_ticket(app, session, held).await,
        (false, true, Some(r)) if r.status_code != 200 => answer_result(app, session, held).await,
        (false, true, None) => answer_result(app, session, held).await,
        (started, _, result) => {
            let rec = held.rec;
            if !started {
                respond::sse_start(session).await?;
            }
            let mut out = BytesMut::new();
            match result {
                Some(r) if r.status_code == 200 => {
                    out.extend_from_slice(&replay::replay(rec.endpoint, &r.body_value()));
                }
                other => {
                    // Headers are gone: report as OpenAI does mid-stream, an
                    // `error` event, then end without [DONE].
                    let err = match other {
                        Some(r) => r.body_value().get("error").cloned().unwrap_or(Value::Null),
                        None if rec.status.is_terminal() => {
                            let why = error::why_unanswered(&rec);
                            serde_json::json!({"message": why.message, "type": "ferry_error", "code": why.code})
                        }
                        None => serde_json::json!({
                            "message": format!("the result was not ready within the wait; fetch it from /v1/ferry/requests/{}", rec.custom_id),
                            "type": "ferry_pending", "code": "result_pending",
                            "ferry_request": status_object(&rec, None),
                        }),
                    };
                    out.extend_from_slice(&replay::error_event(rec.endpoint, err));
                }
            }
            session
                .write_response_body(Some(out.freeze()), true)
                .await?;
            Ok(())
        }
    }
}

async fn lookup(
    app: &Arc<App>,
    session: &mut Session,
    tenant: &Tenant,
    id: &str,
    want_result: bool,
    wait: Duration,
) -> Result<(), ProxyError> {
    // Before the read: see [`hold`].
    let mark = app.waiters.mark();
    let (rec, answer) = app
        .store
        .find_answered(&tenant.name, id)
        .await?
        .ok_or_else(|| ProxyError::RequestNotFound(id.to_owned()))?;
    let seen = Held { rec, mark, answer };
    let held = hold(app, seen, wait).await;
    if want_result {
        return answer_result_or_ticket(app, session, held).await;
    }
    let result = held_result(app, &held).await;
    respond::value(
        session,
        200,
        &[],
        &status_object(&held.rec, result.as_ref()),
    )
    .await?;
    Ok(())
}

async fn cancel(
    app: &Arc<App>,
    session: &mut Session,
    tenant: &Tenant,
    id: &str,
) -> Result<(), ProxyError> {
    let outcome = app
        .store
        .cancel(&tenant.name, id, crate::delivery::webhook_payload)
        .await?;
    let rec = match outcome {
        CancelOutcome::Cancelled(rec) => {
            app.on_terminal(&rec, None);
            rec
        }
        CancelOutcome::AlreadyCancelled(rec) => rec,
        CancelOutcome::TooLate(rec) => {
            return Err(ProxyError::CancelTooLate {
                id: id.to_owned(),
                status: rec.status,
            });
        }
        CancelOutcome::NotFound => return Err(ProxyError::RequestNotFound(id.to_owned())),
    };
    respond::value(session, 200, &[], &status_object(&rec, None)).await?;
    Ok(())
}
