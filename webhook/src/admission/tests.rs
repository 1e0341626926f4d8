//! Tests of the wire format and of robustness: any body gets a response or a 400, never a panic.

use super::*;
use appset_crds::keys;
use appset_crds::{PodInjection, PodInjectionSpec};
use proptest::prelude::*;
use serde_json::json;
use std::sync::Arc;

fn review(namespace: &str, pod: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "admin"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
        }
    })
}

fn nginx(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "web-", "namespace": "site", "labels": {"app": "web"}, "annotations": annotations},
        "spec": {"containers": [{"name": "nginx", "image": "nginx:1.27", "terminationMessagePath": "/dev/termination-log"}]}
    })
}

fn injection(ns: &str) -> Arc<PodInjection> {
    let spec: PodInjectionSpec = serde_json::from_value(json!({
        "selector": {"matchLabels": {"app": "web"}},
        "initContainers": [{"name": "git-clone", "image": "alpine/git", "volumeMounts": [{"name": "content", "mountPath": "/work"}]}],
        "volumes": [{"name": "content", "emptyDir": {}}],
        "volumeMounts": [{"name": "content", "mountPath": "/usr/share/nginx/html"}],
    }))
    .expect("spec");
    let mut pi = PodInjection::new("git-content", spec);
    pi.metadata.namespace = Some(ns.into());
    pi.metadata.generation = Some(3);
    Arc::new(pi)
}

fn run(body: &Value) -> (Decision, Value) {
    let bytes = serde_json::to_vec(body).expect("body");
    let (d, out) = respond(&bytes, |_| vec![injection("site")]).expect("a well-formed review");
    (d, serde_json::from_slice(&out).expect("response is JSON"))
}

