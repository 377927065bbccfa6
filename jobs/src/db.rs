//! Opening `queue.db`: connect options (WAL, busy timeout, synchronous=NORMAL) set on every
//! connection, one writer connection, a small read pool, apalis-sqlite's migrations, and our
//! own tables (created with plain `CREATE TABLE IF NOT EXISTS`, outside sqlx's migrations
//! table, which apalis owns in this file).
//!
//! Also the connection types the engine uses on either backend: the held `Writer`, the
//! `Reader` pool, and `Side`, which `run!` matches to pick a statement's dialect (PostgreSQL's
//! opening is in `pg`).

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicI64, Ordering},
    time::Duration,
};

use apalis_sqlite::SqliteStorage;
use sqlx::{
    Connection, Database, Pool, Postgres, Sqlite, SqliteConnection, SqlitePool,
    pool::PoolConnection,
    postgres::{PgConnection, PgPool},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};

use crate::QueueError;

/// Tables beside apalis' `Jobs`/`Workers`.
///
/// - `snapq_job_state`: per-job progress, precise retry time (apalis' `run_at` has whole
///   seconds) and cancellation requests; a row exists only once one of those happened.
/// - `snapq_job_attempts`: every attempt with its outcome and error (apalis keeps only the
///   last result).
/// - `snapq_workers`: our worker ids with host, pid and millisecond heartbeats, so a restart
///   can tell a crashed previous process from a live peer.
const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS snapq_job_state (
        id TEXT PRIMARY KEY NOT NULL,
        progress_done INTEGER,
        progress_total INTEGER,
        progress_note TEXT,
        progress_ms INTEGER,
        next_run_ms INTEGER,
        cancel_requested_ms INTEGER,
        cancel_requested_by TEXT,
        updated_ms INTEGER NOT NULL
    ) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS snapq_idx_state_cancel ON snapq_job_state(id)
        WHERE cancel_requested_ms IS NOT NULL",
    "CREATE TABLE IF NOT EXISTS snapq_job_attempts (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        worker TEXT NOT NULL,
        started_ms INTEGER NOT NULL,
        finished_ms INTEGER,
        outcome TEXT,
        error TEXT
    )",
    "CREATE INDEX IF NOT EXISTS snapq_idx_attempts_job ON snapq_job_attempts(job_id, seq)",
    "CREATE TABLE IF NOT EXISTS snapq_workers (
        id TEXT PRIMARY KEY NOT NULL,
        instance TEXT NOT NULL,
        kind TEXT NOT NULL,
        hostname TEXT NOT NULL,
        pid INTEGER NOT NULL,
        started_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL,
        stopped_ms INTEGER
    )",
    "CREATE INDEX IF NOT EXISTS snapq_idx_workers_instance ON snapq_workers(instance)",
    // apalis' ack (`UPDATE Jobs .. FROM json_each(..) WHERE Jobs.id = .. AND Jobs.lock_by = ..`)
    // is planned through the single-column `lock_by` index and revisits every row the worker
    // ever locked. With (lock_by, id) both terms are an index seek. Our own ack goes through
    // the primary key; this index also serves the orphan rescue (`lock_by = ? AND status ..`).
    "CREATE INDEX IF NOT EXISTS snapq_idx_jobs_lock_by_id ON Jobs(lock_by, id)",
    // Attempt bookkeeping rides on the job's own update, so a claim and a success are one
    // statement each (one round trip to SQLite's thread, one commit) and stay atomic with
    // the attempt row. Only our workers' claims count (apalis' own fetch goes through
    // `Queued`). The explicit per-outcome path (`FINISH_ATTEMPT`) handles everything else.
    "CREATE TRIGGER IF NOT EXISTS snapq_attempt_start AFTER UPDATE OF status ON Jobs
    WHEN NEW.status = 'Running' AND OLD.status IN ('Pending', 'Failed')
        AND NEW.lock_by IS NOT NULL
        AND EXISTS (SELECT 1 FROM snapq_workers w WHERE w.id = NEW.lock_by)
    BEGIN
        INSERT INTO snapq_job_attempts (job_id, attempt, worker, started_ms)
        VALUES (NEW.id, NEW.attempts + 1, NEW.lock_by,
            CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER));
    END",
    // The same for a job enqueued straight into a free local worker slot
    // (`sql::INSERT_JOB_CLAIMED`): the insert and its attempt row are one statement.
    "CREATE TRIGGER IF NOT EXISTS snapq_attempt_insert AFTER INSERT ON Jobs
    WHEN NEW.status = 'Running' AND NEW.lock_by IS NOT NULL
        AND EXISTS (SELECT 1 FROM snapq_workers w WHERE w.id = NEW.lock_by)
    BEGIN
        INSERT INTO snapq_job_attempts (job_id, attempt, worker, started_ms)
        VALUES (NEW.id, NEW.attempts + 1, NEW.lock_by,
            CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER));
    END",
    // The terminal-outcome outbox: a job that becomes dead or cancelled, by whatever path
    // (its handler's last attempt, a cancel while it waited, the orphan rescue, a panic),
    // leaves its id here in the same statement, and `worker::terminal_dispatch` hands it to
    // the queue's terminal hook until the hook succeeds, also across a crash.
    "CREATE TABLE IF NOT EXISTS snapq_terminal (
        id TEXT PRIMARY KEY NOT NULL,
        at_ms INTEGER NOT NULL
    ) WITHOUT ROWID",
    "CREATE TRIGGER IF NOT EXISTS snapq_terminal_outbox AFTER UPDATE OF status ON Jobs
    WHEN NEW.status = 'Killed' OR (NEW.status = 'Failed' AND NEW.attempts >= NEW.max_attempts)
    BEGIN
        INSERT OR REPLACE INTO snapq_terminal (id, at_ms)
        VALUES (NEW.id, CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER));
    END",
    "CREATE TRIGGER IF NOT EXISTS snapq_attempt_done AFTER UPDATE OF status ON Jobs
    WHEN NEW.status = 'Done' AND OLD.status = 'Running' AND OLD.lock_by IS NOT NULL
    BEGIN
        UPDATE snapq_job_attempts
        SET finished_ms = CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER),
            outcome = 'ok', error = NULL
        WHERE job_id = NEW.id AND attempt = NEW.attempts AND worker = OLD.lock_by
            AND finished_ms IS NULL;
    END",
];

