//! Unit tests of the generated CRD schemas: structure, documentation, subresources, printer
//! columns, and the CEL rules (evaluated client-side with kube's CEL validator; the e2e suite
//! checks the same manifests against a real API server).

use appset_crds::appset::{
    PodManagementPolicy, RetentionPolicyType, ServicePolicy, UpdateStrategyType,
};
use appset_crds::{AppSet, AppSetSpec, PodInjection};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::{Value, json};

fn schema(crd: &CustomResourceDefinition) -> Value {
    let v = &crd.spec.versions[0];
    serde_json::to_value(
        v.schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("schema"),
    )
    .expect("json")
}

/// Walks every schema node, calling `f(path, node)`.
fn walk(path: &str, node: &Value, f: &mut dyn FnMut(&str, &Value)) {
    f(path, node);
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            walk(&format!("{path}.{k}"), v, f);
        }
    }
    if let Some(items) = node.get("items") {
        walk(&format!("{path}[]"), items, f);
    }
    if let Some(ap) = node.get("additionalProperties").filter(|v| v.is_object()) {
        walk(&format!("{path}{{}}"), ap, f);
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(list) = node.get(key).and_then(Value::as_array) {
            for (i, v) in list.iter().enumerate() {
                walk(&format!("{path}<{key}{i}>"), v, f);
            }
        }
    }
}

#[test]
fn schemas_are_structural() {
    for crd in appset_crds::generate::crds() {
        let mut problems = Vec::new();
        walk("", &schema(&crd), &mut |path, node| {
            for forbidden in ["$ref", "definitions", "$defs", "$schema"] {
                if node.get(forbidden).is_some() {
                    problems.push(format!("{path}: has {forbidden}"));
                }
            }
            let typed = node.get("type").is_some()
                || node.get("x-kubernetes-int-or-string").is_some()
                || node.get("x-kubernetes-preserve-unknown-fields").is_some();
            // Nodes under anyOf/oneOf may omit the type (structural schemas allow it there).
            if !typed && !path.contains("<") {
                problems.push(format!("{path}: no type"));
            }
            if node.get("properties").is_some() && node.get("additionalProperties").is_some() {
                problems.push(format!("{path}: both properties and additionalProperties"));
            }
        });
        assert!(
            problems.is_empty(),
            "{}: not structural:\n{}",
            crd.metadata.name.unwrap_or_default(),
            problems.join("\n")
        );
    }
}

#[test]
fn every_appset_field_is_documented() {
    for crd in appset_crds::generate::crds() {
        let mut missing = Vec::new();
        let root = schema(&crd);
        for top in ["spec", "status"] {
            if let Some(node) = root["properties"].get(top) {
                walk(top, node, &mut |path, node| {
                    let is_field =
                        !path.ends_with("[]") && !path.ends_with('}') && !path.ends_with('>');
                    if is_field
                        && node
                            .get("description")
                            .and_then(Value::as_str)
                            .is_none_or(str::is_empty)
                    {
                        missing.push(path.to_string());
                    }
                });
            }
        }
        assert!(
            missing.is_empty(),
            "undocumented fields in {:?}:\n{}",
            crd.metadata.name,
            missing.join("\n")
        );
    }
}

#[test]
fn appset_crd_names_subresources_and_columns() {
    let crd = AppSet::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("appsets.appset.dev"));
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&["aps".to_string()][..])
    );
    assert_eq!(
        crd.spec.names.categories.as_deref(),
        Some(&["all".to_string()][..])
    );
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    let sub = v.subresources.as_ref().expect("subresources");
    assert!(sub.status.is_some(), "status subresource");
    let scale = sub.scale.as_ref().expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.labelSelector")
    );
    let cols: Vec<_> = v
        .additional_printer_columns
        .as_ref()
        .expect("columns")
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        cols,
        ["Replicas", "Ready", "Updated", "Revision", "Status", "Age"]
    );
    let status = v
        .additional_printer_columns
        .iter()
        .flatten()
        .find(|c| c.name == "Status")
        .expect("Status column");
    assert_eq!(
        status.json_path, r#".status.conditions[?(@.type=="Ready")].reason"#,
        "the Ready condition's reason"
    );

    let pi = PodInjection::crd();
    assert_eq!(
        pi.metadata.name.as_deref(),
        Some("podinjections.appset.dev")
    );
    assert_eq!(pi.spec.scope, "Namespaced");
}

