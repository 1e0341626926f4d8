//! The per-installation hash key: how it is created, kept, rotated and read.
//!
//! The key lives in a Secret in the operator's namespace, by default
//! [`DEFAULT_SECRET_NAME`] (`appset-config-hash-key`), with two data entries:
//! * [`CURRENT`] (`key`): 32 random bytes, the key every new digest is computed with;
//! * [`PREVIOUS`] (`previous`, optional): the key before the last rotation.
//!
//! **Creation.** At start-up the operator reads the Secret; when it does not exist, the operator
//! generates 32 bytes from the operating system's random source and creates it (if another
//! replica created it first, the operator reads that one instead). The key never leaves the
//! Secret and the operator's memory: it is never logged (its `Debug` is redacted), and only its
//! id, a 16-hex-digit hash of it, appears in annotations.
//!
//! **Rotation.** Move the value of `key` to `previous` and put 32 fresh random bytes in `key`.
//! The operator follows the Secret ([`crate::confighash::live`]) and compares every workload and
//! AppSet at once: those whose recorded digest was made with the previous key and whose data did
//! not change are re-baselined under the new key without a rollout; those whose data did change
//! roll as usual (also when the change and the rotation came together). `previous` can be
//! dropped once that is done (the operator logs each change of the key; every workload's
//! `appset.dev/config-baseline` label and every AppSet's `status.configDigest` then start with the
//! new key id). A digest made with a key that is neither (the Secret replaced without keeping
//! `previous`, or deleted and recreated) cannot tell a change from none: it is re-baselined
//! without a rollout, with a `ConfigKeyUnknown` Warning Event on the object.
//!
//! This module is pure: it parses and builds the Secret; the I/O lives in
//! [`crate::confighash::fetch`].

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;

use super::hash::HashKey;

/// The default name of the key Secret.
pub const DEFAULT_SECRET_NAME: &str = "appset-config-hash-key";
/// The Secret data entry holding the current key.
pub const CURRENT: &str = "key";
/// The Secret data entry holding the previous key, after a rotation.
pub const PREVIOUS: &str = "previous";
/// The length of a generated key.
pub const KEY_LEN: usize = 32;
/// The shortest key accepted from the Secret.
pub const MIN_KEY_LEN: usize = 16;

/// Why a key Secret cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyringError {
    /// The Secret has no `key` entry.
    #[error("the hash key Secret has no `{CURRENT}` entry")]
    MissingKey,
    /// An entry is too short to be a key.
    #[error(
        "the `{entry}` entry of the hash key Secret is {len} bytes; at least {MIN_KEY_LEN} are required"
    )]
    TooShort {
        /// The data entry.
        entry: &'static str,
        /// Its length.
        len: usize,
    },
    /// The operating system's random source failed.
    #[error("cannot generate a hash key: {0}")]
    Random(String),
}

/// The current key and, after a rotation, the previous one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keyring {
    /// The key new digests are computed with.
    pub current: HashKey,
    /// The key before the last rotation.
    pub previous: Option<HashKey>,
}

impl Keyring {
    /// A keyring with one fresh random key.
    pub fn generate() -> Result<Self, KeyringError> {
        let mut bytes = vec![0u8; KEY_LEN];
        getrandom::fill(&mut bytes).map_err(|e| KeyringError::Random(e.to_string()))?;
        Ok(Self {
            current: HashKey::new(bytes),
            previous: None,
        })
    }

    /// Reads the keyring from the Secret's `data`.
    pub fn from_secret_data(data: &BTreeMap<String, ByteString>) -> Result<Self, KeyringError> {
        let read = |entry: &'static str| -> Result<Option<HashKey>, KeyringError> {
            match data.get(entry) {
                None => Ok(None),
                Some(b) if b.0.len() < MIN_KEY_LEN => Err(KeyringError::TooShort {
                    entry,
                    len: b.0.len(),
                }),
                Some(b) => Ok(Some(HashKey::new(b.0.clone()))),
            }
        };
        let current = read(CURRENT)?.ok_or(KeyringError::MissingKey)?;
        let previous = read(PREVIOUS)?.filter(|p| p.id() != current.id());
        Ok(Self { current, previous })
    }

    /// The Secret that keeps this keyring.
    pub fn to_secret(&self, namespace: &str, name: &str) -> Secret {
        let mut data = BTreeMap::new();
        data.insert(
            CURRENT.to_string(),
            ByteString(self.current.bytes().to_vec()),
        );
        if let Some(previous) = &self.previous {
            data.insert(PREVIOUS.to_string(), ByteString(previous.bytes().to_vec()));
        }
        Secret {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(namespace.to_string()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "appset".to_string(),
                )])),
                ..Default::default()
            },
            type_: Some("Opaque".to_string()),
            data: Some(data),
            ..Default::default()
        }
    }

    /// The current key, then the previous one if there is one.
    pub fn keys(&self) -> Vec<&HashKey> {
        std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .collect()
    }

    /// The key with this id, current or previous.
    pub fn by_id(&self, id: &str) -> Option<&HashKey> {
        self.keys().into_iter().find(|k| k.id() == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_random_and_round_trip_through_the_secret() {
        let a = Keyring::generate().unwrap();
        let b = Keyring::generate().unwrap();
        assert_ne!(a.current.id(), b.current.id());
        assert_eq!(a.current.bytes().len(), KEY_LEN);
        let secret = a.to_secret("ops", DEFAULT_SECRET_NAME);
        assert_eq!(secret.metadata.namespace.as_deref(), Some("ops"));
        let back = Keyring::from_secret_data(secret.data.as_ref().unwrap()).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn previous_key_is_kept_and_found_by_id() {
        let old = Keyring::generate().unwrap().current;
        let new = Keyring::generate().unwrap().current;
        let ring = Keyring {
            current: new.clone(),
            previous: Some(old.clone()),
        };
        let back =
            Keyring::from_secret_data(ring.to_secret("ns", "n").data.as_ref().unwrap()).unwrap();
        assert_eq!(back.by_id(old.id()), Some(&old));
        assert_eq!(back.by_id(new.id()), Some(&new));
        assert_eq!(back.by_id("0000000000000000"), None);
    }

    #[test]
    fn bad_secrets_are_reported() {
        assert_eq!(
            Keyring::from_secret_data(&BTreeMap::new()),
            Err(KeyringError::MissingKey)
        );
        let short = BTreeMap::from([(CURRENT.to_string(), ByteString(vec![1; 4]))]);
        assert_eq!(
            Keyring::from_secret_data(&short),
            Err(KeyringError::TooShort {
                entry: CURRENT,
                len: 4
            })
        );
    }

    #[test]
    fn a_previous_key_equal_to_the_current_one_is_dropped() {
        let data = BTreeMap::from([
            (CURRENT.to_string(), ByteString(vec![1; 32])),
            (PREVIOUS.to_string(), ByteString(vec![1; 32])),
        ]);
        assert_eq!(Keyring::from_secret_data(&data).unwrap().previous, None);
    }
}
