//! Ferry as a cluster: three nodes (the real binary) on one PostgreSQL
//! database and one standalone emulator, as behind a load balancer.
//!
//! - A caller held on one node is answered when another node, the one that
//!   owns the upstream, ingests the batch (LISTEN/NOTIFY between nodes).
//! - Deferred load spread round-robin over the nodes while the node that
//!   owns the upstream is killed (SIGKILL) mid-flush and mid-ingestion,
//!   several times: another node takes the upstream over within the lease
//!   time and resumes the dead node's batches. At the end every `202`
//!   completed with its own answer, the emulator ran no `custom_id` twice,
//!   no request sat in two batches and no input file is left upstream.
//!
//! Needs `FERRY_TEST_PG_URL` (`.ci/run` starts a server); fails without it.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Proc, UPSTREAM_KEY, chat};
use serde_json::{Value, json};

/// The lease a node holds an upstream with when a test kills owners: short,
/// so takeovers are quick, yet long enough that a node slowed down by a
/// busy test machine does not miss its renewals.
const SHORT_LEASE: &str = "lease_secs = 2";
/// The default lease, where a test needs the owner to stay put.
const DEFAULT_LEASE: &str = "";
/// Small batches, flushed often, polled often; no upstream rate limit.
const UPSTREAM_EXTRA: &str = r#"
max_requests = 20
max_wait_secs = 0.3
calls_per_second = 1000
batches_per_hour = 1000000
"#;
/// The emulator takes a little while per batch, so kills land mid-batch.
const EMULATOR_KNOBS: &str = r#"{
    "validating_seconds": 0.2,
    "per_request_seconds": 0.01,
    "finalizing_seconds": 0.2,
    "latency_ms": 2
}"#;

/// One node: its directory (config, data_dir, logs) and its process.
struct Node {
    dir: PathBuf,
    proc: Proc,
}

impl Node {
    fn start(dir: &Path, config: &str) -> Node {
        Node {
            dir: dir.to_owned(),
            proc: common::ferry(dir, config),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proc.addr("proxy"))
    }

    /// The name this node takes leases under (`node-<instance id>`).
    fn name(&self) -> String {
        let id = std::fs::read_to_string(self.dir.join("data").join("instance_id"))
            .expect("instance id");
        format!("node-{}", id.trim())
    }

    fn kill(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
    }

    fn restart(&mut self) {
        self.kill();
        let config = std::fs::read_to_string(self.dir.join("ferry.toml")).expect("config");
        self.proc = common::ferry(&self.dir, &config);
    }
}

struct Cluster {
    tmp: tempfile::TempDir,
    emulator: Proc,
    nodes: Vec<Node>,
    /// The test database's URL, for nodes added later.
    url: String,
    db: tokio_postgres::Client,
    http: reqwest::Client,
}

impl Cluster {
    async fn start(n: usize, lease: &str) -> Cluster {
        let mut c = Cluster::empty().await;
        for _ in 0..n {
            c.add_node(lease, "", "");
        }
        c
    }

