//! Many simulated endpoints in one process, each a complete agent (simulated recorder, its own
//! database and endpoint API) enrolled with a server: `snapq fleet-sim` and `snapq serve --demo`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;

use super::enroll::ServerLink;
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
    /// Give each endpoint its own loopback address (127.1.x.y) instead of 127.0.0.1.
    pub own_addresses: bool,
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
        let agent = Agent::build(AgentConfig {
            data_dir,
            listen: SocketAddr::new(address(i - 1, spec.own_addresses), 0),
            hostname: hostname.clone(),
            token: None,
            recorder: RecorderKind::Simulate {
                events_per_sec: spec.events_per_sec,
            },
            prefill_events: if fresh { spec.prefill } else { 0 },
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
        fleet.endpoints.push((hostname.clone(), agent.local_addr()));
        fleet.tasks.push(tokio::spawn(async move {
            if let Err(e) = agent.run(std::future::pending()).await {
                tracing::warn!(%hostname, error = %format!("{e:#}"), "simulated endpoint stopped");
            }
        }));
    }
    Ok(fleet)
}
