//! The recorder database's checkpoints, off the writer.
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses its threshold, on the writer
//! connection: its fsyncs of the WAL and the main file would hold the recorder's writer mutex, and
//! on a busy disk every insert behind it waits (hundreds of ms were measured under parallel
//! builds). So the writer's own threshold is set far out, as a backstop only; after each use of the
//! writer, [`Due`] looks at the WAL (`wal_checkpoint(NOOP)`, microseconds) and, past [`FRAMES`]
//! waiting frames, hands the database to one thread per process that runs a `PASSIVE` checkpoint
//! on a connection of its own, which never blocks the writer. One thread, not one per database:
//! a simulated fleet holds thousands of recorder databases in one process.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

/// Frames waiting in the WAL that start a checkpoint (SQLite's own default threshold).
pub(super) const FRAMES: i64 = 1000;

/// The writer's own automatic-checkpoint threshold in frames: reached only when the checkpoint
/// thread cannot keep up (a bulk prefill), so the WAL still stays bounded.
pub(super) const WRITER_BACKSTOP_FRAMES: i64 = 16 * FRAMES;

/// One database's checkpoint state.
pub(super) struct Due {
    path: PathBuf,
    /// A checkpoint is queued or running; cleared by the thread when it is done.
    queued: Arc<AtomicBool>,
}

struct Request {
    path: PathBuf,
    queued: Arc<AtomicBool>,
}

impl Due {
    pub(super) fn new(path: &Path) -> Due {
        Due {
            path: path.to_path_buf(),
            queued: Arc::default(),
        }
    }

    /// Called with the writer connection after the writer was used: queues a checkpoint when
    /// enough frames wait. Never blocks and never fails the write.
    pub(super) fn after_write(&self, writer: &Connection) {
        if self.queued.load(Ordering::Acquire) {
            return;
        }
        let waiting = writer
            .prepare_cached("PRAGMA wal_checkpoint(NOOP)")
            .and_then(|mut s| s.query_row([], |r| Ok(r.get::<_, i64>(1)? - r.get::<_, i64>(2)?)));
        if !matches!(waiting, Ok(n) if n >= FRAMES) {
            return;
        }
        self.queued.store(true, Ordering::Release);
        let request = Request {
            path: self.path.clone(),
            queued: self.queued.clone(),
        };
        let sent = thread()
            .lock()
            .map(|tx| tx.send(request).is_ok())
            .unwrap_or(false);
        if !sent {
            // No thread: the writer's backstop checkpoints instead.
            self.queued.store(false, Ordering::Release);
        }
    }
}

/// The process's checkpoint thread, started on first use.
fn thread() -> &'static Mutex<Sender<Request>> {
    static THREAD: OnceLock<Mutex<Sender<Request>>> = OnceLock::new();
    THREAD.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        let spawned = std::thread::Builder::new()
            .name("snapq-checkpoint".into())
            .spawn(move || {
                for request in rx {
                    if let Err(e) = checkpoint(&request.path) {
                        tracing::warn!(path = %request.path.display(), error = %e,
                            "recorder checkpoint failed; the writer's own checkpoint will do it");
                    }
                    request.queued.store(false, Ordering::Release);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the recorder's checkpoint thread");
        }
        Mutex::new(tx)
    })
}

fn checkpoint(path: &Path) -> rusqlite::Result<()> {
    // Never creates a file: the database may have been closed and removed since the request.
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
}
