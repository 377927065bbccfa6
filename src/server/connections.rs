//! Live connections: an analyst's open line to an endpoint's agent or to a stored snapshot, the
//! routes under `/v1/connections`, and the background care of their state.
//!
//! A connection is a catalog row keyed by its target ([`Source`]): connecting to a target that
//! already has a row takes that row again (reconnect reuses the stored target). Connecting asks
//! the target for its facts (the agent's `/v1/endpoint`, or the snapshot's summary through the
//! event engine) and ends `active` or `failed_to_connect` with the reason. Every query through an
//! active connection counts as activity; a query whose agent stopped answering turns it
//! `unexpected_interruption`; [`maintain`] times out idle ones (`--connection-idle-minutes`) and,
//! when the server starts, re-checks the ones that were active. Queries on a connection that is
//! not active answer 409 saying how to reconnect. Closing marks the row `closed`, which takes it
//! off the list (a query on it still answers 409 rather than 404).
//!
//! Scoping: every route resolves its connection through `access.rs` (it belongs to its
//! endpoint's groups). Connecting to a live endpoint, querying one and capturing need the
//! operator role; opening and querying a stored snapshot is a viewer's right, as reading
//! snapshots is.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, RawQuery, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use snapq_core::access::Role;
use snapq_core::catalog::{ConnectionAttempt, ConnectionRow, Endpoint, Snapshot, now_ms};

use super::ServerState;
use super::access::{Access, Operate, Scoped, View};
use super::api::{ApiRoute, Auth, route};
use super::events::{self, EventsError, Source};
use super::openapi::ErrorBody;
use crate::agent::api::EventParams;
use crate::http::ApiError;

/// What a connection is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Active,
    FailedToConnect,
    UnexpectedInterruption,
    TimedOut,
    Closed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::FailedToConnect => "failed_to_connect",
            Status::UnexpectedInterruption => "unexpected_interruption",
            Status::TimedOut => "timed_out",
            Status::Closed => "closed",
        }
    }
}

/// A connection as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConnectionView {
    pub id: i64,
    pub endpoint: String,
    pub target: Source,
    /// The agent's API address, or the snapshot's file name.
    pub address: Option<String>,
    pub status: String,
    pub reason: Option<String>,
    /// When the current status began (epoch ms).
    pub since_ms: i64,
    pub last_activity_ms: i64,
    pub created_ms: i64,
    pub created_by: String,
    /// The recorder database's size (with its WAL), or the snapshot file's.
    pub db_bytes: Option<i64>,
    pub events: Option<i64>,
    pub oldest_ts: Option<i64>,
    pub newest_ts: Option<i64>,
    /// When an active connection times out unless used (epoch ms).
    pub idle_until_ms: Option<i64>,
}

fn view(state: &ServerState, row: &ConnectionRow) -> Result<ConnectionView, ApiError> {
    let target = source_of(row)?;
    Ok(ConnectionView {
        id: row.id,
        endpoint: row.hostname.clone(),
        target,
        address: row.address.clone(),
        status: row.status.clone(),
        reason: row.reason.clone(),
        since_ms: row.since_ms,
        last_activity_ms: row.last_activity_ms,
        created_ms: row.created_ms,
        created_by: row.created_by.clone(),
        db_bytes: row.db_bytes,
        events: row.events,
        oldest_ts: row.oldest_ts,
        newest_ts: row.newest_ts,
        idle_until_ms: (row.status == Status::Active.as_str())
            .then(|| row.last_activity_ms + idle_ms(state)),
    })
}

fn source_of(row: &ConnectionRow) -> Result<Source, ApiError> {
    serde_json::from_str(&row.target)
        .map_err(|e| ApiError::internal(format!("connection {}: stored target: {e}", row.id)))
}

fn idle_ms(state: &ServerState) -> i64 {
    state.config.connection_idle.as_millis() as i64
}

/// The OpenAPI description of this module's routes (assembled in [`super::openapi`]).
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    list,
    connect,
    show,
    close,
    reconnect,
    events,
    summary,
    tree,
    capture,
    open_snapshot
))]
pub(super) struct Doc;

