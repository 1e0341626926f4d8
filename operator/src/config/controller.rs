//! The config rollout reconcile: the I/O around the pure modules for one workload.
//!
//! The watches that trigger it live in [`super::watch`]. One reconcile:
//!
//! 1. Reads the opt-in annotations; a workload that has not opted in (or whose namespace is out
//!    of the namespace selection) is dropped from the index.
//! 2. Lists its sources ([`discovery`]), updates the [`ReverseIndex`], GETs the bodies
//!    ([`fetch`]), hashes them under every key of the shared keyring ([`Digests`]) and drops
//!    them.
//! 3. Decides ([`super::rollout`]) and acts: records a baseline on the workload's metadata,
//!    requeues at the end of the coalescing window, or rolls by writing [`keys::CONFIG_HASH`]
//!    into the pod template. Writes are server-side applies with the field manager
//!    [`keys::FIELD_MANAGER`] that carry only the two annotations appset owns.
//! 4. Publishes an Event on a rollout (naming the changed sources, never values) and on a
//!    missing required source; counts everything in [`Metrics`].
//!
//! Caveats: the pending coalescing window and the time of the last rollout live in memory, so a
//! restart in the middle of a window restarts it, and the minimum interval starts afresh. A
//! change to the pod template that also adds or removes sources rolls the workload once for the
//! template and once more for the new digest.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use appset_crds::keys;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::api::Patch;
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder};
use kube::{Api, Client, ResourceExt};
use serde::Serialize;
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

use super::index::{ReverseIndex, SourceRef, WorkloadKind, WorkloadRef};
use super::memo::{Memo, Memos};
use super::metrics::Metrics;
use super::rollout::{Decision, Input, Policy, WorkloadState};
use super::snapshot;
use super::sourcecache::SourceDigests;
use crate::confighash::discovery::{self, OptIn};
use crate::confighash::fetch::{self, FetchError};
use crate::confighash::hash;
use crate::confighash::live::LiveKeyring;
use crate::confighash::rotation::{self, Digests, Observed};
use crate::kubeapi::{self, Namespaced, Scope};
use crate::sourcewatch::SourceVersions;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};

/// The name the controller reports Events as.
pub const CONTROLLER_NAME: &str = "appset.dev/config-rollout";

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
    /// Creating or adopting config snapshots failed.
    #[error("config snapshots in {namespace}: {source}")]
    Snapshot {
        /// The namespace.
        namespace: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The reconcile did not finish within [`kubeapi::RECONCILE_DEADLINE`].
    #[error("the reconcile did not finish within {0:?} (is the API server answering?); retrying")]
    Timeout(Duration),
}

/// Where and how the controller works.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The namespaces to watch.
    pub scope: Scope,
    /// Coalescing window and minimum interval.
    pub policy: Policy,
    /// Honour stakater/Reloader's annotations too.
    pub reloader_compat: bool,
    /// Allow snapshot mode (`appset.dev/config-rollout: snapshot`).
    pub snapshots: bool,
    /// How many workloads are reconciled at once.
    pub concurrency: u16,
    /// Reported as the Event's reporting instance (e.g. the pod name).
    pub instance: Option<String>,
    /// A label selector over namespaces (`team=payments`): only workloads in namespaces that
    /// match it now are handled, within `scope`. Followed live: a namespace that gains the
    /// labels is taken up, one that loses them is dropped.
    pub namespace_selector: Option<String>,
    /// Where each watch loop registers its heartbeat (`/healthz`); `None`: not watched.
    pub liveness: Option<appset_process::liveness::Liveness>,
    /// At start-up, LIST the Secrets (or ConfigMaps) of a part to fill the source digest
    /// cache when the workloads use at least this many of them; below, the reconciles GET
    /// them one by one.
    pub warm_up_min: usize,
}

impl Default for Settings {
    /// Every namespace, the default policy, no Reloader compatibility, 16 at once, a LIST at
    /// start-up from 64 used sources of a kind.
    fn default() -> Self {
        Self {
            scope: Scope::All,
            policy: Policy::default(),
            reloader_compat: false,
            snapshots: false,
            concurrency: 16,
            instance: None,
            namespace_selector: None,
            liveness: None,
            warm_up_min: 64,
        }
    }
}

