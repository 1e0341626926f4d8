//! The appset controllers and the operator's process setup.
//!
//! * [`config`]: config rollout for Deployments, StatefulSets and DaemonSets: reference
//!   discovery, canonical encoding and keyed hashing (also used by the AppSet controller), the
//!   rollout decisions, and the controller that applies them.
//! * [`runtime`]: the operator process: flags, logging, the metrics and health endpoints,
//!   leader election, and graceful shutdown. `src/main.rs` is a thin wrapper around it.

pub mod appset;
pub mod config;
pub mod runtime;

pub use runtime::run;
