//! `snapq serve`: the catalog, the durable queue and its workers, the snapshot store and the HTTP
//! API, started together and stopped together.
//!
//! [`Server::build`] opens the data directory (refusing a damaged catalog or queue), binds the
//! listener and starts the workers; [`Server::run`] serves until the shutdown signal, then lets
//! running jobs finish or leaves them to resume at the next start.

pub mod access;
pub mod admin;
pub mod agents;
pub mod api;
pub mod connections;
pub mod console;
pub mod demo;
pub mod events;
pub mod export;
pub mod fleet;
pub mod metrics;
pub mod openapi;
pub mod quarantine;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use snapq_core::catalog::Catalog;
use snapq_core::catalog::Origin;
use snapq_core::store::Store;
use snapq_jobs::handlers::ingest::{FileVersion, IngestArgs};
use snapq_jobs::handlers::{self, CaptureSettings, Reservations, Services};
use snapq_jobs::{EnqueueOptions, JobKind, Queue, QueueConfig, RetryPolicy};
use tokio::net::TcpListener;

use crate::agent::enroll::EnrollToken;
use crate::layout::ServerDir;
use crate::tls::CertPair;

/// A validated server configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    /// Where the catalog lives when not in the data directory (`--database`).
    pub database: Option<DatabaseUrl>,
    /// The snapshot store (`--store`; shared by every node of a PostgreSQL deployment).
    pub store_dir: PathBuf,
    pub listen: SocketAddr,
    /// Where to serve `/metrics` over plain HTTP without a token (`None`: only on the API, to
    /// admins).
    pub metrics_listen: Option<SocketAddr>,
    /// Disk space captures always leave free on the snapshot store.
    pub capture_reserve_bytes: u64,
    pub capture_concurrency: usize,
    /// Most bytes per second one capture downloads.
    pub capture_max_bytes_per_sec: Option<u64>,
    pub retry: RetryPolicy,
    /// Finished jobs older than this are pruned.
    pub job_retention: Duration,
    /// A node whose workers stay silent this long is dead: its running jobs are taken back (by
    /// any node, on PostgreSQL).
    pub job_orphan_after: Duration,
    /// PostgreSQL only: the queue commits without waiting for the WAL flush
    /// (`QueueConfig::pg_async_commit`).
    pub queue_async_commit: bool,
    /// An endpoint is online when its last heartbeat is younger than this.
    pub online_window: Duration,
    /// In-process simulated endpoints to start (group `demo`).
    pub demo_endpoints: u32,
    /// Ingests running at once. Each mostly waits on fsync (file, directory) and catalog
    /// commits, so the drop folder's rate grows with it well past the number of cores (1,000
    /// small files on a quiet 2-core machine: 212 files/s at 2, 243 at 8, 309 at 16).
    pub ingest_concurrency: usize,
    /// Uploads larger than this are refused while they stream.
    pub upload_max_bytes: u64,
    /// The drop folder [default: DATA_DIR/watch].
    pub watch_dir: PathBuf,
    /// A file written in place counts as complete once unchanged this long.
    pub watch_quiet: Duration,
    /// How often the drop folder is rescanned for events that were missed.
    pub watch_rescan: Duration,
    /// A dropped file that failed validation is quarantined only after it stayed unchanged this long.
    pub watch_settle: Duration,
    /// Quarantined files older than this are deleted.
    pub quarantine_retention: Duration,
    /// Exports (file and row) are deleted this long after they finished.
    pub export_retention: Duration,
    /// Exports running at once.
    pub export_concurrency: usize,
    /// Most rows per second one export writes (`None`: as fast as the disk goes).
    pub export_max_rows_per_sec: Option<u64>,
    /// The time budget of one query on a stored snapshot.
    pub query_budget: Duration,
    /// An active connection unused this long times out.
    pub connection_idle: Duration,
}

impl ServeConfig {
    /// Whether the snapshots are on a store of their own (`--store`), which several nodes may
    /// share, rather than under the data directory.
    pub fn store_of_its_own(&self) -> bool {
        self.store_dir != ServerDir::new(&self.data_dir).snapshots()
    }

    /// Where uploads are spooled until their ingest job stores them: in the data directory, or
    /// beside the snapshots on a store of its own (`--store`), where every node can read what
    /// another received (its ingest job may run on any node) and the ingest is a rename.
    pub fn spool_dir(&self) -> PathBuf {
        if self.store_of_its_own() {
            self.store_dir.join(".incoming")
        } else {
            ServerDir::new(&self.data_dir).incoming()
        }
    }