/// A native workload kind the controller can roll.
pub trait Workload: Namespaced + Serialize {
    /// Its kind.
    const KIND: WorkloadKind;
    /// Its pod template.
    fn template(&self) -> &PodTemplateSpec;
    /// Its pod selector (also on its ReplicaSets or ControllerRevisions).
    fn selector(&self) -> &LabelSelector;
}

impl Workload for Deployment {
    const KIND: WorkloadKind = WorkloadKind::Deployment;
    fn template(&self) -> &PodTemplateSpec {
        &self.spec.template
    }
    fn selector(&self) -> &LabelSelector {
        &self.spec.selector
    }
}

impl Workload for StatefulSet {
    const KIND: WorkloadKind = WorkloadKind::StatefulSet;
    fn template(&self) -> &PodTemplateSpec {
        &self.spec.template
    }
    fn selector(&self) -> &LabelSelector {
        &self.spec.selector
    }
}

impl Workload for DaemonSet {
    const KIND: WorkloadKind = WorkloadKind::DaemonSet;
    fn template(&self) -> &PodTemplateSpec {
        &self.spec.template
    }
    fn selector(&self) -> &LabelSelector {
        &self.spec.selector
    }
}

/// Shared by every reconcile and by the watches.
pub struct Context {
    pub(crate) client: Client,
    pub(crate) settings: Settings,
    pub(crate) keyring: LiveKeyring,
    pub(crate) index: Mutex<ReverseIndex>,
    pub(crate) states: Mutex<HashMap<WorkloadRef, WorkloadState>>,
    /// The digests of each workload's sources until one of them is seen changing.
    pub(crate) memos: Mutex<Memos>,
    /// Each source's own digests while its version stays the same.
    pub(crate) source_digests: Mutex<SourceDigests>,
    /// The versions of the sources as the shared metadata watch last saw them.
    pub(crate) versions: SourceVersions,
    pub(crate) recorder: Recorder,
    pub(crate) metrics: Metrics,
    /// The namespaces matching `settings.namespace_selector`; `None` without a selector.
    pub(crate) selected: Option<RwLock<HashSet<String>>>,
}

impl Context {
    /// The shared state of one controller run.
    pub fn new(
        client: Client,
        settings: Settings,
        keyring: impl Into<LiveKeyring>,
        recorder: Recorder,
        metrics: Metrics,
    ) -> Self {
        let selected = settings
            .namespace_selector
            .as_ref()
            .map(|_| RwLock::new(HashSet::new()));
        Self {
            client,
            settings,
            keyring: keyring.into(),
            index: Mutex::new(ReverseIndex::default()),
            states: Mutex::new(HashMap::new()),
            memos: Mutex::new(Memos::default()),
            source_digests: Mutex::new(SourceDigests::default()),
            versions: SourceVersions::default(),
            recorder,
            metrics,
            selected,
        }
    }

    fn in_scope(&self, namespace: &str) -> bool {
        match &self.selected {
            None => true,
            Some(set) => set.read().map(|s| s.contains(namespace)).unwrap_or(false),
        }
    }

    /// The versions of the sources the metadata watch keeps, so that each source's digest is
    /// kept while its version stays the same. Without them (the default) every source is read
    /// at every reconcile that is not answered from the workload's memo.
    pub fn with_versions(mut self, versions: SourceVersions) -> Self {
        self.versions = versions;
        self
    }

    /// Drops everything known about a workload (deleted, or no longer opted in).
    pub(crate) fn forget(&self, workload: &WorkloadRef) {
        if let Ok(mut index) = self.index.lock() {
            index.remove(workload);
            self.metrics.workloads.set(index.len() as i64);
        }
        if let Ok(mut states) = self.states.lock() {
            states.remove(workload);
        }
        if let Ok(mut memos) = self.memos.lock() {
            memos.forget(workload);
        }
    }

