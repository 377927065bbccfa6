//! The server's HTTP API. Handlers never do snapshot work: they read the catalog and the queue,
//! create catalog rows and enqueue jobs, and audit every state-changing request.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use snapq_core::agent_client::NotCallable;
use snapq_core::catalog::{Endpoint, Origin, Snapshot, now_ms};
use snapq_jobs::handlers::capture::CaptureArgs;
use snapq_jobs::handlers::delete::DeleteArgs;
use snapq_jobs::handlers::ingest::IngestArgs;
use snapq_jobs::{JobId, JobKind, JobState, ListFilter, QueueError};

use super::{ServerState, sha256_hex};
use crate::http::{ApiError, unauthorized};

/// Who is asking: the user a bearer token belongs to.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub role: String,
}

pub fn router(state: Arc<ServerState>) -> Router {
    let user_routes = Router::new()
        .route("/v1/endpoints", get(list_endpoints))
        .route("/v1/endpoints/{host}", get(show_endpoint))
        .route("/v1/captures", post(capture))
        .route("/v1/snapshots", get(list_snapshots))
        .route("/v1/snapshots/{id}", get(show_snapshot))
        .route("/v1/snapshots/delete", post(delete_snapshots))
        .route(
            "/v1/uploads",
            post(upload).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/v1/ingests/{job_id}", get(show_ingest))
        .route("/v1/queue/status", get(queue_status))
        .route("/v1/queue/jobs", get(queue_list))
        .route("/v1/queue/jobs/{id}", get(queue_show))
        .route("/v1/queue/jobs/{id}/retry", post(queue_retry))
        .route("/v1/queue/jobs/{id}/cancel", post(queue_cancel))
        .merge(super::quarantine::routes())
        .merge(super::agents::admin_routes())
        .layer(middleware::from_fn_with_state(state.clone(), require_user));
    Router::new()
        .route("/status", get(status))
        .merge(user_routes)
        .merge(super::agents::heartbeat_routes())
        .layer(middleware::from_fn(crate::http::json_errors))
        .with_state(state)
}

async fn require_user(
    State(state): State<Arc<ServerState>>,
    mut request: axum::extract::Request,
    next: Next,
) -> Response {
    let token = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let Some(token) = token else {
        return unauthorized().into_response();
    };
    match state.catalog.user_for_token(&sha256_hex(&token)).await {
        Ok(Some((name, role))) => {
            request.extensions_mut().insert(Caller { name, role });
            next.run(request).await
        }
        Ok(None) => unauthorized().into_response(),
        Err(e) => ApiError::internal(e).into_response(),
    }
}

async fn status() -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "service": "snapq",
        "version": env!("CARGO_PKG_VERSION"),
        "healthy": true,
    }))
}

/// An endpoint as listings show it.
#[derive(Debug, Serialize, Deserialize)]
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
    }
}

#[derive(Deserialize)]
struct SearchParams {
    #[serde(default)]
    search: String,
}

async fn list_endpoints(
    State(state): State<Arc<ServerState>>,
    Query(params): Query<SearchParams>,
) -> Result<Json<Vec<EndpointView>>, ApiError> {
    let all = state
        .catalog
        .search_endpoints(params.search.trim())
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(all.iter().map(|e| view(&state, e)).collect()))
}

async fn endpoint_or_404(state: &ServerState, host: &str) -> Result<Endpoint, ApiError> {
    state
        .catalog
        .endpoint(host)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "unknown endpoint {host:?}; `snapq endpoints search TEXT` lists the ones you can reach"
            ))
        })
}

