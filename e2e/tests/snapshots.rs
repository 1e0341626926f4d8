//! Config snapshots end to end: a Deployment in `appset.dev/config-rollout: snapshot` mode, the
//! config rollout controller and the webhook (with its `/pin-config` entry) in-process, on the
//! real control plane. The Deployment's own controller makes the ReplicaSets and pods; the tests
//! read which copy each pod references.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use appset_crds::keys;
use appset_e2e::fixtures::{config_map, create, merge_patch, secret};
use appset_e2e::runners::{ConfigRollout, Webhook, WebhookOptions};
use appset_e2e::{TestNamespace, wait_for};
use appset_operator::config::controller::Settings;
use appset_operator::config::rollout::Policy;
use appset_webhook::tls::material::Policy as TlsPolicy;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(90);

/// The controller with snapshots on and short pacing; the webhook with its pin entry.
async fn start(ns: &TestNamespace) -> Result<(ConfigRollout, Webhook)> {
    let settings = Settings {
        snapshots: true,
        policy: Policy {
            window: Duration::from_secs(1),
            min_interval: Duration::from_secs(2),
        },
        ..ConfigRollout::settings(ns)
    };
    let webhook = Webhook::start_with(
        ns,
        TlsPolicy::default(),
        Duration::from_secs(30),
        WebhookOptions {
            pin_config: true,
            ..Default::default()
        },
    )
    .await?;
    let rollout = ConfigRollout::start(ns, settings).await?;
    Ok((rollout, webhook))
}

/// A Deployment of 4 reading `app-config` through `envFrom` and a volume, rolled one pod at a
/// time with each new pod counted only after 2 s, so that a rollout can be watched.
fn web(history: i32) -> serde_json::Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "annotations": {keys::CONFIG_ROLLOUT: keys::CONFIG_ROLLOUT_SNAPSHOT}},
        "spec": {
            "replicas": 4,
            "revisionHistoryLimit": history,
            "minReadySeconds": 2,
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}},
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "containers": [{
                        "name": "web", "image": "nginx:1.27",
                        "envFrom": [{"configMapRef": {"name": "app-config"}}],
                        "volumeMounts": [{"name": "config", "mountPath": "/etc/app"}]
                    }],
                    "volumes": [{"name": "config", "configMap": {"name": "app-config"}}]
                }
            }
        }
    })
}

/// The pins of a template or pod annotation map.
fn pins(annotations: Option<&BTreeMap<String, String>>) -> Option<BTreeMap<String, String>> {
    serde_json::from_str(annotations?.get(keys::CONFIG_SNAPSHOTS)?).ok()
}

/// The ConfigMap names a pod reads through `envFrom` and volumes; they must all be one name.
fn config_read(pod: &Pod) -> Result<String> {
    let spec = pod.spec.clone().unwrap_or_default();
    let mut names = BTreeSet::new();
    for c in &spec.containers {
        for e in c.env_from.iter().flatten() {
            names.extend(e.config_map_ref.as_ref().map(|r| r.name.clone()));
        }
    }
    for v in spec.volumes.iter().flatten() {
        names.extend(v.config_map.as_ref().map(|c| c.name.clone()));
    }
    ensure!(
        names.len() == 1,
        "pod {} reads {names:?}, not one ConfigMap",
        pod.name_any()
    );
    names.pop_first().context("no ConfigMap")
}

/// The current template's pin for `configmap/app-config`, once it differs from `not`.
async fn wait_pin(deploys: &Api<Deployment>, not: Option<&str>) -> Result<String> {
    wait_for("the template to be pinned", DEADLINE, || async {
        let d = deploys.get("web").await?;
        let pin = pins(
            d.spec
                .template
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.as_ref()),
        )
        .and_then(|p| p.get("configmap/app-config").cloned());
        Ok(match pin {
            Some(p) if Some(p.as_str()) != not => Ok(p),
            other => Err(format!("pin {other:?}")),
        })
    })
    .await
}

/// The pods of the Deployment by the `pod-template-hash` of their ReplicaSet, with the copy
/// each reads.
async fn pods_by_revision(ns: &TestNamespace) -> Result<BTreeMap<String, Vec<(String, String)>>> {
    let mut out: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for pod in ns
        .api::<Pod>()
        .list(&ListParams::default().labels("app=web"))
        .await?
    {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let hash = pod
            .labels()
            .get("pod-template-hash")
            .cloned()
            .unwrap_or_default();
        out.entry(hash)
            .or_default()
            .push((pod.name_any(), config_read(&pod)?));
    }
    Ok(out)
}

