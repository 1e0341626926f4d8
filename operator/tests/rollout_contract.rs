//! Contract tests of config rollout against a fake API server ([`support::Fake`]): the
//! requests one reconcile of a Deployment sends for a baseline, a rollout, an unchanged source
//! and a missing one; that no Secret value is ever sent back to the API server; and that the
//! ConfigMap and Secret watches ask for metadata only; and that workloads deleted during a
//! watch gap leave the index on the next relist.

mod support;

use std::sync::Arc;
use std::time::Duration;

use appset_crds::keys;
use appset_operator::config::controller::{self, Context, Settings};
use appset_operator::config::index::{WorkloadKind, WorkloadRef};
use appset_operator::config::metrics::Metrics;
use appset_operator::config::rollout::Policy;
use appset_operator::confighash::keyring::Keyring;
use appset_operator::confighash::rotation::Observed;
use appset_operator::kubeapi::Scope;
use appset_process::readiness::Readiness;
use k8s_openapi::api::apps::v1::Deployment;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};
use support::{Fake, Running};

const CONFIG_MAPS: &str = "/api/v1/namespaces/ns/configmaps";
const SECRETS: &str = "/api/v1/namespaces/ns/secrets";
const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/ns/deployments";
/// The Secret's value; no request may carry it, in any encoding.
const PASSWORD: &str = "s3cr3t-value-never-sent";

fn deployment() -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "ns", "uid": "web-uid", "resourceVersion": "5",
                     "generation": 1,
                     "annotations": {keys::CONFIG_ROLLOUT: keys::CONFIG_ROLLOUT_AUTO}},
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

fn config_map(value: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "cfg", "namespace": "ns", "resourceVersion": "7"},
           "data": {"greeting": value}})
}

fn secret() -> Value {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(PASSWORD);
    json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": "db", "namespace": "ns", "resourceVersion": "8"},
           "data": {"password": encoded}})
}

struct World {
    fake: Fake,
    ctx: Arc<Context>,
    keyring: Arc<Keyring>,
    running: Running,
}

