//! A consistent point-in-time copy of a live WAL-mode recorder database at the cost of a file copy.
//!
//! A read transaction begun right after a complete `wal_checkpoint(TRUNCATE)` reads the main file
//! only (SQLite's read-mark 0) and holds the `WAL_READ_LOCK(0)` that every checkpointer needs before
//! it writes back into the main file. While it stays open, writers keep appending to the WAL but
//! nothing touches the main file, so copying the raw main file gives exactly the state that
//! transaction sees (the property Litestream relies on). The copy's header is switched to rollback
//! mode so it opens on its own, without a `-wal` beside it.
//!
//! Staging must not hold the recorder's writer through a checkpoint: the checkpoint's fsyncs would
//! stall every insert behind it (hundreds of ms on a busy disk). So it pins differently
//! ([`pin_at_end`]): holding the writer only to begin a read transaction and to learn the WAL frame
//! K that transaction ends at (`wal_checkpoint(NOOP)`: no commit can come between), it copies the
//! main file with every page found in WAL frames 1..=K replaced by its newest frame there
//! ([`WalPages`]). That is exactly the snapshot: a page in no such frame was last written before
//! this WAL began, and checkpoints, which only copy frames no reader still needs into the main
//! file, never touch it while the read lasts; frames 1..=K are never overwritten while a reader
//! holds a read mark above 0, which a read begun on a WAL not completely checkpointed always does.
//! (A read begun on a completely checkpointed WAL holds mark 0 instead, and then, as above, the
//! main file alone is the snapshot.) The copy takes the snapshot's pages only (`page_count`).
//!
//! `snapq agent export` (another process, which cannot hold the writer) uses [`pin_retrying`]:
//! `wal_checkpoint(TRUNCATE)`, retried until no commit slipped in between it and the pin.
//! Staging copies with [`stage_pinned`], which also runs `quick_check` on the pinned image while it
//! copies; export copies with [`copy_pinned`].

use std::collections::HashMap;
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
    /// The snapshot's size in bytes: its page count times the page size.
    len: u64,
    /// The snapshot's pages that are in the WAL, not (yet) in the main file.
    wal: Option<WalPages>,
}

impl Pinned {
    fn begin(conn: Connection) -> rusqlite::Result<Pinned> {
        conn.execute_batch("BEGIN")?;
        // The first read starts the transaction and takes its read mark. Keep it cheap: the caller
        // may hold the recorder's writer lock until this returns. Counting waits until after the copy.
        let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        Ok(Pinned {
            conn,
            len: (pages * page_size) as u64,
            wal: None,
        })
    }

    /// The size of the copy: the pinned snapshot's pages, whatever the file's length.
    pub fn size(&self) -> u64 {
        self.len
    }

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
    // A connection learns that the database is in WAL mode, and opens the WAL, at its first read;
    // until then a checkpoint through it does nothing and reports -1 frames.
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))?;
    Ok(conn)
}

/// Checkpoints the WAL completely and begins a read transaction that sees only the main file.
///
/// Returns `Ok(None)` when a writer committed between the checkpoint and the start of the read (the
/// caller retries).
fn pin(conn: Connection, db_path: &Path) -> anyhow::Result<Option<Pinned>> {
    let (busy, _, _) = checkpoint(&conn, "TRUNCATE")?;
    if busy != 0 {
        return Ok(None);
    }
    let pinned = Pinned::begin(conn)?;
    // An empty WAL after the read began means it was empty when it began: the read uses mark 0.
    if wal_len(db_path) != 0 {
        return Ok(None);
    }
    Ok(Some(pinned))
}

/// A read transaction begun while the caller holds the recorder's writer, and the WAL frame it
/// ends at; [`PinAtEnd::locate`] finishes the pin once the writer is released.
pub struct PinAtEnd {
    pinned: Pinned,
    /// The WAL frame the read transaction's snapshot ends at.
    end: u32,
    /// Every frame was already in the main file when the read began, so it holds mark 0 and the
    /// main file alone is its snapshot (the WAL may restart under it, so it must not be read).
    checkpointed: bool,
}

