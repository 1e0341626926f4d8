//! One reconcile of an AppSet, as a short sequence of named steps. Each step either reads
//! ([`observe`]), decides (the pure modules) or writes ([`execute`]):
//!
//! 0. **Fresh read**: GET the AppSet, so that the status it decides from (current revision,
//!    collision count, pacing) is what the last reconcile wrote, not a cache's older copy.
//! 1. **Service**: apply the headless Service when `service: Managed`.
//! 2. **Config**: with `configRollout`, the digest of the ConfigMaps and Secrets the template
//!    references ([`observe::config_hash`]), paced by [`pacing::pace`]: a change is taken once
//!    the coalescing window and the minimum interval allow it, the state kept on the status.
//! 3. **Revisions**: list the ControllerRevisions, let [`revision`] pick (create, reuse) the
//!    update revision and make it exist.
//! 4. **Observe**: list the pods (adopting orphans) and the claims (labelling adopted ones).
//! 5. **Plan and execute**: [`plan::plan`] decides, [`execute::plan`] carries it out.
//! 6. **Claims**: compare claims with their templates, expand those that may grow.
//! 7. **History**: prune revisions beyond `revisionHistoryLimit`.
//! 8. **Status**: compute it ([`status`]) and write it only when it changed.
//!
//! An AppSet being deleted is left to the garbage collector: pods, revisions and the Service
//! go with it through their owner references; claims only if `whenDeleted: Delete` made the
//! AppSet their owner.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use appset_crds::appset::{AppSetStatus, PodManagementPolicy, UpdateStrategyType};
use appset_crds::{AppSet, keys};

use super::controller::{Context, Error};
use super::execute::{self, Templates};
use super::observe::{self, Claim, Target};
use super::plan::{self, PlanInput, PodInfo};
use super::{revision, status};
use crate::config::snapshot;
use crate::confighash::discovery::SourceName;
use crate::confighash::rotation::Observed;
use crate::pacing::{self, Paced};

/// The revisions as step 3 left them.
struct Revisions {
    listed: Vec<k8s_openapi::api::apps::v1::ControllerRevision>,
    infos: Vec<revision::RevisionInfo>,
    current: String,
    update: String,
    collision_count: i32,
    templates: Templates,
}

