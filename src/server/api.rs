//! The server's HTTP API. Handlers never do snapshot work: they read the catalog and the queue,
//! create catalog rows and enqueue jobs, and audit every state-changing request.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::Method;
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, on};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use snapq_core::access::Role;
use snapq_core::agent_client::NotCallable;
use snapq_core::catalog::{Endpoint, Ingest, Origin, Snapshot, SnapshotSummary, now_ms};
use snapq_jobs::handlers::capture;
use snapq_jobs::handlers::delete::DeleteArgs;
use snapq_jobs::handlers::ingest::IngestArgs;
use snapq_jobs::{
    JobDetail, JobInfo, JobKind, JobState, KindStatus, ListFilter, QueueError, QueueStatus,
};

use super::ServerState;
use super::openapi::{Binary, ErrorBody};
use crate::http::ApiError;

pub use super::access::Caller;
use super::access::{Access, Operate, Scoped, View};

/// Who may call a route: anyone, an agent with the enroll token, or a user with a token (checked
/// by [`super::access`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    Public,
    Agent,
    User,
}

/// One route of the server API.
pub struct ApiRoute {
    pub method: Method,
    pub path: &'static str,
    pub auth: Auth,
    handler: MethodRouter<Arc<ServerState>>,
}

pub(super) fn route<H, T>(method: Method, path: &'static str, auth: Auth, handler: H) -> ApiRoute
where
    H: axum::handler::Handler<T, Arc<ServerState>>,
    T: 'static,
{
    let filter = MethodFilter::try_from(method.clone()).expect("a standard method");
    ApiRoute {
        method,
        path,
        auth,
        handler: on(filter, handler),
    }
}

/// Every route of the server API: the router is built from this list, and the access-table test
/// walks it, so a new route without a row in that table fails the test.
pub fn routes() -> Vec<ApiRoute> {
    use Auth::{Public, User};
    let mut routes = vec![
        route(Method::GET, "/status", Public, status),
        route(
            Method::GET,
            "/v1/openapi.json",
            Public,
            super::openapi::serve,
        ),
        route(Method::GET, "/metrics", User, super::metrics::scrape),
        route(Method::GET, "/v1/endpoints", User, list_endpoints),
        route(Method::GET, "/v1/endpoints/{host}", User, show_endpoint),
        route(Method::POST, "/v1/captures", User, capture),
        route(Method::GET, "/v1/snapshots", User, list_snapshots),
        route(Method::GET, "/v1/snapshots/summary", User, snapshot_summary),
        route(Method::GET, "/v1/snapshots/{id}", User, show_snapshot),
        route(
            Method::GET,
            "/v1/snapshots/{id}/file",
            User,
            download_snapshot,
        ),
        route(Method::POST, "/v1/snapshots/delete", User, delete_snapshots),
        route(Method::POST, "/v1/uploads", User, upload),
        route(Method::GET, "/v1/ingests/{job_id}", User, show_ingest),
        route(Method::GET, "/v1/queue/status", User, queue_status),
        route(Method::GET, "/v1/queue/jobs", User, queue_list),
        route(Method::GET, "/v1/queue/jobs/{id}", User, queue_show),
        route(Method::POST, "/v1/queue/jobs/{id}/retry", User, queue_retry),
        route(
            Method::POST,
            "/v1/queue/jobs/{id}/cancel",
            User,
            queue_cancel,
        ),
    ];
    routes.extend(super::connections::routes());
    routes.extend(super::agents::routes());
    routes.extend(super::quarantine::routes());
    routes.extend(super::admin::routes());
    routes.extend(super::export::routes());
    routes.extend(super::fleet::routes());
    routes.extend(super::console::routes());
    routes
}

/// The method and path template of every route, as the router serves them.
pub fn route_list() -> Vec<(Method, &'static str)> {
    routes().into_iter().map(|r| (r.method, r.path)).collect()
}

/// The OpenAPI description of this module's routes (assembled in [`super::openapi`]).
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    status,
    list_endpoints,
    show_endpoint,
    capture,
    list_snapshots,
    snapshot_summary,
    show_snapshot,
    download_snapshot,
    delete_snapshots,
    upload,
    show_ingest,
    queue_status,
    queue_list,
    queue_show,
    queue_retry,
    queue_cancel
))]
pub(super) struct Doc;

pub fn router(state: Arc<ServerState>) -> Router {
    let (mut public, mut agent, mut user) = (Router::new(), Router::new(), Router::new());
    for r in routes() {
        let handler = if r.path == "/v1/uploads" {
            r.handler.layer(axum::extract::DefaultBodyLimit::disable())
        } else {
            r.handler
        };
        match r.auth {
            Auth::Public => public = public.route(r.path, handler),
            Auth::Agent => agent = agent.route(r.path, handler),
            Auth::User => user = user.route(r.path, handler),
        }
    }
    let user = user.layer(middleware::from_fn_with_state(
        state.clone(),
        super::access::authenticate,
    ));
    // Agents authenticate by their own rules (enroll token or credential): `agents.rs`.
    public
        .merge(user)
        .merge(agent)
        // Outermost on every route, so refused requests are counted too (by route template).
        .route_layer(middleware::from_fn(super::metrics::track))
        .layer(middleware::from_fn(crate::http::json_errors))
        .layer(middleware::from_fn(super::console::security_headers))
        .with_state(state)
}

/// Liveness: the service name and version, which node answered (`HOST:PID`; several nodes may
/// serve one catalog) and where its catalog lives (`sqlite` or `postgres`); needs no token.
#[utoipa::path(
    get,
    path = "/status",
    responses((status = 200, description = "the server is up", body = Object)),
)]
async fn status(State(state): State<Arc<ServerState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "service": "snapq",
        "version": env!("CARGO_PKG_VERSION"),
        "healthy": true,
        "node": state.node,
        "catalog": state.catalog.backend(),
    }))
}

