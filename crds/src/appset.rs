//! The `AppSet` custom resource (`appset.dev/v1alpha1`, short name `aps`).
//!
//! An AppSet is a StatefulSet that fixes what StatefulSet users complain about. Its spec carries
//! every StatefulSet field with the same JSON name, meaning and default, so a manifest moves over
//! by changing `apiVersion` and `kind`. What it adds:
//!
//! * `volumeClaimTemplates` may grow `resources.requests.storage`; existing claims are expanded.
//! * `configRollout` makes the referenced ConfigMaps and Secrets part of the revision.
//! * `service` lets the operator create and own the headless Service.
//! * `progressDeadlineSeconds` bounds a rollout; the `Progressing` condition reports a stall.
//!
//! The status mirrors StatefulSet's and adds `labelSelector` (for the scale subresource and HPA),
//! `configHash`, `lastProgressTime`, conditions (`Ready`, `Available`, `Progressing`) and
//! per-template volume claim status.

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The desired state of an AppSet. Fields shared with `apps/v1 StatefulSet` keep its names,
/// meanings and defaults.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "appset.dev",
    version = "v1alpha1",
    kind = "AppSet",
    namespaced,
    shortname = "aps",
    category = "all",
    status = "AppSetStatus",
    derive = "PartialEq",
    doc = "AppSet is a StatefulSet-like workload: ordinal pods with stable names, one PersistentVolumeClaim per replica per volumeClaimTemplate, expandable storage, config-aware rollouts that never stall on a broken pod.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.labelSelector"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".spec.replicas",
        description = "Desired number of pods"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Pods that are Ready"
    ),
    printcolumn(
        name = "Updated",
        type_ = "integer",
        json_path = ".status.updatedReplicas",
        description = "Pods at the update revision"
    ),
    printcolumn(
        name = "Revision",
        type_ = "string",
        json_path = ".status.updateRevision",
        description = "The revision pods are rolled to"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "The reason of the Ready condition"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("self.selector == oldSelf.selector").message("spec.selector is immutable: pods are found by it, so changing it would orphan them; delete the AppSet with --cascade=orphan and create it again to change it").field_path(".selector"),
    validation = Rule::new("!has(self.selector.matchLabels) || self.selector.matchLabels.all(k, has(self.template.metadata) && has(self.template.metadata.labels) && k in self.template.metadata.labels && self.template.metadata.labels[k] == self.selector.matchLabels[k])").message("spec.selector.matchLabels must match spec.template.metadata.labels: every selector label needs the same value in the template").field_path(".selector"),
    validation = Rule::new("!has(self.service) || self.service != 'Managed' || (has(self.serviceName) && self.serviceName != '')").message("spec.serviceName is required when spec.service is Managed").field_path(".serviceName"),
    validation = Rule::new("!has(self.volumeClaimTemplates) || self.volumeClaimTemplates.all(t, has(t.metadata) && has(t.metadata.name) && t.metadata.name != '')").message("every spec.volumeClaimTemplates entry needs metadata.name; it names the claims <name>-<set>-<ordinal>").field_path(".volumeClaimTemplates")
)]
#[serde(rename_all = "camelCase")]
pub struct AppSetSpec {
    /// The desired number of pods. Defaults to 1, like StatefulSet.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0))]
    pub replicas: i32,

    /// A label query over pods that must match the template's labels. Immutable, as in a
    /// StatefulSet.
    #[schemars(transform = bound_selector_labels)]
    pub selector: LabelSelector,

    /// The pod template. Pods are named `<set>-<ordinal>`, get `hostname` and `subdomain` for
    /// stable DNS, and carry the labels `appset.dev/pod-name` and
    /// `statefulset.kubernetes.io/pod-name` (the pod's name), `apps.kubernetes.io/pod-index`,
    /// `appset.dev/appset` and `controller-revision-hash`.
    #[schemars(transform = bound_template_labels)]
    pub template: PodTemplateSpec,

    /// Claims that every pod gets, one per replica per template, named
    /// `<template>-<set>-<ordinal>` and mounted as the volume named after the template. Existing
    /// claims of that name are adopted, so a StatefulSet's data moves over. Raising
    /// `resources.requests.storage` expands every existing claim when its StorageClass allows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub volume_claim_templates: Vec<PersistentVolumeClaim>,

    /// The headless Service that gives the pods their DNS names (`<pod>.<serviceName>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,

    /// Whether the operator creates and owns the headless Service named `serviceName`
    /// (`Managed`) or expects it to exist (`External`, StatefulSet's behaviour; the default).
    #[serde(default)]
    pub service: ServicePolicy,

