//! The pod and claim planner: the heart of the AppSet controller, written sans-IO.
//!
//! Data flow: the controller lists what exists (the AppSet's pods and claims, reduced to
//! [`PodInfo`] and [`ClaimInfo`]), resolves the current and update revisions, and calls
//! [`plan`] with a [`PlanInput`]. The planner returns a [`Plan`]: the claim owner-reference
//! updates, the claims and pods to create and the pods to delete, plus what it is waiting for.
//! The controller executes the plan in that order (owners, claims, deletions, creations) and
//! stops at the first error, so a pod is never created before its claims, and a scaled-away pod
//! is never deleted before its claims point at it when `whenScaled: Delete` asks for that.
//!
//! Semantics follow the StatefulSet controller (`pkg/controller/statefulset`):
//!
//! * Replica slots are the ordinals `start .. start + replicas`; pods outside are condemned.
//! * Failed and Succeeded pods in a slot are deleted and recreated.
//! * A pod that is being deleted is waited for, never duplicated (its name is still taken).
//! * `OrderedReady` creates the lowest missing pod and waits for every lower pod to be Running,
//!   Ready and available (`minReadySeconds`) first; it scales down the highest condemned pod,
//!   one at a time, and only when every replica is healthy. `Parallel` creates and deletes
//!   without waiting; the executor bounds how many requests it sends at once.
//! * `RollingUpdate` replaces old-revision pods whose index (ordinal minus `ordinals.start`) is
//!   at or above `partition` within a disruption budget ([`Budget`]): at most `maxUnavailable`
//!   slots are ever being replaced at once (missing, terminating, or at the update revision and
//!   not yet available), and a healthy pod is taken down only while that keeps the slots down
//!   for any reason at or below `maxUnavailable`. `OrderedReady` replaces the highest old pod,
//!   one at a time; `Parallel` replaces unavailable old pods first, then healthy ones, highest
//!   ordinal first within each. New pods below the partition get the current revision, all
//!   others the update revision. `OnDelete` never deletes for an update.
//! * Claim ownership mirrors StatefulSet's retention policy: a claim is owned by the AppSet when
//!   `whenDeleted: Delete` and its pod is not condemned; by its pod when `whenScaled: Delete`
//!   and the pod is condemned; otherwise by nobody. The garbage collector does the deleting.
//!
//! Where AppSet deliberately differs (kubernetes#67250): an old-revision pod that is not
//! available is replaced when its turn comes without waiting for it to become Ready, since it
//! takes nothing down that was up, and waiting for it would stall the rollout forever (the
//! classic "broken image, then fixed image" trap). It still counts against the number of pods
//! being replaced at once, so an outage that makes every pod unready followed by a template
//! change replaces one pod at a time (with `maxUnavailable: 1`), never the whole set.

use std::collections::{BTreeMap, BTreeSet};

use appset_crds::appset::{
    PersistentVolumeClaimRetentionPolicy, PodManagementPolicy, RetentionPolicyType,
    UpdateStrategyType,
};

/// The phase of a pod, as far as the planner cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodPhase {
    /// Accepted, not yet running (or phase missing).
    Pending,
    /// Bound to a node with its containers started.
    Running,
    /// All containers terminated successfully; the pod will not restart.
    Succeeded,
    /// All containers terminated, at least one in failure.
    Failed,
    /// The state could not be obtained.
    Unknown,
}

impl PodPhase {
    /// Parses `status.phase`; anything unknown or absent is `Pending` or `Unknown`.
    pub fn parse(phase: Option<&str>) -> Self {
        match phase {
            Some("Running") => Self::Running,
            Some("Succeeded") => Self::Succeeded,
            Some("Failed") => Self::Failed,
            Some("Unknown") => Self::Unknown,
            _ => Self::Pending,
        }
    }
}