/// Reconciles one AppSet; the caller adds the tracing span and the backoff.
pub async fn reconcile(cached: &AppSet, ctx: &Context) -> Result<Action, Error> {
    let t = Target::of(cached)?;
    // The cached copy may lag behind the status this controller wrote last: read the AppSet
    // afresh, so that `currentRevision` and `collisionCount` are never stale.
    let Some(fresh) = observe::fresh(ctx, &t).await? else {
        return Ok(Action::await_change());
    };
    let set = &fresh;
    if set.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let previous = set.status.as_ref();
    let now = Timestamp::now();

    execute::service(ctx, set, &t).await?;
    let (paced, config_digest, pins) = if set.spec.config_rollout {
        let fresh = observe::config_hash(ctx, set, &t, previous).await?;
        let recorded = previous.and_then(|s| s.config_hash.as_deref());
        let paced = pacing::pace(
            &ctx.settings.pacing,
            recorded,
            fresh.as_ref().map(|c| c.config.token.as_str()),
            &recorded_pacing(previous),
            now.as_second(),
        );
        // The digest recorded is the one the token in use stands for: a change that waits for
        // its window keeps the digest of the data before it, so it is not taken as seen.
        let digest = match (&fresh, &paced.hash) {
            (Some(c), Some(token)) if *token == c.config.token => c
                .config
                .digest
                .as_ref()
                .map(Observed::to_annotation)
                .or_else(|| previous.and_then(|s| s.config_digest.clone())),
            _ => previous.and_then(|s| s.config_digest.clone()),
        };
        let pins = pin_choice(ctx, set, &t, fresh.as_ref(), paced.hash.as_deref()).await?;
        (paced, digest, pins)
    } else {
        (Paced::default(), None, Pins::Off)
    };
    let config_hash = paced.hash.clone();
    let revs = revisions(ctx, set, &t, config_hash.as_deref(), pins, previous).await?;

    let pods: Vec<PodInfo> = observe::pods(ctx, set, &t).await?;
    let claims = observe::claims(ctx, set, &t).await?;

    let input = plan_input(set, &t, &revs, &pods, &claims, now.as_second());
    let decided = plan::plan(&input);
    let burst = match set.spec.pod_management_policy {
        PodManagementPolicy::Parallel => ctx.settings.burst,
        PodManagementPolicy::OrderedReady => 1,
    };
    execute::plan(ctx, set, &t, &decided, &claims, &revs.templates, burst).await?;

    let claim_status = execute::claims(ctx, set, &t, &claims, previous).await?;

    let live: BTreeSet<String> = pods
        .iter()
        .filter_map(|p| p.revision.clone())
        .chain([revs.current.clone(), revs.update.clone()])
        .collect();
    let prune = revision::revisions_to_prune(&revs.infos, &live, set.spec.revision_history_limit);
    let pruned: BTreeSet<String> = prune.iter().cloned().collect();
    execute::prune_revisions(ctx, &t, &revs.listed, prune).await?;
    if set.spec.config_snapshots && ctx.settings.snapshots {
        // The revisions take over the copies they name; the garbage collector removes a copy
        // with the last pruned revision that names it.
        // The revisions listed above, less those just pruned (a newly made one is taken over
        // at the next reconcile).
        let kept: Vec<_> = revs
            .listed
            .iter()
            .filter(|r| {
                r.metadata
                    .name
                    .as_ref()
                    .is_some_and(|n| !pruned.contains(n))
            })
            .cloned()
            .collect();
        let adoption = snapshot::adopt(
            &ctx.client,
            &t.ns,
            &t.uid,
            snapshot::pinned_revisions(&kept, &t.uid),
        )
        .await
        .map_err(|source| Error::Kube {
            what: format!(
                "hand the config snapshots of AppSet {}/{} to its revisions",
                t.ns, t.name
            ),
            source,
        })?;
        if !adoption.missing.is_empty() {
            ctx.event(
                set,
                EventType::Warning,
                "ConfigSnapshotMissing",
                "PinConfig",
                format!(
                    "Config snapshots named by a revision of this AppSet were deleted: {}. Pods of that revision cannot start until they exist; the current revision's are recreated while its sources hold the same data",
                    adoption.missing.join(", ")
                ),
            )
            .await;
        }
    }

    let waiting = decided.waiting.as_ref().map(ToString::to_string);
    let outcome = status::compute(&status::StatusInput {
        generation: set.metadata.generation,
        replicas: set.spec.replicas,
        start_ordinal: set.spec.start_ordinal(),
        strategy: set.spec.update_strategy.type_,
        partition: input.partition,
        max_unavailable: input.max_unavailable,
        min_ready_seconds: i64::from(set.spec.min_ready_seconds),
        progress_deadline_seconds: i64::from(set.spec.progress_deadline_seconds),
        pods: &pods,
        current_revision: &revs.current,
        update_revision: &revs.update,
        collision_count: revs.collision_count,
        label_selector: super::build::selector_string(&set.spec.selector),
        config_hash,
        config_digest,
        config_rollout_time: paced.rolled_at.and_then(time_at),
        pending_config_since: paced.pending_since.and_then(time_at),
        volume_claim_templates: claim_status,
        waiting: waiting.clone(),
        previous,
        now: Time(now),
    });
    if outcome.stalled_now {
        ctx.event(
            set,
            EventType::Warning,
            status::PROGRESS_DEADLINE_EXCEEDED,
            "Rollout",
            format!(
                "rollout to revision {} made no progress for {}s: {}",
                revs.update,
                set.spec.progress_deadline_seconds,
                waiting.as_deref().unwrap_or("pods are not available")
            ),
        )
        .await;
    }
    if previous != Some(&outcome.status) {
        execute::status(ctx, &t, &outcome.status).await?;
    }
    let after = plan::requeue_after([
        decided.requeue_after,
        decided.recheck_after(),
        outcome.check_deadline_after,
        paced.wait,
    ]);
    Ok(Action::requeue(Duration::from_secs(after.unsigned_abs())))
}

/// What the status recorded about config-driven rollouts.
fn recorded_pacing(previous: Option<&AppSetStatus>) -> Paced {
    let secs = |t: &Option<Time>| t.as_ref().map(|t| t.0.as_second());
    Paced {
        hash: previous.and_then(|s| s.config_hash.clone()),
        pending_since: previous.and_then(|s| secs(&s.pending_config_since)),
        rolled_at: previous.and_then(|s| secs(&s.config_rollout_time)),
        wait: None,
    }
}

fn time_at(seconds: i64) -> Option<Time> {
    Timestamp::from_second(seconds).ok().map(Time)
}

/// Step 3: the update revision (created or reused as needed), the current one, and every
/// revision's template.
/// Which config snapshots the revision's template is pinned to.
enum Pins {
    /// None: `configSnapshots` is off (or not allowed).
    Off,
    /// The copies of the data the token in use stands for, read now (and created).
    Now(BTreeMap<SourceName, String>),
    /// Those of the revision already made for the token in use: the data read now waits for
    /// its window, or could not all be read.
    Kept,
}

