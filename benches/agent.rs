//! The endpoint agent's benchmark (issue 2): prefill speed, staging a consistent copy against
//! `sqlite3 .backup` of the same live file, writer stalls while staging, live time-range pages and
//! full-scan filters through the endpoint API against the `sqlite3` CLI, and one consistency check
//! of a staged copy.
//!
//! Run: `cargo bench --bench agent` (release profile). Smoke run:
//! `SNAPQ_BENCH_EVENTS=200000 cargo bench --bench agent`. Settings (environment):
//! - `SNAPQ_BENCH_EVENTS` (default 4,000,000): events to prefill;
//! - `SNAPQ_BENCH_DIR` (default a temporary directory): where the data directory goes; it needs
//!   about three times the database size free;
//! - `SNAPQ_BENCH_BACKUP_TIMEOUT_SECS` (default 60): a `sqlite3 .backup` that has not finished by
//!   then is stopped and reported as such.
//!
//! The agent is served in-process on 127.0.0.1:0 and assembled from the same public parts as
//! `Agent::build` (recorder database, simulator, staging, endpoint router) because the writer-stall
//! probe must insert through the very `RecorderDb` the simulator and staging use; `Agent` does not
//! hand it out.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use snapq::agent::api::{AgentState, router};
use snapq::agent::recorder::{self, Event, Limits, RecorderDb, RecorderKind};
use snapq::agent::staging::Staging;
use snapq_core::wire::{Staged, StagedState};

const HOSTNAME: &str = "bench-01";
const TOKEN: &str = "bench-token-0123456789abcdef";
const SIM_EVENTS_PER_SEC: u32 = 1_000;
const SQLITE3: &str = "/usr/bin/sqlite3";
const STAGING_RUNS: usize = 3;
const PAGE_REQUESTS: usize = 200;
const SCAN_RUNS: usize = 5;
const HOUR_MS: i64 = 3_600_000;
/// A needle no simulated path contains, so the filter must read every `file` row.
const ABSENT_NEEDLE: &str = "zq-bench-absent-needle";
const PROBE_INTERVAL: Duration = Duration::from_millis(10);

// Targets from issue 2.
const PREFILL_TARGET_PER_SEC: f64 = 200_000.0;
const STAGING_TARGET_RATIO: f64 = 1.0;
const STALL_TARGET: Duration = Duration::from_millis(100);
const PAGE_MEDIAN_TARGET: Duration = Duration::from_millis(25);
const SCAN_TARGET_RATIO: f64 = 1.5;

/// What the writer probe was overlapping when it measured an insert.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Phase {
    Idle = 0,
    Staging = 1,
    Backup = 2,
    Queries = 3,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            1 => Phase::Staging,
            2 => Phase::Backup,
            3 => Phase::Queries,
            _ => Phase::Idle,
        }
    }
}

/// One line of the final table.
struct Row {
    what: String,
    measured: String,
    target: String,
    pass: Option<bool>,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("agent benchmark failed: {e:#}");
        std::process::exit(1);
    }
}

fn env_u64(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .replace('_', "")
            .parse()
            .with_context(|| format!("{name} must be a whole number, got {v:?}")),
        Err(_) => Ok(default),
    }
}