/// What the planner needs to know about one pod the AppSet owns.
#[derive(Clone, Debug, PartialEq)]
pub struct PodInfo {
    /// `metadata.name` (`<set>-<ordinal>`).
    pub name: String,
    /// `metadata.uid`, used for claim owner references and delete preconditions.
    pub uid: String,
    /// The ordinal parsed from the name.
    pub ordinal: i32,
    /// The `controller-revision-hash` label, if any.
    pub revision: Option<String>,
    /// `status.phase`.
    pub phase: PodPhase,
    /// Whether the `Ready` condition is True.
    pub ready: bool,
    /// When the `Ready` condition last changed (Unix seconds), if known.
    pub ready_since: Option<i64>,
    /// Whether `metadata.deletionTimestamp` is set.
    pub terminating: bool,
}

impl PodInfo {
    /// Running and Ready, and not being deleted.
    pub fn is_healthy(&self) -> bool {
        !self.terminating && self.phase == PodPhase::Running && self.ready
    }

    /// Healthy for at least `min_ready_seconds` at `now`. A Ready pod whose transition time is
    /// unknown is available only when `min_ready_seconds` is 0, as in Kubernetes.
    pub fn is_available(&self, min_ready_seconds: i64, now: i64) -> bool {
        self.is_healthy()
            && (min_ready_seconds <= 0
                || self
                    .ready_since
                    .is_some_and(|t| now.saturating_sub(t) >= min_ready_seconds))
    }

    /// Failed or Succeeded: the pod will never run again and must be replaced.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, PodPhase::Failed | PodPhase::Succeeded)
    }
}

/// What the planner needs to know about one claim named `<template>-<set>-<ordinal>`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimInfo {
    /// `metadata.name`.
    pub name: String,
    /// The volumeClaimTemplate it belongs to.
    pub template: String,
    /// The ordinal parsed from the name.
    pub ordinal: i32,
    /// Whether `metadata.deletionTimestamp` is set.
    pub terminating: bool,
    /// The current owners that the retention policy manages.
    pub owners: ClaimOwners,
}

/// The owner references on a claim that the retention policy manages. Other owner references
/// are left alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClaimOwners {
    /// Owned by the AppSet (deleted with it).
    pub set: bool,
    /// Owned by this pod (uid), deleted with it.
    pub pod: Option<String>,
}

/// Everything the planner decides from.
#[derive(Clone, Debug)]
pub struct PlanInput {
    /// The AppSet's name.
    pub set_name: String,
    /// `spec.replicas`.
    pub replicas: i32,
    /// `spec.ordinals.start`.
    pub start_ordinal: i32,
    /// `spec.podManagementPolicy`.
    pub policy: PodManagementPolicy,
    /// `spec.updateStrategy.type`.
    pub strategy: UpdateStrategyType,
    /// `spec.updateStrategy.rollingUpdate.partition` (0 for `OnDelete`).
    pub partition: i32,
    /// `maxUnavailable`, resolved to a count of at least 1 (see [`resolve_max_unavailable`]).
    pub max_unavailable: i32,
    /// `spec.minReadySeconds`.
    pub min_ready_seconds: i64,
    /// `spec.persistentVolumeClaimRetentionPolicy`.
    pub retention: PersistentVolumeClaimRetentionPolicy,
    /// The names of the volumeClaimTemplates.
    pub claim_templates: Vec<String>,
    /// The current revision's name.
    pub current_revision: String,
    /// The update revision's name.
    pub update_revision: String,
    /// Now, in Unix seconds.
    pub now: i64,
    /// The pods the AppSet owns.
    pub pods: Vec<PodInfo>,
    /// The claims named after the AppSet's templates.
    pub claims: Vec<ClaimInfo>,
}

/// Why a pod is deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteReason {
    /// It failed or succeeded and must be recreated.
    Finished,
    /// Its ordinal is outside the replica range.
    ScaleDown,
    /// It is of an old revision and the rolling update reached it.
    Update,
    /// It is of an old revision and not available: replaced when its turn comes, without
    /// waiting for it to become Ready (kubernetes#67250), within the budget.
    BrokenOldRevision,
}

/// A pod to delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodDeletion {
    /// The pod's name.
    pub name: String,
    /// The pod's uid (the delete precondition).
    pub uid: String,
    /// Why.
    pub reason: DeleteReason,
}

/// A pod to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCreation {
    /// The ordinal.
    pub ordinal: i32,
    /// `<set>-<ordinal>`.
    pub name: String,
    /// The revision whose template the pod is built from.
    pub revision: String,
}

