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
//! an annotation), so it can tell `UnknownKey` apart. An AppSet records two values
//! ([`appset_config`]): the token in its pod template (`status.configHash`, part of the
//! revision) and the keyed digest it stands for (`status.configDigest`, `<key id>:<digest>`).
//!
//! What each controller keeps afterwards: config rollout re-records an unchanged baseline under
//! the current key (the baseline is metadata, so re-recording never rolls). An AppSet keeps its
//! token while the data is not known to have changed and re-makes only the digest under the
//! current key, so a rotation never rolls it, nor does a second rotation or dropping
//! `previous` once it was compared under the new key. Both controllers compare every object
//! as soon as the keyring changes ([`super::live`]), while `previous` is still there.
//!
//! `UnknownKey` (recorded under a key the keyring does not have: the Secret was replaced without
//! keeping `previous`, or rotated twice before an object was compared) cannot tell a change
//! from none; both controllers then record again without a rollout and put a Warning Event on
//! the object. An AppSet recorded before `configDigest` existed (a bare token) compares as
//! `Changed` once `previous` is gone, and rolls once.

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

    /// The label value, `<key id>.<digest prefix>`: a label value holds at most 63 characters,
    /// so the digest is cut to its first [`LABEL_DIGEST_LEN`] hex digits (184 bits, still far
    /// beyond any accidental collision). [`compare`] matches such a prefix against a full
    /// digest.
    pub fn to_label(&self) -> String {
        let cut = self.digest.len().min(LABEL_DIGEST_LEN);
        format!("{}.{}", self.key_id, &self.digest[..cut])
    }

    /// Parses a label value written by [`Self::to_label`]; `None` for anything else, including
    /// a digest prefix shorter than [`MIN_DIGEST_PREFIX`].
    pub fn parse_label(value: &str) -> Option<Self> {
        let (key_id, digest) = value.trim().split_once('.')?;
        let ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit());
        (ok(key_id) && ok(digest) && digest.len() >= MIN_DIGEST_PREFIX).then(|| Self {
            key_id: key_id.to_string(),
            digest: digest.to_string(),
        })
    }
}

/// How many hex digits of the digest a label baseline keeps.
pub const LABEL_DIGEST_LEN: usize = 46;

/// The shortest recorded digest [`compare`] accepts as a prefix of a full one (128 bits).
pub const MIN_DIGEST_PREFIX: usize = 32;

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
    /// [`hash::combined`] of `sources` under every key of `keyring`: the digests the config
    /// rollout controller records.
    pub fn combined(keyring: &Keyring, sources: &[Source]) -> Self {
        let under = |key: &hash::HashKey| Observed {
            key_id: key.id().to_string(),
            digest: hash::combined(key, sources),
        };
        Self {
            current: under(&keyring.current),
            previous: keyring.previous.as_ref().map(under),
        }
    }

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

/// A baseline recorded by an older appset in the `appset.dev/config-hash-observed` annotation
/// holds the digest of [`hash::digest`] (one HMAC over every source's data), while baselines
/// are now made with [`hash::combine`]. `legacy` compares the annotation with the data now
/// hashed the old way: when that says unchanged, the baseline stands for the same data as
/// `combined`, and the equivalent combined digest (under the key it was made with) is returned,
/// so the decision is "unchanged" (or "re-record after a key rotation") and nothing is written
/// or rolled. Otherwise the old baseline is returned as it is: it then compares as changed
/// (the data changed: roll) or as made with an unknown key, exactly as it would have.
pub fn translate_legacy(recorded: &Observed, legacy: &Digests, combined: &Digests) -> Observed {
    match compare(Some(recorded.into()), legacy) {
        Comparison::Unchanged => combined.current.clone(),
        Comparison::UnchangedUnderPrevious => combined
            .previous
            .clone()
            .unwrap_or_else(|| recorded.clone()),
        _ => recorded.clone(),
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
}

/// What an AppSet records about its config: the token its pod template carries (part of the
/// revision: changing it rolls the set) and the keyed digest the token stands for, under the
/// key it was last compared with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppSetConfig {
    /// The value of the template's config hash annotation (`status.configHash`).
    pub token: String,
    /// `<key id>:<digest>` of the data now under the current key (`status.configDigest`);
    /// `None` only when nothing could be hashed and nothing was recorded.
    pub digest: Option<Observed>,
    /// How the data now compared with what was recorded.
    pub comparison: Comparison,
}

/// The config an AppSet should carry for the data now, from what it recorded: the token
/// (`recorded_token`) and the digest it stands for (`recorded_digest`; an AppSet recorded
/// before the digest was kept apart has only the token, a bare digest). The token is kept
/// whenever the data is not known to have changed, so a key rotation never rolls the set: the
/// digest alone is re-made under the current key. Changed or first-seen data gets a new token.
pub fn appset_config(
    recorded_token: Option<&str>,
    recorded_digest: Option<&Observed>,
    now: &Digests,
) -> AppSetConfig {
    let recorded = recorded_digest
        .map(Recorded::from)
        .or_else(|| recorded_token.map(Recorded::bare));
    let comparison = compare(recorded, now);
    let keep = matches!(
        comparison,
        Comparison::Unchanged | Comparison::UnchangedUnderPrevious | Comparison::UnknownKey
    );
    let token = match recorded_token {
        Some(t) if keep => t.to_string(),
        _ => now.current.digest.clone(),
    };
    AppSetConfig {
        token,
        digest: Some(now.current.clone()),
        comparison,
    }
}

