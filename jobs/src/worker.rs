//! Workers: per-kind fetch loops with bounded concurrency, the job runner (panic boundary,
//! cancellation, progress), the committer that writes outcomes in batches through the single
//! writer connection, and the supervised background tasks (heartbeat + orphan rescue, wake-up
//! poll, cancel watch, retention).

use std::{
    panic::AssertUnwindSafe,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::{FutureExt, future::BoxFuture};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch},
    task::AbortHandle,
};
use tracing::Instrument;

use crate::{
    JobError, JobEvent, JobId, JobKind, JobState, QueueError,
    db::{Conn, Reader, Side, now_ms},
    model::{AttemptOutcome, Progress},
    queue::Shared,
    sql,
};

type DynHandler =
    Arc<dyn Fn(Vec<u8>, JobContext) -> BoxFuture<'static, Result<(), JobError>> + Send + Sync>;

pub(crate) struct KindWorkers {
    pub(crate) kind: JobKind,
    pub(crate) worker_id: String,
    pub(crate) concurrency: usize,
    pub(crate) sem: Arc<Semaphore>,
    handler: DynHandler,
}

pub(crate) struct RunningEntry {
    cancel: watch::Sender<bool>,
    pub(crate) abort: Option<AbortHandle>,
    /// The handler's own task: aborting only the runner would leave it running detached.
    pub(crate) handler_abort: Option<AbortHandle>,
}

impl RunningEntry {
    /// Stops the runner and the handler (a crash, to the database).
    pub(crate) fn abort(&self) {
        for a in [&self.abort, &self.handler_abort].into_iter().flatten() {
            a.abort();
        }
    }
}

/// What a job's handler sees besides its arguments.
#[derive(Clone)]
pub struct JobContext {
    inner: Arc<CtxInner>,
}

pub(crate) struct CtxInner {
    id: JobId,
    kind: JobKind,
    attempt: u32,
    max_attempts: u32,
    requested_by: String,
    cancel: watch::Receiver<bool>,
    progress: Mutex<Option<Progress>>,
    progress_dirty: AtomicBool,
    commit_tx: tokio::sync::mpsc::UnboundedSender<CommitMsg>,
}

impl std::fmt::Debug for JobContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobContext")
            .field("id", &self.inner.id)
            .field("kind", &self.inner.kind)
            .field("attempt", &self.inner.attempt)
            .finish()
    }
}

impl JobContext {
    pub fn id(&self) -> &JobId {
        &self.inner.id
    }
    pub fn kind(&self) -> JobKind {
        self.inner.kind
    }
    /// 1-based number of this attempt.
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }
    pub fn max_attempts(&self) -> u32 {
        self.inner.max_attempts
    }
    /// Whether this is the last attempt a transient error would get.
    pub fn is_last_attempt(&self) -> bool {
        self.inner.attempt >= self.inner.max_attempts
    }
    pub fn requested_by(&self) -> &str {
        &self.inner.requested_by
    }

    /// Report progress (e.g. bytes done / total). Cheap: it only stores the latest value; the
    /// committer writes the most recent one with its next batch, so calling it on every chunk
    /// is fine.
    pub fn progress(&self, done: u64, total: u64, note: Option<&str>) {
        *self.inner.progress.lock().unwrap() = Some(Progress {
            done,
            total,
            note: note.map(str::to_owned),
            updated_at: crate::db::now(),
        });
        if !self.inner.progress_dirty.swap(true, Ordering::AcqRel) {
            let _ = self
                .inner
                .commit_tx
                .send(CommitMsg::Progress(self.inner.clone()));
        }
    }

    /// Whether a user cancelled this job (or it is being stopped). Handlers should check this
    /// between steps, or `select!` on [`JobContext::cancelled`].
    pub fn is_cancelled(&self) -> bool {
        *self.inner.cancel.borrow()
    }

    /// Resolves when the job is cancelled.
    pub async fn cancelled(&self) {
        let mut rx = self.inner.cancel.clone();
        let _ = rx.wait_for(|c| *c).await;
        if !*rx.borrow() {
            // The sender is gone (queue dropped): never resolve.
            std::future::pending::<()>().await;
        }
    }
}

pub(crate) enum Outcome {
    Success,
    Transient(String),
    Permanent(String),
    Panicked(String),
    /// Cancelled and the handler did not stop within the grace period.
    CancelTimeout,
    /// Graceful shutdown ran out of time.
    Interrupted,
}

impl Outcome {
    /// The outcome's label in metrics (`cancelled` wins: the attempt ended because of it).
    fn label(&self, cancelled: bool) -> &'static str {
        match self {
            Outcome::Success => "ok",
            _ if cancelled => "cancelled",
            Outcome::CancelTimeout => "cancelled",
            Outcome::Transient(_) => "transient",
            Outcome::Permanent(_) => "permanent",
            Outcome::Panicked(_) => "panicked",
            Outcome::Interrupted => "interrupted",
        }
    }
}

pub(crate) struct Finished {
    kind: JobKind,
    id: JobId,
    worker_id: String,
    attempt: u32,
    max_attempts: u32,
    outcome: Outcome,
    cancelled: bool,
    /// Whether a `snapq_job_state` row may hold flags to clear (skipped on the hot path).
    may_have_state: bool,
}

impl Finished {
    /// Succeeded, not cancelled, no state row to clear: recorded in bulk.
    fn is_plain_success(&self) -> bool {
        matches!(self.outcome, Outcome::Success) && !self.cancelled && !self.may_have_state
    }
}

