//! Webhooks: callback URL checks (allow-list and SSRF), Standard Webhooks
//! signatures, and the worker that drains the durable outbox.
//!
//! A delivery is written to the outbox together with the request's terminal
//! state, so it survives restarts. Each try signs the same `webhook-id` with
//! the current timestamp; any 2xx is delivery; anything else (including a
//! redirect, which is never followed) is retried with capped exponential
//! backoff and jitter until the delivery is older than `max_age`, then it is
//! dead. At most `per_host` deliveries to one host are in flight, so one slow
//! or dead receiver cannot hold up the others.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use dashmap::DashMap;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::App;
use crate::store::{Delivery, WebhookState, WebhookStatus, now_millis};

// ------------------------------------------------------------ allow-list

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Named exactly: allowed even if it is loopback or private.
    Exact(String),
    /// `*.example.com`: any subdomain, public addresses only.
    Suffix(String),
    /// `*`: any host, public addresses only.
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortPattern {
    /// No port given: the scheme's default.
    Default,
    Any,
    Exact(u16),
}

/// One entry of a tenant's callback allow-list: `scheme://host[:port]`,
/// where host may be `*` or `*.domain` and port may be `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowEntry {
    pub https: bool,
    pub host: HostPattern,
    pub port: PortPattern,
}

impl AllowEntry {
    pub fn parse(s: &str) -> Result<AllowEntry, String> {
        let (https, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("`{s}` must start with http:// or https://"));
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.contains('@') || rest.is_empty() {
            return Err(format!(
                "`{s}` must be scheme://host[:port] with no path or user"
            ));
        }
        let (host, port) =
            split_host_port(rest).ok_or_else(|| format!("`{s}` has a bad host or port"))?;
        let port = match port {
            None => PortPattern::Default,
            Some("*") => PortPattern::Any,
            Some(p) => PortPattern::Exact(p.parse().map_err(|_| format!("`{s}` has a bad port"))?),
        };
        let host = host.to_ascii_lowercase();
        let host = if host == "*" {
            HostPattern::Any
        } else if let Some(d) = host.strip_prefix("*.") {
            HostPattern::Suffix(d.to_owned())
        } else {
            HostPattern::Exact(host)
        };
        Ok(AllowEntry { https, host, port })
    }

    fn matches(&self, https: bool, host: &str, port: u16) -> bool {
        if self.https != https {
            return false;
        }
        let default = if https { 443 } else { 80 };
        let port_ok = match self.port {
            PortPattern::Default => port == default,
            PortPattern::Any => true,
            PortPattern::Exact(p) => p == port,
        };
        let host_ok = match &self.host {
            HostPattern::Exact(h) => h == host,
            HostPattern::Suffix(d) => {
                host.len() > d.len() + 1
                    && host.ends_with(d.as_str())
                    && host[..host.len() - d.len()].ends_with('.')
            }
            HostPattern::Any => true,
        };
        port_ok && host_ok
    }
}

/// `host:port`, `host`, `[v6]:port`, `[v6]` → (host, port).
fn split_host_port(s: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']')?;
        let host = &rest[..end];
        let after = &rest[end + 1..];
        return match after.strip_prefix(':') {
            Some(p) => Some((host, Some(p))),
            None if after.is_empty() => Some((host, None)),
            None => None,
        };
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !h.contains(':') => Some((h, Some(p))),
        Some(_) => None,
        None => Some((s, None)),
    }
}

/// Addresses a callback must not reach unless its host is named exactly:
/// loopback, private, link-local, unspecified, CGNAT, unique-local.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackUrl {
    pub https: bool,
    pub host: String,
    pub port: u16,
}