    /// A source `workload` uses was seen changing: what its sources hashed to is read again.
    pub fn source_changed(&self, workload: &WorkloadRef) {
        if let Ok(mut memos) = self.memos.lock() {
            memos.invalidate(workload);
        }
    }

    /// After a complete list of the `kind`s in `part` (`None`: every namespace): drops what
    /// is known about every workload of that kind and part the list did not return (deleted
    /// while the watch was down, so no Delete event came). Returns how many were dropped.
    pub(crate) fn retain_listed(
        &self,
        kind: WorkloadKind,
        part: Option<&str>,
        listed: &HashSet<WorkloadRef>,
    ) -> usize {
        let covered = |w: &WorkloadRef| w.kind == kind && part.is_none_or(|ns| w.namespace == ns);
        let keep = |w: &WorkloadRef| !covered(w) || listed.contains(w);
        let dropped = match self.index.lock() {
            Ok(mut index) => {
                let gone = index.retain(keep);
                self.metrics.workloads.set(index.len() as i64);
                gone.len()
            }
            Err(_) => 0,
        };
        if let Ok(mut states) = self.states.lock() {
            states.retain(|w, _| keep(w));
        }
        if let Ok(mut memos) = self.memos.lock() {
            memos.retain(keep);
        }
        dropped
    }

    fn with_state(&self, workload: &WorkloadRef, f: impl FnOnce(&mut WorkloadState)) {
        if let Ok(mut states) = self.states.lock() {
            f(states.entry(workload.clone()).or_default());
        }
    }
}

/// The workload's kind, namespace and name.
pub(crate) fn workload_ref<K: Workload>(obj: &K) -> WorkloadRef {
    WorkloadRef {
        kind: K::KIND,
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
    }
}

async fn apply_annotations<K: Workload>(
    ctx: &Context,
    obj: &K,
    observed: &Observed,
    template_hash: Option<&str>,
    snapshots: Option<&str>,
) -> Result<(), Error> {
    let namespace = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let mut patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {
            "name": name,
            // A label: unlike an annotation, it neither bumps a Deployment's generation nor is
            // copied onto its ReplicaSet. The legacy annotation is not sent, so server-side
            // apply removes it at this write.
            "labels": { keys::CONFIG_BASELINE: observed.to_label() },
        },
    });
    // Server-side apply removes fields this manager owned and no longer sends, so the
    // template hash is always sent when there is one.
    // The same holds for the snapshot pins: sent in snapshot mode, dropped (and so removed)
    // when the mode is switched off.
    if let Some(hash) = template_hash {
        let mut annotations = json!({ keys::CONFIG_HASH: hash });
        if let Some(pins) = snapshots {
            annotations[keys::CONFIG_SNAPSHOTS] = json!(pins);
        }
        patch["spec"] = json!({"template": {"metadata": {"annotations": annotations}}});
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    api.patch(&name, &kubeapi::apply_params(), &Patch::Apply(&patch))
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
    kubeapi::publish(&ctx.recorder, obj, type_, reason, "ConfigRollout", note).await;
}

/// Reconciles one workload of kind `K` (the controller's reconcile function).
pub async fn reconcile<K: Workload>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error> {
    let wref = workload_ref(obj.as_ref());
    let span = info_span!("reconcile", kind = K::KIND.as_str(), namespace = %wref.namespace, name = %wref.name);
    kubeapi::within_deadline(
        reconcile_inner(obj.as_ref(), &ctx, &wref).instrument(span),
        || Error::Timeout(kubeapi::RECONCILE_DEADLINE),
    )
    .await
}

/// What one reconcile found: the digests of the data now and what the workload records.
struct Hashed {
    input: Input,
    per_source: BTreeMap<discovery::SourceName, String>,
    sources: usize,
    /// In snapshot mode: the sources as read (their data, to copy) and the copies to pin.
    snapshot: Option<(
        Vec<crate::confighash::hash::Source>,
        BTreeMap<discovery::SourceName, String>,
    )>,
}

