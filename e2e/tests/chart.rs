//! The Helm chart on the real control plane: it lints, renders manifests the API server accepts,
//! rejects invalid values with a clear message, and its RBAC is both sufficient (the real
//! operator and webhook binaries run as the chart's ServiceAccounts and do their jobs) and
//! minimal (those accounts are denied what they do not need). Upgrades and uninstalls leave the
//! cluster clean. Leader election hands over between two operator processes. The CRDs are chart
//! templates: `helm upgrade` updates them and `helm uninstall` keeps them (on a control plane of
//! the test's own).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use appset_crds::AppSet;
use appset_e2e::cluster::OwnCluster;
use appset_e2e::fixtures::{appset, baseline, wait_adopted};
use appset_e2e::process::{
    Process, binary, free_port, run, run_ok, scratch_dir, service_account_kubeconfig,
};
use appset_e2e::{TestNamespace, repo_root, wait_for};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, RuleWithOperations, ServiceReference, ValidatingAdmissionPolicy,
};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

fn chart() -> String {
    repo_root()
        .join("charts/appset")
        .to_string_lossy()
        .into_owned()
}

/// `helm template` of the chart as release `dry` in `appset-system` for the e2e control plane's
/// Kubernetes version, with `extra` arguments.
fn render(extra: &[&str]) -> Result<String> {
    let chart = chart();
    let mut args = vec![
        "template",
        "dry",
        &*chart,
        "-n",
        "appset-system",
        "--kube-version",
        "1.37.2",
    ];
    args.extend_from_slice(extra);
    run_ok("helm", &args)
}

#[test]
fn chart_lints_and_renders_what_the_api_server_accepts() -> Result<()> {
    run_ok("helm", &["lint", &chart(), "--strict"])?;
    let variants: [&[&str]; 3] = [
        &[],
        &[
            "--set",
            "watchNamespaces={team-a,team-b}",
            "--set",
            "metrics.serviceMonitor.enabled=false",
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "webhook.url=https://127.0.0.1:9443/mutate-pods",
        ],
        // Config snapshots (the /pin-config entry with its matchCondition, the RBAC) and a
        // client CA for the webhook.
        &[
            "--set",
            "operator.configSnapshots=true",
            "--set",
            "webhook.clientCAConfigMap=apiserver-webhook-client-ca",
        ],
    ];
    let dir = scratch_dir("chart-render")?;
    for (i, extra) in variants.iter().enumerate() {
        // The CRDs are checked below, with a server-side apply (they are too large for a
        // client-side one).
        let mut args = vec!["--set", "crds.install=false"];
        args.extend_from_slice(extra);
        let rendered = render(&args)?;
        let file = dir.join(format!("rendered-{i}.yaml"));
        std::fs::write(&file, &rendered)?;
        // Namespaced objects of other namespaces need those namespaces for the dry run.
        for ns in ["appset-system", "team-a", "team-b"] {
            let _ = run("kubectl", &["create", "namespace", ns]);
        }
        let out = run_ok(
            "kubectl",
            &["apply", "--dry-run=server", "-f", &file.to_string_lossy()],
        )?;
        assert!(out.contains("deployment.apps/dry-appset-operator"), "{out}");
        assert!(out.contains("mutatingwebhookconfiguration"), "{out}");
        for kind in [
            "validatingadmissionpolicy",
            "validatingadmissionpolicybinding",
        ] {
            let object = format!("{kind}.admissionregistration.k8s.io/dry-appset-webhook-guard");
            assert!(out.contains(&object), "{out}");
        }
        // Snapshots: the pin entry, the operator's flag and rights; the client CA mounted.
        let snapshots = i == 2;
        assert_eq!(
            rendered.contains("path: /pin-config"),
            snapshots,
            "variant {i}"
        );
        assert_eq!(
            rendered.contains("--config-snapshots"),
            snapshots,
            "variant {i}"
        );
        assert_eq!(
            rendered.contains("resources: [replicasets]"),
            snapshots,
            "variant {i}"
        );
        assert_eq!(
            rendered.contains("--client-ca-file=/etc/appset/client-ca/ca.crt"),
            snapshots,
            "variant {i}"
        );
    }
    // Without the guard the rest renders as before.
    let unguarded = render(&["--set", "webhook.guardConfiguration=false"])?;
    assert!(unguarded.contains("kind: MutatingWebhookConfiguration"));
    assert!(
        !unguarded.contains("ValidatingAdmissionPolicy"),
        "{unguarded}"
    );

    // The CRDs: rendered from files/crds with the release's labels and the keep policy, accepted
    // by a server-side dry run; none with crds.install=false, no keep with crds.keep=false.
    let crds_only = |extra: &[&str]| -> Result<String> {
        let mut args = vec!["--show-only", "templates/crds.yaml"];
        args.extend_from_slice(extra);
        render(&args)
    };
    let crds = crds_only(&[])?;
    assert_eq!(
        crds.matches("kind: CustomResourceDefinition").count(),
        2,
        "{crds}"
    );
    assert_eq!(crds.matches("helm.sh/resource-policy: keep").count(), 2);
    assert_eq!(
        crds.matches("app.kubernetes.io/managed-by: Helm").count(),
        2
    );
    for name in ["appsets.appset.dev", "podinjections.appset.dev"] {
        let generated = std::fs::read_to_string(
            repo_root().join(format!("charts/appset/files/crds/{name}.yaml")),
        )?;
        let spec = generated
            .split_once("\nspec:\n")
            .map(|(_, spec)| spec)
            .context("a generated CRD without spec")?;
        assert!(
            crds.contains(spec),
            "{name}: the rendered spec differs from the generated one"
        );
    }
    let file = dir.join("rendered-crds.yaml");
    std::fs::write(&file, &crds)?;
    let out = run_ok(
        "kubectl",
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--dry-run=server",
            "-f",
            &file.to_string_lossy(),
        ],
    )?;
    assert!(
        out.contains("customresourcedefinition.apiextensions.k8s.io/appsets.appset.dev"),
        "{out}"
    );
    let unkept = crds_only(&["--set", "crds.keep=false"])?;
    assert_eq!(unkept.matches("kind: CustomResourceDefinition").count(), 2);
    assert!(!unkept.contains("helm.sh/resource-policy"), "{unkept}");
    let none = render(&["--set", "crds.install=false"])?;
    assert!(
        none.contains("kind: Deployment") && !none.contains("kind: CustomResourceDefinition"),
        "crds.install=false: {none}"
    );
    Ok(())
}

