//! Fleet captures on the server side: the batch and schedule routes, `snapshots keep|unkeep`,
//! the scheduler that turns cron ticks into batches, and the start-up sweep that gives every
//! unfinished batch its fleet job.
//!
//! Who may do what: a batch or a schedule belongs to its computer group. Admins see and steer
//! every one; other users see those of the groups granted to them (viewers look, operators
//! create, pause, resume, cancel, remove and run), and everything else answers 404 like a
//! missing id. So an operator can batch only groups within their access, and every endpoint a
//! batch captures is one they may capture anyway.
//!
//! The scheduler: every second, for each schedule that is not paused, the latest tick at or
//! before now that is newer than the last one handled becomes exactly one batch, keyed by
//! (schedule, tick time) in the catalog, also across restarts. A tick missed while the server
//! was down runs once at start-up if it is still within the schedule's expiry (older ones are
//! let go); a tick while the schedule's previous batch still runs is recorded as a `skipped`
//! batch with that reason.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use snapq_core::access::Role;
use snapq_core::catalog::{Snapshot, now_ms};
use snapq_core::fleet::{Batch, BatchItem, BatchTotals, NewBatch, Schedule, state};
use snapq_core::schedule::{CronSchedule, FailureLimit};
use snapq_jobs::handlers::fleet::{FleetArgs, job_key};
use snapq_jobs::{EnqueueOptions, JobId, JobKind, JobState};

use super::ServerState;
use super::access::{Access, Operate, Scoped, View};
use super::api::{ApiRoute, Auth};
use super::openapi::ErrorBody;
use crate::http::ApiError;

/// A batch's default expiry, and a schedule's.
pub const DEFAULT_EXPIRE_SECS: u64 = 3600;
/// A batch's default concurrency.
pub const DEFAULT_MAX_CONCURRENCY: u32 = 16;

/// The OpenAPI description of this module's routes (assembled in [`super::openapi`]).
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    list_batches,
    create_batch,
    show_batch,
    pause_batch,
    resume_batch,
    cancel_batch,
    list_schedules,
    add_schedule,
    show_schedule,
    remove_schedule,
    pause_schedule,
    resume_schedule,
    run_schedule,
    keep_snapshot,
    unkeep_snapshot
))]
pub(super) struct Doc;

pub(super) fn routes() -> Vec<ApiRoute> {
    use super::api::route as r;
    use Auth::User;
    vec![
        r(Method::GET, "/v1/fleet/batches", User, list_batches),
        r(Method::POST, "/v1/fleet/batches", User, create_batch),
        r(Method::GET, "/v1/fleet/batches/{id}", User, show_batch),
        r(
            Method::POST,
            "/v1/fleet/batches/{id}/pause",
            User,
            pause_batch,
        ),
        r(
            Method::POST,
            "/v1/fleet/batches/{id}/resume",
            User,
            resume_batch,
        ),
        r(
            Method::POST,
            "/v1/fleet/batches/{id}/cancel",
            User,
            cancel_batch,
        ),
        r(Method::GET, "/v1/schedules", User, list_schedules),
        r(Method::POST, "/v1/schedules", User, add_schedule),
        r(Method::GET, "/v1/schedules/{name}", User, show_schedule),
        r(
            Method::DELETE,
            "/v1/schedules/{name}",
            User,
            remove_schedule,
        ),
        r(
            Method::POST,
            "/v1/schedules/{name}/pause",
            User,
            pause_schedule,
        ),
        r(
            Method::POST,
            "/v1/schedules/{name}/resume",
            User,
            resume_schedule,
        ),
        r(Method::POST, "/v1/schedules/{name}/run", User, run_schedule),
        r(Method::POST, "/v1/snapshots/{id}/keep", User, keep_snapshot),
        r(
            Method::POST,
            "/v1/snapshots/{id}/unkeep",
            User,
            unkeep_snapshot,
        ),
    ]
}

/// A batch as listings and `fleet show` print it.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchView {
    #[serde(flatten)]
    #[schema(inline)]
    pub batch: Batch,
    pub totals: BatchTotals,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<BatchItem>>,
}

