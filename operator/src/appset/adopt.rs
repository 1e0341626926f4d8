//! Adoption rules, sans-IO: which listed pods and claims belong to an AppSet, and which orphans
//! it takes over.
//!
//! * A pod matching the selector whose controller is the AppSet (by uid) is the AppSet's.
//! * A pod with another controller is never touched.
//! * A pod with no controller at all is adopted when its name is `<set>-<ordinal>` and it is
//!   not being deleted: this is how the pods of a StatefulSet deleted with `--cascade=orphan`
//!   move over. Other orphans are ignored.
//! * A claim named `<template>-<set>-<ordinal>` is the AppSet's whatever its owners (the
//!   retention policy manages those); one not yet labelled with the AppSet's name gets the label
//!   (unless it is being deleted), so that its changes trigger reconciles.
//!
//! The I/O half is in [`super::observe`].

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::ResourceExt;

use appset_crds::keys;

use super::plan;
use crate::kubeapi::is_controlled_by;

/// What the AppSet does with a pod that matches its selector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodOwnership {
    /// Its controller is the AppSet.
    Owned,
    /// An orphan the AppSet takes over.
    Adopt,
    /// Another controller's pod, or an orphan the AppSet does not want.
    Ignore,
}

/// Decides about one listed pod of the AppSet `set_name` with uid `set_uid`.
pub fn pod_ownership(set_name: &str, set_uid: &str, pod: &Pod) -> PodOwnership {
    match is_controlled_by(&pod.metadata, set_uid) {
        Some(true) => PodOwnership::Owned,
        Some(false) => PodOwnership::Ignore,
        None => {
            let named = plan::parse_pod_ordinal(set_name, &pod.name_any()).is_some();
            if named && pod.metadata.deletion_timestamp.is_none() {
                PodOwnership::Adopt
            } else {
                PodOwnership::Ignore
            }
        }
    }
}

/// Which volumeClaimTemplate and ordinal a claim named `<template>-<set>-<ordinal>` belongs
/// to, if any of `templates`.
pub fn claim_slot(templates: &[String], set_name: &str, claim_name: &str) -> Option<(String, i32)> {
    templates
        .iter()
        .find_map(|t| plan::parse_claim_ordinal(t, set_name, claim_name).map(|o| (t.clone(), o)))
}

/// Whether one of the AppSet's claims still needs the AppSet's name label.
pub fn claim_needs_label(set_name: &str, claim: &PersistentVolumeClaim) -> bool {
    claim
        .labels()
        .get(keys::APPSET_NAME_LABEL)
        .map(String::as_str)
        != Some(set_name)
        && claim.metadata.deletion_timestamp.is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).expect("a pod")
    }

    fn owner(uid: &str, controller: bool) -> serde_json::Value {
        json!({"apiVersion": "appset.dev/v1alpha1", "kind": "AppSet", "name": "web",
               "uid": uid, "controller": controller})
    }

    #[test]
    fn pods_are_owned_adopted_or_ignored() {
        let owned =
            pod(json!({"metadata": {"name": "web-0", "ownerReferences": [owner("me", true)]}}));
        let foreign =
            pod(json!({"metadata": {"name": "web-1", "ownerReferences": [owner("x", true)]}}));
        let orphan = pod(json!({"metadata": {"name": "web-2"}}));
        let orphan_with_plain_owner =
            pod(json!({"metadata": {"name": "web-3", "ownerReferences": [owner("x", false)]}}));
        let misnamed = pod(json!({"metadata": {"name": "webby-0"}}));
        let leaving = pod(
            json!({"metadata": {"name": "web-4", "deletionTimestamp": "2026-01-01T00:00:00Z"}}),
        );
        assert_eq!(pod_ownership("web", "me", &owned), PodOwnership::Owned);
        assert_eq!(pod_ownership("web", "me", &foreign), PodOwnership::Ignore);
        assert_eq!(pod_ownership("web", "me", &orphan), PodOwnership::Adopt);
        assert_eq!(
            pod_ownership("web", "me", &orphan_with_plain_owner),
            PodOwnership::Adopt
        );
        assert_eq!(pod_ownership("web", "me", &misnamed), PodOwnership::Ignore);
        assert_eq!(pod_ownership("web", "me", &leaving), PodOwnership::Ignore);
    }

    #[test]
    fn claims_are_matched_by_name_and_labelled_once() {
        let templates = vec!["data".to_string(), "logs".to_string()];
        assert_eq!(
            claim_slot(&templates, "web", "logs-web-3"),
            Some(("logs".to_string(), 3))
        );
        assert_eq!(claim_slot(&templates, "web", "data-webby-3"), None);
        assert_eq!(claim_slot(&templates, "web", "cache-web-0"), None);
        let claim = |v| -> PersistentVolumeClaim { serde_json::from_value(v).expect("a claim") };
        let unlabelled = claim(json!({"metadata": {"name": "data-web-0"}}));
        let labelled = claim(
            json!({"metadata": {"name": "data-web-0", "labels": {keys::APPSET_NAME_LABEL: "web"}}}),
        );
        let leaving = claim(
            json!({"metadata": {"name": "data-web-0", "deletionTimestamp": "2026-01-01T00:00:00Z"}}),
        );
        assert!(claim_needs_label("web", &unlabelled));
        assert!(!claim_needs_label("web", &labelled));
        assert!(!claim_needs_label("web", &leaving));
    }
}
