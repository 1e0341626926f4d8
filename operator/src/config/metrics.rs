//! Prometheus counters of the config rollout controller, registered into the operator's one
//! registry (served on `/metrics`). Labels carry workload kinds and outcomes, never names of
//! sources or anything derived from their data.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::index::WorkloadKind;

/// The workload kind label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `Deployment`, `StatefulSet` or `DaemonSet`.
    pub kind: KindValue,
}

/// The value of [`KindLabel`].
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum KindValue {
    /// A Deployment.
    Deployment,
    /// A StatefulSet.
    StatefulSet,
    /// A DaemonSet.
    DaemonSet,
}

impl From<WorkloadKind> for KindLabel {
    fn from(kind: WorkloadKind) -> Self {
        let kind = match kind {
            WorkloadKind::Deployment => KindValue::Deployment,
            WorkloadKind::StatefulSet => KindValue::StatefulSet,
            WorkloadKind::DaemonSet => KindValue::DaemonSet,
        };
        Self { kind }
    }
}

/// The controller's counters.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Rollouts triggered (pod template hash written).
    pub rollouts: Family<KindLabel, Counter>,
    /// Baselines recorded without a rollout (adoption, key rotation).
    pub baselines: Family<KindLabel, Counter>,
    /// Reconciles that failed (API errors); retried.
    pub errors: Family<KindLabel, Counter>,
    /// Reconciles blocked by a missing required source.
    pub missing_sources: Family<KindLabel, Counter>,
    /// Reconciles run.
    pub reconciles: Family<KindLabel, Counter>,
    /// Workloads currently opted in and indexed.
    pub workloads: Gauge,
    /// ConfigMaps and Secrets read (GET) to hash a workload.
    pub source_reads: Family<KindLabel, Counter>,
    /// Reconciles that reused the digests remembered for the workload and read no source.
    pub digests_reused: Family<KindLabel, Counter>,
    /// Sources whose own digest came from the cache (unchanged version), not from a GET.
    pub source_digests_reused: Family<KindLabel, Counter>,
}

impl Metrics {
    /// Creates the counters and registers them under `appset_config_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let sub = registry.sub_registry_with_prefix("appset_config");
        sub.register(
            "rollouts",
            "Rollouts triggered by changed ConfigMap or Secret data",
            m.rollouts.clone(),
        );
        sub.register(
            "baselines",
            "Baselines recorded without a rollout (adoption, key rotation)",
            m.baselines.clone(),
        );
        sub.register(
            "reconcile_errors",
            "Config rollout reconciles that failed and were retried",
            m.errors.clone(),
        );
        sub.register(
            "missing_sources",
            "Reconciles blocked by a missing required ConfigMap or Secret",
            m.missing_sources.clone(),
        );
        sub.register(
            "reconciles",
            "Config rollout reconciles run",
            m.reconciles.clone(),
        );
        sub.register(
            "workloads",
            "Workloads opted in to config rollout",
            m.workloads.clone(),
        );
        sub.register(
            "source_reads",
            "ConfigMaps and Secrets read to hash a workload's sources",
            m.source_reads.clone(),
        );
        sub.register(
            "digests_reused",
            "Reconciles that reused the remembered digests of a workload's sources and read none",
            m.digests_reused.clone(),
        );
        sub.register(
            "source_digests_reused",
            "Sources whose digest was taken from the cache (version unchanged) instead of read",
            m.source_digests_reused.clone(),
        );
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn counters_are_exported_with_the_kind_label() {
        let mut registry = Registry::default();
        let m = Metrics::register(&mut registry);
        m.rollouts
            .get_or_create(&WorkloadKind::StatefulSet.into())
            .inc();
        let mut out = String::new();
        encode(&mut out, &registry).unwrap();
        assert!(
            out.contains("appset_config_rollouts_total{kind=\"StatefulSet\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("# TYPE appset_config_workloads gauge"),
            "{out}"
        );
    }
}
