//! Staged snapshot copies on the agent: made on request, served for download, deleted when done.
//!
//! A staged copy is `staged/<id>.db` with `staged/<id>.json` beside it; the JSON is written last, so
//! a copy without one is an interrupted staging and is removed at start-up. Copies survive an agent
//! restart (the server resumes downloads across it) and expire after a TTL.
//!
//! Staging answers once the database is pinned; the copy (and the `quick_check` of the image it
//! copies) goes on in the background, and the file can be downloaded while it grows: a download
//! follows the bytes written so far ([`Staging::get`] hands out a [`Written`] receiver). Copies in
//! progress, and stagings that failed, live in memory only.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use snapq_core::disk;
pub use snapq_core::wire::{Staged, StagedState};
use tokio::sync::watch;

use super::copy;
use super::recorder::RecorderDb;

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(
        "not enough free disk on the endpoint to stage a snapshot: need {}, {} free in {} of which {} stay free (the staging reserve); free space, delete old staged copies or lower --staging-reserve-mib",
        disk::human_bytes(*.need), disk::human_bytes(*.free), .dir.display(), disk::human_bytes(*.reserve)
    )]
    InsufficientDisk {
        need: u64,
        free: u64,
        reserve: u64,
        dir: PathBuf,
    },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// The bytes of a copy in progress written so far; the sender is dropped when the copy ends (the
/// staging is then `ready` or `failed`).
pub type Written = watch::Receiver<u64>;

/// A staging that is not (or not yet) a finished copy on disk.
struct Live {
    staged: Staged,
    written: Written,
}

pub struct Staging {
    dir: PathBuf,
    db: Arc<RecorderDb>,
    ttl: Duration,
    /// Disk space staging always leaves free on the endpoint (the recorder and the machine need it).
    reserve: u64,
    /// One copy at a time: a second request waits until the first copy ends, then gets its own.
    busy: Arc<tokio::sync::Mutex<()>>,
    live: Arc<Mutex<HashMap<String, Live>>>,
}

