//! The `ingest` job: a whole snapshot file that arrived by upload or in the watched folder.
//!
//! Validate the name, the SQLite header, `quick_check` and the recorder schema; hash; a file whose
//! sha256 the store already holds is recorded as a duplicate of that snapshot (not an error, not
//! stored twice); otherwise move it into `snapshots/<host>/` and register it, creating an offline
//! endpoint for an unknown hostname. A rejected file goes to `quarantine/` with a `.reason.json`
//! beside it, and the job fails with that reason. Every step can be repeated after a crash: a file
//! already moved into the store is registered instead of looked for again.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use snapq_core::SnapshotName;
use snapq_core::catalog::{Origin, now_ms};
use snapq_core::verify::{self, Verified};

use super::Services;
use crate::{JobArgs, JobContext, JobError, JobKind, ResultExt};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IngestArgs {
    /// Where the file is now (the upload spool or the watched folder).
    pub path: PathBuf,
    /// The file name it arrived with, which must be a snapshot name.
    pub original_name: String,
    pub origin: Origin,
}

impl JobArgs for IngestArgs {
    const KIND: JobKind = JobKind::Ingest;
}

/// Why a file was not taken into the store, as written beside it in quarantine.
#[derive(Debug, Serialize)]
struct Rejection<'a> {
    original_name: &'a str,
    origin: Origin,
    reason: &'a str,
    rejected_at: chrono::DateTime<chrono::Utc>,
    size: Option<u64>,
    sha256: Option<String>,
    job_id: &'a str,
}

#[tracing::instrument(skip(svc, ctx), fields(job_id = %ctx.id(), name = %args.original_name))]
pub async fn run(svc: Arc<Services>, args: IngestArgs, ctx: JobContext) -> Result<(), JobError> {
    let job_id = ctx.id().as_str().to_owned();
    svc.catalog
        .create_ingest(
            &job_id,
            args.origin,
            &args.original_name,
            ctx.requested_by(),
        )
        .await
        .transient()?;
    match ingest(&svc, &args, &job_id, ctx.requested_by()).await? {
        Outcome::Stored(id) => finish(&svc, &job_id, "complete", Some(id), None).await,
        Outcome::Duplicate(id) => {
            finish(
                &svc,
                &job_id,
                "duplicate",
                Some(id),
                Some("same sha256 as a stored snapshot"),
            )
            .await
        }
        Outcome::Rejected(reason) => {
            let reason = quarantine(&svc, &args, &job_id, &reason)
                .await
                .map(|_| reason.clone())
                .unwrap_or_else(|e| format!("{reason} (and it could not be quarantined: {e})"));
            finish(&svc, &job_id, "quarantined", None, Some(&reason)).await?;
            Err(JobError::permanent(format!(
                "{} was quarantined: {reason}",
                args.original_name
            )))
        }
    }
}

async fn finish(
    svc: &Services,
    job_id: &str,
    state: &str,
    snapshot: Option<i64>,
    reason: Option<&str>,
) -> Result<(), JobError> {
    svc.catalog
        .finish_ingest(job_id, state, snapshot, reason)
        .await
        .transient()
}

enum Outcome {
    Stored(i64),
    Duplicate(i64),
    Rejected(String),
}

