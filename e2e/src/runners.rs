//! In-process runners: the AppSet controller, the config rollout controller and the injection
//! webhook, each started in a task of the test process, scoped to one test namespace, and
//! returned only once it is ready.
//!
//! A runner waits on the same readiness gates `/readyz` reads ([`Readiness`]): a controller
//! runner returns after every watch has completed its first list, the webhook runner after the
//! `caBundle` is published and `/readyz` answers 200. Each runner stops its task on
//! [`stop`](AppSetController::stop) (waiting for a graceful end) or when dropped (at once).
//!
//! The controllers hash config with a key read from (or created in) the test namespace's
//! hash-key Secret, as the operator does at start-up, so that two runners started one after the
//! other in a namespace share the key.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use appset_operator::appset::controller as appset_controller;
use appset_operator::config::controller as rollout_controller;
use appset_operator::config::index::WorkloadKind;
use appset_operator::config::metrics::Metrics;
use appset_operator::config::watch as rollout_watch;
use appset_operator::confighash::fetch::ensure_keyring;
use appset_operator::confighash::keyring::{DEFAULT_SECRET_NAME, Keyring};
use appset_operator::kubeapi::Scope;
use appset_operator::pacing;
use appset_process::readiness::Readiness;
use appset_webhook::probe::Probe;
use appset_webhook::tls::manager::TlsConfig;
use appset_webhook::tls::material::Policy;
use hyper::{Method, StatusCode};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{TestNamespace, wait_for};

/// How long a runner waits for readiness before it gives up.
pub const READY_DEADLINE: Duration = Duration::from_secs(60);
/// How long [`AppSetController::stop`] and friends wait for a graceful end.
const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// The hash key of the namespace, read or created as the operator does at start-up.
pub async fn keyring(client: &Client, namespace: &str) -> Result<Arc<Keyring>> {
    let keyring = ensure_keyring(client, namespace, DEFAULT_SECRET_NAME)
        .await
        .with_context(|| format!("set up the hash key in {namespace}"))?;
    Ok(Arc::new(keyring))
}

/// Waits until no readiness gate is open, naming the open ones when the deadline passes.
pub async fn wait_ready(readiness: &Readiness, what: &str) -> Result<()> {
    if tokio::time::timeout(READY_DEADLINE, readiness.wait())
        .await
        .is_err()
    {
        bail!(
            "{what} not ready after {READY_DEADLINE:?}; waiting for: {}",
            readiness.pending().join(", ")
        );
    }
    Ok(())
}

/// A task that runs until told to stop.
struct Task {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Task {
    fn spawn<F, Fut>(run: F) -> Self
    where
        F: FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = Box::pin(async move {
            let _ = stopped.await;
        });
        Self {
            stop: Some(stop),
            task: Some(tokio::spawn(run(shutdown))),
        }
    }

    fn alive(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    async fn stop(mut self, what: &str) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(STOP_DEADLINE, task)
                .await
                .with_context(|| format!("{what} did not stop within {STOP_DEADLINE:?}"))?
                .with_context(|| format!("{what} panicked"))?;
        }
        Ok(())
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The AppSet controller, scoped to one namespace.
pub struct AppSetController {
    task: Task,
}

impl AppSetController {
    /// Starts the controller for `ns` with [`AppSetController::settings`]; returns once it is
    /// ready.
    pub async fn start(ns: &TestNamespace) -> Result<Self> {
        Self::start_with(ns, Self::settings(ns)).await
    }

    /// The default settings, scoped to `ns`, with the tests' short pacing of config-driven
    /// rollouts (a 1 s window and a 3 s minimum interval, as the config rollout tests use).
    pub fn settings(ns: &TestNamespace) -> appset_controller::Settings {
        appset_controller::Settings {
            scope: Scope::namespace(&ns.name),
            pacing: pacing::Policy {
                window: Duration::from_secs(1),
                min_interval: Duration::from_secs(3),
            },
            ..Default::default()
        }
    }

    /// Starts the controller with `settings`; returns once it is ready.
    pub async fn start_with(
        ns: &TestNamespace,
        settings: appset_controller::Settings,
    ) -> Result<Self> {
        let keyring = keyring(&ns.client, &ns.name).await?;
        let readiness = Readiness::new();
        let ready = readiness.handle("AppSet controller");
        let client = ns.client.clone();
        let task = Task::spawn(move |shutdown| {
            appset_controller::run(client, settings, keyring, ready, shutdown)
        });
        wait_ready(&readiness, "the AppSet controller").await?;
        Ok(Self { task })
    }

    /// Whether the controller is still running.
    pub fn alive(&self) -> bool {
        self.task.alive()
    }

