//! Export jobs as the API and the server see them: the routes that queue an export, list, show,
//! download and delete them, the retention that prunes old ones, and what the server does with an
//! export whose job ended without completing.
//!
//! An export belongs to the endpoint its rows come from (a snapshot's, a live endpoint's, or the
//! one an evidence export names); an evidence export over every endpoint its requester could see
//! belongs to that requester (and admins). The job itself is in [`job`], the file formats in
//! [`format`], saved evidence in [`evidence`].

pub mod evidence;
pub mod format;
pub mod job;
mod live;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use snapq_core::access::Role;
use snapq_core::catalog::{Catalog, Export, ExportState, NewExport, now_ms};
use snapq_core::filter::parse_time;
use snapq_core::query::EventQuery;
use snapq_core::schema::{self, Table};
use snapq_jobs::{JobKind, JobState, QueueError};

use self::format::Format;
use self::job::ExportArgs;
use super::ServerState;
use super::access::{Access, Operate, Scoped, View};
use super::api::{ApiRoute, Auth};
use super::openapi::{Binary, ErrorBody};
use crate::http::ApiError;
use crate::layout::ExportDir;

/// Where an export's rows come from, as stored with the export.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ExportSource {
    /// A stored snapshot (also one opened as a connection).
    Snapshot {
        id: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        connection: Option<String>,
    },
    /// A live endpoint, paged through its agent.
    Endpoint {
        hostname: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        connection: Option<String>,
    },
    /// The evidence store: the evidence of these endpoints (one, if the request named it).
    Evidence { hostnames: Vec<String> },
}

/// Which rows: event types and the filter language of `snapq events`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ExportFilters {
    /// Event types, in the order they are written; none: every type that has the fields the
    /// filter and the sort name.
    #[serde(default)]
    pub types: Vec<String>,
    #[serde(default, rename = "where")]
    pub wheres: Vec<String>,
    #[serde(default)]
    pub any: bool,
    #[serde(default)]
    pub since: Option<String>,
    #[serde(default)]
    pub until: Option<String>,
    /// `FIELD` or `-FIELD`; default `ts` (oldest first, the order a report reads).
    #[serde(default)]
    pub sort: Option<String>,
}

impl ExportFilters {
    pub(super) fn sort(&self) -> &str {
        self.sort
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or("ts")
    }

    /// One validated query per event type, in the order the file gets them.
    pub fn queries(&self) -> Result<Vec<EventQuery>, String> {
        let parse = |t: &str| {
            EventQuery::parse(
                t,
                &self.wheres,
                self.any,
                self.since.as_deref(),
                self.until.as_deref(),
                Some(self.sort()),
                None,
                None,
            )
            .map_err(|e| e.to_string())
        };
        if !self.types.is_empty() {
            return self.types.iter().map(|t| parse(t)).collect();
        }
        let filter =
            snapq_core::filter::Filter::parse(&self.wheres, self.any).map_err(|e| e.to_string())?;
        let sort_field = self.sort().trim().trim_start_matches(['-', '+']).to_owned();
        let fits = |t: &Table| {
            t.column(&sort_field).is_some()
                && filter
                    .conditions
                    .iter()
                    .all(|c| t.column(&c.field).is_some())
        };
        let tables: Vec<&Table> = schema::event_tables().filter(|t| fits(t)).collect();
        if tables.is_empty() {
            // Let the first type say what is wrong with the filter or the sort.
            parse(schema::event_type_names()[0])?;
            return Err("no event type has every field the filter and the sort name: pick the types with --type".into());
        }
        tables.iter().map(|t| parse(t.name)).collect()
    }

