//! The SQL the queue runs against apalis' `Jobs`/`Workers` tables and our own tables.
//! Kept together so the state mapping (see `JobState`) is visible in one place. Each statement
//! has a PostgreSQL twin of the same name and parameters in `sql_pg`.

/// apalis status + counters → our state name.
macro_rules! state_expr {
    () => {
        "CASE
            WHEN j.status = 'Done' THEN 'done'
            WHEN j.status = 'Killed' THEN 'cancelled'
            WHEN j.status = 'Failed' AND j.attempts >= j.max_attempts THEN 'failed'
            WHEN j.status = 'Failed' THEN 'retrying'
            WHEN j.status IN ('Running', 'Queued') THEN 'running'
            ELSE 'pending'
        END"
    };
}

/// Same columns and conflict rule as apalis-sqlite's `queries/task/sink.sql`.
pub(crate) const INSERT_JOB: &str =
    "INSERT INTO Jobs (job, id, job_type, status, attempts, max_attempts,
        run_at, last_result, lock_at, lock_by, done_at, priority, metadata, idempotency_key)
    VALUES (?1, ?2, ?3, 'Pending', 0, ?4, ?5, NULL, NULL, NULL, NULL, ?6, ?7, ?8)
    ON CONFLICT(job_type, idempotency_key) DO NOTHING";

/// Enqueue straight into a free local worker slot (no idempotency key, due now): the job is
/// inserted `Running`, locked by that worker, unless an already due job of the same queue
/// would be claimed before it (pending or retrying, priority at least as high); then it is
/// inserted `Pending` like `INSERT_JOB`. One autocommit statement; the
/// `snapq_attempt_insert` trigger (see `db::SCHEMA`) writes the attempt row of a `Running`
/// insert in the same statement. Returns the status the row got.
/// ?1 job, ?2 id, ?3 queue, ?4 max_attempts, ?5 now (s), ?6 priority, ?7 metadata,
/// ?8 worker, ?9 now (ms)
pub(crate) const INSERT_JOB_CLAIMED: &str =
    "INSERT INTO Jobs (job, id, job_type, status, attempts, max_attempts,
        run_at, last_result, lock_at, lock_by, done_at, priority, metadata, idempotency_key)
    SELECT ?1, ?2, ?3, CASE WHEN c.free THEN 'Running' ELSE 'Pending' END, 0, ?4,
        ?5, NULL, CASE WHEN c.free THEN ?5 END, CASE WHEN c.free THEN ?8 END, NULL, ?6, ?7, NULL
    FROM (SELECT NOT EXISTS (
            SELECT 1 FROM Jobs
            WHERE job_type = ?3 AND status = 'Pending' AND lock_by IS NULL AND run_at <= ?5
                AND priority >= ?6
            UNION ALL
            SELECT 1 FROM Jobs
            WHERE job_type = ?3 AND status = 'Failed' AND attempts < max_attempts
                AND run_at <= ?5 AND priority >= ?6
                AND NOT EXISTS (SELECT 1 FROM snapq_job_state s
                                WHERE s.id = Jobs.id AND s.next_run_ms > ?9)
        ) AS free) AS c
    WHERE true
    RETURNING status";

pub(crate) const FIND_BY_IDEMPOTENCY_KEY: &str =
    "SELECT id FROM Jobs WHERE job_type = ?1 AND idempotency_key = ?2";