impl Staging {
    /// Opens (creating) the staging directory and removes interrupted stagings.
    pub fn open(
        dir: &Path,
        db: Arc<RecorderDb>,
        ttl: Duration,
        reserve: u64,
    ) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)?;
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let keep = match path.extension().and_then(|e| e.to_str()) {
                Some("json") => true,
                Some("db") => path.with_extension("json").exists(),
                _ => false,
            };
            if !keep {
                tracing::info!(path = %path.display(), "removing interrupted staging");
                fs::remove_file(&path)?;
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            db,
            ttl,
            reserve,
            busy: Arc::new(tokio::sync::Mutex::new(())),
            live: Arc::default(),
        })
    }

    /// Pins a consistent view of the recorder database while the recorder keeps writing, and
    /// starts copying it in the background; answers with the copy `copying`.
    #[tracing::instrument(skip(self))]
    pub async fn stage(&self) -> Result<Staged, StageError> {
        let asked = std::time::Instant::now();
        let one_at_a_time = self.busy.clone().lock_owned().await;
        let need = db_bytes(self.db.path());
        let free = disk::free_bytes(&self.dir).map_err(anyhow::Error::from)?;
        if need.saturating_add(self.reserve) > free {
            return Err(StageError::InsufficientDisk {
                need,
                free,
                reserve: self.reserve,
                dir: self.dir.clone(),
            });
        }
        let id = new_id();
        let dest = self.dir.join(format!("{id}.db"));
        let db = self.db.clone();
        let pin_dest = dest.clone();
        let (pinned, output, size) = tokio::task::spawn_blocking(move || {
            let conn = copy::open_for_pin(db.path())?;
            let probe = copy::open_for_pin(db.path())?;
            // Holding the writer's lock keeps commits out between the pin and learning its end.
            let pinned = db.with_writer(|_| {
                let held = std::time::Instant::now();
                let pinned = copy::pin_at_end(conn, &probe);
                crate::agent::metrics::metrics().staging_held_writer(held.elapsed());
                pinned
            })?;
            drop(probe);
            let pinned = pinned.locate(db.path())?;
            let size = pinned.size();
            let output = File::create(&pin_dest)?;
            anyhow::Ok((pinned, output, size))
        })
        .await
        .map_err(anyhow::Error::from)??;
        let staged = Staged {
            id: id.clone(),
            size,
            created_at: Utc::now(),
            state: StagedState::Copying,
            sha256: None,
            events: None,
            error: None,
        };
        let (tx, written) = watch::channel(0);
        self.lock_live().insert(
            id.clone(),
            Live {
                staged: staged.clone(),
                written,
            },
        );
        let (db, live, meta) = (self.db.clone(), self.live.clone(), self.meta_path(&id));
        let mut copying = staged.clone();
        tokio::task::spawn_blocking(move || {
            let _one_at_a_time = one_at_a_time;
            let copied = copy::stage_pinned(pinned, db.main_file(), output, |n| {
                tx.send_replace(n);
            });
            // Under the lock, so a delete racing with the end of the copy either removes the
            // finished copy or keeps it from ever being recorded.
            let mut live = live.lock().unwrap_or_else(|p| p.into_inner());
            let Some(entry) = live.get_mut(&copying.id) else {
                let _ = fs::remove_file(&dest);
                return;
            };
            let recorded = copied.and_then(|info| {
                copying.state = StagedState::Ready;
                copying.sha256 = Some(info.sha256);
                copying.events = Some(info.events);
                write_meta(&meta, &copying)
            });
            match recorded {
                // On disk now; a download still following the file reads the rest from there.
                Ok(()) => {
                    crate::agent::metrics::metrics().staged(asked.elapsed());
                    live.remove(&copying.id);
                }
                Err(e) => {
                    tracing::warn!(id = %copying.id, error = format!("{e:#}"), "staging failed");
                    let _ = fs::remove_file(&dest);
                    entry.staged.state = StagedState::Failed;
                    entry.staged.error = Some(format!("{e:#}"));
                }
            }
            drop(tx);
        });
        tracing::debug!(id = %staged.id, size = staged.size, "staging");
        Ok(staged)
    }

    /// A staging, its file, and while it is still being copied, the bytes written so far.
    pub fn get(&self, id: &str) -> Option<(Staged, PathBuf, Option<Written>)> {
        if !valid_id(id) {
            return None;
        }
        let path = self.dir.join(format!("{id}.db"));
        if let Some(live) = self.lock_live().get(id) {
            return Some((live.staged.clone(), path, Some(live.written.clone())));
        }
        let staged = read_meta(&self.meta_path(id))?;
        Some((staged, path, None))
    }

    /// A staging once it is no longer `copying`, or as it is when `wait` has passed.
    pub async fn settled(&self, id: &str, wait: Duration) -> Option<Staged> {
        let (staged, _, growing) = self.get(id)?;
        let Some(mut growing) = growing else {
            return Some(staged);
        };
        // The sender is dropped after the outcome is recorded.
        let ended = async { while growing.changed().await.is_ok() {} };
        let _ = tokio::time::timeout(wait, ended).await;
        self.get(id).map(|(staged, _, _)| staged)
    }

    /// Deletes a staged copy; `false` if there was none.
    pub fn delete(&self, id: &str) -> bool {
        if !valid_id(id) {
            return false;
        }
        if self.lock_live().remove(id).is_some() {
            // A copy in progress keeps writing into its unlinked file, then finds its entry gone
            // and records nothing (see `stage`).
            let _ = fs::remove_file(self.dir.join(format!("{id}.db")));
            return true;
        }
        if !self.meta_path(id).exists() {
            return false;
        }
        // Metadata first: a copy without it is treated as garbage, never served.
        let _ = fs::remove_file(self.meta_path(id));
        let _ = fs::remove_file(self.dir.join(format!("{id}.db")));
        true
    }

    /// Every staging, oldest first.
    pub fn list(&self) -> Vec<Staged> {
        let mut all: Vec<Staged> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let path = e.path();
                (path.extension()? == "json")
                    .then(|| read_meta(&path))
                    .flatten()
            })
            .collect();
        all.extend(self.lock_live().values().map(|l| l.staged.clone()));
        all.sort_by_key(|s| s.created_at);
        all
    }

    /// Deletes staged copies and failed stagings older than the TTL; returns how many.
    pub fn expire(&self) -> usize {
        let cutoff = Utc::now() - self.ttl;
        self.list()
            .into_iter()
            .filter(|s| s.created_at < cutoff && s.state != StagedState::Copying)
            .filter(|s| self.delete(&s.id))
            .count()
    }

    fn meta_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn read_meta(path: &Path) -> Option<Staged> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// Writes a finished staging's metadata through a temporary name: its presence marks the copy done.
fn write_meta(meta: &Path, staged: &Staged) -> anyhow::Result<()> {
    let tmp = copy::partial_path(meta);
    fs::write(&tmp, serde_json::to_vec(staged)?)?;
    fs::rename(&tmp, meta)?;
    Ok(())
}

/// Size of the database with its WAL: what a copy may need at most.
pub fn db_bytes(db_path: &Path) -> u64 {
    let mut wal = db_path.as_os_str().to_owned();
    wal.push("-wal");
    [db_path.as_os_str(), &wal]
        .iter()
        .filter_map(|p| fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

fn new_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}
