//! Staged snapshot copies on the agent: made on request, served for download, deleted when done.
//!
//! A staged copy is `staged/<id>.db` with `staged/<id>.json` beside it; the JSON is written last, so
//! a copy without one is an interrupted staging and is removed at start-up. Copies survive an agent
//! restart (the server resumes downloads across it) and expire after a TTL.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use snapq_core::disk;
pub use snapq_core::wire::Staged;

use super::copy;
use super::recorder::RecorderDb;

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(
        "not enough free disk on the endpoint to stage a snapshot: need {}, {} free in {}; free space or delete old staged copies",
        disk::human_bytes(*.need), disk::human_bytes(*.free), .dir.display()
    )]
    InsufficientDisk { need: u64, free: u64, dir: PathBuf },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

pub struct Staging {
    dir: PathBuf,
    db: Arc<RecorderDb>,
    ttl: Duration,
    /// One staging at a time: a second request waits and then gets its own copy.
    busy: tokio::sync::Mutex<()>,
}

impl Staging {
    /// Opens (creating) the staging directory and removes interrupted stagings.
    pub fn open(dir: &Path, db: Arc<RecorderDb>, ttl: Duration) -> anyhow::Result<Self> {
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
            busy: tokio::sync::Mutex::new(()),
        })
    }

    /// Stages a consistent copy of the recorder database while the recorder keeps writing.
    #[tracing::instrument(skip(self))]
    pub async fn stage(&self) -> Result<Staged, StageError> {
        let _one_at_a_time = self.busy.lock().await;
        let need = db_bytes(self.db.path());
        let free = disk::free_bytes(&self.dir).map_err(anyhow::Error::from)?;
        if need > free {
            return Err(StageError::InsufficientDisk {
                need,
                free,
                dir: self.dir.clone(),
            });
        }
        let id = new_id();
        let dest = self.dir.join(format!("{id}.db"));
        let db = self.db.clone();
        let info = tokio::task::spawn_blocking(move || -> anyhow::Result<copy::CopyInfo> {
            let conn = copy::open_for_pin(db.path())?;
            // Holding the writer's lock keeps the WAL empty between checkpoint and pin.
            let pinned = db
                .with_writer(|_| copy::pin(conn, db.path()))?
                .ok_or_else(|| {
                    anyhow::anyhow!("the recorder database could not be checkpointed; try again")
                })?;
            copy::copy_pinned(pinned, db.main_file(), &dest, copy::Durability::Cached)
        })
        .await
        .map_err(anyhow::Error::from)??;
        let staged = Staged {
            id,
            size: info.size,
            sha256: info.sha256,
            created_at: Utc::now(),
            events: info.events,
        };
        let meta = self.meta_path(&staged.id);
        let tmp = copy::partial_path(&meta);
        fs::write(
            &tmp,
            serde_json::to_vec(&staged).map_err(anyhow::Error::from)?,
        )
        .map_err(anyhow::Error::from)?;
        fs::rename(&tmp, &meta).map_err(anyhow::Error::from)?;
        tracing::debug!(id = %staged.id, size = staged.size, "staged snapshot");
        Ok(staged)
    }

    /// A staged copy and its file, if `id` names one.
    pub fn get(&self, id: &str) -> Option<(Staged, PathBuf)> {
        if !valid_id(id) {
            return None;
        }
        let staged: Staged = serde_json::from_slice(&fs::read(self.meta_path(id)).ok()?).ok()?;
        Some((staged, self.dir.join(format!("{id}.db"))))
    }

    /// Deletes a staged copy; `false` if there was none.
    pub fn delete(&self, id: &str) -> bool {
        if !valid_id(id) || !self.meta_path(id).exists() {
            return false;
        }
        // Metadata first: a copy without it is treated as garbage, never served.
        let _ = fs::remove_file(self.meta_path(id));
        let _ = fs::remove_file(self.dir.join(format!("{id}.db")));
        true
    }

    /// Every staged copy, oldest first.
    pub fn list(&self) -> Vec<Staged> {
        let mut all: Vec<Staged> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let path = e.path();
                (path.extension()? == "json")
                    .then(|| serde_json::from_slice(&fs::read(&path).ok()?).ok())
                    .flatten()
            })
            .collect();
        all.sort_by_key(|s| s.created_at);
        all
    }

    /// Deletes staged copies older than the TTL; returns how many.
    pub fn expire(&self) -> usize {
        let cutoff = Utc::now() - self.ttl;
        self.list()
            .into_iter()
            .filter(|s| s.created_at < cutoff)
            .filter(|s| self.delete(&s.id))
            .count()
    }

    fn meta_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }
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
