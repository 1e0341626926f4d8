//! Taking over from a StatefulSet: its claims and its orphaned pods.

use super::*;

/// The StatefulSet both tests take over from: two Parallel postgres pods with a `data` claim.
fn postgres_statefulset() -> Result<StatefulSet> {
    let mut spec = claimed_set_spec("db", 2, "postgres:17");
    merge(&mut spec, json!({"podManagementPolicy": "Parallel"}));
    statefulset("db", spec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statefulsets_claims_are_adopted_by_an_appset_of_the_same_name() -> Result<()> {
    let ns = TestNamespace::new("aps-adopt").await?;
    let sts = postgres_statefulset()?;
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

    let _ctl = AppSetController::start(&ns).await?;
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
async fn orphaned_statefulset_pods_are_adopted_then_rolled() -> Result<()> {
    let ns = TestNamespace::new("aps-orphan").await?;
    let sts = postgres_statefulset()?;
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

    let _ctl = AppSetController::start(&ns).await?;
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
