//! An agent's link to its server: it enrolls with the server's enroll token and then heartbeats
//! its facts and API address, so the server knows it is online and how to reach it.

use std::time::Duration;

use snapq_core::catalog::Heartbeat;

/// Where an agent reports to.
#[derive(Debug, Clone)]
pub struct ServerLink {
    pub url: String,
    pub enroll_token: String,
    /// Agent-reported labels, which computer groups can match.
    pub labels: Vec<String>,
    /// The URL the server should call this agent at [default: http://<listen address>].
    pub advertise: Option<String>,
    pub interval: Duration,
}

/// Heartbeats forever; failures are logged and retried at the next beat.
pub async fn heartbeat_loop(link: ServerLink, heartbeat: Heartbeat) {
    let http = snapq_core::agent_client::http_client();
    let url = format!("{}/v1/agents/heartbeat", link.url.trim_end_matches('/'));
    let mut tick = tokio::time::interval(link.interval);
    let mut was_ok = None;
    loop {
        tick.tick().await;
        let sent = http
            .post(&url)
            .bearer_auth(&link.enroll_token)
            .json(&heartbeat)
            .send()
            .await
            .map_err(|e| snapq_core::agent_client::error_chain(&e))
            .and_then(|r| {
                if r.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("server answered {}", r.status()))
                }
            });
        match (&sent, was_ok) {
            (Ok(()), Some(true)) => {}
            (Ok(()), _) => tracing::info!(server = %link.url, "enrolled with the server"),
            (Err(e), Some(false)) => tracing::debug!(error = %e, "heartbeat failed"),
            (Err(e), _) => {
                tracing::warn!(server = %link.url, error = %e, "heartbeat failed; retrying")
            }
        }
        was_ok = Some(sent.is_ok());
    }
}
