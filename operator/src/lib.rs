//! The appset controllers and the operator's process setup.
//!
//! * [`config`]: config rollout for Deployments, StatefulSets and DaemonSets: reference
//!   discovery, canonical encoding and keyed hashing (also used by the AppSet controller), the
//!   rollout decisions, and the controller that applies them.

pub mod appset;
pub mod config;
