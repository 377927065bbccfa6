//! `Queue`: opening `queue.db` (or a PostgreSQL database), typed enqueue over one transport,
//! and the operations the CLI and HTTP layer need (status, list, show, retry, cancel, prune,
//! shutdown), the same on both backends.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{ColumnIndex, Decode, Row, Type};
use tokio::{
    sync::{Notify, broadcast, mpsc, oneshot, watch},
    task::JoinHandle,
};

use crate::{
    EnqueueOptions, Enqueued, JobArgs, JobDetail, JobEvent, JobId, JobInfo, JobKind, JobState,
    KindStatus, ListFilter, LocalWorkers, QueueError, QueueStatus, RetryPolicy, TerminalJob,
    WorkerInfo,
    db::{self, Conn, Reader, Side, now_ms},
    model::{AttemptInfo, AttemptOutcome, Progress},
    sql,
    worker::{self, CommitMsg, KindWorkers, RunningEntry},
};

/// Tunables of the queue engine. Defaults suit the server; tests shorten the timings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueConfig {
    pub retry: RetryPolicy,
    /// How long a writer waits for SQLite's lock before failing with `database is locked`
    /// (SQLite only).
    pub busy_timeout: Duration,
    /// How often an idle queue checks whether another process changed the file
    /// (`PRAGMA data_version`, no table access). Enqueues from this process wake workers at once.
    /// On PostgreSQL other nodes' jobs arrive by `NOTIFY`, and this is how often a node asks
    /// whether a job is due anyway: the most a lost notification delays a job.
    pub poll_interval: Duration,
    /// Longest an idle fetcher sleeps without looking at the table (safety net).
    pub idle_recheck: Duration,
    /// How often workers record that they are alive and look for orphaned jobs.
    pub heartbeat_interval: Duration,
    /// A worker silent for this long is dead; its running jobs are re-queued.
    pub orphan_after: Duration,
    /// Most jobs claimed in one query (never more than free worker slots).
    pub claim_batch: usize,
    /// Upper bound for `spawn_workers` concurrency.
    pub max_concurrency: usize,
    /// How long a cancelled job's handler may take to stop before it is dropped.
    pub cancel_grace: Duration,
    /// Finished jobs older than this are deleted by a background task (None: keep them).
    pub retention: Option<Duration>,
    /// How often the retention task runs.
    pub prune_interval: Duration,
    /// PostgreSQL only: commit the queue's changes without waiting for the server to flush
    /// them to disk (`synchronous_commit = off` on the queue's connections). A single commit
    /// then costs a round trip instead of a disk flush: on the 2-core bench machine under load,
    /// one-at-a-time enqueues went from 147–1,094/s to 1,896–2,946/s over three
    /// runs of `queue_nodes_bench`.
    /// What it risks is what SQLite's `synchronous = NORMAL` risks: a crash of the database
    /// server or of the machine under it (never of a snapq node) may lose the last fraction of
    /// a second of queue changes; nothing is corrupted. Off by default: the server's own
    /// setting applies.
    #[serde(default)]
    pub pg_async_commit: bool,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            busy_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(20),
            idle_recheck: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(5),
            orphan_after: Duration::from_secs(30),
            claim_batch: 64,
            max_concurrency: 1024,
            cancel_grace: Duration::from_secs(10),
            retention: Some(Duration::from_secs(30 * 24 * 3600)),
            prune_interval: Duration::from_secs(3600),
            pg_async_commit: false,
        }
    }
}

impl QueueConfig {
    fn validate(&self) -> Result<(), QueueError> {
        self.retry.validate().map_err(QueueError::Config)?;
        let err = |m: &str| Err(QueueError::Config(m.to_owned()));
        if self.claim_batch == 0 {
            return err("claim_batch must be at least 1");
        }
        if self.max_concurrency == 0 {
            return err("max_concurrency must be at least 1");
        }
        if self.poll_interval.is_zero() || self.heartbeat_interval.is_zero() {
            return err("poll_interval and heartbeat_interval must be positive");
        }
        if self.orphan_after < self.heartbeat_interval * 2 {
            return err("orphan_after must be at least twice heartbeat_interval");
        }
        Ok(())
    }
}

/// What `cancel` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelOutcome {
    /// The job was waiting (pending or retrying) and is now cancelled.
    Cancelled,
    /// The job is running; its handler was told to stop and the job ends `cancelled`.
    Requested,
}

/// What `shutdown` did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ShutdownReport {
    /// Jobs that finished within the grace period.
    pub finished_in_grace: usize,
    /// Jobs still running at the deadline: stopped and put back to pending for the next start.
    pub released: usize,
}

