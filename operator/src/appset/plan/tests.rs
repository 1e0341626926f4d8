//! Unit tests of the planner: every pod management policy crossed with scale up/down, partition,
//! maxUnavailable, failed and terminating pods, the retention policy and the broken-pod case.

use super::*;
use appset_crds::appset::PersistentVolumeClaimRetentionPolicy as Retention;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

const NOW: i64 = 1_000_000;
const OLD: &str = "web-old";
const NEW: &str = "web-new";

fn input(policy: PodManagementPolicy, replicas: i32) -> PlanInput {
    PlanInput {
        set_name: "web".into(),
        replicas,
        start_ordinal: 0,
        policy,
        strategy: UpdateStrategyType::RollingUpdate,
        partition: 0,
        max_unavailable: 1,
        min_ready_seconds: 0,
        retention: Retention::default(),
        claim_templates: vec!["data".into()],
        current_revision: OLD.into(),
        update_revision: NEW.into(),
        now: NOW,
        pods: vec![],
        claims: vec![],
    }
}

/// A Running, Ready pod of `revision` at `ordinal`, Ready for an hour, with its claim.
fn ready(i: &mut PlanInput, ordinal: i32, revision: &str) {
    i.pods.push(PodInfo {
        name: format!("web-{ordinal}"),
        uid: format!("uid-{ordinal}"),
        ordinal,
        revision: Some(revision.into()),
        phase: PodPhase::Running,
        ready: true,
        ready_since: Some(NOW - 3600),
        terminating: false,
    });
    claim(i, ordinal);
}

fn claim(i: &mut PlanInput, ordinal: i32) {
    i.claims.push(ClaimInfo {
        name: format!("data-web-{ordinal}"),
        template: "data".into(),
        ordinal,
        terminating: false,
        owners: ClaimOwners::default(),
    });
}

fn pod_mut(i: &mut PlanInput, ordinal: i32) -> &mut PodInfo {
    i.pods
        .iter_mut()
        .find(|p| p.ordinal == ordinal)
        .expect("fixture pod")
}

fn created(p: &Plan) -> Vec<(i32, &str)> {
    p.create_pods
        .iter()
        .map(|c| (c.ordinal, c.revision.as_str()))
        .collect()
}

fn deleted(p: &Plan) -> Vec<(&str, DeleteReason)> {
    p.delete_pods
        .iter()
        .map(|d| (d.name.as_str(), d.reason))
        .collect()
}

fn claims_created(p: &Plan) -> Vec<&str> {
    p.create_claims.iter().map(|c| c.name.as_str()).collect()
}

use DeleteReason::*;
use PodManagementPolicy::*;

// --- names ---

#[test]
fn names_and_ordinals_round_trip() {
    assert_eq!(pod_name("web", 3), "web-3");
    assert_eq!(claim_name("data", "web", 3), "data-web-3");
    assert_eq!(parse_pod_ordinal("web", "web-3"), Some(3));
    assert_eq!(parse_pod_ordinal("web", "web-10"), Some(10));
    assert_eq!(parse_pod_ordinal("web", "web-03"), None);
    assert_eq!(parse_pod_ordinal("web", "web-x"), None);
    assert_eq!(parse_pod_ordinal("web", "webx-1"), None);
    assert_eq!(parse_pod_ordinal("web", "web-"), None);
    assert_eq!(parse_pod_ordinal("web", "web-a-1"), None);
    assert_eq!(parse_claim_ordinal("data", "web", "data-web-2"), Some(2));
    assert_eq!(parse_claim_ordinal("data", "web", "logs-web-2"), None);
    assert_eq!(parse_claim_ordinal("data", "web", "data-web-2-1"), None);
}

#[test]
fn max_unavailable_resolution() {
    assert_eq!(resolve_max_unavailable(None, 10), 1);
    assert_eq!(resolve_max_unavailable(Some(&IntOrString::Int(3)), 10), 3);
    assert_eq!(resolve_max_unavailable(Some(&IntOrString::Int(0)), 10), 1);
    assert_eq!(
        resolve_max_unavailable(Some(&IntOrString::String("50%".into())), 5),
        2
    );
    assert_eq!(
        resolve_max_unavailable(Some(&IntOrString::String("10%".into())), 5),
        1
    );
    assert_eq!(
        resolve_max_unavailable(Some(&IntOrString::String("100%".into())), 7),
        7
    );
}

// --- scale up ---

#[test]
fn ordered_ready_creates_claims_then_the_first_pod_only() {
    let i = input(OrderedReady, 3);
    let p = plan(&i);
    assert_eq!(claims_created(&p), vec!["data-web-0"]);
    assert_eq!(created(&p), vec![(0, NEW)]);
    assert_eq!(p.waiting, Some(Wait::PodNotReady("web-0".into())));
}

#[test]
fn ordered_ready_waits_for_the_previous_pod_to_be_running_and_ready() {
    let mut i = input(OrderedReady, 3);
    ready(&mut i, 0, NEW);
    ready(&mut i, 1, NEW);
    pod_mut(&mut i, 1).ready = false;
    let p = plan(&i);
    assert!(p.is_empty(), "{p:?}");
    assert_eq!(p.waiting, Some(Wait::PodNotReady("web-1".into())));

    // Ready but Pending (not Running) does not count either.
    let mut i = input(OrderedReady, 3);
    ready(&mut i, 0, NEW);
    pod_mut(&mut i, 0).phase = PodPhase::Pending;
    assert!(plan(&i).create_pods.is_empty());
}

#[test]
fn ordered_ready_continues_once_the_previous_pod_is_ready() {
    let mut i = input(OrderedReady, 3);
    ready(&mut i, 0, NEW);
    let p = plan(&i);
    assert_eq!(created(&p), vec![(1, NEW)]);
    assert_eq!(claims_created(&p), vec!["data-web-1"]);
}

#[test]
fn ordered_ready_honours_min_ready_seconds() {
    let mut i = input(OrderedReady, 2);
    i.min_ready_seconds = 30;
    ready(&mut i, 0, NEW);
    pod_mut(&mut i, 0).ready_since = Some(NOW - 10);
    let p = plan(&i);
    assert!(p.create_pods.is_empty());
    assert_eq!(p.requeue_after, Some(20));

    pod_mut(&mut i, 0).ready_since = Some(NOW - 30);
    assert_eq!(created(&plan(&i)), vec![(1, NEW)]);

    // Unknown transition time with minReadySeconds: not available.
    pod_mut(&mut i, 0).ready_since = None;
    assert!(plan(&i).create_pods.is_empty());
}

