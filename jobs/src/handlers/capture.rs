//! The `capture` job: from "take a snapshot of web-01" to a verified file in the store.
//!
//! measure → check the disk (minus the reserve and what captures in flight hold) → stage a
//! consistent copy on the agent → stream it into a hidden temporary file while the agent is still
//! writing it, hashing on the way → wait for the agent's verdict (its sha256 of the pinned image,
//! which passed `quick_check` there) while the file is fsynced → verify (sha256 end to end, header,
//! recorder schema, counts) → rename → register → ask the agent to drop its copy. The catalog row
//! remembers the staged copy, so a retry (after an agent restart, a network cut or a server crash)
//! resumes the download with `Range` while the agent still holds the same copy (its id is the
//! ETag), and a crash after the rename registers the file, checked against the sha256 recorded
//! before the rename, instead of fetching it again.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use snapq_core::SnapshotName;
use snapq_core::agent_client::{AgentClient, AgentError, error_chain};
use snapq_core::catalog::{Snapshot, SnapshotState};
use snapq_core::verify::{self, Hasher};
use snapq_core::wire::{Staged, StagedState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Services;
use crate::{EnqueueOptions, JobArgs, JobContext, JobError, JobId, JobKind, Queue, ResultExt};

/// Capture into the catalog row `snapshot_id` (created `queued` by whoever enqueued the job).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CaptureArgs {
    pub snapshot_id: i64,
}

impl JobArgs for CaptureArgs {
    const KIND: JobKind = JobKind::Capture;
}

/// The idempotency key of the capture job of snapshot row `snapshot_id`, when no caller names a
/// finer one (a fleet batch does).
pub fn job_key(snapshot_id: i64) -> String {
    format!("capture:{snapshot_id}")
}

/// Queues the capture of the `queued` snapshot row `snapshot_id` under the idempotency `key` and
/// links the job to the row and to its endpoint (for scoping). Called again with the same key
/// after a crash anywhere in between, it finds the same job and finishes the links: that is how
/// the server's start-up and a fleet batch make sure a capture whose row exists is never lost
/// and never queued twice.
pub async fn enqueue(
    queue: &Queue,
    catalog: &snapq_core::catalog::Catalog,
    snapshot_id: i64,
    hostname: &str,
    requested_by: &str,
    key: String,
) -> Result<JobId, JobError> {
    let options = EnqueueOptions {
        idempotency_key: Some(key),
        ..EnqueueOptions::default()
    };
    let job = queue
        .enqueue_with(
            JobKind::Capture,
            &CaptureArgs { snapshot_id },
            requested_by,
            &options,
        )
        .await
        .transient()?
        .id;
    catalog
        .set_job_target(job.as_str(), hostname)
        .await
        .transient()?;
    catalog
        .set_snapshot_job(snapshot_id, job.as_str())
        .await
        .transient()?;
    Ok(job)
}

/// How many downloaded bytes are handed to the kernel's writeback at a time, so the fsync before
/// the store's rename does not write the whole snapshot at the end (on a link-bound capture it
/// overlaps with the transfer instead).
const WRITEBACK_EVERY: u64 = 32 << 20;

/// The download's write buffer. Network chunks are tens of KiB; 256 KiB turns them into few large
/// writes, and, above the server's fixed mmap threshold (`server::bound_allocator`), is mapped
/// and given back when a capture ends. With 1 MiB, 16 concurrent captures held 18 MiB more
/// (peak RSS 68.3 → 50.2 MiB in `benches/fleet.py`) and a batch was no faster.
const WRITE_BUFFER: usize = 256 << 10;

/// How often progress is written to the catalog and the job.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// The worker entry point. A capture that will not be tried again is failed on its catalog row
/// by the queue's terminal hook (the server wires it), whatever ended it: the queue alone knows
/// whether an error was the last attempt, and a cancel or a crash never reaches this code.
#[tracing::instrument(skip(svc, ctx), fields(job_id = %ctx.id()))]
pub async fn run(svc: Arc<Services>, args: CaptureArgs, ctx: JobContext) -> Result<(), JobError> {
    let result = capture(&svc, args.snapshot_id, &ctx).await;
    if svc.catalog.is_shared()
        && let Err(e) = svc.catalog.release_disk(args.snapshot_id).await
    {
        // Its lease lapses on its own.
        tracing::warn!(error = %e, "could not release the capture's share of the store");
    }
    if let Err(err) = &result {
        tracing::info!(snapshot = args.snapshot_id, reason = %err.message(), "capture attempt failed");
    }
    result
}

