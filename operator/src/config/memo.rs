//! What each workload's sources last hashed to, kept until one of those sources is seen
//! changing, so that a reconcile that does not follow a source change reads no source at all.
//!
//! Reconciles that follow no source change are common: the echo of the controller's own write
//! (the baseline label), a scale or other edit of the workload that keeps its references, a
//! resync. Without the memo each of them GETs every source again.
//!
//! Data flow: [`crate::config::watch`] calls [`Memos::invalidate`] for every workload that uses
//! a source the metadata watch reports (any event: a change, a delete, or an object of a
//! relist), before it queues the workload. A reconcile takes the workload's [`Memos::epoch`]
//! *before* it registers its references in the reverse index and reads the sources, and offers
//! its result with [`Memos::put`] tagged with that epoch. A result whose epoch is no longer
//! current (an event came while the sources were being read) is refused, so a memo never holds
//! data older than the last event seen for any of its sources. [`Memos::get`] returns a memo
//! only for the same references and the same hash keys.
//!
//! Only digests are kept (no source data), so holding them reveals nothing. Pure: the tests
//! drive it with a model.

use std::collections::{BTreeMap, HashMap};

use super::index::WorkloadRef;
use crate::confighash::discovery::{References, SourceName};
use crate::confighash::rotation::Digests;

/// The result of hashing one workload's sources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Memo {
    /// The references the sources were read for.
    pub refs: References,
    /// The digests under each key.
    pub digests: Digests,
    /// Each source's digest under the current key.
    pub per_source: BTreeMap<SourceName, String>,
    /// Required sources that did not exist.
    pub missing: Vec<SourceName>,
}

#[derive(Debug)]
struct Slot {
    epoch: u64,
    memo: Option<Memo>,
}

/// The memos of every workload, with one epoch each.
#[derive(Debug, Default)]
pub struct Memos {
    slots: HashMap<WorkloadRef, Slot>,
    /// Epochs are drawn from one counter, so a workload forgotten and seen again never gets
    /// back an epoch a reconcile still in flight holds.
    next: u64,
}

impl Memos {
    /// The workload's epoch now: take it before reading the sources, pass it to [`Self::put`].
    pub fn epoch(&mut self, workload: &WorkloadRef) -> u64 {
        if let Some(slot) = self.slots.get(workload) {
            return slot.epoch;
        }
        self.next += 1;
        let epoch = self.next;
        self.slots
            .insert(workload.clone(), Slot { epoch, memo: None });
        epoch
    }

    /// A source the workload uses was seen changing: its memo is dropped, and any result read
    /// before now will be refused.
    pub fn invalidate(&mut self, workload: &WorkloadRef) {
        if let Some(slot) = self.slots.get_mut(workload) {
            self.next += 1;
            slot.epoch = self.next;
            slot.memo = None;
        }
    }

    /// Keeps `memo` when no source of the workload was seen changing since `epoch` was taken;
    /// returns whether it was kept.
    pub fn put(&mut self, workload: &WorkloadRef, epoch: u64, memo: Memo) -> bool {
        match self.slots.get_mut(workload) {
            Some(slot) if slot.epoch == epoch => {
                slot.memo = Some(memo);
                true
            }
            _ => false,
        }
    }

    /// The memo for these references, made under these key ids (current, previous).
    pub fn get(
        &self,
        workload: &WorkloadRef,
        refs: &References,
        current_key: &str,
        previous_key: Option<&str>,
    ) -> Option<&Memo> {
        let memo = self.slots.get(workload)?.memo.as_ref()?;
        let same_keys = memo.digests.current.key_id == current_key
            && memo.digests.previous.as_ref().map(|o| o.key_id.as_str()) == previous_key;
        (same_keys && memo.refs == *refs).then_some(memo)
    }

    /// Drops the workload (deleted, or no longer handled).
    pub fn forget(&mut self, workload: &WorkloadRef) {
        self.slots.remove(workload);
    }

