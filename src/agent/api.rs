//! The endpoint API: what the server (and an analyst's live connection) asks of an agent.
//!
//! Served over TLS. Every route needs a bearer token: the credential the server enrolled this
//! agent with, or the agent's local `agent.token`. Queries run on their own read-only connection in a
//! blocking task, so a slow filter never holds up the recorder or other requests.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use snapq_core::disk;
use snapq_core::query::{self, EventQuery};
use snapq_core::wire::{DbSize, EndpointInfo};

use super::recorder::{self, RecorderDb};
use super::staging::{StageError, Staged, StagedState, Staging};
use super::system;
use crate::http::{ApiError, Growing, bearer, bearer_matches, serve_file, unauthorized};
use rusqlite::OptionalExtension;

pub struct AgentState {
    pub hostname: String,
    /// The local token (`agent.token`), for calling the agent directly.
    pub token: String,
    /// The credential the server enrolled this agent with; the server calls with it.
    pub identity: Arc<super::enroll::Identity>,
    pub db: Arc<RecorderDb>,
    pub staging: Staging,
}

pub fn router(state: Arc<AgentState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/endpoint", get(endpoint))
        .route("/v1/endpoint/size", get(endpoint_size))
        .route("/v1/events", get(events))
        .route("/v1/events/summary", get(summary))
        .route("/v1/processes/{id}/tree", get(process_tree))
        .route("/v1/snapshots", post(stage).get(list_staged))
        .route(
            "/v1/snapshots/{id}",
            get(download_staged).delete(delete_staged),
        )
        .route("/v1/snapshots/{id}/info", get(staged_info))
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(middleware::from_fn(crate::http::json_errors))
        .with_state(state)
}

async fn require_token(
    State(state): State<Arc<AgentState>>,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    let server = bearer(request.headers()).is_some_and(|given| state.identity.is_server(given));
    if server || bearer_matches(request.headers(), &state.token) {
        next.run(request).await
    } else {
        unauthorized().into_response()
    }
}

/// `GET /metrics`: the agent's own Prometheus metrics (`super::metrics`).
async fn metrics(State(state): State<Arc<AgentState>>) -> Result<Response, ApiError> {
    let db = state.db.path().to_owned();
    let text = tokio::task::spawn_blocking(move || super::metrics::metrics().render(&db))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, crate::http::OPENMETRICS)],
        text,
    )
        .into_response())
}

/// Runs `f` on a fresh read-only connection in a blocking task.
async fn with_reader<T: Send + 'static>(
    state: &AgentState,
    f: impl FnOnce(&rusqlite::Connection) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let db = state.db.clone();
    tokio::task::spawn_blocking(move || {
        let conn = db.reader().map_err(ApiError::internal)?;
        f(&conn)
    })
    .await
    .map_err(ApiError::internal)?
}