#[test]
fn parallel_creates_everything_at_once() {
    let mut i = input(Parallel, 4);
    ready(&mut i, 1, NEW);
    i.pods.clear(); // claim of 1 exists, pod does not
    let p = plan(&i);
    assert_eq!(created(&p), vec![(0, NEW), (1, NEW), (2, NEW), (3, NEW)]);
    assert_eq!(
        claims_created(&p),
        vec!["data-web-0", "data-web-2", "data-web-3"]
    );
}

#[test]
fn parallel_does_not_wait_for_unready_pods() {
    let mut i = input(Parallel, 3);
    ready(&mut i, 0, NEW);
    pod_mut(&mut i, 0).ready = false;
    assert_eq!(created(&plan(&i)), vec![(1, NEW), (2, NEW)]);
}

#[test]
fn every_template_gets_a_claim_and_existing_claims_are_reused() {
    let mut i = input(Parallel, 2);
    i.claim_templates = vec!["data".into(), "logs".into()];
    claim(&mut i, 0);
    let p = plan(&i);
    assert_eq!(
        claims_created(&p),
        vec!["logs-web-0", "data-web-1", "logs-web-1"]
    );
}

#[test]
fn a_terminating_claim_blocks_its_pod() {
    for policy in [OrderedReady, Parallel] {
        let mut i = input(policy, 2);
        claim(&mut i, 0);
        i.claims[0].terminating = true;
        let p = plan(&i);
        assert!(p.create_pods.iter().all(|c| c.ordinal != 0), "{policy:?}");
        assert_eq!(p.waiting, Some(Wait::ClaimTerminating("data-web-0".into())));
        match policy {
            OrderedReady => assert!(p.create_pods.is_empty()),
            Parallel => assert_eq!(created(&p), vec![(1, NEW)]),
        }
    }
}

#[test]
fn a_missing_claim_of_a_live_pod_is_recreated() {
    let mut i = input(Parallel, 1);
    ready(&mut i, 0, NEW);
    i.claims.clear();
    assert_eq!(claims_created(&plan(&i)), vec!["data-web-0"]);
}

#[test]
fn ordinals_start_shifts_the_slots() {
    let mut i = input(Parallel, 2);
    i.start_ordinal = 5;
    ready(&mut i, 0, NEW);
    let p = plan(&i);
    assert_eq!(created(&p), vec![(5, NEW), (6, NEW)]);
    assert_eq!(deleted(&p), vec![("web-0", ScaleDown)]);
}

#[test]
fn claims_are_created_with_the_set_as_owner_when_when_deleted_is_delete() {
    let mut i = input(Parallel, 1);
    i.retention.when_deleted = RetentionPolicyType::Delete;
    let p = plan(&i);
    assert!(p.create_claims[0].owners.set);
    assert_eq!(p.create_claims[0].owners.pod, None);
}

// --- scale down ---

#[test]
fn ordered_ready_scales_down_highest_first_one_at_a_time() {
    let mut i = input(OrderedReady, 2);
    for o in 0..5 {
        ready(&mut i, o, NEW);
    }
    let p = plan(&i);
    assert_eq!(deleted(&p), vec![("web-4", ScaleDown)]);

    pod_mut(&mut i, 4).terminating = true;
    let p = plan(&i);
    assert!(p.delete_pods.is_empty());
    assert_eq!(p.waiting, Some(Wait::PodTerminating("web-4".into())));
}

#[test]
fn ordered_ready_does_not_scale_down_while_a_replica_is_unhealthy() {
    let mut i = input(OrderedReady, 2);
    for o in 0..4 {
        ready(&mut i, o, NEW);
    }
    pod_mut(&mut i, 1).ready = false;
    let p = plan(&i);
    // web-1 is of the update revision, so it is waited for, not replaced.
    assert!(p.delete_pods.is_empty(), "{p:?}");
}

#[test]
fn ordered_ready_unhealthy_condemned_pod_waits_for_lower_unhealthy_ones() {
    let mut i = input(OrderedReady, 1);
    for o in 0..4 {
        ready(&mut i, o, NEW);
    }
    pod_mut(&mut i, 3).ready = false;
    pod_mut(&mut i, 2).ready = false;
    let p = plan(&i);
    assert!(p.delete_pods.is_empty());
    assert_eq!(p.waiting, Some(Wait::PodNotReady("web-2".into())));

    // An unhealthy highest pod with healthy pods below is deleted.
    pod_mut(&mut i, 2).ready = true;
    assert_eq!(deleted(&plan(&i)), vec![("web-3", ScaleDown)]);
    // A healthy highest pod goes even if a lower condemned pod is unhealthy.
    pod_mut(&mut i, 3).ready = true;
    pod_mut(&mut i, 2).ready = false;
    assert_eq!(deleted(&plan(&i)), vec![("web-3", ScaleDown)]);
}

#[test]
fn parallel_scales_down_all_at_once_and_skips_terminating_pods() {
    let mut i = input(Parallel, 2);
    for o in 0..5 {
        ready(&mut i, o, NEW);
    }
    pod_mut(&mut i, 3).terminating = true;
    let p = plan(&i);
    assert_eq!(
        deleted(&p),
        vec![("web-4", ScaleDown), ("web-2", ScaleDown)]
    );
}

#[test]
fn scale_to_zero() {
    let mut i = input(OrderedReady, 0);
    for o in 0..3 {
        ready(&mut i, o, NEW);
    }
    assert_eq!(deleted(&plan(&i)), vec![("web-2", ScaleDown)]);
    i.policy = Parallel;
    assert_eq!(plan(&i).delete_pods.len(), 3);
}

// --- retention policy ---

fn owners_of(p: &Plan, claim: &str) -> Option<ClaimOwners> {
    p.claim_owner_updates
        .iter()
        .find(|u| u.claim == claim)
        .map(|u| u.owners.clone())
}