/// A StatefulSet manifest as a user writes it, with `kind` changed.
const STATEFULSET_STYLE: &str = r#"
apiVersion: appset.dev/v1alpha1
kind: AppSet
metadata: {name: web, namespace: default}
spec:
  replicas: 3
  serviceName: web
  selector: {matchLabels: {app: web}}
  podManagementPolicy: Parallel
  updateStrategy:
    type: RollingUpdate
    rollingUpdate: {partition: 1, maxUnavailable: 2}
  persistentVolumeClaimRetentionPolicy: {whenDeleted: Delete, whenScaled: Retain}
  minReadySeconds: 5
  revisionHistoryLimit: 3
  ordinals: {start: 1}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: nginx
        image: nginx:1.27
        ports: [{containerPort: 80, name: http}]
        volumeMounts: [{name: www, mountPath: /usr/share/nginx/html}]
  volumeClaimTemplates:
  - metadata: {name: www}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {requests: {storage: 1Gi}}
"#;

#[test]
fn statefulset_style_appset_parses_and_round_trips() {
    let set: AppSet = serde_yaml_ng::from_str(STATEFULSET_STYLE).expect("parse");
    let s = &set.spec;
    assert_eq!(s.replicas, 3);
    assert_eq!(s.service_name.as_deref(), Some("web"));
    assert_eq!(s.pod_management_policy, PodManagementPolicy::Parallel);
    assert_eq!(s.update_strategy.type_, UpdateStrategyType::RollingUpdate);
    assert_eq!(s.partition(), 1);
    assert_eq!(
        s.persistent_volume_claim_retention_policy.when_deleted,
        RetentionPolicyType::Delete
    );
    assert_eq!(
        s.persistent_volume_claim_retention_policy.when_scaled,
        RetentionPolicyType::Retain
    );
    assert_eq!(s.min_ready_seconds, 5);
    assert_eq!(s.revision_history_limit, 3);
    assert_eq!(s.start_ordinal(), 1);
    assert_eq!(s.volume_claim_templates.len(), 1);
    assert!(s.config_rollout, "configRollout defaults on");

    let json = serde_json::to_value(&set).expect("serialize");
    let back: AppSet = serde_json::from_value(json.clone()).expect("deserialize");
    assert_eq!(back, set);
    assert_eq!(
        json["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        json!(2)
    );

    // The same spec is a valid apps/v1 StatefulSet spec: the shared fields carry over.
    let sts_yaml = STATEFULSET_STYLE
        .replace("appset.dev/v1alpha1", "apps/v1")
        .replace("kind: AppSet", "kind: StatefulSet");
    let sts: k8s_openapi::api::apps::v1::StatefulSet =
        serde_yaml_ng::from_str(&sts_yaml).expect("statefulset");
    let sts_spec = sts.spec;
    assert_eq!(sts_spec.replicas, Some(s.replicas));
    assert_eq!(sts_spec.template, s.template);
    assert_eq!(sts_spec.selector, s.selector);
    assert_eq!(
        sts_spec.volume_claim_templates.unwrap_or_default(),
        s.volume_claim_templates
    );
}

#[test]
fn defaults_match_statefulset() {
    let spec: AppSetSpec = serde_json::from_value(json!({
        "selector": {"matchLabels": {"app": "x"}},
        "template": {"metadata": {"labels": {"app": "x"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}
    }))
    .expect("minimal spec");
    assert_eq!(spec.replicas, 1);
    assert_eq!(
        spec.pod_management_policy,
        PodManagementPolicy::OrderedReady
    );
    assert_eq!(
        spec.update_strategy.type_,
        UpdateStrategyType::RollingUpdate
    );
    assert_eq!(spec.partition(), 0);
    assert_eq!(
        spec.persistent_volume_claim_retention_policy.when_deleted,
        RetentionPolicyType::Retain
    );
    assert_eq!(
        spec.persistent_volume_claim_retention_policy.when_scaled,
        RetentionPolicyType::Retain
    );
    assert_eq!(spec.revision_history_limit, 10);
    assert_eq!(spec.min_ready_seconds, 0);
    assert_eq!(spec.start_ordinal(), 0);
    assert_eq!(spec.service, ServicePolicy::External);
    assert_eq!(spec.progress_deadline_seconds, 600);
    assert!(spec.config_rollout);

    // The API server applies the same defaults from the schema.
    let root = schema(&AppSet::crd());
    let props = &root["properties"]["spec"]["properties"];
    assert_eq!(props["replicas"]["default"], json!(1));
    assert_eq!(props["revisionHistoryLimit"]["default"], json!(10));
    assert_eq!(
        props["podManagementPolicy"]["default"],
        json!("OrderedReady")
    );
    assert_eq!(props["configRollout"]["default"], json!(true));
    assert_eq!(props["replicas"]["minimum"], json!(0.0));
}

#[test]
fn podinjection_round_trips() {
    let yaml = r#"
apiVersion: appset.dev/v1alpha1
kind: PodInjection
metadata: {name: git-content, namespace: web}
spec:
  selector: {matchLabels: {app: nginx}}
  initContainers:
  - name: clone
    image: alpine/git:2.45.2
    args: [clone, --depth=1, "https://example.invalid/site.git", /content]
    volumeMounts: [{name: content, mountPath: /content}]
  volumes:
  - name: content
    emptyDir: {sizeLimit: 64Mi}
  volumeMounts:
  - {name: content, mountPath: /usr/share/nginx/html, readOnly: true, containers: [nginx]}
"#;
    let pi: PodInjection = serde_yaml_ng::from_str(yaml).expect("parse");
    assert_eq!(pi.spec.init_containers.len(), 1);
    assert_eq!(pi.spec.volumes[0].name, "content");
    assert!(pi.spec.volume_mounts[0].read_only);
    let back: PodInjection =
        serde_json::from_value(serde_json::to_value(&pi).expect("ser")).expect("de");
    assert_eq!(back, pi);
}

// --- CEL rules, evaluated client-side against the generated CRD schema ---

fn cel_errors(crd: &CustomResourceDefinition, object: &Value) -> Vec<String> {
    match kube::core::cel::Validator::new().validate(&schema(crd), object, None) {
        Ok(()) => Vec::new(),
        Err(errs) => errs.into_iter().map(|e| e.to_string()).collect(),
    }
}

fn appset(spec_patch: Value) -> Value {
    let mut obj: Value =
        serde_json::to_value(serde_yaml_ng::from_str::<Value>(STATEFULSET_STYLE).expect("yaml"))
            .expect("json");
    if let (Some(spec), Some(patch)) = (obj["spec"].as_object_mut(), spec_patch.as_object()) {
        for (k, v) in patch {
            spec.insert(k.clone(), v.clone());
        }
    }
    obj
}

#[test]
fn cel_accepts_a_valid_appset() {
    let errs = cel_errors(&AppSet::crd(), &appset(json!({})));
    assert!(errs.is_empty(), "{errs:?}");
}

#[test]
fn cel_accepts_a_minimal_appset_and_podinjection() {
    let minimal = json!({
        "apiVersion": "appset.dev/v1alpha1", "kind": "AppSet", "metadata": {"name": "m"},
        "spec": {
            "selector": {"matchLabels": {"app": "m"}},
            "template": {"metadata": {"labels": {"app": "m"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}
        }
    });
    let errs = cel_errors(&AppSet::crd(), &minimal);
    assert!(errs.is_empty(), "{errs:?}");
    let pi = json!({"apiVersion": "appset.dev/v1alpha1", "kind": "PodInjection", "metadata": {"name": "p"}, "spec": {"selector": {}}});
    let errs = cel_errors(&PodInjection::crd(), &pi);
    assert!(errs.is_empty(), "{errs:?}");
}

#[test]
fn cel_rejects_selector_not_matching_template() {
    let errs = cel_errors(
        &AppSet::crd(),
        &appset(json!({"selector": {"matchLabels": {"app": "other"}}})),
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("spec.selector.matchLabels must match")),
        "{errs:?}"
    );
}

#[test]
fn cel_checks_max_unavailable() {
    for (bad, ok) in [
        (json!(0), json!(1)),
        (json!("0%"), json!("25%")),
        (json!("101%"), json!("100%")),
        (json!("x"), json!(3)),
    ] {
        let errs = cel_errors(
            &AppSet::crd(),
            &appset(
                json!({"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": bad}}}),
            ),
        );
        assert!(
            errs.iter().any(|e| e.contains("maxUnavailable must be")),
            "{bad}: {errs:?}"
        );
        let errs = cel_errors(
            &AppSet::crd(),
            &appset(
                json!({"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": ok}}}),
            ),
        );
        assert!(errs.is_empty(), "{ok}: {errs:?}");
    }
}

