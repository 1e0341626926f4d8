//! Construction of the objects an AppSet owns, sans-IO: pods, claims, ControllerRevisions, the
//! headless Service and owner references, plus label-selector helpers.
//!
//! Data flow: the controller passes the AppSet and a revision's template (not the AppSet's live
//! template: pods below the partition are built from the current revision) to [`pod`], and the
//! AppSet and a volumeClaimTemplate to [`claim`]; it writes what comes back as is.
//!
//! Conventions, shared with StatefulSet so tools and habits carry over:
//!
//! * pod `<set>-<ordinal>` with `hostname` = its name and `subdomain` = `serviceName`, the
//!   labels `appset.dev/pod-name`, `apps.kubernetes.io/pod-index`, `controller-revision-hash`
//!   and `appset.dev/appset`, and the AppSet as controller owner;
//! * claim `<template>-<set>-<ordinal>`, labelled with the template's labels, the selector's
//!   `matchLabels` and `appset.dev/appset`, mounted into the pod as the volume named after the
//!   template (replacing a template volume of that name).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, PodTemplateSpec, Service,
    ServiceSpec, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde_json::Value;

use appset_crds::AppSet;
use appset_crds::appset::ServicePolicy;
use appset_crds::keys;

use super::plan::{ClaimOwners, claim_name, pod_name};

/// The AppSet as the controller owner of a pod, revision or Service. `blockOwnerDeletion`
/// makes a foreground deletion of the AppSet wait until these are gone, as for a StatefulSet
/// (setting it needs `update` on `appsets/finalizers`, which the chart grants).
pub fn controller_ref(set: &AppSet) -> Option<OwnerReference> {
    set.controller_owner_ref(&()).map(|r| OwnerReference {
        block_owner_deletion: Some(true),
        ..r
    })
}

/// The AppSet as a plain (non-controller) owner of a claim, as StatefulSet does for
/// `whenDeleted: Delete`.
pub fn set_claim_ref(set: &AppSet) -> Option<OwnerReference> {
    set.controller_owner_ref(&()).map(|r| OwnerReference {
        controller: Some(false),
        block_owner_deletion: None,
        ..r
    })
}

/// A pod as the (non-controller) owner of a claim, for `whenScaled: Delete`.
pub fn pod_claim_ref(pod_name: &str, pod_uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name: pod_name.into(),
        uid: pod_uid.into(),
        controller: Some(false),
        block_owner_deletion: Some(true),
    }
}

/// The retention-policy owners found on a claim: the AppSet (by uid) and the pod of its ordinal
/// (by name).
pub fn claim_owners_of(
    claim: &PersistentVolumeClaim,
    set_uid: &str,
    pod_name: &str,
) -> ClaimOwners {
    let refs = claim
        .metadata
        .owner_references
        .as_deref()
        .unwrap_or_default();
    ClaimOwners {
        set: refs.iter().any(|r| r.uid == set_uid),
        pod: refs
            .iter()
            .find(|r| r.kind == "Pod" && r.name == pod_name)
            .map(|r| r.uid.clone()),
    }
}

/// The owner references a claim must carry: its references unrelated to the retention policy,
/// plus the AppSet and/or the pod as `owners` says.
pub fn claim_owner_references(
    set: &AppSet,
    existing: &[OwnerReference],
    pod_name: &str,
    owners: &ClaimOwners,
) -> Vec<OwnerReference> {
    let set_uid = set.uid().unwrap_or_default();
    let mut refs: Vec<OwnerReference> = existing
        .iter()
        .filter(|r| r.uid != set_uid && !(r.kind == "Pod" && r.name == pod_name))
        .cloned()
        .collect();
    if owners.set
        && let Some(r) = set_claim_ref(set)
    {
        refs.push(r);
    }
    if let Some(uid) = &owners.pod {
        refs.push(pod_claim_ref(pod_name, uid));
    }
    refs
}