/// An endpoint as listings show it.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EndpointView {
    pub hostname: String,
    pub ips: Vec<String>,
    pub os: Option<String>,
    pub labels: Vec<String>,
    pub online: bool,
    pub last_seen_ms: Option<i64>,
    /// The sha256 of the agent certificate pinned at enrollment (`None`: no agent enrolled).
    #[serde(default)]
    pub cert_sha256: Option<String>,
    /// The version its agent reported in its last heartbeat.
    #[serde(default)]
    pub agent_version: Option<String>,
}

fn view(state: &ServerState, e: &Endpoint) -> EndpointView {
    let window = state.config.online_window.as_millis() as i64;
    EndpointView {
        hostname: e.hostname.clone(),
        ips: e.ips.clone(),
        os: e.os.clone(),
        labels: e.labels.clone(),
        online: e
            .last_seen_ms
            .is_some_and(|seen| now_ms() - seen < window && e.api_url.is_some()),
        last_seen_ms: e.last_seen_ms,
        cert_sha256: e.cert_sha256.clone(),
        agent_version: e.agent_version.clone(),
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct SearchParams {
    #[serde(default)]
    search: String,
    /// At most this many (the console's type-ahead asks for a screenful).
    limit: Option<usize>,
}

/// Endpoints the caller sees, optionally filtered by a search text (hostname or IP, as typed).
#[utoipa::path(
    get,
    path = "/v1/endpoints",
    params(SearchParams),
    responses((status = 200, description = "matching endpoints", body = [EndpointView])),
)]
async fn list_endpoints(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Query(params): Query<SearchParams>,
) -> Result<Json<Vec<EndpointView>>, ApiError> {
    let sees = access.endpoint_filter()?;
    let text = params.search.trim();
    let Some(limit) = params.limit else {
        let all = state
            .catalog
            .search_endpoints(text)
            .await
            .map_err(ApiError::internal)?;
        return Ok(Json(
            all.iter()
                .filter(|e| sees(&e.facts()))
                .map(|e| view(&state, e))
                .collect(),
        ));
    };
    // The first `limit` the caller may see, their facts read in growing chunks and only those
    // shown read whole: a type-ahead over many endpoints reads a screenful, not every match.
    let mut out = Vec::new();
    let (mut offset, mut chunk) = (0i64, 64i64);
    'chunks: while out.len() < limit {
        let rows = state
            .catalog
            .search_endpoint_facts_page(text, offset, chunk)
            .await
            .map_err(ApiError::internal)?;
        for (hostname, ips, labels) in &rows {
            let facts = snapq_core::access::Facts {
                hostname,
                ips,
                labels,
            };
            if !sees(&facts) {
                continue;
            }
            // Gone or changed since the scan: shown only if still there and still visible.
            if let Some(e) = state
                .catalog
                .endpoint(hostname)
                .await
                .map_err(ApiError::internal)?
                && sees(&e.facts())
            {
                out.push(view(&state, &e));
            }
            if out.len() == limit {
                break 'chunks;
            }
        }
        if (rows.len() as i64) < chunk {
            break;
        }
        offset += chunk;
        chunk *= 4;
    }
    Ok(Json(out))
}

/// `GET /v1/endpoints/{host}`: the endpoint, its live facts if its agent answers, and the disk
/// numbers a capture confirmation shows.
#[utoipa::path(
    get,
    path = "/v1/endpoints/{host}",
    params(("host" = String, Path, description = "the endpoint's hostname", example = "demo-01")),
    responses(
        (
            status = 200,
            description = "`endpoint` (as listings show it), `live` (the agent's facts, `null` without an agent, or `{\"error\": ...}`), `server_free_bytes`, `capture_reserve_bytes`, `reserved_by_captures`",
            body = Object,
        ),
    ),
)]
async fn show_endpoint(
    State(state): State<Arc<ServerState>>,
    Scoped {
        target: endpoint, ..
    }: Scoped<Endpoint, View>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let live = match state.services.agents.client(&endpoint) {
        Ok(agent) => match agent.endpoint_info().await {
            Ok(info) => serde_json::to_value(info).map_err(ApiError::internal)?,
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        },
        Err(NotCallable::NoAgent(_)) => serde_json::Value::Null,
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    let free =
        snapq_core::disk::free_bytes(state.services.store.root()).map_err(ApiError::internal)?;
    Ok(Json(serde_json::json!({
        "endpoint": view(&state, &endpoint),
        "live": live,
        "server_free_bytes": free,
        "capture_reserve_bytes": state.config.capture_reserve_bytes,
        "reserved_by_captures": state.services.reservations.held(),
    })))
}

#[derive(Deserialize, utoipa::ToSchema)]
struct CaptureRequest {
    #[schema(min_items = 1, example = json!(["demo-01"]))]
    hosts: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CaptureQueued {
    pub hostname: String,
    pub snapshot_id: i64,
    pub job_id: String,
}

/// `POST /v1/captures {"hosts": [...]}`: one snapshot row and one capture job per host. Unknown
/// hosts (and hosts outside the caller's groups) fail the whole request before anything is queued.
#[utoipa::path(
    post,
    path = "/v1/captures",
    request_body = CaptureRequest,
    responses((status = 202, description = "one queued capture per host", body = [CaptureQueued])),
)]
async fn capture(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Json(request): Json<CaptureRequest>,
) -> Result<Response, ApiError> {
    if request.hosts.is_empty() {
        access.require(Role::Operator)?;
        return Err(ApiError::bad_request(
            "name at least one endpoint to capture",
        ));
    }
    let endpoints = access.endpoints(&request.hosts, Role::Operator).await?;
    let mut queued = Vec::new();
    for endpoint in endpoints {
        queued.push(enqueue_capture(&state, &endpoint, access.name()).await?);
    }
    Ok((StatusCode::ACCEPTED, Json(queued)).into_response())
}

