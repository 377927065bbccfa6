//! The drop-folder watcher: notices when a snapshot file that field staff dropped into a folder is
//! *complete* and hands its path to a callback.
//!
//! It exists because "a file appeared" is not "a file is ready": a copy over SMB or `scp` shows up at
//! once and grows for minutes, and ingesting it early would quarantine half a snapshot. The watcher owns
//! exactly that question and nothing else: it never reads file contents, validates names or writes the
//! catalog; the server turns each [`Candidate`] into an ingest job, which validates, dedupes by sha256 and
//! quarantines bad files with a reason.
//!
//! When a file counts as complete:
//! - **renamed or moved into the folder** (`mv`, or a tool that writes `x.db.partial` and renames it):
//!   at once;
//! - **closed after writing** (`cp`, `scp`, Explorer over SMB on the server's side): at once when
//!   the kernel confirms that no process still has it open for writing (a read lease, see
//!   `snapq_core::writers`);
//! - **written in place**: once its size, mtime and inode stayed the same for
//!   [`WatchConfig::quiet_period`] *and* no process has it open for writing. A writer that stalls
//!   with the file open (a network hiccup) keeps it waiting however long the stall; where the kernel
//!   cannot tell (network filesystems, files the server may not lease) the quiet period alone decides.
//! - **already there at start-up, or found by the periodic rescan** (missed events, network filesystems,
//!   notification queue overflow): after one quiet period of not changing.
//!
//! Ignored: dot-files, temporary names (`*.partial`, `*.tmp`, `*.part`, `*.filepart`, `*.crdownload`),
//! directories and symlinks (a drop folder must not let anyone point the server at other files).
//! Within one run a file is submitted once per version (path, length, mtime, inode); a failed submission
//! is retried at the next rescan. Across restarts the same file is submitted again: the ingest job's
//! sha256 dedupe and [`Candidate::identity_key`] make that harmless.

mod probe;
mod tracker;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use crate::probe::FileId;
use crate::tracker::{Command, EventSource, SubmitFn, SubmitFuture, Tracker};

/// Room for bursts of notify events before they are dropped (and answered with a rescan).
const EVENT_BUFFER: usize = 8192;

/// Where to watch and how patient to be.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// The drop folder; created if missing.
    pub dir: PathBuf,
    /// How long a file written in place must stay unchanged before it counts as complete.
    pub quiet_period: Duration,
    /// How often the whole folder is listed to catch what notifications missed.
    pub rescan_interval: Duration,
    /// Use file notifications (inotify and friends). Turn off for folders on network filesystems, where
    /// watching "works" but never reports the other machines' writes; the watcher then relies on rescans
    /// (so set a shorter `rescan_interval`).
    pub use_notify: bool,
}

impl WatchConfig {
    pub const DEFAULT_QUIET_PERIOD: Duration = Duration::from_secs(2);
    pub const DEFAULT_RESCAN_INTERVAL: Duration = Duration::from_secs(30);

    /// Watch `dir` with the default quiet period (2 s) and rescan interval (30 s).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            quiet_period: Self::DEFAULT_QUIET_PERIOD,
            rescan_interval: Self::DEFAULT_RESCAN_INTERVAL,
            use_notify: true,
        }
    }
}

/// A file in the drop folder that has not been handed over yet, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitingFile {
    pub path: PathBuf,
    /// Its length at the last look (`None` before the first look after an event).
    pub len: Option<u64>,
    /// How long it has not changed.
    pub unchanged_for: Duration,
    /// It stopped changing, but a process still has it open for writing: it is taken once that
    /// writer closes it.
    pub writer_open: bool,
}

/// Asks a running watcher what it is waiting for (cheap to clone).
#[derive(Debug, Clone)]
pub struct StatusHandle {
    dir: PathBuf,
    uses_notify: bool,
    commands: mpsc::Sender<Command>,
}

impl StatusHandle {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn uses_notify(&self) -> bool {
        self.uses_notify
    }

    /// The files not handed over yet (still changing, within the quiet period, or held open by a
    /// writer), longest-unchanged first.
    pub async fn waiting(&self) -> Result<Vec<WaitingFile>, WatchError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || WatchError::Stopped {
            path: self.dir.clone(),
        };
        self.commands
            .send(Command::Status(reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())
    }
}

