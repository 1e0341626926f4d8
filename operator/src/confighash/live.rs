//! The keyring as it is now: read at start, then replaced whenever the hash key Secret changes,
//! so a rotation takes effect without a restart (and a standby that becomes leader hashes with
//! the key of the moment, not the one it read at its own start).
//!
//! [`LiveKeyring`] is a `tokio::sync::watch` channel of `Arc<Keyring>`: each reconcile takes
//! [`LiveKeyring::get`] once and hashes with it; [`LiveKeyring::rotations`] is a stream that
//! yields once per change, which each controller feeds to `reconcile_all_on`, so that every
//! workload and AppSet is compared under the new keyring at once, while the previous key is
//! still in it: unchanged data is re-baselined without a rollout, changed data rolls
//! ([`super::rotation`]). [`follow`] is the watch of the Secret.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{info, warn};

use super::keyring::Keyring;

/// The keyring both controllers hash with; cheap to clone.
#[derive(Clone, Debug)]
pub struct LiveKeyring {
    tx: Arc<watch::Sender<Arc<Keyring>>>,
}

impl LiveKeyring {
    /// Starts with `keyring`.
    pub fn new(keyring: Keyring) -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(Arc::new(keyring))),
        }
    }

    /// The keyring now.
    pub fn get(&self) -> Arc<Keyring> {
        self.tx.borrow().clone()
    }

    /// Replaces the keyring; `true` when it differs from the one before.
    pub fn replace(&self, keyring: Keyring) -> bool {
        self.tx.send_if_modified(|k| {
            if **k == keyring {
                false
            } else {
                *k = Arc::new(keyring);
                true
            }
        })
    }

    /// Yields once after each change of the keyring (changes in quick succession may be
    /// reported once).
    pub fn rotations(&self) -> impl Stream<Item = ()> + Send + 'static {
        let rx = self.tx.subscribe();
        futures::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            Some(((), rx))
        })
    }
}

impl From<Keyring> for LiveKeyring {
    fn from(k: Keyring) -> Self {
        Self::new(k)
    }
}

impl From<Arc<Keyring>> for LiveKeyring {
    fn from(k: Arc<Keyring>) -> Self {
        Self::new(Keyring::clone(&k))
    }
}

/// Follows the hash key Secret `namespace/name` into `live` until the stream ends (never,
/// unless dropped). A Secret that cannot be read as a keyring is reported and ignored: the
/// keyring in use stays. A deleted Secret is reported; the key in memory stays in use (the
/// Secret is created again, with a new key, only at the next start).
pub fn follow(
    client: Client,
    namespace: &str,
    name: &str,
    live: LiveKeyring,
) -> impl Stream<Item = ()> + Send + 'static {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let (namespace, name) = (namespace.to_string(), name.to_string());
    watcher(api, config)
        .backoff(crate::kubeapi::watch_backoff())
        .map(move |event| match event {
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                let data = s.data.unwrap_or_default();
                match Keyring::from_secret_data(&data) {
                    Ok(keyring) => {
                        let (current, previous) = (
                            keyring.current.id().to_string(),
                            keyring.previous.as_ref().map(|k| k.id().to_string()),
                        );
                        if live.replace(keyring) {
                            info!(%namespace, %name, key_id = %current, previous_key_id = ?previous,
                                "the config hash key changed; every workload is compared again");
                        }
                    }
                    Err(err) => warn!(%namespace, %name, error = %err,
                        "the config hash key Secret cannot be used; the key in use stays"),
                }
            }
            Ok(watcher::Event::Delete(_)) => warn!(%namespace, %name,
                "the config hash key Secret was deleted; the key in use stays until the next start"),
            Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
            Err(err) => warn!(error = %err, "the config hash key watch failed; retrying"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_change_is_announced_once_and_an_equal_keyring_not_at_all() {
        let first = Keyring::generate().expect("a key");
        let live = LiveKeyring::new(first.clone());
        let mut rotations = Box::pin(live.rotations());
        assert!(
            !live.replace(first.clone()),
            "the same keyring is no change"
        );
        let second = Keyring {
            current: Keyring::generate().expect("a key").current,
            previous: Some(first.current.clone()),
        };
        assert!(live.replace(second.clone()));
        assert_eq!(*live.get(), second);
        let next = tokio::time::timeout(std::time::Duration::from_secs(1), rotations.next()).await;
        assert_eq!(next, Ok(Some(())));
        let none =
            tokio::time::timeout(std::time::Duration::from_millis(50), rotations.next()).await;
        assert!(none.is_err(), "no second announcement");
    }
}
