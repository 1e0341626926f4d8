//! The appset controllers and the operator's process setup.
//!
//! * [`confighash`]: config hashing shared by both controllers: reference discovery, fetching,
//!   canonical encoding and keyed digests, the hash key, and the key-rotation rule.
//! * [`config`]: config rollout for Deployments, StatefulSets and DaemonSets: the watches, the
//!   rollout decisions, and the reconcile that applies them.
//! * [`appset`]: the AppSet controller.
//! * [`kubeapi`]: the API-server helpers both controllers use.
//! * [`pacing`]: the coalescing window and minimum interval of config-driven rollouts.
//! * [`runtime`]: the operator process: flags, the shared keyring, the admin endpoints, leader
//!   election, and graceful shutdown. `src/main.rs` is a thin wrapper around it.
//! * [`sourcewatch`]: the one metadata-only watch of ConfigMaps and Secrets both controllers
//!   are triggered by.
//!
//! Neither controller imports from the other; both depend on [`confighash`], [`kubeapi`], [`pacing`] and
//! [`sourcewatch`].

pub mod appset;
pub mod config;
pub mod confighash;
pub mod kubeapi;
pub mod pacing;
pub mod runtime;
pub mod sourcewatch;

pub use runtime::run;