/// The single writer connection, held for the life of the queue and handed out behind an
/// async mutex. Every write (enqueue, claim, outcomes, user operations) goes through it, so
/// writers in this process never meet in SQLite's busy handler (on PostgreSQL: one
/// connection per node writes, and nodes meet only in row locks).
///
/// Why not `&pool` per statement: a pool acquire (plus its liveness ping) costs extra thread
/// hand-offs: `SELECT 1` through a one-connection pool measured 36–109 µs on the 2-core bench
/// machine, on a held connection behind this mutex ~9 µs.
pub(crate) struct Held<DB: Database> {
    pool: Pool<DB>,
    conn: Mutex<Option<PoolConnection<DB>>>,
}

impl<DB: Database> Held<DB> {
    pub(crate) fn new(pool: Pool<DB>) -> Held<DB> {
        Held {
            pool,
            conn: Mutex::new(None),
        }
    }

    async fn lock(&self) -> Result<MappedMutexGuard<'_, DB::Connection>, sqlx::Error> {
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            *guard = Some(self.pool.acquire().await?);
        }
        Ok(MutexGuard::map(guard, |c| {
            &mut **c.as_mut().expect("connection set above")
        }))
    }

    async fn check(&self) {
        let mut guard = self.conn.lock().await;
        let dead = match guard.as_mut() {
            Some(conn) => conn.ping().await.is_err(),
            None => false,
        };
        if dead && let Some(mut conn) = guard.take() {
            conn.close_on_drop();
        }
    }

    async fn close(&self) {
        drop(self.conn.lock().await.take());
        self.pool.close().await;
    }
}

/// The writer of either backend.
pub(crate) enum Writer {
    Sqlite(Held<Sqlite>),
    Pg(Held<Postgres>),
}

/// One of two things, by backend: what `run!` dispatches on (connections, pools).
pub(crate) enum Side<S, P> {
    Sqlite(S),
    Pg(P),
}

/// A connection of either backend, borrowed: the writer, or a transaction on it.
pub(crate) type Conn<'a> = Side<&'a mut SqliteConnection, &'a mut PgConnection>;

/// Exclusive use of the writer connection until dropped.
pub(crate) type WriterConn<'a> =
    Side<MappedMutexGuard<'a, SqliteConnection>, MappedMutexGuard<'a, PgConnection>>;

