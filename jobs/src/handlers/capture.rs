//! The `capture` job: from "take a snapshot of web-01" to a verified file in the store.
//!
//! measure → check the disk (minus the reserve and what captures in flight hold) → stage a
//! consistent copy on the agent → stream it into a hidden temporary file, hashing on the way →
//! verify (sha256 end to end, `quick_check`, recorder schema) → fsync, rename → register → ask the
//! agent to drop its copy. The catalog row remembers the staged copy, so a retry (after an agent
//! restart, a network cut or a server crash) resumes the download with `Range` while the agent
//! still holds the same copy (same ETag), and a crash after the rename registers the file instead
//! of fetching it again.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use snapq_core::SnapshotName;
use snapq_core::agent_client::{AgentClient, AgentError, error_chain};
use snapq_core::catalog::{Snapshot, SnapshotState};
use snapq_core::verify::{self, Hasher};
use snapq_core::wire::Staged;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Services;
use crate::{JobArgs, JobContext, JobError, JobKind, ResultExt};

/// Capture into the catalog row `snapshot_id` (created `queued` by whoever enqueued the job).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CaptureArgs {
    pub snapshot_id: i64,
}

impl JobArgs for CaptureArgs {
    const KIND: JobKind = JobKind::Capture;
}

/// How often progress is written to the catalog and the job.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// The worker entry point: runs the capture and records a failure on the snapshot row when the
/// job will not be tried again.
#[tracing::instrument(skip(svc, ctx), fields(job_id = %ctx.id()))]
pub async fn run(svc: Arc<Services>, args: CaptureArgs, ctx: JobContext) -> Result<(), JobError> {
    let result = capture(&svc, args.snapshot_id, &ctx).await;
    if let Err(err) = &result {
        let final_attempt = !err.is_transient() || ctx.is_last_attempt() || ctx.is_cancelled();
        let reason = if ctx.is_cancelled() {
            "cancelled".to_owned()
        } else {
            err.message().to_owned()
        };
        if final_attempt {
            tracing::warn!(snapshot = args.snapshot_id, %reason, "capture failed");
            let _ = svc.catalog.fail_snapshot(args.snapshot_id, &reason).await;
        } else {
            tracing::info!(snapshot = args.snapshot_id, %reason, "capture will retry");
        }
    }
    result
}

fn agent_error(err: AgentError, hostname: &str) -> JobError {
    match err.status() {
        Some(401 | 403) => JobError::permanent(format!(
            "the agent on {hostname} rejected the server's token: {err}; re-enroll the agent"
        )),
        Some(507) => JobError::permanent(format!(
            "the agent on {hostname} cannot stage the snapshot: {err}"
        )),
        _ if err.is_transient() => JobError::transient(err.to_string()),
        _ => JobError::permanent(err.to_string()),
    }
}

