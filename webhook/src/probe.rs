//! A minimal HTTPS client for loopback checks of the webhook: the integration tests and the
//! benchmark use it to talk to a server the way the API server does (TLS verified against the
//! CA bundle, HTTP/1.1 with keep-alive).

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Errors of the probe client.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The CA bundle holds no usable certificate.
    #[error("the CA bundle holds no usable certificate")]
    NoCa,
    /// TLS configuration failed.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// Connecting or the handshake failed.
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    /// The HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built.
    #[error("request: {0}")]
    Request(#[from] hyper::http::Error),
}

/// Connects to one server address, trusting a CA bundle (PEM) and checking the server name.
#[derive(Clone)]
pub struct Probe {
    addr: SocketAddr,
    name: ServerName<'static>,
    connector: TlsConnector,
}

impl Probe {
    /// A probe for `addr` that verifies the server as `server_name` (an IP or DNS name).
    pub fn new(
        addr: SocketAddr,
        server_name: &str,
        ca_bundle_pem: &str,
    ) -> Result<Self, ProbeError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_bundle_pem.as_bytes()).filter_map(Result::ok)
        {
            roots.add(cert)?;
        }
        if roots.is_empty() {
            return Err(ProbeError::NoCa);
        }
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|e| ProbeError::Io(std::io::Error::other(e.to_string())))?;
        Ok(Self {
            addr,
            name,
            connector: TlsConnector::from(Arc::new(cfg)),
        })
    }

    /// Opens a TLS connection and leaves the bytes to the caller (for clients that misbehave
    /// on purpose, in tests).
    pub async fn connect_tls(
        &self,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ProbeError> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        Ok(self.connector.connect(self.name.clone(), tcp).await?)
    }

    /// Opens a connection (TCP, TLS, HTTP/1.1) that can carry many requests.
    pub async fn connect(&self) -> Result<Connection, ProbeError> {
        let tls = self.connect_tls().await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Connection { sender })
    }
}

/// One open connection.
pub struct Connection {
    sender: SendRequest<Full<Bytes>>,
}

impl Connection {
    /// Sends one request and reads the whole response.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ProbeError> {
        let (status, _, bytes) = self.send_full(method, path, body).await?;
        Ok((status, bytes))
    }

    /// Whether the server closed the connection (or it broke).
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// [`Self::send`], with the response headers.
    pub async fn send_full(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, hyper::HeaderMap, Bytes), ProbeError> {
        self.sender.ready().await?;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "127.0.0.1")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, headers, bytes))
    }
}
