//! The `fleet` job: one batch, from "capture every endpoint of group G" to an end state with a
//! reason.
//!
//! Fix the group's members into the batch's items (once) → then, every tick until nothing is
//! queued or running: settle items whose capture ended (done with its bytes, or failed with the
//! capture's error) → end the batch if a user cancelled it or its group was removed → skip what
//! is still queued once the batch expired → pause the batch when its failures pass the limit →
//! start captures of queued endpoints that are online, up to the batch's concurrency → report
//! progress. An item gets its snapshot row and its running state in one transaction, and its
//! capture job the key `fleet:<batch>:<endpoint>:<snapshot>`, so after a crash at any point (the
//! job is simply run again) no endpoint is captured twice for one batch. A capture that failed
//! while its endpoint went offline does not fail the item: it waits for the endpoint again. Captures are ordinary capture
//! jobs with their own retries and resume; this job only starts and watches them. A scheduled
//! batch with a keep rule prunes its endpoints' older snapshots at the end, through delete jobs.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use snapq_core::catalog::{SnapshotState, now_ms};
use snapq_core::fleet::{Batch, BatchTotals, item, state};
use snapq_core::schedule::FailureLimit;

use super::Services;
use super::delete::DeleteArgs;
use crate::{EnqueueOptions, JobArgs, JobContext, JobError, JobId, JobKind, ResultExt};

/// Run batch `batch_id` (created `running` by whoever enqueued the job).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FleetArgs {
    pub batch_id: i64,
}

impl JobArgs for FleetArgs {
    const KIND: JobKind = JobKind::Fleet;
}

/// What a batch needs to know beyond its row.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// An endpoint is online when its last heartbeat is younger than this.
    pub online_window: Duration,
    /// How often a running batch looks at its captures.
    pub tick: Duration,
}

impl Default for FleetSettings {
    fn default() -> Self {
        Self {
            online_window: Duration::from_secs(45),
            tick: Duration::from_millis(250),
        }
    }
}

/// The idempotency key of a batch's fleet job.
pub fn job_key(batch_id: i64) -> String {
    format!("fleet-batch:{batch_id}")
}

/// The idempotency key of one endpoint's capture job in a batch: one job per snapshot row the
/// batch made for it.
fn capture_key(batch_id: i64, endpoint_id: i64, snapshot_id: i64) -> String {
    format!("fleet:{batch_id}:{endpoint_id}:{snapshot_id}")
}

#[tracing::instrument(skip(svc, ctx), fields(job_id = %ctx.id(), batch = args.batch_id))]
pub async fn run(svc: Arc<Services>, args: FleetArgs, ctx: JobContext) -> Result<(), JobError> {
    let id = args.batch_id;
    let mut errors = 0u32;
    // A capture of this node ending frees a slot of the batch at once; the tick covers those
    // that end on other nodes.
    let mut events = svc.queue.events();
    loop {
        match step(&svc, id, &ctx).await {
            Ok(true) => return Ok(()),
            Ok(false) => errors = 0,
            // A busy catalog or queue for a moment must not end a batch that runs for hours.
            Err(e) if e.is_transient() && errors < 40 => {
                errors += 1;
                tracing::info!(error = %e.message(), "fleet step failed; trying again");
            }
            Err(e) => return Err(e),
        }
        if ctx.is_cancelled() {
            // The queue ends this job `cancelled`; its terminal hook ends the batch.
            let _ = step(&svc, id, &ctx).await;
            return Err(JobError::permanent("cancelled"));
        }
        tokio::select! {
            _ = tokio::time::sleep(svc.fleet.tick) => {}
            _ = capture_ended(&mut events) => {}
            _ = ctx.cancelled() => {}
        }
    }
}

/// Returns when a capture job run by this process reaches an outcome (or events were missed).
async fn capture_ended(events: &mut tokio::sync::broadcast::Receiver<crate::JobEvent>) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match events.recv().await {
            Ok(e) if e.kind == JobKind::Capture && e.state.is_finished() => return,
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => return,
            Err(RecvError::Closed) => std::future::pending().await,
        }
    }
}

