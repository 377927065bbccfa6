//! Benchmark: snapq's queue engine vs apalis-sqlite with default settings, side by side, with
//! a no-op job, on temp dirs. Run with
//! `cargo bench -p snapq-jobs --bench queue_bench` (release profile).
//! `BENCH_APALIS_IDLE_SAMPLES` (default 2) sets how many ~30 s idle-start samples stock
//! apalis gets; `BENCH_OURS_ONLY=1` skips stock apalis (quick iterations).

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use apalis::prelude::*;
use apalis_sqlite::SqliteStorage;
use serde::{Deserialize, Serialize};
use snapq_jobs::{JobKind, JobState, NoopArgs, Queue, QueueConfig};
use sqlx::SqlitePool;
use tokio::sync::mpsc;

const CONCURRENCY: usize = 32;
const APALIS_CAP: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct BenchArgs {
    n: u64,
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn row(scenario: &str, ours: &str, apalis: &str) {
    println!("{scenario:<52} | {ours:<34} | {apalis}");
}

// ---- ours ------------------------------------------------------------------------------------

fn our_config() -> QueueConfig {
    QueueConfig {
        retention: None,
        ..QueueConfig::default()
    }
}

/// Insert `n` finished jobs directly, the way our engine leaves them (lock released).
async fn seed_finished_ours(path: &Path, n: u64) {
    let pool = SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query(
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < ?1)
         INSERT INTO Jobs (job, id, job_type, status, attempts, max_attempts, run_at, last_result,
                           lock_at, lock_by, done_at, priority, metadata, idempotency_key)
         SELECT CAST('{\"n\":0}' AS BLOB), printf('00000000000000%012d', i), ?2, 'Done', 1, 6,
                strftime('%s','now'), '{\"Ok\":null}', NULL, NULL, strftime('%s','now'), 0,
                '{\"requested_by\":\"bench\"}', NULL FROM c",
    )
    .bind(n as i64)
    .bind(JobKind::Noop.queue_name())
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
}

async fn ours_drain(dir: &Path, n: u64, history: u64) -> (Duration, Duration) {
    let path = dir.join("ours-drain.db");
    let q = Queue::open(&path, our_config()).await.unwrap();
    if history > 0 {
        seed_finished_ours(&path, history).await;
    }
    let args: Vec<NoopArgs> = (0..n).map(|n| NoopArgs { n }).collect();
    let t = Instant::now();
    q.enqueue_many(JobKind::Noop, &args, "bench").await.unwrap();
    let enqueue = t.elapsed();
    let mut events = q.events();
    let t = Instant::now();
    q.spawn_workers(JobKind::Noop, CONCURRENCY, |_: NoopArgs, _| async {
        Ok(())
    })
    .await
    .unwrap();
    let mut done = 0;
    while done < n {
        let e = events.recv().await.unwrap();
        if e.state == JobState::Done {
            done += 1;
        }
    }
    let drain = t.elapsed();
    q.shutdown(Duration::from_secs(5)).await.unwrap();
    (enqueue, drain)
}

async fn ours_sustained(dir: &Path, n: u64) -> (f64, Vec<Duration>) {
    let path = dir.join("ours-sustained.db");
    let q = Queue::open(&path, our_config()).await.unwrap();
    q.spawn_workers(JobKind::Noop, CONCURRENCY, |_: NoopArgs, _| async {
        Ok(())
    })
    .await
    .unwrap();
    let mut events = q.events();
    // Record done times by id; join with enqueue times at the end (no spinning on a 2-CPU box).
    let collector = tokio::spawn(async move {
        let mut done: HashMap<String, Instant> = HashMap::new();
        while (done.len() as u64) < n {
            let e = events.recv().await.unwrap();
            if e.state == JobState::Done {
                done.insert(e.id.to_string(), Instant::now());
            }
        }
        done
    });
    let t = Instant::now();
    let mut sent = Vec::with_capacity(n as usize);
    for i in 0..n {
        let t0 = Instant::now();
        let id = q.push(&NoopArgs { n: i }, "bench").await.unwrap();
        sent.push((id.to_string(), t0));
    }
    let done = collector.await.unwrap();
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let lat: Vec<Duration> = sent.iter().map(|(id, t0)| done[id] - *t0).collect();
    q.shutdown(Duration::from_secs(5)).await.unwrap();
    (rate, lat)
}

