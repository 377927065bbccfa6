//! The queue on PostgreSQL: connecting, the schema and its migrations, and the wake-ups.
//!
//! Several server nodes share one database. The engine is the one SQLite runs (`worker`,
//! `queue`, statements in `sql_pg`); what differs lives here:
//!
//! - **Schema.** Our own tables (`snapq_jobs` with apalis' columns and statuses, plus the
//!   attempt, state, worker and outbox tables SQLite has too), created in the connection's
//!   current schema (the first of its `search_path`), so one database can hold several queues.
//!   Migrations run in one transaction under an advisory lock: two nodes starting at once take
//!   turns, and a node refuses a schema newer than itself.
//! - **Triggers** do what SQLite's do: an attempt row with each claim, the success of an attempt
//!   with its job's, and the terminal outbox row in the same statement as the job's death or
//!   cancellation. They also `NOTIFY` when a job becomes waiting (inserted, re-queued, set to
//!   retry), naming the schema and the queue.
//! - **Wake-ups.** Each node `LISTEN`s and wakes the fetcher of the named kind at once; a poll
//!   every `poll_interval` asks whether any job of a kind with free slots is due, so a lost
//!   notification (e.g. while the listening connection reconnects) delays a job by at most
//!   that interval.

use std::{sync::Arc, time::Duration};

use sqlx::{
    Connection,
    postgres::{PgConnectOptions, PgConnection, PgListener, PgPoolOptions},
};

use crate::{
    JobKind, QueueError,
    db::{Db, Held, Reader, Writer, now_ms},
    queue::Shared,
    sql_pg,
    worker::until_shutdown,
};

/// The newest schema version this build knows (the last entry of `MIGRATIONS`).
pub(crate) const SCHEMA_VERSION: i64 = 1;

/// The channel every queue on the server notifies on; the payload is `<schema> <queue name>`.
const CHANNEL: &str = "snapq_queue";

