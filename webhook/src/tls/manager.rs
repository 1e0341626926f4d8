//! Keeps the certificate Secret, the served certificate and the webhook's `caBundle` in step.
//!
//! Every replica runs the same loop; they agree through the API server rather than through a
//! leader:
//!
//! 1. **Read or create.** The Secret is read; when absent, fresh [`Material`] is created with
//!    create-if-absent semantics. A replica that loses the create race (409) reads the winner's.
//! 2. **Inspect.** Damaged data ([`inspect`]) is reported (a Warning Event on the Secret, the
//!    `appset_webhook_certificate_secret_damaged_total` counter, a log line naming the keys, never
//!    their values) and repaired: from its sound parts when the CA survived, else from the
//!    material this replica last served. Only a replica that never served anything replaces a
//!    lost CA with a new one. A Secret deleted outright is recreated the same way.
//! 3. **Advance.** [`next_step`] says whether the material needs a change (renewal, CA rotation).
//!    It is told whether the bundle is published: the configuration is read back and every
//!    webhook entry's `caBundle` compared with the material's bundle. A successor CA is confirmed
//!    only then, and promoted only `promote_after` after its confirmation and while it is still
//!    published; a configuration that is missing or unreadable keeps the old signer. The change
//!    is written with the Secret's `resourceVersion`, so of several replicas one wins and the
//!    others re-read.
//! 4. **Publish, then serve.** The bundle goes into every webhook entry of the named
//!    MutatingWebhookConfiguration **before** the resolver switches to the new certificate. The
//!    configuration records the material's revision in the `appset.dev/ca-bundle-revision`
//!    annotation and a replica holding older material never writes over a newer bundle, so a
//!    replica that was paused cannot take a CA out of the bundle that another one already signs
//!    with.
//!
//! The loop runs on a timer, on every change to the Secret and to the configuration (a watch on
//! each of the two objects), and one second after a failed pass. Key material is never logged;
//! the Secret gets an Event for every renewal, rotation step and repair, and
//! `appset_webhook_certificate_expiry_timestamp_seconds{cert}` shows the expiry of every
//! certificate the replica serves or trusts.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use time::OffsetDateTime;
use tracing::{debug, info, warn};

use super::material::{
    Inspection, Material, MaterialError, Policy, Step, create, inspect, next_step, not_after,
};
use super::resolver::{CertResolver, LoadError};
use crate::metrics::TlsMetrics;

/// The annotation of the MutatingWebhookConfiguration naming the revision of the material its
/// `caBundle` was written from.
pub const BUNDLE_REVISION_ANNOTATION: &str = "appset.dev/ca-bundle-revision";

/// How soon a failed pass is retried.
const RETRY: Duration = Duration::from_secs(1);

/// Where the certificates live and how they are managed.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// Namespace of the certificate Secret.
    pub secret_namespace: String,
    /// Name of the certificate Secret.
    pub secret_name: String,
    /// The MutatingWebhookConfiguration whose `caBundle` this webhook keeps current, if any.
    pub webhook_configuration: Option<String>,
    /// Lifetimes and renewal windows.
    pub policy: Policy,
    /// How often the material is checked even when nothing changes.
    pub check_interval: Duration,
}

/// Errors of the TLS loop.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// An API call failed.
    #[error("API call failed while {0}: {1}")]
    Api(&'static str, #[source] kube::Error),
    /// Certificates could not be built.
    #[error(transparent)]
    Material(#[from] MaterialError),
    /// The serving certificate could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Writers kept conflicting.
    #[error("the certificate Secret kept changing under concurrent writers")]
    Contended,
    /// The named MutatingWebhookConfiguration does not exist: the bundle cannot be published,
    /// so no successor CA is confirmed or promoted.
    #[error("the MutatingWebhookConfiguration {0} does not exist; the CA bundle is not published")]
    ConfigurationMissing(String),
    /// The configuration's bundle comes from newer material than this replica read.
    #[error(
        "the caBundle was written from material revision {published}, newer than the {ours} read here; re-reading"
    )]
    Stale {
        /// The revision this replica holds.
        ours: u64,
        /// The revision recorded in the configuration.
        published: u64,
    },
}

/// The TLS loop of one replica.
pub struct TlsManager {
    secrets: Api<Secret>,
    configs: Api<MutatingWebhookConfiguration>,
    recorder: Recorder,
    config: TlsConfig,
    resolver: Arc<CertResolver>,
    metrics: TlsMetrics,
    /// The sound material this replica last served: what a damaged Secret is restored from.
    served: Mutex<Option<Material>>,
    /// The configuration as [`Self::reconcile_material`] read it, for the publication that
    /// follows in the same pass (taken once; a write based on it is guarded by its
    /// `resourceVersion`), so a pass reads the configuration once.
    read_back: Mutex<Option<Option<MutatingWebhookConfiguration>>>,
}

