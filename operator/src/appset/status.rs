//! The AppSet status, sans-IO: counters, revisions and conditions.
//!
//! Data flow: after planning, the controller hands [`compute`] the observed pods (the same
//! [`PodInfo`]s the planner saw), the revisions, the per-template claim status, what the plan
//! waits for and the previous status. It returns the new status, whether the rollout has just
//! stalled (for a Warning Event) and when to look again to catch the progress deadline.
//!
//! Semantics:
//!
//! * Counters follow StatefulSet, counting pods that are not being deleted: `replicas` (owned
//!   pods), `readyReplicas` (Running and Ready), `availableReplicas` (Ready for
//!   `minReadySeconds`), `currentReplicas` and `updatedReplicas` (pods at each revision).
//! * `currentRevision` becomes the update revision once every pod is at it and Ready and the
//!   pod count equals `spec.replicas`; until then pods below the partition keep the old one.
//! * `Ready` is what `kubectl wait --for=condition=Ready` and the Argo CD health check wait
//!   for: True with reason `RolloutComplete` once every pod the strategy
//!   targets (from the partition up) is at the update revision, every replica slot has an
//!   available pod and no pod beyond `spec.replicas` is left; with `OnDelete`, True with reason
//!   `AwaitingPodDeletion` when only users' deletions are missing (as Helm's wait treats a
//!   StatefulSet with `OnDelete`). Otherwise False, with the first of
//!   `ProgressDeadlineExceeded` (the rollout stalled), `RollingOut` (targeted pods not at the
//!   update revision), `ReplicasUnavailable` (fewer available pods than `spec.replicas`) and
//!   `ScalingDown` (pods beyond `spec.replicas` still exist).
//! * `Reconciling` and `Stalled` are kstatus's "abnormal-true" conditions, present only while
//!   True: `Reconciling` while `Ready` is False for any reason but a stall, `Stalled` once the
//!   progress deadline passed, each with `Ready`'s reason and message. kstatus (Helm's and
//!   Flux's waits) reads these and not `Ready`, so without them it would call an AppSet current
//!   as soon as `observedGeneration` matched.
//! * `Available` has Deployment's meaning: at least `replicas - maxUnavailable` pods available.
//! * `Progressing` is True with reason `RolloutComplete` when every pod the strategy targets is
//!   at the update revision and available, `RolloutInProgress` while counters keep moving, and
//!   turns False with reason `ProgressDeadlineExceeded` after `progressDeadlineSeconds` without
//!   any progress. With `OnDelete`, a rollout that only waits for users to delete pods reports
//!   `AwaitingPodDeletion` and never stalls.
//! * `lastProgressTime` is when the rollout last made progress: the counters, the update
//!   revision or the observed generation changed, or a rollout started. The deadline is measured
//!   from it. A status written before the field existed has none: the time is then taken from
//!   `Progressing`'s `lastTransitionTime`, which held it in that version, so an upgrade neither
//!   stalls a rollout early nor restarts its deadline.
//! * `VolumeClaimsInSync` reports claims still resizing or template changes Kubernetes cannot
//!   apply (present only when the AppSet has volumeClaimTemplates).
//! * A condition's `lastTransitionTime` changes only when its status flips (True/False), as
//!   `metav1.Condition` defines it; reasons and messages may change in between.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use appset_crds::appset::{AppSetStatus, UpdateStrategyType, VolumeClaimTemplateStatus};

use super::plan::PodInfo;

/// Condition type: the rollout is complete and every replica is available.
pub const READY: &str = "Ready";
/// Condition type (kstatus): present and True while the AppSet moves towards Ready.
pub const RECONCILING: &str = "Reconciling";
/// Condition type (kstatus): present and True while the rollout is stalled.
pub const STALLED: &str = "Stalled";
/// Condition type: enough pods are available.
pub const AVAILABLE: &str = "Available";
/// Condition type: the rollout state and its deadline.
pub const PROGRESSING: &str = "Progressing";
/// Condition type: claims match their templates.
pub const VOLUME_CLAIMS_IN_SYNC: &str = "VolumeClaimsInSync";
/// `Progressing` and `Ready` reason when the deadline passed without progress.
pub const PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";
/// `Progressing` and `Ready` reason: the targeted pods are at the update revision and available.
pub const ROLLOUT_COMPLETE: &str = "RolloutComplete";
/// `Progressing` reason while a rollout or a scale moves.
pub const ROLLOUT_IN_PROGRESS: &str = "RolloutInProgress";
/// `Progressing` and `Ready` reason with `OnDelete`: only users' pod deletions are missing.
pub const AWAITING_POD_DELETION: &str = "AwaitingPodDeletion";
/// `Ready` reason: targeted pods are not at the update revision yet.
pub const ROLLING_OUT: &str = "RollingOut";
/// `Ready` reason: fewer pods are available than `spec.replicas`.
pub const REPLICAS_UNAVAILABLE: &str = "ReplicasUnavailable";
/// `Ready` reason: pods beyond `spec.replicas` still exist.
pub const SCALING_DOWN: &str = "ScalingDown";

