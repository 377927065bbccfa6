//! The real Linux recorder: processes and sockets from `/proc`, logons from `wtmp`/`btmp`.
//!
//! It polls rather than hooks (no eBPF, no audit rules), so it needs no privileges beyond reading
//! `/proc` and works in containers. The price: a process or connection that lives less than one
//! poll interval can be missed, and exit codes are unknown (`exit_code` stays NULL).
//!
//! What it writes:
//! - `process`: one row per process image seen (already running at start, started, or a new image
//!   after `exec`), with `ts` its real start time, `parent_id` the parent's row, `end_ts` set when
//!   it disappears. Kernel threads are skipped.
//! - `network`: `listen` for a listening TCP or bound UDP socket, `accept` for an established
//!   socket on a listening port, `connect` for any other established socket, `close` when a
//!   recorded socket disappears; attributed to processes through `/proc/PID/fd` socket inodes.
//! - `auth`: `logon`/`logoff` from new `wtmp` records, `failure` from new `btmp` records (records
//!   written before the recorder started are not replayed).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::db::{Event, ProcessEnd, RecorderDb, meta_keys, now_ms};
use super::handle::{RecorderHandle, Ticker, next_tick};

mod files;
mod hasher;
mod kernel;
mod procs;
mod sockdiag;
mod sys;

pub use kernel::{MODES_META_KEY, Modes};

/// How often `/proc` is polled unless configured otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(250);
/// Executables larger than this are not hashed (the poll must stay quick).
const MAX_HASH_BYTES: u64 = 256 << 20;
/// `PF_KTHREAD` in `/proc/PID/stat` flags.
const PF_KTHREAD: u64 = 0x0020_0000;
/// How often retention runs when limits are set.
const RETENTION_INTERVAL: Duration = Duration::from_secs(5);

/// Settings of the Linux recorder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxConfig {
    /// The poll interval (sockets, logons, and processes without kernel events) and the batch
    /// interval of kernel events: how stale a live query can be.
    pub interval: Duration,
    /// Login records to follow (`logon`/`logoff`); `None` to skip.
    pub wtmp: Option<PathBuf>,
    /// Failed-login records to follow (`failure`); `None` to skip.
    pub btmp: Option<PathBuf>,
    /// Use the kernel's process and file events when privileged (else, or when `false`, poll).
    pub kernel_events: bool,
    /// Filesystems whose file changes are recorded (each path's whole filesystem is marked; events
    /// outside these paths are dropped). Default `/`.
    pub watch: Vec<PathBuf>,
    /// File events under these paths are not recorded. The directory of the recorder database is
    /// always excluded, so the recorder never records its own writes.
    pub exclude: Vec<PathBuf>,
    /// The process-events socket's receive buffer in bytes (bursts queue here while a batch is
    /// written).
    pub netlink_rcvbuf: usize,
}

impl LinuxConfig {
    /// The system's own `wtmp` and `btmp`, polled every `interval`; kernel events on `/`.
    pub fn new(interval: Duration) -> LinuxConfig {
        LinuxConfig {
            interval,
            wtmp: Some(PathBuf::from("/var/log/wtmp")),
            btmp: Some(PathBuf::from("/var/log/btmp")),
            kernel_events: true,
            watch: vec![PathBuf::from("/")],
            exclude: Vec::new(),
            netlink_rcvbuf: DEFAULT_NETLINK_RCVBUF,
        }
    }
}

/// 8 MiB: about 3 s of a 1,000 exec/s storm (fork, exec, comm, exit: ~3 KiB of buffer each).
pub const DEFAULT_NETLINK_RCVBUF: usize = 8 << 20;

/// Starts the Linux recorder with the system's login records.
pub fn spawn_linux_recorder(db: Arc<RecorderDb>, interval: Duration) -> RecorderHandle {
    spawn_linux_recorder_with(db, LinuxConfig::new(interval))
}

/// Starts the Linux recorder on its own thread: kernel events when the kernel and privileges
/// allow, else polling (see [`Modes`]); the modes are logged and stored in the `meta` table.
pub fn spawn_linux_recorder_with(db: Arc<RecorderDb>, config: LinuxConfig) -> RecorderHandle {
    RecorderHandle::spawn("snapq-linux-recorder", move |ticker| {
        if let Err(e) = db.set_meta(meta_keys::RECORDER, "linux") {
            tracing::warn!(error = %e, "linux recorder cannot write meta");
        }
        let mut config = config;
        if let Some(dir) = db.path().parent() {
            // The recorder's own database, WAL and staged copies: never record our own writes.
            let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
            config.exclude.push(dir);
        }
        let (modes, sources) = kernel::open_sources(&config);
        modes.log(&config);
        if let Err(e) = db.set_meta(MODES_META_KEY, &modes.to_json()) {
            tracing::warn!(error = %e, "linux recorder cannot write meta");
        }
        match sources {
            Some(sources) => kernel::run(&db, &config, &ticker, sources),
            None => run_polling(&db, &config, &ticker),
        }
    })
}

