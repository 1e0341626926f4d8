//! The operator process: flags and environment, logging, the HTTP endpoints (`/metrics`,
//! `/healthz`, `/readyz`), leader election, and graceful shutdown.
//!
//! Flow of [`main`]: parse [`Options`] → set up logging → build a client → start the HTTP server
//! (it answers `/healthz` at once; `/readyz` while this replica waits for the leader Lease, and
//! once it leads, only after the controllers' caches have synced) → wait for the leader Lease
//! (when `--leader-elect`) → run the controllers (config rollout and AppSet) until SIGTERM/SIGINT
//! or the loss of leadership → stop the server.
//!
//! [`run`] is the same without process concerns (logging, signals): the e2e tests and the
//! benchmark call it, or [`crate::config::controller::run`] directly, in-process.

pub mod duration;
pub mod lease;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use clap::{Parser, ValueEnum};
use futures::FutureExt;
use kube::Client;
use prometheus_client::registry::Registry;
use tracing::{error, info};

use crate::config::controller::{self as rollout, Readiness, Settings};
use crate::config::keyring::DEFAULT_SECRET_NAME;
use crate::config::metrics::Metrics;
use crate::config::rollout::Policy;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

/// The operator's flags; each can also be given in the environment variable shown.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "appset-operator",
    version,
    about = "appset: config rollout and the AppSet controller"
)]
pub struct Options {
    /// Namespaces to watch, comma-separated; empty watches every namespace.
    #[arg(
        long,
        env = "APPSET_NAMESPACES",
        value_delimiter = ',',
        default_value = ""
    )]
    pub namespaces: Vec<String>,
    /// A label selector over namespaces (e.g. `team=payments`): only workloads in namespaces it
    /// matches are handled, followed live. Needs list/watch on namespaces.
    #[arg(long, env = "APPSET_NAMESPACE_SELECTOR")]
    pub namespace_selector: Option<String>,
    /// The operator's own namespace: home of the hash key Secret and the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "appset-system")]
    pub operator_namespace: String,
    /// Name of the Secret holding the config hash key (created when absent).
    #[arg(long, env = "APPSET_HASH_KEY_SECRET", default_value = DEFAULT_SECRET_NAME)]
    pub hash_key_secret: String,
    /// How long to gather changes to a workload's sources before one rollout (e.g. 5s, 500ms).
    #[arg(long, env = "APPSET_COALESCE_WINDOW", default_value = "5s", value_parser = duration::parse)]
    pub coalesce_window: Duration,
    /// The shortest time between two rollouts of one workload.
    #[arg(long, env = "APPSET_MIN_ROLLOUT_INTERVAL", default_value = "30s", value_parser = duration::parse)]
    pub min_rollout_interval: Duration,
    /// Also honour stakater/Reloader's annotations.
    #[arg(long, env = "APPSET_RELOADER_COMPAT")]
    pub reloader_compat: bool,
    /// How many workloads are reconciled at once.
    #[arg(long, env = "APPSET_CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,
    /// Address of the metrics and health endpoints.
    #[arg(long, env = "APPSET_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Log format; the level comes from RUST_LOG (default `info`).
    #[arg(long, env = "APPSET_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Elect a leader through a Lease so that only one replica reconciles.
    #[arg(long, env = "APPSET_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(long, env = "APPSET_LEASE_NAME", default_value = "appset-operator")]
    pub lease_name: String,
    /// This replica's identity (for Events and the Lease); defaults to the host name.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
}

impl Options {
    /// The config rollout controller's settings.
    pub fn settings(&self) -> Settings {
        Settings {
            namespaces: self
                .namespaces
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            policy: Policy {
                window: self.coalesce_window,
                min_interval: self.min_rollout_interval,
            },
            reloader_compat: self.reloader_compat,
            key_namespace: self.operator_namespace.clone(),
            key_secret: self.hash_key_secret.clone(),
            concurrency: self.concurrency.max(1),
            instance: Some(self.identity()),
            namespace_selector: self
                .namespace_selector
                .clone()
                .filter(|s| !s.trim().is_empty()),
        }
    }

    /// The AppSet controller's settings. It watches `--namespaces` (every namespace when
    /// empty); `--namespace-selector` applies to config rollout only.
    pub fn appset_settings(&self) -> crate::appset::controller::Settings {
        let mut s = crate::appset::controller::Settings::new(self.operator_namespace.clone());
        let namespaces: Vec<String> = self
            .namespaces
            .iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect();
        s.namespaces = (!namespaces.is_empty()).then_some(namespaces);
        s.key_secret = self.hash_key_secret.clone();
        s.concurrency = self.concurrency.max(1);
        s.instance = Some(self.identity());
        s
    }

    fn identity(&self) -> String {
        self.identity
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| format!("appset-operator-{}", std::process::id()))
    }
}