    /// The event tables of an evidence export (every type when none is named).
    pub fn tables(&self) -> Result<Vec<&'static Table>, String> {
        if self.types.is_empty() {
            return Ok(schema::event_tables().collect());
        }
        self.types
            .iter()
            .map(|t| {
                schema::event_table(t).ok_or_else(|| {
                    format!(
                        "unknown event type `{t}`: use one of {}",
                        schema::event_type_names().join(", ")
                    )
                })
            })
            .collect()
    }

    /// The event-time window of an evidence export: (since inclusive, until exclusive).
    pub fn window(&self) -> Result<(Option<i64>, Option<i64>), String> {
        let time = |name: &str, v: &Option<String>| {
            v.as_deref()
                .map(|s| {
                    parse_time(s).map_err(|_| {
                        format!("invalid `{name}` time `{s}`: give RFC 3339 (2026-11-28T14:03:07Z) or epoch milliseconds")
                    })
                })
                .transpose()
        };
        Ok((time("since", &self.since)?, time("until", &self.until)?))
    }

    /// Checks the filters for an export of `source` as a request does (400 when wrong).
    fn validate(&self, source: &ExportSource) -> Result<(), String> {
        match source {
            ExportSource::Evidence { .. } => {
                self.tables()?;
                self.window()?;
                if !self.wheres.is_empty() || self.sort.is_some() || self.any {
                    self.queries()?;
                }
                Ok(())
            }
            _ => self.queries().map(|_| ()),
        }
    }
}

/// `POST /v1/exports`: exactly one of `snapshot`, `endpoint`, `connection` or `evidence`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct ExportRequest {
    #[serde(default)]
    #[schema(example = 1)]
    pub snapshot: Option<i64>,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub connection: Option<String>,
    /// Export saved evidence (of `endpoint` if given, else of every endpoint the caller sees).
    #[serde(default)]
    pub evidence: bool,
    #[schema(pattern = "^(csv|jsonl|xlsx)$", example = "csv")]
    pub format: String,
    #[serde(flatten)]
    pub filters: ExportFilters,
}

/// The OpenAPI description of this module's routes, evidence's too (assembled in
/// [`super::openapi`]).
pub(super) fn doc() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi;
    #[derive(OpenApi)]
    #[openapi(paths(create, list, show, download, delete))]
    struct Doc;
    let mut doc = Doc::openapi();
    doc.merge(evidence::Doc::openapi());
    doc
}

pub(super) fn routes() -> Vec<ApiRoute> {
    use super::api::route as r;
    use Auth::User;
    let mut routes = vec![
        r(Method::POST, "/v1/exports", User, create),
        r(Method::GET, "/v1/exports", User, list),
        r(Method::GET, "/v1/exports/{id}", User, show),
        r(Method::GET, "/v1/exports/{id}/file", User, download),
        r(Method::DELETE, "/v1/exports/{id}", User, delete),
    ];
    routes.extend(evidence::routes());
    routes
}

/// Resolves the request's source to what the job reads and the endpoint the export belongs to,
/// checking that the caller may export it.
async fn resolve_source(
    access: &Access,
    state: &ServerState,
    request: &ExportRequest,
) -> Result<(ExportSource, Option<String>), ApiError> {
    let named = [
        request.snapshot.is_some(),
        request.connection.is_some(),
        request.evidence,
        request.endpoint.is_some() && !request.evidence,
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if named != 1 {
        access.require(Role::Operator)?;
        return Err(ApiError::bad_request(
            "name one source: --connection ID, --snapshot ID or --evidence [--endpoint HOST]",
        ));
    }
    if let Some(id) = request.snapshot {
        let snap = access.snapshot(&id.to_string(), Role::Operator).await?;
        if snap.state != "complete" {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "snapshot {id} is {}; only a complete snapshot can be exported",
                    snap.state
                ),
            ));
        }
        return Ok((
            ExportSource::Snapshot {
                id,
                connection: None,
            },
            Some(snap.hostname),
        ));
    }
    if let Some(connection) = &request.connection {
        return live::connection_source(access, state, connection).await;
    }
    if request.evidence {
        let hostnames = match &request.endpoint {
            Some(host) => {
                access.host(host, Role::Operator).await?;
                vec![host.clone()]
            }
            None => {
                access.require(Role::Operator)?;
                let visible = access.visible().await?;
                let mut hosts: Vec<String> = state
                    .catalog
                    .evidence_list(None)
                    .await
                    .map_err(ApiError::internal)?
                    .into_iter()
                    .map(|e| e.hostname)
                    .filter(|h| visible.host(h))
                    .collect();
                hosts.sort();
                hosts.dedup();
                hosts
            }
        };
        let owner =
            (hostnames.len() == 1 && request.endpoint.is_some()).then(|| hostnames[0].clone());
        return Ok((ExportSource::Evidence { hostnames }, owner));
    }
    let host = request.endpoint.as_deref().expect("counted above");
    let endpoint = access.endpoint(host, Role::Operator).await?;
    Ok((
        ExportSource::Endpoint {
            hostname: endpoint.hostname.clone(),
            connection: None,
        },
        Some(endpoint.hostname),
    ))
}