/// apalis' `fetch_next.sql`, claiming straight into `Running` (we only claim what we have
/// free slots for, so nothing sits `Queued` in a buffer), and honouring our millisecond retry
/// time for `Failed` rows. One autocommit statement: the `snapq_attempt_start` trigger (see
/// `db::SCHEMA`) records each claimed job's attempt in the same statement.
/// ?1 worker, ?2 queue, ?3 limit, ?4 now (s), ?5 now (ms)
pub(crate) const CLAIM: &str = "UPDATE Jobs SET status = 'Running', lock_by = ?1, lock_at = ?4
    WHERE ROWID IN (
        SELECT rid FROM (
            SELECT * FROM (
                SELECT ROWID AS rid, priority, run_at, id FROM Jobs
                WHERE job_type = ?2 AND status = 'Pending' AND lock_by IS NULL AND run_at <= ?4
                ORDER BY priority DESC, run_at ASC, id ASC LIMIT ?3
            )
            UNION ALL
            SELECT * FROM (
                SELECT ROWID AS rid, priority, run_at, id FROM Jobs
                WHERE job_type = ?2 AND status = 'Failed' AND attempts < max_attempts
                    AND run_at <= ?4
                    AND NOT EXISTS (SELECT 1 FROM snapq_job_state s
                                    WHERE s.id = Jobs.id AND s.next_run_ms > ?5)
                ORDER BY priority DESC, run_at ASC, id ASC LIMIT ?3
            )
        )
        ORDER BY priority DESC, run_at ASC, id ASC LIMIT ?3
    )
    RETURNING id, job, attempts, max_attempts, metadata, run_at";

/// When the next pending or retrying job of a queue becomes due (ms), if any.
pub(crate) const NEXT_DUE: &str = "SELECT MIN(t) FROM (
        SELECT MIN(run_at) * 1000 AS t FROM Jobs
        WHERE job_type = ?1 AND status = 'Pending' AND lock_by IS NULL
        UNION ALL
        SELECT MIN(MAX(j.run_at * 1000, COALESCE(s.next_run_ms, 0))) AS t
        FROM Jobs j LEFT JOIN snapq_job_state s ON s.id = j.id
        WHERE j.job_type = ?1 AND j.status = 'Failed' AND j.attempts < j.max_attempts
    )";

// ---- finishing an attempt (?1 id, ?2 worker, ...) -------------------------------------------

pub(crate) const FINISH_DONE: &str = "UPDATE Jobs SET status = 'Done', attempts = ?3,
        done_at = ?4, last_result = '{\"Ok\":null}', lock_by = NULL, lock_at = NULL
    WHERE id = ?1 AND lock_by = ?2";

/// Many successes of one worker in one statement (the `snapq_attempt_done` trigger closes
/// their attempts). `attempts + 1` is the claimed attempt: nothing else changes `attempts`
/// while the row is locked by this worker. Returns the ids actually finished; a missing one
/// was re-queued by someone else meanwhile (its outcome is then recorded as lost).
/// ?1 JSON array of ids, ?2 worker, ?3 now (s)
pub(crate) const FINISH_DONE_MANY: &str = "UPDATE Jobs SET status = 'Done',
        attempts = attempts + 1, done_at = ?3, last_result = '{\"Ok\":null}',
        lock_by = NULL, lock_at = NULL
    WHERE id IN (SELECT value FROM json_each(?1)) AND lock_by = ?2
    RETURNING id";

/// Dead: permanent error, or the last allowed attempt failed. `max_attempts` is lowered to the
/// attempts used so a permanent failure reads as dead to apalis too.
pub(crate) const FINISH_DEAD: &str = "UPDATE Jobs SET status = 'Failed', attempts = ?3,
        max_attempts = MIN(max_attempts, ?3), done_at = ?4, last_result = ?5,
        lock_by = NULL, lock_at = NULL
    WHERE id = ?1 AND lock_by = ?2";

/// ?4 run_at (s, floor of ?6)
pub(crate) const FINISH_RETRY: &str = "UPDATE Jobs SET status = 'Failed', attempts = ?3,
        run_at = ?4, done_at = NULL, last_result = ?5, lock_by = NULL, lock_at = NULL
    WHERE id = ?1 AND lock_by = ?2";

pub(crate) const FINISH_CANCELLED: &str = "UPDATE Jobs SET status = 'Killed', attempts = ?3,
        done_at = ?4, last_result = ?5, lock_by = NULL, lock_at = NULL
    WHERE id = ?1 AND lock_by = ?2";

/// Back to pending without counting the attempt (graceful shutdown ran out of time).
pub(crate) const RELEASE: &str = "UPDATE Jobs SET status = 'Pending', run_at = ?3,
        lock_by = NULL, lock_at = NULL
    WHERE id = ?1 AND lock_by = ?2";

