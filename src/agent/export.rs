//! `snapq agent export`: the manual export for an offline endpoint, while the recorder keeps running.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Serialize;
use snapq_core::SnapshotName;

use super::copy;

#[derive(Debug, Serialize)]
pub struct Exported {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
    pub events: u64,
}

/// Writes a consistent copy of `data_dir/monitor.db` to `out_dir/<hostname>_<timestamp>.db`.
/// The hostname is `hostname` if given, else the one the recorder wrote into its `meta` table.
pub fn export(data_dir: &Path, out_dir: &Path, hostname: Option<&str>) -> anyhow::Result<Exported> {
    let db_path = crate::layout::AgentDir::new(data_dir).monitor_db();
    if !db_path.is_file() {
        bail!(
            "no recorder database at {}; pass the agent's --data-dir",
            db_path.display()
        );
    }
    if !out_dir.is_dir() {
        bail!(
            "export directory {} does not exist; create it or choose another --out",
            out_dir.display()
        );
    }
    snapq_core::verify::check_header(&db_path)
        .with_context(|| format!("{} is not a recorder database", db_path.display()))?;
    // Opened before any connection and closed after the last one (see `copy::copy_pinned`).
    let main_file =
        std::fs::File::open(&db_path).with_context(|| format!("opening {}", db_path.display()))?;
    let pinned = copy::pin_retrying(&db_path)?;
    let hostname = match hostname {
        Some(h) => h.to_owned(),
        None => pinned
            .meta("hostname")?
            .context("the recorder database has no hostname; pass --hostname")?,
    };
    let name = SnapshotName::new(&hostname, chrono::Utc::now())
        .with_context(|| format!("hostname {hostname:?} cannot name a snapshot"))?;
    let path = out_dir.join(name.to_string());
    if path.exists() {
        bail!("{} already exists; not overwriting it", path.display());
    }
    let info = copy::copy_pinned(pinned, &main_file, &path, copy::Durability::Fsync)?;
    drop(main_file);
    Ok(Exported {
        path,
        size: info.size,
        sha256: info.sha256,
        events: info.events,
    })
}