/// A transaction on the writer connection.
pub(crate) type Tx<'a> = Side<sqlx::Transaction<'a, Sqlite>, sqlx::Transaction<'a, Postgres>>;

impl Writer {
    /// Take the writer connection (waiting for the current user, first come first served).
    pub(crate) async fn lock(&self) -> Result<WriterConn<'_>, sqlx::Error> {
        Ok(match self {
            Writer::Sqlite(h) => Side::Sqlite(h.lock().await?),
            Writer::Pg(h) => Side::Pg(h.lock().await?),
        })
    }

    /// After an error: if the held connection no longer answers, drop it so the next `lock`
    /// opens a fresh one (the pool replaces it).
    pub(crate) async fn check(&self) {
        match self {
            Writer::Sqlite(h) => h.check().await,
            Writer::Pg(h) => h.check().await,
        }
    }

    pub(crate) async fn close(&self) {
        match self {
            Writer::Sqlite(h) => h.close().await,
            Writer::Pg(h) => h.close().await,
        }
    }
}

impl WriterConn<'_> {
    pub(crate) fn conn(&mut self) -> Conn<'_> {
        match self {
            Side::Sqlite(c) => Side::Sqlite(&mut **c),
            Side::Pg(c) => Side::Pg(&mut **c),
        }
    }

    pub(crate) async fn begin(&mut self) -> Result<Tx<'_>, sqlx::Error> {
        Ok(match self {
            Side::Sqlite(c) => Side::Sqlite(c.begin().await?),
            Side::Pg(c) => Side::Pg(c.begin().await?),
        })
    }
}

impl Tx<'_> {
    pub(crate) fn conn(&mut self) -> Conn<'_> {
        match self {
            Side::Sqlite(c) => Side::Sqlite(&mut **c),
            Side::Pg(c) => Side::Pg(&mut **c),
        }
    }

    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Side::Sqlite(t) => t.commit().await,
            Side::Pg(t) => t.commit().await,
        }
    }

    pub(crate) async fn rollback(self) -> Result<(), sqlx::Error> {
        match self {
            Side::Sqlite(t) => t.rollback().await,
            Side::Pg(t) => t.rollback().await,
        }
    }
}

impl Conn<'_> {
    /// The same connection, borrowed again (to pass it on and use it after).
    pub(crate) fn re(&mut self) -> Conn<'_> {
        match self {
            Side::Sqlite(c) => Side::Sqlite(&mut **c),
            Side::Pg(c) => Side::Pg(&mut **c),
        }
    }
}

/// The read pool of either backend.
pub(crate) enum Reader {
    Sqlite(SqlitePool),
    Pg(PgPool),
}

impl Reader {
    pub(crate) fn on(&self) -> Side<&SqlitePool, &PgPool> {
        match self {
            Reader::Sqlite(p) => Side::Sqlite(p),
            Reader::Pg(p) => Side::Pg(p),
        }
    }

    pub(crate) async fn close(&self) {
        match self {
            Reader::Sqlite(p) => p.close().await,
            Reader::Pg(p) => p.close().await,
        }
    }
}

pub(crate) struct Db {
    pub(crate) writer: Writer,
    pub(crate) reader: Reader,
}