pub(crate) enum CommitMsg {
    Finish(Box<Finished>),
    Progress(Arc<CtxInner>),
    Flush(oneshot::Sender<()>),
}

// ---- supervision -----------------------------------------------------------------------------

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_owned()
    }
}

/// Run a named task forever: when it returns an error or panics, log it and start it again
/// after a short backoff. `Ok(())` means it stopped on purpose.
fn spawn_supervised<F, Fut>(shared: &Arc<Shared>, name: String, mut make: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), QueueError>> + Send + 'static,
{
    let s = shared.clone();
    let handle = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(50);
        loop {
            match AssertUnwindSafe(make()).catch_unwind().await {
                Ok(Ok(())) => {
                    tracing::debug!(task = %name, "task stopped");
                    return;
                }
                Ok(Err(e)) => tracing::error!(task = %name, error = %e, "task failed; restarting"),
                Err(p) => {
                    tracing::error!(task = %name, panic = %panic_message(&*p), "task panicked; restarting")
                }
            }
            // The writer connection is held, not pooled per statement: replace it if it died.
            s.writer.check().await;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
    shared.tasks.lock().unwrap().push(handle);
}

pub(crate) fn start_background(shared: &Arc<Shared>) {
    let s = shared.clone();
    spawn_supervised(shared, "queue-committer".into(), move || {
        committer(s.clone())
    });
    let s = shared.clone();
    spawn_supervised(shared, "queue-heartbeat".into(), move || {
        heartbeat_loop(s.clone())
    });
    match &shared.reader {
        Reader::Sqlite(_) => {
            let s = shared.clone();
            spawn_supervised(shared, "queue-wakeup-poll".into(), move || {
                wakeup_poll(s.clone())
            });
        }
        Reader::Pg(_) => {
            let s = shared.clone();
            spawn_supervised(shared, "queue-pg-listen".into(), move || {
                crate::pg::listen(s.clone())
            });
            let s = shared.clone();
            spawn_supervised(shared, "queue-pg-due-poll".into(), move || {
                crate::pg::due_poll(s.clone())
            });
        }
    }
    let s = shared.clone();
    spawn_supervised(shared, "queue-cancel-watch".into(), move || {
        cancel_watch(s.clone())
    });
    if shared.config.retention.is_some() {
        let s = shared.clone();
        spawn_supervised(shared, "queue-retention".into(), move || {
            retention_loop(s.clone())
        });
    }
}

pub(crate) fn start_terminal_dispatch(shared: &Arc<Shared>, hook: crate::queue::TerminalHook) {
    let s = shared.clone();
    spawn_supervised(shared, "queue-terminal-dispatch".into(), move || {
        terminal_dispatch(s.clone(), hook.clone())
    });
}

/// id, queue, args, state, last_result, metadata (all but the id absent for a pruned job)
type TerminalRow = (
    String,
    Option<String>,
    Option<Vec<u8>>,
    String,
    Option<String>,
    Option<String>,
);

/// How long a PostgreSQL node may take to hand a leased outbox row to its hook before another
/// node may take it (the node died, or its hook hangs). The server's hook is one catalog write;
/// a node killed between leasing a row and releasing it delays that outcome by at most this.
const TERMINAL_LEASE: Duration = Duration::from_secs(15);

/// Hands each outbox row (`snapq_terminal`) to the terminal hook and deletes it once the hook
/// recorded it. A job retried since it ended is no longer terminal: its row is just dropped.
async fn terminal_dispatch(
    shared: Arc<Shared>,
    hook: crate::queue::TerminalHook,
) -> Result<(), QueueError> {
    const CHUNK: usize = 100;
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let rows: Vec<TerminalRow> = match shared.reader.on() {
            Side::Sqlite(p) => {
                sqlx::query_as(sql::TERMINAL_PENDING)
                    .bind(CHUNK as i64)
                    .fetch_all(p)
                    .await?
            }
            // Nodes share the outbox: each row is leased to one of them at a time.
            Side::Pg(p) => {
                sqlx::query_as(crate::sql_pg::TERMINAL_LEASE)
                    .bind(CHUNK as i64)
                    .bind(&shared.instance)
                    .bind(TERMINAL_LEASE.as_millis() as i64)
                    .fetch_all(p)
                    .await?
            }
        };
        let mut refused = false;
        for (id, queue, args, state, last_result, metadata) in &rows {
            let state = JobState::parse(state);
            let kind = queue.as_deref().and_then(JobKind::from_queue_name);
            if let Some(kind) = kind
                && matches!(state, JobState::Failed | JobState::Cancelled)
            {
                let job = crate::TerminalJob {
                    id: JobId::from(id.clone()),
                    kind,
                    state,
                    args: args
                        .as_deref()
                        .and_then(|a| serde_json::from_slice(a).ok())
                        .unwrap_or(serde_json::Value::Null),
                    error: crate::queue::last_error(last_result.as_deref()),
                    requested_by: crate::queue::requested_by(metadata.as_deref()),
                };
                if let Err(e) = hook(job).await {
                    tracing::warn!(job_id = %id, error = %e, "terminal outcome not recorded yet; will try again");
                    refused = true;
                    if let Side::Pg(p) = shared.reader.on() {
                        sqlx::query(crate::sql_pg::TERMINAL_RELEASE)
                            .bind(id)
                            .execute(p)
                            .await?;
                    }
                    continue;
                }
            }
            run!(execute shared.writer.lock().await?.conn(), TERMINAL_DONE, id)?;
        }
        if rows.len() == CHUNK && !refused {
            continue;
        }
        let wait = if refused {
            Duration::from_secs(1)
        } else {
            shared.config.idle_recheck
        };
        tokio::select! {
            _ = shared.terminal_notify.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            r = shutdown.changed() => if r.is_err() { return Ok(()) },
        }
    }
}

