//! A simulated endpoint: realistic events of every type at a chosen rate, or a fast prefill of
//! history.
//!
//! Demos, tests, benchmarks and `fleet-sim` need endpoints full of plausible data without real
//! machines. The simulator keeps a small process model (parent chains, live processes that load
//! images, touch files, connect, resolve names and end) so the process tree and `process_id`
//! filters behave as on a real endpoint.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use super::db::{Event, ProcessEnd, RecorderDb, RecorderError, meta_keys, now_ms};
use super::handle::{RecorderHandle, next_tick};

/// How often the running simulator writes a batch.
const BATCH_INTERVAL: Duration = Duration::from_millis(100);
/// How often the running simulator applies retention.
const RETENTION_INTERVAL: Duration = Duration::from_secs(2);
/// Events per prefill transaction: big enough to be fast, small enough (~50–100 ms) that the
/// writer mutex is never held long.
const PREFILL_CHUNK: u64 = 20_000;
/// How far back a prefill reaches.
const PREFILL_SPAN_MS: i64 = 30 * 24 * 3600 * 1000;
/// The most live processes the model keeps; beyond it the oldest non-root ones end.
const MAX_LIVE: usize = 300;

/// Which kind of endpoint to imitate. Windows covers every event type (registry included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SimOs {
    #[default]
    Windows,
    Linux,
}

/// Where a simulated process's row is: known, or an earlier event of the batch being built.
#[derive(Debug, Clone, Copy)]
enum Row {
    Known(i64),
    Pending(usize),
}

#[derive(Debug, Clone)]
struct Proc {
    row: Row,
    pid: i64,
    image: usize,
    user: usize,
    /// Roots (init, services) never end.
    root: bool,
}

#[derive(Debug, Clone)]
struct Conn {
    process: Row,
    protocol: &'static str,
    local_port: i64,
    remote_addr: String,
    remote_port: i64,
}

struct Profile {
    images: &'static [(&'static str, &'static str)],
    libs: &'static [&'static str],
    users: &'static [&'static str],
    file_dirs: &'static [&'static str],
    file_exts: &'static [&'static str],
    listen_ports: &'static [i64],
    session_types: &'static [&'static str],
    /// Indexes into `images` of the long-running roots, parent first.
    roots: &'static [usize],
    /// Weights of process, file, network, dns, image, auth, registry.
    weights: [u32; 7],
}

const WINDOWS: Profile = Profile {
    images: &[
        (
            "C:\\Windows\\System32\\smss.exe",
            "\\SystemRoot\\System32\\smss.exe",
        ),
        ("C:\\Windows\\System32\\wininit.exe", "wininit.exe"),
        (
            "C:\\Windows\\System32\\services.exe",
            "C:\\Windows\\system32\\services.exe",
        ),
        (
            "C:\\Windows\\System32\\svchost.exe",
            "C:\\Windows\\system32\\svchost.exe -k netsvcs -p -s Schedule",
        ),
        ("C:\\Windows\\explorer.exe", "C:\\Windows\\Explorer.EXE"),
        (
            "C:\\Windows\\System32\\cmd.exe",
            "\"C:\\Windows\\system32\\cmd.exe\" /c whoami /all",
        ),
        (
            "C:\\Windows\\System32\\WindowsPowerShell\\v1.0\\powershell.exe",
            "powershell.exe -NoProfile -ExecutionPolicy Bypass -File C:\\Users\\Public\\update.ps1",
        ),
        (
            "C:\\Program Files\\Google\\Chrome\\Application\\chrome.exe",
            "\"C:\\Program Files\\Google\\Chrome\\Application\\chrome.exe\" --type=renderer",
        ),
        (
            "C:\\Program Files\\Microsoft Office\\root\\Office16\\WINWORD.EXE",
            "\"WINWORD.EXE\" /n \"C:\\Users\\alice\\Downloads\\invoice.docm\"",
        ),
        (
            "C:\\Windows\\System32\\rundll32.exe",
            "rundll32.exe C:\\Users\\Public\\helper.dll,Start",
        ),
        (
            "C:\\Windows\\System32\\schtasks.exe",
            "schtasks /create /tn Updater /tr C:\\Users\\Public\\upd.exe /sc minute",
        ),
        (
            "C:\\Windows\\System32\\notepad.exe",
            "notepad.exe C:\\Users\\alice\\notes.txt",
        ),
        (
            "C:\\Windows\\System32\\conhost.exe",
            "\\??\\C:\\Windows\\system32\\conhost.exe 0xffffffff -ForceV1",
        ),
        (
            "C:\\Windows\\System32\\net.exe",
            "net user backup P@ss /add",
        ),
    ],
    libs: &[
        "C:\\Windows\\System32\\ntdll.dll",
        "C:\\Windows\\System32\\kernel32.dll",
        "C:\\Windows\\System32\\KernelBase.dll",
        "C:\\Windows\\System32\\advapi32.dll",
        "C:\\Windows\\System32\\ws2_32.dll",
        "C:\\Windows\\System32\\crypt32.dll",
        "C:\\Windows\\System32\\amsi.dll",
        "C:\\Windows\\Microsoft.NET\\Framework64\\v4.0.30319\\clr.dll",
        "C:\\Users\\Public\\helper.dll",
    ],
    users: &[
        "NT AUTHORITY\\SYSTEM",
        "CORP\\alice",
        "CORP\\bob",
        "NT AUTHORITY\\NETWORK SERVICE",
        "CORP\\svc_backup",
    ],
    file_dirs: &[
        "C:\\Users\\alice\\Documents",
        "C:\\Users\\alice\\Downloads",
        "C:\\Users\\Public",
        "C:\\Windows\\Temp",
        "C:\\ProgramData\\Microsoft\\Windows\\Start Menu\\Programs\\Startup",
    ],
    file_exts: &["docx", "xlsx", "tmp", "ps1", "exe", "dll", "log", "zip"],
    listen_ports: &[135, 445, 3389, 5985],
    session_types: &[
        "interactive",
        "network",
        "remote_interactive",
        "service",
        "batch",
    ],
    roots: &[0, 1, 2, 3, 4],
    weights: [6, 28, 16, 12, 18, 3, 17],
};

