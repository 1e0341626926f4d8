//! The certificate material and its lifecycle, as pure functions of the stored material, a
//! [`Policy`] and the current time.
//!
//! The Secret holds:
//!
//! | key | content |
//! | --- | --- |
//! | `ca.crt`, `ca.key` | the CA that signs the serving certificate |
//! | `tls.crt`, `tls.key` | the serving certificate (with the SANs of the policy) and its key |
//! | `next-ca.crt`, `next-ca.key`, `next-ca.since` | during a CA rotation: the successor CA and when it was published |
//! | `previous-ca.crt` | after a CA rotation: the former CA, trusted until it expires |
//! | `ca-bundle.crt` | every CA above, concatenated: what goes into `caBundle` |
//!
//! [`next_step`] moves the material forward one step at a time:
//!
//! 1. a previous CA that has expired leaves the bundle;
//! 2. a successor CA published at least `promote_after` ago becomes the CA, the serving
//!    certificate is reissued by it, and the former CA stays in the bundle as `previous`;
//! 3. a CA within `ca_renew_before` of expiry gets a successor, published in the bundle
//!    **before** anything is signed by it, so the API server trusts the new chain first;
//! 4. a serving certificate within `serving_renew_before` of expiry, or whose SANs differ from the
//!    policy's, is reissued by the same CA (trust never changes).
//!
//! Each CA has a distinct subject and every serving certificate names its issuer's key, so a
//! bundle of two CAs is unambiguous.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
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
    /// A successor CA being published: certificate, key, and when (unix seconds).
    pub next_ca: Option<(String, String, i64)>,
    /// The former CA, trusted until it expires (PEM).
    pub previous_ca: Option<String>,
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("ca_not_after", &not_after(&self.ca_cert).ok())
            .field("serving_not_after", &not_after(&self.tls_cert).ok())
            .field("rotating_ca", &self.next_ca.is_some())
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
/// The Secret key holding the CA bundle.
pub const BUNDLE: &str = "ca-bundle.crt";

impl Material {
    /// Reads the material from Secret data; `None` when a required key is missing or not UTF-8.
    pub fn from_data(data: &BTreeMap<String, Vec<u8>>) -> Option<Self> {
        let get = |k: &str| data.get(k).and_then(|v| String::from_utf8(v.clone()).ok());
        let next_ca = match (get(NEXT_CRT), get(NEXT_KEY), get(NEXT_SINCE)) {
            (Some(c), Some(k), Some(s)) => Some((c, k, s.trim().parse().ok()?)),
            _ => None,
        };
        Some(Self {
            ca_cert: get(CA_CRT)?,
            ca_key: get(CA_KEY)?,
            tls_cert: get(TLS_CRT)?,
            tls_key: get(TLS_KEY)?,
            next_ca,
            previous_ca: get(PREV_CRT),
        })
    }

    /// The Secret data for this material, including the bundle.
    pub fn to_data(&self) -> BTreeMap<String, Vec<u8>> {
        let mut d = BTreeMap::new();
        d.insert(CA_CRT.into(), self.ca_cert.clone().into_bytes());
        d.insert(CA_KEY.into(), self.ca_key.clone().into_bytes());
        d.insert(TLS_CRT.into(), self.tls_cert.clone().into_bytes());
        d.insert(TLS_KEY.into(), self.tls_key.clone().into_bytes());
        if let Some((c, k, since)) = &self.next_ca {
            d.insert(NEXT_CRT.into(), c.clone().into_bytes());
            d.insert(NEXT_KEY.into(), k.clone().into_bytes());
            d.insert(NEXT_SINCE.into(), since.to_string().into_bytes());
        }
        if let Some(p) = &self.previous_ca {
            d.insert(PREV_CRT.into(), p.clone().into_bytes());
        }
        d.insert(BUNDLE.into(), self.bundle().into_bytes());
        d
    }

    /// Every CA the API server must trust, concatenated PEM: current, successor, former.
    pub fn bundle(&self) -> String {
        let mut out = String::new();
        let mut seen = Vec::new();
        for pem in std::iter::once(&self.ca_cert)
            .chain(self.next_ca.as_ref().map(|(c, _, _)| c))
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
    /// A successor CA was published in the bundle.
    PublishedNextCa,
    /// The serving certificate was reissued by the same CA.
    RenewedServing,
}

/// The next change the material needs at `now`, or `None` when it is current. Material that
/// cannot be parsed is replaced whole (see [`create`]) by the caller.
pub fn next_step(
    m: &Material,
    policy: &Policy,
    now: OffsetDateTime,
) -> Result<Option<(Material, Step)>, MaterialError> {
    if let Some(prev) = &m.previous_ca
        && not_after(prev)? <= now
    {
        let mut out = m.clone();
        out.previous_ca = None;
        return Ok(Some((out, Step::DroppedPreviousCa)));
    }
    if let Some((next_cert, next_key, since)) = &m.next_ca {
        let since = OffsetDateTime::from_unix_timestamp(*since).unwrap_or(now);
        if offset(since, policy.promote_after) <= now {
            let (tls_cert, tls_key) = issue_serving(next_cert, next_key, policy, now)?;
            let out = Material {
                ca_cert: next_cert.clone(),
                ca_key: next_key.clone(),
                tls_cert,
                tls_key,
                next_ca: None,
                previous_ca: Some(m.ca_cert.clone()),
            };
            return Ok(Some((out, Step::PromotedCa)));
        }
    } else if not_after(&m.ca_cert)? <= offset(now, policy.ca_renew_before) {
        let (c, k) = new_ca(now, policy.ca_validity)?;
        let mut out = m.clone();
        out.next_ca = Some((c, k, now.unix_timestamp()));
        return Ok(Some((out, Step::PublishedNextCa)));
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
        return Ok(Some((out, Step::RenewedServing)));
    }
    Ok(None)
}

#[cfg(test)]
mod tests;
