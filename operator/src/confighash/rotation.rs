//! The key-rotation rule, shared by both controllers: does the data a recorded digest stands
//! for still hash to it, under the current key or under the previous one?
//!
//! A digest is only comparable with one made under the same key. After a rotation
//! ([`crate::confighash::keyring`]) a digest recorded before it no longer matches anything made
//! with the current key, although the data may be the same. [`compare`] tells the cases apart
//! from the recorded digest and the [`Digests`] of the data now:
//!
//! | recorded | data now | [`Comparison`] |
//! | --- | --- | --- |
//! | nothing | any | `Unrecorded` |
//! | under the current key | same digest | `Unchanged` |
//! | under the previous key | same digest under the previous key | `UnchangedUnderPrevious` |
//! | under either key | another digest | `Changed` |
//! | under a key the keyring no longer has | any | `UnknownKey` |
//!
//! Config rollout records the key id with the digest ([`Observed`], `<key id>:<digest>` in
//! an annotation), so it can tell `UnknownKey` apart. An AppSet's `status.configHash` is the
//! bare digest: without a key id, a digest that matches neither key is `Changed`.
//!
//! What each controller keeps afterwards: config rollout re-records an unchanged baseline under
//! the current key (the baseline is metadata, so re-recording never rolls). An AppSet keeps the
//! recorded digest while [`Comparison::is_unchanged`] ([`Comparison::keep`]), because the
//! digest is part of its revision and replacing it would roll the set; once the previous key is
//! dropped from the Secret, such an AppSet rolls once.

use super::hash::{self, Source};
use super::keyring::Keyring;

/// A digest with the id of the key it was made with, as recorded on a workload:
/// `<key id>:<digest>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// The id of the key the digest was made with.
    pub key_id: String,
    /// The digest.
    pub digest: String,
}

impl Observed {
    /// Parses `<key id>:<digest>`; `None` for anything else.
    pub fn parse(value: &str) -> Option<Self> {
        let (key_id, digest) = value.trim().split_once(':')?;
        let ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit());
        (ok(key_id) && ok(digest)).then(|| Self {
            key_id: key_id.to_string(),
            digest: digest.to_string(),
        })
    }

    /// The annotation value, `<key id>:<digest>`.
    pub fn to_annotation(&self) -> String {
        format!("{}:{}", self.key_id, self.digest)
    }
}

/// A recorded digest, with its key id when the recorder kept one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recorded<'a> {
    /// The id of the key it was made with, when known.
    pub key_id: Option<&'a str>,
    /// The digest.
    pub digest: &'a str,
}

impl<'a> From<&'a Observed> for Recorded<'a> {
    fn from(o: &'a Observed) -> Self {
        Self {
            key_id: Some(&o.key_id),
            digest: &o.digest,
        }
    }
}

impl<'a> Recorded<'a> {
    /// A bare digest, without a key id.
    pub fn bare(digest: &'a str) -> Self {
        Self {
            key_id: None,
            digest,
        }
    }
}

/// The digests of the data now, under each key of the keyring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digests {
    /// Under the current key: what is recorded from now on.
    pub current: Observed,
    /// Under the previous key, when the keyring still has one.
    pub previous: Option<Observed>,
}

impl Digests {
    /// Hashes `sources` under every key of `keyring`.
    pub fn of(keyring: &Keyring, sources: &[Source]) -> Self {
        let under = |key: &hash::HashKey| Observed {
            key_id: key.id().to_string(),
            digest: hash::digest(key, sources),
        };
        Self {
            current: under(&keyring.current),
            previous: keyring.previous.as_ref().map(under),
        }
    }
}

/// How the data now compares with a recorded digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comparison {
    /// Nothing was recorded.
    Unrecorded,
    /// Recorded under the current key, and the data still hashes to it.
    Unchanged,
    /// Recorded under the previous key, and the data still hashes to it under that key.
    UnchangedUnderPrevious,
    /// The data hashes to something else.
    Changed,
    /// Recorded under a key the keyring no longer has: a change cannot be told apart.
    UnknownKey,
}

impl Comparison {
    /// Whether the data is what was recorded, under whichever key.
    pub fn is_unchanged(self) -> bool {
        matches!(self, Self::Unchanged | Self::UnchangedUnderPrevious)
    }

    /// The digest that stands for the data now when the recorded one must be kept as long as
    /// the data is unchanged: the recorded digest then, else the one under the current key.
    pub fn keep<'a>(self, recorded: Option<Recorded<'a>>, now: &'a Digests) -> &'a str {
        match recorded {
            Some(r) if self.is_unchanged() => r.digest,
            _ => &now.current.digest,
        }
    }
}

