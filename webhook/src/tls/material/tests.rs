//! The certificate lifecycle over simulated time.

use std::collections::BTreeMap;

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
    next_step(m, &policy(), now, true).expect("step")
}

fn unpublished(m: &Material, now: OffsetDateTime) -> Option<(Material, Step)> {
    next_step(m, &policy(), now, false).expect("step")
}

fn sound(data: &BTreeMap<String, Vec<u8>>) -> Option<Material> {
    match inspect(data, &policy(), OffsetDateTime::now_utc()).expect("inspect") {
        Inspection::Sound(m) => Some(m),
        Inspection::Damaged { .. } => None,
    }
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
    let (out, s) = next_step(&m, &p, t0, true).expect("ok").expect("reissue");
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
    assert!(!published.next_ca.clone().expect("next").key.is_empty());
    assert_eq!(published.revision, m.revision + 1);
    // Within the promotion delay the serving certificate may still be renewed by the old CA.
    if let Some((m2, s2)) = step(&published, at(t0, 710)) {
        assert_eq!(s2, Step::ConfirmedNextCa);
        assert_eq!(issuer(&m2.tls_cert), subject(&m.ca_cert));
    }
    let (confirmed, s) = step(&published, at(t0, 702)).expect("confirm");
    assert_eq!(s, Step::ConfirmedNextCa);
    assert_eq!(confirmed.bundle(), published.bundle());
    let published = confirmed;
    let (promoted, s) = step(&published, at(t0, 722)).expect("promote");
    assert_eq!(s, Step::PromotedCa);
    let new_ca = published.next_ca.clone().expect("next").cert;
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
    assert_eq!(sound(&data), Some(published.clone()));
    assert_eq!(
        data.get(BUNDLE)
            .map(|b| String::from_utf8_lossy(b).into_owned()),
        Some(published.bundle())
    );
    let mut partial = data.clone();
    partial.remove("tls.key");
    assert_eq!(sound(&partial), None);
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

#[test]
fn a_successor_ca_signs_nothing_until_every_entry_carries_it_for_the_promotion_delay() {
    let t0 = OffsetDateTime::now_utc();
    let m = create(&policy(), t0).expect("create");
    let (published, _) = step(&m, at(t0, 701)).expect("publish");
    // Never read back: however long it waits, the old CA keeps signing.
    let mut held = published.clone();
    for t in [702, 750, 800, 850] {
        if let Some((m2, s)) = unpublished(&held, at(t0, t)) {
            assert_eq!(s, Step::RenewedServing, "at {t}");
            held = m2;
        }
        assert_eq!(issuer(&held.tls_cert), subject(&m.ca_cert), "at {t}");
        assert_eq!(held.next_ca.as_ref().and_then(|n| n.confirmed), None);
    }
    let (confirmed, s) = step(&held, at(t0, 860)).expect("confirm");
    assert_eq!(s, Step::ConfirmedNextCa);
    // Seen without the successor again: the confirmation is withdrawn.
    let (withdrawn, s) = unpublished(&confirmed, at(t0, 870)).expect("withdraw");
    assert_eq!(s, Step::UnconfirmedNextCa);
    let (again, _) = step(&withdrawn, at(t0, 875)).expect("confirm again");
    assert!(
        step(&again, at(t0, 890)).is_none_or(|(_, s)| s != Step::PromotedCa),
        "promoted 15 s after the new confirmation, before the 20 s delay"
    );
    let (promoted, s) = step(&again, at(t0, 895)).expect("promote");
    assert_eq!(s, Step::PromotedCa);
    assert_eq!(promoted.revision, again.revision + 1);
}

fn rotating(t0: OffsetDateTime) -> Material {
    let m = create(&policy(), t0).expect("create");
    let (published, _) = step(&m, at(t0, 701)).expect("publish");
    let (confirmed, _) = step(&published, at(t0, 702)).expect("confirm");
    let (promoted, _) = step(&confirmed, at(t0, 730)).expect("promote");
    // Mid-way through the following rotation, with the former CA still trusted (a state the
    // test policy's lifetimes never reach on their own).
    let (cert, key) = new_ca(at(t0, 731), policy().ca_validity).expect("successor");
    let mut m = promoted;
    m.next_ca = Some(NextCa {
        cert,
        key,
        confirmed: Some(at(t0, 731).unix_timestamp()),
    });
    assert!(m.previous_ca.is_some());
    m
}

fn inspected(data: &BTreeMap<String, Vec<u8>>) -> (Vec<&'static str>, Option<Material>) {
    match inspect(data, &policy(), OffsetDateTime::now_utc()).expect("inspect") {
        Inspection::Sound(m) => (vec![], Some(m)),
        Inspection::Damaged { keys, repaired } => (keys, repaired),
    }
}

#[test]
fn damaged_parts_are_named_and_repaired_around_the_sound_ca() {
    let t0 = OffsetDateTime::now_utc();
    let m = rotating(t0);
    let data = m.to_data();
    assert_eq!(sound(&data), Some(m.clone()));

    let mut d = data.clone();
    d.insert("next-ca.since".into(), b"yesterday".to_vec());
    let (keys, repaired) = inspected(&d);
    assert_eq!(keys, vec!["next-ca.since"]);
    let repaired = repaired.expect("repairable");
    assert_eq!(repaired.ca_cert, m.ca_cert);
    assert_eq!(repaired.tls_cert, m.tls_cert);
    let next = repaired.next_ca.expect("successor kept");
    assert_eq!(next.cert, m.next_ca.as_ref().expect("next").cert);
    assert_eq!(
        next.confirmed, None,
        "an unreadable time restarts the delay"
    );

    let mut d = data.clone();
    d.remove("tls.key");
    let (keys, repaired) = inspected(&d);
    assert_eq!(keys, vec!["tls.crt", "tls.key"]);
    let repaired = repaired.expect("repairable");
    assert_eq!(repaired.ca_cert, m.ca_cert);
    assert_eq!(issuer(&repaired.tls_cert), subject(&m.ca_cert));
    assert_eq!(repaired.bundle(), m.bundle(), "trust unchanged");

    // A serving certificate of another CA is as damaged as a missing one.
    let other = create(&policy(), t0).expect("another CA");
    let mut d = data.clone();
    d.insert("tls.crt".into(), other.tls_cert.clone().into_bytes());
    d.insert("tls.key".into(), other.tls_key.clone().into_bytes());
    let (keys, repaired) = inspected(&d);
    assert_eq!(keys, vec!["tls.crt", "tls.key"]);
    assert_eq!(
        issuer(&repaired.expect("repairable").tls_cert),
        subject(&m.ca_cert)
    );

    let mut d = data.clone();
    d.insert("next-ca.key".into(), other.ca_key.clone().into_bytes());
    d.insert("previous-ca.crt".into(), b"not a certificate".to_vec());
    d.insert("revision".into(), b"-3".to_vec());
    let (keys, repaired) = inspected(&d);
    assert_eq!(
        keys,
        vec!["next-ca.crt", "next-ca.key", "previous-ca.crt", "revision"]
    );
    let repaired = repaired.expect("repairable");
    assert!(repaired.next_ca.is_none() && repaired.previous_ca.is_none());
    assert_eq!(repaired.ca_cert, m.ca_cert);

    // The signing CA itself: nothing in the data can stand in for it.
    let mut d = data.clone();
    d.insert("ca.key".into(), other.ca_key.clone().into_bytes());
    let (keys, repaired) = inspected(&d);
    assert_eq!(&keys[..2], &["ca.crt", "ca.key"]);
    assert!(repaired.is_none());
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    const KEYS: [&str; 10] = [
        "ca.crt",
        "ca.key",
        "tls.crt",
        "tls.key",
        "next-ca.crt",
        "next-ca.key",
        "next-ca.since",
        "previous-ca.crt",
        "revision",
        "ca-bundle.crt",
    ];

    #[derive(Debug, Clone)]
    enum Harm {
        Remove,
        Truncate(usize),
        Garbage(Vec<u8>),
    }

    fn harm() -> impl Strategy<Value = Harm> {
        prop_oneof![
            Just(Harm::Remove),
            (0usize..400).prop_map(Harm::Truncate),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Harm::Garbage),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// However the Secret is damaged, a repair keeps the signing CA when its pair is intact,
        /// never mints a CA of its own, and yields material that reads back sound.
        #[test]
        fn a_repair_keeps_the_signing_ca_and_reads_back_sound(
            harms in proptest::collection::vec((0usize..KEYS.len(), harm()), 1..4),
        ) {
            let t0 = OffsetDateTime::now_utc();
            let m = rotating(t0);
            let mut data = m.to_data();
            for (k, h) in &harms {
                let key = KEYS[*k];
                match h {
                    Harm::Remove => { data.remove(key); }
                    Harm::Truncate(n) => {
                        if let Some(v) = data.get_mut(key) { v.truncate(*n); }
                    }
                    Harm::Garbage(g) => { data.insert(key.into(), g.clone()); }
                }
            }
            let ca_intact = data.get("ca.crt") == Some(&m.ca_cert.clone().into_bytes())
                && data.get("ca.key") == Some(&m.ca_key.clone().into_bytes());
            match inspect(&data, &policy(), t0).expect("inspect") {
                Inspection::Sound(s) => {
                    // Only harmless changes (a truncation past the end, a key put back as it was).
                    prop_assert_eq!(s.ca_cert, m.ca_cert);
                    prop_assert_eq!(s.tls_cert, m.tls_cert);
                }
                Inspection::Damaged { keys, repaired } => {
                    prop_assert!(!keys.is_empty());
                    match repaired {
                        Some(r) => {
                            prop_assert!(ca_intact, "repaired without the CA pair");
                            prop_assert_eq!(&r.ca_cert, &m.ca_cert);
                            prop_assert_eq!(issuer(&r.tls_cert), subject(&m.ca_cert));
                            for cert in r.next_ca.iter().map(|n| &n.cert).chain(r.previous_ca.iter()) {
                                prop_assert!(m.bundle().contains(cert.trim_end()), "a CA appeared from nowhere");
                            }
                            prop_assert_eq!(sound(&r.to_data()), Some(r));
                        }
                        None => prop_assert!(!ca_intact, "an intact CA pair was not repaired around"),
                    }
                }
            }
        }

        /// Over any history of read-backs, the serving certificate is signed by a new CA only
        /// when that CA was in the published bundle at every check for at least
        /// `promote_after`, ending with the check that promoted it.
        #[test]
        fn a_ca_signs_only_after_being_published_for_the_promotion_delay(
            ticks in proptest::collection::vec((1i64..40, any::<bool>(), any::<bool>()), 10..60),
        ) {
            let p = policy();
            let t0 = OffsetDateTime::now_utc();
            let mut m = create(&p, t0).expect("create");
            let mut t = 650i64;
            // The bundle the configuration holds, and since when each CA has been in it at every
            // check.
            let mut config: Option<String> = None;
            let mut carried_since: BTreeMap<String, i64> = BTreeMap::new();
            for (dt, writer_works, reset) in ticks {
                t += dt;
                let now = at(t0, t);
                if reset {
                    config = None;
                }
                let published = config.as_deref() == Some(m.bundle().as_str());
                let bundle_now = config.clone().unwrap_or_default();
                carried_since.retain(|ca, _| bundle_now.contains(ca.as_str()));
                for ca in [m.ca_cert.trim_end(), m.next_ca.as_ref().map_or("", |n| n.cert.trim_end())] {
                    if !ca.is_empty() && bundle_now.contains(ca) {
                        carried_since.entry(ca.to_string()).or_insert(t);
                    }
                }
                let before = m.ca_cert.clone();
                if let Some((m2, _)) = next_step(&m, &p, now, published).expect("step") {
                    m = m2;
                }
                if m.ca_cert != before {
                    let since = carried_since.get(m.ca_cert.trim_end()).copied();
                    prop_assert!(
                        since.is_some_and(|s| s + 20 <= t),
                        "promoted at {} a CA carried since {:?}", t, since
                    );
                }
                if writer_works {
                    config = Some(m.bundle());
                }
            }
        }
    }
}
