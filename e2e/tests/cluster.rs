//! The local control plane itself: the real controllers run, claims bind, the appset CRDs install
//! and are explained, and invalid manifests are rejected by the schema with a message that names
//! the field.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use appset_e2e::{TestNamespace, wait_for};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

fn kubectl(args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new("kubectl")
        .args(args)
        .output()
        .context("run kubectl")?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

#[tokio::test]
async fn deployment_becomes_ready_and_rolls_out_a_new_replicaset() -> Result<()> {
    let ns = TestNamespace::new("cluster-deploy").await?;
    let deployments = ns.api::<Deployment>();
    let dep: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "nginx", "image": "nginx:1.27"}]}
            }
        }
    }))?;
    deployments.create(&PostParams::default(), &dep).await?;
    wait_for("3 ready replicas", Duration::from_secs(90), || async {
        let d = deployments.get("web").await?;
        let ready = d.status.and_then(|s| s.ready_replicas).unwrap_or(0);
        Ok(if ready == 3 {
            Ok(())
        } else {
            Err(format!("{ready} ready"))
        })
    })
    .await?;

    let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "nginx", "image": "nginx:1.28"}]}}}});
    deployments
        .patch("web", &PatchParams::default(), &Patch::Strategic(&patch))
        .await?;
    let replicasets = ns.api::<ReplicaSet>();
    wait_for(
        "a second ReplicaSet, fully rolled out",
        Duration::from_secs(90),
        || async {
            let list = replicasets.list(&ListParams::default()).await?;
            let d = deployments.get("web").await?;
            let st = d.status.unwrap_or_default();
            let done = list.items.len() == 2
                && st.updated_replicas == Some(3)
                && st.ready_replicas == Some(3);
            Ok(if done {
                Ok(())
            } else {
                Err(format!(
                    "{} ReplicaSets, updated {:?}, ready {:?}",
                    list.items.len(),
                    st.updated_replicas,
                    st.ready_replicas
                ))
            })
        },
    )
    .await?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn claim_in_the_default_storage_class_binds() -> Result<()> {
    let ns = TestNamespace::new("cluster-pvc").await?;
    let claims = ns.api::<PersistentVolumeClaim>();
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    }))?;
    claims.create(&PostParams::default(), &pvc).await?;
    wait_for("the claim to be Bound", Duration::from_secs(60), || async {
        let c = claims.get("data").await?;
        let phase = c.status.and_then(|s| s.phase).unwrap_or_default();
        Ok(if phase == "Bound" {
            Ok(())
        } else {
            Err(format!("phase {phase:?}"))
        })
    })
    .await?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn appset_crds_are_installed_and_explained() -> Result<()> {
    let (ok, text) = kubectl(&["explain", "appset.spec.updateStrategy"])?;
    assert!(ok, "kubectl explain failed: {text}");
    assert!(text.contains("rollingUpdate"), "{text}");
    assert!(
        text.contains("highest ordinal first"),
        "field docs missing: {text}"
    );
    let (ok, text) = kubectl(&["explain", "podinjection.spec.volumes"])?;
    assert!(ok, "kubectl explain failed: {text}");
    assert!(text.contains("emptyDir"), "{text}");
    Ok(())
}

#[tokio::test]
async fn invalid_appset_is_rejected_with_a_message_naming_the_field() -> Result<()> {
    let ns = TestNamespace::new("cluster-invalid").await?;
    let base = |spec_extra: serde_json::Value| {
        let mut spec = json!({
            "replicas": 1,
            "selector": {"matchLabels": {"app": "x"}},
            "template": {"metadata": {"labels": {"app": "x"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}
        });
        if let (Some(s), Some(extra)) = (spec.as_object_mut(), spec_extra.as_object()) {
            for (k, v) in extra {
                s.insert(k.clone(), v.clone());
            }
        }
        json!({"apiVersion": "appset.dev/v1alpha1", "kind": "AppSet", "metadata": {"name": "bad"}, "spec": spec})
    };
    let api: kube::Api<appset_crds::AppSet> = ns.api();
    let cases = [
        (json!({"replicas": -1}), "spec.replicas"),
        (
            json!({"selector": {"matchLabels": {"app": "y"}}}),
            "spec.selector.matchLabels must match",
        ),
        (
            json!({"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0}}}),
            "maxUnavailable must be",
        ),
        (
            json!({"podManagementPolicy": "Sometimes"}),
            "spec.podManagementPolicy",
        ),
    ];
    for (extra, expected) in cases {
        let obj: appset_crds::AppSet = match serde_json::from_value(base(extra.clone())) {
            Ok(o) => o,
            Err(_) => {
                // Not representable in the Rust types (e.g. an unknown enum value): send raw JSON.
                let raw = base(extra.clone());
                let (ok, text) = kubectl_apply(&ns.name, &raw)?;
                assert!(!ok, "{extra} was accepted");
                assert!(
                    text.contains(expected),
                    "{extra}: message {text:?} does not name {expected}"
                );
                continue;
            }
        };
        let err = api
            .create(&PostParams::default(), &obj)
            .await
            .expect_err("must be rejected");
        let text = err.to_string();
        assert!(
            text.contains(expected),
            "{extra}: message {text:?} does not name {expected}"
        );
    }
    // A valid one is accepted and defaulted by the API server.
    let good: appset_crds::AppSet = serde_json::from_value(base(json!({})))?;
    let created = api.create(&PostParams::default(), &good).await?;
    assert_eq!(created.spec.revision_history_limit, 10);
    assert_eq!(created.spec.replicas, 1);
    ns.cleanup().await;
    Ok(())
}

fn kubectl_apply(ns: &str, obj: &serde_json::Value) -> Result<(bool, String)> {
    let dir = std::env::temp_dir().join(format!("appset-e2e-{ns}.json"));
    std::fs::write(&dir, serde_json::to_vec(obj)?)?;
    let path = dir.to_string_lossy().into_owned();
    kubectl(&["create", "-n", ns, "-f", &path])
}
