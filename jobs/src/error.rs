//! Error types: `QueueError` for the queue's own operations, `JobError` for what a handler
//! decides about a failed attempt (retry it later, or give up now).

use std::path::PathBuf;

use crate::JobId;

/// What went wrong while opening, writing or reading the queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The file exists but is not a usable SQLite queue database.
    #[error(
        "queue file {path} is not a usable SQLite database ({reason}); move it aside or restore it from a backup"
    )]
    NotAQueue { path: PathBuf, reason: String },
    /// apalis-sqlite's migrations failed (e.g. the file belongs to another program).
    #[error("cannot migrate queue file {path}: {source}")]
    Migrate {
        path: PathBuf,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// The queue's PostgreSQL could not be reached or refused the connection.
    #[error(
        "cannot connect to the queue database at {url}: {source}; check the URL (host, port, database, user, password) and that PostgreSQL is running"
    )]
    Connect {
        /// The URL with its password hidden.
        url: String,
        #[source]
        source: sqlx::Error,
    },
    /// The PostgreSQL schema was migrated by a newer snapq than this one.
    #[error(
        "the queue tables in PostgreSQL schema {schema} are at version {found}, newer than this build supports ({supported}); run the newer snapq, or upgrade this one"
    )]
    SchemaTooNew {
        schema: String,
        found: i64,
        supported: i64,
    },
    /// A PostgreSQL migration step failed.
    #[error("cannot migrate the queue's PostgreSQL tables to version {version}: {source}")]
    PgMigrate {
        version: i64,
        #[source]
        source: sqlx::Error,
    },
    /// Any other database error.
    #[error("queue database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Job arguments could not be serialized.
    #[error("cannot serialize job arguments for {kind}: {source}")]
    Serialize {
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// No job has this id (it never existed or was pruned).
    #[error("no job with id {0}")]
    NotFound(JobId),
    /// The operation does not apply to the job in its current state.
    #[error("job {id} is {state}: {what}")]
    InvalidState {
        id: JobId,
        state: crate::JobState,
        what: &'static str,
    },
    /// Workers for this kind were already started on this queue.
    #[error("workers for job kind {0} are already running on this queue")]
    WorkersAlreadyRunning(&'static str),
    /// A configuration value is out of range.
    #[error("invalid queue configuration: {0}")]
    Config(String),
    /// The queue was shut down.
    #[error("the queue is shut down")]
    ShutDown,
}

/// The outcome of a failed job attempt, decided where the error is understood.
///
/// `Transient` failures (connection refused, timeout, 5xx, busy) are retried with the queue's
/// exponential backoff up to the attempt limit; `Permanent` ones (insufficient disk, auth denied,
/// unknown endpoint, invalid file) fail the job at once with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Permanent(String),
}

impl JobError {
    pub fn transient(msg: impl Into<String>) -> Self {
        Self::Transient(msg.into())
    }
    pub fn permanent(msg: impl Into<String>) -> Self {
        Self::Permanent(msg.into())
    }
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_))
    }
    pub fn message(&self) -> &str {
        match self {
            Self::Transient(m) | Self::Permanent(m) => m,
        }
    }
}

/// `.transient()` / `.permanent()` on any `Result` whose error can be displayed, so a handler
/// reads like the story of the job: `agent.size().await.transient()?`.
pub trait ResultExt<T> {
    /// Classify the error as transient (retry with backoff).
    fn transient(self) -> Result<T, JobError>;
    /// Classify the error as permanent (fail the job now).
    fn permanent(self) -> Result<T, JobError>;
}

impl<T, E: std::fmt::Display> ResultExt<T> for Result<T, E> {
    fn transient(self) -> Result<T, JobError> {
        self.map_err(|e| JobError::Transient(format!("{e:#}")))
    }
    fn permanent(self) -> Result<T, JobError> {
        self.map_err(|e| JobError::Permanent(format!("{e:#}")))
    }
}