#[test]
fn retain_retain_sets_no_owners_and_removes_stale_ones() {
    let mut i = input(Parallel, 1);
    ready(&mut i, 0, NEW);
    ready(&mut i, 1, NEW);
    let p = plan(&i);
    assert!(p.claim_owner_updates.is_empty(), "{p:?}");
    // A stale set owner (policy changed from Delete to Retain) is removed.
    i.claims[0].owners.set = true;
    assert_eq!(
        owners_of(&plan(&i), "data-web-0"),
        Some(ClaimOwners::default())
    );
}

#[test]
fn when_scaled_delete_makes_the_condemned_pod_own_its_claims() {
    let mut i = input(Parallel, 1);
    i.retention.when_scaled = RetentionPolicyType::Delete;
    ready(&mut i, 0, NEW);
    ready(&mut i, 1, NEW);
    let p = plan(&i);
    assert_eq!(
        owners_of(&p, "data-web-1"),
        Some(ClaimOwners {
            set: false,
            pod: Some("uid-1".into())
        })
    );
    assert_eq!(owners_of(&p, "data-web-0"), None);
    assert_eq!(deleted(&p), vec![("web-1", ScaleDown)]);
}

#[test]
fn when_deleted_delete_makes_the_set_own_live_claims() {
    let mut i = input(Parallel, 1);
    i.retention.when_deleted = RetentionPolicyType::Delete;
    ready(&mut i, 0, NEW);
    ready(&mut i, 1, NEW);
    let p = plan(&i);
    let set_only = ClaimOwners {
        set: true,
        pod: None,
    };
    assert_eq!(owners_of(&p, "data-web-0"), Some(set_only.clone()));
    // whenScaled is Retain: the condemned pod's claim stays owned by the set.
    assert_eq!(owners_of(&p, "data-web-1"), Some(set_only));
}

#[test]
fn delete_delete_moves_condemned_claims_from_the_set_to_the_pod() {
    let mut i = input(OrderedReady, 1);
    i.retention = Retention {
        when_deleted: RetentionPolicyType::Delete,
        when_scaled: RetentionPolicyType::Delete,
    };
    ready(&mut i, 0, NEW);
    ready(&mut i, 1, NEW);
    for c in &mut i.claims {
        c.owners.set = true;
    }
    let p = plan(&i);
    assert_eq!(owners_of(&p, "data-web-0"), None);
    assert_eq!(
        owners_of(&p, "data-web-1"),
        Some(ClaimOwners {
            set: false,
            pod: Some("uid-1".into())
        })
    );
}

#[test]
fn scaling_back_up_takes_the_claim_back_from_the_pod() {
    let mut i = input(Parallel, 2);
    i.retention.when_scaled = RetentionPolicyType::Delete;
    ready(&mut i, 0, NEW);
    ready(&mut i, 1, NEW);
    i.claims[1].owners.pod = Some("uid-1".into());
    assert_eq!(
        owners_of(&plan(&i), "data-web-1"),
        Some(ClaimOwners::default())
    );
}

#[test]
fn claims_of_terminating_pods_and_terminating_claims_are_left_alone() {
    let mut i = input(Parallel, 0);
    i.retention.when_scaled = RetentionPolicyType::Delete;
    ready(&mut i, 0, NEW);
    ready(&mut i, 1, NEW);
    pod_mut(&mut i, 0).terminating = true;
    i.claims[1].terminating = true;
    let p = plan(&i);
    assert!(p.claim_owner_updates.is_empty(), "{p:?}");
}

// --- failed and terminating pods ---

#[test]
fn failed_and_succeeded_pods_are_replaced_in_both_policies() {
    for policy in [OrderedReady, Parallel] {
        let mut i = input(policy, 3);
        for o in 0..3 {
            ready(&mut i, o, NEW);
        }
        pod_mut(&mut i, 0).phase = PodPhase::Failed;
        pod_mut(&mut i, 2).phase = PodPhase::Succeeded;
        let p = plan(&i);
        assert_eq!(
            deleted(&p),
            vec![("web-0", Finished), ("web-2", Finished)],
            "{policy:?}"
        );
        assert!(p.create_pods.is_empty(), "the name is still taken");
    }
}

#[test]
fn a_terminating_pod_is_waited_for_never_duplicated() {
    for policy in [OrderedReady, Parallel] {
        let mut i = input(policy, 3);
        for o in 0..2 {
            ready(&mut i, o, NEW);
        }
        pod_mut(&mut i, 0).terminating = true;
        pod_mut(&mut i, 0).phase = PodPhase::Failed;
        let p = plan(&i);
        assert!(p.delete_pods.is_empty(), "{policy:?}");
        assert!(p.create_pods.iter().all(|c| c.ordinal != 0));
        match policy {
            OrderedReady => assert!(p.create_pods.is_empty()),
            Parallel => assert_eq!(created(&p), vec![(2, NEW)]),
        }
        assert_eq!(p.waiting, Some(Wait::PodTerminating("web-0".into())));
    }
}

#[test]
fn a_failed_condemned_pod_is_simply_scaled_down() {
    let mut i = input(Parallel, 1);
    ready(&mut i, 0, NEW);
    ready(&mut i, 1, NEW);
    pod_mut(&mut i, 1).phase = PodPhase::Failed;
    assert_eq!(deleted(&plan(&i)), vec![("web-1", ScaleDown)]);
}

// --- rolling update ---

fn all_ready(policy: PodManagementPolicy, n: i32, revision: &str) -> PlanInput {
    let mut i = input(policy, n);
    for o in 0..n {
        ready(&mut i, o, revision);
    }
    i
}

#[test]
fn rolling_update_replaces_the_highest_old_pod_first() {
    for policy in [OrderedReady, Parallel] {
        let i = all_ready(policy, 3, OLD);
        assert_eq!(deleted(&plan(&i)), vec![("web-2", Update)], "{policy:?}");
    }
}

