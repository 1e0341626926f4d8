//! Rolling updates: order, partition, maxUnavailable, a broken template, rollback and history.

use super::*;

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
    let _ctl = AppSetController::start(&ns).await?;
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
    let set = api.get("web").await?;
    assert_eq!(
        condition(&set, "Ready"),
        Some(("True".into(), "RolloutComplete".into())),
        "Ready once the pods from the partition up are updated"
    );
    let st = set.status.unwrap_or_default();
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
    let _ctl = AppSetController::start(&ns).await?;
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
    let _ctl = AppSetController::start(&ns).await?;
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
    // The rollout cannot complete, so the AppSet is not Ready (still rolling or stalled).
    let ready = condition(&api.get("web").await?, "Ready");
    assert!(
        matches!(&ready, Some((s, r)) if s == "False" && (r == "RollingOut" || r == "ProgressDeadlineExceeded")),
        "Ready during the rollout: {ready:?}"
    );
    // The stall is reported once the progress deadline (5 s here) passes.
    let ready = wait_for(
        "Progressing False/ProgressDeadlineExceeded",
        LONG,
        || async {
            let set = api.get("web").await?;
            Ok(match condition(&set, "Progressing") {
                Some((s, r)) if s == "False" && r == "ProgressDeadlineExceeded" => {
                    Ok(condition(&set, "Ready"))
                }
                other => Err(format!("{other:?}")),
            })
        },
    )
    .await?;
    assert_eq!(
        ready,
        Some(("False".into(), "ProgressDeadlineExceeded".into())),
        "a stalled rollout is not Ready"
    );
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
async fn rollback_reuses_the_old_revision_and_history_is_pruned() -> Result<()> {
    let ns = TestNamespace::new("aps-history").await?;
    let _ctl = AppSetController::start(&ns).await?;
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
