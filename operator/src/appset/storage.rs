//! Claims versus their volumeClaimTemplate, sans-IO: storage expansion and changes Kubernetes
//! cannot apply to an existing claim.
//!
//! StatefulSet ignores every change to `volumeClaimTemplates` once the claims exist. AppSet acts
//! on the one change Kubernetes can apply in place, a larger `resources.requests.storage`: when
//! the claim's StorageClass has `allowVolumeExpansion: true`, the claim's request is raised and
//! the storage driver does the rest. Everything else (a smaller size, another StorageClass,
//! other access modes, a class that cannot expand) is reported in the per-template status and
//! in an Event, and never retried in a loop: the decision is a pure function of the objects, so
//! the controller only acts again when they change.
//!
//! Data flow: the controller passes each live claim with its template and its StorageClass's
//! `allowVolumeExpansion` to [`claim_change`] ([`compare_claim`] plus "only a bound claim can
//! grow"), patches the claims marked [`ClaimChange::Expand`], and folds the results into
//! [`template_status`].

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use appset_crds::appset::VolumeClaimTemplateStatus;

/// A quantity in thousandths of its unit (bytes, for storage), or `None` when it does not parse.
///
/// Accepts the Kubernetes forms: a decimal number with an optional binary suffix (`Ki` .. `Ei`),
/// decimal suffix (`n`, `u`, `m`, `k`, `M` .. `E`) or exponent (`e3`, `E6`).
pub fn parse_quantity_millis(q: &str) -> Option<u128> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    if number.is_empty() || number == "." {
        return None;
    }
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if frac.contains('.') {
        return None;
    }
    let digits: u128 = format!("{int}{frac}").parse().ok()?;
    // value = digits / 10^frac_len * multiplier; the multiplier is num / den.
    let (num, den): (u128, u128) = match suffix {
        "" => (1, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        "n" => (1, 1_000_000_000),
        "u" => (1, 1_000_000),
        "m" => (1, 1_000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "E" => (1_000_000_000_000_000_000, 1),
        s if s.starts_with(['e', 'E']) => {
            let exp: u32 = s[1..].parse().ok()?;
            (10u128.checked_pow(exp)?, 1)
        }
        _ => return None,
    };
    let den = den.checked_mul(10u128.checked_pow(frac.len() as u32)?)?;
    let scaled = digits.checked_mul(num)?.checked_mul(1000)?;
    Some(scaled.div_ceil(den))
}

/// The `storage` request of a claim or claim template.
pub fn requested_storage(claim: &PersistentVolumeClaim) -> Option<&Quantity> {
    claim
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
}

/// The `storage` capacity a claim reports in its status.
pub fn capacity(claim: &PersistentVolumeClaim) -> Option<&Quantity> {
    claim.status.as_ref()?.capacity.as_ref()?.get("storage")
}

/// What the controller should do about one claim.
#[derive(Clone, Debug, PartialEq)]
pub enum ClaimChange {
    /// Nothing: the claim is as the template asks (or resizing is under way).
    None,
    /// Raise the claim's storage request to this quantity.
    Expand(Quantity),
    /// The template asks for something the claim cannot get; the message says what.
    Blocked(String),
}

/// Compares a live claim with its template. `class_allows_expansion` is the claim's
/// StorageClass's `allowVolumeExpansion` (`None` when the class is unknown or absent).
pub fn compare_claim(
    claim: &PersistentVolumeClaim,
    template: &PersistentVolumeClaim,
    class_allows_expansion: Option<bool>,
) -> ClaimChange {
    let name = claim.metadata.name.as_deref().unwrap_or_default();
    let (spec, tspec) = (claim.spec.as_ref(), template.spec.as_ref());
    let mut problems = vec![];
    if let Some(want) = tspec.and_then(|s| s.storage_class_name.as_deref())
        && let Some(have) = spec.and_then(|s| s.storage_class_name.as_deref())
        && want != have
    {
        problems.push(format!(
            "claim {name} uses StorageClass {have}, the template asks for {want}; a claim's class cannot change"
        ));
    }
    let modes = |s: Option<&k8s_openapi::api::core::v1::PersistentVolumeClaimSpec>| {
        let mut m = s.and_then(|s| s.access_modes.clone()).unwrap_or_default();
        m.sort();
        m
    };
    if tspec.is_some_and(|s| s.access_modes.is_some()) && modes(spec) != modes(tspec) {
        problems.push(format!(
            "claim {name} has access modes {:?}, the template asks for {:?}; access modes cannot change",
            modes(spec),
            modes(tspec)
        ));
    }

    let mut change = ClaimChange::None;
    if let Some(want) = requested_storage(template) {
        let have = requested_storage(claim);
        let want_v = parse_quantity_millis(&want.0);
        let have_v = have.and_then(|q| parse_quantity_millis(&q.0));
        match (want_v, have_v) {
            (Some(w), Some(h)) if w > h => match class_allows_expansion {
                Some(true) => change = ClaimChange::Expand(want.clone()),
                _ => {
                    let class = spec
                        .and_then(|s| s.storage_class_name.as_deref())
                        .unwrap_or("(none)");
                    problems.push(format!(
                        "claim {name} cannot grow to {}: StorageClass {class} does not allow volume expansion",
                        want.0
                    ));
                }
            },
            (Some(w), Some(h)) if w < h => problems.push(format!(
                "claim {name} requests {}, more than the template's {}; claims cannot shrink",
                have.map(|q| q.0.as_str()).unwrap_or_default(),
                want.0
            )),
            (None, _) => problems.push(format!(
                "the template's storage request {:?} is not a valid quantity",
                want.0
            )),
            _ => {}
        }
    }
    if problems.is_empty() {
        change
    } else {
        ClaimChange::Blocked(problems.join("; "))
    }
}

/// Whether the claim is bound to a volume (`status.phase: Bound`).
pub fn is_bound(claim: &PersistentVolumeClaim) -> bool {
    claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
}

/// What to do about a claim now: [`compare_claim`], except that only a bound claim can grow,
/// so an expansion of an unbound claim waits (nothing to do) until it binds.
pub fn claim_change(
    claim: &PersistentVolumeClaim,
    template: &PersistentVolumeClaim,
    class_allows_expansion: Option<bool>,
) -> ClaimChange {
    match compare_claim(claim, template, class_allows_expansion) {
        ClaimChange::Expand(_) if !is_bound(claim) => ClaimChange::None,
        change => change,
    }
}

/// Whether the claim asks for less storage than its template, so that whether its class
/// allows expansion matters (the class is read only then).
pub fn wants_more_storage(claim: &PersistentVolumeClaim, template: &PersistentVolumeClaim) -> bool {
    matches!(
        compare_claim(claim, template, Some(true)),
        ClaimChange::Expand(_)
    )
}

/// Whether a claim's capacity already covers its template's request.
pub fn is_resized(claim: &PersistentVolumeClaim, template: &PersistentVolumeClaim) -> bool {
    match requested_storage(template).and_then(|q| parse_quantity_millis(&q.0)) {
        None => true,
        Some(want) => capacity(claim)
            .and_then(|q| parse_quantity_millis(&q.0))
            .is_some_and(|have| have >= want),
    }
}

/// The status entry of one template from its live claims and their comparisons.
pub fn template_status(
    template: &PersistentVolumeClaim,
    claims: &[(&PersistentVolumeClaim, ClaimChange)],
) -> VolumeClaimTemplateStatus {
    let blocked: Vec<&str> = claims
        .iter()
        .filter_map(|(_, c)| match c {
            ClaimChange::Blocked(m) => Some(m.as_str()),
            _ => None,
        })
        .collect();
    VolumeClaimTemplateStatus {
        name: template.metadata.name.clone().unwrap_or_default(),
        claims: claims.len() as i32,
        bound: claims
            .iter()
            .filter(|(c, _)| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
            .count() as i32,
        requested_storage: requested_storage(template).map(|q| q.0.clone()),
        resized: claims
            .iter()
            .filter(|(c, _)| is_resized(c, template))
            .count() as i32,
        message: (!blocked.is_empty()).then(|| blocked.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        PersistentVolumeClaimSpec, PersistentVolumeClaimStatus, VolumeResourceRequirements,
    };
    use kube::api::ObjectMeta;

    fn pvc(
        name: &str,
        class: &str,
        request: &str,
        capacity: Option<&str>,
    ) -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: (!class.is_empty()).then(|| class.to_string()),
                resources: Some(VolumeResourceRequirements {
                    requests: Some([("storage".to_string(), Quantity(request.into()))].into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            status: capacity.map(|c| PersistentVolumeClaimStatus {
                phase: Some("Bound".into()),
                capacity: Some([("storage".to_string(), Quantity(c.into()))].into()),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn only_a_bound_claim_is_expanded() {
        let tmpl = pvc("data", "fast", "2Gi", None);
        let bound = pvc("data-web-0", "fast", "1Gi", Some("1Gi"));
        let pending = pvc("data-web-0", "fast", "1Gi", None);
        assert!(is_bound(&bound) && !is_bound(&pending));
        assert_eq!(
            claim_change(&bound, &tmpl, Some(true)),
            ClaimChange::Expand(Quantity("2Gi".into()))
        );
        assert_eq!(claim_change(&pending, &tmpl, Some(true)), ClaimChange::None);
        // What cannot be done is reported whether bound or not.
        assert!(matches!(
            claim_change(&pending, &tmpl, Some(false)),
            ClaimChange::Blocked(_)
        ));
    }

    #[test]
    fn the_class_matters_only_to_a_claim_that_must_grow() {
        let tmpl = pvc("data", "fast", "2Gi", None);
        assert!(wants_more_storage(
            &pvc("data-web-0", "fast", "1Gi", Some("1Gi")),
            &tmpl
        ));
        assert!(wants_more_storage(
            &pvc("data-web-0", "fast", "1Gi", None),
            &tmpl
        ));
        for same_or_more in ["2Gi", "3Gi", "2048Mi"] {
            let claim = pvc("data-web-0", "fast", same_or_more, Some(same_or_more));
            assert!(!wants_more_storage(&claim, &tmpl), "{same_or_more}");
            // Whatever the class says, such a claim gets the same verdict.
            let verdict = claim_change(&claim, &tmpl, None);
            for allows in [Some(false), Some(true)] {
                assert_eq!(
                    claim_change(&claim, &tmpl, allows),
                    verdict,
                    "{same_or_more}"
                );
            }
        }
    }

    #[test]
    fn quantities_parse_in_every_form() {
        assert_eq!(parse_quantity_millis("1Gi"), Some(1_073_741_824_000));
        assert_eq!(parse_quantity_millis("1073741824"), Some(1_073_741_824_000));
        assert_eq!(parse_quantity_millis("1G"), Some(1_000_000_000_000));
        assert_eq!(parse_quantity_millis("1.5Gi"), Some(1_610_612_736_000));
        assert_eq!(parse_quantity_millis("500m"), Some(500));
        assert_eq!(parse_quantity_millis("1e3"), Some(1_000_000));
        assert_eq!(
            parse_quantity_millis("2E"),
            Some(2_000_000_000_000_000_000_000)
        );
        assert_eq!(parse_quantity_millis("1Ei"), Some((1u128 << 60) * 1000));
        assert_eq!(parse_quantity_millis("abc"), None);
        assert_eq!(parse_quantity_millis("1Xi"), None);
        assert_eq!(parse_quantity_millis(""), None);
        assert_eq!(parse_quantity_millis("1.2.3"), None);
        assert!(parse_quantity_millis("1Gi") > parse_quantity_millis("1000Mi"));
    }

    #[test]
    fn a_larger_request_expands_when_the_class_allows() {
        let claim = pvc("data-web-0", "standard", "1Gi", Some("1Gi"));
        let template = pvc("data", "", "2Gi", None);
        assert_eq!(
            compare_claim(&claim, &template, Some(true)),
            ClaimChange::Expand(Quantity("2Gi".into()))
        );
    }

    #[test]
    fn a_class_without_expansion_is_reported() {
        let claim = pvc("data-web-0", "slow", "1Gi", Some("1Gi"));
        let template = pvc("data", "", "2Gi", None);
        for allows in [Some(false), None] {
            match compare_claim(&claim, &template, allows) {
                ClaimChange::Blocked(m) => {
                    assert!(m.contains("slow") && m.contains("does not allow"), "{m}")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn equal_sizes_in_other_units_change_nothing() {
        let claim = pvc("data-web-0", "standard", "1024Mi", Some("1Gi"));
        let template = pvc("data", "", "1Gi", None);
        assert_eq!(
            compare_claim(&claim, &template, Some(true)),
            ClaimChange::None
        );
        assert_eq!(
            compare_claim(&claim, &template, Some(false)),
            ClaimChange::None
        );
    }

    #[test]
    fn shrinking_and_class_or_mode_changes_are_reported() {
        let claim = pvc("data-web-0", "standard", "2Gi", Some("2Gi"));
        let small = pvc("data", "", "1Gi", None);
        assert!(
            matches!(compare_claim(&claim, &small, Some(true)), ClaimChange::Blocked(m) if m.contains("shrink"))
        );
        let other_class = pvc("data", "fast", "2Gi", None);
        assert!(
            matches!(compare_claim(&claim, &other_class, Some(true)), ClaimChange::Blocked(m) if m.contains("fast"))
        );
        let mut rwx = pvc("data", "", "2Gi", None);
        if let Some(s) = rwx.spec.as_mut() {
            s.access_modes = Some(vec!["ReadWriteMany".into()]);
        }
        assert!(
            matches!(compare_claim(&claim, &rwx, Some(true)), ClaimChange::Blocked(m) if m.contains("access modes"))
        );
    }

    #[test]
    fn the_template_status_counts_claims() {
        let template = pvc("data", "", "2Gi", None);
        let a = pvc("data-web-0", "standard", "2Gi", Some("2Gi"));
        let b = pvc("data-web-1", "standard", "2Gi", Some("1Gi"));
        let c = pvc("data-web-2", "standard", "1Gi", None);
        let status = template_status(
            &template,
            &[
                (&a, ClaimChange::None),
                (&b, ClaimChange::None),
                (&c, ClaimChange::Blocked("no".into())),
            ],
        );
        assert_eq!(status.name, "data");
        assert_eq!(status.claims, 3);
        assert_eq!(status.bound, 2);
        assert_eq!(status.resized, 1);
        assert_eq!(status.requested_storage.as_deref(), Some("2Gi"));
        assert_eq!(status.message.as_deref(), Some("no"));
    }
}
