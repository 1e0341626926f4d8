//! Each source's own digest, kept while its `resourceVersion` stays what the metadata watch
//! last saw, and shared by every workload that uses the source with the same keys.
//!
//! Data flow: a reconcile asks [`SourceDigests::get`] for each source it uses, giving the
//! version the shared metadata watch holds now ([`crate::sourcewatch::SourceVersions`]). An
//! entry answers only when it was made from that very version; a source the watch has not seen
//! (not listed yet, or gone) never answers. Misses are read with a GET and offered back with
//! [`SourceDigests::put`], tagged with the version the GET returned. At start-up the controller
//! fills the cache from paginated LISTs of the sources its workloads use
//! ([`crate::config::watch`]), so a start or restart reads a few pages instead of one GET per
//! source.
//!
//! Why a stale entry is never used: an entry's version is the object's own; when the source
//! changes, the watch's version changes and no longer matches, whatever order the GET and the
//! watch event came in. Only digests are kept (never data), one entry per source and set of
//! keys used. Pure.

use std::collections::HashMap;

use super::index::SourceRef;
use crate::confighash::discovery::KeySet;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    version: String,
    /// (key id, the source's own digest under that key).
    digests: Vec<(String, String)>,
}

/// The cache.
#[derive(Debug, Default)]
pub struct SourceDigests {
    entries: HashMap<SourceRef, Vec<(KeySet, Entry)>>,
}

impl SourceDigests {
    /// The source's digests under each of `key_ids` (in that order), when an entry was made
    /// from `version` (the version the watch holds now) with the same keys and key ids.
    pub fn get(
        &self,
        source: &SourceRef,
        keys: &KeySet,
        version: Option<&str>,
        key_ids: &[&str],
    ) -> Option<Vec<String>> {
        let version = version?;
        let (_, entry) = self
            .entries
            .get(source)?
            .iter()
            .find(|(k, e)| k == keys && e.version == version)?;
        key_ids
            .iter()
            .map(|id| {
                entry
                    .digests
                    .iter()
                    .find(|(k, _)| k == id)
                    .map(|(_, d)| d.clone())
            })
            .collect()
    }

    /// Keeps the digests of `source` read at `version` for `keys`, replacing any older entry
    /// for the same keys.
    pub fn put(
        &mut self,
        source: SourceRef,
        keys: KeySet,
        version: String,
        digests: Vec<(String, String)>,
    ) {
        let list = self.entries.entry(source).or_default();
        list.retain(|(k, _)| *k != keys);
        list.push((keys, Entry { version, digests }));
    }

    /// Drops every entry whose version is no longer `current(source)` (the watch's), to bound
    /// the cache to live sources; returns how many were dropped.
    pub fn prune(&mut self, mut current: impl FnMut(&SourceRef) -> Option<String>) -> usize {
        let mut dropped = 0;
        self.entries.retain(|source, list| {
            let now = current(source);
            let before = list.len();
            list.retain(|(_, e)| now.as_deref() == Some(e.version.as_str()));
            dropped += before - list.len();
            !list.is_empty()
        });
        dropped
    }

    /// How many entries it holds.
    pub fn len(&self) -> usize {
        self.entries.values().map(Vec::len).sum()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::confighash::discovery::SourceKind;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn src(i: u8) -> SourceRef {
        SourceRef {
            kind: SourceKind::Secret,
            namespace: "ns".into(),
            name: format!("s{i}"),
        }
    }

    fn only(k: &str) -> KeySet {
        KeySet::Only(BTreeSet::from([k.to_string()]))
    }

    #[test]
    fn an_entry_answers_only_for_its_version_keys_and_key_ids() {
        let mut c = SourceDigests::default();
        c.put(
            src(0),
            KeySet::All,
            "5".into(),
            vec![("k1".into(), "d".into())],
        );
        assert_eq!(
            c.get(&src(0), &KeySet::All, Some("5"), &["k1"]),
            Some(vec!["d".to_string()])
        );
        assert_eq!(c.get(&src(0), &KeySet::All, Some("6"), &["k1"]), None);
        assert_eq!(c.get(&src(0), &KeySet::All, None, &["k1"]), None);
        assert_eq!(c.get(&src(0), &only("a"), Some("5"), &["k1"]), None);
        assert_eq!(c.get(&src(0), &KeySet::All, Some("5"), &["k1", "k0"]), None);
        assert_eq!(c.get(&src(1), &KeySet::All, Some("5"), &["k1"]), None);
        c.put(
            src(0),
            only("a"),
            "5".into(),
            vec![("k1".into(), "e".into())],
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c.prune(|_| Some("6".into())), 2);
        assert!(c.is_empty());
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Source `s` changes: its data and the watch's version go up.
        Change(u8),
        /// A reconcile reads `s` (a GET) and offers it, possibly after `late` more changes
        /// (the GET answered before them, its result arrives after).
        Read(u8, u8),
        /// A reconcile looks `s` up.
        Get(u8),
    }

    proptest! {
        /// Whatever the order of changes, reads and lookups, a hit is the digest of the data the
        /// watch's version stands for.
        #[test]
        fn a_hit_is_never_stale(ops in proptest::collection::vec(prop_oneof![
            (0u8..3).prop_map(Op::Change),
            ((0u8..3), 0u8..3).prop_map(|(s, l)| Op::Read(s, l)),
            (0u8..3).prop_map(Op::Get),
        ], 1..80)) {
            let mut c = SourceDigests::default();
            let mut version = [0u32; 3];
            let digest = |v: u32| format!("digest-of-v{v}");
            for op in ops {
                match op {
                    Op::Change(s) => version[s as usize] += 1,
                    Op::Read(s, late) => {
                        let read = version[s as usize];
                        version[s as usize] += late as u32;
                        c.put(src(s), KeySet::All, read.to_string(), vec![("k".into(), digest(read))]);
                    }
                    Op::Get(s) => {
                        let now = version[s as usize];
                        if let Some(found) = c.get(&src(s), &KeySet::All, Some(&now.to_string()), &["k"]) {
                            prop_assert_eq!(found, vec![digest(now)]);
                        }
                    }
                }
            }
        }
    }
}