/// Applies the database's retention limits every [`RETENTION_INTERVAL`] (when limits are set).
fn maybe_retention(db: &RecorderDb, last: &mut Instant) {
    let limits = db.limits();
    if (limits.max_bytes.is_some() || limits.max_age.is_some())
        && last.elapsed() >= RETENTION_INTERVAL
    {
        *last = Instant::now();
        if let Err(e) = db.enforce_retention() {
            tracing::info!(error = %e, "retention failed; will retry");
        }
    }
}

/// Without kernel events: everything is polled every `config.interval`.
pub(super) fn run_polling(db: &RecorderDb, config: &LinuxConfig, ticker: &Ticker) {
    let mut state = State::new(config);
    let mut tick = Instant::now();
    let mut last_retention = Instant::now();
    loop {
        let (events, ends) = state.poll();
        if !events.is_empty() || !ends.is_empty() {
            match db.record(&events, &ends) {
                Ok(ids) => {
                    state.resolve(&ids);
                    ticker.add_written(events.len() + ends.len());
                }
                Err(e) => {
                    tracing::info!(error = %e, "linux recorder batch failed; will record again");
                    state.forget_pending();
                }
            }
        }
        maybe_retention(db, &mut last_retention);
        tick = next_tick(tick, config.interval);
        if !ticker.wait_until(tick) {
            break;
        }
    }
}

/// A process's executable hash: known (or unknowable), or being computed off the event thread.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sha {
    Known(Option<String>),
    Pending(hasher::HashKey),
}

impl Sha {
    fn split(self) -> (Option<String>, Option<hasher::HashKey>) {
        match self {
            Sha::Known(h) => (h, None),
            Sha::Pending(k) => (None, Some(k)),
        }
    }
}

/// A process's row: written, or an earlier event of the batch being built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Row {
    Known(i64),
    Pending(usize),
}

fn set_row(ev: Event, column: &str, row: Option<Row>) -> Event {
    match row {
        Some(Row::Known(id)) => ev.set(column, id),
        Some(Row::Pending(b)) => ev.link(column, b),
        None => ev,
    }
}

#[derive(Debug)]
struct Tracked {
    start_ticks: u64,
    row: Row,
    exe: Option<String>,
    cmdline: String,
    ppid: i32,
    user: Option<String>,
    sha256: Option<String>,
    /// Kernel mode: the hash being computed for this row.
    sha_pending: Option<hasher::HashKey>,
    /// Kernel mode: when a `/proc` scan (not an event) recorded it, on `CLOCK_MONOTONIC`; events
    /// older than this are already reflected in the row.
    scanned_ns: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Socket {
    protocol: &'static str,
    local_addr: String,
    local_port: u16,
    remote_addr: String,
    remote_port: u16,
    /// TCP state (0A listen, 01 established, …; 07 for an unconnected UDP socket).
    state: u8,
}

impl Socket {
    fn is_listen(&self) -> bool {
        (self.protocol.starts_with("tcp") && self.state == 0x0A)
            || (self.protocol.starts_with("udp") && self.remote_port == 0)
    }

    fn is_established(&self) -> bool {
        self.state == 0x01
    }
}

#[derive(Debug)]
struct RecordedSocket {
    socket: Socket,
    process: Option<Row>,
}

/// A file followed from where it ended when the recorder started.
#[derive(Debug)]
struct Tail {
    path: PathBuf,
    offset: u64,
}

impl Tail {
    fn new(path: PathBuf) -> Tail {
        let offset = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Tail { path, offset }
    }