/// A claim to create (before its pod).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimCreation {
    /// The volumeClaimTemplate's name.
    pub template: String,
    /// The ordinal.
    pub ordinal: i32,
    /// `<template>-<set>-<ordinal>`.
    pub name: String,
    /// The owners the claim is created with.
    pub owners: ClaimOwners,
}

/// A claim whose retention-policy owner references must change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimOwnerUpdate {
    /// The claim's name.
    pub claim: String,
    /// The pod it belongs to (for the owner reference's name).
    pub pod_name: String,
    /// The owners it must have.
    pub owners: ClaimOwners,
}

/// What the planner is waiting for, for status messages and stall reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wait {
    /// A pod is not yet Running and Ready (or not yet available for `minReadySeconds`).
    PodNotReady(String),
    /// A pod is being deleted.
    PodTerminating(String),
    /// A claim the next pod needs is being deleted.
    ClaimTerminating(String),
    /// A claim of an empty slot still names a pod that is gone as its owner; it is released
    /// first, so that the garbage collector cannot delete it under the new pod.
    ClaimOwnerRepair(String),
    /// The rolling update has used its `maxUnavailable` budget.
    UnavailableBudget {
        /// Replicas unavailable now.
        unavailable: i32,
        /// `maxUnavailable`.
        max_unavailable: i32,
    },
}

impl std::fmt::Display for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PodNotReady(p) => write!(f, "waiting for pod {p} to be Running and Ready"),
            Self::PodTerminating(p) => write!(f, "waiting for pod {p} to finish terminating"),
            Self::ClaimOwnerRepair(c) => write!(
                f,
                "releasing PersistentVolumeClaim {c} from the pod that owned it before its pod is created"
            ),
            Self::ClaimTerminating(c) => {
                write!(
                    f,
                    "waiting for PersistentVolumeClaim {c} to finish terminating"
                )
            }
            Self::UnavailableBudget {
                unavailable,
                max_unavailable,
            } => write!(
                f,
                "{unavailable} replicas unavailable, maxUnavailable is {max_unavailable}"
            ),
        }
    }
}

/// The planner's decision, executed by the controller in field order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Owner-reference changes on existing claims (first, so the garbage collector sees them
    /// before any pod deletion).
    pub claim_owner_updates: Vec<ClaimOwnerUpdate>,
    /// Claims to create, before their pods.
    pub create_claims: Vec<ClaimCreation>,
    /// Pods to delete.
    pub delete_pods: Vec<PodDeletion>,
    /// Pods to create.
    pub create_pods: Vec<PodCreation>,
    /// What blocks further progress, if anything.
    pub waiting: Option<Wait>,
    /// When to look again even if nothing changes (a pod becoming available after
    /// `minReadySeconds`), in seconds.
    pub requeue_after: Option<i64>,
}

impl Plan {
    /// Whether the plan changes nothing.
    pub fn is_empty(&self) -> bool {
        self.claim_owner_updates.is_empty()
            && self.create_claims.is_empty()
            && self.delete_pods.is_empty()
            && self.create_pods.is_empty()
    }

    /// How many of the plan's pod deletions go out at once: scale-down and failed-pod
    /// deletions `burst` at a time, update deletions (at most `maxUnavailable` of them) one
    /// after the other, so that they happen highest ordinal first.
    pub fn deletion_concurrency(&self, burst: usize) -> usize {
        if self
            .delete_pods
            .iter()
            .any(|d| d.reason == DeleteReason::Update)
        {
            1
        } else {
            burst.max(1)
        }
    }
}

/// The longest an AppSet goes without a reconcile, even when nothing changes.
pub const MAX_REQUEUE_SECONDS: i64 = 300;

/// How soon an AppSet with work in flight (this plan acted, or waits for a pod or a claim) is
/// looked at again, even if no watch event comes: a watch can go quiet for minutes after an API
/// server or etcd restart, and a rollout must not wait for it.
pub const BUSY_RECHECK_SECONDS: i64 = 5;

impl Plan {
    /// When to look again for this plan's sake: soon while work is in flight, else never.
    pub fn recheck_after(&self) -> Option<i64> {
        (!self.is_empty() || self.waiting.is_some()).then_some(BUSY_RECHECK_SECONDS)
    }
}

