//! The certificate material and its lifecycle, as pure functions of the stored material, a
//! [`Policy`] and the current time.
//!
//! The Secret holds:
//!
//! | key | content |
//! | --- | --- |
//! | `ca.crt`, `ca.key` | the CA that signs the serving certificate |
//! | `tls.crt`, `tls.key` | the serving certificate (with the SANs of the policy) and its key |
//! | `next-ca.crt`, `next-ca.key`, `next-ca.since` | during a CA rotation: the successor CA and when its publication was confirmed (absent until then) |
//! | `previous-ca.crt` | after a CA rotation: the former CA, trusted until it expires |
//! | `ca-bundle.crt` | every CA above, concatenated: what goes into `caBundle` |
//!
//! | `revision` | a counter raised by every change, so a bundle can be traced to the material it came from |
//!
//! [`next_step`] moves the material forward one step at a time:
//!
//! 1. a previous CA that has expired leaves the bundle;
//! 2. a successor CA is **confirmed** once the caller has read the bundle holding it back from
//!    every webhook entry (`published`), and loses that confirmation if the bundle is seen
//!    without it again;
//! 3. a successor CA confirmed at least `promote_after` ago, and still published, becomes the
//!    CA, the serving certificate is reissued by it, and the former CA stays in the bundle as
//!    `previous`; until then the old CA keeps signing, however long that takes;
//! 4. a CA within `ca_renew_before` of expiry gets a successor, published in the bundle
//!    **before** anything is signed by it, so the API server trusts the new chain first;
//! 5. a serving certificate within `serving_renew_before` of expiry, or whose SANs differ from the
//!    policy's, is reissued by the same CA (trust never changes).
//!
//! [`inspect`] reads Secret data key by key: material that is partly damaged (a truncated key, an
//! unparsable timestamp, a serving certificate that does not belong to the CA) is repaired from
//! its sound parts, and only material whose signing CA itself is lost has no repair; the caller
//! then restores what it last served rather than mint an unrelated CA.
//!
//! Each CA has a distinct subject and every serving certificate names its issuer's key, so a
//! bundle of two CAs is unambiguous.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData,
};
use time::OffsetDateTime;

/// Errors building or reading certificates.
#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    /// rcgen failed to generate or sign.
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A stored certificate cannot be parsed.
    #[error("cannot read the stored certificate {0}")]
    Parse(&'static str),
}

/// How long certificates live and when they are renewed.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Subject alternative names of the serving certificate (DNS names or IP addresses).
    pub sans: Vec<String>,
    /// Lifetime of a CA.
    pub ca_validity: Duration,
    /// A CA gets a successor when it expires within this.
    pub ca_renew_before: Duration,
    /// Lifetime of a serving certificate (capped at its CA's expiry).
    pub serving_validity: Duration,
    /// A serving certificate is reissued when it expires within this.
    pub serving_renew_before: Duration,
    /// How long a successor CA stays in the bundle before it signs anything.
    pub promote_after: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Self {
            sans: vec!["127.0.0.1".into()],
            ca_validity: Duration::from_secs(5 * 365 * DAY),
            ca_renew_before: Duration::from_secs(365 * DAY),
            serving_validity: Duration::from_secs(90 * DAY),
            serving_renew_before: Duration::from_secs(30 * DAY),
            promote_after: Duration::from_secs(300),
        }
    }
}

impl Policy {
    /// Checks the policy is coherent: non-empty SANs, windows shorter than lifetimes, and a CA
    /// renewed earlier than the serving certificate (a serving certificate is capped at its CA's
    /// expiry, so a CA renewed later would leave it unrenewed).
    pub fn check(&self) -> Result<(), String> {
        if self.sans.is_empty() {
            return Err("the serving certificate needs at least one SAN".into());
        }
        if self.serving_renew_before >= self.serving_validity {
            return Err("serving_renew_before must be shorter than serving_validity".into());
        }
        if self.ca_renew_before >= self.ca_validity {
            return Err("ca_renew_before must be shorter than ca_validity".into());
        }
        if self.ca_renew_before <= self.serving_renew_before + self.promote_after {
            return Err(
                "ca_renew_before must exceed serving_renew_before plus promote_after".into(),
            );
        }
        Ok(())
    }
}

/// A successor CA during a rotation.
#[derive(Clone, PartialEq)]
pub struct NextCa {
    /// Its certificate (PEM).
    pub cert: String,
    /// Its key (PEM).
    pub key: String,
    /// When the bundle holding it was first read back from every webhook entry (unix seconds);
    /// `None` until then.
    pub confirmed: Option<i64>,
}