async fn reconcile_inner<K: Workload>(
    obj: &K,
    ctx: &Context,
    wref: &WorkloadRef,
) -> Result<Action, Error> {
    ctx.metrics.reconciles.get_or_create(&K::KIND.into()).inc();
    let Some(hashed) = hash_sources(obj, ctx, wref).await? else {
        return Ok(Action::await_change());
    };
    let now = tokio::time::Instant::now().into_std();
    let decision = match ctx.states.lock() {
        Ok(mut states) => {
            states
                .entry(wref.clone())
                .or_default()
                .decide(&hashed.input, &ctx.settings.policy, now)
        }
        Err(_) => return Ok(Action::requeue(Duration::from_secs(1))),
    };
    let snapshots = hashed.snapshot.is_some();
    let action = act(obj, ctx, wref, hashed, decision, now).await?;
    if snapshots {
        adopt_snapshots(obj, ctx, wref).await?;
    }
    Ok(action)
}

/// Snapshot mode: the ReplicaSets take over the copies they use (see [`snapshot::adopt`]);
/// copies a revision names but that are gone are reported.
async fn adopt_snapshots<K: Workload>(
    obj: &K,
    ctx: &Context,
    wref: &WorkloadRef,
) -> Result<(), Error> {
    let uid = obj.meta().uid.clone().unwrap_or_default();
    let revisions = match K::KIND {
        WorkloadKind::Deployment => snapshot::Revisions::ReplicaSets,
        _ => snapshot::Revisions::ControllerRevisions,
    };
    let revisions = snapshot::list_revisions(
        &ctx.client,
        &wref.namespace,
        &uid,
        revisions,
        obj.selector(),
    )
    .await
    .map_err(|source| Error::Snapshot {
        namespace: wref.namespace.clone(),
        source,
    })?;
    let adoption = snapshot::adopt(&ctx.client, &wref.namespace, &uid, revisions)
        .await
        .map_err(|source| Error::Snapshot {
            namespace: wref.namespace.clone(),
            source,
        })?;
    if adoption.adopted > 0 || adoption.released > 0 {
        info!(
            adopted = adoption.adopted,
            released = adoption.released,
            "config snapshots now owned by the ReplicaSets that use them"
        );
    }
    if !adoption.missing.is_empty() {
        warn!(missing = ?adoption.missing, "config snapshots named by a revision are gone");
        publish(
            ctx,
            obj,
            EventType::Warning,
            "ConfigSnapshotMissing",
            format!(
                "Config snapshots named by a revision of this workload were deleted: {}. Pods of that revision cannot start until they exist; the current revision's snapshots are recreated while its sources hold the same data",
                adoption.missing.join(", ")
            ),
        )
        .await;
    }
    Ok(())
}