fn not_a_queue(path: &Path, reason: impl Into<String>) -> QueueError {
    QueueError::NotAQueue {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// SQLite result codes that mean "this file is not (or no longer) a database".
fn is_corruption(e: &sqlx::Error) -> Option<String> {
    if let sqlx::Error::Database(db) = e {
        let code = db.code().unwrap_or_default();
        // 26 SQLITE_NOTADB, 11 SQLITE_CORRUPT (extended codes keep the low byte).
        let primary = code.parse::<i32>().map(|c| c & 0xff).unwrap_or(-1);
        if primary == 26 || primary == 11 {
            return Some(db.message().to_owned());
        }
    }
    None
}

fn map_open_err(path: &Path, e: sqlx::Error) -> QueueError {
    match is_corruption(&e) {
        Some(reason) => not_a_queue(path, reason),
        None => QueueError::Database(e),
    }
}

/// Refuse a file that exists and is not SQLite before handing it to SQLite, which would
/// otherwise report the problem only at the first query.
fn check_header(path: &Path) -> Result<(), QueueError> {
    use snapq_core::verify::{self, VerifyError};
    if !path.exists() {
        return Ok(());
    }
    match verify::check_header(path) {
        // An empty file becomes a fresh database.
        Ok(()) | Err(VerifyError::Empty) => Ok(()),
        Err(VerifyError::Io(e)) => Err(not_a_queue(path, format!("cannot read it: {e}"))),
        Err(_) => Err(not_a_queue(path, "no SQLite header")),
    }
}

pub(crate) fn connect_options(path: &Path, busy_timeout: Duration) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // NORMAL in WAL mode: a process crash loses nothing; only a power loss can drop the
        // last transactions. apalis' `setup` sets OFF with a one-off pragma on one connection.
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(busy_timeout)
        .foreign_keys(true)
        .pragma("temp_store", "memory")
        .pragma("cache_size", "-16000")
}

pub(crate) async fn open(path: &Path, busy_timeout: Duration) -> Result<Db, QueueError> {
    check_header(path)?;
    let opts = connect_options(path, busy_timeout);
    // One writer connection: several writers in one process only collide in the busy handler.
    let writer = SqlitePoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .acquire_timeout(Duration::from_secs(60))
        .connect_with(opts.clone())
        .await
        .map_err(|e| map_open_err(path, e))?;

    // Surface a damaged file as such rather than as a migration error.
    // (Reading the schema is cheap; a full `quick_check` would scan the whole file.)
    let schema: Result<i64, _> = sqlx::query_scalar("SELECT count(*) FROM sqlite_schema")
        .fetch_one(&writer)
        .await;
    if let Err(e) = schema {
        return Err(map_open_err(path, e));
    }

    SqliteStorage::migrations()
        .run(&writer)
        .await
        .map_err(|source| match source {
            sqlx::migrate::MigrateError::Execute(e) if is_corruption(&e).is_some() => {
                map_open_err(path, e)
            }
            source => QueueError::Migrate {
                path: PathBuf::from(path),
                source,
            },
        })?;
    for stmt in SCHEMA {
        sqlx::query(*stmt).execute(&writer).await?;
    }
    // Statistics let the planner see that `lock_by` is not selective, so apalis' ack plan
    // starts from its few task ids and seeks (lock_by, id). `analysis_limit` keeps it cheap.
    sqlx::query("PRAGMA analysis_limit = 1000")
        .execute(&writer)
        .await?;
    sqlx::query("ANALYZE Jobs").execute(&writer).await?;

    let reader = SqlitePoolOptions::new()
        .max_connections(4)
        .min_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_with(opts.read_only(true))
        .await?;
    Ok(Db {
        writer: Writer::Sqlite(Held::new(writer)),
        reader: Reader::Sqlite(reader),
    })
}

/// The queue's clock (epoch ms): this host's, plus the offset to the database's clock on
/// PostgreSQL ([`sync_clock`]), so that every node enqueues, claims and schedules retries on one
/// clock: a job a node whose clock runs ahead queues is due for the others too, and one whose
/// clock lags sees others' jobs as due.
pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis() + CLOCK_OFFSET_MS.load(Ordering::Relaxed)
}

/// [`now_ms`] as a time.
pub(crate) fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(now_ms()).unwrap_or_else(chrono::Utc::now)
}

/// The database's clock minus this host's (ms), measured by [`sync_clock`]; zero on SQLite.
/// One per process: every PostgreSQL queue in it talks to a server with one clock.
static CLOCK_OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// Measures the PostgreSQL server's clock against this host's (its reading taken as the midpoint
/// of the round trip) and makes [`now_ms`] follow it. Run when the queue opens and with every
/// heartbeat; does nothing on SQLite.
pub(crate) async fn sync_clock(reader: &Reader) -> Result<(), sqlx::Error> {
    let Reader::Pg(pool) = reader else {
        return Ok(());
    };
    let before = chrono::Utc::now().timestamp_millis();
    let db: i64 =
        sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT")
            .fetch_one(pool)
            .await?;
    let after = chrono::Utc::now().timestamp_millis();
    let offset = db - (before + after) / 2;
    let previous = CLOCK_OFFSET_MS.swap(offset, Ordering::Relaxed);
    if (offset - previous).abs() > 1000 {
        tracing::warn!(
            offset_ms = offset,
            "this host's clock differs from the database's; the queue keeps to the database's"
        );
    }
    Ok(())
}
