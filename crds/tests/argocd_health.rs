//! The Argo CD health checks under `deploy/argocd/` work on real objects of the API.
//!
//! Each `<group>/<Kind>/` folder holds `health.lua`, `health_test.yaml` and `testdata/`, the
//! layout of Argo CD's resource customizations. Every case of `health_test.yaml` runs the script
//! under Lua 5.1 (the dialect of Argo CD's interpreter, with only the base, table, string and math
//! libraries) with the object of its `inputPath` as the global `obj`, and must return the
//! expected `status` and `message`. Every object must also deserialize into the crate's type of
//! its kind, so the recorded objects cannot drift from the API. `argocd-cm-patch.yaml` must carry
//! the current scripts under Argo CD's `resource.customizations.health.<group>_<Kind>` keys;
//! `APPSET_WRITE_ARGOCD_PATCH=1 cargo test -p appset-crds --test argocd_health` rewrites it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use appset_crds::{AppSet, PodInjection};
use mlua::serde::SerializeOptions;
use mlua::{Lua, LuaOptions, LuaSerdeExt, StdLib, Table, Value};
use serde::Deserialize;

/// Health statuses Argo CD knows.
const STATUSES: [&str; 6] = [
    "Healthy",
    "Progressing",
    "Degraded",
    "Suspended",
    "Missing",
    "Unknown",
];