#[test]
fn rolling_update_recreates_at_the_update_revision_and_waits_for_it() {
    for policy in [OrderedReady, Parallel] {
        let mut i = all_ready(policy, 3, OLD);
        i.pods.retain(|p| p.ordinal != 2);
        let p = plan(&i);
        assert_eq!(created(&p), vec![(2, NEW)], "{policy:?}");
        assert!(p.delete_pods.is_empty(), "one unavailable is the budget");

        ready(&mut i, 2, NEW);
        i.claims.pop();
        pod_mut(&mut i, 2).ready = false;
        let p = plan(&i);
        assert!(p.is_empty(), "{policy:?}: {p:?}");

        pod_mut(&mut i, 2).ready = true;
        assert_eq!(deleted(&plan(&i)), vec![("web-1", Update)]);
    }
}

#[test]
fn rolling_update_honours_min_ready_seconds_before_the_next_pod() {
    let mut i = all_ready(Parallel, 3, OLD);
    i.min_ready_seconds = 60;
    pod_mut(&mut i, 2).revision = Some(NEW.into());
    pod_mut(&mut i, 2).ready_since = Some(NOW - 5);
    let p = plan(&i);
    assert!(p.delete_pods.is_empty());
    assert_eq!(p.requeue_after, Some(55));
    pod_mut(&mut i, 2).ready_since = Some(NOW - 60);
    assert_eq!(deleted(&plan(&i)), vec![("web-1", Update)]);
}

#[test]
fn partition_keeps_lower_pods_at_the_current_revision() {
    for policy in [OrderedReady, Parallel] {
        let mut i = all_ready(policy, 4, OLD);
        i.partition = 2;
        pod_mut(&mut i, 3).revision = Some(NEW.into());
        pod_mut(&mut i, 2).revision = Some(NEW.into());
        let p = plan(&i);
        assert!(p.is_empty(), "{policy:?}: {p:?}");

        // A lower pod that disappears comes back at the current revision.
        i.pods.retain(|p| p.ordinal != 1);
        assert_eq!(created(&plan(&i)), vec![(1, OLD)]);
    }
}

#[test]
fn partition_is_relative_to_ordinals_start() {
    let mut i = input(Parallel, 3);
    i.start_ordinal = 10;
    i.partition = 2;
    for o in 10..13 {
        ready(&mut i, o, OLD);
    }
    assert_eq!(deleted(&plan(&i)), vec![("web-12", Update)]);
}

#[test]
fn partition_at_or_above_replicas_updates_nothing() {
    let mut i = all_ready(Parallel, 3, OLD);
    i.partition = 3;
    assert!(plan(&i).is_empty());
}

#[test]
fn max_unavailable_deletes_several_at_once_in_parallel_and_one_in_ordered_ready() {
    let mut i = all_ready(Parallel, 5, OLD);
    i.max_unavailable = 2;
    assert_eq!(
        deleted(&plan(&i)),
        vec![("web-4", Update), ("web-3", Update)]
    );
    let mut i = all_ready(OrderedReady, 5, OLD);
    i.max_unavailable = 2;
    assert_eq!(deleted(&plan(&i)), vec![("web-4", Update)]);
}

#[test]
fn max_unavailable_counts_existing_unavailable_pods() {
    let mut i = all_ready(Parallel, 5, OLD);
    i.max_unavailable = 3;
    pod_mut(&mut i, 4).revision = Some(NEW.into());
    pod_mut(&mut i, 4).ready = false;
    let p = plan(&i);
    assert_eq!(deleted(&p), vec![("web-3", Update), ("web-2", Update)]);
    i.max_unavailable = 1;
    let p = plan(&i);
    assert!(p.delete_pods.is_empty());
    assert_eq!(
        p.waiting,
        Some(Wait::UnavailableBudget {
            unavailable: 1,
            max_unavailable: 1
        })
    );
}

#[test]
fn max_unavailable_with_partition() {
    let mut i = all_ready(Parallel, 6, OLD);
    i.max_unavailable = 3;
    i.partition = 4;
    assert_eq!(
        deleted(&plan(&i)),
        vec![("web-5", Update), ("web-4", Update)]
    );
}

#[test]
fn ordered_ready_does_not_update_while_a_creation_is_pending() {
    let mut i = all_ready(OrderedReady, 3, OLD);
    i.max_unavailable = 2;
    i.pods.retain(|p| p.ordinal != 2);
    let p = plan(&i);
    assert_eq!(created(&p), vec![(2, NEW)]);
    assert!(p.delete_pods.is_empty());
}

#[test]
fn parallel_updates_within_budget_while_creating() {
    let mut i = all_ready(Parallel, 3, OLD);
    i.max_unavailable = 2;
    i.pods.retain(|p| p.ordinal != 2);
    let p = plan(&i);
    assert_eq!(created(&p), vec![(2, NEW)]);
    assert_eq!(deleted(&p), vec![("web-1", Update)]);
}

#[test]
fn ordered_ready_updates_only_after_scale_down_finished() {
    let mut i = all_ready(OrderedReady, 3, OLD);
    ready(&mut i, 3, OLD);
    assert_eq!(deleted(&plan(&i)), vec![("web-3", ScaleDown)]);
    pod_mut(&mut i, 3).terminating = true;
    assert!(plan(&i).delete_pods.is_empty());
}

#[test]
fn parallel_scales_down_and_updates_in_one_pass() {
    let mut i = all_ready(Parallel, 2, OLD);
    ready(&mut i, 2, OLD);
    assert_eq!(
        deleted(&plan(&i)),
        vec![("web-2", ScaleDown), ("web-1", Update)]
    );
}

#[test]
fn on_delete_never_deletes_for_an_update_and_recreates_at_the_update_revision() {
    for policy in [OrderedReady, Parallel] {
        let mut i = all_ready(policy, 3, OLD);
        i.strategy = UpdateStrategyType::OnDelete;
        assert!(plan(&i).is_empty(), "{policy:?}");
        // Even a broken old pod is left to the user.
        pod_mut(&mut i, 2).ready = false;
        assert!(plan(&i).delete_pods.is_empty());
        // A pod the user deleted comes back at the update revision.
        i.pods.retain(|p| p.ordinal != 0);
        let p = plan(&i);
        assert_eq!(created(&p), vec![(0, NEW)]);
    }
}

#[test]
fn pods_without_a_revision_label_are_updated() {
    let mut i = all_ready(Parallel, 2, OLD);
    for p in &mut i.pods {
        p.revision = None;
    }
    assert_eq!(deleted(&plan(&i)), vec![("web-1", Update)]);
}

// --- kubernetes#67250: broken pods of an old revision ---

