//! An agent's link to its server: it enrolls with the server's enroll token and then heartbeats
//! its facts and API address, so the server knows it is online and how to reach it.
//!
//! Enrollment answers with the agent's **credential**, kept in `server.credential` (0600): every
//! later heartbeat is sent with it instead of the enroll token, and the server calls the endpoint
//! API with it. If the server no longer accepts it (an admin re-keyed or forgot the endpoint), the
//! agent drops it and enrolls again with the enroll token; if another agent holds the hostname, the
//! server refuses (409) and this agent keeps asking, so an admin's re-key lets it in.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use snapq_core::catalog::Heartbeat;

/// The credential the server issued this agent at enrollment, in memory and in its file.
#[derive(Debug)]
pub struct Identity {
    path: PathBuf,
    credential: RwLock<Option<String>>,
}

impl Identity {
    /// Loads the credential kept in `path`, if there is one.
    pub fn load(path: PathBuf) -> anyhow::Result<Identity> {
        let credential = match std::fs::read_to_string(&path) {
            Ok(text) if !text.trim().is_empty() => Some(text.trim().to_owned()),
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(anyhow::Error::from(e).context(format!("reading {}", path.display())));
            }
        };
        Ok(Identity {
            path,
            credential: RwLock::new(credential),
        })
    }

    pub fn credential(&self) -> Option<String> {
        self.credential.read().expect("identity lock").clone()
    }

    fn set(&self, credential: &str) -> anyhow::Result<()> {
        crate::token::write_private(&self.path, credential)?;
        *self.credential.write().expect("identity lock") = Some(credential.to_owned());
        Ok(())
    }

    fn clear(&self) {
        let _ = std::fs::remove_file(&self.path);
        *self.credential.write().expect("identity lock") = None;
    }

    /// Whether `given` is the server's credential (compared in constant time).
    pub fn is_server(&self, given: &str) -> bool {
        self.credential
            .read()
            .expect("identity lock")
            .as_deref()
            .is_some_and(|c| crate::http::same_secret(given, c))
    }
}

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
    /// The URL the server should call this agent at [default: https://<listen address>].
    pub advertise: Option<String>,
    pub interval: Duration,
}

/// What one heartbeat came to.
enum Beat {
    Ok,
    Enrolled,
    /// The server does not accept our credential any more: enroll again.
    CredentialRefused(String),
    Failed(String),
}

/// Heartbeats forever; failures are logged and retried at the next beat.
pub async fn heartbeat_loop(link: ServerLink, heartbeat: Heartbeat, identity: Arc<Identity>) {
    let trust = match (&link.server_ca, &link.enroll_token.pin) {
        (Some(ca), _) => crate::tls::Trust::CaFile(ca.clone()),
        (None, Some(pin)) => crate::tls::Trust::Pin(pin.clone()),
        (None, None) => crate::tls::Trust::System,
    };
    let http = match crate::tls::heartbeat_client(&trust) {
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
        let beat = beat(&http, &url, &link, &heartbeat, &identity).await;
        let ok = match &beat {
            Beat::Ok => {
                if was_ok != Some(true) {
                    tracing::info!(server = %link.url, "heartbeating to the server");
                }
                true
            }
            Beat::Enrolled => {
                tracing::info!(server = %link.url, "enrolled with the server");
                // The server lists the endpoint online once a heartbeat proves the credential.
                tick.reset_immediately();
                true
            }
            Beat::CredentialRefused(e) => {
                tracing::warn!(server = %link.url, error = %e, "the server refused this agent's credential; enrolling again");
                identity.clear();
                tick.reset_immediately();
                false
            }
            Beat::Failed(e) if was_ok == Some(false) => {
                tracing::debug!(error = %e, "heartbeat failed");
                false
            }
            Beat::Failed(e) => {
                tracing::warn!(server = %link.url, error = %e, "heartbeat failed; retrying");
                false
            }
        };
        was_ok = Some(ok);
    }
}

async fn beat(
    http: &reqwest::Client,
    url: &str,
    link: &ServerLink,
    heartbeat: &Heartbeat,
    identity: &Identity,
) -> Beat {
    let credential = identity.credential();
    let bearer = credential.as_deref().unwrap_or(&link.enroll_token.secret);
    let response = match http
        .post(url)
        .bearer_auth(bearer)
        .json(heartbeat)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => return Beat::Failed(snapq_core::agent_client::error_chain(&e)),
    };
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if status.is_success() {
        return match body["credential"].as_str() {
            Some(new) => match identity.set(new) {
                Ok(()) => Beat::Enrolled,
                Err(e) => Beat::Failed(format!("cannot keep the credential: {e:#}")),
            },
            None => Beat::Ok,
        };
    }
    let message = format!(
        "server answered {status}: {}",
        body["error"].as_str().unwrap_or("no details")
    );
    if status == reqwest::StatusCode::UNAUTHORIZED && credential.is_some() {
        Beat::CredentialRefused(message)
    } else {
        Beat::Failed(message)
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