const LINUX: Profile = Profile {
    images: &[
        ("/usr/lib/systemd/systemd", "/sbin/init splash"),
        (
            "/usr/sbin/sshd",
            "sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups",
        ),
        ("/usr/sbin/cron", "/usr/sbin/cron -f"),
        ("/usr/bin/bash", "-bash"),
        (
            "/usr/sbin/nginx",
            "nginx: master process /usr/sbin/nginx -g daemon on; master_process on;",
        ),
        ("/usr/bin/curl", "curl -fsSL https://example.org/install.sh"),
        (
            "/usr/bin/python3.11",
            "python3 /opt/app/worker.py --queue default",
        ),
        ("/usr/bin/sudo", "sudo systemctl restart nginx"),
        (
            "/usr/bin/ssh",
            "ssh -o StrictHostKeyChecking=no deploy@10.0.4.12",
        ),
        ("/usr/bin/tar", "tar czf /tmp/backup.tgz /etc"),
        ("/tmp/.x/kworkerd", "[kworkerd]"),
        ("/usr/bin/git", "git pull --ff-only"),
    ],
    libs: &[
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/x86_64-linux-gnu/libssl.so.3",
        "/usr/lib/x86_64-linux-gnu/libcrypto.so.3",
        "/usr/lib/x86_64-linux-gnu/libpam.so.0",
        "/usr/lib/x86_64-linux-gnu/libz.so.1",
        "/tmp/.x/libprocesshider.so",
    ],
    users: &["root", "alice", "www-data", "deploy", "postgres"],
    file_dirs: &[
        "/home/alice",
        "/tmp",
        "/var/www/html",
        "/etc/cron.d",
        "/var/log/nginx",
        "/opt/app",
    ],
    file_exts: &["txt", "log", "sh", "py", "conf", "tgz", "so"],
    listen_ports: &[22, 80, 443, 5432],
    session_types: &["ssh", "console", "sudo", "cron"],
    roots: &[0, 1, 2, 4],
    weights: [6, 30, 18, 14, 22, 4, 0],
};