/// What the configuration showed when it was read back.
struct Published {
    /// Every webhook entry's `caBundle`, when the configuration exists.
    bundles: Option<Vec<Option<Vec<u8>>>>,
    /// The revision recorded in the configuration's annotation (0 when absent).
    revision: u64,
    /// Whether a configuration is named at all.
    named: bool,
}

impl Published {
    /// Whether every webhook entry carries `m`'s bundle (always, when no configuration is
    /// named: nothing to publish to).
    fn carries(&self, m: &Material) -> bool {
        if !self.named {
            return true;
        }
        let wanted = m.bundle();
        match &self.bundles {
            Some(bundles) if !bundles.is_empty() => bundles
                .iter()
                .all(|b| b.as_deref() == Some(wanted.as_bytes())),
            _ => false,
        }
    }
}

fn bundle_revision(cfg: &MutatingWebhookConfiguration) -> u64 {
    cfg.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(BUNDLE_REVISION_ANNOTATION))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

impl TlsManager {
    /// A manager serving its certificate through `resolver`.
    pub fn new(
        client: Client,
        config: TlsConfig,
        resolver: Arc<CertResolver>,
        metrics: TlsMetrics,
    ) -> Self {
        Self {
            secrets: Api::namespaced(client.clone(), &config.secret_namespace),
            configs: Api::all(client.clone()),
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: crate::events::REPORTING_CONTROLLER.into(),
                    instance: std::env::var("POD_NAME").ok(),
                },
            ),
            config,
            resolver,
            metrics,
            served: Mutex::new(None),
            read_back: Mutex::new(None),
        }
    }

    fn served(&self) -> Option<Material> {
        self.served.lock().ok().and_then(|g| g.clone())
    }

    /// Reads the configuration back.
    async fn published(&self) -> Result<Published, TlsError> {
        let Some(name) = &self.config.webhook_configuration else {
            return Ok(Published {
                bundles: None,
                revision: 0,
                named: false,
            });
        };
        let cfg = self
            .configs
            .get_opt(name)
            .await
            .map_err(|e| TlsError::Api("reading the MutatingWebhookConfiguration", e))?;
        if let Ok(mut read_back) = self.read_back.lock() {
            *read_back = Some(cfg.clone());
        }
        Ok(Published {
            revision: cfg.as_ref().map_or(0, bundle_revision),
            bundles: cfg.map(|c| {
                c.webhooks
                    .unwrap_or_default()
                    .into_iter()
                    .map(|w| w.client_config.ca_bundle.map(|b| b.0))
                    .collect()
            }),
            named: true,
        })
    }

    /// Reads, creates, repairs or advances the material once; returns the material now stored.
    pub async fn reconcile_material(&self) -> Result<Material, TlsError> {
        let name = &self.config.secret_name;
        for _ in 0..8 {
            let now = OffsetDateTime::now_utc();
            let published = self.published().await?;
            let existing = self
                .secrets
                .get_opt(name)
                .await
                .map_err(|e| TlsError::Api("reading the certificate Secret", e))?;
            let Some(secret) = existing else {
                let (material, reason) = match self.served() {
                    Some(m) => {
                        let floor = m.revision.max(published.revision);
                        (m.succeeding(floor), "CertificateRestored")
                    }
                    None => (
                        create(&self.config.policy, now)?.succeeding(published.revision),
                        "CertificateCreated",
                    ),
                };
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(self.config.secret_namespace.clone()),
                        ..Default::default()
                    },
                    type_: Some("Opaque".into()),
                    data: Some(to_bytes(&material)),
                    ..Default::default()
                };
                match self.secrets.create(&PostParams::default(), &secret).await {
                    Ok(created) => {
                        if reason == "CertificateRestored" {
                            warn!(secret = %name, "the certificate Secret was deleted; restored the material this replica serves");
                            self.event(&created, EventType::Warning, reason, &note(reason))
                                .await;
                        } else {
                            info!(secret = %name, "created the webhook CA and serving certificate");
                            self.event(&created, EventType::Normal, reason, &note(reason))
                                .await;
                        }
                        return Ok(material);
                    }
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        debug!("another replica created the certificate Secret first");
                        continue;
                    }
                    Err(e) => return Err(TlsError::Api("creating the certificate Secret", e)),
                }
            };
            let data: BTreeMap<String, Vec<u8>> = secret
                .data
                .clone()
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            let (next, event_type, why, message) = match inspect(&data, &self.config.policy, now)? {
                Inspection::Sound(m) if m.revision < published.revision => {
                    // The Secret went back behind the published bundle (restored from an
                    // old copy): renumber it so that its bundle may be published again.
                    let floor = published.revision;
                    (
                        m.succeeding(floor),
                        EventType::Normal,
                        "CertificateRenumbered",
                        note("CertificateRenumbered"),
                    )
                }
                Inspection::Sound(m) => {
                    match next_step(&m, &self.config.policy, now, published.carries(&m))? {
                        None => return Ok(m),
                        Some((m2, step)) => {
                            let why = reason(step);
                            (m2, EventType::Normal, why, note(why))
                        }
                    }
                }
                Inspection::Damaged { keys, repaired } => {
                    self.metrics.secret_damaged.inc();
                    let (m, action) = match (repaired, self.served()) {
                        (Some(m), _) => (m, "repaired it from its sound parts"),
                        (None, Some(m)) => (m, "restored the material this replica serves"),
                        (None, None) => (
                            create(&self.config.policy, now)?,
                            "replaced it with a new CA, as no sound CA is known to this replica; the API server trusts it once the caBundle is published",
                        ),
                    };
                    let floor = m.revision.max(published.revision);
                    let keys = keys.join(", ");
                    warn!(secret = %name, keys = %keys, action, "the certificate Secret is damaged");
                    (
                        m.succeeding(floor),
                        EventType::Warning,
                        "CertificateSecretDamaged",
                        format!(
                            "The certificate Secret's keys {keys} are missing or unreadable; the webhook {action}"
                        ),
                    )
                }
            };
            let mut updated = secret.clone();
            updated.data = Some(to_bytes(&next));
            match self
                .secrets
                .replace(name, &PostParams::default(), &updated)
                .await
            {
                Ok(stored) => {
                    info!(secret = %name, step = why, revision = next.revision, "updated the webhook certificates");
                    self.event(&stored, event_type, why, &message).await;
                    return Ok(next);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    debug!("another replica updated the certificate Secret first");
                    continue;
                }
                Err(e) => return Err(TlsError::Api("updating the certificate Secret", e)),
            }
        }
        Err(TlsError::Contended)
    }

    /// Publishes the material's bundle in the webhook configuration, then serves its
    /// certificate. With the named configuration missing the certificate is still served
    /// (nothing calls through a configuration that does not exist, and the bundle published
    /// once it does trusts it) and the error is returned.
    pub async fn apply(&self, material: &Material) -> Result<(), TlsError> {
        let published = self.sync_ca_bundle(material).await;
        if let Err(e) = &published
            && !matches!(e, TlsError::ConfigurationMissing(_))
        {
            return published;
        }
        if self
            .resolver
            .load_pem(&material.tls_cert, &material.tls_key)?
        {
            info!(revision = material.revision, "serving a new certificate");
        }
        self.record_expiry(material);
        if let Ok(mut served) = self.served.lock() {
            *served = Some(material.clone());
        }
        published
    }

    fn record_expiry(&self, m: &Material) {
        let certs = [
            ("ca", Some(m.ca_cert.as_str())),
            ("serving", Some(m.tls_cert.as_str())),
            ("next-ca", m.next_ca.as_ref().map(|n| n.cert.as_str())),
            ("previous-ca", m.previous_ca.as_deref()),
        ];
        for (label, pem) in certs {
            let labels = vec![("cert", label)];
            match pem.map(not_after) {
                Some(Ok(t)) => {
                    self.metrics
                        .expiry
                        .get_or_create(&labels)
                        .set(t.unix_timestamp());
                }
                _ => {
                    self.metrics.expiry.remove(&labels);
                }
            }
        }
    }

    /// Writes the material's bundle into every webhook entry of the configuration, when it
    /// differs, unless the configuration holds a bundle of newer material.
    async fn sync_ca_bundle(&self, material: &Material) -> Result<(), TlsError> {
        let Some(name) = &self.config.webhook_configuration else {
            return Ok(());
        };
        let wanted = ByteString(material.bundle().into_bytes());
        let mut read_back = self.read_back.lock().ok().and_then(|mut r| r.take());
        for _ in 0..8 {
            let read =
                match read_back.take() {
                    Some(read) => read,
                    None => self.configs.get_opt(name).await.map_err(|e| {
                        TlsError::Api("reading the MutatingWebhookConfiguration", e)
                    })?,
                };
            let Some(mut cfg) = read else {
                return Err(TlsError::ConfigurationMissing(name.clone()));
            };
            let mut changed = false;
            for w in cfg.webhooks.iter_mut().flatten() {
                if w.client_config.ca_bundle.as_ref() != Some(&wanted) {
                    w.client_config.ca_bundle = Some(wanted.clone());
                    changed = true;
                }
            }
            if !changed {
                return Ok(());
            }
            let published = bundle_revision(&cfg);
            if material.revision < published {
                return Err(TlsError::Stale {
                    ours: material.revision,
                    published,
                });
            }
            cfg.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(
                    BUNDLE_REVISION_ANNOTATION.into(),
                    material.revision.to_string(),
                );
            match self
                .configs
                .replace(name, &PostParams::default(), &cfg)
                .await
            {
                Ok(_) => {
                    info!(configuration = %name, revision = material.revision, "published the CA bundle");
                    return Ok(());
                }
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(TlsError::Api("updating the caBundle", e)),
            }
        }
        Err(TlsError::Contended)
    }

    /// One pass: material, bundle, certificate.
    pub async fn tick(&self) -> Result<(), TlsError> {
        let m = self.reconcile_material().await?;
        self.apply(&m).await
    }

    /// Runs until `shutdown` completes: a pass on start, on every change of the Secret or the
    /// configuration, every `check_interval`, and one second after a failed pass.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let by_name = |n: &str| watcher::Config::default().fields(&format!("metadata.name={n}"));
        let mut secret_changes =
            watcher(self.secrets.clone(), by_name(&self.config.secret_name)).boxed();
        let mut config_changes = match &self.config.webhook_configuration {
            Some(name) => watcher(self.configs.clone(), by_name(name))
                .map(|e| e.map(|_| ()))
                .boxed(),
            None => futures::stream::pending().boxed(),
        };
        tokio::pin!(shutdown);
        let mut next = tokio::time::Instant::now();
        loop {
            if next <= tokio::time::Instant::now() {
                let wait = match self.tick().await {
                    Ok(()) => self.config.check_interval,
                    Err(e) => {
                        warn!(error = %e, "certificate maintenance failed; retrying");
                        RETRY.min(self.config.check_interval)
                    }
                };
                next = tokio::time::Instant::now() + wait;
            }
            // A change brings the next pass forward; a watch error (retried by the watch after
            // a pause) does not, so a watch that keeps failing costs no extra passes.
            let changed = tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep_until(next) => false,
                ev = secret_changes.next() => match ev {
                    Some(Ok(_)) => true,
                    Some(Err(e)) => {
                        debug!(error = %e, "certificate Secret watch error");
                        tokio::time::sleep(RETRY).await;
                        false
                    }
                    None => {
                        tokio::time::sleep(RETRY).await;
                        false
                    }
                },
                ev = config_changes.next() => match ev {
                    Some(Ok(())) => true,
                    Some(Err(e)) => {
                        debug!(error = %e, "webhook configuration watch error");
                        tokio::time::sleep(RETRY).await;
                        false
                    }
                    None => {
                        tokio::time::sleep(RETRY).await;
                        false
                    }
                },
            };
            if changed {
                next = tokio::time::Instant::now();
            }
        }
    }

    async fn event(&self, secret: &Secret, type_: EventType, reason: &str, note: &str) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note.into()),
            action: "RotateCertificates".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &secret.object_ref(&())).await {
            debug!(error = %e, "cannot publish an Event");
        }
    }
}