/// Begins a read transaction on `conn` and learns, through `probe` (another connection to the
/// same database), the WAL frame it ends at. The caller holds the recorder's only writer, so no
/// commit comes between the two; takes microseconds and never writes or syncs anything.
pub fn pin_at_end(conn: Connection, probe: &Connection) -> anyhow::Result<PinAtEnd> {
    let pinned = Pinned::begin(conn)?;
    let (_, end, done) = checkpoint(probe, "NOOP")?;
    let end = u32::try_from(end).context("the recorder database is not in WAL mode")?;
    Ok(PinAtEnd {
        pinned,
        end,
        checkpointed: i64::from(end) <= done,
    })
}

impl PinAtEnd {
    /// Reads where the snapshot's pages are in the WAL (frame headers only). Run it without the
    /// writer lock: the recorder keeps committing meanwhile, after frame `end`.
    pub fn locate(self, db_path: &Path) -> anyhow::Result<Pinned> {
        let mut pinned = self.pinned;
        if !self.checkpointed {
            let page_size: u32 = pinned
                .conn
                .query_row("PRAGMA page_size", [], |r| r.get(0))?;
            pinned.wal = Some(
                WalPages::read(&wal_path(db_path), self.end, page_size)
                    .context("reading the recorder database's WAL")?,
            );
        }
        Ok(pinned)
    }
}

/// Where the newest copy of each page in WAL frames 1..=end is: an open WAL and, per page number,
/// the offset of that page's data. Opening and closing the WAL is safe: SQLite locks the main file
/// and the `-shm` file, never the WAL.
struct WalPages {
    wal: File,
    page_size: u64,
    offsets: HashMap<u64, u64>,
}

const WAL_HEADER: u64 = 32;
const WAL_FRAME_HEADER: u64 = 24;

impl WalPages {
    fn read(path: &Path, end: u32, page_size: u32) -> io::Result<WalPages> {
        use std::os::unix::fs::FileExt;
        let wal = File::open(path)?;
        let mut header = [0u8; WAL_HEADER as usize];
        wal.read_exact_at(&mut header, 0)?;
        let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let magic = be(&header[0..4]);
        let wal_page_size = match be(&header[8..12]) {
            1 => 65_536,
            n => n,
        };
        if magic & !1 != 0x377f_0682 || wal_page_size != page_size {
            return Err(io::Error::other(format!(
                "{} is not the WAL of a database with {page_size}-byte pages",
                path.display()
            )));
        }
        let page_size = u64::from(page_size);
        let frame = WAL_FRAME_HEADER + page_size;
        let mut offsets = HashMap::new();
        let mut frame_header = [0u8; WAL_FRAME_HEADER as usize];
        for i in 0..u64::from(end) {
            let at = WAL_HEADER + i * frame;
            wal.read_exact_at(&mut frame_header, at)?;
            // Frames of this WAL carry its salts; anything else means it was restarted under us.
            if frame_header[8..16] != header[16..24] {
                return Err(io::Error::other(format!(
                    "frame {} of {} is not of the pinned WAL",
                    i + 1,
                    path.display()
                )));
            }
            offsets.insert(u64::from(be(&frame_header[0..4])), at + WAL_FRAME_HEADER);
        }
        Ok(WalPages {
            wal,
            page_size,
            offsets,
        })
    }

    /// Replaces the pages of `buf` (the snapshot's bytes from `offset`, a multiple of the page
    /// size) that the WAL holds. `from_file` bytes were read from the main file; returns how many
    /// bytes from the start of `buf` are the snapshot's (fewer than `buf.len()` at a page that
    /// neither has).
    fn overlay(&self, buf: &mut [u8], offset: u64, from_file: usize) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let page_size = self.page_size as usize;
        for (i, page) in buf.chunks_mut(page_size).enumerate() {
            match self.offsets.get(&(offset / self.page_size + i as u64 + 1)) {
                Some(&at) => self.wal.read_exact_at(page, at)?,
                None if (i + 1) * page_size > from_file => return Ok(i * page_size),
                None => {}
            }
        }
        Ok(buf.len())
    }
}

