//! Contract tests of the AppSet reconcile against a fake API server ([`support::Fake`]): the
//! exact requests one reconcile sends, in order, and the preconditions each carries. The e2e
//! suite proves the behaviour on a real control plane; these pin the I/O contract, so that a
//! reordered write or a dropped `uid`/`resourceVersion` precondition fails here first.
//!
//! Every test runs with `burst: 1`, so that the requests of one step are sent one at a time
//! and their order is fixed.

mod support;

use std::sync::Arc;

use appset_crds::AppSet;
use appset_operator::appset::controller::{self, Context, Settings};
use appset_operator::confighash::keyring::Keyring;
use appset_operator::kubeapi::Scope;
use serde_json::{Value, json};
use support::{Fake, Running};

const PODS: &str = "/api/v1/namespaces/ns/pods";
const CLAIMS: &str = "/api/v1/namespaces/ns/persistentvolumeclaims";
const REVISIONS: &str = "/apis/apps/v1/namespaces/ns/controllerrevisions";
const SETS: &str = "/apis/appset.dev/v1alpha1/namespaces/ns/appsets";
const CLASSES: &str = "/apis/storage.k8s.io/v1/storageclasses";

/// The AppSet `web` in namespace `ns`: two Parallel nginx pods with a 1Gi `data` claim each;
/// `spec` is merged in.
fn appset_json(spec: Value) -> Value {
    let mut base = json!({
        "replicas": 2,
        "serviceName": "web",
        "podManagementPolicy": "Parallel",
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "main", "image": "nginx:1.27",
                "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}
        },
        "volumeClaimTemplates": [{
            "metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                     "resources": {"requests": {"storage": "1Gi"}}}
        }]
    });
    support::merge_json(&mut base, &spec);
    json!({
        "apiVersion": "appset.dev/v1alpha1", "kind": "AppSet",
        "metadata": {"name": "web", "namespace": "ns", "uid": "set-uid", "generation": 1,
                     "resourceVersion": "10"},
        "spec": base
    })
}

struct World {
    fake: Fake,
    ctx: Arc<Context>,
    _running: Running,
}

impl World {
    /// A fake holding the AppSet and an expandable StorageClass `fast`.
    fn new(spec: Value) -> Self {
        let fake = Fake::new();
        fake.put(SETS, appset_json(spec));
        fake.put(
            CLASSES,
            json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                   "metadata": {"name": "fast"}, "provisioner": "example.com/fast",
                   "allowVolumeExpansion": true}),
        );
        let running = fake.start();
        let settings = Settings {
            scope: Scope::namespace("ns"),
            burst: 1,
            ..Settings::default()
        };
        let keyring = Arc::new(Keyring::generate().expect("a key"));
        let ctx = Arc::new(Context::new(running.client.clone(), settings, keyring));
        Self {
            fake,
            ctx,
            _running: running,
        }
    }

    /// The default AppSet created, its pods Ready and claims Bound, and the status written
    /// for that: the state a rollout or an expansion starts from.
    async fn settled() -> Self {
        let w = Self::new(json!({}));
        w.reconcile().await.expect("create");
        w.settle();
        w.reconcile().await.expect("settle the status");
        w
    }

    /// The AppSet as the fake holds it (with the status the last reconcile wrote).
    fn set(&self) -> AppSet {
        serde_json::from_value(self.fake.get(SETS, "web").expect("the AppSet is stored"))
            .expect("a valid AppSet")
    }

    /// Changes the stored AppSet's spec and bumps its generation, as an edit would.
    fn edit(&self, spec: Value) {
        let mut set = self.fake.get(SETS, "web").expect("the AppSet is stored");
        support::merge_json(&mut set, &json!({"spec": spec}));
        let generation = set["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
        set["metadata"]["generation"] = json!(generation);
        self.fake.put(SETS, set);
    }

    /// One reconcile of the stored AppSet; the recorded requests are cleared first.
    async fn reconcile(&self) -> Result<(), controller::Error> {
        self.fake.clear();
        controller::reconcile(Arc::new(self.set()), self.ctx.clone())
            .await
            .map(|_| ())
    }

    /// Marks every pod Running and Ready since long ago, and every claim Bound, as the
    /// kubelet and the volume controller would.
    fn settle(&self) {
        for name in self.fake.names(PODS) {
            let mut pod = self.fake.get(PODS, &name).expect("listed");
            support::merge_json(
                &mut pod,
                &json!({"status": {"phase": "Running", "conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
                ]}}),
            );
            self.fake.put(PODS, pod);
        }
        for name in self.fake.names(CLAIMS) {
            let mut claim = self.fake.get(CLAIMS, &name).expect("listed");
            let size = claim["spec"]["resources"]["requests"]["storage"].clone();
            support::merge_json(
                &mut claim,
                &json!({"status": {"phase": "Bound", "capacity": {"storage": size}}}),
            );
            self.fake.put(CLAIMS, claim);
        }
    }

    /// The requests of the last reconcile, Events left out, as `"METHOD path"`.
    fn lines(&self) -> Vec<String> {
        self.fake.lines()
    }

    fn request(&self, method: &str, path: &str) -> support::Request {
        self.fake
            .requests()
            .into_iter()
            .find(|r| r.method == method && r.path == path)
            .unwrap_or_else(|| panic!("no {method} {path} in {:#?}", self.lines()))
    }
}

