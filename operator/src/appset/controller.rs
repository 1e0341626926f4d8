//! The AppSet controller: the I/O half. Everything it decides comes from the pure modules.
//!
//! Data flow of one reconcile of an AppSet:
//!
//! 1. The headless Service is applied when `service: Managed` (server-side apply).
//! 2. With `configRollout`, the ConfigMaps and Secrets the template references are read through
//!    [`crate::config::fetch`] and hashed with the installation's key
//!    ([`crate::config::hash::digest`]); bodies are dropped right after hashing.
//! 3. The ControllerRevisions are listed and [`revision`] picks (creates, reuses) the update
//!    revision.
//! 4. Pods matching the selector and claims named after the templates are listed fresh from the
//!    API server (no cache: the planner must never see a pod twice or miss one it just created).
//!    Orphans with matching names are adopted (owner reference on pods, label on claims).
//! 5. [`plan`] decides; the plan is executed in order — claim owners, claim creations, pod
//!    deletions, pod creations — each step with bounded concurrency, stopping at the first error.
//! 6. Claims are compared with their templates ([`storage`]) and expanded when allowed.
//! 7. Old revisions beyond `revisionHistoryLimit` are pruned, and the status ([`status`]) is
//!    written with server-side apply when it changed.
//!
//! Pods and claims are created with `create` and changed with targeted merge patches guarded
//! by `resourceVersion`, always under the single field manager [`keys::FIELD_MANAGER`]:
//! applying a partial claim would make the apply manager give up fields such as `accessModes`,
//! which a bound claim cannot lose. Objects the controller fully owns (Service, status) use
//! server-side apply. Watches on owned Pods, ControllerRevisions, Services, labelled claims and
//! the metadata of ConfigMaps and Secrets trigger reconciles; failures requeue with
//! exponential backoff (1 s doubling to 5 min), and every reconcile requeues at least every
//! five minutes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt, stream};
use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolumeClaim, Pod, PodTemplateSpec, Secret, Service,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    DeleteParams, ListParams, ObjectMeta, PartialObjectMeta, Patch, PatchParams, PostParams,
    Preconditions,
};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

use appset_crds::appset::{AppSetStatus, PodManagementPolicy, UpdateStrategyType};
use appset_crds::{AppSet, keys};

use super::plan::{self, ClaimInfo, DeleteReason, PlanInput, PodInfo, PodPhase};
use super::storage::{self, ClaimChange};
use super::{build, revision, status};
use crate::config::{discovery, fetch, hash, keyring};

/// The name the controller reports Events under.
pub const CONTROLLER_NAME: &str = "appset-controller";

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
    /// Reading the config sources or the hash key failed.
    #[error("config rollout: {0}")]
    Config(#[from] fetch::FetchError),
    /// The AppSet cannot be handled as it is.
    #[error("{0}")]
    Invalid(String),
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Kube { what, source }
}

/// Errors that stop the controller from starting.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The hash key Secret could not be read or created.
    #[error("cannot read the config hash key: {0}")]
    Keyring(#[from] fetch::FetchError),
}

/// Where and how the controller works.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Namespaces to watch; `None` watches every namespace.
    pub namespaces: Option<Vec<String>>,
    /// Namespace of the config hash key Secret (shared with the config rollout controller).
    pub key_namespace: String,
    /// Name of the config hash key Secret.
    pub key_secret: String,
    /// How many AppSets are reconciled at once.
    pub concurrency: u16,
    /// How many creations or deletions one reconcile sends at once (`Parallel` policy).
    pub burst: usize,
    /// Reported as the Events' reporting instance (e.g. the pod name).
    pub instance: Option<String>,
}

impl Settings {
    /// Defaults: every namespace, the default key Secret in `key_namespace`.
    pub fn new(key_namespace: impl Into<String>) -> Self {
        Self {
            namespaces: None,
            key_namespace: key_namespace.into(),
            key_secret: keyring::DEFAULT_SECRET_NAME.to_string(),
            concurrency: 8,
            burst: 32,
            instance: None,
        }
    }
}

struct Context {
    client: Client,
    recorder: Recorder,
    keyring: keyring::Keyring,
    settings: Settings,
    failures: Mutex<HashMap<ObjectRef<AppSet>, u32>>,
}

