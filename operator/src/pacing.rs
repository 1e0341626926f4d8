//! Rollout pacing shared by both controllers: the coalescing window (`--coalesce-window`) and
//! the minimum interval between two config-driven rollouts of one workload
//! (`--min-rollout-interval`).
//!
//! [`Policy`] holds the two durations and the one rule, [`Policy::ready_at`]. Config rollout
//! applies it to in-memory instants (see
//! `config::rollout`); the AppSet controller keeps its pacing state on the AppSet's status, so
//! that a restart of the operator neither forgets a pending change nor rolls early, and decides
//! with the pure [`pace`] below.

use std::ops::Add;
use std::time::Duration;

/// The pacing of config-driven rollouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// How long to gather changes after the first one before rolling.
    pub window: Duration,
    /// The shortest time between two rollouts of one workload.
    pub min_interval: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(5),
            min_interval: Duration::from_secs(30),
        }
    }
}

impl Policy {
    /// The rule both controllers pace by: a change first seen at `since` may roll once the
    /// window has passed since then and the minimum interval since the `last` rollout. `T` is
    /// an instant (config rollout keeps its state in memory) or [`Seconds`] (the AppSet keeps
    /// it on its status).
    pub fn ready_at<T>(&self, since: T, last: Option<T>) -> T
    where
        T: Add<Duration, Output = T> + Ord + Copy,
    {
        let after_window = since + self.window;
        match last {
            Some(last) => after_window.max(last + self.min_interval),
            None => after_window,
        }
    }
}

/// A time in whole Unix seconds, as the AppSet's status records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seconds(pub i64);

impl Add<Duration> for Seconds {
    type Output = Seconds;
    fn add(self, d: Duration) -> Seconds {
        Seconds(
            self.0
                .saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
        )
    }
}

/// What an AppSet's status records about config-driven rollouts (Unix seconds).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Paced {
    /// The config digest the update revision is made with.
    pub hash: Option<String>,
    /// When a config change not yet rolled out was first seen.
    pub pending_since: Option<i64>,
    /// When the digest last changed because the config did.
    pub rolled_at: Option<i64>,
    /// Seconds until a pending change may roll, when one waits.
    pub wait: Option<i64>,
}

/// Decides which config digest the update revision uses now.
///
/// `recorded` is the digest of the current update revision, `fresh` the digest of the data now
/// (already reconciled with a key rotation), `previous` what the status recorded. A first
/// digest (nothing recorded) is taken at once: it is not a change. A change is taken once
/// `window` has passed since it was first seen and `min_interval` since the last config-driven
/// rollout; until then the recorded digest is kept and `wait` says when to look again. A change
/// that reverts to the recorded digest before that cancels the pending rollout.
pub fn pace(
    policy: &Policy,
    recorded: Option<&str>,
    fresh: Option<&str>,
    previous: &Paced,
    now: i64,
) -> Paced {
    let rolled_at = previous.rolled_at;
    let settled = |hash: Option<&str>| Paced {
        hash: hash.map(str::to_string),
        pending_since: None,
        rolled_at,
        wait: None,
    };
    let (Some(recorded), Some(fresh)) = (recorded, fresh) else {
        return settled(fresh.or(recorded));
    };
    if recorded == fresh {
        return settled(Some(recorded));
    }
    let since = previous.pending_since.unwrap_or(now).min(now);
    let Seconds(ready_at) = policy.ready_at(Seconds(since), rolled_at.map(Seconds));
    if now >= ready_at {
        Paced {
            hash: Some(fresh.to_string()),
            pending_since: None,
            rolled_at: Some(now),
            wait: None,
        }
    } else {
        Paced {
            hash: Some(recorded.to_string()),
            pending_since: Some(since),
            rolled_at,
            wait: Some(ready_at - now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(window: u64, min_interval: u64) -> Policy {
        Policy {
            window: Duration::from_secs(window),
            min_interval: Duration::from_secs(min_interval),
        }
    }

    #[test]
    fn a_first_digest_is_taken_at_once() {
        let p = pace(&policy(5, 30), None, Some("a"), &Paced::default(), 100);
        assert_eq!(p.hash.as_deref(), Some("a"));
        assert_eq!((p.pending_since, p.rolled_at, p.wait), (None, None, None));
    }

    #[test]
    fn a_change_waits_for_the_window_then_the_interval() {
        let pol = policy(5, 30);
        let p = pace(&pol, Some("a"), Some("b"), &Paced::default(), 100);
        assert_eq!(p.hash.as_deref(), Some("a"));
        assert_eq!((p.pending_since, p.wait), (Some(100), Some(5)));
        let p = pace(&pol, Some("a"), Some("c"), &p, 105);
        assert_eq!(
            p.hash.as_deref(),
            Some("c"),
            "the window ended: the latest data rolls"
        );
        assert_eq!((p.pending_since, p.rolled_at), (None, Some(105)));
        // The next change must also wait for the minimum interval since that rollout.
        let p = pace(&pol, Some("c"), Some("d"), &p, 110);
        assert_eq!((p.hash.as_deref(), p.wait), (Some("c"), Some(25)));
        let p = pace(&pol, Some("c"), Some("d"), &p, 135);
        assert_eq!((p.hash.as_deref(), p.rolled_at), (Some("d"), Some(135)));
    }

    #[test]
    fn a_change_reverted_in_time_rolls_nothing() {
        let pol = policy(5, 30);
        let p = pace(&pol, Some("a"), Some("b"), &Paced::default(), 100);
        let p = pace(&pol, Some("a"), Some("a"), &p, 102);
        assert_eq!(
            p,
            Paced {
                hash: Some("a".into()),
                ..Paced::default()
            }
        );
    }

    proptest! {
        /// Whatever the sequence of data changes, two config-driven rollouts are never closer
        /// than `min_interval`, none comes sooner than `window` after the change it takes was
        /// first seen, and a change stays pending no longer than the larger of the two.
        #[test]
        fn rollouts_are_paced(
            window in 0u64..10,
            min_interval in 0u64..40,
            changes in proptest::collection::vec((1i64..20, 0u8..3), 1..40),
        ) {
            let pol = policy(window, min_interval);
            let mut recorded = Some("v0".to_string());
            let mut state = Paced::default();
            let mut now = 1_000;
            let mut last_roll: Option<i64> = None;
            for (step, value) in changes {
                now += step;
                let fresh = format!("v{value}");
                let next = pace(&pol, recorded.as_deref(), Some(&fresh), &state, now);
                if next.hash != recorded {
                    if let Some(t) = last_roll {
                        prop_assert!(now - t >= min_interval as i64);
                    }
                    // The change was pending for the whole window (first seen now only if 0).
                    prop_assert!(now - state.pending_since.unwrap_or(now) >= window as i64);
                    last_roll = Some(now);
                }
                if let Some(since) = next.pending_since {
                    // Still pending only before both the window and the interval have passed.
                    prop_assert!(now - since < window.max(min_interval) as i64);
                }
                recorded = next.hash.clone();
                state = next;
            }
        }
    }
}