/// A complete file, handed to the submit callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Absolute path inside the (canonicalized) drop folder.
    pub path: PathBuf,
    pub len: u64,
    /// Modification time, milliseconds since the Unix epoch.
    pub mtime_ms: i64,
    /// Inode number (0 where the platform has none, i.e. Windows).
    pub inode: u64,
    /// Inode change time, ns since the Unix epoch (0 where the platform has none).
    pub ctime_ns: i64,
}

impl Candidate {
    fn new(path: PathBuf, id: FileId) -> Self {
        Self {
            path,
            len: id.len,
            mtime_ms: epoch_ms(id.mtime),
            inode: id.inode,
            ctime_ns: id.ctime_ns,
        }
    }

    /// `"<file name>:<len>:<mtime_ms>:<inode>:<ctime_ns>"`: the same for the same version of the
    /// same dropped file, across watcher restarts. Meant as the idempotency key of the ingest job
    /// the server enqueues. The change time tells a new file on a reused inode from the old one
    /// even when a copy preserved name, length and mtime.
    pub fn identity_key(&self) -> String {
        let name = self
            .path
            .file_name()
            .map(|name| name.to_string_lossy())
            .unwrap_or_default();
        format!(
            "{name}:{}:{}:{}:{}",
            self.len, self.mtime_ms, self.inode, self.ctime_ns
        )
    }
}

fn epoch_ms(time: SystemTime) -> i64 {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot create drop folder {}: check that the server's user may create it", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("drop folder {} exists but is not a directory: move that file away or choose another folder", path.display())]
    NotADirectory { path: PathBuf },
    #[error("cannot read drop folder {}: check that the server's user may list it", path.display())]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid watch configuration: {0}")]
    InvalidConfig(&'static str),
    #[error("the watcher of drop folder {} has stopped", path.display())]
    Stopped { path: PathBuf },
    #[error("the watcher of drop folder {} crashed: {message}", path.display())]
    Crashed { path: PathBuf, message: String },
}

/// A running watcher. Dropping it stops watching (after the submission in flight, if any);
/// [`Watcher::stop`] does the same and waits for it.
#[derive(Debug)]
pub struct Watcher {
    dir: PathBuf,
    uses_notify: bool,
    stop: watch::Sender<bool>,
    commands: mpsc::Sender<Command>,
    task: JoinHandle<()>,
}

impl Watcher {
    /// The canonical path of the watched folder (what [`Candidate::path`]s start with).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether file notifications are active; `false` means rescans only (disabled, or the filesystem
    /// or platform refused them).
    pub fn uses_notify(&self) -> bool {
        self.uses_notify
    }

    /// Rescans the folder now and resolves once nothing in it is waiting any more: every complete
    /// file has been handed to `submit` (or failed to and awaits the next rescan). Files still being
    /// written keep it waiting. For tests and "drain before shutdown".
    pub async fn idle(&self) -> Result<(), WatchError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || WatchError::Stopped {
            path: self.dir.clone(),
        };
        self.commands
            .send(Command::Idle(reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())
    }

    /// A handle that asks this watcher what it is waiting for, for status pages.
    pub fn status_handle(&self) -> StatusHandle {
        StatusHandle {
            dir: self.dir.clone(),
            uses_notify: self.uses_notify,
            commands: self.commands.clone(),
        }
    }

    /// Stops watching and waits for the watcher task to end; reports a crash of that task.
    pub async fn stop(self) -> Result<(), WatchError> {
        let _ = self.stop.send(true);
        self.task.await.map_err(|err| WatchError::Crashed {
            path: self.dir,
            message: err.to_string(),
        })
    }
}

/// Starts watching `config.dir` (creating it if needed) and calls `submit` with every file that is
/// complete, one at a time. An `Err` from `submit` is logged and the file retried at the next rescan.
///
/// Errors if the folder cannot be created or listed. If file notifications cannot be set up there, it
/// logs a warning and relies on rescans.
#[tracing::instrument(skip_all, fields(dir = %config.dir.display()))]
pub async fn spawn<F, Fut, E>(config: WatchConfig, submit: F) -> Result<Watcher, WatchError>
where
    F: Fn(Candidate) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    if config.rescan_interval.is_zero() {
        return Err(WatchError::InvalidConfig(
            "rescan_interval must be more than zero",
        ));
    }
    let dir = prepare_dir(&config.dir).await?;

    let (event_tx, events) = mpsc::channel(EVENT_BUFFER);
    let missed = Arc::new(AtomicBool::new(false));
    let watcher = if config.use_notify {
        let missed = missed.clone();
        let handler = move |event: notify::Result<notify::Event>| {
            if let Err(mpsc::error::TrySendError::Full(_)) = event_tx.try_send(event) {
                missed.store(true, Ordering::Relaxed);
            }
        };
        match start_notify(&dir, handler) {
            Ok(watcher) => Some(watcher),
            Err(err) => {
                tracing::warn!(
                    error = %err,
                    rescan_interval = ?config.rescan_interval,
                    "cannot get file notifications for the drop folder; relying on periodic rescans only"
                );
                None
            }
        }
    } else {
        tracing::debug!("file notifications disabled; relying on periodic rescans");
        None
    };
    let uses_notify = watcher.is_some();

    let submit: SubmitFn = Arc::new(move |candidate| -> SubmitFuture {
        let fut = submit(candidate);
        Box::pin(async move { fut.await.map_err(|err| format!("{err:#}")) })
    });
    let (stop, stop_rx) = watch::channel(false);
    let (commands, commands_rx) = mpsc::channel(16);
    let tracker = Tracker {
        dir: dir.clone(),
        quiet_period: config.quiet_period,
        rescan_interval: config.rescan_interval,
        submit,
        commands: commands_rx,
        stop: stop_rx,
        pending: Default::default(),
        submitted: Default::default(),
        idle_waiters: Vec::new(),
    };
    let source = EventSource {
        watcher,
        events,
        missed,
    };
    let span = tracing::info_span!("watch", dir = %dir.display());
    let task = tokio::spawn(tracker.run(source).instrument(span));
    tracing::debug!(uses_notify, "watching drop folder");

    Ok(Watcher {
        dir,
        uses_notify,
        stop,
        commands,
        task,
    })
}

