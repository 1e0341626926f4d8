//! Reading an AppSet's world fresh from the API server, adopting orphans on the way: its
//! ControllerRevisions, its pods ([`PodInfo`]), its claims ([`ClaimInfo`]) and the digest of
//! the config it references.
//!
//! Nothing here is cached: the planner must never see a pod twice or miss one the controller
//! just created, so every reconcile lists anew. Which objects are the AppSet's, and which
//! orphans it adopts, is decided by the pure [`adopt`] rules; this module does the requests.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{ListParams, Patch};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;

use appset_crds::appset::AppSetStatus;
use appset_crds::{AppSet, keys};

use super::adopt::{self, PodOwnership};
use super::controller::{Context, Error, kube_err};
use super::plan::{self, ClaimInfo, PodInfo, PodPhase};
use super::{build, revision};
use crate::confighash::rotation::{self, AppSetConfig, Comparison, Digests, Observed};
use crate::confighash::{discovery, fetch};

use crate::kubeapi::{is_controlled_by, is_not_found, merge_params};

/// The AppSet being reconciled: its name, namespace and uid, checked once.
#[derive(Clone, Debug)]
pub struct Target {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub ns: String,
    /// `metadata.uid`.
    pub uid: String,
}

impl Target {
    /// The identity of `set`, or an error naming what is missing.
    pub fn of(set: &AppSet) -> Result<Self, Error> {
        let name = set.name_any();
        let ns = set
            .namespace()
            .ok_or_else(|| Error::Invalid(format!("AppSet {name} has no namespace")))?;
        let uid = set
            .uid()
            .ok_or_else(|| Error::Invalid(format!("AppSet {name} has no uid")))?;
        Ok(Self { name, ns, uid })
    }

    /// An `Api` in the AppSet's namespace.
    pub fn api<K>(&self, ctx: &Context) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(ctx.client.clone(), &self.ns)
    }
}

/// One of the AppSet's claims, with the template and ordinal its name gives.
#[derive(Clone, Debug)]
pub struct Claim {
    /// The volumeClaimTemplate.
    pub template: String,
    /// The ordinal.
    pub ordinal: i32,
    /// The claim as listed (or as patched while adopting it).
    pub claim: PersistentVolumeClaim,
}

/// The ControllerRevisions the AppSet controls.
pub async fn revisions(ctx: &Context, t: &Target) -> Result<Vec<ControllerRevision>, Error> {
    let api: Api<ControllerRevision> = t.api(ctx);
    let listed = api
        .list(&ListParams::default().labels(&format!("{}={}", keys::APPSET_NAME_LABEL, t.name)))
        .await
        .map_err(kube_err(format!(
            "list ControllerRevisions of AppSet {}/{}",
            t.ns, t.name
        )))?;
    Ok(listed
        .items
        .into_iter()
        .filter(|r| is_controlled_by(&r.metadata, &t.uid) == Some(true))
        .collect())
}

/// The revisions as the pure [`revision`] module sees them.
pub fn revision_infos(revs: &[ControllerRevision]) -> Vec<revision::RevisionInfo> {
    revs.iter()
        .map(|r| revision::RevisionInfo {
            name: r.name_any(),
            number: r.revision.unwrap_or_default(),
            data: r.data.0.clone(),
        })
        .collect()
}

/// How many pods one list request returns: the pods are reduced to [`PodInfo`] page by page,
/// so a reconcile never holds more than one page of whole pod objects.
pub const POD_PAGE: u32 = 500;

/// The AppSet's pods (by its selector), orphans adopted on the way, as [`PodInfo`]s; pods of
/// other names, and pods another controller owns, are left out.
pub async fn pods(ctx: &Context, set: &AppSet, t: &Target) -> Result<Vec<PodInfo>, Error> {
    let api: Api<Pod> = t.api(ctx);
    let selector = build::selector_string(&set.spec.selector);
    let mut infos = Vec::new();
    let mut params = ListParams::default().labels(&selector).limit(POD_PAGE);
    loop {
        let page = api
            .list(&params)
            .await
            .map_err(kube_err(format!("list pods of AppSet {}/{}", t.ns, t.name)))?;
        for pod in page.items {
            let pod = match adopt::pod_ownership(&t.name, &t.uid, &pod) {
                PodOwnership::Owned => pod,
                PodOwnership::Ignore => continue,
                PodOwnership::Adopt => adopt_pod(ctx, set, t, &api, &pod).await?,
            };
            let Some(pod) = label_identity(t, &api, pod).await? else {
                continue;
            };
            infos.extend(pod_info(&t.name, &pod));
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(infos),
        }
    }
}