#[test]
fn a_broken_old_pod_is_replaced_without_waiting_in_ordered_ready() {
    // web-2 was rolled to a broken revision; the user then fixed the template (NEW).
    let mut i = all_ready(OrderedReady, 3, OLD);
    pod_mut(&mut i, 2).revision = Some("web-broken".into());
    pod_mut(&mut i, 2).ready = false;
    let p = plan(&i);
    assert_eq!(deleted(&p), vec![("web-2", BrokenOldRevision)]);

    // StatefulSet would wait for web-2 forever; AppSet recreates it at NEW next.
    i.pods.retain(|p| p.ordinal != 2);
    assert_eq!(created(&plan(&i)), vec![(2, NEW)]);
}

#[test]
fn broken_old_pods_are_replaced_within_the_budget_not_all_at_once() {
    // Every pod unready (a dependency outage), then a template change: one replacement at a
    // time, highest first, never the whole set.
    for policy in [OrderedReady, Parallel] {
        let mut i = all_ready(policy, 5, OLD);
        for p in &mut i.pods {
            p.ready = false;
        }
        assert_eq!(
            deleted(&plan(&i)),
            vec![("web-4", BrokenOldRevision)],
            "{policy:?}"
        );
    }
    // Parallel with room for two replaces two broken pods, highest first, before any healthy
    // one; OrderedReady replaces only the highest old pod.
    let mut i = all_ready(Parallel, 4, OLD);
    i.max_unavailable = 2;
    pod_mut(&mut i, 1).ready = false;
    pod_mut(&mut i, 3).ready = false;
    pod_mut(&mut i, 3).phase = PodPhase::Pending;
    assert_eq!(
        deleted(&plan(&i)),
        vec![("web-3", BrokenOldRevision), ("web-1", BrokenOldRevision)]
    );
    i.policy = OrderedReady;
    assert_eq!(deleted(&plan(&i)), vec![("web-3", BrokenOldRevision)]);
}

#[test]
fn a_healthy_pod_is_not_taken_down_while_an_old_pod_is_unavailable() {
    // web-0 is unready on its own; taking web-2 down too would put two of three down.
    let mut i = all_ready(Parallel, 3, OLD);
    pod_mut(&mut i, 0).ready = false;
    i.max_unavailable = 1;
    let p = plan(&i);
    // The broken web-0 goes first (it is down already); web-2 waits.
    assert_eq!(deleted(&p), vec![("web-0", BrokenOldRevision)]);
    // OrderedReady keeps its order: web-2 is next, and waits for web-0.
    i.policy = OrderedReady;
    let p = plan(&i);
    assert!(p.delete_pods.is_empty(), "{p:?}");
    assert_eq!(p.waiting, Some(Wait::PodNotReady("web-0".into())));
}

#[test]
fn a_broken_pod_of_the_update_revision_is_waited_for() {
    let mut i = all_ready(OrderedReady, 3, OLD);
    pod_mut(&mut i, 2).revision = Some(NEW.into());
    pod_mut(&mut i, 2).ready = false;
    let p = plan(&i);
    assert!(p.delete_pods.is_empty());
    assert_eq!(p.waiting, Some(Wait::PodNotReady("web-2".into())));
}

#[test]
fn a_broken_pod_below_the_partition_is_not_replaced() {
    let mut i = all_ready(Parallel, 3, OLD);
    i.partition = 2;
    pod_mut(&mut i, 0).ready = false;
    pod_mut(&mut i, 2).revision = Some(NEW.into());
    assert!(plan(&i).delete_pods.is_empty());
}

#[test]
fn broken_then_fixed_rollout_completes_step_by_step() {
    // Simulates the controller loop: each step applies the plan to the fixture.
    let mut i = all_ready(OrderedReady, 3, OLD);
    i.update_revision = "web-broken".into();
    // Step 1: web-2 is replaced by the broken revision, which never becomes Ready.
    assert_eq!(deleted(&plan(&i)), vec![("web-2", Update)]);
    i.pods.retain(|p| p.ordinal != 2);
    assert_eq!(created(&plan(&i)), vec![(2, "web-broken")]);
    ready(&mut i, 2, "web-broken");
    i.claims.pop();
    pod_mut(&mut i, 2).ready = false;
    assert!(
        plan(&i).is_empty(),
        "stuck on the broken revision, as expected"
    );
    // Step 2: the fixed template becomes the update revision.
    i.update_revision = NEW.into();
    let mut steps = 0;
    loop {
        steps += 1;
        assert!(steps < 20, "rollout did not converge: {i:?}");
        let p = plan(&i);
        if p.is_empty() {
            break;
        }
        for d in &p.delete_pods {
            i.pods.retain(|x| x.name != d.name);
        }
        for c in &p.create_pods {
            i.pods.push(PodInfo {
                name: c.name.clone(),
                uid: format!("uid-{}-new", c.ordinal),
                ordinal: c.ordinal,
                revision: Some(c.revision.clone()),
                phase: PodPhase::Running,
                ready: true,
                ready_since: Some(NOW - 3600),
                terminating: false,
            });
        }
    }
    assert!(
        i.pods
            .iter()
            .all(|p| p.revision.as_deref() == Some(NEW) && p.ready),
        "{i:?}"
    );
    assert_eq!(i.pods.len(), 3);
}

#[test]
fn a_full_rolling_update_converges_with_each_policy_and_budget() {
    for policy in [OrderedReady, Parallel] {
        for max_unavailable in [1, 2, 5] {
            for partition in [0, 2] {
                let mut i = all_ready(policy, 5, OLD);
                i.max_unavailable = max_unavailable;
                i.partition = partition;
                let mut order = vec![];
                for _ in 0..30 {
                    let p = plan(&i);
                    if p.is_empty() {
                        break;
                    }
                    assert!(
                        p.delete_pods.len() <= max_unavailable as usize,
                        "{policy:?} {max_unavailable}"
                    );
                    for d in &p.delete_pods {
                        order.push(d.name.clone());
                        i.pods.retain(|x| x.name != d.name);
                    }
                    for c in &p.create_pods {
                        i.pods.push(PodInfo {
                            name: c.name.clone(),
                            uid: format!("uid-{}-new", c.ordinal),
                            ordinal: c.ordinal,
                            revision: Some(c.revision.clone()),
                            phase: PodPhase::Running,
                            ready: true,
                            ready_since: Some(NOW - 3600),
                            terminating: false,
                        });
                    }
                }
                let expected: Vec<String> =
                    (partition..5).rev().map(|o| format!("web-{o}")).collect();
                assert_eq!(
                    order, expected,
                    "{policy:?} mu={max_unavailable} p={partition}"
                );
                for p in &i.pods {
                    let want = if p.ordinal < partition { OLD } else { NEW };
                    assert_eq!(p.revision.as_deref(), Some(want));
                }
            }
        }
    }
}

