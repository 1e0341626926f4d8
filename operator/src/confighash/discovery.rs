//! Reference discovery: which ConfigMaps and Secrets a workload's pods read, and which of their
//! keys.
//!
//! Input: the workload's own annotations and its pod template's [`PodSpec`]. Output:
//! [`References`], a sorted map from each source ([`SourceId`] without the namespace, which is
//! always the workload's) to the [`KeySet`] that counts and whether the source is optional.
//!
//! Forms recognised, in containers, init containers and ephemeral containers alike:
//! * `env[].valueFrom.configMapKeyRef` / `secretKeyRef`: only the named key counts;
//! * `envFrom[].configMapRef` / `secretRef`: every key counts;
//! * `volumes[].configMap` / `secret`: every key, or only the keys listed in `items`;
//! * `volumes[].projected.sources[].configMap` / `secret`: the same;
//! * the explicit lists [`keys::CONFIG_ROLLOUT_CONFIGMAPS`] / [`keys::CONFIG_ROLLOUT_SECRETS`]
//!   (and, in compatibility mode, stakater/Reloader's lists): every key, and required.
//!
//! When one source is referenced several times the key sets are merged (a whole-source reference
//! wins over key references), and the source is optional only when every reference says
//! `optional: true`. Pure: no I/O, driven by unit tests.

use std::collections::{BTreeMap, BTreeSet};

use appset_crds::keys;
use k8s_openapi::api::core::v1::{EnvFromSource, EnvVar, KeyToPath, PodSpec, Volume};

/// The two kinds of configuration source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SourceKind {
    /// A `v1/ConfigMap`.
    ConfigMap,
    /// A `v1/Secret`.
    Secret,
}

impl SourceKind {
    /// The Kubernetes kind name (`ConfigMap` or `Secret`).
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::ConfigMap => "ConfigMap",
            SourceKind::Secret => "Secret",
        }
    }
}

impl std::fmt::Display for SourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A source named by kind and name, in the workload's namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceName {
    /// ConfigMap or Secret.
    pub kind: SourceKind,
    /// The object's name.
    pub name: String,
}

impl SourceName {
    /// A ConfigMap by name.
    pub fn config_map(name: impl Into<String>) -> Self {
        Self {
            kind: SourceKind::ConfigMap,
            name: name.into(),
        }
    }

    /// A Secret by name.
    pub fn secret(name: impl Into<String>) -> Self {
        Self {
            kind: SourceKind::Secret,
            name: name.into(),
        }
    }
}

impl std::fmt::Display for SourceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind, self.name)
    }
}

/// Which keys of a source count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySet {
    /// Every key (`envFrom`, a volume without `items`, an explicit list).
    All,
    /// Only these keys (key refs, volume `items`).
    Only(BTreeSet<String>),
}

impl KeySet {
    /// Whether `key` counts.
    pub fn contains(&self, key: &str) -> bool {
        match self {
            KeySet::All => true,
            KeySet::Only(keys) => keys.contains(key),
        }
    }

    fn merge(&mut self, other: KeySet) {
        match (&mut *self, other) {
            (KeySet::All, _) => {}
            (this @ KeySet::Only(_), KeySet::All) => *this = KeySet::All,
            (KeySet::Only(mine), KeySet::Only(theirs)) => mine.extend(theirs),
        }
    }
}

/// How a workload uses one source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Usage {
    /// The keys that count.
    pub keys: KeySet,
    /// `true` when every reference is `optional: true`: a missing source then hashes as absent
    /// instead of blocking the rollout.
    pub optional: bool,
}

/// Every source a workload uses, sorted by kind then name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct References {
    /// Source → usage.
    pub sources: BTreeMap<SourceName, Usage>,
}

impl References {
    /// Records one reference, merging with earlier references to the same source.
    pub fn add(&mut self, source: SourceName, keys: KeySet, optional: bool) {
        match self.sources.get_mut(&source) {
            Some(usage) => {
                usage.keys.merge(keys);
                usage.optional &= optional;
            }
            None => {
                self.sources.insert(source, Usage { keys, optional });
            }
        }
    }

    /// Adds every reference of `other`.
    pub fn extend(&mut self, other: References) {
        for (source, usage) in other.sources {
            self.add(source, usage.keys, usage.optional);
        }
    }

    /// Whether no source is referenced.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// The number of sources.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// The referenced sources, sorted.
    pub fn names(&self) -> impl Iterator<Item = &SourceName> {
        self.sources.keys()
    }
}

