//! Claim expansion when a claim template asks for more storage.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_storage_expands_the_claims() -> Result<()> {
    let ns = TestNamespace::new("aps-expand").await?;
    let _ctl = AppSetController::start(&ns).await?;
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
    // The status is written after the claims in the same reconcile, so it may trail them.
    wait_for("the status requesting 2Gi", LONG, || async {
        let st = api.get("web").await?.status.unwrap_or_default();
        let requested = st
            .volume_claim_templates
            .first()
            .and_then(|t| t.requested_storage.clone());
        Ok(if requested.as_deref() == Some("2Gi") {
            Ok(())
        } else {
            Err(format!("requested {requested:?}"))
        })
    })
    .await?;
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
    let _ctl = AppSetController::start(&ns).await?;
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