#[utoipa::path(
    post,
    path = "/v1/exports",
    request_body = ExportRequest,
    responses(
        (status = 202, description = "the export, queued", body = Export),
        (
            status = 409,
            description = "the source cannot be exported now (a snapshot not complete, a connection not active)",
            body = ErrorBody,
        ),
    ),
)]
async fn create(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Json(request): Json<ExportRequest>,
) -> Result<Response, ApiError> {
    let (source, hostname) = resolve_source(&access, &state, &request).await?;
    let format: Format = request.format.parse().map_err(ApiError::bad_request)?;
    request
        .filters
        .validate(&source)
        .map_err(ApiError::bad_request)?;
    let caller = access.name().to_owned();
    let id = state
        .catalog
        .create_export(&NewExport {
            hostname: hostname.clone(),
            source: serde_json::to_value(&source).map_err(ApiError::internal)?,
            format: format.as_str().to_owned(),
            filters: serde_json::to_value(&request.filters).map_err(ApiError::internal)?,
            requested_by: caller.clone(),
        })
        .await
        .map_err(ApiError::internal)?;
    let job_id = state
        .queue
        .push(&ExportArgs { export_id: id }, &caller)
        .await
        .map_err(ApiError::internal)?;
    if let Some(host) = &hostname {
        state
            .catalog
            .set_job_target(job_id.as_str(), host)
            .await
            .map_err(ApiError::internal)?;
    }
    state
        .catalog
        .set_export_job(id, job_id.as_str())
        .await
        .map_err(ApiError::internal)?;
    state
        .audit(
            &caller,
            "export",
            &format!("export {id}"),
            "queued",
            Some(&format!(
                "{} {} (job {job_id})",
                format.as_str(),
                serde_json::to_string(&source).unwrap_or_default()
            )),
        )
        .await;
    let export = state
        .catalog
        .export(id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::internal("the export row vanished"))?;
    Ok((StatusCode::ACCEPTED, Json(export)).into_response())
}

/// Exports the caller sees.
#[utoipa::path(
    get,
    path = "/v1/exports",
    responses((status = 200, description = "exports", body = [Export])),
)]
async fn list(access: Access, State(state): State<Arc<ServerState>>) -> Result<Response, ApiError> {
    let visible = access.visible().await?;
    let all = state.catalog.exports().await.map_err(ApiError::internal)?;
    let mine: Vec<Export> = all
        .into_iter()
        .filter(|e| match &e.hostname {
            Some(h) => visible.host(h),
            None => visible.everything() || e.requested_by == access.name(),
        })
        .collect();
    Ok(Json(mine).into_response())
}

/// One export: its state, progress and file.
#[utoipa::path(
    get,
    path = "/v1/exports/{id}",
    params(("id" = i64, Path, description = "export id", example = 1)),
    responses((status = 200, description = "the export", body = Export)),
)]
async fn show(Scoped { target, .. }: Scoped<Export, View>) -> Json<Export> {
    Json(target)
}

/// A complete export's file, with `Range` for resuming.
#[utoipa::path(
    get,
    path = "/v1/exports/{id}/file",
    params(
        ("id" = i64, Path, description = "export id", example = 1),
        ("Range" = Option<String>, Header, description = "one byte range, for resuming"),
    ),
    responses(
        (
            status = 200,
            description = "the file",
            content((Binary = "text/csv; charset=utf-8"), (Binary = "application/jsonl"), (Binary = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet")),
        ),
        (
            status = 206,
            description = "the range asked for",
            content((Binary = "text/csv; charset=utf-8"), (Binary = "application/jsonl"), (Binary = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet")),
        ),
        (status = 409, description = "the export is not complete", body = ErrorBody),
        (status = 416, description = "the range is outside the file", body = ErrorBody),
    ),
)]
async fn download(
    State(state): State<Arc<ServerState>>,
    Scoped { target, .. }: Scoped<Export, View>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let (Some(file_name), "complete") = (&target.file_name, target.state.as_str()) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "export {} is {}; download it once it is complete (`snapq exports list` shows its state)",
                target.id, target.state
            ),
        ));
    };
    let format: Format = target.format.parse().map_err(ApiError::internal)?;
    let path = state.config.exports_dir().path().join(file_name);
    let etag = format!("export-{}-{}", target.id, target.bytes.unwrap_or(0));
    let mut response = crate::http::serve_file(&path, &etag, &headers, None).await?;
    // An error answer (a range outside the file) keeps its JSON type and is no attachment.
    if response.status().is_success() {
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(format.content_type()),
        );
        if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{file_name}\"")) {
            h.insert(header::CONTENT_DISPOSITION, v);
        }
    }
    Ok(response)
}

