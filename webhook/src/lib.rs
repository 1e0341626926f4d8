//! The appset injection webhook.
//!
//! A mutating admission webhook on Pod CREATE that injects the init containers, emptyDir volumes
//! and mounts declared in `PodInjection` resources. Data flow:
//!
//! ```text
//! API server ──HTTPS──▶ server (rustls) ──body──▶ admission::review ──▶ matching ──▶ plan ──▶ patch
//!                          ▲                              ▲
//!                  tls (Secret watch)          reflector store of PodInjections
//! ```
//!
//! * [`matching`], [`plan`], [`patch`] and [`admission`] are pure: the answer to a request is a
//!   function of the request body and the PodInjections in memory, with no API call.
pub mod admission;
pub mod matching;
pub mod patch;
pub mod plan;