pub(crate) async fn until_shutdown(shared: &Shared) {
    let mut rx = shared.shutdown.subscribe();
    let _ = rx.wait_for(|s| *s).await;
}

// ---- workers ---------------------------------------------------------------------------------

pub(crate) async fn spawn_workers<A, F, Fut>(
    shared: &Arc<Shared>,
    kind: JobKind,
    concurrency: usize,
    handler: F,
) -> Result<(), QueueError>
where
    A: serde::de::DeserializeOwned + Send + 'static,
    F: Fn(A, JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), JobError>> + Send + 'static,
{
    if concurrency == 0 || concurrency > shared.config.max_concurrency {
        return Err(QueueError::Config(format!(
            "concurrency for {kind} must be between 1 and {} (got {concurrency})",
            shared.config.max_concurrency
        )));
    }
    let worker_id = format!("{}-{}", shared.instance, kind.as_str());
    {
        let kinds = shared.kinds.lock().unwrap();
        if kinds.contains_key(&kind) {
            return Err(QueueError::WorkersAlreadyRunning(kind.as_str()));
        }
    }
    let now = now_ms();
    let mut w = shared.writer.lock().await?;
    let mut tx = w.begin().await?;
    if let Side::Sqlite(c) = tx.conn() {
        // apalis' `Workers` row: `Jobs.lock_by` is a foreign key to it.
        sqlx::query(sql::REGISTER_APALIS_WORKER)
            .bind(&worker_id)
            .bind(kind.queue_name())
            .bind(now / 1000)
            .execute(c)
            .await?;
    }
    run!(execute tx.conn(), REGISTER_WORKER,
        &worker_id,
        &shared.instance,
        kind.as_str(),
        &shared.hostname,
        std::process::id() as i64,
        now,
    )?;
    tx.commit().await?;

    let handler = Arc::new(handler);
    let dyn_handler: DynHandler =
        Arc::new(
            move |args: Vec<u8>, ctx: JobContext| match serde_json::from_slice::<A>(&args) {
                Ok(a) => handler(a, ctx).boxed(),
                Err(e) => {
                    let msg = format!("invalid arguments for a {kind} job: {e}");
                    async move { Err(JobError::Permanent(msg)) }.boxed()
                }
            },
        );
    let kw = Arc::new(KindWorkers {
        kind,
        worker_id,
        concurrency,
        sem: Arc::new(Semaphore::new(concurrency)),
        handler: dyn_handler,
    });
    {
        let mut kinds = shared.kinds.lock().unwrap();
        if kinds.contains_key(&kind) {
            return Err(QueueError::WorkersAlreadyRunning(kind.as_str()));
        }
        kinds.insert(kind, kw.clone());
    }
    let s = shared.clone();
    spawn_supervised(shared, format!("fetch-{kind}"), move || {
        fetch_loop(s.clone(), kw.clone())
    });
    tracing::info!(%kind, concurrency, "workers started");
    Ok(())
}

/// id, args, attempts, max_attempts, metadata, run_at (s)
type ClaimRow = (String, Vec<u8>, i64, i64, Option<String>, i64);

pub(crate) struct Claimed {
    pub(crate) id: JobId,
    pub(crate) args: Vec<u8>,
    pub(crate) attempt: u32,
    pub(crate) max_attempts: u32,
    pub(crate) requested_by: String,
    /// When it became due (ms): created, or its `run_at` if later (whole seconds).
    pub(crate) due_ms: i64,
}

/// When a job became due: its creation (the id's time) or its `run_at`, whichever is later.
pub(crate) fn due_ms(id: &JobId, run_at_s: i64) -> i64 {
    let created = id.created_at().map_or(0, |t| t.timestamp_millis());
    created.max(run_at_s * 1000)
}

/// A free slot of this process's workers for `kind`, if they run and are not shutting down:
/// an enqueue may then claim its job in its own statement (`sql::INSERT_JOB_CLAIMED`) and
/// start it here with [`start_job`]. The permit is released if the job is not claimed.
pub(crate) fn free_slot(
    shared: &Shared,
    kind: JobKind,
) -> Option<(Arc<KindWorkers>, OwnedSemaphorePermit)> {
    if *shared.shutdown.borrow() {
        return None;
    }
    let kw = shared.kinds.lock().unwrap().get(&kind)?.clone();
    let permit = kw.sem.clone().try_acquire_owned().ok()?;
    Some((kw, permit))
}

/// Claim up to `limit` due jobs on the writer connection: one autocommit statement, the
/// attempt rows come from the `snapq_attempt_start` trigger in the same statement.
async fn claim(conn: Conn<'_>, kw: &KindWorkers, limit: usize) -> Result<Vec<Claimed>, QueueError> {
    let now = now_ms();
    let rows: Vec<ClaimRow> = run!(query_as.fetch_all conn, CLAIM,
        &kw.worker_id,
        kw.kind.queue_name(),
        limit as i64,
        now / 1000,
        now,
    )?;
    Ok(rows
        .into_iter()
        .map(|(id, args, attempts, max_attempts, metadata, run_at)| {
            let requested_by = metadata
                .as_deref()
                .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
                .and_then(|v| v.get("requested_by")?.as_str().map(str::to_owned))
                .unwrap_or_default();
            let id = JobId::from(id);
            Claimed {
                due_ms: due_ms(&id, run_at),
                id,
                args,
                attempt: (attempts + 1).max(1) as u32,
                max_attempts: max_attempts.max(1) as u32,
                requested_by,
            }
        })
        .collect())
}