impl World {
    fn new() -> Self {
        let fake = Fake::new();
        fake.put(DEPLOYMENTS, deployment());
        fake.put(CONFIG_MAPS, config_map("hello"));
        fake.put(SECRETS, secret());
        let running = fake.start();
        let settings = Settings {
            scope: Scope::namespace("ns"),
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
        let keyring = Arc::new(Keyring::generate().expect("a key"));
        let ctx = Arc::new(Context::new(
            running.client.clone(),
            settings,
            keyring.clone(),
            recorder,
            Metrics::default(),
        ));
        Self {
            fake,
            ctx,
            keyring,
            running,
        }
    }

    async fn reconcile(&self) -> Result<(), controller::Error> {
        self.fake.clear();
        let d: Deployment = serde_json::from_value(
            self.fake
                .get(DEPLOYMENTS, "web")
                .expect("the Deployment is stored"),
        )
        .expect("a valid Deployment");
        controller::reconcile(Arc::new(d), self.ctx.clone())
            .await
            .map(|_| ())
    }

    fn annotation(&self, path: &[&str]) -> Option<String> {
        let mut v = self.fake.get(DEPLOYMENTS, "web")?;
        for p in path {
            v = v.get(*p)?.clone();
        }
        v.as_str().map(String::from)
    }

    fn observed(&self) -> Option<String> {
        self.annotation(&["metadata", "labels", keys::CONFIG_BASELINE])
    }

    /// What the source watch does when it sees a source of the Deployment change.
    fn source_changed(&self) {
        self.ctx.source_changed(&WorkloadRef {
            kind: WorkloadKind::Deployment,
            namespace: "ns".into(),
            name: "web".into(),
        });
    }

    fn template_hash(&self) -> Option<String> {
        self.annotation(&[
            "spec",
            "template",
            "metadata",
            "annotations",
            keys::CONFIG_HASH,
        ])
    }

    /// Fails unless the last reconcile only read the two sources.
    fn assert_only_read(&self) {
        assert_eq!(
            self.fake.lines(),
            vec![
                format!("GET {CONFIG_MAPS}/cfg"),
                format!("GET {SECRETS}/db")
            ]
        );
    }

    /// Fails when any request so far carried the Secret's value, plain or base64.
    fn assert_no_secret_value_sent(&self) {
        use base64::Engine;
        let encoded = base64::engine::general_purpose::STANDARD.encode(PASSWORD);
        for r in self.fake.requests() {
            let body = r.body.to_string();
            assert!(
                !body.contains(PASSWORD) && !body.contains(&encoded),
                "{} {} carries the Secret's value: {body}",
                r.method,
                r.path
            );
        }
    }
}

#[tokio::test]
async fn the_first_reconcile_records_a_baseline_with_one_apply_and_no_rollout() {
    let w = World::new();
    w.reconcile().await.expect("the baseline");
    assert_eq!(
        w.fake.lines(),
        vec![
            format!("GET {CONFIG_MAPS}/cfg"),
            format!("GET {SECRETS}/db"),
            format!("PATCH {DEPLOYMENTS}/web"),
        ]
    );
    let apply = w
        .fake
        .requests()
        .into_iter()
        .find(|r| r.method == "PATCH")
        .expect("the apply");
    assert!(apply.content_type.contains("apply-patch"));
    assert!(apply.query.contains("fieldManager=appset.dev%2Foperator"));
    assert!(
        apply.body.get("spec").is_none(),
        "a baseline leaves the pod template alone: {}",
        apply.body
    );
    assert!(w.observed().is_some(), "the baseline is recorded");
    assert_eq!(w.template_hash(), None);
    assert!(w.fake.events().is_empty());
    w.assert_no_secret_value_sent();
}

#[tokio::test]
async fn after_a_source_event_unchanged_sources_are_only_read() {
    let w = World::new();
    w.reconcile().await.expect("the baseline");
    w.source_changed();
    w.reconcile().await.expect("again");
    w.assert_only_read();
}

#[tokio::test]
async fn a_reconcile_that_follows_no_source_event_sends_no_request() {
    let w = World::new();
    w.reconcile().await.expect("the baseline");
    // The echo of the baseline write, or an edit of the Deployment that keeps its references.
    w.reconcile().await.expect("again");
    assert_eq!(w.fake.lines(), Vec::<String>::new());
    // Changed data the watch has not reported yet is read once the event comes.
    w.fake.put(CONFIG_MAPS, config_map("bonjour"));
    w.source_changed();
    w.reconcile().await.expect("after the event");
    assert_eq!(
        w.fake.lines(),
        vec![
            format!("GET {CONFIG_MAPS}/cfg"),
            format!("GET {SECRETS}/db"),
            format!("PATCH {DEPLOYMENTS}/web"),
        ]
    );
}

#[tokio::test]
async fn a_changed_source_rolls_with_one_apply_of_the_template_hash_and_an_event() {
    let w = World::new();
    w.reconcile().await.expect("the baseline");
    let baseline = w.observed();
    w.fake.put(CONFIG_MAPS, config_map("bonjour"));
    w.source_changed();
    w.reconcile().await.expect("the rollout");
    assert_eq!(
        w.fake.lines(),
        vec![
            format!("GET {CONFIG_MAPS}/cfg"),
            format!("GET {SECRETS}/db"),
            format!("PATCH {DEPLOYMENTS}/web"),
        ]
    );
    let hash = w
        .template_hash()
        .expect("the template carries the new hash");
    let written = Observed::parse(&hash).map(|o| o.to_label());
    assert_eq!(
        w.observed(),
        written,
        "the baseline label is the new digest"
    );
    assert_ne!(w.observed(), baseline);
    assert!(
        w.annotation(&["metadata", "annotations", keys::CONFIG_HASH_OBSERVED])
            .is_none(),
        "the legacy annotation is not written"
    );
    assert_eq!(w.fake.events(), ["ConfigChanged"]);
    w.assert_no_secret_value_sent();

    // A second reconcile of the rolled Deployment keeps the hash and writes nothing.
    w.source_changed();
    w.reconcile().await.expect("after the rollout");
    w.assert_only_read();
}

/// The baseline an older appset recorded for the Deployment's sources as stored now: the
/// `config-hash-observed` annotation, a digest over all the data at once.
fn legacy_baseline(w: &World) -> String {
    use appset_operator::confighash::discovery::KeySet;
    use appset_operator::confighash::hash::{self, Source};
    let cm = serde_json::from_value(w.fake.get(CONFIG_MAPS, "cfg").expect("the ConfigMap"))
        .expect("a ConfigMap");
    let secret =
        serde_json::from_value(w.fake.get(SECRETS, "db").expect("the Secret")).expect("a Secret");
    let password = KeySet::Only(["password".to_string()].into());
    let sources = [
        Source::from_config_map(cm, &KeySet::All),
        Source::from_secret(secret, &password),
    ];
    let key = &w.keyring.current;
    Observed {
        key_id: key.id().to_string(),
        digest: hash::digest(key, &sources),
    }
    .to_annotation()
}

#[tokio::test]
async fn an_upgrade_from_the_legacy_annotation_neither_rolls_nor_writes_until_the_data_changes() {
    let w = World::new();
    let mut d = deployment();
    d["metadata"]["annotations"][keys::CONFIG_HASH_OBSERVED] = json!(legacy_baseline(&w));
    w.fake.put(DEPLOYMENTS, d);
    w.reconcile()
        .await
        .expect("the first reconcile after the upgrade");
    w.assert_only_read();
    assert_eq!(
        w.observed(),
        None,
        "nothing is migrated while nothing changes"
    );

    // The data changes: one rollout, onto the label; the annotation is no longer sent.
    w.fake.put(CONFIG_MAPS, config_map("bonjour"));
    w.source_changed();
    w.reconcile().await.expect("the rollout");
    assert_eq!(
        w.fake.lines(),
        vec![
            format!("GET {CONFIG_MAPS}/cfg"),
            format!("GET {SECRETS}/db"),
            format!("PATCH {DEPLOYMENTS}/web"),
        ]
    );
    let hash = w.template_hash().expect("rolled");
    assert_eq!(w.observed(), Observed::parse(&hash).map(|o| o.to_label()));
    assert_eq!(w.fake.events(), ["ConfigChanged"]);
}

#[tokio::test]
async fn a_legacy_annotation_that_no_longer_matches_the_data_rolls_once() {
    let w = World::new();
    let mut d = deployment();
    d["metadata"]["annotations"][keys::CONFIG_HASH_OBSERVED] = json!(legacy_baseline(&w));
    w.fake.put(DEPLOYMENTS, d);
    // Changed while the older appset was being replaced.
    w.fake
        .put(CONFIG_MAPS, config_map("changed during the upgrade"));
    w.reconcile().await.expect("the rollout");
    assert!(w.template_hash().is_some(), "the change was rolled out");
    assert_eq!(w.fake.events(), ["ConfigChanged"]);
}

#[tokio::test]
async fn a_missing_required_source_gives_a_warning_and_no_write() {
    let w = World::new();
    w.reconcile().await.expect("the baseline");
    w.fake.fail(404, |r| {
        r.method == "GET" && r.path.ends_with("/configmaps/cfg")
    });
    w.source_changed();
    w.reconcile()
        .await
        .expect("a missing source is reported, not failed on");
    w.assert_only_read();
    assert_eq!(w.fake.events(), ["MissingConfigSource"]);
    let note = w
        .fake
        .requests()
        .into_iter()
        .find(|r| r.path.contains("/events"))
        .map(|r| r.body["note"].to_string())
        .unwrap_or_default();
    assert!(
        note.contains("ConfigMap cfg") || note.contains("cfg"),
        "{note}"
    );
}

#[tokio::test]
async fn config_map_and_secret_watches_ask_for_metadata_only() {
    let w = World::new();
    let readiness = Readiness::new();
    let ready = readiness.handle("config rollout");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let keyring = Arc::new(Keyring::generate().expect("a key"));
    let settings = Settings {
        scope: Scope::namespace("ns"),
        ..Settings::default()
    };
    let task = tokio::spawn(appset_operator::config::watch::run(
        w.running.client.clone(),
        settings,
        keyring,
        Metrics::default(),
        ready,
        async move {
            let _ = stopped.await;
        },
    ));
    let listed = |path: &'static str| {
        let fake = w.fake.clone();
        move || {
            fake.requests()
                .into_iter()
                .any(|r| r.method == "GET" && r.path == path)
        }
    };
    let (secrets_listed, maps_listed) = (listed(SECRETS), listed(CONFIG_MAPS));
    for _ in 0..200 {
        if secrets_listed() && maps_listed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    let lists: Vec<_> = w
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && (r.path == SECRETS || r.path == CONFIG_MAPS))
        .collect();
    assert!(
        lists.iter().any(|r| r.path == SECRETS) && lists.iter().any(|r| r.path == CONFIG_MAPS),
        "both kinds are listed: {:#?}",
        w.fake.lines()
    );
    for r in &lists {
        assert!(
            r.accept.contains("as=PartialObjectMetadata"),
            "{} {}?{} asks for whole objects (Accept: {:?})",
            r.method,
            r.path,
            r.query,
            r.accept
        );
    }
}

