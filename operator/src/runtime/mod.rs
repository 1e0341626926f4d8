//! The operator process: flags and environment, the shared hash key, the admin endpoints
//! (`/metrics`, `/healthz`, `/readyz`), leader election, and graceful shutdown. Logging,
//! signals and the admin endpoints come from the process shell both binaries share
//! (`appset-process`).
//!
//! Flow of [`main`]: parse [`Options`] → set up logging → build the clients (the controllers'
//! one passes the leader fence, see [`lease`] and [`client`]) → start the HTTP server (it
//! answers `/healthz` from the loops' heartbeats; `/readyz` while this replica waits for the
//! leader Lease, and once it leads, only after every watch has listed) → wait for the leader
//! Lease (when `--leader-elect`) → read (or create) the hash key, then follow its Secret live
//! → run the one ConfigMap/Secret metadata watch ([`crate::sourcewatch`]) and both controllers
//! until SIGTERM/SIGINT (then release the Lease) or the loss of leadership (then the
//! controllers are cancelled and the process exits with an error).
//!
//! [`run`] is the same without process concerns (logging, signals). The e2e tests and the
//! benchmarks call it, or each controller's `run` directly, in-process.

pub mod client;
pub mod duration;
pub mod lease;
pub mod process_metrics;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use appset_process::liveness::Liveness;
use appset_process::logging::{self, LogFormat};
use appset_process::readiness::{Readiness, ReadyHandle};
use appset_process::{admin, signal};
use clap::Parser;
use futures::{FutureExt, StreamExt};
use kube::Client;
use prometheus_client::registry::Registry;
use tracing::{error, info};

use crate::config::controller::Settings;
use crate::config::metrics::Metrics;
use crate::config::rollout::Policy;
use crate::confighash::fetch::{self, FetchError};
use crate::confighash::keyring::DEFAULT_SECRET_NAME;
use crate::confighash::live::{self, LiveKeyring};
use crate::kubeapi::Scope;
use crate::sourcewatch::SourceWatch;

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
    /// Allow `appset.dev/config-rollout: snapshot`: immutable copies of each revision's
    /// ConfigMaps and Secrets (needs create/update on them, and list on ReplicaSets).
    #[arg(long, env = "APPSET_CONFIG_SNAPSHOTS")]
    pub config_snapshots: bool,
    /// How many workloads are reconciled at once.
    #[arg(long, env = "APPSET_CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,
    /// Address of the metrics and health endpoints.
    #[arg(long, env = "APPSET_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Log format; the level comes from RUST_LOG (default `info`).
    #[arg(long, env = "APPSET_LOG_FORMAT", value_enum, default_value_t = LogFormat::default())]
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
    /// How long a standby waits, after it last saw the leader renew, before taking over.
    #[arg(long, env = "APPSET_LEASE_DURATION", default_value = "15s", value_parser = duration::parse)]
    pub lease_duration: Duration,
    /// How long the leader keeps writing without a successful renew; shorter than the lease.
    #[arg(long, env = "APPSET_RENEW_DEADLINE", default_value = "10s", value_parser = duration::parse)]
    pub renew_deadline: Duration,
    /// How long a controller loop or the Lease loop may have work waiting with no progress
    /// before `/healthz` fails (and the kubelet restarts the container).
    #[arg(long, env = "APPSET_LIVENESS_TIMEOUT", default_value = "2m", value_parser = duration::parse)]
    pub liveness_timeout: Duration,
    /// How often the leader renews and a standby looks at the Lease.
    #[arg(long, env = "APPSET_RETRY_PERIOD", default_value = "2s", value_parser = duration::parse)]
    pub retry_period: Duration,
}

impl Options {
    /// `--coalesce-window` and `--min-rollout-interval`, which pace both controllers.
    pub fn pacing(&self) -> Policy {
        Policy {
            window: self.coalesce_window,
            min_interval: self.min_rollout_interval,
        }
    }

    /// The namespaces both controllers watch.
    pub fn scope(&self) -> Scope {
        Scope::from_list(&self.namespaces)
    }

