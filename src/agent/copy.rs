//! A consistent point-in-time copy of a live WAL-mode recorder database at the cost of a file copy.
//!
//! A read transaction begun right after a complete `wal_checkpoint(TRUNCATE)` reads the main file
//! only (SQLite's read-mark 0) and holds the `WAL_READ_LOCK(0)` that every checkpointer needs before
//! it writes back into the main file. While it stays open, writers keep appending to the WAL but
//! nothing touches the main file, so copying the raw main file gives exactly the state that
//! transaction sees (the property Litestream relies on). The copy's header is switched to rollback
//! mode so it opens on its own, without a `-wal` beside it.
//!
//! Both the agent's staging (which holds the recorder's writer lock while it pins, so it succeeds at
//! once) and `snapq agent export` (another process, which retries until no commit slipped in between
//! the checkpoint and the pin) use [`pin`]. Staging copies with [`stage_pinned`], which also runs
//! `quick_check` on the pinned image while it copies; export copies with [`copy_pinned`].

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use rusqlite::Connection;
use snapq_core::verify::{Hasher, make_standalone};

/// A read transaction that pins the main database file; dropping it ends the transaction.
pub struct Pinned {
    conn: Connection,
}

impl Pinned {
    /// A value from the recorder's `meta` table, as of the pinned point in time.
    pub fn meta(&self, key: &str) -> rusqlite::Result<Option<String>> {
        use rusqlite::OptionalExtension;
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
    }
}

/// Whether a copy must reach the disk before it is renamed into place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Evidence handed to a person (`agent export`): fsync the file and its directory.
    Fsync,
    /// A staged copy: the server checks its sha256 end to end and stages again if a crash
    /// damaged it, so the fsync's seconds on a large file buy nothing.
    Cached,
}

/// What a finished copy is.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CopyInfo {
    pub size: u64,
    pub sha256: String,
    pub events: u64,
}

/// Opens a connection on `db_path` that can pin it (read-write so it can checkpoint).
pub fn open_for_pin(db_path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(db_path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// Copies what the WAL holds into the main file without waiting for anyone (`PASSIVE`).
///
/// Staging runs it before it takes the recorder's writer lock, so the complete checkpoint of [`pin`]
/// under that lock copies only what was committed since: the recorder's inserts wait for that
/// short remainder, not for a whole WAL and its fsync.
pub fn checkpoint_passive(conn: &Connection) -> anyhow::Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        .context("checkpointing the recorder database")
}

/// Checkpoints the WAL completely and begins a read transaction that sees only the main file.
///
/// Returns `Ok(None)` when a writer committed between the checkpoint and the start of the read (the
/// caller retries), which cannot happen while the caller holds the only writer's lock.
pub fn pin(conn: Connection, db_path: &Path) -> anyhow::Result<Option<Pinned>> {
    let (busy, _log, _done): (i64, i64, i64) = conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .context("checkpointing the recorder database")?;
    if busy != 0 {
        return Ok(None);
    }
    conn.execute_batch("BEGIN")?;
    // The first read starts the transaction and takes its read mark. Keep it cheap: the caller may
    // hold the recorder's writer lock until this returns. Counting waits until after the copy.
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))?;
    // An empty WAL after the read began means it was empty when it began: the read uses mark 0.
    if wal_len(db_path) != 0 {
        conn.execute_batch("COMMIT")?;
        return Ok(None);
    }
    Ok(Some(Pinned { conn }))
}

/// Pins `db_path` from another process than its writer, retrying briefly while commits slip in.
pub fn pin_retrying(db_path: &Path) -> anyhow::Result<Pinned> {
    for attempt in 0..200 {
        let conn =
            open_for_pin(db_path).with_context(|| format!("opening {}", db_path.display()))?;
        if let Some(pinned) = pin(conn, db_path)? {
            return Ok(pinned);
        }
        std::thread::sleep(Duration::from_millis(1 + attempt % 10));
    }
    bail!(
        "could not pin a consistent view of {}: the recorder kept committing; try again",
        db_path.display()
    )
}

fn wal_len(db_path: &Path) -> u64 {
    let mut wal = db_path.as_os_str().to_owned();
    wal.push("-wal");
    fs::metadata(wal).map(|m| m.len()).unwrap_or(0)
}

