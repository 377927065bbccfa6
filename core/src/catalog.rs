//! The server's catalog (`catalog.db`): endpoints, snapshots, users and tokens, the audit log.
//!
//! The only code that writes catalog rows. The HTTP API reads it and records requests; the job
//! handlers move snapshots through their states. Migrations live in `migrations/` at the top of the
//! workspace. Every query binds its values: user text never becomes SQL.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use sqlx::FromRow;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use crate::access::{self, Facts, GroupRules, Role};
use crate::verify::{self, Verified};

mod copy;
pub(crate) mod db;
mod evidence;
mod exports;
mod sessions;

use db::{JsonText, Pool, Tx, run, run_tx, storable};

pub use copy::Copied;
pub use evidence::{Evidence, NewEvidence};
pub use exports::{Export, ExportState, NewExport};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(
        "the catalog {path} is not usable: {reason}; move it aside to start with an empty catalog"
    )]
    Unusable { path: String, reason: String },
    #[error("catalog database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("catalog migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The schema was migrated by a later snapq: this one must not write to it.
    #[error(
        "the catalog's schema is newer than this snapq (it holds migration {0}, which this version does not know); run the snapq that migrated it or a later one"
    )]
    Newer(i64),
    #[error("{0}")]
    NotFound(String),
    /// The name is taken, or the change contradicts the current state.
    #[error("{0}")]
    Conflict(String),
    /// A name or rule that cannot be stored.
    #[error("{0}")]
    Invalid(String),
}

impl From<crate::access::AccessError> for CatalogError {
    fn from(e: crate::access::AccessError) -> Self {
        CatalogError::Invalid(e.0)
    }
}

pub type Result<T> = std::result::Result<T, CatalogError>;

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Where a snapshot came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Capture,
    Upload,
    Watch,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Capture => "capture",
            Origin::Upload => "upload",
            Origin::Watch => "watch",
        }
    }
}

/// A snapshot's life: `queued → measuring → transferring → verifying → complete`, or `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotState {
    Queued,
    Measuring,
    Transferring,
    Verifying,
    Complete,
    Failed,
}

impl SnapshotState {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Queued => "queued",
            SnapshotState::Measuring => "measuring",
            SnapshotState::Transferring => "transferring",
            SnapshotState::Verifying => "verifying",
            SnapshotState::Complete => "complete",
            SnapshotState::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Serialize, FromRow)]
pub struct Endpoint {
    pub id: i64,
    pub hostname: String,
    #[sqlx(try_from = "JsonText<Vec<String>>")]
    pub ips: Vec<String>,
    pub os: Option<String>,
    pub agent_version: Option<String>,
    #[sqlx(try_from = "JsonText<Vec<String>>")]
    pub labels: Vec<String>,
    pub api_url: Option<String>,
    pub last_seen_ms: Option<i64>,
    pub created_ms: i64,
    /// The sha256 of the agent's TLS certificate, pinned at enrollment (`None`: not enrolled).
    pub cert_sha256: Option<String>,
    /// What the agent's credential derives from (see `identity`); not a secret by itself.
    #[serde(skip)]
    pub identity_nonce: Option<String>,
    pub enrolled_ms: Option<i64>,
}

impl Endpoint {
    /// Whether an agent is bound to this hostname (heartbeats must prove its identity).
    pub fn is_enrolled(&self) -> bool {
        self.identity_nonce.is_some()
    }
}

/// What an agent reports about itself on each heartbeat.
#[derive(Debug, Clone, serde::Deserialize, Serialize, utoipa::ToSchema)]
pub struct Heartbeat {
    pub hostname: String,
    #[serde(default)]
    pub ips: Vec<String>,
    pub os: Option<String>,
    pub agent_version: Option<String>,
    #[serde(default)]
    pub labels: Vec<String>,
    pub api_url: String,
    /// The sha256 of the certificate the agent's API presents (pinned at enrollment).
    #[serde(default)]
    pub cert_sha256: String,
}

#[derive(Debug, Clone, Serialize, FromRow, utoipa::ToSchema)]
pub struct Snapshot {
    pub id: i64,
    pub endpoint_id: i64,
    pub hostname: String,
    pub name: Option<String>,
    pub state: String,
    pub origin: String,
    pub size: Option<i64>,
    pub sha256: Option<String>,
    pub events: Option<i64>,
    pub oldest_ts: Option<i64>,
    pub newest_ts: Option<i64>,
    pub bytes_done: i64,
    pub bytes_total: Option<i64>,
    pub staged_id: Option<String>,
    pub error: Option<String>,
    pub job_id: Option<String>,
    pub requested_by: String,
    pub created_ms: i64,
    pub completed_ms: Option<i64>,
}

/// A snapshot and the current facts of its endpoint.
#[derive(Debug, Clone, FromRow)]
pub struct SnapshotWithFacts {
    #[sqlx(flatten)]
    pub snapshot: Snapshot,
    #[sqlx(try_from = "JsonText<Vec<String>>")]
    pub endpoint_ips: Vec<String>,
    #[sqlx(try_from = "JsonText<Vec<String>>")]
    pub endpoint_labels: Vec<String>,
}

impl SnapshotWithFacts {
    pub fn facts(&self) -> Facts<'_> {
        Facts {
            hostname: &self.snapshot.hostname,
            ips: &self.endpoint_ips,
            labels: &self.endpoint_labels,
        }
    }
}

/// What one endpoint's snapshots come to (Saved Evidence > Snapshots, before it is expanded).
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct SnapshotSummary {
    pub hostname: String,
    /// Every snapshot row of the endpoint, whatever its state.
    pub snapshots: i64,
    /// Its complete snapshots.
    pub captures: i64,
    /// How many are in each state (`queued`, `measuring`, `transferring`, `verifying`,
    /// `complete`, `failed`); states with none are left out.
    #[schema(example = json!({"complete": 2, "transferring": 1}))]
    pub states: std::collections::BTreeMap<String, i64>,
    /// The newest snapshot's id.
    pub latest_id: i64,
    /// When the newest snapshot was asked for (ms since the epoch).
    pub latest_ms: i64,
}

/// What an ingest job came to.
#[derive(Debug, Clone, Serialize, FromRow, utoipa::ToSchema)]
pub struct Ingest {
    pub job_id: String,
    pub origin: String,
    pub original_name: String,
    pub state: String,
    pub snapshot_id: Option<i64>,
    pub reason: Option<String>,
    pub requested_by: String,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    /// Where the file lies while the ingest is `quarantined`.
    pub quarantine_path: Option<String>,
}

const SNAPSHOT_COLUMNS: &str = "s.id, s.endpoint_id, e.hostname, s.name, s.state, s.origin, s.size, \
    s.sha256, s.events, s.oldest_ts, s.newest_ts, s.bytes_done, s.bytes_total, s.staged_id, s.error, \
    s.job_id, s.requested_by, s.created_ms, s.completed_ms";

const CONNECTION_COLUMNS: &str = "c.id, c.endpoint_id, e.hostname, e.ips AS endpoint_ips, \
    e.labels AS endpoint_labels, c.target, c.address, c.status, c.reason, c.since_ms, \
    c.last_activity_ms, c.created_ms, c.created_by, c.db_bytes, c.events, c.oldest_ts, c.newest_ts";

/// A live connection's row, with its endpoint's facts (for scoping).
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct ConnectionRow {
    pub id: i64,
    pub endpoint_id: i64,
    pub hostname: String,
    #[sqlx(try_from = "JsonText<Vec<String>>")]
    pub endpoint_ips: Vec<String>,
    #[sqlx(try_from = "JsonText<Vec<String>>")]
    pub endpoint_labels: Vec<String>,
    /// JSON of the server's `events::Source`.
    pub target: String,
    pub address: Option<String>,
    pub status: String,
    pub reason: Option<String>,
    pub since_ms: i64,
    pub last_activity_ms: i64,
    pub created_ms: i64,
    pub created_by: String,
    pub db_bytes: Option<i64>,
    pub events: Option<i64>,
    pub oldest_ts: Option<i64>,
    pub newest_ts: Option<i64>,
}

impl ConnectionRow {
    pub fn facts(&self) -> Facts<'_> {
        Facts {
            hostname: &self.hostname,
            ips: &self.endpoint_ips,
            labels: &self.endpoint_labels,
        }
    }
}

/// The outcome of a connection attempt, as stored.
#[derive(Debug, Clone, Default)]
pub struct ConnectionAttempt {
    pub address: Option<String>,
    pub status: String,
    pub reason: Option<String>,
    pub db_bytes: Option<i64>,
    pub events: Option<i64>,
    pub oldest_ts: Option<i64>,
    pub newest_ts: Option<i64>,
}