/// Everything the Secret stores. `Debug` never prints keys.
#[derive(Clone, PartialEq)]
pub struct Material {
    /// The signing CA's certificate (PEM).
    pub ca_cert: String,
    /// The signing CA's key (PEM).
    pub ca_key: String,
    /// The serving certificate (PEM).
    pub tls_cert: String,
    /// The serving key (PEM).
    pub tls_key: String,
    /// A successor CA being published.
    pub next_ca: Option<NextCa>,
    /// The former CA, trusted until it expires (PEM).
    pub previous_ca: Option<String>,
    /// Raised by every change of the material (see [`Material::succeeding`]).
    pub revision: u64,
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("revision", &self.revision)
            .field("ca_not_after", &not_after(&self.ca_cert).ok())
            .field("serving_not_after", &not_after(&self.tls_cert).ok())
            .field("rotating_ca", &self.next_ca.is_some())
            .field(
                "next_ca_confirmed",
                &self.next_ca.as_ref().and_then(|n| n.confirmed),
            )
            .field("previous_ca", &self.previous_ca.is_some())
            .finish_non_exhaustive()
    }
}

const CA_CRT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const TLS_CRT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const NEXT_CRT: &str = "next-ca.crt";
const NEXT_KEY: &str = "next-ca.key";
const NEXT_SINCE: &str = "next-ca.since";
const PREV_CRT: &str = "previous-ca.crt";
const REVISION: &str = "revision";
/// The Secret key holding the CA bundle.
pub const BUNDLE: &str = "ca-bundle.crt";

impl Material {
    /// The Secret data for this material, including the bundle.
    pub fn to_data(&self) -> BTreeMap<String, Vec<u8>> {
        let mut d = BTreeMap::new();
        d.insert(CA_CRT.into(), self.ca_cert.clone().into_bytes());
        d.insert(CA_KEY.into(), self.ca_key.clone().into_bytes());
        d.insert(TLS_CRT.into(), self.tls_cert.clone().into_bytes());
        d.insert(TLS_KEY.into(), self.tls_key.clone().into_bytes());
        if let Some(next) = &self.next_ca {
            d.insert(NEXT_CRT.into(), next.cert.clone().into_bytes());
            d.insert(NEXT_KEY.into(), next.key.clone().into_bytes());
            if let Some(since) = next.confirmed {
                d.insert(NEXT_SINCE.into(), since.to_string().into_bytes());
            }
        }
        if let Some(p) = &self.previous_ca {
            d.insert(PREV_CRT.into(), p.clone().into_bytes());
        }
        d.insert(REVISION.into(), self.revision.to_string().into_bytes());
        d.insert(BUNDLE.into(), self.bundle().into_bytes());
        d
    }

    /// Every CA the API server must trust, concatenated PEM: current, successor, former.
    pub fn bundle(&self) -> String {
        let mut out = String::new();
        let mut seen = Vec::new();
        for pem in std::iter::once(&self.ca_cert)
            .chain(self.next_ca.as_ref().map(|n| &n.cert))
            .chain(self.previous_ca.as_ref())
        {
            let pem = pem.trim_end();
            if !seen.contains(&pem) {
                seen.push(pem);
                out.push_str(pem);
                out.push('\n');
            }
        }
        out
    }

    /// This material as the successor of a stored revision `after`: its revision is raised
    /// above it.
    pub fn succeeding(mut self, after: u64) -> Self {
        self.revision = after.saturating_add(1);
        self
    }
}

/// What [`inspect`] found in Secret data.
#[derive(Debug, Clone, PartialEq)]
pub enum Inspection {
    /// Every part is present and consistent.
    Sound(Material),
    /// Some parts are missing or damaged.
    Damaged {
        /// The Secret keys at fault (names only, never values).
        keys: Vec<&'static str>,
        /// The material rebuilt from the sound parts, with the same revision (callers raise it
        /// when they store it); `None` when the signing CA itself is lost, which nothing in the
        /// data can repair.
        repaired: Option<Material>,
    },
}

/// A certificate and key that parse and belong together.
fn sound_pair(cert: Option<&str>, key: Option<&str>) -> bool {
    let (Some(cert), Some(key)) = (cert, key) else {
        return false;
    };
    let Ok(key) = KeyPair::from_pem(key) else {
        return false;
    };
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(cert.as_bytes()) else {
        return false;
    };
    let Ok(parsed) = pem.parse_x509() else {
        return false;
    };
    parsed.public_key().subject_public_key.data.as_ref() == key.der_bytes()
}

/// The subject and issuer of a PEM certificate, as strings.
fn names(pem: &str) -> Option<(String, String)> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let c = p.parse_x509().ok()?;
    Some((c.subject().to_string(), c.issuer().to_string()))
}