// --- every combination, checked against the invariants ---

/// Builds a fixture: `existing` pods (ordinals 0..existing) of `OLD`, Ready, with claims; one
/// optionally Failed and one optionally terminating.
#[allow(clippy::too_many_arguments)] // one argument per dimension of the combination
fn combo(
    policy: PodManagementPolicy,
    strategy: UpdateStrategyType,
    replicas: i32,
    existing: i32,
    partition: i32,
    max_unavailable: i32,
    failed: Option<i32>,
    terminating: Option<i32>,
) -> PlanInput {
    let mut i = input(policy, replicas);
    i.strategy = strategy;
    i.partition = partition;
    i.max_unavailable = max_unavailable;
    for o in 0..existing {
        ready(&mut i, o, OLD);
    }
    if let Some(o) = failed.filter(|o| *o < existing) {
        pod_mut(&mut i, o).phase = PodPhase::Failed;
        pod_mut(&mut i, o).ready = false;
    }
    if let Some(o) = terminating.filter(|o| *o < existing) {
        pod_mut(&mut i, o).terminating = true;
    }
    i
}

#[test]
fn invariants_hold_for_every_combination() {
    let mut cases = 0;
    for policy in [OrderedReady, Parallel] {
        for strategy in [
            UpdateStrategyType::RollingUpdate,
            UpdateStrategyType::OnDelete,
        ] {
            for (replicas, existing) in [(4, 0), (4, 2), (4, 4), (2, 4), (0, 3)] {
                for partition in [0, 1, 3, 5] {
                    for max_unavailable in [1, 2, 4] {
                        for failed in [None, Some(0), Some(3)] {
                            for terminating in [None, Some(1), Some(3)] {
                                let i = combo(
                                    policy,
                                    strategy,
                                    replicas,
                                    existing,
                                    partition,
                                    max_unavailable,
                                    failed,
                                    terminating,
                                );
                                check_invariants(&i, &plan(&i));
                                cases += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    assert_eq!(cases, 2 * 2 * 5 * 4 * 3 * 3 * 3);
}

fn check_invariants(i: &PlanInput, p: &Plan) {
    let ctx = format!("{i:?}\n=> {p:?}");
    let pod = |o: i32| i.pods.iter().find(|x| x.ordinal == o);
    let end = i.start_ordinal + i.replicas;
    // Never create a pod whose name is taken, never outside the range.
    for c in &p.create_pods {
        assert!(pod(c.ordinal).is_none(), "duplicate pod: {ctx}");
        assert!(c.ordinal >= i.start_ordinal && c.ordinal < end, "{ctx}");
        // Never on a claim that still names a (gone) pod as its owner: the garbage collector
        // would delete it under the new pod.
        assert!(
            !i.claims
                .iter()
                .any(|x| x.ordinal == c.ordinal && x.owners.pod.is_some()),
            "pod created on a claim owned by a gone pod: {ctx}"
        );
        // Its claims exist or are created in the same plan.
        let claimed = i.claims.iter().any(|x| x.ordinal == c.ordinal)
            || p.create_claims.iter().any(|x| x.ordinal == c.ordinal);
        assert!(claimed, "pod without claim: {ctx}");
        // Below the partition: the current revision; otherwise the update revision.
        let want = if i.strategy == UpdateStrategyType::RollingUpdate
            && c.ordinal - i.start_ordinal < i.partition
        {
            OLD
        } else {
            NEW
        };
        assert_eq!(c.revision, want, "{ctx}");
    }
    // Never delete a terminating pod, never twice.
    let mut names = BTreeSet::new();
    for d in &p.delete_pods {
        let target = i
            .pods
            .iter()
            .find(|x| x.name == d.name)
            .unwrap_or_else(|| panic!("deleting an unknown pod: {ctx}"));
        assert!(!target.terminating, "{ctx}");
        assert!(names.insert(d.name.clone()), "{ctx}");
        match d.reason {
            DeleteReason::Update | DeleteReason::BrokenOldRevision => {
                assert_eq!(i.strategy, UpdateStrategyType::RollingUpdate, "{ctx}");
                assert!(target.ordinal - i.start_ordinal >= i.partition, "{ctx}");
                assert_ne!(target.revision.as_deref(), Some(NEW), "{ctx}");
            }
            DeleteReason::ScaleDown => assert!(target.ordinal >= end, "{ctx}"),
            DeleteReason::Finished => assert!(target.is_finished(), "{ctx}"),
        }
    }
    // Update deletions: highest first, and only healthy pods count against the budget.
    let updates: Vec<i32> = p
        .delete_pods
        .iter()
        .filter(|d| d.reason == DeleteReason::Update)
        .filter_map(|d| i.pods.iter().find(|x| x.name == d.name).map(|x| x.ordinal))
        .collect();
    assert!(updates.windows(2).all(|w| w[0] > w[1]), "{ctx}");
    assert!(updates.len() as i32 <= i.max_unavailable, "{ctx}");
    if !updates.is_empty() {
        let unavailable_after = (i.start_ordinal..end)
            .filter(|o| match pod(*o) {
                None => true,
                Some(x) => {
                    x.terminating
                        || !x.is_available(i.min_ready_seconds, i.now)
                        || p.delete_pods.iter().any(|d| d.name == x.name)
                }
            })
            .count() as i32;
        let broken = p
            .delete_pods
            .iter()
            .filter(|d| {
                matches!(
                    d.reason,
                    DeleteReason::BrokenOldRevision | DeleteReason::Finished
                )
            })
            .count() as i32;
        let was_unavailable = unavailable_after - updates.len() as i32 - broken;
        assert!(
            was_unavailable + updates.len() as i32 <= i.max_unavailable,
            "budget exceeded: {ctx}"
        );
    }
    if i.policy == OrderedReady {
        assert!(p.create_pods.len() <= 1, "{ctx}");
        let scale_downs = p
            .delete_pods
            .iter()
            .filter(|d| d.reason == DeleteReason::ScaleDown)
            .count();
        assert!(scale_downs <= 1, "{ctx}");
        // A pod is created only when every lower pod is available.
        for c in &p.create_pods {
            for o in i.start_ordinal..c.ordinal {
                let ok = pod(o).is_some_and(|x| {
                    x.is_available(i.min_ready_seconds, i.now)
                        && !p.delete_pods.iter().any(|d| d.name == x.name)
                });
                assert!(ok, "created past an unavailable pod: {ctx}");
            }
        }
    } else {
        // Parallel: every missing slot whose claims are usable gets a pod.
        for o in i.start_ordinal..end {
            let unusable = i
                .claims
                .iter()
                .any(|x| x.ordinal == o && (x.terminating || x.owners.pod.is_some()));
            if pod(o).is_none() && !unusable {
                assert!(p.create_pods.iter().any(|c| c.ordinal == o), "{ctx}");
            }
            if pod(o).is_none() && unusable {
                assert!(!p.create_pods.iter().any(|c| c.ordinal == o), "{ctx}");
            }
        }
    }
}

#[test]
fn update_deletions_go_one_at_a_time_others_in_bursts() {
    let deletion = |reason| PodDeletion {
        name: "web-1".into(),
        uid: "u1".into(),
        reason,
    };
    let mut p = Plan::default();
    assert_eq!(p.deletion_concurrency(32), 32);
    p.delete_pods = vec![
        deletion(DeleteReason::ScaleDown),
        deletion(DeleteReason::Finished),
    ];
    assert_eq!(p.deletion_concurrency(32), 32);
    assert_eq!(p.deletion_concurrency(0), 1);
    p.delete_pods.push(deletion(DeleteReason::Update));
    assert_eq!(p.deletion_concurrency(32), 1);
}

#[test]
fn requeue_is_the_soonest_delay_within_one_second_and_five_minutes() {
    assert_eq!(requeue_after([None, None]), MAX_REQUEUE_SECONDS);
    assert_eq!(requeue_after([Some(30), Some(10)]), 10);
    assert_eq!(requeue_after([Some(0), None]), 1);
    assert_eq!(requeue_after([Some(-5)]), 1);
    assert_eq!(requeue_after([Some(10_000)]), MAX_REQUEUE_SECONDS);
}

#[test]
fn a_claim_still_owned_by_a_gone_pod_is_released_before_its_pod_is_created() {
    // Scaled 3 -> 1 with whenScaled: Delete, then quickly back to 3: web-2's claim still names
    // the deleted pod (uid-old-2) as its owner.
    for policy in [OrderedReady, Parallel] {
        let mut i = all_ready(policy, 2, NEW);
        i.replicas = 3;
        i.retention = Retention {
            when_deleted: RetentionPolicyType::Retain,
            when_scaled: RetentionPolicyType::Delete,
        };
        claim(&mut i, 2);
        i.claims[2].owners.pod = Some("uid-old-2".into());
        let p = plan(&i);
        assert!(created(&p).is_empty(), "{policy:?}: {p:?}");
        assert_eq!(
            p.claim_owner_updates,
            vec![ClaimOwnerUpdate {
                claim: "data-web-2".into(),
                pod_name: "web-2".into(),
                owners: ClaimOwners::default(),
            }],
            "{policy:?}"
        );
        assert_eq!(p.waiting, Some(Wait::ClaimOwnerRepair("data-web-2".into())));
        // Once released, the pod is created on the same claim.
        i.claims[2].owners.pod = None;
        let p = plan(&i);
        assert_eq!(created(&p), vec![(2, NEW)], "{policy:?}");
        assert!(claims_created(&p).is_empty());
    }
}

// --- the disruption budget, over generated sets ---

/// One slot of a generated set.
#[derive(Clone, Copy, Debug)]
enum Slot {
    Missing,
    /// (revision is the update revision, ready, ready long enough, terminating, failed)
    Pod(bool, bool, bool, bool, bool),
}

fn arb_slot() -> impl proptest::strategy::Strategy<Value = Slot> {
    use proptest::prelude::*;
    prop_oneof![
        1 => Just(Slot::Missing),
        6 => (any::<bool>(), any::<bool>(), any::<bool>(), proptest::bool::weighted(0.1), proptest::bool::weighted(0.1))
            .prop_map(|(new, ready, long, terminating, failed)| Slot::Pod(new, ready, long, terminating, failed)),
    ]
}

fn generated(
    policy: PodManagementPolicy,
    replicas: i32,
    slots: &[Slot],
    partition: i32,
    max_unavailable: i32,
    min_ready_seconds: i64,
) -> PlanInput {
    let mut i = input(policy, replicas);
    i.partition = partition;
    i.max_unavailable = max_unavailable;
    i.min_ready_seconds = min_ready_seconds;
    for (o, slot) in slots.iter().enumerate() {
        let o = o as i32;
        if let Slot::Missing = slot
            && o % 2 == 1
        {
            // Every other empty slot keeps a claim that still names its deleted pod.
            claim(&mut i, o);
            if let Some(c) = i.claims.last_mut() {
                c.owners.pod = Some(format!("uid-gone-{o}"));
            }
        }
        if let Slot::Pod(new, ready_now, long, terminating, failed) = *slot {
            ready(&mut i, o, if new { NEW } else { OLD });
            let p = pod_mut(&mut i, o);
            p.ready = ready_now && !failed;
            p.ready_since = Some(if long { NOW - 3600 } else { NOW - 5 });
            p.terminating = terminating;
            if failed {
                p.phase = PodPhase::Failed;
            }
        }
    }
    i
}

/// Checks the rolling update's disruption budget on one plan, computed independently of the
/// planner: the controller never has more than `max` slots in flight (missing, terminating,
/// deleted, or at the update revision and not yet available) once it deletes for the update,
/// never takes a healthy pod down while that would put more than `max` slots down, keeps
/// OrderedReady to the highest old pod, one at a time, and never stalls on a broken pod when
/// the budget has room.
fn check_budget(i: &PlanInput, p: &Plan) {
    let ctx = format!("{i:?}\n=> {p:?}");
    let end = i.start_ordinal + i.replicas;
    let max = if i.policy == OrderedReady {
        i.max_unavailable.min(1)
    } else {
        i.max_unavailable
    };
    let available = |x: &PodInfo| x.is_available(i.min_ready_seconds, i.now);
    let is_new = |x: &PodInfo| x.revision.as_deref() == Some(NEW);
    let deleted = |x: &PodInfo, reasons: &[DeleteReason]| {
        p.delete_pods
            .iter()
            .any(|d| d.name == x.name && reasons.contains(&d.reason))
    };
    let all = [
        DeleteReason::Finished,
        DeleteReason::ScaleDown,
        DeleteReason::Update,
        DeleteReason::BrokenOldRevision,
    ];
    let slot = |o: i32| i.pods.iter().find(|x| x.ordinal == o);
    // (in flight, down) counting the deletions in `reasons` as done.
    let count = |reasons: &[DeleteReason]| {
        let (mut in_flight, mut down) = (0, 0);
        for o in i.start_ordinal..end {
            match slot(o) {
                None => in_flight += 1,
                Some(x) if x.terminating || deleted(x, reasons) => in_flight += 1,
                Some(x) if available(x) => continue,
                Some(x) if is_new(x) => in_flight += 1,
                Some(_) => {}
            }
            down += 1;
        }
        (in_flight, down)
    };
    let updates: Vec<&PodDeletion> = p
        .delete_pods
        .iter()
        .filter(|d| {
            matches!(
                d.reason,
                DeleteReason::Update | DeleteReason::BrokenOldRevision
            )
        })
        .collect();
    for d in &updates {
        let x = i
            .pods
            .iter()
            .find(|x| x.name == d.name)
            .unwrap_or_else(|| panic!("{ctx}"));
        assert_eq!(
            d.reason == DeleteReason::Update,
            available(x),
            "Update is for available pods, BrokenOldRevision for the others: {ctx}"
        );
    }
    let (in_flight_after, down_after) = count(&all);
    if !updates.is_empty() {
        assert!(
            in_flight_after <= max,
            "{in_flight_after} slots in flight, budget {max}: {ctx}"
        );
    }
    if updates.iter().any(|d| d.reason == DeleteReason::Update) {
        assert!(
            down_after <= max,
            "a healthy pod taken down with {down_after} slots down, budget {max}: {ctx}"
        );
    }
    let candidates: Vec<&PodInfo> = (i.start_ordinal..end)
        .rev()
        .filter(|o| o - i.start_ordinal >= i.partition)
        .filter_map(slot)
        .filter(|x| !x.terminating && !deleted(x, &[DeleteReason::Finished]) && !is_new(x))
        .collect();
    if i.policy == OrderedReady {
        assert!(updates.len() <= 1, "OrderedReady: one at a time: {ctx}");
        if let Some(d) = updates.first() {
            assert_eq!(
                candidates.first().map(|x| x.name.as_str()),
                Some(d.name.as_str()),
                "OrderedReady replaces the highest old pod first: {ctx}"
            );
        }
    }
    // Liveness: with room in the budget, the next old pod is replaced (kubernetes#67250:
    // a broken one without waiting for it to become Ready).
    let condemned = i.pods.iter().any(|x| x.ordinal >= end);
    if i.strategy == UpdateStrategyType::RollingUpdate && !(i.policy == OrderedReady && condemned) {
        let (in_flight, down) = count(&[DeleteReason::Finished]);
        let next = if i.policy == OrderedReady {
            candidates.first().copied()
        } else {
            candidates
                .iter()
                .find(|x| !available(x))
                .or(candidates.first())
                .copied()
        };
        if let Some(x) = next {
            let room = if available(x) {
                down < max
            } else {
                in_flight < max
            };
            assert_eq!(!updates.is_empty(), room, "stalled or overran: {ctx}");
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
    #[test]
    fn the_disruption_budget_holds_for_generated_sets(
        ordered in proptest::bool::ANY,
        slots in proptest::collection::vec(arb_slot(), 0..9),
        replicas in 0i32..8,
        partition in 0i32..4,
        max_unavailable in 1i32..4,
        min_ready in proptest::sample::select(vec![0i64, 30]),
    ) {
        let policy = if ordered { OrderedReady } else { Parallel };
        let i = generated(policy, replicas, &slots, partition, max_unavailable, min_ready);
        let p = plan(&i);
        check_budget(&i, &p);
        check_invariants(&i, &p);
    }
}

#[test]
fn a_huge_replicas_plans_a_bounded_batch_and_walks_no_empty_range() {
    for policy in [Parallel, OrderedReady] {
        let mut i = input(policy, i32::MAX);
        for o in 0..3 {
            ready(&mut i, o, OLD);
        }
        let p = plan(&i);
        let want = if policy == Parallel {
            MAX_CREATIONS_PER_PLAN
        } else {
            1
        };
        assert_eq!(p.create_pods.len(), want, "{policy:?}");
        assert_eq!(p.create_claims.len(), want, "{policy:?}");
        assert_eq!(p.create_pods[0].ordinal, 3);
        // Two billion empty slots are in flight: nothing is taken down for the update.
        assert!(p.delete_pods.is_empty(), "{policy:?}");
        if policy == Parallel {
            assert_eq!(p.requeue_after, Some(1));
        }
    }
}

#[test]
fn work_in_flight_is_rechecked_soon_a_settled_set_rarely() {
    let settled = all_ready(Parallel, 3, NEW);
    let p = plan(&settled);
    assert!(p.is_empty() && p.waiting.is_none());
    assert_eq!(p.recheck_after(), None);
    assert_eq!(
        requeue_after([p.requeue_after, p.recheck_after()]),
        MAX_REQUEUE_SECONDS
    );
    let rolling = all_ready(Parallel, 3, OLD);
    let p = plan(&rolling);
    assert!(!p.delete_pods.is_empty());
    assert_eq!(
        requeue_after([p.requeue_after, p.recheck_after()]),
        BUSY_RECHECK_SECONDS
    );
}
