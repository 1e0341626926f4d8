//! The certificate lifecycle over simulated time.

use super::*;

fn policy() -> Policy {
    Policy {
        sans: vec!["127.0.0.1".into(), "appset-webhook.appset.svc".into()],
        ca_validity: Duration::from_secs(1000),
        ca_renew_before: Duration::from_secs(300),
        serving_validity: Duration::from_secs(100),
        serving_renew_before: Duration::from_secs(40),
        promote_after: Duration::from_secs(20),
    }
}

fn at(t0: OffsetDateTime, secs: i64) -> OffsetDateTime {
    t0 + time::Duration::seconds(secs)
}

fn subject(pem: &str) -> String {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
    let c = p.parse_x509().expect("x509");
    c.subject().to_string()
}

fn issuer(pem: &str) -> String {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
    let c = p.parse_x509().expect("x509");
    c.issuer().to_string()
}

fn step(m: &Material, now: OffsetDateTime) -> Option<(Material, Step)> {
    next_step(m, &policy(), now).expect("step")
}

#[test]
fn fresh_material_is_current_and_chains_to_its_ca() {
    let t0 = OffsetDateTime::now_utc();
    let m = create(&policy(), t0).expect("create");
    assert_eq!(issuer(&m.tls_cert), subject(&m.ca_cert));
    let mut s = sans(&m.tls_cert).expect("sans");
    s.sort();
    assert_eq!(s, vec!["127.0.0.1", "appset-webhook.appset.svc"]);
    assert!(step(&m, t0).is_none());
    assert!(step(&m, at(t0, 59)).is_none());
    assert_eq!(m.bundle().matches("BEGIN CERTIFICATE").count(), 1);
}

#[test]
fn serving_certificate_is_renewed_by_the_same_ca() {
    let t0 = OffsetDateTime::now_utc();
    let m = create(&policy(), t0).expect("create");
    let (renewed, s) = step(&m, at(t0, 61)).expect("renewal due");
    assert_eq!(s, Step::RenewedServing);
    assert_eq!(renewed.ca_cert, m.ca_cert);
    assert_eq!(renewed.bundle(), m.bundle());
    assert_ne!(renewed.tls_cert, m.tls_cert);
    assert_eq!(issuer(&renewed.tls_cert), subject(&m.ca_cert));
    assert!(
        not_after(&renewed.tls_cert).expect("expiry") > not_after(&m.tls_cert).expect("expiry")
    );
    assert!(step(&renewed, at(t0, 61)).is_none());
}

#[test]
fn sans_change_reissues() {
    let t0 = OffsetDateTime::now_utc();
    let m = create(&policy(), t0).expect("create");
    let mut p = policy();
    p.sans.push("10.0.0.1".into());
    let (out, s) = next_step(&m, &p, t0).expect("ok").expect("reissue");
    assert_eq!(s, Step::RenewedServing);
    assert!(
        sans(&out.tls_cert)
            .expect("sans")
            .contains(&"10.0.0.1".to_string())
    );
}

#[test]
fn ca_rotation_publishes_before_signing_and_keeps_the_old_ca_until_it_expires() {
    let t0 = OffsetDateTime::now_utc();
    let m = create(&policy(), t0).expect("create");
    // 700 s in, the CA (1000 s) is within its 300 s renewal window.
    let (published, s) = step(&m, at(t0, 701)).expect("publish");
    assert_eq!(s, Step::PublishedNextCa);
    assert_eq!(
        published.tls_cert, m.tls_cert,
        "nothing signed by the new CA yet"
    );
    assert_eq!(published.bundle().matches("BEGIN CERTIFICATE").count(), 2);
    let (_, next_key_owner, _) = published.next_ca.clone().expect("next");
    assert!(!next_key_owner.is_empty());
    // Within the promotion delay the serving certificate may still be renewed by the old CA.
    if let Some((m2, s2)) = step(&published, at(t0, 710)) {
        assert_eq!(s2, Step::RenewedServing);
        assert_eq!(issuer(&m2.tls_cert), subject(&m.ca_cert));
    }
    let (promoted, s) = step(&published, at(t0, 722)).expect("promote");
    assert_eq!(s, Step::PromotedCa);
    let new_ca = published.next_ca.clone().expect("next").0;
    assert_eq!(promoted.ca_cert, new_ca);
    assert_eq!(issuer(&promoted.tls_cert), subject(&new_ca));
    assert_eq!(promoted.previous_ca.as_deref(), Some(m.ca_cert.as_str()));
    assert_eq!(promoted.bundle().matches("BEGIN CERTIFICATE").count(), 2);
    // Once the old CA has expired it leaves the bundle.
    let (dropped, s) = step(&promoted, at(t0, 1001)).expect("drop");
    assert_eq!(s, Step::DroppedPreviousCa);
    assert_eq!(dropped.bundle().matches("BEGIN CERTIFICATE").count(), 1);
}

#[test]
fn data_round_trips_and_debug_hides_keys() {
    let t0 = OffsetDateTime::now_utc();
    let m = create(&policy(), t0).expect("create");
    let (published, _) = step(&m, at(t0, 701)).expect("publish");
    let data = published.to_data();
    assert_eq!(Material::from_data(&data), Some(published.clone()));
    assert_eq!(
        data.get(BUNDLE)
            .map(|b| String::from_utf8_lossy(b).into_owned()),
        Some(published.bundle())
    );
    let mut partial = data.clone();
    partial.remove("tls.key");
    assert_eq!(Material::from_data(&partial), None);
    let shown = format!("{published:?}");
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    assert!(!shown.contains("BEGIN"), "{shown}");
}

#[test]
fn policy_check_rejects_incoherent_windows() {
    assert_eq!(policy().check(), Ok(()));
    assert_eq!(Policy::default().check(), Ok(()));
    let mut p = policy();
    p.sans.clear();
    assert!(p.check().is_err());
    let mut p = policy();
    p.serving_renew_before = p.serving_validity;
    assert!(p.check().is_err());
    let mut p = policy();
    p.ca_renew_before = Duration::from_secs(50);
    assert!(
        p.check().is_err(),
        "a CA renewed after its serving certificate is due"
    );
}