pub fn routes() -> Vec<ApiRoute> {
    use Auth::User;
    vec![
        route(Method::GET, "/v1/connections", User, list),
        route(Method::POST, "/v1/connections", User, connect),
        route(Method::GET, "/v1/connections/{id}", User, show),
        route(Method::DELETE, "/v1/connections/{id}", User, close),
        route(
            Method::POST,
            "/v1/connections/{id}/reconnect",
            User,
            reconnect,
        ),
        route(Method::GET, "/v1/connections/{id}/events", User, events),
        route(Method::GET, "/v1/connections/{id}/summary", User, summary),
        route(Method::GET, "/v1/connections/{id}/tree", User, tree),
        route(Method::POST, "/v1/connections/{id}/capture", User, capture),
        route(
            Method::POST,
            "/v1/snapshots/{id}/connect",
            User,
            open_snapshot,
        ),
    ]
}

/// Asks the target for its facts: the outcome of a connection attempt.
async fn attempt(state: &ServerState, source: &Source, endpoint: &Endpoint) -> ConnectionAttempt {
    let failed = |reason: String| ConnectionAttempt {
        status: Status::FailedToConnect.as_str().into(),
        reason: Some(reason),
        ..ConnectionAttempt::default()
    };
    match source {
        Source::Endpoint { hostname } => {
            let agent = match state.services.agents.client(endpoint) {
                Ok(a) => a,
                Err(e) => return failed(e.to_string()),
            };
            let info = tokio::time::timeout(CONNECT_TIMEOUT, agent.endpoint_info()).await;
            match info {
                Ok(Ok(info)) => ConnectionAttempt {
                    address: Some(agent.base_url().to_owned()),
                    status: Status::Active.as_str().into(),
                    reason: None,
                    db_bytes: Some(info.db_bytes as i64),
                    events: Some(info.events.values().sum::<u64>() as i64),
                    oldest_ts: info.oldest_ts,
                    newest_ts: info.newest_ts,
                },
                Ok(Err(e)) => ConnectionAttempt {
                    address: Some(agent.base_url().to_owned()),
                    ..failed(format!("endpoint {hostname}: {e}"))
                },
                Err(_) => ConnectionAttempt {
                    address: Some(agent.base_url().to_owned()),
                    ..failed(format!(
                        "endpoint {hostname}: the agent did not answer within {} s",
                        CONNECT_TIMEOUT.as_secs()
                    ))
                },
            }
        }
        Source::Snapshot { id } => {
            let snap = state.catalog.snapshot(*id).await.ok().flatten();
            let address = snap.as_ref().and_then(|s| s.name.clone());
            match events::summary(state, source).await {
                Ok(summary) => ConnectionAttempt {
                    address,
                    status: Status::Active.as_str().into(),
                    reason: None,
                    db_bytes: snap.and_then(|s| s.size),
                    events: Some(summary.total as i64),
                    oldest_ts: summary.oldest_ts,
                    newest_ts: summary.newest_ts,
                },
                Err(e) => ConnectionAttempt {
                    address,
                    ..failed(e.message)
                },
            }
        }
    }
}

/// Activity is recorded at most this often per connection.
const ACTIVITY_RESOLUTION_MS: i64 = 1_000;

/// How long connecting waits for an agent's facts.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects (or reconnects) `source` of `endpoint` and audits it; returns the connection.
async fn open(
    state: &ServerState,
    source: &Source,
    endpoint: &Endpoint,
    caller: &str,
) -> Result<ConnectionView, ApiError> {
    let outcome = attempt(state, source, endpoint).await;
    let target = serde_json::to_string(source).map_err(ApiError::internal)?;
    let id = state
        .catalog
        .upsert_connection(endpoint.id, &target, caller, &outcome)
        .await
        .map_err(ApiError::internal)?;
    state
        .audit(
            caller,
            "connection.open",
            &source.describe(),
            &outcome.status,
            outcome.reason.as_deref(),
        )
        .await;
    let row = state
        .catalog
        .connection(id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::internal("a connection vanished as it was made"))?;
    view(state, &row)
}

#[derive(Deserialize, utoipa::ToSchema)]
struct ConnectRequest {
    /// Hostnames or IP addresses.
    #[schema(min_items = 1, example = json!(["demo-01"]))]
    targets: Vec<String>,
}

