//! The injection webhook against the real local control plane.
//!
//! Each test runs `appset_webhook::serve_on` in-process on `127.0.0.1:<free port>`, watching only
//! its own namespace and keeping its certificates in a Secret there, and creates a
//! MutatingWebhookConfiguration of its own (named after the namespace, selecting only that
//! namespace by `kubernetes.io/metadata.name`, `failurePolicy: Fail`) whose `caBundle` the webhook
//! fills in itself. The API server then calls the webhook over TLS for every pod created in the
//! namespace. The configuration is deleted at the end.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use appset_crds::{AppSet, PodInjection, keys};
use appset_e2e::fixtures::{appset_with_spec, claimed_set_spec, merge};
use appset_e2e::fleet::{Fleet, PodStream, StreamReport};
use appset_e2e::runners::{AppSetController, WEBHOOK_CERT_SECRET as CERT_SECRET, Webhook};
use appset_e2e::{TestNamespace, wait_for};
use base64::Engine as _;
use std::sync::Arc;

use appset_webhook::tls::manager::{TlsConfig, TlsManager};
use appset_webhook::tls::material::Policy;
use appset_webhook::tls::resolver::CertResolver;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

fn quick_policy() -> Policy {
    Policy::default()
}

fn git_content() -> Result<PodInjection> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "appset.dev/v1alpha1",
        "kind": "PodInjection",
        "metadata": {"name": "git-content"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "initContainers": [{
                "name": "git-clone",
                "image": "alpine/git:2.47.2",
                "args": ["clone", "--depth=1", "https://github.com/appset-dev/example-site.git", "/content"],
                "volumeMounts": [{"name": "content", "mountPath": "/content"}]
            }],
            "volumes": [{"name": "content", "emptyDir": {"sizeLimit": "64Mi"}}],
            "volumeMounts": [{"name": "content", "mountPath": "/usr/share/nginx/html", "readOnly": true}]
        }
    }))?)
}

fn nginx_pod(name: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "nginx", "image": "nginx:1.27", "ports": [{"containerPort": 80}]}]}
    }))?)
}

fn is_injected(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(keys::INJECTED))
}

/// Describes the injection-relevant parts of a pod, for failure messages.
fn describe(pod: &Pod) -> String {
    let spec = pod.spec.clone().unwrap_or_default();
    format!(
        "init={:?} volumes={:?} mounts={:?} injected={:?}",
        spec.init_containers
            .iter()
            .flatten()
            .map(|c| &c.name)
            .collect::<Vec<_>>(),
        spec.volumes
            .iter()
            .flatten()
            .map(|v| &v.name)
            .collect::<Vec<_>>(),
        spec.containers
            .iter()
            .map(|c| c
                .volume_mounts
                .iter()
                .flatten()
                .map(|m| &m.mount_path)
                .collect::<Vec<_>>())
            .collect::<Vec<_>>(),
        pod.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(keys::INJECTED)),
    )
}

/// Waits until the API server calls the webhook (its configuration is picked up
/// asynchronously): dry-run creates of `pod` until one comes back injected.
async fn wait_injecting(ns: &TestNamespace, pod: &Pod) -> Result<()> {
    let pods = ns.api::<Pod>();
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    wait_for(
        "the API server to call the webhook",
        Duration::from_secs(30),
        || {
            let pods = pods.clone();
            let dry = dry.clone();
            async move {
                let p = pods.create(&dry, pod).await?;
                Ok(if is_injected(&p) {
                    Ok(())
                } else {
                    Err(describe(&p))
                })
            }
        },
    )
    .await
}

fn assert_git_content(pod: &Pod) -> Result<()> {
    let spec = pod.spec.clone().unwrap_or_default();
    let init = spec.init_containers.unwrap_or_default();
    ensure!(
        init.first().map(|c| c.name.as_str()) == Some("git-clone"),
        "no git-clone init container first: {}",
        describe(pod)
    );
    ensure!(
        init[0]
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "content" && m.mount_path == "/content"),
        "the init container lost its own mount: {}",
        describe(pod)
    );
    let vol = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "content")
        .with_context(|| format!("no content volume: {}", describe(pod)))?;
    ensure!(
        vol.empty_dir
            .as_ref()
            .and_then(|e| e.size_limit.as_ref())
            .map(|q| q.0.as_str())
            == Some("64Mi"),
        "content is not the declared emptyDir: {vol:?}"
    );
    let nginx = spec
        .containers
        .iter()
        .find(|c| c.name == "nginx")
        .context("no nginx container")?;
    ensure!(
        nginx
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "content"
                && m.mount_path == "/usr/share/nginx/html"
                && m.read_only == Some(true)),
        "nginx lacks the read-only content mount: {}",
        describe(pod)
    );
    let recorded = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(keys::INJECTED))
        .cloned()
        .unwrap_or_default();
    ensure!(
        recorded == "git-content@1",
        "injected annotation is {recorded:?}"
    );
    Ok(())
}