/// Everything the status is computed from.
#[derive(Clone, Debug)]
pub struct StatusInput<'a> {
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `spec.replicas`.
    pub replicas: i32,
    /// `spec.ordinals.start`.
    pub start_ordinal: i32,
    /// `spec.updateStrategy.type`.
    pub strategy: UpdateStrategyType,
    /// The rolling update partition.
    pub partition: i32,
    /// The resolved `maxUnavailable`.
    pub max_unavailable: i32,
    /// `spec.minReadySeconds`.
    pub min_ready_seconds: i64,
    /// `spec.progressDeadlineSeconds`.
    pub progress_deadline_seconds: i64,
    /// The owned pods.
    pub pods: &'a [PodInfo],
    /// The current revision.
    pub current_revision: &'a str,
    /// The update revision.
    pub update_revision: &'a str,
    /// The collision count to record.
    pub collision_count: i32,
    /// The selector as a string.
    pub label_selector: String,
    /// The config hash of the update revision, when `configRollout` is on.
    pub config_hash: Option<String>,
    /// The keyed digest `config_hash` stands for, when `configRollout` is on.
    pub config_digest: Option<String>,
    /// The last config-driven rollout, when `configRollout` is on.
    pub config_rollout_time: Option<Time>,
    /// A config change waiting for the coalescing window or the minimum interval.
    pub pending_config_since: Option<Time>,
    /// One entry per volumeClaimTemplate.
    pub volume_claim_templates: Vec<VolumeClaimTemplateStatus>,
    /// What the plan waits for, in words.
    pub waiting: Option<String>,
    /// The status before this reconcile.
    pub previous: Option<&'a AppSetStatus>,
    /// Now.
    pub now: Time,
}

/// The computed status and what follows from it.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusOutcome {
    /// The status to write.
    pub status: AppSetStatus,
    /// True when `Progressing` has just turned False: a stall to report with an Event.
    pub stalled_now: bool,
    /// Seconds until the progress deadline passes, when a rollout is in progress.
    pub check_deadline_after: Option<i64>,
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    now: &Time,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message,
        last_transition_time: now.clone(),
        observed_generation: generation,
    }
}

/// Keeps the previous transition time when the status did not flip.
fn keep_transition(mut c: Condition, previous: Option<&Condition>) -> Condition {
    if let Some(p) = previous
        && p.status == c.status
    {
        c.last_transition_time = p.last_transition_time.clone();
    }
    c
}

/// Computes the status. See the module documentation for the rules.
pub fn compute(input: &StatusInput<'_>) -> StatusOutcome {
    let counts = Counts::of(input);
    let previous_conditions = input
        .previous
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    let prev = |t: &str| previous_conditions.iter().find(|c| c.type_ == t);

    let available = keep_transition(available_condition(input, &counts), prev(AVAILABLE));
    let progress = progressing_condition(input, &counts, prev(PROGRESSING));
    let ready = keep_transition(
        ready_condition(input, &counts, &progress.condition),
        prev(READY),
    );
    let abnormal = if ready.status == "True" {
        None
    } else if ready.reason == PROGRESS_DEADLINE_EXCEEDED {
        Some(STALLED)
    } else {
        Some(RECONCILING)
    };
    let abnormal = abnormal.map(|type_| {
        let c = Condition {
            type_: type_.to_string(),
            status: "True".to_string(),
            ..ready.clone()
        };
        // Absent means False: the time is kept only while it stays present.
        let mut c = keep_transition(c, prev(type_));
        if prev(type_).is_none() {
            c.last_transition_time = input.now.clone();
        }
        c
    });
    let mut conditions = vec![ready, available, progress.condition];
    conditions.extend(abnormal);
    if let Some(c) = claims_condition(input) {
        conditions.push(keep_transition(c, prev(VOLUME_CLAIMS_IN_SYNC)));
    }

    StatusOutcome {
        status: AppSetStatus {
            observed_generation: input.generation,
            replicas: counts.replicas,
            ready_replicas: counts.ready,
            available_replicas: counts.available,
            current_replicas: counts.current,
            updated_replicas: counts.updated,
            current_revision: Some(counts.current_revision.to_string()),
            update_revision: Some(input.update_revision.to_string()),
            collision_count: Some(input.collision_count),
            label_selector: Some(input.label_selector.clone()),
            config_hash: input.config_hash.clone(),
            config_digest: input.config_digest.clone(),
            config_rollout_time: input.config_rollout_time.clone(),
            pending_config_since: input.pending_config_since.clone(),
            last_progress_time: Some(progress.last_progress),
            conditions,
            volume_claim_templates: input.volume_claim_templates.clone(),
        },
        stalled_now: progress.stalled_now,
        check_deadline_after: progress.check_deadline_after,
    }
}

/// The pod counts of the status.
struct Counts<'a> {
    replicas: i32,
    ready: i32,
    available: i32,
    updated: i32,
    current: i32,
    /// The update revision once every pod is at it and ready, else the current one.
    current_revision: &'a str,
    /// Pods in range and targeted by the update that are not at the update revision.
    outdated: i32,
    /// Available pods in a replica slot.
    in_range_available: i32,
    /// Whether every replica slot has an available pod and no other pod is left.
    all_there: bool,
}

impl<'a> Counts<'a> {
    fn of(input: &StatusInput<'a>) -> Self {
        let now_s = input.now.0.as_second();
        let live: Vec<&PodInfo> = input.pods.iter().filter(|p| !p.terminating).collect();
        let count = |f: &dyn Fn(&PodInfo) -> bool| live.iter().filter(|p| f(p)).count() as i32;
        let is_rev = |p: &PodInfo, r: &str| p.revision.as_deref() == Some(r);
        let replicas = live.len() as i32;
        let ready = count(&|p| p.is_healthy());
        let available = count(&|p| p.is_available(input.min_ready_seconds, now_s));
        let updated = count(&|p| is_rev(p, input.update_revision));
        let done = updated == replicas && ready == replicas && replicas == input.replicas;
        let current_revision = if done {
            input.update_revision
        } else {
            input.current_revision
        };
        let end = input.start_ordinal.saturating_add(input.replicas.max(0));
        let in_range = |p: &PodInfo| p.ordinal >= input.start_ordinal && p.ordinal < end;
        let targeted = |p: &PodInfo| match input.strategy {
            UpdateStrategyType::RollingUpdate => p.ordinal - input.start_ordinal >= input.partition,
            UpdateStrategyType::OnDelete => true,
        };
        let in_range_available =
            count(&|p| in_range(p) && p.is_available(input.min_ready_seconds, now_s));
        Self {
            replicas,
            ready,
            available,
            updated,
            current: count(&|p| is_rev(p, current_revision)),
            current_revision,
            outdated: count(&|p| in_range(p) && targeted(p) && !is_rev(p, input.update_revision)),
            in_range_available,
            all_there: replicas == input.replicas && in_range_available == input.replicas,
        }
    }
}