/// Errors that stop the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable kubeconfig or in-cluster configuration.
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// The metrics/health address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config rollout controller could not start.
    #[error(transparent)]
    Rollout(#[from] rollout::RunError),
    /// The AppSet controller could not start.
    #[error("AppSet controller: {0}")]
    AppSet(#[from] crate::appset::controller::RunError),
    /// Leadership was lost; the process exits so that it restarts as a follower.
    #[error("lost the leader Lease")]
    LostLeadership,
}

/// Sets up `tracing` with RUST_LOG (default `info`) in the chosen format.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    info!("shutdown signal received");
}

#[derive(Clone)]
struct Http {
    registry: Arc<Registry>,
    readiness: Readiness,
    standby: Arc<AtomicBool>,
}

async fn metrics(State(http): State<Http>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &http.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            "cannot encode metrics\n".to_string(),
        ),
    }
}

async fn readyz(State(http): State<Http>) -> impl IntoResponse {
    // A replica waiting for the leader Lease is healthy and ready to take over: reporting it
    // unready would keep a Deployment of several replicas from ever completing its rollout.
    if http.standby.load(Ordering::Acquire) {
        (StatusCode::OK, "standby\n")
    } else if http.readiness.is_ready() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced\n")
    }
}

/// The HTTP router for `/metrics`, `/healthz` and `/readyz`. `/readyz` answers 200 while
/// `standby` is set (a replica waiting for leadership), else once the caches have synced.
pub fn router(registry: Arc<Registry>, readiness: Readiness, standby: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Http {
            registry,
            readiness,
            standby,
        })
}

/// Runs the operator with `client` until `shutdown` completes: the HTTP endpoints, leader
/// election when asked for, and the controllers.
pub async fn run(
    options: Options,
    client: Client,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let readiness = Readiness::default();
    let shutdown = shutdown.shared();

    let settings = options.settings();
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: options.listen,
            source,
        })?;
    info!(addr = %options.listen, "serving /metrics, /healthz and /readyz");
    let standby = Arc::new(AtomicBool::new(options.leader_elect));
    let app = router(Arc::new(registry), readiness.clone(), standby.clone());
    let server_stop = shutdown.clone();
    let server = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app)
            .with_graceful_shutdown(server_stop)
            .await
        {
            error!(error = %err, "the HTTP server failed");
        }
    });

    let mut lost = false;
    let appset_settings = options.appset_settings();
    let controllers = async {
        tokio::try_join!(
            async {
                rollout::run(
                    client.clone(),
                    settings,
                    metrics,
                    readiness.clone(),
                    shutdown.clone(),
                )
                .await
                .map_err(Error::from)
            },
            async {
                crate::appset::controller::run(client.clone(), appset_settings, shutdown.clone())
                    .await
                    .map_err(Error::from)
            },
        )
        .map(|_| ())
    };
    let result = if options.leader_elect {
        let elector = lease::LeaderElector::new(
            client.clone(),
            &options.operator_namespace,
            &options.lease_name,
            &options.identity(),
            Duration::from_secs(15),
        );
        tokio::select! {
            _ = elector.acquire(Duration::from_secs(2)) => {}
            _ = shutdown.clone() => { server.abort(); return Ok(()); }
        }
        standby.store(false, Ordering::Release);
        tokio::select! {
            r = controllers => r,
            _ = elector.keep(Duration::from_secs(5)) => { lost = true; Ok(()) }
        }
    } else {
        controllers.await
    };
    server.abort();
    if lost {
        return Err(Error::LostLeadership);
    }
    result
}

/// The binary's entry point: logging, a client from the environment, signals.
pub async fn main(options: Options) -> Result<(), Error> {
    init_logging(options.log_format);
    let client = Client::try_default().await.map_err(Error::Client)?;
    run(options, client, shutdown_signal()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_map_to_settings() {
        let o = Options::try_parse_from([
            "appset-operator",
            "--namespaces",
            "a, b,,",
            "--coalesce-window",
            "2s",
            "--min-rollout-interval",
            "1m",
            "--reloader-compat",
            "--identity",
            "pod-0",
            "--namespace-selector",
            "team=a",
        ])
        .unwrap();
        let s = o.settings();
        assert_eq!(s.namespaces, ["a", "b"]);
        assert_eq!(s.policy.window, Duration::from_secs(2));
        assert_eq!(s.policy.min_interval, Duration::from_secs(60));
        assert!(s.reloader_compat);
        assert_eq!(s.instance.as_deref(), Some("pod-0"));
        assert_eq!(s.key_secret, DEFAULT_SECRET_NAME);
        assert_eq!(s.namespace_selector.as_deref(), Some("team=a"));
    }

    #[test]
    fn defaults_watch_every_namespace() {
        let o = Options::try_parse_from(["appset-operator"]).unwrap();
        assert!(o.settings().namespaces.is_empty());
        assert_eq!(o.coalesce_window, Duration::from_secs(5));
        assert!(!o.reloader_compat);
    }

    #[test]
    fn bad_durations_are_rejected() {
        let err =
            Options::try_parse_from(["appset-operator", "--coalesce-window", "soon"]).unwrap_err();
        assert!(err.to_string().contains("not a duration"), "{err}");
    }
}