    /// Whole records appended since the last call (from the start again if the file shrank,
    /// i.e. was rotated). A missing file yields nothing.
    fn read_new(&mut self, record: usize) -> Vec<u8> {
        let Ok(mut f) = File::open(&self.path) else {
            self.offset = 0;
            return Vec::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            self.offset = 0;
        }
        let whole = (len - self.offset) / record as u64 * record as u64;
        if whole == 0 || f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = vec![0u8; whole as usize];
        if f.read_exact(&mut buf).is_err() {
            return Vec::new();
        }
        self.offset += whole;
        buf
    }
}

struct State {
    boot_ms: i64,
    clk_tck: u64,
    procs: HashMap<i32, Tracked>,
    hashes: HashMap<hasher::HashKey, Option<String>>,
    /// Kernel mode: hashes executables off the event thread (`None`: hash inline).
    hasher: Option<hasher::Hasher>,
    /// Kernel mode: process rows waiting for their executable's hash.
    awaiting_hash: Vec<(Row, hasher::HashKey)>,
    users: HashMap<u32, String>,
    passwd_mtime: Option<SystemTime>,
    sockets: HashMap<u64, RecordedSocket>,
    wtmp: Option<Tail>,
    btmp: Option<Tail>,
    /// Who logged in on which terminal line, to name the user of a logoff record.
    lines: HashMap<String, String>,
    events: Vec<Event>,
    /// Process ends of rows already written, for the next batch.
    ends: Vec<ProcessEnd>,
    /// Kernel mode: forked processes that have not run `exec` yet (no row yet).
    forks: HashMap<i32, kernel::Fork>,
    /// Kernel mode: `/proc/PID` read as soon as an exec event arrived.
    prefetched: HashMap<i32, kernel::Details>,
    /// Kernel mode: each process's command name from the last `comm` event.
    comms: HashMap<i32, String>,
    /// Kernel mode: what file events to keep.
    files: kernel::FileFilter,
}

impl State {
    fn new(config: &LinuxConfig) -> State {
        // SAFETY: sysconf has no memory-safety preconditions.
        let clk_tck = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
            .ok()
            .filter(|&t| t > 0)
            .unwrap_or(100);
        let uptime_ms = fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0, |s| (s * 1000.0) as i64);
        State {
            boot_ms: now_ms() - uptime_ms,
            clk_tck,
            procs: HashMap::new(),
            hashes: HashMap::new(),
            hasher: None,
            awaiting_hash: Vec::new(),
            users: HashMap::new(),
            passwd_mtime: None,
            sockets: HashMap::new(),
            wtmp: config.wtmp.clone().map(Tail::new),
            btmp: config.btmp.clone().map(Tail::new),
            lines: HashMap::new(),
            events: Vec::new(),
            ends: Vec::new(),
            forks: HashMap::new(),
            comms: HashMap::new(),
            prefetched: HashMap::new(),
            files: kernel::FileFilter::new(config),
        }
    }

    /// Once the batch is written, pending rows become known ids.
    fn resolve(&mut self, ids: &[i64]) {
        let fix = |r: &mut Row| {
            if let Row::Pending(b) = *r {
                *r = Row::Known(ids[b]);
            }
        };
        self.procs.values_mut().for_each(|p| fix(&mut p.row));
        self.awaiting_hash.iter_mut().for_each(|(r, _)| fix(r));
        self.sockets
            .values_mut()
            .filter_map(|s| s.process.as_mut())
            .for_each(fix);
    }

    /// The batch was lost: forget what it would have recorded, so the next poll records it again.
    fn forget_pending(&mut self) {
        self.procs.retain(|_, p| matches!(p.row, Row::Known(_)));
        self.awaiting_hash
            .retain(|(r, _)| matches!(r, Row::Known(_)));
        self.sockets.clear();
    }

    /// One look at the machine: the events and process ends since the last poll.
    fn poll(&mut self) -> (Vec<Event>, Vec<ProcessEnd>) {
        self.events.clear();
        self.reload_users();
        let ends = self.poll_processes();
        self.poll_sockets();
        self.poll_logons();
        (std::mem::take(&mut self.events), ends)
    }

    fn reload_users(&mut self) {
        let mtime = fs::metadata("/etc/passwd").and_then(|m| m.modified()).ok();
        if mtime.is_some() && mtime == self.passwd_mtime {
            return;
        }
        self.passwd_mtime = mtime;
        self.users = fs::read_to_string("/etc/passwd")
            .map(|s| parse_passwd(&s))
            .unwrap_or_default();
    }

