//! Ferry's load harness: the real release binary against the real emulator
//! (and nginx, for comparison), driven by one load generator written here,
//! and a table of the figures the performance targets are stated in.
//!
//! ```sh
//! cargo bench --bench load                      # default sizes, a few minutes on 2 cores
//! cargo bench --bench load -- --large           # 1,000,000 buffered requests, longer runs
//! cargo bench --bench load -- --runs 3          # every figure 3 times, medians reported
//! cargo bench --bench load -- --only intake,batch
//! cargo bench --bench load -- --only intake-default,stall   # flushing on; passthrough beside a claim
//! cargo bench --bench load -- --only deadlines   # #17's figure D, ~30 s
//! FERRY_TEST_PG_URL=postgres://… cargo bench --bench load -- --only cluster --duration 8
//! FERRY_BENCH_SOAK_REQUESTS=2000000 cargo bench --bench load -- --only soak   # long
//! ```
//!
//! `cargo bench` builds `target/release/ferry` first (the bench profile is
//! the release profile); `FERRY_BIN=/path/to/ferry` runs another binary.
//! Sections: `passthrough` (figure 1), `intake` (2), `intake-pg` (2p: the
//! same intake with Ferry on PostgreSQL, in a fresh database on the server
//! in `FERRY_TEST_PG_URL`, beside the server's own ceiling for the same
//! rows, measured with `benches/pg_ceiling.sh`), `buffer` (3),
//! `batch` (4, 5 and 6), `e2e` (E: Ferry's CPU per deferred call through
//! the whole cycle, held and ticket + lookup, beside passthrough; see
//! [`e2e`]), `deadlines` (D: a workload with deadlines from an hour to a
//! day, time scaled 1,440 ×: share answered in time, lanes, cost beside
//! all-batch and all-standard, money spent twice; see [`deadlines`]) and
//! `cluster` (C1-C3, also on `FERRY_TEST_PG_URL`:
//! aggregate intake on 1, 2 and 3 nodes, takeover after SIGKILL of the
//! upstream's owner, and the wake-up of callers held away from the owner;
//! see [`cluster`]), and `soak` (S: the retention soak, millions of
//! deferred calls through intake, batch, result, lookup and purge, with
//! data_dir size and RSS over time; opt-in, only with `--only soak`, see
//! [`soak`]). nginx (`apt-get install -y nginx`, or
//! `FERRY_BENCH_NGINX=/path/to/nginx`) is the comparison proxy; without it
//! its rows are skipped.
//!
//! The generator: tokio with one HTTP/1.1 connection (hyper) per worker.
//! Closed loop: N workers each send their next request as soon as the
//! previous answer is read (throughput). Open loop: requests are issued at
//! a fixed rate from a timer thread and latency counts from when a request
//! was due, not when a connection was free, so a stall is not hidden
//! (no coordinated omission). Every compared target gets the same generator,
//! the same body and the same number of connections.
//!
//! Memory comes from `/proc/<pid>/status` (`VmRSS`, and `VmHWM` after
//! resetting it through `/proc/<pid>/clear_refs`); CPU time from
//! `/proc/<pid>/stat`. Nothing is pinned: the generator, the emulator and the
//! proxy share the machine's cores, as the table's note says.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

/// The emulator's key (what Ferry and nginx send upstream).
const EMU_KEY: &str = "bench-upstream-key";
/// The bench tenant's Ferry key.
const TENANT_KEY: &str = "bench-key";
const MODEL: &str = "gpt-4o-mini";
/// Longest a single request may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

// ------------------------------------------------------------------ options

struct Opts {
    large: bool,
    runs: usize,
    only: Option<Vec<String>>,
    bin: PathBuf,
    nginx: Option<PathBuf>,
    /// Connections of the closed-loop runs.
    conns: usize,
    /// Measured time of each closed- and open-loop run.
    duration: Duration,
    /// Open-loop rate of the passthrough latency run.
    rate: f64,
    /// Requests buffered for figure 3.
    buffer_requests: u64,
    /// Lines of the flushed batch (figures 4, 5).
    batch_lines: u64,
    /// Approximate request body size of those lines.
    batch_body_bytes: usize,
    /// Held long-polls (figure 6).
    held: u64,
}

impl Opts {
    fn parse() -> Opts {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let mut large = env("FERRY_BENCH_LARGE").is_some_and(|v| v != "0");
        let mut runs: usize = env("FERRY_BENCH_RUNS")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let mut only = env("FERRY_BENCH_ONLY");
        let mut duration: Option<f64> = env("FERRY_BENCH_DURATION").and_then(|v| v.parse().ok());
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--large" => large = true,
                "--runs" => runs = args.next().and_then(|v| v.parse().ok()).unwrap_or(runs),
                "--only" => only = args.next(),
                "--duration" => duration = args.next().and_then(|v| v.parse().ok()),
                "-h" | "--help" => {
                    eprintln!(
                        "usage: cargo bench --bench load -- [--large] [--runs N] \
                         [--only passthrough,intake,intake-pg,intake-default,stall,buffer,batch,e2e,deadlines,cluster,soak] [--duration SECS]\n\
                         env: FERRY_BIN, FERRY_BENCH_NGINX, FERRY_BENCH_LARGE, FERRY_BENCH_RUNS, \
                         FERRY_BENCH_ONLY, FERRY_BENCH_DURATION, FERRY_TEST_PG_URL (intake-pg, cluster), and sizes FERRY_BENCH_BUFFER, \
                         FERRY_BENCH_BATCH_LINES, FERRY_BENCH_HELD, FERRY_BENCH_SOAK_REQUESTS, \
                         FERRY_BENCH_SOAK_SAMPLE_SECS, FERRY_BENCH_SOAK_TERMINAL_SECS (soak: only with --only)"
                    );
                    std::process::exit(0);
                }
                // `cargo bench` passes `--bench`; anything else is criterion's.
                _ => {}
            }
        }
        let num = |k: &str| env(k).and_then(|v| v.replace('_', "").parse::<u64>().ok());
        let bin = env("FERRY_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ferry")));
        let nginx = env("FERRY_BENCH_NGINX").map(PathBuf::from).or_else(|| {
            ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
        });
        Opts {
            large,
            runs: runs.max(1),
            only: only.map(|s| s.split(',').map(|x| x.trim().to_owned()).collect()),
            bin,
            nginx,
            conns: 64,
            duration: Duration::from_secs_f64(duration.unwrap_or(if large { 30.0 } else { 10.0 })),
            rate: 2000.0,
            buffer_requests: num("FERRY_BENCH_BUFFER").unwrap_or(if large {
                1_000_000
            } else {
                100_000
            }),
            batch_lines: num("FERRY_BENCH_BATCH_LINES").unwrap_or(50_000),
            batch_body_bytes: 2_000,
            held: num("FERRY_BENCH_HELD").unwrap_or(10_000),
        }
    }

    /// Whether `section` was named in `--only` (for long, opt-in sections).
    fn names(&self, section: &str) -> bool {
        self.only
            .as_ref()
            .is_some_and(|o| o.iter().any(|s| s == section))
    }

    fn wants(&self, section: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|s| s == section))
    }
}

// ------------------------------------------------------------- processes

/// The retention soak (`--only soak`), in `benches/soak/`.
mod soak;

/// Cost per deferred call, end to end (`e2e`), in `benches/e2e/`.
mod e2e;

/// Deadlines: answered in time, and what it cost (`deadlines`), in
/// `benches/deadlines/`.
mod deadlines;

#[path = "../tests/common/process.rs"]
mod process;
use process::Proc;

/// Starts `cmd` and waits for its `{"event":"listening"}` lines on stdout;
/// a release build under load can take a while to come up.
fn spawn(cmd: Command, services: &[&str], log: PathBuf) -> Proc {
    process::spawn(cmd, services, log, Duration::from_secs(300))
}

fn emulator(o: &Opts, dir: &Path, args: &[&str]) -> Proc {
    let mut cmd = Command::new(&o.bin);
    cmd.args(["emulator", "--listen", "127.0.0.1:0", "--api-key", EMU_KEY])
        .args(args)
        .env("FERRY_LOG", "warn");
    spawn(cmd, &["emulator"], dir.join("emulator.log"))
}

fn ferry_config(data: &Path, emu: SocketAddr, server_extra: &str, upstream_extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
data_dir = "{data}"
log_format = "json"
shutdown_grace_secs = 0
{server_extra}

[[upstreams]]
name = "emu"
kind = "openai"
base_url = "http://{emu}/v1"
api_key_env = "FERRY_BENCH_UPSTREAM_KEY"
{upstream_extra}

[[tenants]]
name = "bench"
keys = ["{TENANT_KEY}"]
"#,
        data = data.display()
    )
}

/// An emulator started with `emu_args` and a Ferry in front of it, both
/// working in `dir` (its config is left in `dir/ferry.toml`).
fn stack(
    o: &Opts,
    dir: &Path,
    emu_args: &[&str],
    server_extra: &str,
    upstream_extra: &str,
) -> (Proc, Proc) {
    stack_on(o, dir, emu_args, server_extra, upstream_extra, None)
}

/// [`stack`] with Ferry's store in the PostgreSQL database at `pg_url`
/// (`None`: sled in `dir/data`).
fn stack_on(
    o: &Opts,
    dir: &Path,
    emu_args: &[&str],
    server_extra: &str,
    upstream_extra: &str,
    pg_url: Option<&str>,
) -> (Proc, Proc) {
    let emu = emulator(o, dir, emu_args);
    let mut cfg = ferry_config(
        &dir.join("data"),
        emu.addr("emulator"),
        server_extra,
        upstream_extra,
    );
    let mut env = Vec::new();
    if let Some(url) = pg_url {
        cfg.push_str(&pg_storage(""));
        env.push(("FERRY_BENCH_PG_URL", url));
    }
    let fer = ferry_with(o, dir, &cfg, &env);
    (emu, fer)
}

/// The `[storage]` table of a Ferry on the PostgreSQL database whose URL is
/// in `FERRY_BENCH_PG_URL`, with `extra` keys (`lease_secs = 2`).
fn pg_storage(extra: &str) -> String {
    format!("\n[storage]\nkind = \"postgres\"\nurl_env = \"FERRY_BENCH_PG_URL\"\n{extra}\n")
}