/// Catalog counts for `/metrics` ([`Catalog::metric_counts`]).
#[derive(Debug, Clone, Default)]
pub struct MetricCounts {
    pub endpoints: i64,
    pub online: i64,
    /// (state, count, bytes) of snapshots.
    pub snapshots: Vec<(String, i64, i64)>,
    /// (status, count) of live connections.
    pub connections: Vec<(String, i64)>,
    pub quarantined: i64,
}

#[derive(Clone)]
pub struct Catalog {
    pub(crate) pool: Pool,
}

/// How long a capture's reservation of the shared store lasts without progress: the captures of
/// a node that died stop renewing theirs, and the space returns to the others within this.
pub const RESERVATION_LEASE_MS: i64 = 60_000;

/// A schema that holds a migration this build does not have was migrated by a later snapq.
fn migrate_error(e: sqlx::migrate::MigrateError) -> CatalogError {
    match e {
        sqlx::migrate::MigrateError::VersionMissing(v) => CatalogError::Newer(v),
        e => CatalogError::Migrate(e),
    }
}

/// The key of the PostgreSQL advisory lock [`Catalog::write_tx`] holds ("snapq-ca" in ASCII).
const WRITE_LOCK: i64 = 0x736e_6170_712d_6361;

impl Catalog {
    /// Opens (creating) `catalog.db` and brings its schema up to date. A file that exists but is not
    /// a healthy SQLite database is refused, never overwritten.
    pub async fn open(path: &Path) -> Result<Catalog> {
        let unusable = |reason: String| CatalogError::Unusable {
            path: path.display().to_string(),
            reason,
        };
        if path.exists() && std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) > 0 {
            verify::check_header(path).map_err(|e| unusable(e.to_string()))?;
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|e| unusable(e.to_string()))?;
        let check: String = sqlx::query_scalar("PRAGMA quick_check")
            .fetch_one(&pool)
            .await
            .map_err(|e| unusable(e.to_string()))?;
        if check != "ok" {
            return Err(unusable(check));
        }
        sqlx::migrate!("../migrations")
            .run(&pool)
            .await
            .map_err(migrate_error)?;
        Ok(Catalog {
            pool: Pool::Sqlite(pool),
        })
    }

    /// Connects to the catalog in PostgreSQL at `url` (its tables in the connection's
    /// `search_path`) and brings its schema up to date; several server nodes share it. Migrations
    /// run under PostgreSQL's migration lock, so nodes starting together apply them once; a
    /// database migrated by a newer snapq is refused.
    pub async fn connect_postgres(url: &str) -> Result<Catalog> {
        let options = sqlx::postgres::PgConnectOptions::from_str(url)?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        sqlx::migrate!("../migrations/postgres")
            .run(&pool)
            .await
            .map_err(migrate_error)?;
        Ok(Catalog {
            pool: Pool::Postgres(pool),
        })
    }

    /// Which engine holds the catalog: `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }

    /// A transaction that writes alone, as on SQLite where it takes the write lock when it begins
    /// (a deferred one that reads before it writes fails at once with "database is locked" when
    /// another connection writes in between; the busy timeout does not apply). On PostgreSQL a
    /// transaction-scoped advisory lock gives the same: the check-then-write sequences these
    /// transactions hold (enrollment, the last admin, a batch item's dispatch) run one at a time
    /// across every node.
    pub async fn write_tx(&self) -> Result<Tx> {
        Ok(match &self.pool {
            Pool::Sqlite(pool) => Tx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?),
            Pool::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(WRITE_LOCK)
                    .execute(&mut *tx)
                    .await?;
                Tx::Postgres(tx)
            }
        })
    }

    // --- endpoints -------------------------------------------------------------------------

    /// Enrolls the agent of `hb.hostname`: binds the hostname to its certificate and `nonce` and
    /// records its facts, creating the endpoint if it is new. `None` when the hostname is already
    /// bound to an agent (checked and written in one statement, so two enrollments cannot both win).
    /// The endpoint is not seen (online) until a heartbeat proves the agent kept its credential.
    pub async fn enroll(&self, hb: &Heartbeat, nonce: &str) -> Result<Option<Endpoint>> {
        let now = now_ms();
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Endpoint>(
            "INSERT INTO endpoints (hostname, ips, os, agent_version, labels, api_url, last_seen_ms,
                created_ms, cert_sha256, identity_nonce, enrolled_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, ?7, ?8, ?9, ?7)
             ON CONFLICT (hostname) DO UPDATE SET ips = excluded.ips, os = excluded.os,
                agent_version = excluded.agent_version, labels = excluded.labels,
                api_url = excluded.api_url, last_seen_ms = excluded.last_seen_ms,
                cert_sha256 = excluded.cert_sha256, identity_nonce = excluded.identity_nonce,
                enrolled_ms = excluded.enrolled_ms
             WHERE endpoints.identity_nonce IS NULL
             RETURNING *",
            )
            .bind(&hb.hostname)
            .bind(serde_json::to_string(&hb.ips).expect("strings serialize"))
            .bind(&hb.os)
            .bind(&hb.agent_version)
            .bind(serde_json::to_string(&hb.labels).expect("strings serialize"))
            .bind(&hb.api_url)
            .bind(now)
            .bind(&hb.cert_sha256)
            .bind(nonce),
            fetch_optional
        )?)
    }

    /// Records a heartbeat of an enrolled agent whose credential the caller checked against
    /// `nonce`: its facts and address, never its pinned certificate. `None` if the endpoint was
    /// re-keyed or forgotten meanwhile.
    pub async fn heartbeat(&self, hb: &Heartbeat, nonce: &str) -> Result<Option<Endpoint>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Endpoint>(
            "UPDATE endpoints SET ips = ?2, os = ?3, agent_version = ?4, labels = ?5, api_url = ?6,
                last_seen_ms = ?7
             WHERE hostname = ?1 AND identity_nonce = ?8
             RETURNING *",
            )
            .bind(&hb.hostname)
            .bind(serde_json::to_string(&hb.ips).expect("strings serialize"))
            .bind(&hb.os)
            .bind(&hb.agent_version)
            .bind(serde_json::to_string(&hb.labels).expect("strings serialize"))
            .bind(&hb.api_url)
            .bind(now_ms())
            .bind(nonce),
            fetch_optional
        )?)
    }

    /// Unbinds `hostname` from its agent so that the next enrollment binds it anew (a reimaged
    /// machine, a replaced certificate); the old credential stops working. `false` if unknown.
    pub async fn rekey_endpoint(&self, hostname: &str) -> Result<bool> {
        let done = run!(
            &self.pool,
            sqlx::query(
                "UPDATE endpoints SET cert_sha256 = NULL, identity_nonce = NULL, enrolled_ms = NULL
             WHERE hostname = ?1",
            )
            .bind(hostname),
            execute
        )?;
        Ok(done.rows_affected() > 0)
    }

    /// Forgets `hostname`'s agent: its binding and address; the endpoint row goes too unless
    /// snapshots still belong to it (they stay, under an offline endpoint). `false` if unknown.
    pub async fn forget_endpoint(&self, hostname: &str) -> Result<bool> {
        let mut tx = self.write_tx().await?;
        let done = run_tx!(
            &mut tx,
            sqlx::query(
            "UPDATE endpoints SET cert_sha256 = NULL, identity_nonce = NULL, enrolled_ms = NULL,
                api_url = NULL, last_seen_ms = NULL
             WHERE hostname = ?1",
            )
            .bind(hostname),
            execute
        )?;
        run_tx!(
            &mut tx,
            sqlx::query(
                "DELETE FROM endpoints WHERE hostname = ?1
             AND NOT EXISTS (SELECT 1 FROM snapshots s WHERE s.endpoint_id = endpoints.id)",
            )
            .bind(hostname),
            execute
        )?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    /// The endpoint of `hostname`, creating an offline one (known only from its snapshots) if new.
    pub async fn ensure_endpoint(&self, hostname: &str) -> Result<Endpoint> {
        run!(
            &self.pool,
            sqlx::query(
            "INSERT INTO endpoints (hostname, created_ms) VALUES (?1, ?2) ON CONFLICT (hostname) DO NOTHING",
            )
            .bind(hostname)
            .bind(now_ms()),
            execute
        )?;
        self.endpoint(hostname)
            .await?
            .ok_or_else(|| CatalogError::NotFound(format!("endpoint {hostname}")))
    }

    pub async fn endpoint(&self, hostname: &str) -> Result<Option<Endpoint>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Endpoint>("SELECT * FROM endpoints WHERE hostname = ?1")
                .bind(hostname),
            fetch_optional
        )?)
    }

    pub async fn endpoint_by_id(&self, id: i64) -> Result<Option<Endpoint>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Endpoint>("SELECT * FROM endpoints WHERE id = ?1").bind(id),
            fetch_optional
        )?)
    }

    /// Endpoints whose hostname or an IP contains `text` (all when empty), prefix matches first.
    pub async fn search_endpoints(&self, text: &str) -> Result<Vec<Endpoint>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Endpoint>(sqlx::AssertSqlSafe(format!(
                "SELECT * FROM endpoints {SEARCH}"
            )))
            .bind(text),
            fetch_all
        )?)
    }

    /// The hostname, addresses and labels (what computer groups match against) of rows
    /// `offset..offset + limit` of [`Catalog::search_endpoints`], in its order: for a caller who
    /// needs only the first few it may see (the console's type-ahead), without reading whole rows.
    pub async fn search_endpoint_facts_page(
        &self,
        text: &str,
        offset: i64,
        limit: i64,
    ) -> Result<Vec<(String, Vec<String>, Vec<String>)>> {
        let rows: Vec<FactsRow> = run!(
            &self.pool,
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT hostname, ips, labels FROM endpoints {SEARCH} LIMIT ?2 OFFSET ?3"
            )))
            .bind(text)
            .bind(limit)
            .bind(offset),
            fetch_all
        )?;
        Ok(unpack_facts(rows))
    }

    /// What `/metrics` reads from the catalog at scrape time, in one pass of aggregates.
    /// `online_since_ms`: an endpoint heard from after it (with an API address) counts online.
    pub async fn metric_counts(&self, online_since_ms: i64) -> Result<MetricCounts> {
        let (endpoints, online): (i64, i64) = run!(
            &self.pool,
            sqlx::query_as(
                "SELECT COUNT(*),
                    COUNT(*) FILTER (WHERE last_seen_ms > ?1 AND api_url IS NOT NULL)
             FROM endpoints",
            )
            .bind(online_since_ms),
            fetch_one
        )?;
        let snapshots: Vec<(String, i64, i64)> = run!(
            &self.pool,
            sqlx::query_as(
                "SELECT state, COUNT(*), CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM snapshots GROUP BY state",
            ),
            fetch_all
        )?;
        let connections: Vec<(String, i64)> = run!(
            &self.pool,
            sqlx::query_as("SELECT status, COUNT(*) FROM connections GROUP BY status"),
            fetch_all
        )?;
        let quarantined: i64 = run!(
            &self.pool,
            sqlx::query_scalar("SELECT COUNT(*) FROM ingests WHERE state = 'quarantined'"),
            fetch_one
        )?;
        Ok(MetricCounts {
            endpoints,
            online,
            snapshots,
            connections,
            quarantined,
        })
    }

    /// Every endpoint's hostname, addresses and labels: what computer groups match against.
    pub async fn endpoint_facts(&self) -> Result<Vec<(String, Vec<String>, Vec<String>)>> {
        let rows: Vec<FactsRow> = run!(
            &self.pool,
            sqlx::query_as("SELECT hostname, ips, labels FROM endpoints"),
            fetch_all
        )?;
        Ok(unpack_facts(rows))
    }

    // --- snapshots -------------------------------------------------------------------------

    /// A new snapshot row in state `queued`, before its job is enqueued.
    pub async fn create_snapshot(
        &self,
        endpoint_id: i64,
        origin: Origin,
        requested_by: &str,
    ) -> Result<i64> {
        Ok(run!(
            &self.pool,
            sqlx::query_scalar(
                "INSERT INTO snapshots (endpoint_id, state, origin, requested_by, created_ms)
             VALUES (?1, 'queued', ?2, ?3, ?4) RETURNING id",
            )
            .bind(endpoint_id)
            .bind(origin.as_str())
            .bind(requested_by)
            .bind(now_ms()),
            fetch_one
        )?)
    }

    pub async fn set_snapshot_job(&self, id: i64, job_id: &str) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query("UPDATE snapshots SET job_id = ?2 WHERE id = ?1")
                .bind(id)
                .bind(job_id),
            execute
        )?;
        Ok(())
    }

    pub async fn snapshot(&self, id: i64) -> Result<Option<Snapshot>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Snapshot>(sqlx::AssertSqlSafe(format!(
                "SELECT {SNAPSHOT_COLUMNS} FROM snapshots s JOIN endpoints e ON e.id = s.endpoint_id
                 WHERE s.id = ?1"
            )))
            .bind(id),
            fetch_optional
        )?)
    }

    /// Snapshots, newest first, optionally of one endpoint.
    pub async fn snapshots(&self, hostname: Option<&str>) -> Result<Vec<Snapshot>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Snapshot>(sqlx::AssertSqlSafe(format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots s JOIN endpoints e ON e.id = s.endpoint_id
             WHERE ?1 IS NULL OR e.hostname = ?1 ORDER BY e.hostname, s.created_ms DESC, s.id DESC"
        )))
            .bind(hostname),
            fetch_all
        )?)
    }

    /// One page of the snapshot listing, newest first (by id), each row with its endpoint's facts
    /// for the caller's computer groups: of one endpoint or of all, only ids below `before`, at
    /// most `limit` rows (`None`: every one).
    pub async fn snapshots_page(
        &self,
        hostname: Option<&str>,
        before: Option<i64>,
        limit: Option<i64>,
    ) -> Result<Vec<SnapshotWithFacts>> {
        // Two statements, not `?1 IS NULL OR ...`, so one endpoint's page reads its index.
        let which = if hostname.is_some() {
            "s.endpoint_id = (SELECT id FROM endpoints WHERE hostname = ?1)"
        } else {
            "?1 IS NULL"
        };
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, SnapshotWithFacts>(sqlx::AssertSqlSafe(format!(
                "SELECT {SNAPSHOT_COLUMNS}, e.ips AS endpoint_ips, e.labels AS endpoint_labels
             FROM snapshots s JOIN endpoints e ON e.id = s.endpoint_id
             WHERE {which} AND (?2 IS NULL OR s.id < ?2) ORDER BY s.id DESC LIMIT ?3"
            )))
            .bind(hostname)
            .bind(before)
            .bind(limit.unwrap_or(i64::MAX)),
            fetch_all
        )?)
    }

    /// Endpoints that have snapshots, by hostname, after `after` (exclusive), at most `limit`,
    /// with their facts for the caller's computer groups: `(id, hostname, ips, labels)`.
    pub async fn snapshot_endpoints_page(
        &self,
        after: Option<&str>,
        hostname: Option<&str>,
        limit: i64,
    ) -> Result<Vec<(i64, String, Vec<String>, Vec<String>)>> {
        let rows: Vec<IdFactsRow> = run!(
            &self.pool,
            sqlx::query_as(
                "SELECT e.id, e.hostname, e.ips, e.labels FROM endpoints e
             WHERE (?1 IS NULL OR e.hostname > ?1) AND (?2 IS NULL OR e.hostname = ?2)
               AND EXISTS (SELECT 1 FROM snapshots s WHERE s.endpoint_id = e.id)
             ORDER BY e.hostname LIMIT ?3",
            )
            .bind(after)
            .bind(hostname)
            .bind(limit),
            fetch_all
        )?;
        Ok(rows
            .into_iter()
            .map(|(id, h, ips, labels)| (id, h, ips.0, labels.0))
            .collect())
    }

    /// Per endpoint (by id), what its snapshots come to: counts by state, the newest.
    pub async fn snapshot_summaries(
        &self,
        endpoint_ids: &[i64],
    ) -> Result<std::collections::HashMap<i64, SnapshotSummary>> {
        let ids = serde_json::to_string(endpoint_ids).expect("integers serialize");
        let rows: Vec<(i64, String, String, i64, i64, i64)> = run!(
            &self.pool,
            sqlx::query_as(
                "SELECT s.endpoint_id, e.hostname, s.state, count(*), max(s.id), max(s.created_ms)
             FROM snapshots s JOIN endpoints e ON e.id = s.endpoint_id
             WHERE s.endpoint_id IN (SELECT CAST(value AS BIGINT) FROM json_each(?1))
             GROUP BY s.endpoint_id, e.hostname, s.state",
            )
            .bind(ids),
            fetch_all
        )?;
        let mut out = std::collections::HashMap::<i64, SnapshotSummary>::new();
        for (endpoint, hostname, state, n, latest_id, latest_ms) in rows {
            let sum = out.entry(endpoint).or_insert_with(|| SnapshotSummary {
                hostname,
                snapshots: 0,
                captures: 0,
                states: Default::default(),
                latest_id,
                latest_ms,
            });
            sum.snapshots += n;
            if state == SnapshotState::Complete.as_str() {
                sum.captures += n;
            }
            sum.latest_id = sum.latest_id.max(latest_id);
            sum.latest_ms = sum.latest_ms.max(latest_ms);
            sum.states.insert(state, n);
        }
        Ok(out)
    }

    /// A complete snapshot with this content, if the store already holds one.
    pub async fn complete_snapshot_by_sha256(&self, sha256: &str) -> Result<Option<Snapshot>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Snapshot>(sqlx::AssertSqlSafe(format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots s JOIN endpoints e ON e.id = s.endpoint_id
             WHERE s.sha256 = ?1 AND s.state = 'complete' ORDER BY s.id LIMIT 1"
        )))
            .bind(sha256),
            fetch_optional
        )?)
    }

    pub async fn set_snapshot_state(&self, id: i64, state: SnapshotState) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query("UPDATE snapshots SET state = ?2, error = NULL WHERE id = ?1")
                .bind(id)
                .bind(state.as_str()),
            execute
        )?;
        Ok(())
    }

    /// Remembers the agent's staged copy a capture is downloading, and the name it will have.
    pub async fn set_snapshot_staged(
        &self,
        id: i64,
        staged_id: &str,
        name: &str,
        size: i64,
    ) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query(
            "UPDATE snapshots SET staged_id = ?2, name = ?3, bytes_total = ?4, sha256 = NULL, bytes_done = 0
             WHERE id = ?1",
            )
            .bind(id)
            .bind(staged_id)
            .bind(name)
            .bind(size),
            execute
        )?;
        Ok(())
    }

    /// Records the sha256 a capture received and the agent confirmed, before the file is renamed
    /// into the store: after a crash, a stored file is checked against it instead of refetched.
    pub async fn set_snapshot_sha256(&self, id: i64, sha256: &str) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query("UPDATE snapshots SET sha256 = ?2 WHERE id = ?1")
                .bind(id)
                .bind(sha256),
            execute
        )?;
        Ok(())
    }

    /// Forgets the staged copy a capture was downloading, so its next attempt stages a new one.
    pub async fn clear_snapshot_staged(&self, id: i64) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query("UPDATE snapshots SET staged_id = NULL, bytes_done = 0 WHERE id = ?1")
                .bind(id),
            execute
        )?;
        Ok(())
    }

    /// Records a capture's progress; it also renews the capture's disk reservation on a shared
    /// store, if it holds one.
    pub async fn set_snapshot_progress(&self, id: i64, done: i64, total: i64) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query(
                "UPDATE snapshots SET bytes_done = ?2, bytes_total = ?3,
                    reserved_until_ms = CASE WHEN reserved_bytes IS NULL THEN NULL ELSE ?4 END
                 WHERE id = ?1"
            )
            .bind(id)
            .bind(done)
            .bind(total)
            .bind(now_ms() + RESERVATION_LEASE_MS),
            execute
        )?;
        Ok(())
    }

    /// Whether several server nodes may share this catalog (and its store): on PostgreSQL.
    pub fn is_shared(&self) -> bool {
        matches!(self.pool, Pool::Postgres(_))
    }

    /// Holds `need` bytes of the shared store for capture `snapshot_id` if `usable` (free space
    /// minus the reserve) covers them beside what the captures in flight on every node hold;
    /// else `Err` with what those hold. Checked and written in one writing transaction, so two
    /// nodes never both take the last space. The reservation lasts while its progress renews it
    /// ([`RESERVATION_LEASE_MS`]), until [`Catalog::release_disk`].
    pub async fn reserve_disk(
        &self,
        snapshot_id: i64,
        need: u64,
        usable: u64,
    ) -> Result<std::result::Result<(), u64>> {
        let now = now_ms();
        let mut tx = self.write_tx().await?;
        let held: i64 = run_tx!(
            &mut tx,
            sqlx::query_scalar(
                "SELECT CAST(COALESCE(SUM(reserved_bytes), 0) AS BIGINT) FROM snapshots
                 WHERE reserved_bytes IS NOT NULL AND reserved_until_ms > ?1 AND id <> ?2"
            )
            .bind(now)
            .bind(snapshot_id),
            fetch_one
        )?;
        let held = held.max(0) as u64;
        if need > usable.saturating_sub(held) {
            return Ok(Err(held));
        }
        run_tx!(
            &mut tx,
            sqlx::query(
                "UPDATE snapshots SET reserved_bytes = ?2, reserved_until_ms = ?3 WHERE id = ?1"
            )
            .bind(snapshot_id)
            .bind(need as i64)
            .bind(now + RESERVATION_LEASE_MS),
            execute
        )?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    /// Gives back capture `snapshot_id`'s share of the store (its attempt ended).
    pub async fn release_disk(&self, snapshot_id: i64) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query(
                "UPDATE snapshots SET reserved_bytes = NULL, reserved_until_ms = NULL
                 WHERE id = ?1 AND reserved_bytes IS NOT NULL"
            )
            .bind(snapshot_id),
            execute
        )?;
        Ok(())
    }

    /// Registers a verified snapshot whose file is in the store under `name`.
    pub async fn complete_snapshot(
        &self,
        id: i64,
        name: &str,
        size: i64,
        sha256: &str,
        verified: &Verified,
    ) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query(
            "UPDATE snapshots SET state = 'complete', name = ?2, size = ?3, sha256 = ?4, events = ?5,
                oldest_ts = ?6, newest_ts = ?7, bytes_done = ?3, bytes_total = ?3, error = NULL,
                completed_ms = ?8
             WHERE id = ?1",
            )
            .bind(id)
            .bind(name)
            .bind(size)
            .bind(sha256)
            .bind(verified.events as i64)
            .bind(verified.oldest_ts)
            .bind(verified.newest_ts)
            .bind(now_ms()),
            execute
        )?;
        Ok(())
    }

    pub async fn fail_snapshot(&self, id: i64, reason: &str) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query(
            "UPDATE snapshots SET state = 'failed', error = ?2, completed_ms = ?3 WHERE id = ?1",
            )
            .bind(id)
            .bind(reason)
            .bind(now_ms()),
            execute
        )?;
        Ok(())
    }

    /// Fails a snapshot that is not finished yet (its job ended dead or cancelled); a complete
    /// or already failed one is left as it is. `true` if this call failed it.
    pub async fn fail_unfinished_snapshot(&self, id: i64, reason: &str) -> Result<bool> {
        let n = run!(
            &self.pool,
            sqlx::query(
                "UPDATE snapshots SET state = 'failed', error = ?2, completed_ms = ?3
             WHERE id = ?1 AND state NOT IN ('complete', 'failed')",
            )
            .bind(id)
            .bind(reason)
            .bind(now_ms()),
            execute
        )?
        .rows_affected();
        Ok(n == 1)
    }

    /// At start-up: captures whose row was created but not linked to its job (the server stopped
    /// in between; the job may or may not exist), except a fleet batch's, which its fleet job
    /// finishes: (snapshot id, the endpoint's hostname if it is still known, requested by).
    pub async fn unqueued_captures(&self) -> Result<Vec<(i64, Option<String>, String)>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as(
                "SELECT s.id, e.hostname, s.requested_by
             FROM snapshots s LEFT JOIN endpoints e ON e.id = s.endpoint_id
             WHERE s.state = 'queued' AND s.job_id IS NULL AND s.origin = 'capture'
               AND NOT EXISTS (SELECT 1 FROM batch_items i WHERE i.snapshot_id = s.id)
             ORDER BY s.id",
            ),
            fetch_all
        )?)
    }

    /// Ends a still `pending` ingest as `failed` (its job ended dead or cancelled without
    /// storing, finding a duplicate or quarantining). `true` if this call ended it.
    pub async fn fail_pending_ingest(&self, job_id: &str, reason: &str) -> Result<bool> {
        let n = run!(
            &self.pool,
            sqlx::query(
                "UPDATE ingests SET state = 'failed', reason = ?2, finished_ms = ?3
             WHERE job_id = ?1 AND state = 'pending'",
            )
            .bind(job_id)
            .bind(reason)
            .bind(now_ms()),
            execute
        )?
        .rows_affected();
        Ok(n == 1)
    }

    /// Removes a snapshot's row; `false` if there was none (deleting twice is not an error).
    /// `RETURNING` tells exactly whether this call removed it, also when two race.
    pub async fn delete_snapshot(&self, id: i64) -> Result<bool> {
        let deleted: Option<i64> = run!(
            &self.pool,
            sqlx::query_scalar("DELETE FROM snapshots WHERE id = ?1 RETURNING id").bind(id),
            fetch_optional
        )?;
        Ok(deleted.is_some())
    }

    /// Registers a verified snapshot that arrived whole (upload or watched folder).
    #[allow(clippy::too_many_arguments)]
    pub async fn insert_complete_snapshot(
        &self,
        endpoint_id: i64,
        origin: Origin,
        name: &str,
        size: i64,
        sha256: &str,
        verified: &Verified,
        job_id: &str,
        requested_by: &str,
    ) -> Result<i64> {
        let now = now_ms();
        Ok(run!(
            &self.pool,
            sqlx::query_scalar(
            "INSERT INTO snapshots (endpoint_id, name, state, origin, size, sha256, events, oldest_ts,
                newest_ts, bytes_done, bytes_total, job_id, requested_by, created_ms, completed_ms)
             VALUES (?1, ?2, 'complete', ?3, ?4, ?5, ?6, ?7, ?8, ?4, ?4, ?9, ?10, ?11, ?11)
             RETURNING id",
            )
            .bind(endpoint_id)
            .bind(name)
            .bind(origin.as_str())
            .bind(size)
            .bind(sha256)
            .bind(verified.events as i64)
            .bind(verified.oldest_ts)
            .bind(verified.newest_ts)
            .bind(job_id)
            .bind(requested_by)
            .bind(now),
            fetch_one
        )?)
    }

    pub async fn snapshot_by_name(&self, name: &str) -> Result<Option<Snapshot>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Snapshot>(sqlx::AssertSqlSafe(format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots s JOIN endpoints e ON e.id = s.endpoint_id WHERE s.name = ?1"
            )))
            .bind(name),
            fetch_optional
        )?)
    }

    // --- ingests -----------------------------------------------------------------------------

    /// Records that an ingest job was queued for a file.
    pub async fn create_ingest(
        &self,
        job_id: &str,
        origin: Origin,
        original_name: &str,
        requested_by: &str,
    ) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query(
            "INSERT INTO ingests (job_id, origin, original_name, state, requested_by, created_ms)
             VALUES (?1, ?2, ?3, 'pending', ?4, ?5)
             ON CONFLICT (job_id) DO UPDATE SET state = 'pending', reason = NULL, finished_ms = NULL
             WHERE ingests.state = 'failed'",
            )
            .bind(job_id)
            .bind(origin.as_str())
            .bind(original_name)
            .bind(requested_by)
            .bind(now_ms()),
            execute
        )?;
        Ok(())
    }

    /// Records how an ingest ended: `complete`, `duplicate` (of `snapshot_id`), `superseded` (a newer
    /// version of the file is another job's) or `settling` (checked again after the settle period).
    pub async fn finish_ingest(
        &self,
        job_id: &str,
        state: &str,
        snapshot_id: Option<i64>,
        reason: Option<&str>,
    ) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query(
            "UPDATE ingests SET state = ?2, snapshot_id = ?3, reason = ?4, finished_ms = ?5 WHERE job_id = ?1",
            )
            .bind(job_id)
            .bind(state)
            .bind(snapshot_id)
            .bind(reason)
            .bind(now_ms()),
            execute
        )?;
        Ok(())
    }

    /// Records that an ingest ended in quarantine, with the file now at `path` (`None` if it could
    /// not be moved there).
    pub async fn quarantine_ingest(
        &self,
        job_id: &str,
        reason: &str,
        path: Option<&Path>,
    ) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query(
            "UPDATE ingests SET state = 'quarantined', reason = ?2, quarantine_path = ?3, finished_ms = ?4
             WHERE job_id = ?1",
            )
            .bind(job_id)
            .bind(reason)
            .bind(path.map(|p| p.to_string_lossy().into_owned()))
            .bind(now_ms()),
            execute
        )?;
        Ok(())
    }

    /// Closes a quarantine entry whose file left quarantine: `retried`, `deleted` or `expired`.
    /// Returns whether it was still open.
    pub async fn close_quarantine(&self, job_id: &str, state: &str) -> Result<bool> {
        let done = run!(
            &self.pool,
            sqlx::query(
                "UPDATE ingests SET state = ?2 WHERE job_id = ?1 AND state = 'quarantined'",
            )
            .bind(job_id)
            .bind(state),
            execute
        )?;
        Ok(done.rows_affected() == 1)
    }

    /// Open quarantine entries, newest first; `before_ms` limits them to older ones (retention).
    pub async fn quarantined(&self, before_ms: Option<i64>) -> Result<Vec<Ingest>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Ingest>(
            "SELECT * FROM ingests WHERE state = 'quarantined' AND (?1 IS NULL OR finished_ms < ?1)
             ORDER BY finished_ms DESC",
            )
            .bind(before_ms),
            fetch_all
        )?)
    }

    pub async fn ingest(&self, job_id: &str) -> Result<Option<Ingest>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Ingest>("SELECT * FROM ingests WHERE job_id = ?1").bind(job_id),
            fetch_optional
        )?)
    }

    // --- users ---------------------------------------------------------------------------------

    /// Adds a user with `role` and the groups `groups` (which must exist).
    pub async fn add_user(&self, name: &str, role: Role, groups: &[String]) -> Result<UserInfo> {
        access::validate_name("user", name)?;
        let mut tx = self.write_tx().await?;
        let inserted: Option<i64> = run_tx!(
            &mut tx,
            sqlx::query_scalar(
                "INSERT INTO users (name, role, created_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO NOTHING RETURNING id",
            )
            .bind(name)
            .bind(role.as_str())
            .bind(now_ms()),
            fetch_optional
        )?;
        let Some(user_id) = inserted else {
            return Err(CatalogError::Conflict(format!(
                "user {name} exists; `snapq users set-role` or `users grant` change it"
            )));
        };
        for group in groups {
            grant_in(&mut tx, user_id, group).await?;
        }
        tx.commit().await?;
        self.user(name)
            .await?
            .ok_or_else(|| CatalogError::NotFound(format!("user {name}")))
    }

    /// Every user with their groups and number of usable tokens, by name.
    pub async fn users(&self) -> Result<Vec<UserInfo>> {
        let rows: Vec<UserRow> = run!(
            &self.pool,
            sqlx::query_as(USER_SELECT)
                .bind(Option::<&str>::None)
                .bind(now_ms()),
            fetch_all
        )?;
        rows.into_iter().map(UserRow::into_info).collect()
    }

    pub async fn user(&self, name: &str) -> Result<Option<UserInfo>> {
        let row: Option<UserRow> = run!(
            &self.pool,
            sqlx::query_as(USER_SELECT).bind(Some(name)).bind(now_ms()),
            fetch_optional
        )?;
        row.map(UserRow::into_info).transpose()
    }

    fn unknown_user(name: &str) -> CatalogError {
        CatalogError::NotFound(format!(
            "no user named {:?}; `snapq users list` shows them",
            name.chars().take(64).collect::<String>()
        ))
    }

    /// Removes a user; their tokens stay as revoked rows so a later use is told why it fails.
    pub async fn remove_user(&self, name: &str) -> Result<()> {
        let mut tx = self.write_tx().await?;
        let bootstrap: Option<i64> = run_tx!(
            &mut tx,
            sqlx::query_scalar(
                "SELECT count(*) FROM tokens t JOIN users u ON u.id = t.user_id
             WHERE u.name = ?1 AND t.bootstrap AND t.revoked_ms IS NULL",
            )
            .bind(name),
            fetch_optional
        )?;
        if bootstrap.unwrap_or(0) > 0 {
            return Err(CatalogError::Conflict(format!(
                "{name} holds the data directory's admin.token and cannot be removed"
            )));
        }
        run_tx!(
            &mut tx,
            sqlx::query(
            "UPDATE tokens SET revoked_ms = ?2, revoked_reason = 'its user ' || ?1 || ' was removed'
             WHERE user_id = (SELECT id FROM users WHERE name = ?1) AND revoked_ms IS NULL",
            )
            .bind(name)
            .bind(now_ms()),
            execute
        )?;
        let removed = run_tx!(
            &mut tx,
            sqlx::query("DELETE FROM users WHERE name = ?1").bind(name),
            execute
        )?;
        if removed.rows_affected() == 0 {
            return Err(Self::unknown_user(name));
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn set_role(&self, name: &str, role: Role) -> Result<()> {
        if role != Role::Admin && self.holds_bootstrap(name).await? {
            return Err(CatalogError::Conflict(format!(
                "{name} holds the data directory's admin.token and stays an admin"
            )));
        }
        let done = run!(
            &self.pool,
            sqlx::query("UPDATE users SET role = ?2 WHERE name = ?1")
                .bind(name)
                .bind(role.as_str()),
            execute
        )?;
        if done.rows_affected() == 0 {
            return Err(Self::unknown_user(name));
        }
        Ok(())
    }

    async fn holds_bootstrap(&self, name: &str) -> Result<bool> {
        let n: i64 = run!(
            &self.pool,
            sqlx::query_scalar(
                "SELECT count(*) FROM tokens t JOIN users u ON u.id = t.user_id
             WHERE u.name = ?1 AND t.bootstrap AND t.revoked_ms IS NULL",
            )
            .bind(name),
            fetch_one
        )?;
        Ok(n > 0)
    }

    /// Grants `group` to user `name`; granting twice is not an error.
    pub async fn grant(&self, name: &str, group: &str) -> Result<()> {
        let mut tx = self.write_tx().await?;
        let user_id: i64 = run_tx!(
            &mut tx,
            sqlx::query_scalar("SELECT id FROM users WHERE name = ?1").bind(name),
            fetch_optional
        )?
        .ok_or_else(|| Self::unknown_user(name))?;
        grant_in(&mut tx, user_id, group).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Takes `group` away from user `name`; `false` if they did not have it.
    pub async fn revoke_group(&self, name: &str, group: &str) -> Result<bool> {
        if self.user(name).await?.is_none() {
            return Err(Self::unknown_user(name));
        }
        let done = run!(
            &self.pool,
            sqlx::query(
                "DELETE FROM user_groups
             WHERE user_id = (SELECT id FROM users WHERE name = ?1)
               AND group_id = (SELECT id FROM computer_groups WHERE name = ?2)",
            )
            .bind(name)
            .bind(group),
            execute
        )?;
        Ok(done.rows_affected() > 0)
    }

    /// Stores the argon2id PHC string of user `name`'s console password.
    pub async fn set_password_hash(&self, name: &str, phc: &str) -> Result<()> {
        let done = run!(
            &self.pool,
            sqlx::query("UPDATE users SET password_hash = ?2 WHERE name = ?1")
                .bind(name)
                .bind(phc),
            execute
        )?;
        if done.rows_affected() == 0 {
            return Err(Self::unknown_user(name));
        }
        Ok(())
    }

    /// The argon2id PHC string of user `name`'s password, if one is set.
    pub async fn password_hash(&self, name: &str) -> Result<Option<String>> {
        Ok(run!(
            &self.pool,
            sqlx::query_scalar("SELECT password_hash FROM users WHERE name = ?1").bind(name),
            fetch_optional
        )?
        .flatten())
    }

    // --- tokens --------------------------------------------------------------------------------

    /// Makes `admin.token` (its sha256 here) the bootstrap admin's token: creates the user `admin`
    /// if needed, and revokes a bootstrap token of an earlier file. Returns how many it revoked.
    pub async fn ensure_bootstrap_token(&self, token_sha256: &str, prefix: &str) -> Result<u64> {
        let now = now_ms();
        let mut tx = self.write_tx().await?;
        run_tx!(
            &mut tx,
            sqlx::query(
                "INSERT INTO users (name, role, created_ms) VALUES ('admin', 'admin', ?1)
             ON CONFLICT (name) DO UPDATE SET role = 'admin'",
            )
            .bind(now),
            execute
        )?;
        let revoked = run_tx!(
            &mut tx,
            sqlx::query(
                "UPDATE tokens SET revoked_ms = ?2, revoked_reason = 'admin.token was replaced'
             WHERE bootstrap AND revoked_ms IS NULL AND token_sha256 <> ?1",
            )
            .bind(token_sha256)
            .bind(now),
            execute
        )?
        .rows_affected();
        run_tx!(
            &mut tx,
            sqlx::query(
            "INSERT INTO tokens (user_id, user_name, label, prefix, token_sha256, bootstrap, created_ms)
             SELECT id, name, 'admin.token', ?2, ?1, TRUE, ?3 FROM users WHERE name = 'admin'
             ON CONFLICT (token_sha256) DO UPDATE SET revoked_ms = NULL, revoked_reason = NULL,
                bootstrap = TRUE, user_id = excluded.user_id, user_name = excluded.user_name",
            )
            .bind(token_sha256)
            .bind(prefix)
            .bind(now),
            execute
        )?;
        tx.commit().await?;
        Ok(revoked)
    }

    /// Stores a new token of user `user` (its sha256 and visible prefix; never the token).
    pub async fn create_token(
        &self,
        user: &str,
        label: Option<&str>,
        prefix: &str,
        token_sha256: &str,
        expires_ms: Option<i64>,
    ) -> Result<TokenInfo> {
        if let Some(label) = label
            && (label.chars().count() > 200 || label.chars().any(char::is_control))
        {
            return Err(CatalogError::Invalid(
                "a token label is at most 200 characters without control characters".into(),
            ));
        }
        let id: Option<i64> = run!(
            &self.pool,
            sqlx::query_scalar(
            "INSERT INTO tokens (user_id, user_name, label, prefix, token_sha256, created_ms, expires_ms)
             SELECT id, name, ?2, ?3, ?4, ?5, ?6 FROM users WHERE name = ?1 RETURNING id",
            )
            .bind(user)
            .bind(label)
            .bind(prefix)
            .bind(token_sha256)
            .bind(now_ms())
            .bind(expires_ms),
            fetch_optional
        )?;
        let id = id.ok_or_else(|| Self::unknown_user(user))?;
        self.token(id)
            .await?
            .ok_or_else(|| CatalogError::NotFound(format!("token {id}")))
    }

    /// Tokens, newest first: all, or one user's.
    pub async fn tokens(&self, user: Option<&str>) -> Result<Vec<TokenInfo>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, TokenInfo>(
                "SELECT id, user_name AS user, label, prefix, bootstrap, created_ms, last_used_ms,
                    expires_ms, revoked_ms, revoked_reason
             FROM tokens WHERE ?1 IS NULL OR user_name = ?1 ORDER BY id DESC",
            )
            .bind(user),
            fetch_all
        )?)
    }

    pub async fn token(&self, id: i64) -> Result<Option<TokenInfo>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, TokenInfo>(
                "SELECT id, user_name AS user, label, prefix, bootstrap, created_ms, last_used_ms,
                    expires_ms, revoked_ms, revoked_reason
             FROM tokens WHERE id = ?1",
            )
            .bind(id),
            fetch_optional
        )?)
    }

    /// Revokes token `id`; `false` if it was already revoked.
    pub async fn revoke_token(&self, id: i64, reason: &str) -> Result<bool> {
        let done = run!(
            &self.pool,
            sqlx::query(
            "UPDATE tokens SET revoked_ms = ?2, revoked_reason = ?3 WHERE id = ?1 AND revoked_ms IS NULL",
            )
            .bind(id)
            .bind(now_ms())
            .bind(reason),
            execute
        )?;
        Ok(done.rows_affected() > 0)
    }

    /// Who holds the token with this sha256, with their role and granted groups' rules, or why
    /// the token is refused. One read; `last_used_ms` is written at most once a minute per token.
    pub async fn authenticate(
        &self,
        token_sha256: &str,
    ) -> Result<std::result::Result<Principal, TokenRefusal>> {
        let row: Option<AuthRow> = run!(
            &self.pool,
            sqlx::query_as(
            "SELECT t.id, t.user_name, t.expires_ms, t.revoked_ms, t.revoked_reason, t.last_used_ms,
                    u.role,
                    (SELECT json_group_array(json_object('hostnames', json(g.hostnames),
                            'cidrs', json(g.cidrs), 'labels', json(g.labels), 'members', json(g.members)))
                     FROM user_groups ug JOIN computer_groups g ON g.id = ug.group_id
                     WHERE ug.user_id = u.id) AS groups
             FROM tokens t LEFT JOIN users u ON u.id = t.user_id
             WHERE t.token_sha256 = ?1",
            )
            .bind(token_sha256),
            fetch_optional
        )?;
        let Some(row) = row else {
            return Ok(Err(TokenRefusal::Unknown));
        };
        let now = now_ms();
        if let Some(when) = row.revoked_ms {
            return Ok(Err(TokenRefusal::Revoked {
                when,
                reason: row.revoked_reason,
            }));
        }
        let (Some(role), Some(groups)) = (row.role, row.groups) else {
            return Ok(Err(TokenRefusal::UserRemoved {
                user: row.user_name,
            }));
        };
        if let Some(when) = row.expires_ms
            && when <= now
        {
            return Ok(Err(TokenRefusal::Expired { when }));
        }
        if row.last_used_ms.is_none_or(|t| now - t > 60_000) {
            run!(
                &self.pool,
                sqlx::query("UPDATE tokens SET last_used_ms = ?2 WHERE id = ?1")
                    .bind(row.id)
                    .bind(now),
                execute
            )?;
        }
        Ok(Ok(Principal {
            token_id: row.id,
            name: row.user_name,
            role: role.parse()?,
            groups: serde_json::from_str(&groups)
                .map_err(|e| CatalogError::Invalid(format!("stored group rules: {e}")))?,
        }))
    }

    // --- computer groups -----------------------------------------------------------------------

    pub async fn add_group(&self, name: &str, rules: &GroupRules) -> Result<Group> {
        access::validate_name("group", name)?;
        rules.validate()?;
        let json = |v: &Vec<String>| serde_json::to_string(v).expect("strings serialize");
        let inserted: Option<i64> = run!(
            &self.pool,
            sqlx::query_scalar(
                "INSERT INTO computer_groups (name, hostnames, cidrs, labels, members, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (name) DO NOTHING RETURNING id",
            )
            .bind(name)
            .bind(json(&rules.hostnames))
            .bind(json(&rules.cidrs))
            .bind(json(&rules.labels))
            .bind(json(&rules.members))
            .bind(now_ms()),
            fetch_optional
        )?;
        if inserted.is_none() {
            return Err(CatalogError::Conflict(format!(
                "group {name} exists; remove it first to redefine it"
            )));
        }
        self.group(name)
            .await?
            .ok_or_else(|| CatalogError::NotFound(format!("group {name}")))
    }

    /// Every group by name, with the users granted it.
    pub async fn groups(&self) -> Result<Vec<Group>> {
        let rows: Vec<GroupRow> = run!(
            &self.pool,
            sqlx::query_as(GROUP_SELECT).bind(Option::<&str>::None),
            fetch_all
        )?;
        rows.into_iter().map(GroupRow::into_group).collect()
    }

    pub async fn group(&self, name: &str) -> Result<Option<Group>> {
        let row: Option<GroupRow> = run!(
            &self.pool,
            sqlx::query_as(GROUP_SELECT).bind(Some(name)),
            fetch_optional
        )?;
        row.map(GroupRow::into_group).transpose()
    }

    /// Removes a group and every grant of it.
    pub async fn remove_group(&self, name: &str) -> Result<()> {
        let done = run!(
            &self.pool,
            sqlx::query("DELETE FROM computer_groups WHERE name = ?1").bind(name),
            execute
        )?;
        if done.rows_affected() == 0 {
            return Err(CatalogError::NotFound(format!(
                "no group named {:?}; `snapq groups list` shows them",
                name.chars().take(64).collect::<String>()
            )));
        }
        Ok(())
    }

    /// The endpoints that are members of a group now, evaluated against their current facts.
    pub async fn members(&self, rules: &GroupRules) -> Result<Vec<Endpoint>> {
        let compiled = rules.compile();
        Ok(self
            .search_endpoints("")
            .await?
            .into_iter()
            .filter(|e| compiled.matches(&e.facts()))
            .collect())
    }

    // --- job targets ---------------------------------------------------------------------------

    /// Remembers which endpoint a job belongs to, for scoping.
    pub async fn set_job_target(&self, job_id: &str, hostname: &str) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query(
                "INSERT INTO job_targets (job_id, hostname) VALUES (?1, ?2)
             ON CONFLICT (job_id) DO UPDATE SET hostname = excluded.hostname",
            )
            .bind(job_id)
            .bind(hostname),
            execute
        )?;
        Ok(())
    }

    /// The endpoints of these jobs, where recorded.
    pub async fn job_targets(
        &self,
        job_ids: &[&str],
    ) -> Result<std::collections::HashMap<String, String>> {
        let ids = serde_json::to_string(job_ids).expect("strings serialize");
        let rows: Vec<(String, String)> = run!(
            &self.pool,
            sqlx::query_as(
            "SELECT job_id, hostname FROM job_targets WHERE job_id IN (SELECT value FROM json_each(?1))",
            )
            .bind(ids),
            fetch_all
        )?;
        Ok(rows.into_iter().collect())
    }

    // --- connections ---------------------------------------------------------------------------

    /// Creates the connection to `target` (a JSON source) of endpoint `endpoint_id`, or, when one
    /// exists for that target, takes that row again (a connection is reused by its target), with
    /// the outcome of the attempt. Returns its id.
    pub async fn upsert_connection(
        &self,
        endpoint_id: i64,
        target: &str,
        created_by: &str,
        attempt: &ConnectionAttempt,
    ) -> Result<i64> {
        let now = now_ms();
        let id: i64 = run!(
            &self.pool,
            sqlx::query_scalar(
                "INSERT INTO connections (endpoint_id, target, address, status, reason, since_ms,
                last_activity_ms, created_ms, created_by, db_bytes, events, oldest_ts, newest_ts)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (target) DO UPDATE SET endpoint_id = excluded.endpoint_id,
                address = coalesce(excluded.address, connections.address), status = excluded.status,
                reason = excluded.reason, since_ms = excluded.since_ms,
                last_activity_ms = excluded.last_activity_ms,
                db_bytes = coalesce(excluded.db_bytes, connections.db_bytes),
                events = coalesce(excluded.events, connections.events),
                oldest_ts = coalesce(excluded.oldest_ts, connections.oldest_ts),
                newest_ts = coalesce(excluded.newest_ts, connections.newest_ts)
             RETURNING id",
            )
            .bind(endpoint_id)
            .bind(target)
            .bind(&attempt.address)
            .bind(&attempt.status)
            .bind(&attempt.reason)
            .bind(now)
            .bind(created_by)
            .bind(attempt.db_bytes)
            .bind(attempt.events)
            .bind(attempt.oldest_ts)
            .bind(attempt.newest_ts),
            fetch_one
        )?;
        Ok(id)
    }

    /// Connection `id` with its endpoint's facts (closed ones too).
    pub async fn connection(&self, id: i64) -> Result<Option<ConnectionRow>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, ConnectionRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {CONNECTION_COLUMNS} FROM connections c JOIN endpoints e ON e.id = c.endpoint_id
             WHERE c.id = ?1"
        )))
            .bind(id),
            fetch_optional
        )?)
    }

    /// Connections not closed, or only those with `status`, oldest first.
    pub async fn connections(&self, status: Option<&str>) -> Result<Vec<ConnectionRow>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, ConnectionRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {CONNECTION_COLUMNS} FROM connections c JOIN endpoints e ON e.id = c.endpoint_id
             WHERE (?1 IS NULL AND c.status <> 'closed') OR c.status = ?1 ORDER BY c.id"
        )))
            .bind(status),
            fetch_all
        )?)
    }

    /// Sets a connection's status (and since when, if it changed) and reason.
    pub async fn set_connection_status(
        &self,
        id: i64,
        status: &str,
        reason: Option<&str>,
    ) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query(
                "UPDATE connections SET since_ms = CASE WHEN status = ?2 THEN since_ms ELSE ?4 END,
                status = ?2, reason = ?3 WHERE id = ?1",
            )
            .bind(id)
            .bind(status)
            .bind(reason)
            .bind(now_ms()),
            execute
        )?;
        Ok(())
    }

    /// Records use of an active connection now. False when it is no longer active (a query that
    /// raced a time-out or a close).
    pub async fn touch_connection(&self, id: i64) -> Result<bool> {
        let done = run!(
            &self.pool,
            sqlx::query(
                "UPDATE connections SET last_activity_ms = ?2 WHERE id = ?1 AND status = 'active'",
            )
            .bind(id)
            .bind(now_ms()),
            execute
        )?;
        Ok(done.rows_affected() == 1)
    }

    /// Times out the active connections unused for `idle_ms`; returns how many.
    pub async fn time_out_connections(&self, idle_ms: i64, reason: &str) -> Result<u64> {
        let now = now_ms();
        let done = run!(
            &self.pool,
            sqlx::query(
                "UPDATE connections SET status = 'timed_out', reason = ?3, since_ms = ?1
             WHERE status = 'active' AND last_activity_ms < ?1 - ?2",
            )
            .bind(now)
            .bind(idle_ms)
            .bind(reason),
            execute
        )?;
        Ok(done.rows_affected())
    }

    // --- audit ---------------------------------------------------------------------------------

    /// Appends to the audit log: who (`actor`, a user name, `agent:HOST` or `system`) did what
    /// (`action`, dotted like `user.add`, `capture`, `endpoint.rekey`) to which `target`, how it
    /// ended (`result`: `ok`, `queued`, `refused`, `failed`, ...) and any `detail`. The time is
    /// now. This signature is stable: every part of the server writes through it.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        result: &str,
        detail: Option<&str>,
    ) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query(
            "INSERT INTO audit (ts_ms, actor, action, target, result, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .bind(now_ms())
            .bind(storable(actor).into_owned())
            .bind(action)
            .bind(storable(target).into_owned())
            .bind(result)
            .bind(detail.map(|d| storable(d).into_owned())),
            execute
        )?;
        Ok(())
    }

    /// Audit entries, newest first. `action` matches exactly or as a prefix before a dot
    /// (`user` finds `user.add` and `user.remove`).
    pub async fn audit_list(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, AuditEntry>(
                "SELECT id, ts_ms, actor, action, target, result, detail FROM audit
             WHERE (?1 IS NULL OR ts_ms >= ?1) AND (?5 IS NULL OR ts_ms < ?5)
               AND (?2 IS NULL OR actor = ?2)
               AND (?3 IS NULL OR action = ?3 OR substr(action, 1, length(?3) + 1) = ?3 || '.')
             ORDER BY ts_ms DESC, id DESC LIMIT ?4",
            )
            .bind(filter.since_ms)
            .bind(&filter.actor)
            .bind(&filter.action)
            .bind(i64::from(filter.limit.clamp(1, 10_000)))
            .bind(filter.until_ms),
            fetch_all
        )?)
    }
}

