//! The config rollout watches: what triggers a reconcile, and the controller's start-up.
//!
//! For each part of the [`Scope`](crate::kubeapi::Scope) (one namespace, or the whole cluster):
//! * Deployments, StatefulSets and DaemonSets, each in a reflector store (with `managedFields`
//!   and the last-applied annotation stripped), filtered so that only changes of generation,
//!   annotations or labels trigger a reconcile (status updates do not), each driving one
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

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;

use std::time::Duration;

use appset_process::liveness::{Heartbeat, Liveness};
use appset_process::readiness::ReadyHandle;
use futures::channel::mpsc;
use futures::{FutureExt, SinkExt, Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::ListParams;
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
use crate::confighash::discovery::{KeySet, OptIn, SourceKind};
use crate::confighash::hash::{self, Source};
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
        // Labels too: the baseline is one, and a workload whose baseline was removed records
        // it again.
        .predicate_filter(
            predicates::generation
                .combine(predicates::annotations)
                .combine(predicates::labels),
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
        // Before the reconcile is queued: it must read the sources again.
        for w in &workloads {
            ctx.source_changed(w);
        }
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

/// Lists `api` page by page (`params`, with its limit), handing each object to `each`, so at
/// most one page is held at a time.
async fn list_pages<K>(
    api: &Api<K>,
    params: ListParams,
    mut each: impl FnMut(K),
) -> Result<usize, kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut params = params;
    let mut pages = 0;
    loop {
        let page = api.list(&params).await?;
        pages += 1;
        page.items.into_iter().for_each(&mut each);
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Ok(pages),
        }
    }
}

/// The sources the opted-in workloads of `api` use, with the keys of each use.
async fn wanted_by<K: Workload>(
    api: Api<K>,
    reloader_compat: bool,
    wanted: &mut HashMap<SourceRef, Vec<KeySet>>,
) -> Result<usize, kube::Error> {
    list_pages(&api, ListParams::default().limit(500), |obj: K| {
        let empty = Default::default();
        let annotations = obj.meta().annotations.as_ref().unwrap_or(&empty);
        let Some(opt_in) = OptIn::from_annotations(annotations, reloader_compat) else {
            return;
        };
        let namespace = obj.namespace().unwrap_or_default();
        for (name, usage) in opt_in.references(obj.template().spec.as_ref()).sources {
            let uses = wanted.entry(SourceRef::new(&namespace, &name)).or_default();
            if !uses.contains(&usage.keys) {
                uses.push(usage.keys);
            }
        }
    })
    .await
}