/// When to reconcile again: the soonest of the given delays (a pod becoming available, a
/// progress deadline), at least one second, and at most [`MAX_REQUEUE_SECONDS`].
pub fn requeue_after(delays: impl IntoIterator<Item = Option<i64>>) -> i64 {
    delays
        .into_iter()
        .flatten()
        .map(|s| s.max(1))
        .fold(MAX_REQUEUE_SECONDS, i64::min)
}

/// The name of the pod at `ordinal`: `<set>-<ordinal>`.
pub fn pod_name(set: &str, ordinal: i32) -> String {
    format!("{set}-{ordinal}")
}

/// The name of a claim: `<template>-<set>-<ordinal>`.
pub fn claim_name(template: &str, set: &str, ordinal: i32) -> String {
    format!("{template}-{set}-{ordinal}")
}

/// The ordinal of a pod named `<set>-<ordinal>`, if the name has that shape.
pub fn parse_pod_ordinal(set: &str, name: &str) -> Option<i32> {
    parse_ordinal_suffix(name.strip_prefix(set)?.strip_prefix('-')?)
}

/// The ordinal of a claim named `<template>-<set>-<ordinal>`, if the name has that shape.
pub fn parse_claim_ordinal(template: &str, set: &str, name: &str) -> Option<i32> {
    let rest = name.strip_prefix(template)?.strip_prefix('-')?;
    parse_pod_ordinal(set, rest)
}

fn parse_ordinal_suffix(s: &str) -> Option<i32> {
    // Canonical decimal only: "01" or "+1" would name a different pod than the one we build.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

/// Resolves `maxUnavailable` against `replicas` like StatefulSet: an integer is taken as is, a
/// percentage is rounded down; either way the result is at least 1. Absent means 1.
pub fn resolve_max_unavailable(
    value: Option<&k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>,
    replicas: i32,
) -> i32 {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let n = match value {
        None => 1,
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(s)) => match s.strip_suffix('%').map(str::parse::<i64>) {
            Some(Ok(p)) => (i64::from(replicas.max(0)) * p / 100) as i32,
            _ => s.parse().unwrap_or(1),
        },
    };
    n.max(1)
}

/// The owners a claim must have under `retention`, for a pod that is `condemned` or not.
pub fn desired_claim_owners(
    retention: &PersistentVolumeClaimRetentionPolicy,
    condemned: bool,
    pod_uid: Option<&str>,
) -> ClaimOwners {
    let scaled_delete = retention.when_scaled == RetentionPolicyType::Delete;
    let deleted_delete = retention.when_deleted == RetentionPolicyType::Delete;
    if condemned && scaled_delete {
        ClaimOwners {
            set: false,
            pod: pod_uid.map(str::to_string),
        }
    } else {
        ClaimOwners {
            set: deleted_delete,
            pod: None,
        }
    }
}

/// Decides what to do next. See the module documentation for the rules.
pub fn plan(input: &PlanInput) -> Plan {
    let mut p = Planner::new(input);
    p.replace_finished();
    let blocked = p.walk_slots();
    p.own_claims();
    let condemned = p.scale_down(blocked);
    // OrderedReady scales down before it updates, as StatefulSet does. A walk blocked by an
    // unavailable pod does not stop the update: the budget below decides, and it lets a
    // broken old-revision pod be replaced when its turn comes (kubernetes#67250).
    if !(p.monotonic && condemned) {
        p.roll();
    }
    p.out
}

/// The most pods one plan creates (with their claims). A plan holds only names and ordinals,
/// and the executor builds each object when its slow-start batch starts, so this bounds the
/// memory of one reconcile whatever `replicas` says; the next plan continues.
pub const MAX_CREATIONS_PER_PLAN: usize = 256;

/// How the slot walk goes on after one slot.
enum Flow {
    Next,
    Stop,
}

/// The views of one [`plan`] call and the plan being built.
struct Planner<'a> {
    input: &'a PlanInput,
    monotonic: bool,
    start: i32,
    end: i32,
    pods: BTreeMap<i32, &'a PodInfo>,
    claims: BTreeMap<(&'a str, i32), &'a ClaimInfo>,
    /// Pods deleted by this plan count as terminating from here on.
    deleted: BTreeSet<i32>,
    out: Plan,
}

