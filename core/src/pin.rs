//! Trusting exactly one certificate by its sha256 (a "pin"): how the CLI and agents trust the server
//! (the pin is in the data directory or in `enroll.token`) and how the server trusts each agent (the
//! pin recorded at enrollment). Never a switch that turns verification off: the handshake's
//! signatures are still checked against the pinned certificate.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Words every pin mismatch's message contains, so a caller can tell it from other TLS failures.
pub const MISMATCH: &str = "is not the pinned one";

/// The sha256 of a DER certificate, as lowercase hex.
pub fn pin_of(cert: &[u8]) -> String {
    let mut hasher = crate::verify::Hasher::default();
    hasher.update(cert);
    hasher.finish()
}

/// A rustls client configuration that accepts only the certificate pinned as `pin`; `hint` ends
/// the error message of a mismatch and says what to do about it.
pub fn client_config(pin: &str, hint: &str) -> rustls::ClientConfig {
    crate::agent_client::install_crypto_provider();
    // AES-128-GCM first: as safe, and cheaper per byte than AES-256 on the multi-GiB downloads of
    // captures (the server picks from the client's order).
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCert::new(pin, hint)))
        .with_no_client_auth()
}

/// Accepts exactly one certificate, by its sha256, and checks the handshake signatures with it.
#[derive(Debug)]
struct PinnedCert {
    pin: String,
    hint: String,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl PinnedCert {
    fn new(pin: &str, hint: &str) -> PinnedCert {
        PinnedCert {
            pin: pin.trim().to_lowercase(),
            hint: hint.to_owned(),
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = pin_of(end_entity);
        if presented == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the certificate presented (sha256 {presented}) {MISMATCH} ({}); {}",
                self.pin, self.hint
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
