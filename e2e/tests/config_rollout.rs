//! Config rollout end to end: the controller runs in-process, scoped to each test's namespace,
//! against the real local control plane, and the tests watch what the workloads' own controllers
//! do (new ReplicaSets, ControllerRevisions) when ConfigMaps and Secrets change.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use appset_crds::keys;
use appset_e2e::fixtures::{
    auto, baseline, baseline_for_hash, config_map, create, deployment, merge_patch, pod_template,
    secret, template_hash, wait_adopted,
};
use appset_e2e::runners::ConfigRollout;
use appset_e2e::{TestNamespace, wait_for};
use appset_operator::config::controller::Settings;
use appset_operator::config::index::WorkloadKind;
use appset_operator::config::rollout::Policy;
use appset_operator::kubeapi::Scope;
use k8s_openapi::api::apps::v1::{
    ControllerRevision, DaemonSet, Deployment, ReplicaSet, StatefulSet,
};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

const WINDOW: Duration = Duration::from_secs(1);
const MIN_INTERVAL: Duration = Duration::from_secs(3);
/// Long enough for a rollout that was going to happen to have happened.
const QUIET: Duration = Duration::from_secs(6);
const DEADLINE: Duration = Duration::from_secs(60);

/// The test's settings: scoped to `ns`, with a short coalescing window and minimum interval.
fn settings(ns: &TestNamespace, reloader_compat: bool) -> Settings {
    Settings {
        reloader_compat,
        policy: Policy {
            window: WINDOW,
            min_interval: MIN_INTERVAL,
        },
        ..ConfigRollout::settings(ns)
    }
}

/// Starts the controller for `ns`; returns once it is ready.
async fn start(ns: &TestNamespace) -> Result<ConfigRollout> {
    ConfigRollout::start(ns, settings(ns, false)).await
}

/// The ReplicaSets a Deployment owns.
async fn replica_sets(ns: &TestNamespace, deploy: &str) -> Result<Vec<ReplicaSet>> {
    let all = ns.api::<ReplicaSet>().list(&ListParams::default()).await?;
    Ok(all
        .items
        .into_iter()
        .filter(|rs| rs.owner_references().iter().any(|o| o.name == deploy))
        .collect())
}

async fn wait_replica_sets(ns: &TestNamespace, deploy: &str, n: usize) -> Result<()> {
    wait_for(
        &format!("{n} ReplicaSet(s) of {deploy}"),
        DEADLINE,
        || async {
            let got = replica_sets(ns, deploy).await?.len();
            Ok(if got == n {
                Ok(())
            } else {
                Err(format!("{got} ReplicaSets"))
            })
        },
    )
    .await
}

/// Waits until the controller has recorded its baseline on the workload.
async fn events_for(ns: &TestNamespace, name: &str, reason: &str) -> Result<Vec<Event>> {
    let all = ns.api::<Event>().list(&ListParams::default()).await?;
    Ok(all
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
        .collect())
}

async fn wait_event(ns: &TestNamespace, name: &str, reason: &str) -> Result<Event> {
    wait_for(&format!("a {reason} Event on {name}"), DEADLINE, || async {
        let events = events_for(ns, name, reason).await?;
        Ok(events
            .into_iter()
            .next()
            .ok_or_else(|| "none yet".to_string()))
    })
    .await
}