/// ?1 job id, ?2 attempt, ?3 worker, ?4 finished (ms), ?5 outcome, ?6 error
pub(crate) const FINISH_ATTEMPT: &str = "UPDATE snapq_job_attempts
    SET finished_ms = ?4, outcome = ?5, error = ?6
    WHERE job_id = ?1 AND attempt = ?2 AND worker = ?3";

/// Whether this attempt was already recorded as a success (by an earlier commit of the same
/// outcome, whose batch failed later and is being written again). ?1 id, ?2 attempt, ?3 worker
pub(crate) const ATTEMPT_ALREADY_OK: &str = "SELECT EXISTS (SELECT 1 FROM snapq_job_attempts
    WHERE job_id = ?1 AND attempt = ?2 AND worker = ?3 AND outcome = 'ok')";

pub(crate) const SET_NEXT_RUN: &str = "INSERT INTO snapq_job_state (id, next_run_ms, updated_ms)
    VALUES (?1, ?2, ?3)
    ON CONFLICT(id) DO UPDATE SET next_run_ms = excluded.next_run_ms,
        updated_ms = excluded.updated_ms";

pub(crate) const CLEAR_STATE_FLAGS: &str = "UPDATE snapq_job_state
    SET next_run_ms = NULL, cancel_requested_ms = NULL, cancel_requested_by = NULL, updated_ms = ?2
    WHERE id = ?1 AND (next_run_ms IS NOT NULL OR cancel_requested_ms IS NOT NULL)";

pub(crate) const CANCEL_REQUESTED: &str = "SELECT cancel_requested_by FROM snapq_job_state WHERE id = ?1 AND cancel_requested_ms IS NOT NULL";

pub(crate) const SET_PROGRESS: &str = "INSERT INTO snapq_job_state
        (id, progress_done, progress_total, progress_note, progress_ms, updated_ms)
    VALUES (?1, ?2, ?3, ?4, ?5, ?5)
    ON CONFLICT(id) DO UPDATE SET progress_done = excluded.progress_done,
        progress_total = excluded.progress_total, progress_note = excluded.progress_note,
        progress_ms = excluded.progress_ms, updated_ms = excluded.updated_ms";

// ---- workers, heartbeats, orphans ------------------------------------------------------------

/// apalis' `Workers` row (needed: `Jobs.lock_by` is a foreign key to it).
pub(crate) const REGISTER_APALIS_WORKER: &str = "INSERT INTO Workers
        (id, worker_type, storage_name, layers, last_seen, started_at)
    VALUES (?1, ?2, 'snapq', 'snapq-jobs', ?3, ?3)";

pub(crate) const REGISTER_WORKER: &str = "INSERT INTO snapq_workers
        (id, instance, kind, hostname, pid, started_ms, last_seen_ms)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)";

pub(crate) const HEARTBEAT: &str =
    "UPDATE snapq_workers SET last_seen_ms = ?2 WHERE instance = ?1 AND stopped_ms IS NULL";

pub(crate) const HEARTBEAT_APALIS: &str = "UPDATE Workers SET last_seen = ?2
    WHERE id IN (SELECT id FROM snapq_workers WHERE instance = ?1 AND stopped_ms IS NULL)";

/// Workers of every process not marked stopped: id, kind, host, pid, started and last seen (ms).
/// The last column is the heartbeat's age on the clock heartbeats are written with (this host's).
pub(crate) const LIVE_WORKERS: &str = "SELECT id, kind, hostname, pid, started_ms, last_seen_ms,
      CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) - last_seen_ms
    FROM snapq_workers WHERE stopped_ms IS NULL ORDER BY hostname, kind, id";

pub(crate) const STOP_WORKERS: &str =
    "UPDATE snapq_workers SET stopped_ms = ?2 WHERE instance = ?1 AND stopped_ms IS NULL";

/// Workers on this host from other queue instances that are still marked alive.
pub(crate) const SAME_HOST_WORKERS: &str = "SELECT id, pid FROM snapq_workers
    WHERE hostname = ?1 AND instance != ?2 AND stopped_ms IS NULL";

