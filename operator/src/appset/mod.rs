//! The AppSet controller: a StatefulSet-like workload that owns ordinal pods and one
//! PersistentVolumeClaim per replica per volumeClaimTemplate.
//!
//! Data flow, from the outside in:
//!
//! * [`controller`] wires the watches to a kube `Controller` and holds the settings, the shared
//!   context and the error policy.
//! * [`reconcile`] is one reconcile as a short sequence of named steps; each step reads
//!   ([`observe`]), decides (the pure modules below) or writes ([`execute`]). Only `observe` and
//!   `execute` talk to the API server.
//! * [`revision`] turns the pod template (and, with `configRollout`, the config hash from the
//!   shared [`crate::confighash`] module) into a ControllerRevision name and decides which
//!   revisions to create, reuse or prune.
//! * [`adopt`] decides which listed pods and claims are the AppSet's and which orphans it takes.
//! * [`plan`] decides which claims and pods to create, which pods to delete and which claim
//!   owner references to change, with StatefulSet's semantics plus the broken-pod fix.
//! * [`storage`] compares claims with their templates: expansions, and changes Kubernetes
//!   cannot apply to an existing claim.
//! * [`status`] computes every field of `AppSetStatus`, including the `Available` and
//!   `Progressing` conditions.
//! * [`build`] constructs the pods, claims, revisions and headless Service the controller
//!   writes.

pub mod adopt;
pub mod build;
pub mod controller;
pub mod execute;
pub mod observe;
pub mod plan;
pub mod reconcile;
pub mod revision;
pub mod status;
pub mod storage;