/// Schema versions and their statements, oldest first. Never edit a released entry: add one.
const MIGRATIONS: &[(i64, &[&str])] = &[(
    1,
    &[
        "CREATE TABLE snapq_jobs (
            id TEXT PRIMARY KEY,
            job_type TEXT NOT NULL,
            job BYTEA NOT NULL,
            status TEXT NOT NULL DEFAULT 'Pending',
            attempts BIGINT NOT NULL DEFAULT 0,
            max_attempts BIGINT NOT NULL DEFAULT 25,
            run_at BIGINT NOT NULL,
            last_result TEXT,
            lock_at BIGINT,
            lock_by TEXT,
            done_at BIGINT,
            priority BIGINT NOT NULL DEFAULT 0,
            metadata TEXT,
            idempotency_key TEXT,
            CONSTRAINT snapq_jobs_idempotency UNIQUE (job_type, idempotency_key)
        )",
        // Claims walk this in their order; finished jobs are not in it.
        "CREATE INDEX snapq_jobs_waiting ON snapq_jobs (job_type, priority DESC, run_at, id)
            WHERE status IN ('Pending', 'Failed')",
        "CREATE INDEX snapq_jobs_lock_by ON snapq_jobs (lock_by) WHERE lock_by IS NOT NULL",
        "CREATE INDEX snapq_jobs_done_at ON snapq_jobs (done_at) WHERE done_at IS NOT NULL",
        "CREATE TABLE snapq_job_state (
            id TEXT PRIMARY KEY,
            progress_done BIGINT,
            progress_total BIGINT,
            progress_note TEXT,
            progress_ms BIGINT,
            next_run_ms BIGINT,
            cancel_requested_ms BIGINT,
            cancel_requested_by TEXT,
            updated_ms BIGINT NOT NULL
        )",
        "CREATE INDEX snapq_job_state_cancel ON snapq_job_state (id)
            WHERE cancel_requested_ms IS NOT NULL",
        "CREATE TABLE snapq_job_attempts (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            job_id TEXT NOT NULL,
            attempt BIGINT NOT NULL,
            worker TEXT NOT NULL,
            started_ms BIGINT NOT NULL,
            finished_ms BIGINT,
            outcome TEXT,
            error TEXT
        )",
        "CREATE INDEX snapq_job_attempts_job ON snapq_job_attempts (job_id, seq)",
        "CREATE TABLE snapq_workers (
            id TEXT PRIMARY KEY,
            instance TEXT NOT NULL,
            kind TEXT NOT NULL,
            hostname TEXT NOT NULL,
            pid BIGINT NOT NULL,
            started_ms BIGINT NOT NULL,
            last_seen_ms BIGINT NOT NULL,
            stopped_ms BIGINT
        )",
        "CREATE INDEX snapq_workers_instance ON snapq_workers (instance)",
        // The node handing a row to its hook holds a lease on it (`sql_pg::TERMINAL_LEASE`).
        "CREATE TABLE snapq_terminal (
            id TEXT PRIMARY KEY,
            at_ms BIGINT NOT NULL,
            lease_by TEXT,
            lease_until_ms BIGINT
        )",
        // One function for every status change, each branch the twin of a SQLite trigger
        // (`db::SCHEMA`), plus the notification that a job waits again.
        "CREATE FUNCTION snapq_jobs_status_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            now_ms BIGINT := (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT;
        BEGIN
            IF NEW.status = 'Running' AND OLD.status IN ('Pending', 'Failed')
                    AND NEW.lock_by IS NOT NULL THEN
                INSERT INTO snapq_job_attempts (job_id, attempt, worker, started_ms)
                VALUES (NEW.id, NEW.attempts + 1, NEW.lock_by, now_ms);
            ELSIF NEW.status = 'Done' AND OLD.status = 'Running' AND OLD.lock_by IS NOT NULL THEN
                UPDATE snapq_job_attempts SET finished_ms = now_ms, outcome = 'ok', error = NULL
                WHERE job_id = NEW.id AND attempt = NEW.attempts AND worker = OLD.lock_by
                    AND finished_ms IS NULL;
            ELSIF NEW.status = 'Killed'
                    OR (NEW.status = 'Failed' AND NEW.attempts >= NEW.max_attempts) THEN
                INSERT INTO snapq_terminal (id, at_ms) VALUES (NEW.id, now_ms)
                ON CONFLICT (id) DO UPDATE
                SET at_ms = excluded.at_ms, lease_by = NULL, lease_until_ms = NULL;
            ELSIF NEW.status IN ('Pending', 'Failed') THEN
                PERFORM pg_notify('snapq_queue', TG_TABLE_SCHEMA || ' ' || NEW.job_type);
            END IF;
            RETURN NULL;
        END $$",
        "CREATE TRIGGER snapq_jobs_status AFTER UPDATE OF status ON snapq_jobs
            FOR EACH ROW EXECUTE FUNCTION snapq_jobs_status_changed()",
        // A job enqueued straight into a free local worker slot: its attempt row.
        "CREATE FUNCTION snapq_jobs_inserted_running() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO snapq_job_attempts (job_id, attempt, worker, started_ms)
            VALUES (NEW.id, NEW.attempts + 1, NEW.lock_by,
                (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT);
            RETURN NULL;
        END $$",
        "CREATE TRIGGER snapq_jobs_insert_running AFTER INSERT ON snapq_jobs
            FOR EACH ROW WHEN (NEW.status = 'Running' AND NEW.lock_by IS NOT NULL)
            EXECUTE FUNCTION snapq_jobs_inserted_running()",
        // One notification per queue and statement (a fan-out of 10,000 jobs sends one).
        "CREATE FUNCTION snapq_jobs_notify_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('snapq_queue', TG_TABLE_SCHEMA || ' ' || q)
            FROM (SELECT DISTINCT job_type AS q FROM inserted WHERE status = 'Pending') d;
            RETURN NULL;
        END $$",
        "CREATE TRIGGER snapq_jobs_notify_insert AFTER INSERT ON snapq_jobs
            REFERENCING NEW TABLE AS inserted
            FOR EACH STATEMENT EXECUTE FUNCTION snapq_jobs_notify_inserted()",
    ],
)];

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`, for error messages.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (auth, host) = match rest.split_once('@') {
        Some(parts) => parts,
        None => return url.to_owned(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// Connect, migrate, and open the writer connection and the read pool. `async_commit`: see
/// `QueueConfig::pg_async_commit`.
pub(crate) async fn open(url: &str, async_commit: bool) -> Result<(Db, String), QueueError> {
    let shown = redact(url);
    let mut opts: PgConnectOptions = url
        .parse()
        .map_err(|e| QueueError::Config(format!("invalid PostgreSQL URL {shown}: {e}")))?;
    if async_commit {
        opts = opts.options([("synchronous_commit", "off")]);
    }
    let connect_err = |source: sqlx::Error| QueueError::Connect {
        url: shown.clone(),
        source,
    };
    // One plain connection first: a wrong host, database or password fails here at once with
    // the server's reason (a pool would retry until its acquire timeout).
    let mut conn = tokio::time::timeout(Duration::from_secs(15), PgConnection::connect_with(&opts))
        .await
        .map_err(|_| connect_err(sqlx::Error::PoolTimedOut))?
        .map_err(connect_err)?;
    let schema = migrate(&mut conn).await?;
    let _ = conn.close().await;
    // So an operator can tell the queue's sessions in `pg_stat_activity` (unless the URL names them).
    if opts.get_application_name().is_none() {
        opts = opts.application_name(&format!("snapq queue {schema}"));
    }
    let writer = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .acquire_timeout(Duration::from_secs(60))
        .connect_with(opts.clone())
        .await
        .map_err(connect_err)?;
    // Reads, the `LISTEN` connection and the due poll.
    let reader = PgPoolOptions::new()
        .max_connections(4)
        .min_connections(1)
        .connect_with(opts)
        .await
        .map_err(connect_err)?;
    Ok((
        Db {
            writer: Writer::Pg(Held::new(writer)),
            reader: Reader::Pg(reader),
        },
        schema,
    ))
}

/// Bring the schema to `SCHEMA_VERSION` under an advisory lock (per schema); returns the
/// schema's name.
async fn migrate(conn: &mut PgConnection) -> Result<String, QueueError> {
    let mut tx = conn.begin().await?;
    let schema: Option<String> = sqlx::query_scalar("SELECT current_schema()")
        .fetch_one(&mut *tx)
        .await?;
    let Some(schema) = schema else {
        return Err(QueueError::Config(
            "the PostgreSQL connection has no schema to create the queue's tables in \
             (none of its search_path exists); create it or fix search_path"
                .into(),
        ));
    };
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1 || '.snapq_queue'))")
        .bind(&schema)
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS snapq_queue_schema (
            version BIGINT NOT NULL,
            applied_ms BIGINT NOT NULL
        )",
    )
    .execute(&mut *tx)
    .await?;
    let found: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM snapq_queue_schema")
        .fetch_one(&mut *tx)
        .await?;
    if found > SCHEMA_VERSION {
        return Err(QueueError::SchemaTooNew {
            schema,
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (version, statements) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
        for stmt in *statements {
            sqlx::raw_sql(*stmt)
                .execute(&mut *tx)
                .await
                .map_err(|source| QueueError::PgMigrate {
                    version: *version,
                    source,
                })?;
        }
        sqlx::query("INSERT INTO snapq_queue_schema (version, applied_ms) VALUES ($1, $2)")
            .bind(version)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tracing::info!(%schema, version, "migrated the queue's PostgreSQL schema");
    }
    tx.commit().await?;
    Ok(schema)
}

fn wake_all(shared: &Shared) {
    let kinds: Vec<JobKind> = shared.kinds.lock().unwrap().keys().copied().collect();
    for k in kinds {
        shared.notify_kind(k);
    }
}

/// `LISTEN`s for jobs that became waiting on any node and wakes the fetcher of their kind.
pub(crate) async fn listen(shared: Arc<Shared>) -> Result<(), QueueError> {
    let Reader::Pg(pool) = &shared.reader else {
        return Ok(());
    };
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    // Whatever was enqueued before we listened is found by a claim now.
    wake_all(&shared);
    loop {
        let received = tokio::select! {
            r = listener.try_recv() => r?,
            _ = until_shutdown(&shared) => return Ok(()),
        };
        match received {
            Some(n) => {
                let Some((schema, queue)) = n.payload().split_once(' ') else {
                    continue;
                };
                if schema == shared.pg_schema
                    && let Some(kind) = JobKind::from_queue_name(queue)
                {
                    shared.notify_kind(kind);
                }
            }
            // The connection was lost (and is re-established by the next call): anything
            // notified meanwhile is gone, so look now.
            None => wake_all(&shared),
        }
    }
}

/// The polling half of the wake-ups: every `poll_interval`, which kinds with free worker slots
/// here have a job due; wakes their fetchers.
pub(crate) async fn due_poll(shared: Arc<Shared>) -> Result<(), QueueError> {
    let Reader::Pg(pool) = &shared.reader else {
        return Ok(());
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(shared.config.poll_interval) => {}
            _ = until_shutdown(&shared) => return Ok(()),
        }
        let queues: Vec<String> = shared
            .kinds
            .lock()
            .unwrap()
            .values()
            .filter(|kw| kw.sem.available_permits() > 0)
            .map(|kw| kw.kind.queue_name().to_owned())
            .collect();
        if queues.is_empty() {
            continue;
        }
        let now = now_ms();
        let due: Vec<String> = sqlx::query_scalar(sql_pg::DUE_QUEUES)
            .bind(&queues)
            .bind(now / 1000)
            .bind(now)
            .fetch_all(pool)
            .await?;
        for queue in due {
            if let Some(kind) = JobKind::from_queue_name(&queue) {
                shared.notify_kind(kind);
            }
        }
    }
}