async fn batch_view(state: &ServerState, batch: Batch, items: bool) -> Result<BatchView, ApiError> {
    let totals = state
        .catalog
        .batch_totals(batch.id)
        .await
        .map_err(ApiError::internal)?;
    let items = if items {
        Some(
            state
                .catalog
                .batch_items(batch.id)
                .await
                .map_err(ApiError::internal)?,
        )
    } else {
        None
    };
    Ok(BatchView {
        batch,
        totals,
        items,
    })
}

/// Visible batches, newest first (only running and paused ones with `active`).
pub(super) async fn visible_batches(
    access: &Access,
    state: &ServerState,
    active: bool,
    limit: u32,
) -> Result<Vec<BatchView>, ApiError> {
    let granted = access.granted_groups().await?;
    let batches = state
        .catalog
        .batches(active, limit)
        .await
        .map_err(ApiError::internal)?;
    let mut out = Vec::new();
    for b in batches {
        if granted.as_ref().is_none_or(|g| g.contains(&b.group_name)) {
            out.push(batch_view(state, b, false).await?);
        }
    }
    Ok(out)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct BatchListParams {
    #[serde(default)]
    active: bool,
    limit: Option<u32>,
}

/// Fleet batches the caller sees, newest first.
#[utoipa::path(
    get,
    path = "/v1/fleet/batches",
    params(BatchListParams),
    responses((status = 200, description = "batches with their totals", body = [BatchView])),
)]
async fn list_batches(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Query(params): Query<BatchListParams>,
) -> Result<Response, ApiError> {
    let limit = params.limit.unwrap_or(100).clamp(1, 10_000);
    let list = visible_batches(&access, &state, params.active, limit).await?;
    Ok(Json(list).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
struct BatchRequest {
    #[schema(example = "demo")]
    group: String,
    max_concurrency: Option<u32>,
    expire_secs: Option<u64>,
    failure_limit: Option<String>,
}

/// Checks the shared knobs of a batch and a schedule: (concurrency, expiry, failure limit).
fn batch_knobs(
    max_concurrency: Option<u32>,
    expire_secs: Option<u64>,
    failure_limit: Option<&str>,
) -> Result<(u32, u64, Option<String>), ApiError> {
    let max = max_concurrency.unwrap_or(DEFAULT_MAX_CONCURRENCY);
    if max == 0 {
        return Err(ApiError::bad_request(
            "max_concurrency must be at least 1 (captures running at once for this batch)",
        ));
    }
    let expire = expire_secs.unwrap_or(DEFAULT_EXPIRE_SECS);
    if expire == 0 {
        return Err(ApiError::bad_request(
            "expire must be positive: how long offline endpoints are waited for",
        ));
    }
    let limit = failure_limit
        .map(FailureLimit::parse)
        .transpose()
        .map_err(|e| ApiError::bad_request(e.0))?
        .map(|l| l.to_string());
    Ok((max, expire, limit))
}

/// `POST /v1/fleet/batches {"group": G, ...}`: a batch of every endpoint of G now.
#[utoipa::path(
    post,
    path = "/v1/fleet/batches",
    request_body = BatchRequest,
    responses(
        (status = 202, description = "`{\"batch_id\", \"job_id\", \"group\"}`", body = Object),
    ),
)]
async fn create_batch(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Json(request): Json<BatchRequest>,
) -> Result<Response, ApiError> {
    let group = access.group(&request.group, Role::Operator).await?;
    let (max, expire, limit) = batch_knobs(
        request.max_concurrency,
        request.expire_secs,
        request.failure_limit.as_deref(),
    )?;
    let new = NewBatch {
        group_name: group.name.clone(),
        schedule: None,
        max_concurrency: max,
        expire_at_ms: now_ms() + (expire as i64) * 1000,
        failure_limit: limit,
        requested_by: access.name().to_owned(),
    };
    let (id, job) = start_batch(&state, &new)
        .await?
        .ok_or_else(|| ApiError::internal("a manual batch has no tick to collide with"))?;
    state
        .audit(
            access.name(),
            "fleet.capture",
            &format!("group {}", group.name),
            "queued",
            Some(&format!("batch {id}, job {job}")),
        )
        .await;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "batch_id": id, "job_id": job.as_str(), "group": group.name })),
    )
        .into_response())
}

