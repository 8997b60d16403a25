//! Shared harness for the integration tests: the real `ferry` binary and a
//! standalone `ferry emulator`, each started on port 0 in its own process,
//! talking real HTTP over loopback; or Ferry alone with its embedded
//! emulator (the default shape), which dies and restarts with it.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod pg;
pub mod process;
pub use process::{Proc, spawn};

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_ferry");
pub const UPSTREAM_KEY: &str = "upstream-secret";

/// How long a test waits for a started process to announce its ports.
const START_WAIT: Duration = Duration::from_secs(60);

pub fn emulator(dir: &Path, args: &[&str]) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "emulator",
        "--listen",
        "127.0.0.1:0",
        "--api-key",
        UPSTREAM_KEY,
    ])
    .args(args);
    spawn(cmd, &["emulator"], dir.join("emulator.log"), START_WAIT)
}

/// The store a stack's Ferry runs on. Suites that hold for both run one
/// test body per backend ([`on_both_backends!`](crate::on_both_backends)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sled,
    /// A fresh database on the server in `FERRY_TEST_PG_URL`.
    Postgres,
}

/// The file in a stack's directory naming the database its Ferry uses; read
/// at every start, restarts included.
const DATABASE_URL_FILE: &str = "database_url";

impl Backend {
    /// The `[storage]` table for a Ferry in `dir`; for PostgreSQL it makes
    /// the database and records its URL for [`ferry`] to pass on.
    pub fn storage_config(self, dir: &Path) -> String {
        match self {
            Backend::Sled => String::new(),
            Backend::Postgres => postgres_storage(dir, &pg::fresh_database(), ""),
        }
    }
}

/// The `[storage]` table for a Ferry in `dir` on the database at `url`
/// (several nodes share one), with `extra` lines; records the URL for
/// [`ferry`] to pass on.
pub fn postgres_storage(dir: &Path, url: &str, extra: &str) -> String {
    std::fs::create_dir_all(dir).expect("node dir");
    std::fs::write(dir.join(DATABASE_URL_FILE), url).expect("record the database URL");
    format!(
        "[storage]\nkind = \"postgres\"\nurl_env = \"{}\"\n{extra}\n",
        pg::DB_ENV
    )
}

/// Runs an `async fn name(backend: Backend)` test body once per backend,
/// as the tests `name::sled` and `name::postgres`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn sled() {
                    super::$name($crate::common::Backend::Sled).await
                }
                #[tokio::test]
                async fn postgres() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            }
        )*
    };
}

/// The tenants every test config has.
pub const TENANTS: &str = r#"
[[tenants]]
name = "alice"
keys = ["alice-key"]

[[tenants]]
name = "bob"
keys = ["bob-key"]

[[tenants]]
name = "batchy"
keys = ["batchy-key"]
default_mode = "defer"
default_wait_secs = 30
"#;

/// A Ferry config against the emulator at `upstream`, with `upstream_extra`
/// lines added to its `[[upstreams]]` table and `server_extra` to `[server]`.
pub fn config(
    dir: &Path,
    upstream: SocketAddr,
    upstream_extra: &str,
    server_extra: &str,
) -> String {
    config_on(Backend::Sled, dir, upstream, upstream_extra, server_extra)
}

/// [`config`] on `backend`.
pub fn config_on(
    backend: Backend,
    dir: &Path,
    upstream: SocketAddr,
    upstream_extra: &str,
    server_extra: &str,
) -> String {
    let target =
        format!("base_url = \"http://{upstream}/v1\"\napi_key_env = \"FERRY_TEST_UPSTREAM_KEY\"");
    let storage = backend.storage_config(dir);
    config_for(dir, &storage, &target, upstream_extra, server_extra)
}

/// A Ferry config whose upstream is its embedded emulator (as in
/// `config/ferry.toml`), with `emulator_extra` knobs in its `[emulator]`
/// table; otherwise as [`config`].
pub fn embedded_config(
    dir: &Path,
    emulator_extra: &str,
    upstream_extra: &str,
    server_extra: &str,
) -> String {
    embedded_config_on(
        Backend::Sled,
        dir,
        emulator_extra,
        upstream_extra,
        server_extra,
    )
}

/// [`embedded_config`] on `backend`.
pub fn embedded_config_on(
    backend: Backend,
    dir: &Path,
    emulator_extra: &str,
    upstream_extra: &str,
    server_extra: &str,
) -> String {
    let storage = backend.storage_config(dir);
    let emulator = format!("{storage}[emulator]\napi_key = \"{UPSTREAM_KEY}\"\n{emulator_extra}\n");
    config_for(
        dir,
        &emulator,
        "emulator = true",
        upstream_extra,
        server_extra,
    )
}