fn run() -> anyhow::Result<()> {
    let events = env_u64("SNAPQ_BENCH_EVENTS", 4_000_000)?;
    let backup_timeout = Duration::from_secs(env_u64("SNAPQ_BENCH_BACKUP_TIMEOUT_SECS", 60)?);
    let base = match std::env::var_os("SNAPQ_BENCH_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::temp_dir(),
    };
    std::fs::create_dir_all(&base)?;
    let tmp = tempfile::Builder::new()
        .prefix("snapq-bench-agent-")
        .tempdir_in(&base)?;
    let dir = tmp.path().to_owned();
    let have_sqlite3 = Path::new(SQLITE3).exists();

    println!("snapq endpoint agent benchmark (issue 2)");
    println!(
        "  events: {events}, data dir: {}, cores: {}",
        dir.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if !have_sqlite3 {
        println!(
            "  {SQLITE3} is missing: the .backup and CLI comparisons are skipped; install it with `apt-get install -y sqlite3`"
        );
    }
    let mut rows = Vec::new();

    // 1. Prefill a fresh recorder database.
    let db_path = dir.join("monitor.db");
    let db = Arc::new(RecorderDb::open(&db_path, HOSTNAME, Limits::default())?);
    let started = Instant::now();
    let written = recorder::prefill(&db, events)?;
    let prefill_secs = started.elapsed().as_secs_f64();
    let rate = written as f64 / prefill_secs;
    // Fold the WAL into the main file so the size below is the database's.
    db.with_writer(|c| c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())))?;
    let db_size = std::fs::metadata(&db_path)?.len();
    println!(
        "prefill: {written} events in {prefill_secs:.1} s = {rate:.0} events/s; monitor.db {} ({db_size} bytes)",
        mib(db_size)
    );
    rows.push(Row {
        what: format!("prefill {written} events"),
        measured: format!("{rate:.0} events/s ({prefill_secs:.1} s)"),
        target: format!(">= {PREFILL_TARGET_PER_SEC:.0} events/s"),
        pass: Some(rate >= PREFILL_TARGET_PER_SEC),
    });
    rows.push(Row {
        what: "database file size".into(),
        measured: format!("{} ({db_size} B)", mib(db_size)),
        target: "~750 MB at 4M events".into(),
        pass: None,
    });

    // 2. The agent, in-process, with the simulator writing 1,000 events/s.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let staging = Staging::open(
        &dir.join("staged"),
        db.clone(),
        Duration::from_secs(3600),
        0,
    )?;
    let simulator = recorder::spawn(
        RecorderKind::Simulate {
            events_per_sec: SIM_EVENTS_PER_SEC,
        },
        db.clone(),
    );
    let state = Arc::new(AgentState {
        hostname: HOSTNAME.into(),
        token: TOKEN.into(),
        identity: Arc::new(snapq::agent::enroll::Identity::load(
            dir.join("server.credential"),
        )?),
        db: db.clone(),
        staging,
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let addr = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let shutdown = async {
                let _ = stop_rx.await;
            };
            if let Err(e) = axum::serve(listener, router(state))
                .with_graceful_shutdown(shutdown)
                .await
            {
                eprintln!("endpoint API ended: {e}");
            }
        });
        anyhow::Ok(addr)
    })?;
    let api = Api {
        // The endpoint API in-process over plain HTTP: this bench measures the agent's own work.
        http: {
            snapq_core::agent_client::install_crypto_provider();
            reqwest::Client::new()
        },
        base: format!("http://{addr}"),
    };
    println!(
        "agent: listening on {addr}, simulator writing {SIM_EVENTS_PER_SEC} events/s; a probe inserts 1 event every {PROBE_INTERVAL:?} through the same RecorderDb"
    );

    let phase = Arc::new(AtomicU8::new(Phase::Idle as u8));
    let probe = Probe::start(db.clone(), phase.clone());
    // Let the simulator and the probe settle before measuring.
    std::thread::sleep(Duration::from_secs(2));

    // 2a. Staging a consistent copy while the simulator (and the probe) write.
    let mut stage_times = Vec::new();
    let mut first_staged: Option<Staged> = None;
    for run in 0..STAGING_RUNS {
        phase.store(Phase::Staging as u8, Ordering::SeqCst);
        let t = Instant::now();
        let staged = runtime.block_on(api.stage())?;
        let took = t.elapsed();
        phase.store(Phase::Idle as u8, Ordering::SeqCst);
        println!(
            "staging run {}: {:.3} s ({} events, {})",
            run + 1,
            took.as_secs_f64(),
            staged.events.unwrap_or_default(),
            mib(staged.size)
        );
        stage_times.push(took);
        if first_staged.is_none() {
            first_staged = Some(staged);
        } else {
            runtime.block_on(api.delete_staged(&staged.id))?;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let stage_median = median(&stage_times);
    rows.push(Row {
        what: format!("stage a consistent copy, POST /v1/snapshots (median of {STAGING_RUNS})"),
        measured: format!(
            "{:.3} s {}",
            stage_median.as_secs_f64(),
            list_secs(&stage_times)
        ),
        target: "-".into(),
        pass: None,
    });

    // 2b. Live queries through the endpoint API while the simulator writes.
    phase.store(Phase::Queries as u8, Ordering::SeqCst);
    let summary = runtime.block_on(api.get_json("/v1/events/summary", &[]))?;
    let oldest = summary["oldest_ts"]
        .as_i64()
        .context("summary has no oldest_ts")?;
    let newest = summary["newest_ts"]
        .as_i64()
        .context("summary has no newest_ts")?;
    let mut rng = SmallRng::seed_from_u64(2);
    let mut page_times = Vec::with_capacity(PAGE_REQUESTS);
    let mut page_events = 0usize;
    for _ in 0..PAGE_REQUESTS {
        let since = rng.random_range(oldest..(newest - HOUR_MS).max(oldest + 1));
        let params = [
            ("type", "process".to_owned()),
            ("since", since.to_string()),
            ("until", (since + HOUR_MS).to_string()),
            ("limit", "100".to_owned()),
        ];
        let t = Instant::now();
        let page = runtime.block_on(api.get_json("/v1/events", &params))?;
        page_times.push(t.elapsed());
        page_events += page["events"].as_array().map_or(0, Vec::len);
    }
    let page_median = median(&page_times);
    let page_p95 = percentile(&page_times, 0.95);
    let per_page = page_events as f64 / PAGE_REQUESTS as f64;
    println!(
        "time-range pages: {PAGE_REQUESTS} requests, median {}, p95 {}, max {}, {per_page:.1} events per page on average",
        ms(page_median),
        ms(page_p95),
        ms(*page_times.iter().max().expect("requests ran")),
    );
    rows.push(Row {
        what: format!("process page, random 1 h window, limit 100 ({PAGE_REQUESTS} req): median"),
        measured: ms(page_median),
        target: format!("< {}", ms(PAGE_MEDIAN_TARGET)),
        pass: Some(page_median < PAGE_MEDIAN_TARGET),
    });
    rows.push(Row {
        what: "  same, p95".into(),
        measured: format!("{} ({per_page:.1} events/page avg)", ms(page_p95)),
        target: "-".into(),
        pass: None,
    });

    let scan_params = [
        ("type", "file".to_owned()),
        ("where", format!("path co {ABSENT_NEEDLE}")),
        ("limit", "100".to_owned()),
    ];
    let mut scan_times = Vec::with_capacity(SCAN_RUNS);
    let mut scan_found = 0;
    for _ in 0..SCAN_RUNS {
        let t = Instant::now();
        let page = runtime.block_on(api.get_json("/v1/events", &scan_params))?;
        scan_times.push(t.elapsed());
        scan_found = page["events"].as_array().map_or(0, Vec::len);
    }
    let scan_median = median(&scan_times);
    let file_cols = snapq_core::schema::event_table("file")
        .expect("file is an event table")
        .column_list();
    let scan_sql = format!(
        "SELECT {file_cols} FROM file WHERE instr(path, '{ABSENT_NEEDLE}') > 0 ORDER BY ts DESC, id DESC LIMIT 101;"
    );
    println!(
        "full-scan filter `path co {ABSENT_NEEDLE}` through the API: median {} of {SCAN_RUNS} {} ({scan_found} events)",
        ms(scan_median),
        list_ms(&scan_times)
    );
    rows.push(Row {
        what: format!("full-scan `file` filter via API (median of {SCAN_RUNS})"),
        measured: ms(scan_median),
        target: "-".into(),
        pass: None,
    });
    if have_sqlite3 {
        let cli_times = sqlite3_timed(&db_path, &scan_sql, SCAN_RUNS)?;
        let cli_median = median(&cli_times);
        let ratio = scan_median.as_secs_f64() / cli_median.as_secs_f64();
        println!(
            "same SQL in the sqlite3 CLI: median {} {}; ratio API / CLI {ratio:.2}x\n  SQL: {scan_sql}",
            ms(cli_median),
            list_ms(&cli_times)
        );
        rows.push(Row {
            what: format!("  same SQL in sqlite3 CLI, .timer (median of {SCAN_RUNS})"),
            measured: ms(cli_median),
            target: "-".into(),
            pass: None,
        });
        rows.push(Row {
            what: "  full scan API / sqlite3 CLI".into(),
            measured: format!("{ratio:.2}x"),
            target: format!("<= {SCAN_TARGET_RATIO:.1}x"),
            pass: Some(ratio <= SCAN_TARGET_RATIO),
        });
    }
    phase.store(Phase::Idle as u8, Ordering::SeqCst);

    // 3. Consistency of one staged copy, downloaded through the API.
    let staged = first_staged.expect("staging ran at least once");
    let download = dir.join("downloaded.db");
    let bytes = runtime.block_on(api.download(&staged.id, &download))?;
    let sha = snapq_core::verify::sha256_file(&download)?;
    let verified = snapq_core::verify::verify_snapshot(&download)
        .map_err(|e| anyhow::anyhow!("the staged copy does not verify: {e}"))?;
    let sha_ok = Some(&sha) == staged.sha256.as_ref();
    let consistent = Some(verified.events) == staged.events && sha_ok && bytes == staged.size;
    println!(
        "consistency: downloaded {bytes} bytes, sha256 {}, verify_snapshot events {} vs agent-reported {}",
        if sha_ok { "matches" } else { "DIFFERS" },
        verified.events,
        staged.events.unwrap_or_default()
    );
    rows.push(Row {
        what: "staged copy downloaded: quick_check ok, events == reported".into(),
        measured: format!(
            "{} == {}, sha256 {}",
            verified.events,
            staged.events.unwrap_or_default(),
            if sha_ok { "ok" } else { "mismatch" }
        ),
        target: "equal".into(),
        pass: Some(consistent),
    });
    runtime.block_on(api.delete_staged(&staged.id))?;
    let _ = std::fs::remove_file(&download);

    // 2a (continued). sqlite3 .backup of the same live file. The probe pauses so the writer is the
    // simulator alone (a backup restarts whenever another connection commits). Last, because a
    // finished sqlite3 process may disturb the agent; the staging after it checks for that.
    let mut backup_times = Vec::new();
    let mut backup_note = None;
    let mut wal_replaced = false;
    if have_sqlite3 {
        for run in 0..STAGING_RUNS {
            let copy = dir.join(format!("backup-{run}.db"));
            let wal_before = wal_inode(&db_path);
            phase.store(Phase::Backup as u8, Ordering::SeqCst);
            let result = sqlite3_backup(&db_path, &copy, backup_timeout);
            phase.store(Phase::Idle as u8, Ordering::SeqCst);
            let _ = std::fs::remove_file(&copy);
            let wal_after = wal_inode(&db_path);
            if wal_before != wal_after {
                wal_replaced = true;
                println!(
                    "  the live monitor.db-wal changed identity across the backup (inode {wal_before:?} -> {wal_after:?}): sqlite3 deleted it on close"
                );
            }
            match result? {
                Some(took) => {
                    println!(
                        "sqlite3 .backup run {}: {:.3} s",
                        run + 1,
                        took.as_secs_f64()
                    );
                    backup_times.push(took);
                }
                None => {
                    let note = format!(
                        "did not finish within {} s (stopped)",
                        backup_timeout.as_secs()
                    );
                    println!("sqlite3 .backup run {}: {note}", run + 1);
                    backup_note = Some(note);
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    if !have_sqlite3 {
        rows.push(Row {
            what: "sqlite3 .backup of the live file".into(),
            measured: format!("skipped: {SQLITE3} missing (apt-get install -y sqlite3)"),
            target: "-".into(),
            pass: None,
        });
    } else if let Some(note) = &backup_note {
        rows.push(Row {
            what: "sqlite3 .backup of the live file".into(),
            measured: format!("{note}; finished runs: {}", list_secs(&backup_times)),
            target: "-".into(),
            pass: None,
        });
        let bound = backup_times
            .iter()
            .copied()
            .min()
            .unwrap_or(backup_timeout)
            .min(backup_timeout);
        rows.push(Row {
            what: "staging / .backup".into(),
            measured: format!(
                "<= {:.3}x (backup >= {:.1} s)",
                stage_median.as_secs_f64() / bound.as_secs_f64(),
                bound.as_secs_f64()
            ),
            target: format!("<= {STAGING_TARGET_RATIO:.1}x"),
            pass: Some(stage_median <= bound),
        });
    } else {
        let backup_median = median(&backup_times);
        let ratio = stage_median.as_secs_f64() / backup_median.as_secs_f64();
        rows.push(Row {
            what: format!("sqlite3 .backup of the live file (median of {STAGING_RUNS})"),
            measured: format!(
                "{:.3} s {}",
                backup_median.as_secs_f64(),
                list_secs(&backup_times)
            ),
            target: "-".into(),
            pass: None,
        });
        rows.push(Row {
            what: "staging / .backup".into(),
            measured: format!("{ratio:.2}x"),
            target: format!("<= {STAGING_TARGET_RATIO:.1}x"),
            pass: Some(ratio <= STAGING_TARGET_RATIO),
        });
    }
    if have_sqlite3 {
        // The agent must keep working after another process read its database and went away.
        // A killed .backup never closes cleanly, so close one sqlite3 connection cleanly here.
        let wal_before = wal_inode(&db_path);
        let status = Command::new(SQLITE3)
            .arg(&db_path)
            .arg("SELECT count(*) FROM meta;")
            .stdout(Stdio::null())
            .status()
            .context("running sqlite3")?;
        if !status.success() {
            bail!("sqlite3 SELECT on the live database failed: {status}");
        }
        if wal_inode(&db_path) != wal_before {
            wal_replaced = true;
            println!("  sqlite3 (a plain SELECT) deleted the live monitor.db-wal on close");
        }
        phase.store(Phase::Staging as u8, Ordering::SeqCst);
        let after = runtime.block_on(api.stage());
        phase.store(Phase::Idle as u8, Ordering::SeqCst);
        let (measured, ok) = match after {
            Ok(staged) => {
                runtime.block_on(api.delete_staged(&staged.id))?;
                ("staged ok".to_owned(), true)
            }
            Err(e) => {
                let text = format!("{e:#}");
                println!("  full error: {text}");
                // The table keeps the gist: status and SQLite's message.
                let gist = text
                    .find("\"error\":")
                    .map_or(text.as_str(), |i| &text[i + 9..])
                    .trim_end_matches(['}', '"'])
                    .trim_start_matches('"')
                    .to_owned();
                (format!("500: {gist}"), false)
            }
        };
        println!("staging after the sqlite3 runs: {measured}");
        rows.push(Row {
            what: "staging again after a sqlite3 process closed the live db".into(),
            measured: if wal_replaced {
                format!("{measured} (sqlite3 deleted the live WAL on close)")
            } else {
                measured
            },
            target: "works".into(),
            pass: Some(ok),
        });
    }

    // 2c. Writer stalls, by what the probe overlapped.
    let samples = probe.stop();
    let worst = |p: Phase| {
        let v: Vec<Duration> = samples
            .iter()
            .filter(|(ph, _)| *ph == p)
            .map(|(_, d)| *d)
            .collect();
        (v.iter().max().copied(), percentile_opt(&v, 0.99), v.len())
    };
    for p in [Phase::Idle, Phase::Staging, Phase::Queries] {
        let (max, p99, n) = worst(p);
        if let (Some(max), Some(p99)) = (max, p99) {
            println!(
                "probe inserts during {p:?}: {n}, worst {}, p99 {}",
                ms(max),
                ms(p99)
            );
        }
    }
    let (stall, stall_p99, stall_n) = worst(Phase::Staging);
    let stall = stall.context("the probe measured nothing during staging")?;
    rows.push(Row {
        what: format!("worst probe insert while staging ({stall_n} inserts)"),
        measured: format!(
            "{} (p99 {})",
            ms(stall),
            ms(stall_p99.expect("samples exist"))
        ),
        target: format!("< {}", ms(STALL_TARGET)),
        pass: Some(stall < STALL_TARGET),
    });
    for (p, label) in [
        (Phase::Idle, "no staging"),
        (Phase::Queries, "during queries"),
    ] {
        if let (Some(max), _, n) = worst(p) {
            rows.push(Row {
                what: format!("  worst probe insert, {label} ({n} inserts)"),
                measured: ms(max),
                target: "-".into(),
                pass: None,
            });
        }
    }
    let _ = stop_tx.send(());
    simulator.stop();
    drop(runtime);
    drop(db);

    print_table(&rows);
    Ok(())
}

/// The endpoint API over HTTP, as the server calls it.
struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    async fn get_json(
        &self,
        path: &str,
        params: &[(&str, String)],
    ) -> anyhow::Result<serde_json::Value> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .query(params)
            .bearer_auth(TOKEN)
            .send()
            .await?;
        let status = response.status();
        let body: serde_json::Value = response.json().await?;
        if !status.is_success() {
            bail!("GET {path} answered {status}: {body}");
        }
        Ok(body)
    }

    async fn stage(&self) -> anyhow::Result<Staged> {
        let response = self
            .http
            .post(format!("{}/v1/snapshots", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await?;
        let status = response.status();
        if !status.is_success() {
            bail!(
                "POST /v1/snapshots answered {status}: {}",
                response.text().await?
            );
        }
        // Staging answers once the copy is pinned; it is done when the copy is written, hashed
        // and checked.
        let mut staged: Staged = response.json().await?;
        while staged.state == StagedState::Copying {
            let response = self
                .http
                .get(format!(
                    "{}/v1/snapshots/{}/info?wait_ms=30000",
                    self.base, staged.id
                ))
                .bearer_auth(TOKEN)
                .send()
                .await?;
            staged = response.error_for_status()?.json().await?;
        }
        if staged.state == StagedState::Failed {
            bail!("staging failed: {:?}", staged.error);
        }
        Ok(staged)
    }

    async fn delete_staged(&self, id: &str) -> anyhow::Result<()> {
        let response = self
            .http
            .delete(format!("{}/v1/snapshots/{id}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("DELETE /v1/snapshots/{id} answered {}", response.status());
        }
        Ok(())
    }

    async fn download(&self, id: &str, dest: &Path) -> anyhow::Result<u64> {
        use tokio::io::AsyncWriteExt;
        let mut response = self
            .http
            .get(format!("{}/v1/snapshots/{id}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("GET /v1/snapshots/{id} answered {}", response.status());
        }
        let mut file = tokio::fs::File::create(dest).await?;
        let mut bytes = 0u64;
        while let Some(chunk) = response.chunk().await? {
            bytes += chunk.len() as u64;
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        Ok(bytes)
    }
}

/// A thread that inserts one small event every [`PROBE_INTERVAL`] through the recorder's own
/// writer and records how long each insert took, tagged with the phase it overlapped.
struct Probe {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(Phase, Duration)>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Probe {
    fn start(db: Arc<RecorderDb>, phase: Arc<AtomicU8>) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, samples) = (stop.clone(), samples.clone());
            std::thread::Builder::new()
                .name("bench-probe".into())
                .spawn(move || {
                    let mut next = Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        if Phase::from_u8(phase.load(Ordering::SeqCst)) == Phase::Backup {
                            std::thread::sleep(PROBE_INTERVAL);
                            next = Instant::now();
                            continue;
                        }
                        let ts = chrono::Utc::now().timestamp_millis();
                        let event = Event::new("dns", ts)
                            .set("query", "probe.bench.invalid")
                            .set("qtype", "A");
                        // A phase that changes during the insert counts as the busier one.
                        let before = Phase::from_u8(phase.load(Ordering::SeqCst));
                        let t = Instant::now();
                        if let Err(e) = db.insert_batch(&[event]) {
                            eprintln!("probe insert failed: {e}");
                        }
                        let took = t.elapsed();
                        let after = Phase::from_u8(phase.load(Ordering::SeqCst));
                        let tag = if before == Phase::Idle { after } else { before };
                        samples.lock().expect("probe samples").push((tag, took));
                        next += PROBE_INTERVAL;
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        } else {
                            next = now;
                        }
                    }
                })
                .expect("spawning the probe thread")
        };
        Probe {
            stop,
            samples,
            thread,
        }
    }

    fn stop(self) -> Vec<(Phase, Duration)> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        std::mem::take(&mut *self.samples.lock().expect("probe samples"))
    }
}

/// The inode of `DB-wal`, to notice another process deleting it.
fn wal_inode(db: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    std::fs::metadata(wal).ok().map(|m| m.ino())
}

/// `sqlite3 DB ".backup COPY"`; `None` if it had not finished within `timeout` (it is killed).
fn sqlite3_backup(db: &Path, copy: &Path, timeout: Duration) -> anyhow::Result<Option<Duration>> {
    let t = Instant::now();
    let mut child = Command::new(SQLITE3)
        .arg(db)
        .arg(format!(".backup '{}'", copy.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting sqlite3")?;
    loop {
        if let Some(status) = child.try_wait()? {
            let took = t.elapsed();
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                bail!("sqlite3 .backup failed ({status}): {err}");
            }
            return Ok(Some(took));
        }
        if t.elapsed() > timeout {
            child.kill()?;
            child.wait()?;
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `sql` `runs` times in one `sqlite3` process with `.timer on`; the real times it reports.
fn sqlite3_timed(db: &Path, sql: &str, runs: usize) -> anyhow::Result<Vec<Duration>> {
    use std::io::Write;
    let mut script = String::from(".timer on\n.output /dev/null\n");
    for _ in 0..runs {
        script.push_str(sql);
        script.push('\n');
    }
    let mut child = Command::new(SQLITE3)
        .arg("-readonly")
        .arg(db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting sqlite3")?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let times: Vec<Duration> = text
        .lines()
        .filter_map(|l| l.strip_prefix("Run Time: real "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .map(Duration::from_secs_f64)
        .collect();
    if times.len() != runs {
        bail!(
            "sqlite3 reported {} timings for {runs} runs: {text} {}",
            times.len(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(times)
}

fn median(v: &[Duration]) -> Duration {
    percentile(v, 0.5)
}

/// Nearest-rank percentile.
fn percentile(v: &[Duration], p: f64) -> Duration {
    percentile_opt(v, p).expect("at least one measurement")
}

fn percentile_opt(v: &[Duration], p: f64) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort();
    let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
    Some(s[rank - 1])
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn list_secs(v: &[Duration]) -> String {
    let parts: Vec<String> = v
        .iter()
        .map(|d| format!("{:.3}", d.as_secs_f64()))
        .collect();
    format!("[{}]", parts.join(", "))
}

fn list_ms(v: &[Duration]) -> String {
    let parts: Vec<String> = v
        .iter()
        .map(|d| format!("{:.1}", d.as_secs_f64() * 1000.0))
        .collect();
    format!("[{} ms]", parts.join(", "))
}

fn print_table(rows: &[Row]) {
    let w0 = rows.iter().map(|r| r.what.len()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.measured.len()).max().unwrap_or(0);
    let w2 = rows.iter().map(|r| r.target.len()).max().unwrap_or(0);
    println!();
    println!(
        "{:<w0$}  {:<w1$}  {:<w2$}  result",
        "measurement", "measured", "target"
    );
    println!("{}", "-".repeat(w0 + w1 + w2 + 12));
    for r in rows {
        let result = match r.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "",
        };
        println!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {result}",
            r.what, r.measured, r.target
        );
    }
    let failed = rows.iter().filter(|r| r.pass == Some(false)).count();
    println!(
        "\n{} targets checked, {failed} failed",
        rows.iter().filter(|r| r.pass.is_some()).count()
    );
}
