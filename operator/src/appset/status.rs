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
//! * `Available` has Deployment's meaning: at least `replicas - maxUnavailable` pods available.
//! * `Progressing` is True with reason `RolloutComplete` when every pod the strategy targets is
//!   at the update revision and available, `RolloutInProgress` while counters keep moving, and
//!   turns False with reason `ProgressDeadlineExceeded` after `progressDeadlineSeconds` without
//!   any change. For this condition `lastTransitionTime` is the time of the last progress (the
//!   role of Deployment's `lastUpdateTime`, which `metav1.Condition` lacks). With `OnDelete`, a
//!   rollout that only waits for users to delete pods reports `AwaitingPodDeletion` and never
//!   stalls.
//! * `VolumeClaimsInSync` reports claims still resizing or template changes Kubernetes cannot
//!   apply (present only when the AppSet has volumeClaimTemplates).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use appset_crds::appset::{AppSetStatus, UpdateStrategyType, VolumeClaimTemplateStatus};

use super::plan::PodInfo;

/// Condition type: enough pods are available.
pub const AVAILABLE: &str = "Available";
/// Condition type: the rollout state and its deadline.
pub const PROGRESSING: &str = "Progressing";
/// Condition type: claims match their templates.
pub const VOLUME_CLAIMS_IN_SYNC: &str = "VolumeClaimsInSync";
/// `Progressing` reason when the deadline passed without progress.
pub const PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";

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

/// Keeps the previous transition time when status and reason did not change.
fn keep_transition(mut c: Condition, previous: Option<&Condition>) -> Condition {
    if let Some(p) = previous
        && p.status == c.status
        && p.reason == c.reason
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
    let mut conditions = vec![available, progress.condition];
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
    /// Whether every replica slot has an available pod.
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
        Self {
            replicas,
            ready,
            available,
            updated,
            current: count(&|p| is_rev(p, current_revision)),
            current_revision,
            outdated: count(&|p| in_range(p) && targeted(p) && !is_rev(p, input.update_revision)),
            all_there: replicas == input.replicas
                && count(&|p| in_range(p) && p.is_available(input.min_ready_seconds, now_s))
                    == input.replicas,
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
}

/// `Progressing`: complete, waiting for OnDelete deletions, in progress (with its deadline),
/// or stalled past `progressDeadlineSeconds`.
fn progressing_condition(
    input: &StatusInput<'_>,
    counts: &Counts<'_>,
    prev: Option<&Condition>,
) -> Progress {
    let (now, generation) = (&input.now, input.generation);
    let done = |condition| Progress {
        condition,
        stalled_now: false,
        check_deadline_after: None,
    };
    if counts.all_there && counts.outdated == 0 {
        let message = format!(
            "{} pods available; revision {} rolled out",
            counts.replicas, input.update_revision
        );
        let c = condition(
            PROGRESSING,
            true,
            "RolloutComplete",
            message,
            now,
            generation,
        );
        return done(keep_transition(c, prev));
    }
    if counts.all_there && input.strategy == UpdateStrategyType::OnDelete {
        let message = format!(
            "{} pods are not at revision {}; with OnDelete they are replaced when deleted",
            counts.outdated, input.update_revision
        );
        let c = condition(
            PROGRESSING,
            true,
            "AwaitingPodDeletion",
            message,
            now,
            generation,
        );
        return done(keep_transition(c, prev));
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
    let progressed = match input.previous {
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
                || p.observed_generation != generation
        }
    };
    match prev {
        Some(p) if !progressed && p.reason == PROGRESS_DEADLINE_EXCEEDED => done(Condition {
            message: detail,
            ..p.clone()
        }),
        Some(p) if !progressed && p.reason == "RolloutInProgress" => {
            let elapsed = now.0.as_second() - p.last_transition_time.0.as_second();
            if elapsed >= input.progress_deadline_seconds {
                let message = format!("no progress for {elapsed}s: {detail}");
                Progress {
                    condition: condition(
                        PROGRESSING,
                        false,
                        PROGRESS_DEADLINE_EXCEEDED,
                        message,
                        now,
                        generation,
                    ),
                    stalled_now: true,
                    check_deadline_after: None,
                }
            } else {
                Progress {
                    condition: Condition {
                        message: detail,
                        observed_generation: generation,
                        ..p.clone()
                    },
                    stalled_now: false,
                    check_deadline_after: Some(input.progress_deadline_seconds - elapsed),
                }
            }
        }
        _ => Progress {
            condition: condition(
                PROGRESSING,
                true,
                "RolloutInProgress",
                detail,
                now,
                generation,
            ),
            stalled_now: false,
            check_deadline_after: Some(input.progress_deadline_seconds),
        },
    }
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
}
