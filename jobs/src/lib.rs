//! snapq's durable job queue: one SQLite file (`queue.db`) in apalis-sqlite's schema, or a
//! PostgreSQL database shared by several server nodes; typed enqueue over one transport,
//! supervised workers with bounded concurrency, our own retry backoff, per-attempt history,
//! progress, cancellation, crash resume (orphan rescue across nodes) and retention.
//!
//! Job kinds' handlers live with the code that understands them; this crate is the machinery
//! they plug into: `Queue::open` (SQLite) or `Queue::open_postgres`, `queue.enqueue(..)`,
//! `queue.spawn_workers(kind, n, handler)`. Both backends run the same engine (`queue`,
//! `worker`); only the statements (`sql`, `sql_pg`), opening (`db`, `pg`) and the way other
//! processes' changes wake an idle worker differ.

/// Runs one of the queue's statements on either backend: `sql::NAME` on SQLite,
/// `sql_pg::NAME` on PostgreSQL, with the same binds in the same order.
///
/// `run!(execute ON, NAME, binds..)` gives the rows affected; `run!(query_as.fetch_all ON,
/// NAME, binds..)` (any `sqlx` constructor and fetch method) gives what the context asks for.
/// `ON` is a `db::Side` of connections or pools (`conn()`, `reader.on()`).
macro_rules! run {
    (execute $on:expr, $name:ident $(, $b:expr)* $(,)?) => {
        match $on {
            $crate::db::Side::Sqlite(e) => sqlx::query($crate::sql::$name)
                $(.bind($b))*
                .execute(e)
                .await
                .map(|r| r.rows_affected()),
            $crate::db::Side::Pg(e) => sqlx::query($crate::sql_pg::$name)
                $(.bind($b))*
                .execute(e)
                .await
                .map(|r| r.rows_affected()),
        }
    };
    ($ctor:ident . $method:ident $on:expr, $name:ident $(, $b:expr)* $(,)?) => {
        match $on {
            $crate::db::Side::Sqlite(e) => sqlx::$ctor($crate::sql::$name)
                $(.bind($b))*
                .$method(e)
                .await,
            $crate::db::Side::Pg(e) => sqlx::$ctor($crate::sql_pg::$name)
                $(.bind($b))*
                .$method(e)
                .await,
        }
    };
}

mod copy;
mod db;
mod error;
pub mod handlers;
mod id;
mod kind;
pub mod metrics;
mod model;
mod pg;
mod queue;
mod retry;
#[macro_use]
mod sql;
mod sql_pg;
mod worker;

pub use copy::{CopyReport, copy_sqlite_to_postgres};
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