/// How long an idle fetcher may sleep: until the next scheduled/retrying job is due, at most
/// `idle_recheck`. Enqueues in this process and changes by other processes wake it earlier.
async fn idle_wait(shared: &Shared, kind: JobKind) -> Result<Duration, QueueError> {
    let next: Option<i64> =
        run!(query_scalar.fetch_one shared.reader.on(), NEXT_DUE, kind.queue_name())?;
    let max = shared.config.idle_recheck;
    Ok(match next {
        None => max,
        Some(due) => {
            let wait = (due - now_ms()).max(0) as u64;
            Duration::from_millis(wait).clamp(Duration::from_millis(2), max)
        }
    })
}

async fn fetch_loop(shared: Arc<Shared>, kw: Arc<KindWorkers>) -> Result<(), QueueError> {
    let mut shutdown = shared.shutdown.subscribe();
    let notify = &shared.notify[kw.kind.index()];
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        // Claim only what there are free slots for: nothing sits claimed but not started.
        // Wait for one slot, then for the writer; slots that free up meanwhile (the committer
        // may be recording the outcomes that free them) join the same claim.
        let first = tokio::select! {
            p = kw.sem.clone().acquire_owned() => p.expect("semaphore never closed"),
            r = shutdown.changed() => {
                if r.is_err() {
                    return Ok(());
                }
                continue;
            }
        };
        let mut permits: Vec<OwnedSemaphorePermit> = vec![first];
        let short = {
            let mut w = shared.writer.lock().await?;
            // Checked under the writer: `Queue::shutdown` takes the writer once after raising
            // the flag, so no claim can slip in after its drain started.
            if *shutdown.borrow() {
                return Ok(());
            }
            while permits.len() < shared.config.claim_batch {
                match kw.sem.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let jobs = claim(w.conn(), &kw, permits.len()).await?;
            let short = jobs.len() < permits.len();
            // Started (and counted as running) before the writer is released.
            for job in jobs {
                let permit = permits
                    .pop()
                    .expect("claimed at most as many jobs as permits");
                start_job(&shared, &kw, job, permit);
            }
            short
        };
        drop(permits);
        if short {
            // Nothing more is due now: sleep until an enqueue, another process's commit, or
            // the next scheduled / retrying job.
            let wait = idle_wait(&shared, kw.kind).await?;
            tokio::select! {
                _ = notify.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                r = shutdown.changed() => if r.is_err() { return Ok(()) },
            }
        }
    }
}

pub(crate) fn start_job(
    shared: &Arc<Shared>,
    kw: &Arc<KindWorkers>,
    job: Claimed,
    permit: OwnedSemaphorePermit,
) {
    let (cancel_tx, cancel_rx) = watch::channel(false);
    {
        let mut running = shared.running.lock().unwrap();
        running.insert(
            job.id.clone(),
            RunningEntry {
                cancel: cancel_tx,
                abort: None,
                handler_abort: None,
            },
        );
        shared.running_count.send_replace(running.len());
    }
    let id = job.id.clone();
    let handle = tokio::spawn(run_job(shared.clone(), kw.clone(), job, cancel_rx, permit));
    if let Some(entry) = shared.running.lock().unwrap().get_mut(&id) {
        entry.abort = Some(handle.abort_handle());
    }
}