    fn user_name(&self, uid: u32) -> String {
        self.users
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| uid.to_string())
    }

    fn poll_processes(&mut self) -> Vec<ProcessEnd> {
        self.scan_processes(None);
        std::mem::take(&mut self.ends)
    }

    /// One look at `/proc`: records processes not yet known (or running a new image), ends the
    /// known ones that are gone, with their exit code when they are zombies. A zombie is never a
    /// new process. `scanned_ns` (kernel mode) stamps the rows it records.
    fn scan_processes(&mut self, scanned_ns: Option<u64>) {
        let now = now_ms();
        let mut seen: Vec<(i32, ProcStat)> = Vec::new();
        let mut zombies: HashMap<i32, ProcStat> = HashMap::new();
        if let Ok(dir) = fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<i32>().ok())
                else {
                    continue;
                };
                match read_stat(pid) {
                    Some(stat) if stat.flags & PF_KTHREAD != 0 => {}
                    Some(stat) if stat.is_zombie() => {
                        zombies.insert(pid, stat);
                    }
                    Some(stat) => seen.push((pid, stat)),
                    None => {}
                }
            }
        }
        // Parents start before their children: recording in start order lets a child link to a
        // parent first seen in the same poll.
        seen.sort_by_key(|(pid, s)| (s.start_ticks, *pid));
        let alive: HashMap<i32, u64> = seen.iter().map(|(pid, s)| (*pid, s.start_ticks)).collect();
        // Gone, exited (zombie), or the pid was reused by a new process.
        let gone: Vec<i32> = self
            .procs
            .iter()
            .filter(|(pid, t)| match alive.get(pid) {
                None => true,
                // A row made from events alone does not know its start: the same process.
                Some(_) if t.start_ticks == 0 => false,
                Some(start) => *start != t.start_ticks,
            })
            .map(|(pid, _)| *pid)
            .collect();
        for pid in gone {
            let exit_code = zombies
                .get(&pid)
                .filter(|z| {
                    self.procs
                        .get(&pid)
                        .is_some_and(|t| t.start_ticks == z.start_ticks)
                })
                .and_then(|z| z.exit_status)
                .map(procs::exit_code);
            if let Some(t) = self.procs.remove(&pid) {
                self.end_row(t.row, now, exit_code);
            }
        }
        // Kernel mode: a fork not yet written whose process is gone was missed in an overrun.
        let lost_forks: Vec<i32> = self
            .forks
            .keys()
            .filter(|pid| !alive.contains_key(pid))
            .copied()
            .collect();
        for pid in lost_forks {
            self.materialize_fork(pid, 0);
            if let Some(t) = self.procs.remove(&pid) {
                self.end_row(t.row, now, None);
            }
        }
        for (pid, stat) in seen {
            if self.forks.contains_key(&pid) {
                continue; // kernel mode: its fork is known, its exec or exit will come
            }
            let exe = fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .map(|p| p.to_string_lossy().into_owned());
            let cmdline = match read_cmdline(pid) {
                Some(c) => c,
                // No command line and no executable: exiting (its memory is gone), caught
                // between `exit` and becoming a zombie. Not a new process either.
                None if exe.is_none() => continue,
                None => format!("[{}]", stat.comm),
            };
            let ts = match self.procs.get_mut(&pid) {
                Some(t) if t.exe == exe && t.cmdline == cmdline => continue,
                Some(t) if t.start_ticks == 0 => {
                    // Made from events alone (details lost, or its parent's image): keep the row.
                    t.start_ticks = stat.start_ticks;
                    continue;
                }
                // The same process ran a new image (exec): a new row, the old one ends.
                Some(_) => {
                    let old = self.procs.remove(&pid).expect("just seen");
                    self.end_row(old.row, now, None);
                    now
                }
                None => {
                    self.boot_ms
                        + i64::try_from(stat.start_ticks * 1000 / self.clk_tck).unwrap_or(0)
                }
            };
            let user = read_euid(pid).map(|uid| self.user_name(uid));
            let (sha256, sha_pending) = match exe {
                Some(_) => self.exe_sha256(pid).split(),
                None => (None, None),
            };
            self.push_process(
                pid,
                ts,
                Tracked {
                    start_ticks: stat.start_ticks,
                    row: Row::Pending(0),
                    exe,
                    cmdline,
                    ppid: stat.ppid,
                    user,
                    sha256,
                    sha_pending,
                    scanned_ns,
                },
            );
        }
    }

    /// Records a process row for `t` (its `row` is replaced by the new pending row) and tracks it.
    fn push_process(&mut self, pid: i32, ts: i64, mut t: Tracked) {
        let parent_row = self.procs.get(&t.ppid).map(|p| p.row);
        let mut ev = Event::new("process", ts)
            .set("pid", pid)
            .set("ppid", t.ppid)
            .set("path", t.exe.clone())
            .set("cmdline", t.cmdline.clone())
            .set("user", t.user.clone())
            .set("sha256", t.sha256.clone());
        ev = set_row(ev, "parent_id", parent_row);
        self.events.push(ev);
        t.row = Row::Pending(self.events.len() - 1);
        if let Some(key) = t.sha_pending {
            self.awaiting_hash.push((t.row, key));
        }
        self.procs.insert(pid, t);
    }

    /// Ends a process row: in this batch's event if not written yet, else by a [`ProcessEnd`].
    fn end_row(&mut self, row: Row, end_ts: i64, exit_code: Option<i64>) {
        match row {
            Row::Known(row_id) => self.ends.push(ProcessEnd {
                row_id,
                end_ts,
                exit_code,
            }),
            Row::Pending(b) => {
                let ev = self.events[b].clone();
                self.events[b] = ev.set("end_ts", end_ts).set("exit_code", exit_code);
            }
        }
    }

    /// The sha256 of a process's executable, hashed once per (device, inode, mtime, size).
    fn exe_sha256(&mut self, pid: i32) -> Sha {
        // /proc/PID/exe opens the very file the process runs, even if it was deleted or replaced.
        match File::open(format!("/proc/{pid}/exe")) {
            Ok(file) => self.sha256_of_exe(file),
            Err(_) => Sha::Known(None),
        }
    }

    /// The sha256 of an open executable (see [`State::exe_sha256`]).
    fn sha256_of_exe(&mut self, mut file: File) -> Sha {
        let Ok(m) = file.metadata() else {
            return Sha::Known(None);
        };
        let key = (m.dev(), m.ino(), m.mtime(), m.size());
        if let Some(h) = self.hashes.get(&key) {
            return Sha::Known(h.clone());
        }
        if m.size() > MAX_HASH_BYTES {
            self.hashes.insert(key, None);
            return Sha::Known(None);
        }
        if let Some(hasher) = self.hasher.as_mut() {
            hasher.request(key, file);
            return Sha::Pending(key);
        }
        let hash = hasher::sha256_of(&mut file);
        self.hashes.insert(key, hash.clone());
        Sha::Known(hash)
    }

    fn poll_sockets(&mut self) {
        let now = now_ms();
        let mut current: HashMap<u64, Socket> = HashMap::new();
        match sockdiag::sockets() {
            Ok(all) => current.extend(all),
            // Without inet_diag: the same table as text.
            Err(_) => {
                for (file, protocol, v6) in [
                    ("/proc/net/tcp", "tcp", false),
                    ("/proc/net/tcp6", "tcp6", true),
                    ("/proc/net/udp", "udp", false),
                    ("/proc/net/udp6", "udp6", true),
                ] {
                    if let Ok(text) = fs::read_to_string(file) {
                        current.extend(parse_proc_net(&text, protocol, v6));
                    }
                }
            }
        }
        // Closes: recorded sockets that are gone.
        let closed: Vec<u64> = self
            .sockets
            .keys()
            .filter(|i| !current.contains_key(i))
            .copied()
            .collect();
        for inode in closed {
            let r = self.sockets.remove(&inode).expect("listed above");
            let ev = network_event(now, "close", &r.socket);
            self.events.push(set_row(ev, "process_id", r.process));
        }
        let new: Vec<u64> = current
            .iter()
            .filter(|(i, s)| !self.sockets.contains_key(i) && (s.is_listen() || s.is_established()))
            .map(|(i, _)| *i)
            .collect();
        if new.is_empty() {
            return;
        }
        let owners = socket_owners(&new.iter().copied().collect());
        let listening: HashSet<(&str, u16)> = current
            .values()
            .filter(|s| s.is_listen())
            .map(|s| (s.protocol, s.local_port))
            .collect();
        let mut new = new;
        new.sort_unstable();
        for inode in new {
            let socket = current[&inode].clone();
            let op = if socket.is_listen() {
                "listen"
            } else if listening.contains(&(socket.protocol, socket.local_port)) {
                "accept"
            } else {
                "connect"
            };
            let process = owners
                .get(&inode)
                .and_then(|pid| self.procs.get(pid))
                .map(|p| p.row);
            let ev = network_event(now, op, &socket);
            self.events.push(set_row(ev, "process_id", process));
            self.sockets
                .insert(inode, RecordedSocket { socket, process });
        }
    }

    fn poll_logons(&mut self) {
        let wtmp = self
            .wtmp
            .as_mut()
            .map(|t| t.read_new(UTMP_SIZE))
            .unwrap_or_default();
        let btmp = self
            .btmp
            .as_mut()
            .map(|t| t.read_new(UTMP_SIZE))
            .unwrap_or_default();
        for (bytes, failed) in [(wtmp, false), (btmp, true)] {
            for rec in bytes.chunks_exact(UTMP_SIZE).filter_map(Utmp::parse) {
                let op = match (failed, rec.kind) {
                    (true, _) => "failure",
                    (false, USER_PROCESS) => "logon",
                    (false, DEAD_PROCESS) => "logoff",
                    _ => continue,
                };
                let user = if rec.user.is_empty() {
                    self.lines.get(&rec.line).cloned()
                } else {
                    Some(rec.user.clone())
                };
                if op == "logon" {
                    self.lines.insert(rec.line.clone(), rec.user.clone());
                }
                let session_type = if !rec.host.is_empty() {
                    "remote"
                } else if rec.line.starts_with("tty") {
                    "console"
                } else {
                    "local"
                };
                let process = self.procs.get(&rec.pid).map(|p| p.row);
                let ev = Event::new("auth", rec.ts_ms)
                    .set("op", op)
                    .set("user", user)
                    .set("source_addr", rec.source_addr())
                    .set("session_type", session_type);
                self.events.push(set_row(ev, "process_id", process));
            }
        }
    }
}