/// Short of disk only because captures in flight hold space: wait for them (transient). Short
/// even if they all finished: fail now, with the numbers.
fn disk_error(err: super::InsufficientDisk) -> JobError {
    if err.need <= err.available.saturating_add(err.in_flight) {
        JobError::transient(format!(
            "{err}; waiting for the captures in flight to finish"
        ))
    } else {
        JobError::permanent(err.to_string())
    }
}

fn agent_error(err: AgentError, hostname: &str) -> JobError {
    if let AgentError::CertificateChanged { .. } = err {
        return JobError::permanent(err.to_string());
    }
    match err.status() {
        Some(401 | 403) => JobError::permanent(format!(
            "the agent on {hostname} rejected the server's credential: {err}; if its data directory was replaced, let it enroll again with `snapq endpoints rekey {hostname}`"
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
    let agent = svc.agents.client(&endpoint).permanent()?;
    let fail = |e: AgentError| agent_error(e, &hostname);

    if let Some((name, sha256, verified)) = stored_before_a_crash(svc, &snap).await? {
        return register(
            svc,
            &agent,
            &snap,
            &name,
            &sha256,
            &verified,
            ctx.requested_by(),
        )
        .await;
    }

    catalog
        .set_snapshot_state(snapshot_id, SnapshotState::Measuring)
        .await
        .transient()?;
    let db_bytes = agent.db_size().await.map_err(fail)?;
    let free = snapq_core::disk::free_bytes(svc.store.root()).transient()?;

    // Reuse the copy an earlier attempt staged if the agent still holds it (resume), else stage.
    let reused = match &snap.staged_id {
        Some(id) => agent
            .staged(id, Duration::ZERO)
            .await
            .map_err(fail)?
            .filter(|s| s.state != StagedState::Failed),
        None => None,
    };
    let need = reused.as_ref().map_or(db_bytes, |s| s.size);
    let _held = svc
        .reservations
        .reserve(&hostname, need, free, svc.capture.reserve_bytes)
        .map_err(disk_error)?;
    if catalog.is_shared() {
        // Other nodes write to the same store: count what their captures hold too.
        let usable = free.saturating_sub(svc.capture.reserve_bytes);
        if let Err(in_flight) = catalog
            .reserve_disk(snapshot_id, need, usable)
            .await
            .transient()?
        {
            return Err(disk_error(super::InsufficientDisk {
                hostname: hostname.clone(),
                need,
                available: usable.saturating_sub(in_flight),
                reserve: svc.capture.reserve_bytes,
                in_flight,
            }));
        }
    }
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
                )
                .await
                .transient()?;
            staged
        }
    };
    let name = name_of(&hostname, &staged)?;
    svc.store.prepare(&name).transient()?;

    catalog
        .set_snapshot_state(snapshot_id, SnapshotState::Transferring)
        .await
        .transient()?;
    let partial = svc.store.partial_path(&name);
    // The download follows the agent's copy while it is still being written.
    let sha256 = match download(svc, &agent, &staged, &partial, snapshot_id, ctx).await {
        Ok(sha256) => sha256,
        Err(Download::Agent(e)) if e.status() == Some(404) => {
            // The staging failed before the download began, or the agent lost it.
            let reason = match agent.staged(&staged.id, Duration::ZERO).await {
                Ok(Some(Staged {
                    error: Some(error), ..
                })) => bad_copy(&hostname, &error),
                _ => format!("{e}"),
            };
            return Err(stage_again(svc, snapshot_id, &partial, reason).await);
        }
        Err(Download::Agent(e)) => return Err(fail(e)),
        Err(Download::Job(e)) => return Err(e),
    };
    catalog
        .set_snapshot_state(snapshot_id, SnapshotState::Verifying)
        .await
        .transient()?;
    // The fsync (seconds for a large file) runs while the agent finishes its check.
    let synced = super::blocking({
        let partial = partial.clone();
        move || std::fs::File::open(partial)?.sync_all()
    });
    let confirmed = settled(&agent, &staged.id, ctx).await;
    synced.await.transient()?.transient()?;
    let expected = match confirmed.map_err(fail)? {
        Some(Staged {
            state: StagedState::Ready,
            sha256: Some(sha256),
            ..
        }) => sha256,
        Some(Staged {
            error: Some(error), ..
        }) => {
            let reason = bad_copy(&hostname, &error);
            return Err(stage_again(svc, snapshot_id, &partial, reason).await);
        }
        _ => {
            let reason = format!("the agent on {hostname} no longer holds the staged copy");
            return Err(stage_again(svc, snapshot_id, &partial, reason).await);
        }
    };
    if sha256 != expected {
        // The staged copy itself may be bad (e.g. damaged by a crash on the endpoint).
        let reason = format!(
            "the bytes received from {hostname} do not match the staged copy: sha256 {sha256}, expected {expected}"
        );
        return Err(stage_again(svc, snapshot_id, &partial, reason).await);
    }
    let verified = match check_file(&partial, verify::verify_checked_copy).await {
        Ok(verified) => verified,
        Err(e) => {
            let reason = format!("the copy of {hostname} failed verification: {e}");
            return Err(stage_again(svc, snapshot_id, &partial, reason).await);
        }
    };
    catalog
        .set_snapshot_sha256(snapshot_id, &sha256)
        .await
        .transient()?;
    // fsync of a large file can take seconds: keep it off the async workers.
    let (store, from, to) = (svc.store.clone(), partial.clone(), name.clone());
    match super::blocking(move || store.commit(&from, &to))
        .await
        .transient()?
    {
        Ok(_) => {}
        // The commit never replaces: a file under this name is ours only with our sha256.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let stored = svc.store.path(&name);
            let stored_sha = check_file(&stored, verify::sha256_file)
                .await
                .map_err(JobError::transient)?;
            if stored_sha != sha256 {
                return Err(JobError::permanent(format!(
                    "a different file named {name} is already in the store; move it away and retry the capture"
                )));
            }
            let _ = std::fs::remove_file(&partial);
        }
        Err(e) => return Err(JobError::transient(e.to_string())),
    }
    let snap = Snapshot {
        staged_id: Some(staged.id),
        ..snap
    };
    register(
        svc,
        &agent,
        &snap,
        &name,
        &sha256,
        &verified,
        ctx.requested_by(),
    )
    .await
}

