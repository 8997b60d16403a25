//! Cost per deferred call, end to end (issue #18, figure E): N deferred
//! calls through the whole cycle — intake, batch, upstream, ingestion,
//! answer — and what they cost Ferry's process in CPU, beside passthrough
//! calls on the same stack as the reference.
//!
//! ```sh
//! cargo bench --bench load -- --only e2e
//! ```
//!
//! The run shape is the issue's: `FERRY_BENCH_E2E_CALLS` calls (default
//! 3,000), 300 at a time, one model, `max_requests = 1000`,
//! `max_wait_secs = 2`, `poll_interval_secs = 1`, a standalone `ferry
//! emulator` as the upstream (its CPU is its own process's, not Ferry's).
//! Four cases, each on a fresh stack:
//!
//! - **held**: `Prefer: respond-async, wait=600`; the connection is held
//!   until the result is stored and the upstream's body comes back (200).
//! - **ticket + lookup**: `Prefer: respond-async` answers 202 at once;
//!   then the caller long-polls `GET /v1/ferry/requests/{id}/result?wait=600`
//!   until the result (200). Two HTTP exchanges per call.
//! - **one exchange, nothing stored** (floor): `GET /healthz`, answered
//!   by Ferry itself; a held call is one exchange, a ticket + lookup two.
//! - **passthrough** (reference): the same number of ordinary calls
//!   relayed to the emulator's real-time route, same concurrency.
//!
//! Reported per case: Ferry's CPU per call (user + system from
//! `/proc/<pid>/stat`, before and after the calls), wall time, peak RSS
//! (`VmHWM`, reset before), and the CPU split by thread name
//! (`/proc/<pid>/task/*/stat`, digits stripped so that a pool is one line).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use super::{
    MODEL, MakeReq, Opts, Proc, Rows, Stop, TENANT_KEY, chat_body, closed_loop, cpu_secs,
    deferred_req, mem_mib, request, reset_peak, stack, stat_ticks_by_thread, workdir,
};

/// Callers at once, as in the issue's run.
const CONCURRENCY: usize = 300;
const FIGURE: &str = "E cost per deferred call, end to end";
/// Flush thresholds of the issue's run.
const UPSTREAM: &str =
    "max_requests = 1000\nmax_wait_secs = 2\npoll_interval_secs = 1\ncalls_per_second = 1000";