/// Grants a group inside a transaction.
async fn grant_in(tx: &mut Tx, user_id: i64, group: &str) -> Result<()> {
    let group_id: i64 = run_tx!(
        tx,
        sqlx::query_scalar("SELECT id FROM computer_groups WHERE name = ?1").bind(group),
        fetch_optional
    )?
    .ok_or_else(|| {
        CatalogError::NotFound(format!(
            "no group named {:?}; `snapq groups add` makes one",
            group.chars().take(64).collect::<String>()
        ))
    })?;
    run_tx!(
        tx,
        sqlx::query(
            "INSERT INTO user_groups (user_id, group_id) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        )
        .bind(user_id)
        .bind(group_id),
        execute
    )?;
    Ok(())
}

const USER_SELECT: &str = "SELECT u.name, u.role, u.created_ms, u.password_hash IS NOT NULL AS has_password,
        (SELECT json_group_array(g.name) FROM user_groups ug JOIN computer_groups g ON g.id = ug.group_id
         WHERE ug.user_id = u.id) AS groups,
        (SELECT count(*) FROM tokens t WHERE t.user_id = u.id AND t.revoked_ms IS NULL
         AND (t.expires_ms IS NULL OR t.expires_ms > ?2)) AS tokens
    FROM users u WHERE ?1 IS NULL OR u.name = ?1 ORDER BY u.name";

#[derive(FromRow)]
struct UserRow {
    name: String,
    role: String,
    created_ms: i64,
    has_password: bool,
    groups: String,
    tokens: i64,
}

impl UserRow {
    fn into_info(self) -> Result<UserInfo> {
        let mut groups: Vec<String> = serde_json::from_str(&self.groups)
            .map_err(|e| CatalogError::Invalid(format!("stored groups: {e}")))?;
        groups.sort();
        Ok(UserInfo {
            name: self.name,
            role: self.role.parse()?,
            groups,
            tokens: self.tokens,
            has_password: self.has_password,
            created_ms: self.created_ms,
        })
    }
}

/// A user as listings show it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct UserInfo {
    pub name: String,
    pub role: Role,
    pub groups: Vec<String>,
    /// Usable (not revoked, not expired) tokens.
    pub tokens: i64,
    pub has_password: bool,
    pub created_ms: i64,
}

