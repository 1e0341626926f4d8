//! Config snapshots: every revision of a workload pinned to immutable copies of the ConfigMaps
//! and Secrets its pods read.
//!
//! A workload annotated `appset.dev/config-rollout: snapshot` is handled as `auto` and, in
//! addition, whenever its config digest is recorded:
//!
//! 1. **Copy.** Each referenced source that exists is copied into an immutable ConfigMap or
//!    Secret named `<source>-<10 hex digits>`, the digits taken from the source's keyed digest
//!    (so a name reveals nothing about a Secret's values, and identical content maps to one
//!    shared copy). Only the keys the pods use are copied; a Secret keeps its `type`. Each copy
//!    is labelled `appset.dev/snapshot=true`, records its source in `appset.dev/snapshot-of`,
//!    and is owned by the workload until a revision owns it.
//! 2. **Pin.** The template gets `appset.dev/config-snapshots` next to `appset.dev/config-hash`:
//!    a JSON map from `configmap/<name>` or `secret/<name>` to the copy. The workload's own
//!    spec is never rewritten; the injection webhook rewrites each new pod's references to the
//!    copies its annotation names, so the pods of every revision keep reading the config they
//!    were rolled out with, and a rollback brings the old annotation back with the old config.
//! 3. **Retain.** Every revision whose template names a copy (a Deployment's ReplicaSets, a
//!    StatefulSet's or DaemonSet's ControllerRevisions) becomes one of its owners, and the
//!    workload's ownership is dropped once a revision holds it: the garbage collector deletes a
//!    copy when the last revision that uses it is pruned by `revisionHistoryLimit`. A
//!    Deployment's pod exists only while its ReplicaSet does, and a StatefulSet or DaemonSet
//!    keeps the ControllerRevision of every pod it runs, so no copy a live pod reads is
//!    deleted.
//!
//! AppSets opt in with `spec.configSnapshots` (next to `spec.configRollout`): the AppSet
//! controller creates the copies the same way ([`ensure`]), pins the revision's template itself
//! ([`pin_spec`], so its pods need no webhook), and hands the copies to its ControllerRevisions
//! ([`adopt`]).
//!
//! [`desired`], [`annotation`], [`name_for`] and the copy builders are pure; [`ensure`] and
//! [`adopt`] do the I/O.

use std::collections::BTreeMap;