    /// The emulator and the database, with no node yet.
    async fn empty() -> Cluster {
        let tmp = tempfile::tempdir().expect("tempdir");
        let emulator = common::emulator(tmp.path(), &[]);
        let url = common::pg::fresh_database();
        let (db, conn) = url
            .parse::<tokio_postgres::Config>()
            .expect("database URL")
            .connect(tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(conn);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .expect("client");
        let c = Cluster {
            tmp,
            emulator,
            nodes: Vec::new(),
            url,
            db,
            http,
        };
        let knobs: Value = serde_json::from_str(EMULATOR_KNOBS).expect("knobs");
        let r = c
            .http
            .post(c.emu("/_emulator/config"))
            .json(&knobs)
            .send()
            .await
            .expect("emulator config");
        assert!(r.status().is_success());
        c
    }

    /// Starts one more node; `more_upstreams` are whole `[[upstreams]]`
    /// tables after the first one, `emu`.
    fn add_node(&mut self, lease: &str, more_upstreams: &str, server_extra: &str) {
        let dir = self.tmp.path().join(format!("node{}", self.nodes.len()));
        let storage = common::postgres_storage(&dir, &self.url, lease);
        let config = common::config_for(
            &dir,
            &storage,
            &self.upstream_target(),
            &format!("{UPSTREAM_EXTRA}\n{more_upstreams}"),
            &format!("log_format = \"json\"\n{server_extra}"),
        );
        self.nodes.push(Node::start(&dir, &config));
    }

    /// How an upstream reaches the emulator.
    fn upstream_target(&self) -> String {
        format!(
            "base_url = \"http://{}/v1\"\napi_key_env = \"FERRY_TEST_UPSTREAM_KEY\"",
            self.emulator.addr("emulator")
        )
    }

    fn emu(&self, path: &str) -> String {
        format!("http://{}{path}", self.emulator.addr("emulator"))
    }

    /// The index of the node that owns the upstream now, once one does.
    async fn owner(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let row = self
                .db
                .query_opt(
                    "SELECT owner FROM leases WHERE name = 'upstream/emu' AND expires_at > now()",
                    &[],
                )
                .await
                .expect("read leases");
            if let Some(row) = row {
                let owner: String = row.get(0);
                if let Some(i) = self.nodes.iter().position(|n| n.name() == owner) {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "no node took the upstream");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until a node other than `dead` owns the upstream.
    async fn taken_over_from(&self, dead: usize) -> (usize, Duration) {
        let started = Instant::now();
        loop {
            let owner = self.owner().await;
            if owner != dead {
                return (owner, started.elapsed());
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the upstream was never taken over from node {dead}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn defer(&self, node: usize, id: &str, wait: Option<u64>) -> reqwest::Response {
        let prefer = match wait {
            Some(w) => format!("respond-async, wait={w}"),
            None => "respond-async".to_owned(),
        };
        self.http
            .post(self.nodes[node].url("/v1/chat/completions"))
            .bearer_auth("alice-key")
            .header("prefer", prefer)
            .header("x-ferry-custom-id", id)
            .json(&chat("gpt-4o-mini", id))
            .send()
            .await
            .expect("deferred call")
    }

    async fn status(&self, node: usize, id: &str, wait: u64) -> Value {
        self.http
            .get(self.nodes[node].url(&format!("/v1/ferry/requests/{id}?wait={wait}")))
            .bearer_auth("alice-key")
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("status body")
    }

    async fn emulator_get(&self, path: &str) -> Value {
        self.http
            .get(self.emu(path))
            .bearer_auth(UPSTREAM_KEY)
            .send()
            .await
            .expect("emulator")
            .json()
            .await
            .expect("emulator body")
    }

    /// Lines of the node's logs (every run of it) that contain `needle`.
    fn log_lines(&self, node: usize, needle: &str) -> usize {
        let dir = &self.nodes[node].dir;
        std::fs::read_dir(dir)
            .expect("node dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("ferry-"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .map(|text| text.lines().filter(|l| l.contains(needle)).count())
            .sum()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_caller_held_on_one_node_is_answered_by_the_node_that_ingests() {
    let c = Cluster::start(3, DEFAULT_LEASE).await;
    let owner = c.owner().await;
    let held_on = (owner + 1) % c.nodes.len();
    let started = Instant::now();
    let r = c.defer(held_on, "held-elsewhere", Some(60)).await;
    assert_eq!(r.status(), 200, "held call on node {held_on}");
    let body: Value = r.json().await.expect("completion");
    assert_eq!(
        body["choices"][0]["message"]["content"], "echo: held-elsewhere",
        "{body}"
    );
    // Answered by the notification, not by the 5 s safety re-read.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered after {:?}",
        started.elapsed()
    );
    // Logged before ingestion starts, so before the caller is answered.
    assert!(
        c.log_lines(owner, "batch finished upstream") >= 1,
        "the owner (node {owner}) did not ingest the batch"
    );
    assert_eq!(
        c.log_lines(held_on, "batch finished upstream"),
        0,
        "the holding node ingested the batch itself"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_owner_mid_flush_and_mid_ingestion_loses_nothing() {
    let mut c = Cluster::start(3, SHORT_LEASE).await;
    let per_round = 60;
    let rounds = 4;
    let mut accepted = Vec::new();
    let mut next = 0usize;
    let mut takeovers = Vec::new();
    for round in 0..rounds {
        // A round of load, spread over the nodes in turn.
        for _ in 0..per_round {
            let id = format!("c{next}");
            let node = next % c.nodes.len();
            next += 1;
            let r = c.defer(node, &id, None).await;
            assert_eq!(r.status(), 202, "intake on node {node}");
            accepted.push(id);
        }
        // Kill the owner while it works: even rounds while it flushes
        // (uploads or creates), odd ones while it ingests results.
        let owner = c.owner().await;
        let (phase, needle) = if round % 2 == 0 {
            ("flush", "queue flushed into a batch")
        } else {
            ("ingestion", "batch finished upstream")
        };
        let before = c.log_lines(owner, needle);
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.log_lines(owner, needle) == before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        c.nodes[owner].kill();
        let (new_owner, took) = c.taken_over_from(owner).await;
        eprintln!(
            "round {round}: killed node {owner} during {phase}; node {new_owner} took over in {took:?}"
        );
        takeovers.push(took);
        c.nodes[owner].restart();
    }

    // Every 202 completes with its own answer, asked on any node.
    for (i, id) in accepted.iter().enumerate() {
        let st = c.status(i % c.nodes.len(), id, 120).await;
        assert_eq!(st["status"], "completed", "{id}: {st}");
        assert_eq!(
            st["result"]["body"]["choices"][0]["message"]["content"],
            format!("echo: {id}"),
            "{id}"
        );
    }
    let stats = c.emulator_get("/_emulator/stats").await;
    assert_eq!(stats["executed_more_than_once"], 0, "{stats}");
    assert_eq!(
        stats["lines_submitted"], stats["distinct_custom_ids"],
        "a request was sent in two batches: {stats}"
    );
    assert_eq!(
        stats["distinct_custom_ids"],
        json!(accepted.len()),
        "{stats}"
    );
    // The batches' input files are deleted once their results are in.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let files = c.emulator_get("/v1/files?purpose=batch").await;
        let left = files["data"].as_array().map_or(0, Vec::len);
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "input files left upstream: {files}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "cluster: {} requests over 3 nodes, {rounds} owners killed, takeovers {takeovers:?}",
        accepted.len()
    );
}

/// The nginx binary: `FERRY_TEST_NGINX`, else `nginx` on the PATH or in
/// /usr/sbin (`.ci/run` installs Debian's `nginx-light`).
fn nginx_binary() -> PathBuf {
    if let Ok(p) = std::env::var("FERRY_TEST_NGINX") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| {
        panic!("nginx is not installed: `apt-get install nginx-light`, or set FERRY_TEST_NGINX")
    })
}

/// The README's nginx example, pointed at `nodes` and listening on `port`:
/// the test runs the documented config, not a copy of it.
fn readme_nginx_config(nodes: &[String], port: u16, dir: &Path) -> String {
    let readme = include_str!("../README.md");
    let start = readme
        .find("```nginx\n")
        .expect("README has an nginx example")
        + 9;
    let len = readme[start..].find("```").expect("the nginx example ends");
    let example = &readme[start..start + len];
    let servers: String = nodes.iter().map(|a| format!("server {a}; ")).collect();
    let upstream_start = example.find("upstream ferry {").expect("upstream block");
    let upstream_len = example[upstream_start..]
        .find('}')
        .expect("upstream block ends")
        + 1;
    let example = format!(
        "{}upstream ferry {{ {servers}keepalive 64; }}{}",
        &example[..upstream_start],
        &example[upstream_start + upstream_len..]
    )
    .replace("listen 80;", &format!("listen 127.0.0.1:{port};"));
    format!(
        "pid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\nevents {{}}\nhttp {{\n\
         access_log {d}/nginx-access.log;\nclient_body_temp_path {d}/body;\n\
         proxy_temp_path {d}/proxy;\n{example}\n}}\n",
        d = dir.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_readme_nginx_example_spreads_callers_over_the_nodes() {
    let c = Cluster::start(2, DEFAULT_LEASE).await;
    let dir = c.tmp.path().join("nginx");
    std::fs::create_dir_all(&dir).expect("nginx dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let nodes: Vec<String> = c
        .nodes
        .iter()
        .map(|n| n.proc.addr("proxy").to_string())
        .collect();
    std::fs::write(
        dir.join("nginx.conf"),
        readme_nginx_config(&nodes, port, &dir),
    )
    .expect("nginx.conf");
    let _nginx = Nginx(
        std::process::Command::new(nginx_binary())
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start nginx"),
    );
    let front = format!("http://127.0.0.1:{port}");
    // nginx is up once it answers (Ferry's 401 for a call without a key).
    let deadline = Instant::now() + Duration::from_secs(20);
    while c
        .http
        .get(format!("{front}/v1/models"))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "nginx did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Deferred calls through the balancer, then one held call: every one
    // answered, whichever node took it and whichever owns the upstream.
    let ids: Vec<String> = (0..6).map(|i| format!("lb-{i}")).collect();
    for id in &ids {
        let r = c
            .http
            .post(format!("{front}/v1/chat/completions"))
            .bearer_auth("alice-key")
            .header("prefer", "respond-async")
            .header("x-ferry-custom-id", id.as_str())
            .json(&chat("gpt-4o-mini", id))
            .send()
            .await
            .expect("deferred call through nginx");
        assert_eq!(r.status(), 202);
    }
    let held = c
        .http
        .post(format!("{front}/v1/chat/completions"))
        .bearer_auth("alice-key")
        .header("prefer", "respond-async, wait=60")
        .json(&chat("gpt-4o-mini", "lb-held"))
        .send()
        .await
        .expect("held call through nginx");
    assert_eq!(held.status(), 200);
    let body: Value = held.json().await.expect("completion");
    assert_eq!(body["choices"][0]["message"]["content"], "echo: lb-held");
    for id in &ids {
        let st: Value = c
            .http
            .get(format!("{front}/v1/ferry/requests/{id}?wait=60"))
            .bearer_auth("alice-key")
            .send()
            .await
            .expect("lookup through nginx")
            .json()
            .await
            .expect("status");
        assert_eq!(st["status"], "completed", "{id}: {st}");
    }
    // Round robin: both nodes took deferred calls.
    for (i, n) in c.nodes.iter().enumerate() {
        let m = c
            .http
            .get(format!("http://{}/metrics", n.proc.addr("admin")))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        let deferred: f64 = m
            .lines()
            .filter(|l| {
                l.starts_with("ferry_http_requests_total{") && l.contains("mode=\"deferred\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(deferred > 0.0, "node {i} took no deferred call:\n{m}");
    }
}

/// nginx's master process, stopped with SIGTERM when dropped (a SIGKILL
/// would leave its workers running, holding the port).
struct Nginx(std::process::Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// The upstreams of the spreading test: `emu` and these.
const SPREAD_UPSTREAMS: usize = 12;

impl Cluster {
    /// `[[upstreams]]` tables for `emu1` … `emu11`, all on the emulator.
    fn more_upstreams(&self) -> String {
        (1..SPREAD_UPSTREAMS)
            .map(|i| {
                format!(
                    "[[upstreams]]\nname = \"emu{i}\"\nkind = \"openai\"\n{}\n{UPSTREAM_EXTRA}\n",
                    self.upstream_target()
                )
            })
            .collect()
    }

    /// Each upstream's lease holder now (unexpired leases only).
    async fn lease_holders(&self) -> std::collections::BTreeMap<String, String> {
        self.db
            .query(
                "SELECT name, owner FROM leases WHERE expires_at > now()",
                &[],
            )
            .await
            .expect("read leases")
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect()
    }

    /// Waits until every upstream's lease is held by the node first in
    /// line for it among `nodes`; fails after `within`.
    async fn settles_on(&self, nodes: &[usize], within: Duration) {
        let members: Vec<String> = nodes.iter().map(|&i| self.nodes[i].name()).collect();
        let want: std::collections::BTreeMap<String, String> = (0..SPREAD_UPSTREAMS)
            .map(|i| {
                let up = if i == 0 {
                    "emu".to_owned()
                } else {
                    format!("emu{i}")
                };
                let first = ferry::batch::ownership::first_in_line(&up, &members)
                    .expect("members")
                    .to_owned();
                (format!("upstream/{up}"), first)
            })
            .collect();
        let deadline = Instant::now() + within;
        loop {
            let held = self.lease_holders().await;
            if held == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "leases did not settle on the nodes first in line:\nheld {held:#?}\nwanted {want:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Upstreams are spread over the nodes by rendezvous hashing: a node that
/// joins is handed the upstreams it is first in line for by the node that
/// holds them (which keeps renewing them, so nothing expires: only the
/// hand-over can move them), and a node stopped with SIGTERM hands its
/// upstreams over as it leaves. Deferred calls keep completing throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstreams_are_spread_over_the_nodes_and_handed_over_on_join_and_on_shutdown() {
    let mut c = Cluster::empty().await;
    let more = c.more_upstreams();
    // Short, so that hand-overs are quick; renewed every 1.7 s, so a
    // live node's lease does not lapse (only a hand-over moves it).
    let lease = "lease_secs = 5";
    let grace = "shutdown_grace_secs = 3";
    c.add_node(lease, &more, grace);
    c.settles_on(&[0], Duration::from_secs(30)).await;

    c.add_node(lease, &more, grace);
    c.add_node(lease, &more, grace);
    c.settles_on(&[0, 1, 2], Duration::from_secs(30)).await;
    let names: Vec<String> = c.nodes.iter().map(Node::name).collect();
    let held = c.lease_holders().await;
    let moved = held.values().filter(|o| **o != names[0]).count();
    assert!(
        moved > 0,
        "no upstream moved to the nodes that joined: {held:#?}"
    );
    assert!(
        c.log_lines(0, "handing the upstream over") >= moved,
        "node 0 did not hand over what moved"
    );

    // A deferred call completes on every node while the upstreams are
    // spread (`emu` is owned by whichever node is first for it).
    for node in 0..3 {
        let id = format!("spread-{node}");
        let r = c.defer(node, &id, Some(60)).await;
        assert_eq!(r.status(), 200, "held call on node {node}");
    }

    // SIGTERM the node that holds the most upstreams: it hands each over.
    let leaving = (0..3)
        .max_by_key(|&i| held.values().filter(|o| **o == names[i]).count())
        .expect("nodes");
    let had = held.values().filter(|o| **o == names[leaving]).count();
    let handed_before = c.log_lines(leaving, "handed the upstream over");
    let pid = c.nodes[leaving].proc.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let status = c.nodes[leaving].proc.child.wait().expect("wait");
    assert!(status.success(), "node {leaving} exited with {status}");
    assert_eq!(
        c.log_lines(leaving, "handed the upstream over") - handed_before,
        had,
        "node {leaving} held {had} upstreams"
    );
    let rest: Vec<usize> = (0..3).filter(|&i| i != leaving).collect();
    c.settles_on(&rest, Duration::from_secs(30)).await;
    let id = "after-leave";
    let r = c.defer(rest[0], id, Some(60)).await;
    assert_eq!(r.status(), 200, "held call after node {leaving} left");
}