pub(crate) struct Shared {
    /// The SQLite file (empty on PostgreSQL).
    pub(crate) path: PathBuf,
    /// The file, or the PostgreSQL URL (password hidden) and schema: for logs and `Debug`.
    pub(crate) location: String,
    /// The PostgreSQL schema holding the tables (empty on SQLite): notifications name it.
    pub(crate) pg_schema: String,
    pub(crate) config: QueueConfig,
    pub(crate) writer: db::Writer,
    pub(crate) reader: Reader,
    /// This queue instance (one per `Queue::open`): worker ids derive from it.
    pub(crate) instance: String,
    pub(crate) hostname: String,
    /// One per kind, indexed by `JobKind::index`: wakes that kind's fetcher.
    pub(crate) notify: Vec<Notify>,
    pub(crate) kinds: Mutex<HashMap<JobKind, Arc<KindWorkers>>>,
    pub(crate) running: Mutex<HashMap<JobId, RunningEntry>>,
    pub(crate) running_count: watch::Sender<usize>,
    /// Stop claiming work.
    pub(crate) shutdown: watch::Sender<bool>,
    /// Stop running handlers now (the grace period ran out).
    pub(crate) hard_stop: watch::Sender<bool>,
    pub(crate) commit_tx: mpsc::UnboundedSender<CommitMsg>,
    pub(crate) commit_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<CommitMsg>>,
    pub(crate) events: broadcast::Sender<JobEvent>,
    pub(crate) tasks: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) closed: AtomicBool,
    /// Wakes the terminal-outcome dispatcher (see `Queue::on_terminal`).
    pub(crate) terminal_notify: Notify,
    pub(crate) terminal_hook: Mutex<Option<TerminalHook>>,
}

/// Called once for every job that ends dead or cancelled, whatever ended it; `Err` means
/// "not recorded yet": the same job is offered again later (also after a restart).
pub type TerminalHook = Arc<
    dyn Fn(TerminalJob) -> futures::future::BoxFuture<'static, Result<(), String>> + Send + Sync,
>;

impl Shared {
    pub(crate) fn notify_kind(&self, kind: JobKind) {
        self.notify[kind.index()].notify_one();
    }
}

/// Aborts every task of the queue when the last `Queue` handle goes away without `shutdown`:
/// to the database this looks exactly like a crash, and the jobs are resumed after re-open.
struct DropGuard(Arc<Shared>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        for t in self.0.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
        for (_, entry) in self.0.running.lock().unwrap().drain() {
            entry.abort();
        }
    }
}

/// The durable job queue in `queue.db`. Cheap to clone; all clones share workers and pools.
#[derive(Clone)]
pub struct Queue {
    pub(crate) shared: Arc<Shared>,
    _guard: Arc<DropGuard>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("location", &self.shared.location)
            .field("instance", &self.shared.instance)
            .finish()
    }
}

/// attempt, worker, started (ms), finished (ms), outcome, error
type AttemptRow = (
    i64,
    String,
    i64,
    Option<i64>,
    Option<String>,
    Option<String>,
);

fn hostname() -> String {
    for p in ["/proc/sys/kernel/hostname", "/etc/hostname"] {
        if let Ok(s) = std::fs::read_to_string(p) {
            let s = s.trim();
            if !s.is_empty() {
                return s.to_owned();
            }
        }
    }
    std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into())
}

pub(crate) fn ms_to_time(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single()
}

pub(crate) fn last_error(last_result: Option<&str>) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(last_result?).ok()?;
    match v.get("Err")? {
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

pub(crate) fn requested_by(metadata: Option<&str>) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(metadata?).ok()?;
    v.get("requested_by")?.as_str().map(str::to_owned)
}

pub(crate) fn job_metadata(requested_by: &str) -> String {
    serde_json::json!({ "requested_by": requested_by }).to_string()
}