#[derive(Deserialize)]
struct TestFile {
    tests: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Case {
    health_status: Expected,
    input_path: String,
}

#[derive(Deserialize, Debug, PartialEq)]
struct Expected {
    status: String,
    message: String,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/argocd")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Runs a health script on an object as Argo CD does: `obj` is a global, JSON nulls and
/// absent fields are both nil, and the chunk returns a table with `status` and `message`.
fn run(script: &str, name: &str, object: &serde_json::Value) -> Result<Expected, String> {
    let lua = Lua::new_with(
        StdLib::TABLE | StdLib::STRING | StdLib::MATH,
        LuaOptions::default(),
    )
    .map_err(|e| e.to_string())?;
    let options = SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false)
        .set_array_metatable(false);
    let obj = lua
        .to_value_with(object, options)
        .map_err(|e| e.to_string())?;
    lua.globals().set("obj", obj).map_err(|e| e.to_string())?;
    let hs: Table = lua
        .load(script)
        .set_name(name)
        .eval()
        .map_err(|e| e.to_string())?;
    let field = |key: &str| -> Result<String, String> {
        match hs.get::<Value>(key).map_err(|e| e.to_string())? {
            Value::String(s) => Ok(s.to_string_lossy()),
            other => Err(format!("{name}: hs.{key} is {other:?}, not a string")),
        }
    };
    Ok(Expected {
        status: field("status")?,
        message: field("message")?,
    })
}

/// Checks that an object is one the API serves, by deserializing it into the crate's type.
fn check_typed(kind: &str, path: &Path, object: &serde_json::Value) {
    let parsed = match kind {
        "AppSet" => serde_json::from_value::<AppSet>(object.clone()).map(drop),
        "PodInjection" => serde_json::from_value::<PodInjection>(object.clone()).map(drop),
        other => panic!("no type for kind {other} (folder of {})", path.display()),
    };
    if let Err(e) = parsed {
        panic!("{} is not a valid {kind}: {e}", path.display());
    }
    assert_eq!(
        object["kind"].as_str(),
        Some(kind),
        "{}: kind",
        path.display()
    );
    assert_eq!(
        object["apiVersion"].as_str(),
        Some("appset.dev/v1alpha1"),
        "{}: apiVersion",
        path.display()
    );
}

/// Runs every case of one `<group>/<Kind>` folder; returns the statuses seen.
fn check_kind(group: &str, kind: &str) -> Vec<String> {
    let dir = root().join(group).join(kind);
    let script = read(&dir.join("health.lua"));
    let tests: TestFile = serde_yaml_ng::from_str(&read(&dir.join("health_test.yaml")))
        .unwrap_or_else(|e| panic!("{}/health_test.yaml: {e}", dir.display()));
    assert!(!tests.tests.is_empty(), "{kind}: no test cases");

    let mut used = Vec::new();
    let mut statuses = Vec::new();
    for case in &tests.tests {
        let path = dir.join(&case.input_path);
        let object: serde_json::Value = serde_yaml_ng::from_str(&read(&path))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        check_typed(kind, &path, &object);
        assert!(
            STATUSES.contains(&case.health_status.status.as_str()),
            "{}: {} is not an Argo CD health status",
            case.input_path,
            case.health_status.status
        );
        let got = run(&script, &format!("{group}/{kind}/health.lua"), &object)
            .unwrap_or_else(|e| panic!("{kind} on {}: {e}", case.input_path));
        assert_eq!(
            got, case.health_status,
            "{kind} health of {}",
            case.input_path
        );
        used.push(case.input_path.clone());
        statuses.push(got.status);
    }

    // Every recorded object is a case.
    let testdata = dir.join("testdata");
    let entries =
        std::fs::read_dir(&testdata).unwrap_or_else(|e| panic!("list {}: {e}", testdata.display()));
    for entry in entries {
        let name = entry.expect("directory entry").file_name();
        let input = format!("testdata/{}", name.to_string_lossy());
        assert!(
            used.contains(&input),
            "{kind}: {input} is in no health_test.yaml case"
        );
    }
    statuses
}

#[test]
fn appset_health_in_every_state() {
    let statuses = check_kind("appset.dev", "AppSet");
    for wanted in ["Healthy", "Progressing", "Degraded"] {
        assert!(
            statuses.iter().any(|s| s == wanted),
            "no AppSet case is {wanted}"
        );
    }
}

#[test]
fn podinjection_health() {
    let statuses = check_kind("appset.dev", "PodInjection");
    assert!(statuses.iter().all(|s| s == "Healthy"));
}

#[test]
fn a_script_error_is_reported() {
    // The harness itself: a script that fails or returns no status must not pass.
    let object = serde_json::json!({"metadata": {"name": "x"}});
    assert!(run("return obj.status.conditions", "broken.lua", &object).is_err());
    assert!(run("return {}", "empty.lua", &object).is_err());
    assert!(
        run("return os.time()", "os.lua", &object).is_err(),
        "no os library"
    );
    let ok = run(
        "return {status = 'Healthy', message = obj.metadata.name}",
        "ok.lua",
        &object,
    );
    assert_eq!(
        ok,
        Ok(Expected {
            status: "Healthy".into(),
            message: "x".into()
        })
    );
}

/// The argocd-cm patch with every script under its Argo CD key.
fn render_patch() -> String {
    let mut data = BTreeMap::new();
    for kind in ["AppSet", "PodInjection"] {
        let script = read(&root().join("appset.dev").join(kind).join("health.lua"));
        data.insert(
            format!("resource.customizations.health.appset.dev_{kind}"),
            script,
        );
    }
    let patch = serde_json::json!({ "data": data });
    let yaml = serde_yaml_ng::to_string(&patch).expect("render the patch");
    format!(
        "# The appset health checks for Argo CD's argocd-cm ConfigMap, from the health.lua files beside\n\
         # this one. Apply with:\n\
         #   kubectl -n argocd patch configmap argocd-cm --type merge --patch-file deploy/argocd/argocd-cm-patch.yaml\n\
         # Regenerate with: APPSET_WRITE_ARGOCD_PATCH=1 cargo test -p appset-crds --test argocd_health\n\
         {yaml}"
    )
}

#[test]
fn argocd_cm_patch_is_current() {
    let path = root().join("argocd-cm-patch.yaml");
    let rendered = render_patch();
    if std::env::var_os("APPSET_WRITE_ARGOCD_PATCH").is_some() {
        std::fs::write(&path, &rendered)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == rendered,
        "{} is stale or missing: run `APPSET_WRITE_ARGOCD_PATCH=1 cargo test -p appset-crds --test argocd_health` and commit the result",
        path.display()
    );
    // The patch is what Argo CD reads: each key holds its script verbatim.
    let parsed: serde_json::Value = serde_yaml_ng::from_str(&committed).expect("patch YAML");
    let script = read(&root().join("appset.dev/AppSet/health.lua"));
    assert_eq!(
        parsed["data"]["resource.customizations.health.appset.dev_AppSet"].as_str(),
        Some(script.as_str())
    );
}