async fn ingest(
    svc: &Services,
    args: &IngestArgs,
    job_id: &str,
    requested_by: &str,
) -> Result<Outcome, JobError> {
    let name: SnapshotName = match args.original_name.parse() {
        Ok(name) => name,
        Err(e) => return Ok(Outcome::Rejected(format!("bad snapshot name: {e}"))),
    };
    let stored = svc.store.path(&name);
    let source = if args.path.exists() {
        args.path.clone()
    } else if stored.exists() {
        // A crash after the move: the file is in the store; register it if nothing else did.
        if let Some(existing) = svc
            .catalog
            .snapshot_by_name(&name.to_string())
            .await
            .transient()?
        {
            return Ok(Outcome::Stored(existing.id));
        }
        stored.clone()
    } else {
        return Err(JobError::permanent(format!(
            "{} is gone: nothing to ingest",
            args.path.display()
        )));
    };
    let checked = {
        let source = source.clone();
        tokio::task::spawn_blocking(
            move || -> Result<(Verified, String, u64), verify::VerifyError> {
                // Opened without following symlinks and checked through the open handle, so a
                // dropped file swapped for a symlink after the watcher saw it is never read.
                let file = verify::open_regular_no_follow(&source)?;
                let checked = verify::verify_open_file(&file)?;
                if !verify::still_names(&source, &file) {
                    return Err(verify::VerifyError::NotRegular(format!(
                        "{} was replaced while it was checked",
                        source.display()
                    )));
                }
                Ok(checked)
            },
        )
        .await
        .transient()?
    };
    let (verified, sha256, size) = match checked {
        Ok(ok) => ok,
        Err(verify::VerifyError::Io(e)) => return Err(JobError::transient(e.to_string())),
        Err(e) => return Ok(Outcome::Rejected(e.to_string())),
    };
    if let Some(existing) = svc
        .catalog
        .complete_snapshot_by_sha256(&sha256)
        .await
        .transient()?
    {
        if source != stored {
            let _ = std::fs::remove_file(&source);
        }
        tracing::info!(duplicate_of = existing.id, "already stored");
        return Ok(Outcome::Duplicate(existing.id));
    }
    if source != stored && stored.exists() {
        return Ok(Outcome::Rejected(format!(
            "a different snapshot named {name} is already stored (sha256 differs)"
        )));
    }
    let endpoint = svc
        .catalog
        .ensure_endpoint(name.hostname())
        .await
        .transient()?;
    if source != stored {
        let (store, from, to) = (svc.store.clone(), source.clone(), name.clone());
        tokio::task::spawn_blocking(move || store.commit(&from, &to))
            .await
            .transient()?
            .transient()?;
    }
    let id = svc
        .catalog
        .insert_complete_snapshot(
            endpoint.id,
            args.origin,
            &name.to_string(),
            size as i64,
            &sha256,
            &verified,
            job_id,
            requested_by,
        )
        .await
        .transient()?;
    let _ = svc
        .catalog
        .audit(
            requested_by,
            "ingest",
            &name.to_string(),
            "complete",
            Some(job_id),
        )
        .await;
    Ok(Outcome::Stored(id))
}

/// Moves the rejected file into `quarantine/` with `<file>.reason.json` beside it.
async fn quarantine(
    svc: &Services,
    args: &IngestArgs,
    job_id: &str,
    reason: &str,
) -> std::io::Result<PathBuf> {
    // Hashing and moving (maybe copying) a whole hostile file: never on the async runtime.
    let (dir, args, job_id, reason) = (
        svc.quarantine.clone(),
        args.clone(),
        job_id.to_owned(),
        reason.to_owned(),
    );
    tokio::task::spawn_blocking(move || quarantine_blocking(&dir, &args, &job_id, &reason))
        .await
        .map_err(std::io::Error::other)?
}

fn quarantine_blocking(
    quarantine: &Path,
    args: &IngestArgs,
    job_id: &str,
    reason: &str,
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(quarantine)?;
    let dest = quarantine.join(format!("{}-{job_id}", safe_file_name(&args.original_name)));
    // Never follows a symlink: a link is moved aside as it is, not hashed where it points.
    let (size, sha256) = match verify::open_regular_no_follow(&args.path) {
        Ok(file) => (
            file.metadata().ok().map(|m| m.len()),
            verify::sha256_open_file(&file).ok(),
        ),
        Err(_) => (None, None),
    };
    if args.path.symlink_metadata().is_ok() {
        move_file(&args.path, &dest)?;
    }
    let rejection = Rejection {
        original_name: &args.original_name,
        origin: args.origin,
        reason,
        rejected_at: chrono::Utc::now(),
        size,
        sha256,
        job_id,
    };
    let mut reason_path = dest.clone().into_os_string();
    reason_path.push(".reason.json");
    std::fs::write(
        &reason_path,
        serde_json::to_vec_pretty(&rejection).expect("rejections serialize"),
    )?;
    tracing::warn!(dest = %dest.display(), %reason, at = now_ms(), "quarantined");
    Ok(dest)
}

fn move_file(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
            std::fs::copy(from, to)?;
            std::fs::remove_file(from)
        }
        other => other,
    }
}

/// A name that is safe as one path component whatever the user sent: hostile characters become
/// `_`, and it is cut to a length every file system takes.
pub fn safe_file_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(150)
        .collect();
    let cleaned = cleaned.trim_start_matches('.');
    if cleaned.is_empty() {
        "unnamed".to_owned()
    } else {
        cleaned.replace("..", "__")
    }
}

#[cfg(test)]
mod tests {
    use super::safe_file_name;

    #[test]
    fn hostile_names_become_one_safe_component() {
        for (input, want) in [
            ("../../etc/passwd", "____etc_passwd"),
            ("/abs/x.db", "_abs_x.db"),
            ("a\0b\nc.db", "a_b_c.db"),
            ("", "unnamed"),
            ("...", "unnamed"),
        ] {
            assert_eq!(safe_file_name(input), want, "{input:?}");
        }
        assert_eq!(safe_file_name(&"x".repeat(1000)).len(), 150);
    }
}