async fn capture(svc: &Services, snapshot_id: i64, ctx: &JobContext) -> Result<(), JobError> {
    let catalog = &svc.catalog;
    let snap = catalog
        .snapshot(snapshot_id)
        .await
        .transient()?
        .ok_or_else(|| JobError::permanent(format!("snapshot {snapshot_id} no longer exists")))?;
    if snap.state == SnapshotState::Complete.as_str() {
        return Ok(());
    }
    let endpoint = catalog
        .endpoint_by_id(snap.endpoint_id)
        .await
        .transient()?
        .ok_or_else(|| {
            JobError::permanent(format!("endpoint of snapshot {snapshot_id} is unknown"))
        })?;
    let hostname = endpoint.hostname.clone();
    let (Some(url), Some(token)) = (&endpoint.api_url, &endpoint.api_token) else {
        return Err(JobError::permanent(format!(
            "{hostname} has no agent registered with this server, so it cannot be captured; upload an export instead"
        )));
    };
    let agent = AgentClient::new(svc.http.clone(), url, token);
    let fail = |e: AgentError| agent_error(e, &hostname);

    catalog
        .set_snapshot_state(snapshot_id, SnapshotState::Measuring)
        .await
        .transient()?;
    let db_bytes = agent.db_size().await.map_err(fail)?;
    let free = snapq_core::disk::free_bytes(svc.store.root()).transient()?;

    // Reuse the copy an earlier attempt staged if the agent still holds it (resume), else stage.
    let reused = match (&snap.staged_id, &snap.sha256) {
        (Some(id), Some(sha)) => agent
            .staged(id)
            .await
            .map_err(fail)?
            .filter(|s| &s.sha256 == sha),
        _ => None,
    };
    let need = reused.as_ref().map_or(db_bytes, |s| s.size);
    let _held = svc
        .reservations
        .reserve(&hostname, need, free, svc.capture.reserve_bytes)
        .permanent()?;
    let staged = match reused {
        Some(staged) => staged,
        None => {
            discard_partial(svc, &snap);
            let staged = agent.stage().await.map_err(fail)?;
            let name = name_of(&hostname, &staged)?;
            catalog
                .set_snapshot_staged(
                    snapshot_id,
                    &staged.id,
                    &name.to_string(),
                    staged.size as i64,
                    &staged.sha256,
                )
                .await
                .transient()?;
            staged
        }
    };
    let name = name_of(&hostname, &staged)?;
    svc.store.prepare(&name).transient()?;

    let final_path = svc.store.path(&name);
    let verified = if final_path.exists() {
        // A crash between the rename and the registration: check the stored file, don't refetch.
        verify_stored(&final_path, &staged.sha256)
            .await
            .map_err(|e| {
                JobError::transient(format!(
                    "the stored copy of {hostname} failed verification: {e}"
                ))
            })?
    } else {
        catalog
            .set_snapshot_state(snapshot_id, SnapshotState::Transferring)
            .await
            .transient()?;
        let partial = svc.store.partial_path(&name);
        let sha256 = download(svc, &agent, &staged, &partial, snapshot_id, ctx)
            .await
            .map_err(|e| match e {
                Download::Agent(e) => fail(e),
                Download::Job(e) => e,
            })?;
        catalog
            .set_snapshot_state(snapshot_id, SnapshotState::Verifying)
            .await
            .transient()?;
        if sha256 != staged.sha256 {
            let _ = std::fs::remove_file(&partial);
            // The staged copy itself may be bad (e.g. damaged by a crash on the endpoint):
            // the next attempt stages a new one.
            catalog
                .clear_snapshot_staged(snapshot_id)
                .await
                .transient()?;
            return Err(JobError::transient(format!(
                "the bytes received from {hostname} do not match the staged copy: sha256 {sha256}, expected {}; the copy is staged again",
                staged.sha256
            )));
        }
        let verified = verify_blocking(&partial).await.map_err(|e| {
            let _ = std::fs::remove_file(&partial);
            JobError::transient(format!("the copy of {hostname} failed verification: {e}"))
        });
        if verified.is_err() {
            catalog
                .clear_snapshot_staged(snapshot_id)
                .await
                .transient()?;
        }
        let verified = verified?;
        // fsync of a large file can take seconds: keep it off the async workers.
        let (store, to) = (svc.store.clone(), name.clone());
        tokio::task::spawn_blocking(move || store.commit(&partial, &to))
            .await
            .transient()?
            .transient()?;
        verified
    };
    catalog
        .complete_snapshot(
            snapshot_id,
            &name.to_string(),
            staged.size as i64,
            &staged.sha256,
            &verified,
        )
        .await
        .transient()?;
    if let Err(e) = agent.delete_staged(&staged.id).await {
        tracing::info!(error = %e, "could not delete the staged copy; the agent expires it");
    }
    tracing::debug!(snapshot = snapshot_id, %name, "captured");
    Ok(())
}

fn name_of(hostname: &str, staged: &Staged) -> Result<SnapshotName, JobError> {
    SnapshotName::new(hostname, staged.created_at).permanent()
}

