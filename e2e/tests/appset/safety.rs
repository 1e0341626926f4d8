//! The AppSet's safety guarantees under adverse conditions: the disruption budget when every
//! pod is unready, claims under quick scale-down/scale-up with `whenScaled: Delete`, and the
//! pacing of config-driven revisions under a flapping ConfigMap. Each test prints what it saw.

use super::*;
use appset_e2e::disruption::watch;

/// Sets the `Ready` condition of every pod of the namespace to False through the status
/// subresource, as a failing readiness probe would during a dependency outage.
async fn make_unready(ns: &TestNamespace) -> Result<()> {
    let pods = ns.api::<Pod>();
    for p in pods.list(&ListParams::default()).await?.items {
        pods.patch_status(
            &p.name_any(),
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": {"conditions": [
                {"type": "Ready", "status": "False", "reason": "DependencyDown"}
            ]}})),
        )
        .await
        .with_context(|| format!("make {} unready", p.name_any()))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_then_a_template_change_replaces_one_pod_at_a_time() -> Result<()> {
    let ns = TestNamespace::new("aps-outage").await?;
    let _ctl = AppSetController::start(&ns).await?;
    let api = ns.api::<AppSet>();
    api.create(
        &PostParams::default(),
        &appset("web", 5, json!({"podManagementPolicy": "Parallel"}))?,
    )
    .await?;
    wait_settled(&ns, "web", 5).await?;
    make_unready(&ns).await?;
    let pods = ns.api::<Pod>();
    // The outage holds: the pods stay unready (nothing here flips them back).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ready = pods
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|p| is_ready(p))
        .count();
    ensure!(
        ready == 0,
        "{ready} pods became Ready again; the outage did not hold"
    );

    // Count, on every pod event, the replicas that are missing or being deleted.
    let (seen, tasks) = watch(&ns.client, &ns.name, 5);
    tokio::time::sleep(Duration::from_secs(1)).await;
    patch_spec(
        &ns,
        "web",
        json!({"template": {"metadata": {"labels": {"app": "web", "release": "b"}}}}),
    )
    .await?;
    // New pods come up Ready (KWOK), so the rollout proceeds, one pod at a time.
    wait_settled(&ns, "web", 5).await?;
    for t in tasks {
        t.abort();
    }
    let max_down = seen.lock().map(|s| s.max_down).unwrap_or(usize::MAX);
    println!("outage rollout: at most {max_down} of 5 replicas missing or terminating at once");
    assert!(
        max_down <= 1,
        "maxUnavailable is 1, {max_down} replicas were down at once"
    );
    ns.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_scale_down_and_up_never_deletes_a_claim_under_a_live_pod() -> Result<()> {
    let ns = TestNamespace::new("aps-rescale").await?;
    let _ctl = AppSetController::start(&ns).await?;
    let api = ns.api::<AppSet>();
    api.create(
        &PostParams::default(),
        &appset(
            "web",
            3,
            json!({"podManagementPolicy": "Parallel",
                   "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Delete"}}),
        )?,
    )
    .await?;
    wait_settled(&ns, "web", 3).await?;
    let claims = ns.api::<PersistentVolumeClaim>();
    let uid0 = claims.get("data-web-0").await?.uid().unwrap_or_default();

    // Watch pods and claims together: a claim that starts terminating while a live pod of its
    // ordinal exists is a claim deleted under a running database.
    #[derive(Default)]
    struct Seen {
        live_pods: BTreeSet<String>,
        claims_deleted: Vec<String>,
        under_live_pod: Vec<String>,
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let pod_watch = {
        let (api, seen) = (ns.api::<Pod>(), seen.clone());
        tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default()).boxed();
            while let Some(ev) = stream.next().await {
                let Ok(mut s) = seen.lock() else { return };
                match ev {
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                        if p.metadata.deletion_timestamp.is_none() {
                            s.live_pods.insert(p.name_any());
                        } else {
                            s.live_pods.remove(&p.name_any());
                        }
                    }
                    Ok(watcher::Event::Delete(p)) => {
                        s.live_pods.remove(&p.name_any());
                    }
                    _ => {}
                }
            }
        })
    };
    let claim_watch = {
        let (api, seen) = (claims.clone(), seen.clone());
        tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default()).boxed();
            while let Some(ev) = stream.next().await {
                let claim = match ev {
                    Ok(watcher::Event::Apply(c)) if c.metadata.deletion_timestamp.is_some() => c,
                    Ok(watcher::Event::Delete(c)) => c,
                    _ => continue,
                };
                let Ok(mut s) = seen.lock() else { return };
                let name = claim.name_any();
                if s.claims_deleted.contains(&name) && claim.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                s.claims_deleted.push(name.clone());
                let pod = name.trim_start_matches("data-").to_string();
                if s.live_pods.contains(&pod) {
                    s.under_live_pod.push(name);
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    for round in 0..20 {
        patch_spec(&ns, "web", json!({"replicas": 1})).await?;
        tokio::time::sleep(Duration::from_millis(200 + 50 * (round % 5))).await;
        patch_spec(&ns, "web", json!({"replicas": 3})).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_settled(&ns, "web", 3).await?;
    wait_claims(&ns, &["data-web-0", "data-web-1", "data-web-2"]).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    pod_watch.abort();
    claim_watch.abort();
    let (deleted, under_live) = match seen.lock() {
        Ok(s) => (s.claims_deleted.clone(), s.under_live_pod.clone()),
        Err(_) => bail!("the watch panicked"),
    };
    println!(
        "20 rounds of 3 -> 1 -> 3: {} claim deletions ({:?}), {} under a live pod",
        deleted.len(),
        deleted,
        under_live.len()
    );
    assert!(
        under_live.is_empty(),
        "claims deleted under a live pod: {under_live:?}"
    );
    assert_eq!(
        claims.get("data-web-0").await?.uid().unwrap_or_default(),
        uid0,
        "ordinal 0's claim was replaced"
    );
    assert!(
        !deleted.iter().any(|c| c == "data-web-0"),
        "ordinal 0 was never scaled away, its claim must never be deleted"
    );
    ns.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_config_map_gives_few_revisions() -> Result<()> {
    let ns = TestNamespace::new("aps-flap").await?;
    let _ctl = AppSetController::start(&ns).await?;
    let cms = ns.api::<ConfigMap>();
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "cfg"}, "data": {"n": "0"}}))?,
    )
    .await?;
    let extra = json!({"podManagementPolicy": "Parallel", "revisionHistoryLimit": 100,
        "template": {"spec": {"containers": [{"name": "main", "image": "nginx:1.27",
            "envFrom": [{"configMapRef": {"name": "cfg"}}],
            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}}});
    ns.api::<AppSet>()
        .create(&PostParams::default(), &appset("web", 2, extra)?)
        .await?;
    wait_settled(&ns, "web", 2).await?;
    let revisions = ns.api::<ControllerRevision>();
    let before = revisions.list(&ListParams::default()).await?.items.len();
    // A change every 500 ms for 15 s, against a 1 s window and a 3 s minimum interval.
    let (period, span, min_interval) = (Duration::from_millis(500), 15u64, 3u64);
    let start = std::time::Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(span) {
        n += 1;
        cms.patch(
            "cfg",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"n": n.to_string()}})),
        )
        .await?;
        tokio::time::sleep(period).await;
    }
    // The last change is taken once its window and the interval have passed.
    let sets = ns.api::<AppSet>();
    wait_for("no config change pending", LONG, || async {
        let st = sets.get("web").await?.status.unwrap_or_default();
        Ok(match st.pending_config_since {
            None => Ok(()),
            Some(t) => Err(format!("pending since {}", t.0)),
        })
    })
    .await?;
    wait_settled(&ns, "web", 2).await?;
    let after = revisions.list(&ListParams::default()).await?.items.len();
    let made = after - before;
    let bound = span.div_ceil(min_interval) as usize + 1;
    println!(
        "flapping ConfigMap: {n} changes in {span}s gave {made} new revisions (bound {bound})"
    );
    assert!(made >= 1, "the last change must roll out");
    assert!(
        made <= bound,
        "{made} revisions for {n} changes, more than {bound}"
    );
    ns.cleanup().await;
    Ok(())
}