/// Every ConfigMap and Secret the pod spec references, in any container, init container,
/// ephemeral container or volume.
pub fn references(spec: &PodSpec) -> References {
    let mut refs = References::default();
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .map(|c| (c.env.as_deref(), c.env_from.as_deref()));
    let ephemeral = spec
        .ephemeral_containers
        .iter()
        .flatten()
        .map(|c| (c.env.as_deref(), c.env_from.as_deref()));
    for (env, env_from) in containers.chain(ephemeral) {
        env_refs(env.unwrap_or_default(), &mut refs);
        env_from_refs(env_from.unwrap_or_default(), &mut refs);
    }
    for volume in spec.volumes.iter().flatten() {
        volume_refs(volume, &mut refs);
    }
    refs
}

fn env_refs(env: &[EnvVar], refs: &mut References) {
    for source in env.iter().filter_map(|e| e.value_from.as_ref()) {
        if let Some(sel) = &source.config_map_key_ref {
            refs.add(
                SourceName::config_map(&sel.name),
                KeySet::Only(BTreeSet::from([sel.key.clone()])),
                sel.optional.unwrap_or(false),
            );
        }
        if let Some(sel) = &source.secret_key_ref {
            refs.add(
                SourceName::secret(&sel.name),
                KeySet::Only(BTreeSet::from([sel.key.clone()])),
                sel.optional.unwrap_or(false),
            );
        }
    }
}

fn env_from_refs(env_from: &[EnvFromSource], refs: &mut References) {
    for source in env_from {
        if let Some(r) = &source.config_map_ref {
            refs.add(
                SourceName::config_map(&r.name),
                KeySet::All,
                r.optional.unwrap_or(false),
            );
        }
        if let Some(r) = &source.secret_ref {
            refs.add(
                SourceName::secret(&r.name),
                KeySet::All,
                r.optional.unwrap_or(false),
            );
        }
    }
}

fn item_keys(items: Option<&Vec<KeyToPath>>) -> KeySet {
    match items {
        Some(items) if !items.is_empty() => {
            KeySet::Only(items.iter().map(|i| i.key.clone()).collect())
        }
        _ => KeySet::All,
    }
}

fn volume_refs(volume: &Volume, refs: &mut References) {
    if let Some(cm) = &volume.config_map {
        refs.add(
            SourceName::config_map(&cm.name),
            item_keys(cm.items.as_ref()),
            cm.optional.unwrap_or(false),
        );
    }
    if let Some(secret) = &volume.secret
        && let Some(name) = &secret.secret_name
    {
        refs.add(
            SourceName::secret(name),
            item_keys(secret.items.as_ref()),
            secret.optional.unwrap_or(false),
        );
    }
    let projections = volume
        .projected
        .iter()
        .flat_map(|p| p.sources.iter().flatten());
    for projection in projections {
        if let Some(cm) = &projection.config_map {
            refs.add(
                SourceName::config_map(&cm.name),
                item_keys(cm.items.as_ref()),
                cm.optional.unwrap_or(false),
            );
        }
        if let Some(secret) = &projection.secret {
            refs.add(
                SourceName::secret(&secret.name),
                item_keys(secret.items.as_ref()),
                secret.optional.unwrap_or(false),
            );
        }
    }
}

/// How a workload opted in to config rollout, read from its own annotations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OptIn {
    /// Discover every source the pod template references.
    pub auto: bool,
    /// ConfigMaps listed explicitly (referenced by the pod template or not).
    pub config_maps: BTreeSet<String>,
    /// Secrets listed explicitly.
    pub secrets: BTreeSet<String>,
}

impl OptIn {
    /// Reads the opt-in annotations. `reloader` also honours stakater/Reloader's keys.
    /// Returns `None` when the workload has not opted in.
    pub fn from_annotations(
        annotations: &BTreeMap<String, String>,
        reloader: bool,
    ) -> Option<Self> {
        let mut opt = OptIn::default();
        let get = |key: &str| annotations.get(key).map(|v| v.trim());
        if matches!(
            get(keys::CONFIG_ROLLOUT),
            Some(keys::CONFIG_ROLLOUT_AUTO | keys::CONFIG_ROLLOUT_SNAPSHOT)
        ) {
            opt.auto = true;
        }
        opt.config_maps
            .extend(split_list(get(keys::CONFIG_ROLLOUT_CONFIGMAPS)));
        opt.secrets
            .extend(split_list(get(keys::CONFIG_ROLLOUT_SECRETS)));
        if reloader {
            if get(keys::RELOADER_AUTO).is_some_and(|v| v.eq_ignore_ascii_case("true")) {
                opt.auto = true;
            }
            opt.config_maps
                .extend(split_list(get(keys::RELOADER_CONFIGMAPS)));
            opt.secrets.extend(split_list(get(keys::RELOADER_SECRETS)));
        }
        let opted = opt.auto || !opt.config_maps.is_empty() || !opt.secrets.is_empty();
        opted.then_some(opt)
    }