/// Reads a row of `sql::SHOW_JOB` / `sql::LIST_JOBS` (or their PostgreSQL twins).
fn job_from_row<R: Row>(row: &R) -> Result<JobInfo, sqlx::Error>
where
    usize: ColumnIndex<R>,
    String: for<'r> Decode<'r, R::Database> + Type<R::Database>,
    Vec<u8>: for<'r> Decode<'r, R::Database> + Type<R::Database>,
    i64: for<'r> Decode<'r, R::Database> + Type<R::Database>,
{
    let id: String = row.try_get(0)?;
    let job_type: String = row.try_get(1)?;
    let args: Vec<u8> = row.try_get(2)?;
    let state = JobState::parse(row.try_get::<String, _>(3)?.as_str());
    let run_at_s: i64 = row.try_get(8)?;
    let done_at_s: Option<i64> = row.try_get(9)?;
    let last_result: Option<String> = row.try_get(10)?;
    let metadata: Option<String> = row.try_get(12)?;
    let progress_done: Option<i64> = row.try_get(13)?;
    let progress_total: Option<i64> = row.try_get(14)?;
    let progress_note: Option<String> = row.try_get(15)?;
    let progress_ms: Option<i64> = row.try_get(16)?;
    let next_run_ms: Option<i64> = row.try_get(17)?;
    let cancel_requested_ms: Option<i64> = row.try_get(18)?;
    let started_ms: Option<i64> = row.try_get(19)?;
    let finished_ms: Option<i64> = row.try_get(20)?;
    let id = JobId::from(id);
    let run_at = match (state, next_run_ms) {
        (JobState::Retrying, Some(ms)) => ms_to_time(ms),
        (JobState::Pending | JobState::Retrying, _) => ms_to_time(run_at_s * 1000),
        _ => None,
    };
    let finished_at = if state.is_finished() {
        finished_ms
            .or(done_at_s.map(|s| s * 1000))
            .and_then(ms_to_time)
    } else {
        None
    };
    Ok(JobInfo {
        created_at: id.created_at(),
        kind: JobKind::from_queue_name(&job_type)
            .map(|k| k.as_str().to_owned())
            .unwrap_or(job_type),
        id,
        state,
        args: serde_json::from_slice(&args)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&args).into())),
        requested_by: requested_by(metadata.as_deref()),
        attempts: row.try_get::<i64, _>(4)?.max(0) as u32,
        max_attempts: row.try_get::<i64, _>(5)?.max(0) as u32,
        priority: row.try_get(6)?,
        idempotency_key: row.try_get(7)?,
        run_at,
        started_at: started_ms.and_then(ms_to_time),
        finished_at,
        last_error: if state == JobState::Done {
            None
        } else {
            last_error(last_result.as_deref())
        },
        locked_by: row.try_get(11)?,
        progress: match (progress_done, progress_total) {
            (Some(done), Some(total)) => Some(Progress {
                done: done.max(0) as u64,
                total: total.max(0) as u64,
                note: progress_note,
                updated_at: progress_ms.and_then(ms_to_time).unwrap_or_else(Utc::now),
            }),
            _ => None,
        },
        cancel_requested: cancel_requested_ms.is_some(),
    })
}

/// One plain job to insert (see `enqueue_one`).
struct OneJob {
    kind: JobKind,
    id: JobId,
    bytes: Vec<u8>,
    max: i64,
    run_at: i64,
    priority: i64,
    metadata: String,
    requested_by: String,
}

/// Inserts one plain job: a single autocommit INSERT (one round trip instead of three), which
/// also claims it and starts its handler here when a local worker has a free slot and the job
/// is due (no separate claim, no wake-up of the fetcher). Runs in a task of its own, so the
/// claim and the start are never separated by a dropped caller.
async fn enqueue_one(shared: Arc<Shared>, job: OneJob, now_s: i64) -> Result<(), QueueError> {
    let OneJob {
        kind,
        id,
        bytes,
        max,
        run_at,
        priority,
        metadata,
        requested_by,
    } = job;
    let mut w = shared.writer.lock().await?;
    // Taken after the writer so a fetcher that is about to claim keeps its slots.
    if run_at <= now_s
        && let Some((kw, permit)) = worker::free_slot(&shared, kind)
    {
        let status: String = run!(query_scalar.fetch_one w.conn(), INSERT_JOB_CLAIMED,
            &bytes,
            id.as_str(),
            kind.queue_name(),
            max,
            run_at,
            priority,
            &metadata,
            &kw.worker_id,
            now_ms(),
        )?;
        if status == "Running" {
            // Registered as running before the writer is released, so a cancel that
            // follows finds the handler, and a shutdown that follows waits for it.
            let job = worker::Claimed {
                due_ms: now_ms(),
                id,
                args: bytes,
                attempt: 1,
                max_attempts: max.max(1) as u32,
                requested_by,
            };
            worker::start_job(&shared, &kw, job, permit);
            return Ok(());
        }
        // Older due work comes first: the job waits as pending for the fetcher.
        drop((w, permit));
        shared.notify_kind(kind);
        return Ok(());
    }
    run!(execute w.conn(), INSERT_JOB,
        &bytes,
        id.as_str(),
        kind.queue_name(),
        max,
        run_at,
        priority,
        &metadata,
        None::<&str>,
    )?;
    drop(w);
    shared.notify_kind(kind);
    Ok(())
}