/// One look at the batch; `true` once it has ended.
async fn step(svc: &Services, id: i64, ctx: &JobContext) -> Result<bool, JobError> {
    let catalog = &svc.catalog;
    let batch = catalog
        .batch(id)
        .await
        .transient()?
        .ok_or_else(|| JobError::permanent(format!("batch {id} no longer exists")))?;
    if batch.is_finished() {
        return Ok(true);
    }
    let group = catalog.group(&batch.group_name).await.transient()?;
    if !batch.resolved {
        let Some(group) = &group else {
            let reason = format!(
                "group {} does not exist (removed before the batch started)",
                batch.group_name
            );
            end(svc, &batch, state::CANCELLED, &reason).await?;
            return Ok(true);
        };
        let members: Vec<(i64, String)> = catalog
            .members(&group.rules)
            .await
            .transient()?
            .into_iter()
            .map(|e| (e.id, e.hostname))
            .collect();
        catalog.resolve_batch(id, &members).await.transient()?;
        tracing::debug!(endpoints = members.len(), "batch members fixed");
    }

    settle(svc, &batch).await?;

    if batch.cancel_requested || ctx.is_cancelled() {
        let reason = format!("cancelled by {}", cancelled_by(&batch, ctx));
        stop(svc, &batch, state::CANCELLED, &reason, true).await?;
    } else if group.is_none() {
        let reason = format!(
            "group {} was removed while the batch ran; endpoints not yet started were skipped",
            batch.group_name
        );
        stop(svc, &batch, state::CANCELLED, &reason, false).await?;
    } else if now_ms() >= batch.expire_at_ms {
        expire(svc, &batch).await?;
    }

    let totals = catalog.batch_totals(id).await.transient()?;
    if batch.state == state::RUNNING
        && let Some(limit) = batch
            .failure_limit
            .as_deref()
            .and_then(|l| FailureLimit::parse(l).ok())
    {
        let failed = totals
            .failed
            .saturating_sub(batch.failure_base.max(0) as u64);
        if limit.exceeded(failed, totals.total) {
            // Name a failure, so the reason says which cause to fix (e.g. a full disk).
            let example = catalog
                .batch_items(id)
                .await
                .transient()?
                .into_iter()
                .find(|i| i.state == item::FAILED)
                .map(|i| {
                    let error = i.error.as_deref().unwrap_or("the capture failed");
                    format!(" ({}: {error})", i.hostname)
                })
                .unwrap_or_default();
            let reason = format!(
                "paused: {failed} of {} captures failed, reaching the failure limit {limit}{example}; fix the cause and `snapq fleet resume {id}`, or `snapq fleet cancel {id}`",
                totals.total
            );
            catalog
                .set_batch_state(id, &[state::RUNNING], state::PAUSED, Some(&reason))
                .await
                .transient()?;
            tracing::info!(%reason, "batch paused");
            return Ok(false);
        }
    }
    let batch = catalog.batch(id).await.transient()?.unwrap_or(batch);
    if batch.state == state::RUNNING && batch.stop_state.is_none() {
        dispatch(svc, &batch, &totals).await?;
    }
    let totals = catalog.batch_totals(id).await.transient()?;
    let finished = totals.done + totals.failed + totals.skipped;
    ctx.progress(
        finished,
        totals.total,
        Some(&format!(
            "{} done, {} failed, {} skipped, {} running, {} queued",
            totals.done, totals.failed, totals.skipped, totals.running, totals.queued
        )),
    );
    if totals.queued == 0 && totals.running == 0 {
        finish(svc, &batch, &totals).await?;
        return Ok(true);
    }
    Ok(false)
}

fn cancelled_by(batch: &Batch, ctx: &JobContext) -> String {
    if batch.cancel_requested {
        "a user (`snapq fleet cancel`)".to_owned()
    } else {
        format!("the fleet job's cancel ({})", ctx.requested_by())
    }
}

/// Items whose capture ended become done (with the bytes stored) or failed (with the reason).
async fn settle(svc: &Services, batch: &Batch) -> Result<(), JobError> {
    let catalog = &svc.catalog;
    let window = svc.fleet.online_window.as_millis() as i64;
    let waiting = batch.stop_state.is_none() && now_ms() < batch.expire_at_ms;
    for s in catalog.settled_items(batch.id).await.transient()? {
        let online = s.api_url.is_some() && s.last_seen_ms.is_some_and(|t| now_ms() - t < window);
        if s.snapshot_state == SnapshotState::Complete.as_str() {
            catalog
                .finish_item(batch.id, s.endpoint_id, item::DONE, None, s.size)
                .await
                .transient()?;
        } else if waiting && (!online || unreachable(s.error.as_deref())) {
            // It went offline mid-capture (no heartbeat, or its agent stopped answering until
            // the capture gave up): wait for it like any offline endpoint.
            let note = format!(
                "went offline while captured ({}); waiting for it to come back",
                s.error.as_deref().unwrap_or("the capture failed")
            );
            catalog
                .requeue_item(batch.id, s.endpoint_id, &note)
                .await
                .transient()?;
        } else {
            let error = s.error.unwrap_or_else(|| "the capture failed".into());
            catalog
                .finish_item(batch.id, s.endpoint_id, item::FAILED, Some(&error), None)
                .await
                .transient()?;
        }
    }
    for endpoint_id in catalog.orphaned_items(batch.id).await.transient()? {
        catalog
            .finish_item(
                batch.id,
                endpoint_id,
                item::FAILED,
                Some("its snapshot was deleted while it was captured"),
                None,
            )
            .await
            .transient()?;
    }
    // A crash between an item's dispatch and its enqueue: the same key gives the same job.
    for (endpoint_id, hostname, snapshot_id) in
        catalog.items_without_job(batch.id).await.transient()?
    {
        enqueue_capture(svc, batch, endpoint_id, &hostname, snapshot_id).await?;
    }
    Ok(())
}