/// Copies the pinned main file to `dest` (through `dest` + `.partial`, fsynced, then renamed),
/// hashing on the way, and ends the pin.
///
/// `main_file` is a handle on the database file that the caller keeps open for as long as any
/// SQLite connection to it is open in this process: opening and closing another descriptor here
/// would drop SQLite's POSIX locks (they belong to the process, not the descriptor), and another
/// process would then see no readers, checkpoint under the pin and delete the live WAL.
pub fn copy_pinned(
    pinned: Pinned,
    main_file: &File,
    dest: &Path,
    durability: Durability,
) -> anyhow::Result<CopyInfo> {
    let partial = partial_path(dest);
    // Count inside the same read transaction, after the copy has brought the file into the page
    // cache: on a cold multi-GB database that is the difference between seconds and milliseconds.
    let result = write_copy(main_file, &partial, durability).and_then(|done| {
        let events = snapq_core::query::summary(&pinned.conn)
            .map_err(|e| io::Error::other(format!("counting the events in the copy: {e}")))?
            .total;
        Ok((done, events))
    });
    drop(pinned.conn);
    let ((size, sha256), events) = match result {
        Ok(done) => done,
        Err(e) => {
            let _ = fs::remove_file(&partial);
            return Err(e).with_context(|| format!("writing {}", partial.display()));
        }
    };
    fs::rename(&partial, dest)
        .with_context(|| format!("renaming {} into place", partial.display()))?;
    if let (Durability::Fsync, Some(dir)) = (durability, dest.parent()) {
        File::open(dir).and_then(|d| d.sync_all())?;
    }
    Ok(CopyInfo {
        size,
        sha256,
        events,
    })
}

/// The temporary name a file has while it is written; never shown as a finished file.
pub fn partial_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// Copies the pinned main file into `output`, an already created file the agent serves while it
/// grows, and at the same time checks the image it copies with `PRAGMA quick_check` on the pinned
/// connection (the pages it reads are the ones copied: the pin keeps the main file still, and the
/// end-to-end sha256 proves the server received them). Then counts the events and ends the pin.
/// `progress` is told the number of bytes written so far.
pub fn stage_pinned(
    pinned: Pinned,
    main_file: &File,
    output: File,
    progress: impl FnMut(u64) + Send,
) -> anyhow::Result<CopyInfo> {
    let conn = pinned.conn;
    let started = std::time::Instant::now();
    let info = std::thread::scope(|scope| {
        let copier = scope.spawn(move || {
            let mut output = output;
            let copied = copy_into(main_file, &mut output, progress);
            tracing::debug!(
                secs = started.elapsed().as_secs_f64(),
                "staged copy written"
            );
            copied
        });
        let checked = snapq_core::verify::quick_check(&conn);
        tracing::debug!(secs = started.elapsed().as_secs_f64(), "quick_check done");
        // The pin must outlive the copy, whatever the check found.
        let copied = copier
            .join()
            .map_err(|_| anyhow::anyhow!("the copy thread panicked"))?;
        let (size, sha256) = copied.context("writing the staged copy")?;
        checked.context("checking the recorder database")?;
        let events = snapq_core::query::summary(&conn)
            .context("counting the events in the copy")?
            .total;
        anyhow::Ok(CopyInfo {
            size,
            sha256,
            events,
        })
    });
    drop(conn);
    info
}

fn write_copy(input: &File, dest: &Path, durability: Durability) -> io::Result<(u64, String)> {
    let mut output = File::create(dest)?;
    let done = copy_into(input, &mut output, |_| {})?;
    if durability == Durability::Fsync {
        output.sync_all()?;
    }
    Ok(done)
}

fn copy_into(
    input: &File,
    output: &mut File,
    mut progress: impl FnMut(u64),
) -> io::Result<(u64, String)> {
    let mut hasher = Hasher::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    let mut first = true;
    loop {
        let n = read_full_at(input, &mut buf, size)?;
        if n == 0 {
            break;
        }
        if first {
            make_standalone(&mut buf[..n]);
            first = false;
        }
        hasher.update(&buf[..n]);
        output.write_all(&buf[..n])?;
        size += n as u64;
        progress(size);
    }
    Ok((size, hasher.finish()))
}

/// Fills `buf` from `offset` with positioned reads (the handle's own position is never used).
fn read_full_at(input: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut filled = 0;
    while filled < buf.len() {
        match input.read_at(&mut buf[filled..], offset + filled as u64)? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}
