//! The queue's statements in PostgreSQL's dialect, over the tables of `db::pg::MIGRATIONS`.
//!
//! Every constant has the name, the meaning and the parameters (same order) of its SQLite
//! twin in `sql`, so the engine runs one code path and `run!` picks the dialect. The table
//! `snapq_jobs` has the columns and statuses of apalis' `Jobs` (see `JobState`), so the state
//! mapping is the same on both backends. Claims add `FOR UPDATE SKIP LOCKED`: several nodes
//! claim from one table and never take the same row.

/// The columns `queue::job_from_row` reads, from `snapq_jobs j` joined with its state.
macro_rules! pg_select_job {
    () => {
        concat!(
            "SELECT j.id, j.job_type, j.job, ",
            state_expr!(),
            " AS state, j.attempts, j.max_attempts, j.priority, j.idempotency_key, j.run_at,
    j.done_at, j.last_result, j.lock_by, j.metadata,
    s.progress_done, s.progress_total, s.progress_note, s.progress_ms, s.next_run_ms,
    s.cancel_requested_ms,
    (SELECT MIN(a.started_ms) FROM snapq_job_attempts a WHERE a.job_id = j.id) AS started_ms,
    (SELECT MAX(a.finished_ms) FROM snapq_job_attempts a WHERE a.job_id = j.id) AS finished_ms
    FROM snapq_jobs j LEFT JOIN snapq_job_state s ON s.id = j.id"
        )
    };
}

/// Due now: pending and unlocked, or retrying with its (millisecond) retry time reached.
/// $A now (s), $B now (ms), as text fragments for the statements below.
macro_rules! due {
    ($now_s:literal, $now_ms:literal) => {
        concat!(
            "((j.status = 'Pending' AND j.lock_by IS NULL AND j.run_at <= ",
            $now_s,
            ") OR (j.status = 'Failed' AND j.attempts < j.max_attempts AND j.run_at <= ",
            $now_s,
            " AND NOT EXISTS (SELECT 1 FROM snapq_job_state s
                              WHERE s.id = j.id AND s.next_run_ms > ",
            $now_ms,
            ")))"
        )
    };
}

pub(crate) const INSERT_JOB: &str = "INSERT INTO snapq_jobs (job, id, job_type, status, attempts,
        max_attempts, run_at, priority, metadata, idempotency_key)
    VALUES ($1, $2, $3, 'Pending', 0, $4, $5, $6, $7, $8)
    ON CONFLICT (job_type, idempotency_key) DO NOTHING";

/// Many jobs of one queue in one statement (no SQLite twin: see `queue::insert_many_pg`).
/// Arrays, one element per job: $1 job, $2 id, $3 max_attempts, $4 run_at (s), $5 priority,
/// $6 idempotency key; then $7 queue, $8 metadata. Returns the ids inserted (a key already
/// taken, also by an earlier row of the same batch, inserts nothing).
pub(crate) const INSERT_JOBS: &str = "INSERT INTO snapq_jobs (job, id, job_type, status,
        attempts, max_attempts, run_at, priority, metadata, idempotency_key)
    SELECT u.job, u.id, $7, 'Pending', 0, u.max_attempts, u.run_at, u.priority, $8, u.key
    FROM unnest($1::bytea[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::text[])
        WITH ORDINALITY AS u(job, id, max_attempts, run_at, priority, key, n)
    ORDER BY u.n
    ON CONFLICT (job_type, idempotency_key) DO NOTHING
    RETURNING id";

/// $1 job, $2 id, $3 queue, $4 max_attempts, $5 now (s), $6 priority, $7 metadata,
/// $8 worker, $9 now (ms)
pub(crate) const INSERT_JOB_CLAIMED: &str = concat!(
    "INSERT INTO snapq_jobs (job, id, job_type, status, attempts, max_attempts,
        run_at, lock_at, lock_by, priority, metadata)
    SELECT $1, $2, $3, CASE WHEN c.free THEN 'Running' ELSE 'Pending' END, 0, $4,
        $5, CASE WHEN c.free THEN $5 END, CASE WHEN c.free THEN $8 END, $6, $7
    FROM (SELECT NOT EXISTS (
            SELECT 1 FROM snapq_jobs j
            WHERE j.job_type = $3 AND j.status IN ('Pending', 'Failed') AND j.priority >= $6
                AND ",
    due!("$5", "$9"),
    "
        ) AS free) AS c
    RETURNING status"
);

pub(crate) const FIND_BY_IDEMPOTENCY_KEY: &str =
    "SELECT id FROM snapq_jobs WHERE job_type = $1 AND idempotency_key = $2";