/// Runs the AppSet controller until `shutdown` completes.
///
/// Reads (or creates) the config hash key, then runs one controller per namespace in
/// `settings.namespaces` (or one for the whole cluster).
pub async fn run(
    client: Client,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let keyring =
        fetch::ensure_keyring(&client, &settings.key_namespace, &settings.key_secret).await?;
    info!(namespaces = ?settings.namespaces, "AppSet controller starting");
    let reporter = Reporter {
        controller: CONTROLLER_NAME.to_string(),
        instance: settings.instance.clone(),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        keyring,
        settings: settings.clone(),
        failures: Mutex::new(HashMap::new()),
    });
    let shutdown = shutdown.shared();
    let scopes: Vec<Option<String>> = match &settings.namespaces {
        None => vec![None],
        Some(list) => list.iter().cloned().map(Some).collect(),
    };
    let runs = scopes.into_iter().map(|ns| {
        let client = client.clone();
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        run_scope(client, ns, ctx, shutdown)
    });
    futures::future::join_all(runs).await;
    info!("AppSet controller stopped");
    Ok(())
}

fn api_in<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

async fn run_scope(
    client: Client,
    ns: Option<String>,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let ns = ns.as_deref();
    let labelled = watcher::Config::default().labels(keys::APPSET_NAME_LABEL);
    let controller = Controller::new(api_in::<AppSet>(&client, ns), watcher::Config::default());
    let store = controller.store();
    let cm_store = store.clone();
    let secret_store = store.clone();
    controller
        .owns(api_in::<Pod>(&client, ns), labelled.clone())
        .owns(api_in::<ControllerRevision>(&client, ns), labelled.clone())
        .owns(api_in::<Service>(&client, ns), labelled.clone())
        .watches(
            api_in::<PersistentVolumeClaim>(&client, ns),
            labelled,
            |claim| {
                let set = claim.labels().get(keys::APPSET_NAME_LABEL).cloned();
                let ns = claim.namespace();
                set.zip(ns)
                    .map(|(set, ns)| ObjectRef::new(&set).within(&ns))
            },
        )
        .watches(
            api_in::<PartialObjectMeta<ConfigMap>>(&client, ns),
            watcher::Config::default(),
            move |m| {
                users_of(
                    &cm_store,
                    discovery::SourceName::config_map(m.name_any()),
                    m.namespace(),
                )
            },
        )
        .watches(
            api_in::<PartialObjectMeta<Secret>>(&client, ns),
            watcher::Config::default(),
            move |m| {
                users_of(
                    &secret_store,
                    discovery::SourceName::secret(m.name_any()),
                    m.namespace(),
                )
            },
        )
        .with_config(
            kube::runtime::controller::Config::default().concurrency(ctx.settings.concurrency),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(err) = res
                && !matches!(err, kube::runtime::controller::Error::ObjectNotFound(_))
            {
                warn!(error = %err, "AppSet controller");
            }
        })
        .await;
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
    let delay =
        Duration::from_secs(1u64 << n.saturating_sub(1).min(9)).min(Duration::from_secs(300));
    warn!(appset = %set.name_any(), namespace = ?set.namespace(), error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

async fn reconcile(set: Arc<AppSet>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = set.name_any();
    let ns = set.namespace().unwrap_or_default();
    let span = info_span!("reconcile_appset", appset = %name, namespace = %ns);
    let result = reconcile_inner(&set, &ctx).instrument(span).await;
    // Success, or an AppSet on its way out, resets the backoff.
    if (result.is_ok() || set.metadata.deletion_timestamp.is_some())
        && let Ok(mut f) = ctx.failures.lock()
    {
        f.remove(&ObjectRef::from_obj(set.as_ref()));
    }
    result
}

/// One Event on the AppSet; failures to publish are logged, never fatal.
async fn event(
    ctx: &Context,
    set: &AppSet,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&ev, &set.object_ref(&())).await {
        warn!(error = %err, reason, "cannot publish Event");
    }
}

