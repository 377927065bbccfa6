//! The server's client of the endpoint API, and what its errors mean for a retry.
//!
//! The server calls an agent only over HTTPS, trusting exactly the certificate pinned when the
//! endpoint enrolled ([`Agents::client`]), with the endpoint's credential as the bearer token
//! (derived from `agents.key`, see [`crate::identity`]). Bodies read from an agent are bounded.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;

use crate::catalog::Endpoint;
use crate::identity::AgentKey;
use crate::wire::{DbSize, EndpointInfo, Staged};

/// The largest JSON answer read from an agent (answers are a few KiB; an agent cannot make the
/// server buffer more).
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// The largest page of events read from an agent (a page holds at most
/// [`crate::query::MAX_LIMIT`] events).
pub const MAX_PAGE_BYTES: usize = 64 << 20;

/// How long a live query (a page, a summary, a tree) may wait for the agent: an analyst is
/// waiting, and an agent that stopped answering must be noticed within seconds.
pub const LIVE_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a call to an agent failed, sorted by whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Connection refused or reset, timeout, 5xx: the agent may be back soon.
    #[error("endpoint agent at {url} is unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    /// The agent answered and said no; trying again will not change that.
    #[error("endpoint agent at {url} refused: {status}: {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    /// The agent presented a certificate other than the one pinned at enrollment.
    #[error("endpoint agent at {url} is not the enrolled agent: {reason}")]
    CertificateChanged { url: String, reason: String },
}

impl AgentError {
    pub fn is_transient(&self) -> bool {
        match self {
            AgentError::Unreachable { .. } => true,
            AgentError::Refused { status, .. } => *status == 429 || *status == 503,
            AgentError::CertificateChanged { .. } => false,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            AgentError::Refused { status, .. } => Some(*status),
            AgentError::Unreachable { .. } | AgentError::CertificateChanged { .. } => None,
        }
    }
}

/// A client of one agent's endpoint API.
#[derive(Debug, Clone)]
pub struct AgentClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

fn client_builder() -> reqwest::ClientBuilder {
    install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(60))
        // Shorter than the agent's keep-alive (30 s), so a pooled connection is never one the
        // agent is closing.
        .pool_idle_timeout(Duration::from_secs(20))
}

/// An HTTPS client that trusts only the agent certificate pinned as `pin`: short connect timeout,
/// no overall timeout (downloads are long), keep-alive. `hint` says what to do on a mismatch.
pub fn pinned_client(pin: &str, hint: &str) -> reqwest::Client {
    client_builder()
        .tls_backend_preconfigured(crate::pin::client_config(pin, hint))
        .build()
        .expect("building the HTTP client")
}

/// Why the server cannot call an endpoint's agent.
#[derive(Debug, thiserror::Error)]
pub enum NotCallable {
    #[error(
        "{0} has no agent enrolled with this server, so it cannot be reached live or captured; upload an export instead"
    )]
    NoAgent(String),
    #[error(
        "{0} was re-keyed and its agent has not enrolled again yet; start the agent with the server's enroll token"
    )]
    AwaitingEnrollment(String),
}

/// How the server reaches enrolled agents: the key their credentials derive from, and one pinned
/// HTTPS client (with its connection pool) per endpoint certificate, for the endpoints called
/// most recently (at most [`CACHED_CLIENTS`]).
#[derive(Debug)]
pub struct Agents {
    key: AgentKey,
    clients: Mutex<ClientCache>,
}

/// Pinned clients kept for reuse. A client and its pool cost the server tens of KiB; a fleet
/// batch calls every endpoint once, so without a bound the server would keep one per endpoint
/// of the fleet. The least recently used is dropped (with its idle connections) beyond this.
pub const CACHED_CLIENTS: usize = 128;

#[derive(Debug, Default)]
struct ClientCache {
    /// (hostname, pin) → (client, when it was last handed out, by `tick`).
    clients: HashMap<(String, String), (reqwest::Client, u64)>,
    tick: u64,
}

impl ClientCache {
    fn get_or_make(
        &mut self,
        key: (String, String),
        make: impl FnOnce() -> reqwest::Client,
    ) -> reqwest::Client {
        self.tick += 1;
        let tick = self.tick;
        if let Some((client, used)) = self.clients.get_mut(&key) {
            *used = tick;
            return client.clone();
        }
        if self.clients.len() >= CACHED_CLIENTS
            && let Some(oldest) = self
                .clients
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
        {
            self.clients.remove(&oldest);
        }
        let client = make();
        self.clients.insert(key, (client.clone(), tick));
        client
    }
}