async fn ours_idle(dir: &Path, samples: usize, other: bool) -> Vec<Duration> {
    let path = dir.join(if other {
        "ours-idle-other.db"
    } else {
        "ours-idle.db"
    });
    let q = Queue::open(&path, our_config()).await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
    q.spawn_workers(JobKind::Noop, CONCURRENCY, move |_: NoopArgs, _| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(Instant::now());
            Ok(())
        }
    })
    .await
    .unwrap();
    let producer = if other {
        Queue::open(&path, our_config()).await.unwrap()
    } else {
        q.clone()
    };
    let mut out = Vec::new();
    for i in 0..samples {
        // idle, at a varying phase of the poll cycle
        tokio::time::sleep(Duration::from_millis(150 + (i as u64 * 7) % 40)).await;
        let t0 = Instant::now();
        producer.push(&NoopArgs { n: 0 }, "bench").await.unwrap();
        let started = rx.recv().await.unwrap();
        out.push(started - t0);
    }
    if other {
        producer.shutdown(Duration::from_secs(1)).await.unwrap();
    }
    q.shutdown(Duration::from_secs(1)).await.unwrap();
    out.sort();
    out
}

// ---- stock apalis-sqlite ---------------------------------------------------------------------

struct ApalisState {
    done: AtomicU64,
    target: u64,
    notify: tokio::sync::Notify,
    sent: Mutex<HashMap<u64, Instant>>,
    latencies: Mutex<Vec<Duration>>,
    starts: mpsc::UnboundedSender<Instant>,
}

async fn apalis_handler(args: BenchArgs, state: Data<Arc<ApalisState>>) -> Result<(), BoxDynError> {
    let _ = state.starts.send(Instant::now());
    if let Some(t0) = state.sent.lock().unwrap().remove(&args.n) {
        state.latencies.lock().unwrap().push(t0.elapsed());
    }
    if state.done.fetch_add(1, Ordering::SeqCst) + 1 >= state.target {
        state.notify.notify_one();
    }
    Ok(())
}

async fn apalis_pool(path: &Path) -> SqlitePool {
    let pool = SqlitePool::connect(&format!("sqlite://{}?mode=rwc", path.display()))
        .await
        .unwrap();
    SqliteStorage::setup(&pool).await.unwrap();
    pool
}

/// Run a stock worker (default `SqliteStorage::new`, concurrency set) until `stop` resolves.
fn apalis_worker(
    pool: &SqlitePool,
    state: Arc<ApalisState>,
) -> (tokio::task::JoinHandle<()>, Arc<tokio::sync::Notify>) {
    let storage = SqliteStorage::<BenchArgs>::new(pool);
    let stop = Arc::new(tokio::sync::Notify::new());
    let s = stop.clone();
    let worker = WorkerBuilder::new("bench-worker")
        .backend(storage)
        .data(state)
        .concurrency(CONCURRENCY)
        .build(apalis_handler);
    let handle = tokio::spawn(async move {
        let r = worker
            .run_with_ctx(move |ctx| {
                let s = s.clone();
                async move {
                    s.notified().await;
                    ctx.stop()?;
                    Ok(())
                }
            })
            .await;
        if let Err(e) = r {
            eprintln!("apalis worker ended: {e}");
        }
    });
    (handle, stop)
}

