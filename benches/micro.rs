//! Micro-benchmarks of Ferry's hot pieces, each on the real code path:
//!
//! - `intake/validate_body`: a deferred body parsed, checked and re-serialised.
//! - `store/*`: `SledStore::insert_request` alone, and with `SledStore::commit` (one
//!   fsync per call when alone, one per group when 64 tasks enqueue at once).
//! - `jsonl/input_lines`: a claimed 1,000- and 10,000-line batch drained from a
//!   real sled store into JSONL chunks.
//! - `ingest/*`: one output line parsed, and 2,000 lines (Ferry's
//!   `OUTCOME_CHUNK`) parsed and stored with `SledStore::apply_outcomes`.
//! - `waiters/*`: 1,000 and 10,000 held callers woken.
//! - `census/*`: the retention census walking 100,000 requests' records and
//!   bodies (`SledStore::census_chunk`, 10,000 entries a call, as Ferry does).
//!
//! Stores live in a temporary directory under `target/` (`CARGO_TARGET_TMPDIR`),
//! on the same disk as a deployment's `data_dir`, so fsyncs are real.
//!
//! `cargo bench --bench micro` runs them all (about three minutes on two
//! cores); `cargo bench --bench micro -- store/` runs one group.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

use ferry::batch::ingest::parse_line;
use ferry::delivery::waiters::Waiters;
use ferry::intake::validate_body;
use ferry::store::{
    BatchRecord, Intake, Outcome, QueueKey, RequestRecord, SledStore, StoredResult, now_secs,
};
use ferry::upstream::profile::{ProviderKind, ProviderProfile};

const UPSTREAM: &str = "emu";
const MODEL: &str = "gpt-4o-mini";

/// A chat completion body of roughly `size` bytes.
fn chat_body(size: usize) -> Vec<u8> {
    let text: String = "lorem ipsum dolor sit amet "
        .chars()
        .cycle()
        .take(size.saturating_sub(120))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": text},
        ],
        "max_tokens": 64,
    }))
    .unwrap()
}

fn record(custom_id: String, body_len: usize) -> RequestRecord {
    RequestRecord::queued(
        "bench",
        &custom_id,
        UPSTREAM,
        MODEL,
        &"0".repeat(64),
        body_len as u64,
        now_secs(),
    )
}

fn temp_store() -> (tempfile::TempDir, Arc<SledStore>) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = Arc::new(SledStore::open(dir.path(), 64 << 20).unwrap());
    (dir, store)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn qk() -> QueueKey {
    QueueKey::chat(UPSTREAM, MODEL)
}

/// Inserts `n` requests with `body` and claims them as one batch.
fn claimed_batch(store: &SledStore, n: usize, body: &[u8], tag: &str) -> (BatchRecord, Vec<u64>) {
    for i in 0..n {
        let rec = record(format!("{tag}-{i}"), body.len());
        assert!(matches!(
            store.insert_request(rec, body).unwrap(),
            Intake::Created(_)
        ));
    }
    let batch = store
        .claim_batch(&qk(), n, u64::MAX / 2, "bench")
        .unwrap()
        .expect("a batch");
    let members: Vec<u64> = store.members(batch.id).map(Result::unwrap).collect();
    assert_eq!(members.len(), n);
    (batch, members)
}

fn bench_intake(c: &mut Criterion) {
    let profile = ProviderProfile::for_kind(ProviderKind::Openai);
    let profile_for = |_: &str| &profile;
    let mut g = c.benchmark_group("intake/validate_body");
    for size in [256usize, 1024, 16 * 1024] {
        let body = chat_body(size);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &body, |b, body| {
            b.iter(|| validate_body(black_box(body), &profile_for, false).unwrap())
        });
    }
    g.finish();
}

