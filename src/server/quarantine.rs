//! Quarantine as something to manage, not a dead end: list the files the ingest job rejected, see
//! why, send one back to ingest (after a false reason, or under a fixed name with `--as`), or
//! delete it; and the retention that deletes entries older than `--quarantine-retention-days`.
//!
//! An entry is an ingest whose state is `quarantined` (`core/src/catalog.rs`), its file under
//! `quarantine/` with a `.reason.json` beside it. A retry does not move the file here: it queues an
//! ingest job that reads it from where it lies, so a crash at any moment leaves the file either
//! still in quarantine (listed) or in the store, and the job closes the old entry whatever its
//! outcome (see `jobs/src/handlers/ingest.rs`). Also the drop folder's status: what the watcher
//! is still waiting for.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::Method;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use snapq_core::SnapshotName;
use snapq_core::catalog::{Ingest, Origin, now_ms};
use snapq_jobs::handlers::ingest::{IngestArgs, reason_path};

use snapq_core::access::Role;

use super::ServerState;
use super::access::{Access, Scoped, View};
use super::api::{ApiRoute, Auth};
use super::openapi::ErrorBody;
use crate::http::ApiError;

/// The OpenAPI description of this module's routes (assembled in [`super::openapi`]).
#[derive(utoipa::OpenApi)]
#[openapi(paths(list, show, retry, delete))]
pub(super) struct Doc;

/// The quarantine's routes, scoped like every user route: an entry belongs to the endpoint its
/// file name names (one whose name names none is an admin's only).
pub(super) fn routes() -> Vec<ApiRoute> {
    use super::api::route as r;
    use Auth::User;
    vec![
        r(Method::GET, "/v1/quarantine", User, list),
        r(Method::GET, "/v1/quarantine/{id}", User, show),
        r(Method::POST, "/v1/quarantine/{id}/retry", User, retry),
        r(Method::POST, "/v1/quarantine/delete", User, delete),
    ]
}

/// One quarantined file, as `snapq quarantine list|show` print it.
fn entry_json(ingest: &Ingest) -> serde_json::Value {
    let size = ingest
        .quarantine_path
        .as_deref()
        .and_then(|p| std::fs::symlink_metadata(p).ok())
        .map(|m| m.len());
    serde_json::json!({
        "id": ingest.job_id,
        "name": ingest.original_name,
        "origin": ingest.origin,
        "size": size,
        "reason": ingest.reason,
        "quarantined_ms": ingest.finished_ms,
        "requested_by": ingest.requested_by,
        "path": ingest.quarantine_path,
    })
}

/// Quarantined files the caller sees.
#[utoipa::path(
    get,
    path = "/v1/quarantine",
    responses(
        (
            status = 200,
            description = "quarantined files: `id`, `name`, `origin`, `size`, `reason`, `quarantined_ms`, `requested_by`, `path`",
            body = [Object],
        ),
    ),
)]
async fn list(access: Access, State(state): State<Arc<ServerState>>) -> Result<Response, ApiError> {
    let visible = access.visible().await?;
    let entries = state
        .catalog
        .quarantined(None)
        .await
        .map_err(ApiError::internal)?;
    let entries: Vec<_> = entries
        .iter()
        .filter(|e| match e.original_name.parse::<SnapshotName>() {
            Ok(name) => visible.host(name.hostname()),
            Err(_) => visible.everything(),
        })
        .map(entry_json)
        .collect();
    Ok(Json(entries).into_response())
}

/// The quarantine entry `id` if the caller may reach it with `need`; anything else (no such
/// ingest, outside the caller's groups, not quarantined) answers the same 404.
async fn entry_or_404(access: &Access, id: &str, need: Role) -> Result<Ingest, ApiError> {
    let missing = || {
        ApiError::not_found(format!(
            "no quarantined file {id:?}; `snapq quarantine list` shows them"
        ))
    };
    match access.ingest(id, need).await {
        Ok(ingest) if ingest.state == "quarantined" => Ok(ingest),
        Ok(_) => Err(missing()),
        Err(e) if e.status == StatusCode::NOT_FOUND => Err(missing()),
        Err(e) => Err(e),
    }
}

