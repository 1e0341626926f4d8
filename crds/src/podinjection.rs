//! The `PodInjection` custom resource (`appset.dev/v1alpha1`).
//!
//! A PodInjection declares init containers and emptyDir volumes (with their mounts) that the
//! injection webhook adds to every pod it selects at creation. Only namespaces labelled
//! `appset.dev/injection=enabled` are considered, so the webhook can never block system pods or
//! its own. Volumes are emptyDir only: the schema has no other volume source to write.

use k8s_openapi::api::core::v1::{Container, EmptyDirVolumeSource};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What to inject into the pods this PodInjection selects.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "appset.dev",
    version = "v1alpha1",
    kind = "PodInjection",
    namespaced,
    shortname = "pinj",
    derive = "PartialEq",
    doc = "PodInjection declares init containers and emptyDir volumes that the appset webhook injects into the pods it selects, in namespaces labelled appset.dev/injection=enabled.",
    printcolumn(
        name = "Init containers",
        type_ = "string",
        json_path = ".spec.initContainers[*].name",
        description = "Injected init containers"
    ),
    printcolumn(
        name = "Volumes",
        type_ = "string",
        json_path = ".spec.volumes[*].name",
        description = "Injected emptyDir volumes"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("!has(self.volumeMounts) || self.volumeMounts.all(m, has(self.volumes) && self.volumes.exists(v, v.name == m.name))").message("every spec.volumeMounts[].name must name a volume in spec.volumes").field_path(".volumeMounts")
)]
#[serde(rename_all = "camelCase")]
pub struct PodInjectionSpec {
    /// Which pods in this namespace receive the injection. An empty selector selects every pod.
    pub selector: LabelSelector,

    /// Where the injected init containers go: `First` (the default) puts them before the pod's
    /// own init containers, so the pod's see their results; `Last` puts them after. Several
    /// PodInjections inject in the order of their names.
    #[serde(default)]
    pub init_container_placement: InitContainerPlacement,

    /// Init containers to add, full container specs. Names are unique.
    #[serde(default)]
    #[schemars(length(max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub init_containers: Vec<Container>,

    /// emptyDir volumes to add. No other volume source is accepted. Names are unique.
    #[serde(default)]
    #[schemars(length(max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub volumes: Vec<InjectedVolume>,

    /// Where the injected volumes are mounted in the pod's own containers.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub volume_mounts: Vec<InjectedVolumeMount>,
}

/// Where injected init containers are placed relative to the pod's own.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InitContainerPlacement {
    /// Before the pod's own init containers.
    #[default]
    First,
    /// After the pod's own init containers.
    Last,
}

/// An emptyDir volume to inject.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InjectedVolume {
    /// The volume name in the pod; a DNS label.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The emptyDir source (`medium`, `sizeLimit`). Required: only emptyDir volumes can be
    /// injected.
    pub empty_dir: EmptyDirVolumeSource,
}

/// A mount of an injected volume into the pod's containers.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InjectedVolumeMount {
    /// The name of a volume in `spec.volumes`.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Where the volume appears in the container; an absolute path.
    #[schemars(length(min = 1, max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("spec.volumeMounts[].mountPath must be an absolute path"))]
    pub mount_path: String,
    /// A path within the volume to mount instead of its root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
    /// Mount read-only. Defaults to false.
    #[serde(default)]
    pub read_only: bool,
    /// Names of the pod's containers that get the mount; empty (the default) means every
    /// container. Init containers of the pod itself are never mounted into; injected init
    /// containers declare their own mounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub containers: Vec<String>,
}
