//! Contract test of config snapshots against a fake API server ([`support::Fake`]): the requests
//! one reconcile of a Deployment in snapshot mode sends. The copies are created before the
//! template names them; the template is pinned with one apply; a ReplicaSet that uses the copies
//! becomes their owner in place of the Deployment; a settled Deployment is only read. The
//! Secret's value travels in one request only: the creation of its copy.

mod support;

use std::sync::Arc;
use std::time::Duration;

use appset_crds::keys;
use appset_operator::config::controller::{self, Context, Settings};
use appset_operator::config::metrics::Metrics;
use appset_operator::config::rollout::Policy;
use appset_operator::confighash::keyring::Keyring;
use appset_operator::kubeapi::Scope;
use k8s_openapi::api::apps::v1::Deployment;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};
use support::Fake;

const CONFIG_MAPS: &str = "/api/v1/namespaces/ns/configmaps";
const SECRETS: &str = "/api/v1/namespaces/ns/secrets";
const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/ns/deployments";
const REPLICA_SETS: &str = "/apis/apps/v1/namespaces/ns/replicasets";
const PASSWORD: &str = "s3cr3t-value-of-the-snapshot";

fn deployment() -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "ns", "uid": "web-uid", "resourceVersion": "5",
                     "generation": 1,
                     "annotations": {keys::CONFIG_ROLLOUT: keys::CONFIG_ROLLOUT_SNAPSHOT}},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "app", "image": "app:1",
                    "envFrom": [{"configMapRef": {"name": "cfg"}}],
                    "env": [{"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}]
                }]}
            }
        }
    })
}

fn sources(fake: &Fake) {
    use base64::Engine;
    fake.put(
        CONFIG_MAPS,
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "cfg", "namespace": "ns", "resourceVersion": "7"},
               "data": {"greeting": "hello", "unused": "x"}}),
    );
    fake.put(
        SECRETS,
        json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/basic-auth",
               "metadata": {"name": "db", "namespace": "ns", "resourceVersion": "8"},
               "data": {"password": base64::engine::general_purpose::STANDARD.encode(PASSWORD),
                        "username": base64::engine::general_purpose::STANDARD.encode("app")}}),
    );
}

fn owners(fake: &Fake, collection: &str, name: &str) -> Vec<String> {
    fake.get(collection, name)
        .and_then(|o| o["metadata"]["ownerReferences"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or(""),
                o["uid"].as_str().unwrap_or("")
            )
        })
        .collect()
}

