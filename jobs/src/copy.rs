//! Moving up: copy a single node's SQLite queue (`queue.db`) into an empty PostgreSQL queue,
//! every job with its state, attempts, progress, idempotency key and pending terminal outcome
//! (`snapq db migrate` builds on this).
//!
//! The source must not be in use (the server is stopped). A job it left running is copied as
//! pending, its open attempt closed as interrupted, so the new queue runs it again, as a
//! restart would have.

use std::path::Path;

use serde::Serialize;
use sqlx::Connection;

use crate::{QueueError, db, db::now_ms, pg};

/// What [`copy_sqlite_to_postgres`] copied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CopyReport {
    pub jobs: u64,
    pub attempts: u64,
    /// Jobs with progress, a retry time or a cancel request.
    pub job_states: u64,
    /// Dead or cancelled jobs whose terminal hook had not run yet.
    pub terminal_outcomes: u64,
    /// Jobs that were running in the source: copied as pending.
    pub requeued_running: u64,
}

/// job, id, job_type, status, attempts, max_attempts, run_at, last_result, lock_at, lock_by,
/// done_at, priority, metadata, idempotency_key
type JobRow = (
    Vec<u8>,
    String,
    String,
    String,
    i64,
    i64,
    i64,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<i64>,
    i64,
    Option<String>,
    Option<String>,
);

/// id, progress_done, progress_total, progress_note, progress_ms, next_run_ms,
/// cancel_requested_ms, cancel_requested_by, updated_ms
type StateRow = (
    String,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<String>,
    i64,
);

/// job_id, attempt, worker, started_ms, finished_ms, outcome, error
type AttemptRow = (
    String,
    i64,
    String,
    i64,
    Option<i64>,
    Option<String>,
    Option<String>,
);

/// Copy the SQLite queue at `sqlite_path` into the PostgreSQL queue at `url` (its schema is
/// created or migrated first and must hold no job), in one PostgreSQL transaction: on any
/// error nothing is copied.
pub async fn copy_sqlite_to_postgres(
    sqlite_path: &Path,
    url: &str,
) -> Result<CopyReport, QueueError> {
    if !sqlite_path.exists() {
        return Err(QueueError::NotAQueue {
            path: sqlite_path.to_path_buf(),
            reason: "no such file".into(),
        });
    }
    // Opening brings an older file to the current schema, as `Queue::open` would.
    let source = db::open(sqlite_path, std::time::Duration::from_secs(10)).await?;
    let db::Reader::Sqlite(reader) = &source.reader else {
        unreachable!("db::open opens SQLite");
    };
    let jobs: Vec<JobRow> = sqlx::query_as(
        "SELECT job, id, job_type, status, attempts, max_attempts, run_at, last_result, lock_at,
            lock_by, done_at, priority, metadata, idempotency_key FROM Jobs ORDER BY id",
    )
    .fetch_all(reader)
    .await?;
    let states: Vec<StateRow> = sqlx::query_as(
        "SELECT id, progress_done, progress_total, progress_note, progress_ms, next_run_ms,
            cancel_requested_ms, cancel_requested_by, updated_ms FROM snapq_job_state",
    )
    .fetch_all(reader)
    .await?;
    let attempts: Vec<AttemptRow> = sqlx::query_as(
        "SELECT job_id, attempt, worker, started_ms, finished_ms, outcome, error
        FROM snapq_job_attempts ORDER BY seq",
    )
    .fetch_all(reader)
    .await?;
    let terminal: Vec<(String, i64)> = sqlx::query_as("SELECT id, at_ms FROM snapq_terminal")
        .fetch_all(reader)
        .await?;
    source.writer.close().await;
    source.reader.close().await;

    let (target, _schema) = pg::open(url, false).await?;
    let mut w = target.writer.lock().await?;
    let db::Side::Pg(conn) = w.conn() else {
        unreachable!("pg::open opens PostgreSQL");
    };
    let mut tx = conn.begin().await?;
    let existing: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM snapq_jobs")
        .fetch_one(&mut *tx)
        .await?;
    if existing > 0 {
        return Err(QueueError::Config(format!(
            "the PostgreSQL queue at {} already holds {existing} jobs; copy into an empty one",
            pg::redact(url)
        )));
    }
    let now = now_ms();
    let mut report = CopyReport::default();
    let mut requeued = std::collections::HashSet::new();
    for (
        job,
        id,
        job_type,
        status,
        tries,
        max,
        run_at,
        last,
        lock_at,
        lock_by,
        done_at,
        prio,
        meta,
        key,
    ) in &jobs
    {
        let running = matches!(status.as_str(), "Running" | "Queued");
        if running {
            requeued.insert(id.clone());
        }
        let (status, lock_at, lock_by) = if running {
            ("Pending", None, None)
        } else {
            (status.as_str(), *lock_at, lock_by.as_deref())
        };
        sqlx::query(
            "INSERT INTO snapq_jobs (job, id, job_type, status, attempts, max_attempts, run_at,
                last_result, lock_at, lock_by, done_at, priority, metadata, idempotency_key)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(job)
        .bind(id)
        .bind(job_type)
        .bind(status)
        .bind(tries)
        .bind(max)
        .bind(run_at)
        .bind(last)
        .bind(lock_at)
        .bind(lock_by)
        .bind(done_at)
        .bind(prio)
        .bind(meta)
        .bind(key)
        .execute(&mut *tx)
        .await?;
        report.jobs += 1;
    }
    report.requeued_running = requeued.len() as u64;
    for (id, done, total, note, progress_ms, next_run, cancel_ms, cancel_by, updated) in &states {
        sqlx::query(
            "INSERT INTO snapq_job_state (id, progress_done, progress_total, progress_note,
                progress_ms, next_run_ms, cancel_requested_ms, cancel_requested_by, updated_ms)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(id)
        .bind(done)
        .bind(total)
        .bind(note)
        .bind(progress_ms)
        .bind(next_run)
        .bind(cancel_ms)
        .bind(cancel_by)
        .bind(updated)
        .execute(&mut *tx)
        .await?;
        report.job_states += 1;
    }
    for (job_id, attempt, worker, started, finished, outcome, error) in &attempts {
        let open = finished.is_none() && requeued.contains(job_id);
        let (finished, outcome, error) = if open {
            (
                Some(now),
                Some("interrupted"),
                Some("copied to PostgreSQL while running; runs again"),
            )
        } else {
            (*finished, outcome.as_deref(), error.as_deref())
        };
        sqlx::query(
            "INSERT INTO snapq_job_attempts
                (job_id, attempt, worker, started_ms, finished_ms, outcome, error)
            VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(job_id)
        .bind(attempt)
        .bind(worker)
        .bind(started)
        .bind(finished)
        .bind(outcome)
        .bind(error)
        .execute(&mut *tx)
        .await?;
        report.attempts += 1;
    }
    for (id, at_ms) in &terminal {
        sqlx::query("INSERT INTO snapq_terminal (id, at_ms) VALUES ($1, $2)")
            .bind(id)
            .bind(at_ms)
            .execute(&mut *tx)
            .await?;
        report.terminal_outcomes += 1;
    }
    tx.commit().await?;
    drop(w);
    target.writer.close().await;
    target.reader.close().await;
    tracing::info!(?report, "copied the SQLite queue into PostgreSQL");
    Ok(report)
}