fn pod_info(set_name: &str, pod: &Pod) -> Option<PodInfo> {
    let ordinal = plan::parse_pod_ordinal(set_name, pod.metadata.name.as_deref()?)?;
    let status = pod.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    Some(PodInfo {
        name: pod.name_any(),
        uid: pod.uid().unwrap_or_default(),
        ordinal,
        revision: pod
            .labels()
            .get(keys::CONTROLLER_REVISION_HASH_LABEL)
            .cloned(),
        phase: PodPhase::parse(status.and_then(|s| s.phase.as_deref())),
        ready: ready.is_some_and(|c| c.status == "True"),
        ready_since: ready
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| t.0.as_second()),
        terminating: pod.metadata.deletion_timestamp.is_some(),
    })
}

fn is_controlled_by(meta: &ObjectMeta, uid: &str) -> Option<bool> {
    let controller = meta
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))?;
    Some(controller.uid == uid)
}

fn merge_params() -> PatchParams {
    PatchParams {
        field_manager: Some(keys::FIELD_MANAGER.to_string()),
        ..Default::default()
    }
}

fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(keys::FIELD_MANAGER.to_string()),
        ..Default::default()
    }
}

fn is_status(err: &kube::Error, code: u16) -> bool {
    matches!(err, kube::Error::Api(s) if s.code == code)
}