/// `Available`: at least `replicas - maxUnavailable` pods available.
fn available_condition(input: &StatusInput<'_>, counts: &Counts<'_>) -> Condition {
    let min_available = (input.replicas - input.max_unavailable).max(0);
    let message = format!(
        "{} of {} pods available (at least {min_available} required)",
        counts.available, input.replicas
    );
    let (ok, reason) = if counts.available >= min_available {
        (true, "MinimumReplicasAvailable")
    } else {
        (false, "MinimumReplicasUnavailable")
    };
    condition(AVAILABLE, ok, reason, message, &input.now, input.generation)
}

/// The `Progressing` condition and what it implies for the caller.
struct Progress {
    condition: Condition,
    /// The progress deadline passed in this computation (an Event is due).
    stalled_now: bool,
    /// Seconds until the deadline must be checked again.
    check_deadline_after: Option<i64>,
    /// The time of the last progress, for `lastProgressTime`.
    last_progress: Time,
}

/// Whether anything moved since the previous status: the counters, the update revision or the
/// observed generation. Without a previous status everything is new.
fn progressed(input: &StatusInput<'_>, counts: &Counts<'_>) -> bool {
    match input.previous {
        None => true,
        Some(p) => {
            (
                p.replicas,
                p.ready_replicas,
                p.available_replicas,
                p.updated_replicas,
            ) != (
                counts.replicas,
                counts.ready,
                counts.available,
                counts.updated,
            ) || p.update_revision.as_deref() != Some(input.update_revision)
                || p.observed_generation != input.generation
        }
    }
}

/// The last progress the previous status recorded: its `lastProgressTime`, or for a status
/// written before that field existed, `Progressing`'s `lastTransitionTime` (which held the time
/// of the last progress then). Without either, now.
fn recorded_progress(input: &StatusInput<'_>, prev: Option<&Condition>) -> Time {
    input
        .previous
        .and_then(|s| s.last_progress_time.clone())
        .or_else(|| prev.map(|c| c.last_transition_time.clone()))
        .unwrap_or_else(|| input.now.clone())
}

/// A time as the API writes it, to the second.
fn show(t: &Time) -> String {
    k8s_openapi::jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", t.0)
        .unwrap_or_else(|_| t.0.to_string())
}

/// `Progressing`: complete, waiting for OnDelete deletions, in progress (with its deadline),
/// or stalled past `progressDeadlineSeconds`.
fn progressing_condition(
    input: &StatusInput<'_>,
    counts: &Counts<'_>,
    prev: Option<&Condition>,
) -> Progress {
    let (now, generation) = (&input.now, input.generation);
    let moved = progressed(input, counts);
    let last_progress = if moved {
        now.clone()
    } else {
        recorded_progress(input, prev)
    };
    let settled = |condition| Progress {
        condition: keep_transition(condition, prev),
        stalled_now: false,
        check_deadline_after: None,
        last_progress: last_progress.clone(),
    };
    if counts.all_there && counts.outdated == 0 {
        let message = format!(
            "{} pods available; revision {} rolled out",
            counts.replicas, input.update_revision
        );
        return settled(condition(
            PROGRESSING,
            true,
            ROLLOUT_COMPLETE,
            message,
            now,
            generation,
        ));
    }
    if counts.all_there && input.strategy == UpdateStrategyType::OnDelete {
        let message = format!(
            "{} pods are not at revision {}; with OnDelete they are replaced when deleted",
            counts.outdated, input.update_revision
        );
        return settled(condition(
            PROGRESSING,
            true,
            AWAITING_POD_DELETION,
            message,
            now,
            generation,
        ));
    }
    let detail = format!(
        "{} of {} pods updated to revision {}, {} available{}",
        counts.updated,
        input.replicas,
        input.update_revision,
        counts.available,
        input
            .waiting
            .as_deref()
            .map(|w| format!("; {w}"))
            .unwrap_or_default()
    );
    let stalled = |last: &Time| {
        condition(
            PROGRESSING,
            false,
            PROGRESS_DEADLINE_EXCEEDED,
            format!("no progress since {}: {detail}", show(last)),
            now,
            generation,
        )
    };
    match prev {
        Some(p) if !moved && p.reason == PROGRESS_DEADLINE_EXCEEDED => Progress {
            condition: keep_transition(stalled(&last_progress), prev),
            stalled_now: false,
            check_deadline_after: None,
            last_progress,
        },
        Some(p) if !moved && p.reason == ROLLOUT_IN_PROGRESS => {
            let elapsed = now.0.as_second() - last_progress.0.as_second();
            if elapsed >= input.progress_deadline_seconds {
                Progress {
                    condition: keep_transition(stalled(&last_progress), prev),
                    stalled_now: true,
                    check_deadline_after: None,
                    last_progress,
                }
            } else {
                let c = condition(
                    PROGRESSING,
                    true,
                    ROLLOUT_IN_PROGRESS,
                    detail,
                    now,
                    generation,
                );
                Progress {
                    condition: keep_transition(c, prev),
                    stalled_now: false,
                    check_deadline_after: Some(input.progress_deadline_seconds - elapsed),
                    last_progress,
                }
            }
        }
        // Progress, or a rollout that starts now: the deadline runs from now.
        _ => {
            let c = condition(
                PROGRESSING,
                true,
                ROLLOUT_IN_PROGRESS,
                detail,
                now,
                generation,
            );
            Progress {
                condition: keep_transition(c, prev),
                stalled_now: false,
                check_deadline_after: Some(input.progress_deadline_seconds),
                last_progress: now.clone(),
            }
        }
    }
}

