//! Is this file a snapshot we can keep? Hashing, the SQLite header, `quick_check` and the schema.
//!
//! Capture and ingest both end here before a file may enter the store, so "verified" means the same
//! thing whichever way a snapshot arrived.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use rusqlite::{Connection, OpenFlags};
use sha2::{Digest, Sha256};

use crate::schema;

const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Why a file is not an acceptable snapshot. Each message says what was wrong with the file.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read the file: {0}")]
    Io(#[from] io::Error),
    #[error("the file is empty")]
    Empty,
    #[error("not an SQLite database (bad header)")]
    NotSqlite,
    #[error("the SQLite database is damaged: {0}")]
    Corrupt(String),
    #[error("not a snapshot of an endpoint recorder: {0}")]
    NoRecorderSchema(#[from] schema::SchemaError),
    #[error("{0}")]
    NotRegular(String),
    /// Schema objects a recorder never makes: a view posing as a recorder table, a trigger.
    #[error("not a plain recorder database: {0}")]
    Tampered(String),
}

/// What verification learned about a good snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verified {
    /// Total events over all event tables.
    pub events: u64,
    pub oldest_ts: Option<i64>,
    pub newest_ts: Option<i64>,
    /// The hostname the recorder wrote into `meta`, if any.
    pub hostname: Option<String>,
}

/// A streaming sha256 whose result is the lowercase hex people compare with `sha256sum`.
#[derive(Default, Clone)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> String {
        hex::encode(self.0.finalize())
    }
}

/// The sha256 of a whole file, as lowercase hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    sha256_open_file(&File::open(path)?)
}

/// The sha256 of the whole file behind an open handle, read from its start.
pub fn sha256_open_file(file: &File) -> io::Result<String> {
    use std::os::unix::fs::FileExt;
    let mut hasher = Hasher::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let n = file.read_at(&mut buf, offset)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
}

/// Opens `path` for reading only if it is a regular file, without following a symlink in its last
/// component (`O_NOFOLLOW`): a file someone swapped for a symlink after it was checked is refused,
/// not read where the link points.
pub fn open_regular_no_follow(path: &Path) -> Result<File, VerifyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let not_regular = || {
        VerifyError::NotRegular(format!(
            "{} is not a regular file (a symlink or a device)",
            path.display()
        ))
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => not_regular(),
            _ => VerifyError::Io(e),
        })?;
    if !file.metadata()?.is_file() {
        return Err(not_regular());
    }
    Ok(file)
}

/// Verifies the file behind `file` (whatever its path names by now): sha256, then
/// [`verify_snapshot`] through `/proc/self/fd`, which reopens that same file. Returns the
/// verification, the sha256 and the size.
pub fn verify_open_file(file: &File) -> Result<(Verified, String, u64), VerifyError> {
    use std::os::fd::AsRawFd;
    // Hash first: one sequential read that also brings the file into the page cache, where
    // quick_check's scattered reads are several times faster.
    let sha256 = sha256_open_file(file)?;
    let verified = verify_snapshot(Path::new(&format!("/proc/self/fd/{}", file.as_raw_fd())))?;
    Ok((verified, sha256, file.metadata()?.len()))
}

/// Whether `path` still names the very file `file` has open (not a symlink put in its place).
pub fn still_names(path: &Path, file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::symlink_metadata(path), file.metadata()) {
        (Ok(now), Ok(open)) => {
            now.file_type().is_file() && now.ino() == open.ino() && now.dev() == open.dev()
        }
        _ => false,
    }
}

/// Checks the 16-byte SQLite header without opening the file as a database.
pub fn check_header(path: &Path) -> Result<(), VerifyError> {
    let mut header = [0u8; 16];
    let mut file = File::open(path)?;
    let mut read = 0;
    while read < header.len() {
        match file.read(&mut header[read..])? {
            0 if read == 0 => return Err(VerifyError::Empty),
            0 => return Err(VerifyError::NotSqlite),
            n => read += n,
        }
    }
    if &header != SQLITE_MAGIC {
        return Err(VerifyError::NotSqlite);
    }
    Ok(())
}