/// Queues a capture of `endpoint` for `caller` (an authorized request): its snapshot row, its
/// job, the job's endpoint (for scoping) and the audit entry.
pub(super) async fn enqueue_capture(
    state: &ServerState,
    endpoint: &Endpoint,
    caller: &str,
) -> Result<CaptureQueued, ApiError> {
    let snapshot_id = state
        .catalog
        .create_snapshot(endpoint.id, Origin::Capture, caller)
        .await
        .map_err(ApiError::internal)?;
    let job_id = capture::enqueue(
        &state.queue,
        &state.catalog,
        snapshot_id,
        &endpoint.hostname,
        caller,
        capture::job_key(snapshot_id),
    )
    .await
    .map_err(ApiError::internal)?;
    state
        .audit(
            caller,
            "capture",
            &endpoint.hostname,
            "queued",
            Some(job_id.as_str()),
        )
        .await;
    Ok(CaptureQueued {
        hostname: endpoint.hostname.clone(),
        snapshot_id,
        job_id: job_id.as_str().to_owned(),
    })
}

// --- paged listings ------------------------------------------------------------------------
//
// `GET /v1/snapshots` and `GET /v1/snapshots/summary` page the same way: `limit` rows at most
// (1 to `MAX_PAGE`; a larger one is served as `MAX_PAGE`; 0 is refused; without it, every row),
// and when more rows follow, the answer carries `Link: <URL>; rel="next"` (RFC 8288), the URL of
// the next page. Clients follow it until an answer has none.

/// The most rows one page holds; a larger `limit` is served as this many.
pub const MAX_PAGE: u32 = 1000;

/// `limit` as asked: `None` for every row, else 1 to [`MAX_PAGE`].
fn page_limit(limit: Option<u32>) -> Result<Option<usize>, ApiError> {
    match limit {
        None => Ok(None),
        Some(0) => Err(ApiError::bad_request(format!(
            "limit must be 1 to {MAX_PAGE} (a larger one is served as {MAX_PAGE}), or left out for every row"
        ))),
        Some(n) => Ok(Some(n.min(MAX_PAGE) as usize)),
    }
}

/// A listing page as JSON, with the `Link` to the next page when there is one.
fn paged<T: Serialize>(
    body: T,
    path: &str,
    next: Option<Vec<(&str, String)>>,
) -> Result<Response, ApiError> {
    let mut response = Json(body).into_response();
    if let Some(pairs) = next {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &pairs {
            query.append_pair(k, v);
        }
        let link = format!("<{path}?{}>; rel=\"next\"", query.finish());
        response.headers_mut().insert(
            axum::http::header::LINK,
            axum::http::HeaderValue::from_str(&link).map_err(ApiError::internal)?,
        );
    }
    Ok(response)
}

/// The pairs of a next page's query: the caller's, with the cursor.
fn next_pairs<'a>(
    endpoint: &Option<String>,
    limit: usize,
    cursor: (&'a str, String),
) -> Vec<(&'a str, String)> {
    let mut pairs = Vec::new();
    if let Some(host) = endpoint {
        pairs.push(("endpoint", host.clone()));
    }
    pairs.push(("limit", limit.to_string()));
    pairs.push(cursor);
    pairs
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct SnapshotParams {
    /// Only this endpoint's snapshots (404 outside the caller's computer groups).
    endpoint: Option<String>,
    /// At most this many snapshots, newest first (1 to 1000; a larger limit is served as 1000).
    /// Without it, every snapshot. When more follow, the answer has a `Link` header
    /// (`rel="next"`) with the next page's URL.
    #[param(minimum = 1, example = 50)]
    limit: Option<u32>,
    /// Only snapshots whose id is below this one: the cursor of the next page (the oldest id of
    /// the page before; the `Link` header carries it).
    before: Option<i64>,
}

/// Snapshots grouped by endpoint, each group with its number of captures.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SnapshotGroup {
    pub hostname: String,
    /// The endpoint's complete snapshots (all of them, not only this page's).
    pub captures: usize,
    /// Each with its keep mark, as `GET /v1/snapshots/{id}` shows it.
    #[schema(value_type = Vec<SnapshotView>)]
    pub snapshots: Vec<serde_json::Value>,
}