/// `tables`: top-level tables that come before the upstream (`[storage]`,
/// `[emulator]`).
pub fn config_for(
    dir: &Path,
    tables: &str,
    target: &str,
    upstream_extra: &str,
    server_extra: &str,
) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
data_dir = "{data}"
threads = 1
{grace}
{server_extra}

{tables}
[[upstreams]]
name = "emu"
kind = "openai"
{target}
{poll}
{max_wait}
{upstream_extra}
{TENANTS}
"#,
        data = dir.join("data").display(),
        grace = if server_extra.contains("shutdown_grace_secs") {
            ""
        } else {
            "shutdown_grace_secs = 0"
        },
        poll = if upstream_extra.contains("poll_interval_secs") {
            ""
        } else {
            "poll_interval_secs = 0.05"
        },
        // Nothing flushes by time unless a test asks for it.
        max_wait = if upstream_extra.contains("max_wait_secs") {
            ""
        } else {
            "max_wait_secs = 3600"
        },
    )
}

pub fn ferry(dir: &Path, config: &str) -> Proc {
    ferry_with(dir, config, &["proxy", "admin"])
}

/// Ferry on its embedded emulator: waits for the emulator's address too.
pub fn ferry_embedded(dir: &Path, config: &str) -> Proc {
    ferry_with(dir, config, &["proxy", "admin", "emulator"])
}