/// $1 worker, $2 queue, $3 limit, $4 now (s), $5 now (ms)
pub(crate) const CLAIM: &str = concat!(
    "UPDATE snapq_jobs SET status = 'Running', lock_by = $1, lock_at = $4
    WHERE id IN (
        SELECT j.id FROM snapq_jobs j
        WHERE j.job_type = $2 AND j.status IN ('Pending', 'Failed') AND ",
    due!("$4", "$5"),
    "
        ORDER BY j.priority DESC, j.run_at ASC, j.id ASC
        LIMIT $3
        FOR UPDATE SKIP LOCKED
    )
    RETURNING id, job, attempts, max_attempts, metadata, run_at"
);

pub(crate) const NEXT_DUE: &str = "SELECT MIN(t) FROM (
        SELECT MIN(run_at) * 1000 AS t FROM snapq_jobs
        WHERE job_type = $1 AND status = 'Pending' AND lock_by IS NULL
        UNION ALL
        SELECT MIN(GREATEST(j.run_at * 1000, COALESCE(s.next_run_ms, 0))) AS t
        FROM snapq_jobs j LEFT JOIN snapq_job_state s ON s.id = j.id
        WHERE j.job_type = $1 AND j.status = 'Failed' AND j.attempts < j.max_attempts
    ) d";

/// Which of the given queues ($1 text[]) have a job due now ($2 now (s), $3 now (ms)): the
/// polling half of the wake-ups (see `worker::pg_wakeups`).
pub(crate) const DUE_QUEUES: &str = concat!(
    "SELECT q FROM unnest($1::text[]) AS q WHERE EXISTS (
        SELECT 1 FROM snapq_jobs j
        WHERE j.job_type = q AND j.status IN ('Pending', 'Failed') AND ",
    due!("$2", "$3"),
    ")"
);

// ---- finishing an attempt --------------------------------------------------------------------

pub(crate) const FINISH_DONE: &str = "UPDATE snapq_jobs SET status = 'Done', attempts = $3,
        done_at = $4, last_result = '{\"Ok\":null}', lock_by = NULL, lock_at = NULL
    WHERE id = $1 AND lock_by = $2";

pub(crate) const FINISH_DONE_MANY: &str = "UPDATE snapq_jobs SET status = 'Done',
        attempts = attempts + 1, done_at = $3, last_result = '{\"Ok\":null}',
        lock_by = NULL, lock_at = NULL
    WHERE id IN (SELECT jsonb_array_elements_text($1::jsonb)) AND lock_by = $2
    RETURNING id";

pub(crate) const FINISH_DEAD: &str = "UPDATE snapq_jobs SET status = 'Failed', attempts = $3,
        max_attempts = LEAST(max_attempts, $3), done_at = $4, last_result = $5,
        lock_by = NULL, lock_at = NULL
    WHERE id = $1 AND lock_by = $2";

pub(crate) const FINISH_RETRY: &str = "UPDATE snapq_jobs SET status = 'Failed', attempts = $3,
        run_at = $4, done_at = NULL, last_result = $5, lock_by = NULL, lock_at = NULL
    WHERE id = $1 AND lock_by = $2";

pub(crate) const FINISH_CANCELLED: &str = "UPDATE snapq_jobs SET status = 'Killed',
        attempts = $3, done_at = $4, last_result = $5, lock_by = NULL, lock_at = NULL
    WHERE id = $1 AND lock_by = $2";

pub(crate) const RELEASE: &str = "UPDATE snapq_jobs SET status = 'Pending', run_at = $3,
        lock_by = NULL, lock_at = NULL
    WHERE id = $1 AND lock_by = $2";

pub(crate) const FINISH_ATTEMPT: &str = "UPDATE snapq_job_attempts
    SET finished_ms = $4, outcome = $5, error = $6
    WHERE job_id = $1 AND attempt = $2 AND worker = $3";

pub(crate) const ATTEMPT_ALREADY_OK: &str = "SELECT EXISTS (SELECT 1 FROM snapq_job_attempts
    WHERE job_id = $1 AND attempt = $2 AND worker = $3 AND outcome = 'ok')";

pub(crate) const SET_NEXT_RUN: &str = "INSERT INTO snapq_job_state (id, next_run_ms, updated_ms)
    VALUES ($1, $2, $3)
    ON CONFLICT (id) DO UPDATE SET next_run_ms = excluded.next_run_ms,
        updated_ms = excluded.updated_ms";

pub(crate) const CLEAR_STATE_FLAGS: &str = "UPDATE snapq_job_state
    SET next_run_ms = NULL, cancel_requested_ms = NULL, cancel_requested_by = NULL, updated_ms = $2
    WHERE id = $1 AND (next_run_ms IS NOT NULL OR cancel_requested_ms IS NOT NULL)";

