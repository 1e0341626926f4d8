//! The config rollout controller: the I/O around the pure modules.
//!
//! # Watches
//!
//! For each namespace in scope (or the whole cluster):
//! * Deployments, StatefulSets and DaemonSets, in a reflector store (with `managedFields` and the
//!   last-applied annotation stripped), filtered so that only changes of generation or
//!   annotations trigger a reconcile (status updates do not);
//! * ConfigMaps and Secrets with **metadata-only** watches: no body is ever cached. A metadata
//!   event is looked up in the [`ReverseIndex`] and the workloads that use the source are queued
//!   for a reconcile. Events that do not touch data (labels, annotations) queue them too, and the
//!   reconcile finds the digest unchanged.
//!
//! # Reconcile (one workload)
//!
//! 1. Read the opt-in annotations; a workload that has not opted in is dropped from the index.
//! 2. List its sources ([`discovery`](super::discovery)), update the index, GET the bodies
//!    ([`fetch`](super::fetch)), hash them ([`hash`](super::hash)) and drop them.
//! 3. Decide ([`rollout`](super::rollout)) and act: record a baseline on the workload's metadata,
//!    requeue at the end of the coalescing window, or roll by writing
//!    [`keys::CONFIG_HASH`] into the pod template. Writes are server-side applies with the field
//!    manager [`keys::FIELD_MANAGER`] that carry only the two annotations appset owns.
//! 4. Publish an Event on a rollout (naming the changed sources, never values) and on a missing
//!    required source; count everything in [`Metrics`].
//!
//! Caveats: the pending coalescing window and the time of the last rollout live in memory, so a
//! restart in the middle of a window restarts it, and the minimum interval starts afresh. A
//! change to the pod template that also adds or removes sources rolls the workload once for the
//! template and once more for the new digest.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use appset_crds::keys;
use futures::channel::mpsc;
use futures::{FutureExt, Stream, StreamExt, TryStreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PodTemplateSpec, Secret};
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::utils::predicates;
use kube::runtime::{Controller, Predicate, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

use super::discovery::{OptIn, SourceKind};
use super::fetch::{self, FetchError};
use super::hash::{self, HashKey};
use super::index::{ReverseIndex, SourceRef, WorkloadKind, WorkloadRef};
use super::keyring::{self, Keyring};
use super::metrics::Metrics;
use super::rollout::{Decision, Input, Observed, Policy, WorkloadState};

/// The name the controller reports Events as.
pub const CONTROLLER_NAME: &str = "appset-config-rollout";

/// Errors of one reconcile (retried by the error policy).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a source failed.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// Writing the annotations failed.
    #[error("apply the config hash to {kind} {namespace}/{name}: {source}")]
    Apply {
        /// The workload kind.
        kind: &'static str,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// Errors that stop the controller.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The hash key could not be read or created.
    #[error("cannot set up the config hash key: {0}")]
    Keyring(#[from] FetchError),
}

/// Where and how the controller works.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Namespaces to watch; empty means every namespace.
    pub namespaces: Vec<String>,
    /// Coalescing window and minimum interval.
    pub policy: Policy,
    /// Honour stakater/Reloader's annotations too.
    pub reloader_compat: bool,
    /// Namespace of the hash key Secret (the operator's own).
    pub key_namespace: String,
    /// Name of the hash key Secret.
    pub key_secret: String,
    /// How many workloads are reconciled at once.
    pub concurrency: u16,
    /// Reported as the Event's reporting instance (e.g. the pod name).
    pub instance: Option<String>,
    /// A label selector over namespaces (`team=payments`): only workloads in namespaces that
    /// match it now are handled, within `namespaces`. Followed live: a namespace that gains the
    /// labels is taken up, one that loses them is dropped.
    pub namespace_selector: Option<String>,
}

impl Settings {
    /// Defaults for the given key namespace: every namespace, default policy, no Reloader
    /// compatibility.
    pub fn new(key_namespace: impl Into<String>) -> Self {
        Self {
            namespaces: Vec::new(),
            policy: Policy::default(),
            reloader_compat: false,
            key_namespace: key_namespace.into(),
            key_secret: keyring::DEFAULT_SECRET_NAME.to_string(),
            concurrency: 16,
            instance: None,
            namespace_selector: None,
        }
    }
}

/// Readiness: set once every watch has listed its objects.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Whether the caches have synced.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A native workload kind the controller can roll.
pub trait Workload:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + Serialize
    + Debug
    + Send
    + Sync
    + 'static
{
    /// Its kind.
    const KIND: WorkloadKind;
    /// Its pod template.
    fn template(&self) -> &PodTemplateSpec;
}

impl Workload for Deployment {
    const KIND: WorkloadKind = WorkloadKind::Deployment;
    fn template(&self) -> &PodTemplateSpec {
        &self.spec.template
    }
}

impl Workload for StatefulSet {
    const KIND: WorkloadKind = WorkloadKind::StatefulSet;
    fn template(&self) -> &PodTemplateSpec {
        &self.spec.template
    }
}

impl Workload for DaemonSet {
    const KIND: WorkloadKind = WorkloadKind::DaemonSet;
    fn template(&self) -> &PodTemplateSpec {
        &self.spec.template
    }
}

/// Shared by every reconcile.
struct Context {
    client: Client,
    settings: Settings,
    keyring: Keyring,
    index: Mutex<ReverseIndex>,
    states: Mutex<HashMap<WorkloadRef, WorkloadState>>,
    recorder: Recorder,
    metrics: Metrics,
    /// The namespaces matching `settings.namespace_selector`; `None` without a selector.
    selected: Option<RwLock<HashSet<String>>>,
}

impl Context {
    fn in_scope(&self, namespace: &str) -> bool {
        match &self.selected {
            None => true,
            Some(set) => set.read().map(|s| s.contains(namespace)).unwrap_or(false),
        }
    }
}

impl Context {
    fn forget(&self, workload: &WorkloadRef) {
        if let Ok(mut index) = self.index.lock() {
            index.remove(workload);
            self.metrics.workloads.set(index.len() as i64);
        }
        if let Ok(mut states) = self.states.lock() {
            states.remove(workload);
        }
    }
}

fn workload_ref<K: Workload>(obj: &K) -> WorkloadRef {
    WorkloadRef {
        kind: K::KIND,
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
    }
}

fn strip<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
    if let Some(a) = obj.meta_mut().annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

async fn apply_annotations<K: Workload>(
    ctx: &Context,
    obj: &K,
    observed: &Observed,
    template_hash: Option<&str>,
) -> Result<(), Error> {
    let namespace = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let mut patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {
            "name": name,
            "annotations": { keys::CONFIG_HASH_OBSERVED: observed.to_annotation() },
        },
    });
    // Server-side apply removes fields this manager owned and no longer sends, so the
    // template hash is always sent when there is one.
    if let Some(hash) = template_hash {
        patch["spec"] =
            json!({"template": {"metadata": {"annotations": {keys::CONFIG_HASH: hash}}}});
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    api.patch(
        &name,
        &PatchParams::apply(keys::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::Apply {
        kind: K::KIND.as_str(),
        namespace,
        name,
        source,
    })?;
    Ok(())
}

async fn publish<K: Workload>(
    ctx: &Context,
    obj: &K,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: "ConfigRollout".to_string(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        warn!(error = %err, reason, "cannot publish an Event");
    }
}

fn digest_with(key: &HashKey, sources: &[hash::Source]) -> Observed {
    Observed {
        key_id: key.id().to_string(),
        digest: hash::digest(key, sources),
    }
}

async fn reconcile<K: Workload>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error> {
    let wref = workload_ref(obj.as_ref());
    let span = info_span!("reconcile", kind = K::KIND.as_str(), namespace = %wref.namespace, name = %wref.name);
    reconcile_inner(obj, ctx, wref).instrument(span).await
}

async fn reconcile_inner<K: Workload>(
    obj: Arc<K>,
    ctx: Arc<Context>,
    wref: WorkloadRef,
) -> Result<Action, Error> {
    ctx.metrics.reconciles.get_or_create(&K::KIND.into()).inc();
    let empty = BTreeMap::new();
    let annotations = obj.meta().annotations.as_ref().unwrap_or(&empty);
    let opted = OptIn::from_annotations(annotations, ctx.settings.reloader_compat)
        .filter(|_| ctx.in_scope(&wref.namespace));
    let Some(opt_in) = opted else {
        ctx.forget(&wref);
        return Ok(Action::await_change());
    };
    let template = obj.template();
    let refs = opt_in.references(template.spec.as_ref());
    let sources: BTreeSet<SourceRef> = refs
        .names()
        .map(|n| SourceRef::new(&wref.namespace, n))
        .collect();
    if let Ok(mut index) = ctx.index.lock() {
        index.set(&wref, sources);
        ctx.metrics.workloads.set(index.len() as i64);
    }

    let fetched = fetch::sources(&ctx.client, &wref.namespace, &refs).await?;
    let observed = annotations
        .get(keys::CONFIG_HASH_OBSERVED)
        .and_then(|v| Observed::parse(v));
    let current = digest_with(&ctx.keyring.current, &fetched.sources);
    let previous = match (&ctx.keyring.previous, &observed) {
        (Some(prev), Some(o)) if o.key_id == prev.id() => Some(digest_with(prev, &fetched.sources)),
        _ => None,
    };
    let per_source = hash::per_source(&ctx.keyring.current, &fetched.sources);
    let input = Input {
        observed,
        current: current.clone(),
        previous,
        missing: fetched.missing,
    };
    drop(fetched.sources);

    let now = tokio::time::Instant::now();
    let decision = match ctx.states.lock() {
        Ok(mut states) => states.entry(wref.clone()).or_default().decide(
            &input,
            &ctx.settings.policy,
            now.into_std(),
        ),
        Err(_) => return Ok(Action::requeue(Duration::from_secs(1))),
    };
    let template_hash = template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(keys::CONFIG_HASH));
    let with_state = |f: &mut dyn FnMut(&mut WorkloadState)| {
        if let Ok(mut states) = ctx.states.lock() {
            f(states.entry(wref.clone()).or_default());
        }
    };

    match decision {
        Decision::Unchanged => {
            with_state(&mut |st| {
                if st.per_source.is_empty() {
                    st.per_source = per_source.clone();
                }
            });
            Ok(Action::await_change())
        }
        Decision::Baseline(reason) => {
            apply_annotations(
                &ctx,
                obj.as_ref(),
                &current,
                template_hash.map(String::as_str),
            )
            .await?;
            with_state(&mut |st| st.recorded(current.clone(), per_source.clone()));
            ctx.metrics.baselines.get_or_create(&K::KIND.into()).inc();
            info!(
                ?reason,
                sources = refs.len(),
                "recorded the config baseline without a rollout"
            );
            Ok(Action::await_change())
        }
        Decision::Wait { until } => {
            let wait = until.saturating_duration_since(now.into_std());
            tracing::debug!(
                ?wait,
                "config changed; waiting for the coalescing window or minimum interval"
            );
            Ok(Action::requeue(wait.max(Duration::from_millis(10))))
        }
        Decision::Roll => {
            let value = current.to_annotation();
            apply_annotations(&ctx, obj.as_ref(), &current, Some(&value)).await?;
            let mut changed = None;
            with_state(&mut |st| {
                changed = Some(st.rolled(current.clone(), per_source.clone(), now.into_std()))
            });
            let what = changed.map(|c| c.describe()).unwrap_or_default();
            ctx.metrics.rollouts.get_or_create(&K::KIND.into()).inc();
            info!(%what, "rolled out for changed config");
            publish(
                &ctx,
                obj.as_ref(),
                EventType::Normal,
                "ConfigChanged",
                format!("Rolling out: referenced config {what}"),
            )
            .await;
            Ok(Action::await_change())
        }
        Decision::Blocked(missing) => {
            let names: Vec<String> = missing.iter().map(ToString::to_string).collect();
            ctx.metrics
                .missing_sources
                .get_or_create(&K::KIND.into())
                .inc();
            warn!(missing = ?names, "required config sources do not exist; not rolling out");
            publish(
                &ctx,
                obj.as_ref(),
                EventType::Warning,
                "MissingConfigSource",
                format!(
                    "Not rolling out: required {} not found in namespace {} (mark the reference optional, or create it)",
                    names.join(", "),
                    wref.namespace
                ),
            )
            .await;
            Ok(Action::await_change())
        }
    }
}

