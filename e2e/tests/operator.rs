//! The operator binary as a process, measured from outside: what its watches cost.
//!
//! * 200 Secrets of 64 KiB created in a watched namespace: the bytes the operator receives from
//!   the API server (its `appset_apiserver_response_bytes_total`) stay at metadata scale,
//!   because the one ConfigMap/Secret watch both controllers share asks for metadata only;
//!   a Secret's body is read only when a workload that references it is hashed.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use appset_e2e::process::{Process, binary, free_port, run_ok, scratch_dir};
use appset_e2e::{TestNamespace, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use serde_json::json;

/// The operator's `appset_apiserver_response_bytes_total`, scraped from `/metrics`.
fn bytes_received(port: u16) -> Result<u64> {
    let text = run_ok(
        "curl",
        &["-sf", &format!("http://127.0.0.1:{port}/metrics")],
    )?;
    text.lines()
        .find_map(|l| l.strip_prefix("appset_apiserver_response_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .context("no appset_apiserver_response_bytes_total in /metrics")
}

/// Waits until the counter has not moved for two seconds; its value then.
async fn quiet(port: u16) -> Result<u64> {
    let mut last = bytes_received(port)?;
    let mut still = 0;
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = bytes_received(port)?;
        still = if now == last { still + 1 } else { 0 };
        last = now;
        if still >= 4 {
            break;
        }
    }
    Ok(last)
}

#[tokio::test]
async fn two_hundred_large_secrets_cost_only_their_metadata() -> Result<()> {
    let ns = TestNamespace::new("op-bytes").await?;
    let dir = scratch_dir(&ns.name)?;
    let kubeconfig = std::env::var("KUBECONFIG").context("KUBECONFIG")?;
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let op = Process::start(
        &binary("appset-operator")?,
        &[
            "--namespaces",
            &ns.name,
            "--listen",
            &listen,
            "--log-format",
            "text",
        ],
        &[("KUBECONFIG", &kubeconfig), ("POD_NAMESPACE", &ns.name)],
        dir.join("operator.log"),
    )?;
    wait_for("the operator ready", Duration::from_secs(60), || async {
        Ok(
            match run_ok("curl", &["-sf", &format!("http://127.0.0.1:{port}/readyz")]) {
                Ok(_) => Ok(()),
                Err(e) => Err(e.to_string()),
            },
        )
    })
    .await
    .with_context(|| op.log_tail())?;
    let before = quiet(port).await?;

    let secrets = ns.api::<Secret>();
    let value: String = "x".repeat(64 * 1024);
    let mut body_bytes = 0usize;
    for i in 0..200 {
        let s: Secret = serde_json::from_value(json!({
            "metadata": {"name": format!("big-{i:03}")},
            "stringData": {"blob": value},
        }))?;
        let created = secrets.create(&PostParams::default(), &s).await?;
        body_bytes += serde_json::to_vec(&created)?.len();
    }
    let after = quiet(port).await?;
    let watched = after - before;

    // One Deployment referencing one of them: that Secret's body is read, once, to hash it.
    let deployments = ns.api::<Deployment>();
    deployments
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "app", "annotations": {"appset.dev/config-rollout": "auto"}},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "app"}},
                    "template": {"metadata": {"labels": {"app": "app"}}, "spec": {"containers": [{
                        "name": "c", "image": "i",
                        "envFrom": [{"secretRef": {"name": "big-007"}}]}]}}}
            }))?,
        )
        .await?;
    wait_for("the baseline", Duration::from_secs(30), || async {
        let a = deployments
            .get("app")
            .await?
            .metadata
            .annotations
            .unwrap_or_default();
        Ok(if a.contains_key("appset.dev/config-hash-observed") {
            Ok(())
        } else {
            Err(format!("{a:?}"))
        })
    })
    .await
    .with_context(|| op.log_tail())?;
    let hashed = quiet(port).await? - after;
    println!(
        "200 Secrets of 64 KiB ({:.1} MiB as objects): the operator received {:.1} KiB while they were created ({:.0} bytes each, {:.2} % of their size); hashing the one a Deployment references then cost {:.1} KiB",
        body_bytes as f64 / (1024.0 * 1024.0),
        watched as f64 / 1024.0,
        watched as f64 / 200.0,
        100.0 * watched as f64 / body_bytes as f64,
        hashed as f64 / 1024.0
    );
    ensure!(
        (watched as usize) < body_bytes / 20,
        "the operator received {watched} bytes for Secrets of {body_bytes} bytes: bodies are sent"
    );
    ensure!(
        hashed >= 64 * 1024,
        "hashing the referenced Secret cost only {hashed} bytes: was its body read?"
    );
    drop(op);
    ns.cleanup().await;
    Ok(())
}
