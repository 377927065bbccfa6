//! An agent's link to its server: it enrolls with the server's enroll token and then heartbeats
//! its facts and API address, so the server knows it is online and how to reach it.

use std::time::Duration;

use snapq_core::catalog::Heartbeat;

/// The content of the server's `enroll.token`: the secret agents authenticate with and the sha256
/// pin of the server's certificate, `SECRET.PIN`, so an agent can verify the server with nothing
/// else copied to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollToken {
    pub secret: String,
    pub pin: Option<String>,
}

impl EnrollToken {
    pub fn parse(text: &str) -> EnrollToken {
        match text.trim().split_once('.') {
            Some((secret, pin)) => EnrollToken {
                secret: secret.to_owned(),
                pin: Some(pin.to_owned()),
            },
            None => EnrollToken {
                secret: text.trim().to_owned(),
                pin: None,
            },
        }
    }
}

impl std::fmt::Display for EnrollToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.pin {
            Some(pin) => write!(f, "{}.{pin}", self.secret),
            None => f.write_str(&self.secret),
        }
    }
}

/// Where an agent reports to.
#[derive(Debug, Clone)]
pub struct ServerLink {
    pub url: String,
    pub enroll_token: EnrollToken,
    /// A CA file to verify the server with instead of the pin in the enroll token.
    pub server_ca: Option<std::path::PathBuf>,
    /// Agent-reported labels, which computer groups can match.
    pub labels: Vec<String>,
    /// The URL the server should call this agent at [default: http://<listen address>].
    pub advertise: Option<String>,
    pub interval: Duration,
}

/// Heartbeats forever; failures are logged and retried at the next beat.
pub async fn heartbeat_loop(link: ServerLink, heartbeat: Heartbeat) {
    let trust = match (&link.server_ca, &link.enroll_token.pin) {
        (Some(ca), _) => crate::tls::Trust::CaFile(ca.clone()),
        (None, Some(pin)) => crate::tls::Trust::Pin(pin.clone()),
        (None, None) => crate::tls::Trust::System,
    };
    let http = match crate::tls::client(&trust) {
        Ok(http) => http,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "cannot build the client for the server; not enrolling");
            return;
        }
    };
    let url = format!("{}/v1/agents/heartbeat", link.url.trim_end_matches('/'));
    let mut tick = tokio::time::interval(link.interval);
    let mut was_ok = None;
    loop {
        tick.tick().await;
        let sent = http
            .post(&url)
            .bearer_auth(&link.enroll_token.secret)
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

#[cfg(test)]
mod tests {
    use super::EnrollToken;

    #[test]
    fn enroll_tokens_carry_the_pin_and_round_trip() {
        let t = EnrollToken::parse("abc.0123\n");
        assert_eq!((t.secret.as_str(), t.pin.as_deref()), ("abc", Some("0123")));
        assert_eq!(t.to_string(), "abc.0123");
        assert_eq!(EnrollToken::parse("abc").pin, None);
    }
}
