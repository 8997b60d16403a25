//! The retention soak (data lifecycle, issue #14, "Figures"): millions of
//! deferred calls through the whole cycle — intake, batch, result, lookup,
//! purge — on the embedded default store (sled) with small retention
//! values, to show that the store and the process stay bounded by the
//! retention window rather than growing with the count.
//!
//! ```sh
//! cargo bench --bench load --no-run      # prints the executable
//! FERRY_BIN=target/release/ferry FERRY_BENCH_SOAK_REQUESTS=2000000 \
//!     target/release/deps/load-<hash> --only soak
//! ```
//!
//! Opt-in: it runs only when named in `--only` (it takes a long time).
//! Sizes: `FERRY_BENCH_SOAK_REQUESTS` (default 2,000,000 accepted calls),
//! `FERRY_BENCH_SOAK_SAMPLE_SECS` (default 2), `FERRY_BENCH_SOAK_TERMINAL_SECS`
//! (`retention.terminal_secs`, default 5).
//!
//! What runs: a standalone emulator that finishes batches at once, and a
//! Ferry on sled with `retention.terminal_secs = 5`,
//! `retention.interval_secs = 0.5` and an upstream that flushes at 5,000
//! requests or 1 s and polls every 0.2 s. [`WORKERS`] connections send
//! deferred calls (`Prefer: respond-async`, a ticket, no wait) with unique
//! custom ids `soak{i}`; a worker pauses while more than [`MAX_IN_FLIGHT`]
//! accepted calls are not yet terminal (read from
//! `ferry_requests_finished_total`), so the generator goes at the speed of
//! the whole cycle, not of intake alone, and the figures measure retention,
//! not an ever-growing backlog. Beside them, one task looks up recent custom
//! ids, alternately the status of one of the last accepted and the `/result`
//! of one near the finished frontier (about 200 lookups/s).
//!
//! Sampled every `FERRY_BENCH_SOAK_SAMPLE_SECS`: elapsed time, accepted (202) calls, finished
//! and queued requests and purged request rows (Ferry's metrics), the age of
//! the oldest terminal request, the size of the data_dir (every file under
//! it, as `du --apparent-size`) and the RSS of Ferry and of the emulator
//! (`/proc/<pid>/status`). Once all are accepted, sampling goes on until
//! every request is terminal and purged and the data_dir has stopped
//! shrinking (three equal samples), at most `terminal_secs` + 300 s.
//!
//! Restart: spawn → `/readyz` 200 after SIGKILL, three times on the empty
//! store before the load and three times at the end, medians compared.
//!
//! Output: the samples as CSV and an SVG plot (data_dir and RSS against the
//! accepted count; the drain after the last call is the vertical tail at
//! the right edge) in `target/tmp/soak/`, and table rows: data_dir and RSS
//! at 25/50/75/100 % of the count, their peaks, the 100 %/50 % ratios and
//! the restart times.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{
    MODEL, Opts, Proc, Rows, TENANT_KEY, Target, chat_body, deferred_req, dir_mib, emulator, ferry,
    ferry_config, http, median, mem_mib, metric_sum, metrics, request, scatter, send, workdir,
};

const FIGURE: &str = "S retention soak";
/// Connections sending deferred calls.
const WORKERS: usize = 16;
/// Most accepted calls not yet terminal before the workers pause.
const MAX_IN_FLIGHT: u64 = 20_000;
/// Restarts measured on the empty store and at the end (medians reported).
const RESTARTS: usize = 3;

/// Soak sizes, from the environment.
pub struct SoakOpts {
    pub requests: u64,
    pub sample: Duration,
    pub terminal_secs: u64,
}

impl SoakOpts {
    pub fn from_env() -> SoakOpts {
        let num = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.replace('_', "").parse::<f64>().ok())
        };
        SoakOpts {
            requests: num("FERRY_BENCH_SOAK_REQUESTS").map_or(2_000_000, |v| v as u64),
            sample: Duration::from_secs_f64(num("FERRY_BENCH_SOAK_SAMPLE_SECS").unwrap_or(2.0)),
            terminal_secs: num("FERRY_BENCH_SOAK_TERMINAL_SECS").map_or(5, |v| v as u64),
        }
    }
}

