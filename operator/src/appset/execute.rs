//! Carrying out what the pure modules decided: the headless Service, the update revision, the
//! plan (claim owners, claim creations, pod deletions, pod creations), claim expansion,
//! revision pruning and the status.
//!
//! Pods, claims and revisions are created with `create` and changed with targeted merge patches
//! guarded by `resourceVersion` (deletions by the object's uid), always under the single field
//! manager [`appset_crds::keys::FIELD_MANAGER`]: applying a partial claim would make the apply manager give
//! up fields such as `accessModes`, which a bound claim cannot lose. Objects the controller
//! fully owns (Service, status) use server-side apply. Each step of the plan runs with bounded
//! concurrency and the plan stops at the first error, so a pod is never created before its
//! claims. A 409 on a create (the object exists) and a 404 or 409 on a delete (already gone,
//! or replaced by a pod with another uid) are not errors: the next reconcile sees the truth.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, PodTemplateSpec, Service};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, Patch, Preconditions};
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::{Value, json};
use tracing::{info, warn};

use appset_crds::appset::{AppSetStatus, VolumeClaimTemplateStatus};
use appset_crds::{AppSet, keys};

use super::controller::{Context, Error, kube_err};
use super::observe::{Claim, Target};
use super::plan::{DeleteReason, Plan};
use super::revision::UpdateRevision;
use super::storage::{self, ClaimChange};
use super::{adopt, build};
use crate::kubeapi::{
    apply_params, bounded, is_conflict, is_controlled_by, is_not_found, merge_params, post_params,
    slow_start,
};

/// Applies the headless Service when `service: Managed`, unless a Service of that name exists
/// that the AppSet does not control (then a Warning Event, and it is left alone).
pub async fn service(ctx: &Context, set: &AppSet, t: &Target) -> Result<(), Error> {
    let Some(svc) = build::headless_service(set) else {
        return Ok(());
    };
    let api: Api<Service> = t.api(ctx);
    let svc_name = svc.name_any();
    let existing = api
        .get_opt(&svc_name)
        .await
        .map_err(kube_err(format!("read Service {}/{svc_name}", t.ns)))?;
    if let Some(s) = existing
        && is_controlled_by(&s.metadata, &t.uid) != Some(true)
    {
        ctx.event(set, EventType::Warning, "ServiceNotOwned", "ApplyService", format!(
            "Service {svc_name} exists and is not owned by this AppSet; it is left as is (set service: External to use it)"
        )).await;
        return Ok(());
    }
    api.patch(&svc_name, &apply_params(), &Patch::Apply(&svc))
        .await
        .map_err(kube_err(format!("apply Service {}/{svc_name}", t.ns)))?;
    Ok(())
}

/// Makes the chosen update revision exist: renumbers a reused old one (a rollback), or creates
/// a new one holding `data`.
pub async fn update_revision(
    ctx: &Context,
    set: &AppSet,
    t: &Target,
    listed: &[ControllerRevision],
    choice: &UpdateRevision,
    data: &Value,
) -> Result<(), Error> {
    let api: Api<ControllerRevision> = t.api(ctx);
    match choice {
        UpdateRevision::Existing { .. } => {}
        UpdateRevision::Reuse { name, number } => {
            let rv = listed
                .iter()
                .find(|r| r.metadata.name.as_deref() == Some(name.as_str()))
                .and_then(|r| r.metadata.resource_version.clone());
            let patch = json!({"metadata": {"resourceVersion": rv}, "revision": number});
            api.patch(name, &merge_params(), &Patch::Merge(patch))
                .await
                .map_err(kube_err(format!(
                    "renumber ControllerRevision {}/{name}",
                    t.ns
                )))?;
            info!(revision = %name, number, "rollback: reusing an old revision");
        }
        UpdateRevision::Create { name, number } => {
            let cr = build::controller_revision(set, name, data.clone(), *number);
            api.create(&post_params(), &cr)
                .await
                .map_err(kube_err(format!(
                    "create ControllerRevision {}/{name}",
                    t.ns
                )))?;
            info!(revision = %name, number, "created revision");
        }
    }
    Ok(())
}