/// A token as listings show it; the token itself is never stored.
#[derive(Debug, Clone, Serialize, serde::Deserialize, FromRow, utoipa::ToSchema)]
pub struct TokenInfo {
    pub id: i64,
    pub user: String,
    pub label: Option<String>,
    pub prefix: String,
    pub bootstrap: bool,
    pub created_ms: i64,
    pub last_used_ms: Option<i64>,
    pub expires_ms: Option<i64>,
    pub revoked_ms: Option<i64>,
    pub revoked_reason: Option<String>,
}

/// Endpoints matching `?1` by hostname or address, the hostnames it starts first.
const SEARCH: &str = "WHERE ?1 = '' OR instr(lower(hostname), lower(?1)) > 0 OR instr(ips, ?1) > 0
     ORDER BY (substr(lower(hostname), 1, length(?1)) = lower(?1)) DESC, hostname";

/// An endpoint's hostname, addresses and labels as stored.
type FactsRow = (String, JsonText<Vec<String>>, JsonText<Vec<String>>);

/// An endpoint's id with its facts.
type IdFactsRow = (i64, String, JsonText<Vec<String>>, JsonText<Vec<String>>);

fn unpack_facts(rows: Vec<FactsRow>) -> Vec<(String, Vec<String>, Vec<String>)> {
    rows.into_iter()
        .map(|(h, ips, labels)| (h, ips.0, labels.0))
        .collect()
}