/// Why a capture failed when the agent's staging did (e.g. the image failed `quick_check`).
fn bad_copy(hostname: &str, error: &str) -> String {
    format!("the agent on {hostname} could not make a good copy: {error}")
}

/// Drops a bad or vanished staged copy and its partial download; the next attempt stages anew.
async fn stage_again(svc: &Services, snapshot_id: i64, partial: &Path, reason: String) -> JobError {
    let _ = std::fs::remove_file(partial);
    if let Err(e) = svc.catalog.clear_snapshot_staged(snapshot_id).await {
        return JobError::transient(e.to_string());
    }
    JobError::transient(format!("{reason}; the copy is staged again"))
}

/// Waits until the agent has finished the copy being downloaded: written, hashed and checked.
async fn settled(
    agent: &AgentClient,
    id: &str,
    ctx: &JobContext,
) -> Result<Option<Staged>, AgentError> {
    loop {
        match agent.staged(id, Duration::from_secs(30)).await? {
            Some(s) if s.state == StagedState::Copying && !ctx.is_cancelled() => continue,
            other => return Ok(other),
        }
    }
}

/// After a crash between the rename into the store and the registration: the stored file,
/// verified against the sha256 recorded before the rename. `None` when there is no such file.
async fn stored_before_a_crash(
    svc: &Services,
    snap: &Snapshot,
) -> Result<Option<(SnapshotName, String, verify::Verified)>, JobError> {
    let (Some(name), Some(sha256)) = (&snap.name, &snap.sha256) else {
        return Ok(None);
    };
    let Ok(name) = name.parse::<SnapshotName>() else {
        return Ok(None);
    };
    let path = svc.store.path(&name);
    if !path.exists() {
        return Ok(None);
    }
    let verified = verify_stored(&path, sha256).await.map_err(|e| {
        JobError::transient(format!("the stored copy {name} failed verification: {e}"))
    })?;
    Ok(Some((name, sha256.clone(), verified)))
}