async fn enabled_namespace(prefix: &str) -> Result<TestNamespace> {
    TestNamespace::with_labels(
        prefix,
        &[(keys::INJECTION_NAMESPACE_LABEL, keys::INJECTION_ENABLED)],
    )
    .await
}

#[tokio::test]
async fn nginx_with_git_content_is_injected_and_opt_out_is_honoured() -> Result<()> {
    let ns = enabled_namespace("wh-nginx").await?;
    ns.api::<PodInjection>()
        .create(&PostParams::default(), &git_content()?)
        .await?;
    let webhook = Webhook::start(&ns, quick_policy(), Duration::from_secs(30)).await?;
    let result = async {
        wait_injecting(&ns, &nginx_pod("probe")?).await?;
        let pods = ns.api::<Pod>();
        let created = pods
            .create(&PostParams::default(), &nginx_pod("web")?)
            .await?;
        assert_git_content(&created)?;
        // What is stored is what was admitted, and KWOK runs it.
        let stored = pods.get("web").await?;
        assert_git_content(&stored)?;
        wait_for("the pod to run", Duration::from_secs(60), || {
            let pods = pods.clone();
            async move {
                let p = pods.get("web").await?;
                let phase = p.status.and_then(|s| s.phase).unwrap_or_default();
                Ok(if phase == "Running" {
                    Ok(())
                } else {
                    Err(phase)
                })
            }
        })
        .await?;

        let mut opted_out = nginx_pod("opted-out")?;
        opted_out.metadata.annotations = Some(
            [(
                keys::INJECTION_POD_OPT_OUT.to_string(),
                keys::INJECTION_DISABLED.to_string(),
            )]
            .into_iter()
            .collect(),
        );
        let created = pods.create(&PostParams::default(), &opted_out).await?;
        ensure!(
            !is_injected(&created),
            "opted-out pod was injected: {}",
            describe(&created)
        );
        ensure!(
            created
                .spec
                .and_then(|s| s.init_containers)
                .unwrap_or_default()
                .is_empty(),
            "opted-out pod got init containers"
        );
        // The label form of the opt-out (the one the chart's objectSelector filters on): the
        // PodInjection still selects the pod, and nothing is injected.
        let mut labelled = nginx_pod("opted-out-label")?;
        labelled
            .metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert(
                keys::INJECTION_POD_OPT_OUT.to_string(),
                keys::INJECTION_DISABLED.to_string(),
            );
        let created = pods.create(&PostParams::default(), &labelled).await?;
        ensure!(
            !is_injected(&created),
            "pod opted out by label was injected: {}",
            describe(&created)
        );
        // A pod the selector does not match is untouched.
        let mut other = nginx_pod("other")?;
        other.metadata.labels = Some(
            [("app".to_string(), "api".to_string())]
                .into_iter()
                .collect(),
        );
        let created = pods.create(&PostParams::default(), &other).await?;
        ensure!(
            !is_injected(&created),
            "unselected pod was injected: {}",
            describe(&created)
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    webhook.stop().await?;
    result?;
    ns.cleanup().await;
    Ok(())
}

/// The webhook's `appset_webhook_namespace_cache_stale_total`.
async fn stale_count(webhook: &Webhook) -> Result<u64> {
    Ok(webhook
        .metrics()
        .await?
        .lines()
        .find_map(|l| l.strip_prefix("appset_webhook_namespace_cache_stale_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

#[tokio::test]
async fn a_stale_namespace_cache_never_skips_an_injection_the_api_server_sent() -> Result<()> {
    // The configuration sends this namespace's pods to the webhook whatever its labels (it
    // selects the namespace by name). Once the opt-in label is removed the webhook's namespace
    // cache disagrees with the API server: the disagreement is counted, and the pod is still
    // injected, since the API server's namespaceSelector is what decides.
    let ns = enabled_namespace("wh-unlabelled").await?;
    ns.api::<PodInjection>()
        .create(&PostParams::default(), &git_content()?)
        .await?;
    let webhook = Webhook::start(&ns, quick_policy(), Duration::from_secs(30)).await?;
    let result = async {
        wait_injecting(&ns, &nginx_pod("probe")?).await?;
        ensure!(stale_count(&webhook).await? == 0, "stale before any change");
        let namespaces: Api<Namespace> = Api::all(ns.client.clone());
        let unlabel = json!({"metadata": {"labels": {keys::INJECTION_NAMESPACE_LABEL: null}}});
        namespaces
            .patch(&ns.name, &PatchParams::default(), &Patch::Merge(&unlabel))
            .await?;
        let pods = ns.api::<Pod>();
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        wait_for(
            "the webhook's cache to see the label removed",
            Duration::from_secs(30),
            || {
                let (pods, dry, webhook) = (pods.clone(), dry.clone(), &webhook);
                async move {
                    let p = pods.create(&dry, &nginx_pod("probe")?).await?;
                    ensure!(
                        is_injected(&p),
                        "a dry-run pod was not injected: {}",
                        describe(&p)
                    );
                    let n = stale_count(webhook).await?;
                    Ok(if n > 0 {
                        Ok(())
                    } else {
                        Err("cache agrees".to_string())
                    })
                }
            },
        )
        .await?;
        let created = pods
            .create(&PostParams::default(), &nginx_pod("web")?)
            .await?;
        ensure!(
            is_injected(&created),
            "the API server sent the pod, yet it was not injected: {}",
            describe(&created)
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    webhook.stop().await?;
    result?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn conflicting_pod_is_denied_with_a_message_naming_both_sides_and_a_dry_run_leaves_no_event()
-> Result<()> {
    let ns = enabled_namespace("wh-conflict").await?;
    ns.api::<PodInjection>()
        .create(&PostParams::default(), &git_content()?)
        .await?;
    let webhook = Webhook::start(&ns, quick_policy(), Duration::from_secs(30)).await?;
    let result = async {
        wait_injecting(&ns, &nginx_pod("probe")?).await?;
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {
                "containers": [{"name": "nginx", "image": "nginx:1.27",
                    "volumeMounts": [{"name": "site", "mountPath": "/usr/share/nginx/html"}]}],
                "volumes": [{"name": "site", "emptyDir": {}}, {"name": "content", "configMap": {"name": "site"}}]
            }
        }))?;
        let events = ns.api::<k8s_openapi::api::core::v1::Event>();
        let denied_events = || {
            let events = events.clone();
            async move {
                let list = events.list(&ListParams::default()).await?;
                Ok::<_, anyhow::Error>(
                    list.items
                        .iter()
                        .filter(|e| {
                            e.reason.as_deref() == Some("PodDenied")
                                && e.involved_object.kind.as_deref() == Some("PodInjection")
                                && e.involved_object.name.as_deref() == Some("git-content")
                                && e.type_.as_deref() == Some("Warning")
                        })
                        .count(),
                )
            }
        };
        // A server-side dry run is denied the same way, and leaves nothing behind.
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        match ns.api::<Pod>().create(&dry, &pod).await {
            Ok(p) => bail!("the dry-run conflicting pod was admitted: {}", describe(&p)),
            Err(kube::Error::Api(s)) => ensure!(s.code == 403, "dry run: {}", s.message),
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        ensure!(
            denied_events().await? == 0,
            "a dry run left a PodDenied Event"
        );
        let err = match ns.api::<Pod>().create(&PostParams::default(), &pod).await {
            Ok(p) => bail!("the conflicting pod was admitted: {}", describe(&p)),
            Err(kube::Error::Api(s)) => s,
            Err(e) => return Err(e.into()),
        };
        let msg = err.message.clone();
        ensure!(err.code == 403, "expected 403, got {}: {msg}", err.code);
        for part in [
            "denied the request",
            "volume \"content\" of PodInjection \"git-content\" differs from volume \"content\" of the pod",
            "mount of volume \"content\" at \"/usr/share/nginx/html\" in container \"nginx\" by PodInjection \"git-content\" differs from the mount of volume \"site\" at that path by the pod",
        ] {
            ensure!(msg.contains(part), "message lacks {part:?}: {msg}");
        }
        ensure!(
            ns.api::<Pod>().get_opt("web").await?.is_none(),
            "a denied pod exists"
        );
        // The PodInjection's owner sees the denial too.
        wait_for("a PodDenied Event on the PodInjection", Duration::from_secs(30), || async {
            let n = denied_events().await?;
            Ok(if n > 0 { Ok(()) } else { Err("none".to_string()) })
        })
        .await?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    webhook.stop().await?;
    result?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn pods_of_a_deployment_are_injected() -> Result<()> {
    let ns = enabled_namespace("wh-deploy").await?;
    ns.api::<PodInjection>()
        .create(&PostParams::default(), &git_content()?)
        .await?;
    let webhook = Webhook::start(&ns, quick_policy(), Duration::from_secs(30)).await?;
    let result = async {
        wait_injecting(&ns, &nginx_pod("probe")?).await?;
        let deploy: Deployment = serde_json::from_value(json!({
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
        ns.api::<Deployment>()
            .create(&PostParams::default(), &deploy)
            .await?;
        let pods = ns.api::<Pod>();
        let found = wait_for("3 pods of the Deployment", Duration::from_secs(60), || {
            let pods = pods.clone();
            async move {
                let list = pods.list(&ListParams::default().labels("app=web")).await?;
                let owned: Vec<Pod> = list
                    .items
                    .into_iter()
                    .filter(|p| {
                        p.metadata
                            .owner_references
                            .as_ref()
                            .is_some_and(|o| !o.is_empty())
                    })
                    .collect();
                Ok(if owned.len() == 3 {
                    Ok(owned)
                } else {
                    Err(format!("{} pods", owned.len()))
                })
            }
        })
        .await?;
        for p in &found {
            assert_git_content(p)?;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    webhook.stop().await?;
    result?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn pods_of_an_appset_are_injected() -> Result<()> {
    let ns = enabled_namespace("wh-appset").await?;
    ns.api::<PodInjection>()
        .create(&PostParams::default(), &git_content()?)
        .await?;
    let webhook = Webhook::start(&ns, quick_policy(), Duration::from_secs(30)).await?;
    let ctl = AppSetController::start(&ns).await?;
    let result = async {
        wait_injecting(&ns, &nginx_pod("probe")?).await?;
        let mut spec = claimed_set_spec("web", 2, "nginx:1.27");
        // The container is named for what the injection assertions look for.
        merge(
            &mut spec,
            json!({
                "podManagementPolicy": "Parallel",
                "template": {"spec": {"containers": [{"name": "nginx", "image": "nginx:1.27",
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}}
            }),
        );
        let set = appset_with_spec("web", spec)?;
        ns.api::<AppSet>()
            .create(&PostParams::default(), &set)
            .await?;
        let pods = ns.api::<Pod>();
        let found = wait_for("pods web-0 and web-1", Duration::from_secs(60), || {
            let pods = pods.clone();
            async move {
                let mut got = Vec::new();
                for name in ["web-0", "web-1"] {
                    if let Some(p) = pods.get_opt(name).await? {
                        got.push(p);
                    }
                }
                Ok(if got.len() == 2 {
                    Ok(got)
                } else {
                    Err(format!("{} of 2 pods", got.len()))
                })
            }
        })
        .await?;
        for p in &found {
            assert_git_content(p)?;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    ctl.stop().await?;
    webhook.stop().await?;
    result?;
    ns.cleanup().await;
    Ok(())
}

/// Reads the certificates in the Secret: (CA PEM, serving PEM).
async fn current_certs(secrets: &Api<Secret>) -> Result<(String, String)> {
    let s = secrets.get(CERT_SECRET).await?;
    let data = s.data.unwrap_or_default();
    let get = |k: &str| {
        data.get(k)
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .unwrap_or_default()
    };
    Ok((get("ca.crt"), get("tls.crt")))
}

/// A pod of the stream: the nginx pod that `git-content` selects.
fn stream_pod(i: usize) -> Pod {
    Pod {
        metadata: kube::api::ObjectMeta {
            name: Some(format!("web-{i}")),
            labels: Some([("app".to_string(), "web".to_string())].into()),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::core::v1::PodSpec {
            containers: vec![k8s_openapi::api::core::v1::Container {
                name: "nginx".into(),
                image: Some("nginx:1.27".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn injected_as_declared(pod: &Pod) -> std::result::Result<(), String> {
    assert_git_content(pod).map_err(|e| format!("{e:#}"))
}

/// The stream's rate: one pod every 50 ms, 20 a second.
const STREAM_EVERY: Duration = Duration::from_millis(50);

fn ensure_no_failures(what: &str, report: &StreamReport) -> Result<()> {
    ensure!(
        report.failed.is_empty(),
        "{what}: {} of {} pod creations failed, first: {:?}",
        report.failed.len(),
        report.attempts(),
        report.failed.iter().take(5).collect::<Vec<_>>()
    );
    Ok(())
}

/// Reasons of the Events on the certificate Secret, in the order they were first seen.
async fn secret_event_reasons(ns: &TestNamespace) -> Result<Vec<String>> {
    let mut events = ns
        .api::<k8s_openapi::api::core::v1::Event>()
        .list(&ListParams::default())
        .await?
        .items;
    events.retain(|e| e.involved_object.name.as_deref() == Some(CERT_SECRET));
    events.sort_by_key(|e| {
        e.event_time
            .as_ref()
            .map(|t| t.0)
            .or(e.first_timestamp.as_ref().map(|t| t.0))
    });
    Ok(events.into_iter().filter_map(|e| e.reason).collect())
}

#[tokio::test]
async fn rolling_three_webhook_replicas_under_twenty_pods_a_second_fails_no_admission() -> Result<()>
{
    let ns = enabled_namespace("wh-roll").await?;
    ns.api::<PodInjection>()
        .create(&PostParams::default(), &git_content()?)
        .await?;
    let drain = Duration::from_secs(3);
    let mut fleet = Fleet::start(&ns, 3, Policy::default(), Duration::from_secs(30), drain).await?;
    let result = async {
        wait_injecting(&ns, &nginx_pod("probe")?).await?;
        let stream = PodStream::start(ns.api(), STREAM_EVERY, stream_pod, injected_as_declared);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rolled = async {
            for i in 0..3 {
                let t = Instant::now();
                fleet.restart(i).await?;
                println!("replica {i} drained, restarted and ready again in {:?}", t.elapsed());
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        let report = stream.stop().await?;
        rolled?;
        let connections: Vec<u64> = (0..3).map(|i| fleet.balancer.connections(i)).collect();
        println!(
            "rolled 3 replicas one by one (drain {drain:?}): {} pod creations in {:?} ({:.1}/s), {} admitted and injected, {} failed; connections per replica {connections:?}, unplaced {}",
            report.attempts(),
            report.elapsed,
            report.attempts() as f64 / report.elapsed.as_secs_f64(),
            report.admitted,
            report.failed.len(),
            fleet.balancer.unplaced()
        );
        ensure_no_failures("rolling the replicas", &report)?;
        ensure!(
            report.admitted >= 200,
            "only {} pods were created during the rollout",
            report.admitted
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    fleet.stop().await?;
    result?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_ca_rotation_across_three_replicas_under_a_stream_of_pods_fails_no_admission()
-> Result<()> {
    let ns = enabled_namespace("wh-rotate").await?;
    ns.api::<PodInjection>()
        .create(&PostParams::default(), &git_content()?)
        .await?;
    // Short lifetimes so that the serving certificate is renewed every few seconds and the CA
    // rotates during the stream.
    let policy = Policy {
        sans: vec!["127.0.0.1".into()],
        ca_validity: Duration::from_secs(24),
        ca_renew_before: Duration::from_secs(14),
        serving_validity: Duration::from_secs(6),
        serving_renew_before: Duration::from_secs(3),
        promote_after: Duration::from_secs(3),
    };
    let fleet = Fleet::start(
        &ns,
        3,
        policy,
        Duration::from_millis(300),
        Duration::from_secs(1),
    )
    .await?;
    let result = async {
        wait_injecting(&ns, &nginx_pod("probe")?).await?;
        let secrets = ns.api::<Secret>();
        let stream = PodStream::start(ns.api(), STREAM_EVERY, stream_pod, injected_as_declared);
        let mut cas = BTreeSet::new();
        let mut servings = BTreeSet::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            let (ca, serving) = current_certs(&secrets).await?;
            cas.insert(ca);
            servings.insert(serving);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let report = stream.stop().await?;
        let reasons = secret_event_reasons(&ns).await?;
        println!(
            "3 replicas, CA rotation: {} pod creations in {:?}, {} admitted and injected, {} failed; saw {} CAs and {} serving certificates; Events on the Secret: {reasons:?}",
            report.attempts(),
            report.elapsed,
            report.admitted,
            report.failed.len(),
            cas.len(),
            servings.len()
        );
        ensure_no_failures("the CA rotation", &report)?;
        ensure!(cas.len() >= 2, "the CA never rotated during the stream");
        ensure!(
            servings.len() >= 4,
            "the serving certificate was renewed only {} times",
            servings.len() - 1
        );
        for (before, after) in [
            ("NextCaPublished", "NextCaConfirmed"),
            ("NextCaConfirmed", "CaRotated"),
        ] {
            let b = reasons.iter().position(|r| r == before);
            let a = reasons.iter().position(|r| r == after);
            ensure!(
                b.is_some() && a.is_some() && b < a,
                "expected {before} before {after} among {reasons:?}"
            );
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    fleet.stop().await?;
    result?;
    ns.cleanup().await;
    Ok(())
}

/// The sum of a counter over the replicas.
async fn fleet_counter(fleet: &Fleet, line_start: &str) -> Result<f64> {
    let mut total = 0.0;
    for i in 0..3 {
        let text = fleet.metrics(i).await?;
        total += text
            .lines()
            .filter(|l| l.starts_with(line_start))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    Ok(total)
}

#[tokio::test]
async fn a_damaged_or_deleted_certificate_secret_is_restored_with_the_same_ca_and_fails_no_admission()
-> Result<()> {
    let ns = enabled_namespace("wh-damage").await?;
    ns.api::<PodInjection>()
        .create(&PostParams::default(), &git_content()?)
        .await?;
    let fleet = Fleet::start(
        &ns,
        3,
        Policy::default(),
        Duration::from_secs(30),
        Duration::from_secs(1),
    )
    .await?;
    let result = async {
        wait_injecting(&ns, &nginx_pod("probe")?).await?;
        let secrets = ns.api::<Secret>();
        let (ca, _) = current_certs(&secrets).await?;
        let stream = PodStream::start(ns.api(), STREAM_EVERY, stream_pod, injected_as_declared);
        tokio::time::sleep(Duration::from_secs(2)).await;

        // The CA's key truncated: the replicas restore the material they serve.
        let key = secrets
            .get(CERT_SECRET)
            .await?
            .data
            .unwrap_or_default()
            .get("ca.key")
            .map(|k| k.0.clone())
            .context("no ca.key")?;
        let truncated = base64::engine::general_purpose::STANDARD.encode(&key[..key.len() / 2]);
        secrets
            .patch(
                CERT_SECRET,
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {"ca.key": truncated}})),
            )
            .await?;
        let repaired = wait_for("the damaged Secret to be repaired", Duration::from_secs(30), || async {
            let data = secrets.get(CERT_SECRET).await?.data.unwrap_or_default();
            Ok(if data.get("ca.key").map(|k| &k.0) == Some(&key) {
                Ok(current_certs(&secrets).await?.0)
            } else {
                Err("ca.key still damaged".to_string())
            })
        })
        .await?;
        ensure!(repaired == ca, "the repair replaced the CA");

        // The Secret deleted outright: recreated with the same CA.
        secrets.delete(CERT_SECRET, &Default::default()).await?;
        let restored = wait_for("the deleted Secret to be restored", Duration::from_secs(30), || async {
            Ok(match secrets.get_opt(CERT_SECRET).await? {
                Some(_) => Ok(current_certs(&secrets).await?.0),
                None => Err("absent".to_string()),
            })
        })
        .await?;
        ensure!(restored == ca, "the restore replaced the CA");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let report = stream.stop().await?;

        let reasons = secret_event_reasons(&ns).await?;
        let damaged = fleet_counter(&fleet, "appset_webhook_certificate_secret_damaged_total").await?;
        let expiry = fleet.metrics(0).await?;
        let ca_expiry = appset_webhook::tls::material::not_after(&ca)?.unix_timestamp();
        println!(
            "damaged then deleted certificate Secret, 3 replicas: {} pod creations in {:?}, {} admitted and injected, {} failed; damaged_total over the replicas {damaged}; Events on the Secret: {reasons:?}",
            report.attempts(),
            report.elapsed,
            report.admitted,
            report.failed.len()
        );
        ensure_no_failures("repairing the certificate Secret", &report)?;
        ensure!(
            reasons.iter().any(|r| r == "CertificateSecretDamaged"),
            "no CertificateSecretDamaged Event: {reasons:?}"
        );
        ensure!(
            reasons.iter().any(|r| r == "CertificateRestored"),
            "no CertificateRestored Event: {reasons:?}"
        );
        ensure!(damaged >= 1.0, "the damage was not counted");
        let gauge = format!(
            "appset_webhook_certificate_expiry_timestamp_seconds{{cert=\"ca\"}} {ca_expiry}"
        );
        ensure!(
            expiry.lines().any(|l| l == gauge),
            "no `{gauge}` in the metrics:\n{expiry}"
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    fleet.stop().await?;
    result?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn replicas_agree_on_one_certificate() -> Result<()> {
    let ns = TestNamespace::new("wh-replicas").await?;
    let result = async {
        // Serving certificates are due for renewal almost at once, so the second round races
        // on a renewal as the first raced on the creation.
        let policy = Policy {
            sans: vec!["127.0.0.1".into()],
            ca_validity: Duration::from_secs(3600),
            ca_renew_before: Duration::from_secs(600),
            serving_validity: Duration::from_secs(4),
            serving_renew_before: Duration::from_secs(2),
            promote_after: Duration::from_secs(60),
        };
        let config = TlsConfig {
            secret_namespace: ns.name.clone(),
            secret_name: CERT_SECRET.into(),
            webhook_configuration: None,
            policy,
            check_interval: Duration::from_secs(1),
        };
        let replicas: Vec<(TlsManager, Arc<CertResolver>)> = (0..3)
            .map(|_| {
                let r = Arc::new(CertResolver::new());
                (
                    TlsManager::new(
                        ns.client.clone(),
                        config.clone(),
                        r.clone(),
                        Default::default(),
                    ),
                    r,
                )
            })
            .collect();
        let secrets = ns.api::<Secret>();
        let mut seen = BTreeSet::new();
        for round in 0..2 {
            let ticks = futures::future::join_all(replicas.iter().map(|(m, _)| m.tick())).await;
            for t in ticks {
                t.with_context(|| format!("round {round}"))?;
            }
            // A replica that lost a race serves what it read; one more pass each settles on the
            // stored certificate (in the webhook this pass is triggered by the Secret watch).
            for (m, _) in &replicas {
                m.tick().await?;
            }
            let (_, stored) = current_certs(&secrets).await?;
            for (i, (_, r)) in replicas.iter().enumerate() {
                ensure!(
                    r.current_pem().as_deref() == Some(stored.as_str()),
                    "round {round}: replica {i} serves another certificate than the Secret's"
                );
            }
            seen.insert(stored);
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
        ensure!(
            seen.len() == 2,
            "expected a creation then a renewal, saw {} certificates",
            seen.len()
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    result?;
    ns.cleanup().await;
    Ok(())
}

/// The CA of the client certificate the local API server presents to webhooks (`up.sh` writes
/// it next to the kubeconfig).
fn webhook_client_ca() -> Result<std::path::PathBuf> {
    let state = match std::env::var_os("APPSET_CLUSTER_DIR") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => std::path::PathBuf::from(
            std::env::var_os("KUBECONFIG").context("neither APPSET_CLUSTER_DIR nor KUBECONFIG")?,
        )
        .parent()
        .context("KUBECONFIG has no directory")?
        .to_path_buf(),
    };
    let ca = state.join("pki/webhook-client-ca.crt");
    ensure!(
        ca.exists(),
        "{} is missing: the cluster was not brought up by e2e/cluster/up.sh with the webhook client certificate",
        ca.display()
    );
    Ok(ca)
}

#[tokio::test]
async fn with_a_client_ca_reviews_are_answered_to_the_api_server_only() -> Result<()> {
    let ca = webhook_client_ca()?;
    let ns = enabled_namespace("wh-client-ca").await?;
    ns.api::<PodInjection>()
        .create(&PostParams::default(), &git_content()?)
        .await?;
    let webhook = Webhook::start_with(
        &ns,
        quick_policy(),
        Duration::from_secs(30),
        appset_e2e::runners::WebhookOptions {
            client_ca_file: Some(ca),
            ..Default::default()
        },
    )
    .await?;
    let result = async {
        // The API server presents its client certificate: pods are reviewed and injected.
        wait_injecting(&ns, &nginx_pod("probe")?).await?;
        let pod = ns
            .api::<Pod>()
            .create(&PostParams::default(), &nginx_pod("web-0")?)
            .await?;
        assert_git_content(&pod)?;
        // Any other caller, here with a well-formed review naming the same namespace, is refused.
        let review = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "e2e-unauthenticated",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": ns.name,
                "operation": "CREATE",
                "userInfo": {"username": "someone"},
                "object": serde_json::to_value(nginx_pod("stolen")?)?
            }
        });
        let (status, body) = webhook
            .send(
                hyper::Method::POST,
                "/mutate-pods",
                serde_json::to_vec(&review)?,
            )
            .await?;
        ensure!(
            status == hyper::StatusCode::FORBIDDEN,
            "an unauthenticated review got {status}: {body}"
        );
        ensure!(
            !body.contains("git-clone"),
            "the refusal leaked the injection: {body}"
        );
        // Probes and metrics stay open to clients without a certificate.
        let (status, _) = webhook
            .send(hyper::Method::GET, "/readyz", Vec::new())
            .await?;
        ensure!(status == hyper::StatusCode::OK, "/readyz answered {status}");
        let metrics = webhook.metrics().await?;
        ensure!(
            metrics.contains("appset_webhook_errors_total{kind=\"unauthenticated\"} 1"),
            "the refusal was not counted:\n{metrics}"
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    webhook.stop().await?;
    result?;
    ns.cleanup().await;
    Ok(())
}

/// What an abusive client does on its connection.
#[derive(Clone, Copy)]
enum Abuse {
    /// Declares the largest body, sends two thirds of it, then a KiB every 100 ms.
    SlowLargeBody,
    /// Declares a body above the limit.
    Oversized,
    /// Sends bodies just under the limit that are not JSON, one after the other.
    LargeGarbage,
}

async fn abuse(probe: appset_webhook::probe::Probe, how: Abuse, until: Instant) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const MAX_BODY: usize = 3 * 1024 * 1024;
    while Instant::now() < until {
        let Ok(mut tls) = probe.connect_tls().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let declared = match how {
            Abuse::SlowLargeBody => MAX_BODY,
            Abuse::Oversized => 8 * MAX_BODY,
            Abuse::LargeGarbage => MAX_BODY - 1024,
        };
        let head = format!(
            "POST /mutate-pods HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n"
        );
        if tls.write_all(head.as_bytes()).await.is_err() {
            continue;
        }
        match how {
            Abuse::SlowLargeBody => {
                let _ = tls.write_all(&vec![b' '; MAX_BODY / 3 * 2]).await;
                while Instant::now() < until {
                    if tls.write_all(&[b' '; 1024]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Abuse::Oversized | Abuse::LargeGarbage => {
                if matches!(how, Abuse::LargeGarbage) {
                    let _ = tls.write_all(&vec![b'x'; declared]).await;
                }
                let mut buf = [0u8; 256];
                let _ = tokio::time::timeout(Duration::from_secs(12), tls.read(&mut buf)).await;
            }
        }
    }
}

#[tokio::test]
async fn a_webhook_process_under_abuse_stays_within_its_memory_limit_and_answers_the_api_server()
-> Result<()> {
    use appset_e2e::process::{Process, binary, free_port, memory_kib, scratch_dir};
    let ns = enabled_namespace("wh-abuse").await?;
    ns.api::<PodInjection>()
        .create(&PostParams::default(), &git_content()?)
        .await?;
    let port = free_port()?;
    let name = format!("appset-webhook-{}", ns.name);
    let configs: Api<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration> =
        Api::all(ns.client.clone());
    configs
        .create(
            &PostParams::default(),
            &appset_e2e::runners::webhook_configuration(&name, &ns.name, port, false)?,
        )
        .await?;
    let dir = scratch_dir(&ns.name)?;
    let kubeconfig = std::env::var("KUBECONFIG").context("KUBECONFIG")?;
    let listen = format!("127.0.0.1:{port}");
    // The chart's limits: 256 connections, 3 MiB bodies, 64 MiB of bodies, 10 s to send one.
    let mut process = Process::start(
        &binary("appset-webhook")?,
        &[
            "--listen",
            &listen,
            "--cert-secret-namespace",
            &ns.name,
            "--webhook-configuration",
            &name,
            "--watch-namespace",
            &ns.name,
            "--drain-seconds",
            "0",
        ],
        &[("KUBECONFIG", &kubeconfig), ("RUST_LOG", "warn")],
        dir.join("webhook.log"),
    )?;
    let result = async {
        wait_injecting(&ns, &nginx_pod("probe")?).await?;
        let bundle = configs
            .get(&name)
            .await?
            .webhooks
            .into_iter()
            .flatten()
            .find_map(|w| w.client_config.ca_bundle)
            .context("no caBundle")?;
        let probe = appset_webhook::probe::Probe::new(
            listen.parse()?,
            "127.0.0.1",
            &String::from_utf8_lossy(&bundle.0),
        )?;
        let before = memory_kib(process.id(), "VmRSS:").context("no VmRSS")?;
        // 100 slow large bodies (300 MiB declared and 200 MiB sent, against a 64 MiB budget), 20
        // oversized and 30 large garbage senders: 150 connections, for 12 s.
        let until = Instant::now() + Duration::from_secs(12);
        let mut clients = tokio::task::JoinSet::new();
        for (n, how) in [
            (100, Abuse::SlowLargeBody),
            (20, Abuse::Oversized),
            (30, Abuse::LargeGarbage),
        ] {
            for _ in 0..n {
                clients.spawn(abuse(probe.clone(), how, until));
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let stream = PodStream::start(
            ns.api(),
            Duration::from_millis(200),
            stream_pod,
            injected_as_declared,
        );
        tokio::time::sleep(Duration::from_secs(9)).await;
        let report = stream.stop().await?;
        clients.abort_all();
        while clients.join_next().await.is_some() {}
        let peak = memory_kib(process.id(), "VmHWM:").context("no VmHWM")?;
        println!(
            "webhook process under abuse (100 slow 3 MiB bodies, 2 MiB sent, 20 oversized, 30 garbage senders for 12 s): RSS {} MiB before, peak {} MiB; pods through the API server meanwhile: {} attempts, {} admitted and injected, {} failed",
            before / 1024,
            peak / 1024,
            report.attempts(),
            report.admitted,
            report.failed.len()
        );
        ensure_no_failures("pods created during the abuse", &report)?;
        ensure!(report.admitted >= 30, "only {} pods were created", report.admitted);
        // What the limits allow: the body budget (64 MiB) and 24 MiB for connections and
        // parsing over the idle footprint, well inside the chart's 256 Mi. Without the budget
        // the slow senders alone would hold 200 MiB.
        let bound = before + (64 + 24) * 1024;
        ensure!(
            peak < bound,
            "peak RSS {} MiB under abuse, above the {} MiB the limits allow",
            peak / 1024,
            bound / 1024
        );
        ensure!(process.running(), "the webhook exited: {}", process.log_tail());
        Ok::<_, anyhow::Error>(())
    }
    .await;
    process.kill();
    let _ = configs.delete(&name, &Default::default()).await;
    result.with_context(|| format!("webhook log: {}", process.log_tail()))?;
    ns.cleanup().await;
    Ok(())
}