    /// The sources this workload depends on: the pod template's references when `auto`, plus
    /// the explicit lists (every key, required).
    pub fn references(&self, spec: Option<&PodSpec>) -> References {
        let mut refs = match (self.auto, spec) {
            (true, Some(spec)) => references(spec),
            _ => References::default(),
        };
        for name in &self.config_maps {
            refs.add(SourceName::config_map(name), KeySet::All, false);
        }
        for name in &self.secrets {
            refs.add(SourceName::secret(name), KeySet::All, false);
        }
        refs
    }
}

fn split_list(value: Option<&str>) -> impl Iterator<Item = String> + '_ {
    value
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(value: serde_json::Value) -> PodSpec {
        serde_json::from_value(value).unwrap()
    }

    fn only(keys: &[&str]) -> KeySet {
        KeySet::Only(keys.iter().map(|k| k.to_string()).collect())
    }

    fn usage(refs: &References, source: SourceName) -> Usage {
        refs.sources
            .get(&source)
            .cloned()
            .unwrap_or_else(|| panic!("{source} not found in {refs:?}"))
    }

    #[test]
    fn env_key_refs_count_only_their_keys() {
        let refs = references(&spec(json!({"containers": [{"name": "a", "env": [
            {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k1"}}},
            {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k2"}}},
            {"name": "C", "valueFrom": {"secretKeyRef": {"name": "s", "key": "password", "optional": true}}},
            {"name": "D", "value": "plain"},
            {"name": "E", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
        ]}]})));
        assert_eq!(refs.len(), 2);
        assert_eq!(
            usage(&refs, SourceName::config_map("cm")),
            Usage {
                keys: only(&["k1", "k2"]),
                optional: false
            }
        );
        assert_eq!(
            usage(&refs, SourceName::secret("s")),
            Usage {
                keys: only(&["password"]),
                optional: true
            }
        );
    }

    #[test]
    fn env_from_counts_every_key() {
        let refs = references(&spec(json!({"containers": [{"name": "a", "envFrom": [
            {"configMapRef": {"name": "cm"}, "prefix": "X_"},
            {"secretRef": {"name": "s", "optional": true}}
        ]}]})));
        assert_eq!(
            usage(&refs, SourceName::config_map("cm")),
            Usage {
                keys: KeySet::All,
                optional: false
            }
        );
        assert_eq!(
            usage(&refs, SourceName::secret("s")),
            Usage {
                keys: KeySet::All,
                optional: true
            }
        );
    }

    #[test]
    fn init_and_ephemeral_containers_count() {
        let refs = references(&spec(json!({
            "containers": [{"name": "main"}],
            "initContainers": [{"name": "init", "envFrom": [{"configMapRef": {"name": "init-cm"}}]}],
            "ephemeralContainers": [{"name": "debug", "env": [
                {"name": "T", "valueFrom": {"secretKeyRef": {"name": "debug-s", "key": "t"}}}
            ]}]
        })));
        let names: Vec<String> = refs.names().map(ToString::to_string).collect();
        assert_eq!(names, ["ConfigMap init-cm", "Secret debug-s"]);
    }

    #[test]
    fn volumes_count_all_keys_or_their_items() {
        let refs = references(&spec(json!({"containers": [{"name": "a"}], "volumes": [
            {"name": "v1", "configMap": {"name": "whole"}},
            {"name": "v2", "configMap": {"name": "part", "items": [{"key": "app.yaml", "path": "a"}]}},
            {"name": "v3", "secret": {"secretName": "tls", "optional": true}},
            {"name": "v4", "secret": {"secretName": "creds", "items": [{"key": "user", "path": "u"}, {"key": "pass", "path": "p"}]}},
            {"name": "v5", "emptyDir": {}},
            {"name": "v6", "secret": {}}
        ]})));
        assert_eq!(refs.len(), 4);
        assert_eq!(
            usage(&refs, SourceName::config_map("whole")).keys,
            KeySet::All
        );
        assert_eq!(
            usage(&refs, SourceName::config_map("part")).keys,
            only(&["app.yaml"])
        );
        assert_eq!(
            usage(&refs, SourceName::secret("tls")),
            Usage {
                keys: KeySet::All,
                optional: true
            }
        );
        assert_eq!(
            usage(&refs, SourceName::secret("creds")).keys,
            only(&["pass", "user"])
        );
    }

    #[test]
    fn projected_volumes_count() {
        let refs = references(&spec(json!({"containers": [{"name": "a"}], "volumes": [
            {"name": "p", "projected": {"sources": [
                {"configMap": {"name": "pc", "items": [{"key": "k", "path": "k"}]}},
                {"secret": {"name": "ps", "optional": true}},
                {"downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
                {"serviceAccountToken": {"path": "token"}}
            ]}}
        ]})));
        assert_eq!(refs.len(), 2);
        assert_eq!(
            usage(&refs, SourceName::config_map("pc")).keys,
            only(&["k"])
        );
        assert_eq!(
            usage(&refs, SourceName::secret("ps")),
            Usage {
                keys: KeySet::All,
                optional: true
            }
        );
    }

    #[test]
    fn whole_reference_wins_and_required_wins() {
        let refs = references(&spec(json!({"containers": [{"name": "a",
            "env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k", "optional": true}}}],
            "envFrom": [{"configMapRef": {"name": "cm"}}]
        }]})));
        assert_eq!(
            usage(&refs, SourceName::config_map("cm")),
            Usage {
                keys: KeySet::All,
                optional: false
            }
        );
        // Merging in the other order gives the same result.
        let mut other = References::default();
        other.add(SourceName::config_map("cm"), KeySet::All, false);
        other.add(SourceName::config_map("cm"), only(&["k"]), true);
        assert_eq!(other, refs);
    }

    #[test]
    fn a_configmap_and_a_secret_of_the_same_name_are_distinct() {
        let refs = references(&spec(json!({"containers": [{"name": "a", "envFrom": [
            {"configMapRef": {"name": "same"}}, {"secretRef": {"name": "same"}}
        ]}]})));
        assert_eq!(refs.len(), 2);
    }

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn opt_in_annotations() {
        assert_eq!(OptIn::from_annotations(&annotations(&[]), true), None);
        assert_eq!(
            OptIn::from_annotations(&annotations(&[(keys::CONFIG_ROLLOUT, "off")]), false),
            None
        );
        let auto = OptIn::from_annotations(&annotations(&[(keys::CONFIG_ROLLOUT, "auto")]), false)
            .unwrap();
        assert!(auto.auto);
        let listed = OptIn::from_annotations(
            &annotations(&[
                (keys::CONFIG_ROLLOUT_CONFIGMAPS, " a, b ,,"),
                (keys::CONFIG_ROLLOUT_SECRETS, "x"),
            ]),
            false,
        )
        .unwrap();
        assert!(!listed.auto);
        assert_eq!(listed.config_maps, BTreeSet::from(["a".into(), "b".into()]));
        assert_eq!(listed.secrets, BTreeSet::from(["x".into()]));
    }

    #[test]
    fn reloader_annotations_only_behind_the_flag() {
        let reloader = annotations(&[
            (keys::RELOADER_AUTO, "true"),
            (keys::RELOADER_CONFIGMAPS, "c1"),
            (keys::RELOADER_SECRETS, "s1,s2"),
        ]);
        assert_eq!(OptIn::from_annotations(&reloader, false), None);
        let opt = OptIn::from_annotations(&reloader, true).unwrap();
        assert!(opt.auto);
        assert_eq!(opt.config_maps, BTreeSet::from(["c1".into()]));
        assert_eq!(opt.secrets.len(), 2);
        let only_list =
            OptIn::from_annotations(&annotations(&[(keys::RELOADER_CONFIGMAPS, "c")]), true)
                .unwrap();
        assert!(!only_list.auto);
    }

    #[test]
    fn explicit_lists_are_required_whole_sources_even_without_auto() {
        let pod = spec(
            json!({"containers": [{"name": "a", "envFrom": [{"configMapRef": {"name": "referenced"}}]}]}),
        );
        let opt = OptIn::from_annotations(
            &annotations(&[(keys::CONFIG_ROLLOUT_CONFIGMAPS, "listed")]),
            false,
        )
        .unwrap();
        let refs = opt.references(Some(&pod));
        let names: Vec<String> = refs.names().map(ToString::to_string).collect();
        assert_eq!(names, ["ConfigMap listed"]);

        let both = OptIn::from_annotations(
            &annotations(&[
                (keys::CONFIG_ROLLOUT, "auto"),
                (keys::CONFIG_ROLLOUT_SECRETS, "extra"),
            ]),
            false,
        )
        .unwrap();
        let refs = both.references(Some(&pod));
        assert_eq!(refs.len(), 2);
        assert_eq!(
            usage(&refs, SourceName::secret("extra")),
            Usage {
                keys: KeySet::All,
                optional: false
            }
        );
    }
}