/// Takes an orphan pod of one of the set's names (controller reference set, guarded by the
/// pod's resourceVersion) and reports it.
async fn adopt_pod(
    ctx: &Context,
    set: &AppSet,
    t: &Target,
    api: &Api<Pod>,
    pod: &Pod,
) -> Result<Pod, Error> {
    let pname = pod.name_any();
    let patch = json!({"metadata": {
        "ownerReferences": build::adopted_owner_references(set, pod),
        "resourceVersion": pod.resource_version(),
    }});
    let adopted = api
        .patch(&pname, &merge_params(), &Patch::Merge(patch))
        .await
        .map_err(kube_err(format!("adopt pod {}/{pname}", t.ns)))?;
    ctx.event(
        set,
        EventType::Normal,
        "AdoptedPod",
        "Adopt",
        format!("adopted orphan pod {pname}"),
    )
    .await;
    Ok(adopted)
}

/// Writes back the identity labels ([`build::identity_labels`]) an owned pod lacks: a pod
/// created by an older appset (before `statefulset.kubernetes.io/pod-name`), or one whose label
/// was removed by hand, so that per-pod Services find it. Only labels change: the pod keeps its
/// uid, revision and containers. A terminating pod is left as it is; `None` when the pod is
/// already gone.
async fn label_identity(t: &Target, api: &Api<Pod>, pod: Pod) -> Result<Option<Pod>, Error> {
    let Some(ordinal) = pod
        .metadata
        .name
        .as_deref()
        .and_then(|n| plan::parse_pod_ordinal(&t.name, n))
    else {
        return Ok(Some(pod));
    };
    if pod.metadata.deletion_timestamp.is_some() {
        return Ok(Some(pod));
    }
    let missing = build::missing_identity_labels(&t.name, ordinal, pod.labels());
    if missing.is_empty() {
        return Ok(Some(pod));
    }
    let pname = pod.name_any();
    let patch = json!({"metadata": {"labels": missing}});
    match api
        .patch(&pname, &merge_params(), &Patch::Merge(patch))
        .await
    {
        Ok(labelled) => Ok(Some(labelled)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(kube_err(format!("label pod {}/{pname}", t.ns))(e)),
    }
}

/// What the planner needs to know about a pod named `<set>-<ordinal>`; `None` for other names.
pub fn pod_info(set_name: &str, pod: &Pod) -> Option<PodInfo> {
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

/// The claims named `<template>-<set>-<ordinal>` for the AppSet's templates, keyed by name,
/// labelling those that lack the AppSet's label (their changes then trigger reconciles).
pub async fn claims(
    ctx: &Context,
    set: &AppSet,
    t: &Target,
) -> Result<BTreeMap<String, Claim>, Error> {
    let templates = template_names(set);
    let mut claims = BTreeMap::new();
    if templates.is_empty() {
        return Ok(claims);
    }
    // Only the set's own (labelled) claims: a namespace may hold thousands of others. A claim
    // of the right name but without the label (left by a StatefulSet, or created by hand for a
    // new ordinal) is adopted when creating it finds it there (`execute::plan`).
    let api: Api<PersistentVolumeClaim> = t.api(ctx);
    let labelled = ListParams::default().labels(&format!("{}={}", keys::APPSET_NAME_LABEL, t.name));
    let all = api
        .list(&labelled)
        .await
        .map_err(kube_err(format!("list PersistentVolumeClaims in {}", t.ns)))?
        .items;
    for c in all {
        let cname = c.name_any();
        if let Some((template, ordinal)) = adopt::claim_slot(&templates, &t.name, &cname) {
            claims.insert(
                cname,
                Claim {
                    template,
                    ordinal,
                    claim: c,
                },
            );
        }
    }
    Ok(claims)
}

/// The AppSet as the API server has it now, `None` when it is gone, or replaced by another
/// object of the same name.
pub async fn fresh(ctx: &Context, t: &Target) -> Result<Option<AppSet>, Error> {
    let set = t
        .api::<AppSet>(ctx)
        .get_opt(&t.name)
        .await
        .map_err(kube_err(format!("read AppSet {}/{}", t.ns, t.name)))?;
    Ok(set.filter(|s| s.uid().as_deref() == Some(t.uid.as_str())))
}

/// The names of the AppSet's volumeClaimTemplates.
pub fn template_names(set: &AppSet) -> Vec<String> {
    set.spec
        .volume_claim_templates
        .iter()
        .filter_map(|t| t.metadata.name.clone())
        .collect()
}

/// The claims as the planner sees them.
pub fn claim_infos(t: &Target, claims: &BTreeMap<String, Claim>) -> Vec<ClaimInfo> {
    claims
        .iter()
        .map(|(cname, c)| ClaimInfo {
            name: cname.clone(),
            template: c.template.clone(),
            ordinal: c.ordinal,
            terminating: c.claim.metadata.deletion_timestamp.is_some(),
            owners: build::claim_owners_of(&c.claim, &t.uid, &plan::pod_name(&t.name, c.ordinal)),
        })
        .collect()
}

/// The config the template should carry ([`rotation::appset_config`]): `None` when it
/// references no ConfigMap or Secret. A missing required source keeps what was recorded (no
/// rollout to a state the pods cannot start in) and is reported with a Warning Event; so is a
/// digest made with a key the keyring no longer has.
pub async fn config_hash(
    ctx: &Context,
    set: &AppSet,
    t: &Target,
    previous: Option<&AppSetStatus>,
) -> Result<Option<ConfigNow>, Error> {
    let Some(pod_spec) = set.spec.template.spec.as_ref() else {
        return Ok(None);
    };
    let refs = discovery::references(pod_spec);
    if refs.is_empty() {
        return Ok(None);
    }
    let fetched = fetch::sources(&ctx.client, &t.ns, &refs).await?;
    let token = previous.and_then(|s| s.config_hash.as_deref());
    let digest = previous
        .and_then(|s| s.config_digest.as_deref())
        .and_then(Observed::parse);
    if !fetched.missing.is_empty() {
        let names: Vec<String> = fetched.missing.iter().map(ToString::to_string).collect();
        ctx.event(set, EventType::Warning, "MissingConfigSource", "HashConfig", format!(
            "the template references {} which do not exist; the config hash is not updated until they do",
            names.join(", ")
        )).await;
        if let Some(token) = token {
            return Ok(Some(ConfigNow {
                config: AppSetConfig {
                    token: token.to_string(),
                    digest,
                    comparison: Comparison::Unchanged,
                },
                // The token kept stands for older data: nothing read now may be pinned.
                pins: None,
            }));
        }
    }
    let keyring = ctx.keyring.get();
    let now = Digests::of(&keyring, &fetched.sources);
    let config = rotation::appset_config(token, digest.as_ref(), &now);
    if config.comparison == Comparison::UnknownKey {
        ctx.event(set, EventType::Warning, "ConfigKeyUnknown", "HashConfig",
            "the config digest was made with a hash key the operator no longer has (the key Secret was replaced without keeping `previous`, or rotated twice before this AppSet was compared); it is recorded again without a rollout. A change of its ConfigMaps or Secrets made at the same time is not rolled out: change the template to roll it if one was.".to_string()).await;
    }
    let pins = set.spec.config_snapshots.then(|| {
        let per_source = crate::confighash::hash::per_source(&keyring.current, &fetched.sources);
        let pins = crate::config::snapshot::desired(&fetched.sources, &per_source);
        (fetched.sources, pins)
    });
    Ok(Some(ConfigNow { config, pins }))
}

/// The config of an AppSet now: what to record, and (with `configSnapshots`) the sources as
/// read with the copies their data maps to, from the same read.
pub struct ConfigNow {
    /// The token and digest.
    pub config: AppSetConfig,
    /// The sources read and the copy each present one is pinned to.
    pub pins: Option<(
        Vec<crate::confighash::hash::Source>,
        BTreeMap<crate::confighash::discovery::SourceName, String>,
    )>,
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