    /// Stops the controller and waits for it to end.
    pub async fn stop(self) -> Result<()> {
        self.task.stop("the AppSet controller").await
    }
}

/// The config rollout controller.
pub struct ConfigRollout {
    task: Task,
    /// The controller's metrics.
    pub metrics: Metrics,
}

impl ConfigRollout {
    /// Settings scoped to `ns`, otherwise the defaults.
    pub fn settings(ns: &TestNamespace) -> rollout_controller::Settings {
        rollout_controller::Settings {
            scope: Scope::namespace(&ns.name),
            ..Default::default()
        }
    }

    /// Starts the controller with `settings`, hashing with `ns`'s key; returns once it is
    /// ready.
    pub async fn start(ns: &TestNamespace, settings: rollout_controller::Settings) -> Result<Self> {
        let keyring = keyring(&ns.client, &ns.name).await?;
        let metrics = Metrics::default();
        let readiness = Readiness::new();
        let ready = readiness.handle("config rollout controller");
        let client = ns.client.clone();
        let m = metrics.clone();
        let task = Task::spawn(move |shutdown| {
            rollout_watch::run(client, settings, keyring, m, ready, shutdown)
        });
        wait_ready(&readiness, "the config rollout controller").await?;
        Ok(Self { task, metrics })
    }

    /// Whether the controller is still running.
    pub fn alive(&self) -> bool {
        self.task.alive()
    }

    /// Rollouts made so far for `kind`.
    pub fn rollouts(&self, kind: WorkloadKind) -> u64 {
        self.metrics.rollouts.get_or_create(&kind.into()).get()
    }

    /// Reconciles run so far for `kind`.
    pub fn reconciles(&self, kind: WorkloadKind) -> u64 {
        self.metrics.reconciles.get_or_create(&kind.into()).get()
    }

    /// Baselines written so far for `kind` (writes that roll nothing).
    pub fn baselines(&self, kind: WorkloadKind) -> u64 {
        self.metrics.baselines.get_or_create(&kind.into()).get()
    }

    /// Sources read with a GET so far for `kind`.
    pub fn source_reads(&self, kind: WorkloadKind) -> u64 {
        self.metrics.source_reads.get_or_create(&kind.into()).get()
    }

    /// Reconciles so far for `kind` that reused remembered digests and read no source.
    pub fn digests_reused(&self, kind: WorkloadKind) -> u64 {
        self.metrics
            .digests_reused
            .get_or_create(&kind.into())
            .get()
    }

    /// Stops the controller and waits for it to end.
    pub async fn stop(self) -> Result<()> {
        self.task.stop("the config rollout controller").await
    }
}

/// The `/metrics` text of the webhook `probe` reaches.
pub async fn metrics_of(probe: &Probe) -> Result<String> {
    let mut conn = probe.connect().await?;
    let (status, body) = conn
        .send(Method::GET, "/metrics", Default::default())
        .await?;
    if status != StatusCode::OK {
        bail!("/metrics answered {status}");
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The tests' MutatingWebhookConfiguration `name`: pods created in `namespace` (selected by
/// `kubernetes.io/metadata.name`, `failurePolicy: Fail`) go to `https://127.0.0.1:<port>`
/// `/mutate-pods`, and, with `pin_config`, pods pinned to config snapshots also to
/// `/pin-config`, selected by the chart's `matchConditions`. The webhook fills in `caBundle`.
pub fn webhook_configuration(
    name: &str,
    namespace: &str,
    port: u16,
    pin_config: bool,
) -> Result<MutatingWebhookConfiguration> {
    let entry = |name: &str, path: &str| {
        json!({
            "name": name,
            "clientConfig": {"url": format!("https://127.0.0.1:{port}{path}")},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "reinvocationPolicy": "IfNeeded",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 10
        })
    };
    let mut webhooks = vec![entry("inject.appset.dev", "/mutate-pods")];
    if pin_config {
        // As the chart does: only pods that carry snapshot pins, and no AppSet's.
        let mut pin = entry("pin.appset.dev", "/pin-config");
        pin["matchConditions"] = json!([{
            "name": "pinned-to-config-snapshots",
            "expression": format!("has(object.metadata.annotations) && '{}' in object.metadata.annotations", appset_crds::keys::CONFIG_SNAPSHOTS)
        }, {
            "name": "not-an-appset-pod",
            "expression": format!("!has(object.metadata.labels) || !('{}' in object.metadata.labels)", appset_crds::keys::APPSET_NAME_LABEL)
        }]);
        webhooks.push(pin);
    }
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"appset.dev/e2e": "true"}},
        "webhooks": webhooks
    }))?)
}

