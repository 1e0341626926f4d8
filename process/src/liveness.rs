//! Liveness by heartbeat: `/healthz` fails when a loop that has work has made no progress for
//! too long.
//!
//! Each loop of a process (a controller, the leader Lease loop) holds a [`Heartbeat`] from
//! [`Liveness::register`]. It calls [`Heartbeat::demand`] when work arrives for it (a watch
//! event that will be reconciled, the start of a Lease attempt) and [`Heartbeat::beat`] when it
//! completes some (a reconcile returned, the attempt ended). A loop is *stalled* when work has
//! been waiting, with no progress, for longer than the timeout. An idle loop is never stalled:
//! having nothing to do is not a fault.
//!
//! The decision ([`stalled`]) is a pure function of the two instants and the clock, tested
//! without waiting.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct Marks {
    /// When the oldest work not yet followed by progress arrived.
    waiting_since: Option<Instant>,
    /// The last progress.
    progress: Option<Instant>,
}

/// One loop's heartbeat.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    marks: Arc<Mutex<Marks>>,
}

impl Heartbeat {
    /// Work arrived for the loop.
    pub fn demand(&self) {
        if let Ok(mut m) = self.marks.lock()
            && m.waiting_since.is_none()
        {
            m.waiting_since = Some(Instant::now());
        }
    }

    /// The loop completed some work: what was waiting counts as served.
    pub fn beat(&self) {
        if let Ok(mut m) = self.marks.lock() {
            m.progress = Some(Instant::now());
            m.waiting_since = None;
        }
    }
}

/// Whether a loop whose oldest unserved work arrived at `waiting_since` is stalled at `now`.
pub fn stalled(waiting_since: Option<Instant>, now: Instant, timeout: Duration) -> bool {
    waiting_since.is_some_and(|since| now.saturating_duration_since(since) > timeout)
}

/// The loops of a process and the timeout they are held to.
#[derive(Clone, Debug)]
pub struct Liveness {
    timeout: Duration,
    loops: Arc<Mutex<Vec<(String, Heartbeat)>>>,
}

impl Liveness {
    /// No loops yet; a loop is stalled after `timeout` without progress while work waits.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            loops: Arc::default(),
        }
    }

    /// A heartbeat for the loop `name`.
    pub fn register(&self, name: impl Into<String>) -> Heartbeat {
        let hb = Heartbeat {
            marks: Arc::default(),
        };
        if let Ok(mut loops) = self.loops.lock() {
            loops.push((name.into(), hb.clone()));
        }
        hb
    }

    /// The names of the stalled loops, each with how long its work has waited.
    pub fn stalled(&self) -> Vec<String> {
        let now = Instant::now();
        let Ok(loops) = self.loops.lock() else {
            return vec!["liveness registry poisoned".into()];
        };
        loops
            .iter()
            .filter_map(|(name, hb)| {
                let since = hb.marks.lock().ok().and_then(|m| m.waiting_since);
                stalled(since, now, self.timeout).then(|| {
                    let waited = since
                        .map(|s| now.saturating_duration_since(s))
                        .unwrap_or_default();
                    format!(
                        "{name} (work waiting {}s with no progress)",
                        waited.as_secs()
                    )
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_waiting_work_without_progress_stalls() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(60);
        assert!(
            !stalled(None, t0 + Duration::from_secs(3600), timeout),
            "idle is fine"
        );
        assert!(!stalled(Some(t0), t0 + Duration::from_secs(60), timeout));
        assert!(stalled(Some(t0), t0 + Duration::from_secs(61), timeout));
    }

    #[test]
    fn a_beat_serves_what_waited() {
        let l = Liveness::new(Duration::ZERO);
        let hb = l.register("AppSet controller");
        assert!(l.stalled().is_empty());
        hb.demand();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(l.stalled().len(), 1);
        assert!(
            l.stalled()[0].starts_with("AppSet controller"),
            "{:?}",
            l.stalled()
        );
        hb.beat();
        assert!(l.stalled().is_empty());
        // A second demand before any progress keeps the first one's time.
        hb.demand();
        let first = hb.marks.lock().map(|m| m.waiting_since).ok().flatten();
        hb.demand();
        let again = hb.marks.lock().map(|m| m.waiting_since).ok().flatten();
        assert_eq!(first, again);
    }
}