/// Checks a callback URL against a tenant's allow-list; `resolve` looks the
/// host up (so tests and the SSRF check share one code path). The message
/// says why a URL is refused.
pub async fn check_callback<F, Fut>(
    url: &str,
    allow: &[AllowEntry],
    resolve: F,
) -> Result<CallbackUrl, String>
where
    F: FnOnce(String, u16) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<Vec<IpAddr>>>,
{
    let uri: http::Uri = url
        .parse()
        .map_err(|_| "X-Ferry-Callback-Url is not a valid URL".to_owned())?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("X-Ferry-Callback-Url must be an http:// or https:// URL".into()),
    };
    let authority = uri.authority().ok_or("X-Ferry-Callback-Url has no host")?;
    if authority.as_str().contains('@') {
        return Err("X-Ferry-Callback-Url must not carry credentials".into());
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let entry = allow
        .iter()
        .find(|e| e.matches(https, &host, port))
        .ok_or("X-Ferry-Callback-Url is not in this tenant's callback allow-list")?;
    if matches!(entry.host, HostPattern::Exact(_)) {
        return Ok(CallbackUrl { https, host, port });
    }
    let ips = match host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => resolve(host.clone(), port)
            .await
            .map_err(|e| format!("cannot resolve the callback host `{host}`: {e}"))?,
    };
    if ips.is_empty() || ips.iter().any(|ip| is_internal(*ip)) {
        return Err(format!(
            "the callback host `{host}` resolves to a loopback, private or link-local address; \
             name it exactly in the tenant's allow-list to allow it"
        ));
    }
    Ok(CallbackUrl { https, host, port })
}

/// System DNS through tokio.
pub async fn system_resolve(host: String, port: u16) -> std::io::Result<Vec<IpAddr>> {
    Ok(tokio::net::lookup_host((host.as_str(), port))
        .await?
        .map(|a| a.ip())
        .collect())
}