/// Snapshots grouped by endpoint (by hostname), each group newest first. With `limit`, one page
/// of the snapshots newest first (by id), grouped the same way; the `Link` header leads on.
#[utoipa::path(
    get,
    path = "/v1/snapshots",
    params(SnapshotParams),
    responses(
        (
            status = 200,
            description = "snapshots grouped by endpoint",
            body = [SnapshotGroup],
            headers(("Link" = String, description = "`<URL>; rel=\"next\"`: the next page, when more rows follow this one")),
        ),
    ),
)]
async fn list_snapshots(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Query(params): Query<SnapshotParams>,
) -> Result<Response, ApiError> {
    if let Some(host) = &params.endpoint {
        // One endpoint's: outside the caller's groups it does not exist.
        access.endpoint(host, Role::Viewer).await?;
    }
    let sees = access.endpoint_filter()?;
    let limit = page_limit(params.limit)?;
    // The rows the caller sees, newest first, read in growing chunks until one more than the
    // page: a page of an operator's snapshots reads about a page, not the catalog.
    let mut rows = Vec::new();
    let (mut before, mut chunk) = (params.before, 64i64);
    loop {
        let want = limit.map(|l| chunk.max(l as i64 + 1));
        let read = state
            .catalog
            .snapshots_page(params.endpoint.as_deref(), before, want)
            .await
            .map_err(ApiError::internal)?;
        let fetched = read.len() as i64;
        before = read.last().map(|r| r.snapshot.id).or(before);
        rows.extend(read.into_iter().filter(|r| sees(&r.facts())));
        match (limit, want) {
            (Some(l), Some(w)) if rows.len() <= l && fetched == w => chunk = (w * 4).min(4096),
            _ => break,
        }
    }
    let more = limit.is_some_and(|l| rows.len() > l);
    if let Some(l) = limit {
        rows.truncate(l);
    }
    let next = more.then(|| {
        let oldest = rows.last().expect("a full page").snapshot.id;
        next_pairs(
            &params.endpoint,
            limit.expect("paged"),
            ("before", oldest.to_string()),
        )
    });
    let mut ids: Vec<i64> = rows.iter().map(|r| r.snapshot.endpoint_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let summaries = state
        .catalog
        .snapshot_summaries(&ids)
        .await
        .map_err(ApiError::internal)?;
    let snapshots: Vec<Snapshot> = rows.into_iter().map(|r| r.snapshot).collect();
    let mut groups = std::collections::BTreeMap::<String, SnapshotGroup>::new();
    for view in with_keep_marks(&state, snapshots).await? {
        let snap = &view.snapshot;
        let captures = summaries
            .get(&snap.endpoint_id)
            .map_or(0, |s| s.captures as usize);
        let group = groups
            .entry(snap.hostname.clone())
            .or_insert_with(|| SnapshotGroup {
                hostname: snap.hostname.clone(),
                captures,
                snapshots: Vec::new(),
            });
        group
            .snapshots
            .push(serde_json::to_value(&view).map_err(ApiError::internal)?);
    }
    let groups: Vec<SnapshotGroup> = groups.into_values().collect();
    paged(groups, "/v1/snapshots", next)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct SummaryParams {
    /// Only this endpoint (404 outside the caller's computer groups).
    endpoint: Option<String>,
    /// At most this many endpoints, by hostname (1 to 1000; a larger limit is served as 1000).
    /// Without it, every endpoint with snapshots. When more follow, the answer has a `Link`
    /// header (`rel="next"`) with the next page's URL.
    #[param(minimum = 1, example = 100)]
    limit: Option<u32>,
    /// Only endpoints whose hostname sorts after this one: the cursor of the next page (the last
    /// hostname of the page before; the `Link` header carries it).
    after: Option<String>,
}

/// Per endpoint with snapshots, what they come to (counts by state, the newest), by hostname:
/// what Saved Evidence > Snapshots shows before an endpoint is expanded.
#[utoipa::path(
    get,
    path = "/v1/snapshots/summary",
    params(SummaryParams),
    responses(
        (
            status = 200,
            description = "one row per endpoint with snapshots the caller sees",
            body = [SnapshotSummary],
            headers(("Link" = String, description = "`<URL>; rel=\"next\"`: the next page, when more rows follow this one")),
        ),
    ),
)]
async fn snapshot_summary(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Query(params): Query<SummaryParams>,
) -> Result<Response, ApiError> {
    if let Some(host) = &params.endpoint {
        access.endpoint(host, Role::Viewer).await?;
    }
    let sees = access.endpoint_filter()?;
    let limit = page_limit(params.limit)?;
    let want = limit.map_or(usize::MAX, |l| l + 1);
    // Endpoints in hostname order, their facts read in growing chunks until one more than the
    // page is visible.
    let mut shown = Vec::new();
    let (mut after, mut chunk) = (params.after.clone(), 256i64);
    loop {
        let read = state
            .catalog
            .snapshot_endpoints_page(after.as_deref(), params.endpoint.as_deref(), chunk)
            .await
            .map_err(ApiError::internal)?;
        let fetched = read.len() as i64;
        after = read.last().map(|r| r.1.clone()).or(after);
        for (id, hostname, ips, labels) in read {
            let facts = snapq_core::access::Facts {
                hostname: &hostname,
                ips: &ips,
                labels: &labels,
            };
            if sees(&facts) && shown.len() < want {
                shown.push((id, hostname));
            }
        }
        if shown.len() >= want || fetched < chunk {
            break;
        }
        chunk = (chunk * 4).min(4096);
    }
    let more = limit.is_some_and(|l| shown.len() > l);
    if let Some(l) = limit {
        shown.truncate(l);
    }
    let ids: Vec<i64> = shown.iter().map(|(id, _)| *id).collect();
    let mut summaries = state
        .catalog
        .snapshot_summaries(&ids)
        .await
        .map_err(ApiError::internal)?;
    // An endpoint whose last snapshot went between the two reads is left out.
    let rows: Vec<SnapshotSummary> = ids.iter().filter_map(|id| summaries.remove(id)).collect();
    let next = more.then(|| {
        let last = shown.last().expect("a full page").1.clone();
        next_pairs(&params.endpoint, limit.expect("paged"), ("after", last))
    });
    paged(rows, "/v1/snapshots/summary", next)
}

/// A snapshot as `GET /v1/snapshots/{id}` shows it: with its keep mark (a kept snapshot is never
/// pruned by a schedule's keep rule).
#[derive(Serialize, utoipa::ToSchema)]
struct SnapshotView {
    #[serde(flatten)]
    #[schema(inline)]
    snapshot: Snapshot,
    kept: bool,
    kept_by: Option<String>,
    kept_ms: Option<i64>,
}

impl SnapshotView {
    fn new(snapshot: Snapshot, mark: Option<(String, i64)>) -> SnapshotView {
        SnapshotView {
            snapshot,
            kept: mark.is_some(),
            kept_by: mark.as_ref().map(|(by, _)| by.clone()),
            kept_ms: mark.map(|(_, ms)| ms),
        }
    }
}

/// Snapshots with their keep marks, read in one statement (a listing shows the mark on each row).
async fn with_keep_marks(
    state: &ServerState,
    snapshots: Vec<Snapshot>,
) -> Result<Vec<SnapshotView>, ApiError> {
    let ids: Vec<i64> = snapshots.iter().map(|s| s.id).collect();
    let mut marks = state
        .catalog
        .keep_marks(&ids)
        .await
        .map_err(ApiError::internal)?;
    Ok(snapshots
        .into_iter()
        .map(|s| {
            let mark = marks.remove(&s.id);
            SnapshotView::new(s, mark)
        })
        .collect())
}

