//! Many simulated endpoints in one process, each a complete agent (simulated recorder, its own
//! database and endpoint API) enrolled with a server: `snapq fleet-sim` and `snapq serve --demo`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;

use super::enroll::ServerLink;
use super::flaky::Flaky;
use super::recorder::{Limits, RecorderKind};
use super::{Agent, AgentConfig};

#[derive(Debug, Clone)]
pub struct FleetSpec {
    pub count: u32,
    /// Each endpoint keeps its data in `base_dir/<hostname>`, reused across restarts.
    pub base_dir: PathBuf,
    /// Endpoints are named `<prefix>-01`, `<prefix>-02`, …
    pub prefix: String,
    pub server: ServerLink,
    pub events_per_sec: u32,
    /// Events written once, when an endpoint's database is new.
    pub prefill: u64,
    /// Prefill each new database to about this size instead (`fleet-sim --db-mib`).
    pub db_bytes: Option<u64>,
    /// This share of endpoints misbehaves (`fleet-sim --flaky`): see `super::flaky`.
    pub flaky_percent: u8,
    /// Give each endpoint its own loopback address (127.1.x.y) instead of 127.0.0.1.
    pub own_addresses: bool,
}

/// Whether endpoint `i` (0-based) of the fleet is flaky, and how: spread over the fleet, and
/// the same endpoints every run.
fn flaky_for(i: u32, percent: u8) -> Option<Flaky> {
    if (i.wrapping_mul(37) % 100) as u8 >= percent {
        return None;
    }
    Some(if i.is_multiple_of(2) {
        Flaky::DropDownloads { times: 2 }
    } else {
        Flaky::Offline {
            after: Duration::from_secs(2 + u64::from(i % 5)),
            duration: Duration::from_secs(8 + u64::from(i % 7)),
        }
    })
}

/// Writes simulated events into a new database until it is about `bytes` large.
fn prefill_to(data_dir: &std::path::Path, hostname: &str, bytes: u64) -> anyhow::Result<()> {
    use crate::agent::recorder::{RecorderDb, prefill};
    std::fs::create_dir_all(data_dir)?;
    let path = crate::layout::AgentDir::new(data_dir).monitor_db();
    let db = RecorderDb::open(&path, hostname, Limits::default())?;
    // The database's used size (pages in use, WAL included): what a snapshot copies.
    // About 7,000 events per MiB; fill in steps and measure.
    while db.used_bytes()? < bytes {
        let left = bytes - db.used_bytes()?;
        prefill(&db, (left / 160).clamp(1_000, 50_000))?;
    }
    Ok(())
}

/// Running simulated endpoints; dropping it stops them.
pub struct Fleet {
    pub endpoints: Vec<(String, SocketAddr)>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn address(i: u32, own: bool) -> IpAddr {
    if own {
        IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8))
    } else {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    }
}

pub async fn spawn(spec: &FleetSpec) -> anyhow::Result<Fleet> {
    let width = spec.count.to_string().len().max(2);
    let mut fleet = Fleet {
        endpoints: Vec::new(),
        tasks: Vec::new(),
    };
    for i in 1..=spec.count {
        let hostname = format!("{}-{i:0width$}", spec.prefix);
        let data_dir = spec.base_dir.join(&hostname);
        let fresh = !crate::layout::AgentDir::new(&data_dir)
            .monitor_db()
            .exists();
        if let (true, Some(bytes)) = (fresh, spec.db_bytes) {
            let (dir, host) = (data_dir.clone(), hostname.clone());
            tokio::task::spawn_blocking(move || prefill_to(&dir, &host, bytes))
                .await?
                .with_context(|| format!("prefilling simulated endpoint {hostname}"))?;
        }
        let mut agent = Agent::build(AgentConfig {
            data_dir,
            listen: SocketAddr::new(address(i - 1, spec.own_addresses), 0),
            hostname: hostname.clone(),
            token: None,
            recorder: RecorderKind::Simulate {
                events_per_sec: spec.events_per_sec,
            },
            prefill_events: if fresh && spec.db_bytes.is_none() {
                spec.prefill
            } else {
                0
            },
            limits: Limits {
                max_bytes: Some(256 << 20),
                max_age: None,
            },
            staging_ttl: Duration::from_secs(3600),
            staging_reserve_bytes: AgentConfig::DEFAULT_STAGING_RESERVE,
            tls: None,
            server: Some(spec.server.clone()),
        })
        .await
        .with_context(|| format!("starting simulated endpoint {hostname}"))?;
        if let Some(flaky) = flaky_for(i - 1, spec.flaky_percent) {
            tracing::info!(%hostname, ?flaky, "flaky simulated endpoint");
            agent.set_flaky(flaky);
        }
        fleet.endpoints.push((hostname.clone(), agent.local_addr()));
        fleet.tasks.push(tokio::spawn(async move {
            if let Err(e) = agent.run(std::future::pending()).await {
                tracing::warn!(%hostname, error = %format!("{e:#}"), "simulated endpoint stopped");
            }
        }));
    }
    Ok(fleet)
}