/// `Ready`: the rollout is complete and every replica is available. See the module
/// documentation for the reasons and their order.
fn ready_condition(
    input: &StatusInput<'_>,
    counts: &Counts<'_>,
    progressing: &Condition,
) -> Condition {
    let rev = input.update_revision;
    let (ok, reason, message) = if progressing.reason == PROGRESS_DEADLINE_EXCEEDED {
        (
            false,
            PROGRESS_DEADLINE_EXCEEDED,
            progressing.message.clone(),
        )
    } else if counts.outdated > 0 && input.strategy == UpdateStrategyType::RollingUpdate {
        let message = format!(
            "rolling out revision {rev}: {} pods still to update, {} of {} available",
            counts.outdated, counts.in_range_available, input.replicas
        );
        (false, ROLLING_OUT, message)
    } else if counts.in_range_available < input.replicas {
        let message = format!(
            "{} of {} pods available",
            counts.in_range_available, input.replicas
        );
        (false, REPLICAS_UNAVAILABLE, message)
    } else if counts.replicas > input.replicas {
        let message = format!(
            "{} pods exist, {} wanted: waiting for the others to be deleted",
            counts.replicas, input.replicas
        );
        (false, SCALING_DOWN, message)
    } else if counts.outdated > 0 {
        let message = format!(
            "{} pods available; {} are not at revision {rev} and are replaced when deleted (OnDelete)",
            input.replicas, counts.outdated
        );
        (true, AWAITING_POD_DELETION, message)
    } else if input.strategy == UpdateStrategyType::RollingUpdate && input.partition > 0 {
        let message = format!(
            "{} pods available; the pods from ordinal {} up are at revision {rev} (partition {})",
            input.replicas,
            input.start_ordinal.saturating_add(input.partition),
            input.partition
        );
        (true, ROLLOUT_COMPLETE, message)
    } else {
        let message = format!("{} pods available at revision {rev}", input.replicas);
        (true, ROLLOUT_COMPLETE, message)
    };
    condition(READY, ok, reason, message, &input.now, input.generation)
}