/// Steps 1 and 2: the opt-in, the index, and the digests of the sources now. `None` when the
/// workload is not (or no longer) handled.
async fn hash_sources<K: Workload>(
    obj: &K,
    ctx: &Context,
    wref: &WorkloadRef,
) -> Result<Option<Hashed>, Error> {
    let empty = BTreeMap::new();
    let annotations = obj.meta().annotations.as_ref().unwrap_or(&empty);
    let opted = OptIn::from_annotations(annotations, ctx.settings.reloader_compat)
        .filter(|_| ctx.in_scope(&wref.namespace));
    let Some(opt_in) = opted else {
        ctx.forget(wref);
        return Ok(None);
    };
    let refs = opt_in.references(obj.template().spec.as_ref());
    // Taken before the references are indexed and the sources read: a source event from here
    // on makes the memo of this read refused (see `memo`).
    let epoch = ctx.memos.lock().map(|mut m| m.epoch(wref)).unwrap_or(0);
    let names: BTreeSet<SourceRef> = refs
        .names()
        .map(|n| SourceRef::new(&wref.namespace, n))
        .collect();
    if let Ok(mut index) = ctx.index.lock() {
        index.set(wref, names);
        ctx.metrics.workloads.set(index.len() as i64);
    }
    let empty_labels = BTreeMap::new();
    let labels = obj.meta().labels.as_ref().unwrap_or(&empty_labels);
    let label = labels
        .get(keys::CONFIG_BASELINE)
        .and_then(|v| Observed::parse_label(v));
    // A baseline only in the annotation an older appset wrote: its digest is of the older kind.
    let legacy = match label {
        Some(_) => None,
        None => annotations
            .get(keys::CONFIG_HASH_OBSERVED)
            .and_then(|v| Observed::parse(v)),
    };
    let keyring = ctx.keyring.get();
    let snapshots = snapshot_mode(obj, ctx).await;
    // Outside snapshot mode the digests are all that is needed: reuse them while no source
    // was seen changing. Snapshot mode copies the data, so it always reads it; a legacy
    // baseline is compared with all the data once.
    if !snapshots && legacy.is_none() {
        let remembered = ctx.memos.lock().ok().and_then(|m| {
            m.get(
                wref,
                &refs,
                keyring.current.id(),
                keyring.previous.as_ref().map(|k| k.id()),
            )
            .cloned()
        });
        if let Some(memo) = remembered {
            ctx.metrics
                .digests_reused
                .get_or_create(&K::KIND.into())
                .inc();
            return Ok(Some(Hashed {
                input: Input {
                    observed: label,
                    digests: memo.digests,
                    missing: memo.missing,
                },
                per_source: memo.per_source,
                sources: refs.len(),
                snapshot: None,
            }));
        }
    }
    let keys = keyring.keys();
    let key_ids: Vec<&str> = keys.iter().map(|k| k.id()).collect();
    // Each source's own digest under each key: from the cache when its version is unchanged,
    // else read.
    let mut own: BTreeMap<discovery::SourceName, Vec<String>> = BTreeMap::new();
    let mut to_read = discovery::References::default();
    let full = snapshots || legacy.is_some();
    match ctx.source_digests.lock() {
        Ok(cache) if !full => {
            for (name, usage) in &refs.sources {
                let version = ctx.versions.get(name.kind, &wref.namespace, &name.name);
                let sref = SourceRef::new(&wref.namespace, name);
                match cache.get(&sref, &usage.keys, version.as_deref(), &key_ids) {
                    Some(digests) => {
                        own.insert(name.clone(), digests);
                    }
                    None => {
                        to_read.sources.insert(name.clone(), usage.clone());
                    }
                }
            }
        }
        _ => to_read = refs.clone(),
    }
    ctx.metrics
        .source_digests_reused
        .get_or_create(&K::KIND.into())
        .inc_by(own.len() as u64);
    let fetched = if to_read.is_empty() {
        fetch::Fetched::default()
    } else {
        fetch::sources(&ctx.client, &wref.namespace, &to_read).await?
    };
    ctx.metrics
        .source_reads
        .get_or_create(&K::KIND.into())
        .inc_by(to_read.len() as u64);
    for source in &fetched.sources {
        let name = source.source_name();
        let under_keys = hash::digests_under(&keys, source);
        let digests: Vec<String> = under_keys.iter().map(|(_, d)| d.clone()).collect();
        if let (Some(version), Some(usage), Ok(mut cache)) = (
            fetched.versions.get(&name),
            refs.sources.get(&name),
            ctx.source_digests.lock(),
        ) {
            cache.put(
                SourceRef::new(&wref.namespace, &name),
                usage.keys.clone(),
                version.clone(),
                under_keys,
            );
        }
        own.insert(name, digests);
    }
    let under = |i: usize| {
        let parts: Vec<hash::Part<'_>> = own
            .iter()
            .filter_map(|(name, d)| {
                Some(hash::Part {
                    kind: name.kind,
                    namespace: &wref.namespace,
                    name: &name.name,
                    digest: d.get(i)?,
                })
            })
            .collect();
        Observed {
            key_id: key_ids[i].to_string(),
            digest: hash::combine(keys[i], &parts),
        }
    };
    let digests = Digests {
        current: under(0),
        previous: (keys.len() > 1).then(|| under(1)),
    };
    let per_source: BTreeMap<discovery::SourceName, String> = own
        .iter()
        .filter_map(|(name, d)| Some((name.clone(), d.first()?.clone())))
        .collect();
    let observed = match (label, &legacy) {
        (Some(label), _) => Some(label),
        (None, Some(old)) => Some(rotation::translate_legacy(
            old,
            &Digests::of(&keyring, &fetched.sources),
            &digests,
        )),
        (None, None) => None,
    };
    let sources = refs.len();
    if !snapshots && let Ok(mut memos) = ctx.memos.lock() {
        memos.put(
            wref,
            epoch,
            Memo {
                refs,
                digests: digests.clone(),
                per_source: per_source.clone(),
                missing: fetched.missing.clone(),
            },
        );
    }
    let snapshot = snapshots.then(|| {
        // Only what the pods read is copied: a source listed by annotation alone rolls the
        // workload when it changes, but no pod reads a copy of it.
        let read: BTreeSet<discovery::SourceName> = obj
            .template()
            .spec
            .as_ref()
            .map(|spec| discovery::references(spec).names().cloned().collect())
            .unwrap_or_default();
        let mut pins = snapshot::desired(&fetched.sources, &per_source);
        pins.retain(|source, _| read.contains(source));
        (fetched.sources, pins)
    });
    Ok(Some(Hashed {
        input: Input {
            observed,
            digests,
            missing: fetched.missing,
        },
        per_source,
        sources,
        snapshot,
    }))
}