/// Opens a snapshot file read-only without creating `-wal`/`-shm` files beside it or taking locks:
/// snapshots are never written once they exist. A snapshot is attacker-controlled input, so
/// SQLite's defensive mode is on and its schema is not trusted (no functions with side effects from
/// views or triggers in it).
pub fn open_snapshot(path: &Path) -> Result<Connection, VerifyError> {
    use rusqlite::config::DbConfig;
    let uri = format!("file:{}?immutable=1", uri_escape(&path.to_string_lossy()));
    let corrupt = |e: rusqlite::Error| VerifyError::Corrupt(e.to_string());
    let conn = Connection::open_with_flags(
        uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(corrupt)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)
        .map_err(corrupt)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false)
        .map_err(corrupt)?;
    Ok(conn)
}

/// Refuses what a recorder never writes: a recorder table that is a view (it would answer queries
/// with whatever its author chose) and triggers.
pub fn check_plain_tables(conn: &Connection) -> Result<(), VerifyError> {
    let corrupt = |e: rusqlite::Error| VerifyError::Corrupt(e.to_string());
    let mut stmt = conn
        .prepare("SELECT type FROM sqlite_schema WHERE name = ?1 COLLATE NOCASE")
        .map_err(corrupt)?;
    for table in schema::TABLES {
        let kinds: Vec<String> = stmt
            .query_map([table.name], |r| r.get(0))
            .map_err(corrupt)?
            .collect::<Result<_, _>>()
            .map_err(corrupt)?;
        if let Some(kind) = kinds.iter().find(|k| *k != "table" && *k != "index") {
            return Err(VerifyError::Tampered(format!(
                "recorder table `{}` is a {kind}, not a table",
                table.name
            )));
        }
    }
    let trigger: Option<String> = conn
        .query_row(
            "SELECT name FROM sqlite_schema WHERE type = 'trigger' LIMIT 1",
            [],
            |r| r.get(0),
        )
        .ok();
    if let Some(name) = trigger {
        return Err(VerifyError::Tampered(format!(
            "it holds a trigger (`{name}`), which a recorder never makes"
        )));
    }
    Ok(())
}

fn uri_escape(path: &str) -> String {
    path.bytes()
        .map(|b| match b {
            b'?' | b'#' | b'%' => format!("%{b:02X}"),
            _ => (b as char).to_string(),
        })
        .collect()
}

/// Full verification of a snapshot file: header, `PRAGMA quick_check`, recorder schema, and the
/// event count and time range a catalog entry shows.
pub fn verify_snapshot(path: &Path) -> Result<Verified, VerifyError> {
    verify(path, true)
}

/// [`verify_snapshot`] of a captured copy whose `quick_check` already ran where it was copied: the
/// agent checks the pinned image while it copies it, and the sha256 end to end proves these are
/// the bytes it checked. Spares the server a second walk of every page (seconds on a large file).
pub fn verify_checked_copy(path: &Path) -> Result<Verified, VerifyError> {
    verify(path, false)
}

fn verify(path: &Path, run_quick_check: bool) -> Result<Verified, VerifyError> {
    check_header(path)?;
    let conn = open_snapshot(path)?;
    if run_quick_check {
        quick_check(&conn)?;
    }
    check_plain_tables(&conn)?;
    schema::check(&conn)?;
    let summary = crate::query::summary(&conn).map_err(|e| VerifyError::Corrupt(e.to_string()))?;
    let verified = Verified {
        events: summary.total,
        oldest_ts: summary.oldest_ts,
        newest_ts: summary.newest_ts,
        hostname: conn
            .query_row("SELECT value FROM meta WHERE key = 'hostname'", [], |r| {
                r.get(0)
            })
            .ok(),
    };
    Ok(verified)
}

/// Runs `PRAGMA quick_check`; anything but a single `ok` is [`VerifyError::Corrupt`] with the
/// first problems it names.
pub fn quick_check(conn: &Connection) -> Result<(), VerifyError> {
    let corrupt = |e: rusqlite::Error| VerifyError::Corrupt(e.to_string());
    let mut stmt = conn.prepare("PRAGMA quick_check").map_err(corrupt)?;
    let problems: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .map_err(corrupt)?
        .take(3)
        .collect::<Result<_, _>>()
        .map_err(corrupt)?;
    if problems != ["ok"] {
        return Err(VerifyError::Corrupt(problems.join("; ")));
    }
    Ok(())
}