/// Runs `jobs` with at most `limit` in flight, returning the first error after all finished.
async fn bounded<F>(jobs: Vec<F>, limit: usize) -> Result<(), Error>
where
    F: Future<Output = Result<(), Error>>,
{
    let results: Vec<Result<(), Error>> = stream::iter(jobs)
        .buffer_unordered(limit.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}

async fn reconcile_inner(set: &AppSet, ctx: &Context) -> Result<Action, Error> {
    let client = &ctx.client;
    let name = set.name_any();
    let ns = set
        .namespace()
        .ok_or_else(|| Error::Invalid(format!("AppSet {name} has no namespace")))?;
    let uid = set
        .uid()
        .ok_or_else(|| Error::Invalid(format!("AppSet {name} has no uid")))?;
    if set.metadata.deletion_timestamp.is_some() {
        // Pods, revisions and the Service go with the AppSet through their owner references;
        // claims go only if `whenDeleted: Delete` made the AppSet their owner.
        return Ok(Action::await_change());
    }
    let spec = &set.spec;
    let now = Timestamp::now();
    let now_s = now.as_second();
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let claims_api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let revs_api: Api<ControllerRevision> = Api::namespaced(client.clone(), &ns);
    let previous = set.status.clone();
    let burst = match spec.pod_management_policy {
        PodManagementPolicy::Parallel => ctx.settings.burst,
        PodManagementPolicy::OrderedReady => 1,
    };

    // 1. The headless Service.
    if let Some(svc) = build::headless_service(set) {
        let svc_api: Api<Service> = Api::namespaced(client.clone(), &ns);
        let svc_name = svc.name_any();
        let existing = svc_api
            .get_opt(&svc_name)
            .await
            .map_err(kube_err(format!("read Service {ns}/{svc_name}")))?;
        match existing {
            Some(s) if is_controlled_by(&s.metadata, &uid) != Some(true) => {
                event(ctx, set, EventType::Warning, "ServiceNotOwned", "ApplyService", format!(
                    "Service {svc_name} exists and is not owned by this AppSet; it is left as is (set service: External to use it)"
                )).await;
            }
            _ => {
                svc_api
                    .patch(
                        &svc_name,
                        &PatchParams::apply(keys::FIELD_MANAGER).force(),
                        &Patch::Apply(&svc),
                    )
                    .await
                    .map_err(kube_err(format!("apply Service {ns}/{svc_name}")))?;
            }
        }
    }

    // 2. The config hash.
    let config_hash = if spec.config_rollout {
        config_hash(set, ctx, &ns, previous.as_ref()).await?
    } else {
        None
    };

    // 3. Revisions.
    let revs: Vec<ControllerRevision> = revs_api
        .list(&ListParams::default().labels(&format!("{}={name}", keys::APPSET_NAME_LABEL)))
        .await
        .map_err(kube_err(format!(
            "list ControllerRevisions of AppSet {ns}/{name}"
        )))?
        .items
        .into_iter()
        .filter(|r| is_controlled_by(&r.metadata, &uid) == Some(true))
        .collect();
    let infos: Vec<revision::RevisionInfo> = revs
        .iter()
        .map(|r| revision::RevisionInfo {
            name: r.name_any(),
            number: r.revision.unwrap_or_default(),
            data: r.data.0.clone(),
        })
        .collect();
    let template = revision::effective_template(&spec.template, config_hash.as_deref());
    let data = revision::revision_data(&template);
    let collision_before = previous
        .as_ref()
        .and_then(|s| s.collision_count)
        .unwrap_or(0);
    let (choice, collision_count) =
        revision::choose_update_revision(&name, &data, &infos, collision_before);
    match &choice {
        revision::UpdateRevision::Existing { .. } => {}
        revision::UpdateRevision::Reuse {
            name: rname,
            number,
        } => {
            revs_api
                .patch(
                    rname,
                    &merge_params(),
                    &Patch::Merge(json!({ "revision": number })),
                )
                .await
                .map_err(kube_err(format!(
                    "renumber ControllerRevision {ns}/{rname}"
                )))?;
            info!(revision = %rname, number, "rollback: reusing an old revision");
        }
        revision::UpdateRevision::Create {
            name: rname,
            number,
        } => {
            let cr = ControllerRevision {
                metadata: ObjectMeta {
                    name: Some(rname.clone()),
                    namespace: Some(ns.clone()),
                    labels: Some(
                        [
                            (keys::APPSET_NAME_LABEL.to_string(), name.clone()),
                            (
                                keys::CONTROLLER_REVISION_HASH_LABEL.to_string(),
                                rname.clone(),
                            ),
                        ]
                        .into(),
                    ),
                    owner_references: build::controller_ref(set).map(|r| vec![r]),
                    ..Default::default()
                },
                data: RawExtension(data.clone()),
                revision: Some(*number),
            };
            revs_api
                .create(&post_params(), &cr)
                .await
                .map_err(kube_err(format!("create ControllerRevision {ns}/{rname}")))?;
            info!(revision = %rname, number, "created revision");
        }
    }
    let update_revision = choice.name().to_string();
    let current_revision = revision::current_revision(
        previous
            .as_ref()
            .and_then(|s| s.current_revision.as_deref()),
        &infos,
        &update_revision,
    );
    let mut templates: BTreeMap<String, PodTemplateSpec> = infos
        .iter()
        .filter_map(|r| revision::template_of(&r.data).map(|t| (r.name.clone(), t)))
        .collect();
    templates.insert(update_revision.clone(), template.clone());

    // 4. Pods (adopting orphans) and claims (labelling adopted ones).
    let selector = build::selector_string(&spec.selector);
    let listed = pods_api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(kube_err(format!("list pods of AppSet {ns}/{name}")))?
        .items;
    let mut pods: Vec<Pod> = Vec::new();
    for pod in listed {
        let pname = pod.name_any();
        match is_controlled_by(&pod.metadata, &uid) {
            Some(true) => pods.push(pod),
            Some(false) => {}
            None => {
                if plan::parse_pod_ordinal(&name, &pname).is_none()
                    || pod.metadata.deletion_timestamp.is_some()
                {
                    continue;
                }
                let mut refs = pod.metadata.owner_references.clone().unwrap_or_default();
                refs.extend(build::controller_ref(set));
                let adopted = pods_api
                    .patch(
                        &pname,
                        &merge_params(),
                        &Patch::Merge(json!({"metadata": {
                            "ownerReferences": refs,
                            "resourceVersion": pod.resource_version(),
                        }})),
                    )
                    .await
                    .map_err(kube_err(format!("adopt pod {ns}/{pname}")))?;
                event(
                    ctx,
                    set,
                    EventType::Normal,
                    "AdoptedPod",
                    "Adopt",
                    format!("adopted orphan pod {pname}"),
                )
                .await;
                pods.push(adopted);
            }
        }
    }
    let infos_pods: Vec<PodInfo> = pods.iter().filter_map(|p| pod_info(&name, p)).collect();

    let template_names: Vec<String> = spec
        .volume_claim_templates
        .iter()
        .filter_map(|t| t.metadata.name.clone())
        .collect();
    let mut claims: BTreeMap<String, (String, i32, PersistentVolumeClaim)> = BTreeMap::new();
    if !template_names.is_empty() {
        let all = claims_api
            .list(&ListParams::default())
            .await
            .map_err(kube_err(format!("list PersistentVolumeClaims in {ns}")))?
            .items;
        for c in all {
            let cname = c.name_any();
            if let Some((t, o)) = template_names
                .iter()
                .find_map(|t| plan::parse_claim_ordinal(t, &name, &cname).map(|o| (t.clone(), o)))
            {
                claims.insert(cname, (t, o, c));
            }
        }
    }
    // Adopt claims: the label makes their changes trigger reconciles.
    let mut adopt_jobs = vec![];
    for (cname, (_, _, c)) in &claims {
        if c.labels().get(keys::APPSET_NAME_LABEL) != Some(&name)
            && c.metadata.deletion_timestamp.is_none()
        {
            let api = claims_api.clone();
            let cname = cname.clone();
            let name = name.clone();
            let ns = ns.clone();
            adopt_jobs.push(async move {
                api.patch(
                    &cname,
                    &merge_params(),
                    &Patch::Merge(json!({"metadata": {"labels": {keys::APPSET_NAME_LABEL: name}}})),
                )
                .await
                .map_err(kube_err(format!(
                    "adopt PersistentVolumeClaim {ns}/{cname}"
                )))?;
                Ok(())
            });
        }
    }
    let adopted_claims = adopt_jobs.len();
    bounded(adopt_jobs, ctx.settings.burst).await?;
    if adopted_claims > 0 {
        event(ctx, set, EventType::Normal, "AdoptedClaims", "Adopt", format!(
            "adopted {adopted_claims} existing PersistentVolumeClaims named <template>-{name}-<ordinal>"
        )).await;
    }
    let claim_infos: Vec<ClaimInfo> = claims
        .iter()
        .map(|(cname, (t, o, c))| ClaimInfo {
            name: cname.clone(),
            template: t.clone(),
            ordinal: *o,
            terminating: c.metadata.deletion_timestamp.is_some(),
            owners: build::claim_owners_of(c, &uid, &plan::pod_name(&name, *o)),
        })
        .collect();

    // 5. Plan.
    let max_unavailable = plan::resolve_max_unavailable(
        spec.update_strategy
            .rolling_update
            .as_ref()
            .and_then(|r| r.max_unavailable.as_ref()),
        spec.replicas,
    );
    let partition = match spec.update_strategy.type_ {
        UpdateStrategyType::RollingUpdate => spec.partition(),
        UpdateStrategyType::OnDelete => 0,
    };
    let input = PlanInput {
        set_name: name.clone(),
        replicas: spec.replicas,
        start_ordinal: spec.start_ordinal(),
        policy: spec.pod_management_policy,
        strategy: spec.update_strategy.type_,
        partition,
        max_unavailable,
        min_ready_seconds: i64::from(spec.min_ready_seconds),
        retention: spec.persistent_volume_claim_retention_policy.clone(),
        claim_templates: template_names.clone(),
        current_revision: current_revision.clone(),
        update_revision: update_revision.clone(),
        now: now_s,
        pods: infos_pods.clone(),
        claims: claim_infos,
    };
    let decided = plan::plan(&input);

    // 6. Execute: claim owners, claim creations, pod deletions, pod creations.
    let jobs = decided.claim_owner_updates.iter().filter_map(|u| {
        let (_, _, c) = claims.get(&u.claim)?;
        let refs = build::claim_owner_references(
            set,
            c.metadata.owner_references.as_deref().unwrap_or_default(),
            &u.pod_name,
            &u.owners,
        );
        let api = claims_api.clone();
        let rv = c.resource_version();
        let cname = u.claim.clone();
        let ns = ns.clone();
        Some(async move {
            api.patch(
                &cname,
                &merge_params(),
                &Patch::Merge(
                    json!({"metadata": {"ownerReferences": refs, "resourceVersion": rv}}),
                ),
            )
            .await
            .map_err(kube_err(format!(
                "update owners of PersistentVolumeClaim {ns}/{cname}"
            )))?;
            Ok(())
        })
    });
    bounded(jobs.collect(), ctx.settings.burst).await?;

    let jobs = decided.create_claims.iter().filter_map(|c| {
        let tmpl = spec
            .volume_claim_templates
            .iter()
            .find(|t| t.metadata.name.as_deref() == Some(c.template.as_str()))?;
        let claim = build::claim(set, tmpl, c.ordinal, &c.owners);
        let api = claims_api.clone();
        let cname = c.name.clone();
        let ns = ns.clone();
        Some(async move {
            match api.create(&post_params(), &claim).await {
                Ok(_) => {
                    event(
                        ctx,
                        set,
                        EventType::Normal,
                        "SuccessfulCreate",
                        "CreateClaim",
                        format!("created PersistentVolumeClaim {cname}"),
                    )
                    .await;
                    Ok(())
                }
                Err(e) if is_status(&e, 409) => Ok(()),
                Err(e) => Err(kube_err(format!(
                    "create PersistentVolumeClaim {ns}/{cname}"
                ))(e)),
            }
        })
    });
    bounded(jobs.collect(), burst).await?;

    let jobs = decided.delete_pods.iter().map(|d| {
        let api = pods_api.clone();
        let ns = ns.clone();
        async move {
            let params = DeleteParams::default().preconditions(Preconditions {
                uid: Some(d.uid.clone()),
                resource_version: None,
            });
            match api.delete(&d.name, &params).await {
                Ok(_) => {
                    let why = match d.reason {
                        DeleteReason::Finished => "it failed or completed; it will be recreated",
                        DeleteReason::ScaleDown => "scale down",
                        DeleteReason::Update => "rolling update to the update revision",
                        DeleteReason::BrokenOldRevision => {
                            "it is of an old revision and not Ready; replaced without waiting"
                        }
                    };
                    event(
                        ctx,
                        set,
                        EventType::Normal,
                        "SuccessfulDelete",
                        "DeletePod",
                        format!("deleted pod {}: {why}", d.name),
                    )
                    .await;
                    Ok(())
                }
                Err(e) if is_status(&e, 404) || is_status(&e, 409) => Ok(()),
                Err(e) => Err(kube_err(format!("delete pod {ns}/{}", d.name))(e)),
            }
        }
    });
    // Scale-down and failed-pod deletions go out in parallel; update deletions (at most
    // maxUnavailable of them) one after the other, so they happen highest ordinal first.
    let rolling = decided
        .delete_pods
        .iter()
        .any(|d| d.reason == DeleteReason::Update);
    bounded(jobs.collect(), if rolling { 1 } else { burst }).await?;

    let jobs = decided.create_pods.iter().map(|c| {
        let tmpl = templates.get(&c.revision).unwrap_or(&template);
        let revision = if templates.contains_key(&c.revision) {
            c.revision.as_str()
        } else {
            update_revision.as_str()
        };
        let pod = build::pod(set, tmpl, revision, c.ordinal);
        let api = pods_api.clone();
        let ns = ns.clone();
        async move {
            match api.create(&post_params(), &pod).await {
                Ok(_) => {
                    event(ctx, set, EventType::Normal, "SuccessfulCreate", "CreatePod", format!("created pod {} at revision {revision}", c.name)).await;
                    Ok(())
                }
                Err(e) if is_status(&e, 409) => {
                    event(ctx, set, EventType::Warning, "PodNameTaken", "CreatePod", format!(
                        "pod {} exists and is not owned by this AppSet; delete it or give it to the AppSet", c.name
                    )).await;
                    Ok(())
                }
                Err(e) => Err(kube_err(format!("create pod {ns}/{}", c.name))(e)),
            }
        }
    });
    bounded(jobs.collect(), burst).await?;

    // 7. Claims versus templates: expansion and unsupported changes.
    let mut classes: BTreeMap<String, Option<bool>> = BTreeMap::new();
    let mut template_status = vec![];
    let end = spec.start_ordinal().saturating_add(spec.replicas.max(0));
    for tmpl in &spec.volume_claim_templates {
        let tname = tmpl.metadata.name.clone().unwrap_or_default();
        let mut compared = vec![];
        for (t, o, c) in claims.values() {
            if *t != tname
                || c.metadata.deletion_timestamp.is_some()
                || *o < spec.start_ordinal()
                || *o >= end
            {
                continue;
            }
            let class = c.spec.as_ref().and_then(|s| s.storage_class_name.clone());
            let allows = match class {
                None => None,
                Some(class) => match classes.get(&class) {
                    Some(v) => *v,
                    None => {
                        let v = Api::<StorageClass>::all(client.clone())
                            .get_opt(&class)
                            .await
                            .map_err(kube_err(format!("read StorageClass {class}")))?
                            .and_then(|sc| sc.allow_volume_expansion);
                        classes.insert(class, v);
                        v
                    }
                },
            };
            let mut change = storage::compare_claim(c, tmpl, allows);
            let bound = c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
            if let ClaimChange::Expand(q) = &change {
                let cname = c.name_any();
                if !bound {
                    // Only a bound claim can grow; this one is expanded once it binds.
                    change = ClaimChange::None;
                } else {
                    let patched = claims_api
                        .patch(
                            &cname,
                            &merge_params(),
                            &Patch::Merge(
                                json!({"spec": {"resources": {"requests": {"storage": q}}}}),
                            ),
                        )
                        .await;
                    match patched {
                        Ok(_) => {
                            event(
                                ctx,
                                set,
                                EventType::Normal,
                                "ExpandingClaim",
                                "ExpandClaim",
                                format!("expanding PersistentVolumeClaim {cname} to {}", q.0),
                            )
                            .await;
                        }
                        // A refused expansion is reported in the status (and an Event when the
                        // message changes); it does not stop the rest of the reconcile.
                        Err(err) => {
                            warn!(claim = %cname, error = %err, "claim expansion refused");
                            change = ClaimChange::Blocked(format!(
                                "expanding claim {cname} to {} was refused: {err}",
                                q.0
                            ));
                        }
                    }
                }
            }
            compared.push((c, change));
        }
        let st = storage::template_status(tmpl, &compared);
        let before = previous
            .as_ref()
            .and_then(|s| s.volume_claim_templates.iter().find(|v| v.name == tname))
            .and_then(|v| v.message.clone());
        if let Some(m) = &st.message
            && before.as_ref() != Some(m)
        {
            event(
                ctx,
                set,
                EventType::Warning,
                "VolumeClaimTemplateNotApplied",
                "UpdateClaims",
                format!("volumeClaimTemplate {tname}: {m}"),
            )
            .await;
        }
        template_status.push(st);
    }

    // 8. Revision history.
    let live: BTreeSet<String> = infos_pods
        .iter()
        .filter_map(|p| p.revision.clone())
        .chain([current_revision.clone(), update_revision.clone()])
        .collect();
    for old in revision::revisions_to_prune(&infos, &live, spec.revision_history_limit) {
        match revs_api.delete(&old, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(kube_err(format!("delete ControllerRevision {ns}/{old}"))(e)),
        }
    }

    // 9. Status.
    let waiting = decided.waiting.as_ref().map(ToString::to_string);
    let outcome = status::compute(&status::StatusInput {
        generation: set.metadata.generation,
        replicas: spec.replicas,
        start_ordinal: spec.start_ordinal(),
        strategy: spec.update_strategy.type_,
        partition,
        max_unavailable,
        min_ready_seconds: i64::from(spec.min_ready_seconds),
        progress_deadline_seconds: i64::from(spec.progress_deadline_seconds),
        pods: &infos_pods,
        current_revision: &current_revision,
        update_revision: &update_revision,
        collision_count,
        label_selector: selector,
        config_hash: config_hash.clone(),
        volume_claim_templates: template_status,
        waiting: waiting.clone(),
        previous: previous.as_ref(),
        now: Time(now),
    });
    if outcome.stalled_now {
        event(
            ctx,
            set,
            EventType::Warning,
            status::PROGRESS_DEADLINE_EXCEEDED,
            "Rollout",
            format!(
                "rollout to revision {update_revision} made no progress for {}s: {}",
                spec.progress_deadline_seconds,
                waiting.as_deref().unwrap_or("pods are not available")
            ),
        )
        .await;
    }
    if previous.as_ref() != Some(&outcome.status) {
        write_status(client, &ns, &name, &outcome.status).await?;
    }

    let mut after = Duration::from_secs(300);
    for secs in [decided.requeue_after, outcome.check_deadline_after]
        .into_iter()
        .flatten()
    {
        after = after.min(Duration::from_secs(secs.max(1) as u64));
    }
    Ok(Action::requeue(after))
}

async fn write_status(
    client: &Client,
    ns: &str,
    name: &str,
    status: &AppSetStatus,
) -> Result<(), Error> {
    let api: Api<AppSet> = Api::namespaced(client.clone(), ns);
    let body = json!({
        "apiVersion": AppSet::api_version(&()),
        "kind": AppSet::kind(&()),
        "metadata": {"name": name},
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(keys::FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(kube_err(format!("write status of AppSet {ns}/{name}")))?;
    Ok(())
}

/// The keyed digest of the sources the template references, or `None` when it references
/// none. A missing required source keeps the previous hash (no rollout to a state the pods
/// cannot start in) and is reported with a Warning Event. While the key Secret still holds the
/// previous key, a recorded digest made with it is kept as long as the data is unchanged; once
/// the previous key is dropped, AppSets still carrying such a digest roll once.
async fn config_hash(
    set: &AppSet,
    ctx: &Context,
    ns: &str,
    previous: Option<&AppSetStatus>,
) -> Result<Option<String>, Error> {
    let Some(pod_spec) = set.spec.template.spec.as_ref() else {
        return Ok(None);
    };
    let refs = discovery::references(pod_spec);
    if refs.is_empty() {
        return Ok(None);
    }
    let fetched = fetch::sources(&ctx.client, ns, &refs).await?;
    if !fetched.missing.is_empty() {
        let names: Vec<String> = fetched.missing.iter().map(ToString::to_string).collect();
        event(ctx, set, EventType::Warning, "ConfigSourceMissing", "HashConfig", format!(
            "the template references {} which do not exist; the config hash is not updated until they do",
            names.join(", ")
        )).await;
        if let Some(h) = previous.and_then(|s| s.config_hash.clone()) {
            return Ok(Some(h));
        }
    }
    // After a key rotation, data that did not change still hashes to the recorded value under
    // the previous key: keep that value, so a rotation alone does not roll every AppSet.
    if let (Some(prev_key), Some(recorded)) = (
        ctx.keyring.previous.as_ref(),
        previous.and_then(|s| s.config_hash.as_deref()),
    ) && hash::digest(prev_key, &fetched.sources) == recorded
    {
        return Ok(Some(recorded.to_string()));
    }
    Ok(Some(hash::digest(&ctx.keyring.current, &fetched.sources)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).expect("valid pod")
    }

    #[test]
    fn pod_info_reads_ordinal_revision_phase_and_readiness() {
        let p = pod(json!({
            "metadata": {"name": "web-2", "uid": "u2",
                "labels": {"controller-revision-hash": "web-abc"}},
            "status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:10Z"}
            ]}
        }));
        let info = pod_info("web", &p).expect("an AppSet pod");
        assert_eq!(info.ordinal, 2);
        assert_eq!(info.uid, "u2");
        assert_eq!(info.revision.as_deref(), Some("web-abc"));
        assert_eq!(info.phase, PodPhase::Running);
        assert!(info.ready);
        assert_eq!(info.ready_since, Some(1_767_225_610));
        assert!(!info.terminating);
    }

    #[test]
    fn pod_info_of_an_unready_terminating_pod_and_foreign_names() {
        let p = pod(json!({
            "metadata": {"name": "web-0", "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}]}
        }));
        let info = pod_info("web", &p).expect("an AppSet pod");
        assert!(info.terminating && !info.ready);
        assert_eq!(info.phase, PodPhase::Pending);
        assert_eq!(info.revision, None);
        assert!(pod_info("web", &pod(json!({"metadata": {"name": "webby-0"}}))).is_none());
        assert!(pod_info("web", &pod(json!({"metadata": {"name": "web-x"}}))).is_none());
    }

    #[test]
    fn controller_ownership() {
        let owner = |uid: &str, controller: Option<bool>| OwnerReference {
            api_version: "appset.dev/v1alpha1".into(),
            kind: "AppSet".into(),
            name: "web".into(),
            uid: uid.into(),
            controller,
            block_owner_deletion: None,
        };
        let meta = |refs: Vec<OwnerReference>| ObjectMeta {
            owner_references: Some(refs),
            ..Default::default()
        };
        assert_eq!(
            is_controlled_by(&meta(vec![owner("a", Some(true))]), "a"),
            Some(true)
        );
        assert_eq!(
            is_controlled_by(&meta(vec![owner("b", Some(true))]), "a"),
            Some(false)
        );
        assert_eq!(is_controlled_by(&meta(vec![owner("a", None)]), "a"), None);
        assert_eq!(is_controlled_by(&ObjectMeta::default(), "a"), None);
    }
}