fn network_event(ts: i64, op: &str, s: &Socket) -> Event {
    let remote = s.remote_port != 0;
    Event::new("network", ts)
        .set("op", op)
        .set("protocol", s.protocol.trim_end_matches('6'))
        .set("local_addr", s.local_addr.clone())
        .set("local_port", s.local_port)
        .set("remote_addr", remote.then(|| s.remote_addr.clone()))
        .set("remote_port", remote.then_some(s.remote_port))
}

#[derive(Debug)]
struct ProcStat {
    comm: String,
    /// `R`, `S`, `Z` (exited, not yet reaped), …
    state: char,
    ppid: i32,
    flags: u64,
    start_ticks: u64,
    /// The wait status of a zombie (field 52, Linux 3.5+).
    exit_status: Option<u32>,
}

impl ProcStat {
    fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

fn read_stat(pid: i32) -> Option<ProcStat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Parses `/proc/PID/stat`; the command name may contain spaces and parentheses.
fn parse_stat(s: &str) -> Option<ProcStat> {
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = s.get(close + 1..)?.split_whitespace().collect();
    Some(ProcStat {
        comm,
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        flags: rest.get(6)?.parse().ok()?,
        start_ticks: rest.get(19)?.parse().ok()?,
        exit_status: rest.get(49).and_then(|s| s.parse().ok()),
    })
}

fn read_cmdline(pid: i32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let s = String::from_utf8_lossy(&raw);
    let joined = s.trim_end_matches('\0').replace('\0', " ");
    (!joined.is_empty()).then_some(joined)
}

fn read_euid(pid: i32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

fn parse_passwd(s: &str) -> HashMap<u32, String> {
    s.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let uid = f.nth(1)?.parse().ok()?;
            Some((uid, name.to_string()))
        })
        .collect()
}