#[test]
fn invalid_values_fail_the_install_with_a_clear_message() -> Result<()> {
    let cases = [
        ("operator.replicas=-1", "/operator/replicas"),
        ("webhook.failurePolicy=Sometimes", "/webhook/failurePolicy"),
        ("webhook.timeoutSeconds=90", "/webhook/timeoutSeconds"),
        (
            "webhook.guardConfiguration=maybe",
            "/webhook/guardConfiguration",
        ),
        ("operator.coalesceWindow=soon", "/operator/coalesceWindow"),
    ];
    for (set, field) in cases {
        let out = run(
            "helm",
            &[
                "install",
                "bad",
                &chart(),
                "-n",
                "appset-bad",
                "--dry-run=server",
                "--set",
                set,
            ],
        )?;
        assert!(!out.ok, "{set} was accepted");
        assert!(
            out.text.contains(field),
            "{set}: message does not name {field}: {}",
            out.text
        );
    }
    Ok(())
}

/// Releases of this file get unique names so that tests can run in parallel.
fn release_name(ns: &str) -> String {
    format!("r{}", ns.rsplit('-').next().unwrap_or("x"))
}

fn can_i(sa: &str, args: &[&str]) -> Result<bool> {
    let mut all = vec!["auth", "can-i", "--as", sa];
    all.extend_from_slice(args);
    let out = run("kubectl", &all)?;
    Ok(out.text.trim_start().starts_with("yes"))
}

