//! Saved evidence: `POST /v1/evidence` copies events (every column) from a snapshot, a live
//! endpoint or a connection into the catalog, with their endpoint, their source, who saved them
//! and why; list (`?endpoint=`), show and delete. Evidence belongs to its endpoint: everyone who
//! may access that endpoint sees it, and it outlives the connection and the snapshot.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use snapq_core::access::Role;
use snapq_core::catalog::{Evidence, NewEvidence};

use super::super::ServerState;
use super::super::access::{Access, Operate, Scoped, View};
use super::super::api::{ApiRoute, Auth};
use super::super::events::Source;
use crate::http::ApiError;

/// The OpenAPI description of this module's routes (assembled in [`super::doc`]).
#[derive(utoipa::OpenApi)]
#[openapi(paths(save, list, show, delete))]
pub(super) struct Doc;

pub(super) fn routes() -> Vec<ApiRoute> {
    use super::super::api::route as r;
    use Auth::User;
    vec![
        r(Method::POST, "/v1/evidence", User, save),
        r(Method::GET, "/v1/evidence", User, list),
        r(Method::GET, "/v1/evidence/{id}", User, show),
        r(Method::DELETE, "/v1/evidence/{id}", User, delete),
    ]
}

/// The most events one save copies.
const MAX_REFS: usize = 1_000;

/// An event named as `TYPE:ID`, e.g. `process:42`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRef {
    pub event_type: &'static str,
    pub id: i64,
}

