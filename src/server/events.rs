//! The one event engine of the server: pages of events, summaries and process trees of a live
//! endpoint or of a stored snapshot, with the same filter language, the same errors and the same
//! cursors either way.
//!
//! Every request is validated here with the query engine the agent uses (`core/src/query.rs`), so a
//! bad filter gets the same 400 whichever the source. A live endpoint is then asked through its
//! pinned client (`Agents`), bounded by [`LIVE_QUERY_TIMEOUT`], and an agent that does not answer is
//! an error naming the endpoint (the connection layer turns it into `unexpected_interruption`). A
//! stored snapshot is attacker-controlled bytes, so it is queried on the server through a handle
//! opened by [`open_snapshot_readonly`] (no-follow, read-only, defensive, schema untrusted, recorder
//! tables must be tables), with a time budget per query enforced by a progress handler, on a
//! blocking thread. Handles are cached (at most [`MAX_OPEN_SNAPSHOTS`]) and reused across pages.
//!
//! Cursors handed out here carry a tag of their source, so a cursor of one connection's target is
//! refused on another's rather than silently paging through different data.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use snapq_core::agent_client::{AgentError, LIVE_QUERY_TIMEOUT};
use snapq_core::query::{self, EventPage, ProcessTree, QueryError, Summary};
use snapq_core::verify::{self, VerifyError};

use super::ServerState;
use crate::agent::api::EventParams;
use crate::http::ApiError;

/// Snapshot handles kept open at once; the least recently used is closed first.
pub const MAX_OPEN_SNAPSHOTS: usize = 16;
/// The time budget of one query on a stored snapshot when the server is not told otherwise.
pub const DEFAULT_QUERY_BUDGET: Duration = Duration::from_secs(10);
/// SQLite virtual-machine steps between two looks at the clock.
const PROGRESS_STEPS: i32 = 20_000;

/// What a connection queries: an endpoint's live recorder database or a stored snapshot. It is
/// what a connection row stores as its target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    Endpoint { hostname: String },
    Snapshot { id: i64 },
}

impl Source {
    /// How people read it: `endpoint web-01`, `snapshot 7`.
    pub fn describe(&self) -> String {
        match self {
            Source::Endpoint { hostname } => format!("endpoint {hostname}"),
            Source::Snapshot { id } => format!("snapshot {id}"),
        }
    }

    /// The tag that binds a cursor to this source.
    fn cursor_tag(&self) -> String {
        let key = match self {
            Source::Endpoint { hostname } => format!("e\0{hostname}"),
            Source::Snapshot { id } => format!("s\0{id}"),
        };
        super::sha256_hex(&key)[..8].to_owned()
    }
}

/// What went wrong, sorted by what the connection layer does about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The request is wrong (filter, cursor, limit) or names nothing: the caller fixes it.
    Request,
    /// The endpoint's agent did not answer: the connection is interrupted.
    Unreachable,
    /// The query took longer than allowed (agent timeout with the agent alive, or the snapshot
    /// query's time budget): the source is fine, the query is too broad.
    TooSlow,
    /// The source cannot be queried at all (no agent, a changed certificate, a tampered or
    /// incomplete snapshot).
    Unusable,
    /// A fault of the server itself.
    Internal,
}

/// An engine error: what the caller sees (status, message) and what it means for a connection.
#[derive(Debug, Clone)]
pub struct EventsError {
    pub failure: Failure,
    pub status: StatusCode,
    pub message: String,
}

impl EventsError {
    fn new(failure: Failure, status: StatusCode, message: impl Into<String>) -> EventsError {
        EventsError {
            failure,
            status,
            message: message.into(),
        }
    }

    /// True when the agent stopped answering (the connection becomes `unexpected_interruption`).
    pub fn is_interruption(&self) -> bool {
        self.failure == Failure::Unreachable
    }
}

impl std::fmt::Display for EventsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for EventsError {}

impl From<ApiError> for EventsError {
    fn from(e: ApiError) -> Self {
        let failure = if e.status.is_client_error() {
            Failure::Request
        } else {
            Failure::Internal
        };
        EventsError::new(failure, e.status, e.message)
    }
}

impl From<EventsError> for ApiError {
    fn from(e: EventsError) -> Self {
        if e.failure == Failure::Internal {
            tracing::warn!(error = %e.message, "event query failed");
        }
        ApiError::new(e.status, e.message)
    }
}