/// Compares a recorded digest with the digests of the data now. See the module docs.
pub fn compare(recorded: Option<Recorded<'_>>, now: &Digests) -> Comparison {
    let Some(rec) = recorded else {
        return Comparison::Unrecorded;
    };
    let same = |o: &Observed| o.digest == rec.digest;
    match rec.key_id {
        Some(id) if id == now.current.key_id => {
            if same(&now.current) {
                Comparison::Unchanged
            } else {
                Comparison::Changed
            }
        }
        Some(id) => match &now.previous {
            Some(prev) if prev.key_id == id => {
                if same(prev) {
                    Comparison::UnchangedUnderPrevious
                } else {
                    Comparison::Changed
                }
            }
            _ => Comparison::UnknownKey,
        },
        None if same(&now.current) => Comparison::Unchanged,
        None if now.previous.as_ref().is_some_and(same) => Comparison::UnchangedUnderPrevious,
        None => Comparison::Changed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::confighash::hash::HashKey;
    use proptest::prelude::*;

    fn obs(key: &str, digest: &str) -> Observed {
        Observed {
            key_id: key.into(),
            digest: digest.into(),
        }
    }

    fn digests(current: &str, previous: Option<&str>) -> Digests {
        Digests {
            current: obs("02", current),
            previous: previous.map(|d| obs("01", d)),
        }
    }

    #[test]
    fn observed_round_trips_and_rejects_garbage() {
        let o = obs("0a1b", "ff00");
        assert_eq!(Observed::parse(&o.to_annotation()), Some(o));
        for bad in ["", "abc", ":ff", "aa:", "aa:zz", "x:ff"] {
            assert_eq!(Observed::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn with_a_key_id() {
        let now = digests("new", Some("old"));
        let rec = |k: &'static str, d: &'static str| {
            Some(Recorded {
                key_id: Some(k),
                digest: d,
            })
        };
        assert_eq!(compare(None, &now), Comparison::Unrecorded);
        assert_eq!(compare(rec("02", "new"), &now), Comparison::Unchanged);
        assert_eq!(compare(rec("02", "other"), &now), Comparison::Changed);
        assert_eq!(
            compare(rec("01", "old"), &now),
            Comparison::UnchangedUnderPrevious
        );
        assert_eq!(compare(rec("01", "other"), &now), Comparison::Changed);
        assert_eq!(compare(rec("07", "old"), &now), Comparison::UnknownKey);
        // Without a previous key, a digest of the old key is of an unknown key.
        assert_eq!(
            compare(rec("01", "old"), &digests("new", None)),
            Comparison::UnknownKey
        );
    }

    #[test]
    fn with_a_bare_digest() {
        let now = digests("new", Some("old"));
        let bare = |d| Some(Recorded::bare(d));
        assert_eq!(compare(bare("new"), &now), Comparison::Unchanged);
        assert_eq!(
            compare(bare("old"), &now),
            Comparison::UnchangedUnderPrevious
        );
        assert_eq!(compare(bare("other"), &now), Comparison::Changed);
        assert_eq!(
            compare(bare("old"), &digests("new", None)),
            Comparison::Changed
        );
    }

    #[test]
    fn keep_holds_the_recorded_digest_only_while_the_data_is_unchanged() {
        let now = digests("new", Some("old"));
        for (rec, kept) in [("old", "old"), ("new", "new"), ("other", "new")] {
            let r = Some(Recorded::bare(rec));
            assert_eq!(compare(r, &now).keep(r, &now), kept, "recorded {rec}");
        }
        assert_eq!(Comparison::Unrecorded.keep(None, &now), "new");
    }

    fn source(value: &str) -> Source {
        use k8s_openapi::api::core::v1::ConfigMap;
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cfg", "namespace": "ns"},
            "data": {"k": value}
        }))
        .expect("a ConfigMap");
        Source::from_config_map(cm, &crate::confighash::discovery::KeySet::All)
    }

    proptest! {
        /// Across any rotation, real data: unchanged data never compares as changed under
        /// either form of record, and changed data never compares as unchanged.
        #[test]
        fn rotation_never_hides_a_change_nor_invents_one(
            old_key in proptest::collection::vec(any::<u8>(), 16..40),
            new_key in proptest::collection::vec(any::<u8>(), 16..40),
            before in "[a-z]{0,8}",
            after in "[a-z]{0,8}",
            keep_previous in any::<bool>(),
        ) {
            prop_assume!(old_key != new_key);
            let old = Keyring { current: HashKey::new(old_key.clone()), previous: None };
            let recorded = Digests::of(&old, &[source(&before)]).current;
            let rotated = Keyring {
                current: HashKey::new(new_key),
                previous: keep_previous.then(|| HashKey::new(old_key)),
            };
            let now = Digests::of(&rotated, &[source(&after)]);
            for rec in [Recorded::from(&recorded), Recorded::bare(&recorded.digest)] {
                let c = compare(Some(rec), &now);
                if before == after {
                    if keep_previous {
                        prop_assert_eq!(c, Comparison::UnchangedUnderPrevious);
                    } else {
                        prop_assert!(!c.is_unchanged());
                    }
                } else {
                    prop_assert!(!c.is_unchanged(), "{:?} for changed data", c);
                }
            }
        }
    }
}