pub async fn e2e(o: &Opts, rows: &mut Rows) {
    let n: u64 = std::env::var("FERRY_BENCH_E2E_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000);
    eprintln!("== {FIGURE}: {n} calls, {CONCURRENCY} at a time");
    let body = chat_body(MODEL, 300);

    // Held: one exchange per call, answered 200 with the result.
    {
        let dir = workdir();
        let (_emu, fer) = stack(o, dir.path(), &[], "", UPSTREAM);
        let addr = fer.addr("proxy");
        let body = body.clone();
        let make: MakeReq = Arc::new(move |i| {
            deferred_req(
                addr,
                body.clone(),
                &format!("held{i}"),
                "respond-async, wait=600",
            )
        });
        measure(rows, &fer, "held (respond-async, wait=600)", n, || async {
            let l = closed_loop(addr, CONCURRENCY, Stop::Count(n), make).await;
            l.check("held calls", 200);
        })
        .await;
    }

    // Ticket + lookup: 202 at once, then a long-polled /result.
    {
        let dir = workdir();
        let (_emu, fer) = stack(o, dir.path(), &[], "", UPSTREAM);
        let addr = fer.addr("proxy");
        let body = body.clone();
        let tickets: MakeReq = Arc::new(move |i| {
            deferred_req(addr, body.clone(), &format!("ticket{i}"), "respond-async")
        });
        let lookups: MakeReq = Arc::new(move |i| {
            request(
                "GET",
                addr,
                &format!("/v1/ferry/requests/ticket{i}/result?wait=600"),
                &[("authorization", &format!("Bearer {TENANT_KEY}"))],
                bytes::Bytes::new(),
            )
        });
        // The 202s' share: Ferry's CPU up to the last ticket (the batches
        // that fill meanwhile are flushed in it too).
        let tickets_cpu = std::cell::Cell::new(0.0);
        let pid = fer.pid();
        measure(
            rows,
            &fer,
            "ticket + lookup (202, then /result?wait=600)",
            n,
            || async {
                let before = cpu_secs(pid, false);
                let t = closed_loop(addr, CONCURRENCY, Stop::Count(n), tickets).await;
                tickets_cpu.set(cpu_secs(pid, false) - before);
                t.check("tickets", 202);
                let l = closed_loop(addr, CONCURRENCY, Stop::Count(n), lookups).await;
                l.check("lookups", 200);
            },
        )
        .await;
        rows.add(
            FIGURE,
            "ticket + lookup: of it, up to the last 202",
            tickets_cpu.get() / n as f64 * 1e6,
            "µs",
        );
    }

    // The floor under both: one exchange that Ferry answers itself and
    // that stores nothing. A deferred call is one such exchange (held) or
    // two (ticket + lookup) plus its share of the batch.
    {
        let dir = workdir();
        let (_emu, fer) = stack(o, dir.path(), &[], "", UPSTREAM);
        let addr = fer.addr("proxy");
        let make: MakeReq =
            Arc::new(move |_| request("GET", addr, "/healthz", &[], bytes::Bytes::new()));
        measure(
            rows,
            &fer,
            "one exchange, nothing stored (GET /healthz)",
            n,
            || async {
                let l = closed_loop(addr, CONCURRENCY, Stop::Count(n), make).await;
                l.check("healthz", 200);
            },
        )
        .await;
    }

    // The reference: ordinary calls relayed to the same kind of upstream.
    {
        let dir = workdir();
        let (_emu, fer) = stack(o, dir.path(), &[], "", UPSTREAM);
        let addr = fer.addr("proxy");
        let body = body.clone();
        let make: MakeReq = Arc::new(move |_| {
            request(
                "POST",
                addr,
                "/v1/chat/completions",
                &[("authorization", &format!("Bearer {TENANT_KEY}"))],
                body.clone(),
            )
        });
        measure(rows, &fer, "passthrough (reference)", n, || async {
            let l = closed_loop(addr, CONCURRENCY, Stop::Count(n), make).await;
            l.check("passthrough", 200);
        })
        .await;
    }
}

/// Runs `calls` and reports Ferry's CPU per call, wall time, peak RSS and
/// the CPU split by thread over them.
async fn measure<F, Fut>(rows: &mut Rows, fer: &Proc, case: &str, n: u64, calls: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let pid = fer.pid();
    reset_peak(pid);
    let threads_before = stat_ticks_by_thread(pid);
    let cpu_before = cpu_secs(pid, false);
    let started = Instant::now();
    calls().await;
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid, false) - cpu_before;
    let threads = split(&threads_before, &stat_ticks_by_thread(pid));
    rows.add(
        FIGURE,
        format!("{case}: Ferry CPU per call"),
        cpu / n as f64 * 1e6,
        "µs",
    );
    rows.add(FIGURE, format!("{case}: wall time"), wall, "s");
    rows.add(
        FIGURE,
        format!("{case}: Ferry peak RSS"),
        mem_mib(pid, "VmHWM"),
        "MiB",
    );
    let total: f64 = threads.values().sum();
    let mut by_share: Vec<_> = threads.into_iter().collect();
    by_share.sort_by(|a, b| b.1.total_cmp(&a.1));
    let shares: Vec<String> = by_share
        .iter()
        .take(6)
        .map(|(name, secs)| format!("{name} {:.0} %", secs / total.max(1e-9) * 100.0))
        .collect();
    eprintln!("  {case}: CPU by thread: {}", shares.join(", "));
}

/// CPU seconds per thread name between two readings.
fn split(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(name, secs)| {
            (
                name.clone(),
                secs - before.get(name).copied().unwrap_or(0.0),
            )
        })
        .filter(|(_, secs)| *secs > 0.0)
        .collect()
}