/// One snapshot's catalog row, with its keep mark.
#[utoipa::path(
    get,
    path = "/v1/snapshots/{id}",
    params(("id" = i64, Path, description = "snapshot id", example = 1)),
    responses((status = 200, description = "the snapshot", body = SnapshotView)),
)]
async fn show_snapshot(
    State(state): State<Arc<ServerState>>,
    Scoped { target: snap, .. }: Scoped<Snapshot, View>,
) -> Result<Json<SnapshotView>, ApiError> {
    let mark = state
        .catalog
        .keep_mark(snap.id)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(SnapshotView::new(snap, mark)))
}

/// `GET /v1/snapshots/{id}/file`: a complete snapshot's file, with `Range` for resuming.
#[utoipa::path(
    get,
    path = "/v1/snapshots/{id}/file",
    params(
        ("id" = i64, Path, description = "snapshot id", example = 1),
        (
            "Range" = Option<String>,
            Header,
            description = "`bytes=A-B`, `A-` or `-N`: one byte range, for resuming",
        ),
    ),
    responses(
        (
            status = 200,
            description = "the whole file",
            content_type = "application/vnd.sqlite3",
            body = Binary,
        ),
        (
            status = 206,
            description = "the range asked for",
            content_type = "application/vnd.sqlite3",
            body = Binary,
        ),
        (status = 409, description = "the snapshot is not complete", body = ErrorBody),
        (status = 416, description = "the range is outside the file", body = ErrorBody),
    ),
)]
async fn download_snapshot(
    State(state): State<Arc<ServerState>>,
    Scoped { target: snap, .. }: Scoped<Snapshot, View>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let (Some(name), Some(sha256), "complete") = (&snap.name, &snap.sha256, snap.state.as_str())
    else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "snapshot {} is {}, not complete; only complete snapshots can be downloaded",
                snap.id, snap.state
            ),
        ));
    };
    let name: snapq_core::SnapshotName = name.parse().map_err(ApiError::internal)?;
    let path = state.services.store.path(&name);
    let mut response = crate::http::serve_file(&path, sha256, &headers, None).await?;
    if let Ok(v) = axum::http::HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        response
            .headers_mut()
            .insert(axum::http::header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

impl ServerState {
    /// Appends to the audit log; a failure to do so is logged, never hidden.
    pub(crate) async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        result: &str,
        detail: Option<&str>,
    ) {
        if let Err(e) = self
            .catalog
            .audit(actor, action, target, result, detail)
            .await
        {
            tracing::warn!(%actor, %action, %target, error = %e, "could not write the audit log");
        }
    }
}

fn queue_error(err: QueueError) -> ApiError {
    match err {
        QueueError::NotFound(_) => {
            ApiError::not_found(format!("{err}; `snapq queue list` shows the jobs"))
        }
        QueueError::InvalidState { .. } => ApiError::new(StatusCode::CONFLICT, err.to_string()),
        other => ApiError::internal(other),
    }
}

/// Most jobs a caller who sees only some endpoints has counted or listed (the newest).
const SCOPED_JOB_WINDOW: u32 = 10_000;

/// The queue's counts for the kinds this server runs (and any that somehow hold jobs): no
/// `noop`, no kinds without workers yet. `queue status` and `/metrics` both show this.
pub(super) async fn served_queue_status(state: &ServerState) -> Result<QueueStatus, ApiError> {
    let mut status = state.queue.status().await.map_err(queue_error)?;
    let workers = status.local_workers.clone();
    status.kinds.retain(|k| {
        workers.iter().any(|w| w.kind.as_str() == k.kind)
            || k.pending + k.running + k.retrying + k.done + k.failed + k.cancelled > 0
    });
    Ok(status)
}

/// What `GET /v1/queue/status` answers (built with `json!` below; this is its schema).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // only its schema is used
struct QueueOverview {
    /// Counts per job kind (of the jobs the caller sees) and this server's workers.
    status: snapq_jobs::QueueStatus,
    /// Running jobs (at most 100).
    running: Vec<JobInfo>,
    /// Running and paused fleet batches with their progress.
    batches: Vec<super::fleet::BatchView>,
    /// Every server process whose workers share this queue (several with `--database`), with
    /// its heartbeat.
    nodes: Vec<NodeView>,
    /// The drop folder's state: admins only, else `null`.
    #[schema(value_type = Option<Object>)]
    watch: serde_json::Value,
}

/// A server process whose workers share the queue, as its workers' rows in the queue say.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct NodeView {
    /// `HOST:PID`, as `GET /status` names it.
    node: String,
    /// Whether this is the node that answered.
    this_node: bool,
    /// The job kinds it runs workers for.
    kinds: Vec<String>,
    /// Running jobs its workers hold (of those listed under `running`).
    running: usize,
    started_ms: i64,
    /// Its newest heartbeat (epoch ms; the database's clock on PostgreSQL).
    last_seen_ms: i64,
    /// How long ago that was. A node that died keeps its row with a growing age (its running
    /// jobs go back to the queue once it is `silent`).
    heartbeat_age_ms: i64,
    /// No heartbeat within the orphan time-out (`--job-orphan-secs` of the node answering): it
    /// stopped without saying so, and other nodes take back its running jobs.
    silent: bool,
}

