//! The HTTPS server: routes, body limits, TLS handshakes and graceful shutdown.
//!
//! | route | answer |
//! | --- | --- |
//! | `POST /mutate-pods` | an AdmissionReview response (200), or 400 for a body that is not one, 413 above 8 MiB |
//! | `GET /healthz` | 200 while the process serves |
//! | `GET /readyz` | 200 once the PodInjection watch has synced and a certificate is loaded, else 503 |
//! | `GET /metrics` | Prometheus text format |
//!
//! The request path reads only memory: the reflector stores of PodInjections and namespaces and
//! the certificate resolver. Every connection runs in its own task; on shutdown the listener
//! closes, open connections finish their current request, and the server waits for them for at
//! most five seconds.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use appset_crds::PodInjection;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Namespace;
use kube::Resource;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::admission;
use crate::metrics::Metrics;
use crate::tls::resolver::CertResolver;
use appset_process::admin;
use appset_process::readiness::Readiness;

/// The largest request body read.
pub const MAX_BODY: usize = 8 * 1024 * 1024;

/// Everything a request may read.
pub struct AppState {
    /// PodInjections, kept by a reflector.
    pub injections: Store<PodInjection>,
    /// Namespace metadata, when the namespace label cache is on.
    pub namespaces: Option<Store<PartialObjectMeta<Namespace>>>,
    /// The serving certificate.
    pub resolver: Arc<CertResolver>,
    /// The metrics.
    pub metrics: Metrics,
    /// The readiness gates: the PodInjection watch holds one until its first sync.
    pub readiness: Readiness,
    /// Where denials are reported as Events, when they are.
    pub denials: Option<crate::events::Denials>,
}

impl AppState {
    /// The PodInjections of `namespace`.
    pub fn lookup(&self, namespace: &str) -> Vec<Arc<PodInjection>> {
        self.injections
            .state_filter(|pi| pi.metadata.namespace.as_deref() == Some(namespace))
    }

    /// Whether the namespace cache (when on) disagrees with the API server, which sent a
    /// request for `namespace` because its `namespaceSelector` matched: the namespace is
    /// unknown to the cache or not labelled opted in there. Only counted: the API server's
    /// selector decides.
    pub fn namespace_cache_is_stale(&self, namespace: &str) -> bool {
        self.namespaces.as_ref().is_some_and(|s| {
            s.get(&ObjectRef::new(namespace)).is_none_or(|ns| {
                !crate::matching::namespace_enabled(&ns.metadata.labels.clone().unwrap_or_default())
            })
        })
    }

    /// `/readyz`: a serving certificate must be loaded and every readiness gate closed.
    pub fn readyz(&self) -> admin::Answer {
        if !self.resolver.is_loaded() {
            return admin::unavailable("no serving certificate is loaded yet");
        }
        admin::readyz(&self.readiness, false)
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// An admin answer as a hyper response.
fn answer(a: admin::Answer) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(a.body)));
    *r.status_mut() = StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(a.content_type),
    );
    r
}

/// Answers one HTTP request.
pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/mutate-pods") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    state.metrics.error("body", 0.0);
                    let too_large = e
                        .downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some();
                    return if too_large {
                        text(StatusCode::PAYLOAD_TOO_LARGE, "request body above 8 MiB\n")
                    } else {
                        text(StatusCode::BAD_REQUEST, "cannot read the request body\n")
                    };
                }
            };
            review(&state, &body)
        }
        // The webhook registers no heartbeats yet: /healthz says the server answers.
        (&Method::GET, "/healthz") => answer(admin::healthz(&NO_LOOPS)),
        (&Method::GET, "/readyz") => answer(state.readyz()),
        (&Method::GET, "/metrics") => answer(state.metrics.answer()),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

static NO_LOOPS: std::sync::LazyLock<appset_process::liveness::Liveness> =
    std::sync::LazyLock::new(|| appset_process::liveness::Liveness::new(std::time::Duration::MAX));

/// Reviews one body: the AdmissionReview response, or 400.
pub fn review(state: &AppState, body: &[u8]) -> Response<Full<Bytes>> {
    let start = Instant::now();
    let mut stale = false;
    let reviewed = admission::respond(body, |ns| {
        stale = state.namespace_cache_is_stale(ns);
        state.lookup(ns)
    });
    if stale {
        state.metrics.namespace_cache_stale.inc();
    }
    match reviewed {
        Ok((decision, bytes)) => {
            state
                .metrics
                .observe(&decision, start.elapsed().as_secs_f64());
            match &decision {
                admission::Decision::Inject { applied, .. } => {
                    debug!(injected = %crate::plan::format_injected(applied), "pod injected")
                }
                admission::Decision::Deny {
                    message,
                    namespace,
                    injections,
                    dry_run,
                    ..
                } => {
                    debug!(%message, dry_run, "pod denied");
                    // A dry run has no side effects: no Event (`sideEffects: None`).
                    if let Some(denials) = state.denials.as_ref().filter(|_| !dry_run) {
                        for name in injections {
                            let key = ObjectRef::<PodInjection>::new(name).within(namespace);
                            if let Some(pi) = state.injections.get(&key) {
                                denials.report(crate::events::Denial {
                                    injection: pi.object_ref(&()),
                                    message: message.clone(),
                                });
                            }
                        }
                    }
                }
                admission::Decision::Invalid { message, .. } => {
                    warn!(%message, "unreadable object in an admission request")
                }
                admission::Decision::Allow { .. } => {}
            }
            let mut r = Response::new(Full::new(Bytes::from(bytes)));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => {
            state
                .metrics
                .error("bad_request", start.elapsed().as_secs_f64());
            text(StatusCode::BAD_REQUEST, format!("{e}\n"))
        }
    }
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The TLS configuration could not be built.
    #[error("cannot build the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Serves HTTPS on `listener` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    let acceptor = TlsAcceptor::from(state.resolver.server_config()?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        let mut stop = stop_rx.clone();
        conns.spawn(async move {
            let _ = tcp.set_nodelay(true);
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(state, req).await) }
            });
            // The header timer also runs while a keep-alive connection is idle. It is longer than
            // the API server's idle timeout (90 s), so the API server closes an idle connection
            // first: it does not retry a POST sent on a connection the server closed under it.
            // For the same reason connections are not closed when the certificate is renewed;
            // they keep the certificate of their handshake.
            let conn = http1::Builder::new()
                .header_read_timeout(Duration::from_secs(120))
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(tls), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}