/// The pod templates of the revisions, by revision name, with the update revision's.
pub struct Templates {
    /// Each revision's template.
    pub by_revision: BTreeMap<String, PodTemplateSpec>,
    /// The update revision: used for a pod of a revision whose template is unknown.
    pub update_revision: String,
}

impl Templates {
    /// The revision a pod planned at `revision` is built at, and its template.
    fn resolve<'a>(&'a self, revision: &'a str) -> Option<(&'a str, &'a PodTemplateSpec)> {
        match self.by_revision.get(revision) {
            Some(t) => Some((revision, t)),
            None => self
                .by_revision
                .get(&self.update_revision)
                .map(|t| (self.update_revision.as_str(), t)),
        }
    }
}

/// Executes the plan in order: claim owners, claim creations, pod deletions, pod creations.
/// `burst` bounds how many requests of one step are in flight.
pub async fn plan(
    ctx: &Context,
    set: &AppSet,
    t: &Target,
    decided: &Plan,
    claims: &BTreeMap<String, Claim>,
    templates: &Templates,
    burst: usize,
) -> Result<(), Error> {
    let claims_api: Api<PersistentVolumeClaim> = t.api(ctx);
    let jobs = decided.claim_owner_updates.iter().filter_map(|u| {
        let c = &claims.get(&u.claim)?.claim;
        let refs = build::claim_owner_references(
            set,
            c.metadata.owner_references.as_deref().unwrap_or_default(),
            &u.pod_name,
            &u.owners,
        );
        let patch =
            json!({"metadata": {"ownerReferences": refs, "resourceVersion": c.resource_version()}});
        let api = &claims_api;
        Some(async move {
            api.patch(&u.claim, &merge_params(), &Patch::Merge(patch))
                .await
                .map_err(kube_err(format!(
                    "update owners of PersistentVolumeClaim {}/{}",
                    t.ns, u.claim
                )))?;
            Ok(())
        })
    });
    bounded::<_, Error>(jobs.collect(), burst).await?;

    slow_start(&decided.create_claims, burst, |c| {
        let tmpl = set
            .spec
            .volume_claim_templates
            .iter()
            .find(|t| t.metadata.name.as_deref() == Some(c.template.as_str()));
        let claim = tmpl.map(|tmpl| build::claim(set, tmpl, c.ordinal, &c.owners));
        let api = &claims_api;
        async move {
            let Some(claim) = claim else { return Ok(()) };
            match api.create(&post_params(), &claim).await {
                Ok(_) => {
                    ctx.event(
                        set,
                        EventType::Normal,
                        "SuccessfulCreate",
                        "CreateClaim",
                        format!("created PersistentVolumeClaim {}", c.name),
                    )
                    .await;
                    Ok(())
                }
                // It exists without the set's label: take it over, as StatefulSet uses the
                // claims it finds under its names.
                Err(e) if is_conflict(&e) => adopt_claim(ctx, set, t, &c.name).await.map(|_| ()),
                Err(e) => Err(kube_err(format!(
                    "create PersistentVolumeClaim {}/{}",
                    t.ns, c.name
                ))(e)),
            }
        }
    })
    .await?;

    let pods_api: Api<Pod> = t.api(ctx);
    let jobs = decided.delete_pods.iter().map(|d| {
        let api = &pods_api;
        async move {
            let params = DeleteParams::default().preconditions(Preconditions {
                uid: Some(d.uid.clone()),
                resource_version: None,
            });
            match api.delete(&d.name, &params).await {
                Ok(_) => {
                    let why = delete_reason(d.reason);
                    ctx.event(
                        set,
                        EventType::Normal,
                        "SuccessfulDelete",
                        "DeletePod",
                        format!("deleted pod {}: {why}", d.name),
                    )
                    .await;
                    Ok(())
                }
                Err(e) if is_not_found(&e) || is_conflict(&e) => Ok(()),
                Err(e) => Err(kube_err(format!("delete pod {}/{}", t.ns, d.name))(e)),
            }
        }
    });
    bounded(jobs.collect(), decided.deletion_concurrency(burst)).await?;

    slow_start(&decided.create_pods, burst, |c| {
        let resolved = templates.resolve(&c.revision);
        let pod = resolved.map(|(revision, tmpl)| (revision, build::pod(set, tmpl, revision, c.ordinal)));
        let api = &pods_api;
        async move {
            let Some((revision, pod)) = pod else { return Ok(()) };
            match api.create(&post_params(), &pod).await {
                Ok(_) => {
                    ctx.event(set, EventType::Normal, "SuccessfulCreate", "CreatePod",
                        format!("created pod {} at revision {revision}", c.name)).await;
                    Ok(())
                }
                Err(e) if is_conflict(&e) => {
                    ctx.event(set, EventType::Warning, "PodNameTaken", "CreatePod", format!(
                        "pod {} exists and is not owned by this AppSet; delete it or give it to the AppSet", c.name
                    )).await;
                    Ok(())
                }
                Err(e) => Err(kube_err(format!("create pod {}/{}", t.ns, c.name))(e)),
            }
        }
    })
    .await
    .map(|_| ())
}