/// One point of the time series.
#[derive(Clone, Copy)]
struct Sample {
    secs: f64,
    accepted: u64,
    finished: f64,
    queued: f64,
    purged: f64,
    oldest_terminal_secs: f64,
    data_mib: f64,
    rss_mib: f64,
    emu_rss_mib: f64,
}

const CSV_HEADER: &str = "elapsed_s,accepted,finished,queued,purged_requests,oldest_terminal_age_s,data_dir_mib,rss_mib,emulator_rss_mib";

impl Sample {
    fn csv(&self) -> String {
        format!(
            "{:.1},{},{},{},{},{},{:.2},{:.2},{:.2}",
            self.secs,
            self.accepted,
            self.finished,
            self.queued,
            self.purged,
            self.oldest_terminal_secs,
            self.data_mib,
            self.rss_mib,
            self.emu_rss_mib
        )
    }
}

/// Reads one sample of Ferry's metrics, its data_dir and both RSS.
async fn sample(started: Instant, accepted: u64, fer: &Proc, emu_pid: u32, data: &Path) -> Sample {
    let m = metrics(fer.addr("admin")).await;
    Sample {
        secs: started.elapsed().as_secs_f64(),
        accepted,
        finished: metric_sum(&m, "ferry_requests_finished_total", ""),
        queued: metric_sum(&m, "ferry_queued_requests", ""),
        purged: metric_sum(&m, "ferry_retention_purged_rows_total", "kind=\"request\""),
        oldest_terminal_secs: metric_sum(&m, "ferry_retention_oldest_terminal_age_seconds", ""),
        data_mib: dir_mib(data),
        rss_mib: mem_mib(fer.pid(), "VmRSS"),
        emu_rss_mib: mem_mib(emu_pid, "VmRSS"),
    }
}

/// The lookups' answers, by phase (`load`, `drain`), route (`status`,
/// `result`) and HTTP status (0: no answer), and the first 5xx or failure.
#[derive(Default)]
struct Lookups {
    counts: std::collections::BTreeMap<(&'static str, &'static str, u16), u64>,
    first_failure: Option<String>,
}

impl Lookups {
    fn record(
        &mut self,
        phase: &'static str,
        route: &'static str,
        path: &str,
        res: Result<(u16, Bytes), String>,
    ) {
        let status = res.as_ref().map_or(0, |(s, _)| *s);
        *self.counts.entry((phase, route, status)).or_default() += 1;
        if (status == 0 || status >= 500) && self.first_failure.is_none() {
            self.first_failure = Some(match res {
                Ok((s, b)) => format!("{phase} GET {path}: {s} {}", String::from_utf8_lossy(&b)),
                Err(e) => format!("{phase} GET {path}: {e}"),
            });
        }
    }

    /// Answers in `phase` whose status `ok` refuses.
    fn count(&self, phase: &str, ok: impl Fn(u16) -> bool) -> u64 {
        self.counts
            .iter()
            .filter(|((p, _, s), _)| *p == phase && !ok(*s))
            .map(|(_, n)| n)
            .sum()
    }
}