#[tokio::test]
async fn snapshot_mode_copies_before_it_pins_and_hands_the_copies_to_the_replica_set() {
    let fake = Fake::new();
    fake.put(DEPLOYMENTS, deployment());
    sources(&fake);
    let running = fake.start();
    let settings = Settings {
        scope: Scope::namespace("ns"),
        snapshots: true,
        policy: Policy {
            window: Duration::ZERO,
            min_interval: Duration::ZERO,
        },
        ..Settings::default()
    };
    let recorder = Recorder::new(
        running.client.clone(),
        Reporter {
            controller: appset_operator::config::controller::CONTROLLER_NAME.into(),
            instance: None,
        },
    );
    let ctx = Arc::new(Context::new(
        running.client.clone(),
        settings,
        Arc::new(Keyring::generate().expect("a key")),
        recorder,
        Metrics::default(),
    ));
    let reconcile = || async {
        fake.clear();
        let d: Deployment =
            serde_json::from_value(fake.get(DEPLOYMENTS, "web").expect("stored")).expect("valid");
        controller::reconcile(Arc::new(d), ctx.clone())
            .await
            .expect("reconcile");
    };

    // First reconcile: read, create both copies, pin with one apply, look for revisions.
    reconcile().await;
    let copies: Vec<String> = fake
        .names(CONFIG_MAPS)
        .into_iter()
        .filter(|n| n != "cfg")
        .collect();
    let secret_copies: Vec<String> = fake
        .names(SECRETS)
        .into_iter()
        .filter(|n| n != "db")
        .collect();
    let (cm, sec) = match (copies.as_slice(), secret_copies.as_slice()) {
        ([cm], [sec]) => (cm.clone(), sec.clone()),
        other => panic!("expected one copy of each source, got {other:?}"),
    };
    assert!(
        cm.starts_with("cfg-") && sec.starts_with("db-"),
        "{cm} {sec}"
    );
    assert_eq!(
        fake.lines(),
        vec![
            format!("GET {CONFIG_MAPS}/cfg"),
            format!("GET {SECRETS}/db"),
            format!("GET {CONFIG_MAPS}/{cm}"),
            format!("POST {CONFIG_MAPS}"),
            format!("GET {SECRETS}/{sec}"),
            format!("POST {SECRETS}"),
            format!("PATCH {DEPLOYMENTS}/web"),
            format!("GET {REPLICA_SETS}"),
        ]
    );
    let cm_copy = fake.get(CONFIG_MAPS, &cm).expect("the ConfigMap copy");
    assert_eq!(cm_copy["immutable"], json!(true));
    // `envFrom` reads every key of the ConfigMap; the Secret is read through one key only.
    assert_eq!(cm_copy["data"], json!({"greeting": "hello", "unused": "x"}));
    assert_eq!(
        cm_copy["metadata"]["annotations"][keys::SNAPSHOT_OF],
        json!("configmap/cfg")
    );
    let sec_copy = fake.get(SECRETS, &sec).expect("the Secret copy");
    assert_eq!(sec_copy["type"], json!("kubernetes.io/basic-auth"));
    assert_eq!(sec_copy["immutable"], json!(true));
    assert!(
        sec_copy["data"].get("username").is_none(),
        "an unused key was copied"
    );
    assert_eq!(owners(&fake, SECRETS, &sec), ["Deployment/web-uid"]);
    let pins = fake.get(DEPLOYMENTS, "web").expect("stored")["spec"]["template"]["metadata"]
        ["annotations"][keys::CONFIG_SNAPSHOTS]
        .as_str()
        .map(String::from)
        .expect("the template is pinned");
    let pins: Value = serde_json::from_str(&pins).expect("pins are JSON");
    assert_eq!(pins, json!({"configmap/cfg": cm, "secret/db": sec}));
    {
        use base64::Engine;
        let encoded = base64::engine::general_purpose::STANDARD.encode(PASSWORD);
        for r in fake.requests() {
            let body = r.body.to_string();
            let carries = body.contains(PASSWORD) || body.contains(&encoded);
            let copy = r.method == "POST" && r.path == SECRETS;
            assert_eq!(carries, copy, "{} {}: {body}", r.method, r.path);
        }
    }

    // The Deployment's controller made a ReplicaSet from the pinned template: it takes the
    // copies over, and the Deployment lets go.
    let template = fake.get(DEPLOYMENTS, "web").expect("stored")["spec"]["template"].clone();
    fake.put(
        REPLICA_SETS,
        json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
               "metadata": {"name": "web-6d4", "namespace": "ns", "uid": "rs-uid", "resourceVersion": "9",
                            "labels": {"app": "web", "pod-template-hash": "6d4"},
                            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web",
                                                 "uid": "web-uid", "controller": true}]},
               "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": template}}),
    );
    reconcile().await;
    assert_eq!(
        fake.lines(),
        vec![
            format!("GET {CONFIG_MAPS}/cfg"),
            format!("GET {SECRETS}/db"),
            format!("GET {CONFIG_MAPS}/{cm}"),
            format!("GET {SECRETS}/{sec}"),
            format!("GET {REPLICA_SETS}"),
            format!("GET {CONFIG_MAPS}/{cm}"),
            format!("PUT {CONFIG_MAPS}/{cm}"),
            format!("GET {SECRETS}/{sec}"),
            format!("PUT {SECRETS}/{sec}"),
        ]
    );
    let list = fake
        .requests()
        .into_iter()
        .find(|r| r.method == "GET" && r.path == REPLICA_SETS)
        .expect("the ReplicaSet list");
    assert!(
        list.query.contains("labelSelector=app%3Dweb"),
        "the ReplicaSets are listed by the Deployment's selector: {}",
        list.query
    );
    assert_eq!(owners(&fake, CONFIG_MAPS, &cm), ["ReplicaSet/rs-uid"]);
    assert_eq!(owners(&fake, SECRETS, &sec), ["ReplicaSet/rs-uid"]);

    // Settled: only reads.
    reconcile().await;
    assert!(
        fake.lines().iter().all(|l| l.starts_with("GET ")),
        "a settled Deployment was written: {:?}",
        fake.lines()
    );
    drop(running);
}