/// Creates a running batch and its fleet job. `None` when a schedule's tick already has its
/// batch (created by another node or before a restart).
pub(super) async fn start_batch(
    state: &ServerState,
    new: &NewBatch,
) -> Result<Option<(i64, JobId)>, ApiError> {
    let Some(id) = state
        .catalog
        .create_batch(new, state::RUNNING, None)
        .await
        .map_err(ApiError::internal)?
    else {
        return Ok(None);
    };
    let job = ensure_fleet_job(state, id, &new.requested_by)
        .await
        .map_err(ApiError::internal)?;
    Ok(Some((id, job)))
}

/// The batch's fleet job, enqueued once by its key; a job that died is run again.
async fn ensure_fleet_job(
    state: &ServerState,
    batch_id: i64,
    requested_by: &str,
) -> anyhow::Result<JobId> {
    let options = EnqueueOptions {
        idempotency_key: Some(job_key(batch_id)),
        ..EnqueueOptions::default()
    };
    let enqueued = state
        .queue
        .enqueue_with(
            JobKind::Fleet,
            &FleetArgs { batch_id },
            requested_by,
            &options,
        )
        .await?;
    if !enqueued.created {
        let job = state.queue.show(&enqueued.id).await?;
        if job.job.state == JobState::Failed {
            state.queue.retry(&enqueued.id).await?;
        }
    }
    state
        .catalog
        .set_batch_job(batch_id, enqueued.id.as_str())
        .await?;
    Ok(enqueued.id)
}

/// At start-up: every running or paused batch has its fleet job (a crash may have come between
/// the batch row and its enqueue).
pub(super) async fn recover_batches(state: &ServerState) -> anyhow::Result<()> {
    for batch in state.catalog.batches(true, 100_000).await? {
        if batch.job_id.is_none() {
            ensure_fleet_job(state, batch.id, &batch.requested_by).await?;
        }
    }
    Ok(())
}

/// A batch with its totals and items.
#[utoipa::path(
    get,
    path = "/v1/fleet/batches/{id}",
    params(("id" = i64, Path, description = "batch id", example = 1)),
    responses((status = 200, description = "the batch with its items", body = BatchView)),
)]
async fn show_batch(
    State(state): State<Arc<ServerState>>,
    Scoped { target, .. }: Scoped<Batch, View>,
) -> Result<Response, ApiError> {
    Ok(Json(batch_view(&state, target, true).await?).into_response())
}

fn conflict(message: String) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, message)
}

/// A batch action on a batch in a state it does not apply to (`batch_action`).
#[derive(utoipa::IntoResponses)]
#[response(
    status = 409,
    description = "the batch is not in a state this action applies to"
)]
#[allow(dead_code)] // only its response is used
struct StateConflict(ErrorBody);

/// Pauses a running batch: no new captures start.
#[utoipa::path(
    post,
    path = "/v1/fleet/batches/{id}/pause",
    params(("id" = i64, Path, description = "batch id", example = 1)),
    responses(
        (status = 200, description = "`{\"batch_id\", \"action\"}`", body = Object),
        StateConflict,
    ),
)]
async fn pause_batch(
    State(state): State<Arc<ServerState>>,
    Scoped { access, target, .. }: Scoped<Batch, Operate>,
) -> Result<Response, ApiError> {
    let reason = format!(
        "paused by {}; `snapq fleet resume {}` goes on",
        access.name(),
        target.id
    );
    let done = state
        .catalog
        .set_batch_state(target.id, &[state::RUNNING], state::PAUSED, Some(&reason))
        .await
        .map_err(ApiError::internal)?;
    batch_action(&state, &access, &target, "pause", done).await
}

/// Resumes a paused batch.
#[utoipa::path(
    post,
    path = "/v1/fleet/batches/{id}/resume",
    params(("id" = i64, Path, description = "batch id", example = 1)),
    responses(
        (status = 200, description = "`{\"batch_id\", \"action\"}`", body = Object),
        StateConflict,
    ),
)]
async fn resume_batch(
    State(state): State<Arc<ServerState>>,
    Scoped { access, target, .. }: Scoped<Batch, Operate>,
) -> Result<Response, ApiError> {
    let done = state
        .catalog
        .resume_batch(target.id)
        .await
        .map_err(ApiError::internal)?;
    batch_action(&state, &access, &target, "resume", done).await
}