    /// How pods are created and deleted: `OrderedReady` (the default) one at a time in ordinal
    /// order, each waiting for the previous to be Running and Ready, scaling down highest first;
    /// `Parallel` all at once.
    #[serde(default)]
    pub pod_management_policy: PodManagementPolicy,

    /// How pods are replaced when the revision changes.
    #[serde(default)]
    pub update_strategy: UpdateStrategy,

    /// When claims created from `volumeClaimTemplates` are deleted. Both default to `Retain`:
    /// claims outlive scale-downs and the AppSet itself unless this says otherwise.
    #[serde(default)]
    pub persistent_volume_claim_retention_policy: PersistentVolumeClaimRetentionPolicy,

    /// Seconds a new pod must be Ready, without a container crashing, to count as available.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub min_ready_seconds: i32,

    /// How many old ControllerRevisions to keep for rollback. Defaults to 10.
    #[serde(default = "default_revision_history_limit")]
    #[schemars(range(min = 0))]
    pub revision_history_limit: i32,

    /// The ordinal of the first pod (StatefulSet's `ordinals.start`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordinals: Option<Ordinals>,

    /// Whether the ConfigMaps and Secrets the template references are part of the revision, so
    /// a change to their data rolls the AppSet like a template change. Defaults to true.
    #[serde(default = "default_true")]
    pub config_rollout: bool,

    /// With `configRollout`: pin each revision to immutable copies ("snapshots") of the
    /// ConfigMaps and Secrets its pods read, so pods of an older revision, and a rollback, read
    /// the config that revision was rolled out with. Needs the operator's `--config-snapshots`.
    /// Defaults to false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub config_snapshots: bool,

    /// Seconds a rollout may go without progress before the `Progressing` condition turns
    /// False with reason `ProgressDeadlineExceeded`. Defaults to 600.
    #[serde(default = "default_progress_deadline")]
    #[schemars(range(min = 1))]
    pub progress_deadline_seconds: i32,
}

/// Kubernetes allows at most 63 characters in a label value and 317 in a key (a 253-character
/// prefix, `/`, a 63-character name). Bounding the label maps lets the API server's CEL cost
/// estimator accept the selector rule above.
const MAX_LABELS: u64 = 64;

fn bound_label_map(map: &mut schemars::Schema) {
    map.insert("maxProperties".into(), MAX_LABELS.into());
    if let Some(values) = map
        .get_mut("additionalProperties")
        .and_then(|v| v.as_object_mut())
    {
        values.insert("maxLength".into(), 63.into());
    }
}

fn bound_selector_labels(schema: &mut schemars::Schema) {
    if let Some(ml) = schema
        .get_mut("properties")
        .and_then(|p| p.get_mut("matchLabels"))
        .and_then(|m| <&mut schemars::Schema>::try_from(m).ok())
    {
        bound_label_map(ml);
    }
}

fn bound_template_labels(schema: &mut schemars::Schema) {
    if let Some(labels) = schema
        .get_mut("properties")
        .and_then(|p| p.get_mut("metadata"))
        .and_then(|m| m.get_mut("properties"))
        .and_then(|p| p.get_mut("labels"))
        .and_then(|m| <&mut schemars::Schema>::try_from(m).ok())
    {
        bound_label_map(labels);
    }
}

fn default_replicas() -> i32 {
    1
}
fn default_revision_history_limit() -> i32 {
    10
}
fn default_true() -> bool {
    true
}
fn default_progress_deadline() -> i32 {
    600
}

/// Whether the operator manages the headless Service.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServicePolicy {
    /// The Service is created by the user, as with a StatefulSet.
    #[default]
    External,
    /// The operator creates a headless Service named `serviceName` and owns it.
    Managed,
}

/// StatefulSet's `podManagementPolicy`.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PodManagementPolicy {
    /// Create pods in ordinal order, each after the previous is Running and Ready; delete in
    /// reverse order.
    #[default]
    OrderedReady,
    /// Create and delete pods without waiting for each other.
    Parallel,
}

/// StatefulSet's `updateStrategy`.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[x_kube(
    validation = Rule::new("self.type == 'RollingUpdate' || !has(self.rollingUpdate)").message("spec.updateStrategy.rollingUpdate is only allowed when spec.updateStrategy.type is RollingUpdate").field_path(".rollingUpdate")
)]
#[serde(rename_all = "camelCase")]
pub struct UpdateStrategy {
    /// `RollingUpdate` (the default) replaces pods highest ordinal first; `OnDelete` replaces a
    /// pod only when a user deletes it.
    #[serde(rename = "type", default)]
    pub type_: UpdateStrategyType,
    /// Parameters of `RollingUpdate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolling_update: Option<RollingUpdate>,
}

/// The kind of update strategy.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UpdateStrategyType {
    /// Replace pods automatically, highest ordinal first.
    #[default]
    RollingUpdate,
    /// Replace a pod only when it is deleted.
    OnDelete,
}

