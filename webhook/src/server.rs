//! The HTTPS server: routes, body limits, TLS handshakes and graceful shutdown.
//!
//! | route | answer |
//! | --- | --- |
//! | `POST /mutate-pods` | an AdmissionReview response (200) injecting PodInjections; 400 for a body that is not one, 413 above the largest body, 408 when it does not arrive in time, 503 when the body budget is full ([`Limits`]); 403 when a client CA is configured and the connection presented no certificate of it |
//! | `POST /pin-config` | an AdmissionReview response (200) pointing a pod's ConfigMap and Secret references at the snapshots of its `appset.dev/config-snapshots` annotation ([`crate::pin`]); never injects; a malformed annotation is denied (`allowed: false`, `status.code` 400); otherwise the same body limits, status codes and client-certificate rule as `/mutate-pods` |
//! | `GET /healthz` | 200 while the process serves |
//! | `GET /readyz` | 200 once the PodInjection (and namespace) watches have synced and a certificate is loaded; 503 before, and while draining |
//! | `GET /metrics` | Prometheus text format |
//!
//! The request path reads only memory: the reflector stores of PodInjections and namespaces and
//! the certificate resolver. Every connection runs in its own task, at most
//! [`Limits::max_connections`] at once; on shutdown the server drains (see [`run`]).

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
use tracing::{debug, info, warn};

use crate::admission;
use crate::metrics::Metrics;
use crate::tls::resolver::CertResolver;
use appset_process::admin;
use appset_process::readiness::Readiness;

/// What one replica takes on at once, and how it shuts down. HTTP/1 serves one request at a
/// time per connection, so `max_connections` also bounds the requests in flight; the request
/// bodies held in memory at once are bounded by `body_budget`, whatever the number of clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open connections; more wait in the listen backlog.
    pub max_connections: usize,
    /// The largest request body (413 above it, before reading it).
    pub max_body: usize,
    /// Bytes of request bodies held at once, across all connections.
    pub body_budget: usize,
    /// How long a request body may take to arrive (408 after), and the longest wait for room
    /// in the body budget (503 after).
    pub body_timeout: Duration,
    /// How long the server keeps serving after shutdown begins, with `/readyz` failing and every
    /// response closing its connection, so that the endpoints drop the replica and the API
    /// server stops reusing its connections before they close.
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_body: 3 * 1024 * 1024,
            body_budget: 64 * 1024 * 1024,
            body_timeout: Duration::from_secs(10),
            drain: Duration::from_secs(15),
        }
    }
}

/// Bodies up to this size (every ordinary pod's AdmissionReview) may also draw on the reserve.
pub const SMALL_BODY: usize = 128 * 1024;

/// The request bodies' memory budget and the draining flag, shared by every connection.
///
/// An eighth of the budget is a reserve that only small bodies ([`SMALL_BODY`]) may use once
/// the rest is taken, so clients that hold large bodies (slowly sent, or simply many) cannot
/// keep the API server's ordinary reviews waiting.
#[derive(Debug)]
pub struct Gate {
    /// The limits in force.
    pub limits: Limits,
    draining: std::sync::atomic::AtomicBool,
    /// Permits of 1 KiB of request body.
    budget: tokio::sync::Semaphore,
    /// Permits of 1 KiB, for small bodies only.
    reserve: tokio::sync::Semaphore,
}

impl Gate {
    /// A gate enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        let kib = limits.body_budget.div_ceil(1024).min(u32::MAX as usize);
        let reserve = (kib / 8).max(1);
        Self {
            limits,
            draining: Default::default(),
            budget: tokio::sync::Semaphore::new(kib.saturating_sub(reserve).max(1)),
            reserve: tokio::sync::Semaphore::new(reserve),
        }
    }

    /// Whether shutdown has begun.
    pub fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Acquire)
    }

    fn start_drain(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Room for a body of `declared` bytes (the largest body when unknown), waiting at most the
    /// body timeout; a small body takes room in the reserve when the budget is full.
    async fn hold(&self, declared: Option<usize>) -> Option<tokio::sync::SemaphorePermit<'_>> {
        let len = declared.unwrap_or(self.limits.max_body);
        let permits = self.permits_for(len);
        if let Ok(p) = self.budget.try_acquire_many(permits) {
            return Some(p);
        }
        let wait = async {
            if declared.is_some_and(|n| n <= SMALL_BODY) {
                tokio::select! {
                    p = self.budget.acquire_many(permits) => p,
                    p = self.reserve.acquire_many(permits) => p,
                }
            } else {
                self.budget.acquire_many(permits).await
            }
        };
        tokio::time::timeout(self.limits.body_timeout, wait)
            .await
            .ok()?
            .ok()
    }

    /// KiB permits for a body of `len` bytes (at most the largest body, at least 1 KiB).
    fn permits_for(&self, len: usize) -> u32 {
        let len = len.min(self.limits.max_body).max(1);
        u32::try_from(len.div_ceil(1024)).unwrap_or(u32::MAX)
    }
}

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
    /// The limits and the draining flag.
    pub gate: Gate,
    /// When set, admission reviews are answered only on connections whose client certificate
    /// verified against these roots (`--client-ca-file`).
    pub client_roots: Option<Arc<rustls::RootCertStore>>,
}