const DOMAINS: &[&str] = &[
    "www.google.com",
    "login.microsoftonline.com",
    "github.com",
    "api.snapcraft.io",
    "update.example.org",
    "cdn.jsdelivr.net",
    "pastebin.com",
    "x7f3k2q9.duckdns.org",
    "time.windows.com",
    "ocsp.digicert.com",
];
const QTYPES: &[&str] = &["A", "A", "A", "AAAA", "CNAME", "TXT", "MX"];
const REGISTRY_KEYS: &[&str] = &[
    "HKLM\\Software\\Microsoft\\Windows\\CurrentVersion\\Run",
    "HKCU\\Software\\Microsoft\\Windows\\CurrentVersion\\Run",
    "HKLM\\System\\CurrentControlSet\\Services\\Updater",
    "HKCU\\Software\\Classes\\ms-settings\\Shell\\Open\\command",
    "HKLM\\Software\\Policies\\Microsoft\\Windows Defender",
    "HKCU\\Software\\Microsoft\\Office\\16.0\\Word\\Security",
];
const REGISTRY_OPS: &[&str] = &[
    "set_value",
    "set_value",
    "create_key",
    "delete_value",
    "delete_key",
];
const FILE_OPS: &[&str] = &["create", "write", "write", "rename", "delete"];
const REMOTE_PORTS: &[i64] = &[443, 443, 443, 80, 53, 22, 8080, 4444];

/// Events of a simulated endpoint, generated in time order.
struct Sim {
    rng: SmallRng,
    profile: &'static Profile,
    image_sha: Vec<String>,
    lib_sha: Vec<String>,
    local_addr: String,
    live: Vec<Proc>,
    conns: Vec<Conn>,
    next_pid: i64,
    /// The batch being built.
    events: Vec<Event>,
    ends: Vec<ProcessEnd>,
}

fn sha_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

impl Sim {
    fn new(os: SimOs, seed: u64) -> Sim {
        let profile = match os {
            SimOs::Windows => &WINDOWS,
            SimOs::Linux => &LINUX,
        };
        let mut rng = SmallRng::seed_from_u64(seed);
        let local_addr = format!(
            "10.{}.{}.{}",
            rng.random_range(0..255),
            rng.random_range(0..255),
            rng.random_range(2..254)
        );
        Sim {
            image_sha: profile.images.iter().map(|(p, _)| sha_hex(p)).collect(),
            lib_sha: profile.libs.iter().map(|p| sha_hex(p)).collect(),
            rng,
            profile,
            local_addr,
            live: Vec::new(),
            conns: Vec::new(),
            next_pid: 400,
            events: Vec::new(),
            ends: Vec::new(),
        }
    }

    fn set_row(ev: Event, column: &str, row: Row) -> Event {
        match row {
            Row::Known(id) => ev.set(column, id),
            Row::Pending(b) => ev.link(column, b),
        }
    }

    /// Once the batch is written, pending rows become known ids.
    fn resolve(&mut self, ids: &[i64]) {
        let fix = |r: &mut Row| {
            if let Row::Pending(b) = *r {
                *r = Row::Known(ids[b]);
            }
        };
        self.live.iter_mut().for_each(|p| fix(&mut p.row));
        self.conns.iter_mut().for_each(|c| fix(&mut c.process));
        self.events.clear();
        self.ends.clear();
    }

    fn start_process(&mut self, ts: i64, image: usize, parent: Option<usize>, root: bool) -> usize {
        self.next_pid += self.rng.random_range(1..40);
        if self.next_pid > 4_000_000 {
            self.next_pid = 300;
        }
        let user = if root {
            0
        } else {
            self.rng.random_range(0..self.profile.users.len())
        };
        let (path, cmdline) = self.profile.images[image];
        let mut ev = Event::new("process", ts)
            .set("pid", self.next_pid)
            .set("path", path.to_string())
            .set("cmdline", cmdline.to_string())
            .set("user", self.profile.users[user].to_string())
            .set("sha256", self.image_sha[image].clone());
        match parent {
            Some(p) => {
                let parent = &self.live[p];
                ev = ev.set("ppid", parent.pid);
                ev = Sim::set_row(ev, "parent_id", parent.row);
            }
            None => ev = ev.set("ppid", if root { 0i64 } else { 1 }),
        }
        self.events.push(ev);
        self.live.push(Proc {
            row: Row::Pending(self.events.len() - 1),
            pid: self.next_pid,
            image,
            user,
            root,
        });
        self.live.len() - 1
    }

    fn ensure_roots(&mut self, ts: i64) {
        if !self.live.is_empty() {
            return;
        }
        let mut parent = None;
        for &image in self.profile.roots {
            let p = self.start_process(ts, image, parent, true);
            if parent.is_none() {
                parent = Some(p);
            }
        }
    }