/// Whether the workload asks for snapshot mode and may have it; a Warning Event says why not
/// when it may not.
async fn snapshot_mode<K: Workload>(obj: &K, ctx: &Context) -> bool {
    let asked = obj
        .meta()
        .annotations
        .as_ref()
        .and_then(|a| a.get(keys::CONFIG_ROLLOUT))
        .is_some_and(|v| v.trim() == keys::CONFIG_ROLLOUT_SNAPSHOT);
    if !asked {
        return false;
    }
    let refused = if !ctx.settings.snapshots {
        Some("config snapshots are not enabled in this operator (--config-snapshots, chart value configRollout.snapshots)".to_string())
    } else {
        None
    };
    match refused {
        None => true,
        Some(why) => {
            publish(
                ctx,
                obj,
                EventType::Warning,
                "ConfigSnapshotsUnavailable",
                format!("Rolling out without snapshots: {why}"),
            )
            .await;
            false
        }
    }
}

fn owner_ref<K: Workload>(obj: &K) -> OwnerReference {
    OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: obj.name_any(),
        uid: obj.meta().uid.clone().unwrap_or_default(),
        ..Default::default()
    }
}

/// In snapshot mode: creates the copies (before any template names them) and returns the pin
/// annotation; `None` outside snapshot mode.
async fn pin<K: Workload>(
    obj: &K,
    ctx: &Context,
    wref: &WorkloadRef,
    hashed: &Hashed,
) -> Result<Option<String>, Error> {
    let Some((sources, pins)) = &hashed.snapshot else {
        return Ok(None);
    };
    snapshot::ensure(&ctx.client, &wref.namespace, sources, pins, &owner_ref(obj))
        .await
        .map_err(|source| Error::Snapshot {
            namespace: wref.namespace.clone(),
            source,
        })?;
    Ok(Some(snapshot::annotation(pins)))
}