/// The ReplicaSet `pod-template-hash` whose template pins `copy`.
async fn revision_of(ns: &TestNamespace, copy: &str) -> Result<String> {
    for rs in ns.api::<ReplicaSet>().list(&ListParams::default()).await? {
        let pinned = pins(
            rs.spec
                .template
                .as_ref()
                .and_then(|t| t.metadata.as_ref())
                .and_then(|m| m.annotations.as_ref()),
        );
        if pinned.is_some_and(|p| p.values().any(|v| v == copy)) {
            return rs
                .labels()
                .get("pod-template-hash")
                .cloned()
                .context("ReplicaSet without pod-template-hash");
        }
    }
    anyhow::bail!("no ReplicaSet pins {copy}")
}

/// Waits until all 4 pods are of one revision and read `copy`.
async fn wait_settled(ns: &TestNamespace, copy: &str) -> Result<()> {
    wait_for(&format!("4 pods reading {copy}"), DEADLINE, || async {
        let by = pods_by_revision(ns).await?;
        let all: Vec<&(String, String)> = by.values().flatten().collect();
        Ok(if all.len() == 4 && all.iter().all(|(_, c)| c == copy) {
            Ok(())
        } else {
            Err(format!("{by:?}"))
        })
    })
    .await
}

/// Watches a rollout from `old` to `new`: every pod of the old revision reads `old`, every pod
/// of the new one reads `new`, at every look; mid-way one old pod is deleted and its
/// replacement must read `old`. Returns how many looks saw both revisions at once.
async fn watch_rollout(ns: &TestNamespace, old: &str, new: &str) -> Result<usize> {
    let old_rev = revision_of(ns, old).await?;
    let new_rev = wait_for("the new ReplicaSet", DEADLINE, || async {
        Ok(revision_of(ns, new).await.map_err(|e| e.to_string()))
    })
    .await?;
    let pods = ns.api::<Pod>();
    let mut mixed = 0;
    let mut deleted: Option<String> = None;
    let mut replacement_checked = false;
    let start = std::time::Instant::now();
    loop {
        ensure!(start.elapsed() < DEADLINE, "the rollout did not finish");
        let by = pods_by_revision(ns).await?;
        for (rev, list) in &by {
            let want = if *rev == old_rev {
                old
            } else if *rev == new_rev {
                new
            } else {
                anyhow::bail!("pods of an unexpected revision {rev}: {by:?}")
            };
            for (pod, copy) in list {
                ensure!(
                    copy == want,
                    "pod {pod} of revision {rev} reads {copy}, not {want}"
                );
            }
        }
        let olds = by.get(&old_rev).cloned().unwrap_or_default();
        let news = by.get(&new_rev).map_or(0, Vec::len);
        if !olds.is_empty() && news > 0 {
            mixed += 1;
            match &deleted {
                None => {
                    let (victim, _) = olds[0].clone();
                    pods.delete(&victim, &DeleteParams::default()).await?;
                    deleted = Some(victim);
                }
                Some(victim) => {
                    // A replacement made by the old ReplicaSet reads the old copy (checked
                    // above for every old pod); note that one was seen.
                    if olds.iter().any(|(p, _)| p != victim) {
                        replacement_checked = true;
                    }
                }
            }
        }
        if olds.is_empty() && news == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    ensure!(mixed > 0, "never saw both revisions at once");
    ensure!(
        deleted.is_some() && replacement_checked,
        "no old pod was deleted and replaced mid-rollout"
    );
    Ok(mixed)
}

async fn copy_data(ns: &TestNamespace, copy: &str) -> Result<ConfigMap> {
    ns.api::<ConfigMap>()
        .get(copy)
        .await
        .with_context(|| format!("snapshot {copy}"))
}

#[tokio::test]
async fn a_deployment_in_snapshot_mode_keeps_each_revision_on_its_own_config() -> Result<()> {
    let ns = TestNamespace::new("snap-deploy").await?;
    let (rollout, webhook) = start(&ns).await?;
    let result = async {
        let cms = ns.api::<ConfigMap>();
        let deploys = ns.api::<Deployment>();
        create(&cms, config_map("app-config", json!({"greeting": "v1"}))).await?;
        create(&deploys, web(1)).await?;
        let a = wait_pin(&deploys, None).await?;
        wait_settled(&ns, &a).await?;
        let snap_a = copy_data(&ns, &a).await?;
        ensure!(
            snap_a.immutable == Some(true),
            "snapshot {a} is not immutable"
        );
        ensure!(
            snap_a
                .data
                .as_ref()
                .and_then(|d| d.get("greeting"))
                .map(String::as_str)
                == Some("v1"),
            "snapshot {a} holds {:?}",
            snap_a.data
        );

        // v2: during the rollout old pods read A, new ones B, and a replaced old pod reads A.
        merge_patch(&cms, "app-config", json!({"data": {"greeting": "v2"}})).await?;
        let b = wait_pin(&deploys, Some(&a)).await?;
        let mixed = watch_rollout(&ns, &a, &b).await?;
        println!("rollout A→B: {mixed} looks saw both revisions, each reading its own copy");
        ensure!(
            copy_data(&ns, &b)
                .await?
                .data
                .and_then(|d| d.get("greeting").cloned())
                .as_deref()
                == Some("v2"),
            "snapshot {b} does not hold v2"
        );

        // Rollback as `kubectl rollout undo` does: the old ReplicaSet's template goes back into
        // the Deployment, pins included; the pods read A again, with v1 in it.
        let rs_a = ns
            .api::<ReplicaSet>()
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .find(|rs| {
                pins(
                    rs.spec
                        .template
                        .as_ref()
                        .and_then(|t| t.metadata.as_ref())
                        .and_then(|m| m.annotations.as_ref()),
                )
                .is_some_and(|p| p.values().any(|v| *v == a))
            })
            .context("the ReplicaSet of A")?;
        let mut template = rs_a.spec.template.clone().context("template")?;
        if let Some(labels) = template.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
            labels.remove("pod-template-hash");
        }
        deploys
            .patch(
                "web",
                &PatchParams::default(),
                &Patch::Strategic(json!({"spec": {"template": template}})),
            )
            .await?;
        wait_settled(&ns, &a).await?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        ensure!(
            wait_pin(&deploys, None).await? == a,
            "the operator moved the rolled-back template off A"
        );
        ensure!(
            copy_data(&ns, &a)
                .await?
                .data
                .and_then(|d| d.get("greeting").cloned())
                .as_deref()
                == Some("v1"),
            "snapshot A no longer holds v1"
        );

        // v3: with revisionHistoryLimit 1 the ReplicaSet of B is pruned, and B with it; A (the
        // kept old revision) and C stay.
        merge_patch(&cms, "app-config", json!({"data": {"greeting": "v3"}})).await?;
        let c = wait_pin(&deploys, Some(&a)).await?;
        wait_settled(&ns, &c).await?;
        wait_for("snapshot B to be collected", DEADLINE, || async {
            Ok(match cms.get_opt(&b).await? {
                None => Ok(()),
                Some(cm) => Err(format!("B still owned by {:?}", cm.owner_references())),
            })
        })
        .await?;
        for kept in [&a, &c] {
            let cm = copy_data(&ns, kept).await?;
            ensure!(
                cm.owner_references().iter().all(|o| o.kind == "ReplicaSet")
                    && !cm.owner_references().is_empty(),
                "snapshot {kept} is owned by {:?}, not by its ReplicaSet alone",
                cm.owner_references()
            );
        }
        let snapshots: Vec<String> = cms
            .list(&ListParams::default().labels(&format!("{}=true", keys::SNAPSHOT_LABEL)))
            .await?
            .items
            .iter()
            .map(|c| c.name_any())
            .collect();
        let mut want = vec![a.clone(), c.clone()];
        want.sort();
        let mut got = snapshots.clone();
        got.sort();
        ensure!(got == want, "snapshots left {got:?}, expected {want:?}");
        Ok::<_, anyhow::Error>(())
    }
    .await;
    rollout.stop().await?;
    webhook.stop().await?;
    result?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_secret_snapshot_is_immutable_of_the_same_type_and_its_value_stays_inside() -> Result<()>
{
    const CANARY: &str = "canary-7d1f0c9e5b";
    let ns = TestNamespace::new("snap-secret").await?;
    let (rollout, webhook) = start(&ns).await?;
    let result = async {
        let mut s = secret("db", json!({"username": "app", "password": CANARY}));
        s["type"] = json!("kubernetes.io/basic-auth");
        create(&ns.api::<Secret>(), s).await?;
        create(
            &ns.api::<Deployment>(),
            appset_e2e::fixtures::secret_reader(),
        )
        .await?;
        let pods = ns.api::<Pod>();
        let copy = wait_for("a pod reading the snapshot", DEADLINE, || async {
            let read = appset_e2e::fixtures::secrets_read(&pods).await?;
            Ok(match read.as_slice() {
                [n] if n != "db" => Ok(n.clone()),
                other => Err(format!("reads {other:?}")),
            })
        })
        .await?;
        let snap = ns.api::<Secret>().get(&copy).await?;
        ensure!(
            snap.immutable == Some(true),
            "the snapshot is not immutable"
        );
        ensure!(
            snap.type_.as_deref() == Some("kubernetes.io/basic-auth"),
            "the snapshot's type is {:?}",
            snap.type_
        );
        let data = snap.data.clone().unwrap_or_default();
        ensure!(
            data.get("password").map(|b| b.0.as_slice()) == Some(CANARY.as_bytes()),
            "the snapshot does not hold the password"
        );
        ensure!(
            !data.contains_key("username"),
            "a key the pod does not read was copied"
        );
        // The value appears nowhere but in the two Secrets: not in names, annotations, labels
        // or Events.
        let mut seen = Vec::new();
        let events = ns
            .api::<k8s_openapi::api::core::v1::Event>()
            .list(&ListParams::default())
            .await?;
        seen.extend(
            events
                .items
                .iter()
                .map(|e| serde_json::to_string(e).unwrap_or_default()),
        );
        let deploy = ns.api::<Deployment>().get("api").await?;
        seen.push(serde_json::to_string(&deploy)?);
        for pod in ns.api::<Pod>().list(&ListParams::default()).await? {
            seen.push(serde_json::to_string(&pod)?);
        }
        seen.push(serde_json::to_string(&snap.metadata)?);
        for text in &seen {
            ensure!(!text.contains(CANARY), "the Secret's value leaked: {text}");
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    rollout.stop().await?;
    webhook.stop().await?;
    result?;
    ns.cleanup().await;
    Ok(())
}

/// The copy each live pod of `app` reads, by its `controller-revision-hash`.
async fn stateful_pods(ns: &TestNamespace, app: &str) -> Result<BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let list = ListParams::default().labels(&format!("app={app}"));
    for pod in ns.api::<Pod>().list(&list).await? {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let rev = pod
            .labels()
            .get("controller-revision-hash")
            .cloned()
            .unwrap_or_default();
        out.entry(rev).or_default().push(config_read(&pod)?);
    }
    Ok(out)
}

#[tokio::test]
async fn a_statefulset_in_snapshot_mode_pins_each_revision_and_rolls_back_with_its_config()
-> Result<()> {
    use k8s_openapi::api::apps::v1::{ControllerRevision, StatefulSet};
    let ns = TestNamespace::new("snap-sts").await?;
    let (rollout, webhook) = start(&ns).await?;
    let result = async {
        let cms = ns.api::<ConfigMap>();
        let sets = ns.api::<StatefulSet>();
        create(&cms, config_map("app-config", json!({"greeting": "v1"}))).await?;
        let mut manifest = web(1);
        manifest["kind"] = json!("StatefulSet");
        manifest["metadata"]["name"] = json!("db");
        let spec = manifest["spec"].as_object_mut().context("spec")?;
        spec.remove("strategy");
        spec.remove("minReadySeconds");
        spec.insert("replicas".into(), json!(3));
        spec.insert("serviceName".into(), json!("db"));
        spec.insert("selector".into(), json!({"matchLabels": {"app": "db"}}));
        spec.insert("podManagementPolicy".into(), json!("Parallel"));
        manifest["spec"]["template"]["metadata"]["labels"] = json!({"app": "db"});
        create(&sets, manifest).await?;
        let pin_of = |s: &StatefulSet| {
            pins(
                s.spec
                    .template
                    .metadata
                    .as_ref()
                    .and_then(|m| m.annotations.as_ref()),
            )
            .and_then(|p| p.get("configmap/app-config").cloned())
        };
        let settled = |copy: String| {
            let ns = &ns;
            async move {
                wait_for(&format!("3 pods reading {copy}"), DEADLINE, || async {
                    let by = stateful_pods(ns, "db").await?;
                    let all: Vec<&String> = by.values().flatten().collect();
                    Ok(if all.len() == 3 && all.iter().all(|c| **c == copy) {
                        Ok(())
                    } else {
                        Err(format!("{by:?}"))
                    })
                })
                .await
            }
        };
        let a = wait_for("the StatefulSet to be pinned", DEADLINE, || async {
            Ok(pin_of(&sets.get("db").await?).ok_or_else(|| "no pin".to_string()))
        })
        .await?;
        settled(a.clone()).await?;
        merge_patch(&cms, "app-config", json!({"data": {"greeting": "v2"}})).await?;
        let b = wait_for("a new pin", DEADLINE, || async {
            Ok(match pin_of(&sets.get("db").await?) {
                Some(p) if p != a => Ok(p),
                other => Err(format!("{other:?}")),
            })
        })
        .await?;
        // Every look during the update: a pod reads the copy of its own revision.
        let revisions = ns.api::<ControllerRevision>();
        let start = std::time::Instant::now();
        loop {
            ensure!(start.elapsed() < DEADLINE, "the update did not finish");
            let by = stateful_pods(&ns, "db").await?;
            for (rev, copies) in &by {
                let cr = revisions
                    .list(&ListParams::default())
                    .await?
                    .items
                    .into_iter()
                    .find(|c| c.name_any().ends_with(rev.as_str()))
                    .with_context(|| format!("the ControllerRevision of {rev}"))?;
                let want = appset_operator::config::snapshot::revision_pins(&cr)
                    .and_then(|p| serde_json::from_str::<BTreeMap<String, String>>(&p).ok())
                    .and_then(|p| p.get("configmap/app-config").cloned())
                    .unwrap_or_else(|| "app-config".into());
                for c in copies {
                    ensure!(*c == want, "a pod of revision {rev} reads {c}, not {want}");
                }
            }
            let all: Vec<&String> = by.values().flatten().collect();
            if all.len() == 3 && all.iter().all(|c| **c == b) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // Each copy is owned by the ControllerRevision that names it.
        for copy in [&a, &b] {
            let cm = copy_data(&ns, copy).await?;
            let owners = cm.owner_references();
            ensure!(
                !owners.is_empty() && owners.iter().all(|o| o.kind == "ControllerRevision"),
                "snapshot {copy} is owned by {owners:?}"
            );
        }
        // Rollback by re-applying the old template: the pods read A, still holding v1.
        let old = revisions
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .find(|c| {
                appset_operator::config::snapshot::revision_pins(c).is_some_and(|p| p.contains(&a))
            })
            .context("the revision of A")?;
        let template = old
            .data
            .0
            .pointer("/spec/template")
            .cloned()
            .context("template")?;
        let mut template = template;
        if let Some(t) = template.as_object_mut() {
            t.remove("$patch");
        }
        sets.patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": template}})),
        )
        .await?;
        settled(a.clone()).await?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        ensure!(
            pin_of(&sets.get("db").await?).as_deref() == Some(a.as_str()),
            "the operator moved the rolled-back StatefulSet off A"
        );
        ensure!(
            copy_data(&ns, &a)
                .await?
                .data
                .and_then(|d| d.get("greeting").cloned())
                .as_deref()
                == Some("v1"),
            "snapshot A no longer holds v1"
        );
        // v3 with revisionHistoryLimit 1: the StatefulSet keeps A's revision (the newest old
        // one, after the rollback) and prunes B's, and the garbage collector takes B with it.
        merge_patch(&cms, "app-config", json!({"data": {"greeting": "v3"}})).await?;
        let c = wait_for("a third pin", DEADLINE, || async {
            Ok(match pin_of(&sets.get("db").await?) {
                Some(p) if p != a && p != b => Ok(p),
                other => Err(format!("{other:?}")),
            })
        })
        .await?;
        settled(c.clone()).await?;
        wait_for("snapshot B to be collected", DEADLINE, || async {
            Ok(match cms.get_opt(&b).await? {
                None => Ok(()),
                Some(cm) => Err(format!("B still owned by {:?}", cm.owner_references())),
            })
        })
        .await?;
        for kept in [&a, &c] {
            copy_data(&ns, kept).await?;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    rollout.stop().await?;
    webhook.stop().await?;
    result?;
    ns.cleanup().await;
    Ok(())
}

/// The ReplicaSets of `web`, newest last by revision.
async fn web_replica_sets(ns: &TestNamespace) -> Result<Vec<ReplicaSet>> {
    let mut list: Vec<ReplicaSet> = ns
        .api::<ReplicaSet>()
        .list(&ListParams::default().labels("app=web"))
        .await?
        .items;
    list.sort_by_key(|rs| {
        rs.annotations()
            .get("deployment.kubernetes.io/revision")
            .and_then(|r| r.parse::<u64>().ok())
            .unwrap_or(0)
    });
    Ok(list)
}

#[tokio::test]
async fn switching_snapshot_mode_on_and_off_rolls_once_each_and_a_deleted_snapshot_comes_back()
-> Result<()> {
    let ns = TestNamespace::new("snap-switch").await?;
    let (rollout, webhook) = start(&ns).await?;
    let result = async {
        let cms = ns.api::<ConfigMap>();
        let deploys = ns.api::<Deployment>();
        create(&cms, config_map("app-config", json!({"greeting": "v1"}))).await?;
        let mut manifest = web(5);
        manifest["metadata"]["annotations"] = json!({keys::CONFIG_ROLLOUT: keys::CONFIG_ROLLOUT_AUTO});
        create(&deploys, manifest).await?;
        wait_settled(&ns, "app-config").await?;
        let quiet = Duration::from_secs(6);
        tokio::time::sleep(quiet).await;
        let before = web_replica_sets(&ns).await?.len();

        // On: one rollout, onto the copy of the unchanged data.
        merge_patch(
            &deploys,
            "web",
            json!({"metadata": {"annotations": {keys::CONFIG_ROLLOUT: keys::CONFIG_ROLLOUT_SNAPSHOT}}}),
        )
        .await?;
        let a = wait_pin(&deploys, None).await?;
        wait_settled(&ns, &a).await?;
        tokio::time::sleep(quiet).await;
        let on = web_replica_sets(&ns).await?.len();
        ensure!(on == before + 1, "switching on made {} ReplicaSets", on - before);

        // The current copy deleted by hand: recreated with the same name and data, no rollout.
        // The deletion itself counts as a change of the source it copies.
        cms.delete(&a, &DeleteParams::default()).await?;
        let back = wait_for("the deleted snapshot to come back", DEADLINE, || async {
            Ok(match cms.get_opt(&a).await? {
                Some(cm) => Ok(cm),
                None => Err("absent".to_string()),
            })
        })
        .await?;
        ensure!(
            back.data.as_ref().and_then(|d| d.get("greeting")).map(String::as_str) == Some("v1"),
            "the recreated snapshot holds {:?}",
            back.data
        );
        ensure!(back.immutable == Some(true), "the recreated snapshot is not immutable");
        ensure!(
            web_replica_sets(&ns).await?.len() == on,
            "recreating the snapshot rolled the Deployment"
        );

        // Off: one rollout back to reading the ConfigMap itself.
        merge_patch(
            &deploys,
            "web",
            json!({"metadata": {"annotations": {keys::CONFIG_ROLLOUT: keys::CONFIG_ROLLOUT_AUTO}}}),
        )
        .await?;
        wait_settled(&ns, "app-config").await?;
        tokio::time::sleep(quiet).await;
        let off = web_replica_sets(&ns).await?.len();
        ensure!(off == on + 1, "switching off made {} ReplicaSets", off - on);
        let template_pins = pins(
            deploys
                .get("web")
                .await?
                .spec
                .template
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.as_ref()),
        );
        ensure!(template_pins.is_none(), "the pins stayed: {template_pins:?}");
        Ok::<_, anyhow::Error>(())
    }
    .await;
    rollout.stop().await?;
    webhook.stop().await?;
    result?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_daemonset_in_snapshot_mode_rolls_onto_a_copy_its_controller_revision_owns() -> Result<()>
{
    use k8s_openapi::api::apps::v1::DaemonSet;
    let ns = TestNamespace::new("snap-ds").await?;
    let (rollout, webhook) = start(&ns).await?;
    let result = async {
        let cms = ns.api::<ConfigMap>();
        create(&cms, config_map("app-config", json!({"greeting": "v1"}))).await?;
        let mut manifest = web(2);
        manifest["kind"] = json!("DaemonSet");
        manifest["metadata"]["name"] = json!("agent");
        let spec = manifest["spec"].as_object_mut().context("spec")?;
        for field in ["strategy", "minReadySeconds", "replicas"] {
            spec.remove(field);
        }
        spec.insert("selector".into(), json!({"matchLabels": {"app": "agent"}}));
        manifest["spec"]["template"]["metadata"]["labels"] = json!({"app": "agent"});
        create(&ns.api::<DaemonSet>(), manifest).await?;
        let reads = |want: Option<String>| {
            let ns = &ns;
            async move {
                wait_for(
                    "every agent pod reading one pinned copy",
                    DEADLINE,
                    || async {
                        let by = stateful_pods(ns, "agent").await?;
                        let all: BTreeSet<&String> = by.values().flatten().collect();
                        Ok(match all.iter().next() {
                            Some(c)
                                if all.len() == 1
                                    && **c != "app-config"
                                    && want.as_ref().is_none_or(|w| w != *c) =>
                            {
                                Ok((*c).clone())
                            }
                            _ => Err(format!("{by:?}")),
                        })
                    },
                )
                .await
            }
        };
        let a = reads(None).await?;
        merge_patch(&cms, "app-config", json!({"data": {"greeting": "v2"}})).await?;
        let b = reads(Some(a.clone())).await?;
        for copy in [&a, &b] {
            let cm = wait_for("the copy owned by its revision", DEADLINE, || async {
                let cm = copy_data(&ns, copy).await?;
                Ok(
                    if !cm.owner_references().is_empty()
                        && cm
                            .owner_references()
                            .iter()
                            .all(|o| o.kind == "ControllerRevision")
                    {
                        Ok(cm)
                    } else {
                        Err(format!("{:?}", cm.owner_references()))
                    },
                )
            })
            .await?;
            ensure!(cm.immutable == Some(true), "{copy} is not immutable");
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    rollout.stop().await?;
    webhook.stop().await?;
    result?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn with_the_webhook_down_a_pinned_pod_is_refused_and_an_unpinned_one_is_not() -> Result<()> {
    let ns = TestNamespace::new("snap-down").await?;
    let (rollout, mut webhook) = start(&ns).await?;
    let result = async {
        webhook.stop_serving().await?;
        let pods = ns.api::<Pod>();
        let pod = |name: &str, pinned: bool| {
            let mut p = json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name},
                "spec": {"containers": [{"name": "c", "image": "nginx:1.27",
                    "envFrom": [{"configMapRef": {"name": "app-config"}}]}]}
            });
            if pinned {
                p["metadata"]["annotations"] =
                    json!({keys::CONFIG_SNAPSHOTS: "{\"configmap/app-config\":\"app-config-0123456789\"}"});
            }
            p
        };
        // The injection entry of the test configuration still selects this namespace: an
        // unpinned pod is refused by it too, so the namespace's injection entry is removed
        // first, leaving only the pin entry, as in a namespace not opted in to injection.
        let configs: Api<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration> =
            Api::all(ns.client.clone());
        let name = format!("appset-webhook-{}", ns.name);
        configs
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Json::<()>(serde_json::from_value(json!([
                    {"op": "test", "path": "/webhooks/0/name", "value": "inject.appset.dev"},
                    {"op": "remove", "path": "/webhooks/0"}
                ]))?),
            )
            .await?;
        let refused = wait_for("the pinned pod to be refused", DEADLINE, || async {
            Ok(match create(&pods, pod("pinned", true)).await {
                Err(e) => Ok(format!("{e:#}")),
                Ok(_) => {
                    pods.delete("pinned", &DeleteParams::default()).await?;
                    Err("admitted".to_string())
                }
            })
        })
        .await?;
        ensure!(
            refused.contains("pin.appset.dev"),
            "the refusal does not name the webhook: {refused}"
        );
        create(&pods, pod("plain", false))
            .await
            .context("an unpinned pod was refused while the webhook was down")?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    rollout.stop().await?;
    webhook.stop().await?;
    result?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn an_appset_with_config_snapshots_pins_each_revision_itself() -> Result<()> {
    use appset_crds::AppSet;
    use appset_e2e::fixtures::appset_with_spec;
    use appset_e2e::runners::AppSetController;
    use k8s_openapi::api::apps::v1::ControllerRevision;
    let ns = TestNamespace::new("snap-appset").await?;
    let settings = appset_operator::appset::controller::Settings {
        snapshots: true,
        ..AppSetController::settings(&ns)
    };
    let ctl = AppSetController::start_with(&ns, settings).await?;
    let result = async {
        let cms = ns.api::<ConfigMap>();
        create(&cms, config_map("app-config", json!({"greeting": "v1"}))).await?;
        let set = appset_with_spec(
            "db",
            json!({
                "replicas": 3,
                "podManagementPolicy": "Parallel",
                "configRollout": true,
                "configSnapshots": true,
                "revisionHistoryLimit": 1,
                "selector": {"matchLabels": {"app": "db"}},
                "template": {
                    "metadata": {"labels": {"app": "db"}},
                    "spec": {
                        "containers": [{
                            "name": "db", "image": "nginx:1.27",
                            "envFrom": [{"configMapRef": {"name": "app-config"}}],
                            "volumeMounts": [{"name": "config", "mountPath": "/etc/app"}]
                        }],
                        "volumes": [{"name": "config", "configMap": {"name": "app-config"}}]
                    }
                }
            }),
        )?;
        ns.api::<AppSet>()
            .create(&Default::default(), &set)
            .await
            .context("create the AppSet")?;
        // Its pods read a copy from the start, with no webhook in the way.
        let settled = |not: Option<String>| {
            let ns = &ns;
            async move {
                wait_for("3 AppSet pods reading one copy", DEADLINE, || async {
                    let mut copies = BTreeSet::new();
                    let pods = ns
                        .api::<Pod>()
                        .list(&ListParams::default().labels("app=db"))
                        .await?;
                    let live: Vec<&Pod> = pods
                        .items
                        .iter()
                        .filter(|p| p.metadata.deletion_timestamp.is_none())
                        .collect();
                    for p in &live {
                        copies.insert(config_read(p)?);
                    }
                    Ok(match copies.iter().next() {
                        Some(c)
                            if live.len() == 3
                                && copies.len() == 1
                                && c != "app-config"
                                && not.as_ref().is_none_or(|n| n != c) =>
                        {
                            Ok(c.clone())
                        }
                        _ => Err(format!("{copies:?} over {} pods", live.len())),
                    })
                })
                .await
            }
        };
        let a = settled(None).await?;
        let spec = ns.api::<AppSet>().get("db").await?.spec.template;
        ensure!(
            serde_json::to_string(&spec)?.contains("\"app-config\"")
                && !serde_json::to_string(&spec)?.contains(&a),
            "the AppSet's own template was rewritten"
        );
        merge_patch(&cms, "app-config", json!({"data": {"greeting": "v2"}})).await?;
        let b = settled(Some(a.clone())).await?;
        merge_patch(&cms, "app-config", json!({"data": {"greeting": "v3"}})).await?;
        let c = settled(Some(b.clone())).await?;
        // History 1: the revision of A is pruned and A with it; B (kept) and C stay, each owned
        // by its ControllerRevision.
        wait_for("snapshot A to be collected", DEADLINE, || async {
            Ok(match cms.get_opt(&a).await? {
                None => Ok(()),
                Some(cm) => Err(format!("A still owned by {:?}", cm.owner_references())),
            })
        })
        .await?;
        let revisions = ns
            .api::<ControllerRevision>()
            .list(&ListParams::default())
            .await?;
        for kept in [&b, &c] {
            let cm = copy_data(&ns, kept).await?;
            let owners = cm.owner_references();
            ensure!(
                !owners.is_empty()
                    && owners.iter().all(|o| o.kind == "ControllerRevision"
                        && revisions
                            .items
                            .iter()
                            .any(|r| r.metadata.uid.as_deref() == Some(o.uid.as_str()))),
                "snapshot {kept} is owned by {owners:?}"
            );
        }
        ensure!(
            copy_data(&ns, &c)
                .await?
                .data
                .and_then(|d| d.get("greeting").cloned())
                .as_deref()
                == Some("v3"),
            "snapshot C does not hold v3"
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    ctl.stop().await?;
    result?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn an_optional_source_is_left_as_it_is_until_it_exists_then_pinned() -> Result<()> {
    let ns = TestNamespace::new("snap-optional").await?;
    let (rollout, webhook) = start(&ns).await?;
    let result = async {
        let cms = ns.api::<ConfigMap>();
        create(&cms, config_map("app-config", json!({"greeting": "v1"}))).await?;
        create(
            &ns.api::<Deployment>(),
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "opt", "annotations": {keys::CONFIG_ROLLOUT: keys::CONFIG_ROLLOUT_SNAPSHOT}},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": "opt"}},
                    "template": {
                        "metadata": {"labels": {"app": "opt"}},
                        "spec": {"containers": [{
                            "name": "opt", "image": "nginx:1.27",
                            "envFrom": [{"configMapRef": {"name": "app-config"}},
                                        {"configMapRef": {"name": "extra", "optional": true}}]
                        }]}
                    }
                }
            }),
        )
        .await?;
        let reads = || async {
            let pods = ns
                .api::<Pod>()
                .list(&ListParams::default().labels("app=opt"))
                .await?;
            let live: Vec<Vec<String>> = pods
                .items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .map(|p| {
                    p.spec.as_ref().map_or_else(Vec::new, |s| {
                        s.containers[0]
                            .env_from
                            .iter()
                            .flatten()
                            .filter_map(|e| e.config_map_ref.as_ref().map(|r| r.name.clone()))
                            .collect()
                    })
                })
                .collect();
            anyhow::Ok(live)
        };
        let first = wait_for("the pod with the required source pinned", DEADLINE, || async {
            let live = reads().await?;
            Ok(match live.as_slice() {
                [names] if names[0] != "app-config" && names[1] == "extra" => Ok(names.clone()),
                other => Err(format!("{other:?}")),
            })
        })
        .await?;
        create(&cms, config_map("extra", json!({"more": "yes"}))).await?;
        wait_for("the optional source pinned once it exists", DEADLINE, || async {
            let live = reads().await?;
            Ok(match live.as_slice() {
                [names] if names[0] == first[0] && names[1].starts_with("extra-") => Ok(()),
                other => Err(format!("{other:?}")),
            })
        })
        .await?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    rollout.stop().await?;
    webhook.stop().await?;
    result?;
    ns.cleanup().await;
    Ok(())
}