    /// The config rollout controller's settings.
    pub fn settings(&self) -> Settings {
        Settings {
            scope: self.scope(),
            policy: self.pacing(),
            reloader_compat: self.reloader_compat,
            snapshots: self.config_snapshots,
            concurrency: self.concurrency.max(1),
            instance: Some(self.identity()),
            namespace_selector: self
                .namespace_selector
                .clone()
                .filter(|s| !s.trim().is_empty()),
            liveness: None,
            ..Settings::default()
        }
    }

    /// The AppSet controller's settings. It watches `--namespaces` (every namespace when
    /// empty); `--namespace-selector` applies to config rollout only; `--coalesce-window` and
    /// `--min-rollout-interval` pace config-driven AppSet revisions too.
    pub fn appset_settings(&self) -> crate::appset::controller::Settings {
        crate::appset::controller::Settings {
            scope: self.scope(),
            concurrency: self.concurrency.max(1),
            instance: Some(self.identity()),
            pacing: self.pacing(),
            snapshots: self.config_snapshots,
            ..Default::default()
        }
    }

    /// `--lease-duration`, `--renew-deadline` and `--retry-period`.
    pub fn timing(&self) -> lease::Timing {
        lease::Timing {
            lease_duration: self.lease_duration,
            renew_deadline: self.renew_deadline,
            retry_period: self.retry_period,
        }
    }

    /// This replica's identity: `--identity`, else the host name.
    pub fn identity(&self) -> String {
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
    /// The config hash key could not be read or created.
    #[error("cannot set up the config hash key: {0}")]
    Keyring(#[from] FetchError),
    /// Leadership was lost; the process exits so that it restarts as a follower.
    #[error("lost the leader Lease ({0:?}); the controllers were stopped")]
    LostLeadership(lease::Lost),
    /// The flags contradict each other.
    #[error("invalid flags: {0}")]
    Flags(String),
}

/// Runs the operator from `config` until `shutdown` completes: the HTTP endpoints, leader
/// election when asked for, and the controllers.
///
/// With `--leader-elect`, every request of the controllers passes the leader fence (see
/// [`lease`]): losing the Lease, or no renew within the renew deadline, closes it and cancels the
/// controllers, and this returns [`Error::LostLeadership`]. On `shutdown` the controllers stop
/// first (in-flight reconciles finish), then the Lease is released for a standby to take at
/// once.
pub async fn run(
    options: Options,
    config: kube::Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let timing = options.timing();
    if options.leader_elect {
        timing.check().map_err(Error::Flags)?;
    }
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let client_metrics = client::ClientMetrics::register(&mut registry);
    let process_metrics = process_metrics::ProcessMetrics::register(&mut registry);
    let identity = options.identity();
    let liveness = Liveness::new(options.liveness_timeout);
    // The Lease is read and written by a client of its own, outside the fence it opens.
    let lease_client = client::build(
        config.clone(),
        &identity,
        &lease::Fence::open(),
        &client_metrics,
    )
    .map_err(Error::Client)?;
    let elector = options.leader_elect.then(|| {
        lease::LeaderElector::new(
            lease_client,
            &options.operator_namespace,
            &options.lease_name,
            &identity,
            timing,
        )
        .with_heartbeat(liveness.register("leader Lease loop"))
    });
    let fence = elector
        .as_ref()
        .map_or_else(lease::Fence::open, lease::LeaderElector::fence);
    let client =
        client::build(config, &identity, &fence, &client_metrics).map_err(Error::Client)?;
    let readiness = Readiness::new();
    // Registered before anything starts, so /readyz cannot pass before the controllers exist.
    let rollout_ready = readiness.handle("config rollout controller");
    let appset_ready = readiness.handle("AppSet controller");
    let sources_ready = readiness.handle("source watch");
    let shutdown = shutdown.shared();

    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: options.listen,
            source,
        })?;
    info!(addr = %options.listen, "serving /metrics, /healthz and /readyz");
    let standby = Arc::new(AtomicBool::new(options.leader_elect));
    let app = admin::router(
        Arc::new(registry),
        readiness.clone(),
        liveness.clone(),
        standby.clone(),
    );
    let server_stop = shutdown.clone();
    let server = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app)
            .with_graceful_shutdown(server_stop)
            .await
        {
            error!(error = %err, "the HTTP server failed");
        }
    });

    let controllers = controllers(
        &options,
        client,
        metrics,
        liveness,
        [rollout_ready, appset_ready, sources_ready],
        shutdown.clone(),
    );
    let result = match &elector {
        Some(elector) => {
            tokio::select! {
                _ = elector.acquire() => {}
                _ = shutdown.clone() => { server.abort(); return Ok(()); }
            }
            standby.store(false, Ordering::Release);
            process_metrics.set_leader(true);
            // Dropping `controllers` when `keep` returns cancels every reconcile in flight;
            // the fence is closed already, so nothing they still try is sent.
            let result = tokio::select! {
                r = controllers => {
                    elector.release().await;
                    r
                }
                lost = elector.keep() => Err(Error::LostLeadership(lost)),
            };
            process_metrics.set_leader(false);
            result
        }
        None => {
            process_metrics.set_leader(true);
            let result = controllers.await;
            process_metrics.set_leader(false);
            result
        }
    };
    server.abort();
    result
}

