//! Kernel mode of the Linux recorder: processes from the process-events connector, file changes
//! from fanotify, written in batches every `interval`; sockets and logons are still polled.
//!
//! Processes: a `fork` is remembered without a row; the `exec` that follows reads `/proc/PID`
//! (path, cmdline, user, sha256) and writes one row that starts at the fork. A fork that never
//! runs `exec` gets a row with its parent's image once it has lived a second, or when it exits. `exit` fills `end_ts` and `exit_code`. A process gone before `/proc/PID` could be
//! read keeps what the events carried (pid, ppid, times, exit code; its command name if its
//! zombie could still be read) and its cmdline says the details were lost.
//!
//! Threads: a reader thread (real-time priority when allowed) receives the process events and
//! reads `/proc/PID` at each exec at once; the recorder loop applies them in order, handles file
//! events, polls sockets and logons and writes the batches; a hashing thread hashes executables
//! seen for the first time; retention runs on its own thread. When the socket overruns (ENOBUFS) the loss is counted,
//! logged, and `/proc` is scanned again so no running process stays unknown.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::files::{self, Entry, FanEvent};
use super::hasher::Hasher;
use super::procs::{self, ProcEvent};
use super::sys;
use super::{
    LinuxConfig, RETENTION_INTERVAL, RecorderDb, Row, State, Tracked, read_cmdline, read_stat,
};
use crate::agent::recorder::db::{Event, now_ms};
use crate::agent::recorder::handle::{Ticker, next_tick};

/// The `meta` key holding the recorder's mode per event type, as a JSON object.
pub const MODES_META_KEY: &str = "recorder_modes";
/// The `meta` key counting process-event overruns (each followed by a `/proc` rescan).
pub const OVERRUNS_META_KEY: &str = "process_event_overruns";
/// What fanotify reports: create, close after writing, delete, rename (old and new name).
const FILE_MASK: u64 =
    libc::FAN_CREATE | libc::FAN_DELETE | libc::FAN_CLOSE_WRITE | libc::FAN_RENAME;
/// Directory handles resolved to paths are cached for one batch (a directory renamed within one
/// batch interval may be reported under its old path).
const DIR_CACHE_MAX: usize = 4096;
/// The most process events the reader hands over at once.
const PREFETCH_BATCH: usize = 4096;
/// Stands for the directory of a file event whose directory was gone before it could be resolved.
const UNPLACED: &str = "...";
/// A fork that has not run `exec` for this long gets a row with its parent's image (a loaded
/// machine can take well over one batch interval between a fork and its exec).
const FORK_GRACE: Duration = Duration::from_secs(1);
/// Above this share of one core, the reader leaves real-time priority.
const REALTIME_MAX_SHARE: f64 = 0.5;
/// The process-event reader thread's nice value.
const READER_NICE: i32 = -10;
/// What a process row's cmdline says when the process was gone before it could be read.
pub const DETAILS_LOST: &str = "(exited before its details could be read)";

/// How the recorder records each event type: `kernel events`, `polling every N ms`, or
/// `not recorded`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Modes {
    pub process: String,
    pub file: String,
    pub network: String,
    pub auth: String,
    /// Why kernel events are not used, if they are not.
    pub fallback_reason: Option<String>,
}

impl Modes {
    /// Per event type, as stored under [`MODES_META_KEY`].
    pub fn to_map(&self) -> BTreeMap<String, String> {
        [
            ("process", &self.process),
            ("file", &self.file),
            ("network", &self.network),
            ("auth", &self.auth),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.to_map()).expect("a map of strings serializes")
    }

    /// Reads what [`Modes::to_json`] wrote; an unreadable value gives an empty map.
    pub fn parse(json: &str) -> BTreeMap<String, String> {
        serde_json::from_str(json).unwrap_or_default()
    }

    pub(super) fn log(&self, config: &LinuxConfig) {
        if let Some(reason) = &self.fallback_reason {
            tracing::warn!(
                %reason,
                "kernel events unavailable: the linux recorder falls back to {} for processes and does not record file changes",
                self.process
            );
        }
        tracing::info!(
            process = %self.process,
            file = %self.file,
            network = %self.network,
            auth = %self.auth,
            watch = ?config.watch,
            exclude = ?config.exclude,
            "linux recorder started"
        );
    }
}

/// The kernel interfaces kernel mode reads.
pub(super) struct Sources {
    conn: sys::ProcConnector,
    fan: Option<sys::Fanotify>,
}

/// Opens what the kernel and privileges allow, and says what each event type will use.
pub(super) fn open_sources(config: &LinuxConfig) -> (Modes, Option<Sources>) {
    let poll = format!("polling every {} ms", config.interval.as_millis());
    let mut modes = Modes {
        process: poll.clone(),
        file: "not recorded".into(),
        network: poll.clone(),
        auth: poll,
        fallback_reason: None,
    };
    if !config.kernel_events {
        modes.fallback_reason = Some("kernel events are turned off".into());
        return (modes, None);
    }
    let conn = match open_connector(config.netlink_rcvbuf) {
        Ok(c) => c,
        Err(reason) => {
            modes.fallback_reason = Some(reason);
            return (modes, None);
        }
    };
    tracing::info!(
        rcvbuf = conn.rcvbuf,
        forced = conn.forced,
        "process-events connector subscribed"
    );
    modes.process = "kernel events".into();
    let fan = match open_fanotify(&config.watch) {
        Ok(f) => {
            modes.file = "kernel events".into();
            Some(f)
        }
        Err(reason) => {
            tracing::warn!(%reason, "file changes are not recorded");
            None
        }
    };
    (modes, Some(Sources { conn, fan }))
}

