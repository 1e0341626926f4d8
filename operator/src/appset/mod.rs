//! The AppSet controller: a StatefulSet-like workload that owns ordinal pods and one
//! PersistentVolumeClaim per replica per volumeClaimTemplate.
//!
//! Data flow, from the outside in:
//!
//! * [`controller`] is the only module that talks to the API server. It watches AppSets and the
//!   objects they own, lists the AppSet's pods, claims and ControllerRevisions, and drives the
//!   pure modules below, then executes their decisions and patches the status.
//! * [`revision`] turns the pod template (and, with `configRollout`, the config hash) into a
//!   ControllerRevision name and decides which revisions to create, reuse or prune.
//! * [`plan`] decides which claims and pods to create, which pods to delete and which claim
//!   owner references to change, with StatefulSet's semantics plus the broken-pod fix.
//! * [`storage`] compares claims with their templates: expansions, and changes Kubernetes
//!   cannot apply to an existing claim.
//! * [`status`] computes every field of `AppSetStatus`, including the `Available` and
//!   `Progressing` conditions.
//! * [`build`] constructs the pods, claims and headless Service the controller writes.

pub mod build;
pub mod controller;
pub mod plan;
pub mod revision;
pub mod status;
pub mod storage;