fn error_policy<K: Workload>(obj: Arc<K>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.errors.get_or_create(&K::KIND.into()).inc();
    warn!(kind = K::KIND.as_str(), namespace = ?obj.namespace(), name = %obj.name_any(), error = %err, "config rollout reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

type Senders = Arc<Vec<(WorkloadKind, mpsc::UnboundedSender<WorkloadRef>)>>;

/// Runs one controller for kind `K` over `api`, triggered also by `triggers`.
async fn run_kind<K: Workload>(
    api: Api<K>,
    triggers: mpsc::UnboundedReceiver<WorkloadRef>,
    reconcile_all: mpsc::UnboundedReceiver<()>,
    ctx: Arc<Context>,
    ready: mpsc::UnboundedSender<()>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (reader, writer) = reflector::store::<K>();
    let forget = ctx.clone();
    // The first InitDone means this kind's cache is complete. (Waiting on the store instead
    // would compete with the controller for its one-shot readiness signal.)
    let mut ready = Some(ready);
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(strip::<K>)
        .reflect(writer)
        .inspect_ok(move |ev| match ev {
            watcher::Event::Delete(obj) => forget.forget(&workload_ref(obj)),
            watcher::Event::InitDone => {
                if let Some(tx) = ready.take() {
                    tracing::debug!(kind = K::KIND.as_str(), "workload cache synced");
                    let _ = tx.unbounded_send(());
                }
            }
            _ => {}
        })
        .applied_objects()
        .predicate_filter(
            predicates::generation.combine(predicates::annotations),
            Default::default(),
        );
    let triggers = triggers.map(|w| ObjectRef::<K>::new(&w.name).within(&w.namespace));
    Controller::for_stream(stream, reader)
        .reconcile_on(triggers)
        .reconcile_all_on(reconcile_all)
        .with_config(
            kube::runtime::controller::Config::default().concurrency(ctx.settings.concurrency),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile::<K>, error_policy::<K>, ctx)
        .for_each(|res| async move {
            if let Err(err) = res
                && !matches!(err, kube::runtime::controller::Error::ObjectNotFound(_))
            {
                warn!(kind = K::KIND.as_str(), error = %err, "config rollout controller");
            }
        })
        .await;
}

/// Watches the metadata of one source kind and queues the workloads that use each changed
/// source.
fn source_events<S>(
    api: Api<PartialObjectMeta<S>>,
    kind: SourceKind,
    ctx: Arc<Context>,
    senders: Senders,
    ready: mpsc::UnboundedSender<()>,
) -> impl Stream<Item = ()> + Send
where
    S: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    let mut ready = Some(ready);
    // `Api<PartialObjectMeta<_>>` lists and watches metadata only: bodies never arrive.
    watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(move |ev| {
            let out = match ev {
                Ok(watcher::Event::InitDone) => {
                    if let Some(tx) = ready.take() {
                        tracing::debug!(kind = kind.as_str(), "source metadata listed");
                        let _ = tx.unbounded_send(());
                    }
                    None
                }
                Ok(watcher::Event::Apply(m) | watcher::Event::Delete(m) | watcher::Event::InitApply(m)) => Some(m),
                Ok(watcher::Event::Init) => None,
                Err(err) => {
                    warn!(kind = kind.as_str(), error = %err, "source metadata watch failed; retrying");
                    None
                }
            };
            std::future::ready(out)
        })
        .map(move |meta| {
            let source = SourceRef {
                kind,
                namespace: meta.namespace().unwrap_or_default(),
                name: meta.name_any(),
            };
            let workloads = match ctx.index.lock() {
                Ok(index) => index.workloads(&source),
                Err(_) => Vec::new(),
            };
            for w in workloads {
                if let Some((_, tx)) = senders.iter().find(|(k, _)| *k == w.kind) {
                    let _ = tx.unbounded_send(w);
                }
            }
        })
}

/// Follows the namespaces matching `selector` into `ctx.selected`, and reconciles every workload
/// when the set changes (workloads of a namespace that left are then dropped, those of one that
/// joined are adopted).
fn namespace_events(
    api: Api<PartialObjectMeta<Namespace>>,
    selector: String,
    ctx: Arc<Context>,
    everything: Vec<mpsc::UnboundedSender<()>>,
    ready: mpsc::UnboundedSender<()>,
) -> impl Stream<Item = ()> + Send {
    let mut ready = Some(ready);
    let mut listing: HashSet<String> = HashSet::new();
    watcher(api, watcher::Config::default().labels(&selector))
        .default_backoff()
        .map(move |ev| {
            let Some(selected) = &ctx.selected else {
                return;
            };
            let changed = match ev {
                Ok(watcher::Event::Init) => {
                    listing.clear();
                    false
                }
                Ok(watcher::Event::InitApply(ns)) => {
                    listing.insert(ns.name_any());
                    false
                }
                Ok(watcher::Event::InitDone) => {
                    if let Ok(mut set) = selected.write() {
                        *set = std::mem::take(&mut listing);
                        info!(selector = %selector, namespaces = ?set, "namespaces selected by label");
                    }
                    if let Some(tx) = ready.take() {
                        let _ = tx.unbounded_send(());
                    }
                    true
                }
                Ok(watcher::Event::Apply(ns)) => selected
                    .write()
                    .map(|mut set| set.insert(ns.name_any()))
                    .unwrap_or(false),
                Ok(watcher::Event::Delete(ns)) => selected
                    .write()
                    .map(|mut set| set.remove(&ns.name_any()))
                    .unwrap_or(false),
                Err(err) => {
                    warn!(error = %err, "namespace watch failed; retrying");
                    false
                }
            };
            if changed {
                for tx in &everything {
                    let _ = tx.unbounded_send(());
                }
            }
        })
}

/// Runs the config rollout controller until `shutdown` completes.
///
/// Reads (or creates) the hash key Secret, then watches the workloads and sources in
/// `settings.namespaces` (every namespace when empty). `readiness` turns ready once every watch
/// has listed. Metrics are counted into `metrics` (see [`Metrics::register`]).
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Metrics,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let keyring =
        fetch::ensure_keyring(&client, &settings.key_namespace, &settings.key_secret).await?;
    info!(key_id = keyring.current.id(), namespaces = ?settings.namespaces, "config rollout controller starting");
    let reporter = Reporter {
        controller: CONTROLLER_NAME.to_string(),
        instance: settings.instance.clone(),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        settings: settings.clone(),
        keyring,
        index: Mutex::new(ReverseIndex::default()),
        states: Mutex::new(HashMap::new()),
        metrics,
        selected: settings
            .namespace_selector
            .as_ref()
            .map(|_| RwLock::new(HashSet::new())),
    });
    let shutdown = shutdown.shared();
    let scopes: Vec<Option<String>> = if settings.namespaces.is_empty() {
        vec![None]
    } else {
        settings.namespaces.iter().cloned().map(Some).collect()
    };
    fn api<T: Resource<DynamicType = (), Scope = NamespaceResourceScope>>(
        c: &Client,
        ns: &Option<String>,
    ) -> Api<T> {
        match ns {
            Some(ns) => Api::namespaced(c.clone(), ns),
            None => Api::all(c.clone()),
        }
    }

    let (ready_tx, ready_rx) = mpsc::unbounded::<()>();
    let mut expected = scopes.len() * 5;
    let mut tasks: Vec<futures::future::BoxFuture<'static, ()>> = Vec::new();
    let mut everything: Vec<mpsc::UnboundedSender<()>> = Vec::new();
    // Each kind's "reconcile everything" trigger, fired when the namespace selection changes.
    fn subscribe(all: &mut Vec<mpsc::UnboundedSender<()>>) -> mpsc::UnboundedReceiver<()> {
        let (tx, rx) = mpsc::unbounded();
        all.push(tx);
        rx
    }
    for ns in &scopes {
        let (dtx, drx) = mpsc::unbounded();
        let (stx, srx) = mpsc::unbounded();
        let (xtx, xrx) = mpsc::unbounded();
        let senders: Senders = Arc::new(vec![
            (WorkloadKind::Deployment, dtx),
            (WorkloadKind::StatefulSet, stx),
            (WorkloadKind::DaemonSet, xtx),
        ]);
        tasks.push(
            run_kind::<Deployment>(
                api(&client, ns),
                drx,
                subscribe(&mut everything),
                ctx.clone(),
                ready_tx.clone(),
                shutdown.clone(),
            )
            .boxed(),
        );
        tasks.push(
            run_kind::<StatefulSet>(
                api(&client, ns),
                srx,
                subscribe(&mut everything),
                ctx.clone(),
                ready_tx.clone(),
                shutdown.clone(),
            )
            .boxed(),
        );
        tasks.push(
            run_kind::<DaemonSet>(
                api(&client, ns),
                xrx,
                subscribe(&mut everything),
                ctx.clone(),
                ready_tx.clone(),
                shutdown.clone(),
            )
            .boxed(),
        );
        for (kind, stream) in [
            (
                SourceKind::ConfigMap,
                source_events(
                    api::<PartialObjectMeta<ConfigMap>>(&client, ns),
                    SourceKind::ConfigMap,
                    ctx.clone(),
                    senders.clone(),
                    ready_tx.clone(),
                )
                .boxed(),
            ),
            (
                SourceKind::Secret,
                source_events(
                    api::<PartialObjectMeta<Secret>>(&client, ns),
                    SourceKind::Secret,
                    ctx.clone(),
                    senders.clone(),
                    ready_tx.clone(),
                )
                .boxed(),
            ),
        ] {
            let stop = shutdown.clone();
            tasks.push(
                async move {
                    stream.take_until(stop).for_each(|_| async {}).await;
                    tracing::debug!(kind = kind.as_str(), "source watch stopped");
                }
                .boxed(),
            );
        }
    }
    if let Some(selector) = settings.namespace_selector.clone() {
        expected += 1;
        let api: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
        let stream = namespace_events(api, selector, ctx.clone(), everything, ready_tx.clone());
        let stop = shutdown.clone();
        tasks.push(
            async move {
                stream.take_until(stop).for_each(|_| async {}).await;
            }
            .boxed(),
        );
    }
    drop(ready_tx);
    let stop = shutdown.clone();
    tasks.push(
        async move {
            let synced = ready_rx.take(expected).count();
            tokio::select! {
                n = synced => if n == expected {
                    readiness.set();
                    info!("config rollout caches synced");
                },
                _ = stop => {}
            }
        }
        .boxed(),
    );
    futures::future::join_all(tasks).await;
    info!("config rollout controller stopped");
    Ok(())
}
