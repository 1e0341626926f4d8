//! The AppSet controller's wiring: its settings and shared context, the watches that trigger
//! reconciles, the error policy, and [`run`].
//!
//! Per part of the [`Scope`] (one namespace, or the whole cluster) one kube [`Controller`]
//! reconciles AppSets ([`super::reconcile`]), triggered by the AppSet watch (a reflector
//! store), by metadata watches of the Pods, ControllerRevisions and Services labelled
//! `appset.dev/appset` (through their controller owner references), by claims with that label
//! (through the label's value), and by the metadata of ConfigMaps and Secrets referenced by a
//! config-aware AppSet's template (the changes of the shared [`SourceWatch`]). Failures requeue
//! with exponential backoff (1 s doubling to 5 min; at most 5 s while the API server is
//! unreachable), reset by a success; every reconcile requeues at least every five minutes. The
//! retry counts are dropped when an AppSet is deleted, and after every (re)list for the AppSets
//! it no longer returns.
//!
//! Readiness: [`run`] takes a [`ReadyHandle`] gate, derives one handle per watch, releases the
//! gate, and each watch releases its own handle at the end of its first complete list.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use appset_process::liveness::Liveness;
use appset_process::readiness::ReadyHandle;
use std::fmt::Debug;

use futures::{FutureExt, Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use kube::Client;
use kube::ResourceExt;
use kube::api::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tracing::{Instrument, info, info_span, warn};

use appset_crds::{AppSet, keys};

use crate::confighash::discovery::{self, SourceKind};
use crate::confighash::fetch;
use crate::confighash::live::LiveKeyring;
use crate::kubeapi::{self, Namespaced, Scope, api_in, release_on_sync};
use crate::sourcewatch::{SourceChange, SourceWatch, Subscriptions};

/// The name the controller reports Events under.
pub const CONTROLLER_NAME: &str = "appset.dev/appset-controller";

/// Errors of a reconcile. Each one names the object and the operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request to the API server failed.
    #[error("{what}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Reading the config sources failed.
    #[error("config rollout: {0}")]
    Config(#[from] fetch::FetchError),
    /// The AppSet cannot be handled as it is.
    #[error("{0}")]
    Invalid(String),
    /// The reconcile did not finish within [`kubeapi::RECONCILE_DEADLINE`].
    #[error("the reconcile did not finish within {0:?} (is the API server answering?); retrying")]
    Timeout(Duration),
}

impl Error {
    /// Whether the failure is the API server's, not the AppSet's: retried within seconds.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Kube { source, .. } => kubeapi::is_transient(source),
            Error::Config(fetch::FetchError::Api { source, .. }) => kubeapi::is_transient(source),
            Error::Timeout(_) => true,
            Error::Config(_) | Error::Invalid(_) => false,
        }
    }
}

/// Wraps an API error with what was being done.
pub(crate) fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Kube { what, source }
}

/// Where and how the controller works.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The namespaces to watch.
    pub scope: Scope,
    /// How many AppSets are reconciled at once.
    pub concurrency: u16,
    /// How many creations or deletions one reconcile sends at once (`Parallel` policy).
    pub burst: usize,
    /// Reported as the Events' reporting instance (e.g. the pod name).
    pub instance: Option<String>,
    /// The pacing of config-driven rollouts (the same flags as for native workloads).
    pub pacing: crate::pacing::Policy,
    /// Where each watch loop registers its heartbeat (`/healthz`); `None`: not watched.
    pub liveness: Option<appset_process::liveness::Liveness>,
    /// Allow `spec.configSnapshots`.
    pub snapshots: bool,
}

