//! TLS for the server's API: the certificate pair in `certs/`, the listener, and how clients decide
//! to trust a server.
//!
//! On first start the server makes a self-signed pair unless the user put their own there (the
//! seed's "install your own upload authentication certificates"). Clients trust a server by one
//! of three means, never by switching verification off: the sha256 **pin** of its certificate
//! (the local CLI reads it from the data directory; agents get it inside `enroll.token`, as
//! `kubeadm join` carries its CA hash), a CA file (`--ca-cert`), or the system's roots.

use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

pub const CERT_FILE: &str = "httpPublicCert.pem";
pub const KEY_FILE: &str = "httpPrivKey.pem";

/// The server's certificate pair on disk.
#[derive(Debug, Clone)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertPair {
    pub fn in_dir(certs_dir: &Path) -> CertPair {
        CertPair {
            cert: certs_dir.join(CERT_FILE),
            key: certs_dir.join(KEY_FILE),
        }
    }

    /// Uses the pair in `certs_dir`, generating a self-signed one for `names` if neither file is
    /// there. One file without the other is an error: better to stop than to replace a user's key.
    pub fn ensure(certs_dir: &Path, names: &[String]) -> anyhow::Result<CertPair> {
        let pair = CertPair::in_dir(certs_dir);
        match (pair.cert.exists(), pair.key.exists()) {
            (true, true) => return Ok(pair),
            (false, false) => {}
            (cert, _) => bail!(
                "{} exists but {} does not; put both files of the pair there, or neither to have a self-signed pair made",
                if cert {
                    pair.cert.display()
                } else {
                    pair.key.display()
                },
                if cert {
                    pair.key.display()
                } else {
                    pair.cert.display()
                }
            ),
        }
        std::fs::create_dir_all(certs_dir)
            .with_context(|| format!("creating {}", certs_dir.display()))?;
        let generated = rcgen::generate_simple_self_signed(names.to_vec())
            .context("generating a self-signed certificate")?;
        write_private(&pair.key, generated.signing_key.serialize_pem().as_bytes())?;
        std::fs::write(&pair.cert, generated.cert.pem())
            .with_context(|| format!("writing {}", pair.cert.display()))?;
        tracing::info!(cert = %pair.cert.display(), "generated a self-signed certificate");
        Ok(pair)
    }

    /// The rustls server configuration for this pair.
    pub fn server_config(&self) -> anyhow::Result<rustls::ServerConfig> {
        snapq_core::agent_client::install_crypto_provider();
        let certs = load_certs(&self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .with_context(|| format!("reading the private key {}", self.key.display()))?;
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .with_context(|| {
                format!(
                    "{} and {} do not make a usable pair",
                    self.cert.display(),
                    self.key.display()
                )
            })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// The sha256 pin of the server's (first) certificate, as lowercase hex.
    pub fn pin(&self) -> anyhow::Result<String> {
        cert_pin(&self.cert)
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut file, bytes)?;
    Ok(())
}

fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading the certificate {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing the certificate {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", path.display());
    }
    Ok(certs)
}

/// The sha256 of the first certificate in a PEM file, as lowercase hex.
pub fn cert_pin(path: &Path) -> anyhow::Result<String> {
    Ok(pin_of(&load_certs(path)?[0]))
}

fn pin_of(cert: &CertificateDer<'_>) -> String {
    snapq_core::pin::pin_of(cert.as_ref())
}

/// How a client decides to trust the server it calls.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Exactly the certificate with this sha256 (hex).
    Pin(String),
    /// Certificates issued by the CAs in this PEM file.
    CaFile(PathBuf),
    /// The system's trusted roots.
    System,
}

/// An HTTP client that trusts servers as `trust` says.
pub fn client(trust: &Trust) -> anyhow::Result<reqwest::Client> {
    builder(trust)?.build().context("building the HTTPS client")
}

/// The agent's client for its heartbeats: like [`client`], but a connection is closed after each
/// heartbeat instead of kept idle until the next. The server holds a TLS connection's buffers for
/// as long as it stays open (tens of KiB), so keeping one open per agent made its memory grow
/// with the fleet; a handshake every heartbeat interval costs far less.
pub fn heartbeat_client(trust: &Trust) -> anyhow::Result<reqwest::Client> {
    builder(trust)?
        .pool_max_idle_per_host(0)
        .build()
        .context("building the HTTPS client")
}

fn builder(trust: &Trust) -> anyhow::Result<reqwest::ClientBuilder> {
    snapq_core::agent_client::install_crypto_provider();
    let builder = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .read_timeout(std::time::Duration::from_secs(120))
        .pool_idle_timeout(std::time::Duration::from_secs(20));
    let builder = match trust {
        Trust::System => builder,
        Trust::CaFile(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in load_certs(path)? {
                roots.add(cert).with_context(|| {
                    format!("{} is not a usable CA certificate", path.display())
                })?;
            }
            builder.tls_backend_preconfigured(
                rustls::ClientConfig::builder()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        }
        Trust::Pin(pin) => builder.tls_backend_preconfigured(snapq_core::pin::client_config(
            pin,
            "re-read the server's enroll.token or pass --ca-cert",
        )),
    };
    Ok(builder)
}

/// A client has this long to start its TLS handshake and finish it; a silent or slow client loses
/// its connection, not the server's attention.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// ...and this long to send each request's headers, which also ends an idle keep-alive connection
/// (hyper starts the timer when it waits for the next request). Clients keep idle connections for
/// less (20 s), so they never reuse one the server is closing.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// The most connections served at once; beyond it new ones wait in the listen backlog. Lowered to
/// fit the process's open-file limit (raised to its hard limit first).
pub const MAX_CONNECTIONS: usize = 4096;

/// Raises the soft open-file limit to the hard one and returns how many connections fit in it.
fn connection_cap() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 256;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    // Keep room for databases, snapshot files and outgoing connections.
    let fit = (limit.rlim_cur as usize).saturating_sub(256) / 2;
    fit.clamp(64, MAX_CONNECTIONS)
}

/// Serves `router` over TLS on `listener` until `shutdown` resolves. A plain-HTTP request gets a
/// plain answer saying to use https instead of a dropped connection. Connections are capped
/// ([`MAX_CONNECTIONS`]) and each must handshake and send its headers in time.
pub async fn serve(
    listener: TcpListener,
    config: rustls::ServerConfig,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let service = hyper_util::service::TowerToHyperService::new(router);
    let slots = Arc::new(tokio::sync::Semaphore::new(connection_cap()));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let service = service.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, peer, acceptor, service).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
}

async fn serve_connection(
    mut stream: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    service: hyper_util::service::TowerToHyperService<axum::Router>,
) -> anyhow::Result<()> {
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first))
        .await
        .context("client sent nothing")??;
    // 0x16 opens a TLS handshake record; anything else is most likely plain HTTP.
    if peeked == 0 || first[0] != 0x16 {
        let body = "this port speaks HTTPS; use https:// in the URL\n";
        let response = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
        tracing::debug!(%peer, "plain HTTP on the TLS port");
        return Ok(());
    }
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake")?;
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tls), service)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_is_generated_once_and_a_half_pair_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        let pair = CertPair::ensure(&certs, &["localhost".into()]).unwrap();
        let pin = pair.pin().unwrap();
        pair.server_config().unwrap();
        assert_eq!(CertPair::ensure(&certs, &[]).unwrap().pin().unwrap(), pin);
        std::fs::remove_file(&pair.key).unwrap();
        let err = CertPair::ensure(&certs, &[]).unwrap_err().to_string();
        assert!(err.contains("httpPrivKey.pem"), "{err}");
    }
}