#[tracing::instrument(skip_all, fields(job_id = %job.id, kind = %kw.kind, attempt = job.attempt))]
async fn run_job(
    shared: Arc<Shared>,
    kw: Arc<KindWorkers>,
    job: Claimed,
    cancel_rx: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
) {
    let ctx = JobContext {
        inner: Arc::new(CtxInner {
            id: job.id.clone(),
            kind: kw.kind,
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            requested_by: job.requested_by,
            cancel: cancel_rx.clone(),
            progress: Mutex::new(None),
            progress_dirty: AtomicBool::new(false),
            commit_tx: shared.commit_tx.clone(),
        }),
    };
    let started = std::time::Instant::now();
    let waited = Duration::from_millis((now_ms() - job.due_ms).max(0) as u64);
    crate::metrics::metrics().started(kw.kind, waited);
    let handler = kw.handler.clone();
    let args = job.args;
    let ctx_inner = ctx.inner.clone();
    // The handler runs in its own task so a panic, or a handler that blocks its thread, cannot
    // take the fetch loop, heartbeats or committer with it.
    // In the job's span, so every log line of the handler carries the job id and kind.
    let mut handler_task = tokio::spawn(
        AssertUnwindSafe(async move { handler(args, ctx).await })
            .catch_unwind()
            .instrument(tracing::Span::current()),
    );
    if let Some(entry) = shared.running.lock().unwrap().get_mut(&job.id) {
        entry.handler_abort = Some(handler_task.abort_handle());
    }
    let mut cancel = cancel_rx.clone();
    let cancel_grace = shared.config.cancel_grace;
    let cancelled_then_grace = async move {
        let _ = cancel.wait_for(|c| *c).await;
        if !*cancel.borrow() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(cancel_grace).await;
    };
    let mut hard = shared.hard_stop.subscribe();
    let hard_stop = async move {
        let _ = hard.wait_for(|h| *h).await;
        if !*hard.borrow() {
            std::future::pending::<()>().await;
        }
    };
    let outcome = tokio::select! {
        res = &mut handler_task => match res {
            Ok(Ok(Ok(()))) => Outcome::Success,
            Ok(Ok(Err(JobError::Transient(m)))) => Outcome::Transient(m),
            Ok(Ok(Err(JobError::Permanent(m)))) => Outcome::Permanent(m),
            Ok(Err(p)) => Outcome::Panicked(format!("handler panicked: {}", panic_message(&*p))),
            Err(e) if e.is_panic() => Outcome::Panicked(format!("handler panicked: {}", panic_message(&*e.into_panic()))),
            Err(e) => Outcome::Panicked(format!("handler task failed: {e}")),
        },
        _ = cancelled_then_grace => { handler_task.abort(); Outcome::CancelTimeout }
        _ = hard_stop => { handler_task.abort(); Outcome::Interrupted }
    };
    drop(permit);
    let cancelled = *cancel_rx.borrow();
    crate::metrics::metrics().ended(kw.kind, outcome.label(cancelled), Some(started.elapsed()));
    let may_have_state =
        cancelled || job.attempt > 1 || ctx_inner.progress.lock().unwrap().is_some();
    let _ = shared.commit_tx.send(CommitMsg::Finish(Box::new(Finished {
        kind: kw.kind,
        id: job.id.clone(),
        worker_id: kw.worker_id.clone(),
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        outcome,
        cancelled,
        may_have_state,
    })));
    let mut running = shared.running.lock().unwrap();
    running.remove(&job.id);
    shared.running_count.send_replace(running.len());
}

pub(crate) fn signal_cancel(shared: &Shared, id: &JobId) {
    if let Some(entry) = shared.running.lock().unwrap().get(id) {
        let _ = entry.cancel.send(true);
    }
}

// ---- committer -------------------------------------------------------------------------------

