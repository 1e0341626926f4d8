//! Leader election with a `coordination.k8s.io/v1` Lease, so that only one operator replica
//! writes at a time. The timing model is client-go's (`leaseDuration`, `renewDeadline`,
//! `retryPeriod`); what this module adds is a [`Fence`] every write of the controllers passes.
//!
//! Data flow: [`LeaderElector::acquire`] reads the Lease every retry period (and at once when
//! a watch of it reports a change), [`decide`] says whether it may be taken, and a take-over is
//! a `replace` carrying the `resourceVersion` read, so two replicas racing for it cannot both
//! win. Once it leads, [`LeaderElector::keep`] renews every retry period (sooner when little of
//! the term is left); each successful renew opens the [`Fence`] until *the time the renew was
//! sent* plus the renew deadline.
//! [`LeaderElector::release`] gives the Lease up on graceful shutdown.
//!
//! Why one writer at a time holds (clocks here are each process's own monotonic clock; no
//! wall-clock time written by another process is ever compared with ours):
//! * A follower takes the Lease over only after it has *seen the same Lease record* for a
//!   whole lease duration on its own clock. The record it saw was written by the leader's last
//!   successful renew, which the leader sent before the follower saw it: the take-over comes
//!   later than `sent + leaseDuration`.
//! * The leader's fence closes at `sent + renewDeadline`, and `renewDeadline < leaseDuration`.
//!   The fence is checked by the client of the controllers before each request is sent
//!   ([`Fence::layer`]), so a leader that was paused (SIGSTOP, a long GC-like stall, an API
//!   server that hangs the renew) finds the fence closed when it resumes and sends nothing;
//!   [`LeaderElector::keep`] then returns and the caller cancels the controllers.
//! * Caveat: a request that passed the fence just before the process was paused can still be
//!   sent when it resumes. The margin `leaseDuration - renewDeadline` (5 s by default) is what
//!   covers that window and clock-rate differences between machines.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appset_process::liveness::Heartbeat;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tracing::{info, warn};

