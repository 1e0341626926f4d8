//! Which PodInjections apply to a pod.
//!
//! Pure functions over the pod's namespace, labels and annotations and the PodInjections held in
//! memory. The gates, in order:
//!
//! 1. the namespace must be opted in with `appset.dev/injection=enabled`. The
//!    MutatingWebhookConfiguration's `namespaceSelector` already keeps other namespaces from ever
//!    reaching the webhook; the namespace label cache is consulted again when it knows the
//!    namespace, so a label removed a moment ago is honoured without waiting for the API server;
//! 2. the pod must not carry `appset.dev/inject: disabled`, as a label (which the
//!    MutatingWebhookConfiguration's `objectSelector` also filters on, so such a pod never
//!    reaches the webhook) or as an annotation (the older form, honoured here);
//! 3. a PodInjection applies when it lives in the pod's namespace and its selector matches the
//!    pod's labels (an empty selector matches every pod; a selector with an unknown operator
//!    matches none, as the API server would refuse it anyway).
//!
//! The matching PodInjections are returned sorted by name: that is the order they are applied in.

use std::collections::BTreeMap;

use appset_crds::PodInjection;
use appset_crds::keys;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};

/// Whether a namespace's labels opt it into injection.
pub fn namespace_enabled(labels: &BTreeMap<String, String>) -> bool {
    labels
        .get(keys::INJECTION_NAMESPACE_LABEL)
        .is_some_and(|v| v == keys::INJECTION_ENABLED)
}

/// Whether a pod opts out of injection: `appset.dev/inject: disabled` as a label or as an
/// annotation.
pub fn pod_opted_out(
    labels: Option<&BTreeMap<String, String>>,
    annotations: Option<&BTreeMap<String, String>>,
) -> bool {
    let disabled = |m: Option<&BTreeMap<String, String>>| {
        m.and_then(|m| m.get(keys::INJECTION_POD_OPT_OUT))
            .is_some_and(|v| v == keys::INJECTION_DISABLED)
    };
    disabled(labels) || disabled(annotations)
}

/// Whether `selector` matches `labels`, with the semantics of Kubernetes label selectors
/// (kube's [`Selector`]): every `matchLabels` pair and every `matchExpressions` requirement must
/// hold. A selector with an unknown operator matches nothing.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    Selector::try_from(selector.clone()).is_ok_and(|s| s.matches(labels))
}

/// The PodInjections of `namespace` whose selectors match `pod_labels`, sorted by name.
pub fn matching<'a, I>(
    namespace: &str,
    pod_labels: &BTreeMap<String, String>,
    injections: I,
) -> Vec<&'a PodInjection>
where
    I: IntoIterator<Item = &'a PodInjection>,
{
    let mut out: Vec<&PodInjection> = injections
        .into_iter()
        .filter(|pi| pi.namespace().as_deref() == Some(namespace))
        .filter(|pi| pi.metadata.deletion_timestamp.is_none())
        .filter(|pi| selector_matches(&pi.spec.selector, pod_labels))
        .collect();
    out.sort_by_key(|p| p.name_any());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use appset_crds::PodInjectionSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    fn req(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| (*v).to_string()).collect()),
        }
    }

    fn injection(ns: &str, name: &str, selector: LabelSelector) -> PodInjection {
        let mut pi = PodInjection::new(
            name,
            PodInjectionSpec {
                selector,
                init_container_placement: Default::default(),
                init_containers: vec![],
                volumes: vec![],
                volume_mounts: vec![],
            },
        );
        pi.metadata.namespace = Some(ns.into());
        pi
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(selector_matches(&LabelSelector::default(), &labels(&[])));
        assert!(selector_matches(
            &LabelSelector::default(),
            &labels(&[("app", "x")])
        ));
    }

    #[test]
    fn match_labels_need_every_pair() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "web"), ("tier", "front")])),
            ..Default::default()
        };
        assert!(selector_matches(
            &sel,
            &labels(&[("app", "web"), ("tier", "front"), ("x", "y")])
        ));
        assert!(!selector_matches(&sel, &labels(&[("app", "web")])));
        assert!(!selector_matches(
            &sel,
            &labels(&[("app", "web"), ("tier", "back")])
        ));
    }

    #[test]
    fn match_expressions_follow_kubernetes_semantics() {
        let l = labels(&[("app", "web"), ("env", "prod")]);
        let sel = |r| LabelSelector {
            match_expressions: Some(vec![r]),
            ..Default::default()
        };
        assert!(selector_matches(
            &sel(req("app", "In", &["web", "api"])),
            &l
        ));
        assert!(!selector_matches(&sel(req("app", "In", &["api"])), &l));
        assert!(selector_matches(&sel(req("env", "NotIn", &["dev"])), &l));
        assert!(!selector_matches(&sel(req("env", "NotIn", &["prod"])), &l));
        assert!(selector_matches(&sel(req("missing", "NotIn", &["x"])), &l));
        assert!(selector_matches(&sel(req("app", "Exists", &[])), &l));
        assert!(!selector_matches(&sel(req("missing", "Exists", &[])), &l));
        assert!(selector_matches(
            &sel(req("missing", "DoesNotExist", &[])),
            &l
        ));
        assert!(!selector_matches(&sel(req("app", "DoesNotExist", &[])), &l));
        assert!(!selector_matches(&sel(req("app", "Bogus", &["web"])), &l));
    }

    #[test]
    fn matching_filters_namespace_and_selector_and_sorts_by_name() {
        let web = LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            ..Default::default()
        };
        let db = LabelSelector {
            match_labels: Some(labels(&[("app", "db")])),
            ..Default::default()
        };
        let all = [
            injection("a", "zeta", web.clone()),
            injection("a", "alpha", LabelSelector::default()),
            injection("b", "beta", web.clone()),
            injection("a", "gamma", db),
            injection("a", "delta", web),
        ];
        let got: Vec<String> = matching("a", &labels(&[("app", "web")]), &all)
            .into_iter()
            .map(|p| p.name_any())
            .collect();
        assert_eq!(got, vec!["alpha", "delta", "zeta"]);
    }

    #[test]
    fn namespace_label_and_pod_opt_out() {
        assert!(namespace_enabled(&labels(&[(
            keys::INJECTION_NAMESPACE_LABEL,
            keys::INJECTION_ENABLED
        )])));
        assert!(!namespace_enabled(&labels(&[(
            keys::INJECTION_NAMESPACE_LABEL,
            "true"
        )])));
        assert!(!namespace_enabled(&labels(&[])));
        let disabled = labels(&[(keys::INJECTION_POD_OPT_OUT, keys::INJECTION_DISABLED)]);
        let enabled = labels(&[(keys::INJECTION_POD_OPT_OUT, "enabled")]);
        let other = labels(&[("app", "web")]);
        assert!(pod_opted_out(Some(&disabled), None), "the label");
        assert!(pod_opted_out(None, Some(&disabled)), "the annotation");
        assert!(pod_opted_out(Some(&other), Some(&disabled)));
        assert!(
            pod_opted_out(Some(&disabled), Some(&enabled)),
            "either one suffices"
        );
        assert!(!pod_opted_out(Some(&enabled), Some(&enabled)));
        assert!(!pod_opted_out(Some(&other), None));
        assert!(!pod_opted_out(None, None));
    }
}