fn ferry_with(dir: &Path, config: &str, services: &[&str]) -> Proc {
    let path = dir.join("ferry.toml");
    std::fs::write(&path, config).expect("write config");
    let mut cmd = Command::new(BIN);
    cmd.arg("--config")
        .arg(&path)
        .env("FERRY_TEST_UPSTREAM_KEY", UPSTREAM_KEY)
        .env("FERRY_LOG", "info,pingora_core=warn,pingora_proxy=warn");
    if let Ok(url) = std::fs::read_to_string(dir.join(DATABASE_URL_FILE)) {
        cmd.env(pg::DB_ENV, url);
    }
    spawn(
        cmd,
        services,
        dir.join(format!(
            "ferry-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        )),
        START_WAIT,
    )
}

/// An emulator and a Ferry in front of it.
pub struct Stack {
    pub dir: tempfile::TempDir,
    /// The standalone emulator; `None` when Ferry embeds it.
    pub emulator: Option<Proc>,
    pub ferry: Proc,
    pub http: reqwest::Client,
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client")
}

impl Stack {
    pub fn start(upstream_extra: &str, server_extra: &str) -> Stack {
        Stack::start_on(Backend::Sled, upstream_extra, server_extra)
    }

    /// [`Stack::start`] with Ferry on `backend`.
    pub fn start_on(backend: Backend, upstream_extra: &str, server_extra: &str) -> Stack {
        Stack::start_on_with(backend, &|_| upstream_extra.to_owned(), server_extra)
    }

    /// [`Stack::start_on`] with the upstream's extra lines made from the
    /// emulator's address (for a second `[[upstreams]]` table on it).
    pub fn start_on_with(
        backend: Backend,
        upstream_extra: &dyn Fn(SocketAddr) -> String,
        server_extra: &str,
    ) -> Stack {
        let dir = tempfile::tempdir().expect("tempdir");
        let emulator = emulator(dir.path(), &[]);
        let cfg = config_on(
            backend,
            dir.path(),
            emulator.addr("emulator"),
            &upstream_extra(emulator.addr("emulator")),
            server_extra,
        );
        let ferry = ferry(dir.path(), &cfg);
        Stack {
            dir,
            emulator: Some(emulator),
            ferry,
            http: client(),
        }
    }

    /// Ferry alone on its embedded emulator, with `emulator_extra` knobs
    /// (they apply at every start, restarts included).
    pub fn start_embedded(emulator_extra: &str, upstream_extra: &str, server_extra: &str) -> Stack {
        Stack::start_embedded_on(Backend::Sled, emulator_extra, upstream_extra, server_extra)
    }

    /// [`Stack::start_embedded`] with Ferry on `backend`.
    pub fn start_embedded_on(
        backend: Backend,
        emulator_extra: &str,
        upstream_extra: &str,
        server_extra: &str,
    ) -> Stack {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = embedded_config_on(
            backend,
            dir.path(),
            emulator_extra,
            upstream_extra,
            server_extra,
        );
        let ferry = ferry_embedded(dir.path(), &cfg);
        Stack {
            dir,
            emulator: None,
            ferry,
            http: client(),
        }
    }

    /// Stops Ferry (SIGKILL) and starts it again on the same data and config.
    /// An embedded emulator dies and comes back with it, on a new port.
    pub fn restart_ferry(&mut self) {
        let _ = self.ferry.child.kill();
        let _ = self.ferry.child.wait();
        let cfg = std::fs::read_to_string(self.dir.path().join("ferry.toml")).expect("config");
        self.ferry = match self.emulator {
            Some(_) => ferry(self.dir.path(), &cfg),
            None => ferry_embedded(self.dir.path(), &cfg),
        };
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ferry.addr("proxy"))
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://{}{path}", self.ferry.addr("admin"))
    }

    /// A URL on the emulator, standalone or embedded (the embedded one's
    /// port changes at every restart).
    pub fn emu(&self, path: &str) -> String {
        let emulator = self.emulator.as_ref().unwrap_or(&self.ferry);
        format!("http://{}{path}", emulator.addr("emulator"))
    }

    /// `GET` on the emulator's Batch API with the upstream key: what the
    /// provider itself holds, seen past Ferry.
    pub async fn upstream_get(&self, path: &str) -> Value {
        self.http
            .get(self.emu(path))
            .bearer_auth(UPSTREAM_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn emulator_stats(&self) -> Value {
        self.http
            .get(self.emu("/_emulator/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn emulator_config(&self, patch: Value) {
        let r = self
            .http
            .post(self.emu("/_emulator/config"))
            .json(&patch)
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "emulator config: {}",
            r.text().await.unwrap()
        );
    }

    /// The Prometheus exposition from the admin port.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.admin("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Waits until no batch is live (results stored, upstream files deleted).
    /// File cleanup follows the results and nothing can long-poll it, so this
    /// polls `ferry_live_batches` briefly.
    pub async fn until_no_live_batches(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let m = self.metrics().await;
            if m.lines().any(|l| l == "ferry_live_batches 0") {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "batches still live:\n{m}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A chat completion passed through (no `Prefer`) as `key`.
    pub async fn chat_call(&self, key: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// `GET path` on the proxy port as `key`.
    pub async fn get(&self, key: &str, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
    }

    /// Flushes every queue now (admin route).
    pub async fn flush(&self) {
        let r = self
            .http
            .post(self.admin("/admin/flush"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }

    /// A deferred chat completion (`Prefer: respond-async[, wait=N]`).
    pub async fn defer(
        &self,
        key: &str,
        body: &Value,
        wait: Option<u64>,
        custom_id: Option<&str>,
    ) -> reqwest::Response {
        let prefer = match wait {
            Some(w) => format!("respond-async, wait={w}"),
            None => "respond-async".to_owned(),
        };
        let mut req = self
            .http
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(key)
            .header("prefer", prefer)
            .json(body);
        if let Some(id) = custom_id {
            req = req.header("x-ferry-custom-id", id);
        }
        req.send().await.unwrap()
    }

    /// `GET /v1/ferry/requests/{id}?wait=S` as `key`.
    pub async fn status(&self, key: &str, id: &str, wait: u64) -> (u16, Value) {
        let r = self
            .http
            .get(self.url(&format!("/v1/ferry/requests/{id}?wait={wait}")))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        let code = r.status().as_u16();
        (code, r.json().await.unwrap())
    }
}

/// Waits until alice's request reaches `status` (intermediate states cannot be
/// long-polled; this polls Ferry's status route briefly).
pub async fn until_status(s: &Stack, id: &str, status: &str) -> Value {
    until(s, id, status, |st| st["status"] == status).await
}

/// Waits until a request's status object satisfies `done` (`what` names it).
pub async fn until(s: &Stack, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, st) = s.status("alice-key", id, 0).await;
        if done(&st) {
            return st;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} never became {what}: {st}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn chat(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

/// The Python with the official SDKs: `$FERRY_TEST_PYTHON`, else the venv
/// `.ci/run` creates, else `python3`.
pub fn python() -> String {
    if let Ok(p) = std::env::var("FERRY_TEST_PYTHON") {
        return p;
    }
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/target/pyenv/bin/python");
    if Path::new(venv).exists() {
        return venv.to_owned();
    }
    "python3".to_owned()
}

/// Runs a script from `tests/python` with `env`, feeding `stdin`; panics
/// with its output unless it exits 0.
pub fn run_python(script: &str, env: &[(&str, String)], stdin: &str) -> String {
    use std::io::Write;
    let python = python();
    let path = format!("{}/tests/python/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new(&python)
        .arg(&path)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env_remove("OPENAI_ORG_ID")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{python}` ({e}): run `bash .ci/run` once, or set FERRY_TEST_PYTHON to a Python with `openai` and `standardwebhooks`"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