/// Cancels a running or paused batch and its pending captures.
#[utoipa::path(
    post,
    path = "/v1/fleet/batches/{id}/cancel",
    params(("id" = i64, Path, description = "batch id", example = 1)),
    responses(
        (status = 200, description = "`{\"batch_id\", \"action\"}`", body = Object),
        StateConflict,
    ),
)]
async fn cancel_batch(
    State(state): State<Arc<ServerState>>,
    Scoped { access, target, .. }: Scoped<Batch, Operate>,
) -> Result<Response, ApiError> {
    let done = state
        .catalog
        .request_batch_cancel(target.id)
        .await
        .map_err(ApiError::internal)?;
    batch_action(&state, &access, &target, "cancel", done).await
}

async fn batch_action(
    state: &ServerState,
    access: &Access,
    batch: &Batch,
    action: &str,
    done: bool,
) -> Result<Response, ApiError> {
    let target = format!("batch {}", batch.id);
    state
        .audit(
            access.name(),
            &format!("fleet.{action}"),
            &target,
            if done { "ok" } else { "refused" },
            None,
        )
        .await;
    if !done {
        let now = state
            .catalog
            .batch(batch.id)
            .await
            .map_err(ApiError::internal)?
            .map(|b| b.state)
            .unwrap_or_default();
        return Err(conflict(format!(
            "batch {} is {now}; only {} batches can be {}",
            batch.id,
            match action {
                "resume" => "paused",
                "pause" => "running",
                _ => "running or paused",
            },
            match action {
                "pause" => "paused",
                "resume" => "resumed",
                _ => "cancelled",
            }
        )));
    }
    Ok(Json(serde_json::json!({ "batch_id": batch.id, "action": action })).into_response())
}

// --- schedules -----------------------------------------------------------------------------------

/// A schedule as listings show it: its next tick in its zone and in UTC, its last batch.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScheduleView {
    #[serde(flatten)]
    #[schema(inline)]
    pub schedule: Schedule,
    pub next_run_utc: Option<String>,
    pub next_run_local: Option<String>,
    pub last_batch: Option<Batch>,
}

async fn schedule_view(state: &ServerState, s: Schedule) -> Result<ScheduleView, ApiError> {
    let next = CronSchedule::parse(&s.cron, &s.tz)
        .ok()
        .and_then(|c| c.next_after(Utc::now()).map(|t| (c, t)));
    let (last, _) = state
        .catalog
        .schedule_batches(s.id)
        .await
        .map_err(ApiError::internal)?;
    Ok(ScheduleView {
        next_run_utc: next
            .as_ref()
            .map(|(_, t)| t.format("%Y-%m-%d %H:%M UTC").to_string()),
        next_run_local: next.as_ref().map(|(c, t)| c.local_text(*t)),
        last_batch: last,
        schedule: s,
    })
}