pub(crate) const CANCEL_REQUESTED: &str = "SELECT cancel_requested_by FROM snapq_job_state
    WHERE id = $1 AND cancel_requested_ms IS NOT NULL";

pub(crate) const SET_PROGRESS: &str = "INSERT INTO snapq_job_state
        (id, progress_done, progress_total, progress_note, progress_ms, updated_ms)
    VALUES ($1, $2, $3, $4, $5, $5)
    ON CONFLICT (id) DO UPDATE SET progress_done = excluded.progress_done,
        progress_total = excluded.progress_total, progress_note = excluded.progress_note,
        progress_ms = excluded.progress_ms, updated_ms = excluded.updated_ms";

// ---- workers, heartbeats, orphans ------------------------------------------------------------

// Heartbeats carry the database's clock, not the node's: nodes judge each other by when the
// heartbeats arrived, so a node whose clock is off is neither taken for dead nor kept alive.
// (`$6` / `$2`, the node's time, only dates the registration.)

pub(crate) const REGISTER_WORKER: &str = "INSERT INTO snapq_workers
        (id, instance, kind, hostname, pid, started_ms, last_seen_ms)
    VALUES ($1, $2, $3, $4, $5, $6, (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT)";

/// $1 instance, $2 the node's time (ms; unused, see above)
pub(crate) const HEARTBEAT: &str = "UPDATE snapq_workers
    SET last_seen_ms = (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT
    WHERE instance = $1 AND stopped_ms IS NULL AND $2::BIGINT IS NOT NULL";

/// The last column is the heartbeat's age on the database's clock, which heartbeats are written
/// with: a node whose own clock is off still sees the right age.
pub(crate) const LIVE_WORKERS: &str = "SELECT id, kind, hostname, pid, started_ms, last_seen_ms,
      (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT - last_seen_ms
    FROM snapq_workers WHERE stopped_ms IS NULL ORDER BY hostname, kind, id";

pub(crate) const STOP_WORKERS: &str =
    "UPDATE snapq_workers SET stopped_ms = $2 WHERE instance = $1 AND stopped_ms IS NULL";

/// Unlike SQLite's twin: $3 how long without a heartbeat (ms) before a worker of a process
/// that is gone counts as dead (see `worker::mark_dead_local_workers`).
pub(crate) const SAME_HOST_WORKERS: &str = "SELECT id, pid FROM snapq_workers
    WHERE hostname = $1 AND instance != $2 AND stopped_ms IS NULL
      AND last_seen_ms < (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT - $3";

pub(crate) const MARK_WORKER_DEAD: &str =
    "UPDATE snapq_workers SET last_seen_ms = 0, stopped_ms = $2 WHERE id = $1";

/// Workers of any node that hold running jobs but stopped heartbeating, by the database's
/// clock. Unlike SQLite's twin: $1 `orphan_after` (ms), $2 our instance.
pub(crate) const STALE_WORKERS: &str = "SELECT w.id FROM snapq_workers w
    WHERE w.last_seen_ms < (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT - $1
      AND w.instance != $2
      AND EXISTS (SELECT 1 FROM snapq_jobs j
                  WHERE j.lock_by = w.id AND j.status IN ('Running', 'Queued'))";

pub(crate) const REQUEUE_ORPHANS: &str = "UPDATE snapq_jobs SET
        status = CASE WHEN attempts + 1 >= max_attempts THEN 'Failed' ELSE 'Pending' END,
        done_at = CASE WHEN attempts + 1 >= max_attempts THEN $2 ELSE NULL END,
        attempts = attempts + 1, run_at = $2, lock_by = NULL, lock_at = NULL, last_result = $3
    WHERE lock_by = $1 AND status IN ('Running', 'Queued')
    RETURNING id, job_type, status, attempts";

pub(crate) const LOSE_OPEN_ATTEMPTS: &str = "UPDATE snapq_job_attempts
    SET finished_ms = $2, outcome = 'lost', error = $3
    WHERE job_id = $1 AND finished_ms IS NULL";

pub(crate) const CANCEL_REQUESTS: &str =
    "SELECT id FROM snapq_job_state WHERE cancel_requested_ms IS NOT NULL";

// ---- terminal outcomes ----------------------------------------------------------------------

/// Instead of SQLite's `TERMINAL_PENDING`: outbox rows no node holds, leased to this one, with
/// their job as it is now, so each reaches one node's hook (another's only once the lease ran
/// out). $1 limit, $2 our instance, $3 lease (ms)
pub(crate) const TERMINAL_LEASE: &str = concat!(
    "WITH leased AS (
        UPDATE snapq_terminal
        SET lease_by = $2,
            lease_until_ms = (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT + $3
        WHERE id IN (
            SELECT id FROM snapq_terminal
            WHERE lease_until_ms IS NULL
               OR lease_until_ms < (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT
            ORDER BY at_ms LIMIT $1
            FOR UPDATE SKIP LOCKED)
        RETURNING id, at_ms
    )
    SELECT t.id, j.job_type, j.job, ",
    state_expr!(),
    " AS state, j.last_result, j.metadata
    FROM leased t LEFT JOIN snapq_jobs j ON j.id = t.id
    ORDER BY t.at_ms"
);

/// The hook refused the row: offer it again (to any node). $1 id
pub(crate) const TERMINAL_RELEASE: &str =
    "UPDATE snapq_terminal SET lease_by = NULL, lease_until_ms = NULL WHERE id = $1";

pub(crate) const TERMINAL_DONE: &str = "DELETE FROM snapq_terminal WHERE id = $1";

// ---- user operations -------------------------------------------------------------------------

pub(crate) const CANCEL_WAITING: &str = "UPDATE snapq_jobs SET status = 'Killed', done_at = $2,
        last_result = $3, lock_by = NULL, lock_at = NULL
    WHERE id = $1 AND ((status = 'Pending' AND lock_by IS NULL)
        OR (status = 'Failed' AND attempts < max_attempts))";

pub(crate) const REQUEST_CANCEL: &str = "INSERT INTO snapq_job_state
        (id, cancel_requested_ms, cancel_requested_by, updated_ms) VALUES ($1, $2, $3, $2)
    ON CONFLICT (id) DO UPDATE SET cancel_requested_ms = excluded.cancel_requested_ms,
        cancel_requested_by = excluded.cancel_requested_by, updated_ms = excluded.updated_ms";

pub(crate) const RETRY_FINISHED: &str = "UPDATE snapq_jobs SET status = 'Pending', run_at = $2,
        done_at = NULL, lock_by = NULL, lock_at = NULL, max_attempts = attempts + $3
    WHERE id = $1 AND (status = 'Killed' OR (status = 'Failed' AND attempts >= max_attempts))
    RETURNING job_type";

pub(crate) const STATE_OF: &str = concat!(
    "SELECT ",
    state_expr!(),
    " AS state, j.job_type FROM snapq_jobs j WHERE j.id = $1"
);

pub(crate) const SHOW_JOB: &str = concat!(pg_select_job!(), " WHERE j.id = $1");

/// $1 queue name or NULL, $2 state or NULL, $3 limit. Newest first (ids are ULIDs).
pub(crate) const LIST_JOBS: &str = concat!(
    "SELECT * FROM (",
    pg_select_job!(),
    ") v
    WHERE ($1::text IS NULL OR v.job_type = $1) AND ($2::text IS NULL OR v.state = $2)
    ORDER BY v.id DESC LIMIT $3"
);

pub(crate) const ATTEMPTS_OF: &str =
    "SELECT attempt, worker, started_ms, finished_ms, outcome, error
    FROM snapq_job_attempts WHERE job_id = $1 ORDER BY seq";

pub(crate) const COUNTS: &str = concat!(
    "SELECT j.job_type, ",
    state_expr!(),
    " AS state, COUNT(*) FROM snapq_jobs j GROUP BY 1, 2"
);

pub(crate) const OLDEST_PENDING: &str = "SELECT job_type, MIN(run_at) FROM snapq_jobs
    WHERE status = 'Pending' AND lock_by IS NULL AND run_at <= $1 GROUP BY job_type";

pub(crate) const DONE_SINCE: &str = "SELECT job_type, COUNT(*) FROM snapq_jobs
    WHERE status = 'Done' AND done_at IS NOT NULL AND done_at >= $1 GROUP BY job_type";

pub(crate) const PRUNABLE: &str = "SELECT id FROM snapq_jobs
    WHERE status IN ('Done', 'Killed', 'Failed') AND done_at IS NOT NULL AND done_at < $1
      AND (status != 'Failed' OR attempts >= max_attempts)
    LIMIT $2";

pub(crate) const PRUNE_TERMINAL: &str =
    "DELETE FROM snapq_terminal WHERE id IN (SELECT jsonb_array_elements_text($1::jsonb))";
pub(crate) const PRUNE_JOBS: &str =
    "DELETE FROM snapq_jobs WHERE id IN (SELECT jsonb_array_elements_text($1::jsonb))";
pub(crate) const PRUNE_STATE: &str =
    "DELETE FROM snapq_job_state WHERE id IN (SELECT jsonb_array_elements_text($1::jsonb))";
pub(crate) const PRUNE_ATTEMPTS: &str =
    "DELETE FROM snapq_job_attempts WHERE job_id IN (SELECT jsonb_array_elements_text($1::jsonb))";