/// Compares a recorded digest with the digests of the data now. See the module docs.
pub fn compare(recorded: Option<Recorded<'_>>, now: &Digests) -> Comparison {
    let Some(rec) = recorded else {
        return Comparison::Unrecorded;
    };
    // A label baseline keeps a prefix of the digest: equal when the full digest starts with it.
    let same = |o: &Observed| {
        o.digest == rec.digest
            || (rec.digest.len() >= MIN_DIGEST_PREFIX
                && rec.digest.len() < o.digest.len()
                && o.digest.starts_with(rec.digest))
    };
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
    fn a_label_baseline_fits_a_label_value_and_compares_as_its_full_digest() {
        let full = obs("0123456789abcdef", &"ab".repeat(32));
        let label = full.to_label();
        assert!(label.len() <= 63, "{label}");
        assert!(label.chars().all(|c| c.is_ascii_alphanumeric() || c == '.'));
        let parsed = Observed::parse_label(&label).unwrap_or_else(|| panic!("{label}"));
        assert_eq!(parsed.key_id, full.key_id);
        let now = Digests {
            current: full.clone(),
            previous: None,
        };
        assert_eq!(compare(Some((&parsed).into()), &now), Comparison::Unchanged);
        let mut other = full.clone();
        other.digest.replace_range(60.., "0000");
        let changed = Digests {
            current: obs("0123456789abcdef", &format!("cd{}", &"ab".repeat(31))),
            previous: None,
        };
        assert_eq!(
            compare(Some((&parsed).into()), &changed),
            Comparison::Changed
        );
        // A change past the prefix is not seen: the prefix is what is kept.
        assert_eq!(
            compare(
                Some((&parsed).into()),
                &Digests {
                    current: other,
                    previous: None
                }
            ),
            Comparison::Unchanged
        );
        for bad in [
            "",
            "ab",
            "ab.",
            ".ab",
            "ab.cd",
            "x.abababababababababababababababab",
        ] {
            assert_eq!(Observed::parse_label(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_legacy_baseline_becomes_its_combined_equivalent_only_when_the_data_is_unchanged() {
        let legacy = digests("old-now", Some("old-prev"));
        let combined = digests("new-now", Some("new-prev"));
        let now = |d: &str| obs("02", d);
        let prev = |d: &str| obs("01", d);
        // Same data, same key: the combined digest now; compares unchanged.
        let t = translate_legacy(&now("old-now"), &legacy, &combined);
        assert_eq!(compare(Some((&t).into()), &combined), Comparison::Unchanged);
        // Same data under the previous key: re-recorded after a rotation.
        let t = translate_legacy(&prev("old-prev"), &legacy, &combined);
        assert_eq!(
            compare(Some((&t).into()), &combined),
            Comparison::UnchangedUnderPrevious
        );
        // Changed data: still changed, under either key.
        for changed in [now("other"), prev("other")] {
            let t = translate_legacy(&changed, &legacy, &combined);
            assert_eq!(compare(Some((&t).into()), &combined), Comparison::Changed);
        }
        // An unknown key stays unknown.
        let t = translate_legacy(&obs("09", "old-now"), &legacy, &combined);
        assert_eq!(
            compare(Some((&t).into()), &combined),
            Comparison::UnknownKey
        );
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

    fn source(value: &str) -> Source {
        use k8s_openapi::api::core::v1::ConfigMap;
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cfg", "namespace": "ns"},
            "data": {"k": value}
        }))
        .expect("a ConfigMap");
        Source::from_config_map(cm, &crate::confighash::discovery::KeySet::All)
    }

    /// One step of an AppSet's life: the data changes, the key rotates (keeping the old one
    /// as previous), `previous` is dropped, or the controller compares.
    #[derive(Clone, Debug)]
    enum Op {
        Change,
        Rotate,
        DropPrevious,
        Compare,
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                2 => Just(Op::Change),
                1 => Just(Op::Rotate),
                1 => Just(Op::DropPrevious),
                4 => Just(Op::Compare),
            ],
            1..60,
        )
    }

    proptest! {
        /// An AppSet's token changes exactly when its data changed since the token was made,
        /// through any sequence of rotations and drops of `previous`, as long as the
        /// controller compares after each keyring change (it does: a keyring change compares
        /// every AppSet) and data changes are compared before the key that saw them is gone.
        #[test]
        fn an_appset_rolls_exactly_when_its_data_changed(ops in ops(), seed in any::<u64>()) {
            let mut key_n = seed;
            let mut fresh_key = || {
                key_n = key_n.wrapping_add(1);
                HashKey::new(key_n.to_le_bytes().repeat(3))
            };
            let mut ring = Keyring { current: fresh_key(), previous: None };
            let mut data = 0u32;
            let first = appset_config(None, None, &Digests::of(&ring, &[source(&data.to_string())]));
            let (mut token, mut digest) = (first.token, first.digest);
            // The data the token was made for; whether the keyring changed since the last
            // compare (then the next op is a compare, as the controller guarantees).
            let mut token_data = data;
            let mut keyring_changed = false;
            for op in ops {
                let op = if keyring_changed { Op::Compare } else { op };
                match op {
                    Op::Change => data += 1,
                    Op::Rotate => {
                        ring = Keyring { current: fresh_key(), previous: Some(ring.current.clone()) };
                        keyring_changed = true;
                    }
                    Op::DropPrevious => {
                        keyring_changed = ring.previous.take().is_some();
                    }
                    Op::Compare => {
                        keyring_changed = false;
                        let now = Digests::of(&ring, &[source(&data.to_string())]);
                        let c = appset_config(Some(&token), digest.as_ref(), &now);
                        let rolled = c.token != token;
                        prop_assert_eq!(rolled, data != token_data, "{:?}", c.comparison);
                        prop_assert_ne!(c.comparison, Comparison::UnknownKey);
                        if rolled {
                            token_data = data;
                        }
                        token = c.token;
                        digest = c.digest;
                    }
                }
            }
        }

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
