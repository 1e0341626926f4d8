//! Config rollout: native workloads (Deployments, StatefulSets, DaemonSets) roll out when the
//! ConfigMaps and Secrets they use change.
//!
//! Data flow:
//! 1. [`discovery`] reads a workload's opt-in annotations and pod template and lists the sources
//!    it uses, with the keys that count and whether each is optional.
//! 2. [`fetch`] reads those sources from the API (only to hash them) and the installation's hash
//!    key ([`keyring`]); [`hash`] turns them into a canonical encoding and a keyed digest.
//! 3. [`rollout`] compares the digest with the baseline recorded on the workload and decides:
//!    adopt, wait (coalescing window, minimum interval), roll, or report a missing source.
//! 4. [`controller`] does the I/O: watches workloads, watches only the metadata of ConfigMaps and
//!    Secrets, maps their changes to workloads through the [`index`], applies the decisions with
//!    server-side apply, and publishes Events and metrics.
//!
//! Everything but [`fetch`] and [`controller`] is pure and unit-tested without an API server.
//! The AppSet controller uses [`discovery`], [`hash`] and [`fetch`] to make config data part of
//! an AppSet's revision.

pub mod controller;
pub mod discovery;
pub mod fetch;
pub mod hash;
pub mod index;
pub mod keyring;
pub mod metrics;
pub mod rollout;