pub(crate) const MARK_WORKER_DEAD: &str =
    "UPDATE snapq_workers SET last_seen_ms = 0, stopped_ms = ?2 WHERE id = ?1";

/// Workers that hold running jobs but stopped heartbeating: ours (ms heartbeats) and, for
/// completeness, plain apalis workers (s heartbeats).
/// ?1 stale before (ms), ?2 our instance
pub(crate) const STALE_WORKERS: &str = "SELECT w.id FROM snapq_workers w
    WHERE w.last_seen_ms < ?1 AND w.instance != ?2
      AND EXISTS (SELECT 1 FROM Jobs j WHERE j.lock_by = w.id AND j.status IN ('Running', 'Queued'))
    UNION
    SELECT w.id FROM Workers w
    WHERE w.last_seen < ?1 / 1000 AND NOT EXISTS (SELECT 1 FROM snapq_workers s WHERE s.id = w.id)
      AND EXISTS (SELECT 1 FROM Jobs j WHERE j.lock_by = w.id AND j.status IN ('Running', 'Queued'))";

/// Re-queue a dead worker's jobs, counting the lost attempt (a job that kills the process each
/// time must not loop forever). ?1 worker, ?2 now (s), ?3 message
pub(crate) const REQUEUE_ORPHANS: &str = "UPDATE Jobs SET
        status = CASE WHEN attempts + 1 >= max_attempts THEN 'Failed' ELSE 'Pending' END,
        done_at = CASE WHEN attempts + 1 >= max_attempts THEN ?2 ELSE NULL END,
        attempts = attempts + 1, run_at = ?2, lock_by = NULL, lock_at = NULL, last_result = ?3
    WHERE lock_by = ?1 AND status IN ('Running', 'Queued')
    RETURNING id, job_type, status, attempts";

/// ?1 job id, ?2 now (ms), ?3 error
pub(crate) const LOSE_OPEN_ATTEMPTS: &str = "UPDATE snapq_job_attempts
    SET finished_ms = ?2, outcome = 'lost', error = ?3
    WHERE job_id = ?1 AND finished_ms IS NULL";

pub(crate) const CANCEL_REQUESTS: &str =
    "SELECT id FROM snapq_job_state WHERE cancel_requested_ms IS NOT NULL";

// ---- terminal outcomes ----------------------------------------------------------------------

/// Outbox rows with their job as it is now (a job retried meanwhile is no longer terminal;
/// a pruned one has no row). ?1 limit
pub(crate) const TERMINAL_PENDING: &str = concat!(
    "SELECT t.id, j.job_type, j.job, ",
    state_expr!(),
    " AS state, j.last_result, j.metadata
    FROM snapq_terminal t LEFT JOIN Jobs j ON j.id = t.id
    ORDER BY t.at_ms LIMIT ?1"
);

pub(crate) const TERMINAL_DONE: &str = "DELETE FROM snapq_terminal WHERE id = ?1";

// ---- user operations -------------------------------------------------------------------------

/// ?1 id, ?2 now (s), ?3 message
pub(crate) const CANCEL_WAITING: &str = "UPDATE Jobs SET status = 'Killed', done_at = ?2,
        last_result = ?3, lock_by = NULL, lock_at = NULL
    WHERE id = ?1 AND ((status = 'Pending' AND lock_by IS NULL)
        OR (status = 'Failed' AND attempts < max_attempts))";

/// ?1 id, ?2 now (ms), ?3 who
pub(crate) const REQUEST_CANCEL: &str = "INSERT INTO snapq_job_state
        (id, cancel_requested_ms, cancel_requested_by, updated_ms) VALUES (?1, ?2, ?3, ?2)
    ON CONFLICT(id) DO UPDATE SET cancel_requested_ms = excluded.cancel_requested_ms,
        cancel_requested_by = excluded.cancel_requested_by, updated_ms = excluded.updated_ms";