#[tokio::test]
async fn chart_rbac_is_sufficient_and_minimal_and_uninstall_is_clean() -> Result<()> {
    let release_ns = TestNamespace::new("chart-rbac").await?;
    let workloads =
        TestNamespace::with_labels("chart-wl", &[("appset.dev/injection", "enabled")]).await?;
    let release = release_name(&release_ns.name);
    let webhook_port = free_port()?;
    let operator_port = free_port()?;
    let url = format!("https://127.0.0.1:{webhook_port}/mutate-pods");
    run_ok(
        "helm",
        &[
            "install",
            &release,
            &chart(),
            "-n",
            &release_ns.name,
            // The shared control plane's CRDs come from up.sh, not from a release.
            "--set",
            "crds.install=false",
            "--set",
            &format!("watchNamespaces={{{}}}", workloads.name),
            "--set",
            "operator.enabled=false",
            "--set",
            "webhook.enabled=false",
            "--set",
            &format!("webhook.url={url}"),
            // Pods of other tests' opted-in namespaces must never wait on this test's webhook.
            "--set",
            "webhook.failurePolicy=Ignore",
        ],
    )?;
    let full = format!("{release}-appset");
    let dir = scratch_dir(&release_ns.name)?;
    let op_kc = service_account_kubeconfig(&release_ns.name, &format!("{full}-operator"), &dir)?;
    let wh_kc = service_account_kubeconfig(&release_ns.name, &format!("{full}-webhook"), &dir)?;

    let webhook = Process::start(
        &binary("appset-webhook")?,
        &[
            "--listen",
            &format!("127.0.0.1:{webhook_port}"),
            "--san",
            "127.0.0.1",
            "--webhook-configuration",
            &format!("{full}-webhook"),
            "--watch-namespace",
            &workloads.name,
            "--log-format",
            "text",
        ],
        &[
            ("KUBECONFIG", &wh_kc.to_string_lossy()),
            ("POD_NAMESPACE", &release_ns.name),
        ],
        dir.join("webhook.log"),
    )?;
    let operator = Process::start(
        &binary("appset-operator")?,
        &[
            "--namespaces",
            &workloads.name,
            "--listen",
            &format!("127.0.0.1:{operator_port}"),
            "--leader-elect",
            "--coalesce-window",
            "1s",
            "--min-rollout-interval",
            "1s",
            "--log-format",
            "text",
        ],
        &[
            ("KUBECONFIG", &op_kc.to_string_lossy()),
            ("POD_NAMESPACE", &release_ns.name),
            ("POD_NAME", "rbac-test"),
        ],
        dir.join("operator.log"),
    )?;

    // Config rollout works with the operator's account.
    let cms = workloads.api::<ConfigMap>();
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "cfg"}, "data": {"k": "1"}}))?,
    )
    .await?;
    let deployments = workloads.api::<Deployment>();
    deployments
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "app", "annotations": {"appset.dev/config-rollout": "auto"}},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": "app"}},
                    "template": {"metadata": {"labels": {"app": "app"}}, "spec": {"containers": [{
                        "name": "c", "image": "i", "envFrom": [{"configMapRef": {"name": "cfg"}}]
                    }]}}
                }
            }))?,
        )
        .await?;
    wait_for(
        "the operator to record the baseline",
        Duration::from_secs(60),
        || async {
            let d = deployments.get("app").await?;
            Ok(if baseline(&d).is_some() {
                Ok(())
            } else {
                Err(format!("labels {:?}", d.metadata.labels))
            })
        },
    )
    .await
    .with_context(|| format!("operator log:\n{}", operator.log_tail()))?;
    cms.patch(
        "cfg",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "2"}})),
    )
    .await?;
    let rs = workloads.api::<ReplicaSet>();
    wait_for(
        "a second ReplicaSet after the ConfigMap change",
        Duration::from_secs(60),
        || async {
            let n = rs
                .list(&ListParams::default().labels("app=app"))
                .await?
                .items
                .len();
            Ok(if n >= 2 {
                Ok(())
            } else {
                Err(format!("{n} ReplicaSets"))
            })
        },
    )
    .await
    .with_context(|| format!("operator log:\n{}", operator.log_tail()))?;

    // The AppSet controller works with the operator's account: pods, claims, Service, revisions.
    let sets: kube::Api<appset_crds::AppSet> = workloads.api();
    sets.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "appset.dev/v1alpha1", "kind": "AppSet",
            "metadata": {"name": "db"},
            "spec": {
                "replicas": 2, "serviceName": "db", "service": "Managed",
                "selector": {"matchLabels": {"app": "db"}},
                "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}},
                "volumeClaimTemplates": [{"metadata": {"name": "data"},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]
            }
        }))?,
    )
    .await?;
    wait_for(
        "the AppSet to have 2 ready replicas",
        Duration::from_secs(90),
        || async {
            let st = sets.get("db").await?.status.unwrap_or_default();
            Ok(if st.ready_replicas == 2 {
                Ok(())
            } else {
                Err(format!("status {st:?}"))
            })
        },
    )
    .await
    .with_context(|| format!("operator log:\n{}", operator.log_tail()))?;
    let claims = workloads.api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>();
    for name in ["data-db-0", "data-db-1"] {
        claims
            .get(name)
            .await
            .with_context(|| format!("claim {name}"))?;
    }

    // Injection works with the webhook's account: it wrote its CA into the chart's configuration
    // (past the chart's guard, which lets that account change nothing else there).
    let pis: kube::Api<appset_crds::PodInjection> = workloads.api();
    pis.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "appset.dev/v1alpha1", "kind": "PodInjection",
            "metadata": {"name": "scratch"},
            "spec": {"selector": {"matchLabels": {"inject": "yes"}}, "volumes": [{"name": "scratch", "emptyDir": {}}],
                     "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}
        }))?,
    )
    .await?;
    let pods = workloads.api::<Pod>();
    let injected = wait_for("an injected pod", Duration::from_secs(60), || async {
        let name = format!(
            "p{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis()
        );
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"inject": "yes"}},
            "spec": {"containers": [{"name": "c", "image": "i"}]}
        }))?;
        let created = pods.create(&PostParams::default(), &pod).await?;
        let vols: Vec<String> = created
            .spec
            .and_then(|s| s.volumes)
            .unwrap_or_default()
            .into_iter()
            .map(|v| v.name)
            .collect();
        Ok(if vols.iter().any(|v| v == "scratch") {
            Ok(())
        } else {
            Err(format!("volumes {vols:?}"))
        })
    })
    .await;
    injected.with_context(|| format!("webhook log:\n{}", webhook.log_tail()))?;

    // Minimal: what the accounts must not do.
    let op = format!("system:serviceaccount:{}:{full}-operator", release_ns.name);
    let wh = format!("system:serviceaccount:{}:{full}-webhook", release_ns.name);
    assert!(can_i(
        &op,
        &["patch", "deployments", "-n", &workloads.name]
    )?);
    assert!(can_i(&op, &["get", "secrets", "-n", &workloads.name])?);
    let denied: [(&str, Vec<&str>); 9] = [
        (&op, vec!["get", "secrets", "-n", "kube-system"]),
        (&op, vec!["list", "secrets", "-n", "default"]),
        (&op, vec!["patch", "deployments", "-n", "default"]),
        (
            &op,
            vec!["delete", "persistentvolumeclaims", "-n", &workloads.name],
        ),
        (&op, vec!["create", "customresourcedefinitions"]),
        (&op, vec!["delete", "nodes"]),
        (&wh, vec!["get", "secrets", "-n", "kube-system"]),
        (
            &wh,
            vec![
                "get",
                "secrets/appset-config-hash-key",
                "-n",
                &release_ns.name,
            ],
        ),
        (
            &wh,
            vec!["patch", "mutatingwebhookconfigurations/some-other-webhook"],
        ),
    ];
    for (who, args) in &denied {
        assert!(
            !can_i(who, args)?,
            "{who} may {args:?}, which it does not need"
        );
    }

    // Upgrade with changed values, then uninstall: nothing of the release is left but the CRDs.
    run_ok(
        "helm",
        &[
            "upgrade",
            &release,
            &chart(),
            "-n",
            &release_ns.name,
            "--reuse-values",
            "--set",
            "webhook.timeoutSeconds=12",
        ],
    )?;
    let timeout = run_ok(
        "kubectl",
        &[
            "get",
            "mutatingwebhookconfiguration",
            &format!("{full}-webhook"),
            "-o",
            "jsonpath={.webhooks[0].timeoutSeconds}",
        ],
    )?;
    assert_eq!(timeout.trim(), "12");
    drop(operator);
    drop(webhook);
    run_ok(
        "helm",
        &["uninstall", &release, "-n", &release_ns.name, "--wait"],
    )?;
    let selector = format!("app.kubernetes.io/instance={release}");
    for kind in [
        "clusterroles",
        "clusterrolebindings",
        "mutatingwebhookconfigurations",
        "validatingadmissionpolicies",
        "validatingadmissionpolicybindings",
    ] {
        let left = run_ok("kubectl", &["get", kind, "-l", &selector, "-o", "name"])?;
        assert!(
            left.trim().is_empty(),
            "{kind} left after uninstall: {left}"
        );
    }
    for ns in [&release_ns.name, &workloads.name] {
        let left = run_ok(
            "kubectl",
            &[
                "get",
                "roles,rolebindings,serviceaccounts,services",
                "-n",
                ns,
                "-l",
                &selector,
                "-o",
                "name",
            ],
        )?;
        assert!(left.trim().is_empty(), "objects left in {ns}: {left}");
    }
    run_ok(
        "kubectl",
        &[
            "get",
            "crd",
            "appsets.appset.dev",
            "podinjections.appset.dev",
        ],
    )?;
    release_ns.cleanup().await;
    workloads.cleanup().await;
    Ok(())
}