fn open_connector(rcvbuf: usize) -> Result<sys::ProcConnector, String> {
    if !sys::has_capability(sys::CAP_NET_ADMIN) {
        return Err("the process-events connector needs root (CAP_NET_ADMIN)".into());
    }
    let conn = sys::ProcConnector::open(rcvbuf)
        .map_err(|e| format!("the process-events connector cannot be opened: {e}"))?;
    // The kernel acks the subscription (possibly after events already flowing).
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = vec![0u8; 8192];
    while Instant::now() < deadline {
        let _ = sys::poll_readable(&[conn.as_fd()], Duration::from_millis(100));
        loop {
            match conn.recv(&mut buf) {
                Ok(n) => {
                    for ev in procs::parse(&buf[..n]) {
                        match ev {
                            ProcEvent::Ack { err: 0 } => return Ok(conn),
                            ProcEvent::Ack { err } => {
                                return Err(format!(
                                    "the kernel refused the process-events subscription: {}",
                                    io::Error::from_raw_os_error(err as i32)
                                ));
                            }
                            _ => {}
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                Err(e) => return Err(format!("the process-events connector failed: {e}")),
            }
        }
    }
    Err("the kernel did not answer the process-events subscription".into())
}

fn open_fanotify(watch: &[PathBuf]) -> Result<sys::Fanotify, String> {
    for (cap, name) in [
        (sys::CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        (sys::CAP_DAC_READ_SEARCH, "CAP_DAC_READ_SEARCH"),
    ] {
        if !sys::has_capability(cap) {
            return Err(format!("fanotify filesystem marks need root ({name})"));
        }
    }
    let mut fan = sys::Fanotify::new().map_err(|e| format!("fanotify_init failed: {e}"))?;
    for path in watch {
        fan.mark_filesystem(path, FILE_MASK).map_err(|e| {
            format!(
                "fanotify cannot watch {} ({e}; renames need Linux 5.17+)",
                path.display()
            )
        })?;
    }
    Ok(fan)
}

/// A forked process that has not run `exec` yet.
#[derive(Debug, Clone, Copy)]
pub(super) struct Fork {
    ts: i64,
    ppid: i32,
    since: Instant,
}

/// Which file paths are recorded: under a watched path and under no excluded one.
#[derive(Debug, Clone, Default)]
pub(super) struct FileFilter {
    watch: Vec<PathBuf>,
    exclude: Vec<PathBuf>,
    /// Directory handle → path, for the current batch.
    dirs: HashMap<Vec<u8>, PathBuf>,
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

impl FileFilter {
    pub(super) fn new(config: &LinuxConfig) -> FileFilter {
        FileFilter {
            watch: config.watch.iter().map(|p| canonical(p)).collect(),
            exclude: config.exclude.iter().map(|p| canonical(p)).collect(),
            dirs: HashMap::new(),
        }
    }

    pub(super) fn keeps(&self, path: &Path) -> bool {
        self.watch.iter().any(|w| path.starts_with(w))
            && !self.exclude.iter().any(|x| path.starts_with(x))
    }

    fn resolve(&mut self, fan: &sys::Fanotify, e: &Entry) -> PathBuf {
        let dir = match self.dirs.get(&e.handle) {
            Some(d) => Some(d.clone()),
            None => match fan.handle_path(e.fsid, &e.handle) {
                Ok(d) => {
                    if self.dirs.len() >= DIR_CACHE_MAX {
                        self.dirs.clear();
                    }
                    self.dirs.insert(e.handle.clone(), d.clone());
                    Some(d)
                }
                Err(_) => None,
            },
        };
        match dir {
            Some(d) => d.join(&e.name),
            // The directory is gone already: at least the name.
            None => Path::new(UNPLACED).join(&e.name),
        }
    }
}

pub(super) struct Details {
    exe: Option<String>,
    /// The executable itself, held open to hash it even after the process is gone.
    exe_file: Option<std::fs::File>,
    cmdline: String,
    ppid: i32,
    start_ticks: u64,
    euid: Option<u32>,
}

/// What `/proc/PID` says about a live process; `None` once it has exited (even if not reaped).
/// The command line first: it is what a short-lived process is most often identified by, and it
/// reads empty once the process has exited.
fn read_details(pid: i32) -> Option<Details> {
    let cmdline = read_cmdline(pid)?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    let exe_file = exe
        .as_ref()
        .and_then(|_| std::fs::File::open(format!("/proc/{pid}/exe")).ok());
    let stat = read_stat(pid);
    // The owner of /proc/PID is the process's effective uid (root for a non-dumpable process,
    // e.g. one running a setuid-root binary): cheaper than parsing /proc/PID/status.
    let euid = std::fs::metadata(format!("/proc/{pid}"))
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m));
    Some(Details {
        exe,
        exe_file,
        cmdline,
        ppid: stat.as_ref().map_or(0, |s| s.ppid),
        start_ticks: stat.as_ref().map_or(0, |s| s.start_ticks),
        euid,
    })
}

impl State {
    fn ts_ms(&self, ts_ns: u64, offset_ns: i128) -> i64 {
        i64::try_from((i128::from(ts_ns) + offset_ns) / 1_000_000).unwrap_or_else(|_| now_ms())
    }

    fn lost_cmdline(&self, pid: i32) -> String {
        let comm = self.comms.get(&pid).map_or("?", String::as_str);
        format!("[{comm}] {DETAILS_LOST}")
    }

    /// A tracked process from `/proc`, or `None` if it is gone.
    fn tracked_from_proc(&mut self, pid: i32, ppid: Option<i32>) -> Option<Tracked> {
        let d = self.prefetched.remove(&pid).or_else(|| read_details(pid))?;
        let user = d.euid.map(|u| self.user_name(u));
        let (sha256, sha_pending) = match d.exe_file {
            Some(f) => self.sha256_of_exe(f).split(),
            None => (None, None),
        };
        Some(Tracked {
            start_ticks: d.start_ticks,
            row: Row::Pending(0),
            exe: d.exe,
            cmdline: d.cmdline,
            ppid: ppid.unwrap_or(d.ppid),
            user,
            sha256,
            sha_pending,
            scanned_ns: None,
        })
    }

    /// Gives a pending fork its row: its image read now (a forked process runs its parent's image
    /// until `exec`), or copied from its parent if it is gone already.
    pub(super) fn materialize_fork(&mut self, pid: i32, depth: u32) {
        let Some(f) = self.forks.remove(&pid) else {
            return;
        };
        if depth < 16 && self.forks.contains_key(&f.ppid) {
            self.materialize_fork(f.ppid, depth + 1);
        }
        let t = match self.tracked_from_proc(pid, Some(f.ppid)) {
            Some(t) => t,
            None => match self.procs.get(&f.ppid) {
                Some(p) => Tracked {
                    start_ticks: 0,
                    row: Row::Pending(0),
                    exe: p.exe.clone(),
                    cmdline: p.cmdline.clone(),
                    ppid: f.ppid,
                    user: p.user.clone(),
                    sha256: p.sha256.clone(),
                    sha_pending: p.sha_pending,
                    scanned_ns: None,
                },
                None => Tracked {
                    start_ticks: 0,
                    row: Row::Pending(0),
                    exe: None,
                    cmdline: self.lost_cmdline(pid),
                    ppid: f.ppid,
                    user: None,
                    sha256: None,
                    sha_pending: None,
                    scanned_ns: None,
                },
            },
        };
        self.push_process(pid, f.ts, t);
    }

    /// Forks that have lived `age` without `exec` get their rows.
    fn materialize_old_forks(&mut self, age: Duration) {
        let mut due: Vec<(i64, i32)> = self
            .forks
            .iter()
            .filter(|(_, f)| f.since.elapsed() >= age)
            .map(|(pid, f)| (f.ts, *pid))
            .collect();
        due.sort_unstable();
        for (_, pid) in due {
            self.materialize_fork(pid, 0);
        }
    }

    /// The row of the process `pid` (giving a pending fork its row first).
    fn row_for_pid(&mut self, pid: i32) -> Option<Row> {
        if self.forks.contains_key(&pid) {
            self.materialize_fork(pid, 0);
        }
        self.procs.get(&pid).map(|t| t.row)
    }

    /// Whether a `/proc` scan recorded `pid` after the event at `ts_ns` happened.
    fn scanned_after(&self, pid: i32, ts_ns: u64) -> bool {
        self.procs
            .get(&pid)
            .and_then(|t| t.scanned_ns)
            .is_some_and(|s| s >= ts_ns)
    }

    pub(super) fn on_proc_event(&mut self, ev: ProcEvent, offset_ns: i128) {
        match ev {
            ProcEvent::Ack { .. } => {}
            ProcEvent::Fork {
                ts_ns,
                parent_tgid,
                child_pid,
                child_tgid,
            } => {
                if child_pid != child_tgid || self.scanned_after(child_tgid, ts_ns) {
                    return; // a thread, or already recorded by a later scan
                }
                let ts = self.ts_ms(ts_ns, offset_ns);
                if let Some(stale) = self.procs.remove(&child_tgid) {
                    self.end_row(stale.row, ts, None); // its exit was lost
                }
                self.forks.insert(
                    child_tgid,
                    Fork {
                        ts,
                        ppid: parent_tgid,
                        since: Instant::now(),
                    },
                );
            }
            ProcEvent::Exec { ts_ns, tgid, .. } => {
                if self.scanned_after(tgid, ts_ns) {
                    return;
                }
                let ts = self.ts_ms(ts_ns, offset_ns);
                let fork = self.forks.remove(&tgid);
                let old = self.procs.remove(&tgid);
                if let Some(o) = &old {
                    self.end_row(o.row, ts, None); // a new image: the old row ends
                }
                let known_ppid = fork.map(|f| f.ppid).or(old.as_ref().map(|o| o.ppid));
                if let Some(ppid) = known_ppid
                    && self.forks.contains_key(&ppid)
                {
                    self.materialize_fork(ppid, 1);
                }
                let start = fork.map_or(ts, |f| f.ts);
                let t = match self.tracked_from_proc(tgid, known_ppid) {
                    Some(t) => t,
                    None => Tracked {
                        start_ticks: 0,
                        row: Row::Pending(0),
                        exe: None,
                        cmdline: self.lost_cmdline(tgid),
                        ppid: known_ppid.unwrap_or(0),
                        user: None,
                        sha256: None,
                        sha_pending: None,
                        scanned_ns: None,
                    },
                };
                self.push_process(tgid, start, t);
            }
            ProcEvent::Uid {
                pid, tgid, euid, ..
            } => {
                if pid != tgid {
                    return;
                }
                let user = self.user_name(euid);
                if let Some(t) = self.procs.get_mut(&tgid) {
                    t.user = Some(user.clone());
                    if let Row::Pending(b) = t.row {
                        let ev = self.events[b].clone();
                        self.events[b] = ev.set("user", user);
                    }
                }
            }
            ProcEvent::Comm { pid, tgid, comm } => {
                if pid == tgid {
                    self.comms.insert(tgid, comm);
                }
            }
            ProcEvent::Exit {
                ts_ns,
                pid,
                tgid,
                status,
            } => {
                if pid != tgid {
                    return; // a thread
                }
                let ts = self.ts_ms(ts_ns, offset_ns);
                if self.forks.contains_key(&tgid) {
                    self.materialize_fork(tgid, 0);
                }
                if let Some(t) = self.procs.remove(&tgid) {
                    self.end_row(t.row, ts, Some(procs::exit_code(status)));
                }
                self.comms.remove(&tgid);
            }
        }
    }

    pub(super) fn on_file_event(&mut self, fan: &sys::Fanotify, ev: &FanEvent) {
        let (Some(op), Some(entry)) = (ev.op(), ev.entry.as_ref()) else {
            return;
        };
        let path = self.files.resolve(fan, entry);
        let new_path = ev.new_entry.as_ref().map(|e| self.files.resolve(fan, e));
        // A path whose directory was already gone (`rm -rf`) cannot be placed: kept when the
        // whole tree is watched.
        let unplaced = |p: &Path| {
            p.starts_with(UNPLACED) && self.files.watch.iter().any(|w| w == Path::new("/"))
        };
        let kept = self.files.keeps(&path)
            || unplaced(&path)
            || new_path.as_ref().is_some_and(|p| self.files.keeps(p));
        let excluded = |p: &Path| self.files.exclude.iter().any(|x| p.starts_with(x));
        if !kept || excluded(&path) || new_path.as_deref().is_some_and(excluded) {
            return;
        }
        let size_of = |p: &Path| {
            std::fs::symlink_metadata(p)
                .ok()
                .filter(|m| m.is_file())
                .map(|m| i64::try_from(m.len()).unwrap_or(i64::MAX))
        };
        // The size when the event is handled: of the written file itself (through its handle,
        // so a rename that followed does not lose it), of the renamed file; none for a create (a
        // new file is empty) or a delete.
        let size = match op {
            "write" => ev
                .object
                .as_ref()
                .and_then(|o| fan.handle_size(o.fsid, &o.handle).ok().flatten())
                .map(|n| i64::try_from(n).unwrap_or(i64::MAX))
                .or_else(|| size_of(&path)),
            "rename" => new_path.as_deref().and_then(size_of),
            _ => None,
        };
        let process = if ev.pid > 0 {
            self.row_for_pid(ev.pid)
        } else {
            None
        };
        let event = Event::new("file", now_ms())
            .set("op", op)
            .set("path", path.to_string_lossy().into_owned())
            .set(
                "new_path",
                new_path.map(|p| p.to_string_lossy().into_owned()),
            )
            .set("size", size);
        self.events
            .push(super::set_row(event, "process_id", process));
    }
}

impl State {
    /// Puts finished hashes into the rows waiting for them: into this batch's events, or as
    /// updates of rows already written (returned as `(row id, sha256)`).
    fn apply_hashes(&mut self) -> Vec<(i64, String)> {
        let Some(hasher) = self.hasher.as_mut() else {
            return Vec::new();
        };
        hasher.collect(&mut self.hashes);
        let mut updates = Vec::new();
        let waiting = std::mem::take(&mut self.awaiting_hash);
        for (row, key) in waiting {
            match self.hashes.get(&key) {
                None => self.awaiting_hash.push((row, key)),
                Some(None) => {}
                Some(Some(hash)) => match row {
                    Row::Pending(b) => {
                        let ev = self.events[b].clone();
                        self.events[b] = ev.set("sha256", hash.clone());
                    }
                    Row::Known(id) => updates.push((id, hash.clone())),
                },
            }
        }
        for t in self.procs.values_mut() {
            if let Some(key) = t.sha_pending
                && let Some(h) = self.hashes.get(&key)
            {
                t.sha256 = h.clone();
                t.sha_pending = None;
            }
        }
        updates
    }
}

/// Writes hashes that finished after their rows were written, in one transaction.
fn write_hash_updates(db: &RecorderDb, updates: &[(i64, String)]) {
    if updates.is_empty() {
        return;
    }
    let r = db.with_writer(|c| -> rusqlite::Result<()> {
        let tx = c.transaction()?;
        {
            let mut stmt = tx.prepare_cached("UPDATE process SET sha256 = ?2 WHERE id = ?1")?;
            for (id, hash) in updates {
                stmt.execute(rusqlite::params![id, hash])?;
            }
        }
        tx.commit()
    });
    if let Err(e) = r {
        tracing::info!(error = %e, "writing executable hashes failed");
    }
}

/// Counts, logs and repairs a process-event overrun.
fn overrun(state: &mut State, db: &RecorderDb, overruns: &mut u64) {
    *overruns += 1;
    tracing::warn!(
        overruns = *overruns,
        "process events were lost (the socket buffer overran); rescanning /proc"
    );
    if let Err(e) = db.set_meta(OVERRUNS_META_KEY, &overruns.to_string()) {
        tracing::info!(error = %e, "cannot record the overrun count");
    }
    state.scan_processes(Some(sys::monotonic_ns()));
}

/// What the process-event reader thread hands to the recorder loop, in kernel order.
enum ProcMsg {
    /// Events, with `/proc/PID` as read right when each exec arrived, and the command name of
    /// those already exited (a zombie's `stat` still has it).
    Events(Vec<ProcEvent>, HashMap<i32, Details>, HashMap<i32, String>),
    /// The socket overran: events were lost.
    Overrun,
}

/// The reader thread: receives process events and reads `/proc/PID` at each exec at once, so a
/// short-lived process is read while it runs, whatever the recorder loop is busy with (writing a
/// batch, polling sockets). Ends when `stop` is set or the recorder loop drops its receiver.
fn spawn_proc_reader(
    conn: sys::ProcConnector,
    tx: mpsc::Sender<ProcMsg>,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("snapq-proc-events".into())
        .spawn(move || {
            // Like auditd's priority_boost, further: on a loaded machine the read at an exec must
            // not wait past the life of a short process. This thread does little per event (a few
            // /proc reads), so the lowest real-time priority costs others little; without the
            // privilege, a nice value.
            let _ = sys::set_thread_nice(READER_NICE);
            let rt_allowed = sys::set_thread_realtime(1).is_ok();
            let mut realtime = rt_allowed;
            let mut window = (Instant::now(), sys::thread_cpu_ns());
            let mut buf = vec![0u8; 64 << 10];
            while !stop.load(Ordering::Relaxed) {
                // A fork bomb must not make a real-time thread take the machine: above half a
                // core over a second, back to the normal class until it calms down.
                if rt_allowed && window.0.elapsed() >= Duration::from_secs(1) {
                    let cpu = sys::thread_cpu_ns().saturating_sub(window.1);
                    let share = cpu as f64 / window.0.elapsed().as_nanos() as f64;
                    if realtime && share > REALTIME_MAX_SHARE {
                        realtime = sys::set_thread_normal().is_err();
                        tracing::warn!(
                            share,
                            "process events flood in: the reader leaves real-time priority"
                        );
                    } else if !realtime && share < REALTIME_MAX_SHARE / 2.0 {
                        realtime = sys::set_thread_realtime(1).is_ok();
                    }
                    window = (Instant::now(), sys::thread_cpu_ns());
                }
                let _ = sys::poll_readable(&[conn.as_fd()], Duration::from_millis(100));
                let mut evs = Vec::new();
                let mut details = HashMap::new();
                let mut names = HashMap::new();
                let mut overran = false;
                for _ in 0..PREFETCH_BATCH {
                    match conn.recv(&mut buf) {
                        Ok(n) => {
                            for ev in procs::parse(&buf[..n]) {
                                if let ProcEvent::Exec { tgid, .. } = ev {
                                    match read_details(tgid) {
                                        Some(d) => {
                                            details.insert(tgid, d);
                                        }
                                        None => {
                                            if let Some(st) = read_stat(tgid) {
                                                names.insert(tgid, st.comm);
                                            }
                                        }
                                    }
                                }
                                evs.push(ev);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                            overran = true;
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "reading process events failed");
                            break;
                        }
                    }
                }
                if !evs.is_empty() && tx.send(ProcMsg::Events(evs, details, names)).is_err() {
                    return;
                }
                if overran && tx.send(ProcMsg::Overrun).is_err() {
                    return;
                }
            }
        })
}

/// Applies what the reader thread sent so far.
fn apply_proc_msgs(
    state: &mut State,
    rx: &mpsc::Receiver<ProcMsg>,
    offset_ns: i128,
    db: &RecorderDb,
    overruns: &mut u64,
) {
    while let Ok(msg) = rx.try_recv() {
        match msg {
            ProcMsg::Events(evs, details, names) => {
                state.prefetched = details;
                state.comms.extend(names);
                for ev in evs {
                    state.on_proc_event(ev, offset_ns);
                }
                state.prefetched.clear();
            }
            ProcMsg::Overrun => overrun(state, db, overruns),
        }
    }
}

/// Reads the queued file events (bounded).
fn read_files(fan: &sys::Fanotify, buf: &mut [u8]) -> Vec<FanEvent> {
    let mut out = Vec::new();
    for _ in 0..64 {
        match fan.read(buf) {
            Ok(0) => break,
            Ok(n) => out.extend(files::parse(&buf[..n])),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "reading file events failed");
                break;
            }
        }
    }
    out
}

/// Writes the batch built so far in one transaction; on failure it is kept and retried.
fn write_batch(state: &mut State, db: &RecorderDb, ticker: &Ticker) {
    if state.events.is_empty() && state.ends.is_empty() {
        return;
    }
    match db.record(&state.events, &state.ends) {
        Ok(ids) => {
            state.resolve(&ids);
            ticker.add_written(state.events.len() + state.ends.len());
            state.events.clear();
            state.ends.clear();
        }
        Err(e) if state.events.len() < 1_000_000 => {
            tracing::info!(error = %e, "linux recorder batch failed; will write it again");
        }
        Err(e) => {
            tracing::warn!(error = %e, events = state.events.len(), "linux recorder batch failed too long; dropping it");
            state.events.clear();
            state.ends.clear();
            state.forget_pending();
        }
    }
}

/// The kernel-mode loop: wakes on events, writes a batch every `config.interval`.
pub(super) fn run(db: &Arc<RecorderDb>, config: &LinuxConfig, ticker: &Ticker, src: Sources) {
    let offset_ns = sys::monotonic_offset_ns();
    let mut state = State::new(config);
    match Hasher::spawn() {
        Ok(h) => state.hasher = Some(h),
        Err(e) => tracing::warn!(error = %e, "no hashing thread; hashing inline"),
    }
    let (tx, rx) = mpsc::channel();
    let stop_reader = Arc::new(AtomicBool::new(false));
    let reader = match spawn_proc_reader(src.conn, tx, stop_reader.clone()) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the process-event reader; falling back to polling");
            return super::run_polling(db, config, ticker);
        }
    };
    state.reload_users();
    state.scan_processes(Some(sys::monotonic_ns()));
    let mut overruns = 0u64;
    let mut fan_buf = vec![0u8; 256 << 10];
    let mut next_flush = Instant::now();
    let mut last_retention = Instant::now();
    let mut retention: Option<JoinHandle<()>> = None;
    loop {
        let wait = next_flush
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(100));
        let mut stopping = false;
        match &src.fan {
            Some(fan) => {
                if let Err(e) = sys::poll_readable(&[fan.as_fd()], wait) {
                    tracing::warn!(error = %e, "waiting for file events failed");
                    std::thread::sleep(wait);
                }
                let evs = read_files(fan, &mut fan_buf);
                if !evs.is_empty() {
                    // The writers' own fork and exec first, so their file events link to them.
                    apply_proc_msgs(&mut state, &rx, offset_ns, db, &mut overruns);
                    for ev in &evs {
                        if ev.overflow() {
                            tracing::warn!("file events were lost (fanotify queue overflow)");
                        }
                        state.on_file_event(fan, ev);
                    }
                }
            }
            None => stopping = !ticker.wait_until(Instant::now() + wait),
        }
        stopping = stopping || !ticker.wait_until(Instant::now());
        if stopping || Instant::now() >= next_flush {
            apply_proc_msgs(&mut state, &rx, offset_ns, db, &mut overruns);
            if stopping {
                let pending: Vec<i32> = state.forks.keys().copied().collect();
                for p in pending {
                    state.materialize_fork(p, 0);
                }
            } else {
                state.materialize_old_forks(FORK_GRACE.max(config.interval));
            }
            state.reload_users();
            state.poll_sockets();
            state.poll_logons();
            let updates = state.apply_hashes();
            write_batch(&mut state, db, ticker);
            write_hash_updates(db, &updates);
            state.files.dirs.clear();
            next_flush = next_tick(next_flush, config.interval);
        }
        if stopping {
            break;
        }
        let limits = db.limits();
        if (limits.max_bytes.is_some() || limits.max_age.is_some())
            && last_retention.elapsed() >= RETENTION_INTERVAL
            && retention.as_ref().is_none_or(|h| h.is_finished())
        {
            // On its own thread: a retention pass may take seconds, events must keep flowing.
            last_retention = Instant::now();
            let db = db.clone();
            retention = std::thread::Builder::new()
                .name("snapq-retention".into())
                .spawn(move || {
                    if let Err(e) = db.enforce_retention() {
                        tracing::info!(error = %e, "retention failed; will retry");
                    }
                })
                .ok();
        }
    }
    stop_reader.store(true, Ordering::Relaxed);
    let _ = reader.join();
    if let Some(h) = retention {
        let _ = h.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::recorder::{Limits, RecorderHandle, spawn_linux_recorder_with};
    use rusqlite::{Connection, OptionalExtension};
    use std::fs;
    use std::process::Command;

    /// Why kernel events cannot be tested here, if they cannot.
    fn unavailable() -> Option<String> {
        let config = LinuxConfig::new(Duration::from_millis(50));
        let (modes, sources) = open_sources(&config);
        if sources.is_none() {
            return modes.fallback_reason;
        }
        (modes.file != "kernel events")
            .then(|| "fanotify filesystem marks are not permitted".into())
    }

    /// Each recorder reads every process of the machine: these tests run one at a time, so one
    /// test's fork storm does not slow another's recorder.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    macro_rules! kernel_or_skip {
        () => {
            let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(reason) = unavailable() {
                eprintln!("skipped: kernel events unavailable here: {reason}");
                return;
            }
        };
    }

    struct Running {
        dir: tempfile::TempDir,
        db: Arc<RecorderDb>,
        handle: Option<RecorderHandle>,
        reader: Connection,
    }

    impl Running {
        fn start(tweak: impl FnOnce(&mut LinuxConfig)) -> Running {
            let dir = tempfile::tempdir().unwrap();
            let db = Arc::new(
                RecorderDb::open(&dir.path().join("monitor.db"), "k-01", Limits::default())
                    .unwrap(),
            );
            let mut config = LinuxConfig::new(Duration::from_millis(50));
            config.wtmp = None;
            config.btmp = None;
            tweak(&mut config);
            let handle = spawn_linux_recorder_with(db.clone(), config);
            let reader = db.reader().unwrap();
            // Subscribed once the modes are stored: from then on nothing is missed.
            let modes = wait_for("the recorder modes", || {
                reader
                    .query_row(
                        "SELECT value FROM meta WHERE key = ?1",
                        [MODES_META_KEY],
                        |r| r.get::<_, String>(0),
                    )
                    .optional()
                    .unwrap()
            });
            assert_eq!(Modes::parse(&modes)["process"], "kernel events");
            Running {
                dir,
                db,
                handle: Some(handle),
                reader,
            }
        }

        fn count(&self, sql: &str, params: impl rusqlite::Params) -> i64 {
            self.reader.query_row(sql, params, |r| r.get(0)).unwrap()
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            if let Some(h) = self.handle.take() {
                h.stop();
            }
        }
    }

    fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `op, path, new_path, size, process_id` of a `file` row.
    type FileRow = (String, String, Option<String>, Option<i64>, Option<i64>);

    fn my_row(r: &Running) -> i64 {
        wait_for("the test process's own row", || {
            r.reader
                .query_row(
                    "SELECT id FROM process WHERE pid = ?1 AND end_ts IS NULL ORDER BY id DESC",
                    [i64::from(std::process::id())],
                    |row| row.get(0),
                )
                .optional()
                .unwrap()
        })
    }

    #[test]
    fn a_process_gone_before_it_could_be_read_keeps_what_the_events_carried_and_says_so() {
        let mut state = State::new(&LinuxConfig::new(Duration::from_millis(50)));
        let me = std::process::id() as i32;
        // A pid no process has: its /proc entry cannot be read, as for one that already exited.
        let gone = i32::MAX - 7;
        state.scan_processes(Some(0));
        let offset = sys::monotonic_offset_ns();
        for ev in [
            ProcEvent::Fork {
                ts_ns: 1_000_000_000,
                parent_tgid: me,
                child_pid: gone,
                child_tgid: gone,
            },
            ProcEvent::Exec {
                ts_ns: 1_001_000_000,
                pid: gone,
                tgid: gone,
            },
            ProcEvent::Exit {
                ts_ns: 1_011_000_000,
                pid: gone,
                tgid: gone,
                status: 3 << 8,
            },
        ] {
            state.on_proc_event(ev, offset);
        }
        let row = state
            .events
            .iter()
            .find(|e| e.get("pid") == Some(&rusqlite::types::Value::Integer(i64::from(gone))))
            .expect("the process is stored");
        let text = |c: &str| match row.get(c) {
            Some(rusqlite::types::Value::Text(t)) => Some(t.clone()),
            _ => None,
        };
        let int = |c: &str| match row.get(c) {
            Some(rusqlite::types::Value::Integer(i)) => Some(*i),
            _ => None,
        };
        assert_eq!(text("cmdline"), Some(format!("[?] {DETAILS_LOST}")));
        assert_eq!(text("path"), None);
        assert_eq!(int("ppid"), Some(i64::from(me)));
        assert_eq!(int("exit_code"), Some(3));
        assert_eq!(
            int("end_ts").unwrap() - row.ts,
            11,
            "from the fork to the exit, in ms"
        );
        assert!(
            !state.procs.contains_key(&gone),
            "no longer tracked once it exited"
        );
    }

    #[test]
    fn a_thousand_ten_ms_processes_are_stored_with_parent_links_exit_codes_paths_and_cmdlines() {
        kernel_or_skip!();
        let r = Running::start(|_| {});
        let mut sh = Command::new("sh")
            .args(["-c", "for i in $(seq 1000); do sleep 0.01 & done; wait"])
            .spawn()
            .unwrap();
        let sh_pid = i64::from(sh.id());
        assert!(sh.wait().unwrap().success());
        let sh_row: i64 = wait_for("the shell's row", || {
            r.reader
                .query_row(
                    "SELECT id FROM process WHERE pid = ?1 AND cmdline LIKE 'sh -c for i in%'",
                    [sh_pid],
                    |row| row.get(0),
                )
                .optional()
                .unwrap()
        });
        let complete = "SELECT count(*) FROM process WHERE parent_id = ?1 AND ppid = ?2 \
                        AND exit_code = 0 AND end_ts >= ts AND cmdline != 'seq 1000'";
        let deadline = Instant::now() + Duration::from_secs(30);
        while r.count(complete, [sh_row, sh_pid]) < 990 {
            if Instant::now() > deadline {
                let diag: (i64, i64, i64, i64) = r
                    .reader
                    .query_row(
                        "SELECT count(*), sum(exit_code IS NULL), sum(end_ts IS NULL), \
                         sum(ppid != ?2) FROM process WHERE parent_id = ?1",
                        [sh_row, sh_pid],
                        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
                    )
                    .unwrap();
                panic!(
                    "fewer than 990 of 1000 children complete: (rows, no exit code, no end, \
                     other ppid) {diag:?}, rows of the shell's pid: {}, overruns: {:?}",
                    r.count("SELECT count(*) FROM process WHERE pid = ?1", [sh_pid]),
                    r.db.meta(OVERRUNS_META_KEY).unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let detailed_sql = "SELECT count(*) FROM process WHERE parent_id = ?1 \
             AND cmdline = 'sleep 0.01' AND path LIKE '%/sleep'";
        let deadline = Instant::now() + Duration::from_secs(10);
        let detailed = loop {
            let n = r.count(detailed_sql, [sh_row]);
            if n >= 950 || Instant::now() > deadline {
                break n;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let breakdown: (i64, i64, i64, i64) = r
            .reader
            .query_row(
                "SELECT sum(cmdline = 'sleep 0.01'), sum(path LIKE '%/sleep'), \
                 sum(sha256 IS NOT NULL), sum(user IS NOT NULL) FROM process \
                 WHERE parent_id = ?1",
                [sh_row],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
            )
            .unwrap();
        assert!(
            detailed >= 950,
            "only {detailed} of 1000 with path and cmdline; \
             (cmdline, path, sha256, user): {breakdown:?}"
        );
        let (total, pids): (i64, i64) = r
            .reader
            .query_row(
                "SELECT count(*), count(DISTINCT pid) FROM process \
                 WHERE parent_id = ?1 AND cmdline != 'seq 1000'",
                [sh_row],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .unwrap();
        assert_eq!(total, pids, "each child is one row");
        let overruns = r.db.meta(OVERRUNS_META_KEY).unwrap();
        assert!(
            total <= 1000,
            "{total} rows for 1000 children (overruns: {overruns:?})"
        );
    }

    #[test]
    fn exit_codes_zombies_and_exec_a_names_are_recorded_as_a_user_would_expect() {
        kernel_or_skip!();
        // A zombie from before the recorder started: it exited, so it is not a new process.
        let mut zombie = Command::new("true").spawn().unwrap();
        let zombie_pid = zombie.id() as i32;
        wait_for("the zombie", || {
            read_stat(zombie_pid)
                .is_some_and(|s| s.is_zombie())
                .then_some(())
        });
        // A process running at start that exits unreaped: the same row ends, no second row.
        let mut unreaped = Command::new("sleep").arg("0.3").spawn().unwrap();
        let unreaped_pid = i64::from(unreaped.id());
        let r = Running::start(|_| {});
        let three = Command::new("sh").args(["-c", "exit 3"]).spawn().unwrap();
        let three_pid = i64::from(three.id());
        let killed = Command::new("sleep").arg("30").spawn().unwrap();
        let killed_pid = killed.id() as i32;
        let named = Command::new("bash")
            .args(["-c", "exec -a snapq-renamed-sleep sleep 0.05"])
            .spawn()
            .unwrap();
        let named_pid = i64::from(named.id());
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(killed_pid, libc::SIGKILL) };
        for mut c in [three, killed, named] {
            c.wait().unwrap();
        }
        let code = |pid: i64| {
            wait_for("an exit code", || {
                r.reader
                    .query_row(
                        "SELECT exit_code FROM process WHERE pid = ?1 AND exit_code IS NOT NULL",
                        [pid],
                        |row| row.get::<_, i64>(0),
                    )
                    .optional()
                    .unwrap()
            })
        };
        assert_eq!(code(three_pid), 3);
        assert_eq!(code(i64::from(killed_pid)), -9, "killed by SIGKILL");
        let (cmdline, path): (String, String) = wait_for("the exec -a process", || {
            r.reader
                .query_row(
                    "SELECT cmdline, path FROM process WHERE pid = ?1 AND path LIKE '%/sleep'",
                    [named_pid],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()
                .unwrap()
        });
        assert_eq!(cmdline, "snapq-renamed-sleep 0.05");
        assert!(path.ends_with("/sleep"), "{path}");
        assert_eq!(code(unreaped_pid), 0);
        wait_for("sleep 0.3 to be a zombie", || {
            read_stat(unreaped_pid as i32)
                .is_some_and(|s| s.is_zombie())
                .then_some(())
        });
        assert_eq!(
            r.count(
                "SELECT count(*) FROM process WHERE pid = ?1",
                [unreaped_pid]
            ),
            1,
            "an unreaped process is one row, not a second `[sleep]`"
        );
        assert_eq!(
            r.count(
                "SELECT count(*) FROM process WHERE pid = ?1",
                [i64::from(zombie_pid)]
            ),
            0,
            "a zombie is never a new process"
        );
        zombie.wait().unwrap();
        unreaped.wait().unwrap();
    }

    #[test]
    fn file_create_write_rename_delete_are_four_events_of_the_writing_process_and_exclusions_hold()
    {
        kernel_or_skip!();
        let work = tempfile::tempdir().unwrap();
        let excluded = tempfile::tempdir().unwrap();
        let excluded_path = excluded.path().to_path_buf();
        let r = Running::start(|c| c.exclude.push(excluded_path));
        let me = my_row(&r);
        let work_dir = fs::canonicalize(work.path()).unwrap();
        let a = work_dir.join("a.txt");
        let b = work_dir.join("b.txt");
        let like = format!("{}/%", work_dir.display());
        let rows = |n: usize| {
            wait_for(&format!("{n} file events"), || {
                let mut s = r
                    .reader
                    .prepare(
                        "SELECT op, path, new_path, size, process_id FROM file \
                         WHERE path LIKE ?1 ORDER BY id",
                    )
                    .unwrap();
                let rows: Vec<FileRow> = s
                    .query_map([&like], |row| {
                        Ok((
                            row.get(0)?,
                            row.get(1)?,
                            row.get(2)?,
                            row.get(3)?,
                            row.get(4)?,
                        ))
                    })
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
                (rows.len() >= n).then_some(rows)
            })
        };
        // Each step once the previous one is recorded, so sizes are the ones of that moment.
        fs::write(&a, b"hello world").unwrap();
        rows(2);
        fs::rename(&a, &b).unwrap();
        rows(3);
        fs::remove_file(&b).unwrap();
        // An excluded write, then one more in the work directory: once that one is recorded, the
        // excluded one was handled (events are handled in order).
        fs::write(excluded.path().join("secret.txt"), b"x").unwrap();
        fs::write(work_dir.join("fence.txt"), b"x").unwrap();
        let rows = rows(6);
        let (a, b) = (a.display().to_string(), b.display().to_string());
        let expected: Vec<FileRow> = vec![
            ("create".into(), a.clone(), None, None, Some(me)),
            ("write".into(), a.clone(), None, Some(11), Some(me)),
            ("rename".into(), a, Some(b.clone()), Some(11), Some(me)),
            ("delete".into(), b, None, None, Some(me)),
        ];
        assert_eq!(rows[..4], expected[..]);
        // The recorder wrote its database all along; neither it nor the excluded path shows up.
        let db_dir = fs::canonicalize(r.dir.path()).unwrap();
        let own = r.count(
            "SELECT count(*) FROM file WHERE path LIKE ?1 || '/%' OR path LIKE ?2 || '/%'",
            [
                db_dir.display().to_string(),
                fs::canonicalize(excluded.path())
                    .unwrap()
                    .display()
                    .to_string(),
            ],
        );
        assert_eq!(
            own, 0,
            "the recorder's own writes and excluded paths are not events"
        );
        assert!(r.db.used_bytes().unwrap() > 0);
    }

    #[test]
    fn a_fork_storm_that_overruns_the_socket_is_counted_and_rescanned() {
        kernel_or_skip!();
        // The smallest buffer the kernel allows: a storm cannot fit.
        let r = Running::start(|c| c.netlink_rcvbuf = 1);
        let marker = format!("snapq-storm-{}", std::process::id());
        let script = format!(
            "for i in $(seq 400); do true & done; \
             for i in $(seq 10); do bash -c 'exec -a {marker} sleep 60' & done; wait"
        );
        let mut storm = Command::new("sh").args(["-c", &script]).spawn().unwrap();
        let sleepers = wait_for("the 10 sleepers", || {
            let pids: Vec<i32> = fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .filter(|pid: &i32| read_cmdline(*pid).is_some_and(|c| c.starts_with(&marker)))
                .collect();
            (pids.len() == 10).then_some(pids)
        });
        let overruns: i64 = wait_for("an overrun", || {
            r.reader
                .query_row(
                    "SELECT CAST(value AS INTEGER) FROM meta WHERE key = ?1",
                    [OVERRUNS_META_KEY],
                    |row| row.get(0),
                )
                .optional()
                .unwrap()
        });
        assert!(overruns >= 1);
        // Whatever was lost, every process still running is known after the rescan.
        wait_for("every sleeper recorded", || {
            let n = r.count(
                "SELECT count(DISTINCT pid) FROM process WHERE cmdline LIKE ?1 || '%'",
                [&marker],
            );
            (n == 10).then_some(())
        });
        for pid in sleepers {
            // SAFETY: kill(2) on a process this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        storm.wait().unwrap();
    }
}