    fn actor(&mut self) -> Proc {
        let i = self.rng.random_range(0..self.live.len());
        self.live[i].clone()
    }

    fn random_name(&mut self) -> String {
        const WORDS: &[&str] = &[
            "report", "invoice", "update", "backup", "notes", "setup", "data", "cache",
        ];
        let w = WORDS.choose(&mut self.rng).expect("non-empty");
        let ext = self
            .profile
            .file_exts
            .choose(&mut self.rng)
            .expect("non-empty");
        format!("{w}_{:04}.{ext}", self.rng.random_range(0..10_000))
    }

    fn file_path(&mut self) -> String {
        let dir = *self
            .profile
            .file_dirs
            .choose(&mut self.rng)
            .expect("non-empty");
        let name = self.random_name();
        let sep = if dir.starts_with('/') { '/' } else { '\\' };
        format!("{dir}{sep}{name}")
    }

    fn public_ip(&mut self) -> String {
        let first = *[13u8, 20, 34, 52, 93, 104, 140, 151, 185, 203]
            .choose(&mut self.rng)
            .expect("non-empty");
        format!(
            "{first}.{}.{}.{}",
            self.rng.random_range(0..256),
            self.rng.random_range(0..256),
            self.rng.random_range(1..255)
        )
    }

    /// Adds one event at `ts` to the batch.
    fn step(&mut self, ts: i64) {
        self.ensure_roots(ts);
        let w = self.profile.weights;
        let total: u32 = w.iter().sum();
        let mut pick = self.rng.random_range(0..total);
        let mut kind = 0;
        while pick >= w[kind] {
            pick -= w[kind];
            kind += 1;
        }
        match kind {
            0 => self.process_event(ts),
            1 => self.file_event(ts),
            2 => self.network_event(ts),
            3 => self.dns_event(ts),
            4 => self.image_event(ts),
            5 => self.auth_event(ts),
            _ => self.registry_event(ts),
        }
    }

    fn process_event(&mut self, ts: i64) {
        let parent = self.rng.random_range(0..self.live.len());
        let first_child = self.profile.roots.len();
        let image = self
            .rng
            .random_range(first_child..self.profile.images.len());
        self.start_process(ts, image, Some(parent), false);
        // Keep the model bounded: end an old non-root process, as real short-lived ones do.
        if self.live.len() > MAX_LIVE || self.rng.random_bool(0.7) {
            let candidates: Vec<usize> = (0..self.live.len())
                .filter(|&i| !self.live[i].root && matches!(self.live[i].row, Row::Known(_)))
                .collect();
            if let Some(&i) = candidates.first() {
                let p = self.live.remove(i);
                if let Row::Known(row_id) = p.row {
                    let exit_code = if self.rng.random_bool(0.9) { 0 } else { 1 };
                    self.ends.push(ProcessEnd {
                        row_id,
                        end_ts: ts,
                        exit_code: Some(exit_code),
                    });
                }
            }
        }
    }

    fn file_event(&mut self, ts: i64) {
        let actor = self.actor();
        let op = *FILE_OPS.choose(&mut self.rng).expect("non-empty");
        let path = self.file_path();
        let mut ev = Event::new("file", ts).set("op", op).set("path", path);
        ev = Sim::set_row(ev, "process_id", actor.row);
        match op {
            "rename" => ev = ev.set("new_path", self.file_path()),
            "delete" => {}
            _ => ev = ev.set("size", self.rng.random_range(0..5_000_000i64)),
        }
        self.events.push(ev);
    }