fn to_bytes(m: &Material) -> std::collections::BTreeMap<String, ByteString> {
    m.to_data()
        .into_iter()
        .map(|(k, v)| (k, ByteString(v)))
        .collect()
}

fn reason(step: Step) -> &'static str {
    match step {
        Step::DroppedPreviousCa => "PreviousCaDropped",
        Step::PromotedCa => "CaRotated",
        Step::PublishedNextCa => "NextCaPublished",
        Step::ConfirmedNextCa => "NextCaConfirmed",
        Step::UnconfirmedNextCa => "NextCaUnconfirmed",
        Step::RenewedServing => "CertificateRenewed",
    }
}

fn note(reason: &str) -> String {
    match reason {
        "PreviousCaDropped" => "The former webhook CA expired and left the CA bundle".into(),
        "CaRotated" => "The successor CA now signs the serving certificate; the former CA stays trusted until it expires".into(),
        "NextCaPublished" => "A successor CA was added to the CA bundle ahead of the CA's expiry; it signs nothing until the bundle is confirmed in every webhook entry".into(),
        "NextCaConfirmed" => "Every webhook entry carries the CA bundle with the successor CA; it will sign after the promotion delay".into(),
        "NextCaUnconfirmed" => "The CA bundle in the webhook configuration lost the successor CA; its promotion waits until the bundle is confirmed again".into(),
        "CertificateRenewed" => "The serving certificate was renewed by the same CA".into(),
        "CertificateRestored" => "The certificate Secret was deleted; the webhook restored the material it serves".into(),
        "CertificateCreated" => "Created the webhook CA and serving certificate".into(),
        "CertificateRenumbered" => "The certificate Secret's revision was behind the published CA bundle; it was raised so the bundle can be kept current".into(),
        other => format!("Certificates updated ({other})"),
    }
}
