//! snapq's durable job queue: one SQLite file (`queue.db`) in apalis-sqlite's schema, typed
//! enqueue over one transport, supervised workers with bounded concurrency, our own retry
//! backoff, per-attempt history, progress, cancellation, crash resume and retention.
//!
//! Job kinds' handlers live with the code that understands them; this crate is the machinery
//! they plug into: `Queue::open`, `queue.enqueue(..)`, `queue.spawn_workers(kind, n, handler)`.

mod db;
mod error;
pub mod handlers;
mod id;
mod kind;
pub mod metrics;
mod model;
mod queue;
mod retry;
mod sql;
mod worker;

pub use error::{JobError, QueueError, ResultExt};
pub use id::JobId;
pub use kind::{JobArgs, JobKind, NoopArgs, queue_names};
pub use model::{
    AttemptInfo, AttemptOutcome, EnqueueOptions, Enqueued, JobDetail, JobEvent, JobInfo, JobState,
    KindStatus, ListFilter, LocalWorkers, Progress, QueueStatus, TerminalJob, WorkerInfo,
};
pub use queue::{CancelOutcome, Queue, QueueConfig, ShutdownReport, TerminalHook};
pub use retry::RetryPolicy;
pub use worker::JobContext;

/// The queue's own statements whose query plans tests check (not an API: do not call them).
#[doc(hidden)]
pub mod statements {
    /// `sql::FINISH_DONE`: ?1 id, ?2 worker, ?3 attempts, ?4 now (s).
    pub const FINISH_DONE: &str = crate::sql::FINISH_DONE;
    /// `sql::FINISH_DONE_MANY`: ?1 JSON array of ids, ?2 worker, ?3 now (s).
    pub const FINISH_DONE_MANY: &str = crate::sql::FINISH_DONE_MANY;
}