/// The three durations of leader election (client-go's names and defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long a follower waits, after it last saw the Lease change, before taking it over.
    pub lease_duration: Duration,
    /// How long the leader keeps writing without a successful renew.
    pub renew_deadline: Duration,
    /// How often the leader renews and a follower looks at the Lease.
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl Timing {
    /// Checks `leaseDuration > renewDeadline > retryPeriod`, with room for a retry (client-go
    /// asks for `renewDeadline > 1.2 × retryPeriod`).
    pub fn check(&self) -> Result<(), String> {
        if self.retry_period.is_zero() {
            return Err("--retry-period must be above zero".into());
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(format!(
                "--renew-deadline ({:?}) must be shorter than --lease-duration ({:?})",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.renew_deadline.as_secs_f64() <= 1.2 * self.retry_period.as_secs_f64() {
            return Err(format!(
                "--renew-deadline ({:?}) must be longer than 1.2 × --retry-period ({:?})",
                self.renew_deadline, self.retry_period
            ));
        }
        Ok(())
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }
}

/// The leadership every write of this process passes: open while this replica leads, closed
/// at the renew deadline, on loss and on release. Without leader election it is always open.
#[derive(Clone, Debug)]
pub struct Fence {
    elected: bool,
    until: Arc<Mutex<Option<Instant>>>,
}

impl Fence {
    /// A fence that never closes (leader election is off: this is the only replica).
    pub fn open() -> Self {
        Self {
            elected: false,
            until: Arc::default(),
        }
    }

    /// A closed fence, opened by successful renews of a [`LeaderElector`].
    pub fn elected() -> Self {
        Self {
            elected: true,
            until: Arc::default(),
        }
    }

    /// Whether a write may be sent now.
    pub fn holds(&self) -> bool {
        if !self.elected {
            return true;
        }
        self.until().is_some_and(|u| Instant::now() < u)
    }

    /// When the fence closes unless renewed; `None` when it is closed.
    pub fn until(&self) -> Option<Instant> {
        self.until.lock().ok().and_then(|u| *u)
    }

    /// Whether the fence closed by reaching its deadline, and no one has acted on it yet: a
    /// renew sent now could land after a standby's take-over, so none is sent.
    fn lapsed(&self) -> bool {
        self.elected && self.until().is_some_and(|u| Instant::now() >= u)
    }

    fn extend(&self, until: Instant) {
        if let Ok(mut u) = self.until.lock() {
            // A late answer to an older renew never moves the deadline back.
            *u = Some(u.map_or(until, |old| old.max(until)));
        }
    }

    fn close(&self) {
        if let Ok(mut u) = self.until.lock() {
            *u = None;
        }
    }

    /// A tower layer for the controllers' client: every request is refused, before it is sent,
    /// while the fence is closed.
    pub fn layer(
        &self,
    ) -> tower::filter::FilterLayer<
        impl Fn(
            http::Request<kube::client::Body>,
        ) -> Result<http::Request<kube::client::Body>, FenceClosed>
        + Clone
        + use<>,
    > {
        let fence = self.clone();
        tower::filter::FilterLayer::new(move |req| {
            if fence.holds() {
                Ok(req)
            } else {
                Err(FenceClosed)
            }
        })
    }
}

/// A request was refused because this replica does not (or no longer) lead.
#[derive(Debug, thiserror::Error)]
#[error("not sent: this replica does not hold the leader Lease")]
pub struct FenceClosed;

/// What to do with the Lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseAction {
    /// The Lease does not exist: create it, holding it.
    Create,
    /// Take over a Lease that is free, released or expired (a new leadership term).
    Acquire,
    /// Renew a Lease we already hold.
    Renew,
    /// Someone else holds a live Lease.
    Wait,
}

/// Decides from the Lease as read (`None` when it does not exist) and how long this replica has
/// seen that same record unchanged, on its own clock. `default_duration` stands for a Lease
/// that does not say its duration.
pub fn decide(
    lease: Option<&LeaseSpec>,
    me: &str,
    unchanged_for: Duration,
    default_duration: Duration,
) -> LeaseAction {
    let Some(spec) = lease else {
        return LeaseAction::Create;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder == me {
        return LeaseAction::Renew;
    }
    if holder.is_empty() {
        return LeaseAction::Acquire;
    }
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(default_duration, Duration::from_secs);
    if unchanged_for >= duration {
        LeaseAction::Acquire
    } else {
        LeaseAction::Wait
    }
}

/// The parts of a Lease whose change shows its holder is alive.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    duration: Option<i32>,
    acquired: Option<String>,
    renewed: Option<String>,
    transitions: Option<i32>,
}

impl Record {
    fn of(spec: Option<&LeaseSpec>) -> Self {
        let time = |t: &Option<MicroTime>| t.as_ref().map(|MicroTime(t)| t.to_string());
        Self {
            holder: spec.and_then(|s| s.holder_identity.clone()),
            duration: spec.and_then(|s| s.lease_duration_seconds),
            acquired: spec.and_then(|s| time(&s.acquire_time)),
            renewed: spec.and_then(|s| time(&s.renew_time)),
            transitions: spec.and_then(|s| s.lease_transitions),
        }
    }
}

/// Why [`LeaderElector::keep`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lost {
    /// Another replica holds the Lease.
    Taken,
    /// No renew succeeded within the renew deadline.
    Deadline,
}

/// Takes, holds and releases a Lease for this replica.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    fence: Fence,
    observed: Mutex<Option<(Record, Instant)>>,
    heartbeat: Option<Heartbeat>,
}

