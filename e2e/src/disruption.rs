//! What a fault test watches: the replicas down at any moment and the claims deleted.
//!
//! [`watch`] follows the pods and claims of a namespace with two watches and keeps, in a
//! shared [`Seen`], the most replicas that were missing or terminating at once (counted at
//! every pod event once the first list is in), the claims that started terminating, and any
//! moment at which two pod objects of one ordinal existed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};

/// What the watches saw during a fault test.
#[derive(Debug, Default)]
pub struct Seen {
    /// The most replicas missing or terminating at once.
    pub max_down: usize,
    /// Claims that started terminating or were deleted.
    pub claims_deleted: Vec<String>,
    /// Moments two pod objects of one ordinal existed at once.
    pub same_ordinal: usize,
}

/// Watches the pods and claims of `ns` until the returned tasks are aborted; `replicas` is
/// the size of the set under test.
pub fn watch(
    client: &Client,
    ns: &str,
    replicas: usize,
) -> (Arc<Mutex<Seen>>, Vec<tokio::task::JoinHandle<()>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let pod_task = {
        let seen = seen.clone();
        tokio::spawn(async move {
            // name → (ordinal label, live)
            let mut present: BTreeMap<String, (String, bool)> = BTreeMap::new();
            let mut synced = false;
            let mut stream = watcher(pods, watcher::Config::default()).boxed();
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                        let ordinal = p
                            .labels()
                            .get("apps.kubernetes.io/pod-index")
                            .cloned()
                            .unwrap_or_default();
                        present.insert(
                            p.name_any(),
                            (ordinal, p.metadata.deletion_timestamp.is_none()),
                        );
                    }
                    Ok(watcher::Event::Delete(p)) => {
                        present.remove(&p.name_any());
                    }
                    Ok(watcher::Event::InitDone) => synced = true,
                    _ => continue,
                }
                if !synced {
                    continue;
                }
                let Ok(mut s) = seen.lock() else { return };
                let live = present.values().filter(|(_, live)| *live).count();
                s.max_down = s.max_down.max(replicas.saturating_sub(live));
                let mut ordinals: Vec<&String> = present.values().map(|(o, _)| o).collect();
                let n = ordinals.len();
                ordinals.sort();
                ordinals.dedup();
                if ordinals.len() != n {
                    s.same_ordinal += 1;
                }
            }
        })
    };
    let claim_task = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut stream = watcher(claims, watcher::Config::default()).boxed();
            while let Some(ev) = stream.next().await {
                let c = match ev {
                    Ok(watcher::Event::Apply(c)) if c.metadata.deletion_timestamp.is_some() => c,
                    Ok(watcher::Event::Delete(c)) => c,
                    _ => continue,
                };
                if let Ok(mut s) = seen.lock()
                    && !s.claims_deleted.contains(&c.name_any())
                {
                    s.claims_deleted.push(c.name_any());
                }
            }
        })
    };
    (seen, vec![pod_task, claim_task])
}