/// Failed (dead) or cancelled → pending with a fresh attempt budget. ?1 id, ?2 now (s),
/// ?3 extra attempts
pub(crate) const RETRY_FINISHED: &str = "UPDATE Jobs SET status = 'Pending', run_at = ?2,
        done_at = NULL, lock_by = NULL, lock_at = NULL, max_attempts = attempts + ?3
    WHERE id = ?1 AND (status = 'Killed' OR (status = 'Failed' AND attempts >= max_attempts))
    RETURNING job_type";

pub(crate) const STATE_OF: &str = concat!(
    "SELECT ",
    state_expr!(),
    " AS state, j.job_type FROM Jobs j WHERE j.id = ?1"
);

/// The columns `queue::job_from_row` reads, from `Jobs j` joined with its state.
macro_rules! select_job {
    () => {
        concat!(
            "SELECT j.id, j.job_type, j.job, ",
            state_expr!(),
            " AS state, j.attempts, j.max_attempts, j.priority, j.idempotency_key, j.run_at, j.done_at,
    j.last_result, j.lock_by, j.metadata,
    s.progress_done, s.progress_total, s.progress_note, s.progress_ms, s.next_run_ms,
    s.cancel_requested_ms,
    (SELECT MIN(a.started_ms) FROM snapq_job_attempts a WHERE a.job_id = j.id) AS started_ms,
    (SELECT MAX(a.finished_ms) FROM snapq_job_attempts a WHERE a.job_id = j.id) AS finished_ms
    FROM Jobs j LEFT JOIN snapq_job_state s ON s.id = j.id"
        )
    };
}

pub(crate) const SHOW_JOB: &str = concat!(select_job!(), " WHERE j.id = ?1");

/// ?1 queue name or NULL, ?2 state or NULL, ?3 limit. Newest first (ids are ULIDs).
pub(crate) const LIST_JOBS: &str = concat!(
    select_job!(),
    "
    WHERE (?1 IS NULL OR j.job_type = ?1) AND (?2 IS NULL OR state = ?2)
    ORDER BY j.id DESC LIMIT ?3"
);

pub(crate) const ATTEMPTS_OF: &str =
    "SELECT attempt, worker, started_ms, finished_ms, outcome, error
    FROM snapq_job_attempts WHERE job_id = ?1 ORDER BY seq";

pub(crate) const COUNTS: &str = concat!(
    "SELECT j.job_type, ",
    state_expr!(),
    " AS state, COUNT(*) FROM Jobs j GROUP BY j.job_type, state"
);

pub(crate) const OLDEST_PENDING: &str = "SELECT job_type, MIN(run_at) FROM Jobs
    WHERE status = 'Pending' AND lock_by IS NULL AND run_at <= ?1 GROUP BY job_type";

pub(crate) const DONE_SINCE: &str = "SELECT job_type, COUNT(*) FROM Jobs
    WHERE status = 'Done' AND done_at IS NOT NULL AND done_at >= ?1 GROUP BY job_type";

/// Finished jobs older than the cutoff (s), in chunks. Not apalis' `vacuum`, which compares
/// `run_at` to a text datetime and so deletes every finished job.
pub(crate) const PRUNABLE: &str = "SELECT id FROM Jobs
    WHERE status IN ('Done', 'Killed', 'Failed') AND done_at IS NOT NULL AND done_at < ?1
      AND (status != 'Failed' OR attempts >= max_attempts)
    LIMIT ?2";

pub(crate) const PRUNE_TERMINAL: &str =
    "DELETE FROM snapq_terminal WHERE id IN (SELECT value FROM json_each(?1))";
pub(crate) const PRUNE_JOBS: &str =
    "DELETE FROM Jobs WHERE id IN (SELECT value FROM json_each(?1))";
pub(crate) const PRUNE_STATE: &str =
    "DELETE FROM snapq_job_state WHERE id IN (SELECT value FROM json_each(?1))";
pub(crate) const PRUNE_ATTEMPTS: &str =
    "DELETE FROM snapq_job_attempts WHERE job_id IN (SELECT value FROM json_each(?1))";