/// Registers the stored snapshot and asks the agent to drop its staged copy.
async fn register(
    svc: &Services,
    agent: &AgentClient,
    snap: &Snapshot,
    name: &SnapshotName,
    sha256: &str,
    verified: &verify::Verified,
    requested_by: &str,
) -> Result<(), JobError> {
    let size = std::fs::metadata(svc.store.path(name)).transient()?.len();
    svc.catalog
        .complete_snapshot(snap.id, &name.to_string(), size as i64, sha256, verified)
        .await
        .transient()?;
    let detail = format!("{} ({size} bytes, sha256 {sha256})", snap.hostname);
    if let Err(e) = svc
        .catalog
        .audit(
            requested_by,
            "capture",
            &name.to_string(),
            "complete",
            Some(&detail),
        )
        .await
    {
        tracing::warn!(error = %e, "could not write the audit log");
    }
    if let Some(id) = &snap.staged_id
        && let Err(e) = agent.delete_staged(id).await
    {
        tracing::info!(error = %e, "could not delete the staged copy; the agent expires it");
    }
    tracing::debug!(snapshot = snap.id, %name, "captured");
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
    let actual = check_file(path, verify::sha256_file).await?;
    if actual != sha256 {
        return Err(format!("sha256 {actual}, expected {sha256}"));
    }
    check_file(path, verify::verify_snapshot).await
}

/// Runs a check of the file at `path` on a blocking thread.
async fn check_file<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
    path: &Path,
    check: fn(&Path) -> Result<T, E>,
) -> Result<T, String> {
    let path = path.to_owned();
    super::blocking(move || check(&path))
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
    if have > 0 && have == staged.size {
        // Every byte arrived before the server stopped (it died waiting for the agent's verdict
        // or while verifying): there is nothing to ask for; the agent's sha256 decides.
        tracing::info!(
            bytes = have,
            "the partial download is complete; verifying it"
        );
        ctx.progress(have, staged.size, Some("verifying"));
        return Ok(hasher.finish());
    }
    let response = match agent.download(&staged.id, have).await {
        // Our bytes do not fit the copy the agent serves under this id (a 416 is never final
        // for the same copy): fetch it whole; the ETag check below still guards the bytes.
        Err(e) if have > 0 && e.status() == Some(416) => {
            tracing::info!(
                from = have,
                "the agent refused the resume range; downloading again"
            );
            have = 0;
            hasher = Hasher::default();
            agent.download(&staged.id, 0).await
        }
        other => other,
    }
    .map_err(Download::Agent)?;
    let same_copy = response
        .headers()
        .get(reqwest::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|etag| etag.trim_matches('"') == staged.id);
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
    let mut out = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file);
    let mut stream = response.bytes_stream();
    let started = Instant::now();
    let start_bytes = have;
    let mut last_report = Instant::now();
    // Bytes handed to the kernel for writeback so far (see `start_writeback`).
    let mut written_back = have;
    while let Some(chunk) = stream.next().await {
        if ctx.is_cancelled() {
            return Err(JobError::permanent("cancelled").into());
        }
        let chunk = chunk.map_err(|e| {
            JobError::transient(format!("download interrupted: {}", error_chain(&e)))
        })?;
        if have + chunk.len() as u64 > staged.size {
            // An agent cannot make the server store more than the size it staged (and reserved).
            let _ = tokio::fs::remove_file(partial).await;
            return Err(JobError::permanent(format!(
                "the agent sent more than the {} bytes it staged; the download was stopped",
                staged.size
            ))
            .into());
        }
        hasher.update(&chunk);
        out.write_all(&chunk).await.transient()?;
        have += chunk.len() as u64;
        if have - written_back >= WRITEBACK_EVERY {
            out.flush().await.transient()?;
            snapq_core::store::start_writeback(out.get_ref(), written_back, have - written_back);
            written_back = have;
        }
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
    crate::metrics::metrics().capture_transferred(have - start_bytes, started.elapsed());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::Reservations;

    #[test]
    fn disk_held_by_captures_in_flight_is_waited_for_and_only_a_real_shortage_fails() {
        let r = Reservations::default();
        // 1000 free, 100 reserve: 900 usable; another capture holds 600.
        let _other = r.reserve("a", 600, 1000, 100).unwrap();
        let contended = disk_error(r.reserve("b", 500, 1000, 100).unwrap_err());
        assert!(contended.is_transient(), "{contended:?}");
        assert!(
            contended
                .message()
                .contains("waiting for the captures in flight")
        );
        let short = disk_error(r.reserve("c", 950, 1000, 100).unwrap_err());
        assert!(!short.is_transient(), "{short:?}");
        assert!(
            short
                .message()
                .contains("insufficient disk space for the c snapshot")
        );
    }
}