/// The annotation in which the webhook records which revision of its CA material `caBundle` holds.
const CA_BUNDLE_REVISION: &str = "appset.dev/ca-bundle-revision";

/// Reads the configuration, changes it with `change` and writes it back (a PUT, as the webhook does).
async fn update_configuration(
    api: &Api<MutatingWebhookConfiguration>,
    name: &str,
    change: impl FnOnce(&mut MutatingWebhookConfiguration),
) -> kube::Result<MutatingWebhookConfiguration> {
    let mut cfg = api.get(name).await?;
    change(&mut cfg);
    api.replace(name, &PostParams::default(), &cfg).await
}

/// `Ok` when `result` is the chart's guard denying the request with a message containing
/// `message`; otherwise what happened instead.
fn denied_by_guard<T>(
    result: kube::Result<T>,
    policy: &str,
    message: &str,
) -> std::result::Result<(), String> {
    match result {
        Ok(_) => Err("the change was accepted".to_string()),
        Err(kube::Error::Api(s))
            if s.code == 403
                && s.reason == "Forbidden"
                && s.message
                    .contains(&format!("ValidatingAdmissionPolicy '{policy}'"))
                && s.message.contains(message) =>
        {
            Ok(())
        }
        Err(e) => Err(format!("denied otherwise: {e}")),
    }
}