/// Whether a capture's last error was its agent not answering (see `AgentError::Unreachable`).
fn unreachable(error: Option<&str>) -> bool {
    error.is_some_and(|e| e.contains("is unreachable"))
}

/// Decides the batch's end state now; queued items are skipped with the reason, and with
/// `cancel_running` the running captures are cancelled too.
async fn stop(
    svc: &Services,
    batch: &Batch,
    end_state: &str,
    reason: &str,
    cancel_running: bool,
) -> Result<(), JobError> {
    let catalog = &svc.catalog;
    catalog
        .set_batch_stop(batch.id, end_state, reason)
        .await
        .transient()?;
    catalog
        .skip_queued_items(batch.id, reason)
        .await
        .transient()?;
    if cancel_running {
        for job in catalog.running_item_jobs(batch.id).await.transient()? {
            let _ = svc
                .queue
                .cancel(&JobId::from(job.as_str()), &batch.requested_by)
                .await;
        }
    }
    Ok(())
}

/// Past its expiry: endpoints still waiting are skipped, each with why it was waiting.
async fn expire(svc: &Services, batch: &Batch) -> Result<(), JobError> {
    let catalog = &svc.catalog;
    let queued = catalog.queued_items(batch.id).await.transient()?;
    if queued.is_empty() {
        return Ok(());
    }
    let at = chrono::DateTime::from_timestamp_millis(batch.expire_at_ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default();
    let window = svc.fleet.online_window.as_millis() as i64;
    for q in &queued {
        let online = q.api_url.is_some() && q.last_seen_ms.is_some_and(|s| now_ms() - s < window);
        let mut reason = if online {
            format!("not started before the batch expired at {at} (waiting for a free slot)")
        } else {
            format!("offline until the batch expired at {at}")
        };
        if let Some(earlier) = &q.error {
            reason = format!("{reason}; earlier: {earlier}");
        }
        catalog
            .finish_item(batch.id, q.endpoint_id, item::SKIPPED, Some(&reason), None)
            .await
            .transient()?;
    }
    let reason = format!(
        "expired at {at}: {} endpoint(s) not captured (skipped)",
        queued.len()
    );
    catalog
        .set_batch_stop(batch.id, state::EXPIRED, &reason)
        .await
        .transient()?;
    Ok(())
}

/// Starts captures of online queued endpoints while the batch has free slots.
async fn dispatch(svc: &Services, batch: &Batch, totals: &BatchTotals) -> Result<(), JobError> {
    let catalog = &svc.catalog;
    let mut free = (batch.max_concurrency.max(1) as u64).saturating_sub(totals.running);
    if free == 0 || totals.queued == 0 {
        return Ok(());
    }
    let window = svc.fleet.online_window.as_millis() as i64;
    for q in catalog.queued_items(batch.id).await.transient()? {
        if free == 0 {
            break;
        }
        if !q.known {
            catalog
                .finish_item(
                    batch.id,
                    q.endpoint_id,
                    item::SKIPPED,
                    Some("the endpoint was forgotten while the batch ran"),
                    None,
                )
                .await
                .transient()?;
            continue;
        }
        if q.api_url.is_none() {
            // Known only from uploaded or dropped snapshots: nothing to call, now or later.
            catalog
                .finish_item(
                    batch.id,
                    q.endpoint_id,
                    item::SKIPPED,
                    Some("no agent is enrolled for it (known only from uploaded snapshots); upload an export instead"),
                    None,
                )
                .await
                .transient()?;
            continue;
        }
        let online = q.last_seen_ms.is_some_and(|s| now_ms() - s < window);
        if !online {
            continue; // Waits until it comes online or the batch expires.
        }
        let Some(snapshot_id) = catalog
            .dispatch_item(batch.id, q.endpoint_id, &batch.requested_by)
            .await
            .transient()?
        else {
            continue;
        };
        enqueue_capture(svc, batch, q.endpoint_id, &q.hostname, snapshot_id).await?;
        free -= 1;
    }
    Ok(())
}

async fn enqueue_capture(
    svc: &Services,
    batch: &Batch,
    endpoint_id: i64,
    hostname: &str,
    snapshot_id: i64,
) -> Result<(), JobError> {
    let key = capture_key(batch.id, endpoint_id, snapshot_id);
    let job = super::capture::enqueue(
        &svc.queue,
        &svc.catalog,
        snapshot_id,
        hostname,
        &batch.requested_by,
        key,
    )
    .await?;
    svc.catalog
        .set_item_job(batch.id, endpoint_id, job.as_str())
        .await
        .transient()?;
    Ok(())
}

/// Every endpoint is settled: the batch ends in the state decided earlier (cancelled, expired),
/// else complete or complete with failures; then a scheduled batch's keep rule prunes.
async fn finish(svc: &Services, batch: &Batch, totals: &BatchTotals) -> Result<(), JobError> {
    let catalog = &svc.catalog;
    let batch = catalog
        .batch(batch.id)
        .await
        .transient()?
        .ok_or_else(|| JobError::permanent(format!("batch {} no longer exists", batch.id)))?;
    let (end_state, reason) = match (&batch.stop_state, &batch.reason) {
        (Some(s), reason) => (s.clone(), reason.clone().unwrap_or_else(|| s.clone())),
        (None, _) if totals.total == 0 => (
            state::COMPLETE.to_owned(),
            format!("group {} matched no endpoints", batch.group_name),
        ),
        (None, _) if totals.failed == 0 && totals.skipped == 0 => (
            state::COMPLETE.to_owned(),
            format!("all {} endpoint(s) captured", totals.total),
        ),
        (None, _) => (
            state::COMPLETE_WITH_FAILURES.to_owned(),
            format!(
                "{} of {} capture(s) failed, {} skipped; `snapq fleet show {}` lists why",
                totals.failed, totals.total, totals.skipped, batch.id
            ),
        ),
    };
    end(svc, &batch, &end_state, &reason).await?;
    if let Some(schedule_id) = batch.schedule_id {
        prune(svc, &batch, schedule_id).await?;
    }
    Ok(())
}

async fn end(svc: &Services, batch: &Batch, end_state: &str, reason: &str) -> Result<(), JobError> {
    let ended = svc
        .catalog
        .set_batch_state(
            batch.id,
            &[state::RUNNING, state::PAUSED],
            end_state,
            Some(reason),
        )
        .await
        .transient()?;
    if ended {
        let target = format!("batch {}", batch.id);
        if let Err(e) = svc
            .catalog
            .audit("system", "fleet.end", &target, end_state, Some(reason))
            .await
        {
            tracing::warn!(error = %e, "could not write the audit log");
        }
        tracing::debug!(state = end_state, %reason, "batch ended");
    }
    Ok(())
}

/// The schedule's keep rule: older snapshots of the batch's endpoints go through delete jobs.
async fn prune(svc: &Services, batch: &Batch, schedule_id: i64) -> Result<(), JobError> {
    let catalog = &svc.catalog;
    let Some(schedule) = catalog.schedule_by_id(schedule_id).await.transient()? else {
        return Ok(());
    };
    if schedule.keep_last.is_none() && schedule.keep_days.is_none() {
        return Ok(());
    }
    let hosts: Vec<String> = catalog
        .batch_items(batch.id)
        .await
        .transient()?
        .into_iter()
        .map(|i| i.hostname)
        .collect();
    let older_than = schedule
        .keep_days
        .map(|d| now_ms() - d.max(0) * 24 * 3600 * 1000);
    let doomed = catalog
        .prune_candidates(&hosts, schedule.keep_last, older_than)
        .await
        .transient()?;
    if doomed.is_empty() {
        return Ok(());
    }
    let actor = format!("schedule:{}", schedule.name);
    let jobs: Vec<(DeleteArgs, EnqueueOptions)> = doomed
        .iter()
        .map(|(id, _)| {
            (
                DeleteArgs { snapshot_id: *id },
                EnqueueOptions {
                    idempotency_key: Some(format!("prune:{}:{id}", batch.id)),
                    ..EnqueueOptions::default()
                },
            )
        })
        .collect();
    let enqueued = svc
        .queue
        .enqueue_many_with(JobKind::Delete, &jobs, &actor)
        .await
        .transient()?;
    for ((_, host), job) in doomed.iter().zip(&enqueued) {
        catalog
            .set_job_target(job.id.as_str(), host)
            .await
            .transient()?;
    }
    let ids: Vec<i64> = doomed.iter().map(|(id, _)| *id).collect();
    let rule = match (schedule.keep_last, schedule.keep_days) {
        (Some(k), _) => format!("keep the last {k}"),
        (_, Some(d)) => format!("keep {d} day(s)"),
        _ => String::new(),
    };
    if let Err(e) = catalog
        .audit(
            &actor,
            "retention.prune",
            &format!("batch {}", batch.id),
            "queued",
            Some(&format!("{rule}: deleting snapshots {ids:?}")),
        )
        .await
    {
        tracing::warn!(error = %e, "could not write the audit log");
    }
    Ok(())
}