/// The resolver of the delivery client: refuses internal addresses for any
/// host that no allow-list names exactly, so DNS that changes between intake
/// and delivery (rebinding) cannot turn a webhook against the inside.
struct GuardedResolver {
    exact_hosts: Arc<HashSet<String>>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_ascii_lowercase();
        let exact = self.exact_hosts.contains(&host);
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| exact || !is_internal(a.ip()))
                .collect();
            if allowed.is_empty() {
                return Err(format!("`{host}` resolves only to internal addresses").into());
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

// ------------------------------------------------------------ signatures

/// Decodes a `whsec_...` secret into the HMAC key.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, String> {
    let b64 = secret
        .strip_prefix("whsec_")
        .ok_or("a webhook secret must start with `whsec_`")?;
    B64.decode(b64)
        .map_err(|_| "a webhook secret must be `whsec_` followed by base64".to_owned())
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` (Standard Webhooks).
pub fn sign(key: &[u8], msg_id: &str, timestamp: u64, body: &str) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        // HMAC takes keys of any length; this branch cannot be reached.
        return String::new();
    };
    mac.update(format!("{msg_id}.{timestamp}.{body}").as_bytes());
    format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
}

// ------------------------------------------------------------ the worker

/// Knobs of the delivery worker (`[webhooks]` in config).
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub max_age: Duration,
    pub retry_base: Duration,
    pub retry_cap: Duration,
    pub timeout: Duration,
    pub concurrency: usize,
    pub per_host: usize,
}

/// The webhook HTTP client: no redirects, the DNS guard against internal
/// addresses. Built once at start; Ferry refuses to start without it rather
/// than fall back to a client with neither.
pub fn client(config: &crate::config::Config) -> Result<reqwest::Client, reqwest::Error> {
    let exact: HashSet<String> = config
        .tenants
        .iter()
        .flat_map(|t| t.callback_allow.iter())
        .filter_map(|e| match &e.host {
            HostPattern::Exact(h) => Some(h.clone()),
            _ => None,
        })
        .collect();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(config.webhooks.timeout)
        .dns_resolver(Arc::new(GuardedResolver {
            exact_hosts: Arc::new(exact),
        }))
        .build()
}

/// Drains the outbox until shutdown.
pub async fn run(app: Arc<App>, http: reqwest::Client, mut shutdown: watch::Receiver<bool>) {
    let in_flight: Arc<DashMap<String, usize>> = Arc::new(DashMap::new());
    let total = Arc::new(tokio::sync::Semaphore::new(
        app.config.webhooks.concurrency.max(1),
    ));
    loop {
        if let Ok(depth) = app.store.outbox_len().await {
            app.metrics.webhook_outbox_depth.set(depth as i64);
        }
        let now = now_millis();
        let due = match app.store.take_due_deliveries(now, 256).await {
            Ok(due) => due,
            Err(e) => {
                warn!(error = %e, "cannot take due webhook deliveries; will retry");
                Vec::new()
            }
        };
        for d in due {
            let host = host_of(&d.url);
            let busy = in_flight
                .get(&host)
                .is_some_and(|n| *n >= app.config.webhooks.per_host);
            let Ok(permit) = total.clone().try_acquire_owned() else {
                app.store.reschedule_delivery(&d, now + 50).await;
                continue;
            };
            if busy {
                // This receiver is slow: try again shortly, others go on.
                app.store.reschedule_delivery(&d, now + 100).await;
                continue;
            }
            *in_flight.entry(host.clone()).or_insert(0) += 1;
            let (app, http, in_flight) = (app.clone(), http.clone(), in_flight.clone());
            tokio::spawn(async move {
                deliver(&app, &http, d).await;
                if let Some(mut n) = in_flight.get_mut(&host) {
                    *n = n.saturating_sub(1);
                }
                // A host with nothing in flight is forgotten: callback hosts
                // under a `*.domain` allowance are unbounded.
                in_flight.remove_if(&host, |_, n| *n == 0);
                drop(permit);
                app.store.wake_outbox();
            });
        }
        let sleep = app
            .store
            .next_delivery_due()
            .await
            .ok()
            .flatten()
            .map_or(Duration::from_secs(1), |due| {
                Duration::from_millis(due.saturating_sub(now_millis()))
            })
            .min(Duration::from_secs(1));
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = app.store.outbox_notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn host_of(url: &str) -> String {
    url.parse::<http::Uri>()
        .ok()
        .and_then(|u| u.host().map(str::to_owned))
        .unwrap_or_default()
}

async fn deliver(app: &Arc<App>, http: &reqwest::Client, mut d: Delivery) {
    let key = app
        .config
        .tenants
        .iter()
        .find(|t| t.name == d.tenant)
        .and_then(|t| t.webhook_key.clone());
    let Some(key) = key else {
        warn!(request = d.request, tenant = %d.tenant, "tenant has no webhook secret any more; dropping the delivery");
        finish(
            app,
            d,
            WebhookStatus::Dead,
            Some("no webhook secret configured".into()),
        )
        .await;
        return;
    };
    let ts = crate::store::now_secs();
    let started = Instant::now();
    let res = http
        .post(&d.url)
        .header("content-type", "application/json")
        .header("webhook-id", &d.msg_id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sign(&key, &d.msg_id, ts, &d.payload))
        .header("user-agent", concat!("ferry/", env!("CARGO_PKG_VERSION")))
        .body(d.payload.clone())
        .send()
        .await;
    d.attempts += 1;
    let error = match res {
        Ok(r) if r.status().is_success() => None,
        Ok(r) => Some(format!("receiver answered {}", r.status().as_u16())),
        Err(e) => Some(format!("cannot reach the receiver: {e}")),
    };
    let Some(error) = error else {
        app.metrics
            .webhook_deliveries
            .with_label_values(&["delivered"])
            .inc();
        info!(request = d.request, msg_id = %d.msg_id, attempts = d.attempts, took_ms = started.elapsed().as_millis() as u64, "webhook delivered");
        finish(app, d, WebhookStatus::Delivered, None).await;
        return;
    };
    let s = &app.config.webhooks;
    let age = Duration::from_millis(now_millis().saturating_sub(d.first_ms));
    if age >= s.max_age {
        app.metrics
            .webhook_deliveries
            .with_label_values(&["dead"])
            .inc();
        warn!(request = d.request, msg_id = %d.msg_id, attempts = d.attempts, error = %error, "webhook dead: retries exhausted");
        finish(app, d, WebhookStatus::Dead, Some(error)).await;
        return;
    }
    app.metrics
        .webhook_deliveries
        .with_label_values(&["retry"])
        .inc();
    let wait = crate::upstream::backoff(
        d.attempts.saturating_sub(1),
        s.retry_base,
        s.retry_cap,
        rand::random(),
    );
    warn!(request = d.request, msg_id = %d.msg_id, attempts = d.attempts, error = %error, retry_in_ms = wait.as_millis() as u64, "webhook failed; will retry");
    d.due_ms = now_millis() + wait.as_millis() as u64;
    let state = WebhookState {
        status: WebhookStatus::Pending,
        attempts: d.attempts,
        last_error: Some(error),
    };
    if let Err(e) = app.store.retry_delivery(d, state).await {
        warn!(error = %e, "cannot record the webhook retry");
    }
}

/// Records a delivery's end: delivered, or dead.
async fn finish(app: &App, d: Delivery, status: WebhookStatus, last_error: Option<String>) {
    let request = d.request;
    if let Err(e) = app.store.finish_delivery(d, status, last_error).await {
        warn!(request, error = %e, "cannot record the end of a webhook delivery");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_entries_parse_and_match() {
        let e = AllowEntry::parse("https://hooks.example.com").unwrap();
        assert!(e.matches(true, "hooks.example.com", 443));
        assert!(!e.matches(true, "hooks.example.com", 8443));
        assert!(!e.matches(false, "hooks.example.com", 80));
        let e = AllowEntry::parse("http://127.0.0.1:*").unwrap();
        assert!(e.matches(false, "127.0.0.1", 5555));
        let e = AllowEntry::parse("https://*.example.com:8443").unwrap();
        assert!(e.matches(true, "a.example.com", 8443));
        assert!(!e.matches(true, "example.com", 8443));
        assert!(!e.matches(true, "evilexample.com", 8443));
        assert!(AllowEntry::parse("ftp://x").is_err());
        assert!(AllowEntry::parse("https://x/path").is_err());
        assert!(AllowEntry::parse("https://u@x").is_err());
        assert!(AllowEntry::parse("https://x:port").is_err());
        assert_eq!(
            AllowEntry::parse("http://[::1]:80").unwrap().host,
            HostPattern::Exact("::1".into())
        );
    }

    fn resolver(
        ips: Vec<IpAddr>,
    ) -> impl FnOnce(String, u16) -> std::future::Ready<std::io::Result<Vec<IpAddr>>> {
        move |_, _| std::future::ready(Ok(ips))
    }

    #[tokio::test]
    async fn ssrf_needs_an_exact_name() {
        let allow = vec![
            AllowEntry::parse("https://*").unwrap(),
            AllowEntry::parse("http://127.0.0.1:*").unwrap(),
        ];
        let public: IpAddr = "93.184.216.34".parse().unwrap();
        let private: IpAddr = "10.1.2.3".parse().unwrap();
        assert!(
            check_callback(
                "https://hooks.example.com/x",
                &allow,
                resolver(vec![public])
            )
            .await
            .is_ok()
        );
        let e = check_callback(
            "https://internal.example.com/x",
            &allow,
            resolver(vec![private]),
        )
        .await
        .unwrap_err();
        assert!(e.contains("private"), "{e}");
        assert!(
            check_callback("https://169.254.169.254/latest", &allow, resolver(vec![]))
                .await
                .is_err()
        );
        assert!(
            check_callback("https://[::1]/x", &allow, resolver(vec![]))
                .await
                .is_err()
        );
        // Named exactly: allowed although it is loopback.
        assert!(
            check_callback("http://127.0.0.1:9999/hook", &allow, resolver(vec![]))
                .await
                .is_ok()
        );
        // Not in the list at all.
        let e = check_callback("http://example.com/x", &allow, resolver(vec![public]))
            .await
            .unwrap_err();
        assert!(e.contains("allow-list"), "{e}");
        assert!(
            check_callback(
                "https://user:pw@hooks.example.com/",
                &allow,
                resolver(vec![public])
            )
            .await
            .is_err()
        );
        assert!(
            check_callback("not a url", &allow, resolver(vec![public]))
                .await
                .is_err()
        );
    }

    #[test]
    fn internal_ranges() {
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "93.184.216.34", "2001:4860:4860::8888"] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example from the Standard Webhooks specification's reference tests.
        let key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(decode_secret("nope").is_err());
        assert!(decode_secret("whsec_!!").is_err());
    }
}