/// Many jobs of one kind on PostgreSQL: one `INSERT .. SELECT FROM unnest(..)` (one round trip
/// for a fan-out of thousands), then a look-up for each row an idempotency key turned away.
/// Same results as SQLite's row-by-row path (`sql::INSERT_JOB`), in the same order.
async fn insert_many_pg(
    conn: &mut sqlx::PgConnection,
    kind: JobKind,
    rows: &[(Vec<u8>, &EnqueueOptions)],
    metadata: &str,
    default_max: i64,
    now_s: i64,
) -> Result<Vec<Enqueued>, QueueError> {
    let ids: Vec<JobId> = rows.iter().map(|_| JobId::generate()).collect();
    let created: Vec<String> = sqlx::query_scalar(crate::sql_pg::INSERT_JOBS)
        .bind(rows.iter().map(|(b, _)| b.as_slice()).collect::<Vec<_>>())
        .bind(ids.iter().map(JobId::as_str).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|(_, o)| {
                    o.max_attempts
                        .map(|m| m.max(1) as i64)
                        .unwrap_or(default_max)
                })
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|(_, o)| o.run_at.map(|t| t.timestamp()).unwrap_or(now_s))
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|(_, o)| o.priority as i64)
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|(_, o)| o.idempotency_key.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(kind.queue_name())
        .bind(metadata)
        .fetch_all(&mut *conn)
        .await?;
    let created: std::collections::HashSet<String> = created.into_iter().collect();
    let mut out = Vec::with_capacity(rows.len());
    for (id, (_, opts)) in ids.into_iter().zip(rows) {
        if created.contains(id.as_str()) {
            out.push(Enqueued { id, created: true });
        } else {
            let existing: String = sqlx::query_scalar(crate::sql_pg::FIND_BY_IDEMPOTENCY_KEY)
                .bind(kind.queue_name())
                .bind(opts.idempotency_key.as_deref())
                .fetch_one(&mut *conn)
                .await?;
            out.push(Enqueued {
                id: JobId::from(existing),
                created: false,
            });
        }
    }
    Ok(out)
}

impl Queue {
    /// Open (or create) the queue file, run apalis-sqlite's migrations and ours, re-queue jobs
    /// left running by a previous process on this host, and start the queue's background
    /// tasks (committer, heartbeat + orphan rescue, wake-up poll, cancel watch, retention).
    #[tracing::instrument(skip(config), fields(path = %path.display()))]
    pub async fn open(path: &Path, config: QueueConfig) -> Result<Queue, QueueError> {
        config.validate()?;
        let db = db::open(path, config.busy_timeout).await?;
        let location = path.display().to_string();
        Self::start(db, path.to_path_buf(), location, String::new(), config).await
    }

    /// Open the queue in a PostgreSQL database shared by several server nodes: create or
    /// migrate its tables in the connection's current schema (the first of `search_path`),
    /// re-queue jobs of this host's dead processes, and start the background tasks as
    /// [`Queue::open`] does. Each node claims distinct jobs; a node whose heartbeats stop has
    /// its running jobs taken back by the others after `orphan_after`.
    #[tracing::instrument(skip(url, config))]
    pub async fn open_postgres(url: &str, config: QueueConfig) -> Result<Queue, QueueError> {
        config.validate()?;
        let (db, schema) = crate::pg::open(url, config.pg_async_commit).await?;
        let location = format!("{} (schema {schema})", crate::pg::redact(url));
        Self::start(db, PathBuf::new(), location, schema, config).await
    }