/// SIGKILLs `fer` and starts it again on the same directory; returns the
/// new process and the time from spawn to `/readyz` answering 200.
async fn restart(o: &Opts, dir: &Path, mut fer: Proc) -> (Proc, f64) {
    let _ = fer.child.kill();
    let _ = fer.child.wait();
    drop(fer);
    let cfg = std::fs::read_to_string(dir.join("ferry.toml")).expect("soak config");
    let t = Instant::now();
    let fer = ferry(o, dir, &cfg);
    let admin = fer.addr("admin");
    let client = http();
    while t.elapsed() < Duration::from_secs(600) {
        let ok = client
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ok {
            return (fer, t.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("  !! Ferry not ready 600 s after a restart");
    (fer, f64::NAN)
}

/// Restarts `fer` [`RESTARTS`] times; the first and the median spawn →
/// ready time (the first after a load may still find work to recover).
async fn restarts(o: &Opts, dir: &Path, mut fer: Proc, when: &str) -> (Proc, f64, f64) {
    let mut times = Vec::new();
    for _ in 0..RESTARTS {
        let (f, t) = restart(o, dir, fer).await;
        fer = f;
        times.push(t);
    }
    eprintln!("  restarts {when}: {times:.3?} s");
    (fer, times[0], median(&mut times))
}

/// The first sample at or past `share` of the count.
fn at_share(samples: &[Sample], n: u64, share: f64) -> Option<Sample> {
    let want = (n as f64 * share).ceil() as u64;
    samples.iter().find(|s| s.accepted >= want).copied()
}

pub async fn soak(o: &Opts, rows: &mut Rows) {
    let so = SoakOpts::from_env();
    let n = so.requests;
    eprintln!(
        "== retention soak: {n} deferred calls, terminal_secs = {}, sampled every {:?}",
        so.terminal_secs, so.sample
    );
    let dir = workdir();
    let data = dir.path().join("data");
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("soak");
    std::fs::create_dir_all(&out).expect("target/tmp/soak");

    let emu = emulator(o, dir.path(), &[]);
    let emu_pid = emu.pid();
    let cfg = format!(
        "{}\n[retention]\nterminal_secs = {}\ninterval_secs = 0.5\n",
        ferry_config(
            &data,
            emu.addr("emulator"),
            "",
            "max_requests = 5000\nmax_wait_secs = 1\npoll_interval_secs = 0.2\n\
             calls_per_second = 1000\nbatches_per_hour = 100000",
        ),
        so.terminal_secs
    );
    let fer = ferry(o, dir.path(), &cfg);

    // Restart on the empty store (the same spawn → ready as at the end).
    let (fer, _, empty_restart) = restarts(o, dir.path(), fer, "on the empty store").await;
    let addr = fer.addr("proxy");

    let accepted = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let issued = Arc::new(AtomicU64::new(0));
    let not_202 = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let body = chat_body(MODEL, 300);

    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (accepted, finished, issued, not_202, first_error, body) = (
            accepted.clone(),
            finished.clone(),
            issued.clone(),
            not_202.clone(),
            first_error.clone(),
            body.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut conn = None;
            loop {
                // Back-pressure: the cycle's speed, not intake's.
                while accepted.load(Ordering::Relaxed)
                    > finished.load(Ordering::Relaxed) + MAX_IN_FLIGHT
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let i = issued.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let req = deferred_req(addr, body.clone(), &format!("soak{i}"), "respond-async");
                match send(&mut conn, addr, req).await {
                    Ok((202, _)) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        not_202.fetch_add(1, Ordering::Relaxed);
                        let mut e = first_error.lock().expect("first error");
                        if e.is_none() {
                            *e = Some(match other {
                                Ok((s, b)) => format!("{s}: {}", String::from_utf8_lossy(&b)),
                                Err(e) => e,
                            });
                        }
                    }
                }
            }
        }));
    }

    // Lookups of recent custom ids: the status of one just accepted, and
    // the result of one near the finished frontier. They go on during the
    // drain, when the ids they pick are being purged (404 is then right).
    let draining = Arc::new(AtomicBool::new(false));
    let lookups = {
        let (accepted, finished, done, draining) = (
            accepted.clone(),
            finished.clone(),
            done.clone(),
            draining.clone(),
        );
        tokio::spawn(async move {
            let mut conn = None;
            let mut tally = Lookups::default();
            let mut k = 0u64;
            while !done.load(Ordering::Relaxed) {
                k += 1;
                let (top, route) = if k.is_multiple_of(2) {
                    (accepted.load(Ordering::Relaxed), "status")
                } else {
                    (finished.load(Ordering::Relaxed), "result")
                };
                if top == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                let id = top - 1 - scatter(k, top.min(2_000));
                let path = match route {
                    "status" => format!("/v1/ferry/requests/soak{id}"),
                    _ => format!("/v1/ferry/requests/soak{id}/result"),
                };
                let phase = if draining.load(Ordering::Relaxed) {
                    "drain"
                } else {
                    "load"
                };
                let req = request(
                    "GET",
                    addr,
                    &path,
                    &[("authorization", &format!("Bearer {TENANT_KEY}"))],
                    Bytes::new(),
                );
                let res = send(&mut conn, addr, req).await;
                tally.record(phase, route, &path, res);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tally
        })
    };

    // Sampling, and the finished count the workers pace on.
    let mut samples: Vec<Sample> = Vec::new();
    let mut last_sample: Option<Instant> = None;
    let mut all_accepted: Option<f64> = None;
    let mut drain_deadline = None;
    loop {
        let acc = accepted.load(Ordering::Relaxed);
        let s = sample(started, acc, &fer, emu_pid, &data).await;
        finished.store(s.finished as u64, Ordering::Relaxed);
        let intake_over =
            issued.load(Ordering::Relaxed) >= n && workers.iter().all(|w| w.is_finished());
        if intake_over && all_accepted.is_none() {
            all_accepted = Some(s.secs);
            draining.store(true, Ordering::Relaxed);
            drain_deadline = Some(Instant::now() + Duration::from_secs(so.terminal_secs + 300));
            eprintln!("  all {acc} accepted after {:.1} s; draining", s.secs);
        }
        if last_sample.is_none_or(|t| t.elapsed() >= so.sample) || all_accepted == Some(s.secs) {
            last_sample = Some(Instant::now());
            eprintln!(
                "  {:>7.1} s  accepted {:>8}  finished {:>8}  purged {:>8}  data_dir {:>7.1} MiB  RSS {:>6.1} MiB",
                s.secs, s.accepted, s.finished, s.purged, s.data_mib, s.rss_mib
            );
            samples.push(s);
            if let Some(deadline) = drain_deadline {
                let acc = acc as f64;
                let settled = samples.len() >= 3
                    && samples[samples.len() - 3..]
                        .iter()
                        .all(|x| x.data_mib == s.data_mib);
                if s.finished >= acc && s.purged >= acc && settled {
                    break;
                }
                if Instant::now() >= deadline {
                    eprintln!(
                        "  !! drain not complete after {} s: finished {}, purged {} of {acc}",
                        so.terminal_secs + 300,
                        s.finished,
                        s.purged
                    );
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    done.store(true, Ordering::Relaxed);
    let lookups = lookups.await.expect("lookup task");
    let last = *samples.last().expect("at least one sample");
    let acc = accepted.load(Ordering::Relaxed);

    // Early ids must be gone (purged: 404), the last ones too by now.
    let client = http();
    let mut old_not_404 = 0u64;
    for k in 0..200u64 {
        let id = scatter(k, acc.max(1));
        let r = client
            .get(format!("http://{addr}/v1/ferry/requests/soak{id}"))
            .bearer_auth(TENANT_KEY)
            .send()
            .await
            .expect("lookup after the drain");
        if r.status() != 404 {
            old_not_404 += 1;
        }
    }

    let (fer, end_first, end_restart) = restarts(o, dir.path(), fer, "at the end").await;
    let after_restart = sample(started, acc, &fer, emu_pid, &data).await;

    // Files.
    let csv_path = out.join("soak.csv");
    let mut csv = String::from(CSV_HEADER);
    csv.push('\n');
    for s in &samples {
        csv.push_str(&s.csv());
        csv.push('\n');
    }
    std::fs::write(&csv_path, csv).expect("write soak.csv");
    let svg_path = out.join("soak.svg");
    std::fs::write(&svg_path, svg(&samples, n, so.terminal_secs)).expect("write soak.svg");
    eprintln!("  samples: {}", csv_path.display());
    eprintln!("  plot:    {}", svg_path.display());

    // Rows.
    let intake_secs = all_accepted.unwrap_or(last.secs);
    rows.add(
        FIGURE,
        format!(
            "{acc} deferred calls accepted (202), full cycle, terminal_secs = {}",
            so.terminal_secs
        ),
        acc as f64 / intake_secs,
        "req/s",
    );
    rows.target(
        FIGURE,
        "calls not answered 202",
        not_202.load(Ordering::Relaxed) as f64,
        "",
        Target::AtMost(0.0),
    );
    if let Some(e) = first_error.lock().expect("first error").as_ref() {
        eprintln!("  !! first call not answered 202: {e}");
    }
    for share in [0.25, 0.5, 0.75, 1.0] {
        let s = at_share(&samples, n, share);
        let pct = (share * 100.0) as u32;
        rows.add(
            FIGURE,
            format!("data_dir at {pct} % accepted"),
            s.map_or(f64::NAN, |s| s.data_mib),
            "MiB",
        );
        rows.add(
            FIGURE,
            format!("Ferry RSS at {pct} % accepted"),
            s.map_or(f64::NAN, |s| s.rss_mib),
            "MiB",
        );
    }
    let peak = |f: fn(&Sample) -> f64| samples.iter().map(f).fold(f64::NAN, f64::max);
    rows.add(FIGURE, "data_dir peak", peak(|s| s.data_mib), "MiB");
    rows.add(FIGURE, "Ferry RSS peak", peak(|s| s.rss_mib), "MiB");
    let ratio =
        |f: fn(&Sample) -> f64| match (at_share(&samples, n, 0.5), at_share(&samples, n, 1.0)) {
            (Some(a), Some(b)) => f(&b) / f(&a),
            _ => f64::NAN,
        };
    rows.target(
        FIGURE,
        "data_dir at 100 % / at 50 % (levels off: near 1)",
        ratio(|s| s.data_mib),
        "×",
        Target::AtMost(1.25),
    );
    rows.target(
        FIGURE,
        "Ferry RSS at 100 % / at 50 % (levels off: near 1)",
        ratio(|s| s.rss_mib),
        "×",
        Target::AtMost(1.25),
    );
    rows.add(FIGURE, "data_dir after the drain", last.data_mib, "MiB");
    rows.add(FIGURE, "Ferry RSS after the drain", last.rss_mib, "MiB");
    rows.add(
        FIGURE,
        "oldest terminal age, max while loading (purge lag if ≫ terminal_secs)",
        samples
            .iter()
            .filter(|s| s.accepted < acc)
            .map(|s| s.oldest_terminal_secs)
            .fold(f64::NAN, f64::max),
        "s",
    );
    rows.add(
        FIGURE,
        "drain: all accepted → all terminal and purged",
        last.secs - intake_secs,
        "s",
    );
    rows.add(FIGURE, "request rows purged", last.purged, "");
    rows.target(
        FIGURE,
        "early custom ids not answering 404 after the drain (of 200)",
        old_not_404 as f64,
        "",
        Target::AtMost(0.0),
    );
    eprintln!("  lookups (phase, route, status): {:?}", lookups.counts);
    if let Some(f) = &lookups.first_failure {
        eprintln!("  !! first lookup answered 5xx or failed: {f}");
    }
    rows.add(
        FIGURE,
        "lookups of recent ids, load and drain",
        lookups.counts.values().sum::<u64>() as f64,
        "",
    );
    // While loading, the ids looked up are recent: known (200), or a
    // result not in yet (202); never gone.
    rows.target(
        FIGURE,
        "lookups while loading answered other than 200/202",
        lookups.count("load", |s| s == 200 || s == 202) as f64,
        "",
        Target::AtMost(0.0),
    );
    // While draining, they are being purged: 404 is right, 5xx is not.
    rows.target(
        FIGURE,
        "lookups while draining answered other than 200/202/404",
        lookups.count("drain", |s| matches!(s, 200 | 202 | 404)) as f64,
        "",
        Target::AtMost(0.0),
    );
    rows.add(
        FIGURE,
        "emulator RSS at the end (not Ferry's)",
        last.emu_rss_mib,
        "MiB",
    );
    rows.add(
        FIGURE,
        "restart after SIGKILL → ready, empty store (median of 3)",
        empty_restart,
        "s",
    );
    rows.add(
        FIGURE,
        "restart after SIGKILL → ready, at the end (median of 3)",
        end_restart,
        "s",
    );
    rows.add(
        FIGURE,
        "restart after SIGKILL → ready, at the end, first",
        end_first,
        "s",
    );
    rows.target(
        FIGURE,
        "restart at the end / on the empty store (medians)",
        end_restart / empty_restart,
        "×",
        Target::AtMost(2.0),
    );
    rows.add(
        FIGURE,
        "data_dir after the restarts",
        after_restart.data_mib,
        "MiB",
    );
    drop(fer);
    drop(emu);
}

/// A hand-drawn SVG: data_dir and RSS (MiB) against the accepted count.
fn svg(samples: &[Sample], n: u64, terminal_secs: u64) -> String {
    let (w, h) = (900.0, 480.0);
    let (left, right, top, bottom) = (70.0, 30.0, 50.0, 60.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let xmax = samples.iter().map(|s| s.accepted).max().unwrap_or(n).max(1) as f64;
    let ymax_raw = samples
        .iter()
        .flat_map(|s| [s.data_mib, s.rss_mib])
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max);
    let ystep = nice_step(ymax_raw / 5.0);
    let ymax = (ymax_raw / ystep).ceil() * ystep;
    let xstep = nice_step(xmax / 5.0);
    let x = |v: f64| left + v / xmax * pw;
    let y = |v: f64| top + ph - v / ymax * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(s, r##"<rect width="{w}" height="{h}" fill="#fff"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="{}" y="22" font-size="15" text-anchor="middle">Ferry retention soak: {} deferred calls, terminal_secs = {terminal_secs} (sled)</text>"##,
        w / 2.0,
        fmt_count(n as f64)
    );
    // Grid and axes.
    let mut v = 0.0;
    while v <= ymax + ystep / 2.0 {
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            y(v) + 4.0,
            tick(v),
            y = y(v)
        );
        v += ystep;
    }
    let mut v = 0.0;
    while v <= xmax + xstep / 2.0 {
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{top}" y2="{}" stroke="#eee"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            top + ph,
            top + ph + 18.0,
            fmt_count(v),
            x = x(v)
        );
        v += xstep;
    }
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle">deferred calls accepted (the drain after the last one is the tail at the right edge)</text>"##,
        left + pw / 2.0,
        h - 15.0
    );
    let _ = writeln!(
        s,
        r##"<text transform="translate(18 {}) rotate(-90)" text-anchor="middle">MiB</text>"##,
        top + ph / 2.0
    );
    // Series.
    for (name, color, f) in [
        (
            "data_dir",
            "#1f77b4",
            (|s: &Sample| s.data_mib) as fn(&Sample) -> f64,
        ),
        ("Ferry RSS", "#ff7f0e", |s: &Sample| s.rss_mib),
    ] {
        let pts: Vec<String> = samples
            .iter()
            .filter(|p| f(p).is_finite())
            .map(|p| format!("{:.1},{:.1}", x(p.accepted as f64), y(f(p))))
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"><title>{name}</title></polyline>"##,
            pts.join(" ")
        );
    }
    // Legend.
    for (i, (name, color)) in [("data_dir size", "#1f77b4"), ("Ferry RSS", "#ff7f0e")]
        .iter()
        .enumerate()
    {
        let ly = top + 16.0 + i as f64 * 18.0;
        let _ = writeln!(
            s,
            r##"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{name}</text>"##,
            left + 12.0,
            left + 36.0,
            left + 42.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// 1, 2 or 5 × a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * p)
}

/// An axis label: 50, 2.5, 0.25 (no trailing zeros).
fn tick(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// 1500000 → "1.5M", 25000 → "25k".
fn fmt_count(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", tick(v / 1e6))
    } else if v >= 1e3 {
        format!("{}k", tick(v / 1e3))
    } else {
        tick(v)
    }
}