/// With `configSnapshots`: creates the copies of the data read now when the token in use
/// stands for it, before any revision names them.
async fn pin_choice(
    ctx: &Context,
    set: &AppSet,
    t: &Target,
    fresh: Option<&observe::ConfigNow>,
    token: Option<&str>,
) -> Result<Pins, Error> {
    if !set.spec.config_snapshots {
        return Ok(Pins::Off);
    }
    if !ctx.settings.snapshots {
        ctx.event(
            set,
            EventType::Warning,
            "ConfigSnapshotsUnavailable",
            "PinConfig",
            "Rolling out without snapshots: config snapshots are not enabled in this operator (--config-snapshots, chart value operator.configSnapshots)".to_string(),
        )
        .await;
        return Ok(Pins::Off);
    }
    match (fresh, token) {
        (
            Some(observe::ConfigNow {
                config,
                pins: Some((sources, pins)),
            }),
            Some(token),
        ) if config.token == token => {
            let owner = OwnerReference {
                api_version: "appset.dev/v1alpha1".into(),
                kind: "AppSet".into(),
                name: t.name.clone(),
                uid: t.uid.clone(),
                ..Default::default()
            };
            snapshot::ensure(&ctx.client, &t.ns, sources, pins, &owner)
                .await
                .map_err(|source| Error::Kube {
                    what: format!("create the config snapshots of AppSet {}/{}", t.ns, t.name),
                    source,
                })?;
            Ok(Pins::Now(pins.clone()))
        }
        (_, Some(_)) => Ok(Pins::Kept),
        _ => Ok(Pins::Off),
    }
}

async fn revisions(
    ctx: &Context,
    set: &AppSet,
    t: &Target,
    config_hash: Option<&str>,
    pins: Pins,
    previous: Option<&AppSetStatus>,
) -> Result<Revisions, Error> {
    let listed = observe::revisions(ctx, t).await?;
    let infos = observe::revision_infos(&listed);
    let pins = match pins {
        Pins::Off => None,
        Pins::Now(p) => Some(p),
        Pins::Kept => infos
            .iter()
            .filter_map(|r| revision::template_of(&r.data))
            .filter_map(|tmpl| tmpl.metadata?.annotations)
            .find(|a| a.get(keys::CONFIG_HASH).map(String::as_str) == config_hash)
            .and_then(|a| {
                a.get(keys::CONFIG_SNAPSHOTS)
                    .map(|v| snapshot::pins_from_annotation(v))
            }),
    };
    let template = revision::effective_template(&set.spec.template, config_hash, pins.as_ref());
    let data = revision::revision_data(&template);
    let collision_before = previous.and_then(|s| s.collision_count).unwrap_or(0);
    let (choice, collision_count) =
        revision::choose_update_revision(&t.name, &data, &infos, collision_before);
    execute::update_revision(ctx, set, t, &listed, &choice, &data).await?;
    let update = choice.name().to_string();
    let current = revision::current_revision(
        previous.and_then(|s| s.current_revision.as_deref()),
        &infos,
        &update,
    );
    let mut by_revision: BTreeMap<_, _> = infos
        .iter()
        .filter_map(|r| revision::template_of(&r.data).map(|tmpl| (r.name.clone(), tmpl)))
        .collect();
    by_revision.insert(update.clone(), template);
    Ok(Revisions {
        listed,
        infos,
        current,
        collision_count,
        templates: Templates {
            by_revision,
            update_revision: update.clone(),
        },
        update,
    })
}

/// What the planner decides from.
fn plan_input(
    set: &AppSet,
    t: &Target,
    revs: &Revisions,
    pods: &[PodInfo],
    claims: &BTreeMap<String, Claim>,
    now: i64,
) -> PlanInput {
    let spec = &set.spec;
    let max_unavailable = plan::resolve_max_unavailable(
        spec.update_strategy
            .rolling_update
            .as_ref()
            .and_then(|r| r.max_unavailable.as_ref()),
        spec.replicas,
    );
    let partition = match spec.update_strategy.type_ {
        UpdateStrategyType::RollingUpdate => spec.partition(),
        UpdateStrategyType::OnDelete => 0,
    };
    PlanInput {
        set_name: t.name.clone(),
        replicas: spec.replicas,
        start_ordinal: spec.start_ordinal(),
        policy: spec.pod_management_policy,
        strategy: spec.update_strategy.type_,
        partition,
        max_unavailable,
        min_ready_seconds: i64::from(spec.min_ready_seconds),
        retention: spec.persistent_volume_claim_retention_policy.clone(),
        claim_templates: observe::template_names(set),
        current_revision: revs.current.clone(),
        update_revision: revs.update.clone(),
        now,
        pods: pods.to_vec(),
        claims: observe::claim_infos(t, claims),
    }
}
