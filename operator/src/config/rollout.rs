//! Rollout decisions: given what a workload's sources hash to now and what the operator recorded
//! before, decide whether to adopt, wait, roll, or do nothing. Pure, with time passed in, so the
//! unit tests drive it deterministically.
//!
//! # What is recorded where
//!
//! * On the workload's own metadata, [`keys::CONFIG_HASH_OBSERVED`] holds the [`Observed`]
//!   baseline `<key id>:<digest>`: the digest of the data the running pods were started with (as
//!   far as the operator knows). Writing it never changes the pod template, so never rolls.
//! * In `spec.template.metadata.annotations`, [`keys::CONFIG_HASH`] holds the digest of the last
//!   rollout the operator triggered. Changing it is what rolls the workload.
//!
//! # Rules
//!
//! * A required source that does not exist blocks: an Event, no rollout, the baseline unchanged.
//! * No baseline (a workload seen for the first time, or after its annotation was removed):
//!   record it, do not roll ([`BaselineReason::Adopted`]). An operator restart therefore never rolls
//!   anything: the baseline is on the workload, not in memory.
//! * The baseline is compared with the data now by the shared key-rotation rule,
//!   [`rotation::compare`]: made with the current key, roll only when the digest differs; made
//!   with the previous key (after a rotation), equal under the previous key means the data did
//!   not change and the baseline is re-recorded under the current key without a rollout
//!   ([`BaselineReason::KeyRotated`]), different means a real change; made with an unknown key,
//!   re-record without rollout (the change, if any, cannot be told apart from the rotation).
//! * A change starts a coalescing window: the rollout happens when the window has passed, with
//!   the digest of that moment, so every change in the window gives one rollout. A per-workload
//!   minimum interval between rollouts holds back a flapping source. Changes that revert within
//!   the window cancel it.
//!
//! The controller keeps one [`WorkloadState`] per workload in memory; losing it (on restart)
//! only loses the pending window and the last rollout time.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::confighash::discovery::SourceName;
use crate::confighash::rotation::{self, Comparison, Digests, Observed, Recorded};

#[cfg(doc)]
use appset_crds::keys;

pub use crate::pacing::Policy;

/// What a reconcile knows about a workload's sources now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// The baseline recorded on the workload, if any and if it parses.
    pub observed: Option<Observed>,
    /// The digests of the data now, under the current key and the previous one.
    pub digests: Digests,
    /// Required sources that do not exist.
    pub missing: Vec<SourceName>,
}

/// Why a baseline is (re)recorded without a rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaselineReason {
    /// The workload had no baseline.
    Adopted,
    /// The baseline was made with the previous key and the data is unchanged.
    KeyRotated,
    /// The baseline was made with a key the operator no longer has.
    UnknownKey,
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The data is what the baseline says: nothing to do.
    Unchanged,
    /// Record `current` as the baseline, leave the pod template alone.
    Baseline(BaselineReason),
    /// The data changed; look again at `until` (coalescing window or minimum interval).
    Wait {
        /// When to reconcile again.
        until: Instant,
    },
    /// Write `current` into the pod template and as the baseline.
    Roll,
    /// Required sources are missing: report them, change nothing.
    Blocked(Vec<SourceName>),
}

/// What the controller remembers about one workload between reconciles.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadState {
    /// When the first change of the current burst was seen.
    pub pending_since: Option<Instant>,
    /// When the operator last rolled the workload.
    pub last_rollout: Option<Instant>,
    /// The baseline the operator last wrote (the watch cache may not show it yet).
    pub recorded: Option<Observed>,
    /// The digest of each source at the baseline, to name what changed.
    pub per_source: BTreeMap<SourceName, String>,
}

impl WorkloadState {
    /// Decides what to do at `now`. Only the pending window is updated here; the caller reports
    /// the outcome of a write with [`WorkloadState::recorded`] / [`WorkloadState::rolled`].
    pub fn decide(&mut self, input: &Input, policy: &Policy, now: Instant) -> Decision {
        if !input.missing.is_empty() {
            return Decision::Blocked(input.missing.clone());
        }
        // The annotation is authoritative, except right after our own write, which the watch
        // cache may not reflect yet.
        let observed = match (&self.recorded, &input.observed) {
            (Some(mine), Some(seen)) if mine.key_id == seen.key_id => Some(mine),
            (Some(mine), None) => Some(mine),
            (_, seen) => seen.as_ref(),
        };
        let changed = match rotation::compare(observed.map(Recorded::from), &input.digests) {
            Comparison::Unrecorded => {
                self.pending_since = None;
                return Decision::Baseline(BaselineReason::Adopted);
            }
            Comparison::UnchangedUnderPrevious => {
                self.pending_since = None;
                return Decision::Baseline(BaselineReason::KeyRotated);
            }
            Comparison::UnknownKey => {
                self.pending_since = None;
                return Decision::Baseline(BaselineReason::UnknownKey);
            }
            Comparison::Unchanged => false,
            Comparison::Changed => true,
        };
        if !changed {
            self.pending_since = None;
            return Decision::Unchanged;
        }
        let since = *self.pending_since.get_or_insert(now);
        let ready = policy.ready_at(since, self.last_rollout);
        if now >= ready {
            Decision::Roll
        } else {
            Decision::Wait { until: ready }
        }
    }