fn query_error(source: &Source, e: QueryError) -> EventsError {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    let failure = match e.class() {
        query::ErrorClass::Internal => Failure::Internal,
        _ => Failure::Request,
    };
    let message = match e {
        QueryError::Database(e) => format!("querying {}: {e}", source.describe()),
        e => e.to_string(),
    };
    EventsError::new(failure, status, message)
}

fn request(message: impl Into<String>) -> EventsError {
    EventsError::new(Failure::Request, StatusCode::BAD_REQUEST, message)
}

/// One page of events of `source`. `params` is the request as the API receives it (its cursor,
/// if any, one this engine handed out for the same source).
#[tracing::instrument(skip_all, fields(source = %source.describe()))]
pub async fn events(
    state: &ServerState,
    source: &Source,
    params: &EventParams,
) -> Result<EventPage, EventsError> {
    let (tag, inner, q) = prepare(source, params)?;
    let mut page = match source {
        Source::Endpoint { hostname } => {
            let agent = agent(state, hostname).await?;
            let result = agent.events(&inner.to_query_string()).await;
            agent_answer(&agent, hostname, result).await?
        }
        Source::Snapshot { id } => {
            let source = source.clone();
            with_snapshot(state, *id, move |conn| {
                query::query_events(conn, &q).map_err(|e| query_error(&source, e))
            })
            .await?
        }
    };
    page.next_cursor = page.next_cursor.map(|c| format!("{tag}.{c}"));
    Ok(page)
}

/// [`events`] as the JSON body of the API's answer. A live endpoint's page is passed on as the
/// agent wrote it, with only its cursor tagged (no second parse and encode of every event).
#[tracing::instrument(skip_all, fields(source = %source.describe()))]
pub async fn events_json(
    state: &ServerState,
    source: &Source,
    params: &EventParams,
) -> Result<Vec<u8>, EventsError> {
    let Source::Endpoint { hostname } = source else {
        let page = events(state, source, params).await?;
        return serde_json::to_vec(&page).map_err(|e| {
            EventsError::new(
                Failure::Internal,
                StatusCode::INTERNAL_SERVER_ERROR,
                e.to_string(),
            )
        });
    };
    let (tag, inner, _) = prepare(source, params)?;
    let agent = agent(state, hostname).await?;
    let result = agent.events_raw(&inner.to_query_string()).await;
    let body = agent_answer(&agent, hostname, result).await?;
    match tag_cursor(&body, &tag) {
        Some(tagged) => Ok(tagged),
        None => {
            // Not the shape the agent writes: read it properly.
            let mut page: EventPage = serde_json::from_slice(&body).map_err(|e| {
                EventsError::new(
                    Failure::Unusable,
                    StatusCode::BAD_GATEWAY,
                    format!("endpoint {hostname} sent a page that is not one: {e}"),
                )
            })?;
            page.next_cursor = page.next_cursor.map(|c| format!("{tag}.{c}"));
            serde_json::to_vec(&page).map_err(|e| {
                EventsError::new(
                    Failure::Internal,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    e.to_string(),
                )
            })
        }
    }
}

/// The agent writes a page as `{"events":[...],"next_cursor":"HEX"}` (or `null`): the cursor is
/// the last member, and its key cannot occur inside a string (quotes there are escaped). Returns
/// the body with the cursor tagged, or `None` for any other shape.
fn tag_cursor(body: &[u8], tag: &str) -> Option<Vec<u8>> {
    const NULL_END: &[u8] = b",\"next_cursor\":null}";
    const KEY: &[u8] = b",\"next_cursor\":\"";
    if !body.starts_with(b"{\"events\":[") {
        return None;
    }
    if body.ends_with(NULL_END) {
        return Some(body.to_vec());
    }
    let at = body.windows(KEY.len()).rposition(|w| w == KEY)?;
    let value = &body[at + KEY.len()..];
    let cursor = value.strip_suffix(b"\"}")?;
    if !cursor.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() + tag.len() + 1);
    out.extend_from_slice(&body[..at + KEY.len()]);
    out.extend_from_slice(tag.as_bytes());
    out.push(b'.');
    out.extend_from_slice(value);
    Some(out)
}