impl LeaderElector {
    /// An elector for Lease `namespace/name` as `identity`; its fence starts closed.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timing: Timing,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            timing,
            fence: Fence::elected(),
            observed: Mutex::new(None),
            heartbeat: None,
        }
    }

    /// Reports each attempt to `heartbeat`: work when it starts, progress when it ends, so a
    /// Lease loop that hangs fails `/healthz`.
    pub fn with_heartbeat(mut self, heartbeat: Heartbeat) -> Self {
        self.heartbeat = Some(heartbeat);
        self
    }

    /// One attempt, reported to the heartbeat.
    async fn attempt(&self) -> Result<bool, kube::Error> {
        if let Some(h) = &self.heartbeat {
            h.demand();
        }
        let result = self.try_hold().await;
        if let Some(h) = &self.heartbeat {
            h.beat();
        }
        result
    }

    /// The fence this elector opens and closes.
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    /// How long the record just read has been seen unchanged (zero when it is new to us).
    fn unchanged_for(&self, record: &Record) -> Duration {
        let now = Instant::now();
        let Ok(mut observed) = self.observed.lock() else {
            return Duration::ZERO;
        };
        match observed.as_ref() {
            Some((seen, at)) if seen == record => now.duration_since(*at),
            _ => {
                *observed = Some((record.clone(), now));
                Duration::ZERO
            }
        }
    }

    /// One attempt to take or renew the Lease; `Ok(true)` when this replica holds it now, and
    /// then the fence is open until the attempt's start plus the renew deadline.
    pub async fn try_hold(&self) -> Result<bool, kube::Error> {
        let sent = Instant::now();
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        // A Lease without a spec reads as one without a holder.
        let spec = current.as_ref().map(|l| l.spec.clone().unwrap_or_default());
        let unchanged = self.unchanged_for(&Record::of(spec.as_ref()));
        let action = decide(
            spec.as_ref(),
            &self.identity,
            unchanged,
            self.timing.lease_duration,
        );
        let secs = self.timing.lease_seconds();
        let result = match (action, current) {
            (LeaseAction::Wait, _) => return Ok(false),
            (LeaseAction::Renew, _) if self.fence.lapsed() => return Ok(false),
            (LeaseAction::Create, _) | (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(secs),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (action, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(Default::default);
                if action == LeaseAction::Acquire {
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(MicroTime(now));
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(secs);
                spec.renew_time = Some(MicroTime(now));
                // `replace` sends the resourceVersion read above: a concurrent writer wins and
                // this attempt fails with 409.
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(_) => {
                self.fence.extend(sent + self.timing.renew_deadline);
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the Lease: an attempt every retry period, and one as soon
    /// as a watch of the Lease reports a change (so a released Lease is taken within a moment).
    pub async fn acquire(&self) {
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let mut changes = watcher(self.api.clone(), config)
            .backoff(crate::kubeapi::watch_backoff())
            .boxed();
        loop {
            // An API server that hangs must not hang the standby: the attempt is abandoned
            // (a late take-over write would still carry the resourceVersion it read).
            let attempt = tokio::time::timeout(self.timing.renew_deadline, self.attempt()).await;
            match attempt.unwrap_or(Ok(false)) {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "became the leader");
                    return;
                }
                Ok(false) => {}
                Err(err) => {
                    warn!(lease = %self.name, error = %err, "cannot read or write the leader Lease")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.timing.retry_period) => {}
                _ = changes.next() => {}
            }
        }
    }

    /// Renews the Lease every retry period (sooner when little of the term is left, see
    /// [`renew_pause`]); returns (with the fence closed) when another replica
    /// holds it or when no renew succeeded before the fence's deadline. A renew that hangs is
    /// abandoned at the deadline.
    pub async fn keep(&self) -> Lost {
        loop {
            let left = self
                .fence
                .until()
                .map(|d| d.saturating_duration_since(Instant::now()));
            tokio::time::sleep(renew_pause(self.timing.retry_period, left)).await;
            let Some(deadline) = self.fence.until().filter(|d| Instant::now() < *d) else {
                return self.lose(Lost::Deadline);
            };
            let attempt = tokio::time::timeout_at(deadline.into(), self.attempt()).await;
            match attempt {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) if self.fence.lapsed() => return self.lose(Lost::Deadline),
                Ok(Ok(false)) => return self.lose(Lost::Taken),
                Ok(Err(err)) => {
                    warn!(lease = %self.name, error = %err, "cannot renew the leader Lease");
                }
                Err(_) => return self.lose(Lost::Deadline),
            }
        }
    }

    fn lose(&self, why: Lost) -> Lost {
        self.fence.close();
        match why {
            Lost::Taken => warn!(lease = %self.name, "another replica holds the leader Lease"),
            Lost::Deadline => warn!(
                lease = %self.name,
                renew_deadline = ?self.timing.renew_deadline,
                "no renew of the leader Lease within the renew deadline"
            ),
        }
        why
    }

    /// Gives the Lease up (graceful shutdown, after the controllers stopped): the fence closes
    /// first, then the Lease is written with no holder, so a follower takes it at once.
    pub async fn release(&self) {
        self.fence.close();
        let attempt = async {
            let Some(mut lease) = self.api.get_opt(&self.name).await? else {
                return Ok::<bool, kube::Error>(false);
            };
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                return Ok(false);
            }
            let now = MicroTime(Timestamp::now());
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(now.clone());
            spec.acquire_time = Some(now);
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await?;
            Ok(true)
        };
        match tokio::time::timeout(self.timing.renew_deadline, attempt).await {
            Ok(Ok(true)) => info!(lease = %self.name, "released the leader Lease"),
            Ok(Ok(false)) => {}
            Ok(Err(err)) => {
                warn!(lease = %self.name, error = %err, "cannot release the leader Lease")
            }
            Err(_) => warn!(lease = %self.name, "releasing the leader Lease timed out"),
        }
    }
}

/// How long [`LeaderElector::keep`] waits before the next renew, given the retry period and
/// how much of the fence's term is `left`: the retry period, shortened when the term would lapse
/// before a renew sent then could answer (an acquisition whose request hung in a slow API server
/// leaves little of its term, since the term counts from when the request was sent), but never
/// below a tenth of the retry period, so that renews that fail at once do not spin.
fn renew_pause(retry: Duration, left: Option<Duration>) -> Duration {
    let Some(left) = left else {
        return retry;
    };
    left.saturating_sub(retry / 2).clamp(retry / 10, retry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_short_term_left_renews_soon() {
        let retry = Duration::from_secs(2);
        // Just acquired after a request that hung for 3.2 s of a 4 s deadline: 0.8 s left.
        assert_eq!(
            renew_pause(retry, Some(Duration::from_millis(800))),
            Duration::from_millis(200)
        );
        assert_eq!(renew_pause(retry, Some(Duration::from_secs(4))), retry);
        assert_eq!(renew_pause(retry, None), retry);
        assert_eq!(renew_pause(retry, Some(Duration::ZERO)), retry / 10);
    }

    proptest! {
        /// The pause is between a tenth of the retry period and the retry period; with at
        /// least one and a half retry periods left it is the retry period (the usual renew
        /// cadence), and otherwise the renew is sent at least half a retry period before the
        /// term ends, whenever the floor allows.
        #[test]
        fn the_renew_pause_is_bounded(retry_ms in 100u64..20_000, left_ms in 0u64..60_000) {
            let retry = Duration::from_millis(retry_ms);
            let left = Duration::from_millis(left_ms);
            let pause = renew_pause(retry, Some(left));
            prop_assert!(pause >= retry / 10 && pause <= retry);
            if left >= retry + retry / 2 {
                prop_assert_eq!(pause, retry);
            } else if left >= retry / 2 + retry / 10 {
                prop_assert!(pause + retry / 2 <= left);
            }
        }
    }

    fn spec(holder: Option<&str>, duration: Option<i32>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(String::from),
            lease_duration_seconds: duration,
            ..Default::default()
        }
    }

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn decisions() {
        let s = |n| Duration::from_secs(n);
        assert_eq!(decide(None, "me", s(0), D), LeaseAction::Create);
        assert_eq!(
            decide(Some(&spec(Some("me"), Some(15))), "me", s(100), D),
            LeaseAction::Renew
        );
        assert_eq!(
            decide(Some(&spec(Some("other"), Some(15))), "me", s(5), D),
            LeaseAction::Wait
        );
        assert_eq!(
            decide(Some(&spec(Some("other"), Some(15))), "me", s(15), D),
            LeaseAction::Acquire
        );
        // A released Lease (no holder) is free at once.
        assert_eq!(
            decide(Some(&spec(None, Some(1))), "me", s(0), D),
            LeaseAction::Acquire
        );
        // A Lease that says no duration is given ours.
        assert_eq!(
            decide(Some(&spec(Some("other"), None)), "me", s(14), D),
            LeaseAction::Wait
        );
    }

    #[test]
    fn timing_is_checked() {
        assert_eq!(Timing::default().check(), Ok(()));
        let t = |l, r, p| Timing {
            lease_duration: Duration::from_secs(l),
            renew_deadline: Duration::from_secs(r),
            retry_period: Duration::from_secs(p),
        };
        assert!(t(10, 10, 2).check().is_err());
        assert!(t(15, 2, 2).check().is_err());
        assert!(t(15, 10, 0).check().is_err());
    }

    #[test]
    fn the_fence_opens_on_renew_and_closes_at_its_deadline() {
        let f = Fence::elected();
        assert!(!f.holds(), "closed before the first renew");
        f.extend(Instant::now() + Duration::from_secs(60));
        assert!(f.holds());
        // A late answer to an older renew does not move the deadline back.
        f.extend(Instant::now());
        assert!(f.holds());
        f.close();
        assert!(!f.holds());
        f.extend(Instant::now() - Duration::from_millis(1));
        assert!(!f.holds(), "a deadline in the past is closed");
        assert!(Fence::open().holds());
    }

    /// A model of two replicas sharing one Lease, each with its own monotonic clock running at
    /// a rate within ±1 % of real time, reading the Lease at random moments and pausing at
    /// random. The leader's term (its fence) and a follower's take-over follow the rules of
    /// this module; the property is that the terms never overlap in real time.
    #[derive(Debug, Clone)]
    struct Step {
        who: usize,
        gap_ms: u64,
        latency_ms: u64,
    }

    /// A replica's last Lease record seen (holder, version) and the local time it was first seen.
    type Seen = Option<((Option<usize>, u64), f64)>;

    /// Phases in which one replica acts alone (the other is paused or slow) several times in a
    /// row, at gaps around the retry period.
    fn steps() -> impl Strategy<Value = Vec<Step>> {
        let phase = (0usize..2, 1usize..20, 0u64..3_000, 0u64..1_500);
        prop::collection::vec(phase, 1..40).prop_map(|phases| {
            phases
                .into_iter()
                .flat_map(|(who, n, gap_ms, latency_ms)| {
                    std::iter::repeat_n(
                        Step {
                            who,
                            gap_ms,
                            latency_ms,
                        },
                        n,
                    )
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn two_leaders_never_write_at_once(steps in steps(), rates in (0.99f64..1.01, 0.99f64..1.01)) {
            let timing = Timing::default();
            let rate = [rates.0, rates.1];
            // Real time in ms; the Lease store: (holder, version); per replica: last record
            // seen with the local time it was first seen, and the fence's local deadline.
            let mut now = 0f64;
            let mut lease: Option<(usize, u64)> = None;
            let mut seen: [Seen; 2] = [None, None];
            let mut fence: [Option<f64>; 2] = [None, None];
            // Real-time intervals in which each replica's fence was open.
            let mut terms: Vec<(usize, f64, f64)> = Vec::new();
            let local = |who: usize, t: f64| t * rate[who];
            let lease_ms = timing.lease_duration.as_millis() as f64;
            let renew_ms = timing.renew_deadline.as_millis() as f64;
            for s in &steps {
                now += s.gap_ms as f64;
                let who = s.who;
                let sent = now;
                // The read reaches the store after half the latency, the write right after.
                let at_store = sent + s.latency_ms as f64 / 2.0;
                let record = (lease.map(|l| l.0), lease.map_or(0, |l| l.1));
                let unchanged = match seen[who] {
                    Some((r, at)) if r == record => local(who, at_store) - at,
                    _ => {
                        seen[who] = Some((record, local(who, at_store)));
                        0.0
                    }
                };
                let may = match lease {
                    None => true,
                    Some((holder, _)) if holder == who => true,
                    Some(_) => unchanged >= lease_ms,
                };
                if may {
                    let version = record.1 + 1;
                    lease = Some((who, version));
                    let until_local = local(who, sent) + renew_ms;
                    let prev = fence[who].unwrap_or(f64::MIN);
                    fence[who] = Some(until_local.max(prev));
                    // Real time at which the fence closes.
                    let until_real = fence[who].unwrap_or(0.0) / rate[who];
                    terms.push((who, at_store, until_real));
                }
                now = at_store + s.latency_ms as f64 / 2.0;
            }
            // A term starts when its write reaches the store; no two replicas' terms overlap.
            for a in &terms {
                for b in &terms {
                    if a.0 != b.0 {
                        let overlap = a.1 < b.2 && b.1 < a.2;
                        prop_assert!(!overlap, "terms overlap: {:?} and {:?}", a, b);
                    }
                }
            }
        }
    }
}
