//! The server's client of the endpoint API, and what its errors mean for a retry.

use std::time::Duration;

use reqwest::StatusCode;

use crate::wire::{DbSize, EndpointInfo, Staged};

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
}

impl AgentError {
    pub fn is_transient(&self) -> bool {
        match self {
            AgentError::Unreachable { .. } => true,
            AgentError::Refused { status, .. } => *status == 429 || *status == 503,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            AgentError::Refused { status, .. } => Some(*status),
            AgentError::Unreachable { .. } => None,
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

/// The HTTP client agents are called with: short connect timeout, no overall timeout (downloads
/// are long), keep-alive.
pub fn http_client() -> reqwest::Client {
    install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(60))
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .expect("building the HTTP client")
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
        let response =
            request
                .bearer_auth(&self.token)
                .send()
                .await
                .map_err(|e| AgentError::Unreachable {
                    url: url.to_owned(),
                    reason: error_chain(&e),
                })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let message = response
            .json::<serde_json::Value>()
            .await
            .ok()
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
        self.send(request, url)
            .await?
            .json()
            .await
            .map_err(|e| AgentError::Unreachable {
                url: url.to_owned(),
                reason: format!("bad answer: {}", error_chain(&e)),
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
        let mut request = self.http.get(&url);
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