use appset_crds::keys;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{ControllerRevision, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, PodSpec, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::confighash::discovery::{SourceKind, SourceName};
use crate::confighash::hash::Source;

/// Hex digits of the keyed digest in a copy's name.
const DIGEST_DIGITS: usize = 10;
/// The longest Kubernetes object name.
const MAX_NAME: usize = 253;

/// The key of a source in the annotation: `configmap/<name>` or `secret/<name>`.
pub fn source_key(source: &SourceName) -> String {
    match source.kind {
        SourceKind::ConfigMap => format!("configmap/{}", source.name),
        SourceKind::Secret => format!("secret/{}", source.name),
    }
}

/// The name of the copy of `source` whose keyed digest is `digest` (hex): the source's name,
/// shortened to fit, a dash and the digest's first digits.
pub fn name_for(source: &str, digest: &str) -> String {
    let digits: String = digest.chars().take(DIGEST_DIGITS).collect();
    let room = MAX_NAME - digits.len() - 1;
    let mut base: String = source.chars().take(room).collect();
    while base.ends_with(['-', '.']) {
        base.pop();
    }
    format!("{base}-{digits}")
}

/// The copy each present source is pinned to: by source, the copy's name.
pub fn desired(
    sources: &[Source],
    per_source: &BTreeMap<SourceName, String>,
) -> BTreeMap<SourceName, String> {
    sources
        .iter()
        .filter(|s| s.content.is_some())
        .filter_map(|s| {
            let name = s.source_name();
            let digest = per_source.get(&name)?;
            let copy = name_for(&s.name, digest);
            Some((name, copy))
        })
        .collect()
}

/// The `appset.dev/config-snapshots` value for `pins` (keys sorted, so equal pins give equal
/// strings).
pub fn annotation(pins: &BTreeMap<SourceName, String>) -> String {
    let map: BTreeMap<String, &str> = pins
        .iter()
        .map(|(s, copy)| (source_key(s), copy.as_str()))
        .collect();
    serde_json::to_string(&map).unwrap_or_default()
}

/// The copies an annotation value names (none when it does not parse).
pub fn copies_named(value: &str) -> Vec<(SourceKind, String)> {
    let Ok(map) = serde_json::from_str::<BTreeMap<String, String>>(value) else {
        return Vec::new();
    };
    map.into_iter()
        .filter_map(|(k, v)| {
            let (kind, _) = k.split_once('/')?;
            let kind = match kind {
                "configmap" => SourceKind::ConfigMap,
                "secret" => SourceKind::Secret,
                _ => return None,
            };
            Some((kind, v))
        })
        .collect()
}

/// The pins an annotation value names, by source (none when it does not parse).
pub fn pins_from_annotation(value: &str) -> BTreeMap<SourceName, String> {
    let Ok(map) = serde_json::from_str::<BTreeMap<String, String>>(value) else {
        return BTreeMap::new();
    };
    map.into_iter()
        .filter_map(|(k, copy)| {
            let source = match k.split_once('/')? {
                ("configmap", name) if !name.is_empty() => SourceName::config_map(name),
                ("secret", name) if !name.is_empty() => SourceName::secret(name),
                _ => return None,
            };
            Some((source, copy))
        })
        .collect()
}

/// Points every reference of `spec` to a pinned source at its copy: `envFrom`, `env.valueFrom`
/// (containers, init and ephemeral containers), `configMap`, `secret` and projected volumes.
/// What the webhook's `/pin-config` does to a pod, done by the AppSet controller to the
/// revision's template. Returns how many references changed.
pub fn pin_spec(spec: &mut PodSpec, pins: &BTreeMap<SourceName, String>) -> usize {
    let mut changed = 0;
    let mut swap = |kind: SourceKind, name: &mut String| {
        let key = SourceName {
            kind,
            name: name.clone(),
        };
        if let Some(copy) = pins.get(&key) {
            *name = copy.clone();
            changed += 1;
        }
    };
    let env_lists = spec
        .containers
        .iter_mut()
        .map(|c| (&mut c.env, &mut c.env_from))
        .chain(
            spec.init_containers
                .iter_mut()
                .flatten()
                .map(|c| (&mut c.env, &mut c.env_from)),
        )
        .chain(
            spec.ephemeral_containers
                .iter_mut()
                .flatten()
                .map(|c| (&mut c.env, &mut c.env_from)),
        );
    for (env, env_from) in env_lists {
        for e in env_from.iter_mut().flatten() {
            if let Some(r) = e.config_map_ref.as_mut() {
                swap(SourceKind::ConfigMap, &mut r.name);
            }
            if let Some(r) = e.secret_ref.as_mut() {
                swap(SourceKind::Secret, &mut r.name);
            }
        }
        for e in env.iter_mut().flatten() {
            let Some(from) = e.value_from.as_mut() else {
                continue;
            };
            if let Some(r) = from.config_map_key_ref.as_mut() {
                swap(SourceKind::ConfigMap, &mut r.name);
            }
            if let Some(r) = from.secret_key_ref.as_mut() {
                swap(SourceKind::Secret, &mut r.name);
            }
        }
    }
    for v in spec.volumes.iter_mut().flatten() {
        if let Some(c) = v.config_map.as_mut() {
            swap(SourceKind::ConfigMap, &mut c.name);
        }
        if let Some(name) = v.secret.as_mut().and_then(|s| s.secret_name.as_mut()) {
            swap(SourceKind::Secret, name);
        }
        for p in v
            .projected
            .as_mut()
            .and_then(|p| p.sources.as_mut())
            .into_iter()
            .flatten()
        {
            if let Some(c) = p.config_map.as_mut() {
                swap(SourceKind::ConfigMap, &mut c.name);
            }
            if let Some(sec) = p.secret.as_mut() {
                swap(SourceKind::Secret, &mut sec.name);
            }
        }
    }
    changed
}

fn meta(source: &Source, copy: &str, owner: &OwnerReference) -> ObjectMeta {
    ObjectMeta {
        name: Some(copy.to_string()),
        namespace: Some(source.namespace.clone()),
        labels: Some([(keys::SNAPSHOT_LABEL.to_string(), "true".to_string())].into()),
        annotations: Some(
            [(
                keys::SNAPSHOT_OF.to_string(),
                source_key(&source.source_name()),
            )]
            .into(),
        ),
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    }
}

/// The immutable copy of a ConfigMap source (`None` for a Secret or an absent source).
pub fn config_map_copy(source: &Source, copy: &str, owner: &OwnerReference) -> Option<ConfigMap> {
    let content = source.content.as_ref()?;
    if source.kind != SourceKind::ConfigMap {
        return None;
    }
    let data: BTreeMap<String, String> = content
        .data
        .iter()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
        .collect();
    let binary: BTreeMap<String, ByteString> = content
        .binary_data
        .iter()
        .map(|(k, v)| (k.clone(), ByteString(v.clone())))
        .collect();
    Some(ConfigMap {
        metadata: meta(source, copy, owner),
        data: (!data.is_empty()).then_some(data),
        binary_data: (!binary.is_empty()).then_some(binary),
        immutable: Some(true),
    })
}

/// The immutable copy of a Secret source, of the same type (`None` for a ConfigMap or an
/// absent source).
pub fn secret_copy(source: &Source, copy: &str, owner: &OwnerReference) -> Option<Secret> {
    let content = source.content.as_ref()?;
    if source.kind != SourceKind::Secret {
        return None;
    }
    let data: BTreeMap<String, ByteString> = content
        .data
        .iter()
        .map(|(k, v)| (k.clone(), ByteString(v.clone())))
        .collect();
    Some(Secret {
        metadata: meta(source, copy, owner),
        data: Some(data),
        type_: source.secret_type.clone(),
        immutable: Some(true),
        ..Default::default()
    })
}

/// Creates every copy in `pins` that does not exist yet, owned by `owner`. A copy that exists
/// already has the same content (its name comes from the content's digest) and is left as it
/// is; ownership moves to revisions in [`adopt`].
pub async fn ensure(
    client: &Client,
    namespace: &str,
    sources: &[Source],
    pins: &BTreeMap<SourceName, String>,
    owner: &OwnerReference,
) -> Result<(), kube::Error> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for source in sources {
        let Some(copy) = pins.get(&source.source_name()) else {
            continue;
        };
        let created = match source.kind {
            SourceKind::ConfigMap => match config_map_copy(source, copy, owner) {
                Some(cm) if cms.get_opt(copy).await?.is_none() => {
                    cms.create(&PostParams::default(), &cm).await.map(|_| ())
                }
                _ => Ok(()),
            },
            SourceKind::Secret => match secret_copy(source, copy, owner) {
                Some(s) if secrets.get_opt(copy).await?.is_none() => {
                    secrets.create(&PostParams::default(), &s).await.map(|_| ())
                }
                _ => Ok(()),
            },
        };
        match created {
            Ok(()) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What [`adopt`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Adoption {
    /// Owner references added to copies.
    pub adopted: usize,
    /// Copies whose workload ownership was dropped because a revision owns them.
    pub released: usize,
    /// Copies a revision names that do not exist (deleted by hand): `kind/name`.
    pub missing: Vec<String>,
}

/// Where a workload keeps its revisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revisions {
    /// A Deployment's ReplicaSets.
    ReplicaSets,
    /// A StatefulSet's or DaemonSet's ControllerRevisions.
    ControllerRevisions,
}

fn owner_of(kind: &str, meta: &ObjectMeta) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: "apps/v1".into(),
        kind: kind.into(),
        name: meta.name.clone()?,
        uid: meta.uid.clone()?,
        ..Default::default()
    })
}

