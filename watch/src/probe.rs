//! Blocking filesystem probes: which names the watcher considers, and what a file looks like right now.
//!
//! Everything here is synchronous on purpose: the tracker runs these on the blocking pool in batches, so a
//! stalled network filesystem stalls the watcher task, never a runtime worker thread.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Suffixes of files that are still being written by some tool and will be renamed when complete:
/// ours and the ones the brief names (`.partial`, `.tmp`), plus the common transfer tools field staff use
/// (browsers `.crdownload`/`.part`, WinSCP `.filepart`). Submitting one of those would have the ingest job
/// quarantine a download that is still in progress.
const TEMP_SUFFIXES: &[&str] = &[".partial", ".tmp", ".part", ".filepart", ".crdownload"];

/// Whether a directory entry's name may be a dropped snapshot. Deliberately loose: a badly named file is
/// still submitted, because the ingest job quarantines it with a reason a person can read, while a file
/// silently ignored here would just sit in the folder.
pub(crate) fn is_candidate_name(name: &OsStr) -> bool {
    let name = name.to_string_lossy();
    if name.is_empty() || name.starts_with('.') {
        return false;
    }
    let lower = name.to_ascii_lowercase();
    !TEMP_SUFFIXES.iter().any(|suffix| lower.ends_with(suffix))
}

/// What identifies one version of a file: if any of these change, it is a different drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileId {
    pub(crate) len: u64,
    pub(crate) mtime: SystemTime,
    pub(crate) inode: u64,
    /// Inode change time (ns): set by the kernel when the file is created or renamed and not
    /// settable by a copy that preserves mtime, so a new file on a reused inode differs.
    pub(crate) ctime_ns: i64,
}

/// The identity of `path` if it is a regular file now; `None` if it is gone, a directory, a symlink or
/// otherwise unreadable. Symlinks are not followed: a writable drop folder must not let anyone have the
/// server ingest (and then move) a file elsewhere on its disk.
pub(crate) fn probe(path: &Path) -> Option<FileId> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_file() => Some(file_id(&meta)),
        Ok(_) => {
            tracing::debug!(path = %path.display(), "not a regular file; ignored");
            None
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => None,
        Err(err) => {
            tracing::debug!(path = %path.display(), error = %err, "cannot stat; ignored for now");
            None
        }
    }
}

/// Probe many paths in one go (one trip to the blocking pool per timer tick).
#[tracing::instrument(level = "trace", skip_all, fields(count = paths.len()))]
pub(crate) fn probe_all(paths: Vec<PathBuf>) -> Vec<(PathBuf, Option<FileId>)> {
    paths
        .into_iter()
        .map(|path| {
            let id = probe(&path);
            (path, id)
        })
        .collect()
}

/// Every candidate regular file directly inside `dir`, with its identity.
#[tracing::instrument(level = "debug", fields(dir = %dir.display()))]
pub(crate) fn scan(dir: &Path) -> io::Result<Vec<(PathBuf, FileId)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !is_candidate_name(&entry.file_name()) {
            continue;
        }
        let path = entry.path();
        if let Some(id) = probe(&path) {
            found.push((path, id));
        }
    }
    Ok(found)
}

fn file_id(meta: &std::fs::Metadata) -> FileId {
    FileId {
        len: meta.len(),
        mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        inode: inode(meta),
        ctime_ns: ctime_ns(meta),
    }
}

#[cfg(unix)]
fn ctime_ns(meta: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    meta.ctime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.ctime_nsec())
}

#[cfg(not(unix))]
fn ctime_ns(_meta: &std::fs::Metadata) -> i64 {
    0
}

#[cfg(unix)]
fn inode(meta: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(meta)
}

// Stable Rust has no file index on Windows; length and mtime still tell versions apart.
#[cfg(not(unix))]
fn inode(_meta: &std::fs::Metadata) -> u64 {
    0
}

#[cfg(test)]
mod tests {
    use super::is_candidate_name;
    use std::ffi::OsStr;

    #[test]
    fn temporary_and_hidden_names_are_not_candidates() {
        let cases = [
            ("web-01_2026_11_28T14.03.07.091Z.db", true),
            ("anything-else.txt", true),
            ("no_extension", true),
            ("web-01_2026_11_28T14.03.07.091Z.db.partial", false),
            ("x.db.PARTIAL", false),
            ("x.db.tmp", false),
            ("x.TMP", false),
            ("x.db.part", false),
            ("x.db.filepart", false),
            ("x.db.crdownload", false),
            (".x.db", false),
            (".x.db.AbC123", false), // rsync's temporary name
            ("", false),
        ];
        for (name, expected) in cases {
            assert_eq!(is_candidate_name(OsStr::new(name)), expected, "{name:?}");
        }
    }
}