/// Which processes hold which of `wanted` socket inodes, from `/proc/PID/fd/*` → `socket:[N]`.
fn socket_owners(wanted: &HashSet<u64>) -> HashMap<u64, i32> {
    let mut owners = HashMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return owners;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok());
            if let Some(inode) = inode
                && wanted.contains(&inode)
            {
                // The lowest pid that holds it: usually the one that opened it, not a child
                // that inherited it.
                owners.entry(inode).or_insert(pid);
            }
        }
        if owners.len() == wanted.len() {
            break;
        }
    }
    owners
}

/// Parses one `/proc/net/{tcp,udp}[6]` table into (inode, socket); inode 0 (no owner, e.g.
/// TIME_WAIT) is skipped.
fn parse_proc_net(text: &str, protocol: &'static str, v6: bool) -> Vec<(u64, Socket)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local_addr, local_port) = parse_endpoint(f.get(1)?, v6)?;
            let (remote_addr, remote_port) = parse_endpoint(f.get(2)?, v6)?;
            let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
            let inode: u64 = f.get(9)?.parse().ok()?;
            (inode != 0).then_some((
                inode,
                Socket {
                    protocol,
                    local_addr,
                    local_port,
                    remote_addr,
                    remote_port,
                    state,
                },
            ))
        })
        .collect()
}

/// `0100007F:1F90` → ("127.0.0.1", 8080). Addresses are 32-bit words in host (little-endian)
/// order.
fn parse_endpoint(s: &str, v6: bool) -> Option<(String, u16)> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for chunk in addr.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    let addr = if v6 {
        let arr: [u8; 16] = bytes.try_into().ok()?;
        let ip = Ipv6Addr::from(arr);
        match ip.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => ip.to_string(),
        }
    } else {
        let arr: [u8; 4] = bytes.try_into().ok()?;
        Ipv4Addr::from(arr).to_string()
    };
    Some((addr, port))
}

/// `struct utmp` on Linux (glibc, 64-bit and 32-bit alike).
const UTMP_SIZE: usize = 384;
const USER_PROCESS: i16 = 7;
const DEAD_PROCESS: i16 = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Utmp {
    kind: i16,
    pid: i32,
    line: String,
    user: String,
    host: String,
    ts_ms: i64,
    addr: [u8; 16],
}

impl Utmp {
    fn parse(b: &[u8]) -> Option<Utmp> {
        if b.len() < UTMP_SIZE {
            return None;
        }
        let text = |r: std::ops::Range<usize>| {
            let s = &b[r];
            let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
            String::from_utf8_lossy(&s[..end]).into_owned()
        };
        let i32_at = |o: usize| i32::from_ne_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        Some(Utmp {
            kind: i16::from_ne_bytes([b[0], b[1]]),
            pid: i32_at(4),
            line: text(8..40),
            user: text(44..76),
            host: text(76..332),
            ts_ms: i64::from(i32_at(340)) * 1000 + i64::from(i32_at(344)) / 1000,
            addr: b[348..364].try_into().expect("16 bytes"),
        })
    }