fn ferry(o: &Opts, dir: &Path, config: &str) -> Proc {
    ferry_with(o, dir, config, &[])
}

/// [`ferry`] with more environment variables.
fn ferry_with(o: &Opts, dir: &Path, config: &str, env: &[(&str, &str)]) -> Proc {
    let path = dir.join("ferry.toml");
    std::fs::write(&path, config).expect("write config");
    let mut cmd = Command::new(&o.bin);
    cmd.arg("--config")
        .arg(&path)
        .env("FERRY_BENCH_UPSTREAM_KEY", EMU_KEY)
        .env("FERRY_LOG", "info,pingora_core=warn,pingora_proxy=warn")
        .envs(env.iter().copied());
    let n = std::fs::read_dir(dir).map_or(0, |d| d.count());
    let p = spawn(cmd, &["proxy", "admin"], dir.join(format!("ferry-{n}.log")));
    eprintln!(
        "  ferry pid {} on {} (admin {}), log {}",
        p.pid(),
        p.addr("proxy"),
        p.addr("admin"),
        p.log.display()
    );
    p
}

/// nginx as a child process (`daemon off`), its master stopped on drop.
struct Nginx {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers (SIGKILL would orphan them).
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn start_nginx(bin: &Path, dir: &Path, upstream: SocketAddr, workers: usize) -> Nginx {
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(&prefix).expect("nginx dir");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let conf = include_str!("nginx.conf.template")
        .replace("{{PREFIX}}", &prefix.display().to_string())
        .replace("{{LISTEN}}", &addr.to_string())
        .replace("{{UPSTREAM}}", &upstream.to_string())
        .replace("{{WORKERS}}", &workers.to_string())
        .replace("{{API_KEY}}", EMU_KEY);
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("nginx.conf");
    let log = std::fs::File::create(prefix.join("stderr.log")).expect("log");
    let child = Command::new(bin)
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(prefix.join("error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn nginx");
    let mut n = Nginx { child, addr };
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return n;
        }
        if let Ok(Some(st)) = n.child.try_wait() {
            panic!(
                "nginx exited ({st}): {}",
                std::fs::read_to_string(prefix.join("error.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nginx did not start listening on {addr}");
}

// ----------------------------------------------------------------- /proc

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// (ppid, user + system CPU ticks) of a process.
fn stat(pid: &str) -> Option<(u32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state(0) ppid(1) ... utime(11) stime(12).
    Some((
        f.get(1)?.parse().ok()?,
        f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
    ))
}

/// CPU seconds used so far by `pid` and, with `children`, its direct children
/// (nginx's workers).
fn cpu_secs(pid: u32, children: bool) -> f64 {
    let mut ticks = stat(&pid.to_string()).map_or(0, |(_, t)| t);
    if children && let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if let Some((ppid, t)) = stat(name)
                && ppid == pid
            {
                ticks += t;
            }
        }
    }
    ticks as f64 / clk_tck()
}

/// CPU seconds used so far by each of `pid`'s live threads, summed by
/// thread name with trailing digits stripped (a pool is one entry).
fn stat_ticks_by_thread(pid: u32) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let path = t.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let name = name
            .trim()
            .trim_end_matches(|c: char| c.is_ascii_digit() || c == '-' || c == '#')
            .to_owned();
        let ticks = std::fs::read_to_string(path.join("stat"))
            .ok()
            .and_then(|s| {
                let rest = &s[s.rfind(')')? + 2..];
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
            })
            .unwrap_or(0);
        *out.entry(name).or_default() += ticks as f64 / clk_tck();
    }
    out
}

fn self_cpu_secs() -> f64 {
    cpu_secs(std::process::id(), false)
}

/// A `/proc/<pid>/status` field in MiB (`VmRSS`, `VmHWM`).
fn mem_mib(pid: u32, field: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Resets `VmHWM` to the current RSS, so the next read is the peak since now.
fn reset_peak(pid: u32) {
    if let Err(e) = std::fs::write(format!("/proc/{pid}/clear_refs"), "5") {
        eprintln!("  (cannot reset VmHWM of {pid}: {e}; peaks include earlier phases)");
    }
}

fn dir_mib(p: &Path) -> f64 {
    fn walk(p: &Path) -> u64 {
        let Ok(rd) = std::fs::read_dir(p) else {
            return 0;
        };
        rd.flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => walk(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    }
    walk(p) as f64 / (1024.0 * 1024.0)
}

// ------------------------------------------------------------- generator

type Conn = SendRequest<Full<Bytes>>;
/// Builds the n-th request of a run.
type MakeReq = Arc<dyn Fn(u64) -> Request<Full<Bytes>> + Send + Sync>;

async fn connect(addr: SocketAddr) -> Result<Conn, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(tx)
}

/// Sends one request on the worker's connection (reconnecting when it was
/// closed) and reads the whole answer; returns its status and body.
async fn send(
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
) -> Result<(u16, Bytes), String> {
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        *conn = Some(connect(addr).await?);
    }
    let c = conn.as_mut().expect("connected");
    let res = tokio::time::timeout(REQUEST_TIMEOUT, async {
        c.ready().await.map_err(|e| e.to_string())?;
        let resp = c.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    })
    .await
    .unwrap_or_else(|_| Err("timed out".into()));
    if res.is_err() {
        *conn = None;
    }
    res
}

#[derive(Default)]
struct Recorded {
    /// Latency of each answer, µs (open loop: from when it was due).
    lat_us: Vec<u32>,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Recorded {
    fn record(&mut self, res: &Result<(u16, Bytes), String>, lat: Duration) {
        match res {
            Ok((s, _)) => {
                *self.statuses.entry(*s).or_default() += 1;
                self.lat_us
                    .push(lat.as_micros().min(u32::MAX as u128) as u32);
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| e.clone());
            }
        }
    }

    fn merge(&mut self, o: Recorded) {
        self.lat_us.extend(o.lat_us);
        for (k, v) in o.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }
}

struct Load {
    rec: Recorded,
    secs: f64,
}

impl Load {
    fn count(&self, status: u16) -> u64 {
        self.rec.statuses.get(&status).copied().unwrap_or(0)
    }

    fn rate(&self, status: u16) -> f64 {
        self.count(status) as f64 / self.secs
    }

    /// Latency percentile in ms.
    fn pct(&self, p: f64) -> f64 {
        percentile(&self.rec.lat_us, p) / 1000.0
    }

    /// Fails loudly when answers were not what the run expects.
    fn check(&self, what: &str, status: u16) {
        let total: u64 = self.rec.statuses.values().sum();
        let wrong = total - self.count(status);
        if self.rec.errors > 0 || wrong > 0 {
            eprintln!(
                "  !! {what}: {} errors, {wrong} answers other than {status} ({:?}); first error: {:?}",
                self.rec.errors, self.rec.statuses, self.rec.first_error
            );
        }
    }
}

fn percentile(v: &[u32], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let i = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[i.min(s.len() - 1)] as f64
}

enum Stop {
    /// Run for `warmup + duration`; only answers to requests sent after the
    /// warm-up and finished within the measured window count.
    Time {
        warmup: Duration,
        duration: Duration,
    },
    /// Send exactly this many requests; the rate is over the whole run.
    Count(u64),
}

/// Closed loop: `conns` workers, each with its own connection, each sending
/// the next request as soon as the previous answer is read.
async fn closed_loop(addr: SocketAddr, conns: usize, stop: Stop, make: MakeReq) -> Load {
    closed_loop_over(&[addr], conns, stop, make).await
}

/// [`closed_loop`] with the connections spread round-robin over `addrs`
/// (worker `w` talks to `addrs[w % addrs.len()]`), as a load balancer in
/// front of a cluster's nodes would.
async fn closed_loop_over(addrs: &[SocketAddr], conns: usize, stop: Stop, make: MakeReq) -> Load {
    let counter = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let (warm_end, end, max) = match stop {
        Stop::Time { warmup, duration } => {
            (start + warmup, Some(start + warmup + duration), u64::MAX)
        }
        Stop::Count(n) => (start, None, n),
    };
    let mut handles = Vec::new();
    for w in 0..conns {
        let counter = counter.clone();
        let make = make.clone();
        let addr = addrs[w % addrs.len()];
        handles.push(tokio::spawn(async move {
            let mut conn = connect(addr).await.ok();
            let mut rec = Recorded::default();
            loop {
                if end.is_some_and(|e| Instant::now() >= e) {
                    break;
                }
                let i = counter.fetch_add(1, Ordering::Relaxed);
                if i >= max {
                    break;
                }
                let t = Instant::now();
                let res = send(&mut conn, addr, make(i)).await;
                let done = Instant::now();
                if t >= warm_end && end.is_none_or(|e| done <= e) {
                    rec.record(&res, done - t);
                }
            }
            rec
        }));
    }
    let mut rec = Recorded::default();
    for h in handles {
        rec.merge(h.await.expect("worker"));
    }
    let secs = match stop {
        Stop::Time { duration, .. } => duration.as_secs_f64(),
        Stop::Count(_) => start.elapsed().as_secs_f64(),
    };
    Load { rec, secs }
}

/// Open loop: requests due at a fixed `rate` (from a timer thread), sent on
/// the first free of `conns` connections; latency counts from when each was due.
async fn open_loop(
    addr: SocketAddr,
    conns: usize,
    rate: f64,
    warmup: Duration,
    duration: Duration,
    make: MakeReq,
) -> Load {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut handles = Vec::new();
    for _ in 0..conns {
        let rx = rx.clone();
        let make = make.clone();
        handles.push(tokio::spawn(async move {
            let mut conn = connect(addr).await.ok();
            let mut recs = Vec::new();
            loop {
                let job = rx.lock().await.recv().await;
                let Some((i, due)) = job else { break };
                let res = send(&mut conn, addr, make(i)).await;
                recs.push((due, Instant::now(), res));
            }
            recs
        }));
    }
    // Let the workers connect before the clock starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now() + Duration::from_millis(10);
    let warm_end = start + warmup;
    let total = ((warmup + duration).as_secs_f64() * rate) as u64;
    let timer = std::thread::spawn(move || {
        for i in 0..total {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if tx.send((i, due)).is_err() {
                break;
            }
        }
    });
    let mut rec = Recorded::default();
    for h in handles {
        for (due, done, res) in h.await.expect("worker") {
            if due >= warm_end {
                rec.record(&res, done - due);
            }
        }
    }
    let _ = timer.join();
    Load {
        rec,
        secs: duration.as_secs_f64(),
    }
}