/// Reads (or creates) the hash key, follows its Secret, and runs both controllers with it and
/// the one ConfigMap and Secret metadata watch they share, until `shutdown`.
async fn controllers(
    options: &Options,
    client: Client,
    metrics: Metrics,
    liveness: Liveness,
    [rollout_ready, appset_ready, sources_ready]: [ReadyHandle; 3],
    shutdown: impl Future<Output = ()> + Clone + Send + 'static,
) -> Result<(), Error> {
    let keyring = LiveKeyring::new(
        fetch::ensure_keyring(
            &client,
            &options.operator_namespace,
            &options.hash_key_secret,
        )
        .await?,
    );
    let follow_key = live::follow(
        client.clone(),
        &options.operator_namespace,
        &options.hash_key_secret,
        keyring.clone(),
    )
    .take_until(shutdown.clone())
    .for_each(|()| async {});
    let mut sources = SourceWatch::new(&options.scope());
    let rollout_sources = sources.subscribe_all();
    let appset_sources = sources.subscribe_all();
    let sources = sources.run(&client, &sources_ready, shutdown.clone());
    sources_ready.ready();
    tokio::join!(
        follow_key,
        sources,
        crate::config::watch::run_with_sources(
            client.clone(),
            Settings {
                liveness: Some(liveness.clone()),
                ..options.settings()
            },
            keyring.clone(),
            metrics,
            rollout_sources,
            rollout_ready,
            shutdown.clone(),
        ),
        crate::appset::controller::run_with_sources(
            client,
            crate::appset::controller::Settings {
                liveness: Some(liveness),
                ..options.appset_settings()
            },
            keyring,
            appset_sources,
            appset_ready,
            shutdown,
        ),
    );
    Ok(())
}

/// The binary's entry point: logging, a client from the environment, signals.
pub async fn main(options: Options) -> Result<(), Error> {
    logging::init(options.log_format);
    let config = kube::Config::infer()
        .await
        .map_err(|e| Error::Client(kube::Error::InferConfig(e)))?;
    run(options, config, signal::shutdown_signal()).await
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
        assert_eq!(s.scope, Scope::Namespaces(vec!["a".into(), "b".into()]));
        assert_eq!(o.appset_settings().scope, s.scope);
        assert_eq!(s.policy.window, Duration::from_secs(2));
        assert_eq!(s.policy.min_interval, Duration::from_secs(60));
        assert!(s.reloader_compat);
        assert_eq!(s.instance.as_deref(), Some("pod-0"));
        assert_eq!(o.hash_key_secret, DEFAULT_SECRET_NAME);
        assert_eq!(s.namespace_selector.as_deref(), Some("team=a"));
    }

    #[test]
    fn defaults_watch_every_namespace() {
        let o = Options::try_parse_from(["appset-operator"]).unwrap();
        assert_eq!(o.settings().scope, Scope::All);
        assert_eq!(o.log_format, LogFormat::Json);
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