/// The pins of a ControllerRevision: its `data` holds the template as a patch,
/// `{"spec": {"template": {...}}}`.
pub fn revision_pins(cr: &ControllerRevision) -> Option<String> {
    cr.data
        .0
        .pointer(&format!(
            "/spec/template/metadata/annotations/{}",
            keys::CONFIG_SNAPSHOTS.replace('~', "~0").replace('/', "~1")
        ))?
        .as_str()
        .map(str::to_string)
}

/// The revisions among `listed` that the workload `workload_uid` owns and whose template carries
/// pins: each as an owner reference, with its pins.
pub fn pinned_revisions(
    listed: &[ControllerRevision],
    workload_uid: &str,
) -> Vec<(OwnerReference, String)> {
    listed
        .iter()
        .filter(|cr| owned_by(&cr.metadata, workload_uid))
        .filter_map(|cr| {
            Some((
                owner_of("ControllerRevision", &cr.metadata)?,
                revision_pins(cr)?,
            ))
        })
        .collect()
}

fn owned_by(meta: &ObjectMeta, workload_uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == workload_uid)
}

/// Lists the revisions of the workload `workload_uid` (those matching its pod `selector`, which
/// its revisions carry as labels) with the pins their templates carry.
pub async fn list_revisions(
    client: &Client,
    namespace: &str,
    workload_uid: &str,
    kind: Revisions,
    selector: &LabelSelector,
) -> Result<Vec<(OwnerReference, String)>, kube::Error> {
    let mut params = ListParams::default();
    if let Ok(selector) = kube::core::Selector::try_from(selector.clone()) {
        params = params.labels_from(&selector);
    }
    match kind {
        Revisions::ReplicaSets => {
            let api: Api<ReplicaSet> = Api::namespaced(client.clone(), namespace);
            Ok(api
                .list(&params)
                .await?
                .items
                .iter()
                .filter(|rs| owned_by(&rs.metadata, workload_uid))
                .filter_map(|rs| {
                    let pins = rs
                        .spec
                        .template
                        .as_ref()?
                        .metadata
                        .as_ref()?
                        .annotations
                        .as_ref()?
                        .get(keys::CONFIG_SNAPSHOTS)?
                        .clone();
                    Some((owner_of("ReplicaSet", &rs.metadata)?, pins))
                })
                .collect())
        }
        Revisions::ControllerRevisions => {
            let api: Api<ControllerRevision> = Api::namespaced(client.clone(), namespace);
            Ok(pinned_revisions(
                &api.list(&params).await?.items,
                workload_uid,
            ))
        }
    }
}