/// Schedules the caller sees, with their next run and last batch.
#[utoipa::path(
    get,
    path = "/v1/schedules",
    responses((status = 200, description = "schedules", body = [ScheduleView])),
)]
async fn list_schedules(
    access: Access,
    State(state): State<Arc<ServerState>>,
) -> Result<Response, ApiError> {
    let granted = access.granted_groups().await?;
    let mut out = Vec::new();
    for s in state
        .catalog
        .schedules()
        .await
        .map_err(ApiError::internal)?
    {
        if granted.as_ref().is_none_or(|g| g.contains(&s.group_name)) {
            out.push(schedule_view(&state, s).await?);
        }
    }
    Ok(Json(out).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
struct ScheduleRequest {
    #[schema(example = "nightly")]
    name: String,
    #[schema(example = "0 2 * * *")]
    cron: String,
    #[schema(example = "UTC")]
    tz: Option<String>,
    #[schema(example = "demo")]
    group: String,
    max_concurrency: Option<u32>,
    expire_secs: Option<u64>,
    failure_limit: Option<String>,
    keep_last: Option<u32>,
    keep_days: Option<u32>,
}

/// Adds a schedule: a cron expression in a time zone, a computer group, the batch knobs and retention.
#[utoipa::path(
    post,
    path = "/v1/schedules",
    request_body = ScheduleRequest,
    responses(
        (status = 201, description = "the schedule", body = ScheduleView),
        (status = 409, description = "a schedule of that name exists", body = ErrorBody),
    ),
)]
async fn add_schedule(
    access: Access,
    State(state): State<Arc<ServerState>>,
    Json(r): Json<ScheduleRequest>,
) -> Result<Response, ApiError> {
    let group = access.group(&r.group, Role::Operator).await?;
    snapq_core::access::validate_name("schedule", &r.name)
        .map_err(|e| ApiError::bad_request(e.0))?;
    let tz = r.tz.clone().unwrap_or_else(|| "UTC".into());
    let cron = CronSchedule::parse(&r.cron, &tz).map_err(|e| ApiError::bad_request(e.0))?;
    let (max, expire, limit) =
        batch_knobs(r.max_concurrency, r.expire_secs, r.failure_limit.as_deref())?;
    if r.keep_last.is_some() && r.keep_days.is_some() {
        return Err(ApiError::bad_request(
            "give one keep rule: keep_last or keep_days, not both",
        ));
    }
    if r.keep_last == Some(0) || r.keep_days == Some(0) {
        return Err(ApiError::bad_request(
            "a keep rule of 0 would delete every snapshot; keep at least 1",
        ));
    }
    let schedule = Schedule {
        id: 0,
        name: r.name.clone(),
        cron: cron.expr().to_owned(),
        tz: cron.zone().to_owned(),
        group_name: group.name.clone(),
        max_concurrency: max as i64,
        expire_secs: expire as i64,
        failure_limit: limit,
        keep_last: r.keep_last.map(i64::from),
        keep_days: r.keep_days.map(i64::from),
        paused: false,
        created_by: access.name().to_owned(),
        created_ms: 0,
        last_tick_ms: None,
    };
    let added = state
        .catalog
        .add_schedule(&schedule)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| {
            conflict(format!(
                "a schedule named {} exists; remove it first to redefine it",
                r.name
            ))
        })?;
    state
        .audit(
            access.name(),
            "schedule.add",
            &r.name,
            "ok",
            Some(&format!(
                "{} {} group {}",
                added.cron, added.tz, added.group_name
            )),
        )
        .await;
    Ok((
        StatusCode::CREATED,
        Json(schedule_view(&state, added).await?),
    )
        .into_response())
}

/// A schedule and its recent batches.
#[utoipa::path(
    get,
    path = "/v1/schedules/{name}",
    params(("name" = String, Path, description = "schedule name")),
    responses((status = 200, description = "`{\"schedule\", \"batches\"}`", body = Object)),
)]
async fn show_schedule(
    State(state): State<Arc<ServerState>>,
    Scoped { target, .. }: Scoped<Schedule, View>,
) -> Result<Response, ApiError> {
    let batches = state
        .catalog
        .batches_of_schedule(target.id, 20)
        .await
        .map_err(ApiError::internal)?;
    let view = schedule_view(&state, target).await?;
    Ok(Json(serde_json::json!({ "schedule": view, "batches": batches })).into_response())
}

/// Removes a schedule; its batches stay.
#[utoipa::path(
    delete,
    path = "/v1/schedules/{name}",
    params(("name" = String, Path, description = "schedule name")),
    responses((status = 200, description = "`{\"removed\": name}`", body = Object)),
)]
async fn remove_schedule(
    State(state): State<Arc<ServerState>>,
    Scoped { access, target, .. }: Scoped<Schedule, Operate>,
) -> Result<Response, ApiError> {
    let removed = state
        .catalog
        .remove_schedule(&target.name)
        .await
        .map_err(ApiError::internal)?;
    state
        .audit(
            access.name(),
            "schedule.remove",
            &target.name,
            if removed { "ok" } else { "refused" },
            None,
        )
        .await;
    Ok(Json(serde_json::json!({ "removed": target.name })).into_response())
}