#[derive(FromRow)]
struct AuthRow {
    id: i64,
    user_name: String,
    expires_ms: Option<i64>,
    revoked_ms: Option<i64>,
    revoked_reason: Option<String>,
    last_used_ms: Option<i64>,
    role: Option<String>,
    groups: Option<String>,
}

/// The holder of a valid token.
#[derive(Debug, Clone)]
pub struct Principal {
    pub token_id: i64,
    pub name: String,
    pub role: Role,
    /// The rules of every group granted to the user.
    pub groups: Vec<GroupRules>,
}

/// Why a token is not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRefusal {
    Unknown,
    Revoked { when: i64, reason: Option<String> },
    Expired { when: i64 },
    UserRemoved { user: String },
}

const GROUP_SELECT: &str = "SELECT g.name, g.hostnames, g.cidrs, g.labels, g.members, g.created_ms,
        (SELECT json_group_array(u.name) FROM user_groups ug JOIN users u ON u.id = ug.user_id
         WHERE ug.group_id = g.id) AS users
    FROM computer_groups g WHERE ?1 IS NULL OR g.name = ?1 ORDER BY g.name";

#[derive(FromRow)]
struct GroupRow {
    name: String,
    hostnames: String,
    cidrs: String,
    labels: String,
    members: String,
    created_ms: i64,
    users: String,
}

