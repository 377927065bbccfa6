//! Endpoint identity: the credential an enrolled agent proves itself with, and the server calls it
//! with.
//!
//! At an endpoint's first enrollment the server binds the hostname to a random **nonce** (kept in
//! `catalog.db`) and to the sha256 of the agent's TLS certificate. The agent's **credential** is
//! `HMAC-SHA256(agents.key, hostname, nonce)`: the server hands it to the agent once, in the answer to
//! the enrolling heartbeat, and can recompute it whenever it needs it, so `catalog.db` holds nothing
//! that lets anyone call an agent or pose as one; `agents.key` (0600, in the data directory beside
//! the catalog, never in it) is the secret. The agent sends the credential on every later heartbeat
//! and accepts it as the bearer token on its endpoint API. A re-key draws a new nonce, which
//! invalidates the old credential.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// The server's secret for endpoint credentials (`agents.key`).
pub struct AgentKey(hmac::Key);

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentKey(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading the endpoint credential key {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the endpoint credential key {path} is damaged (it must hold 64 hex digits); restore it from a backup, or delete it and re-key every endpoint"
    )]
    Damaged { path: String },
}

impl AgentKey {
    /// Reads `path`, or makes a new random key there (mode 0600) if there is none.
    pub fn load_or_create(path: &Path) -> Result<AgentKey, KeyError> {
        let io = |source| KeyError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = hex::decode(text.trim()).ok().filter(|b| b.len() == 32);
                let bytes = bytes.ok_or_else(|| KeyError::Damaged {
                    path: path.display().to_string(),
                })?;
                Ok(AgentKey::from_bytes(&bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let bytes = random_bytes::<32>();
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io)?;
                file.write_all(hex::encode(bytes).as_bytes()).map_err(io)?;
                file.sync_all().map_err(io)?;
                Ok(AgentKey::from_bytes(&bytes))
            }
            Err(e) => Err(io(e)),
        }
    }

    pub fn from_bytes(bytes: &[u8]) -> AgentKey {
        AgentKey(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    fn message(hostname: &str, nonce: &str) -> Vec<u8> {
        format!("snapq endpoint credential v1\n{hostname}\n{nonce}").into_bytes()
    }

    /// The credential of the endpoint `hostname` enrolled with `nonce`.
    pub fn credential(&self, hostname: &str, nonce: &str) -> String {
        hex::encode(hmac::sign(&self.0, &Self::message(hostname, nonce)))
    }

    /// Whether `given` is that credential (compared in constant time).
    pub fn verify(&self, hostname: &str, nonce: &str, given: &str) -> bool {
        let Ok(tag) = hex::decode(given.trim()) else {
            return false;
        };
        hmac::verify(&self.0, &Self::message(hostname, nonce), &tag).is_ok()
    }
}

/// A fresh enrollment nonce: 16 random bytes as hex.
pub fn new_nonce() -> String {
    hex::encode(random_bytes::<16>())
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random source works");
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_verifies_only_for_its_hostname_nonce_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agents.key");
        let key = AgentKey::load_or_create(&path).unwrap();
        let nonce = new_nonce();
        let credential = key.credential("web-01", &nonce);
        assert!(key.verify("web-01", &nonce, &credential));
        assert!(!key.verify("web-02", &nonce, &credential));
        assert!(!key.verify("web-01", &new_nonce(), &credential));
        assert!(!key.verify("web-01", &nonce, "not hex"));
        // The same file gives the same key; another key does not verify.
        let again = AgentKey::load_or_create(&path).unwrap();
        assert!(again.verify("web-01", &nonce, &credential));
        let other = AgentKey::from_bytes(&[7u8; 32]);
        assert!(!other.verify("web-01", &nonce, &credential));
        std::fs::write(&path, "short").unwrap();
        assert!(matches!(
            AgentKey::load_or_create(&path),
            Err(KeyError::Damaged { .. })
        ));
    }
}