/// Reads Secret data part by part. Missing keys count as damaged, except the optional parts of
/// a rotation (`next-ca.*`, `previous-ca.crt`) and `revision` (absent in material written before
/// revisions existed), which count only when present and unreadable. A damaged serving
/// certificate is reissued by the CA under `policy` at `now`; a damaged successor or former CA
/// is dropped (a successor is minted again when due); an unreadable confirmation time counts as
/// unconfirmed, so the promotion delay starts again.
pub fn inspect(
    data: &BTreeMap<String, Vec<u8>>,
    policy: &Policy,
    now: OffsetDateTime,
) -> Result<Inspection, MaterialError> {
    let get = |k: &str| data.get(k).and_then(|v| String::from_utf8(v.clone()).ok());
    let mut keys: Vec<&'static str> = Vec::new();
    let ca_cert = get(CA_CRT);
    let ca_key = get(CA_KEY);
    let ca_sound = sound_pair(ca_cert.as_deref(), ca_key.as_deref());
    if !ca_sound {
        keys.extend([CA_CRT, CA_KEY]);
    }
    let tls_cert = get(TLS_CRT);
    let tls_key = get(TLS_KEY);
    let ca_subject = ca_cert.as_deref().and_then(names).map(|(s, _)| s);
    let tls_sound = sound_pair(tls_cert.as_deref(), tls_key.as_deref())
        && tls_cert.as_deref().and_then(names).map(|(_, i)| i) == ca_subject;
    if !tls_sound {
        keys.extend([TLS_CRT, TLS_KEY]);
    }
    let has_next = [NEXT_CRT, NEXT_KEY, NEXT_SINCE]
        .iter()
        .any(|k| data.contains_key(*k));
    let mut next_ca = None;
    if has_next {
        let (cert, key) = (get(NEXT_CRT), get(NEXT_KEY));
        if sound_pair(cert.as_deref(), key.as_deref())
            && let (Some(cert), Some(key)) = (cert, key)
        {
            let confirmed = match data.get(NEXT_SINCE) {
                None => None,
                Some(v) => {
                    let parsed = std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.trim().parse::<i64>().ok());
                    if parsed.is_none() {
                        keys.push(NEXT_SINCE);
                    }
                    parsed
                }
            };
            next_ca = Some(NextCa {
                cert,
                key,
                confirmed,
            });
        } else {
            keys.extend([NEXT_CRT, NEXT_KEY]);
        }
    }
    let previous_ca = match data.get(PREV_CRT) {
        None => None,
        Some(_) => {
            let pem = get(PREV_CRT).filter(|p| not_after(p).is_ok());
            if pem.is_none() {
                keys.push(PREV_CRT);
            }
            pem
        }
    };
    let revision = match data.get(REVISION) {
        None => 0,
        Some(v) => match std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            Some(r) => r,
            None => {
                keys.push(REVISION);
                0
            }
        },
    };
    let (Some(ca_cert), Some(ca_key)) = (ca_cert.filter(|_| ca_sound), ca_key) else {
        return Ok(Inspection::Damaged {
            keys,
            repaired: None,
        });
    };
    let mut material = Material {
        ca_cert,
        ca_key,
        tls_cert: tls_cert.unwrap_or_default(),
        tls_key: tls_key.unwrap_or_default(),
        next_ca,
        previous_ca,
        revision,
    };
    if keys.is_empty() && get(BUNDLE).as_deref() != Some(material.bundle().as_str()) {
        keys.push(BUNDLE);
    }
    if keys.is_empty() {
        return Ok(Inspection::Sound(material));
    }
    if !tls_sound {
        // Reissued by the CA the API server already trusts: trust does not change.
        let (c, k) = issue_serving(&material.ca_cert, &material.ca_key, policy, now)?;
        material.tls_cert = c;
        material.tls_key = k;
    }
    Ok(Inspection::Damaged {
        keys,
        repaired: Some(material),
    })
}

fn offset(now: OffsetDateTime, d: Duration) -> OffsetDateTime {
    now + time::Duration::seconds(i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 4))
}

fn new_ca(now: OffsetDateTime, validity: Duration) -> Result<(String, String), MaterialError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("appset-webhook-ca-{}", now.unix_timestamp_nanos()),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = offset(now, validity);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn issue_serving(
    ca_cert: &str,
    ca_key: &str,
    policy: &Policy,
    now: OffsetDateTime,
) -> Result<(String, String), MaterialError> {
    let ca_key = KeyPair::from_pem(ca_key)?;
    let ca_not_after = not_after(ca_cert)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(policy.sans.clone())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "appset-webhook");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = offset(now, policy.serving_validity).min(ca_not_after);
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Fresh material: a new CA and a serving certificate it signed.
pub fn create(policy: &Policy, now: OffsetDateTime) -> Result<Material, MaterialError> {
    let (ca_cert, ca_key) = new_ca(now, policy.ca_validity)?;
    let (tls_cert, tls_key) = issue_serving(&ca_cert, &ca_key, policy, now)?;
    Ok(Material {
        ca_cert,
        ca_key,
        tls_cert,
        tls_key,
        next_ca: None,
        previous_ca: None,
        revision: 0,
    })
}

