//! Benchmark: the queue with three nodes (three `Queue`s, each with its own pools and workers)
//! on one database, SQLite file and PostgreSQL side by side in the same run, no-op jobs.
//! Run with `cargo bench -p snapq-jobs --bench queue_nodes_bench`; PostgreSQL comes from
//! `SNAPQ_TEST_DATABASE_URL` (a fresh schema per scenario), else its columns say skipped.
//! PostgreSQL runs twice: with the server's synchronous commit (each commit waits for a disk
//! flush), and with `QueueConfig::pg_async_commit` (the durability of SQLite's
//! `synchronous = NORMAL`, which the SQLite column uses).
//!
//! Scenarios (issue 11's targets in brackets):
//! - 10,000 jobs enqueued at once, then drained by three nodes [≥ 5,000 jobs/s];
//! - one-at-a-time enqueues from one node while the three nodes work [≥ 2,000 jobs/s];
//! - a job enqueued on a node without workers into an idle queue starts on another node
//!   [p99 ≤ 50 ms].

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use snapq_jobs::{JobKind, NoopArgs, Queue, QueueConfig};
use tokio::sync::{Notify, mpsc};

const NODES: usize = 3;
const CONCURRENCY: usize = 32;

fn config() -> QueueConfig {
    QueueConfig {
        retention: None,
        ..QueueConfig::default()
    }
}

/// Where the nodes' shared queue lives.
enum Store {
    Sqlite(std::path::PathBuf),
    Postgres { url: String, async_commit: bool },
}

impl Store {
    async fn open(&self) -> Queue {
        match self {
            Store::Sqlite(path) => Queue::open(path, config()).await.unwrap(),
            Store::Postgres { url, async_commit } => {
                let config = QueueConfig {
                    pg_async_commit: *async_commit,
                    ..config()
                };
                Queue::open_postgres(url, config).await.unwrap()
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres { async_commit: bool },
}

/// A fresh store for one scenario, or the reason when there is no PostgreSQL.
async fn store(backend: Backend, dir: &std::path::Path, name: &str) -> Result<Store, String> {
    match backend {
        Backend::Sqlite => Ok(Store::Sqlite(dir.join(format!("{name}.db")))),
        Backend::Postgres { async_commit } => {
            let db = snapq_testpg::schema().await?;
            Ok(Store::Postgres {
                url: db.url,
                async_commit,
            })
        }
    }
}

/// Three nodes with no-op workers; `done` counts finished jobs across them.
async fn nodes(store: &Store, done: &Arc<(AtomicU64, Notify)>, target: u64) -> Vec<Queue> {
    let mut out = Vec::new();
    for _ in 0..NODES {
        let q = store.open().await;
        let done = done.clone();
        q.spawn_workers(JobKind::Noop, CONCURRENCY, move |_: NoopArgs, _| {
            let done = done.clone();
            async move {
                if done.0.fetch_add(1, Ordering::SeqCst) + 1 >= target {
                    done.1.notify_one();
                }
                Ok(())
            }
        })
        .await
        .unwrap();
        out.push(q);
    }
    out
}

async fn wait_done(done: &Arc<(AtomicU64, Notify)>, target: u64) {
    while done.0.load(Ordering::SeqCst) < target {
        let _ = tokio::time::timeout(Duration::from_millis(50), done.1.notified()).await;
    }
}

async fn shutdown(nodes: Vec<Queue>) {
    for q in nodes {
        q.shutdown(Duration::from_secs(5)).await.unwrap();
    }
}

/// 10,000 enqueued at once on one node (no workers yet), then drained by three nodes.
async fn drain(store: &Store, n: u64) -> String {
    let producer = store.open().await;
    let args: Vec<NoopArgs> = (0..n).map(|n| NoopArgs { n }).collect();
    let t = Instant::now();
    producer
        .enqueue_many(JobKind::Noop, &args, "bench")
        .await
        .unwrap();
    let enqueue = t.elapsed();
    let done = Arc::new((AtomicU64::new(0), Notify::new()));
    let t = Instant::now();
    let nodes = nodes(store, &done, n).await;
    wait_done(&done, n).await;
    let drain = t.elapsed();
    shutdown(nodes).await;
    producer.shutdown(Duration::from_secs(1)).await.unwrap();
    format!(
        "{:.0} jobs/s (enqueue {:.0} ms)",
        n as f64 / drain.as_secs_f64(),
        enqueue.as_secs_f64() * 1000.0
    )
}

/// One job per call from one node while three nodes work; the rate counts until all are done.
async fn one_at_a_time(store: &Store, n: u64) -> String {
    let done = Arc::new((AtomicU64::new(0), Notify::new()));
    let nodes = nodes(store, &done, n).await;
    let t = Instant::now();
    for i in 0..n {
        nodes[0].push(&NoopArgs { n: i }, "bench").await.unwrap();
    }
    let enqueued = t.elapsed();
    wait_done(&done, n).await;
    let all = t.elapsed();
    shutdown(nodes).await;
    format!(
        "{:.0} jobs/s ({:.0} enqueues/s)",
        n as f64 / all.as_secs_f64(),
        n as f64 / enqueued.as_secs_f64()
    )
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// A job enqueued on a node without workers into an idle queue, started on another node.
async fn idle_start_elsewhere(store: &Store, samples: usize) -> String {
    let producer = store.open().await;
    let worker = store.open().await;
    let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
    worker
        .spawn_workers(JobKind::Noop, CONCURRENCY, move |_: NoopArgs, _| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(Instant::now());
                Ok(())
            }
        })
        .await
        .unwrap();
    let mut lat = Vec::new();
    for i in 0..samples {
        // idle, at a varying phase of the poll cycle
        tokio::time::sleep(Duration::from_millis(60 + (i as u64 * 7) % 40)).await;
        let t0 = Instant::now();
        producer.push(&NoopArgs { n: 0 }, "bench").await.unwrap();
        let started = rx.recv().await.unwrap();
        lat.push(started - t0);
    }
    worker.shutdown(Duration::from_secs(1)).await.unwrap();
    producer.shutdown(Duration::from_secs(1)).await.unwrap();
    lat.sort();
    format!(
        "{} / {} / {}",
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99)),
        ms(*lat.last().unwrap())
    )
}

