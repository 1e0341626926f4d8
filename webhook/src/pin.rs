//! Config snapshots: a pod's references to ConfigMaps and Secrets, rewritten to the immutable
//! snapshots its revision is pinned to.
//!
//! In snapshot mode the operator copies each ConfigMap and Secret a workload's pods read into an
//! immutable snapshot and writes, into the pod template, the annotation
//! `appset.dev/config-snapshots` ([`CONFIG_SNAPSHOTS`]): a JSON object from `configmap/<source>`
//! or `secret/<source>` to the snapshot's name, for instance
//! `{"configmap/app-config":"app-config-7f3a9c21e4","secret/db":"db-0b4e99d2aa"}`. Every pod of
//! that revision carries it. [`pin`] reads a pod's own annotation and returns the JSON Patch
//! (`replace` operations only, [`ReplaceOp`]) that makes the pod read the snapshots; the
//! `/pin-config` route of [`crate::server`] answers with it.
//!
//! References rewritten, in every container of `spec.containers`, `spec.initContainers` and
//! `spec.ephemeralContainers`: `envFrom[].configMapRef.name`, `envFrom[].secretRef.name`,
//! `env[].valueFrom.configMapKeyRef.name`, `env[].valueFrom.secretKeyRef.name`; in
//! `spec.volumes[]`: `configMap.name`, `secret.secretName`, `projected.sources[].configMap.name`
//! and `projected.sources[].secret.name`.
//!
//! Guarantees:
//!
//! * **Pure**: the answer is a function of the pod alone (no API call, no cache).
//! * **Kinds are kept apart**: a ConfigMap reference is rewritten only by a `configmap/` entry
//!   and a Secret reference only by a `secret/` entry; a name that is not a source in the map is
//!   left alone, and so is every other field (only existing strings are replaced, no list
//!   changes length).
//! * **Idempotent**: a rewritten reference names a snapshot, which is not a source of the map
//!   (a map where a snapshot name is also a source of the same kind is refused as malformed,
//!   since a second pass, such as a webhook reinvocation, would rewrite it again), so pinning a
//!   pinned pod yields no operation.
//! * **Strict about the annotation**: a value that is not a JSON object of strings, a key that
//!   is not `configmap/<name>` or `secret/<name>`, a key given twice, an empty source name or a
//!   snapshot name that is not a DNS-1123 subdomain is [`Pin::Malformed`] (the route denies the
//!   pod): a pod that should read a snapshot must not silently read the live source.
//!
//! Nothing here logs; messages name the annotation, keys and names only, never other pod fields.

use std::collections::BTreeMap;
use std::fmt;

use appset_crds::keys::CONFIG_SNAPSHOTS;
use k8s_openapi::api::core::v1::{EnvFromSource, EnvVar, Pod, Volume};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;

use crate::patch::ReplaceOp;

/// What [`pin`] found to do for a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Pin {
    /// The pod has no `appset.dev/config-snapshots` annotation.
    NoAnnotation,
    /// The annotation is well-formed but no reference names one of its sources (the pod is
    /// already pinned, or reads none of them).
    Unchanged,
    /// The `replace` operations that point the references at the snapshots (never empty).
    Patch(Vec<ReplaceOp>),
    /// The annotation is malformed.
    Malformed(Malformed),
}

/// What is wrong with a pod's `appset.dev/config-snapshots` annotation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {CONFIG_SNAPSHOTS} is malformed: {0}")]
pub struct Malformed(pub String);

/// The kind of object a reference names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A ConfigMap (`configmap/<name>` in the annotation).
    ConfigMap,
    /// A Secret (`secret/<name>` in the annotation).
    Secret,
}

impl Kind {
    /// The prefix of this kind's keys in the annotation, without the `/`.
    pub fn prefix(self) -> &'static str {
        match self {
            Kind::ConfigMap => "configmap",
            Kind::Secret => "secret",
        }
    }
}

/// A parsed annotation: source name to snapshot name, per kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshots {
    /// `configmap/<source>` entries.
    pub configmaps: BTreeMap<String, String>,
    /// `secret/<source>` entries.
    pub secrets: BTreeMap<String, String>,
}