/// Marks a request that came on a connection with a verified client certificate.
#[derive(Clone, Copy, Debug)]
pub struct VerifiedClient;

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
                !ns.metadata
                    .labels
                    .as_ref()
                    .is_some_and(crate::matching::namespace_enabled)
            })
        })
    }

    /// `/readyz`: a serving certificate must be loaded and every readiness gate closed.
    pub fn readyz(&self) -> admin::Answer {
        if self.gate.draining() {
            return admin::unavailable("draining: shutting down");
        }
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
        (&Method::POST, "/mutate-pods" | "/pin-config")
            if state.client_roots.is_some()
                && req.extensions().get::<VerifiedClient>().is_none() =>
        {
            state.metrics.error("unauthenticated", 0.0);
            text(
                StatusCode::FORBIDDEN,
                "admission reviews need a client certificate of the configured client CA\n",
            )
        }
        (&Method::POST, path @ ("/mutate-pods" | "/pin-config")) => {
            let pin = path == "/pin-config";
            match read_body(&state, req).await {
                Ok(body) if pin => pin_review(&state, &body),
                Ok(body) => review(&state, &body),
                Err(refusal) => {
                    state.metrics.error("body", 0.0);
                    refusal
                }
            }
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

/// Reads a request body within the limits: 413 when it says (or turns out) to be above the
/// largest body, 503 when the body budget has no room for it in time, 408 when it does not
/// arrive in time, 400 when it breaks off.
async fn read_body(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<Bytes, Response<Full<Bytes>>> {
    let limits = state.gate.limits;
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body above {} bytes\n", limits.max_body),
        )
    };
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limits.max_body) {
        return Err(too_large());
    }
    let _held = match state.gate.hold(declared).await {
        Some(p) => p,
        None => {
            return Err(text(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many request bodies in flight\n",
            ));
        }
    };
    let read = Limited::new(req.into_body(), limits.max_body).collect();
    match tokio::time::timeout(limits.body_timeout, read).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Ok(Err(_)) => Err(text(
            StatusCode::BAD_REQUEST,
            "cannot read the request body\n",
        )),
        Err(_) => Err(text(
            StatusCode::REQUEST_TIMEOUT,
            "the request body did not arrive in time\n",
        )),
    }
}

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
            json_response(bytes)
        }
        Err(e) => {
            state
                .metrics
                .error("bad_request", start.elapsed().as_secs_f64());
            text(StatusCode::BAD_REQUEST, format!("{e}\n"))
        }
    }
}

/// Reviews one body for `/pin-config`: the AdmissionReview response, or 400. Reads nothing but
/// the body; logs the outcome and the denial message (the annotation's keys and names), never
/// the pod.
pub fn pin_review(state: &AppState, body: &[u8]) -> Response<Full<Bytes>> {
    let start = Instant::now();
    match admission::respond_pin(body) {
        Ok((decision, bytes)) => {
            state
                .metrics
                .observe_pin(&decision, start.elapsed().as_secs_f64());
            match &decision {
                admission::PinDecision::Pin { ops, .. } => {
                    debug!(references = ops.len(), "pod pinned to its config snapshots")
                }
                admission::PinDecision::Deny {
                    message, dry_run, ..
                } => debug!(%message, dry_run, "pod denied: malformed config snapshots"),
                admission::PinDecision::Invalid { message, .. } => {
                    warn!(%message, "unreadable object in an admission request")
                }
                admission::PinDecision::Allow { .. } => {}
            }
            json_response(bytes)
        }
        Err(e) => {
            state
                .metrics
                .error("bad_request", start.elapsed().as_secs_f64());
            text(StatusCode::BAD_REQUEST, format!("{e}\n"))
        }
    }
}

/// A 200 with a JSON body.
fn json_response(bytes: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The TLS configuration could not be built.
    #[error("cannot build the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Serves HTTPS on `listener`. When `shutdown` completes the server drains: for
/// `limits.drain` it keeps accepting and answering, with `/readyz` failing and every response
/// asking for its connection to be closed (`Connection: close`), so the API server opens fresh
/// connections (to other replicas, once the endpoints dropped this one) instead of sending on
/// one that is about to close; then it stops accepting, lets each connection finish its current
/// request, and waits for them for at most five seconds.
pub async fn run(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    let acceptor = TlsAcceptor::from(state.resolver.server_config(state.client_roots.clone())?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let slots = Arc::new(tokio::sync::Semaphore::new(
        state.gate.limits.max_connections.max(1),
    ));
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    let mut drain_until: Option<tokio::time::Instant> = None;
    loop {
        let accept = async {
            let slot = slots.clone().acquire_owned().await;
            (slot, listener.accept().await)
        };
        let (slot, tcp, peer) = tokio::select! {
            () = &mut shutdown, if drain_until.is_none() => {
                state.gate.start_drain();
                info!(drain = ?state.gate.limits.drain, "shutting down: draining");
                drain_until = Some(tokio::time::Instant::now() + state.gate.limits.drain);
                continue;
            }
            () = sleep_until_or_never(drain_until) => break,
            (slot, accepted) = accept => match (slot, accepted) {
                (Ok(slot), Ok((tcp, peer))) => (slot, tcp, peer),
                (_, Err(e)) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                (Err(_), _) => break,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        let mut stop = stop_rx.clone();
        conns.spawn(async move {
            let _slot = slot;
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
            // The handshake verified any certificate the client sent.
            let verified = tls.get_ref().1.peer_certificates().is_some();
            let svc = service_fn(move |mut req: Request<Incoming>| {
                let state = state.clone();
                if verified {
                    req.extensions_mut().insert(VerifiedClient);
                }
                async move {
                    let mut response = handle(state.clone(), req).await;
                    if state.gate.draining() {
                        response.headers_mut().insert(
                            hyper::header::CONNECTION,
                            hyper::header::HeaderValue::from_static("close"),
                        );
                    }
                    Ok::<_, Infallible>(response)
                }
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

/// Completes at `at`, or never when there is no `at`.
async fn sleep_until_or_never(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
