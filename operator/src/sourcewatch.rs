//! The one metadata-only watch of ConfigMaps and Secrets that both controllers share.
//!
//! For each part of the [`Scope`] (one namespace, or the whole cluster) there is one watch per
//! kind, on `Api<PartialObjectMeta<_>>`: kube sends those list and watch requests with the
//! `Accept: …;as=PartialObjectMetadata` header, so the API server sends metadata only; no
//! ConfigMap or Secret body crosses the wire here (bodies are read one by one, and only for
//! the sources a workload being hashed references: [`crate::confighash::fetch`]). Every event
//! (apply, delete, and each object of a relist) becomes a [`SourceChange`] sent to every
//! subscriber of that part: config rollout looks the source up in its reverse index, the
//! AppSet controller in its store of AppSets.
//!
//! The subscribers' channels are bounded: when a controller falls behind, the watch waits
//! (the API server's stream is read more slowly) instead of queueing without limit.
//!
//! The watch also keeps [`SourceVersions`]: the `resourceVersion` of every ConfigMap and Secret
//! in scope as it last saw it (pruned to what each relist returned, so a source deleted during
//! a watch gap leaves it), and which parts have been listed once. Config rollout keeps each
//! source's digest for as long as its version there stays the same
//! ([`crate::config::sourcecache`]).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, RwLock};

