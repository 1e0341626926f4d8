//! The config rollout watches: what triggers a reconcile, and the controller's start-up.
//!
//! For each part of the [`Scope`](crate::kubeapi::Scope) (one namespace, or the whole cluster):
//! * Deployments, StatefulSets and DaemonSets, each in a reflector store (with `managedFields`
//!   and the last-applied annotation stripped), filtered so that only changes of generation or
//!   annotations trigger a reconcile (status updates do not), each driving one
//!   [`Controller`] whose reconcile is [`controller::reconcile`];
//! * the changes of ConfigMaps and Secrets from the shared metadata-only watch
//!   ([`crate::sourcewatch`]), looked up in the [`ReverseIndex`](super::index::ReverseIndex):
//!   the workloads that use the source are queued for a reconcile. Events that do not touch
//!   data (labels, annotations) queue them too, and the reconcile finds the digest unchanged.
//! * with `--namespace-selector`, the metadata of the namespaces it matches, followed live.
//!
//! Readiness: [`run`] takes a [`ReadyHandle`] gate, derives one handle per watch, releases the
//! gate, and each watch releases its own handle at the end of its first complete list.
//!
//! Queues: the triggers of each workload kind go through bounded channels (a slow controller
//! slows the source watch down rather than queueing without limit); "reconcile everything"
//! (the namespace selection changed) is a channel of one, and a signal already waiting stands
//! for any number sent after it.
//!
//! State: the reverse index and the per-workload state are pruned after every complete
//! (re)list of a workload kind to the workloads that list returned, so a workload deleted while
//! the watch was down does not stay in them.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use std::time::Duration;