fn bench_store(c: &mut Criterion) {
    let rt = runtime();
    let body = chat_body(1024);
    let mut g = c.benchmark_group("store");
    let seq = AtomicU64::new(0);
    let next = || seq.fetch_add(1, Ordering::Relaxed);

    // The sled transaction alone (requests, bodies, custom_ids, queue).
    {
        let (_dir, store) = temp_store();
        g.throughput(Throughput::Elements(1));
        g.bench_function("insert_request", |b| {
            b.iter(|| {
                store
                    .insert_request(record(format!("i{}", next()), body.len()), &body)
                    .unwrap()
            })
        });
    }
    // One caller at a time: every commit is its own fsync.
    {
        let (_dir, store) = temp_store();
        g.throughput(Throughput::Elements(1));
        g.bench_function("insert_commit/1", |b| {
            b.iter(|| {
                rt.block_on(async {
                    store
                        .insert_request(record(format!("s{}", next()), body.len()), &body)
                        .unwrap();
                    store.commit().await.unwrap();
                })
            })
        });
    }
    // 64 callers at once: group commit shares fsyncs among them.
    {
        let tasks = 64u64;
        let (_dir, store) = temp_store();
        let body = Bytes::from(body.clone());
        g.throughput(Throughput::Elements(tasks));
        g.bench_function(BenchmarkId::new("insert_commit", tasks), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut handles = Vec::with_capacity(tasks as usize);
                    for _ in 0..tasks {
                        let store = store.clone();
                        let body = body.clone();
                        let cid = format!("c{}", next());
                        handles.push(tokio::spawn(async move {
                            store
                                .insert_request(record(cid, body.len()), &body)
                                .unwrap();
                            store.commit().await.unwrap();
                        }));
                    }
                    for h in handles {
                        h.await.unwrap();
                    }
                })
            })
        });
    }
    g.finish();
}

fn bench_jsonl(c: &mut Criterion) {
    let body = chat_body(1024);
    let mut g = c.benchmark_group("jsonl/input_lines");
    g.sample_size(20);
    for n in [1_000usize, 10_000] {
        let (_dir, store) = temp_store();
        let (batch, members) = claimed_batch(&store, n, &body, &format!("j{n}"));
        store.flush_blocking().unwrap();
        g.throughput(Throughput::Bytes(batch.bytes));
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                // The chunks `stream_batch` hands to the upload, read as it
                // reads them (its runtime hop aside).
                let (mut total, mut next) = (0u64, 0);
                while next < members.len() {
                    let (chunk, after) = store
                        .input_lines(
                            ferry::endpoint::Endpoint::ChatCompletions,
                            &members,
                            next,
                            256 * 1024,
                        )
                        .unwrap();
                    total += chunk.len() as u64;
                    next = after;
                }
                assert_eq!(total, batch.bytes);
                total
            })
        });
    }
    g.finish();
}

/// An output-file line as the Batch API writes it, with a ~1 KB completion.
fn output_line(id: u64) -> Vec<u8> {
    let content: String = "the answer is forty-two "
        .chars()
        .cycle()
        .take(900)
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "id": format!("batch_req_{id}"),
        "custom_id": format!("ferry-{id}"),
        "response": {
            "status_code": 200,
            "request_id": format!("req_{id}"),
            "body": {
                "id": format!("chatcmpl-{id}"),
                "object": "chat.completion",
                "created": 1_763_800_000,
                "model": MODEL,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }],
                "usage": {"prompt_tokens": 250, "completion_tokens": 220, "total_tokens": 470},
            },
        },
        "error": null,
    }))
    .unwrap()
}

fn no_payload(_: &RequestRecord, _: Option<&StoredResult>) -> String {
    String::new()
}