    /// Records that `baseline` was written (adoption, re-baseline, or no change) with these
    /// per-source digests.
    pub fn recorded(&mut self, baseline: Observed, per_source: BTreeMap<SourceName, String>) {
        self.recorded = Some(baseline);
        self.per_source = per_source;
    }

    /// Records a successful rollout at `now`, and returns which sources changed since the last
    /// baseline.
    pub fn rolled(
        &mut self,
        baseline: Observed,
        per_source: BTreeMap<SourceName, String>,
        now: Instant,
    ) -> Changed {
        let changed = changed_sources(&self.per_source, &per_source);
        self.pending_since = None;
        self.last_rollout = Some(now);
        self.recorded(baseline, per_source);
        changed
    }
}

/// Which sources changed between two sets of per-source digests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changed {
    /// These sources changed (added, removed, or different data).
    Known(Vec<SourceName>),
    /// The earlier digests are not known (the operator restarted): one or more of these.
    OneOf(Vec<SourceName>),
}

impl Changed {
    /// A sentence for an Event: names only, never values.
    pub fn describe(&self) -> String {
        let list = |names: &[SourceName]| {
            names
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Changed::Known(names) if names.is_empty() => "the referenced data changed".to_string(),
            Changed::Known(names) => format!("changed: {}", list(names)),
            Changed::OneOf(names) => format!("changed: one or more of {}", list(names)),
        }
    }
}

