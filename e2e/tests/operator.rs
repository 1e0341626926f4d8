//! The operator binary as a process, measured from outside: what its watches cost.
//!
//! * 200 Secrets of 64 KiB created in a watched namespace: the bytes the operator receives from
//!   the API server (its `appset_apiserver_response_bytes_total`) stay at metadata scale,
//!   because the one ConfigMap/Secret watch both controllers share asks for metadata only;
//!   a Secret's body is read only when a workload that references it is hashed.
//! * Two rotations of the hash key in a row, then dropping `previous`, over 20 Deployments and
//!   5 AppSets, with one ConfigMap changed in the middle of the first rotation: exactly the
//!   workload using it rolls. The key is followed live: the operator is never restarted.
//! * A Deployment in config snapshot mode reading a Secret, whose value changes once: the
//!   operator, logging at debug level, never writes either value (plain or base64) to its log.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use appset_crds::AppSet;
use appset_e2e::fixtures::{
    appset_with_spec, auto, baseline, config_map, create, deployment, merge_patch, pod_template,
    template_hash, wait_adopted,
};
use appset_e2e::process::{Process, binary, free_port, run_ok, scratch_dir};
use appset_e2e::{TestNamespace, wait_for};
use appset_operator::confighash::keyring::{CURRENT, DEFAULT_SECRET_NAME, Keyring, PREVIOUS};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use serde_json::json;

/// Starts the operator binary for `ns` (its hash key Secret there too) with `extra` flags, and
/// waits until `/readyz` passes; the process and the port of its endpoints.
async fn operator(ns: &TestNamespace, extra: &[&str]) -> Result<(Process, u16)> {
    operator_logging(ns, extra, "info").await
}

/// [`operator`] with `RUST_LOG` set to `level`.
async fn operator_logging(
    ns: &TestNamespace,
    extra: &[&str],
    level: &str,
) -> Result<(Process, u16)> {
    let dir = scratch_dir(&ns.name)?;
    let kubeconfig = std::env::var("KUBECONFIG").context("KUBECONFIG")?;
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--namespaces",
        &ns.name,
        "--listen",
        &listen,
        "--log-format",
        "text",
    ];
    args.extend(extra);
    let op = Process::start(
        &binary("appset-operator")?,
        &args,
        &[
            ("KUBECONFIG", &kubeconfig),
            ("POD_NAMESPACE", &ns.name),
            ("RUST_LOG", level),
        ],
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
    Ok((op, port))
}

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
    let (op, port) = operator(&ns, &[]).await?;
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
    wait_adopted(&deployments, "app")
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

/// The workloads' config state as the test compares it: each Deployment's template hash, and
/// each AppSet's token and update revision.
#[derive(Debug, PartialEq, Eq)]
struct Rolled {
    deployments: BTreeMap<String, Option<String>>,
    appsets: BTreeMap<String, (Option<String>, Option<String>)>,
}

async fn rolled(ns: &TestNamespace) -> Result<Rolled> {
    let deployments = ns
        .api::<Deployment>()
        .list(&Default::default())
        .await?
        .items
        .iter()
        .map(|d| (d.name_any(), template_hash(d)))
        .collect();
    let appsets = ns
        .api::<AppSet>()
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .map(|s| {
            let st = s.status.clone().unwrap_or_default();
            (s.name_any(), (st.config_hash, st.update_revision))
        })
        .collect();
    Ok(Rolled {
        deployments,
        appsets,
    })
}

/// Waits until every Deployment's baseline and every AppSet's digest is under key `key_id`.
async fn all_under(ns: &TestNamespace, key_id: &str) -> Result<()> {
    wait_for(
        &format!("every workload compared under key {key_id}"),
        Duration::from_secs(90),
        || async {
            let mut behind = Vec::new();
            for d in ns
                .api::<Deployment>()
                .list(&Default::default())
                .await?
                .items
            {
                if !baseline(&d).is_some_and(|v| v.starts_with(&format!("{key_id}."))) {
                    behind.push(d.name_any());
                }
            }
            for s in ns.api::<AppSet>().list(&Default::default()).await?.items {
                let digest = s.status.as_ref().and_then(|st| st.config_digest.clone());
                if !digest.is_some_and(|v| v.starts_with(&format!("{key_id}:"))) {
                    behind.push(s.name_any());
                }
            }
            Ok(if behind.is_empty() {
                Ok(())
            } else {
                Err(format!("not yet: {behind:?}"))
            })
        },
    )
    .await
}