/// Removes the temporary file of an earlier staged copy that will not be resumed.
fn discard_partial(svc: &Services, snap: &Snapshot) {
    if let Some(name) = snap
        .name
        .as_deref()
        .and_then(|n| n.parse::<SnapshotName>().ok())
    {
        let _ = std::fs::remove_file(svc.store.partial_path(&name));
    }
}

/// Verifies a file already in the store, including that it is the staged copy's bytes.
async fn verify_stored(path: &Path, sha256: &str) -> Result<verify::Verified, String> {
    let owned = path.to_owned();
    let actual = tokio::task::spawn_blocking(move || verify::sha256_file(&owned))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if actual != sha256 {
        return Err(format!("sha256 {actual}, expected {sha256}"));
    }
    verify_blocking(path).await
}

async fn verify_blocking(path: &Path) -> Result<verify::Verified, String> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || verify::verify_snapshot(&path))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

enum Download {
    Agent(AgentError),
    Job(JobError),
}

impl From<JobError> for Download {
    fn from(e: JobError) -> Self {
        Download::Job(e)
    }
}

/// Streams the staged copy into `partial`, resuming after the bytes already there when the agent
/// still serves the same copy; returns the sha256 of the whole file.
async fn download(
    svc: &Services,
    agent: &AgentClient,
    staged: &Staged,
    partial: &Path,
    snapshot_id: i64,
    ctx: &JobContext,
) -> Result<String, Download> {
    let mut hasher = Hasher::default();
    let mut have = match tokio::fs::metadata(partial).await {
        Ok(m) if m.len() <= staged.size => m.len(),
        _ => 0,
    };
    if have > 0 {
        have = hash_prefix(partial, have, &mut hasher).await.transient()?;
    }
    let response = agent
        .download(&staged.id, have)
        .await
        .map_err(Download::Agent)?;
    let same_copy = response
        .headers()
        .get(reqwest::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|etag| etag.trim_matches('"') == staged.sha256);
    if !same_copy {
        return Err(JobError::transient(
            "the agent no longer serves the staged copy (ETag changed); staging again",
        )
        .into());
    }
    let resumed = have > 0 && response.status() == reqwest::StatusCode::PARTIAL_CONTENT;
    if !resumed {
        have = 0;
        hasher = Hasher::default();
    }
    if resumed {
        tracing::info!(from = have, "resuming the download");
    }
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(partial)
        .await
        .transient()?;
    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let mut stream = response.bytes_stream();
    let started = Instant::now();
    let start_bytes = have;
    let mut last_report = Instant::now();
    while let Some(chunk) = stream.next().await {
        if ctx.is_cancelled() {
            return Err(JobError::permanent("cancelled").into());
        }
        let chunk = chunk.map_err(|e| {
            JobError::transient(format!("download interrupted: {}", error_chain(&e)))
        })?;
        hasher.update(&chunk);
        out.write_all(&chunk).await.transient()?;
        have += chunk.len() as u64;
        if let Some(rate) = svc.capture.max_bytes_per_sec {
            let due = Duration::from_secs_f64((have - start_bytes) as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        if last_report.elapsed() >= PROGRESS_EVERY {
            last_report = Instant::now();
            ctx.progress(have, staged.size, Some("transferring"));
            let _ = svc
                .catalog
                .set_snapshot_progress(snapshot_id, have as i64, staged.size as i64)
                .await;
        }
    }
    out.flush().await.transient()?;
    out.into_inner().sync_all().await.transient()?;
    ctx.progress(have, staged.size, Some("verifying"));
    svc.catalog
        .set_snapshot_progress(snapshot_id, have as i64, staged.size as i64)
        .await
        .transient()?;
    Ok(hasher.finish())
}

/// Hashes the first `len` bytes already downloaded; returns how many it could read.
async fn hash_prefix(path: &Path, len: u64, hasher: &mut Hasher) -> std::io::Result<u64> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let want = buf.len().min((len - done) as usize);
        let n = file.read(&mut buf[..want]).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    Ok(done)
}