impl Agents {
    pub fn new(key: AgentKey) -> Agents {
        Agents {
            key,
            clients: Mutex::default(),
        }
    }

    pub fn key(&self) -> &AgentKey {
        &self.key
    }

    /// A client of `endpoint`'s agent, trusting only the certificate it enrolled with.
    pub fn client(&self, endpoint: &Endpoint) -> Result<AgentClient, NotCallable> {
        let host = &endpoint.hostname;
        let Some(url) = &endpoint.api_url else {
            return Err(NotCallable::NoAgent(host.clone()));
        };
        let (Some(pin), Some(nonce)) = (&endpoint.cert_sha256, &endpoint.identity_nonce) else {
            return Err(NotCallable::AwaitingEnrollment(host.clone()));
        };
        let http = self
            .clients
            .lock()
            .expect("agent clients lock")
            .get_or_make((host.clone(), pin.clone()), || {
                pinned_client(
                    pin,
                    &format!(
                        "the agent's certificate changed since {host} enrolled; if the endpoint was reimaged or its certificate replaced, re-key it with `snapq endpoints rekey {host}`"
                    ),
                )
            });
        Ok(AgentClient::new(
            http,
            url,
            &self.key.credential(host, nonce),
        ))
    }
}

impl AgentClient {
    pub fn new(http: reqwest::Client, base_url: &str, token: &str) -> AgentClient {
        AgentClient {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, AgentError> {
        let response = request.bearer_auth(&self.token).send().await.map_err(|e| {
            let reason = error_chain(&e);
            if reason.contains(crate::pin::MISMATCH) {
                AgentError::CertificateChanged {
                    url: url.to_owned(),
                    reason,
                }
            } else {
                AgentError::Unreachable {
                    url: url.to_owned(),
                    reason,
                }
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let message = read_bounded(response, MAX_ANSWER_BYTES)
            .await
            .ok()
            .and_then(|body| serde_json::from_slice::<serde_json::Value>(&body).ok())
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("").to_owned());
        if status.is_server_error() && status != StatusCode::INSUFFICIENT_STORAGE {
            return Err(AgentError::Unreachable {
                url: url.to_owned(),
                reason: format!("{status}: {message}"),
            });
        }
        Err(AgentError::Refused {
            url: url.to_owned(),
            status: status.as_u16(),
            message,
        })
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<T, AgentError> {
        self.json_bounded(request, url, MAX_ANSWER_BYTES).await
    }

    async fn json_bounded<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        url: &str,
        limit: usize,
    ) -> Result<T, AgentError> {
        let body = read_bounded(self.send(request, url).await?, limit)
            .await
            .map_err(|reason| AgentError::Unreachable {
                url: url.to_owned(),
                reason: format!("bad answer: {reason}"),
            })?;
        serde_json::from_slice(&body).map_err(|e| AgentError::Unreachable {
            url: url.to_owned(),
            reason: format!("bad answer: {e}"),
        })
    }

    pub async fn endpoint_info(&self) -> Result<EndpointInfo, AgentError> {
        let url = self.url("/v1/endpoint");
        self.json(self.http.get(&url), &url).await
    }

    /// The recorder database's size with its WAL (cheap: no event counting).
    pub async fn db_size(&self) -> Result<u64, AgentError> {
        let url = self.url("/v1/endpoint/size");
        let size: DbSize = self.json(self.http.get(&url), &url).await?;
        Ok(size.db_bytes)
    }

    /// One page of events: `query` is the query string of `GET /v1/events` (already validated by
    /// the caller with the same engine, so the agent's answer is the same page it would give
    /// directly). Bounded by [`LIVE_QUERY_TIMEOUT`].
    pub async fn events(&self, query: &str) -> Result<crate::query::EventPage, AgentError> {
        let url = self.url(&format!("/v1/events?{query}"));
        let request = self.http.get(&url).timeout(LIVE_QUERY_TIMEOUT);
        self.json_bounded(request, &url, MAX_PAGE_BYTES).await
    }

    /// [`AgentClient::events`] as the agent's JSON bytes, for passing a page on unchanged.
    pub async fn events_raw(&self, query: &str) -> Result<Vec<u8>, AgentError> {
        let url = self.url(&format!("/v1/events?{query}"));
        let request = self.http.get(&url).timeout(LIVE_QUERY_TIMEOUT);
        read_bounded(self.send(request, &url).await?, MAX_PAGE_BYTES)
            .await
            .map_err(|reason| AgentError::Unreachable {
                url: url.clone(),
                reason: format!("bad answer: {reason}"),
            })
    }

    /// Event counts per type and the time range (`GET /v1/events/summary`).
    pub async fn summary(&self) -> Result<crate::query::Summary, AgentError> {
        let url = self.url("/v1/events/summary");
        self.json(self.http.get(&url).timeout(LIVE_QUERY_TIMEOUT), &url)
            .await
    }

    /// A process with its parent chain and children (`GET /v1/processes/{id}/tree`).
    pub async fn process_tree(&self, id: i64) -> Result<crate::query::ProcessTree, AgentError> {
        let url = self.url(&format!("/v1/processes/{id}/tree"));
        self.json(self.http.get(&url).timeout(LIVE_QUERY_TIMEOUT), &url)
            .await
    }

    /// Whether the agent answers a cheap request within `within` (tells a slow query from a
    /// dead agent).
    pub async fn answers(&self, within: Duration) -> bool {
        let url = self.url("/v1/endpoint/size");
        self.json::<DbSize>(self.http.get(&url).timeout(within), &url)
            .await
            .is_ok()
    }

    /// Asks the agent to stage a consistent copy.
    pub async fn stage(&self) -> Result<Staged, AgentError> {
        let url = self.url("/v1/snapshots");
        self.json(self.http.post(&url), &url).await
    }

    /// A staging the agent holds (`None` if it holds none by that id); with `wait`, the agent waits
    /// up to that long (at most a minute) for it to stop `copying`.
    pub async fn staged(&self, id: &str, wait: Duration) -> Result<Option<Staged>, AgentError> {
        let url = self.url(&format!(
            "/v1/snapshots/{id}/info?wait_ms={}",
            wait.as_millis()
        ));
        let request = self.http.get(&url).timeout(wait + Duration::from_secs(30));
        match self.json(request, &url).await {
            Ok(staged) => Ok(Some(staged)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Starts downloading staged copy `id` from byte `from` (a `Range` request when `from > 0`),
    /// following the copy while the agent still writes it. The caller checks that the `ETag` is
    /// the staging's id before appending to bytes it already has.
    pub async fn download(&self, id: &str, from: u64) -> Result<reqwest::Response, AgentError> {
        let url = self.url(&format!("/v1/snapshots/{id}"));
        // Not back to the pool afterwards: a connection that carried a snapshot keeps read
        // buffers grown to their maximum, and with one pool per endpoint a fleet batch would
        // leave one such idle connection behind per endpoint captured in the idle timeout.
        let mut request = self
            .http
            .get(&url)
            .header(reqwest::header::CONNECTION, "close");
        if from > 0 {
            request = request.header(reqwest::header::RANGE, format!("bytes={from}-"));
        }
        self.send(request, &url).await
    }

    /// Deletes staged copy `id`; an already-gone copy is fine.
    pub async fn delete_staged(&self, id: &str) -> Result<(), AgentError> {
        let url = self.url(&format!("/v1/snapshots/{id}"));
        match self.send(self.http.delete(&url), &url).await {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Reads a response body of at most `limit` bytes; a longer one is an error, not a buffer that
/// grows as long as the agent keeps sending.
async fn read_bounded(response: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(format!("the answer is larger than {limit} bytes"));
    }
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| error_chain(&e))?;
        if body.len() + chunk.len() > limit {
            return Err(format!("the answer is larger than {limit} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Makes ring the process's TLS crypto provider (once; later calls do nothing).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An error with its sources, `a: b: c`, since reqwest hides the useful part in the chain.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_cache_keeps_the_most_recently_used_clients_only() {
        let mut cache = ClientCache::default();
        let key = |i: usize| (format!("host-{i}"), "ab".repeat(32));
        let make = || pinned_client(&"ab".repeat(32), "");
        for i in 0..CACHED_CLIENTS {
            cache.get_or_make(key(i), make);
        }
        // host-0 is used again: host-1 is now the least recently used.
        cache.get_or_make(key(0), || panic!("host-0 is cached"));
        cache.get_or_make(key(CACHED_CLIENTS), make);
        assert_eq!(cache.clients.len(), CACHED_CLIENTS);
        assert!(cache.clients.contains_key(&key(0)));
        assert!(!cache.clients.contains_key(&key(1)));
        assert!(cache.clients.contains_key(&key(CACHED_CLIENTS)));
    }
}
