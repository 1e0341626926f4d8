//! Manifests and small helpers the tests and benchmarks share, so that an AppSet, the
//! StatefulSet it is compared with, a Deployment or a ConfigMap is written once.
//!
//! Manifests are built as JSON (`serde_json::json!`), close to the YAML a user writes, and
//! adjusted with [`merge`] (a JSON merge: objects merge key by key, anything else replaces).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result};
use appset_crds::{AppSet, keys};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// Merges `extra` into `base`: objects key by key (recursively), anything else replaces.
pub fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e,
    }
}

/// The spec shared by a StatefulSet and an AppSet: `replicas` pods labelled `app: <name>`,
/// governed by the Service `<name>`, running `image` with one 1Gi `ReadWriteOnce` claim
/// template named `data` mounted at `/data`.
pub fn claimed_set_spec(name: &str, replicas: i32, image: &str) -> Value {
    json!({
        "replicas": replicas,
        "serviceName": name,
        "selector": {"matchLabels": {"app": name}},
        "template": {
            "metadata": {"labels": {"app": name}},
            "spec": {"containers": [{"name": "main", "image": image,
                "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}
        },
        "volumeClaimTemplates": [{
            "metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
        }]
    })
}

/// An AppSet named `name` with `spec`.
pub fn appset_with_spec(name: &str, spec: Value) -> Result<AppSet> {
    serde_json::from_value(json!({
        "apiVersion": "appset.dev/v1alpha1",
        "kind": "AppSet",
        "metadata": {"name": name},
        "spec": spec
    }))
    .with_context(|| format!("AppSet {name} manifest"))
}

/// The AppSet most tests use: [`claimed_set_spec`] with nginx and a managed Service, `extra`
/// merged into the spec.
pub fn appset(name: &str, replicas: i32, extra: Value) -> Result<AppSet> {
    let mut spec = claimed_set_spec(name, replicas, "nginx:1.27");
    merge(&mut spec, json!({"service": "Managed"}));
    merge(&mut spec, extra);
    appset_with_spec(name, spec)
}

/// A StatefulSet named `name` with `spec`.
pub fn statefulset(name: &str, spec: Value) -> Result<StatefulSet> {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name},
        "spec": spec
    }))
    .with_context(|| format!("StatefulSet {name} manifest"))
}

/// A pod template labelled `app: <app>` with one container `app`; the keys of `spec` are
/// merged into the pod spec, except `container`, whose keys are merged into the container.
pub fn pod_template(app: &str, spec: Value) -> Value {
    let mut pod = json!({"containers": [{"name": "app", "image": "registry.invalid/app:1"}]});
    if let (Some(p), Some(extra)) = (pod.as_object_mut(), spec.as_object()) {
        for (k, v) in extra {
            if k == "container" {
                if let Some(c) = p["containers"][0].as_object_mut() {
                    for (ck, cv) in v.as_object().into_iter().flatten() {
                        c.insert(ck.clone(), cv.clone());
                    }
                }
            } else {
                p.insert(k.clone(), v.clone());
            }
        }
    }
    json!({"metadata": {"labels": {"app": app}}, "spec": pod})
}

/// A one-replica Deployment with `annotations` and the [`pod_template`] of `spec`.
pub fn deployment(name: &str, annotations: Value, spec: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": pod_template(name, spec),
        }
    })
}

/// The annotations that opt a workload into config rollout.
pub fn auto() -> Value {
    json!({ keys::CONFIG_ROLLOUT: keys::CONFIG_ROLLOUT_AUTO })
}

/// A ConfigMap manifest.
pub fn config_map(name: &str, data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data})
}

/// A Secret manifest (`stringData`).
pub fn secret(name: &str, data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data})
}

/// Creates the object `v` describes.
pub async fn create<K>(api: &Api<K>, v: Value) -> Result<K>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(v).context("a valid manifest")?;
    api.create(&PostParams::default(), &obj)
        .await
        .with_context(|| format!("create {}", obj.name_any()))
}

/// Applies a JSON merge patch to `name`.
pub async fn merge_patch<K>(api: &Api<K>, name: &str, patch: Value) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("patch {name}"))?;
    Ok(())
}

/// The value of annotation `key` on `obj`.
pub fn annotation<K: Resource>(obj: &K, key: &str) -> Option<String> {
    obj.meta()
        .annotations
        .as_ref()
        .and_then(|a| a.get(key).cloned())
}

/// The config rollout baseline recorded on `obj` (the `appset.dev/config-baseline` label).
pub fn baseline<K: Resource>(obj: &K) -> Option<String> {
    obj.meta()
        .labels
        .as_ref()
        .and_then(|l| l.get(keys::CONFIG_BASELINE).cloned())
}

/// The baseline label that stands for a template's config hash (`<key id>:<digest>`):
/// `<key id>.<first 46 hex digits>`.
pub fn baseline_for_hash(hash: &str) -> String {
    let (key, digest) = hash.split_once(':').unwrap_or((hash, ""));
    format!("{key}.{}", &digest[..digest.len().min(46)])
}