async fn committer(shared: Arc<Shared>) -> Result<(), QueueError> {
    let mut rx = shared.commit_rx.lock().await;
    loop {
        let Some(first) = rx.recv().await else {
            return Ok(());
        };
        let mut batch = vec![first];
        while batch.len() < 2048 {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let mut delay = Duration::from_millis(20);
        let events = loop {
            match commit_batch(&shared, &batch).await {
                Ok(events) => break events,
                Err(e) => {
                    // Never drop outcomes: a lost ack would leave a job `running` under a live
                    // worker, which no one would rescue.
                    tracing::error!(error = %e, jobs = batch.len(), "cannot record job outcomes; retrying");
                    // The held writer connection may be what failed (a restarted PostgreSQL).
                    shared.writer.check().await;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        };
        for (event, retry_kind) in events {
            if let Some(kind) = retry_kind {
                shared.notify_kind(kind);
            }
            if let Some(event) = event {
                if matches!(event.state, JobState::Failed | JobState::Cancelled) {
                    shared.terminal_notify.notify_one();
                }
                let _ = shared.events.send(event);
            }
        }
        for m in batch {
            if let CommitMsg::Flush(tx) = m {
                let _ = tx.send(());
            }
        }
    }
}

fn err_json(msg: &str) -> String {
    serde_json::json!({ "Err": msg }).to_string()
}

type Committed = (Option<JobEvent>, Option<JobKind>);

async fn commit_batch(shared: &Shared, batch: &[CommitMsg]) -> Result<Vec<Committed>, QueueError> {
    let now = now_ms();
    let now_s = now / 1000;
    // Plain successes (the hot path) go in one statement per worker; everything else
    // (failures, cancels, progress, successes that may leave state flags) one by one.
    let mut done: Vec<(&str, Vec<&Finished>)> = Vec::new();
    let mut other = 0;
    for m in batch {
        match m {
            CommitMsg::Finish(f) if f.is_plain_success() => {
                match done.iter_mut().find(|(w, _)| *w == f.worker_id) {
                    Some((_, v)) => v.push(f),
                    None => done.push((&f.worker_id, vec![f])),
                }
            }
            CommitMsg::Flush(_) => {}
            _ => other += 1,
        }
    }
    let mut w = shared.writer.lock().await?;
    if other == 0 && done.len() <= 1 {
        // A single statement is atomic on its own: no BEGIN/COMMIT round trips.
        return commit_msgs(w.conn(), shared, batch, &done, now, now_s).await;
    }
    let mut tx = w.begin().await?;
    let out = commit_msgs(tx.conn(), shared, batch, &done, now, now_s).await?;
    tx.commit().await?;
    Ok(out)
}

async fn commit_msgs(
    mut conn: Conn<'_>,
    shared: &Shared,
    batch: &[CommitMsg],
    done: &[(&str, Vec<&Finished>)],
    now: i64,
    now_s: i64,
) -> Result<Vec<Committed>, QueueError> {
    let mut out = Vec::new();
    for (worker, jobs) in done {
        let ids: Vec<&str> = jobs.iter().map(|f| f.id.as_str()).collect();
        let ids = serde_json::to_string(&ids).expect("strings serialize");
        let finished: Vec<String> = run!(query_scalar.fetch_all conn.re(), FINISH_DONE_MANY,
            &ids,
            *worker,
            now_s,
        )?;
        let finished: std::collections::HashSet<String> = finished.into_iter().collect();
        for f in jobs {
            if finished.contains(f.id.as_str()) {
                tracing::debug!(job_id = %f.id, kind = %f.kind, "job done");
                out.push((
                    Some(JobEvent {
                        id: f.id.clone(),
                        kind: f.kind,
                        state: JobState::Done,
                        attempt: f.attempt,
                    }),
                    None,
                ));
            } else {
                // Re-queued by someone else while it ran: `finish` records the lost outcome.
                out.push(finish(conn.re(), shared, f, now, now_s).await?);
            }
        }
    }
    for m in batch {
        match m {
            CommitMsg::Progress(ctx) => {
                ctx.progress_dirty.store(false, Ordering::Release);
                let p = ctx.progress.lock().unwrap().clone();
                if let Some(p) = p {
                    run!(execute conn.re(), SET_PROGRESS,
                        ctx.id.as_str(),
                        p.done.min(i64::MAX as u64) as i64,
                        p.total.min(i64::MAX as u64) as i64,
                        p.note.as_deref(),
                        p.updated_at.timestamp_millis(),
                    )?;
                }
            }
            CommitMsg::Flush(_) => {}
            CommitMsg::Finish(f) => {
                if !f.is_plain_success() {
                    out.push(finish(conn.re(), shared, f, now, now_s).await?);
                }
            }
        }
    }
    Ok(out)
}

async fn finish(
    mut tx: Conn<'_>,
    shared: &Shared,
    f: &Finished,
    now: i64,
    now_s: i64,
) -> Result<Committed, QueueError> {
    let id = f.id.as_str();
    let attempts = f.attempt as i64;
    let cancel_by = |reason: Option<&str>| -> String {
        match reason {
            Some(r) => format!("cancelled: {r}"),
            None => "cancelled".to_owned(),
        }
    };
    // (new state, attempt outcome, attempt error, apalis update)
    let (state, outcome, error): (JobState, AttemptOutcome, Option<String>) = match &f.outcome {
        Outcome::Success => (JobState::Done, AttemptOutcome::Ok, None),
        Outcome::Interrupted => (
            JobState::Pending,
            AttemptOutcome::Interrupted,
            Some("stopped by shutdown; resumes at next start".into()),
        ),
        Outcome::CancelTimeout => (
            JobState::Cancelled,
            AttemptOutcome::Cancelled,
            Some("cancelled; handler did not stop within the grace period".into()),
        ),
        Outcome::Permanent(m) | Outcome::Transient(m) | Outcome::Panicked(m) if f.cancelled => (
            JobState::Cancelled,
            AttemptOutcome::Cancelled,
            Some(cancel_by(Some(m))),
        ),
        Outcome::Permanent(m) => (JobState::Failed, AttemptOutcome::Permanent, Some(m.clone())),
        Outcome::Transient(m) | Outcome::Panicked(m) => {
            let kind = if matches!(f.outcome, Outcome::Panicked(_)) {
                AttemptOutcome::Panicked
            } else {
                AttemptOutcome::Transient
            };
            // A cancel requested from another process may not have reached us yet.
            let requested: Option<Option<String>> =
                run!(query_scalar.fetch_optional tx.re(), CANCEL_REQUESTED, id)?;
            if requested.is_some() {
                (
                    JobState::Cancelled,
                    AttemptOutcome::Cancelled,
                    Some(cancel_by(Some(m))),
                )
            } else if f.attempt >= f.max_attempts {
                (JobState::Failed, kind, Some(m.clone()))
            } else {
                (JobState::Retrying, kind, Some(m.clone()))
            }
        }
    };
    let last = error.as_deref().map(err_json);
    let res = match state {
        JobState::Done => run!(execute tx.re(), FINISH_DONE, id, &f.worker_id, attempts, now_s)?,
        JobState::Failed => run!(execute tx.re(), FINISH_DEAD,
            id, &f.worker_id, attempts, now_s, &last)?,
        JobState::Cancelled => run!(execute tx.re(), FINISH_CANCELLED,
            id, &f.worker_id, attempts, now_s, &last)?,
        JobState::Retrying => {
            let delay = shared.config.retry.delay(f.attempt);
            let next = now + delay.as_millis() as i64;
            run!(execute tx.re(), SET_NEXT_RUN, id, next, now)?;
            tracing::info!(job_id = %f.id, kind = %f.kind, attempt = f.attempt, delay_ms = delay.as_millis() as u64,
                error = error.as_deref().unwrap_or(""), "job attempt failed; will retry");
            run!(execute tx.re(), FINISH_RETRY,
                id, &f.worker_id, attempts, next / 1000, &last)?
        }
        JobState::Pending | JobState::Running => {
            run!(execute tx.re(), RELEASE, id, &f.worker_id, now_s)?
        }
    };
    let lost = res == 0;
    if lost && state == JobState::Done {
        // A bulk success ack commits on its own; if a later outcome of the same batch failed,
        // the whole batch is written again, and this success must not turn into `lost`.
        let recorded: bool =
            run!(query_scalar.fetch_one tx.re(), ATTEMPT_ALREADY_OK, id, attempts, &f.worker_id)?;
        if recorded {
            let event = JobEvent {
                id: f.id.clone(),
                kind: f.kind,
                state,
                attempt: f.attempt,
            };
            return Ok((Some(event), None));
        }
    }
    let (outcome, error) = if lost {
        tracing::warn!(job_id = %f.id, kind = %f.kind, "job was re-queued by another worker while it ran; outcome discarded");
        (
            AttemptOutcome::Lost,
            Some(format!(
                "outcome {} discarded: the job had been re-queued (missed heartbeats?)",
                outcome.as_str()
            )),
        )
    } else {
        (outcome, error)
    };
    run!(execute tx.re(), FINISH_ATTEMPT,
        id,
        attempts,
        &f.worker_id,
        now,
        outcome.as_str(),
        error.as_deref(),
    )?;
    // A cross-process cancel request that lost the race with success may leave a stale flag
    // on a first-attempt job; it is harmless (the job is not running) and pruned with the job.
    if state.is_finished() && !lost && f.may_have_state {
        run!(execute tx.re(), CLEAR_STATE_FLAGS, id, now)?;
    }
    match state {
        JobState::Done => tracing::debug!(job_id = %f.id, kind = %f.kind, "job done"),
        JobState::Failed => tracing::warn!(job_id = %f.id, kind = %f.kind, attempt = f.attempt,
            error = error.as_deref().unwrap_or(""), "job failed; giving up"),
        _ => {}
    }
    if lost {
        return Ok((None, None));
    }
    let event = JobEvent {
        id: f.id.clone(),
        kind: f.kind,
        state,
        attempt: f.attempt,
    };
    let wake = matches!(state, JobState::Retrying | JobState::Pending).then_some(f.kind);
    Ok((Some(event), wake))
}

// ---- heartbeats, orphans, wake-ups, cancels, retention ---------------------------------------

#[cfg(target_os = "linux")]
fn pid_alive(pid: i64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(not(target_os = "linux"))]
fn pid_alive(_pid: i64) -> bool {
    true // unknown: fall back to heartbeat staleness
}

/// At start-up: workers of this host whose process is gone are dead now, not after
/// `orphan_after`, so their jobs resume at once. Peers on other hosts are judged only by
/// their heartbeats. On PostgreSQL a host name may also be another machine's (containers in
/// their own pid namespaces): only workers that also missed two heartbeats count.
pub(crate) async fn mark_dead_local_workers(shared: &Shared) -> Result<(), QueueError> {
    let rows: Vec<(String, i64)> = match shared.reader.on() {
        Side::Sqlite(p) => {
            sqlx::query_as(sql::SAME_HOST_WORKERS)
                .bind(&shared.hostname)
                .bind(&shared.instance)
                .fetch_all(p)
                .await?
        }
        Side::Pg(p) => {
            sqlx::query_as(crate::sql_pg::SAME_HOST_WORKERS)
                .bind(&shared.hostname)
                .bind(&shared.instance)
                .bind((shared.config.heartbeat_interval * 2).as_millis() as i64)
                .fetch_all(p)
                .await?
        }
    };
    let me = std::process::id() as i64;
    for (id, pid) in rows {
        if pid != me && !pid_alive(pid) {
            run!(execute shared.writer.lock().await?.conn(), MARK_WORKER_DEAD, &id, now_ms())?;
        }
    }
    Ok(())
}

/// Re-queue jobs whose worker stopped heartbeating.
pub(crate) async fn rescue_orphans(shared: &Shared) -> Result<u64, QueueError> {
    let now = now_ms();
    let stale_ms = now - shared.config.orphan_after.as_millis() as i64;
    let mut w = shared.writer.lock().await?;
    let mut tx = w.begin().await?;
    // On PostgreSQL the heartbeats and this comparison use the database's clock (see
    // `sql_pg::HEARTBEAT`): nodes' clocks may differ.
    let workers: Vec<String> = match tx.conn() {
        Side::Sqlite(c) => {
            sqlx::query_scalar(sql::STALE_WORKERS)
                .bind(stale_ms)
                .bind(&shared.instance)
                .fetch_all(c)
                .await?
        }
        Side::Pg(c) => {
            sqlx::query_scalar(crate::sql_pg::STALE_WORKERS)
                .bind(shared.config.orphan_after.as_millis() as i64)
                .bind(&shared.instance)
                .fetch_all(c)
                .await?
        }
    };
    let mut total = 0;
    let mut wake = Vec::new();
    let mut dead = false;
    for w in workers {
        let msg =
            format!("worker {w} stopped heartbeating (process crashed or hung); job re-queued");
        let jobs: Vec<(String, String, String, i64)> = run!(query_as.fetch_all tx.conn(), REQUEUE_ORPHANS,
            &w,
            now / 1000,
            err_json(&msg),
        )?;
        for (id, queue, status, attempts) in &jobs {
            run!(execute tx.conn(), LOSE_OPEN_ATTEMPTS, id, now, &msg)?;
            tracing::warn!(job_id = %id, worker = %w, %status, attempts, "re-queued orphaned job");
            dead |= status == "Failed";
            if let Some(k) = JobKind::from_queue_name(queue) {
                crate::metrics::metrics().ended(k, "lost", None);
                wake.push(k);
            }
        }
        total += jobs.len() as u64;
    }
    tx.commit().await?;
    for k in wake {
        shared.notify_kind(k);
    }
    if dead {
        shared.terminal_notify.notify_one();
    }
    Ok(total)
}

async fn heartbeat_loop(shared: Arc<Shared>) -> Result<(), QueueError> {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(shared.config.heartbeat_interval) => {}
            _ = until_shutdown(&shared) => return Ok(()),
        }
        crate::db::sync_clock(&shared.reader).await?;
        let now = now_ms();
        let mut w = shared.writer.lock().await?;
        let mut tx = w.begin().await?;
        run!(execute tx.conn(), HEARTBEAT, &shared.instance, now)?;
        if let Side::Sqlite(c) = tx.conn() {
            sqlx::query(sql::HEARTBEAT_APALIS)
                .bind(&shared.instance)
                .bind(now / 1000)
                .execute(c)
                .await?;
        }
        tx.commit().await?;
        drop(w); // rescue_orphans takes the writer itself
        rescue_orphans(&shared).await?;
    }
}

/// Wakes idle fetchers when another connection (another process, e.g. the CLI or a second
/// node) commits: `PRAGMA data_version` changes, and reading it touches no table.
async fn wakeup_poll(shared: Arc<Shared>) -> Result<(), QueueError> {
    let Reader::Sqlite(reader) = &shared.reader else {
        return Ok(());
    };
    let mut conn = reader.acquire().await?;
    let mut last: Option<i64> = None;
    loop {
        let v: i64 = sqlx::query_scalar("PRAGMA data_version")
            .fetch_one(&mut *conn)
            .await?;
        if last.is_some_and(|l| l != v) {
            let kinds: Vec<JobKind> = shared.kinds.lock().unwrap().keys().copied().collect();
            for k in kinds {
                shared.notify_kind(k);
            }
        }
        last = Some(v);
        tokio::select! {
            _ = tokio::time::sleep(shared.config.poll_interval) => {}
            _ = until_shutdown(&shared) => return Ok(()),
        }
    }
}

/// Delivers cancel requests made by other processes to handlers running here.
async fn cancel_watch(shared: Arc<Shared>) -> Result<(), QueueError> {
    let every = (shared.config.poll_interval * 10).min(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = until_shutdown(&shared) => return Ok(()),
        }
        if shared.running.lock().unwrap().is_empty() {
            continue;
        }
        let ids: Vec<String> = run!(query_scalar.fetch_all shared.reader.on(), CANCEL_REQUESTS)?;
        for id in ids {
            signal_cancel(&shared, &JobId::from(id));
        }
    }
}

