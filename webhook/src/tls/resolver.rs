//! The serving certificate as the TLS server sees it.
//!
//! [`CertResolver`] implements rustls' `ResolvesServerCert`: every handshake reads the current
//! certificate, so [`CertResolver::load_pem`] switching it takes effect on the next connection
//! while established ones keep theirs. Until a certificate is loaded, handshakes fail (and
//! readiness says so).

use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Errors loading a certificate.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The certificate PEM has no certificate.
    #[error("the serving certificate PEM holds no certificate")]
    NoCertificate,
    /// The key PEM cannot be read or used.
    #[error("the serving key cannot be used: {0}")]
    Key(String),
}

/// The current serving certificate, swappable at run time.
#[derive(Debug, Default)]
pub struct CertResolver {
    current: RwLock<Option<(String, Arc<CertifiedKey>)>>,
}

impl CertResolver {
    /// A resolver with no certificate yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads a certificate chain and key (PEM). Returns `true` when it differs from the one
    /// served so far.
    pub fn load_pem(&self, cert_pem: &str, key_pem: &str) -> Result<bool, LoadError> {
        if self
            .current
            .read()
            .ok()
            .and_then(|c| c.as_ref().map(|(pem, _)| pem == cert_pem))
            .unwrap_or(false)
        {
            return Ok(false);
        }
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .filter_map(Result::ok)
                .collect();
        if certs.is_empty() {
            return Err(LoadError::NoCertificate);
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| LoadError::Key(e.to_string()))?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| LoadError::Key(e.to_string()))?;
        let ck = Arc::new(CertifiedKey::new(certs, signing));
        if let Ok(mut cur) = self.current.write() {
            *cur = Some((cert_pem.to_string(), ck));
        }
        Ok(true)
    }

    /// Whether a certificate is loaded.
    pub fn is_loaded(&self) -> bool {
        self.current.read().map(|c| c.is_some()).unwrap_or(false)
    }

    /// The PEM of the certificate served now.
    pub fn current_pem(&self) -> Option<String> {
        self.current
            .read()
            .ok()
            .and_then(|c| c.as_ref().map(|(p, _)| p.clone()))
    }

    /// A rustls server configuration that serves whatever this resolver holds (HTTP/1.1).
    ///
    /// With `client_roots`, a client certificate is asked for and, when one is sent, verified
    /// against those roots (a certificate that does not verify fails the handshake). Clients
    /// without one still connect, for the kubelet's probes and metrics scrapers; the server
    /// refuses them admission reviews ([`crate::server::handle`]).
    pub fn server_config(
        self: &Arc<Self>,
        client_roots: Option<Arc<rustls::RootCertStore>>,
    ) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match client_roots {
            None => builder.with_no_client_auth(),
            Some(roots) => {
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| rustls::Error::General(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut cfg = builder.with_cert_resolver(self.clone());
        // HTTP/1.1 only: the API server's webhook client offers nothing else (it sets
        // `NextProtos` to `http/1.1` so that concurrent reviews spread over the replicas of a
        // Service, kubernetes/kubernetes#75791), so HTTP/2 would serve no real client.
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .ok()
            .and_then(|c| c.as_ref().map(|(_, k)| k.clone()))
    }
}