#[test]
fn cel_requires_service_name_for_managed_service() {
    let mut obj = appset(json!({"service": "Managed"}));
    assert!(cel_errors(&AppSet::crd(), &obj).is_empty());
    obj["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("serviceName");
    let errs = cel_errors(&AppSet::crd(), &obj);
    assert!(
        errs.iter().any(|e| e.contains("serviceName is required")),
        "{errs:?}"
    );
}

#[test]
fn cel_rejects_rolling_update_params_with_on_delete() {
    let errs = cel_errors(
        &AppSet::crd(),
        &appset(json!({"updateStrategy": {"type": "OnDelete", "rollingUpdate": {"partition": 1}}})),
    );
    assert!(
        errs.iter().any(|e| e.contains("only allowed when")),
        "{errs:?}"
    );
}

#[test]
fn cel_checks_podinjection_mounts_and_names() {
    let base = json!({
        "apiVersion": "appset.dev/v1alpha1", "kind": "PodInjection",
        "metadata": {"name": "p", "namespace": "n"},
        "spec": {
            "selector": {},
            "volumes": [{"name": "content", "emptyDir": {}}],
            "volumeMounts": [{"name": "content", "mountPath": "/data"}]
        }
    });
    assert!(cel_errors(&PodInjection::crd(), &base).is_empty());
    let mut bad = base.clone();
    bad["spec"]["volumeMounts"][0]["name"] = json!("missing");
    let errs = cel_errors(&PodInjection::crd(), &bad);
    assert!(
        errs.iter().any(|e| e.contains("must name a volume")),
        "{errs:?}"
    );
    let mut rel = base.clone();
    rel["spec"]["volumeMounts"][0]["mountPath"] = json!("data");
    let errs = cel_errors(&PodInjection::crd(), &rel);
    assert!(errs.iter().any(|e| e.contains("absolute path")), "{errs:?}");
    // Name uniqueness is enforced by the API server through list-type map (see the e2e suite).
    let root = schema(&PodInjection::crd());
    for list in ["volumes", "initContainers"] {
        let node = &root["properties"]["spec"]["properties"][list];
        assert_eq!(node["x-kubernetes-list-type"], json!("map"), "{list}");
        assert_eq!(
            node["x-kubernetes-list-map-keys"],
            json!(["name"]),
            "{list}"
        );
    }
}

#[test]
fn podinjection_volumes_are_emptydir_only() {
    let root = schema(&PodInjection::crd());
    let vol = &root["properties"]["spec"]["properties"]["volumes"]["items"];
    let keys: Vec<_> = vol["properties"]
        .as_object()
        .expect("props")
        .keys()
        .cloned()
        .collect();
    assert_eq!(keys, ["emptyDir", "name"]);
    let required: Vec<_> = vol["required"]
        .as_array()
        .expect("required")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        required.contains(&"emptyDir"),
        "emptyDir must be required: {required:?}"
    );
}
