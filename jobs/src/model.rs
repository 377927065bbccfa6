//! What the queue tells the CLI and HTTP layer: serde-serializable views of jobs, attempts and
//! per-kind counts.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{JobId, JobKind};

/// A job's state, derived from apalis' `Jobs.status` and attempt counters:
///
/// | state | apalis row |
/// |---|---|
/// | `pending` | `Pending` (not locked) |
/// | `running` | `Running` / `Queued` |
/// | `retrying` | `Failed` with `attempts < max_attempts` (next run time in `run_at`) |
/// | `done` | `Done` |
/// | `failed` | `Failed` with `attempts >= max_attempts` (dead) |
/// | `cancelled` | `Killed` |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Pending,
    Running,
    Retrying,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Pending,
        JobState::Running,
        JobState::Retrying,
        JobState::Done,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Retrying => "retrying",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }

    pub(crate) fn parse(s: &str) -> JobState {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .unwrap_or(JobState::Pending)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown job state {s:?}; valid states: pending, running, retrying, done, failed, cancelled"
                )
            })
    }
}

/// Progress a handler reported with `ctx.progress(done, total, note)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
    pub note: Option<String>,
    pub updated_at: DateTime<Utc>,
}

/// One row of `queue.list` / the head of `queue.show`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobInfo {
    pub id: JobId,
    /// The kind (`capture`, ...), or the raw queue name for rows this build does not know.
    pub kind: String,
    pub state: JobState,
    pub args: serde_json::Value,
    pub requested_by: Option<String>,
    /// Attempts used so far (finished ones; a running attempt is not counted yet).
    pub attempts: u32,
    pub max_attempts: u32,
    pub priority: i64,
    pub idempotency_key: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    /// When it may run (pending) or will be retried (retrying).
    pub run_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub locked_by: Option<String>,
    pub progress: Option<Progress>,
    pub cancel_requested: bool,
}

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AttemptOutcome {
    /// The handler returned `Ok`.
    Ok,
    /// A transient error; retried later if attempts remain.
    Transient,
    /// A permanent error; the job failed at once.
    Permanent,
    /// The handler panicked (treated as transient).
    Panicked,
    /// Cancelled by a user.
    Cancelled,
    /// Its worker stopped heartbeating (the process died); the job was re-queued.
    Lost,
    /// Stopped by a graceful shutdown that ran out of time; re-queued without counting.
    Interrupted,
}

impl AttemptOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Ok => "ok",
            AttemptOutcome::Transient => "transient",
            AttemptOutcome::Permanent => "permanent",
            AttemptOutcome::Panicked => "panicked",
            AttemptOutcome::Cancelled => "cancelled",
            AttemptOutcome::Lost => "lost",
            AttemptOutcome::Interrupted => "interrupted",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        [
            AttemptOutcome::Ok,
            AttemptOutcome::Transient,
            AttemptOutcome::Permanent,
            AttemptOutcome::Panicked,
            AttemptOutcome::Cancelled,
            AttemptOutcome::Lost,
            AttemptOutcome::Interrupted,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttemptInfo {
    /// 1-based attempt number (an interrupted run is repeated under the same number).
    pub attempt: u32,
    pub worker: String,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// `None` while the attempt runs.
    pub outcome: Option<AttemptOutcome>,
    pub error: Option<String>,
}

/// `queue.show(id)`: the job and every attempt, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobDetail {
    #[serde(flatten)]
    #[schema(inline)]
    pub job: JobInfo,
    pub attempt_log: Vec<AttemptInfo>,
}

/// Counts for one kind in `queue.status()`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KindStatus {
    pub kind: String,
    pub pending: u64,
    pub running: u64,
    pub retrying: u64,
    pub done: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Age of the oldest runnable pending job, in milliseconds.
    pub oldest_pending_age_ms: Option<u64>,
    /// Jobs finished `done` in the last 60 seconds.
    pub done_last_60s: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QueueStatus {
    pub kinds: Vec<KindStatus>,
    /// Workers running in this process: kind and concurrency.
    pub local_workers: Vec<LocalWorkers>,
}

/// A worker of any process sharing the queue that is not marked stopped, with its heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerInfo {
    pub id: String,
    pub kind: String,
    pub hostname: String,
    pub pid: i64,
    pub started_ms: i64,
    /// Its last heartbeat (epoch ms, on the clock heartbeats are written with: the database's on
    /// PostgreSQL).
    pub last_seen_ms: i64,
    /// How long ago that was, on the same clock.
    pub heartbeat_age_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LocalWorkers {
    pub kind: JobKind,
    pub concurrency: usize,
    pub running: usize,
}

/// Filter for `queue.list`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListFilter {
    pub state: Option<JobState>,
    pub kind: Option<JobKind>,
    /// Defaults to 100; at most 10,000.
    pub limit: Option<u32>,
}

/// Sent on `queue.events()` after a job's outcome is committed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobEvent {
    pub id: JobId,
    pub kind: JobKind,
    pub state: JobState,
    /// The attempt that just ended (1-based).
    pub attempt: u32,
}

/// A job that reached a terminal state other than done (dead after its last attempt, or
/// cancelled), handed to the queue's terminal hook (see `Queue::on_terminal`). Success is
/// recorded by the handler itself before it returns.
#[derive(Debug, Clone)]
pub struct TerminalJob {
    pub id: JobId,
    pub kind: JobKind,
    /// `Failed` or `Cancelled`.
    pub state: JobState,
    pub args: serde_json::Value,
    /// The job's last error (why it died, or who cancelled it).
    pub error: Option<String>,
    pub requested_by: Option<String>,
}

/// Options of one enqueue.
#[derive(Debug, Clone, Default)]
pub struct EnqueueOptions {
    /// A second enqueue with the same kind and key returns the first job instead of adding
    /// one (e.g. a schedule id plus tick time). Kept until the job is pruned.
    pub idempotency_key: Option<String>,
    /// Do not start before this time (whole seconds).
    pub run_at: Option<DateTime<Utc>>,
    /// Higher runs first.
    pub priority: i32,
    /// Overrides the queue's `RetryPolicy::max_attempts`.
    pub max_attempts: Option<u32>,
}

/// Result of an enqueue with options: the job id and whether a new job was created (false when
/// the idempotency key matched an existing job).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enqueued {
    pub id: JobId,
    pub created: bool,
}
