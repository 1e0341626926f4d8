//! The process shell shared by the `appset-operator` and `appset-webhook` binaries.
//!
//! Both binaries start the same way: [`logging::init`] sets up `tracing` (one default format,
//! JSON with the event's fields flattened into the line), [`signal::shutdown_signal`] completes
//! on SIGTERM or SIGINT, and the admin endpoints (`/healthz`, `/readyz`, `/metrics`) answer
//! from [`admin`]. Readiness is by handle ([`readiness`]): every watch a process runs holds a
//! [`readiness::ReadyHandle`] and releases it on its first complete list; `/readyz` passes once
//! no handle is pending. Liveness is by heartbeat ([`liveness`]): `/healthz` fails when a loop
//! with work waiting has made no progress for too long.
//!
//! Nothing here talks to Kubernetes: the crate is the part of a process that is the same
//! whatever the process does.

pub mod admin;
pub mod liveness;
pub mod logging;
pub mod readiness;
pub mod signal;