/// The expiry of a PEM certificate.
pub fn not_after(pem: &str) -> Result<OffsetDateTime, MaterialError> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|_| MaterialError::Parse("PEM"))?;
    let cert = p.parse_x509().map_err(|_| MaterialError::Parse("X.509"))?;
    Ok(cert.validity().not_after.to_datetime())
}

/// The SANs of a PEM certificate, as strings (DNS names and IP addresses).
pub fn sans(pem: &str) -> Result<Vec<String>, MaterialError> {
    use x509_parser::extensions::GeneralName;
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|_| MaterialError::Parse("PEM"))?;
    let cert = p.parse_x509().map_err(|_| MaterialError::Parse("X.509"))?;
    let mut out = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(d) => out.push((*d).to_string()),
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        _ => None,
                    };
                    out.extend(ip.map(|i| i.to_string()));
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

/// What [`next_step`] did, for logs and Events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The expired former CA left the bundle.
    DroppedPreviousCa,
    /// The successor CA became the signing CA.
    PromotedCa,
    /// A successor CA was added to the bundle.
    PublishedNextCa,
    /// The bundle holding the successor CA was read back from every webhook entry.
    ConfirmedNextCa,
    /// The bundle was seen without the successor CA after its confirmation; the promotion
    /// delay starts again once it is back.
    UnconfirmedNextCa,
    /// The serving certificate was reissued by the same CA.
    RenewedServing,
}

/// The next change the material needs at `now`, or `None` when it is current. `published` says
/// whether the caller read `m`'s bundle back from every webhook entry just now; a successor CA
/// is promoted only while it is. The returned material's revision is one above `m`'s.
pub fn next_step(
    m: &Material,
    policy: &Policy,
    now: OffsetDateTime,
    published: bool,
) -> Result<Option<(Material, Step)>, MaterialError> {
    let step = |out: Material, step: Step| Ok(Some((out.succeeding(m.revision), step)));
    if let Some(prev) = &m.previous_ca
        && not_after(prev)? <= now
    {
        let mut out = m.clone();
        out.previous_ca = None;
        return step(out, Step::DroppedPreviousCa);
    }
    if let Some(next) = &m.next_ca {
        match next.confirmed {
            None if published => {
                let mut out = m.clone();
                if let Some(n) = out.next_ca.as_mut() {
                    n.confirmed = Some(now.unix_timestamp());
                }
                return step(out, Step::ConfirmedNextCa);
            }
            None => {}
            Some(_) if !published => {
                let mut out = m.clone();
                if let Some(n) = out.next_ca.as_mut() {
                    n.confirmed = None;
                }
                return step(out, Step::UnconfirmedNextCa);
            }
            Some(since) => {
                let since = OffsetDateTime::from_unix_timestamp(since).unwrap_or(now);
                if offset(since, policy.promote_after) <= now {
                    let (tls_cert, tls_key) = issue_serving(&next.cert, &next.key, policy, now)?;
                    let out = Material {
                        ca_cert: next.cert.clone(),
                        ca_key: next.key.clone(),
                        tls_cert,
                        tls_key,
                        next_ca: None,
                        previous_ca: Some(m.ca_cert.clone()),
                        revision: m.revision,
                    };
                    return step(out, Step::PromotedCa);
                }
            }
        }
    } else if not_after(&m.ca_cert)? <= offset(now, policy.ca_renew_before) {
        let (cert, key) = new_ca(now, policy.ca_validity)?;
        let mut out = m.clone();
        out.next_ca = Some(NextCa {
            cert,
            key,
            confirmed: None,
        });
        return step(out, Step::PublishedNextCa);
    }
    let mut wanted = policy.sans.clone();
    wanted.sort();
    let mut have = sans(&m.tls_cert)?;
    have.sort();
    let ca_expiry = not_after(&m.ca_cert)?;
    let serving_expiry = not_after(&m.tls_cert)?;
    // A serving certificate capped at its CA's expiry is renewed by the CA rotation, not here.
    let due =
        serving_expiry <= offset(now, policy.serving_renew_before) && serving_expiry < ca_expiry;
    if due || have != wanted {
        let (tls_cert, tls_key) = issue_serving(&m.ca_cert, &m.ca_key, policy, now)?;
        let out = Material {
            tls_cert,
            tls_key,
            ..m.clone()
        };
        return step(out, Step::RenewedServing);
    }
    Ok(None)
}

#[cfg(test)]
mod tests;