/// Creates the folder if needed, checks it can be listed, and returns its canonical path (the form
/// notification backends report paths in).
#[tracing::instrument(fields(dir = %dir.display()))]
async fn prepare_dir(dir: &Path) -> Result<PathBuf, WatchError> {
    match tokio::fs::metadata(dir).await {
        Ok(meta) if !meta.is_dir() => {
            return Err(WatchError::NotADirectory {
                path: dir.to_path_buf(),
            });
        }
        Ok(_) => {}
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            return Err(WatchError::ReadDir {
                path: dir.to_path_buf(),
                source: err,
            });
        }
        Err(_) => tokio::fs::create_dir_all(dir)
            .await
            .map_err(|source| WatchError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?,
    }
    let read_dir = |source| WatchError::ReadDir {
        path: dir.to_path_buf(),
        source,
    };
    let canonical = tokio::fs::canonicalize(dir).await.map_err(read_dir)?;
    // Opening it is the check: listing is what rescans need (and the one failure notify won't report).
    let _listing = tokio::fs::read_dir(&canonical).await.map_err(read_dir)?;
    Ok(canonical)
}

fn start_notify(
    dir: &Path,
    handler: impl notify::EventHandler,
) -> notify::Result<RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(handler)?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_key_names_the_file_version() {
        let candidate = Candidate {
            path: PathBuf::from("/srv/watch/web-01_2026_11_28T14.03.07.091Z.db"),
            len: 4096,
            mtime_ms: 1_795_000_000_123,
            inode: 42,
            ctime_ns: 1_795_000_000_123_456_789,
        };
        assert_eq!(
            candidate.identity_key(),
            "web-01_2026_11_28T14.03.07.091Z.db:4096:1795000000123:42:1795000000123456789"
        );
    }

    #[test]
    fn a_new_file_on_a_reused_inode_with_a_preserved_mtime_gets_a_new_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web-01_2026_11_28T14.03.07.091Z.db");
        std::fs::write(&path, b"first").unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let first = Candidate::new(path.clone(), crate::probe::probe(&path).unwrap());
        std::fs::remove_file(&path).unwrap();
        // File times tick with the kernel's clock (a few ms): let it move on.
        std::thread::sleep(Duration::from_millis(30));
        std::fs::write(&path, b"other").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let second = Candidate::new(path.clone(), crate::probe::probe(&path).unwrap());
        assert_eq!(
            (first.len, first.mtime_ms),
            (second.len, second.mtime_ms),
            "same name, length and mtime"
        );
        assert_ne!(first.identity_key(), second.identity_key());
    }

    #[test]
    fn mtimes_before_the_epoch_are_negative_milliseconds() {
        let before = SystemTime::UNIX_EPOCH - Duration::from_millis(1500);
        assert_eq!(epoch_ms(before), -1500);
        assert_eq!(
            epoch_ms(SystemTime::UNIX_EPOCH + Duration::from_millis(7)),
            7
        );
    }
}
