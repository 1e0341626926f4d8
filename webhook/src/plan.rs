//! Injection planning: from a pod and the PodInjections that match it, the JSON Patch that
//! injects them, or the reason the pod must be denied.
//!
//! A pure function, [`plan`], with no I/O. Its guarantees:
//!
//! * **Order.** PodInjections are applied in name order. Init containers of a PodInjection with
//!   `initContainerPlacement: First` go before the pod's own init containers, `Last` after them;
//!   within each group they keep PodInjection name order, then declaration order.
//! * **Append only.** The patch creates a list the pod lacks, inserts into `initContainers` (for
//!   `First`) or appends; it never replaces or removes anything (see [`crate::patch`]).
//! * **Mounts.** Each mount goes into the pod's own containers it names, or into all of them when
//!   it names none; never into init containers (injected ones declare their own mounts). A named
//!   container missing from the pod is skipped with a warning returned to the client.
//! * **Conflicts.** An injected init container, volume or mount path that collides with an entry
//!   of the pod or of an earlier PodInjection is a no-op when identical and a denial otherwise;
//!   the message names both sides. Identity for containers ignores the fields the API server
//!   defaults before admission (`terminationMessagePath`, `terminationMessagePolicy`,
//!   `imagePullPolicy`, empty `resources`) when the PodInjection leaves them unset.
//! * **Idempotency.** The annotation `appset.dev/injected` records `name@generation` of every
//!   PodInjection applied; one already recorded is skipped, so a second pass (or a webhook
//!   reinvocation) yields no patch at all.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use appset_crds::keys;
use appset_crds::podinjection::{InitContainerPlacement, InjectedVolume, InjectedVolumeMount};
use appset_crds::{PodInjection, PodInjectionSpec};
use k8s_openapi::api::core::v1::{Container, EmptyDirVolumeSource, Pod, Volume, VolumeMount};
use serde_json::{Value, json};

use crate::patch::AddOp;

/// One PodInjection to consider: its name, generation and spec.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// The PodInjection's name.
    pub name: &'a str,
    /// Its `metadata.generation` (0 when unset).
    pub generation: i64,
    /// Its spec.
    pub spec: &'a PodInjectionSpec,
}

impl<'a> Candidate<'a> {
    /// The candidate view of a PodInjection object.
    pub fn of(pi: &'a PodInjection) -> Self {
        Self {
            name: pi.metadata.name.as_deref().unwrap_or_default(),
            generation: pi.metadata.generation.unwrap_or_default(),
            spec: &pi.spec,
        }
    }
}

/// What the webhook answers for a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Allow the pod as it is.
    Unchanged,
    /// Allow the pod with this patch.
    Patch {
        /// The JSON Patch operations, all `add`.
        ops: Vec<AddOp>,
        /// The PodInjections applied now, as `(name, generation)`.
        applied: Vec<(String, i64)>,
        /// Warnings for the client (for example a mount naming a container the pod lacks).
        warnings: Vec<String>,
    },
    /// Deny the pod: every conflict found, each naming both sides.
    Deny {
        /// The message returned to the client.
        message: String,
        /// The PodInjections on either side of a conflict, by name.
        injections: Vec<String>,
    },
}

/// A collision found while planning: the message and the other side.
#[derive(Debug)]
struct Conflict<'a> {
    message: String,
    other: Origin<'a>,
}

/// Where an entry of the pod comes from, for conflict messages.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Origin<'a> {
    Pod,
    Injection(&'a str),
}

impl fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Pod => write!(f, "the pod"),
            Origin::Injection(name) => write!(f, "PodInjection {name:?}"),
        }
    }
}

/// Parses the `appset.dev/injected` annotation: comma-separated `name@generation` entries.
/// Malformed entries are kept by name with generation 0, so they still prevent reinjection.
pub fn parse_injected(value: &str) -> Vec<(String, i64)> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|entry| match entry.rsplit_once('@') {
            Some((name, generation)) => (name.to_string(), generation.parse().unwrap_or_default()),
            None => (entry.to_string(), 0),
        })
        .collect()
}