    /// The remote address: `ut_addr_v6` when set, else the host name.
    fn source_addr(&self) -> Option<String> {
        if self.addr.iter().any(|&x| x != 0) {
            if self.addr[4..].iter().all(|&x| x == 0) {
                let v4: [u8; 4] = self.addr[..4].try_into().expect("4 bytes");
                return Some(Ipv4Addr::from(v4).to_string());
            }
            return Some(Ipv6Addr::from(self.addr).to_string());
        }
        (!self.host.is_empty()).then(|| self.host.clone())
    }
}

#[cfg(test)]
pub(crate) fn utmp_record(
    kind: i16,
    pid: i32,
    line: &str,
    user: &str,
    host: &str,
    ts_s: i32,
    addr: [u8; 4],
) -> Vec<u8> {
    let mut b = vec![0u8; UTMP_SIZE];
    b[0..2].copy_from_slice(&kind.to_ne_bytes());
    b[4..8].copy_from_slice(&pid.to_ne_bytes());
    b[8..8 + line.len()].copy_from_slice(line.as_bytes());
    b[44..44 + user.len()].copy_from_slice(user.as_bytes());
    b[76..76 + host.len()].copy_from_slice(host.as_bytes());
    b[340..344].copy_from_slice(&ts_s.to_ne_bytes());
    b[348..352].copy_from_slice(&addr);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::recorder::Limits;
    use sha2::{Digest, Sha256};
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn proc_net_lines_parse_into_addresses_ports_and_states() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 0 1\n";
        let parsed = parse_proc_net(tcp, "tcp", false);
        assert_eq!(parsed.len(), 1, "inode 0 is skipped");
        assert_eq!(parsed[0].0, 12345);
        assert_eq!(parsed[0].1.local_addr, "127.0.0.1");
        assert_eq!(parsed[0].1.local_port, 8080);
        assert!(parsed[0].1.is_listen());
        let (a, p) = parse_endpoint("0000000000000000FFFF00000100007F:0016", true).unwrap();
        assert_eq!((a.as_str(), p), ("127.0.0.1", 22));
        let (a, _) = parse_endpoint("00000000000000000000000001000000:0016", true).unwrap();
        assert_eq!(a, "::1");
        let st = parse_stat(
            "42 (my (odd) name) S 7 42 42 0 -1 4194304 1 0 0 0 0 0 0 0 20 0 1 0 98765 0",
        )
        .unwrap();
        assert_eq!(
            (st.comm.as_str(), st.ppid, st.start_ticks),
            ("my (odd) name", 7, 98765)
        );
    }

    #[test]
    fn polling_linux_recorder_sees_a_command_and_a_tcp_connection_the_test_makes() {
        let dir = tempfile::tempdir().unwrap();
        let wtmp = dir.path().join("wtmp");
        fs::write(
            &wtmp,
            utmp_record(USER_PROCESS, 1, "pts/9", "old", "", 1, [0; 4]),
        )
        .unwrap();
        let db = Arc::new(
            RecorderDb::open(
                &dir.path().join("monitor.db"),
                "linux-01",
                Limits::default(),
            )
            .unwrap(),
        );
        let handle = spawn_linux_recorder_with(
            db.clone(),
            LinuxConfig {
                interval: Duration::from_millis(100),
                wtmp: Some(wtmp.clone()),
                btmp: None,
                // This test covers the polling fallback; kernel events have their own tests.
                kernel_events: false,
                ..LinuxConfig::new(DEFAULT_INTERVAL)
            },
        );
        let reader = db.reader().unwrap();
        let marker = format!(
            "snapq-test-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        );

        // The first poll hashes every running executable (seconds when large test binaries
        // run): start once it is done, as the test process's own row shows.
        wait_for("the first poll", || {
            reader
                .query_row(
                    "SELECT 1 FROM process WHERE pid = ?1",
                    [i64::from(std::process::id())],
                    |r| r.get::<_, i64>(0),
                )
                .ok()
        });
        // A command: `sh` stays (two commands), its child `sleep` links to it.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 4; true", &marker])
            .spawn()
            .unwrap();
        let sh_pid = child.id() as i64;
        let (sh_row, sh_user): (i64, String) = wait_for("the sh process row", || {
            reader
                .query_row(
                    "SELECT id, user FROM process WHERE pid = ?1 AND cmdline LIKE '%' || ?2 || '%'",
                    rusqlite::params![sh_pid, marker],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .ok()
        });
        let expected_user = State::new(&LinuxConfig::new(DEFAULT_INTERVAL));
        let mut expected_user = expected_user;
        expected_user.reload_users();
        // SAFETY: geteuid has no preconditions.
        assert_eq!(sh_user, expected_user.user_name(unsafe { libc::geteuid() }));
        let (sleep_path, sleep_sha): (String, Option<String>) = wait_for("the sleep child", || {
            reader
                .query_row(
                    "SELECT path, sha256 FROM process WHERE parent_id = ?1 AND cmdline = 'sleep 4'",
                    [sh_row],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .ok()
        });
        assert!(sleep_path.ends_with("/sleep"), "{sleep_path}");
        let real_sha = hex::encode(Sha256::digest(fs::read(&sleep_path).unwrap()));
        assert_eq!(sleep_sha.as_deref(), Some(real_sha.as_str()));
        assert!(child.wait().unwrap().success());
        wait_for("sh's end_ts", || {
            reader
                .query_row("SELECT end_ts FROM process WHERE id = ?1", [sh_row], |r| {
                    r.get::<_, Option<i64>>(0)
                })
                .ok()
                .flatten()
        });

        // A TCP connection to a local listener, held until seen, then closed.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = i64::from(listener.local_addr().unwrap().port());
        let mut client = TcpStream::connect(("127.0.0.1", port as u16)).unwrap();
        let (server, _) = listener.accept().unwrap();
        let client_port = i64::from(client.local_addr().unwrap().port());
        client.write_all(b"hello").unwrap();
        let me: i64 = reader
            .query_row(
                "SELECT id FROM process WHERE pid = ?1 AND end_ts IS NULL ORDER BY id DESC",
                [i64::from(std::process::id())],
                |r| r.get(0),
            )
            .expect("the test process was recorded at start");
        let connect_actor: Option<i64> = wait_for("the connect event", || {
            reader
                .query_row(
                    "SELECT process_id FROM network WHERE op = 'connect' AND protocol = 'tcp' \
                     AND remote_addr = '127.0.0.1' AND remote_port = ?1 AND local_port = ?2",
                    [port, client_port],
                    |r| r.get(0),
                )
                .ok()
        });
        assert_eq!(connect_actor, Some(me), "attributed to this test process");
        wait_for("the accept event", || {
            reader
                .query_row(
                    "SELECT 1 FROM network WHERE op = 'accept' AND local_port = ?1 AND remote_port = ?2",
                    [port, client_port],
                    |r| r.get::<_, i64>(0),
                )
                .ok()
        });
        wait_for("the listen event", || {
            reader
                .query_row(
                    "SELECT 1 FROM network WHERE op = 'listen' AND local_port = ?1 AND process_id = ?2",
                    [port, me],
                    |r| r.get::<_, i64>(0),
                )
                .ok()
        });
        drop(client);
        drop(server);
        drop(listener);
        wait_for("the close event", || {
            reader
                .query_row(
                    "SELECT 1 FROM network WHERE op = 'close' AND local_port = ?1 AND remote_port = ?2",
                    [client_port, port],
                    |r| r.get::<_, i64>(0),
                )
                .ok()
        });

        // A logon and logoff appended to wtmp; the record that was there before is not replayed.
        let mut f = fs::OpenOptions::new().append(true).open(&wtmp).unwrap();
        f.write_all(&utmp_record(
            USER_PROCESS,
            4242,
            "pts/3",
            "alice",
            "203.0.113.9",
            1_700_000_000,
            [203, 0, 113, 9],
        ))
        .unwrap();
        f.write_all(&utmp_record(
            DEAD_PROCESS,
            4242,
            "pts/3",
            "",
            "",
            1_700_000_060,
            [0; 4],
        ))
        .unwrap();
        drop(f);
        let rows: Vec<(String, Option<String>, Option<String>, i64)> =
            wait_for("logon and logoff", || {
                let mut s = reader
                    .prepare("SELECT op, user, source_addr, ts FROM auth ORDER BY ts")
                    .unwrap();
                let rows: Vec<_> = s
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
                (rows.len() >= 2).then_some(rows)
            });
        assert_eq!(
            rows,
            vec![
                (
                    "logon".into(),
                    Some("alice".into()),
                    Some("203.0.113.9".into()),
                    1_700_000_000_000
                ),
                (
                    "logoff".into(),
                    Some("alice".into()),
                    None,
                    1_700_000_060_000
                ),
            ]
        );

        // Already-running processes are recorded once, not once per poll.
        let dupes: i64 = reader
            .query_row(
                "SELECT count(*) FROM (SELECT pid, cmdline, ts FROM process GROUP BY 1, 2, 3 HAVING count(*) > 1)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(dupes, 0);
        assert!(handle.events_written() > 0);
        handle.stop();
    }
}
