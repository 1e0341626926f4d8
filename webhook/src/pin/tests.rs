//! Unit tests of the annotation's checks and of each reference kind, and a property test over
//! generated pods: the patch applies, rewrites exactly the references that name a source of
//! their kind (checked against an independent walk of the pod's JSON), and a second pass does
//! nothing.

use super::*;
use crate::patch;
use proptest::prelude::*;
use serde_json::json;

fn pod_json(annotation: Option<&str>, spec: Value) -> Value {
    let mut pod = json!({"metadata": {"name": "web", "namespace": "site"}, "spec": spec});
    if let Some(a) = annotation {
        pod["metadata"]["annotations"] = json!({ CONFIG_SNAPSHOTS: a, "other": "x" });
    }
    pod
}

fn read(v: &Value) -> Pod {
    serde_json::from_value(v.clone()).expect("a readable pod")
}

fn malformed(annotation: &str) -> String {
    match pin(&read(&pod_json(
        Some(annotation),
        json!({"containers": [{"name": "c"}]}),
    ))) {
        Pin::Malformed(m) => m.to_string(),
        other => panic!("{annotation}: expected a malformed annotation, got {other:?}"),
    }
}

const MAP: &str = r#"{"configmap/app-config":"app-config-7f3a9c21e4","secret/db":"db-0b4e99d2aa"}"#;