#[test]
fn patch_is_base64_json_patch_and_uid_is_echoed() {
    let (d, out) = run(&review("site", nginx(json!({}))));
    assert!(matches!(d, Decision::Inject { .. }));
    assert_eq!(out["apiVersion"], API_VERSION);
    assert_eq!(out["kind"], "AdmissionReview");
    let r = &out["response"];
    assert_eq!(r["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(r["allowed"], true);
    assert_eq!(r["patchType"], "JSONPatch");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(r["patch"].as_str().expect("patch is a string"))
        .expect("base64");
    let ops: Value = serde_json::from_slice(&raw).expect("patch is JSON");
    let paths: Vec<&str> = ops
        .as_array()
        .expect("array")
        .iter()
        .map(|o| o["path"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        paths,
        vec![
            "/spec/initContainers",
            "/spec/volumes",
            "/spec/containers/0/volumeMounts",
            "/metadata/annotations/appset.dev~1injected"
        ]
    );
    assert_eq!(ops[3]["value"], "git-content@3");
    assert_eq!(r["auditAnnotations"]["injected"], "git-content@3");
}

#[test]
fn opt_out_and_other_operations_are_untouched() {
    // The API server sent it: the namespace matched the configuration's namespaceSelector, and
    // nothing in the webhook second-guesses that.
    let (d, _) = run(&review("site", nginx(json!({}))));
    assert!(matches!(d, Decision::Inject { .. }));

    let opted_out = nginx(json!({ keys::INJECTION_POD_OPT_OUT: keys::INJECTION_DISABLED }));
    let (d, _) = run(&review("site", opted_out));
    assert!(matches!(
        d,
        Decision::Allow {
            skip: Skip::OptedOut,
            ..
        }
    ));

    // The label form, which the configuration's objectSelector also filters on.
    let mut labelled = nginx(json!({}));
    labelled["metadata"]["labels"][keys::INJECTION_POD_OPT_OUT] = json!(keys::INJECTION_DISABLED);
    let (d, _) = run(&review("site", labelled));
    assert!(matches!(
        d,
        Decision::Allow {
            skip: Skip::OptedOut,
            ..
        }
    ));

    let mut update = review("site", nginx(json!({})));
    update["request"]["operation"] = json!("UPDATE");
    let (d, _) = run(&update);
    assert!(matches!(
        d,
        Decision::Allow {
            skip: Skip::NotPodCreate,
            ..
        }
    ));

    // Another namespace's PodInjection never applies.
    let (d, _) = run(&review("elsewhere", nginx(json!({}))));
    assert!(matches!(
        d,
        Decision::Allow {
            skip: Skip::NothingToDo,
            ..
        }
    ));
}

#[test]
fn conflicts_are_denied_with_403_and_both_sides() {
    let mut pod = nginx(json!({}));
    pod["spec"]["volumes"] = json!([{"name": "content", "configMap": {"name": "site"}}]);
    let (_, out) = run(&review("site", pod));
    let r = &out["response"];
    assert_eq!(r["allowed"], false);
    assert_eq!(r["status"]["code"], 403);
    let msg = r["status"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.starts_with("pod site/web-*: appset injection conflict:"),
        "{msg}"
    );
    assert!(
        msg.contains("volume \"content\" of PodInjection \"git-content\" differs from volume \"content\" of the pod"),
        "{msg}"
    );
}

#[test]
fn malformed_bodies_are_bad_requests() {
    for body in [
        &b""[..],
        b"null",
        b"{}",
        b"[1,2]",
        b"{\"kind\":\"Pod\",\"request\":{\"uid\":\"x\"}}",
        b"{\"request\":{\"uid\":\"\"}}",
        b"{\"request\":{\"uid\":7}}",
        b"\xff\xfe",
    ] {
        assert!(parse(body).is_err(), "{:?}", String::from_utf8_lossy(body));
    }
}

#[test]
fn unreadable_pod_is_denied_as_invalid() {
    let body = review("site", json!({"spec": {"containers": "nope"}}));
    let (d, out) = run(&body);
    assert!(matches!(d, Decision::Invalid { .. }));
    assert_eq!(out["response"]["status"]["code"], 400);
    let mut no_object = review("site", json!(null));
    no_object["request"]
        .as_object_mut()
        .map(|o| o.remove("object"));
    let (d, _) = run(&no_object);
    assert!(matches!(d, Decision::Invalid { .. }));
}

/// Checks the contract for one body: a parse error, or a JSON AdmissionReview response that
/// echoes the uid and carries a decodable patch when it carries one.
fn check_contract(body: &[u8]) -> Result<(), TestCaseError> {
    let lookup = |_: &str| vec![injection("site")];
    check_answer(respond(body, lookup).map(|(_, out)| out), "add")?;
    check_answer(respond_pin(body).map(|(_, out)| out), "replace")
}

/// A response (or a 400) of the expected shape, whose patch has only `op` operations.
fn check_answer(answer: Result<Vec<u8>, BadRequest>, op: &str) -> Result<(), TestCaseError> {
    match answer {
        Err(BadRequest(msg)) => prop_assert!(!msg.is_empty()),
        Ok(out) => {
            let v: Value = serde_json::from_slice(&out)
                .map_err(|e| TestCaseError::fail(format!("response not JSON: {e}")))?;
            prop_assert_eq!(&v["kind"], "AdmissionReview");
            let r = &v["response"];
            prop_assert!(r["uid"].as_str().is_some_and(|u| !u.is_empty()));
            prop_assert!(r["allowed"].is_boolean());
            if let Some(p) = r.get("patch") {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(p.as_str().unwrap_or_default())
                    .map_err(|e| TestCaseError::fail(format!("patch not base64: {e}")))?;
                let ops: Vec<Value> = serde_json::from_slice(&raw)
                    .map_err(|e| TestCaseError::fail(format!("patch not JSON: {e}")))?;
                prop_assert!(ops.iter().all(|o| o["op"] == op));
            }
        }
    }
    Ok(())
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        "[a-zA-Z0-9/~._-]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("metadata".to_string()),
                    Just("spec".to_string()),
                    Just("containers".to_string()),
                    Just("initContainers".to_string()),
                    Just("volumes".to_string()),
                    Just("volumeMounts".to_string()),
                    Just("annotations".to_string()),
                    Just("labels".to_string()),
                    Just("name".to_string()),
                    "[a-z/~]{1,6}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        check_contract(&body)?;
    }

    #[test]
    fn arbitrary_objects_in_a_valid_envelope_never_panic(object in arb_json()) {
        let body = serde_json::to_vec(&review("site", object)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        check_contract(&body)?;
    }

    #[test]
    fn arbitrary_pod_parts_never_panic(
        spec in arb_json(),
        annotations in arb_json(),
        labels in prop_oneof![Just(json!({"app": "web"})), arb_json()],
    ) {
        let pod = json!({"metadata": {"labels": labels, "annotations": annotations}, "spec": spec});
        let body = serde_json::to_vec(&review("site", pod)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        check_contract(&body)?;
    }

    #[test]
    fn arbitrary_envelopes_never_panic(request in arb_json()) {
        let body = serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        check_contract(&body)?;
    }
}

fn arb_pod() -> impl Strategy<Value = Value> {
    let names = prop::sample::select(vec!["nginx", "app", "git-clone", "warm", "sidecar"]);
    let vols = prop::sample::select(vec!["content", "cache", "data"]);
    let paths = prop::sample::select(vec!["/usr/share/nginx/html", "/cache", "/data", "/work"]);
    let mount = (vols.clone(), paths.clone()).prop_map(|(n, p)| json!({"name": n, "mountPath": p}));
    let container = (
        names.clone(),
        prop::option::of(prop::collection::vec(mount, 0..3)),
    )
        .prop_map(|(n, m)| match m {
            Some(m) => json!({"name": n, "image": "img", "volumeMounts": m}),
            None => json!({"name": n, "image": "img"}),
        });
    let volume = (vols, any::<bool>()).prop_map(|(n, empty)| {
        if empty {
            json!({"name": n, "emptyDir": {}})
        } else {
            json!({"name": n, "configMap": {"name": n}})
        }
    });
    (
        prop::collection::vec(container.clone(), 1..3),
        prop::option::of(prop::collection::vec(container, 0..2)),
        prop::option::of(prop::collection::vec(volume, 0..3)),
        prop::option::of(prop::collection::btree_map(
            "[a-z/~.]{1,8}",
            "[a-z]{0,4}",
            0..3,
        )),
    )
        .prop_map(|(containers, init, volumes, annotations)| {
            let mut spec = json!({"containers": containers});
            if let Some(i) = init {
                spec["initContainers"] = json!(i);
            }
            if let Some(v) = volumes {
                spec["volumes"] = json!(v);
            }
            let mut meta = json!({"name": "p", "labels": {"app": "web"}});
            if let Some(a) = annotations {
                meta["annotations"] = json!(a);
            }
            json!({"metadata": meta, "spec": spec})
        })
}

fn arb_injection() -> impl Strategy<Value = Arc<PodInjection>> {
    (
        prop::sample::select(vec!["a", "b", "c"]),
        prop::sample::select(vec!["git-clone", "warm", "seed"]),
        prop::sample::select(vec!["content", "cache"]),
        prop::sample::select(vec!["/usr/share/nginx/html", "/cache", "/work"]),
        any::<bool>(),
        prop::option::of(prop::sample::select(vec!["nginx", "app", "ghost"])),
    )
        .prop_map(|(name, init, vol, path, last, target)| {
            let spec: PodInjectionSpec = serde_json::from_value(json!({
                "selector": {},
                "initContainerPlacement": if last { "Last" } else { "First" },
                "initContainers": [{"name": init, "image": "img"}],
                "volumes": [{"name": vol, "emptyDir": {}}],
                "volumeMounts": [{"name": vol, "mountPath": path, "containers": target.into_iter().collect::<Vec<_>>()}],
            }))
            .unwrap_or_else(|e| panic!("spec: {e}"));
            let mut pi = PodInjection::new(name, spec);
            pi.metadata.namespace = Some("site".into());
            pi.metadata.generation = Some(1);
            Arc::new(pi)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Over random pod shapes and PodInjections: a patch always applies to the pod, yields a
    /// readable Pod, only adds, and a second review of the patched pod changes nothing.
    #[test]
    fn patches_apply_and_a_second_pass_changes_nothing(
        pod in arb_pod(),
        injections in prop::collection::vec(arb_injection(), 0..3),
    ) {
        let body = serde_json::to_vec(&review("site", pod.clone())).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let (decision, _) = respond(&body, |_| injections.clone())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        if let Decision::Inject { ops, .. } = decision {
            let mut patched = pod.clone();
            crate::patch::apply(&mut patched, &ops).map_err(TestCaseError::fail)?;
            let _: Pod = serde_json::from_value(patched.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let again = serde_json::to_vec(&review("site", patched)).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let (second, _) = respond(&again, |_| injections.clone())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(matches!(second, Decision::Allow { skip: Skip::NothingToDo, .. }), "{second:?}");
        }
    }
}

// --- /pin-config ---

fn pinned_pod(annotation: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "web-", "namespace": "site", "labels": {"app": "web"},
                     "annotations": {keys::CONFIG_SNAPSHOTS: annotation}},
        "spec": {
            "containers": [{"name": "app", "image": "app:1", "envFrom": [{"configMapRef": {"name": "app-config"}}]}],
            "volumes": [{"name": "db", "secret": {"secretName": "db"}}],
        }
    })
}

fn run_pin(body: &Value) -> (PinDecision, Value) {
    let bytes = serde_json::to_vec(body).expect("body");
    let (d, out) = respond_pin(&bytes).expect("a well-formed review");
    (d, serde_json::from_slice(&out).expect("response is JSON"))
}

#[test]
fn pin_answers_with_a_replace_patch_and_never_injects() {
    let annotation =
        r#"{"configmap/app-config":"app-config-7f3a9c21e4","secret/db":"db-0b4e99d2aa"}"#;
    let (d, out) = run_pin(&review("site", pinned_pod(annotation)));
    assert!(matches!(d, PinDecision::Pin { .. }), "{d:?}");
    let r = &out["response"];
    assert_eq!(r["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(r["allowed"], true);
    assert_eq!(r["patchType"], "JSONPatch");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(r["patch"].as_str().expect("patch is a string"))
        .expect("base64");
    let ops: Value = serde_json::from_slice(&raw).expect("patch is JSON");
    assert_eq!(
        ops,
        json!([
            {"op": "replace", "path": "/spec/containers/0/envFrom/0/configMapRef/name", "value": "app-config-7f3a9c21e4"},
            {"op": "replace", "path": "/spec/volumes/0/secret/secretName", "value": "db-0b4e99d2aa"},
        ])
    );
}

#[test]
fn pin_allows_unchanged_what_it_has_nothing_to_do_for() {
    let (d, out) = run_pin(&review("site", nginx(json!({}))));
    assert_eq!(
        d,
        PinDecision::Allow {
            uid: "705ab4f5-6393-11e8-b7cc-42010a800002".into(),
            skip: PinSkip::NoAnnotation
        }
    );
    assert!(out["response"].get("patch").is_none());
    let (d, _) = run_pin(&review(
        "site",
        pinned_pod(r#"{"configmap/other":"other-1"}"#),
    ));
    assert!(
        matches!(
            d,
            PinDecision::Allow {
                skip: PinSkip::NothingToDo,
                ..
            }
        ),
        "{d:?}"
    );
    let mut update = review("site", pinned_pod("garbage"));
    update["request"]["operation"] = json!("UPDATE");
    let (d, out) = run_pin(&update);
    assert!(
        matches!(
            d,
            PinDecision::Allow {
                skip: PinSkip::NotPodCreate,
                ..
            }
        ),
        "{d:?}"
    );
    assert_eq!(out["response"]["allowed"], true);
}

#[test]
fn pin_denies_a_malformed_annotation_with_400_dry_run_or_not() {
    for dry_run in [false, true] {
        let mut body = review(
            "site",
            pinned_pod(r#"{"configmap/app-config":"Not_A_Name"}"#),
        );
        body["request"]["dryRun"] = json!(dry_run);
        let (d, out) = run_pin(&body);
        assert!(
            matches!(d, PinDecision::Deny { dry_run: dr, .. } if dr == dry_run),
            "{d:?}"
        );
        let r = &out["response"];
        assert_eq!(r["allowed"], false);
        assert_eq!(r["status"]["code"], 400);
        let message = r["status"]["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("pod site/web-*: annotation appset.dev/config-snapshots is malformed: snapshot name \"Not_A_Name\""),
            "{message}"
        );
        assert!(r.get("patch").is_none());
    }
    let (d, _) = run_pin(&review("site", json!({"spec": {"containers": 5}})));
    assert!(matches!(d, PinDecision::Invalid { .. }), "{d:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_snapshot_annotations_never_panic(
        annotation in prop_oneof![
            "[ -~]{0,40}",
            arb_json().prop_map(|v| v.to_string()),
        ],
    ) {
        let body = serde_json::to_vec(&review("site", pinned_pod(&annotation)))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        check_contract(&body)?;
    }
}