impl Snapshots {
    /// Parses and checks the annotation's value.
    pub fn parse(raw: &str) -> Result<Self, Malformed> {
        let mut de = serde_json::Deserializer::from_str(raw);
        let entries = de
            .deserialize_any(EntriesVisitor)
            .and_then(|e| de.end().map(|()| e))
            .map_err(|e| Malformed(format!("not a JSON object of strings: {e}")))?;
        let mut out = Snapshots::default();
        for (key, snapshot) in entries {
            let (kind, source) = match key.split_once('/') {
                Some(("configmap", s)) => (Kind::ConfigMap, s),
                Some(("secret", s)) => (Kind::Secret, s),
                _ => {
                    return Err(Malformed(format!(
                        "key {key:?} is not of the form configmap/<name> or secret/<name>"
                    )));
                }
            };
            if source.is_empty() {
                return Err(Malformed(format!("key {key:?} names no source")));
            }
            if let Err(why) = check_subdomain(&snapshot) {
                return Err(Malformed(format!(
                    "snapshot name {snapshot:?} of {key:?} is not a valid DNS-1123 subdomain: {why}"
                )));
            }
            if out
                .map_mut(kind)
                .insert(source.to_string(), snapshot)
                .is_some()
            {
                return Err(Malformed(format!("key {key:?} is given twice")));
            }
        }
        for kind in [Kind::ConfigMap, Kind::Secret] {
            let map = out.map(kind);
            if let Some((source, snapshot)) = map
                .iter()
                .find(|(source, snapshot)| source != snapshot && map.contains_key(*snapshot))
            {
                return Err(Malformed(format!(
                    "snapshot name {snapshot:?} of \"{p}/{source}\" is itself a source (\"{p}/{snapshot}\"), \
                     so a second pass would rewrite it again",
                    p = kind.prefix()
                )));
            }
        }
        Ok(out)
    }

    /// The entries of one kind.
    pub fn map(&self, kind: Kind) -> &BTreeMap<String, String> {
        match kind {
            Kind::ConfigMap => &self.configmaps,
            Kind::Secret => &self.secrets,
        }
    }

    fn map_mut(&mut self, kind: Kind) -> &mut BTreeMap<String, String> {
        match kind {
            Kind::ConfigMap => &mut self.configmaps,
            Kind::Secret => &mut self.secrets,
        }
    }

    /// The `replace` operations that point `pod`'s references at the snapshots, in document
    /// order (containers, init containers, ephemeral containers, volumes).
    pub fn rewrites(&self, pod: &Pod) -> Vec<ReplaceOp> {
        let mut r = Rewriter {
            snapshots: self,
            ops: Vec::new(),
        };
        let Some(spec) = &pod.spec else {
            return r.ops;
        };
        for (i, c) in spec.containers.iter().enumerate() {
            r.container("containers", i, c.env.as_deref(), c.env_from.as_deref());
        }
        for (i, c) in spec.init_containers.iter().flatten().enumerate() {
            r.container("initContainers", i, c.env.as_deref(), c.env_from.as_deref());
        }
        for (i, c) in spec.ephemeral_containers.iter().flatten().enumerate() {
            r.container(
                "ephemeralContainers",
                i,
                c.env.as_deref(),
                c.env_from.as_deref(),
            );
        }
        for (i, v) in spec.volumes.iter().flatten().enumerate() {
            r.volume(i, v);
        }
        r.ops
    }
}

/// Reads a pod's annotation and returns what to do: see [`Pin`].
pub fn pin(pod: &Pod) -> Pin {
    let Some(raw) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CONFIG_SNAPSHOTS))
    else {
        return Pin::NoAnnotation;
    };
    match Snapshots::parse(raw) {
        Err(e) => Pin::Malformed(e),
        Ok(snapshots) => {
            let ops = snapshots.rewrites(pod);
            if ops.is_empty() {
                Pin::Unchanged
            } else {
                Pin::Patch(ops)
            }
        }
    }
}

struct Rewriter<'a> {
    snapshots: &'a Snapshots,
    ops: Vec<ReplaceOp>,
}