/// Start-up: fills the source digest cache from paginated LISTs of the ConfigMaps and Secrets
/// the opted-in workloads of part `part` use, so the first reconciles read a few pages instead
/// of one GET per source. It first waits (up to a minute) for the shared metadata watch to have
/// listed the part: an entry is used only while the watch shows the version it was made from.
/// Any failure only leaves the cache emptier (the reconciles then GET what they need).
async fn warm_up(ctx: &Context, part: Option<&str>) {
    let started = std::time::Instant::now();
    while !ctx.versions.synced(part) {
        if started.elapsed() > Duration::from_secs(60) {
            warn!(part = ?part, "the source metadata watch has not listed yet; starting without cached source digests");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = &ctx.client;
    let compat = ctx.settings.reloader_compat;
    let mut wanted: HashMap<SourceRef, Vec<KeySet>> = HashMap::new();
    let listed = async {
        wanted_by::<Deployment>(api_in(client, part), compat, &mut wanted).await?;
        wanted_by::<StatefulSet>(api_in(client, part), compat, &mut wanted).await?;
        wanted_by::<DaemonSet>(api_in(client, part), compat, &mut wanted).await?;
        Ok::<_, kube::Error>(())
    }
    .await;
    if let Err(err) = listed {
        warn!(part = ?part, error = %err, "listing the workloads to warm the source digest cache failed; going on without it");
        return;
    }
    let keyring = ctx.keyring.get();
    let keys = keyring.keys();
    let mut hashed = 0usize;
    let mut put = |kind: SourceKind,
                   namespace: String,
                   name: String,
                   version: Option<String>,
                   make: &dyn Fn(&KeySet) -> Source| {
        let sref = SourceRef {
            kind,
            namespace,
            name,
        };
        let (Some(uses), Some(version)) = (wanted.get(&sref), version) else {
            return;
        };
        let Ok(mut cache) = ctx.source_digests.lock() else {
            return;
        };
        for keyset in uses {
            let digests = hash::digests_under(&keys, &make(keyset));
            cache.put(sref.clone(), keyset.clone(), version.clone(), digests);
            hashed += 1;
        }
    };
    // A LIST reads every source of the part, used or not: worth it only when the workloads
    // use many (below that, their GETs cost less). Helm's release Secrets are large and never
    // a workload's config, so they are left out.
    let used = |kind: SourceKind| wanted.keys().filter(|s| s.kind == kind).count();
    let min = ctx.settings.warm_up_min.max(1);
    let want_secrets = used(SourceKind::Secret) >= min;
    let want_config_maps = used(SourceKind::ConfigMap) >= min;
    let lists = async {
        let mut pages = 0;
        if want_secrets {
            let secrets: Api<Secret> = api_in(client, part);
            let params = ListParams::default()
                .limit(100)
                .fields("type!=helm.sh/release.v1");
            pages += list_pages(&secrets, params, |s: Secret| {
                let (ns, name, version) = (
                    s.namespace().unwrap_or_default(),
                    s.name_any(),
                    s.resource_version(),
                );
                put(SourceKind::Secret, ns, name, version, &|keys| {
                    Source::from_secret(s.clone(), keys)
                });
            })
            .await?;
        }
        if want_config_maps {
            let cms: Api<ConfigMap> = api_in(client, part);
            pages += list_pages(&cms, ListParams::default().limit(500), |c: ConfigMap| {
                let (ns, name, version) = (
                    c.namespace().unwrap_or_default(),
                    c.name_any(),
                    c.resource_version(),
                );
                put(SourceKind::ConfigMap, ns, name, version, &|keys| {
                    Source::from_config_map(c.clone(), keys)
                });
            })
            .await?;
        }
        Ok::<_, kube::Error>(pages)
    }
    .await;
    match lists {
        Ok(pages) => info!(
            part = ?part,
            sources = wanted.len(),
            digests = hashed,
            pages,
            took = ?started.elapsed(),
            "warmed the source digest cache"
        ),
        Err(err) => {
            warn!(part = ?part, error = %err, "listing sources to warm the digest cache failed; the reconciles read what they need")
        }
    }
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
    let ctx = Arc::new(
        Context::new(client.clone(), settings.clone(), keyring, recorder, metrics)
            .with_versions(sources.versions()),
    );
    let shutdown = shutdown.boxed().shared();
    let parts = settings.scope.parts();
    let mut changes: Vec<mpsc::Receiver<SourceChange>> =
        parts.iter().map(|ns| sources.take(ns.as_deref())).collect();
    {
        // While the cache warms up, the source changes are read and dropped, so the shared
        // watch never waits for this controller: no workload has been reconciled yet, and
        // every one will be once its watch lists.
        let warm = async {
            for part in &parts {
                warm_up(&ctx, part.as_deref()).await;
            }
        };
        let drain = futures::future::join_all(
            changes
                .iter_mut()
                .map(|rx| async move { while rx.next().await.is_some() {} }),
        );
        futures::future::select(
            std::pin::pin!(warm),
            futures::future::select(std::pin::pin!(drain), shutdown.clone()),
        )
        .await;
    }
    let mut tasks = Vec::new();
    let mut everything = Vec::new();
    for (ns, changes) in parts.iter().zip(changes) {
        tasks.extend(scope_tasks(
            &client,
            ns.as_deref(),
            changes,
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