/// The nodes behind `workers`, this node first, then by name; `running` counts the jobs of
/// `running` locked by each node's workers.
fn nodes_of(
    workers: Vec<snapq_jobs::WorkerInfo>,
    running: &[JobInfo],
    this: &str,
    orphan_after: std::time::Duration,
) -> Vec<NodeView> {
    let mut nodes: Vec<NodeView> = Vec::new();
    for w in workers {
        let node = format!("{}:{}", w.hostname, w.pid);
        let held = running
            .iter()
            .filter(|j| j.locked_by.as_deref() == Some(w.id.as_str()))
            .count();
        match nodes.iter_mut().find(|n| n.node == node) {
            Some(n) => {
                n.kinds.push(w.kind);
                n.running += held;
                n.started_ms = n.started_ms.min(w.started_ms);
                if w.last_seen_ms > n.last_seen_ms {
                    n.last_seen_ms = w.last_seen_ms;
                    n.heartbeat_age_ms = w.heartbeat_age_ms;
                }
            }
            None => nodes.push(NodeView {
                this_node: node == this,
                node,
                kinds: vec![w.kind],
                running: held,
                started_ms: w.started_ms,
                last_seen_ms: w.last_seen_ms,
                heartbeat_age_ms: w.heartbeat_age_ms,
                silent: false,
            }),
        }
    }
    for n in &mut nodes {
        n.kinds.sort();
        n.silent = n.heartbeat_age_ms > orphan_after.as_millis() as i64;
    }
    nodes.sort_by(|a, b| {
        b.this_node
            .cmp(&a.this_node)
            .then_with(|| a.node.cmp(&b.node))
    });
    nodes
}

/// The queue at a glance: counts per job kind, running jobs, fleet batches, the nodes, the drop
/// folder.
#[utoipa::path(
    get,
    path = "/v1/queue/status",
    responses((status = 200, description = "the queue at a glance", body = QueueOverview)),
)]
async fn queue_status(
    access: Access,
    State(state): State<Arc<ServerState>>,
) -> Result<Response, ApiError> {
    let visible = access.visible().await?;
    let mut status = served_queue_status(&state).await?;
    if !visible.everything() {
        // Counts of the jobs this caller may see, from the newest jobs of the queue.
        let jobs = state
            .queue
            .list(&ListFilter {
                state: None,
                kind: None,
                limit: Some(SCOPED_JOB_WINDOW),
            })
            .await
            .map_err(queue_error)?;
        let jobs = access.visible_jobs(jobs).await?;
        let now = chrono::Utc::now();
        for kind in &mut status.kinds {
            let mut counts = KindStatus {
                kind: kind.kind.clone(),
                ..KindStatus::default()
            };
            for job in jobs.iter().filter(|j| j.kind == kind.kind) {
                match job.state {
                    JobState::Pending => counts.pending += 1,
                    JobState::Running => counts.running += 1,
                    JobState::Retrying => counts.retrying += 1,
                    JobState::Done => counts.done += 1,
                    JobState::Failed => counts.failed += 1,
                    JobState::Cancelled => counts.cancelled += 1,
                }
                if job.state == JobState::Pending
                    && let Some(created) = job.created_at
                {
                    let age = (now - created).num_milliseconds().max(0) as u64;
                    counts.oldest_pending_age_ms = counts.oldest_pending_age_ms.max(Some(age));
                }
                if job.state == JobState::Done
                    && job
                        .finished_at
                        .is_some_and(|t| (now - t).num_seconds() < 60)
                {
                    counts.done_last_60s += 1;
                }
            }
            *kind = counts;
        }
    }
    let running = state
        .queue
        .list(&ListFilter {
            state: Some(JobState::Running),
            kind: None,
            limit: Some(if visible.everything() {
                100
            } else {
                SCOPED_JOB_WINDOW
            }),
        })
        .await
        .map_err(queue_error)?;
    let mut running = access.visible_jobs(running).await?;
    running.truncate(100);
    let workers = state.queue.workers().await.map_err(queue_error)?;
    let nodes = nodes_of(
        workers,
        &running,
        &state.node,
        state.config.job_orphan_after,
    );
    // The drop folder's waiting files name endpoints: admins only.
    let watch = if visible.everything() {
        super::quarantine::watch_status(&state).await
    } else {
        serde_json::Value::Null
    };
    // Running and paused fleet batches with their progress.
    let batches = super::fleet::visible_batches(&access, &state, true, 100).await?;
    Ok(Json(serde_json::json!({
        "status": status,
        "running": running,
        "batches": batches,
        "nodes": nodes,
        "watch": watch,
    }))
    .into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ListParams {
    state: Option<String>,
    kind: Option<String>,
    limit: Option<u32>,
    /// Only this fleet batch's jobs (its fleet job and its captures).
    batch: Option<String>,
}

/// Jobs the caller sees, newest first.
#[utoipa::path(
    get,
    path = "/v1/queue/jobs",
    params(ListParams),
    responses((status = 200, description = "jobs", body = [JobInfo])),
)]
async fn queue_list(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Query(params): Query<ListParams>,
) -> Result<Response, ApiError> {
    let visible = access.visible().await?;
    let job_state = match params.state.as_deref() {
        None => None,
        Some(s) => Some(
            JobState::ALL
                .into_iter()
                .find(|st| st.as_str() == s)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "unknown job state {s:?}; use one of {}",
                        JobState::ALL.map(|s| s.as_str()).join(", ")
                    ))
                })?,
        ),
    };
    let kind = match params.kind.as_deref() {
        None => None,
        Some(k) => Some(k.parse::<JobKind>().map_err(ApiError::bad_request)?),
    };
    let limit = params.limit.unwrap_or(100).clamp(1, SCOPED_JOB_WINDOW);
    if let Some(batch) = &params.batch {
        let batch = access.batch(batch, Role::Viewer).await?;
        let ids = state
            .catalog
            .batch_job_ids(batch.id)
            .await
            .map_err(ApiError::internal)?;
        let mut jobs = Vec::new();
        for id in ids {
            match state
                .queue
                .show(&snapq_jobs::JobId::from(id.as_str()))
                .await
            {
                Ok(detail) => jobs.push(detail.job),
                Err(QueueError::NotFound(_)) => {} // pruned
                Err(e) => return Err(queue_error(e)),
            }
        }
        jobs.retain(|j| {
            job_state.is_none_or(|s| j.state == s) && kind.is_none_or(|k| j.kind == k.as_str())
        });
        jobs.truncate(limit as usize);
        return Ok(Json(jobs).into_response());
    }
    let jobs = state
        .queue
        .list(&ListFilter {
            state: job_state,
            kind,
            limit: Some(if visible.everything() {
                limit
            } else {
                SCOPED_JOB_WINDOW
            }),
        })
        .await
        .map_err(queue_error)?;
    let mut jobs = access.visible_jobs(jobs).await?;
    jobs.truncate(limit as usize);
    Ok(Json(jobs).into_response())
}

