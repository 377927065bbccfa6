//! The `ingest` job: a whole snapshot file that arrived by upload or in the watched folder.
//!
//! Validate the name, the SQLite header, `quick_check` and the recorder schema; hash; a file whose
//! sha256 the store already holds is recorded as a duplicate of that snapshot (not an error, not
//! stored twice); otherwise move it into `snapshots/<host>/` and register it, creating an offline
//! endpoint for an unknown hostname. A rejected file goes to `quarantine/` with a `.reason.json`
//! beside it, and the job fails with that reason. Every step can be repeated after a crash: a file
//! already moved into the store is registered instead of looked for again.
//!
//! A file from the drop folder may still be arriving when it fails validation (a copy that paused,
//! or a tool that closes and reopens the file). So a reason a finished copy could cure (truncated,
//! damaged, bad header, no recorder schema) does not quarantine it at once: the job records the
//! ingest as `settling` and queues a follow-up check after the settle period. If the file changed by
//! then, the watcher has submitted its new version and the check ends as `superseded`; if it stayed
//! the same, it is quarantined with a reason that says so. Reasons no copy can cure (a bad name) act
//! at once, and a file is never moved while a process has it open for writing. A file retried out
//! of quarantine (`snapq quarantine retry`) is ingested from where it lies; its old entry is closed
//! whatever the new outcome.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use snapq_core::SnapshotName;
use snapq_core::catalog::{Origin, now_ms};
use snapq_core::verify::{self, Verified};
use snapq_core::writers::{Writers, writers};

use super::Services;
use crate::{EnqueueOptions, JobArgs, JobContext, JobError, JobKind, ResultExt};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IngestArgs {
    /// Where the file is now (the upload spool, the watched folder, or quarantine on a retry).
    pub path: PathBuf,
    /// The file name it arrived with, which must be a snapshot name.
    pub original_name: String,
    pub origin: Origin,
    /// For a file from the drop folder: the version the watcher saw. A file that changed since is
    /// a new version, which the watcher submits as a job of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<FileVersion>,
    /// This is the follow-up check after the settle period of a file that failed validation while
    /// it may still have been arriving.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub settling: bool,
    /// The ingest job whose quarantine entry this file is being retried from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<String>,
}

impl IngestArgs {
    /// A file that arrived complete (an upload, or a retry out of quarantine).
    pub fn new(path: PathBuf, original_name: String, origin: Origin) -> Self {
        Self {
            path,
            original_name,
            origin,
            version: None,
            settling: false,
            retry_of: None,
        }
    }
}

/// One version of a file: if any of these change, it is a different file.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileVersion {
    pub len: u64,
    pub mtime_ms: i64,
    pub inode: u64,
}

impl FileVersion {
    /// The version of the regular file at `path` now; `None` if it is gone or not a regular file.
    pub fn of(path: &Path) -> Option<FileVersion> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(path).ok()?;
        meta.file_type().is_file().then(|| FileVersion {
            len: meta.len(),
            mtime_ms: meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000,
            inode: meta.ino(),
        })
    }
}

/// How long a drop-folder file that failed validation must stay unchanged before it is
/// quarantined (`--watch-settle-secs`).
#[derive(Debug, Clone)]
pub struct IngestSettings {
    pub settle: std::time::Duration,
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
    let outcome = ingest(&svc, &args, &job_id, ctx.requested_by()).await?;
    if let Some(old) = &args.retry_of {
        close_quarantine_entry(&svc, old, &args.path, &outcome).await?;
    }
    let metrics = crate::metrics::metrics();
    match outcome {
        Outcome::Stored(id) => {
            metrics.ingest_outcome("stored");
            finish(&svc, &job_id, "complete", Some(id), None).await
        }
        Outcome::Duplicate(id) => {
            metrics.ingest_outcome("duplicate");
            finish(
                &svc,
                &job_id,
                "duplicate",
                Some(id),
                Some("same sha256 as a stored snapshot"),
            )
            .await
        }
        Outcome::Superseded(why) => {
            metrics.ingest_outcome("superseded");
            finish(&svc, &job_id, "superseded", None, Some(&why)).await
        }
        Outcome::Rejected { reason, curable }
            if curable && args.version.is_some() && !args.settling =>
        {
            settle(&svc, &args, &job_id, &reason).await
        }
        Outcome::Rejected { reason, curable } => {
            if writers(&args.path) == Writers::Open {
                // Never move a file a writer still holds: look again after the settle period.
                return settle(&svc, &args, &job_id, &reason).await;
            }
            let reason = if args.settling && curable {
                format!(
                    "{reason}; it stopped changing for {} s while still damaged, so it is not a copy in progress",
                    svc.ingest.settle.as_secs()
                )
            } else {
                reason
            };
            let dest = quarantine(&svc, &args, &job_id, &reason).await;
            let reason = match &dest {
                Ok(_) => reason,
                Err(e) => format!("{reason} (and it could not be quarantined: {e})"),
            };
            svc.catalog
                .quarantine_ingest(&job_id, &reason, dest.ok().as_deref())
                .await
                .transient()?;
            metrics.ingest_outcome("quarantined");
            let _ = svc
                .catalog
                .audit(
                    ctx.requested_by(),
                    "quarantine",
                    &args.original_name,
                    "quarantined",
                    Some(&reason),
                )
                .await;
            Err(JobError::permanent(format!(
                "{} was quarantined: {reason}",
                args.original_name
            )))
        }
    }
}