    /// Where exports are written: beside the snapshots on a store of their own (`--store`, so
    /// any node serves what another wrote), else under the data directory.
    pub fn exports_dir(&self) -> crate::layout::ExportDir {
        crate::layout::ExportDir::new(if self.store_of_its_own() {
            self.store_dir.join(".exports")
        } else {
            ServerDir::new(&self.data_dir).exports()
        })
    }

    /// Defaults for a data directory (what `snapq serve` uses when nothing else is set).
    pub fn with_data_dir(data_dir: PathBuf) -> ServeConfig {
        ServeConfig {
            listen: "0.0.0.0:17443".parse().expect("valid address"),
            metrics_listen: None,
            capture_reserve_bytes: 2 << 30,
            capture_concurrency: 8,
            capture_max_bytes_per_sec: None,
            retry: RetryPolicy::default(),
            job_retention: Duration::from_secs(30 * 24 * 3600),
            job_orphan_after: QueueConfig::default().orphan_after,
            queue_async_commit: false,
            online_window: Duration::from_secs(45),
            demo_endpoints: 0,
            ingest_concurrency: 16,
            upload_max_bytes: 16 << 30,
            watch_dir: ServerDir::new(&data_dir).watch(),
            watch_quiet: Duration::from_secs(2),
            watch_rescan: Duration::from_secs(30),
            watch_settle: Duration::from_secs(60),
            quarantine_retention: Duration::from_secs(30 * 24 * 3600),
            export_retention: Duration::from_secs(7 * 24 * 3600),
            export_concurrency: 2,
            export_max_rows_per_sec: None,
            query_budget: events::DEFAULT_QUERY_BUDGET,
            connection_idle: Duration::from_secs(10 * 60),
            database: None,
            store_dir: ServerDir::new(&data_dir).snapshots(),
            data_dir,
        }
    }
}