impl GroupRow {
    fn into_group(self) -> Result<Group> {
        let list = |s: &str| -> Result<Vec<String>> {
            serde_json::from_str(s).map_err(|e| CatalogError::Invalid(format!("stored group: {e}")))
        };
        let mut users = list(&self.users)?;
        users.sort();
        Ok(Group {
            name: self.name,
            rules: GroupRules {
                hostnames: list(&self.hostnames)?,
                cidrs: list(&self.cidrs)?,
                labels: list(&self.labels)?,
                members: list(&self.members)?,
            },
            users,
            created_ms: self.created_ms,
        })
    }
}

/// A computer group: its rules and the users granted it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Group {
    pub name: String,
    #[serde(flatten)]
    #[schema(inline)]
    pub rules: GroupRules,
    pub users: Vec<String>,
    pub created_ms: i64,
}

/// One entry of the audit log.
#[derive(Debug, Clone, Serialize, serde::Deserialize, FromRow, utoipa::ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub ts_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub result: String,
    pub detail: Option<String>,
}

/// Which audit entries to list.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Inclusive.
    pub since_ms: Option<i64>,
    /// Exclusive.
    pub until_ms: Option<i64>,
    pub actor: Option<String>,
    pub action: Option<String>,
    pub limit: u32,
}

impl Endpoint {
    /// What computer groups are matched against.
    pub fn facts(&self) -> Facts<'_> {
        Facts {
            hostname: &self.hostname,
            ips: &self.ips,
            labels: &self.labels,
        }
    }
}
