//! The AppSet controller on the real local control plane.
//!
//! Each test runs the controller in-process, scoped to its own namespace (the config hash key
//! Secret lives there too), creates AppSets through the API and waits for the cluster to reach
//! the expected state. KWOK marks scheduled pods Running and Ready; a "broken" pod is simulated
//! with a nodeSelector no node satisfies, so it stays Pending and never becomes Ready.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use appset_crds::{AppSet, keys};
use appset_e2e::{TestNamespace, wait_for};
use appset_operator::appset::controller::{self, Settings};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{ControllerRevision, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(120);

/// The controller running for one namespace; stopped when dropped.
struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.abort();
    }
}

fn start(ns: &TestNamespace) -> Running {
    let mut settings = Settings::new(ns.name.clone());
    settings.namespaces = Some(vec![ns.name.clone()]);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let client = ns.client.clone();
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = rx.await;
        };
        if let Err(err) = controller::run(client, settings, shutdown).await {
            eprintln!("AppSet controller failed: {err}");
        }
    });
    Running {
        stop: Some(tx),
        task,
    }
}

/// An AppSet manifest: `replicas` pods of nginx with one 1Gi claim template named `data`;
/// `extra` is merged into the spec.
fn appset(name: &str, replicas: i32, extra: Value) -> Result<AppSet> {
    let mut spec = json!({
        "replicas": replicas,
        "serviceName": name,
        "service": "Managed",
        "selector": {"matchLabels": {"app": name}},
        "template": {
            "metadata": {"labels": {"app": name}},
            "spec": {"containers": [{"name": "main", "image": "nginx:1.27",
                "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}
        },
        "volumeClaimTemplates": [{
            "metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
        }]
    });
    merge(&mut spec, extra);
    Ok(serde_json::from_value(json!({
        "apiVersion": "appset.dev/v1alpha1",
        "kind": "AppSet",
        "metadata": {"name": name},
        "spec": spec
    }))?)
}

fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e,
    }
}

fn is_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status.as_ref().is_some_and(|s| {
            s.phase.as_deref() == Some("Running")
                && s.conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

fn revision_of(p: &Pod) -> String {
    p.labels()
        .get(keys::CONTROLLER_REVISION_HASH_LABEL)
        .cloned()
        .unwrap_or_default()
}

/// Waits until the AppSet has exactly the pods `<name>-0 .. <name>-<n-1>`, all Ready and at the
/// update revision, and its status says so. Returns the pods by name.
async fn wait_settled(ns: &TestNamespace, name: &str, n: i32) -> Result<BTreeMap<String, Pod>> {
    let sets = ns.api::<AppSet>();
    let pods = ns.api::<Pod>();
    wait_for(
        &format!("AppSet {name} settled at {n} Ready pods"),
        LONG,
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

async fn claim_names(ns: &TestNamespace) -> Result<BTreeSet<String>> {
    Ok(ns
        .api::<PersistentVolumeClaim>()
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .map(|c| c.name_any())
        .collect())
}

async fn wait_claims(ns: &TestNamespace, want: &[&str]) -> Result<()> {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    wait_for(&format!("claims {want:?}"), LONG, || async {
        let have = claim_names(ns).await?;
        Ok(if have == want {
            Ok(())
        } else {
            Err(format!("{have:?}"))
        })
    })
    .await
}

async fn patch_spec(ns: &TestNamespace, name: &str, spec: Value) -> Result<()> {
    ns.api::<AppSet>()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await
        .with_context(|| format!("patch AppSet {name}"))?;
    Ok(())
}

fn condition(set: &AppSet, type_: &str) -> Option<(String, String)> {
    set.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_get_pods_claims_service_and_status() -> Result<()> {
    let ns = TestNamespace::new("aps-create").await?;
    let _ctl = start(&ns);
    ns.api::<AppSet>()
        .create(&PostParams::default(), &appset("web", 3, json!({}))?)
        .await?;
    let pods = wait_settled(&ns, "web", 3).await?;
    let set = ns.api::<AppSet>().get("web").await?;
    let st = set.status.clone().unwrap_or_default();
    let uid = set.uid().unwrap_or_default();
    for (o, (pname, pod)) in pods.iter().enumerate() {
        assert_eq!(pname, &format!("web-{o}"));
        let labels = pod.labels();
        assert_eq!(labels.get(keys::POD_NAME_LABEL), Some(pname));
        assert_eq!(labels.get(keys::POD_INDEX_LABEL), Some(&o.to_string()));
        assert_eq!(
            labels.get(keys::APPSET_NAME_LABEL).map(String::as_str),
            Some("web")
        );
        assert_eq!(labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(Some(revision_of(pod)), st.update_revision);
        let spec = pod.spec.clone().unwrap_or_default();
        assert_eq!(spec.hostname.as_deref(), Some(pname.as_str()));
        assert_eq!(spec.subdomain.as_deref(), Some("web"));
        let claim = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "data")
            .and_then(|v| v.persistent_volume_claim.clone())
            .map(|c| c.claim_name);
        assert_eq!(claim, Some(format!("data-web-{o}")));
        let owner = pod
            .owner_references()
            .iter()
            .find(|r| r.controller == Some(true))
            .context("controller reference")?;
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("AppSet", uid.as_str())
        );
    }
    let claims = ns.api::<PersistentVolumeClaim>();
    wait_for("3 claims Bound", LONG, || async {
        let list = claims.list(&ListParams::default()).await?;
        let bound: Vec<String> = list
            .items
            .iter()
            .filter(|c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
            .map(|c| c.name_any())
            .collect();
        Ok(if bound.len() == 3 {
            Ok(())
        } else {
            Err(format!("bound {bound:?}"))
        })
    })
    .await?;
    for o in 0..3 {
        let c = claims.get(&format!("data-web-{o}")).await?;
        assert_eq!(
            c.labels().get(keys::APPSET_NAME_LABEL).map(String::as_str),
            Some("web")
        );
        assert_eq!(c.labels().get("app").map(String::as_str), Some("web"));
        assert!(
            c.owner_references().is_empty(),
            "Retain/Retain claims have no owners: {:?}",
            c.owner_references()
        );
    }
    let svc = ns.api::<Service>().get("web").await?;
    assert_eq!(
        svc.spec.and_then(|s| s.cluster_ip).as_deref(),
        Some("None"),
        "headless"
    );
    let revs = ns
        .api::<ControllerRevision>()
        .list(&ListParams::default())
        .await?;
    assert_eq!(revs.items.len(), 1);
    assert_eq!(Some(revs.items[0].name_any()), st.update_revision);
    assert_eq!(st.current_revision, st.update_revision);
    assert_eq!(st.label_selector.as_deref(), Some("app=web"));
    assert_eq!(st.available_replicas, 3);
    assert_eq!(
        condition(&set, "Available"),
        Some(("True".into(), "MinimumReplicasAvailable".into()))
    );
    assert_eq!(
        condition(&set, "Progressing"),
        Some(("True".into(), "RolloutComplete".into()))
    );
    assert_eq!(st.volume_claim_templates.len(), 1);
    assert_eq!(st.volume_claim_templates[0].claims, 3);
    ns.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_keeps_claims_by_default_and_works_through_the_scale_subresource() -> Result<()> {
    let ns = TestNamespace::new("aps-scale").await?;
    let _ctl = start(&ns);
    ns.api::<AppSet>()
        .create(
            &PostParams::default(),
            &appset("web", 3, json!({"podManagementPolicy": "Parallel"}))?,
        )
        .await?;
    wait_settled(&ns, "web", 3).await?;
    patch_spec(&ns, "web", json!({"replicas": 5})).await?;
    wait_settled(&ns, "web", 5).await?;
    wait_claims(
        &ns,
        &[
            "data-web-0",
            "data-web-1",
            "data-web-2",
            "data-web-3",
            "data-web-4",
        ],
    )
    .await?;
    patch_spec(&ns, "web", json!({"replicas": 2})).await?;
    wait_settled(&ns, "web", 2).await?;
    // Retain by default: all five claims are still there.
    assert_eq!(claim_names(&ns).await?.len(), 5);

    // `kubectl scale` goes through the scale subresource.
    let out = Command::new("kubectl")
        .args(["scale", "appset", "web", "--replicas=4", "-n", &ns.name])
        .output()
        .context("run kubectl (is the cluster's bin directory on PATH?)")?;
    assert!(
        out.status.success(),
        "kubectl scale failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_settled(&ns, "web", 4).await?;
    let api = ns.api::<AppSet>();
    let scale = api.get_scale("web").await?;
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(4));
    let sst = scale.status.context("scale status")?;
    assert_eq!(sst.replicas, 4);
    assert_eq!(sst.selector.as_deref(), Some("app=web"));
    // And the API's scale subresource directly.
    api.patch_scale(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 1}})),
    )
    .await?;
    wait_settled(&ns, "web", 1).await?;
    assert_eq!(claim_names(&ns).await?.len(), 5);
    ns.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_scaled_delete_removes_the_claims_of_removed_pods() -> Result<()> {
    let ns = TestNamespace::new("aps-whenscaled").await?;
    let _ctl = start(&ns);
    let extra = json!({"persistentVolumeClaimRetentionPolicy": {"whenScaled": "Delete"}});
    ns.api::<AppSet>()
        .create(&PostParams::default(), &appset("web", 4, extra)?)
        .await?;
    wait_settled(&ns, "web", 4).await?;
    patch_spec(&ns, "web", json!({"replicas": 2})).await?;
    wait_settled(&ns, "web", 2).await?;
    wait_claims(&ns, &["data-web-0", "data-web-1"]).await?;
    // Scaling up again creates fresh claims for the new pods.
    patch_spec(&ns, "web", json!({"replicas": 3})).await?;
    wait_settled(&ns, "web", 3).await?;
    wait_claims(&ns, &["data-web-0", "data-web-1", "data-web-2"]).await?;
    ns.cleanup().await;
    Ok(())
}

/// What a pod watch saw during a rollout.
#[derive(Default)]
struct Observed {
    /// name → (ready, terminating) of the pods that exist.
    pods: BTreeMap<String, (bool, bool)>,
    /// Pods of `old` revision in the order they started terminating (or vanished).
    deleted_old: Vec<String>,
    /// The most pods of the replica range unavailable at once.
    max_unavailable: usize,
    /// Pods in the order they appeared.
    created: Vec<String>,
    /// Pods that appeared while a pod of a lower ordinal was missing or not Ready.
    created_early: Vec<String>,
}

/// Watches the namespace's pods and records deletions of `old` pods and the unavailability.
fn observe(
    ns: &TestNamespace,
    replicas: usize,
    old: String,
) -> (Arc<Mutex<Observed>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Observed::default()));
    let api: Api<Pod> = ns.api();
    let out = seen.clone();
    let task = tokio::spawn(async move {
        let mut stream = watcher(api, watcher::Config::default()).boxed();
        let mut synced = false;
        while let Some(ev) = stream.next().await {
            let Ok(mut o) = out.lock() else { return };
            let (pod, gone) = match ev {
                Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => (p, false),
                Ok(watcher::Event::Delete(p)) => (p, true),
                Ok(watcher::Event::InitDone) => {
                    synced = true;
                    continue;
                }
                _ => continue,
            };
            let name = pod.name_any();
            let terminating = gone || pod.metadata.deletion_timestamp.is_some();
            let rev = revision_of(&pod);
            if synced && terminating && rev == old && !o.deleted_old.contains(&name) {
                o.deleted_old.push(name.clone());
            }
            if synced && !gone && !o.pods.contains_key(&name) {
                o.created.push(name.clone());
                if let Some((set, ordinal)) = name.rsplit_once('-')
                    && let Ok(ordinal) = ordinal.parse::<usize>()
                {
                    let lower_ready = (0..ordinal).all(|k| {
                        o.pods
                            .get(&format!("{set}-{k}"))
                            .is_some_and(|(ready, t)| *ready && !*t)
                    });
                    if !lower_ready {
                        o.created_early.push(name.clone());
                    }
                }
            }
            if gone {
                o.pods.remove(&name);
            } else {
                o.pods.insert(name.clone(), (is_ready(&pod), terminating));
            }
            if synced {
                let available = o.pods.values().filter(|(ready, t)| *ready && !*t).count();
                let unavailable = replicas.saturating_sub(available);
                o.max_unavailable = o.max_unavailable.max(unavailable);
            }
        }
    });
    (seen, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_change_rolls_highest_first_within_partition_and_max_unavailable() -> Result<()> {
    let ns = TestNamespace::new("aps-roll").await?;
    let _ctl = start(&ns);
    let extra = json!({
        "podManagementPolicy": "Parallel",
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 1, "maxUnavailable": 2}}
    });
    let api = ns.api::<AppSet>();
    api.create(&PostParams::default(), &appset("web", 5, extra)?)
        .await?;
    wait_settled(&ns, "web", 5).await?;
    let old = api
        .get("web")
        .await?
        .status
        .and_then(|s| s.update_revision)
        .unwrap_or_default();

    let (seen, watch) = observe(&ns, 5, old.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    patch_spec(
        &ns,
        "web",
        json!({"template": {"spec": {"containers": [{"name": "main", "image": "nginx:1.28",
            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}}}),
    )
    .await?;
    let pods = ns.api::<Pod>();
    let new = wait_for(
        "pods 1..4 at the new revision, web-0 at the old one",
        LONG,
        || async {
            let set = api.get("web").await?;
            let st = set.status.unwrap_or_default();
            let update = st.update_revision.unwrap_or_default();
            let list = pods.list(&ListParams::default()).await?;
            let revs: BTreeMap<String, (String, bool)> = list
                .items
                .iter()
                .map(|p| (p.name_any(), (revision_of(p), is_ready(p))))
                .collect();
            let ok = update != old
                && revs.len() == 5
                && revs.iter().all(|(n, (r, ready))| {
                    *ready
                        && if n == "web-0" {
                            *r == old
                        } else {
                            *r == update
                        }
                });
            Ok(if ok {
                Ok(update)
            } else {
                Err(format!("{revs:?}"))
            })
        },
    )
    .await?;
    // The rollout is complete for the partition: Progressing says so, currentRevision stays.
    wait_for("Progressing RolloutComplete", LONG, || async {
        let set = api.get("web").await?;
        Ok(match condition(&set, "Progressing") {
            Some((s, r)) if s == "True" && r == "RolloutComplete" => Ok(()),
            other => Err(format!("{other:?}")),
        })
    })
    .await?;
    let st = api.get("web").await?.status.unwrap_or_default();
    assert_eq!(st.current_revision.as_deref(), Some(old.as_str()));
    assert_eq!((st.updated_replicas, st.current_replicas), (4, 1));
    {
        let o = seen
            .lock()
            .map_err(|_| anyhow::anyhow!("observer poisoned"))?;
        assert_eq!(
            o.deleted_old,
            vec!["web-4", "web-3", "web-2", "web-1"],
            "highest first"
        );
        assert!(
            o.max_unavailable <= 2,
            "maxUnavailable 2 exceeded: {}",
            o.max_unavailable
        );
        assert!(o.max_unavailable >= 1);
    }
    watch.abort();

    // Lowering the partition finishes the rollout.
    patch_spec(
        &ns,
        "web",
        json!({"updateStrategy": {"rollingUpdate": {"partition": 0}}}),
    )
    .await?;
    let pods_now = wait_settled(&ns, "web", 5).await?;
    assert!(pods_now.values().all(|p| revision_of(p) == new));
    let st = api.get("web").await?.status.unwrap_or_default();
    assert_eq!(st.current_revision.as_deref(), Some(new.as_str()));
    ns.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_ready_creates_in_order_and_rolls_one_at_a_time_highest_first() -> Result<()> {
    let ns = TestNamespace::new("aps-ordered").await?;
    let _ctl = start(&ns);
    let api = ns.api::<AppSet>();
    let (creation, creation_watch) = observe(&ns, 3, String::new());
    tokio::time::sleep(Duration::from_secs(1)).await;
    api.create(&PostParams::default(), &appset("web", 3, json!({}))?)
        .await?;
    wait_settled(&ns, "web", 3).await?;
    {
        let o = creation
            .lock()
            .map_err(|_| anyhow::anyhow!("observer poisoned"))?;
        assert_eq!(
            o.created,
            vec!["web-0", "web-1", "web-2"],
            "in ordinal order"
        );
        assert!(
            o.created_early.is_empty(),
            "created before the lower pods were Ready: {:?}",
            o.created_early
        );
    }
    creation_watch.abort();
    let old = api
        .get("web")
        .await?
        .status
        .and_then(|s| s.update_revision)
        .unwrap_or_default();
    let (seen, watch) = observe(&ns, 3, old);
    tokio::time::sleep(Duration::from_secs(1)).await;
    patch_spec(
        &ns,
        "web",
        json!({"template": {"metadata": {"annotations": {"v": "2"}}}}),
    )
    .await?;
    wait_settled(&ns, "web", 3).await?;
    {
        let o = seen
            .lock()
            .map_err(|_| anyhow::anyhow!("observer poisoned"))?;
        assert_eq!(o.deleted_old, vec!["web-2", "web-1", "web-0"]);
        assert_eq!(o.max_unavailable, 1, "OrderedReady with maxUnavailable 1");
    }
    watch.abort();
    ns.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_template_followed_by_a_fixed_one_completes_without_manual_deletion() -> Result<()>
{
    let ns = TestNamespace::new("aps-broken").await?;
    let _ctl = start(&ns);
    let api = ns.api::<AppSet>();
    api.create(
        &PostParams::default(),
        &appset("web", 3, json!({"progressDeadlineSeconds": 5}))?,
    )
    .await?;
    wait_settled(&ns, "web", 3).await?;
    let good = api
        .get("web")
        .await?
        .status
        .and_then(|s| s.update_revision)
        .unwrap_or_default();

    // Broken: no node matches, so the new pod stays Pending and never becomes Ready.
    patch_spec(
        &ns,
        "web",
        json!({"template": {"spec": {"nodeSelector": {"appset.dev/no-such-node": "true"}}}}),
    )
    .await?;
    let pods = ns.api::<Pod>();
    let broken = wait_for("web-2 recreated at the broken revision", LONG, || async {
        let st = api.get("web").await?.status.unwrap_or_default();
        let update = st.update_revision.unwrap_or_default();
        let p = pods.get_opt("web-2").await?;
        Ok(match p {
            Some(p)
                if update != good
                    && revision_of(&p) == update
                    && p.metadata.deletion_timestamp.is_none() =>
            {
                Ok(update)
            }
            other => Err(format!("web-2 at {:?}", other.as_ref().map(revision_of))),
        })
    })
    .await?;
    // The rollout waits for it, as it should: web-1 and web-0 keep the good revision.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for n in ["web-0", "web-1"] {
        let p = pods.get(n).await?;
        assert_eq!(revision_of(&p), good, "{n} must wait for web-2");
        assert!(is_ready(&p));
    }
    assert!(!is_ready(&pods.get("web-2").await?));
    // The stall is reported once the progress deadline (5 s here) passes.
    wait_for(
        "Progressing False/ProgressDeadlineExceeded",
        LONG,
        || async {
            let set = api.get("web").await?;
            Ok(match condition(&set, "Progressing") {
                Some((s, r)) if s == "False" && r == "ProgressDeadlineExceeded" => Ok(()),
                other => Err(format!("{other:?}")),
            })
        },
    )
    .await?;
    let events = ns
        .api::<k8s_openapi::api::events::v1::Event>()
        .list(&ListParams::default())
        .await?;
    assert!(
        events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("ProgressDeadlineExceeded")
                && e.type_.as_deref() == Some("Warning")),
        "a Warning Event reports the stall"
    );

    // Fixed: the broken pod is replaced without anyone deleting it.
    patch_spec(&ns, "web", json!({"template": {"spec": {"nodeSelector": null}, "metadata": {"annotations": {"fixed": "yes"}}}})).await?;
    let settled = wait_settled(&ns, "web", 3).await?;
    let fixed = api
        .get("web")
        .await?
        .status
        .and_then(|s| s.update_revision)
        .unwrap_or_default();
    assert_ne!(fixed, broken);
    assert_ne!(fixed, good);
    assert!(settled.values().all(|p| revision_of(p) == fixed));
    ns.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_storage_expands_the_claims() -> Result<()> {
    let ns = TestNamespace::new("aps-expand").await?;
    let _ctl = start(&ns);
    let api = ns.api::<AppSet>();
    api.create(
        &PostParams::default(),
        &appset("web", 2, json!({"podManagementPolicy": "Parallel"}))?,
    )
    .await?;
    wait_settled(&ns, "web", 2).await?;
    let claims = ns.api::<PersistentVolumeClaim>();
    wait_for("claims Bound", LONG, || async {
        let list = claims.list(&ListParams::default()).await?;
        let bound = list
            .items
            .iter()
            .filter(|c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
            .count();
        Ok(if bound == 2 {
            Ok(())
        } else {
            Err(format!("{bound} bound"))
        })
    })
    .await?;
    let uids: BTreeMap<String, String> = claims
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|c| (c.name_any(), c.uid().unwrap_or_default()))
        .collect();
    patch_spec(
        &ns,
        "web",
        json!({"volumeClaimTemplates": [{"metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}}}]}),
    )
    .await?;
    wait_for("both claims requesting 2Gi", LONG, || async {
        let list = claims.list(&ListParams::default()).await?;
        let reqs: BTreeMap<String, String> = list
            .items
            .iter()
            .map(|c| {
                let q = c
                    .spec
                    .as_ref()
                    .and_then(|s| s.resources.as_ref())
                    .and_then(|r| r.requests.as_ref())
                    .and_then(|r| r.get("storage"))
                    .map(|q| q.0.clone())
                    .unwrap_or_default();
                (c.name_any(), q)
            })
            .collect();
        Ok(if reqs.len() == 2 && reqs.values().all(|q| q == "2Gi") {
            Ok(())
        } else {
            Err(format!("{reqs:?}"))
        })
    })
    .await?;
    // The same claims, expanded in place; pods were not touched.
    let after: BTreeMap<String, String> = claims
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|c| (c.name_any(), c.uid().unwrap_or_default()))
        .collect();
    assert_eq!(after, uids);
    let st = api.get("web").await?.status.unwrap_or_default();
    assert_eq!(
        st.volume_claim_templates[0].requested_storage.as_deref(),
        Some("2Gi")
    );
    ns.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_class_without_expansion_is_reported_not_looped_on() -> Result<()> {
    let ns = TestNamespace::new("aps-noexpand").await?;
    let class = format!("{}-fixed", ns.name);
    let classes: Api<StorageClass> = Api::all(ns.client.clone());
    let sc: StorageClass = serde_json::from_value(json!({
        "metadata": {"name": class, "labels": {"appset.dev/e2e": "true"}},
        "provisioner": "kubernetes.io/host-path",
        "allowVolumeExpansion": false
    }))?;
    classes.create(&PostParams::default(), &sc).await?;
    let _ctl = start(&ns);
    let api = ns.api::<AppSet>();
    let vct = |size: &str| {
        json!({"volumeClaimTemplates": [{"metadata": {"name": "data"},
            "spec": {"storageClassName": class, "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}}]})
    };
    api.create(&PostParams::default(), &appset("web", 1, vct("1Gi"))?)
        .await?;
    wait_settled(&ns, "web", 1).await?;
    patch_spec(&ns, "web", vct("2Gi")).await?;
    wait_for("VolumeClaimsInSync False/Unsupported", LONG, || async {
        let set = api.get("web").await?;
        Ok(match condition(&set, "VolumeClaimsInSync") {
            Some((s, r)) if s == "False" && r == "Unsupported" => Ok(()),
            other => Err(format!("{other:?}")),
        })
    })
    .await?;
    let c = ns.api::<PersistentVolumeClaim>().get("data-web-0").await?;
    let req = c
        .spec
        .and_then(|s| s.resources)
        .and_then(|r| r.requests)
        .and_then(|r| r.get("storage").cloned());
    assert_eq!(req.map(|q| q.0).as_deref(), Some("1Gi"), "not patched");
    // The pods keep running; nothing else broke.
    wait_settled(&ns, "web", 1).await?;
    let events = ns
        .api::<k8s_openapi::api::events::v1::Event>()
        .list(&ListParams::default())
        .await?;
    let reported = events
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("VolumeClaimTemplateNotApplied"))
        .count();
    assert!(reported >= 1, "a Warning Event explains it");
    classes.delete(&class, &DeleteParams::default()).await?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_appset_honours_when_deleted() -> Result<()> {
    let ns = TestNamespace::new("aps-delete").await?;
    let _ctl = start(&ns);
    let api = ns.api::<AppSet>();
    api.create(
        &PostParams::default(),
        &appset("keep", 2, json!({"podManagementPolicy": "Parallel"}))?,
    )
    .await?;
    api.create(
        &PostParams::default(),
        &appset(
            "drop",
            2,
            json!({"podManagementPolicy": "Parallel",
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Delete"}}),
        )?,
    )
    .await?;
    wait_settled(&ns, "keep", 2).await?;
    wait_settled(&ns, "drop", 2).await?;
    wait_claims(
        &ns,
        &["data-drop-0", "data-drop-1", "data-keep-0", "data-keep-1"],
    )
    .await?;
    // The claims of `drop` are owned by it before it goes.
    wait_for("drop's claims owned by the AppSet", LONG, || async {
        let c = ns.api::<PersistentVolumeClaim>().get("data-drop-1").await?;
        Ok(if c.owner_references().iter().any(|r| r.kind == "AppSet") {
            Ok(())
        } else {
            Err(format!("{:?}", c.owner_references()))
        })
    })
    .await?;
    api.delete("keep", &DeleteParams::background()).await?;
    api.delete("drop", &DeleteParams::background()).await?;
    let pods = ns.api::<Pod>();
    wait_for("every pod gone", LONG, || async {
        let n = pods.list(&ListParams::default()).await?.items.len();
        Ok(if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} pods"))
        })
    })
    .await?;
    wait_claims(&ns, &["data-keep-0", "data-keep-1"]).await?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statefulsets_claims_are_adopted_by_an_appset_of_the_same_name() -> Result<()> {
    let ns = TestNamespace::new("aps-adopt").await?;
    let sts: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "db"},
        "spec": {
            "replicas": 2,
            "serviceName": "db",
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": "db"}},
            "template": {
                "metadata": {"labels": {"app": "db"}},
                "spec": {"containers": [{"name": "main", "image": "postgres:17",
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
            }]
        }
    }))?;
    let stss = ns.api::<StatefulSet>();
    stss.create(&PostParams::default(), &sts).await?;
    let claims = ns.api::<PersistentVolumeClaim>();
    let uids = wait_for("the StatefulSet's claims Bound", LONG, || async {
        let list = claims.list(&ListParams::default()).await?;
        let bound: BTreeMap<String, String> = list
            .items
            .iter()
            .filter(|c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
            .map(|c| (c.name_any(), c.uid().unwrap_or_default()))
            .collect();
        Ok(if bound.len() == 2 {
            Ok(bound)
        } else {
            Err(format!("{bound:?}"))
        })
    })
    .await?;
    stss.delete("db", &DeleteParams::foreground()).await?;
    let pods = ns.api::<Pod>();
    wait_for("the StatefulSet and its pods gone", LONG, || async {
        let n = pods.list(&ListParams::default()).await?.items.len();
        let s = stss.get_opt("db").await?.is_some();
        Ok(if n == 0 && !s {
            Ok(())
        } else {
            Err(format!("{n} pods, statefulset present: {s}"))
        })
    })
    .await?;

    let _ctl = start(&ns);
    let mut set = appset("db", 2, json!({"podManagementPolicy": "Parallel"}))?;
    set.spec
        .template
        .spec
        .as_mut()
        .context("pod spec")?
        .containers[0]
        .image = Some("postgres:17".into());
    ns.api::<AppSet>()
        .create(&PostParams::default(), &set)
        .await?;
    let settled = wait_settled(&ns, "db", 2).await?;
    let after: BTreeMap<String, String> = claims
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|c| (c.name_any(), c.uid().unwrap_or_default()))
        .collect();
    assert_eq!(after, uids, "the same claims, not new ones");
    for (o, pod) in settled.values().enumerate() {
        let claim = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .and_then(|v| v.iter().find(|v| v.name == "data"))
            .and_then(|v| v.persistent_volume_claim.as_ref())
            .map(|c| c.claim_name.clone());
        assert_eq!(claim, Some(format!("data-db-{o}")));
    }
    for name in uids.keys() {
        let c = claims.get(name).await?;
        assert_eq!(
            c.labels().get(keys::APPSET_NAME_LABEL).map(String::as_str),
            Some("db")
        );
    }
    ns.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_map_change_rolls_a_config_aware_appset() -> Result<()> {
    let ns = TestNamespace::new("aps-config").await?;
    let cms = ns.api::<ConfigMap>();
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "settings"},
        "data": {"mode": "one"}
    }))?;
    cms.create(&PostParams::default(), &cm).await?;
    let _ctl = start(&ns);
    let api = ns.api::<AppSet>();
    let extra = json!({"podManagementPolicy": "Parallel", "template": {"spec": {"containers": [{
        "name": "main", "image": "nginx:1.27",
        "envFrom": [{"configMapRef": {"name": "settings"}}],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}}});
    api.create(&PostParams::default(), &appset("web", 2, extra)?)
        .await?;
    let before = wait_settled(&ns, "web", 2).await?;
    let st = api.get("web").await?.status.unwrap_or_default();
    let first_hash = st.config_hash.clone().context("configHash in the status")?;
    let first_rev = st.update_revision.clone().unwrap_or_default();
    for p in before.values() {
        assert_eq!(p.annotations().get(keys::CONFIG_HASH), Some(&first_hash));
    }
    assert!(!first_hash.contains("one"), "the hash reveals nothing");

    cms.patch(
        "settings",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"mode": "two"}})),
    )
    .await?;
    wait_for("a new update revision", LONG, || async {
        let st = api.get("web").await?.status.unwrap_or_default();
        Ok(
            if st.update_revision.as_deref() != Some(first_rev.as_str()) {
                Ok(())
            } else {
                Err("same revision".to_string())
            },
        )
    })
    .await?;
    let after = wait_settled(&ns, "web", 2).await?;
    let st = api.get("web").await?.status.unwrap_or_default();
    let second_hash = st.config_hash.clone().unwrap_or_default();
    assert_ne!(second_hash, first_hash);
    for (name, p) in &after {
        assert_ne!(
            p.uid(),
            before.get(name).and_then(|b| b.uid()),
            "{name} was replaced"
        );
        assert_eq!(p.annotations().get(keys::CONFIG_HASH), Some(&second_hash));
    }
    // Rolling back the data rolls back to the first revision, reused.
    cms.patch(
        "settings",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"mode": "one"}})),
    )
    .await?;
    let back = wait_for("the first revision again", LONG, || async {
        let st = api.get("web").await?.status.unwrap_or_default();
        Ok(
            if st.update_revision.as_deref() == Some(first_rev.as_str()) {
                Ok(())
            } else {
                Err(format!("{:?}", st.update_revision))
            },
        )
    })
    .await;
    if let Err(err) = back {
        bail!("rollback did not reuse the first revision: {err:#}");
    }
    wait_settled(&ns, "web", 2).await?;
    let revs = ns
        .api::<ControllerRevision>()
        .list(&ListParams::default())
        .await?;
    assert_eq!(
        revs.items.len(),
        2,
        "the old revision was reused, not duplicated"
    );
    ns.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_reuses_the_old_revision_and_history_is_pruned() -> Result<()> {
    let ns = TestNamespace::new("aps-history").await?;
    let _ctl = start(&ns);
    let api = ns.api::<AppSet>();
    api.create(
        &PostParams::default(),
        &appset(
            "web",
            2,
            json!({"podManagementPolicy": "Parallel", "revisionHistoryLimit": 1}),
        )?,
    )
    .await?;
    wait_settled(&ns, "web", 2).await?;
    let revision = || async {
        Ok::<_, anyhow::Error>(
            api.get("web")
                .await?
                .status
                .and_then(|s| s.update_revision)
                .unwrap_or_default(),
        )
    };
    let first = revision().await?;
    let annotate = |v: &str| json!({"template": {"metadata": {"annotations": {"v": v}}}});
    patch_spec(&ns, "web", annotate("2")).await?;
    wait_settled(&ns, "web", 2).await?;
    let second = revision().await?;
    assert_ne!(second, first);
    // Back to the first template: the first revision is reused, with a higher number.
    patch_spec(
        &ns,
        "web",
        json!({"template": {"metadata": {"annotations": null}}}),
    )
    .await?;
    wait_settled(&ns, "web", 2).await?;
    assert_eq!(revision().await?, first);
    let revs = ns.api::<ControllerRevision>();
    let numbers: BTreeMap<String, i64> = revs
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|r| (r.name_any(), r.revision.unwrap_or_default()))
        .collect();
    assert!(
        numbers.get(&first) > numbers.get(&second),
        "rollback renumbers: {numbers:?}"
    );
    // Two more templates: with revisionHistoryLimit 1, only the live revision and one more stay.
    patch_spec(&ns, "web", annotate("3")).await?;
    wait_settled(&ns, "web", 2).await?;
    patch_spec(&ns, "web", annotate("4")).await?;
    wait_settled(&ns, "web", 2).await?;
    let live = revision().await?;
    wait_for("history pruned to the limit", LONG, || async {
        let names: BTreeSet<String> = revs
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .map(|r| r.name_any())
            .collect();
        Ok(if names.len() == 2 && names.contains(&live) {
            Ok(())
        } else {
            Err(format!("{names:?}"))
        })
    })
    .await?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_statefulset_pods_are_adopted_then_rolled() -> Result<()> {
    let ns = TestNamespace::new("aps-orphan").await?;
    let sts: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "db"},
        "spec": {
            "replicas": 2,
            "serviceName": "db",
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": "db"}},
            "template": {
                "metadata": {"labels": {"app": "db"}},
                "spec": {"containers": [{"name": "main", "image": "postgres:17",
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
            }]
        }
    }))?;
    let stss = ns.api::<StatefulSet>();
    stss.create(&PostParams::default(), &sts).await?;
    let pods = ns.api::<Pod>();
    wait_for("the StatefulSet's 2 pods Ready", LONG, || async {
        let list = pods.list(&ListParams::default()).await?;
        let ready = list.items.iter().filter(|p| is_ready(p)).count();
        Ok(if ready == 2 {
            Ok(())
        } else {
            Err(format!("{ready} ready"))
        })
    })
    .await?;
    // `kubectl delete statefulset db --cascade=orphan`.
    stss.delete(
        "db",
        &DeleteParams {
            propagation_policy: Some(kube::api::PropagationPolicy::Orphan),
            ..Default::default()
        },
    )
    .await?;
    wait_for("orphaned pods", LONG, || async {
        let list = pods.list(&ListParams::default()).await?;
        let orphans = list
            .items
            .iter()
            .filter(|p| p.owner_references().is_empty())
            .count();
        let gone = stss.get_opt("db").await?.is_none();
        Ok(if orphans == 2 && gone {
            Ok(())
        } else {
            Err(format!("{orphans} orphans, statefulset gone: {gone}"))
        })
    })
    .await?;

    let _ctl = start(&ns);
    let mut set = appset("db", 2, json!({"podManagementPolicy": "Parallel"}))?;
    set.spec
        .template
        .spec
        .as_mut()
        .context("pod spec")?
        .containers[0]
        .image = Some("postgres:17".into());
    ns.api::<AppSet>()
        .create(&PostParams::default(), &set)
        .await?;
    let settled = wait_settled(&ns, "db", 2).await?;
    assert!(
        settled
            .values()
            .all(|p| p.owner_references().iter().any(|r| r.kind == "AppSet"))
    );
    let events = ns
        .api::<k8s_openapi::api::events::v1::Event>()
        .list(&ListParams::default())
        .await?;
    let adopted = events
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("AdoptedPod"))
        .map(|e| e.series.as_ref().map_or(1, |s| s.count))
        .sum::<i32>();
    assert_eq!(adopted, 2, "both orphans were adopted before being rolled");
    ns.cleanup().await;
    Ok(())
}