    fn network_event(&mut self, ts: i64) {
        let roll: f64 = self.rng.random();
        if roll < 0.3 && !self.conns.is_empty() {
            let i = self.rng.random_range(0..self.conns.len());
            let c = self.conns.swap_remove(i);
            let ev = Event::new("network", ts)
                .set("op", "close")
                .set("protocol", c.protocol)
                .set("local_addr", self.local_addr.clone())
                .set("local_port", c.local_port)
                .set("remote_addr", c.remote_addr)
                .set("remote_port", c.remote_port);
            self.events.push(Sim::set_row(ev, "process_id", c.process));
            return;
        }
        let actor = self.actor();
        let (op, local_port, remote_addr, remote_port) = if roll < 0.45 {
            let port = *self
                .profile
                .listen_ports
                .choose(&mut self.rng)
                .expect("non-empty");
            let remote = format!(
                "10.0.{}.{}",
                self.rng.random_range(0..8),
                self.rng.random_range(2..254)
            );
            ("accept", port, remote, self.rng.random_range(32768..61000))
        } else {
            let port = *REMOTE_PORTS.choose(&mut self.rng).expect("non-empty");
            (
                "connect",
                self.rng.random_range(32768..61000),
                self.public_ip(),
                port,
            )
        };
        let protocol = if remote_port == 53 { "udp" } else { "tcp" };
        let ev = Event::new("network", ts)
            .set("op", op)
            .set("protocol", protocol)
            .set("local_addr", self.local_addr.clone())
            .set("local_port", local_port)
            .set("remote_addr", remote_addr.clone())
            .set("remote_port", remote_port);
        self.events.push(Sim::set_row(ev, "process_id", actor.row));
        if self.conns.len() < 200 {
            self.conns.push(Conn {
                process: actor.row,
                protocol,
                local_port,
                remote_addr,
                remote_port,
            });
        }
    }

    fn dns_event(&mut self, ts: i64) {
        let actor = self.actor();
        let query = *DOMAINS.choose(&mut self.rng).expect("non-empty");
        let qtype = *QTYPES.choose(&mut self.rng).expect("non-empty");
        let answer = match qtype {
            "A" => self.public_ip(),
            "AAAA" => format!("2606:4700::{:x}", self.rng.random_range(1..0xffffu32)),
            "CNAME" => format!("edge-{}.{query}", self.rng.random_range(1..40)),
            "MX" => format!("10 mail.{query}"),
            _ => "v=spf1 include:_spf.example.org ~all".to_string(),
        };
        let ev = Event::new("dns", ts)
            .set("query", query)
            .set("qtype", qtype)
            .set("answer", answer);
        self.events.push(Sim::set_row(ev, "process_id", actor.row));
    }

    fn image_event(&mut self, ts: i64) {
        let actor = self.actor();
        let lib = self.rng.random_range(0..self.profile.libs.len());
        let ev = Event::new("image", ts)
            .set("path", self.profile.libs[lib])
            .set("sha256", self.lib_sha[lib].clone());
        self.events.push(Sim::set_row(ev, "process_id", actor.row));
    }

    fn auth_event(&mut self, ts: i64) {
        let actor = self.actor();
        let op = *["logon", "logon", "logoff", "failure"]
            .choose(&mut self.rng)
            .expect("non-empty");
        let user = if op == "failure" && self.rng.random_bool(0.5) {
            *["admin", "administrator", "test", "oracle"]
                .choose(&mut self.rng)
                .expect("non-empty")
        } else {
            self.profile.users[actor.user]
        };
        let source = if self.rng.random_bool(0.6) {
            format!(
                "10.0.{}.{}",
                self.rng.random_range(0..8),
                self.rng.random_range(2..254)
            )
        } else {
            self.public_ip()
        };
        let session = *self
            .profile
            .session_types
            .choose(&mut self.rng)
            .expect("non-empty");
        let ev = Event::new("auth", ts)
            .set("op", op)
            .set("user", user)
            .set("source_addr", source)
            .set("session_type", session);
        self.events.push(Sim::set_row(ev, "process_id", actor.row));
    }

    fn registry_event(&mut self, ts: i64) {
        let actor = self.actor();
        let key = *REGISTRY_KEYS.choose(&mut self.rng).expect("non-empty");
        let op = *REGISTRY_OPS.choose(&mut self.rng).expect("non-empty");
        let mut ev = Event::new("registry", ts).set("op", op).set("key", key);
        if op != "create_key" && op != "delete_key" {
            ev = ev.set(
                "value_name",
                [
                    "Updater",
                    "OneDrive",
                    "DisableRealtimeMonitoring",
                    "VBAWarnings",
                ][self.rng.random_range(0..4)],
            );
        }
        if op == "set_value" {
            let image = self.profile.images[actor.image].0;
            ev = ev.set("value", format!("\"{image}\" /background"));
        }
        self.events.push(Sim::set_row(ev, "process_id", actor.row));
    }