/// Waits (up to a minute) until config rollout has recorded a baseline on `name`
/// (the `appset.dev/config-baseline` label); returns the object then.
pub async fn wait_adopted<K>(api: &Api<K>, name: &str) -> Result<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    crate::wait_for(
        &format!("{name} to be adopted"),
        Duration::from_secs(60),
        || async {
            let obj = api.get(name).await?;
            Ok(match baseline(&obj) {
                Some(_) => Ok(obj),
                None => Err("no baseline yet".to_string()),
            })
        },
    )
    .await
}

/// The config hash in a Deployment's pod template.
pub fn template_hash(d: &Deployment) -> Option<String> {
    d.spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(keys::CONFIG_HASH).cloned())
}

/// Whether the pod is Running, Ready and not being deleted.
pub fn is_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status.as_ref().is_some_and(|s| {
            s.phase.as_deref() == Some("Running")
                && s.conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// The pod's `controller-revision-hash` label.
pub fn revision_of(p: &Pod) -> String {
    p.labels()
        .get(keys::CONTROLLER_REVISION_HASH_LABEL)
        .cloned()
        .unwrap_or_default()
}

/// Waits until the AppSet `name` in `namespace` has exactly the pods `<name>-0 ..
/// <name>-<n-1>`, all Ready and at the update revision, and its status says so. Returns the
/// pods by name.
pub async fn wait_settled(
    client: &Client,
    namespace: &str,
    name: &str,
    n: i32,
    deadline: Duration,
) -> Result<BTreeMap<String, Pod>> {
    let sets: Api<AppSet> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    crate::wait_for(
        &format!("AppSet {name} settled at {n} Ready pods"),
        deadline,
        || async {
            let set = sets.get(name).await?;
            let st = set.status.clone().unwrap_or_default();
            let list = pods
                .list(&ListParams::default().labels(&format!("{}={name}", keys::APPSET_NAME_LABEL)))
                .await?;
            let names: BTreeSet<String> = list.items.iter().map(|p| p.name_any()).collect();
            let want: BTreeSet<String> = (0..n).map(|o| format!("{name}-{o}")).collect();
            let update = st.update_revision.clone().unwrap_or_default();
            let ok = names == want
                && list
                    .items
                    .iter()
                    .all(|p| is_ready(p) && revision_of(p) == update)
                && st.ready_replicas == n
                && st.replicas == n
                && st.updated_replicas == n
                && st.observed_generation == set.metadata.generation;
            Ok(if ok {
                Ok(list.items.into_iter().map(|p| (p.name_any(), p)).collect())
            } else {
                Err(format!(
                    "pods {names:?}, status replicas {} ready {} updated {} generation {:?}/{:?}",
                    st.replicas,
                    st.ready_replicas,
                    st.updated_replicas,
                    st.observed_generation,
                    set.metadata.generation
                ))
            })
        },
    )
    .await
}

/// A Deployment `api` of one pod in config snapshot mode whose container reads `password` from
/// the Secret `db` through `env.valueFrom` (the snapshot tests' Secret reader).
pub fn secret_reader() -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "api", "annotations": {keys::CONFIG_ROLLOUT: keys::CONFIG_ROLLOUT_SNAPSHOT}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "api"}},
            "template": {
                "metadata": {"labels": {"app": "api"}},
                "spec": {"containers": [{
                    "name": "api", "image": "nginx:1.27",
                    "env": [{"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}]
                }]}
            }
        }
    })
}

/// The Secret each live pod of [`secret_reader`] reads its password from.
pub async fn secrets_read(pods: &Api<k8s_openapi::api::core::v1::Pod>) -> Result<Vec<String>> {
    let list = pods
        .list(&kube::api::ListParams::default().labels("app=api"))
        .await?;
    Ok(list
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            p.spec
                .as_ref()?
                .containers
                .first()?
                .env
                .as_ref()?
                .first()?
                .value_from
                .as_ref()?
                .secret_key_ref
                .as_ref()
                .map(|r| r.name.clone())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_merges_objects_and_replaces_the_rest() {
        let mut base = json!({"a": {"b": 1, "c": [1]}, "d": 1});
        merge(
            &mut base,
            json!({"a": {"c": [2], "e": null}, "d": {"x": 1}}),
        );
        assert_eq!(
            base,
            json!({"a": {"b": 1, "c": [2], "e": null}, "d": {"x": 1}})
        );
    }

    #[test]
    fn an_appset_and_a_statefulset_share_the_spec() -> Result<()> {
        let set = appset("web", 3, json!({"podManagementPolicy": "Parallel"}))?;
        assert_eq!(set.spec.replicas, 3);
        let sts = statefulset("web", claimed_set_spec("web", 3, "nginx:1.27"))?;
        assert_eq!(sts.spec.replicas, Some(3));
        assert_eq!(sts.spec.volume_claim_templates.map(|v| v.len()), Some(1));
        Ok(())
    }
}