/// Rewrites the hash key Secret with `data` (the entries `key` and, when given, `previous`);
/// returns the id of the new current key.
async fn write_key(secrets: &Api<Secret>, key: &[u8], previous: Option<&[u8]>) -> Result<String> {
    let mut s = secrets.get(DEFAULT_SECRET_NAME).await?;
    let mut data = BTreeMap::new();
    data.insert(CURRENT.to_string(), ByteString(key.to_vec()));
    if let Some(p) = previous {
        data.insert(PREVIOUS.to_string(), ByteString(p.to_vec()));
    }
    s.data = Some(data.clone());
    s.string_data = None;
    secrets
        .replace(DEFAULT_SECRET_NAME, &PostParams::default(), &s)
        .await?;
    Ok(Keyring::from_secret_data(&data)?.current.id().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_key_rotations_roll_only_the_workload_whose_data_changed() -> Result<()> {
    let ns = TestNamespace::new("op-rotate").await?;
    let dir = scratch_dir(&ns.name)?;
    let (op, _) = operator(
        &ns,
        &["--coalesce-window", "1s", "--min-rollout-interval", "1s"],
    )
    .await?;
    let cms = ns.api::<ConfigMap>();
    let deployments = ns.api::<Deployment>();
    let sets = ns.api::<AppSet>();
    for i in 0..20 {
        create(&cms, config_map(&format!("c-{i}"), json!({"v": "1"}))).await?;
        let env = json!({"container": {"envFrom": [{"configMapRef": {"name": format!("c-{i}")}}]}});
        let mut d = deployment(&format!("d-{i}"), auto(), env);
        d["spec"]["replicas"] = json!(0);
        create(&deployments, d).await?;
    }
    for j in 0..5 {
        let name = format!("s-{j}");
        create(&cms, config_map(&format!("a-{j}"), json!({"v": "1"}))).await?;
        let spec = json!({
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": pod_template(&name, json!({"container": {
                "envFrom": [{"configMapRef": {"name": format!("a-{j}")}}]}})),
        });
        sets.create(&PostParams::default(), &appset_with_spec(&name, spec)?)
            .await?;
    }
    let secrets = ns.api::<Secret>();
    let first = Keyring::from_secret_data(
        &wait_for("the hash key Secret", Duration::from_secs(60), || async {
            Ok(match secrets.get_opt(DEFAULT_SECRET_NAME).await? {
                Some(s) => Ok(s.data.unwrap_or_default()),
                None => Err("absent".to_string()),
            })
        })
        .await?,
    )?;
    all_under(&ns, first.current.id())
        .await
        .with_context(|| op.log_tail())?;
    let before = rolled(&ns).await?;

    // Rotation 1, and in the middle of it a change of c-7.
    let key1 = Keyring::generate()?.current;
    let id1 = write_key(&secrets, key1.bytes(), Some(first.current.bytes())).await?;
    merge_patch(&cms, "c-7", json!({"data": {"v": "2"}})).await?;
    all_under(&ns, &id1).await.with_context(|| op.log_tail())?;
    wait_for("d-7 rolled", Duration::from_secs(60), || async {
        let d = deployments.get("d-7").await?;
        Ok(if template_hash(&d).is_some() {
            Ok(())
        } else {
            Err("not yet".to_string())
        })
    })
    .await?;
    // Rotation 2, right after, then dropping `previous`.
    let key2 = Keyring::generate()?.current;
    let id2 = write_key(&secrets, key2.bytes(), Some(key1.bytes())).await?;
    all_under(&ns, &id2).await.with_context(|| op.log_tail())?;
    write_key(&secrets, key2.bytes(), None).await?;
    wait_for(
        "the operator saw the three changes",
        Duration::from_secs(30),
        || async {
            let log = std::fs::read_to_string(dir.join("operator.log")).unwrap_or_default();
            let n = log.matches("the config hash key changed").count();
            Ok(if n >= 3 {
                Ok(())
            } else {
                Err(format!("{n} seen"))
            })
        },
    )
    .await?;
    // Time for the comparisons the last change triggers.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = rolled(&ns).await?;

    let mut changed: Vec<String> = Vec::new();
    for (name, hash) in &after.deployments {
        if before.deployments.get(name) != Some(hash) {
            changed.push(name.clone());
        }
    }
    for (name, state) in &after.appsets {
        if before.appsets.get(name) != Some(state) {
            changed.push(name.clone());
        }
    }
    let unknown = ns
        .api::<k8s_openapi::api::events::v1::Event>()
        .list(&Default::default())
        .await?
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("ConfigKeyUnknown"))
        .count();
    println!(
        "two key rotations and a drop of `previous` over 20 Deployments and 5 AppSets, c-7 changed during the first: rolled {changed:?}"
    );
    ensure!(changed == ["d-7"], "rolled: {changed:?}\n{}", op.log_tail());
    ensure!(unknown == 0, "a digest of an unknown key was reported");
    drop(op);
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn the_operator_never_logs_the_value_of_a_secret_it_snapshots() -> Result<()> {
    use appset_e2e::runners::{Webhook, WebhookOptions};
    use base64::Engine;
    use k8s_openapi::api::core::v1::Pod;
    const CANARIES: [&str; 2] = ["canary-2b7e151628aed2a6", "canary-abf7158809cf4f3c"];
    let ns = TestNamespace::new("op-snap-log").await?;
    let webhook = Webhook::start_with(
        &ns,
        appset_webhook::tls::material::Policy::default(),
        Duration::from_secs(30),
        WebhookOptions {
            pin_config: true,
            ..Default::default()
        },
    )
    .await?;
    let (mut op, _) = operator_logging(
        &ns,
        &[
            "--config-snapshots",
            "--coalesce-window",
            "0s",
            "--min-rollout-interval",
            "0s",
        ],
        "debug",
    )
    .await?;
    let result = async {
        let secrets = ns.api::<Secret>();
        create(
            &secrets,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"},
                   "stringData": {"password": CANARIES[0]}}),
        )
        .await?;
        create(
            &ns.api::<Deployment>(),
            appset_e2e::fixtures::secret_reader(),
        )
        .await?;
        let pods = ns.api::<Pod>();
        let reads = |not: Option<String>| {
            let pods = &pods;
            async move {
                wait_for("the pod reading a snapshot", Duration::from_secs(90), || async {
                    let read = appset_e2e::fixtures::secrets_read(pods).await?;
                    Ok(match read.as_slice() {
                        [n] if n != "db" && not.as_ref() != Some(n) => Ok(n.clone()),
                        other => Err(format!("{other:?}")),
                    })
                })
                .await
            }
        };
        let first = reads(None).await?;
        merge_patch(
            &secrets,
            "db",
            json!({"stringData": {"password": CANARIES[1]}}),
        )
        .await?;
        let second = reads(Some(first.clone())).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let log = std::fs::read_to_string(&op.log)?;
        ensure!(
            log.contains("rolled out for changed config"),
            "the operator's log does not show the rollout, so it proves nothing:\n{}",
            op.log_tail()
        );
        for canary in CANARIES {
            let encoded = base64::engine::general_purpose::STANDARD.encode(canary);
            ensure!(
                !log.contains(canary) && !log.contains(&encoded),
                "the operator logged a Secret's value"
            );
        }
        println!(
            "snapshot mode at debug level: {} log lines, copies {first} then {second}, no Secret value in them",
            log.lines().count()
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    op.kill();
    webhook.stop().await?;
    result?;
    ns.cleanup().await;
    Ok(())
}