impl<'a> Planner<'a> {
    fn new(input: &'a PlanInput) -> Self {
        let start = input.start_ordinal;
        Self {
            input,
            monotonic: input.policy == PodManagementPolicy::OrderedReady,
            start,
            end: start.saturating_add(input.replicas.max(0)),
            pods: input.pods.iter().map(|p| (p.ordinal, p)).collect(),
            claims: input
                .claims
                .iter()
                .map(|c| ((c.template.as_str(), c.ordinal), c))
                .collect(),
            deleted: BTreeSet::new(),
            out: Plan::default(),
        }
    }

    fn in_range(&self, o: i32) -> bool {
        o >= self.start && o < self.end
    }

    fn gone(&self, p: &PodInfo) -> bool {
        p.terminating || self.deleted.contains(&p.ordinal)
    }

    fn is_update_target(&self, o: i32) -> bool {
        self.input.strategy == UpdateStrategyType::RollingUpdate
            && o - self.start >= self.input.partition
    }

    fn available(&self, p: &PodInfo) -> bool {
        p.is_available(self.input.min_ready_seconds, self.input.now)
    }

    fn delete(&mut self, p: &PodInfo, reason: DeleteReason) {
        self.out.delete_pods.push(PodDeletion {
            name: p.name.clone(),
            uid: p.uid.clone(),
            reason,
        });
        self.deleted.insert(p.ordinal);
    }

    /// Step 1: finished pods in a replica slot are deleted and recreated later.
    fn replace_finished(&mut self) {
        let finished: Vec<&PodInfo> = self
            .pods
            .values()
            .copied()
            .filter(|p| self.in_range(p.ordinal) && !p.terminating && p.is_finished())
            .collect();
        for p in finished {
            self.delete(p, DeleteReason::Finished);
        }
    }

    /// Step 2: walk the replica slots in order, claims then pods. Returns whether an
    /// OrderedReady walk stopped at a slot that is not ready yet.
    fn walk_slots(&mut self) -> bool {
        for ordinal in self.start..self.end {
            let flow = match self.pods.get(&ordinal).copied() {
                None => self.fill_slot(ordinal),
                Some(p) if self.gone(p) => {
                    self.out
                        .waiting
                        .get_or_insert(Wait::PodTerminating(p.name.clone()));
                    self.stop_if_ordered()
                }
                Some(p) => self.check_live_slot(p),
            };
            if let Flow::Stop = flow {
                return true;
            }
        }
        false
    }

    fn stop_if_ordered(&self) -> Flow {
        if self.monotonic {
            Flow::Stop
        } else {
            Flow::Next
        }
    }

    /// An empty slot: its missing claims, then its pod (at the current revision below the
    /// partition), unless one of its claims is still terminating.
    fn fill_slot(&mut self, ordinal: i32) -> Flow {
        let input = self.input;
        let name = pod_name(&input.set_name, ordinal);
        let mut claim_blocked = None;
        let mut repaired = None;
        for template in &input.claim_templates {
            match self.claims.get(&(template.as_str(), ordinal)) {
                Some(c) if c.terminating => claim_blocked = Some(c.name.clone()),
                // The slot has no pod, so any pod owner is stale (a pod deleted by a scale-down
                // with `whenScaled: Delete`): the garbage collector would delete the claim once
                // it sees that pod gone. Release it now; the pod comes in a later plan, once the
                // claim is seen released (or, if the collector won, terminating).
                Some(c) if c.owners.pod.is_some() => {
                    self.out.claim_owner_updates.push(ClaimOwnerUpdate {
                        claim: c.name.clone(),
                        pod_name: name.clone(),
                        owners: desired_claim_owners(&input.retention, false, None),
                    });
                    repaired = Some(c.name.clone());
                }
                Some(_) => {}
                None => self.out.create_claims.push(ClaimCreation {
                    template: template.clone(),
                    ordinal,
                    name: claim_name(template, &input.set_name, ordinal),
                    owners: desired_claim_owners(&input.retention, false, None),
                }),
            }
        }
        if let Some(claim) = claim_blocked {
            self.out
                .waiting
                .get_or_insert(Wait::ClaimTerminating(claim));
            return self.stop_if_ordered();
        }
        if let Some(claim) = repaired {
            self.out
                .waiting
                .get_or_insert(Wait::ClaimOwnerRepair(claim));
            return self.stop_if_ordered();
        }
        let revision = if input.strategy == UpdateStrategyType::RollingUpdate
            && ordinal - self.start < input.partition
        {
            input.current_revision.clone()
        } else {
            input.update_revision.clone()
        };
        self.out.create_pods.push(PodCreation {
            ordinal,
            name: name.clone(),
            revision,
        });
        if self.out.create_pods.len() >= MAX_CREATIONS_PER_PLAN {
            // The rest comes in the next plans: a huge `replicas` costs no more memory per
            // reconcile than this.
            self.out.requeue_after = Some(1);
            return Flow::Stop;
        }
        if self.monotonic {
            self.out.waiting.get_or_insert(Wait::PodNotReady(name));
            return Flow::Stop;
        }
        Flow::Next
    }

