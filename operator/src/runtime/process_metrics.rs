//! The operator process's own metrics: `appset_build_info` (a gauge fixed at 1 whose labels
//! name the component and its version) and `appset_leader` (1 while this replica's controllers
//! run, 0 while it stands by for the Lease or after it gave the Lease up).
//!
//! [`super::run`] registers them beside the controllers' metrics and flips the leader gauge as
//! leader election moves; the `/metrics` endpoint serves them with the rest.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The labels of `appset_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// `operator`.
    pub component: String,
    /// The crate version the binary was built from.
    pub version: String,
}

/// The process-level metrics.
#[derive(Clone, Debug, Default)]
pub struct ProcessMetrics {
    /// 1 while this replica leads (or runs without leader election), else 0.
    pub leader: Gauge,
}

impl ProcessMetrics {
    /// Registers `appset_build_info` and `appset_leader` (starting at 0) in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                component: "operator".into(),
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        registry.register(
            "appset_build_info",
            "The operator's version: always 1, the labels carry the information",
            build,
        );
        registry.register(
            "appset_leader",
            "1 while this replica's controllers run (it holds the leader Lease, or runs without leader election), 0 otherwise",
            m.leader.clone(),
        );
        m
    }

    /// Records whether this replica leads now.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        encode(&mut out, registry).expect("encode");
        out
    }

    #[test]
    fn build_info_and_the_leader_gauge_are_exported() {
        let mut registry = Registry::default();
        let m = ProcessMetrics::register(&mut registry);
        let version = env!("CARGO_PKG_VERSION");
        let out = text(&registry);
        assert!(
            out.contains(&format!(
                "appset_build_info{{component=\"operator\",version=\"{version}\"}} 1"
            )),
            "{out}"
        );
        assert!(out.contains("appset_leader 0"), "{out}");
        m.set_leader(true);
        assert!(text(&registry).contains("appset_leader 1"));
        m.set_leader(false);
        assert!(text(&registry).contains("appset_leader 0"));
    }
}