impl Rewriter<'_> {
    /// Replaces the name at `tokens` when it is a source of `kind` (and not its own snapshot).
    fn at(&mut self, kind: Kind, name: Option<&str>, tokens: &[&str]) {
        if let Some(name) = name
            && let Some(snapshot) = self.snapshots.map(kind).get(name)
            && snapshot != name
        {
            self.ops
                .push(ReplaceOp::new(tokens, Value::String(snapshot.clone())));
        }
    }

    fn container(
        &mut self,
        list: &str,
        index: usize,
        env: Option<&[EnvVar]>,
        env_from: Option<&[EnvFromSource]>,
    ) {
        let c = index.to_string();
        for (j, e) in env_from.into_iter().flatten().enumerate() {
            let j = j.to_string();
            let base = ["spec", list, &c, "envFrom", &j];
            if let Some(r) = &e.config_map_ref {
                self.at(
                    Kind::ConfigMap,
                    Some(&r.name),
                    &[&base[..], &["configMapRef", "name"]].concat(),
                );
            }
            if let Some(r) = &e.secret_ref {
                self.at(
                    Kind::Secret,
                    Some(&r.name),
                    &[&base[..], &["secretRef", "name"]].concat(),
                );
            }
        }
        for (j, e) in env.into_iter().flatten().enumerate() {
            let Some(from) = &e.value_from else { continue };
            let j = j.to_string();
            let base = ["spec", list, &c, "env", &j, "valueFrom"];
            if let Some(r) = &from.config_map_key_ref {
                self.at(
                    Kind::ConfigMap,
                    Some(&r.name),
                    &[&base[..], &["configMapKeyRef", "name"]].concat(),
                );
            }
            if let Some(r) = &from.secret_key_ref {
                self.at(
                    Kind::Secret,
                    Some(&r.name),
                    &[&base[..], &["secretKeyRef", "name"]].concat(),
                );
            }
        }
    }

    fn volume(&mut self, index: usize, v: &Volume) {
        let i = index.to_string();
        if let Some(cm) = &v.config_map {
            self.at(
                Kind::ConfigMap,
                Some(&cm.name),
                &["spec", "volumes", &i, "configMap", "name"],
            );
        }
        if let Some(s) = &v.secret {
            self.at(
                Kind::Secret,
                s.secret_name.as_deref(),
                &["spec", "volumes", &i, "secret", "secretName"],
            );
        }
        let sources = v.projected.iter().flat_map(|p| p.sources.iter().flatten());
        for (j, p) in sources.enumerate() {
            let j = j.to_string();
            let base = ["spec", "volumes", &i, "projected", "sources", &j];
            if let Some(cm) = &p.config_map {
                self.at(
                    Kind::ConfigMap,
                    Some(&cm.name),
                    &[&base[..], &["configMap", "name"]].concat(),
                );
            }
            if let Some(s) = &p.secret {
                self.at(
                    Kind::Secret,
                    Some(&s.name),
                    &[&base[..], &["secret", "name"]].concat(),
                );
            }
        }
    }
}

/// Checks a DNS-1123 subdomain (RFC 1123, as Kubernetes validates object names): at most 253
/// characters, dot-separated labels of lowercase letters, digits and `-` that start and end
/// with a letter or digit.
pub fn check_subdomain(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > 253 {
        return Err("it is longer than 253 characters");
    }
    for label in name.split('.') {
        let b = label.as_bytes();
        let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        match (b.first(), b.last()) {
            (Some(f), Some(l)) if alnum(f) && alnum(l) => {}
            _ => {
                return Err(
                    "each dot-separated part must start and end with a lowercase letter or digit",
                );
            }
        }
        if !b.iter().all(|c| alnum(c) || *c == b'-') {
            return Err("only lowercase letters, digits, '-' and '.' are allowed");
        }
    }
    Ok(())
}

/// Reads a JSON object of strings as its entries in order, duplicates kept (a `Map` would keep
/// only the last of a repeated key).
struct EntriesVisitor;

impl<'de> Visitor<'de> for EntriesVisitor {
    type Value = Vec<(String, String)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object whose values are strings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
        while let Some(entry) = map.next_entry::<String, String>()? {
            out.push(entry);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