    /// Keeps only the workloads for which `keep` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&WorkloadRef) -> bool) {
        self.slots.retain(|w, _| keep(w));
    }

    /// How many workloads hold a memo.
    pub fn len(&self) -> usize {
        self.slots.values().filter(|s| s.memo.is_some()).count()
    }

    /// Whether no workload holds a memo.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::index::WorkloadKind;
    use crate::confighash::discovery::{KeySet, SourceKind};
    use crate::confighash::rotation::Observed;
    use proptest::prelude::*;

    fn workload(i: u8) -> WorkloadRef {
        WorkloadRef {
            kind: WorkloadKind::Deployment,
            namespace: "ns".into(),
            name: format!("w{i}"),
        }
    }

    fn refs(n: u8) -> References {
        let mut r = References::default();
        r.add(
            SourceName {
                kind: SourceKind::ConfigMap,
                name: format!("cm{n}"),
            },
            KeySet::All,
            false,
        );
        r
    }

    fn memo(refs: References, data: u32) -> Memo {
        Memo {
            refs,
            digests: Digests {
                current: Observed {
                    key_id: "aa".into(),
                    digest: format!("{data:08x}"),
                },
                previous: None,
            },
            per_source: BTreeMap::new(),
            missing: vec![],
        }
    }

    #[test]
    fn a_result_read_across_a_source_event_is_refused() {
        let mut m = Memos::default();
        let w = workload(0);
        let epoch = m.epoch(&w);
        m.invalidate(&w);
        assert!(!m.put(&w, epoch, memo(refs(0), 1)));
        assert!(m.get(&w, &refs(0), "aa", None).is_none());
        let epoch = m.epoch(&w);
        assert!(m.put(&w, epoch, memo(refs(0), 2)));
        assert_eq!(
            m.get(&w, &refs(0), "aa", None).map(|x| &x.digests),
            Some(&memo(refs(0), 2).digests)
        );
    }

    #[test]
    fn other_references_or_keys_miss() {
        let mut m = Memos::default();
        let w = workload(0);
        let epoch = m.epoch(&w);
        assert!(m.put(&w, epoch, memo(refs(0), 1)));
        assert!(m.get(&w, &refs(1), "aa", None).is_none());
        assert!(m.get(&w, &refs(0), "bb", None).is_none());
        assert!(m.get(&w, &refs(0), "aa", Some("cc")).is_none());
        m.forget(&w);
        assert!(m.get(&w, &refs(0), "aa", None).is_none());
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// A reconcile of workload `w` starts: it takes the epoch and reads data version `v`.
        Start(u8),
        /// The reconcile started `k` steps ago (if any) for `w` finishes and offers its memo.
        Finish(u8, usize),
        /// The source of `w` changes (its data version goes up) and the watch reports it.
        Change(u8),
        /// A reconcile of `w` looks for a memo.
        Get(u8),
        /// `w` is forgotten (deleted, or opted out) and may be seen again.
        Forget(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..3).prop_map(Op::Start),
            ((0u8..3), 0usize..4).prop_map(|(w, k)| Op::Finish(w, k)),
            (0u8..3).prop_map(Op::Change),
            (0u8..3).prop_map(Op::Get),
            (0u8..3).prop_map(Op::Forget),
        ]
    }

    proptest! {
        /// Whatever the interleaving of reconciles and source events, a memo handed out holds
        /// the data version of the last event seen for the workload's source: never older.
        #[test]
        fn a_memo_is_never_older_than_the_last_event_seen(ops in proptest::collection::vec(op(), 1..60)) {
            let mut m = Memos::default();
            let mut version = [0u32; 3];
            // Reconciles in flight: (workload, epoch, data version read).
            let mut flying: Vec<(u8, u64, u32)> = Vec::new();
            for op in ops {
                match op {
                    Op::Start(w) => {
                        let epoch = m.epoch(&workload(w));
                        flying.push((w, epoch, version[w as usize]));
                    }
                    Op::Finish(w, k) => {
                        let mine: Vec<usize> = flying.iter().enumerate().filter(|(_, f)| f.0 == w).map(|(i, _)| i).collect();
                        if let Some(&i) = mine.get(k.min(mine.len().saturating_sub(1))) {
                            let (w, epoch, read) = flying.remove(i);
                            m.put(&workload(w), epoch, memo(refs(w), read));
                        }
                    }
                    Op::Change(w) => {
                        version[w as usize] += 1;
                        m.invalidate(&workload(w));
                    }
                    Op::Forget(w) => m.forget(&workload(w)),
                    Op::Get(w) => {
                        if let Some(found) = m.get(&workload(w), &refs(w), "aa", None) {
                            prop_assert_eq!(&found.digests, &memo(refs(w), version[w as usize]).digests);
                        }
                    }
                }
            }
        }
    }
}