    /// Writes the batch built so far.
    fn flush(&mut self, db: &RecorderDb) -> Result<usize, RecorderError> {
        if self.events.is_empty() && self.ends.is_empty() {
            return Ok(0);
        }
        let n = self.events.len();
        match db.record(&self.events, &self.ends) {
            Ok(ids) => {
                self.resolve(&ids);
                Ok(n)
            }
            Err(e) => {
                // The batch is lost: forget processes that now have no row.
                self.live.retain(|p| matches!(p.row, Row::Known(_)));
                self.conns.retain(|c| matches!(c.process, Row::Known(_)));
                self.events.clear();
                self.ends.clear();
                Err(e)
            }
        }
    }
}

/// Settings of a running simulator.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    pub events_per_sec: u32,
    pub os: SimOs,
    /// Seed of the event generator, for reproducible data.
    pub seed: u64,
}

fn mark_simulated(db: &RecorderDb, os: SimOs) -> Result<(), RecorderError> {
    db.set_meta(meta_keys::RECORDER, "simulator")?;
    db.set_meta(
        meta_keys::OS,
        match os {
            SimOs::Windows => "windows (simulated)",
            SimOs::Linux => "linux (simulated)",
        },
    )
}

/// Starts a simulated Windows endpoint writing `events_per_sec` events per second.
pub fn spawn_simulator(db: Arc<RecorderDb>, events_per_sec: u32) -> RecorderHandle {
    spawn_simulator_with(
        db,
        SimConfig {
            events_per_sec,
            os: SimOs::Windows,
            seed: rand::random(),
        },
    )
}

/// Starts a simulator with explicit settings on its own thread.
pub fn spawn_simulator_with(db: Arc<RecorderDb>, config: SimConfig) -> RecorderHandle {
    RecorderHandle::spawn("snapq-simulator", move |ticker| {
        if let Err(e) = mark_simulated(&db, config.os) {
            tracing::warn!(error = %e, "simulator cannot write meta");
        }
        let mut sim = Sim::new(config.os, config.seed);
        let rate = f64::from(config.events_per_sec);
        let started = Instant::now();
        let mut emitted: u64 = 0;
        let mut last_retention = Instant::now();
        let mut tick = Instant::now();
        let mut last_ts = i64::MIN;
        loop {
            let now = now_ms();
            let due = (started.elapsed().as_secs_f64() * rate) as u64;
            let n = due.saturating_sub(emitted);
            // Spread the batch's timestamps over the interval it stands for, never before the
            // previous batch's last event (a late tick followed by a quick one would otherwise
            // date a child before the parent it names).
            let from = (now - BATCH_INTERVAL.as_millis() as i64)
                .max(last_ts)
                .min(now);
            for i in 0..n {
                let ts = from + ((now - from) * (i as i64 + 1)) / n as i64;
                sim.step(ts);
                last_ts = ts;
            }
            emitted += n;
            match sim.flush(&db) {
                Ok(written) => ticker.add_written(written),
                Err(e) => tracing::info!(error = %e, "simulator batch failed; continuing"),
            }
            let limits = db.limits();
            if (limits.max_bytes.is_some() || limits.max_age.is_some())
                && last_retention.elapsed() >= RETENTION_INTERVAL
            {
                last_retention = Instant::now();
                if let Err(e) = db.enforce_retention() {
                    tracing::info!(error = %e, "retention failed; will retry");
                }
            }
            tick = next_tick(tick, BATCH_INTERVAL);
            if !ticker.wait_until(tick) {
                break;
            }
        }
    })
}

/// Writes `n` realistic events spread over the last 30 days, in time order, as fast as possible.
/// Returns the number of events written.
pub fn prefill(db: &RecorderDb, n: u64) -> Result<u64, RecorderError> {
    prefill_with(db, n, SimOs::Windows, rand::random())
}