async fn retention_loop(shared: Arc<Shared>) -> Result<(), QueueError> {
    let Some(keep) = shared.config.retention else {
        return Ok(());
    };
    loop {
        let cutoff = crate::db::now() - chrono::Duration::from_std(keep).unwrap_or_default();
        let n = prune(&shared, cutoff.timestamp()).await?;
        if n > 0 {
            tracing::info!(pruned = n, "pruned finished jobs past retention");
        }
        tokio::select! {
            _ = tokio::time::sleep(shared.config.prune_interval) => {}
            _ = until_shutdown(&shared) => return Ok(()),
        }
    }
}

pub(crate) async fn prune(shared: &Shared, cutoff_s: i64) -> Result<u64, QueueError> {
    let mut total = 0;
    loop {
        let mut w = shared.writer.lock().await?;
        let mut tx = w.begin().await?;
        let ids: Vec<String> = run!(query_scalar.fetch_all tx.conn(), PRUNABLE, cutoff_s, 1000i64)?;
        if ids.is_empty() {
            tx.rollback().await?;
            return Ok(total);
        }
        let json = serde_json::to_string(&ids).expect("strings serialize");
        run!(execute tx.conn(), PRUNE_ATTEMPTS, &json)?;
        run!(execute tx.conn(), PRUNE_STATE, &json)?;
        run!(execute tx.conn(), PRUNE_TERMINAL, &json)?;
        run!(execute tx.conn(), PRUNE_JOBS, &json)?;
        tx.commit().await?;
        total += ids.len() as u64;
        if ids.len() < 1000 {
            return Ok(total);
        }
    }
}

