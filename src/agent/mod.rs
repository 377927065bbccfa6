//! The endpoint side: the recorder and its database, the endpoint API the server calls, staged
//! snapshot copies, and the manual export for offline endpoints.

pub mod api;
pub mod copy;
pub mod enroll;
pub mod export;
pub mod flaky;
pub mod fleet;
pub mod metrics;
pub mod recorder;
pub mod staging;
pub mod system;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use recorder::{Limits, RecorderDb, RecorderKind};
use staging::Staging;

/// A validated agent configuration (built once from the command line).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub hostname: String,
    /// The bearer token; `None` reads or creates `DATA_DIR/agent.token`.
    pub token: Option<String>,
    pub recorder: RecorderKind,
    pub prefill_events: u64,
    pub limits: Limits,
    pub staging_ttl: Duration,
    /// Disk space staging always leaves free on the endpoint.
    pub staging_reserve_bytes: u64,
    /// The endpoint API's certificate pair; `None` uses (or generates) the pair in `DATA_DIR/certs`.
    pub tls: Option<crate::tls::CertPair>,
    /// The server to enroll with and heartbeat to, if any.
    pub server: Option<enroll::ServerLink>,
}

impl AgentConfig {
    /// Staging leaves this much free disk on the endpoint unless told otherwise.
    pub const DEFAULT_STAGING_RESERVE: u64 = 512 << 20;
}

/// A built agent: database open, recorder running, listener bound. Serve with [`Agent::run`].
pub struct Agent {
    listener: TcpListener,
    tls: rustls::ServerConfig,
    /// The sha256 of the endpoint API's certificate (what the server pins at enrollment).
    cert_sha256: String,
    server: Option<enroll::ServerLink>,
    state: Arc<api::AgentState>,
    _recorder: recorder::RecorderHandle,
    flaky: Option<flaky::Flaky>,
}

impl Agent {
    pub async fn build(config: AgentConfig) -> anyhow::Result<Agent> {
        snapq_core::name::validate_hostname(&config.hostname)
            .with_context(|| format!("--hostname {:?} cannot name snapshots", config.hostname))?;
        ensure_writable_dir(&config.data_dir)?;
        let layout = crate::layout::AgentDir::new(&config.data_dir);
        let db_path = layout.monitor_db();
        let (db, token) = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let db = RecorderDb::open(&db_path, &config.hostname, config.limits).with_context(
                    || format!("opening the recorder database {}", db_path.display()),
                )?;
                if config.prefill_events > 0 {
                    let started = std::time::Instant::now();
                    let n = recorder::prefill(&db, config.prefill_events)?;
                    tracing::info!(
                        events = n,
                        secs = started.elapsed().as_secs_f64(),
                        "prefilled"
                    );
                }
                let token = crate::token::load_or_create(
                    config.token.as_deref(),
                    &crate::layout::AgentDir::new(&config.data_dir).agent_token(),
                )?;
                Ok((Arc::new(db), token))
            })
            .await??
        };
        let staging = Staging::open(
            &layout.staged(),
            db.clone(),
            config.staging_ttl,
            config.staging_reserve_bytes,
        )?;
        let certs = match &config.tls {
            Some(pair) => pair.clone(),
            None => crate::tls::CertPair::ensure(&layout.certs(), &certificate_names(&config))?,
        };
        let tls = certs.server_config()?;
        let cert_sha256 = certs.pin()?;
        let identity = Arc::new(enroll::Identity::load(layout.server_credential())?);
        let recorder = recorder::spawn(config.recorder.clone(), db.clone());
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        let state = Arc::new(api::AgentState {
            hostname: config.hostname.clone(),
            token,
            identity,
            db,
            staging,
        });
        Ok(Agent {
            listener,
            tls,
            cert_sha256,
            server: config.server.clone(),
            state,
            _recorder: recorder,
            flaky: None,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Makes this agent misbehave the way `fleet-sim --flaky` asks (simulated endpoints only).
    pub fn set_flaky(&mut self, flaky: flaky::Flaky) {
        self.flaky = Some(flaky);
    }

    pub fn token(&self) -> &str {
        &self.state.token
    }

    /// The sha256 of the endpoint API's certificate.
    pub fn cert_sha256(&self) -> &str {
        &self.cert_sha256
    }

    /// Serves the endpoint API until `shutdown` resolves; expires old staged copies meanwhile.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        let expiry = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                let state = state.clone();
                let _ = tokio::task::spawn_blocking(move || state.staging.expire()).await;
            }
        });
        let flaky = self.flaky.clone().map(flaky::FlakyState::new);
        let heartbeat = self.server.clone().map(|link| {
            let heartbeat = snapq_core::catalog::Heartbeat {
                hostname: self.state.hostname.clone(),
                ips: system::ip_addresses(),
                os: Some(system::os_description()),
                agent_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
                labels: link.labels.clone(),
                api_url: link
                    .advertise
                    .clone()
                    .unwrap_or_else(|| advertised_url(self.local_addr())),
                cert_sha256: self.cert_sha256.clone(),
            };
            let identity = self.state.identity.clone();
            let beats =
                move || enroll::heartbeat_loop(link.clone(), heartbeat.clone(), identity.clone());
            match &flaky {
                Some(f) => tokio::spawn(f.clone().heartbeats(beats)),
                None => tokio::spawn(beats()),
            }
        });
        tracing::info!(addr = %self.local_addr(), hostname = %self.state.hostname, "agent listening");
        // Machine-readable: tests and scripts that start the agent on port 0 read this line.
        println!("snapq agent listening on {}", self.local_addr());
        let router = match flaky {
            Some(f) => f.layer(api::router(self.state)),
            None => api::router(self.state),
        };
        let result = crate::tls::serve(self.listener, self.tls, router, shutdown).await;
        expiry.abort();
        if let Some(h) = heartbeat {
            h.abort();
        }
        result.context("serving the endpoint API")
    }
}

/// The URL a server can call an agent listening on `addr` at: a wildcard address is replaced by the
/// machine's first address.
fn advertised_url(addr: SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        system::ip_addresses()
            .first()
            .and_then(|ip| ip.parse().ok())
            .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]))
    } else {
        addr.ip()
    };
    format!("https://{}", SocketAddr::new(ip, addr.port()))
}

/// Names a generated endpoint certificate is made for. The server trusts it by its pin, not its
/// names; they are there for people and tools that look.
fn certificate_names(config: &AgentConfig) -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let host = &config.hostname;
    if host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        names.push(host.clone());
    }
    if !config.listen.ip().is_unspecified() {
        names.push(config.listen.ip().to_string());
    }
    names.sort();
    names.dedup();
    names
}

/// Creates `dir` if needed and proves it writable, so a bad `--data-dir` fails at start with a reason.
pub fn ensure_writable_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"")
        .with_context(|| format!("data directory {} is not writable", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}