/// Checks the cursor's source tag and validates the request with the query engine: the tag, the
/// request as the agent gets it (its own cursor), and the parsed query.
fn prepare(
    source: &Source,
    params: &EventParams,
) -> Result<(String, EventParams, snapq_core::query::EventQuery), EventsError> {
    let tag = source.cursor_tag();
    let mut inner = EventParams {
        event_type: params.event_type.clone(),
        wheres: params.wheres.clone(),
        any: params.any,
        since: params.since.clone(),
        until: params.until.clone(),
        sort: params.sort.clone(),
        limit: params.limit.clone(),
        cursor: None,
    };
    if let Some(cursor) = params.cursor.as_deref().filter(|c| !c.trim().is_empty()) {
        let Some((given, rest)) = cursor.trim().split_once('.') else {
            return Err(request(
                "invalid cursor: pass the `next_cursor` of the previous page unchanged, or drop `cursor` to start from the first page",
            ));
        };
        if given != tag {
            return Err(request(format!(
                "cursor belongs to another connection or snapshot, not {}: drop `cursor` to start from the first page",
                source.describe()
            )));
        }
        inner.cursor = Some(rest.to_owned());
    }
    // Validate here, with the same engine, before anything is sent or opened.
    let q = inner.to_query()?;
    Ok((tag, inner, q))
}

/// Event counts per type and the time range of `source`.
#[tracing::instrument(skip_all, fields(source = %source.describe()))]
pub async fn summary(state: &ServerState, source: &Source) -> Result<Summary, EventsError> {
    match source {
        Source::Endpoint { hostname } => {
            let agent = agent(state, hostname).await?;
            let result = agent.summary().await;
            agent_answer(&agent, hostname, result).await
        }
        Source::Snapshot { id } => {
            let source = source.clone();
            // A stored snapshot never changes: it is counted once per open handle (counting
            // every table of a 4M-event snapshot is most of the time an events grid takes to open).
            with_snapshot_handle(state, *id, move |handle, budget| {
                if let Some(known) = &handle.summary {
                    return Ok(known.clone());
                }
                let counted = handle.run(budget, |conn| {
                    query::summary(conn).map_err(|e| query_error(&source, e))
                })?;
                handle.summary = Some(counted.clone());
                Ok(counted)
            })
            .await
        }
    }
}

/// Process row `process_id` of `source` with its parent chain and its children.
#[tracing::instrument(skip_all, fields(source = %source.describe()))]
pub async fn process_tree(
    state: &ServerState,
    source: &Source,
    process_id: i64,
) -> Result<ProcessTree, EventsError> {
    match source {
        Source::Endpoint { hostname } => {
            let agent = agent(state, hostname).await?;
            let result = agent.process_tree(process_id).await;
            agent_answer(&agent, hostname, result).await
        }
        Source::Snapshot { id } => {
            let source = source.clone();
            with_snapshot(state, *id, move |conn| {
                query::process_tree(conn, process_id).map_err(|e| query_error(&source, e))
            })
            .await
        }
    }
}

/// The pinned client of `hostname`'s agent.
async fn agent(
    state: &ServerState,
    hostname: &str,
) -> Result<snapq_core::agent_client::AgentClient, EventsError> {
    let endpoint = state
        .catalog
        .endpoint(hostname)
        .await
        .map_err(|e| {
            EventsError::new(
                Failure::Internal,
                StatusCode::INTERNAL_SERVER_ERROR,
                e.to_string(),
            )
        })?
        .ok_or_else(|| {
            EventsError::new(
                Failure::Request,
                StatusCode::NOT_FOUND,
                format!("unknown endpoint {hostname:?}"),
            )
        })?;
    state
        .services
        .agents
        .client(&endpoint)
        .map_err(|e| EventsError::new(Failure::Unusable, StatusCode::CONFLICT, e.to_string()))
}