/// Pauses a schedule: its ticks are skipped.
#[utoipa::path(
    post,
    path = "/v1/schedules/{name}/pause",
    params(("name" = String, Path, description = "schedule name")),
    responses((status = 200, description = "`{\"schedule\", \"paused\"}`", body = Object)),
)]
async fn pause_schedule(
    State(state): State<Arc<ServerState>>,
    Scoped { access, target, .. }: Scoped<Schedule, Operate>,
) -> Result<Response, ApiError> {
    set_paused(&state, &access, &target, true).await
}

/// Resumes a paused schedule.
#[utoipa::path(
    post,
    path = "/v1/schedules/{name}/resume",
    params(("name" = String, Path, description = "schedule name")),
    responses((status = 200, description = "`{\"schedule\", \"paused\"}`", body = Object)),
)]
async fn resume_schedule(
    State(state): State<Arc<ServerState>>,
    Scoped { access, target, .. }: Scoped<Schedule, Operate>,
) -> Result<Response, ApiError> {
    set_paused(&state, &access, &target, false).await
}

async fn set_paused(
    state: &ServerState,
    access: &Access,
    schedule: &Schedule,
    paused: bool,
) -> Result<Response, ApiError> {
    state
        .catalog
        .set_schedule_paused(&schedule.name, paused)
        .await
        .map_err(ApiError::internal)?;
    if !paused {
        // Ticks that passed while paused are not run afterwards.
        state
            .catalog
            .set_schedule_tick(schedule.id, now_ms())
            .await
            .map_err(ApiError::internal)?;
    }
    let action = if paused { "pause" } else { "resume" };
    state
        .audit(
            access.name(),
            &format!("schedule.{action}"),
            &schedule.name,
            "ok",
            None,
        )
        .await;
    Ok(Json(serde_json::json!({ "schedule": schedule.name, "paused": paused })).into_response())
}

/// `POST /v1/schedules/{name}/run`: a tick now.
#[utoipa::path(
    post,
    path = "/v1/schedules/{name}/run",
    params(("name" = String, Path, description = "schedule name")),
    responses(
        (
            status = 202,
            description = "the tick's batch (`skipped` while the previous one runs; `null` when this tick already has one)",
            body = Option<Batch>,
        ),
    ),
)]
async fn run_schedule(
    State(state): State<Arc<ServerState>>,
    Scoped { access, target, .. }: Scoped<Schedule, Operate>,
) -> Result<Response, ApiError> {
    let batch = tick(&state, &target, now_ms(), access.name()).await?;
    state
        .audit(
            access.name(),
            "schedule.run",
            &target.name,
            batch.as_ref().map_or("refused", |b| b.state.as_str()),
            batch.as_ref().map(|b| format!("batch {}", b.id)).as_deref(),
        )
        .await;
    let batch = batch.ok_or_else(|| conflict("this tick already has its batch".into()))?;
    Ok((StatusCode::ACCEPTED, Json(batch)).into_response())
}

/// One tick of a schedule: a batch, or a batch recorded `skipped` when the previous one still
/// runs. `None` when this tick already has its batch.
async fn tick(
    state: &ServerState,
    schedule: &Schedule,
    tick_ms: i64,
    requested_by: &str,
) -> Result<Option<Batch>, ApiError> {
    let new = NewBatch {
        group_name: schedule.group_name.clone(),
        schedule: Some((schedule.id, schedule.name.clone(), tick_ms)),
        max_concurrency: schedule.max_concurrency.max(1) as u32,
        expire_at_ms: tick_ms + schedule.expire_secs.max(1) * 1000,
        failure_limit: schedule.failure_limit.clone(),
        requested_by: requested_by.to_owned(),
    };
    let (_, running) = state
        .catalog
        .schedule_batches(schedule.id)
        .await
        .map_err(ApiError::internal)?;
    let id = match running {
        Some(previous) => {
            let reason = format!(
                "skipped: the previous batch {} of schedule {} was still {}",
                previous.id, schedule.name, previous.state
            );
            state
                .catalog
                .create_batch(&new, state::SKIPPED, Some(&reason))
                .await
                .map_err(ApiError::internal)?
        }
        None => start_batch(state, &new).await?.map(|(id, _)| id),
    };
    state
        .catalog
        .set_schedule_tick(schedule.id, tick_ms)
        .await
        .map_err(ApiError::internal)?;
    match id {
        Some(id) => state.catalog.batch(id).await.map_err(ApiError::internal),
        None => Ok(None),
    }
}

