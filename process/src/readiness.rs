//! Readiness by handle.
//!
//! A [`Readiness`] is a set of pending gates, each named for what it waits on ("Deployment
//! watch (all namespaces)"). [`Readiness::handle`] opens a gate and returns its
//! [`ReadyHandle`]; [`ReadyHandle::also`] opens another one from a handle, so that a component
//! given one handle can hand one to each watch it starts before it releases its own; and
//! [`ReadyHandle::ready`] closes the gate. The process is ready once no gate is open.
//!
//! A handle dropped without [`ReadyHandle::ready`] leaves its gate open: a watch that died
//! before its first list must not make the process look ready. Gates are opened before the work
//! they guard starts, so a check between two starts cannot pass early.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

#[derive(Debug)]
struct Inner {
    next: AtomicU64,
    pending: watch::Sender<BTreeMap<u64, String>>,
}

/// The readiness of one process: the set of open gates.
#[derive(Clone, Debug)]
pub struct Readiness {
    inner: Arc<Inner>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    /// A readiness with no gate open (ready until a gate is opened).
    pub fn new() -> Self {
        let (pending, _) = watch::channel(BTreeMap::new());
        Self {
            inner: Arc::new(Inner {
                next: AtomicU64::new(0),
                pending,
            }),
        }
    }

    /// Opens a gate named `what` and returns the handle that closes it.
    pub fn handle(&self, what: impl Into<String>) -> ReadyHandle {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let what = what.into();
        self.inner.pending.send_modify(|p| {
            p.insert(id, what);
        });
        ReadyHandle {
            readiness: self.clone(),
            id,
        }
    }

    /// Whether every gate is closed.
    pub fn is_ready(&self) -> bool {
        self.inner.pending.borrow().is_empty()
    }

    /// The names of the open gates, in the order they were opened.
    pub fn pending(&self) -> Vec<String> {
        self.inner.pending.borrow().values().cloned().collect()
    }

    /// Completes once every gate is closed.
    pub async fn wait(&self) {
        let mut rx = self.inner.pending.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = rx.wait_for(BTreeMap::is_empty).await;
    }
}

/// One open gate of a [`Readiness`].
#[derive(Debug)]
pub struct ReadyHandle {
    readiness: Readiness,
    id: u64,
}

impl ReadyHandle {
    /// Opens another gate, named `what`, in the same readiness.
    pub fn also(&self, what: impl Into<String>) -> ReadyHandle {
        self.readiness.handle(what)
    }

    /// Closes this gate.
    pub fn ready(self) {
        let id = self.id;
        self.readiness.inner.pending.send_modify(|p| {
            p.remove(&id);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ready_only_once_every_gate_is_closed() {
        let r = Readiness::new();
        assert!(r.is_ready());
        let a = r.handle("a");
        let b = a.also("b");
        assert_eq!(r.pending(), vec!["a".to_string(), "b".to_string()]);
        a.ready();
        assert!(!r.is_ready());
        assert_eq!(r.pending(), vec!["b".to_string()]);
        b.ready();
        assert!(r.is_ready());
    }

    #[test]
    fn a_dropped_handle_keeps_its_gate_open() {
        let r = Readiness::new();
        drop(r.handle("died before its first list"));
        assert!(!r.is_ready());
        assert_eq!(r.pending(), vec!["died before its first list".to_string()]);
    }

    #[tokio::test]
    async fn wait_completes_when_the_last_gate_closes() {
        let r = Readiness::new();
        let a = r.handle("a");
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        a.ready();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("wait() returns once ready")
            .expect("the waiter does not panic");
    }

    proptest! {
        /// Whatever the order gates are opened and closed in, the readiness is ready exactly
        /// when every opened gate has been closed, and `pending` names the open ones.
        #[test]
        fn ready_iff_all_closed(ops in proptest::collection::vec((any::<bool>(), 0usize..8), 0..64)) {
            let r = Readiness::new();
            let mut open: Vec<(String, ReadyHandle)> = Vec::new();
            let mut n = 0;
            for (opens, pick) in ops {
                if opens || open.is_empty() {
                    let name = format!("gate {n}");
                    n += 1;
                    let h = match open.first() {
                        Some((_, h)) if pick % 2 == 0 => h.also(name.clone()),
                        _ => r.handle(name.clone()),
                    };
                    open.push((name, h));
                } else {
                    let (_, h) = open.remove(pick % open.len());
                    h.ready();
                }
                prop_assert_eq!(r.is_ready(), open.is_empty());
                let names: Vec<String> = open.iter().map(|(n, _)| n.clone()).collect();
                prop_assert_eq!(r.pending(), names);
            }
        }
    }
}