fn bench_ingest(c: &mut Criterion) {
    let mut g = c.benchmark_group("ingest");
    let line = output_line(123_456);
    g.throughput(Throughput::Bytes(line.len() as u64));
    g.bench_function("parse_line", |b| {
        b.iter(|| parse_line(black_box(&line)).unwrap())
    });

    // 2,000 lines parsed and stored, as `ingest_batch` does per chunk. Each
    // iteration gets a fresh submitted batch (setup is not timed).
    const CHUNK: usize = 2_000;
    let (_dir, store) = temp_store();
    let body = chat_body(1024);
    let round = AtomicU64::new(0);
    g.sample_size(10);
    g.throughput(Throughput::Elements(CHUNK as u64));
    g.bench_function("parse_and_apply_outcomes/2000", |b| {
        b.iter_batched(
            || {
                let tag = format!("a{}", round.fetch_add(1, Ordering::Relaxed));
                let (mut batch, members) = claimed_batch(&store, CHUNK, &body, &tag);
                store
                    .mark_submitted(&mut batch, "file-bench", "batch_bench")
                    .unwrap();
                let lines: Vec<Vec<u8>> = members.iter().map(|id| output_line(*id)).collect();
                (batch.id, lines)
            },
            |(batch, lines)| {
                let outcomes: Vec<(u64, Outcome)> =
                    lines.iter().map(|l| parse_line(l).unwrap()).collect();
                let done = store.apply_outcomes(batch, outcomes, &no_payload).unwrap();
                assert_eq!(done.len(), CHUNK);
                done
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn bench_waiters(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("waiters");
    g.sample_size(20);

    // One held caller: notify → the waiting task runs again.
    {
        let w = Arc::new(Waiters::new());
        g.throughput(Throughput::Elements(1));
        g.bench_function("wake_one", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for i in 0..iters {
                        // As in Ferry: the mark is taken before the
                        // caller registers, the new state is stored before
                        // `notify`; `is_done` is asked only when the kept
                        // notifications cannot tell.
                        let done = Arc::new(AtomicBool::new(false));
                        let (w2, d2, mark) = (w.clone(), done.clone(), w.mark());
                        let h = tokio::spawn(async move {
                            w2.wait(i, Duration::from_secs(60), mark, async {
                                d2.load(Ordering::SeqCst)
                            })
                            .await
                        });
                        while w.is_empty() {
                            tokio::task::yield_now().await;
                        }
                        let t = Instant::now();
                        done.store(true, Ordering::SeqCst);
                        w.notify(i);
                        assert!(h.await.unwrap().is_woken());
                        total += t.elapsed();
                    }
                    total
                })
            })
        });
    }

    // Many held callers, each on its own request, all woken (as when a batch
    // lands): from the first notify until every waiter has returned.
    for n in [1_000u64, 10_000] {
        let w = Arc::new(Waiters::new());
        g.throughput(Throughput::Elements(n));
        g.bench_function(BenchmarkId::new("wake_all", n), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let done = Arc::new(AtomicBool::new(false));
                        let handles: Vec<_> = (0..n)
                            .map(|id| {
                                let (w, done, mark) = (w.clone(), done.clone(), w.mark());
                                tokio::spawn(async move {
                                    w.wait(id, Duration::from_secs(60), mark, async {
                                        done.load(Ordering::SeqCst)
                                    })
                                    .await
                                })
                            })
                            .collect();
                        while (w.len() as u64) < n {
                            tokio::time::sleep(Duration::from_micros(200)).await;
                        }
                        let t = Instant::now();
                        done.store(true, Ordering::SeqCst);
                        for id in 0..n {
                            w.notify(id);
                        }
                        for h in handles {
                            assert!(h.await.unwrap().is_woken());
                        }
                        total += t.elapsed();
                    }
                    total
                })
            })
        });
    }
    g.finish();
}

fn bench_census(c: &mut Criterion) {
    use ferry::store::census::Kind;
    const N: usize = 100_000;
    let body = chat_body(1024);
    let (_dir, store) = temp_store();
    for i in 0..N {
        store
            .insert_request(record(format!("n{i}"), body.len()), &body)
            .unwrap();
    }
    let mut g = c.benchmark_group("census");
    g.throughput(Throughput::Elements(N as u64));
    for kind in [Kind::Request, Kind::Body] {
        g.bench_function(kind.as_str(), |b| {
            b.iter(|| {
                let (mut rows, mut after) = (0, None);
                loop {
                    let (tally, next) = store.census_chunk(kind, after, 10_000).unwrap();
                    rows += tally.rows;
                    match next {
                        Some(k) => after = Some(k),
                        None => break,
                    }
                }
                assert_eq!(rows, N as u64);
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_intake, bench_store, bench_jsonl, bench_ingest, bench_waiters, bench_census
}
criterion_main!(benches);
