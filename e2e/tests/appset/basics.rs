//! Creating, scaling and deleting an AppSet: pods, claims, the Service and the status.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_get_pods_claims_service_and_status() -> Result<()> {
    let ns = TestNamespace::new("aps-create").await?;
    let _ctl = AppSetController::start(&ns).await?;
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
        assert_eq!(labels.get(keys::STATEFULSET_POD_NAME_LABEL), Some(pname));
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
    // A pod that lost an identity label (as one created before the StatefulSet key was
    // written would lack it) gets it back, in place: same uid, same revision.
    let pod_api = ns.api::<Pod>();
    let before = &pods["web-1"];
    pod_api
        .patch(
            "web-1",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {keys::STATEFULSET_POD_NAME_LABEL: null}}}),
            ),
        )
        .await?;
    let relabelled = wait_for("web-1 labelled again", LONG, || async {
        let p = pod_api.get("web-1").await?;
        Ok(match p.labels().get(keys::STATEFULSET_POD_NAME_LABEL) {
            Some(v) if v == "web-1" => Ok(p),
            other => Err(format!("label {other:?}")),
        })
    })
    .await?;
    ensure!(
        relabelled.uid() == before.uid(),
        "web-1 was replaced, not relabelled"
    );
    ensure!(
        revision_of(&relabelled) == revision_of(before),
        "web-1 changed revision"
    );
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
    assert_eq!(
        condition(&set, "Ready"),
        Some(("True".into(), "RolloutComplete".into()))
    );
    assert!(st.last_progress_time.is_some(), "lastProgressTime is set");
    assert_eq!(st.volume_claim_templates.len(), 1);
    assert_eq!(st.volume_claim_templates[0].claims, 3);
    ns.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_keeps_claims_by_default_and_works_through_the_scale_subresource() -> Result<()> {
    let ns = TestNamespace::new("aps-scale").await?;
    let _ctl = AppSetController::start(&ns).await?;
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
        .args([
            "scale",
            "appsets.appset.dev",
            "web",
            "--replicas=4",
            "-n",
            &ns.name,
        ])
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
    let _ctl = AppSetController::start(&ns).await?;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_appset_honours_when_deleted() -> Result<()> {
    let ns = TestNamespace::new("aps-delete").await?;
    let _ctl = AppSetController::start(&ns).await?;
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
async fn the_selector_is_immutable() -> Result<()> {
    let ns = TestNamespace::new("aps-selector").await?;
    let api = ns.api::<AppSet>();
    api.create(&PostParams::default(), &appset("web", 1, json!({}))?)
        .await?;
    // A new selector with matching template labels: what StatefulSet refuses.
    let err = api
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "selector": {"matchLabels": {"app": "web2"}},
                "template": {"metadata": {"labels": {"app": "web2"}}}
            }})),
        )
        .await
        .err()
        .context("a selector change was accepted")?;
    let message = err.to_string();
    println!("selector change refused: {message}");
    assert!(
        message.contains("spec.selector is immutable"),
        "the refusal names the field: {message}"
    );
    // Other changes still go through.
    patch_spec(&ns, "web", json!({"replicas": 2})).await?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreground_deletion_waits_for_the_pods() -> Result<()> {
    let ns = TestNamespace::new("aps-foreground").await?;
    let ctl = AppSetController::start(&ns).await?;
    let api = ns.api::<AppSet>();
    api.create(
        &PostParams::default(),
        &appset("web", 3, json!({"podManagementPolicy": "Parallel"}))?,
    )
    .await?;
    wait_settled(&ns, "web", 3).await?;
    let pods = ns.api::<Pod>();
    for p in pods.list(&ListParams::default()).await?.items {
        let owner = p.owner_references().first().cloned().context("an owner")?;
        assert_eq!(owner.block_owner_deletion, Some(true), "{}", p.name_any());
    }
    // Stop the controller, so that nothing recreates pods while the set is being deleted.
    ctl.stop().await?;
    api.delete("web", &DeleteParams::foreground()).await?;
    // `kubectl delete --cascade=foreground --wait` returns when the AppSet is gone; by then
    // every pod must be gone too.
    let left = wait_for("the AppSet gone", LONG, || async {
        Ok(match api.get_opt("web").await? {
            None => Ok(pods.list(&ListParams::default()).await?.items),
            Some(_) => Err("still there".to_string()),
        })
    })
    .await?;
    let names: Vec<String> = left.iter().map(|p| p.name_any()).collect();
    println!("pods left when the AppSet was gone: {names:?}");
    assert!(names.is_empty(), "pods outlived the AppSet: {names:?}");
    ns.cleanup().await;
    Ok(())
}