/// `PRAGMA wal_checkpoint(MODE)`: (busy, frames in the WAL, frames checkpointed).
fn checkpoint(conn: &Connection, mode: &str) -> anyhow::Result<(i64, i64, i64)> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })
    .context("checkpointing the recorder database")
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

fn wal_path(db_path: &Path) -> PathBuf {
    let mut wal = db_path.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

fn wal_len(db_path: &Path) -> u64 {
    fs::metadata(wal_path(db_path))
        .map(|m| m.len())
        .unwrap_or(0)
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
    let result = write_copy(main_file, &pinned, &partial, durability).and_then(|done| {
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
/// connection (the pages it reads are the ones copied: the pinned snapshot, from the main file and
/// the WAL frames the pin keeps, and the end-to-end sha256 proves the server received them). Then counts the events and ends the pin.
/// `progress` is told the number of bytes written so far.
pub fn stage_pinned(
    pinned: Pinned,
    main_file: &File,
    output: File,
    progress: impl FnMut(u64) + Send,
) -> anyhow::Result<CopyInfo> {
    let Pinned { conn, len, wal } = pinned;
    let started = std::time::Instant::now();
    let info = std::thread::scope(|scope| {
        let copier = scope.spawn(move || {
            let mut output = output;
            let copied = copy_into(main_file, wal.as_ref(), len, &mut output, progress);
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

fn write_copy(
    input: &File,
    pinned: &Pinned,
    dest: &Path,
    durability: Durability,
) -> io::Result<(u64, String)> {
    let mut output = File::create(dest)?;
    let done = copy_into(input, pinned.wal.as_ref(), pinned.len, &mut output, |_| {})?;
    if durability == Durability::Fsync {
        output.sync_all()?;
    }
    Ok(done)
}

/// Copies the first `len` bytes of the snapshot: `input`, with the pages `wal` holds taken from
/// there. A snapshot that neither holds completely is an error.
fn copy_into(
    input: &File,
    wal: Option<&WalPages>,
    len: u64,
    output: &mut File,
    mut progress: impl FnMut(u64),
) -> io::Result<(u64, String)> {
    let mut hasher = Hasher::default();
    // A multiple of every SQLite page size (512 B to 64 KiB), so chunks hold whole pages.
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    let mut first = true;
    while size < len {
        let want = (len - size).min(buf.len() as u64) as usize;
        let mut n = read_full_at(input, &mut buf[..want], size)?;
        if let Some(wal) = wal {
            n = wal.overlay(&mut buf[..want], size, n)?;
        }
        if n < want {
            return Err(io::Error::other(format!(
                "the database file ended at {} bytes, before the {len} bytes of its pinned snapshot",
                size + n as u64
            )));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::recorder::{Event, Limits, RecorderDb};

    fn record_dns(db: &RecorderDb, n: usize) {
        let events: Vec<Event> = (0..n)
            .map(|i| Event::new("dns", 1_000 + i as i64).set("query", format!("query-{i:06}")))
            .collect();
        db.insert_batch(&events).unwrap();
    }

    fn dns_rows(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM dns", [], |r| r.get(0))
            .unwrap()
    }

    /// What staging does: pin under the recorder's writer lock, locate the WAL pages after it.
    fn pin_as_staging(db: &RecorderDb) -> Pinned {
        let conn = open_for_pin(db.path()).unwrap();
        let probe = open_for_pin(db.path()).unwrap();
        let pin = db.with_writer(|_| pin_at_end(conn, &probe)).unwrap();
        pin.locate(db.path()).unwrap()
    }

    /// A checkpoint by someone else (the recorder's checkpoint thread, say): it copies into the
    /// main file what no reader needs any more, also while a copy is being made.
    fn checkpoint_now(db: &RecorderDb) -> (i64, i64) {
        let (_, log, done) = checkpoint(&open_for_pin(db.path()).unwrap(), "PASSIVE").unwrap();
        (log, done)
    }

    fn copy(db: &RecorderDb, pinned: Pinned, dir: &Path) -> (CopyInfo, Connection) {
        let dest = dir.join("copy.db");
        let info = copy_pinned(pinned, db.main_file(), &dest, Durability::Cached).unwrap();
        assert_eq!(info.size, fs::metadata(&dest).unwrap().len());
        assert!(!partial_path(&dest).exists(), "no partial file is left");
        let conn = Connection::open(&dest).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            mode, "delete",
            "the copy is a standalone rollback-mode database"
        );
        snapq_core::verify::quick_check(&conn).unwrap();
        (info, conn)
    }

    #[test]
    fn a_staging_pin_copies_its_snapshot_while_the_recorder_commits_and_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let db =
            RecorderDb::open(&dir.path().join("monitor.db"), "web-01", Limits::default()).unwrap();
        record_dns(&db, 5_000);
        let pinned = pin_as_staging(&db);
        assert!(
            pinned.wal.is_some(),
            "the snapshot's newest pages are in the WAL"
        );
        record_dns(&db, 3_000); // committed after the pin
        let (log, done) = checkpoint_now(&db);
        assert!(
            0 < done && done < log,
            "checkpointed {done} of {log} frames under the pin"
        );
        record_dns(&db, 3_000); // committed while the copy is made
        let (info, copy) = copy(&db, pinned, dir.path());
        assert_eq!(info.events, 5_000);
        assert_eq!(dns_rows(&copy), 5_000);
        assert_eq!(
            dns_rows(&db.reader().unwrap()),
            11_000,
            "the recorder lost nothing"
        );
    }

    #[test]
    fn a_pin_on_a_checkpointed_wal_copies_the_main_file_while_the_wal_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let db =
            RecorderDb::open(&dir.path().join("monitor.db"), "web-01", Limits::default()).unwrap();
        record_dns(&db, 1_000);
        // Every frame in the main file, the WAL not truncated: the pin reads with mark 0.
        let (log, done) = checkpoint_now(&db);
        assert!(
            log > 0 && done == log,
            "{done} of {log} frames checkpointed"
        );
        let pinned = pin_as_staging(&db);
        assert!(pinned.wal.is_none(), "the main file alone is the snapshot");
        record_dns(&db, 500); // restarts the WAL from its first frame
        assert_eq!(dns_rows(&copy(&db, pinned, dir.path()).1), 1_000);
    }

    #[test]
    fn a_database_that_shrank_in_the_wal_is_copied_at_its_pinned_size() {
        let dir = tempfile::tempdir().unwrap();
        let db =
            RecorderDb::open(&dir.path().join("monitor.db"), "web-01", Limits::default()).unwrap();
        record_dns(&db, 20_000);
        db.with_writer(|c| c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)"))
            .unwrap();
        let full = db.main_file().metadata().unwrap().len();
        db.with_writer(|c| {
            c.execute("DELETE FROM dns WHERE id > 1000", [])?;
            crate::agent::recorder::incremental_vacuum(c, 1_000_000)
        })
        .unwrap();
        let pinned = pin_as_staging(&db);
        record_dns(&db, 10); // a later commit: no checkpoint may truncate the file now
        checkpoint_now(&db);
        assert_eq!(
            db.main_file().metadata().unwrap().len(),
            full,
            "the file did not shrink"
        );
        assert!(
            pinned.size() < full / 2,
            "{} of {full} bytes",
            pinned.size()
        );
        let (info, copy) = copy(&db, pinned, dir.path());
        assert!(info.size < full / 2);
        assert_eq!(dns_rows(&copy), 1_000);
    }

    #[test]
    fn a_live_query_reading_older_data_does_not_hold_staging_up() {
        let dir = tempfile::tempdir().unwrap();
        let db =
            RecorderDb::open(&dir.path().join("monitor.db"), "web-01", Limits::default()).unwrap();
        record_dns(&db, 1_000);
        let query = db.reader().unwrap();
        query.execute_batch("BEGIN").unwrap();
        assert_eq!(dns_rows(&query), 1_000);
        record_dns(&db, 2_000); // frames the query does not see
        let pinned = pin_as_staging(&db);
        query.execute_batch("COMMIT").unwrap();
        record_dns(&db, 500);
        checkpoint_now(&db);
        assert_eq!(dns_rows(&copy(&db, pinned, dir.path()).1), 3_000);
    }
}
