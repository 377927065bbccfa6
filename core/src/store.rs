//! The snapshot store: `snapshots/<hostname>/<name>.db`, which never shows a partial file.
//!
//! A file is written under a hidden temporary name in its final directory, fsynced, then renamed,
//! and the directory fsynced; a crash leaves either no file or a whole one. A temporary file is
//! kept across restarts so an interrupted capture can resume it.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use crate::SnapshotName;

/// Ends the hidden name of a copy from another file system (see [`Store::commit`]).
const INCOMING_SUFFIX: &str = ".incoming";

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Renames `from` to `to` unless `to` exists (then [`io::ErrorKind::AlreadyExists`]), atomically:
/// `renameat2(RENAME_NOREPLACE)` where the kernel and file system have it, else a hard link
/// (which never replaces either) and an unlink.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| {
            CString::new(p.as_os_str().as_bytes())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
        };
        let (f, t) = (c(from)?, c(to)?);
        // SAFETY: two valid NUL-terminated paths that outlive the call.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                f.as_ptr(),
                libc::AT_FDCWD,
                t.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // Not supported here: fall through to link + unlink.
            Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {}
            _ => return Err(err),
        }
    }
    fs::hard_link(from, to)?;
    fs::remove_file(from)
}

/// Starts writing `len` bytes at `offset` of `file` back to the disk without waiting for it
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`). A download calls it as it goes, so the fsync before
/// the commit finds little left to write instead of the whole file; elsewhere it does nothing.
pub fn start_writeback(file: &impl std::os::fd::AsRawFd, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    // SAFETY: a descriptor the caller holds open; no memory is passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// A store elsewhere than the data directory (`--store`, maybe a mount): its marker file
    /// must be there before anything is written.
    shared: bool,
}

/// The file that says a directory is the store itself, not an empty mount point: a shared store
/// that is not mounted must fail captures, not fill the local disk under the mount point.
pub const MARKER: &str = ".snapq-store";

impl Store {
    /// The store under `root` (created if missing) in the data directory.
    pub fn open(root: &Path) -> io::Result<Store> {
        fs::create_dir_all(root)?;
        Ok(Store {
            root: root.to_owned(),
            shared: false,
        })
    }

    /// A store of its own (`--store`, often a file system every node mounts), marked with
    /// [`MARKER`] so that a node never writes under an unmounted mount point.
    pub fn open_shared(root: &Path) -> io::Result<Store> {
        fs::create_dir_all(root)?;
        let marker = root.join(MARKER);
        if !marker.exists() {
            fs::write(
                &marker,
                "snapq snapshot store: every snapq node writes here\n",
            )?;
        }
        Ok(Store {
            root: root.to_owned(),
            shared: true,
        })
    }

    /// Whether `root` holds the store's marker (a store that was opened there before).
    pub fn is_marked(root: &Path) -> bool {
        root.join(MARKER).is_file()
    }

    /// Fails when the store's marker is gone: a shared file system unmounted under a running
    /// node leaves an empty directory that must not receive snapshots.
    fn check_present(&self) -> io::Result<()> {
        if !self.shared || Self::is_marked(&self.root) {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "the snapshot store {} is not there (its {MARKER} file is missing): is its file system mounted?",
                    self.root.display()
                ),
            ))
        }
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

    /// Creates the endpoint's directory for `name`, in a store that is there.
    pub fn prepare(&self, name: &SnapshotName) -> io::Result<()> {
        self.check_present()?;
        fs::create_dir_all(self.root.join(name.hostname()))
    }

    /// Moves a finished file into place under `name`: fsync, then a rename that never replaces
    /// (atomic within a file system). A file already stored under that name is never
    /// overwritten: the error is then [`io::ErrorKind::AlreadyExists`] and `from` stays where
    /// it is, so the caller can compare the two. From another file system the file is copied
    /// to a hidden temporary name of its own first, so the final name still only ever shows a
    /// whole file, and two commits of the same name never share a temporary file.
    pub fn commit(&self, from: &Path, name: &SnapshotName) -> io::Result<PathBuf> {
        // Not `AlreadyExists`, which means "a file of that name is stored" below.
        self.prepare(name).map_err(|e| {
            io::Error::other(format!("cannot create the directory for {name}: {e}"))
        })?;
        let dest = self.path(name);
        File::open(from)?.sync_all()?;
        match rename_noreplace(from, &dest) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
                let tmp = self.root.join(name.hostname()).join(format!(
                    ".{name}.{}-{}{INCOMING_SUFFIX}",
                    std::process::id(),
                    unique()
                ));
                let copied = fs::copy(from, &tmp)
                    .and_then(|_| File::open(&tmp)?.sync_all())
                    .and_then(|()| rename_noreplace(&tmp, &dest));
                if let Err(e) = copied {
                    let _ = fs::remove_file(&tmp);
                    return Err(e);
                }
                fs::remove_file(from)?;
            }
            Err(e) => return Err(e),
        }
        File::open(dest.parent().expect("store paths have a parent"))?.sync_all()?;
        Ok(dest)
    }

    /// Removes the temporary copies of commits from another file system that a crash cut off
    /// (capture downloads, `.NAME.partial`, are kept: they resume), those not written to for
    /// `idle` (zero: all of them, on a store no other node writes to). Returns how many.
    pub fn remove_abandoned_copies(&self, idle: std::time::Duration) -> io::Result<usize> {
        let mut removed = 0;
        for host in fs::read_dir(&self.root)? {
            let host = host?;
            if !host.file_type()?.is_dir() {
                continue;
            }
            for entry in fs::read_dir(host.path())? {
                let path = entry?.path();
                let hidden_copy = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.') && n.ends_with(INCOMING_SUFFIX));
                let untouched = || {
                    fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t.elapsed().unwrap_or_default() >= idle)
                };
                if hidden_copy && untouched() && fs::remove_file(&path).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_never_replaces_a_stored_file_and_leaves_the_new_one_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("snapshots")).unwrap();
        let name: SnapshotName = "web-01_2026_11_28T14.03.07.091Z.db".parse().unwrap();
        let (first, second) = (dir.path().join("first"), dir.path().join("second"));
        fs::write(&first, b"first").unwrap();
        fs::write(&second, b"second").unwrap();
        let dest = store.commit(&first, &name).unwrap();
        let err = store.commit(&second, &name).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&dest).unwrap(), b"first");
        assert_eq!(fs::read(&second).unwrap(), b"second");
        assert!(!first.exists());
    }
}