/// `VolumeClaimsInSync`, when the AppSet has claim templates: a template that cannot be
/// applied, claims still resizing, or in sync.
fn claims_condition(input: &StatusInput<'_>) -> Option<Condition> {
    if input.volume_claim_templates.is_empty() {
        return None;
    }
    let blocked: Vec<String> = input
        .volume_claim_templates
        .iter()
        .filter_map(|t| t.message.as_ref().map(|m| format!("{}: {m}", t.name)))
        .collect();
    let resizing: Vec<String> = input
        .volume_claim_templates
        .iter()
        .filter(|t| t.resized < t.claims)
        .map(|t| {
            format!(
                "{}: {} of {} claims at {}",
                t.name,
                t.resized,
                t.claims,
                t.requested_storage.as_deref().unwrap_or("?")
            )
        })
        .collect();
    let (ok, reason, message) = if !blocked.is_empty() {
        (false, "Unsupported", blocked.join("; "))
    } else if !resizing.is_empty() {
        (false, "Resizing", resizing.join("; "))
    } else {
        (
            true,
            "InSync",
            "every claim matches its template".to_string(),
        )
    };
    Some(condition(
        VOLUME_CLAIMS_IN_SYNC,
        ok,
        reason,
        message,
        &input.now,
        input.generation,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::appset::plan::PodPhase;
    use k8s_openapi::jiff::Timestamp;

    const T0: i64 = 1_700_000_000;

    fn at(s: i64) -> Time {
        Time(Timestamp::from_second(s).expect("valid timestamp"))
    }

    fn pod(ordinal: i32, revision: &str, ready: bool) -> PodInfo {
        PodInfo {
            name: format!("web-{ordinal}"),
            uid: format!("u{ordinal}"),
            ordinal,
            revision: Some(revision.into()),
            phase: PodPhase::Running,
            ready,
            ready_since: Some(T0 - 100),
            terminating: false,
        }
    }

    fn input<'a>(
        pods: &'a [PodInfo],
        previous: Option<&'a AppSetStatus>,
        now: i64,
    ) -> StatusInput<'a> {
        StatusInput {
            generation: Some(2),
            replicas: 3,
            start_ordinal: 0,
            strategy: UpdateStrategyType::RollingUpdate,
            partition: 0,
            max_unavailable: 1,
            min_ready_seconds: 0,
            progress_deadline_seconds: 600,
            pods,
            current_revision: "old",
            update_revision: "new",
            collision_count: 0,
            label_selector: "app=web".into(),
            config_hash: Some("h".into()),
            config_digest: Some("0a:ff".into()),
            config_rollout_time: None,
            pending_config_since: None,
            volume_claim_templates: vec![],
            waiting: Some("waiting for pod web-2 to be Running and Ready".into()),
            previous,
            now: at(now),
        }
    }

    fn cond<'a>(s: &'a AppSetStatus, t: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .expect("condition present")
    }

    #[test]
    fn counters_and_a_completed_rollout() {
        let pods = vec![
            pod(0, "new", true),
            pod(1, "new", true),
            pod(2, "new", true),
        ];
        let out = compute(&input(&pods, None, T0));
        let s = &out.status;
        assert_eq!(
            (s.replicas, s.ready_replicas, s.available_replicas),
            (3, 3, 3)
        );
        assert_eq!((s.updated_replicas, s.current_replicas), (3, 3));
        assert_eq!(s.current_revision.as_deref(), Some("new"));
        assert_eq!(s.update_revision.as_deref(), Some("new"));
        assert_eq!(s.observed_generation, Some(2));
        assert_eq!(s.label_selector.as_deref(), Some("app=web"));
        assert_eq!(s.config_hash.as_deref(), Some("h"));
        assert_eq!(s.collision_count, Some(0));
        assert_eq!(cond(s, AVAILABLE).status, "True");
        assert_eq!(cond(s, PROGRESSING).reason, "RolloutComplete");
        assert!(!out.stalled_now);
    }

    #[test]
    fn a_rollout_in_progress_keeps_the_current_revision() {
        let mut pods = vec![
            pod(0, "old", true),
            pod(1, "old", true),
            pod(2, "new", false),
        ];
        pods.push(PodInfo {
            terminating: true,
            ..pod(3, "old", true)
        });
        let out = compute(&input(&pods, None, T0));
        let s = &out.status;
        assert_eq!(s.replicas, 3, "terminating pods do not count");
        assert_eq!(
            (s.ready_replicas, s.updated_replicas, s.current_replicas),
            (2, 1, 2)
        );
        assert_eq!(s.current_revision.as_deref(), Some("old"));
        assert_eq!(cond(s, AVAILABLE).status, "True", "2 >= 3 - 1");
        let p = cond(s, PROGRESSING);
        assert_eq!(
            (p.status.as_str(), p.reason.as_str()),
            ("True", "RolloutInProgress")
        );
        assert!(p.message.contains("web-2"), "{}", p.message);
        assert_eq!(out.check_deadline_after, Some(600));
    }

    #[test]
    fn min_ready_seconds_delays_availability() {
        let mut pods = vec![
            pod(0, "new", true),
            pod(1, "new", true),
            pod(2, "new", true),
        ];
        for p in &mut pods {
            p.ready_since = Some(T0 - 5);
        }
        let mut i = input(&pods, None, T0);
        i.min_ready_seconds = 10;
        let s = compute(&i).status;
        assert_eq!((s.ready_replicas, s.available_replicas), (3, 0));
        assert_eq!(cond(&s, AVAILABLE).status, "False");
        assert_eq!(cond(&s, PROGRESSING).reason, "RolloutInProgress");
    }

    #[test]
    fn no_progress_past_the_deadline_stalls_once() {
        let pods = vec![
            pod(0, "old", true),
            pod(1, "old", true),
            pod(2, "new", false),
        ];
        let first = compute(&input(&pods, None, T0)).status;
        // Nothing changes for 599 s: still in progress, transition time kept.
        let out = compute(&input(&pods, Some(&first), T0 + 599));
        assert_eq!(cond(&out.status, PROGRESSING).status, "True");
        assert_eq!(cond(&out.status, PROGRESSING).last_transition_time, at(T0));
        assert_eq!(out.check_deadline_after, Some(1));
        // At 600 s the deadline passes.
        let stalled = compute(&input(&pods, Some(&out.status), T0 + 600));
        assert!(stalled.stalled_now);
        let p = cond(&stalled.status, PROGRESSING);
        assert_eq!(
            (p.status.as_str(), p.reason.as_str()),
            ("False", PROGRESS_DEADLINE_EXCEEDED)
        );
        // It stays stalled without a second report.
        let again = compute(&input(&pods, Some(&stalled.status), T0 + 900));
        assert!(!again.stalled_now);
        assert_eq!(
            cond(&again.status, PROGRESSING).reason,
            PROGRESS_DEADLINE_EXCEEDED
        );
        assert_eq!(
            cond(&again.status, PROGRESSING).last_transition_time,
            at(T0 + 600)
        );
        // Progress resumes the rollout.
        let fixed = vec![
            pod(0, "old", true),
            pod(1, "old", true),
            pod(2, "new", true),
        ];
        let resumed = compute(&input(&fixed, Some(&again.status), T0 + 901));
        let p = cond(&resumed.status, PROGRESSING);
        assert_eq!(
            (p.status.as_str(), p.reason.as_str()),
            ("True", "RolloutInProgress")
        );
        assert_eq!(p.last_transition_time, at(T0 + 901));
    }

    #[test]
    fn partition_completes_when_targeted_pods_are_updated() {
        let pods = vec![
            pod(0, "old", true),
            pod(1, "old", true),
            pod(2, "new", true),
        ];
        let mut i = input(&pods, None, T0);
        i.partition = 2;
        let s = compute(&i).status;
        assert_eq!(cond(&s, PROGRESSING).reason, "RolloutComplete");
        assert_eq!(s.current_revision.as_deref(), Some("old"));
        assert_eq!((s.current_replicas, s.updated_replicas), (2, 1));
    }

    #[test]
    fn on_delete_waits_for_users_without_stalling() {
        let pods = vec![
            pod(0, "old", true),
            pod(1, "old", true),
            pod(2, "new", true),
        ];
        let mut i = input(&pods, None, T0);
        i.strategy = UpdateStrategyType::OnDelete;
        let first = compute(&i).status;
        assert_eq!(cond(&first, PROGRESSING).reason, "AwaitingPodDeletion");
        let mut later = input(&pods, Some(&first), T0 + 10_000);
        later.strategy = UpdateStrategyType::OnDelete;
        let out = compute(&later);
        assert!(!out.stalled_now);
        assert_eq!(cond(&out.status, PROGRESSING).status, "True");
    }

    #[test]
    fn unavailable_below_the_minimum() {
        let pods = vec![
            pod(0, "new", true),
            pod(1, "new", false),
            pod(2, "new", false),
        ];
        let s = compute(&input(&pods, None, T0)).status;
        let a = cond(&s, AVAILABLE);
        assert_eq!(
            (a.status.as_str(), a.reason.as_str()),
            ("False", "MinimumReplicasUnavailable")
        );
        assert!(a.message.contains("1 of 3"), "{}", a.message);
    }

    #[test]
    fn volume_claim_condition() {
        let pods = vec![pod(0, "new", true)];
        let tmpl = |resized, message: Option<&str>| VolumeClaimTemplateStatus {
            name: "data".into(),
            claims: 3,
            bound: 3,
            requested_storage: Some("2Gi".into()),
            resized,
            message: message.map(str::to_string),
        };
        let mut i = input(&pods, None, T0);
        i.volume_claim_templates = vec![tmpl(3, None)];
        assert_eq!(
            cond(&compute(&i).status, VOLUME_CLAIMS_IN_SYNC).status,
            "True"
        );
        i.volume_claim_templates = vec![tmpl(1, None)];
        assert_eq!(
            cond(&compute(&i).status, VOLUME_CLAIMS_IN_SYNC).reason,
            "Resizing"
        );
        i.volume_claim_templates = vec![tmpl(1, Some("class slow does not allow"))];
        let s = compute(&i).status;
        let c = cond(&s, VOLUME_CLAIMS_IN_SYNC);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "Unsupported")
        );
        assert!(c.message.contains("slow"));
        i.volume_claim_templates = vec![];
        assert!(
            compute(&i)
                .status
                .conditions
                .iter()
                .all(|c| c.type_ != VOLUME_CLAIMS_IN_SYNC)
        );
    }

    fn reason<'a>(s: &'a AppSetStatus, t: &str) -> (&'a str, &'a str) {
        let c = cond(s, t);
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn ready_once_the_rollout_is_complete() {
        let pods = vec![
            pod(0, "new", true),
            pod(1, "new", true),
            pod(2, "new", true),
        ];
        let s = compute(&input(&pods, None, T0)).status;
        assert_eq!(reason(&s, READY), ("True", ROLLOUT_COMPLETE));
        let r = cond(&s, READY);
        assert_eq!(r.observed_generation, Some(2));
        assert!(
            r.message.contains("3 pods available at revision new"),
            "{}",
            r.message
        );
        assert_eq!(s.conditions[0].type_, READY, "Ready comes first");
    }

    #[test]
    fn kstatus_conditions_are_present_only_while_true() {
        let has = |s: &AppSetStatus, t: &str| s.conditions.iter().any(|c| c.type_ == t);
        let rolling = vec![
            pod(0, "old", true),
            pod(1, "old", true),
            pod(2, "new", false),
        ];
        let first = compute(&input(&rolling, None, T0)).status;
        assert_eq!(reason(&first, RECONCILING), ("True", ROLLING_OUT));
        assert_eq!(
            cond(&first, RECONCILING).message,
            cond(&first, READY).message
        );
        assert!(!has(&first, STALLED));
        // Still rolling later: the transition time is kept.
        let idle = compute(&input(&rolling, Some(&first), T0 + 100)).status;
        assert_eq!(cond(&idle, RECONCILING).last_transition_time, at(T0));
        // Stalled: Reconciling goes, Stalled comes.
        let stalled = compute(&input(&rolling, Some(&idle), T0 + 600)).status;
        assert!(!has(&stalled, RECONCILING));
        assert_eq!(
            reason(&stalled, STALLED),
            ("True", PROGRESS_DEADLINE_EXCEEDED)
        );
        assert_eq!(cond(&stalled, STALLED).last_transition_time, at(T0 + 600));
        // Done: neither.
        let done = vec![
            pod(0, "new", true),
            pod(1, "new", true),
            pod(2, "new", true),
        ];
        let s = compute(&input(&done, Some(&stalled), T0 + 700)).status;
        assert!(
            !has(&s, RECONCILING) && !has(&s, STALLED),
            "{:?}",
            s.conditions
        );
    }

    #[test]
    fn ready_is_false_with_the_reason_why() {
        // Pods not at the update revision.
        let rolling = vec![
            pod(0, "old", true),
            pod(1, "old", true),
            pod(2, "new", true),
        ];
        let s = compute(&input(&rolling, None, T0)).status;
        assert_eq!(reason(&s, READY), ("False", ROLLING_OUT));
        assert!(
            cond(&s, READY).message.contains("2 pods still to update"),
            "{}",
            cond(&s, READY).message
        );
        // Every pod updated, one not ready.
        let unready = vec![
            pod(0, "new", true),
            pod(1, "new", true),
            pod(2, "new", false),
        ];
        let s = compute(&input(&unready, None, T0)).status;
        assert_eq!(reason(&s, READY), ("False", REPLICAS_UNAVAILABLE));
        assert!(cond(&s, READY).message.contains("2 of 3"));
        // Ready but not yet for minReadySeconds.
        let mut young = vec![
            pod(0, "new", true),
            pod(1, "new", true),
            pod(2, "new", true),
        ];
        young[2].ready_since = Some(T0 - 5);
        let mut i = input(&young, None, T0);
        i.min_ready_seconds = 10;
        assert_eq!(
            reason(&compute(&i).status, READY),
            ("False", REPLICAS_UNAVAILABLE)
        );
        // A scale-down still deleting its last pod.
        let extra = vec![
            pod(0, "new", true),
            pod(1, "new", true),
            pod(2, "new", true),
            pod(3, "new", true),
        ];
        let s = compute(&input(&extra, None, T0)).status;
        assert_eq!(reason(&s, READY), ("False", SCALING_DOWN));
        assert!(cond(&s, READY).message.contains("4 pods exist, 3 wanted"));
        // A missing pod (scale-up).
        let missing = vec![pod(0, "new", true), pod(1, "new", true)];
        assert_eq!(
            reason(&compute(&input(&missing, None, T0)).status, READY),
            ("False", REPLICAS_UNAVAILABLE)
        );
    }

    #[test]
    fn a_stalled_rollout_is_not_ready() {
        let pods = vec![
            pod(0, "old", true),
            pod(1, "old", true),
            pod(2, "new", false),
        ];
        let first = compute(&input(&pods, None, T0)).status;
        let stalled = compute(&input(&pods, Some(&first), T0 + 600)).status;
        assert_eq!(
            reason(&stalled, READY),
            ("False", PROGRESS_DEADLINE_EXCEEDED)
        );
        assert!(
            cond(&stalled, READY)
                .message
                .starts_with("no progress since"),
            "{}",
            cond(&stalled, READY).message
        );
        // Ready stayed False: its transition time is the first computation's.
        assert_eq!(cond(&stalled, READY).last_transition_time, at(T0));
    }

    #[test]
    fn partition_and_on_delete_are_ready_when_the_strategy_is_done() {
        let pods = vec![
            pod(0, "old", true),
            pod(1, "old", true),
            pod(2, "new", true),
        ];
        let mut i = input(&pods, None, T0);
        i.partition = 2;
        let s = compute(&i).status;
        assert_eq!(reason(&s, READY), ("True", ROLLOUT_COMPLETE));
        assert!(cond(&s, READY).message.contains("partition 2"));
        // Partition 1: pod 1 is targeted and still old.
        i.partition = 1;
        assert_eq!(reason(&compute(&i).status, READY), ("False", ROLLING_OUT));

        let mut i = input(&pods, None, T0);
        i.strategy = UpdateStrategyType::OnDelete;
        let s = compute(&i).status;
        assert_eq!(reason(&s, READY), ("True", AWAITING_POD_DELETION));
        assert!(
            cond(&s, READY)
                .message
                .contains("2 are not at revision new")
        );
        // OnDelete with a pod missing is not ready.
        let two = &pods[..2];
        let mut i = input(two, None, T0);
        i.strategy = UpdateStrategyType::OnDelete;
        assert_eq!(
            reason(&compute(&i).status, READY),
            ("False", REPLICAS_UNAVAILABLE)
        );
    }

    #[test]
    fn scaled_to_zero_is_ready() {
        let mut i = input(&[], None, T0);
        i.replicas = 0;
        let s = compute(&i).status;
        assert_eq!(reason(&s, READY), ("True", ROLLOUT_COMPLETE));
        assert_eq!(reason(&s, PROGRESSING), ("True", ROLLOUT_COMPLETE));
    }

    #[test]
    fn last_progress_time_moves_with_progress_only() {
        let pods = vec![
            pod(0, "old", true),
            pod(1, "old", true),
            pod(2, "new", false),
        ];
        let first = compute(&input(&pods, None, T0)).status;
        assert_eq!(first.last_progress_time, Some(at(T0)));
        let idle = compute(&input(&pods, Some(&first), T0 + 100)).status;
        assert_eq!(idle.last_progress_time, Some(at(T0)), "nothing moved");
        let better = vec![
            pod(0, "old", true),
            pod(1, "old", true),
            pod(2, "new", true),
        ];
        let moved = compute(&input(&better, Some(&idle), T0 + 200)).status;
        assert_eq!(moved.last_progress_time, Some(at(T0 + 200)));
        // Progressing stayed True: its transition time is still the first one.
        assert_eq!(cond(&moved, PROGRESSING).last_transition_time, at(T0));
        // The deadline runs from the last progress, not from the transition.
        let out = compute(&input(&better, Some(&moved), T0 + 700));
        assert!(!out.stalled_now);
        assert_eq!(out.check_deadline_after, Some(100));
        let out = compute(&input(&better, Some(&out.status), T0 + 800));
        assert!(out.stalled_now);
        assert!(
            cond(&out.status, PROGRESSING)
                .message
                .contains("no progress since 2023-11-14T22:16:40Z"),
            "{}",
            cond(&out.status, PROGRESSING).message
        );
    }

    #[test]
    fn a_status_without_last_progress_time_keeps_its_deadline() {
        // A status written before lastProgressTime existed: Progressing's transition time
        // was the time of the last progress.
        let pods = vec![
            pod(0, "old", true),
            pod(1, "old", true),
            pod(2, "new", false),
        ];
        let mut old = compute(&input(&pods, None, T0)).status;
        old.last_progress_time = None;
        let out = compute(&input(&pods, Some(&old), T0 + 599));
        assert!(!out.stalled_now, "no false stall after an upgrade");
        assert_eq!(
            out.check_deadline_after,
            Some(1),
            "nor a restarted deadline"
        );
        assert_eq!(out.status.last_progress_time, Some(at(T0)));
        assert_eq!(
            reason(&out.status, PROGRESSING),
            ("True", ROLLOUT_IN_PROGRESS)
        );
        let out = compute(&input(&pods, Some(&out.status), T0 + 600));
        assert!(out.stalled_now);

        // A completed rollout recorded by the old version stays complete, with the time.
        let done = vec![
            pod(0, "new", true),
            pod(1, "new", true),
            pod(2, "new", true),
        ];
        let mut old = compute(&input(&done, None, T0)).status;
        old.last_progress_time = None;
        let out = compute(&input(&done, Some(&old), T0 + 5000));
        assert!(!out.stalled_now);
        assert_eq!(out.status.last_progress_time, Some(at(T0)));
        assert_eq!(reason(&out.status, READY), ("True", ROLLOUT_COMPLETE));
    }

    #[test]
    fn a_new_rollout_starts_its_deadline_and_keeps_transition_times() {
        let done = vec![
            pod(0, "old", true),
            pod(1, "old", true),
            pod(2, "old", true),
        ];
        let mut i = input(&done, None, T0);
        i.update_revision = "old";
        let complete = compute(&i).status;
        assert_eq!(reason(&complete, READY), ("True", ROLLOUT_COMPLETE));
        // A template change: same pods, a new update revision.
        let out = compute(&input(&done, Some(&complete), T0 + 1000));
        let s = &out.status;
        assert_eq!(reason(s, PROGRESSING), ("True", ROLLOUT_IN_PROGRESS));
        assert_eq!(
            cond(s, PROGRESSING).last_transition_time,
            at(T0),
            "Progressing stayed True"
        );
        assert_eq!(reason(s, READY), ("False", ROLLING_OUT));
        assert_eq!(
            cond(s, READY).last_transition_time,
            at(T0 + 1000),
            "Ready flipped"
        );
        assert_eq!(s.last_progress_time, Some(at(T0 + 1000)));
        assert_eq!(out.check_deadline_after, Some(600));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// One pod: ordinal, at the update revision, ready, seconds ready, terminating.
        type PodSpec = (i32, bool, bool, i64, bool);

        fn pods_of(specs: &[PodSpec]) -> Vec<PodInfo> {
            let mut live = std::collections::BTreeSet::new();
            specs
                .iter()
                .filter(|(o, _, _, _, terminating)| *terminating || live.insert(*o))
                .map(|&(o, new, ready, age, terminating)| PodInfo {
                    ready_since: Some(T0 - age),
                    terminating,
                    ..pod(o, if new { "new" } else { "old" }, ready)
                })
                .collect()
        }

        fn step() -> impl Strategy<Value = (Vec<PodSpec>, i64, bool)> {
            (
                proptest::collection::vec(
                    (
                        0i32..6,
                        any::<bool>(),
                        any::<bool>(),
                        0i64..60,
                        prop::bool::weighted(0.1),
                    ),
                    0..7,
                ),
                0i64..400,
                prop::bool::weighted(0.15),
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn ready_means_done_and_times_move_as_documented(
                replicas in 0i32..5,
                partition in 0i32..5,
                on_delete in any::<bool>(),
                min_ready in prop::sample::select(vec![0i64, 30]),
                deadline in 60i64..600,
                steps in proptest::collection::vec(step(), 1..10),
            ) {
                let mut previous: Option<AppSetStatus> = None;
                let mut now = T0;
                for (specs, dt, strip) in steps {
                    now += dt;
                    let pods = pods_of(&specs);
                    if strip && let Some(p) = previous.as_mut() {
                        // As written by the version before lastProgressTime.
                        p.last_progress_time = None;
                    }
                    let mut i = input(&pods, previous.as_ref(), now);
                    i.replicas = replicas;
                    i.partition = if on_delete { 0 } else { partition };
                    i.strategy = if on_delete {
                        UpdateStrategyType::OnDelete
                    } else {
                        UpdateStrategyType::RollingUpdate
                    };
                    i.min_ready_seconds = min_ready;
                    i.progress_deadline_seconds = deadline;
                    let out = compute(&i);
                    let s = &out.status;
                    let ready = cond(s, READY);
                    let progressing = cond(s, PROGRESSING);

                    prop_assert_eq!(s.observed_generation, Some(2));
                    prop_assert_eq!(ready.observed_generation, Some(2));
                    if ready.status == "True" {
                        prop_assert!(s.available_replicas >= replicas, "{:?}", s);
                        prop_assert_eq!(s.replicas, replicas);
                        let live_in_range = pods
                            .iter()
                            .filter(|p| !p.terminating && p.ordinal < replicas);
                        for p in live_in_range {
                            prop_assert!(
                                p.is_available(min_ready, now),
                                "an unavailable pod {p:?} while Ready"
                            );
                            if !on_delete && p.ordinal >= partition {
                                prop_assert_eq!(p.revision.as_deref(), Some("new"));
                            }
                        }
                        if !on_delete {
                            prop_assert_eq!(ready.reason.as_str(), ROLLOUT_COMPLETE);
                        }
                    }
                    // kstatus's conditions follow Ready.
                    let has = |t: &str| s.conditions.iter().find(|c| c.type_ == t);
                    let stalled = ready.reason == PROGRESS_DEADLINE_EXCEEDED;
                    prop_assert_eq!(has(STALLED).is_some(), stalled);
                    prop_assert_eq!(
                        has(RECONCILING).is_some(),
                        ready.status == "False" && !stalled
                    );
                    for c in [has(STALLED), has(RECONCILING)].into_iter().flatten() {
                        prop_assert_eq!(c.status.as_str(), "True");
                        prop_assert_eq!(&c.reason, &ready.reason);
                    }
                    prop_assert_eq!(
                        ready.status == "True",
                        [ROLLOUT_COMPLETE, AWAITING_POD_DELETION]
                            .contains(&progressing.reason.as_str()),
                        "Ready {:?} against Progressing {:?}", ready, progressing
                    );

                    // Transition times change exactly when the status flips.
                    for c in &s.conditions {
                        let before = previous
                            .as_ref()
                            .and_then(|p| p.conditions.iter().find(|b| b.type_ == c.type_));
                        match before {
                            Some(b) if b.status == c.status => {
                                prop_assert_eq!(&c.last_transition_time, &b.last_transition_time)
                            }
                            _ => prop_assert_eq!(&c.last_transition_time, &at(now)),
                        }
                    }

                    // The last progress is never in the future, never goes back, and the
                    // deadline is measured from it.
                    let last = s.last_progress_time.as_ref().map(|t| t.0.as_second());
                    prop_assert!(last.is_some_and(|l| l <= now));
                    let last = last.unwrap_or(now);
                    if let Some(before) = previous
                        .as_ref()
                        .and_then(|p| p.last_progress_time.as_ref())
                    {
                        prop_assert!(last >= before.0.as_second());
                    }
                    if out.stalled_now {
                        prop_assert!(now - last >= deadline);
                        prop_assert_eq!(progressing.reason.as_str(), PROGRESS_DEADLINE_EXCEEDED);
                    }
                    if progressing.reason == ROLLOUT_IN_PROGRESS {
                        prop_assert_eq!(out.check_deadline_after, Some(deadline - (now - last)));
                        prop_assert!(deadline - (now - last) > 0);
                    } else {
                        prop_assert_eq!(out.check_deadline_after, None);
                    }
                    previous = Some(out.status);
                }
            }
        }
    }
}