fn request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if !body.is_empty() {
        b = b
            .header("content-type", "application/json")
            .header("content-length", body.len());
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body)).expect("request")
}

/// A chat completion body of about `size` bytes.
fn chat_body(model: &str, size: usize) -> Bytes {
    let text: String = "the quick brown fox jumps over the lazy dog "
        .chars()
        .cycle()
        .take(size.saturating_sub(90).max(5))
        .collect();
    Bytes::from(
        serde_json::to_vec(&json!({
            "model": model,
            "messages": [{"role": "user", "content": text}],
        }))
        .unwrap(),
    )
}

/// A spread of `n` into 0..m that visits ids in no particular order.
fn scatter(i: u64, m: u64) -> u64 {
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) % m
}

// ------------------------------------------------------- control plane

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .expect("client")
}

async fn metrics(admin: SocketAddr) -> String {
    http()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

/// Sum of a metric's series whose labels contain `filter`.
fn metric_sum(text: &str, name: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{' | b' '))
        })
        .filter(|l| l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls Ferry's metrics until `name{filter}` reaches `want`.
async fn wait_metric(
    admin: SocketAddr,
    name: &str,
    filter: &str,
    want: f64,
    limit: Duration,
) -> Result<Duration, f64> {
    let t = Instant::now();
    loop {
        let v = metric_sum(&metrics(admin).await, name, filter);
        if v >= want {
            return Ok(t.elapsed());
        }
        if t.elapsed() > limit {
            return Err(v);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn emu_stats(emu: SocketAddr) -> Value {
    http()
        .get(format!("http://{emu}/_emulator/stats"))
        .send()
        .await
        .expect("emulator stats")
        .json()
        .await
        .expect("stats json")
}

/// Seconds since midnight (UTC) of a JSON log line's `timestamp`
/// (`2026-11-22T03:29:05.123456Z`), for intervals between log events.
fn log_secs(line: &Value) -> Option<f64> {
    let ts = line["timestamp"].as_str()?;
    let t = ts.split('T').nth(1)?.trim_end_matches('Z');
    let mut it = t.split(':');
    let h: f64 = it.next()?.parse().ok()?;
    let m: f64 = it.next()?.parse().ok()?;
    let s: f64 = it.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Seconds between the first log lines with messages `from` and `to`.
fn log_interval(log: &Path, from: &str, to: &str) -> f64 {
    let lines: Vec<Value> = std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    let at = |m: &str| {
        lines
            .iter()
            .find(|v| v["fields"]["message"] == m)
            .and_then(log_secs)
    };
    match (at(from), at(to)) {
        (Some(a), Some(b)) => b - a,
        _ => f64::NAN,
    }
}

/// The `fields` of Ferry's JSON log lines whose message is `message`.
fn log_events(log: &Path, message: &str) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == message)
        .map(|v| v["fields"].clone())
        .collect()
}

// ------------------------------------------------------------------ rows

#[derive(Clone, Copy)]
enum Target {
    AtLeast(f64),
    AtMost(f64),
}

impl Target {
    fn met(self, v: f64) -> bool {
        match self {
            Target::AtLeast(t) => v >= t,
            Target::AtMost(t) => v <= t,
        }
    }

    fn show(self, unit: &str) -> String {
        match self {
            Target::AtLeast(t) => format!("≥ {} {unit}", fmt(t)),
            Target::AtMost(t) => format!("≤ {} {unit}", fmt(t)),
        }
    }
}

struct Row {
    figure: &'static str,
    metric: String,
    value: f64,
    unit: &'static str,
    target: Option<Target>,
}

#[derive(Default)]
struct Rows(Vec<Row>);

impl Rows {
    fn add(
        &mut self,
        figure: &'static str,
        metric: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) {
        self.push(figure, metric, value, unit, None);
    }

    fn target(
        &mut self,
        figure: &'static str,
        metric: impl Into<String>,
        value: f64,
        unit: &'static str,
        t: Target,
    ) {
        self.push(figure, metric, value, unit, Some(t));
    }

    fn push(
        &mut self,
        figure: &'static str,
        metric: impl Into<String>,
        value: f64,
        unit: &'static str,
        target: Option<Target>,
    ) {
        let metric = metric.into();
        eprintln!("  {figure} | {metric}: {} {unit}", fmt(value));
        self.0.push(Row {
            figure,
            metric,
            value,
            unit,
            target,
        });
    }
}

fn fmt(v: f64) -> String {
    if v.is_nan() {
        "n/a".into()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn median(v: &mut [f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A figure and metric name, e.g. ("2", "durable intake p99").
type MetricKey = (&'static str, String);
/// Every run's value of a metric, its unit and its target.
type MetricValues = (Vec<f64>, &'static str, Option<Target>);
/// A compared passthrough target: name, address, key, and the pid whose CPU
/// is the proxy's (with whether to count its children).
type PassTarget<'a> = (&'a str, SocketAddr, &'a str, Option<(u32, bool)>);

/// Prints the table: every metric's median over the runs, its range, its
/// target and whether the median meets it.
fn print_table(o: &Opts, runs: &[Rows]) {
    let mut order: Vec<MetricKey> = Vec::new();
    let mut values: HashMap<MetricKey, MetricValues> = HashMap::new();
    for rows in runs {
        for r in &rows.0 {
            let key = (r.figure, r.metric.clone());
            let e = values.entry(key.clone()).or_insert_with(|| {
                order.push(key.clone());
                (Vec::new(), r.unit, r.target)
            });
            e.0.push(r.value);
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!();
    println!(
        "Ferry load harness: {} run(s), {} size, {} CPUs, load average now {}",
        runs.len(),
        if o.large { "large" } else { "default" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("binary: {}", o.bin.display());
    println!();
    println!("| figure | metric | median | runs (min – max) | target | met |");
    println!("|---|---|---:|---|---|---|");
    for key in order {
        let (mut vals, unit, target) = values.remove(&key).expect("row");
        let med = median(&mut vals);
        let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let range = if vals.len() > 1 {
            format!("{} ({} – {})", vals.len(), fmt(lo), fmt(hi))
        } else {
            "1".into()
        };
        let (t, met) = match target {
            Some(t) => (t.show(unit), if t.met(med) { "yes" } else { "**no**" }),
            None => (String::new(), ""),
        };
        println!(
            "| {} | {} | {} {unit} | {range} | {t} | {met} |",
            key.0,
            key.1,
            fmt(med)
        );
    }
}

// -------------------------------------------------------------- sections

/// Figure 1: direct to the emulator, through Ferry, through nginx.
async fn passthrough(o: &Opts, run: usize, rows: &mut Rows) {
    eprintln!("== passthrough (figure 1)");
    let dir = workdir();
    let (emu, fer) = stack(o, dir.path(), &[], "", "max_wait_secs = 1e9");
    let emu_addr = emu.addr("emulator");
    let nginx = o
        .nginx
        .as_ref()
        .map(|bin| start_nginx(bin, dir.path(), emu_addr, 2));
    if nginx.is_none() {
        eprintln!(
            "  nginx not found: `apt-get install -y nginx` (or FERRY_BENCH_NGINX) for its rows"
        );
    }
    let body = chat_body(MODEL, 200);
    // (name, address, key, pid whose CPU is the proxy's, count children)
    let mut targets: Vec<PassTarget> = vec![
        ("direct", emu_addr, EMU_KEY, None),
        (
            "ferry",
            fer.addr("proxy"),
            TENANT_KEY,
            Some((fer.pid(), false)),
        ),
    ];
    if let Some(n) = &nginx {
        targets.push(("nginx", n.addr, "not-forwarded", Some((n.child.id(), true))));
    }
    // Rotate the order each run, so drift (other load, warm caches) does not
    // always favour the same target.
    // FERRY_BENCH_TARGETS=ferry (say) measures some targets only, e.g. to profile one.
    if let Ok(only) = std::env::var("FERRY_BENCH_TARGETS") {
        targets.retain(|t| only.split(',').any(|o| o.trim() == t.0));
    }
    let k = run % targets.len().max(1);
    targets.rotate_left(k);
    let make_for = |addr: SocketAddr, key: &str| -> MakeReq {
        let auth = format!("Bearer {key}");
        let body = body.clone();
        Arc::new(move |_| {
            request(
                "POST",
                addr,
                "/v1/chat/completions",
                &[("authorization", &auth)],
                body.clone(),
            )
        })
    };
    // Every target answers the same completion.
    for (name, addr, key, _) in &targets {
        let mut c = None;
        let (s, b) = send(&mut c, *addr, make_for(*addr, key)(0))
            .await
            .expect("probe");
        assert!(
            s == 200 && b.windows(15).any(|w| w == b"chat.completion"),
            "{name}: {s} {}",
            String::from_utf8_lossy(&b)
        );
    }
    let mut rps = HashMap::new();
    let mut p99 = HashMap::new();
    for (name, addr, key, proc_) in &targets {
        let emu0 = cpu_secs(emu.pid(), false);
        let me0 = self_cpu_secs();
        let px0 = proc_.map(|(p, c)| cpu_secs(p, c));
        let l = closed_loop(
            *addr,
            o.conns,
            Stop::Time {
                warmup: Duration::from_secs(2),
                duration: o.duration,
            },
            make_for(*addr, key),
        )
        .await;
        l.check(name, 200);
        let n = l.count(200) as f64;
        // CPU over the whole run (warm-up included) per request in the window.
        let scale = o.duration.as_secs_f64() / (o.duration.as_secs_f64() + 2.0);
        rps.insert(*name, l.rate(200));
        rows.add(
            "1 passthrough",
            format!("{name}: closed loop, {} conns, req/s", o.conns),
            l.rate(200),
            "req/s",
        );
        rows.add(
            "1 passthrough",
            format!("{name}: closed loop p50"),
            l.pct(50.0),
            "ms",
        );
        rows.add(
            "1 passthrough",
            format!("{name}: closed loop p99"),
            l.pct(99.0),
            "ms",
        );
        if let Some((p, c)) = proc_ {
            let cpu = cpu_secs(*p, *c) - px0.unwrap_or(0.0);
            rows.add(
                "1 passthrough",
                format!("{name}: proxy CPU per request"),
                cpu * scale / n * 1e6,
                "µs",
            );
        }
        rows.add(
            "1 passthrough",
            format!("{name}: emulator + generator CPU per request"),
            ((cpu_secs(emu.pid(), false) - emu0) + (self_cpu_secs() - me0)) * scale / n * 1e6,
            "µs",
        );
    }
    for (name, addr, key, _) in &targets {
        let l = open_loop(
            *addr,
            o.conns,
            o.rate,
            Duration::from_secs(1),
            o.duration,
            make_for(*addr, key),
        )
        .await;
        l.check(name, 200);
        p99.insert(*name, l.pct(99.0));
        let r = o.rate as u64;
        rows.add(
            "1 passthrough",
            format!("{name}: open loop {r} req/s, answered/s"),
            l.rate(200),
            "req/s",
        );
        rows.add(
            "1 passthrough",
            format!("{name}: open loop {r} req/s p50"),
            l.pct(50.0),
            "ms",
        );
        rows.add(
            "1 passthrough",
            format!("{name}: open loop {r} req/s p99"),
            l.pct(99.0),
            "ms",
        );
        rows.add(
            "1 passthrough",
            format!("{name}: open loop {r} req/s p99.9"),
            l.pct(99.9),
            "ms",
        );
    }
    if let (Some(n), Some(f)) = (rps.get("nginx"), rps.get("ferry")) {
        rows.target(
            "1 passthrough",
            "ferry throughput / nginx throughput",
            f / n * 100.0,
            "%",
            Target::AtLeast(90.0),
        );
    }
    if let (Some(f), Some(d)) = (p99.get("ferry"), p99.get("direct")) {
        rows.target(
            "1 passthrough",
            format!(
                "ferry added p99 at {} req/s (ferry − direct)",
                o.rate as u64
            ),
            f - d,
            "ms",
            Target::AtMost(1.0),
        );
    }
    if let (Some(n), Some(d)) = (p99.get("nginx"), p99.get("direct")) {
        rows.add(
            "1 passthrough",
            format!(
                "nginx added p99 at {} req/s (nginx − direct)",
                o.rate as u64
            ),
            n - d,
            "ms",
        );
    }
}

fn deferred_req(
    addr: SocketAddr,
    body: Bytes,
    custom_id: &str,
    prefer: &str,
) -> Request<Full<Bytes>> {
    request(
        "POST",
        addr,
        "/v1/chat/completions",
        &[
            ("authorization", &format!("Bearer {TENANT_KEY}")),
            ("prefer", prefer),
            ("x-ferry-custom-id", custom_id),
        ],
        body,
    )
}

/// Where Ferry keeps its state in an intake section.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Storage {
    Sled,
    Postgres,
}

/// The intake sections' calls: deferred (`respond-async`), ~300 B bodies
/// over 16 models, so that no queue reaches 50,000 (the size threshold)
/// while measuring; custom ids `{prefix}{i}`. The emulator must accept any
/// model (`--models ""`).
fn intake_requests(addr: SocketAddr, prefix: &'static str) -> MakeReq {
    let bodies: Vec<Bytes> = (0..16)
        .map(|m| chat_body(&format!("bench-{m:02}"), 300))
        .collect();
    Arc::new(move |i| {
        deferred_req(
            addr,
            bodies[(i % 16) as usize].clone(),
            &format!("{prefix}{i}"),
            "respond-async",
        )
    })
}

/// Figure 2: deferred calls answered 202 per second, 64 connections; on
/// sled (`intake`) or PostgreSQL (`intake-pg`, figure 2p), one code path.
async fn intake(o: &Opts, rows: &mut Rows, storage: Storage) {
    let figure = match storage {
        Storage::Sled => "2 durable intake",
        Storage::Postgres => "2p durable intake, PostgreSQL",
    };
    eprintln!("== {figure}");
    let dir = workdir();
    let pg = match storage {
        Storage::Sled => None,
        Storage::Postgres => Some(PgDatabase::fresh().await),
    };
    // 16 models, so that no queue reaches 50,000 (the size threshold) while
    // measuring: this figure is intake alone, with no flush running beside it.
    let (emu, fer) = stack_on(
        o,
        dir.path(),
        &["--models", ""],
        "",
        "max_wait_secs = 1e9",
        pg.as_ref().map(|p| p.url.as_str()),
    );
    let make = intake_requests(fer.addr("proxy"), "i");
    let db_cpu0 = pg.as_ref().map(|p| p.cpu_secs());
    let (l, cpu_per_202, flushes) = timed_intake(o, &fer, make).await;
    l.check("intake", 202);
    let rate = l.rate(202);
    let rate_metric = format!("202 answers/s, {} conns, ~300 B bodies", o.conns);
    match storage {
        Storage::Sled => {
            // PostgreSQL's write histogram times each call, not each commit:
            // these rows are sled's group commits only.
            flush_rows(rows, figure, &l, flushes);
            rows.target(
                figure,
                rate_metric,
                rate,
                "req/s",
                Target::AtLeast(10_000.0),
            );
        }
        Storage::Postgres => rows.add(figure, rate_metric, rate, "req/s"),
    }
    rows.add(figure, "p50", l.pct(50.0), "ms");
    match storage {
        Storage::Sled => rows.target(figure, "p99", l.pct(99.0), "ms", Target::AtMost(25.0)),
        Storage::Postgres => rows.add(figure, "p99", l.pct(99.0), "ms"),
    }
    rows.add(figure, "p99.9", l.pct(99.9), "ms");
    rows.add(figure, "Ferry CPU per request", cpu_per_202, "µs");
    rows.add(
        figure,
        "Ferry RSS after",
        mem_mib(fer.pid(), "VmRSS"),
        "MiB",
    );
    let Some(pg) = pg else { return };
    if let Some(cpu0) = db_cpu0 {
        // Over the whole run (warm-up included), as Ferry's CPU is scaled.
        let scale = o.duration.as_secs_f64() / (o.duration + Duration::from_secs(2)).as_secs_f64();
        let per_202 = (pg.cpu_secs() - cpu0) * scale / l.count(202) as f64 * 1e6;
        rows.add(figure, "PostgreSQL CPU per request", per_202, "µs");
    }
    // The ceiling runs alone: Ferry and the emulator stopped first.
    drop(fer);
    drop(emu);
    let tps = pg_ceiling(o);
    rows.add(
        figure,
        format!("pgbench ceiling, per-call rows, {} clients", o.conns),
        tps,
        "tx/s",
    );
    rows.add(figure, "Ferry 202/s ÷ pgbench tx/s", rate / tps, "");
    pg.drop_database().await;
}

/// A fresh database for one section on the PostgreSQL server in
/// `FERRY_TEST_PG_URL`.
struct PgDatabase {
    /// The server's URL with the new database's name.
    url: String,
    server: String,
    name: String,
    /// The server's postmaster, when it runs on this machine: its CPU and
    /// its children's (the backends) is the database's.
    postmaster: Option<u32>,
}

impl PgDatabase {
    async fn fresh() -> PgDatabase {
        let server = std::env::var("FERRY_TEST_PG_URL").expect(
            "intake-pg needs a PostgreSQL server: `bash .ci/postgres --keep` and export the \
             FERRY_TEST_PG_URL it prints",
        );
        let client = pg_connect(&server).await;
        let name = format!("ferry_bench_{:016x}", rand::random::<u64>());
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        let backend: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("backend pid")
            .get(0);
        let postmaster = stat(&backend.to_string()).map(|(ppid, _)| ppid);
        PgDatabase {
            url: with_database(&server, &name),
            server,
            name,
            postmaster,
        }
    }

    fn cpu_secs(&self) -> f64 {
        self.postmaster.map_or(f64::NAN, |p| cpu_secs(p, true))
    }

    async fn drop_database(self) {
        let client = pg_connect(&self.server).await;
        if let Err(e) = client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
        {
            eprintln!("  (cannot drop database {}: {e})", self.name);
        }
    }
}

async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let config: tokio_postgres::Config = url.parse().expect("FERRY_TEST_PG_URL");
    let (client, conn) = config
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at FERRY_TEST_PG_URL: {e}"));
    tokio::spawn(conn);
    client
}

/// `url` (`postgres://user@host:port/db?opts`) naming database `name`.
fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let (rest, query) = rest
        .split_once('?')
        .map_or((rest, None), |(r, q)| (r, Some(q)));
    let host = rest.split_once('/').map_or(rest, |(h, _)| h);
    let query = query.map_or(String::new(), |q| format!("?{q}"));
    format!("{scheme}://{host}/{name}{query}")
}

/// The database's own ceiling for Ferry's per-call intake rows:
/// `benches/pg_ceiling.sh` (pgbench, `o.conns` clients, `o.duration`);
/// its transactions per second.
fn pg_ceiling(o: &Opts) -> f64 {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/pg_ceiling.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(o.conns.to_string())
        .arg(o.duration.as_secs().max(1).to_string())
        .stderr(Stdio::inherit())
        .output()
        .expect("run benches/pg_ceiling.sh");
    let text = String::from_utf8_lossy(&out.stdout);
    let tps = text
        .lines()
        .find_map(|l| l.strip_prefix("tps "))
        .and_then(|v| v.trim().parse().ok());
    match tps {
        Some(tps) if out.status.success() => tps,
        _ => {
            eprintln!("  !! benches/pg_ceiling.sh failed: {text}");
            f64::NAN
        }
    }
}

/// A closed-loop intake run against `fer` (2 s warm-up, then
/// `o.duration`): the load, Ferry's CPU per `202` in µs over the whole run
/// scaled to the measured part, and its durable flushes over the run
/// (count, mean duration in ms): with a group commit, every connection
/// waits for one flush per call, so connections ÷ (flush + store time)
/// bounds the rate.
async fn timed_intake(o: &Opts, fer: &Proc, make: MakeReq) -> (Load, f64, (f64, f64)) {
    timed_intake_over(o, &[fer], make).await
}

/// [`timed_intake`] against several nodes of a cluster, the connections
/// spread round-robin over them; CPU and flushes are summed over the nodes.
async fn timed_intake_over(o: &Opts, nodes: &[&Proc], make: MakeReq) -> (Load, f64, (f64, f64)) {
    let flushes = |m: &str| {
        (
            metric_sum(m, "ferry_storage_flush_duration_seconds_count", ""),
            metric_sum(m, "ferry_storage_flush_duration_seconds_sum", ""),
        )
    };
    let all_flushes = || async {
        let mut t = (0.0, 0.0);
        for n in nodes {
            let (c, s) = flushes(&metrics(n.addr("admin")).await);
            t = (t.0 + c, t.1 + s);
        }
        t
    };
    let cpu = || nodes.iter().map(|n| cpu_secs(n.pid(), false)).sum::<f64>();
    let (n0, s0) = all_flushes().await;
    let cpu0 = cpu();
    let warmup = Duration::from_secs(2);
    let stop = Stop::Time {
        warmup,
        duration: o.duration,
    };
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr("proxy")).collect();
    let l = closed_loop_over(&addrs, o.conns, stop, make).await;
    let cpu = cpu() - cpu0;
    let (n1, s1) = all_flushes().await;
    let scale = o.duration.as_secs_f64() / (o.duration + warmup).as_secs_f64();
    let per_202 = cpu * scale / l.count(202) as f64 * 1e6;
    let mean_ms = (s1 - s0) / (n1 - n0).max(1.0) * 1000.0;
    (l, per_202, (n1 - n0, mean_ms))
}

/// The flush rows of an intake section.
fn flush_rows(rows: &mut Rows, section: &'static str, l: &Load, (n, mean_ms): (f64, f64)) {
    rows.add(section, "durable flushes: mean duration", mean_ms, "ms");
    rows.add(
        section,
        "durable flushes: calls per flush (whole run)",
        l.count(202) as f64 / n.max(1.0),
        "",
    );
}

/// Figure 2 again on the shipped default config (`config/ferry.toml`:
/// flushing every 1,000 requests or 5 s, the emulator in process), so the
/// flushes, uploads and ingestion run beside the intake they compete with.
async fn intake_default(o: &Opts, rows: &mut Rows) {
    eprintln!("== durable intake on the shipped default config (flushing on)");
    let dir = workdir();
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/ferry.toml"))
            .expect("config/ferry.toml");
    // Only what a second copy on this machine must change: ports, the data
    // dir, JSON logs, and the bench tenant's key beside the demo one.
    let data = dir.path().join("data");
    let cfg = shipped
        .replace("\"127.0.0.1:8080\"", "\"127.0.0.1:0\"")
        .replace("\"127.0.0.1:9090\"", "\"127.0.0.1:0\"")
        .replace(
            "data_dir = \"data/ferry\"",
            &format!("data_dir = \"{}\"\nlog_format = \"json\"", data.display()),
        )
        .replace(
            "keys = [\"ferry-demo-key\"]",
            &format!("keys = [\"ferry-demo-key\", \"{TENANT_KEY}\"]"),
        );
    assert!(
        cfg.contains(TENANT_KEY) && cfg.contains("log_format"),
        "{cfg}"
    );
    let fer = ferry(o, dir.path(), &cfg);
    let addr = fer.addr("proxy");
    let body = chat_body(MODEL, 300);
    let make: MakeReq =
        Arc::new(move |i| deferred_req(addr, body.clone(), &format!("d{i}"), "respond-async"));
    let (l, cpu_per_202, flushes) = timed_intake(o, &fer, make).await;
    l.check("intake with flushing", 202);
    let section = "2b intake, default config";
    flush_rows(rows, section, &l, flushes);
    rows.target(
        section,
        format!("202 answers/s, {} conns, one model, flushing on", o.conns),
        l.rate(202),
        "req/s",
        Target::AtLeast(10_000.0),
    );
    rows.add(section, "p50", l.pct(50.0), "ms");
    rows.target(section, "p99", l.pct(99.0), "ms", Target::AtMost(25.0));
    rows.add(
        section,
        "batches flushed during the run",
        log_events(&fer.log, "queue flushed into a batch").len() as f64,
        "",
    );
    rows.add(
        section,
        "Ferry CPU per request (embedded emulator included)",
        cpu_per_202,
        "µs",
    );
}

/// Passthrough latency beside a 50,000-line claim: the same open-loop
/// passthrough run once on a quiet Ferry and once while the last deferred
/// call tips a full queue into a batch (claim, then the upload streaming
/// every body out of the store). Store work runs off the runtime threads,
/// so the second p99 should stay within 1 ms of the first.
async fn stall(o: &Opts, rows: &mut Rows) {
    let n = o.batch_lines;
    eprintln!("== passthrough p99 beside a {n}-line claim");
    let dir = workdir();
    let (_emu, fer) = stack(
        o,
        dir.path(),
        &["--validating-seconds", "3600"],
        "",
        &format!("max_requests = {n}\nmax_wait_secs = 1e9\ncalls_per_second = 1000"),
    );
    let addr = fer.addr("proxy");
    let body = chat_body(MODEL, 300);
    let deferred: MakeReq =
        Arc::new(move |i| deferred_req(addr, body.clone(), &format!("s{i}"), "respond-async"));
    let fill = closed_loop(addr, o.conns, Stop::Count(n - 1), deferred.clone()).await;
    fill.check("fill", 202);
    let auth = format!("Bearer {TENANT_KEY}");
    let pbody = chat_body(MODEL, 200);
    let pass: MakeReq = Arc::new(move |_| {
        request(
            "POST",
            addr,
            "/v1/chat/completions",
            &[("authorization", &auth)],
            pbody.clone(),
        )
    });
    let rate = 500.0;
    let (warmup, duration) = (Duration::from_secs(1), Duration::from_secs(4));
    let quiet = open_loop(addr, 16, rate, warmup, duration, pass.clone()).await;
    quiet.check("passthrough, quiet", 200);
    // The last line crosses max_requests 1.5 s into the measured part.
    let tip = tokio::spawn(async move {
        tokio::time::sleep(warmup + Duration::from_millis(1500)).await;
        let (s, _) = send(&mut None, addr, deferred(n - 1))
            .await
            .expect("last line");
        assert_eq!(s, 202);
    });
    let busy = open_loop(addr, 16, rate, warmup, duration, pass).await;
    busy.check("passthrough beside the claim", 200);
    tip.await.expect("tip");
    let claimed = log_events(&fer.log, "queue flushed into a batch");
    let section = "9 store off the runtime";
    rows.add(
        section,
        format!("passthrough p99 at {rate} req/s, quiet"),
        quiet.pct(99.0),
        "ms",
    );
    rows.add(
        section,
        format!("passthrough p99 at {rate} req/s, {n}-line claim + upload running"),
        busy.pct(99.0),
        "ms",
    );
    rows.target(
        section,
        "difference (claim − quiet)",
        busy.pct(99.0) - quiet.pct(99.0),
        "ms",
        Target::AtMost(1.0),
    );
    rows.add(
        section,
        "batches claimed during the busy run (must be 1)",
        claimed.len() as f64,
        "",
    );
}

/// A section's directory (config, data, logs) under the target directory,
/// on a real disk so that fsyncs are real; `FERRY_BENCH_KEEP=1` keeps it.
fn workdir() -> tempfile::TempDir {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ferry-load");
    std::fs::create_dir_all(&p).expect("data dir");
    let mut dir = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&p)
        .expect("tempdir");
    if std::env::var("FERRY_BENCH_KEEP").is_ok_and(|v| v == "1") {
        dir.disable_cleanup(true);
        eprintln!("  keeping {}", dir.path().display());
    }
    dir
}

/// Figure 3: many queued requests; memory, lookups, restart.
async fn buffer(o: &Opts, rows: &mut Rows) {
    let n = o.buffer_requests;
    eprintln!("== buffer scale (figure 3): {n} requests of ~1 KB");
    let dir = workdir();
    let (_emu, mut fer) = stack(o, dir.path(), &["--models", ""], "", "max_wait_secs = 1e9");
    let addr = fer.addr("proxy");
    // At most 40,000 per queue (model), below the 50,000-line flush threshold.
    let models = n.div_ceil(40_000);
    let bodies: Arc<Vec<Bytes>> = Arc::new(
        (0..models)
            .map(|m| chat_body(&format!("bench-{m:02}"), 1024))
            .collect(),
    );
    let b2 = bodies.clone();
    let make: MakeReq = Arc::new(move |i| {
        deferred_req(
            addr,
            b2[(i % models) as usize].clone(),
            &format!("s{i}"),
            "respond-async",
        )
    });
    let fill = closed_loop(addr, o.conns, Stop::Count(n), make).await;
    fill.check("fill", 202);
    rows.add(
        "3 buffer scale",
        format!("fill: {n} × ~1 KB deferred, 202/s"),
        fill.rate(202),
        "req/s",
    );
    rows.add("3 buffer scale", "fill: p99", fill.pct(99.0), "ms");
    // The gauge is refreshed by the flush loop about once a second.
    let admin = fer.addr("admin");
    let queued = wait_metric(
        admin,
        "ferry_queued_requests",
        "",
        n as f64,
        Duration::from_secs(10),
    )
    .await;
    if let Err(q) = queued {
        eprintln!("  !! {q} queued, expected {n}");
    }
    rows.target(
        "3 buffer scale",
        format!("Ferry RSS with {n} queued"),
        mem_mib(fer.pid(), "VmRSS"),
        "MiB",
        Target::AtMost(300.0),
    );
    rows.add(
        "3 buffer scale",
        "Ferry peak RSS (VmHWM) while filling",
        mem_mib(fer.pid(), "VmHWM"),
        "MiB",
    );
    rows.add(
        "3 buffer scale",
        "data_dir on disk",
        dir_mib(&dir.path().join("data")),
        "MiB",
    );

    // Random ids at 1,000 req/s on 16 connections.
    let lookups = |addr: SocketAddr| {
        let make: MakeReq = Arc::new(move |i| {
            let id = scatter(i, n);
            request(
                "GET",
                addr,
                &format!("/v1/ferry/requests/s{id}"),
                &[("authorization", &format!("Bearer {TENANT_KEY}"))],
                Bytes::new(),
            )
        });
        open_loop(addr, 16, 1000.0, Duration::from_secs(1), o.duration, make)
    };
    let l = lookups(addr).await;
    l.check("lookups", 200);
    rows.add(
        "3 buffer scale",
        "status lookup p50 (1,000 req/s, random ids)",
        l.pct(50.0),
        "ms",
    );
    rows.target(
        "3 buffer scale",
        "status lookup p99 (1,000 req/s, random ids)",
        l.pct(99.0),
        "ms",
        Target::AtMost(1.0),
    );

    // Crash and restart on the same data.
    let _ = fer.child.kill();
    let _ = fer.child.wait();
    let t = Instant::now();
    let cfg = std::fs::read_to_string(dir.path().join("ferry.toml")).expect("config");
    fer = ferry(o, dir.path(), &cfg);
    let listening = t.elapsed();
    let admin = fer.addr("admin");
    let mut ready = None;
    while t.elapsed() < Duration::from_secs(600) {
        let ok = http()
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ok {
            ready = Some(t.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rows.add(
        "3 buffer scale",
        "restart after SIGKILL: until listening",
        listening.as_secs_f64(),
        "s",
    );
    rows.add(
        "3 buffer scale",
        "restart after SIGKILL: until ready (recovery done)",
        ready.map_or(f64::NAN, |d| d.as_secs_f64()),
        "s",
    );
    let queued = wait_metric(
        admin,
        "ferry_queued_requests",
        "",
        n as f64,
        Duration::from_secs(10),
    );
    if let Err(q) = queued.await {
        eprintln!("  !! after restart {q} queued, expected {n}");
    }
    rows.add(
        "3 buffer scale",
        "Ferry RSS after restart",
        mem_mib(fer.pid(), "VmRSS"),
        "MiB",
    );
    // Recovery's scratch (sled's snapshot, the queue scan) is freed by then
    // but jemalloc hands it back to the OS over its ~10 s decay; this row
    // tells a transient from a resident cost.
    tokio::time::sleep(Duration::from_secs(15)).await;
    rows.add(
        "3 buffer scale",
        "Ferry RSS 15 s after ready, idle",
        mem_mib(fer.pid(), "VmRSS"),
        "MiB",
    );
    let l = lookups(fer.addr("proxy")).await;
    l.check("lookups after restart", 200);
    rows.add(
        "3 buffer scale",
        "status lookup p99 after restart (cold cache)",
        l.pct(99.0),
        "ms",
    );
    rows.add(
        "3 buffer scale",
        "Ferry RSS after lookups",
        mem_mib(fer.pid(), "VmRSS"),
        "MiB",
    );
}

/// Figures 4, 5 and 6: a 50,000-line ~100 MB batch flushed, 10,000 callers
/// held on it, its output ingested and every caller answered.
async fn batch(o: &Opts, rows: &mut Rows) {
    let n = o.batch_lines;
    eprintln!(
        "== flush, ingestion, waiters (figures 4-6): {n} lines of ~{} B, {} held",
        o.batch_body_bytes, o.held
    );
    let dir = workdir();
    // Batches stay `validating` until the emulator's clock is moved, so the
    // flush and the ingestion are measured apart.
    let (emu, fer) = stack(
        o,
        dir.path(),
        &["--validating-seconds", "3600"],
        "max_wait_secs = 900",
        "max_requests = 50000\nmax_wait_secs = 1e9\npoll_interval_secs = 0.05\ncalls_per_second = 1000",
    );
    let emu_addr = emu.addr("emulator");
    let (addr, admin) = (fer.addr("proxy"), fer.addr("admin"));
    let pid = fer.pid();
    let body = chat_body(MODEL, o.batch_body_bytes);
    let make: MakeReq =
        Arc::new(move |i| deferred_req(addr, body.clone(), &format!("f{i}"), "respond-async"));
    // All but the last line: the last one, sent once everything is measured
    // and held, crosses the 50,000-request threshold and starts the flush
    // as in production (smaller sizes use /admin/flush).
    let fill = closed_loop(addr, o.conns, Stop::Count(n - 1), make.clone()).await;
    fill.check("fill", 202);
    rows.add(
        "4-6 batch",
        format!("fill: {n} × ~{} B deferred, 202/s", o.batch_body_bytes),
        fill.rate(202),
        "req/s",
    );

    // Figure 6: held long-polls, each on its own connection.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = mem_mib(pid, "VmRSS");
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let mut held = Vec::new();
    for i in 0..o.held {
        let gate = gate.clone();
        let id = scatter(i, n - 1);
        held.push(tokio::spawn(async move {
            let conn = {
                let _p = gate.acquire().await;
                connect(addr).await
            };
            let mut conn = Some(conn?);
            let req = request(
                "GET",
                addr,
                &format!("/v1/ferry/requests/f{id}/result?wait=600"),
                &[("authorization", &format!("Bearer {TENANT_KEY}"))],
                Bytes::new(),
            );
            let c = conn.as_mut().expect("conn");
            let resp = c.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            Ok::<_, String>((status, Instant::now()))
        }));
    }
    let reg = wait_metric(
        admin,
        "ferry_waiters",
        "",
        o.held as f64,
        Duration::from_secs(180),
    )
    .await;
    if let Err(v) = reg {
        eprintln!("  !! only {v} waiters registered");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_held = mem_mib(pid, "VmRSS");
    rows.add(
        "4-6 batch",
        "Ferry RSS, queue full, nobody held",
        rss_idle,
        "MiB",
    );
    rows.target(
        "4-6 batch",
        format!("6 waiters: RSS growth with {} held long-polls", o.held),
        rss_held - rss_idle,
        "MiB",
        Target::AtMost(100.0),
    );

    // Figure 4: the flush.
    reset_peak(pid);
    let rss0 = mem_mib(pid, "VmRSS");
    let cpu0 = cpu_secs(pid, false);
    let t0 = Instant::now();
    let (s, _) = send(&mut None, addr, make(n - 1)).await.expect("last line");
    assert_eq!(s, 202);
    if n < 50_000 {
        let r = http()
            .post(format!("http://{admin}/admin/flush"))
            .send()
            .await
            .expect("flush");
        assert_eq!(r.status(), 202);
    }
    let (mut uploaded, mut created) = (None, None);
    while t0.elapsed() < Duration::from_secs(300) && created.is_none() {
        let s = emu_stats(emu_addr).await;
        if uploaded.is_none() && s["files_uploaded"].as_u64().unwrap_or(0) >= 1 {
            uploaded = Some(t0.elapsed());
        }
        if s["batches"].as_u64().unwrap_or(0) >= 1 {
            created = Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let flush_cpu = cpu_secs(pid, false) - cpu0;
    let flush_peak = mem_mib(pid, "VmHWM") - rss0;
    let up = log_events(&fer.log, "input file uploaded");
    let bytes = up
        .first()
        .and_then(|f| f["bytes"].as_f64())
        .unwrap_or(f64::NAN);
    rows.add(
        "4-6 batch",
        "4 flush: JSONL file size",
        bytes / (1024.0 * 1024.0),
        "MiB",
    );
    rows.add(
        "4-6 batch",
        "4 flush: last line accepted → file uploaded (wall)",
        uploaded.map_or(f64::NAN, |d| d.as_secs_f64()),
        "s",
    );
    rows.add(
        "4-6 batch",
        "4 flush: Ferry's upload step (log took_ms)",
        up.first()
            .and_then(|f| f["took_ms"].as_f64())
            .unwrap_or(f64::NAN)
            / 1000.0,
        "s",
    );
    rows.add(
        "4-6 batch",
        "4 flush: last line accepted → batch created (wall)",
        created.map_or(f64::NAN, |d| d.as_secs_f64()),
        "s",
    );
    rows.target(
        "4-6 batch",
        "4 flush: Ferry CPU time, flush → created",
        flush_cpu,
        "s",
        Target::AtMost(5.0),
    );
    rows.target(
        "4-6 batch",
        "4 flush: Ferry peak RSS growth",
        flush_peak,
        "MiB",
        Target::AtMost(64.0),
    );

    // Figure 5: the batch lands.
    tokio::time::sleep(Duration::from_millis(300)).await;
    reset_peak(pid);
    let rss0 = mem_mib(pid, "VmRSS");
    let cpu0 = cpu_secs(pid, false);
    let t0 = Instant::now();
    let c = http();
    c.post(format!("http://{emu_addr}/_emulator/clock"))
        .json(&json!({"advance_seconds": 7200}))
        .send()
        .await
        .expect("clock");
    // Reading the batch brings it up to date (the emulator builds the output
    // file): how long the upstream side takes, apart from Ferry.
    let b: Value = c
        .get(format!("http://{emu_addr}/v1/batches?limit=1"))
        .bearer_auth(EMU_KEY)
        .send()
        .await
        .expect("batches")
        .json()
        .await
        .expect("batches json");
    let emu_ready = t0.elapsed();
    let status = b["data"][0]["status"].as_str().unwrap_or("?").to_owned();
    if status != "completed" {
        eprintln!("  !! batch is {status}, not completed");
    }
    let mut answered = Vec::new();
    let mut not_ok = 0u64;
    for h in held {
        match h.await.expect("waiter") {
            Ok((200, at)) => answered.push((at - t0).as_micros() as u32),
            Ok((_, at)) => {
                not_ok += 1;
                answered.push((at - t0).as_micros() as u32);
            }
            Err(e) => {
                not_ok += 1;
                eprintln!("  !! held call failed: {e}");
            }
        }
    }
    let all = wait_metric(
        admin,
        "ferry_requests_finished_total",
        "completed",
        n as f64,
        Duration::from_secs(300),
    )
    .await;
    let stored = t0.elapsed();
    if let Err(v) = all {
        eprintln!("  !! only {v} requests completed");
    }
    let cpu = cpu_secs(pid, false) - cpu0;
    let peak = mem_mib(pid, "VmHWM") - rss0;
    let last = percentile(&answered, 100.0) / 1e6;
    // `batch done` is logged after the upstream files are deleted.
    let t = Instant::now();
    while log_events(&fer.log, "batch done").is_empty() && t.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rows.add(
        "4-6 batch",
        "5 ingest: clock moved → emulator answers `completed` (upstream side)",
        emu_ready.as_secs_f64(),
        "s",
    );
    rows.add(
        "4-6 batch",
        "5 ingest: clock moved → first held caller answered",
        percentile(&answered, 0.0) / 1e6,
        "s",
    );
    rows.add(
        "4-6 batch",
        "5 ingest: clock moved → last held caller answered",
        last,
        "s",
    );
    rows.target(
        "4-6 batch",
        format!(
            "5 ingest: {n}-line output stored and all {} held answered, from upstream `completed`",
            o.held
        ),
        last - emu_ready.as_secs_f64(),
        "s",
        Target::AtMost(3.0),
    );
    rows.add(
        "4-6 batch",
        "5 ingest: all results stored (metrics), from clock moved",
        stored.as_secs_f64(),
        "s",
    );
    rows.add(
        "4-6 batch",
        "5 ingest: Ferry log, `batch finished upstream` → `batch done`",
        log_interval(&fer.log, "batch finished upstream", "batch done"),
        "s",
    );
    rows.add("4-6 batch", "5 ingest: Ferry CPU time", cpu, "s");
    rows.add("4-6 batch", "5 ingest: Ferry peak RSS growth", peak, "MiB");
    rows.target(
        "4-6 batch",
        "6 waiters: held callers not answered 200",
        not_ok as f64,
        "",
        Target::AtMost(0.0),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    rows.add(
        "4-6 batch",
        "Ferry RSS after everyone was answered",
        mem_mib(pid, "VmRSS"),
        "MiB",
    );
}

// --------------------------------------------------------------- cluster

/// The cluster section's figures: what running several nodes on one
/// PostgreSQL database costs, not how it scales (this machine has few
/// cores, shared by the nodes, the database, the emulator and the
/// generator).
const CLUSTER_FIGURE_INTAKE: &str = "C1 cluster intake, PostgreSQL";
const CLUSTER_FIGURE_TAKEOVER: &str = "C2 takeover after SIGKILL of the owner";
const CLUSTER_FIGURE_WAKE: &str = "C3 cross-node wake-up";

/// One node of a benched cluster: its directory (config, `data`, logs),
/// its config and its process.
struct Node {
    dir: PathBuf,
    config: String,
    proc: Proc,
}

impl Node {
    /// The name this node takes leases under (`node-<instance id>`).
    fn name(&self) -> String {
        let id = std::fs::read_to_string(self.dir.join("data").join("instance_id"))
            .expect("instance id");
        format!("node-{}", id.trim())
    }
}

/// `n` Ferry nodes on one fresh PostgreSQL database in front of one
/// standalone emulator (its own process, so its CPU is not Ferry's), each
/// node in `dir/node<i>`, all on the same config but for `data_dir`.
struct Cluster {
    emu: Proc,
    nodes: Vec<Node>,
    pg: PgDatabase,
    /// A connection to the cluster's database (reads `leases`).
    db: tokio_postgres::Client,
}

impl Cluster {
    async fn start(
        o: &Opts,
        dir: &Path,
        n: usize,
        emu_args: &[&str],
        upstream_extra: &str,
        storage_extra: &str,
    ) -> Cluster {
        let pg = PgDatabase::fresh().await;
        let emu = emulator(o, dir, emu_args);
        let mut nodes = Vec::new();
        for i in 0..n {
            let ndir = dir.join(format!("node{i}"));
            std::fs::create_dir_all(&ndir).expect("node dir");
            let mut config =
                ferry_config(&ndir.join("data"), emu.addr("emulator"), "", upstream_extra);
            config.push_str(&pg_storage(storage_extra));
            let proc = ferry_with(o, &ndir, &config, &[("FERRY_BENCH_PG_URL", &pg.url)]);
            nodes.push(Node {
                dir: ndir,
                config,
                proc,
            });
        }
        let db = pg_connect(&pg.url).await;
        Cluster { emu, nodes, pg, db }
    }

    /// The lease row's owner, if unexpired by the database's clock.
    async fn lease_owner(&self) -> Option<String> {
        self.db
            .query_opt(
                "SELECT owner FROM leases WHERE name = 'upstream/emu' AND expires_at > now()",
                &[],
            )
            .await
            .expect("read leases")
            .map(|r| r.get(0))
    }

    /// The index of the node that owns the upstream, once one does.
    async fn owner(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(owner) = self.lease_owner().await
                && let Some(i) = self.nodes.iter().position(|n| n.name() == owner)
            {
                return i;
            }
            assert!(Instant::now() < deadline, "no node took the upstream");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILLs node `i` and returns when it is gone.
    fn kill(&mut self, i: usize) {
        let p = &mut self.nodes[i].proc;
        let _ = p.child.kill();
        let _ = p.child.wait();
    }

    /// Starts node `i` again on its directory and config.
    fn restart(&mut self, o: &Opts, i: usize) {
        let n = &mut self.nodes[i];
        n.proc = ferry_with(
            o,
            &n.dir,
            &n.config,
            &[("FERRY_BENCH_PG_URL", &self.pg.url)],
        );
    }

    async fn stop(self) {
        drop(self.nodes);
        drop(self.emu);
        drop(self.db);
        self.pg.drop_database().await;
    }
}

/// Figures C1-C3: Ferry as a cluster of nodes on one PostgreSQL database
/// (a fresh one per run, on the server in `FERRY_TEST_PG_URL`), each node
/// a release binary, one standalone emulator.
///
/// - C1, aggregate intake: the `intake-pg` run ([`timed_intake_over`],
///   [`intake_requests`]: 64 connections, ~300 B bodies over 16 models, no
///   flush while measuring) against 1, 2 and 3 nodes, the connections
///   spread round-robin over them; 202/s, p50 and p99 side by side.
/// - C2, takeover: 3 nodes; the node holding the `upstream/emu` lease is
///   SIGKILLed and the `leases` table is read every 10 ms until another
///   node holds an unexpired lease; the killed node is started again and
///   the next kill comes at another phase of the renewal (every third of
///   `lease_secs`). 5 kills with the default `lease_secs = 15` and 5 with
///   `lease_secs = 2`: min, median, max from the kill to the new owner.
/// - C3, cross-node wake-up: 3 nodes; rounds of 1 caller held
///   (`Prefer: respond-async, wait=60`, a unique prompt) on the owner and 20
///   on the two other nodes, the upstream flushing at exactly 21 requests,
///   so each round is one batch, its results stored in one slice by the
///   owner. The owner wakes its own caller in process after the slice's
///   commit and `NOTIFY`; the other nodes wake theirs when the `NOTIFY`
///   reaches their listener. Per non-owner caller: its answer's arrival
///   minus the owner-held caller's arrival (same batch, same commit, same
///   client clock) is what holding a caller away from the owner adds.
///   (The owner wakes its caller only after its `NOTIFY` statement
///   returned, so this slightly under-counts; `requests.completed_at` is in
///   whole seconds, so no better stored timestamp exists.) As a second
///   reference the harness LISTENs on `ferry_events` itself: answer arrival
///   minus the harness receiving the round's terminal notification.
async fn cluster(o: &Opts, rows: &mut Rows) {
    eprintln!(
        "== cluster (C1-C3): {} CPUs here, shared by every node, PostgreSQL, the emulator and \
         the generator: these figures show the cost of the cluster, not its scaling",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    cluster_intake(o, rows).await;
    for lease in [15.0, 2.0] {
        cluster_takeover(o, rows, lease).await;
    }
    cluster_wakeup(o, rows).await;
}

/// C1: the same intake against 1, 2 and 3 nodes.
async fn cluster_intake(o: &Opts, rows: &mut Rows) {
    let f = CLUSTER_FIGURE_INTAKE;
    for n in 1..=3 {
        eprintln!("  -- {f}: {n} node(s), {} connections round-robin", o.conns);
        let dir = workdir();
        let c = Cluster::start(
            o,
            dir.path(),
            n,
            &["--models", ""],
            "max_wait_secs = 1e9",
            "",
        )
        .await;
        let nodes: Vec<&Proc> = c.nodes.iter().map(|n| &n.proc).collect();
        let make = intake_requests(nodes[0].addr("proxy"), "c");
        let db_cpu0 = c.pg.cpu_secs();
        let (l, cpu_per_202, _) = timed_intake_over(o, &nodes, make).await;
        l.check("cluster intake", 202);
        let nodes_s = if n == 1 { "node" } else { "nodes" };
        rows.add(
            f,
            format!("{n} {nodes_s}: 202 answers/s, {} conns", o.conns),
            l.rate(202),
            "req/s",
        );
        rows.add(f, format!("{n} {nodes_s}: p50"), l.pct(50.0), "ms");
        rows.add(f, format!("{n} {nodes_s}: p99"), l.pct(99.0), "ms");
        rows.add(
            f,
            format!("{n} {nodes_s}: Ferry CPU per request (all nodes)"),
            cpu_per_202,
            "µs",
        );
        // Over the whole run (warm-up included), as Ferry's CPU is scaled.
        let scale = o.duration.as_secs_f64() / (o.duration + Duration::from_secs(2)).as_secs_f64();
        let db_per_202 = (c.pg.cpu_secs() - db_cpu0) * scale / l.count(202) as f64 * 1e6;
        rows.add(
            f,
            format!("{n} {nodes_s}: PostgreSQL CPU per request"),
            db_per_202,
            "µs",
        );
        c.stop().await;
    }
}

/// C2: from SIGKILL of the owner to another node holding the lease.
async fn cluster_takeover(o: &Opts, rows: &mut Rows, lease_secs: f64) {
    const KILLS: usize = 5;
    eprintln!("  -- {CLUSTER_FIGURE_TAKEOVER}: lease_secs = {lease_secs}, {KILLS} kills, 3 nodes");
    let dir = workdir();
    let mut c = Cluster::start(
        o,
        dir.path(),
        3,
        &[],
        "max_wait_secs = 1e9",
        &format!("lease_secs = {lease_secs}"),
    )
    .await;
    let renew = lease_secs / 3.0;
    let mut took = Vec::new();
    for k in 0..KILLS {
        let dead = c.owner().await;
        // Kill at a different point of the owner's renewal cycle each time.
        let phase = [0.1, 0.5, 0.9, 0.3, 0.7][k % 5];
        tokio::time::sleep(Duration::from_secs_f64(renew * phase)).await;
        let dead_name = c.nodes[dead].name();
        c.kill(dead);
        let t = Instant::now();
        loop {
            if let Some(owner) = c.lease_owner().await
                && owner != dead_name
            {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs_f64(lease_secs * 3.0 + 30.0),
                "nobody took over from node {dead}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "     kill {}: node {dead} killed, taken over after {secs:.2} s",
            k + 1
        );
        took.push(secs);
        c.restart(o, dead);
    }
    c.stop().await;
    let f = CLUSTER_FIGURE_TAKEOVER;
    let lo = took.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = took.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    rows.add(
        f,
        format!("lease_secs = {lease_secs}: min of {KILLS}"),
        lo,
        "s",
    );
    rows.add(
        f,
        format!("lease_secs = {lease_secs}: median of {KILLS}"),
        median(&mut took),
        "s",
    );
    rows.add(
        f,
        format!("lease_secs = {lease_secs}: max of {KILLS}"),
        hi,
        "s",
    );
}

/// C3: callers held on nodes that do not own the upstream, against one held
/// on the owner for the same batch (see [`cluster`]).
async fn cluster_wakeup(o: &Opts, rows: &mut Rows) {
    /// Callers held on the non-owner nodes per round (one batch).
    const AWAY: usize = 20;
    const ROUNDS: usize = 16;
    let f = CLUSTER_FIGURE_WAKE;
    eprintln!(
        "  -- {f}: {ROUNDS} rounds (the first a warm-up) of 1 caller held on the owner + {AWAY} \
         on the other nodes, one {}-line batch each",
        AWAY + 1
    );
    let dir = workdir();
    let upstream_extra = format!(
        "max_requests = {}\nmax_wait_secs = 30\npoll_interval_secs = 0.05\n\
         calls_per_second = 1000\nbatches_per_hour = 1000000",
        AWAY + 1
    );
    let c = Cluster::start(o, dir.path(), 3, &[], &upstream_extra, "").await;
    // A quick emulator, as in tests/cluster.rs but shorter.
    let r = http()
        .post(format!(
            "http://{}/_emulator/config",
            c.emu.addr("emulator")
        ))
        .json(&json!({
            "validating_seconds": 0.05,
            "per_request_seconds": 0.001,
            "finalizing_seconds": 0.05,
            "latency_ms": 1
        }))
        .send()
        .await
        .expect("emulator config");
    assert!(r.status().is_success(), "emulator config: {}", r.status());
    // The harness's own listener: when each round's terminal notification
    // reaches a LISTENing connection.
    let (_listener, notified) = listen_events(&c.pg.url).await;
    let owner = c.owner().await;
    let away: Vec<usize> = (0..3).filter(|&i| i != owner).collect();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(64)
        .build()
        .expect("client");
    let mut vs_owner = Vec::new();
    let mut vs_notify = Vec::new();
    let mut owner_vs_notify = Vec::new();
    let mut round_secs = Vec::new();
    for round in 0..ROUNDS {
        let started = Instant::now();
        let mut calls = Vec::new();
        for k in 0..=AWAY {
            // Call 0 is held on the owner, the others alternate between the
            // two other nodes.
            let node = if k == 0 { owner } else { away[k % 2] };
            let url = format!(
                "http://{}/v1/chat/completions",
                c.nodes[node].proc.addr("proxy")
            );
            let id = format!("w{round}-{k}");
            let body = json!({
                "model": MODEL,
                "messages": [{"role": "user", "content": format!("wake-up {id}")}],
            });
            let client = client.clone();
            calls.push(tokio::spawn(async move {
                let r = client
                    .post(url)
                    .bearer_auth(TENANT_KEY)
                    .header("prefer", "respond-async, wait=60")
                    .header("x-ferry-custom-id", &id)
                    .json(&body)
                    .send()
                    .await;
                let ok = match r {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let text = r.text().await.unwrap_or_default();
                        status == 200 && text.contains(&format!("echo: wake-up {id}"))
                    }
                    Err(_) => false,
                };
                (Instant::now(), ok)
            }));
        }
        let mut answers = Vec::new();
        for h in calls {
            answers.push(h.await.expect("held caller"));
        }
        round_secs.push(started.elapsed().as_secs_f64());
        let bad = answers.iter().filter(|(_, ok)| !ok).count();
        if bad > 0 {
            eprintln!("  !! round {round}: {bad} held callers not answered with their completion");
        }
        // The round's terminal notification: the first one heard since the
        // round started (rounds do not overlap, nothing else completes).
        let heard = notified
            .lock()
            .expect("notifications")
            .iter()
            .copied()
            .find(|t| *t >= started);
        if round == 0 {
            continue; // warm-up: connections, prepared statements
        }
        let (t_owner, owner_ok) = answers[0];
        if !owner_ok {
            continue;
        }
        for &(t, _) in answers.iter().skip(1).filter(|(_, ok)| *ok) {
            vs_owner.push(signed_ms(t, t_owner));
            if let Some(h) = heard {
                vs_notify.push(signed_ms(t, h));
            }
        }
        if let Some(h) = heard {
            owner_vs_notify.push(signed_ms(t_owner, h));
        }
    }
    let n = vs_owner.len();
    eprintln!(
        "     {n} callers away from the owner; a round took {:.2} s (median)",
        median(&mut round_secs)
    );
    rows.add(
        f,
        format!("callers held away from the owner ({} rounds)", ROUNDS - 1),
        n as f64,
        "",
    );
    rows.add(
        f,
        "away − owner-held answer, same batch: p50",
        fpct(&vs_owner, 50.0),
        "ms",
    );
    rows.add(
        f,
        "away − owner-held answer, same batch: p99",
        fpct(&vs_owner, 99.0),
        "ms",
    );
    rows.add(
        f,
        "away − harness heard the NOTIFY: p50",
        fpct(&vs_notify, 50.0),
        "ms",
    );
    rows.add(
        f,
        "away − harness heard the NOTIFY: p99",
        fpct(&vs_notify, 99.0),
        "ms",
    );
    rows.add(
        f,
        "owner-held − harness heard the NOTIFY: p50",
        fpct(&owner_vs_notify, 50.0),
        "ms",
    );
    c.stop().await;
}

/// How to read C1-C3, printed under the table.
fn print_cluster_notes() {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "Cluster (C1-C3): every node, PostgreSQL, the emulator and the generator share these {cpus} \
         CPUs, so C1 shows what the cluster costs, not how it scales: more nodes cannot add cores \
         here. C1: the intake-pg run (64 connections, ~300 B bodies, 16 models, no flush while \
         measuring) against 1, 2, 3 nodes on one fresh database, connections round-robin over the \
         nodes. C2: SIGKILL of the node holding the upstream's lease, then the `leases` table read \
         every 10 ms until another node holds it (by the database's clock); 5 kills per \
         lease_secs, each at another phase of the renewal. C3: per round one caller held \
         (wait=60) on the owner and 20 on the other nodes, one 21-line batch; each away caller's \
         answer minus the owner-held caller's answer (same batch, same commit, the harness's \
         clock) is what holding away from the owner adds (slightly under-counted: the owner \
         wakes its caller after its NOTIFY statement returns); and minus when the harness's own \
         LISTEN connection heard the round's notification."
    );
}

/// `a − b` in ms, negative when `a` came first.
fn signed_ms(a: Instant, b: Instant) -> f64 {
    if a >= b {
        (a - b).as_secs_f64() * 1000.0
    } else {
        -((b - a).as_secs_f64() * 1000.0)
    }
}

/// Percentile of float samples (nearest rank, as [`percentile`]).
fn fpct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[i.min(s.len() - 1)]
}

/// LISTENs on `ferry_events` (Ferry's cluster channel) on a connection of
/// the harness's own, and records when each terminal-requests notification
/// (payload `t<ids>`) arrives; listening until the returned client drops.
async fn listen_events(url: &str) -> (tokio_postgres::Client, Arc<std::sync::Mutex<Vec<Instant>>>) {
    use futures::StreamExt;
    let config: tokio_postgres::Config = url.parse().expect("database URL");
    let (client, mut conn) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect to listen");
    let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
    let h = heard.clone();
    let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
    tokio::spawn(async move {
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m
                && n.payload().starts_with('t')
            {
                h.lock().expect("notifications").push(Instant::now());
            }
        }
    });
    client
        .batch_execute("LISTEN ferry_events")
        .await
        .expect("LISTEN ferry_events");
    (client, heard)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let o = Opts::parse();
    assert!(
        o.bin.exists(),
        "{} does not exist: run `cargo build --release` (or set FERRY_BIN)",
        o.bin.display()
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("load average before: {}", load.trim());
    let started = Instant::now();
    let mut runs = Vec::new();
    for run in 0..o.runs {
        eprintln!("--- run {} of {}", run + 1, o.runs);
        let mut rows = Rows::default();
        if o.wants("passthrough") {
            passthrough(&o, run, &mut rows).await;
        }
        if o.wants("intake") {
            intake(&o, &mut rows, Storage::Sled).await;
        }
        if o.wants("intake-pg") {
            // Not asked for by name and no server: skipped, as nginx's rows are.
            if o.only.is_none() && std::env::var_os("FERRY_TEST_PG_URL").is_none() {
                eprintln!("== 2p durable intake, PostgreSQL: skipped (no FERRY_TEST_PG_URL)");
            } else {
                intake(&o, &mut rows, Storage::Postgres).await;
            }
        }
        if o.wants("intake-default") {
            intake_default(&o, &mut rows).await;
        }
        if o.wants("stall") {
            stall(&o, &mut rows).await;
        }
        if o.wants("buffer") {
            buffer(&o, &mut rows).await;
        }
        if o.wants("batch") {
            batch(&o, &mut rows).await;
        }
        if o.wants("e2e") {
            e2e::e2e(&o, &mut rows).await;
        }
        if o.wants("deadlines") {
            deadlines::deadlines(&o, &mut rows).await;
        }
        if o.wants("cluster") {
            // Not asked for by name and no server: skipped, as nginx's rows are.
            if o.only.is_none() && std::env::var_os("FERRY_TEST_PG_URL").is_none() {
                eprintln!("== cluster (C1-C3): skipped (no FERRY_TEST_PG_URL)");
            } else {
                cluster(&o, &mut rows).await;
            }
        }
        if o.names("soak") {
            soak::soak(&o, &mut rows).await;
        }
        runs.push(rows);
    }
    print_table(&o, &runs);
    println!();
    if o.wants("cluster") && std::env::var_os("FERRY_TEST_PG_URL").is_some() {
        print_cluster_notes();
    }
    println!(
        "Took {:.0} s. Generator, proxy and emulator share the machine's cores; nothing is pinned.",
        started.elapsed().as_secs_f64()
    );
}