/// An agent's answer as the engine's: its own refusals pass through (same status and message as
/// asking the agent directly); silence names the endpoint.
async fn agent_answer<T>(
    agent: &snapq_core::agent_client::AgentClient,
    hostname: &str,
    result: Result<T, AgentError>,
) -> Result<T, EventsError> {
    match result {
        Ok(v) => Ok(v),
        Err(AgentError::Refused {
            status, message, ..
        }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            let failure = if status.is_client_error() {
                Failure::Request
            } else {
                Failure::Unusable
            };
            Err(EventsError::new(failure, status, message))
        }
        Err(e @ AgentError::CertificateChanged { .. }) => Err(EventsError::new(
            Failure::Unusable,
            StatusCode::BAD_GATEWAY,
            format!("endpoint {hostname}: {e}"),
        )),
        Err(AgentError::Unreachable { reason, .. }) => {
            // A query the agent is still working on is not a dead agent: ask it something cheap.
            if reason.contains("timed out") && agent.answers(Duration::from_secs(2)).await {
                return Err(EventsError::new(
                    Failure::TooSlow,
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "endpoint {hostname} did not finish the query within {} s; narrow it with a time window (--since/--until) or a more selective filter",
                        LIVE_QUERY_TIMEOUT.as_secs()
                    ),
                ));
            }
            Err(EventsError::new(
                Failure::Unreachable,
                StatusCode::BAD_GATEWAY,
                format!("endpoint {hostname} stopped answering: {reason}"),
            ))
        }
    }
}

/// Runs `f` on the cached handle of complete snapshot `id` in a blocking task, within the time
/// budget.
async fn with_snapshot<T: Send + 'static>(
    state: &ServerState,
    id: i64,
    f: impl FnOnce(&Connection) -> Result<T, EventsError> + Send + 'static,
) -> Result<T, EventsError> {
    with_snapshot_handle(state, id, move |handle, budget| handle.run(budget, f)).await
}