fn new_state(target: u64) -> (Arc<ApalisState>, mpsc::UnboundedReceiver<Instant>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Arc::new(ApalisState {
            done: AtomicU64::new(0),
            target,
            notify: tokio::sync::Notify::new(),
            sent: Mutex::default(),
            latencies: Mutex::default(),
            starts: tx,
        }),
        rx,
    )
}

/// 100k finished rows locked by the same worker name, as a long-running stock worker leaves them.
async fn seed_finished_apalis(pool: &SqlitePool, n: u64) {
    sqlx::query(
        "INSERT INTO Workers (id, worker_type, storage_name, layers, last_seen, started_at)
         VALUES ('bench-worker', ?1, 'SqliteStorage', '', 0, 0)",
    )
    .bind(std::any::type_name::<BenchArgs>())
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < ?1)
         INSERT INTO Jobs (job, id, job_type, status, attempts, max_attempts, run_at, last_result,
                           lock_at, lock_by, done_at, priority, metadata, idempotency_key)
         SELECT CAST('{\"n\":0}' AS BLOB), printf('00000000000000%012d', i), ?2, 'Done', 1, 25,
                strftime('%s','now'), '{\"Ok\":null}', strftime('%s','now'), 'bench-worker',
                strftime('%s','now'), 0, '{}', NULL FROM c",
    )
    .bind(n as i64)
    .bind(std::any::type_name::<BenchArgs>())
    .execute(pool)
    .await
    .unwrap();
}

async fn apalis_drain(dir: &Path, n: u64, history: u64) -> (u64, Duration) {
    let path = dir.join(format!("apalis-drain-{history}.db"));
    let pool = apalis_pool(&path).await;
    if history > 0 {
        seed_finished_apalis(&pool, history).await;
    }
    let mut storage = SqliteStorage::<BenchArgs>::new(&pool);
    storage
        .push_bulk((0..n).map(|n| BenchArgs { n }).collect())
        .await
        .unwrap();
    let (state, _rx) = new_state(n);
    let t = Instant::now();
    let (handle, stop) = apalis_worker(&pool, state.clone());
    let _ = tokio::time::timeout(APALIS_CAP, state.notify.notified()).await;
    let elapsed = t.elapsed();
    stop.notify_one();
    let _ = tokio::time::timeout(Duration::from_secs(5), handle).await;
    (state.done.load(Ordering::SeqCst), elapsed)
}

async fn apalis_sustained(dir: &Path, n: u64) -> (u64, Duration, Vec<Duration>) {
    let path = dir.join("apalis-sustained.db");
    let pool = apalis_pool(&path).await;
    let (state, _rx) = new_state(n);
    let (handle, stop) = apalis_worker(&pool, state.clone());
    let mut storage = SqliteStorage::<BenchArgs>::new(&pool);
    let t = Instant::now();
    let mut sent = 0;
    for i in 0..n {
        if t.elapsed() > APALIS_CAP {
            break;
        }
        state.sent.lock().unwrap().insert(i, Instant::now());
        storage.push(BenchArgs { n: i }).await.unwrap();
        sent += 1;
    }
    let left = APALIS_CAP.saturating_sub(t.elapsed()) + Duration::from_secs(1);
    let _ = tokio::time::timeout(left, state.notify.notified()).await;
    let elapsed = t.elapsed();
    stop.notify_one();
    let _ = tokio::time::timeout(Duration::from_secs(5), handle).await;
    let _ = sent;
    let mut lat = state.latencies.lock().unwrap().clone();
    lat.sort();
    (state.done.load(Ordering::SeqCst), elapsed, lat)
}

