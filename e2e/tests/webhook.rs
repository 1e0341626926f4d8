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
use appset_e2e::runners::{AppSetController, WEBHOOK_CERT_SECRET as CERT_SECRET, Webhook};
use appset_e2e::{TestNamespace, wait_for};
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

#[tokio::test]
async fn certificate_rotation_during_a_stream_of_pods_loses_no_admission() -> Result<()> {
    let ns = enabled_namespace("wh-rotate").await?;
    ns.api::<PodInjection>()
        .create(&PostParams::default(), &git_content()?)
        .await?;
    // Short lifetimes so that the serving certificate is renewed every few seconds and the CA
    // rotates once during the stream.
    let policy = Policy {
        sans: vec!["127.0.0.1".into()],
        ca_validity: Duration::from_secs(24),
        ca_renew_before: Duration::from_secs(14),
        serving_validity: Duration::from_secs(6),
        serving_renew_before: Duration::from_secs(3),
        promote_after: Duration::from_secs(3),
    };
    let webhook = Webhook::start(&ns, policy, Duration::from_millis(300)).await?;
    let result = async {
        wait_injecting(&ns, &nginx_pod("probe")?).await?;
        let pods = ns.api::<Pod>();
        let secrets = ns.api::<Secret>();
        let mut cas = BTreeSet::new();
        let mut servings = BTreeSet::new();
        let start = Instant::now();
        let mut created = 0usize;
        // Bounded: at most 400 pods or 30 seconds.
        while start.elapsed() < Duration::from_secs(30) && created < 400 {
            let (ca, serving) = current_certs(&secrets).await?;
            cas.insert(ca);
            servings.insert(serving);
            let name = format!("web-{created}");
            let pod = pods
                .create(&PostParams::default(), &nginx_pod(&name)?)
                .await
                .with_context(|| {
                    format!("pod {name} was not admitted after {:?}", start.elapsed())
                })?;
            assert_git_content(&pod).with_context(|| format!("pod {name}"))?;
            created += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "created {created} pods in {:?}; saw {} CAs and {} serving certificates",
            start.elapsed(),
            cas.len(),
            servings.len()
        );
        ensure!(cas.len() >= 2, "the CA never rotated during the stream");
        ensure!(
            servings.len() >= 4,
            "the serving certificate was renewed only {} times",
            servings.len() - 1
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