/// The ControllerRevision `name` (number `number`) holding a revision's `data`, labelled with
/// the AppSet and its own hash, controlled by the AppSet.
pub fn controller_revision(
    set: &AppSet,
    name: &str,
    data: Value,
    number: i64,
) -> ControllerRevision {
    ControllerRevision {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: set.namespace(),
            labels: Some(
                [
                    (keys::APPSET_NAME_LABEL.to_string(), set.name_any()),
                    (
                        keys::CONTROLLER_REVISION_HASH_LABEL.to_string(),
                        name.to_string(),
                    ),
                ]
                .into(),
            ),
            owner_references: controller_ref(set).map(|r| vec![r]),
            ..Default::default()
        },
        data: RawExtension(data),
        revision: Some(number),
    }
}

/// The owner references of an orphan pod being adopted: its own, plus the AppSet as controller.
pub fn adopted_owner_references(set: &AppSet, pod: &Pod) -> Vec<OwnerReference> {
    let mut refs = pod.metadata.owner_references.clone().unwrap_or_default();
    refs.extend(controller_ref(set));
    refs
}

/// The labels that name a pod's place in its AppSet: its name (under appset's key and
/// StatefulSet's), its ordinal and the AppSet's name. They never change for a pod, whatever the
/// revision.
pub fn identity_labels(set_name: &str, ordinal: i32) -> [(&'static str, String); 4] {
    let name = pod_name(set_name, ordinal);
    [
        (keys::POD_NAME_LABEL, name.clone()),
        (keys::STATEFULSET_POD_NAME_LABEL, name),
        (keys::POD_INDEX_LABEL, ordinal.to_string()),
        (keys::APPSET_NAME_LABEL, set_name.to_string()),
    ]
}

/// The identity labels a live pod lacks or carries with another value (a pod created by an
/// older appset, or a label removed by hand), to be written back onto it; empty when it has
/// them all.
pub fn missing_identity_labels(
    set_name: &str,
    ordinal: i32,
    labels: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    identity_labels(set_name, ordinal)
        .into_iter()
        .filter(|(k, v)| labels.get(*k) != Some(v))
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// The pod at `ordinal`, built from a revision's `template`.
pub fn pod(set: &AppSet, template: &PodTemplateSpec, revision: &str, ordinal: i32) -> Pod {
    let set_name = set.name_any();
    let name = pod_name(&set_name, ordinal);
    let tmeta = template.metadata.clone().unwrap_or_default();
    let mut labels = tmeta.labels.unwrap_or_default();
    for (k, v) in identity_labels(&set_name, ordinal) {
        labels.insert(k.into(), v);
    }
    labels.insert(keys::CONTROLLER_REVISION_HASH_LABEL.into(), revision.into());
    let mut spec = template.spec.clone().unwrap_or_default();
    spec.hostname = Some(name.clone());
    if let Some(svc) = set.spec.service_name.as_deref().filter(|s| !s.is_empty()) {
        spec.subdomain = Some(svc.into());
    }
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    for t in &set.spec.volume_claim_templates {
        let tname = t.metadata.name.clone().unwrap_or_default();
        volumes.retain(|v| v.name != tname);
        volumes.push(Volume {
            name: tname.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim_name(&tname, &set_name, ordinal),
                read_only: None,
            }),
            ..Default::default()
        });
    }
    if volumes.is_empty() {
        spec.volumes = None;
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: set.namespace(),
            labels: Some(labels),
            annotations: tmeta.annotations,
            owner_references: controller_ref(set).map(|r| vec![r]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// The claim of `template` for `ordinal`, owned as `owners` says.
pub fn claim(
    set: &AppSet,
    template: &PersistentVolumeClaim,
    ordinal: i32,
    owners: &ClaimOwners,
) -> PersistentVolumeClaim {
    let set_name = set.name_any();
    let tname = template.metadata.name.clone().unwrap_or_default();
    let mut labels = template.metadata.labels.clone().unwrap_or_default();
    if let Some(ml) = &set.spec.selector.match_labels {
        labels.extend(ml.clone());
    }
    labels.insert(keys::APPSET_NAME_LABEL.into(), set_name.clone());
    let refs = claim_owner_references(set, &[], &pod_name(&set_name, ordinal), owners);
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(claim_name(&tname, &set_name, ordinal)),
            namespace: set.namespace(),
            labels: Some(labels),
            annotations: template.metadata.annotations.clone(),
            owner_references: (!refs.is_empty()).then_some(refs),
            ..Default::default()
        },
        spec: template.spec.clone(),
        status: None,
    }
}

/// The headless Service, when `service: Managed` and `serviceName` is set. It selects the
/// AppSet's pods by `appset.dev/appset`, which every pod carries whatever the selector.
pub fn headless_service(set: &AppSet) -> Option<Service> {
    if set.spec.service != ServicePolicy::Managed {
        return None;
    }
    let name = set.spec.service_name.clone().filter(|s| !s.is_empty())?;
    let set_name = set.name_any();
    let selector: BTreeMap<String, String> =
        [(keys::APPSET_NAME_LABEL.to_string(), set_name.clone())].into();
    Some(Service {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: set.namespace(),
            labels: Some(selector.clone()),
            owner_references: controller_ref(set).map(|r| vec![r]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector),
            publish_not_ready_addresses: Some(true),
            ..Default::default()
        }),
        status: None,
    })
}