/// Runs `f` on the cached handle of complete snapshot `id` (and the time budget its queries
/// get) in a blocking task.
async fn with_snapshot_handle<T: Send + 'static>(
    state: &ServerState,
    id: i64,
    f: impl FnOnce(&mut SnapshotHandle, Duration) -> Result<T, EventsError> + Send + 'static,
) -> Result<T, EventsError> {
    let snap = state.catalog.snapshot(id).await.map_err(|e| {
        EventsError::new(
            Failure::Internal,
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )
    })?;
    let Some(snap) = snap else {
        state.snapshot_handles.forget(id);
        return Err(EventsError::new(
            Failure::Unusable,
            StatusCode::NOT_FOUND,
            format!("snapshot {id} no longer exists; `snapq snapshots list` shows them"),
        ));
    };
    let (Some(name), Some(sha256), "complete") = (&snap.name, &snap.sha256, snap.state.as_str())
    else {
        return Err(EventsError::new(
            Failure::Unusable,
            StatusCode::CONFLICT,
            format!(
                "snapshot {id} is {}, not complete; only complete snapshots can be queried",
                snap.state
            ),
        ));
    };
    let name: snapq_core::SnapshotName = name.parse().map_err(|e| {
        EventsError::new(
            Failure::Internal,
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{e}"),
        )
    })?;
    let path = state.services.store.path(&name);
    let handles = state.snapshot_handles.clone();
    let sha256 = sha256.clone();
    tokio::task::spawn_blocking(move || {
        let handle = handles.get(id, &sha256, &path)?;
        let mut handle = handle.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut handle, handles.budget).map_err(|e| {
            if e.failure == Failure::Internal && e.message.contains("interrupted") {
                EventsError::new(
                    Failure::TooSlow,
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "the query on snapshot {id} was stopped after its {} ms time budget; narrow it with a time window (--since/--until) or a more selective filter",
                        handles.budget.as_millis()
                    ),
                )
            } else {
                e
            }
        })
    })
    .await
    .map_err(|e| EventsError::new(Failure::Internal, StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

/// Opens a stored snapshot for queries: without following a symlink (`O_NOFOLLOW`, then SQLite
/// opens that very file through `/proc/self/fd`), read-only and immutable, `SQLITE_DBCONFIG_DEFENSIVE`
/// on, `trusted_schema` off, writes refused (`query_only`), and only if every recorder table is a
/// real table (a view would answer with whatever its author chose) and no trigger exists.
pub fn open_snapshot_readonly(path: &Path) -> Result<Connection, VerifyError> {
    let file = verify::open_regular_no_follow(path)?;
    let conn = verify::open_snapshot(Path::new(&format!("/proc/self/fd/{}", file.as_raw_fd())))?;
    let corrupt = |e: rusqlite::Error| VerifyError::Corrupt(e.to_string());
    conn.pragma_update(None, "trusted_schema", false)
        .map_err(corrupt)?;
    conn.pragma_update(None, "query_only", true)
        .map_err(corrupt)?;
    verify::check_plain_tables(&conn)?;
    snapq_core::schema::check(&conn)?;
    Ok(conn)
}

/// An open snapshot and the deadline its progress handler enforces.
pub struct SnapshotHandle {
    conn: Connection,
    /// Milliseconds since [`clock_base`] after which the running statement is interrupted; 0:
    /// no statement is running.
    deadline: Arc<AtomicU64>,
    /// The snapshot's summary, once counted (its content never changes).
    summary: Option<Summary>,
}

fn clock_base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn clock_ms() -> u64 {
    clock_base().elapsed().as_millis() as u64 + 1
}

impl SnapshotHandle {
    fn open(path: &Path) -> Result<SnapshotHandle, VerifyError> {
        let conn = open_snapshot_readonly(path)?;
        let deadline = Arc::new(AtomicU64::new(0));
        let watched = deadline.clone();
        conn.progress_handler(
            PROGRESS_STEPS,
            Some(move || {
                let d = watched.load(Ordering::Relaxed);
                d != 0 && clock_ms() > d
            }),
        )
        .map_err(|e| VerifyError::Corrupt(e.to_string()))?;
        Ok(SnapshotHandle {
            conn,
            deadline,
            summary: None,
        })
    }

    /// Runs `f` with the progress handler armed for `budget`.
    pub fn run<T>(
        &self,
        budget: Duration,
        f: impl FnOnce(&Connection) -> Result<T, EventsError>,
    ) -> Result<T, EventsError> {
        self.deadline
            .store(clock_ms() + budget.as_millis() as u64, Ordering::Relaxed);
        let result = f(&self.conn);
        self.deadline.store(0, Ordering::Relaxed);
        result
    }
}

struct CachedHandle {
    id: i64,
    sha256: String,
    handle: Arc<Mutex<SnapshotHandle>>,
    used: Instant,
}

/// Open snapshot handles, reused across pages, at most [`MAX_OPEN_SNAPSHOTS`].
#[derive(Clone)]
pub struct SnapshotHandles {
    inner: Arc<Mutex<Vec<CachedHandle>>>,
    /// The time budget of each query.
    pub budget: Duration,
}

impl SnapshotHandles {
    pub fn new(budget: Duration) -> SnapshotHandles {
        SnapshotHandles {
            inner: Arc::default(),
            budget,
        }
    }

    /// The open handle of snapshot `id` (with content `sha256`), opening it if needed. Blocking.
    pub fn get(
        &self,
        id: i64,
        sha256: &str,
        path: &Path,
    ) -> Result<Arc<Mutex<SnapshotHandle>>, EventsError> {
        {
            let mut cache = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = cache.iter_mut().find(|c| c.id == id && c.sha256 == sha256) {
                c.used = Instant::now();
                return Ok(c.handle.clone());
            }
        }
        let handle = SnapshotHandle::open(path).map_err(|e| {
            let (failure, status) = match e {
                VerifyError::Io(_) => (Failure::Internal, StatusCode::INTERNAL_SERVER_ERROR),
                _ => (Failure::Unusable, StatusCode::UNPROCESSABLE_ENTITY),
            };
            EventsError::new(
                failure,
                status,
                format!("snapshot {id} cannot be opened for analysis: {e}"),
            )
        })?;
        let handle = Arc::new(Mutex::new(handle));
        let mut cache = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|c| c.id != id);
        if cache.len() >= MAX_OPEN_SNAPSHOTS
            && let Some(oldest) = cache
                .iter()
                .enumerate()
                .min_by_key(|(_, c)| c.used)
                .map(|(i, _)| i)
        {
            cache.swap_remove(oldest);
        }
        cache.push(CachedHandle {
            id,
            sha256: sha256.to_owned(),
            handle: handle.clone(),
            used: Instant::now(),
        });
        Ok(handle)
    }

    /// Closes snapshot `id`'s handle (once no query uses it).
    pub fn forget(&self, id: i64) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|c| c.id != id);
    }

    /// How many handles are open.
    pub fn open_count(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapq_core::query::EventQuery;

    fn recorder_db(path: &Path, rows: i64) {
        let conn = Connection::open(path).unwrap();
        snapq_core::schema::create(&conn).unwrap();
        conn.execute_batch("BEGIN").unwrap();
        for i in 0..rows {
            conn.execute(
                "INSERT INTO process (ts, pid, path, cmdline) VALUES (?1, ?2, '/bin/sh', 'sh -c x')",
                rusqlite::params![1_000 + i, i],
            )
            .unwrap();
        }
        conn.execute_batch("COMMIT").unwrap();
    }

    fn page(handle: &SnapshotHandle, wheres: &[String]) -> Result<EventPage, EventsError> {
        let q = EventQuery::parse("process", wheres, false, None, None, None, None, None).unwrap();
        handle.run(Duration::from_secs(10), |c| {
            query::query_events(c, &q).map_err(|e| query_error(&Source::Snapshot { id: 1 }, e))
        })
    }

    #[test]
    fn a_snapshot_is_queried_read_only_and_a_view_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.db");
        recorder_db(&good, 150);
        let handle = SnapshotHandle::open(&good).unwrap();
        let p = page(&handle, &[]).unwrap();
        assert_eq!(p.events.len(), 100);
        assert!(p.next_cursor.is_some());
        let e = handle.conn.execute("DELETE FROM process", []).unwrap_err();
        assert!(e.to_string().contains("readonly"), "{e}");

        let view = dir.path().join("view.db");
        recorder_db(&view, 3);
        Connection::open(&view)
            .unwrap()
            .execute_batch(
                "ALTER TABLE process RENAME TO process_real;
                 CREATE VIEW process AS SELECT * FROM process_real;",
            )
            .unwrap();
        let e = open_snapshot_readonly(&view).err().unwrap();
        assert!(e.to_string().contains("`process` is a view"), "{e}");

        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        assert!(matches!(
            open_snapshot_readonly(&link),
            Err(VerifyError::NotRegular(_))
        ));
    }

    #[test]
    fn the_time_budget_interrupts_a_long_query_and_the_handle_stays_usable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.db");
        recorder_db(&path, 2_000);
        let handle = SnapshotHandle::open(&path).unwrap();
        // A cross join of the table with itself, three times: billions of steps.
        let err = handle
            .run(Duration::from_millis(50), |c| {
                c.query_row(
                    "SELECT count(*) FROM process a, process b, process c",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(|e| query_error(&Source::Snapshot { id: 1 }, e.into()))
            })
            .unwrap_err();
        assert!(err.message.contains("interrupted"), "{}", err.message);
        assert_eq!(page(&handle, &[]).unwrap().events.len(), 100);
    }

    #[test]
    fn the_cache_reuses_handles_and_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        recorder_db(&path, 1);
        let cache = SnapshotHandles::new(DEFAULT_QUERY_BUDGET);
        let a = cache.get(1, "x", &path).unwrap();
        let again = cache.get(1, "x", &path).unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        for id in 2..=(MAX_OPEN_SNAPSHOTS as i64 + 5) {
            cache.get(id, "x", &path).unwrap();
        }
        assert_eq!(cache.open_count(), MAX_OPEN_SNAPSHOTS);
    }

    #[test]
    fn an_agents_page_gets_its_cursor_tagged_without_being_reencoded() {
        let page = br#"{"events":[{"id":1,"cmdline":"x\",\"next_cursor\":\"ff\"}"}],"next_cursor":"0a1b"}"#;
        let tagged = tag_cursor(page, "tag").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&tagged).unwrap();
        assert_eq!(v["next_cursor"], "tag.0a1b");
        assert_eq!(v["events"][0]["cmdline"], "x\",\"next_cursor\":\"ff\"}");
        let last = br#"{"events":[],"next_cursor":null}"#;
        assert_eq!(tag_cursor(last, "tag").unwrap(), last.to_vec());
        assert!(tag_cursor(br#"{"next_cursor":"00","events":[]}"#, "t").is_none());
        assert!(tag_cursor(br#"{"events":[],"next_cursor":"zz"}"#, "t").is_none());
    }

    #[test]
    fn sources_serialise_as_tagged_targets() {
        let s = Source::Endpoint {
            hostname: "web-01".into(),
        };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, r#"{"kind":"endpoint","hostname":"web-01"}"#);
        assert_eq!(serde_json::from_str::<Source>(&json).unwrap(), s);
        assert_ne!(s.cursor_tag(), Source::Snapshot { id: 1 }.cursor_tag());
    }
}