/// `POST /v1/connections {"targets": ["web-01", "10.0.0.5"]}`: one connection per endpoint,
/// each `active` or `failed_to_connect` with its reason. Unknown targets (and endpoints outside
/// the caller's groups) fail the whole request before anything connects.
#[utoipa::path(
    post,
    path = "/v1/connections",
    request_body = ConnectRequest,
    responses(
        (
            status = 201,
            description = "one connection per endpoint, `active` or `failed_to_connect` with its reason",
            body = [ConnectionView],
        ),
    ),
)]
async fn connect(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Json(request): Json<ConnectRequest>,
) -> Result<Response, ApiError> {
    if request.targets.is_empty() {
        access.require(Role::Operator)?;
        return Err(ApiError::bad_request(
            "name at least one endpoint (hostname or IP address) to connect to",
        ));
    }
    let mut hosts = Vec::new();
    for target in &request.targets {
        hosts.push(resolve_host(&state, target.trim()).await?);
    }
    hosts.dedup();
    let endpoints = access.endpoints(&hosts, Role::Operator).await?;
    let mut out = Vec::new();
    for endpoint in endpoints {
        let source = Source::Endpoint {
            hostname: endpoint.hostname.clone(),
        };
        out.push(open(&state, &source, &endpoint, access.name()).await?);
    }
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// The hostname a connect target names: a known hostname, else the one endpoint with that IP
/// address, else the text itself (which the access check then reports as unknown).
async fn resolve_host(state: &ServerState, target: &str) -> Result<String, ApiError> {
    if target.parse::<std::net::IpAddr>().is_ok()
        && state
            .catalog
            .endpoint(target)
            .await
            .map_err(ApiError::internal)?
            .is_none()
    {
        let found = state
            .catalog
            .search_endpoints(target)
            .await
            .map_err(ApiError::internal)?;
        if let Some(e) = found.iter().find(|e| e.ips.iter().any(|ip| ip == target)) {
            return Ok(e.hostname.clone());
        }
    }
    Ok(target.to_owned())
}

/// `POST /v1/snapshots/{id}/connect`: opens a stored snapshot for analysis (Upload & Connect).
#[utoipa::path(
    post,
    path = "/v1/snapshots/{id}/connect",
    params(("id" = i64, Path, description = "snapshot id", example = 1)),
    responses(
        (status = 201, description = "the connection to the snapshot", body = ConnectionView),
        (status = 409, description = "the snapshot is not complete", body = ErrorBody),
    ),
)]
async fn open_snapshot(
    State(state): State<Arc<ServerState>>,
    Scoped {
        access,
        target: snap,
        ..
    }: Scoped<Snapshot, View>,
) -> Result<Response, ApiError> {
    if snap.state != "complete" {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "snapshot {} is {}, not complete; open it once it is (`snapq snapshots show {}`)",
                snap.id, snap.state, snap.id
            ),
        ));
    }
    let endpoint = state
        .catalog
        .endpoint(&snap.hostname)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::internal("a snapshot without its endpoint"))?;
    let source = Source::Snapshot { id: snap.id };
    let view = open(&state, &source, &endpoint, access.name()).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// The caller's visible connections (an idle active one shows as timed out).
#[utoipa::path(
    get,
    path = "/v1/connections",
    responses((status = 200, description = "connections", body = [ConnectionView])),
)]
async fn list(
    access: Access,
    State(state): State<Arc<ServerState>>,
) -> Result<Json<Vec<ConnectionView>>, ApiError> {
    let sees = access.endpoint_filter()?;
    let rows = state
        .catalog
        .connections(None)
        .await
        .map_err(ApiError::internal)?;
    let mut out = Vec::new();
    for row in rows.iter().filter(|r| sees(&r.facts())) {
        out.push(view(&state, &expire_if_idle(&state, row.clone()).await?)?);
    }
    Ok(Json(out))
}