/// One job with its attempts.
#[utoipa::path(
    get,
    path = "/v1/queue/jobs/{id}",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, description = "the job and its attempts", body = JobDetail)),
)]
async fn queue_show(Scoped { target: detail, .. }: Scoped<JobDetail, View>) -> Json<JobDetail> {
    Json(detail)
}

/// Runs a failed or cancelled job again.
#[utoipa::path(
    post,
    path = "/v1/queue/jobs/{id}/retry",
    params(("id" = String, Path, description = "job id")),
    responses(
        (status = 200, description = "`{\"retried\": id}`", body = Object),
        (status = 409, description = "the job is not failed or cancelled", body = ErrorBody),
    ),
)]
async fn queue_retry(
    State(state): State<Arc<ServerState>>,
    Scoped { access, target, .. }: Scoped<JobDetail, Operate>,
) -> Result<Response, ApiError> {
    let id = target.job.id.as_str().to_owned();
    let result = state.queue.retry(&target.job.id).await;
    state
        .audit(
            access.name(),
            "queue.retry",
            &id,
            if result.is_ok() { "ok" } else { "refused" },
            None,
        )
        .await;
    result.map_err(queue_error)?;
    Ok(Json(serde_json::json!({ "retried": id })).into_response())
}

/// Cancels a pending, retrying or running job.
#[utoipa::path(
    post,
    path = "/v1/queue/jobs/{id}/cancel",
    params(("id" = String, Path, description = "job id")),
    responses(
        (status = 200, description = "`{\"cancelled\": id, \"outcome\": ...}`", body = Object),
        (status = 409, description = "the job has already ended", body = ErrorBody),
    ),
)]
async fn queue_cancel(
    State(state): State<Arc<ServerState>>,
    Scoped { access, target, .. }: Scoped<JobDetail, Operate>,
) -> Result<Response, ApiError> {
    let id = target.job.id.as_str().to_owned();
    let result = state.queue.cancel(&target.job.id, access.name()).await;
    state
        .audit(
            access.name(),
            "queue.cancel",
            &id,
            if result.is_ok() { "ok" } else { "refused" },
            None,
        )
        .await;
    let outcome = result.map_err(queue_error)?;
    Ok(
        Json(serde_json::json!({ "cancelled": id, "outcome": format!("{outcome:?}") }))
            .into_response(),
    )
}

#[derive(Deserialize, utoipa::ToSchema)]
struct DeleteRequest {
    #[serde(default)]
    ids: Vec<i64>,
    endpoint: Option<String>,
}

/// `POST /v1/snapshots/delete {"ids": [...]}` or `{"endpoint": "HOST"}`: one delete job per
/// snapshot. Unknown ids (and ids outside the caller's groups) fail the whole request before
/// anything is queued.
#[utoipa::path(
    post,
    path = "/v1/snapshots/delete",
    request_body = DeleteRequest,
    responses(
        (
            status = 202,
            description = "one queued delete job per snapshot: `[{\"snapshot_id\", \"job_id\"}]`",
            body = [Object],
        ),
    ),
)]
async fn delete_snapshots(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Json(request): Json<DeleteRequest>,
) -> Result<Response, ApiError> {
    let targets: Vec<(i64, String)> = match (&request.endpoint, request.ids.is_empty()) {
        (Some(host), true) => {
            let endpoint = access.endpoint(host, Role::Operator).await?;
            state
                .catalog
                .snapshots(Some(&endpoint.hostname))
                .await
                .map_err(ApiError::internal)?
                .into_iter()
                .map(|s| (s.id, s.hostname))
                .collect()
        }
        (None, false) => access
            .snapshots(&request.ids, Role::Operator)
            .await?
            .into_iter()
            .map(|s| (s.id, s.hostname))
            .collect(),
        _ => {
            access.require(Role::Operator)?;
            return Err(ApiError::bad_request(
                "name snapshot ids, or an endpoint to delete all of its snapshots (not both)",
            ));
        }
    };
    let args: Vec<DeleteArgs> = targets
        .iter()
        .map(|&(snapshot_id, _)| DeleteArgs { snapshot_id })
        .collect();
    let jobs = state
        .queue
        .enqueue_many(JobKind::Delete, &args, access.name())
        .await
        .map_err(ApiError::internal)?;
    for ((_, host), job) in targets.iter().zip(&jobs) {
        state
            .catalog
            .set_job_target(job.as_str(), host)
            .await
            .map_err(ApiError::internal)?;
    }
    let ids: Vec<i64> = targets.iter().map(|(id, _)| *id).collect();
    let target = request
        .endpoint
        .clone()
        .unwrap_or_else(|| format!("snapshots {ids:?}"));
    state
        .audit(
            access.name(),
            "snapshot.delete.request",
            &target,
            "queued",
            None,
        )
        .await;
    let queued: Vec<serde_json::Value> = ids
        .iter()
        .zip(&jobs)
        .map(|(id, job)| serde_json::json!({ "snapshot_id": id, "job_id": job.as_str() }))
        .collect();
    Ok((StatusCode::ACCEPTED, Json(queued)).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct UploadParams {
    /// The snapshot's file name: `HOSTNAME_YYYY_MM_DDTHH.MM.SS.mmmZ.db` (UTC).
    #[param(
        pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]*_[0-9]{4}_[0-9]{2}_[0-9]{2}T[0-9]{2}\\.[0-9]{2}\\.[0-9]{2}\\.[0-9]{3}Z\\.db$",
        example = "demo-01_2026_11_28T14.03.07.091Z.db"
    )]
    name: String,
}

