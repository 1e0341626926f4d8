//! The appset injection webhook.
//!
//! A mutating admission webhook on Pod CREATE that injects the init containers, emptyDir volumes
//! and mounts declared in `PodInjection` resources (`/mutate-pods`), and that points a pod's
//! ConfigMap and Secret references at the snapshots named in its `appset.dev/config-snapshots`
//! annotation (`/pin-config`, [`pin`]: a function of the pod alone). Data flow:
//!
//! ```text
//!                 PodInjection watch ──▶ reflector store ─┐
//!                 Namespace metadata watch ──▶ store ─────┤ (memory only)
//! API server ──HTTPS──▶ server ──body──▶ admission::respond ──▶ matching ──▶ plan ──▶ patch
//!                 ▲
//!   certificate Secret ◀──▶ tls::manager ──▶ resolver (swapped on renewal)
//!                                      └──▶ MutatingWebhookConfiguration caBundle
//! ```
//!
//! * [`matching`], [`plan`], [`pin`], [`patch`] and [`admission`] are pure: the answer to a request is a
//!   function of the request body and the objects in memory, with no API call on the request
//!   path.
//! * [`server`] is the HTTPS server; [`tls`] keeps its certificate; [`metrics`] counts;
//!   [`events`] reports denials on the PodInjections involved.
//! * [`serve`] wires them to a cluster; the `appset-webhook` binary is a thin wrapper around it.
//!
//! Failure modes this design rules out: only namespaces labelled `appset.dev/injection=enabled`
//! are sent to the webhook (so an outage cannot block system pods or the webhook's own), and
//! the API server's selector is trusted over the webhook's own namespace cache (a lagging cache
//! cannot skip an injection); a dry run has no side effects (no Event); lists
//! are appended to and never replaced, pointers are RFC 6901-escaped, and a pod that would not get
//! what it asked for is denied with a message rather than admitted without it.

pub mod admission;
pub mod events;
pub mod matching;
pub mod metrics;
pub mod patch;
pub mod pin;
pub mod plan;
pub mod probe;
pub mod server;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use appset_crds::PodInjection;
use futures::{StreamExt, future};
use k8s_openapi::api::core::v1::Namespace;
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use tokio::net::TcpListener;
use tracing::{info, warn};

use appset_process::readiness::Readiness;

use crate::metrics::Metrics;
use crate::server::AppState;
use crate::tls::manager::{TlsConfig, TlsManager};
use crate::tls::resolver::CertResolver;

/// How the webhook runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen (ignored by [`serve_on`]).
    pub listen: SocketAddr,
    /// The certificate Secret and the webhook configuration to keep current.
    pub tls: TlsConfig,
    /// Watch PodInjections in this namespace only (all namespaces when `None`).
    pub watch_namespace: Option<String>,
    /// Connection, body and drain limits of the HTTPS server.
    pub limits: server::Limits,
    /// Keep a cache of namespace labels, compared with the API server's `namespaceSelector` on
    /// each request (a disagreement is counted, never acted on); readiness waits for it.
    pub namespace_cache: bool,
    /// A PEM file of CAs: admission reviews are then answered only to clients presenting a
    /// certificate they signed (the API server's, configured through its admission
    /// configuration). Read once at start-up.
    pub client_ca_file: Option<std::path::PathBuf>,
}

/// The roots of the client CA file.
fn client_roots(path: &std::path::Path) -> Result<Arc<rustls::RootCertStore>, Error> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let bad = |why: String| Error::Config(format!("client CA file {}: {why}", path.display()));
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    Ok(Arc::new(roots))
}

/// Errors that stop the webhook.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listen address could not be bound.
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
    /// The configuration is incoherent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The server failed to start.
    #[error(transparent)]
    Server(#[from] server::ServerError),
}

/// Binds `config.listen` and serves until `shutdown` completes.
pub async fn serve(
    config: Config,
    client: Client,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::Bind(config.listen, e))?;
    serve_on(listener, config, client, shutdown).await
}

/// Serves on an already bound listener until `shutdown` completes: watches PodInjections (and
/// namespaces), keeps the certificates, and answers admission requests.
pub async fn serve_on(
    listener: TcpListener,
    config: Config,
    client: Client,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    config.tls.policy.check().map_err(Error::Config)?;
    let client_roots = config
        .client_ca_file
        .as_deref()
        .map(client_roots)
        .transpose()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let api: Api<PodInjection> = match &config.watch_namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (injections, writer) = reflector::store();
    let pi_stream = reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    )
    .for_each(|ev| {
        if let Err(e) = ev {
            warn!(error = %e, "PodInjection watch error; retrying");
        }
        future::ready(())
    });
    let mut tasks = tokio::task::JoinSet::new();
    let s = stopped();
    tasks.spawn(async move {
        tokio::select! { () = pi_stream => {}, () = s => {} }
    });

    let namespaces = if config.namespace_cache {
        let (store, writer) = reflector::store();
        let stream = reflector(
            writer,
            watcher(
                Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
                watcher::Config::default(),
            )
            .default_backoff(),
        )
        .for_each(|ev| {
            if let Err(e) = ev {
                warn!(error = %e, "Namespace watch error; retrying");
            }
            future::ready(())
        });
        let s = stopped();
        tasks.spawn(async move {
            tokio::select! { () = stream => {}, () = s => {} }
        });
        Some(store)
    } else {
        None
    };

    let (denials, denial_rx) = events::channel(256);
    let s = stopped();
    let events_client = client.clone();
    tasks.spawn(async move {
        tokio::select! { () = events::publish(events_client, denial_rx) => {}, () = s => {} }
    });

    let resolver = Arc::new(CertResolver::new());
    let readiness = Readiness::new();
    let synced = readiness.handle("PodInjection watch");
    if let Some(store) = namespaces.clone() {
        let ns_synced = readiness.handle("Namespace watch");
        let s = stopped();
        tasks.spawn(async move {
            tokio::select! {
                r = store.wait_until_ready() => {
                    if r.is_ok() {
                        ns_synced.ready();
                    }
                }
                () = s => {}
            }
        });
    }
    let metrics = Metrics::new();
    let tls_metrics = metrics.tls();
    let state = Arc::new(AppState {
        injections: injections.clone(),
        namespaces,
        resolver: resolver.clone(),
        metrics,
        readiness: readiness.clone(),
        denials: Some(denials),
        gate: server::Gate::new(config.limits),
        client_roots,
    });

    let s = stopped();
    tasks.spawn(async move {
        tokio::select! {
            r = injections.wait_until_ready() => {
                if r.is_ok() {
                    synced.ready();
                    info!("PodInjection watch synced");
                }
            }
            () = s => {}
        }
    });

    let manager = TlsManager::new(client, config.tls.clone(), resolver, tls_metrics);
    tasks.spawn(manager.run(stopped()));

    info!(addr = ?listener.local_addr().ok(), "serving admission reviews");
    let result = server::run(listener, state, shutdown).await;
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    result.map_err(Error::from)
}