    /// A slot with a live pod: claims deleted under it are recreated (unless still
    /// terminating: the pod keeps them alive through the protection finalizer), and an
    /// OrderedReady walk stops at a pod that is not available yet.
    fn check_live_slot(&mut self, p: &PodInfo) -> Flow {
        let input = self.input;
        for template in &input.claim_templates {
            if !self.claims.contains_key(&(template.as_str(), p.ordinal)) {
                self.out.create_claims.push(ClaimCreation {
                    template: template.clone(),
                    ordinal: p.ordinal,
                    name: claim_name(template, &input.set_name, p.ordinal),
                    owners: desired_claim_owners(&input.retention, false, Some(&p.uid)),
                });
            }
        }
        if self.available(p) {
            return Flow::Next;
        }
        if p.is_healthy()
            && let Some(since) = p.ready_since
        {
            let left = (since + input.min_ready_seconds - input.now).max(1);
            self.out.requeue_after = Some(self.out.requeue_after.map_or(left, |r| r.min(left)));
        }
        if self.monotonic {
            self.out
                .waiting
                .get_or_insert(Wait::PodNotReady(p.name.clone()));
            return Flow::Stop;
        }
        Flow::Next
    }

    /// Step 3: claim ownership for every live pod, following the retention policy.
    fn own_claims(&mut self) {
        let input = self.input;
        for p in self.pods.values() {
            if p.terminating {
                continue;
            }
            let condemned = !self.in_range(p.ordinal);
            let desired = desired_claim_owners(&input.retention, condemned, Some(&p.uid));
            for template in &input.claim_templates {
                if let Some(c) = self.claims.get(&(template.as_str(), p.ordinal))
                    && !c.terminating
                    && c.owners != desired
                {
                    self.out.claim_owner_updates.push(ClaimOwnerUpdate {
                        claim: c.name.clone(),
                        pod_name: p.name.clone(),
                        owners: desired.clone(),
                    });
                }
            }
        }
    }

    /// Step 4: scale down, highest ordinal first (one at a time with OrderedReady, and not
    /// while the walk is blocked). Returns whether any pod is out of range.
    fn scale_down(&mut self, blocked: bool) -> bool {
        let condemned: Vec<&PodInfo> = self
            .pods
            .values()
            .rev()
            .filter(|p| !self.in_range(p.ordinal))
            .copied()
            .collect();
        if !self.monotonic {
            for p in condemned.iter().filter(|p| !p.terminating) {
                self.delete(p, DeleteReason::ScaleDown);
            }
            return !condemned.is_empty();
        }
        let Some(target) = condemned.first().copied().filter(|_| !blocked) else {
            return !condemned.is_empty();
        };
        if target.terminating {
            self.out
                .waiting
                .get_or_insert(Wait::PodTerminating(target.name.clone()));
            return true;
        }
        // StatefulSet deletes an unhealthy condemned pod only when no lower pod is unhealthy
        // too; a healthy one goes right away.
        let lower_unhealthy = condemned[1..].iter().find(|p| !self.available(p));
        match lower_unhealthy {
            Some(p) if !self.available(target) => {
                self.out
                    .waiting
                    .get_or_insert(Wait::PodNotReady(p.name.clone()));
            }
            _ => self.delete(target, DeleteReason::ScaleDown),
        }
        true
    }

