//! `snapq serve --demo N`: simulated endpoints in the server's own process, enrolled in group
//! `demo`, so a first start has something to capture.

use std::net::SocketAddr;
use std::time::Duration;

use crate::agent::enroll::ServerLink;
use crate::agent::fleet::{self, Fleet, FleetSpec};

use super::ServerState;

/// Starts `count` demo endpoints that heartbeat to the server at `addr` (none when 0).
pub async fn start(
    state: &ServerState,
    addr: SocketAddr,
    count: u32,
) -> anyhow::Result<Option<Fleet>> {
    if count == 0 {
        return Ok(None);
    }
    let host = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let fleet = fleet::spawn(&FleetSpec {
        count,
        base_dir: state.layout().demo(),
        prefix: "demo".into(),
        server: ServerLink {
            url: format!("https://{host}"),
            enroll_token: state.enroll_token(),
            server_ca: None,
            labels: vec!["demo".into()],
            advertise: None,
            interval: Duration::from_secs(10),
        },
        events_per_sec: 20,
        prefill: 20_000,
        db_bytes: None,
        flaky_percent: 0,
        own_addresses: false,
    })
    .await?;
    tracing::info!(count, "demo endpoints started");
    Ok(Some(fleet))
}