/// `POST /v1/uploads?name=FILE` with the file as the body: spooled to `incoming/` under a temporary
/// name while the size limit is enforced, then handed to an ingest job. The endpoint the name
/// carries must be in the caller's groups (it need not exist yet).
#[utoipa::path(
    post,
    path = "/v1/uploads",
    params(UploadParams),
    request_body(content = Binary, content_type = "application/octet-stream", description = "the snapshot file"),
    responses(
        (
            status = 202,
            description = "`{\"job_id\", \"name\", \"bytes\"}`: the ingest job",
            body = Object,
        ),
        (status = 413, description = "larger than the upload limit", body = ErrorBody),
        (status = 507, description = "not enough free disk", body = ErrorBody),
    ),
)]
async fn upload(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Query(params): Query<UploadParams>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;

    // Hostile or malformed names are refused before a byte is written.
    let name: snapq_core::SnapshotName = match params.name.parse() {
        Ok(name) => name,
        Err(e) => {
            access.require(Role::Operator)?;
            return Err(ApiError::bad_request(format!(
                "{:?} is not a snapshot name: {e}",
                params.name
            )));
        }
    };
    access.host(name.hostname(), Role::Operator).await?;
    let caller = access.name();
    let incoming = state.config.spool_dir();
    let spool_id = hex::encode(rand::random::<[u8; 16]>());
    let partial = incoming.join(format!("{spool_id}.partial"));
    // The spool name keeps the upload's name, so a file spooled just before a crash can still
    // be ingested at the next start (see `server::recover_spool`).
    let spooled = incoming.join(super::spool_name(&spool_id, &name));
    let limit = state.config.upload_max_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{name} is larger than the upload limit of {}; raise --upload-max-mib on the server",
                snapq_core::disk::human_bytes(limit)
            ),
        )
    };
    // A declared length over the limit is refused before a byte is read.
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut stream = body.into_data_stream();
    if declared.is_some_and(|n| n > limit) {
        drain_briefly(stream);
        return Err(too_large());
    }
    // The spool counts against the same disk reservations as captures: the declared length up
    // front, or step by step as an undeclared body grows.
    let reserve = |need: u64| -> Result<snapq_jobs::handlers::Reservation, ApiError> {
        let free = snapq_core::disk::free_bytes(&incoming).map_err(ApiError::internal)?;
        state
            .services
            .reservations
            .reserve(
                name.hostname(),
                need,
                free,
                state.config.capture_reserve_bytes,
            )
            .map_err(|e| ApiError::new(StatusCode::INSUFFICIENT_STORAGE, e.to_string()))
    };
    const STEP: u64 = 64 << 20;
    let mut held = match reserve(declared.unwrap_or(STEP.min(limit))) {
        Ok(first) => vec![first],
        Err(e) => {
            drain_briefly(stream);
            return Err(e);
        }
    };
    let mut covered = declared.unwrap_or(STEP.min(limit));
    let result: Result<u64, ApiError> = async {
        let file = tokio::fs::File::create(&partial)
            .await
            .map_err(ApiError::internal)?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut received = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::bad_request(format!("upload interrupted: {e}")))?;
            received += chunk.len() as u64;
            if received > limit || declared.is_some_and(|n| received > n) {
                return Err(too_large());
            }
            if received > covered {
                let step = STEP.max(received - covered);
                held.push(reserve(step)?);
                covered += step;
            }
            out.write_all(&chunk).await.map_err(ApiError::internal)?;
        }
        out.flush().await.map_err(ApiError::internal)?;
        out.into_inner()
            .sync_all()
            .await
            .map_err(ApiError::internal)?;
        Ok(received)
    }
    .await;
    drop(held);
    let received = match result {
        Ok(n) => n,
        Err(e) => {
            drain_briefly(stream);
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e);
        }
    };
    if let Err(e) = tokio::fs::rename(&partial, &spooled).await {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(ApiError::internal(e));
    }
    let args = IngestArgs::new(spooled, name.to_string(), Origin::Upload);
    let job = match super::enqueue_spooled(&state.queue, &args, &spool_id, caller).await {
        Ok(job) => job,
        Err(e) => {
            // Nothing will ever ingest it: do not leave it in the spool.
            let _ = tokio::fs::remove_file(&args.path).await;
            return Err(ApiError::internal(e));
        }
    };
    state
        .catalog
        .set_job_target(job.as_str(), name.hostname())
        .await
        .map_err(ApiError::internal)?;
    state
        .catalog
        .create_ingest(job.as_str(), Origin::Upload, &args.original_name, caller)
        .await
        .map_err(ApiError::internal)?;
    state
        .audit(
            caller,
            "upload",
            &args.original_name,
            "queued",
            Some(job.as_str()),
        )
        .await;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "job_id": job.as_str(), "name": args.original_name, "bytes": received })),
    )
        .into_response())
}

/// Reads and discards what is left of a refused upload for a moment, so that a client still
/// sending reads the answer (413, 507) instead of a broken pipe; then the connection closes.
fn drain_briefly(mut stream: axum::body::BodyDataStream) {
    use futures::StreamExt;
    tokio::spawn(async move {
        let drain = async { while let Some(Ok(_)) = stream.next().await {} };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), drain).await;
    });
}

/// An upload's or a dropped file's ingest: its state and outcome.
#[utoipa::path(
    get,
    path = "/v1/ingests/{job_id}",
    params(("job_id" = String, Path, description = "the ingest job's id")),
    responses((status = 200, description = "the ingest", body = Ingest)),
)]
async fn show_ingest(Scoped { target: ingest, .. }: Scoped<Ingest, View>) -> Json<Ingest> {
    Json(ingest)
}