/// The scheduler: turns due ticks into batches until the server stops.
pub(super) async fn run_scheduler(state: Arc<ServerState>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Err(e) = scheduler_pass(&state).await {
            tracing::warn!(error = %e.message, "scheduler pass failed; trying again");
        }
    }
}

async fn scheduler_pass(state: &ServerState) -> Result<(), ApiError> {
    let now = Utc::now();
    for s in state
        .catalog
        .schedules()
        .await
        .map_err(ApiError::internal)?
    {
        if s.paused {
            continue;
        }
        let Ok(cron) = CronSchedule::parse(&s.cron, &s.tz) else {
            continue;
        };
        let Some(due) = cron.latest_at_or_before(now) else {
            continue;
        };
        let due_ms = due.timestamp_millis();
        if due_ms <= s.last_tick_ms.unwrap_or(s.created_ms) {
            continue;
        }
        let late_ms = now.timestamp_millis() - due_ms;
        if late_ms > s.expire_secs.max(1) * 1000 {
            // Missed while the server was down, and too old to be worth running now.
            tracing::info!(schedule = %s.name, tick = %due, "a missed tick is past its expiry; not running it");
            state
                .audit(
                    "scheduler",
                    "schedule.tick",
                    &s.name,
                    "missed",
                    Some(&format!("tick {due} was missed and is past its expiry")),
                )
                .await;
            state
                .catalog
                .set_schedule_tick(s.id, due_ms)
                .await
                .map_err(ApiError::internal)?;
            continue;
        }
        let actor = format!("schedule:{}", s.name);
        if let Some(batch) = tick(state, &s, due_ms, &actor).await? {
            tracing::info!(schedule = %s.name, batch = batch.id, state = %batch.state, "schedule ticked");
            state
                .audit(
                    "scheduler",
                    "schedule.tick",
                    &s.name,
                    &batch.state,
                    Some(&format!("batch {}", batch.id)),
                )
                .await;
        }
    }
    Ok(())
}

// --- keep ----------------------------------------------------------------------------------------

/// Keeps a snapshot: retention never deletes it.
#[utoipa::path(
    post,
    path = "/v1/snapshots/{id}/keep",
    params(("id" = i64, Path, description = "snapshot id", example = 1)),
    responses(
        (status = 200, description = "`{\"snapshot_id\", \"keep\", \"changed\"}`", body = Object),
    ),
)]
async fn keep_snapshot(
    State(state): State<Arc<ServerState>>,
    Scoped { access, target, .. }: Scoped<Snapshot, Operate>,
) -> Result<Response, ApiError> {
    set_keep(&state, &access, &target, true).await
}

/// Lets retention delete a kept snapshot again.
#[utoipa::path(
    post,
    path = "/v1/snapshots/{id}/unkeep",
    params(("id" = i64, Path, description = "snapshot id", example = 1)),
    responses(
        (status = 200, description = "`{\"snapshot_id\", \"keep\", \"changed\"}`", body = Object),
    ),
)]
async fn unkeep_snapshot(
    State(state): State<Arc<ServerState>>,
    Scoped { access, target, .. }: Scoped<Snapshot, Operate>,
) -> Result<Response, ApiError> {
    set_keep(&state, &access, &target, false).await
}

async fn set_keep(
    state: &ServerState,
    access: &Access,
    snap: &Snapshot,
    keep: bool,
) -> Result<Response, ApiError> {
    let changed = if keep {
        state.catalog.keep_snapshot(snap.id, access.name()).await
    } else {
        state.catalog.unkeep_snapshot(snap.id).await
    }
    .map_err(ApiError::internal)?;
    let action = if keep {
        "snapshot.keep"
    } else {
        "snapshot.unkeep"
    };
    let target = snap
        .name
        .clone()
        .unwrap_or_else(|| format!("snapshot {}", snap.id));
    state
        .audit(
            access.name(),
            action,
            &target,
            if changed { "ok" } else { "unchanged" },
            None,
        )
        .await;
    Ok(
        Json(serde_json::json!({ "snapshot_id": snap.id, "keep": keep, "changed": changed }))
            .into_response(),
    )
}