impl std::str::FromStr for EventRef {
    type Err = String;
    fn from_str(s: &str) -> Result<EventRef, String> {
        let bad = || {
            format!(
                "invalid event reference `{}`: write TYPE:ID (e.g. process:42), the type and id columns `snapq events` prints",
                s.chars().take(80).collect::<String>()
            )
        };
        let (t, id) = s.trim().split_once(':').ok_or_else(bad)?;
        let table = snapq_core::schema::event_table(t).ok_or_else(|| {
            format!(
                "unknown event type `{t}` in `{s}`: use one of {}",
                snapq_core::schema::event_type_names().join(", ")
            )
        })?;
        let id = id.trim().parse::<i64>().map_err(|_| bad())?;
        Ok(EventRef {
            event_type: table.name,
            id,
        })
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct SaveRequest {
    #[serde(default)]
    #[schema(example = 1)]
    snapshot: Option<i64>,
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    connection: Option<String>,
    /// Event references `TYPE:ID`.
    #[schema(min_items = 1, example = json!(["process:1"]))]
    events: Vec<String>,
    #[serde(default)]
    note: Option<String>,
}

/// Saves events of a snapshot, an endpoint or a connection as evidence, with a note.
#[utoipa::path(
    post,
    path = "/v1/evidence",
    request_body = SaveRequest,
    responses((status = 201, description = "the saved evidence", body = [Evidence])),
)]
async fn save(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Json(request): Json<SaveRequest>,
) -> Result<Response, ApiError> {
    let named = [
        request.snapshot.is_some(),
        request.endpoint.is_some(),
        request.connection.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if named != 1 {
        access.require(Role::Operator)?;
        return Err(ApiError::bad_request(
            "name where the events are: --connection ID (or a snapshot or endpoint)",
        ));
    }
    let (hostname, source, connection_id) = if let Some(id) = request.snapshot {
        let snap = access.snapshot(&id.to_string(), Role::Operator).await?;
        (snap.hostname, Source::Snapshot { id }, None)
    } else if let Some(host) = &request.endpoint {
        let endpoint = access.endpoint(host, Role::Operator).await?;
        (
            endpoint.hostname.clone(),
            Source::Endpoint {
                hostname: endpoint.hostname,
            },
            None,
        )
    } else {
        let connection = request.connection.as_deref().expect("counted above");
        let (hostname, source, id) =
            super::live::connection_event_source(&access, &state, connection).await?;
        (hostname, source, Some(id))
    };
    if request.events.is_empty() || request.events.len() > MAX_REFS {
        return Err(ApiError::bad_request(format!(
            "name 1 to {MAX_REFS} events to save, as TYPE:ID (e.g. process:42)"
        )));
    }
    let refs: Vec<EventRef> = request
        .events
        .iter()
        .map(|r| r.parse())
        .collect::<Result<_, _>>()
        .map_err(ApiError::bad_request)?;
    let events = super::live::events_by_id(&state, &source, &refs, connection_id).await?;
    let connection_id = connection_id.map(|id| id.to_string());
    let (source_kind, source_id) = match &source {
        Source::Snapshot { id } => ("snapshot", id.to_string()),
        Source::Endpoint { hostname } => ("endpoint", hostname.clone()),
    };
    let note = request.note.filter(|n| !n.trim().is_empty());
    let items: Vec<NewEvidence> = refs
        .iter()
        .zip(events)
        .map(|(r, event)| NewEvidence {
            hostname: hostname.clone(),
            event_type: r.event_type.to_owned(),
            event_id: r.id,
            event_ts: event.get("ts").and_then(|v| v.as_i64()),
            event: serde_json::Value::Object(event),
            source_kind: source_kind.to_owned(),
            source_id: source_id.clone(),
            connection_id: connection_id.clone(),
            note: note.clone(),
        })
        .collect();
    let ids = state
        .catalog
        .save_evidence(&items, access.name())
        .await
        .map_err(ApiError::internal)?;
    state
        .audit(
            access.name(),
            "evidence.save",
            &hostname,
            "ok",
            Some(&format!(
                "{} from {source_kind} {source_id}",
                request.events.join(" ")
            )),
        )
        .await;
    let mut saved = Vec::new();
    for id in ids {
        if let Some(e) = state
            .catalog
            .evidence(id)
            .await
            .map_err(ApiError::internal)?
        {
            saved.push(e);
        }
    }
    Ok((StatusCode::CREATED, Json(saved)).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ListParams {
    endpoint: Option<String>,
}

/// Saved evidence the caller sees, optionally of one endpoint.
#[utoipa::path(
    get,
    path = "/v1/evidence",
    params(ListParams),
    responses((status = 200, description = "evidence", body = [Evidence])),
)]
async fn list(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Query(params): Query<ListParams>,
) -> Result<Response, ApiError> {
    if let Some(host) = &params.endpoint {
        access.host(host, Role::Viewer).await?;
    }
    let visible = access.visible().await?;
    let all = state
        .catalog
        .evidence_list(params.endpoint.as_deref())
        .await
        .map_err(ApiError::internal)?;
    let seen: Vec<Evidence> = all
        .into_iter()
        .filter(|e| visible.host(&e.hostname))
        .collect();
    Ok(Json(seen).into_response())
}

/// One piece of saved evidence.
#[utoipa::path(
    get,
    path = "/v1/evidence/{id}",
    params(("id" = i64, Path, description = "evidence id", example = 1)),
    responses((status = 200, description = "the evidence", body = Evidence)),
)]
async fn show(Scoped { target, .. }: Scoped<Evidence, View>) -> Json<Evidence> {
    Json(target)
}

/// Deletes saved evidence.
#[utoipa::path(
    delete,
    path = "/v1/evidence/{id}",
    params(("id" = i64, Path, description = "evidence id", example = 1)),
    responses((status = 200, description = "`{\"deleted\": id}`", body = Object)),
)]
async fn delete(
    State(state): State<Arc<ServerState>>,
    Scoped { access, target, .. }: Scoped<Evidence, Operate>,
) -> Result<Response, ApiError> {
    state
        .catalog
        .delete_evidence(target.id)
        .await
        .map_err(ApiError::internal)?;
    state
        .audit(
            access.name(),
            "evidence.delete",
            &target.hostname,
            "deleted",
            Some(&format!(
                "evidence {} ({}:{})",
                target.id, target.event_type, target.event_id
            )),
        )
        .await;
    Ok(Json(serde_json::json!({ "deleted": target.id })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_refs_parse_or_say_how_to_write_them() {
        assert_eq!(
            "process:42".parse::<EventRef>().unwrap(),
            EventRef {
                event_type: "process",
                id: 42
            }
        );
        for bad in [
            "process",
            "process:x",
            ":1",
            "proc:1",
            "process:1; DROP TABLE x",
            "",
        ] {
            let e = bad.parse::<EventRef>().unwrap_err();
            assert!(
                e.contains("TYPE:ID") || e.contains("unknown event type"),
                "{bad}: {e}"
            );
        }
    }
}