/// Formats `appset.dev/injected` entries, sorted by name.
pub fn format_injected(entries: &[(String, i64)]) -> String {
    let mut sorted: Vec<&(String, i64)> = entries.iter().collect();
    sorted.sort();
    sorted
        .iter()
        .map(|(n, g)| format!("{n}@{g}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Plans the injection of `candidates` (already matched, in name order) into `pod`.
/// A pod without a spec (which the API server never sends) is left unchanged.
pub fn plan(pod: &Pod, candidates: &[Candidate<'_>]) -> Plan {
    let Some(spec) = pod.spec.as_ref() else {
        return Plan::Unchanged;
    };
    let recorded = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(keys::INJECTED))
        .map(|v| parse_injected(v))
        .unwrap_or_default();
    let todo: Vec<&Candidate<'_>> = candidates
        .iter()
        .filter(|c| !recorded.iter().any(|(n, _)| n == c.name))
        .collect();
    if todo.is_empty() {
        return Plan::Unchanged;
    }

    let mut state = State::of(spec);
    let mut conflicts = Vec::new();
    let mut involved = std::collections::BTreeSet::new();
    let mut warnings = Vec::new();
    let mut first_init = Vec::new();
    let mut last_init = Vec::new();
    let mut new_volumes = Vec::new();
    let mut new_mounts: BTreeMap<usize, Vec<VolumeMount>> = BTreeMap::new();

    for c in &todo {
        let origin = Origin::Injection(c.name);
        for ic in &c.spec.init_containers {
            match state.add_init_container(ic, origin) {
                Ok(true) => match c.spec.init_container_placement {
                    InitContainerPlacement::First => first_init.push(ic),
                    InitContainerPlacement::Last => last_init.push(ic),
                },
                Ok(false) => {}
                Err(conflict) => {
                    involved.insert(c.name.to_string());
                    if let Origin::Injection(other) = conflict.other {
                        involved.insert(other.to_string());
                    }
                    conflicts.push(conflict.message);
                }
            }
        }
        for v in &c.spec.volumes {
            match state.add_volume(v, origin) {
                Ok(true) => new_volumes.push(volume_of(v)),
                Ok(false) => {}
                Err(conflict) => {
                    involved.insert(c.name.to_string());
                    if let Origin::Injection(other) = conflict.other {
                        involved.insert(other.to_string());
                    }
                    conflicts.push(conflict.message);
                }
            }
        }
        for m in &c.spec.volume_mounts {
            let targets: Vec<usize> = if m.containers.is_empty() {
                (0..spec.containers.len()).collect()
            } else {
                m.containers
                    .iter()
                    .filter_map(|name| {
                        let idx = spec.containers.iter().position(|k| &k.name == name);
                        if idx.is_none() {
                            warnings.push(format!(
                                "PodInjection {:?}: container {name:?} named in volumeMounts is not in the pod; mount of volume {:?} skipped",
                                c.name, m.name
                            ));
                        }
                        idx
                    })
                    .collect()
            };
            for idx in targets {
                match state.add_mount(idx, m, origin) {
                    Ok(true) => new_mounts.entry(idx).or_default().push(mount_of(m)),
                    Ok(false) => {}
                    Err(conflict) => {
                        involved.insert(c.name.to_string());
                        if let Origin::Injection(other) = conflict.other {
                            involved.insert(other.to_string());
                        }
                        conflicts.push(conflict.message);
                    }
                }
            }
        }
    }

    if !conflicts.is_empty() {
        return Plan::Deny {
            message: format!(
                "appset injection conflict: {}; make the entries identical, rename one, or opt the pod out with {}: {}",
                conflicts.join("; "),
                keys::INJECTION_POD_OPT_OUT,
                keys::INJECTION_DISABLED
            ),
            injections: involved.into_iter().collect(),
        };
    }

    let mut ops = Vec::with_capacity(
        first_init.len()
            + last_init.len()
            + new_volumes.len()
            + new_mounts.values().map(Vec::len).sum::<usize>()
            + 1,
    );
    match &spec.init_containers {
        None => {
            let all: Vec<&Container> = first_init.iter().chain(&last_init).copied().collect();
            if !all.is_empty() {
                ops.push(AddOp::new(&["spec", "initContainers"], to_value(&all)));
            }
        }
        Some(_) => {
            for (i, ic) in first_init.iter().enumerate() {
                ops.push(AddOp::new(
                    &["spec", "initContainers", &i.to_string()],
                    to_value(ic),
                ));
            }
            for ic in &last_init {
                ops.push(AddOp::new(&["spec", "initContainers", "-"], to_value(ic)));
            }
        }
    }
    if !new_volumes.is_empty() {
        match &spec.volumes {
            None => ops.push(AddOp::new(&["spec", "volumes"], to_value(&new_volumes))),
            Some(_) => {
                for v in &new_volumes {
                    ops.push(AddOp::new(&["spec", "volumes", "-"], to_value(v)));
                }
            }
        }
    }
    for (idx, mounts) in &new_mounts {
        let n = idx.to_string();
        match &spec.containers[*idx].volume_mounts {
            None => ops.push(AddOp::new(
                &["spec", "containers", &n, "volumeMounts"],
                to_value(mounts),
            )),
            Some(_) => {
                for m in mounts {
                    ops.push(AddOp::new(
                        &["spec", "containers", &n, "volumeMounts", "-"],
                        to_value(m),
                    ));
                }
            }
        }
    }

    let applied: Vec<(String, i64)> = todo
        .iter()
        .map(|c| (c.name.to_string(), c.generation))
        .collect();
    let mut all_recorded = recorded;
    all_recorded.extend(applied.iter().cloned());
    let value = format_injected(&all_recorded);
    if pod.metadata.annotations.is_none() {
        ops.push(AddOp::new(
            &["metadata", "annotations"],
            json!({ keys::INJECTED: value }),
        ));
    } else {
        ops.push(AddOp::new(
            &["metadata", "annotations", keys::INJECTED],
            Value::String(value),
        ));
    }
    Plan::Patch {
        ops,
        applied,
        warnings,
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    // The k8s-openapi types always serialize; `Null` is unreachable in practice.
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn volume_of(v: &InjectedVolume) -> Volume {
    Volume {
        name: v.name.clone(),
        empty_dir: Some(v.empty_dir.clone()),
        ..Default::default()
    }
}

fn mount_of(m: &InjectedVolumeMount) -> VolumeMount {
    VolumeMount {
        name: m.name.clone(),
        mount_path: m.mount_path.clone(),
        sub_path: m.sub_path.clone().filter(|s| !s.is_empty()),
        read_only: m.read_only.then_some(true),
        ..Default::default()
    }
}

/// The pod as it will be after the injections planned so far, with each entry's origin.
/// The pod's own entries are borrowed, not copied.
struct State<'a> {
    containers: Vec<&'a str>,
    init: Vec<(&'a Container, Origin<'a>)>,
    volumes: Vec<(Cow<'a, Volume>, Origin<'a>)>,
    mounts: Vec<Vec<(Cow<'a, VolumeMount>, Origin<'a>)>>,
}

impl<'a> State<'a> {
    fn of(spec: &'a k8s_openapi::api::core::v1::PodSpec) -> Self {
        Self {
            containers: spec.containers.iter().map(|c| c.name.as_str()).collect(),
            init: spec
                .init_containers
                .iter()
                .flatten()
                .map(|c| (c, Origin::Pod))
                .collect(),
            volumes: spec
                .volumes
                .iter()
                .flatten()
                .map(|v| (Cow::Borrowed(v), Origin::Pod))
                .collect(),
            mounts: spec
                .containers
                .iter()
                .map(|c| {
                    c.volume_mounts
                        .iter()
                        .flatten()
                        .map(|m| (Cow::Borrowed(m), Origin::Pod))
                        .collect()
                })
                .collect(),
        }
    }

    /// `Ok(true)` when the container is new, `Ok(false)` when an identical one exists.
    fn add_init_container(
        &mut self,
        c: &'a Container,
        origin: Origin<'a>,
    ) -> Result<bool, Conflict<'a>> {
        if self.containers.contains(&c.name.as_str()) {
            return Err(Conflict {
                message: format!(
                    "init container {:?} of {origin} has the same name as container {:?} of the pod",
                    c.name, c.name
                ),
                other: Origin::Pod,
            });
        }
        if let Some((existing, other)) = self.init.iter().find(|(e, _)| e.name == c.name) {
            return if same_container(c, existing) {
                Ok(false)
            } else {
                Err(Conflict {
                    message: format!(
                        "init container {:?} of {origin} differs from init container {:?} of {other}",
                        c.name, existing.name
                    ),
                    other: *other,
                })
            };
        }
        self.init.push((c, origin));
        Ok(true)
    }

    fn add_volume(&mut self, v: &InjectedVolume, origin: Origin<'a>) -> Result<bool, Conflict<'a>> {
        if let Some((existing, other)) = self.volumes.iter().find(|(e, _)| e.name == v.name) {
            let same = existing
                .empty_dir
                .as_ref()
                .is_some_and(|e| same_empty_dir(e, &v.empty_dir))
                && **existing
                    == Volume {
                        name: existing.name.clone(),
                        empty_dir: existing.empty_dir.clone(),
                        ..Default::default()
                    };
            return if same {
                Ok(false)
            } else {
                Err(Conflict {
                    message: format!(
                        "volume {:?} of {origin} differs from volume {:?} of {other}",
                        v.name, existing.name
                    ),
                    other: *other,
                })
            };
        }
        self.volumes.push((Cow::Owned(volume_of(v)), origin));
        Ok(true)
    }

    fn add_mount(
        &mut self,
        idx: usize,
        m: &InjectedVolumeMount,
        origin: Origin<'a>,
    ) -> Result<bool, Conflict<'a>> {
        let container = self.containers.get(idx).copied().unwrap_or_default();
        let Some(mounts) = self.mounts.get_mut(idx) else {
            return Ok(false);
        };
        let wanted = mount_of(m);
        if let Some((existing, other)) = mounts
            .iter()
            .find(|(e, _)| e.mount_path == wanted.mount_path)
        {
            return if same_mount(existing, &wanted) {
                Ok(false)
            } else {
                Err(Conflict {
                    message: format!(
                        "mount of volume {:?} at {:?} in container {container:?} by {origin} differs from the mount of volume {:?} at that path by {other}",
                        wanted.name, wanted.mount_path, existing.name
                    ),
                    other: *other,
                })
            };
        }
        mounts.push((Cow::Owned(wanted), origin));
        Ok(true)
    }
}

fn same_empty_dir(a: &EmptyDirVolumeSource, b: &EmptyDirVolumeSource) -> bool {
    let medium = |e: &EmptyDirVolumeSource| e.medium.clone().unwrap_or_default();
    medium(a) == medium(b) && a.size_limit == b.size_limit
}

fn same_mount(existing: &VolumeMount, wanted: &VolumeMount) -> bool {
    let mut e = existing.clone();
    if e.read_only == Some(false) {
        e.read_only = None;
    }
    if e.sub_path.as_deref() == Some("") {
        e.sub_path = None;
    }
    e == *wanted
}

/// Whether `existing` (possibly defaulted by the API server) is `injected` as declared.
fn same_container(injected: &Container, existing: &Container) -> bool {
    let mut e = existing.clone();
    if injected.termination_message_path.is_none() {
        e.termination_message_path = None;
    }
    if injected.termination_message_policy.is_none() {
        e.termination_message_policy = None;
    }
    if injected.image_pull_policy.is_none() {
        e.image_pull_policy = None;
    }
    if injected.resources.is_none()
        && e.resources
            .as_ref()
            .is_some_and(|r| *r == Default::default())
    {
        e.resources = None;
    }
    e == *injected
}

#[cfg(test)]
mod tests;