/// Compares per-source digests (same key) and names what changed.
pub fn changed_sources(
    before: &BTreeMap<SourceName, String>,
    after: &BTreeMap<SourceName, String>,
) -> Changed {
    if before.is_empty() {
        return Changed::OneOf(after.keys().cloned().collect());
    }
    let mut names: Vec<SourceName> = after
        .iter()
        .filter(|(name, digest)| before.get(*name) != Some(*digest))
        .map(|(name, _)| name.clone())
        .chain(before.keys().filter(|n| !after.contains_key(*n)).cloned())
        .collect();
    names.sort();
    names.dedup();
    Changed::Known(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const SEC: Duration = Duration::from_secs(1);

    fn obs(key: &str, digest: &str) -> Observed {
        Observed {
            key_id: key.into(),
            digest: digest.into(),
        }
    }

    fn input(observed: Option<Observed>, current: &str) -> Input {
        Input {
            observed,
            digests: Digests {
                current: obs("aa", current),
                previous: None,
            },
            missing: vec![],
        }
    }

    fn policy() -> Policy {
        Policy {
            window: 5 * SEC,
            min_interval: 60 * SEC,
        }
    }

    #[test]
    fn first_sight_adopts_without_rollout() {
        let mut st = WorkloadState::default();
        let t0 = Instant::now();
        assert_eq!(
            st.decide(&input(None, "d1"), &policy(), t0),
            Decision::Baseline(BaselineReason::Adopted)
        );
    }

    #[test]
    fn unchanged_data_never_rolls_even_with_fresh_state_after_a_restart() {
        let t0 = Instant::now();
        let mut fresh = WorkloadState::default();
        for i in 0..3 {
            assert_eq!(
                fresh.decide(&input(Some(obs("aa", "d1")), "d1"), &policy(), t0 + i * SEC),
                Decision::Unchanged
            );
        }
    }

    #[test]
    fn a_change_waits_for_the_window_then_rolls_once() {
        let p = policy();
        let t0 = Instant::now();
        let mut st = WorkloadState::default();
        let seen = Some(obs("aa", "d1"));
        assert_eq!(
            st.decide(&input(seen.clone(), "d2"), &p, t0),
            Decision::Wait {
                until: t0 + 5 * SEC
            }
        );
        // A second change inside the window does not extend or restart it.
        assert_eq!(
            st.decide(&input(seen.clone(), "d3"), &p, t0 + 2 * SEC),
            Decision::Wait {
                until: t0 + 5 * SEC
            }
        );
        assert_eq!(
            st.decide(&input(seen.clone(), "d3"), &p, t0 + 5 * SEC),
            Decision::Roll
        );
        st.rolled(obs("aa", "d3"), BTreeMap::new(), t0 + 5 * SEC);
        // The watch cache still shows d1; the state knows d3 was written.
        assert_eq!(
            st.decide(&input(seen, "d3"), &p, t0 + 6 * SEC),
            Decision::Unchanged
        );
        assert_eq!(
            st.decide(&input(Some(obs("aa", "d3")), "d3"), &p, t0 + 7 * SEC),
            Decision::Unchanged
        );
    }

    #[test]
    fn a_change_that_reverts_within_the_window_cancels_it() {
        let p = policy();
        let t0 = Instant::now();
        let mut st = WorkloadState::default();
        let seen = Some(obs("aa", "d1"));
        assert!(matches!(
            st.decide(&input(seen.clone(), "d2"), &p, t0),
            Decision::Wait { .. }
        ));
        assert_eq!(
            st.decide(&input(seen.clone(), "d1"), &p, t0 + SEC),
            Decision::Unchanged
        );
        assert_eq!(st.pending_since, None);
        // A later change starts a new window.
        assert_eq!(
            st.decide(&input(seen, "d2"), &p, t0 + 10 * SEC),
            Decision::Wait {
                until: t0 + 15 * SEC
            }
        );
    }

    #[test]
    fn a_flapping_source_rolls_at_most_once_per_min_interval() {
        let p = policy();
        let t0 = Instant::now();
        let mut st = WorkloadState::default();
        let mut rollouts = 0;
        let mut baseline = obs("aa", "d0");
        // The source gets new content every second for ten minutes.
        for s in 0..600u32 {
            let now = t0 + s * SEC;
            let current = format!("d{}", s + 1);
            let inp = Input {
                observed: Some(baseline.clone()),
                digests: Digests {
                    current: obs("aa", &current),
                    previous: None,
                },
                missing: vec![],
            };
            if st.decide(&inp, &p, now) == Decision::Roll {
                rollouts += 1;
                baseline = obs("aa", &current);
                st.rolled(baseline.clone(), BTreeMap::new(), now);
            }
        }
        // The first after 5 s, then at most one per 60 s: 10 in 600 s, against 600 unguarded.
        assert!(rollouts <= 10, "{rollouts} rollouts");
        assert!(rollouts >= 9, "{rollouts} rollouts");
    }

    #[test]
    fn min_interval_delays_a_second_burst() {
        let p = policy();
        let t0 = Instant::now();
        let mut st = WorkloadState::default();
        st.rolled(obs("aa", "d1"), BTreeMap::new(), t0);
        assert_eq!(
            st.decide(&input(Some(obs("aa", "d1")), "d2"), &p, t0 + 10 * SEC),
            Decision::Wait {
                until: t0 + 60 * SEC
            }
        );
        assert_eq!(
            st.decide(&input(Some(obs("aa", "d1")), "d2"), &p, t0 + 60 * SEC),
            Decision::Roll
        );
    }

    #[test]
    fn zero_window_rolls_immediately() {
        let p = Policy {
            window: Duration::ZERO,
            min_interval: Duration::ZERO,
        };
        let mut st = WorkloadState::default();
        assert_eq!(
            st.decide(&input(Some(obs("aa", "d1")), "d2"), &p, Instant::now()),
            Decision::Roll
        );
    }

    #[test]
    fn key_rotation_rebaselines_without_rollout_unless_the_data_changed() {
        let p = policy();
        let t0 = Instant::now();
        let rotated = |prev_digest: &str| Input {
            observed: Some(obs("01", "old-digest")),
            digests: Digests {
                current: obs("02", "new-key-digest"),
                previous: Some(obs("01", prev_digest)),
            },
            missing: vec![],
        };
        let mut st = WorkloadState::default();
        assert_eq!(
            st.decide(&rotated("old-digest"), &p, t0),
            Decision::Baseline(BaselineReason::KeyRotated)
        );
        let mut st = WorkloadState::default();
        assert_eq!(
            st.decide(&rotated("changed"), &p, t0),
            Decision::Wait {
                until: t0 + 5 * SEC
            }
        );
        let mut st = WorkloadState::default();
        let mut unknown = rotated("old-digest");
        unknown.digests.previous = None;
        assert_eq!(
            st.decide(&unknown, &p, t0),
            Decision::Baseline(BaselineReason::UnknownKey)
        );
    }

    #[test]
    fn a_missing_required_source_blocks() {
        let mut st = WorkloadState::default();
        let inp = Input {
            missing: vec![SourceName::secret("db")],
            ..input(None, "d1")
        };
        assert_eq!(
            st.decide(&inp, &policy(), Instant::now()),
            Decision::Blocked(vec![SourceName::secret("db")])
        );
    }

    #[test]
    fn changed_sources_names_what_differs() {
        let before = BTreeMap::from([
            (SourceName::config_map("a"), "1".to_string()),
            (SourceName::secret("b"), "1".to_string()),
            (SourceName::secret("gone"), "1".to_string()),
        ]);
        let after = BTreeMap::from([
            (SourceName::config_map("a"), "2".to_string()),
            (SourceName::secret("b"), "1".to_string()),
            (SourceName::config_map("new"), "1".to_string()),
        ]);
        let changed = changed_sources(&before, &after);
        assert_eq!(
            changed,
            Changed::Known(vec![
                SourceName::config_map("a"),
                SourceName::config_map("new"),
                SourceName::secret("gone"),
            ])
        );
        assert_eq!(
            changed.describe(),
            "changed: ConfigMap a, ConfigMap new, Secret gone"
        );
        let unknown = changed_sources(&BTreeMap::new(), &after);
        assert!(unknown.describe().starts_with("changed: one or more of"));
    }
}