/// The chart's ValidatingAdmissionPolicy: acting as the webhook's ServiceAccount (impersonated by
/// the admin), only `clientConfig.caBundle` and the CA revision annotation of the webhook's own
/// MutatingWebhookConfiguration can change; every other change is denied with the policy's
/// message, and an admin is not bound by it.
#[tokio::test]
async fn chart_guard_lets_the_webhook_account_change_only_the_ca_bundle() -> Result<()> {
    let release_ns = TestNamespace::new("chart-guard").await?;
    let release = release_name(&release_ns.name);
    // Nothing listens on the URL and failures are ignored, so other tests' pods are not held up
    // while this configuration exists; the admin's change below makes it match no request at all.
    let url = format!("https://127.0.0.1:{}/mutate-pods", free_port()?);
    run_ok(
        "helm",
        &[
            "install",
            &release,
            &chart(),
            "-n",
            &release_ns.name,
            // The shared control plane's CRDs come from up.sh, not from a release.
            "--set",
            "crds.install=false",
            "--set",
            "operator.enabled=false",
            "--set",
            "webhook.enabled=false",
            "--set",
            &format!("webhook.url={url}"),
            "--set",
            "webhook.failurePolicy=Ignore",
        ],
    )?;
    let name = format!("{release}-appset-webhook");
    let policy = format!("{name}-guard");
    let mut config = kube::Config::infer()
        .await
        .context("a client config from KUBECONFIG")?;
    config.auth_info.impersonate =
        Some(format!("system:serviceaccount:{}:{name}", release_ns.name));
    let as_webhook: Api<MutatingWebhookConfiguration> = Api::all(kube::Client::try_from(config)?);
    let as_admin: Api<MutatingWebhookConfiguration> = Api::all(release_ns.client.clone());

    // Every expression compiles against the real types, without a warning.
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(release_ns.client.clone());
    let warnings = wait_for(
        "the policy's type check",
        Duration::from_secs(30),
        || async {
            let checked = policies
                .get(&policy)
                .await?
                .status
                .and_then(|s| s.type_checking);
            Ok(match checked {
                Some(t) => Ok(t.expression_warnings.unwrap_or_default()),
                None => Err("no status.typeChecking yet".to_string()),
            })
        },
    )
    .await?;
    assert!(warnings.is_empty(), "type check warnings: {warnings:?}");

    // The API server loads the policy and its binding through informers: probe with a forbidden
    // change until it is denied. A probe accepted before then only changes a label's value, and
    // every probe sets a new value so that each one is a change.
    let mut probes = 0u32;
    wait_for(
        "the guard to deny the webhook's account a label",
        Duration::from_secs(20),
        || {
            probes += 1;
            let (api, name, policy, value) = (&as_webhook, &name, &policy, probes.to_string());
            async move {
                let result = update_configuration(api, name, |c| {
                    c.metadata
                        .labels
                        .get_or_insert_default()
                        .insert("appset.dev/e2e-probe".to_string(), value);
                })
                .await;
                Ok(denied_by_guard(result, policy, "may not change the labels"))
            }
        },
    )
    .await?;
    eprintln!("the guard denied probe {probes}");

    // The guard binds only the webhook's account: the admin may change the rules (here to a
    // resource that does not exist, so the configuration matches nothing from now on).
    let changed = update_configuration(&as_admin, &name, |c| {
        for w in c.webhooks.iter_mut().flatten() {
            w.rules = Some(vec![RuleWithOperations {
                operations: Some(vec!["CREATE".to_string()]),
                api_groups: Some(vec!["appset.dev".to_string()]),
                api_versions: Some(vec!["v1alpha1".to_string()]),
                resources: Some(vec!["e2e-nothing".to_string()]),
                scope: Some("Namespaced".to_string()),
            }]);
        }
    })
    .await
    .context("the admin changing the rules")?;
    let resources: Vec<String> = changed
        .webhooks
        .iter()
        .flatten()
        .flat_map(|w| w.rules.iter().flatten())
        .flat_map(|r| r.resources.iter().flatten().cloned())
        .collect();
    assert_eq!(resources, ["e2e-nothing"]);

    // Allowed: a new caBundle in every entry with the revision it reflects, twice.
    let mut last_version = None;
    for revision in ["1", "2"] {
        let ca = rcgen::generate_simple_self_signed(vec![format!("rev{revision}.guard.test")])?;
        let bundle = ByteString(ca.cert.pem().into_bytes());
        let written = update_configuration(&as_webhook, &name, |c| {
            for w in c.webhooks.iter_mut().flatten() {
                w.client_config.ca_bundle = Some(bundle.clone());
            }
            c.metadata
                .annotations
                .get_or_insert_default()
                .insert(CA_BUNDLE_REVISION.to_string(), revision.to_string());
        })
        .await
        .with_context(|| format!("the webhook's account writing revision {revision}"))?;
        let hooks = written.webhooks.unwrap_or_default();
        assert!(!hooks.is_empty());
        for w in &hooks {
            assert_eq!(
                w.client_config.ca_bundle.as_ref(),
                Some(&bundle),
                "{}",
                w.name
            );
        }
        let annotations = written.metadata.annotations.unwrap_or_default();
        assert_eq!(
            annotations.get(CA_BUNDLE_REVISION).map(String::as_str),
            Some(revision)
        );
        last_version = written.metadata.resource_version;
    }

    // Denied, each with the message of the validation it breaks.
    type Change = fn(&mut MutatingWebhookConfiguration);
    let not_client_config = "not clientConfig.url or clientConfig.service";
    let cases: [(&str, Change, &str); 12] = [
        (
            "an operation added to the rules",
            |c| {
                for r in c
                    .webhooks
                    .iter_mut()
                    .flatten()
                    .flat_map(|w| w.rules.iter_mut().flatten())
                {
                    r.operations
                        .get_or_insert_default()
                        .push("UPDATE".to_string());
                }
            },
            "not rules",
        ),
        (
            "a namespaceSelector that selects every namespace",
            |c| {
                for w in c.webhooks.iter_mut().flatten() {
                    w.namespace_selector = Some(LabelSelector::default());
                }
            },
            "not namespaceSelector",
        ),
        (
            "another objectSelector",
            |c| {
                for w in c.webhooks.iter_mut().flatten() {
                    w.object_selector = Some(LabelSelector {
                        match_labels: Some(BTreeMap::from([(
                            "app".to_string(),
                            "other".to_string(),
                        )])),
                        ..Default::default()
                    });
                }
            },
            "not objectSelector",
        ),
        (
            "another clientConfig.url",
            |c| {
                for w in c.webhooks.iter_mut().flatten() {
                    w.client_config.url = Some("https://127.0.0.1:1/elsewhere".to_string());
                }
            },
            not_client_config,
        ),
        (
            "a clientConfig.service instead of the url",
            |c| {
                for w in c.webhooks.iter_mut().flatten() {
                    w.client_config.url = None;
                    w.client_config.service = Some(ServiceReference {
                        name: "elsewhere".to_string(),
                        namespace: "default".to_string(),
                        path: Some("/mutate-pods".to_string()),
                        port: Some(443),
                    });
                }
            },
            not_client_config,
        ),
        (
            "failurePolicy Fail",
            |c| {
                for w in c.webhooks.iter_mut().flatten() {
                    w.failure_policy = Some("Fail".to_string());
                }
            },
            "not failurePolicy",
        ),
        (
            "a second webhook entry",
            |c| {
                let first = c.webhooks.iter().flatten().next().cloned();
                if let Some(mut extra) = first {
                    extra.name = "second.injection.appset.dev".to_string();
                    c.webhooks.get_or_insert_default().push(extra);
                }
            },
            "may not add or remove webhook entries",
        ),
        (
            "a new caBundle together with timeoutSeconds 30",
            |c| {
                for w in c.webhooks.iter_mut().flatten() {
                    w.client_config.ca_bundle = Some(ByteString(b"not a CA".to_vec()));
                    w.timeout_seconds = Some(30);
                }
            },
            "not timeoutSeconds",
        ),
        (
            "an owner reference (to a missing owner: the garbage collector would delete it)",
            |c| {
                c.metadata
                    .owner_references
                    .get_or_insert_default()
                    .push(OwnerReference {
                        api_version: "v1".to_string(),
                        kind: "Namespace".to_string(),
                        name: "gone".to_string(),
                        uid: "00000000-0000-0000-0000-000000000000".to_string(),
                        ..Default::default()
                    });
            },
            "may not change the ownerReferences or finalizers",
        ),
        (
            "a finalizer",
            |c| {
                c.metadata
                    .finalizers
                    .get_or_insert_default()
                    .push("appset.dev/e2e".to_string());
            },
            "may not change the ownerReferences or finalizers",
        ),
        (
            "a label",
            |c| {
                c.metadata
                    .labels
                    .get_or_insert_default()
                    .insert("team".to_string(), "x".to_string());
            },
            "may not change the labels",
        ),
        (
            "an annotation other than the CA revision",
            |c| {
                c.metadata
                    .annotations
                    .get_or_insert_default()
                    .insert("appset.dev/other".to_string(), "x".to_string());
            },
            "may change no annotation",
        ),
    ];
    for (what, change, message) in cases {
        let result = update_configuration(&as_webhook, &name, change).await;
        if let Err(seen) = denied_by_guard(result, &policy, message) {
            panic!("{what}: expected the guard's denial naming {message:?}; {seen}");
        }
    }
    let unchanged = as_admin.get(&name).await?;
    assert_eq!(
        unchanged.metadata.resource_version, last_version,
        "a denied change was stored"
    );

    run_ok(
        "helm",
        &["uninstall", &release, "-n", &release_ns.name, "--wait"],
    )?;
    release_ns.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn leader_election_hands_over_and_an_in_flight_rollout_completes() -> Result<()> {
    let home = TestNamespace::new("chart-lease").await?;
    let wl = TestNamespace::new("chart-lease-wl").await?;
    let dir = scratch_dir(&home.name)?;
    let kubeconfig = std::env::var("KUBECONFIG").context("KUBECONFIG")?;
    let start = |id: &str| -> Result<Process> {
        Process::start(
            &binary("appset-operator")?,
            &[
                "--namespaces",
                &wl.name,
                "--listen",
                &format!("127.0.0.1:{}", free_port()?),
                "--leader-elect",
                "--lease-name",
                "appset-e2e",
                "--coalesce-window",
                "3s",
                "--min-rollout-interval",
                "1s",
                "--log-format",
                "text",
            ],
            &[
                ("KUBECONFIG", &kubeconfig),
                ("POD_NAMESPACE", &home.name),
                ("POD_NAME", id),
            ],
            dir.join(format!("{id}.log")),
        )
    };
    let leases = home.api::<Lease>();
    let holder = || async {
        Ok::<_, anyhow::Error>(
            leases
                .get_opt("appset-e2e")
                .await?
                .and_then(|l| l.spec)
                .and_then(|s| s.holder_identity)
                .unwrap_or_default(),
        )
    };
    let mut first = start("first")?;
    wait_for("first to lead", Duration::from_secs(30), || async {
        let h = holder().await?;
        Ok(if h == "first" {
            Ok(())
        } else {
            Err(format!("holder {h:?}"))
        })
    })
    .await?;
    let mut second = start("second")?;

    let cms = wl.api::<ConfigMap>();
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "cfg"}, "data": {"k": "1"}}))?,
    )
    .await?;
    let deployments = wl.api::<Deployment>();
    deployments
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "app", "annotations": {"appset.dev/config-rollout": "auto"}},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "app"}},
                    "template": {"metadata": {"labels": {"app": "app"}}, "spec": {"containers": [{
                        "name": "c", "image": "i", "envFrom": [{"configMapRef": {"name": "cfg"}}]}]}}}
            }))?,
        )
        .await?;
    wait_adopted(&deployments, "app").await?;
    // Only the leader acts: the standby's log shows no reconcile.
    let standby_log = std::fs::read_to_string(&second.log).unwrap_or_default();
    assert!(
        !standby_log.contains("recorded the config baseline"),
        "the standby reconciled:\n{standby_log}"
    );

    // Change the data, then crash the leader inside the coalescing window: the rollout is in
    // flight. The standby takes over within the lease duration and completes it.
    cms.patch(
        "cfg",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "2"}})),
    )
    .await?;
    first.kill();
    let took_over = std::time::Instant::now();
    wait_for("second to lead", Duration::from_secs(40), || async {
        let h = holder().await?;
        Ok(if h == "second" {
            Ok(())
        } else {
            Err(format!("holder {h:?}"))
        })
    })
    .await?;
    eprintln!("handover after {:?}", took_over.elapsed());
    let rs = wl.api::<ReplicaSet>();
    wait_for(
        "the in-flight rollout to complete",
        Duration::from_secs(60),
        || async {
            let items = rs
                .list(&ListParams::default().labels("app=app"))
                .await?
                .items;
            let hashes: BTreeMap<String, i32> = items
                .iter()
                .map(|r| {
                    (
                        r.metadata.name.clone().unwrap_or_default(),
                        r.status.as_ref().map(|s| s.replicas).unwrap_or_default(),
                    )
                })
                .collect();
            Ok(if items.len() >= 2 {
                Ok(())
            } else {
                Err(format!("ReplicaSets {hashes:?}"))
            })
        },
    )
    .await
    .with_context(|| format!("second's log:\n{}", second.log_tail()))?;
    assert!(second.running(), "second exited:\n{}", second.log_tail());
    drop(second);
    home.cleanup().await;
    wl.cleanup().await;
    Ok(())
}