pub(crate) async fn stop_workers(shared: &Shared) -> Result<(), QueueError> {
    run!(execute shared.writer.lock().await?.conn(), STOP_WORKERS, &shared.instance, now_ms())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Queue, QueueConfig};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_written_again_after_a_partial_ack_keeps_its_successes() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&dir.path().join("queue.db"), QueueConfig::default())
            .await
            .unwrap();
        q.spawn_workers(JobKind::Noop, 2, |_: serde_json::Value, _| async {
            std::future::pending::<()>().await;
            Ok(())
        })
        .await
        .unwrap();
        let id = q
            .enqueue(JobKind::Noop, &serde_json::json!({}), "t")
            .await
            .unwrap();
        let worker_id = q.shared.kinds.lock().unwrap()[&JobKind::Noop]
            .worker_id
            .clone();
        let success = || {
            CommitMsg::Finish(Box::new(Finished {
                kind: JobKind::Noop,
                id: id.clone(),
                worker_id: worker_id.clone(),
                attempt: 1,
                max_attempts: 25,
                outcome: Outcome::Success,
                cancelled: false,
                may_have_state: false,
            }))
        };
        // The bulk ack commits; then (say) a later outcome of the batch fails, and the
        // committer writes the whole batch again.
        commit_batch(&q.shared, &[success()]).await.unwrap();
        let events = commit_batch(&q.shared, &[success()]).await.unwrap();
        assert!(matches!(&events[..], [(Some(e), None)] if e.state == JobState::Done));
        let d = q.show(&id).await.unwrap();
        assert_eq!(d.job.state, JobState::Done);
        let outcomes: Vec<_> = d.attempt_log.iter().map(|a| a.outcome).collect();
        assert_eq!(outcomes, vec![Some(AttemptOutcome::Ok)]);
    }
}