async fn apalis_idle(dir: &Path, samples: usize, other: bool) -> Vec<Option<Duration>> {
    let path = dir.join(if other {
        "apalis-idle-other.db"
    } else {
        "apalis-idle.db"
    });
    let pool = apalis_pool(&path).await;
    let (state, mut starts) = new_state(u64::MAX);
    let (handle, stop) = apalis_worker(&pool, state.clone());
    let producer_pool = if other {
        SqlitePool::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap()
    } else {
        pool.clone()
    };
    let mut storage = SqliteStorage::<BenchArgs>::new(&producer_pool);
    let mut out = Vec::new();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..samples {
        let t0 = Instant::now();
        storage
            .push(BenchArgs {
                n: 1_000_000 + i as u64,
            })
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(35), starts.recv()).await {
            Ok(Some(t)) => out.push(Some(t - t0)),
            _ => out.push(None),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.notify_one();
    let _ = tokio::time::timeout(Duration::from_secs(5), handle).await;
    out
}

fn fmt_idle(v: &[Option<Duration>]) -> String {
    v.iter()
        .map(|d| match d {
            Some(d) => format!("{:.1} s", d.as_secs_f64()),
            None => ">35 s".into(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let ours_only = std::env::var_os("BENCH_OURS_ONLY").is_some_and(|v| v != "0");
    let apalis_idle_samples: usize = std::env::var("BENCH_APALIS_IDLE_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    println!(
        "queue_bench: no-op jobs, concurrency {CONCURRENCY}, {} CPUs, temp dir {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        dir.path().display()
    );
    row("scenario", "snapq-jobs", "apalis-sqlite 1.0 defaults");
    println!("{}", "-".repeat(130));

    for (n, history) in [(10_000u64, 0u64), (10_000, 100_000)] {
        let (enq, drain) = ours_drain(dir.path(), n, history).await;
        let (done, elapsed) = if ours_only {
            (0, Duration::ZERO)
        } else {
            apalis_drain(dir.path(), n, history).await
        };
        let label = if history == 0 {
            format!("{n} enqueued at once, drained")
        } else {
            format!("{n} drained, {history} finished jobs in queue")
        };
        let ours = format!(
            "{:.0} jobs/s (enqueue {:.0} ms)",
            n as f64 / drain.as_secs_f64(),
            enq.as_secs_f64() * 1000.0
        );
        let theirs = if ours_only {
            "skipped".to_owned()
        } else if done >= n {
            format!("{:.0} jobs/s", n as f64 / elapsed.as_secs_f64())
        } else {
            format!(
                "did {done} jobs in {:.0} s ({:.0} jobs/s)",
                elapsed.as_secs_f64(),
                done as f64 / elapsed.as_secs_f64()
            )
        };
        row(&label, &ours, &theirs);
    }

    let n = 10_000;
    let (rate, mut lat) = ours_sustained(dir.path(), n).await;
    lat.sort();
    let (done, elapsed, alat) = if ours_only {
        (0, Duration::from_secs(1), Vec::new())
    } else {
        apalis_sustained(dir.path(), n).await
    };
    row(
        "one-at-a-time enqueue while workers run: rate",
        &format!("{rate:.0} jobs/s"),
        &format!(
            "{:.0} jobs/s ({done} done in {:.1} s)",
            done as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64()
        ),
    );
    row(
        "  enqueue→done latency p50 / p99",
        &format!("{} / {}", ms(pct(&lat, 0.5)), ms(pct(&lat, 0.99))),
        &format!(
            "{} / {} (→handler end)",
            ms(pct(&alat, 0.5)),
            ms(pct(&alat, 0.99))
        ),
    );

    for other in [false, true] {
        let samples = ours_idle(dir.path(), 50, other).await;
        let theirs = if ours_only {
            Vec::new()
        } else {
            apalis_idle(dir.path(), apalis_idle_samples, other).await
        };
        let label = if other {
            "idle-queue start, enqueued from another pool"
        } else {
            "idle-queue start, enqueued in-process"
        };
        row(
            &format!("{label} p50 / p99 / max"),
            &format!(
                "{} / {} / {}",
                ms(pct(&samples, 0.5)),
                ms(pct(&samples, 0.99)),
                ms(*samples.last().unwrap())
            ),
            &format!("samples: {}", fmt_idle(&theirs)),
        );
    }
}
