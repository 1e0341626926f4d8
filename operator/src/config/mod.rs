//! Config rollout: native workloads (Deployments, StatefulSets, DaemonSets) roll out when the
//! ConfigMaps and Secrets they use change.
//!
//! Data flow:
//! 1. [`watch`] runs the watches: workloads in reflector stores, and only the metadata of
//!    ConfigMaps and Secrets, whose changes are mapped to the workloads that use them through
//!    the [`index`].
//! 2. [`controller`] reconciles one workload: it lists the sources it uses, hashes them with
//!    the shared [`crate::confighash`] module, and asks [`rollout`] what to do.
//! 3. [`rollout`] compares the digest with the baseline recorded on the workload and decides:
//!    adopt, wait (coalescing window, minimum interval), roll, or report a missing source.
//! 4. [`controller`] applies the decision with server-side apply and publishes Events, counted
//!    in [`metrics`].
//!
//! 5. In snapshot mode, [`snapshot`] copies the sources into immutable snapshots before the
//!    template is pinned to them, and hands their ownership to the ReplicaSets that use them.
//!
//! 6. [`memo`] keeps each workload's digests until one of its sources is seen changing, so a
//!    reconcile that follows no source change (the echo of the controller's own write, an edit
//!    that keeps the references) reads no source.
//!
//! 7. [`sourcecache`] keeps each source's own digest while the metadata watch shows its
//!    version unchanged, shared by the workloads that use it and filled at start-up from
//!    paginated LISTs; a workload's digest combines its sources' digests
//!    ([`crate::confighash::hash::combine`]).
//!
//! [`index`], [`memo`], [`sourcecache`], [`rollout`] and [`metrics`] are pure; [`watch`] and [`controller`] do
//! the I/O.

pub mod controller;
pub mod index;
pub mod memo;
pub mod metrics;
pub mod rollout;
pub mod snapshot;
pub mod sourcecache;
pub mod watch;