/// Takes over an existing claim of one of the set's names that creating it ran into: labels it
/// (guarded by its `resourceVersion`) so that later lists find it, and reports it. Returns
/// whether it is usable: a claim being deleted is not adopted.
async fn adopt_claim(ctx: &Context, set: &AppSet, t: &Target, name: &str) -> Result<bool, Error> {
    let api: Api<PersistentVolumeClaim> = t.api(ctx);
    let Some(claim) = api.get_opt(name).await.map_err(kube_err(format!(
        "read PersistentVolumeClaim {}/{name}",
        t.ns
    )))?
    else {
        return Ok(false);
    };
    if claim.metadata.deletion_timestamp.is_some() {
        return Ok(false);
    }
    if !adopt::claim_needs_label(&t.name, &claim) {
        return Ok(true);
    }
    let patch = json!({"metadata": {
        "labels": {keys::APPSET_NAME_LABEL: t.name},
        "resourceVersion": claim.resource_version(),
    }});
    api.patch(name, &merge_params(), &Patch::Merge(patch))
        .await
        .map_err(kube_err(format!(
            "adopt PersistentVolumeClaim {}/{name}",
            t.ns
        )))?;
    ctx.event(
        set,
        EventType::Normal,
        "AdoptedClaim",
        "Adopt",
        format!("adopted the existing PersistentVolumeClaim {name}"),
    )
    .await;
    Ok(true)
}

/// The Event text for a pod deletion.
fn delete_reason(reason: DeleteReason) -> &'static str {
    match reason {
        DeleteReason::Finished => "it failed or completed; it will be recreated",
        DeleteReason::ScaleDown => "scale down",
        DeleteReason::Update => "rolling update to the update revision",
        DeleteReason::BrokenOldRevision => {
            "it is of an old revision and not Ready; replaced without waiting"
        }
    }
}

/// Compares the live claims of the replica slots with their templates, expands those that may
/// grow, and returns each template's status. A refused expansion is reported in the status
/// (and an Event when the message changes); it does not stop the rest of the reconcile.
pub async fn claims(
    ctx: &Context,
    set: &AppSet,
    t: &Target,
    claims: &BTreeMap<String, Claim>,
    previous: Option<&AppSetStatus>,
) -> Result<Vec<VolumeClaimTemplateStatus>, Error> {
    let spec = &set.spec;
    let mut classes: BTreeMap<String, Option<bool>> = BTreeMap::new();
    let mut statuses = vec![];
    let slots = spec.start_ordinal()..spec.start_ordinal().saturating_add(spec.replicas.max(0));
    for tmpl in &spec.volume_claim_templates {
        let tname = tmpl.metadata.name.clone().unwrap_or_default();
        let mut compared = vec![];
        for c in claims.values() {
            let live = c.claim.metadata.deletion_timestamp.is_none();
            if c.template != tname || !live || !slots.contains(&c.ordinal) {
                continue;
            }
            let allows = if storage::wants_more_storage(&c.claim, tmpl) {
                class_allows_expansion(ctx, &c.claim, &mut classes).await?
            } else {
                None
            };
            let mut change = storage::claim_change(&c.claim, tmpl, allows);
            if let ClaimChange::Expand(q) = &change
                && let Err(refused) = expand(ctx, set, t, &c.claim, q).await
            {
                change = ClaimChange::Blocked(refused);
            }
            compared.push((&c.claim, change));
        }
        let st = storage::template_status(tmpl, &compared);
        let before = previous
            .and_then(|s| s.volume_claim_templates.iter().find(|v| v.name == tname))
            .and_then(|v| v.message.clone());
        if let Some(m) = &st.message
            && before.as_ref() != Some(m)
        {
            ctx.event(
                set,
                EventType::Warning,
                "VolumeClaimTemplateNotApplied",
                "UpdateClaims",
                format!("volumeClaimTemplate {tname}: {m}"),
            )
            .await;
        }
        statuses.push(st);
    }
    Ok(statuses)
}