/// [`prefill`] with an explicit endpoint kind and seed.
#[tracing::instrument(skip(db))]
pub fn prefill_with(db: &RecorderDb, n: u64, os: SimOs, seed: u64) -> Result<u64, RecorderError> {
    if n == 0 {
        return Ok(0);
    }
    mark_simulated(db, os)?;
    let end = now_ms();
    let start = end - PREFILL_SPAN_MS;
    // Durability is pointless for data we can regenerate, and a bigger cache keeps the indexes in
    // memory; both go back to normal afterwards.
    let sqlite = |e| RecorderError::Sqlite {
        path: db.path().to_path_buf(),
        source: e,
    };
    let previous_cache: i64 = db
        .with_writer(|c| c.query_row("PRAGMA cache_size", [], |r| r.get(0)))
        .map_err(sqlite)?;
    db.with_writer(|c| c.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -262144;"))
        .map_err(sqlite)?;
    let result = (|| {
        let mut sim = Sim::new(os, seed);
        let mut written = 0u64;
        let mut generated = 0u64;
        while generated < n {
            let target = (generated + PREFILL_CHUNK).min(n);
            while generated < target {
                let ts = start + ((PREFILL_SPAN_MS as i128 * generated as i128) / n as i128) as i64;
                sim.step(ts);
                // A step may add more than one event (the root processes come first).
                generated = written + sim.events.len() as u64;
            }
            written += sim.flush(db)? as u64;
        }
        Ok(written)
    })();
    db.with_writer(|c| {
        c.execute_batch(&format!(
            "PRAGMA synchronous = NORMAL; PRAGMA cache_size = {previous_cache};"
        ))
    })
    .map_err(sqlite)?;
    let written = result?;
    // Recording now reaches back to the first prefilled event.
    let first = db
        .meta(meta_keys::FIRST_RECORDED)?
        .and_then(|v| v.parse::<i64>().ok())
        .map_or(start, |f| f.min(start));
    db.set_meta(meta_keys::FIRST_RECORDED, &first.to_string())?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::recorder::Limits;
    use snapq_core::schema;

    fn counts(db: &RecorderDb) -> Vec<(&'static str, i64)> {
        let r = db.reader().unwrap();
        schema::event_tables()
            .map(|t| {
                let n = r
                    .query_row(&format!("SELECT count(*) FROM {}", t.name), [], |x| {
                        x.get(0)
                    })
                    .unwrap();
                (t.name, n)
            })
            .collect()
    }

    /// Every `process_id` and `parent_id` points at an existing process row, and a process row's
    /// own `process_id` is its id.
    fn assert_links_hold(db: &RecorderDb) {
        let r = db.reader().unwrap();
        for t in schema::event_tables() {
            let dangling: i64 = r
                .query_row(
                    &format!(
                        "SELECT count(*) FROM {} e WHERE e.process_id IS NULL \
                         OR NOT EXISTS (SELECT 1 FROM process p WHERE p.id = e.process_id)",
                        t.name
                    ),
                    [],
                    |x| x.get(0),
                )
                .unwrap();
            assert_eq!(dangling, 0, "{} has events without their process", t.name);
        }
        let bad_self: i64 = r
            .query_row(
                "SELECT count(*) FROM process WHERE process_id != id",
                [],
                |x| x.get(0),
            )
            .unwrap();
        assert_eq!(bad_self, 0);
        let orphans: i64 = r
            .query_row(
                "SELECT count(*) FROM process c WHERE c.parent_id IS NOT NULL AND NOT EXISTS \
                 (SELECT 1 FROM process p WHERE p.id = c.parent_id AND p.pid = c.ppid AND p.ts <= c.ts)",
                [],
                |x| x.get(0),
            )
            .unwrap();
        assert_eq!(orphans, 0, "parent chains hold");
        let with_parent: i64 = r
            .query_row(
                "SELECT count(*) FROM process WHERE parent_id IS NOT NULL",
                [],
                |x| x.get(0),
            )
            .unwrap();
        assert!(with_parent > 0);
    }

    #[test]
    fn simulator_writes_every_event_type_at_roughly_the_rate() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(
            RecorderDb::open(&dir.path().join("monitor.db"), "sim-01", Limits::default()).unwrap(),
        );
        let rate = 2_000;
        let started = Instant::now();
        let handle = spawn_simulator(db.clone(), rate);
        let deadline = started + Duration::from_secs(20);
        loop {
            let c = counts(&db);
            if c.iter().all(|(_, n)| *n > 0) && handle.events_written() >= 3_000 {
                break;
            }
            assert!(Instant::now() < deadline, "not every type appeared: {c:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let (written, elapsed) = (handle.events_written(), started.elapsed());
        handle.stop();
        let per_sec = written as f64 / elapsed.as_secs_f64();
        assert!(
            per_sec > f64::from(rate) * 0.6 && per_sec < f64::from(rate) * 1.4,
            "{per_sec:.0} events/s for a rate of {rate}"
        );
        let total: i64 = counts(&db).iter().map(|(_, n)| n).sum();
        assert!(
            total as u64 >= written,
            "{total} rows for {written} written"
        );
        assert_links_hold(&db);
        assert_eq!(
            db.meta(meta_keys::RECORDER).unwrap().as_deref(),
            Some("simulator")
        );
        // Timestamps are current.
        let newest: i64 = db
            .reader()
            .unwrap()
            .query_row("SELECT max(ts) FROM file", [], |x| x.get(0))
            .unwrap();
        assert!((now_ms() - newest).abs() < 5_000);
    }

    #[test]
    fn simulator_keeps_the_database_under_its_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_bytes: Some(2 << 20),
            max_age: None,
        };
        let db =
            Arc::new(RecorderDb::open(&dir.path().join("monitor.db"), "sim-01", limits).unwrap());
        prefill_with(&db, 40_000, SimOs::Windows, 5).unwrap();
        assert!(
            db.used_bytes().unwrap() > 2 << 20,
            "prefill went over the limit"
        );
        let handle = spawn_simulator(db.clone(), 100);
        let deadline = Instant::now() + Duration::from_secs(20);
        while db.used_bytes().unwrap() > 2 << 20 {
            assert!(Instant::now() < deadline, "retention never ran");
            std::thread::sleep(Duration::from_millis(50));
        }
        handle.stop();
    }

    #[test]
    fn prefill_writes_exactly_n_events_over_the_last_30_days_in_time_order() {
        let dir = tempfile::tempdir().unwrap();
        let db =
            RecorderDb::open(&dir.path().join("monitor.db"), "sim-01", Limits::default()).unwrap();
        let n = 50_000;
        let before = now_ms();
        assert_eq!(prefill_with(&db, n, SimOs::Linux, 11).unwrap(), n);
        let c = counts(&db);
        assert_eq!(c.iter().map(|(_, n)| *n as u64).sum::<u64>(), n);
        for (table, count) in &c {
            // The Linux profile writes no registry events; every other type is there.
            assert_eq!(*count == 0, *table == "registry", "{c:?}");
        }
        let r = db.reader().unwrap();
        let now = now_ms();
        for t in schema::event_tables() {
            let (min, max, out_of_order): (Option<i64>, Option<i64>, i64) = r
                .query_row(
                    &format!(
                        "SELECT min(ts), max(ts), (SELECT count(*) FROM {0} a JOIN {0} b ON b.id = a.id + 1 WHERE b.ts < a.ts) FROM {0}",
                        t.name
                    ),
                    [],
                    |x| Ok((x.get(0)?, x.get(1)?, x.get(2)?)),
                )
                .unwrap();
            if let (Some(min), Some(max)) = (min, max) {
                assert!(
                    min >= before - PREFILL_SPAN_MS && max <= now,
                    "{}: min {min} max {max}, prefill between {before} and {now}",
                    t.name
                );
                assert!(
                    max - min > PREFILL_SPAN_MS * 9 / 10,
                    "{} spans 30 days",
                    t.name
                );
            }
            assert_eq!(out_of_order, 0, "{} is in time order", t.name);
        }
        assert_links_hold(&db);
        let first: i64 = db
            .meta(meta_keys::FIRST_RECORDED)
            .unwrap()
            .unwrap()
            .parse()
            .unwrap();
        assert!(first <= now - PREFILL_SPAN_MS + 1_000);
        // Durability is back to normal afterwards.
        let sync: i64 = db
            .with_writer(|c| c.query_row("PRAGMA synchronous", [], |x| x.get(0)))
            .unwrap();
        assert_eq!(sync, 1, "synchronous = NORMAL");
    }

    /// `cargo test --release -p snapq --lib prefill_rate -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark: run in release mode"]
    fn prefill_rate_of_one_million_events() {
        let dir = tempfile::tempdir().unwrap();
        let db = RecorderDb::open(
            &dir.path().join("monitor.db"),
            "bench-01",
            Limits::default(),
        )
        .unwrap();
        let n = 1_000_000;
        let started = Instant::now();
        assert_eq!(prefill(&db, n).unwrap(), n);
        let secs = started.elapsed().as_secs_f64();
        let size = std::fs::metadata(db.path()).unwrap().len()
            + std::fs::metadata(db.path().with_extension("db-wal")).map_or(0, |m| m.len());
        println!(
            "prefill: {n} events in {secs:.2} s = {:.0} events/s, {:.0} MiB",
            n as f64 / secs,
            size as f64 / (1 << 20) as f64
        );
    }
}