/// The owners a copy should have: the ReplicaSets naming it, and the workload only while none
/// does. `None` when they are already what the copy has.
pub fn owners_wanted(
    current: &[OwnerReference],
    revisions: &[OwnerReference],
    workload_uid: &str,
) -> Option<Vec<OwnerReference>> {
    let mut out: Vec<OwnerReference> = current
        .iter()
        .filter(|o| o.uid != workload_uid || revisions.is_empty())
        .cloned()
        .collect();
    for r in revisions {
        if !out.iter().any(|o| o.uid == r.uid) {
            out.push(r.clone());
        }
    }
    let same = out.len() == current.len() && out.iter().all(|o| current.contains(o));
    (!same).then_some(out)
}

/// Gives every copy named by one of the workload's (`workload_uid`) `revisions` (from
/// [`list_revisions`] or [`pinned_revisions`]) that revision as an owner, and drops the
/// workload's ownership of copies a revision holds.
pub async fn adopt(
    client: &Client,
    namespace: &str,
    workload_uid: &str,
    revisions: Vec<(OwnerReference, String)>,
) -> Result<Adoption, kube::Error> {
    let mut by_copy: BTreeMap<(SourceKind, String), Vec<OwnerReference>> = BTreeMap::new();
    for (owner, pins) in revisions {
        for copy in copies_named(&pins) {
            by_copy.entry(copy).or_default().push(owner.clone());
        }
    }
    let mut out = Adoption::default();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for ((kind, name), revisions) in by_copy {
        let updated = match kind {
            SourceKind::ConfigMap => reown(&cms, &name, &revisions, workload_uid).await?,
            SourceKind::Secret => reown(&secrets, &name, &revisions, workload_uid).await?,
        };
        match updated {
            None => out.missing.push(source_key(&SourceName { kind, name })),
            Some((added, released)) => {
                out.adopted += added;
                out.released += usize::from(released);
            }
        }
    }
    Ok(out)
}