impl Default for Settings {
    /// Every namespace, 8 AppSets at once, bursts of 32, the default pacing.
    fn default() -> Self {
        Self {
            scope: Scope::All,
            concurrency: 8,
            burst: 32,
            instance: None,
            pacing: crate::pacing::Policy::default(),
            liveness: None,
            snapshots: false,
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub(crate) client: Client,
    pub(crate) recorder: Recorder,
    pub(crate) keyring: LiveKeyring,
    pub(crate) settings: Settings,
    failures: Mutex<HashMap<ObjectRef<AppSet>, u32>>,
}

impl Context {
    /// The shared state of one controller run.
    pub fn new(client: Client, settings: Settings, keyring: impl Into<LiveKeyring>) -> Self {
        let reporter = Reporter {
            controller: CONTROLLER_NAME.to_string(),
            instance: settings.instance.clone(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            keyring: keyring.into(),
            settings,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// One Event on the AppSet; failures to publish are logged, never fatal.
    pub(crate) async fn event(
        &self,
        set: &AppSet,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        kubeapi::publish(&self.recorder, set, type_, reason, action, note).await;
    }
}

/// Runs the AppSet controller until `shutdown` completes: one controller per part of
/// `settings.scope`, hashing config with the shared `keyring`. `ready` is released once every
/// watch has been derived from it; each watch is ready after its first complete list.
pub async fn run(
    client: Client,
    settings: Settings,
    keyring: impl Into<LiveKeyring>,
    ready: ReadyHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let shutdown = shutdown.boxed().shared();
    let (sources, watch) = SourceWatch::alone(&client, &settings.scope, &ready, shutdown.clone());
    let controller = run_with_sources(client, settings, keyring, sources, ready, shutdown);
    futures::future::join(watch, controller).await;
}

/// [`run`] with the ConfigMap and Secret changes of a [`SourceWatch`] the caller runs (the
/// operator shares one between both controllers).
pub async fn run_with_sources(
    client: Client,
    settings: Settings,
    keyring: impl Into<LiveKeyring>,
    mut sources: Subscriptions,
    ready: ReadyHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    info!(scope = ?settings.scope, "AppSet controller starting");
    let ctx = Arc::new(Context::new(client.clone(), settings.clone(), keyring));
    let shutdown = shutdown.boxed().shared();
    let runs: Vec<_> = settings
        .scope
        .parts()
        .into_iter()
        .map(|ns| {
            let changes = sources.take(ns.as_deref());
            run_scope(&client, ns, changes, ctx.clone(), &ready, shutdown.clone())
        })
        .collect();
    ready.ready();
    futures::future::join_all(runs).await;
    info!("AppSet controller stopped");
}

fn run_scope(
    client: &Client,
    ns: Option<String>,
    changes: futures::channel::mpsc::Receiver<SourceChange>,
    ctx: Arc<Context>,
    ready: &ReadyHandle,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    let ns = ns.as_deref();
    let place = ns.unwrap_or("all namespaces").to_string();
    let handle = |what: &str| ready.also(format!("{what} watch ({place})"));
    let all = watcher::Config::default;
    let labelled = || watcher::Config::default().labels(keys::APPSET_NAME_LABEL);
    let (store, writer) = reflector::store::<AppSet>();
    let sets = watcher(api_in::<AppSet>(client, ns), all())
        .backoff(kubeapi::watch_backoff())
        .reflect(writer);
    let name = format!("AppSet loop ({place})");
    let heartbeat = match &ctx.settings.liveness {
        Some(l) => l.register(name),
        None => Liveness::new(Duration::MAX).register(name),
    };
    let (on_set, on_claim, on_source, on_done) = (
        heartbeat.clone(),
        heartbeat.clone(),
        heartbeat.clone(),
        heartbeat,
    );
    let pruner = ctx.clone();
    let part = ns.map(String::from);
    let mut listed: Option<HashSet<ObjectRef<AppSet>>> = None;
    let sets = release_on_sync(sets, handle("AppSet"))
        .inspect_ok(move |ev| match ev {
            watcher::Event::Delete(set) => pruner.forget(&ObjectRef::from_obj(set)),
            watcher::Event::Init => listed = Some(HashSet::new()),
            watcher::Event::InitApply(set) => {
                if let Some(l) = listed.as_mut() {
                    l.insert(ObjectRef::from_obj(set));
                }
            }
            watcher::Event::InitDone => {
                if let Some(l) = listed.take() {
                    pruner.retain_listed(part.as_deref(), &l);
                }
            }
            watcher::Event::Apply(_) => {}
        })
        .applied_objects()
        .inspect(move |_| on_set.demand());
    let pods = owned::<Pod>(client, ns, handle("Pod metadata"));
    let revisions = owned::<ControllerRevision>(client, ns, handle("ControllerRevision metadata"));
    let services = owned::<Service>(client, ns, handle("Service metadata"));
    let claims = release_on_sync(
        watcher(api_in::<PersistentVolumeClaim>(client, ns), labelled())
            .backoff(kubeapi::watch_backoff()),
        handle("PersistentVolumeClaim"),
    )
    .touched_objects();
    let users = store.clone();
    let config_users = changes.flat_map(move |c: SourceChange| {
        let source = match c.kind {
            SourceKind::ConfigMap => discovery::SourceName::config_map(c.name),
            SourceKind::Secret => discovery::SourceName::secret(c.name),
        };
        let users = users_of(&users, source, Some(c.namespace));
        if !users.is_empty() {
            on_source.demand();
        }
        futures::stream::iter(users)
    });
    Controller::for_stream(sets, store)
        .owns_stream(pods)
        .owns_stream(revisions)
        .owns_stream(services)
        .watches_stream(claims, move |claim: PersistentVolumeClaim| {
            let set = claim.labels().get(keys::APPSET_NAME_LABEL).cloned();
            let set = set
                .zip(claim.namespace())
                .map(|(set, ns)| ObjectRef::new(&set).within(&ns));
            if set.is_some() {
                on_claim.demand();
            }
            set
        })
        .reconcile_on(config_users)
        // A key rotation compares every AppSet again, while the previous key is at hand.
        .reconcile_all_on(ctx.keyring.rotations())
        .with_config(
            kube::runtime::controller::Config::default().concurrency(ctx.settings.concurrency),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(move |res| {
            on_done.beat();
            async move {
                if let Err(err) = res
                    && !matches!(err, kube::runtime::controller::Error::ObjectNotFound(_))
                {
                    warn!(error = %err, "AppSet controller");
                }
            }
        })
}

/// A metadata-only watch (`PartialObjectMeta`, so object bodies are never sent) of the `K`s
/// labelled `appset.dev/appset`: the objects an AppSet owns.
fn owned<K>(
    client: &Client,
    ns: Option<&str>,
    ready: ReadyHandle,
) -> impl Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
where
    K: Namespaced,
{
    let config = watcher::Config::default().labels(keys::APPSET_NAME_LABEL);
    let stream = watcher(api_in::<PartialObjectMeta<K>>(client, ns), config)
        .backoff(kubeapi::watch_backoff());
    release_on_sync(stream, ready).touched_objects()
}

/// The config-aware AppSets in `namespace` whose template references `source`.
fn users_of(
    store: &Store<AppSet>,
    source: discovery::SourceName,
    namespace: Option<String>,
) -> Vec<ObjectRef<AppSet>> {
    store
        .state()
        .into_iter()
        .filter(|s| s.spec.config_rollout && s.namespace() == namespace)
        .filter(|s| {
            s.spec
                .template
                .spec
                .as_ref()
                .is_some_and(|spec| discovery::references(spec).sources.contains_key(&source))
        })
        .map(|s| ObjectRef::from_obj(s.as_ref()))
        .collect()
}

impl Context {
    /// Forgets the retry count of an AppSet that is gone.
    fn forget(&self, set: &ObjectRef<AppSet>) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(set);
        }
    }

    /// After a complete list of the AppSets of `part` (`None`: every namespace): forgets the
    /// retry counts of those the list did not return (deleted while the watch was down).
    fn retain_listed(&self, part: Option<&str>, listed: &HashSet<ObjectRef<AppSet>>) {
        if let Ok(mut f) = self.failures.lock() {
            f.retain(|set, _| {
                let covered = part.is_none_or(|ns| set.namespace.as_deref() == Some(ns));
                !covered || listed.contains(set)
            });
        }
    }
}

/// Exponential backoff per AppSet: 1 s doubling to 5 min, or to 5 s while the API server is
/// unreachable ([`kubeapi::retry_delay`]).
fn error_policy(set: Arc<AppSet>, err: &Error, ctx: Arc<Context>) -> Action {
    let key = ObjectRef::from_obj(set.as_ref());
    let n = match ctx.failures.lock() {
        Ok(mut f) => {
            let n = f.entry(key).or_insert(0);
            *n = n.saturating_add(1);
            *n
        }
        Err(_) => 1,
    };
    let delay = kubeapi::retry_delay(n, err.is_transient());
    warn!(appset = %set.name_any(), namespace = ?set.namespace(), error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// The controller's reconcile function: [`super::reconcile::reconcile`] in a span, resetting
/// the backoff on success or when the AppSet is on its way out.
pub async fn reconcile(set: Arc<AppSet>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span =
        info_span!("reconcile_appset", appset = %set.name_any(), namespace = ?set.namespace());
    let result = kubeapi::within_deadline(
        super::reconcile::reconcile(&set, &ctx).instrument(span),
        || Error::Timeout(kubeapi::RECONCILE_DEADLINE),
    )
    .await;
    if (result.is_ok() || set.metadata.deletion_timestamp.is_some())
        && let Ok(mut f) = ctx.failures.lock()
    {
        f.remove(&ObjectRef::from_obj(set.as_ref()));
    }
    result
}