/// `GET /v1/endpoints/{host}`: the endpoint, its live facts if its agent answers, and the disk
/// numbers a capture confirmation shows.
async fn show_endpoint(
    State(state): State<Arc<ServerState>>,
    Path(host): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let endpoint = endpoint_or_404(&state, &host).await?;
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

#[derive(Deserialize)]
struct CaptureRequest {
    hosts: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CaptureQueued {
    pub hostname: String,
    pub snapshot_id: i64,
    pub job_id: String,
}

/// `POST /v1/captures {"hosts": [...]}`: one snapshot row and one capture job per host. Unknown
/// hosts fail the whole request before anything is queued.
async fn capture(
    State(state): State<Arc<ServerState>>,
    Extension(caller): Extension<Caller>,
    Json(request): Json<CaptureRequest>,
) -> Result<Response, ApiError> {
    if request.hosts.is_empty() {
        return Err(ApiError::bad_request(
            "name at least one endpoint to capture",
        ));
    }
    let mut endpoints = Vec::new();
    let mut unknown = Vec::new();
    for host in &request.hosts {
        match state
            .catalog
            .endpoint(host)
            .await
            .map_err(ApiError::internal)?
        {
            Some(e) => endpoints.push(e),
            None => unknown.push(host.as_str()),
        }
    }
    if !unknown.is_empty() {
        return Err(ApiError::not_found(format!(
            "unknown endpoint(s): {}; `snapq endpoints search TEXT` lists the ones you can reach",
            unknown.join(", ")
        )));
    }
    let mut queued = Vec::new();
    for endpoint in endpoints {
        let snapshot_id = state
            .catalog
            .create_snapshot(endpoint.id, Origin::Capture, &caller.name)
            .await
            .map_err(ApiError::internal)?;
        let job_id = state
            .queue
            .push(&CaptureArgs { snapshot_id }, &caller.name)
            .await
            .map_err(ApiError::internal)?;
        state
            .catalog
            .set_snapshot_job(snapshot_id, job_id.as_str())
            .await
            .map_err(ApiError::internal)?;
        state
            .audit(
                &caller.name,
                "capture",
                &endpoint.hostname,
                "queued",
                Some(job_id.as_str()),
            )
            .await;
        queued.push(CaptureQueued {
            hostname: endpoint.hostname,
            snapshot_id,
            job_id: job_id.as_str().to_owned(),
        });
    }
    Ok((StatusCode::ACCEPTED, Json(queued)).into_response())
}

#[derive(Deserialize)]
struct SnapshotParams {
    endpoint: Option<String>,
}

/// Snapshots grouped by endpoint, each group with its number of captures.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotGroup {
    pub hostname: String,
    pub captures: usize,
    pub snapshots: Vec<serde_json::Value>,
}

async fn list_snapshots(
    State(state): State<Arc<ServerState>>,
    Query(params): Query<SnapshotParams>,
) -> Result<Json<Vec<SnapshotGroup>>, ApiError> {
    if let Some(host) = &params.endpoint {
        endpoint_or_404(&state, host).await?;
    }
    let all = state
        .catalog
        .snapshots(params.endpoint.as_deref())
        .await
        .map_err(ApiError::internal)?;
    let mut groups: Vec<SnapshotGroup> = Vec::new();
    for snap in all {
        let value = serde_json::to_value(&snap).map_err(ApiError::internal)?;
        match groups.last_mut() {
            Some(g) if g.hostname == snap.hostname => g.snapshots.push(value),
            _ => groups.push(SnapshotGroup {
                hostname: snap.hostname.clone(),
                captures: 0,
                snapshots: vec![value],
            }),
        }
    }
    for g in &mut groups {
        g.captures = g
            .snapshots
            .iter()
            .filter(|s| s["state"] == "complete")
            .count();
    }
    Ok(Json(groups))
}

async fn show_snapshot(
    State(state): State<Arc<ServerState>>,
    Path(id): Path<String>,
) -> Result<Json<Snapshot>, ApiError> {
    let not_found = || {
        ApiError::not_found(format!(
            "no snapshot with id {id:?}; `snapq snapshots list` shows them"
        ))
    };
    let id: i64 = id.parse().map_err(|_| not_found())?;
    let snap = state
        .catalog
        .snapshot(id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(not_found)?;
    Ok(Json(snap))
}

impl ServerState {
    /// Appends to the audit log; a failure to do so is logged, never hidden.
    pub(super) async fn audit(
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

async fn queue_status(State(state): State<Arc<ServerState>>) -> Result<Response, ApiError> {
    let mut status = state.queue.status().await.map_err(queue_error)?;
    // Only the kinds this server runs (and any that somehow hold jobs): no `noop`, no kinds
    // without workers yet.
    let workers = status.local_workers.clone();
    status.kinds.retain(|k| {
        workers.iter().any(|w| w.kind.as_str() == k.kind)
            || k.pending + k.running + k.retrying + k.done + k.failed + k.cancelled > 0
    });
    let running = state
        .queue
        .list(&ListFilter {
            state: Some(JobState::Running),
            kind: None,
            limit: Some(100),
        })
        .await
        .map_err(queue_error)?;
    let watch = super::quarantine::watch_status(&state).await;
    Ok(
        Json(serde_json::json!({ "status": status, "running": running, "watch": watch }))
            .into_response(),
    )
}

#[derive(Deserialize)]
struct ListParams {
    state: Option<String>,
    kind: Option<String>,
    limit: Option<u32>,
}

async fn queue_list(
    State(state): State<Arc<ServerState>>,
    Query(params): Query<ListParams>,
) -> Result<Response, ApiError> {
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
    let jobs = state
        .queue
        .list(&ListFilter {
            state: job_state,
            kind,
            limit: params.limit,
        })
        .await
        .map_err(queue_error)?;
    Ok(Json(jobs).into_response())
}

fn job_id(id: &str) -> Result<JobId, ApiError> {
    Ok(JobId::from(id))
}

async fn queue_show(
    State(state): State<Arc<ServerState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let detail = state.queue.show(&job_id(&id)?).await.map_err(queue_error)?;
    Ok(Json(detail).into_response())
}

async fn queue_retry(
    State(state): State<Arc<ServerState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let result = state.queue.retry(&job_id(&id)?).await;
    state
        .audit(
            &caller.name,
            "queue.retry",
            &id,
            if result.is_ok() { "ok" } else { "refused" },
            None,
        )
        .await;
    result.map_err(queue_error)?;
    Ok(Json(serde_json::json!({ "retried": id })).into_response())
}

async fn queue_cancel(
    State(state): State<Arc<ServerState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let result = state.queue.cancel(&job_id(&id)?, &caller.name).await;
    state
        .audit(
            &caller.name,
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

#[derive(Deserialize)]
struct DeleteRequest {
    #[serde(default)]
    ids: Vec<i64>,
    endpoint: Option<String>,
}

/// `POST /v1/snapshots/delete {"ids": [...]}` or `{"endpoint": "HOST"}`: one delete job per
/// snapshot. Unknown ids fail the whole request before anything is queued.
async fn delete_snapshots(
    State(state): State<Arc<ServerState>>,
    Extension(caller): Extension<Caller>,
    Json(request): Json<DeleteRequest>,
) -> Result<Response, ApiError> {
    let ids: Vec<i64> = match (&request.endpoint, request.ids.is_empty()) {
        (Some(host), true) => {
            endpoint_or_404(&state, host).await?;
            state
                .catalog
                .snapshots(Some(host))
                .await
                .map_err(ApiError::internal)?
                .into_iter()
                .map(|s| s.id)
                .collect()
        }
        (None, false) => {
            let mut unknown = Vec::new();
            for id in &request.ids {
                if state
                    .catalog
                    .snapshot(*id)
                    .await
                    .map_err(ApiError::internal)?
                    .is_none()
                {
                    unknown.push(id.to_string());
                }
            }
            if !unknown.is_empty() {
                return Err(ApiError::not_found(format!(
                    "no snapshot with id {}; `snapq snapshots list` shows them",
                    unknown.join(", ")
                )));
            }
            request.ids.clone()
        }
        _ => {
            return Err(ApiError::bad_request(
                "name snapshot ids, or an endpoint to delete all of its snapshots (not both)",
            ));
        }
    };
    let args: Vec<DeleteArgs> = ids
        .iter()
        .map(|&snapshot_id| DeleteArgs { snapshot_id })
        .collect();
    let jobs = state
        .queue
        .enqueue_many(JobKind::Delete, &args, &caller.name)
        .await
        .map_err(ApiError::internal)?;
    let target = request
        .endpoint
        .clone()
        .unwrap_or_else(|| format!("snapshots {ids:?}"));
    state
        .audit(
            &caller.name,
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

#[derive(Deserialize)]
struct UploadParams {
    name: String,
}

/// `POST /v1/uploads?name=FILE` with the file as the body: spooled to `incoming/` under a temporary
/// name while the size limit is enforced, then handed to an ingest job.
async fn upload(
    State(state): State<Arc<ServerState>>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<UploadParams>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;

    // Hostile or malformed names are refused before a byte is written.
    let name: snapq_core::SnapshotName = params.name.parse().map_err(|e| {
        ApiError::bad_request(format!("{:?} is not a snapshot name: {e}", params.name))
    })?;
    let incoming = state.layout().incoming();
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
    let job = match super::enqueue_spooled(&state.queue, &args, &spool_id, &caller.name).await {
        Ok(job) => job,
        Err(e) => {
            // Nothing will ever ingest it: do not leave it in the spool.
            let _ = tokio::fs::remove_file(&args.path).await;
            return Err(ApiError::internal(e));
        }
    };
    state
        .catalog
        .create_ingest(
            job.as_str(),
            Origin::Upload,
            &args.original_name,
            &caller.name,
        )
        .await
        .map_err(ApiError::internal)?;
    state
        .audit(
            &caller.name,
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

async fn show_ingest(
    State(state): State<Arc<ServerState>>,
    Path(job_id): Path<String>,
) -> Result<Response, ApiError> {
    let ingest = state
        .catalog
        .ingest(&job_id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found(format!("no ingest job {job_id:?}")))?;
    Ok(Json(ingest).into_response())
}
