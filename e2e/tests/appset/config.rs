//! Config rollout of a config-aware AppSet.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_map_change_rolls_a_config_aware_appset() -> Result<()> {
    let ns = TestNamespace::new("aps-config").await?;
    let cms = ns.api::<ConfigMap>();
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "settings"},
        "data": {"mode": "one"}
    }))?;
    cms.create(&PostParams::default(), &cm).await?;
    let _ctl = AppSetController::start(&ns).await?;
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