/// The AppSet CRD's name.
const APPSET_CRD: &str = "appsets.appset.dev";

/// A copy of the chart whose AppSet CRD lacks `spec.<field>`: the chart of an earlier version,
/// before that field existed.
fn chart_without(field: &str) -> Result<String> {
    let dir = scratch_dir("chart-crd-old")?.join("appset");
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&repo_root().join("charts/appset"), &dir)?;
    let path = dir.join("files/crds").join(format!("{APPSET_CRD}.yaml"));
    let mut crd: CustomResourceDefinition =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&path)?)?;
    for version in &mut crd.spec.versions {
        let spec = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .and_then(|s| s.properties.as_mut())
            .and_then(|p| p.get_mut("spec"))
            .and_then(|s| s.properties.as_mut())
            .context("the AppSet CRD has no spec schema")?;
        ensure!(
            spec.remove(field).is_some(),
            "the AppSet CRD has no spec.{field}"
        );
    }
    let text = format!(
        "{}{}",
        appset_crds::generate::HEADER,
        serde_yaml_ng::to_string(&crd)?
    );
    std::fs::write(&path, text)?;
    Ok(dir.to_string_lossy().into_owned())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// The spec.progressDeadlineSeconds of AppSet `name` as stored (600, its default, when the
/// field was pruned).
async fn stored_deadline(sets: &Api<AppSet>, name: &str) -> Result<i32> {
    Ok(sets.get(name).await?.spec.progress_deadline_seconds)
}

