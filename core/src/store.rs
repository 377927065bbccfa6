//! The snapshot store: `snapshots/<hostname>/<name>.db`, which never shows a partial file.
//!
//! A file is written under a hidden temporary name in its final directory, fsynced, then renamed,
//! and the directory fsynced; a crash leaves either no file or a whole one. A temporary file is
//! kept across restarts so an interrupted capture can resume it.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use crate::SnapshotName;

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// The store under `root` (created if missing).
    pub fn open(root: &Path) -> io::Result<Store> {
        fs::create_dir_all(root)?;
        Ok(Store {
            root: root.to_owned(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a finished snapshot lives.
    pub fn path(&self, name: &SnapshotName) -> PathBuf {
        self.root.join(name.hostname()).join(name.to_string())
    }

    /// Where a snapshot is written before it is complete: hidden, in the same directory.
    pub fn partial_path(&self, name: &SnapshotName) -> PathBuf {
        self.root
            .join(name.hostname())
            .join(format!(".{name}.partial"))
    }

    /// Creates the endpoint's directory for `name`.
    pub fn prepare(&self, name: &SnapshotName) -> io::Result<()> {
        fs::create_dir_all(self.root.join(name.hostname()))
    }

    /// Moves a finished file into place under `name`: fsync, then rename (atomic within a file
    /// system). From another file system it is copied to the hidden temporary name first, so the
    /// final name still only ever shows a whole file.
    pub fn commit(&self, from: &Path, name: &SnapshotName) -> io::Result<PathBuf> {
        self.prepare(name)?;
        let dest = self.path(name);
        File::open(from)?.sync_all()?;
        match fs::rename(from, &dest) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
                let partial = self.partial_path(name);
                fs::copy(from, &partial)?;
                File::open(&partial)?.sync_all()?;
                fs::rename(&partial, &dest)?;
                fs::remove_file(from)?;
            }
            Err(e) => return Err(e),
        }
        File::open(dest.parent().expect("store paths have a parent"))?.sync_all()?;
        Ok(dest)
    }

    /// Removes a snapshot's file; `false` if it was already gone.
    pub fn remove(&self, name: &SnapshotName) -> io::Result<bool> {
        match fs::remove_file(self.path(name)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}