/// An active row unused for longer than the idle timeout is timed out now (the sweeper would
/// get there within its interval; a reader must not see it active meanwhile).
async fn expire_if_idle(
    state: &ServerState,
    row: ConnectionRow,
) -> Result<ConnectionRow, ApiError> {
    if row.status == Status::Active.as_str() && now_ms() - row.last_activity_ms > idle_ms(state) {
        state
            .catalog
            .set_connection_status(row.id, Status::TimedOut.as_str(), Some(&idle_reason(state)))
            .await
            .map_err(ApiError::internal)?;
        return state
            .catalog
            .connection(row.id)
            .await
            .map_err(ApiError::internal)?
            .ok_or_else(|| ApiError::internal("a connection vanished"));
    }
    Ok(row)
}

fn idle_reason(state: &ServerState) -> String {
    format!("no use for {}", humanize(state.config.connection_idle))
}

fn humanize(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 60 && secs.is_multiple_of(60) {
        format!("{} minutes", secs / 60)
    } else if secs >= 1 {
        format!("{secs} s")
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// One connection.
#[utoipa::path(
    get,
    path = "/v1/connections/{id}",
    params(("id" = i64, Path, description = "connection id", example = 1)),
    responses((status = 200, description = "the connection", body = ConnectionView)),
)]
async fn show(
    State(state): State<Arc<ServerState>>,
    Scoped { target: row, .. }: Scoped<ConnectionRow, View>,
) -> Result<Json<ConnectionView>, ApiError> {
    let row = expire_if_idle(&state, row).await?;
    Ok(Json(view(&state, &row)?))
}

/// `DELETE /v1/connections/{id}`: closes it; it leaves the list.
#[utoipa::path(
    delete,
    path = "/v1/connections/{id}",
    params(("id" = i64, Path, description = "connection id", example = 1)),
    responses((status = 200, description = "the closed connection", body = ConnectionView)),
)]
async fn close(
    State(state): State<Arc<ServerState>>,
    Scoped {
        access,
        target: row,
        ..
    }: Scoped<ConnectionRow, View>,
) -> Result<Json<ConnectionView>, ApiError> {
    let source = source_of(&row)?;
    if matches!(source, Source::Endpoint { .. }) {
        access.require(Role::Operator)?;
    }
    let reason = format!("closed by {}", access.name());
    state
        .catalog
        .set_connection_status(row.id, Status::Closed.as_str(), Some(&reason))
        .await
        .map_err(ApiError::internal)?;
    if let Source::Snapshot { id } = source {
        state.snapshot_handles.forget(id);
    }
    state
        .audit(
            access.name(),
            "connection.close",
            &source.describe(),
            "ok",
            None,
        )
        .await;
    let row = state
        .catalog
        .connection(row.id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::internal("a connection vanished"))?;
    Ok(Json(view(&state, &row)?))
}

/// `POST /v1/connections/{id}/reconnect`: tries the stored target again.
#[utoipa::path(
    post,
    path = "/v1/connections/{id}/reconnect",
    params(("id" = i64, Path, description = "connection id", example = 1)),
    responses(
        (
            status = 200,
            description = "the connection, `active` or `failed_to_connect`",
            body = ConnectionView,
        ),
    ),
)]
async fn reconnect(
    State(state): State<Arc<ServerState>>,
    Scoped {
        access,
        target: row,
        ..
    }: Scoped<ConnectionRow, View>,
) -> Result<Json<ConnectionView>, ApiError> {
    let source = source_of(&row)?;
    if matches!(source, Source::Endpoint { .. }) {
        access.require(Role::Operator)?;
    }
    let endpoint = state
        .catalog
        .endpoint_by_id(row.endpoint_id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::internal("a connection without its endpoint"))?;
    Ok(Json(open(&state, &source, &endpoint, access.name()).await?))
}

/// The connection's target if it may be queried now: the role for a live endpoint, then an
/// active status (409 saying how to reconnect otherwise). Counts as activity.
pub(super) async fn usable(
    state: &ServerState,
    access: &Access,
    row: ConnectionRow,
) -> Result<(ConnectionRow, Source), ApiError> {
    let source = source_of(&row)?;
    if matches!(source, Source::Endpoint { .. }) {
        access.require(Role::Operator)?;
    }
    let row = expire_if_idle(state, row).await?;
    // Activity is kept to the second: a page every few milliseconds need not write the catalog
    // each time.
    let fresh = now_ms() - row.last_activity_ms < ACTIVITY_RESOLUTION_MS;
    let active = row.status == Status::Active.as_str()
        && (fresh
            || state
                .catalog
                .touch_connection(row.id)
                .await
                .map_err(ApiError::internal)?);
    if !active {
        let current = state
            .catalog
            .connection(row.id)
            .await
            .map_err(ApiError::internal)?
            .unwrap_or(row);
        return Err(not_active(&current));
    }
    Ok((row, source))
}