/// Rewrites a copied WAL-mode database header to rollback-journal mode (bytes 18 and 19 from 2 to
/// 1), so the copy opens on its own, read-only, with no `-wal`/`-shm` beside it. Apply to the first
/// block of a raw copy before hashing it.
pub fn make_standalone(first_block: &mut [u8]) {
    if first_block.len() >= 20 && first_block.starts_with(SQLITE_MAGIC) {
        for b in &mut first_block[18..20] {
            if *b == 2 {
                *b = 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorder_db(path: &Path) {
        let conn = Connection::open(path).unwrap();
        schema::create(&conn).unwrap();
        conn.execute_batch(
            "INSERT INTO meta (ts, key, value) VALUES (1, 'hostname', 'web-01');
             INSERT INTO process (ts, pid, path) VALUES (1000, 1, '/sbin/init');
             INSERT INTO dns (ts, query) VALUES (3000, 'example.org');",
        )
        .unwrap();
    }

    #[test]
    fn a_recorder_database_verifies_with_its_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        recorder_db(&path);
        let v = verify_snapshot(&path).unwrap();
        assert_eq!(v.events, 2);
        assert_eq!((v.oldest_ts, v.newest_ts), (Some(1000), Some(3000)));
        assert_eq!(v.hostname.as_deref(), Some("web-01"));
        assert!(!dir.path().join("a.db-shm").exists());
    }

    #[test]
    fn bad_files_are_rejected_with_their_reason() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.db");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(verify_snapshot(&empty), Err(VerifyError::Empty)));

        let text = dir.path().join("text.db");
        std::fs::write(&text, b"hello, this is not a database at all").unwrap();
        assert!(matches!(
            verify_snapshot(&text),
            Err(VerifyError::NotSqlite)
        ));

        let plain = dir.path().join("plain.db");
        Connection::open(&plain)
            .unwrap()
            .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        assert!(matches!(
            verify_snapshot(&plain),
            Err(VerifyError::NoRecorderSchema(_))
        ));

        let truncated = dir.path().join("truncated.db");
        recorder_db(&truncated);
        let bytes = std::fs::read(&truncated).unwrap();
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(
            verify_snapshot(&truncated),
            Err(VerifyError::Corrupt(_))
        ));
    }

    #[test]
    fn a_recorder_table_that_is_a_view_or_a_trigger_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let view = dir.path().join("view.db");
        recorder_db(&view);
        Connection::open(&view)
            .unwrap()
            .execute_batch(
                "DROP TABLE dns;
                 CREATE TABLE dns_real (id INTEGER PRIMARY KEY, ts INTEGER, process_id INTEGER,
                    query TEXT, qtype TEXT, answer TEXT);
                 CREATE VIEW dns AS SELECT id, ts, process_id, query, qtype, answer FROM dns_real;",
            )
            .unwrap();
        let err = verify_snapshot(&view).unwrap_err();
        assert!(
            matches!(&err, VerifyError::Tampered(m) if m.contains("`dns` is a view")),
            "{err}"
        );

        let trigger = dir.path().join("trigger.db");
        recorder_db(&trigger);
        Connection::open(&trigger)
            .unwrap()
            .execute_batch("CREATE TRIGGER t AFTER INSERT ON process BEGIN DELETE FROM dns; END;")
            .unwrap();
        let err = verify_checked_copy(&trigger).unwrap_err();
        assert!(
            matches!(&err, VerifyError::Tampered(m) if m.contains("trigger")),
            "{err}"
        );
    }

    #[test]
    fn files_are_opened_without_following_symlinks_and_a_swap_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("web-01_2026_01_01T00.00.00.000Z.db");
        recorder_db(&real);
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"not yours").unwrap();
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        assert!(matches!(
            open_regular_no_follow(&link),
            Err(VerifyError::NotRegular(_))
        ));

        let file = open_regular_no_follow(&real).unwrap();
        let (verified, sha256, size) = verify_open_file(&file).unwrap();
        assert_eq!(verified.events, 2);
        assert_eq!(sha256, sha256_file(&real).unwrap());
        assert_eq!(size, std::fs::metadata(&real).unwrap().len());
        assert!(still_names(&real, &file));
        // Swapped for a symlink after it was opened: the path no longer names the checked file.
        std::fs::remove_file(&real).unwrap();
        std::os::unix::fs::symlink(&secret, &real).unwrap();
        assert!(!still_names(&real, &file));
    }

    #[test]
    fn sha256_matches_the_known_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