/// One quarantined file, with the full rejection written beside it.
#[utoipa::path(
    get,
    path = "/v1/quarantine/{id}",
    params(("id" = String, Path, description = "the quarantined file's ingest job id")),
    responses((status = 200, description = "the entry and its `rejection`", body = Object)),
)]
async fn show(
    Scoped { target: entry, .. }: Scoped<Ingest, View>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if entry.state != "quarantined" {
        return Err(ApiError::not_found(format!(
            "no quarantined file {id:?}; `snapq quarantine list` shows them"
        )));
    }
    let mut json = entry_json(&entry);
    // The full rejection as written beside the file (size, sha256 at the time, ...).
    if let Some(path) = &entry.quarantine_path
        && let Ok(text) = std::fs::read(reason_path(std::path::Path::new(path)))
        && let Ok(detail) = serde_json::from_slice::<serde_json::Value>(&text)
    {
        json["rejection"] = detail;
    }
    Ok(Json(json).into_response())
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
struct RetryRequest {
    /// Ingest it under this snapshot name instead (a fixed name).
    #[serde(default, rename = "as")]
    as_name: Option<String>,
}

/// Ingests a quarantined file again, optionally under another snapshot name.
#[utoipa::path(
    post,
    path = "/v1/quarantine/{id}/retry",
    params(("id" = String, Path, description = "the quarantined file's ingest job id")),
    request_body = RetryRequest,
    responses(
        (status = 202, description = "`{\"job_id\", \"name\", \"retry_of\"}`", body = Object),
        (status = 409, description = "the entry's file is gone", body = ErrorBody),
    ),
)]
async fn retry(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Path(id): Path<String>,
    Json(request): Json<RetryRequest>,
) -> Result<Response, ApiError> {
    let entry = entry_or_404(&access, &id, Role::Operator).await?;
    let caller = access.caller.clone();
    let name = match &request.as_name {
        Some(name) => name
            .parse::<SnapshotName>()
            .map_err(|e| ApiError::bad_request(format!("{name:?} is not a snapshot name: {e}")))?
            .to_string(),
        None => entry.original_name.clone(),
    };
    let path = entry
        .quarantine_path
        .as_deref()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                format!("the file of quarantine entry {id} is no longer there; delete the entry"),
            )
        })?;
    let origin = match entry.origin.as_str() {
        "upload" => Origin::Upload,
        _ => Origin::Watch,
    };
    let args = IngestArgs {
        retry_of: Some(id.clone()),
        ..IngestArgs::new(path, name.clone(), origin)
    };
    let job = state
        .queue
        .push(&args, &caller.name)
        .await
        .map_err(ApiError::internal)?;
    state
        .catalog
        .create_ingest(job.as_str(), origin, &name, &caller.name)
        .await
        .map_err(ApiError::internal)?;
    state
        .audit(
            &caller.name,
            "quarantine.retry",
            &id,
            "queued",
            Some(job.as_str()),
        )
        .await;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "job_id": job.as_str(), "name": name, "retry_of": id })),
    )
        .into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[schema(as = QuarantineDeleteRequest)]
struct DeleteRequest {
    ids: Vec<String>,
}

/// Deletes quarantined files and their entries.
#[utoipa::path(
    post,
    path = "/v1/quarantine/delete",
    request_body = DeleteRequest,
    responses((status = 200, description = "`{\"deleted\": [id, ...]}`", body = Object)),
)]
async fn delete(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Json(request): Json<DeleteRequest>,
) -> Result<Response, ApiError> {
    if request.ids.is_empty() {
        access.require(Role::Operator)?;
    }
    let caller = access.caller.clone();
    let mut entries = Vec::new();
    for id in &request.ids {
        entries.push(entry_or_404(&access, id, Role::Operator).await?);
    }
    for entry in &entries {
        remove_entry(&state, entry, "deleted").await?;
        state
            .audit(
                &caller.name,
                "quarantine.delete",
                &entry.job_id,
                "deleted",
                Some(&entry.original_name),
            )
            .await;
    }
    let ids: Vec<&str> = entries.iter().map(|e| e.job_id.as_str()).collect();
    Ok(Json(serde_json::json!({ "deleted": ids })).into_response())
}

/// Removes an entry's file and reason, then closes the entry (`deleted` or `expired`).
async fn remove_entry(state: &ServerState, entry: &Ingest, how: &str) -> Result<(), ApiError> {
    if let Some(path) = entry.quarantine_path.clone() {
        tokio::task::spawn_blocking(move || {
            let path = std::path::Path::new(&path);
            for p in [path.to_path_buf(), reason_path(path)] {
                match std::fs::remove_file(&p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            Ok(())
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    }
    state
        .catalog
        .close_quarantine(&entry.job_id, how)
        .await
        .map_err(ApiError::internal)?;
    Ok(())
}

/// Deletes quarantined files older than the retention, hourly (and once at start).
pub async fn prune_periodically(state: Arc<ServerState>) {
    let every = state
        .config
        .quarantine_retention
        .min(Duration::from_secs(3600))
        .max(Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let cutoff = now_ms() - state.config.quarantine_retention.as_millis() as i64;
        let old = match state.catalog.quarantined(Some(cutoff)).await {
            Ok(old) => old,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list old quarantine entries; will try again");
                continue;
            }
        };
        for entry in old {
            match remove_entry(&state, &entry, "expired").await {
                Ok(()) => {
                    tracing::info!(id = %entry.job_id, name = %entry.original_name, "quarantined file expired");
                    state
                        .audit(
                            "retention",
                            "quarantine.expire",
                            &entry.job_id,
                            "deleted",
                            Some(&entry.original_name),
                        )
                        .await;
                }
                Err(e) => {
                    tracing::warn!(id = %entry.job_id, error = %e.message, "cannot expire a quarantined file")
                }
            }
        }
    }
}

/// What the drop-folder watcher is waiting for, for `snapq queue status`.
pub async fn watch_status(state: &ServerState) -> serde_json::Value {
    let Some(handle) = state.watcher.get() else {
        return serde_json::Value::Null;
    };
    let waiting = handle.waiting().await.unwrap_or_default();
    let files: Vec<_> = waiting
        .iter()
        .map(|w| {
            serde_json::json!({
                "name": w.path.file_name().map(|n| n.to_string_lossy().into_owned()),
                "size": w.len,
                "unchanged_ms": w.unchanged_for.as_millis() as u64,
                "writer_open": w.writer_open,
            })
        })
        .collect();
    serde_json::json!({
        "dir": handle.dir(),
        "uses_notify": handle.uses_notify(),
        "waiting": files,
    })
}