fn not_active(row: &ConnectionRow) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        format!(
            "connection {id} to {host} is {status}{reason}; reconnect with `snapq live reconnect {id}`",
            id = row.id,
            host = row.hostname,
            status = row.status,
            reason = row
                .reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
        ),
    )
}

/// An engine error as the answer; an agent that stopped answering interrupts the connection.
pub(super) async fn engine_error(
    state: &ServerState,
    row: &ConnectionRow,
    e: EventsError,
) -> ApiError {
    if e.is_interruption() {
        let reason = e.message.clone();
        if let Err(err) = state
            .catalog
            .set_connection_status(
                row.id,
                Status::UnexpectedInterruption.as_str(),
                Some(&reason),
            )
            .await
        {
            tracing::warn!(error = %err, "could not record an interrupted connection");
        }
    }
    e.into()
}

/// How a query through a connection fails beyond a bad request.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only its responses are used: `usable` and `engine_error` answer them
enum QueryErrors {
    #[response(status = 409, description = "the connection is not active (reconnect)")]
    NotActive(ErrorBody),
    #[response(status = 502, description = "the endpoint's agent did not answer")]
    AgentSilent(ErrorBody),
    #[response(status = 504, description = "the query ran out of its time budget")]
    OverBudget(ErrorBody),
}