use appset_process::liveness::{Heartbeat, Liveness};
use appset_process::readiness::ReadyHandle;
use futures::channel::mpsc;
use futures::{FutureExt, SinkExt, Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Namespace;
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::utils::predicates;
use kube::runtime::{Controller, Predicate, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, warn};

use super::controller::{
    self, CONTROLLER_NAME, Context, Settings, Workload, error_policy, workload_ref,
};
use super::index::{SourceRef, WorkloadKind, WorkloadRef};
use super::metrics::Metrics;
use crate::confighash::live::LiveKeyring;
use crate::kubeapi::{self, api_in};
use crate::sourcewatch::{SourceChange, SourceWatch, Subscriptions};

type Senders = Vec<(WorkloadKind, mpsc::Sender<WorkloadRef>)>;

/// How many triggers of one workload kind wait before the source watch waits for the
/// controller.
const TRIGGER_CAPACITY: usize = 1024;

fn strip<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
    if let Some(a) = obj.meta_mut().annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// Runs one controller for kind `K` over `api`, triggered also by `triggers`.
async fn run_kind<K: Workload>(
    api: Api<K>,
    part: Option<String>,
    triggers: mpsc::Receiver<WorkloadRef>,
    reconcile_all: mpsc::Receiver<()>,
    ctx: Arc<Context>,
    ready: ReadyHandle,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (reader, writer) = reflector::store::<K>();
    let forget = ctx.clone();
    let heartbeat = heartbeat(&ctx, K::KIND.as_str(), part.as_deref());
    let (on_event, on_trigger, on_done) = (heartbeat.clone(), heartbeat.clone(), heartbeat);
    let watch = watcher(api, watcher::Config::default())
        .backoff(kubeapi::watch_backoff())
        .modify(strip::<K>)
        .reflect(writer);
    let mut listed: Option<HashSet<WorkloadRef>> = None;
    let stream = kubeapi::release_on_sync(watch, ready)
        .inspect_ok(move |ev| match ev {
            watcher::Event::Delete(obj) => forget.forget(&workload_ref(obj)),
            watcher::Event::Init => listed = Some(HashSet::new()),
            watcher::Event::InitApply(obj) => {
                if let Some(l) = listed.as_mut() {
                    l.insert(workload_ref(obj));
                }
            }
            watcher::Event::InitDone => {
                if let Some(l) = listed.take() {
                    forget.retain_listed(K::KIND, part.as_deref(), &l);
                }
            }
            watcher::Event::Apply(_) => {}
        })
        .applied_objects()
        .predicate_filter(
            predicates::generation.combine(predicates::annotations),
            Default::default(),
        )
        .inspect(move |_| on_event.demand());
    let triggers = triggers.map(move |w| {
        on_trigger.demand();
        ObjectRef::<K>::new(&w.name).within(&w.namespace)
    });
    Controller::for_stream(stream, reader)
        .reconcile_on(triggers)
        // A key rotation compares every workload again, while the previous key is at hand.
        .reconcile_all_on(futures::stream::select(
            reconcile_all,
            ctx.keyring.rotations(),
        ))
        .with_config(
            kube::runtime::controller::Config::default().concurrency(ctx.settings.concurrency),
        )
        .graceful_shutdown_on(shutdown)
        .run(controller::reconcile::<K>, error_policy::<K>, ctx)
        .for_each(move |res| {
            on_done.beat();
            async move {
                if let Err(err) = res
                    && !matches!(err, kube::runtime::controller::Error::ObjectNotFound(_))
                {
                    warn!(kind = K::KIND.as_str(), error = %err, "config rollout controller");
                }
            }
        })
        .await;
}

/// The heartbeat of one workload kind's loop in one part of the scope (a detached one when
/// the settings ask for no liveness).
fn heartbeat(ctx: &Context, kind: &str, part: Option<&str>) -> Heartbeat {
    let name = format!(
        "config rollout {kind} loop ({})",
        part.unwrap_or("all namespaces")
    );
    match &ctx.settings.liveness {
        Some(l) => l.register(name),
        None => Liveness::new(Duration::MAX).register(name),
    }
}

/// Queues, for each changed source, the workloads that use it.
fn source_events(
    changes: mpsc::Receiver<SourceChange>,
    ctx: Arc<Context>,
    senders: Senders,
) -> impl Stream<Item = ()> + Send {
    changes.then(move |change| {
        let source = SourceRef {
            kind: change.kind,
            namespace: change.namespace,
            name: change.name,
        };
        let workloads = match ctx.index.lock() {
            Ok(index) => index.workloads(&source),
            Err(_) => Vec::new(),
        };
        let mut senders = senders.clone();
        async move {
            for w in workloads {
                if let Some((_, tx)) = senders.iter_mut().find(|(k, _)| *k == w.kind) {
                    let _ = tx.send(w).await;
                }
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
    everything: Vec<mpsc::Sender<()>>,
    ready: ReadyHandle,
) -> impl Stream<Item = ()> + Send {
    let mut ready = Some(ready);
    let mut everything = everything;
    let mut listing: HashSet<String> = HashSet::new();
    watcher(api, watcher::Config::default().labels(&selector))
        .backoff(kubeapi::watch_backoff())
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
                    // Released only once the selection is in place.
                    if let Some(handle) = ready.take() {
                        handle.ready();
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
                for tx in &mut everything {
                    // Full means a "reconcile everything" is already waiting: it covers this one.
                    let _ = tx.try_send(());
                }
            }
        })
}

/// Drives a trigger stream until `stop`.
fn drain(
    stream: impl Stream<Item = ()> + Send + 'static,
    stop: impl Future<Output = ()> + Send + 'static,
) -> futures::future::BoxFuture<'static, ()> {
    async move { stream.take_until(stop).for_each(|_| async {}).await }.boxed()
}

/// The three workload controllers of one part of the scope, and the routing of its source
/// changes to them.
fn scope_tasks(
    client: &Client,
    ns: Option<&str>,
    sources: mpsc::Receiver<SourceChange>,
    ctx: &Arc<Context>,
    ready: &ReadyHandle,
    everything: &mut Vec<mpsc::Sender<()>>,
    shutdown: &futures::future::Shared<futures::future::BoxFuture<'static, ()>>,
) -> Vec<futures::future::BoxFuture<'static, ()>> {
    let place = ns.unwrap_or("all namespaces");
    // Each kind's "reconcile everything" trigger, fired when the namespace selection changes.
    let mut subscribe = || {
        let (tx, rx) = mpsc::channel(0);
        everything.push(tx);
        rx
    };
    let (dtx, drx) = mpsc::channel(TRIGGER_CAPACITY);
    let (stx, srx) = mpsc::channel(TRIGGER_CAPACITY);
    let (xtx, xrx) = mpsc::channel(TRIGGER_CAPACITY);
    let senders: Senders = vec![
        (WorkloadKind::Deployment, dtx),
        (WorkloadKind::StatefulSet, stx),
        (WorkloadKind::DaemonSet, xtx),
    ];
    vec![
        run_kind::<Deployment>(
            api_in(client, ns),
            ns.map(String::from),
            drx,
            subscribe(),
            ctx.clone(),
            ready.also(format!("Deployment watch ({place})")),
            shutdown.clone(),
        )
        .boxed(),
        run_kind::<StatefulSet>(
            api_in(client, ns),
            ns.map(String::from),
            srx,
            subscribe(),
            ctx.clone(),
            ready.also(format!("StatefulSet watch ({place})")),
            shutdown.clone(),
        )
        .boxed(),
        run_kind::<DaemonSet>(
            api_in(client, ns),
            ns.map(String::from),
            xrx,
            subscribe(),
            ctx.clone(),
            ready.also(format!("DaemonSet watch ({place})")),
            shutdown.clone(),
        )
        .boxed(),
        drain(
            source_events(sources, ctx.clone(), senders),
            shutdown.clone(),
        ),
    ]
}

/// Runs the config rollout controller until `shutdown` completes. A failing watch retries
/// with backoff, so nothing stops it but `shutdown`.
///
/// Watches the workloads and sources in `settings.scope`, hashing with the shared `keyring`.
/// `ready` is released once every watch has been derived from it; each watch is ready after
/// its first complete list. Metrics are counted into `metrics` (see [`Metrics::register`]).
pub async fn run(
    client: Client,
    settings: Settings,
    keyring: impl Into<LiveKeyring>,
    metrics: Metrics,
    ready: ReadyHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let shutdown = shutdown.boxed().shared();
    let (sources, watch) = SourceWatch::alone(&client, &settings.scope, &ready, shutdown.clone());
    let controller = run_with_sources(client, settings, keyring, metrics, sources, ready, shutdown);
    futures::future::join(watch, controller).await;
}

/// [`run`] with the source changes of a [`SourceWatch`] the caller runs (the operator shares
/// one between both controllers).
pub async fn run_with_sources(
    client: Client,
    settings: Settings,
    keyring: impl Into<LiveKeyring>,
    metrics: Metrics,
    mut sources: Subscriptions,
    ready: ReadyHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let keyring: LiveKeyring = keyring.into();
    info!(key_id = keyring.get().current.id(), scope = ?settings.scope, "config rollout controller starting");
    let reporter = Reporter {
        controller: CONTROLLER_NAME.to_string(),
        instance: settings.instance.clone(),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings.clone(),
        keyring,
        recorder,
        metrics,
    ));
    let shutdown = shutdown.boxed().shared();
    let mut tasks = Vec::new();
    let mut everything = Vec::new();
    for ns in settings.scope.parts() {
        tasks.extend(scope_tasks(
            &client,
            ns.as_deref(),
            sources.take(ns.as_deref()),
            &ctx,
            &ready,
            &mut everything,
            &shutdown,
        ));
    }
    if let Some(selector) = settings.namespace_selector.clone() {
        let api: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
        let handle = ready.also("namespace selection");
        let stream = namespace_events(api, selector, ctx.clone(), everything, handle);
        tasks.push(drain(stream, shutdown.clone()));
    }
    ready.ready();
    futures::future::join_all(tasks).await;
    info!("config rollout controller stopped");
}
