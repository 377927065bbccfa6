//! Whether a file is still open for writing by some process: what "a dropped file is complete"
//! and "never move a file while its writer holds it open" rest on.
//!
//! On Linux the answer comes from a read lease (`fcntl(F_SETLEASE, F_RDLCK)`): the kernel grants one
//! only when no process has the file open for writing, and refuses with `EAGAIN` otherwise. The
//! lease is dropped at once, so a writer that opens the file meanwhile is delayed by nothing. Where
//! the kernel cannot say (another platform, a network filesystem without leases, a file this process
//! may not lease) the answer is [`Writers::Unknown`] and callers fall back to a quiet period.

use std::path::Path;

/// What the kernel says about writers of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writers {
    /// No process has the file open for writing.
    None,
    /// At least one process has it open for writing.
    Open,
    /// The kernel could not tell (or the file could not be opened).
    Unknown,
}

/// Asks the kernel whether any process has the regular file at `path` open for writing. Never
/// follows a symlink.
#[cfg(target_os = "linux")]
pub fn writers(path: &Path) -> Writers {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;

    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    else {
        return Writers::Unknown;
    };
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is an open descriptor owned by `file` for the whole call.
    if unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) } == 0 {
        // SAFETY: as above; releasing the lease we were just granted.
        unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
        return Writers::None;
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => Writers::Open,
        // EACCES (not the owner, no CAP_LEASE), EINVAL (no lease support), ...
        _ => Writers::Unknown,
    }
}

#[cfg(not(target_os = "linux"))]
pub fn writers(_path: &Path) -> Writers {
    Writers::Unknown
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn an_open_writer_is_seen_and_a_closed_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let mut writer = std::fs::File::create(&path).unwrap();
        writer.write_all(b"half").unwrap();
        assert_eq!(writers(&path), Writers::Open);
        drop(writer);
        assert_eq!(writers(&path), Writers::None);
        // A reader does not count as a writer.
        let _reader = std::fs::File::open(&path).unwrap();
        assert_eq!(writers(&path), Writers::None);
    }

    #[test]
    fn a_symlink_or_a_missing_file_cannot_be_told() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t");
        std::fs::write(&target, b"x").unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(writers(&link), Writers::Unknown);
        assert_eq!(writers(&dir.path().join("missing")), Writers::Unknown);
    }
}
