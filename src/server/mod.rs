//! `snapq serve`: the catalog, the durable queue and its workers, the snapshot store and the HTTP
//! API, started together and stopped together.
//!
//! [`Server::build`] opens the data directory (refusing a damaged catalog or queue), binds the
//! listener and starts the workers; [`Server::run`] serves until the shutdown signal, then lets
//! running jobs finish or leaves them to resume at the next start.

pub mod access;
pub mod admin;
pub mod api;
pub mod demo;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use snapq_core::catalog::Catalog;
use snapq_core::catalog::Origin;
use snapq_core::store::Store;
use snapq_jobs::handlers::ingest::IngestArgs;
use snapq_jobs::handlers::{self, CaptureSettings, Reservations, Services};
use snapq_jobs::{EnqueueOptions, JobKind, Queue, QueueConfig, RetryPolicy};
use tokio::net::TcpListener;

use crate::agent::enroll::EnrollToken;
use crate::tls::CertPair;

/// A validated server configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Disk space captures always leave free on the snapshot store.
    pub capture_reserve_bytes: u64,
    pub capture_concurrency: usize,
    /// Most bytes per second one capture downloads.
    pub capture_max_bytes_per_sec: Option<u64>,
    pub retry: RetryPolicy,
    /// Finished jobs older than this are pruned.
    pub job_retention: Duration,
    /// An endpoint is online when its last heartbeat is younger than this.
    pub online_window: Duration,
    /// In-process simulated endpoints to start (group `demo`).
    pub demo_endpoints: u32,
    pub ingest_concurrency: usize,
    /// Uploads larger than this are refused while they stream.
    pub upload_max_bytes: u64,
    /// The drop folder [default: DATA_DIR/watch].
    pub watch_dir: PathBuf,
    /// A file written in place counts as complete once unchanged this long.
    pub watch_quiet: Duration,
    /// How often the drop folder is rescanned for events that were missed.
    pub watch_rescan: Duration,
}

impl ServeConfig {
    /// Defaults for a data directory (what `snapq serve` uses when nothing else is set).
    pub fn with_data_dir(data_dir: PathBuf) -> ServeConfig {
        ServeConfig {
            listen: "0.0.0.0:17443".parse().expect("valid address"),
            capture_reserve_bytes: 2 << 30,
            capture_concurrency: 8,
            capture_max_bytes_per_sec: None,
            retry: RetryPolicy::default(),
            job_retention: Duration::from_secs(30 * 24 * 3600),
            online_window: Duration::from_secs(45),
            demo_endpoints: 0,
            ingest_concurrency: 2,
            upload_max_bytes: 16 << 30,
            watch_dir: data_dir.join("watch"),
            watch_quiet: Duration::from_secs(2),
            watch_rescan: Duration::from_secs(30),
            data_dir,
        }
    }
}

/// Shared by every request handler.
pub struct ServerState {
    pub config: ServeConfig,
    pub catalog: Catalog,
    pub queue: Queue,
    pub services: Arc<Services>,
    pub enroll_token: EnrollToken,
}

pub struct Server {
    listener: TcpListener,
    tls: rustls::ServerConfig,
    state: Arc<ServerState>,
}

impl Server {
    #[tracing::instrument(skip_all, fields(data_dir = %config.data_dir.display()))]
    pub async fn build(config: ServeConfig) -> anyhow::Result<Server> {
        let dir = &config.data_dir;
        crate::agent::ensure_writable_dir(dir)?;
        let catalog = Catalog::open(&dir.join("catalog.db")).await?;
        let store = Store::open(&dir.join("snapshots"))
            .with_context(|| format!("creating the snapshot store in {}", dir.display()))?;
        for sub in ["incoming", "quarantine", "exports"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        clean_spool(&dir.join("incoming"));
        let admin_token = crate::token::load_or_create_with(
            &dir.join("admin.token"),
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
        let certs = CertPair::ensure(&dir.join("certs"), &certificate_names())?;
        let tls = certs.server_config()?;
        let enroll_token = enroll_token(dir, &certs)?;

        let queue = Queue::open(
            &dir.join("queue.db"),
            QueueConfig {
                retry: config.retry,
                retention: Some(config.job_retention),
                ..QueueConfig::default()
            },
        )
        .await?;
        let services = Arc::new(Services {
            catalog: catalog.clone(),
            queue: queue.clone(),
            store,
            quarantine: dir.join("quarantine"),
            http: snapq_core::agent_client::http_client(),
            reservations: Reservations::default(),
            capture: CaptureSettings {
                reserve_bytes: config.capture_reserve_bytes,
                max_bytes_per_sec: config.capture_max_bytes_per_sec,
            },
        });
        spawn_workers(&queue, &services, &config).await?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        Ok(Server {
            listener,
            tls,
            state: Arc::new(ServerState {
                config,
                catalog,
                queue,
                services,
                enroll_token,
            }),
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
        let state = self.state.clone();
        let demo = demo::start(&state, addr, state.config.demo_endpoints).await?;
        let watcher = start_watcher(&state).await?;
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
        if let Err(e) = watcher.stop().await {
            tracing::warn!(error = %e, "the folder watcher did not stop cleanly");
        }
        let report = state.queue.shutdown(Duration::from_secs(10)).await;
        tracing::info!(?report, "workers stopped");
        served.context("serving the API")
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
                path: candidate.path.clone(),
                original_name: original_name.clone(),
                origin: Origin::Watch,
            };
            let options = EnqueueOptions {
                idempotency_key: Some(format!("watch:{}", candidate.identity_key())),
                ..EnqueueOptions::default()
            };
            let enqueued = queue
                .enqueue_with(JobKind::Ingest, &args, "watch", &options)
                .await
                .map_err(|e| e.to_string())?;
            catalog
                .create_ingest(enqueued.id.as_str(), Origin::Watch, &original_name, "watch")
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await
    .with_context(|| format!("watching {}", state.config.watch_dir.display()))
}

/// Removes uploads that were cut off mid-stream (`*.partial`) by an earlier run.
fn clean_spool(incoming: &Path) {
    for entry in std::fs::read_dir(incoming).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "partial") {
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
fn enroll_token(dir: &Path, certs: &CertPair) -> anyhow::Result<EnrollToken> {
    let path = dir.join("enroll.token");
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

/// The default server data directory: `$XDG_DATA_HOME/snapq`.
pub fn default_data_dir() -> PathBuf {
    crate::cli::default_data_dir("snapq")
}

/// The admin token file of a data directory, which the local CLI reads when given no token.
pub fn admin_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.token")
}