/// The CRDs are templates of the chart, not its `crds/` directory (which Helm installs once and
/// never upgrades): a field the installed CRD lacks is served after `helm upgrade`, the CRDs
/// carry the release's labels and the keep policy, and `helm uninstall` leaves them, and the
/// AppSets, in place. On a control plane of its own started without the CRDs, since the shared
/// one's CRDs are applied by up.sh and every other test uses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_upgrade_updates_the_crds_and_uninstall_keeps_them() -> Result<()> {
    let cluster = tokio::task::spawn_blocking(|| {
        OwnCluster::up_with("crds", 16640, &[("APPSET_SKIP_CRDS", "1")])
    })
    .await??;
    let kubeconfig = cluster.kubeconfig.to_string_lossy().into_owned();
    let client = cluster.client().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    ensure!(
        crds.get_opt(APPSET_CRD).await?.is_none(),
        "the control plane started with the CRDs"
    );
    let helm = |args: &[&str]| -> Result<String> {
        let mut all = args.to_vec();
        all.extend(["--kubeconfig", &kubeconfig, "-n", "appset-system"]);
        run_ok("helm", &all)
    };
    let components_off = [
        "--set",
        "operator.enabled=false",
        "--set",
        "webhook.enabled=false",
    ];

    let old = chart_without("progressDeadlineSeconds")?;
    let mut install = vec!["install", "crds", &*old, "--create-namespace"];
    install.extend(components_off);
    helm(&install)?;
    let crd = wait_for(
        "the AppSet CRD Established",
        Duration::from_secs(60),
        || async {
            let crd = crds.get_opt(APPSET_CRD).await?;
            let established = crd.as_ref().is_some_and(|c| {
                c.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    })
            });
            Ok(match crd {
                Some(c) if established => Ok(c),
                other => Err(format!("{:?}", other.map(|c| c.status))),
            })
        },
    )
    .await?;
    let annotations = crd.metadata.annotations.clone().unwrap_or_default();
    let labels = crd.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        annotations
            .get("helm.sh/resource-policy")
            .map(String::as_str),
        Some("keep"),
        "{annotations:?}"
    );
    assert_eq!(
        annotations
            .get("meta.helm.sh/release-name")
            .map(String::as_str),
        Some("crds")
    );
    assert_eq!(
        labels
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("Helm")
    );
    ensure!(
        crds.get_opt("podinjections.appset.dev").await?.is_some(),
        "the PodInjection CRD was not installed"
    );

    // The old shape is what is served: the field is pruned.
    let ns = TestNamespace::on(client.clone(), "crd-upgrade", &[]).await?;
    let sets = ns.api::<AppSet>();
    let set = appset("db", 1, json!({"progressDeadlineSeconds": 123}))?;
    wait_for("the AppSet created", Duration::from_secs(30), || async {
        Ok(match sets.create(&PostParams::default(), &set).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e.to_string()),
        })
    })
    .await?;
    assert_eq!(
        stored_deadline(&sets, "db").await?,
        600,
        "the old CRD kept a field it does not have"
    );

    let current = chart();
    let mut upgrade = vec!["upgrade", "crds", &*current];
    upgrade.extend(components_off);
    helm(&upgrade)?;
    // The new shape is served: the field is kept.
    let patch = Patch::Merge(json!({"spec": {"progressDeadlineSeconds": 123}}));
    wait_for(
        "spec.progressDeadlineSeconds served after the upgrade",
        Duration::from_secs(60),
        || async {
            sets.patch("db", &PatchParams::default(), &patch).await?;
            let stored = stored_deadline(&sets, "db").await?;
            Ok(if stored == 123 {
                Ok(())
            } else {
                Err(format!("stored {stored}"))
            })
        },
    )
    .await?;

    // Uninstall keeps the CRDs, so the AppSet (and its pods and claims) live on.
    helm(&["uninstall", "crds", "--wait"])?;
    for name in [APPSET_CRD, "podinjections.appset.dev"] {
        let crd = crds.get_opt(name).await?;
        ensure!(
            crd.is_some_and(|c| c.metadata.deletion_timestamp.is_none()),
            "helm uninstall removed the CRD {name}"
        );
    }
    assert_eq!(stored_deadline(&sets, "db").await?, 123);
    drop(cluster);
    Ok(())
}