/// The claim's StorageClass's `allowVolumeExpansion`, read once per reconcile and class.
async fn class_allows_expansion(
    ctx: &Context,
    claim: &PersistentVolumeClaim,
    classes: &mut BTreeMap<String, Option<bool>>,
) -> Result<Option<bool>, Error> {
    let Some(class) = claim
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.clone())
    else {
        return Ok(None);
    };
    if let Some(v) = classes.get(&class) {
        return Ok(*v);
    }
    let v = Api::<StorageClass>::all(ctx.client.clone())
        .get_opt(&class)
        .await
        .map_err(kube_err(format!("read StorageClass {class}")))?
        .and_then(|sc| sc.allow_volume_expansion);
    classes.insert(class, v);
    Ok(v)
}

/// Raises one claim's storage request; `Err` carries the message of a refusal.
async fn expand(
    ctx: &Context,
    set: &AppSet,
    t: &Target,
    claim: &PersistentVolumeClaim,
    q: &k8s_openapi::apimachinery::pkg::api::resource::Quantity,
) -> Result<(), String> {
    let cname = claim.name_any();
    let api: Api<PersistentVolumeClaim> = t.api(ctx);
    let patch = json!({
        "metadata": {"resourceVersion": claim.resource_version()},
        "spec": {"resources": {"requests": {"storage": q}}},
    });
    match api
        .patch(&cname, &merge_params(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => {
            ctx.event(
                set,
                EventType::Normal,
                "ExpandingClaim",
                "ExpandClaim",
                format!("expanding PersistentVolumeClaim {cname} to {}", q.0),
            )
            .await;
            Ok(())
        }
        Err(err) => {
            warn!(claim = %cname, error = %err, "claim expansion refused");
            Err(format!(
                "expanding claim {cname} to {} was refused: {err}",
                q.0
            ))
        }
    }
}

/// Deletes the named old ControllerRevisions of `listed`, each guarded by its uid (already
/// gone, or replaced by another object of that name, is fine).
pub async fn prune_revisions(
    ctx: &Context,
    t: &Target,
    listed: &[ControllerRevision],
    names: Vec<String>,
) -> Result<(), Error> {
    let api: Api<ControllerRevision> = t.api(ctx);
    for old in names {
        let uid = listed
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some(old.as_str()))
            .and_then(|r| r.metadata.uid.clone());
        let params = DeleteParams::default().preconditions(Preconditions {
            uid,
            resource_version: None,
        });
        match api.delete(&old, &params).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) || is_conflict(&e) => {}
            Err(e) => {
                return Err(kube_err(format!(
                    "delete ControllerRevision {}/{old}",
                    t.ns
                ))(e));
            }
        }
    }
    Ok(())
}

/// Writes the status with server-side apply.
pub async fn status(ctx: &Context, t: &Target, status: &AppSetStatus) -> Result<(), Error> {
    let api: Api<AppSet> = t.api(ctx);
    let body = json!({
        "apiVersion": AppSet::api_version(&()),
        "kind": AppSet::kind(&()),
        "metadata": {"name": t.name},
        "status": status,
    });
    api.patch_status(&t.name, &apply_params(), &Patch::Apply(&body))
        .await
        .map_err(kube_err(format!(
            "write status of AppSet {}/{}",
            t.ns, t.name
        )))?;
    Ok(())
}