fn row(cells: &[&str]) {
    println!(
        "{:<58} | {:<34} | {:<34} | {}",
        cells[0], cells[1], cells[2], cells[3]
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    println!(
        "queue_nodes_bench: no-op jobs, {NODES} nodes x {CONCURRENCY} workers, {} CPUs",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
    );
    row(&[
        "scenario (target on PostgreSQL)",
        "SQLite (one file)",
        "PostgreSQL, synchronous commit",
        "PostgreSQL, pg_async_commit",
    ]);
    println!("{}", "-".repeat(170));
    let mut skipped = None;
    type Scenario = for<'a> fn(&'a Store) -> futures::future::BoxFuture<'a, String>;
    let scenarios: [(&str, &str, Scenario); 3] = [
        (
            "10,000 enqueued at once, drained by 3 nodes (>= 5,000/s)",
            "drain",
            |s| Box::pin(drain(s, 10_000)),
        ),
        (
            "2,000 one-at-a-time enqueues, 3 nodes (>= 2,000/s)",
            "one",
            |s| Box::pin(one_at_a_time(s, 2_000)),
        ),
        (
            "idle start on another node p50 / p99 / max (p99 <= 50 ms)",
            "idle",
            |s| Box::pin(idle_start_elsewhere(s, 200)),
        ),
    ];
    let backends = [
        Backend::Sqlite,
        Backend::Postgres {
            async_commit: false,
        },
        Backend::Postgres { async_commit: true },
    ];
    for (label, name, run) in scenarios {
        let mut cells = vec![label.to_owned()];
        for backend in backends {
            cells.push(match store(backend, dir.path(), name).await {
                Ok(s) => run(&s).await,
                Err(why) => {
                    skipped = Some(why);
                    "skipped".to_owned()
                }
            });
        }
        row(&cells.iter().map(String::as_str).collect::<Vec<_>>());
    }
    if let Some(why) = skipped {
        println!("PostgreSQL skipped: {why}");
    }
}
