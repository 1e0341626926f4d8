//! The config rollout watches: what triggers a reconcile, and the controller's start-up.
//!
//! For each part of the [`Scope`](crate::kubeapi::Scope) (one namespace, or the whole cluster):
//! * Deployments, StatefulSets and DaemonSets, each in a reflector store (with `managedFields`
//!   and the last-applied annotation stripped), filtered so that only changes of generation or
//!   annotations trigger a reconcile (status updates do not), each driving one
//!   [`Controller`] whose reconcile is [`controller::reconcile`];
//! * ConfigMaps and Secrets through `Api<PartialObjectMeta<_>>` watches whose events are
//!   looked up in the [`ReverseIndex`](super::index::ReverseIndex): the workloads that use the
//!   source are queued for a reconcile. Events that do not touch data (labels, annotations)
//!   queue them too, and the reconcile finds the digest unchanged. kube sends these list and
//!   watch requests with the `as=PartialObjectMetadata` Accept header, so the API server sends
//!   metadata only: bodies never arrive here and none is cached.
//! * with `--namespace-selector`, the metadata of the namespaces it matches, followed live.
//!
//! Readiness: [`run`] takes a [`ReadyHandle`] gate, derives one handle per watch, releases the
//! gate, and each watch releases its own handle at the end of its first complete list.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use appset_process::readiness::ReadyHandle;
use futures::channel::mpsc;
use futures::{FutureExt, Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
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
use crate::confighash::discovery::SourceKind;
use crate::confighash::keyring::Keyring;
use crate::kubeapi::{self, Namespaced, api_in};

type Senders = Arc<Vec<(WorkloadKind, mpsc::UnboundedSender<WorkloadRef>)>>;

fn strip<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
    if let Some(a) = obj.meta_mut().annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// Runs one controller for kind `K` over `api`, triggered also by `triggers`.
async fn run_kind<K: Workload>(
    api: Api<K>,
    triggers: mpsc::UnboundedReceiver<WorkloadRef>,
    reconcile_all: mpsc::UnboundedReceiver<()>,
    ctx: Arc<Context>,
    ready: ReadyHandle,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (reader, writer) = reflector::store::<K>();
    let forget = ctx.clone();
    let watch = watcher(api, watcher::Config::default())
        .backoff(kubeapi::watch_backoff())
        .modify(strip::<K>)
        .reflect(writer);
    let stream = kubeapi::release_on_sync(watch, ready)
        .inspect_ok(move |ev| {
            if let watcher::Event::Delete(obj) = ev {
                forget.forget(&workload_ref(obj));
            }
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
        .run(controller::reconcile::<K>, error_policy::<K>, ctx)
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
    ready: ReadyHandle,
) -> impl Stream<Item = ()> + Send
where
    S: Namespaced,
{
    let watch = watcher(api, watcher::Config::default()).backoff(kubeapi::watch_backoff());
    kubeapi::release_on_sync(watch, ready)
        .filter_map(move |ev| {
            let out = match ev {
                Ok(watcher::Event::Apply(m) | watcher::Event::Delete(m) | watcher::Event::InitApply(m)) => Some(m),
                Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
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
    ready: ReadyHandle,
) -> impl Stream<Item = ()> + Send {
    let mut ready = Some(ready);
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
                for tx in &everything {
                    let _ = tx.unbounded_send(());
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

/// The three workload controllers and two source watches of one part of the scope.
fn scope_tasks(
    client: &Client,
    ns: Option<&str>,
    ctx: &Arc<Context>,
    ready: &ReadyHandle,
    everything: &mut Vec<mpsc::UnboundedSender<()>>,
    shutdown: &futures::future::Shared<futures::future::BoxFuture<'static, ()>>,
) -> Vec<futures::future::BoxFuture<'static, ()>> {
    let place = ns.unwrap_or("all namespaces");
    // Each kind's "reconcile everything" trigger, fired when the namespace selection changes.
    let mut subscribe = || {
        let (tx, rx) = mpsc::unbounded();
        everything.push(tx);
        rx
    };
    let (dtx, drx) = mpsc::unbounded();
    let (stx, srx) = mpsc::unbounded();
    let (xtx, xrx) = mpsc::unbounded();
    let senders: Senders = Arc::new(vec![
        (WorkloadKind::Deployment, dtx),
        (WorkloadKind::StatefulSet, stx),
        (WorkloadKind::DaemonSet, xtx),
    ]);
    vec![
        run_kind::<Deployment>(
            api_in(client, ns),
            drx,
            subscribe(),
            ctx.clone(),
            ready.also(format!("Deployment watch ({place})")),
            shutdown.clone(),
        )
        .boxed(),
        run_kind::<StatefulSet>(
            api_in(client, ns),
            srx,
            subscribe(),
            ctx.clone(),
            ready.also(format!("StatefulSet watch ({place})")),
            shutdown.clone(),
        )
        .boxed(),
        run_kind::<DaemonSet>(
            api_in(client, ns),
            xrx,
            subscribe(),
            ctx.clone(),
            ready.also(format!("DaemonSet watch ({place})")),
            shutdown.clone(),
        )
        .boxed(),
        drain(
            source_events(
                api_in::<PartialObjectMeta<ConfigMap>>(client, ns),
                SourceKind::ConfigMap,
                ctx.clone(),
                senders.clone(),
                ready.also(format!("ConfigMap metadata watch ({place})")),
            ),
            shutdown.clone(),
        ),
        drain(
            source_events(
                api_in::<PartialObjectMeta<Secret>>(client, ns),
                SourceKind::Secret,
                ctx.clone(),
                senders,
                ready.also(format!("Secret metadata watch ({place})")),
            ),
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
    keyring: Arc<Keyring>,
    metrics: Metrics,
    ready: ReadyHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    info!(key_id = keyring.current.id(), scope = ?settings.scope, "config rollout controller starting");
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