use appset_process::readiness::ReadyHandle;
use futures::channel::mpsc;
use futures::{FutureExt, SinkExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tracing::warn;

use crate::confighash::discovery::SourceKind;
use crate::kubeapi::{self, Namespaced, Scope, api_in};

/// How many changes a subscriber's channel holds before the watch waits for it.
pub const CHANNEL_CAPACITY: usize = 1024;

/// A ConfigMap or Secret whose metadata was seen changing (or listed).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SourceChange {
    /// ConfigMap or Secret.
    pub kind: SourceKind,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

struct Part {
    namespace: Option<String>,
    subscribers: Vec<mpsc::Sender<SourceChange>>,
}

/// A source's kind, namespace and name.
pub type SourceKey = (SourceKind, String, String);

#[derive(Debug, Default)]
struct VersionTable {
    versions: HashMap<SourceKey, String>,
    /// The (kind, part) watches that completed a list at least once.
    synced: HashSet<(SourceKind, Option<String>)>,
}

/// The `resourceVersion` of every source in scope as the metadata watch last saw it.
#[derive(Clone, Debug, Default)]
pub struct SourceVersions(Arc<RwLock<VersionTable>>);

impl SourceVersions {
    /// The version last seen of a source; `None` when the watch has not seen it (not listed
    /// yet, or it does not exist).
    pub fn get(&self, kind: SourceKind, namespace: &str, name: &str) -> Option<String> {
        let table = self.0.read().ok()?;
        table
            .versions
            .get(&(kind, namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Whether both kinds' watches of part `namespace` (`None`: the whole cluster) completed a
    /// list.
    pub fn synced(&self, namespace: Option<&str>) -> bool {
        self.0.read().is_ok_and(|t| {
            [SourceKind::ConfigMap, SourceKind::Secret]
                .into_iter()
                .all(|k| t.synced.contains(&(k, namespace.map(String::from))))
        })
    }

    /// How many sources it knows.
    pub fn len(&self) -> usize {
        self.0.read().map(|t| t.versions.len()).unwrap_or(0)
    }

    /// Whether it knows no source.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn seen(&self, key: SourceKey, version: Option<String>) {
        if let Ok(mut t) = self.0.write() {
            match version {
                Some(v) => t.versions.insert(key, v),
                None => t.versions.remove(&key),
            };
        }
    }

    fn deleted(&self, key: &SourceKey) {
        if let Ok(mut t) = self.0.write() {
            t.versions.remove(key);
        }
    }

    /// After a complete list of `kind` in `part`: drops the sources it did not return.
    fn listed(&self, kind: SourceKind, part: Option<&str>, listed: &HashSet<SourceKey>) {
        if let Ok(mut t) = self.0.write() {
            t.versions.retain(|key, _| {
                key.0 != kind || part.is_some_and(|ns| key.1 != ns) || listed.contains(key)
            });
            t.synced.insert((kind, part.map(String::from)));
        }
    }
}

/// The shared watch, before it runs: subscribe each controller's parts, then [`Self::run`].
pub struct SourceWatch {
    parts: Vec<Part>,
    versions: SourceVersions,
}

impl SourceWatch {
    /// One watch per kind for each part of `scope`.
    pub fn new(scope: &Scope) -> Self {
        Self {
            parts: scope
                .parts()
                .into_iter()
                .map(|namespace| Part {
                    namespace,
                    subscribers: Vec::new(),
                })
                .collect(),
            versions: SourceVersions::default(),
        }
    }

    /// The versions this watch keeps (filled once it runs).
    pub fn versions(&self) -> SourceVersions {
        self.versions.clone()
    }

    /// The changes of the part `namespace` (`None`: the whole cluster) of the scope. A part
    /// that is not in the scope yields nothing.
    pub fn subscribe(&mut self, namespace: Option<&str>) -> mpsc::Receiver<SourceChange> {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        if let Some(part) = self
            .parts
            .iter_mut()
            .find(|p| p.namespace.as_deref() == namespace)
        {
            part.subscribers.push(tx);
        }
        rx
    }

    /// A watch for one controller alone (run without the operator's shared one, as the e2e
    /// tests do): its subscriptions, and the future that runs it until `shutdown`.
    pub fn alone(
        client: &Client,
        scope: &Scope,
        ready: &ReadyHandle,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> (Subscriptions, impl Future<Output = ()> + Send + 'static) {
        let mut watch = Self::new(scope);
        let sources = watch.subscribe_all();
        (sources, watch.run(client, ready, shutdown))
    }

    /// One subscription for every part of the scope.
    pub fn subscribe_all(&mut self) -> Subscriptions {
        let parts: Vec<Option<String>> = self.parts.iter().map(|p| p.namespace.clone()).collect();
        Subscriptions(
            parts
                .into_iter()
                .map(|ns| {
                    let rx = self.subscribe(ns.as_deref());
                    (ns, rx)
                })
                .collect(),
            self.versions(),
        )
    }

    /// Runs every watch until `shutdown`. `ready` gives one handle per watch, released at the
    /// end of its first complete list.
    pub fn run(
        self,
        client: &Client,
        ready: &ReadyHandle,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let shutdown = shutdown.boxed().shared();
        let parts: Vec<_> = self
            .parts
            .into_iter()
            .map(|part| {
                let place = part.namespace.as_deref().unwrap_or("all namespaces");
                let ns = part.namespace.as_deref();
                let both = futures::stream::select(
                    changes::<ConfigMap>(
                        api_in(client, ns),
                        SourceKind::ConfigMap,
                        ready.also(format!("ConfigMap metadata watch ({place})")),
                        (self.versions.clone(), part.namespace.clone()),
                    ),
                    changes::<Secret>(
                        api_in(client, ns),
                        SourceKind::Secret,
                        ready.also(format!("Secret metadata watch ({place})")),
                        (self.versions.clone(), part.namespace.clone()),
                    ),
                );
                fan_out(both.take_until(shutdown.clone()), part.subscribers)
            })
            .collect();
        async move {
            futures::future::join_all(parts).await;
        }
    }
}

/// A controller's subscriptions, one per part of the scope, and the watch's versions.
pub struct Subscriptions(
    HashMap<Option<String>, mpsc::Receiver<SourceChange>>,
    SourceVersions,
);

impl Subscriptions {
    /// The versions the watch keeps.
    pub fn versions(&self) -> SourceVersions {
        self.1.clone()
    }

    /// The changes of part `namespace`; a part never subscribed yields nothing.
    pub fn take(&mut self, namespace: Option<&str>) -> mpsc::Receiver<SourceChange> {
        self.0
            .remove(&namespace.map(String::from))
            .unwrap_or_else(|| mpsc::channel(0).1)
    }
}

/// The source a config snapshot copies (from its `appset.dev/snapshot-of` annotation), when
/// `m` is one.
fn snapshot_source<S>(kind: SourceKind, m: &PartialObjectMeta<S>) -> Option<String> {
    let of = m
        .metadata
        .annotations
        .as_ref()?
        .get(appset_crds::keys::SNAPSHOT_OF)?;
    let (k, name) = of.split_once('/')?;
    let matches = match kind {
        SourceKind::ConfigMap => k == "configmap",
        SourceKind::Secret => k == "secret",
    };
    (matches && !name.is_empty()).then(|| name.to_string())
}

/// The changes one metadata watch reports.
fn changes<S: Namespaced>(
    api: kube::Api<PartialObjectMeta<S>>,
    kind: SourceKind,
    ready: ReadyHandle,
    (versions, part): (SourceVersions, Option<String>),
) -> impl Stream<Item = Option<SourceChange>> + Send {
    let watch = watcher(api, watcher::Config::default()).backoff(kubeapi::watch_backoff());
    let mut listing: Option<HashSet<SourceKey>> = None;
    let key =
        move |m: &PartialObjectMeta<S>| (kind, m.namespace().unwrap_or_default(), m.name_any());
    // The versions are updated before the change is sent, so a reconcile it triggers sees them.
    let track = move |ev: &Result<watcher::Event<PartialObjectMeta<S>>, watcher::Error>| match ev {
        Ok(watcher::Event::Init) => listing = Some(HashSet::new()),
        Ok(watcher::Event::InitApply(m)) => {
            if let Some(l) = listing.as_mut() {
                l.insert(key(m));
            }
            versions.seen(key(m), m.resource_version());
        }
        Ok(watcher::Event::Apply(m)) => versions.seen(key(m), m.resource_version()),
        Ok(watcher::Event::Delete(m)) => versions.deleted(&key(m)),
        Ok(watcher::Event::InitDone) => {
            if let Some(l) = listing.take() {
                versions.listed(kind, part.as_deref(), &l);
            }
        }
        Err(_) => {}
    };
    kubeapi::release_on_sync(watch.inspect(track), ready).map(move |ev| match ev {
        // A config snapshot deleted (by hand) counts as a change of its source, so the workloads
        // that use it are reconciled and the current revision's copy is recreated; its other
        // changes (owner references) concern nobody.
        Ok(watcher::Event::Delete(m)) => Some(SourceChange {
            kind,
            namespace: m.namespace().unwrap_or_default(),
            name: snapshot_source(kind, &m).unwrap_or_else(|| m.name_any()),
        }),
        Ok(watcher::Event::Apply(m) | watcher::Event::InitApply(m)) => {
            snapshot_source(kind, &m).is_none().then(|| SourceChange {
                kind,
                namespace: m.namespace().unwrap_or_default(),
                name: m.name_any(),
            })
        }
        Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
        Err(err) => {
            warn!(kind = kind.as_str(), error = %err, "source metadata watch failed; retrying");
            None
        }
    })
}

/// Sends each change to every subscriber, waiting for room; a subscriber that went away is
/// dropped.
async fn fan_out(
    changes: impl Stream<Item = Option<SourceChange>> + Send,
    mut subscribers: Vec<mpsc::Sender<SourceChange>>,
) {
    let mut changes = std::pin::pin!(changes);
    while let Some(change) = changes.next().await {
        let Some(change) = change else { continue };
        let mut kept = Vec::with_capacity(subscribers.len());
        for mut tx in subscribers.drain(..) {
            if tx.send(change.clone()).await.is_ok() {
                kept.push(tx);
            }
        }
        subscribers = kept;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(annotations: &[(&str, &str)]) -> PartialObjectMeta<ConfigMap> {
        let mut m = PartialObjectMeta::<ConfigMap>::default();
        m.metadata.name = Some("app-config-0123456789".into());
        m.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        m
    }

    #[test]
    fn a_snapshot_stands_for_the_source_it_copies() {
        let of = appset_crds::keys::SNAPSHOT_OF;
        assert_eq!(
            snapshot_source(
                SourceKind::ConfigMap,
                &meta(&[(of, "configmap/app-config")])
            ),
            Some("app-config".into())
        );
        assert_eq!(
            snapshot_source(SourceKind::Secret, &meta(&[(of, "configmap/app-config")])),
            None
        );
        assert_eq!(
            snapshot_source(SourceKind::ConfigMap, &meta(&[(of, "configmap/")])),
            None
        );
        assert_eq!(snapshot_source(SourceKind::ConfigMap, &meta(&[])), None);
    }
}