/// The selector in the string form of `kubectl get -l` and `status.labelSelector`.
pub fn selector_string(selector: &LabelSelector) -> String {
    let mut parts: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in selector.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            other => format!("{} {other} ({values})", e.key),
        });
    }
    parts.join(",")
}

/// Whether `labels` satisfy `selector` (kube's [`kube::core::Selector`]). An empty selector
/// matches everything, an unknown operator nothing.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    use kube::core::{Selector, SelectorExt};
    Selector::try_from(selector.clone()).is_ok_and(|s| s.matches(labels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use appset_crds::AppSetSpec;
    use appset_crds::appset::{PodManagementPolicy, UpdateStrategy};
    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn appset(json: serde_json::Value) -> AppSet {
        let mut set: AppSet = serde_json::from_value(json).expect("valid AppSet");
        set.metadata.uid = Some("set-uid".into());
        set
    }

    fn web() -> AppSet {
        appset(serde_json::json!({
            "apiVersion": "appset.dev/v1alpha1",
            "kind": "AppSet",
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {
                "replicas": 3,
                "serviceName": "web-svc",
                "service": "Managed",
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}, "annotations": {"a": "b"}},
                    "spec": {
                        "containers": [{"name": "main", "image": "nginx"}],
                        "volumes": [{"name": "data", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
                    }
                },
                "volumeClaimTemplates": [{
                    "metadata": {"name": "data", "labels": {"tier": "db"}},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
                }]
            }
        }))
    }

    #[test]
    fn a_controller_revision_is_labelled_numbered_and_controlled() {
        let set = web();
        let cr = controller_revision(&set, "web-abc", serde_json::json!({"x": 1}), 4);
        assert_eq!(cr.metadata.name.as_deref(), Some("web-abc"));
        assert_eq!(cr.metadata.namespace.as_deref(), Some("ns"));
        let labels = cr.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get(keys::APPSET_NAME_LABEL).map(String::as_str),
            Some("web")
        );
        assert_eq!(
            labels
                .get(keys::CONTROLLER_REVISION_HASH_LABEL)
                .map(String::as_str),
            Some("web-abc")
        );
        let owner = &cr.metadata.owner_references.unwrap_or_default()[0];
        assert_eq!(
            (owner.uid.as_str(), owner.controller),
            ("set-uid", Some(true))
        );
        assert_eq!(cr.revision, Some(4));
        assert_eq!(cr.data.0, serde_json::json!({"x": 1}));
    }

    #[test]
    fn adoption_keeps_other_owners_and_adds_the_set_as_controller() {
        let set = web();
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-0", "ownerReferences": [
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "other"}
            ]}
        }))
        .expect("a pod");
        let refs = adopted_owner_references(&set, &pod);
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[0].uid, "other");
        assert_eq!(
            (refs[1].uid.as_str(), refs[1].controller),
            ("set-uid", Some(true))
        );
    }

    #[test]
    fn missing_identity_labels_are_those_absent_or_wrong() {
        let set = web();
        let p = pod(&set, &set.spec.template, "web-abc", 1);
        let full = p.metadata.labels.clone().unwrap_or_default();
        assert!(missing_identity_labels("web", 1, &full).is_empty());
        let mut older = full.clone();
        older.remove(keys::STATEFULSET_POD_NAME_LABEL);
        older.insert(keys::POD_INDEX_LABEL.into(), "7".into());
        let missing = missing_identity_labels("web", 1, &older);
        assert_eq!(
            missing.into_iter().collect::<Vec<_>>(),
            [
                (keys::POD_INDEX_LABEL.to_string(), "1".to_string()),
                (
                    keys::STATEFULSET_POD_NAME_LABEL.to_string(),
                    "web-1".to_string()
                ),
            ]
        );
        // Labels of the template or the user are not the controller's to compare.
        older.insert("team".into(), "db".into());
        assert_eq!(missing_identity_labels("web", 1, &older).len(), 2);
    }

    #[test]
    fn the_pod_has_its_identity_volumes_and_owner() {
        let set = web();
        let p = pod(&set, &set.spec.template, "web-abc", 2);
        assert_eq!(p.metadata.name.as_deref(), Some("web-2"));
        assert_eq!(p.metadata.namespace.as_deref(), Some("ns"));
        let labels = p.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(
            labels.get(keys::POD_NAME_LABEL).map(String::as_str),
            Some("web-2")
        );
        assert_eq!(
            labels.get(keys::POD_INDEX_LABEL).map(String::as_str),
            Some("2")
        );
        assert_eq!(
            labels
                .get(keys::STATEFULSET_POD_NAME_LABEL)
                .map(String::as_str),
            Some("web-2")
        );
        assert_eq!(
            labels
                .get(keys::CONTROLLER_REVISION_HASH_LABEL)
                .map(String::as_str),
            Some("web-abc")
        );
        assert_eq!(
            labels.get(keys::APPSET_NAME_LABEL).map(String::as_str),
            Some("web")
        );
        assert_eq!(
            p.metadata
                .annotations
                .and_then(|a| a.get("a").cloned())
                .as_deref(),
            Some("b")
        );
        let owner = &p.metadata.owner_references.unwrap_or_default()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("AppSet", "set-uid", Some(true))
        );
        let spec = p.spec.unwrap_or_default();
        assert_eq!(spec.hostname.as_deref(), Some("web-2"));
        assert_eq!(spec.subdomain.as_deref(), Some("web-svc"));
        let volumes = spec.volumes.unwrap_or_default();
        assert_eq!(
            volumes.len(),
            2,
            "the template's data volume is replaced: {volumes:?}"
        );
        let data = volumes
            .iter()
            .find(|v| v.name == "data")
            .expect("data volume");
        assert_eq!(
            data.persistent_volume_claim
                .as_ref()
                .map(|c| c.claim_name.as_str()),
            Some("data-web-2")
        );
    }

    #[test]
    fn the_pod_uses_the_given_revision_template() {
        let set = web();
        let old = PodTemplateSpec {
            metadata: None,
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "main".into(),
                    image: Some("nginx:old".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        };
        let p = pod(&set, &old, "web-old", 0);
        let spec = p.spec.unwrap_or_default();
        assert_eq!(spec.containers[0].image.as_deref(), Some("nginx:old"));
    }

    #[test]
    fn the_claim_has_its_name_labels_and_owners() {
        let set = web();
        let t = &set.spec.volume_claim_templates[0];
        let c = claim(&set, t, 1, &ClaimOwners::default());
        assert_eq!(c.metadata.name.as_deref(), Some("data-web-1"));
        let labels = c.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get("tier").map(String::as_str), Some("db"));
        assert_eq!(labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(
            labels.get(keys::APPSET_NAME_LABEL).map(String::as_str),
            Some("web")
        );
        assert_eq!(c.metadata.owner_references, None, "Retain: no owners");
        assert_eq!(c.spec, t.spec);

        let owned = claim(
            &set,
            t,
            1,
            &ClaimOwners {
                set: true,
                pod: None,
            },
        );
        let refs = owned.metadata.owner_references.unwrap_or_default();
        assert_eq!(refs.len(), 1);
        assert_eq!(
            (refs[0].uid.as_str(), refs[0].controller),
            ("set-uid", Some(false))
        );
    }

    #[test]
    fn claim_owner_references_keep_foreign_owners() {
        let set = web();
        let foreign = OwnerReference {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            name: "x".into(),
            uid: "x-uid".into(),
            ..Default::default()
        };
        let existing = vec![foreign.clone(), set_claim_ref(&set).expect("ref")];
        let refs = claim_owner_references(
            &set,
            &existing,
            "web-1",
            &ClaimOwners {
                set: false,
                pod: Some("pod-uid".into()),
            },
        );
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[0], foreign);
        assert_eq!(
            (refs[1].kind.as_str(), refs[1].uid.as_str()),
            ("Pod", "pod-uid")
        );

        let mut c = claim(
            &set,
            &set.spec.volume_claim_templates[0],
            1,
            &ClaimOwners::default(),
        );
        c.metadata.owner_references = Some(refs);
        assert_eq!(
            claim_owners_of(&c, "set-uid", "web-1"),
            ClaimOwners {
                set: false,
                pod: Some("pod-uid".into())
            }
        );
        assert_eq!(
            claim_owners_of(&c, "set-uid", "web-2"),
            ClaimOwners::default()
        );
    }

    #[test]
    fn the_headless_service_only_when_managed() {
        let set = web();
        let svc = headless_service(&set).expect("managed service");
        assert_eq!(svc.metadata.name.as_deref(), Some("web-svc"));
        let spec = svc.spec.unwrap_or_default();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(
            spec.selector
                .unwrap_or_default()
                .get(keys::APPSET_NAME_LABEL)
                .map(String::as_str),
            Some("web")
        );
        let mut external = web();
        external.spec.service = ServicePolicy::External;
        assert!(headless_service(&external).is_none());
    }

    #[test]
    fn selectors_render_and_match() {
        let sel = LabelSelector {
            match_labels: Some([("app".to_string(), "web".to_string())].into()),
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "In".into(),
                    values: Some(vec!["a".into(), "b".into()]),
                },
                LabelSelectorRequirement {
                    key: "legacy".into(),
                    operator: "DoesNotExist".into(),
                    values: None,
                },
            ]),
        };
        assert_eq!(selector_string(&sel), "app=web,tier in (a,b),!legacy");
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(selector_matches(
            &sel,
            &labels(&[("app", "web"), ("tier", "a")])
        ));
        assert!(!selector_matches(
            &sel,
            &labels(&[("app", "web"), ("tier", "c")])
        ));
        assert!(!selector_matches(
            &sel,
            &labels(&[("app", "web"), ("tier", "a"), ("legacy", "1")])
        ));
        assert!(!selector_matches(&sel, &labels(&[("tier", "a")])));
        assert!(selector_matches(&LabelSelector::default(), &labels(&[])));
    }

    #[test]
    fn defaults_of_the_spec_are_statefulset_defaults() {
        let set = web();
        let spec: &AppSetSpec = &set.spec;
        assert_eq!(
            spec.pod_management_policy,
            PodManagementPolicy::OrderedReady
        );
        assert_eq!(spec.update_strategy, UpdateStrategy::default());
        assert_eq!(spec.revision_history_limit, 10);
    }
}