/// Steps 3 and 4: carry out the decision.
async fn act<K: Workload>(
    obj: &K,
    ctx: &Context,
    wref: &WorkloadRef,
    hashed: Hashed,
    decision: Decision,
    now: std::time::Instant,
) -> Result<Action, Error> {
    let current = hashed.input.digests.current.clone();
    let template_annotations = obj
        .template()
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref());
    let template_hash = template_annotations.and_then(|a| a.get(keys::CONFIG_HASH));
    let pinned = template_annotations.and_then(|a| a.get(keys::CONFIG_SNAPSHOTS));
    // The pins the template should carry now (snapshot mode), made before any template names
    // them; outside snapshot mode, none.
    let pins = match &decision {
        Decision::Wait { .. } | Decision::Blocked(_) => None,
        _ => pin(obj, ctx, wref, &hashed).await?,
    };
    let per_source = hashed.per_source;
    match decision {
        Decision::Unchanged if pins.is_some() != pinned.is_some() => {
            // The mode was switched on or off with the data unchanged: this is the one rollout
            // the switch makes. Pins that merely differ are left alone: a rollback brought an
            // older revision's template back, pins included, and with them its config.
            let hash = template_hash
                .cloned()
                .unwrap_or_else(|| current.to_annotation());
            apply_annotations(ctx, obj, &current, Some(&hash), pins.as_deref()).await?;
            ctx.with_state(wref, |st| st.recorded(current, per_source));
            let note = if pins.is_some() {
                "Rolling out: pods are pinned to config snapshots from now on"
            } else {
                "Rolling out: pods read the ConfigMaps and Secrets directly again (snapshot mode off)"
            };
            publish(
                ctx,
                obj,
                EventType::Normal,
                "ConfigSnapshotsPinned",
                note.into(),
            )
            .await;
        }
        Decision::Unchanged => {
            ctx.with_state(wref, |st| {
                if st.per_source.is_empty() {
                    st.per_source = per_source;
                }
            });
        }
        Decision::Baseline(reason) => {
            apply_annotations(
                ctx,
                obj,
                &current,
                template_hash
                    .map(String::as_str)
                    .or(pins.as_ref().map(|_| current.to_annotation()).as_deref()),
                pins.as_deref(),
            )
            .await?;
            ctx.with_state(wref, |st| st.recorded(current, per_source));
            ctx.metrics.baselines.get_or_create(&K::KIND.into()).inc();
            info!(
                ?reason,
                sources = hashed.sources,
                "recorded the config baseline without a rollout"
            );
            if reason == super::rollout::BaselineReason::UnknownKey {
                publish(
                    ctx,
                    obj,
                    EventType::Warning,
                    "ConfigKeyUnknown",
                    "The config baseline was made with a hash key the operator no longer has (the key Secret was replaced without keeping `previous`, or rotated twice before this workload was compared); it is recorded again without a rollout. A change of its ConfigMaps or Secrets made at the same time is not rolled out: restart it if one was.".to_string(),
                )
                .await;
            }
        }
        Decision::Wait { until } => {
            let wait = until.saturating_duration_since(now);
            tracing::debug!(
                ?wait,
                "config changed; waiting for the coalescing window or minimum interval"
            );
            return Ok(Action::requeue(wait.max(Duration::from_millis(10))));
        }
        Decision::Roll => {
            let value = current.to_annotation();
            apply_annotations(ctx, obj, &current, Some(&value), pins.as_deref()).await?;
            let mut changed = None;
            ctx.with_state(wref, |st| {
                changed = Some(st.rolled(current, per_source, now))
            });
            let what = changed.map(|c| c.describe()).unwrap_or_default();
            ctx.metrics.rollouts.get_or_create(&K::KIND.into()).inc();
            info!(%what, "rolled out for changed config");
            publish(
                ctx,
                obj,
                EventType::Normal,
                "ConfigChanged",
                format!("Rolling out: referenced config {what}"),
            )
            .await;
        }
        Decision::Blocked(missing) => {
            let names: Vec<String> = missing.iter().map(ToString::to_string).collect();
            ctx.metrics
                .missing_sources
                .get_or_create(&K::KIND.into())
                .inc();
            warn!(missing = ?names, "required config sources do not exist; not rolling out");
            publish(
                ctx,
                obj,
                EventType::Warning,
                "MissingConfigSource",
                format!(
                    "Not rolling out: required {} not found in namespace {} (mark the reference optional, or create it)",
                    names.join(", "),
                    wref.namespace
                ),
            )
            .await;
        }
    }
    Ok(Action::await_change())
}

/// The controller's error policy: count, log, retry in 5 s.
pub fn error_policy<K: Workload>(obj: Arc<K>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.errors.get_or_create(&K::KIND.into()).inc();
    warn!(kind = K::KIND.as_str(), namespace = ?obj.namespace(), name = %obj.name_any(), error = %err, "config rollout reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}