/// A PostgreSQL URL given to `--database`: checked when the settings are read, so a typo is a
/// usage error before anything starts. Its `Display` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn parse(url: &str) -> Result<DatabaseUrl, String> {
        let scheme_ok = url.starts_with("postgres://") || url.starts_with("postgresql://");
        if !scheme_ok {
            return Err(format!(
                "--database {}: only PostgreSQL is supported (postgres://USER@HOST:PORT/DB); \
                 leave it unset to keep the catalog in the data directory (SQLite)",
                Self::redact(url)
            ));
        }
        url.parse::<sqlx::postgres::PgConnectOptions>()
            .map_err(|e| format!("--database {}: {e}", Self::redact(url)))?;
        Ok(DatabaseUrl(url.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `url` without the password between `:` and `@` of its authority.
    fn redact(url: &str) -> String {
        let Some((scheme, rest)) = url.split_once("://") else {
            return url.to_owned();
        };
        let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        match authority.rsplit_once('@') {
            Some((user, host)) if user.contains(':') => {
                let name = user.split(':').next().unwrap_or_default();
                format!("{scheme}://{name}:***@{host}{tail}")
            }
            _ => url.to_owned(),
        }
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&Self::redact(&self.0))
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

/// Shared by every request handler.
pub struct ServerState {
    pub config: ServeConfig,
    /// This server process, as `/status` names it: `HOST:PID`.
    pub node: String,
    pub catalog: Catalog,
    pub queue: Queue,
    pub services: Arc<Services>,
    /// What new agents enroll with; an admin can rotate it (`snapq enroll-token rotate`).
    pub enroll_token: std::sync::RwLock<EnrollToken>,
    /// What the drop-folder watcher is waiting for (set once it runs).
    pub watcher: std::sync::OnceLock<snapq_watch::StatusHandle>,
    /// Open stored snapshots, reused across pages (`events.rs`).
    pub snapshot_handles: events::SnapshotHandles,
    /// The web console's failed sign-ins (`console/session.rs`).
    pub console: console::ConsoleState,
}

impl ServerState {
    pub fn layout(&self) -> ServerDir {
        ServerDir::new(&self.config.data_dir)
    }

    /// The current enroll token.
    pub fn enroll_token(&self) -> EnrollToken {
        self.enroll_token.read().expect("enroll token lock").clone()
    }
}

pub struct Server {
    _lock: DataDirLock,
    listener: TcpListener,
    /// `--metrics-listen`: plain HTTP, `/metrics` only.
    metrics_listener: Option<TcpListener>,
    tls: rustls::ServerConfig,
    state: Arc<ServerState>,
}

impl Server {
    #[tracing::instrument(skip_all, fields(data_dir = %config.data_dir.display()))]
    pub async fn build(config: ServeConfig) -> anyhow::Result<Server> {
        let dir = &config.data_dir;
        let layout = ServerDir::new(dir);
        crate::agent::ensure_writable_dir(dir)?;
        // Before anything else: a second server on the same directory must not touch it.
        let lock = DataDirLock::acquire(dir)?;
        // Then the port: a server that cannot listen must not have claimed any job.
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("listening for metrics on {addr}"))?,
            ),
            None => None,
        };
        let catalog = match &config.database {
            None => Catalog::open(&layout.catalog()).await?,
            Some(url) => Catalog::connect_postgres(url.as_str())
                .await
                .with_context(|| format!("opening the catalog in PostgreSQL at {url}"))?,
        };
        let default_store = !config.store_of_its_own();
        if !default_store && !Store::is_marked(&config.store_dir) {
            let stored = catalog
                .metric_counts(0)
                .await?
                .snapshots
                .iter()
                .filter(|(state, _, _)| state == "complete")
                .map(|(_, n, _)| n)
                .sum::<i64>();
            if stored > 0 {
                anyhow::bail!(
                    "the snapshot store {} is not there (no {} file) although the catalog holds {stored} snapshots: is its file system mounted?",
                    config.store_dir.display(),
                    snapq_core::store::MARKER
                );
            }
        }
        let opened = if default_store {
            Store::open(&config.store_dir)
        } else {
            Store::open_shared(&config.store_dir)
        };
        let store = opened.with_context(|| {
            format!("opening the snapshot store {}", config.store_dir.display())
        })?;
        // Another node may be writing into a shared store, spool or export folder right now:
        // only what nothing wrote to for a while was cut off.
        let cut_off_after = if config.database.is_some() {
            Duration::from_secs(600)
        } else {
            Duration::ZERO
        };
        match store.remove_abandoned_copies(cut_off_after) {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "removed copies a crash cut off"),
            Err(e) => tracing::warn!(error = %e, "cannot look for abandoned copies in the store"),
        }
        let spool = config.spool_dir();
        let exports = config.exports_dir();
        for sub in [&spool, &layout.quarantine(), exports.path()] {
            std::fs::create_dir_all(sub)?;
        }
        clean_spool(&spool, cut_off_after);
        export::remove_abandoned_partials(&exports, cut_off_after);
        let admin_token = crate::token::load_or_create_with(
            &layout.admin_token(),
            crate::token::generate_api_token,
        )?;
        let replaced = catalog
            .ensure_bootstrap_token(
                &sha256_hex(&admin_token),
                &crate::token::api_token_prefix(&admin_token),
            )
            .await?;
        if replaced > 0 {
            tracing::warn!("admin.token was replaced: the previous admin token is revoked");
            catalog
                .audit(
                    "system",
                    "token.revoke",
                    "admin.token",
                    "ok",
                    Some("admin.token was replaced"),
                )
                .await?;
        }
        let certs = CertPair::ensure(&layout.certs(), &certificate_names())?;
        let tls = certs.server_config()?;
        let enroll_token = enroll_token(&layout, &certs)?;
        let agents_key = snapq_core::identity::AgentKey::load_or_create(&layout.agents_key())?;

        let queue_config = QueueConfig {
            retry: config.retry,
            retention: Some(config.job_retention),
            orphan_after: config.job_orphan_after,
            // At least three heartbeats within the orphan time-out.
            heartbeat_interval: (config.job_orphan_after / 3)
                .min(QueueConfig::default().heartbeat_interval),
            pg_async_commit: config.queue_async_commit,
            ..QueueConfig::default()
        };
        if config.queue_async_commit && config.database.is_none() {
            tracing::warn!("--queue-async-commit applies to a queue on PostgreSQL only; ignored");
        }
        let queue = match &config.database {
            None => Queue::open(&layout.queue(), queue_config).await?,
            Some(url) => Queue::open_postgres(url.as_str(), queue_config)
                .await
                .with_context(|| format!("opening the job queue in PostgreSQL at {url}"))?,
        };
        let services = Arc::new(Services {
            catalog: catalog.clone(),
            queue: queue.clone(),
            store,
            quarantine: layout.quarantine(),
            agents: snapq_core::agent_client::Agents::new(agents_key),
            reservations: Reservations::default(),
            capture: CaptureSettings {
                reserve_bytes: config.capture_reserve_bytes,
                max_bytes_per_sec: config.capture_max_bytes_per_sec,
            },
            ingest: handlers::ingest::IngestSettings {
                settle: config.watch_settle,
            },
            fleet: handlers::fleet::FleetSettings {
                online_window: config.online_window,
                ..handlers::fleet::FleetSettings::default()
            },
        });
        let terminal_catalog = catalog.clone();
        queue.on_terminal(move |job| record_terminal(terminal_catalog.clone(), job))?;
        queue_unlinked_captures(&queue, &catalog).await?;
        spawn_workers(&queue, &services, &config).await?;
        recover_spool(&queue, &catalog, &spool)
            .await
            .context("recovering spooled uploads")?;
        let state = Arc::new(ServerState {
            node: format!(
                "{}:{}",
                crate::agent::system::hostname(),
                std::process::id()
            ),
            catalog,
            queue,
            services,
            enroll_token: std::sync::RwLock::new(enroll_token),
            watcher: std::sync::OnceLock::new(),
            snapshot_handles: events::SnapshotHandles::new(config.query_budget),
            console: console::ConsoleState::default(),
            config,
        });
        fleet::recover_batches(&state)
            .await
            .context("giving unfinished fleet batches their jobs")?;
        Ok(Server {
            _lock: lock,
            listener,
            metrics_listener,
            tls,
            state,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn state(&self) -> &Arc<ServerState> {
        &self.state
    }

    /// Serves until `shutdown` resolves, then stops the workers: running jobs get a grace period
    /// to finish, the rest resume at the next start.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let addr = self.local_addr();
        let _lock = self._lock;
        let state = self.state.clone();
        let demo = demo::start(&state, addr, state.config.demo_endpoints).await?;
        let watcher = start_watcher(&state).await?;
        let _ = state.watcher.set(watcher.status_handle());
        let quarantine_pruner = tokio::spawn(quarantine::prune_periodically(state.clone()));
        let export_pruner = tokio::spawn(export::prune_periodically(state.clone()));
        let connections = tokio::spawn(connections::maintain(state.clone()));
        let scheduler = tokio::spawn(fleet::run_scheduler(state.clone()));
        let metrics_server = match self.metrics_listener {
            Some(listener) => {
                let metrics_addr = listener.local_addr()?;
                tracing::info!(%metrics_addr, "serving metrics over plain HTTP");
                println!("snapq metrics on http://{metrics_addr}/metrics");
                let router = metrics::listener_router(state.clone());
                Some(tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, router).await {
                        tracing::warn!(error = %e, "the metrics listener stopped");
                    }
                }))
            }
            None => None,
        };
        tracing::info!(%addr, data_dir = %state.config.data_dir.display(), "snapq server listening");
        println!("snapq server listening on {addr}");
        let served = crate::tls::serve(
            self.listener,
            self.tls,
            api::router(state.clone()),
            shutdown,
        )
        .await;
        drop(demo);
        quarantine_pruner.abort();
        export_pruner.abort();
        connections.abort();
        scheduler.abort();
        if let Some(m) = metrics_server {
            m.abort();
        }
        if let Err(e) = watcher.stop().await {
            tracing::warn!(error = %e, "the folder watcher did not stop cleanly");
        }
        let report = state.queue.shutdown(Duration::from_secs(10)).await;
        tracing::info!(?report, "workers stopped");
        served.context("serving the API")
    }
}