fn revision_of(fake: &Fake, pod: &str) -> String {
    fake.get(PODS, pod).expect("the pod exists")["metadata"]["labels"]["controller-revision-hash"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn scale_up_creates_the_revision_then_each_claim_before_the_pods_then_the_status() {
    let w = World::new(json!({}));
    w.reconcile().await.expect("the reconcile succeeds");
    let revision = w
        .fake
        .names(REVISIONS)
        .pop()
        .expect("a revision was created");
    assert_eq!(
        w.lines(),
        vec![
            format!("GET {SETS}/web"),
            format!("GET {REVISIONS}"),
            format!("POST {REVISIONS}"),
            format!("GET {PODS}"),
            format!("GET {CLAIMS}"),
            format!("POST {CLAIMS}"),
            format!("POST {CLAIMS}"),
            format!("POST {PODS}"),
            format!("POST {PODS}"),
            format!("PATCH {SETS}/web/status"),
        ]
    );
    let creates: Vec<String> = w
        .fake
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && (r.path == PODS || r.path == CLAIMS))
        .map(|r| {
            r.body["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(creates, ["data-web-0", "data-web-1", "web-0", "web-1"]);
    let pods = w.request("GET", PODS);
    assert!(
        pods.query.contains("limit=500"),
        "pods are listed a page at a time: {}",
        pods.query
    );

    let pod = w.request("POST", PODS).body;
    let owner = &pod["metadata"]["ownerReferences"][0];
    assert_eq!(owner["uid"], "set-uid");
    assert_eq!(owner["controller"], true);
    assert_eq!(
        pod["metadata"]["labels"]["controller-revision-hash"],
        revision.as_str()
    );
    assert_eq!(
        pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "data-web-0"
    );
    let status = w.request("PATCH", &format!("{SETS}/web/status"));
    assert!(
        status.content_type.contains("apply-patch"),
        "{}",
        status.content_type
    );
    assert!(status.query.contains("force=true"), "{}", status.query);
    assert!(
        status.query.contains("fieldManager=appset.dev%2Foperator"),
        "{}",
        status.query
    );
    assert_eq!(status.body["status"]["updateRevision"], revision.as_str());
    assert_eq!(
        w.fake.events(),
        ["SuccessfulCreate", "SuccessfulCreate"],
        "one Event per created claim and pod (the second of each kind joins a series)"
    );
}

#[tokio::test]
async fn a_settled_set_reads_only_and_does_not_rewrite_an_unchanged_status() {
    let w = World::new(json!({}));
    w.reconcile().await.expect("first reconcile");
    w.settle();
    w.reconcile().await.expect("second reconcile");
    assert!(
        w.lines().last().is_some_and(|l| l.ends_with("/status")),
        "the status changed (pods became Ready), so it is written: {:#?}",
        w.lines()
    );
    w.reconcile().await.expect("third reconcile");
    assert_eq!(
        w.lines(),
        vec![
            format!("GET {SETS}/web"),
            format!("GET {REVISIONS}"),
            format!("GET {PODS}"),
            format!("GET {CLAIMS}"),
        ],
        "nothing changed: only reads, no status write"
    );
}

#[tokio::test]
async fn a_rolling_update_step_deletes_the_highest_old_pod_guarded_by_its_uid() {
    let w = World::settled().await;
    let old = revision_of(&w.fake, "web-1");
    w.edit(
        json!({"template": {"spec": {"containers": [{"name": "main", "image": "nginx:1.28",
        "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}}}),
    );
    w.reconcile().await.expect("the rolling step");
    assert_eq!(
        w.lines(),
        vec![
            format!("GET {SETS}/web"),
            format!("GET {REVISIONS}"),
            format!("POST {REVISIONS}"),
            format!("GET {PODS}"),
            format!("GET {CLAIMS}"),
            format!("DELETE {PODS}/web-1"),
            format!("PATCH {SETS}/web/status"),
        ],
        "maxUnavailable 1: one pod, the highest ordinal; no StorageClass read while claims fit"
    );
    let delete = w.request("DELETE", &format!("{PODS}/web-1"));
    assert_eq!(
        delete.body["preconditions"]["uid"], "uid-web-1",
        "a pod delete is guarded by the uid that was planned on"
    );
    assert_eq!(revision_of(&w.fake, "web-0"), old, "web-0 waits its turn");
    assert_eq!(w.fake.events(), ["SuccessfulDelete"]);
}

#[tokio::test]
async fn a_guarded_delete_that_finds_the_pod_gone_or_replaced_is_not_an_error() {
    // 404: the pod went away between the list and the delete; 409: it was deleted and
    // recreated under the same name with another uid, so the precondition failed.
    for status in [404, 409] {
        let w = World::settled().await;
        w.edit(json!({"template": {"metadata": {"labels": {"app": "web", "tier": "b"}}}}));
        w.fake.fail(status, |r| {
            r.method == "DELETE" && r.path.ends_with("/pods/web-1")
        });
        w.reconcile()
            .await
            .unwrap_or_else(|e| panic!("a {status} on a guarded delete is tolerated: {e}"));
        assert!(w.lines().contains(&format!("DELETE {PODS}/web-1")));
        assert!(
            w.fake.events().is_empty(),
            "{status}: no SuccessfulDelete for a delete that did not happen: {:?}",
            w.fake.events()
        );
    }
}

#[tokio::test]
async fn a_pod_name_taken_by_another_owner_gets_an_event_not_an_error() {
    let w = World::new(json!({}));
    w.fake.fail(409, |r| {
        r.method == "POST" && r.path.ends_with("/pods") && r.body["metadata"]["name"] == "web-1"
    });
    w.reconcile()
        .await
        .expect("a name taken by a pod of someone else is reported, not an error");
    assert_eq!(
        w.fake.events(),
        ["SuccessfulCreate", "SuccessfulCreate", "PodNameTaken"]
    );
}

#[tokio::test]
async fn raising_a_claim_template_expands_bound_claims_with_a_resource_version_precondition() {
    let w = World::settled().await;
    w.edit(
        json!({"volumeClaimTemplates": [{"metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                 "resources": {"requests": {"storage": "2Gi"}}}}]}),
    );
    let rv0 =
        w.fake.get(CLAIMS, "data-web-0").expect("claim")["metadata"]["resourceVersion"].clone();
    w.reconcile().await.expect("expand");
    assert_eq!(
        w.lines(),
        vec![
            format!("GET {SETS}/web"),
            format!("GET {REVISIONS}"),
            format!("GET {PODS}"),
            format!("GET {CLAIMS}"),
            format!("GET {CLASSES}/fast"),
            format!("PATCH {CLAIMS}/data-web-0"),
            format!("PATCH {CLAIMS}/data-web-1"),
            format!("PATCH {SETS}/web/status"),
        ]
    );
    let patch = w.request("PATCH", &format!("{CLAIMS}/data-web-0"));
    assert_eq!(
        patch.body["spec"]["resources"]["requests"]["storage"],
        "2Gi"
    );
    assert_eq!(
        patch.body["metadata"]["resourceVersion"], rv0,
        "an expansion applies to the claim that was read, or to none"
    );
}

#[tokio::test]
async fn a_claim_changed_since_it_was_read_is_not_expanded_blindly() {
    let w = World::settled().await;
    w.edit(
        json!({"volumeClaimTemplates": [{"metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                 "resources": {"requests": {"storage": "2Gi"}}}}]}),
    );
    w.fake.fail(409, |r| {
        r.method == "PATCH" && r.path.ends_with("/data-web-0")
    });
    w.reconcile()
        .await
        .expect("a refused expansion is reported in the status, not failed on");
    let patches: Vec<_> = w
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.starts_with(CLAIMS))
        .collect();
    assert_eq!(
        patches.len(),
        2,
        "both claims are tried once: {:#?}",
        w.lines()
    );
    for r in &patches {
        assert!(
            r.body["metadata"]["resourceVersion"].is_string(),
            "unguarded claim patch: {r:?}"
        );
    }
    let expanded = w.fake.get(CLAIMS, "data-web-1").expect("claim");
    assert_eq!(expanded["spec"]["resources"]["requests"]["storage"], "2Gi");
    assert_eq!(
        w.fake.events(),
        ["ExpandingClaim", "VolumeClaimTemplateNotApplied"],
        "the other claim expands; the refusal is a Warning"
    );
    let set = w.set();
    let template = &set.status.expect("a status").volume_claim_templates[0];
    assert!(
        template
            .message
            .as_deref()
            .is_some_and(|m| m.contains("data-web-0")),
        "{template:?}"
    );
}

#[tokio::test]
async fn claims_are_listed_by_the_set_label_and_an_unlabelled_one_is_adopted_on_create() {
    let w = World::new(json!({}));
    // A claim left by a StatefulSet of the same name: right name, no label. Another claim of
    // the namespace, not the set's.
    w.fake.put(
        CLAIMS,
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": "data-web-0", "namespace": "ns", "uid": "old-claim",
                            "resourceVersion": "3"},
               "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                        "resources": {"requests": {"storage": "1Gi"}}}}),
    );
    w.reconcile().await.expect("the reconcile succeeds");
    let list = w
        .fake
        .requests()
        .into_iter()
        .find(|r| r.method == "GET" && r.path == CLAIMS)
        .expect("a claim list");
    assert!(
        list.query
            .contains("labelSelector=appset.dev%2Fappset%3Dweb"),
        "{}",
        list.query
    );
    assert_eq!(
        w.lines(),
        vec![
            format!("GET {SETS}/web"),
            format!("GET {REVISIONS}"),
            format!("POST {REVISIONS}"),
            format!("GET {PODS}"),
            format!("GET {CLAIMS}"),
            format!("POST {CLAIMS}"),
            format!("GET {CLAIMS}/data-web-0"),
            format!("PATCH {CLAIMS}/data-web-0"),
            format!("POST {CLAIMS}"),
            format!("POST {PODS}"),
            format!("POST {PODS}"),
            format!("PATCH {SETS}/web/status"),
        ],
        "the existing claim is taken over, not recreated"
    );
    let adopted = w.fake.get(CLAIMS, "data-web-0").expect("the claim");
    assert_eq!(adopted["metadata"]["uid"], "old-claim");
    assert_eq!(adopted["metadata"]["labels"]["appset.dev/appset"], "web");
    let patch = w.request("PATCH", &format!("{CLAIMS}/data-web-0"));
    assert_eq!(patch.body["metadata"]["resourceVersion"], "3");
    assert!(w.fake.events().contains(&"AdoptedClaim".to_string()));
}