/// Sets a copy's owners; `None` when it does not exist, else (owners added, workload dropped).
async fn reown<K>(
    api: &Api<K>,
    name: &str,
    revisions: &[OwnerReference],
    workload_uid: &str,
) -> Result<Option<(usize, bool)>, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    for _ in 0..5 {
        let Some(mut obj) = api.get_opt(name).await? else {
            return Ok(None);
        };
        let current = obj.meta().owner_references.clone().unwrap_or_default();
        let Some(wanted) = owners_wanted(&current, revisions, workload_uid) else {
            return Ok(Some((0, false)));
        };
        let added = wanted.iter().filter(|o| !current.contains(o)).count();
        let released = current.iter().any(|o| o.uid == workload_uid)
            && !wanted.iter().any(|o| o.uid == workload_uid);
        obj.meta_mut().owner_references = Some(wanted);
        match api.replace(name, &PostParams::default(), &obj).await {
            Ok(_) => return Ok(Some((added, released))),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(Some((0, false)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::confighash::hash::Content;
    use proptest::prelude::*;

    fn owner(uid: &str) -> OwnerReference {
        OwnerReference {
            api_version: "apps/v1".into(),
            kind: "ReplicaSet".into(),
            name: format!("rs-{uid}"),
            uid: uid.into(),
            ..Default::default()
        }
    }

    #[test]
    fn names_fit_and_keep_the_digest() {
        let d = "0123456789abcdef";
        assert_eq!(name_for("app-config", d), "app-config-0123456789");
        let long = "a".repeat(300);
        let n = name_for(&long, d);
        assert_eq!(n.len(), MAX_NAME);
        assert!(n.ends_with("-0123456789"));
        assert_eq!(name_for(&format!("{}-", "b".repeat(242)), d).len(), 253);
    }

    #[test]
    fn the_annotation_lists_present_sources_only_and_round_trips() {
        let present = Source {
            kind: SourceKind::Secret,
            namespace: "ns".into(),
            name: "db".into(),
            content: Some(Content::default()),
            secret_type: Some("kubernetes.io/basic-auth".into()),
        };
        let absent = Source::absent(&SourceName::config_map("optional"), "ns");
        let per_source: BTreeMap<_, _> = [
            (present.source_name(), "ffeeddccbbaa99".to_string()),
            (absent.source_name(), "00".to_string()),
        ]
        .into();
        let pins = desired(&[present.clone(), absent], &per_source);
        assert_eq!(pins.len(), 1);
        let value = annotation(&pins);
        assert_eq!(value, r#"{"secret/db":"db-ffeeddccbb"}"#);
        assert_eq!(
            copies_named(&value),
            vec![(SourceKind::Secret, "db-ffeeddccbb".to_string())]
        );
        let copy = secret_copy(&present, "db-ffeeddccbb", &owner("w")).expect("copy");
        assert_eq!(copy.immutable, Some(true));
        assert_eq!(copy.type_.as_deref(), Some("kubernetes.io/basic-auth"));
        assert!(config_map_copy(&present, "x", &owner("w")).is_none());
    }

    #[test]
    fn a_pinned_spec_reads_the_copies_and_pinning_again_changes_nothing() {
        let mut spec: PodSpec = serde_json::from_value(serde_json::json!({
            "containers": [{"name": "app", "image": "app",
                "envFrom": [{"configMapRef": {"name": "cfg"}}, {"secretRef": {"name": "cfg"}}],
                "env": [{"name": "P", "valueFrom": {"secretKeyRef": {"name": "db", "key": "p"}}},
                        {"name": "O", "valueFrom": {"configMapKeyRef": {"name": "other", "key": "k"}}}]}],
            "initContainers": [{"name": "init", "image": "i",
                "envFrom": [{"configMapRef": {"name": "cfg"}}]}],
            "volumes": [
                {"name": "a", "configMap": {"name": "cfg"}},
                {"name": "b", "secret": {"secretName": "db"}},
                {"name": "c", "projected": {"sources": [{"configMap": {"name": "cfg"}}, {"secret": {"name": "db"}}]}}
            ]
        }))
        .expect("a PodSpec");
        let pins = pins_from_annotation(
            r#"{"configmap/cfg":"cfg-0123456789","secret/db":"db-abcdef0123"}"#,
        );
        assert_eq!(pins.len(), 2);
        assert_eq!(pin_spec(&mut spec, &pins), 7);
        let v = serde_json::to_value(&spec).expect("json");
        assert_eq!(
            v["containers"][0]["envFrom"][0]["configMapRef"]["name"],
            "cfg-0123456789"
        );
        assert_eq!(
            v["containers"][0]["envFrom"][1]["secretRef"]["name"], "cfg",
            "a Secret named like the ConfigMap is not its copy"
        );
        assert_eq!(
            v["containers"][0]["env"][1]["valueFrom"]["configMapKeyRef"]["name"],
            "other"
        );
        assert_eq!(
            v["volumes"][2]["projected"]["sources"][1]["secret"]["name"],
            "db-abcdef0123"
        );
        assert_eq!(pin_spec(&mut spec, &pins), 0);
        assert!(pins_from_annotation("not json").is_empty());
    }

    #[test]
    fn a_controller_revision_names_its_pins() {
        let cr: ControllerRevision = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db-5d8c7"},
            "revision": 2,
            "data": {"spec": {"template": {"$patch": "replace", "metadata": {"annotations": {
                keys::CONFIG_SNAPSHOTS: "{\"configmap/app\":\"app-0123456789\"}"
            }}}}}
        }))
        .expect("a ControllerRevision");
        let pins = revision_pins(&cr).expect("pins");
        assert_eq!(
            copies_named(&pins),
            vec![(SourceKind::ConfigMap, "app-0123456789".to_string())]
        );
        let bare: ControllerRevision =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}, "revision": 1}))
                .expect("a ControllerRevision");
        assert_eq!(revision_pins(&bare), None);
    }

    proptest! {
        /// Owners after adoption: every revision, and the workload exactly when no revision
        /// names the copy; other owners are kept; a second pass changes nothing.
        #[test]
        fn adoption_keeps_the_copy_owned_and_converges(
            current in proptest::collection::btree_set(0u8..6, 0..4),
            revisions in proptest::collection::btree_set(1u8..6, 0..4),
        ) {
            let workload = "0";
            let current: Vec<_> = current.iter().map(|u| owner(&u.to_string())).collect();
            let revisions: Vec<_> = revisions.iter().map(|u| owner(&u.to_string())).collect();
            let after = owners_wanted(&current, &revisions, workload).unwrap_or(current.clone());
            for r in &revisions {
                prop_assert!(after.contains(r));
            }
            let has_workload = after.iter().any(|o| o.uid == workload);
            let had_workload = current.iter().any(|o| o.uid == workload);
            prop_assert_eq!(has_workload, had_workload && revisions.is_empty());
            for o in &current {
                prop_assert!(o.uid == workload || after.contains(o), "an owner was dropped");
            }
            prop_assert!(!after.is_empty() || current.is_empty(), "a copy left without owners");
            prop_assert_eq!(owners_wanted(&after, &revisions, workload), None);
        }
    }
}