/// `GET /v1/connections/{id}/events?type=…&where=…&any=…&since=…&until=…&sort=…&limit=…&cursor=…`
#[utoipa::path(
    get,
    path = "/v1/connections/{id}/events",
    params(
        ("id" = i64, Path, description = "connection id", example = 1),
        (
            "type" = Option<String>,
            Query,
            pattern = "^(process|file|network|dns|image|auth|registry)$",
            description = "event type",
        ),
        (
            "where" = Option<Vec<String>>,
            Query,
            description = "a condition `FIELD OP VALUE` (repeatable; ANDed unless `any`)",
        ),
        ("any" = Option<bool>, Query, description = "OR the conditions instead"),
        ("since" = Option<String>, Query, description = "RFC 3339 or epoch ms"),
        ("until" = Option<String>, Query, description = "RFC 3339 or epoch ms"),
        ("sort" = Option<String>, Query, description = "a field, `-field` for descending"),
        ("limit" = Option<u32>, Query, description = "rows per page"),
        ("cursor" = Option<String>, Query, description = "the `next_cursor` of the previous page"),
    ),
    responses(
        (
            status = 200,
            description = "one page of events and the cursor of the next",
            body = Object,
        ),
        QueryErrors,
    ),
)]
async fn events(
    State(state): State<Arc<ServerState>>,
    Scoped {
        access,
        target: row,
        ..
    }: Scoped<ConnectionRow, View>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let params = EventParams::parse(raw.as_deref().unwrap_or(""))?;
    let (row, source) = usable(&state, &access, row).await?;
    match events::events_json(&state, &source, &params).await {
        Ok(body) => Ok((
            [(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response()),
        Err(e) => Err(engine_error(&state, &row, e).await),
    }
}

/// `GET /v1/connections/{id}/summary`: counts per type and the time range.
#[utoipa::path(
    get,
    path = "/v1/connections/{id}/summary",
    params(("id" = i64, Path, description = "connection id", example = 1)),
    responses(
        (status = 200, description = "counts per event type and the time range", body = Object),
        QueryErrors,
    ),
)]
async fn summary(
    State(state): State<Arc<ServerState>>,
    Scoped {
        access,
        target: row,
        ..
    }: Scoped<ConnectionRow, View>,
) -> Result<Response, ApiError> {
    let (row, source) = usable(&state, &access, row).await?;
    match events::summary(&state, &source).await {
        Ok(s) => Ok(Json(s).into_response()),
        Err(e) => Err(engine_error(&state, &row, e).await),
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct TreeParams {
    /// A process event's `id`.
    #[param(value_type = i64)]
    process: String,
}

/// `GET /v1/connections/{id}/tree?process=ID`: the process's parent chain and children.
#[utoipa::path(
    get,
    path = "/v1/connections/{id}/tree",
    params(("id" = i64, Path, description = "connection id", example = 1), TreeParams),
    responses(
        (status = 200, description = "the process's parent chain and children", body = Object),
        QueryErrors,
    ),
)]
async fn tree(
    State(state): State<Arc<ServerState>>,
    Scoped {
        access,
        target: row,
        ..
    }: Scoped<ConnectionRow, View>,
    Query(params): Query<TreeParams>,
) -> Result<Response, ApiError> {
    let (row, source) = usable(&state, &access, row).await?;
    let process: i64 = params.process.trim().parse().map_err(|_| {
        ApiError::bad_request(format!(
            "process id must be an integer (a process event's `id`), got {:?}",
            params.process
        ))
    })?;
    match events::process_tree(&state, &source, process).await {
        Ok(t) => Ok(Json(t).into_response()),
        Err(e) => Err(engine_error(&state, &row, e).await),
    }
}

/// `POST /v1/connections/{id}/capture`: queues a capture of the connected endpoint through the
/// capture job.
#[utoipa::path(
    post,
    path = "/v1/connections/{id}/capture",
    params(("id" = i64, Path, description = "connection id", example = 1)),
    responses(
        (status = 202, description = "the queued capture", body = super::api::CaptureQueued),
        (
            status = 409,
            description = "the connection is not active, or is to a snapshot",
            body = ErrorBody,
        ),
    ),
)]
async fn capture(
    State(state): State<Arc<ServerState>>,
    Scoped {
        access,
        target: row,
        ..
    }: Scoped<ConnectionRow, Operate>,
) -> Result<Response, ApiError> {
    let (row, source) = usable(&state, &access, row).await?;
    if let Source::Snapshot { id } = source {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "connection {} is to snapshot {id}, which is already captured; capture from a live connection (`snapq live connect {}`)",
                row.id, row.hostname
            ),
        ));
    }
    let endpoint = state
        .catalog
        .endpoint_by_id(row.endpoint_id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::internal("a connection without its endpoint"))?;
    let queued = super::api::enqueue_capture(&state, &endpoint, access.name()).await?;
    Ok((StatusCode::ACCEPTED, Json(queued)).into_response())
}

/// The background care of connections: first re-checks those that were active when the server
/// stopped (an agent that is gone makes them `unexpected_interruption`), then times out idle
/// ones for as long as the server runs.
pub async fn maintain(state: Arc<ServerState>) {
    recheck_after_restart(&state).await;
    let interval = (state.config.connection_idle / 4)
        .clamp(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        tokio::time::sleep(interval).await;
        match state
            .catalog
            .time_out_connections(idle_ms(&state), &idle_reason(&state))
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::debug!(timed_out = n, "idle connections timed out"),
            Err(e) => tracing::warn!(error = %e, "cannot time out idle connections"),
        }
    }
}

async fn recheck_after_restart(state: &ServerState) {
    let rows = match state
        .catalog
        .connections(Some(Status::Active.as_str()))
        .await
    {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(error = %e, "cannot re-check connections");
            return;
        }
    };
    for row in rows {
        let (Ok(source), Ok(Some(endpoint))) = (
            source_of(&row),
            state.catalog.endpoint_by_id(row.endpoint_id).await,
        ) else {
            continue;
        };
        let outcome = attempt(state, &source, &endpoint).await;
        if outcome.status != Status::Active.as_str() {
            let reason = format!(
                "gone when the server restarted: {}",
                outcome.reason.unwrap_or_default()
            );
            tracing::info!(connection = row.id, %reason, "a connection did not survive the restart");
            if let Err(e) = state
                .catalog
                .set_connection_status(
                    row.id,
                    Status::UnexpectedInterruption.as_str(),
                    Some(&reason),
                )
                .await
            {
                tracing::warn!(error = %e, "cannot record a connection's state");
            }
        }
    }
}