/// Defers the verdict on a drop-folder file that failed validation while it may still be
/// arriving: a follow-up job looks again once the settle period is over.
async fn settle(
    svc: &Services,
    args: &IngestArgs,
    job_id: &str,
    reason: &str,
) -> Result<(), JobError> {
    let due = chrono::Utc::now()
        + chrono::Duration::from_std(svc.ingest.settle).unwrap_or_default()
        + chrono::Duration::milliseconds(999);
    let follow_up = IngestArgs {
        settling: true,
        version: args.version.or_else(|| FileVersion::of(&args.path)),
        ..args.clone()
    };
    let options = EnqueueOptions {
        idempotency_key: Some(format!("settle:{job_id}")),
        run_at: Some(due),
        ..Default::default()
    };
    let enqueued = svc
        .queue
        .enqueue_with(JobKind::Ingest, &follow_up, "watch", &options)
        .await
        .transient()?;
    svc.catalog
        .create_ingest(
            enqueued.id.as_str(),
            args.origin,
            &args.original_name,
            "watch",
        )
        .await
        .transient()?;
    tracing::info!(%reason, follow_up = %enqueued.id, "failed while it may still be arriving; looking again after the settle period");
    finish(
        svc,
        job_id,
        "settling",
        None,
        Some(&format!(
            "{reason}; it may still be arriving, so it is checked again after {} s (job {})",
            svc.ingest.settle.as_secs(),
            enqueued.id
        )),
    )
    .await
}

/// A file retried out of quarantine has a new outcome: its old entry (and `.reason.json`) goes.
async fn close_quarantine_entry(
    svc: &Services,
    old_job: &str,
    path: &Path,
    outcome: &Outcome,
) -> Result<(), JobError> {
    if let Outcome::Stored(_) | Outcome::Duplicate(_) = outcome {
        let _ = std::fs::remove_file(reason_path(path));
    }
    svc.catalog
        .close_quarantine(old_job, "retried")
        .await
        .transient()?;
    Ok(())
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
    /// The file changed or went away after the watcher saw it: a newer job has it.
    Superseded(String),
    /// `curable`: a reason a copy still in progress would give (truncated, damaged, bad header).
    Rejected {
        reason: String,
        curable: bool,
    },
}

async fn ingest(
    svc: &Services,
    args: &IngestArgs,
    job_id: &str,
    requested_by: &str,
) -> Result<Outcome, JobError> {
    let name: SnapshotName = match args.original_name.parse() {
        Ok(name) => name,
        Err(e) => {
            return Ok(Outcome::Rejected {
                reason: format!("bad snapshot name: {e}"),
                curable: false,
            });
        }
    };
    let stored = svc.store.path(&name);
    // A settling check never moved anything: a file gone from the folder is another job's now.
    if args.settling && !args.path.exists() {
        return Ok(Outcome::Superseded(
            "the file left the drop folder while it settled".into(),
        ));
    }
    if let Some(seen) = args.version
        && args.path.exists()
        && FileVersion::of(&args.path) != Some(seen)
    {
        return Ok(Outcome::Superseded(
            "the file changed after it was submitted; its new version is ingested on its own"
                .into(),
        ));
    }
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
        super::blocking(
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
        Err(e) => {
            return Ok(Outcome::Rejected {
                reason: e.to_string(),
                curable: true,
            });
        }
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
    let endpoint = svc
        .catalog
        .ensure_endpoint(name.hostname())
        .await
        .transient()?;
    if source != stored {
        // The commit never replaces: a file already stored under the name (an earlier run cut
        // off before it registered, or another ingest of the same name right now) is compared.
        let (store, from, to) = (svc.store.clone(), source.clone(), name.clone());
        let committed = super::blocking(move || store.commit(&from, &to))
            .await
            .transient()?;
        match committed {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if let Some(outcome) = already_stored(svc, &name, &stored, &source, &sha256).await?
                {
                    return Ok(outcome);
                }
            }
            Err(e) => return Err(JobError::transient(e.to_string())),
        }
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

/// A file is already stored under `name`: the same bytes (by sha256) make this ingest that
/// snapshot (`None`: register the stored file, which nothing registered yet); other bytes are a
/// rejection. `source` is removed once the stored file is known to be the same.
async fn already_stored(
    svc: &Services,
    name: &SnapshotName,
    stored: &Path,
    source: &Path,
    sha256: &str,
) -> Result<Option<Outcome>, JobError> {
    let stored_sha = {
        let stored = stored.to_owned();
        super::blocking(move || verify::sha256_file(&stored))
            .await
            .transient()?
            .transient()?
    };
    if stored_sha != sha256 {
        return Ok(Some(Outcome::Rejected {
            reason: format!("a different snapshot named {name} is already stored (sha256 differs)"),
            curable: false,
        }));
    }
    let _ = std::fs::remove_file(source);
    Ok(svc
        .catalog
        .snapshot_by_name(&name.to_string())
        .await
        .transient()?
        .map(|existing| Outcome::Duplicate(existing.id)))
}

/// `<file>.reason.json`: the quarantined file's reason, beside it.
pub fn reason_path(file: &Path) -> PathBuf {
    let mut path = file.as_os_str().to_owned();
    path.push(".reason.json");
    PathBuf::from(path)
}

/// Moves the rejected file into `quarantine/` with `<file>.reason.json` beside it (a file retried
/// from quarantine moves to its new entry's name), on the blocking pool: it hashes and may copy.
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
    super::blocking(move || quarantine_blocking(&dir, &args, &job_id, &reason))
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
        if args.retry_of.is_some() {
            let _ = std::fs::remove_file(reason_path(&args.path));
        }
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
    std::fs::write(
        reason_path(&dest),
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
