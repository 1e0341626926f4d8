//! Every annotation and label key appset reads or writes, in one place, so that no key is
//! spelled twice. Keys under `appset.dev/` are the project's own; the others are Kubernetes'
//! well-known keys that AppSet pods carry for StatefulSet compatibility, and stakater/Reloader's
//! keys that the config-rollout controller honours in compatibility mode.

/// The API group of every appset custom resource.
pub const GROUP: &str = "appset.dev";

/// The field manager appset uses for every server-side apply.
pub const FIELD_MANAGER: &str = "appset.dev/operator";

// --- Config rollout, on Deployments, StatefulSets, DaemonSets (and AppSets) ---

/// On a workload: `"auto"` hashes every ConfigMap and Secret its pod template references.
pub const CONFIG_ROLLOUT: &str = "appset.dev/config-rollout";
/// The value of [`CONFIG_ROLLOUT`] that turns automatic discovery on.
pub const CONFIG_ROLLOUT_AUTO: &str = "auto";
/// On a workload: a comma-separated list of ConfigMap names to hash, referenced or not.
pub const CONFIG_ROLLOUT_CONFIGMAPS: &str = "appset.dev/config-rollout-configmaps";
/// On a workload: a comma-separated list of Secret names to hash, referenced or not.
pub const CONFIG_ROLLOUT_SECRETS: &str = "appset.dev/config-rollout-secrets";
/// Written by the operator into `spec.template.metadata.annotations`: the keyed digest of the
/// referenced data. It changes only when the data changes, and reveals nothing about it.
pub const CONFIG_HASH: &str = "appset.dev/config-hash";
/// Label written by the operator on the workload's own metadata: the digest it last observed
/// (`<key id>.<first 46 hex digits of the digest>`), so a restart or a first adoption records a
/// baseline instead of rolling the workload. A label, not an annotation: changing a
/// Deployment's annotations bumps its `generation` and is copied onto its ReplicaSet by
/// kube-controller-manager, while a label change does neither.
pub const CONFIG_BASELINE: &str = "appset.dev/config-baseline";
/// The annotation that held the baseline before [`CONFIG_BASELINE`] (full digest,
/// `<key id>:<digest>`). Still read, so an upgrade neither rolls nor rewrites anything; the
/// operator stops sending it at its next write to the workload, and server-side apply then
/// removes it.
pub const CONFIG_HASH_OBSERVED: &str = "appset.dev/config-hash-observed";

/// The value of [`CONFIG_ROLLOUT`] that discovers as `"auto"` does and, in addition, pins every
/// revision to immutable snapshots of its ConfigMaps and Secrets.
pub const CONFIG_ROLLOUT_SNAPSHOT: &str = "snapshot";
/// Written by the operator into `spec.template.metadata.annotations` in snapshot mode (and so
/// present on every pod of that revision): a JSON object from `configmap/<name>` or
/// `secret/<name>` to the name of the snapshot that pods of this revision read instead.
pub const CONFIG_SNAPSHOTS: &str = "appset.dev/config-snapshots";
/// On a snapshot ConfigMap or Secret: the source it copies, as `configmap/<name>` or
/// `secret/<name>`.
pub const SNAPSHOT_OF: &str = "appset.dev/snapshot-of";
/// Label on every snapshot ConfigMap and Secret (value `"true"`), to list them.
pub const SNAPSHOT_LABEL: &str = "appset.dev/snapshot";

/// stakater/Reloader: `"true"` reloads on any referenced ConfigMap or Secret (compatibility mode).
pub const RELOADER_AUTO: &str = "reloader.stakater.com/auto";
/// stakater/Reloader: a comma-separated list of ConfigMaps to watch (compatibility mode).
pub const RELOADER_CONFIGMAPS: &str = "configmap.reloader.stakater.com/reload";
/// stakater/Reloader: a comma-separated list of Secrets to watch (compatibility mode).
pub const RELOADER_SECRETS: &str = "secret.reloader.stakater.com/reload";

// --- AppSet pods and claims ---

/// Pod label: the pod's own name, like `statefulset.kubernetes.io/pod-name`.
pub const POD_NAME_LABEL: &str = "appset.dev/pod-name";
/// Pod label: the pod's own name under StatefulSet's key, so per-pod Services written for
/// StatefulSets (common in Kafka, Redis and ZooKeeper charts) select AppSet pods unchanged.
pub const STATEFULSET_POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
/// Pod label: the ordinal, the same key StatefulSet pods carry.
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";
/// Pod label: the ControllerRevision the pod was created from, the same key StatefulSet uses.
pub const CONTROLLER_REVISION_HASH_LABEL: &str = "controller-revision-hash";
/// Label on ControllerRevisions, pods and PVCs: the name of the AppSet that owns them.
pub const APPSET_NAME_LABEL: &str = "appset.dev/appset";

// --- Injection webhook ---

/// Namespace label: `"enabled"` lets the webhook consider PodInjections in that namespace.
pub const INJECTION_NAMESPACE_LABEL: &str = "appset.dev/injection";
/// The value of [`INJECTION_NAMESPACE_LABEL`] that opts a namespace in.
pub const INJECTION_ENABLED: &str = "enabled";
/// Pod label (or, the older form, annotation): `"disabled"` opts a single pod out of injection.
/// As a label the MutatingWebhookConfiguration's `objectSelector` filters on it, so the pod is
/// never sent to the webhook.
pub const INJECTION_POD_OPT_OUT: &str = "appset.dev/inject";
/// The value of [`INJECTION_POD_OPT_OUT`] that opts a pod out.
pub const INJECTION_DISABLED: &str = "disabled";
/// Pod annotation written by the webhook: which PodInjections (name and generation) were applied.
pub const INJECTED: &str = "appset.dev/injected";