/// Keeps the server's memory flat as captures run side by side. Each capture holds 1 MiB
/// buffers (the download's writer, hashing) on whatever thread runs it; with glibc's defaults
/// every thread gets its own malloc arena (up to 8 per core) and, after the first large buffers
/// are freed, the mmap threshold rises so later ones come from those arenas and stay resident
/// after the capture. Measured with 16 concurrent captures of 100 endpoints (~5 MiB each): peak
/// RSS 100.8 MiB with the defaults, 41.9 MiB with two arenas and a fixed 128 KiB threshold (big
/// buffers are mapped and returned to the system when freed). Call before any thread starts.
pub fn bound_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
}

/// The catalog follows the queue's terminal outcome: whatever ended a job dead or cancelled
/// (its last attempt, a cancel while it waited, a handler that ignored its cancel, the orphan
/// rescue, a panic), its snapshot or ingest row ends `failed` with the job's reason here, not
/// in each handler. A row that already finished (complete, quarantined, ...) is left alone.
async fn record_terminal(catalog: Catalog, job: snapq_jobs::TerminalJob) -> Result<(), String> {
    let reason = job.error.clone().unwrap_or_else(|| job.state.to_string());
    match job.kind {
        JobKind::Capture => {
            let Some(id) = job.args["snapshot_id"].as_i64() else {
                return Ok(());
            };
            let failed = catalog
                .fail_unfinished_snapshot(id, &reason)
                .await
                .map_err(|e| e.to_string())?;
            if failed {
                let target = match catalog.snapshot(id).await {
                    Ok(Some(snap)) => snap.hostname,
                    _ => format!("snapshot {id}"),
                };
                catalog
                    .audit(
                        job.requested_by.as_deref().unwrap_or(""),
                        "capture",
                        &target,
                        outcome(&job),
                        Some(&format!("snapshot {id} (job {}): {reason}", job.id)),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        JobKind::Ingest => {
            let Ok(args) = serde_json::from_value::<IngestArgs>(job.args.clone()) else {
                return Ok(());
            };
            // The job may have died before its handler first ran.
            catalog
                .create_ingest(
                    job.id.as_str(),
                    args.origin,
                    &args.original_name,
                    job.requested_by.as_deref().unwrap_or(""),
                )
                .await
                .map_err(|e| e.to_string())?;
            if catalog
                .fail_pending_ingest(job.id.as_str(), &reason)
                .await
                .map_err(|e| e.to_string())?
            {
                catalog
                    .audit(
                        job.requested_by.as_deref().unwrap_or(""),
                        "ingest",
                        &args.original_name,
                        outcome(&job),
                        Some(&format!("job {}: {reason}", job.id)),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        JobKind::Export => export::record_terminal(&catalog, &job).await?,
        JobKind::Fleet => {
            // The fleet job died or was cancelled: its batch ends with that reason.
            let Some(id) = job.args["batch_id"].as_i64() else {
                return Ok(());
            };
            let reason = format!("the batch's fleet job ended {}: {reason}", job.state);
            catalog
                .skip_queued_items(id, &reason)
                .await
                .map_err(|e| e.to_string())?;
            catalog
                .set_batch_state(
                    id,
                    &[
                        snapq_core::fleet::state::RUNNING,
                        snapq_core::fleet::state::PAUSED,
                    ],
                    snapq_core::fleet::state::CANCELLED,
                    Some(&reason),
                )
                .await
                .map_err(|e| e.to_string())?;
        }
        _ => {}
    }
    Ok(())
}

/// How a job that did not succeed ended, as the audit log says it.
fn outcome(job: &snapq_jobs::TerminalJob) -> &'static str {
    if job.state == snapq_jobs::JobState::Cancelled {
        "cancelled"
    } else {
        "failed"
    }
}

/// `snapq db migrate`: the catalog and the job queue of the server in `from` (which must not be
/// running: its data directory's lock is taken) copied into the empty PostgreSQL database at
/// `to`. The queue is copied after the catalog; jobs that were running come across pending.
pub async fn migrate_to_postgres(
    from: &Path,
    to: &DatabaseUrl,
) -> anyhow::Result<(snapq_core::catalog::Copied, snapq_jobs::CopyReport)> {
    let layout = ServerDir::new(from);
    if !layout.catalog().is_file() {
        anyhow::bail!(
            "{} holds no catalog.db: is it a server's data directory?",
            from.display()
        );
    }
    let _lock = DataDirLock::acquire(from)?;
    let source = Catalog::open(&layout.catalog()).await?;
    let target = Catalog::connect_postgres(to.as_str())
        .await
        .with_context(|| format!("opening the catalog in PostgreSQL at {to}"))?;
    let catalog = source.copy_into(&target).await?;
    let queue = snapq_jobs::copy_sqlite_to_postgres(&layout.queue(), to.as_str())
        .await
        .context("copying the job queue")?;
    Ok((catalog, queue))
}

/// An exclusive lock on the data directory (`DIR/serve.lock`, holding the owner's pid), held
/// for the server's life: two servers on one directory would run the same jobs twice.
struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    fn acquire(dir: &Path) -> anyhow::Result<DataDirLock> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        let path = dir.join("serve.lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                let pid = if pid.is_empty() { "unknown" } else { pid };
                anyhow::bail!(
                    "another snapq serve (pid {pid}) is using {}; stop it first or choose another --data-dir",
                    dir.display()
                );
            }
            return Err(err).with_context(|| format!("locking {}", path.display()));
        }
        file.set_len(0)?;
        file.seek(std::io::SeekFrom::Start(0))?;
        writeln!(file, "{}", std::process::id())?;
        file.sync_all()?;
        Ok(DataDirLock { _file: file })
    }
}

/// Watches the drop folder; every complete file becomes an ingest job (the watcher never writes
/// the catalog). The idempotency key makes a file that is seen again, also after a restart, the
/// same job.
async fn start_watcher(state: &Arc<ServerState>) -> anyhow::Result<snapq_watch::Watcher> {
    let mut config = snapq_watch::WatchConfig::new(&state.config.watch_dir);
    config.quiet_period = state.config.watch_quiet;
    config.rescan_interval = state.config.watch_rescan;
    let queue = state.queue.clone();
    let catalog = state.catalog.clone();
    snapq_watch::spawn(config, move |candidate: snapq_watch::Candidate| {
        let (queue, catalog) = (queue.clone(), catalog.clone());
        async move {
            let original_name = candidate
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let args = IngestArgs {
                version: Some(FileVersion {
                    len: candidate.len,
                    mtime_ms: candidate.mtime_ms,
                    inode: candidate.inode,
                }),
                ..IngestArgs::new(candidate.path.clone(), original_name.clone(), Origin::Watch)
            };
            let options = EnqueueOptions {
                idempotency_key: Some(format!("watch:{}", candidate.identity_key())),
                ..EnqueueOptions::default()
            };
            let enqueued = queue
                .enqueue_with(JobKind::Ingest, &args, "watch", &options)
                .await
                .map_err(|e| e.to_string())?;
            // This version of the file was submitted before. If that job died (say the disk
            // was full for every attempt), the file is still here and deserves another try.
            if !enqueued.created {
                let job = queue.show(&enqueued.id).await.map_err(|e| e.to_string())?;
                if job.job.state == snapq_jobs::JobState::Failed {
                    tracing::info!(job_id = %enqueued.id, path = %candidate.path.display(),
                        "a watched file's ingest had died; trying it again");
                    queue.retry(&enqueued.id).await.map_err(|e| e.to_string())?;
                }
            }
            catalog
                .create_ingest(enqueued.id.as_str(), Origin::Watch, &original_name, "watch")
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await
    .with_context(|| format!("watching {}", state.config.watch_dir.display()))
}

/// `incoming/<spool id>_<snapshot name>`: a spooled upload.
pub(crate) fn spool_name(spool_id: &str, name: &snapq_core::SnapshotName) -> String {
    format!("{spool_id}_{name}")
}

/// Enqueues the ingest of a spooled upload, keyed by its spool id, so the start-up sweep of
/// `incoming/` and the upload route can never make two jobs of one file.
pub(crate) async fn enqueue_spooled(
    queue: &Queue,
    args: &IngestArgs,
    spool_id: &str,
    requested_by: &str,
) -> Result<snapq_jobs::JobId, snapq_jobs::QueueError> {
    let options = EnqueueOptions {
        idempotency_key: Some(format!("upload:{spool_id}")),
        ..EnqueueOptions::default()
    };
    let enqueued = queue
        .enqueue_with(JobKind::Ingest, args, requested_by, &options)
        .await?;
    if !enqueued.created
        && queue.show(&enqueued.id).await?.job.state == snapq_jobs::JobState::Failed
    {
        // Its job died and left the file: try again.
        queue.retry(&enqueued.id).await?;
    }
    Ok(enqueued.id)
}

/// Start-up: a capture whose row was written but not linked to its job (the server stopped in
/// between, with or without the job queued) is queued under its key, which finds the job if it
/// was; the request that asked for it is carried out. One whose endpoint was forgotten since
/// fails with that reason.
async fn queue_unlinked_captures(queue: &Queue, catalog: &Catalog) -> anyhow::Result<()> {
    for (snapshot_id, hostname, requested_by) in catalog.unqueued_captures().await? {
        let Some(hostname) = hostname else {
            let reason = "the server stopped before the capture was queued, and its endpoint was forgotten since";
            catalog.fail_snapshot(snapshot_id, reason).await?;
            continue;
        };
        let key = handlers::capture::job_key(snapshot_id);
        let job =
            handlers::capture::enqueue(queue, catalog, snapshot_id, &hostname, &requested_by, key)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("queueing the capture of snapshot {snapshot_id}: {e}")
                })?;
        tracing::info!(snapshot_id, %hostname, job = %job, "queued a capture the server stopped before linking to its job");
    }
    Ok(())
}

/// Files spooled completely by an earlier run whose ingest may never have been queued (the
/// server died between the spool and the enqueue): each gets its ingest job (the same one if
/// it was queued, by its key), so nothing that arrived whole is forgotten in `incoming/`.
async fn recover_spool(queue: &Queue, catalog: &Catalog, incoming: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(incoming)?.flatten() {
        let path = entry.path();
        let Some(file) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some((spool_id, name)) = file.split_once('_') else {
            continue;
        };
        let Ok(name) = name.parse::<snapq_core::SnapshotName>() else {
            continue;
        };
        let args = IngestArgs::new(path.clone(), name.to_string(), Origin::Upload);
        let job = enqueue_spooled(queue, &args, spool_id, "upload").await?;
        catalog
            .create_ingest(job.as_str(), Origin::Upload, &args.original_name, "upload")
            .await?;
    }
    Ok(())
}

/// Removes uploads that were cut off mid-stream (`*.partial`) by an earlier run: those not
/// written to for `idle` (zero: all of them, on a spool no other node writes to).
fn clean_spool(incoming: &Path, idle: Duration) {
    for entry in std::fs::read_dir(incoming).into_iter().flatten().flatten() {
        let path = entry.path();
        let untouched = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() >= idle);
        if path.extension().is_some_and(|e| e == "partial") && untouched {
            tracing::info!(path = %path.display(), "removing an interrupted upload");
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Starts every job kind's workers, each with its own bounded concurrency.
async fn spawn_workers(
    queue: &Queue,
    services: &Arc<Services>,
    config: &ServeConfig,
) -> anyhow::Result<()> {
    let svc = services.clone();
    queue
        .spawn_workers(
            JobKind::Capture,
            config.capture_concurrency,
            move |args, ctx| handlers::capture::run(svc.clone(), args, ctx),
        )
        .await?;
    let svc = services.clone();
    queue
        .spawn_workers(
            JobKind::Ingest,
            config.ingest_concurrency,
            move |args, ctx| handlers::ingest::run(svc.clone(), args, ctx),
        )
        .await?;
    let svc = services.clone();
    queue
        .spawn_workers(JobKind::Delete, 4, move |args, ctx| {
            handlers::delete::run(svc.clone(), args, ctx)
        })
        .await?;
    let svc = services.clone();
    let settings = export::job::ExportSettings {
        dir: config.exports_dir(),
        max_rows_per_sec: config.export_max_rows_per_sec,
    };
    queue
        .spawn_workers(
            JobKind::Export,
            config.export_concurrency,
            move |args, ctx| export::job::run(svc.clone(), settings.clone(), args, ctx),
        )
        .await?;
    // A batch holds its worker slot while it runs (it mostly sleeps between looks).
    let svc = services.clone();
    queue
        .spawn_workers(JobKind::Fleet, 64, move |args, ctx| {
            handlers::fleet::run(svc.clone(), args, ctx)
        })
        .await?;
    Ok(())
}

/// Names the self-signed certificate is valid for: loopback and this machine's name and addresses.
fn certificate_names() -> Vec<String> {
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    names.push(crate::agent::system::hostname());
    names.extend(crate::agent::system::ip_addresses());
    names.dedup();
    names
}

/// `enroll.token`: a secret made on first start, with the pin of the current certificate, so a
/// replaced certificate gets a new pin and the same secret.
fn enroll_token(layout: &ServerDir, certs: &CertPair) -> anyhow::Result<EnrollToken> {
    let path = layout.enroll_token();
    let secret = match std::fs::read_to_string(&path) {
        Ok(text) => EnrollToken::parse(&text).secret,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => crate::token::generate(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let token = EnrollToken {
        secret,
        pin: Some(certs.pin()?),
    };
    crate::token::write_private(&path, &token.to_string())?;
    Ok(token)
}

pub fn sha256_hex(text: &str) -> String {
    let mut hasher = snapq_core::verify::Hasher::default();
    hasher.update(text.as_bytes());
    hasher.finish()
}