fn query_error(err: query::QueryError) -> ApiError {
    let status = StatusCode::from_u16(err.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    ApiError::new(status, err.to_string())
}

async fn endpoint(State(state): State<Arc<AgentState>>) -> Result<Json<EndpointInfo>, ApiError> {
    let summary = with_reader(&state, |c| query::summary(c).map_err(query_error)).await?;
    let recorder_modes = with_reader(&state, |c| {
        let json: Option<String> = c
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [recorder::MODES_META_KEY],
                |r| r.get(0),
            )
            .optional()
            .map_err(ApiError::internal)?;
        Ok(json.map(|j| recorder::Modes::parse(&j)).unwrap_or_default())
    })
    .await?;
    let db_path = state.db.path();
    Ok(Json(EndpointInfo {
        hostname: state.hostname.clone(),
        ips: system::ip_addresses(),
        os: system::os_description(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        db_bytes: super::staging::db_bytes(db_path),
        events: summary.counts.clone(),
        oldest_ts: summary.oldest_ts,
        newest_ts: summary.newest_ts,
        disk_free_bytes: disk::free_bytes(db_path.parent().unwrap_or(db_path))
            .map_err(ApiError::internal)?,
        recorder_modes,
    }))
}

async fn endpoint_size(State(state): State<Arc<AgentState>>) -> Result<Json<DbSize>, ApiError> {
    let db_path = state.db.path();
    Ok(Json(DbSize {
        db_bytes: super::staging::db_bytes(db_path),
        disk_free_bytes: disk::free_bytes(db_path.parent().unwrap_or(db_path))
            .map_err(ApiError::internal)?,
    }))
}

/// `GET /v1/events?type=…&where=…&where=…&any=true&since=…&until=…&sort=…&limit=…&cursor=…`
async fn events(
    State(state): State<Arc<AgentState>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let params = EventParams::parse(raw.as_deref().unwrap_or(""))?;
    let q = params.to_query()?;
    let page = with_reader(&state, move |c| {
        query::query_events(c, &q).map_err(query_error)
    })
    .await?;
    Ok(Json(page).into_response())
}

/// The raw query string of an events request; `where` may repeat.
#[derive(Default, Debug)]
pub struct EventParams {
    pub event_type: Option<String>,
    pub wheres: Vec<String>,
    pub any: bool,
    pub since: Option<String>,
    pub until: Option<String>,
    pub sort: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

impl EventParams {
    pub fn parse(raw: &str) -> Result<Self, ApiError> {
        let mut p = EventParams::default();
        for (key, value) in form_urlencoded::parse(raw.as_bytes()) {
            let value = value.into_owned();
            match key.as_ref() {
                "type" => p.event_type = Some(value),
                "where" => p.wheres.push(value),
                "any" => p.any = matches!(value.as_str(), "true" | "1" | ""),
                "since" => p.since = Some(value),
                "until" => p.until = Some(value),
                "sort" => p.sort = Some(value),
                "limit" => p.limit = Some(value),
                "cursor" => p.cursor = Some(value),
                other => {
                    return Err(ApiError::bad_request(format!(
                        "unknown parameter `{other}`; valid: type, where, any, since, until, sort, limit, cursor"
                    )));
                }
            }
        }
        Ok(p)
    }

    /// The same request as a query string, for forwarding it to an agent.
    pub fn to_query_string(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        let pairs = [
            ("type", &self.event_type),
            ("since", &self.since),
            ("until", &self.until),
            ("sort", &self.sort),
            ("limit", &self.limit),
            ("cursor", &self.cursor),
        ];
        for (key, value) in pairs {
            if let Some(v) = value {
                q.append_pair(key, v);
            }
        }
        for w in &self.wheres {
            q.append_pair("where", w);
        }
        if self.any {
            q.append_pair("any", "true");
        }
        q.finish()
    }

    /// Validates the request with the one query engine (the same errors everywhere).
    pub fn to_query(&self) -> Result<EventQuery, ApiError> {
        let limit = match &self.limit {
            None => None,
            Some(l) => Some(l.parse::<u32>().map_err(|_| {
                ApiError::bad_request(format!("limit must be a whole number, got {l:?}"))
            })?),
        };
        EventQuery::parse(
            self.event_type.as_deref().unwrap_or("process"),
            &self.wheres,
            self.any,
            self.since.as_deref(),
            self.until.as_deref(),
            self.sort.as_deref(),
            limit,
            self.cursor.as_deref(),
        )
        .map_err(query_error)
    }
}

async fn summary(State(state): State<Arc<AgentState>>) -> Result<Response, ApiError> {
    let summary = with_reader(&state, |c| query::summary(c).map_err(query_error)).await?;
    Ok(Json(summary).into_response())
}

async fn process_tree(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("process id must be an integer, got {id:?}")))?;
    let tree = with_reader(&state, move |c| {
        query::process_tree(c, id).map_err(query_error)
    })
    .await?;
    Ok(Json(tree).into_response())
}

async fn stage(State(state): State<Arc<AgentState>>) -> Result<Response, ApiError> {
    match state.staging.stage().await {
        Ok(staged) => Ok((StatusCode::CREATED, Json(staged)).into_response()),
        Err(e @ StageError::InsufficientDisk { need, free, .. }) => Ok((
            StatusCode::INSUFFICIENT_STORAGE,
            Json(serde_json::json!({
                "error": e.to_string(), "need_bytes": need, "free_bytes": free
            })),
        )
            .into_response()),
        Err(StageError::Other(e)) => Err(e.into()),
    }
}

async fn list_staged(State(state): State<Arc<AgentState>>) -> Response {
    Json(state.staging.list()).into_response()
}

fn unknown_snapshot(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "no staged snapshot {id:?} on this endpoint (it may have expired); stage a new one"
    ))
}

async fn download_staged(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (staged, path, written) = state
        .staging
        .get(&id)
        .ok_or_else(|| unknown_snapshot(&id))?;
    if staged.state == StagedState::Failed {
        return Err(failed_staging(&staged));
    }
    let growing = written.map(|written| Growing {
        size: staged.size,
        written,
    });
    serve_file(&path, &staged.id, &headers, growing).await
}

fn failed_staging(staged: &Staged) -> ApiError {
    ApiError::not_found(format!(
        "staging {} failed: {}; stage a new one",
        staged.id,
        staged.error.as_deref().unwrap_or("unknown error")
    ))
}

/// The longest `GET /v1/snapshots/{id}/info?wait_ms=` waits for a copy to finish.
const MAX_INFO_WAIT: Duration = Duration::from_secs(60);

/// A staging's state; with `wait_ms`, waits that long (at most a minute) for it to stop copying.
async fn staged_info(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Staged>, ApiError> {
    let wait = match params.get("wait_ms") {
        None => Duration::ZERO,
        Some(ms) => ms.parse().map(Duration::from_millis).map_err(|_| {
            ApiError::bad_request(format!(
                "wait_ms must be a number of milliseconds, not {ms:?}"
            ))
        })?,
    };
    state
        .staging
        .settled(&id, wait.min(MAX_INFO_WAIT))
        .await
        .map(Json)
        .ok_or_else(|| unknown_snapshot(&id))
}

async fn delete_staged(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state.staging.delete(&id) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(unknown_snapshot(&id))
    }
}
