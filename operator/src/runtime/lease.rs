//! Leader election with a `coordination.k8s.io/v1` Lease, so that only one operator replica
//! reconciles at a time.
//!
//! The pure part, [`decide`], looks at the Lease as read and says whether this replica may take
//! or renew it. The I/O part, [`LeaderElector`], reads and writes the Lease with optimistic
//! concurrency (the write carries the `resourceVersion` it read, so two replicas racing for an
//! expired Lease cannot both win), renews it every `renew` interval, and reports losing it.
//!
//! Guarantee: a replica only acts as leader while its last successful renewal is younger than
//! the lease duration. Caveat: clocks are compared across replicas (the Lease stores wall-clock
//! times), so large clock skew shortens or lengthens the handover.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tracing::{info, warn};

/// What to do with the Lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseAction {
    /// The Lease does not exist: create it, holding it.
    Create,
    /// Take over a Lease that is free or expired (a new leadership term).
    Acquire,
    /// Renew a Lease we already hold.
    Renew,
    /// Someone else holds a live Lease.
    Wait,
}

/// Decides from the Lease as read (`None` when it does not exist).
pub fn decide(lease: Option<&LeaseSpec>, me: &str, now: Timestamp) -> LeaseAction {
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
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref());
    match renewed {
        Some(MicroTime(t)) if *t + duration > now => LeaseAction::Wait,
        _ => LeaseAction::Acquire,
    }
}

/// Holds a Lease for this replica.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaderElector {
    /// An elector for Lease `namespace/name` as `identity`, with the given lease duration.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
        }
    }

    /// One attempt to take or renew the Lease; `Ok(true)` when this replica holds it now.
    pub async fn try_hold(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        let action = decide(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            now,
        );
        let secs = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let result = match (action, current) {
            (LeaseAction::Wait, _) => return Ok(false),
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
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the Lease, retrying every `retry`.
    pub async fn acquire(&self, retry: Duration) {
        loop {
            match self.try_hold().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "became the leader");
                    return;
                }
                Ok(false) => {}
                Err(err) => {
                    warn!(lease = %self.name, error = %err, "cannot read or write the leader Lease")
                }
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews the Lease every `renew` until a renewal fails for longer than the lease duration
    /// or another replica takes it; returns then (leadership is lost).
    pub async fn keep(&self, renew: Duration) {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(renew).await;
            match self.try_hold().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!(lease = %self.name, "another replica holds the leader Lease");
                    return;
                }
                Err(err) => {
                    warn!(lease = %self.name, error = %err, "cannot renew the leader Lease");
                    if last_ok.elapsed() >= self.duration {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed_secs_ago: i64, duration: i32) -> LeaseSpec {
        let now = Timestamp::from_second(1_000_000).unwrap();
        LeaseSpec {
            holder_identity: holder.map(String::from),
            lease_duration_seconds: Some(duration),
            renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
            ..Default::default()
        }
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_000_000).unwrap()
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(None, "me", now()), LeaseAction::Create);
        assert_eq!(
            decide(Some(&spec(Some("me"), 100, 15)), "me", now()),
            LeaseAction::Renew
        );
        assert_eq!(
            decide(Some(&spec(Some("other"), 5, 15)), "me", now()),
            LeaseAction::Wait
        );
        assert_eq!(
            decide(Some(&spec(Some("other"), 15, 15)), "me", now()),
            LeaseAction::Acquire
        );
        assert_eq!(
            decide(Some(&spec(None, 1, 15)), "me", now()),
            LeaseAction::Acquire
        );
        let never_renewed = LeaseSpec {
            holder_identity: Some("other".into()),
            ..Default::default()
        };
        assert_eq!(
            decide(Some(&never_renewed), "me", now()),
            LeaseAction::Acquire
        );
    }
}