/// Parameters of a rolling update.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RollingUpdate {
    /// Pods with an ordinal at or above the partition are updated; those below keep their
    /// revision. Defaults to 0 (update all).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub partition: i32,
    /// How many pods may be unavailable during the update: a number of at least 1 or a
    /// percentage of `replicas` from 1% to 100% (rounded down, but at least 1). Defaults to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("string(self).matches('^([1-9][0-9]*|([1-9][0-9]?|100)%)$')").message("spec.updateStrategy.rollingUpdate.maxUnavailable must be an integer of at least 1 or a percentage from 1% to 100%"))]
    pub max_unavailable: Option<IntOrString>,
}

/// StatefulSet's `persistentVolumeClaimRetentionPolicy`.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PersistentVolumeClaimRetentionPolicy {
    /// What happens to the claims when the AppSet is deleted. Defaults to `Retain`.
    #[serde(default)]
    pub when_deleted: RetentionPolicyType,
    /// What happens to the claims of pods removed by a scale-down. Defaults to `Retain`.
    #[serde(default)]
    pub when_scaled: RetentionPolicyType,
}

/// Whether claims are kept or deleted.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RetentionPolicyType {
    /// Keep the claims (the default).
    #[default]
    Retain,
    /// Delete the claims, through owner references the garbage collector honours.
    Delete,
}

/// StatefulSet's `ordinals`.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Ordinals {
    /// The ordinal of the first pod. Defaults to 0.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub start: i32,
}

/// The observed state of an AppSet.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AppSetStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods the AppSet owns.
    #[serde(default)]
    pub replicas: i32,
    /// Owned pods that are Ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Owned pods that have been Ready for at least `minReadySeconds`.
    #[serde(default)]
    pub available_replicas: i32,
    /// Owned pods at `currentRevision`.
    #[serde(default)]
    pub current_replicas: i32,
    /// Owned pods at `updateRevision`.
    #[serde(default)]
    pub updated_replicas: i32,
    /// The revision of the pods below the partition, or of all pods once a rollout completes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<String>,
    /// The revision the pods are being rolled to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_revision: Option<String>,
    /// Counts hash collisions between revisions; part of the revision name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collision_count: Option<i32>,
    /// The selector as a string, for the scale subresource and HorizontalPodAutoscalers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_selector: Option<String>,
    /// The config token of the update revision: the keyed digest of the referenced
    /// ConfigMaps and Secrets when they last changed, written into the pod template. It stays
    /// the same across a rotation of the hash key while the data does not change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// `<key id>:<digest>` of the data `configHash` stands for, under the hash key it was last
    /// compared with; what the next comparison starts from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<String>,
    /// When `configHash` last changed because the referenced config did (the last
    /// config-driven rollout); the next one waits at least `--min-rollout-interval` after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_rollout_time: Option<Time>,
    /// When a config change that is not rolled out yet was first seen: it waits for the
    /// coalescing window (`--coalesce-window`) and the minimum interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_config_since: Option<Time>,
    /// When the rollout last made progress: a rollout started, or the pod counters, the update
    /// revision or the observed generation last changed. `progressDeadlineSeconds` is measured
    /// from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_time: Option<Time>,
    /// `Ready`, `Available`, `Progressing` and (with volumeClaimTemplates)
    /// `VolumeClaimsInSync`, with reasons a person can act on. `Ready` is True once the rollout
    /// is complete and every replica is available; kstatus's `Reconciling` (on the way there)
    /// and `Stalled` (past the progress deadline) are present only while True.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// One entry per volumeClaimTemplate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_claim_templates: Vec<VolumeClaimTemplateStatus>,
}

/// The state of the claims created from one volumeClaimTemplate.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeClaimTemplateStatus {
    /// The template's `metadata.name`.
    pub name: String,
    /// Claims that exist for this template.
    #[serde(default)]
    pub claims: i32,
    /// Claims that are Bound.
    #[serde(default)]
    pub bound: i32,
    /// The storage the template requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_storage: Option<String>,
    /// Claims whose capacity already matches the requested storage.
    #[serde(default)]
    pub resized: i32,
    /// Why claims of this template are not as requested, if they are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl AppSetSpec {
    /// The first ordinal (`ordinals.start`, default 0).
    pub fn start_ordinal(&self) -> i32 {
        self.ordinals.as_ref().map_or(0, |o| o.start)
    }

    /// The rolling update partition (0 when unset or when the strategy is `OnDelete`).
    pub fn partition(&self) -> i32 {
        self.update_strategy
            .rolling_update
            .as_ref()
            .map_or(0, |r| r.partition)
    }
}