/// A pod with every kind of reference, each to `app-config` or `db`, in both spellings (the
/// ConfigMap name in Secret fields and the other way round, which must not be rewritten).
fn every_reference() -> Value {
    let env = json!([
        {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "app-config", "key": "a"}}},
        {"name": "B", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
        {"name": "C", "value": "plain"},
        {"name": "D", "valueFrom": {"secretKeyRef": {"name": "app-config", "key": "k"}}},
        {"name": "E", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]);
    let env_from = json!([
        {"configMapRef": {"name": "app-config"}, "prefix": "APP_"},
        {"secretRef": {"name": "db", "optional": true}},
        {"configMapRef": {"name": "unrelated"}},
        {"configMapRef": {"name": "db"}},
    ]);
    json!({
        "containers": [
            {"name": "app", "image": "app:1", "env": env, "envFrom": env_from},
            {"name": "sidecar", "image": "side:1"},
        ],
        "initContainers": [{"name": "init", "envFrom": [{"secretRef": {"name": "db"}}]}],
        "ephemeralContainers": [{"name": "debug", "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "app-config", "key": "x"}}}]}],
        "volumes": [
            {"name": "cfg", "configMap": {"name": "app-config", "items": [{"key": "a", "path": "a"}]}},
            {"name": "sec", "secret": {"secretName": "db", "defaultMode": 256}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "all", "projected": {"sources": [
                {"configMap": {"name": "app-config"}},
                {"secret": {"name": "db"}},
                {"downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
                {"secret": {"name": "app-config"}},
            ]}},
            {"name": "nosecret", "secret": {}},
        ],
    })
}

#[test]
fn rewrites_every_reference_kind_and_only_from_its_own_kind() {
    let doc = pod_json(Some(MAP), every_reference());
    let Pin::Patch(ops) = pin(&read(&doc)) else {
        panic!("expected a patch");
    };
    let got: Vec<(&str, &str, &str)> = ops
        .iter()
        .map(|o| (o.op, o.path.as_str(), o.value.as_str().unwrap_or_default()))
        .collect();
    let cm = "app-config-7f3a9c21e4";
    let sec = "db-0b4e99d2aa";
    assert_eq!(
        got,
        vec![
            (
                "replace",
                "/spec/containers/0/envFrom/0/configMapRef/name",
                cm
            ),
            (
                "replace",
                "/spec/containers/0/envFrom/1/secretRef/name",
                sec
            ),
            (
                "replace",
                "/spec/containers/0/env/0/valueFrom/configMapKeyRef/name",
                cm
            ),
            (
                "replace",
                "/spec/containers/0/env/1/valueFrom/secretKeyRef/name",
                sec
            ),
            (
                "replace",
                "/spec/initContainers/0/envFrom/0/secretRef/name",
                sec
            ),
            (
                "replace",
                "/spec/ephemeralContainers/0/env/0/valueFrom/configMapKeyRef/name",
                cm
            ),
            ("replace", "/spec/volumes/0/configMap/name", cm),
            ("replace", "/spec/volumes/1/secret/secretName", sec),
            (
                "replace",
                "/spec/volumes/3/projected/sources/0/configMap/name",
                cm
            ),
            (
                "replace",
                "/spec/volumes/3/projected/sources/1/secret/name",
                sec
            ),
        ]
    );
    let mut patched = doc.clone();
    patch::apply_replace(&mut patched, &ops).expect("applies");
    let text = patched.to_string();
    // The crossed references (a Secret named like the ConfigMap, and back) and the unrelated
    // one are left alone.
    assert_eq!(text.matches("\"app-config\"").count(), 2, "{text}");
    assert_eq!(text.matches("\"db\"").count(), 1, "{text}");
    assert!(text.contains("\"unrelated\""));
    assert_eq!(pin(&read(&patched)), Pin::Unchanged, "idempotent");
}

#[test]
fn nothing_to_do_without_the_annotation_or_without_references() {
    let spec = every_reference();
    assert_eq!(pin(&read(&pod_json(None, spec.clone()))), Pin::NoAnnotation);
    assert_eq!(
        pin(&read(&pod_json(Some("{}"), spec.clone()))),
        Pin::Unchanged
    );
    assert_eq!(
        pin(&read(&pod_json(
            Some(r#"{"configmap/elsewhere":"elsewhere-1"}"#),
            spec
        ))),
        Pin::Unchanged
    );
    let no_spec = json!({"metadata": {"annotations": {CONFIG_SNAPSHOTS: MAP}}});
    assert_eq!(pin(&read(&no_spec)), Pin::Unchanged);
    // A snapshot named like its source changes nothing.
    assert_eq!(
        pin(&read(&pod_json(
            Some(r#"{"configmap/app-config":"app-config","secret/db":"db"}"#),
            every_reference()
        ))),
        Pin::Unchanged
    );
}

#[test]
fn malformed_annotations_say_what_is_wrong() {
    let cases = [
        ("", "not a JSON object of strings"),
        ("not json", "not a JSON object of strings"),
        (r#"["configmap/a"]"#, "not a JSON object of strings"),
        (r#""configmap/a""#, "not a JSON object of strings"),
        (r#"{"configmap/a": 5}"#, "not a JSON object of strings"),
        (
            r#"{"configmap/a": {"name": "b"}}"#,
            "not a JSON object of strings",
        ),
        (
            r#"{"configmap/a": "b"} trailing"#,
            "not a JSON object of strings",
        ),
        (
            r#"{"a": "b"}"#,
            "key \"a\" is not of the form configmap/<name> or secret/<name>",
        ),
        (r#"{"ConfigMap/a": "b"}"#, "is not of the form"),
        (r#"{"pvc/a": "b"}"#, "is not of the form"),
        (
            r#"{"configmap/": "b"}"#,
            "key \"configmap/\" names no source",
        ),
        (r#"{"secret/": "b"}"#, "names no source"),
        (
            r#"{"configmap/a": ""}"#,
            "snapshot name \"\" of \"configmap/a\" is not a valid DNS-1123 subdomain: it is empty",
        ),
        (
            r#"{"secret/a": "A-1"}"#,
            "is not a valid DNS-1123 subdomain",
        ),
        (
            r#"{"secret/a": "a_1"}"#,
            "is not a valid DNS-1123 subdomain",
        ),
        (r#"{"secret/a": "-a"}"#, "is not a valid DNS-1123 subdomain"),
        (r#"{"secret/a": "a."}"#, "is not a valid DNS-1123 subdomain"),
        (
            r#"{"secret/a": "a..b"}"#,
            "is not a valid DNS-1123 subdomain",
        ),
        (
            r#"{"secret/a": "a/b"}"#,
            "is not a valid DNS-1123 subdomain",
        ),
        (
            r#"{"configmap/a": "b", "configmap/a": "c"}"#,
            "key \"configmap/a\" is given twice",
        ),
        (
            r#"{"configmap/a": "b", "configmap/b": "c"}"#,
            "snapshot name \"b\" of \"configmap/a\" is itself a source (\"configmap/b\")",
        ),
    ];
    for (annotation, expected) in cases {
        let m = malformed(annotation);
        assert!(
            m.starts_with("annotation appset.dev/config-snapshots is malformed: "),
            "{annotation}: {m}"
        );
        assert!(m.contains(expected), "{annotation}: {m}");
    }
    let long = "a".repeat(254);
    assert!(malformed(&format!(r#"{{"secret/a": "{long}"}}"#)).contains("longer than 253"));
}

#[test]
fn valid_names_and_kinds_kept_apart_in_the_map() {
    for ok in [
        "a",
        "0",
        "app-config-7f3a9c21e4",
        "a.b-c.d9",
        &"a".repeat(253),
    ] {
        assert_eq!(check_subdomain(ok), Ok(()), "{ok}");
    }
    // The same source name under both kinds, and a snapshot of one kind named like a source of
    // the other: both fine.
    let s = Snapshots::parse(
        r#"{"configmap/a":"a-1","secret/a":"a-2","secret/b":"c","configmap/c":"c-1"}"#,
    )
    .expect("well-formed");
    assert_eq!(s.configmaps.get("a").map(String::as_str), Some("a-1"));
    assert_eq!(s.secrets.get("a").map(String::as_str), Some("a-2"));
    assert_eq!(s.secrets.get("b").map(String::as_str), Some("c"));
    assert_eq!(s.configmaps.get("c").map(String::as_str), Some("c-1"));
}

// --- Property test ---

const SOURCES: [&str; 5] = ["app", "db", "cache", "web.conf", "tls"];

/// A reference name: mostly one of the sources, sometimes something else.
fn arb_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(SOURCES.to_vec()).prop_map(str::to_string),
        1 => prop::sample::select(vec!["other", "app-0123456789"]).prop_map(str::to_string),
    ]
}

fn arb_env() -> impl Strategy<Value = Value> {
    prop_oneof![
        "[A-Z]{1,3}".prop_map(|n| json!({"name": n, "value": "v"})),
        (arb_name(), "[a-z]{1,3}").prop_map(|(n, k)| json!({"name": "E", "valueFrom": {"configMapKeyRef": {"name": n, "key": k}}})),
        (arb_name(), any::<bool>()).prop_map(|(n, o)| json!({"name": "S", "valueFrom": {"secretKeyRef": {"name": n, "key": "k", "optional": o}}})),
        Just(json!({"name": "F", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})),
    ]
}

fn arb_env_from() -> impl Strategy<Value = Value> {
    prop_oneof![
        arb_name().prop_map(|n| json!({"configMapRef": {"name": n}})),
        arb_name().prop_map(|n| json!({"secretRef": {"name": n}, "prefix": "P_"})),
        (arb_name(), arb_name())
            .prop_map(|(c, s)| json!({"configMapRef": {"name": c}, "secretRef": {"name": s}})),
    ]
}

fn arb_container() -> impl Strategy<Value = Value> {
    (
        "[a-z]{1,6}",
        prop::option::of(prop::collection::vec(arb_env(), 0..4)),
        prop::option::of(prop::collection::vec(arb_env_from(), 0..3)),
    )
        .prop_map(|(name, env, env_from)| {
            let mut c = json!({"name": name, "image": "img:1"});
            if let Some(e) = env {
                c["env"] = json!(e);
            }
            if let Some(e) = env_from {
                c["envFrom"] = json!(e);
            }
            c
        })
}

fn arb_projection() -> impl Strategy<Value = Value> {
    prop_oneof![
        arb_name().prop_map(|n| json!({"configMap": {"name": n, "optional": true}})),
        arb_name()
            .prop_map(|n| json!({"secret": {"name": n, "items": [{"key": "k", "path": "p"}]}})),
        Just(json!({"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}})),
    ]
}

fn arb_volume() -> impl Strategy<Value = Value> {
    prop_oneof![
        arb_name().prop_map(|n| json!({"name": "c", "configMap": {"name": n, "defaultMode": 420}})),
        arb_name().prop_map(|n| json!({"name": "s", "secret": {"secretName": n}})),
        Just(json!({"name": "s0", "secret": {"optional": true}})),
        Just(json!({"name": "e", "emptyDir": {"sizeLimit": "1Gi"}})),
        prop::collection::vec(arb_projection(), 0..4)
            .prop_map(|s| json!({"name": "p", "projected": {"sources": s}})),
    ]
}

fn opt_list<S: Strategy<Value = Value>>(s: S, max: usize) -> impl Strategy<Value = Option<Value>> {
    prop::option::of(prop::collection::vec(s, 0..max).prop_map(Value::Array))
}

fn arb_spec() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(arb_container(), 1..3),
        opt_list(arb_container(), 3),
        opt_list(arb_container(), 2),
        opt_list(arb_volume(), 5),
    )
        .prop_map(|(containers, init, ephemeral, volumes)| {
            let mut spec = json!({"containers": containers, "restartPolicy": "Always"});
            for (k, v) in [
                ("initContainers", init),
                ("ephemeralContainers", ephemeral),
                ("volumes", volumes),
            ] {
                if let Some(v) = v {
                    spec[k] = v;
                }
            }
            spec
        })
}

/// Snapshots for a subset of the sources, per kind (names unlike any source).
fn arb_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    let kind = prop::sample::select(vec!["configmap", "secret"]);
    let source = prop::sample::select(SOURCES.to_vec());
    prop::collection::btree_map(
        (kind, source).prop_map(|(k, s)| format!("{k}/{s}")),
        "[0-9a-f]{10}",
        0..8,
    )
    .prop_map(|m| {
        m.into_iter()
            .map(|(k, h)| {
                let source = k.split_once('/').map(|(_, s)| s).unwrap_or_default();
                let snapshot = format!("{source}-{h}");
                (k, snapshot)
            })
            .collect()
    })
}

/// The reference fields of a pod's JSON, as (kind, pointer-like path with `*` for every
/// element): an independent statement of what the module rewrites.
const FIELDS: [(Kind, &[&str]); 8] = [
    (Kind::ConfigMap, &["envFrom", "*", "configMapRef", "name"]),
    (Kind::Secret, &["envFrom", "*", "secretRef", "name"]),
    (
        Kind::ConfigMap,
        &["env", "*", "valueFrom", "configMapKeyRef", "name"],
    ),
    (
        Kind::Secret,
        &["env", "*", "valueFrom", "secretKeyRef", "name"],
    ),
    (Kind::ConfigMap, &["configMap", "name"]),
    (Kind::Secret, &["secret", "secretName"]),
    (
        Kind::ConfigMap,
        &["projected", "sources", "*", "configMap", "name"],
    ),
    (
        Kind::Secret,
        &["projected", "sources", "*", "secret", "name"],
    ),
];

/// Calls `f` on every string at `path` under `v` (`*` walks every array element).
fn each_at(v: &mut Value, path: &[&str], f: &mut dyn FnMut(&mut String)) {
    match path.split_first() {
        None => {
            if let Value::String(s) = v {
                f(s);
            }
        }
        Some((&"*", rest)) => {
            if let Value::Array(a) = v {
                for e in a {
                    each_at(e, rest, f);
                }
            }
        }
        Some((k, rest)) => {
            if let Some(e) = v.get_mut(*k) {
                each_at(e, rest, f);
            }
        }
    }
}

/// Calls `f(kind, name)` on every reference of the pod's JSON.
fn each_reference(pod: &mut Value, f: &mut dyn FnMut(Kind, &mut String)) {
    for (kind, field) in FIELDS {
        let volume_field = !matches!(field.first(), Some(&"envFrom" | &"env"));
        let lists: &[&str] = if volume_field {
            &["volumes"]
        } else {
            &["containers", "initContainers", "ephemeralContainers"]
        };
        for list in lists {
            let path = [&["spec", list, "*"][..], field].concat();
            each_at(pod, &path, &mut |s| f(kind, s));
        }
    }
}

fn source_of(map: &BTreeMap<String, String>, kind: Kind, name: &str) -> Option<String> {
    map.get(&format!("{}/{name}", kind.prefix())).cloned()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Applying the operations yields the pod with exactly the references that name a source of
    /// their kind rewritten (compared whole with an independent rewrite of the JSON, so every
    /// other field is unchanged), no reference left naming a source, and a second pass yields
    /// no operation.
    #[test]
    fn pinning_rewrites_exactly_the_sources_and_is_idempotent(
        spec in arb_spec(),
        map in arb_map(),
    ) {
        let annotation = serde_json::to_string(&map).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let doc = pod_json(Some(&annotation), spec);
        let pod: Pod = serde_json::from_value(doc.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let ops = match pin(&pod) {
            Pin::Patch(ops) => {
                prop_assert!(!ops.is_empty());
                prop_assert!(ops.iter().all(|o| o.op == "replace"));
                ops
            }
            Pin::Unchanged => Vec::new(),
            other => return Err(TestCaseError::fail(format!("{other:?} for {annotation}"))),
        };
        let mut patched = doc.clone();
        patch::apply_replace(&mut patched, &ops).map_err(TestCaseError::fail)?;

        let mut expected = doc.clone();
        let mut rewritten = 0usize;
        each_reference(&mut expected, &mut |kind, name| {
            if let Some(s) = source_of(&map, kind, name) {
                *name = s;
                rewritten += 1;
            }
        });
        prop_assert_eq!(&patched, &expected);
        prop_assert_eq!(ops.len(), rewritten);

        let mut left = Vec::new();
        each_reference(&mut patched.clone(), &mut |kind, name| {
            if source_of(&map, kind, name).is_some() {
                left.push(format!("{}/{name}", kind.prefix()));
            }
        });
        prop_assert!(left.is_empty(), "references still name sources: {left:?}");

        let again: Pod = serde_json::from_value(patched).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(pin(&again), Pin::Unchanged);
    }
}