    /// The disruption budget of the rolling update, before it deletes anything.
    fn budget(&self) -> Budget {
        let input = self.input;
        let update = input.update_revision.as_str();
        let mut b = Budget::default();
        let mut present = 0;
        for p in self.pods.range(self.start..self.end).map(|(_, p)| *p) {
            present += 1;
            if self.gone(p) || (!self.available(p) && p.revision.as_deref() == Some(update)) {
                b.in_flight += 1;
            } else if !self.available(p) {
                b.old_unavailable += 1;
            }
        }
        // Empty slots, counted without walking them (`replicas` may be huge).
        b.in_flight = b
            .in_flight
            .saturating_add((self.end - self.start).saturating_sub(present));
        b.max = if self.monotonic {
            input.max_unavailable.min(1)
        } else {
            input.max_unavailable
        };
        b
    }

    /// Step 5: rolling update within the disruption budget ([`Budget`]). OrderedReady
    /// replaces the highest old-revision pod, one at a time; Parallel replaces broken
    /// old-revision pods first, then healthy ones, highest ordinal first within each.
    fn roll(&mut self) {
        let input = self.input;
        if input.strategy != UpdateStrategyType::RollingUpdate {
            return;
        }
        let update = input.update_revision.as_str();
        let mut budget = self.budget();
        let mut old: Vec<&PodInfo> = self
            .pods
            .range(self.start..self.end)
            .rev()
            .map(|(_, p)| *p)
            .filter(|p| self.is_update_target(p.ordinal))
            .filter(|p| !self.gone(p) && p.revision.as_deref() != Some(update))
            .collect();
        if self.monotonic {
            old.truncate(1);
        } else {
            // A stable sort keeps the highest-first order within each group.
            old.sort_by_key(|p| self.available(p));
        }
        for p in old {
            let healthy = self.available(p);
            if !budget.allows(healthy) {
                self.out.waiting.get_or_insert(Wait::UnavailableBudget {
                    unavailable: budget.in_flight + budget.old_unavailable,
                    max_unavailable: budget.max,
                });
                break;
            }
            budget.take(healthy);
            let reason = if healthy {
                DeleteReason::Update
            } else {
                DeleteReason::BrokenOldRevision
            };
            self.delete(p, reason);
        }
    }
}

/// The rolling update's disruption budget over the replica slots.
///
/// * `in_flight`: slots the controller is replacing or has not brought up yet: missing,
///   terminating (or deleted by this plan), or holding an update-revision pod that is not
///   available yet.
/// * `old_unavailable`: old-revision pods that are unavailable for reasons of their own (a
///   dependency outage, a broken old template).
///
/// A healthy pod may be deleted only while `in_flight + old_unavailable < max`, so that the
/// replicas down never exceed `maxUnavailable`; an unavailable old pod may be deleted while
/// `in_flight < max` (deleting it takes nothing down that was up, and waiting for it to become
/// Ready could stall the rollout forever), so that at most `max` pods are ever being replaced
/// at once, however many are unready. `max` is `maxUnavailable`, or 1 with OrderedReady.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    /// Slots being replaced or not yet available at the update revision.
    pub in_flight: i32,
    /// Old-revision pods unavailable on their own.
    pub old_unavailable: i32,
    /// The most slots that may be down or being replaced.
    pub max: i32,
}

impl Budget {
    /// Whether deleting one more old pod (`healthy` or not) stays within the budget.
    pub fn allows(&self, healthy: bool) -> bool {
        if healthy {
            self.in_flight + self.old_unavailable < self.max
        } else {
            self.in_flight < self.max
        }
    }

    /// Accounts for deleting one old pod.
    pub fn take(&mut self, healthy: bool) {
        self.in_flight += 1;
        if !healthy {
            self.old_unavailable -= 1;
        }
    }
}

#[cfg(test)]
mod tests;
