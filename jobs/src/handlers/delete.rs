//! The `delete` job: one snapshot's file and catalog row go together, idempotently, audited.
//!
//! A snapshot still being captured has its capture cancelled first, and the delete waits for that
//! capture to stop so it cannot register a file after the delete removed it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use snapq_core::SnapshotName;

use super::Services;
use crate::{JobArgs, JobContext, JobError, JobId, JobKind, QueueError, ResultExt};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeleteArgs {
    pub snapshot_id: i64,
}

impl JobArgs for DeleteArgs {
    const KIND: JobKind = JobKind::Delete;
}

/// How long a delete waits for a cancelled capture to stop.
const CAPTURE_STOP_WAIT: Duration = Duration::from_secs(30);

#[tracing::instrument(skip(svc, ctx), fields(job_id = %ctx.id(), snapshot = args.snapshot_id))]
pub async fn run(svc: Arc<Services>, args: DeleteArgs, ctx: JobContext) -> Result<(), JobError> {
    let Some(snap) = svc.catalog.snapshot(args.snapshot_id).await.transient()? else {
        // Already gone: deleting twice is not an error.
        return Ok(());
    };
    let unfinished = !matches!(snap.state.as_str(), "complete" | "failed");
    if let (true, Some(job)) = (unfinished, &snap.job_id) {
        stop_capture(&svc, &JobId::from(job.as_str()), ctx.requested_by()).await?;
    }
    let target = snap
        .name
        .clone()
        .unwrap_or_else(|| format!("snapshot {}", snap.id));
    if let Some(name) = snap
        .name
        .as_deref()
        .and_then(|n| n.parse::<SnapshotName>().ok())
    {
        svc.store.remove(&name).transient()?;
        let _ = std::fs::remove_file(svc.store.partial_path(&name));
    }
    // Two deletes of one snapshot may both get here; only the one that removed the row audits.
    if svc.catalog.delete_snapshot(snap.id).await.transient()? {
        let detail = format!("{} (job {})", snap.hostname, ctx.id());
        if let Err(e) = svc
            .catalog
            .audit(
                ctx.requested_by(),
                "snapshot.delete",
                &target,
                "deleted",
                Some(&detail),
            )
            .await
        {
            tracing::warn!(error = %e, "could not write the audit log");
        }
        tracing::debug!(%target, "deleted");
    }
    Ok(())
}

/// Cancels the capture job and waits until it no longer runs.
async fn stop_capture(svc: &Services, job: &JobId, requested_by: &str) -> Result<(), JobError> {
    match svc.queue.cancel(job, requested_by).await {
        Ok(_) | Err(QueueError::InvalidState { .. }) | Err(QueueError::NotFound(_)) => {}
        Err(e) => return Err(JobError::transient(e.to_string())),
    }
    let deadline = Instant::now() + CAPTURE_STOP_WAIT;
    loop {
        match svc.queue.show(job).await {
            Ok(detail) if !detail.job.state.is_finished() => {}
            Ok(_) | Err(QueueError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(JobError::transient(e.to_string())),
        }
        if Instant::now() > deadline {
            return Err(JobError::transient(format!(
                "capture job {job} has not stopped yet; the delete will try again"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
