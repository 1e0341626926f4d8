//! Keeps the certificate Secret, the served certificate and the webhook's `caBundle` in step.
//!
//! Every replica runs the same loop; they agree through the API server rather than through a
//! leader:
//!
//! 1. **Read or create.** The Secret is read; when absent, fresh [`Material`] is created with
//!    create-if-absent semantics. A replica that loses the create race (409) reads the winner's.
//! 2. **Advance.** [`next_step`] says whether the material needs a change (renewal, CA rotation);
//!    the change is written with the Secret's `resourceVersion`, so of several replicas one wins
//!    and the others re-read.
//! 3. **Publish, then serve.** The bundle goes into every webhook entry of the named
//!    MutatingWebhookConfiguration **before** the resolver switches to the new certificate.
//!    Together with the material's rule that a new CA is published in the bundle before it signs
//!    anything, the API server always trusts the certificate being served.
//!
//! The loop runs on a timer and on every change to the Secret (a watch on that one object), so a
//! renewal by one replica reaches the others within moments. Key material is never logged; the
//! Secret gets an Event for every renewal and rotation.

use std::sync::Arc;
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

use super::material::{Material, MaterialError, Policy, Step, create, next_step};
use super::resolver::{CertResolver, LoadError};

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
}

/// The TLS loop of one replica.
pub struct TlsManager {
    secrets: Api<Secret>,
    configs: Api<MutatingWebhookConfiguration>,
    recorder: Recorder,
    config: TlsConfig,
    resolver: Arc<CertResolver>,
}

impl TlsManager {
    /// A manager serving its certificate through `resolver`.
    pub fn new(client: Client, config: TlsConfig, resolver: Arc<CertResolver>) -> Self {
        Self {
            secrets: Api::namespaced(client.clone(), &config.secret_namespace),
            configs: Api::all(client.clone()),
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: "appset-webhook".into(),
                    instance: std::env::var("POD_NAME").ok(),
                },
            ),
            config,
            resolver,
        }
    }

    /// Reads, creates or advances the material once; returns the material now stored.
    pub async fn reconcile_material(&self) -> Result<Material, TlsError> {
        let name = &self.config.secret_name;
        for _ in 0..8 {
            let now = OffsetDateTime::now_utc();
            let existing = self
                .secrets
                .get_opt(name)
                .await
                .map_err(|e| TlsError::Api("reading the certificate Secret", e))?;
            let Some(secret) = existing else {
                let material = create(&self.config.policy, now)?;
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
                        info!(secret = %name, "created the webhook CA and serving certificate");
                        self.event(
                            &created,
                            "CertificateCreated",
                            "Created the webhook CA and serving certificate",
                        )
                        .await;
                        return Ok(material);
                    }
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        debug!("another replica created the certificate Secret first");
                        continue;
                    }
                    Err(e) => return Err(TlsError::Api("creating the certificate Secret", e)),
                }
            };
            let data: std::collections::BTreeMap<String, Vec<u8>> = secret
                .data
                .clone()
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            let (next, why) = match Material::from_data(&data) {
                None => {
                    warn!(secret = %name, "the certificate Secret is incomplete; replacing its material");
                    (create(&self.config.policy, now)?, "CertificateRecreated")
                }
                Some(m) => match next_step(&m, &self.config.policy, now) {
                    Ok(None) => return Ok(m),
                    Ok(Some((m2, step))) => (m2, reason(step)),
                    Err(e) => {
                        warn!(secret = %name, error = %e, "the stored certificates are unreadable; replacing them");
                        (create(&self.config.policy, now)?, "CertificateRecreated")
                    }
                },
            };
            let mut updated = secret.clone();
            updated.data = Some(to_bytes(&next));
            match self
                .secrets
                .replace(name, &PostParams::default(), &updated)
                .await
            {
                Ok(stored) => {
                    info!(secret = %name, step = why, "updated the webhook certificates");
                    self.event(&stored, why, &note(why)).await;
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
    /// certificate.
    pub async fn apply(&self, material: &Material) -> Result<(), TlsError> {
        self.sync_ca_bundle(&material.bundle()).await?;
        if self
            .resolver
            .load_pem(&material.tls_cert, &material.tls_key)?
        {
            info!("serving a new certificate");
        }
        Ok(())
    }

    /// Writes `bundle` into every webhook entry of the configuration, when it differs.
    async fn sync_ca_bundle(&self, bundle: &str) -> Result<(), TlsError> {
        let Some(name) = &self.config.webhook_configuration else {
            return Ok(());
        };
        for _ in 0..8 {
            let Some(mut cfg) = self
                .configs
                .get_opt(name)
                .await
                .map_err(|e| TlsError::Api("reading the MutatingWebhookConfiguration", e))?
            else {
                warn!(configuration = %name, "the MutatingWebhookConfiguration does not exist; caBundle not published");
                return Ok(());
            };
            let wanted = ByteString(bundle.as_bytes().to_vec());
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
            match self
                .configs
                .replace(name, &PostParams::default(), &cfg)
                .await
            {
                Ok(_) => {
                    info!(configuration = %name, "published the CA bundle");
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

    /// Runs until `shutdown` completes: a pass on start, on every change of the Secret and
    /// every `check_interval`. Errors are logged and retried on the next pass.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let cfg = watcher::Config::default()
            .fields(&format!("metadata.name={}", self.config.secret_name));
        let mut changes = watcher(self.secrets.clone(), cfg).boxed();
        tokio::pin!(shutdown);
        loop {
            if let Err(e) = self.tick().await {
                warn!(error = %e, "certificate maintenance failed; retrying");
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(self.config.check_interval) => {}
                ev = changes.next() => {
                    if let Some(Err(e)) = ev {
                        debug!(error = %e, "certificate Secret watch error");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
    }

    async fn event(&self, secret: &Secret, reason: &str, note: &str) {
        let ev = Event {
            type_: EventType::Normal,
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
        Step::RenewedServing => "CertificateRenewed",
    }
}

fn note(reason: &str) -> String {
    match reason {
        "PreviousCaDropped" => "The former webhook CA expired and left the CA bundle".into(),
        "CaRotated" => "The successor CA now signs the serving certificate; the former CA stays trusted until it expires".into(),
        "NextCaPublished" => "A successor CA was added to the webhook's caBundle ahead of the CA's expiry".into(),
        "CertificateRenewed" => "The serving certificate was renewed by the same CA".into(),
        other => format!("Certificates updated ({other})"),
    }
}