#[tokio::test]
async fn workloads_deleted_while_the_watch_was_down_leave_the_index_on_the_relist() {
    let fake = Fake::new();
    for name in ["a", "b", "c"] {
        let mut d = deployment();
        d["metadata"]["name"] = json!(name);
        d["metadata"]["uid"] = json!(format!("{name}-uid"));
        fake.put(DEPLOYMENTS, d);
    }
    fake.put(CONFIG_MAPS, config_map("hello"));
    fake.put(SECRETS, secret());
    let running = fake.start();
    let metrics = Metrics::default();
    let readiness = Readiness::new();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let settings = Settings {
        scope: Scope::namespace("ns"),
        ..Settings::default()
    };
    let task = tokio::spawn(appset_operator::config::watch::run(
        running.client.clone(),
        settings,
        Arc::new(Keyring::generate().expect("a key")),
        metrics.clone(),
        readiness.handle("config rollout"),
        async move {
            let _ = stopped.await;
        },
    ));
    let indexed = |n: i64| {
        let metrics = metrics.clone();
        async move {
            for _ in 0..500 {
                if metrics.workloads.get() == n {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            false
        }
    };
    assert!(indexed(3).await, "indexed: {}", metrics.workloads.get());
    // Two are deleted; no Delete event ever comes (every watch ends in 410), only relists.
    fake.remove(DEPLOYMENTS, "a");
    fake.remove(DEPLOYMENTS, "b");
    let back = indexed(1).await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    assert!(
        back,
        "still indexed after the relist: {}",
        metrics.workloads.get()
    );
}