    async fn start(
        db: db::Db,
        path: PathBuf,
        location: String,
        pg_schema: String,
        config: QueueConfig,
    ) -> Result<Queue, QueueError> {
        let (commit_tx, commit_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            path,
            location,
            pg_schema,
            config,
            writer: db.writer,
            reader: db.reader,
            instance: JobId::generate().to_string(),
            hostname: hostname(),
            notify: JobKind::ALL.iter().map(|_| Notify::new()).collect(),
            kinds: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            running_count: watch::channel(0).0,
            shutdown: watch::channel(false).0,
            hard_stop: watch::channel(false).0,
            commit_tx,
            commit_rx: tokio::sync::Mutex::new(commit_rx),
            events: broadcast::channel(4096).0,
            tasks: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            terminal_notify: Notify::new(),
            terminal_hook: Mutex::new(None),
        });
        crate::db::sync_clock(&shared.reader).await?;
        worker::mark_dead_local_workers(&shared).await?;
        let rescued = worker::rescue_orphans(&shared).await?;
        if rescued > 0 {
            tracing::info!(rescued, "re-queued jobs left running by a stopped process");
        }
        worker::start_background(&shared);
        Ok(Queue {
            _guard: Arc::new(DropGuard(shared.clone())),
            shared,
        })
    }

    /// The SQLite file (an empty path for a queue on PostgreSQL; see [`Queue::location`]).
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Where the queue lives: the SQLite file, or the PostgreSQL URL (password hidden) and schema.
    pub fn location(&self) -> &str {
        &self.shared.location
    }

    pub fn config(&self) -> &QueueConfig {
        &self.shared.config
    }

    fn ensure_open(&self) -> Result<(), QueueError> {
        if self.shared.closed.load(Ordering::Acquire) {
            Err(QueueError::ShutDown)
        } else {
            Ok(())
        }
    }

    /// Makes `hook` the one place where the rest of the system learns that a job ended dead or
    /// cancelled, by any path: its handler's last attempt, a panic, a cancel while it waited or
    /// after the handler ignored it, the orphan rescue. The state change and an outbox row are
    /// written in one statement, and the row is handed to `hook` until it returns `Ok`, so a
    /// crash in between only delays the call. At most one hook per queue. On PostgreSQL the
    /// nodes share one outbox and each row is leased to one node's hook at a time; a node that
    /// dies or hangs mid-call has its rows offered to the others after a minute, so, as after
    /// a crash, a job may be delivered twice: the hook must be idempotent.
    pub fn on_terminal<F, Fut>(&self, hook: F) -> Result<(), QueueError>
    where
        F: Fn(TerminalJob) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        use futures::FutureExt;
        self.ensure_open()?;
        let hook: TerminalHook = Arc::new(move |job| hook(job).boxed());
        {
            let mut slot = self.shared.terminal_hook.lock().unwrap();
            if slot.is_some() {
                return Err(QueueError::Config("a terminal hook is already set".into()));
            }
            *slot = Some(hook.clone());
        }
        worker::start_terminal_dispatch(&self.shared, hook);
        Ok(())
    }

    /// Committed job outcomes, as they happen (for live views and tests).
    pub fn events(&self) -> broadcast::Receiver<JobEvent> {
        self.shared.events.subscribe()
    }

    /// Enqueue one job of `kind`.
    pub async fn enqueue<A: Serialize + ?Sized>(
        &self,
        kind: JobKind,
        args: &A,
        requested_by: &str,
    ) -> Result<JobId, QueueError> {
        Ok(self
            .enqueue_with(kind, args, requested_by, &EnqueueOptions::default())
            .await?
            .id)
    }

    /// Enqueue typed arguments under their own kind.
    pub async fn push<A: JobArgs>(
        &self,
        args: &A,
        requested_by: &str,
    ) -> Result<JobId, QueueError> {
        self.enqueue(A::KIND, args, requested_by).await
    }

    /// Enqueue one job with options (idempotency key, run time, priority, attempt limit).
    #[tracing::instrument(skip(self, args, options), fields(kind = %kind))]
    pub async fn enqueue_with<A: Serialize + ?Sized>(
        &self,
        kind: JobKind,
        args: &A,
        requested_by: &str,
        options: &EnqueueOptions,
    ) -> Result<Enqueued, QueueError> {
        let mut out = self
            .enqueue_batch(kind, std::iter::once((args, options)), requested_by)
            .await?;
        Ok(out.pop().expect("one job in, one out"))
    }

    /// Enqueue many jobs of one kind in a single transaction (a fleet fan-out).
    #[tracing::instrument(skip(self, args), fields(kind = %kind, count = args.len()))]
    pub async fn enqueue_many<A: Serialize>(
        &self,
        kind: JobKind,
        args: &[A],
        requested_by: &str,
    ) -> Result<Vec<JobId>, QueueError> {
        let options = EnqueueOptions::default();
        let out = self
            .enqueue_batch(kind, args.iter().map(|a| (a, &options)), requested_by)
            .await?;
        Ok(out.into_iter().map(|e| e.id).collect())
    }

    /// Enqueue many jobs of one kind, each with its own options, in a single transaction.
    pub async fn enqueue_many_with<A: Serialize>(
        &self,
        kind: JobKind,
        jobs: &[(A, EnqueueOptions)],
        requested_by: &str,
    ) -> Result<Vec<Enqueued>, QueueError> {
        self.enqueue_batch(kind, jobs.iter().map(|(a, o)| (a, o)), requested_by)
            .await
    }

    async fn enqueue_batch<'a, A: Serialize + ?Sized + 'a>(
        &self,
        kind: JobKind,
        jobs: impl Iterator<Item = (&'a A, &'a EnqueueOptions)>,
        requested_by: &str,
    ) -> Result<Vec<Enqueued>, QueueError> {
        self.ensure_open()?;
        let metadata = job_metadata(requested_by);
        let default_max = self.shared.config.retry.max_attempts as i64;
        let mut rows = Vec::new();
        for (args, opts) in jobs {
            let bytes = serde_json::to_vec(args).map_err(|source| QueueError::Serialize {
                kind: kind.as_str(),
                source,
            })?;
            rows.push((bytes, opts));
        }
        let now_s = crate::db::now().timestamp();
        let mut out = Vec::with_capacity(rows.len());
        // One plain job: a single autocommit INSERT (one round trip instead of three), which
        // also claims the job when a local worker has a free slot.
        if let [(bytes, opts)] = rows.as_slice()
            && opts.idempotency_key.is_none()
        {
            let id = JobId::generate();
            let max = opts
                .max_attempts
                .map(|m| m.max(1) as i64)
                .unwrap_or(default_max);
            let run_at = opts.run_at.map(|t| t.timestamp()).unwrap_or(now_s);
            let one = OneJob {
                kind,
                id: id.clone(),
                bytes: bytes.clone(),
                max,
                run_at,
                priority: opts.priority as i64,
                metadata,
                requested_by: requested_by.to_owned(),
            };
            // In its own task: a claim commits a `Running` row, and the handler must start
            // whatever happens to the caller (an HTTP client that disconnects drops this
            // future mid-statement; nothing would then run the job while this process lives).
            let task = tokio::spawn(enqueue_one(self.shared.clone(), one, now_s));
            return match task.await {
                Ok(r) => r.map(|()| vec![Enqueued { id, created: true }]),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => Err(QueueError::ShutDown),
            };
        }
        let mut w = self.shared.writer.lock().await?;
        let mut tx = w.begin().await?;
        if let Side::Pg(conn) = tx.conn() {
            let out = insert_many_pg(conn, kind, &rows, &metadata, default_max, now_s).await?;
            tx.commit().await?;
            if out.iter().any(|e| e.created) {
                self.shared.notify_kind(kind);
            }
            return Ok(out);
        }
        for (bytes, opts) in &rows {
            let id = JobId::generate();
            let run_at = opts.run_at.map(|t| t.timestamp()).unwrap_or(now_s);
            let max = opts
                .max_attempts
                .map(|m| m.max(1) as i64)
                .unwrap_or(default_max);
            let res = run!(execute tx.conn(), INSERT_JOB,
                bytes,
                id.as_str(),
                kind.queue_name(),
                max,
                run_at,
                opts.priority as i64,
                &metadata,
                opts.idempotency_key.as_deref(),
            )?;
            if res == 1 {
                out.push(Enqueued { id, created: true });
            } else {
                let existing: String = run!(query_scalar.fetch_one tx.conn(), FIND_BY_IDEMPOTENCY_KEY,
                    kind.queue_name(),
                    opts.idempotency_key.as_deref(),
                )?;
                out.push(Enqueued {
                    id: JobId::from(existing),
                    created: false,
                });
            }
        }
        tx.commit().await?;
        if out.iter().any(|e| e.created) {
            self.shared.notify_kind(kind);
        }
        Ok(out)
    }

    /// Per-kind counts, oldest pending age and recent throughput.
    #[tracing::instrument(skip(self))]
    pub async fn status(&self) -> Result<QueueStatus, QueueError> {
        let now = crate::db::now();
        let mut kinds: Vec<KindStatus> = JobKind::ALL
            .iter()
            .map(|k| KindStatus {
                kind: k.as_str().to_owned(),
                ..Default::default()
            })
            .collect();
        let slot = |kinds: &mut Vec<KindStatus>, queue: &str| -> usize {
            let name = JobKind::from_queue_name(queue)
                .map(|k| k.as_str().to_owned())
                .unwrap_or_else(|| queue.to_owned());
            match kinds.iter().position(|k| k.kind == name) {
                Some(i) => i,
                None => {
                    kinds.push(KindStatus {
                        kind: name,
                        ..Default::default()
                    });
                    kinds.len() - 1
                }
            }
        };
        let rows: Vec<(String, String, i64)> =
            run!(query_as.fetch_all self.shared.reader.on(), COUNTS)?;
        for (queue, state, n) in rows {
            let i = slot(&mut kinds, &queue);
            let k = &mut kinds[i];
            let n = n as u64;
            match JobState::parse(&state) {
                JobState::Pending => k.pending += n,
                JobState::Running => k.running += n,
                JobState::Retrying => k.retrying += n,
                JobState::Done => k.done += n,
                JobState::Failed => k.failed += n,
                JobState::Cancelled => k.cancelled += n,
            }
        }
        let rows: Vec<(String, i64)> =
            run!(query_as.fetch_all self.shared.reader.on(), OLDEST_PENDING, now.timestamp())?;
        for (queue, run_at) in rows {
            let i = slot(&mut kinds, &queue);
            kinds[i].oldest_pending_age_ms =
                Some((now.timestamp_millis() - run_at * 1000).max(0) as u64);
        }
        let rows: Vec<(String, i64)> =
            run!(query_as.fetch_all self.shared.reader.on(), DONE_SINCE, now.timestamp() - 60)?;
        for (queue, n) in rows {
            let i = slot(&mut kinds, &queue);
            kinds[i].done_last_60s = n as u64;
        }
        let local_workers = {
            let map = self.shared.kinds.lock().unwrap();
            let mut v: Vec<LocalWorkers> = map
                .values()
                .map(|w| LocalWorkers {
                    kind: w.kind,
                    concurrency: w.concurrency,
                    running: w.concurrency - w.sem.available_permits(),
                })
                .collect();
            v.sort_by_key(|w| w.kind);
            v
        };
        Ok(QueueStatus {
            kinds,
            local_workers,
        })
    }

    /// The workers of every process on this queue that are not marked stopped, with their
    /// heartbeats (a crashed process's stay until it is noticed and its jobs rescued).
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, QueueError> {
        let rows: Vec<(String, String, String, i64, i64, i64, i64)> =
            run!(query_as.fetch_all self.shared.reader.on(), LIVE_WORKERS)?;
        Ok(rows
            .into_iter()
            .map(
                |(id, kind, hostname, pid, started_ms, last_seen_ms, age)| WorkerInfo {
                    id,
                    kind,
                    hostname,
                    pid,
                    started_ms,
                    last_seen_ms,
                    heartbeat_age_ms: age.max(0),
                },
            )
            .collect())
    }

    /// Jobs matching the filter, newest first.
    #[tracing::instrument(skip(self))]
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<JobInfo>, QueueError> {
        let limit = filter.limit.unwrap_or(100).clamp(1, 10_000) as i64;
        let kind = filter.kind.map(|k| k.queue_name());
        let state = filter.state.map(|s| s.as_str());
        let jobs = match self.shared.reader.on() {
            Side::Sqlite(p) => sqlx::query(sql::LIST_JOBS)
                .bind(kind)
                .bind(state)
                .bind(limit)
                .fetch_all(p)
                .await?
                .iter()
                .map(job_from_row)
                .collect::<Result<_, _>>()?,
            Side::Pg(p) => sqlx::query(crate::sql_pg::LIST_JOBS)
                .bind(kind)
                .bind(state)
                .bind(limit)
                .fetch_all(p)
                .await?
                .iter()
                .map(job_from_row)
                .collect::<Result<_, _>>()?,
        };
        Ok(jobs)
    }

    /// One job with every attempt and its error.
    #[tracing::instrument(skip(self), fields(job_id = %id))]
    pub async fn show(&self, id: &JobId) -> Result<JobDetail, QueueError> {
        let job = match self.shared.reader.on() {
            Side::Sqlite(p) => sqlx::query(sql::SHOW_JOB)
                .bind(id.as_str())
                .fetch_optional(p)
                .await?
                .map(|row| job_from_row(&row)),
            Side::Pg(p) => sqlx::query(crate::sql_pg::SHOW_JOB)
                .bind(id.as_str())
                .fetch_optional(p)
                .await?
                .map(|row| job_from_row(&row)),
        };
        let job = job.ok_or_else(|| QueueError::NotFound(id.clone()))??;
        let attempts: Vec<AttemptRow> =
            run!(query_as.fetch_all self.shared.reader.on(), ATTEMPTS_OF, id.as_str())?;
        let attempt_log = attempts
            .into_iter()
            .map(
                |(attempt, worker, started, finished, outcome, error)| AttemptInfo {
                    attempt: attempt.max(0) as u32,
                    worker,
                    started_at: ms_to_time(started),
                    finished_at: finished.and_then(ms_to_time),
                    outcome: outcome.as_deref().and_then(AttemptOutcome::parse),
                    error,
                },
            )
            .collect();
        Ok(JobDetail { job, attempt_log })
    }

    async fn state_of(
        conn: Conn<'_>,
        id: &JobId,
    ) -> Result<Option<(JobState, String)>, QueueError> {
        let row: Option<(String, String)> =
            run!(query_as.fetch_optional conn, STATE_OF, id.as_str())?;
        Ok(row.map(|(s, q)| (JobState::parse(&s), q)))
    }

    /// Put a failed or cancelled job back to pending with a fresh attempt budget.
    #[tracing::instrument(skip(self), fields(job_id = %id))]
    pub async fn retry(&self, id: &JobId) -> Result<(), QueueError> {
        self.ensure_open()?;
        let mut w = self.shared.writer.lock().await?;
        let mut tx = w.begin().await?;
        let queue: Option<String> = run!(query_scalar.fetch_optional tx.conn(), RETRY_FINISHED,
            id.as_str(),
            crate::db::now().timestamp(),
            self.shared.config.retry.max_attempts as i64,
        )?;
        let Some(queue) = queue else {
            let state = Self::state_of(tx.conn(), id).await?;
            return Err(match state {
                None => QueueError::NotFound(id.clone()),
                Some((state, _)) => QueueError::InvalidState {
                    id: id.clone(),
                    state,
                    what: "only failed or cancelled jobs can be retried",
                },
            });
        };
        run!(execute tx.conn(), CLEAR_STATE_FLAGS, id.as_str(), now_ms())?;
        tx.commit().await?;
        if let Some(kind) = JobKind::from_queue_name(&queue) {
            self.shared.notify_kind(kind);
        }
        tracing::info!("job put back to pending");
        Ok(())
    }

    /// Cancel a pending, retrying or running job.
    #[tracing::instrument(skip(self), fields(job_id = %id))]
    pub async fn cancel(
        &self,
        id: &JobId,
        requested_by: &str,
    ) -> Result<CancelOutcome, QueueError> {
        self.ensure_open()?;
        let message =
            serde_json::json!({ "Err": format!("cancelled by {requested_by}") }).to_string();
        let mut w = self.shared.writer.lock().await?;
        let mut tx = w.begin().await?;
        let n = run!(execute tx.conn(), CANCEL_WAITING,
            id.as_str(),
            crate::db::now().timestamp(),
            &message,
        )?;
        if n == 1 {
            run!(execute tx.conn(), CLEAR_STATE_FLAGS, id.as_str(), now_ms())?;
            let state = Self::state_of(tx.conn(), id).await?;
            tx.commit().await?;
            self.shared.terminal_notify.notify_one();
            if let Some(kind) = state.and_then(|(_, q)| JobKind::from_queue_name(&q)) {
                let _ = self.shared.events.send(JobEvent {
                    id: id.clone(),
                    kind,
                    state: JobState::Cancelled,
                    attempt: 0,
                });
            }
            return Ok(CancelOutcome::Cancelled);
        }
        match Self::state_of(tx.conn(), id).await? {
            None => Err(QueueError::NotFound(id.clone())),
            Some((JobState::Running, _)) => {
                run!(execute tx.conn(), REQUEST_CANCEL, id.as_str(), now_ms(), requested_by)?;
                tx.commit().await?;
                // A job running in this process hears it now; others within a poll.
                worker::signal_cancel(&self.shared, id);
                Ok(CancelOutcome::Requested)
            }
            Some((state, _)) => Err(QueueError::InvalidState {
                id: id.clone(),
                state,
                what: "only pending, retrying or running jobs can be cancelled",
            }),
        }
    }

    /// Delete finished jobs (done, failed, cancelled) that finished more than `older_than` ago,
    /// with their attempts and progress. Pending, running and retrying jobs are never touched.
    pub async fn prune(&self, older_than: Duration) -> Result<u64, QueueError> {
        let cutoff = crate::db::now() - chrono::Duration::from_std(older_than).unwrap_or_default();
        self.prune_finished_before(cutoff).await
    }

    #[tracing::instrument(skip(self))]
    pub async fn prune_finished_before(&self, cutoff: DateTime<Utc>) -> Result<u64, QueueError> {
        worker::prune(&self.shared, cutoff.timestamp()).await
    }

    /// Start `concurrency` workers for `kind`. The handler gets the deserialized arguments and
    /// a `JobContext`; arguments that do not deserialize fail the job permanently.
    pub async fn spawn_workers<A, F, Fut>(
        &self,
        kind: JobKind,
        concurrency: usize,
        handler: F,
    ) -> Result<(), QueueError>
    where
        A: serde::de::DeserializeOwned + Send + 'static,
        F: Fn(A, crate::JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), crate::JobError>> + Send + 'static,
    {
        self.ensure_open()?;
        worker::spawn_workers(&self.shared, kind, concurrency, handler).await
    }

    /// Start workers for a typed argument struct's kind.
    pub async fn spawn<A, F, Fut>(&self, concurrency: usize, handler: F) -> Result<(), QueueError>
    where
        A: JobArgs,
        F: Fn(A, crate::JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), crate::JobError>> + Send + 'static,
    {
        self.spawn_workers(A::KIND, concurrency, handler).await
    }

    /// Graceful shutdown: stop claiming, let running jobs finish within `grace`, then stop
    /// the rest and put them back to pending (no attempt counted) so the next start resumes
    /// them; flush outcomes, mark this instance's workers stopped and close the pools.
    #[tracing::instrument(skip(self))]
    pub async fn shutdown(&self, grace: Duration) -> Result<ShutdownReport, QueueError> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(ShutdownReport::default());
        }
        let shared = &self.shared;
        let _ = shared.shutdown.send(true);
        // Claims check the flag while holding the writer and start their handlers before
        // releasing it: once we had the writer, nothing more is claimed and every claimed job
        // is counted below.
        drop(shared.writer.lock().await?);
        let at_start = *shared.running_count.borrow();
        let mut count = shared.running_count.subscribe();
        let in_grace = tokio::time::timeout(grace, count.wait_for(|c| *c == 0))
            .await
            .map(|_| ());
        let mut released = 0;
        if in_grace.is_err() {
            released = *shared.running_count.borrow();
            tracing::warn!(
                released,
                "grace period over; stopping running jobs for resume"
            );
            let _ = shared.hard_stop.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(5), count.wait_for(|c| *c == 0)).await;
            // A runner that did not get to record its job (a blocked thread): stop it and its
            // handler now, so nothing runs on once the committer is gone; its job stays
            // running in the file and is rescued like a crashed one.
            for (_, entry) in shared.running.lock().unwrap().drain() {
                entry.abort();
            }
        }
        let (tx, rx) = oneshot::channel();
        if shared.commit_tx.send(CommitMsg::Flush(tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(30), rx).await;
        }
        worker::stop_workers(shared).await?;
        let tasks: Vec<_> = shared.tasks.lock().unwrap().drain(..).collect();
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        shared.writer.close().await;
        shared.reader.close().await;
        Ok(ShutdownReport {
            finished_in_grace: at_start.saturating_sub(released),
            released,
        })
    }
}
