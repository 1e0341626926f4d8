//! Prometheus metrics of the webhook, served at `/metrics`.
//!
//! * `appset_webhook_admission_duration_seconds`: histogram of the time from a complete request
//!   body to the encoded response, labelled by `outcome` (`/mutate-pods`: `injected`, `denied`,
//!   `unchanged`; `/pin-config`: `pinned`, `pin_denied`, `pin_unchanged`; either: `invalid`,
//!   `error`);
//! * `appset_webhook_injections_total`: pods patched;
//! * `appset_webhook_denials_total`: pods denied for a conflict;
//! * `appset_webhook_errors_total`: requests to either route that could not be reviewed, by `kind`
//!   (`bad_request`, `invalid_object`, `body`, and `unauthenticated` for a review refused for want of
//!   a client certificate when a client CA is configured);
//! * `appset_webhook_skipped_total`: pods allowed unchanged by `/mutate-pods`, by `reason`;
//! * `appset_webhook_pinned_total`: pods whose ConfigMap and Secret references `/pin-config`
//!   rewrote to their snapshots;
//! * `appset_webhook_pin_denials_total`: pods `/pin-config` denied for a malformed
//!   `appset.dev/config-snapshots` annotation;
//! * `appset_webhook_pin_skipped_total`: pods `/pin-config` allowed unchanged, by `reason`
//!   (`not_pod_create`, `no_annotation`, `nothing_to_do`);
//! * `appset_webhook_namespace_cache_stale_total`: requests the API server sent for a namespace
//!   the webhook's namespace cache did not (yet) show as opted in; they are reviewed as usual;
//! * `appset_webhook_certificate_expiry_timestamp_seconds`: expiry (unix seconds) of each
//!   certificate the replica serves or trusts, by `cert` (`ca`, `serving`, `next-ca`,
//!   `previous-ca`; the last two only during a CA rotation);
//! * `appset_webhook_certificate_secret_damaged_total`: times the certificate Secret was found
//!   damaged and repaired or restored.
//!
//! Labels are drawn from fixed sets: no pod, namespace or Secret data reaches a metric.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::admission::{Decision, PinDecision, PinSkip, Skip};

type Labels = Vec<(&'static str, &'static str)>;

/// The webhook's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    latency: Family<Labels, Histogram>,
    injections: Counter,
    denials: Counter,
    errors: Family<Labels, Counter>,
    skipped: Family<Labels, Counter>,
    pinned: Counter,
    pin_denials: Counter,
    pin_skipped: Family<Labels, Counter>,
    /// Requests whose namespace the cache did not show as opted in.
    pub namespace_cache_stale: Counter,
    tls: TlsMetrics,
}

