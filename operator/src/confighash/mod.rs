//! Config hashing, shared by both controllers: which ConfigMaps and Secrets a pod template
//! uses, what their data hashes to under the installation's key, and what a key rotation means
//! for a digest recorded earlier.
//!
//! Data flow, for a workload (config rollout) or an AppSet alike:
//! 1. [`discovery`] lists the sources a pod template references (and, for native workloads,
//!    the ones their annotations name), with the keys that count and whether each is optional.
//! 2. [`fetch`] reads those sources with plain GETs; [`hash`] turns them into a canonical
//!    encoding and an HMAC-SHA256 digest keyed with the [`keyring`]'s key. Bodies are dropped
//!    right after hashing.
//! 3. [`rotation`] compares the digests of the data now with the digest recorded on the object,
//!    across a key rotation.
//!
//! The keyring is read (or created) at start by [`fetch::ensure_keyring`], followed live
//! ([`live`]), and shared by the config rollout and AppSet controllers; a change makes both
//! compare every object again. Everything but [`fetch`] and [`live`] is pure.

pub mod discovery;
pub mod fetch;
pub mod hash;
pub mod keyring;
pub mod live;
pub mod rotation;