/// What a [`Webhook`] runner serves beyond injection.
#[derive(Debug, Default, Clone)]
pub struct WebhookOptions {
    /// Answer reviews only to clients whose certificate a CA in this file signed.
    pub client_ca_file: Option<std::path::PathBuf>,
    /// Also register `/pin-config` for pods pinned to config snapshots.
    pub pin_config: bool,
}

/// The name of the certificate Secret the webhook runner uses.
pub const WEBHOOK_CERT_SECRET: &str = "appset-webhook-certs";

/// The injection webhook, serving on `127.0.0.1:<free port>`, with a
/// MutatingWebhookConfiguration of its own that selects only the test namespace.
pub struct Webhook {
    configs: Api<MutatingWebhookConfiguration>,
    name: String,
    probe: Probe,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), appset_webhook::Error>>>,
}

impl Webhook {
    /// Creates the configuration and starts the webhook; returns once the `caBundle` is set
    /// and `/readyz` answers 200.
    pub async fn start(
        ns: &TestNamespace,
        policy: Policy,
        check_interval: Duration,
    ) -> Result<Self> {
        Self::start_with(ns, policy, check_interval, WebhookOptions::default()).await
    }

    /// [`Webhook::start`] with `options`.
    pub async fn start_with(
        ns: &TestNamespace,
        policy: Policy,
        check_interval: Duration,
        options: WebhookOptions,
    ) -> Result<Self> {
        let WebhookOptions {
            client_ca_file,
            pin_config,
        } = options;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let name = format!("appset-webhook-{}", ns.name);
        let configs: Api<MutatingWebhookConfiguration> = Api::all(ns.client.clone());
        let mwc = webhook_configuration(&name, &ns.name, addr.port(), pin_config)?;
        configs
            .create(&PostParams::default(), &mwc)
            .await
            .context("create the MutatingWebhookConfiguration")?;
        let config = appset_webhook::Config {
            listen: addr,
            tls: TlsConfig {
                secret_namespace: ns.name.clone(),
                secret_name: WEBHOOK_CERT_SECRET.into(),
                webhook_configuration: Some(name.clone()),
                policy,
                check_interval,
            },
            watch_namespace: Some(ns.name.clone()),
            namespace_cache: true,
            client_ca_file,
            // The tests stop webhooks at will: no drain period.
            limits: appset_webhook::server::Limits {
                drain: Duration::ZERO,
                ..Default::default()
            },
        };
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(appset_webhook::serve_on(
            listener,
            config,
            ns.client.clone(),
            async move {
                let _ = rx.await;
            },
        ));
        let mut stop = Some(tx);
        let bundle = wait_for("the caBundle to be published", READY_DEADLINE, || async {
            let c = configs.get(&name).await?;
            let bundles: Vec<_> = c
                .webhooks
                .iter()
                .flatten()
                .filter_map(|w| w.client_config.ca_bundle.clone())
                .collect();
            Ok(match bundles.first() {
                Some(b) => Ok(String::from_utf8_lossy(&b.0).into_owned()),
                None => Err("caBundle empty".to_string()),
            })
        })
        .await?;
        let probe = Probe::new(addr, "127.0.0.1", &bundle).context("a probe for the webhook")?;
        wait_for("the webhook's /readyz", READY_DEADLINE, || async {
            let answer = match probe.connect().await {
                Ok(mut conn) => conn
                    .send(Method::GET, "/readyz", Default::default())
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            Ok(match answer {
                Ok((StatusCode::OK, _)) => Ok(()),
                Ok((status, body)) => Err(format!("{status}: {}", String::from_utf8_lossy(&body))),
                Err(e) => Err(e),
            })
        })
        .await?;
        Ok(Self {
            configs,
            name,
            probe,
            stop: stop.take(),
            task: Some(task),
        })
    }

    /// Sends one request to the webhook directly (not through the API server, and with no
    /// client certificate).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, String)> {
        let mut conn = self.probe.connect().await?;
        let (status, body) = conn.send(method, path, body.into()).await?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// The webhook's `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        metrics_of(&self.probe).await
    }

    /// Stops the webhook and deletes its configuration.
    pub async fn stop(mut self) -> Result<()> {
        if let Err(e) = self
            .configs
            .delete(&self.name, &DeleteParams::default())
            .await
        {
            eprintln!("cannot delete {}: {e}", self.name);
        }
        self.stop_serving().await
    }

    /// Stops the server and leaves its configuration in place, as an outage would (the API
    /// server then fails the calls it makes).
    pub async fn stop_serving(&mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .context("the webhook did not stop")???;
        }
        Ok(())
    }
}