/// The certificate loop's metrics (cheap clones sharing the registry's values).
#[derive(Clone, Default)]
pub struct TlsMetrics {
    /// Expiry of each certificate, by `cert`.
    pub expiry: Family<Labels, Gauge>,
    /// Damaged certificate Secrets found.
    pub secret_damaged: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("appset_webhook");
        let latency = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
        });
        let injections = Counter::default();
        let denials = Counter::default();
        let errors = Family::<Labels, Counter>::default();
        let skipped = Family::<Labels, Counter>::default();
        registry.register(
            "admission_duration_seconds",
            "Time to review one admission request",
            latency.clone(),
        );
        registry.register(
            "injections",
            "Pods patched by the webhook",
            injections.clone(),
        );
        registry.register(
            "denials",
            "Pods denied for an injection conflict",
            denials.clone(),
        );
        registry.register(
            "errors",
            "Requests that could not be reviewed",
            errors.clone(),
        );
        registry.register(
            "skipped",
            "Pods allowed unchanged by /mutate-pods",
            skipped.clone(),
        );
        let pinned = Counter::default();
        let pin_denials = Counter::default();
        let pin_skipped = Family::<Labels, Counter>::default();
        registry.register(
            "pinned",
            "Pods whose ConfigMap and Secret references were rewritten to their snapshots",
            pinned.clone(),
        );
        registry.register(
            "pin_denials",
            "Pods denied for a malformed config-snapshots annotation",
            pin_denials.clone(),
        );
        registry.register(
            "pin_skipped",
            "Pods allowed unchanged by /pin-config",
            pin_skipped.clone(),
        );
        let namespace_cache_stale = Counter::default();
        registry.register(
            "namespace_cache_stale",
            "Requests for a namespace the namespace cache did not show as opted in (reviewed as usual)",
            namespace_cache_stale.clone(),
        );
        let tls = TlsMetrics::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "Expiry of each certificate the webhook serves or trusts, in unix seconds",
            tls.expiry.clone(),
        );
        registry.register(
            "certificate_secret_damaged",
            "Times the certificate Secret was found damaged and repaired or restored",
            tls.secret_damaged.clone(),
        );
        Self {
            tls,
            registry,
            latency,
            injections,
            denials,
            errors,
            skipped,
            pinned,
            pin_denials,
            pin_skipped,
            namespace_cache_stale,
        }
    }

    /// The certificate loop's metrics.
    pub fn tls(&self) -> TlsMetrics {
        self.tls.clone()
    }

    /// Records one reviewed request.
    pub fn observe(&self, decision: &Decision, seconds: f64) {
        let outcome = match decision {
            Decision::Allow { skip, .. } => {
                let reason = match skip {
                    Skip::NotPodCreate => "not_pod_create",
                    Skip::OptedOut => "opted_out",
                    Skip::NothingToDo => "nothing_to_do",
                };
                self.skipped.get_or_create(&vec![("reason", reason)]).inc();
                "unchanged"
            }
            Decision::Inject { .. } => {
                self.injections.inc();
                "injected"
            }
            Decision::Deny { .. } => {
                self.denials.inc();
                "denied"
            }
            Decision::Invalid { .. } => {
                self.errors
                    .get_or_create(&vec![("kind", "invalid_object")])
                    .inc();
                "invalid"
            }
        };
        self.latency
            .get_or_create(&vec![("outcome", outcome)])
            .observe(seconds);
    }

    /// Records one request reviewed by `/pin-config`.
    pub fn observe_pin(&self, decision: &PinDecision, seconds: f64) {
        let outcome = match decision {
            PinDecision::Allow { skip, .. } => {
                let reason = match skip {
                    PinSkip::NotPodCreate => "not_pod_create",
                    PinSkip::NoAnnotation => "no_annotation",
                    PinSkip::NothingToDo => "nothing_to_do",
                };
                self.pin_skipped
                    .get_or_create(&vec![("reason", reason)])
                    .inc();
                "pin_unchanged"
            }
            PinDecision::Pin { .. } => {
                self.pinned.inc();
                "pinned"
            }
            PinDecision::Deny { .. } => {
                self.pin_denials.inc();
                "pin_denied"
            }
            PinDecision::Invalid { .. } => {
                self.errors
                    .get_or_create(&vec![("kind", "invalid_object")])
                    .inc();
                "invalid"
            }
        };
        self.latency
            .get_or_create(&vec![("outcome", outcome)])
            .observe(seconds);
    }

    /// Records a request that was not a reviewable AdmissionReview (`kind`: `bad_request` or
    /// `body`).
    pub fn error(&self, kind: &'static str, seconds: f64) {
        self.errors.get_or_create(&vec![("kind", kind)]).inc();
        self.latency
            .get_or_create(&vec![("outcome", "error")])
            .observe(seconds);
    }

    /// The `/metrics` answer.
    pub fn answer(&self) -> appset_process::admin::Answer {
        appset_process::admin::metrics(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_outcomes() {
        let m = Metrics::new();
        m.observe(
            &Decision::Inject {
                uid: "u".into(),
                ops: vec![],
                applied: vec![],
                warnings: vec![],
            },
            0.001,
        );
        m.observe(
            &Decision::Deny {
                uid: "u".into(),
                message: "m".into(),
                namespace: "ns".into(),
                injections: vec!["a".into()],
                dry_run: false,
            },
            0.001,
        );
        m.observe(
            &Decision::Allow {
                uid: "u".into(),
                skip: Skip::OptedOut,
            },
            0.001,
        );
        m.error("bad_request", 0.0001);
        let text = m.answer().body;
        assert!(text.contains("appset_webhook_injections_total 1"), "{text}");
        assert!(text.contains("appset_webhook_denials_total 1"), "{text}");
        assert!(
            text.contains("appset_webhook_errors_total{kind=\"bad_request\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("appset_webhook_skipped_total{reason=\"opted_out\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "appset_webhook_admission_duration_seconds_count{outcome=\"injected\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn counts_pin_outcomes() {
        let m = Metrics::new();
        m.observe_pin(
            &PinDecision::Pin {
                uid: "u".into(),
                ops: vec![],
            },
            0.001,
        );
        m.observe_pin(
            &PinDecision::Deny {
                uid: "u".into(),
                message: "m".into(),
                dry_run: false,
            },
            0.001,
        );
        m.observe_pin(
            &PinDecision::Allow {
                uid: "u".into(),
                skip: PinSkip::NoAnnotation,
            },
            0.001,
        );
        let text = m.answer().body;
        assert!(text.contains("appset_webhook_pinned_total 1"), "{text}");
        assert!(
            text.contains("appset_webhook_pin_denials_total 1"),
            "{text}"
        );
        assert!(
            text.contains("appset_webhook_pin_skipped_total{reason=\"no_annotation\"} 1"),
            "{text}"
        );
        assert!(text.contains("appset_webhook_injections_total 0"), "{text}");
        assert!(
            text.contains(
                "appset_webhook_admission_duration_seconds_count{outcome=\"pin_denied\"} 1"
            ),
            "{text}"
        );
    }
}