#[tokio::test]
async fn editing_a_configmap_rolls_a_deployment() -> Result<()> {
    let ns = TestNamespace::new("cfg-deploy").await?;
    let op = start(&ns).await?;
    let cms = ns.api::<ConfigMap>();
    let deploys = ns.api::<Deployment>();
    create(&cms, config_map("web-config", json!({"greeting": "hello"}))).await?;
    create(
        &deploys,
        deployment(
            "web",
            auto(),
            json!({"container": {"envFrom": [{"configMapRef": {"name": "web-config"}}]}}),
        ),
    )
    .await?;
    let adopted = wait_adopted(&deploys, "web").await?;
    assert_eq!(
        template_hash(&adopted),
        None,
        "adoption must not touch the pod template"
    );
    wait_replica_sets(&ns, "web", 1).await?;

    merge_patch(&cms, "web-config", json!({"data": {"greeting": "bonjour"}})).await?;
    wait_replica_sets(&ns, "web", 2).await?;
    let rolled = deploys.get("web").await?;
    let hash = template_hash(&rolled).context("the pod template carries the config hash")?;
    assert_eq!(Some(baseline_for_hash(&hash)), baseline(&rolled));
    let event = wait_event(&ns, "web", "ConfigChanged").await?;
    let note = event.note.unwrap_or_default();
    assert!(note.contains("ConfigMap web-config"), "{note}");
    assert!(
        !note.contains("bonjour"),
        "an Event must not carry data: {note}"
    );
    assert_eq!(op.rollouts(WorkloadKind::Deployment), 1);

    // The hash is applied by appset's field manager only.
    let managers: Vec<String> = rolled
        .managed_fields()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.iter().any(|m| m == keys::FIELD_MANAGER),
        "{managers:?}"
    );
    op.stop().await?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn editing_a_configmap_rolls_a_statefulset_and_a_daemonset() -> Result<()> {
    let ns = TestNamespace::new("cfg-sts-ds").await?;
    let op = start(&ns).await?;
    let cms = ns.api::<ConfigMap>();
    create(&cms, config_map("shared", json!({"a.conf": "x=1"}))).await?;
    let volume = json!({
        "volumes": [{"name": "conf", "configMap": {"name": "shared"}}],
        "container": {"volumeMounts": [{"name": "conf", "mountPath": "/etc/conf"}]}
    });
    let sts_api = ns.api::<StatefulSet>();
    create(
        &sts_api,
        json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "db", "annotations": auto()},
            "spec": {"replicas": 1, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
                     "template": pod_template("db", volume.clone())}
        }),
    )
    .await?;
    let ds_api = ns.api::<DaemonSet>();
    create(
        &ds_api,
        json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "agent", "annotations": auto()},
            "spec": {"selector": {"matchLabels": {"app": "agent"}},
                     "template": pod_template("agent", volume)}
        }),
    )
    .await?;
    wait_adopted(&sts_api, "db").await?;
    wait_adopted(&ds_api, "agent").await?;
    let revisions = |owner: &'static str| {
        let api = ns.api::<ControllerRevision>();
        async move {
            let list = api.list(&ListParams::default()).await?;
            Ok::<usize, anyhow::Error>(
                list.items
                    .iter()
                    .filter(|r| r.owner_references().iter().any(|o| o.name == owner))
                    .count(),
            )
        }
    };
    for owner in ["db", "agent"] {
        wait_for(
            &format!("the first revision of {owner}"),
            DEADLINE,
            || async {
                let n = revisions(owner).await?;
                Ok(if n == 1 {
                    Ok(())
                } else {
                    Err(format!("{n} revisions"))
                })
            },
        )
        .await?;
    }

    merge_patch(&cms, "shared", json!({"data": {"a.conf": "x=2"}})).await?;
    for owner in ["db", "agent"] {
        wait_for(
            &format!("a second revision of {owner}"),
            DEADLINE,
            || async {
                let n = revisions(owner).await?;
                Ok(if n == 2 {
                    Ok(())
                } else {
                    Err(format!("{n} revisions"))
                })
            },
        )
        .await?;
    }
    let sts = sts_api.get("db").await?;
    let ds = ds_api.get("agent").await?;
    let sts_hash = sts
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(keys::CONFIG_HASH));
    let ds_hash = ds
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(keys::CONFIG_HASH));
    assert!(sts_hash.is_some() && ds_hash.is_some());
    assert_eq!(op.rollouts(WorkloadKind::StatefulSet), 1);
    assert_eq!(op.rollouts(WorkloadKind::DaemonSet), 1);
    op.stop().await?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn editing_a_secret_rolls_only_for_the_keys_used() -> Result<()> {
    let ns = TestNamespace::new("cfg-secret").await?;
    let op = start(&ns).await?;
    let secrets = ns.api::<Secret>();
    let deploys = ns.api::<Deployment>();
    create(
        &secrets,
        secret("db-creds", json!({"password": "s3cret-one", "unused": "a"})),
    )
    .await?;
    create(
        &deploys,
        deployment(
            "api",
            auto(),
            json!({"container": {"env": [{"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db-creds", "key": "password"}}}]}}),
        ),
    )
    .await?;
    let adopted = wait_adopted(&deploys, "api").await?;
    let baseline = baseline(&adopted).unwrap_or_default();
    assert!(
        !baseline.contains("s3cret"),
        "the digest must not reveal the value"
    );
    wait_replica_sets(&ns, "api", 1).await?;

    // A key the pod does not use: no rollout.
    merge_patch(&secrets, "db-creds", json!({"stringData": {"unused": "b"}})).await?;
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        replica_sets(&ns, "api").await?.len(),
        1,
        "an unused key rolled the Deployment"
    );

    merge_patch(
        &secrets,
        "db-creds",
        json!({"stringData": {"password": "s3cret-two"}}),
    )
    .await?;
    wait_replica_sets(&ns, "api", 2).await?;
    let event = wait_event(&ns, "api", "ConfigChanged").await?;
    let note = event.note.unwrap_or_default();
    assert!(
        note.contains("Secret db-creds") && !note.contains("s3cret"),
        "{note}"
    );
    assert_eq!(op.rollouts(WorkloadKind::Deployment), 1);
    op.stop().await?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn editing_two_sources_at_once_gives_one_new_replicaset() -> Result<()> {
    let ns = TestNamespace::new("cfg-burst").await?;
    let op = start(&ns).await?;
    let cms = ns.api::<ConfigMap>();
    let secrets = ns.api::<Secret>();
    let deploys = ns.api::<Deployment>();
    create(&cms, config_map("settings", json!({"mode": "a"}))).await?;
    create(&secrets, secret("token", json!({"token": "t1"}))).await?;
    create(
        &deploys,
        deployment(
            "worker",
            auto(),
            json!({
                "container": {"envFrom": [{"configMapRef": {"name": "settings"}}]},
                "volumes": [{"name": "tok", "projected": {"sources": [{"secret": {"name": "token"}}]}}]
            }),
        ),
    )
    .await?;
    wait_adopted(&deploys, "worker").await?;
    wait_replica_sets(&ns, "worker", 1).await?;

    merge_patch(&cms, "settings", json!({"data": {"mode": "b"}})).await?;
    merge_patch(&secrets, "token", json!({"stringData": {"token": "t2"}})).await?;
    merge_patch(&cms, "settings", json!({"data": {"mode": "c"}})).await?;
    wait_replica_sets(&ns, "worker", 2).await?;
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        replica_sets(&ns, "worker").await?.len(),
        2,
        "a burst of changes gave more than one rollout"
    );
    assert_eq!(op.rollouts(WorkloadKind::Deployment), 1);
    let note = wait_event(&ns, "worker", "ConfigChanged")
        .await?
        .note
        .unwrap_or_default();
    assert!(
        note.contains("ConfigMap settings") && note.contains("Secret token"),
        "{note}"
    );
    op.stop().await?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn restarting_the_operator_rolls_nothing() -> Result<()> {
    let ns = TestNamespace::new("cfg-restart").await?;
    let cms = ns.api::<ConfigMap>();
    let deploys = ns.api::<Deployment>();
    create(&cms, config_map("app", json!({"k": "v"}))).await?;
    create(
        &deploys,
        deployment("app", auto(), json!({"container": {"env": [{"name": "K", "valueFrom": {"configMapKeyRef": {"name": "app", "key": "k"}}}]}})),
    )
    .await?;
    wait_replica_sets(&ns, "app", 1).await?;
    // kube-controller-manager's own writes (the ReplicaSet's status) end when its pod is
    // available.
    wait_for("the ReplicaSet's pod available", DEADLINE, || async {
        let rs = replica_sets(&ns, "app").await?;
        let available = rs
            .iter()
            .map(|r| {
                r.status
                    .as_ref()
                    .and_then(|s| s.available_replicas)
                    .unwrap_or(0)
            })
            .sum::<i32>();
        Ok(if available >= 1 {
            Ok(())
        } else {
            Err(format!("{available} available"))
        })
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let generation = deploys.get("app").await?.metadata.generation;
    let rs_version = |rs: Vec<ReplicaSet>| {
        rs.into_iter()
            .map(|r| r.resource_version().unwrap_or_default())
            .collect::<Vec<_>>()
    };
    let rs_before = rs_version(replica_sets(&ns, "app").await?);
    let first = start(&ns).await?;
    let adopted = wait_adopted(&deploys, "app").await?;
    // The baseline is a label: it neither bumps the Deployment's generation nor reaches its
    // ReplicaSet, so kube-controller-manager has nothing to copy.
    assert_eq!(
        adopted.metadata.generation, generation,
        "adoption bumped the generation"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        rs_version(replica_sets(&ns, "app").await?),
        rs_before,
        "the adoption made kube-controller-manager rewrite the ReplicaSet"
    );
    // An edit of the Deployment that keeps its references is reconciled without reading any
    // source again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reused = first.digests_reused(WorkloadKind::Deployment);
    merge_patch(
        &deploys,
        "app",
        json!({"metadata": {"annotations": {"example.com/owner": "team-a"}}}),
    )
    .await?;
    wait_for("the edit reconciled from memory", DEADLINE, || async {
        let now = first.digests_reused(WorkloadKind::Deployment);
        Ok(if now > reused {
            Ok(())
        } else {
            Err(format!("{now} reconciles reused the digests"))
        })
    })
    .await?;
    first.stop().await?;

    // Warmed from LISTs (from one used source on), so the restart GETs no source.
    let warm = Settings {
        warm_up_min: 1,
        ..settings(&ns, false)
    };
    let second = ConfigRollout::start(&ns, warm).await?;
    wait_for(
        "the restarted controller to reconcile the Deployment",
        DEADLINE,
        || async {
            let n = second.reconciles(WorkloadKind::Deployment);
            Ok(if n > 0 {
                Ok(())
            } else {
                Err("no reconcile yet".to_string())
            })
        },
    )
    .await?;
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        replica_sets(&ns, "app").await?.len(),
        1,
        "a restart rolled the Deployment"
    );
    let after = deploys.get("app").await?;
    assert_eq!(template_hash(&after), None);
    assert_eq!(
        baseline(&after),
        baseline(&adopted),
        "the same key and data give the same baseline"
    );
    assert_eq!(second.rollouts(WorkloadKind::Deployment), 0);
    assert_eq!(
        second.baselines(WorkloadKind::Deployment),
        0,
        "a restart with nothing changed wrote to the Deployment"
    );
    assert_eq!(
        second.source_reads(WorkloadKind::Deployment),
        0,
        "the warmed restart read sources one by one"
    );
    second.stop().await?;

    // A change made while the operator is stopped is rolled after a warm start: the cache is
    // filled from what the LIST returns now.
    merge_patch(&cms, "app", json!({"data": {"k": "changed-while-stopped"}})).await?;
    let third = ConfigRollout::start(
        &ns,
        Settings {
            warm_up_min: 1,
            ..settings(&ns, false)
        },
    )
    .await?;
    wait_replica_sets(&ns, "app", 2).await?;
    let rolled = deploys.get("app").await?;
    let hash = template_hash(&rolled).context("the template carries the config hash")?;
    assert_eq!(Some(baseline_for_hash(&hash)), baseline(&rolled));
    assert_eq!(third.rollouts(WorkloadKind::Deployment), 1);
    assert_eq!(third.source_reads(WorkloadKind::Deployment), 0);
    third.stop().await?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_label_change_on_a_source_rolls_nothing() -> Result<()> {
    let ns = TestNamespace::new("cfg-labels").await?;
    let op = start(&ns).await?;
    let cms = ns.api::<ConfigMap>();
    let deploys = ns.api::<Deployment>();
    create(&cms, config_map("labelled", json!({"k": "v"}))).await?;
    create(
        &deploys,
        deployment(
            "svc",
            auto(),
            json!({"container": {"envFrom": [{"configMapRef": {"name": "labelled"}}]}}),
        ),
    )
    .await?;
    wait_adopted(&deploys, "svc").await?;
    wait_replica_sets(&ns, "svc", 1).await?;
    let before = op.reconciles(WorkloadKind::Deployment);

    merge_patch(
        &cms,
        "labelled",
        json!({"metadata": {"labels": {"team": "blue"}, "annotations": {"note": "relabelled"}}}),
    )
    .await?;
    wait_for(
        "the source change to trigger a reconcile",
        DEADLINE,
        || async {
            let n = op.reconciles(WorkloadKind::Deployment);
            Ok(if n > before {
                Ok(())
            } else {
                Err(format!("{n} reconciles"))
            })
        },
    )
    .await?;
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        replica_sets(&ns, "svc").await?.len(),
        1,
        "a label change rolled the Deployment"
    );
    assert_eq!(op.rollouts(WorkloadKind::Deployment), 0);
    op.stop().await?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_workload_without_the_annotation_is_never_touched() -> Result<()> {
    let ns = TestNamespace::new("cfg-optout").await?;
    let op = start(&ns).await?;
    let cms = ns.api::<ConfigMap>();
    let deploys = ns.api::<Deployment>();
    create(&cms, config_map("plain", json!({"k": "v"}))).await?;
    create(
        &deploys,
        deployment(
            "untouched",
            json!({}),
            json!({"container": {"envFrom": [{"configMapRef": {"name": "plain"}}]}}),
        ),
    )
    .await?;
    // An opted-in neighbour proves the controller is at work in this namespace.
    create(
        &deploys,
        deployment(
            "neighbour",
            auto(),
            json!({"container": {"envFrom": [{"configMapRef": {"name": "plain"}}]}}),
        ),
    )
    .await?;
    wait_adopted(&deploys, "neighbour").await?;
    wait_replica_sets(&ns, "untouched", 1).await?;
    merge_patch(&cms, "plain", json!({"data": {"k": "changed"}})).await?;
    wait_replica_sets(&ns, "neighbour", 2).await?;
    tokio::time::sleep(QUIET).await;

    let d = deploys.get("untouched").await?;
    assert_eq!(replica_sets(&ns, "untouched").await?.len(), 1);
    assert_eq!(baseline(&d), None);
    assert_eq!(template_hash(&d), None);
    let managers: Vec<String> = d
        .managed_fields()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        !managers.iter().any(|m| m == keys::FIELD_MANAGER),
        "{managers:?}"
    );
    op.stop().await?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_missing_required_source_gives_an_event_and_no_crash() -> Result<()> {
    let ns = TestNamespace::new("cfg-missing").await?;
    let op = start(&ns).await?;
    let deploys = ns.api::<Deployment>();
    let annotations: BTreeMap<&str, &str> =
        BTreeMap::from([(keys::CONFIG_ROLLOUT, keys::CONFIG_ROLLOUT_AUTO)]);
    create(
        &deploys,
        deployment(
            "needs-secret",
            json!(annotations),
            json!({"container": {"envFrom": [
                {"secretRef": {"name": "not-there"}},
                {"configMapRef": {"name": "optional-absent", "optional": true}}
            ]}}),
        ),
    )
    .await?;
    let event = wait_event(&ns, "needs-secret", "MissingConfigSource").await?;
    let note = event.note.unwrap_or_default();
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert!(note.contains("Secret not-there"), "{note}");
    assert!(
        !note.contains("optional-absent"),
        "an optional source is not required: {note}"
    );
    let d = deploys.get("needs-secret").await?;
    assert_eq!(baseline(&d), None, "no baseline while blocked");
    assert!(op.alive(), "the controller must survive a missing source");

    // Creating the Secret unblocks: the workload is adopted, not rolled.
    create(&ns.api::<Secret>(), secret("not-there", json!({"k": "v"}))).await?;
    let adopted = wait_adopted(&deploys, "needs-secret").await?;
    assert_eq!(template_hash(&adopted), None);
    assert_eq!(op.rollouts(WorkloadKind::Deployment), 0);
    op.stop().await?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn only_one_replica_leads_and_a_dead_leader_is_replaced() -> Result<()> {
    use appset_operator::runtime::lease::{LeaderElector, Timing};
    let ns = TestNamespace::new("cfg-lease").await?;
    let duration = Duration::from_secs(3);
    let timing = Timing {
        lease_duration: duration,
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(500),
    };
    let a = LeaderElector::new(ns.client.clone(), &ns.name, "operator", "replica-a", timing);
    let b = LeaderElector::new(ns.client.clone(), &ns.name, "operator", "replica-b", timing);
    assert!(a.try_hold().await?, "the first replica takes a free Lease");
    assert!(
        !b.try_hold().await?,
        "a live Lease held by another replica is not taken"
    );
    assert!(a.try_hold().await?, "the holder renews");
    assert!(a.fence().holds(), "the holder's writes pass its fence");
    assert!(!b.fence().holds(), "a standby's writes do not");
    // replica-a stops renewing: once replica-b has seen the same Lease record for a whole lease
    // duration on its own clock, it takes the Lease; replica-a's fence closed before that.
    assert!(!b.try_hold().await?, "replica-b sees the renewed Lease");
    tokio::time::sleep(duration + Duration::from_secs(1)).await;
    assert!(!a.fence().holds(), "the renew deadline has passed");
    assert!(b.try_hold().await?, "an expired Lease is taken over");
    assert!(b.fence().holds());
    assert!(
        !a.try_hold().await?,
        "the old holder does not get it back while it is live"
    );
    let lease = ns
        .api::<k8s_openapi::api::coordination::v1::Lease>()
        .get("operator")
        .await?;
    let spec = lease.spec.unwrap_or_default();
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-b"));
    assert_eq!(spec.lease_transitions, Some(1));
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn reloader_annotations_are_honoured_only_in_compatibility_mode() -> Result<()> {
    let ns = TestNamespace::new("cfg-reloader").await?;
    let op = ConfigRollout::start(&ns, settings(&ns, true)).await?;
    let cms = ns.api::<ConfigMap>();
    let deploys = ns.api::<Deployment>();
    create(&cms, config_map("legacy", json!({"k": "v"}))).await?;
    let env_from = json!({"container": {"envFrom": [{"configMapRef": {"name": "legacy"}}]}});
    create(
        &deploys,
        deployment(
            "migrated",
            json!({ keys::RELOADER_AUTO: "true" }),
            env_from.clone(),
        ),
    )
    .await?;
    wait_adopted(&deploys, "migrated").await?;
    wait_replica_sets(&ns, "migrated", 1).await?;
    merge_patch(&cms, "legacy", json!({"data": {"k": "w"}})).await?;
    wait_replica_sets(&ns, "migrated", 2).await?;
    op.stop().await?;

    // Without the flag, the same annotation means nothing; a neighbour with appset's own
    // annotation proves the controller is at work.
    let plain = start(&ns).await?;
    create(
        &deploys,
        deployment(
            "ignored",
            json!({ keys::RELOADER_AUTO: "true" }),
            env_from.clone(),
        ),
    )
    .await?;
    create(&deploys, deployment("native", auto(), env_from)).await?;
    wait_adopted(&deploys, "native").await?;
    wait_replica_sets(&ns, "ignored", 1).await?;
    merge_patch(&cms, "legacy", json!({"data": {"k": "x"}})).await?;
    wait_replica_sets(&ns, "native", 2).await?;
    tokio::time::sleep(QUIET).await;
    let ignored = deploys.get("ignored").await?;
    assert_eq!(baseline(&ignored), None);
    assert_eq!(replica_sets(&ns, "ignored").await?.len(), 1);
    plain.stop().await?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_namespace_selector_is_followed_live() -> Result<()> {
    use k8s_openapi::api::core::v1::Namespace;
    let ns = TestNamespace::new("cfg-select").await?;
    // Every namespace, filtered by a label only this test's namespace will carry.
    let settings = Settings {
        scope: Scope::All,
        namespace_selector: Some(format!("appset-e2e-config-selector={}", ns.name)),
        ..settings(&ns, false)
    };
    let op = ConfigRollout::start(&ns, settings).await?;

    let cms = ns.api::<ConfigMap>();
    let deploys = ns.api::<Deployment>();
    create(&cms, config_map("cfg", json!({"k": "1"}))).await?;
    let env_from = json!({"container": {"envFrom": [{"configMapRef": {"name": "cfg"}}]}});
    create(&deploys, deployment("web", auto(), env_from)).await?;
    tokio::time::sleep(QUIET).await;
    let d = deploys.get("web").await?;
    assert_eq!(baseline(&d), None, "the namespace is not selected yet");

    let namespaces: Api<Namespace> = Api::all(ns.client.clone());
    let label =
        |value: Value| json!({"metadata": {"labels": {"appset-e2e-config-selector": value}}});
    merge_patch(&namespaces, &ns.name, label(json!(ns.name))).await?;
    wait_adopted(&deploys, "web").await?;
    merge_patch(&cms, "cfg", json!({"data": {"k": "2"}})).await?;
    wait_replica_sets(&ns, "web", 2).await?;

    // The namespace leaves the selection: changes no longer roll.
    merge_patch(&namespaces, &ns.name, label(Value::Null)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    merge_patch(&cms, "cfg", json!({"data": {"k": "3"}})).await?;
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        replica_sets(&ns, "web").await?.len(),
        2,
        "a deselected namespace was rolled"
    );

    op.stop().await?;
    ns.cleanup().await;
    Ok(())
}