/// Deletes an export (stopping its job if it runs) and its file.
#[utoipa::path(
    delete,
    path = "/v1/exports/{id}",
    params(("id" = i64, Path, description = "export id", example = 1)),
    responses((status = 200, description = "`{\"deleted\": id}`", body = Object)),
)]
async fn delete(
    State(state): State<Arc<ServerState>>,
    Scoped { access, target, .. }: Scoped<Export, Operate>,
) -> Result<Response, ApiError> {
    remove_export(&state, &target)
        .await
        .map_err(ApiError::internal)?;
    state
        .audit(
            access.name(),
            "export.delete",
            &format!("export {}", target.id),
            "deleted",
            None,
        )
        .await;
    Ok(Json(serde_json::json!({ "deleted": target.id })).into_response())
}

/// Stops the export's job if it still runs, then removes its file and its row.
async fn remove_export(state: &ServerState, export: &Export) -> Result<(), String> {
    if let Some(job) = &export.job_id
        && matches!(export.state.as_str(), "queued" | "running")
    {
        match state
            .queue
            .cancel(&snapq_jobs::JobId::from(job.as_str()), "export.delete")
            .await
        {
            Ok(_) | Err(QueueError::InvalidState { .. }) | Err(QueueError::NotFound(_)) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    state
        .catalog
        .delete_export(export.id)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(name) = &export.file_name {
        let _ = std::fs::remove_file(state.config.exports_dir().path().join(name));
    }
    Ok(())
}

/// The catalog follows an export job that ended dead or cancelled (see `record_terminal`).
pub(super) async fn record_terminal(
    catalog: &Catalog,
    job: &snapq_jobs::TerminalJob,
) -> Result<(), String> {
    if job.kind != JobKind::Export {
        return Ok(());
    }
    let Ok(args) = serde_json::from_value::<ExportArgs>(job.args.clone()) else {
        return Ok(());
    };
    let (state, reason) = match job.state {
        JobState::Cancelled => (ExportState::Cancelled, "cancelled".to_owned()),
        _ => (
            ExportState::Failed,
            job.error.clone().unwrap_or_else(|| "failed".into()),
        ),
    };
    catalog
        .end_unfinished_export(args.export_id, state, &reason)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Partial export files a crash or a kill left behind: those not written to for `idle` (zero:
/// all of them, where no other node writes). Run before the workers start.
pub(super) fn remove_abandoned_partials(dir: &ExportDir, idle: Duration) {
    for entry in std::fs::read_dir(dir.path())
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = entry.path();
        let untouched = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() >= idle);
        if dir.is_partial(&path) && untouched {
            tracing::info!(path = %path.display(), "removing an export a crash cut off");
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Deletes exports (file and row) that finished longer ago than `--export-retention-days`.
pub async fn prune_periodically(state: Arc<ServerState>) {
    let retention = state.config.export_retention;
    let every = retention
        .min(Duration::from_secs(3600))
        .max(Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let cutoff = now_ms() - retention.as_millis() as i64;
        let old = match state.catalog.exports_finished_before(cutoff).await {
            Ok(old) => old,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list old exports; will try again");
                continue;
            }
        };
        for export in old {
            match remove_export(&state, &export).await {
                Ok(()) => {
                    state
                        .audit(
                            "retention",
                            "export.expire",
                            &format!("export {}", export.id),
                            "deleted",
                            None,
                        )
                        .await;
                }
                Err(e) => tracing::warn!(id = export.id, error = %e, "cannot prune an export"),
            }
        }
    }
}
